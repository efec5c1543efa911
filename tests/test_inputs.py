from itertools import chain

import numpy as np
import pytest
import torch

from conftest import make_personachat, make_tokenizer
from inputs import DoubleHeadDataset, LengthGroupedBatchSampler, collate
from layouts import IGNORE_INDEX, SpecialIds, TransferTransfoLayout
from tokenized import tokenize_dialogs

SPECIAL = SpecialIds(bos=100, eos=101, speaker1=102, speaker2=103, pad=104)
LAYOUT = TransferTransfoLayout(SPECIAL)


def test_collate_pads_each_batch_to_its_longest_sequence():
    short = {"instances": [LAYOUT.build([], [[10]], [20], lm_labels=j == 1) for j in range(2)],
             "mc_labels": 1}
    long = {"instances": [LAYOUT.build([[1, 2, 3]], [[10, 11]], [20, 21], lm_labels=j == 1)
                          for j in range(2)], "mc_labels": 1}
    batch = collate([short, long], pad_id=SPECIAL.pad)
    assert batch["input_ids"].shape == (2, 2, 11)
    assert batch["input_ids"][0, 0, 6:].tolist() == [SPECIAL.pad] * 5
    assert batch["token_type_ids"][0, 0, 6:].tolist() == [SPECIAL.pad] * 5
    assert batch["attention_mask"][0, 0].tolist() == [1] * 6 + [0] * 5
    assert batch["lm_labels"][0, 1].tolist() == [IGNORE_INDEX] * 4 + [20, SPECIAL.eos] + [IGNORE_INDEX] * 5
    assert batch["mc_token_ids"].tolist() == [[5, 5], [10, 10]]
    assert batch["mc_labels"].tolist() == [1, 1]


def test_length_grouped_batches_cover_every_item_once_and_group_lengths():
    lengths = np.random.default_rng(0).integers(5, 500, size=1000)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 125
    assert sorted(chain(*batches)) == list(range(1000))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_batches = np.random.default_rng(2).permutation(1000).reshape(-1, 8)
    padded_random = sum(8 * lengths[b].max() for b in random_batches)
    assert padded < 0.7 * padded_random


