import json
import math

import pytest
import torch

import convai_evaluation
from conftest import save_run_with_a_trained_head, spy_on_choices
from decoding import DecodingConfig, generate
from inputs import collate
from layouts import IGNORE_INDEX
from metrics import f1_score
from modeling import load_tokenizer_and_model
from rankers import joined
from ranking import score_candidates

DISTRACTORS = ["cats dogs pizza music", "school work family", "yes no maybe sure", "running cooking today",
               "weather nice cool fun", "books friend city"]
HISTORIES = ["hello how are you", "what do you like", "my name is from the city"]


@pytest.fixture(scope="module")
def chatty(chatty_dir):
    return chatty_dir


@pytest.fixture(scope="module")
def convai_file(chatty, tmp_path_factory):
    """ConvAI2 text whose gold replies are the model's own greedy replies, among random distractors."""
    tokenizer, model, layout = load_tokenizer_and_model(chatty)
    model.eval()
    lines = []
    for k, text in enumerate(HISTORIES):
        context = layout.context_inputs([tokenizer("i like cats", add_special_tokens=False)["input_ids"]],
                                 [tokenizer(text, add_special_tokens=False)["input_ids"]], 256, 10)
        reply = generate(model, [context], layout, DecodingConfig(no_sample=True, min_length=4, max_length=4))[0]
        gold = tokenizer.decode(reply)
        cands = DISTRACTORS[k:k + 3] + [gold]
        lines += ["1 your persona: i like cats", f"2 {text}\t{gold}\t\t{'|'.join(cands)}"]
    path = tmp_path_factory.mktemp("data") / "valid_self_original.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def evaluate(chatty, convai_file, tmp_path, *extra):
    return convai_evaluation.main(["--model_checkpoint", chatty, "--dataset_path", convai_file, "--device", "cpu",
                                   "--results_file", str(tmp_path / "results.json"), *extra])


def test_hits_at_1_finds_the_reply_the_model_prefers(chatty, convai_file, tmp_path):
    results = evaluate(chatty, convai_file, tmp_path, "--eval_type", "hits@1", "--ranker", "lm")
    assert results["examples"] == 3 and results["candidates"] == 20  # asked 20, the data has 4: no harm
    assert results["hits@1"] == 1.0 and results["mrr"] == 1.0
    assert json.load(open(tmp_path / "results.json"))["hits@1"] == 1.0


def test_several_rankers_rank_the_same_examples(chatty, convai_file, tmp_path, capsys, caplog):
    both = evaluate(chatty, convai_file, tmp_path, "--eval_type", "hits@1", "--ranker", "lm", "mc")
    table = capsys.readouterr().out.splitlines()  # names right-aligned to the longest ("mean_candidates")
    assert len({len(line) - len(line.lstrip()) + len(line.split()[0]) for line in table}) == 1 and len(table) > 4
    # the pretrained model's head is untrained: its hits@1 is said to be near chance
    assert "--ranker mc: " in caplog.text and "no trained multiple-choice head" in caplog.text
    alone = {name: evaluate(chatty, convai_file, tmp_path, "--eval_type", "hits@1", "--ranker", name)
             for name in ("lm", "mc")}
    assert both["ranker"] == "lm" and both["hits@1"] == alone["lm"]["hits@1"] == 1.0
    for name in ("lm", "mc"):
        assert both["by_ranker"][name] == {k: alone[name][k] for k in ("hits@1", "mrr")}


def unpreferred_golds(tmp_path):
    """ConvAI2 text of 6 examples whose gold replies the model was not made to prefer, so that rankers differ."""
    lines = []
    for k, text in enumerate(HISTORIES * 2):
        candidates = DISTRACTORS[k:] + DISTRACTORS[:k]
        lines += ["1 your persona: i like cats", f"2 {text}\t{candidates[-1]}\t\t{'|'.join(candidates)}"]
    data = tmp_path / "valid_self_original.txt"
    data.write_text("\n".join(lines) + "\n")
    return data


