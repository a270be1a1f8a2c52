//! The Alibaba DashScope native wire format (text generation
//! `/services/aigc/text-generation/generation`, its multimodal sibling for image
//! input, and `/services/embeddings/text-embedding/text-embedding`), backend
//! direction only. Wire structs are private; the codec in `provider::dashscope` sees
//! canonical types and the functions below.
//!
//! Translation notes:
//! - Messages keep the OpenAI shape (`system`/`user`/`assistant`/`tool`, string
//!   arguments, `tool_call_id`); `developer` becomes `system`. Parameters go under
//!   `parameters` with `result_format: "message"`.
//! - Streams ask for `incremental_output: true`, so each event carries only new
//!   text, reasoning and tool-call fragments (OpenAI-like, keyed by `index`). The
//!   decoder trusts that and does not diff cumulative text: guessing "this event
//!   repeats everything so far" from a prefix match corrupts answers that legitimately
//!   repeat themselves, and would keep the whole answer in memory.
//! - A non-final stream event has `finish_reason` `"null"` (a string), null or none;
//!   the stream ends at the first event with a real one (there is no `[DONE]`).
//!   Usage on events is a running total: only the last is emitted, at the end.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{Codec, HttpCall, Kind, Sectionless, StreamDecoder};
use crate::backend::common::{
    body_excerpt, close_stream, finish_reason_from_wire, malformed, malformed_json, new_call_id,
    new_completion_id, open_stream, out_tool_calls, out_tools, push_delta, reported_usage,
    stream_meta, InCompletionDetails, InPromptDetails, InToolCall, OutTool, OutToolCall,
};
use crate::canonical::*;
use crate::config::Capabilities;
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::Frame;

/// Chat (text in, text out).
pub const TEXT_GENERATION_PATH: &str = "/services/aigc/text-generation/generation";
/// Chat with image input (qwen-vl and similar models).
pub const MULTIMODAL_GENERATION_PATH: &str = "/services/aigc/multimodal-generation/generation";
pub const EMBEDDINGS_PATH: &str = "/services/embeddings/text-embedding/text-embedding";

/// Largest temperature DashScope accepts: its range is [0, 2).
const MAX_TEMPERATURE: f64 = 1.99;
/// Smallest top_p DashScope accepts: its range is (0, 1].
const MIN_TOP_P: f64 = 0.01;

/// Request fields the gateway does not model that are DashScope parameters; when a
/// client or a route override sends them, they go into `parameters` as they are.
const PASSTHROUGH_PARAMETERS: &[&str] = &[
    "top_k",
    "repetition_penalty",
    "enable_thinking",
    "thinking_budget",
    "enable_search",
    "search_options",
    "translation_options",
    "logprobs",
    "top_logprobs",
    "vl_high_resolution_images",
];

// === encoding a request ===

/// One item of a multimodal `content` array.
#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum OutItem<'a> {
    Text(Cow<'a, str>),
    Image(&'a str),
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutContent<'a> {
    Text(Cow<'a, str>),
    Items(Vec<OutItem<'a>>),
}

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    content: OutContent<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OutToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

#[derive(Serialize)]
struct OutInput<'a> {
    messages: Vec<OutMessage<'a>>,
}

#[derive(Serialize)]
struct OutParameters<'a> {
    result_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    incremental_output: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Serialize)]
struct OutRequest<'a> {
    model: &'a str,
    input: OutInput<'a>,
    parameters: OutParameters<'a>,
}

/// True when a message carries an image: the request must then go to the
/// multimodal endpoint (text generation takes string content only).
pub fn needs_multimodal(req: &ChatRequest) -> bool {
    req.messages.iter().any(|m| {
        matches!(&m.content, Some(Content::Parts(parts))
            if parts.iter().any(|p| matches!(p, Part::Image { .. })))
    })
}

fn content<'a>(c: Option<&'a Content>, multimodal: bool) -> OutContent<'a> {
    if !multimodal {
        return OutContent::Text(c.map(Content::text).unwrap_or_default());
    }
    let mut items = Vec::new();
    match c {
        None => {}
        Some(Content::Text(t)) => items.push(OutItem::Text(Cow::Borrowed(t))),
        Some(Content::Parts(parts)) => {
            for p in parts {
                match p {
                    Part::Text(t) => items.push(OutItem::Text(Cow::Borrowed(t))),
                    // DashScope takes image URLs and `data:` URLs alike.
                    Part::Image { url, .. } => items.push(OutItem::Image(url)),
                    Part::Other(_) => {}
                }
            }
        }
    }
    OutContent::Items(items)
}

