//! The Anthropic Messages wire format (`POST /v1/messages`), both directions: the
//! format of the `anthropic` backend kind, and a client dialect ([`Anthropic`]) so
//! applications written against the Anthropic SDKs can use the gateway. Wire
//! structs are private; the rest of the gateway sees canonical types and the
//! functions below.
//!
//! Mapping decisions (documented here once):
//! - System and developer messages become the top-level `system` (several are
//!   joined with a blank line); consecutive turns of one role are merged, and tool
//!   results always lead the user turn that carries them.
//! - Tool-call arguments are a JSON string in canonical types and an object
//!   (`input`) on this wire. Arguments that are empty become `{}`; arguments that
//!   are not a JSON object (invalid JSON included) travel as
//!   `{"_raw_arguments": "<text>"}`, so nothing the model wrote is lost and the
//!   backend still gets an object.
//! - A tool result the client flagged `is_error` is a canonical tool message whose
//!   text starts with [`TOOL_ERROR_PREFIX`]; the backend encoder turns the prefix
//!   back into `is_error: true`.
//! - `response_format` JSON schema → `output_config.format`; plain JSON mode has no
//!   native switch and becomes an instruction appended to `system`.
//! - Request fields the gateway does not model reach an Anthropic backend only if
//!   they are Messages API fields ([`PASSTHROUGH`]); other unknown fields (from
//!   OpenAI clients) are dropped rather than making the backend reject the call.
//! - Finish: `end_turn`/`stop_sequence`/`pause_turn` → stop, `max_tokens` and
//!   `model_context_window_exceeded` → length, `tool_use` → tool_calls, `refusal`
//!   → content_filter.
//! - Usage: prompt = `input_tokens` + `cache_creation_input_tokens` +
//!   `cache_read_input_tokens`; cached = `cache_read_input_tokens`; total computed.
//!   In a stream the counts are cumulative; one `Usage` is emitted at
//!   `message_stop` from the last values seen.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::backend::common::{
    close_stream, error_member, join_system, malformed, malformed_json, open_stream, push_joined,
    push_turn, stream_meta,
};
use crate::backend::StreamDecoder;
use crate::canonical::*;
use crate::error::{ErrorKind, GatewayError, UpstreamError};
use crate::framing::Frame;

/// Marks the text of a tool result the client flagged as an error (`is_error`).
pub const TOOL_ERROR_PREFIX: &str = "[tool error] ";

/// The key tool-call arguments that are not a JSON object travel under.
pub const RAW_ARGUMENTS: &str = "_raw_arguments";

/// Unmodelled request fields an Anthropic backend receives from `extra`.
pub const PASSTHROUGH: &[&str] = &[
    "top_k",
    "thinking",
    "service_tier",
    "cache_control",
    "context_management",
    "container",
    "mcp_servers",
    "inference_geo",
    "speed",
];

/// Appended to `system` when the client asked for JSON mode without a schema.
const JSON_MODE_INSTRUCTION: &str =
    "Respond with a single valid JSON object and nothing else (no prose, no code fences).";

fn new_message_id() -> String {
    format!("msg_{:024x}", rand::random::<u128>() >> 32)
}

fn new_tool_id() -> String {
    format!("toolu_{:016x}", rand::random::<u64>())
}

/// Tool-call arguments (JSON text) as the `input` object this wire requires.
pub fn tool_input(arguments: &str) -> Value {
    let t = arguments.trim();
    if t.is_empty() {
        return Value::Object(Map::new());
    }
    match serde_json::from_str::<Value>(t) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            let mut m = Map::new();
            m.insert(RAW_ARGUMENTS.into(), Value::String(arguments.to_owned()));
            Value::Object(m)
        }
    }
}

// =====================================================================
// Backend direction: canonical request → Messages body
// =====================================================================

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutSource<'a> {
    Base64 { media_type: &'a str, data: &'a str },
    Url { url: &'a str },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutBlock<'a> {
    Text {
        text: &'a str,
    },
    Image {
        source: OutSource<'a>,
    },
    ToolUse {
        id: Cow<'a, str>,
        name: &'a str,
        input: Value,
    },
    ToolResult {
        tool_use_id: Cow<'a, str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<OutResultContent<'a>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
    },
}

/// A content block: one the gateway builds, or a part it kept verbatim.
#[derive(Serialize)]
#[serde(untagged)]
enum Block<'a> {
    Known(OutBlock<'a>),
    Raw(&'a Value),
}

impl Block<'_> {
    fn is_tool_result(&self) -> bool {
        matches!(self, Block::Known(OutBlock::ToolResult { .. }))
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutResultContent<'a> {
    Text(&'a str),
    Blocks(Vec<Block<'a>>),
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutContent<'a> {
    Text(&'a str),
    Blocks(Vec<Block<'a>>),
}

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    content: OutContent<'a>,
}

/// Anthropic's tool definition is flat (`name`, `description`, `input_schema`), not
/// the OpenAI `{"type":"function","function":{…}}` of [`crate::backend::common::OutTool`].
#[derive(Serialize)]
struct OutTool<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: Cow<'a, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

#[derive(Serialize)]
struct OutMetadata<'a> {
    user_id: &'a str,
}

#[derive(Serialize)]
struct OutRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "str::is_empty")]
    system: &'a str,
    messages: Vec<OutMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<&'a String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<OutMetadata<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_config: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(flatten)]
    passthrough: BTreeMap<&'a str, &'a Value>,
}

/// An image URL as an image source: data URLs become base64 sources.
fn image_source(url: &str) -> OutSource<'_> {
    if let Some((meta, data)) = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(','))
    {
        if let Some(media_type) = meta.strip_suffix(";base64") {
            return OutSource::Base64 { media_type, data };
        }
    }
    OutSource::Url { url }
}

/// The API rejects text blocks that are empty or only whitespace.
fn blank(t: &str) -> bool {
    t.trim().is_empty()
}

fn part_block(p: &Part) -> Option<Block<'_>> {
    match p {
        Part::Text(t) if blank(t) => None,
        Part::Text(t) => Some(Block::Known(OutBlock::Text { text: t })),
        Part::Image { url, .. } => Some(Block::Known(OutBlock::Image {
            source: image_source(url),
        })),
        // Kept verbatim: an Anthropic client's `document` block round-trips.
        Part::Other(v) => Some(Block::Raw(v)),
    }
}

fn content_blocks<'a>(c: &'a Content, out: &mut Vec<Block<'a>>) {
    match c {
        Content::Text(t) if blank(t) => {}
        Content::Text(t) => out.push(Block::Known(OutBlock::Text { text: t })),
        Content::Parts(parts) => out.extend(parts.iter().filter_map(part_block)),
    }
}

fn tool_result(m: &Message) -> Block<'_> {
    let mut is_error = false;
    let content = match &m.content {
        None => None,
        Some(Content::Text(t)) => {
            let t = match t.strip_prefix(TOOL_ERROR_PREFIX) {
                Some(rest) => {
                    is_error = true;
                    rest
                }
                None => t.as_str(),
            };
            (!blank(t)).then_some(OutResultContent::Text(t))
        }
        Some(Content::Parts(parts)) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for (i, p) in parts.iter().enumerate() {
                if let (0, Part::Text(t)) = (i, p) {
                    if let Some(rest) = t.strip_prefix(TOOL_ERROR_PREFIX) {
                        is_error = true;
                        if !blank(rest) {
                            blocks.push(Block::Known(OutBlock::Text { text: rest }));
                        }
                        continue;
                    }
                }
                blocks.extend(part_block(p));
            }
            (!blocks.is_empty()).then_some(OutResultContent::Blocks(blocks))
        }
    };
    Block::Known(OutBlock::ToolResult {
        tool_use_id: super::tool_id::portable(m.tool_call_id.as_deref().unwrap_or_default()),
        content,
        is_error,
    })
}

fn tool_choice_to_wire(choice: Option<&ToolChoice>, no_parallel: bool) -> Option<Value> {
    let (kind, name) = match choice {
        Some(ToolChoice::None) => return Some(serde_json::json!({"type": "none"})),
        Some(ToolChoice::Auto) => ("auto", None),
        Some(ToolChoice::Required) => ("any", None),
        Some(ToolChoice::Function(n)) => ("tool", Some(n.as_str())),
        None if no_parallel => ("auto", None),
        None => return None,
    };
    let mut m = Map::new();
    m.insert("type".into(), Value::String(kind.into()));
    if let Some(n) = name {
        m.insert("name".into(), Value::String(n.into()));
    }
    if no_parallel {
        m.insert("disable_parallel_tool_use".into(), Value::Bool(true));
    }
    Some(Value::Object(m))
}

/// `service_tier` values this API knows: `auto` (shared with OpenAI) and its own
/// `standard_only`. OpenAI's `default`, `flex`, `scale` and `priority` would be
/// refused, so they are dropped.
fn service_tier_ok(v: &Value) -> bool {
    matches!(v.as_str(), Some("auto" | "standard_only"))
}