def test_pmi_ranks_by_the_replys_log_likelihood_after_the_context_minus_after_an_empty_one(chatty, tmp_path):
    data = unpreferred_golds(tmp_path)
    predictions = tmp_path / "pred.jsonl"
    results = evaluate(chatty, str(data), tmp_path, "--eval_type", "hits@1", "--ranker", "pmi", "lm",
                       "--save_predictions", str(predictions))
    tokenizer, model, layout = load_tokenizer_and_model(chatty)
    model.eval()
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731

    def logprob(persona, history, reply):  # a whole sequence through the model, labels on the reply and its end
        batch = collate([{"instances": [layout.build(persona, history, encode(reply), lm_labels=True)],
                          "mc_labels": 0}], layout.pad)
        with torch.no_grad():
            nll_sum, count, _ = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], None,
                                      batch["lm_labels"])
        return -nll_sum.item(), count.item()

    mrr = {"pmi": 0.0, "lm": 0.0}
    tops = []
    for k, text in enumerate(HISTORIES * 2):
        candidates = DISTRACTORS[k:] + DISTRACTORS[:k]
        after = [logprob([encode("i like cats")], [encode(text)], c) for c in candidates]
        scores = {"pmi": [total - logprob([], [], c)[0] for (total, _), c in zip(after, candidates)],
                  "lm": [total / count for total, count in after]}
        for name, values in scores.items():
            mrr[name] += 1 / sum(v >= values[-1] for v in values) / len(HISTORIES * 2)
        tops.append(candidates[scores["pmi"].index(max(scores["pmi"]))])
    assert mrr["pmi"] != pytest.approx(mrr["lm"])  # the two rankings differ on these examples
    assert results["ranker"] == "pmi" and results["mrr"] == pytest.approx(mrr["pmi"], rel=1e-6)
    assert results["by_ranker"]["lm"]["mrr"] == pytest.approx(mrr["lm"], rel=1e-6)
    assert [json.loads(row)["top_candidate"] for row in open(predictions)] == tops


def test_rankers_joined_by_plus_rank_by_the_sum_of_their_standardized_scores(chatty, tmp_path):
    data = unpreferred_golds(tmp_path)
    predictions = tmp_path / "pred.jsonl"
    results = evaluate(chatty, str(data), tmp_path, "--eval_type", "hits@1", "--ranker", "lm+mc+pmi", "mc", "lm",
                       "pmi", "--save_predictions", str(predictions))
    rows = [json.loads(row) for row in open(predictions)]
    assert all(sorted(row["scores"]) == ["lm", "mc", "pmi"] and len(row["scores"]["mc"]) == 6 for row in rows)

    def z(values):  # standardized by hand: mean 0, sample standard deviation 1
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return [(v - mean) / sd for v in values]

    def mrr(score):
        return sum(1 / sum(s >= score(row)[-1] for s in score(row)) for row in rows) / len(rows)

    joined = mrr(lambda row: [sum(parts) for parts in zip(*(z(row["scores"][n]) for n in ("lm", "mc", "pmi")))])
    assert results["ranker"] == "lm+mc+pmi" and results["mrr"] == pytest.approx(joined, rel=1e-6)
    alone = {name: mrr(lambda row: row["scores"][name]) for name in ("lm", "mc", "pmi")}
    assert {name: results["by_ranker"][name]["mrr"] for name in alone} == pytest.approx(alone, rel=1e-6)
    assert len({round(v, 6) for v in [joined, *alone.values()]}) > 2  # the joined ranking is not one part's



