//! The response cache end to end: hits and misses, key correctness, tenant
//! isolation, policies, streaming replay, single flight, client directives,
//! purge, the byte bound, and the Redis tier shared by two gateways (with Redis
//! killed mid-test).
// Test servers and clients are started freely; the gateway's own tasks go through
// promptgate::task::spawn (clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;

use common::peers::Redis;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ROUTES: &str = concat!(
    "  cached:\n    provider: fake\n    model: chat\n    cache: {mode: on, ttl: 1h}\n",
    "  slow-cached:\n    provider: fake\n    model: slow-chat\n    cache: {mode: on}\n",
    "  shared:\n    provider: fake\n    model: chat\n    cache: {mode: on, shared: true}\n",
    "  det:\n    provider: fake\n    model: chat\n    cache: {mode: deterministic}\n",
    "  failing:\n    provider: fake\n    model: status-500\n    cache: {mode: on}\n",
    "  cutting:\n    provider: fake\n    model: cut\n    cache: {mode: on}\n",
    "  tools:\n    provider: fake\n    model: tools\n    cache: {mode: on}\n",
    "  hang-cached:\n    provider: fake\n    model: hang\n    retry: {deadline: 800ms}\n    cache: {mode: on}\n",
);

async fn setup_cache(extra: &str) -> (Fake, Gw) {
    let fake = spawn_fake().await;
    let (mut g, p) = fake_config(&fake, ROUTES);
    g.push_str(extra);
    let gw = spawn_gateway(&g, &p).await;
    (fake, gw)
}

async fn call(
    gw: &Gw,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut rb = client().post(gw.url("/v1/chat/completions")).json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    (
        r.status().as_u16(),
        r.headers().clone(),
        r.text().await.unwrap(),
    )
}

fn body(route: &str) -> Value {
    chat_body(route, false)
}

#[tokio::test]
async fn second_identical_request_is_a_hit_with_the_saved_usage() {
    let (fake, gw) = setup_cache("").await;
    let (s, h, first) = call(&gw, &body("cached"), &[]).await;
    assert_eq!(
        (s, h["x-promptgate-cache"].to_str().unwrap()),
        (200, "miss")
    );
    let (s, h, second) = call(&gw, &body("cached"), &[]).await;
    assert_eq!((s, h["x-promptgate-cache"].to_str().unwrap()), (200, "hit"));
    assert!(h.contains_key("age"));
    assert_eq!(fake.requests().len(), 1);
    let (a, b): (Value, Value) = (
        serde_json::from_str(&first).unwrap(),
        serde_json::from_str(&second).unwrap(),
    );
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(
        b["usage"]["total_tokens"], 18,
        "a hit reports the tokens it saved"
    );
    // Field order and defaults do not matter.
    let reordered = json!({"messages": body("cached")["messages"], "stream": false, "top_p": 1, "model": "cached", "n": 1});
    let (_, h, _) = call(&gw, &reordered, &[]).await;
    assert_eq!(h["x-promptgate-cache"], "hit");
    let m = gw.metrics().await;
    assert!(
        m.contains("promptgate_cache_requests_total{result=\"hit\",route=\"cached\"} 2"),
        "{m}"
    );
    assert!(m.contains("promptgate_cache_entries 1"));
}

#[tokio::test]
async fn output_affecting_fields_miss() {
    let (fake, gw) = setup_cache("").await;
    call(&gw, &body("cached"), &[]).await;
    let changes: Vec<(&str, Value)> = vec![
        ("temperature", json!(0.3)),
        ("max_tokens", json!(7)),
        ("seed", json!(42)),
        ("stop", json!(["\n"])),
        ("response_format", json!({"type": "json_object"})),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("reasoning_effort", json!("high")),
        ("vendor_knob", json!(1)),
    ];
    for (i, (k, v)) in changes.iter().enumerate() {
        let mut b = body("cached");
        b[*k] = v.clone();
        let (_, h, _) = call(&gw, &b, &[]).await;
        assert_eq!(h["x-promptgate-cache"], "miss", "{k}");
        assert_eq!(fake.requests().len(), i + 2, "{k}");
    }
    let mut b = body("cached");
    b["messages"][1]["content"] = json!("Say hello!");
    assert_eq!(call(&gw, &b, &[]).await.1["x-promptgate-cache"], "miss");
}