fn tool_choice(req: &ChatRequest) -> Option<Value> {
    if req.tools.is_empty() {
        return None;
    }
    let func = |name: &str| json!({"type": "function", "function": {"name": name}});
    Some(match req.tool_choice.as_ref()? {
        ToolChoice::None => json!("none"),
        ToolChoice::Auto => json!("auto"),
        // DashScope documents only auto / none / a named function: "required" forces
        // the only tool when there is one, and is "auto" otherwise.
        ToolChoice::Required => match req.tools.as_slice() {
            [only] => func(&only.name),
            _ => json!("auto"),
        },
        ToolChoice::Function(name) => func(name),
    })
}

/// Encodes a canonical chat request as a DashScope generation body for `model`.
/// `multimodal` selects the content shape of the multimodal endpoint (see
/// [`needs_multimodal`]).
pub fn encode_chat_request(req: &ChatRequest, model: &str, multimodal: bool) -> Vec<u8> {
    let mut names: Vec<(&str, &str)> = Vec::new();
    let messages = req
        .messages
        .iter()
        .map(|m| {
            let role = match m.role {
                Role::System | Role::Developer => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
            };
            for c in &m.tool_calls {
                names.push((c.id.as_str(), c.name.as_str()));
            }
            let name = match m.role {
                // A tool result names the function it answers.
                Role::Tool => m
                    .tool_call_id
                    .as_deref()
                    .and_then(|id| names.iter().rev().find(|(i, _)| *i == id))
                    .map(|(_, n)| *n)
                    .or(m.name.as_deref()),
                _ => None,
            };
            OutMessage {
                role,
                content: content(m.content.as_ref(), multimodal),
                tool_calls: out_tool_calls(&m.tool_calls),
                tool_call_id: m.tool_call_id.as_deref().map(super::tool_id::portable),
                name,
            }
        })
        .collect();
    let p = &req.params;
    let mut extra: Map<String, Value> = PASSTHROUGH_PARAMETERS
        .iter()
        .filter_map(|k| req.extra.get(*k).map(|v| ((*k).to_owned(), v.clone())))
        .collect();
    // Qwen3 models think by default and then refuse non-streaming calls; a
    // non-streaming request turns thinking off unless it asked for it.
    if !req.stream && !extra.contains_key("enable_thinking") {
        extra.insert("enable_thinking".into(), Value::Bool(false));
    }
    let out = OutRequest {
        model,
        input: OutInput { messages },
        parameters: OutParameters {
            result_format: "message",
            incremental_output: req.stream.then_some(true),
            temperature: p.temperature.map(|t| t.clamp(0.0, MAX_TEMPERATURE)),
            top_p: p.top_p.map(|t| t.clamp(MIN_TOP_P, 1.0)),
            max_tokens: p.output_limit(),
            // DashScope seeds are unsigned 31-bit.
            seed: p.seed.map(|s| s.rem_euclid(1 << 31)),
            stop: &p.stop,
            presence_penalty: p.presence_penalty.map(|v| v.clamp(-2.0, 2.0)),
            n: p.n,
            // DashScope does not know `strict`.
            tools: out_tools(&req.tools, false),
            tool_choice: tool_choice(req),
            parallel_tool_calls: req.parallel_tool_calls.filter(|_| !req.tools.is_empty()),
            // json_schema is asked as JSON mode: the native API documents json_object.
            response_format: match req.response_format {
                Some(ResponseFormat::JsonObject) | Some(ResponseFormat::JsonSchema(_)) => {
                    Some(json!({"type": "json_object"}))
                }
                Some(ResponseFormat::Text) => Some(json!({"type": "text"})),
                None => None,
            },
            extra,
        },
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

// === decoding a response ===

/// `content` is a string from text generation and `[{"text": …}, …]` from the
/// multimodal endpoint.
#[derive(Deserialize)]
#[serde(untagged)]
enum InContent {
    Text(String),
    Items(Vec<Value>),
}

impl InContent {
    fn into_text(self) -> String {
        match self {
            InContent::Text(t) => t,
            InContent::Items(items) => items
                .iter()
                .filter_map(|i| i.get("text").and_then(Value::as_str))
                .collect(),
        }
    }
}

#[derive(Deserialize, Default)]
struct InMessage {
    #[serde(default)]
    content: Option<InContent>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<InToolCall>>,
}

#[derive(Deserialize)]
struct InChoice {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    message: Option<InMessage>,
}

#[derive(Deserialize)]
struct InOutput {
    #[serde(default)]
    choices: Option<Vec<InChoice>>,
    /// `result_format: "text"` answers (not requested, tolerated).
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
}

/// DashScope's own names for the counts (`input_tokens`, `output_tokens`,
/// `output_tokens_details`), so not the OpenAI-shaped [`crate::backend::common::InUsage`]: serde
/// aliases would refuse an answer that carried both spellings.
#[derive(Deserialize)]
struct InUsage {
    #[serde(default)]
    input_tokens: u32,
    #[serde(default)]
    output_tokens: u32,
    #[serde(default)]
    total_tokens: Option<u32>,
    #[serde(default)]
    prompt_tokens_details: Option<InPromptDetails>,
    #[serde(default)]
    output_tokens_details: Option<InCompletionDetails>,
}

impl InUsage {
    fn canonical(self) -> Usage {
        reported_usage(
            self.input_tokens,
            self.output_tokens,
            self.total_tokens,
            self.prompt_tokens_details.and_then(|d| d.cached_tokens),
            self.output_tokens_details.and_then(|d| d.reasoning_tokens),
        )
    }
}

#[derive(Deserialize)]
struct InResponse {
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    output: Option<InOutput>,
    #[serde(default)]
    usage: Option<InUsage>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl InResponse {
    /// An error answer: a non-empty `code` and no output.
    fn error(&self) -> Option<UpstreamError> {
        let code = self.code.as_deref().filter(|c| !c.is_empty())?;
        if self.output.is_some() {
            return None;
        }
        Some(classify(200, code, self.message.as_deref().unwrap_or("")))
    }

    fn choices(output: InOutput) -> Vec<InChoice> {
        match output.choices {
            Some(c) => c,
            None => vec![InChoice {
                index: Some(0),
                finish_reason: output.finish_reason,
                message: Some(InMessage {
                    content: output.text.map(InContent::Text),
                    ..InMessage::default()
                }),
            }],
        }
    }
}

/// A real finish reason: not the `"null"` string of non-final stream events.
fn real_finish(s: Option<&str>) -> Option<&str> {
    s.filter(|f| !f.is_empty() && *f != "null")
}

fn finish(reason: &str, has_calls: bool) -> FinishReason {
    let f = match reason {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "tool_calls" => FinishReason::ToolCalls,
        other => finish_reason_from_wire(other),
    };
    if f == FinishReason::Stop && has_calls {
        FinishReason::ToolCalls
    } else {
        f
    }
}

/// What a generation answer that fails to parse is said not to be.
const GENERATION: &str = "a DashScope generation answer";

/// Decodes a DashScope generation body (HTTP 2xx).
pub fn decode_chat_response(body: &[u8]) -> Result<ChatResponse, UpstreamError> {
    let r: InResponse =
        serde_json::from_slice(body).map_err(|e| malformed_json("a body", GENERATION, &e))?;
    if let Some(e) = r.error() {
        return Err(e);
    }
    let Some(output) = r.output else {
        return Err(malformed("DashScope response has no `output`"));
    };
    let choices = InResponse::choices(output)
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let m = c.message.unwrap_or_default();
            let tool_calls: Vec<ToolCall> = m
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .map(InToolCall::into_call)
                .collect();
            let finish_reason =
                real_finish(c.finish_reason.as_deref()).map(|f| finish(f, !tool_calls.is_empty()));
            Choice {
                index: c.index.unwrap_or(i as u32),
                message: Message {
                    role: Role::Assistant,
                    content: m.content.map(|c| Content::Text(c.into_text())),
                    name: None,
                    tool_calls,
                    tool_call_id: None,
                    reasoning: m.reasoning_content.filter(|r| !r.is_empty()),
                },
                finish_reason,
            }
        })
        .collect();
    Ok(ChatResponse {
        id: r.request_id.unwrap_or_else(new_completion_id),
        created: unix_now(),
        model: String::new(),
        choices,
        usage: r.usage.map(InUsage::canonical),
        system_fingerprint: None,
    })
}

// --- streams ---

#[derive(Debug, Default, Clone)]
struct ChoiceState {
    started: bool,
    /// Tool-call indexes whose first fragment went out.
    calls: Vec<u32>,
}

/// State of one DashScope SSE stream (`X-DashScope-SSE: enable`,
/// `incremental_output: true`).
#[derive(Debug, Default)]
pub struct EventDecoder {
    started: bool,
    done: bool,
    choices: Vec<ChoiceState>,
    usage: Option<Usage>,
}

impl EventDecoder {
    /// Decodes one SSE event: its `event:` name and `data`.
    pub fn decode(
        &mut self,
        event: Option<&str>,
        data: &str,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), UpstreamError> {
        let data = data.trim();
        if event == Some("error") {
            return Err(classify_error_body(200, data.as_bytes()));
        }
        if data.is_empty() || self.done {
            return Ok(());
        }
        let r: InResponse = serde_json::from_str(data)
            .map_err(|e| malformed_json("a stream event", GENERATION, &e))?;
        if let Some(e) = r.error() {
            return Err(e);
        }
        open_stream(&mut self.started, out, || {
            stream_meta(
                r.request_id.clone().unwrap_or_else(new_completion_id),
                None,
                None,
            )
        });
        if let Some(u) = r.usage {
            self.usage = Some(u.canonical());
        }
        let mut finished = false;
        for (i, c) in r
            .output
            .map(InResponse::choices)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let index = super::choice_index(c.index.unwrap_or(i as u32))?;
            let slot = index as usize;
            if self.choices.len() <= slot {
                self.choices.resize(slot + 1, ChoiceState::default());
            }
            let state = &mut self.choices[slot];
            let m = c.message.unwrap_or_default();
            let mut delta = Delta {
                choice: index,
                content: m
                    .content
                    .map(InContent::into_text)
                    .filter(|t| !t.is_empty()),
                reasoning: m.reasoning_content.filter(|t| !t.is_empty()),
                ..Delta::default()
            };
            for (pos, mut t) in m.tool_calls.unwrap_or_default().into_iter().enumerate() {
                let call_index = t.index.unwrap_or(pos as u32);
                let first = !state.calls.contains(&call_index);
                let (name, arguments) = t.parts();
                if first {
                    state.calls.push(call_index);
                }
                let frag = ToolCallDelta {
                    index: call_index,
                    // Only the first fragment of a call carries its id and name.
                    id: first.then(|| t.id.filter(|s| !s.is_empty()).unwrap_or_else(new_call_id)),
                    name: if first {
                        name.filter(|n| !n.is_empty())
                    } else {
                        None
                    },
                    arguments: arguments.filter(|a| !a.is_empty()),
                };
                if frag.id.is_some() || frag.name.is_some() || frag.arguments.is_some() {
                    delta.tool_calls.push(frag);
                }
            }
            if let Some(f) = real_finish(c.finish_reason.as_deref()) {
                delta.finish_reason = Some(finish(f, !state.calls.is_empty()));
                finished = true;
            }
            push_delta(&mut state.started, delta, out);
        }
        if finished {
            self.done = true;
            close_stream(self.usage.take(), out);
        }
        Ok(())
    }
}

