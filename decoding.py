"""Decoding replies, shared by chat and evaluation: top-k / nucleus filtering, sampling, greedy and beam search.

Many contexts decode at once (left-padded, one batch), and the sequence so far lives in the model's KV cache:
each new token costs one position, where the original re-ran the whole sequence for every token.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DecodingConfig:
    """The original interact.py's defaults, plus beam search, n-gram blocking and OpenAI's repetition penalties."""
    max_length: int = 20
    min_length: int = 1
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    no_sample: bool = False
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    frequency_penalty: float = 0.0  # taken off a token's logit once per time the reply already holds it
    presence_penalty: float = 0.0  # taken off once if the reply holds it at all

    @classmethod
    def from_args(cls, args, no_sample):
        """The config of the decoding flags interact.py and convai_evaluation.py share."""
        return cls(max_length=args.max_length, min_length=args.min_length, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, no_sample=no_sample, num_beams=args.num_beams,
                   no_repeat_ngram_size=args.no_repeat_ngram_size, frequency_penalty=args.frequency_penalty,
                   presence_penalty=args.presence_penalty)


def add_penalty_args(parser):
    """OpenAI's --frequency_penalty and --presence_penalty (interact.py, serve.py and convai_evaluation.py)."""
    parser.add_argument("--frequency_penalty", type=float, default=0.0,
                        help="Lower a token's logit by this for each time the reply already holds it, as OpenAI's "
                             "API does; -2 to 2 (default: 0, off)")
    parser.add_argument("--presence_penalty", type=float, default=0.0,
                        help="Lower a token's logit by this once the reply holds it, as OpenAI's API does; -2 to 2 "
                             "(default: 0, off)")


def add_decoding_args(parser):
    """The decoding flags of interact.py and serve.py (the original interact.py's, plus beams, n-gram blocking and
    OpenAI's penalties)."""
    parser.add_argument("--no_sample", action="store_true", help="Greedy decoding instead of sampling")
    parser.add_argument("--max_length", type=int, default=20, help="Most tokens in a reply (default: 20)")
    parser.add_argument("--min_length", type=int, default=1,
                        help="Fewest tokens in a reply: no special token before (default: 1)")
    parser.add_argument("--temperature", type=float, default=0.7, help="Sampling softmax temperature (default: 0.7)")
    parser.add_argument("--top_k", type=int, default=0, help="Sample among the k likeliest tokens; 0: off (default: 0)")
    parser.add_argument("--top_p", type=float, default=0.9, help="Nucleus sampling mass; 0: off (default: 0.9)")
    parser.add_argument("--num_beams", type=int, default=1, help="Beam search with this many beams (default: 1, off)")
    parser.add_argument("--no_repeat_ngram_size", type=int, default=0,
                        help="Never repeat an n-gram of this size within a reply (default: 0, off)")
    add_penalty_args(parser)


MIN_TEMPERATURE = 1e-5  # below it, logits / T overflow: sampling that cold is greedy decoding (as vLLM takes it)


def check_decoding_args(parser, args):
    """parser.error for a decoding flag out of its range (interact.py, serve.py and convai_evaluation.py)."""
    problems = [(args.max_length < 1, f"--max_length {args.max_length}: at least 1"),
                (args.min_length > args.max_length,
                 f"--min_length {args.min_length}: more than --max_length {args.max_length}"),
                (args.temperature < MIN_TEMPERATURE, f"--temperature: at least {MIN_TEMPERATURE} (" + (
                    "use --no_sample for greedy decoding)" if hasattr(args, "no_sample") else
                    "replies are greedy unless --sample or --rerank)")),
                (not 0 <= args.top_p <= 1, f"--top_p {args.top_p}: a probability mass between 0 and 1 (0: off)"),
                (args.top_k < 0, f"--top_k {args.top_k}: at least 0 (0: off)"),
                (args.num_beams < 1, f"--num_beams {args.num_beams}: at least 1"),
                (args.no_repeat_ngram_size < 0, f"--no_repeat_ngram_size {args.no_repeat_ngram_size}: at least 0"),
                *((not -2 <= getattr(args, name) <= 2, f"--{name} {getattr(args, name)}: between -2 and 2")
                  for name in ("frequency_penalty", "presence_penalty"))]
    for wrong, message in problems:
        if wrong:
            parser.error(message)


def reply_text(tokenizer, tokens):
    """A reply's text. One cut at max_length inside a character (byte-level tokens can hold part of one) ends
    without the U+FFFD that part decodes to."""
    return tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")


