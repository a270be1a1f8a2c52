"""Gateway keys through the official `openai` Python SDK: a good key, a bad
key, an expired key, no key and a route the key may not use (the gateway:
keyed_gateway.py).
"""

from __future__ import annotations

import openai
import pytest
from keyed_gateway import BAD, BASE, EXPIRED, GOOD, MESSAGES, TEXT, needs_keyed_gateway

pytestmark = needs_keyed_gateway


def client(key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=BASE, api_key=key, max_retries=0, timeout=20)


def assert_refusal(err: openai.APIStatusError, status: int, code: str, key: str) -> None:
    assert err.status_code == status, err.response.text
    body = err.response.json()
    e = body["error"]
    assert e["code"] == code, e
    # The request id is in the body, the header and the SDK's error alike.
    assert e["request_id"] == err.response.headers["x-request-id"]
    assert err.request_id == e["request_id"]
    assert err.code == code
    # Never the key, in any form the client sees.
    for text in (str(err), err.message, err.response.text, str(dict(err.response.headers))):
        assert key not in text, text


def test_good_key_is_served() -> None:
    with client(GOOD) as c:
        r = c.chat.completions.create(model="fake-chat", messages=MESSAGES)
    assert r.choices[0].message.content == TEXT


def test_good_key_streams() -> None:
    with client(GOOD) as c:
        stream = c.chat.completions.create(model="fake-chat", messages=MESSAGES, stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == TEXT


def test_good_key_embeds_and_lists_models() -> None:
    with client(GOOD) as c:
        e = c.embeddings.create(model="fake-emb", input=["a", "b"])
        assert len(e.data) == 2
        ids = [m.id for m in c.models.list()]
    assert "fake-chat" in ids


def test_bad_key_is_an_authentication_error() -> None:
    with client(BAD) as c, pytest.raises(openai.AuthenticationError) as ei:
        c.chat.completions.create(model="fake-chat", messages=MESSAGES)
    assert_refusal(ei.value, 401, "invalid_api_key", BAD)


def test_bad_key_stream_is_refused_before_it_starts() -> None:
    with client(BAD) as c, pytest.raises(openai.AuthenticationError) as ei:
        c.chat.completions.create(model="fake-chat", messages=MESSAGES, stream=True)
    assert_refusal(ei.value, 401, "invalid_api_key", BAD)


def test_no_bearer_key_is_missing() -> None:
    # Another scheme in place of `Bearer` carries no gateway key.
    with openai.OpenAI(
        base_url=BASE,
        api_key="unused",
        default_headers={"Authorization": "Basic dXNlcjpwYXNz"},
        max_retries=0,
        timeout=20,
    ) as c, pytest.raises(openai.AuthenticationError) as ei:
        c.chat.completions.create(model="fake-chat", messages=MESSAGES)
    assert_refusal(ei.value, 401, "missing_api_key", "dXNlcjpwYXNz")


def test_expired_key_is_refused() -> None:
    with client(EXPIRED) as c, pytest.raises(openai.AuthenticationError) as ei:
        c.chat.completions.create(model="fake-chat", messages=MESSAGES)
    assert_refusal(ei.value, 401, "key_expired", EXPIRED)
    assert "expired" in ei.value.message


def test_disallowed_route_is_permission_denied() -> None:
    with client(GOOD) as c, pytest.raises(openai.PermissionDeniedError) as ei:
        c.chat.completions.create(model="sandbox-echo", messages=MESSAGES)
    assert_refusal(ei.value, 403, "permission_denied", GOOD)
    assert "sandbox-echo" in ei.value.message
    assert "sdk-good" in ei.value.message