#[tokio::test]
async fn tenants_are_isolated_unless_the_route_shares() {
    let (fake, gw) = setup_cache("").await;
    call(&gw, &body("cached"), &[("authorization", "Bearer alice")]).await;
    let (_, h, _) = call(&gw, &body("cached"), &[("authorization", "Bearer bob")]).await;
    assert_eq!(h["x-promptgate-cache"], "miss");
    let (_, h, _) = call(&gw, &body("cached"), &[("authorization", "Bearer alice")]).await;
    assert_eq!(h["x-promptgate-cache"], "hit");
    call(&gw, &body("shared"), &[("authorization", "Bearer alice")]).await;
    let (_, h, _) = call(&gw, &body("shared"), &[("authorization", "Bearer bob")]).await;
    assert_eq!(h["x-promptgate-cache"], "hit");
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test]
async fn deterministic_policy_errors_and_cut_streams() {
    let (fake, gw) = setup_cache("").await;
    let mut b = body("det");
    b["temperature"] = json!(0.7);
    assert_eq!(call(&gw, &b, &[]).await.1["x-promptgate-cache"], "bypass");
    assert_eq!(call(&gw, &b, &[]).await.1["x-promptgate-cache"], "bypass");
    b["temperature"] = json!(0);
    call(&gw, &b, &[]).await;
    assert_eq!(call(&gw, &b, &[]).await.1["x-promptgate-cache"], "hit");
    let mut b = body("det");
    b["seed"] = json!(7);
    call(&gw, &b, &[]).await;
    assert_eq!(call(&gw, &b, &[]).await.1["x-promptgate-cache"], "hit");
    assert_eq!(fake.requests().len(), 4);

    for _ in 0..2 {
        assert_eq!(call(&gw, &body("failing"), &[]).await.0, 503);
        let (s, _, text) = call(&gw, &chat_body("cutting", true), &[]).await;
        assert_eq!(s, 200);
        assert!(!text.contains("[DONE]"));
    }
    let failing = fake
        .requests()
        .iter()
        .filter(|r| r.body["model"] == "status-500")
        .count();
    let cut = fake
        .requests()
        .iter()
        .filter(|r| r.body["model"] == "cut")
        .count();
    assert_eq!(
        (failing, cut),
        (2, 2),
        "errors and cut streams are never cached"
    );
}