def top_filtering(logits, top_k=0, top_p=0.0, filter_value=-float("inf")):
    """Keep, per row, the top_k highest logits and/or the fewest most likely tokens whose probability reaches top_p."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits[logits < kth] = filter_value
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        logits.scatter_(-1, order, sorted_logits.masked_fill(remove, filter_value))
    return logits


def left_pad(contexts, pad_id, device):
    """Stack (input_ids, token_type_ids) pairs left-padded, with the attention mask and position ids that implies."""
    length = max(len(ids) for ids, _ in contexts)
    ids = torch.tensor([[pad_id] * (length - len(i)) + list(i) for i, _ in contexts], device=device)
    types = torch.tensor([[pad_id] * (length - len(t)) + list(t) for _, t in contexts], device=device)
    mask = torch.tensor([[0] * (length - len(i)) + [1] * len(i) for i, _ in contexts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, types, mask, positions


def banned_by_ngrams(tokens, n):
    """Tokens that would repeat an n-gram already in `tokens`."""
    if n <= 0 or len(tokens) < n - 1:
        return set()
    prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix}


def _adjust(logits, replies, t, stop_ids, configs):
    """Repetition penalties, min_length (no ending token before it) and n-gram blocking of each row's config, in
    place. The penalties count the reply's own tokens, not the context's, as OpenAI's and vLLM's do."""
    for row, (reply, config) in enumerate(zip(replies, configs)):
        if reply and (config.frequency_penalty or config.presence_penalty):
            tokens, counts = torch.tensor(reply, device=logits.device).unique(return_counts=True)
            logits[row, tokens] -= counts.to(logits.dtype) * config.frequency_penalty + config.presence_penalty
        if t < config.min_length:
            logits[row, stop_ids] = -float("inf")
        banned = banned_by_ngrams(reply, config.no_repeat_ngram_size)
        if banned:
            logits[row, list(banned)] = -float("inf")
    return logits


def _pick(logits, configs, generators):
    """Next token of each row: greedy, or sampled after temperature and top-k / nucleus filtering.

    Rows that share a config and a generator are picked together, sampled ones in one draw, as the original did
    (--rerank_greedy's greedy row apart from its samples; a server's rows, each with its own seed, one by one).
    """
    groups = {}
    for row, (config, generator) in enumerate(zip(configs, generators)):
        groups.setdefault((config, id(generator)), []).append(row)
    if len(groups) > 1:
        tokens = torch.empty(len(configs), dtype=torch.long, device=logits.device)
        for rows in groups.values():
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = _pick(logits[index], [configs[rows[0]]] * len(rows), [generators[rows[0]]] * len(rows))
        return tokens
    config = configs[0]
    if config.no_sample:
        return logits.argmax(dim=-1)
    probs = F.softmax(top_filtering(logits / config.temperature, config.top_k, config.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generators[0]).squeeze(1)


def _logprobs_of(logprobs, top, row, token, k):
    """(the token's log-probability, [(token, log-probability)] of the row's k likeliest), or None if k < 0.
    `top`: the batch's topk, sorted, as wide as the widest k."""
    if k < 0:
        return None
    return float(logprobs[row, token]), list(zip(top.indices[row, :k].tolist(), top.values[row, :k].tolist()))


@torch.no_grad()
def generate(model, contexts, layout, config, generator=None, on_token=None, stop_row=None, logprobs=None):
    """Replies (token-id lists, end token excluded) to contexts [(input_ids, token_type_ids), ...] of `layout`.

    `config` and `generator` are one for all contexts or a list with one per context (a server batches requests
    with their own settings and seeds). A reply ends at any of the layout's stop tokens (<eos> or the template's
    end of turn, and the other special tokens) once its min_length tokens are out, or at its max_length tokens.
    `on_token(row, token)` is called with each reply token as it is picked (beam search: once the beam is chosen).
    `stop_row(row)`, when true, ends that row's reply where it is (a server's request whose client has left).
    `logprobs`, one int k per context, asks for a third argument to on_token: (the token's log-probability, the k
    likeliest tokens as [(token, log-probability)]) by the model's own distribution, before temperature, filtering
    and penalties (as vLLM reports them), or None where k is -1 and for beam search's rows.
    """
    if not contexts:
        return []
    configs = list(config) if isinstance(config, (list, tuple)) else [config] * len(contexts)
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(contexts)
    beamed = [row for row, c in enumerate(configs) if c.num_beams > 1]
    if beamed:  # beams in one batch; other rows (a server's sampled requests) by the loop below
        replies = dict(zip(beamed, beam_search(model, [contexts[r] for r in beamed], layout,
                                               [configs[r] for r in beamed])))
        for row in beamed if on_token else ():
            for token in replies[row]:
                on_token(row, token, *([None] if logprobs is not None else []))
        rest = [row for row in range(len(contexts)) if row not in replies]
        replies.update(zip(rest, generate(model, [contexts[r] for r in rest], layout, [configs[r] for r in rest],
                                          [generators[r] for r in rest],
                                          on_token and (lambda row, *token: on_token(rest[row], *token)),
                                          stop_row and (lambda row: stop_row(rest[row])),
                                          logprobs and [logprobs[r] for r in rest])))
        return [replies[row] for row in range(len(contexts))]
    device = next(model.parameters()).device
    ids, types, mask, positions = left_pad(contexts, layout.pad, device)
    stop_ids = list(layout.stop_ids)
    padded = not bool(mask.all())  # without padding the model needs no mask: it skips building one per step
    logits, past = model.step(ids, types, mask if padded else None, positions)
    replies = [[] for _ in contexts]
    done = [False] * len(contexts)
    next_position = positions[:, -1:] + 1
    speaker = torch.full((len(contexts), 1), layout.bot_type, device=device)
    wanted = logprobs is not None and max(logprobs) >= 0
    for t in range(max(c.max_length for c in configs)):
        # before _adjust changes the logits; -inf (a token the model rules out) as -9999, vLLM's stand-in, which JSON
        # can carry
        raw = F.log_softmax(logits.float(), dim=-1).nan_to_num(-9999.0, neginf=-9999.0) if wanted else None
        top = raw.topk(min(max(logprobs), raw.shape[-1])) if wanted else None  # once for the batch
        logits = _adjust(logits, replies, t, stop_ids, configs)
        tokens = _pick(logits, configs, generators)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token in stop_ids or (stop_row and stop_row(row)):
                done[row] = True
                continue
            replies[row].append(token)
            done[row] = len(replies[row]) >= configs[row].max_length
            if on_token and logprobs is not None:
                on_token(row, token, _logprobs_of(raw, top, row, token, logprobs[row]) if wanted else None)
            elif on_token:
                on_token(row, token)
        if all(done):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1) if padded else None
        logits, past = model.step(tokens[:, None], speaker, mask, next_position, past)
        next_position = next_position + 1
    return replies


