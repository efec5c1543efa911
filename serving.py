"""The chat server's parts: OpenAI chat requests to model inputs, one decoding thread that batches requests, and
the FastAPI app (the API, its OpenAI-style errors and the chat page). serve.py loads a run and starts it.
"""
import asyncio
import json
import logging
import queue
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import decoders
from transformers.convert_slow_tokenizer import bytes_to_unicode

from decoding import MIN_TEMPERATURE, DecodingConfig, generate, reply_text
from rankers import Rankers, rerank_configs
from utils import free_port

logger = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "web" / "chat.html"
# Fields OpenAI clients send whose effect this server lacks: refused when asked for, as `stop` is, rather than
# answered without it (a client parsing JSON or tool calls would break on a plain reply). Each: is it asked for?
UNSUPPORTED = {
    "response_format": lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "logit_bias": lambda v: bool(v),
}


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, type_="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self):
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextPart]]] = None  # null: an assistant message of tool calls, OpenAI says

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, strict=True)


class ChatRequest(BaseModel):
    """The chat-completions fields we read; other fields OpenAI clients send are accepted and ignored.

    Numbers and booleans are strict, as OpenAI's are (`"n": true` or `"max_tokens": "5"` is a 400); a null `n` or
    `stream`, which some clients send, is the default.
    """
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, strict=True)
    max_completion_tokens: Optional[int] = Field(None, ge=1, strict=True)
    temperature: Optional[float] = Field(None, ge=0, le=2, strict=True)
    top_p: Optional[float] = Field(None, ge=0, le=1, strict=True)  # 0: the likeliest token only, i.e. greedy
    n: int = Field(1, ge=1, le=16, strict=True)
    seed: Optional[int] = Field(None, ge=-2 ** 63, lt=2 ** 64, strict=True)  # what torch's generators take
    stream: bool = Field(False, strict=True)
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None  # refused unless empty: ignoring it would break a client's replies
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, strict=True)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2, strict=True)
    logprobs: bool = Field(False, strict=True)
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, strict=True)

    @field_validator("n", "stream", "logprobs", mode="before")
    @classmethod
    def null_is_the_default(cls, value, info):
        return cls.model_fields[info.field_name].default if value is None else value

    def unsupported(self):
        """APIError naming the first field asked for whose effect this server lacks, else None."""
        for name, asked in UNSUPPORTED.items():
            if asked((self.model_extra or {}).get(name)):
                return APIError(400, f"{name}: not supported by this server (a reply is plain text, decoded as "
                                     f"serve.py's flags and temperature, top_p, the penalties, seed, n and "
                                     f"max_tokens say)", name)
        if self.stream_options is not None and not self.stream:
            return APIError(400, "stream_options: only allowed when stream is true", "stream_options")
        if self.top_logprobs and not self.logprobs:
            return APIError(400, "top_logprobs: only allowed when logprobs is true", "top_logprobs")
        return None


