import json

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import bert_classifier
from classifier import BertClassifier
from conftest import make_personachat
from reply_ranker import (biencoder_scores, collate_examples, context_text, embed_texts, example_scores,
                          multiple_choice_loss, ranker_examples, score_pairs, start_from_cosine)

CONTEXT = "i like cats\nwhat do you do for fun?"
CANDIDATES = ["i play with my cats", "pizza at work", "the city is big today", "my family likes dogs"]


@pytest.fixture(scope="module")
def encoder_and_tokenizer(tiny_bert_dir):
    return AutoModel.from_pretrained(tiny_bert_dir).eval(), AutoTokenizer.from_pretrained(tiny_bert_dir)


def siamese(encoder):
    torch.manual_seed(0)
    return BertClassifier(encoder, 2, "mean", pair_encoding="siamese").eval()


def test_ranker_examples_put_the_gold_reply_first_then_its_distractors():
    dialogs = make_personachat(n_train=2, n_utts=2, n_cands=4)["train"]
    examples = ranker_examples(dialogs, negatives=2, max_history=1)
    assert len(examples) == 4
    context, candidates = examples[1]
    utterance = dialogs[0]["utterances"][1]
    assert context == "\n".join(dialogs[0]["personality"] + utterance["history"][-3:])
    assert candidates == [utterance["candidates"][-1]] + utterance["candidates"][:2]
    assert [len(c) for _, c in ranker_examples(dialogs, negatives=-1)] == [4] * 4
    spread = ranker_examples(make_personachat(n_train=3, n_utts=4)["train"], max_history=0, max_examples=3)
    assert [c[0] for _, c in spread] == [d["utterances"][0]["candidates"][-1]
                                         for d in make_personachat(n_train=3, n_utts=4)["train"]]  # one per dialog


def test_biencoder_scores_are_cosines_of_mean_pooled_embeddings(encoder_and_tokenizer):
    encoder, tokenizer = encoder_and_tokenizer
    scores = biencoder_scores(encoder, tokenizer, "i like cats", ["i like cats", "pizza work"], "cpu")
    vectors = embed_texts(encoder, tokenizer, ["i like cats", "pizza work"], "cpu")
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5)
    assert scores[1].item() == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-5)


LONG_CONTEXT = "i like cats\n" * 30 + "what do you do for fun?"  # past the 48 tokens kept below


@pytest.mark.parametrize("context", [CONTEXT, LONG_CONTEXT])
def test_a_siamese_ranker_started_from_cosine_scores_as_the_biencoder(encoder_and_tokenizer, context):
    encoder, tokenizer = encoder_and_tokenizer
    model = siamese(encoder)
    start_from_cosine(model, scale=20.0)
    scores = score_pairs(model, tokenizer, {"pair_encoding": "siamese", "truncate": 48}, context, CANDIDATES, "cpu")
    cosines = biencoder_scores(encoder, tokenizer, context, CANDIDATES, "cpu", max_length=48)
    assert torch.allclose(scores, 20.0 * cosines, atol=1e-4)


def test_the_biencoder_reads_the_end_of_a_long_context(encoder_and_tokenizer):
    encoder, tokenizer = encoder_and_tokenizer
    other_end = LONG_CONTEXT.replace("what do you do for fun?", "where is the city?")
    assert not torch.allclose(biencoder_scores(encoder, tokenizer, LONG_CONTEXT, CANDIDATES, "cpu", max_length=48),
                              biencoder_scores(encoder, tokenizer, other_end, CANDIDATES, "cpu", max_length=48))


@pytest.mark.parametrize("pair_encoding", ["cross", "siamese"])
def test_batched_scores_equal_one_example_at_a_time(encoder_and_tokenizer, pair_encoding):
    encoder, tokenizer = encoder_and_tokenizer
    torch.manual_seed(0)
    model = BertClassifier(encoder, 2, "mean", pair_encoding=pair_encoding).eval()
    examples = [(CONTEXT, CANDIDATES[:2]), ("the city is big", CANDIDATES[2:]),
                ("hi", ["a much longer reply " * 3, "no"])]
    with torch.no_grad():
        batched = example_scores(model, collate_examples(tokenizer, examples, pair_encoding), "cpu")
    alone = torch.stack([score_pairs(model, tokenizer, {"pair_encoding": pair_encoding}, c, cands, "cpu")
                         for c, cands in examples])
    assert batched.shape == (3, 2) and torch.allclose(batched, alone, atol=1e-5)


