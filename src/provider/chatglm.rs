//! Codec for a self-hosted ChatGLM-6B / ChatGLM2-6B `api.py` (`kind: chatglm`):
//! one `POST /` per chat. The server cannot stream, so streams are served by the
//! transport from the complete answer ([`Codec::native_streaming`] is false).

use super::{Codec, HttpCall, StreamDecoder};
use crate::canonical::*;
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::{Frame, Framing};
use crate::wire::chatglm as wire;

#[derive(Debug, Default)]
pub struct ChatglmCodec {
    /// `chatglm.max_length` of the provider file: prompt + output tokens.
    max_length: Option<u32>,
}

impl ChatglmCodec {
    pub fn new(max_length: Option<u32>) -> Self {
        ChatglmCodec { max_length }
    }
}

impl Codec for ChatglmCodec {
    fn chat_call(&self, req: &ChatRequest, _model: &str) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: "/".into(),
            body: wire::encode_chat_request(req, self.max_length)?,
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        wire::decode_chat_response(body)
    }

    fn native_streaming(&self) -> bool {
        false
    }

    fn stream_framing(&self) -> Framing {
        Framing::Ndjson
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(NoStream)
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
            "ChatGLM's api.py has no embeddings endpoint",
        ))
    }

    fn embeddings_response(&self, _body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        Err(UpstreamError::new(
            ErrorKind::BadRequest,
            "ChatGLM's api.py has no embeddings endpoint",
        ))
    }
}

/// Never used: the transport does not open streams for this codec.
struct NoStream;

impl StreamDecoder for NoStream {
    fn frame(&mut self, _: Frame, _: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        Err(UpstreamError::new(
            ErrorKind::MalformedResponse,
            "ChatGLM's api.py does not stream",
        ))
    }

    fn finished(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn posts_to_the_root_and_does_not_stream() {
        let codec = ChatglmCodec::new(Some(4096));
        assert!(!codec.native_streaming());
        let req = crate::wire::openai::decode_chat_request(
            br#"{"model":"r","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let call = codec.chat_call(&req, "chatglm-6b").unwrap();
        assert_eq!(call.path, "/");
        let v: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"prompt": "hi", "history": [], "max_length": 4096})
        );
    }
}
