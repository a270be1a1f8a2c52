//! Azure OpenAI (the `azure` kind): OpenAI bodies at deployment paths with an
//! `api-version`, content-filter annotations and an annotation-only first chunk.

use crate::common::native::{last_user_in_messages, Framing, Protocol};
use serde_json::{json, Value};

pub static PROTOCOL: Protocol = Protocol {
    kind: "azure",
    fixtures: "azure",
    provider_yaml: |base| {
        format!("kind: azure\nbase_url: {base}\napi_key_env: FAKE_UPSTREAM_KEY\nazure:\n  api_version: 2024-10-21\n")
    },
    model: "gpt-4o-mini-deploy",
    is_stream: |path, query, body| {
        assert_eq!(
            path,
            "/openai/deployments/gpt-4o-mini-deploy/chat/completions"
        );
        assert_eq!(query, "api-version=2024-10-21");
        body["stream"] == true
    },
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
        ("error_400_content_filter", 400, "content_filter"),
        ("error_404_deployment", 404, "bad_request"),
    ],
};

conformance_cases!();
