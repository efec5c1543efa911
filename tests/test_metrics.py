import math

import pytest
import torch

from metrics import TokenNLL, f1_score, normalize_answer, perplexity


def test_normalize_answer_is_parlais():
    assert normalize_answer("An apple, the pear & a plum!") == "apple pear plum"
    assert normalize_answer("  Don't   STOP  ") == "don t stop"


@pytest.mark.parametrize("guess, answers, expected", [
    ("The cat sat.", ["a cat sat"], 1.0),                      # articles and punctuation do not count
    ("Hello, WORLD!", ["hello world"], 1.0),                   # nor does case
    ("the the cat cat cat", ["cat dog"], 0.4),                 # repeated words count once per match: P=1/3, R=1/2
    ("i like dogs", ["i like cats", "dogs i like"], 1.0),      # the best of several golds
    ("i like dogs", ["i like cats"], 2 / 3),
    ("", ["anything"], 0.0),
    ("nothing shared", ["at all"], 0.0),
])
def test_f1_on_hand_computed_pairs(guess, answers, expected):
    assert f1_score(guess, answers) == pytest.approx(expected)


def test_token_nll_is_the_mean_over_all_tokens_not_over_batches():
    metric = TokenNLL()
    metric.update((torch.tensor(10.0), torch.tensor(2)))
    metric.update((torch.tensor(2.0), torch.tensor(8)))
    assert metric.compute() == pytest.approx(12.0 / 10)
    assert perplexity(metric.compute()) == pytest.approx(math.exp(1.2))
