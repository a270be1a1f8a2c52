//! Zhipu GLM open platform v4 (`/api/paas/v4/chat/completions`, `/embeddings`).
//! The wire is OpenAI's, so bodies, chunks and tool calls go through
//! [`super::openai`]; this file holds only what Zhipu does differently:
//!
//! - sampling: temperature must lie in (0, 1) — `≤ 0` becomes `do_sample: false`
//!   with 0.01, `≥ 1` becomes 0.99 (what Zhipu's SDK does); `top_p` is clamped to
//!   [0.01, 0.99];
//! - no `developer` role (sent as `system`), the output limit is `max_tokens`, the
//!   end user is `user_id`; `n`, penalties and `parallel_tool_calls` are not sent;
//! - only one stop word is accepted: the first non-empty one is sent;
//! - `user_id` must be 6 to 128 characters: a `user` outside that range is sent
//!   as `pg-` + 32 hex digits of its SHA-256 (stable, so per-user accounting
//!   still works, and never equal to a user id the client could send itself
//!   unless it sends that exact text);
//! - finish `model_context_window_exceeded` → length (shared with OpenAI's table);
//! - `tool_choice` only knows `auto`: `none` sends no tools, `required` and a
//!   forced function become `auto`; a JSON schema response format becomes
//!   `json_object`;
//! - finish reasons `sensitive` (→ content_filter) and `network_error` (→ error);
//! - errors carry a business code, `{"error":{"code":"1301","message":…}}`, on
//!   non-2xx answers, inside 200 bodies and as stream events (`data:` with `error`
//!   or `event: error`); the code decides the kind (see [`kind_of_code`]).
//!
//! Zhipu-only request fields (`thinking`, `request_id`, built-in tools) travel in
//! the request's `extra`, e.g. a route's `params.extra`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use http::HeaderValue;

use serde::Deserialize;
use serde_json::Value;

use super::auth::{AuthPart, Credential, TokenSource};
use super::openai;
use super::{Codec, EnvLookup, HttpCall, Kind, Provider, Settings, StreamDecoder};
use crate::backend::common;
use crate::canonical::*;
use crate::config::{Capabilities, ProviderConfig, Section};
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::Frame;

/// Temperature and `do_sample` as Zhipu accepts them.
fn sampling(temperature: Option<f64>) -> (Option<f64>, Option<bool>) {
    match temperature {
        None => (None, None),
        Some(t) if t <= 0.0 => (Some(0.01), Some(false)),
        Some(t) if t >= 1.0 => (Some(0.99), None),
        Some(t) => (Some(t), None),
    }
}

/// `user` as a `user_id` Zhipu accepts (6 to 128 characters).
fn user_id(user: &str) -> String {
    if (6..=128).contains(&user.chars().count()) {
        return user.to_owned();
    }
    super::hashed_id("pg-", user)
}

/// Encodes a canonical request as a Zhipu v4 chat body for `model`.
pub fn encode_chat_request(req: &ChatRequest, model: &str) -> Vec<u8> {
    let p = &req.params;
    let (temperature, do_sample) = sampling(p.temperature);
    let mut extra = req.extra.clone();
    if let Some(d) = do_sample {
        extra.insert("do_sample".into(), Value::Bool(d));
    }
    if let Some(u) = &p.user {
        extra.insert("user_id".into(), Value::String(user_id(u)));
    }
    let send_tools = !req.tools.is_empty() && req.tool_choice != Some(ToolChoice::None);
    let v = openai::VendorChat {
        params: Params {
            temperature,
            top_p: p.top_p.map(|t| t.clamp(0.01, 0.99)),
            max_tokens: p.output_limit(),
            stop: p
                .stop
                .iter()
                .find(|s| !s.is_empty())
                .cloned()
                .into_iter()
                .collect(),
            seed: p.seed,
            ..Params::default()
        },
        developer_as_system: true,
        tools: send_tools,
        tool_choice: (send_tools && req.tool_choice.is_some()).then_some(ToolChoice::Auto),
        response_format: req.response_format.as_ref().map(|f| match f {
            ResponseFormat::Text => ResponseFormat::Text,
            ResponseFormat::JsonObject | ResponseFormat::JsonSchema(_) => {
                ResponseFormat::JsonObject
            }
        }),
        // Zhipu reports usage on the last chunk without being asked.
        stream_options: false,
        extra,
    };
    openai::encode_vendor_chat_request(req, model, &v)
}