impl StreamDecoder for EventDecoder {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        // `id:` and the `:HTTP_STATUS/200` comment line are dropped by framing.
        let (event, data) = super::event_and_data(&frame);
        self.decode(event, data, out)
    }

    /// True once an event with a real finish reason arrived.
    fn finished(&self) -> bool {
        self.done
    }
}

// --- errors ---

/// Classifies a DashScope error code and message that came with HTTP `status`
/// (200 for an error event inside a stream).
fn classify(status: u16, code: &str, message: &str) -> UpstreamError {
    let lower = message.to_ascii_lowercase();
    let too_long = lower.contains("range of input length")
        || (lower.contains("input length")
            && (lower.contains("exceed") || lower.contains("too long")))
        || lower.contains("context length");
    let kind = if too_long {
        ErrorKind::ContextLength
    } else {
        match code {
            c if c.contains("DataInspection") => ErrorKind::ContentFilter,
            "InvalidApiKey"
            | "Arrearage"
            | "AccessDenied"
            | "AccessDenied.Unpurchased"
            | "Unauthorized"
            | "NoPermission" => ErrorKind::Auth,
            c if c.starts_with("Throttling") => ErrorKind::RateLimited,
            "InternalError" | "ServiceUnavailable" | "SystemError" => ErrorKind::Overloaded,
            c if c.starts_with("InternalError.") && !c.contains("InvalidParameter") => {
                ErrorKind::Overloaded
            }
            "RequestTimeOut" | "Timeout" => ErrorKind::Timeout,
            "InvalidParameter" | "InvalidURL" | "ModelNotFound" | "BadRequest" => {
                ErrorKind::BadRequest
            }
            c if c.starts_with("InvalidParameter") || c.contains(".InvalidParameter") => {
                ErrorKind::BadRequest
            }
            _ if status == 200 => ErrorKind::Overloaded,
            _ => ErrorKind::from_status(status),
        }
    };
    let text = match (code.is_empty(), message.is_empty()) {
        (true, _) => message.to_owned(),
        (false, true) => code.to_owned(),
        (false, false) => format!("{code}: {message}"),
    };
    UpstreamError::from_backend(kind, text, status)
}

