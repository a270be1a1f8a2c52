//! The real `promptgate` binary in front of an upstream that misbehaves on
//! purpose: giant indexes and numbers, endless streams, endless lines, endless
//! bodies, huge headers, a slow drip, wrong content types, a `Retry-After` of
//! 10^18. Each case: the client gets a clean error in its dialect (an HTTP error,
//! or an error event once a stream has begun), the process stays up and keeps
//! answering `/healthz`, and its resident memory stays bounded.
//!
//! The fake speaks raw HTTP/1.1 over TCP so it can break the protocol in ways a
//! framework would not let it.
// Test servers and clients are started freely; the gateway's own tasks go through
// promptgate::task::spawn (clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::GatewayProcess;

/// Per-provider limits the gateway runs with here: small, so the cases end fast.
const MAX_RESPONSE: usize = 1024 * 1024;
const MAX_LINE: usize = 64 * 1024;
/// How much resident memory a case may add to the gateway process.
const RSS_BUDGET_KB: u64 = 96 * 1024;

// === the fake ===

async fn spawn_hostile() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = serve(sock).await;
            });
        }
    });
    addr
}

/// Reads one request (head and `Content-Length` body) and misbehaves according
/// to the `model` it asks for (or, for the Gemini provider, its path).
async fn serve(mut sock: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body: Value = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
    if std::env::var_os("PROMPTGATE_TEST_ECHO").is_some() {
        eprintln!("fake: {path} {body}");
    }
    let stream = body["stream"] == true || path.contains("streamGenerateContent");
    let behaviour = if path.starts_with("/oauth/giant/") {
        "token-giant".to_owned()
    } else if path.starts_with("/oauth/endless/") {
        "endless-body".to_owned()
    } else if path.to_ascii_lowercase().contains("generatecontent") {
        "gemini-retry".to_owned()
    } else if path.starts_with("/drip-health/") {
        "drip-health".to_owned()
    } else if path.starts_with("/endless-health/") {
        "endless-body".to_owned()
    } else {
        body["model"].as_str().unwrap_or("").to_owned()
    };
    behave(&mut sock, &behaviour, stream).await
}

