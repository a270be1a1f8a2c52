//! The OpenAI-shaped pieces several backends share, written once: tool definitions
//! and tool calls as OpenAI-compatible servers read them, freshly minted ids, usage
//! as OpenAI-compatible servers report it, `malformed_response` errors, joining
//! system messages into one text, and the classifier for OpenAI-style error bodies.
//!
//! A backend whose wire differs in shape keeps its own structs and says why there;
//! what is here is only what at least two backends write or read byte for byte the
//! same way. Wire structs stay crate-private: nothing outside the wire modules sees
//! them.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::canonical::{
    unix_now, Content, Delta, FinishReason, Role, StreamEvent, StreamMeta, Tool, ToolCall, Usage,
};
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::Frame;

// === ids ===

/// A tool-call id for a call the backend sent without one: `call_` + 16 hex digits.
pub fn new_call_id() -> String {
    format!("call_{:016x}", rand::random::<u64>())
}

/// A tool-call id with 128 random bits (`call_` + 32 hex digits), for ids that key
/// state the gateway keeps across requests and so must not collide.
pub fn new_wide_call_id() -> String {
    format!("call_{:032x}", rand::random::<u128>())
}

/// A chat completion id for backends that send none: `chatcmpl-` + 24 hex digits.
pub fn new_completion_id() -> String {
    format!("chatcmpl-{:024x}", rand::random::<u128>() >> 32)
}

// === errors ===

/// A `malformed_response` error with `message`.
pub fn malformed(message: impl Into<String>) -> UpstreamError {
    UpstreamError::new(ErrorKind::MalformedResponse, message)
}

/// A `malformed_response` error for `what` (a body, an event…) that failed to parse
/// as `expected` (for example "a Gemini GenerateContentResponse").
pub fn malformed_json(what: &str, expected: &str, e: &serde_json::Error) -> UpstreamError {
    malformed(format!("backend sent {what} that is not {expected}: {e}"))
}

/// The first 300 bytes of an error body that is not JSON (an HTML page, a
/// proxy's text), as text for the error message.
pub fn body_excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
}

/// What describes the error in an error body: the `error` member of a JSON
/// object, or the whole object; `Err` with the [`body_excerpt`] of a body that is
/// not a JSON object.
pub fn error_member(body: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut o)) => Ok(o.remove("error").unwrap_or(Value::Object(o))),
        _ => Err(body_excerpt(body)),
    }
}

/// Classifies an OpenAI-style error object (`{"message","type","code","param"}`, or
/// a bare string) that came with `status`.
pub fn classify_error_value(status: u16, err: &Value) -> UpstreamError {
    let (message, etype, code) = match err {
        Value::String(s) => (s.clone(), String::new(), String::new()),
        Value::Object(o) => {
            let s = |k: &str| match o.get(k) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            };
            (s("message"), s("type"), s("code"))
        }
        other => (other.to_string(), String::new(), String::new()),
    };
    let lower = message.to_ascii_lowercase();
    let base = if status == 200 {
        // An error inside a successful response: classify by its own words.
        match code.parse::<u16>() {
            Ok(c) if (400..600).contains(&c) => ErrorKind::from_status(c),
            _ => match etype.as_str() {
                "rate_limit_error" | "rate_limit_exceeded" => ErrorKind::RateLimited,
                "invalid_request_error" => ErrorKind::BadRequest,
                "authentication_error" => ErrorKind::Auth,
                _ => ErrorKind::Overloaded,
            },
        }
    } else if status == 402 {
        // Payment required (DeepSeek's "Insufficient Balance"): the account, not
        // the request, is at fault, and retrying cannot help.
        ErrorKind::Auth
    } else {
        ErrorKind::from_status(status)
    };
    let kind = if code == "context_length_exceeded"
        || etype == "exceed_context_size_error"
        || lower.contains("maximum context length")
        || lower.contains("context length")
        || lower.contains("context window")
        || lower.contains("prompt is too long")
    {
        ErrorKind::ContextLength
    } else if code == "content_filter"
        || code == "content_policy_violation"
        || etype == "content_filter"
    {
        ErrorKind::ContentFilter
    } else {
        base
    };
    UpstreamError::from_backend(kind, message, status)
}