/// Encodes a canonical request as a Messages body for `model`. `default_max_tokens`
/// fills the required `max_tokens` when the client gave no limit.
pub fn encode_chat_request(req: &ChatRequest, model: &str, default_max_tokens: u32) -> Vec<u8> {
    let mut system = String::new();
    let mut messages: Vec<(&'static str, Vec<Block<'_>>)> = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let (role, blocks) = match m.role {
            Role::System | Role::Developer => {
                join_system(&mut system, m.content.as_ref(), blank);
                continue;
            }
            Role::User => {
                let mut b = Vec::new();
                if let Some(c) = &m.content {
                    content_blocks(c, &mut b);
                }
                ("user", b)
            }
            Role::Assistant => {
                let mut b = Vec::with_capacity(1 + m.tool_calls.len());
                if let Some(c) = &m.content {
                    content_blocks(c, &mut b);
                }
                for tc in &m.tool_calls {
                    b.push(Block::Known(OutBlock::ToolUse {
                        id: super::tool_id::portable(&tc.id),
                        name: &tc.name,
                        input: tool_input(&tc.arguments),
                    }));
                }
                ("assistant", b)
            }
            Role::Tool => ("user", vec![tool_result(m)]),
        };
        push_turn(&mut messages, role, blocks);
    }
    if matches!(req.response_format, Some(ResponseFormat::JsonObject)) {
        push_joined(&mut system, "\n\n", JSON_MODE_INSTRUCTION);
    }
    let messages = messages
        .into_iter()
        .map(|(role, mut blocks)| {
            // Tool results must come first in their user turn.
            if role == "user" && blocks.iter().any(Block::is_tool_result) {
                blocks.sort_by_key(|b| !b.is_tool_result());
            }
            let content = match blocks.as_slice() {
                [Block::Known(OutBlock::Text { text })] => OutContent::Text(text),
                _ => OutContent::Blocks(blocks),
            };
            OutMessage { role, content }
        })
        .collect();
    let mut output_config = req
        .extra
        .get("output_config")
        .filter(|v| v.is_object())
        .cloned();
    if let Some(ResponseFormat::JsonSchema(s)) = &req.response_format {
        let schema = s.get("schema").unwrap_or(s).clone();
        let cfg = output_config.get_or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(o) = cfg {
            o.insert(
                "format".into(),
                serde_json::json!({"type": "json_schema", "schema": schema}),
            );
        }
    }
    let has_tools = !req.tools.is_empty();
    let out = OutRequest {
        model,
        max_tokens: req.params.output_limit().unwrap_or(default_max_tokens),
        system: &system,
        messages,
        temperature: req.params.temperature.map(|t| t.clamp(0.0, 1.0)),
        // Current models refuse both at once; the temperature wins.
        top_p: req
            .params
            .top_p
            .filter(|_| req.params.temperature.is_none()),
        stop_sequences: req.params.stop.iter().filter(|s| !blank(s)).collect(),
        metadata: req
            .params
            .user
            .as_deref()
            .map(|user_id| OutMetadata { user_id }),
        tools: req
            .tools
            .iter()
            .map(|t| OutTool {
                name: &t.name,
                description: t.description.as_deref(),
                input_schema: match &t.parameters {
                    Some(p) => Cow::Borrowed(p),
                    None => Cow::Owned(serde_json::json!({"type": "object", "properties": {}})),
                },
                strict: t.strict,
            })
            .collect(),
        tool_choice: if has_tools {
            tool_choice_to_wire(
                req.tool_choice.as_ref(),
                req.parallel_tool_calls == Some(false),
            )
        } else {
            None
        },
        output_config,
        stream: req.stream,
        passthrough: PASSTHROUGH
            .iter()
            .filter_map(|k| req.extra.get(*k).map(|v| (*k, v)))
            .filter(|(k, v)| *k != "service_tier" || service_tier_ok(v))
            .collect(),
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

// =====================================================================
// Backend direction: Messages response / stream → canonical
// =====================================================================

/// Anthropic counts cache reads and writes apart from `input_tokens` and sends
/// them cumulatively over a stream, so not the OpenAI-shaped
/// [`crate::backend::common::InUsage`].
#[derive(Deserialize, Default, Clone, Copy)]
struct InUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
}

impl InUsage {
    /// Later cumulative counts replace earlier ones; absent ones keep them.
    fn update(&mut self, later: InUsage) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens = later
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = later
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
    }

    fn into_canonical(self) -> Usage {
        let prompt = self
            .input_tokens
            .unwrap_or(0)
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
            .saturating_add(self.cache_read_input_tokens.unwrap_or(0));
        let mut u = Usage::new(prompt, self.output_tokens.unwrap_or(0));
        u.cached_tokens = self.cache_read_input_tokens;
        u
    }
}

/// Maps a `stop_reason` onto the canonical finish reasons.
pub fn finish_reason_from_wire(s: &str) -> FinishReason {
    match s {
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        // end_turn, stop_sequence, pause_turn (the client may resend to continue)
        _ => FinishReason::Stop,
    }
}

/// A content block of a response, or the one a stream's `content_block_start`
/// opens (the same shape).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum InRespBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        #[serde(default)]
        id: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        input: Option<Value>,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
    },
    /// redacted_thinking, server tool blocks and anything newer.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct InResponse {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    content: Option<Vec<InRespBlock>>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<InUsage>,
    #[serde(default)]
    error: Option<Value>,
}

fn arguments_text(input: Option<Value>) -> String {
    match input {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(v) => v.to_string(),
    }
}

/// Decodes a backend's Messages response (HTTP 2xx).
pub fn decode_chat_response(body: &[u8]) -> Result<ChatResponse, UpstreamError> {
    let r: InResponse = serde_json::from_slice(body)
        .map_err(|e| malformed_json("a body", "a Messages response", &e))?;
    if r.kind.as_deref() == Some("error") || r.error.is_some() {
        return Err(classify_error_value(
            200,
            r.error.as_ref().unwrap_or(&Value::Null),
        ));
    }
    let Some(blocks) = r.content else {
        return Err(malformed("backend response has no `content`"));
    };
    let mut text: Option<String> = None;
    let mut reasoning: Option<String> = None;
    let mut tool_calls = Vec::new();
    for b in blocks {
        match b {
            InRespBlock::Text { text: t } => text.get_or_insert_with(String::new).push_str(&t),
            InRespBlock::Thinking { thinking } => reasoning
                .get_or_insert_with(String::new)
                .push_str(&thinking),
            InRespBlock::ToolUse { id, name, input } => tool_calls.push(ToolCall {
                id: if id.is_empty() { new_tool_id() } else { id },
                name,
                arguments: arguments_text(input),
            }),
            InRespBlock::Other => {}
        }
    }
    if text.is_none() && tool_calls.is_empty() {
        text = Some(String::new());
    }
    let mut finish = r.stop_reason.as_deref().map(finish_reason_from_wire);
    if !tool_calls.is_empty() && matches!(finish, None | Some(FinishReason::Stop)) {
        finish = Some(FinishReason::ToolCalls);
    }
    Ok(ChatResponse {
        id: r.id.unwrap_or_else(new_message_id),
        created: unix_now(),
        model: r.model.unwrap_or_default(),
        choices: vec![Choice {
            index: 0,
            message: Message {
                role: Role::Assistant,
                content: text.map(Content::Text),
                name: None,
                tool_calls,
                tool_call_id: None,
                reasoning,
            },
            finish_reason: finish,
        }],
        usage: r.usage.map(InUsage::into_canonical),
        system_fingerprint: None,
    })
}

// --- stream events ---

#[derive(Deserialize)]
struct InStartMessage {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<InUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum InBlockDelta {
    TextDelta {
        #[serde(default)]
        text: String,
    },
    InputJsonDelta {
        #[serde(default)]
        partial_json: String,
    },
    ThinkingDelta {
        #[serde(default)]
        thinking: String,
    },
    /// signature_delta, citations_delta and anything newer.
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
struct InMessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum InEvent {
    MessageStart {
        message: InStartMessage,
    },
    ContentBlockStart {
        index: u32,
        content_block: InRespBlock,
    },
    ContentBlockDelta {
        index: u32,
        delta: InBlockDelta,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        #[serde(default)]
        delta: InMessageDeltaBody,
        #[serde(default)]
        usage: Option<InUsage>,
    },
    MessageStop,
    Error {
        #[serde(default)]
        error: Value,
    },
    /// ping and event types added later.
    #[serde(other)]
    Other,
}

/// A tool_use block of the stream: its content-block index, its canonical tool
/// index, and a complete `input` from its start event, sent at its stop only if
/// no `input_json_delta` came.
struct ToolBlock {
    block: u32,
    tool: u32,
    initial: Option<String>,
}

/// State of decoding one Messages stream from a backend.
#[derive(Default)]
pub struct EventDecoder {
    started: bool,
    done: bool,
    tools: Vec<ToolBlock>,
    usage: Option<InUsage>,
}

impl EventDecoder {
    fn start(&mut self, id: Option<String>, model: Option<String>, out: &mut Vec<StreamEvent>) {
        open_stream(&mut self.started, out, || {
            stream_meta(id.unwrap_or_else(new_message_id), None, model)
        });
    }

    fn tool_delta(out: &mut Vec<StreamEvent>, call: ToolCallDelta) {
        out.push(StreamEvent::Delta(Delta {
            tool_calls: vec![call],
            ..Delta::default()
        }));
    }

