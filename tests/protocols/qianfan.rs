//! Baidu Qianfan v1 / wenxinworkshop (the `qianfan` kind): `result` replies,
//! `is_end` streams, errors inside HTTP 200 and an OAuth access token that the
//! gateway fetches from the fake's token URL first.

use crate::common::native::{last_user_in_messages, Framing, Protocol};
use serde_json::{json, Value};

pub static PROTOCOL: Protocol = Protocol {
    kind: "qianfan",
    fixtures: "qianfan",
    provider_yaml: |base| {
        format!(
            "kind: qianfan\nbase_url: {base}/rpc/2.0/ai_custom/v1/wenxinworkshop\napi_key_env: FAKE_UPSTREAM_KEY\nqianfan:\n  secret_key_env: FAKE_UPSTREAM_SECRET\n  token_url: {base}/oauth/2.0/token\n"
        )
    },
    model: "completions_pro",
    is_stream: |path, query, body| {
        if path == "/oauth/2.0/token" {
            assert!(query.contains("grant_type=client_credentials"), "{query}");
            return false;
        }
        assert_eq!(
            path,
            "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/completions_pro"
        );
        assert_eq!(query, "access_token=24.fake-access-token");
        body["stream"] == true
    },
    // A token request has no body: it is answered with `token.json`.
    user_text: |body| match body.get("messages") {
        None => "token".into(),
        Some(m) => last_user_in_messages(m),
    },
    framing: Framing::Sse,
    reports_usage: true,
    tools: true,
    length: true,
    check_multi_turn: |body: &Value| {
        assert_eq!(
            body,
            &json!({
                "system": "Be brief.",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "chat"}
                ]
            })
        );
    },
    extra_errors: &[
        ("error_in_200", 400, "bad_request"),
        ("error_in_200_qps", 429, "rate_limited"),
        ("error_in_200_token", 502, "auth"),
        ("error_in_200_context", 400, "context_length_exceeded"),
        ("error_in_200_busy", 503, "overloaded"),
    ],
};

conformance_cases!();
