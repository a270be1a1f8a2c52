//! Ollama's native API (the `ollama` kind): `/api/chat` with NDJSON streams.

use crate::common::native::{last_user_in_messages, Framing, Protocol};
use serde_json::{json, Value};

pub static PROTOCOL: Protocol = Protocol {
    kind: "ollama",
    fixtures: "ollama",
    provider_yaml: |base| {
        format!("kind: ollama\nbase_url: {base}\napi_key_env: FAKE_UPSTREAM_KEY\nollama:\n  keep_alive: 10m\n")
    },
    model: "llama3.2",
    is_stream: |path, _, body| {
        assert_eq!(path, "/api/chat");
        // Ollama streams by default: the gateway always says which it wants.
        assert!(body["stream"].is_boolean(), "{body}");
        body["stream"] == true
    },
    user_text: |body| last_user_in_messages(&body["messages"]),
    framing: Framing::Ndjson,
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
        assert_eq!(body["model"], "llama3.2");
        assert_eq!(body["stream"], false);
        assert_eq!(body["keep_alive"], "10m");
    },
    extra_errors: &[
        ("error_404_model", 404, "bad_request"),
        ("error_in_200", 503, "overloaded"),
    ],
};

conformance_cases!();
