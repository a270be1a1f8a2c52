//! No gateway key, no key's SHA-256 and no detected sensitive value appears
//! anywhere the gateway shows something: its log (stderr) and stdout, any
//! error body, `/metrics`, the audit log, `/admin/keys`, `/admin/status`.
//! One real `promptgate serve` with auth required, keys (one expired), a rate
//! limit, a budget, the audit log (content off) and data protection (`redact`
//! on one route, `block` on another), driven with good, bad, expired and
//! missing keys on both doors and with a real-format ID number, mobile
//! number, card number and e-mail address in the messages.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/process.rs"]
mod process;

use common::{fake_config, spawn_fake, write_config, FAKE_KEY};
use process::{eventually, Process, ADMIN_KEY};
use serde_json::{json, Value};

// What this test asserts beyond "nothing leaks" depends on features built in
// parallel: each flag turns on the assertions marked `// needs: <feature>`.
// Set them to true once those features are merged.
const KEYS_BUILT: bool = true;
const LIMITS_BUILT: bool = true;
const SPEND_BUILT: bool = true;
const PROTECT_BUILT: bool = true;

const KEY_GOOD: &str = "pg-test-good-8b1d0f6c2e9a47d3b5c1e0f9a8d7c6b5";
const KEY_BUDGET: &str = "pg-test-budget-3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c";
const KEY_EXPIRED: &str = "pg-test-expired-a1b2c3d4e5f60718293a4b5c6d7e8f90";
const KEY_UNKNOWN: &str = "pg-test-unknown-0f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// A Chinese resident ID number with a valid check digit, a mainland mobile
/// number, a Luhn-valid card number, an e-mail address.
const ID_NUMBER: &str = "11010519491231002X";
const MOBILE: &str = "13812345678";
const CARD: &str = "4111111111111111";
const EMAIL: &str = "zhang.wei@example.com";

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sensitive_text() -> String {
    format!("My ID is {ID_NUMBER}, call me on {MOBILE}, card {CARD}, mail {EMAIL}.")
}

/// Everything that must never be shown.
fn secrets() -> Vec<String> {
    let mut s = Vec::new();
    for k in [KEY_GOOD, KEY_BUDGET, KEY_EXPIRED, KEY_UNKNOWN] {
        s.push(k.to_owned());
        s.push(sha256_hex(k));
        s.push(sha256_hex(k).to_uppercase());
    }
    for v in [ID_NUMBER, MOBILE, CARD, EMAIL] {
        s.push(v.to_owned());
    }
    s
}

fn assert_clean(place: &str, text: &str) {
    for s in secrets() {
        assert!(!text.contains(&s), "{place} shows `{s}`:\n{text}");
    }
}

struct Sent {
    status: u16,
    body: String,
}

/// What the test sent and got back, and the error bodies among them.
#[derive(Default)]
struct Log {
    sent: usize,
    errors: Vec<String>,
}

impl Log {
    async fn send(&mut self, rb: reqwest::RequestBuilder) -> Sent {
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        self.sent += 1;
        if status >= 400 {
            self.errors.push(format!("{status} {body}"));
        }
        Sent { status, body }
    }
}

