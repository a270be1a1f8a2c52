//! Shadow traffic end to end, on the real binary: sampled copies of live
//! requests go to candidate targets after the client's answer is chosen, are
//! compared, counted and reported (`promptgate readiness`); the client's answer
//! never changes and never waits for a candidate; private requests never reach
//! a commercial candidate; a busy candidate drops copies instead of queueing
//! them; shadow calls never touch the response cache and never show up in the
//! live metrics.
//!
//! The upstream here is a scripted loopback fake (OpenAI wire format) that
//! records every request and answers by model name: `mirror` answers exactly
//! like the sandbox's `echo` (so the two agree), `differ` answers like it but
//! slower, with one wrong tool argument and one invalid JSON answer, and the
//! rest fail in known ways (hang, 500, an error inside a 200, held until the
//! test lets it go).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/process.rs"]
mod process;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::Response;
use axum::routing::post as route_post;
use axum::Router;
use common::client;
use process::Process;
use serde_json::{json, Value};

/// How long `differ` waits before it answers.
const DIFFER_DELAY: Duration = Duration::from_millis(400);

// === the scripted fake upstream ===

#[derive(Clone, Debug)]
struct Seen {
    model: String,
    body: Value,
}

#[derive(Clone)]
struct ScriptState {
    log: Arc<Mutex<Vec<Seen>>>,
    /// `held` answers once it takes one of these (the test adds them).
    held: Arc<tokio::sync::Semaphore>,
}

struct Script {
    addr: SocketAddr,
    state: ScriptState,
}