def test_in_batch_scores_add_the_other_examples_gold_replies(encoder_and_tokenizer):
    encoder, tokenizer = encoder_and_tokenizer
    model = siamese(encoder)
    examples = [(CONTEXT, CANDIDATES[:2]), ("the city is big", CANDIDATES[2:]), ("hi", ["hello", "no"])]
    with torch.no_grad():
        scores = example_scores(model, collate_examples(tokenizer, examples, "siamese"), "cpu", in_batch=True)
    assert scores.shape == (3, 2 + 3)
    assert torch.isinf(scores[:, 2:].diagonal()).all()
    # column 2 + j of row i: example j's gold reply after example i's context
    expected = score_pairs(model, tokenizer, {"pair_encoding": "siamese"}, "hi", [CANDIDATES[0]], "cpu")
    assert scores[2, 2].item() == pytest.approx(expected.item(), abs=1e-5)
    assert multiple_choice_loss(scores).item() > 0


@pytest.mark.parametrize("pair_encoding", ["siamese", "cross"])
def test_ranker_trains_on_dialogs_and_ranks_in_evaluation_and_chat(tiny_bert_dir, tiny_dirs, personachat_file,
                                                                   tmp_path, pair_encoding, caplog):
    import subprocess
    import sys

    import convai_evaluation
    from conftest import ROOT

    ranker = tmp_path / "ranker"
    bert_classifier.main(["train", "--ranker", "--dataset_path", personachat_file, "--dataset_cache",
                          str(tmp_path / "cache"), "--output_dir", str(ranker), "--model_checkpoint", tiny_bert_dir,
                          "--n_epochs", "1", "--device", "cpu", "--pair_encoding", pair_encoding,
                          "--eval_before_start", "--batch_size", "4"])
    saved = json.load(open(ranker / "classifier.json"))
    assert saved["ranker"] is True and saved["pair_encoding"] == pair_encoding
    kept = json.load(open(ranker / "valid_metrics.json"))
    assert 0 <= kept["hits@1"] <= 1 and kept["examples"] == 9  # 3 valid dialogs of 3 utterances
    results = convai_evaluation.main(["--model_checkpoint", tiny_dirs["llama"], "--dataset_path", personachat_file,
                                      "--eval_type", "hits@1", "--ranker", "bert", "--ranker_checkpoint", str(ranker),
                                      "--results_file", str(tmp_path / "r.json"), "--device", "cpu"])
    assert results["ranker"] == "bert" and results["min_candidates"] == 3
    assert results["ranker_checkpoint"] == str(ranker)
    from classifier import load_classifier
    model, tokenizer, _, options = load_classifier(str(ranker), ranker=True)
    examples = convai_evaluation.examples_of(convai_evaluation.evaluation_dialogs(personachat_file, 42), 0)
    firsts = [int(score_pairs(model, tokenizer, options, context_text(persona, history, options["max_history"]),
                              candidates, "cpu").argmax()) for _, persona, history, candidates, _ in examples]
    assert results["hits@1"] == pytest.approx(sum(f == len(c) - 1 for f, (*_, c, _) in zip(firsts, examples))
                                              / len(examples))  # the gold is last
    baseline = convai_evaluation.main(["--model_checkpoint", tiny_dirs["llama"], "--dataset_path", personachat_file,
                                       "--eval_type", "hits@1", "--ranker", "biencoder", "--ranker_checkpoint",
                                       tiny_bert_dir, "--results_file", str(tmp_path / "b.json"), "--device", "cpu"])
    assert baseline["ranker"] == "biencoder" and 0 <= baseline["hits@1"] <= 1
    assert baseline["ranker_checkpoint"] == tiny_bert_dir
    done = subprocess.run([sys.executable, f"{ROOT}/interact.py", "--model_checkpoint", tiny_dirs["llama"],
                           "--personality", "i like cats", "--rerank", "3", "--ranker_checkpoint", str(ranker),
                           "--max_length", "5"], input="hello\nhow are you\n", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == 2
    from classifier import DataError
    with pytest.raises(DataError, match="is a reply ranker"):
        bert_classifier.main(["predict", "--model_checkpoint", str(ranker), "--input_file", f"{ROOT}/README.md"])
    # a ranker whose training split is not the one held out here is named as possibly trained on the examples
    import logging
    import shutil
    other_split = tmp_path / "other_split"
    shutil.copytree(ranker, other_split)
    config = json.load(open(other_split / "classifier.json"))
    assert (config["dataset_path"], config["split_seed"]) == (personachat_file, 42)
    json.dump(dict(config, split_seed=7), open(other_split / "classifier.json", "w"))
    with caplog.at_level(logging.WARNING):
        convai_evaluation.main(["--model_checkpoint", tiny_dirs["llama"], "--dataset_path", personachat_file,
                                "--eval_type", "hits@1", "--ranker", "bert", "--ranker_checkpoint", str(other_split),
                                "--results_file", str(tmp_path / "o.json"), "--device", "cpu", "--max_examples", "2"])
    assert "with seed 7" in caplog.text and "it may have trained on some of them" in caplog.text
    assert "may have trained" not in "".join(r.message for r in caplog.records if "other_split" not in r.message)
    # and the other way round: a classifier that is not a ranker does not rank replies
    classifier_dir = tmp_path / "classifier"
    shutil.copytree(ranker, classifier_dir)
    json.dump(dict(config, ranker=False, classes=["neg", "pos"]), open(classifier_dir / "classifier.json", "w"))
    with pytest.raises(DataError, match=r"--ranker_checkpoint .*classifier: a binary classifier of \['neg', 'pos'\], "
                                        r"not a reply ranker"):
        convai_evaluation.main(["--model_checkpoint", tiny_dirs["llama"], "--dataset_path", personachat_file,
                                "--eval_type", "hits@1", "--ranker", "bert", "--ranker_checkpoint",
                                str(classifier_dir), "--results_file", str(tmp_path / "c.json"), "--device", "cpu"])


def test_ranker_defaults_and_the_cross_encoder_needs_distractors(capsys):
    args = bert_classifier.get_args(["train", "--ranker", "--output_dir", "x"])
    assert (args.pair_encoding, args.pooling, args.validation_metric) == ("siamese", "mean", "mrr")
    args = bert_classifier.get_args(["train", "--train_file", "t.csv", "--output_dir", "x"])
    assert (args.pair_encoding, args.pooling, args.validation_metric) == ("cross", "cls", "accuracy")
    with pytest.raises(SystemExit):
        bert_classifier.get_args(["train", "--ranker", "--output_dir", "x", "--negatives", "0", "--pair_encoding",
                                  "cross"])
    assert "--negatives: a cross-encoder ranker needs at least 1 distractor" in capsys.readouterr().err


@pytest.mark.parametrize("pair_encoding", ["cross", "siamese"])
def test_examples_with_fewer_candidates_get_blanks_scored_minus_infinity(encoder_and_tokenizer, pair_encoding):
    encoder, tokenizer = encoder_and_tokenizer
    torch.manual_seed(0)
    model = BertClassifier(encoder, 2, "mean", pair_encoding=pair_encoding).eval()
    examples = [(CONTEXT, CANDIDATES[:3]), ("the city is big", CANDIDATES[3:])]
    with torch.no_grad():
        scores = example_scores(model, collate_examples(tokenizer, examples, pair_encoding), "cpu")
    assert scores.shape == (2, 3) and torch.isinf(scores[1, 1:]).all() and torch.isfinite(scores[0]).all()
    alone = score_pairs(model, tokenizer, {"pair_encoding": pair_encoding}, "the city is big", CANDIDATES[3:], "cpu")
    assert scores[1, 0].item() == pytest.approx(alone.item(), abs=1e-5)


@pytest.mark.parametrize("pair_encoding", ["cross", "siamese"])
def test_long_contexts_lose_their_oldest_turns_first(encoder_and_tokenizer, pair_encoding):
    tokenizer = encoder_and_tokenizer[1]
    context = "\n".join(["i am the city today"] * 20 + ["no maybe school pizza"])
    batch = collate_examples(tokenizer, [(context, ["i play"])], pair_encoding, max_length=16)
    ids = (batch["contexts"] if pair_encoding == "siamese" else batch["pairs"])["input_ids"][0].tolist()
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.endswith("no maybe school pizza" + (" i play" if pair_encoding == "cross" else ""))
    assert len(ids) == 16
    assert tokenizer.truncation_side == "right"  # the shared tokenizer is left as it was


def test_same_gold_text_in_a_batch_is_not_a_distractor(encoder_and_tokenizer):
    encoder, tokenizer = encoder_and_tokenizer
    examples = [("hi there", ["hello", "no"]), ("good morning", ["hello", "pizza"]), ("bye", ["see you", "no"])]
    with torch.no_grad():
        scores = example_scores(siamese(encoder), collate_examples(tokenizer, examples, "siamese"), "cpu",
                                in_batch=True)
    assert torch.isinf(scores[0, 2 + 1]) and torch.isinf(scores[1, 2 + 0]) and torch.isfinite(scores[0, 2 + 2])


def test_flags_a_ranker_ignores_are_refused(capsys):
    with pytest.raises(SystemExit):
        bert_classifier.get_args(["train", "--ranker", "--output_dir", "x", "--class_weights", "1", "2"])
    assert "--class_weights: not used with --ranker" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bert_classifier.get_args(["train", "--ranker", "--output_dir", "x", "--text_field", "sentence"])
    assert "--text_field: not used with --ranker" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bert_classifier.get_args(["train", "--ranker", "--output_dir", "x", "--validation_metric", "accuracy"])
    assert "with --ranker one of" in capsys.readouterr().err
