//! Codec for llama.cpp server's native `POST /completion`: the transcript is
//! rendered into a raw prompt with the provider's chat templates (compiled once,
//! here, when the provider is built), and the answer or SSE stream is read back.
//! Tools and embeddings are not part of this API (use the `openai` kind on the
//! server's `/v1` for those).

use std::collections::BTreeMap;

use super::{Codec, HttpCall, StreamDecoder};
use crate::canonical::*;
use crate::config::ChatTemplate;
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::{Frame, Framing};
use crate::wire::llamacpp as wire;

pub struct LlamacppCodec {
    /// The minijinja environment with every template compiled.
    templates: wire::Templates,
}

impl LlamacppCodec {
    /// Compiles the chat templates (`*` is the fallback for any model). The error
    /// names the template that does not compile.
    pub fn new(templates: &BTreeMap<String, ChatTemplate>) -> Result<Self, String> {
        Ok(LlamacppCodec {
            templates: wire::Templates::compile(templates)?,
        })
    }
}

impl Codec for LlamacppCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        let (prompt, stop) = self.templates.render(req, model)?;
        Ok(HttpCall {
            path: "/completion".into(),
            body: wire::encode_completion_request(req, model, &prompt, stop)?,
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        wire::decode_completion_response(body)
    }

    fn stream_framing(&self) -> Framing {
        Framing::Sse
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(LlamacppStream::default())
    }

    fn error(&self, status: u16, body: &[u8]) -> UpstreamError {
        wire::classify_error_body(status, body)
    }

    fn embeddings_call(
        &self,
        _req: &EmbeddingsRequest,
        _model: &str,
    ) -> Result<HttpCall, UpstreamError> {
        Err(UpstreamError::new(
            ErrorKind::BadRequest,
            "llama.cpp's native API has no OpenAI-style embeddings: serve them through the `openai` kind on the server's /v1",
        ))
    }

    fn embeddings_response(&self, _body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        Err(UpstreamError::new(
            ErrorKind::BadRequest,
            "llama.cpp's native API has no OpenAI-style embeddings",
        ))
    }

    fn health_path(&self) -> Option<&str> {
        // 200 once the model is loaded, 503 `unavailable_error` while it loads.
        Some("/health")
    }
}

#[derive(Default)]
struct LlamacppStream {
    inner: wire::CompletionStream,
}

impl StreamDecoder for LlamacppStream {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        match frame {
            Frame::Sse(ev) => {
                // Older builds write a failure as an `error: {json}` line.
                if let Some((_, v)) = ev.other.iter().find(|(k, _)| k == "error") {
                    return Err(self.inner.error_line(v));
                }
                if ev.event.as_deref() == Some("error") {
                    return Err(self.inner.error_line(&ev.data));
                }
                self.inner.data(&ev.data, out)
            }
            Frame::Line(l) => self.inner.data(&l, out),
        }
    }

    fn finished(&self) -> bool {
        self.inner.finished()
    }
}
