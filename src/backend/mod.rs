//! Backends. [`Provider`] is the only interface the rest of the gateway has to a
//! backend: a `dyn`-compatible trait with boxed futures and streams. Most providers
//! are an [`http::HttpProvider`] pairing the shared transport with a [`Codec`] (a
//! pure translation between canonical types and one wire protocol); the sandbox is
//! an in-process provider. [`registry::build`] turns a provider file into an
//! `Arc<dyn Provider>` by its `kind`: the one place that matches on kinds.

pub mod anthropic;
pub mod auth;
pub mod azure;
pub mod chatglm;
pub mod dashscope;
pub mod gemini;
pub mod http;
pub mod llamacpp;
pub mod ollama;
pub mod openai;
pub mod qianfan;
pub mod registry;
pub mod sandbox;
pub mod zhipu;

use std::pin::Pin;

use futures_util::future::BoxFuture;
use futures_util::Stream;

use crate::canonical::{
    ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse, StreamEvent,
};
use crate::error::UpstreamError;
use crate::framing::{Frame, Framing};

/// A stream of canonical events from a backend. It ends after `StreamEvent::Done`,
/// or with one `Err` when the backend fails, cuts the stream or stalls. Dropping it
/// cancels the backend call.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, UpstreamError>> + Send>>;

/// One configured backend.
pub trait Provider: Send + Sync {
    /// A non-streaming chat completion with the backend's model `model`.
    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<ChatResponse, UpstreamError>>;

    /// A streaming chat completion. Resolves once the backend has accepted the
    /// request (response headers); events follow on the stream.
    fn chat_stream<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<EventStream, UpstreamError>>;

    fn embed<'a>(
        &'a self,
        req: &'a EmbeddingsRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<EmbeddingsResponse, UpstreamError>>;

    /// An active health check: a cheap request showing the backend can serve.
    /// `None` when the backend has no such request.
    fn health(&self) -> Option<BoxFuture<'_, Result<(), UpstreamError>>> {
        None
    }
}

/// An HTTP call a codec wants made: path relative to the provider's base URL, JSON
/// body, and any headers specific to the protocol (auth is added by the transport).
#[derive(Debug, Clone)]
pub struct HttpCall {
    pub path: String,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

/// A wire protocol, as pure functions: canonical → request bytes, response bytes →
/// canonical. No networking, no clocks, no config parsing.
pub trait Codec: Send + Sync + 'static {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError>;
    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError>;
    /// False for backends without a streaming API: streams are then served from
    /// one complete response, replayed as events.
    fn native_streaming(&self) -> bool {
        true
    }
    fn stream_framing(&self) -> Framing;
    fn stream_decoder(&self) -> Box<dyn StreamDecoder>;
    /// Classifies a non-2xx answer.
    fn error(&self, status: u16, body: &[u8]) -> UpstreamError;
    fn embeddings_call(
        &self,
        req: &EmbeddingsRequest,
        model: &str,
    ) -> Result<HttpCall, UpstreamError>;
    fn embeddings_response(&self, body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError>;
    /// A cheap `GET` path (relative to the base URL) that answers 2xx when the
    /// backend is ready to serve, for readiness and health checks.
    fn health_path(&self) -> Option<&str> {
        None
    }
}

/// Per-stream state of a codec: turns frames into canonical events.
pub trait StreamDecoder: Send {
    /// Decodes one frame, appending events to `out`. An `Err` ends the stream.
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError>;
    /// True once the protocol's end-of-stream marker arrived.
    fn finished(&self) -> bool;
}
