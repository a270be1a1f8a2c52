//! Ollama's native API: `POST /api/chat` (answers are one JSON object, or NDJSON
//! lines ending with `done: true`) and `POST /api/embed`. Tool-call arguments are
//! JSON objects on this wire; tool results name their tool with `tool_name`.
//! Errors are `{"error":"…"}`, also as the last line of a stream that failed.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Codec, HttpCall, Kind, Settings, StreamDecoder};
use crate::backend::common::{
    classify_error_value, error_member, finish_stream, malformed, malformed_json, new_call_id,
    new_completion_id, open_stream, out_tools, stream_meta, OutTool,
};
use crate::canonical::*;
use crate::config::{Capabilities, ProviderConfig, Section, Text};
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::{Frame, Framing};

/// Fields of `ChatRequest::extra` that are Ollama `options` (model parameters
/// the OpenAI request has no field for); they go into `options` as they are.
const OPTION_KNOBS: &[&str] = &[
    "num_ctx",
    "num_keep",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "use_mmap",
    "low_vram",
    "top_k",
    "min_p",
    "typical_p",
    "repeat_last_n",
    "repeat_penalty",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "penalize_newline",
];

fn bad_request(message: impl Into<String>) -> UpstreamError {
    UpstreamError::new(ErrorKind::BadRequest, message)
}

/// `keep_alive` as Ollama reads it: a Go duration string (`5m`, `1h`) or a
/// number of seconds (negative keeps the model loaded, 0 unloads it at once).
pub fn keep_alive_value(s: &str) -> Value {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Value::from(n);
    }
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() => Value::from(f),
        _ => Value::String(s.to_owned()),
    }
}

// === requests ===

#[derive(Serialize)]
struct OutFunctionCall<'a> {
    name: &'a str,
    arguments: Value,
}

/// Ollama's tool call has no `type` and takes the arguments as a JSON object, so
/// it is not the OpenAI-shaped [`crate::backend::common::OutToolCall`].
#[derive(Serialize)]
struct OutToolCall<'a> {
    /// Current Ollama matches tool results to calls by id.
    id: Cow<'a, str>,
    function: OutFunctionCall<'a>,
}

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    content: Cow<'a, str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    images: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OutToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<Cow<'a, str>>,
}

#[derive(Serialize)]
struct OutChat<'a> {
    model: &'a str,
    messages: Vec<OutMessage<'a>>,
    /// Ollama streams unless told otherwise: always sent.
    stream: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<Value>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    options: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keep_alive: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    think: Option<&'a Value>,
}

/// The base64 payload of an image; Ollama takes no URLs.
fn image_data(url: &str) -> Result<&str, UpstreamError> {
    match url
        .strip_prefix("data:")
        .and_then(|r| r.split_once(";base64,"))
    {
        Some((_, data)) => Ok(data),
        None => Err(bad_request(
            "Ollama takes images only as base64 data URLs (data:image/…;base64,…)",
        )),
    }
}

/// Tool-call arguments as the JSON object Ollama expects.
fn arguments_object(call: &ToolCall) -> Result<Value, UpstreamError> {
    if call.arguments.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    match serde_json::from_str::<Value>(&call.arguments) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(bad_request(format!(
            "the arguments of tool call `{}` ({}) are not a JSON object, which Ollama requires",
            call.id, call.name
        ))),
    }
}

fn out_messages(req: &ChatRequest) -> Result<Vec<OutMessage<'_>>, UpstreamError> {
    // Tool results name their tool; the name comes from the assistant call with
    // the result's id, earlier in the transcript.
    let mut call_names: HashMap<&str, &str> = HashMap::new();
    let mut out = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let mut images = Vec::new();
        let content = match &m.content {
            None => Cow::Borrowed(""),
            Some(Content::Text(t)) => Cow::Borrowed(t.as_str()),
            Some(c @ Content::Parts(parts)) => {
                for p in parts {
                    if let Part::Image { url, .. } = p {
                        images.push(image_data(url)?);
                    }
                }
                c.text()
            }
        };
        let mut tool_calls = Vec::with_capacity(m.tool_calls.len());
        for c in &m.tool_calls {
            call_names.insert(&c.id, &c.name);
            tool_calls.push(OutToolCall {
                id: super::tool_id::portable(&c.id),
                function: OutFunctionCall {
                    name: &c.name,
                    arguments: arguments_object(c)?,
                },
            });
        }
        let tool_name = match m.role {
            Role::Tool => m
                .tool_call_id
                .as_deref()
                .and_then(|id| call_names.get(id).copied())
                .or(m.name.as_deref()),
            _ => None,
        };
        out.push(OutMessage {
            role: match m.role {
                Role::System | Role::Developer => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
            },
            content,
            images,
            tool_calls,
            tool_name,
            tool_call_id: match m.role {
                Role::Tool => m.tool_call_id.as_deref().map(super::tool_id::portable),
                _ => None,
            },
        });
    }
    Ok(out)
}

