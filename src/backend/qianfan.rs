//! Baidu Qianfan v1 ("wenxinworkshop"): `POST …/chat/{endpoint}` and
//! `…/embeddings/{endpoint}`, the OAuth access token in the query string (added by
//! the transport). Not OpenAI-shaped:
//!
//! - request: `messages` of `user`/`assistant`/`function` turns that must start
//!   with a user turn, alternate and be odd in number; a top-level `system`;
//!   `temperature` in (0, 1], `top_p`, `penalty_score` in [1, 2],
//!   `max_output_tokens`, `stop`, `stream`, `user_id`, legacy `functions`,
//!   `tool_choice`, `response_format` as a string;
//! - response: the text in `result`, `finish_reason` (`normal`, `stop`, `length`,
//!   `content_filter`, `function_call`), one `function_call` with `thoughts`,
//!   `need_clear_history` when moderation flagged the conversation, OpenAI-style
//!   `usage`;
//! - streams: SSE `data:` events with `sentence_id`, a `result` delta and `usage`;
//!   the last has `is_end: true` (no `[DONE]`);
//! - errors: `{"error_code","error_msg"}`, usually inside HTTP 200, for every call;
//!   the code decides the kind (see [`kind_of_code`]).
//!
//! How a transcript is folded into Baidu's strict turns:
//! - `system`/`developer` messages are joined with `\n` into `system` (with no
//!   user turn at all, that text is sent as the single user message);
//! - a `tool` message becomes a `function` turn named after the call it answers;
//!   an assistant turn carries its first tool call as `function_call` (v1 has one
//!   call per turn; further calls of the same turn are not sent);
//! - consecutive turns of the same side are merged (text joined with `\n`; a run
//!   of `function` results stays `function`, a mix becomes `user`); leading
//!   assistant turns are dropped; a transcript ending with an assistant turn is
//!   refused (400 `bad_request`), since v1 cannot continue an answer;
//! - only text is sent (v1 chat takes no images).
//!
//! Parameters: temperature is clamped into (0, 1] (`≤ 0` → 1e-9, as Baidu's SDK
//! sends for 0; above 1 → 1) rather than scaled; `top_p` is clamped to [0, 1];
//! `penalty_score` = 1 + frequency (else presence) penalty / 2, clamped to [1, 2];
//! `max_output_tokens` = the output limit (at least 2); JSON mode is
//! `"json_object"`; a forced function is `tool_choice`, `tool_choice: none` sends
//! no functions; seed and `n` have no equivalent. The request's `extra` fields
//! (e.g. a route's `disable_search`) are added to the body as they are, except
//! one named like a field the codec itself writes.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::auth::{AuthPart, Credential, TokenSource};
use super::{Codec, EnvLookup, EventStream, HttpCall, Kind, Provider, Settings, StreamDecoder};
use crate::backend::common::{
    self, finish_stream, malformed_json, new_call_id, new_completion_id, open_stream, push_delta,
    push_joined, stream_meta, ArgText, InUsage, OutFunction as OutFunctionCall,
};
use crate::canonical::*;
use crate::config::{valid_env_name, Capabilities, ProviderConfig, Section};
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::Frame;

// === request ===

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_call: Option<OutFunctionCall<'a>>,
}

#[derive(Serialize)]
struct OutFunction<'a> {
    name: &'a str,
    description: &'a str,
    parameters: Cow<'a, Value>,
}

#[derive(Serialize)]
struct OutRequest<'a> {
    messages: Vec<OutMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    penalty_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    functions: Vec<OutFunction<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<&'static str>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    User,
    Assistant,
}

struct Turn<'a> {
    side: Side,
    role: &'static str,
    content: String,
    name: Option<&'a str>,
    call: Option<&'a ToolCall>,
}