def test_length_grouped_order_depends_on_seed_and_epoch_only():
    lengths = np.arange(100)
    a, b = LengthGroupedBatchSampler(lengths, 4, seed=3), LengthGroupedBatchSampler(lengths, 4, seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(LengthGroupedBatchSampler(lengths, 4, seed=4)) not in (list(a), list(b))  # seed 3's epochs 0 and 1


@pytest.mark.parametrize("n_items, batch_size, replicas", [(3, 4, 4), (9, 2, 4), (1, 1, 3)])
def test_every_rank_gets_the_batches_len_promises_even_with_few_items(n_items, batch_size, replicas):
    for rank in range(replicas):
        sampler = LengthGroupedBatchSampler(np.arange(n_items), batch_size, num_replicas=replicas, rank=rank)
        assert len(list(sampler)) == len(sampler) >= 1


def test_epochs_hold_whole_accumulation_windows_and_a_resumed_epoch_skips_done_batches():
    sampler = LengthGroupedBatchSampler(np.arange(50), 4, seed=0, multiple_of=3)  # 13 batches -> 12
    assert len(sampler) == 12 and len(list(sampler)) == 12
    full = list(sampler)
    sampler.set_epoch(0, skip=5)
    assert list(sampler) == full[5:]


def test_distributed_shards_are_disjoint_and_equal_for_training():
    lengths = np.arange(90)
    shards = [list(LengthGroupedBatchSampler(lengths, 4, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(LengthGroupedBatchSampler(lengths, 4, num_replicas=2))
    assert set(chain(*shards[0], *shards[1])) == set(range(90))
    valid = [list(LengthGroupedBatchSampler(lengths, 4, shuffle=False, num_replicas=2, rank=r, even=False))
             for r in range(2)]
    assert sorted(chain(*valid[0], *valid[1])) == list(range(90))  # validation: every example exactly once


@pytest.fixture(scope="module")
def tokenized_and_layout():
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                                  "additional_special_tokens": ["<speaker1>", "<speaker2>"]})
    return tokenize_dialogs(make_personachat(), tokenizer), TransferTransfoLayout(tokenizer)


def test_dataset_items_hold_candidates_with_gold_last_and_labels_on_gold_only(tokenized_and_layout):
    data, layout = tokenized_and_layout
    ds = DoubleHeadDataset(data, "train", layout, num_candidates=2, max_history=1)
    item = ds[1]
    assert item["mc_labels"] == 1 and len(item["instances"]) == 2
    assert set(item["instances"][0]["lm_labels"]) == {IGNORE_INDEX}
    _, _, candidates = data.utterance("train", 1)
    gold = item["instances"][1]
    labelled = [t for t in gold["lm_labels"] if t != IGNORE_INDEX]
    assert labelled == list(candidates[-1]) + layout.reply_end
    assert ds.lengths()[1] == max(len(i["input_ids"]) for i in item["instances"])


def test_dataset_caps_candidates_at_what_the_data_has_and_rotates_persona(tokenized_and_layout):
    data, layout = tokenized_and_layout
    ds = DoubleHeadDataset(data, "train", layout, num_candidates=10, personality_permutations=2)
    assert ds.num_candidates == 3 and len(ds) == 2 * data.num_utterances("train")
    persona, _, _ = ds.context(0)
    rotated, _, _ = ds.context(ds.n_utts)
    assert [list(p) for p in rotated] == [list(p) for p in persona[-1:] + persona[:-1]]


def test_max_examples_are_spread_over_the_split_not_its_first_dialogs(tokenized_and_layout):
    data, layout = tokenized_and_layout  # 8 training dialogs of 3 utterances
    ds = DoubleHeadDataset(data, "train", layout, num_candidates=2, max_examples=4)
    assert len(ds) == 4 and ds.utterances.tolist() == [0, 6, 12, 18]
    assert [list(t) for t in ds.context(1)[1]] == [list(t) for t in data.utterance("train", 6)[1][-5:]]
    assert len({data.arrays["train.utt_dialog"][u] for u in ds.utterances}) == 4


def test_dataset_respects_max_len(tokenized_and_layout):
    data, layout = tokenized_and_layout
    ds = DoubleHeadDataset(data, "train", layout, num_candidates=2, max_history=5, max_len=12)
    assert all(len(inst["input_ids"]) <= 12 for i in range(len(ds)) for inst in ds[i]["instances"])
    assert ds.lengths().max() <= 12
    assert torch.is_tensor(collate([ds[0], ds[1]], layout.pad)["input_ids"])


def test_max_reply_len_cuts_long_candidates_without_an_end_and_keeps_short_ones_whole(tokenized_and_layout):
    data, layout = tokenized_and_layout
    whole = DoubleHeadDataset(data, "train", layout, num_candidates=3, max_history=1)
    cap = 3
    cut = DoubleHeadDataset(data, "train", layout, num_candidates=3, max_history=1, max_reply_len=cap)
    _, _, candidates = data.utterance("train", 1)  # replies of 2, 3 and 6 tokens, the gold one cut
    assert any(len(c) > cap for c in candidates) and any(len(c) <= cap for c in candidates)
    for inst_whole, inst_cut, candidate in zip(whole[1]["instances"], cut[1]["instances"], candidates):
        start = inst_cut["reply_start"]
        assert inst_cut["input_ids"][:start] == inst_whole["input_ids"][:start]  # same context
        if len(candidate) <= cap:
            assert inst_cut["input_ids"] == inst_whole["input_ids"]
        else:
            assert inst_cut["input_ids"][start:] == list(candidate[:cap])  # cut, and no <eos> after it
            assert inst_cut["mc_token_ids"] == start + cap - 1
    assert len(candidates[-1]) > cap
    gold = cut[1]["instances"][-1]
    assert [t for t in gold["lm_labels"] if t != IGNORE_INDEX] == list(candidates[-1][:cap])
    assert cut.lengths()[1] == max(len(i["input_ids"]) for i in cut[1]["instances"])  # the whole 3-token one
    assert whole.lengths()[1] == cut.lengths()[1] + len(candidates[-1]) - cap
