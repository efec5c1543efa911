"""How one candidate reply and its context become tokens: TransferTransfo's speaker tokens, the model's chat
template, or a plain-text transcript.

Every layout lays a candidate out as `context + reply + end`: the context (persona, then history turns alternating
back from the reply, which is the bot's) ends where the reply's first token goes, and `end` closes the reply
(`<eos>`, the template's end-of-turn token, or a newline). LM labels cover the reply and `end` only; the multiple-choice
head reads the last token of `end`; every token's type names whose it is (the bot's or the user's; the persona
and the reply are the bot's), for the speaker embeddings.

- `transfertransfo`: `<bos> persona <speaker2> turn <speaker1> turn ... <speaker1> reply <eos>`, the original
  repo's layout (new tokens, added to the tokenizer); token types are the speaker tokens.
- `chat_template`: the tokenizer's own chat template, as the pretrained model saw its conversations: the persona
  (one line each) is the system message, turns are user/assistant messages and the reply is the last assistant
  message. No tokens are added; token types are BOT and USER, two ids outside any vocabulary.
- `transcript`: a plain-text transcript, as dialogs appear in the text a model is pretrained on: `Persona: ...`
  lines, then `A: turn` / `B: turn` lines alternating back from the reply, which is B's and ends with a newline.
  No tokens are added (but a pad); token types as in chat_template.
"""
from collections import namedtuple
from functools import cached_property
from itertools import chain

IGNORE_INDEX = -100
SPECIAL_TOKENS = ["<bos>", "<eos>", "<speaker1>", "<speaker2>", "<pad>"]  # transfertransfo's added tokens
ATTR_TO_SPECIAL_TOKEN = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                         "additional_special_tokens": ["<speaker1>", "<speaker2>"]}
SpecialIds = namedtuple("SpecialIds", "bos eos speaker1 speaker2 pad")
BOT_TYPE, USER_TYPE = -1, -2  # chat_template token types; negative, so never a token id (nor the padding)
INPUT_FORMATS = ("transfertransfo", "chat_template", "transcript")
_SENTINEL = "\ue000{}\ue001"  # stands for a message's content while the template is rendered (private-use chars)


class InputFormatError(ValueError):
    """An input format that this tokenizer or model cannot use; the message says which to use instead."""


def fit_context(persona, history, reply_len, max_len, overhead):
    """Cut persona/history so that a reply of reply_len tokens fits in max_len; returns (persona, history, reply_len).

    `overhead(n_persona, n_history)` counts the layout's own tokens. Oldest history turns go first, then the
    oldest persona lines; then the last persona line and, only after it, the last turn (the user's message) are
    shortened from their start; only when even that is not enough is the reply cut (from its end).
    """
    persona, history = list(persona), list(history)

    def total():
        return (overhead(len(persona), len(history)) + sum(len(p) for p in persona) + sum(len(h) for h in history)
                + reply_len)

    while total() > max_len and len(history) > 1:
        history.pop(0)
    while total() > max_len and len(persona) > 1:
        persona.pop(0)
    for segments in (persona, history):
        excess = total() - max_len
        if excess > 0 and segments:
            segments[-1] = segments[-1][min(excess, len(segments[-1])):]
    excess = total() - max_len
    if excess > 0:
        reply_len = max(reply_len - excess, 0)
    return persona, history, reply_len