/// The transcript as Baidu's alternating, odd-length `messages` plus `system`.
fn fold(messages: &[Message]) -> Result<(Vec<OutMessage<'_>>, Option<String>), UpstreamError> {
    let mut system = String::new();
    let mut turns: Vec<Turn<'_>> = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let text = m.content.as_ref().map(Content::text).unwrap_or_default();
        let turn = match m.role {
            Role::System | Role::Developer => {
                push_joined(&mut system, "\n", &text);
                continue;
            }
            Role::User => Turn {
                side: Side::User,
                role: "user",
                content: text.into_owned(),
                name: None,
                call: None,
            },
            Role::Tool => {
                // The function's name, from the assistant call this result answers.
                let name = m
                    .tool_call_id
                    .as_deref()
                    .and_then(|id| {
                        messages[..i]
                            .iter()
                            .rev()
                            .flat_map(|p| p.tool_calls.iter())
                            .find(|c| c.id == id)
                            .map(|c| c.name.as_str())
                    })
                    .or(m.name.as_deref())
                    .unwrap_or("function");
                Turn {
                    side: Side::User,
                    role: "function",
                    content: text.into_owned(),
                    name: Some(name),
                    call: None,
                }
            }
            Role::Assistant => Turn {
                side: Side::Assistant,
                role: "assistant",
                content: text.into_owned(),
                name: None,
                call: m.tool_calls.first(),
            },
        };
        if turns.is_empty() && turn.side == Side::Assistant {
            continue; // a leading assistant turn is dropped
        }
        match turns.last_mut() {
            Some(last) if last.side == turn.side => {
                push_joined(&mut last.content, "\n", &turn.content);
                if last.role != turn.role {
                    last.role = "user";
                    last.name = None;
                }
                if last.call.is_none() {
                    last.call = turn.call;
                }
            }
            _ => turns.push(turn),
        }
    }
    let mut system = (!system.is_empty()).then_some(system);
    match turns.last() {
        Some(t) if t.side == Side::Assistant => {
            return Err(UpstreamError::new(
                ErrorKind::BadRequest,
                "Qianfan cannot continue an assistant message: the conversation must end with a user message",
            ))
        }
        Some(_) => {}
        None => match system.take() {
            Some(s) => turns.push(Turn {
                side: Side::User,
                role: "user",
                content: s,
                name: None,
                call: None,
            }),
            None => {
                return Err(UpstreamError::new(
                    ErrorKind::BadRequest,
                    "Qianfan needs a user message to answer",
                ))
            }
        },
    }
    let out = turns
        .into_iter()
        .map(|t| OutMessage {
            role: t.role,
            content: t.content,
            name: t.name,
            function_call: t.call.map(OutFunctionCall::new),
        })
        .collect();
    Ok((out, system))
}

fn empty_schema() -> Value {
    serde_json::json!({"type": "object", "properties": {}})
}

