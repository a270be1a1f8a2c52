//! Wire formats, one file per protocol. Their serde structs stay private to their
//! file; everything outside sees canonical types. A protocol that clients may speak
//! to the gateway implements [`Dialect`], which is all the HTTP edge needs.

pub mod anthropic;
pub mod azure;
pub mod chatglm;
pub mod dashscope;
pub mod gemini;
pub mod llamacpp;
pub mod ollama;
pub mod openai;
pub mod qianfan;
pub mod zhipu;

use crate::canonical::{ChatRequest, ChatResponse, StreamEvent};
use crate::error::{ErrorKind, GatewayError, UpstreamError};

/// Choice indexes a backend may use in a stream: `0..MAX_CHOICES`. Decoders keep
/// per-choice state, and an index is an upstream-controlled number, so anything
/// beyond this is a malformed response rather than a reason to allocate.
pub const MAX_CHOICES: u32 = 64;

/// `index` when it is below [`MAX_CHOICES`], else a `malformed_response` error.
pub fn choice_index(index: u32) -> Result<u32, UpstreamError> {
    if index < MAX_CHOICES {
        Ok(index)
    } else {
        Err(UpstreamError::new(
            ErrorKind::MalformedResponse,
            format!(
                "backend sent choice index {index}; at most {MAX_CHOICES} choices are accepted"
            ),
        ))
    }
}

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
