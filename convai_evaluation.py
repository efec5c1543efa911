"""ConvAI2 metrics of a run, without ParlAI: hits@1 (and hits@k, MRR), perplexity and F1.

    python convai_evaluation.py --eval_type all --model_checkpoint runs/x --dataset_path valid_self_original.txt
    python convai_evaluation.py --eval_type hits@1 --ranker lm --max_examples 200
    python convai_evaluation.py --eval_type hits@1 --ranker mc lm biencoder    # several rankers, same examples
    python convai_evaluation.py --eval_type hits@1 --ranker mc+pmi+biencoder   # their standardized scores summed

Data: the valid split of PersonaChat JSON or of the chit-chat corpus, or every dialog of a ParlAI/ConvAI2 text
file. Results go to a JSON file next to the run and to a table on stdout.
"""
import json
import logging
import math
import os
import sys
from argparse import ArgumentParser
from dataclasses import asdict

import torch
from tqdm import tqdm

from checkpointing import read_training_args
from classifier import DataError
from decoding import DecodingConfig, add_penalty_args, check_decoding_args, generate, reply_text
from dialogs import (NUM_DISTRACTORS, VALID_FRACTION, DialogFormatError, add_distractors, read_dialogs, read_parlai)
from layouts import INPUT_FORMATS, InputFormatError
from metrics import f1_score, perplexity
from modeling import load_tokenizer_and_model, model_max_length
from rankers import (RANKERS, Rankers, add_rerank_greedy_arg, joined, load_ranker_models, mc_rerank_error,
                     ranker_checkpoint_problem, ranker_parts, ranker_type, rerank_configs, rerank_greedy_problem)
from ranking import HITS_AT, rank_metrics, rank_of_gold, score_candidates
from utils import newest_run, resolve_dataset_path, seed_type, set_seed, spread_indices, write_json

logger = logging.getLogger(__file__)