class Layout:
    """What the layouts share; a subclass gives `context`, `overhead` and the ids below."""

    name = ""
    pad = 0  # fills input_ids and token_type_ids past a sequence's end
    bot_type = user_type = 0  # token types of the bot's and the user's tokens
    reply_end = ()  # tokens that close a reply
    stop_ids = ()  # decoding ends a reply at any of these
    one_line = False  # true where a newline in a turn's text would break the layout (transcript)

    def context(self, persona, history):
        """(input_ids, token_type_ids) of persona and history, ending where the reply's first token goes."""
        raise NotImplementedError

    def overhead(self, n_persona, n_history):
        """Tokens of the layout's own (besides persona, history and reply texts), reply_end included."""
        raise NotImplementedError

    def speaker_type(self, n_turns, j):
        """Type of history turn j of n: the turn just before the reply is the user's, and they alternate back."""
        return self.user_type if (n_turns - j) % 2 else self.bot_type

    def fit(self, persona, history, reply_len, max_len):
        return fit_context(persona, history, reply_len, max_len, self.overhead)

    def build(self, persona, history, reply, lm_labels=False, with_end=True):
        """One candidate's input_ids, token_type_ids, mc_token_ids and lm_labels (labels only when lm_labels).

        `reply_start` is the context's length: where the candidates of one context start to differ.
        """
        ids, types = self.context(persona, history)
        tail = list(reply) + (list(self.reply_end) if with_end else [])
        input_ids = ids + tail
        return {"input_ids": input_ids, "reply_start": len(ids),
                "token_type_ids": types + [self.bot_type] * len(tail),
                "mc_token_ids": len(input_ids) - 1,
                "lm_labels": [IGNORE_INDEX] * len(ids) + (tail if lm_labels else [IGNORE_INDEX] * len(tail))}

    @cached_property
    def shortest_prompt(self):
        """Tokens of the shortest prompt a cut can leave: an emptied turn, and no persona or an emptied line of one
        (with one, some layouts add more than they drop). Rendered once: the server asks it every request."""
        return max(len(self.context(persona, [[]])[0]) for persona in ([], [[]]))

    def max_reply(self, max_len):
        """The longest reply that fits in max_len after the shortest prompt."""
        return max_len - self.shortest_prompt

    def reply_overflow(self, length, max_len):
        """Why a reply of `length` tokens cannot be decoded in max_len (the positions past it fail), else ""."""
        room = self.max_reply(max_len)
        return "" if length <= room else (f"does not fit: this model reads {max_len} tokens, and the shortest prompt "
                                          f"takes {max_len - room} of them; at most {room}")

    def context_inputs(self, persona, history, max_len, reply_budget):
        """The context cut to leave reply_budget tokens of max_len, for decoding or scoring candidates."""
        persona, history, _ = self.fit(persona, history, reply_budget, max_len)
        return self.context(persona, history)


def special_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    if None in ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
        raise ValueError(f"the tokenizer lacks the special tokens {SPECIAL_TOKENS}: add them with modeling.prepare_tokenizer_")
    return SpecialIds(*ids)


class TransferTransfoLayout(Layout):
    """`<bos> persona... <speakerX> turn ... <speaker1> reply <eos>`: the original repo's layout.

    Equal to the original's for its odd-length histories; every token's type is its segment's speaker token.
    """

    name = "transfertransfo"

    def __init__(self, special):
        """`special`: SpecialIds, or a tokenizer holding the special tokens."""
        special = special if isinstance(special, SpecialIds) else special_ids(special)
        self.special = special
        self.pad, self.bot_type, self.user_type = special.pad, special.speaker1, special.speaker2
        self.reply_end, self.stop_ids = [special.eos], list(special)

    def context(self, persona, history):
        ids = [self.special.bos] + list(chain(*persona))
        types = [self.bot_type] * len(ids)
        for j, turn in enumerate(history):
            speaker = self.speaker_type(len(history), j)
            ids += [speaker] + list(turn)
            types += [speaker] * (1 + len(turn))
        return ids + [self.bot_type], types + [self.bot_type]

    def overhead(self, n_persona, n_history):
        return 1 + n_history + 1 + len(self.reply_end)  # <bos>, a speaker token per turn and the reply's, <eos>


