//! Codec for Azure OpenAI (`kind: azure`). The base URL is the resource endpoint
//! (`https://{resource}.openai.azure.com`); the route's upstream model is the
//! deployment name; the key goes in the `api-key` header (the kind's default).

use super::{Codec, HttpCall, StreamDecoder};
use crate::canonical::*;
use crate::error::UpstreamError;
use crate::framing::{Frame, Framing};
use crate::wire::{azure as wire, common, openai};

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
            path: wire::deployment_path(model, "chat/completions", &self.api_version),
            body: openai::encode_chat_request(req, model, self.stream_usage),
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        openai::decode_chat_response(body)
    }

    fn stream_framing(&self) -> Framing {
        Framing::Sse
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(AzureStream::default())
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
            path: wire::deployment_path(model, "embeddings", &self.api_version),
            body: openai::encode_embeddings_request(req, model),
            headers: Vec::new(),
        })
    }

    fn embeddings_response(&self, body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        openai::decode_embeddings_response(body)
    }
}

#[derive(Default)]
struct AzureStream {
    chunks: wire::ChunkDecoder,
}

impl StreamDecoder for AzureStream {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        match frame {
            Frame::Sse(ev) => {
                if ev.event.as_deref() == Some("error") {
                    return Err(common::error_event(&ev.data));
                }
                self.chunks.decode(&ev.data, out)
            }
            Frame::Line(l) => self.chunks.decode(&l, out),
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
