//! Data protection end to end through the real binary, in front of the
//! recording fake upstream of `tests/common` (its `echo` model answers with the
//! last user message, streamed in 3-byte pieces so every placeholder in it is
//! split across chunks): redaction round trips on both doors in both modes,
//! `block`, `private`, prompt variables and retrieved passages, an operator
//! detector, the cache, and `check`.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::{client, spawn_fake, Fake, GatewayProcess};
use serde_json::{json, Value};

const ID: &str = "11010519491231002X";
const PHONE: &str = "13800138000";
const CARD: &str = "6222021234567890128";

fn message() -> String {
    format!("我的身份证号是{ID}，手机{PHONE}，卡号 {CARD}，请帮我登记。")
}

/// A gateway whose routes all answer through the fake's `echo` model:
/// `echo` (the default policy, `redact`), `blocked`, `private` (commercial
/// fake first, the self-hosted fake second), `cached`.
fn setup(dir: &Path, commercial: &Fake, self_hosted: &Fake) {
    common::write_config(
        dir,
        r#"listen: 127.0.0.1:0
data_protection:
  policy: redact
  custom:
    - {name: employee_id, pattern: 'EMP-\d{6}'}
routes:
  echo:
    provider: commercial
    model: echo
  blocked:
    provider: commercial
    model: echo
    data: block
  private:
    data: private
    targets:
      - {provider: commercial, model: echo}
      - {provider: onprem, model: echo}
  cached:
    provider: commercial
    model: echo
    cache: {mode: on, ttl: 1h}
  embed:
    provider: commercial
    model: embed
  embed-blocked:
    provider: commercial
    model: embed
    data: block
"#,
        &[
            (
                "commercial.yaml".into(),
                format!(
                    "kind: openai\nbase_url: {}\nself_hosted: false\n",
                    commercial.base_url()
                ),
            ),
            (
                "onprem.yaml".into(),
                format!(
                    "kind: openai\nbase_url: {}\nself_hosted: true\n",
                    self_hosted.base_url()
                ),
            ),
        ],
    );
    std::fs::create_dir_all(dir.join("retrievers")).unwrap();
    std::fs::write(
        dir.join("retrievers/kb.yaml"),
        "kind: local\npath: index/kb.db\nmode: lexical\ntop_k: 1\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("prompts/callback.yaml"),
        r#"variables:
  phone: {type: string}
labels: {production: 1}
versions:
  1:
    route: echo
    messages:
      - role: user
        content: "Please call me back at {{ phone }}."
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("prompts/ask.yaml"),
        r#"variables:
  question: {type: string}
labels: {production: 1}
versions:
  1:
    route: echo
    retrieval:
      - {retriever: kb, query: "{{ question }}", top_k: 1, into: passages}
    messages:
      - role: user
        content: "{% for p in passages %}{{ p.text }}{% endfor %}"
"#,
    )
    .unwrap();
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(
        docs.join("contacts.md"),
        "# 售后服务\n\n售后服务热线由王经理负责，手机 13912345678，工作日值班。\n",
    )
    .unwrap();
    std::fs::write(
        docs.join("returns.md"),
        "# 退货政策\n\n商品签收后七天内可以无理由退货。\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["ingest", "kb"])
        .arg(&docs)
        .arg("--config")
        .arg(dir.join("promptgate.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ingest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Env {
    commercial: Fake,
    onprem: Fake,
    gw: GatewayProcess,
    /// Every line the gateway logged (at debug level).
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Env {
    /// No sensitive value appears in any log line.
    fn assert_log_clean(&self) {
        let log = self.log.lock().unwrap();
        assert!(!log.is_empty());
        for line in log.iter() {
            for value in [ID, PHONE, CARD, "13912345678", "EMP-004211"] {
                assert!(!line.contains(value), "{value} logged: {line}");
            }
        }
    }
}

async fn start() -> Env {
    let commercial = spawn_fake().await;
    let onprem = spawn_fake().await;
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), &commercial, &onprem);
    let log = Arc::new(Mutex::new(Vec::new()));
    let gw = GatewayProcess::start_limited(
        &dir.path().join("promptgate.yaml"),
        &[("RUST_LOG", "debug")],
        4096,
        log.clone(),
    );
    Env {
        commercial,
        onprem,
        gw,
        log,
        _dir: dir,
    }
}

/// Everything a fake received, as one string.
fn recorded(fake: &Fake) -> String {
    fake.requests()
        .iter()
        .map(|r| r.body.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text of an answer in either dialect, complete or streamed.
fn answer_text(body: &str, stream: bool) -> String {
    if !stream {
        let v: Value = serde_json::from_str(body).unwrap();
        if let Some(t) = v["choices"][0]["message"]["content"].as_str() {
            return t.to_owned();
        }
        return v["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    }
    let mut out = String::new();
    // Anthropic events carry an `event:` line before their data.
    let datas = body.lines().filter_map(|l| l.strip_prefix("data: "));
    for data in datas {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            out.push_str(t);
        }
        if v["type"] == "content_block_delta" {
            out.push_str(v["delta"]["text"].as_str().unwrap_or_default());
        }
    }
    out
}

/// Sends `text` as the user message to `model` on the OpenAI or the
/// Anthropic door; returns status, headers and body.
async fn ask(
    gw: &GatewayProcess,
    anthropic: bool,
    model: &str,
    text: &str,
    stream: bool,
) -> (u16, reqwest::header::HeaderMap, String) {
    let r = if anthropic {
        client()
            .post(format!("{}/v1/messages", gw.base))
            .header("anthropic-version", "2023-06-01")
            .json(&json!({
                "model": model, "max_tokens": 100, "stream": stream,
                "messages": [{"role": "user", "content": text}]
            }))
    } else {
        client()
            .post(format!("{}/v1/chat/completions", gw.base))
            .json(&json!({
                "model": model, "stream": stream,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
            }))
    };
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_round_trips_on_both_doors_streamed_and_complete() {
    let env = start().await;
    for anthropic in [false, true] {
        for stream in [true, false] {
            let (status, _, body) = ask(&env.gw, anthropic, "echo", &message(), stream).await;
            assert_eq!(status, 200, "{body}");
            let text = answer_text(&body, stream);
            assert_eq!(
                text,
                format!("You said: {}", message()),
                "anthropic={anthropic} stream={stream}: the client sees its own values"
            );
            // The provider saw placeholders in their place, never the values.
            let seen = env.commercial.last().body.to_string();
            for p in ["[CN_ID_1]", "[CN_MOBILE_1]", "[BANK_CARD_1]"] {
                assert!(seen.contains(p), "{p} in {seen}");
            }
        }
    }
    // The echo was streamed in 3-byte pieces: placeholders were split.
    let all = recorded(&env.commercial);
    assert_eq!(env.commercial.requests().len(), 4);
    for value in [ID, PHONE, CARD] {
        assert!(!all.contains(value), "{value} reached the provider: {all}");
    }
    // Detections are counted by type, never by value.
    let metrics = client()
        .get(format!("{}/metrics", env.gw.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| {
            l.contains("sensitive_detections_total")
                && l.contains("type=\"cn_id\"")
                && l.contains("action=\"redact\"")
        })
        .unwrap_or_else(|| panic!("no detection metric: {metrics}"));
    assert!(line.ends_with(" 4"), "{line}");
    for value in [ID, PHONE, CARD] {
        assert!(!metrics.contains(value));
    }
    env.assert_log_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_value_gets_the_same_placeholder_and_client_placeholders_are_kept() {
    let env = start().await;
    let text = format!("{PHONE} again {PHONE}, other 13912345678, literal [CN_MOBILE_1].");
    let (status, _, body) = ask(&env.gw, false, "echo", &text, true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(answer_text(&body, true), format!("You said: {text}"));
    let seen = env.commercial.last().body["messages"][1]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        seen,
        "[CN_MOBILE_2] again [CN_MOBILE_2], other [CN_MOBILE_3], literal [CN_MOBILE_1]."
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_refuses_in_both_dialects_and_nothing_reaches_the_provider() {
    let env = start().await;
    let (status, headers, body) = ask(&env.gw, false, "blocked", &message(), false).await;
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "sensitive_data", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("cn_id") && msg.contains("cn_mobile") && msg.contains("bank_card"),
        "{msg}"
    );
    assert!(headers.contains_key("x-request-id"));

    let (status, _, body) = ask(&env.gw, true, "blocked", &message(), true).await;
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("cn_id"),
        "{v}"
    );
    for value in [ID, PHONE, CARD] {
        assert!(!body.contains(value), "the error names types, never values");
    }
    assert!(
        env.commercial.requests().is_empty(),
        "nothing reached the upstream"
    );

    // Clean text passes the same route.
    let (status, _, body) = ask(&env.gw, false, "blocked", "hello there", false).await;
    assert_eq!(status, 200, "{body}");
    env.assert_log_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_keeps_sensitive_requests_on_self_hosted_targets() {
    let env = start().await;
    for stream in [false, true] {
        let (status, headers, body) = ask(&env.gw, false, "private", &message(), stream).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["x-promptgate-provider"], "onprem");
        // Self-hosted targets get the request as sent; nothing to restore.
        assert_eq!(
            answer_text(&body, stream),
            format!("You said: {}", message())
        );
    }
    assert!(
        env.commercial.requests().is_empty(),
        "the commercial fake recorded nothing: {}",
        recorded(&env.commercial)
    );
    assert_eq!(env.onprem.requests().len(), 2);
    assert!(recorded(&env.onprem).contains(PHONE));
    // Without sensitive data the route's first (commercial) target serves.
    let (status, headers, _) = ask(&env.gw, false, "private", "hello", false).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-promptgate-provider"], "commercial");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_variables_and_retrieved_passages_are_redacted() {
    let env = start().await;
    // A prompt variable.
    let r = client()
        .post(format!(
            "{}/v1/prompts/callback/chat/completions",
            env.gw.base
        ))
        .json(&json!({"variables": {"phone": PHONE}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        format!("You said: Please call me back at {PHONE}.")
    );
    let seen = env.commercial.last().body.to_string();
    assert!(
        seen.contains("Please call me back at [CN_MOBILE_1]."),
        "{seen}"
    );
    assert!(!seen.contains(PHONE));

    // A retrieved passage, streamed.
    let r = client()
        .post(format!("{}/v1/prompts/ask/chat/completions", env.gw.base))
        .json(&json!({"variables": {"question": "售后服务热线"}, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let text = answer_text(&body, true);
    assert!(text.contains("手机 13912345678，"), "{text}");
    let seen = env.commercial.last().body.to_string();
    assert!(seen.contains("手机 [CN_MOBILE_1]，"), "{seen}");
    assert!(!recorded(&env.commercial).contains("13912345678"));
    env.assert_log_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_detector_redacts_its_matches() {
    let env = start().await;
    let text = "Employee EMP-004211 asks about EMP-004211 and EMP-77.";
    for stream in [false, true] {
        let (status, _, body) = ask(&env.gw, true, "echo", text, stream).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(answer_text(&body, stream), format!("You said: {text}"));
    }
    let seen = env.commercial.last().body.to_string();
    assert!(
        seen.contains("Employee [EMPLOYEE_ID_1] asks about [EMPLOYEE_ID_1] and EMP-77."),
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_redacted_requests_share_a_cache_entry_restored_per_request() {
    let env = start().await;
    let first = format!("Call {PHONE} please");
    let second = "Call 13912345678 please";
    let (status, h1, body) = ask(&env.gw, false, "cached", &first, false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(answer_text(&body, false), format!("You said: {first}"));
    assert_eq!(h1["x-promptgate-cache"], "miss");
    for stream in [false, true] {
        let (status, h2, body) = ask(&env.gw, false, "cached", second, stream).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            h2["x-promptgate-cache"]
                .to_str()
                .unwrap()
                .starts_with("hit"),
            "{h2:?}"
        );
        assert_eq!(answer_text(&body, stream), format!("You said: {second}"));
    }
    assert_eq!(env.commercial.requests().len(), 1, "one call for all three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_redacted_or_blocked_without_restoring() {
    let env = start().await;
    let r = client()
        .post(format!("{}/v1/embeddings", env.gw.base))
        .json(
            &json!({"model": "embed", "input": [format!("call {PHONE} or {PHONE}"), "plain text"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let seen = env.commercial.last();
    assert_eq!(seen.path, "/v1/embeddings");
    let input = seen.body["input"].to_string();
    assert!(
        input.contains("call [CN_MOBILE_1] or [CN_MOBILE_1]"),
        "{input}"
    );
    assert!(!input.contains(PHONE));
    let r = client()
        .post(format!("{}/v1/embeddings", env.gw.base))
        .json(&json!({"model": "embed-blocked", "input": format!("mail me: a.b@example.com, {PHONE}")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "sensitive_data", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("email"),
        "{v}"
    );
    assert_eq!(
        env.commercial.requests().len(),
        1,
        "the blocked request went nowhere"
    );
}

#[test]
fn check_rejects_unknown_detectors_and_bad_patterns() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(
        dir.path(),
        r#"listen: 127.0.0.1:0
data_protection:
  policy: redact
  detectors: [cn_id, passport]
  custom:
    - {name: broken, pattern: '(EMP-\d{6}'}
    - {name: Bad-Name, pattern: 'x+'}
    - {name: cn_mobile, pattern: 'x+'}
    - {name: everything, pattern: '.*'}
    - {name: ok, pattern: 'x+'}
    - {name: ok, pattern: 'y+'}
routes:
  echo:
    provider: sandbox
    model: echo
"#,
        &[(
            "sandbox.yaml".into(),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n".into(),
        )],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["check", "--config"])
        .arg(dir.path().join("promptgate.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "data_protection.detectors[1]: unknown detector `passport`",
        "data_protection.custom[0]: invalid regular expression",
        "data_protection.custom[1]: invalid detector name `Bad-Name`",
        "data_protection.custom[2]: `cn_mobile` is a built-in detector",
        "data_protection.custom[3]: pattern matches the empty string",
        "data_protection.custom[5].name: detector `ok` is defined twice",
    ] {
        assert!(err.contains(needle), "{needle} in:\n{err}");
    }
}

/// The queries a loopback retrieval service (the `http` kind's contract)
/// received; it answers every search with one passage.
type Searches = Arc<Mutex<Vec<Value>>>;

async fn spawn_search_service() -> (String, Searches) {
    let log: Searches = Arc::default();
    let app = axum::Router::new()
        .route(
            "/search",
            axum::routing::post(
                |axum::extract::State(log): axum::extract::State<Searches>,
                 axum::Json(body): axum::Json<Value>| async move {
                    log.lock().unwrap().push(body);
                    axum::Json(json!({"results": [{"text": "热线工作日值班。", "score": 0.9}]}))
                },
            ),
        )
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/search"), log)
}

/// A gateway whose prompts search a dense `local` retriever (`dense`) before
/// rendering; `remote` is an `http` retriever at `remote_url`. Its query embeddings go through `emb`, an embeddings route that
/// tries the commercial fake first, then the self-hosted fake, then the
/// (self-hosted) sandbox: a fake answers one text with two vectors, so each
/// fake records the call and the route falls through to the sandbox, which
/// embeds. Prompts: `lookup` (route `echo`, policy `redact`; its message holds
/// the question), `lookup-blocked` (`block`) and `lookup-private` (`private`,
/// commercial chat target first), whose messages do not hold the question:
/// only the query carries the value.
async fn start_dense(remote_url: &str) -> Env {
    let commercial = spawn_fake().await;
    let onprem = spawn_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::write_config(
        d,
        r#"listen: 127.0.0.1:0
breaker: {consecutive_failures: 1000}
data_protection:
  policy: redact
routes:
  echo:
    provider: commercial
    model: echo
  blocked:
    provider: commercial
    model: echo
    data: block
  private:
    data: private
    targets:
      - {provider: commercial, model: echo}
      - {provider: onprem, model: echo}
  emb:
    targets:
      - {provider: commercial, model: embed}
      - {provider: onprem, model: embed}
      - {provider: sandbox, model: vectors}
"#,
        &[
            (
                "commercial.yaml".into(),
                format!(
                    "kind: openai\nbase_url: {}\nself_hosted: false\n",
                    commercial.base_url()
                ),
            ),
            (
                "onprem.yaml".into(),
                format!(
                    "kind: openai\nbase_url: {}\nself_hosted: true\n",
                    onprem.base_url()
                ),
            ),
            (
                "sandbox.yaml".into(),
                "kind: sandbox\nsandbox:\n  models:\n    vectors: {}\n".into(),
            ),
        ],
    );
    std::fs::create_dir_all(d.join("retrievers")).unwrap();
    std::fs::write(
        d.join("retrievers/dense.yaml"),
        "kind: local\npath: index/dense.db\nmode: dense\ntop_k: 1\nembedding: {route: emb}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("retrievers/remote.yaml"),
        format!("kind: http\nurl: {remote_url}\ntop_k: 1\n"),
    )
    .unwrap();
    for (name, route, message) in [
        (
            "lookup",
            "echo",
            "{{ passages | length }} for {{ question }}",
        ),
        ("lookup-blocked", "blocked", "{{ passages | length }} found"),
        ("lookup-private", "private", "{{ passages | length }} found"),
    ] {
        std::fs::write(
            d.join(format!("prompts/{name}.yaml")),
            format!(
                "variables:\n  question: {{type: string}}\nlabels: {{production: 1}}\nversions:\n  1:\n    route: {route}\n    retrieval:\n      - {{retriever: dense, query: \"{{{{ question }}}}\", into: passages}}\n    messages:\n      - role: user\n        content: \"{message}\"\n"
            ),
        )
        .unwrap();
    }
    let docs = d.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("hotline.md"), "售后服务热线工作日值班。\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["ingest", "dense"])
        .arg(&docs)
        .arg("--config")
        .arg(d.join("promptgate.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ingest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    let gw = GatewayProcess::start_limited(
        &d.join("promptgate.yaml"),
        &[("RUST_LOG", "debug")],
        4096,
        log.clone(),
    );
    Env {
        commercial,
        onprem,
        gw,
        log,
        _dir: dir,
    }
}

/// The inputs of every embeddings call a fake received, from the `from`th
/// request on.
fn embedded(fake: &Fake, from: usize) -> Vec<String> {
    fake.requests()
        .iter()
        .skip(from)
        .filter(|r| r.path == "/v1/embeddings")
        .map(|r| r.body["input"].to_string())
        .collect()
}

async fn prompt(gw: &GatewayProcess, name: &str, question: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/prompts/{name}/chat/completions", gw.base))
        .json(&json!({"variables": {"question": question}}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacted_retrieval_queries_are_embedded_with_placeholders() {
    let (url, searches) = spawn_search_service().await;
    let env = start_dense(&url).await;
    let (c0, o0) = (env.commercial.requests().len(), env.onprem.requests().len());
    // A prompt hook's query.
    let question = format!("售后服务热线 call me at {PHONE}");
    let r = prompt(&env.gw, "lookup", &question).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-retrieval"], "dense=1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        format!("You said: 1 for {question}"),
        "the answer is restored"
    );
    let inputs = embedded(&env.commercial, c0);
    assert_eq!(inputs.len(), 1, "{inputs:?}");
    assert!(
        inputs[0].contains("售后服务热线 call me at [CN_MOBILE_1]"),
        "{inputs:?}"
    );

    // The chat extension's query (the last user message).
    let c1 = env.commercial.requests().len();
    let r = client()
        .post(format!("{}/v1/chat/completions", env.gw.base))
        .json(&json!({"model": "echo",
            "messages": [{"role": "user", "content": "who answers 13912345678?"}],
            "retrieval": {"retriever": "dense"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "You said: who answers 13912345678?"
    );
    let inputs = embedded(&env.commercial, c1);
    assert_eq!(inputs.len(), 1, "{inputs:?}");
    assert!(
        inputs[0].contains("who answers [CN_MOBILE_1]?"),
        "{inputs:?}"
    );

    // The search endpoint's query.
    let c2 = env.commercial.requests().len();
    let r = client()
        .post(format!("{}/v1/retrievers/dense/search", env.gw.base))
        .json(&json!({"query": format!("热线 {PHONE}")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let inputs = embedded(&env.commercial, c2);
    assert!(inputs[0].contains("热线 [CN_MOBILE_1]"), "{inputs:?}");

    // A remote retriever gets the redacted query.
    let r = client()
        .post(format!("{}/v1/chat/completions", env.gw.base))
        .json(&json!({"model": "echo",
            "messages": [{"role": "user", "content": "hello"}],
            "retrieval": {"retriever": "remote", "query": format!("热线 {PHONE}")}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        searches.lock().unwrap().last().unwrap()["query"],
        "热线 [CN_MOBILE_1]"
    );

    // Neither fake saw a value: not in an embeddings call, not in a chat call.
    let seen = format!(
        "{}\n{}",
        recorded(&env.commercial),
        env.onprem.requests()[o0..]
            .iter()
            .map(|r| r.body.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    for value in [PHONE, "13912345678"] {
        assert!(!seen.contains(value), "{value} left the gateway: {seen}");
    }
    env.assert_log_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_retrieval_query_is_refused_before_any_search() {
    let (url, searches) = spawn_search_service().await;
    let env = start_dense(&url).await;
    let (c0, o0) = (env.commercial.requests().len(), env.onprem.requests().len());
    let r = prompt(&env.gw, "lookup-blocked", &format!("热线 {PHONE}")).await;
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "sensitive_data", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("retrieval query") && msg.contains("cn_mobile"),
        "{msg}"
    );
    assert!(!body.contains(PHONE));
    // The chat extension on the same route.
    let r = client()
        .post(format!("{}/v1/chat/completions", env.gw.base))
        .json(&json!({"model": "blocked",
            "messages": [{"role": "user", "content": "hello"}],
            "retrieval": {"retriever": "dense", "query": format!("热线 {PHONE}")}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "sensitive_data", "{v}");
    // A remote retriever's query, too.
    let r = client()
        .post(format!("{}/v1/chat/completions", env.gw.base))
        .json(&json!({"model": "blocked",
            "messages": [{"role": "user", "content": "hello"}],
            "retrieval": {"retriever": "remote", "query": format!("热线 {PHONE}")}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        (env.commercial.requests().len(), env.onprem.requests().len()),
        (c0, o0),
        "no embedding, search or chat call was made"
    );
    assert!(
        searches.lock().unwrap().is_empty(),
        "no remote search either"
    );
    let metrics = client()
        .get(format!("{}/metrics", env.gw.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("sensitive_detections_total")
                && l.contains("action=\"block\"")
                && l.contains("route=\"blocked\"")
                && l.contains("type=\"cn_mobile\"")
                && l.ends_with(" 3")),
        "{metrics}"
    );
    assert!(
        !metrics.contains("promptgate_prompt_errors_total{prompt=\"lookup-blocked\"}"),
        "a refused query is not a prompt error: {metrics}"
    );
    // A clean query on the same route is searched and served.
    let r = prompt(&env.gw, "lookup-blocked", "售后服务热线").await;
    assert_eq!(r.status(), 200);
    env.assert_log_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_retrieval_query_is_embedded_and_answered_on_self_hosted_targets_only() {
    let (url, searches) = spawn_search_service().await;
    let env = start_dense(&url).await;
    let (c0, o0) = (env.commercial.requests().len(), env.onprem.requests().len());
    let r = prompt(&env.gw, "lookup-private", &format!("热线 {PHONE}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-retrieval"], "dense=1");
    assert_eq!(
        r.headers()["x-promptgate-provider"],
        "onprem",
        "the request became private"
    );
    assert_eq!(
        env.commercial.requests().len(),
        c0,
        "the commercial fake recorded nothing: {}",
        recorded(&env.commercial)
    );
    let inputs = embedded(&env.onprem, o0);
    assert_eq!(inputs.len(), 1, "{inputs:?}");
    assert!(
        inputs[0].contains(PHONE),
        "the self-hosted target gets the query as written"
    );
    // A remote retriever is the enterprise's own service: it gets the query
    // as written, and the request stays on self-hosted targets.
    let r = client()
        .post(format!("{}/v1/chat/completions", env.gw.base))
        .json(&json!({"model": "private",
            "messages": [{"role": "user", "content": "hello"}],
            "retrieval": {"retriever": "remote", "query": format!("热线 {PHONE}")}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-provider"], "onprem");
    assert_eq!(
        searches.lock().unwrap().last().unwrap()["query"],
        format!("热线 {PHONE}")
    );
    assert_eq!(env.commercial.requests().len(), c0);
    // Without sensitive data the commercial targets serve as usual.
    let r = prompt(&env.gw, "lookup-private", "售后服务热线").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-provider"], "commercial");
    assert_eq!(embedded(&env.commercial, c0).len(), 1);
}
