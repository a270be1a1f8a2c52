//! llama.cpp server's native `/completion` (the `llamacpp` kind), with the chat
//! templates of the shipped sample provider file (`*` → ChatML).

use crate::common::native::{Framing, Protocol};
use serde_json::{json, Value};

/// The last user turn of a ChatML prompt.
fn last_user_in_chatml(prompt: &str) -> String {
    const OPEN: &str = "<|im_start|>user\n";
    prompt
        .rfind(OPEN)
        .map(|i| &prompt[i + OPEN.len()..])
        .and_then(|rest| rest.split("<|im_end|>").next())
        .unwrap_or_default()
        .to_owned()
}

pub static PROTOCOL: Protocol = Protocol {
    kind: "llamacpp",
    fixtures: "llamacpp",
    provider_yaml: |base| {
        let sample = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/providers/llamacpp.yaml"
        ))
        .unwrap();
        assert!(sample.contains("base_url: http://127.0.0.1:8081\n"));
        sample.replace(
            "base_url: http://127.0.0.1:8081\n",
            &format!("base_url: {base}\napi_key_env: FAKE_UPSTREAM_KEY\n"),
        )
    },
    model: "local",
    is_stream: |path, _, body| {
        assert_eq!(path, "/completion");
        body["stream"] == true
    },
    user_text: |body| last_user_in_chatml(body["prompt"].as_str().unwrap_or_default()),
    framing: Framing::Sse,
    reports_usage: true,
    tools: false,
    length: true,
    check_multi_turn: |body: &Value| {
        assert_eq!(
            body["prompt"],
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nchat<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert_eq!(body["stop"], json!(["<|im_end|>"]));
        assert_eq!(body["stream"], false);
        assert_eq!(body["cache_prompt"], true);
        assert_eq!(body["model"], "local");
    },
    extra_errors: &[
        ("error_503_loading", 503, "overloaded"),
        // Older builds cut an over-long prompt and answer anyway (`truncated`).
        ("context_truncated", 400, "context_length_exceeded"),
    ],
};

conformance_cases!();