fn head(status: &str, content_type: &str, extra: &str) -> String {
    format!("HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\nconnection: close\r\n{extra}\r\n")
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

fn chunk(index: u64, delta: Value, finish: Value) -> Value {
    json!({"id": "chatcmpl-h", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})
}

const BIG: u64 = 4_294_967_295;

/// Rounds of 3000 empty deltas (about 150 KB) the `empty-flood` fake sends
/// before its output: 200 rounds are 600,000 events, about 30 MB on the wire.
const FLOOD_ROUNDS: usize = 200;

async fn behave(sock: &mut TcpStream, behaviour: &str, stream: bool) -> std::io::Result<()> {
    match (behaviour, stream) {
        ("giant-index", true) => {
            let mut out = head("200 OK", "text/event-stream", "");
            out += &sse(&chunk(
                BIG,
                json!({"role": "assistant", "content": "big"}),
                Value::Null,
            ));
            out += &sse(&chunk(
                BIG,
                json!({"tool_calls": [{"index": BIG, "id": "call_1", "type": "function",
                                         "function": {"name": "f", "arguments": "{}"}}]}),
                Value::Null,
            ));
            out += &sse(&chunk(BIG, json!({}), json!("stop")));
            out += &sse(
                &json!({"id": "chatcmpl-h", "object": "chat.completion.chunk", "created": 1,
                "model": "m", "choices": [],
                "usage": {"prompt_tokens": BIG, "completion_tokens": BIG, "total_tokens": BIG}}),
            );
            out += "data: [DONE]\n\n";
            sock.write_all(out.as_bytes()).await
        }
        ("giant-index", false) | ("giant-numbers", _) => {
            let body = json!({"id": "chatcmpl-h", "object": "chat.completion",
                "created": u64::MAX, "model": "m",
                "choices": [{"index": BIG, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "big",
                        "tool_calls": [{"index": BIG, "id": "call_1", "type": "function",
                            "function": {"name": "f", "arguments": "{}"}}]}}],
                "usage": {"prompt_tokens": BIG, "completion_tokens": BIG, "total_tokens": BIG}});
            let text = body.to_string();
            let mut out = head(
                "200 OK",
                "application/json",
                &format!("content-length: {}\r\n", text.len()),
            );
            out += &text;
            sock.write_all(out.as_bytes()).await
        }
        ("float-numbers", _) => {
            let text = r#"{"id":"x","object":"chat.completion","created":1e300,"model":"m","choices":[{"index":1e300,"finish_reason":"stop","message":{"role":"assistant","content":"x"}}],"usage":{"prompt_tokens":-1,"completion_tokens":1e20,"total_tokens":1e400}}"#;
            let mut out = head(
                "200 OK",
                "application/json",
                &format!("content-length: {}\r\n", text.len()),
            );
            out += text;
            sock.write_all(out.as_bytes()).await
        }
        ("endless-stream", _) => {
            let mut first = head("200 OK", "text/event-stream", "");
            first += &sse(&chunk(
                0,
                json!({"role": "assistant", "content": "go"}),
                Value::Null,
            ));
            sock.write_all(first.as_bytes()).await?;
            let piece = sse(&chunk(0, json!({"content": "x".repeat(200)}), Value::Null)).repeat(20);
            loop {
                sock.write_all(piece.as_bytes()).await?;
            }
        }
        ("empty-flood", true) => {
            // Before any output, a flood of deltas that carry nothing: no fields,
            // a repeated role, empty content. Each is a few dozen bytes on the
            // wire; then one word, the finish and the end.
            let mut first = head("200 OK", "text/event-stream", "");
            first += &sse(&chunk(
                0,
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ));
            sock.write_all(first.as_bytes()).await?;
            let empties = [
                "data: {\"choices\":[{\"index\":0,\"delta\":{}}]}\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"}}]}\n\n",
            ];
            let piece: String = empties.concat().repeat(1000);
            for _ in 0..FLOOD_ROUNDS {
                sock.write_all(piece.as_bytes()).await?;
            }
            let mut last = sse(&chunk(0, json!({"content": "flood-over"}), Value::Null));
            last += &sse(&chunk(0, json!({}), json!("stop")));
            // Usage reported, so no tokenizer is loaded to estimate it (its
            // tables would dwarf what is measured here).
            last += &sse(
                &json!({"id": "chatcmpl-h", "object": "chat.completion.chunk",
                "created": 1, "model": "m", "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
            );
            last += "data: [DONE]\n\n";
            sock.write_all(last.as_bytes()).await
        }
        ("endless-pings", _) => {
            // Keep-alive comments only, as fast as the socket takes them.
            sock.write_all(head("200 OK", "text/event-stream", "").as_bytes())
                .await?;
            let piece = ": ping\n\n".repeat(2000);
            loop {
                sock.write_all(piece.as_bytes()).await?;
            }
        }
        ("endless-line", _) => {
            let mut out = head("200 OK", "text/event-stream", "");
            out += "data: {\"id\":\"";
            sock.write_all(out.as_bytes()).await?;
            let piece = vec![b'a'; 16 * 1024];
            loop {
                sock.write_all(&piece).await?;
            }
        }
        ("endless-line-after-output", _) => {
            let mut out = head("200 OK", "text/event-stream", "");
            out += &sse(&chunk(
                0,
                json!({"role": "assistant", "content": "go"}),
                Value::Null,
            ));
            out += "data: {\"id\":\"";
            sock.write_all(out.as_bytes()).await?;
            let piece = vec![b'a'; 16 * 1024];
            loop {
                sock.write_all(&piece).await?;
            }
        }
        ("endless-body", _) => {
            // A JSON answer to either kind of request, with no length and no end.
            let mut out = head("200 OK", "application/json", "");
            out += "{\"id\":\"x\",\"choices\":[{\"message\":{\"content\":\"";
            sock.write_all(out.as_bytes()).await?;
            let piece = vec![b'a'; 16 * 1024];
            loop {
                sock.write_all(&piece).await?;
            }
        }
        ("huge-length", _) => {
            let mut out = head(
                "200 OK",
                "application/json",
                "content-length: 1000000000000000\r\n",
            );
            out += "{\"id\":\"x\",";
            sock.write_all(out.as_bytes()).await?;
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        }
        ("huge-headers", _) => {
            let mut extra = String::new();
            for i in 0..4000 {
                extra += &format!("x-junk-{i}: {}\r\n", "j".repeat(512));
            }
            let out = head("200 OK", "application/json", &extra);
            sock.write_all(out.as_bytes()).await?;
            sock.write_all(b"{}").await
        }
        ("huge-header-value", _) => {
            let extra = format!("x-junk: {}\r\n", "j".repeat(4 * 1024 * 1024));
            let out = head("200 OK", "application/json", &extra);
            sock.write_all(out.as_bytes()).await?;
            sock.write_all(b"{}").await
        }
        ("slow-drip", _) => {
            // One good chunk, then a byte every 100 ms: never idle long enough for
            // the idle timeout, never a whole frame.
            let mut out = head("200 OK", "text/event-stream", "");
            out += &sse(&chunk(
                0,
                json!({"role": "assistant", "content": "drip"}),
                Value::Null,
            ));
            out += "data: {\"choices\":[";
            sock.write_all(out.as_bytes()).await?;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                sock.write_all(b" ").await?;
            }
        }
        ("drip-health", _) => {
            // Headers at once, then a body that never ends, a byte at a time.
            let out = head("200 OK", "application/json", "");
            sock.write_all(out.as_bytes()).await?;
            sock.write_all(b"{\"data\":[").await?;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                sock.write_all(b" ").await?;
            }
        }
        ("token-giant", _) => {
            let text = r#"{"access_token":"tok-giant","expires_in":18446744073709551615}"#;
            let mut out = head(
                "200 OK",
                "application/json",
                &format!("content-length: {}\r\n", text.len()),
            );
            out += text;
            sock.write_all(out.as_bytes()).await
        }
        ("html", _) => {
            let text = "<html><body><h1>502 Bad Gateway</h1>\n\n<p>nginx</p></body></html>\n";
            let mut out = head(
                "200 OK",
                "text/html",
                &format!("content-length: {}\r\n", text.len()),
            );
            out += text;
            sock.write_all(out.as_bytes()).await
        }
        ("retry-after", _) => {
            let text = r#"{"error":{"message":"slow down","type":"rate_limit_error","code":"rate_limit_exceeded"}}"#;
            let mut out = head(
                "429 Too Many Requests",
                "application/json",
                &format!(
                    "retry-after: 1000000000000000000\r\ncontent-length: {}\r\n",
                    text.len()
                ),
            );
            out += text;
            sock.write_all(out.as_bytes()).await
        }
        ("gemini-retry", _) => {
            let text = r#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"1e30s"}]}}"#;
            let mut out = head(
                "429 Too Many Requests",
                "application/json",
                &format!("content-length: {}\r\n", text.len()),
            );
            out += text;
            sock.write_all(out.as_bytes()).await
        }
        _ => {
            let text = json!({"id": "chatcmpl-ok", "object": "chat.completion", "created": 1,
                "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "fine"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
            .to_string();
            let mut out = head(
                "200 OK",
                "application/json",
                &format!("content-length: {}\r\n", text.len()),
            );
            out += &text;
            sock.write_all(out.as_bytes()).await
        }
    }
}

