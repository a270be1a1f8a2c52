//! Test harness: a fake OpenAI-compatible upstream on an ephemeral loopback port,
//! serving recorded fixtures and faults, and a real gateway (the library's router
//! and server) on another ephemeral port with a config written to a temp folder.
//! Everything is per test: no global state, no fixed ports.
// Test servers and clients are started freely; the gateway's own tasks go through
// promptgate::task::spawn (clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(dead_code, clippy::unwrap_used)]

pub mod native;
pub mod otlp;
pub mod peers;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use serde_json::Value;

pub const FAKE_KEY: &str = "sk-fake-SECRET-123456";

pub fn fixture(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Clone, Default)]
pub struct FakeState {
    pub log: Arc<Mutex<Vec<Recorded>>>,
    /// Streams whose consumer went away before the fake finished sending.
    pub cancelled: Arc<AtomicUsize>,
    /// Streams the fake sent to the end.
    pub completed: Arc<AtomicUsize>,
}

pub struct Fake {
    pub addr: SocketAddr,
    pub state: FakeState,
}

impl Fake {
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.log.lock().unwrap().clone()
    }
    pub fn last(&self) -> Recorded {
        self.requests()
            .last()
            .cloned()
            .expect("the fake saw no request")
    }
}

fn json(status: u16, body: String) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

