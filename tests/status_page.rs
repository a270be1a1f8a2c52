//! The operators' status page at `/admin/`: its files are served without the
//! admin key while its data is not; the admin JSON carries what the page shows
//! (per-arm tokens and cost, shadow tokens, providers in drain or under a
//! fault); and the page itself, in a real headless Chromium
//! (tests/ops/status_page.py with Playwright), against the real binary: the
//! login, a breaker opening during an injected fault, a rejected reload, and a
//! phone's viewport.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;
#[path = "common/process.rs"]
mod process;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn the_page_is_served_without_the_key_and_its_data_is_not() {
    let (_fake, gw) = setup().await;
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirect
        .get(gw.admin_url("/admin"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection());
    assert_eq!(r.headers()["location"], "/admin/");
    let r = client().get(gw.admin_url("/admin/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    let html = r.text().await.unwrap();
    assert!(html.contains("/admin/app.js") && html.contains("id=\"login-form\""));
    for asset in ["/admin/app.js", "/admin/app.css"] {
        let r = client().get(gw.admin_url(asset)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{asset}");
    }
    // Every data endpoint still wants the key; the answer is never cached.
    for path in ["/admin/status", "/admin/experiments", "/admin/keys"] {
        let r = client().get(gw.admin_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = client()
        .get(gw.admin_url("/admin/status"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    // Other paths under /admin/ are not page files: they want the key.
    let r = client()
        .get(gw.admin_url("/admin/app.js.map"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// `/admin/experiments` gives each arm its tokens and cost (streams and whole
/// answers alike) and each shadow candidate both sides' tokens;
/// `/admin/status` says which provider is drained or under a drill fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_json_has_what_the_page_shows() {
    let fake = spawn_fake().await;
    let (g, mut p) = fake_config(
        &fake,
        "  ab:\n    split:\n      subject: user\n      arms:\n        - {name: only, weight: 1, provider: priced, model: chat}\n\
         \x20 shadowed:\n    provider: priced\n    model: chat\n    shadow: {targets: [{provider: sandbox, model: echo}], sample: 1.0}\n",
    );
    p.push((
        "priced.yaml".into(),
        format!(
            "kind: openai\nbase_url: {}\napi_key_env: FAKE_UPSTREAM_KEY\n\
             prices: {{currency: USD, models: {{chat: {{input: 1000, output: 2000, cached: 1000}}}}}}\n",
            fake.base_url()
        ),
    ));
    let gw = spawn_gateway(&g, &p).await;
    let chat = |model: &str, stream: bool| {
        let mut body = chat_body(model, stream);
        body["user"] = json!("u1");
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        client()
            .post(gw.url("/v1/chat/completions"))
            .json(&body)
            .send()
    };
    for stream in [false, false, true] {
        let r = chat("ab", stream).await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let r = chat("shadowed", false).await.unwrap();
    assert_eq!(r.status(), 200);
    // The fixtures report 12 input (4 of them cached) and 6 output tokens:
    // (8 × 1000 + 4 × 1000 + 6 × 2000) / 1e6 = 0.024 per answer.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let x = loop {
        let x = gw.admin_get("/admin/experiments").await;
        let arm = &x["experiments"][0]["arms"][0];
        if arm["requests"] == 3 && x["shadows"][0]["pairs"] == 1 {
            break x;
        }
        assert!(std::time::Instant::now() < until, "{x:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let arm = &x["experiments"][0]["arms"][0];
    assert_eq!(arm["tokens"], 54, "{x:#}");
    assert!(
        (arm["cost"].as_f64().unwrap() - 0.072).abs() < 1e-9,
        "{x:#}"
    );
    assert_eq!(x["currency"], "USD");
    let shadow = &x["shadows"][0];
    assert_eq!(shadow["primary_tokens"], 18, "{x:#}");
    assert!(shadow["candidate_tokens"].as_u64().unwrap() > 0, "{x:#}");

    // Drained and faulted providers, and the server's clock for "ago".
    let r = client()
        .post(gw.admin_url("/admin/providers/priced/drain"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .post(gw.admin_url("/admin/faults"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"provider": "fake", "fault": "error", "status": 503, "duration": "30s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let s = gw.admin_status().await;
    let provider = |id: &str| {
        s["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(provider("priced")["draining"], true, "{s:#}");
    assert_eq!(provider("priced")["fault"], Value::Null);
    assert_eq!(provider("fake")["draining"], false);
    assert_eq!(provider("fake")["fault"], "error 503");
    assert_eq!(provider("sandbox")["fault"], Value::Null);
    assert!(s["now"].as_u64().unwrap() >= s["config"]["loaded_at"].as_u64().unwrap());
}

/// The page in a real headless Chromium against the real binary (see the
/// module's doc and tests/ops/status_page.py). `PROMPTGATE_SCREENSHOTS=DIR`
/// saves its screenshots there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_chromium() {
    let Some((python, chromium)) = common::peers::browser() else {
        return;
    };
    let primary = spawn_fake().await;
    let backup = spawn_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (client_key, key_entry) = {
        use promptgate::governance::keys::{new_key, sha256_hex};
        let (k, _) = new_key().unwrap();
        let entry = format!(
            "support-app:\n  sha256: {}\n  owner: support@example.com\n  team: customer-care\n  \
             limits: {{rpm: 600, tpm: 200000}}\n  budget: {{daily: {{cost: 5}}, monthly: {{tokens: 5000000}}}}\n",
            sha256_hex(k.as_bytes())
        );
        (k, entry)
    };
    let upstream = |fake: &Fake| {
        format!(
            "kind: openai\nbase_url: {}\napi_key_env: FAKE_UPSTREAM_KEY\n\
             timeouts: {{connect: 1s, headers: 2s, idle: 2s, total: 10s}}\n\
             prices: {{currency: USD, models: {{\"*\": {{input: 0.15, output: 0.6}}}}}}\n",
            fake.base_url()
        )
    };
    let files: Vec<(&str, String)> = vec![
        ("promptgate.yaml", GATEWAY.to_string()),
        ("providers/primary.yaml", upstream(&primary)),
        ("providers/backup.yaml", upstream(&backup)),
        (
            "providers/sandbox.yaml",
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n".to_string(),
        ),
        ("prompts/greeting.yaml", GREETING.to_string()),
        ("keys/support.yaml", key_entry),
    ];
    for (name, text) in &files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let gw = process::Process::start(
        &dir.path().join("promptgate.yaml"),
        &[("FAKE_UPSTREAM_KEY", FAKE_KEY)],
    );

    // Traffic for the figures: repeated questions (cache hits), both arms of
    // the split, a shadowed route.
    let send = |model: &str, text: String, user: &str| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&client_key)
            .json(&json!({"model": model, "user": user,
                          "messages": [{"role": "user", "content": text}]}))
            .send()
    };
    for i in 0..6 {
        let r = send("support-chat", format!("question {}", i % 3), "a")
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    for i in 0..8 {
        let r = send("support-ab", format!("hello {i}"), &format!("user-{i}"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for i in 0..3 {
        let r = send("support-shadow", format!("shadow {i}"), "a")
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    // A gateway whose admin API has no key: the page says it is disabled
    // (and, on its keyed listener, shows no Keys card: no gateway keys).
    let (_fake, disabled_gw) = setup().await;
    let disabled = promptgate::admin::router(disabled_gw.reloader.clone(), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let disabled_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, disabled).await;
    });

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ops/status_page.py");
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(&script)
        .env("PG_ADMIN", &gw.admin)
        .env("PG_BASE", &gw.base)
        .env("PG_ADMIN_KEY", process::ADMIN_KEY)
        .env("PG_CLIENT_KEY", &client_key)
        .env("PG_PROMPT_FILE", dir.path().join("prompts/greeting.yaml"))
        .env("PG_DISABLED_ADMIN", &disabled_url)
        // The same in-process gateway's own admin listener: a key, no gateway keys.
        .env("PG_PLAIN_ADMIN", disabled_gw.admin_url(""))
        .env("PG_PLAIN_KEY", ADMIN_KEY)
        .env("PROMPTGATE_CHROMIUM", &chromium)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        cmd.spawn().unwrap().wait_with_output(),
    )
    .await
    .expect("the browser script did not finish within 120 s")
    .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    println!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the browser script failed ({}); output above",
        out.status
    );

    // What the page showed is what the gateway says.
    let s = gw.admin_get("/admin/status").await;
    let chain = s["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "support-chat")
        .unwrap()["targets"]
        .clone();
    assert_eq!(chain[0]["target"], "primary/chat");
    assert_eq!(chain[0]["breaker"], "open", "{s:#}");
    let problems = &s["config"]["last_error"]["problems"];
    assert!(
        problems[0]["file"]
            .as_str()
            .unwrap()
            .ends_with("greeting.yaml"),
        "{s:#}"
    );
}

/// The page's gateway: a fallback chain with a cache, a split, a shadowed
/// route, a prompt, and keys with limits and budgets.
const GATEWAY: &str = "\
listen: 127.0.0.1:0
auth: {mode: required}
breaker: {consecutive_failures: 3, cooldown: 60s}
routes:
  support-chat:
    description: Customer support answers, with a fallback
    targets:
      - {provider: primary, model: chat}
      - {provider: backup, model: chat}
    cache: {mode: on, ttl: 10m}
  support-ab:
    description: Two upstreams compared on live traffic
    split:
      subject: user
      arms:
        - {name: control, weight: 50, provider: primary, model: chat}
        - {name: candidate, weight: 50, provider: backup, model: chat}
  support-shadow:
    description: Answers from backup; copies go to the sandbox
    provider: backup
    model: chat
    shadow: {targets: [{provider: sandbox, model: echo}], sample: 1.0}
  sandbox-echo:
    provider: sandbox
    model: echo
";

const GREETING: &str = "\
description: Greets a customer by name
variables:
  name: {type: string}
labels: {production: 1, staging: 2}
versions:
  1:
    route: support-chat
    messages:
      - {role: user, content: \"Hello {{ name }}\"}
  2:
    route: support-chat
    messages:
      - {role: system, content: Be brief and friendly.}
      - {role: user, content: \"Hello {{ name }}!\"}
";