// === the gateway ===

const BEHAVIOURS: &[&str] = &[
    "ok",
    "giant-index",
    "giant-numbers",
    "float-numbers",
    "endless-stream",
    "endless-pings",
    "endless-line",
    "endless-line-after-output",
    "endless-body",
    "huge-length",
    "huge-headers",
    "huge-header-value",
    "slow-drip",
    "html",
];

struct Setup {
    gw: GatewayProcess,
    _dir: tempfile::TempDir,
}

/// Qianfan v1 providers whose token endpoint answers a lifetime of 2^64-1
/// seconds (`qgiant`), or a body that never ends (`qendless`).
fn token_providers(addr: SocketAddr) -> [(String, String); 2] {
    ["giant", "endless"].map(|t| {
        (
            format!("q{t}.yaml"),
            format!(
                "kind: qianfan\nbase_url: http://{addr}/rpc/2.0/ai_custom/v1/wenxinworkshop\n\
                 api_key_env: HOSTILE_KEY\nqianfan:\n  secret_key_env: HOSTILE_KEY\n  \
                 token_url: http://{addr}/oauth/{t}/token\n\
                 timeouts: {{connect: 1s, headers: 2s, idle: 1s, total: 3s}}\n"
            ),
        )
    })
}

/// Providers whose active health check answers with a body that never ends:
/// `hdrip` slowly (only the check's timeout ends it), `hflood` as fast as it can.
fn health_providers(addr: SocketAddr) -> [(String, String); 2] {
    let check = "health_check: {interval: 200ms, timeout: 500ms}\n";
    [
        (
            "hdrip.yaml".into(),
            format!("kind: openai\nbase_url: http://{addr}/drip-health/v1\nauth: none\n{check}"),
        ),
        (
            "hflood.yaml".into(),
            format!("kind: openai\nbase_url: http://{addr}/endless-health/v1\nauth: none\n{check}"),
        ),
    ]
}

