"""The gateway's Anthropic front door driven by the official `anthropic` Python SDK.

Run through `scripts/test` (→ `cargo test --test sdk`): the Rust harness starts a
fake OpenAI-compatible upstream and the gateway in front of it, then runs this
suite with PROMPTGATE_BASE_URL pointing at the gateway's /v1. The Anthropic
client's base URL is the gateway root (the SDK appends /v1/messages). Route
names (the `model` sent) select the fake's behaviour; see tests/common/mod.rs.
"""

from __future__ import annotations

import os

import anthropic
import pytest

TEXT = "Hello from the fake upstream."
SYSTEM = "Be brief."
MESSAGES = [{"role": "user", "content": "Say hello."}]
SECRET = "sk-fake-SECRET-123456"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["c", "f"]},
        },
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def claude() -> anthropic.Anthropic:
    url = os.environ.get("PROMPTGATE_BASE_URL")
    if not url:
        pytest.fail(
            "PROMPTGATE_BASE_URL is not set: run this suite through `scripts/test` "
            "(cargo test --test sdk starts the gateway and sets it)"
        )
    root = url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    c = anthropic.Anthropic(base_url=root, api_key="test-key", max_retries=0, timeout=20)
    yield c
    c.close()


def create(claude: anthropic.Anthropic, model: str, **kw):
    kw.setdefault("max_tokens", 100)
    kw.setdefault("system", SYSTEM)
    kw.setdefault("messages", MESSAGES)
    return claude.messages.create(model=model, **kw)


# --- messages -------------------------------------------------------------------


def test_text_message(claude: anthropic.Anthropic) -> None:
    raw = claude.messages.with_raw_response.create(
        model="fake-chat", max_tokens=100, system=SYSTEM, messages=MESSAGES
    )
    assert raw.headers.get("x-request-id")
    assert raw.headers.get("x-promptgate-route") == "fake-chat"
    msg = raw.parse()
    assert isinstance(msg, anthropic.types.Message)
    assert msg.id.startswith("msg_")
    assert msg.role == "assistant"
    assert msg.model == "fake-chat"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == TEXT
    assert msg.stop_reason == "end_turn"
    # The upstream reported 12 prompt tokens, 4 of them cached.
    assert msg.usage.input_tokens == 8
    assert msg.usage.cache_read_input_tokens == 4
    assert msg.usage.output_tokens == 6


def test_content_blocks_and_sampling_parameters(claude: anthropic.Anthropic) -> None:
    msg = create(
        claude,
        "fake-chat",
        system=[{"type": "text", "text": SYSTEM}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
        stop_sequences=["END"],
        metadata={"user_id": "user-1"},
        # This SDK version has no sampling keywords; the API still takes them.
        extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 5},
    )
    assert msg.content[0].text == TEXT


# --- streaming ------------------------------------------------------------------


def test_stream_text_and_final_message(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="fake-chat", max_tokens=100, system=SYSTEM, messages=MESSAGES
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEXT
    assert final.content[0].type == "text"
    assert final.content[0].text == TEXT
    assert final.stop_reason == "end_turn"
    assert final.model == "fake-chat"
    assert final.usage.input_tokens == 12
    assert final.usage.output_tokens == 6


def test_raw_stream_event_order(claude: anthropic.Anthropic) -> None:
    events = list(create(claude, "fake-chat", stream=True))
    types = [e.type for e in events]
    assert types[0] == "message_start"
    assert types[1] == "content_block_start"
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[2:-3]) == {"content_block_delta"}


# --- tools ----------------------------------------------------------------------


def test_tool_call(claude: anthropic.Anthropic) -> None:
    msg = create(
        claude,
        "fake-tools",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "any"},
    )
    assert msg.stop_reason == "tool_use"
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert calls[0].input == {"city": "Paris", "unit": "c"}
    assert calls[0].id

    # Answer the call; the conversation continues on a text route.
    follow = create(
        claude,
        "fake-chat",
        tools=[WEATHER_TOOL],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": msg.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": calls[0].id, "content": "18C"}
                ],
            },
        ],
    )
    assert follow.content[0].text == TEXT


def test_streamed_tool_call(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="fake-tools",
        max_tokens=100,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
    ) as stream:
        final = stream.get_final_message()
    # The fake streams two parallel calls: each becomes its own tool_use block.
    calls = [b for b in final.content if b.type == "tool_use"]
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert calls[0].input == {"city": "Paris", "unit": "c"}
    assert calls[1].input == {}
    assert len({c.id for c in calls}) == 2
    assert final.stop_reason == "tool_use"
    assert final.usage.input_tokens == 40
    assert final.usage.output_tokens == 18


# --- errors ---------------------------------------------------------------------


def assert_error_shape(err: anthropic.APIStatusError, status: int, kind: str) -> None:
    assert err.status_code == status
    assert isinstance(err.body, dict), err.body
    assert err.body["type"] == "error"
    assert err.body["error"]["type"] == kind
    assert err.body["error"]["message"]
    assert err.body["request_id"] == err.response.headers.get("x-request-id")
    assert SECRET not in str(err.body)


def test_unknown_model_is_not_found(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as ei:
        create(claude, "no-such-route")
    assert_error_shape(ei.value, 404, "not_found_error")
    assert "no-such-route" in ei.value.body["error"]["message"]


def test_rate_limit(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.RateLimitError) as ei:
        create(claude, "fake-status-429")
    assert_error_shape(ei.value, 429, "rate_limit_error")
    assert ei.value.response.headers.get("retry-after") == "7"


@pytest.mark.parametrize("stream", [False, True])
def test_overloaded_backend_is_529(claude: anthropic.Anthropic, stream: bool) -> None:
    with pytest.raises(anthropic.APIStatusError) as ei:
        if stream:
            with claude.messages.stream(
                model="fake-status-500", max_tokens=100, messages=MESSAGES
            ) as s:
                s.get_final_message()
        else:
            create(claude, "fake-status-500")
    assert_error_shape(ei.value, 529, "overloaded_error")


def test_stream_cut_raises(claude: anthropic.Anthropic) -> None:
    received = []
    with pytest.raises(anthropic.APIError) as ei:
        with claude.messages.stream(
            model="fake-cut", max_tokens=100, messages=MESSAGES
        ) as stream:
            for piece in stream.text_stream:
                received.append(piece)
    assert "".join(received).startswith("Hello"), received
    assert SECRET not in str(ei.value)