def get_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval_type", default="all", choices=["hits@1", "ppl", "f1", "all"],
                        help="Which metrics (default: all)")
    parser.add_argument("--model_checkpoint", default="",
                        help="Run directory, hub id or .gguf file (default: the newest run under runs/)")
    parser.add_argument("--dataset_path", default="",
                        help="Evaluation data (default: the run's training data, else the packaged corpus; its "
                             "held-out split)")
    parser.add_argument("--dataset_cache", default="./dataset_cache", help="Where downloads are kept")
    parser.add_argument("--input_format", default="", choices=("",) + INPUT_FORMATS,
                        metavar="{" + ",".join(INPUT_FORMATS) + "}",
                        help="Layout of a pretrained model's inputs (default: a run's own; else chat_template where "
                             "the tokenizer has one)")
    parser.add_argument("--ranker", default=["mc"], nargs="+", type=ranker_type,
                        metavar="{" + ",".join(RANKERS) + "}[+...]",
                        help="hits@1 scoring: the multiple-choice head, LM likelihood per token, PMI (the reply's LM "
                             "log-likelihood after the context minus after an empty one, which discounts replies "
                             "likely anywhere), the BERT ranker (--ranker_checkpoint), or cosine of an encoder's "
                             "mean-pooled embeddings (--ranker_checkpoint, default: the packaged MiniLM); several "
                             "joined by '+' (mc+pmi+biencoder) rank by the sum of their scores, each standardized over "
                             "an example's candidates; several rank the same examples, the first reported as hits@1 "
                             "(default: mc)")
    parser.add_argument("--ranker_checkpoint", default="",
                        help="--ranker bert: a ranker trained by `bert_classifier.py train --ranker`; --ranker "
                             "biencoder: an encoder (default: the packaged MiniLM)")
    parser.add_argument("--num_candidates", type=int, default=20, help="Candidates per example (default: 20)")
    parser.add_argument("--max_history", type=int, default=2, help="Previous exchanges kept (default: 2)")
    parser.add_argument("--max_examples", type=int, default=0,
                        help="Evaluate N examples spread evenly over the split, every (examples / N)-th from the "
                             "first, so that they sample every dialog (default: all)")
    parser.add_argument("--batch_size", type=int, default=8, help="Contexts decoded at once for F1 (default: 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sample", action="store_true", help="Sample replies for F1 (default: greedy)")
    parser.add_argument("--rerank", type=int, default=0,
                        help="F1 of the best of N sampled replies by the first --ranker (by default the run's "
                             "multiple-choice head), as interact.py --rerank N --ranker R answers; with several "
                             "--rankers, the F1 of each one's pick among the same samples goes to f1_by_ranker "
                             "(default: 0, off)")
    add_rerank_greedy_arg(parser)
    parser.add_argument("--max_length", type=int, default=20, help="Most tokens in a generated reply (default: 20)")
    parser.add_argument("--min_length", type=int, default=1, help="Fewest tokens in a generated reply (default: 1)")
    parser.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (default: 0.7)")
    parser.add_argument("--top_k", type=int, default=0, help="Top-k sampling; 0: off (default: 0)")
    parser.add_argument("--top_p", type=float, default=0.9, help="Nucleus sampling mass (default: 0.9)")
    parser.add_argument("--num_beams", type=int, default=1, help="Beam search beams (default: 1, off)")
    parser.add_argument("--no_repeat_ngram_size", type=int, default=0, help="n-gram blocking (default: 0, off)")
    add_penalty_args(parser)
    parser.add_argument("--seed", type=seed_type, default=0, help="Seed of sampling (default: 0)")
    parser.add_argument("--split_seed", type=seed_type, default=None,
                        help="Seed of the train/valid split and distractors (default: the run's training seed, else 42)")
    parser.add_argument("--results_file", default="",
                        help="Where to write the results JSON (default: convai_evaluation.json in the run directory)")
    parser.add_argument("--save_predictions", default="", help="One JSON line per example to this file")
    args = parser.parse_args(argv)
    check_decoding_args(parser, args)
    for flag, value, least in (("num_candidates", args.num_candidates, 1), ("max_history", args.max_history, 0),
                               ("max_examples", args.max_examples, 0), ("batch_size", args.batch_size, 1)):
        if value < least:
            parser.error(f"--{flag} {value}: at least {least}")
    problem = ranker_checkpoint_problem(ranker_parts(args.ranker), args.ranker_checkpoint)
    if problem:
        parser.error(problem)
    for flag, path in (("--results_file", args.results_file), ("--save_predictions", args.save_predictions)):
        if path and os.path.isdir(path):  # found now, not after the scoring
            parser.error(f"{flag} {path}: a directory; name a file")
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{flag} {path}: its directory does not exist")
    if args.rerank < 0:
        parser.error(f"--rerank {args.rerank}: the number of replies to sample, at least 0")
    problem = rerank_greedy_problem(args.rerank, args.rerank_greedy)
    if problem:
        parser.error(problem)
    if args.rerank > 1 and args.num_beams > 1:
        parser.error(f"--rerank {args.rerank}: reranks sampled replies; --num_beams decodes one reply N times over")
    if args.rerank > 1 and args.eval_type not in ("f1", "all"):
        parser.error(f"--rerank {args.rerank}: only F1 generates replies (--eval_type f1 or all)")
    return args


def evaluation_dialogs(path, seed, trained_on=""):
    """Dialogs to evaluate, every utterance with candidates: the valid split of a file, or all of a ParlAI text file.

    A ParlAI file that is the run's training data (`trained_on`), or a `train_*` one, is read as train.py read
    it: its `valid_*` sibling, else the dialogs held out with `seed`; never the dialogs the run trained on.
    """
    own = bool(trained_on) and os.path.exists(trained_on) and os.path.samefile(path, trained_on)
    if str(path).endswith(".txt") and not own and not os.path.basename(path).startswith("train"):
        dialogs = read_parlai(path)
        add_distractors(dialogs, NUM_DISTRACTORS, seed, where=path)
        return dialogs
    return read_dialogs(path, seed=seed, num_distractors=NUM_DISTRACTORS, valid_fraction=VALID_FRACTION,
                        need_train=False)["valid"]


