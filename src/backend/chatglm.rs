//! The self-hosted ChatGLM-6B / ChatGLM2-6B `api.py` server: `POST /` with
//! `{"prompt","history":[[q,a],…],"max_length","top_p","temperature"}`, answered
//! with `{"response","history","status","time"}`. No roles, no system prompt, no
//! streaming, no usage, no finish reason, no tools.
//!
//! How a chat transcript is folded into `prompt` + `history`:
//! - every `system`/`developer` message (wherever it stands) is joined with `\n`
//!   and prepended to the first user turn as `"{system}\n\n{user text}"` (if the
//!   request has no user turn at all, the system text is the prompt);
//! - consecutive turns of the same side are merged with `\n`; a `tool` message
//!   counts as a user turn reading `Tool result: {content}`, and an assistant tool
//!   call is written into its turn as `Call {name}({arguments})`;
//! - the turns become `[user, assistant]` pairs in `history`; a leading assistant
//!   turn is paired with an empty question; the last user turn is the `prompt`;
//! - a transcript ending with an assistant turn cannot be continued by this API
//!   and is refused (400 `bad_request`) before anything is sent.
//!
//! `max_length` counts prompt **and** output tokens, and the prompt the model
//! sees is the history rendered by its chat template: `[Round N]\n\n问：{q}\n\n答：{a}\n\n`
//! per round in ChatGLM2 (`[Round N]\n问：…\n答：…\n` in ChatGLM-6B), plus two
//! special tokens. It is the provider's `chatglm.max_length` when set; when the
//! client gives an output limit it is that limit plus the rendered prompt's length
//! in characters (the longer template's; characters bound the tokens of text from
//! above), or the smaller of the two when both apply; otherwise it is not sent
//! (the server uses 2048). Counting the text alone left a multi-turn prompt
//! longer than `max_length`, and the server then answered with nothing. Temperature `≤ 0` is sent as 0.01 (the server treats 0 as "unset"
//! and would sample at 0.95); `top_p` is clamped to [0.01, 1]. Stop words, seed
//! and response formats have no equivalent and are not sent.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Codec, HttpCall, Kind, Settings, StreamDecoder};
use crate::backend::common::{self, malformed_json, new_completion_id, push_joined};
use crate::canonical::*;
use crate::config::{Capabilities, ProviderConfig, Section};
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::{Frame, Framing};

#[derive(Serialize)]
struct OutRequest<'a> {
    prompt: &'a str,
    history: &'a [(String, String)],
    #[serde(skip_serializing_if = "Option::is_none")]
    max_length: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    User,
    Assistant,
}

/// The transcript folded into ChatGLM's shape.
#[derive(Debug, PartialEq)]
struct Folded {
    prompt: String,
    history: Vec<(String, String)>,
}

fn fold(messages: &[Message]) -> Result<Folded, UpstreamError> {
    let mut system = String::new();
    let mut turns: Vec<(Side, String)> = Vec::new();
    for m in messages {
        let text = m.content.as_ref().map(Content::text).unwrap_or_default();
        let (side, text) = match m.role {
            Role::System | Role::Developer => {
                push_joined(&mut system, "\n", &text);
                continue;
            }
            Role::User => (Side::User, text.into_owned()),
            Role::Tool => (Side::User, format!("Tool result: {text}")),
            Role::Assistant => {
                let mut t = text.into_owned();
                for c in &m.tool_calls {
                    push_joined(&mut t, "\n", &format!("Call {}({})", c.name, c.arguments));
                }
                (Side::Assistant, t)
            }
        };
        match turns.last_mut() {
            Some((s, buf)) if *s == side => push_joined(buf, "\n", &text),
            _ => turns.push((side, text)),
        }
    }
    let mut turns = turns.into_iter().peekable();
    let mut history = Vec::new();
    let mut prompt = None;
    while let Some((side, text)) = turns.next() {
        match side {
            // Only a leading assistant turn can follow nothing.
            Side::Assistant => history.push((String::new(), text)),
            Side::User => match turns.next() {
                Some((_, answer)) => history.push((text, answer)),
                None => prompt = Some(text),
            },
        }
    }
    let prompt = match prompt {
        Some(p) => p,
        None if history.is_empty() && !system.is_empty() => std::mem::take(&mut system),
        None if history.is_empty() => {
            return Err(UpstreamError::new(
                ErrorKind::BadRequest,
                "ChatGLM needs a user message to answer",
            ))
        }
        None => {
            return Err(UpstreamError::new(
                ErrorKind::BadRequest,
                "ChatGLM cannot continue an assistant message: the conversation must end with a user message",
            ))
        }
    };
    let mut folded = Folded { prompt, history };
    if !system.is_empty() {
        let first = match folded.history.first_mut() {
            Some(pair) => &mut pair.0,
            None => &mut folded.prompt,
        };
        *first = if first.is_empty() {
            system
        } else {
            format!("{system}\n\n{first}")
        };
    }
    Ok(folded)
}

