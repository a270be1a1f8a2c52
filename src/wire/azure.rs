//! Azure OpenAI: OpenAI's bodies and streams ([`super::openai`]) at Azure's paths,
//! `/openai/deployments/{deployment}/chat/completions?api-version={v}` (and
//! `…/embeddings`), where the deployment — the route's upstream model — selects
//! the model. The body keeps `model` (Azure ignores it, as OpenAI's own Azure
//! client does). What is Azure's own:
//!
//! - `prompt_filter_results` / `content_filter_results` annotations (ignored), and
//!   a first stream chunk with `choices: []` carrying only the prompt annotations:
//!   it is skipped, so the response identity comes from the first real chunk;
//! - a blocked prompt is HTTP 400 `{"error":{"code":"content_filter",…,
//!   "innererror":{"code":"ResponsibleAIPolicyViolation",…}}}` → content_filter; a
//!   blocked answer is `finish_reason: "content_filter"`.

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::openai;
use crate::canonical::StreamEvent;
use crate::error::{ErrorKind, UpstreamError};
use crate::wire::common;

/// Percent-encodes a path segment or query value (Azure names are usually plain).
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The path (with query) of `operation` (`chat/completions`, `embeddings`) on a
/// deployment.
pub fn deployment_path(deployment: &str, operation: &str, api_version: &str) -> String {
    format!(
        "/openai/deployments/{}/{operation}?api-version={}",
        encode_component(deployment),
        encode_component(api_version)
    )
}

/// Classifies a non-2xx answer. Azure's codes (`content_filter`,
/// `context_length_exceeded`, `429`, `DeploymentNotFound`…) are OpenAI-shaped.
pub fn classify_error_body(status: u16, body: &[u8]) -> UpstreamError {
    let mut e = common::classify_error_body(status, body);
    if e.kind == ErrorKind::BadRequest {
        let m = e.message.to_ascii_lowercase();
        if m.contains("responsibleaipolicyviolation") || m.contains("content management policy") {
            e.kind = ErrorKind::ContentFilter;
        }
    }
    e
}

/// State of decoding one Azure stream: OpenAI chunks, minus Azure's leading
/// annotation-only chunks.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    chunks: openai::ChunkDecoder,
    /// A chunk with choices, usage or an error has been seen; from then on every
    /// chunk goes straight to the OpenAI decoder.
    started: bool,
}

impl ChunkDecoder {
    pub fn decode(&mut self, data: &str, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        if !self.started {
            #[derive(Deserialize)]
            struct Probe {
                #[serde(default)]
                choices: Vec<IgnoredAny>,
                #[serde(default)]
                usage: Option<IgnoredAny>,
                #[serde(default)]
                error: Option<IgnoredAny>,
            }
            let t = data.trim();
            if t != "[DONE]" && !t.is_empty() {
                if let Ok(p) = serde_json::from_str::<Probe>(t) {
                    if p.choices.is_empty() && p.usage.is_none() && p.error.is_none() {
                        return Ok(());
                    }
                }
            }
            self.started = true;
        }
        self.chunks.decode(data, out)
    }

    pub fn finished(&self) -> bool {
        self.chunks.finished()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::canonical::*;
    use crate::provider::azure::AzureCodec;
    use crate::wire::common::testing::{assert_fixture_errors, decode_stream, fixture, text_of};

    fn stream(text: &str) -> (Vec<StreamEvent>, Result<(), UpstreamError>, bool) {
        decode_stream(&AzureCodec::new("2024-10-21", true), text.as_bytes(), 0)
    }

    #[test]
    fn paths_name_the_deployment_and_version() {
        assert_eq!(
            deployment_path("gpt-4o-prod", "chat/completions", "2024-10-21"),
            "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            deployment_path("my model/x", "embeddings", "2025-01-01-preview"),
            "/openai/deployments/my%20model%2Fx/embeddings?api-version=2025-01-01-preview"
        );
    }

    #[test]
    fn responses_with_filter_annotations_decode() {
        let r = openai::decode_chat_response(fixture("azure", "chat.json").as_bytes()).unwrap();
        assert_eq!(
            r.choices[0].message.content,
            Some(Content::Text("Hello from the fake upstream.".into()))
        );
        assert_eq!(r.usage.map(|u| u.total_tokens), Some(18));
        let r = openai::decode_chat_response(fixture("azure", "content_filter.json").as_bytes())
            .unwrap();
        assert_eq!(
            r.choices[0].finish_reason,
            Some(FinishReason::ContentFilter)
        );
        let r = openai::decode_chat_response(fixture("azure", "tools.json").as_bytes()).unwrap();
        assert_eq!(r.choices[0].message.tool_calls[0].name, "get_weather");
    }

    #[test]
    fn the_annotation_only_first_chunk_is_skipped() {
        let (ev, res, done) = stream(&fixture("azure", "chat.sse"));
        res.unwrap();
        assert!(done);
        let StreamEvent::Meta(meta) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(meta.id, "chatcmpl-azure0001");
        assert_eq!(meta.created, 1700000000);
        let text = text_of(&ev);
        assert_eq!(text, "Hello from the fake upstream.");
        assert!(ev
            .iter()
            .any(|e| matches!(e, StreamEvent::Usage(u) if u.total_tokens == 18)));
        let (ev, res, _) = stream(&fixture("azure", "stream_error.sse"));
        assert!(ev.len() > 1);
        assert_eq!(res.unwrap_err().kind, ErrorKind::Overloaded);
    }

    #[test]
    fn errors_classify() {
        let cases = [
            (
                400,
                "error_400_content_filter.json",
                ErrorKind::ContentFilter,
            ),
            (404, "error_404_deployment.json", ErrorKind::BadRequest),
        ];
        assert_fixture_errors("azure", classify_error_body, &cases);
    }
}