impl Script {
    async fn start() -> Script {
        let state = ScriptState {
            log: Arc::default(),
            held: Arc::new(tokio::sync::Semaphore::new(0)),
        };
        let app = Router::new()
            .route("/v1/chat/completions", route_post(chat))
            .route("/search", route_post(search))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Script { addr, state }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The chat requests the model `model` received.
    fn seen(&self, model: &str) -> Vec<Seen> {
        let log = self.state.log.lock().unwrap();
        log.iter().filter(|s| s.model == model).cloned().collect()
    }

    /// The last user message of each request `model` received, in order.
    fn texts(&self, model: &str) -> Vec<String> {
        self.seen(model)
            .iter()
            .map(|s| last_user_text(&s.body))
            .collect()
    }

    /// A provider file for this fake (the model is chosen per target).
    fn provider(&self, self_hosted: bool) -> String {
        format!(
            "kind: openai\nbase_url: {}\nself_hosted: {self_hosted}\n\
             timeouts: {{connect: 2s, headers: 300s, idle: 300s, total: 300s}}\n",
            self.base_url()
        )
    }
}

fn last_user_text(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// One answer: text, or a tool call.
struct Reply {
    text: Option<String>,
    tool: Option<(String, String)>,
}

/// What the sandbox's `echo` answers: the last user message; `{"echo": …}`
/// when JSON is asked for; a call of the forced tool with `{"input": …}`.
fn echo_like(body: &Value) -> Reply {
    let text = last_user_text(body);
    let forced = match &body["tool_choice"] {
        Value::String(s) if s == "required" => body["tools"][0]["function"]["name"].as_str(),
        Value::Object(o) => o
            .get("function")
            .and_then(|f| f["name"].as_str())
            .filter(|_| o.get("type").is_some_and(|t| t == "function")),
        _ => None,
    };
    if let Some(name) = forced {
        let args = json!({ "input": text }).to_string();
        return Reply {
            text: None,
            tool: Some((name.to_owned(), args)),
        };
    }
    let json_asked = matches!(
        body["response_format"]["type"].as_str(),
        Some("json_object" | "json_schema")
    );
    let text = if json_asked {
        json!({ "echo": text }).to_string()
    } else {
        text
    };
    Reply {
        text: Some(text),
        tool: None,
    }
}

fn respond(status: u16, body: String) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

fn usage() -> Value {
    json!({"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19})
}

fn whole(model: &str, r: &Reply) -> Response {
    let mut message = json!({"role": "assistant", "content": r.text});
    let mut finish = "stop";
    if let Some((name, args)) = &r.tool {
        message["tool_calls"] = json!([{
            "id": "call_1", "type": "function",
            "function": {"name": name, "arguments": args}
        }]);
        finish = "tool_calls";
    }
    let body = json!({
        "id": "chatcmpl-script", "object": "chat.completion", "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage(),
    });
    respond(200, body.to_string())
}

/// The answer as an event stream, the text in 4-character pieces.
fn streamed(model: &str, r: &Reply, include_usage: bool) -> Response {
    let chunk = |delta: Value, finish: Value| {
        let c = json!({
            "id": "chatcmpl-script", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        });
        format!("data: {c}\n\n")
    };
    let mut out = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
    if let Some(text) = &r.text {
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(4) {
            let piece: String = piece.iter().collect();
            out.push_str(&chunk(json!({ "content": piece }), Value::Null));
        }
    }
    let mut finish = "stop";
    if let Some((name, args)) = &r.tool {
        out.push_str(&chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": name, "arguments": args}}]}),
            Value::Null,
        ));
        finish = "tool_calls";
    }
    out.push_str(&chunk(json!({}), finish.into()));
    if include_usage {
        let c = json!({
            "id": "chatcmpl-script", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": model, "choices": [], "usage": usage()
        });
        out.push_str(&format!("data: {c}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from(out))
        .unwrap()
}

async fn chat(State(state): State<ScriptState>, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = body["model"].as_str().unwrap_or("").to_owned();
    state.log.lock().unwrap().push(Seen {
        model: model.clone(),
        body: body.clone(),
    });
    let stream = body["stream"].as_bool().unwrap_or(false);
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let text = last_user_text(&body);
    let reply = match model.as_str() {
        "differ" => {
            tokio::time::sleep(DIFFER_DELAY).await;
            let mut r = echo_like(&body);
            if text.starts_with("wrong-tool") {
                if let Some((_, args)) = &mut r.tool {
                    *args = json!({"input": "somewhere else entirely"}).to_string();
                }
            }
            if text.starts_with("bad-json") && r.text.is_some() {
                r.text = Some("{\"echo\": \"unterminated".into());
            }
            r
        }
        "hang" => {
            tokio::time::sleep(Duration::from_secs(600)).await;
            echo_like(&body)
        }
        "fail500" => {
            return respond(
                500,
                json!({"error": {"message": "the candidate broke", "type": "server_error", "code": null}})
                    .to_string(),
            )
        }
        "error200" => {
            return respond(
                200,
                json!({"error": {"message": "the candidate broke inside a 200", "type": "server_error", "code": "internal"}})
                    .to_string(),
            )
        }
        "held" => {
            state.held.acquire().await.unwrap().forget();
            echo_like(&body)
        }
        "other" => Reply {
            text: Some("I am the candidate, and I say something else.".into()),
            tool: None,
        },
        // `mirror` and every recording candidate (`comm`, `own`, `cand`).
        _ => echo_like(&body),
    };
    if stream {
        streamed(&model, &reply, include_usage)
    } else {
        whole(&model, &reply)
    }
}

/// An `http` retriever's search: one internal passage.
async fn search(State(state): State<ScriptState>, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.log.lock().unwrap().push(Seen {
        model: "(search)".into(),
        body,
    });
    respond(
        200,
        json!({"results": [{"text": "Internal: the vault code is 4711.", "score": 0.9, "source": "vault.md"}]})
            .to_string(),
    )
}

// === the gateway process and its answers ===

/// Writes `gateway` (promptgate.yaml), `providers` and other `files` into a
/// fresh folder and starts the real binary on it.
fn start(
    gateway: &str,
    providers: &[(&str, String)],
    files: &[(&str, &str)],
) -> (tempfile::TempDir, Process) {
    let dir = tempfile::tempdir().unwrap();
    let mut all: Vec<(String, String)> = vec![(
        "sandbox.yaml".into(),
        "kind: sandbox\nsandbox:\n  models:\n    echo: {reply: echo}\n".into(),
    )];
    all.extend(
        providers
            .iter()
            .map(|(n, t)| (format!("{n}.yaml"), t.clone())),
    );
    common::write_config(dir.path(), gateway, &all);
    for (name, text) in files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let gw = Process::start(&dir.path().join("promptgate.yaml"), &[]);
    (dir, gw)
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
    took: Duration,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn post(gw: &Process, body: &Value, headers: &[(&str, &str)]) -> Answer {
    let started = Instant::now();
    let mut rb = client().post(gw.url("/v1/chat/completions")).json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    Answer {
        status,
        headers,
        text,
        took: started.elapsed(),
    }
}

fn ask(route: &str, text: &str) -> Value {
    json!({"model": route, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": text}
    ]})
}

fn ask_stream(route: &str, text: &str) -> Value {
    let mut b = ask(route, text);
    b["stream"] = true.into();
    b
}

fn ask_tool(route: &str, text: &str) -> Value {
    let mut b = ask(route, text);
    b["tools"] = json!([{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a place",
        "parameters": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}
    }}]);
    b["tool_choice"] = "required".into();
    b
}

fn ask_json(route: &str, text: &str) -> Value {
    let mut b = ask(route, text);
    b["response_format"] = json!({"type": "json_object"});
    b
}

/// Polls `f` until it gives a value, at most `within`.
async fn until<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls `done` until it holds, at most 20 s.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn experiments(gw: &Process) -> Value {
    gw.admin_get("/admin/experiments").await
}

/// The live figures of `candidate` on `route` (and `arm`), if it has any.
async fn figures(gw: &Process, route: &str, arm: Option<&str>, candidate: &str) -> Option<Value> {
    let v = experiments(gw).await;
    v["shadows"].as_array()?.iter().find_map(|s| {
        (s["route"] == route && s["arm"].as_str() == arm && s["candidate"] == candidate)
            .then(|| s.clone())
    })
}

/// Waits until `candidate` on `route` has `n` pairs; its figures then.
async fn pairs(gw: &Process, route: &str, arm: Option<&str>, candidate: &str, n: u64) -> Value {
    until(
        &format!("{n} pairs of {candidate} on {route}"),
        Duration::from_secs(30),
        || async move {
            let f = figures(gw, route, arm, candidate).await?;
            assert!(
                f["pairs"].as_u64().unwrap() <= n,
                "more than {n} pairs of {candidate} on {route}: {f}"
            );
            (f["pairs"] == n).then_some(f)
        },
    )
    .await
}

/// The sum of the samples of `name` whose labels include every one of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

// === 1. figures of two candidates, live and in the report ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_against_two_candidates_has_exact_figures() {
    let fake = Script::start().await;
    let gateway = "listen: 127.0.0.1:0\nshadow: {store: data/pairs.sqlite}\nroutes:\n  assist:\n    provider: live\n    model: mirror\n    shadow:\n      targets: [{provider: sandbox, model: echo}, {provider: cand, model: differ}]\n      sample: 1.0\n      max_in_flight: 32\n      keep_outputs: true\n    readiness: {min_pairs: 6, max_error_rate: 0.0, max_p95_latency_ratio: 1000, min_tool_agreement: 1.0, min_json_validity: 1.0, min_similarity_p50: 0.5}\n";
    let (dir, mut gw) = start(
        gateway,
        &[
            ("live", fake.provider(false)),
            ("cand", fake.provider(false)),
        ],
        &[],
    );
    let requests = [
        ask("assist", "Tell me about alpha."),
        ask_stream("assist", "Tell me about beta, streamed."),
        ask_tool("assist", "Weather in Paris?"),
        ask_tool("assist", "wrong-tool: weather in Rome?"),
        ask_json("assist", "json: three colours"),
        ask_json("assist", "bad-json: three colours"),
    ];
    for body in &requests {
        let a = post(&gw, body, &[]).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    let n = requests.len() as u64;
    let sandbox = pairs(&gw, "assist", None, "sandbox/echo", n).await;
    let differ = pairs(&gw, "assist", None, "cand/differ", n).await;
    assert_eq!(fake.seen("mirror").len(), requests.len());
    assert_eq!(fake.seen("differ").len(), requests.len());

    // The sandbox answers exactly like the primary.
    assert_eq!(sandbox["primary_errors"], 0, "{sandbox}");
    assert_eq!(sandbox["candidate_errors"], 0, "{sandbox}");
    assert_eq!(sandbox["compared"], n, "{sandbox}");
    assert_eq!(sandbox["exact_match_rate"], 1.0, "{sandbox}");
    assert_eq!(sandbox["tool_agreement"], 1.0, "{sandbox}");
    assert_eq!(sandbox["json_validity"], 1.0, "{sandbox}");
    assert_eq!(sandbox["similarity_p50"], 1.0, "{sandbox}");
    // The other candidate: one wrong tool call of two, one invalid JSON of two,
    // so 4 of 6 answers equal; and slower than its delay.
    assert_eq!(differ["primary_errors"], 0, "{differ}");
    assert_eq!(differ["candidate_errors"], 0, "{differ}");
    assert_eq!(differ["compared"], n, "{differ}");
    assert!(
        close(differ["exact_match_rate"].as_f64().unwrap(), 4.0 / 6.0),
        "{differ}"
    );
    assert_eq!(differ["tool_agreement"], 0.5, "{differ}");
    assert_eq!(differ["json_validity"], 0.5, "{differ}");
    let slow_p50 = differ["candidate_latency_p50_ms"].as_f64().unwrap();
    assert!(
        slow_p50 >= DIFFER_DELAY.as_secs_f64() * 1000.0,
        "the slower candidate's p50 {slow_p50} ms is under its delay: {differ}"
    );
    assert!(
        sandbox["candidate_latency_p50_ms"].as_f64().unwrap() < slow_p50,
        "{sandbox} {differ}"
    );

    let m = gw.metrics().await;
    for c in ["sandbox/echo", "cand/differ"] {
        let calls = metric(
            &m,
            "promptgate_shadow_calls_total",
            &[("route", "assist"), ("candidate", c), ("outcome", "ok")],
        );
        assert_eq!(calls, 6.0, "{c}: {m}");
    }

    // The store is written out at shutdown; the report reads it.
    gw.terminate();
    let report = readiness(
        &dir.path().join("promptgate.yaml"),
        "assist",
        &dir.path().join("out/assist"),
    )
    .await;
    check_report(&report, n);
}

/// Runs `promptgate readiness --route R --config C --out PREFIX`; the JSON
/// report (the Markdown one is checked to exist and name the candidates).
async fn readiness(config: &Path, route: &str, prefix: &Path) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["readiness", "--route", route, "--config"])
        .arg(config)
        .arg("--out")
        .arg(prefix)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "readiness failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let with = |ext: &str| PathBuf::from(format!("{}.{ext}", prefix.display()));
    let md = std::fs::read_to_string(with("md")).unwrap();
    assert!(
        md.contains("sandbox/echo") && md.contains("cand/differ"),
        "{md}"
    );
    serde_json::from_str(&std::fs::read_to_string(with("json")).unwrap()).unwrap()
}

/// The report's figures: the same as the live ones, and the verdict the
/// route's thresholds give.
fn check_report(report: &Value, n: u64) {
    assert_eq!(report["route"], "assist", "{report:#}");
    assert_eq!(report["pairs"], 2 * n, "{report:#}");
    let of = |c: &str| -> Value {
        report["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["candidate"] == c)
            .unwrap_or_else(|| panic!("no {c} in {report:#}"))
            .clone()
    };
    let check = |r: &Value, name: &str| -> Value {
        r["verdict"]["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name} in {r:#}"))
            .clone()
    };
    let sandbox = of("sandbox/echo");
    let differ = of("cand/differ");
    for r in [&sandbox, &differ] {
        assert_eq!(r["pairs"], n, "{r:#}");
        assert_eq!(r["compared"], n, "{r:#}");
        assert_eq!(r["primary_side"]["errors"], 0, "{r:#}");
        assert_eq!(r["candidate_side"]["errors"], 0, "{r:#}");
        assert_eq!(r["json"]["pairs"], 2, "{r:#}");
        assert_eq!(r["json"]["primary_validity"], 1.0, "{r:#}");
        assert_eq!(r["tools"]["pairs"], 2, "{r:#}");
        assert_eq!(
            r["candidate_side"]["finish_reasons"],
            json!({"stop": 4, "tool_calls": 2}),
            "{r:#}"
        );
        assert_eq!(check(r, "error_rate")["met"], true, "{r:#}");
        assert_eq!(check(r, "error_rate")["figure"], 0.0, "{r:#}");
        assert_eq!(check(r, "compared_pairs")["met"], true, "{r:#}");
        assert_eq!(check(r, "compared_pairs")["figure"], n as f64, "{r:#}");
    }
    assert_eq!(
        sandbox["similarity"]["exact_match_rate"], 1.0,
        "{sandbox:#}"
    );
    assert_eq!(sandbox["json"]["candidate_validity"], 1.0, "{sandbox:#}");
    assert_eq!(sandbox["tools"]["agreement"], 1.0, "{sandbox:#}");
    assert_eq!(sandbox["verdict"]["ready"], true, "{sandbox:#}");
    for c in sandbox["verdict"]["checks"].as_array().unwrap() {
        assert_eq!(c["met"], true, "{sandbox:#}");
    }

    assert!(
        close(
            differ["similarity"]["exact_match_rate"].as_f64().unwrap(),
            4.0 / 6.0
        ),
        "{differ:#}"
    );
    assert_eq!(differ["json"]["candidate_validity"], 0.5, "{differ:#}");
    assert_eq!(differ["tools"]["agreement"], 0.5, "{differ:#}");
    let p50 = differ["candidate_side"]["latency_ms"]["p50"]
        .as_f64()
        .unwrap();
    assert!(p50 >= DIFFER_DELAY.as_secs_f64() * 1000.0, "{differ:#}");
    assert_eq!(differ["verdict"]["ready"], false, "{differ:#}");
    for (name, figure) in [("tool_agreement", 0.5), ("json_validity", 0.5)] {
        let c = check(&differ, name);
        assert_eq!(c["met"], false, "{c}");
        assert_eq!(c["figure"], figure, "{c}");
    }
    // The outputs were kept: the disagreements are listed, with their request.
    let why: Vec<&str> = differ["worst"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["why"].as_str())
        .collect();
    assert!(
        why.contains(&"tool_disagreement") && why.contains(&"invalid_json"),
        "{differ:#}"
    );
}

// === 2. the client's answer never changes ===

/// A completion (or chunk) without what differs between two calls (id,
/// created) and with `model`, the route the client asked for, checked and
/// set aside.
fn comparable(mut v: Value, route: &str) -> Value {
    if let Value::Object(o) = &mut v {
        o.remove("id");
        o.remove("created");
        if let Some(m) = o.remove("model") {
            assert_eq!(m, route, "the answer shows the route asked for");
        }
    }
    v
}

/// The data events of a stream, each made comparable.
fn comparable_stream(text: &str, route: &str) -> Vec<Value> {
    common::sse_data(text)
        .into_iter()
        .map(|d| match serde_json::from_str(&d) {
            Ok(v) => comparable(v, route),
            Err(_) => Value::String(d),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadowing_never_changes_the_clients_answer() {
    let fake = Script::start().await;
    let gateway = "listen: 127.0.0.1:0\nroutes:\n  plain:\n    provider: live\n    model: mirror\n  hangs:\n    provider: live\n    model: mirror\n    shadow: {targets: [{provider: cand, model: hang}], sample: 1.0}\n  fails:\n    provider: live\n    model: mirror\n    shadow: {targets: [{provider: cand, model: fail500}, {provider: cand, model: error200}], sample: 1.0}\n  plain-down:\n    provider: live\n    model: fail500\n  down:\n    provider: live\n    model: fail500\n    shadow: {targets: [{provider: cand, model: mirror}], sample: 1.0}\n  locked:\n    provider: live\n    model: mirror\n    shadow: {targets: [{provider: own, model: mirror}], sample: 1.0}\n";
    let (dir, mut gw) = start(
        gateway,
        &[
            ("live", fake.provider(false)),
            ("cand", fake.provider(false)),
            ("own", fake.provider(true)),
        ],
        &[],
    );
    let bodies = |route: &str| {
        vec![
            ask(route, "Hello there."),
            ask_stream(route, "Hello there, streamed."),
            ask_tool(route, "Weather in Oslo?"),
            ask_json(route, "json please"),
        ]
    };
    let plain: Vec<Answer> = {
        let mut v = Vec::new();
        for b in bodies("plain") {
            v.push(post(&gw, &b, &[]).await);
        }
        v
    };
    for route in ["hangs", "fails"] {
        for (i, b) in bodies(route).iter().enumerate() {
            let a = post(&gw, b, &[]).await;
            let p = &plain[i];
            assert_eq!(a.status, p.status, "{route} #{i}: {}", a.text);
            assert_eq!(a.status, 200, "{route} #{i}: {}", a.text);
            // The client's answer is the primary's, whatever the candidate does,
            // and it never waits for the candidate (`hang` answers after 600 s).
            assert!(
                a.took < Duration::from_secs(10),
                "{route} #{i} took {:?}",
                a.took
            );
            if b["stream"] == true {
                assert_eq!(
                    comparable_stream(&a.text, route),
                    comparable_stream(&p.text, "plain"),
                    "{route} #{i}"
                );
            } else {
                assert_eq!(
                    comparable(a.json(), route),
                    comparable(p.json(), "plain"),
                    "{route} #{i}"
                );
            }
            assert_eq!(a.header("x-promptgate-target"), "live/mirror");
        }
    }
    // Every copy went out: the hanging ones are still in flight, the failing
    // ones are counted as candidate errors.
    wait_for("the hanging copies", || fake.seen("hang").len() == 4).await;
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "promptgate_shadow_in_flight", &[("route", "hangs")]),
        4.0,
        "{m}"
    );
    for c in ["cand/fail500", "cand/error200"] {
        let f = pairs(&gw, "fails", None, c, 4).await;
        assert_eq!(f["candidate_errors"], 4, "{f}");
        assert_eq!(f["primary_errors"], 0, "{f}");
        assert_eq!(f["compared"], 0, "{f}");
    }
    assert!(figures(&gw, "hangs", None, "cand/hang").await.is_none());

    // A primary that fails (its upstream, or no target may take a private
    // request): the client's error is the same with a candidate (which
    // answers) as without one; the pair records the primary's failure.
    let private: &[(&str, &str)] = &[("x-promptgate-data", "private")];
    for (bare, shadowed, headers) in [
        ("plain-down", "down", &[][..]),
        ("plain", "locked", private),
    ] {
        for stream in [false, true] {
            let mut want = ask(bare, "Is anyone there?");
            let mut got = ask(shadowed, "Is anyone there?");
            want["stream"] = stream.into();
            got["stream"] = stream.into();
            let p = post(&gw, &want, headers).await;
            let a = post(&gw, &got, headers).await;
            assert!(p.status >= 500, "{bare}: {} {}", p.status, p.text);
            assert_eq!(a.status, p.status, "{shadowed}: {}", a.text);
            assert_eq!(
                without_request_id(a.json(), shadowed),
                without_request_id(p.json(), bare),
                "{shadowed}, stream: {stream}"
            );
        }
    }
    let f = pairs(&gw, "down", None, "cand/mirror", 2).await;
    assert_eq!(f["primary_errors"], 2, "{f}");
    assert_eq!(f["candidate_errors"], 0, "{f}");
    assert_eq!(f["compared"], 0, "{f}");
    let f = pairs(&gw, "locked", None, "own/mirror", 2).await;
    assert_eq!(f["primary_errors"], 2, "{f}");
    assert_eq!(f["candidate_errors"], 0, "{f}");

    // The stored pairs name the primary's failure: the upstream's kind, or
    // that no target could take the request (the client did not leave).
    gw.terminate();
    let store = dir.path().join("data/shadow.sqlite");
    let errors = |route: &str| -> Vec<Option<String>> {
        promptgate::shadow::store::read(&store, route, None, None)
            .unwrap()
            .into_iter()
            .map(|p| p.primary.error)
            .collect()
    };
    assert_eq!(errors("down"), vec![Some("overloaded".to_string()); 2]);
    assert_eq!(
        errors("locked"),
        vec![Some("no_target_available".to_string()); 2]
    );
}

/// An error body without what differs per request (its request id, the
/// attempts' elapsed times), the route's name in its message made generic.
fn without_request_id(mut v: Value, route: &str) -> Value {
    if let Some(e) = v["error"].as_object_mut() {
        e.remove("request_id");
        // Each attempt's time is its own.
        if let Some(Value::Array(attempts)) = e.get_mut("attempts") {
            for a in attempts {
                if let Some(a) = a.as_object_mut() {
                    a.remove("elapsed_ms");
                }
            }
        }
        if let Some(Value::String(m)) = e.get_mut("message") {
            *m = m.replace(&format!("`{route}`"), "`(route)`");
        }
    }
    v
}

// === 3. privacy ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_requests_never_reach_a_commercial_candidate() {
    let fake = Script::start().await;
    let shadow = "    shadow: {targets: [{provider: comm, model: comm}, {provider: own, model: own}], sample: 1.0}\n";
    let gateway = format!(
        "listen: 127.0.0.1:0\nroutes:\n  pub:\n    provider: live\n    model: mirror\n{shadow}  priv:\n    private: true\n    provider: live\n    model: mirror\n{shadow}  guarded:\n    data: private\n    provider: live\n    model: mirror\n{shadow}"
    );
    let retriever = format!(
        "kind: http\nurl: http://{}/search\nprivate: true\ntimeout: 5s\n",
        fake.addr
    );
    let (_dir, gw) = start(
        &gateway,
        &[
            ("live", fake.provider(true)),
            ("comm", fake.provider(false)),
            ("own", fake.provider(true)),
        ],
        &[("retrievers/vault.yaml", &retriever)],
    );
    let private = [("x-promptgate-data", "private")];
    let mut rag = ask("pub", "secret four: what is the vault code?");
    rag["retrieval"] = json!({"retriever": "vault"});
    type Case<'a> = (&'a str, Value, &'a [(&'a str, &'a str)]);
    let cases: Vec<Case> = vec![
        ("pub", ask("pub", "secret one"), &private),
        ("pub", ask_stream("pub", "secret one, streamed"), &private),
        ("priv", ask("priv", "secret two"), &[]),
        (
            "guarded",
            ask("guarded", "secret three: write to alice@example.com"),
            &[],
        ),
        ("pub", rag, &[]),
    ];
    for (route, body, headers) in &cases {
        let a = post(&gw, body, headers).await;
        assert_eq!(a.status, 200, "{route}: {}", a.text);
    }
    // The self-hosted candidate received every private copy…
    wait_for("the self-hosted candidate's copies", || {
        fake.seen("own").len() == cases.len()
    })
    .await;
    assert_eq!(
        fake.seen("(search)").len(),
        1,
        "the private retriever was searched"
    );
    assert!(
        fake.seen("own")
            .iter()
            .any(|s| s.body.to_string().contains("4711")),
        "the passages went to the self-hosted candidate"
    );
    // …and the commercial one none: the drops are counted, per route.
    let m = gw.metrics().await;
    let dropped = |route: &str| {
        metric(
            &m,
            "promptgate_shadow_dropped_total",
            &[("route", route), ("reason", "private")],
        )
    };
    assert_eq!(dropped("pub"), 3.0, "{m}");
    assert_eq!(dropped("priv"), 1.0, "{m}");
    assert_eq!(dropped("guarded"), 1.0, "{m}");
    assert!(fake.seen("comm").is_empty(), "{:?}", fake.texts("comm"));

    // A positive control: a public request on the public route reaches it.
    let a = post(&gw, &ask("pub", "public five"), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    pairs(&gw, "pub", None, "comm/comm", 1).await;
    assert_eq!(fake.texts("comm"), vec!["public five".to_string()]);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "promptgate_shadow_dropped_total",
            &[("reason", "private")]
        ),
        5.0,
        "{m}"
    );
    // No private text ever went to the commercial candidate.
    for s in fake.seen("comm") {
        let t = s.body.to_string();
        assert!(
            !t.contains("secret") && !t.contains("4711") && !t.contains("alice"),
            "{t}"
        );
    }
}

// === 4. the in-flight bound ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_candidate_drops_copies_beyond_max_in_flight() {
    let fake = Script::start().await;
    let gateway = "listen: 127.0.0.1:0\nroutes:\n  busy:\n    provider: live\n    model: mirror\n    shadow: {targets: [{provider: cand, model: held}], sample: 1.0, max_in_flight: 1}\n";
    let (_dir, gw) = start(
        gateway,
        &[
            ("live", fake.provider(false)),
            ("cand", fake.provider(false)),
        ],
        &[],
    );
    // The candidate answers only when the test lets it: the first copy holds
    // the only slot for as long as the test wants.
    for i in 0..5 {
        let a = post(&gw, &ask("busy", &format!("request {i}")), &[]).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    wait_for("the first copy", || fake.seen("held").len() == 1).await;
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "promptgate_shadow_dropped_total",
            &[("route", "busy"), ("reason", "in_flight")]
        ),
        4.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "promptgate_shadow_in_flight", &[("route", "busy")]),
        1.0,
        "{m}"
    );
    assert_eq!(fake.texts("held"), vec!["request 0".to_string()]);

    // Once it answers, its slot is free again: the next copy goes out.
    fake.state.held.add_permits(1);
    let f = pairs(&gw, "busy", None, "cand/held", 1).await;
    assert_eq!(f["compared"], 1, "{f}");
    assert_eq!(f["exact_match_rate"], 1.0, "{f}");
    let g = &gw;
    until(
        "the slot to be free",
        Duration::from_secs(20),
        || async move {
            let m = g.metrics().await;
            (metric(&m, "promptgate_shadow_in_flight", &[("route", "busy")]) == 0.0).then_some(())
        },
    )
    .await;
    let a = post(&gw, &ask("busy", "request 5"), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    fake.state.held.add_permits(1);
    pairs(&gw, "busy", None, "cand/held", 2).await;
    assert_eq!(
        fake.texts("held"),
        vec!["request 0".to_string(), "request 5".to_string()]
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "promptgate_shadow_dropped_total", &[("route", "busy")]),
        4.0,
        "{m}"
    );
}

