from itertools import chain

import pytest

from conftest import CHAT_TEMPLATE, make_chat_tokenizer, make_tokenizer
from layouts import (BOT_TYPE, IGNORE_INDEX, USER_TYPE, ChatTemplateLayout, InputFormatError, SpecialIds,
                     TranscriptLayout, TransferTransfoLayout, default_input_format)

SPECIAL = SpecialIds(bos=100, eos=101, speaker1=102, speaker2=103, pad=104)
LAYOUT = TransferTransfoLayout(SPECIAL)


def original_layout(persona, history, reply, special):
    """The original repo's build_input_from_segments, restated, for odd-length histories."""
    bos, eos, speaker1, speaker2 = special.bos, special.eos, special.speaker1, special.speaker2
    sequence = [[bos] + list(chain(*persona))] + history + [reply + [eos]]
    sequence = [sequence[0]] + [[speaker2 if (len(sequence) - i) % 2 else speaker1] + s
                                for i, s in enumerate(sequence[1:])]
    return list(chain(*sequence)), [speaker2 if i % 2 else speaker1 for i, s in enumerate(sequence) for _ in s]


def test_input_layout_matches_hand_made_example():
    persona, history, reply = [[1, 2], [3]], [[10, 11], [12], [13, 14]], [20, 21]
    inst = LAYOUT.build(persona, history, reply, lm_labels=True)
    assert inst["input_ids"] == [100, 1, 2, 3, 103, 10, 11, 102, 12, 103, 13, 14, 102, 20, 21, 101]
    assert inst["token_type_ids"] == [102] * 4 + [103] * 3 + [102] * 2 + [103] * 3 + [102] * 4
    assert inst["mc_token_ids"] == 15
    assert inst["lm_labels"] == [IGNORE_INDEX] * 13 + [20, 21, 101]


def test_distractor_has_no_lm_labels_and_no_eos_when_asked():
    inst = LAYOUT.build([[1]], [[10]], [20], lm_labels=False, with_end=False)
    assert inst["input_ids"] == [100, 1, 103, 10, 102, 20]
    assert set(inst["lm_labels"]) == {IGNORE_INDEX}


@pytest.mark.parametrize("n_turns", [1, 3, 5])
def test_layout_equals_the_original_repo_for_odd_histories(n_turns):
    history = [[10 + k, 11 + k] for k in range(n_turns)]
    inst = LAYOUT.build([[1, 2]], history, [20])
    ids, types = original_layout([[1, 2]], history, [20], SPECIAL)
    assert inst["input_ids"] == ids and inst["token_type_ids"] == types


def test_even_history_keeps_each_segment_type_equal_to_its_speaker_token():
    inst = LAYOUT.build([], [[10], [11]], [20])
    assert inst["input_ids"] == [100, 102, 10, 103, 11, 102, 20, 101]
    speakers = {SPECIAL.speaker1, SPECIAL.speaker2}
    current = SPECIAL.speaker1
    for token, token_type in zip(inst["input_ids"], inst["token_type_ids"]):
        current = token if token in speakers else current
        assert token_type == current


def test_fit_context_drops_oldest_history_first():
    persona, history, reply_len = LAYOUT.fit([[1, 2]], [[10] * 5, [11] * 5, [12] * 5], 3, max_len=20)
    assert persona == [[1, 2]] and history == [[11] * 5, [12] * 5] and reply_len == 3


def test_fit_context_then_drops_oldest_persona_lines():
    persona, history, _ = LAYOUT.fit([[1] * 4, [2] * 4], [[12] * 3], 2, max_len=13)
    assert persona == [[2] * 4] and history == [[12] * 3]


def test_fit_context_shortens_the_persona_before_the_users_message_then_cuts_the_reply_last():
    persona, history, reply_len = LAYOUT.fit([[1, 2]], [[5, 6, 7, 8, 9]], 2, max_len=12)
    assert persona == [[2]] and history == [[5, 6, 7, 8, 9]] and reply_len == 2
    persona, history, reply_len = LAYOUT.fit([[1]], [[5, 6, 7, 8, 9]], 2, max_len=10)
    assert persona == [[]] and history == [[6, 7, 8, 9]] and reply_len == 2
    persona, history, reply_len = LAYOUT.fit([], [[1]], 10, max_len=8)
    assert history == [[]] and reply_len == 4


@pytest.fixture(scope="module")
def chat():
    tokenizer = make_chat_tokenizer()
    return tokenizer, ChatTemplateLayout(tokenizer)


def ids(tokenizer, text):
    return tokenizer.convert_tokens_to_ids(text.split(" "))