/// Encodes a canonical request as a Qianfan v1 chat body (the endpoint is in the
/// path, not the body).
pub fn encode_chat_request(req: &ChatRequest) -> Result<Vec<u8>, UpstreamError> {
    let (messages, system) = fold(&req.messages)?;
    let p = &req.params;
    let send_functions = !req.tools.is_empty() && req.tool_choice != Some(ToolChoice::None);
    let mut out = OutRequest {
        messages,
        system,
        temperature: p
            .temperature
            .map(|t| if t <= 0.0 { 1e-9 } else { t.min(1.0) }),
        top_p: p.top_p.map(|t| t.clamp(0.0, 1.0)),
        penalty_score: p
            .frequency_penalty
            .or(p.presence_penalty)
            .map(|x| (1.0 + x / 2.0).clamp(1.0, 2.0)),
        max_output_tokens: p.output_limit().map(|m| m.max(2)),
        stop: &p.stop,
        stream: req.stream,
        user_id: p.user.as_deref(),
        functions: if send_functions {
            req.tools
                .iter()
                .map(|t| OutFunction {
                    name: &t.name,
                    description: t.description.as_deref().unwrap_or(""),
                    parameters: t
                        .parameters
                        .as_ref()
                        .map(Cow::Borrowed)
                        .unwrap_or_else(|| Cow::Owned(empty_schema())),
                })
                .collect()
        } else {
            Vec::new()
        },
        tool_choice: match &req.tool_choice {
            Some(ToolChoice::Function(name)) if send_functions => {
                Some(serde_json::json!({"type": "function", "function": {"name": name}}))
            }
            _ => None,
        },
        response_format: match req.response_format {
            Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema(_)) => Some("json_object"),
            _ => None,
        },
        extra: &req.extra,
    };
    // An extra field named like one the codec writes would make a duplicate key:
    // the codec's value wins.
    let written = [
        ("messages", true),
        ("system", out.system.is_some()),
        ("temperature", out.temperature.is_some()),
        ("top_p", out.top_p.is_some()),
        ("penalty_score", out.penalty_score.is_some()),
        ("max_output_tokens", out.max_output_tokens.is_some()),
        ("stop", !out.stop.is_empty()),
        ("stream", out.stream),
        ("user_id", out.user_id.is_some()),
        ("functions", !out.functions.is_empty()),
        ("tool_choice", out.tool_choice.is_some()),
        ("response_format", out.response_format.is_some()),
    ];
    let ours = |k: &str| written.iter().any(|(name, on)| *on && *name == k);
    let filtered: Map<String, Value>;
    if req.extra.keys().any(|k| ours(k)) {
        filtered = req
            .extra
            .iter()
            .filter(|(k, _)| !ours(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.extra = &filtered;
    }
    Ok(serde_json::to_vec(&out).unwrap_or_default())
}

// === response ===

#[derive(Deserialize)]
struct InFunctionCall {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<ArgText>,
    #[serde(default)]
    thoughts: Option<String>,
}

impl InFunctionCall {
    fn arguments(self) -> (String, String, Option<String>) {
        let args = self.arguments.map(ArgText::into_string).unwrap_or_default();
        (
            self.name.unwrap_or_default(),
            args,
            self.thoughts.filter(|t| !t.is_empty()),
        )
    }
}

/// One reply body or one stream event: the same shape.
#[derive(Deserialize)]
struct InReply {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    need_clear_history: bool,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    function_call: Option<InFunctionCall>,
    #[serde(default)]
    usage: Option<InUsage>,
    #[serde(default)]
    is_end: Option<bool>,
    #[serde(default)]
    error_code: Option<i64>,
    #[serde(default)]
    error_msg: Option<String>,
}

fn parse_reply(body: &[u8]) -> Result<InReply, UpstreamError> {
    let r: InReply = serde_json::from_slice(body)
        .map_err(|e| malformed_json("a body", "a Qianfan reply", &e))?;
    match r.error_code {
        Some(code) if code != 0 => Err(classify_code(200, code, r.error_msg.as_deref())),
        _ => Ok(r),
    }
}

fn finish_reason(r: &InReply, moderated: bool, called: bool) -> FinishReason {
    if moderated || r.need_clear_history {
        return FinishReason::ContentFilter;
    }
    match r.finish_reason.as_deref() {
        Some("length") => FinishReason::Length,
        Some("content_filter") => FinishReason::ContentFilter,
        Some("function_call") => FinishReason::ToolCalls,
        _ if called => FinishReason::ToolCalls,
        _ if r.is_truncated => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

/// Decodes a chat reply (HTTP 2xx); an `error_code` inside it is an error.
pub fn decode_chat_response(body: &[u8]) -> Result<ChatResponse, UpstreamError> {
    let mut r = parse_reply(body)?;
    let call = r.function_call.take().map(InFunctionCall::arguments);
    let finish = finish_reason(&r, false, call.is_some());
    let text = r.result.take().unwrap_or_default();
    let mut message = Message::text(Role::Assistant, text);
    if let Some((name, arguments, thoughts)) = call {
        if message
            .content
            .as_ref()
            .is_some_and(|c| c.text().is_empty())
        {
            message.content = None;
        }
        message.reasoning = thoughts;
        message.tool_calls.push(ToolCall {
            id: new_call_id(),
            name,
            arguments,
        });
    }
    Ok(ChatResponse {
        id: r
            .id
            .filter(|i| !i.is_empty())
            .unwrap_or_else(new_completion_id),
        created: r.created.unwrap_or_else(unix_now),
        model: String::new(),
        choices: vec![Choice {
            index: 0,
            message,
            finish_reason: Some(finish),
        }],
        usage: r.usage.as_ref().map(InUsage::canonical),
        system_fingerprint: None,
    })
}

/// State of decoding one Qianfan stream.
#[derive(Debug, Default)]
pub struct StreamState {
    started: bool,
    done: bool,
    role_sent: bool,
    /// A function call was streamed (it decides the finish reason).
    called: bool,
    /// An event flagged `need_clear_history`.
    moderated: bool,
}

impl StreamState {
    /// Decodes the `data` of one SSE event.
    pub fn decode(&mut self, data: &str, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        let data = data.trim();
        if data.is_empty() {
            return Ok(());
        }
        let mut r = parse_reply(data.as_bytes())?;
        open_stream(&mut self.started, out, || {
            stream_meta(
                r.id.clone()
                    .filter(|i| !i.is_empty())
                    .unwrap_or_else(new_completion_id),
                r.created,
                None,
            )
        });
        self.moderated |= r.need_clear_history;
        let mut delta = Delta {
            content: r.result.take().filter(|t| !t.is_empty()),
            ..Delta::default()
        };
        if let Some(f) = r.function_call.take() {
            let (name, arguments, thoughts) = f.arguments();
            delta.reasoning = thoughts;
            delta.tool_calls.push(ToolCallDelta {
                index: 0,
                id: Some(new_call_id()),
                name: Some(name),
                arguments: Some(arguments),
            });
            self.called = true;
        }
        // The delta has no finish reason: it comes on its own, last.
        push_delta(&mut self.role_sent, delta, out);
        if r.is_end == Some(true) {
            let finish = finish_reason(&r, self.moderated, self.called);
            finish_stream(finish, r.usage.as_ref().map(InUsage::canonical), out);
            self.done = true;
        }
        Ok(())
    }
}

impl StreamDecoder for StreamState {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        let (_, data) = super::event_and_data(&frame);
        self.decode(data, out)
    }

    /// True once the `is_end` event arrived.
    fn finished(&self) -> bool {
        self.done
    }
}

// === errors ===

/// The kind a Qianfan `error_code` means, when the code alone decides it.
pub fn kind_of_code(code: i64) -> Option<ErrorKind> {
    Some(match code {
        // Unknown error, service unavailable, app creation failed, internal error,
        // high load, console internal error.
        1 | 2 | 15 | 336000 | 336100 | 500000 => ErrorKind::Overloaded,
        // Cluster, daily, QPS and total request limits; RPM and TPM limits.
        4 | 17 | 18 | 19 | 336501 | 336502 => ErrorKind::RateLimited,
        // No permission, token/IAM failures, invalid or expired access token.
        6 | 13 | 14 | 100 | 110 | 111 => ErrorKind::Auth,
        // Unsupported method, invalid argument / JSON / param, permission, unknown
        // API name, invalid HTTP method, invalid system or user settings.
        3 | 336001..=336005 | 336101 | 336104 | 336105 => ErrorKind::BadRequest,
        // Prompt tokens too long; input characters over the limit.
        336103 | 336007 => ErrorKind::ContextLength,
        _ => return None,
    })
}

fn classify_code(status: u16, code: i64, msg: Option<&str>) -> UpstreamError {
    let msg = msg.filter(|m| !m.is_empty()).unwrap_or("Qianfan error");
    let lower = msg.to_lowercase();
    let too_long = lower.contains("too long")
        || lower.contains("max input characters")
        || lower.contains("max length")
        || msg.contains("过长")
        || msg.contains("超长");
    let kind = match kind_of_code(code) {
        Some(ErrorKind::BadRequest) if too_long => ErrorKind::ContextLength,
        Some(k) => k,
        None if too_long => ErrorKind::ContextLength,
        None if lower.contains("sensitive") || msg.contains("敏感") || msg.contains("审核") => {
            ErrorKind::ContentFilter
        }
        None if lower.contains("limit reached") => ErrorKind::RateLimited,
        None if status == 200 => ErrorKind::Overloaded,
        None => ErrorKind::from_status(status),
    };
    let mut e = UpstreamError::from_backend(kind, format!("{msg} (error_code {code})"), status);
    e.credential_refused = kind == ErrorKind::Auth && TOKEN_REFUSED.contains(&code);
    e
}

/// Error codes of an access token Baidu no longer accepts (110: invalid, 111:
/// expired); a new token fixes them.
const TOKEN_REFUSED: [i64; 2] = [110, 111];

/// True when `e` is Baidu refusing the access token itself (error 110 or 111),
/// which a fresh token fixes.
pub fn is_token_refused(e: &UpstreamError) -> bool {
    e.credential_refused
}

/// Classifies a non-2xx answer (a gateway in front of Qianfan may answer 429,
/// 5xx or 401 with Baidu's error body or its own).
pub fn classify_error_body(status: u16, body: &[u8]) -> UpstreamError {
    #[derive(Deserialize)]
    struct InError {
        error_code: i64,
        #[serde(default)]
        error_msg: Option<String>,
    }
    match serde_json::from_slice::<InError>(body) {
        Ok(e) => classify_code(status, e.error_code, e.error_msg.as_deref()),
        Err(_) => common::classify_error_body(status, body),
    }
}

// === embeddings ===

#[derive(Serialize)]
struct OutEmbeddings<'a> {
    input: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
}

/// Encodes an embeddings request (texts only; Qianfan takes no token arrays).
pub fn encode_embeddings_request(req: &EmbeddingsRequest) -> Result<Vec<u8>, UpstreamError> {
    let EmbeddingInput::Texts(input) = &req.input else {
        return Err(UpstreamError::new(
            ErrorKind::BadRequest,
            "Qianfan embeddings take text input, not token arrays",
        ));
    };
    let out = OutEmbeddings {
        input,
        user_id: req.user.as_deref(),
    };
    Ok(serde_json::to_vec(&out).unwrap_or_default())
}

#[derive(Deserialize)]
struct InEmbedding {
    #[serde(default)]
    index: usize,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct InEmbeddings {
    #[serde(default)]
    data: Vec<InEmbedding>,
    #[serde(default)]
    usage: Option<InUsage>,
    #[serde(default)]
    error_code: Option<i64>,
    #[serde(default)]
    error_msg: Option<String>,
}

pub fn decode_embeddings_response(body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
    let r: InEmbeddings = serde_json::from_slice(body)
        .map_err(|e| malformed_json("a body", "a Qianfan embeddings reply", &e))?;
    if let Some(code) = r.error_code.filter(|c| *c != 0) {
        return Err(classify_code(200, code, r.error_msg.as_deref()));
    }
    let mut data = r.data;
    data.sort_by_key(|d| d.index);
    Ok(EmbeddingsResponse {
        model: String::new(),
        vectors: data.into_iter().map(|d| d.embedding).collect(),
        usage: r.usage.as_ref().map(InUsage::canonical).unwrap_or_default(),
    })
}

// === kind ===

pub static KIND: Kind = Kind {
    name: "qianfan",
    gen_ai_provider: "qianfan",
    auth_header: None,
    capabilities: Capabilities {
        vision: false,
        ..Capabilities::ALL
    },
    reports_usage: true,
    self_hosted: false,
    in_process: false,
    section: true,
    settings,
};

/// The `qianfan:` section.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQianfan {
    secret_key_env: String,
    #[serde(default)]
    token_url: Option<String>,
}

#[derive(Debug)]
struct QianfanSettings {
    /// The environment variable holding the secret key (the API key is `api_key_env`).
    secret_key_env: String,
    token_url: String,
}

impl Settings for QianfanSettings {
    fn codec(&self, _cfg: &ProviderConfig) -> Result<Arc<dyn Codec>, String> {
        Ok(Arc::new(QianfanCodec::new()))
    }

    /// The transport with Baidu's access token, wrapped in [`TokenRetry`].
    fn provider(
        &self,
        cfg: &ProviderConfig,
        env: EnvLookup<'_>,
    ) -> Result<Arc<dyn Provider>, String> {
        let codec = self.codec(cfg)?;
        let p = super::http_provider(cfg, env, codec, |key| {
            let var = &self.secret_key_env;
            let sk = env(var)
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| format!("environment variable {var} (its secret key) is not set"))?;
            let token = QianfanToken::new(&self.token_url, key, sk.trim());
            Ok(Some(Credential::Dynamic(Box::new(token))))
        })?;
        Ok(Arc::new(TokenRetry::new(Arc::new(p))))
    }
}

