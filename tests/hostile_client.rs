//! Hostile clients against the real binary: every input that once cost the
//! process (huge sizes, tokenizer bombs, slowloris and idle sockets, random
//! prompt ids, forged log lines, huge token limits, bad bodies), run under a
//! small open-file limit while a probe checks that `/healthz` keeps answering
//! fast, the process stays up, its memory stays bounded and `/metrics` small.
//! Plus the limits that need their own process or gateway: bounded shutdown,
//! streams counted by `max_concurrency`, ids kept out of error bodies.
// Test servers and clients are started freely; the gateway's own tasks go through
// promptgate::task::spawn (clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const SANDBOX: &str = "kind: sandbox
sandbox:
  models:
    echo:
      chunk_chars: 65536
      embedding_dims: 16
    slow:
      chunk_delay: 400ms
";

const SANDBOX_SMALL_WINDOW: &str = "kind: sandbox
capabilities: {context_window: 1000}
sandbox:
  models:
    echo: {}
";

const PROMPT: &str = "versions:
  1:
    route: echo
    messages:
      - role: user
        content: \"{{ question }}\"
variables:
  question: {type: string}
labels: {production: 1}
";

/// The tests of this file run one at a time: the probe's latency must measure
/// the gateway under its hostile load, not the other tests' gateways.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn write_hostile_config(dir: &std::path::Path, limits: &str) {
    common::write_config(
        dir,
        &format!(
            "limits:\n{limits}\nroutes:\n  echo: {{provider: sb, model: echo}}\n  slow: {{provider: sb, model: slow}}\n  small: {{provider: sbw, model: echo}}\n"
        ),
        &[
            ("sb.yaml".into(), SANDBOX.into()),
            ("sbw.yaml".into(), SANDBOX_SMALL_WINDOW.into()),
        ],
    );
    std::fs::write(dir.join("prompts/p.yaml"), PROMPT).unwrap();
}

/// One `GET /healthz` on a fresh connection; its time, or `None` if it failed.
fn probe(addr: &str) -> Option<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let ok = out.starts_with(b"HTTP/1.1 200");
    ok.then(|| start.elapsed())
}

struct Watch {
    worst: Duration,
    /// Probes over 50 ms.
    slow: usize,
    failures: usize,
    probes: usize,
    max_rss_kib: u64,
}

async fn post(client: &reqwest::Client, url: String, body: Vec<u8>) -> (u16, String) {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// A POST on a fresh connection that keeps reading the answer even if the
/// gateway stops reading the body part way.
fn raw_post(addr: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut w = s.try_clone().unwrap();
    let body = body.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w
            .write_all(head.as_bytes())
            .and_then(|_| w.write_all(&body));
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    // Read until the whole response is in (or the connection ends).
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&out);
        if let Some((h, b)) = text.split_once("\r\n\r\n") {
            let len = h
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|n| b.len() >= n) {
                break;
            }
        }
    }
    drop(s);
    let _ = writer.join();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn error_of(body: &str) -> Value {
    serde_json::from_str::<Value>(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:.300}"))
        ["error"]
        .clone()
}

