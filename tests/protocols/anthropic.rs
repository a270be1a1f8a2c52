//! Anthropic's Messages API (the `anthropic` kind).

use crate::common::native::{last_user_in_messages, Framing, Protocol};
use serde_json::{json, Value};

pub static PROTOCOL: Protocol = Protocol {
    kind: "anthropic",
    fixtures: "anthropic",
    provider_yaml: |base| {
        format!(
            "kind: anthropic\nbase_url: {base}/v1\napi_key_env: FAKE_UPSTREAM_KEY\nanthropic: {{version: \"2023-06-01\", default_max_tokens: 1024}}\n"
        )
    },
    model: "claude-sonnet-4-5",
    is_stream: |_, _, body| body["stream"] == true,
    user_text: |body| last_user_in_messages(&body["messages"]),
    framing: Framing::Sse,
    reports_usage: true,
    tools: true,
    length: true,
    check_multi_turn: |body: &Value| {
        assert_eq!(body["system"], "Be brief.");
        assert_eq!(
            body["max_tokens"], 1024,
            "the provider's default_max_tokens"
        );
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "chat"}
            ])
        );
    },
    extra_errors: &[
        ("error_529", 503, "overloaded"),
        ("error_403", 502, "auth"),
        ("error_404", 404, "bad_request"),
        ("error_413", 413, "bad_request"),
        ("error_400_context_limit", 400, "context_length_exceeded"),
        // Not documented for the Messages API; kept for proxies in front of it.
        ("error_in_200", 503, "overloaded"),
    ],
};

conformance_cases!();
