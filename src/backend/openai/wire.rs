//! The OpenAI Chat Completions wire format, both directions: it is the gateway's
//! main ingress dialect and the format of every OpenAI-compatible backend. Wire
//! structs are private to this module; the rest of the gateway sees only canonical
//! types and the functions below.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::backend::common::{
    self, classify_error_value, finish_reason_from_wire, malformed, malformed_json, new_call_id,
    new_completion_id, open_stream, out_tool_calls, out_tools, stream_meta, InFunction, InToolCall,
    InUsage, OutFunction, OutTool, OutToolCall,
};
use crate::backend::StreamDecoder;
use crate::canonical::*;
use crate::error::{ErrorKind, GatewayError, UpstreamError};
use crate::framing::Frame;

// === decoding (a client's request, a backend's response) ===

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum InRole {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

/// A message's `content`: a string or a list of parts. Written by hand rather
/// than as an untagged enum, which would buffer every content into serde's
/// intermediate form before trying each variant.
enum InContent {
    Text(String),
    Parts(Vec<Value>),
}

impl<'de> Deserialize<'de> for InContent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = InContent;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of content parts")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<InContent, E> {
                Ok(InContent::Text(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<InContent, E> {
                Ok(InContent::Text(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<InContent, A::Error> {
                let mut parts = Vec::new();
                while let Some(p) = seq.next_element::<Value>()? {
                    parts.push(p);
                }
                Ok(InContent::Parts(parts))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct InMessage {
    role: InRole,
    #[serde(default)]
    content: Option<InContent>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<InToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
    /// Legacy single function call (ChatGLM3's server, old OpenAI).
    #[serde(default)]
    function_call: Option<InFunction>,
    #[serde(default, alias = "reasoning")]
    reasoning_content: Option<String>,
}

fn part_from_wire(v: Value) -> Part {
    match v.get("type").and_then(Value::as_str) {
        Some("text") => match v.get("text").and_then(Value::as_str) {
            Some(t) => Part::Text(t.to_owned()),
            None => Part::Other(v),
        },
        Some("image_url") => {
            let img = v.get("image_url");
            let url = img
                .and_then(|i| i.get("url").or(Some(i)))
                .and_then(Value::as_str);
            match url {
                Some(u) => Part::Image {
                    url: u.to_owned(),
                    detail: img
                        .and_then(|i| i.get("detail"))
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                },
                None => Part::Other(v),
            }
        }
        _ => Part::Other(v),
    }
}

impl InMessage {
    fn into_canonical(self) -> Message {
        let mut tool_calls: Vec<ToolCall> = self
            .tool_calls
            .unwrap_or_default()
            .into_iter()
            .map(InToolCall::into_call)
            .collect();
        if let Some(f) = self.function_call {
            tool_calls.push(f.into_call(new_call_id()));
        }
        Message {
            role: match self.role {
                InRole::System => Role::System,
                InRole::Developer => Role::Developer,
                InRole::User => Role::User,
                InRole::Assistant => Role::Assistant,
                InRole::Tool | InRole::Function => Role::Tool,
            },
            content: self.content.map(|c| match c {
                InContent::Text(t) => Content::Text(t),
                InContent::Parts(p) => Content::Parts(p.into_iter().map(part_from_wire).collect()),
            }),
            name: self.name,
            tool_calls,
            tool_call_id: self.tool_call_id,
            reasoning: self.reasoning_content,
        }
    }
}

#[derive(Deserialize)]
struct InToolDef {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    function: InFunctionDef,
}

#[derive(Deserialize)]
struct InFunctionDef {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum InStop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct InStreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// A client's chat request. Deserialized by hand (below): the known fields are
/// read in one pass and every other member is kept in `extra`, which a
/// `#[serde(flatten)]` map would do only after buffering the whole object.
struct InChatRequest {
    model: String,
    messages: Vec<InMessage>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stop: Option<InStop>,
    seed: Option<i64>,
    n: Option<u32>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    user: Option<String>,
    tools: Option<Vec<InToolDef>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    response_format: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<InStreamOptions>,
    extra: Map<String, Value>,
}

impl<'de> Deserialize<'de> for InChatRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = InChatRequest;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a chat completion request object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<InChatRequest, A::Error> {
                use serde::de::Error;
                let mut model: Option<String> = None;
                let mut messages: Option<Vec<InMessage>> = None;
                let mut r = InChatRequest {
                    model: String::new(),
                    messages: Vec::new(),
                    temperature: None,
                    top_p: None,
                    max_tokens: None,
                    max_completion_tokens: None,
                    stop: None,
                    seed: None,
                    n: None,
                    presence_penalty: None,
                    frequency_penalty: None,
                    user: None,
                    tools: None,
                    tool_choice: None,
                    parallel_tool_calls: None,
                    response_format: None,
                    stream: None,
                    stream_options: None,
                    extra: Map::new(),
                };
                // A known field given twice is refused, as a derived
                // implementation would; `Option` fields hold `null` as `None`.
                macro_rules! once {
                    ($slot:expr, $name:literal) => {{
                        if $slot.is_some() {
                            return Err(A::Error::duplicate_field($name));
                        }
                        $slot = map.next_value()?;
                    }};
                }
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "model" => {
                            if model.is_some() {
                                return Err(A::Error::duplicate_field("model"));
                            }
                            model = Some(map.next_value()?);
                        }
                        "messages" => {
                            if messages.is_some() {
                                return Err(A::Error::duplicate_field("messages"));
                            }
                            messages = Some(map.next_value()?);
                        }
                        "temperature" => once!(r.temperature, "temperature"),
                        "top_p" => once!(r.top_p, "top_p"),
                        "max_tokens" => once!(r.max_tokens, "max_tokens"),
                        "max_completion_tokens" => {
                            once!(r.max_completion_tokens, "max_completion_tokens")
                        }
                        "stop" => once!(r.stop, "stop"),
                        "seed" => once!(r.seed, "seed"),
                        "n" => once!(r.n, "n"),
                        "presence_penalty" => once!(r.presence_penalty, "presence_penalty"),
                        "frequency_penalty" => once!(r.frequency_penalty, "frequency_penalty"),
                        "user" => once!(r.user, "user"),
                        "tools" => once!(r.tools, "tools"),
                        "tool_choice" => once!(r.tool_choice, "tool_choice"),
                        "parallel_tool_calls" => {
                            once!(r.parallel_tool_calls, "parallel_tool_calls")
                        }
                        "response_format" => once!(r.response_format, "response_format"),
                        "stream" => once!(r.stream, "stream"),
                        "stream_options" => once!(r.stream_options, "stream_options"),
                        _ => {
                            let v: Value = map.next_value()?;
                            r.extra.insert(key.into_owned(), v);
                        }
                    }
                }
                r.model = model.ok_or_else(|| A::Error::missing_field("model"))?;
                r.messages = messages.ok_or_else(|| A::Error::missing_field("messages"))?;
                Ok(r)
            }
        }
        d.deserialize_map(V)
    }
}

/// Turns a serde error into a 400 that names the offending field.
fn decode_error(e: serde_path_to_error::Error<serde_json::Error>) -> GatewayError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let msg = inner.to_string();
    if inner.is_syntax() || inner.is_eof() {
        return GatewayError::invalid(format!("request body is not valid JSON: {msg}"), None);
    }
    // serde names a missing field in its message ("missing field `messages`").
    let missing = msg
        .strip_prefix("missing field `")
        .and_then(|r| r.split('`').next())
        .map(str::to_owned);
    let param = match (missing, path.as_str()) {
        (Some(field), "." | "") => field,
        (Some(field), p) => format!("{p}.{field}"),
        (None, p) => p.to_owned(),
    };
    let param = if param == "." { String::new() } else { param };
    if param.is_empty() {
        GatewayError::invalid(format!("invalid request body: {msg}"), None)
    } else {
        GatewayError::invalid(format!("invalid field `{param}`: {msg}"), Some(&param))
    }
}

/// Decodes `body`; a body that fails is decoded again with the path of the
/// failing field tracked, for the error message (tracking costs on every
/// field, and almost every request is valid).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    if let Ok(v) = serde_json::from_slice(body) {
        return Ok(v);
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    let v = serde_path_to_error::deserialize(de).map_err(decode_error)?;
    Ok(v)
}

fn tool_choice_from_wire(v: Value) -> Result<ToolChoice, GatewayError> {
    let bad = || {
        GatewayError::invalid(
            "invalid field `tool_choice`: expected \"none\", \"auto\", \"required\" or {\"type\":\"function\",\"function\":{\"name\":…}}",
            Some("tool_choice"),
        )
    };
    match &v {
        Value::String(s) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            _ => Err(bad()),
        },
        Value::Object(o) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|n| ToolChoice::Function(n.to_owned()))
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

fn response_format_from_wire(v: Value) -> Result<ResponseFormat, GatewayError> {
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        Some("json_schema") => Ok(ResponseFormat::JsonSchema(
            v.get("json_schema").cloned().unwrap_or(Value::Null),
        )),
        _ => Err(GatewayError::invalid(
            "invalid field `response_format.type`: expected \"text\", \"json_object\" or \"json_schema\"",
            Some("response_format.type"),
        )),
    }
}

