//! The same-dialect fast path: an OpenAI request to an OpenAI-compatible
//! backend goes out as the client's bytes (only `model`, and a stream's
//! `stream_options`, spliced in) and the answer's bytes come back with only
//! `model` replaced. Each case runs against two gateways whose configs differ
//! only by `fast_path: false`, and what the client sees (status, the
//! gateway's headers, the error JSON, usage, limits, cost) must be the same;
//! a scripted upstream records the bytes it is sent, so which path was taken
//! is visible there.
// Test servers are started freely; the gateway's own tasks go through
// promptgate::task::spawn (clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use common::{client, spawn_gateway_with_files, Gw};
use serde_json::{json, Value};

// === a scripted OpenAI-compatible upstream ===

/// What the upstream was sent, byte for byte.
#[derive(Clone, Default)]
struct Upstream {
    seen: Arc<Mutex<Vec<Bytes>>>,
}

impl Upstream {
    fn last(&self) -> Bytes {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request")
    }
    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

const TEXT: [&str; 3] = ["Hi", " there", "."];

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> String {
    format!(
        "data: {}\n\n",
        json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 7,
               "model": model, "x_vendor": "kept",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    )
}

/// The upstream's behaviour is its model name: `ok`, `nousage`, `error200`,
/// `fail503`, `cut-before` / `cut-after` (a stream whose connection drops
/// before / after its first output), `inband` (an error event after output),
/// `inband-first` (an error event before any), `nodone` (no `[DONE]`).
async fn upstream_chat(State(up): State<Upstream>, body: Bytes) -> Response {
    up.seen.lock().unwrap().push(body.clone());
    let v: Value = serde_json::from_slice(&body).unwrap();
    let model = v["model"].as_str().unwrap_or("").to_owned();
    let stream = v["stream"] == true;
    let usage = v["stream_options"]["include_usage"] == true;
    let json_answer = |status: u16, body: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    match model.as_str() {
        "fail503" => {
            return json_answer(
                503,
                json!({"error": {"message": "upstream is busy", "type": "server_error", "code": null}}),
            )
        }
        "error200" => {
            return json_answer(
                200,
                json!({"error": {"message": "The server is overloaded", "type": "server_error", "code": "overloaded"}}),
            )
        }
        _ => {}
    }
    if !stream {
        let mut answer = json!({"id": "chatcmpl-up", "object": "chat.completion", "created": 7,
            "model": "served-by-upstream", "x_vendor": "kept",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT.concat()},
                         "finish_reason": "stop"}]});
        if model != "nousage" {
            answer["usage"] =
                json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13});
        }
        return json_answer(200, answer);
    }
    let m = "served-by-upstream";
    let mut parts: Vec<Result<String, std::io::Error>> = vec![Ok(chunk(
        m,
        json!({"role": "assistant", "content": ""}),
        None,
    ))];
    let cut = || Err(std::io::Error::other("connection dropped"));
    match model.as_str() {
        "cut-before" => parts.push(cut()),
        "inband-first" => parts.push(Ok(
            "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n".into(),
        )),
        _ => {
            parts.push(Ok(chunk(m, json!({"content": TEXT[0]}), None)));
            match model.as_str() {
                "cut-after" => parts.push(cut()),
                "inband" => parts.push(Ok(
                    "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n".into(),
                )),
                _ => {
                    parts.push(Ok(chunk(m, json!({"content": TEXT[1]}), None)));
                    parts.push(Ok(chunk(m, json!({"content": TEXT[2]}), None)));
                    parts.push(Ok(chunk(m, json!({}), Some("stop"))));
                    if usage && model != "nousage" {
                        parts.push(Ok(format!(
                            "data: {}\n\n",
                            json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 7,
                                   "model": m, "choices": [],
                                   "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}})
                        )));
                    }
                    if model != "nodone" {
                        parts.push(Ok("data: [DONE]\n\n".into()));
                    }
                }
            }
        }
    }
    let body = futures_util::stream::iter(parts).then(|p| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        p
    });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(body))
        .unwrap()
}

use futures_util::StreamExt;

async fn spawn_upstream() -> (String, Upstream) {
    let up = Upstream::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(upstream_chat))
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), up)
}

