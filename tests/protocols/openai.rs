//! OpenAI-compatible backends (the `openai` kind).

use crate::common::native::{last_user_in_messages, Framing, Protocol};
use serde_json::{json, Value};

pub static PROTOCOL: Protocol = Protocol {
    kind: "openai",
    fixtures: "openai",
    provider_yaml: |base| {
        format!("kind: openai\nbase_url: {base}/v1\napi_key_env: FAKE_UPSTREAM_KEY\n")
    },
    model: "gpt-4o-mini",
    is_stream: |_, _, body| body["stream"] == true,
    user_text: |body| last_user_in_messages(&body["messages"]),
    framing: Framing::Sse,
    reports_usage: true,
    tools: true,
    length: true,
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
    extra_errors: &[
        ("error_in_200", 503, "overloaded"),
        ("error_400_content_filter", 400, "content_filter"),
        // DeepSeek's answer when the account has no balance left.
        ("error_402_balance", 502, "auth"),
    ],
};

conformance_cases!();
