import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import make_tokenizer

from decoding import DecodingConfig
from modeling import load_tokenizer_and_model, model_max_length
from rankers import Rankers
from serving import (SHUTTING_DOWN, APIError, Batcher, ChatModel, Job, ServerSettings, TextStream, create_app,
                     persona_and_turns)


def make_chat_model(directory, input_format="", bert=None, biencoder=None, **settings):
    """A ChatModel of a tiny model; `bert` and `biencoder` are the models of --rerank's rankers that need one."""
    torch.manual_seed(0)
    tokenizer, model, layout = load_tokenizer_and_model(directory, input_format=input_format)
    torch.nn.init.normal_(model.speaker_embeddings)
    defaults = dict(model_name="tiny", decoding=DecodingConfig(max_length=8, temperature=1.0), max_tokens_limit=32)
    return ChatModel(model.eval(), tokenizer, layout, ServerSettings(**{**defaults, **settings}),
                     model_max_length(model), Rankers(model, layout, bert=bert, biencoder=biencoder))


@pytest.fixture(scope="module")
def served(tiny_dirs):
    chat_model = make_chat_model(tiny_dirs["llama_chat"])
    seen = []  # the contexts the model is given, request by request
    decode_jobs = chat_model.decode_jobs
    chat_model.decode_jobs = lambda jobs, **kw: (seen.extend(j.contexts[0] for j in jobs), decode_jobs(jobs, **kw))
    app = create_app(chat_model, max_concurrency=16, max_batch_size=8)
    with TestClient(app) as client:
        yield client, chat_model, seen


PERSONA = {"role": "system", "content": "i love cats.\ni like music"}


def ask(client, *messages, **fields):
    return client.post("/v1/chat/completions", json={"messages": list(messages), **fields})


def stream_events(client, *messages, **fields):
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": list(messages), "stream": True, **fields}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"  # a proxy passes each event on at once
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_max_completion_tokens_bounds_a_reply_as_max_tokens_does_and_wins_over_it(served):
    client, _, _ = served
    user = {"role": "user", "content": "hi how are you"}
    assert ask(client, user, temperature=0, max_tokens=30).json()["usage"]["completion_tokens"] > 2
    for fields in ({"max_completion_tokens": 2}, {"max_completion_tokens": 2, "max_tokens": 30}):
        assert ask(client, user, temperature=0, **fields).json()["usage"]["completion_tokens"] <= 2, fields
    assert ask(client, user, temperature=0, max_completion_tokens=2).json()["choices"][0]["message"] == ask(
        client, user, temperature=0, max_tokens=2).json()["choices"][0]["message"]
    too_many = ask(client, user, max_completion_tokens=33)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_completion_tokens"
    assert "max_completion_tokens: 33 is above this server's limit of 32" in too_many.json()["error"]["message"]


def test_a_reply_has_openai_chat_completion_shape(served):
    client, chat_model, _ = served
    response = ask(client, PERSONA, {"role": "user", "content": "hi how are you"}, temperature=0, max_tokens=6)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    words = len(choice["message"]["content"].split())  # the test tokenizer: one token per word
    assert usage["completion_tokens"] == words + (choice["finish_reason"] == "stop") <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 5


def test_streamed_chunks_join_into_the_greedy_reply(served):
    client, _, _ = served
    messages = (PERSONA, {"role": "user", "content": "what do you like to eat"})
    whole = ask(client, *messages, temperature=0, max_tokens=10).json()
    events = stream_events(client, *messages, temperature=0, max_tokens=10,
                           stream_options={"include_usage": True})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    chunks = [c for e in events for c in e["choices"]]
    assert "".join(c["delta"]["content"] for c in chunks) == whole["choices"][0]["message"]["content"] != ""
    assert chunks[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-1]["usage"] == whole["usage"]
    token_chunks = len(chunks) - 2  # the role chunk and the closing chunk
    assert token_chunks == len(whole["choices"][0]["message"]["content"].split())  # one chunk per token


def test_logprobs_give_each_reply_token_and_its_likeliest_alternatives_streamed_or_not(served):
    client, _, _ = served
    messages = (PERSONA, {"role": "user", "content": "do you like music"})
    body = ask(client, *messages, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3).json()
    (choice,) = body["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] - (choice["finish_reason"] == "stop") > 1
    assert " ".join(e["token"] for e in content) == choice["message"]["content"]  # the test tokenizer: words
    assert [bytes(e["bytes"]).decode() for e in content] == choice["message"]["content"].split()
    for entry in content:
        top = entry["top_logprobs"]
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True) and len(top) == 3
        assert (entry["token"], entry["logprob"]) == (top[0]["token"], top[0]["logprob"])  # greedy: the likeliest
        assert entry["logprob"] < 0
    streamed = [c["logprobs"] for e in stream_events(client, *messages, temperature=0, max_tokens=6, logprobs=True,
                                                     top_logprobs=3) for c in e["choices"]]
    assert streamed[0] is None and streamed[-1] is None  # the role chunk and the closing one
    flat = lambda entries: [(e["token"], e["logprob"], [(t["token"], t["logprob"]) for t in e["top_logprobs"]])  # noqa
                            for e in entries]
    assert [(token, pytest.approx(logprob), [(t, pytest.approx(p)) for t, p in top]) for token, logprob, top in
            flat(e for chunk in streamed[1:-1] for e in chunk["content"])] == flat(content)
    plain = ask(client, *messages, temperature=0, max_tokens=6, logprobs=True).json()["choices"][0]
    assert [e["token"] for e in plain["logprobs"]["content"]] == [e["token"] for e in content]
    assert all(e["top_logprobs"] == [] for e in plain["logprobs"]["content"])  # top_logprobs 0 or left out
    assert ask(client, *messages, temperature=0, max_tokens=6).json()["choices"][0]["logprobs"] is None