class ChatTemplateLayout(Layout):
    """The tokenizer's chat template: persona as the system message, turns as user/assistant, the reply last.

    The template is rendered once per shape (persona or not, number of turns) with stand-ins for the contents;
    the text between them is tokenized and kept, and the contents' tokens (from the tokenized dataset) go in
    between. The reply's end is the template's text after the last assistant message up to its first special
    token (SmolLM2's `<|im_end|>`). Without a persona, the template's own default system prompt (if any) is kept.
    """

    name = "chat_template"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise InputFormatError(f"{type(tokenizer).__name__} has no chat template: use --input_format transfertransfo")
        self.tokenizer = tokenizer
        self.bot_type, self.user_type = BOT_TYPE, USER_TYPE
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.separator = self._encode("\n")  # between persona lines
        self._frames = {}
        self.reply_end = self._reply_end(self.frames(True, 1)[-1])
        self.stop_ids = sorted(set(tokenizer.all_special_ids) | {self.reply_end[-1]})
        for has_system in (True, False):  # fail now, not mid-training, on a template that cannot lay turns out
            for n_history in range(6):  # up to --max_history 2's five turns; longer histories render when met
                self.frames(has_system, n_history)
        self._check_against_the_template()

    def _check_against_the_template(self):
        """Refuse a tokenizer whose ids differ when the template's pieces and the contents are tokenized apart."""
        persona, turns, reply = ["hello", "hi"], ["hi", "hello", "hi"], "hello"
        roles = self.roles(True, len(turns))
        messages = [{"role": r, "content": c} for r, c in zip(roles, ["\n".join(persona)] + turns + [reply])]
        whole = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        ours = self.build([self._encode(p) for p in persona], [self._encode(t) for t in turns],
                          self._encode(reply))["input_ids"]
        if whole[:len(ours)] != ours:
            raise InputFormatError("this tokenizer gives other ids to the chat template's pieces tokenized apart "
                                   "than to the whole conversation: use --input_format transfertransfo")

    def _encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _reply_end(self, tail):
        """The template's tokens after the reply, up to and including its first special token."""
        special = set(self.tokenizer.all_special_ids)
        for i, token in enumerate(tail):
            if token in special:
                return tail[:i + 1]
        if self.tokenizer.eos_token_id is None:
            raise InputFormatError("the chat template closes an assistant message with no special token and the "
                                   "tokenizer has no eos token: use --input_format transfertransfo")
        return [self.tokenizer.eos_token_id]

    def roles(self, has_system, n_history):
        return (["system"] if has_system else []) + [
            "user" if (n_history - j) % 2 else "assistant" for j in range(n_history)] + ["assistant"]

    def frames(self, has_system, n_history):
        """Token ids of the template's text around the contents: one piece before each content and one after the last."""
        key = (has_system, n_history)
        if key not in self._frames:
            roles = self.roles(has_system, n_history)
            messages = [{"role": r, "content": _SENTINEL.format(i)} for i, r in enumerate(roles)]
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception as e:  # jinja's TemplateError or the template's own raise_exception
                raise InputFormatError(f"the chat template cannot lay out {' / '.join(roles)} messages ({e}): use "
                                       f"--input_format transfertransfo") from None
            pieces = []
            for i in range(len(roles)):
                before, sentinel, text = text.partition(_SENTINEL.format(i))
                if not sentinel or _SENTINEL.format(i) in text:
                    raise InputFormatError("the chat template does not keep each message's content once and as it "
                                           "is: use --input_format transfertransfo")
                pieces.append(before)
            self._frames[key] = [self._encode(p) for p in pieces + [text]]
        return self._frames[key]

    def context(self, persona, history):
        has_system = len(persona) > 0
        frames = self.frames(has_system, len(history))
        contents = ([self._join(persona)] if has_system else []) + [list(t) for t in history]
        types = ([self.bot_type] if has_system else []) + [self.speaker_type(len(history), j)
                                                            for j in range(len(history))] + [self.bot_type]
        ids, token_types = [], []
        previous = types[0]
        for k, (frame, speaker) in enumerate(zip(frames, types)):
            closing = len(self.reply_end) if k and frame[:len(self.reply_end)] == list(self.reply_end) else 0
            ids += frame
            token_types += [previous] * closing + [speaker] * (len(frame) - closing)  # the end of a turn is its speaker's
            if k < len(contents):
                ids += contents[k]
                token_types += [speaker] * len(contents[k])
            previous = speaker
        return ids, token_types

    def _join(self, persona):
        return list(chain(*[list(p) + (self.separator if i < len(persona) - 1 else [])
                            for i, p in enumerate(persona)]))

    def overhead(self, n_persona, n_history):
        frames = self.frames(n_persona > 0, n_history)
        return (sum(len(f) for f in frames[:-1]) + len(self.separator) * max(n_persona - 1, 0)
                + len(self.reply_end))


