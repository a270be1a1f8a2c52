//! Versioned prompts end to end: the extension object and the prompt endpoint,
//! labels and versions, variable validation, rendering errors, and hot reload
//! (file watcher, admin API, broken files, immutable versions, reload under load).
// Test servers and clients are started freely; the gateway's own tasks go through
// promptgate::task::spawn (clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const GREETING: &str = r#"
description: A greeting
variables:
  name: {type: string}
  times: {type: integer, default: 1}
  loud: {type: boolean, default: false}
  tags: {type: list, default: []}
labels:
  production: 1
  staging: 2
versions:
  1:
    route: sandbox-echo
    params: {temperature: 0.2, max_tokens: 50}
    messages:
      - role: system
        content: Be kind.
      - role: user
        content: "Hello {{ name }}{% if loud %}!{% endif %}{% for t in tags %} #{{ t }}{% endfor %}"
  2:
    route: fake-chat
    params: {temperature: 0.7, max_tokens: 99, stop: ["END"]}
    messages:
      - role: system
        content: "Greet {{ times }} time(s)."
      - role: user
        content: "Hi {{ name | upper }}"
"#;

const BROKEN_TEMPLATE: &str = r#"
variables:
  x: {type: string}
versions:
  1:
    messages:
      - role: user
        content: "{% if x %}never closed"
"#;

async fn gateway_with(prompts: &[(&str, &str)]) -> (Fake, Gw) {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(&fake, "");
    let gw = spawn_gateway_with_prompts(&g, &p, prompts).await;
    (fake, gw)
}

async fn chat(gw: &Gw, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let h = r.headers().clone();
    (s, h, r.json().await.unwrap())
}

async fn prompt_endpoint(
    gw: &Gw,
    id: &str,
    body: Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(gw.url(&format!("/v1/prompts/{id}/chat/completions")))
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let h = r.headers().clone();
    (s, h, r.json().await.unwrap())
}