def test_ppl_is_exp_of_the_mean_nll_of_gold_tokens(chatty, convai_file, tmp_path):
    results = evaluate(chatty, convai_file, tmp_path, "--eval_type", "ppl")
    tokenizer, model, layout = load_tokenizer_and_model(chatty)
    model.eval()
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    nll, tokens, words, end_nll, n_end = 0.0, 0, 0, 0.0, 0
    for line in open(convai_file).read().splitlines()[1::2]:
        text, gold = line.split(" ", 1)[1].split("\t")[:2]
        batch = collate([{"instances": [layout.build([encode("i like cats")], [encode(text)],
                                                                  encode(gold), lm_labels=True)],
                          "mc_labels": 0}], layout.pad)
        with torch.no_grad():
            nll_sum, count, _ = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], None,
                                      batch["lm_labels"])
        nll, tokens, words = nll + nll_sum.item(), tokens + count.item(), words + len(gold.split())
        end_labels = batch["lm_labels"].clone()
        end_labels[..., :-len(layout.reply_end)] = IGNORE_INDEX  # the reply's end of turn alone
        with torch.no_grad():
            end_sum, end_count, _ = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], None,
                                          end_labels)
        end_nll, n_end = end_nll + end_sum.item(), n_end + end_count.item()
    assert results["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-3)
    assert results["word_ppl"] == pytest.approx(math.exp(nll / words), rel=1e-3)
    assert results["end_nll"] == pytest.approx(end_nll / n_end, rel=1e-3)
    assert results["reply_ppl"] == pytest.approx(math.exp((nll - end_nll) / (tokens - n_end)), rel=1e-3)


def test_f1_and_saved_predictions(chatty, convai_file, tmp_path):
    predictions = tmp_path / "pred.jsonl"
    results = evaluate(chatty, convai_file, tmp_path, "--eval_type", "all", "--max_length", "4", "--min_length", "4",
                       "--ranker", "lm", "--save_predictions", str(predictions))
    rows = [json.loads(line) for line in open(predictions)]
    assert len(rows) == 3
    assert set(rows[0]) == {"id", "context", "gold", "reply", "top_candidate", "scores", "f1"}
    assert all(row["reply"] == row["gold"] and row["f1"] == 1.0 for row in rows)  # greedy reproduces the gold
    assert results["f1"] == 1.0 and results["hits@1"] == 1.0
    assert all(row["top_candidate"] == row["gold"] for row in rows)
    assert [row["context"] for row in rows] == HISTORIES  # the turn each reply answers
    echoes = [f1_score(row["reply"], [row["context"]]) for row in rows]
    assert results["echo_f1"] == pytest.approx(sum(echoes) / 3) and results["gold_echo_f1"] == results["echo_f1"]


def test_rerank_scores_f1_of_the_sample_the_runs_multiple_choice_head_prefers(chatty, convai_file, tmp_path,
                                                                               monkeypatch, caplog):
    with pytest.raises(SystemExit, match="--rerank 3: .* no trained multiple-choice head.*another --ranker"):
        evaluate(chatty, convai_file, tmp_path, "--eval_type", "f1", "--rerank", "3")  # a pretrained model's
    # the reply by PMI, which needs no training; the untrained head's picks beside it, with a warning
    by_pmi = evaluate(chatty, convai_file, tmp_path, "--eval_type", "f1", "--rerank", "3", "--ranker", "pmi", "mc")
    assert by_pmi["rerank_ranker"] == "pmi" and set(by_pmi["f1_by_ranker"]) == {"pmi", "mc"}
    assert "--rerank pick) is an untrained head's" in caplog.text
    tokenizer = save_run_with_a_trained_head(chatty, tmp_path / "run")
    calls = spy_on_choices(monkeypatch)
    predictions = tmp_path / "pred.jsonl"
    results = convai_evaluation.main(["--model_checkpoint", str(tmp_path / "run"), "--dataset_path", convai_file,
                                      "--device", "cpu", "--eval_type", "f1", "--rerank", "3", "--max_length", "6",
                                      "--temperature", "2.0", "--save_predictions", str(predictions),
                                      "--ranker", "mc", "lm", "mc+lm"])
    rows = [json.loads(line) for line in open(predictions)]
    assert results["rerank"] == 3 and results["f1_decoding"] == "sampled" and results["rerank_ranker"] == "mc"
    assert len(calls) == len(rows) == 3
    _, model, layout = load_tokenizer_and_model(str(tmp_path / "run"))
    for row, (context, replies, by_part) in zip(rows, calls):
        mc_logits = score_candidates(model.eval(), context, replies, layout)[0]
        assert len(replies) == 3 and torch.allclose(by_part["mc"], mc_logits, atol=1e-5)
        best = int(mc_logits.argmax())
        assert row["picks"] == {"mc": best, "lm": int(by_part["lm"].argmax()),
                                "mc+lm": int(joined("mc+lm", by_part).argmax())}
        assert row["reply"] == row["samples"][best] == " ".join(
            tokenizer.decode(replies[best], skip_special_tokens=True).split())
        assert row["f1"] == row["samples_f1"][best]
    assert results["f1"] == pytest.approx(sum(row["f1"] for row in rows) / 3)
    assert results["f1_by_ranker"]["mc"] == results["f1"]
    for name in ("lm", "mc+lm"):
        assert results["f1_by_ranker"][name] == pytest.approx(sum(r["samples_f1"][r["picks"][name]] for r in rows) / 3)
    assert results["f1_random_sample"] == pytest.approx(sum(sum(row["samples_f1"]) / 3 for row in rows) / 3)
    assert results["f1_best_sample"] == pytest.approx(sum(max(row["samples_f1"]) for row in rows) / 3)
    assert results["f1_best_sample"] >= results["f1"]
    assert any(row["picks"]["mc"] > 0 for row in rows)  # not just the first sample
    assert any(len(set(row["picks"].values())) > 1 for row in rows)  # the rankers do not all agree


def test_rerank_greedy_ranks_the_greedy_reply_among_the_samples(chatty, convai_file, tmp_path):
    common = ["--eval_type", "f1", "--max_length", "4", "--min_length", "4", "--temperature", "2.0"]
    evaluate(chatty, convai_file, tmp_path, *common, "--save_predictions", str(tmp_path / "greedy.jsonl"))
    results = evaluate(chatty, convai_file, tmp_path, *common, "--rerank", "3", "--rerank_greedy", "--ranker", "pmi",
                       "lm", "--save_predictions", str(tmp_path / "rerank.jsonl"))
    greedy = [json.loads(line) for line in open(tmp_path / "greedy.jsonl")]
    rows = [json.loads(line) for line in open(tmp_path / "rerank.jsonl")]
    assert [row["samples"][0] for row in rows] == [row["reply"] for row in greedy]  # the first, greedy
    assert all(len(row["samples"]) == 3 for row in rows)
    assert any(sample not in row["samples"][:1] for row in rows for sample in row["samples"][1:])  # others sampled
    assert results["rerank_greedy"] is True and results["rerank"] == 3
    assert results["greedy_picked"] == pytest.approx(sum(row["picks"]["pmi"] == 0 for row in rows) / 3)
    assert results["f1"] == pytest.approx(sum(row["samples_f1"][row["picks"]["pmi"]] for row in rows) / 3)
    assert results["f1_best_sample"] == 1.0  # the greedy reply is the gold here, and it is among them
    plain = evaluate(chatty, convai_file, tmp_path, *common, "--rerank", "3", "--ranker", "pmi")
    assert plain["rerank_greedy"] is False and "greedy_picked" not in plain


@pytest.mark.parametrize("flags, message", [(["--eval_type", "f1", "--num_beams", "2"], "--num_beams decodes one"),
                                           (["--eval_type", "hits@1"], "only F1 generates replies")])
def test_rerank_needs_sampled_replies_to_choose_from(flags, message, capsys):
    with pytest.raises(SystemExit):
        convai_evaluation.get_args(["--rerank", "3", *flags])
    assert message in capsys.readouterr().err


def test_f1_results_say_how_replies_were_decoded(chatty, convai_file, tmp_path):
    results = evaluate(chatty, convai_file, tmp_path, "--eval_type", "f1", "--max_length", "4", "--num_beams", "2",
                       "--no_repeat_ngram_size", "3")
    assert results["f1_decoding"] == "beam" and results["rerank"] == 0
    assert {k: results["decoding"][k] for k in ("max_length", "num_beams", "no_repeat_ngram_size", "no_sample")} == {
        "max_length": 4, "num_beams": 2, "no_repeat_ngram_size": 3, "no_sample": True}


@pytest.mark.parametrize("flags, message", [
    (["--ranker", "bert"], "--ranker bert needs --ranker_checkpoint DIR"),
    (["--ranker", "bert", "biencoder", "--ranker_checkpoint", "r"], "--ranker bert and biencoder read "
                                                                     "--ranker_checkpoint each: give one of them")])
def test_bert_ranker_needs_its_checkpoint(flags, message, capsys):
    with pytest.raises(SystemExit):
        convai_evaluation.get_args(flags)
    assert message in capsys.readouterr().err


def scored_contexts(predictions):
    return sorted(json.loads(line)["context"] for line in open(predictions))


def last_turns(dialogs):
    return sorted(u["history"][-1] for d in dialogs for u in d["utterances"])


def test_held_out_dialogs_are_those_training_held_out(chatty, tmp_path):
    import shutil

    from dialogs import read_dialogs

    run = tmp_path / "run"
    shutil.copytree(chatty, run)
    convs = {f"c{k}": {"messages": [[{"text": f"hi {k}"}], [{"text": "yes sure"}], [{"text": "cats dogs"}]]}
             for k in range(40)}
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(convs))
    (run / "training_args.json").write_text(json.dumps({"seed": 7, "dataset_path": str(data)}))
    results = convai_evaluation.main(["--model_checkpoint", str(run), "--eval_type", "ppl",
                                      "--results_file", str(tmp_path / "r.json"),
                                      "--save_predictions", str(tmp_path / "p.jsonl")])
    assert results["split_seed"] == 7 and results["dataset_path"] == str(data)
    assert scored_contexts(tmp_path / "p.jsonl") == last_turns(read_dialogs(str(data), seed=7)["valid"])
    assert scored_contexts(tmp_path / "p.jsonl") != last_turns(read_dialogs(str(data), seed=0)["valid"])
    results = convai_evaluation.main(["--model_checkpoint", str(run), "--eval_type", "ppl", "--split_seed", "0",
                                      "--results_file", str(tmp_path / "r.json"),
                                      "--save_predictions", str(tmp_path / "p.jsonl")])
    assert results["split_seed"] == 0
    assert scored_contexts(tmp_path / "p.jsonl") == last_turns(read_dialogs(str(data), seed=0)["valid"])


