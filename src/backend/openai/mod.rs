//! OpenAI Chat Completions and Embeddings: the client dialect of the gateway's
//! `/v1` and the `openai` backend kind. The wire format, both directions, is in
//! `wire.rs` (re-exported here); this file holds the kind and its codec.
//!
//! The codec serves every OpenAI-compatible backend: OpenAI itself, vLLM,
//! llama.cpp's `/v1`, Ollama's `/v1`, DeepSeek, Moonshot, Zhipu v4, DashScope
//! compatible mode, Qianfan v2. Vendor differences are configuration ([`Quirks`],
//! from the provider file's generic fields), not new code.

mod wire;

pub use wire::*;

use std::sync::Arc;

// What `wire.rs` uses as `super::…`.
use super::{choice_index, tool_id};
use crate::dialect::{Dialect, StreamEncoder};

use super::{Codec, HttpCall, Kind, Sectionless, StreamDecoder};
use crate::backend::common;
use crate::canonical::*;
use crate::config::{Capabilities, ProviderConfig};
use crate::error::UpstreamError;

pub static KIND: Kind = Kind {
    name: "openai",
    gen_ai_provider: "openai",
    auth_header: None,
    capabilities: Capabilities::ALL,
    reports_usage: true,
    self_hosted: false,
    in_process: false,
    section: false,
    settings: |_| {
        Arc::new(Sectionless(|cfg| {
            Arc::new(OpenAiCodec::new(Quirks::of(cfg)))
        }))
    },
};

/// Per-vendor differences within the OpenAI-compatible family.
#[derive(Debug, Clone)]
pub struct Quirks {
    /// Ask for `stream_options.include_usage` on every stream, so usage is
    /// reported even when the client did not ask (some servers reject the field).
    pub stream_usage: bool,
    /// Path of chat completions under the base URL.
    pub chat_path: String,
    /// Path of embeddings under the base URL.
    pub embeddings_path: String,
    /// Write transcripts in the legacy function-calling form (roles
    /// system/user/assistant/function), for servers such as ChatGLM3's demo.
    pub legacy_functions: bool,
}

impl Default for Quirks {
    fn default() -> Self {
        Quirks {
            stream_usage: true,
            chat_path: "/chat/completions".into(),
            embeddings_path: "/embeddings".into(),
            legacy_functions: false,
        }
    }
}

impl Quirks {
    /// The quirks a provider file sets: `stream_usage`, `chat_path`,
    /// `embeddings_path`, `legacy_functions` are generic provider fields because
    /// every kind that speaks OpenAI's bodies (`openai`, `azure`) may use them.
    pub fn of(cfg: &ProviderConfig) -> Self {
        Quirks {
            stream_usage: cfg.stream_usage,
            chat_path: cfg.chat_path.clone(),
            embeddings_path: cfg.embeddings_path.clone(),
            legacy_functions: cfg.legacy_functions,
        }
    }
}

pub struct OpenAiCodec {
    pub quirks: Quirks,
}

impl OpenAiCodec {
    pub fn new(quirks: Quirks) -> Self {
        OpenAiCodec { quirks }
    }
}

impl Codec for OpenAiCodec {
    fn health_path(&self) -> Option<&str> {
        Some("/models")
    }

    /// Legacy function-calling servers need the transcript rewritten.
    fn forwards_openai_chat(&self) -> Option<super::Forwarding<'_>> {
        (!self.quirks.legacy_functions).then_some(super::Forwarding {
            path: &self.quirks.chat_path,
            stream_usage: self.quirks.stream_usage,
        })
    }

    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: self.quirks.chat_path.clone(),
            body: wire::encode_chat_request_with(
                req,
                model,
                self.quirks.stream_usage,
                self.quirks.legacy_functions,
            ),
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        wire::decode_chat_response(body)
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(wire::ChunkDecoder::default())
    }

    fn error(&self, status: u16, body: &[u8]) -> UpstreamError {
        common::classify_error_body(status, body)
    }

    fn embeddings_call(
        &self,
        req: &EmbeddingsRequest,
        model: &str,
    ) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: self.quirks.embeddings_path.clone(),
            body: wire::encode_embeddings_request(req, model),
            headers: Vec::new(),
        })
    }

    fn embeddings_response(&self, body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        wire::decode_embeddings_response(body)
    }
}