fn options(req: &ChatRequest) -> Map<String, Value> {
    let p = &req.params;
    let mut o = Map::new();
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            o.insert(k.to_owned(), v);
        }
    };
    set("num_predict", p.output_limit().map(Value::from));
    set("temperature", p.temperature.map(Value::from));
    set("top_p", p.top_p.map(Value::from));
    set("seed", p.seed.map(Value::from));
    set(
        "stop",
        (!p.stop.is_empty()).then(|| Value::from(p.stop.clone())),
    );
    set("presence_penalty", p.presence_penalty.map(Value::from));
    set("frequency_penalty", p.frequency_penalty.map(Value::from));
    // Native knobs: top-level extra fields, or a whole `options` object; the
    // mapped OpenAI parameters above take precedence.
    let native = req
        .extra
        .get("options")
        .and_then(Value::as_object)
        .into_iter()
        .flatten();
    let knobs = req
        .extra
        .iter()
        .filter(|(k, _)| OPTION_KNOBS.contains(&k.as_str()));
    for (k, v) in knobs.chain(native) {
        if !o.contains_key(k) {
            o.insert(k.clone(), v.clone());
        }
    }
    o
}

/// Encodes a `POST /api/chat` body. `keep_alive` is the provider's setting (it
/// wins over one in the request).
pub fn encode_chat_request(
    req: &ChatRequest,
    model: &str,
    keep_alive: Option<&str>,
) -> Result<Vec<u8>, UpstreamError> {
    let tools = if req.tool_choice == Some(ToolChoice::None) {
        // Ollama has no tool_choice: "none" is honoured by not offering tools.
        Vec::new()
    } else {
        // Ollama does not know `strict`.
        out_tools(&req.tools, false)
    };
    let out = OutChat {
        model,
        messages: out_messages(req)?,
        stream: req.stream,
        tools,
        format: match &req.response_format {
            None | Some(ResponseFormat::Text) => None,
            Some(ResponseFormat::JsonObject) => Some(Value::String("json".into())),
            // The OpenAI `json_schema` object wraps the schema with a name.
            Some(ResponseFormat::JsonSchema(v)) => {
                Some(v.get("schema").cloned().unwrap_or_else(|| v.clone()))
            }
        },
        options: options(req),
        keep_alive: keep_alive
            .map(keep_alive_value)
            .or_else(|| req.extra.get("keep_alive").cloned()),
        think: req.extra.get("think"),
    };
    serde_json::to_vec(&out).map_err(|e| bad_request(format!("cannot encode the request: {e}")))
}

// === responses ===

#[derive(Deserialize)]
struct InFunction {
    #[serde(default)]
    name: String,
    #[serde(default)]
    arguments: Option<Value>,
}

#[derive(Deserialize)]
struct InToolCall {
    #[serde(default)]
    id: Option<String>,
    function: InFunction,
}

impl InToolCall {
    fn into_canonical(self) -> ToolCall {
        ToolCall {
            id: self
                .id
                .filter(|i| !i.is_empty())
                .unwrap_or_else(new_call_id),
            name: self.function.name,
            arguments: match self.function.arguments {
                None | Some(Value::Null) => "{}".to_owned(),
                Some(Value::String(s)) => s,
                Some(v) => v.to_string(),
            },
        }
    }
}

#[derive(Deserialize, Default)]
struct InMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<InToolCall>>,
}

/// A chat answer, or one line of a chat stream.
#[derive(Deserialize)]
struct InChat {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    message: Option<InMessage>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    /// Absent when zero (Go `omitempty`), e.g. on a full prompt-cache hit.
    #[serde(default)]
    prompt_eval_count: Option<u32>,
    #[serde(default)]
    eval_count: Option<u32>,
    #[serde(default)]
    error: Option<Value>,
    /// The HTTP status an error line stands for (a stream's headers already
    /// said 200 when it failed).
    #[serde(default)]
    status: Option<Value>,
}

