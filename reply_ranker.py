"""The reply ranker: a BERT classifier whose head scores (context, candidate) pairs, trained with the
multiple-choice loss (which of these replies is the real one), and the untrained bi-encoder baseline.

Two ways to read a pair (`pair_encoding` of the classifier):
- cross: one sequence `[CLS] context [SEP] candidate [SEP]`; every token sees both texts.
- siamese: context and candidate are encoded apart and the head reads [u, v, |u-v|, u*v] (Sentence-BERT). The head
  can start as the bi-encoder (`start_from_cosine`), so training begins from the encoder's zero-shot ranking, and
  a batch's other gold replies are free extra distractors.
"""
import contextlib

import torch
import torch.nn.functional as F

from classifier import mean_pool, model_inputs
from utils import spread_indices

RANKER_CLASSES = ["distractor", "reply"]  # binary: a candidate's score is the logit gap of "reply" over "distractor"


def context_text(persona, history, max_history=2):
    """One text of a dialog context: persona lines, then the kept turns, one per line."""
    return "\n".join(list(persona) + list(history[-(2 * max_history + 1):]))


def ranker_examples(dialogs, negatives=1, max_history=2, max_examples=0):
    """(context, [gold, distractor, ...]) per utterance, in order; `negatives` < 0 keeps every distractor.

    `max_examples` takes that many utterances spread evenly over the dialogs (all where 0).
    """
    utterances = [(dialog["personality"], utterance) for dialog in dialogs for utterance in dialog["utterances"]]
    examples = []
    for i in spread_indices(len(utterances), max_examples):
        persona, utterance = utterances[i]
        candidates = utterance["candidates"]
        distractors = candidates[:-1] if negatives < 0 else candidates[:-1][:negatives]
        examples.append((context_text(persona, utterance["history"], max_history), [candidates[-1]] + list(distractors)))
    return examples


def start_from_cosine(model, scale=20.0):
    """Set a siamese head so that the reply-over-distractor logit gap is scale * cosine(context, candidate)."""
    hidden = model.encoder.config.hidden_size
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[1, 3 * hidden:] = scale / 2  # the u*v block: its sum is the cosine of unit vectors
        model.head.weight[0, 3 * hidden:] = -scale / 2


@contextlib.contextmanager
def truncating_from(tokenizer, side):
    """The tokenizer cuts too-long texts from `side` ("left": their start) within the block; a shared tokenizer
    goes back to its own side after."""
    before = tokenizer.truncation_side
    tokenizer.truncation_side = side
    try:
        yield
    finally:
        tokenizer.truncation_side = before


def collate_examples(tokenizer, examples, pair_encoding, max_length=256, add_special_tokens=True):
    """A padded batch of ranking examples, each one context and its candidates (gold first).

    Examples with fewer candidates get blank ones that `example_scores` scores -inf. Contexts lose their oldest
    tokens first when too long, so the turn being answered is kept."""
    per = max(len(candidates) for _, candidates in examples)
    real = torch.tensor([[i < len(cands) for i in range(per)] for _, cands in examples])
    candidates = [(cands[i] if i < len(cands) else "") or " " for _, cands in examples for i in range(per)]
    golds = [cands[0] for _, cands in examples]
    batch = {"per_example": per, "real": real,
             "same_gold": torch.tensor([[a == b for b in golds] for a in golds])}
    kwargs = dict(padding=True, truncation=True, max_length=max_length, add_special_tokens=add_special_tokens,
                  return_tensors="pt")
    with truncating_from(tokenizer, "left"):  # the context's end is the turn being answered
        if pair_encoding == "siamese":
            batch["contexts"] = tokenizer([context for context, _ in examples], **kwargs)
        else:  # the longer text (nearly always the context) is shortened, from its start
            batch["pairs"] = tokenizer([context for context, _ in examples for _ in range(per)], candidates, **kwargs)
    if pair_encoding == "siamese":
        batch["candidates"] = tokenizer(candidates, **kwargs)
    return batch


def example_scores(model, batch, device, in_batch=False):
    """Scores (examples, candidates) of a collated batch, -inf for blank candidates; with in_batch (siamese),
    every other example's gold reply is scored too and appended as further columns (replies with the example's own
    gold text masked out)."""
    per, gap = batch["per_example"], lambda logits: logits[..., 1] - logits[..., 0]
    if "pairs" in batch:
        scores = gap(model(**model_inputs(batch["pairs"], device))).view(-1, per)
        return scores.masked_fill(~batch["real"].to(scores.device), float("-inf"))
    u = model.pool(**model_inputs(batch["contexts"], device))
    v = model.pool(**model_inputs(batch["candidates"], device)).view(len(u), per, -1)
    scores, blank = gap(model.pair_logits(u.unsqueeze(1).expand_as(v), v)), ~batch["real"]
    if in_batch and len(u) > 1:
        golds = v[:, 0].unsqueeze(0).expand(len(u), -1, -1)
        scores = torch.cat([scores, gap(model.pair_logits(u.unsqueeze(1).expand_as(golds), golds))], dim=1)
        blank = torch.cat([blank, batch["same_gold"]], dim=1)
    return scores.masked_fill(blank.to(scores.device), float("-inf"))


def multiple_choice_loss(scores):
    """Cross-entropy of picking the gold reply, which is the first column of every row."""
    return F.cross_entropy(scores.float(), torch.zeros(len(scores), dtype=torch.long, device=scores.device))


@torch.no_grad()
def score_pairs(model, tokenizer, options, context, candidates, device):
    """Ranker scores of candidates after one context text (higher is better)."""
    model.eval()
    batch = collate_examples(tokenizer, [(context, list(candidates))], options.get("pair_encoding", "cross"),
                             options.get("truncate", 256), options.get("add_cls_token", True))
    return example_scores(model, batch, device)[0].float()


@torch.no_grad()
def embed_texts(encoder, tokenizer, texts, device, max_length=256, keep_end=False):
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe for MiniLM). With `keep_end`,
    a text too long loses its start rather than its end (a context: its end is the turn being answered)."""
    with truncating_from(tokenizer, "left" if keep_end else "right"):
        batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                          max_length=min(max_length, encoder.config.max_position_embeddings))
    batch = {k: v.to(device) for k, v in batch.items()}
    return F.normalize(mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)


def biencoder_scores(encoder, tokenizer, context, candidates, device, max_length=256):
    """Cosine similarity of each candidate's embedding with the context's: the untrained bi-encoder baseline. A
    long context keeps its end, as the trained ranker's does (collate_examples)."""
    context_vector = embed_texts(encoder, tokenizer, [context], device, max_length, keep_end=True)[0]
    return embed_texts(encoder, tokenizer, [c or " " for c in candidates], device, max_length) @ context_vector

