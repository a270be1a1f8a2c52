//! Traces over OTLP/HTTP and JSON logs, end to end: the real `promptgate`
//! binary, a fake upstream on loopback that records the headers it gets, and a
//! loopback OTLP receiver that decodes the protobuf (`tests/ops/otlp_receiver.py`,
//! on the venv's Python from `PROMPTGATE_PYTHON`).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/process.rs"]
mod process;

use common::otlp::Receiver;
use serde_json::{json, Value};

const SERVER: i64 = 2;
const CLIENT: i64 = 3;
const INTERNAL: i64 = 1;

/// The fake's routes plus a fallback chain and a cached route, with `extra`
/// at the top level of the gateway file.
fn config(fake: &common::Fake, extra: &str) -> tempfile::TempDir {
    let routes = "  fallback:\n    targets:\n      - {provider: fake, model: status-500}\n      - {provider: fake, model: chat}\n  cached:\n    provider: fake\n    model: chat\n    cache: {mode: on, ttl: 1h}\n";
    let (mut g, p) = common::fake_config(fake, routes);
    g.push_str(extra);
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &g, &p);
    dir
}

/// A remote retriever's search service on loopback (`kind: http`): every
/// search finds two passages. Returns its URL.
async fn search_service() -> String {
    let app = axum::Router::new().route(
        "/search",
        axum::routing::post(|| async {
            axum::Json(json!({"results": [
                {"text": "Refunds are accepted within 30 days.", "score": 0.9, "source": "policy.md", "chunk_id": "p1"},
                {"text": "Invoices are sent monthly.", "score": 0.6, "source": "billing.md", "chunk_id": "p2"},
            ]}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    #[allow(clippy::disallowed_methods)]
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/search")
}

fn tracing_section(r: &Receiver) -> String {
    format!(
        "tracing:\n  otlp_endpoint: {}\n  service_name: promptgate-test\n  sample_ratio: 1.0\n  flush_interval: 100ms\n  timeout: 2s\n  headers_env: {{x-collector-token: OTLP_TEST_TOKEN}}\n",
        r.endpoint()
    )
}

fn start(dir: &tempfile::TempDir) -> process::Process {
    process::Process::start(
        &dir.path().join("promptgate.yaml"),
        &[
            ("FAKE_UPSTREAM_KEY", common::FAKE_KEY),
            ("OTLP_TEST_TOKEN", "collector-token-42"),
        ],
    )
}

/// Sends a chat request; returns its request id and its body (read to the end).
async fn chat(gw: &process::Process, body: Value, headers: &[(&str, &str)]) -> (String, String) {
    let mut req = common::client()
        .post(gw.url("/v1/chat/completions"))
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "{body}");
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    (id, resp.text().await.unwrap())
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

/// The request span of the request `id`.
fn request_span(spans: &[Value], id: &str) -> Option<Value> {
    spans
        .iter()
        .find(|s| attr(s, "promptgate.request_id") == id && s["kind"] == SERVER)
        .cloned()
}

fn children<'a>(spans: &'a [Value], parent: &Value) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|s| s["parent_span_id"] == parent["span_id"] && s["trace_id"] == parent["trace_id"])
        .collect()
}

/// The request span of `id`, once it and `n` children have arrived.
async fn traced(r: &Receiver, id: &str, n: usize) -> (Value, Vec<Value>) {
    let found = r
        .wait_for(&format!("the spans of request {id}"), |spans| {
            let span = request_span(spans, id)?;
            let kids: Vec<Value> = children(spans, &span).into_iter().cloned().collect();
            (kids.len() >= n).then_some((span, kids))
        })
        .await;
    // Each attribute is set once.
    for s in std::iter::once(&found.0).chain(&found.1) {
        assert_eq!(s["duplicate_keys"], json!([]), "{s:#}");
    }
    found
}

fn traceparent(span: &Value) -> String {
    format!(
        "00-{}-{}-01",
        span["trace_id"].as_str().unwrap(),
        span["span_id"].as_str().unwrap()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_traced_over_otlp_with_genai_attributes() {
    let receiver = Receiver::start();
    let fake = common::spawn_fake().await;
    let dir = config(&fake, &tracing_section(&receiver));
    let kb = format!("kind: http\nurl: {}\n", search_service().await);
    std::fs::create_dir_all(dir.path().join("retrievers")).unwrap();
    std::fs::write(dir.path().join("retrievers/kb.yaml"), kb).unwrap();
    let gw = start(&dir);

    // A plain request: one SERVER span with the GenAI attributes, one CLIENT
    // attempt under it, whose span the upstream's `traceparent` names.
    let body = json!({"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 50, "temperature": 0.5, "top_p": 0.9});
    let (id, _) = chat(&gw, body, &[]).await;
    let (span, kids) = traced(&receiver, &id, 1).await;
    assert_eq!(span["name"], "chat fake-chat");
    assert_eq!(span["service"], "promptgate-test");
    assert_eq!(span["content_type"], "application/x-protobuf");
    assert_eq!(span["headers"]["x-collector-token"], "collector-token-42");
    assert_eq!(
        span["parent_span_id"], "",
        "a new trace's request span is its root"
    );
    for (k, v) in [
        ("gen_ai.operation.name", json!("chat")),
        ("gen_ai.provider.name", json!("openai")),
        ("gen_ai.request.model", json!("fake-chat")),
        ("gen_ai.response.model", json!("fake-model-2024")),
        ("gen_ai.response.id", json!("chatcmpl-fake0001")),
        ("gen_ai.response.finish_reasons", json!(["stop"])),
        ("gen_ai.usage.input_tokens", json!(12)),
        ("gen_ai.usage.output_tokens", json!(6)),
        ("gen_ai.request.max_tokens", json!(50)),
        ("gen_ai.request.temperature", json!(0.5)),
        ("gen_ai.request.top_p", json!(0.9)),
        ("promptgate.route", json!("fake-chat")),
        ("promptgate.target", json!("fake/chat")),
        ("http.response.status_code", json!(200)),
    ] {
        assert_eq!(attr(&span, k), &v, "{k} in {span:#}");
    }
    assert_eq!(kids.len(), 1, "{kids:#?}");
    let attempt = &kids[0];
    assert_eq!(attempt["kind"], CLIENT);
    assert_eq!(attempt["name"], "chat chat");
    assert_eq!(attr(attempt, "server.address"), "127.0.0.1");
    assert_eq!(attr(attempt, "server.port"), fake.addr.port());
    assert_eq!(attr(attempt, "gen_ai.provider.name"), "openai");
    assert!(attr(attempt, "error.type").is_null());
    let seen = fake.last();
    assert_eq!(
        seen.headers["traceparent"].to_str().unwrap(),
        traceparent(attempt)
    );
    // No content, no key in any span.
    let text = serde_json::to_string(&receiver.spans()).unwrap();
    assert!(!text.contains(common::FAKE_KEY) && !text.contains("\"hi\""));

    // A fallback: two attempts, the first failed with its error type; each
    // call carried its own attempt's span id.
    let before = fake.requests().len();
    let body = json!({"model": "fallback", "messages": [{"role": "user", "content": "hi"}]});
    let (id, _) = chat(&gw, body, &[]).await;
    let (span, mut kids) = traced(&receiver, &id, 2).await;
    kids.sort_by_key(|k| attr(k, "promptgate.fallback").as_i64());
    assert_eq!(kids.len(), 2, "{kids:#?}");
    assert!(kids.iter().all(|k| k["kind"] == CLIENT));
    assert_eq!(attr(&kids[0], "gen_ai.request.model"), "status-500");
    assert!(attr(&kids[0], "error.type")
        .as_str()
        .is_some_and(|k| !k.is_empty()));
    assert_eq!(attr(&kids[0], "http.response.status_code"), 500);
    assert_eq!(
        kids[0]["status"], 2,
        "the failed attempt's status is an error"
    );
    assert_eq!(attr(&kids[1], "gen_ai.request.model"), "chat");
    assert!(attr(&kids[1], "error.type").is_null());
    assert_eq!(attr(&span, "promptgate.attempts"), 2);
    let calls = fake.requests();
    let sent: Vec<String> = calls[before..]
        .iter()
        .map(|r| r.headers["traceparent"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(sent, vec![traceparent(&kids[0]), traceparent(&kids[1])]);

    // An incoming traceparent is continued: same trace, the caller's span as parent.
    let given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let body = json!({"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]});
    let (id, _) = chat(
        &gw,
        body,
        &[("traceparent", given), ("tracestate", "vendor=abc")],
    )
    .await;
    let (span, kids) = traced(&receiver, &id, 1).await;
    assert_eq!(span["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(span["parent_span_id"], "b7ad6b7169203331");
    let seen = fake.last();
    assert_eq!(
        seen.headers["traceparent"].to_str().unwrap(),
        traceparent(&kids[0])
    );
    assert_eq!(seen.headers["tracestate"].to_str().unwrap(), "vendor=abc");

    // A stream's span ends with the stream and carries its usage.
    let body = json!({"model": "fake-chat", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]});
    let (id, text) = chat(&gw, body, &[]).await;
    assert!(text.contains("[DONE]"));
    let (span, _) = traced(&receiver, &id, 1).await;
    assert_eq!(attr(&span, "gen_ai.usage.input_tokens"), 12);
    assert_eq!(attr(&span, "gen_ai.usage.output_tokens"), 6);
    assert_eq!(attr(&span, "gen_ai.response.id"), "chatcmpl-fakestream");
    assert_eq!(
        attr(&span, "gen_ai.response.finish_reasons"),
        &json!(["stop"])
    );
    assert_eq!(attr(&span, "promptgate.stream"), true);

    // A retrieval: its search is a child of the request's span.
    let body = json!({"model": "fake-chat", "messages": [{"role": "user", "content": "refunds?"}],
        "retrieval": {"retriever": "kb"}});
    let (id, _) = chat(&gw, body, &[]).await;
    let (_, kids) = traced(&receiver, &id, 2).await;
    let search = kids
        .iter()
        .find(|k| k["name"] == "retrieval kb")
        .unwrap_or_else(|| panic!("no retrieval span: {kids:#?}"));
    assert_eq!(search["kind"], INTERNAL);
    assert_eq!(attr(search, "gen_ai.data_source.id"), "kb");
    assert_eq!(attr(search, "promptgate.retrieval.passages"), 2);
    assert!(kids.iter().any(|k| k["kind"] == CLIENT));

    // Embeddings: their own operation, the usage the backend reported.
    let resp = common::client()
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": "fake-chat", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let (span, kids) = traced(&receiver, &id, 1).await;
    assert_eq!(span["name"], "embeddings fake-chat");
    assert_eq!(attr(&span, "gen_ai.operation.name"), "embeddings");
    assert_eq!(attr(&span, "gen_ai.usage.input_tokens"), 8);
    assert_eq!(kids[0]["name"], "embeddings chat");
    assert_eq!(kids[0]["kind"], CLIENT);
    assert_eq!(
        fake.last().headers["traceparent"].to_str().unwrap(),
        traceparent(&kids[0])
    );

    // The cache: a miss calls upstream, a hit shows its cache span and no attempt.
    let body = json!({"model": "cached", "messages": [{"role": "user", "content": "cache me"}]});
    let (miss, _) = chat(&gw, body.clone(), &[]).await;
    let (span, kids) = traced(&receiver, &miss, 2).await;
    assert_eq!(attr(&span, "promptgate.cache"), "miss");
    assert!(kids
        .iter()
        .any(|k| k["name"] == "cache lookup" && attr(k, "promptgate.cache") == "miss"));
    let (hit, _) = chat(&gw, body, &[]).await;
    let (span, kids) = traced(&receiver, &hit, 1).await;
    assert_eq!(attr(&span, "promptgate.cache"), "hit");
    assert_eq!(attr(&span, "gen_ai.usage.input_tokens"), 12);
    assert_eq!(kids.len(), 1, "{kids:#?}");
    assert_eq!(kids[0]["name"], "cache lookup");
    assert_eq!(kids[0]["kind"], INTERNAL);
    assert_eq!(attr(&kids[0], "promptgate.cache"), "hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_never_fails_a_request() {
    // Nothing listens on the collector's port: requests are served as usual,
    // and the failed exports are counted.
    let fake = common::spawn_fake().await;
    let port = common::peers::free_port();
    let extra = format!(
        "tracing:\n  otlp_endpoint: http://127.0.0.1:{port}/v1/traces\n  flush_interval: 50ms\n  timeout: 1s\n"
    );
    let dir = config(&fake, &extra);
    let gw = start(&dir);
    for _ in 0..3 {
        let body = json!({"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]});
        chat(&gw, body, &[]).await;
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = common::client()
            .get(gw.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let failures = text
            .lines()
            .find(|l| l.starts_with("promptgate_trace_export_failures_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if failures >= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "no export failure counted:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Logged once for the outage, not once per export.
    let logged = gw
        .stderr_lines()
        .iter()
        .filter(|l| l.contains("cannot send traces to the collector"))
        .count();
    assert_eq!(logged, 1, "{:#?}", gw.stderr_lines());
}

/// Sampling: with `sample_ratio: 0` a new trace is not kept, nor one whose
/// caller did not sample it (`-00`), yet the upstream still gets a
/// `traceparent` continuing the trace, marked not sampled; a caller's sampled
/// trace (`-01`) is kept whatever the ratio. Spans still queued at SIGTERM
/// are sent before the process exits (the flush interval here is far longer
/// than the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_follows_the_caller_then_the_ratio_and_shutdown_sends_what_is_queued() {
    let receiver = Receiver::start();
    let fake = common::spawn_fake().await;
    let section = tracing_section(&receiver)
        .replace("sample_ratio: 1.0", "sample_ratio: 0.0")
        .replace("flush_interval: 100ms", "flush_interval: 1h");
    let dir = config(&fake, &section);
    let mut gw = start(&dir);
    let body = || json!({"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]});

    // A new trace at ratio 0: not kept, but propagated as not sampled.
    let (new_root, _) = chat(&gw, body(), &[]).await;
    let sent = fake.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        sent.starts_with("00-") && sent.ends_with("-00") && sent.len() == 55,
        "{sent}"
    );

    // The caller did not sample: the same trace goes on, not sampled.
    let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let (dropped, _) = chat(&gw, body(), &[("traceparent", unsampled)]).await;
    let sent = fake.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && sent.ends_with("-00"),
        "{sent}"
    );

    // The caller sampled: kept, ratio or not.
    let sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (kept, _) = chat(&gw, body(), &[("traceparent", sampled)]).await;
    let sent = fake.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        sent.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && sent.ends_with("-01"),
        "{sent}"
    );

    // Nothing was exported yet (the flush interval is an hour); SIGTERM sends it.
    assert!(receiver.spans().is_empty(), "{:#?}", receiver.spans());
    gw.terminate();
    let status = gw.exited().expect("the gateway exited");
    assert!(status.success(), "{status:?}");
    let (span, kids) = traced(&receiver, &kept, 1).await;
    assert_eq!(span["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(sent, traceparent(&kids[0]));
    let spans = receiver.spans();
    for id in [&new_root, &dropped] {
        assert!(request_span(&spans, id).is_none(), "{id}: {spans:#?}");
    }
    assert!(
        spans
            .iter()
            .all(|s| s["trace_id"] == "0af7651916cd43dd8448eb211c80319c"),
        "only the sampled trace was exported: {spans:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_off_sends_nothing() {
    let receiver = Receiver::start();
    let fake = common::spawn_fake().await;
    let dir = config(&fake, "");
    let gw = start(&dir);
    let body = json!({"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]});
    chat(
        &gw,
        body,
        &[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )],
    )
    .await;
    // Well past a flush interval of an exporter that would have been on.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(receiver.spans().is_empty(), "{:#?}", receiver.spans());
    assert!(fake.last().headers.get("traceparent").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_request_id() {
    let fake = common::spawn_fake().await;
    let dir = config(&fake, "log_format: json\n");
    let mut gw = start(&dir);
    // A fallback logs its failed attempt inside the request.
    let body = json!({"model": "fallback", "messages": [{"role": "user", "content": "hi"}]});
    let (id, _) = chat(&gw, body, &[]).await;
    gw.terminate();
    let lines = gw.stderr_lines();
    assert!(lines.len() >= 3, "{lines:#?}");
    let mut found = false;
    for line in &lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        for k in ["timestamp", "level", "target"] {
            assert!(v[k].is_string(), "no `{k}` in {line}");
        }
        assert!(v["fields"]["message"].is_string(), "no message in {line}");
        if v["fields"]["message"] == "attempt failed" {
            assert_eq!(v["span"]["request_id"], id.as_str(), "{line}");
            assert_eq!(v["fields"]["target"], "fake/status-500", "{line}");
            found = true;
        }
    }
    assert!(found, "no attempt log line: {lines:#?}");
    for line in gw.stdout_lines() {
        serde_json::from_str::<Value>(&line)
            .unwrap_or_else(|e| panic!("stdout line that is not JSON ({e}): {line}"));
    }
    // The environment variable wins over the file.
    let fake = common::spawn_fake().await;
    let dir = config(&fake, "log_format: json\n");
    let mut gw = process::Process::start(
        &dir.path().join("promptgate.yaml"),
        &[
            ("FAKE_UPSTREAM_KEY", common::FAKE_KEY),
            ("PROMPTGATE_LOG_FORMAT", "text"),
        ],
    );
    gw.terminate();
    assert!(gw
        .stderr_lines()
        .iter()
        .any(|l| l.starts_with("promptgate listening on http://")));
}