impl InChat {
    /// `length` is the token limit; `stop` is a normal end (a tool call when calls
    /// were made); `load`/`unload` answer a request that generated nothing.
    fn finish_reason(&self, made_tool_calls: bool) -> FinishReason {
        match self.done_reason.as_deref() {
            Some("length") => FinishReason::Length,
            _ if made_tool_calls => FinishReason::ToolCalls,
            _ => FinishReason::Stop,
        }
    }

    /// Usage only when both counters are there: a missing prompt count is left to
    /// the gateway's estimate rather than reported as zero.
    fn usage(&self) -> Option<Usage> {
        Some(Usage::new(self.prompt_eval_count?, self.eval_count?))
    }
}

fn parse_chat(text: &[u8]) -> Result<InChat, UpstreamError> {
    let c: InChat = serde_json::from_slice(text)
        .map_err(|e| malformed_json("a body", "an Ollama chat response", &e))?;
    if let Some(err) = &c.error {
        let status = c
            .status
            .as_ref()
            .and_then(Value::as_u64)
            .and_then(|s| u16::try_from(s).ok())
            .filter(|s| (400..600).contains(s))
            .unwrap_or(200);
        return Err(classify_error_value_ollama(status, err));
    }
    Ok(c)
}

/// Decodes a `/api/chat` answer (HTTP 2xx, `stream: false`).
pub fn decode_chat_response(body: &[u8]) -> Result<ChatResponse, UpstreamError> {
    let mut c = parse_chat(body)?;
    let m = c.message.take().unwrap_or_default();
    let tool_calls: Vec<ToolCall> = m
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .map(InToolCall::into_canonical)
        .collect();
    let finish = c.finish_reason(!tool_calls.is_empty());
    Ok(ChatResponse {
        id: new_completion_id(),
        created: unix_now(),
        model: c.model.take().unwrap_or_default(),
        choices: vec![Choice {
            index: 0,
            message: Message {
                role: Role::Assistant,
                content: Some(Content::Text(m.content.unwrap_or_default())),
                name: None,
                tool_calls,
                tool_call_id: None,
                reasoning: m.thinking.filter(|t| !t.is_empty()),
            },
            finish_reason: Some(finish),
        }],
        usage: c.usage(),
        system_fingerprint: None,
    })
}

/// State of one `/api/chat` NDJSON stream. A tool call arrives whole in one line
/// and becomes one complete canonical tool-call delta.
#[derive(Debug, Default)]
pub struct ChatStream {
    started: bool,
    done: bool,
    role_sent: bool,
    tool_calls: u32,
}

impl ChatStream {
    /// Decodes one NDJSON line.
    pub fn line(&mut self, line: &str, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        let line = line.trim();
        if line.is_empty() {
            return Ok(());
        }
        let mut c = parse_chat(line.as_bytes())?;
        open_stream(&mut self.started, out, || {
            stream_meta(new_completion_id(), None, c.model.clone())
        });
        if let Some(m) = c.message.take() {
            let tool_calls: Vec<ToolCallDelta> = m
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .map(|t| {
                    let t = t.into_canonical();
                    let index = self.tool_calls;
                    self.tool_calls += 1;
                    ToolCallDelta {
                        index,
                        id: Some(t.id),
                        name: Some(t.name),
                        arguments: Some(t.arguments),
                    }
                })
                .collect();
            let delta = Delta {
                content: m.content.filter(|t| !t.is_empty()),
                reasoning: m.thinking.filter(|t| !t.is_empty()),
                tool_calls,
                ..Delta::default()
            };
            if delta.has_output() {
                out.push(StreamEvent::Delta(Delta {
                    role: (!self.role_sent).then_some(Role::Assistant),
                    ..delta
                }));
                self.role_sent = true;
            }
        }
        if c.done {
            self.done = true;
            finish_stream(c.finish_reason(self.tool_calls > 0), c.usage(), out);
        }
        Ok(())
    }
}

