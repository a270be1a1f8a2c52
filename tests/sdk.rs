//! Drives the running gateway with the official Python SDKs (tests/sdk/*.py).
//!
//! The gateway and the fake upstream run in-process on this test's runtime, so
//! pytest is spawned with `tokio::process` and awaited: the runtime keeps serving
//! while it runs. The Python interpreter comes from `PROMPTGATE_PYTHON` (set by
//! `scripts/test`) or the repo's `.venv`.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

// The native protocols' fakes, from the conformance suite (its test cases are not
// wanted here).
macro_rules! conformance_cases {
    ($($t:tt)*) => {};
}
#[path = "protocols/anthropic.rs"]
mod anthropic_protocol;
#[path = "protocols/chatglm3.rs"]
mod chatglm3_protocol;
#[path = "protocols/chatglm.rs"]
mod chatglm_protocol;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMPTGATE_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.exists() {
        return venv;
    }
    panic!(
        "no Python for the SDK tests: PROMPTGATE_PYTHON is unset and {} does not exist; \
         run the tests with `scripts/test` (it creates .venv with requirements-test.txt)",
        venv.display()
    );
}

/// A retrieval service on loopback answering every search with two passages;
/// returns its URL.
async fn retrieval_service() -> String {
    let app = axum::Router::new().route(
        "/search",
        axum::routing::post(|| async {
            axum::Json(serde_json::json!({"results": [
                {"text": "Refunds are accepted within 30 days.", "score": 0.9, "source": "policy.md", "chunk_id": "p1"},
                {"text": "Invoices are sent monthly.", "score": 0.6, "source": "billing.md", "chunk_id": "p2"},
            ]}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    #[allow(clippy::disallowed_methods)]
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/search")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk() {
    openai_sdk(true).await;
}

/// The same SDK suite with `fast_path: false`: the OpenAI requests to the
/// OpenAI-format fake take the canonical path (decode, encode) instead of
/// being forwarded as bytes, and every test passes alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_on_the_canonical_path() {
    openai_sdk(false).await;
}

/// Runs tests/sdk against a gateway whose config differs only by `fast_path`.
async fn openai_sdk(fast_path: bool) {
    let python = python();
    // An OpenAI-format fake for most routes, plus fakes speaking Anthropic's,
    // ChatGLM-6B's and ChatGLM3's formats behind `native-*` routes.
    let fake = common::spawn_fake().await;
    let mut routes = String::new();
    let mut natives = Vec::new();
    for (route, proto) in [
        ("native-anthropic", &anthropic_protocol::PROTOCOL),
        ("native-chatglm", &chatglm_protocol::PROTOCOL),
        ("native-chatglm3", &chatglm3_protocol::PROTOCOL),
    ] {
        let (base, _state) = common::native::spawn(proto).await;
        let provider = format!("{route}-provider");
        routes.push_str(&format!(
            "  {route}:\n    provider: {provider}\n    model: {}\n",
            proto.model
        ));
        natives.push((format!("{provider}.yaml"), (proto.provider_yaml)(&base)));
    }
    let (mut g, mut p) = common::fake_config(&fake, &routes);
    if !fast_path {
        g.push_str("fast_path: false\n");
    }
    p.extend(natives);
    // Retriever `kb` for test_openai_sdk_retrieval.py: a loopback service
    // speaking the http kind's contract, always with the same two passages.
    let kb = retrieval_service().await;
    let kb = format!("kind: http\nurl: {kb}\n");
    let gw = common::spawn_gateway_with_files(&g, &p, &[("retrievers/kb.yaml", &kb)]).await;
    run_pytest(
        &python,
        &["tests/sdk"],
        &[("PROMPTGATE_BASE_URL", gw.url("/v1"))],
    )
    .await;

    // test_extra_body_passthrough sends extra_body={"top_k": 5, "vendor_flag": true}:
    // unknown fields must reach the upstream untouched.
    let reqs = fake.requests();
    let passed = reqs
        .iter()
        .find(|r| r.path == "/v1/chat/completions" && r.body.get("vendor_flag").is_some())
        .unwrap_or_else(|| {
            panic!(
                "no upstream request carried `vendor_flag`; bodies seen: {:#?}",
                reqs.iter().map(|r| &r.body).collect::<Vec<_>>()
            )
        });
    assert_eq!(passed.body["vendor_flag"], serde_json::json!(true));
    assert_eq!(passed.body["top_k"], serde_json::json!(5));
    assert_eq!(passed.body["model"], serde_json::json!("chat"));
}

/// Runs pytest on `paths` with `envs`, printing its output; fails the test
/// when pytest fails.
async fn run_pytest(python: &Path, paths: &[&str], envs: &[(&str, String)]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = tokio::process::Command::new(python);
    cmd.args(["-m", "pytest"])
        .args(paths)
        .args(["-q", "-p", "no:cacheprovider"])
        .current_dir(root)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // The SDKs must talk to the loopback gateway, never through a proxy.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("pytest did not finish within 300s")
        .expect("waiting for pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    if !stderr.trim().is_empty() {
        println!("--- pytest stderr ---\n{stderr}");
    }
    assert!(
        out.status.success(),
        "pytest failed ({}); output above",
        out.status
    );
}

/// Gateway keys with both SDKs (tests/sdk/test_*_sdk_keys.py): a gateway with
/// `auth: {mode: required}`, a key that may use the `fake-*` routes and an
/// expired one. Afterwards no key appears in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_the_python_sdks() {
    use promptgate::governance::keys::{new_key, sha256_hex};
    let python = python();
    let fake = common::spawn_fake().await;
    let (mut g, p) = common::fake_config(
        &fake,
        "  fake-emb:\n    provider: fake\n    model: text-embedding\n",
    );
    g.push_str("auth: {mode: required}\n");
    let (good, _) = new_key().unwrap();
    let (expired, _) = new_key().unwrap();
    let keys = format!(
        "sdk-good:\n  sha256: {}\n  routes: [\"fake-*\"]\nsdk-old:\n  sha256: {}\n  expires: 2021-06-01T00:00:00Z\n",
        sha256_hex(good.as_bytes()),
        sha256_hex(expired.as_bytes())
    );
    let gw = common::spawn_gateway_with_files(&g, &p, &[("keys/sdk.yaml", &keys)]).await;
    run_pytest(
        &python,
        &[
            "tests/sdk/test_openai_sdk_keys.py",
            "tests/sdk/test_anthropic_sdk_keys.py",
        ],
        &[
            ("PROMPTGATE_KEYS_BASE_URL", gw.url("/v1")),
            ("PROMPTGATE_KEY_GOOD", good.clone()),
            ("PROMPTGATE_KEY_EXPIRED", expired.clone()),
        ],
    )
    .await;
    let m = gw.metrics().await;
    assert!(
        m.contains(
            "promptgate_key_requests_total{key=\"sdk-good\",route=\"fake-chat\",status=\"200\"}"
        ),
        "{m}"
    );
    for k in [&good, &expired] {
        assert!(!m.contains(k.as_str()) && !m.contains(&sha256_hex(k.as_bytes())));
        for r in fake.requests() {
            assert!(!format!("{:?}{}", r.headers, r.body).contains(k.as_str()));
        }
    }
}
