"""The official `openai` Python SDK over https, trusting a test CA: the gateway
started with a `tls` section by tests/http2.rs::openai_python_sdk_over_tls
(its base URL and CA file in the environment). Skipped without it (the other
SDK runs, whose gateways speak plain HTTP).
"""

from __future__ import annotations

import os
import ssl

import httpx
import openai
import pytest

BASE = os.environ.get("PROMPTGATE_TLS_BASE_URL", "")
CA = os.environ.get("PROMPTGATE_TLS_CA", "")

pytestmark = pytest.mark.skipif(
    not BASE, reason="needs the TLS gateway of tests/http2.rs::openai_python_sdk_over_tls"
)

MESSAGES = [{"role": "user", "content": "hello over tls"}]


def client(http2: bool) -> openai.OpenAI:
    trust = ssl.create_default_context(cafile=CA)
    http = httpx.Client(verify=trust, http2=http2, timeout=20)
    return openai.OpenAI(base_url=BASE, api_key="unused", max_retries=0, http_client=http)


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
def test_chat_stream_and_models(http2: bool) -> None:
    if http2:
        # httpx speaks HTTP/2 with the `h2` package (requirements-test.txt).
        pytest.importorskip("h2")
    with client(http2) as c:
        raw = c.chat.completions.with_raw_response.create(model="echo", messages=MESSAGES)
        assert raw.http_response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert raw.headers["x-request-id"]
        r = raw.parse()
        assert r.choices[0].message.content == "hello over tls"
        stream = c.chat.completions.create(model="slow", messages=MESSAGES, stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert text == "hello over tls"
        ids = [m.id for m in c.models.list()]
        assert "echo" in ids and "slow" in ids


def test_an_untrusted_certificate_is_refused() -> None:
    with openai.OpenAI(base_url=BASE, api_key="unused", max_retries=0, timeout=10) as c:
        with pytest.raises(openai.APIConnectionError):
            c.models.list()
