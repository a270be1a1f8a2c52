//! Codec for Baidu Qianfan v1 / wenxinworkshop (`kind: qianfan`). The base URL is
//! `https://aip.baidubce.com/rpc/2.0/ai_custom/v1/wenxinworkshop`; the route's
//! upstream model is the endpoint (`completions_pro`, `ernie_speed`, …). The
//! access token (fetched from the API key and secret key, cached, refreshed when
//! Baidu rejects it) is added to the query string by the transport.
//!
//! An access token can expire or be revoked before its announced lifetime ends;
//! Baidu then answers error 110 or 111. As Baidu's own SDK does, the call is made
//! once more with a fresh token ([`TokenRetry`]); a second refusal is the answer.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{Codec, EventStream, HttpCall, Provider, StreamDecoder};
use crate::canonical::*;
use crate::error::UpstreamError;
use crate::framing::{Frame, Framing};
use crate::wire::qianfan as wire;

/// A Qianfan provider that retries a call once when the access token was
/// refused as invalid or expired. The transport drops a refused token from its
/// cache (any `auth` failure does), so the second call fetches a new one.
pub struct TokenRetry {
    inner: Arc<dyn Provider>,
}

impl TokenRetry {
    pub fn new(inner: Arc<dyn Provider>) -> Self {
        TokenRetry { inner }
    }
}

impl Provider for TokenRetry {
    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<ChatResponse, UpstreamError>> {
        Box::pin(async move {
            match self.inner.chat(req, model).await {
                Err(e) if wire::is_token_refused(&e) => self.inner.chat(req, model).await,
                r => r,
            }
        })
    }

    fn chat_stream<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<EventStream, UpstreamError>> {
        Box::pin(async move {
            match self.inner.chat_stream(req, model).await {
                Err(e) if wire::is_token_refused(&e) => self.inner.chat_stream(req, model).await,
                r => r,
            }
        })
    }

    fn embed<'a>(
        &'a self,
        req: &'a EmbeddingsRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<EmbeddingsResponse, UpstreamError>> {
        Box::pin(async move {
            match self.inner.embed(req, model).await {
                Err(e) if wire::is_token_refused(&e) => self.inner.embed(req, model).await,
                r => r,
            }
        })
    }

    fn health(&self) -> Option<BoxFuture<'_, Result<(), UpstreamError>>> {
        self.inner.health()
    }
}

#[derive(Debug, Default)]
pub struct QianfanCodec;

impl QianfanCodec {
    pub fn new() -> Self {
        QianfanCodec
    }
}

/// `model` as a path segment: endpoints are plain names; anything else is
/// percent-encoded so it cannot change the path.
fn segment(model: &str) -> String {
    let mut out = String::with_capacity(model.len());
    for b in model.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Codec for QianfanCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: format!("/chat/{}", segment(model)),
            body: wire::encode_chat_request(req)?,
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
        Box::new(QianfanStream::default())
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
            path: format!("/embeddings/{}", segment(model)),
            body: wire::encode_embeddings_request(req)?,
            headers: Vec::new(),
        })
    }

    fn embeddings_response(&self, body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        wire::decode_embeddings_response(body)
    }
}

#[derive(Default)]
struct QianfanStream {
    state: wire::StreamState,
}

impl StreamDecoder for QianfanStream {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        match frame {
            Frame::Sse(ev) => self.state.decode(&ev.data, out),
            Frame::Line(l) => self.state.decode(&l, out),
        }
    }

    fn finished(&self) -> bool {
        self.state.finished()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn endpoint_is_the_model() {
        let req = crate::wire::openai::decode_chat_request(
            br#"{"model":"r","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let codec = QianfanCodec::new();
        assert_eq!(
            codec.chat_call(&req, "completions_pro").unwrap().path,
            "/chat/completions_pro"
        );
        assert_eq!(
            codec.chat_call(&req, "../x?y").unwrap().path,
            "/chat/..%2Fx%3Fy"
        );
        let emb = crate::wire::openai::decode_embeddings_request(br#"{"model":"r","input":"a"}"#)
            .unwrap();
        assert_eq!(
            codec.embeddings_call(&emb, "embedding-v1").unwrap().path,
            "/embeddings/embedding-v1"
        );
    }
}