/// Characters the chat template adds around `rounds` rounds (ChatGLM2's
/// `[Round N]\n\n问：\n\n答：\n\n`, the longer of the two generations), plus the
/// two special tokens (`[gMASK]`, `sop`) that start every prompt.
fn template_chars(rounds: usize) -> usize {
    // "[Round " + "]\n\n问：" + "\n\n答：" + "\n\n", in characters.
    const PER_ROUND: usize = 18;
    let mut total: usize = 2;
    let mut digits = 1;
    let mut next_power = 10;
    for n in 1..=rounds {
        if n == next_power {
            digits += 1;
            next_power = next_power.saturating_mul(10);
        }
        total = total.saturating_add(PER_ROUND + digits);
    }
    total
}

fn max_length(configured: Option<u32>, output_limit: Option<u32>, f: &Folded) -> Option<u32> {
    let derived = output_limit.map(|out| {
        let chars: usize = f
            .history
            .iter()
            .map(|(q, a)| q.chars().count().saturating_add(a.chars().count()))
            .fold(f.prompt.chars().count(), usize::saturating_add)
            .saturating_add(template_chars(f.history.len().saturating_add(1)));
        out.saturating_add(u32::try_from(chars).unwrap_or(u32::MAX))
    });
    match (configured, derived) {
        (Some(c), Some(d)) => Some(c.min(d)),
        (c, d) => c.or(d),
    }
}

