import math
from dataclasses import replace

import pytest
import torch

from conftest import make_byte_level_tokenizer
from decoding import DecodingConfig, _adjust, banned_by_ngrams, generate, reply_text, top_filtering
from layouts import SpecialIds, TransferTransfoLayout
from modeling import load_tokenizer_and_model

NEG = -float("inf")


def test_top_k_keeps_the_k_highest_logits_per_row():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    assert top_filtering(logits, top_k=2).tolist() == [[NEG, NEG, 3.0, 4.0], [4.0, 3.0, NEG, NEG]]


def test_top_p_keeps_the_fewest_tokens_reaching_p():
    logits = torch.log(torch.tensor([[0.05, 0.1, 0.25, 0.6]]))
    kept = lambda p: [math.isfinite(x) for x in top_filtering(logits, top_p=p)[0].tolist()]  # noqa: E731
    assert kept(0.5) == [False, False, False, True]
    assert kept(0.7) == [False, False, True, True]  # 0.6 < 0.7: the token crossing p is kept
    assert kept(0.9) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]


def test_filtered_distribution_renormalises_over_kept_tokens():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    probs = torch.softmax(top_filtering(logits, top_k=2), dim=-1)[0]
    assert probs.tolist() == pytest.approx([0.0, 0.0, 3 / 7, 4 / 7])


def test_ngram_blocking():
    assert banned_by_ngrams([1, 2, 3, 1, 2], 3) == {3}
    assert banned_by_ngrams([1, 2, 3], 2) == set()
    assert banned_by_ngrams([5, 5], 1) == {5}


def test_penalties_count_the_reply_own_tokens_as_openai_defines_them():
    config = DecodingConfig(frequency_penalty=0.5, presence_penalty=1.0)
    logits = _adjust(torch.zeros(2, 8), [[3, 3, 5], []], 3, [1], [config, config])
    assert logits[0].tolist() == [0, 0, 0, -2.0, 0, -1.5, 0, 0]  # 2 x 0.5 + 1 and 1 x 0.5 + 1
    assert logits[1].tolist() == [0] * 8  # nothing said yet: nothing to penalise (the context is not counted)
    negative = _adjust(torch.zeros(1, 8), [[3, 3]], 3, [1], [DecodingConfig(frequency_penalty=-1.0)])
    assert negative[0, 3] == 2.0  # a negative penalty favours repeating


SPECIAL = SpecialIds(bos=0, eos=1, speaker1=2, speaker2=3, pad=4)
LAYOUT = TransferTransfoLayout(SPECIAL)