fn settings(s: &mut Section<'_>) -> Arc<dyn Settings> {
    let Some(q) = s.parse::<RawQianfan>() else {
        if !s.is_present() {
            s.problem(
                "secret_key_env",
                "Qianfan v1 needs the secret key's environment variable (the API key is api_key_env)",
            );
        }
        return Arc::new(QianfanSettings {
            secret_key_env: String::new(),
            token_url: String::new(),
        });
    };
    if !valid_env_name(&q.secret_key_env) {
        s.problem(
            "secret_key_env",
            "must be the name of an environment variable",
        );
    }
    Arc::new(QianfanSettings {
        secret_key_env: q.secret_key_env,
        token_url: q
            .token_url
            .unwrap_or_else(|| "https://aip.baidubce.com/oauth/2.0/token".into()),
    })
}

// === auth ===

/// The longest lifetime taken from a token answer (Baidu's tokens last 30 days).
const MAX_TOKEN_LIFE: Duration = Duration::from_secs(30 * 86_400);

/// When a token fetched at `now` that lives `expires_in` seconds (a day when the
/// answer does not say) should be refreshed: five minutes, or a tenth of its
/// lifetime, early. The lifetime is the endpoint's number, so it is capped
/// rather than trusted to fit a clock.
fn token_refresh_at(expires_in: Option<u64>, now: SystemTime) -> SystemTime {
    let life = Duration::from_secs(expires_in.unwrap_or(86_400)).min(MAX_TOKEN_LIFE);
    let early = (life / 10).min(Duration::from_secs(300));
    now.checked_add(life - early).unwrap_or(now)
}