#[test]
fn hostile_clients_cannot_take_the_gateway_down() {
    let _serial = SERIAL.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    write_hostile_config(
        dir.path(),
        "  max_connections: 128\n  header_read_timeout: 2s\n  idle_timeout: 2s\n  shutdown_grace: 1s",
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    let gw = common::GatewayProcess::start_limited(
        &dir.path().join("promptgate.yaml"),
        &[],
        256,
        log.clone(),
    );
    let addr = gw.addr();
    let base = gw.base.clone();

    // The probe: /healthz on a fresh connection every 25 ms, plus the RSS.
    let stop = Arc::new(AtomicBool::new(false));
    let watch = {
        let (stop, addr) = (stop.clone(), addr.clone());
        let pid = gw.child.id();
        std::thread::spawn(move || {
            let mut w = Watch {
                worst: Duration::ZERO,
                slow: 0,
                failures: 0,
                probes: 0,
                max_rss_kib: 0,
            };
            while !stop.load(Ordering::Relaxed) {
                match probe(&addr) {
                    Some(t) => {
                        if t > Duration::from_millis(50) {
                            w.slow += 1;
                        }
                        w.worst = w.worst.max(t)
                    }
                    None => w.failures += 1,
                }
                w.probes += 1;
                let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("VmRSS:"))
                            .and_then(|v| v.split_whitespace().next())
                            .and_then(|v| v.parse::<u64>().ok())
                    })
                    .unwrap_or(0);
                w.max_rss_kib = w.max_rss_kib.max(rss);
                std::thread::sleep(Duration::from_millis(25));
            }
            w
        })
    };

    // 300 idle sockets and 20 slowloris ones (a header byte every 300 ms), held
    // while everything else runs.
    let mut idle: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    let slowloris_stop = Arc::new(AtomicBool::new(false));
    let slowloris = {
        let (addr, stop) = (addr.clone(), slowloris_stop.clone());
        std::thread::spawn(move || {
            let mut socks: Vec<TcpStream> = (0..20)
                .filter_map(|_| TcpStream::connect(&addr).ok())
                .collect();
            for s in &mut socks {
                let _ = s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\n");
            }
            let mut closed_by_server = 0;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && !socks.is_empty() {
                socks.retain_mut(|s| {
                    let alive = s.write_all(format!("x-drip-{i}: y\r\n").as_bytes()).is_ok();
                    if !alive {
                        closed_by_server += 1;
                    }
                    alive
                });
                i += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            closed_by_server
        })
    };

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = common::client();
        let chat = format!("{base}/v1/chat/completions");

        // Sizes past their documented bounds: a precise 400, nothing allocated.
        let (status, body) = post(
            &client,
            format!("{base}/v1/embeddings"),
            json!({"model": "echo", "input": "hi", "dimensions": 4294967295u64})
                .to_string()
                .into_bytes(),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error_of(&body)["param"], "dimensions");
        assert!(error_of(&body)["request_id"].as_str().is_some_and(|s| !s.is_empty()));
        // Within the bound but past the model's size: the backend's own 400.
        let (status, body) = post(
            &client,
            format!("{base}/v1/embeddings"),
            json!({"model": "echo", "input": "hi", "dimensions": 16000})
                .to_string()
                .into_bytes(),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        for (field, value) in [("n", json!(4294967295u64)), ("n", json!(0)), ("top_logprobs", json!(1000))] {
            let mut b = json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]});
            b[field] = value;
            let (status, body) = post(&client, chat.clone(), b.to_string().into_bytes()).await;
            assert_eq!(status, 400, "{field}: {body}");
            assert_eq!(error_of(&body)["param"], field);
        }

        // A huge output limit must not wrap the context-window arithmetic.
        let (status, body) = post(
            &client,
            chat.clone(),
            json!({"model": "small", "max_tokens": 4294967290u64, "messages": [{"role": "user", "content": "hi"}]})
                .to_string()
                .into_bytes(),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error_of(&body)["code"], "context_length_exceeded");

        // Tokenizer bombs: a million spaces and a 3.9 MB single word, streamed
        // and not; each answers, and every stream ends with usage and [DONE].
        let spaces = " ".repeat(1_000_000);
        let word = "a".repeat(3_900_000);
        for text in [&spaces, &word] {
            for stream in [false, true] {
                let b = json!({"model": "echo", "stream": stream,
                    "stream_options": {"include_usage": true},
                    "messages": [{"role": "user", "content": text}]});
                let (status, body) = post(&client, chat.clone(), b.to_string().into_bytes()).await;
                assert_eq!(status, 200, "{body:.300}");
                if stream {
                    let data = common::sse_data(&body);
                    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{:.300}", body);
                    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
                    assert!(usage["usage"]["prompt_tokens"].as_u64().unwrap() > 1000);
                } else {
                    let v: Value = serde_json::from_str(&body).unwrap();
                    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 1000);
                }
            }
        }

        // Oversize and malformed bodies.
        // (Raw: the gateway answers before the client has sent it all.)
        let (status, body) = {
            let addr = addr.clone();
            tokio::task::spawn_blocking(move || raw_post(&addr, "/v1/chat/completions", &vec![b' '; 5 * 1024 * 1024]))
                .await
                .unwrap()
        };
        assert_eq!(status, 413, "{body:.300}");
        assert_eq!(error_of(&body)["code"], "payload_too_large");
        for bad in [&b"{"[..], b"[]", b"{\"model\": 1}", b"\xff\xfe", b"{\"model\":\"echo\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"n\":1e400}"] {
            let (status, body) = post(&client, chat.clone(), bad.to_vec()).await;
            assert_eq!(status, 400, "{body:.300}");
            assert!(error_of(&body)["request_id"].is_string());
        }

        // A model with newlines must not forge log lines.
        let (status, body) = post(
            &client,
            chat.clone(),
            json!({"model": "nope\nFORGED level=error gateway compromised", "messages": [{"role": "user", "content": "hi"}]})
                .to_string()
                .into_bytes(),
        )
        .await;
        assert_eq!(status, 404, "{body}");

        // 20,000 random prompt ids, 2 at a time.
        let ids = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let (client, base, ids) = (client.clone(), base.clone(), ids.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = ids.fetch_add(1, Ordering::Relaxed);
                    if i >= 20_000 {
                        return;
                    }
                    let r = client
                        .post(format!("{base}/v1/prompts/random-{i:x}-{}/chat/completions", i * 7919))
                        .json(&json!({"variables": {"question": "q"}}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 404);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let metrics = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.len() < 64 * 1024, "/metrics is {} bytes", metrics.len());
        let series = metrics
            .lines()
            .filter(|l| l.starts_with("promptgate_prompt_errors_total{"))
            .count();
        assert!(series <= 1, "{series} prompt error series");
        assert!(metrics.contains("promptgate_prompt_errors_total{prompt=\"unknown\"} 20000"));
    });

    // The slowloris sockets were cut by the header-read timeout.
    slowloris_stop.store(true, Ordering::Relaxed);
    let cut = slowloris.join().unwrap();
    // The idle sockets were closed: evicted for new connections or timed out.
    std::thread::sleep(Duration::from_millis(2500));
    let mut closed = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    idle.clear();
    stop.store(true, Ordering::Relaxed);
    let w = watch.join().unwrap();
    let mut gw = gw;
    assert!(gw.child.try_wait().unwrap().is_none(), "the gateway died");
    assert!(probe(&addr).is_some(), "/healthz after the storm");
    let log = log.lock().unwrap().join("\n");
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a client forged a log line:\n{log}"
    );
    // The model was logged, escaped, on the line of its own request.
    assert!(
        log.lines().any(|l| l.contains("request rejected")
            && l.contains("nope\\nFORGED level=error gateway compromised")),
        "the escaped model is not in the log:\n{log}"
    );
    eprintln!(
        "healthz: {} probes, {} over 50 ms, worst {:?}, {} failed; max RSS {} MiB; slowloris cut {cut}/20; idle closed {closed}/300",
        w.probes,
        w.slow,
        w.worst,
        w.failures,
        w.max_rss_kib / 1024
    );
    assert_eq!(cut, 20, "slowloris sockets left open");
    assert_eq!(closed, 300, "idle sockets left open");
    assert_eq!(w.failures, 0, "/healthz failed during the storm");
    // Under 50 ms; a probe in a hundred may lose the CPU to the load itself on
    // a small shared machine (the tokenizer bombs, 20,000 requests), never by
    // much: the stalls this guards against were whole seconds.
    let slow = w.slow;
    assert!(
        slow * 100 <= w.probes,
        "{slow} of {} probes took over 50 ms",
        w.probes
    );
    assert!(
        w.worst < Duration::from_millis(250),
        "/healthz took {:?}",
        w.worst
    );
    assert!(
        w.max_rss_kib < 300 * 1024,
        "RSS reached {} MiB",
        w.max_rss_kib / 1024
    );
}