    /// Decodes one SSE event (`event` name and `data`) into canonical events.
    pub fn decode(
        &mut self,
        event: Option<&str>,
        data: &str,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), UpstreamError> {
        let data = data.trim();
        if data.is_empty() {
            if event == Some("error") {
                return Err(classify_error_value(200, &Value::Null));
            }
            return Ok(());
        }
        let ev: InEvent = match serde_json::from_str(data) {
            Ok(ev) => ev,
            Err(e) if event == Some("error") => {
                let _ = e;
                return Err(classify_error_value(200, &Value::String(data.to_owned())));
            }
            Err(e) => return Err(malformed_json("a stream event", "a Messages event", &e)),
        };
        match ev {
            InEvent::Error { error } => return Err(classify_error_value(200, &error)),
            InEvent::Other if event == Some("error") => {
                let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                return Err(classify_error_value(200, v.get("error").unwrap_or(&v)));
            }
            InEvent::Other => {}
            InEvent::MessageStart { message } => {
                self.usage = message.usage;
                self.start(message.id, message.model, out);
            }
            InEvent::ContentBlockStart {
                index,
                content_block,
            } => {
                self.start(None, None, out);
                match content_block {
                    InRespBlock::Text { text } => {
                        if !text.is_empty() {
                            out.push(StreamEvent::Delta(Delta {
                                content: Some(text),
                                ..Delta::default()
                            }));
                        }
                    }
                    InRespBlock::Thinking { thinking } => {
                        if !thinking.is_empty() {
                            out.push(StreamEvent::Delta(Delta {
                                reasoning: Some(thinking),
                                ..Delta::default()
                            }));
                        }
                    }
                    InRespBlock::ToolUse { id, name, input } => {
                        let tool = self.tools.len() as u32;
                        let initial = input
                            .filter(|v| v.as_object().is_some_and(|o| !o.is_empty()))
                            .map(|v| v.to_string());
                        self.tools.push(ToolBlock {
                            block: index,
                            tool,
                            initial,
                        });
                        Self::tool_delta(
                            out,
                            ToolCallDelta {
                                index: tool,
                                id: Some(if id.is_empty() { new_tool_id() } else { id }),
                                name: Some(name),
                                arguments: None,
                            },
                        );
                    }
                    InRespBlock::Other => {}
                }
            }
            InEvent::ContentBlockDelta { index, delta } => {
                self.start(None, None, out);
                match delta {
                    InBlockDelta::TextDelta { text } => {
                        if !text.is_empty() {
                            out.push(StreamEvent::Delta(Delta {
                                content: Some(text),
                                ..Delta::default()
                            }));
                        }
                    }
                    InBlockDelta::ThinkingDelta { thinking } => {
                        if !thinking.is_empty() {
                            out.push(StreamEvent::Delta(Delta {
                                reasoning: Some(thinking),
                                ..Delta::default()
                            }));
                        }
                    }
                    InBlockDelta::InputJsonDelta { partial_json } => {
                        if let Some(t) = self.tools.iter_mut().rev().find(|t| t.block == index) {
                            t.initial = None;
                            if !partial_json.is_empty() {
                                let tool = t.tool;
                                Self::tool_delta(
                                    out,
                                    ToolCallDelta {
                                        index: tool,
                                        arguments: Some(partial_json),
                                        ..ToolCallDelta::default()
                                    },
                                );
                            }
                        }
                    }
                    InBlockDelta::Other => {}
                }
            }
            InEvent::ContentBlockStop { index } => {
                if let Some(t) = self.tools.iter_mut().rev().find(|t| t.block == index) {
                    if let Some(args) = t.initial.take() {
                        let tool = t.tool;
                        Self::tool_delta(
                            out,
                            ToolCallDelta {
                                index: tool,
                                arguments: Some(args),
                                ..ToolCallDelta::default()
                            },
                        );
                    }
                }
            }
            InEvent::MessageDelta { delta, usage } => {
                self.start(None, None, out);
                if let Some(u) = usage {
                    self.usage.get_or_insert_with(InUsage::default).update(u);
                }
                if let Some(r) = delta.stop_reason {
                    let mut finish = finish_reason_from_wire(&r);
                    if finish == FinishReason::Stop && !self.tools.is_empty() {
                        finish = FinishReason::ToolCalls;
                    }
                    out.push(StreamEvent::Delta(Delta {
                        finish_reason: Some(finish),
                        ..Delta::default()
                    }));
                }
            }
            InEvent::MessageStop => {
                self.start(None, None, out);
                // Usage only when the output count arrived (message_delta), so a
                // partial count never passes for a reported one.
                let usage = self.usage.filter(|u| u.output_tokens.is_some());
                self.done = true;
                close_stream(usage.map(InUsage::into_canonical), out);
            }
        }
        Ok(())
    }
}

impl StreamDecoder for EventDecoder {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        let (event, data) = crate::backend::event_and_data(&frame);
        self.decode(event, data, out)
    }

    /// True once `message_stop` arrived.
    fn finished(&self) -> bool {
        self.done
    }
}

// --- errors from a backend ---

/// Classifies an Anthropic error object (`{"type","message"}`, or a bare string)
/// that came with `status` (200 for one inside a body or a stream).
pub fn classify_error_value(status: u16, err: &Value) -> UpstreamError {
    let (etype, message) = match err {
        Value::Object(o) => {
            let s = |k: &str| match o.get(k) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            };
            (s("type"), s("message"))
        }
        Value::String(s) => (String::new(), s.clone()),
        Value::Null => (String::new(), String::new()),
        other => (String::new(), other.to_string()),
    };
    let base = match etype.as_str() {
        "rate_limit_error" => ErrorKind::RateLimited,
        "overloaded_error" | "api_error" => ErrorKind::Overloaded,
        // billing: the gateway's account, not something the client can fix.
        "authentication_error" | "permission_error" | "billing_error" => ErrorKind::Auth,
        // request_too_large is about bytes, not tokens: a plain bad request (413).
        "invalid_request_error" | "not_found_error" | "request_too_large" | "conflict_error" => {
            ErrorKind::BadRequest
        }
        "timeout_error" | "gateway_timeout_error" => ErrorKind::Timeout,
        _ if status == 200 => ErrorKind::Overloaded,
        _ => ErrorKind::from_status(status),
    };
    let lower = message.to_ascii_lowercase();
    let kind = if matches!(base, ErrorKind::BadRequest | ErrorKind::ContextLength)
        && (lower.contains("prompt is too long")
            || lower.contains("exceed context limit")
            || lower.contains("context window")
            || lower.contains("context length"))
    {
        ErrorKind::ContextLength
    } else if base == ErrorKind::BadRequest && lower.contains("content filtering policy") {
        ErrorKind::ContentFilter
    } else {
        base
    };
    UpstreamError::from_backend(kind, message, status)
}

/// Classifies a backend's non-2xx answer from its status and body.
pub fn classify_error_body(status: u16, body: &[u8]) -> UpstreamError {
    let err = error_member(body).unwrap_or_else(|text| Value::String(text.trim().to_owned()));
    classify_error_value(status, &err)
}

/// Anthropic has no embeddings API: the answer for an embeddings call.
pub fn embeddings_unsupported() -> UpstreamError {
    UpstreamError::new(
        ErrorKind::BadRequest,
        "Anthropic does not offer an embeddings API; route embeddings to another provider",
    )
}

// =====================================================================
// Client direction (the front door): Messages request → canonical
// =====================================================================

/// Turns a serde error into a 400 naming the offending field; `at` is the path of
/// the value being decoded ("" for the body).
fn decode_error(e: serde_path_to_error::Error<serde_json::Error>, at: &str) -> GatewayError {
    let inner_path = e.path().to_string();
    let inner = e.into_inner();
    let msg = inner.to_string();
    if inner.is_syntax() || inner.is_eof() {
        return GatewayError::invalid(format!("request body is not valid JSON: {msg}"), None);
    }
    let missing = msg
        .strip_prefix("missing field `")
        .and_then(|r| r.split('`').next());
    let mut param = at.to_owned();
    let mut join = |seg: &str| {
        if seg.is_empty() || seg == "." {
            return;
        }
        if !param.is_empty() && !seg.starts_with('[') {
            param.push('.');
        }
        param.push_str(seg);
    };
    join(&inner_path);
    if let Some(field) = missing {
        join(field);
    }
    if param.is_empty() {
        GatewayError::invalid(format!("invalid request body: {msg}"), None)
    } else {
        GatewayError::invalid(format!("invalid field `{param}`: {msg}"), Some(&param))
    }
}

fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| decode_error(e, ""))
}

fn parse_value<T: DeserializeOwned>(v: Value, at: &str) -> Result<T, GatewayError> {
    serde_path_to_error::deserialize(v).map_err(|e| decode_error(e, at))
}

