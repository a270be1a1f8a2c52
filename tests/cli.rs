//! The `promptgate` binary itself: `check` on good and broken configs, and `serve`
//! answering a round trip through the shipped sandbox route.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
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
        "promptgate.yaml:9: routes.b.colour: unknown field `colour`",
        "typo.yaml: timeouts.connect: `fast` is not a duration",
        "weird.yaml:1: kind: unknown variant `telepathy`",
        "extra.yaml:3: api_key: unknown field `api_key`",
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
    let gw = common::GatewayProcess::start(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/promptgate.yaml")),
        &[],
    );
    let base = gw.base.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body: serde_json::Value = rt.block_on(async {
        common::client()
            .post(format!("{base}/v1/chat/completions"))
            .json(&serde_json::json!({"model": "sandbox-echo", "messages": [{"role": "user", "content": "round trip"}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    drop(gw);
    assert_eq!(body["choices"][0]["message"]["content"], "round trip");
}

#[test]
fn render_and_prompts_commands_work_on_the_shipped_prompts() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/promptgate.yaml");
    let out = bin()
        .args(["render", "refund-answer@2", "--config", cfg])
        .args([
            "--var",
            "customer_name=ada",
            "--var",
            "question=Can I return shoes?",
        ])
        .args(["--var", "order_total=12.5", "--var", "vip=true"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("# refund-answer@2  route: sandbox-echo"),
        "{text}"
    );
    assert!(
        text.contains("Customer: Ada (VIP)") && text.contains("Order total: 12.50 EUR"),
        "{text}"
    );

    let out = bin()
        .args([
            "render",
            "tuihuo-zixun",
            "--config",
            cfg,
            "--var",
            "guke=王先生",
            "--var",
            "wenti=能退吗",
            "--var",
            "tianshu=3",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("签收天数：3 天"));

    let out = bin()
        .args([
            "render",
            "refund-answer",
            "--config",
            cfg,
            "--var",
            "order_total=lots",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`order_total` must be a number"));

    let out = bin().args(["prompts", "--config", cfg]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("refund-answer") && text.contains("[production]") && text.contains("sha256:"),
        "{text}"
    );
}

#[test]
fn check_reports_prompt_problems_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(
        dir.path(),
        "routes:\n  r:\n    provider: sb\n    model: echo\n",
        &[(
            "sb.yaml".into(),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n".into(),
        )],
    );
    std::fs::write(
        dir.path().join("prompts/p.yaml"),
        "variables:\n  a: {type: string}\nlabels:\n  production: 3\nversions:\n  1:\n    route: nowhere\n    messages:\n      - role: user\n        content: \"{{ a }} {{ b }}\"\n      - role: user\n        content: \"{% for x in a %}\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["check", "--config"])
        .arg(dir.path().join("promptgate.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.yaml:4: labels.production: points at version 3, which does not exist"),
        "{err}"
    );
    assert!(
        err.contains("p.yaml:6: versions.1.route: unknown route `nowhere`"),
        "{err}"
    );
    // Fix those two; then the templates are checked.
    std::fs::write(
        dir.path().join("prompts/p.yaml"),
        "variables:\n  a: {type: string}\nlabels:\n  production: 1\nversions:\n  1:\n    route: r\n    messages:\n      - role: user\n        content: \"{{ a }} {{ b }}\"\n      - role: user\n        content: \"{% for x in a %}\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["check", "--config"])
        .arg(dir.path().join("promptgate.yaml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.yaml:10: versions.1.messages[0].content: template uses `b`, which is not a declared variable"), "{err}");
    assert!(
        err.contains("p.yaml:12: versions.1.messages[1].content: template does not compile"),
        "{err}"
    );
}

#[test]
fn sighup_reloads_a_running_gateway() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(
        dir.path(),
        "routes:\n  r:\n    provider: sb\n    model: echo\n",
        &[(
            "sb.yaml".into(),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n".into(),
        )],
    );
    let prompt = |n: u32| {
        format!("labels: {{production: {n}}}\nversions:\n  1:\n    route: r\n    messages: [{{role: user, content: one}}]\n  2:\n    route: r\n    messages: [{{role: user, content: two}}]\n")
    };
    std::fs::write(dir.path().join("prompts/p.yaml"), prompt(1)).unwrap();
    let gw = common::GatewayProcess::start(&dir.path().join("promptgate.yaml"), &[]);
    let base = gw.base.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = |rt: &tokio::runtime::Runtime| -> String {
        rt.block_on(async {
            let v: serde_json::Value = common::client()
                .post(format!("{base}/v1/prompts/p/chat/completions"))
                .json(&serde_json::json!({}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
    };
    assert_eq!(answer(&rt), "one");
    // Move the file out of the watched folder's sight: write it elsewhere and
    // rename in, then signal (the watcher may also catch it; either way it must
    // be served within the deadline).
    std::fs::write(dir.path().join("prompts/p.yaml"), prompt(2)).unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while answer(&rt) != "two" {
        assert!(
            std::time::Instant::now() < deadline,
            "the reload never happened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
