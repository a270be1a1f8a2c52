//! Rate limits: requests, tokens and concurrency per key and per route, the
//! 429 answers in both dialects, and one limit in Redis shared by two gateway
//! processes, with the failure policies when Redis is down.
// Test clients are started freely; the gateway's own tasks go through task::spawn.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::peers::Redis;
use common::*;
use serde_json::{json, Value};
use sha2::Digest;

const KEY_A: &str = "pg-limits-test-key-aaaaaaaaaaaaaaaa";
const KEY_B: &str = "pg-limits-test-key-bbbbbbbbbbbbbbbb";

fn sha(key: &str) -> String {
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `keys/team.yaml` with two keys and their limits.
fn keys_file(a_limits: &str, b_limits: &str) -> String {
    format!(
        "team-a:\n  sha256: {}\n  owner: a\n  limits: {a_limits}\n\
         team-b:\n  sha256: {}\n  owner: b\n  limits: {b_limits}\n",
        sha(KEY_A),
        sha(KEY_B)
    )
}

async fn post(url: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut r = client().post(url).json(body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.unwrap()
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// The sum of a counter's samples whose labels contain every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends `n` chat requests at once; returns each one's status and body.
async fn burst(url: String, model: &str, key: Option<&'static str>, n: usize) -> Vec<(u16, Value)> {
    let body = chat_body(model, false);
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move {
                let r = post(&url, key, &body).await;
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// 12 requests at once against `rpm: 5`: exactly 5 are admitted. They all
/// arrive well within one emission interval (12 s), where GCRA admits exactly
/// the burst (the whole minute's allowance), so the count is exact.
#[tokio::test]
async fn rpm_admits_exactly_the_burst_of_concurrent_requests() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(
        &fake,
        "  limited:\n    provider: fake\n    model: chat\n    limits: {rpm: 5}\n",
    );
    let gw = spawn_gateway(&g, &p).await;
    let results = burst(gw.url("/v1/chat/completions"), "limited", None, 12).await;
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let limited: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(ok, 5, "{results:?}");
    assert_eq!(limited.len(), 7, "{results:?}");
    for b in &limited {
        assert_eq!(b["error"]["type"], "rate_limit_error", "{b}");
        assert_eq!(b["error"]["code"], "rate_limit_exceeded", "{b}");
        let m = b["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("route `limited`") && m.contains("5 requests per minute (rpm)"),
            "{m}"
        );
    }
    assert_eq!(
        fake.requests().len(),
        5,
        "refused requests never reach the upstream"
    );

    // The next one: 429 with when to come back and OpenAI's headers.
    let r = post(
        &gw.url("/v1/chat/completions"),
        None,
        &chat_body("limited", false),
    )
    .await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!((1..=12).contains(&retry), "retry-after {retry}");
    assert_eq!(
        header(&r, "x-ratelimit-limit-requests").as_deref(),
        Some("5")
    );
    assert_eq!(
        header(&r, "x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    let reset = header(&r, "x-ratelimit-reset-requests").unwrap();
    assert!(reset.ends_with('s'), "{reset}");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "promptgate_ratelimit_rejections_total",
            &[
                "route=\"limited\"",
                "scope=\"route\"",
                "limit=\"rpm\"",
                "key=\"anonymous\""
            ]
        ),
        8.0,
        "{m}"
    );
}

/// Admitted responses carry the tightest limit's headers.
#[tokio::test]
async fn admitted_responses_carry_the_tightest_limits_headers() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(
        &fake,
        "  limited:\n    provider: fake\n    model: chat\n    limits: {rpm: 60, tpm: 100000}\n",
    );
    let gw = spawn_gateway(&g, &p).await;
    let url = gw.url("/v1/chat/completions");
    let r = post(&url, None, &chat_body("limited", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-ratelimit-limit-requests").as_deref(),
        Some("60")
    );
    assert_eq!(
        header(&r, "x-ratelimit-remaining-requests").as_deref(),
        Some("59")
    );
    assert_eq!(
        header(&r, "x-ratelimit-reset-requests").as_deref(),
        Some("1s")
    );
    assert_eq!(
        header(&r, "x-ratelimit-limit-tokens").as_deref(),
        Some("100000")
    );
    let remaining: u64 = header(&r, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    // The input (two short messages) was charged before the call.
    assert!((99_950..100_000).contains(&remaining), "{remaining}");
    // A route without limits: no headers.
    let r = post(&url, None, &chat_body("fake-chat", false)).await;
    assert_eq!(r.status(), 200);
    assert!(header(&r, "x-ratelimit-limit-requests").is_none());
}

/// A route's limit counts every caller: two keys share it; a key's own limit
/// counts only that key.
#[tokio::test]
async fn route_limit_is_shared_by_two_keys_and_a_key_limit_is_its_own() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(
        &fake,
        "  limited:\n    provider: fake\n    model: chat\n    limits: {rpm: 3}\n",
    );
    let keys = keys_file("{rpm: 100}", "{rpm: 100}");
    let gw = spawn_gateway_with_files(&g, &p, &[("keys/team.yaml", &keys)]).await;
    let url = gw.url("/v1/chat/completions");
    let body = chat_body("limited", false);
    let mut statuses = Vec::new();
    for key in [KEY_A, KEY_B, KEY_A, KEY_B] {
        statuses.push(post(&url, Some(key), &body).await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429]);

    // A key's own limit: team-a may send 2 a minute; team-b is not affected.
    let (g, p) = fake_config(&fake, "");
    let keys = keys_file("{rpm: 2}", "{rpm: 100}");
    let gw = spawn_gateway_with_files(&g, &p, &[("keys/team.yaml", &keys)]).await;
    let url = gw.url("/v1/chat/completions");
    let body = chat_body("fake-chat", false);
    for _ in 0..2 {
        assert_eq!(post(&url, Some(KEY_A), &body).await.status(), 200);
    }
    let r = post(&url, Some(KEY_A), &body).await;
    assert_eq!(r.status(), 429);
    let b: Value = r.json().await.unwrap();
    let m = b["error"]["message"].as_str().unwrap();
    assert!(m.contains("key `team-a`") && m.contains("rpm"), "{m}");
    assert!(!m.contains(KEY_A) && !m.contains(&sha(KEY_A)), "{m}");
    assert_eq!(post(&url, Some(KEY_B), &body).await.status(), 200);
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "promptgate_ratelimit_rejections_total",
            &["key=\"team-a\"", "scope=\"key\"", "limit=\"rpm\""]
        ),
        1.0,
        "{metrics}"
    );
    // The admin API's view of the key: its limit and what is left.
    let usage = gw.gw.governor.limits.usage("team-a");
    assert_eq!(usage["rpm"]["limit"], 2, "{usage}");
    assert_eq!(usage["rpm"]["remaining"], 0, "{usage}");
    assert_eq!(usage["in_flight"], 0, "{usage}");
}

/// `concurrency: 2` with streams that take seconds: a third request while two
/// are in flight is refused; each stream holds its slot to its last byte; once
/// they end, requests are admitted again.
#[tokio::test]
async fn concurrency_limit_holds_a_slot_until_the_response_ends() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(
        &fake,
        "  two-at-once:\n    provider: fake\n    model: slow\n    limits: {concurrency: 2}\n",
    );
    let gw = spawn_gateway(&g, &p).await;
    let url = gw.url("/v1/chat/completions");
    let body = chat_body("two-at-once", true);
    let first = post(&url, None, &body).await;
    let second = post(&url, None, &body).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = post(&url, None, &body).await;
    assert_eq!(third.status(), 429);
    assert!(
        header(&third, "retry-after").is_none(),
        "no time is known for a slot"
    );
    let b: Value = third.json().await.unwrap();
    let m = b["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("route `two-at-once` allows 2 concurrent requests"),
        "{m}"
    );

    // One stream read to its end frees its slot only then; the other is
    // abandoned by its client, which frees its slot too.
    let text = first.text().await.unwrap();
    assert!(text.contains("[DONE]"));
    drop(second);
    let mut admitted = false;
    for _ in 0..50 {
        let r = post(&url, None, &body).await;
        if r.status() == 200 {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted, "a slot came back after the streams ended");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "promptgate_ratelimit_rejections_total",
            &["limit=\"concurrency\"", "scope=\"route\""]
        ),
        1.0,
        "{m}"
    );
}