fn invalid_at(at: &str, what: &str) -> GatewayError {
    GatewayError::invalid(format!("invalid field `{at}`: {what}"), Some(at))
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum InRole {
    User,
    Assistant,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum InContent {
    Text(String),
    Blocks(Vec<Value>),
}

#[derive(Deserialize)]
struct InMessage {
    role: InRole,
    content: InContent,
}

#[derive(Deserialize)]
struct InSystemBlock {
    #[serde(rename = "type")]
    kind: String,
    text: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum InSystem {
    Text(String),
    Blocks(Vec<InSystemBlock>),
}

#[derive(Deserialize)]
struct InTool {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    input_schema: Option<Value>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    strict: Option<bool>,
}

#[derive(Deserialize)]
struct InToolChoice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Deserialize)]
struct InMetadata {
    #[serde(default)]
    user_id: Option<String>,
}

#[derive(Deserialize)]
struct InRequest {
    model: String,
    max_tokens: u32,
    messages: Vec<InMessage>,
    #[serde(default)]
    system: Option<InSystem>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<InTool>>,
    #[serde(default)]
    tool_choice: Option<InToolChoice>,
    #[serde(default)]
    metadata: Option<InMetadata>,
    #[serde(default)]
    output_config: Option<Map<String, Value>>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct InTextBlock {
    text: String,
}

#[derive(Deserialize)]
struct InImageSource {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

#[derive(Deserialize)]
struct InImageBlock {
    source: InImageSource,
}

#[derive(Deserialize)]
struct InToolUseBlock {
    id: String,
    name: String,
    #[serde(default)]
    input: Option<Value>,
}

#[derive(Deserialize)]
struct InToolResultBlock {
    tool_use_id: String,
    #[serde(default)]
    content: Option<InContent>,
    #[serde(default)]
    is_error: Option<bool>,
}

#[derive(Deserialize)]
struct InThinkingBlock {
    #[serde(default)]
    thinking: String,
}

fn block_type(b: &Value, at: &str) -> Result<String, GatewayError> {
    b.get("type")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            let p = format!("{at}.type");
            invalid_at(&p, "a content block needs a string `type`")
        })
}

/// A content block that is not a tool block: text, image, or kept verbatim.
fn decode_part(b: Value, kind: &str, at: &str) -> Result<Part, GatewayError> {
    match kind {
        "text" => Ok(Part::Text(parse_value::<InTextBlock>(b, at)?.text)),
        "image" => {
            let source_kind = b.pointer("/source/type").and_then(Value::as_str);
            if !matches!(source_kind, Some("base64" | "url")) {
                // File sources and anything newer go to the backend verbatim.
                return Ok(Part::Other(b));
            }
            let img: InImageBlock = parse_value(b, at)?;
            let s = img.source;
            let url = if s.kind == "base64" {
                match (s.media_type, s.data) {
                    (Some(m), Some(d)) => format!("data:{m};base64,{d}"),
                    _ => {
                        return Err(invalid_at(
                            &format!("{at}.source"),
                            "a base64 image source needs `media_type` and `data`",
                        ))
                    }
                }
            } else {
                s.url.ok_or_else(|| {
                    invalid_at(
                        &format!("{at}.source.url"),
                        "a url image source needs `url`",
                    )
                })?
            };
            Ok(Part::Image { url, detail: None })
        }
        _ => Ok(Part::Other(b)),
    }
}

fn parts_content(mut parts: Vec<Part>) -> Option<Content> {
    match parts.len() {
        0 => None,
        1 if matches!(parts[0], Part::Text(_)) => match parts.pop() {
            Some(Part::Text(t)) => Some(Content::Text(t)),
            _ => None,
        },
        _ => Some(Content::Parts(parts)),
    }
}

fn message(role: Role, content: Option<Content>) -> Message {
    Message {
        role,
        content,
        name: None,
        tool_calls: Vec::new(),
        tool_call_id: None,
        reasoning: None,
    }
}

fn decode_tool_result(b: Value, at: &str) -> Result<Message, GatewayError> {
    let r: InToolResultBlock = parse_value(b, at)?;
    let mut content = match r.content {
        None => Content::Text(String::new()),
        Some(InContent::Text(t)) => Content::Text(t),
        Some(InContent::Blocks(blocks)) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (k, b) in blocks.into_iter().enumerate() {
                let at = format!("{at}.content[{k}]");
                let kind = block_type(&b, &at)?;
                parts.push(decode_part(b, &kind, &at)?);
            }
            parts_content(parts).unwrap_or(Content::Text(String::new()))
        }
    };
    if r.is_error == Some(true) {
        match &mut content {
            Content::Text(t) => t.insert_str(0, TOOL_ERROR_PREFIX),
            Content::Parts(p) => match p.first_mut() {
                Some(Part::Text(t)) => t.insert_str(0, TOOL_ERROR_PREFIX),
                _ => p.insert(0, Part::Text(TOOL_ERROR_PREFIX.to_owned())),
            },
        }
    }
    let mut m = message(Role::Tool, Some(content));
    m.tool_call_id = Some(r.tool_use_id);
    Ok(m)
}

fn decode_message(i: usize, m: InMessage, out: &mut Vec<Message>) -> Result<(), GatewayError> {
    let role = match m.role {
        InRole::User => Role::User,
        InRole::Assistant => Role::Assistant,
    };
    let blocks = match m.content {
        InContent::Text(t) => {
            out.push(Message::text(role, t));
            return Ok(());
        }
        InContent::Blocks(b) => b,
    };
    let mut parts = Vec::new();
    let mut tool_calls = Vec::new();
    let mut reasoning: Option<String> = None;
    for (j, b) in blocks.into_iter().enumerate() {
        let at = format!("messages[{i}].content[{j}]");
        let kind = block_type(&b, &at)?;
        match (role, kind.as_str()) {
            (Role::User, "tool_result") => {
                // Tool results become canonical tool messages, in order.
                if let Some(c) = parts_content(std::mem::take(&mut parts)) {
                    out.push(message(Role::User, Some(c)));
                }
                out.push(decode_tool_result(b, &at)?);
            }
            (Role::Assistant, "tool_use") => {
                let t: InToolUseBlock = parse_value(b, &at)?;
                tool_calls.push(ToolCall {
                    id: t.id,
                    name: t.name,
                    arguments: arguments_text(t.input),
                });
            }
            (Role::Assistant, "thinking") => {
                let t: InThinkingBlock = parse_value(b, &at)?;
                reasoning
                    .get_or_insert_with(String::new)
                    .push_str(&t.thinking);
            }
            (Role::Assistant, "redacted_thinking") => {}
            (_, "tool_result" | "tool_use") => {
                return Err(invalid_at(
                    &format!("{at}.type"),
                    &format!(
                        "a `{kind}` block is not allowed in a {} message",
                        role.as_str()
                    ),
                ))
            }
            _ => parts.push(decode_part(b, &kind, &at)?),
        }
    }
    match role {
        Role::Assistant => {
            let mut msg = message(Role::Assistant, parts_content(parts));
            msg.tool_calls = tool_calls;
            msg.reasoning = reasoning;
            if msg.content.is_none() && msg.tool_calls.is_empty() {
                msg.content = Some(Content::Text(String::new()));
            }
            out.push(msg);
        }
        _ => {
            if let Some(c) = parts_content(parts) {
                out.push(message(Role::User, Some(c)));
            }
        }
    }
    Ok(())
}

/// Decodes a client's `POST /v1/messages` body. An empty `messages` list is
/// accepted here (a prompt may supply the messages); the gateway rejects a
/// request that still has none.
pub fn decode_chat_request(body: &[u8]) -> Result<ChatRequest, GatewayError> {
    let r: InRequest = parse_body(body)?;
    let mut messages = Vec::with_capacity(r.messages.len() + 1);
    match r.system {
        Some(InSystem::Text(t)) if !t.is_empty() => {
            messages.push(Message::text(Role::System, t));
        }
        None | Some(InSystem::Text(_)) => {}
        Some(InSystem::Blocks(blocks)) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (i, b) in blocks.into_iter().enumerate() {
                if b.kind != "text" {
                    return Err(invalid_at(
                        &format!("system[{i}].type"),
                        "system blocks must be `text`",
                    ));
                }
                parts.push(Part::Text(b.text));
            }
            if let Some(c) = parts_content(parts) {
                messages.push(message(Role::System, Some(c)));
            }
        }
    }
    for (i, m) in r.messages.into_iter().enumerate() {
        decode_message(i, m, &mut messages)?;
    }
    let mut tools = Vec::new();
    for (i, t) in r.tools.unwrap_or_default().into_iter().enumerate() {
        if let Some(k) = t.kind.as_deref().filter(|k| *k != "custom") {
            return Err(invalid_at(
                &format!("tools[{i}].type"),
                &format!("only client tools (with `input_schema`) are supported, not `{k}`"),
            ));
        }
        let Some(schema) = t.input_schema else {
            return Err(invalid_at(
                &format!("tools[{i}].input_schema"),
                "a tool needs an `input_schema`",
            ));
        };
        tools.push(Tool {
            name: t.name,
            description: t.description,
            parameters: Some(schema),
            strict: t.strict,
        });
    }
    let mut parallel_tool_calls = None;
    let tool_choice = match r.tool_choice {
        None => None,
        Some(c) => {
            if c.disable_parallel_tool_use == Some(true) {
                parallel_tool_calls = Some(false);
            }
            Some(match c.kind.as_str() {
                "auto" => ToolChoice::Auto,
                "any" => ToolChoice::Required,
                "none" => ToolChoice::None,
                "tool" => ToolChoice::Function(c.name.ok_or_else(|| {
                    invalid_at("tool_choice.name", "`tool` choice needs the tool's `name`")
                })?),
                _ => {
                    return Err(invalid_at(
                        "tool_choice.type",
                        "expected \"auto\", \"any\", \"none\" or \"tool\"",
                    ))
                }
            })
        }
    };
    let mut extra = r.extra;
    let mut response_format = None;
    if let Some(mut cfg) = r.output_config {
        match cfg.remove("format") {
            None | Some(Value::Null) => {}
            Some(f) => {
                if f.get("type").and_then(Value::as_str) != Some("json_schema") {
                    return Err(invalid_at(
                        "output_config.format.type",
                        "expected \"json_schema\"",
                    ));
                }
                let schema = f.get("schema").cloned().ok_or_else(|| {
                    invalid_at("output_config.format.schema", "a JSON schema is required")
                })?;
                response_format = Some(ResponseFormat::JsonSchema(
                    serde_json::json!({"name": "output", "schema": schema}),
                ));
            }
        }
        if !cfg.is_empty() {
            extra.insert("output_config".into(), Value::Object(cfg));
        }
    }
    Ok(ChatRequest {
        model: r.model,
        messages,
        params: Params {
            temperature: r.temperature,
            top_p: r.top_p,
            max_tokens: Some(r.max_tokens),
            stop: r.stop_sequences.unwrap_or_default(),
            user: r.metadata.and_then(|m| m.user_id),
            ..Params::default()
        },
        tools,
        tool_choice,
        parallel_tool_calls,
        response_format,
        stream: r.stream.unwrap_or(false),
        // The gateway's usage tap always ends a stream with usage, and this
        // dialect reports it in `message_delta`.
        include_usage: true,
        extra,
    })
}