#[tokio::test]
async fn extension_object_renders_and_names_the_version() {
    let (_fake, gw) = gateway_with(&[("greeting.yaml", GREETING)]).await;
    let (s, h, v) = chat(
        &gw,
        json!({"model": "ignored-when-the-version-has-a-route", "messages": [],
               "prompt": {"id": "greeting", "variables": {"name": "Ada", "loud": true, "tags": ["a", "b"]}}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h["x-promptgate-prompt"], "greeting");
    assert_eq!(h["x-promptgate-prompt-version"], "1");
    assert_eq!(h["x-promptgate-route"], "sandbox-echo");
    // The sandbox echoes the last user message: the rendered one.
    assert_eq!(v["choices"][0]["message"]["content"], "Hello Ada! #a #b");

    // Client messages come after the rendered ones.
    let (_, _, v) = chat(
        &gw,
        json!({"model": "x", "messages": [{"role": "user", "content": "and one more thing"}],
               "prompt": {"id": "greeting", "variables": {"name": "Ada"}}}),
    )
    .await;
    assert_eq!(v["choices"][0]["message"]["content"], "and one more thing");

    let m = gw.metrics().await;
    assert!(
        m.contains(
            "promptgate_prompt_requests_total{prompt=\"greeting\",status=\"200\",version=\"1\"} 2"
        ),
        "{m}"
    );
}

#[tokio::test]
async fn version_parameters_are_defaults_and_route_comes_from_the_version() {
    let (fake, gw) = gateway_with(&[("greeting.yaml", GREETING)]).await;
    let (s, h, v) = prompt_endpoint(
        &gw,
        "greeting",
        json!({"label": "staging", "variables": {"name": "bo", "times": 3}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h["x-promptgate-prompt-version"], "2");
    let up = fake.last().body;
    assert_eq!(up["model"], "chat");
    assert_eq!(up["temperature"], 0.7);
    assert_eq!(up["max_tokens"], 99);
    assert_eq!(up["stop"], json!(["END"]));
    assert_eq!(
        up["messages"],
        json!([{"role": "system", "content": "Greet 3 time(s)."}, {"role": "user", "content": "Hi BO"}])
    );
    // A request's own parameters win over the version's.
    let (s, _, _) = prompt_endpoint(
        &gw,
        "greeting",
        json!({"version": 2, "temperature": 0.1, "variables": {"name": "bo"}}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(fake.last().body["temperature"], 0.1);

    // Streaming through the prompt endpoint.
    let r = client()
        .post(gw.url("/v1/prompts/greeting/chat/completions"))
        .json(&json!({"version": 2, "stream": true, "variables": {"name": "bo"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-promptgate-prompt-version"], "2");
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn variables_are_data_not_template_code() {
    let (_fake, gw) = gateway_with(&[("greeting.yaml", GREETING)]).await;
    let (_, _, v) = prompt_endpoint(
        &gw,
        "greeting",
        json!({"variables": {"name": "{{ 7 * 7 }}{% if true %}x{% endif %}"}}),
    )
    .await;
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello {{ 7 * 7 }}{% if true %}x{% endif %}"
    );
}

#[tokio::test]
async fn prompt_errors_are_precise() {
    let (fake, gw) = gateway_with(&[("greeting.yaml", GREETING)]).await;
    let cases = [
        (
            json!({"variables": {"name": "a"}, "label": "canary"}),
            404,
            "prompt_not_found",
            "labels: production→1, staging→2",
        ),
        (
            json!({"variables": {"name": "a"}, "version": 9}),
            404,
            "prompt_not_found",
            "versions: 1, 2",
        ),
        (
            json!({"variables": {}}),
            400,
            "invalid_request",
            "variable `name` (string) of prompt `greeting` is required",
        ),
        (
            json!({"variables": {"name": 5}}),
            400,
            "invalid_request",
            "`name` of prompt `greeting` must be a string, got a number",
        ),
        (
            json!({"variables": {"name": "a", "times": "two"}}),
            400,
            "invalid_request",
            "must be a integer",
        ),
        (
            json!({"variables": {"name": "a", "nickname": "z"}}),
            400,
            "invalid_request",
            "has no variable `nickname`",
        ),
    ];
    for (body, status, code, needle) in cases {
        let (s, h, v) = prompt_endpoint(&gw, "greeting", body.clone()).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {v}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {v}"
        );
        assert_eq!(
            v["error"]["request_id"],
            h["x-request-id"].to_str().unwrap()
        );
    }
    let (s, _, v) = prompt_endpoint(&gw, "nope", json!({})).await;
    assert_eq!(s, 404);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prompts: greeting"),
        "{v}"
    );
    let (s, _, v) = chat(
        &gw,
        json!({"model": "x", "messages": [], "prompt": {"variables": {}}}),
    )
    .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("prompt.id")));
    assert_eq!(v["error"]["code"], "invalid_request");
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn render_failures_point_at_the_template() {
    // The filter is unknown only at render time for a value that is never
    // checked at compile time: minijinja reports it when the template runs.
    let runtime_error = r#"
variables:
  items: {type: object}
versions:
  1:
    route: sandbox-echo
    messages:
      - role: user
        content: "{{ items.missing.deeper }}"
labels: {production: 1}
"#;
    let (_fake, gw) = gateway_with(&[("bad.yaml", runtime_error)]).await;
    let (s, _, v) = prompt_endpoint(&gw, "bad", json!({"variables": {"items": {}}})).await;
    assert_eq!(s, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("failed to render messages[0]") && msg.contains("bad.yaml:9"),
        "{msg}"
    );
}

#[tokio::test]
async fn broken_prompt_files_never_start_and_never_replace_a_good_snapshot() {
    // At start: the whole configuration is rejected, with file and line.
    let dir = tempfile::tempdir().unwrap();
    let fake = spawn_fake().await;
    let (g, p) = fake_config(&fake, "");
    write_config(dir.path(), &g, &p);
    std::fs::write(dir.path().join("prompts/broken.yaml"), BROKEN_TEMPLATE).unwrap();
    let problems = promptgate::load(&dir.path().join("promptgate.yaml"), &test_env)
        .err()
        .unwrap();
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("broken.yaml:8") && t.contains("does not compile")),
        "{text:?}"
    );

    // While serving: a reload with a broken file changes nothing.
    let (_fake, gw) = gateway_with(&[("greeting.yaml", GREETING)]).await;
    std::fs::write(gw.dir.path().join("prompts/broken.yaml"), BROKEN_TEMPLATE).unwrap();
    let (s, v) = gw.admin_reload().await;
    assert_eq!(s, 422, "{v}");
    assert!(
        v["problems"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("broken.yaml:8")),
        "{v}"
    );
    let (s, _, _) = prompt_endpoint(&gw, "greeting", json!({"variables": {"name": "a"}})).await;
    assert_eq!(s, 200, "the last good snapshot keeps serving");
    let st = gw.admin_status().await;
    assert_eq!(st["config"]["reloads"]["failed"], 1);
    assert_eq!(st["config"]["last_error"]["problems"][0]["line"], 8);
    assert_eq!(st["prompts"][0]["id"], "greeting");
    assert_eq!(st["prompts"][0]["labels"]["production"], 1);
    let m = gw.metrics().await;
    assert!(m.contains("promptgate_config_reloads_total{result=\"error\"} 1"));
}

#[tokio::test]
async fn published_versions_are_immutable() {
    let (_fake, gw) = gateway_with(&[("greeting.yaml", GREETING)]).await;
    // Editing a version that is serving is rejected…
    let edited = GREETING.replace("Be kind.", "Be rude.");
    std::fs::write(gw.dir.path().join("prompts/greeting.yaml"), &edited).unwrap();
    let (s, v) = gw.admin_reload().await;
    assert_eq!(s, 422);
    assert!(
        v.to_string().contains("published versions are immutable"),
        "{v}"
    );
    // …and so is a file whose recorded hash no longer matches.
    let hash = gw.gw.snapshot().prompts.get("greeting").unwrap().versions[&1]
        .hash
        .clone();
    let pinned = GREETING.replacen("  1:\n", &format!("  1:\n    hash: {hash}\n"), 1);
    let tampered = pinned.replace("Be kind.", "Be rude.");
    let dir = tempfile::tempdir().unwrap();
    let fake = spawn_fake().await;
    let (g, p) = fake_config(&fake, "");
    write_config(dir.path(), &g, &p);
    std::fs::write(dir.path().join("prompts/greeting.yaml"), &pinned).unwrap();
    assert!(promptgate::load(&dir.path().join("promptgate.yaml"), &test_env).is_ok());
    std::fs::write(dir.path().join("prompts/greeting.yaml"), &tampered).unwrap();
    let problems = promptgate::load(&dir.path().join("promptgate.yaml"), &test_env)
        .err()
        .unwrap();
    assert!(
        problems[0]
            .to_string()
            .contains(&format!("was published as {hash}")),
        "{problems:?}"
    );
}

/// Polls until the production version served is `want`.
async fn wait_for_version(gw: &Gw, want: &str) -> Duration {
    let start = Instant::now();
    loop {
        let (s, h, _) = prompt_endpoint(gw, "greeting", json!({"variables": {"name": "a"}})).await;
        if s == 200 && h["x-promptgate-prompt-version"] == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "version {want} was never served"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn file_watcher_picks_up_saves_renames_and_symlink_swaps() {
    let (_fake, gw) = gateway_with(&[("greeting.yaml", GREETING)]).await;
    let _watcher = gw.reloader.watch(Duration::from_millis(100)).unwrap();
    let prompts = gw.dir.path().join("prompts");

    // A plain save that promotes staging to production.
    std::fs::write(
        prompts.join("greeting.yaml"),
        GREETING.replace("production: 1", "production: 2"),
    )
    .unwrap();
    wait_for_version(&gw, "2").await;

    // An editor's save: write a temp file, then rename it over the original.
    std::fs::write(prompts.join(".greeting.yaml.swp"), GREETING).unwrap();
    std::fs::rename(
        prompts.join(".greeting.yaml.swp"),
        prompts.join("greeting.yaml"),
    )
    .unwrap();
    wait_for_version(&gw, "1").await;

    // A Kubernetes ConfigMap update: files are symlinks through `..data`, which
    // is swapped atomically to a new timestamped folder.
    let v1 = prompts.join("..2024_01_01");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(
        v1.join("greeting.yaml"),
        GREETING.replace("production: 1", "production: 2"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2024_01_01", prompts.join("..data_tmp")).unwrap();
    std::fs::rename(prompts.join("..data_tmp"), prompts.join("..data")).unwrap();
    std::fs::remove_file(prompts.join("greeting.yaml")).unwrap();
    std::os::unix::fs::symlink("..data/greeting.yaml", prompts.join("greeting.yaml")).unwrap();
    wait_for_version(&gw, "2").await;
    let v2 = prompts.join("..2024_01_02");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("greeting.yaml"), GREETING).unwrap();
    std::os::unix::fs::symlink("..2024_01_02", prompts.join("..data_tmp")).unwrap();
    std::fs::rename(prompts.join("..data_tmp"), prompts.join("..data")).unwrap();
    wait_for_version(&gw, "1").await;
}

/// 100 reloads under steady load, alternating a valid change (a new version,
/// promoted to production) and a broken file: no request fails, and every
/// response names a version that had been published when it was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_reloads_under_load_lose_nothing() {
    fn file(latest: u32) -> String {
        let mut s = String::from("variables:\n  name: {type: string}\nlabels:\n");
        s.push_str(&format!("  production: {latest}\nversions:\n"));
        for n in 1..=latest {
            s.push_str(&format!(
                "  {n}:\n    route: sandbox-echo\n    messages:\n      - role: user\n        content: \"v{n} {{{{ name }}}}\"\n"
            ));
        }
        s
    }
    let (_fake, gw) = gateway_with(&[("greeting.yaml", &file(1))]).await;
    let gw = Arc::new(gw);
    let published = Arc::new(Mutex::new(1u32));
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (gw, published, stop, served) =
            (gw.clone(), published.clone(), stop.clone(), served.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let latest_before = *published.lock().unwrap();
                let (s, h, v) =
                    prompt_endpoint(&gw, "greeting", json!({"variables": {"name": "x"}})).await;
                assert_eq!(s, 200, "a request failed during reloads: {v}");
                let version: u32 = h["x-promptgate-prompt-version"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let latest_after = *published.lock().unwrap();
                assert!(
                    version >= 1 && version <= latest_after,
                    "version {version} was never published"
                );
                assert!(version + 1 >= latest_before || version <= latest_after);
                assert_eq!(
                    v["choices"][0]["message"]["content"],
                    format!("v{version} x")
                );
                seen.insert(version);
                served.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }
    let prompts = gw.dir.path().join("prompts/greeting.yaml");
    let mut latest = 1;
    for i in 0..100 {
        if i % 2 == 0 {
            latest += 1;
            // Publish first (the version exists from now on), then reload.
            *published.lock().unwrap() = latest;
            std::fs::write(&prompts, file(latest)).unwrap();
            let (s, v) = gw.admin_reload().await;
            assert_eq!(s, 200, "{v}");
        } else {
            std::fs::write(&prompts, format!("{}\n  oops: [unclosed", file(latest))).unwrap();
            let (s, _) = gw.admin_reload().await;
            assert_eq!(s, 422);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = BTreeSet::new();
    for w in workers {
        seen.extend(w.await.unwrap());
    }
    assert!(served.load(Ordering::Relaxed) > 100, "the load was steady");
    assert!(
        seen.len() > 5,
        "responses followed the promotions: {seen:?}"
    );
    let st = gw.admin_status().await;
    assert_eq!(st["config"]["reloads"]["succeeded"], 50);
    assert_eq!(st["config"]["reloads"]["failed"], 50);
}

#[tokio::test]
async fn admin_api_needs_its_key() {
    let (_fake, gw) = gateway_with(&[]).await;
    let c = client();
    let r = c.post(gw.admin_url("/admin/reload")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(gw.admin_url("/admin/status"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(gw.admin_url("/admin/status"))
        .header("x-admin-key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The admin API is not on the public listener.
    let r = c
        .get(gw.url("/admin/status"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Without a configured key, everything is refused.
    let disabled = promptgate::admin::router(gw.reloader.clone(), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, disabled).await });
    let r = c
        .get(format!("http://{addr}/admin/status"))
        .bearer_auth("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn the_anthropic_front_door_takes_the_same_prompt_object() {
    let (_fake, gw) = gateway_with(&[("greeting.yaml", GREETING)]).await;
    let r = client()
        .post(gw.url("/v1/messages"))
        .json(&json!({"model": "any", "max_tokens": 50, "messages": [],
                      "prompt": {"id": "greeting", "variables": {"name": "Ada"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-prompt-version"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], "Hello Ada");
    // Errors come in Anthropic's shape.
    let r = client()
        .post(gw.url("/v1/messages"))
        .json(&json!({"model": "any", "max_tokens": 50, "messages": [],
                      "prompt": {"id": "greeting", "label": "nope", "variables": {"name": "Ada"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "not_found_error");
}

/// A template that loops without bound: `check` (config load) rejects it with a
/// sample render; one whose loops grow with a variable passes `check` but a
/// request that makes it run away gets a quick 400, and the gateway stays up.
#[tokio::test]
async fn runaway_templates_are_rejected_by_check_and_stopped_at_render() {
    let runaway = r#"
versions:
  1:
    route: sandbox-echo
    messages:
      - role: user
        content: "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
labels: {production: 1}
"#;
    let dir = tempfile::tempdir().unwrap();
    let fake = spawn_fake().await;
    let (g, p) = fake_config(&fake, "");
    write_config(dir.path(), &g, &p);
    std::fs::write(dir.path().join("prompts/runaway.yaml"), runaway).unwrap();
    let problems = promptgate::load(&dir.path().join("promptgate.yaml"), &test_env)
        .err()
        .expect("check rejects the template");
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("runaway.yaml:7") && t.contains("execution budget")),
        "{text:?}"
    );
    // The same with the bound in a typed variable with a large default.
    let by_default = r#"
variables:
  n: {type: integer, default: 100000}
versions:
  1:
    route: sandbox-echo
    messages:
      - role: user
        content: "{% for i in range(n) %}{% for j in range(n) %}x{% endfor %}{% endfor %}"
labels: {production: 1}
"#;
    std::fs::remove_file(dir.path().join("prompts/runaway.yaml")).unwrap();
    std::fs::write(dir.path().join("prompts/scaled.yaml"), by_default).unwrap();
    assert!(promptgate::load(&dir.path().join("promptgate.yaml"), &test_env).is_err());

    // Without a default the sample value is small: it passes, and a request
    // asking for a huge loop is cut off at the budget.
    let scaled = by_default.replace("n: {type: integer, default: 100000}", "n: {type: integer}");
    let (_fake, gw) = gateway_with(&[("scaled.yaml", &scaled)]).await;
    let (s, _, v) = prompt_endpoint(&gw, "scaled", json!({"variables": {"n": 3}})).await;
    assert_eq!(s, 200, "{v}");
    let gw = std::sync::Arc::new(gw);
    let mut runs = Vec::new();
    for _ in 0..4 {
        let gw = gw.clone();
        runs.push(tokio::spawn(async move {
            prompt_endpoint(&gw, "scaled", json!({"variables": {"n": 100000}})).await
        }));
    }
    for r in runs {
        let (s, _, v) = r.await.unwrap();
        assert_eq!(s, 400, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("execution budget"), "{msg}");
        assert!(!msg.contains(&gw.dir.path().display().to_string()), "{msg}");
    }
    let r = client().get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Fuel bounds steps, not bytes: a template that writes a client's text many
/// times, or sizes a string or an indentation by a client's integer, is stopped
/// by the output cap or the integer bound with a 400, and the gateway stays up.
#[tokio::test]
async fn renders_are_bounded_in_bytes_not_only_in_steps() {
    let amplify = r#"
variables:
  text: {type: string}
versions:
  1:
    route: sandbox-echo
    messages:
      - role: user
        content: "{% for i in range(2000) %}{{ text }}{% endfor %}"
labels: {production: 1}
"#;
    let repeat = r#"
variables:
  n: {type: integer}
  rows: {type: list, default: []}
versions:
  1:
    route: sandbox-echo
    messages:
      - role: user
        content: "{{ '-' * n }}{% for r in rows %}{{ '=' * r }}{% endfor %}"
labels: {production: 1}
"#;
    let (_fake, gw) = gateway_with(&[("amplify.yaml", amplify), ("repeat.yaml", repeat)]).await;
    // A small text repeated is fine.
    let (s, _, v) = prompt_endpoint(&gw, "amplify", json!({"variables": {"text": "ab"}})).await;
    assert_eq!(s, 200, "{v}");
    // 60 KB written 2000 times would be 120 MB of prompt.
    let big = "x".repeat(60_000);
    let (s, _, v) = prompt_endpoint(&gw, "amplify", json!({"variables": {"text": big}})).await;
    assert_eq!(s, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("execution budget") && msg.contains("MiB"),
        "{msg}"
    );

    let (s, _, v) = prompt_endpoint(&gw, "repeat", json!({"variables": {"n": 1000}})).await;
    assert_eq!(s, 200, "{v}");
    for vars in [
        json!({"n": 100_000_000}),
        json!({"n": -100_000_000}),
        json!({"n": 1, "rows": [5, 100_000_000]}),
        json!({"n": 1, "rows": [1e8]}),
    ] {
        let (s, _, v) = prompt_endpoint(&gw, "repeat", json!({"variables": vars})).await;
        assert_eq!(s, 400, "{vars} {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("1000000"), "{msg}");
    }
    let r = client().get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// The watcher reloads for the files the configuration reads, and only when they
/// changed: a log file written into the config folder (or a prompt file saved
/// unchanged) reloads nothing.
#[tokio::test]
async fn writes_that_do_not_change_the_config_cause_no_reload() {
    let (_fake, gw) = gateway_with(&[("greeting.yaml", GREETING)]).await;
    let _watcher = gw.reloader.watch(Duration::from_millis(50)).unwrap();
    let reloads = |st: &Value| {
        (
            st["config"]["reloads"]["succeeded"].as_u64().unwrap(),
            st["config"]["reloads"]["failed"].as_u64().unwrap(),
        )
    };
    let dir = gw.dir.path().to_owned();
    for i in 0..20 {
        std::fs::write(dir.join("promptgate.log"), format!("line {i}\n")).unwrap();
        std::fs::write(dir.join("prompts/notes.txt"), format!("note {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Saved again with the same bytes.
    std::fs::write(dir.join("prompts/greeting.yaml"), GREETING).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(reloads(&gw.admin_status().await), (0, 0));
    // A real change still reloads.
    std::fs::write(
        dir.join("prompts/greeting.yaml"),
        GREETING.replace("production: 1", "production: 2"),
    )
    .unwrap();
    wait_for_version(&gw, "2").await;
    assert_eq!(reloads(&gw.admin_status().await), (1, 0));
}

/// The binary started from its config folder with the default, relative
/// `--config promptgate.yaml` still follows file changes.
#[tokio::test]
async fn the_watcher_follows_a_relative_config_path() {
    use std::io::{BufRead, BufReader};
    let fake = spawn_fake().await;
    let (g, p) = fake_config(&fake, "");
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &g, &p);
    std::fs::write(dir.path().join("prompts/greeting.yaml"), GREETING).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .current_dir(dir.path())
        .args(["serve", "--config", "promptgate.yaml"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("promptgate listening on http://").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    let version = || async {
        let r = client()
            .post(format!(
                "http://{addr}/v1/prompts/greeting/chat/completions"
            ))
            .json(&json!({"variables": {"name": "a"}}))
            .send()
            .await
            .unwrap();
        r.headers()["x-promptgate-prompt-version"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(version().await, "1");
    std::fs::write(
        dir.path().join("prompts/greeting.yaml"),
        GREETING.replace("production: 1", "production: 2"),
    )
    .unwrap();
    let start = Instant::now();
    let mut seen = String::new();
    while start.elapsed() < Duration::from_secs(10) {
        seen = version().await;
        if seen == "2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen, "2", "the change was picked up");
}