/// Baidu Qianfan v1: an access token from the OAuth endpoint (API key + secret
/// key), cached until shortly before it expires, sent as `?access_token=`.
pub struct QianfanToken {
    token_url: String,
    api_key: String,
    secret_key: String,
    cached: tokio::sync::Mutex<Option<(String, SystemTime)>>,
}

impl QianfanToken {
    pub fn new(token_url: &str, api_key: &str, secret_key: &str) -> Self {
        QianfanToken {
            token_url: token_url.to_owned(),
            api_key: api_key.to_owned(),
            secret_key: secret_key.to_owned(),
            cached: tokio::sync::Mutex::new(None),
        }
    }

    async fn fetch(
        &self,
        client: &super::transport::Upstream,
    ) -> Result<(String, SystemTime), UpstreamError> {
        #[derive(serde::Deserialize)]
        struct TokenReply {
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
            #[serde(default)]
            error_description: Option<String>,
        }
        // The credentials travel in the query, form-encoded; an error's text
        // never holds the URL.
        let mut url = reqwest::Url::parse(&self.token_url).map_err(|e| {
            UpstreamError::new(ErrorKind::Connect, format!("invalid token URL: {e}"))
        })?;
        url.query_pairs_mut()
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &self.api_key)
            .append_pair("client_secret", &self.secret_key);
        // A token reply is a few hundred bytes; a larger one is not read whole.
        let (status, body) = client.post_empty(url.as_str(), 64 * 1024).await?;
        let reply: TokenReply = serde_json::from_slice(&body).map_err(|_| {
            UpstreamError::new(
                ErrorKind::Auth,
                format!("token endpoint answered HTTP {status} with no token"),
            )
        })?;
        match reply.access_token {
            Some(t) if !t.is_empty() => {
                Ok((t, token_refresh_at(reply.expires_in, SystemTime::now())))
            }
            _ => Err(UpstreamError::new(
                ErrorKind::Auth,
                format!(
                    "token endpoint refused the credentials: {}",
                    reply
                        .error_description
                        .unwrap_or_else(|| format!("HTTP {status}"))
                ),
            )),
        }
    }
}