async fn setup() -> Setup {
    let addr = spawn_hostile().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = String::from("listen: 127.0.0.1:0\nroutes:\n");
    for b in BEHAVIOURS {
        gateway +=
            &format!("  h-{b}:\n    provider: hostile\n    model: {b}\n    cache: {{mode: on}}\n");
    }
    gateway += "  h-retry-after:\n    provider: hostile\n    model: retry-after\n    \
                retry: {max_attempts: 3, backoff: 10ms, max_backoff: 50ms, deadline: 5s}\n";
    gateway += "  h-empty-flood:\n    provider: hwide\n    model: empty-flood\n";
    gateway += "  h-qgiant:\n    provider: qgiant\n    model: ernie-speed\n";
    gateway += "  h-qendless:\n    provider: qendless\n    model: ernie-speed\n";
    gateway += "  h-gemini:\n    provider: gem\n    model: gemini-2.5-flash\n    \
                retry: {max_attempts: 3, backoff: 10ms, max_backoff: 50ms, deadline: 5s}\n";
    let limits = format!("max_response_bytes: {MAX_RESPONSE}\nmax_line_bytes: {MAX_LINE}\n");
    let providers = [
        (
            "hostile.yaml",
            format!(
                "kind: openai\nbase_url: http://{addr}/v1\nauth: none\n\
                 timeouts: {{connect: 1s, headers: 2s, idle: 1s, total: 3s}}\n{limits}"
            ),
        ),
        (
            // The default response limit (64 MiB), where a flood of empty deltas
            // fits many times over.
            "hwide.yaml",
            format!(
                "kind: openai\nbase_url: http://{addr}/v1\nauth: none\n\
                 timeouts: {{connect: 1s, headers: 5s, idle: 5s, total: 60s}}\n\
                 max_response_bytes: 67108864\nmax_line_bytes: {MAX_LINE}\n"
            ),
        ),
        (
            "gem.yaml",
            format!(
                "kind: gemini\nbase_url: http://{addr}/v1beta\napi_key_env: HOSTILE_KEY\n\
                 timeouts: {{connect: 1s, headers: 2s, idle: 1s, total: 3s}}\n{limits}"
            ),
        ),
    ];
    let providers: Vec<(String, String)> = providers
        .into_iter()
        .map(|(a, b)| (a.to_string(), b))
        .chain(health_providers(addr))
        .chain(token_providers(addr))
        .collect();
    common::write_config(dir.path(), &gateway, &providers);
    let gw = GatewayProcess::start(
        &dir.path().join("promptgate.yaml"),
        &[("HOSTILE_KEY", "k-hostile")],
    );
    let s = Setup { gw, _dir: dir };
    // Warm up: one ordinary answer, so the baseline includes a used connection pool.
    let (status, _, _) = s.chat("h-ok", false, "req-warm").await;
    assert_eq!(status, 200);
    s
}

fn rss_kb(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The peak resident memory of a process so far (`VmHWM`), in KB: what a
/// buffer that grew and was freed again still shows.
fn peak_rss_kb(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gw.base)
    }

    /// (status, headers, body) of one chat call; the body is read to its end.
    async fn chat(
        &self,
        model: &str,
        stream: bool,
        request_id: &str,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        self.call("/v1/chat/completions", model, stream, request_id)
            .await
    }

    async fn call(
        &self,
        path: &str,
        model: &str,
        stream: bool,
        request_id: &str,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let body = json!({"model": model, "stream": stream, "max_tokens": 64,
                          "messages": [{"role": "user", "content": "hi"}]});
        let resp = common::client()
            .post(self.url(path))
            .header("x-request-id", request_id)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (status, headers, text)
    }

    /// The process is alive and `/healthz` answers at once.
    async fn assert_alive(&self) {
        assert!(
            self.gw.child.id() > 0
                && std::fs::metadata(format!("/proc/{}", self.gw.child.id())).is_ok(),
            "the gateway process is gone"
        );
        let started = Instant::now();
        let resp = common::client()
            .get(self.url("/healthz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .expect("/healthz did not answer");
        assert_eq!(resp.status(), 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "/healthz took {:?}",
            started.elapsed()
        );
    }

    /// RSS grew by less than the budget since `base` (KB).
    fn assert_rss_within(&self, base: u64) {
        let now = self.rss();
        assert!(now < base + RSS_BUDGET_KB, "RSS {base} KB -> {now} KB");
    }

    fn rss(&self) -> u64 {
        rss_kb(self.gw.child.id())
    }
}

/// An OpenAI error body with the request id.
fn assert_openai_error(body: &str, request_id: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert!(v["error"]["message"].is_string(), "{body}");
    assert!(v["error"]["code"].is_string(), "{body}");
    assert_eq!(v["error"]["request_id"], request_id, "{body}");
    v
}

/// The data payloads of an SSE body.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned)
        })
        .collect()
}