/// A retrieval service answering every search with one passage.
async fn spawn_retriever() -> String {
    let app = Router::new().route(
        "/search",
        post(|| async {
            axum::Json(json!({"results": [
                {"text": "Refunds within 30 days.", "score": 0.9, "source": "policy.md", "chunk_id": "p1"}]}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/search")
}

// === two gateways, one per path ===

const ROUTES: &str = "routes:
  fast:
    provider: up
    model: ok
  nousage:
    provider: up
    model: nousage
  error200:
    provider: up
    model: error200
  fb-error200:
    targets:
      - {provider: up, model: error200}
      - {provider: up, model: ok}
  to-canonical:
    targets:
      - {provider: up, model: fail503}
      - {provider: up, model: ok, params: {temperature: 0.2}}
  to-forward:
    targets:
      - {provider: up, model: fail503, params: {temperature: 0.2}}
      - {provider: up, model: ok}
  cut-before:
    targets:
      - {provider: up, model: cut-before}
      - {provider: up, model: ok}
  cut-after:
    targets:
      - {provider: up, model: cut-after}
      - {provider: up, model: ok}
  inband:
    targets:
      - {provider: up, model: inband}
      - {provider: up, model: ok}
  inband-first:
    targets:
      - {provider: up, model: inband-first}
      - {provider: up, model: ok}
  nodone:
    provider: up
    model: nodone
  limited:
    provider: up
    model: ok
    limits: {tpm: 1000}
  cached:
    provider: up
    model: ok
    cache: {mode: on, ttl: 1h}
  redacting:
    provider: up
    model: ok
    data: redact
  audited:
    provider: up
    model: ok
    audit: {content: true}
";

const PROMPT: &str = "variables:\n  name: {type: string}\nlabels: {production: 1}\nversions:\n  1:\n    route: fast\n    messages:\n      - role: user\n        content: \"Hello {{ name }}\"\n";

struct Pair {
    fast: Gw,
    canonical: Gw,
    up: Upstream,
}

async fn pair() -> Pair {
    let (base, up) = spawn_upstream().await;
    let retriever = spawn_retriever().await;
    let provider = format!(
        "kind: openai\nbase_url: {base}\napi_key_env: FAKE_UPSTREAM_KEY\n\
         timeouts: {{connect: 1s, headers: 2s, idle: 2s, total: 10s}}\n\
         prices:\n  currency: USD\n  models:\n    ok: {{input: 2.5, output: 10}}\n"
    );
    let providers = vec![("up.yaml".to_string(), provider)];
    let kb = format!("kind: http\nurl: {retriever}\n");
    let files = [
        ("retrievers/kb.yaml", kb.as_str()),
        ("prompts/hi.yaml", PROMPT),
    ];
    let config = |knob: &str| {
        format!(
            "listen: 127.0.0.1:0\n{knob}audit: {{path: audit.jsonl}}\n\
             data_protection: {{policy: off}}\n{ROUTES}"
        )
    };
    let fast = spawn_gateway_with_files(&config(""), &providers, &files).await;
    let canonical =
        spawn_gateway_with_files(&config("fast_path: false\n"), &providers, &files).await;
    Pair {
        fast,
        canonical,
        up,
    }
}

/// A request body as a client might write it: its own spacing and member
/// order, a field the gateway does not know.
fn body(route: &str, stream: bool) -> String {
    format!(
        "{{ \"messages\" : [ {{\"role\":\"user\", \"content\":\"Say hi\"}} ],\n  \"model\" : \"{route}\", \"stream\": {stream}, \"vendor_flag\": {{\"a\": [1, 2]}} }}"
    )
}

/// `raw` as the fast path sends it to `model`.
fn forwarded(raw: &str, route: &str, model: &str) -> String {
    raw.replacen(
        &format!("\"model\" : \"{route}\""),
        &format!("\"model\" : \"{model}\""),
        1,
    )
}

struct Seen {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Seen {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
    /// The SSE payloads, parsed (`[DONE]` as a string).
    fn events(&self) -> Vec<Value> {
        common::sse_data(&self.text)
            .into_iter()
            .map(|d| serde_json::from_str(&d).unwrap_or(Value::String(d)))
            .collect()
    }
    fn streamed_text(&self) -> String {
        self.events()
            .iter()
            .filter_map(|e| {
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    }
}

async fn send(gw: &Gw, raw: &str, key: Option<&str>) -> Seen {
    let mut rb = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(raw.to_owned());
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    Seen {
        status,
        headers,
        text: r.text().await.unwrap(),
    }
}

/// The headers the gateway sets about what served a request; the same on
/// both paths.
const SERVED: [&str; 7] = [
    "x-promptgate-route",
    "x-promptgate-provider",
    "x-promptgate-target",
    "x-promptgate-attempts",
    "x-promptgate-usage",
    "x-promptgate-cost",
    "content-type",
];

/// An error body without what differs per request (its id, timings).
fn normalized_error(mut v: Value) -> Value {
    let e = &mut v["error"];
    assert!(
        e["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("pg-")),
        "{v}"
    );
    e["request_id"] = Value::Null;
    if let Some(list) = e.get_mut("attempts").and_then(Value::as_array_mut) {
        for a in list {
            a["elapsed_ms"] = Value::Null;
        }
    }
    v
}

/// Sends `raw` to both gateways; asserts the same status and served headers.
async fn both(p: &Pair, raw: &str) -> (Seen, Seen) {
    let f = send(&p.fast, raw, None).await;
    let c = send(&p.canonical, raw, None).await;
    assert_eq!(
        f.status, c.status,
        "fast: {}\ncanonical: {}",
        f.text, c.text
    );
    for h in SERVED {
        assert_eq!(f.header(h), c.header(h), "{h}: {}\n{}", f.text, c.text);
    }
    assert!(f.header("x-request-id").is_some() && f.header("x-promptgate-overhead-us").is_some());
    // The token bucket refills as time passes: the two gateways' figures may
    // differ by what a few milliseconds refill.
    let remaining = |s: &Seen| -> Option<i64> {
        s.header("x-ratelimit-remaining-tokens")
            .map(|v| v.parse().unwrap())
    };
    match (remaining(&f), remaining(&c)) {
        (Some(a), Some(b)) => assert!((a - b).abs() <= 2, "remaining tokens {a} / {b}"),
        (a, b) => assert_eq!(a, b),
    }
    (f, c)
}

// === the cases ===

#[tokio::test]
async fn the_client_bytes_go_out_with_only_the_model_replaced() {
    let p = pair().await;
    let raw = body("fast", false);
    let f = send(&p.fast, &raw, None).await;
    assert_eq!(f.status, 200, "{}", f.text);
    assert_eq!(
        std::str::from_utf8(&p.up.last()).unwrap(),
        forwarded(&raw, "fast", "ok").replacen(", \"stream\": false", "", 1),
        "the client's bytes, `model` replaced (and `stream: false` left out, as the canonical encoder does)"
    );
    // The answer's bytes come back with only `model` replaced: the upstream's
    // own field is still there.
    let v = f.json();
    assert_eq!(v["model"], "fast");
    assert_eq!(v["x_vendor"], "kept");
    assert_eq!(v["usage"]["total_tokens"], 13);
    assert_eq!(f.header("x-promptgate-usage"), Some("reported"));

    // With the knob off the same request is decoded and encoded again.
    let c = send(&p.canonical, &raw, None).await;
    assert_eq!(c.status, 200);
    let sent = p.up.last();
    assert!(sent.starts_with(b"{\"model\":\"ok\""), "{sent:?}");
    let v = c.json();
    assert_eq!(v["model"], "fast");
    assert!(v.get("x_vendor").is_none());
    // The same for the headers and the content.
    let (f, c) = both(&p, &raw).await;
    // (The canonical encoder writes `refusal: null`; the upstream did not.)
    for field in ["role", "content"] {
        assert_eq!(
            f.json()["choices"][0]["message"][field],
            c.json()["choices"][0]["message"][field]
        );
    }
    assert_eq!(f.json()["usage"], c.json()["usage"]);
}

#[tokio::test]
async fn streams_pass_through_asking_for_usage_and_showing_it_only_when_asked() {
    let p = pair().await;
    let raw = body("fast", true);
    let (f, c) = both(&p, &raw).await;
    // Usage is asked for upstream although the client did not.
    let sent: Value = serde_json::from_slice(&p.up.last()).unwrap();
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    let sent_fast = p.up.seen.lock().unwrap()[0].clone();
    assert_eq!(
        std::str::from_utf8(&sent_fast).unwrap(),
        forwarded(&raw, "fast", "ok").replacen(
            "{ \"messages\"",
            "{\"stream_options\":{\"include_usage\":true}, \"messages\"",
            1
        )
    );
    for s in [&f, &c] {
        assert_eq!(s.streamed_text(), TEXT.concat(), "{}", s.text);
        let events = s.events();
        assert_eq!(events.last().unwrap(), "[DONE]");
        for e in &events[..events.len() - 1] {
            assert_eq!(e["model"], "fast", "{}", s.text);
            assert!(
                e.get("usage").is_none(),
                "no usage unless asked: {}",
                s.text
            );
        }
    }
    assert!(
        f.text.contains("\"x_vendor\":\"kept\""),
        "bytes passed through"
    );
    assert!(!c.text.contains("x_vendor"));

    // Asked for: the usage chunk, on both paths.
    let raw = raw.replacen(
        "\"stream\": true",
        "\"stream\": true, \"stream_options\": {\"include_usage\": true}",
        1,
    );
    let (f, c) = both(&p, &raw).await;
    for s in [&f, &c] {
        let events = s.events();
        let usage = &events[events.len() - 2];
        assert_eq!(usage["choices"], json!([]), "{}", s.text);
        assert_eq!(usage["usage"]["total_tokens"], 13, "{}", s.text);
    }
}

#[tokio::test]
async fn a_body_without_usage_gets_the_estimate_on_both_paths() {
    let p = pair().await;
    let (f, c) = both(&p, &body("nousage", false)).await;
    assert_eq!(f.header("x-promptgate-usage"), Some("estimated"));
    assert_eq!(f.json()["usage"], c.json()["usage"]);
    assert_eq!(f.json()["usage"]["estimated"], true);
    // A stream: the estimate is the usage chunk when asked for.
    let raw = body("nousage", true).replacen(
        "\"stream\": true",
        "\"stream\": true, \"stream_options\": {\"include_usage\": true}",
        1,
    );
    let (f, c) = both(&p, &raw).await;
    let usage = |s: &Seen| {
        let e = s.events();
        e[e.len() - 2]["usage"].clone()
    };
    assert_eq!(usage(&f)["estimated"], true, "{}", f.text);
    assert_eq!(usage(&f), usage(&c));
}

#[tokio::test]
async fn fallback_between_forwarding_and_canonical_targets_both_ways() {
    let p = pair().await;
    for stream in [false, true] {
        // A forwarded attempt fails (503); the next target has overrides, so
        // it is served by the canonical attempt.
        let raw = body("to-canonical", stream);
        let (f, _c) = both(&p, &raw).await;
        assert_eq!(f.status, 200, "{}", f.text);
        assert_eq!(f.header("x-promptgate-attempts"), Some("2"));
        let sent: Vec<Bytes> = p.up.seen.lock().unwrap().clone();
        let n = sent.len();
        // fast: forwarded, then canonical; canonical gateway: both canonical.
        assert_eq!(
            std::str::from_utf8(&sent[n - 4]).unwrap(),
            forwarded(&raw, "to-canonical", "fail503")
                .replacen(", \"stream\": false", "", 1)
                .replacen(
                    "{ \"messages\"",
                    if stream {
                        "{\"stream_options\":{\"include_usage\":true}, \"messages\""
                    } else {
                        "{ \"messages\""
                    },
                    1
                )
        );
        let second: Value = serde_json::from_slice(&sent[n - 3]).unwrap();
        assert_eq!(second["temperature"], 0.2, "the override applied");
        assert!(!f.text.contains("x_vendor"), "encoded canonically");
        if stream {
            assert_eq!(f.streamed_text(), TEXT.concat());
        }

        // And back: a canonical attempt fails, the forwarding target serves.
        let raw = body("to-forward", stream);
        let (f, _c) = both(&p, &raw).await;
        assert_eq!(f.status, 200, "{}", f.text);
        assert_eq!(f.header("x-promptgate-attempts"), Some("2"));
        let sent: Vec<Bytes> = p.up.seen.lock().unwrap().clone();
        let n = sent.len();
        assert!(sent[n - 4].starts_with(b"{\"model\":\"fail503\""));
        assert!(sent[n - 3].starts_with(b"{"), "forwarded");
        assert!(
            std::str::from_utf8(&sent[n - 3])
                .unwrap()
                .contains("\"model\" : \"ok\""),
            "the client's bytes"
        );
        assert!(f.text.contains("x_vendor"), "passed through: {}", f.text);
    }
}

#[tokio::test]
async fn an_error_inside_a_200_fails_the_attempt_on_both_paths() {
    let p = pair().await;
    for stream in [false, true] {
        let (f, c) = both(&p, &body("error200", stream)).await;
        assert_eq!(f.status, 503, "{}", f.text);
        assert_eq!(normalized_error(f.json()), normalized_error(c.json()));
        assert_eq!(f.json()["error"]["code"], "overloaded");
        // Falls over to the next target.
        let (f, _) = both(&p, &body("fb-error200", stream)).await;
        assert_eq!(f.status, 200, "{}", f.text);
        assert_eq!(f.header("x-promptgate-attempts"), Some("2"));
    }
}

#[tokio::test]
async fn a_stream_cut_before_its_first_output_falls_over_and_after_it_ends_with_an_error_event() {
    let p = pair().await;
    for route in ["cut-before", "inband-first"] {
        let (f, c) = both(&p, &body(route, true)).await;
        assert_eq!(f.status, 200, "{route}: {}", f.text);
        assert_eq!(f.header("x-promptgate-attempts"), Some("2"), "{route}");
        assert_eq!(f.streamed_text(), TEXT.concat(), "{route}");
        assert_eq!(c.streamed_text(), TEXT.concat(), "{route}");
    }
    for route in ["cut-after", "inband", "nodone"] {
        let (f, c) = both(&p, &body(route, true)).await;
        assert_eq!(f.status, 200, "{route}: {}", f.text);
        assert_eq!(f.header("x-promptgate-attempts"), Some("1"), "{route}");
        for s in [&f, &c] {
            assert!(s.streamed_text().starts_with("Hi"), "{route}: {}", s.text);
            assert!(!s.text.contains("[DONE]"), "{route}: {}", s.text);
        }
        let last = |s: &Seen| normalized_error(s.events().last().unwrap().clone());
        assert_eq!(last(&f), last(&c), "{route}");
        assert!(last(&f)["error"]["code"].is_string(), "{route}: {}", f.text);
    }
    // Both gateways count the same stream failures.
    let failures = |m: &str| -> Vec<String> {
        m.lines()
            .filter(|l| l.contains("stream_errors_total{"))
            .map(str::to_owned)
            .collect()
    };
    let (mf, mc) = (p.fast.metrics().await, p.canonical.metrics().await);
    assert_eq!(failures(&mf), failures(&mc));
    assert!(!failures(&mf).is_empty(), "{mf}");
}

#[tokio::test]
async fn usage_settles_limits_and_cost_alike_on_both_paths() {
    let p = pair().await;
    for stream in [false, true] {
        // Each request's output is settled when it ends; the next request's
        // remaining tokens show it, the same on both paths.
        for _ in 0..3 {
            let (f, c) = both(&p, &body("limited", stream)).await;
            assert_eq!(f.status, 200);
            assert!(f.header("x-ratelimit-remaining-tokens").is_some());
            assert_eq!(f.streamed_text(), c.streamed_text());
        }
        // The cost of a complete answer, from the price table.
        let (f, _) = both(&p, &body("fast", stream)).await;
        if !stream {
            assert!(f.header("x-promptgate-cost").is_some(), "{:?}", f.headers);
        }
    }
    // The token metrics agree.
    let tokens = |m: &str| -> Vec<String> {
        m.lines()
            .filter(|l| {
                l.contains("tokens_total{")
                    && !l.contains("key_tokens")
                    && !l.contains("arm_tokens")
            })
            .map(str::to_owned)
            .collect()
    };
    let (mf, mc) = (p.fast.metrics().await, p.canonical.metrics().await);
    assert_eq!(tokens(&mf), tokens(&mc));
    assert!(!tokens(&mf).is_empty(), "{mf}");
}

/// Whether the last request reached the upstream as the client's bytes.
fn was_forwarded(up: &Upstream) -> bool {
    up.last().starts_with(b"{ \"messages\"")
}

#[tokio::test]
async fn the_cache_prompts_retrieval_redaction_and_audit_content_need_the_canonical_path() {
    let p = pair().await;
    let gw = &p.fast;
    let r = send(gw, &body("fast", false), None).await;
    assert_eq!(r.status, 200);
    assert!(was_forwarded(&p.up));

    // A route that caches: the answer is stored canonically, so it is not forwarded.
    let r = send(gw, &body("cached", false), None).await;
    assert_eq!(
        (r.status, r.header("x-promptgate-cache")),
        (200, Some("miss"))
    );
    assert!(!was_forwarded(&p.up));
    let before = p.up.count();
    let r = send(gw, &body("cached", false), None).await;
    assert_eq!(r.header("x-promptgate-cache"), Some("hit"));
    assert_eq!(p.up.count(), before);
    // Bypassing the cache, nothing needs the canonical answer.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(body("cached", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-promptgate-cache"], "bypass");
    assert!(was_forwarded(&p.up));

    // A prompt is rendered.
    let raw = body("fast", false).replacen(
        "\"vendor_flag\"",
        "\"prompt\": {\"id\": \"hi\", \"variables\": {\"name\": \"Ada\"}}, \"vendor_flag\"",
        1,
    );
    let r = send(gw, &raw, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!was_forwarded(&p.up));
    assert!(std::str::from_utf8(&p.up.last())
        .unwrap()
        .contains("Hello Ada"));

    // Retrieval inserts passages.
    let raw = body("fast", false).replacen(
        "\"vendor_flag\"",
        "\"retrieval\": {\"retriever\": \"kb\"}, \"vendor_flag\"",
        1,
    );
    let r = send(gw, &raw, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-promptgate-retrieval"), Some("kb=1"));
    assert!(!was_forwarded(&p.up));
    assert!(std::str::from_utf8(&p.up.last())
        .unwrap()
        .contains("Refunds within 30 days."));

    // Redaction: what was redacted must be restored in the answer.
    let raw = body("redacting", false).replacen("Say hi", "Mail ada@example.com", 1);
    let r = send(gw, &raw, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!was_forwarded(&p.up));
    assert!(!std::str::from_utf8(&p.up.last())
        .unwrap()
        .contains("ada@example.com"));
    // Nothing found to redact: forwarded.
    let r = send(gw, &body("redacting", false), None).await;
    assert_eq!(r.status, 200);
    assert!(was_forwarded(&p.up));

    // An audit record that keeps the answer's text.
    let r = send(gw, &body("audited", false), None).await;
    assert_eq!(r.status, 200);
    assert!(!was_forwarded(&p.up));
}

#[tokio::test]
async fn drill_faults_apply_alike_on_both_paths() {
    let p = pair().await;
    let inject = |gw: &Gw, fault: Value| {
        let url = gw.admin_url("/admin/faults");
        async move {
            let r = client()
                .post(url)
                .bearer_auth(common::ADMIN_KEY)
                .json(&fault)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        }
    };
    // A cut after the first chunk of output: past the commit point, the
    // stream ends with the gateway's error event.
    let cut =
        json!({"provider": "up", "fault": "stream_cut", "after_chunks": 1, "duration": "30s"});
    inject(&p.fast, cut.clone()).await;
    inject(&p.canonical, cut).await;
    let (f, c) = both(&p, &body("fast", true)).await;
    for s in [&f, &c] {
        assert_eq!(s.streamed_text(), "Hi", "{}", s.text);
        assert!(
            s.text.contains("drill: stream cut after 1 chunks"),
            "{}",
            s.text
        );
    }
    let last = |s: &Seen| normalized_error(s.events().last().unwrap().clone());
    assert_eq!(last(&f), last(&c));
    // An error fault: the attempt fails before any call, the same error.
    let down = json!({"provider": "up", "fault": "error", "status": 503, "duration": "30s"});
    inject(&p.fast, down.clone()).await;
    inject(&p.canonical, down).await;
    for stream in [false, true] {
        let (f, c) = both(&p, &body("fast", stream)).await;
        assert_eq!(f.status, 503, "{}", f.text);
        assert_eq!(normalized_error(f.json()), normalized_error(c.json()));
    }
}