// =====================================================================
// Client direction: canonical response / stream / error → Messages
// =====================================================================

/// Maps a canonical finish reason onto `stop_reason`.
pub fn stop_reason_to_wire(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::Error => "end_turn",
        FinishReason::Length => "max_tokens",
        FinishReason::ToolCalls => "tool_use",
        FinishReason::ContentFilter => "refusal",
    }
}

/// A message id for the client: the backend's if it is already `msg_…`.
fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_owned()
    } else if id.is_empty() {
        new_message_id()
    } else {
        format!("msg_{id}")
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum RespBlock<'a> {
    Thinking {
        thinking: &'a str,
        signature: &'static str,
    },
    Text {
        text: Cow<'a, str>,
    },
    ToolUse {
        id: Cow<'a, str>,
        name: &'a str,
        input: Value,
    },
}

#[derive(Serialize)]
struct OutUsage {
    input_tokens: u32,
    output_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_read_input_tokens: Option<u32>,
}

/// Anthropic counts cache reads apart from `input_tokens`.
fn out_usage(u: &Usage) -> OutUsage {
    let cached = u.cached_tokens.filter(|c| *c <= u.prompt_tokens);
    OutUsage {
        input_tokens: u.prompt_tokens - cached.unwrap_or(0),
        output_tokens: u.completion_tokens,
        cache_read_input_tokens: cached,
    }
}

#[derive(Serialize)]
struct OutResponse<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<RespBlock<'a>>,
    stop_reason: &'static str,
    stop_sequence: Option<&'a str>,
    usage: OutUsage,
}

/// Encodes a canonical response as a Messages response; `model` is the name the
/// client asked for. Only the first choice is sent (the API has no `n`).
pub fn encode_chat_response(resp: &ChatResponse, model: &str) -> Vec<u8> {
    let choice = resp.choices.first();
    let mut content = Vec::new();
    if let Some(c) = choice {
        let m = &c.message;
        if let Some(r) = m.reasoning.as_deref().filter(|r| !r.is_empty()) {
            content.push(RespBlock::Thinking {
                thinking: r,
                signature: "",
            });
        }
        if let Some(t) = m
            .content
            .as_ref()
            .map(Content::text)
            .filter(|t| !t.is_empty())
        {
            content.push(RespBlock::Text { text: t });
        }
        for tc in &m.tool_calls {
            content.push(RespBlock::ToolUse {
                id: super::tool_id::portable(&tc.id),
                name: &tc.name,
                input: tool_input(&tc.arguments),
            });
        }
    }
    let finish = choice
        .and_then(|c| c.finish_reason)
        .unwrap_or(FinishReason::Stop);
    let out = OutResponse {
        id: message_id(&resp.id),
        kind: "message",
        role: "assistant",
        model,
        content,
        stop_reason: stop_reason_to_wire(finish),
        stop_sequence: None,
        usage: out_usage(&resp.usage.unwrap_or_default()),
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

// --- stream to a client ---

#[derive(Serialize)]
#[serde(tag = "type")]
enum OutDelta<'a> {
    #[serde(rename = "text_delta")]
    Text { text: &'a str },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: &'a str },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: &'a str },
}

#[derive(Serialize)]
struct OutBlockDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    delta: OutDelta<'a>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Thinking,
    /// A tool_use block, by canonical tool index.
    Tool(u32),
}

/// Encodes canonical stream events as the named-event stream an Anthropic client
/// expects: `message_start`, content blocks (start / delta / stop), then
/// `message_delta` (stop reason and final usage) and `message_stop`.
pub struct EventEncoder {
    model: String,
    id: String,
    started: bool,
    /// The open content block and its index.
    open: Option<(Open, u32)>,
    next_block: u32,
    /// Canonical tool index → content-block index.
    tool_blocks: Vec<(u32, u32)>,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
}

impl EventEncoder {
    pub fn new(model: &str) -> Self {
        EventEncoder {
            model: model.to_owned(),
            id: String::new(),
            started: false,
            open: None,
            next_block: 0,
            tool_blocks: Vec::new(),
            finish: None,
            usage: None,
        }
    }

    fn write(out: &mut Vec<u8>, name: &str, data: &impl Serialize) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, data);
        out.extend_from_slice(b"\n\n");
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        if self.id.is_empty() {
            self.id = new_message_id();
        }
        let msg = serde_json::json!({
            "type": "message_start",
            "message": {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                // The canonical usage arrives at the end: see message_delta.
                "usage": {"input_tokens": 0, "output_tokens": 0}
            }
        });
        Self::write(out, "message_start", &msg);
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some((_, index)) = self.open.take() {
            Self::write(
                out,
                "content_block_stop",
                &serde_json::json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// Makes `kind` the open block (closing another), returning its index.
    fn open(&mut self, kind: Open, start_block: Value, out: &mut Vec<u8>) -> u32 {
        if let Some((k, index)) = self.open {
            if k == kind {
                return index;
            }
        }
        self.close(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some((kind, index));
        Self::write(
            out,
            "content_block_start",
            &serde_json::json!({"type": "content_block_start", "index": index, "content_block": start_block}),
        );
        index
    }

    fn delta(out: &mut Vec<u8>, index: u32, delta: OutDelta<'_>) {
        Self::write(
            out,
            "content_block_delta",
            &OutBlockDelta {
                kind: "content_block_delta",
                index,
                delta,
            },
        );
    }

    fn tool_call(&mut self, t: &ToolCallDelta, out: &mut Vec<u8>) {
        let known = self.tool_blocks.iter().find(|(tool, _)| *tool == t.index);
        let index = match known {
            Some(&(_, block)) => block,
            None => {
                let id = match t.id.as_deref() {
                    Some(id) => super::tool_id::portable(id).into_owned(),
                    None => new_tool_id(),
                };
                let block = self.open(
                    Open::Tool(t.index),
                    serde_json::json!({"type": "tool_use", "id": id,
                        "name": t.name.as_deref().unwrap_or_default(), "input": {}}),
                    out,
                );
                self.tool_blocks.push((t.index, block));
                block
            }
        };
        if let Some(a) = t.arguments.as_deref().filter(|a| !a.is_empty()) {
            Self::delta(out, index, OutDelta::InputJson { partial_json: a });
        }
    }

    pub fn encode(&mut self, ev: &StreamEvent, out: &mut Vec<u8>) {
        match ev {
            StreamEvent::Meta(m) => {
                if !self.started && !m.id.is_empty() {
                    self.id = message_id(&m.id);
                }
                self.start(out);
            }
            StreamEvent::Delta(d) => {
                // The Messages API has one choice.
                if d.choice != 0 {
                    return;
                }
                self.start(out);
                if let Some(r) = d.reasoning.as_deref().filter(|r| !r.is_empty()) {
                    let i = self.open(
                        Open::Thinking,
                        serde_json::json!({"type": "thinking", "thinking": "", "signature": ""}),
                        out,
                    );
                    Self::delta(out, i, OutDelta::Thinking { thinking: r });
                }
                if let Some(c) = d.content.as_deref().filter(|c| !c.is_empty()) {
                    let i = self.open(
                        Open::Text,
                        serde_json::json!({"type": "text", "text": ""}),
                        out,
                    );
                    Self::delta(out, i, OutDelta::Text { text: c });
                }
                for t in &d.tool_calls {
                    self.tool_call(t, out);
                }
                if let Some(f) = d.finish_reason {
                    self.finish = Some(f);
                }
            }
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::Done => {
                self.start(out);
                self.close(out);
                let finish = match self.finish {
                    Some(f) => f,
                    None if !self.tool_blocks.is_empty() => FinishReason::ToolCalls,
                    None => FinishReason::Stop,
                };
                let usage = out_usage(&self.usage.unwrap_or_default());
                Self::write(
                    out,
                    "message_delta",
                    &serde_json::json!({
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason_to_wire(finish), "stop_sequence": null},
                        "usage": usage,
                    }),
                );
                Self::write(
                    out,
                    "message_stop",
                    &serde_json::json!({"type": "message_stop"}),
                );
            }
        }
    }
}

impl super::StreamEncoder for EventEncoder {
    fn encode(&mut self, ev: &StreamEvent, out: &mut Vec<u8>) {
        EventEncoder::encode(self, ev, out);
    }

    /// An `event: error`, what the Anthropic SDKs raise on mid-stream.
    fn encode_error(&mut self, err: &GatewayError, request_id: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(b"event: error\ndata: ");
        out.extend_from_slice(&error_body(err, request_id));
        out.extend_from_slice(b"\n\n");
    }
}

// --- errors to a client ---

/// The HTTP status of `err` for an Anthropic client: the gateway's, except that
/// an overloaded backend is Anthropic's 529.
pub fn error_status(err: &GatewayError) -> u16 {
    match err {
        GatewayError::Upstream(e) if e.kind == ErrorKind::Overloaded => 529,
        _ => err.status(),
    }
}

/// The Anthropic `error.type` for `err`.
pub fn error_type(err: &GatewayError) -> &'static str {
    match err {
        GatewayError::InvalidRequest { .. }
        | GatewayError::Unsupported { .. }
        | GatewayError::BodyTimeout { .. } => "invalid_request_error",
        GatewayError::PayloadTooLarge { .. } => "request_too_large",
        GatewayError::UnknownModel { .. } | GatewayError::NotFound { .. } => "not_found_error",
        GatewayError::ProviderUnavailable { .. }
        | GatewayError::NoTarget { .. }
        | GatewayError::Internal(_) => "api_error",
        GatewayError::Retrieval { .. } => "retrieval_error",
        GatewayError::Unauthorized { .. } => "authentication_error",
        GatewayError::Forbidden { .. } => "permission_error",
        GatewayError::Limited { .. } => "rate_limit_error",
        GatewayError::SensitiveData { .. } => "invalid_request_error",
        GatewayError::StoreUnavailable { .. } => "api_error",
        GatewayError::Upstream(e) => match e.kind {
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::Overloaded => "overloaded_error",
            ErrorKind::Timeout => "timeout_error",
            ErrorKind::BadRequest => match err.status() {
                404 => "not_found_error",
                413 => "request_too_large",
                _ => "invalid_request_error",
            },
            ErrorKind::ContextLength | ErrorKind::ContentFilter => "invalid_request_error",
            // The gateway's own credentials or a broken backend: not the client's
            // key, so never `authentication_error`.
            ErrorKind::Auth | ErrorKind::Connect | ErrorKind::MalformedResponse => "api_error",
        },
        // Errors added later: by their status.
        #[allow(unreachable_patterns)]
        _ => match err.status() {
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        },
    }
}