#[tokio::test]
async fn no_key_hash_or_detected_value_appears_in_any_log_error_metric_or_record() {
    let fake = spawn_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let routes = "  redacted:\n    provider: fake\n    model: chat\n    data: redact\n  blocked:\n    provider: fake\n    model: chat\n    data: block\n  limited:\n    provider: fake\n    model: chat\n    limits: {rpm: 2}\n";
    let (gateway, mut providers) = fake_config(&fake, routes);
    let gateway = format!(
        "{gateway}auth: {{mode: required}}\naudit: {{path: audit/audit.jsonl, stdout: true}}\nspend: {{path: data/spend.sqlite}}\ndata_protection: {{policy: redact}}\n"
    );
    for (name, text) in &mut providers {
        if name == "fake.yaml" {
            text.push_str("prices: {currency: USD, models: {\"*\": {input: 1.0, output: 2.0}}}\n");
        }
    }
    write_config(dir.path(), &gateway, &providers);
    let keys = format!(
        "good:\n  sha256: {}\n  owner: test\nbudgeted:\n  sha256: {}\n  budget: {{daily: {{tokens: 10}}}}\nold:\n  sha256: {}\n  expires: 2020-01-01T00:00:00Z\n",
        sha256_hex(KEY_GOOD),
        sha256_hex(KEY_BUDGET),
        sha256_hex(KEY_EXPIRED)
    );
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/clients.yaml"), keys).unwrap();
    let mut gw = Process::start(
        &dir.path().join("promptgate.yaml"),
        &[
            ("FAKE_UPSTREAM_KEY", FAKE_KEY),
            ("PROMPTGATE_LOG", "info,promptgate=debug"),
        ],
    );
    let http = common::client();
    let mut log = Log::default();
    let openai = |model: &str, stream: bool| {
        json!({"model": model, "stream": stream, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": sensitive_text()}]})
    };
    let chat = |key: Option<&str>, body: Value| {
        let rb = http.post(gw.url("/v1/chat/completions")).json(&body);
        match key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    };
    let messages = |key: Option<&str>, model: &str| {
        let rb = http
            .post(gw.url("/v1/messages"))
            .header("anthropic-version", "2023-06-01")
            .json(&json!({"model": model, "max_tokens": 64, "messages": [
                {"role": "user", "content": sensitive_text()}]}));
        match key {
            Some(k) => rb.header("x-api-key", k),
            None => rb,
        }
    };

    // A good key, redaction on: served, in both modes and on both doors.
    let r = log
        .send(chat(Some(KEY_GOOD), openai("redacted", false)))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = log
        .send(chat(Some(KEY_GOOD), openai("redacted", true)))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = log.send(messages(Some(KEY_GOOD), "redacted")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Blocked: refused, naming the type of value, never the value.
    let r = log
        .send(chat(Some(KEY_GOOD), openai("blocked", false)))
        .await;
    if PROTECT_BUILT {
        // needs: protect
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains("sensitive_data"), "{}", r.body);
    }
    let r = log.send(messages(Some(KEY_GOOD), "blocked")).await;
    if PROTECT_BUILT {
        // needs: protect
        assert_eq!(r.status, 400, "{}", r.body);
    }
    // Bad, expired and missing keys, on both doors.
    for key in [Some(KEY_UNKNOWN), Some(KEY_EXPIRED), None] {
        let r = log.send(chat(key, openai("redacted", false))).await;
        if KEYS_BUILT {
            // needs: keys
            assert_eq!(r.status, 401, "{}", r.body);
        }
        let r = log.send(messages(key, "redacted")).await;
        if KEYS_BUILT {
            // needs: keys
            assert_eq!(r.status, 401, "{}", r.body);
            assert!(r.body.contains("authentication_error"), "{}", r.body);
        }
    }
    // A rate limit: the third request in the minute is refused.
    let mut limited = Vec::new();
    for _ in 0..3 {
        limited.push(
            log.send(chat(Some(KEY_GOOD), openai("limited", false)))
                .await
                .status,
        );
    }
    if LIMITS_BUILT {
        // needs: limits
        assert_eq!(limited[0], 200);
        assert!(limited.contains(&429), "{limited:?}");
    }
    // A budget of 10 tokens a day: the first answer (18 tokens) spends it.
    let mut budget = Vec::new();
    for _ in 0..3 {
        budget.push(
            log.send(chat(Some(KEY_BUDGET), openai("redacted", false)))
                .await
                .status,
        );
    }
    if SPEND_BUILT {
        // needs: spend
        assert_eq!(budget[0], 200);
        assert!(budget.contains(&429), "{budget:?}");
    }
    // Embeddings with a sensitive value.
    log.send(
        http.post(gw.url("/v1/embeddings"))
            .bearer_auth(KEY_GOOD)
            .json(&json!({"model": "redacted", "input": [sensitive_text()]})),
    )
    .await;

    // What the gateway shows.
    let metrics = http
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_clean("/metrics", &metrics);
    if KEYS_BUILT {
        // needs: keys — key ids label the per-key series.
        assert!(metrics.contains("key=\"good\""), "{metrics}");
    }
    let admin_status = http
        .get(gw.admin_url("/admin/status"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(admin_status.status(), 200);
    assert_clean("/admin/status", &admin_status.text().await.unwrap());
    let admin_keys = http
        .get(gw.admin_url("/admin/keys"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    let keys_status = admin_keys.status().as_u16();
    let keys_body = admin_keys.text().await.unwrap();
    assert_clean("/admin/keys", &keys_body);
    if KEYS_BUILT {
        // needs: keys
        assert_eq!(keys_status, 200, "{keys_body}");
        assert!(keys_body.contains("\"good\""), "{keys_body}");
    }
    for e in &log.errors {
        assert_clean("an error body", e);
    }

    // Every request is recorded: the audit log is complete before it is read.
    let audit = dir.path().join("audit/audit.jsonl");
    let n = log.sent;
    let text = eventually(&format!("{n} audit records"), || {
        let t = std::fs::read_to_string(&audit).unwrap_or_default();
        (t.lines().count() >= n).then_some(t)
    })
    .await;
    assert_eq!(text.lines().count(), n, "{text}");
    assert_clean("the audit file", &text);
    if PROTECT_BUILT {
        // needs: protect — the detections are counted by type in the record.
        assert!(text.contains("\"cn_id\":"), "{text}");
    }

    // The upstream never saw a gateway key (it gets the provider's own).
    for r in fake.requests() {
        let headers = format!("{:?}", r.headers);
        for k in [KEY_GOOD, KEY_BUDGET, KEY_EXPIRED, KEY_UNKNOWN] {
            assert!(!headers.contains(k), "the upstream saw a gateway key");
        }
        if PROTECT_BUILT && r.body["model"] == "chat" {
            // needs: protect — redacted before it left, blocked never sent.
            assert_clean("a request to the commercial upstream", &r.body.to_string());
        }
    }

    // The log, to the end (shutdown included), and stdout (the audit sink).
    gw.terminate();
    let stderr = gw.stderr_lines().join("\n");
    assert!(stderr.contains("promptgate listening"), "{stderr}");
    assert_clean("the log", &stderr);
    let stdout = gw.stdout_lines();
    assert_eq!(stdout.len(), n, "{stdout:#?}");
    assert_clean("stdout", &stdout.join("\n"));
}