fn big_body(model: &str, words: usize) -> Value {
    let text: String = (0..words).map(|i| format!("word{i} ")).collect();
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// `tpm: 1000`: input is counted before the call and charged at admission, the
/// output when the response ends; a big request is refused once the budget is
/// used, and one bigger than the whole minute is refused for good.
#[tokio::test]
async fn token_limit_refuses_a_big_request_after_the_budget_is_used() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(
        &fake,
        "  tokens:\n    provider: fake\n    model: chat\n    limits: {tpm: 1000}\n",
    );
    let gw = spawn_gateway(&g, &p).await;
    let url = gw.url("/v1/chat/completions");
    let r = post(&url, None, &big_body("tokens", 300)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-ratelimit-limit-tokens").as_deref(),
        Some("1000")
    );
    let after_first: u64 = header(&r, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    // 300 words of the form `wordN ` are several hundred tokens (over half).
    assert!((100..500).contains(&after_first), "{after_first}");
    let input = 1000 - after_first;
    let _ = r.bytes().await.unwrap();

    // The first response's 6 output tokens were settled when it ended: a
    // small request now sees them gone too.
    let r = post(&url, None, &chat_body("tokens", false)).await;
    assert_eq!(r.status(), 200);
    let after_small: u64 = header(&r, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        after_small + 6 < after_first && after_small + 40 > after_first,
        "{after_first} → {after_small}"
    );
    let _ = r.bytes().await.unwrap();

    // The same big request again does not fit what is left.
    let r = post(&url, None, &big_body("tokens", 300)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        header(&r, "x-ratelimit-limit-tokens").as_deref(),
        Some("1000")
    );
    assert!(header(&r, "retry-after").is_some());
    let b: Value = r.json().await.unwrap();
    let m = b["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("1000 tokens per minute (tpm)") && m.contains(&format!("{input} tokens")),
        "{m}"
    );
    // More than the whole minute: refused without a time to come back.
    let r = post(&url, None, &big_body("tokens", 1200)).await;
    assert_eq!(r.status(), 429);
    assert!(header(&r, "retry-after").is_none());
    let b: Value = r.json().await.unwrap();
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("can never fit"),
        "{b}"
    );
    assert_eq!(fake.requests().len(), 2);
}

