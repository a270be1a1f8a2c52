//! Routing that survives outages, end to end: fallback chains, the stream commit
//! contract on both sides of the commit point, retries and deadlines, circuit
//! breakers, sticky splits, private-only routes, and drill faults injected
//! through the admin API.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A gateway with two fake upstreams: provider `fake` (the primary) and
/// The provider file of a second fake upstream, `backup`.
fn backup_provider(backup: &Fake) -> (String, String) {
    (
        "backup.yaml".into(),
        format!(
            "kind: openai\nbase_url: {}\napi_key_env: FAKE_UPSTREAM_KEY\ntimeouts: {{connect: 1s, headers: 1s, idle: 1s, total: 10s}}\n",
            backup.base_url()
        ),
    )
}

/// `backup`, plus the sandbox; `routes` is added to the gateway file.
async fn two_fakes(routes: &str, gateway_extra: &str) -> (Fake, Fake, Gw) {
    let fake = spawn_fake().await;
    let backup = spawn_fake().await;
    let (mut g, mut p) = fake_config(&fake, routes);
    g.push_str(gateway_extra);
    p.push(backup_provider(&backup));
    let gw = spawn_gateway(&g, &p).await;
    (fake, backup, gw)
}

async fn send(
    gw: &Gw,
    model: &str,
    stream: bool,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut rb = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body(model, stream));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let s = r.status().as_u16();
    let h = r.headers().clone();
    (s, h, r.text().await.unwrap())
}

fn ok_stream(text: &str) -> bool {
    text.ends_with("data: [DONE]\n\n")
        && text.contains("\" upstream\"")
        && !text.contains("\"error\"")
}