// === 5. the cache, and labels ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_calls_never_touch_the_cache() {
    let fake = Script::start().await;
    let gateway = "listen: 127.0.0.1:0\nroutes:\n  cached:\n    provider: live\n    model: mirror\n    cache: {mode: on, ttl: 1h}\n    shadow: {targets: [{provider: cand, model: other}], sample: 1.0}\n  direct:\n    provider: cand\n    model: other\n    cache: {mode: on, ttl: 1h}\n";
    let (_dir, gw) = start(
        gateway,
        &[
            ("live", fake.provider(false)),
            ("cand", fake.provider(false)),
        ],
        &[],
    );
    let first = post(&gw, &ask("cached", "What is the capital of France?"), &[]).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.header("x-promptgate-cache"), "miss");
    pairs(&gw, "cached", None, "cand/other", 1).await;

    // The repeat is a hit with the primary's answer, and is not copied.
    let again = post(&gw, &ask("cached", "What is the capital of France?"), &[]).await;
    assert_eq!(again.header("x-promptgate-cache"), "hit", "{}", again.text);
    assert_eq!(
        again.json()["choices"][0]["message"]["content"],
        "What is the capital of France?"
    );
    let streamed = post(
        &gw,
        &ask_stream("cached", "What is the capital of France?"),
        &[],
    )
    .await;
    assert_eq!(streamed.header("x-promptgate-cache"), "hit");
    assert!(
        !streamed.text.contains("I am the candidate"),
        "{}",
        streamed.text
    );
    // A different request is copied; the repeats were not (one pair each).
    let other = post(&gw, &ask("cached", "And of Italy?"), &[]).await;
    assert_eq!(other.header("x-promptgate-cache"), "miss");
    pairs(&gw, "cached", None, "cand/other", 2).await;
    assert_eq!(
        fake.texts("other"),
        vec![
            "What is the capital of France?".to_string(),
            "And of Italy?".to_string()
        ]
    );
    assert_eq!(fake.seen("mirror").len(), 2);

    // The candidate's answer was stored nowhere: asking the candidate's own
    // cached route the same question is a miss.
    let direct = post(&gw, &ask("direct", "What is the capital of France?"), &[]).await;
    assert_eq!(
        direct.header("x-promptgate-cache"),
        "miss",
        "{}",
        direct.text
    );

    // Live metrics never name the candidate's calls; the shadow series do.
    let m = gw.metrics().await;
    for name in ["promptgate_attempts_total", "promptgate_requests_total"] {
        let on_cached: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with(name) && l.contains("route=\"cached\""))
            .collect();
        assert!(!on_cached.is_empty(), "{name}: {m}");
        for l in on_cached {
            assert!(
                !l.contains("cand"),
                "a live series names the candidate: {l}"
            );
        }
    }
    assert_eq!(
        metric(
            &m,
            "promptgate_shadow_calls_total",
            &[
                ("route", "cached"),
                ("candidate", "cand/other"),
                ("outcome", "ok")
            ]
        ),
        2.0,
        "{m}"
    );
}