def test_token_bytes_are_a_byte_level_token_own_bytes_not_its_replacement_character():
    from conftest import make_byte_level_tokenizer
    from serving import token_bytes_of

    tokenizer = make_byte_level_tokenizer()
    token_bytes = token_bytes_of(tokenizer)
    tokens = tokenizer("hi \U0001F469", add_special_tokens=False)["input_ids"]
    assert [token_bytes(t) for t in tokens[:3]] == [b"h", b"i", b" "]
    assert b"".join(token_bytes(t) for t in tokens[3:]) == "\U0001F469".encode()  # 4 tokens, 1 byte each
    words = token_bytes_of(make_tokenizer())  # not byte-level: the text of the token alone
    assert (words(3), words(10 ** 6)) == (b"how", b"")  # an id past the vocabulary (padded embedding rows): none
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pieces = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {"<unk>": 0, "<0xE2>": 1, "\u2581cats": 2}, unk_token="<unk>")))  # SentencePiece's byte fallback
    assert token_bytes_of(pieces)(1) == b"\xe2"


def test_penalties_of_a_request_reach_its_decoding_and_beam_search_refuses_logprobs(tiny_dirs):
    from serving import ChatRequest

    chat_model = make_chat_model(tiny_dirs["llama_chat"])
    user = [{"role": "user", "content": "hi"}]
    config = chat_model.config_of(ChatRequest(messages=user, frequency_penalty=0.5, presence_penalty=-1))
    assert (config.frequency_penalty, config.presence_penalty) == (0.5, -1.0)
    assert chat_model.config_of(ChatRequest(messages=user)) == DecodingConfig(max_length=8, temperature=1.0)
    beams = make_chat_model(tiny_dirs["llama_chat"], decoding=DecodingConfig(max_length=8, num_beams=2))
    with pytest.raises(APIError, match="logprobs: not reported by this server's beam search") as refused:
        beams.job_for(ChatRequest(messages=user, logprobs=True), asyncio.new_event_loop())
    assert refused.value.status == 400 and refused.value.param == "logprobs"


def test_a_seed_makes_sampling_repeat(served):
    client, _, _ = served
    user = {"role": "user", "content": "tell me about your family"}
    reply = lambda seed: ask(client, user, temperature=1.5, seed=seed, max_tokens=12).json()[  # noqa: E731
        "choices"][0]["message"]["content"]
    assert reply(5) == reply(5)
    assert len({reply(5), reply(6), reply(7), reply(8)}) > 1


def test_n_choices_are_sampled_independently(served):
    client, _, _ = served
    body = ask(client, {"role": "user", "content": "hi"}, n=3, temperature=1.5, seed=1, max_tokens=12).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) > 1


def test_requests_of_consecutive_seeds_share_no_samples(served):
    client, _, _ = served
    choices = lambda seed, n: [c["message"]["content"] for c in ask(  # noqa: E731
        client, {"role": "user", "content": "hi"}, n=n, temperature=1.5, seed=seed, max_tokens=12).json()["choices"]]
    first, second = choices(1, 3), choices(2, 3)
    assert first[0] == choices(1, 1)[0]  # a request's first choice is its seed's single reply
    assert not set(first[1:]) & set(second)  # seed + 1 made seed 1's second choice seed 2's first


def test_the_persona_is_the_system_part_of_the_prompt_the_model_sees(served):
    client, chat_model, seen = served
    user = {"role": "user", "content": "hi"}
    ask(client, PERSONA, user, temperature=0, max_tokens=2)
    with_persona = chat_model.tokenizer.decode(seen[-1][0])
    ask(client, user, temperature=0, max_tokens=2)
    without = chat_model.tokenizer.decode(seen[-1][0])
    assert "<|im_start|> system \n i love <unk> \n i like music <|im_end|>" in with_persona  # "cats." is unknown
    assert "system \n you are my nice friend" in without  # the template's own default system prompt
    assert with_persona.endswith(without[without.index("user"):])  # the same turn after a different system part


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages[1].role"),
    ({"messages": [{"role": "system", "content": "i love cats"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 33}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": True}, "n"),  # strict, as OpenAI: no bool for an int
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "1"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 64}, "seed"),  # past what a generator takes
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -2 ** 63 - 1}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["\n"]}, "stop"),  # not ignored: refused
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),  # not the union branch's name
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [5]}, "stop[0]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": ""}]}, "messages[1].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -3}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"50256": -100}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_input_gets_a_400_naming_the_field_and_the_next_request_works(served, body, param):
    client, _, _ = served
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param) and error["type"] == "invalid_request_error"
    assert ask(client, {"role": "user", "content": "hi"}, max_tokens=3).status_code == 200