def test_chat_layout_matches_a_hand_written_sequence(chat):
    tokenizer, layout = chat
    enc = lambda text: ids(tokenizer, text)  # noqa: E731
    persona, history, reply = [enc("i love cats"), enc("i am fine")], [enc("hi"), enc("hello"), enc("what do you like")], enc("music")
    inst = layout.build(persona, history, reply, lm_labels=True)
    nl = "\n"
    expected = (["<|im_start|>", "system", nl, "i", "love", "cats", nl, "i", "am", "fine", "<|im_end|>", nl,
                 "<|im_start|>", "user", nl, "hi", "<|im_end|>", nl,
                 "<|im_start|>", "assistant", nl, "hello", "<|im_end|>", nl,
                 "<|im_start|>", "user", nl, "what", "do", "you", "like", "<|im_end|>", nl,
                 "<|im_start|>", "assistant", nl, "music", "<|im_end|>"])
    assert tokenizer.convert_ids_to_tokens(inst["input_ids"]) == expected
    B, U = BOT_TYPE, USER_TYPE
    # the system message and the reply are the bot's; a turn's closing <|im_end|> is its speaker's
    assert inst["token_type_ids"] == [B] * 11 + [U] * 6 + [B] * 6 + [U] * 9 + [B] * 6
    reply_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert inst["lm_labels"] == [IGNORE_INDEX] * 36 + reply + [reply_end]  # the reply and its end of turn only
    assert inst["mc_token_ids"] == 37 and inst["input_ids"][37] == reply_end
    assert layout.overhead(len(persona), len(history)) == len(inst["input_ids"]) - sum(map(len, persona + history + [reply]))


@pytest.mark.parametrize("with_persona, n_turns", [(True, 1), (True, 2), (False, 1), (False, 3)])
def test_chat_layout_is_the_tokenizers_own_template(chat, with_persona, n_turns):
    tokenizer, layout = chat
    persona = ["i love cats", "i am fine"] if with_persona else []
    turns = ["hi", "hello how are you", "good thanks", "what do you like"][-n_turns:]
    reply = "music and books"
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    inst = layout.build([enc(p) for p in persona], [enc(t) for t in turns], enc(reply))
    roles = ["user" if (n_turns - j) % 2 else "assistant" for j in range(n_turns)]
    messages = ([{"role": "system", "content": "\n".join(persona)}] if persona else []) + [
        {"role": r, "content": t} for r, t in zip(roles, turns)] + [{"role": "assistant", "content": reply}]
    own = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert own == inst["input_ids"] + ids(tokenizer, "\n")  # the template's newline after the reply's end aside
    if not persona:  # the template's own default system prompt stays
        assert inst["input_ids"][:9] == ids(tokenizer, "<|im_start|> system \n you are my nice friend <|im_end|>")
    context, _ = layout.context([enc(p) for p in persona], [enc(t) for t in turns])
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert context == prompt  # decoding starts where the template's generation prompt ends


def test_chat_truncation_drops_oldest_turns_then_persona_and_keeps_the_reply_last(chat):
    tokenizer, layout = chat
    persona, history, reply = [[20] * 4, [21] * 4], [[30] * 5, [31] * 5, [32] * 5], [40] * 3
    full = len(layout.build(persona, history, reply)["input_ids"])
    p, h, n = layout.fit(persona, history, len(reply), full)
    assert (p, h, n) == (persona, history, 3)
    p, h, n = layout.fit(persona, history, len(reply), full - 1)
    assert p == persona and h == history[1:] and n == 3  # the oldest turn goes first
    p, h, n = layout.fit(persona, [[32] * 5], len(reply), layout.overhead(2, 1) + 8 + 5 + 3 - 1)
    assert p == [[21] * 4] and h == [[32] * 5] and n == 3  # then the oldest persona line
    budget = layout.overhead(1, 1) + 3
    p, h, n = layout.fit(persona, history, len(reply), budget)
    assert p == [[]] and h == [[]] and n == 3  # persona, then the user's message shortened; the reply kept
    inst = layout.build(p, h, reply[:n])
    assert len(inst["input_ids"]) == budget and inst["input_ids"][-4:-1] == reply


def test_chat_context_inputs_leave_room_for_the_reply(chat):
    _, layout = chat
    ids_, types = layout.context_inputs([[20] * 10], [[30] * 10, [31] * 10, [32] * 10], max_len=60, reply_budget=20)
    assert len(ids_) + 20 <= 60 and len(ids_) == len(types)
    assert ids_.count(32) == 10 and ids_.count(20) == 10 and 30 not in ids_ and 31 not in ids_  # the newest turn stays


