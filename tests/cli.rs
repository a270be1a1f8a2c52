//! The `promptgate` binary itself: `check` on good and broken configs, and `serve`
//! answering a round trip through the shipped sandbox route.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_promptgate"))
}

#[test]
fn check_accepts_the_shipped_config() {
    let out = bin()
        .args(["check", "--config"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/promptgate.yaml"))
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok:"));
    // A provider without its key is reported, not fatal.
    assert!(
        stdout.contains("provider `openai` is unavailable: environment variable OPENAI_API_KEY")
    );
}

#[test]
fn check_reports_every_problem_with_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(
        dir.path(),
        "listen: 127.0.0.1:8080\nroutes:\n  a:\n    provider: missing\n    model: m\n  b:\n    provider: good\n    model: not-listed\n    colour: blue\n",
        &[
            ("good.yaml".into(), "kind: openai\nbase_url: http://127.0.0.1:1/v1\nmodels: [m1]\n".into()),
            ("typo.yaml".into(), "kind: openai\nbase_url: http://x\ntimeouts: {connect: fast}\n".into()),
            ("weird.yaml".into(), "kind: telepathy\n".into()),
            ("extra.yaml".into(), "kind: openai\nbase_url: http://x\napi_key: sk-inline\n".into()),
        ],
    );
    let out = bin()
        .args(["check", "--config"])
        .arg(dir.path().join("promptgate.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "promptgate.yaml: routes.b.colour: unknown field `colour`",
        "typo.yaml: timeouts.connect: `fast` is not a duration",
        "weird.yaml: kind: unknown variant `telepathy`",
        "extra.yaml: api_key: unknown field `api_key`",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }

    // With the unknown key fixed, the reference errors show.
    common::write_config(
        dir.path(),
        "routes:\n  a:\n    provider: missing\n    model: m\n  b:\n    provider: good\n    model: not-listed\n",
        &[("typo.yaml".into(), "kind: openai\nbase_url: http://x\n".into()), ("weird.yaml".into(), "kind: openai\nbase_url: http://x\n".into()), ("extra.yaml".into(), "kind: openai\nbase_url: http://x\n".into())],
    );
    let out = bin()
        .args(["check", "--config"])
        .arg(dir.path().join("promptgate.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("routes.a.provider: unknown provider `missing`"),
        "{err}"
    );
    assert!(
        err.contains("routes.b.model: provider `good` has no model `not-listed`"),
        "{err}"
    );
}

#[test]
fn serve_answers_offline_with_the_shipped_config() {
    let mut child = bin()
        .args(["serve", "--config"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/promptgate.yaml"))
        .args(["--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the gateway started");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body: serde_json::Value = rt.block_on(async {
        common::client()
            .post(format!("http://{addr}/v1/chat/completions"))
            .json(&serde_json::json!({"model": "sandbox-echo", "messages": [{"role": "user", "content": "round trip"}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(body["choices"][0]["message"]["content"], "round trip");
}
