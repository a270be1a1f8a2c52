//! `deploy/`: the signals the alert rules and the dashboard read, the rules
//! themselves under `promtool`, a real Prometheus scraping the real binary
//! (every rule and dashboard expression evaluated against it, every metric
//! they name exported by the gateway), and the Kubernetes manifests validated
//! offline with the gateway's ConfigMaps checked by `promptgate check`.
//!
//! Prometheus, promtool and kubernetes-validate are real peers: missing, the
//! tests that need them skip with a note, and fail under `CI=true`.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

#[path = "common/process.rs"]
mod process;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sha2::Digest;

fn sha(k: &str) -> String {
    sha2::Sha256::digest(k.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

const TEAM_KEY: &str = "pg-test-deploy-team-0123456789";

// === the gauges computed at scrape time ===

/// `promptgate_route_targets{,_available}`: every route's targets and those
/// that can take a request now (provider configured and not drained, breaker
/// not open), kept current across drains and reloads; a removed route's
/// series goes. `promptgate_key_budget` / `promptgate_key_spend`: each
/// budget of each key with the spend counted against it. A rejected reload
/// notes its time after the last success.
#[tokio::test]
async fn scrape_time_gauges_follow_targets_budgets_and_reloads() {
    let gateway = |with_dead: bool| {
        format!(
            "listen: 127.0.0.1:0\nroutes:\n  up:\n    provider: sandbox\n    model: echo\n  mixed:\n    targets:\n      - {{provider: keyless, model: x}}\n      - {{provider: sandbox, model: echo}}\n{}",
            if with_dead {
                "  dead:\n    provider: keyless\n    model: x\n"
            } else {
                ""
            }
        )
    };
    let providers = vec![
        (
            "sandbox.yaml".to_string(),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\nprices:\n  currency: USD\n  models:\n    \"*\": {input: 1000, output: 1000}\n".to_string(),
        ),
        (
            "keyless.yaml".to_string(),
            "kind: openai\nbase_url: http://127.0.0.1:9/v1\napi_key_env: PROMPTGATE_TEST_UNSET_KEY\n"
                .to_string(),
        ),
    ];
    let keys = format!(
        "team:\n  sha256: {}\n  budget:\n    daily: {{tokens: 1000}}\n    monthly: {{cost: 5}}\nfree:\n  sha256: {}\n",
        sha(TEAM_KEY),
        sha("pg-test-deploy-free-0123456789")
    );
    let gw =
        spawn_gateway_with_files(&gateway(true), &providers, &[("keys/team.yaml", &keys)]).await;

    let m = gw.metrics().await;
    for (route, targets, available) in [("up", 1.0, 1.0), ("mixed", 2.0, 1.0), ("dead", 1.0, 0.0)] {
        assert_eq!(
            sample(
                &m,
                &format!("promptgate_route_targets{{route=\"{route}\"}}")
            ),
            Some(targets),
            "{m}"
        );
        assert_eq!(
            sample(
                &m,
                &format!("promptgate_route_targets_available{{route=\"{route}\"}}")
            ),
            Some(available),
            "{m}"
        );
    }
    let series = |name: &str, period: &str, unit: &str| {
        format!("{name}{{key=\"team\",period=\"{period}\",unit=\"{unit}\"}}")
    };
    assert_eq!(
        sample(&m, &series("promptgate_key_budget", "daily", "tokens")),
        Some(1000.0)
    );
    assert_eq!(
        sample(&m, &series("promptgate_key_budget", "monthly", "cost")),
        Some(5.0)
    );
    assert_eq!(
        sample(&m, &series("promptgate_key_spend", "daily", "tokens")),
        Some(0.0)
    );
    assert!(
        !m.contains("promptgate_key_budget{key=\"free\""),
        "a key without a budget has no budget series: {m}"
    );
    assert!(
        !m.contains(&series("promptgate_key_budget", "monthly", "tokens")),
        "a budget without a token limit has no token series: {m}"
    );

    // A request of the key: its tokens and cost are counted against the budgets.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(TEAM_KEY)
        .json(&chat_body("up", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let total = body["usage"]["total_tokens"].as_f64().unwrap();
    assert!(total > 0.0);
    let m = eventually_metrics(&gw, |m| {
        sample(m, &series("promptgate_key_spend", "daily", "tokens")) == Some(total)
    })
    .await;
    let cost = sample(&m, &series("promptgate_key_spend", "monthly", "cost")).unwrap();
    assert!(cost > 0.0 && cost < 5.0, "{m}");

    // Draining the sandbox takes the routes' last usable target away.
    let r = client()
        .post(gw.admin_url("/admin/providers/sandbox/drain"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let m = gw.metrics().await;
    assert_eq!(
        sample(&m, "promptgate_route_targets_available{route=\"up\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "promptgate_route_targets_available{route=\"mixed\"}"),
        Some(0.0),
        "{m}"
    );
    let r = client()
        .post(gw.admin_url("/admin/providers/sandbox/enable"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A reload without route `dead`: its series are gone, the others stay.
    assert_eq!(
        sample(
            &m,
            "promptgate_config_last_reload_failure_timestamp_seconds"
        ),
        Some(0.0),
        "no reload was rejected yet: {m}"
    );
    std::fs::write(gw.config_path(), gateway(false)).unwrap();
    assert_eq!(gw.admin_reload().await.0, 200);
    let m = gw.metrics().await;
    assert!(!m.contains("route=\"dead\""), "{m}");
    assert_eq!(
        sample(&m, "promptgate_route_targets_available{route=\"up\"}"),
        Some(1.0),
        "{m}"
    );

    // A rejected reload is dated after the last success.
    std::fs::write(gw.config_path(), "routes: [not, a, map]\n").unwrap();
    assert_ne!(gw.admin_reload().await.0, 200);
    let m = gw.metrics().await;
    let failed = sample(
        &m,
        "promptgate_config_last_reload_failure_timestamp_seconds",
    )
    .unwrap();
    let succeeded = sample(
        &m,
        "promptgate_config_last_reload_success_timestamp_seconds",
    )
    .unwrap();
    assert!(failed > 0.0 && failed >= succeeded, "{m}");
}

/// `/metrics` until `ok` holds of it (spend is recorded when the response's
/// body is dropped, just after the client has read it).
async fn eventually_metrics(gw: &Gw, ok: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let m = gw.metrics().await;
        if ok(&m) {
            return m;
        }
        assert!(Instant::now() < until, "the metrics never matched: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