def test_what_clients_send_by_default_is_accepted_and_empty_earlier_messages_are_skipped(served):
    client, chat_model, seen = served
    user = {"role": "user", "content": "do you like cats"}
    defaults = dict(logprobs=False, top_logprobs=0, response_format={"type": "text"}, tools=[], frequency_penalty=0,
                    presence_penalty=0.0, logit_bias={}, user="me", temperature=0, max_tokens=4)
    assert ask(client, user, **defaults).status_code == 200
    hi = {"role": "user", "content": "hi"}
    assert ask(client, hi, user, temperature=0, max_tokens=4).status_code == 200
    plain = list(seen[-1][0])
    empty = [{"role": "system", "content": ""}, {"role": "assistant", "content": None}, hi,
             {"role": "assistant", "content": ""}, user]
    response = ask(client, *empty, temperature=0, max_tokens=4)
    assert response.status_code == 200  # an empty reply of this server, sent back in the history, is no error
    assert list(seen[-1][0]) == plain  # as if they were not there: the template's own system prompt stays
    response = ask(client, user, {"role": "assistant", "content": ""})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[1].role"


def test_a_tiny_temperature_is_greedy_decoding_not_a_server_error(served):
    client, _, _ = served
    user = {"role": "user", "content": "do you like cats"}
    greedy = ask(client, user, temperature=0, max_tokens=6).json()["choices"][0]["message"]["content"]
    for temperature in (1e-45, 1e-6):  # logits / 1e-45 overflow to inf
        response = ask(client, user, temperature=temperature, max_tokens=6)
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == greedy


def test_max_tokens_beyond_what_the_model_reads_is_a_400_naming_it(tiny_dirs):
    chat_model = make_chat_model(tiny_dirs["llama_chat"], max_tokens_limit=100_000)
    shortest = max(len(chat_model.layout.context(persona, [[]])[0]) for persona in ([], [[]]))
    max_reply = chat_model.max_len - shortest
    assert chat_model.layout.max_reply(chat_model.max_len) == max_reply
    with TestClient(create_app(chat_model)) as client:
        for param in ("max_tokens", "max_completion_tokens"):
            response = ask(client, {"role": "user", "content": "hi"}, **{param: max_reply + 1})
            assert response.status_code == 400 and response.json()["error"]["param"] == param
            assert response.json()["error"]["message"] == (
                f"{param}: {max_reply + 1} does not fit: this model reads {chat_model.max_len} tokens, "
                f"and the shortest prompt takes {shortest} of them; at most {max_reply}")
    transcript = make_chat_model(tiny_dirs["llama_chat"], "transcript", max_tokens_limit=100_000)
    with TestClient(create_app(transcript)) as client:  # here a persona line adds tokens no cut takes away
        long_turn = {"role": "user", "content": " ".join(["hello"] * 600)}
        room = transcript.layout.max_reply(transcript.max_len)
        response = ask(client, PERSONA, long_turn, max_tokens=room, temperature=0)
        assert response.status_code == 200
        assert response.json()["usage"]["prompt_tokens"] + room <= transcript.max_len


def test_null_n_and_stream_are_their_defaults_and_top_p_0_is_greedy(served):
    client, _, _ = served
    user = {"role": "user", "content": "do you like cats"}
    greedy = ask(client, user, temperature=0, max_tokens=6).json()["choices"][0]["message"]["content"]
    response = ask(client, user, max_tokens=6, top_p=0, n=None, stream=None, seed=2 ** 64 - 1)
    assert response.status_code == 200
    (choice,) = response.json()["choices"]
    assert choice["message"]["content"] == greedy


def test_a_lone_surrogate_is_a_400_not_a_server_error(served):
    client, _, _ = served  # JSON may escape one ("\udce9"); it is no text a tokenizer takes
    response = client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "caf\\udce9"}]}',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0].content"
    assert "lone surrogate" in response.json()["error"]["message"]

def test_malformed_json_and_an_unknown_model_are_refused(served):
    client, _, _ = served
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "body"
    assert response.json()["error"]["message"] == "body: not valid JSON (at character 1)"
    assert ask(client, {"role": "user", "content": "hi"}, max_tokens=2, stop=None).status_code == 200
    response = ask(client, {"role": "user", "content": "hi"}, model="gpt-4o")
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    assert "'tiny'" in response.json()["error"]["message"]


def test_a_prompt_longer_than_the_model_is_cut_as_in_training(served):
    client, chat_model, seen = served
    long_turn = " ".join(["hello"] * 600 + ["music"] * 600)  # which end is kept shows
    response = ask(client, PERSONA, {"role": "user", "content": long_turn}, temperature=0, max_tokens=8)
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == len(seen[-1][0]) <= chat_model.max_len - 8
    encode = chat_model.encode
    trained = chat_model.layout.context_inputs([encode(line) for line in PERSONA["content"].split("\n")],
                                               [encode(long_turn)], chat_model.max_len, 8)
    assert list(seen[-1][0]) == list(trained[0])