/// Decodes a client's `POST /v1/chat/completions` body.
/// An empty `messages` list is accepted here: a prompt may supply the messages;
/// the gateway rejects a request that still has none.
pub fn decode_chat_request(body: &[u8]) -> Result<ChatRequest, GatewayError> {
    let r: InChatRequest = parse(body)?;
    let mut tools = Vec::new();
    for (i, t) in r.tools.unwrap_or_default().into_iter().enumerate() {
        if t.kind.as_deref().is_some_and(|k| k != "function") {
            return Err(GatewayError::invalid(
                format!("invalid field `tools[{i}].type`: only \"function\" tools are supported"),
                Some(&format!("tools[{i}].type")),
            ));
        }
        tools.push(Tool {
            name: t.function.name,
            description: t.function.description,
            parameters: t.function.parameters,
            strict: t.function.strict,
        });
    }
    Ok(ChatRequest {
        model: r.model,
        messages: r
            .messages
            .into_iter()
            .map(InMessage::into_canonical)
            .collect(),
        params: Params {
            temperature: r.temperature,
            top_p: r.top_p,
            max_tokens: r.max_tokens,
            max_completion_tokens: r.max_completion_tokens,
            stop: match r.stop {
                None => Vec::new(),
                Some(InStop::One(s)) => vec![s],
                Some(InStop::Many(v)) => v,
            },
            seed: r.seed,
            n: r.n,
            presence_penalty: r.presence_penalty,
            frequency_penalty: r.frequency_penalty,
            user: r.user,
        },
        tools,
        tool_choice: r.tool_choice.map(tool_choice_from_wire).transpose()?,
        parallel_tool_calls: r.parallel_tool_calls,
        response_format: r
            .response_format
            .map(response_format_from_wire)
            .transpose()?,
        stream: r.stream.unwrap_or(false),
        include_usage: r
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        extra: r.extra,
    })
}

#[derive(Deserialize)]
struct InChoice {
    #[serde(default)]
    index: u32,
    message: InMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct InResponse {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Option<Vec<InChoice>>,
    #[serde(default)]
    usage: Option<InUsage>,
    #[serde(default)]
    system_fingerprint: Option<String>,
    #[serde(default)]
    error: Option<Value>,
}

/// Decodes a backend's chat completion body (HTTP 2xx).
pub fn decode_chat_response(body: &[u8]) -> Result<ChatResponse, UpstreamError> {
    let r: InResponse = serde_json::from_slice(body)
        .map_err(|e| malformed_json("a body", "a chat completion", &e))?;
    if let Some(err) = r.error {
        return Err(classify_error_value(200, &err));
    }
    let Some(choices) = r.choices else {
        return Err(malformed("backend response has no `choices`"));
    };
    Ok(ChatResponse {
        id: r
            .id
            .filter(|i| !i.is_empty())
            .unwrap_or_else(new_completion_id),
        created: r.created.unwrap_or_else(unix_now),
        model: r.model.unwrap_or_default(),
        choices: choices
            .into_iter()
            .map(|c| {
                let mut message = c.message.into_canonical();
                message.role = Role::Assistant;
                let mut finish = c.finish_reason.as_deref().map(finish_reason_from_wire);
                if finish == Some(FinishReason::Stop) && !message.tool_calls.is_empty() {
                    finish = Some(FinishReason::ToolCalls);
                }
                Choice {
                    index: c.index,
                    message,
                    finish_reason: finish,
                }
            })
            .collect(),
        usage: r.usage.as_ref().map(InUsage::canonical),
        system_fingerprint: r.system_fingerprint,
    })
}

// --- stream chunks ---

#[derive(Deserialize, Default)]
struct InDelta {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default, alias = "reasoning")]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<InToolCall>>,
    #[serde(default)]
    function_call: Option<InFunction>,
}

#[derive(Deserialize)]
struct InChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<InDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct InChunk {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    system_fingerprint: Option<String>,
    #[serde(default)]
    choices: Vec<InChunkChoice>,
    #[serde(default)]
    usage: Option<InUsage>,
    #[serde(default)]
    error: Option<Value>,
}

/// State of decoding one OpenAI-style stream from a backend.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    started: bool,
    done: bool,
    /// Legacy `function_call` streams have no index or id; keep one per choice.
    legacy_call_started: bool,
    /// Choices (by index, below 64) whose finish reason was already emitted.
    /// ChatGLM3's server sends `function_call` and then a trailing `stop`; the
    /// first finish reason of a choice is the one that counts.
    finished_choices: u128,
    /// Choices (by index, below 64) whose role was already announced.
    announced_choices: u128,
}

