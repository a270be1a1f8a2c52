//! Cost, spend and budgets, through the real `promptgate` binary: the cost
//! header and metric from the providers' price tables, token budgets refusing
//! in both dialects, a budget's fallback route, budgets surviving a restart
//! (SQLite) and shared by two processes (Redis), and `promptgate usage`.
//!
//! The fake upstream reports `prompt_tokens: 12` (4 of them cached) and
//! `completion_tokens: 6` for every complete answer of model `chat`, and
//! 12 + 6 at the end of a stream that asks for usage.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::peers::Redis;
use common::*;
use serde_json::{json, Value};
use sha2::Digest;

const FREE_KEY: &str = "pg-test-free-0123456789";
const CAPPED_KEY: &str = "pg-test-capped-0123456789";
const MOVED_KEY: &str = "pg-test-moved-0123456789";
const THRIFTY_KEY: &str = "pg-test-thrifty-0123456789";

/// Prices per million tokens.
const PREMIUM: (f64, f64, f64) = (2.5, 10.0, 1.25); // input, output, cached
const CHEAP: (f64, f64) = (0.15, 0.6); // input, output (cached = input)

fn sha(k: &str) -> String {
    sha2::Sha256::digest(k.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The config: routes `premium` (provider `fake`), `cheap` (provider
/// `cheap`) and `unpriced` (provider `unpriced`, no price table), all on the
/// fake's model `chat`; keys `free` (no budget), `capped` (30 tokens a day)
/// `moved` (30 tokens a day, then `cheap`) and `thrifty` (0.0001 USD a
/// month). (gateway, providers, keys file)
fn setup(fake: &Fake, spend: &str) -> (String, Vec<(String, String)>, String) {
    let gateway = format!(
        "listen: 127.0.0.1:0\nroutes:\n  premium:\n    provider: fake\n    model: chat\n  cheap:\n    provider: cheap\n    model: chat\n  unpriced:\n    provider: unpriced\n    model: chat\n{spend}"
    );
    let provider = |prices: &str| {
        format!(
            "kind: openai\nbase_url: {}\napi_key_env: FAKE_UPSTREAM_KEY\ntimeouts: {{connect: 1s, headers: 2s, idle: 2s, total: 10s}}\n{prices}",
            fake.base_url()
        )
    };
    let providers = vec![
        (
            "fake.yaml".to_string(),
            provider(&format!(
                "prices:\n  currency: USD\n  models:\n    chat: {{input: {}, output: {}, cached: {}}}\n",
                PREMIUM.0, PREMIUM.1, PREMIUM.2
            )),
        ),
        (
            "cheap.yaml".to_string(),
            provider(&format!(
                "prices:\n  models:\n    \"*\": {{input: {}, output: {}}}\n",
                CHEAP.0, CHEAP.1
            )),
        ),
        ("unpriced.yaml".to_string(), provider("")),
    ];
    let keys = format!(
        "free:\n  sha256: {}\n  owner: tests\ncapped:\n  sha256: {}\n  budget:\n    daily: {{tokens: 30}}\nmoved:\n  sha256: {}\n  budget:\n    daily: {{tokens: 30}}\n    fallback_route: cheap\nthrifty:\n  sha256: {}\n  budget:\n    monthly: {{cost: 0.0001}}\n",
        sha(FREE_KEY),
        sha(CAPPED_KEY),
        sha(MOVED_KEY),
        sha(THRIFTY_KEY)
    );
    (gateway, providers, keys)
}

/// The same config written to a folder, for the binary.
fn write_setup(dir: &Path, fake: &Fake, spend: &str) {
    let (gateway, providers, keys) = setup(fake, spend);
    write_config(dir, &gateway, &providers);
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::write(dir.join("keys/team.yaml"), keys).unwrap();
}

fn start(dir: &Path) -> GatewayProcess {
    GatewayProcess::start(
        &dir.join("promptgate.yaml"),
        &[("FAKE_UPSTREAM_KEY", FAKE_KEY)],
    )
}

async fn openai(
    gw: &GatewayProcess,
    key: Option<&str>,
    model: &str,
    stream: bool,
) -> reqwest::Response {
    let mut body = chat_body(model, stream);
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let mut r = client()
        .post(format!("{}/v1/chat/completions", gw.base))
        .json(&body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.unwrap()
}

async fn anthropic(gw: &GatewayProcess, key: &str, model: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/messages", gw.base))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({
            "model": model,
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "Say hello."}]
        }))
        .send()
        .await
        .unwrap()
}

