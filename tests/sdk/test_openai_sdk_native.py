"""The official openai SDK against backends that speak other formats.

The gateway's `native-*` routes lead to fakes answering in Anthropic's Messages
format, ChatGLM-6B's `api.py` format and ChatGLM3's OpenAI-style server (legacy
`function_call`). Each fake picks its answer from the last user message:
"chat" (text "Hello from the fake upstream.") or "tools" (a get_weather call).
"""

import json
import os

import openai
import pytest

TEXT = "Hello from the fake upstream."
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=os.environ["PROMPTGATE_BASE_URL"], api_key="test-key",
                         max_retries=0, timeout=20)


def messages(text):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


@pytest.mark.parametrize("route", ["native-anthropic", "native-chatglm", "native-chatglm3"])
def test_text(client, route):
    r = client.chat.completions.create(model=route, messages=messages("chat"))
    assert r.choices[0].message.content == TEXT
    assert r.choices[0].finish_reason == "stop"
    assert r.model == route
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0


@pytest.mark.parametrize("route", ["native-anthropic", "native-chatglm", "native-chatglm3"])
def test_stream(client, route):
    stream = client.chat.completions.create(model=route, messages=messages("chat"), stream=True,
                                            stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == TEXT
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0


@pytest.mark.parametrize("route", ["native-anthropic", "native-chatglm3"])
def test_tool_call(client, route):
    r = client.chat.completions.create(model=route, messages=messages("tools"), tools=TOOLS)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id
    assert r.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("route", ["native-anthropic", "native-chatglm3"])
def test_tool_call_stream(client, route):
    stream = client.chat.completions.create(model=route, messages=messages("tools"), tools=TOOLS, stream=True)
    name, args, finish = "", "", None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                name += tc.function.name or ""
                args += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert name == "get_weather"
    assert json.loads(args) == {"city": "Paris"}
    assert finish == "tool_calls"


def test_chatglm_6b_refuses_tools(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="native-chatglm", messages=messages("tools"), tools=TOOLS)
    assert e.value.body["code"] == "unsupported"
