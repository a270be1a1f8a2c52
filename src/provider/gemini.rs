//! Codec for the Google Gemini API (`kind: gemini`): `models/{model}:generateContent`,
//! `:streamGenerateContent?alt=sse` and `:batchEmbedContents` under the provider's
//! `base_url` (e.g. `https://generativelanguage.googleapis.com/v1beta`). The API key
//! travels in the `x-goog-api-key` header (the kind's default auth), never in the URL.

use super::{Codec, HttpCall, StreamDecoder};
use crate::canonical::*;
use crate::error::UpstreamError;
use crate::framing::{Frame, Framing};
use crate::wire::gemini as wire;

#[derive(Debug, Clone, Default)]
pub struct GeminiCodec;

impl GeminiCodec {
    pub fn new() -> Self {
        GeminiCodec
    }
}

impl Codec for GeminiCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        let method = if req.stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        Ok(HttpCall {
            path: format!("/{}:{method}", wire::model_resource(model)),
            body: wire::encode_chat_request(req, model),
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        wire::decode_chat_response(body)
    }

    fn stream_framing(&self) -> Framing {
        Framing::Sse
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(GeminiStream::default())
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
            path: format!("/{}:batchEmbedContents", wire::model_resource(model)),
            body: wire::encode_embeddings_request(req, model)?,
            headers: Vec::new(),
        })
    }

    fn embeddings_response(&self, body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        wire::decode_embeddings_response(body)
    }
}

#[derive(Default)]
struct GeminiStream {
    inner: wire::EventDecoder,
}

impl StreamDecoder for GeminiStream {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        match frame {
            Frame::Sse(ev) => self.inner.decode(&ev.data, out),
            Frame::Line(l) => self.inner.decode(&l, out),
        }
    }

    fn finished(&self) -> bool {
        self.inner.finished()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(stream: bool) -> ChatRequest {
        ChatRequest {
            model: "route".into(),
            messages: vec![Message::text(Role::User, "hi")],
            params: Params::default(),
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
            stream,
            include_usage: false,
            extra: serde_json::Map::new(),
        }
    }

    #[test]
    fn paths_keep_the_key_out_of_the_url() {
        let c = GeminiCodec::new();
        let call = c.chat_call(&req(false), "gemini-2.5-flash").unwrap();
        assert_eq!(call.path, "/models/gemini-2.5-flash:generateContent");
        let call = c.chat_call(&req(true), "gemini-2.5-flash").unwrap();
        assert_eq!(
            call.path,
            "/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert!(call.headers.is_empty());
        let e = EmbeddingsRequest {
            model: "route".into(),
            input: EmbeddingInput::Texts(vec!["a".into()]),
            encoding: EmbeddingEncoding::Float,
            dimensions: None,
            user: None,
            extra: serde_json::Map::new(),
        };
        let call = c.embeddings_call(&e, "gemini-embedding-001").unwrap();
        assert_eq!(call.path, "/models/gemini-embedding-001:batchEmbedContents");
    }
}
