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
