//! Wire formats, one file per protocol. Their serde structs stay private to their
//! file; everything outside sees canonical types. A protocol that clients may speak
//! to the gateway implements [`Dialect`], which is all the HTTP edge needs.

pub mod anthropic;
pub mod azure;
pub mod chatglm;
pub mod common;
pub mod dashscope;
pub mod gemini;
pub mod llamacpp;
pub mod ollama;
pub mod openai;
pub mod qianfan;
pub mod zhipu;

use crate::canonical::{ChatRequest, ChatResponse, StreamEvent};
use crate::error::{ErrorKind, GatewayError, UpstreamError};

/// Choice indexes a backend may use in a stream: `0..MAX_CHOICES`, as many as a
/// client may ask for with `n` (checked at the edge). Decoders keep
/// per-choice state, and an index is an upstream-controlled number, so anything
/// beyond this is a malformed response rather than a reason to allocate.
pub const MAX_CHOICES: u32 = 128;

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

/// Tool-call ids that every protocol accepts.
///
/// A tool call's id travels from the backend that made it, through the client, to
/// whichever backend receives the next turn (possibly another one after a
/// fallback). OpenAI accepts at most 40 characters, Anthropic only
/// `[A-Za-z0-9_-]`, and backends invent ids of every shape (ChatGLM3 sends none,
/// some servers send 46 characters, old Gemini ids carried a thought signature).
/// So every id the gateway writes, to a client or to a backend, goes through
/// [`tool_id::portable`]: an id already within 40 characters of `[A-Za-z0-9_-]`
/// is kept as it is; any other id is replaced by `call_` + 32 hex digits of its
/// SHA-256. The mapping is a pure function, so a call and the tool result that
/// answers it map to the same id on every backend without any state, and a mapped
/// id maps to itself.
/// `prefix` and 32 hex digits of the SHA-256 of `text`: a stable stand-in for an
/// id a backend would refuse (tool-call ids, Zhipu's `user_id`).
pub fn hashed_id(prefix: &str, text: &str) -> String {
    use sha2::Digest;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = sha2::Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(prefix.len() + 32);
    out.push_str(prefix);
    for b in &digest[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

pub mod tool_id {
    use std::borrow::Cow;

    /// The longest id every protocol accepts (OpenAI's limit).
    pub const MAX_LEN: usize = 40;

    /// True when `id` is within [`MAX_LEN`] characters of `[A-Za-z0-9_-]`.
    pub fn is_portable(id: &str) -> bool {
        !id.is_empty()
            && id.len() <= MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }

    /// `id` unchanged when portable, else its stable portable replacement.
    pub fn portable(id: &str) -> Cow<'_, str> {
        if is_portable(id) {
            return Cow::Borrowed(id);
        }
        Cow::Owned(super::hashed_id("call_", id))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn portable_ids_are_kept_and_others_mapped_stably() {
            for id in ["call_abc", "toolu_01A-b_c", "x", &"a".repeat(40)] {
                assert!(matches!(portable(id), Cow::Borrowed(_)), "{id}");
            }
            let odd = [
                "",
                "call_1~ts~c2lnbmF0dXJl+/=",
                "chatcmpl-tool-0123456789abcdef0123456789abcdef",
                "call.1",
                "调用",
            ];
            for id in odd {
                let p = portable(id);
                assert!(is_portable(&p), "{id} → {p}");
                assert_eq!(p, portable(id), "stable");
                assert_eq!(portable(&p), p, "a mapped id maps to itself");
            }
            assert_ne!(portable("a.b"), portable("a.c"));
        }
    }
}

/// Every backend decoder against its recorded samples with their numbers
/// replaced by hostile ones (huge, negative, fractional) and cut at every
/// point: an error is fine, a panic or an allocation sized by a number is not.
#[cfg(test)]
mod hostile_numbers {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use crate::provider::{self, Codec};
    use crate::wire::common::testing::{decode_response, decode_stream};

    fn codecs() -> Vec<(&'static str, Arc<dyn Codec>)> {
        vec![
            (
                "openai",
                Arc::new(provider::openai::OpenAiCodec {
                    quirks: provider::openai::Quirks::default(),
                }),
            ),
            (
                "chatglm3",
                Arc::new(provider::openai::OpenAiCodec {
                    quirks: provider::openai::Quirks {
                        legacy_functions: true,
                        ..provider::openai::Quirks::default()
                    },
                }),
            ),
            (
                "anthropic",
                Arc::new(provider::anthropic::AnthropicCodec::new("2023-06-01", 1024)),
            ),
            ("gemini", Arc::new(provider::gemini::GeminiCodec::new())),
            (
                "dashscope",
                Arc::new(provider::dashscope::DashscopeCodec::new()),
            ),
            ("zhipu", Arc::new(provider::zhipu::ZhipuCodec::new())),
            ("qianfan", Arc::new(provider::qianfan::QianfanCodec::new())),
            ("ollama", Arc::new(provider::ollama::OllamaCodec::new(None))),
            (
                "azure",
                Arc::new(provider::azure::AzureCodec::new("2024-10-21", true)),
            ),
            (
                "chatglm",
                Arc::new(provider::chatglm::ChatglmCodec::new(None)),
            ),
            (
                "llamacpp",
                Arc::new(provider::llamacpp::LlamacppCodec::new(&BTreeMap::new()).unwrap()),
            ),
        ]
    }

    /// `text` with every run of digits replaced by `with`.
    fn replace_numbers(text: &str, with: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut in_digits = false;
        for c in text.chars() {
            if c.is_ascii_digit() {
                if !in_digits {
                    out.push_str(with);
                }
                in_digits = true;
            } else {
                in_digits = false;
                out.push(c);
            }
        }
        out
    }

    fn stream(codec: &dyn Codec, body: &[u8], chunk: usize) {
        let (out, _, _) = decode_stream(codec, body, chunk.max(1));
        assert!(out.len() <= body.len() + 8, "events bounded by input");
    }

    #[test]
    fn recorded_samples_with_hostile_numbers_never_panic() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let hostile = [
            "4294967295",
            "18446744073709551615",
            "-1",
            "1e300",
            "0.5",
            "99999999999999999999999999",
        ];
        for (dir, codec) in codecs() {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                for h in hostile {
                    let body = replace_numbers(&text, h);
                    let _ = decode_response(codec.as_ref(), body.as_bytes());
                    let _ = codec.embeddings_response(body.as_bytes());
                    let _ = codec.error(400, body.as_bytes());
                    if name.ends_with(".sse") || name.ends_with(".ndjson") {
                        for chunk in [1, 7, body.len()] {
                            stream(codec.as_ref(), body.as_bytes(), chunk);
                        }
                    }
                }
                // Cut at every point.
                let bytes = text.as_bytes();
                for cut in 0..bytes.len() {
                    let _ = decode_response(codec.as_ref(), &bytes[..cut]);
                    if name.ends_with(".sse") || name.ends_with(".ndjson") {
                        stream(codec.as_ref(), &bytes[..cut], 13);
                    }
                }
            }
        }
    }
}