/// The kind a Zhipu business error code means, when the code alone decides it.
pub fn kind_of_code(code: u32) -> Option<ErrorKind> {
    Some(match code {
        // Authentication, account state (1113 = in arrears, 1309 = plan expired).
        1000..=1004 | 1100 | 1110..=1113 | 1121 | 1220 | 1309 => ErrorKind::Auth,
        // Parameters, unknown model (1211), unsupported call, duplicate request.
        1200 | 1210..=1215 | 1221 | 1222 | 1231 => ErrorKind::BadRequest,
        1261 => ErrorKind::ContextLength,
        1300 | 1301 => ErrorKind::ContentFilter,
        // Concurrency, frequency, daily and plan usage limits.
        1302..=1304 | 1308 | 1310 => ErrorKind::RateLimited,
        // Internal error, account service busy, call process / network errors,
        // model overloaded.
        500 | 1120 | 1230 | 1234 | 1305 => ErrorKind::Overloaded,
        _ => return None,
    })
}

fn code_of(err: &Value) -> Option<u32> {
    match err.get("code")? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    }
}

/// Classifies a Zhipu error object (`{"code","message"}`) that came with `status`
/// (200 for one inside a successful answer or a stream).
pub fn classify_error_value(status: u16, err: &Value) -> UpstreamError {
    let mut e = common::classify_error_value(status, err);
    if let Some(kind) = code_of(err).and_then(kind_of_code) {
        e.kind = kind;
    } else if e.kind != ErrorKind::ContextLength {
        let m = e.message.to_lowercase();
        if m.contains("prompt exceeds max length")
            || m.contains("prompt too long")
            || m.contains("超长")
        {
            e.kind = ErrorKind::ContextLength;
        }
    }
    e
}

/// Classifies a non-2xx answer from its status and body.
pub fn classify_error_body(status: u16, body: &[u8]) -> UpstreamError {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut o)) if o.get("error").is_some_and(Value::is_object) => {
            let err = o.remove("error").unwrap_or_default();
            classify_error_value(status, &err)
        }
        _ => common::classify_error_body(status, body),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The top-level `error` object of a JSON body, if it has one. Bodies that do not
/// mention `"error"` at all (nearly every success) are not parsed.
fn top_level_error(body: &[u8]) -> Option<Value> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        error: Option<Value>,
    }
    if !contains(body, b"\"error\"") {
        return None;
    }
    serde_json::from_slice::<Probe>(body)
        .ok()?
        .error
        .filter(|e| !e.is_null())
}

/// Decodes a chat completion body (HTTP 2xx); an `error` inside it is an error.
pub fn decode_chat_response(body: &[u8]) -> Result<ChatResponse, UpstreamError> {
    if let Some(err) = top_level_error(body) {
        return Err(classify_error_value(200, &err));
    }
    openai::decode_chat_response(body)
}

/// State of decoding one Zhipu stream: OpenAI chunks, with Zhipu's error codes.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    chunks: openai::ChunkDecoder,
}

impl ChunkDecoder {
    /// Decodes one SSE event (`event` name and `data`) into canonical events.
    pub fn decode(
        &mut self,
        event: Option<&str>,
        data: &str,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), UpstreamError> {
        if event == Some("error") {
            return Err(classify_error_value(200, &common::error_event_value(data)));
        }
        if let Some(err) = top_level_error(data.as_bytes()) {
            return Err(classify_error_value(200, &err));
        }
        self.chunks.decode(data, out)
    }
}

impl StreamDecoder for ChunkDecoder {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        let (event, data) = super::event_and_data(&frame);
        self.decode(event, data, out)
    }

    /// True once `[DONE]` arrived.
    fn finished(&self) -> bool {
        self.chunks.finished()
    }
}

/// Encodes an embeddings request (`model`, `input`, `dimensions`).
pub fn encode_embeddings_request(req: &EmbeddingsRequest, model: &str) -> Vec<u8> {
    openai::encode_embeddings_request(req, model)
}

pub fn decode_embeddings_response(body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
    if let Some(err) = top_level_error(body) {
        return Err(classify_error_value(200, &err));
    }
    openai::decode_embeddings_response(body)
}

