//! The audit log end to end, on the real binary: one JSON line per request
//! with what happened to it, content only when opted in, rotation by size, the
//! stdout sink, and writing that never holds a request up (a full disk, a
//! writer that cannot write at all).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/process.rs"]
mod process;

use std::path::{Path, PathBuf};

use common::{chat_body, client, fake_config, spawn_fake, write_config, Fake, FAKE_KEY};
use process::{eventually, Process};
use serde_json::{json, Value};

/// Whether gateway keys are built on this branch. The audit log records a
/// key's id and a refused key's status; the assertions about them run only
/// once keys authenticate (`// needs: keys`).
const KEYS_BUILT: bool = true;

/// A gateway process in front of `fake`, with `routes` added to the fake's and
/// `sections` (top-level YAML) appended; `files` are written beside it.
fn start(
    fake: &Fake,
    routes: &str,
    sections: &str,
    files: &[(&str, &str)],
) -> (tempfile::TempDir, Process) {
    let dir = tempfile::tempdir().unwrap();
    let (gateway, providers) = fake_config(fake, routes);
    write_config(dir.path(), &format!("{gateway}{sections}"), &providers);
    for (name, text) in files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let gw = Process::start(
        &dir.path().join("promptgate.yaml"),
        &[("FAKE_UPSTREAM_KEY", FAKE_KEY)],
    );
    (dir, gw)
}

/// The complete lines of a JSON-lines file (a line still being written is
/// left out), each parsed: a line that is not JSON fails the test.
fn lines_of(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut parts: Vec<&str> = text.split('\n').collect();
    parts.pop(); // after the last newline: empty, or a partial line
    parts
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

async fn records(path: &Path, n: usize) -> Vec<Value> {
    eventually(&format!("{n} audit records"), || {
        let r = lines_of(path);
        (r.len() >= n).then_some(r)
    })
    .await
}

fn by_id<'a>(records: &'a [Value], id: &str) -> &'a Value {
    let found: Vec<&Value> = records.iter().filter(|r| r["request_id"] == id).collect();
    assert_eq!(found.len(), 1, "one record for {id}: {records:#?}");
    found[0]
}

/// POSTs `body` to `/v1/chat/completions` with request id `id`; returns the
/// status, the `x-promptgate-*` headers and the body text.
async fn chat(
    gw: &Process,
    id: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut rb = client()
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", id)
        .json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    (status, h, r.text().await.unwrap())
}