def test_concurrent_clients_get_their_own_replies_decoded_together(served):
    client, chat_model, _ = served
    users = ["hi", "what do you like", "i am from the city", "do you like cats", "my name is", "how is work"]
    alone = [ask(client, {"role": "user", "content": u}, temperature=0, max_tokens=8).json()["choices"][0]
             ["message"]["content"] for u in users]
    batches_before = client.app.state.batcher.batches
    with ThreadPoolExecutor(len(users)) as pool:
        together = list(pool.map(lambda u: ask(client, {"role": "user", "content": u}, temperature=0,
                                               max_tokens=8).json()["choices"][0]["message"]["content"], users))
    assert together == alone
    assert client.app.state.batcher.batches - batches_before < len(users)  # some were decoded in one batch


def test_a_beam_search_server_decodes_concurrent_requests_together_as_each_alone(chatty_dir):
    beams = make_chat_model(chatty_dir, decoding=DecodingConfig(max_length=8, num_beams=3))
    users = ["hi", "what do you like", "i am from the city", "do you like cats", "my name is", "how is work"]
    with TestClient(create_app(beams, max_concurrency=16, max_batch_size=8)) as client:
        answer = lambda u: ask(client, {"role": "user", "content": u}, max_tokens=8).json()  # noqa: E731
        alone = [answer(u)["choices"][0]["message"]["content"] for u in users]
        batches_before = client.app.state.batcher.batches
        with ThreadPoolExecutor(len(users)) as pool:
            together = [r["choices"][0]["message"]["content"] for r in pool.map(answer, users)]
        assert together == alone and len(set(alone)) > 1
        assert client.app.state.batcher.batches - batches_before < len(users)  # some beams searched in one batch


def test_models_health_and_page(served):
    client, _, _ = served
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/tiny").json() == client.get("/v1/models").json()["data"][0]
    missing = client.get("/v1/models/gpt-4o")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["in_flight"] == 0
    ask(client, {"role": "user", "content": "hi"}, max_tokens=2)
    assert client.get("/health").json()["batches"] == health["batches"] + 1  # decoding batches so far
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="persona"' in page.text and "/v1/chat/completions" in page.text
    assert client.get("/nowhere").json()["error"]["message"] == "Not Found"


def test_messages_become_persona_lines_and_alternating_turns():
    messages = [type("M", (), {"role": r, "text": lambda self, c=c: c})() for r, c in [
        ("system", "i love cats.\n\n i am a nurse. "), ("user", "hi"), ("user", "anyone?"), ("assistant", "yes"),
        ("user", "cool")]]
    assert persona_and_turns(messages) == (["i love cats.", "i am a nurse."], ["hi\nanyone?", "yes", "cool"])


def test_text_stream_holds_back_partial_characters_and_joins_to_the_final_text():
    pieces = {(1,): "caf", (1, 2): "caf\ufffd", (1, 2, 3): "café", (1, 2, 3, 4): "café au lait"}
    stream = TextStream(lambda tokens: pieces[tuple(tokens)])
    sent = [stream.push(t) for t in (1, 2, 3, 4)]
    assert sent == ["caf", "", "é", " au lait"] and stream.finish([1, 2, 3, 4]) == ""


def make_job(rows=1, turns=()):
    return Job([([0], [0])] * rows, [None] * rows, [torch.Generator().manual_seed(row) for row in range(rows)],
               asyncio.new_event_loop(), asyncio.Queue(), turns=list(turns))


def test_batcher_decodes_waiting_requests_together_and_refuses_beyond_its_limit():
    release, batches = threading.Event(), []

    def decode_jobs(jobs):
        batches.append(len(jobs))
        release.wait(5)

    batcher = Batcher(decode_jobs, max_batch_rows=4, max_pending=4)
    batcher.submit(make_job())
    time.sleep(0.1)  # the first batch holds the thread
    for _ in range(3):
        batcher.submit(make_job())
    with pytest.raises(APIError) as refused:
        batcher.submit(make_job())
    assert refused.value.status == 429 and "--max_concurrency 4" in refused.value.message
    release.set()
    deadline = time.time() + 5
    while batcher.pending and time.time() < deadline:
        time.sleep(0.01)
    assert batches == [1, 3] and batcher.pending == 0


def test_a_queued_request_whose_client_leaves_frees_its_place_at_once_and_is_not_decoded():
    release, batches = threading.Event(), []

    def decode_jobs(jobs):
        batches.append([job.turns[0] for job in jobs])
        release.wait(5)

    batcher = Batcher(decode_jobs, max_pending=2)
    batcher.submit(make_job(turns=["first"]))
    time.sleep(0.1)  # decoding, while the next one queues
    queued = make_job(turns=["left"])
    batcher.submit(queued)
    batcher.leave(queued)
    batcher.leave(queued)  # twice (a stream's end after a cancel): counted once
    assert batcher.pending == 1
    batcher.submit(make_job(turns=["next"]))  # its place, not a 429
    release.set()
    deadline = time.time() + 5
    while batcher.pending and time.time() < deadline:
        time.sleep(0.01)
    assert batches == [["first"], ["next"]] and batcher.pending == 0


