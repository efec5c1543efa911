"""Scoring candidate replies of one context: the context goes through the model once, the candidates on its KV cache.

ConvAI2's 20 candidates share their persona and history, so running 20 full sequences repeats the context
20 times; here it runs once and only the candidates' own tokens are computed, in one batch.
"""
import copy

import torch
import torch.nn.functional as F


@torch.no_grad()
def score_candidates(model, context, candidates, layout, lm_rows=None, chunk_size=5):
    """(mc_logits, lm_logprob_sum, lm_token_count, end_logprob_sum) per candidate, each a (candidates,) tensor.

    `context` is (input_ids, token_type_ids) of `layout`, ending where the reply starts; each candidate is scored
    as `candidate + reply end` (<eos>, or the template's end of turn): the LM sums the log-probabilities of
    those tokens (and, apart, of the reply end's alone: a layout's new, untrained end token costs there), the MC
    head reads the last one.
    LM sums are computed for the candidates in `lm_rows` only (default: all; NaN elsewhere): the vocabulary
    projection is the costly part, and ranking by the MC head needs it for none. Candidates run in chunks of
    similar length, each on its own copy of the context's cache.
    """
    device = next(model.parameters()).device
    ctx_ids, ctx_types = (torch.tensor([list(x)], device=device) for x in context)
    n_ctx = ctx_ids.shape[1]
    hidden, cache = model.hidden_states(ctx_ids, ctx_types, None, torch.arange(n_ctx, device=device)[None])
    first_logp = F.log_softmax(model.lm_logits(hidden[:, -1]), dim=-1)[0]

    conts = [list(c) + list(layout.reply_end) for c in candidates]
    want_lm = set(range(len(conts))) if lm_rows is None else set(lm_rows)
    mc_logits = torch.empty(len(conts), device=device)
    logp = torch.full((len(conts),), float("nan"), device=device)
    end_logp = logp.clone()
    order = sorted(range(len(conts)), key=lambda i: len(conts[i]))  # similar lengths together: little padding
    for start in range(0, len(order), chunk_size):
        rows = order[start:start + chunk_size]
        mc_logits[rows], logp[rows], end_logp[rows] = _score_chunk(
            model, cache, n_ctx, first_logp, [conts[i] for i in rows], [j for j, i in enumerate(rows) if i in want_lm],
            layout, device)
    lengths = torch.tensor([len(c) for c in conts], device=device)
    return mc_logits, logp, lengths, end_logp


def _score_chunk(model, context_cache, n_ctx, first_logp, conts, lm_rows, layout, device):
    """MC logits and (for lm_rows) LM log-probability sums, whole and of the reply end, of some candidates, on a
    copy of the context cache."""
    n, length = len(conts), max(len(c) for c in conts)
    ids = torch.tensor([c + [layout.pad] * (length - len(c)) for c in conts], device=device)
    real = torch.tensor([[1] * len(c) + [0] * (length - len(c)) for c in conts], device=device)
    types = torch.where(real.bool(), layout.bot_type, layout.pad)
    mask = torch.cat([torch.ones(n, n_ctx, dtype=real.dtype, device=device), real], dim=1)
    positions = torch.arange(n_ctx, n_ctx + length, device=device).expand(n, -1)
    cache = copy.deepcopy(context_cache)
    cache.reorder_cache(torch.zeros(n, dtype=torch.long, device=device))  # the context, once per candidate
    hidden, _ = model.hidden_states(ids, types, mask, positions, cache)
    mc_logits = model.mc_logits_at(hidden, real.sum(dim=1) - 1)
    logp = torch.full((n,), float("nan"), device=device)
    end_logp = logp.clone()
    rows = torch.tensor(lm_rows, dtype=torch.long, device=device)
    if len(rows):
        per_token = first_logp[ids[rows, :1]]  # a candidate's first token is predicted by the context's last position
        if length > 1:
            rest = F.log_softmax(model.lm_logits(hidden[rows, :-1]), dim=-1).gather(-1, ids[rows, 1:, None])
            per_token = torch.cat([per_token, rest.squeeze(-1) * real[rows, 1:]], dim=1)
        logp[rows] = per_token.sum(dim=1)
        steps = torch.arange(length, device=device)
        n_real = real[rows].sum(dim=1, keepdim=True)
        end_logp[rows] = (per_token * (steps >= n_real - len(layout.reply_end)) * (steps < n_real)).sum(dim=1)
    return mc_logits, logp, end_logp


def prior_logprobs(model, candidates, layout):
    """LM log-probability sums of the candidates (and their reply end) after an empty context: no persona, no turns.

    What PMI ranking subtracts from their sums after the real context: a reply likely anywhere ("i don't know")
    then scores no higher than its context makes it.
    """
    return score_candidates(model, layout.context([], []), candidates, layout)[1]


def standardized(scores):
    """Scores over one example's candidates with mean 0 and standard deviation 1, so that rankers of different
    scales (logits, log-probabilities, cosines) add with equal weight. A score that is not finite (a BERT ranker's
    -inf for a blank candidate, a NaN) becomes -inf, last; equal scores become 0."""
    finite = torch.isfinite(scores)
    values = scores[finite].double()
    spread = values.std() if len(values) > 1 else values.new_zeros(())
    out = torch.full(scores.shape, -float("inf"), dtype=torch.float64, device=scores.device)
    out[finite] = (values - values.mean()) / spread if spread > 0 else 0.0
    return out


def rank_of_gold(scores, gold):
    """1 + how many other candidates score at least as high as the gold one (ties count against the gold)."""
    return int((scores >= scores[gold]).sum())


HITS_AT = (1, 5, 10)


def rank_metrics(ranks, hits_at=HITS_AT):
    """hits@k and MRR of gold ranks (1 is best)."""
    n = max(len(ranks), 1)
    return {**{f"hits@{k}": sum(r <= k for r in ranks) / n for k in hits_at}, "mrr": sum(1 / r for r in ranks) / n}
