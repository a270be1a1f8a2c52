"""The gateway driven by the official `openai` Python SDK.

Run through `scripts/test` (→ `cargo test --test sdk`): the Rust harness starts a
fake OpenAI-compatible upstream and the gateway in front of it, then runs this
suite with PROMPTGATE_BASE_URL pointing at the gateway's /v1. Route names (the
`model` sent) select the fake's behaviour; see tests/common/mod.rs.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import openai
import pytest

TEXT = "Hello from the fake upstream."
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello."},
]
SECRET = "sk-fake-SECRET-123456"
EMBEDDINGS = [
    [0.0023064255, -0.009327292, 0.015797347, -0.0077780345],
    [0.5, -0.25, 0.125, 1.0],
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture(scope="session")
def base_url() -> str:
    url = os.environ.get("PROMPTGATE_BASE_URL")
    if not url:
        pytest.fail(
            "PROMPTGATE_BASE_URL is not set: run this suite through `scripts/test` "
            "(cargo test --test sdk starts the gateway and sets it)"
        )
    return url.rstrip("/")


@pytest.fixture(scope="session")
def client(base_url: str) -> openai.OpenAI:
    c = openai.OpenAI(base_url=base_url, api_key="test-key", max_retries=0, timeout=20)
    yield c
    c.close()


# --- helpers ---------------------------------------------------------------------


def assert_gateway_headers(headers) -> None:
    """Every gateway response carries a request id and its overhead in µs."""
    assert headers.get("x-request-id"), f"no x-request-id in {dict(headers)}"
    overhead = headers.get("x-promptgate-overhead-us")
    assert overhead is not None, f"no x-promptgate-overhead-us in {dict(headers)}"
    assert overhead.isdigit(), f"x-promptgate-overhead-us is not an integer: {overhead!r}"


def assert_error_envelope(err: openai.APIStatusError, status: int) -> dict:
    """Checks the status and the OpenAI error shape; returns the `error` object."""
    assert err.status_code == status, f"expected {status}, got {err.status_code}: {err.response.text}"
    assert_gateway_headers(err.response.headers)
    body = err.response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    e = body["error"]
    for field in ("message", "type", "param", "code", "request_id"):
        assert field in e, f"error object lacks {field!r}: {e}"
    assert isinstance(e["message"], str) and e["message"], e
    assert isinstance(e["type"], str) and e["type"], e
    assert e["request_id"] == err.response.headers["x-request-id"], (
        f"error.request_id {e['request_id']!r} != x-request-id "
        f"{err.response.headers['x-request-id']!r}"
    )
    # The SDK exposes the same id and fields.
    assert err.request_id == e["request_id"]
    assert err.code == e["code"]
    return e


def post_raw(url: str, data: bytes, content_type: str = "application/json"):
    """A raw POST (for bodies the SDK cannot produce); returns (status, headers, body)."""
    req = urllib.request.Request(
        url,
        data=data,
        method="POST",
        headers={"content-type": content_type, "authorization": "Bearer test-key"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=20) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


# --- chat completions ------------------------------------------------------------


def test_chat_non_streaming(client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(model="fake-chat", messages=MESSAGES)
    assert raw.status_code == 200
    assert_gateway_headers(raw.headers)
    assert raw.headers.get("x-promptgate-usage") == "reported"
    c = raw.parse()
    assert c.object == "chat.completion"
    assert c.model == "fake-chat"
    assert len(c.choices) == 1
    choice = c.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == TEXT
    assert choice.finish_reason == "stop"
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (12, 6, 18)


def test_chat_stream(client: openai.OpenAI):
    stream = client.chat.completions.create(model="fake-chat", messages=MESSAGES, stream=True)
    text = []
    finish = []
    chunks = 0
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == "fake-chat"
        for ch in chunk.choices:
            assert ch.index == 0
            if ch.delta.content:
                text.append(ch.delta.content)
            if ch.finish_reason is not None:
                finish.append(ch.finish_reason)
    assert "".join(text) == TEXT
    assert len([t for t in text if t]) > 1, f"expected word-by-word chunks, got {text}"
    assert finish and finish[-1] == "stop", finish
    assert chunks > 2


def test_chat_stream_headers(client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(
        model="fake-chat", messages=MESSAGES, stream=True
    )
    assert raw.status_code == 200
    assert_gateway_headers(raw.headers)
    assert raw.headers.get("content-type", "").startswith("text/event-stream")
    text = "".join(
        ch.delta.content or "" for chunk in raw.parse() for ch in chunk.choices
    )
    assert text == TEXT


def test_chat_stream_include_usage(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model="fake-chat",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks, "empty stream"
    last = chunks[-1]
    assert last.choices == [], f"final chunk should have no choices: {last}"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (12, 6, 18)
    for c in chunks[:-1]:
        assert c.usage is None, f"usage before the final chunk: {c}"
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == TEXT
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["stop"]


def test_usage_estimated_when_upstream_reports_none(client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(model="fake-nousage", messages=MESSAGES)
    assert raw.status_code == 200
    assert raw.headers.get("x-promptgate-usage") == "estimated"
    c = raw.parse()
    assert c.choices[0].message.content == TEXT
    u = c.usage
    assert u is not None, "the gateway should estimate usage when the upstream gives none"
    assert u.prompt_tokens > 0
    assert u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_usage_estimated_in_stream(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model="fake-nousage",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == [], f"final chunk should have no choices: {last}"
    assert last.usage is not None
    assert last.usage.prompt_tokens > 0 and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == TEXT


def test_tool_calls_non_streaming(client: openai.OpenAI):
    c = client.chat.completions.create(
        model="fake-tools",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
    )
    choice = c.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1, calls
    call = calls[0]
    assert call.type == "function"
    assert call.id == "call_weather_1"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (40, 18, 58)


def test_tool_calls_streaming(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model="fake-tools",
        messages=[{"role": "user", "content": "Weather and time in Paris?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        stream=True,
    )
    calls: dict[int, dict] = {}
    finish = []
    arg_deltas = 0
    for chunk in stream:
        for ch in chunk.choices:
            if ch.finish_reason is not None:
                finish.append(ch.finish_reason)
            for tc in ch.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    slot["id"] = tc.id
                if tc.function is not None:
                    if tc.function.name:
                        slot["name"] += tc.function.name
                    if tc.function.arguments:
                        slot["arguments"] += tc.function.arguments
                        arg_deltas += 1
    assert sorted(calls) == [0, 1], calls
    assert calls[0]["id"] == "call_weather_1"
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert calls[1]["id"] == "call_time_2"
    assert calls[1]["name"] == "get_time"
    assert json.loads(calls[1]["arguments"]) == {}
    assert arg_deltas >= 3, "arguments should arrive as several deltas"
    assert finish and finish[-1] == "tool_calls", finish


def test_tool_results_round_trip(client: openai.OpenAI):
    """A follow-up turn carrying the assistant's tool call and the tool's result."""
    c = client.chat.completions.create(
        model="fake-chat",
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_weather_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_weather_1", "content": '{"temp": 18}'},
        ],
        tools=[WEATHER_TOOL],
    )
    assert c.choices[0].message.content == TEXT


def test_json_mode(client: openai.OpenAI):
    c = client.chat.completions.create(
        model="fake-json",
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_object"},
    )
    assert json.loads(c.choices[0].message.content) == {"answer": 42, "unit": "none"}
    assert c.choices[0].finish_reason == "stop"


def test_sandbox_echo(client: openai.OpenAI):
    c = client.chat.completions.create(
        model="sandbox-echo",
        messages=[
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "echo me please"},
        ],
    )
    assert c.model == "sandbox-echo"
    assert c.choices[0].message.content == "echo me please"
    assert c.choices[0].finish_reason == "stop"
    assert c.usage is not None and c.usage.total_tokens > 0


def test_sandbox_echo_stream(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model="sandbox-echo",
        messages=[{"role": "user", "content": "stream this back to me"}],
        stream=True,
    )
    chunks = list(stream)
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == "stream this back to me"
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["stop"]


def test_sandbox_json_mode(client: openai.OpenAI):
    c = client.chat.completions.create(
        model="sandbox-echo",
        messages=[{"role": "user", "content": 'say "hi"'}],
        response_format={"type": "json_object"},
    )
    assert json.loads(c.choices[0].message.content) == {"echo": 'say "hi"'}


def test_extra_body_passthrough(client: openai.OpenAI):
    """Unknown fields reach the upstream untouched (asserted on the fake's log by
    tests/sdk.rs after this suite)."""
    c = client.chat.completions.create(
        model="fake-chat",
        messages=MESSAGES,
        extra_body={"top_k": 5, "vendor_flag": True},
    )
    assert c.choices[0].message.content == TEXT


def test_client_request_id_is_echoed(client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(
        model="fake-chat", messages=MESSAGES, extra_headers={"x-request-id": "sdk-test-id-42"}
    )
    assert raw.headers["x-request-id"] == "sdk-test-id-42"
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(
            model="no-such-model", messages=MESSAGES, extra_headers={"x-request-id": "sdk-test-id-43"}
        )
    e = assert_error_envelope(ei.value, 404)
    assert e["request_id"] == "sdk-test-id-43"


# --- embeddings ------------------------------------------------------------------


def assert_vectors(got, want, tol=1e-6):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(g) == len(w), (g, w)
        for a, b in zip(g, w):
            assert abs(a - b) <= tol, (g, w)


def test_embeddings_default_encoding(client: openai.OpenAI):
    # The SDK asks for base64 unless told otherwise and decodes it back to floats.
    raw = client.embeddings.with_raw_response.create(model="fake-chat", input=["one", "two"])
    assert raw.status_code == 200
    assert_gateway_headers(raw.headers)
    wire = json.loads(raw.text)
    assert all(isinstance(d["embedding"], str) for d in wire["data"]), (
        "encoding_format=base64 was asked: the embeddings should be base64 strings"
    )
    r = raw.parse()
    assert r.object == "list"
    assert [d.index for d in r.data] == [0, 1]
    assert_vectors([d.embedding for d in r.data], EMBEDDINGS)
    assert r.usage.prompt_tokens == 8 and r.usage.total_tokens == 8


def test_embeddings_float(client: openai.OpenAI):
    raw = client.embeddings.with_raw_response.create(
        model="fake-chat", input=["one", "two"], encoding_format="float"
    )
    wire = json.loads(raw.text)
    assert all(isinstance(d["embedding"], list) for d in wire["data"])
    r = raw.parse()
    assert [d.index for d in r.data] == [0, 1]
    assert_vectors([d.embedding for d in r.data], EMBEDDINGS)


def test_sandbox_embeddings(client: openai.OpenAI):
    a = client.embeddings.create(model="sandbox-echo", input="hello world", encoding_format="float")
    b = client.embeddings.create(model="sandbox-echo", input="hello world", encoding_format="float")
    c = client.embeddings.create(model="sandbox-echo", input="something else", encoding_format="float")
    va, vb, vc = a.data[0].embedding, b.data[0].embedding, c.data[0].embedding
    assert len(va) == 16
    assert va == vb, "same input, same vector"
    assert va != vc, "different inputs should give different vectors"
    # base64 (the SDK default) decodes to the same vector.
    d = client.embeddings.create(model="sandbox-echo", input="hello world")
    assert_vectors([d.data[0].embedding], [va])
    # A batch keeps order.
    batch = client.embeddings.create(
        model="sandbox-echo", input=["something else", "hello world"], encoding_format="float"
    )
    assert [x.index for x in batch.data] == [0, 1]
    assert_vectors([x.embedding for x in batch.data], [vc, va])


# --- models ----------------------------------------------------------------------


def test_models_list(client: openai.OpenAI):
    ids = [m.id for m in client.models.list()]
    for name in ("fake-chat", "fake-tools", "fake-json", "sandbox-echo"):
        assert name in ids, f"{name} not in {ids}"
    m = client.models.retrieve("fake-chat")
    assert m.id == "fake-chat"
    with pytest.raises(openai.NotFoundError) as ei:
        client.models.retrieve("no-such-model")
    assert_error_envelope(ei.value, 404)


# --- errors ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model(client: openai.OpenAI, stream: bool):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, stream=stream)
    e = assert_error_envelope(ei.value, 404)
    assert e["code"] == "model_not_found"
    assert "fake-chat" in e["message"] and "sandbox-echo" in e["message"], (
        f"the message should list the available models: {e['message']}"
    )


def test_missing_messages(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as ei:
        client.post("/chat/completions", body={"model": "fake-chat"}, cast_to=object)
    e = assert_error_envelope(ei.value, 400)
    assert e["param"] == "messages"
    assert ei.value.param == "messages"


def test_messages_of_wrong_type(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as ei:
        client.post("/chat/completions", body={"model": "fake-chat", "messages": "hi"}, cast_to=object)
    e = assert_error_envelope(ei.value, 400)
    assert e["param"] == "messages"


def test_malformed_json_body(base_url: str):
    status, headers, body = post_raw(base_url + "/chat/completions", b'{"model": "fake-chat", "messages": [')
    assert status == 400, body
    e = json.loads(body)["error"]
    assert e["request_id"] == headers["x-request-id"]
    assert headers.get("x-promptgate-overhead-us")


@pytest.mark.parametrize("stream", [False, True])
def test_rate_limited(client: openai.OpenAI, stream: bool):
    with pytest.raises(openai.RateLimitError) as ei:
        client.chat.completions.create(model="fake-status-429", messages=MESSAGES, stream=stream)
    assert_error_envelope(ei.value, 429)
    assert ei.value.response.headers.get("retry-after") == "7"


@pytest.mark.parametrize("model", ["fake-status-500", "fake-status-503", "fake-error-in-200"])
def test_upstream_server_errors_become_503(client: openai.OpenAI, model: str):
    with pytest.raises(openai.InternalServerError) as ei:
        client.chat.completions.create(model=model, messages=MESSAGES)
    assert_error_envelope(ei.value, 503)


def test_upstream_auth_failure_is_redacted(client: openai.OpenAI):
    with pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(model="fake-status-401", messages=MESSAGES)
    err = ei.value
    # Not the client's credentials that failed: a 502, not a 401.
    assert not isinstance(err, openai.AuthenticationError)
    e = assert_error_envelope(err, 502)
    assert SECRET not in str(err)
    assert SECRET not in err.message
    assert SECRET not in err.response.text
    assert SECRET not in json.dumps(e)
    assert "SECRET" not in err.response.text


def test_context_length_exceeded(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="fake-status-400-context", messages=MESSAGES)
    e = assert_error_envelope(ei.value, 400)
    assert e["code"] == "context_length_exceeded"
    assert ei.value.code == "context_length_exceeded"


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_hang_times_out(client: openai.OpenAI, stream: bool):
    with pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(model="fake-hang", messages=MESSAGES, stream=stream)
    assert_error_envelope(ei.value, 504)


def test_provider_without_key(client: openai.OpenAI):
    with pytest.raises(openai.InternalServerError) as ei:
        client.chat.completions.create(model="needs-key", messages=MESSAGES)
    e = assert_error_envelope(ei.value, 503)
    assert e["code"] == "provider_unavailable"


@pytest.mark.parametrize(
    "model,code",
    [
        ("fake-cut", "malformed_response"),  # upstream connection cut mid-stream
        ("fake-garbage", "malformed_response"),  # invalid JSON after the stream began
        ("fake-stream-error", "overloaded"),  # upstream error event mid-stream
    ],
)
def test_broken_stream_raises(client: openai.OpenAI, model: str, code: str):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, stream=True)
    assert raw.status_code == 200  # the fault comes after the stream began
    got = []
    with pytest.raises(openai.APIError) as ei:
        for chunk in raw.parse():
            got.extend(ch.delta.content or "" for ch in chunk.choices)
    # The text before the fault was delivered, and it was not the whole reply.
    text = "".join(got)
    assert text and TEXT.startswith(text) and text != TEXT, got
    # The gateway reports the fault as an error event in the OpenAI shape.
    body = ei.value.body
    assert isinstance(body, dict), f"expected an error event, got {ei.value!r}"
    assert body.get("code") == code, body
    assert body.get("request_id") == raw.headers["x-request-id"], body
    assert ei.value.message


def test_oversized_body(client: openai.OpenAI):
    with pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(
            model="fake-chat", messages=[{"role": "user", "content": "x" * 70_000}]
        )
    e = assert_error_envelope(ei.value, 413)
    assert e["code"] == "payload_too_large"


def test_unknown_endpoint(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as ei:
        client.post("/no/such/endpoint", body={}, cast_to=object)
    assert_error_envelope(ei.value, 404)