@torch.no_grad()
def beam_search(model, contexts, layout, configs):
    """Per context, the finished reply of highest mean token log-probability (its end token included) among its
    config's `num_beams` beams.

    All contexts decode in one batch of contexts x beams rows (the widest config's beam count; a context with
    fewer beams, or one that has finished, leaves its other rows dead at score -inf), each as it would alone, up to
    the order of exactly tied scores. Beams cut at max_length count as finished there.
    """
    device = next(model.parameters()).device
    stop_ids, dead = list(layout.stop_ids), -float("inf")
    n, width = len(contexts), max(c.num_beams for c in configs)
    ids, types, mask, positions = left_pad(contexts, layout.pad, device)
    logits, past = model.step(ids, types, mask, positions)
    rows = torch.arange(n, device=device).repeat_interleave(width)
    past.reorder_cache(rows)  # each context's beams start from its own cache
    logits, mask, position = logits[rows], mask[rows], positions[rows, -1:]  # position: of each row's last token
    row_configs = [c for c in configs for _ in range(width)]
    beams = [[] for _ in rows]
    scores = torch.tensor([0.0 if b == 0 else dead for _ in range(n) for b in range(width)], device=device)
    finished, done = [[] for _ in range(n)], [c.max_length < 1 for c in configs]  # no token allowed: the empty reply
    for t in range(max(c.max_length for c in configs)):
        logp = _adjust(F.log_softmax(logits, dim=-1), beams, t, stop_ids, row_configs)
        vocab = logp.shape[-1]
        top_scores, top_index = (scores[:, None] + logp).view(n, width * vocab).topk(2 * width, dim=-1)
        keep = []  # (row, token, score) for every row of the next step
        for i, (config, ranked) in enumerate(zip(configs, zip(top_scores.tolist(), top_index.tolist()))):
            kept = []
            for rank, (score, index) in enumerate(list(zip(*ranked))[:2 * config.num_beams] if not done[i] else []):
                row, token = i * width + index // vocab, index % vocab  # among its own 2k, not 2 x width
                if score == dead:
                    break
                if token in stop_ids:
                    if rank < config.num_beams:  # an ending counts only if it ranks among the beams (as HF's)
                        finished[i].append((score / (len(beams[row]) + 1), beams[row]))
                elif len(kept) < config.num_beams:
                    kept.append((row, token, score))
            if kept and len(finished[i]) < config.num_beams and t == config.max_length - 1:  # cut at max_length
                finished[i] += [(score / (len(beams[row]) + 1), beams[row] + [token]) for row, token, score in kept]
            if not kept or len(finished[i]) >= config.num_beams or t == config.max_length - 1:
                done[i], kept = True, []
            keep += kept + [(i * width, layout.pad, dead)] * (width - len(kept))
        if all(done):
            break
        index = torch.tensor([row for row, _, _ in keep], device=device)
        beams = [beams[row] + [token] for row, token, _ in keep]
        scores = torch.tensor([score for _, _, score in keep], device=device)
        past.reorder_cache(index)
        mask = torch.cat([mask, torch.ones(len(index), 1, dtype=mask.dtype, device=device)], dim=-1)
        position = position + 1  # a context's beams share its mask and positions: neither needs reordering
        tokens = torch.tensor([token for _, token, _ in keep], device=device)[:, None]
        logits, past = model.step(tokens, torch.full_like(tokens, layout.bot_type), mask, position, past)
    return [max(pairs, key=lambda pair: pair[0])[1] if pairs else [] for pairs in finished]  # none: the empty reply