/// Encodes a canonical request as an `api.py` body. `configured_max_length` is
/// the provider's `chatglm.max_length`.
pub fn encode_chat_request(
    req: &ChatRequest,
    configured_max_length: Option<u32>,
) -> Result<Vec<u8>, UpstreamError> {
    let folded = fold(&req.messages)?;
    let p = &req.params;
    let out = OutRequest {
        prompt: &folded.prompt,
        history: &folded.history,
        max_length: max_length(configured_max_length, p.output_limit(), &folded),
        top_p: p.top_p.map(|t| t.clamp(0.01, 1.0)),
        temperature: p.temperature.map(|t| if t <= 0.0 { 0.01 } else { t }),
    };
    Ok(serde_json::to_vec(&out).unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Status {
    Code(u16),
    Text(String),
}

#[derive(Deserialize)]
struct InReply {
    #[serde(default)]
    response: Option<String>,
    #[serde(default)]
    status: Option<Status>,
    #[serde(default)]
    detail: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    message: Option<Value>,
}

/// Refines an error classified from status and text: ChatGLM (Hugging Face
/// `generate`) states an over-long input in its own words.
fn refine(mut e: UpstreamError) -> UpstreamError {
    if matches!(e.kind, ErrorKind::BadRequest | ErrorKind::Overloaded) {
        let m = e.message.to_lowercase();
        if (m.contains("max_length") && m.contains("input length"))
            || m.contains("too long")
            || m.contains("exceeds the maximum")
        {
            e.kind = ErrorKind::ContextLength;
        }
    }
    e
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Decodes an `api.py` answer (HTTP 2xx). A `status` other than 2xx in the body,
/// or a body with no `response`, is an error.
pub fn decode_chat_response(body: &[u8]) -> Result<ChatResponse, UpstreamError> {
    let r: InReply = serde_json::from_slice(body)
        .map_err(|e| malformed_json("a body", "a ChatGLM reply", &e))?;
    let status = match &r.status {
        None => None,
        Some(Status::Code(c)) => Some(*c),
        Some(Status::Text(t)) => t.trim().parse().ok(),
    };
    let why = r
        .error
        .as_ref()
        .or(r.detail.as_ref())
        .or(r.message.as_ref())
        .map(text_of);
    let failed = status.filter(|s| !(200..300).contains(s));
    match (failed, r.response) {
        (None, Some(text)) if why.is_none() || !text.is_empty() => Ok(ChatResponse {
            id: new_completion_id(),
            created: unix_now(),
            model: String::new(),
            choices: vec![Choice {
                index: 0,
                message: Message::text(Role::Assistant, text),
                finish_reason: Some(FinishReason::Stop),
            }],
            usage: None,
            system_fingerprint: None,
        }),
        (failed, response) => {
            let status = failed.unwrap_or(500);
            let message = why
                .or(response.filter(|t| !t.is_empty()))
                .unwrap_or_else(|| format!("ChatGLM answered with status {status}"));
            let mut e = UpstreamError::new(ErrorKind::from_status(status), message);
            if e.kind == ErrorKind::Timeout {
                e.kind = ErrorKind::Overloaded;
            }
            Err(refine(e))
        }
    }
}

/// Classifies a non-2xx answer: FastAPI's `{"detail": …}`, uvicorn's plain
/// `Internal Server Error`, or a reverse proxy's body.
pub fn classify_error_body(status: u16, body: &[u8]) -> UpstreamError {
    refine(common::classify_error_body(status, body))
}

// === kind ===

pub static KIND: Kind = Kind {
    name: "chatglm",
    gen_ai_provider: "chatglm",
    auth_header: None,
    capabilities: Capabilities {
        tools: false,
        json_mode: false,
        embeddings: false,
        vision: false,
        ..Capabilities::ALL
    },
    reports_usage: false,
    self_hosted: true,
    in_process: false,
    section: true,
    settings,
};

/// The `chatglm:` section.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawChatglm {
    #[serde(default)]
    max_length: Option<u32>,
}

#[derive(Debug)]
struct ChatglmSettings {
    max_length: Option<u32>,
}

impl Settings for ChatglmSettings {
    fn codec(&self, _cfg: &ProviderConfig) -> Result<Arc<dyn Codec>, String> {
        Ok(Arc::new(ChatglmCodec::new(self.max_length)))
    }
}

fn settings(s: &mut Section<'_>) -> Arc<dyn Settings> {
    let raw = s.parse::<RawChatglm>().unwrap_or_default();
    Arc::new(ChatglmSettings {
        max_length: raw.max_length,
    })
}

// === codec ===
//
// Codec for a self-hosted ChatGLM-6B / ChatGLM2-6B `api.py` (`kind: chatglm`):
// one `POST /` per chat. The server cannot stream, so streams are served by the
// transport from the complete answer ([`Codec::native_streaming`] is false).

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
            body: encode_chat_request(req, self.max_length)?,
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        decode_chat_response(body)
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
        classify_error_body(status, body)
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
mod codec_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn posts_to_the_root_and_does_not_stream() {
        let codec = ChatglmCodec::new(Some(4096));
        assert!(!codec.native_streaming());
        let req = crate::backend::openai::decode_chat_request(
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::common::testing::{
        assert_fixture_errors, client_request as request, fixture, recorded_chat,
    };
    use serde_json::json;

    fn encode(v: Value, max_length: Option<u32>) -> Result<Value, UpstreamError> {
        encode_chat_request(&request(v), max_length).map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn transcript_folds_into_prompt_and_history() {
        let body = encode(
            json!({"model": "m", "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "developer", "content": "Answer in English."},
                {"role": "user", "content": "chat"}
            ], "temperature": 0.7, "top_p": 0.9}),
            None,
        )
        .unwrap();
        assert_eq!(
            body,
            json!({
                "prompt": "chat",
                "history": [["Be brief.\nAnswer in English.\n\nHi", "Hello!"]],
                "temperature": 0.7, "top_p": 0.9
            })
        );
        let body = encode(
            json!({"model": "m", "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "chat"}
            ]}),
            None,
        )
        .unwrap();
        assert_eq!(body, json!({"prompt": "Be brief.\n\nchat", "history": []}));
    }

    #[test]
    fn odd_transcripts_have_documented_rules() {
        // Consecutive user turns merge; a leading assistant turn gets an empty
        // question; tool traffic becomes text.
        let body = encode(
            json!({"model": "m", "messages": [
                {"role": "assistant", "content": "Welcome."},
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}
            ]}),
            None,
        )
        .unwrap();
        assert_eq!(
            body,
            json!({"prompt": "Tool result: 42", "history": [["", "Welcome."], ["a\nb", "Call f({})"]]})
        );
        let e = encode(
            json!({"model": "m", "messages": [
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}
            ]}),
            None,
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        let body = encode(
            json!({"model": "m", "messages": [{"role": "system", "content": "Say hi."}]}),
            None,
        )
        .unwrap();
        assert_eq!(body["prompt"], "Say hi.");
    }

    #[test]
    fn max_length_covers_the_rendered_multi_turn_prompt() {
        assert_eq!(
            "[Round ]\n\n问：\n\n答：\n\n".chars().count(),
            18,
            "the template's characters"
        );
        assert_eq!(template_chars(1), 2 + 19);
        assert_eq!(template_chars(10), 2 + 9 * 19 + 20);
        // Twelve short turns: the template outweighs the text.
        let mut msgs = Vec::new();
        for i in 0..12 {
            msgs.push(json!({"role": "user", "content": format!("q{i}")}));
            msgs.push(json!({"role": "assistant", "content": "ok"}));
        }
        msgs.push(json!({"role": "user", "content": "last"}));
        let b = encode(
            json!({"model": "m", "messages": msgs, "max_tokens": 100}),
            None,
        )
        .unwrap();
        // What ChatGLM2's template renders for this history, in characters.
        let mut rendered = String::new();
        let history = b["history"].as_array().unwrap();
        for (i, pair) in history.iter().enumerate() {
            rendered.push_str(&format!(
                "[Round {}]\n\n问：{}\n\n答：{}\n\n",
                i + 1,
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ));
        }
        rendered.push_str(&format!(
            "[Round {}]\n\n问：{}\n\n答：",
            history.len() + 1,
            b["prompt"].as_str().unwrap()
        ));
        let prompt = rendered.chars().count() as u64;
        let max = b["max_length"].as_u64().unwrap();
        assert!(max >= prompt + 2 + 100, "{max} < {prompt} + 2 + 100");
    }

    #[test]
    fn max_length_and_sampling() {
        let msgs = json!([{"role": "user", "content": "abcd"}]);
        let b = encode(
            json!({"model": "m", "messages": msgs, "max_tokens": 10}),
            None,
        )
        .unwrap();
        // 10 + "abcd" + one template round (18 + 1 digit) + 2 special tokens.
        assert_eq!(b["max_length"], 35);
        let b = encode(
            json!({"model": "m", "messages": msgs, "max_tokens": 10}),
            Some(8),
        )
        .unwrap();
        assert_eq!(b["max_length"], 8);
        let b = encode(json!({"model": "m", "messages": msgs}), Some(8192)).unwrap();
        assert_eq!(b["max_length"], 8192);
        let b = encode(
            json!({"model": "m", "messages": msgs, "temperature": 0, "top_p": 0, "stop": ["x"], "seed": 1}),
            None,
        )
        .unwrap();
        assert_eq!(
            b,
            json!({"prompt": "abcd", "history": [], "temperature": 0.01, "top_p": 0.01})
        );
    }

    #[test]
    fn replies_decode() {
        let r = recorded_chat("chatglm", decode_chat_response);
        assert!(r.usage.is_none());
        assert!(r.id.starts_with("chatcmpl-"));
        let e =
            decode_chat_response(fixture("chatglm", "error_in_200.json").as_bytes()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
        assert!(e.message.contains("CUDA out of memory"));
        let e = decode_chat_response(b"Internal Server Error").unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
        let e = decode_chat_response(br#"{"detail":"Model not loaded"}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
        // An empty answer is still an answer.
        let r = decode_chat_response(br#"{"response":"","history":[],"status":200}"#).unwrap();
        assert_eq!(
            r.choices[0].message.content,
            Some(Content::Text(String::new()))
        );
    }

    #[test]
    fn errors_classify() {
        assert_fixture_errors("chatglm", classify_error_body, &[]);
    }
}
