//! Zhipu GLM open platform v4 (the `zhipu` kind): OpenAI-shaped chat with Zhipu's
//! parameter ranges, finish reasons and business error codes.

use crate::common::native::{last_user_in_messages, Framing, Protocol};
use serde_json::{json, Value};

pub static PROTOCOL: Protocol = Protocol {
    kind: "zhipu",
    fixtures: "zhipu",
    provider_yaml: |base| {
        format!("kind: zhipu\nbase_url: {base}/api/paas/v4\napi_key_env: FAKE_UPSTREAM_KEY\n")
    },
    model: "glm-4-flash",
    is_stream: |path, _, body| {
        assert_eq!(path, "/api/paas/v4/chat/completions");
        // Zhipu reports usage on its last chunk unasked.
        assert!(body.get("stream_options").is_none(), "{body}");
        body["stream"] == true
    },
    user_text: |body| last_user_in_messages(&body["messages"]),
    framing: Framing::Sse,
    reports_usage: true,
    tools: true,
    length: true,
    check_multi_turn: |body: &Value| {
        assert_eq!(
            body,
            &json!({
                "model": "glm-4-flash",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "chat"}
                ]
            })
        );
    },
    extra_errors: &[
        ("error_400_sensitive", 400, "content_filter"),
        ("error_400_model", 400, "bad_request"),
        ("error_429_balance", 502, "auth"),
        ("error_in_200", 503, "overloaded"),
    ],
};

conformance_cases!();