/// The JSON of the first `data:` line of an SSE-framed body.
fn sse_data(body: &[u8]) -> Option<Value> {
    body.split(|b| *b == b'\n').find_map(|line| {
        let rest = line.strip_prefix(b"data:")?;
        serde_json::from_slice::<Value>(rest.trim_ascii()).ok()
    })
}

/// Classifies a non-2xx answer (or the data of an `event:error`) from its status
/// and body `{"request_id","code","message"}`. A streaming call's error answer
/// is SSE-framed (`event:error`, `:HTTP_STATUS/400`, `data:{…}`): its `data`
/// line is the body.
pub fn classify_error_body(status: u16, body: &[u8]) -> UpstreamError {
    let parsed = serde_json::from_slice::<Value>(body)
        .ok()
        .or_else(|| sse_data(body));
    match parsed {
        Some(v) => {
            let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
            classify(status, field("code"), field("message"))
        }
        None => classify(status, "", body_excerpt(body).trim()),
    }
}

// === embeddings ===

#[derive(Serialize)]
struct OutEmbedInput<'a> {
    texts: &'a [String],
}

#[derive(Serialize)]
struct OutEmbedParameters {
    #[serde(skip_serializing_if = "Option::is_none")]
    dimension: Option<u32>,
}

#[derive(Serialize)]
struct OutEmbedRequest<'a> {
    model: &'a str,
    input: OutEmbedInput<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<OutEmbedParameters>,
}