/// The refusal in each client's dialect: OpenAI's error object and
/// Anthropic's `rate_limit_error`, with the request id and the headers.
#[tokio::test]
async fn limited_answers_speak_both_dialects() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(
        &fake,
        "  one:\n    provider: fake\n    model: chat\n    limits: {rpm: 1}\n",
    );
    let gw = spawn_gateway(&g, &p).await;
    let openai = gw.url("/v1/chat/completions");
    assert_eq!(
        post(&openai, None, &chat_body("one", false)).await.status(),
        200
    );
    let r = post(&openai, None, &chat_body("one", false)).await;
    assert_eq!(r.status(), 429);
    let id = header(&r, "x-request-id").unwrap();
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["type"], "rate_limit_error", "{b}");
    assert_eq!(b["error"]["code"], "rate_limit_exceeded", "{b}");
    assert!(
        b.to_string().contains(&id),
        "the request id is in the body: {b}"
    );

    let body = json!({"model": "one", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Say hello."}]});
    let r = client()
        .post(gw.url("/v1/messages"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(
        header(&r, "x-ratelimit-limit-requests").as_deref(),
        Some("1")
    );
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["type"], "error", "{b}");
    assert_eq!(b["error"]["type"], "rate_limit_error", "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("rpm"),
        "{b}"
    );
}

fn redis_section(redis_port: u16, policy: &str) -> String {
    format!(
        "  store: redis\n  redis: {{url: \"redis://127.0.0.1:{redis_port}\", prefix: \"pgtest:\", timeout: 200ms}}\n  on_store_error: {policy}\n"
    )
}

/// The gateway config folder for processes: a fake route with `limits` and the
/// rate-limit store in Redis.
fn process_config(
    fake: &Fake,
    route_limits: &str,
    redis_port: u16,
    policy: &str,
) -> tempfile::TempDir {
    let (g, p) = fake_config(
        fake,
        &format!(
            "  shared:\n    provider: fake\n    model: chat\n    limits: {route_limits}\n\
             \x20 warm:\n    provider: fake\n    model: chat\n    limits: {{rpm: 100}}\n"
        ),
    );
    let g = g.replace(
        "limits:\n  max_body_bytes: 65536\n",
        &format!(
            "limits:\n  max_body_bytes: 65536\n{}",
            redis_section(redis_port, policy)
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &g, &p);
    dir
}

async fn redis_conn(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// One limit in Redis, two gateway processes: together they admit exactly
/// the limit. The counters live under the prefix and expire; a script Redis
/// forgot (`SCRIPT FLUSH`) is sent again.
#[tokio::test]
async fn one_redis_limit_is_shared_by_two_gateway_processes() {
    let redis = Redis::start(None);
    let fake = spawn_fake().await;
    let dir = process_config(&fake, "{rpm: 6, concurrency: 50}", redis.port, "fail_open");
    let env = [("FAKE_UPSTREAM_KEY", FAKE_KEY)];
    let a = GatewayProcess::start(&dir.path().join("promptgate.yaml"), &env);
    let b = GatewayProcess::start(&dir.path().join("promptgate.yaml"), &env);
    // Each process connects to Redis (on another route's counter) first, so
    // neither starts the race late.
    for base in [&a.base, &b.base] {
        let url = format!("{base}/v1/chat/completions");
        assert_eq!(
            post(&url, None, &chat_body("warm", false)).await.status(),
            200
        );
    }
    let mut tasks = Vec::new();
    for i in 0..14 {
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        let url = format!("{base}/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            post(&url, None, &chat_body("shared", false))
                .await
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let ok_a = statuses.iter().step_by(2).filter(|s| **s == 200).count();
    let ok_b = statuses
        .iter()
        .skip(1)
        .step_by(2)
        .filter(|s| **s == 200)
        .count();
    assert_eq!(ok_a + ok_b, 6, "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        8,
        "{statuses:?}"
    );

    let mut conn = redis_conn(redis.port).await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg("pgtest:limit:route:shared:rpm")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        pttl > 0 && pttl <= 61_000,
        "the counter expires when idle: {pttl}"
    );
    // Every lease was given back when its response ended.
    let mut leases = 1;
    for _ in 0..50 {
        leases = redis::cmd("ZCARD")
            .arg("pgtest:limit:route:shared:conc")
            .query_async::<i64>(&mut conn)
            .await
            .unwrap();
        if leases == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(leases, 0);

    // Redis forgets the script: the gateway sends it again (EVAL), still
    // enforcing the shared limit, with no store error.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = post(
        &format!("{}/v1/chat/completions", a.base),
        None,
        &chat_body("shared", false),
    )
    .await;
    assert_eq!(r.status(), 429);
    let m = client()
        .get(format!("{}/metrics", a.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&m, "promptgate_ratelimit_store_errors_total", &[]),
        0.0,
        "{m}"
    );
}

/// Redis killed under `fail_open`: the gateway keeps serving under this
/// replica's own limits, counts every fallback, and logs the outage once and
/// the recovery once.
#[tokio::test]
async fn redis_outage_fails_open_with_per_replica_limits() {
    let mut redis = Redis::start(None);
    let fake = spawn_fake().await;
    let dir = process_config(&fake, "{rpm: 3}", redis.port, "fail_open");
    let log = Arc::new(Mutex::new(Vec::new()));
    let gw = GatewayProcess::start_limited(
        &dir.path().join("promptgate.yaml"),
        &[("FAKE_UPSTREAM_KEY", FAKE_KEY)],
        4096,
        log.clone(),
    );
    let url = format!("{}/v1/chat/completions", gw.base);
    let body = chat_body("shared", false);
    // Two of the three requests in Redis.
    for _ in 0..2 {
        assert_eq!(post(&url, None, &body).await.status(), 200);
    }
    redis.kill();
    // This replica's own counters start afresh: 3 more, then 429.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(post(&url, None, &body).await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let metrics = || async {
        client()
            .get(format!("{}/metrics", gw.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let m = metrics().await;
    assert_eq!(
        metric(
            &m,
            "promptgate_ratelimit_store_errors_total",
            &["policy=\"fail_open\""]
        ),
        5.0,
        "{m}"
    );
    let failed = |log: &[String]| {
        log.iter()
            .filter(|l| l.contains("rate-limit store (Redis) failed"))
            .count()
    };
    assert_eq!(failed(&log.lock().unwrap()), 1, "{:?}", log.lock().unwrap());

    // Redis is back (empty). This replica's own counters are used up, so a
    // 200 now comes from Redis; from then on no request falls back.
    let _redis = Redis::start(Some(redis.port));
    let mut back = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if post(&url, None, &body).await.status() == 200 {
            back = true;
            break;
        }
    }
    assert!(
        back,
        "limits are shared again once Redis is back: {:?}",
        log.lock().unwrap()
    );
    let before = metric(
        &metrics().await,
        "promptgate_ratelimit_store_errors_total",
        &[],
    );
    assert_eq!(post(&url, None, &body).await.status(), 200);
    let m = metrics().await;
    assert_eq!(
        metric(&m, "promptgate_ratelimit_store_errors_total", &[]),
        before,
        "no more fallbacks once Redis answers: {m}"
    );
    let log = log.lock().unwrap();
    assert_eq!(failed(&log), 1, "{log:?}");
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("rate-limit store (Redis) is back"))
            .count(),
        1,
        "{log:?}"
    );
}

/// `fail_closed` with Redis down: 503 in the client's dialect, counted.
#[tokio::test]
async fn redis_outage_fails_closed_with_503() {
    let fake = spawn_fake().await;
    let dead = common::peers::free_port();
    let (g, p) = fake_config(
        &fake,
        "  shared:\n    provider: fake\n    model: chat\n    limits: {rpm: 100}\n",
    );
    let g = g.replace(
        "limits:\n  max_body_bytes: 65536\n",
        &format!(
            "limits:\n  max_body_bytes: 65536\n{}",
            redis_section(dead, "fail_closed")
        ),
    );
    let gw = spawn_gateway(&g, &p).await;
    let r = post(
        &gw.url("/v1/chat/completions"),
        None,
        &chat_body("shared", false),
    )
    .await;
    assert_eq!(r.status(), 503);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "store_unavailable", "{b}");
    let r = client()
        .post(gw.url("/v1/messages"))
        .json(&json!({"model": "shared", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["type"], "error", "{b}");
    // Routes without limits do not need the store.
    let r = post(
        &gw.url("/v1/chat/completions"),
        None,
        &chat_body("fake-chat", false),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(fake.requests().len() == 1);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "promptgate_ratelimit_store_errors_total",
            &["policy=\"fail_closed\""]
        ),
        2.0,
        "{m}"
    );
}

/// A gateway in this process with its limits in Redis (another replica of
/// the same limits, to a second one started alike).
async fn redis_gateway(fake: &Fake, redis_port: u16, routes: &str) -> Gw {
    let (g, p) = fake_config(fake, routes);
    let g = g.replace(
        "limits:\n  max_body_bytes: 65536\n",
        &format!(
            "limits:\n  max_body_bytes: 65536\n{}",
            redis_section(redis_port, "fail_open")
        ),
    );
    spawn_gateway(&g, &p).await
}

/// Concurrency in Redis: a stream in flight on one replica holds the slot
/// for both; when it ends its lease is given back and the other replica is
/// admitted. Token limits are shared too, output included.
#[tokio::test]
async fn redis_concurrency_and_tokens_are_shared_by_replicas() {
    let redis = Redis::start(None);
    let fake = spawn_fake().await;
    let routes =
        "  one-at-once:\n    provider: fake\n    model: slow\n    limits: {concurrency: 1}\n\
                  \x20 tokens:\n    provider: fake\n    model: chat\n    limits: {tpm: 1000}\n";
    let a = redis_gateway(&fake, redis.port, routes).await;
    let b = redis_gateway(&fake, redis.port, routes).await;
    let body = chat_body("one-at-once", true);
    let first = post(&a.url("/v1/chat/completions"), None, &body).await;
    assert_eq!(first.status(), 200);
    let r = post(&b.url("/v1/chat/completions"), None, &body).await;
    assert_eq!(r.status(), 429, "the other replica sees the slot taken");
    let b_body: Value = r.json().await.unwrap();
    assert!(
        b_body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allows 1 concurrent requests"),
        "{b_body}"
    );
    drop(first);
    let mut admitted = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = post(&b.url("/v1/chat/completions"), None, &body).await;
        if r.status() == 200 {
            admitted = true;
            break;
        }
    }
    assert!(admitted, "the lease came back when the stream ended");

    // Tokens: what replica a charged (input, then output) is gone for b.
    let r = post(
        &a.url("/v1/chat/completions"),
        None,
        &big_body("tokens", 300),
    )
    .await;
    assert_eq!(r.status(), 200);
    let after_a: u64 = header(&r, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    let _ = r.bytes().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = post(
        &b.url("/v1/chat/completions"),
        None,
        &chat_body("tokens", false),
    )
    .await;
    assert_eq!(r.status(), 200);
    let after_b: u64 = header(&r, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    // b's small input and a's 6 output tokens.
    assert!(
        after_b + 6 < after_a && after_b + 40 > after_a,
        "{after_a} → {after_b}"
    );
    let r = post(
        &b.url("/v1/chat/completions"),
        None,
        &big_body("tokens", 300),
    )
    .await;
    assert_eq!(r.status(), 429);
    let m = a.metrics().await + &b.metrics().await;
    assert_eq!(
        metric(&m, "promptgate_ratelimit_store_errors_total", &[]),
        0.0
    );
}

fn p50_p90(mut v: Vec<u64>) -> (u64, u64) {
    v.sort_unstable();
    (v[v.len() / 2], v[v.len() * 9 / 10])
}

/// The added latency of a limit in Redis: the gateway's own time
/// (`x-promptgate-overhead-us`, everything but the upstream) on a route
/// without limits, with an in-memory limit, and with the same limit in a
/// real redis-server, over sequential requests. Run by hand:
/// `cargo test --release --test limits -- --ignored --nocapture redis_limit_latency`.
#[tokio::test]
#[ignore]
async fn redis_limit_latency() {
    let n: usize = std::env::var("PROMPTGATE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let redis = Redis::start(None);
    let fake = spawn_fake().await;
    let routes = "  limited:\n    provider: fake\n    model: chat\n    limits: {rpm: 100000000, concurrency: 1000}\n\
                  \x20 tokens:\n    provider: fake\n    model: chat\n    limits: {tpm: 1000000000}\n";
    let (g, p) = fake_config(&fake, routes);
    let memory = spawn_gateway(&g, &p).await;
    let shared = redis_gateway(&fake, redis.port, routes).await;
    let body = chat_body("limited", false);
    let plain = chat_body("fake-chat", false);
    let run = |url: String, body: Value| async move {
        let mut out = Vec::with_capacity(n);
        for i in 0..n + 200 {
            let r = post(&url, None, &body).await;
            assert_eq!(r.status(), 200);
            let us: u64 = header(&r, "x-promptgate-overhead-us")
                .unwrap()
                .parse()
                .unwrap();
            let _ = r.bytes().await.unwrap();
            if i >= 200 {
                out.push(us);
            }
        }
        p50_p90(out)
    };
    let tokens = chat_body("tokens", false);
    let none = run(memory.url("/v1/chat/completions"), plain).await;
    let mem = run(memory.url("/v1/chat/completions"), body.clone()).await;
    let red = run(shared.url("/v1/chat/completions"), body).await;
    let tok_mem = run(memory.url("/v1/chat/completions"), tokens.clone()).await;
    let tok_red = run(shared.url("/v1/chat/completions"), tokens).await;
    eprintln!("RESULT gateway own time over {n} sequential requests (p50 / p90, us):");
    eprintln!(
        "RESULT no limit:                     {} / {}",
        none.0, none.1
    );
    eprintln!("RESULT rpm + concurrency, memory:    {} / {}", mem.0, mem.1);
    eprintln!("RESULT rpm + concurrency, redis:     {} / {}", red.0, red.1);
    eprintln!(
        "RESULT tpm (input counted), memory:  {} / {}",
        tok_mem.0, tok_mem.1
    );
    eprintln!(
        "RESULT tpm (input counted), redis:   {} / {}",
        tok_red.0, tok_red.1
    );
    eprintln!(
        "RESULT added by the redis limit over the same limit in memory: p50 {} us",
        red.0.saturating_sub(mem.0)
    );
}

const SANDBOX: &str = "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n";

/// `promptgate check` names each rate-limit mistake with its file and field.
#[test]
fn check_reports_rate_limit_problems() {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        "limits:\n  redis: {url: \"redis://127.0.0.1:6379\"}\n\
         routes:\n  a:\n    provider: sandbox\n    model: echo\n    limits: {rpm: 0, concurrency: 0}\n",
        &[("sandbox.yaml".into(), SANDBOX.into())],
    );
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    std::fs::write(
        dir.path().join("keys/k.yaml"),
        format!(
            "k1:\n  sha256: {}\n  limits: {{tpm: 0, burst: 5}}\n",
            sha(KEY_A)
        ),
    )
    .unwrap();
    let check = |dir: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
            .args(["check", "--config"])
            .arg(dir.join("promptgate.yaml"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = check(dir.path());
    for needle in [
        "limits.redis: is set but `limits.store` is `memory`",
        "routes.a.limits.rpm: must be at least 1",
        "routes.a.limits.concurrency: must be at least 1",
        "k.yaml",
        "unknown field `burst`",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }
    std::fs::write(
        dir.path().join("keys/k.yaml"),
        format!("k1:\n  sha256: {}\n  limits: {{tpm: 0}}\n", sha(KEY_A)),
    )
    .unwrap();
    write_config(
        dir.path(),
        "limits:\n  store: redis\n  on_store_error: sometimes\n\
         routes:\n  a:\n    provider: sandbox\n    model: echo\n",
        &[("sandbox.yaml".into(), SANDBOX.into())],
    );
    let err = check(dir.path());
    assert!(
        err.contains("unknown variant `sometimes`, expected `fail_open` or `fail_closed`"),
        "{err}"
    );
    write_config(
        dir.path(),
        "limits:\n  store: redis\n  redis: {url: \"http://127.0.0.1:6379\", timeout: soon}\n\
         routes:\n  a:\n    provider: sandbox\n    model: echo\n",
        &[("sandbox.yaml".into(), SANDBOX.into())],
    );
    let err = check(dir.path());
    for needle in [
        "limits.redis.url: must be a redis:// URL",
        "limits.redis.timeout",
        "k1.limits.tpm: must be at least 1",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }
}

/// A stream the client leaves before its end is still charged for the output
/// it sent (estimated, the backend never reported usage): the token limit
/// sees it on the next request.
#[tokio::test]
async fn a_cut_stream_is_charged_for_its_output() {
    use futures_util::StreamExt;
    let fake = spawn_fake().await;
    let (g, p) = fake_config(
        &fake,
        "  slow-tokens:\n    provider: fake\n    model: slow\n    limits: {tpm: 200}\n",
    );
    let gw = spawn_gateway(&g, &p).await;
    let url = gw.url("/v1/chat/completions");
    let body = chat_body("slow-tokens", true);
    let remaining = |r: &reqwest::Response| -> u64 {
        header(r, "x-ratelimit-remaining-tokens")
            .unwrap()
            .parse()
            .unwrap()
    };
    let r = post(&url, None, &body).await;
    assert_eq!(r.status(), 200);
    let first = remaining(&r);
    let input = 200 - first;
    // Read until the 41st word (`w40 `) went by, then leave.
    let mut chunks = r.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("w40 ") {
        let c = chunks.next().await.unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&c));
    }
    drop(chunks);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = post(&url, None, &body).await;
    assert_eq!(r.status(), 200);
    let second = remaining(&r);
    // Without the output: `first - input` plus what came back meanwhile
    // (200 a minute: a few tokens). 41+ words of output are 30+ tokens.
    assert!(
        second + input + 20 < first,
        "first {first}, input {input}, second {second}"
    );
}

/// Redis slower than `limits.redis.timeout` (every client paused) is a store
/// failure: the request waits no longer than the timeout, then `fail_open`
/// serves it from this replica's counters.
#[tokio::test]
async fn a_slow_redis_costs_a_request_no_more_than_the_timeout() {
    let redis = Redis::start(None);
    let fake = spawn_fake().await;
    let gw = redis_gateway(
        &fake,
        redis.port,
        "  shared:\n    provider: fake\n    model: chat\n    limits: {rpm: 100}\n",
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    let body = chat_body("shared", false);
    assert_eq!(post(&url, None, &body).await.status(), 200);
    let mut conn = redis_conn(redis.port).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let r = post(&url, None, &body).await;
    let took = start.elapsed();
    assert_eq!(r.status(), 200);
    // The timeout is 200 ms; the upstream call and the rest take a few ms.
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "promptgate_ratelimit_store_errors_total",
            &["policy=\"fail_open\""]
        ),
        1.0,
        "{m}"
    );
}

/// A replica that crashes with a request in flight does not keep its slot
/// forever: its lease carries an expiry 30 s ahead (renewed while the request
/// runs), and once that passes the next request that counts the set drops it.
/// (The test moves the lease's expiry into the past rather than wait 30 s.)
#[tokio::test]
async fn a_crashed_replicas_concurrency_lease_expires() {
    let redis = Redis::start(None);
    let fake = spawn_fake().await;
    let routes = "  one-slot:\n    provider: fake\n    model: slow\n    limits: {concurrency: 1}\n";
    let (g, p) = fake_config(&fake, routes);
    let g = g.replace(
        "limits:\n  max_body_bytes: 65536\n",
        &format!(
            "limits:\n  max_body_bytes: 65536\n{}",
            redis_section(redis.port, "fail_open")
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &g, &p);
    let mut a = GatewayProcess::start(
        &dir.path().join("promptgate.yaml"),
        &[("FAKE_UPSTREAM_KEY", FAKE_KEY)],
    );
    let body = chat_body("one-slot", true);
    let r = post(&format!("{}/v1/chat/completions", a.base), None, &body).await;
    assert_eq!(r.status(), 200);
    let set = "pgtest:limit:route:one-slot:conc";
    let mut conn = redis_conn(redis.port).await;
    let leases: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(set)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    let (member, expiry) = leases[0].clone();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = (secs * 1000 + micros / 1000) as f64;
    assert!(
        expiry > now_ms + 25_000.0 && expiry <= now_ms + 30_000.0,
        "lease expiry {expiry} vs now {now_ms}"
    );
    // The replica crashes mid-stream.
    a.child.kill().unwrap();
    let _ = a.child.wait();
    drop(r);
    let b = redis_gateway(&fake, redis.port, routes).await;
    let url = b.url("/v1/chat/completions");
    assert_eq!(
        post(&url, None, &body).await.status(),
        429,
        "the slot is still leased"
    );
    // Its 30 s run out.
    let _: () = redis::cmd("ZADD")
        .arg(set)
        .arg("XX")
        .arg(now_ms - 1.0)
        .arg(&member)
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = post(&url, None, &body).await;
    assert_eq!(r.status(), 200, "the expired lease was dropped");
}

/// Embeddings count their input against a token limit too.
#[tokio::test]
async fn embeddings_input_counts_against_a_token_limit() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(
        &fake,
        "  emb:\n    provider: fake\n    model: embed\n    limits: {tpm: 50}\n",
    );
    let gw = spawn_gateway(&g, &p).await;
    let url = gw.url("/v1/embeddings");
    let r = post(
        &url,
        None,
        &json!({"model": "emb", "input": ["hello", "world"]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let left: u64 = header(&r, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!((40..50).contains(&left), "{left}");
    let words: Vec<String> = (0..60).map(|i| format!("word{i}")).collect();
    let r = post(&url, None, &json!({"model": "emb", "input": words})).await;
    assert_eq!(r.status(), 429);
    let b: Value = r.json().await.unwrap();
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("50 tokens per minute (tpm)"),
        "{b}"
    );
    assert_eq!(fake.requests().len(), 1);
}
