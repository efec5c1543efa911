import math

import pytest
import torch

from conftest import make_personachat
from inputs import collate
from layouts import IGNORE_INDEX
from modeling import load_tokenizer_and_model
from ranking import rank_of_gold, score_candidates, standardized
from tokenized import tokenize_dialogs


@pytest.mark.parametrize("name, chunk_size", [("llama", 5), ("llama", 2), ("gpt2", 3), ("llama_chat", 3)])
def test_shared_context_scores_equal_full_sequence_scores(tiny_dirs, name, chunk_size):
    torch.manual_seed(0)
    tokenizer, model, layout = load_tokenizer_and_model(tiny_dirs[name])
    model.eval()
    if name != "gpt2":
        torch.nn.init.normal_(model.speaker_embeddings)
    data = tokenize_dialogs(make_personachat(n_cands=5), tokenizer)
    persona, history, candidates = data.utterance("train", 4)
    longest = max(len(c) for c in candidates) + 1
    mc, logp, lengths, end_logp = score_candidates(model, layout.context_inputs(persona, history, 256, longest),
                                                   candidates, layout, chunk_size=chunk_size)
    persona, history, _ = layout.fit(persona, history, longest, 256)
    full_mc = model(**{k: v for k, v in collate([{"instances": [
        layout.build(persona, history, c) for c in candidates], "mc_labels": 0}],
        layout.pad).items() if k in ("input_ids", "token_type_ids", "attention_mask", "mc_token_ids")})[2][0]
    assert torch.allclose(mc, full_mc, atol=1e-4)
    for j, c in enumerate(candidates):
        batch = collate([{"instances": [layout.build(persona, history, c, lm_labels=True)],
                          "mc_labels": 0}], layout.pad)
        nll_sum, count, _ = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], None,
                                  batch["lm_labels"])
        assert -logp[j].item() == pytest.approx(nll_sum.item(), rel=1e-4)
        assert lengths[j].item() == count.item() == len(c) + len(layout.reply_end)
        end_labels = batch["lm_labels"].clone()
        end_labels[..., :-len(layout.reply_end)] = IGNORE_INDEX  # the reply end's tokens are the sequence's last
        end_nll, _, _ = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], None, end_labels)
        assert -end_logp[j].item() == pytest.approx(end_nll.item(), rel=1e-4)
        assert 0 < -end_logp[j].item() < -logp[j].item()


def test_lm_sums_only_where_asked(tiny_dirs):
    tokenizer, model, layout = load_tokenizer_and_model(tiny_dirs["llama"])
    data = tokenize_dialogs(make_personachat(n_cands=5), tokenizer)
    persona, history, candidates = data.utterance("train", 0)
    _, logp, _, end_logp = score_candidates(model.eval(), layout.context_inputs(persona, history, 256, 20), candidates,
                                            layout, lm_rows=[4])
    assert torch.isnan(logp[:4]).all() and torch.isfinite(logp[4])
    assert torch.isnan(end_logp[:4]).all() and torch.isfinite(end_logp[4])


def test_rank_of_gold_counts_better_and_tied_candidates():
    assert rank_of_gold(torch.tensor([0.1, 0.9, 0.5]), 2) == 2
    assert rank_of_gold(torch.tensor([0.1, 0.2, 0.5]), 2) == 1
    assert rank_of_gold(torch.tensor([0.7, 0.9, 0.5]), 2) == 3
    assert rank_of_gold(torch.tensor([0.5, 0.1, 0.5]), 2) == 2  # a tie does not favour the gold


def test_standardized_scores_keep_blank_candidates_last():
    assert standardized(torch.tensor([1.0, 2.0, 3.0])).tolist() == [-1.0, 0.0, 1.0]
    assert standardized(torch.tensor([5.0, -math.inf, 7.0])).tolist() == pytest.approx(
        [-math.sqrt(0.5), -math.inf, math.sqrt(0.5)])
    assert standardized(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]  # no spread: no say in the sum