/// A stream that began and then failed: its last event is an OpenAI error with
/// `code` (and the request id), and there is no `[DONE]`.
fn assert_stream_error(body: &str, code: &str, request_id: &str) {
    let evs = events(body);
    assert!(!evs.iter().any(|e| e == "[DONE]"), "{body:.400}");
    let last = evs
        .last()
        .unwrap_or_else(|| panic!("no events: {body:.400}"));
    let v: Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["error"]["code"], code, "{last}");
    assert_eq!(v["error"]["request_id"], request_id, "{last}");
}

/// Either a clean HTTP error with `code`, or a begun stream ending in an error
/// event with `code`.
fn assert_failed_cleanly(status: u16, body: &str, code: &str, request_id: &str) {
    if status == 200 {
        assert_stream_error(body, code, request_id);
    } else {
        let v = assert_openai_error(body, request_id);
        assert_eq!(v["error"]["code"], code, "{body}");
    }
}

// === the cases ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giant_indexes_and_numbers_do_not_take_the_process_down() {
    let s = setup().await;
    let base = s.rss();
    for round in 0..2 {
        // A stream whose choice and tool-call index is 2^32-1 and whose usage
        // would overflow a u32 sum; twice. Decoders accept choice indexes below
        // 64: the answer is a clean malformed_response, never an allocation.
        let id = format!("req-giant-s{round}");
        let (status, _, body) = s.chat("h-giant-index", true, &id).await;
        let evs = events(&body);
        if status == 200 && evs.last().map(String::as_str) == Some("[DONE]") {
            // The second round may be a replay of the non-streaming answer the
            // cache kept: complete, with the index passed through, not sized.
            assert!(body.contains("big"), "{body}");
        } else {
            assert_failed_cleanly(status, &body, "malformed_response", &id);
        }
        let id = format!("req-giant-j{round}");
        let (status, _, body) = s.chat("h-giant-index", false, &id).await;
        if status == 200 {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["choices"][0]["message"]["content"], "big", "{body}");
        } else {
            assert_failed_cleanly(status, &body, "malformed_response", &id);
        }
        let (status, _, body) = s.chat("h-giant-numbers", true, "req-giant-n").await;
        assert!(status == 200 || status == 502, "{status} {body}");
        if status == 502 {
            assert_openai_error(&body, "req-giant-n");
        }
        // The Anthropic front door, streaming the same answer.
        let id = format!("req-giant-a{round}");
        let (status, _, body) = s.call("/v1/messages", "h-giant-index", true, &id).await;
        if status == 200 {
            assert!(
                body.contains("event: message_stop") || body.contains("event: error"),
                "{body}"
            );
        } else {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(status, 502, "{body}");
            assert_eq!(v["type"], "error", "{body}");
        }
        s.assert_alive().await;
    }
    // Numbers JSON allows but no integer type holds.
    for stream in [false, true] {
        let (status, _, body) = s.chat("h-float-numbers", stream, "req-float").await;
        assert_failed_cleanly(status, &body, "malformed_response", "req-float");
    }
    s.assert_alive().await;
    s.assert_rss_within(base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_empty_deltas_before_output_is_not_buffered() {
    let s = setup().await;
    let pid = s.gw.child.id();
    let base = peak_rss_kb(pid);
    for i in 0..2 {
        let id = format!("req-empty-flood-{i}");
        let started = Instant::now();
        let (status, _, body) = s.chat("h-empty-flood", true, &id).await;
        assert_eq!(status, 200, "{body:.400}");
        let evs = events(&body);
        assert_eq!(
            evs.last().map(String::as_str),
            Some("[DONE]"),
            "{body:.400}"
        );
        assert!(body.contains("flood-over"), "{body:.400}");
        // The empties are not relayed one by one either.
        assert!(evs.len() < 16, "{} events", evs.len());
        assert!(started.elapsed() < Duration::from_secs(30));
        s.assert_alive().await;
    }
    // Held until the first output, 600,000 events would take tens of MB; the
    // peak, not only what is resident afterwards, must stay small.
    let peak = peak_rss_kb(pid);
    assert!(peak < base + 24 * 1024, "peak RSS {base} KB -> {peak} KB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_stream_ends_at_max_response_bytes_with_an_error_event() {
    let s = setup().await;
    let base = s.rss();
    for i in 0..3 {
        let id = format!("req-endless-{i}");
        let started = Instant::now();
        let (status, _, body) = s.chat("h-endless-stream", true, &id).await;
        assert_eq!(status, 200);
        assert!(body.len() < 2 * MAX_RESPONSE, "{} bytes", body.len());
        assert_stream_error(&body, "malformed_response", &id);
        assert!(body.contains("limit"), "{:.300}", &body[body.len() - 300..]);
        assert!(started.elapsed() < Duration::from_secs(10));
        // The same answer for a non-streaming request: it is read whole, so it is
        // bounded the same way.
        let (status, _, body) = s.chat("h-endless-stream", false, &id).await;
        assert_eq!(status, 502, "{body}");
        let v = assert_openai_error(&body, &id);
        assert_eq!(v["error"]["code"], "malformed_response");
        s.assert_alive().await;
    }
    s.assert_rss_within(base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_lines_and_bodies_end_as_malformed_response() {
    let s = setup().await;
    let base = s.rss();
    for (model, stream) in [
        ("h-endless-pings", true),
        ("h-endless-line", true),
        ("h-endless-line-after-output", true),
        ("h-endless-body", false),
        ("h-endless-body", true),
        ("h-huge-length", false),
        ("h-huge-length", true),
    ] {
        let id = format!("req-{model}-{stream}");
        let started = Instant::now();
        let (status, _, body) = s.chat(model, stream, &id).await;
        assert_failed_cleanly(status, &body, "malformed_response", &id);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{model}: {:?}",
            started.elapsed()
        );
        if model == "h-endless-line-after-output" {
            assert_eq!(status, 200, "the stream began before the line");
        }
        s.assert_alive().await;
    }
    s.assert_rss_within(base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_headers_and_wrong_content_types_are_clean_errors() {
    let s = setup().await;
    let base = s.rss();
    for (model, stream) in [
        ("h-huge-headers", false),
        ("h-huge-headers", true),
        ("h-huge-header-value", false),
        ("h-html", false),
        ("h-html", true),
    ] {
        let id = format!("req-{model}-{stream}");
        let (status, _, body) = s.chat(model, stream, &id).await;
        assert!(status >= 500, "{model}: {status} {body}");
        let v = assert_openai_error(&body, &id);
        let code = v["error"]["code"].as_str().unwrap();
        assert!(
            ["malformed_response", "connect"].contains(&code),
            "{model}: {body}"
        );
        s.assert_alive().await;
    }
    // The Anthropic front door answers in its own dialect.
    let (status, _, body) = s
        .call("/v1/messages", "h-html", false, "req-anthropic-html")
        .await;
    assert_eq!(status, 502, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "error", "{body}");
    assert!(v["error"]["message"].is_string(), "{body}");
    assert!(body.contains("req-anthropic-html"), "{body}");
    s.assert_alive().await;
    s.assert_rss_within(base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_drip_ends_at_the_total_timeout() {
    let s = setup().await;
    let started = Instant::now();
    let (status, _, body) = s.chat("h-slow-drip", true, "req-drip").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("drip"), "{body}");
    assert_stream_error(&body, "timeout", "req-drip");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "{took:?}");
    s.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_ten_to_the_eighteen_is_capped() {
    let s = setup().await;
    for (route, id) in [("h-retry-after", "req-ra-1"), ("h-gemini", "req-ra-2")] {
        for stream in [false, true] {
            let started = Instant::now();
            let (status, headers, body) = s.chat(route, stream, id).await;
            assert_eq!(status, 429, "{route}: {body}");
            let v = assert_openai_error(&body, id);
            assert_eq!(v["error"]["code"], "rate_limited", "{body}");
            // Too long to wait within the route's deadline: answered at once.
            assert!(started.elapsed() < Duration::from_secs(3));
            if let Some(ra) = headers.get("retry-after") {
                let secs: u64 = ra.to_str().unwrap().parse().unwrap();
                assert!(secs <= 3600, "Retry-After {secs}");
            }
        }
        s.assert_alive().await;
    }
    let ra = s
        .chat("h-retry-after", false, "req-ra-3")
        .await
        .1
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(ra.as_deref(), Some("3600"));
}

#[test]
fn provider_limits_and_health_timeout_are_read_and_validated() {
    let dir = tempfile::tempdir().unwrap();
    let write = |provider: &str| {
        common::write_config(
            dir.path(),
            "routes: {}\n",
            &[("p.yaml".to_string(), provider.to_string())],
        );
        promptgate::config::load(&dir.path().join("promptgate.yaml"))
    };
    let cfg = write("kind: openai\nbase_url: http://127.0.0.1:1/v1\n").unwrap();
    let p = &cfg.providers["p"];
    assert_eq!(
        p.limits,
        promptgate::backend::transport::ResponseLimits::default()
    );
    assert_eq!(p.limits.max_response_bytes, 64 * 1024 * 1024);
    assert_eq!(p.limits.max_line_bytes, 8 * 1024 * 1024);
    assert_eq!(p.timeouts.health, Duration::from_secs(10));

    let cfg = write(
        "kind: openai\nbase_url: http://127.0.0.1:1/v1\nmax_response_bytes: 2048\n\
         max_line_bytes: 1024\nhealth_check: {interval: 5s, timeout: 750ms}\n",
    )
    .unwrap();
    let p = &cfg.providers["p"];
    assert_eq!(p.limits.max_response_bytes, 2048);
    assert_eq!(p.limits.max_line_bytes, 1024);
    assert_eq!(p.timeouts.health, Duration::from_millis(750));
    assert_eq!(p.health_check, Some(Duration::from_secs(5)));

    let problems = write(
        "kind: openai\nbase_url: http://127.0.0.1:1/v1\nmax_response_bytes: 0\n\
         max_line_bytes: 10\nhealth_check: {interval: 5s, timeout: 0s}\n",
    )
    .unwrap_err();
    let text = format!("{problems:?}");
    for field in [
        "max_response_bytes",
        "max_line_bytes",
        "health_check.timeout",
    ] {
        assert!(problems.iter().any(|p| p.field == field), "{field}: {text}");
    }
}

fn counter(metrics: &str, name: &str, labels: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_end_at_their_timeout_and_read_little() {
    let s = setup().await;
    let base = s.rss();
    let started = Instant::now();
    let (mut drip_failed, mut flood_ok) = (0, 0);
    while started.elapsed() < Duration::from_secs(10) && (drip_failed < 2 || flood_ok < 2) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let text = common::client()
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        drip_failed = counter(
            &text,
            "promptgate_health_checks_total",
            r#"provider="hdrip",result="failed""#,
        );
        flood_ok = counter(
            &text,
            "promptgate_health_checks_total",
            r#"provider="hflood",result="ok""#,
        );
    }
    assert!(drip_failed >= 2, "the dripping check never timed out");
    assert!(flood_ok >= 2, "the flooding check never finished");
    s.assert_alive().await;
    s.assert_rss_within(base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_token_endpoints_are_clean_errors() {
    let s = setup().await;
    let base = s.rss();
    // A token that lives 2^64-1 seconds: used (capped), not an overflow.
    let (status, _, body) = s.chat("h-qgiant", false, "req-token-giant").await;
    assert_ne!(status, 500, "{body}");
    if status != 200 {
        assert_openai_error(&body, "req-token-giant");
    }
    // A token reply that never ends: an auth failure, at once.
    let started = Instant::now();
    let (status, _, body) = s.chat("h-qendless", false, "req-token-endless").await;
    assert_eq!(status, 502, "{body}");
    let v = assert_openai_error(&body, "req-token-endless");
    assert_eq!(v["error"]["code"], "malformed_response", "{body}");
    assert!(started.elapsed() < Duration::from_secs(3));
    s.assert_alive().await;
    s.assert_rss_within(base);
}