class EndEagerModel(torch.nn.Module):
    """Always prefers <eos>, then token 7: shows what min_length and max_length do."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def step(self, input_ids, token_type_ids, attention_mask, position_ids, cache=None):
        logits = torch.full((input_ids.shape[0], 10), -5.0)
        logits[:, SPECIAL.eos] = 5.0
        logits[:, 7] = 4.0
        return logits, cache


@pytest.mark.parametrize("min_length", [0, 1, 3])
def test_min_length_holds_then_the_reply_ends(min_length):
    config = DecodingConfig(no_sample=True, min_length=min_length, max_length=8)
    assert generate(EndEagerModel(), [([0, 2], [2, 2])], LAYOUT, config) == [[7] * min_length]


def test_a_presence_penalty_changes_greedy_replies_as_its_logits_say():
    """Logits 4, 3 and 2.6 for tokens 7, 8 and 9: greedy repeats 7; penalties let 8 and 9 in, each as it counts."""
    class Repeater(EndEagerModel):
        def step(self, *args, **kwargs):
            logits, cache = super().step(*args, **kwargs)
            logits[:, SPECIAL.eos], logits[:, 8], logits[:, 9] = -5.0, 3.0, 2.6
            return logits, cache

    reply = lambda **penalty: generate(Repeater(), [([0, 2], [2, 2])], LAYOUT,  # noqa: E731
                                       DecodingConfig(no_sample=True, max_length=5, **penalty))[0]
    assert reply() == [7, 7, 7, 7, 7]
    assert reply(presence_penalty=1.5) == [7, 8, 9, 7, 7]  # then 2.5 against 1.5 and 1.1, however often 7 came
    assert reply(frequency_penalty=1.5) == [7, 8, 9, 7, 8]  # the second 7 costs 3: 1.0 against 1.5 and 1.1
    assert reply(frequency_penalty=0.6) == [7, 7, 8, 7, 9]  # 3.4 > 3; 2.8 < 3; 2.8 > 2.6; 2.2 < 2.6


def test_stop_row_ends_that_row_where_it_is_and_the_others_go_on():
    config = DecodingConfig(no_sample=True, min_length=8, max_length=8)  # without the stop: eight 7s each
    stopped_at = {0: 3}  # row 0's client leaves after its third token
    seen = {0: 0, 1: 0}

    def on_token(row, token):
        seen[row] += 1

    replies = generate(EndEagerModel(), [([0, 2], [2, 2])] * 2, LAYOUT, config, on_token=on_token,
                       stop_row=lambda row: seen[row] >= stopped_at.get(row, 99))
    assert replies == [[7] * 3, [7] * 8] and seen == {0: 3, 1: 8}


def test_max_length_bounds_the_reply():
    config = DecodingConfig(no_sample=True, min_length=50, max_length=6)
    assert generate(EndEagerModel(), [([0, 2], [2, 2])], LAYOUT, config) == [[7] * 6]


@pytest.fixture(scope="module")
def chat_model(chatty_dir):
    torch.manual_seed(0)
    tokenizer, model, layout = load_tokenizer_and_model(chatty_dir)
    torch.nn.init.normal_(model.speaker_embeddings)
    contexts = [layout.context_inputs([[3, 4]], [[5, 6, 7]], 256, 20),
                layout.context_inputs([[3]], [[5, 6, 7, 8, 9, 10], [11], [12, 13]], 256, 20)]
    return model.eval(), layout, contexts


def no_cache_greedy(model, context, layout, length):
    """The original's loop: the whole sequence again for every new token."""
    ids, types, reply = list(context[0]), list(context[1]), []
    for _ in range(length):
        n = len(ids)
        logits, _ = model.step(torch.tensor([ids]), torch.tensor([types]), torch.ones(1, n, dtype=torch.long),
                               torch.arange(n)[None])
        logits[:, list(layout.stop_ids)] = NEG
        token = int(logits.argmax())
        reply.append(token)
        ids.append(token)
        types.append(layout.bot_type)
    return reply


def test_greedy_with_kv_cache_equals_the_no_cache_loop_in_a_batch(chat_model):
    model, layout, contexts = chat_model
    config = DecodingConfig(no_sample=True, min_length=12, max_length=12)
    with torch.no_grad():
        expected = [no_cache_greedy(model, c, layout, 12) for c in contexts]
    assert generate(model, contexts, layout, config) == expected
    assert len(set(expected[0])) > 1  # a model that says something


def test_same_seed_same_reply(chat_model):
    model, layout, contexts = chat_model
    config = DecodingConfig(temperature=1.5, top_p=0.95, max_length=15)
    replies = [generate(model, contexts, layout, config, generator=torch.Generator().manual_seed(s))
               for s in (3, 3, 4, 5)]
    assert replies[0] == replies[1]
    assert replies[0] != replies[2] or replies[0] != replies[3]


def test_each_context_keeps_its_own_settings_and_seed_in_a_batch(chat_model):
    """A server batches requests with their own temperature, length and seed: each row decodes as it would alone."""
    model, layout, contexts = chat_model
    greedy = DecodingConfig(no_sample=True, min_length=5, max_length=5)
    sampled = DecodingConfig(temperature=1.5, top_p=0.95, min_length=9, max_length=9)
    alone = [generate(model, [contexts[0]], layout, greedy)[0],
             generate(model, [contexts[1]], layout, sampled, generator=torch.Generator().manual_seed(7))[0]]
    seen = []
    batched = generate(model, contexts, layout, [greedy, sampled], [None, torch.Generator().manual_seed(7)],
                       on_token=lambda row, token: seen.append((row, token)))
    assert batched == alone and [len(r) for r in batched] == [5, 9]
    assert [t for r, t in seen if r == 0] == batched[0] and [t for r, t in seen if r == 1] == batched[1]
    assert [r for r, _ in seen][:4] == [0, 1, 0, 1]  # tokens come out step by step, not reply by reply