def test_a_failing_batch_fails_only_the_request_at_fault_and_the_thread_goes_on():
    release, batches, draws = threading.Event(), [], []

    def decode_jobs(jobs):  # fails a batch holding a "bad" request, after drawing from every row's generator
        batches.append([job.turns[0] for job in jobs])
        release.wait(5)
        draws.append({job.turns[0]: torch.rand(1, generator=job.generators[0]).item() for job in jobs})
        for job in jobs:
            if job.turns == ["streamed"]:
                job.emit("token", 0, 7)
        if any(job.turns == ["bad"] for job in jobs):
            raise RuntimeError("boom")
        for job in jobs:
            job.emit("done", [[]])

    batcher = Batcher(decode_jobs)
    first = make_job(turns=["first"])
    batcher.submit(first)
    time.sleep(0.1)  # the first batch holds the thread while the others queue, to be decoded together
    jobs = [make_job(turns=[name]) for name in ("good", "bad", "streamed")]
    for job in jobs:
        batcher.submit(job)
    release.set()
    events = {job.turns[0]: [job.loop.run_until_complete(asyncio.wait_for(job.events.get(), 5))
                             for _ in range(2 if job.turns == ["streamed"] else 1)] for job in [first, *jobs]}
    assert events["first"] == [("done", [[]])] and events["good"] == [("done", [[]])]
    assert events["bad"] == [("error", "RuntimeError: boom")]
    assert events["streamed"] == [("token", 0, 7), ("error", "RuntimeError: boom")]  # begun: not decoded again
    assert batches == [["first"], ["good", "bad", "streamed"], ["good"], ["bad"]]
    assert draws[2]["good"] == draws[1]["good"]  # alone, from its generator's state before the failed batch
    deadline = time.time() + 5
    while batcher.pending and time.time() < deadline:
        time.sleep(0.01)
    assert batcher.pending == 0


def test_a_request_too_big_for_the_batch_is_the_first_of_the_next():
    release, batches = threading.Event(), []

    def decode_jobs(jobs):
        batches.append([job.turns[0] for job in jobs])
        release.wait(5)
        for job in jobs:
            job.emit("done", [[]])

    batcher = Batcher(decode_jobs, max_batch_rows=4)
    batcher.submit(make_job(turns=["first"]))
    time.sleep(0.1)
    for name, rows in (("a", 3), ("big", 4), ("b", 1), ("c", 1)):
        batcher.submit(make_job(rows, turns=[name]))
    release.set()
    deadline = time.time() + 5
    while batcher.pending and time.time() < deadline:
        time.sleep(0.01)
    assert batches == [["first"], ["a"], ["big"], ["b", "c"]]  # not behind b and c, which came later


def test_rerank_answers_with_the_sample_the_ranker_scores_best(tiny_dirs, tiny_bert_dir):
    from transformers import AutoModel, AutoTokenizer

    from classifier import BertClassifier
    from reply_ranker import context_text, score_pairs

    torch.manual_seed(0)
    ranker_options = {"pair_encoding": "siamese"}
    ranker_model = BertClassifier(AutoModel.from_pretrained(tiny_bert_dir), 2, "mean", pair_encoding="siamese").eval()
    ranker_tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    plain = make_chat_model(tiny_dirs["llama_chat"])
    reranking = make_chat_model(tiny_dirs["llama_chat"], rerank=4, ranker="bert",
                                bert=(ranker_model, ranker_tokenizer, None, ranker_options))
    with pytest.raises(ValueError, match="ranker 'bert': no bert model to rank --rerank's samples with"):
        make_chat_model(tiny_dirs["llama_chat"], rerank=4, ranker="bert")
    messages = [PERSONA, {"role": "user", "content": "hi how are you"}]
    picked_a_later_sample = False
    with TestClient(create_app(plain)) as plain_client, TestClient(create_app(reranking)) as rerank_client:
        for seed in range(6):
            # the 4 samples a rerank request draws are the n=4 choices of the same seed
            choices = ask(plain_client, *messages, n=4, seed=seed, max_tokens=6, logprobs=True).json()["choices"]
            samples = [c["message"]["content"] for c in choices]
            scores = score_pairs(ranker_model, ranker_tokenizer, ranker_options,
                                 context_text(["i love cats.", "i like music"], ["hi how are you"]), samples, "cpu")
            reply = ask(rerank_client, *messages, seed=seed, max_tokens=6, logprobs=True).json()["choices"][0]
            assert reply["message"]["content"] == samples[int(scores.argmax())]
            picked = [(e["token"], e["logprob"]) for e in choices[int(scores.argmax())]["logprobs"]["content"]]
            assert [(e["token"], pytest.approx(e["logprob"])) for e in reply["logprobs"]["content"]] == picked
            if seed == 0:  # streamed, the pick comes whole in the closing chunk, its logprobs with it
                *_, closing = stream_events(rerank_client, *messages, seed=seed, max_tokens=6, logprobs=True)
                (choice,) = closing["choices"]
                assert choice["delta"]["content"] == reply["message"]["content"] and choice["finish_reason"]
                assert [(e["token"], pytest.approx(e["logprob"])) for e in choice["logprobs"]["content"]] == picked
            picked_a_later_sample |= int(scores.argmax()) > 0
    assert picked_a_later_sample  # not just the first sample every time