/// Classifies a backend's non-2xx answer from its status and an OpenAI-style body
/// (`{"error": …}`, `{"detail": …}`, a bare object, or text).
pub fn classify_error_body(status: u16, body: &[u8]) -> UpstreamError {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut o)) => {
            let err = o
                .remove("error")
                .or_else(|| o.remove("detail").map(|d| Value::String(d.to_string())))
                .unwrap_or(Value::Object(o));
            classify_error_value(status, &err)
        }
        _ => {
            let mut e = classify_error_value(status, &Value::String(body_excerpt(body)));
            if e.message.trim().is_empty() {
                e.message = format!("backend answered HTTP {status}");
            }
            e
        }
    }
}

/// What describes the error in the data of an SSE `event: error`: its `error`
/// member, or the whole data (JSON, or else text).
pub fn error_event_value(data: &str) -> Value {
    serde_json::from_str::<Value>(data)
        .map(|v| v.get("error").cloned().unwrap_or(v))
        .unwrap_or_else(|_| Value::String(data.to_owned()))
}

/// The error an OpenAI-style stream sends in-band as an SSE `event: error`,
/// classified.
pub fn error_event(data: &str) -> UpstreamError {
    classify_error_value(200, &error_event_value(data))
}

/// The data of one frame of an OpenAI-style stream, or the error the frame
/// carries: an SSE `event: error`, or an `error: {json}` line (older llama.cpp
/// builds), made an error by `error` from its text.
pub fn stream_data(
    frame: &Frame,
    error: impl FnOnce(&str) -> UpstreamError,
) -> Result<&str, UpstreamError> {
    match frame {
        Frame::Sse(ev) => {
            if let Some((_, v)) = ev.other.iter().find(|(k, _)| k == "error") {
                return Err(error(v));
            }
            if ev.event.as_deref() == Some("error") {
                return Err(error(&ev.data));
            }
            Ok(&ev.data)
        }
        Frame::Line(l) => Ok(l),
    }
}

/// Maps the finish-reason words of OpenAI-compatible servers onto the canonical set.
pub fn finish_reason_from_wire(s: &str) -> FinishReason {
    match s {
        // Zhipu: the model ran into its context window while answering.
        "length" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        "content_filter" | "sensitive" => FinishReason::ContentFilter,
        // DeepSeek: the answer was cut for lack of server resources.
        "error" | "abort" | "network_error" | "insufficient_system_resource" => FinishReason::Error,
        _ => FinishReason::Stop,
    }
}

// === streams ===

/// Pushes the `Meta` event that opens a stream, once: only while `*started` is
/// false, which it then sets; `meta` is called only then.
pub fn open_stream(
    started: &mut bool,
    out: &mut Vec<StreamEvent>,
    meta: impl FnOnce() -> StreamMeta,
) {
    if !*started {
        *started = true;
        out.push(StreamEvent::Meta(meta()));
    }
}

/// Pushes `delta` when it carries output or a finish reason; the first delta
/// pushed for a choice (`*started` false) also announces the assistant role.
pub fn push_delta(started: &mut bool, mut delta: Delta, out: &mut Vec<StreamEvent>) {
    if delta.has_output() || delta.finish_reason.is_some() {
        if !*started {
            *started = true;
            delta.role = Some(Role::Assistant);
        }
        out.push(StreamEvent::Delta(delta));
    }
}

/// Ends a stream: its usage when there is one, then `Done`.
pub fn close_stream(usage: Option<Usage>, out: &mut Vec<StreamEvent>) {
    if let Some(u) = usage {
        out.push(StreamEvent::Usage(u));
    }
    out.push(StreamEvent::Done);
}

/// Ends a single-choice stream whose last event carries the finish reason: a
/// delta with `finish`, the usage when there is one, then `Done`.
pub fn finish_stream(finish: FinishReason, usage: Option<Usage>, out: &mut Vec<StreamEvent>) {
    out.push(StreamEvent::Delta(Delta {
        finish_reason: Some(finish),
        ..Delta::default()
    }));
    close_stream(usage, out);
}

