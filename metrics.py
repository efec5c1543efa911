"""Validation metrics as ignite metrics, so they are summed across processes before they are computed."""
import math

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
