//! A fake upstream for any backend protocol, driven by fixtures. The scenario of a
//! call is the text of the last user message (`chat`, `tools`, `length`,
//! `error_429`, …); the fake answers with `tests/fixtures/<kind>/<scenario>.json`
//! (non-streaming, or any error) or `<scenario>.sse` / `.ndjson` (streaming). The
//! HTTP status of an error fixture is in its name: `error_429.json` → 429;
//! `error_in_200.json` → 200. A scenario may answer its n-th call differently:
//! `<scenario>.<n>.json` (n from 1), when it exists, answers that call. Each
//! protocol only says where its requests go and how to read the stream flag and
//! the user text out of its native body.
// Test servers and clients are started freely; the gateway's own tasks go through
// promptgate::task::spawn (clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use axum::Router;
use serde_json::Value;

/// The text every `chat`/`stream` fixture answers with.
pub const EXPECTED_TEXT: &str = "Hello from the fake upstream.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Sse,
    Ndjson,
}

/// One backend protocol as the conformance suite sees it.
pub struct Protocol {
    /// The provider `kind`.
    pub kind: &'static str,
    /// The fixture folder under `tests/fixtures/` (usually the kind; a variant of
    /// a kind, e.g. a vendor on the `openai` codec, has its own folder).
    pub fixtures: &'static str,
    /// The provider file for a backend at `base_url` (no trailing slash). Keys come
    /// from `FAKE_UPSTREAM_KEY` (and `FAKE_UPSTREAM_SECRET` where a second is needed).
    pub provider_yaml: fn(base_url: &str) -> String,
    /// The upstream model routes use.
    pub model: &'static str,
    /// Whether a native request asks for a stream.
    pub is_stream: fn(path: &str, query: &str, body: &Value) -> bool,
    /// The text of the last user message in a native request.
    pub user_text: fn(body: &Value) -> String,
    pub framing: Framing,
    /// The backend reports token usage (otherwise the gateway estimates it).
    pub reports_usage: bool,
    /// The backend supports tool calls (otherwise the gateway must refuse them).
    pub tools: bool,
    /// The backend says when output was cut at the token limit (otherwise the
    /// `length` case only checks that an answer came back).
    pub length: bool,
    /// Checks the native body of a multi-turn request with a system prompt
    /// (system "Be brief.", user "Hi", assistant "Hello!", user "chat").
    pub check_multi_turn: fn(body: &Value),
    /// Scenarios with their expected (status, code) beyond the common ones,
    /// e.g. `("error_in_200", 503, "overloaded")`.
    pub extra_errors: &'static [(&'static str, u16, &'static str)],
}

#[derive(Clone, Default)]
pub struct NativeState {
    pub log: Arc<Mutex<Vec<(String, Value)>>>,
}

fn fixture_path(kind: &str, name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind)
        .join(name)
}

fn respond(status: u16, content_type: &str, body: String) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Body::from(body))
        .unwrap()
}

async fn handle(proto: &'static Protocol, state: NativeState, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let bytes: Bytes = axum::body::to_bytes(req.into_body(), 1 << 24)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let scenario = (proto.user_text)(&body).trim().to_owned();
    let call = {
        let mut log = state.log.lock().unwrap();
        log.push((format!("{path}?{query}"), body.clone()));
        log.iter()
            .filter(|(_, b)| (proto.user_text)(b).trim() == scenario)
            .count()
    };
    let numbered = fixture_path(proto.fixtures, &format!("{scenario}.{call}.json"));
    if let Ok(text) = std::fs::read_to_string(numbered) {
        return respond(200, "application/json", text);
    }
    let stream = (proto.is_stream)(&path, &query, &body);
    let (ext, ctype) = match proto.framing {
        Framing::Sse => ("sse", "text/event-stream"),
        Framing::Ndjson => ("ndjson", "application/x-ndjson"),
    };
    // `error_400_x` answers 400; a streamed error fixture (`error_400_x.sse`) is
    // how backends that frame their stream errors answer a streaming call.
    let status = scenario
        .strip_prefix("error_")
        .and_then(|s| s.split('_').next())
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    let streamed = fixture_path(proto.fixtures, &format!("{scenario}.{ext}"));
    if stream && streamed.exists() {
        return respond(status, ctype, std::fs::read_to_string(streamed).unwrap());
    }
    let json = fixture_path(proto.fixtures, &format!("{scenario}.json"));
    match std::fs::read_to_string(&json) {
        Ok(text) => respond(status, "application/json", text),
        Err(_) => respond(
            404,
            "application/json",
            format!(
                "{{\"error\":\"no fixture for scenario `{scenario}` (stream: {stream}) in {}\"}}",
                proto.kind
            ),
        ),
    }
}

/// Starts the fake for `proto` on an ephemeral port; every POST (any path) is
/// answered from fixtures.
pub async fn spawn(proto: &'static Protocol) -> (String, NativeState) {
    let state = NativeState::default();
    let st = state.clone();
    let app = Router::new()
        .fallback(move |State(s): State<NativeState>, req: Request| handle(proto, s, req))
        .with_state(st);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), state)
}

/// Reads the text of the last message with role `user` from an OpenAI-style
/// `messages` array (string or parts content).
pub fn last_user_in_messages(messages: &Value) -> String {
    messages
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        })
        .unwrap_or_default()
}