impl StreamDecoder for ChatStream {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        // An SSE event is not Ollama's framing; a proxy that re-frames as SSE keeps the JSON.
        let (_, line) = super::event_and_data(&frame);
        self.line(line, out)
    }

    /// True once the line with `done: true` arrived.
    fn finished(&self) -> bool {
        self.done
    }
}

// === embeddings ===

#[derive(Serialize)]
struct OutEmbed<'a> {
    model: &'a str,
    input: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keep_alive: Option<Value>,
}

/// Encodes a `POST /api/embed` body (texts only: Ollama takes no token ids).
pub fn encode_embeddings_request(
    req: &EmbeddingsRequest,
    model: &str,
    keep_alive: Option<&str>,
) -> Result<Vec<u8>, UpstreamError> {
    let EmbeddingInput::Texts(input) = &req.input else {
        return Err(bad_request(
            "Ollama embeds text only: send `input` as strings, not token ids",
        ));
    };
    let out = OutEmbed {
        model,
        input,
        dimensions: req.dimensions,
        keep_alive: keep_alive.map(keep_alive_value),
    };
    serde_json::to_vec(&out).map_err(|e| bad_request(format!("cannot encode the request: {e}")))
}

#[derive(Deserialize)]
struct InEmbed {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    embeddings: Option<Vec<Vec<f32>>>,
    #[serde(default)]
    prompt_eval_count: Option<u32>,
    #[serde(default)]
    error: Option<Value>,
}

pub fn decode_embeddings_response(body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
    let r: InEmbed = serde_json::from_slice(body)
        .map_err(|e| malformed_json("a body", "an Ollama embeddings answer", &e))?;
    if let Some(err) = &r.error {
        return Err(classify_error_value_ollama(200, err));
    }
    let vectors = r
        .embeddings
        .ok_or_else(|| malformed("Ollama embeddings answer has no `embeddings`"))?;
    Ok(EmbeddingsResponse {
        model: r.model.unwrap_or_default(),
        vectors,
        usage: Usage::new(r.prompt_eval_count.unwrap_or(0), 0),
    })
}

// === errors ===

fn is_context_overflow(lower: &str) -> bool {
    lower.contains("too long")
        || (lower.contains("context")
            && !lower.contains("context canceled")
            && !lower.contains("deadline")
            && (lower.contains("exceed")
                || lower.contains("length")
                || lower.contains("window")
                || lower.contains("size")))
}

/// Classifies Ollama's `{"error": "…"}` value that came with `status` (200 for
/// an error line inside a stream).
fn classify_error_value_ollama(status: u16, err: &Value) -> UpstreamError {
    let mut e = classify_error_value(status, err);
    let lower = e.message.to_ascii_lowercase();
    if is_context_overflow(&lower) {
        e.kind = ErrorKind::ContextLength;
    } else if status == 200 {
        // No status to go by: the words decide.
        if lower.contains("not found") || lower.contains("invalid") {
            e.kind = ErrorKind::BadRequest;
        } else if lower.contains("server busy") || lower.contains("too many") {
            e.kind = ErrorKind::RateLimited;
        } else if lower.contains("unauthorized") {
            e.kind = ErrorKind::Auth;
        }
    }
    e
}

/// Classifies a non-2xx answer: the status decides (404 "model not found" is a
/// bad request, 429 "server busy" rate limiting, 5xx overload), refined by the
/// text for an over-long prompt.
pub fn classify_error_body(status: u16, body: &[u8]) -> UpstreamError {
    let value = error_member(body).unwrap_or_else(Value::String);
    let mut e = classify_error_value_ollama(status, &value);
    if e.message.trim().is_empty() {
        e.message = format!("backend answered HTTP {status}");
    }
    e
}

// === kind ===

pub static KIND: Kind = Kind {
    name: "ollama",
    gen_ai_provider: "ollama",
    auth_header: None,
    capabilities: Capabilities::ALL,
    reports_usage: true,
    self_hosted: true,
    in_process: false,
    section: true,
    settings,
};

/// The `ollama:` section.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOllama {
    #[serde(default)]
    keep_alive: Option<Text>,
}

#[derive(Debug)]
struct OllamaSettings {
    keep_alive: Option<String>,
}

impl Settings for OllamaSettings {
    fn codec(&self, _cfg: &ProviderConfig) -> Result<Arc<dyn Codec>, String> {
        Ok(Arc::new(OllamaCodec::new(self.keep_alive.clone())))
    }
}