/// The text of a streamed OpenAI answer.
fn streamed_text(body: &str) -> String {
    common::sse_data(body)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

async fn metric(gw: &Process, series: &str) -> f64 {
    let text = client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn metric_reaches(gw: &Process, series: &str, at_least: f64) -> f64 {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let v = metric(gw, series).await;
        if v >= at_least {
            return v;
        }
        assert!(
            std::time::Instant::now() < until,
            "{series} stayed at {v}, below {at_least}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const ROUTES: &str = "  cutting:\n    provider: fake\n    model: cut\n  plain:\n    provider: fake\n    model: chat\n  cached:\n    provider: fake\n    model: chat\n    cache: {mode: on, ttl: 1h}\n  chain:\n    targets:\n      - {provider: fake, model: status-503}\n      - {provider: fake, model: chat}\n";

#[tokio::test]
async fn every_request_gets_one_record_with_its_facts() {
    let fake = spawn_fake().await;
    let (dir, gw) = start(&fake, ROUTES, "audit: {path: logs/audit.jsonl}\n", &[]);
    let path = dir.path().join("logs/audit.jsonl");
    let (s, h, _) = chat(&gw, "plain-1", &chat_body("plain", false), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(h["x-promptgate-attempts"], "1");
    let (s, _, body) = chat(&gw, "stream-1", &chat_body("plain", true), &[]).await;
    assert_eq!(s, 200);
    assert!(body.contains("[DONE]"), "{body}");
    let (s, h, _) = chat(&gw, "cache-miss", &chat_body("cached", false), &[]).await;
    assert_eq!(
        (s, &h["x-promptgate-cache"]),
        (200, &"miss".parse().unwrap())
    );
    let (s, h, _) = chat(&gw, "cache-hit", &chat_body("cached", false), &[]).await;
    assert_eq!(
        (s, &h["x-promptgate-cache"]),
        (200, &"hit".parse().unwrap())
    );
    let (s, h, body) = chat(&gw, "cache-stream", &chat_body("cached", true), &[]).await;
    assert_eq!(s, 200);
    assert!(body.contains("[DONE]"), "{body}");
    let stream_cache = h["x-promptgate-cache"].to_str().unwrap().to_owned();
    let (s, h, _) = chat(&gw, "fallback-1", &chat_body("chain", false), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(h["x-promptgate-attempts"], "2");
    let (s, _, body) = chat(&gw, "stream-cut", &chat_body("cutting", true), &[]).await;
    assert_eq!(s, 200);
    assert!(body.contains("error"), "{body}");
    let bad = json!({"model": "plain", "messages": "not a list"});
    let (s, _, _) = chat(&gw, "bad-1", &bad, &[]).await;
    assert_eq!(s, 400);
    let (s, _, _) = chat(&gw, "unknown-1", &chat_body("no-such-route", false), &[]).await;
    assert_eq!(s, 404);

    let recs = records(&path, 9).await;
    assert_eq!(recs.len(), 9, "{recs:#?}");

    let r = by_id(&recs, "plain-1");
    assert_eq!(r["key"], Value::Null);
    assert_eq!(r["route"], "plain");
    assert_eq!(r["target"], "fake/chat");
    assert_eq!(r["provider"], "fake");
    assert_eq!(r["attempts"], 1);
    assert_eq!(r["status"], 200);
    assert_eq!(r["error"], Value::Null);
    assert_eq!(
        r["tokens"],
        json!({"input": 12, "output": 6, "estimated": false})
    );
    assert_eq!(r["cache"], Value::Null);
    assert_eq!(r["prompt"], Value::Null);
    assert_eq!(r["arm"], Value::Null);
    assert_eq!(r["redactions"], json!({}));
    assert_eq!(r["data_action"], Value::Null);
    assert_eq!(r["stream"], false);
    assert!(r["latency_ms"].is_u64());
    assert!(r.get("content").is_none(), "no content unless opted in");
    let time = r["time"].as_str().unwrap();
    assert!(time.ends_with('Z') && time.len() == 24, "{time}");
    let at = humantime::parse_rfc3339(time).unwrap();
    let age = std::time::SystemTime::now().duration_since(at).unwrap();
    assert!(age < std::time::Duration::from_secs(120), "{time}");
    // Every field of a record (sorted here), and the line leads with its time.
    let raw = std::fs::read_to_string(&path).unwrap();
    assert!(raw.lines().all(|l| l.starts_with("{\"time\":\"")), "{raw}");
    let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expected = [
        "time",
        "request_id",
        "key",
        "route",
        "prompt",
        "arm",
        "target",
        "provider",
        "attempts",
        "status",
        "error",
        "tokens",
        "cost",
        "cache",
        "redactions",
        "data_action",
        "latency_ms",
        "stream",
    ];
    expected.sort_unstable();
    assert_eq!(keys, expected);

    // A stream is recorded when it ends, with its tokens.
    let r = by_id(&recs, "stream-1");
    assert_eq!(r["stream"], true);
    assert_eq!(r["status"], 200);
    assert_eq!(r["target"], "fake/chat");
    assert!(r["tokens"]["output"].as_u64().unwrap() > 0, "{r}");

    // A stream that broke after it began: sent as 200, recorded with its error.
    let r = by_id(&recs, "stream-cut");
    assert_eq!(r["status"], 200);
    assert_eq!(r["stream"], true);
    assert!(r["error"].is_string(), "{r}");

    let r = by_id(&recs, "cache-miss");
    assert_eq!(r["cache"], "miss");
    assert_eq!(r["attempts"], 1);
    let r = by_id(&recs, "cache-hit");
    assert_eq!(r["cache"], "hit");
    assert_eq!(r["target"], "fake/chat");
    assert_eq!(r["attempts"], 0);
    assert_eq!(r["status"], 200);

    let r = by_id(&recs, "cache-stream");
    assert_eq!(r["cache"], stream_cache.as_str());
    assert_eq!(r["stream"], true, "a replayed stream is a stream: {r}");

    let r = by_id(&recs, "fallback-1");
    assert_eq!(r["attempts"], 2);
    assert_eq!(r["target"], "fake/chat");
    assert_eq!(r["route"], "chain");

    let r = by_id(&recs, "bad-1");
    assert_eq!(r["status"], 400);
    assert_eq!(r["error"], "invalid_request");
    assert_eq!(r["target"], Value::Null);
    assert_eq!(r["tokens"], Value::Null);

    let r = by_id(&recs, "unknown-1");
    assert_eq!(r["status"], 404);
    assert_eq!(r["route"], Value::Null);

    assert_eq!(
        metric(&gw, "promptgate_audit_records_total{sink=\"file\"}").await,
        9.0
    );
}

#[tokio::test]
async fn a_refused_key_is_recorded_by_status_and_reason_never_the_key() {
    let fake = spawn_fake().await;
    let key = "pg-test-audit-key-0123456789abcdef";
    let keys = format!("tester:\n  sha256: {}\n", sha256_hex(key));
    let (dir, gw) = start(
        &fake,
        ROUTES,
        "auth: {mode: required}\naudit: {path: audit.jsonl}\n",
        &[("keys/test.yaml", &keys)],
    );
    let path = dir.path().join("audit.jsonl");
    let (s, _, _) = chat(&gw, "no-key", &chat_body("plain", false), &[]).await;
    let auth = format!("Bearer {key}");
    let (s2, _, _) = chat(
        &gw,
        "good-key",
        &chat_body("plain", false),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(s2, 200);
    let recs = records(&path, 2).await;
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(key) && !text.contains(&sha256_hex(key)));
    let r = by_id(&recs, "no-key");
    assert_eq!(r["key"], Value::Null);
    if KEYS_BUILT {
        // needs: keys
        assert_eq!(s, 401);
        assert_eq!(r["status"], 401);
        assert!(r["error"].is_string(), "{r}");
        assert_eq!(r["target"], Value::Null);
        assert_eq!(by_id(&recs, "good-key")["key"], "tester");
    }
}

#[tokio::test]
async fn content_is_recorded_only_when_a_route_or_key_opts_in() {
    let fake = spawn_fake().await;
    let routes = "  open:\n    provider: fake\n    model: chat\n    audit: {content: true}\n  closed:\n    provider: fake\n    model: chat\n";
    let key = "pg-test-content-key-0123456789abcdef";
    let keys = format!(
        "reader:\n  sha256: {}\n  audit: {{content: true}}\n",
        sha256_hex(key)
    );
    let (dir, gw) = start(
        &fake,
        routes,
        "audit: {path: audit.jsonl}\n",
        &[("keys/k.yaml", &keys)],
    );
    let path = dir.path().join("audit.jsonl");
    let said = |model: &str, text: &str, stream: bool| {
        json!({"model": model, "stream": stream, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": text}]})
    };
    let (s, _, _) = chat(&gw, "open-1", &said("open", "marker-open-one", false), &[]).await;
    assert_eq!(s, 200);
    let (s, _, body) = chat(&gw, "open-2", &said("open", "marker-open-two", true), &[]).await;
    assert_eq!(s, 200);
    let streamed = streamed_text(&body);
    assert!(!streamed.is_empty(), "{body}");
    let (s, _, _) = chat(
        &gw,
        "closed-1",
        &said("closed", "marker-closed", false),
        &[],
    )
    .await;
    assert_eq!(s, 200);
    let auth = format!("Bearer {key}");
    let (s, _, _) = chat(
        &gw,
        "closed-key",
        &said("closed", "marker-by-key", false),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(s, 200);
    let r = client()
        .post(gw.url("/v1/embeddings"))
        .header("x-request-id", "open-embed")
        .json(&json!({"model": "open", "input": ["marker-embed", "second"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let recs = records(&path, 5).await;

    let c = &by_id(&recs, "open-embed")["content"];
    assert_eq!(c["input"], json!(["marker-embed", "second"]));
    assert_eq!(c["response"], "");
    let c = &by_id(&recs, "open-1")["content"];
    assert_eq!(
        c["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "marker-open-one"}])
    );
    assert_eq!(c["response"], "Hello from the fake upstream.");
    assert_eq!(c["request_truncated"], false);
    assert_eq!(c["response_truncated"], false);
    let c = &by_id(&recs, "open-2")["content"];
    assert_eq!(c["messages"][1]["content"], "marker-open-two");
    assert_eq!(c["response"], streamed.as_str());

    assert!(by_id(&recs, "closed-1").get("content").is_none());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("marker-closed"), "{text}");
    assert!(!text.contains(key));
    if KEYS_BUILT {
        // needs: keys — the key's own opt-in.
        let c = &by_id(&recs, "closed-key")["content"];
        assert_eq!(c["messages"][1]["content"], "marker-by-key");
    } else {
        assert!(!text.contains("marker-by-key"));
    }
}

#[tokio::test]
async fn the_file_rotates_by_size_into_at_most_keep_files_of_whole_lines() {
    let fake = spawn_fake().await;
    let (dir, gw) = start(
        &fake,
        ROUTES,
        "audit: {path: audit.jsonl, max_bytes: 4096, keep: 2}\n",
        &[],
    );
    let n = 60;
    for i in 0..n {
        let (s, _, _) = chat(&gw, &format!("rot-{i:03}"), &chat_body("plain", false), &[]).await;
        assert_eq!(s, 200);
    }
    let series = "promptgate_audit_records_total{sink=\"file\"}";
    assert_eq!(
        metric_reaches(&gw, series, f64::from(n)).await,
        f64::from(n)
    );
    let file = |suffix: &str| -> PathBuf { dir.path().join(format!("audit.jsonl{suffix}")) };
    assert!(!file(".3").exists(), "no more than `keep` rotated files");
    let mut ids = Vec::new();
    for suffix in [".2", ".1", ""] {
        let p = file(suffix);
        let size = std::fs::metadata(&p).unwrap().len();
        assert!(size <= 4096, "{} is {size} bytes", p.display());
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.ends_with('\n'), "whole lines only");
        for r in lines_of(&p) {
            ids.push(r["request_id"].as_str().unwrap().to_owned());
        }
    }
    // The newest records, in order, ending with the last request.
    assert!(ids.len() < n as usize && ids.len() > 10, "{ids:?}");
    let first: usize = ids[0]["rot-".len()..].parse().unwrap();
    let expected: Vec<String> = (first..n as usize).map(|i| format!("rot-{i:03}")).collect();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn the_stdout_sink_writes_the_same_lines_as_the_file() {
    let fake = spawn_fake().await;
    let (dir, mut gw) = start(
        &fake,
        ROUTES,
        "audit: {path: audit.jsonl, stdout: true, content: true}\n",
        &[],
    );
    for i in 0..5 {
        let (s, _, _) = chat(
            &gw,
            &format!("out-{i}"),
            &chat_body("plain", i % 2 == 1),
            &[],
        )
        .await;
        assert_eq!(s, 200);
    }
    let path = dir.path().join("audit.jsonl");
    records(&path, 5).await;
    let out: Vec<String> = eventually("5 lines on stdout", || {
        let lines = gw.stdout_lines();
        (lines.len() >= 5).then_some(lines)
    })
    .await;
    let file: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(out, file, "the same lines, in the same order");
    for l in &out {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["content"]["messages"][1]["content"], "Say hello.");
    }
    // Records queued at shutdown are written before the process exits.
    let (s, _, _) = chat(&gw, "last", &chat_body("plain", false), &[]).await;
    assert_eq!(s, 200);
    gw.terminate();
    let recs = lines_of(&path);
    by_id(&recs, "last");
}

#[tokio::test]
async fn a_disk_that_fails_drops_records_counted_and_requests_succeed() {
    let fake = spawn_fake().await;
    let (_dir, gw) = start(&fake, ROUTES, "audit: {path: /dev/full}\n", &[]);
    for i in 0..10 {
        let (s, _, _) = chat(&gw, &format!("full-{i}"), &chat_body("plain", i == 3), &[]).await;
        assert_eq!(s, 200);
    }
    let series = "promptgate_audit_dropped_total{reason=\"write_error\"}";
    assert_eq!(metric_reaches(&gw, series, 10.0).await, 10.0);
    assert_eq!(
        metric(&gw, "promptgate_audit_records_total{sink=\"file\"}").await,
        0.0
    );
    // Logged once for the outage, not once per record.
    let warned = gw
        .stderr_lines()
        .iter()
        .filter(|l| l.contains("cannot write audit records"))
        .count();
    assert_eq!(warned, 1, "{:#?}", gw.stderr_lines());
}

#[tokio::test]
async fn a_writer_that_cannot_write_never_holds_a_request_up() {
    let fake = spawn_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.fifo");
    // A FIFO nobody reads: opening it for writing blocks the writer for good.
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let (_cfg, gw) = start(
        &fake,
        ROUTES,
        &format!("audit: {{path: {}, queue: 4}}\n", fifo.display()),
        &[],
    );
    let n = 30;
    let started = std::time::Instant::now();
    for i in 0..n {
        let (s, _, _) = chat(&gw, &format!("fifo-{i}"), &chat_body("plain", false), &[]).await;
        assert_eq!(s, 200);
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    // Four wait in the queue; every other record is dropped and counted.
    let series = "promptgate_audit_dropped_total{reason=\"queue_full\"}";
    assert_eq!(metric_reaches(&gw, series, 26.0).await, 26.0);
}

#[test]
fn audit_settings_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = "listen: 127.0.0.1:0\nroutes: {}\naudit: {path: a.jsonl, max_bytes: 100, queue: 0, keep: 100000}\n";
    write_config(dir.path(), gateway, &[]);
    let problems = match promptgate::load(&dir.path().join("promptgate.yaml"), &|_| None) {
        Ok(_) => panic!("accepted"),
        Err(p) => format!("{p:?}"),
    };
    for field in ["audit.max_bytes", "audit.queue", "audit.keep"] {
        assert!(problems.contains(field), "{field}: {problems}");
    }
    write_config(
        dir.path(),
        "listen: 127.0.0.1:0\nroutes: {}\naudit: {content: true}\n",
        &[],
    );
    let problems = match promptgate::load(&dir.path().join("promptgate.yaml"), &|_| None) {
        Ok(_) => panic!("accepted content without a sink"),
        Err(p) => format!("{p:?}"),
    };
    assert!(problems.contains("audit.content"), "{problems}");
}