// === kind ===

pub static KIND: Kind = Kind {
    name: "zhipu",
    gen_ai_provider: "zhipu",
    auth_header: None,
    capabilities: Capabilities::ALL,
    reports_usage: true,
    self_hosted: false,
    in_process: false,
    section: true,
    settings,
};

/// The `zhipu:` section.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawZhipu {
    /// `api_key` (default: the key as a bearer token) or `jwt` (sign from `id.secret`).
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    jwt_ttl: Option<String>,
}

#[derive(Debug)]
struct ZhipuSettings {
    /// Sign a JWT from the `id.secret` key instead of sending the key.
    jwt: bool,
    jwt_ttl: Duration,
}

impl Settings for ZhipuSettings {
    fn codec(&self, _cfg: &ProviderConfig) -> Result<Arc<dyn Codec>, String> {
        Ok(Arc::new(ZhipuCodec::new()))
    }

    fn provider(
        &self,
        cfg: &ProviderConfig,
        env: EnvLookup<'_>,
    ) -> Result<Arc<dyn Provider>, String> {
        let codec = self.codec(cfg)?;
        let p = super::http_provider(cfg, env, codec, |key| {
            if !self.jwt {
                return Ok(None);
            }
            let jwt = ZhipuJwt::new(key, self.jwt_ttl)?;
            Ok(Some(Credential::Dynamic(Box::new(jwt))))
        })?;
        Ok(Arc::new(p))
    }
}

fn settings(s: &mut Section<'_>) -> Arc<dyn Settings> {
    let z = s.parse::<RawZhipu>().unwrap_or_default();
    let jwt = match z.auth.as_deref() {
        None | Some("api_key") => false,
        Some("jwt") => true,
        Some(other) => {
            s.problem("auth", format!("`{other}` is not `api_key` or `jwt`"));
            false
        }
    };
    let jwt_ttl = s.duration("jwt_ttl", &z.jwt_ttl, Duration::from_secs(1800));
    Arc::new(ZhipuSettings { jwt, jwt_ttl })
}

// === auth ===

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Zhipu's JWT: HS256 over `{"api_key": id, "exp": ms, "timestamp": ms}` with the
/// non-standard header field `sign_type: SIGN`, both times in milliseconds.
pub struct ZhipuJwt {
    id: String,
    secret: String,
    ttl: Duration,
    cached: Mutex<Option<(String, u128)>>,
}

impl ZhipuJwt {
    /// `key` is `<id>.<secret>`.
    pub fn new(key: &str, ttl: Duration) -> Result<Self, String> {
        let (id, secret) = key
            .split_once('.')
            .filter(|(a, b)| !a.is_empty() && !b.is_empty())
            .ok_or_else(|| "a Zhipu JWT key must look like `<id>.<secret>`".to_string())?;
        Ok(ZhipuJwt {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ttl,
            cached: Mutex::new(None),
        })
    }

    /// Signs a token valid from `now` (milliseconds since the epoch).
    pub fn sign(&self, now: u128) -> String {
        use hmac::{Hmac, Mac};
        let header = br#"{"alg":"HS256","sign_type":"SIGN"}"#;
        let payload = serde_json::json!({
            "api_key": self.id,
            "exp": now + self.ttl.as_millis(),
            "timestamp": now,
        })
        .to_string();
        let signing_input = format!("{}.{}", b64url(header), b64url(payload.as_bytes()));
        let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(self.secret.as_bytes()) {
            Ok(m) => m,
            // HMAC accepts keys of any length; this cannot happen.
            Err(_) => return signing_input,
        };
        mac.update(signing_input.as_bytes());
        let sig = mac.finalize().into_bytes();
        format!("{signing_input}.{}", b64url(&sig))
    }

    fn token(&self) -> String {
        let now = now_ms();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        // Reuse until a minute (or a tenth of the lifetime) before expiry.
        let margin = (self.ttl.as_millis() / 10).min(60_000);
        if let Some((tok, exp)) = cached.as_ref() {
            if now + margin < *exp {
                return tok.clone();
            }
        }
        let tok = self.sign(now);
        *cached = Some((tok.clone(), now + self.ttl.as_millis()));
        tok
    }
}