// === 6. an arm's own candidates ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadowing_through_a_split_arm() {
    let fake = Script::start().await;
    let gateway = "listen: 127.0.0.1:0\nroutes:\n  ab:\n    split:\n      subject: header:x-user\n      arms:\n        - {name: a, weight: 50, provider: live, model: mirror, shadow: {targets: [{provider: cand, model: cand}], sample: 1.0}}\n        - {name: b, weight: 50, provider: live, model: mirror}\n";
    let (_dir, gw) = start(
        gateway,
        &[
            ("live", fake.provider(false)),
            ("cand", fake.provider(false)),
        ],
        &[],
    );
    let mut on_a = Vec::new();
    let mut on_b = 0;
    for i in 0..24 {
        let text = format!("user {i} asks");
        let a = post(&gw, &ask("ab", &text), &[("x-user", &format!("u{i}"))]).await;
        assert_eq!(a.status, 200, "{}", a.text);
        match a.header("x-promptgate-arm") {
            "a" => on_a.push(text),
            "b" => on_b += 1,
            other => panic!("arm {other:?}"),
        }
    }
    assert!(
        !on_a.is_empty() && on_b > 0,
        "both arms served: {} / {on_b}",
        on_a.len()
    );
    let f = pairs(&gw, "ab", Some("a"), "cand/cand", on_a.len() as u64).await;
    assert_eq!(f["compared"], on_a.len() as u64, "{f}");
    let mut got = fake.texts("cand");
    got.sort();
    on_a.sort();
    assert_eq!(got, on_a, "only arm a's requests were copied");
    assert!(figures(&gw, "ab", Some("b"), "cand/cand").await.is_none());
}

