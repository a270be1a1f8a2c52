//! `promptgate drill` end to end: the real binary rehearses an outage of the
//! primary provider on a live gateway and reports no client-visible errors.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_reports_a_transparent_switchover() {
    let fake = spawn_fake().await;
    let backup = spawn_fake().await;
    let (mut g, mut p) = fake_config(
        &fake,
        "  drill:\n    first_token_timeout: 500ms\n    targets:\n      - {provider: fake, model: chat}\n      - {provider: backup, model: chat}\n",
    );
    // The primary's breaker opens during the outage; a short cooldown lets the
    // first probe after the restore find it healthy quickly.
    g.push_str("breaker: {cooldown: 300ms}\n");
    p.push((
        "backup.yaml".into(),
        format!(
            "kind: openai\nbase_url: {}\napi_key_env: FAKE_UPSTREAM_KEY\n",
            backup.base_url()
        ),
    ));
    let gw = spawn_gateway(&g, &p).await;
    let out = gw.dir.path().join("report");
    let run = |args: Vec<String>| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
            .arg("drill")
            .args(args)
            .env("PROMPTGATE_ADMIN_KEY", ADMIN_KEY)
            .kill_on_drop(true)
            .output()
    };
    let args = |gateway: String| -> Vec<String> {
        [
            "--gateway",
            &gateway,
            "--admin",
            &gw.admin_url(""),
            "--route",
            "drill",
            "--provider",
            "fake",
            "--fault",
            "down",
            "--warmup",
            "1s",
            "--duration",
            "2s",
            "--recovery",
            "1500ms",
            "--rps",
            "20",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let res = run(args(gw.url(""))).await.unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(report["client_visible_errors"], 0, "{report:#}");
    let n = report["requests"].as_u64().unwrap();
    assert!((60..=100).contains(&n), "bounded load: {n}");
    assert!(report["streaming_requests"].as_u64().unwrap() >= n / 2 - 1);
    assert!(
        report["time_to_move_off_faulty_provider_s"]
            .as_f64()
            .unwrap()
            < 0.2,
        "{report:#}"
    );
    assert!(
        report["time_to_return_after_restore_s"]
            .as_f64()
            .is_some_and(|t| t < 1.0),
        "{report:#}"
    );
    for row in report["per_second"].as_array().unwrap() {
        if row["phase"] == "fault" {
            assert!(row["served_by"].get("fake/chat").is_none(), "{row}");
        }
    }
    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(md.contains("client-visible errors: 0"));
    assert!(
        gw.admin_status().await["faults"]
            .as_array()
            .unwrap()
            .is_empty(),
        "the fault was restored"
    );

    // It refuses to load anything that is not a promptgate gateway.
    let res = run(args(fake.base_url())).await.unwrap();
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("refusing"));
    let _ = backup;
}