fn settings(s: &mut Section<'_>) -> Arc<dyn Settings> {
    let raw = s.parse::<RawOllama>().unwrap_or_default();
    Arc::new(OllamaSettings {
        keep_alive: raw.keep_alive.map(|t| t.0),
    })
}

// === codec ===
//
// Codec for Ollama's native API: `POST /api/chat` (NDJSON streams) and
// `POST /api/embed`. `keep_alive` comes from the provider file.

pub struct OllamaCodec {
    /// How long Ollama keeps the model loaded after a call (`5m`, `-1`, `0`).
    keep_alive: Option<String>,
}

impl OllamaCodec {
    pub fn new(keep_alive: Option<String>) -> Self {
        OllamaCodec { keep_alive }
    }
}

impl Codec for OllamaCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: "/api/chat".into(),
            body: encode_chat_request(req, model, self.keep_alive.as_deref())?,
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        decode_chat_response(body)
    }

    fn stream_framing(&self) -> Framing {
        Framing::Ndjson
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(ChatStream::default())
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
            path: "/api/embed".into(),
            body: encode_embeddings_request(req, model, self.keep_alive.as_deref())?,
            headers: Vec::new(),
        })
    }

    fn embeddings_response(&self, body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        decode_embeddings_response(body)
    }

    fn health_path(&self) -> Option<&str> {
        // `{"version":"…"}` as soon as the server is up (models load on demand).
        Some("/api/version")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::common::testing::{
        call_deltas, decode_stream, embeddings_request, fixture, recorded_chat, request, text_of,
    };
    use crate::backend::ollama::OllamaCodec;
    use serde_json::json;

    /// Decodes an NDJSON fixture, optionally cut into pieces of `chunk` bytes.
    fn stream(name: &str, chunk: usize) -> Result<Vec<StreamEvent>, UpstreamError> {
        let text = fixture("ollama", name);
        let (out, result, finished) =
            decode_stream(&OllamaCodec::new(None), text.as_bytes(), chunk);
        result?;
        assert!(finished, "{name} has no done line");
        Ok(out)
    }

    #[test]
    fn keep_alive_numbers_and_durations() {
        assert_eq!(keep_alive_value("-1"), json!(-1));
        assert_eq!(keep_alive_value("0"), json!(0));
        assert_eq!(keep_alive_value("1.5"), json!(1.5));
        assert_eq!(keep_alive_value("10m"), json!("10m"));
    }

    #[test]
    fn request_carries_tools_results_images_and_options() {
        let mut assistant = Message::text(Role::Assistant, "");
        assistant.content = None;
        assistant.tool_calls = vec![ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: "{\"city\":\"Paris\"}".into(),
        }];
        let mut result = Message::text(Role::Tool, "18°C, sunny");
        result.tool_call_id = Some("call_1".into());
        let mut user = Message::text(Role::User, "");
        user.content = Some(Content::Parts(vec![
            Part::Text("What is this?".into()),
            Part::Image {
                url: "data:image/png;base64,iVBORw0KGgo=".into(),
                detail: None,
            },
        ]));
        let mut req = request(vec![
            Message::text(Role::Developer, "Be brief."),
            user,
            assistant,
            result,
        ]);
        req.stream = true;
        req.tools = vec![Tool {
            name: "get_weather".into(),
            description: Some("Weather".into()),
            parameters: Some(json!({"type": "object"})),
            strict: Some(true),
        }];
        req.params.max_completion_tokens = Some(100);
        req.params.temperature = Some(0.3);
        req.params.seed = Some(1);
        req.params.stop = vec!["END".into()];
        req.response_format = Some(ResponseFormat::JsonObject);
        req.extra.insert("top_k".into(), json!(20));
        req.extra
            .insert("options".into(), json!({"num_ctx": 8192, "temperature": 9}));
        req.extra.insert("think".into(), json!(false));
        req.extra.insert("logit_bias".into(), json!({}));
        let v: Value =
            serde_json::from_slice(&encode_chat_request(&req, "llama3.2", Some("10m")).unwrap())
                .unwrap();
        assert_eq!(
            v,
            json!({
                "model": "llama3.2",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is this?", "images": ["iVBORw0KGgo="]},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                    {"role": "tool", "content": "18°C, sunny", "tool_name": "get_weather", "tool_call_id": "call_1"}
                ],
                "stream": true,
                "tools": [{"type": "function", "function": {"name": "get_weather",
                    "description": "Weather", "parameters": {"type": "object"}}}],
                "format": "json",
                "options": {"num_predict": 100, "temperature": 0.3, "seed": 1, "stop": ["END"],
                    "top_k": 20, "num_ctx": 8192},
                "keep_alive": "10m",
                "think": false
            })
        );
    }

    #[test]
    fn mid_stream_error_lines_are_classified_by_their_status() {
        let mut s = ChatStream::default();
        let mut out = Vec::new();
        s.line(r#"{"model":"m","created_at":"2025-06-02T09:14:05Z","message":{"role":"assistant","content":"Hi"},"done":false}"#, &mut out).unwrap();
        let e = s
            .line(
                r#"{"error":"you (user) have reached your hourly usage limit","status":429}"#,
                &mut out,
            )
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::RateLimited, "{e:?}");
        let e = ChatStream::default()
            .line(
                r#"{"error":"upstream model crashed","status":500}"#,
                &mut Vec::new(),
            )
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
        let e = ChatStream::default()
            .line(
                r#"{"error":"model requires more system memory","status":"bogus"}"#,
                &mut Vec::new(),
            )
            .unwrap_err();
        assert_eq!(
            e.kind,
            ErrorKind::Overloaded,
            "no usable status: the words decide"
        );
    }

    #[test]
    fn request_edge_cases() {
        let mut req = request(vec![Message::text(Role::User, "x")]);
        // `stream` is always explicit (Ollama's default is true).
        let v: Value =
            serde_json::from_slice(&encode_chat_request(&req, "m", None).unwrap()).unwrap();
        assert_eq!(
            v,
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": false})
        );
        // A JSON schema goes to `format` without its OpenAI wrapper.
        req.response_format = Some(ResponseFormat::JsonSchema(
            json!({"name": "n", "schema": {"type": "object", "required": ["a"]}}),
        ));
        req.tools = vec![Tool {
            name: "f".into(),
            description: None,
            parameters: None,
            strict: None,
        }];
        req.tool_choice = Some(ToolChoice::None);
        let v: Value =
            serde_json::from_slice(&encode_chat_request(&req, "m", Some("-1")).unwrap()).unwrap();
        assert_eq!(v["format"], json!({"type": "object", "required": ["a"]}));
        assert!(v.get("tools").is_none(), "tool_choice none offers no tools");
        assert_eq!(v["keep_alive"], json!(-1));
        // Image URLs and non-object arguments cannot be expressed.
        let mut img = Message::text(Role::User, "");
        img.content = Some(Content::Parts(vec![Part::Image {
            url: "https://example.invalid/a.png".into(),
            detail: None,
        }]));
        let e = encode_chat_request(&request(vec![img]), "m", None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        let mut a = Message::text(Role::Assistant, "");
        a.tool_calls = vec![ToolCall {
            id: "c".into(),
            name: "f".into(),
            arguments: "[1]".into(),
        }];
        let e = encode_chat_request(&request(vec![a]), "m", None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
    }

    #[test]
    fn answers_decode() {
        let r = recorded_chat("ollama", decode_chat_response);
        assert_eq!(r.usage, Some(Usage::new(12, 6)));
        assert_eq!(r.model, "llama3.2");

        let r = decode_chat_response(fixture("ollama", "tools.json").as_bytes()).unwrap();
        let call = &r.choices[0].message.tool_calls[0];
        assert_eq!(call.name, "get_weather");
        assert_eq!(call.arguments, "{\"city\":\"Paris\"}");
        assert!(call.id.starts_with("call_"));
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::ToolCalls));

        let r = decode_chat_response(fixture("ollama", "length.json").as_bytes()).unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Length));

        // Thinking, a tool call with its own id, no prompt count (cache hit).
        let r = decode_chat_response(
            br#"{"model":"qwen3","created_at":"2025-06-01T10:00:00Z","message":{"role":"assistant","content":"","thinking":"Paris, then.","tool_calls":[{"id":"call_abc","function":{"index":0,"name":"get_weather","arguments":{"city":"Paris"}}}]},"done":true,"done_reason":"stop","eval_count":20}"#,
        )
        .unwrap();
        let m = &r.choices[0].message;
        assert_eq!(m.reasoning.as_deref(), Some("Paris, then."));
        assert_eq!(m.tool_calls[0].id, "call_abc");
        assert_eq!(r.usage, None);

        // A load-only answer generated nothing.
        let r = decode_chat_response(
            br#"{"model":"llama3.2","created_at":"2024-09-12T21:17:29.110811Z","message":{"role":"assistant","content":""},"done_reason":"load","done":true}"#,
        )
        .unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Stop));
        assert_eq!(
            r.choices[0].message.content,
            Some(Content::Text(String::new()))
        );
    }

    #[test]
    fn streams_decode_at_any_split() {
        for chunk in [1, 7, 64, 1 << 20] {
            let events = stream("chat.ndjson", chunk).unwrap();
            assert!(matches!(events[0], StreamEvent::Meta(_)));
            assert_eq!(text_of(&events), "Hello from the fake upstream.");
            assert!(events.contains(&StreamEvent::Usage(Usage::new(12, 6))));
            assert_eq!(events.last(), Some(&StreamEvent::Done));
        }
        let events = stream("tools.ndjson", 5).unwrap();
        let calls = call_deltas(&events);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].index, 0);
        assert!(calls[0]
            .id
            .as_deref()
            .is_some_and(|i| i.starts_with("call_")));
        assert_eq!(calls[0].name.as_deref(), Some("get_weather"));
        assert_eq!(calls[0].arguments.as_deref(), Some("{\"city\":\"Paris\"}"));
        assert!(events.iter().any(|e| matches!(e, StreamEvent::Delta(d)
            if d.finish_reason == Some(FinishReason::ToolCalls))));

        let events = stream("length.ndjson", 3).unwrap();
        assert!(events.iter().any(|e| matches!(e, StreamEvent::Delta(d)
            if d.finish_reason == Some(FinishReason::Length))));
    }

    #[test]
    fn stream_error_lines_are_errors() {
        let e = stream("stream_error.ndjson", 1 << 20).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
        let mut dec = ChatStream::default();
        let e = dec.line("{oops", &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
    }

    #[test]
    fn errors_classify() {
        let cases: [(u16, String, ErrorKind); 8] = [
            (
                429,
                fixture("ollama", "error_429.json"),
                ErrorKind::RateLimited,
            ),
            (
                500,
                fixture("ollama", "error_500.json"),
                ErrorKind::Overloaded,
            ),
            (401, fixture("ollama", "error_401.json"), ErrorKind::Auth),
            (
                400,
                fixture("ollama", "error_400.json"),
                ErrorKind::BadRequest,
            ),
            (
                400,
                fixture("ollama", "error_400_context.json"),
                ErrorKind::ContextLength,
            ),
            (
                404,
                fixture("ollama", "error_404_model.json"),
                ErrorKind::BadRequest,
            ),
            (
                500,
                r#"{"error":"context canceled"}"#.into(),
                ErrorKind::Overloaded,
            ),
            (502, "Bad Gateway".into(), ErrorKind::Overloaded),
        ];
        for (status, body, kind) in cases {
            let e = classify_error_body(status, body.as_bytes());
            assert_eq!(e.kind, kind, "{status} {body}");
            assert!(!e.message.is_empty());
        }
        let e =
            decode_chat_response(fixture("ollama", "error_in_200.json").as_bytes()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
    }

    #[test]
    fn embeddings_round_trip() {
        let req = embeddings_request(&["a", "b"]);
        let v: Value = serde_json::from_slice(
            &encode_embeddings_request(&req, "nomic-embed-text", Some("5m")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"model": "nomic-embed-text", "input": ["a", "b"], "keep_alive": "5m"})
        );
        let r =
            decode_embeddings_response(fixture("ollama", "embeddings.json").as_bytes()).unwrap();
        assert_eq!(r.vectors.len(), 2);
        assert_eq!(r.vectors[1], vec![0.5, -0.25, 0.125]);
        assert_eq!(r.usage.prompt_tokens, 4);
        let tokens = EmbeddingsRequest {
            input: EmbeddingInput::Tokens(vec![vec![1, 2]]),
            ..req
        };
        assert_eq!(
            encode_embeddings_request(&tokens, "m", None)
                .unwrap_err()
                .kind,
            ErrorKind::BadRequest
        );
    }
}