def test_max_examples_sample_every_held_out_dialog_not_the_first_ones():
    dialogs = [{"personality": [f"p{d}"], "utterances": [{"history": [f"h{d}.{u}"], "candidates": [f"r{d}.{u}"]}
                                                         for u in range(10)]} for d in range(5)]
    picked = convai_evaluation.examples_of(dialogs, 5)
    assert [e[0] for e in picked] == ["0:0", "1:0", "2:0", "3:0", "4:0"]
    assert picked[3] == ("3:0", ["p3"], ["h3.0"], ["r3.0"], ["r3.0"])  # the last: its labels
    assert len(convai_evaluation.examples_of(dialogs, 0)) == 50


def test_a_run_trained_on_a_parlai_train_file_is_scored_on_what_it_held_out(chatty, tmp_path):
    import shutil

    from dialogs import read_dialogs
    from test_dialogs import CONVAI2_NO_CANDS

    run = tmp_path / "run"
    shutil.copytree(chatty, run)
    data = tmp_path / "train_chats.txt"  # no valid_ sibling: train.py held some dialogs out
    data.write_text(CONVAI2_NO_CANDS * 4)
    (run / "training_args.json").write_text(json.dumps({"seed": 3, "dataset_path": str(data)}))
    results = convai_evaluation.main(["--model_checkpoint", str(run), "--eval_type", "ppl",
                                      "--results_file", str(tmp_path / "r.json"),
                                      "--save_predictions", str(tmp_path / "p.jsonl")])
    held_out = read_dialogs(str(data), seed=3)["valid"]
    assert results["examples"] == sum(len(d["utterances"]) for d in held_out) < 48
    assert scored_contexts(tmp_path / "p.jsonl") == last_turns(held_out)
    assert last_turns(held_out) != last_turns(read_dialogs(str(data), seed=4)["valid"])
    other = tmp_path / "chats.txt"  # a file that is not the run's training data is evaluated whole
    other.write_text(CONVAI2_NO_CANDS)
    results = convai_evaluation.main(["--model_checkpoint", str(run), "--eval_type", "ppl", "--dataset_path",
                                      str(other), "--results_file", str(tmp_path / "r.json")])
    assert results["examples"] == 12