async fn metrics(gw: &GatewayProcess) -> String {
    client()
        .get(format!("{}/metrics", gw.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the metric line starting with `prefix` (name and labels).
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `promptgate usage ARGS --config DIR/promptgate.yaml`: (status, stdout).
fn usage_cli(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .arg("usage")
        .arg("--config")
        .arg(dir.join("promptgate.yaml"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `promptgate usage --json` until the store holds `requests` requests
/// of `key` (the writer stores them off the request path): the report then.
async fn stored(dir: &Path, key: &str, requests: u64) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        let (ok, out, err) = usage_cli(dir, &["--json", "--key", key]);
        assert!(ok, "promptgate usage failed: {err}");
        last = serde_json::from_str(&out).unwrap();
        if last["total"]["requests"].as_u64() == Some(requests) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the spend store never held {requests} requests of {key}: {last}");
}

fn premium_cost(input: u64, cached: u64, output: u64) -> f64 {
    ((input - cached) as f64 * PREMIUM.0 + cached as f64 * PREMIUM.2 + output as f64 * PREMIUM.1)
        / 1e6
}

fn cheap_cost(input: u64, output: u64) -> f64 {
    (input as f64 * CHEAP.0 + output as f64 * CHEAP.1) / 1e6
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[tokio::test]
async fn cost_header_metrics_and_usage_report_follow_the_price_table() {
    let fake = spawn_fake().await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(dir.path(), &fake, "");
    let gw = start(dir.path());

    // A complete answer: its cost in the header, to the price table's arithmetic.
    let r = openai(&gw, Some(FREE_KEY), "premium", false).await;
    assert_eq!(r.status(), 200);
    let header = r.headers()["x-promptgate-cost"]
        .to_str()
        .unwrap()
        .to_owned();
    let one = premium_cost(12, 4, 6);
    assert_eq!(header, "0.000085");
    assert!(close(header.parse::<f64>().unwrap(), one));

    // A stream: no header (headers are gone when usage arrives), but counted.
    let r = openai(&gw, Some(FREE_KEY), "premium", true).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-promptgate-cost").is_none());
    let body = r.text().await.unwrap();
    assert!(body.contains("[DONE]"), "{body}");
    let streamed = premium_cost(12, 0, 6);

    // Without a key: counted as `anonymous`.
    let r = openai(&gw, None, "cheap", false).await;
    assert_eq!(r.status(), 200);
    let anon = cheap_cost(12, 6);
    assert!(close(
        r.headers()["x-promptgate-cost"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap(),
        anon
    ));

    // Without a key on a route without a price: nothing to account for.
    let r = openai(&gw, None, "unpriced", false).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-promptgate-cost").is_none());

    let m = metrics(&gw).await;
    let free = metric(
        &m,
        "promptgate_cost_total{key=\"free\",provider=\"fake\",route=\"premium\"}",
    )
    .unwrap_or_else(|| panic!("no cost metric for key free:\n{m}"));
    assert!(close(free, one + streamed), "{free} != {}", one + streamed);
    let a = metric(
        &m,
        "promptgate_cost_total{key=\"anonymous\",provider=\"cheap\",route=\"cheap\"}",
    )
    .unwrap();
    assert!(close(a, anon));
    // Tokens per key: the key's; requests without one are counted by route only.
    assert_eq!(
        metric(
            &m,
            "promptgate_key_tokens_total{direction=\"in\",key=\"free\",route=\"premium\"}"
        ),
        Some(24.0),
        "{m}"
    );
    assert!(!m.contains("promptgate_key_tokens_total{direction=\"in\",key=\"anonymous\""));

    // The store, read while the gateway runs.
    let report = stored(dir.path(), "free", 2).await;
    assert_eq!(report["currency"], "USD");
    let lines = report["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 1, "{report}");
    assert_eq!(lines[0]["key"], "free");
    assert_eq!(lines[0]["route"], "premium");
    assert_eq!(lines[0]["model"], "chat");
    assert_eq!(lines[0]["input_tokens"], 24);
    assert_eq!(lines[0]["output_tokens"], 12);
    assert!(close(lines[0]["cost"].as_f64().unwrap(), one + streamed));
    stored(dir.path(), "anonymous", 1).await;

    // The table: one line per key/route/model and a total.
    let (ok, table, err) = usage_cli(dir.path(), &["--since", "7d"]);
    assert!(ok, "{err}");
    let row = table
        .lines()
        .find(|l| l.starts_with("free "))
        .unwrap_or_else(|| panic!("{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols,
        ["free", "premium", "chat", "2", "24", "12", "0.000175"]
    );
    let total: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("total"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(&total[..4], ["total", "3", "36", "18"], "{table}");
    assert!(table.contains("anonymous"), "{table}");
    assert!(!table.contains("unpriced"), "{table}");
    assert!(table.contains("(cost in USD)"));

    // Bad input is a precise error, not a panic.
    let (ok, _, err) = usage_cli(dir.path(), &["--since", "last week"]);
    assert!(!ok);
    assert!(err.contains("--since"), "{err}");
}

/// A 429 `budget_exceeded` in the OpenAI shape.
async fn assert_refused_openai(r: reqwest::Response) {
    assert_eq!(r.status(), 429);
    let ra: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&ra), "Retry-After {ra}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "budget_exceeded", "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("capped") && msg.contains("daily"), "{msg}");
    assert!(!msg.contains(CAPPED_KEY));
}

/// The same in the Anthropic shape.
async fn assert_refused_anthropic(r: reqwest::Response) {
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("daily budget"));
}

#[tokio::test]
async fn a_token_budget_refuses_in_both_dialects_and_survives_a_restart() {
    let fake = spawn_fake().await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(dir.path(), &fake, "spend:\n  path: spend/spend.sqlite\n");
    let gw = start(dir.path());

    // 18 tokens each: the first leaves 12 of 30, the second crosses the budget
    // (it is checked before the call, so it is served in full).
    for _ in 0..2 {
        assert_eq!(
            openai(&gw, Some(CAPPED_KEY), "premium", false)
                .await
                .status(),
            200
        );
    }
    let seen = fake.requests().len();
    assert_refused_openai(openai(&gw, Some(CAPPED_KEY), "premium", false).await).await;
    assert_refused_anthropic(anthropic(&gw, CAPPED_KEY, "premium").await).await;
    assert_refused_openai(openai(&gw, Some(CAPPED_KEY), "premium", true).await).await;
    assert_eq!(
        fake.requests().len(),
        seen,
        "a refused request reached the upstream"
    );
    // Other keys are not affected.
    assert_eq!(
        openai(&gw, Some(FREE_KEY), "premium", false).await.status(),
        200
    );
    let m = metrics(&gw).await;
    assert_eq!(
        metric(
            &m,
            "promptgate_budget_exceeded_total{action=\"reject\",key=\"capped\",period=\"daily\"}"
        ),
        Some(3.0),
        "{m}"
    );

    // Stop the gateway once its spend is stored; a new process on the same
    // file still refuses the key.
    stored(dir.path(), "capped", 2).await;
    assert!(dir.path().join("spend/spend.sqlite").exists());
    drop(gw);
    let gw = start(dir.path());
    assert_refused_openai(openai(&gw, Some(CAPPED_KEY), "premium", false).await).await;
    assert_refused_anthropic(anthropic(&gw, CAPPED_KEY, "premium").await).await;
    assert_eq!(
        openai(&gw, Some(FREE_KEY), "premium", false).await.status(),
        200
    );
}

#[tokio::test]
async fn an_over_budget_key_with_a_fallback_route_is_served_from_the_cheaper_route() {
    let fake = spawn_fake().await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(dir.path(), &fake, "");
    let gw = start(dir.path());
    for _ in 0..2 {
        let r = openai(&gw, Some(MOVED_KEY), "premium", false).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-promptgate-route"], "premium");
    }
    // Over budget: served by `cheap`, at its price; the answer keeps the
    // model name the client asked for.
    let r = openai(&gw, Some(MOVED_KEY), "premium", false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-route"], "cheap");
    assert_eq!(r.headers()["x-promptgate-target"], "cheap/chat");
    let cost: f64 = r.headers()["x-promptgate-cost"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The cheap table has no cached price: cached input costs the input price.
    assert!(close(cost, cheap_cost(12, 6)), "{cost}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"], "premium");
    // The Anthropic door moves too.
    let r = anthropic(&gw, MOVED_KEY, "premium").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-route"], "cheap");
    let m = metrics(&gw).await;
    assert_eq!(
        metric(
            &m,
            "promptgate_budget_exceeded_total{action=\"fallback\",key=\"moved\",period=\"daily\"}"
        ),
        Some(2.0),
        "{m}"
    );
    let report = stored(dir.path(), "moved", 4).await;
    let routes: Vec<&str> = report["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["route"].as_str().unwrap())
        .collect();
    assert_eq!(routes, ["cheap", "premium"]);
}

#[tokio::test]
async fn spend_in_redis_is_shared_by_two_gateway_processes() {
    let redis = Redis::start(None);
    let fake = spawn_fake().await;
    let dir = tempfile::tempdir().unwrap();
    write_setup(
        dir.path(),
        &fake,
        &format!(
            "spend:\n  store: redis\n  redis: {{url: \"{}\", prefix: \"pgtest:\"}}\n",
            redis.url()
        ),
    );
    let a = start(dir.path());
    let b = start(dir.path());
    for _ in 0..2 {
        assert_eq!(
            openai(&a, Some(CAPPED_KEY), "premium", false)
                .await
                .status(),
            200
        );
    }
    assert_refused_openai(openai(&a, Some(CAPPED_KEY), "premium", false).await).await;
    // Once A's spend is in Redis, B (which never served the key) refuses it too.
    let report = stored(dir.path(), "capped", 2).await;
    assert_eq!(report["lines"][0]["input_tokens"], 24);
    assert!(close(
        report["lines"][0]["cost"].as_f64().unwrap(),
        2.0 * premium_cost(12, 4, 6)
    ));
    assert_refused_openai(openai(&b, Some(CAPPED_KEY), "premium", false).await).await;
    assert_refused_anthropic(anthropic(&b, CAPPED_KEY, "premium").await).await;
    assert_eq!(
        openai(&b, Some(FREE_KEY), "premium", false).await.status(),
        200
    );
    // No SQLite file when the spend is in Redis.
    assert!(!dir.path().join("data/spend.sqlite").exists());
    // A restart of both reads the same spend.
    drop((a, b));
    let a = start(dir.path());
    assert_refused_openai(openai(&a, Some(CAPPED_KEY), "premium", false).await).await;
}

#[tokio::test]
async fn a_keys_spend_in_its_budget_periods_is_reported_for_the_admin_api() {
    let fake = spawn_fake().await;
    let (gateway, providers, keys) = setup(&fake, "");
    let gw = spawn_gateway_with_files(&gateway, &providers, &[("keys/team.yaml", &keys)]).await;
    let before = gw.gw.governor.spend.usage("free");
    assert_eq!(before["day"]["tokens"], 0);
    for stream in [false, true] {
        let mut body = chat_body("premium", stream);
        body["stream_options"] = json!({"include_usage": true});
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(FREE_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // The spend is recorded when the response (a stream too) has ended.
        r.text().await.unwrap();
    }
    // The ticket drops just after the body's last byte: poll briefly.
    let mut u = Value::Null;
    for _ in 0..100 {
        u = gw.gw.governor.spend.usage("free");
        if u["day"]["tokens"] == 36 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(u["day"]["tokens"], 36, "{u}");
    assert_eq!(u["month"]["tokens"], 36, "{u}");
    assert_eq!(u["currency"], "USD");
    let want = premium_cost(12, 4, 6) + premium_cost(12, 0, 6);
    assert!(close(u["day"]["cost"].as_f64().unwrap(), want), "{u}");
    assert!(u["day"]["resets_at"]
        .as_str()
        .unwrap()
        .ends_with("T00:00:00Z"));
    assert!(u["month"]["resets_at"]
        .as_str()
        .unwrap()
        .ends_with("-01T00:00:00Z"));
    // A key that spent nothing.
    assert_eq!(gw.gw.governor.spend.usage("capped")["month"]["tokens"], 0);
}

/// One chat request to an in-process gateway: (status, headers, body).
async fn call(gw: &Gw, key: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat_body("premium", false))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap())
}

#[tokio::test]
async fn a_money_budget_refuses_once_the_months_cost_is_spent() {
    let fake = spawn_fake().await;
    let (gateway, providers, keys) = setup(&fake, "");
    let gw = spawn_gateway_with_files(&gateway, &providers, &[("keys/team.yaml", &keys)]).await;
    // 0.000085 each: the first leaves room, the second crosses 0.0001.
    for _ in 0..2 {
        assert_eq!(call(&gw, THRIFTY_KEY).await.0, 200);
    }
    let (status, headers, body) = call(&gw, THRIFTY_KEY).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "budget_exceeded");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("monthly budget (0.0001 USD)"), "{msg}");
    // Until the first second of next month: at most 31 days.
    let ra: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=31 * 86_400).contains(&ra), "{ra}");
}

#[tokio::test]
async fn a_redis_outage_fails_no_request_and_budgets_hold_in_each_replica() {
    let mut redis = Redis::start(None);
    let fake = spawn_fake().await;
    let (gateway, providers, keys) = setup(
        &fake,
        &format!(
            "spend:\n  store: redis\n  redis: {{url: \"{}\", timeout: 200ms}}\n",
            redis.url()
        ),
    );
    let gw = spawn_gateway_with_files(&gateway, &providers, &[("keys/team.yaml", &keys)]).await;
    redis.kill();
    // Spend cannot be read or written: requests are served, and this
    // replica's own figures still enforce the budget.
    for _ in 0..2 {
        assert_eq!(call(&gw, CAPPED_KEY).await.0, 200);
    }
    assert_eq!(call(&gw, CAPPED_KEY).await.0, 429);
    assert_eq!(call(&gw, FREE_KEY).await.0, 200);
    let mut m = String::new();
    for _ in 0..100 {
        m = gw.metrics().await;
        if metric(&m, "promptgate_spend_store_errors_total{op=\"write\"}").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        metric(&m, "promptgate_spend_store_errors_total{op=\"connect\"}").is_some(),
        "{m}"
    );
    assert!(
        metric(&m, "promptgate_spend_store_errors_total{op=\"write\"}").is_some(),
        "{m}"
    );
}