#[derive(Serialize)]
struct OutErrorDetail {
    #[serde(rename = "type")]
    kind: &'static str,
    message: String,
}

#[derive(Serialize)]
struct OutError<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: OutErrorDetail,
    request_id: &'a str,
}

/// Anthropic's error JSON for `err`.
pub fn error_body(err: &GatewayError, request_id: &str) -> Vec<u8> {
    let out = OutError {
        kind: "error",
        error: OutErrorDetail {
            kind: error_type(err),
            message: err.to_string(),
        },
        request_id,
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// The Anthropic Messages dialect, for the HTTP edge (`POST /v1/messages`).
#[derive(Default)]
pub struct Anthropic;

impl super::Dialect for Anthropic {
    fn decode_chat(&self, body: &[u8]) -> Result<ChatRequest, GatewayError> {
        decode_chat_request(body)
    }
    fn encode_chat(&self, resp: &ChatResponse, model: &str) -> Vec<u8> {
        encode_chat_response(resp, model)
    }
    fn stream_encoder(&self, req: &ChatRequest) -> Box<dyn super::StreamEncoder> {
        Box::new(EventEncoder::new(&req.model))
    }
    fn error_body(&self, err: &GatewayError, request_id: &str) -> Vec<u8> {
        error_body(err, request_id)
    }
    fn error_status(&self, err: &GatewayError) -> u16 {
        error_status(err)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::dialect::{Dialect, StreamEncoder};

    use crate::backend::anthropic::AnthropicCodec;
    use crate::backend::common::testing::{
        self, assert_fixture_errors, call_deltas, fixture, recorded_chat, request, usages,
    };
    use serde_json::json;

    fn stream_events(sse: &str) -> Result<Vec<StreamEvent>, UpstreamError> {
        testing::stream_events(&AnthropicCodec::new("2023-06-01", 1024), sse.as_bytes())
    }

    fn encode(req: &ChatRequest) -> Value {
        serde_json::from_slice(&encode_chat_request(req, "claude-x", 4096)).unwrap()
    }

    #[test]
    fn sampling_stops_and_service_tier_are_what_the_api_accepts() {
        let mut req = request(vec![Message::text(Role::User, "hi")]);
        req.params.temperature = Some(0.3);
        req.params.top_p = Some(0.9);
        req.params.stop = vec!["END".into(), " ".into(), "\n\t".into(), "".into()];
        req.extra.insert("service_tier".into(), json!("auto"));
        let v = encode(&req);
        assert_eq!(v["temperature"], json!(0.3));
        assert!(v.get("top_p").is_none(), "temperature wins: {v}");
        assert_eq!(v["stop_sequences"], json!(["END"]));
        assert_eq!(v["service_tier"], json!("auto"));

        req.params.temperature = None;
        req.params.stop = vec![" ".into()];
        for tier in ["default", "flex", "priority", "scale"] {
            req.extra.insert("service_tier".into(), json!(tier));
            let v = encode(&req);
            assert!(v.get("service_tier").is_none(), "{tier}: {v}");
            assert_eq!(v["top_p"], json!(0.9), "top_p alone is kept");
            assert!(v.get("stop_sequences").is_none());
        }
        req.extra
            .insert("service_tier".into(), json!("standard_only"));
        assert_eq!(encode(&req)["service_tier"], json!("standard_only"));
    }

    #[test]
    fn whitespace_only_text_blocks_are_dropped() {
        let mut parts = Message::text(Role::User, "");
        parts.content = Some(Content::Parts(vec![
            Part::Text(" \n".into()),
            Part::Text("real".into()),
        ]));
        let mut call = Message::text(Role::Assistant, "  ");
        call.tool_calls = vec![ToolCall {
            id: "toolu_1".into(),
            name: "f".into(),
            arguments: "{}".into(),
        }];
        let mut result = Message::text(Role::Tool, "\n");
        result.tool_call_id = Some("toolu_1".into());
        let v = encode(&request(vec![
            Message::text(Role::System, "  "),
            Message::text(Role::User, "\n\n"),
            parts,
            call,
            result,
        ]));
        assert!(v.get("system").is_none(), "{v}");
        assert_eq!(v["messages"][0], json!({"role": "user", "content": "real"}));
        assert_eq!(
            v["messages"][1]["content"],
            json!([{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}])
        );
        assert_eq!(
            v["messages"][2]["content"],
            json!([{"type": "tool_result", "tool_use_id": "toolu_1"}])
        );
    }

    #[test]
    fn foreign_tool_ids_are_mapped_to_the_id_pattern_consistently() {
        // An id from another backend: too long and outside `[A-Za-z0-9_-]`.
        let foreign = "call_0123456789abcdef~ts~c2lnbmF0dXJl+/=";
        let mut call = Message::text(Role::Assistant, "");
        call.tool_calls = vec![ToolCall {
            id: foreign.into(),
            name: "f".into(),
            arguments: "{}".into(),
        }];
        let mut result = Message::text(Role::Tool, "42");
        result.tool_call_id = Some(foreign.into());
        let v = encode(&request(vec![Message::text(Role::User, "q"), call, result]));
        let id = v["messages"][1]["content"][0]["id"].as_str().unwrap();
        assert!(crate::backend::tool_id::is_portable(id), "{id}");
        assert_eq!(v["messages"][2]["content"][0]["tool_use_id"], json!(id));

        // And what a client is handed is within the pattern too.
        let resp = response(
            None,
            vec![ToolCall {
                id: foreign.into(),
                name: "f".into(),
                arguments: "{}".into(),
            }],
            FinishReason::ToolCalls,
        );
        let out: Value = serde_json::from_slice(&encode_chat_response(&resp, "m")).unwrap();
        assert_eq!(out["content"][0]["id"], json!(id));
        let mut enc = EventEncoder::new("m");
        let mut bytes = Vec::new();
        enc.encode(
            &StreamEvent::Delta(Delta {
                tool_calls: vec![ToolCallDelta {
                    index: 0,
                    id: Some(foreign.into()),
                    name: Some("f".into()),
                    arguments: Some("{}".into()),
                }],
                ..Delta::default()
            }),
            &mut bytes,
        );
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains(id) && !text.contains("~ts~"), "{text}");
    }

    #[test]
    fn canonical_request_encodes_to_messages() {
        let mut user_parts = Message::text(Role::User, "");
        user_parts.content = Some(Content::Parts(vec![
            Part::Text("What is this?".into()),
            Part::Image {
                url: "data:image/png;base64,iVBORw0KGgo=".into(),
                detail: Some("low".into()),
            },
            Part::Image {
                url: "https://example.invalid/a.png".into(),
                detail: None,
            },
        ]));
        let mut call = Message::text(Role::Assistant, "Checking.");
        call.tool_calls = vec![
            ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: "{\"city\":\"Paris\"}".into(),
            },
            ToolCall {
                id: "call_2".into(),
                name: "get_time".into(),
                arguments: String::new(),
            },
            ToolCall {
                id: "call_3".into(),
                name: "broken".into(),
                arguments: "{\"a\":".into(),
            },
        ];
        let tool = |id: &str, text: &str| {
            let mut m = Message::text(Role::Tool, text);
            m.tool_call_id = Some(id.into());
            m
        };
        let mut req = request(vec![
            Message::text(Role::System, "Be brief."),
            Message::text(Role::Developer, "Answer in French."),
            user_parts,
            Message::text(Role::User, "Please."),
            call,
            tool("call_1", "18C"),
            tool("call_2", "[tool error] no clock"),
            tool("call_3", ""),
            Message::text(Role::User, "Thanks"),
        ]);
        req.params = Params {
            temperature: Some(1.7),
            top_p: Some(0.9),
            max_completion_tokens: Some(300),
            stop: vec!["END".into()],
            seed: Some(7),
            user: Some("user-42".into()),
            ..Params::default()
        };
        req.tools = vec![
            Tool {
                name: "get_weather".into(),
                description: Some("Weather".into()),
                parameters: Some(
                    json!({"type": "object", "properties": {"city": {"type": "string"}}}),
                ),
                strict: None,
            },
            Tool {
                name: "get_time".into(),
                description: None,
                parameters: None,
                strict: Some(true),
            },
        ];
        req.tool_choice = Some(ToolChoice::Required);
        req.parallel_tool_calls = Some(false);
        req.response_format = Some(ResponseFormat::JsonSchema(
            json!({"name": "x", "schema": {"type": "object"}}),
        ));
        req.stream = true;
        req.extra.insert("top_k".into(), json!(5));
        req.extra.insert("logit_bias".into(), json!({"1": 2}));
        let body = encode(&req);
        assert_eq!(
            body,
            json!({
                "model": "claude-x",
                "max_tokens": 300,
                "system": "Be brief.\n\nAnswer in French.",
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.invalid/a.png"}},
                        {"type": "text", "text": "Please."}
                    ]},
                    {"role": "assistant", "content": [
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                        {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
                        {"type": "tool_use", "id": "call_3", "name": "broken", "input": {"_raw_arguments": "{\"a\":"}}
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                        {"type": "tool_result", "tool_use_id": "call_2", "content": "no clock", "is_error": true},
                        {"type": "tool_result", "tool_use_id": "call_3"},
                        {"type": "text", "text": "Thanks"}
                    ]}
                ],
                "temperature": 1.0,
                "stop_sequences": ["END"],
                "metadata": {"user_id": "user-42"},
                "tools": [
                    {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
                    {"name": "get_time", "input_schema": {"type": "object", "properties": {}}, "strict": true}
                ],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
                "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
                "stream": true,
                "top_k": 5
            })
        );
    }

    #[test]
    fn simple_turns_use_string_content_and_defaults() {
        let mut req = request(vec![
            Message::text(Role::System, "Be brief."),
            Message::text(Role::User, "Hi"),
            Message::text(Role::Assistant, "Hello!"),
            Message::text(Role::User, "chat"),
        ]);
        req.response_format = Some(ResponseFormat::JsonObject);
        req.tool_choice = Some(ToolChoice::Auto); // no tools: not sent
        let body = encode(&req);
        assert_eq!(body["max_tokens"], 4096);
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "chat"}
            ])
        );
        assert!(body["system"]
            .as_str()
            .unwrap()
            .starts_with("Be brief.\n\nRespond with a single valid JSON object"));
        assert!(body.get("tool_choice").is_none());
        assert!(body.get("stream").is_none());
    }

    #[test]
    fn tool_choices_map() {
        let mut req = request(vec![Message::text(Role::User, "x")]);
        req.tools = vec![Tool {
            name: "f".into(),
            description: None,
            parameters: None,
            strict: None,
        }];
        for (choice, want) in [
            (ToolChoice::None, json!({"type": "none"})),
            (ToolChoice::Auto, json!({"type": "auto"})),
            (ToolChoice::Required, json!({"type": "any"})),
            (
                ToolChoice::Function("f".into()),
                json!({"type": "tool", "name": "f"}),
            ),
        ] {
            req.tool_choice = Some(choice);
            assert_eq!(encode(&req)["tool_choice"], want);
        }
        req.tool_choice = None;
        req.parallel_tool_calls = Some(false);
        assert_eq!(
            encode(&req)["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
    }

    #[test]
    fn recorded_responses_decode() {
        let r = recorded_chat("anthropic", decode_chat_response);
        assert_eq!(r.id, "msg_01FakeChat0001");
        let u = r.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (12, 6, 18)
        );

        let r = decode_chat_response(fixture("anthropic", "tools.json").as_bytes()).unwrap();
        let m = &r.choices[0].message;
        assert_eq!(m.tool_calls[0].id, "toolu_01FakeWeather");
        assert_eq!(m.tool_calls[0].name, "get_weather");
        assert_eq!(m.tool_calls[0].arguments, "{\"city\":\"Paris\"}");
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::ToolCalls));

        let r = decode_chat_response(fixture("anthropic", "length.json").as_bytes()).unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Length));

        let r = decode_chat_response(fixture("anthropic", "refusal.json").as_bytes()).unwrap();
        assert_eq!(
            r.choices[0].finish_reason,
            Some(FinishReason::ContentFilter)
        );

        let r = decode_chat_response(fixture("anthropic", "cached.json").as_bytes()).unwrap();
        let u = r.usage.unwrap();
        assert_eq!(
            (
                u.prompt_tokens,
                u.completion_tokens,
                u.total_tokens,
                u.cached_tokens
            ),
            (12, 6, 18, Some(7))
        );
        assert_eq!(
            r.choices[0].message.reasoning.as_deref(),
            Some("The user greets me.")
        );
    }

    #[test]
    fn error_inside_a_200_body_is_an_error() {
        let e =
            decode_chat_response(fixture("anthropic", "error_in_200.json").as_bytes()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
        let e = decode_chat_response(b"<html>oops</html>").unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
        let e = decode_chat_response(br#"{"id":"msg_1","type":"message"}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
    }

    #[test]
    fn streamed_tool_calls_and_finish_reasons_decode() {
        let events = stream_events(&fixture("anthropic", "tools.sse")).unwrap();
        assert!(matches!(&events[0], StreamEvent::Meta(m) if m.id == "msg_01FakeToolStream"));
        let calls = call_deltas(&events);
        assert_eq!(calls[0].id.as_deref(), Some("toolu_01FakeWeather"));
        assert_eq!(calls[0].name.as_deref(), Some("get_weather"));
        assert!(calls[1..].iter().all(|c| c.id.is_none() && c.index == 0));
        let args: String = calls.iter().filter_map(|c| c.arguments.clone()).collect();
        assert_eq!(args, "{\"city\": \"Paris\"}");
        let n = events.len();
        assert_eq!(
            events[n - 3],
            StreamEvent::Delta(Delta {
                finish_reason: Some(FinishReason::ToolCalls),
                ..Delta::default()
            })
        );
        assert_eq!(
            events[n - 2],
            StreamEvent::Usage(Usage {
                cached_tokens: Some(0),
                ..Usage::new(40, 18)
            })
        );
        assert_eq!(events[n - 1], StreamEvent::Done);

        let events = stream_events(&fixture("anthropic", "length.sse")).unwrap();
        assert!(events.iter().any(
            |e| matches!(e, StreamEvent::Delta(d) if d.finish_reason == Some(FinishReason::Length))
        ));
    }

    #[test]
    fn stream_usage_is_cumulative_not_added() {
        let sse = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"m\",\"usage\":{\"input_tokens\":5,\"cache_read_input_tokens\":3,\"output_tokens\":1}}}\n\n\
                   event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n\
                   event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Hmm.\"}}\n\n\
                   event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"abc\"}}\n\n\
                   event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
                   event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"pause_turn\"},\"usage\":{\"output_tokens\":9}}\n\n\
                   event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"input_tokens\":6,\"output_tokens\":10}}\n\n\
                   event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let events = stream_events(sse).unwrap();
        let usage = usages(&events);
        assert_eq!(usage.len(), 1);
        assert_eq!(
            (
                usage[0].prompt_tokens,
                usage[0].completion_tokens,
                usage[0].cached_tokens
            ),
            (9, 10, Some(3))
        );
        assert!(events
            .iter()
            .any(|e| matches!(e, StreamEvent::Delta(d) if d.reasoning.as_deref() == Some("Hmm."))));
        assert!(events.iter().any(
            |e| matches!(e, StreamEvent::Delta(d) if d.finish_reason == Some(FinishReason::Stop))
        ));
    }

    #[test]
    fn stream_errors_and_garbage_are_errors() {
        let mut dec = EventDecoder::default();
        let mut out = Vec::new();
        let e = dec
            .decode(
                Some("error"),
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}"#,
                &mut out,
            )
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::RateLimited);
        let e = dec.decode(None, "{not json", &mut out).unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
        // Unknown events and pings are skipped.
        dec.decode(Some("ping"), r#"{"type":"ping"}"#, &mut out)
            .unwrap();
        dec.decode(Some("x"), r#"{"type":"brand_new_event"}"#, &mut out)
            .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn backend_errors_classify_by_type_status_and_text() {
        let cases: [(u16, &str, ErrorKind); 6] = [
            (529, "error_529.json", ErrorKind::Overloaded),
            (403, "error_403.json", ErrorKind::Auth),
            (404, "error_404.json", ErrorKind::BadRequest),
            (413, "error_413.json", ErrorKind::BadRequest),
            (
                400,
                "error_400_context_limit.json",
                ErrorKind::ContextLength,
            ),
            (200, "error_in_200.json", ErrorKind::Overloaded),
        ];
        assert_fixture_errors("anthropic", classify_error_body, &cases);
        let e = classify_error_body(529, b"");
        assert_eq!(e.kind, ErrorKind::Overloaded);
        assert_eq!(e.status, Some(529));
        let e = classify_error_body(
            400,
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"Output blocked by content filtering policy"}}"#,
        );
        assert_eq!(e.kind, ErrorKind::ContentFilter);
        assert_eq!(
            classify_error_body(502, b"<html>Bad Gateway</html>").kind,
            ErrorKind::Overloaded
        );
    }

    // --- the front door ---

    fn client_request() -> Value {
        json!({
            "model": "route",
            "max_tokens": 300,
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}}
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {"type": "text", "text": "Thanks"}
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Nowhere"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "unknown city", "is_error": true}
                ]}
            ],
            "temperature": 0.5,
            "top_p": 0.9,
            "stop_sequences": ["END"],
            "metadata": {"user_id": "user-42"},
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
            "stream": true,
            "top_k": 5,
            "thinking": {"type": "enabled", "budget_tokens": 1024}
        })
    }

    #[test]
    fn client_request_decodes() {
        let req = decode_chat_request(client_request().to_string().as_bytes()).unwrap();
        assert_eq!(req.model, "route");
        assert_eq!(req.messages[0], Message::text(Role::System, "Be brief."));
        assert!(
            matches!(&req.messages[1].content, Some(Content::Parts(p)) if p.len() == 3
            && matches!(&p[1], Part::Image { url, .. } if url == "data:image/png;base64,iVBORw0KGgo=")
            && matches!(&p[2], Part::Other(_)))
        );
        assert_eq!(
            req.messages[2].tool_calls[0].arguments,
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(req.messages[3].role, Role::Tool);
        assert_eq!(req.messages[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(req.messages[4], Message::text(Role::User, "Thanks"));
        assert_eq!(req.messages[5].content, None);
        assert_eq!(
            req.messages[6].content,
            Some(Content::Text("[tool error] unknown city".into()))
        );
        assert_eq!(req.params.max_tokens, Some(300));
        assert_eq!(req.params.user.as_deref(), Some("user-42"));
        assert_eq!(
            req.tool_choice,
            Some(ToolChoice::Function("get_weather".into()))
        );
        assert_eq!(req.parallel_tool_calls, Some(false));
        assert!(req.stream && req.include_usage);
        assert_eq!(req.extra.len(), 2, "{:?}", req.extra);
    }

    #[test]
    fn client_request_round_trips_to_an_anthropic_backend() {
        let client = client_request();
        let req = decode_chat_request(client.to_string().as_bytes()).unwrap();
        let upstream: Value =
            serde_json::from_slice(&encode_chat_request(&req, "claude-x", 1)).unwrap();
        let mut expected = client.clone();
        expected["model"] = json!("claude-x");
        // Both were sent; the backend gets the temperature only.
        expected.as_object_mut().unwrap().remove("top_p");
        assert_eq!(upstream, expected);
    }

    #[test]
    fn invalid_client_requests_name_the_field() {
        // An empty `messages` list is the gateway's to reject (after prompts).
        let cases: [(&str, Option<&str>); 8] = [
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
                Some("max_tokens"),
            ),
            (r#"{"max_tokens":5,"messages":[]}"#, Some("model")),
            (
                r#"{"model":"m","max_tokens":"many","messages":[{"role":"user","content":"x"}]}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"system","content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"text"}]}]}"#,
                Some("messages[0].content[0].text"),
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],"tool_choice":{"type":"sometimes"}}"#,
                Some("tool_choice.type"),
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
                Some("tools[0].type"),
            ),
            (r#"{"model":"m","#, None),
        ];
        for (body, param) in cases {
            match decode_chat_request(body.as_bytes()) {
                Err(GatewayError::InvalidRequest { param: p, message }) => {
                    assert_eq!(p.as_deref(), param, "{body}: {message}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn output_config_schema_becomes_a_response_format() {
        let req = decode_chat_request(
            br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],"output_config":{"effort":"low","format":{"type":"json_schema","schema":{"type":"object"}}}}"#,
        )
        .unwrap();
        assert!(
            matches!(&req.response_format, Some(ResponseFormat::JsonSchema(s)) if s["schema"] == json!({"type":"object"}))
        );
        assert_eq!(req.extra["output_config"], json!({"effort": "low"}));
        let body = encode(&req);
        assert_eq!(
            body["output_config"],
            json!({"effort": "low", "format": {"type": "json_schema", "schema": {"type": "object"}}})
        );
    }

    fn response(content: Option<&str>, calls: Vec<ToolCall>, finish: FinishReason) -> ChatResponse {
        ChatResponse {
            id: "chatcmpl-1".into(),
            created: 1,
            model: "backend".into(),
            choices: vec![Choice {
                index: 0,
                message: Message {
                    role: Role::Assistant,
                    content: content.map(|c| Content::Text(c.into())),
                    name: None,
                    tool_calls: calls,
                    tool_call_id: None,
                    reasoning: None,
                },
                finish_reason: Some(finish),
            }],
            usage: Some(Usage {
                cached_tokens: Some(4),
                ..Usage::new(12, 6)
            }),
            system_fingerprint: None,
        }
    }

    #[test]
    fn responses_encode_as_messages() {
        let r = response(Some("Hi"), Vec::new(), FinishReason::Stop);
        let v: Value = serde_json::from_slice(&encode_chat_response(&r, "route")).unwrap();
        assert_eq!(
            v,
            json!({"id": "msg_chatcmpl-1", "type": "message", "role": "assistant", "model": "route",
                "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 8, "output_tokens": 6, "cache_read_input_tokens": 4}})
        );
        let r = response(
            None,
            vec![ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: "{\"city\":\"Paris\"}".into(),
            }],
            FinishReason::ToolCalls,
        );
        let v: Value = serde_json::from_slice(&encode_chat_response(&r, "route")).unwrap();
        assert_eq!(
            v["content"],
            json!([{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}])
        );
        assert_eq!(v["stop_reason"], "tool_use");
        for (f, want) in [
            (FinishReason::Length, "max_tokens"),
            (FinishReason::ContentFilter, "refusal"),
        ] {
            let v: Value =
                serde_json::from_slice(&encode_chat_response(&response(Some("x"), vec![], f), "r"))
                    .unwrap();
            assert_eq!(v["stop_reason"], want);
        }
    }

    /// (event name, data) pairs of an encoded stream.
    fn named_events(raw: &str) -> Vec<(String, Value)> {
        raw.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                (
                    name.strip_prefix("event: ").unwrap().to_owned(),
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn canonical_streams_encode_as_named_events_and_decode_back() {
        let mut events = stream_events(&fixture("anthropic", "tools.sse")).unwrap();
        let mut enc = Anthropic.stream_encoder(&request(Vec::new()));
        let mut out = Vec::new();
        for ev in &events {
            enc.encode(ev, &mut out);
        }
        let raw = String::from_utf8(out).unwrap();
        let names: Vec<String> = named_events(&raw).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let parsed = named_events(&raw);
        assert_eq!(parsed[0].1["message"]["id"], "msg_01FakeToolStream");
        assert_eq!(parsed[0].1["message"]["model"], "route");
        assert_eq!(
            parsed[4].1["content_block"],
            json!({"type": "tool_use", "id": "toolu_01FakeWeather", "name": "get_weather", "input": {}})
        );
        assert_eq!(
            parsed[9].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                "usage": {"input_tokens": 40, "output_tokens": 18, "cache_read_input_tokens": 0}})
        );
        // What the gateway sends decodes to the same events.
        let again = stream_events(&raw).unwrap();
        if let (StreamEvent::Meta(a), StreamEvent::Meta(b)) = (&mut events[0], &again[0]) {
            a.created = b.created;
            a.model = b.model.clone();
        }
        assert_eq!(again, events);
    }

    #[test]
    fn errors_have_the_anthropic_shape_and_statuses() {
        let up = |kind, status| {
            GatewayError::Upstream(UpstreamError::new(kind, "x").with_status(status))
        };
        let cases = [
            (up(ErrorKind::Overloaded, 500), 529, "overloaded_error"),
            (up(ErrorKind::RateLimited, 429), 429, "rate_limit_error"),
            (up(ErrorKind::Auth, 401), 502, "api_error"),
            (up(ErrorKind::BadRequest, 404), 404, "not_found_error"),
            (up(ErrorKind::BadRequest, 413), 413, "request_too_large"),
            (
                up(ErrorKind::ContextLength, 400),
                400,
                "invalid_request_error",
            ),
            (up(ErrorKind::Timeout, 504), 504, "timeout_error"),
            (
                GatewayError::UnknownModel {
                    model: "nope".into(),
                    available: "a, b".into(),
                },
                404,
                "not_found_error",
            ),
            (
                GatewayError::invalid("missing field `max_tokens`", Some("max_tokens")),
                400,
                "invalid_request_error",
            ),
            (
                GatewayError::PayloadTooLarge { limit: 10 },
                413,
                "request_too_large",
            ),
        ];
        for (err, status, kind) in cases {
            assert_eq!(Anthropic.error_status(&err), status, "{err:?}");
            let v: Value = serde_json::from_slice(&Anthropic.error_body(&err, "pg-1")).unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], kind, "{err:?}");
            assert!(v["error"]["message"].is_string());
            assert_eq!(v["request_id"], "pg-1");
        }
        let mut enc = EventEncoder::new("route");
        let mut out = Vec::new();
        enc.encode_error(&up(ErrorKind::Overloaded, 500), "pg-2", &mut out);
        let raw = String::from_utf8(out).unwrap();
        assert!(
            raw.starts_with("event: error\ndata: {\"type\":\"error\""),
            "{raw}"
        );
        assert!(raw.ends_with("\n\n"));
    }
}
