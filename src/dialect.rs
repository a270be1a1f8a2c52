//! The client-facing side of a protocol: what the HTTP edge needs from an API
//! dialect clients may speak to the gateway. The implementations live with their
//! protocol (`backend::openai::OpenAi`, `backend::anthropic::Anthropic`).

use crate::canonical::{ChatRequest, ChatResponse, StreamEvent};
use crate::error::GatewayError;

/// A client-facing API dialect: how chat requests, responses, streams and errors
/// look on the wire.
pub trait Dialect: Send + Sync + 'static {
    fn decode_chat(&self, body: &[u8]) -> Result<ChatRequest, GatewayError>;
    /// `model` is the public name the client asked for.
    fn encode_chat(&self, resp: &ChatResponse, model: &str) -> Vec<u8>;
    /// An encoder for one streamed response to `req`.
    fn stream_encoder(&self, req: &ChatRequest) -> Box<dyn StreamEncoder>;
    fn error_body(&self, err: &GatewayError, request_id: &str) -> Vec<u8>;
    /// The HTTP status for `err` in this dialect.
    fn error_status(&self, err: &GatewayError) -> u16 {
        err.status()
    }
}

/// Turns canonical stream events into a dialect's stream bytes.
pub trait StreamEncoder: Send {
    /// Appends the bytes for `ev` (possibly none) to `out`.
    fn encode(&mut self, ev: &StreamEvent, out: &mut Vec<u8>);
    /// The final bytes of a stream that failed after it began.
    fn encode_error(&mut self, err: &GatewayError, request_id: &str, out: &mut Vec<u8>);
}