// === 7. a real llama.cpp server, where there is one ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_llamacpp_server() {
    let Ok(url) = std::env::var("PROMPTGATE_TEST_LLAMACPP_URL") else {
        eprintln!("skipped: set PROMPTGATE_TEST_LLAMACPP_URL to an OpenAI-compatible llama.cpp server (…/v1)");
        return;
    };
    let model = std::env::var("PROMPTGATE_TEST_LLAMACPP_MODEL").unwrap_or_else(|_| "local".into());
    let gateway = format!("listen: 127.0.0.1:0\nroutes:\n  sb:\n    provider: sandbox\n    model: echo\n    shadow: {{targets: [{{provider: llama, model: {model}, params: {{max_tokens: 16, temperature: 0}}}}], sample: 1.0}}\n");
    let provider = format!(
        "kind: openai\nbase_url: {}\nself_hosted: true\ntimeouts: {{connect: 5s, headers: 300s, idle: 120s, total: 600s}}\n",
        url.trim_end_matches('/')
    );
    let (_dir, gw) = start(&gateway, &[("llama", provider)], &[]);
    let a = post(&gw, &ask("sb", "Say the word hello."), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let s = post(&gw, &ask_stream("sb", "Say the word goodbye."), &[]).await;
    assert_eq!(s.status, 200, "{}", s.text);
    let candidate = format!("llama/{model}");
    let (g, c) = (&gw, candidate.as_str());
    let f = until(
        "the llama.cpp pairs",
        Duration::from_secs(600),
        || async move {
            let f = figures(g, "sb", None, c).await?;
            (f["pairs"] == 2).then_some(f)
        },
    )
    .await;
    assert_eq!(f["candidate_errors"], 0, "{f}");
    assert_eq!(f["compared"], 2, "{f}");
    assert!(f["candidate_latency_p50_ms"].as_f64().unwrap() > 0.0, "{f}");
}

