//! Codec for Alibaba DashScope's native API (`kind: dashscope`), under a `base_url`
//! such as `https://dashscope.aliyuncs.com/api/v1`: text generation (image input goes
//! to the multimodal endpoint), SSE streams with `X-DashScope-SSE: enable`, and text
//! embeddings. Bearer auth (the kind's default). DashScope's OpenAI-compatible mode
//! needs no codec: it is an `openai` provider file.

use super::{Codec, HttpCall, StreamDecoder};
use crate::canonical::*;
use crate::error::UpstreamError;
use crate::framing::{Frame, Framing};
use crate::wire::dashscope as wire;

#[derive(Debug, Clone, Default)]
pub struct DashscopeCodec;

impl DashscopeCodec {
    pub fn new() -> Self {
        DashscopeCodec
    }
}

impl Codec for DashscopeCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        let multimodal = wire::needs_multimodal(req);
        let path = if multimodal {
            wire::MULTIMODAL_GENERATION_PATH
        } else {
            wire::TEXT_GENERATION_PATH
        };
        let mut headers = Vec::new();
        if req.stream {
            headers.push(("x-dashscope-sse", "enable".to_owned()));
        }
        Ok(HttpCall {
            path: path.to_owned(),
            body: wire::encode_chat_request(req, model, multimodal),
            headers,
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        wire::decode_chat_response(body)
    }

    fn stream_framing(&self) -> Framing {
        Framing::Sse
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(DashscopeStream::default())
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
            path: wire::EMBEDDINGS_PATH.to_owned(),
            body: wire::encode_embeddings_request(req, model)?,
            headers: Vec::new(),
        })
    }

    fn embeddings_response(&self, body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        wire::decode_embeddings_response(body)
    }
}

#[derive(Default)]
struct DashscopeStream {
    inner: wire::EventDecoder,
}

impl StreamDecoder for DashscopeStream {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        match frame {
            // `id:` and the `:HTTP_STATUS/200` comment line are dropped by framing.
            Frame::Sse(ev) => self.inner.decode(ev.event.as_deref(), &ev.data, out),
            Frame::Line(l) => self.inner.decode(None, &l, out),
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

    fn req(stream: bool, content: Content) -> ChatRequest {
        ChatRequest {
            model: "route".into(),
            messages: vec![Message {
                content: Some(content),
                ..Message::text(Role::User, "")
            }],
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
    fn paths_and_stream_header() {
        let c = DashscopeCodec::new();
        let call = c
            .chat_call(&req(false, Content::Text("hi".into())), "qwen-plus")
            .unwrap();
        assert_eq!(call.path, "/services/aigc/text-generation/generation");
        assert!(call.headers.is_empty());
        let call = c
            .chat_call(&req(true, Content::Text("hi".into())), "qwen-plus")
            .unwrap();
        assert_eq!(call.headers, vec![("x-dashscope-sse", "enable".to_owned())]);
        let image = Content::Parts(vec![Part::Image {
            url: "https://example.invalid/a.png".into(),
            detail: None,
        }]);
        let call = c.chat_call(&req(false, image), "qwen-vl-plus").unwrap();
        assert_eq!(call.path, "/services/aigc/multimodal-generation/generation");
    }
}