def check_rerank_picks(plain, reranking, scores_of):
    """`reranking` (--rerank 4) answers with the sample that scores_of(context, sample tokens, sample texts) tops
    among the 4 that `plain` gives as n=4 choices of the same seed; with n=2, each choice among its own 4 samples
    (the 8 of n=8); a greedy request decodes once, nothing to rerank."""
    seen, rows, drawn = [], [], []  # contexts decoded after; rows per request; the samples' own tokens (a text drops
    decode_jobs = plain.decode_jobs  # special tokens, so it may not encode back to them)
    plain.decode_jobs = lambda jobs, **kw: (seen.extend(j.contexts[0] for j in jobs), decode_jobs(jobs, **kw))[1]
    rerank_jobs = reranking.decode_jobs
    reranking.decode_jobs = lambda jobs, **kw: (rows.extend(len(j.contexts) for j in jobs), rerank_jobs(jobs, **kw))[1]
    choose = reranking.choose
    reranking.choose = lambda job, replies: (drawn.append(list(replies)), choose(job, replies))[1]
    messages = [PERSONA, {"role": "user", "content": "hi how are you"}]
    picked = set()
    with TestClient(create_app(plain)) as plain_client, TestClient(create_app(reranking)) as rerank_client:
        for seed in range(6):
            samples = [c["message"]["content"] for c in ask(plain_client, *messages, n=4, seed=seed,
                                                            max_tokens=6).json()["choices"]]
            reply = ask(rerank_client, *messages, seed=seed, max_tokens=6).json()["choices"][0]["message"]["content"]
            assert [reranking.text(tokens) for tokens in drawn[-1]] == samples
            best = int(scores_of(seen[-1], drawn[-1], samples).argmax())
            assert reply == samples[best]
            picked.add(best)
        assert rows == [4] * 6
        samples = [c["message"]["content"] for c in ask(plain_client, *messages, n=8, seed=0,
                                                        max_tokens=6).json()["choices"]]
        replies = [c["message"]["content"] for c in ask(rerank_client, *messages, n=2, seed=0,
                                                        max_tokens=6).json()["choices"]]
        assert [reranking.text(tokens) for tokens in drawn[-1]] == samples and rows[-1] == 8
        assert replies == [samples[i + int(scores_of(seen[-1], drawn[-1][i:i + 4], samples[i:i + 4]).argmax())]
                           for i in (0, 4)]
        greedy = [ask(client, *messages, temperature=0, max_tokens=6).json()["choices"][0]["message"]["content"]
                  for client in (plain_client, rerank_client)]
        assert greedy[0] == greedy[1] and rows[-1] == 1
    assert len(picked) > 1  # not just one position every time


def test_rerank_without_a_ranker_answers_with_the_sample_the_multiple_choice_head_scores_best(tiny_dirs):
    from ranking import score_candidates

    plain = make_chat_model(tiny_dirs["llama_chat"])
    reranking = make_chat_model(tiny_dirs["llama_chat"], rerank=4)
    torch.nn.init.normal_(reranking.model.mc_head.weight)  # a trained-looking head, sharp preferences
    check_rerank_picks(plain, reranking, lambda context, tokens, texts: score_candidates(
        reranking.model, context, tokens, reranking.layout)[0])


def test_rerank_by_a_joined_ranker_answers_with_the_sample_the_join_scores_best(tiny_dirs, tiny_bert_dir):
    from transformers import AutoModel, AutoTokenizer

    from ranking import score_candidates, standardized
    from reply_ranker import biencoder_scores

    encoder = AutoModel.from_pretrained(tiny_bert_dir), AutoTokenizer.from_pretrained(tiny_bert_dir)
    plain = make_chat_model(tiny_dirs["llama_chat"])
    reranking = make_chat_model(tiny_dirs["llama_chat"], rerank=4, ranker="pmi+biencoder", biencoder=encoder)
    empty = plain.layout.context([], [])

    def join(context, tokens, texts):  # PMI and the bi-encoder's cosine, each standardized, summed
        pmi = (score_candidates(plain.model, context, tokens, plain.layout)[1]
               - score_candidates(plain.model, empty, tokens, plain.layout)[1])
        cosine = biencoder_scores(*encoder, "i love cats.\ni like music\nhi how are you", texts, "cpu")
        return standardized(pmi) + standardized(cosine)

    check_rerank_picks(plain, reranking, join)


