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

use std::sync::Arc;

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::openai;
use super::{Codec, HttpCall, Kind, Settings, StreamDecoder};
use crate::backend::common;
use crate::canonical::{
    ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse, StreamEvent,
};
use crate::config::{Capabilities, ProviderConfig, Section};
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::Frame;

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
}

impl StreamDecoder for ChunkDecoder {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        let data = common::stream_data(&frame, common::error_event)?;
        self.decode(data, out)
    }

    fn finished(&self) -> bool {
        self.chunks.finished()
    }
}

// === kind ===

pub static KIND: Kind = Kind {
    name: "azure",
    gen_ai_provider: "azure.ai.openai",
    auth_header: Some("api-key"),
    capabilities: Capabilities::ALL,
    reports_usage: true,
    self_hosted: false,
    in_process: false,
    section: true,
    settings,
};

/// The `azure:` section.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAzure {
    api_version: String,
}

#[derive(Debug)]
struct AzureSettings {
    api_version: String,
}

impl Settings for AzureSettings {
    fn codec(&self, cfg: &ProviderConfig) -> Result<Arc<dyn Codec>, String> {
        Ok(Arc::new(AzureCodec::new(
            &self.api_version,
            cfg.stream_usage,
        )))
    }
}

fn settings(s: &mut Section<'_>) -> Arc<dyn Settings> {
    let api_version = match s.parse::<RawAzure>() {
        Some(a) => a.api_version,
        None => {
            if !s.is_present() {
                s.problem(
                    "api_version",
                    "Azure OpenAI needs an api_version (e.g. `2024-10-21`)",
                );
            }
            String::new()
        }
    };
    Arc::new(AzureSettings { api_version })
}

// === codec ===
//
// Codec for Azure OpenAI (`kind: azure`). The base URL is the resource endpoint
// (`https://{resource}.openai.azure.com`); the route's upstream model is the
// deployment name; the key goes in the `api-key` header (the kind's default).

#[derive(Debug, Clone)]
pub struct AzureCodec {
    api_version: String,
    /// Ask for `stream_options.include_usage` (API versions from 2024-09-01-preview
    /// and 2024-10-21 accept it); the provider's `stream_usage`.
    stream_usage: bool,
}

impl AzureCodec {
    pub fn new(api_version: &str, stream_usage: bool) -> Self {
        AzureCodec {
            api_version: api_version.to_owned(),
            stream_usage,
        }
    }
}

impl Codec for AzureCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: deployment_path(model, "chat/completions", &self.api_version),
            body: openai::encode_chat_request(req, model, self.stream_usage),
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        openai::decode_chat_response(body)
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(ChunkDecoder::default())
    }

    fn error(&self, status: u16, body: &[u8]) -> UpstreamError {
        classify_error_body(status, body)
    }

    fn embeddings_call(
        &self,
        req: &EmbeddingsRequest,
        model: &str,
    ) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: deployment_path(model, "embeddings", &self.api_version),
            body: openai::encode_embeddings_request(req, model),
            headers: Vec::new(),
        })
    }

    fn embeddings_response(&self, body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        openai::decode_embeddings_response(body)
    }
}

#[cfg(test)]
mod codec_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn calls_target_the_deployment() {
        let codec = AzureCodec::new("2024-10-21", true);
        let req = openai::decode_chat_request(
            br#"{"model":"r","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let call = codec.chat_call(&req, "gpt-4o-prod").unwrap();
        assert_eq!(
            call.path,
            "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21"
        );
        let v: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let call = AzureCodec::new("2024-06-01", false)
            .chat_call(&req, "gpt-4o-prod")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert!(v.get("stream_options").is_none());
        let emb = openai::decode_embeddings_request(br#"{"model":"r","input":"a"}"#).unwrap();
        let call = codec.embeddings_call(&emb, "embed-small").unwrap();
        assert_eq!(
            call.path,
            "/openai/deployments/embed-small/embeddings?api-version=2024-10-21"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::azure::AzureCodec;
    use crate::backend::common::testing::{
        assert_fixture_errors, decode_stream, fixture, recorded_chat, text_of,
    };
    use crate::canonical::*;

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
        let r = recorded_chat("azure", openai::decode_chat_response);
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