/// Encodes a text-embedding body. DashScope embeds text only.
pub fn encode_embeddings_request(
    req: &EmbeddingsRequest,
    model: &str,
) -> Result<Vec<u8>, UpstreamError> {
    let EmbeddingInput::Texts(texts) = &req.input else {
        return Err(UpstreamError::new(
            ErrorKind::BadRequest,
            "DashScope embeds text only; token-id input is not supported",
        ));
    };
    let out = OutEmbedRequest {
        model,
        input: OutEmbedInput { texts },
        parameters: req
            .dimensions
            .map(|d| OutEmbedParameters { dimension: Some(d) }),
    };
    Ok(serde_json::to_vec(&out).unwrap_or_default())
}

#[derive(Deserialize)]
struct InEmbedding {
    #[serde(default)]
    text_index: Option<usize>,
    #[serde(default)]
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct InEmbedOutput {
    #[serde(default)]
    embeddings: Vec<InEmbedding>,
}

#[derive(Deserialize)]
struct InEmbedUsage {
    #[serde(default)]
    total_tokens: u32,
}

#[derive(Deserialize)]
struct InEmbeddings {
    #[serde(default)]
    output: Option<InEmbedOutput>,
    #[serde(default)]
    usage: Option<InEmbedUsage>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Decodes a text-embedding answer; vectors are put in input order by `text_index`.
pub fn decode_embeddings_response(body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
    let r: InEmbeddings = serde_json::from_slice(body)
        .map_err(|e| malformed_json("a body", "a DashScope embedding answer", &e))?;
    let Some(output) = r.output else {
        return Err(match r.code.as_deref().filter(|c| !c.is_empty()) {
            Some(code) => classify(200, code, r.message.as_deref().unwrap_or("")),
            None => malformed("DashScope embedding answer has no `output`"),
        });
    };
    let mut items = output.embeddings;
    items.sort_by_key(|e| e.text_index.unwrap_or(usize::MAX));
    let tokens = r.usage.map(|u| u.total_tokens).unwrap_or(0);
    Ok(EmbeddingsResponse {
        model: String::new(),
        vectors: items.into_iter().map(|e| e.embedding).collect(),
        usage: Usage::new(tokens, 0),
    })
}

// === kind ===

pub static KIND: Kind = Kind {
    name: "dashscope",
    gen_ai_provider: "dashscope",
    auth_header: None,
    capabilities: Capabilities::ALL,
    reports_usage: true,
    self_hosted: false,
    in_process: false,
    section: false,
    settings: |_| Arc::new(Sectionless(|_| Arc::new(DashscopeCodec::new()))),
};

// === codec ===
//
// Codec for Alibaba DashScope's native API (`kind: dashscope`), under a `base_url`
// such as `https://dashscope.aliyuncs.com/api/v1`: text generation (image input goes
// to the multimodal endpoint), SSE streams with `X-DashScope-SSE: enable`, and text
// embeddings. Bearer auth (the kind's default). DashScope's OpenAI-compatible mode
// needs no codec: it is an `openai` provider file.

#[derive(Debug, Clone, Default)]
pub struct DashscopeCodec;

impl DashscopeCodec {
    pub fn new() -> Self {
        DashscopeCodec
    }
}

impl Codec for DashscopeCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        let multimodal = needs_multimodal(req);
        let path = if multimodal {
            MULTIMODAL_GENERATION_PATH
        } else {
            TEXT_GENERATION_PATH
        };
        let mut headers = Vec::new();
        if req.stream {
            headers.push(("x-dashscope-sse", "enable".to_owned()));
        }
        Ok(HttpCall {
            path: path.to_owned(),
            body: encode_chat_request(req, model, multimodal),
            headers,
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        decode_chat_response(body)
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(EventDecoder::default())
    }

    fn error(&self, status: u16, body: &[u8]) -> UpstreamError {
        classify_error_body(status, body)
    }

    fn embeddings_call(
        &self,
        req: &EmbeddingsRequest,
        model: &str,
    ) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: EMBEDDINGS_PATH.to_owned(),
            body: encode_embeddings_request(req, model)?,
            headers: Vec::new(),
        })
    }

    fn embeddings_response(&self, body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        decode_embeddings_response(body)
    }
}

