//! Codec for Zhipu GLM open platform v4 (`kind: zhipu`). The base URL is the
//! platform's `…/api/paas/v4`; authentication (the API key as a bearer token, or
//! a JWT signed from an `id.secret` key) is the transport's.

use super::{Codec, HttpCall, StreamDecoder};
use crate::canonical::*;
use crate::error::UpstreamError;
use crate::framing::{Frame, Framing};
use crate::wire::zhipu as wire;

#[derive(Debug, Default)]
pub struct ZhipuCodec;

impl ZhipuCodec {
    pub fn new() -> Self {
        ZhipuCodec
    }
}

impl Codec for ZhipuCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: "/chat/completions".into(),
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
        Box::new(ZhipuStream::default())
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
            path: "/embeddings".into(),
            body: wire::encode_embeddings_request(req, model),
            headers: Vec::new(),
        })
    }

    fn embeddings_response(&self, body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        wire::decode_embeddings_response(body)
    }
}

#[derive(Default)]
struct ZhipuStream {
    chunks: wire::ChunkDecoder,
}

impl StreamDecoder for ZhipuStream {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        match frame {
            Frame::Sse(ev) => self.chunks.decode(ev.event.as_deref(), &ev.data, out),
            Frame::Line(l) => self.chunks.decode(None, &l, out),
        }
    }

    fn finished(&self) -> bool {
        self.chunks.finished()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn calls_go_to_the_v4_paths() {
        let req = crate::wire::openai::decode_chat_request(
            br#"{"model":"r","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let call = ZhipuCodec::new().chat_call(&req, "glm-4-flash").unwrap();
        assert_eq!(call.path, "/chat/completions");
        let v: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(v["model"], "glm-4-flash");
        let emb = crate::wire::openai::decode_embeddings_request(br#"{"model":"r","input":["a"]}"#)
            .unwrap();
        let call = ZhipuCodec::new()
            .embeddings_call(&emb, "embedding-3")
            .unwrap();
        assert_eq!(call.path, "/embeddings");
    }
}