// === 8. replay over recorded files ===

/// Runs `promptgate replay` on `from` for `route` to `candidate`; its
/// standard output.
async fn replay(dir: &Path, from: &Path, route: &str, candidate: &str, out: &str) -> String {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["replay", "--route", route, "--candidate", candidate])
        .args(["--rps", "50", "--config"])
        .arg(dir.join("promptgate.yaml"))
        .arg("--from")
        .arg(from)
        .arg("--out")
        .arg(dir.join(out))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "replay failed: {stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_never_sends_a_private_record_to_a_commercial_candidate() {
    let fake = Script::start().await;
    let gateway = "listen: 127.0.0.1:0\naudit: {path: audit.jsonl, content: true}\nroutes:\n  assist:\n    provider: live\n    model: mirror\n";
    let retriever = format!(
        "kind: http\nurl: http://{}/search\nprivate: true\ntimeout: 5s\n",
        fake.addr
    );
    let (dir, mut gw) = start(
        gateway,
        &[
            ("live", fake.provider(true)),
            ("comm", fake.provider(false)),
            ("own", fake.provider(true)),
        ],
        &[("retrievers/vault.yaml", &retriever)],
    );
    let mut rag = ask("assist", "secret three: what is the vault code?");
    rag["retrieval"] = json!({"retriever": "vault"});
    let sent: [(Value, &[(&str, &str)]); 3] = [
        (ask("assist", "public one"), &[]),
        (
            ask("assist", "secret two"),
            &[("x-promptgate-data", "private")],
        ),
        (rag, &[]),
    ];
    for (body, headers) in &sent {
        let a = post(&gw, body, headers).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    gw.terminate();
    let audit = dir.path().join("audit.jsonl");
    let lines = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(lines.lines().count(), 3, "{lines}");

    // The commercial candidate gets the public request only…
    let out = replay(dir.path(), &audit, "assist", "comm/comm", "to-comm").await;
    assert_eq!(fake.texts("comm"), vec!["public one".to_string()], "{out}");
    assert!(
        out.contains("1 pair(s), 1 compared") && out.contains(", 2 private"),
        "{out}"
    );
    // …the self-hosted one all three (the retrieved passage included).
    let out = replay(dir.path(), &audit, "assist", "own/own", "to-own").await;
    let mut got = fake.texts("own");
    got.sort();
    assert_eq!(
        got,
        vec![
            "public one".to_string(),
            "secret three: what is the vault code?".to_string(),
            "secret two".to_string()
        ],
        "{out}"
    );
    assert!(
        out.contains("3 pair(s), 3 compared") && out.contains(", 0 private"),
        "{out}"
    );
    assert!(
        fake.seen("own")
            .iter()
            .any(|s| s.body.to_string().contains("4711")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_over_a_recorded_file_pairs_every_request() {
    let fake = Script::start().await;
    let gateway = "listen: 127.0.0.1:0\nroutes:\n  assist:\n    provider: live\n    model: mirror\n    readiness: {min_pairs: 3}\n";
    let dir = tempfile::tempdir().unwrap();
    let mut providers = vec![(
        "sandbox.yaml".to_string(),
        "kind: sandbox\nsandbox:\n  models:\n    echo: {reply: echo}\n".to_string(),
    )];
    providers.push(("live.yaml".into(), fake.provider(false)));
    providers.push(("cand.yaml".into(), fake.provider(false)));
    common::write_config(dir.path(), gateway, &providers);
    let requests = [
        ask("ignored", "Tell me about alpha."),
        ask_tool("ignored", "wrong-tool: weather in Rome?"),
        ask_json("ignored", "bad-json: three colours"),
    ];
    let mut jsonl: String = requests.iter().map(|r| format!("{r}\n")).collect();
    jsonl.push_str("this line is not JSON\n");
    let from = dir.path().join("requests.jsonl");
    std::fs::write(&from, jsonl).unwrap();
    let out = replay(dir.path(), &from, "assist", "cand/differ", "replayed").await;
    assert!(out.contains("3 pair(s), 3 compared"), "{out}");
    assert!(out.contains("1 unreadable"), "{out}");
    // The primary (the route's target) and the candidate each answered all.
    assert_eq!(fake.seen("mirror").len(), 3);
    assert_eq!(fake.seen("differ").len(), 3);
    check_replay_report(&dir.path().join("replayed.json"));
}

/// The replay's report: three pairs of the candidate, each compared, one
/// wrong tool call of one and one invalid JSON answer of one.
fn check_replay_report(path: &Path) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no report at {}: {e}", path.display()));
    let report: Value = serde_json::from_str(&text).unwrap();
    let c = report["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["candidate"] == "cand/differ")
        .unwrap_or_else(|| panic!("{report:#}"))
        .clone();
    assert_eq!(c["pairs"], 3, "{c:#}");
    assert_eq!(c["compared"], 3, "{c:#}");
    assert_eq!(c["tools"]["pairs"], 1, "{c:#}");
    assert_eq!(c["tools"]["agreement"], 0.0, "{c:#}");
    assert_eq!(c["json"]["pairs"], 1, "{c:#}");
    assert_eq!(c["json"]["candidate_validity"], 0.0, "{c:#}");
    assert!(
        close(
            c["similarity"]["exact_match_rate"].as_f64().unwrap(),
            1.0 / 3.0
        ),
        "{c:#}"
    );
    assert_eq!(c["verdict"]["ready"], false, "{c:#}");
}

/// Replay applies the route's data protection to every recorded request as a
/// live request gets it: a request its policy makes private never reaches a
/// commercial candidate, and a redacting route's candidate sees placeholders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_applies_the_routes_data_protection() {
    let fake = Script::start().await;
    let gateway = "listen: 127.0.0.1:0\nroutes:\n  guarded:\n    data: private\n    provider: own\n    model: mirror\n  redacting:\n    data: redact\n    provider: own\n    model: mirror\n";
    let dir = tempfile::tempdir().unwrap();
    let providers = vec![
        ("own.yaml".to_string(), fake.provider(true)),
        ("comm.yaml".to_string(), fake.provider(false)),
    ];
    common::write_config(dir.path(), gateway, &providers);
    let secret = "mail ada@example.com about it";
    let jsonl = format!("{}\n{}\n", ask("x", secret), ask("x", "nothing to hide"));
    let from = dir.path().join("requests.jsonl");
    std::fs::write(&from, jsonl).unwrap();

    let out = replay(dir.path(), &from, "guarded", "comm/comm", "guarded").await;
    assert!(
        out.contains("1 pair(s)") && out.contains(", 1 private"),
        "{out}"
    );
    let texts = fake.texts("comm");
    assert_eq!(texts, vec!["nothing to hide".to_string()]);

    let out = replay(dir.path(), &from, "redacting", "comm/comm", "redacting").await;
    assert!(out.contains("2 pair(s)"), "{out}");
    let texts = fake.texts("comm");
    assert_eq!(texts.len(), 3, "{texts:?}");
    assert!(
        texts.iter().all(|t| !t.contains("ada@example.com")),
        "{texts:?}"
    );
    assert!(texts.iter().any(|t| t.contains("[EMAIL_1]")), "{texts:?}");
}
