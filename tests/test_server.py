"""`corral serve` as clients see it: a live server on 127.0.0.1 with the demo model, driven by the
official openai client (sync, async, streaming), httpx and raw SSE bytes
(the checklist of shared/docs/openai-server.md §4.2)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import jsonschema
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess

import corral

API_KEY = "sk-corral-test"
MODEL = "corral-demo"
QUESTION = [{"role": "user", "content": "What does the file object do?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def server():
    # A small KV cache, so that a request's blocks show in kv_cache_usage_perc.
    s = ServerProcess("--kv-cache-bytes", "64M", "--max-body-bytes", "1M", api_key=API_KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as c:
        yield c


# vLLM's fields beyond OpenAI's, which the openai client sends in extra_body.
EXTENSIONS = ("ignore_eos", "min_tokens", "top_k", "min_p", "repetition_penalty", "stop_token_ids")


def chat(client, messages=QUESTION, **kwargs):
    """A chat completion, temperature 0 and 16 tokens unless told otherwise."""
    extra = {k: kwargs.pop(k) for k in EXTENSIONS if k in kwargs}
    kwargs = {"temperature": 0, "max_tokens": 16, **kwargs}
    kwargs["extra_body"] = {**kwargs.get("extra_body", {}), **extra}
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def sse_events(raw: bytes) -> list[bytes]:
    """The data of each event of a text/event-stream body (each `data: ...\\n\\n`)."""
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") for e in events), events
    return [e[len(b"data: "):] for e in events]


def metrics(http) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of /metrics."""
    text = http.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(http, name: str, **labels) -> float:
    labels.setdefault("model_name", MODEL)
    return metrics(http).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(condition, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# Replies and streams.


def test_models(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = http.get("/v1/models").json()["data"][0]
    assert card["object"] == "model" and card["max_model_len"] == 4096


def test_chat_stream_shape_and_equality(client):
    whole = chat(client, seed=1, max_tokens=24)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(chat(client, seed=1, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    finishes = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason] and chunks[-2].choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == choice.message.content


def test_raw_sse_bytes(http):
    body = {"messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": True, "n": 2}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and len(c["choices"]) == 1 for c in chunks)
    assert "usage" not in chunks[-1]  # not asked for
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [m["finish_reason"] is not None for m in mine] == [False] * (len(mine) - 1) + [True]


def test_completions_sync_stream_and_async(client, server):
    kwargs = dict(model=MODEL, prompt="The file object", max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 12
    streamed = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in streamed].count("length") == 1

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as aclient:
            return await aclient.completions.create(**kwargs)

    assert asyncio.run(run()).choices[0].text == whole.choices[0].text
    assert client.completions.create(**kwargs, echo=True).choices[0].text == "The file object" + whole.choices[0].text


def test_n_and_seed(client):
    first = chat(client, n=2, seed=7, temperature=1.0, max_tokens=12)
    again = chat(client, n=2, seed=7, temperature=1.0, max_tokens=12)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens <= 24

    # Two prompts, n = 2: choice 2k + j is sample j of prompt k.
    out = client.completions.create(model=MODEL, prompt=["The file", "A socket"], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text and out.choices[2].text == out.choices[3].text


def test_logprobs_shapes(client):
    reply = chat(client, logprobs=True, top_logprobs=3, max_tokens=6, ignore_eos=True)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # the most likely first
        assert bytes(entry.bytes) == entry.token.encode()
    assert "".join(e.token for e in content) == reply.choices[0].message.content

    legacy = client.completions.create(model=MODEL, prompt="The file object", max_tokens=5, logprobs=2, temperature=0)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(tok in top and len(top) <= 3 for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == legacy.choices[0].text


def test_stop_strings(client):
    text = chat(client, max_tokens=24, ignore_eos=True).choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = chat(client, max_tokens=24, ignore_eos=True, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.model_extra is not None and cut.choices[0].model_extra["stop_reason"] == stop
    streamed = chat(client, max_tokens=24, ignore_eos=True, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]


def test_unknown_fields_and_max_completion_tokens(client):
    reply = chat(client, max_tokens=openai.omit, max_completion_tokens=5, ignore_eos=True, user="u1",
                 parallel_tool_calls=True, extra_body={"some_future_field": {"x": 1}, "min_tokens": 2})
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"


def test_concurrent_streams_match_solo(client, server):
    prompts = [[{"role": "user", "content": f"Question {i}: what is module number {i * 7}?"}] for i in range(16)]
    solo = [chat(client, messages=p, max_tokens=20).choices[0].message.content for p in prompts]

    async def stream(aclient, messages):
        chunks = await aclient.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=20, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(stream(aclient, p) for p in prompts))

    assert asyncio.run(run()) == solo


# Disconnects free the engine at once.


def test_disconnect_mid_stream_aborts(http):
    baseline = metric(http, "corral:kv_cache_usage_perc")
    disconnects = metric(http, "corral:http_requests_client_disconnected_total")
    body = {"prompt": "The file object", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(http, "corral:num_requests_running") == 1
        assert metric(http, "corral:kv_cache_usage_perc") > baseline
    # The client has closed the connection.
    assert wait_for(lambda: metric(http, "corral:num_requests_running") == 0)
    assert wait_for(lambda: metric(http, "corral:kv_cache_usage_perc") == baseline)
    assert wait_for(lambda: metric(http, "corral:http_requests_client_disconnected_total") == disconnects + 1)


def test_disconnect_while_waiting_for_a_whole_reply_aborts(server, http):
    body = {"messages": QUESTION, "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=0.5)
    assert wait_for(lambda: metric(http, "corral:num_requests_running") == 0)
    assert metric(http, "corral:kv_cache_usage_perc") == 0.0


# Bad requests: 4xx in OpenAI's error shape, never 422 or 500.

CHAT = {"messages": QUESTION, "max_tokens": 4}
BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", b"[1, 2]", 400),
    ("/v1/chat/completions", b'"hello"', 400),
    ("/v1/chat/completions", b"", 400),
    ("/v1/chat/completions", {"messages": "hi"}, 400),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400),
    ("/v1/chat/completions", {**CHAT, "n": 2**31 - 1}, 400),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, 400),
    ("/v1/chat/completions", {**CHAT, "top_p": 2}, 400),
    ("/v1/chat/completions", {**CHAT, "seed": "abc"}, 400),
    ("/v1/chat/completions", {**CHAT, "stop_token_ids": [-1]}, 400),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 10}}, 400),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, 400),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400),
    ("/v1/chat/completions", {**CHAT, "tools": []}, 400),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404),
    ("/v1/completions", {}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": [[]]}, 400),
    ("/v1/completions", {"prompt": [10**9]}, 400),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400),
    ("/tokenize", {}, 400),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404),
    ("/detokenize", {"tokens": [-1]}, 400),
    ("/detokenize", {"tokens": "abc"}, 400),
]