#[cfg(test)]
mod codec_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::common::testing::request;

    fn req(stream: bool, content: Content) -> ChatRequest {
        ChatRequest {
            stream,
            ..request(vec![Message {
                content: Some(content),
                ..Message::text(Role::User, "")
            }])
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::common::testing::{
        assert_fixture_errors, call_deltas, decode_stream, embeddings_request, finishes, fixture,
        recorded_chat, request, same_at_every_split, text_of, usages,
    };
    use crate::backend::dashscope::DashscopeCodec;

    fn encode(req: &ChatRequest) -> Value {
        serde_json::from_slice(&encode_chat_request(
            req,
            "qwen-plus",
            needs_multimodal(req),
        ))
        .unwrap()
    }

    /// Feeds `sse` to a decoder in pieces of `chunk` bytes; stops at the first error.
    fn stream(sse: &str, chunk: usize) -> (Vec<StreamEvent>, Result<bool, UpstreamError>) {
        let (out, result, finished) = decode_stream(&DashscopeCodec::new(), sse.as_bytes(), chunk);
        (out, result.map(|()| finished))
    }

    #[test]
    fn request_maps_messages_tools_and_parameters() {
        let mut req = request(vec![
            Message::text(Role::Developer, "Be brief."),
            Message::text(Role::User, "Weather in Paris?"),
            Message {
                role: Role::Assistant,
                content: None,
                name: None,
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }],
                tool_call_id: None,
                reasoning: None,
            },
            Message {
                role: Role::Tool,
                content: Some(Content::Text("21C".into())),
                name: None,
                tool_calls: Vec::new(),
                tool_call_id: Some("call_1".into()),
                reasoning: None,
            },
        ]);
        req.params = Params {
            temperature: Some(2.0),
            top_p: Some(0.0),
            max_completion_tokens: Some(64),
            stop: vec!["END".into()],
            seed: Some(-1),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(0.5),
            ..Params::default()
        };
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
        req.tools = vec![Tool {
            name: "get_weather".into(),
            description: Some("Weather".into()),
            parameters: Some(schema.clone()),
            strict: None,
        }];
        req.tool_choice = Some(ToolChoice::Required);
        req.parallel_tool_calls = Some(true);
        req.response_format = Some(ResponseFormat::JsonObject);
        req.extra.insert("enable_thinking".into(), json!(false));
        req.extra.insert("logit_bias".into(), json!({"1": 1}));
        assert_eq!(
            encode(&req),
            json!({
                "model": "qwen-plus",
                "input": {"messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
                    ]},
                    {"role": "tool", "content": "21C", "tool_call_id": "call_1", "name": "get_weather"}
                ]},
                "parameters": {
                    "result_format": "message",
                    "temperature": 1.99,
                    "top_p": 0.01,
                    "max_tokens": 64,
                    "seed": 2147483647,
                    "stop": ["END"],
                    "presence_penalty": 0.5,
                    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": schema}}],
                    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                    "parallel_tool_calls": true,
                    "response_format": {"type": "json_object"},
                    "enable_thinking": false
                }
            })
        );
    }

    #[test]
    fn non_streaming_calls_turn_thinking_off_and_n_is_sent() {
        let mut req = request(vec![Message::text(Role::User, "hi")]);
        req.params.n = Some(3);
        let p = &encode(&req)["parameters"];
        assert_eq!(p["enable_thinking"], json!(false), "{p}");
        assert_eq!(p["n"], json!(3));
        req.extra.insert("enable_thinking".into(), json!(true));
        assert_eq!(encode(&req)["parameters"]["enable_thinking"], json!(true));
        req.extra.clear();
        req.stream = true;
        assert!(encode(&req)["parameters"].get("enable_thinking").is_none());
    }

    #[test]
    fn sse_framed_error_answers_are_read_from_their_data_line() {
        for (name, kind) in [
            ("error_400_inspection.sse", ErrorKind::ContentFilter),
            ("error_400_arrearage.sse", ErrorKind::Auth),
        ] {
            let e = classify_error_body(400, fixture("dashscope", name).as_bytes());
            assert_eq!(e.kind, kind, "{name}: {}", e.message);
            assert!(!e.message.contains("HTTP_STATUS"), "{}", e.message);
        }
    }

    #[test]
    fn streams_ask_for_incremental_output() {
        let mut req = request(vec![Message::text(Role::User, "hi")]);
        req.stream = true;
        assert_eq!(
            encode(&req)["parameters"],
            json!({"result_format": "message", "incremental_output": true})
        );
    }

    #[test]
    fn tool_choice_variants() {
        let mut req = request(vec![Message::text(Role::User, "x")]);
        req.tools = vec![
            Tool {
                name: "a".into(),
                description: None,
                parameters: None,
                strict: None,
            },
            Tool {
                name: "b".into(),
                description: None,
                parameters: None,
                strict: None,
            },
        ];
        for (choice, want) in [
            (ToolChoice::None, json!("none")),
            (ToolChoice::Auto, json!("auto")),
            (ToolChoice::Required, json!("auto")),
            (
                ToolChoice::Function("b".into()),
                json!({"type": "function", "function": {"name": "b"}}),
            ),
        ] {
            req.tool_choice = Some(choice);
            assert_eq!(encode(&req)["parameters"]["tool_choice"], want);
        }
    }

    #[test]
    fn images_switch_to_multimodal_content() {
        let req = request(vec![
            Message::text(Role::System, "Describe."),
            Message {
                content: Some(Content::Parts(vec![
                    Part::Text("What is this?".into()),
                    Part::Image {
                        url: "https://example.invalid/a.png".into(),
                        detail: None,
                    },
                ])),
                ..Message::text(Role::User, "")
            },
        ]);
        assert!(needs_multimodal(&req));
        assert_eq!(
            encode(&req)["input"]["messages"],
            json!([
                {"role": "system", "content": [{"text": "Describe."}]},
                {"role": "user", "content": [{"text": "What is this?"}, {"image": "https://example.invalid/a.png"}]}
            ])
        );
        let text_only = request(vec![Message::text(Role::User, "x")]);
        assert!(!needs_multimodal(&text_only));
    }

    #[test]
    fn decodes_text_usage_and_finish() {
        let r = recorded_chat("dashscope", decode_chat_response);
        assert_eq!(r.usage, Some(Usage::new(12, 6)));
        assert_eq!(r.id, "0ba0c2d9-6a9e-9b1f-8c2e-2f1d7c0e1a01");
        let r = decode_chat_response(fixture("dashscope", "length.json").as_bytes()).unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Length));
        // No total_tokens: computed.
        let r = decode_chat_response(
            br#"{"output":{"choices":[{"finish_reason":"stop","message":{"role":"assistant","content":[{"text":"a"},{"text":"b"}]}}]},"usage":{"input_tokens":3,"output_tokens":2}}"#,
        )
        .unwrap();
        assert_eq!(r.usage, Some(Usage::new(3, 2)));
        assert_eq!(
            r.choices[0].message.content,
            Some(Content::Text("ab".into()))
        );
    }

    #[test]
    fn decodes_tool_calls_and_generates_missing_ids() {
        let r = decode_chat_response(fixture("dashscope", "tools.json").as_bytes()).unwrap();
        let c = &r.choices[0];
        assert_eq!(c.finish_reason, Some(FinishReason::ToolCalls));
        let call = &c.message.tool_calls[0];
        assert_eq!(call.id, "call_6596dafa2a6a46f7a217da");
        assert_eq!(call.name, "get_weather");
        assert_eq!(call.arguments, r#"{"city": "Paris"}"#);
        // Recorded shape: empty id, finish "stop" with calls present.
        let r = decode_chat_response(
            br#"{"output":{"choices":[{"finish_reason":"stop","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":"{}"},"id":"","type":"function"}]}}]},"usage":{"total_tokens":36,"output_tokens":31,"input_tokens":5}}"#,
        )
        .unwrap();
        let c = &r.choices[0];
        assert!(c.message.tool_calls[0].id.starts_with("call_"));
        assert_eq!(c.finish_reason, Some(FinishReason::ToolCalls));
    }

    #[test]
    fn text_result_format_is_tolerated() {
        let r = decode_chat_response(
            br#"{"output":{"finish_reason":"stop","text":"hi"},"usage":{"input_tokens":1,"output_tokens":1,"total_tokens":2},"request_id":"r"}"#,
        )
        .unwrap();
        assert_eq!(
            r.choices[0].message.content,
            Some(Content::Text("hi".into()))
        );
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Stop));
    }

    #[test]
    fn a_giant_choice_index_is_malformed_not_an_allocation() {
        let sse = "id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[{\"index\":4294967295,\"message\":{\"content\":\"x\",\"role\":\"assistant\"},\"finish_reason\":\"null\"}]},\"request_id\":\"r\"}\n\n";
        let (_, r) = stream(sse, sse.len());
        assert_eq!(r.unwrap_err().kind, ErrorKind::MalformedResponse);
        let ok = sse.replace("4294967295", "63");
        assert!(stream(&ok, ok.len()).1.is_ok());
    }

    #[test]
    fn stream_text_at_every_split_gives_the_same_events() {
        let sse = fixture("dashscope", "chat.sse");
        let whole = same_at_every_split(
            &DashscopeCodec::new(),
            sse.as_bytes(),
            &[1, 2, 3, 7, 19, 100],
        );
        assert_eq!(text_of(&whole), "Hello from the fake upstream.");
        let usage = usages(&whole);
        assert_eq!(
            usage,
            vec![&Usage::new(12, 6)],
            "usage once: the final total"
        );
        assert_eq!(whole.last(), Some(&StreamEvent::Done));
        assert_eq!(finishes(&whole), vec![FinishReason::Stop]);
    }

    #[test]
    fn incremental_text_is_not_diffed() {
        // "Ha" then "Ha": an incremental stream that repeats itself stays "HaHa".
        let ev = |t: &str, f: &str| {
            format!(
                "id:1\nevent:result\n:HTTP_STATUS/200\ndata:{{\"output\":{{\"choices\":[{{\"message\":{{\"content\":\"{t}\",\"role\":\"assistant\"}},\"finish_reason\":\"{f}\"}}]}},\"request_id\":\"r\"}}\n\n"
            )
        };
        let sse = format!("{}{}{}", ev("Ha", "null"), ev("Ha", "null"), ev("", "stop"));
        let (events, finished) = stream(&sse, 5);
        assert!(finished.unwrap());
        assert_eq!(text_of(&events), "HaHa");
    }

    #[test]
    fn stream_tool_call_fragments_by_index() {
        let (events, finished) = stream(&fixture("dashscope", "tools.sse"), 13);
        assert!(finished.unwrap());
        let frags = call_deltas(&events);
        assert_eq!(frags[0].id.as_deref(), Some("call_6596dafa2a6a46f7a217da"));
        assert_eq!(frags[0].name.as_deref(), Some("get_weather"));
        assert!(frags[1..]
            .iter()
            .all(|f| f.id.is_none() && f.name.is_none()));
        let args: String = frags.iter().filter_map(|f| f.arguments.clone()).collect();
        assert_eq!(args, r#"{"city": "Paris"}"#);
        let last = events.iter().rev().find_map(|e| match e {
            StreamEvent::Delta(d) => d.finish_reason,
            _ => None,
        });
        assert_eq!(last, Some(FinishReason::ToolCalls));
    }

    #[test]
    fn stream_length_and_error_event() {
        let (events, finished) = stream(&fixture("dashscope", "length.sse"), 8);
        assert!(finished.unwrap());
        assert!(events.iter().any(|e| matches!(e,
            StreamEvent::Delta(d) if d.finish_reason == Some(FinishReason::Length))));
        let (events, result) = stream(&fixture("dashscope", "stream_error.sse"), 8);
        assert_eq!(text_of(&events), "Hello");
        let e = result.unwrap_err();
        assert_eq!(e.kind, ErrorKind::ContentFilter);
        assert!(e.message.contains("DataInspectionFailed"), "{}", e.message);
    }

    #[test]
    fn errors_classify_by_code_and_message() {
        let cases: [(u16, &str, ErrorKind); 2] = [
            (400, "error_400_inspection.json", ErrorKind::ContentFilter),
            (400, "error_400_arrearage.json", ErrorKind::Auth),
        ];
        assert_fixture_errors("dashscope", classify_error_body, &cases);
        for (code, status, kind) in [
            ("Throttling.RateQuota", 429, ErrorKind::RateLimited),
            ("Throttling.AllocationQuota", 429, ErrorKind::RateLimited),
            ("Throttling", 429, ErrorKind::RateLimited),
            ("InvalidParameter", 400, ErrorKind::BadRequest),
            ("SomethingNew", 503, ErrorKind::Overloaded),
            ("SomethingNew", 404, ErrorKind::BadRequest),
        ] {
            let body = json!({"request_id": "r", "code": code, "message": "m"}).to_string();
            assert_eq!(
                classify_error_body(status, body.as_bytes()).kind,
                kind,
                "{code}"
            );
        }
        let e = classify_error_body(
            400,
            br#"{"code":"InvalidParameter","message":"<400> InternalError.Algo.InvalidParameter: Range of input length should be [1, 983616]"}"#,
        );
        assert_eq!(e.kind, ErrorKind::ContextLength);
        let e = classify_error_body(502, b"<html>bad gateway</html>");
        assert_eq!(e.kind, ErrorKind::Overloaded);
    }

    #[test]
    fn error_answer_with_200() {
        let e = decode_chat_response(
            br#"{"request_id":"r","code":"InternalError","message":"An internal error has occured"}"#,
        )
        .unwrap_err();
        assert_eq!((e.kind, e.status), (ErrorKind::Overloaded, None));
        let e = decode_chat_response(b"[]").unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
    }

    #[test]
    fn embeddings_round_trip() {
        let req = EmbeddingsRequest {
            dimensions: Some(512),
            ..embeddings_request(&["a", "b"])
        };
        let body: Value =
            serde_json::from_slice(&encode_embeddings_request(&req, "text-embedding-v4").unwrap())
                .unwrap();
        assert_eq!(
            body,
            json!({"model": "text-embedding-v4", "input": {"texts": ["a", "b"]}, "parameters": {"dimension": 512}})
        );
        let r = decode_embeddings_response(
            br#"{"output":{"embeddings":[{"text_index":1,"embedding":[0.3,0.4]},{"text_index":0,"embedding":[0.1,0.2]}]},"usage":{"total_tokens":4},"request_id":"r"}"#,
        )
        .unwrap();
        assert_eq!(r.vectors, vec![vec![0.1, 0.2], vec![0.3, 0.4]]);
        assert_eq!(r.usage, Usage::new(4, 0));
        let e = decode_embeddings_response(
            br#"{"code":"InvalidApiKey","message":"Invalid API-key provided.","request_id":"r"}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Auth);
    }
}