fn models_seen(f: &Fake) -> Vec<String> {
    f.requests()
        .iter()
        .map(|r| r.body["model"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn fallback_on_retryable_failures_in_both_modes() {
    let routes = "  chain:\n    targets:\n      - {provider: fake, model: status-503}\n      - {provider: fake, model: status-429}\n      - {provider: backup, model: chat}\n";
    let (fake, backup, gw) = two_fakes(routes, "").await;
    let (s, h, body) = send(&gw, "chain", false, &[]).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(h["x-promptgate-target"], "backup/chat");
    assert_eq!(h["x-promptgate-attempts"], "3");
    assert_eq!(h["x-promptgate-provider"], "backup");
    let (s, h, body) = send(&gw, "chain", true, &[]).await;
    assert_eq!(s, 200);
    assert!(ok_stream(&body), "{body}");
    assert_eq!(h["x-promptgate-attempts"], "3");
    assert_eq!(
        models_seen(&fake),
        ["status-503", "status-429", "status-503", "status-429"]
    );
    assert_eq!(backup.requests().len(), 2);
    let m = gw.metrics().await;
    assert!(m.contains("promptgate_fallbacks_total{from=\"fake/status-429\",kind=\"rate_limited\",route=\"chain\",to=\"backup/chat\"} 2"), "{m}");
    assert!(m.contains("promptgate_attempts_total{result=\"overloaded\",route=\"chain\",target=\"fake/status-503\"} 2"));
}

#[tokio::test]
async fn non_retryable_errors_return_at_once_and_context_length_moves_on() {
    let routes = "  strict:\n    targets:\n      - {provider: fake, model: no-such-model}\n      - {provider: backup, model: chat}\n  long:\n    targets:\n      - {provider: fake, model: status-400-context}\n      - {provider: backup, model: chat}\n";
    let (_fake, backup, gw) = two_fakes(routes, "").await;
    let (s, _, body) = send(&gw, "strict", false, &[]).await;
    assert_eq!(s, 404, "bad_request is the client's problem: {body}");
    assert!(backup.requests().is_empty(), "no fallback on a bad request");
    let (s, h, _) = send(&gw, "long", false, &[]).await;
    assert_eq!(s, 200);
    assert_eq!(h["x-promptgate-target"], "backup/chat");
}

#[tokio::test]
async fn declared_context_windows_skip_small_targets() {
    let fake = spawn_fake().await;
    let (g, mut p) = fake_config(&fake, "  sized:\n    targets:\n      - {provider: tiny, model: chat}\n      - {provider: fake, model: chat}\n");
    p.push(("tiny.yaml".into(), format!("kind: openai\nbase_url: {}\napi_key_env: FAKE_UPSTREAM_KEY\ncapabilities: {{context_window: 20}}\n", fake.base_url())));
    let gw = spawn_gateway(&g, &p).await;
    let mut body = chat_body("sized", false);
    body["messages"][1]["content"] = json!("word ".repeat(50));
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-target"], "fake/chat");
    assert_eq!(
        r.headers()["x-promptgate-attempts"],
        "1",
        "the small target was skipped, not tried"
    );
}

#[tokio::test]
async fn stream_commit_contract() {
    let routes = concat!(
        "  before:\n    first_token_timeout: 300ms\n    targets:\n",
        "      - {provider: fake, model: hang}\n      - {provider: fake, model: error-in-200}\n",
        "      - {provider: fake, model: invalid-json}\n      - {provider: backup, model: chat}\n",
        "  after:\n    targets:\n      - {provider: fake, model: cut}\n      - {provider: backup, model: chat}\n",
        "  after-stall:\n    targets:\n      - {provider: fake, model: stall}\n      - {provider: backup, model: chat}\n",
    );
    let (_fake, backup, gw) = two_fakes(routes, "").await;
    // Before the first token: a silent backend, an error in a 200 body and a
    // malformed answer all fall over transparently.
    let t = Instant::now();
    let (s, h, body) = send(&gw, "before", true, &[]).await;
    assert_eq!(s, 200);
    assert!(ok_stream(&body), "{body}");
    assert_eq!(h["x-promptgate-attempts"], "4");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the silent backend was abandoned at the first-token timeout"
    );
    // After the first token: no switch, an explicit error event, never a clean end.
    for route in ["after", "after-stall"] {
        let (s, _, body) = send(&gw, route, true, &[]).await;
        assert_eq!(s, 200);
        assert!(body.contains("\"content\":\"Hello\""));
        assert!(!body.contains("[DONE]"), "{route}: {body}");
        let last: Value = serde_json::from_str(sse_data(&body).last().unwrap()).unwrap();
        assert!(last["error"]["code"].is_string(), "{route}: {body}");
    }
    assert_eq!(
        backup.requests().len(),
        1,
        "only the pre-commit failure fell over"
    );
}

#[tokio::test]
async fn retries_back_off_and_respect_the_deadline() {
    let routes = concat!(
        "  again:\n    retry: {max_attempts: 3, backoff: 20ms}\n    provider: fake\n    model: status-503\n",
        "  polite:\n    retry: {max_attempts: 3, backoff: 10ms, deadline: 1s}\n    provider: fake\n    model: status-429\n",
    );
    let (fake, _backup, gw) = two_fakes(routes, "").await;
    let t = Instant::now();
    let (s, _, body) = send(&gw, "again", false, &[]).await;
    assert_eq!(s, 503);
    assert!(
        t.elapsed() >= Duration::from_millis(20),
        "backed off between attempts"
    );
    assert_eq!(fake.requests().len(), 3);
    assert!(
        body.contains(
            "after earlier attempts: fake/status-503: overloaded, fake/status-503: overloaded"
        ),
        "{body}"
    );
    // The history is typed data too: every attempt, in order, in the error object.
    let v: Value = serde_json::from_str(&body).unwrap();
    let attempts = v["error"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{body}");
    for a in attempts {
        assert_eq!(a["target"], "fake/status-503", "{body}");
        assert_eq!(a["kind"], "overloaded", "{body}");
        assert_eq!(a["status"], 503, "{body}");
        assert!(a["elapsed_ms"].is_u64(), "{body}");
    }
    // Retry-After: 7 does not fit in the 1s deadline, so the gateway answers now.
    let t = Instant::now();
    let (s, h, _) = send(&gw, "polite", false, &[]).await;
    assert_eq!(s, 429);
    assert_eq!(h["retry-after"], "7");
    assert!(t.elapsed() < Duration::from_millis(900));
    assert_eq!(
        fake.requests().len(),
        4,
        "one attempt: the backend asked for 7s"
    );
}

#[tokio::test]
async fn circuit_breaker_opens_skips_and_half_opens() {
    let routes = "  guarded:\n    targets:\n      - {provider: fake, model: status-500}\n      - {provider: backup, model: chat}\n";
    let breaker = "breaker: {consecutive_failures: 2, cooldown: 300ms, half_open_probes: 1}\n";
    let (fake, backup, gw) = two_fakes(routes, breaker).await;
    for _ in 0..2 {
        assert_eq!(send(&gw, "guarded", false, &[]).await.0, 200);
    }
    assert_eq!(fake.requests().len(), 2);
    let st = gw.admin_status().await;
    let guarded = st["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "guarded")
        .unwrap()
        .clone();
    assert_eq!(guarded["targets"][0]["breaker"], "open", "{guarded}");
    assert_eq!(guarded["targets"][0]["recent_error_rate"], 1.0);
    // Open: the primary is skipped.
    let (_, h, _) = send(&gw, "guarded", false, &[]).await;
    assert_eq!(h["x-promptgate-attempts"], "1");
    assert_eq!(fake.requests().len(), 2);
    // After the cooldown one probe goes through; it fails, so it opens again.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(send(&gw, "guarded", false, &[]).await.0, 200);
    assert_eq!(fake.requests().len(), 3);
    assert_eq!(send(&gw, "guarded", false, &[]).await.0, 200);
    assert_eq!(fake.requests().len(), 3);
    assert_eq!(backup.requests().len(), 5);
    let m = gw.metrics().await;
    assert!(
        m.contains("promptgate_breaker_state{target=\"fake/status-500\"} 2"),
        "{m}"
    );
}

#[tokio::test]
async fn sticky_split_assigns_subjects_to_arms() {
    let routes = concat!(
        "  ab:\n    split:\n      subject: user\n      arms:\n",
        "        - {name: control, weight: 50, provider: fake, model: chat}\n",
        "        - {name: canary, weight: 50, provider: backup, model: chat}\n",
    );
    let (_fake, _backup, gw) = two_fakes(routes, "").await;
    let mut arms = std::collections::BTreeMap::new();
    for i in 0..40 {
        let mut first = None;
        for _ in 0..3 {
            let mut body = chat_body("ab", false);
            body["user"] = json!(format!("user-{i}"));
            let r = client()
                .post(gw.url("/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let arm = r.headers()["x-promptgate-arm"].to_str().unwrap().to_owned();
            let target = r.headers()["x-promptgate-target"]
                .to_str()
                .unwrap()
                .to_owned();
            assert_eq!(
                target,
                if arm == "control" {
                    "fake/chat"
                } else {
                    "backup/chat"
                }
            );
            match &first {
                None => first = Some(arm.clone()),
                Some(a) => assert_eq!(a, &arm, "user-{i} moved between arms"),
            }
        }
        *arms.entry(first.unwrap()).or_insert(0) += 1;
    }
    assert!(
        arms.len() == 2 && arms.values().all(|n| *n >= 8),
        "{arms:?}"
    );
    let e: Value = client()
        .get(gw.admin_url("/admin/experiments"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let arms_json = e["experiments"][0]["arms"].as_array().unwrap();
    let total: u64 = arms_json
        .iter()
        .map(|a| a["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 120, "{e}");
    assert!(arms_json[0]["latency_p95_ms"].as_f64().unwrap() > 0.0);
    // Without keys, prices or an audit log the arms still count their
    // answers' tokens (the fixture reports 18 per answer); no price, no cost.
    for arm in arms_json {
        let requests = arm["requests"].as_u64().unwrap();
        assert_eq!(arm["tokens"].as_u64(), Some(requests * 18), "{e}");
        assert_eq!(arm["cost"].as_f64(), Some(0.0), "{e}");
    }
    let m = gw.metrics().await;
    assert!(m.contains("promptgate_arm_requests_total{arm=\"canary\",route=\"ab\",status=\"200\"}"));
}

#[tokio::test]
async fn private_requests_stay_on_self_hosted_targets() {
    let routes = concat!(
        "  mixed:\n    targets:\n      - {provider: fake, model: chat}\n      - {provider: sandbox, model: echo}\n",
        "  public-only:\n    provider: fake\n    model: chat\n",
    );
    let (fake, _backup, gw) = two_fakes(routes, "").await;
    let (s, h, _) = send(&gw, "mixed", false, &[("x-promptgate-data", "private")]).await;
    assert_eq!(s, 200);
    assert_eq!(h["x-promptgate-target"], "sandbox/echo");
    let (s, _, body) = send(
        &gw,
        "public-only",
        true,
        &[("x-promptgate-data", "private")],
    )
    .await;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("\"code\":\"no_target_available\""), "{body}");
    assert!(
        body.contains("no target of this route is a self-hosted provider"),
        "{body}"
    );
    assert!(
        fake.requests().is_empty(),
        "private data never reached the commercial backend"
    );
    let (_, h, _) = send(&gw, "mixed", false, &[]).await;
    assert_eq!(h["x-promptgate-target"], "fake/chat");
}

async fn inject(gw: &Gw, body: Value) {
    let r = client()
        .post(gw.admin_url("/admin/faults"))
        .bearer_auth(ADMIN_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

async fn clear(gw: &Gw, provider: &str) {
    let r = client()
        .delete(gw.admin_url(&format!("/admin/faults/{provider}")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The drill promise: with a healthy fallback, each of these faults on the
/// primary costs clients nothing, streaming or not.
#[tokio::test]
async fn drill_faults_on_the_primary_produce_no_client_errors() {
    let routes = "  drill:\n    first_token_timeout: 400ms\n    targets:\n      - {provider: fake, model: chat}\n      - {provider: backup, model: chat}\n";
    let (fake, backup, gw) = two_fakes(
        routes,
        "breaker: {consecutive_failures: 1000, min_requests: 100000}\n",
    )
    .await;
    let faults = [
        json!({"fault": "down"}),
        json!({"fault": "error", "status": 503}),
        json!({"fault": "rate_limited"}),
        json!({"fault": "stall"}),
        json!({"fault": "stream_cut", "after_chunks": 0}),
        json!({"fault": "error_in_200"}),
    ];
    for f in faults {
        let mut body = f.clone();
        body["provider"] = json!("fake");
        body["duration"] = json!("30s");
        inject(&gw, body).await;
        let st = gw.admin_status().await;
        assert_eq!(st["faults"][0]["provider"], "fake", "{st}");
        for stream in [false, true] {
            if f["fault"] == "stream_cut" && !stream {
                continue;
            }
            for _ in 0..3 {
                let (s, h, body) = send(&gw, "drill", stream, &[]).await;
                assert_eq!(s, 200, "{f} stream={stream}: {body}");
                assert_eq!(h["x-promptgate-target"], "backup/chat", "{f}");
                if stream {
                    assert!(ok_stream(&body), "{f}: {body}");
                }
            }
        }
        clear(&gw, "fake").await;
        let (_, h, _) = send(&gw, "drill", false, &[]).await;
        assert_eq!(
            h["x-promptgate-target"], "fake/chat",
            "{f}: traffic returns after the fault is cleared"
        );
    }
    assert!(!backup.requests().is_empty());
    // `slow` adds latency but the primary still serves; a cut after the first
    // chunks is past the commit point: an error event, counted.
    inject(
        &gw,
        json!({"provider": "fake", "fault": "slow", "latency": "150ms", "duration": "30s"}),
    )
    .await;
    let t = Instant::now();
    let (_, h, _) = send(&gw, "drill", false, &[]).await;
    assert!(t.elapsed() >= Duration::from_millis(150));
    assert_eq!(h["x-promptgate-target"], "fake/chat");
    inject(
        &gw,
        json!({"provider": "fake", "fault": "stream_cut", "after_chunks": 2, "duration": "30s"}),
    )
    .await;
    let (_, _, body) = send(&gw, "drill", true, &[]).await;
    assert!(
        !body.contains("[DONE]") && body.contains("drill: stream cut after 2 chunks"),
        "{body}"
    );
    // Faults expire by themselves.
    inject(
        &gw,
        json!({"provider": "fake", "fault": "down", "duration": "200ms"}),
    )
    .await;
    assert_eq!(
        send(&gw, "drill", false, &[]).await.1["x-promptgate-target"],
        "backup/chat"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        send(&gw, "drill", false, &[]).await.1["x-promptgate-target"],
        "fake/chat"
    );
    let st = gw.admin_status().await;
    assert_eq!(st["faults"], json!([]));
    let _ = fake;
}

#[tokio::test]
async fn providers_can_be_drained_and_enabled() {
    let routes = "  d:\n    targets:\n      - {provider: fake, model: chat}\n      - {provider: backup, model: chat}\n";
    let (_fake, _backup, gw) = two_fakes(routes, "").await;
    let c = client();
    let r = c
        .post(gw.admin_url("/admin/providers/fake/drain"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, h, _) = send(&gw, "d", false, &[]).await;
    assert_eq!(h["x-promptgate-target"], "backup/chat");
    assert_eq!(
        h["x-promptgate-attempts"], "1",
        "a drained provider is skipped, not tried"
    );
    let r = c
        .post(gw.admin_url("/admin/providers/fake/enable"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, h, _) = send(&gw, "d", false, &[]).await;
    assert_eq!(h["x-promptgate-target"], "fake/chat");
    let r = c
        .post(gw.admin_url("/admin/faults"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"provider": "nope", "fault": "down", "duration": "1s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(gw.admin_url("/admin/faults"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"provider": "fake", "fault": "down"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "faults must expire");
}

#[tokio::test]
async fn per_target_model_mapping_and_overrides() {
    let routes = "  mapped:\n    targets:\n      - {provider: fake, model: status-503, params: {temperature: 0.9}}\n      - {provider: backup, model: chat, params: {temperature: 0.1, extra: {top_k: 7}}}\n";
    let (fake, backup, gw) = two_fakes(routes, "").await;
    assert_eq!(send(&gw, "mapped", false, &[]).await.0, 200);
    assert_eq!(fake.last().body["temperature"], 0.9);
    let b = backup.last().body;
    assert_eq!(
        (
            b["model"].clone(),
            b["temperature"].clone(),
            b["top_k"].clone()
        ),
        (json!("chat"), json!(0.1), json!(7))
    );
}

#[tokio::test]
async fn active_health_checks_open_the_breaker_before_traffic_hits_it() {
    let fake = spawn_fake().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let (g, mut p) = fake_config(&fake, "  checked:\n    targets:\n      - {provider: sick, model: chat}\n      - {provider: well, model: chat}\n");
    p.push(("sick.yaml".into(), format!("kind: openai\nbase_url: http://127.0.0.1:{port}/v1\nhealth_check: {{interval: 100ms}}\n")));
    p.push(("well.yaml".into(), format!("kind: openai\nbase_url: {}\napi_key_env: FAKE_UPSTREAM_KEY\nhealth_check: {{interval: 100ms}}\n", fake.base_url())));
    let gw = spawn_gateway(&g, &p).await;
    let _checks = promptgate::pipeline::spawn_health_checks(gw.gw.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (s, h, _) = send(&gw, "checked", false, &[]).await;
    assert_eq!(s, 200);
    assert_eq!(h["x-promptgate-target"], "well/chat");
    assert_eq!(
        h["x-promptgate-attempts"], "1",
        "the dead target was skipped, not tried"
    );
    let m = gw.metrics().await;
    assert!(
        m.contains("promptgate_health_checks_total{provider=\"sick\",result=\"failed\"}"),
        "{m}"
    );
    assert!(
        m.contains("promptgate_health_checks_total{provider=\"well\",result=\"ok\"}"),
        "{m}"
    );
    assert!(
        m.contains("promptgate_breaker_state{target=\"sick/chat\"} 2"),
        "{m}"
    );
    // The healthy provider's checks carried its key.
    assert!(fake
        .requests()
        .iter()
        .all(|r| r.headers["authorization"] == format!("Bearer {FAKE_KEY}")));
}

/// A 50/50 split `greet-ab` over the two versions of prompt `greet`: arm `v1`
/// is the sandbox's echo (with `first`, e.g. its prompt selector), arm `v2`
/// (version 2) is `second`.
async fn greet_split(first: &str, second: &str) -> (Fake, Gw) {
    let fake = spawn_fake().await;
    let routes = format!(
        concat!(
            "  greet-ab:\n    split:\n      subject: user\n      arms:\n",
            "        - {{name: v1, weight: 1, provider: sandbox, model: echo{first}}}\n",
            "        - {{name: v2, weight: 1, {second}, prompt: {{version: 2}}}}\n",
        ),
        first = first,
        second = second
    );
    let (g, p) = fake_config(&fake, &routes);
    let prompt = "variables:\n  name: {type: string}\nlabels: {production: 1}\nversions:\n  1:\n    route: sandbox-echo\n    messages: [{role: user, content: \"one {{ name }}\"}]\n  2:\n    route: sandbox-echo\n    messages: [{role: user, content: \"two {{ name }}\"}]\n";
    let gw = spawn_gateway_with_prompts(&g, &p, &[("greet.yaml", prompt)]).await;
    (fake, gw)
}

/// One request to `greet-ab` (with `user` when given): the arm, the prompt
/// version and the provider that served it, and the body.
async fn greet(gw: &Gw, user: Option<String>) -> (String, String, String, Value) {
    let mut body = json!({"model": "greet-ab", "messages": [],
                          "prompt": {"id": "greet", "variables": {"name": "x"}}});
    if let Some(u) = user {
        body["user"] = json!(u);
    }
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let header = |name: &str| r.headers()[name].to_str().unwrap().to_owned();
    let (arm, version, provider) = (
        header("x-promptgate-arm"),
        header("x-promptgate-prompt-version"),
        header("x-promptgate-provider"),
    );
    (arm, version, provider, r.json().await.unwrap())
}

#[tokio::test]
async fn a_split_over_prompt_versions_renders_the_arm_version() {
    let (_fake, gw) = greet_split(", prompt: {version: 1}", "provider: sandbox, model: echo").await;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..30 {
        let (arm, version, _, v) = greet(&gw, Some(format!("u{i}"))).await;
        assert_eq!(arm, format!("v{version}"), "the arm decides the version");
        let expected = if version == "1" { "one x" } else { "two x" };
        assert_eq!(v["choices"][0]["message"]["content"], expected);
        seen.insert(version);
    }
    assert_eq!(seen.len(), 2);
    // An explicit version wins over the arm.
    let body = json!({"model": "greet-ab", "messages": [], "user": "u1",
                      "prompt": {"id": "greet", "version": 2, "variables": {"name": "x"}}});
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-promptgate-prompt-version"], "2");
}

/// The breaker state of `target` in `route`, from the admin status.
async fn breaker_of(gw: &Gw, route: &str, target: &str) -> String {
    let st = gw.admin_status().await;
    let r = st["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == route)
        .unwrap()
        .clone();
    r["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .unwrap()["breaker"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn wait_for_requests(fake: &Fake, n: usize) {
    for _ in 0..200 {
        if fake.requests().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the fake saw {} requests, expected {n}",
        fake.requests().len()
    );
}

/// A half-open probe whose client goes away mid-flight must not hold the probe
/// slot forever: the next request after it is let through as a new probe.
#[tokio::test]
async fn a_probe_cancelled_by_the_client_does_not_keep_the_breaker_shut() {
    let routes = "  probed:\n    provider: fake\n    model: hang\n";
    let breaker = "breaker: {consecutive_failures: 1, cooldown: 200ms, half_open_probes: 1}\n";
    let (fake, _backup, gw) = two_fakes(routes, breaker).await;
    inject(
        &gw,
        json!({"provider": "fake", "fault": "error", "status": 500, "duration": "1m"}),
    )
    .await;
    assert!(send(&gw, "probed", false, &[]).await.0 >= 500);
    clear(&gw, "fake").await;
    assert_eq!(breaker_of(&gw, "probed", "fake/hang").await, "open");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    for n in 1..=2 {
        // The probe hangs upstream; the client gives up before any timeout of
        // the gateway's fires (headers timeout 1s).
        let r = impatient
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("probed", false))
            .send()
            .await;
        assert!(r.is_err_and(|e| e.is_timeout()), "request {n}");
        wait_for_requests(&fake, n).await;
        // Let the gateway see the disconnect.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(breaker_of(&gw, "probed", "fake/hang").await, "half_open");
    }
    assert_eq!(
        fake.requests().len(),
        2,
        "the second request was a probe too"
    );
}

/// `enable` puts a provider back at once: its open breakers are reset.
#[tokio::test]
async fn enable_resets_the_providers_breakers() {
    let routes = "  guarded:\n    targets:\n      - {provider: fake, model: status-500}\n      - {provider: backup, model: chat}\n";
    let breaker = "breaker: {consecutive_failures: 1, cooldown: 1h}\n";
    let (fake, _backup, gw) = two_fakes(routes, breaker).await;
    assert_eq!(send(&gw, "guarded", false, &[]).await.0, 200);
    assert_eq!(breaker_of(&gw, "guarded", "fake/status-500").await, "open");
    send(&gw, "guarded", false, &[]).await;
    assert_eq!(fake.requests().len(), 1, "skipped while open");
    let r = client()
        .post(gw.admin_url("/admin/providers/fake/enable"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["breakers_reset"]
            .as_array()
            .unwrap()
            .contains(&json!("fake/status-500")),
        "{v}"
    );
    assert_eq!(
        breaker_of(&gw, "guarded", "fake/status-500").await,
        "closed"
    );
    assert!(gw
        .metrics()
        .await
        .contains("promptgate_breaker_state{target=\"fake/status-500\"} 0"));
    send(&gw, "guarded", false, &[]).await;
    assert_eq!(fake.requests().len(), 2, "tried again after enable");
}

/// A reload keeps a target's breaker while the target's config is unchanged,
/// and starts it over when the config changes; a shorter cooldown applies at once.
#[tokio::test]
async fn reload_resets_breakers_of_changed_targets_only() {
    let routes = "  guarded:\n    targets:\n      - {provider: fake, model: status-500}\n      - {provider: backup, model: chat}\n";
    let breaker = "breaker: {consecutive_failures: 1, cooldown: 1h}\n";
    let (fake, _backup, gw) = two_fakes(routes, breaker).await;
    assert_eq!(send(&gw, "guarded", false, &[]).await.0, 200);
    assert_eq!(gw.admin_reload().await.0, 200);
    assert_eq!(
        breaker_of(&gw, "guarded", "fake/status-500").await,
        "open",
        "an unchanged target keeps its breaker"
    );
    // The provider file changes (a new timeout): the target starts over.
    let file = gw.dir.path().join("providers/fake.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("total: 10s", "total: 9s")).unwrap();
    assert_eq!(gw.admin_reload().await.0, 200);
    assert_eq!(
        breaker_of(&gw, "guarded", "fake/status-500").await,
        "closed"
    );
    send(&gw, "guarded", false, &[]).await;
    assert_eq!(fake.requests().len(), 2);
    // Open again; a reload that only shortens the cooldown lets probes in now.
    assert_eq!(breaker_of(&gw, "guarded", "fake/status-500").await, "open");
    let cfg = gw.config_path();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("cooldown: 1h", "cooldown: 10ms")).unwrap();
    assert_eq!(gw.admin_reload().await.0, 200);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        breaker_of(&gw, "guarded", "fake/status-500").await,
        "half_open"
    );
}

/// One target id used by two routes with different settings has one breaker,
/// and keeps it across a reload.
#[tokio::test]
async fn a_target_shared_by_routes_has_one_breaker_across_reloads() {
    let routes = concat!(
        "  guarded:\n    targets:\n      - {provider: fake, model: status-500}\n      - {provider: backup, model: chat}\n",
        "  patient:\n    first_token_timeout: 5s\n    targets:\n      - {provider: fake, model: status-500}\n      - {provider: backup, model: chat}\n",
    );
    let breaker = "breaker: {consecutive_failures: 1, cooldown: 1h}\n";
    let (fake, _backup, gw) = two_fakes(routes, breaker).await;
    assert_eq!(send(&gw, "guarded", false, &[]).await.0, 200);
    assert_eq!(breaker_of(&gw, "patient", "fake/status-500").await, "open");
    assert_eq!(gw.admin_reload().await.0, 200);
    for route in ["guarded", "patient"] {
        assert_eq!(breaker_of(&gw, route, "fake/status-500").await, "open");
        send(&gw, route, false, &[]).await;
    }
    assert_eq!(fake.requests().len(), 1, "skipped by both routes");
}

/// Without a split subject the arm is drawn at random: it must be drawn once,
/// so the prompt version a request is rendered with is always the version of
/// the arm (and the chain) that serves it.
#[tokio::test]
async fn an_unsubjected_split_renders_and_serves_with_one_arm() {
    let (fake, gw) = greet_split(", prompt: {version: 1}", "provider: fake, model: chat").await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        // No `user`: no subject to hash, so each request draws its arm.
        let (arm, version, provider, _) = greet(&gw, None).await;
        assert_eq!(
            arm,
            format!("v{version}"),
            "rendered with one arm, served by another"
        );
        let expected = if arm == "v1" { "sandbox" } else { "fake" };
        assert_eq!(provider, expected, "arm {arm} served by {provider}");
        seen.insert(arm);
    }
    assert_eq!(seen.len(), 2, "both arms drawn over 40 requests");
    // The fake saw exactly the requests of arm v2, each rendered from version 2.
    for r in fake.requests() {
        let text = r.body["messages"].to_string();
        assert!(text.contains("two x"), "{text}");
    }
}

/// A split where only one arm pins a prompt version: the other arm renders the
/// prompt's default (label `production`, version 1). Drawn once, the version
/// always matches the arm that serves, on `/v1/chat/completions` and on the
/// prompt endpoint whose version names the split route.
#[tokio::test]
async fn a_split_where_one_arm_pins_a_version_renders_and_serves_with_one_arm() {
    let (fake, gw) = greet_split("", "provider: fake, model: chat").await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (arm, version, provider, _) = greet(&gw, None).await;
        let (want_version, want_provider) = if arm == "v2" {
            ("2", "fake")
        } else {
            ("1", "sandbox")
        };
        assert_eq!(
            (version.as_str(), provider.as_str()),
            (want_version, want_provider),
            "arm {arm}"
        );
        seen.insert(arm);
    }
    assert_eq!(seen.len(), 2, "both arms drawn over 40 requests");
    for r in fake.requests() {
        assert!(r.body["messages"].to_string().contains("two x"));
    }
}

async fn embed(gw: &Gw, model: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": model, "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let h = r.headers().clone();
    (s, h, r.json().await.unwrap())
}

/// Embeddings go through the same attempt loop as chat: a failing first target
/// falls over to the next, failures count on the breaker (and an open breaker
/// is respected), and when every target fails the error lists the attempts.
#[tokio::test]
async fn embeddings_fall_over_respect_breakers_and_list_attempts() {
    let routes = concat!(
        "  emb:\n    targets:\n      - {provider: fake, model: status-500}\n      - {provider: backup, model: emb}\n",
        "  emb-limited:\n    targets:\n      - {provider: fake, model: status-429}\n      - {provider: backup, model: emb}\n",
        "  emb-down:\n    targets:\n      - {provider: fake, model: status-429}\n      - {provider: backup, model: status-500}\n",
    );
    let breaker = "breaker: {consecutive_failures: 2, cooldown: 60s}\n";
    let (fake, backup, gw) = two_fakes(routes, breaker).await;

    // 500 on the first target: the second answers.
    let (s, h, v) = embed(&gw, "emb").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h["x-promptgate-provider"], "backup");
    assert_eq!(h["x-promptgate-attempts"], "2");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    // 429 too.
    let (s, h, v) = embed(&gw, "emb-limited").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h["x-promptgate-target"], "backup/emb");

    // A second failure opens the primary's breaker; then it is passed over.
    assert_eq!(embed(&gw, "emb").await.0, 200);
    assert_eq!(breaker_of(&gw, "emb", "fake/status-500").await, "open");
    let before = fake.requests().len();
    let (s, h, _) = embed(&gw, "emb").await;
    assert_eq!(s, 200);
    assert_eq!(
        h["x-promptgate-attempts"], "1",
        "the open breaker was skipped"
    );
    assert_eq!(fake.requests().len(), before, "no call to an open target");

    // Every target fails: the error lists each attempt.
    let backup_before = backup.requests().len();
    let (s, _, v) = embed(&gw, "emb-down").await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(backup.requests().len(), backup_before + 1);
    let text = v["error"]["message"].as_str().unwrap();
    assert!(
        text.contains("after earlier attempts: fake/status-429: rate_limited"),
        "{v}"
    );
    let attempts = v["error"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{v}");
    assert_eq!(attempts[0]["target"], "fake/status-429");
    assert_eq!(attempts[0]["kind"], "rate_limited");
    assert_eq!(attempts[0]["status"], 429);
    assert_eq!(attempts[1]["target"], "backup/status-500");
    assert_eq!(attempts[1]["kind"], "overloaded");
    assert_eq!(attempts[1]["status"], 500);

    // Private data goes to no commercial backend, embeddings included.
    let backup_before = backup.requests().len();
    let r = client()
        .post(gw.url("/v1/embeddings"))
        .header("x-promptgate-data", "private")
        .json(&json!({"model": "emb-limited", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "no_target_available", "{v}");
    assert_eq!(backup.requests().len(), backup_before, "nothing was sent");

    // A drill fault on the backup applies to embeddings too: emb-limited has
    // no healthy target left (its first one's breaker is open by now, shared
    // with emb-down), and the error shows the fault's answer.
    inject(
        &gw,
        json!({"provider": "backup", "fault": "error", "status": 502, "duration": "30s"}),
    )
    .await;
    let backup_before = backup.requests().len();
    let (s, _, v) = embed(&gw, "emb-limited").await;
    assert_eq!(s, 503, "{v}");
    let last = v["error"]["attempts"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["target"], "backup/emb", "{v}");
    assert_eq!(last["status"], 502, "{v}");
    assert_eq!(backup.requests().len(), backup_before, "the fault answered");
    clear(&gw, "backup").await;

    let m = gw.metrics().await;
    assert!(
        m.contains("promptgate_attempts_total{result=\"overloaded\",route=\"emb\",target=\"fake/status-500\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("promptgate_fallbacks_total{from=\"fake/status-500\",kind=\"overloaded\",route=\"emb\",to=\"backup/emb\"} 2"),
        "{m}"
    );
}

/// The attempts array is in the Anthropic dialect's error object too, and
/// names no target when configured ids are not listed.
#[tokio::test]
async fn attempts_in_both_dialects_and_unlisted_without_targets() {
    let routes = "  both-down:\n    targets:\n      - {provider: fake, model: status-500}\n      - {provider: backup, model: status-503}\n";
    for listed in [true, false] {
        let fake = spawn_fake().await;
        let backup = spawn_fake().await;
        let (g, mut p) = fake_config(&fake, routes);
        let g = if listed {
            g
        } else {
            g.replace("limits:\n", "limits:\n  list_ids_in_errors: false\n")
        };
        p.push(backup_provider(&backup));
        let gw = spawn_gateway(&g, &p).await;
        let r = client()
            .post(gw.url("/v1/messages"))
            .json(&json!({"model": "both-down", "max_tokens": 16,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_server_error(), "{}", r.status());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error", "{v}");
        let attempts = v["error"]["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{v}");
        assert_eq!(attempts[0]["status"], 500);
        assert_eq!(attempts[1]["status"], 503);
        assert_eq!(attempts[1]["kind"], "overloaded");
        let text = v.to_string();
        if listed {
            assert_eq!(attempts[0]["target"], "fake/status-500");
            assert!(
                text.contains("after earlier attempts: fake/status-500: overloaded"),
                "{v}"
            );
        } else {
            assert!(attempts.iter().all(|a| a.get("target").is_none()), "{v}");
            assert!(!text.contains("fake/"), "{v}");
            assert!(!text.contains("backup/"), "{v}");
            assert!(
                text.contains("after earlier attempts: attempt 1: overloaded"),
                "{v}"
            );
        }
    }
}

/// A request that fails on an A/B arm before any response counts for that arm,
/// in both modes: the experiment's error rate sees it.
#[tokio::test]
async fn failures_before_a_response_count_for_their_arm() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(
        &fake,
        "  ab-down:\n    split:\n      subject: user\n      arms:\n        - {name: down, weight: 1, provider: fake, model: status-500}\n",
    );
    let gw = spawn_gateway(&g, &p).await;
    for stream in [false, true] {
        let (s, h, _) = send(&gw, "ab-down", stream, &[]).await;
        assert_eq!(s, 503);
        assert!(h.get("x-request-id").is_some());
    }
    let metrics = gw.metrics().await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("promptgate_arm_requests_total")
                && l.contains("arm=\"down\"")
                && l.contains("status=\"503\"")
        })
        .unwrap_or_else(|| panic!("no failure counted for the arm:\n{metrics}"));
    assert!(line.ends_with(" 2"), "{line}");
}

/// On the prompt endpoint, without `model`, the version names the route; when
/// that route is a split over prompt versions, its arm (drawn once) chooses the
/// version that is rendered and serves it.
#[tokio::test]
async fn the_prompt_endpoint_on_a_split_renders_and_serves_with_one_arm() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(
        &fake,
        concat!(
            "  greet-ab:\n    split:\n      subject: user\n      arms:\n",
            "        - {name: v1, weight: 1, provider: sandbox, model: echo, prompt: {version: 1}}\n",
            "        - {name: v2, weight: 1, provider: fake, model: chat, prompt: {version: 2}}\n",
        ),
    );
    let prompt = "variables:\n  name: {type: string}\nlabels: {production: 1}\nversions:\n  1:\n    route: greet-ab\n    messages: [{role: user, content: \"one {{ name }}\"}]\n  2:\n    route: greet-ab\n    messages: [{role: user, content: \"two {{ name }}\"}]\n";
    let gw = spawn_gateway_with_prompts(&g, &p, &[("greet.yaml", prompt)]).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let r = client()
            .post(gw.url("/v1/prompts/greet/chat/completions"))
            .json(&json!({"variables": {"name": "x"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let header = |name: &str| r.headers()[name].to_str().unwrap().to_owned();
        let (arm, version) = (
            header("x-promptgate-arm"),
            header("x-promptgate-prompt-version"),
        );
        assert_eq!(
            arm,
            format!("v{version}"),
            "rendered with one arm, served by another"
        );
        seen.insert(arm);
    }
    assert_eq!(seen.len(), 2, "both arms drawn over 40 requests");
    for r in fake.requests() {
        assert!(r.body["messages"].to_string().contains("two x"));
    }
}