@pytest.mark.parametrize("path, body, status", BAD_REQUESTS, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD_REQUESTS)])
def test_bad_requests(http, path, body, status):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and isinstance(error["message"], str) and error["message"]
    if status == 404 and "model" in body:
        assert error["message"] == f"The model `{body['model']}` does not exist."
    assert http.get("/health").status_code == 200


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_FUZZED_FIELDS = ("model", "n", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "logprobs", "top_logprobs",
                  "stream", "stream_options", "response_format", "tools", "tool_choice", "stop_token_ids", "min_tokens",
                  "presence_penalty", "repetition_penalty", "logit_bias", "echo", "structured_outputs")


@settings(max_examples=40, deadline=None)
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    body=st.fixed_dictionaries(
        # A tiny budget (or a wrong one): whatever the rest, no request runs long.
        {"max_tokens": st.sampled_from([1, 2, 0, -1, "2"]), "messages": st.just(QUESTION) | _JSON,
         "prompt": st.just("The file") | _JSON},
        optional={k: _JSON for k in _FUZZED_FIELDS},
    ),
)
def test_fuzzed_requests_never_fail_the_server(http, path, body):
    r = http.post(path, json=body)
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        assert r.json()["error"]["code"] == r.status_code


def test_unknown_route_method_and_huge_body(http):
    assert http.get("/v1/nothing").status_code == 404
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405
    r = http.post("/v1/completions", content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    assert http.get("/health").status_code == 200


def test_context_length_errors(client, http):
    long_prompt = "file object " * 2100
    n = http.post("/tokenize", json={"prompt": long_prompt}).json()["count"]
    assert n > 4096
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    assert e.value.body["message"] == (
        f"This model's maximum context length is 4096 tokens. However, your request has {n} input tokens. "
        "Please reduce the length of the input messages."
    )
    m = http.post("/tokenize", json={"messages": QUESTION}).json()["count"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=5000)
    assert e.value.status_code == 400 and e.value.body["message"] == (
        f"'max_tokens' or 'max_completion_tokens' is too large: 5000. This model's maximum context length is 4096 "
        f"tokens and your request has {m} input tokens (5000 > 4096 - {m})."
    )


def test_serve_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "corral", "serve", str(tmp_path / "missing")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == f"corral: error: model folder {tmp_path / 'missing'} does not exist"


# API keys and CORS.


def test_api_keys_and_cors(server):
    url = f"{server.url}/v1/models"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(url, headers={"X-Api-Key": API_KEY}).status_code == 200
    r = httpx.get(url)
    assert r.json()["error"]["code"] == 401
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    preflight = httpx.options(url, headers={"Origin": "https://example.com", "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"


# Metrics, tokenize.


def test_metrics_names_and_counters(client, http):
    names = {name for name, _ in metrics(http)}
    for name in (
        "corral:num_requests_running", "corral:num_requests_waiting", "corral:kv_cache_usage_perc",
        "corral:prompt_tokens_total", "corral:generation_tokens_total", "corral:time_to_first_token_seconds_bucket",
        "corral:inter_token_latency_seconds_count", "corral:e2e_request_latency_seconds_sum",
        "corral:http_requests_client_disconnected_total", "corral:num_preemptions_total", "http_requests_total",
        "http_request_duration_seconds_count",
    ):
        assert name in names, name
    before = metrics(http)
    reply = chat(client, max_tokens=7, ignore_eos=True)
    http_key = ("http_requests_total", (("handler", "/v1/chat/completions"), ("method", "POST"), ("status", "200")))
    after = {}

    def counted():  # the HTTP counter moves once the reply is sent, maybe after the client has it
        after.update(metrics(http))
        return after[http_key] - before.get(http_key, 0) == 1

    assert wait_for(counted)

    def grew(name, **labels):
        key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("corral:prompt_tokens_total") == reply.usage.prompt_tokens
    assert grew("corral:generation_tokens_total") == 7
    assert grew("corral:request_success_total", finished_reason="length") == 1
    assert grew("corral:time_to_first_token_seconds_count") == 1
    assert grew("corral:inter_token_latency_seconds_count") == 6
    assert grew("corral:e2e_request_latency_seconds_count") == 1


def test_tokenize_matches_the_chat_prompt(client, http):
    tokenizer = corral.Tokenizer(corral.demo_model_path())
    expected = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    out = http.post("/tokenize", json={"messages": QUESTION}).json()
    assert out["tokens"] == expected and out["count"] == len(expected) and out["max_model_len"] == 4096
    assert chat(client, max_tokens=1).usage.prompt_tokens == len(expected)
    with_tools = http.post("/tokenize", json={"messages": QUESTION, "tools": [WEATHER_TOOL]}).json()
    assert with_tools["count"] > len(expected)
    assert chat(client, max_tokens=1, tools=[WEATHER_TOOL], tool_choice="none").usage.prompt_tokens == with_tools["count"]

    text = "The file object"
    ids = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert ids == tokenizer.encode(text)
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == tokenizer.decode(ids)


# Tool calls and structured output (constrained decoding: the demo model was never trained on either).


def _check_call(call, tool=WEATHER_TOOL):
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call(client, tool_choice):
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    reply = chat(client, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL, other],
                 tool_choice=tool_choice, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_call(call, WEATHER_TOOL if call.function.name == "get_weather" else other)


def test_forced_tool_call_streams(client):
    kwargs = dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60)
    whole = chat(client, **kwargs).choices[0].message.tool_calls[0]
    chunks = list(chat(client, stream=True, **kwargs))
    deltas = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    # id and name first (arguments ""), then argument fragments only.
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].index == 0
    assert deltas[0].function.arguments == "" and len(deltas) >= 2
    assert all(d.id is None and d.function.name is None and d.index == 0 for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments) == json.loads(whole.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_result_round_trip(client, http):
    call = {"id": "chatcmpl-tool-1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 1})}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": json.dumps({"forecast": "sunny"})},
    ]
    reply = chat(client, messages=messages, tools=[WEATHER_TOOL], max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The prompt is the template's rendering with the call's arguments as a dict (as transformers
    # takes them), the tool result included.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(corral.demo_model_path())
    as_dicts = [messages[0], {**messages[1], "tool_calls": [{**call, "function": {"name": "get_weather",
                "arguments": {"city": "Paris", "days": 1}}}]}, messages[2]]
    expected = hf.apply_chat_template(as_dicts, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True)
    assert "<|header_start|>ipython<|header_end|>" in expected and "sunny" in expected and '"city": "Paris"' in expected
    tokens = http.post("/tokenize", json={"messages": messages, "tools": [WEATHER_TOOL]}).json()["tokens"]
    assert tokens == hf.encode(expected, add_special_tokens=False)
    assert reply.usage.prompt_tokens == len(tokens)


def test_response_format_json_schema_and_object(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "size": {"type": "integer"},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
        "required": ["name", "size", "tags"],
        "additionalProperties": False,
    }
    reply = chat(client, max_tokens=120, response_format={
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)

    reply = chat(client, max_tokens=120, temperature=0.8, seed=3, n=2, response_format={"type": "json_object"})
    for choice in reply.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)

    with pytest.raises(openai.BadRequestError):
        chat(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})


# Admission and shutdown (servers of their own).


def test_admission_limit_then_sigterm_drain():
    server = ServerProcess("--max-pending", "1", "--shutdown-timeout", "60")
    try:
        body = {"prompt": "The file object", "max_tokens": 1500, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as long:
            lines = long.iter_lines()
            next(lines)  # the first chunk: the request is in flight

            busy = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0).completions.create(
                    model=MODEL, prompt="x", max_tokens=2)

            server.terminate()
            assert wait_for(lambda: httpx.get(f"{server.url}/health").status_code == 503)
            refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == 503

            rest = [line for line in lines if line]
        chunks = [json.loads(line[len("data: "):]) for line in rest[:-1]]
        assert rest[-1] == "data: [DONE]"
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 1500
        assert server.wait(30) == 0
    finally:
        server.stop()


def test_sigterm_past_the_timeout_aborts():
    server = ServerProcess("--shutdown-timeout", "0.2")
    try:
        body = {"messages": QUESTION, "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            server.terminate()
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest[:-1]]
        assert [f for f in finishes if f] == ["abort"]
        assert server.wait(30) == 0
    finally:
        server.stop()