impl ChunkDecoder {
    /// Decodes the `data` of one SSE event into canonical events.
    pub fn decode(&mut self, data: &str, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            out.push(StreamEvent::Done);
            return Ok(());
        }
        if data.is_empty() {
            return Ok(());
        }
        let c: InChunk = serde_json::from_str(data)
            .map_err(|e| malformed_json("a stream event", "a chat completion chunk", &e))?;
        if let Some(err) = c.error {
            return Err(classify_error_value(200, &err));
        }
        open_stream(&mut self.started, out, || StreamMeta {
            system_fingerprint: c.system_fingerprint,
            // ChatGLM3's demo sends `"id": ""`.
            ..stream_meta(
                c.id.filter(|i| !i.is_empty())
                    .unwrap_or_else(new_completion_id),
                c.created,
                c.model,
            )
        });
        for ch in c.choices {
            let bit = 1u128 << super::choice_index(ch.index)?;
            let d = ch.delta.unwrap_or_default();
            let mut tool_calls: Vec<ToolCallDelta> = d
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, mut t)| {
                    let (name, arguments) = t.parts();
                    ToolCallDelta {
                        index: t.index.unwrap_or(i as u32),
                        id: t.id.filter(|s| !s.is_empty()),
                        name,
                        arguments,
                    }
                })
                // A fragment with no id, no name and no argument text adds
                // nothing to its call (`{}` is three bytes of input and a whole
                // fragment of output).
                .filter(|t| {
                    t.id.is_some()
                        || t.name.is_some()
                        || t.arguments.as_deref().is_some_and(|a| !a.is_empty())
                })
                .collect();
            if let Some(f) = d.function_call {
                let first = !self.legacy_call_started;
                self.legacy_call_started = true;
                let (name, arguments) = f.into_parts();
                tool_calls.push(ToolCallDelta {
                    index: 0,
                    id: first.then(new_call_id),
                    name,
                    arguments,
                });
            }
            let mut finish_reason = ch.finish_reason.as_deref().map(finish_reason_from_wire);
            let mut dropped_finish = false;
            if finish_reason.is_some() {
                if self.finished_choices & bit != 0 {
                    finish_reason = None;
                    dropped_finish = true;
                }
                self.finished_choices |= bit;
            }
            if finish_reason == Some(FinishReason::Stop) && self.legacy_call_started {
                finish_reason = Some(FinishReason::ToolCalls);
            }
            let delta = Delta {
                choice: ch.index,
                role: d.role.as_deref().map(|_| Role::Assistant),
                content: d.content,
                reasoning: d.reasoning_content,
                tool_calls,
                finish_reason,
            };
            if dropped_finish && !delta.has_output() {
                continue;
            }
            // A delta with nothing in it (`{}`, empty content, a role already
            // announced) is dropped here: backends send them freely, and each
            // would otherwise cost an event, held until the first output.
            let new_role = delta.role.is_some() && self.announced_choices & bit == 0;
            if delta.role.is_some() {
                self.announced_choices |= bit;
            }
            if !new_role && !delta.has_output() && delta.finish_reason.is_none() {
                continue;
            }
            out.push(StreamEvent::Delta(delta));
        }
        if let Some(u) = c.usage {
            out.push(StreamEvent::Usage(u.canonical()));
        }
        Ok(())
    }
}

impl StreamDecoder for ChunkDecoder {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        let data = common::stream_data(&frame, common::error_event)?;
        self.decode(data, out)
    }

    /// True once `[DONE]` arrived.
    fn finished(&self) -> bool {
        self.done
    }
}

// --- errors from a backend ---

// === encoding (a request to a backend, a response to a client) ===

struct OutParts<'a>(&'a [Part]);

impl Serialize for OutParts<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for p in self.0 {
            match p {
                Part::Text(t) => {
                    seq.serialize_element(&serde_json::json!({"type":"text","text":t}))?
                }
                Part::Image { url, detail } => {
                    let mut img = Map::new();
                    img.insert("url".into(), Value::String(url.clone()));
                    if let Some(d) = detail {
                        img.insert("detail".into(), Value::String(d.clone()));
                    }
                    seq.serialize_element(&serde_json::json!({"type":"image_url","image_url":img}))?
                }
                Part::Other(v) => seq.serialize_element(v)?,
            }
        }
        seq.end()
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutContent<'a> {
    Text(&'a str),
    Parts(OutParts<'a>),
    Owned(String),
}

fn out_content(c: &Content) -> OutContent<'_> {
    match c {
        Content::Text(t) => OutContent::Text(t),
        Content::Parts(p) => OutContent::Parts(OutParts(p)),
    }
}

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    content: Option<OutContent<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OutToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<std::borrow::Cow<'a, str>>,
    /// Legacy single function call (servers that predate `tool_calls`).
    #[serde(skip_serializing_if = "Option::is_none")]
    function_call: Option<OutFunction<'a>>,
}

fn out_message(m: &Message) -> OutMessage<'_> {
    OutMessage {
        role: m.role.as_str(),
        content: m.content.as_ref().map(out_content),
        name: m.name.as_deref(),
        tool_calls: out_tool_calls(&m.tool_calls),
        tool_call_id: m.tool_call_id.as_deref().map(super::tool_id::portable),
        function_call: None,
    }
}

/// `value` as a Python literal (`'text'`, `True`, `None`, `[1, 2]`, `{'k': 1}`).
fn python_literal(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => {
            out.push('\'');
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\'' => out.push_str("\\'"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
                    c => out.push(c),
                }
            }
            out.push('\'');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_literal(v, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_literal(&Value::String(k.clone()), out);
                out.push_str(": ");
                python_literal(v, out);
            }
            out.push('}');
        }
    }
}

fn is_python_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// The text ChatGLM3 itself writes for a tool call: the function name on the
/// first line, then a Python block calling `tool_call` with the arguments as
/// keyword arguments. Its `openai_api_demo` splits a replayed `function_call`
/// message's content at the first newline into (name, code), so the content
/// must be exactly this (null is refused, "" breaks its parser).
pub fn chatglm3_call_text(call: &ToolCall) -> String {
    let mut args = String::new();
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&call.arguments) {
        if map.keys().all(|k| is_python_identifier(k)) {
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    args.push_str(", ");
                }
                args.push_str(k);
                args.push('=');
                python_literal(v, &mut args);
            }
        } else {
            args.push_str("**");
            python_literal(&Value::Object(map), &mut args);
        }
    }
    format!("{}\n ```python\ntool_call({args})\n```", call.name)
}

/// The legacy function-calling form of a transcript, for servers that only know
/// the roles system/user/assistant/function (ChatGLM3's `openai_api_demo`):
/// `developer` becomes `system`, an assistant's first tool call becomes
/// `function_call` with the call text ChatGLM3 writes as content (see
/// [`chatglm3_call_text`]), and a tool result becomes a `function` message named
/// after the call it answers.
fn out_messages_legacy(messages: &[Message]) -> Vec<OutMessage<'_>> {
    messages
        .iter()
        .map(|m| {
            let mut out = out_message(m);
            match m.role {
                Role::Developer => out.role = "system",
                Role::Assistant if !m.tool_calls.is_empty() => {
                    let c = &m.tool_calls[0];
                    out.function_call = Some(OutFunction::new(c));
                    out.content = Some(OutContent::Owned(chatglm3_call_text(c)));
                    out.tool_calls = Vec::new();
                }
                Role::Tool => {
                    out.role = "function";
                    out.tool_call_id = None;
                    out.name = m.name.as_deref().or_else(|| {
                        let id = m.tool_call_id.as_deref()?;
                        messages
                            .iter()
                            .flat_map(|x| x.tool_calls.iter())
                            .find(|c| c.id == id)
                            .map(|c| c.name.as_str())
                    });
                }
                _ => {}
            }
            out
        })
        .collect()
}

#[derive(Serialize)]
struct OutStreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct OutChatRequest<'a> {
    model: &'a str,
    messages: Vec<OutMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<OutStreamOptions>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

fn tool_choice_to_wire(c: &ToolChoice) -> Value {
    match c {
        ToolChoice::None => Value::String("none".into()),
        ToolChoice::Auto => Value::String("auto".into()),
        ToolChoice::Required => Value::String("required".into()),
        ToolChoice::Function(n) => serde_json::json!({"type":"function","function":{"name":n}}),
    }
}

fn response_format_to_wire(f: &ResponseFormat) -> Value {
    match f {
        ResponseFormat::Text => serde_json::json!({"type":"text"}),
        ResponseFormat::JsonObject => serde_json::json!({"type":"json_object"}),
        ResponseFormat::JsonSchema(s) => serde_json::json!({"type":"json_schema","json_schema":s}),
    }
}

/// Encodes a canonical request as an OpenAI-compatible body for `model`.
/// `stream_usage` asks a streaming backend for its final usage chunk.
pub fn encode_chat_request(req: &ChatRequest, model: &str, stream_usage: bool) -> Vec<u8> {
    encode_chat_request_with(req, model, stream_usage, false)
}