def examples_of(dialogs, max_examples):
    """(id, persona, history, candidates, labels) texts, in order: all, or max_examples spread evenly over the split.

    The gold reply is the last candidate; `labels` are the right answers F1 takes the best of: the gold, and the
    other labels of a ParlAI line that has several."""
    out = [(f"{d}:{u}", dialog["personality"], utterance["history"], utterance["candidates"],
            utterance.get("labels") or utterance["candidates"][-1:])
           for d, dialog in enumerate(dialogs) for u, utterance in enumerate(dialog["utterances"])]
    return [out[i] for i in spread_indices(len(out), max_examples)]


def main(argv=None):
    args = get_args(argv)
    rankers = list(dict.fromkeys(args.ranker))
    parts = ranker_parts(rankers)
    set_seed(args.seed)
    checkpoint = args.model_checkpoint or newest_run("runs")
    if checkpoint is None:
        sys.exit("convai_evaluation.py: no run under runs/: train one with `make demo`, or pass --model_checkpoint")
    trained = read_training_args(checkpoint)
    split_seed = args.split_seed if args.split_seed is not None else trained.get("seed", 42)
    dataset_path = args.dataset_path or trained.get("dataset_path", "")
    bert, biencoder = load_ranker_models(parts, args.ranker_checkpoint)
    tokenizer, model, layout = load_tokenizer_and_model(checkpoint, input_format=args.input_format)
    # get_args refused --rerank without F1; every --ranker ranks the samples, the first gives the reply
    problem = mc_rerank_error(args.rerank if "mc" in rankers[0].split("+") else 0, model, checkpoint)
    if problem:
        sys.exit(f"convai_evaluation.py: error: {problem}")
    model.to(args.device).eval()
    if bert is not None:
        ranker_data, ranker_seed = bert[3].get("dataset_path", ""), bert[3].get("split_seed")
        same_data = ranker_data == dataset_path or (os.path.exists(ranker_data) and os.path.exists(dataset_path)
                                                    and os.path.samefile(ranker_data, dataset_path))
        if ranker_seed is not None and not (same_data and ranker_seed == split_seed):
            logger.warning("--ranker_checkpoint %s trained on the split of %s with seed %s, and these examples are "
                           "held out of %s with seed %s: it may have trained on some of them", args.ranker_checkpoint,
                           ranker_data or "the packaged corpus", ranker_seed, dataset_path or
                           "the packaged corpus", split_seed)
    scorer = Rankers(model, layout, args.device, bert, biencoder, args.max_history)
    encode = lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []  # noqa
    max_len = model_max_length(model)
    want = {"hits@1", "ppl", "f1"} if args.eval_type == "all" else {args.eval_type}
    overflow = layout.reply_overflow(args.max_length, max_len)
    if "f1" in want and overflow:
        raise DataError(f"--max_length {args.max_length}: {overflow}")
    path = resolve_dataset_path(dataset_path, args.dataset_cache)
    # the split seed of training: held-out dialogs of a file without a valid part are those train.py held out
    examples = examples_of(evaluation_dialogs(path, split_seed, trained.get("dataset_path") or ""), args.max_examples)
    if ("hits@1" in want or args.rerank > 1) and "mc" in parts and not model.heads_trained:
        logger.warning("--ranker mc: %s has no trained multiple-choice head; its hits@1 (and --rerank pick) is an "
                       "untrained head's, near chance (the LM ranker is the zero-shot baseline: --ranker lm)",
                       checkpoint)

    ranks, nll, n_tokens, n_words, f1s, records, n_candidates = {r: [] for r in rankers}, 0.0, 0, 0, [], [], []
    echoes = []  # (F1 of the reply, of the gold) against the turn they answer
    end_nll = 0.0  # of the reply end's tokens alone
    contexts, dialog_texts = [], []
    for example_id, persona, history, candidates, labels in tqdm(examples, desc="Scoring",
                                                                 disable=not want & {"hits@1", "ppl"}):
        history = history[-(2 * args.max_history + 1):]
        candidates = candidates[-args.num_candidates:] if "hits@1" in want else candidates[-1:]
        persona_ids, history_ids, cand_ids = encode(persona), encode(history), encode(candidates)
        context = layout.context_inputs(persona_ids, history_ids, max_len,
                                        max(max(len(c) for c in cand_ids), args.max_length))  # end: in overhead
        contexts.append(context)
        dialog_texts.append((persona, history))
        record = {"id": example_id, "context": history[-1] if history else "", "gold": candidates[-1]}
        if len(labels) > 1:
            record["labels"] = labels
        own_scores = "ppl" in want or ("hits@1" in want and {"mc", "lm", "pmi"} & set(parts))
        if want & {"hits@1", "ppl"}:
            gold = len(candidates) - 1
            lm_rows = None if "hits@1" in want and {"lm", "pmi"} & set(parts) else [gold]
            if own_scores:  # the chat model's own scores: not needed to rank with another model alone
                mc, logp, lengths, end_logp = score_candidates(model, context, cand_ids, layout, lm_rows=lm_rows)
            if "hits@1" in want:
                n_candidates.append(len(candidates))
                by_part = scorer.part_scores(parts, persona, history, context, cand_ids, candidates,
                                             own=(mc, logp, lengths) if own_scores else None)
                record["scores"] = {name: [float(x) if math.isfinite(x) else None for x in scores.tolist()]
                                    for name, scores in by_part.items()}  # per candidate, the gold last
                for name in rankers:
                    scores = joined(name, by_part)
                    ranks[name].append(rank_of_gold(scores, gold))
                    if name == rankers[0]:
                        record["top_candidate"] = candidates[int(scores.argmax())]
            if "ppl" in want:
                nll -= float(logp[gold])
                end_nll -= float(end_logp[gold])
                n_tokens += int(lengths[gold])
                n_words += max(len(candidates[-1].split()), 1)
        records.append(record)

    if "f1" in want:
        config = DecodingConfig.from_args(args, no_sample=not args.sample and args.rerank < 2)
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        rows = rerank_configs(config, args.rerank, args.rerank_greedy)  # per context: its samples (and greedy reply)
        samples = len(rows)
        for start in tqdm(range(0, len(contexts), args.batch_size), desc="Generating"):
            batch = contexts[start:start + args.batch_size]
            replies = generate(model, [c for c in batch for _ in rows], layout, rows * len(batch), generator=generator)
            for i, (record, context) in enumerate(zip(records[start:], batch)):
                mine = replies[i * samples:(i + 1) * samples]
                group = [" ".join(reply_text(tokenizer, r).split()) for r in mine]
                group_f1 = [f1_score(text, record.get("labels", [record["gold"]])) for text in group]
                picks = {rankers[0]: 0}
                if samples > 1:  # every --ranker's pick among the same samples; the first's is --rerank's reply
                    by_part = scorer.part_scores(parts, *dialog_texts[start + i], context, mine, group)
                    picks = {name: int(joined(name, by_part).argmax()) for name in rankers}
                    # what the rankers chose among, to set their picks against a random one and the best
                    record["samples"], record["samples_f1"], record["picks"] = group, group_f1, picks
                record["reply"], record["f1"] = group[picks[rankers[0]]], group_f1[picks[rankers[0]]]
                f1s.append(record["f1"])
                if record["context"]:  # how much the reply repeats the turn it answers (and the gold, people)
                    echoes.append((f1_score(record["reply"], [record["context"]]),
                                   f1_score(record["gold"], [record["context"]])))

    results = {"model_checkpoint": str(checkpoint), "dataset_path": str(path), "examples": len(examples),
               "input_format": layout.name, "split_seed": split_seed}  # it chose the held-out dialogs and distractors
    if "bert" in parts or ("biencoder" in parts and args.ranker_checkpoint):
        results["ranker_checkpoint"] = args.ranker_checkpoint
    if "hits@1" in want:
        fewest = min(n_candidates)
        if fewest < args.num_candidates:
            logger.warning("Some examples have only %d candidates (asked for %d)", fewest, args.num_candidates)
        hits_at = [k for k in HITS_AT if k < fewest or k == 1]
        by_ranker = {name: rank_metrics(ranks[name], hits_at) for name in rankers}
        results.update(by_ranker[rankers[0]])
        results.update({"ranker": rankers[0], "candidates": args.num_candidates, "min_candidates": fewest,
                        "mean_candidates": sum(n_candidates) / len(n_candidates)})
        if len(rankers) > 1:
            results["by_ranker"] = by_ranker
    if "ppl" in want:
        n_end = len(layout.reply_end) * len(examples)
        results.update({"ppl": perplexity(nll / n_tokens), "word_ppl": perplexity(nll / n_words),
                        "nll": nll / n_tokens,
                        # the reply's own tokens apart from its end (<eos> or end of turn), which layouts differ in
                        "reply_ppl": perplexity((nll - end_nll) / max(n_tokens - n_end, 1)),
                        "end_nll": end_nll / n_end})
    if "f1" in want:
        decoding = "beam" if config.num_beams > 1 else "greedy" if config.no_sample else "sampled"
        results.update({"f1": sum(f1s) / len(f1s), "f1_decoding": decoding,
                        "rerank": args.rerank if args.rerank > 1 else 0,
                        "decoding": asdict(config)})  # every setting, to reproduce the replies
        if echoes:  # a reply that repeats its partner's turn scores F1 against it near 1; people's replies, low
            results.update({"echo_f1": sum(e for e, _ in echoes) / len(echoes),
                            "gold_echo_f1": sum(g for _, g in echoes) / len(echoes)})
        if args.rerank > 1:  # the same samples picked at random (expected F1) and by an oracle that knows the gold
            results["f1_random_sample"] = sum(sum(r["samples_f1"]) / len(r["samples_f1"]) for r in records) / len(f1s)
            results["f1_best_sample"] = sum(max(r["samples_f1"]) for r in records) / len(f1s)
            results["rerank_ranker"] = rankers[0]
            results["rerank_greedy"] = args.rerank_greedy
            if args.rerank_greedy:  # the greedy reply is each example's first; how often the pick was it
                results["greedy_picked"] = sum(r["picks"][rankers[0]] == 0 for r in records) / len(f1s)
            if len(rankers) > 1:
                results["f1_by_ranker"] = {name: sum(r["samples_f1"][r["picks"][name]] for r in records) / len(f1s)
                                           for name in rankers}
    results_file = args.results_file or (os.path.join(checkpoint, "convai_evaluation.json")
                                         if os.path.isdir(checkpoint) else "convai_evaluation.json")
    write_json(results_file, results)
    if args.save_predictions:
        with open(args.save_predictions, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    width = max([len("metric")] + [len(name) for name, value in results.items() if isinstance(value, float)]
                + [len(name) for name in results.get("by_ranker", {})])
    print(f"{'metric':>{width}}  value")
    for name, value in results.items():
        if isinstance(value, float):
            print(f"{name:>{width}}  {value:.4f}")
    for ranker_name, metrics in results.get("by_ranker", {}).items():
        print(f"{ranker_name:>{width}}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"Results in {results_file}", file=sys.stderr)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    try:
        main()
    except (DataError, DialogFormatError, FileNotFoundError, IsADirectoryError, InputFormatError) as e:
        sys.exit(f"convai_evaluation.py: error: {e}")