#[test]
fn shutdown_ends_within_the_grace_period_with_a_stream_running() {
    let _serial = SERIAL.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    write_hostile_config(dir.path(), "  shutdown_grace: 1s");
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut gw =
        common::GatewayProcess::start_limited(&dir.path().join("promptgate.yaml"), &[], 1024, log);
    // A stream of 200 words at 400 ms each: 80 s if left to finish.
    let mut s = TcpStream::connect(gw.addr()).unwrap();
    let body = json!({"model": "slow", "stream": true,
        "messages": [{"role": "user", "content": "word ".repeat(200)}]})
    .to_string();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    s.read_exact(&mut first).unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"));
    let sent = Instant::now();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    loop {
        if gw.child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM with a 1 s grace period"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The stream was cut at the end of the grace period, not finished.
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains("[DONE]"), "{rest}");
    assert!(rest.contains("data: "), "nothing streamed before the cut");
}

#[tokio::test]
async fn max_concurrency_counts_streams_until_their_body_ends() {
    let _serial = SERIAL.lock().await;
    let gateway = "limits: {max_concurrency: 1}\nroutes:\n  slow: {provider: sb, model: slow}\n";
    let gw = common::spawn_gateway(gateway, &[("sb.yaml".into(), SANDBOX.into())]).await;
    let client = common::client();
    let stream = client
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "slow", "stream": true,
            "messages": [{"role": "user", "content": "one two three"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // Headers are out; the body still runs and holds the only permit.
    let busy = client.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(busy.status(), 503);
    assert!(busy.headers().contains_key("x-request-id"));
    let v: Value = busy.json().await.unwrap();
    assert_eq!(v["error"]["code"], "overloaded");
    assert!(v["error"]["request_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    let text = stream.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let free = client.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(free.status(), 200);
    let metrics = gw.metrics().await;
    // Nothing is in flight (a scrape does not count).
    assert!(
        metrics.contains("promptgate_requests_in_flight 0\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_dropped_stream_frees_its_permit() {
    let _serial = SERIAL.lock().await;
    let gateway = "limits: {max_concurrency: 1}\nroutes:\n  slow: {provider: sb, model: slow}\n";
    let gw = common::spawn_gateway(gateway, &[("sb.yaml".into(), SANDBOX.into())]).await;
    let client = common::client();
    let stream = client
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "slow", "stream": true,
            "messages": [{"role": "user", "content": "word ".repeat(100)}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client.get(gw.url("/v1/models")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped stream kept its permit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn error_bodies_can_keep_configured_ids_to_themselves() {
    let _serial = SERIAL.lock().await;
    let routes = "routes:\n  secret-route: {provider: sb, model: echo}\n";
    let providers = [("sb.yaml".to_string(), SANDBOX.to_string())];
    let prompts = [(
        "secret-prompt.yaml",
        PROMPT.replace("route: echo", "route: secret-route"),
    )];
    let prompts: Vec<(&str, &str)> = prompts.iter().map(|(n, t)| (*n, t.as_str())).collect();
    for (limits, listed) in [("", true), ("limits: {list_ids_in_errors: false}\n", false)] {
        let gw =
            common::spawn_gateway_with_prompts(&format!("{limits}{routes}"), &providers, &prompts)
                .await;
        let client = common::client();
        let r = client
            .post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        let msg = v["error"]["message"].as_str().unwrap();
        assert_eq!(msg.contains("secret-route"), listed, "{msg}");
        let r = client
            .post(gw.url("/v1/prompts/nope/chat/completions"))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "prompt_not_found");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("`nope`"), "{msg}");
        assert_eq!(msg.contains("secret-prompt"), listed, "{msg}");
    }
}

#[tokio::test]
async fn render_errors_name_the_prompt_file_relative_to_the_config() {
    let _serial = SERIAL.lock().await;
    let routes = "routes:\n  echo: {provider: sb, model: echo}\n";
    let providers = [("sb.yaml".to_string(), SANDBOX.to_string())];
    // Dividing a string fails at render time (only for this one value).
    let prompt = PROMPT.replace(
        "{{ question }}",
        "{% if question == 'boom' %}{{ question / 2 }}{% endif %}",
    );
    let gw = common::spawn_gateway_with_prompts(routes, &providers, &[("p.yaml", &prompt)]).await;
    let r = common::client()
        .post(gw.url("/v1/prompts/p/chat/completions"))
        .json(&json!({"variables": {"question": "boom"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("(prompts/p.yaml:"), "{msg}");
    let dir = gw.config_path();
    let root = dir.parent().unwrap().to_string_lossy();
    assert!(!msg.contains(&*root), "{msg}");
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_answered_within_the_idle_timeout() {
    let _serial = SERIAL.lock().await;
    let gateway = "limits: {idle_timeout: 300ms}\nroutes:\n  echo: {provider: sb, model: echo}\n";
    let gw = common::spawn_gateway(gateway, &[("sb.yaml".into(), SANDBOX.into())]).await;
    let addr = gw
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let (status, body) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":")
            .unwrap();
        let started = Instant::now();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(started.elapsed() < Duration::from_secs(4), "no answer to a stalled body");
        let status: u16 = text.split_whitespace().nth(1).unwrap_or("0").parse().unwrap();
        (status, text)
    })
    .await
    .unwrap();
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("stalled"), "{body}");
    assert!(
        body.to_ascii_lowercase().contains("connection: close"),
        "{body}"
    );
}

/// `/healthz` and `/metrics` take no concurrency permit: with every permit
/// held by a stream, they still answer.
#[tokio::test]
async fn health_and_metrics_answer_with_every_permit_taken() {
    let _serial = SERIAL.lock().await;
    let gateway = "limits: {max_concurrency: 2}\nroutes:\n  slow: {provider: sb, model: slow}\n";
    let gw = common::spawn_gateway(gateway, &[("sb.yaml".into(), SANDBOX.into())]).await;
    let client = common::client();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let r = client
            .post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": "slow", "stream": true,
                "messages": [{"role": "user", "content": "word ".repeat(50)}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    let full = client.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(full.status(), 503);
    let health = client.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(health.headers().contains_key("x-request-id"));
    let metrics = client.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("promptgate_requests_in_flight 2\n"),
        "{metrics}"
    );
    drop(streams);
}

/// With `list_ids_in_errors: false`, unavailability errors name no provider,
/// no target and no environment variable; they keep the kind of reason.
#[tokio::test]
async fn unavailability_errors_can_keep_provider_settings_to_themselves() {
    let _serial = SERIAL.lock().await;
    let routes = "routes:\n  lone: {provider: keyless-a, model: x}\n  pair:\n    targets:\n      - {provider: keyless-a, model: x}\n      - {provider: keyless-b, model: y}\n";
    let keyless =
        |var: &str| format!("kind: openai\nbase_url: http://127.0.0.1:9/v1\napi_key_env: {var}\n");
    let providers = [
        (
            "keyless-a.yaml".to_string(),
            keyless("PROMPTGATE_TEST_UNSET_KEY_A"),
        ),
        (
            "keyless-b.yaml".to_string(),
            keyless("PROMPTGATE_TEST_UNSET_KEY_B"),
        ),
    ];
    for (limits, listed) in [("", true), ("limits: {list_ids_in_errors: false}\n", false)] {
        let gw = common::spawn_gateway(&format!("{limits}{routes}"), &providers).await;
        let client = common::client();
        for (route, code) in [
            ("lone", "provider_unavailable"),
            ("pair", "no_target_available"),
        ] {
            for (path, anthropic) in [("/v1/chat/completions", false), ("/v1/messages", true)] {
                let r = client
                    .post(gw.url(path))
                    .header("x-request-id", "unavail-1")
                    .json(&json!({"model": route, "max_tokens": 16,
                        "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 503, "{route} {path}");
                let text = r.text().await.unwrap();
                let v: Value = serde_json::from_str(&text).unwrap();
                if !anthropic {
                    assert_eq!(v["error"]["code"], code, "{text}");
                    assert_eq!(v["error"]["request_id"], "unavail-1", "{text}");
                }
                let msg = v["error"]["message"].as_str().unwrap();
                // The generic reason stays.
                assert!(listed || msg.contains("unavailable"), "{msg}");
                for secret in [
                    "keyless",
                    "PROMPTGATE_TEST_UNSET_KEY",
                    "environment variable",
                ] {
                    assert_eq!(
                        text.contains(secret),
                        listed,
                        "`{secret}` listed={listed} in {route} {path}: {text}"
                    );
                }
            }
        }
    }
}

/// Every `limits` duration is bounded: one past a day is a problem `check`
/// reports (deadlines computed from it could overflow), and so is a zero
/// where zero means "never".
#[test]
fn check_reports_limits_durations_past_the_maximum() {
    const LONG: &str = "is longer than the most allowed, 1day";
    const ZERO: &str = "must be longer than zero";
    let cases = [
        ("shutdown_grace", "1000000000years", LONG),
        ("request_timeout", "30days", LONG),
        ("header_read_timeout", "25h", LONG),
        ("idle_timeout", "0s", ZERO),
        ("write_timeout", "25h", LONG),
        ("body_read_timeout", "0s", ZERO),
        ("drain_delay", "2days", LONG),
    ];
    let limits: Vec<String> = cases
        .iter()
        .map(|(f, v, _)| format!("  {f}: {v}"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_hostile_config(dir.path(), &limits.join("\n"));
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
            .args(["check", "--config"])
            .arg(dir.path().join("promptgate.yaml"))
            .output()
            .unwrap()
    };
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for (field, _, problem) in cases {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("limits.{field}: ")) && l.contains(problem)),
            "no problem for limits.{field}:\n{err}"
        );
    }
    // At the maximum, the config is fine.
    write_hostile_config(
        dir.path(),
        "  shutdown_grace: 1day\n  request_timeout: 24h\n  drain_delay: 1day",
    );
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A body dripped a byte at a time, each within the idle timeout, still has
/// to arrive whole within `limits.body_read_timeout`.
#[tokio::test]
async fn a_dripped_body_is_answered_within_the_body_read_timeout() {
    let _serial = SERIAL.lock().await;
    let gateway = "limits: {idle_timeout: 500ms, body_read_timeout: 1s}\nroutes:\n  echo: {provider: sb, model: echo}\n";
    let gw = common::spawn_gateway(gateway, &[("sb.yaml".into(), SANDBOX.into())]).await;
    let addr = gw.addr;
    let (elapsed, text) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-request-id: drip-1\r\ncontent-length: 1000\r\n\r\n{\"model\":")
            .unwrap();
        let started = Instant::now();
        let mut w = s.try_clone().unwrap();
        // A space every 100 ms: 10 s for 100 bytes if let run.
        let dripper = std::thread::spawn(move || {
            for _ in 0..100 {
                std::thread::sleep(Duration::from_millis(100));
                if w.write_all(b" ").is_err() {
                    return;
                }
            }
        });
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let elapsed = started.elapsed();
        drop(s);
        let _ = dripper.join();
        (elapsed, String::from_utf8_lossy(&out).into_owned())
    })
    .await
    .unwrap();
    assert!(
        elapsed < Duration::from_secs(4),
        "answered after {elapsed:?}: {text}"
    );
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let e = error_of(body);
    assert_eq!(e["request_id"], "drip-1", "{body}");
    assert_eq!(e["code"], "request_timeout", "{body}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("did not arrive within 1s"),
        "{body}"
    );
}

/// A client that sends a streaming request and then reads nothing: once the
/// answer fills the socket, writing it makes no progress, and after
/// `limits.write_timeout` the connection is closed, which drops the stream
/// (and the backend call feeding it) and frees its permit and in-flight count.
#[tokio::test]
async fn a_client_that_reads_nothing_is_closed_after_the_write_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _serial = SERIAL.lock().await;
    let gateway = "limits: {max_concurrency: 1, write_timeout: 1s}\nroutes:\n  echo: {provider: sb, model: echo}\n";
    let gw = common::spawn_gateway(gateway, &[("sb.yaml".into(), SANDBOX.into())]).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(gw.addr).await.unwrap();
    // About 3.6 MB of answer: more than the socket buffers and the server's
    // own write buffer hold.
    let body = json!({"model": "echo", "stream": true,
        "messages": [{"role": "user", "content": "abcdefg ".repeat(450 * 1024)}]})
    .to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let client = common::client();
    let in_flight = |n: u8| format!("promptgate_requests_in_flight {n}\n");
    // The stream runs, stuck on its client, and holds the only permit.
    let started = Instant::now();
    while !gw.metrics().await.contains(&in_flight(1)) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the stream never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let busy = client.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(busy.status(), 503);
    // Then the write timeout closes the connection and frees them both.
    loop {
        let metrics = gw.metrics().await;
        if metrics.contains(&in_flight(0)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a client reading nothing still holds its stream:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let free = client.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(free.status(), 200);
    // The client finds its connection ended, the answer cut short.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection is still open");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{:.200}", text);
    assert!(!text.contains("data: [DONE]"), "the stream was not cut");
}
