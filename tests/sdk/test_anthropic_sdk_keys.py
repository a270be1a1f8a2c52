"""Gateway keys through the official `anthropic` Python SDK: the key as
`x-api-key` (api_key) and as a bearer token (auth_token); good, bad and
expired keys, and a route the key may not use (the gateway: keyed_gateway.py).
"""

from __future__ import annotations

import anthropic
import pytest
from keyed_gateway import BAD, BASE, EXPIRED, GOOD, MESSAGES, TEXT, needs_keyed_gateway

pytestmark = needs_keyed_gateway


def root() -> str:
    r = BASE.rstrip("/")
    return r[: -len("/v1")] if r.endswith("/v1") else r


def claude(api_key: str | None = None, auth_token: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=root(), api_key=api_key, auth_token=auth_token, max_retries=0, timeout=20
    )


def create(c: anthropic.Anthropic, model: str = "fake-chat", **kw):
    return c.messages.create(model=model, max_tokens=50, messages=MESSAGES, **kw)


def assert_refusal(err: anthropic.APIStatusError, status: int, kind: str, key: str) -> None:
    assert err.status_code == status, err.response.text
    assert err.body["type"] == "error"
    assert err.body["error"]["type"] == kind
    assert err.body["request_id"] == err.response.headers.get("x-request-id")
    for text in (str(err), err.message, err.response.text, str(dict(err.response.headers))):
        assert key not in text, text


@pytest.mark.parametrize("how", ["api_key", "auth_token"])
def test_good_key_is_served_in_either_header(how: str) -> None:
    with claude(**{how: GOOD}) as c:
        m = create(c)
    assert m.content[0].text == TEXT


def test_good_key_streams() -> None:
    with claude(api_key=GOOD) as c:
        with c.messages.stream(model="fake-chat", max_tokens=50, messages=MESSAGES) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
    assert text == TEXT
    assert final.stop_reason == "end_turn"


@pytest.mark.parametrize("how", ["api_key", "auth_token"])
def test_bad_key_is_an_authentication_error(how: str) -> None:
    with claude(**{how: BAD}) as c, pytest.raises(anthropic.AuthenticationError) as ei:
        create(c)
    assert_refusal(ei.value, 401, "authentication_error", BAD)
    assert "not valid" in ei.value.body["error"]["message"]


def test_bad_key_stream_is_refused_before_it_starts() -> None:
    with claude(api_key=BAD) as c, pytest.raises(anthropic.AuthenticationError) as ei:
        with c.messages.stream(model="fake-chat", max_tokens=50, messages=MESSAGES) as s:
            "".join(s.text_stream)
    assert_refusal(ei.value, 401, "authentication_error", BAD)


def test_expired_key_is_refused() -> None:
    with claude(api_key=EXPIRED) as c, pytest.raises(anthropic.AuthenticationError) as ei:
        create(c)
    assert_refusal(ei.value, 401, "authentication_error", EXPIRED)
    assert "expired" in ei.value.body["error"]["message"]


def test_disallowed_route_is_permission_denied() -> None:
    with claude(api_key=GOOD) as c, pytest.raises(anthropic.PermissionDeniedError) as ei:
        create(c, model="sandbox-echo")
    assert_refusal(ei.value, 403, "permission_error", GOOD)
    assert "sandbox-echo" in ei.value.body["error"]["message"]