/// As [`encode_chat_request`]; `legacy_functions` writes the transcript in the
/// legacy function-calling form (see `out_messages_legacy`). Such a server
/// (ChatGLM3's demo) runs the calls it detects in a stream itself and streams
/// on, so the client would never see them: a streaming request with tools is
/// asked without streaming, and the transport replays the JSON answer as a
/// stream.
pub fn encode_chat_request_with(
    req: &ChatRequest,
    model: &str,
    stream_usage: bool,
    legacy_functions: bool,
) -> Vec<u8> {
    let calls_run_upstream = legacy_functions && !req.tools.is_empty();
    let stream = req.stream && !calls_run_upstream;
    let out = OutChatRequest {
        model,
        messages: if legacy_functions {
            out_messages_legacy(&req.messages)
        } else {
            req.messages.iter().map(out_message).collect()
        },
        temperature: req.params.temperature,
        top_p: req.params.top_p,
        max_tokens: req.params.max_tokens,
        max_completion_tokens: req.params.max_completion_tokens,
        stop: &req.params.stop,
        seed: req.params.seed,
        n: req.params.n,
        presence_penalty: req.params.presence_penalty,
        frequency_penalty: req.params.frequency_penalty,
        user: req.params.user.as_deref(),
        tools: out_tools(&req.tools, true),
        tool_choice: req.tool_choice.as_ref().map(tool_choice_to_wire),
        parallel_tool_calls: req.parallel_tool_calls,
        response_format: req.response_format.as_ref().map(response_format_to_wire),
        stream,
        stream_options: (stream && (stream_usage || req.include_usage)).then_some(
            OutStreamOptions {
                include_usage: true,
            },
        ),
        extra: &req.extra,
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

#[derive(Serialize)]
struct OutPromptDetails {
    cached_tokens: u32,
}

#[derive(Serialize)]
struct OutCompletionDetails {
    reasoning_tokens: u32,
}

#[derive(Serialize)]
struct OutUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<OutPromptDetails>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens_details: Option<OutCompletionDetails>,
    /// Marks counts made by the gateway's tokenizer (the backend reported none).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    estimated: bool,
}

fn out_usage(u: &Usage) -> OutUsage {
    OutUsage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.total_tokens,
        prompt_tokens_details: u
            .cached_tokens
            .map(|c| OutPromptDetails { cached_tokens: c }),
        completion_tokens_details: u.reasoning_tokens.map(|r| OutCompletionDetails {
            reasoning_tokens: r,
        }),
        estimated: u.estimated,
    }
}

#[derive(Serialize)]
struct OutRespMessage<'a> {
    role: &'static str,
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OutToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    refusal: Option<&'a str>,
}

#[derive(Serialize)]
struct OutChoice<'a> {
    index: u32,
    message: OutRespMessage<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct OutResponse<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<OutChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<OutUsage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'a str>,
}

/// Encodes a canonical response for a client; `model` is the name the client asked for.
pub fn encode_chat_response(resp: &ChatResponse, model: &str) -> Vec<u8> {
    let out = OutResponse {
        id: &resp.id,
        object: "chat.completion",
        created: resp.created,
        model,
        choices: resp
            .choices
            .iter()
            .map(|c| OutChoice {
                index: c.index,
                message: OutRespMessage {
                    role: "assistant",
                    content: c.message.content.as_ref().map(Content::text),
                    tool_calls: out_tool_calls(&c.message.tool_calls),
                    reasoning_content: c.message.reasoning.as_deref(),
                    refusal: None,
                },
                logprobs: None,
                finish_reason: c.finish_reason.map(FinishReason::as_str),
            })
            .collect(),
        usage: resp.usage.as_ref().map(out_usage),
        system_fingerprint: resp.system_fingerprint.as_deref(),
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

// --- stream chunks to a client ---

#[derive(Serialize)]
struct OutDeltaFunction<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a str>,
}

#[derive(Serialize)]
struct OutDeltaToolCall<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: OutDeltaFunction<'a>,
}

#[derive(Serialize)]
struct OutDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OutDeltaToolCall<'a>>,
}

#[derive(Serialize)]
struct OutChunkChoice<'a> {
    index: u32,
    delta: OutDelta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct OutChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'a str>,
    choices: Vec<OutChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<OutUsage>>,
}

/// Encodes canonical stream events as the SSE bytes an OpenAI client expects.
#[derive(Debug)]
pub struct ChunkEncoder {
    meta: StreamMeta,
    /// The public model name to show.
    model: String,
    include_usage: bool,
    role_sent: bool,
}

impl ChunkEncoder {
    pub fn new(model: &str, include_usage: bool) -> Self {
        ChunkEncoder {
            meta: StreamMeta {
                id: new_completion_id(),
                created: unix_now(),
                model: String::new(),
                system_fingerprint: None,
            },
            model: model.to_owned(),
            include_usage,
            role_sent: false,
        }
    }

    fn write(
        &self,
        out: &mut Vec<u8>,
        choices: Vec<OutChunkChoice<'_>>,
        usage: Option<Option<OutUsage>>,
    ) {
        let chunk = OutChunk {
            id: &self.meta.id,
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: &self.model,
            system_fingerprint: self.meta.system_fingerprint.as_deref(),
            choices,
            usage,
        };
        out.extend_from_slice(b"data: ");
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &chunk);
        out.extend_from_slice(b"\n\n");
    }

    /// Appends the bytes for `ev` to `out` (nothing for events the dialect has no
    /// frame for).
    pub fn encode(&mut self, ev: &StreamEvent, out: &mut Vec<u8>) {
        match ev {
            StreamEvent::Meta(m) => {
                if !m.id.is_empty() {
                    self.meta.id.clone_from(&m.id);
                }
                self.meta.created = m.created;
                self.meta
                    .system_fingerprint
                    .clone_from(&m.system_fingerprint);
            }
            StreamEvent::Delta(d) => {
                let role = if self.role_sent {
                    None
                } else {
                    self.role_sent = true;
                    Some("assistant")
                };
                let tool_calls = d
                    .tool_calls
                    .iter()
                    .map(|t| OutDeltaToolCall {
                        index: t.index,
                        id: t.id.as_deref().map(super::tool_id::portable),
                        kind: t.id.as_ref().map(|_| "function"),
                        function: OutDeltaFunction {
                            name: t.name.as_deref(),
                            arguments: t.arguments.as_deref(),
                        },
                    })
                    .collect();
                let choice = OutChunkChoice {
                    index: d.choice,
                    delta: OutDelta {
                        role,
                        content: d.content.as_deref(),
                        reasoning_content: d.reasoning.as_deref(),
                        tool_calls,
                    },
                    logprobs: None,
                    finish_reason: d.finish_reason.map(FinishReason::as_str),
                };
                let usage = self.include_usage.then_some(None);
                self.write(out, vec![choice], usage);
            }
            StreamEvent::Usage(u) => {
                if self.include_usage {
                    self.write(out, Vec::new(), Some(Some(out_usage(u))));
                }
            }
            StreamEvent::Done => out.extend_from_slice(b"data: [DONE]\n\n"),
        }
    }
}

impl super::StreamEncoder for ChunkEncoder {
    fn encode(&mut self, ev: &StreamEvent, out: &mut Vec<u8>) {
        ChunkEncoder::encode(self, ev, out);
    }

    /// A final `data: {"error":…}` event: what OpenAI's SDKs raise on.
    fn encode_error(&mut self, err: &GatewayError, request_id: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&error_body(err, request_id));
        out.extend_from_slice(b"\n\n");
    }
}