def is_union_branch(part):
    """Whether a pydantic error location's part names a branch of a union ("str", "list[TextPart]"), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part)


def persona_and_turns(messages):
    """(persona sentences, turn texts ending with the user's) of OpenAI messages; APIError naming the bad field.

    System (and developer) messages are the persona, one sentence per line. User and assistant messages are the
    history; consecutive messages of one speaker join into one turn, as one speaker's turn.
    """
    persona, turns, roles = [], [], []
    if messages[-1].role != "user":
        raise APIError(400, f"messages[{len(messages) - 1}].role: the last message must be the user's, to be "
                            f"answered", f"messages[{len(messages) - 1}].role")
    for i, message in enumerate(messages):
        text = message.text().strip()
        if not text and message.role != "user":
            continue  # an empty system prompt, a reply that came out empty: nothing to read, as OpenAI takes them
        if not text:
            raise APIError(400, f"messages[{i}].content: empty; a user's message needs text", f"messages[{i}].content")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON can carry a lone surrogate ("\udce9"), which no tokenizer takes
            raise APIError(400, f"messages[{i}].content: not valid Unicode (a lone surrogate at character {e.start})",
                           f"messages[{i}].content") from None
        if message.role in ("system", "developer"):
            persona += [line.strip() for line in text.splitlines() if line.strip()]
        elif roles and roles[-1] == message.role:
            turns[-1] += "\n" + text
        else:
            turns.append(text)
            roles.append(message.role)
    return persona, turns


class TextStream:
    """Text pieces of a reply as its tokens arrive; joined, they are exactly the final text.

    A piece is held back while the decoded text ends in a partial character (U+FFFD) or does not extend what
    was already sent.
    """

    def __init__(self, decode):
        self.decode, self.tokens, self.sent = decode, [], ""

    def push(self, token):
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def finish(self, tokens):
        text = self.decode(tokens)
        if not text.startswith(self.sent):  # never seen with byte-level tokenizers; the client has the sent text
            logger.warning("streamed text %r is not a prefix of the reply %r", self.sent, text)
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


def token_bytes_of(tokenizer):
    """A function giving a token's own bytes, as OpenAI's logprobs report them: a byte-level BPE token, or a
    SentencePiece byte-fallback piece (<0xE2>), can hold part of a character, which decoding it alone turns into
    U+FFFD. Other tokens give the text they decode to alone (a SentencePiece word's leading space is lost there,
    as in vLLM's); an id past the tokenizer's vocabulary (a model's padded embedding rows), no bytes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_of = ({c: b for b, c in bytes_to_unicode().items()}  # a byte-level BPE's characters stand for bytes
               if backend is not None and isinstance(backend.decoder, decoders.ByteLevel) else {})

    def token_bytes(token):
        piece = tokenizer.convert_ids_to_tokens(token)
        if piece is None:
            return b""
        if byte_of and all(c in byte_of for c in piece):
            return bytes(byte_of[c] for c in piece)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        return tokenizer.decode([token]).encode("utf-8")
    return token_bytes


@dataclass(eq=False)  # a request: equal to itself alone (and kept in sets)
class Job:
    """One request's rows (its choices, or its --rerank samples) and where its events go."""
    contexts: list
    configs: list
    generators: list
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    stream: bool = False
    persona: list = field(default_factory=list)  # for --rerank's ranker
    turns: list = field(default_factory=list)
    samples: int = 1
    top_logprobs: int = -1  # k >= 0: each reply token's log-probability and its k likeliest alternatives' are sent
    token_logprobs: list = field(default_factory=list)  # per row, (logprob, top) of each token so far
    gone: threading.Event = field(default_factory=threading.Event)  # set when its client leaves: its rows stop
    answered: bool = False  # a token or its replies were sent: it cannot start over
    taken: bool = False  # by a batch, or let go while queued (Batcher.leave): its place is counted no more

    def emit(self, *event):
        self.answered = self.answered or event[0] != "error"
        if not self.gone.is_set():  # no one listens (and its event loop may be closed)
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Batcher:
    """One thread owns the model: requests waiting when it is free are decoded in one batch.

    At most `max_pending` requests are queued or decoding; beyond that `submit` refuses (HTTP 429), so one
    long request or a crowd cannot hold the page forever. A request whose client has left is not decoded (and
    `decode_jobs` stops its rows). When a batch fails, each of its requests that has sent nothing yet is decoded
    again alone (from its generators' states before), so that only the request at fault gets the error.
    """

    def __init__(self, decode_jobs, max_batch_rows=8, max_pending=32, gather_s=0.005):
        self.decode_jobs, self.max_batch_rows, self.max_pending, self.gather_s = (
            decode_jobs, max_batch_rows, max_pending, gather_s)
        self.queue = queue.Queue()
        self.lock = threading.Lock()
        self.pending = 0
        self.batches = 0
        self.carry = None  # a request too big for the last batch: the first of the next
        self.thread = threading.Thread(target=self.run, name="decoder", daemon=True)
        self.thread.start()

    def submit(self, job):
        with self.lock:
            if self.pending >= self.max_pending:
                raise APIError(429, f"the server is busy: {self.pending} requests in flight (--max_concurrency "
                                    f"{self.max_pending}); retry later", type_="rate_limit_error",
                               code="rate_limit_exceeded")
            self.pending += 1
        self.queue.put(job)

    def leave(self, job):
        """A request whose client has left: its rows stop, and a queued one frees its place at once."""
        job.gone.set()
        with self.lock:
            if not job.taken:
                job.taken = True
                self.pending -= 1

    def _take(self, job):
        with self.lock:
            taken, job.taken = job.taken, True
        return not taken  # False: its client left while it was queued

    def take_batch(self):
        """The next job, then those that arrive within gather_s, up to max_batch_rows rows."""
        first, self.carry = self.carry, None
        while first is None or not self._take(first):
            first = self.queue.get()
        jobs, rows = [first], len(first.contexts)
        deadline = time.perf_counter() + self.gather_s
        while rows < self.max_batch_rows:
            try:
                job = self.queue.get(timeout=max(deadline - time.perf_counter(), 0))
            except queue.Empty:
                break
            if rows + len(job.contexts) > self.max_batch_rows:
                self.carry = job  # first in the next batch, ahead of later arrivals
                break
            if not self._take(job):  # its client left while it was queued
                continue
            jobs.append(job)
            rows += len(job.contexts)
        return jobs

    def run(self):
        while True:
            jobs = self.take_batch()
            live = [job for job in jobs if not job.gone.is_set()]
            states = {job: [g.get_state() for g in job.generators] for job in live}
            try:
                failed = not self.decode(live, alone=len(live) == 1)
                for job in live if failed and len(live) > 1 else []:
                    if not job.answered and not job.gone.is_set():  # alone, it passes or fails on its own
                        for generator, state in zip(job.generators, states[job]):
                            generator.set_state(state)
                        self.decode([job], alone=True)
            finally:
                with self.lock:
                    self.pending -= len(jobs)
                    self.batches += 1

    def decode(self, jobs, alone):
        """decode_jobs, and whether it went through; on failure the requests alone in their batch, or already
        answering, get the error (a 500)."""
        try:
            self.decode_jobs(jobs)
            return True
        except Exception as e:  # noqa: BLE001  the thread lives on
            logger.exception("decoding failed")
            for job in jobs:
                if alone or job.answered:
                    job.emit("error", f"{type(e).__name__}: {e}")
            return False


@dataclass(frozen=True)
class ServerSettings:
    """What serve.py's flags set: decoding defaults and limits."""
    model_name: str
    decoding: DecodingConfig
    max_history: int = 2
    persona: tuple = ()
    max_tokens_limit: int = 512
    rerank: int = 0
    ranker: str = "mc"  # what --rerank's samples are ranked by (rankers.py)
    rerank_greedy: bool = False  # the first of a choice's --rerank rows decodes greedily
    seed: Optional[int] = None


def row_seed(seed, row):
    """The sampling seed of a request's row `row`: the request's own for row 0, a hash of both for the others.

    Not seed + row, with which requests of consecutive seeds would draw the same samples (seed 5's second choice
    was seed 6's first).
    """
    return seed if row == 0 else random.Random(f"{seed}:{row}").getrandbits(62)


class ChatModel:
    """A loaded run, its layout and decoding defaults: requests become rows, batches of rows become replies."""

    def __init__(self, model, tokenizer, layout, settings, max_len, rankers=None):
        self.model, self.tokenizer, self.layout, self.settings, self.max_len = model, tokenizer, layout, settings, max_len
        self.device = next(model.parameters()).device
        self.rankers = rankers or Rankers(model, layout, self.device)
        lacking = self.rankers.lacking(settings.ranker) if settings.rerank > 1 else ""
        if lacking:
            raise ValueError(f"ranker {settings.ranker!r}: no {lacking} model to rank --rerank's samples with")
        self.token_bytes = token_bytes_of(tokenizer)
        self.rng = random.Random(settings.seed)

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(self, tokens):
        return reply_text(self.tokenizer, tokens).lstrip()

    def config_of(self, request):
        """The server's decoding defaults with the request's max_tokens, temperature (0: greedy), top_p and
        penalties."""
        limit = self.settings.max_tokens_limit
        max_tokens = request.max_completion_tokens or request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"{param}: {max_tokens} is above this server's limit of {limit} (--max_tokens_limit)",
                           param)
        overflow = self.layout.reply_overflow(max_tokens or 0, self.max_len)
        if overflow:
            raise APIError(400, f"{param}: {max_tokens} {overflow}", param)
        config = self.settings.decoding
        changes = {"max_length": max_tokens or config.max_length}
        changes.update({name: getattr(request, name) for name in ("frequency_penalty", "presence_penalty")
                        if getattr(request, name) is not None})
        if request.temperature is not None:
            greedy = request.temperature < MIN_TEMPERATURE
            changes.update(no_sample=greedy, temperature=1.0 if greedy else request.temperature)
        if request.top_p == 0:  # OpenAI's top_p 0 keeps the likeliest token; our top_p 0 would turn nucleus off
            changes["no_sample"] = True
        elif request.top_p is not None:
            changes["top_p"] = request.top_p
        return replace(config, **changes)

    def job_for(self, request, loop):
        persona, turns = persona_and_turns(request.messages)
        if self.layout.one_line:  # a newline in a transcript's turn would start a line of no speaker
            turns = [" ".join(t.split()) for t in turns]
        persona = persona or list(self.settings.persona)
        turns = turns[-(2 * self.settings.max_history + 1):]
        config = self.config_of(request)
        if request.logprobs and config.num_beams > 1:
            raise APIError(400, f"logprobs: not reported by this server's beam search (--num_beams "
                                f"{config.num_beams})", "logprobs")
        context = self.layout.context_inputs([self.encode(s) for s in persona], [self.encode(t) for t in turns],
                                             self.max_len, config.max_length)
        # greedy or beam decoding gives one reply however often it runs: nothing to rerank
        samples = max(self.settings.rerank, 1) if not config.no_sample and config.num_beams == 1 else 1
        configs = rerank_configs(config, samples, self.settings.rerank_greedy) * request.n
        rows = len(configs)
        seed = request.seed if request.seed is not None else self.rng.getrandbits(62)
        generators = [torch.Generator(device=self.device).manual_seed(row_seed(seed, i)) for i in range(rows)]
        return Job([context] * rows, configs, generators, loop, asyncio.Queue(),
                   stream=samples == 1 and config.num_beams == 1, persona=persona, turns=turns, samples=samples,
                   top_logprobs=(request.top_logprobs or 0) if request.logprobs else -1)

    def decode_jobs(self, jobs, max_rows=None):
        """Decode the jobs' rows in batches of at most max_rows (default: one batch), streaming tokens to jobs that
        stream, then their replies. The rows of a job whose client has left stop where they are."""
        owners = [(job, i) for job in jobs for i in range(len(job.contexts))]
        size, replies = max_rows or max(len(owners), 1), []
        for job in jobs:
            job.token_logprobs = [[] for _ in job.contexts]  # afresh: a failed batch's job is decoded again
        for start in range(0, len(owners), size):
            rows = owners[start:start + size]
            replies += generate(self.model, [job.contexts[i] for job, i in rows], self.layout,
                                [job.configs[i] for job, i in rows], [job.generators[i] for job, i in rows],
                                on_token=partial(self._on_token, rows), stop_row=partial(self._client_gone, rows),
                                logprobs=[job.top_logprobs for job, _ in rows])
        start = 0
        for job in jobs:
            mine = replies[start:start + len(job.contexts)]
            start += len(job.contexts)
            if not job.gone.is_set():
                chosen = self.choose(job, mine)
                job.emit("done", [mine[i] for i in chosen],
                         [job.token_logprobs[i] for i in chosen] if job.top_logprobs >= 0 else None)

    @staticmethod
    def _on_token(rows, row, token, logprobs):
        job, i = rows[row]
        if logprobs is not None:
            job.token_logprobs[i].append(logprobs)
        if job.stream:
            job.emit("token", i, token, logprobs)

    @staticmethod
    def _client_gone(rows, row):
        return rows[row][0].gone.is_set()

    def choose(self, job, replies):
        """The row of each choice's reply: with --rerank, of the sample --ranker (by default the run's multiple-choice
        head) scores best among the choice's samples."""
        if job.samples == 1:
            return list(range(len(replies)))
        return [start + self.rankers.best(self.settings.ranker, job.persona, job.turns, job.contexts[start],
                                          replies[start:start + job.samples],
                                          [self.text(r) for r in replies[start:start + job.samples]])
                for start in range(0, len(replies), job.samples)]

    def logprobs(self, reply, token_logprobs):
        """OpenAI's `logprobs` of a choice: {"content": [{token, logprob, bytes, top_logprobs}, ...]}, a token each."""
        def entry(token, logprob):
            raw = self.token_bytes(token)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}
        return {"content": [{**entry(token, logprob), "top_logprobs": [entry(*alternative) for alternative in top]}
                            for token, (logprob, top) in zip(reply, token_logprobs)]}

    def finish_reason(self, reply, config):
        return "length" if len(reply) >= config.max_length else "stop"

    def usage(self, job, replies):
        prompt = len(job.contexts[0][0])
        completion = sum(len(r) + (self.finish_reason(r, job.configs[0]) == "stop") for r in replies)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def launch(argv, log, timeout=240):
    """Start serve.py with `argv` on a free local port, as a user would; (process, url) once /health answers.

    For tests and benchmarks. Its output goes to the open file `log`, whose tail is in the error if it fails.
    """
    port = free_port()
    process = subprocess.Popen([sys.executable, str(Path(__file__).parent / "serve.py"), *argv, "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:  # not listening yet
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            log.flush()
            raise RuntimeError(f"serve.py did not come up:\n{Path(log.name).read_text()[-3000:]}")
        time.sleep(0.5)


async def until_disconnected(request):
    """Returns once the client of a request whose body was read has disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


SHUTTING_DOWN = "the server is shutting down before this reply was finished; retry later"


def sse(payload):
    return f"data: {json.dumps(payload)}\n\n"


def create_app(chat_model, max_concurrency=32, max_batch_size=8):
    """The FastAPI app over a ChatModel: /v1/chat/completions, /v1/models, /health and the chat page at /."""
    app = FastAPI(title="TransferTransfo chat", docs_url=None, redoc_url=None)
    batcher = Batcher(partial(chat_model.decode_jobs, max_rows=max_batch_size), max_batch_rows=max_batch_size,
                      max_pending=max_concurrency)
    app.state.batcher, app.state.chat_model = batcher, chat_model
    waiting, ending = set(), []  # jobs whose client waits for an answer; [True] once replies are being ended

    def end(job):
        # after the events the decoder already sent (a reply done just now is answered); its rows stop, or are
        # never decoded if still queued
        job.loop.call_soon(job.events.put_nowait, ("shutdown",))
        job.gone.set()

    def wait_for(job):
        waiting.add(job)
        if ending:  # it came in as the server ends the others
            end(job)

    async def end_replies(after_s):
        """For a server shutting down: replies still unfinished after `after_s` seconds end then, each with an
        answer (a 503, or the stream's error event and `data: [DONE]`) rather than a dropped connection."""
        await asyncio.sleep(after_s)
        ending.append(True)
        for job in list(waiting):
            end(job)

    app.state.end_replies = end_replies
    name = chat_model.settings.model_name
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        errors = exc.errors()
        error = errors[0]
        branch = [i for i, p in enumerate(error["loc"]) if is_union_branch(p)]
        if branch:  # e.g. content's str or list[TextPart]: the branch that got furthest says what is wrong
            stem = error["loc"][:branch[0]]
            error = max((e for e in errors if e["loc"][:len(stem)] == stem), key=lambda e: len(e["loc"]))
        loc = [str(p) for p in error["loc"] if p != "body" and not is_union_branch(p)]
        param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or "body"
        message = error["msg"]
        if error["type"] == "json_invalid":  # its loc is the character where parsing failed, not a field
            param, message = "body", f"not valid JSON (at character {loc[0] if loc else 0})"
        return APIError(400, f"{param}: {message}", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return APIError(exc.status_code, str(exc.detail), type_="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def server_error(request, exc):
        logger.exception("request failed")
        return APIError(500, f"{type(exc).__name__}: {exc}", type_="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "in_flight": batcher.pending, "batches": batcher.batches}

    model_card = {"id": name, "object": "model", "created": created, "owned_by": "transfertransfo"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise APIError(404, f"model: {model_id!r} is not served here; this server serves {name!r}", "model",
                           code="model_not_found")
        return model_card

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if body.model and body.model != name:
            raise APIError(404, f"model: {body.model!r} is not served here; this server serves {name!r} "
                                f"(GET /v1/models)", "model", code="model_not_found")
        if body.stop:
            raise APIError(400, "stop: stop sequences are not supported here; a reply ends at the model's end of "
                                "turn or at max_tokens", "stop")
        refused = body.unsupported()
        if refused:
            raise refused
        job = chat_model.job_for(body, asyncio.get_running_loop())
        batcher.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if body.stream:  # starlette cancels the stream when its client leaves
            return StreamingResponse(stream_events(job, head, body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # not held by a proxy
        replies, logprobs = await wait_replies(job, request)
        return {**head, "object": "chat.completion", "usage": chat_model.usage(job, replies), "choices": [
            {"index": i, "message": {"role": "assistant", "content": chat_model.text(reply)},
             "finish_reason": chat_model.finish_reason(reply, job.configs[i]),
             "logprobs": chat_model.logprobs(reply, logprobs[i]) if logprobs else None}
            for i, reply in enumerate(replies)]}

    async def wait_replies(job, request):
        """The job's replies; if the client leaves first, the job stops and the answer (to no one) is a 499."""
        left = asyncio.ensure_future(until_disconnected(request))
        wait_for(job)
        try:
            while True:
                event = asyncio.ensure_future(job.events.get())
                await asyncio.wait({event, left}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    raise APIError(499, "the client closed the request", type_="client_closed_request")
                kind, *rest = event.result()
                if kind == "done":
                    return rest
                if kind == "error":
                    raise APIError(500, rest[0], type_="server_error")
                if kind == "shutdown":
                    raise APIError(503, SHUTTING_DOWN, type_="server_error")
        except asyncio.CancelledError:  # uvicorn's graceful shutdown timed out: answer, not log a traceback
            raise APIError(503, SHUTTING_DOWN, type_="server_error") from None
        finally:
            waiting.discard(job)
            left.cancel()
            batcher.leave(job)  # too late to matter once done; else (left, or cancelled at shutdown) its rows stop

    async def stream_events(job, head, body):
        n = body.n
        wait_for(job)
        chunk = lambda choices: sse({**head, "object": "chat.completion.chunk", "choices": choices})  # noqa: E731
        streams = [TextStream(chat_model.text) for _ in range(n)]
        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(n)])
            while True:
                kind, *rest = await job.events.get()
                if kind == "token":
                    i, token, logprobs = rest
                    yield chunk([{"index": i, "delta": {"content": streams[i].push(token)}, "finish_reason": None,
                                  "logprobs": chat_model.logprobs([token], [logprobs]) if logprobs else None}])
                elif kind == "done":
                    replies, logprobs = rest
                    for i, reply in enumerate(replies):
                        # a reply that did not stream (--rerank's pick) comes whole here, and so do its logprobs
                        held = logprobs and not job.stream
                        yield chunk([{"index": i, "delta": {"content": streams[i].finish(reply)},
                                      "logprobs": chat_model.logprobs(reply, logprobs[i]) if held else None,
                                      "finish_reason": chat_model.finish_reason(reply, job.configs[i])}])
                    if body.stream_options and body.stream_options.include_usage:
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                                   "usage": chat_model.usage(job, replies)})
                    break
                else:  # "error", or "shutdown"
                    message = rest[0] if kind == "error" else SHUTTING_DOWN
                    yield sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
                    break
        finally:  # done, or the client left (starlette cancelled the stream), or the server is shutting down
            waiting.discard(job)
            batcher.leave(job)
        yield "data: [DONE]\n\n"

    return app
