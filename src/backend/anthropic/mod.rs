//! Anthropic Messages: the client dialect of the gateway's `/v1/messages` and the
//! `anthropic` backend kind. The wire format, both directions, is in `wire.rs`
//! (re-exported here); this file holds the kind and its codec
//! (`POST {base_url}/messages`, e.g. `https://api.anthropic.com/v1`). The API key
//! travels in `x-api-key` (the kind's default auth); the codec adds
//! `anthropic-version`.

mod wire;

pub use wire::*;

use std::sync::Arc;

use serde::Deserialize;

// What `wire.rs` uses as `super::…`.
use super::tool_id;
use crate::dialect::{Dialect, StreamEncoder};

use super::{Codec, HttpCall, Kind, Settings, StreamDecoder};
use crate::canonical::*;
use crate::config::{Capabilities, ProviderConfig, Section};
use crate::error::UpstreamError;

pub static KIND: Kind = Kind {
    name: "anthropic",
    gen_ai_provider: "anthropic",
    auth_header: Some("x-api-key"),
    capabilities: Capabilities::ALL,
    reports_usage: true,
    self_hosted: false,
    in_process: false,
    section: true,
    settings,
};

/// The `anthropic:` section.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAnthropic {
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    default_max_tokens: Option<u32>,
}

#[derive(Debug)]
struct AnthropicSettings {
    /// The `anthropic-version` header.
    version: String,
    /// `max_tokens` when the client gives no output limit.
    default_max_tokens: u32,
}

impl Settings for AnthropicSettings {
    fn codec(&self, _cfg: &ProviderConfig) -> Result<Arc<dyn Codec>, String> {
        Ok(Arc::new(AnthropicCodec::new(
            &self.version,
            self.default_max_tokens,
        )))
    }
}

fn settings(s: &mut Section<'_>) -> Arc<dyn Settings> {
    let a = s.parse::<RawAnthropic>().unwrap_or_default();
    Arc::new(AnthropicSettings {
        version: a.version.unwrap_or_else(|| "2023-06-01".into()),
        default_max_tokens: a.default_max_tokens.unwrap_or(4096),
    })
}

pub struct AnthropicCodec {
    /// The `anthropic-version` header.
    version: String,
    /// `max_tokens` when the client gave no output limit (the API requires one).
    default_max_tokens: u32,
}

impl AnthropicCodec {
    pub fn new(version: &str, default_max_tokens: u32) -> Self {
        AnthropicCodec {
            version: version.to_owned(),
            default_max_tokens,
        }
    }
}

impl Codec for AnthropicCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: "/messages".into(),
            body: wire::encode_chat_request(req, model, self.default_max_tokens),
            headers: vec![("anthropic-version", self.version.clone())],
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        wire::decode_chat_response(body)
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(wire::EventDecoder::default())
    }

    fn error(&self, status: u16, body: &[u8]) -> UpstreamError {
        wire::classify_error_body(status, body)
    }

    fn embeddings_call(
        &self,
        _req: &EmbeddingsRequest,
        _model: &str,
    ) -> Result<HttpCall, UpstreamError> {
        Err(wire::embeddings_unsupported())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::common::testing::{
        decode_stream, embeddings_request, fixture, request, text_of,
    };

    /// Feeds `sse` to the codec's decoder in `step`-byte pieces.
    fn run(sse: &str, step: usize) -> (Vec<StreamEvent>, Result<(), UpstreamError>, bool) {
        decode_stream(
            &AnthropicCodec::new("2023-06-01", 1024),
            sse.as_bytes(),
            step,
        )
    }

    #[test]
    fn call_has_path_version_header_and_max_tokens() {
        let codec = AnthropicCodec::new("2023-06-01", 777);
        let req = request(vec![Message::text(Role::User, "hi")]);
        let call = codec.chat_call(&req, "claude-x").unwrap();
        assert_eq!(call.path, "/messages");
        assert_eq!(
            call.headers,
            vec![("anthropic-version", "2023-06-01".to_string())]
        );
        let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(body["max_tokens"], 777);
        assert_eq!(body["model"], "claude-x");
    }

    #[test]
    fn streams_decode_at_any_split() {
        for step in [1, 3, 7, 64, 100_000] {
            let (events, result, done) = run(&fixture("anthropic", "chat.sse"), step);
            result.unwrap();
            assert!(done);
            let text = text_of(&events);
            assert_eq!(text, "Hello from the fake upstream.");
            let usage: Vec<_> = events
                .iter()
                .filter(|e| matches!(e, StreamEvent::Usage(_)))
                .collect();
            assert_eq!(usage.len(), 1, "usage is reported once");
        }
    }

    #[test]
    fn in_stream_error_ends_the_stream() {
        let (events, result, done) = run(&fixture("anthropic", "stream_error.sse"), 5);
        let e = result.unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Overloaded);
        assert!(!done);
        assert!(events
            .iter()
            .any(|e| matches!(e, StreamEvent::Delta(d) if d.content.as_deref() == Some("Hello"))));
    }

    #[test]
    fn embeddings_are_refused() {
        let codec = AnthropicCodec::new("2023-06-01", 1);
        let req = embeddings_request(&["a"]);
        let e = codec.embeddings_call(&req, "m").unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::BadRequest);
    }
}
