//! The admin API against hostile input: numbers out of range never take the
//! admin listener down, and every bad value is a 400 with a reason.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[tokio::test]
async fn out_of_range_numbers_are_rejected_not_panicked_on() {
    let (_fake, gw) = setup().await;
    let bodies = [
        r#"{"provider": "fake", "fault": "down", "duration": -1}"#,
        r#"{"provider": "fake", "fault": "down", "duration": 1e300}"#,
        r#"{"provider": "fake", "fault": "down", "duration": NaN}"#,
        r#"{"provider": "fake", "fault": "slow", "duration": 10, "latency": -1}"#,
        r#"{"provider": "fake", "fault": "slow", "duration": 10, "latency": 1e300}"#,
        r#"{"provider": "fake", "fault": "slow", "duration": 10, "latency": -0.5}"#,
        // Durations as text are held to the same bound as numbers.
        r#"{"provider": "fake", "fault": "slow", "duration": 10, "latency": "100000y"}"#,
        r#"{"provider": "fake", "fault": "slow", "duration": 10, "latency": "61min"}"#,
        r#"{"provider": "fake", "fault": "down", "duration": "100000y"}"#,
        r#"{"provider": "fake", "fault": "down", "duration": "3601s"}"#,
        r#"{"provider": "fake", "fault": "slow", "duration": "10s", "latency": "99999999999999999999y"}"#,
    ];
    for body in bodies {
        let r = client()
            .post(gw.admin_url("/admin/faults"))
            .bearer_auth(ADMIN_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{body}: the admin listener dropped the call: {e}"));
        assert_eq!(r.status(), 400, "{body}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_request", "{body}");
    }
    assert!(gw.admin_status().await["faults"]
        .as_array()
        .unwrap()
        .is_empty());
    // A valid number still works.
    let r = client()
        .post(gw.admin_url("/admin/faults"))
        .bearer_auth(ADMIN_KEY)
        .json(&serde_json::json!({"provider": "fake", "fault": "slow", "duration": 5, "latency": 0.01}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // And so does a text duration at the bound.
    let r = client()
        .post(gw.admin_url("/admin/faults"))
        .bearer_auth(ADMIN_KEY)
        .json(&serde_json::json!({"provider": "fake", "fault": "slow", "duration": "1h", "latency": "10ms"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn wrong_keys_of_any_length_are_refused() {
    let (_fake, gw) = setup().await;
    for key in [
        "",
        "t",
        "test-admin-ke",
        "test-admin-keyX",
        &"k".repeat(4096),
    ] {
        let r = client()
            .get(gw.admin_url("/admin/status"))
            .header("x-admin-key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{key:?}");
    }
    let r = client()
        .get(gw.admin_url("/admin/status"))
        .header("x-admin-key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The book keeps breakers and arm statistics across reloads only for targets
/// and arms the new configuration still has: a reload that removes a route
/// forgets its targets, so reloads do not accumulate state forever.
#[tokio::test]
async fn reloads_forget_the_health_of_removed_targets() {
    let fake = spawn_fake().await;
    let split = concat!(
        "  ab:\n    split:\n      subject: user\n      arms:\n",
        "        - {name: control, weight: 50, provider: fake, model: split-a}\n",
        "        - {name: canary, weight: 50, provider: fake, model: split-b}\n",
        "  gone:\n    provider: fake\n    model: removed-model\n",
    );
    let (g, p) = fake_config(&fake, split);
    let gw = spawn_gateway(&g, &p).await;
    let (targets, arms) = gw.gw.book().tracked();
    for t in ["fake/removed-model", "fake/split-a", "fake/chat"] {
        assert!(targets.iter().any(|x| x == t), "{t}: {targets:?}");
    }
    assert_eq!(arms, ["ab/canary", "ab/control"]);

    let (without, _) = fake_config(&fake, "");
    std::fs::write(gw.dir.path().join("promptgate.yaml"), without).unwrap();
    let r = client()
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (targets, arms) = gw.gw.book().tracked();
    for t in ["fake/removed-model", "fake/split-a", "fake/split-b"] {
        assert!(!targets.iter().any(|x| x == t), "{t}: {targets:?}");
    }
    assert!(targets.iter().any(|x| x == "fake/chat"), "{targets:?}");
    assert!(arms.is_empty(), "{arms:?}");
    // Every target the snapshot routes to is still tracked.
    let snap = gw.gw.snapshot();
    let mut routed: Vec<String> = snap
        .routes()
        .flat_map(|r| r.targets().into_iter().map(|t| t.id.to_string()))
        .collect();
    routed.sort();
    routed.dedup();
    assert_eq!(targets, routed);
}

/// `/readyz` on the public listener, no key: ready; 503 `config_invalid` with
/// the problems while the configuration on disk fails to load (the last good
/// one keeps serving, and `/healthz` stays 200); ready again once a reload
/// succeeds. `/admin/status` reports the same under `ready`.
#[tokio::test]
async fn readiness_fails_while_the_configuration_on_disk_is_invalid() {
    let (_fake, gw) = setup().await;
    let readyz = || async {
        let r = client().get(gw.url("/readyz")).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<serde_json::Value>().await.unwrap())
    };
    assert_eq!(
        readyz().await,
        (200, serde_json::json!({"status": "ready"}))
    );
    let good = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        good.replace("model: chat\n", "model: chat\n    bogus_field: 1\n"),
    )
    .unwrap();
    assert_eq!(gw.admin_reload().await.0, 422);
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "{body}");
    // The public answer (no key) tells how many problems, not their text.
    assert_eq!(
        body,
        serde_json::json!({"status": "config_invalid", "problems": [
            "1 problem(s) in the configuration; see the log or GET /admin/status"
        ]})
    );
    // The admin API, behind its key, has the text.
    let ready = &gw.admin_status().await["ready"];
    assert_eq!(ready["status"], "config_invalid");
    assert!(
        ready["problems"].to_string().contains("bogus_field"),
        "{ready}"
    );
    let health = client().get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let served = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("fake-chat", false))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    std::fs::write(gw.config_path(), good).unwrap();
    assert_eq!(gw.admin_reload().await.0, 200);
    assert_eq!(
        readyz().await,
        (200, serde_json::json!({"status": "ready"}))
    );
    assert_eq!(gw.admin_status().await["ready"]["status"], "ready");
}

/// With `limits.fail_readiness_on_invalid_config: false` a configuration on
/// disk that does not load leaves the replica ready (a bad ConfigMap push does
/// not take every replica out of rotation at once); the answer still says so.
#[tokio::test]
async fn readiness_can_stay_ready_on_an_invalid_configuration() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(&fake, "");
    let g = g.replace(
        "limits:\n",
        "limits:\n  list_ids_in_errors: false\n  fail_readiness_on_invalid_config: false\n",
    );
    let gw = spawn_gateway(&g, &p).await;
    let good = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        good.replace("model: chat\n", "model: chat\n    secret_route_field: 1\n"),
    )
    .unwrap();
    assert_eq!(gw.admin_reload().await.0, 422);
    let r = client().get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["config"], "invalid");
    assert_eq!(
        body["problems"],
        serde_json::json!(["1 problem(s) in the configuration; see the log or GET /admin/status"])
    );
    // The admin API, behind its key, keeps the detail.
    let status = gw.admin_status().await;
    assert!(
        status["ready"]["problems"]
            .to_string()
            .contains("secret_route_field"),
        "{status}"
    );
}