impl TokenSource for QianfanToken {
    fn get<'a>(
        &'a self,
        client: &'a super::transport::Upstream,
    ) -> BoxFuture<'a, Result<AuthPart, UpstreamError>> {
        Box::pin(async move {
            let mut cached = self.cached.lock().await;
            if let Some((tok, until)) = cached.as_ref() {
                if SystemTime::now() < *until {
                    return Ok(AuthPart::Query("access_token", tok.clone()));
                }
            }
            let (tok, until) = self.fetch(client).await?;
            *cached = Some((tok.clone(), until));
            Ok(AuthPart::Query("access_token", tok))
        })
    }

    fn invalidate(&self) {
        if let Ok(mut c) = self.cached.try_lock() {
            *c = None;
        }
    }
}

#[cfg(test)]
mod auth_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn token_lifetimes_from_the_endpoint_are_capped() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            token_refresh_at(Some(2_592_000), now),
            now + Duration::from_secs(2_592_000 - 300)
        );
        assert_eq!(
            token_refresh_at(None, now),
            now + Duration::from_secs(86_400 - 300)
        );
        assert_eq!(
            token_refresh_at(Some(100), now),
            now + Duration::from_secs(90)
        );
        // u64::MAX seconds would overflow the clock.
        assert_eq!(
            token_refresh_at(Some(u64::MAX), now),
            now + MAX_TOKEN_LIFE - Duration::from_secs(300)
        );
    }
}

// === codec ===
//
// Codec for Baidu Qianfan v1 / wenxinworkshop (`kind: qianfan`). The base URL is
// `https://aip.baidubce.com/rpc/2.0/ai_custom/v1/wenxinworkshop`; the route's
// upstream model is the endpoint (`completions_pro`, `ernie_speed`, …). The
// access token (fetched from the API key and secret key, cached, refreshed when
// Baidu rejects it) is added to the query string by the transport.
//
// An access token can expire or be revoked before its announced lifetime ends;
// Baidu then answers error 110 or 111. As Baidu's own SDK does, the call is made
// once more with a fresh token ([`TokenRetry`]); a second refusal is the answer.

/// A Qianfan provider that retries a call once when the access token was
/// refused as invalid or expired. The transport drops a refused token from its
/// cache (any `auth` failure does), so the second call fetches a new one.
pub struct TokenRetry {
    inner: Arc<dyn Provider>,
}

impl TokenRetry {
    pub fn new(inner: Arc<dyn Provider>) -> Self {
        TokenRetry { inner }
    }
}

/// The answer of `call`, or of a second `call` when the first one's access token
/// was refused.
async fn once_more<'a, T>(
    call: impl Fn() -> BoxFuture<'a, Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    match call().await {
        Err(e) if is_token_refused(&e) => call().await,
        r => r,
    }
}

impl Provider for TokenRetry {
    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<ChatResponse, UpstreamError>> {
        Box::pin(once_more(move || self.inner.chat(req, model)))
    }

    fn chat_stream<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<EventStream, UpstreamError>> {
        Box::pin(once_more(move || self.inner.chat_stream(req, model)))
    }

    fn embed<'a>(
        &'a self,
        req: &'a EmbeddingsRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<EmbeddingsResponse, UpstreamError>> {
        Box::pin(once_more(move || self.inner.embed(req, model)))
    }

    fn health(&self) -> Option<BoxFuture<'_, Result<(), UpstreamError>>> {
        self.inner.health()
    }
}

#[derive(Debug, Default)]
pub struct QianfanCodec;

impl QianfanCodec {
    pub fn new() -> Self {
        QianfanCodec
    }
}