class TranscriptLayout(Layout):
    """`Persona: line` lines, then `A: turn` and `B: turn` lines; the reply is B's line and ends at its newline.

    The texts' tokens come from the tokenized dataset as they are (no leading space), so `A:` and the space after it
    are tokenized apart from the text: a little off the tokenization of the whole line. Decoding stops at any token
    that holds a newline (or a special token).
    """

    name = "transcript"
    USER, BOT = "A", "B"
    one_line = True

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bot_type, self.user_type = BOT_TYPE, USER_TYPE
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad is None:
            raise InputFormatError("--input_format transcript: the tokenizer has neither a pad nor an eos token")
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        with_specials = tokenizer("a")["input_ids"]  # a tokenizer that starts every text with <bos> starts this one
        self.start = with_specials[:1] if with_specials[:1] == [tokenizer.bos_token_id] else []
        self.newline = encode("\n")
        self.prefixes = {kind: encode(f"{name}:") + encode(" ") for kind, name in (
            ("persona", "Persona"), (self.user_type, self.USER), (self.bot_type, self.BOT))}
        self.reply_end = self.newline
        vocab = range(len(tokenizer))
        self.stop_ids = sorted(set(tokenizer.all_special_ids) | {
            i for i, text in zip(vocab, tokenizer.batch_decode([[i] for i in vocab])) if "\n" in text})

    def context(self, persona, history):
        ids, types = list(self.start), [self.bot_type] * len(self.start)
        lines = [("persona", self.bot_type, p) for p in persona] + [
            (self.speaker_type(len(history), j), self.speaker_type(len(history), j), t) for j, t in enumerate(history)]
        for prefix, speaker, text in lines:
            line = self.prefixes[prefix] + list(text) + self.newline
            ids += line
            types += [speaker] * len(line)
        return ids + self.prefixes[self.bot_type], types + [self.bot_type] * len(self.prefixes[self.bot_type])

    def overhead(self, n_persona, n_history):
        lines = n_persona * len(self.prefixes["persona"]) + sum(
            len(self.prefixes[self.speaker_type(n_history, j)]) for j in range(n_history))
        return (len(self.start) + lines + (n_persona + n_history) * len(self.newline)
                + len(self.prefixes[self.bot_type]) + len(self.reply_end))


def default_input_format(tokenizer):
    """chat_template when the tokenizer has one that lays our turns out, else transfertransfo."""
    if not getattr(tokenizer, "chat_template", None):
        return "transfertransfo"
    try:
        ChatTemplateLayout(tokenizer)
    except InputFormatError:
        return "transfertransfo"
    return "chat_template"


def make_layout(tokenizer, input_format):
    """The layout of `input_format` for a tokenizer prepared for it (transfertransfo: its tokens added)."""
    if input_format == "transfertransfo":
        return TransferTransfoLayout(tokenizer)
    if input_format == "chat_template":
        return ChatTemplateLayout(tokenizer)
    if input_format == "transcript":
        return TranscriptLayout(tokenizer)
    raise InputFormatError(f"--input_format {input_format!r}: use one of {', '.join(INPUT_FORMATS)}")
