//! Google Gemini API (the `gemini` kind): `generateContent` and
//! `streamGenerateContent?alt=sse`.

use crate::common::native::{Framing, Protocol};
use serde_json::{json, Value};

/// The text of the last `user` turn of a `contents` array (its text parts joined).
fn last_user_in_contents(body: &Value) -> String {
    body["contents"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .find(|c| c["role"] == "user")
        .map(|c| {
            c["parts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default()
}

pub static PROTOCOL: Protocol = Protocol {
    kind: "gemini",
    fixtures: "gemini",
    provider_yaml: |base| {
        format!("kind: gemini\nbase_url: {base}/v1beta\napi_key_env: FAKE_UPSTREAM_KEY\n")
    },
    model: "gemini-2.5-flash",
    is_stream: |path, query, _| {
        path.ends_with(":streamGenerateContent") && query.split('&').any(|q| q == "alt=sse")
    },
    user_text: last_user_in_contents,
    framing: Framing::Sse,
    reports_usage: true,
    tools: true,
    length: true,
    check_multi_turn: |body: &Value| {
        assert_eq!(
            body["systemInstruction"],
            json!({"parts": [{"text": "Be brief."}]})
        );
        assert_eq!(
            body["contents"],
            json!([
                {"role": "user", "parts": [{"text": "Hi"}]},
                {"role": "model", "parts": [{"text": "Hello!"}]},
                {"role": "user", "parts": [{"text": "chat"}]}
            ])
        );
    },
    extra_errors: &[
        ("error_in_200_blocked", 400, "content_filter"),
        ("error_400_api_key", 502, "auth"),
        ("error_403", 502, "auth"),
    ],
};

conformance_cases!();
