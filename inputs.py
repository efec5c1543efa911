"""Model inputs of a split: each example's candidates laid out (layouts.py), padded, and batched by length.

One example is one utterance with `num_candidates` replies (distractors first, gold last), each laid out by the
run's layout; LM labels cover the gold reply only, and the multiple-choice label is the gold's index.
"""
import numpy as np
import torch

from layouts import IGNORE_INDEX
from utils import mixed_seed, spread_indices


class DoubleHeadDataset(torch.utils.data.Dataset):
    """Examples of one split for the double-head model: each item is `num_candidates` laid-out candidates."""

    def __init__(self, tokenized, split, layout, num_candidates=2, max_history=2, max_len=1024,
                 personality_permutations=1, max_examples=None, max_reply_len=0):
        self.tokenized, self.split, self.layout = tokenized, split, layout
        self.max_history, self.max_len, self.max_reply_len = max_history, max_len, max_reply_len
        self.personality_permutations = max(1, personality_permutations)
        self.utterances = spread_indices(tokenized.num_utterances(split), max_examples or 0)  # a subset samples all dialogs
        self.n_utts = len(self.utterances)
        cand_counts = np.diff(tokenized.arrays[f"{split}.cand_offsets"])[self.utterances]
        available = int(cand_counts.min()) if self.n_utts else 1
        self.num_candidates = max(1, min(num_candidates, available) if num_candidates > 0 else available)

    def __len__(self):
        return self.n_utts * self.personality_permutations

    def context_ids(self, index):
        """Text-table ids of an item's persona (rotated for its permutation), kept history and candidates."""
        u, permutation = index % self.n_utts, index // self.n_utts
        persona, history, candidates = self.tokenized.utterance_ids(self.split, int(self.utterances[u]))
        if permutation and len(persona):
            persona = np.roll(persona, permutation % len(persona))
        return persona, history[-(2 * self.max_history + 1):], candidates[-self.num_candidates:]

    def context(self, index):
        """(persona, history, candidates) of an item as token-id arrays."""
        return tuple(self.tokenized.texts(ids) for ids in self.context_ids(index))

    def __getitem__(self, index):
        persona, history, candidates = self.context(index)
        longest = max(self.reply_len(len(c)) for c in candidates)
        persona, history, reply_len = self.layout.fit(persona, history, longest, self.max_len)
        # a reply cut by max_reply_len ends where it was cut: no end-of-turn token to learn mid-sentence
        instances = [self.layout.build(persona, history, c[:reply_len], lm_labels=(j == len(candidates) - 1),
                                       with_end=self.reply_len(len(c)) == len(c))
                     for j, c in enumerate(candidates)]
        return {"instances": instances, "mc_labels": len(candidates) - 1}

    def reply_len(self, n):
        """Tokens a candidate of n tokens keeps: all of them, or max_reply_len (ParlAI's label_truncate)."""
        return min(n, self.max_reply_len) if self.max_reply_len else n

    def lengths(self):
        """Longest candidate's input length per item, without building the inputs (for length grouping)."""
        text_lengths = self.tokenized.text_lengths()
        out = np.empty(len(self), dtype=np.int64)
        for index in range(len(self)):
            persona, history, candidates = self.context_ids(index)
            texts = int(text_lengths[persona].sum()) + int(text_lengths[history].sum())
            out[index] = min(self.layout.overhead(len(persona), len(history)) + texts
                             + self.reply_len(int(text_lengths[candidates].max())), self.max_len)
        return out


def collate(items, pad_id, pad_to=None, shared_context=True):
    """Stack items into (batch, candidates, length) tensors padded to the batch's longest (or pad_to) sequence.

    Items are one context's candidates each; `context_lens` holds each context's length (laid out by layouts.py),
    which lets the model run each context once; `shared_context=False` leaves it out (full sequences).
    """
    length = max(len(inst["input_ids"]) for item in items for inst in item["instances"])
    length = max(length, pad_to or 0)
    pads = {"input_ids": pad_id, "token_type_ids": pad_id, "lm_labels": IGNORE_INDEX}
    batch = {}
    for name, pad in pads.items():
        batch[name] = torch.tensor([[inst[name] + [pad] * (length - len(inst[name])) for inst in item["instances"]]
                                    for item in items], dtype=torch.long)
    batch["attention_mask"] = torch.tensor(
        [[[1] * len(inst["input_ids"]) + [0] * (length - len(inst["input_ids"])) for inst in item["instances"]]
         for item in items], dtype=torch.long)
    batch["mc_token_ids"] = torch.tensor([[inst["mc_token_ids"] for inst in item["instances"]] for item in items],
                                         dtype=torch.long)
    batch["mc_labels"] = torch.tensor([item["mc_labels"] for item in items], dtype=torch.long)
    starts = [{inst.get("reply_start") for inst in item["instances"]} for item in items]
    if shared_context and all(len(s) == 1 and None not in s for s in starts):  # the model may run each context once
        batch["context_lens"] = torch.tensor([s.pop() for s in starts], dtype=torch.long)
    return batch


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of items of similar length, so that padding each batch to its own longest wastes little.

    Shuffled items are cut into groups of `group_batches` batches, each group sorted by length and cut into
    batches, and the batches shuffled (HF's LengthGroupedSampler idea). Deterministic per (seed, epoch).
    Distributed: batches are dealt round-robin; for training (`even=True`) the list is wrapped so every rank
    gets the same number of batches, as DDP needs.
    """

    def __init__(self, lengths, batch_size, seed=0, shuffle=True, num_replicas=1, rank=0, even=True,
                 group_batches=50, multiple_of=1, seed_of=mixed_seed):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.shuffle, self.seed_of = batch_size, seed, shuffle, seed_of
        self.num_replicas, self.rank, self.even = num_replicas, rank, even
        self.group_batches, self.multiple_of = group_batches, multiple_of
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        """Order of `epoch`; the next pass starts after its first `skip` batches (a resumed epoch)."""
        self.epoch, self.skip = epoch, skip

    def _all_batches(self):
        n = len(self.lengths)
        rng = np.random.default_rng(self.seed_of(self.seed, self.epoch))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        group = self.batch_size * self.group_batches if self.shuffle else max(n, 1)
        batches = []
        for start in range(0, n, group):
            chunk = order[start:start + group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.even and batches:  # repeat batches from the start until every rank has as many
            missing = -len(batches) % self.num_replicas
            batches += [batches[k % len(batches)] for k in range(missing)]
        return batches

    def __iter__(self):
        return iter(self._all_batches()[self.rank::self.num_replicas][self.skip:len(self)])

    def __len__(self):
        """Batches of this rank per epoch: a multiple of `multiple_of` (whole accumulation windows), the rest dropped."""
        n_batches = -(-len(self.lengths) // self.batch_size)
        mine = -(-n_batches // self.num_replicas) if self.even else len(range(self.rank, n_batches, self.num_replicas))
        return mine // self.multiple_of * self.multiple_of