def test_default_input_format_is_the_chat_template_where_one_can_lay_turns_out():
    assert default_input_format(make_chat_tokenizer()) == "chat_template"
    assert default_input_format(make_tokenizer()) == "transfertransfo"
    strict = make_chat_tokenizer()  # a template that refuses system messages, as Gemma's does
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                            "{% endif %}" + CHAT_TEMPLATE)
    assert default_input_format(strict) == "transfertransfo"
    with pytest.raises(InputFormatError, match="System role not supported.*--input_format transfertransfo"):
        ChatTemplateLayout(strict)
    with pytest.raises(InputFormatError, match="no chat template"):
        ChatTemplateLayout(make_tokenizer())
    glued = make_chat_tokenizer()  # "userhi" is one unknown word whole, "user" + "hi" apart: ids would differ
    glued.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + m['content'] + '<|im_end|>' }}"
                           "{% endfor %}")
    with pytest.raises(InputFormatError, match="tokenized apart"):
        ChatTemplateLayout(glued)
    assert default_input_format(glued) == "transfertransfo"


def test_chat_layout_adds_no_tokens_and_stops_at_the_end_of_turn(chat):
    tokenizer, layout = chat
    assert len(tokenizer) == len(make_chat_tokenizer())
    assert layout.reply_end == ids(tokenizer, "<|im_end|>")
    assert set(layout.reply_end) <= set(layout.stop_ids) and ids(tokenizer, "<|im_start|>")[0] in layout.stop_ids


def test_transcript_layout_matches_a_hand_written_sequence(chat):
    tokenizer, _ = chat
    layout = TranscriptLayout(tokenizer)
    enc = lambda text: ids(tokenizer, text)  # noqa: E731
    persona, history, reply = [enc("i love cats"), enc("i am fine")], [enc("hi"), enc("hello"), enc("what do you like")], enc("music")
    inst = layout.build(persona, history, reply, lm_labels=True)
    nl = "\n"
    expected = ["Persona:", "i", "love", "cats", nl, "Persona:", "i", "am", "fine", nl,  # this tokenizer drops spaces
                "A:", "hi", nl, "B:", "hello", nl, "A:", "what", "do", "you", "like", nl, "B:", "music", nl]
    assert tokenizer.convert_ids_to_tokens(inst["input_ids"]) == expected
    B, U = BOT_TYPE, USER_TYPE
    assert inst["token_type_ids"] == [B] * 10 + [U] * 3 + [B] * 3 + [U] * 6 + [B] * 3
    assert inst["lm_labels"] == [IGNORE_INDEX] * 23 + reply + enc(nl)  # the reply and its newline only
    assert inst["mc_token_ids"] == 24 and layout.reply_end == enc(nl)
    assert layout.overhead(len(persona), len(history)) == len(inst["input_ids"]) - sum(map(len, persona + history + [reply]))
    assert set(enc(nl)) <= set(layout.stop_ids) and not set(enc("i love cats")) & set(layout.stop_ids)
    assert len(tokenizer) == len(make_chat_tokenizer())  # no tokens added


def test_transcript_truncation_drops_oldest_turns_first(chat):
    tokenizer, _ = chat
    layout = TranscriptLayout(tokenizer)
    history = [ids(tokenizer, w) for w in ("hi", "hello", "what do you like")]
    ids_, _ = layout.context_inputs([ids(tokenizer, "i love cats")], history, max_len=16, reply_budget=3)
    assert tokenizer.convert_ids_to_tokens(ids_) == ["Persona:", "i", "love", "cats", "\n", "A:", "what", "do", "you",
                                                     "like", "\n", "B:"]
    assert len(ids_) + 3 + len(layout.reply_end) <= 16


def test_transcript_on_a_byte_level_tokenizer_is_the_plain_text_and_stops_at_any_newline():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["\u010a\u010a"] = len(vocab)  # "\n\n" as one token, as GPT-2-style vocabularies have
    byte_level = Tokenizer(models.BPE(vocab=vocab, merges=[("\u010a", "\u010a")]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level, eos_token="\u0120")
    layout = TranscriptLayout(tokenizer)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    inst = layout.build([enc("i like cats.")], [enc("hi!"), enc("hello"), enc("how are you?")], enc("good."))
    assert tokenizer.decode(inst["input_ids"]) == "Persona: i like cats.\nA: hi!\nB: hello\nA: how are you?\nB: good.\n"
    assert {enc("\n")[0], vocab["\u010a\u010a"]} <= set(layout.stop_ids)