def test_a_greedy_row_beside_samples_of_one_generator_leaves_their_one_draw_as_it_was(chat_model):
    """--rerank_greedy: rows [greedy, sampled, sampled] sharing a generator; the sampled rows are drawn together, as
    they would be without the greedy row, and the greedy row is greedy decoding's."""
    model, layout, contexts = chat_model
    sampled = DecodingConfig(temperature=1.5, top_p=0.95, min_length=8, max_length=8)
    greedy = replace(sampled, no_sample=True)
    mixed = generate(model, [contexts[0]] * 3, layout, [greedy, sampled, sampled], torch.Generator().manual_seed(5))
    assert mixed[0] == generate(model, [contexts[0]], layout, greedy)[0]
    assert mixed[1:] == generate(model, [contexts[0]] * 2, layout, sampled, torch.Generator().manual_seed(5))
    assert mixed[1] != mixed[2]  # two draws, not one twice


def test_logprobs_are_the_model_own_distribution_at_each_reply_token(chat_model):
    """on_token's logprobs: the picked token's and the k likeliest, by the logits before temperature and top-p."""
    model, layout, contexts = chat_model
    config = DecodingConfig(temperature=0.5, top_p=0.8, min_length=6, max_length=6)
    seen = {0: [], 1: []}
    replies = generate(model, contexts, layout, config, generator=torch.Generator().manual_seed(1),
                       on_token=lambda row, token, logprobs: seen[row].append((token, logprobs)), logprobs=[3, -1])
    assert [t for t, _ in seen[0]] == replies[0] and all(logprobs is None for _, logprobs in seen[1])
    ids, types = (list(x) for x in contexts[0])
    with torch.no_grad():
        hidden, _ = model.hidden_states(torch.tensor([ids + replies[0]]),
                                        torch.tensor([types + [layout.bot_type] * 6]), None,
                                        torch.arange(len(ids) + 6)[None])
        expected = torch.log_softmax(model.lm_logits(hidden[0, len(ids) - 1:-1]), dim=-1)  # what predicts each
    for step, (token, (logprob, top)) in enumerate(seen[0]):
        assert logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
        assert [t for t, _ in top] == expected[step].topk(3).indices.tolist()
        assert [p for _, p in top] == pytest.approx(expected[step].topk(3).values.tolist(), abs=1e-4)
    assert generate(model, contexts, layout, config, generator=torch.Generator().manual_seed(1)) == replies


def test_a_token_the_model_rules_out_has_logprob_minus_9999_not_minus_infinity():
    class RulesOut(EndEagerModel):
        def step(self, *args, **kwargs):
            logits, cache = super().step(*args, **kwargs)
            logits[:, 9] = NEG
            return logits, cache

    seen = []
    generate(RulesOut(), [([0, 2], [2, 2])], LAYOUT, DecodingConfig(no_sample=True, max_length=1, min_length=1),
             on_token=lambda row, token, logprobs: seen.append(logprobs), logprobs=[10])
    ((logprob, top),) = seen
    assert dict(top)[9] == -9999.0 and all(math.isfinite(p) for _, p in top)  # JSON carries it, as vLLM's
    assert logprob == pytest.approx(math.log(math.exp(4) / (math.exp(5) + math.exp(4) + 7 * math.exp(-5))))


def test_beam_search_gives_a_reply_per_context_without_special_tokens(chat_model):
    model, layout, contexts = chat_model
    config = DecodingConfig(num_beams=3, max_length=10, no_repeat_ngram_size=2)
    replies = generate(model, contexts, layout, config)
    assert len(replies) == 2
    for reply in replies:
        assert 0 < len(reply) <= 10 and not set(reply) & set(layout.stop_ids)
        assert all(banned_by_ngrams(reply[:i], 2).isdisjoint({reply[i]}) for i in range(len(reply)))



