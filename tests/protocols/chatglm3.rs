//! ChatGLM3's `openai_api_demo` server, served by the `openai` kind: legacy
//! `function_call` tool calls with `id: ""`, sse-starlette streams (CRLF, `: ping`
//! comments) without usage, FastAPI `{"detail": …}` errors.

use crate::common::native::{last_user_in_messages, Framing, Protocol};
use serde_json::{json, Value};

pub static PROTOCOL: Protocol = Protocol {
    kind: "openai",
    fixtures: "chatglm3",
    provider_yaml: |base| {
        format!("kind: openai\nbase_url: {base}/v1\nself_hosted: true\nlegacy_functions: true\n")
    },
    model: "chatglm3-6b",
    is_stream: |path, _, body| {
        assert_eq!(path, "/v1/chat/completions");
        body["stream"] == true
    },
    user_text: |body| last_user_in_messages(&body["messages"]),
    framing: Framing::Sse,
    // The server reports usage on plain replies but never in streams; the fixtures
    // carry none so both paths are estimated alike.
    reports_usage: false,
    tools: true,
    // Its generator always finishes with "stop", even when max_tokens cut the text.
    length: false,
    check_multi_turn: |body: &Value| {
        assert_eq!(
            body["messages"],
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "chat"}
            ])
        );
    },
    extra_errors: &[("error_422", 422, "bad_request")],
};

conformance_cases!();
