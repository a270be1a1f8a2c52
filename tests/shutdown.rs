//! Graceful shutdown of the real binary in front of a slow streaming fake
//! upstream: on SIGTERM `/readyz` fails at once while the listener keeps
//! serving for `limits.drain_delay`; then new connections are refused, the
//! stream in flight ends whole, and the process exits 0. (A stream longer
//! than `shutdown_grace` is cut: `tests/hostile_client.rs`; HTTP/2's GOAWAY:
//! `tests/http2.rs`.)
// The test drives its clients on tasks of its own.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/process.rs"]
mod process;

use std::time::{Duration, Instant};

use common::*;
use process::{eventually, Process};
use serde_json::Value;

/// `GET {base}{path}` on a fresh connection: (status, body).
async fn get(base: &str, path: &str) -> (u16, Value) {
    let r = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_serves_through_the_drain_delay_then_drains() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(&fake, "");
    let g = g.replace(
        "limits:\n",
        "limits:\n  drain_delay: 2s\n  shutdown_grace: 10s\n",
    );
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &g, &p);
    let mut gw = Process::start(
        &dir.path().join("promptgate.yaml"),
        &[("FAKE_UPSTREAM_KEY", FAKE_KEY)],
    );
    let (status, body) = get(&gw.base, "/readyz").await;
    assert_eq!(
        (status, &body),
        (200, &serde_json::json!({"status": "ready"}))
    );
    let before = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("fake-chat", false))
        .send()
        .await
        .unwrap();
    assert_eq!(before.status(), 200);
    assert!(before.headers().get("connection").is_none());

    // A stream of 200 events 20 ms apart (4 s), longer than the drain delay.
    let url = gw.url("/v1/chat/completions");
    let running = tokio::spawn(async move {
        let r = client()
            .post(url)
            .json(&chat_body("fake-slow", true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    });
    eventually("the stream to start", || {
        (fake.requests().len() == 2).then_some(())
    })
    .await;

    gw.signal("TERM");
    let term = Instant::now();
    // Readiness fails at once (well within the delay) ...
    loop {
        let (status, body) = get(&gw.base, "/readyz").await;
        if status == 503 {
            assert_eq!(body, serde_json::json!({"status": "draining"}));
            break;
        }
        assert!(
            term.elapsed() < Duration::from_millis(500),
            "/readyz still {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... while a new connection is still accepted and served (its client
    // told to close it after the answer, to come back on a new one), and the
    // process is alive.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("fake-chat", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["connection"], "close");
    assert_eq!(get(&gw.base, "/healthz").await.0, 200);
    assert!(
        term.elapsed() < Duration::from_millis(1800),
        "the checks during the delay took too long to prove anything"
    );

    // After the delay the listener is closed: connections are refused.
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let refused_after = loop {
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            break term.elapsed();
        }
        assert!(
            term.elapsed() < Duration::from_secs(4),
            "still accepting 4 s after SIGTERM with a 2 s drain delay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        refused_after >= Duration::from_millis(1950),
        "refused after {refused_after:?}, before the drain delay ended"
    );
    assert!(gw.exited().is_none(), "exited with the stream running");

    // The stream in flight ends whole, then the process exits 0.
    let text = running.await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let words: String = data[..data.len() - 1]
        .iter()
        .map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    let whole: String = (0..200).map(|i| format!("w{i} ")).collect();
    assert_eq!(words, whole);
    let status = loop {
        if let Some(s) = gw.exited() {
            break s;
        }
        assert!(
            term.elapsed() < Duration::from_secs(8),
            "not exited after its last stream ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(
        fake.state
            .completed
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let models: Vec<Value> = fake
        .requests()
        .iter()
        .map(|r| r.body["model"].clone())
        .collect();
    assert_eq!(models, ["chat", "slow", "chat"]);
}