/// A stream's `Meta` with no fingerprint; `created` is now when the backend sent
/// none.
pub fn stream_meta(id: String, created: Option<u64>, model: Option<String>) -> StreamMeta {
    StreamMeta {
        id,
        created: created.unwrap_or_else(unix_now),
        model: model.unwrap_or_default(),
        system_fingerprint: None,
    }
}

// === system messages ===

/// Appends `text` to `buf`, with `sep` between it and what `buf` already holds:
/// how backends with a single system text (or a single turn) join several
/// messages into it.
pub fn push_joined(buf: &mut String, sep: &str, text: &str) {
    if !buf.is_empty() {
        buf.push_str(sep);
    }
    buf.push_str(text);
}

/// Appends a turn of `items` said by `role` to `turns`, for APIs that want
/// turns to alternate: an empty turn is dropped (such APIs reject it) and a
/// turn by the same role as the last one is merged into it.
pub fn push_turn<R: PartialEq, T>(turns: &mut Vec<(R, Vec<T>)>, role: R, items: Vec<T>) {
    if items.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some((r, last)) if *r == role => last.extend(items),
        _ => turns.push((role, items)),
    }
}

/// Appends the text of a system or developer message to `system`, a blank line
/// apart from what is there: for backends that take one system text. Text that
/// `skip` refuses (empty, blank) is left out.
pub fn join_system(system: &mut String, content: Option<&Content>, skip: impl Fn(&str) -> bool) {
    if let Some(c) = content {
        let t = c.text();
        if !skip(&t) {
            push_joined(system, "\n\n", &t);
        }
    }
}

// === tools, OpenAI-shaped (`{"type":"function","function":{…}}`) ===

/// A function call's name and arguments as JSON text.
#[derive(Serialize)]
pub(crate) struct OutFunction<'a> {
    pub name: &'a str,
    pub arguments: &'a str,
}

impl<'a> OutFunction<'a> {
    pub fn new(call: &'a ToolCall) -> Self {
        OutFunction {
            name: &call.name,
            arguments: &call.arguments,
        }
    }
}

/// One entry of an assistant message's `tool_calls`.
#[derive(Serialize)]
pub(crate) struct OutToolCall<'a> {
    id: Cow<'a, str>,
    #[serde(rename = "type")]
    kind: &'static str,
    function: OutFunction<'a>,
}

/// `calls` as OpenAI-shaped `tool_calls`, every id made portable.
pub(crate) fn out_tool_calls(calls: &[ToolCall]) -> Vec<OutToolCall<'_>> {
    calls
        .iter()
        .map(|c| OutToolCall {
            id: super::tool_id::portable(&c.id),
            kind: "function",
            function: OutFunction::new(c),
        })
        .collect()
}

#[derive(Serialize)]
pub(crate) struct OutFunctionDef<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

/// One entry of a request's `tools`.
#[derive(Serialize)]
pub(crate) struct OutTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: OutFunctionDef<'a>,
}

/// `tools` as OpenAI-shaped function tools. `strict` is written only when
/// `with_strict` (backends that do not know the field are not sent it).
pub(crate) fn out_tools(tools: &[Tool], with_strict: bool) -> Vec<OutTool<'_>> {
    tools
        .iter()
        .map(|t| OutTool {
            kind: "function",
            function: OutFunctionDef {
                name: &t.name,
                description: t.description.as_deref(),
                parameters: t.parameters.as_ref(),
                strict: t.strict.filter(|_| with_strict),
            },
        })
        .collect()
}

// === tool calls from a backend, OpenAI-shaped ===

/// Tool-call arguments: a JSON string by the spec, but some servers send an object.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum ArgText {
    Text(String),
    Json(Value),
}

impl ArgText {
    pub fn into_string(self) -> String {
        match self {
            ArgText::Text(s) => s,
            ArgText::Json(v) => v.to_string(),
        }
    }
}

/// A call's `function`: its name and arguments, either possibly missing (stream
/// fragments carry only some of them).
#[derive(Deserialize)]
pub(crate) struct InFunction {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub arguments: Option<ArgText>,
}

impl InFunction {
    /// The name and the arguments as text, as far as they were sent.
    pub fn into_parts(self) -> (Option<String>, Option<String>) {
        (self.name, self.arguments.map(ArgText::into_string))
    }