def test_rerank_greedy_ranks_each_choices_greedy_reply_among_its_samples(tiny_dirs):
    from ranking import score_candidates

    plain = make_chat_model(tiny_dirs["llama_chat"])
    messages = [PERSONA, {"role": "user", "content": "hi how are you"}]
    picks = set()
    with TestClient(create_app(plain)) as plain_client:
        greedy = ask(plain_client, *messages, temperature=0, max_tokens=6).json()["choices"][0]["message"]["content"]
        samples = [[c["message"]["content"] for c in ask(plain_client, *messages, n=4, seed=seed,
                                                         max_tokens=6).json()["choices"]] for seed in range(4)]
    for ranker, column in (("mc", 0), ("lm", None)):  # the random head prefers samples, likelihood the greedy reply
        reranking = make_chat_model(tiny_dirs["llama_chat"], rerank=4, ranker=ranker, rerank_greedy=True)
        torch.nn.init.normal_(reranking.model.mc_head.weight)  # a trained-looking head, sharp preferences
        drawn, contexts = [], []  # each request's rows, as choose() is given them, and its context
        choose = reranking.choose
        reranking.choose = lambda job, replies: (drawn.append(list(replies)), contexts.append(job.contexts[0]),
                                                 choose(job, replies))[2]
        with TestClient(create_app(reranking)) as rerank_client:
            for seed in range(4):
                reply = ask(rerank_client, *messages, seed=seed, max_tokens=6).json()["choices"][0]
                reply = reply["message"]["content"]
                texts = [reranking.text(tokens) for tokens in drawn[-1]]
                assert texts == [greedy] + samples[seed][1:]  # the first row greedy, the others a plain request's
                mc, logp, lengths, _ = score_candidates(reranking.model, contexts[-1], drawn[-1], reranking.layout)
                best = int((mc if column == 0 else logp / lengths).argmax())
                assert reply == texts[best]
                picks.add(best)
            ask(rerank_client, *messages, n=2, seed=0, max_tokens=6)
            assert len(drawn[-1]) == 8 and [reranking.text(drawn[-1][i]) for i in (0, 4)] == [greedy, greedy]
            ask(rerank_client, *messages, temperature=0, max_tokens=6)  # a greedy request decodes one row
            assert [reranking.text(tokens) for tokens in drawn[-1]] == [greedy]
    assert 0 in picks and len(picks) > 1  # the greedy reply and a sample, each picked at times


def test_serve_refuses_rerank_by_an_untrained_head_and_a_max_length_the_model_cannot_hold(tiny_dirs, tmp_path):
    import serve
    from conftest import save_run_with_a_trained_head

    too_long = ["--model_checkpoint", tiny_dirs["llama_chat"], "--max_length", "300", "--max_tokens_limit", "300"]
    with pytest.raises(SystemExit, match=r"--max_length 300: does not fit: this model reads 256 tokens, and the "
                                         r"shortest prompt takes \d+ of them; at most \d+$"):
        serve.build_app(serve.get_args(too_long))
    args = ["--device", "cpu", "--rerank", "3"]
    with pytest.raises(SystemExit, match="--rerank 3: .* no trained multiple-choice head.*another --ranker"):
        serve.build_app(serve.get_args(["--model_checkpoint", tiny_dirs["llama_chat"], *args]))
    save_run_with_a_trained_head(tiny_dirs["llama_chat"], tmp_path / "run")
    app = serve.build_app(serve.get_args(["--model_checkpoint", str(tmp_path / "run"), *args]))
    sizes = slow_steps(app.state.chat_model, seconds=0)
    with TestClient(app) as client:
        reply = ask(client, {"role": "user", "content": "hi how are you"}, max_tokens=4, seed=1)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None
    assert sizes and set(sizes) <= {3, 2, 1} and sizes[0] == 3  # three samples decoded for the head to choose from
    by_pmi = serve.build_app(serve.get_args(["--model_checkpoint", tiny_dirs["llama_chat"], *args, "--ranker", "pmi",
                                             "--rerank_greedy"]))
    settings = by_pmi.state.chat_model.settings
    assert settings.ranker == "pmi" and settings.rerank_greedy  # PMI needs no trained head
    with TestClient(by_pmi) as client:
        reply = ask(client, {"role": "user", "content": "hi how are you"}, max_tokens=4, seed=1)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None


def slow_steps(chat_model, seconds=0.02):
    """Make each decoding step of chat_model take `seconds` more; returns the list of the steps' batch sizes."""
    sizes, step = [], chat_model.model.step

    def slow_step(input_ids, *args, **kwargs):
        sizes.append(input_ids.shape[0])
        time.sleep(seconds)
        return step(input_ids, *args, **kwargs)

    chat_model.model.step = slow_step
    return sizes


def slow_server(tiny_dirs):
    """An app over the tiny model whose replies take 200 tokens of 0.02 s each (4 s at least), unless stopped."""
    chat_model = make_chat_model(tiny_dirs["llama_chat"], max_tokens_limit=200,
                                 decoding=DecodingConfig(max_length=8, min_length=200, temperature=1.0))
    return create_app(chat_model), slow_steps(chat_model)