/// Sets a flag on drop unless disarmed: tells whether a stream was abandoned.
struct DropGuard {
    state: FakeState,
    done: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if self.done {
            self.state.completed.fetch_add(1, Ordering::SeqCst);
        } else {
            self.state.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// An SSE response that sends `text` event by event, `delay` apart; `cut` ends the
/// connection abruptly after that many events (no terminating chunk).
fn sse(state: FakeState, text: String, delay: Duration, cut: Option<usize>) -> Response {
    let events: Vec<String> = text.split_inclusive("\n\n").map(str::to_owned).collect();
    let stream = async_stream::stream! {
        let mut guard = DropGuard { state, done: false };
        for (i, ev) in events.into_iter().enumerate() {
            if cut == Some(i) {
                // Let what was sent reach the peer before the connection drops.
                tokio::time::sleep(Duration::from_millis(100)).await;
                guard.done = true;
                yield Err(std::io::Error::other("connection cut by the fake"));
                return;
            }
            if !delay.is_zero() && i > 0 {
                tokio::time::sleep(delay).await;
            }
            yield Ok::<Bytes, std::io::Error>(Bytes::from(ev));
        }
        guard.done = true;
    };
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn chat(State(state): State<FakeState>, headers: HeaderMap, body: Bytes) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.log.lock().unwrap().push(Recorded {
        path: "/v1/chat/completions".into(),
        headers,
        body: v.clone(),
    });
    let model = v["model"].as_str().unwrap_or("").to_owned();
    let stream = v["stream"].as_bool().unwrap_or(false);
    let usage = v["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let none = Duration::ZERO;
    match (model.as_str(), stream) {
        ("chat", false) => json(200, fixture("openai/chat.json")),
        ("echo", false) => json(200, echo_completion(&v)),
        ("echo", true) => sse(state, echo_stream(&v), none, None),
        ("slow-chat", false) => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            json(200, fixture("openai/chat.json"))
        }
        ("chat", true) if usage => sse(state, fixture("openai/chat_stream_usage.sse"), none, None),
        ("chat", true) => sse(state, fixture("openai/chat_stream.sse"), none, None),
        ("nousage", false) => json(200, fixture("openai/chat_no_usage.json")),
        ("nousage", true) => sse(state, fixture("openai/chat_stream.sse"), none, None),
        ("crlf", true) => sse(state, fixture("openai/chat_stream_crlf.sse"), none, None),
        ("tools", false) => json(200, fixture("openai/chat_tool_calls.json")),
        ("tools", true) => sse(state, fixture("openai/chat_stream_tool_calls.sse"), none, None),
        ("json", _) => json(200, fixture("openai/chat_json_mode.json")),
        ("llamacpp", false) => json(200, fixture("llamacpp-openai/10-chat.body")),
        ("llamacpp", true) => sse(state, fixture("llamacpp-openai/11-chat-stream.body"), none, None),
        ("status-429", _) => {
            let mut r = json(429, fixture("openai/error_429.json"));
            r.headers_mut().insert("retry-after", "7".parse().unwrap());
            r
        }
        ("status-500", _) => json(500, fixture("openai/error_500.json")),
        ("status-503", _) => json(503, "upstream connect error or disconnect/reset before headers".into()),
        ("status-401", _) => json(401, fixture("openai/error_401.json")),
        ("status-400-context", _) => json(400, fixture("openai/error_400_context.json")),
        ("error-in-200", _) => json(200, fixture("openai/chat_error_in_200.json")),
        ("invalid-json", false) => json(200, "{\"id\": \"x\", \"choices\": [".into()),
        ("invalid-json", true) => sse(state, "data: {this is not json\n\n".into(), none, None),
        ("hang", _) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            json(200, fixture("openai/chat.json"))
        }
        // Stream faults after the stream has begun.
        ("cut", true) => sse(state, fixture("openai/chat_stream.sse"), none, Some(4)),
        ("garbage", true) => {
            let good: String = fixture("openai/chat_stream.sse")
                .split_inclusive("\n\n")
                .take(3)
                .collect();
            sse(state, format!("{good}data: {{this is not json\n\n"), none, None)
        }
        ("stall", true) => {
            let good: String = fixture("openai/chat_stream.sse")
                .split_inclusive("\n\n")
                .take(3)
                .collect();
            let stream = async_stream::stream! {
                yield Ok::<Bytes, Infallible>(Bytes::from(good));
                tokio::time::sleep(Duration::from_secs(60)).await;
            };
            Response::builder()
                .status(200)
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        ("stream-error", true) => sse(state, fixture("openai/chat_stream_error_event.sse"), none, None),
        ("no-done", true) => {
            let text = fixture("openai/chat_stream.sse").replace("data: [DONE]\n\n", "");
            sse(state, text, none, None)
        }
        // A long, slow stream, for cancellation.
        ("slow", true) => {
            let mut text = String::new();
            for i in 0..200 {
                text.push_str(&format!(
                    "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{i} \"}},\"finish_reason\":null}}]}}\n\n"
                ));
            }
            text.push_str("data: [DONE]\n\n");
            sse(state, text, Duration::from_millis(20), None)
        }
        _ => json(
            404,
            format!("{{\"error\":{{\"message\":\"The model `{model}` does not exist\",\"type\":\"invalid_request_error\",\"code\":\"model_not_found\"}}}}"),
        ),
    }
}

/// What model `echo` answers: `You said: ` and the last user message's text.
pub fn echo_text(req: &Value) -> String {
    let last = req["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| &m["content"]);
    let text = match last {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    };
    format!("You said: {text}")
}

fn echo_completion(req: &Value) -> String {
    serde_json::json!({
        "id": "chatcmpl-echo", "object": "chat.completion", "created": 1, "model": "echo",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": echo_text(req)}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
    })
    .to_string()
}

/// The echo as a stream of 3-byte pieces (whole characters), so any
/// bracketed token in it is split across chunks.
fn echo_stream(req: &Value) -> String {
    let text = echo_text(req);
    let chunk = |delta: Value, finish: Value| {
        let c = serde_json::json!({
            "id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": 1, "model": "echo",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        });
        format!("data: {c}\n\n")
    };
    let mut out = chunk(
        serde_json::json!({"role": "assistant", "content": ""}),
        Value::Null,
    );
    let mut piece = String::new();
    for ch in text.chars() {
        piece.push(ch);
        if piece.len() >= 3 {
            out.push_str(&chunk(serde_json::json!({"content": piece}), Value::Null));
            piece.clear();
        }
    }
    if !piece.is_empty() {
        out.push_str(&chunk(serde_json::json!({"content": piece}), Value::Null));
    }
    out.push_str(&chunk(serde_json::json!({}), "stop".into()));
    out.push_str("data: [DONE]\n\n");
    out
}

async fn embeddings(State(state): State<FakeState>, headers: HeaderMap, body: Bytes) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.log.lock().unwrap().push(Recorded {
        path: "/v1/embeddings".into(),
        headers,
        body: v.clone(),
    });
    match v["model"].as_str() {
        Some("status-500") => json(500, fixture("openai/error_500.json")),
        Some("status-429") => json(429, fixture("openai/error_429.json")),
        _ => json(200, fixture("openai/embeddings.json")),
    }
}

pub async fn spawn_fake() -> Fake {
    let state = FakeState::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route(
            "/v1/models",
            axum::routing::get(|| async { json(200, "{\"object\":\"list\",\"data\":[]}".into()) }),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Fake { addr, state }
}

pub const ADMIN_KEY: &str = "test-admin-key";

/// A running gateway (API and admin listeners) and the folder holding its config.
pub struct Gw {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub gw: Arc<promptgate::Gateway>,
    pub reloader: Arc<promptgate::reload::Reloader>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Gw {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }
    /// `POST /admin/reload` with the admin key; returns (status, body).
    pub async fn admin_reload(&self) -> (u16, Value) {
        let r = client()
            .post(self.admin_url("/admin/reload"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }
    pub async fn admin_status(&self) -> Value {
        self.admin_get("/admin/status").await
    }
    /// The JSON of an admin `GET`, with the admin key.
    pub async fn admin_get(&self, path: &str) -> Value {
        client()
            .get(self.admin_url(path))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("promptgate.yaml")
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Routes `fake-<behaviour>` → the fake upstream's model `<behaviour>`, plus the
/// sandbox routes of the shipped config.
pub fn fake_config(fake: &Fake, extra_routes: &str) -> (String, Vec<(String, String)>) {
    let behaviours = [
        "chat",
        "nousage",
        "crlf",
        "tools",
        "json",
        "llamacpp",
        "status-429",
        "status-500",
        "status-503",
        "status-401",
        "status-400-context",
        "error-in-200",
        "invalid-json",
        "hang",
        "cut",
        "garbage",
        "stall",
        "stream-error",
        "no-done",
        "slow",
        "slow-chat",
    ];
    let mut gateway =
        String::from("listen: 127.0.0.1:0\nlimits:\n  max_body_bytes: 65536\nroutes:\n");
    for b in behaviours {
        gateway.push_str(&format!(
            "  fake-{b}:\n    provider: fake\n    model: {b}\n"
        ));
    }
    gateway.push_str("  sandbox-echo:\n    provider: sandbox\n    model: echo\n");
    gateway.push_str("  needs-key:\n    provider: keyless\n    model: x\n");
    gateway.push_str(extra_routes);
    let providers = vec![
        (
            "fake.yaml".to_string(),
            format!(
                "kind: openai\nbase_url: {}\napi_key_env: FAKE_UPSTREAM_KEY\ntimeouts: {{connect: 1s, headers: 1s, idle: 1s, total: 10s}}\n",
                fake.base_url()
            ),
        ),
        (
            "sandbox.yaml".to_string(),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n    cut: {cut_after: 2}\n    overloaded: {fail: {status: 503}}\n".to_string(),
        ),
        (
            "keyless.yaml".to_string(),
            "kind: openai\nbase_url: http://127.0.0.1:9/v1\napi_key_env: PROMPTGATE_TEST_UNSET_KEY\n".to_string(),
        ),
    ];
    (gateway, providers)
}

pub fn write_config(dir: &Path, gateway: &str, providers: &[(String, String)]) {
    std::fs::write(dir.join("promptgate.yaml"), gateway).unwrap();
    std::fs::create_dir_all(dir.join("providers")).unwrap();
    std::fs::create_dir_all(dir.join("prompts")).unwrap();
    for (name, text) in providers {
        std::fs::write(dir.join("providers").join(name), text).unwrap();
    }
}

pub fn test_env(name: &str) -> Option<String> {
    let vars: HashMap<&str, &str> = [
        ("FAKE_UPSTREAM_KEY", FAKE_KEY),
        ("FAKE_UPSTREAM_SECRET", "fake-secret-key-7890"),
    ]
    .into_iter()
    .collect();
    vars.get(name).map(|v| v.to_string())
}

/// Starts a gateway in this process on an ephemeral port.
pub async fn spawn_gateway(gateway: &str, providers: &[(String, String)]) -> Gw {
    spawn_gateway_with_prompts(gateway, providers, &[]).await
}

/// Same, with prompt files (name, text) in its `prompts/` folder.
pub async fn spawn_gateway_with_prompts(
    gateway: &str,
    providers: &[(String, String)],
    prompts: &[(&str, &str)],
) -> Gw {
    let files: Vec<(String, &str)> = prompts
        .iter()
        .map(|(name, text)| (format!("prompts/{name}"), *text))
        .collect();
    let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    spawn_gateway_with_files(gateway, providers, &files).await
}

/// Same, with any files (path relative to the config folder, text), e.g.
/// `prompts/x.yaml`, `retrievers/kb.yaml`.
pub async fn spawn_gateway_with_files(
    gateway: &str,
    providers: &[(String, String)],
    files: &[(&str, &str)],
) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), gateway, providers);
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let path = dir.path().join("promptgate.yaml");
    let (gw, cfg) = match promptgate::load(&path, &test_env) {
        Ok(x) => x,
        Err(p) => panic!("config problems: {p:?}"),
    };
    let router = promptgate::server::router(gw.clone(), promptgate::server_settings(&cfg));
    // The public listener's connection limits (`limits.header_read_timeout`,
    // `write_timeout`, …) come from the config, as in `serve`.
    let limits = promptgate::conn_limits(&cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let env: promptgate::reload::SharedEnv = Arc::new(test_env);
    let reloader = promptgate::reload::Reloader::new(gw.clone(), &path, env);
    let admin = promptgate::admin::router(reloader.clone(), Some(ADMIN_KEY.to_string()));
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin_listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = promptgate::server::serve_with(listener, router, limits, async {
            let _ = rx.await;
        })
        .await;
    });
    tokio::spawn(async move {
        let _ = axum::serve(admin_listener, admin).await;
    });
    Gw {
        addr,
        admin_addr,
        dir,
        gw,
        reloader,
        shutdown: Some(tx),
    }
}

/// A fake upstream and a gateway in front of it.
pub async fn setup() -> (Fake, Gw) {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(&fake, "");
    let gw = spawn_gateway(&g, &p).await;
    (fake, gw)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub fn chat_body(model: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."}
        ]
    })
}

/// Splits an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| ev.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The real `promptgate serve` binary on ephemeral ports, killed on drop.
pub struct GatewayProcess {
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
}

impl GatewayProcess {
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> GatewayProcess {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // PROMPTGATE_TEST_ECHO=1 shows the gateway's log under the test's output.
            let echo = std::env::var_os("PROMPTGATE_TEST_ECHO").is_some();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("gateway: {line}");
                }
                if let Some(rest) = line.split("promptgate listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => GatewayProcess {
                child,
                base: format!("http://{addr}"),
            },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the gateway process did not start");
            }
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GatewayProcess {
    /// Like [`GatewayProcess::start`], with the process's open-file limit set to
    /// `nofile` (through the shell's `ulimit`, then `exec`, so the child is the
    /// gateway itself) and every stderr line kept in `log`.
    pub fn start_limited(
        config: &Path,
        envs: &[(&str, &str)],
        nofile: u32,
        log: Arc<Mutex<Vec<String>>>,
    ) -> GatewayProcess {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n {nofile} && exec \"$0\" serve --config \"$1\" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0"
            ))
            .arg(env!("CARGO_BIN_EXE_promptgate"))
            .arg(config)
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("promptgate listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
                log.lock().unwrap().push(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => GatewayProcess {
                child,
                base: format!("http://{addr}"),
            },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the gateway process did not start");
            }
        }
    }

    /// `host:port` of the public listener.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_owned()
    }

    /// The process's resident memory in KiB (Linux), if readable.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }
}

/// The value of the sample `series` (name and labels exactly as exposed) in
/// Prometheus text.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