def test_beam_search_in_a_batch_equals_each_context_alone(chat_model):
    """Contexts of different lengths (left padding), beam counts and lengths, and a sampled row, in one call."""
    model, layout, contexts = chat_model
    wide = DecodingConfig(num_beams=3, max_length=9, no_repeat_ngram_size=2)
    narrow = DecodingConfig(num_beams=2, max_length=6)
    sampled = DecodingConfig(temperature=1.5, max_length=7, min_length=7)
    rows = [(contexts[1], wide, None), (contexts[0], narrow, None), (contexts[0], sampled, 5),
            (contexts[1], narrow, None)]
    seeded = lambda seed: seed and torch.Generator().manual_seed(seed)  # noqa: E731
    alone = [generate(model, [c], layout, config, seeded(seed))[0] for c, config, seed in rows]
    seen = []
    batched = generate(model, [c for c, _, _ in rows], layout, [config for _, config, _ in rows],
                       [seeded(seed) for _, _, seed in rows], on_token=lambda row, token: seen.append((row, token)))
    assert batched == alone and len(batched[2]) == 7
    assert batched[0] != generate(model, [contexts[1]], layout, DecodingConfig(no_sample=True, max_length=9))[0]
    assert all([t for r, t in seen if r == row] == reply for row, reply in enumerate(batched))

class NoCache:
    def reorder_cache(self, index):
        pass


class ScriptedModel(torch.nn.Module):
    """Wants to say 7 8 9 then <eos>; at the first step <eos> and <speaker2> are plausible too. Records positions."""

    NEXT = {2: 7, 7: 8, 8: 9, 9: SPECIAL.eos}

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.positions = []

    def step(self, input_ids, token_type_ids, attention_mask, position_ids, cache=None):
        self.positions.append(position_ids[:, -1].tolist())
        logits = torch.full((input_ids.shape[0], 10), -10.0)
        for row, last in enumerate(input_ids[:, -1].tolist()):
            logits[row, self.NEXT.get(last, SPECIAL.eos)] = 3.0
            if last == 2:
                logits[row, SPECIAL.eos] = logits[row, SPECIAL.speaker2] = 2.5
        return logits, cache or NoCache()


@pytest.mark.parametrize("num_beams", [1, 2, 3])
def test_beam_search_finishes_the_reply_the_model_wants_at_the_right_positions(num_beams):
    model = ScriptedModel()
    context = ([0, 5, 6, 2], [2, 2, 2, 2])
    reply = generate(model, [context], LAYOUT, DecodingConfig(no_sample=True, num_beams=num_beams, max_length=8))
    assert reply == [[7, 8, 9]]
    assert model.positions[0] == [3] and model.positions[1] == [4] * len(model.positions[1])  # no gap after context


class CrowdedEndModel(torch.nn.Module):
    """After context token 5: 7, then three ending tokens, then 8 (which ends at once, very likely). A 2-beam search
    keeps 7 alone: 8 ranks fifth, past its 2 x 2 candidates, however many beams a context beside it has."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def step(self, input_ids, token_type_ids, attention_mask, position_ids, cache=None):
        logits = torch.full((input_ids.shape[0], 12), -20.0)
        for row, last in enumerate(input_ids[:, -1].tolist()):
            if last in (5, 6):
                for token, value in zip([7, SPECIAL.eos, SPECIAL.speaker1, SPECIAL.speaker2, 8], [5, 4.9, 4.8, 4.7, 4]):
                    logits[row, token] = value
            elif last == 7:
                logits[row, [9, 10, SPECIAL.eos, 11]] = torch.tensor([0.3, 0.2, 0.1, 0.0])
            else:
                logits[row, SPECIAL.eos] = 10.0 if last == 8 else 0.05
        return logits, cache or NoCache()


def test_a_narrow_beam_search_beside_a_wide_one_keeps_its_own_candidates():
    narrow = DecodingConfig(no_sample=True, num_beams=2, max_length=5, min_length=0)
    wide = DecodingConfig(no_sample=True, num_beams=4, max_length=5, min_length=0)
    alone = generate(CrowdedEndModel(), [([0, 5], [2, 2])], LAYOUT, narrow)
    beside = generate(CrowdedEndModel(), [([0, 5], [2, 2]), ([0, 6], [2, 2])], LAYOUT, [narrow, wide])
    assert alone == [[7, 9]] and beside == [[7, 9], [8]]


def test_a_zero_length_beam_search_says_nothing_beside_a_longer_one():
    context = ([0, 5, 6, 2], [2, 2, 2, 2])
    replies = generate(ScriptedModel(), [context] * 2, LAYOUT, [DecodingConfig(num_beams=2, max_length=0),
                                                                DecodingConfig(num_beams=2, max_length=8)])
    assert replies == [[], [7, 8, 9]]

def test_no_context_no_reply():
    assert generate(ScriptedModel(), [], LAYOUT, DecodingConfig()) == []


class ChatScriptedModel(torch.nn.Module):
    """Says `words` then the template's end of turn, after which it would go on to a new user turn."""

    def __init__(self, tokenizer, words):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.script = tokenizer.convert_tokens_to_ids(words + ["<|im_end|>", "\n", "<|im_start|>", "user"])
        self.vocab, self.start = len(tokenizer), None

    def step(self, input_ids, token_type_ids, attention_mask, position_ids, cache=None):
        self.start = position_ids[0, -1].item() if cache is None else self.start  # the context's last position
        logits = torch.full((input_ids.shape[0], self.vocab), -10.0)
        for row, position in enumerate(position_ids[:, -1].tolist()):
            logits[row, self.script[min(position - self.start, len(self.script) - 1)]] = 3.0
        return logits, cache or NoCache()


