"""Responses that used retrieval, read through the official `openai` SDK.

The harness (tests/sdk.rs) configures retriever `kb`, an `http` retriever over
a loopback service that always answers two passages (policy.md#p1 at 0.9 and
billing.md#p2 at 0.6). The gateway adds `promptgate.citations` to the body of
a chat completion and to the stream chunk that carries the finish reason; the
SDK must parse both and expose the extra member through `model_extra` and
`to_dict()`.
"""

import os

import openai
import pytest

CITATIONS = [
    {"retriever": "kb", "source": "policy.md", "chunk_id": "p1", "score": 0.9},
    {"retriever": "kb", "source": "billing.md", "chunk_id": "p2", "score": 0.6},
]
MESSAGES = [{"role": "user", "content": "How do refunds work?"}]
RETRIEVAL = {"retrieval": {"retriever": "kb"}}


@pytest.fixture(scope="module")
def client():
    c = openai.OpenAI(base_url=os.environ["PROMPTGATE_BASE_URL"], api_key="test-key",
                      max_retries=0, timeout=20)
    yield c
    c.close()


def test_citations_in_a_completion(client):
    raw = client.chat.completions.with_raw_response.create(
        model="sandbox-echo", messages=MESSAGES, extra_body=RETRIEVAL
    )
    assert raw.status_code == 200
    assert raw.headers.get("x-promptgate-retrieval") == "kb=2"
    c = raw.parse()
    assert c.object == "chat.completion"
    assert c.choices[0].message.content == "How do refunds work?"
    assert c.model_extra["promptgate"]["citations"] == CITATIONS
    assert c.to_dict()["promptgate"]["citations"] == CITATIONS


def test_citations_in_the_final_stream_chunk(client):
    stream = client.chat.completions.create(
        model="sandbox-echo", messages=MESSAGES, stream=True, extra_body=RETRIEVAL
    )
    text = []
    cited = []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for ch in chunk.choices:
            text.append(ch.delta.content or "")
        extra = (chunk.model_extra or {}).get("promptgate")
        if extra is not None:
            assert chunk.choices and chunk.choices[0].finish_reason is not None
            cited.append(extra["citations"])
            assert chunk.to_dict()["promptgate"]["citations"] == CITATIONS
    assert "".join(text) == "How do refunds work?"
    assert cited == [CITATIONS]


def test_a_failed_retrieval_is_an_api_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="sandbox-echo", messages=MESSAGES,
            extra_body={"retrieval": {"retriever": "kb", "filter": [1]}},
        )
    assert e.value.body["param"] == "retrieval.filter"