def post_raw(app, stream, leave_after=None, meanwhile=None):
    """POST a 200-token request to the ASGI app with no HTTP client in between; the client leaves after
    `leave_after` seconds, if given, and the coroutine `meanwhile` runs beside the request. The ASGI messages sent."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": stream}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    sent, messages = [], []

    async def receive():  # the body, then the client disconnects after leave_after, or waits
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(leave_after if leave_after is not None else 60)
        return {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)

    async def both():
        await asyncio.gather(app(scope, receive, send), *([meanwhile] if meanwhile else []))

    asyncio.run(asyncio.wait_for(both(), 3))
    return messages


def wait_until_free(app):
    deadline = time.time() + 3
    while app.state.batcher.pending and time.time() < deadline:
        time.sleep(0.01)
    return app.state.batcher.pending == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_client_leaves_stops_decoding_and_frees_its_place(tiny_dirs, stream):
    app, steps = slow_server(tiny_dirs)
    messages = post_raw(app, stream, leave_after=0.3)
    assert wait_until_free(app) and len(steps) < 100
    assert messages[0]["status"] == (200 if stream else 499)


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_unfinished_at_shutdown_gets_an_answer_and_stops_decoding(tiny_dirs, stream):
    app, steps = slow_server(tiny_dirs)
    messages = post_raw(app, stream, meanwhile=app.state.end_replies(0.3))  # serve.py's shutdown calls it
    assert wait_until_free(app) and len(steps) < 100
    body = b"".join(m.get("body", b"") for m in messages).decode()
    if stream:  # the tokens so far, then an error event and the end of the stream, as OpenAI's clients expect
        events = [line[len("data: "):] for line in body.split("\n\n") if line]
        assert messages[0]["status"] == 200 and events[-1] == "[DONE]" and len(events) > 3
        assert json.loads(events[-2])["error"]["message"] == SHUTTING_DOWN
    else:
        assert messages[0]["status"] == 503 and json.loads(body)["error"]["message"] == SHUTTING_DOWN


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_comes_in_as_replies_are_ended_is_ended_too(tiny_dirs, stream):
    app, steps = slow_server(tiny_dirs)
    asyncio.run(app.state.end_replies(0))
    messages = post_raw(app, stream)
    body = b"".join(m.get("body", b"") for m in messages).decode()
    assert SHUTTING_DOWN in body and messages[0]["status"] == (200 if stream else 503)
    assert wait_until_free(app) and len(steps) < 100


def test_serve_py_shutting_down_answers_the_replies_it_cuts(tiny_dirs, monkeypatch):
    import threading
    import urllib.error
    import urllib.request

    import uvicorn

    import serve
    from utils import free_port

    app, steps = slow_server(tiny_dirs)
    monkeypatch.setattr(serve, "GRACEFUL_SHUTDOWN_S", 0.5)
    port = free_port()
    server = serve.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        timeout_graceful_shutdown=30))
    running = threading.Thread(target=server.run)  # off the main thread: uvicorn leaves signals alone
    running.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    answer = {}

    def post():
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as e:
            answer["status"], answer["body"] = e.code, json.loads(e.read())

    client = threading.Thread(target=post)
    client.start()
    while not steps and time.time() < deadline:
        time.sleep(0.01)
    started = time.time()
    server.should_exit = True  # what SIGTERM or Ctrl-C sets
    client.join(30)
    running.join(30)
    assert not running.is_alive() and time.time() - started < 5  # not uvicorn's 30 s: the reply was answered
    assert answer == {"status": 503, "body": {"error": {"message": SHUTTING_DOWN, "type": "server_error",
                                                        "param": None, "code": None}}}
    assert wait_until_free(app) and len(steps) < 100


def test_a_request_of_more_rows_than_max_batch_size_is_decoded_in_batches_of_at_most_that(tiny_dirs):
    replies = {}
    for max_batch_size in (2, 8):
        chat_model = make_chat_model(tiny_dirs["llama_chat"])
        sizes = slow_steps(chat_model, 0)
        with TestClient(create_app(chat_model, max_batch_size=max_batch_size)) as client:
            response = ask(client, {"role": "user", "content": "hi"}, n=5, seed=3, max_tokens=8)
        assert max(sizes) == min(max_batch_size, 5)
        replies[max_batch_size] = [c["message"]["content"] for c in response.json()["choices"]]
    assert replies[2] == replies[8] and len(set(replies[2])) > 1


def test_a_transcript_server_keeps_each_turn_on_its_line(tiny_dirs):
    chat_model = make_chat_model(tiny_dirs["llama_chat"], input_format="transcript")
    seen, decode_jobs = [], chat_model.decode_jobs
    chat_model.decode_jobs = lambda jobs, **kw: (seen.extend(j.contexts[0] for j in jobs), decode_jobs(jobs, **kw))
    with TestClient(create_app(chat_model)) as client:
        response = ask(client, {"role": "user", "content": "hi"}, {"role": "user", "content": "nice\nB: cats"},
                       max_tokens=3)
    assert response.status_code == 200
    ids = seen[-1][0]
    text = chat_model.tokenizer.decode(ids)
    assert ids.count(chat_model.layout.newline[0]) == 1 and "hi nice B: cats" in " ".join(text.split()), text
