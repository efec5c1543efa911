"""Scoring candidate replies of one context: the context goes through the model once, the candidates on its KV cache.

ConvAI2's 20 candidates share their persona and history, so running 20 full sequences repeats the context
20 times; here it runs once and only the candidates' own tokens are computed, in one batch.
"""
import torch
import torch.nn.functional as F


@torch.no_grad()
def score_candidates(model, context, candidates, special):
    """(mc_logits, lm_logprob_sum, lm_token_count) per candidate, each a (candidates,) tensor.

    `context` is (input_ids, token_type_ids) ending with the reply's <speaker1>; each candidate is scored as
    `candidate + <eos>`: the LM sums the log-probabilities of those tokens, the MC head reads the <eos>.
    """
    device = next(model.parameters()).device
    ctx_ids, ctx_types = (torch.tensor([list(x)], device=device) for x in context)
    n_ctx = ctx_ids.shape[1]
    hidden, cache = model.hidden_states(ctx_ids, ctx_types, None, torch.arange(n_ctx, device=device)[None])
    first_logp = F.log_softmax(model.lm_logits(hidden[:, -1]), dim=-1)[0]

    conts = [list(c) + [special.eos] for c in candidates]
    n, length = len(conts), max(len(c) for c in conts)
    ids = torch.tensor([c + [special.pad] * (length - len(c)) for c in conts], device=device)
    real = torch.tensor([[1] * len(c) + [0] * (length - len(c)) for c in conts], device=device)
    types = torch.where(real.bool(), special.speaker1, special.pad)
    mask = torch.cat([torch.ones(n, n_ctx, dtype=real.dtype, device=device), real], dim=1)
    positions = torch.arange(n_ctx, n_ctx + length, device=device).expand(n, -1)
    cache.reorder_cache(torch.zeros(n, dtype=torch.long, device=device))  # the context's cache, once per candidate
    hidden, _ = model.hidden_states(ids, types, mask, positions, cache)

    lengths = real.sum(dim=1)
    logp = first_logp[ids[:, 0]]  # each candidate's first token is predicted by the context's last position
    if length > 1:
        rest = F.log_softmax(model.lm_logits(hidden[:, :-1]), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        logp = logp + (rest * real[:, 1:]).sum(dim=1)
    mc_logits = model.mc_logits_at(hidden, lengths - 1)
    return mc_logits, logp, lengths


def rank_of_gold(scores, gold):
    """1 + how many candidates score strictly above the gold one."""
    return 1 + int((scores > scores[gold]).sum())
