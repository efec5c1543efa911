"""Metrics: token NLL as an ignite metric (summed across processes before it is computed) and ParlAI's F1."""
import math
import re
from collections import Counter

import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce


class TokenNLL(Metric):
    """Mean NLL per labelled token over the whole set (not a mean of batch means, which weighs short batches up).

    Takes `(nll_sum, token_count)` per batch.
    """

    def __init__(self, output_transform=lambda x: x, device="cpu"):
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self):
        self._nll = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0, dtype=torch.long, device=self._device)

    @reinit__is_reduced
    def update(self, output):
        nll_sum, count = output
        self._nll += nll_sum.detach().to(self._device, torch.float64)
        self._count += count.detach().to(self._device)

    @sync_all_reduce("_nll", "_count")
    def compute(self):
        if self._count.item() == 0:
            raise NotComputableError("TokenNLL needs at least one labelled token")
        return (self._nll / self._count).item()


def perplexity(nll):
    return math.exp(min(nll, 700.0))  # exp overflows past ~709


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]")


def normalize_answer(text):
    """ParlAI's normalization: lower case, punctuation and articles (a, an, the) removed, whitespace squashed."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1_score(guess, answers):
    """ParlAI's unigram F1 of a guess against the best-matching of several gold answers."""
    if guess is None or not answers:
        return 0.0
    guess_tokens = normalize_answer(guess).split()
    return max(_prec_recall_f1(guess_tokens, normalize_answer(a).split()) for a in answers)


def _prec_recall_f1(pred, gold):
    common = Counter(pred) & Counter(gold)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred), num_same / len(gold)
    return 2 * precision * recall / (precision + recall)