@pytest.mark.parametrize("num_beams", [1, 2])
def test_chat_template_replies_stop_at_the_end_of_turn(num_beams):
    from conftest import make_chat_tokenizer
    from layouts import ChatTemplateLayout

    tokenizer = make_chat_tokenizer()
    layout = ChatTemplateLayout(tokenizer)
    context = layout.context_inputs([], [tokenizer("hi", add_special_tokens=False)["input_ids"]], 64, 10)
    assert tokenizer.convert_ids_to_tokens(context[0][-3:]) == ["<|im_start|>", "assistant", "\n"]
    model = ChatScriptedModel(tokenizer, ["i", "love", "cats"])
    reply = generate(model, [context], layout, DecodingConfig(no_sample=True, num_beams=num_beams, max_length=10))[0]
    assert tokenizer.convert_ids_to_tokens(reply) == ["i", "love", "cats"]


@pytest.mark.parametrize("num_beams", [1, 2])
def test_transcript_replies_stop_at_the_end_of_the_line(num_beams):
    from conftest import make_chat_tokenizer
    from layouts import TranscriptLayout

    tokenizer = make_chat_tokenizer()
    layout = TranscriptLayout(tokenizer)
    context = layout.context_inputs([], [tokenizer("hi", add_special_tokens=False)["input_ids"]], 64, 10)
    assert tokenizer.convert_ids_to_tokens(context[0]) == ["A:", "hi", "\n", "B:"]
    model = ChatScriptedModel(tokenizer, ["i", "love", "cats"])
    model.script = tokenizer.convert_tokens_to_ids(["i", "love", "cats", "\n", "A:", "hi"])  # then the user's line
    reply = generate(model, [context], layout, DecodingConfig(no_sample=True, num_beams=num_beams, max_length=10))[0]
    assert tokenizer.convert_ids_to_tokens(reply) == ["i", "love", "cats"]


def test_a_reply_cut_inside_a_character_ends_before_it():
    tokenizer = make_byte_level_tokenizer()
    tokens = tokenizer("hi \U0001F469", add_special_tokens=False)["input_ids"]
    assert len(tokens) == 7 and tokenizer.decode(tokens[:-1]).endswith("\ufffd")  # 3 ASCII bytes, 4 of the emoji
    assert [reply_text(tokenizer, tokens[:n]) for n in (7, 6, 4, 3)] == ["hi \U0001F469", "hi ", "hi ", "hi "]


def test_every_decoding_flag_of_interact_reaches_the_config():
    import interact
    args = interact.get_args(["--max_length", "7", "--min_length", "2", "--temperature", "0.5", "--top_k", "3",
                              "--top_p", "0.8", "--num_beams", "2", "--no_repeat_ngram_size", "3",
                              "--frequency_penalty", "0.25", "--presence_penalty", "-0.5"])
    assert DecodingConfig.from_args(args, no_sample=True) == DecodingConfig(
        max_length=7, min_length=2, temperature=0.5, top_k=3, top_p=0.8, no_sample=True, num_beams=2,
        no_repeat_ngram_size=3, frequency_penalty=0.25, presence_penalty=-0.5)