/// The OpenAI Chat Completions dialect, for the HTTP edge.
#[derive(Default)]
pub struct OpenAi;

impl super::Dialect for OpenAi {
    fn decode_chat(&self, body: &[u8]) -> Result<ChatRequest, GatewayError> {
        decode_chat_request(body)
    }
    fn encode_chat(&self, resp: &ChatResponse, model: &str) -> Vec<u8> {
        encode_chat_response(resp, model)
    }
    fn stream_encoder(&self, req: &ChatRequest) -> Box<dyn super::StreamEncoder> {
        Box::new(ChunkEncoder::new(&req.model, req.include_usage))
    }
    fn error_body(&self, err: &GatewayError, request_id: &str) -> Vec<u8> {
        error_body(err, request_id)
    }
}

// --- errors to a client ---

#[derive(Serialize)]
struct OutErrorDetail<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    request_id: &'a str,
}

#[derive(Serialize)]
struct OutError<'a> {
    error: OutErrorDetail<'a>,
}

/// OpenAI's error JSON for `err`.
pub fn error_body(err: &GatewayError, request_id: &str) -> Vec<u8> {
    let (kind, param, upstream_status, provider) = match err {
        GatewayError::InvalidRequest { param, .. } => {
            ("invalid_request_error", param.as_deref(), None, None)
        }
        GatewayError::PayloadTooLarge { .. }
        | GatewayError::BodyTimeout { .. }
        | GatewayError::UnknownModel { .. }
        | GatewayError::Unsupported { .. }
        | GatewayError::NotFound { .. } => ("invalid_request_error", None, None, None),
        GatewayError::NotFoundPrompt { .. } => {
            ("invalid_request_error", Some("prompt"), None, None)
        }
        GatewayError::ProviderUnavailable { provider, .. } => (
            "upstream_error",
            None,
            None,
            Some(provider.as_str()).filter(|p| !p.is_empty()),
        ),
        GatewayError::NoTarget { .. } => ("upstream_error", None, None, None),
        GatewayError::Upstream(e) => (
            match e.kind {
                ErrorKind::BadRequest | ErrorKind::ContextLength | ErrorKind::ContentFilter => {
                    "invalid_request_error"
                }
                ErrorKind::RateLimited => "rate_limit_error",
                _ => "upstream_error",
            },
            None,
            e.status,
            Some(e.provider.as_str()).filter(|p| !p.is_empty()),
        ),
        GatewayError::Retrieval { .. } => ("retrieval_error", None, None, None),
        GatewayError::Unauthorized { .. } => ("invalid_request_error", None, None, None),
        GatewayError::Forbidden { .. } => ("permission_error", None, None, None),
        GatewayError::Limited { .. } => ("rate_limit_error", None, None, None),
        GatewayError::SensitiveData { .. } => {
            ("invalid_request_error", Some("messages"), None, None)
        }
        GatewayError::StoreUnavailable { .. } => ("server_error", None, None, None),
        GatewayError::Internal(_) => ("server_error", None, None, None),
    };
    let param = match (param, err) {
        (None, GatewayError::UnknownModel { .. }) => Some("model"),
        (p, _) => p,
    };
    let out = OutError {
        error: OutErrorDetail {
            message: err.to_string(),
            kind,
            param,
            code: err.code(),
            upstream_status,
            provider,
            request_id,
        },
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

// === embeddings ===

#[derive(Deserialize)]
#[serde(untagged)]
enum InEmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct InEmbeddingsRequest {
    model: String,
    input: InEmbeddingInput,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u32>,
    #[serde(default)]
    user: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// The most inputs one embeddings request may carry (OpenAI's documented limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;
/// The largest `dimensions` accepted: above every embedding model's native size.
pub const MAX_EMBEDDING_DIMENSIONS: u32 = 16_384;

/// Client-controlled sizes of an embeddings request, against their bounds: a
/// backend (or the sandbox) sizes its output by them.
fn check_embedding_sizes(
    input: &EmbeddingInput,
    dimensions: Option<u32>,
) -> Result<(), GatewayError> {
    if input.len() > MAX_EMBEDDING_INPUTS {
        return Err(GatewayError::invalid(
            format!(
                "invalid field `input`: {} inputs; at most {MAX_EMBEDDING_INPUTS} are allowed",
                input.len()
            ),
            Some("input"),
        ));
    }
    if let Some(d) = dimensions {
        if !(1..=MAX_EMBEDDING_DIMENSIONS).contains(&d) {
            return Err(GatewayError::invalid(
                format!(
                    "invalid field `dimensions`: {d} is outside 1..={MAX_EMBEDDING_DIMENSIONS}"
                ),
                Some("dimensions"),
            ));
        }
    }
    Ok(())
}

pub fn decode_embeddings_request(body: &[u8]) -> Result<EmbeddingsRequest, GatewayError> {
    let r: InEmbeddingsRequest = parse(body)?;
    let input = match r.input {
        InEmbeddingInput::One(s) => EmbeddingInput::Texts(vec![s]),
        InEmbeddingInput::Many(v) => EmbeddingInput::Texts(v),
        InEmbeddingInput::Tokens(t) => EmbeddingInput::Tokens(vec![t]),
        InEmbeddingInput::ManyTokens(t) => EmbeddingInput::Tokens(t),
    };
    if input.is_empty() {
        return Err(GatewayError::invalid(
            "invalid field `input`: at least one input is required",
            Some("input"),
        ));
    }
    let encoding = match r.encoding_format.as_deref() {
        None | Some("float") => EmbeddingEncoding::Float,
        Some("base64") => EmbeddingEncoding::Base64,
        Some(other) => {
            return Err(GatewayError::invalid(
                format!(
                    "invalid field `encoding_format`: `{other}` is not \"float\" or \"base64\""
                ),
                Some("encoding_format"),
            ))
        }
    };
    check_embedding_sizes(&input, r.dimensions)?;
    Ok(EmbeddingsRequest {
        model: r.model,
        input,
        encoding,
        dimensions: r.dimensions,
        user: r.user,
        extra: r.extra,
    })
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutEmbeddingInput<'a> {
    Texts(&'a [String]),
    Tokens(&'a [Vec<u32>]),
}

#[derive(Serialize)]
struct OutEmbeddingsRequest<'a> {
    model: &'a str,
    input: OutEmbeddingInput<'a>,
    encoding_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

pub fn encode_embeddings_request(req: &EmbeddingsRequest, model: &str) -> Vec<u8> {
    let out = OutEmbeddingsRequest {
        model,
        input: match &req.input {
            EmbeddingInput::Texts(t) => OutEmbeddingInput::Texts(t),
            EmbeddingInput::Tokens(t) => OutEmbeddingInput::Tokens(t),
        },
        encoding_format: "float",
        dimensions: req.dimensions,
        user: req.user.as_deref(),
        extra: &req.extra,
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum InVector {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(Deserialize)]
struct InEmbedding {
    #[serde(default)]
    index: Option<usize>,
    embedding: InVector,
}

#[derive(Deserialize)]
struct InEmbeddingsResponse {
    data: Vec<InEmbedding>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<InUsage>,
}

pub fn decode_embeddings_response(body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
    let r: InEmbeddingsResponse = serde_json::from_slice(body)
        .map_err(|e| malformed_json("a body", "an embeddings list", &e))?;
    let mut data = r.data;
    data.sort_by_key(|d| d.index.unwrap_or(0));
    let mut vectors = Vec::with_capacity(data.len());
    for d in data {
        vectors.push(match d.embedding {
            InVector::Floats(v) => v,
            InVector::Base64(s) => decode_base64_vector(&s)
                .ok_or_else(|| malformed("backend sent an invalid base64 embedding"))?,
        });
    }
    Ok(EmbeddingsResponse {
        model: r.model.unwrap_or_default(),
        vectors,
        usage: r.usage.as_ref().map(InUsage::canonical).unwrap_or_default(),
    })
}

fn decode_base64_vector(s: &str) -> Option<Vec<f32>> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

fn encode_base64_vector(v: &[f32]) -> String {
    use base64::Engine;
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for f in v {
        bytes.extend_from_slice(&f.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutVector<'a> {
    Floats(&'a [f32]),
    Base64(String),
}

#[derive(Serialize)]
struct OutEmbedding<'a> {
    object: &'static str,
    index: usize,
    embedding: OutVector<'a>,
}

#[derive(Serialize)]
struct OutEmbeddingUsage {
    prompt_tokens: u32,
    total_tokens: u32,
}

#[derive(Serialize)]
struct OutEmbeddingsResponse<'a> {
    object: &'static str,
    data: Vec<OutEmbedding<'a>>,
    model: &'a str,
    usage: OutEmbeddingUsage,
}

pub fn encode_embeddings_response(
    resp: &EmbeddingsResponse,
    model: &str,
    encoding: EmbeddingEncoding,
) -> Vec<u8> {
    let out = OutEmbeddingsResponse {
        object: "list",
        data: resp
            .vectors
            .iter()
            .enumerate()
            .map(|(index, v)| OutEmbedding {
                object: "embedding",
                index,
                embedding: match encoding {
                    EmbeddingEncoding::Float => OutVector::Floats(v),
                    EmbeddingEncoding::Base64 => OutVector::Base64(encode_base64_vector(v)),
                },
            })
            .collect(),
        model,
        usage: OutEmbeddingUsage {
            prompt_tokens: resp.usage.prompt_tokens,
            total_tokens: resp.usage.total_tokens.max(resp.usage.prompt_tokens),
        },
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

// === models ===

#[derive(Serialize)]
struct OutModel<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

#[derive(Serialize)]
struct OutModels<'a> {
    object: &'static str,
    data: Vec<OutModel<'a>>,
}

/// The `GET /v1/models` body for the given public model names.
pub fn encode_models<'a>(names: impl Iterator<Item = &'a str>, created: u64) -> Vec<u8> {
    let out = OutModels {
        object: "list",
        data: names
            .map(|id| OutModel {
                id,
                object: "model",
                created,
                owned_by: "promptgate",
            })
            .collect(),
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

// === OpenAI-shaped vendor APIs ===

/// How an OpenAI-shaped vendor API (Zhipu v4, …) differs from OpenAI's own request
/// body. The vendor's codec builds it from the canonical request; every value is
/// final (already mapped or clamped) and `None` fields are not sent.
#[derive(Debug, Clone, Default)]
pub struct VendorChat {
    /// The sampling and output parameters to send (`user` is sent as `user`; a
    /// vendor that names it differently moves it into `extra`).
    pub params: Params,
    /// `developer` messages go out as `system` (the vendor has no such role).
    pub developer_as_system: bool,
    /// Whether the request's tool definitions are sent.
    pub tools: bool,
    pub tool_choice: Option<ToolChoice>,
    pub response_format: Option<ResponseFormat>,
    /// Ask for a final usage chunk with `stream_options.include_usage`.
    pub stream_options: bool,
    /// Every other top-level field (the request's `extra` merged with the vendor's
    /// own fields).
    pub extra: Map<String, Value>,
}

/// Encodes a canonical request as an OpenAI-shaped body for a vendor whose
/// differences are described by `v`. Messages, content parts and tool calls are
/// written exactly as for OpenAI.
pub fn encode_vendor_chat_request(req: &ChatRequest, model: &str, v: &VendorChat) -> Vec<u8> {
    let p = &v.params;
    let out = OutChatRequest {
        model,
        messages: req
            .messages
            .iter()
            .map(|m| {
                let mut o = out_message(m);
                if v.developer_as_system && m.role == Role::Developer {
                    o.role = "system";
                }
                o
            })
            .collect(),
        temperature: p.temperature,
        top_p: p.top_p,
        max_tokens: p.max_tokens,
        max_completion_tokens: p.max_completion_tokens,
        stop: &p.stop,
        seed: p.seed,
        n: p.n,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        user: p.user.as_deref(),
        tools: if v.tools {
            out_tools(&req.tools, true)
        } else {
            Vec::new()
        },
        tool_choice: v.tool_choice.as_ref().map(tool_choice_to_wire),
        parallel_tool_calls: None,
        response_format: v.response_format.as_ref().map(response_format_to_wire),
        stream: req.stream,
        stream_options: (req.stream && v.stream_options).then_some(OutStreamOptions {
            include_usage: true,
        }),
        extra: &v.extra,
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::common::classify_error_body;
    use crate::backend::common::testing::{self, call_deltas, finishes, fixture, text_of};
    use crate::backend::openai::{OpenAiCodec, Quirks};
    use serde_json::json;

    #[test]
    fn an_error_line_reads_like_an_error_event() {
        // Older llama.cpp builds behind `/v1` write `error: {json}`, the object
        // bare or wrapped in `error` as in an `event: error`; both name the failure.
        let inner =
            r#"{"code":500,"message":"llama_decode failed: out of memory","type":"server_error"}"#;
        for line in [
            format!("error: {inner}\n\n"),
            format!("error: {{\"error\":{inner}}}\n\n"),
            format!("event: error\ndata: {{\"error\":{inner}}}\n\n"),
        ] {
            let err = stream_events(&line).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Overloaded, "{line}");
            assert!(
                err.message.contains("out of memory"),
                "{line}: {}",
                err.message
            );
        }
    }

    fn stream_events(sse: &str) -> Result<Vec<StreamEvent>, UpstreamError> {
        testing::stream_events(
            &OpenAiCodec {
                quirks: Quirks::default(),
            },
            sse.as_bytes(),
        )
    }

    #[test]
    fn request_round_trips_to_an_openai_backend() {
        let client = json!({
            "model": "route",
            "messages": [
                {"role": "developer", "content": "Be terse."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png", "detail": "low"}},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}
            ],
            "temperature": 0.5, "top_p": 0.9, "max_completion_tokens": 100, "stop": ["END"], "seed": 7,
            "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}, "strict": true}}],
            "tool_choice": "required", "parallel_tool_calls": false,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            "logit_bias": {"50256": -100}, "reasoning_effort": "low", "top_k": 20
        });
        let req = decode_chat_request(client.to_string().as_bytes()).unwrap();
        assert_eq!(req.messages[0].role, Role::Developer);
        assert_eq!(req.tool_choice, Some(ToolChoice::Required));
        assert_eq!(req.extra.len(), 3, "unknown fields kept: {:?}", req.extra);
        let upstream: Value =
            serde_json::from_slice(&encode_chat_request(&req, "backend-model", true)).unwrap();
        let mut expected = client.clone();
        expected["model"] = json!("backend-model");
        assert_eq!(upstream, expected);
    }

    #[test]
    fn legacy_function_form_for_old_servers() {
        let req = decode_chat_request(
            br#"{"model":"m","messages":[{"role":"developer","content":"d"},{"role":"user","content":"u"},
                {"role":"assistant","content":null,"tool_calls":[{"id":"call_9","type":"function","function":{"name":"track","arguments":"{}"}}]},
                {"role":"tool","tool_call_id":"call_9","content":"42"}]}"#,
        )
        .unwrap();
        let v: Value =
            serde_json::from_slice(&encode_chat_request_with(&req, "m", false, true)).unwrap();
        assert_eq!(v["messages"][0]["role"], "system");
        assert_eq!(
            v["messages"][2]["function_call"],
            json!({"name": "track", "arguments": "{}"})
        );
        assert!(v["messages"][2].get("tool_calls").is_none());
        // The demo refuses a null content and cannot parse "": it gets the text
        // ChatGLM3 writes for a call.
        assert_eq!(
            v["messages"][2]["content"],
            json!("track\n ```python\ntool_call()\n```")
        );
        assert_eq!(
            v["messages"][3],
            json!({"role": "function", "name": "track", "content": "42"})
        );
    }

    #[test]
    fn chatglm3_call_text_is_what_the_model_writes() {
        let call = |args: &str| ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: args.into(),
        };
        // As in the demo's own answer (tests/fixtures/chatglm3/tools.json).
        assert_eq!(
            chatglm3_call_text(&call(r#"{"city": "Paris"}"#)),
            "get_weather\n ```python\ntool_call(city='Paris')\n```"
        );
        assert_eq!(
            chatglm3_call_text(&call(
                r#"{"q": "it's \"x\"\n", "n": 2.5, "ok": true, "none": null, "l": [1, {"a": false}]}"#
            )),
            "get_weather\n ```python\ntool_call(l=[1, {'a': False}], n=2.5, none=None, ok=True, q='it\\'s \"x\"\\n')\n```"
        );
        assert_eq!(
            chatglm3_call_text(&call(r#"{"not an identifier": 1}"#)),
            "get_weather\n ```python\ntool_call(**{'not an identifier': 1})\n```"
        );
        assert_eq!(
            chatglm3_call_text(&call("not json")),
            "get_weather\n ```python\ntool_call()\n```"
        );
    }

    #[test]
    fn legacy_function_streams_with_tools_are_asked_without_streaming() {
        let mut req = decode_chat_request(
            br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"u"}],
                "tools":[{"type":"function","function":{"name":"f"}}]}"#,
        )
        .unwrap();
        let v: Value =
            serde_json::from_slice(&encode_chat_request_with(&req, "m", true, true)).unwrap();
        assert!(
            v.get("stream").is_none() && v.get("stream_options").is_none(),
            "{v}"
        );
        let v: Value =
            serde_json::from_slice(&encode_chat_request_with(&req, "m", true, false)).unwrap();
        assert_eq!(v["stream"], true, "only in the legacy form");
        req.tools.clear();
        let v: Value =
            serde_json::from_slice(&encode_chat_request_with(&req, "m", true, true)).unwrap();
        assert_eq!(
            v["stream"], true,
            "no tools: the demo streams plain text fine"
        );
    }

    #[test]
    fn stop_string_and_stream_options_decode() {
        let req = decode_chat_request(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":"\n","stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(req.params.stop, vec!["\n".to_string()]);
        assert!(req.stream && req.include_usage);
        let up: Value = serde_json::from_slice(&encode_chat_request(&req, "m", false)).unwrap();
        assert_eq!(up["stop"], json!(["\n"]));
        assert_eq!(up["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let cases: [(&[u8], Option<&str>); 5] = [
            (br#"{"messages":[]}"#, Some("model")),
            (
                br#"{"model":"m","messages":[{"content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user"}],"temperature":"hot"}"#,
                Some("temperature"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user"}],"tool_choice":"sometimes"}"#,
                Some("tool_choice"),
            ),
            (br#"{"model":"m","#, None),
        ];
        for (body, param) in cases {
            match decode_chat_request(body) {
                Err(GatewayError::InvalidRequest { param: p, .. }) => {
                    assert_eq!(p.as_deref(), param)
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn recorded_responses_decode() {
        let r = decode_chat_response(fixture("openai", "chat.json").as_bytes()).unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Stop));
        assert_eq!(r.usage.unwrap().cached_tokens, Some(4));
        let r =
            decode_chat_response(fixture("llamacpp-openai", "10-chat.body").as_bytes()).unwrap();
        assert_eq!(
            r.choices[0].message.content,
            Some(Content::Text("Hello from the tiny test model".into()))
        );
        assert_eq!(r.usage.unwrap(), Usage::new(23, 7));
        let r = decode_chat_response(fixture("openai", "chat_tool_calls.json").as_bytes()).unwrap();
        assert_eq!(r.choices[0].message.tool_calls[0].name, "get_weather");
        let client: Value = serde_json::from_slice(&encode_chat_response(&r, "route")).unwrap();
        assert_eq!(
            client["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\",\"unit\":\"c\"}"
        );
        assert_eq!(client["model"], "route");
    }

    #[test]
    fn error_inside_a_200_body_is_an_error() {
        let e = decode_chat_response(fixture("openai", "chat_error_in_200.json").as_bytes())
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
        let e = decode_chat_response(b"<html>oops</html>").unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
    }

    #[test]
    fn legacy_function_call_becomes_a_tool_call() {
        // ChatGLM3's OpenAI-style server answers with `function_call`.
        let body = br#"{"model":"chatglm3-6b","id":"","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"","function_call":{"name":"track","arguments":"{\"symbol\": \"AAPL\"}"}},"finish_reason":"function_call"}]}"#;
        let r = decode_chat_response(body).unwrap();
        let call = &r.choices[0].message.tool_calls[0];
        assert_eq!(call.name, "track");
        assert!(call.id.starts_with("call_"));
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::ToolCalls));
    }

    #[test]
    fn streams_decode_and_reencode() {
        let events = stream_events(&fixture("openai", "chat_stream_tool_calls.sse")).unwrap();
        assert!(matches!(events[0], StreamEvent::Meta(_)));
        assert_eq!(events.last(), Some(&StreamEvent::Done));
        assert!(events.contains(&StreamEvent::Usage(Usage::new(40, 18))));
        let mut enc = ChunkEncoder::new("route", true);
        let mut out = Vec::new();
        for ev in &events {
            enc.encode(ev, &mut out);
        }
        // Re-decoding what we send gives the same events.
        let again = stream_events(std::str::from_utf8(&out).unwrap()).unwrap();
        assert_eq!(&again[1..], &events[1..]);

        let events =
            stream_events(&fixture("llamacpp-openai", "12-chat-stream-usage.body")).unwrap();
        let text = text_of(&events);
        assert_eq!(text, "Hello from the tiny test model");
    }

    #[test]
    fn deepseek_payment_required_and_resource_finish() {
        // DeepSeek: 402 "Insufficient Balance"; `insufficient_system_resource`
        // means the answer was cut short.
        let e = classify_error_body(
            402,
            br#"{"error":{"message":"Insufficient Balance","type":"unknown_error","param":null,"code":"invalid_request_error"}}"#,
        );
        assert_eq!(e.kind, ErrorKind::Auth);
        assert_eq!(e.status, Some(402));
        let r = decode_chat_response(
            br#"{"id":"d1","object":"chat.completion","created":1,"model":"deepseek-chat","choices":[{"index":0,"message":{"role":"assistant","content":"Partial"},"logprobs":null,"finish_reason":"insufficient_system_resource"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#,
        )
        .unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Error));
    }

    #[test]
    fn a_giant_choice_index_is_malformed() {
        let mut dec = ChunkDecoder::default();
        let mut out = Vec::new();
        let chunk = r#"{"id":"c","choices":[{"index":4294967295,"delta":{"content":"x"}}]}"#;
        let e = dec.decode(chunk, &mut out).unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
    }

    #[test]
    fn every_choice_a_client_may_ask_for_is_decoded() {
        // `n` may be up to MAX_CHOICES: the last of those choices is accepted,
        // the next index is not.
        let mut dec = ChunkDecoder::default();
        let mut out = Vec::new();
        let last = crate::backend::MAX_CHOICES - 1;
        let chunk = format!(
            r#"{{"id":"c","choices":[{{"index":{last},"delta":{{"role":"assistant","content":"x"}},"finish_reason":"stop"}}]}}"#
        );
        dec.decode(&chunk, &mut out).unwrap();
        assert!(
            out.iter().any(|e| matches!(e, StreamEvent::Delta(d) if d.choice == last && d.content.as_deref() == Some("x") && d.finish_reason == Some(FinishReason::Stop))),
            "{out:?}"
        );
        let over = chunk.replace(
            &format!("\"index\":{last}"),
            &format!("\"index\":{}", last + 1),
        );
        assert_eq!(
            dec.decode(&over, &mut out).unwrap_err().kind,
            ErrorKind::MalformedResponse
        );
    }

    #[test]
    fn deltas_that_carry_nothing_are_dropped() {
        let mut dec = ChunkDecoder::default();
        let mut out = Vec::new();
        let first =
            r#"{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        dec.decode(first, &mut out).unwrap();
        // The stream's identity and the first role of the choice are kept.
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[1], StreamEvent::Delta(d) if d.role == Some(Role::Assistant)));
        out.clear();
        for _ in 0..100 {
            for empty in [
                r#"{"choices":[{"index":0,"delta":{}}]}"#,
                r#"{"choices":[{"index":0}]}"#,
                r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#,
                r#"{"choices":[{"index":0,"delta":{"content":"","tool_calls":[]}}]}"#,
            ] {
                dec.decode(empty, &mut out).unwrap();
            }
        }
        assert!(out.is_empty(), "{out:?}");
        // A second choice announces its own role once; output and the finish
        // always pass.
        dec.decode(
            r#"{"choices":[{"index":1,"delta":{"role":"assistant"}},{"index":0,"delta":{"content":"x"}}]}"#,
            &mut out,
        )
        .unwrap();
        dec.decode(
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(matches!(&out[0], StreamEvent::Delta(d) if d.choice == 1 && !d.has_output()));
        assert!(matches!(&out[1], StreamEvent::Delta(d) if d.content.as_deref() == Some("x")));
        assert!(
            matches!(&out[2], StreamEvent::Delta(d) if d.finish_reason == Some(FinishReason::Stop))
        );
    }

    #[test]
    fn stream_error_events_are_errors() {
        let e = stream_events(&fixture("openai", "chat_stream_error_event.sse")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
        let mut dec = ChunkDecoder::default();
        let e = dec.decode("{not json", &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
    }

    #[test]
    fn error_json_has_the_openai_shape() {
        let e = GatewayError::Upstream(
            UpstreamError::new(ErrorKind::RateLimited, "slow down").with_status(429),
        );
        let v: Value = serde_json::from_slice(&error_body(&e, "pg-1")).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "rate_limited");
        assert_eq!(v["error"]["upstream_status"], 429);
        assert_eq!(v["error"]["request_id"], "pg-1");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn embeddings_sizes_are_bounded() {
        for (body, param) in [
            (
                r#"{"model":"m","input":"a","dimensions":4294967295}"#,
                "dimensions",
            ),
            (r#"{"model":"m","input":"a","dimensions":0}"#, "dimensions"),
        ] {
            let GatewayError::InvalidRequest { param: p, message } =
                decode_embeddings_request(body.as_bytes()).unwrap_err()
            else {
                panic!("not a 400")
            };
            assert_eq!(p.as_deref(), Some(param), "{message}");
        }
        let many = format!(
            r#"{{"model":"m","input":[{}"x"]}}"#,
            "\"x\",".repeat(MAX_EMBEDDING_INPUTS)
        );
        assert!(decode_embeddings_request(many.as_bytes()).is_err());
        let ok = r#"{"model":"m","input":"a","dimensions":3072}"#;
        assert_eq!(
            decode_embeddings_request(ok.as_bytes()).unwrap().dimensions,
            Some(3072)
        );
    }

    #[test]
    fn embeddings_accept_every_input_shape() {
        for (body, n) in [
            (r#"{"model":"m","input":"a"}"#, 1),
            (r#"{"model":"m","input":["a","b"]}"#, 2),
            (r#"{"model":"m","input":[1,2,3]}"#, 1),
            (r#"{"model":"m","input":[[1],[2]]}"#, 2),
        ] {
            assert_eq!(
                decode_embeddings_request(body.as_bytes())
                    .unwrap()
                    .input
                    .len(),
                n
            );
        }
        let r =
            decode_embeddings_response(fixture("openai", "embeddings.json").as_bytes()).unwrap();
        assert_eq!(r.vectors[1], vec![0.5, -0.25, 0.125, 1.0]);
        let b64 = encode_base64_vector(&r.vectors[1]);
        assert_eq!(decode_base64_vector(&b64).unwrap(), r.vectors[1]);
    }

    #[test]
    fn chatglm3_legacy_function_call_streams_end_with_one_tool_calls_finish() {
        // ChatGLM3's openai_api_demo: CRLF frames, `: ping` comments, `id: ""`, a
        // `function_call` delta finishing with "function_call", then a trailing
        // "stop" chunk that must not override it.
        let events = stream_events(&fixture("chatglm3", "tools.sse")).unwrap();
        let finishes = finishes(&events);
        assert_eq!(finishes, vec![FinishReason::ToolCalls]);
        let calls = call_deltas(&events);
        assert_eq!(calls.len(), 1);
        assert!(calls[0]
            .id
            .as_deref()
            .is_some_and(|i| i.starts_with("call_")));
        assert_eq!(calls[0].name.as_deref(), Some("get_weather"));
        let StreamEvent::Meta(meta) = &events[0] else {
            panic!("{events:?}")
        };
        assert!(
            meta.id.starts_with("chatcmpl-") && meta.id.len() > 9,
            "an empty id is replaced by a generated one: {meta:?}"
        );

        let events = stream_events(&fixture("chatglm3", "chat.sse")).unwrap();
        let text = text_of(&events);
        assert_eq!(text, "Hello from the fake upstream.");
        assert!(!events.iter().any(|e| matches!(e, StreamEvent::Usage(_))));

        // Non-streaming: `id: ""` gets a generated id; the call gets an id.
        let r = decode_chat_response(fixture("chatglm3", "tools.json").as_bytes()).unwrap();
        assert!(r.id.starts_with("chatcmpl-"));
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::ToolCalls));
        assert_eq!(
            r.choices[0].message.tool_calls[0].arguments,
            "{\"city\": \"Paris\"}"
        );
    }

    #[test]
    fn vendor_bodies_change_only_what_they_say() {
        let req = decode_chat_request(
            br#"{"model":"r","stream":true,"messages":[{"role":"developer","content":"d"},{"role":"user","content":"u"}],"temperature":1.5,"n":2,"logit_bias":{"1":1}}"#,
        )
        .unwrap();
        let v = VendorChat {
            params: Params {
                temperature: Some(0.9),
                ..Params::default()
            },
            developer_as_system: true,
            stream_options: true,
            extra: Map::from_iter([("x".to_string(), json!(1))]),
            ..VendorChat::default()
        };
        let body: Value =
            serde_json::from_slice(&encode_vendor_chat_request(&req, "m", &v)).unwrap();
        assert_eq!(
            body,
            json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
                "messages": [{"role": "system", "content": "d"}, {"role": "user", "content": "u"}],
                "temperature": 0.9, "x": 1})
        );
    }
}