fn stream_text(sse: &str) -> (String, Vec<(String, String)>) {
    let mut text = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    for d in sse_data(sse).iter().filter(|d| *d != "[DONE]") {
        let c: Value = serde_json::from_str(d).unwrap();
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        for tc in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = tc["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            calls[i]
                .0
                .push_str(tc["function"]["name"].as_str().unwrap_or(""));
            calls[i]
                .1
                .push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    (text, calls)
}

#[tokio::test]
async fn streams_are_stored_once_complete_and_replayed_as_streams() {
    let (fake, gw) = setup_cache("").await;
    let mut b = chat_body("cached", true);
    b["stream_options"] = json!({"include_usage": true});
    let (_, h, first) = call(&gw, &b, &[]).await;
    assert_eq!(h["x-promptgate-cache"], "miss");
    let (_, h, second) = call(&gw, &b, &[]).await;
    assert_eq!(h["x-promptgate-cache"], "hit");
    assert_eq!(stream_text(&first), stream_text(&second));
    assert!(second.ends_with("data: [DONE]\n\n"));
    assert!(second.contains("\"total_tokens\":18"), "{second}");
    // The same request without streaming is served from the stream's entry.
    let (_, h, json_body) = call(&gw, &body("cached"), &[]).await;
    assert_eq!(h["x-promptgate-cache"], "hit");
    let v: Value = serde_json::from_str(&json_body).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello from the fake upstream."
    );
    assert_eq!(fake.requests().len(), 1);
    // Tool calls survive the round trip through the cache.
    let (_, _, a) = call(&gw, &chat_body("tools", true), &[]).await;
    let (_, h, b2) = call(&gw, &chat_body("tools", true), &[]).await;
    assert_eq!(h["x-promptgate-cache"], "hit");
    assert_eq!(stream_text(&a).1, stream_text(&b2).1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_misses_make_one_upstream_call() {
    let (fake, gw) = setup_cache("").await;
    let gw = std::sync::Arc::new(gw);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            call(&gw, &body("slow-cached"), &[]).await
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        let (s, h, _) = t.await.unwrap();
        assert_eq!(s, 200);
        *statuses
            .entry(h["x-promptgate-cache"].to_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(fake.requests().len(), 1, "{statuses:?}");
    assert_eq!(statuses.get("miss"), Some(&1));
}

/// A request waiting for an identical call in flight spends its own deadline
/// waiting: when the leader fails, the waiter gets what is left, not a fresh
/// deadline of its own.
#[tokio::test]
async fn waiters_are_bounded_by_their_own_deadline() {
    let (_fake, gw) = setup_cache("").await;
    let gw = std::sync::Arc::new(gw);
    let leader = {
        let gw = gw.clone();
        tokio::spawn(async move { call(&gw, &body("hang-cached"), &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let (s, _, text) = call(&gw, &body("hang-cached"), &[]).await;
    let waited = started.elapsed();
    assert_eq!(s, 504, "{text}");
    assert!(
        waited < Duration::from_millis(1100),
        "the waiter took {waited:?} with an 800ms deadline"
    );
    assert_eq!(leader.await.unwrap().0, 504);
}

#[tokio::test]
async fn client_directives_and_purge() {
    let (fake, gw) = setup_cache("").await;
    call(&gw, &body("cached"), &[]).await;
    assert_eq!(
        call(&gw, &body("cached"), &[("cache-control", "no-cache")])
            .await
            .1["x-promptgate-cache"],
        "refresh"
    );
    assert_eq!(
        call(&gw, &body("cached"), &[("cache-control", "no-store")])
            .await
            .1["x-promptgate-cache"],
        "bypass"
    );
    assert_eq!(
        call(&gw, &body("cached"), &[("x-promptgate-cache", "bypass")])
            .await
            .1["x-promptgate-cache"],
        "bypass"
    );
    assert_eq!(fake.requests().len(), 4);
    assert_eq!(
        call(&gw, &body("cached"), &[]).await.1["x-promptgate-cache"],
        "hit"
    );
    let r = client()
        .delete(gw.admin_url("/admin/cache?route=cached"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["removed"], 1);
    assert_eq!(
        call(&gw, &body("cached"), &[]).await.1["x-promptgate-cache"],
        "miss"
    );
    let st = gw.admin_status().await;
    assert_eq!(st["cache"]["entries"], 1);
    assert_eq!(st["cache"]["routes"]["cached"]["hits"], 1);
}

#[tokio::test]
async fn memory_stays_within_the_byte_bound() {
    let (_fake, gw) = setup_cache("cache: {max_bytes: 8192}\n").await;
    for i in 0..200 {
        let mut b = body("cached");
        b["messages"][1]["content"] = json!(format!("distinct request {i}"));
        assert_eq!(call(&gw, &b, &[]).await.0, 200);
    }
    let st = gw.admin_status().await;
    let bytes = st["cache"]["bytes"].as_u64().unwrap();
    assert!(bytes <= 8192, "{st}");
    assert!(st["cache"]["evictions"].as_u64().unwrap() > 100, "{st}");
    // A full cache still admits a new answer: its repeat is a hit.
    let mut b = body("cached");
    b["messages"][1]["content"] = json!("a brand new question");
    assert_eq!(call(&gw, &b, &[]).await.1["x-promptgate-cache"], "miss");
    assert_eq!(call(&gw, &b, &[]).await.1["x-promptgate-cache"], "hit");
}

async fn call_url(base: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, String) {
    let r = client()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    (
        r.status().as_u16(),
        r.headers().clone(),
        r.text().await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tier_is_shared_by_two_processes_and_its_outage_fails_nothing() {
    let mut redis = Redis::start(None);
    let tier = format!(
        "cache:\n  redis: {{url: \"redis://127.0.0.1:{}\", timeout: 100ms}}\n",
        redis.port
    );
    let fake = spawn_fake().await;
    let (mut g, p) = fake_config(&fake, ROUTES);
    g.push_str(&tier);
    // Replica A runs in this process, replica B is the real binary.
    let a = spawn_gateway(&g, &p).await;
    let b_dir = tempfile::tempdir().unwrap();
    write_config(b_dir.path(), &g, &p);
    let b = GatewayProcess::start(
        &b_dir.path().join("promptgate.yaml"),
        &[("FAKE_UPSTREAM_KEY", FAKE_KEY)],
    );
    assert_eq!(
        call(&a, &body("cached"), &[]).await.1["x-promptgate-cache"],
        "miss"
    );
    // The store is asynchronous: wait for it to land.
    let mut hit = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_, h, text) = call_url(&b.base, &body("cached")).await;
        if h["x-promptgate-cache"] == "hit" {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                v["choices"][0]["message"]["content"],
                "Hello from the fake upstream."
            );
            assert_eq!(v["usage"]["total_tokens"], 18);
            hit = true;
            break;
        }
    }
    assert!(
        hit,
        "the second gateway found the first one's entry in Redis"
    );
    assert_eq!(fake.requests().len(), 1);
    // Purge reaches Redis too.
    let r = client()
        .delete(a.admin_url("/admin/cache"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Redis dies: every request still succeeds; the failures are counted.
    redis.kill();
    for i in 0..20 {
        let mut q = body("cached");
        q["messages"][1]["content"] = json!(format!("after the outage {i}"));
        assert_eq!(call_url(&b.base, &q).await.0, 200);
        assert_eq!(call(&a, &q, &[]).await.0, 200);
    }
    for base in [a.url(""), b.base.clone()] {
        let m = client()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let errors: f64 = m
            .lines()
            .filter(|l| l.starts_with("promptgate_cache_redis_errors_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(errors >= 1.0, "{m}");
    }
    // Redis comes back: the tier recovers by itself.
    let _redis = Redis::start(Some(redis.port));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut q = body("cached");
    q["messages"][1]["content"] = json!("after the return");
    call(&a, &q, &[]).await;
    let mut shared = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if call_url(&b.base, &q).await.1["x-promptgate-cache"] == "hit" {
            shared = true;
            break;
        }
    }
    assert!(shared, "entries are shared again once Redis is back");
}

async fn redis_conn(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Waits until the gateway's background store has written `n` index keys;
/// returns (cache key, entry name) of each.
async fn stored_entries(
    conn: &mut redis::aio::MultiplexedConnection,
    n: usize,
) -> Vec<([u8; 32], String)> {
    for _ in 0..100 {
        let mut idx: Vec<String> = redis::cmd("KEYS")
            .arg("promptgate:idx:*")
            .query_async(conn)
            .await
            .unwrap();
        if idx.len() >= n {
            idx.sort();
            let mut out = Vec::new();
            for i in idx {
                let name: String = redis::cmd("GET").arg(&i).query_async(conn).await.unwrap();
                let hex = i.trim_start_matches("promptgate:idx:");
                let mut key = [0u8; 32];
                for (j, b) in key.iter_mut().enumerate() {
                    *b = u8::from_str_radix(&hex[2 * j..2 * j + 2], 16).unwrap();
                }
                out.push((key, name));
            }
            return out;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gateway stored fewer than {n} entries in Redis");
}

async fn get_bytes(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> Vec<u8> {
    redis::cmd("GET")
        .arg(name)
        .query_async::<Option<Vec<u8>>>(conn)
        .await
        .unwrap()
        .unwrap_or_default()
}

/// The stored form of an entry answering "forged".
fn forged_json(created_ms: u64) -> Vec<u8> {
    use promptgate::canonical::*;
    let response = ChatResponse {
        id: "x".into(),
        created: 1,
        model: "chat".into(),
        choices: vec![Choice {
            index: 0,
            message: Message::text(Role::Assistant, "forged"),
            finish_reason: Some(FinishReason::Stop),
        }],
        usage: None,
        system_fingerprint: None,
    };
    promptgate::cache::Entry {
        bytes: promptgate::cache::weight(&response),
        response,
        target: "fake/chat".into(),
        route: "cached".into(),
        prompt: None,
        created: std::time::UNIX_EPOCH + Duration::from_millis(created_ms),
        ttl: Duration::MAX,
    }
    .encode()
    .unwrap()
}

/// An entry answering "forged" as the previous version stored it: the response
/// as OpenAI wire JSON, sealed as version 1 with a correct plain checksum.
fn previous_version(key: &[u8; 32]) -> Vec<u8> {
    use sha2::Digest;
    let json = serde_json::to_vec(&json!({
        "target": "fake/chat", "route": "cached", "prompt": null,
        "created_ms": now_ms(), "ttl_ms": 3_600_000u64, "estimated": false,
        "response": {"id": "x", "object": "chat.completion", "created": 1, "model": "chat",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "forged"}, "finish_reason": "stop"}]},
    }))
    .unwrap();
    let len = u32::try_from(json.len()).unwrap().to_le_bytes();
    let body = lz4_flex::block::compress(&json);
    let head = *b"PGC\x01\x00";
    let mut h = sha2::Sha256::new();
    for part in [&key[..], &head, &len, &body] {
        h.update(part);
    }
    let tag: [u8; 32] = h.finalize().into();
    [&head[..], &tag, &len, &body].concat()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Writes `forged` over the entry `name`, then asks a gateway with an empty
/// memory tier: it must not serve the entry (a miss answered upstream, the
/// rejection counted), and its own fresh store replaces the forgery.
async fn forged_entry_is_a_miss(
    conn: &mut redis::aio::MultiplexedConnection,
    name: &str,
    forged: &[u8],
    what: &str,
    gateway: &str,
    providers: &[(String, String)],
) {
    let _: () = redis::cmd("SET")
        .arg(name)
        .arg(forged)
        .query_async(conn)
        .await
        .unwrap();
    let fresh = spawn_gateway(gateway, providers).await;
    let (s, h, text) = call(&fresh, &body("cached"), &[]).await;
    assert_eq!(s, 200, "{what}: {text}");
    assert_eq!(h["x-promptgate-cache"], "miss", "{what}");
    assert!(
        text.contains("Hello from the fake upstream."),
        "{what}: {text}"
    );
    assert!(
        fresh
            .metrics()
            .await
            .contains("promptgate_cache_redis_errors_total{op=\"decode\"} 1"),
        "{what}: the rejection is counted"
    );
    for _ in 0..100 {
        if get_bytes(conn, name).await != forged {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: the gateway did not store a fresh entry");
}

/// Entries in Redis are checked before use: corrupt, truncated, oversized,
/// moved, forged and future-dated entries are misses, never served, never a
/// crash; with a secret, only entries signed with it are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_corrupt_redis_entries_are_never_served() {
    let redis = Redis::start(None);
    let mut conn = redis_conn(redis.port).await;
    let fake = spawn_fake().await;
    let (mut g, p) = fake_config(&fake, ROUTES);
    g.push_str(&format!(
        "cache:\n  redis: {{url: \"redis://127.0.0.1:{}\", timeout: 200ms}}\n",
        redis.port
    ));
    let a = spawn_gateway(&g, &p).await;
    assert_eq!(
        call(&a, &body("cached"), &[]).await.1["x-promptgate-cache"],
        "miss"
    );
    let mut other = body("cached");
    other["messages"][1]["content"] = json!("another question");
    call(&a, &other, &[]).await;
    let entries = stored_entries(&mut conn, 2).await;
    // Which entry is the one for `body("cached")`: the one a fresh gateway hits.
    let fresh = spawn_gateway(&g, &p).await;
    assert_eq!(
        call(&fresh, &body("cached"), &[]).await.1["x-promptgate-cache"],
        "hit"
    );
    let mut genuine = Vec::new();
    for (_, name) in &entries {
        genuine.push(get_bytes(&mut conn, name).await);
    }
    // Find the target entry by replacing each in turn with the other's bytes.
    let (target, moved) = {
        let _: () = redis::cmd("SET")
            .arg(&entries[0].1)
            .arg(&genuine[1])
            .query_async(&mut conn)
            .await
            .unwrap();
        let probe = spawn_gateway(&g, &p).await;
        let hit = call(&probe, &body("cached"), &[]).await.1["x-promptgate-cache"] == "hit";
        let _: () = redis::cmd("SET")
            .arg(&entries[0].1)
            .arg(&genuine[0])
            .query_async(&mut conn)
            .await
            .unwrap();
        // If swapping entry 0 changed nothing, the target is entry 1.
        if hit {
            (1, genuine[0].clone())
        } else {
            (0, genuine[1].clone())
        }
    };
    let (key, name) = entries[target].clone();
    let real = genuine[target].clone();

    let mut flipped = real.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x55;
    let mut old_format = lz4_flex::compress_prepend_size(b"{}");
    old_format[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let plain = promptgate::cache::redis::Seal::new(None, 4 << 20);
    let from_the_future = plain
        .seal(&key, &forged_json(now_ms() + 86_400_000))
        .unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("the old format with a 4 GiB size prefix", old_format),
        ("a flipped byte", flipped),
        ("a truncated entry", real[..real.len() / 2].to_vec()),
        ("another key's entry", moved),
        ("an entry dated tomorrow", from_the_future),
        ("an entry of the previous format", previous_version(&key)),
        (
            "a megabyte of noise",
            (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect(),
        ),
        ("a header and nothing else", b"PGC\x02\x00".to_vec()),
    ];
    for (what, bytes) in &cases {
        forged_entry_is_a_miss(&mut conn, &name, bytes, what, &g, &p).await;
    }

    // With a secret, a correctly checksummed but unsigned entry, or one signed
    // with another secret, is refused; the gateway's own entries are read.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let keyed = g.replace(
        "timeout: 200ms}",
        "timeout: 200ms, secret_env: FAKE_UPSTREAM_SECRET}",
    );
    let k1 = spawn_gateway(&keyed, &p).await;
    assert_eq!(
        call(&k1, &body("cached"), &[]).await.1["x-promptgate-cache"],
        "miss"
    );
    let (key, name) = stored_entries(&mut conn, 1).await[0].clone();
    let k2 = spawn_gateway(&keyed, &p).await;
    let (_, h, text) = call(&k2, &body("cached"), &[]).await;
    assert_eq!(h["x-promptgate-cache"], "hit", "{text}");
    let unsigned = plain.seal(&key, &forged_json(now_ms())).unwrap();
    let wrong = promptgate::cache::redis::Seal::new(
        Some(promptgate::config::Secret(
            b"not-the-secret".to_vec().into(),
        )),
        4 << 20,
    )
    .seal(&key, &forged_json(now_ms()))
    .unwrap();
    for (what, bytes) in [
        ("an unsigned entry", unsigned),
        ("another secret's entry", wrong),
    ] {
        forged_entry_is_a_miss(&mut conn, &name, &bytes, what, &keyed, &p).await;
    }
    // The secret named but unset: the gateway does not start.
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &keyed.replace("FAKE_UPSTREAM_SECRET", "PROMPTGATE_TEST_UNSET_SECRET"),
        &p,
    );
    let problems = promptgate::load(&dir.path().join("promptgate.yaml"), &test_env)
        .err()
        .expect("an unset secret is a problem");
    assert!(
        problems.iter().any(|p| p.field == "cache.redis.secret_env"),
        "{problems:?}"
    );
}

/// A purge against a Redis that stops answering ends with an error after the
/// per-command timeout instead of holding the admin call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_gives_up_on_a_redis_that_stops_answering() {
    let redis = Redis::start(None);
    let mut conn = redis_conn(redis.port).await;
    let fake = spawn_fake().await;
    let (mut g, p) = fake_config(&fake, ROUTES);
    g.push_str(&format!(
        "cache:\n  redis: {{url: \"redis://127.0.0.1:{}\", timeout: 200ms}}\n",
        redis.port
    ));
    let gw = spawn_gateway(&g, &p).await;
    call(&gw, &body("cached"), &[]).await;
    stored_entries(&mut conn, 1).await;
    // Every client's commands wait for 5 s (this one's reply comes at once).
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(5000)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let r = client()
        .delete(gw.admin_url("/admin/cache"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{v}"
    );
    assert!(
        took < Duration::from_millis(3000),
        "the purge took {took:?}"
    );
}

/// `cache.max_entry_bytes` bounds what one Redis entry may decompress to, so it
/// is capped at 64 MiB: a forged length (no secret) cannot ask for 4 GiB.
#[tokio::test]
async fn max_entry_bytes_is_capped_at_64_mib() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(&fake, ROUTES);
    for (value, ok) in [
        (67_108_864u64, true),
        (67_108_865, false),
        (4_294_967_295, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = format!("{g}cache:\n  max_bytes: 134217728\n  max_entry_bytes: {value}\n");
        write_config(dir.path(), &cfg, &p);
        let r = promptgate::load(&dir.path().join("promptgate.yaml"), &test_env);
        match r {
            Ok(_) => assert!(ok, "{value} was accepted"),
            Err(problems) => {
                assert!(!ok, "{value}: {problems:?}");
                assert!(
                    problems.iter().any(|p| p.field == "cache.max_entry_bytes"),
                    "{problems:?}"
                );
            }
        }
    }
}
