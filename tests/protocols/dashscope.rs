//! Alibaba DashScope native text generation (the `dashscope` kind).

use crate::common::native::{last_user_in_messages, Framing, Protocol};
use serde_json::{json, Value};

pub static PROTOCOL: Protocol = Protocol {
    kind: "dashscope",
    fixtures: "dashscope",
    provider_yaml: |base| {
        format!("kind: dashscope\nbase_url: {base}/api/v1\napi_key_env: FAKE_UPSTREAM_KEY\n")
    },
    model: "qwen-plus",
    // The fake cannot see headers; the codec asks for incremental output only
    // when it streams (with `X-DashScope-SSE: enable`).
    is_stream: |path, _, body| {
        path.ends_with("/services/aigc/text-generation/generation")
            && body["parameters"]["incremental_output"] == true
    },
    user_text: |body| last_user_in_messages(&body["input"]["messages"]),
    framing: Framing::Sse,
    reports_usage: true,
    tools: true,
    length: true,
    check_multi_turn: |body: &Value| {
        assert_eq!(body["model"], "qwen-plus");
        assert_eq!(
            body["input"]["messages"],
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "chat"}
            ])
        );
        assert_eq!(body["parameters"]["result_format"], "message");
        // Qwen3 models refuse non-streaming calls while thinking.
        assert_eq!(body["parameters"]["enable_thinking"], false);
    },
    // A streaming call's error answer is SSE-framed (`error_400_*.sse`).
    extra_errors: &[
        ("error_400_inspection", 400, "content_filter"),
        ("error_400_arrearage", 502, "auth"),
    ],
};

conformance_cases!();