impl TokenSource for ZhipuJwt {
    fn get<'a>(
        &'a self,
        _: &'a super::transport::Upstream,
    ) -> BoxFuture<'a, Result<AuthPart, UpstreamError>> {
        let tok = self.token();
        Box::pin(async move {
            let mut v = HeaderValue::from_str(&format!("Bearer {tok}"))
                .map_err(|_| UpstreamError::new(ErrorKind::Auth, "cannot build the JWT header"))?;
            v.set_sensitive(true);
            Ok(AuthPart::Header(http::header::AUTHORIZATION, v))
        })
    }

    fn invalidate(&self) {
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod auth_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use base64::Engine;

    #[test]
    fn zhipu_jwt_has_the_documented_shape_and_verifies() {
        use hmac::{Hmac, Mac};
        let jwt = ZhipuJwt::new("myid.mysecret", Duration::from_secs(210)).unwrap();
        let tok = jwt.sign(1_700_000_000_000);
        let parts: Vec<&str> = tok.split('.').collect();
        assert_eq!(parts.len(), 3);
        let dec = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .unwrap()
        };
        let header: serde_json::Value = serde_json::from_slice(&dec(parts[0])).unwrap();
        assert_eq!(
            header,
            serde_json::json!({"alg": "HS256", "sign_type": "SIGN"})
        );
        let payload: serde_json::Value = serde_json::from_slice(&dec(parts[1])).unwrap();
        assert_eq!(
            payload,
            serde_json::json!({"api_key": "myid", "exp": 1_700_000_210_000u64, "timestamp": 1_700_000_000_000u64})
        );
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"mysecret").unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&dec(parts[2])).unwrap();
        assert!(ZhipuJwt::new("no-dot", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn zhipu_jwt_is_cached_until_near_expiry() {
        let jwt = ZhipuJwt::new("a.b", Duration::from_secs(600)).unwrap();
        let t1 = jwt.token();
        assert_eq!(jwt.token(), t1);
        jwt.invalidate();
        // A new token is minted after invalidation (its timestamp may equal the old
        // one within the same millisecond, so only check it is well-formed).
        assert_eq!(jwt.token().split('.').count(), 3);
    }
}

// === codec ===
//
// Codec for Zhipu GLM open platform v4 (`kind: zhipu`). The base URL is the
// platform's `…/api/paas/v4`; authentication (the API key as a bearer token, or
// a JWT signed from an `id.secret` key) is the transport's.

#[derive(Debug, Default)]
pub struct ZhipuCodec;

impl ZhipuCodec {
    pub fn new() -> Self {
        ZhipuCodec
    }
}

impl Codec for ZhipuCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: "/chat/completions".into(),
            body: encode_chat_request(req, model),
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        decode_chat_response(body)
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(ChunkDecoder::default())
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
            path: "/embeddings".into(),
            body: encode_embeddings_request(req, model),
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
    fn calls_go_to_the_v4_paths() {
        let req = crate::backend::openai::decode_chat_request(
            br#"{"model":"r","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let call = ZhipuCodec::new().chat_call(&req, "glm-4-flash").unwrap();
        assert_eq!(call.path, "/chat/completions");
        let v: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(v["model"], "glm-4-flash");
        let emb =
            crate::backend::openai::decode_embeddings_request(br#"{"model":"r","input":["a"]}"#)
                .unwrap();
        let call = ZhipuCodec::new()
            .embeddings_call(&emb, "embedding-3")
            .unwrap();
        assert_eq!(call.path, "/embeddings");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::common::testing::{
        assert_fixture_errors, call_deltas, client_request as request, decode_stream, fixture,
        recorded_chat, text_of,
    };
    use crate::backend::zhipu::ZhipuCodec;
    use serde_json::json;

    fn stream(text: &str) -> (Vec<StreamEvent>, Result<(), UpstreamError>, bool) {
        decode_stream(&ZhipuCodec::new(), text.as_bytes(), 0)
    }

    #[test]
    fn request_is_openai_shaped_with_zhipu_parameters() {
        let req = request(json!({
            "model": "route",
            "messages": [
                {"role": "developer", "content": "Be terse."},
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
            ],
            "temperature": 1.4, "top_p": 1.0, "max_completion_tokens": 100, "stop": ["END"],
            "seed": 7, "n": 2, "presence_penalty": 0.5, "user": "user-1",
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "tool_choice": "required", "parallel_tool_calls": false,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
            "thinking": {"type": "enabled"}
        }));
        let body: Value = serde_json::from_slice(&encode_chat_request(&req, "glm-4-plus")).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "glm-4-plus",
                "messages": [
                    {"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "Weather?"},
                    {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
                ],
                "temperature": 0.99, "top_p": 0.99, "max_tokens": 100, "stop": ["END"], "seed": 7,
                "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
                "tool_choice": "auto",
                "response_format": {"type": "json_object"},
                "user_id": "user-1",
                "thinking": {"type": "enabled"}
            })
        );
    }

    #[test]
    fn zero_temperature_turns_sampling_off_and_tool_choice_none_drops_tools() {
        let req = request(json!({
            "model": "r", "stream": true,
            "messages": [{"role": "user", "content": "x"}],
            "temperature": 0, "top_p": 0,
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none",
            "stream_options": {"include_usage": true}
        }));
        let body: Value =
            serde_json::from_slice(&encode_chat_request(&req, "glm-4-flash")).unwrap();
        assert_eq!(body["temperature"], 0.01);
        assert_eq!(body["do_sample"], false);
        assert_eq!(body["top_p"], 0.01);
        assert_eq!(body["stream"], true);
        assert!(body.get("tools").is_none() && body.get("tool_choice").is_none());
        assert!(body.get("stream_options").is_none(), "{body}");
        let mid = request(
            json!({"model": "r", "messages": [{"role": "user", "content": "x"}], "temperature": 0.3}),
        );
        let body: Value = serde_json::from_slice(&encode_chat_request(&mid, "m")).unwrap();
        assert_eq!(body["temperature"], 0.3);
        assert!(body.get("do_sample").is_none());
    }

    #[test]
    fn one_stop_word_and_a_user_id_of_six_to_128_characters() {
        let req = request(json!({
            "model": "r", "messages": [{"role": "user", "content": "x"}],
            "stop": ["", "END", "STOP"], "user": "u1"
        }));
        let body: Value = serde_json::from_slice(&encode_chat_request(&req, "m")).unwrap();
        assert_eq!(body["stop"], json!(["END"]));
        let short = body["user_id"].as_str().unwrap();
        assert!((6..=128).contains(&short.len()), "{short}");
        assert_eq!(short, user_id("u1"), "stable");
        assert_ne!(short, user_id("u2"));
        let long = "x".repeat(129);
        assert!((6..=128).contains(&user_id(&long).len()));
        assert_eq!(user_id("user-42"), "user-42", "in range: sent as is");
        assert_eq!(
            user_id(&"用".repeat(128)),
            "用".repeat(128),
            "counted in characters"
        );
    }

    #[test]
    fn context_window_exceeded_finish_is_length() {
        let r = decode_chat_response(fixture("zhipu", "context_window.json").as_bytes()).unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Length));
        let chunk = r#"{"id":"a","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"model_context_window_exceeded"}]}"#;
        let mut out = Vec::new();
        ChunkDecoder::default()
            .decode(None, chunk, &mut out)
            .unwrap();
        assert!(out.iter().any(
            |e| matches!(e, StreamEvent::Delta(d) if d.finish_reason == Some(FinishReason::Length))
        ));
    }

    #[test]
    fn responses_decode() {
        let r = recorded_chat("zhipu", decode_chat_response);
        assert_eq!(r.usage.map(|u| u.total_tokens), Some(18));
        let r = decode_chat_response(fixture("zhipu", "tools.json").as_bytes()).unwrap();
        let call = &r.choices[0].message.tool_calls[0];
        assert_eq!(
            (
                call.id.as_str(),
                call.name.as_str(),
                call.arguments.as_str()
            ),
            ("call_9f8e7d6c5b4a", "get_weather", "{\"city\":\"Paris\"}")
        );
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::ToolCalls));
        let r = decode_chat_response(fixture("zhipu", "length.json").as_bytes()).unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Length));
        let e = decode_chat_response(fixture("zhipu", "error_in_200.json").as_bytes()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
        // Text that merely mentions "error" is not an error.
        let ok = br#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"no \"error\" here"},"finish_reason":"stop"}]}"#;
        assert!(decode_chat_response(ok).is_ok());
    }

    #[test]
    fn streams_decode_with_usage_on_the_last_chunk() {
        let (ev, res, done) = stream(&fixture("zhipu", "chat.sse"));
        res.unwrap();
        assert!(done);
        assert!(matches!(ev[0], StreamEvent::Meta(_)));
        assert_eq!(text_of(&ev), "Hello from the fake upstream.");
        assert!(ev.contains(&StreamEvent::Usage(Usage::new(12, 6))));
        assert_eq!(ev.last(), Some(&StreamEvent::Done));
        let (ev, _, _) = stream(&fixture("zhipu", "tools.sse"));
        let calls = call_deltas(&ev);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name.as_deref(), Some("get_weather"));
        let finishes = |ev: &[StreamEvent]| -> Vec<FinishReason> {
            ev.iter()
                .filter_map(|e| match e {
                    StreamEvent::Delta(d) => d.finish_reason,
                    _ => None,
                })
                .collect()
        };
        assert_eq!(finishes(&ev), vec![FinishReason::ToolCalls]);
        let (ev, _, _) = stream(&fixture("zhipu", "sensitive.sse"));
        assert_eq!(finishes(&ev), vec![FinishReason::ContentFilter]);
        let (ev, _, _) = stream(&fixture("zhipu", "length.sse"));
        assert_eq!(finishes(&ev), vec![FinishReason::Length]);
        let (ev, _, _) = stream(&fixture("zhipu", "reasoning.sse"));
        assert!(ev.iter().any(|e| matches!(e, StreamEvent::Delta(d) if d.reasoning.as_deref() == Some("The user greets."))));
    }

    #[test]
    fn stream_errors_are_classified_by_code() {
        let (ev, res, done) = stream(&fixture("zhipu", "stream_error.sse"));
        assert_eq!(text_of(&ev), "Hello from");
        assert_eq!(res.unwrap_err().kind, ErrorKind::Overloaded);
        assert!(!done);
        let (_, res, _) = stream(&fixture("zhipu", "stream_error_event.sse"));
        assert_eq!(res.unwrap_err().kind, ErrorKind::RateLimited);
        let mut d = ChunkDecoder::default();
        assert_eq!(
            d.decode(Some("error"), "boom", &mut Vec::new())
                .unwrap_err()
                .kind,
            ErrorKind::Overloaded
        );
        let chunk = r#"{"id":"a","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"network_error"}]}"#;
        let mut out = Vec::new();
        ChunkDecoder::default()
            .decode(None, chunk, &mut out)
            .unwrap();
        assert!(out.iter().any(
            |e| matches!(e, StreamEvent::Delta(d) if d.finish_reason == Some(FinishReason::Error))
        ));
    }

    #[test]
    fn errors_classify_by_business_code() {
        let cases = [
            (429, "error_429_balance.json", ErrorKind::Auth),
            (400, "error_400_model.json", ErrorKind::BadRequest),
            (400, "error_400_sensitive.json", ErrorKind::ContentFilter),
        ];
        assert_fixture_errors("zhipu", classify_error_body, &cases);
        // Numeric codes, unknown codes and bodies without a code.
        let e = classify_error_body(400, br#"{"error":{"code":1261,"message":"x"}}"#);
        assert_eq!(e.kind, ErrorKind::ContextLength);
        let e = classify_error_body(
            400,
            br#"{"error":{"code":"9999","message":"Prompt too long"}}"#,
        );
        assert_eq!(e.kind, ErrorKind::ContextLength);
        let e = classify_error_body(429, br#"{"error":{"code":"9999","message":"?"}}"#);
        assert_eq!(e.kind, ErrorKind::RateLimited);
        assert_eq!(
            classify_error_body(502, b"Bad Gateway").kind,
            ErrorKind::Overloaded
        );
    }

    #[test]
    fn embeddings_decode() {
        let r = decode_embeddings_response(fixture("zhipu", "embeddings.json").as_bytes()).unwrap();
        assert_eq!(
            r.vectors,
            vec![vec![0.25, -0.5, 0.125], vec![1.0, 0.0, -1.0]]
        );
        assert_eq!(r.usage.prompt_tokens, 7);
        let e = decode_embeddings_response(br#"{"error":{"code":"1211","message":"no model"}}"#)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
    }
}