@pytest.mark.parametrize("flags, message", [
    (["--save_predictions", "{tmp}/no/p.jsonl"], "--save_predictions {tmp}/no/p.jsonl: its directory does not exist"),
    (["--results_file", "{tmp}"], "--results_file {tmp}: a directory; name a file"),
    (["--save_predictions", "{tmp}"], "--save_predictions {tmp}: a directory; name a file"),
    (["--num_candidates", "0"], "--num_candidates 0: at least 1"),
    (["--num_candidates", "-1"], "--num_candidates -1: at least 1"),
    (["--max_history", "-1"], "--max_history -1: at least 0"),
    (["--max_examples", "-1"], "--max_examples -1: at least 0"),
    (["--batch_size", "0"], "--batch_size 0: at least 1"),
    (["--ranker", "lm", "--ranker_checkpoint", "r"], "--ranker_checkpoint r: only --ranker bert or biencoder reads it"),
    (["--temperature", "0"], "--temperature: at least 1e-05 (replies are greedy unless --sample or --rerank)"),
    (["--temperature", "1e-45"], "--temperature: at least 1e-05"),
    (["--ranker", "mc+pmx"], "argument --ranker: 'mc+pmx': unknown ranker 'pmx' (choose from mc, lm, pmi, bert, "),
    (["--ranker", "mc+pmi+mc"], "argument --ranker: 'mc+pmi+mc': a ranker twice"),
    (["--ranker", "lm+bert", "--ranker_checkpoint", "r", "--frequency_penalty", "3"],
     "--frequency_penalty 3.0: between -2 and 2")])
