//! Codec for Ollama's native API: `POST /api/chat` (NDJSON streams) and
//! `POST /api/embed`. `keep_alive` comes from the provider file.

use super::{Codec, HttpCall, StreamDecoder};
use crate::canonical::*;
use crate::error::UpstreamError;
use crate::framing::{Frame, Framing};
use crate::wire::ollama as wire;

pub struct OllamaCodec {
    /// How long Ollama keeps the model loaded after a call (`5m`, `-1`, `0`).
    keep_alive: Option<String>,
}

impl OllamaCodec {
    pub fn new(keep_alive: Option<String>) -> Self {
        OllamaCodec { keep_alive }
    }
}

impl Codec for OllamaCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: "/api/chat".into(),
            body: wire::encode_chat_request(req, model, self.keep_alive.as_deref())?,
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        wire::decode_chat_response(body)
    }

    fn stream_framing(&self) -> Framing {
        Framing::Ndjson
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(OllamaStream::default())
    }

    fn error(&self, status: u16, body: &[u8]) -> UpstreamError {
        wire::classify_error_body(status, body)
    }

    fn embeddings_call(
        &self,
        req: &EmbeddingsRequest,
        model: &str,
    ) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: "/api/embed".into(),
            body: wire::encode_embeddings_request(req, model, self.keep_alive.as_deref())?,
            headers: Vec::new(),
        })
    }

    fn embeddings_response(&self, body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        wire::decode_embeddings_response(body)
    }

    fn health_path(&self) -> Option<&str> {
        // `{"version":"…"}` as soon as the server is up (models load on demand).
        Some("/api/version")
    }
}

#[derive(Default)]
struct OllamaStream {
    inner: wire::ChatStream,
}

impl StreamDecoder for OllamaStream {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        match frame {
            Frame::Line(l) => self.inner.line(&l, out),
            // Not Ollama's framing; a proxy that re-frames as SSE keeps the JSON.
            Frame::Sse(ev) => self.inner.line(&ev.data, out),
        }
    }

    fn finished(&self) -> bool {
        self.inner.finished()
    }
}
