//! Self-hosted ChatGLM-6B `api.py` (the `chatglm` kind): `POST /` with a prompt and
//! `[question, answer]` history; no streaming, usage, finish reason or tools.

use crate::common::native::{Framing, Protocol};
use serde_json::{json, Value};

pub static PROTOCOL: Protocol = Protocol {
    kind: "chatglm",
    fixtures: "chatglm",
    provider_yaml: |base| {
        format!("kind: chatglm\nbase_url: {base}\nchatglm:\n  max_length: 8192\n")
    },
    model: "chatglm-6b",
    is_stream: |path, _, body| {
        assert_eq!(path, "/");
        assert!(body.get("stream").is_none(), "{body}");
        false
    },
    // The system prompt is folded into the first user turn as "{system}\n\n{text}".
    user_text: |body| {
        let prompt = body["prompt"].as_str().unwrap_or_default();
        prompt.rsplit("\n\n").next().unwrap_or_default().to_owned()
    },
    framing: Framing::Sse,
    reports_usage: false,
    tools: false,
    length: false,
    check_multi_turn: |body: &Value| {
        assert_eq!(
            body,
            &json!({
                "prompt": "chat",
                "history": [["Be brief.\n\nHi", "Hello!"]],
                "max_length": 8192
            })
        );
    },
    extra_errors: &[("error_in_200", 503, "overloaded")],
};

// api.py cannot stream: streams are replayed from a complete answer, so a
// failure is known before anything is sent (an ordinary HTTP error, covered by
// `errors` with `stream: true`).
conformance_cases!(no_stream_error);
