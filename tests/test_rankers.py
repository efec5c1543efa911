import pytest
import torch

from conftest import make_personachat
from decoding import DecodingConfig
from inputs import collate
from modeling import load_tokenizer_and_model
from rankers import Rankers, joined, rerank_configs
from ranking import score_candidates
from reply_ranker import biencoder_scores, context_text
from tokenized import tokenize_dialogs


@pytest.fixture(scope="module")
def chat(tiny_dirs):
    torch.manual_seed(0)
    tokenizer, model, layout = load_tokenizer_and_model(tiny_dirs["llama_chat"])
    torch.nn.init.normal_(model.mc_head.weight)  # a trained-looking head, sharp preferences
    torch.nn.init.normal_(model.speaker_embeddings)
    return tokenizer, model.eval(), layout


def test_mc_picks_the_reply_whose_full_sequence_the_head_scores_highest(chat):
    tokenizer, model, layout = chat
    data = tokenize_dialogs(make_personachat(n_cands=6), tokenizer)
    rankers, picked = Rankers(model, layout), set()
    for k in range(4):
        persona, history, replies = data.utterance("train", k)
        context = layout.context_inputs(persona, history, 256, 20)
        persona, history, _ = layout.fit(persona, history, 20, 256)
        full_mc = model(**{key: v for key, v in collate([{"instances": [
            layout.build(persona, history, r) for r in replies], "mc_labels": 0}], layout.pad).items()
            if key in ("input_ids", "token_type_ids", "attention_mask", "mc_token_ids")})[2][0]
        texts = [""] * len(replies)  # the head reads token ids only
        best = rankers.best("mc", [], [], context, replies, texts)
        assert best == int(full_mc.argmax())
        assert rankers.best("mc", [], [], context, replies[::-1], texts) == len(replies) - 1 - best  # order-free
        picked.add(best)
    assert len(picked) > 1  # not one position every time


def test_each_part_is_its_rankers_score_and_a_join_picks_by_their_standardized_sum(chat, tiny_bert_dir):
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model, layout = chat
    encoder = AutoModel.from_pretrained(tiny_bert_dir), AutoTokenizer.from_pretrained(tiny_bert_dir)
    rankers = Rankers(model, layout, bert=None, biencoder=encoder, max_history=1)
    persona = ["i like cats .", "i read books ."]
    history = ["good day", "day to you", "hello", "hi there", "how are you ?"]
    candidates = ["i am fine .", "cats are great", "no", "i read a lot of books", "what ?"]
    encode = lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731
    context = layout.context_inputs(encode(persona), encode(history), 256, 20)
    cand_ids = encode(candidates)
    by_part = rankers.part_scores(["mc", "lm", "pmi", "biencoder"], persona, history, context, cand_ids, candidates)
    mc, logp, lengths, _ = score_candidates(model, context, cand_ids, layout)
    prior = score_candidates(model, layout.context([], []), cand_ids, layout)[1]  # after no persona and no turns
    assert torch.allclose(by_part["mc"], mc, atol=1e-5)
    assert torch.allclose(by_part["lm"], logp / lengths, atol=1e-5)
    assert torch.allclose(by_part["pmi"], logp - prior, atol=1e-4)
    # the bi-encoder reads the persona and the last max_history exchanges: here the last turn and its two before
    kept = "\n".join(persona + history[-3:])
    assert context_text(persona, history, 1) == kept
    assert torch.allclose(by_part["biencoder"], biencoder_scores(*encoder, kept, candidates, "cpu"), atol=1e-5)
    assert not torch.allclose(by_part["biencoder"], biencoder_scores(*encoder, "\n".join(persona + history),
                                                                     candidates, "cpu"), atol=1e-5)
    for name in ("mc+pmi", "lm+biencoder", "mc+pmi+biencoder"):
        parts = name.split("+")
        total = sum((by_part[p] - by_part[p].mean()) / by_part[p].std() for p in parts)
        assert rankers.best(name, persona, history, context, cand_ids, candidates) == int(total.argmax())
    own = (torch.arange(5.0), logp, lengths, None)  # scores the caller has already: not computed again
    assert rankers.part_scores(["mc"], persona, history, context, cand_ids, candidates, own)["mc"].tolist() == [
        0, 1, 2, 3, 4]


def test_a_join_can_pick_what_no_part_tops():
    by_part = {"mc": torch.tensor([10.0, 0.0, 9.0]), "pmi": torch.tensor([0.0, 10.0, 9.0])}
    assert int(joined("mc", by_part).argmax()) == 0 and int(joined("pmi", by_part).argmax()) == 1
    assert int(joined("mc+pmi", by_part).argmax()) == 2  # second by both
    by_part["biencoder"] = torch.tensor([1.0, 1.0, 1.0])  # no preference: adds nothing
    assert torch.equal(joined("mc+pmi+biencoder", by_part), joined("mc+pmi", by_part))


def test_rerank_greedy_decodes_the_first_row_greedily_and_samples_the_others():
    sampling = DecodingConfig(temperature=0.9, top_p=0.8, max_length=7)
    rows = rerank_configs(sampling, 4, True)
    assert len(rows) == 4 and rows[0].no_sample and rows[1:] == [sampling] * 3
    assert rows[0] == DecodingConfig(temperature=0.9, top_p=0.8, max_length=7, no_sample=True)  # nothing else changed
    assert rerank_configs(sampling, 4, False) == [sampling] * 4
    for rerank_greedy in (False, True):  # no rerank (or a greedy request to a server): one row, as asked
        assert rerank_configs(sampling, 0, rerank_greedy) == rerank_configs(sampling, 1, rerank_greedy) == [sampling]