def test_bad_flags_are_refused_before_anything_loads(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        convai_evaluation.get_args([flag.format(tmp=tmp_path) for flag in flags])
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_a_biencoder_checkpoint_that_is_not_there_is_one_line(chatty, convai_file, tmp_path):
    from classifier import DataError

    with pytest.raises(DataError, match=r"^--ranker_checkpoint /nonexistent: "):  # one line: main's caller catches it
        evaluate(chatty, convai_file, tmp_path, "--eval_type", "hits@1", "--ranker", "biencoder",
                 "--ranker_checkpoint", "/nonexistent")


def test_f1_takes_the_best_of_a_lines_labels(chatty, convai_file, tmp_path):
    """ParlAI's F1 is the best over a line's labels: here the model's greedy reply is each line's second label."""
    lines = []
    for line in open(convai_file).read().splitlines():
        fields = line.split("\t")
        if len(fields) > 1:
            fields[1] = "zebra quartz|" + fields[1]
        lines.append("\t".join(fields))
    several = tmp_path / "valid_several_labels.txt"
    several.write_text("\n".join(lines) + "\n")
    predictions = tmp_path / "pred.jsonl"
    results = evaluate(chatty, str(several), tmp_path, "--eval_type", "f1", "--max_length", "4", "--min_length", "4",
                       "--save_predictions", str(predictions))
    rows = [json.loads(line) for line in open(predictions)]
    assert results["f1"] == 1.0 and all(row["gold"] == "zebra quartz" and row["reply"] == row["labels"][1]
                                        for row in rows)