/// `model` as a path segment: endpoints are plain names; anything else is
/// percent-encoded so it cannot change the path.
fn segment(model: &str) -> String {
    let mut out = String::with_capacity(model.len());
    for b in model.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Codec for QianfanCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: format!("/chat/{}", segment(model)),
            body: encode_chat_request(req)?,
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        decode_chat_response(body)
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(StreamState::default())
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
            path: format!("/embeddings/{}", segment(model)),
            body: encode_embeddings_request(req)?,
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

    #[test]
    fn endpoint_is_the_model() {
        let req = crate::backend::openai::decode_chat_request(
            br#"{"model":"r","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let codec = QianfanCodec::new();
        assert_eq!(
            codec.chat_call(&req, "completions_pro").unwrap().path,
            "/chat/completions_pro"
        );
        assert_eq!(
            codec.chat_call(&req, "../x?y").unwrap().path,
            "/chat/..%2Fx%3Fy"
        );
        let emb =
            crate::backend::openai::decode_embeddings_request(br#"{"model":"r","input":"a"}"#)
                .unwrap();
        assert_eq!(
            codec.embeddings_call(&emb, "embedding-v1").unwrap().path,
            "/embeddings/embedding-v1"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::common::testing::{
        assert_fixture_errors, call_deltas, client_request as request, decode_stream, finishes,
        fixture, recorded_chat, text_of,
    };
    use crate::backend::openai;
    use crate::backend::qianfan::QianfanCodec;
    use serde_json::json;

    fn encode(v: Value) -> Result<Value, UpstreamError> {
        encode_chat_request(&request(v)).map(|b| serde_json::from_slice(&b).unwrap())
    }

    fn stream(text: &str) -> (Vec<StreamEvent>, Result<(), UpstreamError>, bool) {
        decode_stream(&QianfanCodec::new(), text.as_bytes(), 0)
    }

    #[test]
    fn request_has_top_level_system_and_baidu_parameters() {
        let body = encode(json!({
            "model": "route", "stream": true,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": "Use English."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Weather?"}
            ],
            "temperature": 1.5, "top_p": 0.5, "frequency_penalty": 1.0, "max_tokens": 1,
            "stop": ["END"], "user": "u-1", "seed": 3, "n": 1,
            "response_format": {"type": "json_object"}, "disable_search": true
        }))
        .unwrap();
        assert_eq!(
            body,
            json!({
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Weather?"}
                ],
                "system": "Be brief.\nUse English.",
                "temperature": 1.0, "top_p": 0.5, "penalty_score": 1.5, "max_output_tokens": 2,
                "stop": ["END"], "stream": true, "user_id": "u-1",
                "response_format": "json_object", "disable_search": true
            })
        );
        let body = encode(
            json!({"model": "r", "messages": [{"role": "user", "content": "x"}], "temperature": 0}),
        )
        .unwrap();
        assert_eq!(body["temperature"], 1e-9);
        // Extras never duplicate a field the codec writes; others pass through.
        let body = encode(
            json!({"model": "r", "messages": [{"role": "user", "content": "x"}],
            "system": "from extra", "penalty_score": 1.2, "enable_citation": true}),
        )
        .unwrap();
        assert_eq!(
            body,
            json!({"messages": [{"role": "user", "content": "x"}], "system": "from extra", "penalty_score": 1.2, "enable_citation": true})
        );
        let raw = encode_chat_request(&request(json!({"model": "r",
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
            "system": "from extra"})))
        .unwrap();
        let text = String::from_utf8(raw).unwrap();
        assert_eq!(text.matches("\"system\"").count(), 1, "{text}");
        assert!(text.contains("\"system\":\"s\""), "{text}");
    }

    #[test]
    fn tool_traffic_becomes_legacy_functions() {
        let body = encode(json!({
            "model": "r",
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "noon"}
            ],
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
                {"type": "function", "function": {"name": "get_time"}}
            ],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}
        }))
        .unwrap();
        assert_eq!(
            body,
            json!({
                "messages": [
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "", "function_call": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"role": "function", "name": "get_weather", "content": "sunny\nnoon"}
                ],
                "functions": [
                    {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
                    {"name": "get_time", "description": "", "parameters": {"type": "object", "properties": {}}}
                ],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}
            })
        );
        let body = encode(json!({
            "model": "r", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"
        }))
        .unwrap();
        assert!(body.get("functions").is_none() && body.get("tool_choice").is_none());
    }

    #[test]
    fn turns_are_forced_into_alternation() {
        let body = encode(json!({"model": "r", "messages": [
            {"role": "assistant", "content": "Welcome!"},
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
            {"role": "assistant", "content": "d"},
            {"role": "tool", "tool_call_id": "zz", "name": "lookup", "content": "r"},
            {"role": "user", "content": "e"}
        ]}))
        .unwrap();
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "a\nb"},
                {"role": "assistant", "content": "c\nd"},
                {"role": "user", "content": "r\ne"}
            ])
        );
        let e = encode(json!({"model": "r", "messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}
        ]}))
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        let body =
            encode(json!({"model": "r", "messages": [{"role": "system", "content": "Say hi"}]}))
                .unwrap();
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": "Say hi"}])
        );
        assert!(body.get("system").is_none());
    }

    #[test]
    fn replies_decode() {
        let r = recorded_chat("qianfan", decode_chat_response);
        assert_eq!(r.id, "as-fake0001");
        assert_eq!(r.usage, Some(Usage::new(12, 6)));
        let r = decode_chat_response(fixture("qianfan", "tools.json").as_bytes()).unwrap();
        let m = &r.choices[0].message;
        assert_eq!(m.content, None);
        assert_eq!(m.tool_calls[0].name, "get_weather");
        assert_eq!(m.tool_calls[0].arguments, "{\"city\":\"Paris\"}");
        assert!(m.tool_calls[0].id.starts_with("call_"));
        assert!(m.reasoning.is_some());
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::ToolCalls));
        let r = decode_chat_response(fixture("qianfan", "length.json").as_bytes()).unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Length));
        let r = decode_chat_response(fixture("qianfan", "moderated.json").as_bytes()).unwrap();
        assert_eq!(
            r.choices[0].finish_reason,
            Some(FinishReason::ContentFilter)
        );
        // Arguments sent as an object are kept as JSON text.
        let r = decode_chat_response(
            br#"{"result":"","function_call":{"name":"f","arguments":{"a":1}},"finish_reason":"function_call"}"#,
        )
        .unwrap();
        assert_eq!(r.choices[0].message.tool_calls[0].arguments, "{\"a\":1}");
    }

    #[test]
    fn refused_tokens_are_recognised_for_a_retry() {
        for name in ["error_in_200_token.json", "token_expired_stream.1.json"] {
            let e = decode_chat_response(fixture("qianfan", name).as_bytes()).unwrap_err();
            assert!(is_token_refused(&e), "{name}: {e:?}");
        }
        let e = classify_error_body(401, br#"{"error_code":110,"error_msg":"x"}"#);
        assert!(is_token_refused(&e));
        let long = format!(r#"{{"error_code":111,"error_msg":"{}"}}"#, "x".repeat(5000));
        assert!(is_token_refused(&classify_error_body(200, long.as_bytes())));
        // Other auth failures (no permission, bad key) are not retried.
        let e = classify_error_body(200, br#"{"error_code":6,"error_msg":"No permission"}"#);
        assert_eq!(e.kind, ErrorKind::Auth);
        assert!(!is_token_refused(&e));
    }

    #[test]
    fn errors_inside_200_are_classified_by_code() {
        let cases = [
            ("error_in_200_qps.json", ErrorKind::RateLimited),
            ("error_in_200_token.json", ErrorKind::Auth),
            ("error_in_200_context.json", ErrorKind::ContextLength),
            ("error_in_200_busy.json", ErrorKind::Overloaded),
            ("error_in_200.json", ErrorKind::BadRequest),
        ];
        for (name, kind) in cases {
            let e = decode_chat_response(fixture("qianfan", name).as_bytes()).unwrap_err();
            assert_eq!(e.kind, kind, "{name}");
            assert_eq!(e.status, None);
            assert!(e.message.contains("error_code"));
        }
        let e = decode_chat_response(
            br#"{"error_code":336003,"error_msg":"the max length of current question is 4800"}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ContextLength);
        let e = decode_chat_response(br#"{"error_code":999999,"error_msg":"?"}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
    }

    #[test]
    fn http_errors_classify() {
        assert_fixture_errors("qianfan", classify_error_body, &[]);
        assert_eq!(
            classify_error_body(502, b"<html>Bad Gateway</html>").kind,
            ErrorKind::Overloaded
        );
    }

    #[test]
    fn streams_end_at_is_end() {
        let (ev, res, done) = stream(&fixture("qianfan", "chat.sse"));
        res.unwrap();
        assert!(done);
        let StreamEvent::Meta(meta) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(meta.id, "as-fake0002");
        let text = text_of(&ev);
        assert_eq!(text, "Hello from the fake upstream.");
        assert_eq!(finishes(&ev), vec![FinishReason::Stop]);
        // Usage is reported once, from the last event.
        let usages: Vec<&StreamEvent> = ev
            .iter()
            .filter(|e| matches!(e, StreamEvent::Usage(_)))
            .collect();
        assert_eq!(usages, vec![&StreamEvent::Usage(Usage::new(12, 6))]);
        assert_eq!(ev.last(), Some(&StreamEvent::Done));

        let (ev, _, done) = stream(&fixture("qianfan", "tools.sse"));
        assert!(done);
        assert_eq!(finishes(&ev), vec![FinishReason::ToolCalls]);
        let calls = call_deltas(&ev);
        assert_eq!(calls.len(), 1);
        assert!(calls[0].id.is_some());
        assert_eq!(calls[0].arguments.as_deref(), Some("{\"city\":\"Paris\"}"));

        let (ev, _, _) = stream(&fixture("qianfan", "length.sse"));
        assert_eq!(finishes(&ev), vec![FinishReason::Length]);

        let (ev, res, done) = stream(&fixture("qianfan", "stream_error.sse"));
        assert!(!done);
        assert!(ev
            .iter()
            .any(|e| matches!(e, StreamEvent::Delta(d) if d.content.as_deref() == Some("Hello"))));
        assert_eq!(res.unwrap_err().kind, ErrorKind::Overloaded);
    }

    #[test]
    fn embeddings_round_trip() {
        let req =
            openai::decode_embeddings_request(br#"{"model":"m","input":["a","b"],"user":"u"}"#)
                .unwrap();
        let body: Value =
            serde_json::from_slice(&encode_embeddings_request(&req).unwrap()).unwrap();
        assert_eq!(body, json!({"input": ["a", "b"], "user_id": "u"}));
        let tokens = openai::decode_embeddings_request(br#"{"model":"m","input":[1,2]}"#).unwrap();
        assert_eq!(
            encode_embeddings_request(&tokens).unwrap_err().kind,
            ErrorKind::BadRequest
        );
        let r =
            decode_embeddings_response(fixture("qianfan", "embeddings.json").as_bytes()).unwrap();
        assert_eq!(r.vectors, vec![vec![0.5, -0.25], vec![0.125, 1.0]]);
        assert_eq!(r.usage.prompt_tokens, 4);
        let e = decode_embeddings_response(
            br#"{"error_code":18,"error_msg":"Open api qps request limit reached"}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::RateLimited);
    }
}