    /// A whole call under `id`: what is missing is empty.
    pub fn into_call(self, id: String) -> ToolCall {
        ToolCall {
            id,
            name: self.name.unwrap_or_default(),
            arguments: self.arguments.map(ArgText::into_string).unwrap_or_default(),
        }
    }
}

/// One entry of a message's or a delta's `tool_calls`.
#[derive(Deserialize)]
pub(crate) struct InToolCall {
    #[serde(default)]
    pub index: Option<u32>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub function: Option<InFunction>,
}

impl InToolCall {
    /// A whole call (a response's message): an empty or missing id is minted.
    pub fn into_call(self) -> ToolCall {
        let id = self
            .id
            .filter(|i| !i.is_empty())
            .unwrap_or_else(new_call_id);
        match self.function {
            Some(f) => f.into_call(id),
            None => ToolCall {
                id,
                name: String::new(),
                arguments: String::new(),
            },
        }
    }

    /// The name and the arguments as text of a stream fragment.
    pub fn parts(&mut self) -> (Option<String>, Option<String>) {
        self.function
            .take()
            .map(InFunction::into_parts)
            .unwrap_or_default()
    }
}

// === usage ===

/// Canonical usage from a backend's counts: its total if it sent one, else the
/// saturating sum; cached and reasoning counts as reported.
pub fn reported_usage(
    prompt: u32,
    completion: u32,
    total: Option<u32>,
    cached: Option<u32>,
    reasoning: Option<u32>,
) -> Usage {
    Usage {
        cached_tokens: cached,
        reasoning_tokens: reasoning,
        ..Usage::reported(prompt, completion, total)
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
pub(crate) struct InPromptDetails {
    #[serde(default)]
    pub cached_tokens: Option<u32>,
}

#[derive(Deserialize, Default, Clone, Copy)]
pub(crate) struct InCompletionDetails {
    #[serde(default)]
    pub reasoning_tokens: Option<u32>,
}

/// `usage` as OpenAI-compatible servers report it.
#[derive(Deserialize)]
pub(crate) struct InUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    total_tokens: Option<u32>,
    #[serde(default)]
    prompt_tokens_details: Option<InPromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<InCompletionDetails>,
}

impl InUsage {
    pub fn canonical(&self) -> Usage {
        reported_usage(
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.prompt_tokens_details.and_then(|d| d.cached_tokens),
            self.completion_tokens_details
                .and_then(|d| d.reasoning_tokens),
        )
    }
}

/// One way to drive every backend's decoders in tests: recorded samples from
/// `tests/fixtures/<kind>/`, streams through the codec's own framing and
/// [`StreamDecoder`](crate::backend::StreamDecoder), bodies through the codec.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used)]

    use crate::backend::Codec;
    use crate::canonical::{
        ChatRequest, ChatResponse, Content, Delta, EmbeddingEncoding, EmbeddingInput,
        EmbeddingsRequest, FinishReason, Message, Params, StreamEvent, StreamMeta, ToolCallDelta,
        Usage,
    };
    use crate::error::{ErrorKind, UpstreamError};
    use crate::framing::FrameDecoder;

    /// The text of `tests/fixtures/<kind>/<name>` (`name` may hold subfolders).
    pub fn fixture(kind: &str, name: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(kind)
            .join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// Feeds `bytes` to a fresh stream decoder of `codec` in pieces of `chunk`
    /// bytes (0: all at once), through the codec's framing, including the frame
    /// left unterminated at the end. Stops at the first error. Returns the events
    /// decoded, the outcome, and whether the decoder saw the end of the stream.
    pub fn decode_stream(
        codec: &dyn Codec,
        bytes: &[u8],
        chunk: usize,
    ) -> (Vec<StreamEvent>, Result<(), UpstreamError>, bool) {
        let mut frames = FrameDecoder::new(codec.stream_framing());
        let mut dec = codec.stream_decoder();
        let mut out = Vec::new();
        let chunk = if chunk == 0 {
            bytes.len().max(1)
        } else {
            chunk
        };
        for piece in bytes.chunks(chunk) {
            frames.push(piece);
            while let Some(f) = frames.next_frame() {
                if let Err(e) = dec.frame(f, &mut out) {
                    return (out, Err(e), dec.finished());
                }
            }
        }
        if let Some(f) = frames.finish() {
            if let Err(e) = dec.frame(f, &mut out) {
                return (out, Err(e), dec.finished());
            }
        }
        (out, Ok(()), dec.finished())
    }

    /// Decodes `bytes` whole and then cut into pieces of each of `chunks` bytes:
    /// every decoding must succeed, reach the end of the stream and give the same
    /// events (but for the clock). Returns the events of the whole decoding.
    pub fn same_at_every_split(
        codec: &dyn Codec,
        bytes: &[u8],
        chunks: &[usize],
    ) -> Vec<StreamEvent> {
        let (whole, result, finished) = decode_stream(codec, bytes, 0);
        result.unwrap();
        assert!(finished);
        let expected = without_clock(whole.clone());
        for &chunk in chunks {
            let (events, result, finished) = decode_stream(codec, bytes, chunk);
            result.unwrap();
            assert!(finished, "chunk {chunk}");
            assert_eq!(without_clock(events), expected, "chunk {chunk}");
        }
        whole
    }

    /// The deltas among `events`.
    pub fn deltas(events: &[StreamEvent]) -> Vec<&Delta> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Delta(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    /// A complete (non-streamed) response body through `codec`.
    pub fn decode_response(codec: &dyn Codec, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        codec.chat_response(body)
    }

    /// The events of a whole stream that must decode and reach its end marker.
    pub fn stream_events(
        codec: &dyn Codec,
        bytes: &[u8],
    ) -> Result<Vec<StreamEvent>, UpstreamError> {
        let (out, result, finished) = decode_stream(codec, bytes, 0);
        result?;
        assert!(finished, "the stream did not reach its end");
        Ok(out)
    }

    /// The error samples every backend records (`tests/fixtures/<kind>/`), with
    /// the status each came with and the kind it must classify as.
    pub const RECORDED_ERRORS: [(u16, &str, ErrorKind); 5] = [
        (429, "error_429.json", ErrorKind::RateLimited),
        (500, "error_500.json", ErrorKind::Overloaded),
        (401, "error_401.json", ErrorKind::Auth),
        (400, "error_400.json", ErrorKind::BadRequest),
        (400, "error_400_context.json", ErrorKind::ContextLength),
    ];

    /// Classifies the [`RECORDED_ERRORS`] and the backend's own samples `more`
    /// (`tests/fixtures/<kind>/<name>`) with the status each came with, and checks
    /// the kind, that a non-200 status is kept and that the message says something.
    pub fn assert_fixture_errors(
        kind: &str,
        classify: fn(u16, &[u8]) -> UpstreamError,
        more: &[(u16, &str, ErrorKind)],
    ) {
        for &(status, name, expected) in RECORDED_ERRORS.iter().chain(more) {
            let e = classify(status, fixture(kind, name).as_bytes());
            assert_eq!(e.kind, expected, "{name}: {}", e.message);
            // An error inside a 200 answer is in-band: it carries no HTTP status.
            let kept = (status != 200).then_some(status);
            assert_eq!(e.status, kept, "{name}");
            assert!(!e.message.is_empty(), "{name}");
        }
    }

    /// The text every backend's recorded `chat.json` answers with.
    pub const RECORDED_TEXT: &str = "Hello from the fake upstream.";

    /// Decodes `tests/fixtures/<kind>/chat.json` with `decode` and checks the
    /// recorded answer every backend shares: its text and a `stop` finish. Returns
    /// the response for the backend's own checks (id, usage).
    pub fn recorded_chat(
        kind: &str,
        decode: fn(&[u8]) -> Result<ChatResponse, UpstreamError>,
    ) -> ChatResponse {
        let r = decode(fixture(kind, "chat.json").as_bytes()).unwrap();
        assert_eq!(
            r.choices[0].message.content,
            Some(Content::Text(RECORDED_TEXT.into()))
        );
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Stop));
        r
    }

    /// A plain request for `messages`: no parameters, no tools, not streamed.
    pub fn request(messages: Vec<Message>) -> ChatRequest {
        ChatRequest {
            model: "route".into(),
            messages,
            params: Params::default(),
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
            stream: false,
            include_usage: false,
            extra: serde_json::Map::new(),
        }
    }

    /// An embeddings request for `texts`: floats, no dimensions, no user.
    pub fn embeddings_request(texts: &[&str]) -> EmbeddingsRequest {
        EmbeddingsRequest {
            model: "route".into(),
            input: EmbeddingInput::Texts(texts.iter().map(|t| (*t).to_owned()).collect()),
            encoding: EmbeddingEncoding::Float,
            dimensions: None,
            user: None,
            extra: serde_json::Map::new(),
        }
    }

    /// A client's OpenAI-shaped request body, decoded.
    pub fn client_request(body: serde_json::Value) -> ChatRequest {
        crate::backend::openai::decode_chat_request(body.to_string().as_bytes()).unwrap()
    }

    /// The text of every delta, joined.
    pub fn text_of(events: &[StreamEvent]) -> String {
        deltas(events)
            .into_iter()
            .filter_map(|d| d.content.clone())
            .collect()
    }

    /// The finish reasons, in order.
    pub fn finishes(events: &[StreamEvent]) -> Vec<FinishReason> {
        deltas(events)
            .into_iter()
            .filter_map(|d| d.finish_reason)
            .collect()
    }

    /// The first finish reason.
    pub fn finish_of(events: &[StreamEvent]) -> Option<FinishReason> {
        deltas(events).into_iter().find_map(|d| d.finish_reason)
    }

    /// Every tool-call fragment, in order.
    pub fn call_deltas(events: &[StreamEvent]) -> Vec<&ToolCallDelta> {
        deltas(events)
            .into_iter()
            .flat_map(|d| &d.tool_calls)
            .collect()
    }

    /// The usage events.
    pub fn usages(events: &[StreamEvent]) -> Vec<&Usage> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Usage(u) => Some(u),
                _ => None,
            })
            .collect()
    }

    /// `events` with the stream's creation time zeroed, to compare two decodings.
    pub fn without_clock(events: Vec<StreamEvent>) -> Vec<StreamEvent> {
        events
            .into_iter()
            .map(|e| match e {
                StreamEvent::Meta(m) => StreamEvent::Meta(StreamMeta { created: 0, ..m }),
                other => other,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::fixture;
    use super::*;

    #[test]
    fn backend_errors_classify_by_status_and_body() {
        let cases: [(u16, &str, ErrorKind); 9] = [
            (
                429,
                &fixture("openai", "error_429.json"),
                ErrorKind::RateLimited,
            ),
            (401, &fixture("openai", "error_401.json"), ErrorKind::Auth),
            (
                400,
                &fixture("openai", "error_400_context.json"),
                ErrorKind::ContextLength,
            ),
            (
                500,
                &fixture("openai", "error_500.json"),
                ErrorKind::Overloaded,
            ),
            // llama.cpp
            (
                400,
                r#"{"error":{"code":400,"message":"the request exceeds the available context size","type":"exceed_context_size_error","n_prompt_tokens":9000,"n_ctx":4096}}"#,
                ErrorKind::ContextLength,
            ),
            (
                503,
                r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#,
                ErrorKind::Overloaded,
            ),
            // vLLM's flat error, FastAPI's detail, Ollama's string
            (
                400,
                r#"{"object":"error","message":"bad temperature","type":"BadRequestError","param":null,"code":400}"#,
                ErrorKind::BadRequest,
            ),
            (
                400,
                r#"{"detail":"Invalid request"}"#,
                ErrorKind::BadRequest,
            ),
            (400, r#"{"error":"content_filter"}"#, ErrorKind::BadRequest),
        ];
        for (status, body, kind) in cases {
            let e = classify_error_body(status, body.as_bytes());
            assert_eq!(e.kind, kind, "{status} {body}");
            assert!(!e.message.is_empty());
        }
        let e = classify_error_body(
            400,
            br#"{"error":{"code":"content_filter","param":"prompt","message":"The response was filtered"}}"#,
        );
        assert_eq!(e.kind, ErrorKind::ContentFilter);
        assert_eq!(
            classify_error_body(502, b"Bad Gateway").kind,
            ErrorKind::Overloaded
        );
    }
}
