//! Gateway keys end to end: authentication on both doors and both headers
//! (each refusal with its code, in the client's dialect, never naming the
//! key), `auth: off`, route and prompt globs (chat, embeddings, the prompt
//! endpoint, retriever search), the key id as cache tenant, split subject and
//! metric label, hot reload of `keys/`, `GET /admin/keys`, and the binary's
//! `keys new` / `keys list` / `check`.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;
use promptgate::governance::keys::sha256_hex;
use serde_json::{json, Value};

const TEAM_A: &str = "pg-team-a-secret-0001";
const TEAM_B: &str = "pg-team-b-secret-0002";
const NARROW: &str = "pg-narrow-secret-0003";
const EXPIRED: &str = "pg-expired-secret-0004";
const DISABLED: &str = "pg-disabled-secret-0005";
const SECRETS: [&str; 5] = [TEAM_A, TEAM_B, NARROW, EXPIRED, DISABLED];

fn keys_file() -> String {
    format!(
        concat!(
            "team-a:\n  sha256: {a}\n  owner: ann\n  team: search\n  limits: {{rpm: 100}}\n",
            "  budget: {{daily: {{tokens: 1000}}}}\n  expires: 2999-01-01T00:00:00Z\n",
            "team-b:\n  sha256: {b}\n  owner: bob\n",
            "narrow:\n  sha256: {n}\n  routes: [\"fake-c?at\", \"emb*\"]\n  prompts: [\"allowed-*\"]\n",
            "old:\n  sha256: {e}\n  expires: 2020-01-01T00:00:00Z\n",
            "off:\n  sha256: {d}\n  enabled: false\n",
        ),
        a = sha256_hex(TEAM_A.as_bytes()),
        b = sha256_hex(TEAM_B.as_bytes()),
        n = sha256_hex(NARROW.as_bytes()),
        e = sha256_hex(EXPIRED.as_bytes()),
        d = sha256_hex(DISABLED.as_bytes()),
    )
}

const ROUTES: &str = concat!(
    "  cached:\n    provider: fake\n    model: chat\n    cache: {mode: on}\n",
    "  emb:\n    provider: fake\n    model: text-embedding\n",
    "  by-key:\n    split:\n      subject: key\n      arms:\n",
    "        - {name: one, weight: 1, provider: fake, model: chat}\n",
    "        - {name: two, weight: 1, provider: sandbox, model: echo}\n",
);

const PROMPT: &str = "labels: {production: 1}\nversions:\n  1:\n    route: fake-chat\n    messages: [{role: user, content: \"hi\"}]\n";

async fn setup(mode: &str) -> (Fake, Gw) {
    let fake = spawn_fake().await;
    let (mut g, p) = fake_config(&fake, ROUTES);
    g.push_str(&format!("auth: {{mode: {mode}}}\n"));
    let keys = keys_file();
    let gw = spawn_gateway_with_files(
        &g,
        &p,
        &[
            ("keys/team.yaml", keys.as_str()),
            ("prompts/allowed-one.yaml", PROMPT),
            ("prompts/other.yaml", PROMPT),
            (
                "retrievers/lex.yaml",
                "kind: local\npath: index/lex.db\nmode: lexical\n",
            ),
            (
                "retrievers/dense.yaml",
                "kind: local\npath: index/dense.db\nmode: dense\nembedding: {route: emb}\n",
            ),
        ],
    )
    .await;
    (fake, gw)
}

async fn post(
    gw: &Gw,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut rb = client().post(gw.url(path)).json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    (
        r.status().as_u16(),
        r.headers().clone(),
        r.text().await.unwrap(),
    )
}

/// A chat completion on `route` with `headers`.
async fn chat(
    gw: &Gw,
    route: &str,
    stream: bool,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    chat_with(gw, &chat_body(route, stream), headers).await
}

async fn chat_with(
    gw: &Gw,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    post(gw, "/v1/chat/completions", body, headers).await
}

/// A search for `x` in retriever `name` with `headers`.
async fn search(
    gw: &Gw,
    name: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let path = format!("/v1/retrievers/{name}/search");
    post(gw, &path, &json!({"query": "x"}), headers).await
}

fn bearer(k: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {k}"))
}

fn anthropic_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 16, "stream": stream,
           "messages": [{"role": "user", "content": "Say hello."}]})
}

/// No secret, nor its SHA-256, in `text`.
fn assert_no_secret(text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "a key leaked: {text}");
        assert!(
            !text.contains(&sha256_hex(s.as_bytes())),
            "a key hash leaked: {text}"
        );
        // Nor a recognisable part of it.
        assert!(!text.contains(&s[3..14]), "part of a key leaked: {text}");
    }
}

#[tokio::test]
async fn required_mode_refuses_each_bad_key_with_its_code_in_the_clients_dialect() {
    let (fake, gw) = setup("required").await;
    let cases: [(Option<(&str, String)>, &str); 6] = [
        (None, "missing_api_key"),
        (Some(("authorization", "Bearer ".into())), "missing_api_key"),
        (
            Some(("authorization", "Basic dXNlcjpwYXNz".into())),
            "missing_api_key",
        ),
        (Some(bearer("pg-not-a-configured-key")), "invalid_api_key"),
        (Some(("x-api-key", EXPIRED.into())), "key_expired"),
        (Some(bearer(DISABLED)), "key_disabled"),
    ];
    for (header, code) in cases {
        let hs: Vec<(&str, &str)> = header.iter().map(|(n, v)| (*n, v.as_str())).collect();
        // OpenAI door.
        let (status, h, body) = chat(&gw, "fake-chat", false, &hs).await;
        assert_eq!(status, 401, "{body}");
        assert_no_secret(&body);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], code, "{body}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(
            v["error"]["request_id"].as_str().unwrap(),
            h["x-request-id"].to_str().unwrap()
        );
        // Anthropic door: its own error shape.
        let (status, h, body) = post(
            &gw,
            "/v1/messages",
            &anthropic_body("fake-chat", false),
            &hs,
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert_no_secret(&body);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["type"], "error", "{body}");
        assert_eq!(v["error"]["type"], "authentication_error", "{body}");
        assert!(body.contains(h["x-request-id"].to_str().unwrap()), "{body}");
        // Embeddings and the model list are behind the key too.
        let (status, _, _) = post(
            &gw,
            "/v1/embeddings",
            &json!({"model": "emb", "input": ["x", "y"]}),
            &hs,
        )
        .await;
        assert_eq!(status, 401);
    }
    let models = client().get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 401);
    // Health and metrics stay open.
    assert_eq!(
        client()
            .get(gw.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        fake.requests().is_empty(),
        "a refused request reached the provider"
    );
    let m = gw.metrics().await;
    assert!(
        m.contains("promptgate_auth_failures_total{reason=\"missing_api_key\"}"),
        "{m}"
    );
    assert!(
        m.contains("promptgate_auth_failures_total{reason=\"key_expired\"}"),
        "{m}"
    );
    assert_no_secret(&m);
}

#[tokio::test]
async fn a_good_key_is_accepted_in_either_header_on_either_door_and_never_forwarded() {
    let (fake, gw) = setup("required").await;
    let a = bearer(TEAM_A);
    let hs = [(a.0, a.1.as_str())];
    for stream in [false, true] {
        let (status, _, body) = chat(&gw, "fake-chat", stream, &hs).await;
        assert_eq!(status, 200, "{body}");
        let (status, _, body) = post(
            &gw,
            "/v1/messages",
            &anthropic_body("fake-chat", stream),
            &[("x-api-key", TEAM_B)],
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    // Bearer on the Anthropic door, x-api-key on the OpenAI door.
    let (status, _, _) = post(
        &gw,
        "/v1/messages",
        &anthropic_body("fake-chat", false),
        &hs,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = chat(&gw, "fake-chat", false, &[("x-api-key", TEAM_A)]).await;
    assert_eq!(status, 200);
    let (status, _, _) = post(
        &gw,
        "/v1/embeddings",
        &json!({"model": "emb", "input": ["x", "y"]}),
        &hs,
    )
    .await;
    assert_eq!(status, 200);
    let models = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(TEAM_A)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    // The upstream sees the gateway's provider key, never the client's key.
    let seen = fake.requests();
    assert_eq!(seen.len(), 7);
    for r in seen {
        for (_, v) in r.headers.iter() {
            assert_no_secret(&String::from_utf8_lossy(v.as_bytes()));
        }
        assert_no_secret(&r.body.to_string());
    }
}

#[tokio::test]
async fn mode_off_serves_without_a_key_identifies_known_keys_and_refuses_revoked_ones() {
    let (_fake, gw) = setup("off").await;
    let (status, _, _) = chat(&gw, "fake-chat", false, &[]).await;
    assert_eq!(status, 200);
    // A key the gateway does not know (a provider key, say) is anonymous.
    let (status, _, _) = chat(
        &gw,
        "fake-chat",
        false,
        &[("authorization", "Bearer sk-provider-key")],
    )
    .await;
    assert_eq!(status, 200);
    // A known key identifies its caller: its route restrictions apply.
    let n = bearer(NARROW);
    let (status, _, body) = chat(&gw, "fake-json", false, &[(n.0, n.1.as_str())]).await;
    assert_eq!(status, 403, "{body}");
    let (status, _, _) = chat(&gw, "fake-chat", false, &[(n.0, n.1.as_str())]).await;
    assert_eq!(status, 200);
    // A key the operator turned off is refused even here.
    let (status, _, body) = chat(&gw, "fake-chat", false, &[("x-api-key", DISABLED)]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("key_disabled"));
    let m = gw.metrics().await;
    assert!(
        m.contains(
            "promptgate_key_requests_total{key=\"narrow\",route=\"fake-chat\",status=\"200\"} 1"
        ),
        "{m}"
    );
    assert!(
        m.contains(
            "promptgate_key_requests_total{key=\"narrow\",route=\"fake-json\",status=\"403\"} 1"
        ),
        "{m}"
    );
    assert!(
        !m.contains("key=\"anonymous\""),
        "anonymous requests are not counted per key: {m}"
    );
}

#[tokio::test]
async fn routes_and_prompts_are_limited_by_globs_on_every_endpoint() {
    let (fake, gw) = setup("required").await;
    let n = bearer(NARROW);
    let hs = [(n.0, n.1.as_str())];
    let forbidden = |status: u16, body: &str, what: &str| {
        assert_eq!(status, 403, "{body}");
        let v: Value = serde_json::from_str(body).unwrap();
        let err = &v["error"];
        assert!(err["message"].as_str().unwrap().contains(what), "{body}");
        assert!(
            err["message"].as_str().unwrap().contains("narrow"),
            "{body}"
        );
        assert_no_secret(body);
    };
    // `fake-c?at` matches fake-chat only.
    let (s, _, b) = chat(&gw, "fake-chat", true, &hs).await;
    assert_eq!(s, 200, "{b}");
    let (s, _, b) = chat(&gw, "fake-json", false, &hs).await;
    forbidden(s, &b, "route `fake-json`");
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["error"]["type"],
        "permission_error"
    );
    let (s, _, b) = post(&gw, "/v1/messages", &anthropic_body("cached", false), &hs).await;
    assert_eq!(s, 403);
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["error"]["type"], "permission_error", "{b}");
    // Embeddings: `emb*`.
    let (s, _, b) = post(
        &gw,
        "/v1/embeddings",
        &json!({"model": "emb", "input": ["x", "y"]}),
        &hs,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // Prompts: `allowed-*`, on the prompt endpoint and the chat extension.
    let (s, _, b) = post(
        &gw,
        "/v1/prompts/allowed-one/chat/completions",
        &json!({}),
        &hs,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, _, b) = post(&gw, "/v1/prompts/other/chat/completions", &json!({}), &hs).await;
    forbidden(s, &b, "prompt `other`");
    let (s, _, b) = chat_with(
        &gw,
        &json!({"model": "fake-chat", "messages": [], "prompt": {"id": "other"}}),
        &hs,
    )
    .await;
    forbidden(s, &b, "prompt `other`");
    // Retriever search: allowed when the key may use the embedding route; a
    // lexical retriever needs any route. (Neither index exists: past the
    // check the search fails for that reason, not for the key.)
    let (s, _, b) = search(&gw, "dense", &hs).await;
    assert_ne!(s, 403, "{b}");
    let (s, _, b) = search(&gw, "lex", &hs).await;
    assert_ne!(s, 403, "{b}");
    let before = fake.requests().len();
    // team-b may use every route; the other way round is covered above.
    let b_ = bearer(TEAM_B);
    let (s, _, b) = chat(&gw, "fake-json", false, &[(b_.0, b_.1.as_str())]).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(fake.requests().len(), before + 1);
    // The forbidden requests reached no provider.
    assert_eq!(
        fake.requests()
            .iter()
            .filter(|r| r.body["model"] == "json")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_key_that_may_use_no_route_may_search_no_retriever() {
    let fake = spawn_fake().await;
    let (mut g, p) = fake_config(&fake, ROUTES);
    g.push_str("auth: {mode: required}\n");
    let keys = format!(
        "nothing:\n  sha256: {}\n  routes: []\nembeds-not:\n  sha256: {}\n  routes: [\"fake-*\"]\n",
        sha256_hex(TEAM_A.as_bytes()),
        sha256_hex(TEAM_B.as_bytes())
    );
    let gw = spawn_gateway_with_files(
        &g,
        &p,
        &[
            ("keys/k.yaml", keys.as_str()),
            (
                "retrievers/lex.yaml",
                "kind: local\npath: index/lex.db\nmode: lexical\n",
            ),
            (
                "retrievers/dense.yaml",
                "kind: local\npath: index/dense.db\nmode: dense\nembedding: {route: emb}\n",
            ),
        ],
    )
    .await;
    let a = bearer(TEAM_A);
    let (s, _, b) = search(&gw, "lex", &[(a.0, a.1.as_str())]).await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("retriever `lex`"), "{b}");
    let (s, _, b) = chat(&gw, "fake-chat", false, &[(a.0, a.1.as_str())]).await;
    assert_eq!(s, 403, "{b}");
    let bb = bearer(TEAM_B);
    let (s, _, b) = search(&gw, "dense", &[(bb.0, bb.1.as_str())]).await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("embedding route `emb`"), "{b}");
    let (s, _, b) = search(&gw, "lex", &[(bb.0, bb.1.as_str())]).await;
    assert_ne!(s, 403, "{b}");
}

#[tokio::test]
async fn two_keys_never_share_cache_entries_and_one_key_shares_across_headers() {
    let (fake, gw) = setup("required").await;
    let a = bearer(TEAM_A);
    let b = bearer(TEAM_B);
    let body = chat_body("cached", false);
    let (_, h, _) = chat_with(&gw, &body, &[(a.0, a.1.as_str())]).await;
    assert_eq!(h["x-promptgate-cache"], "miss");
    let (_, h, _) = chat_with(&gw, &body, &[(b.0, b.1.as_str())]).await;
    assert_eq!(
        h["x-promptgate-cache"], "miss",
        "team-b was served team-a's entry"
    );
    // The tenant is the key id, not the header it came in.
    let (_, h, _) = chat_with(&gw, &body, &[("x-api-key", TEAM_A)]).await;
    assert_eq!(h["x-promptgate-cache"], "hit");
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn a_split_on_key_keeps_each_key_on_one_arm() {
    let fake = spawn_fake().await;
    let (mut g, p) = fake_config(&fake, ROUTES);
    g.push_str("auth: {mode: required}\n");
    // Twelve keys: with two arms, each key must stay on its arm, and both
    // arms must be used.
    let secrets: Vec<String> = (0..12).map(|i| format!("pg-split-key-{i:04}")).collect();
    let mut keys = String::new();
    for (i, s) in secrets.iter().enumerate() {
        keys.push_str(&format!("k{i}:\n  sha256: {}\n", sha256_hex(s.as_bytes())));
    }
    let gw = spawn_gateway_with_files(&g, &p, &[("keys/split.yaml", keys.as_str())]).await;
    let mut arms = std::collections::BTreeSet::new();
    for s in &secrets {
        let mut first: Option<String> = None;
        for header in ["authorization", "x-api-key"] {
            for _ in 0..3 {
                let v = if header == "authorization" {
                    format!("Bearer {s}")
                } else {
                    s.clone()
                };
                let (status, h, body) = chat(&gw, "by-key", false, &[(header, v.as_str())]).await;
                assert_eq!(status, 200, "{body}");
                let arm = h["x-promptgate-arm"].to_str().unwrap().to_owned();
                match &first {
                    None => first = Some(arm),
                    Some(f) => assert_eq!(f, &arm, "a key moved between arms"),
                }
            }
        }
        arms.insert(first.unwrap());
    }
    assert_eq!(arms.len(), 2, "{arms:?}");
}

#[tokio::test]
async fn keys_are_reloaded_and_a_removed_key_stops_working() {
    let (_fake, gw) = setup("required").await;
    let fresh = "pg-fresh-secret-0099";
    let hs = [("x-api-key", fresh)];
    let (s, _, _) = chat(&gw, "fake-chat", false, &hs).await;
    assert_eq!(s, 401);
    let path = gw.dir.path().join("keys/fresh.yaml");
    std::fs::write(
        &path,
        format!("fresh:\n  sha256: {}\n", sha256_hex(fresh.as_bytes())),
    )
    .unwrap();
    let (status, body) = gw.admin_reload().await;
    assert_eq!(status, 200, "{body}");
    let (s, _, b) = chat(&gw, "fake-chat", false, &hs).await;
    assert_eq!(s, 200, "{b}");
    // A broken keys file is refused as a whole; the old keys stay.
    std::fs::write(&path, "fresh:\n  sha256: not-hex\n").unwrap();
    let (status, body) = gw.admin_reload().await;
    assert_ne!(status, 200, "{body}");
    assert!(body.to_string().contains("fresh.sha256"), "{body}");
    let (s, _, _) = chat(&gw, "fake-chat", false, &hs).await;
    assert_eq!(s, 200);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(gw.admin_reload().await.0, 200);
    let (s, _, _) = chat(&gw, "fake-chat", false, &hs).await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn admin_lists_keys_with_limits_and_usage_but_never_a_hash() {
    let (_fake, gw) = setup("required").await;
    let r = client()
        .get(gw.admin_url("/admin/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the admin key guards it");
    let r = client()
        .get(gw.admin_url("/admin/keys"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert_no_secret(&text);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["mode"], "required");
    let keys = v["keys"].as_array().unwrap();
    let ids: Vec<&str> = keys.iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["narrow", "off", "old", "team-a", "team-b"]);
    let a = &keys[3];
    assert_eq!(a["owner"], "ann");
    assert_eq!(a["team"], "search");
    assert_eq!(a["limits"]["rpm"], 100);
    assert_eq!(a["budget"]["daily"]["tokens"], 1000);
    assert_eq!(a["expires"], "2999-01-01T00:00:00Z");
    assert_eq!(a["expired"], false);
    assert_eq!(a["enabled"], true);
    assert_eq!(a["routes"], json!(["*"]));
    assert!(a
        .get("usage")
        .is_some_and(|u| u.get("limits").is_some() && u.get("spend").is_some()));
    assert!(a.get("sha256").is_none());
    assert_eq!(keys[0]["routes"], json!(["fake-c?at", "emb*"]));
    assert_eq!(keys[1]["enabled"], false);
    assert_eq!(keys[2]["expired"], true);
    let status = gw.admin_status().await;
    assert_eq!(status["keys"]["mode"], "required");
    assert_eq!(status["keys"]["count"], 5);
    assert_eq!(status["keys"]["usable"], 3);
    assert_eq!(status["keys"]["expired"], 1);
    // …and each key's limits and spend, as in /admin/keys.
    let listed = status["keys"]["list"].as_array().unwrap();
    assert_eq!(listed.len(), 5);
    assert_eq!(listed[3]["id"], "team-a");
    assert_eq!(listed[3]["limits"]["rpm"], 100);
    assert!(listed[3]["usage"].get("spend").is_some(), "{status}");
    assert_no_secret(&status.to_string());
}

// === the binary ===

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_promptgate"))
}

/// A gateway file `gateway` in `dir` with the sandbox provider (model `echo`).
fn sandbox_config(dir: &std::path::Path, gateway: &str) {
    write_config(
        dir,
        gateway,
        &[(
            "sandbox.yaml".into(),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n".into(),
        )],
    );
    std::fs::create_dir_all(dir.join("keys")).unwrap();
}

/// `promptgate check` on the config in `dir`.
fn check(dir: &std::path::Path) -> std::process::Output {
    bin()
        .args(["check", "--config"])
        .arg(dir.join("promptgate.yaml"))
        .output()
        .unwrap()
}

#[test]
fn keys_new_prints_a_fresh_key_once_and_an_entry_that_loads() {
    let run = || {
        let out = bin()
            .args([
                "keys",
                "new",
                "--id",
                "team-a",
                "--owner",
                "Ann: \"ops\"",
                "--team",
                "search",
                "--routes",
                "chat*, embed",
                "--prompts",
                "support-*",
                "--expires",
                "2027-01-01T00:00:00Z",
                "--rpm",
                "60",
                "--tpm",
                "10000",
                "--concurrency",
                "4",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (first, stderr) = run();
    let (second, _) = run();
    let key = first.lines().next().unwrap();
    assert!(key.starts_with("pg-") && key.len() == 46, "{key}");
    assert_ne!(key, second.lines().next().unwrap(), "keys must be fresh");
    assert_eq!(first.matches(key).count(), 1, "the key is printed once");
    assert!(!stderr.contains(key));
    assert!(
        first.contains(&format!("sha256: {}", sha256_hex(key.as_bytes()))),
        "{first}"
    );
    // The entry, pasted into a keys file, is a valid key the gateway accepts.
    let entry: String = first.lines().skip(1).map(|l| format!("{l}\n")).collect();
    let dir = tempfile::tempdir().unwrap();
    sandbox_config(dir.path(), "listen: 127.0.0.1:0\nauth: {mode: required}\nroutes:\n  chat-x:\n    provider: sandbox\n    model: echo\n");
    std::fs::write(dir.path().join("keys/team.yaml"), &entry).unwrap();
    let cfg = promptgate::config::load(&dir.path().join("promptgate.yaml")).unwrap();
    let k = &cfg.keys["team-a"];
    assert_eq!(k.owner.as_deref(), Some("Ann: \"ops\""));
    assert_eq!(k.routes, ["chat*", "embed"]);
    assert_eq!(k.prompts, ["support-*"]);
    assert_eq!(k.limits.rpm, Some(60));
    assert_eq!(k.limits.tpm, Some(10000));
    assert_eq!(k.limits.concurrency, Some(4));
    assert_eq!(k.expires, Some(1_798_761_600));
    // `keys list` shows it without hash or key.
    let out = bin()
        .args(["keys", "list", "--config"])
        .arg(dir.path().join("promptgate.yaml"))
        .output()
        .unwrap();
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(listed.contains("auth: required — 1 keys"), "{listed}");
    assert!(
        listed.contains("team-a  owner: Ann: \"ops\"  team: search  expires: 2027-01-01T00:00:00Z"),
        "{listed}"
    );
    assert!(!listed.contains(&sha256_hex(key.as_bytes())) && !listed.contains(key));
}

#[test]
fn keys_new_refuses_bad_input_without_printing_a_key() {
    for args in [
        &["--id", "bad id"][..],
        &["--id", "a", "--expires", "next tuesday"],
        &["--id", "a", "--rpm", "0"],
    ] {
        let out = bin().args(["keys", "new"]).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(
            out.stdout.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("error:"));
    }
}

#[test]
fn check_reports_bad_keys_files_precisely() {
    let dir = tempfile::tempdir().unwrap();
    sandbox_config(
        dir.path(),
        "listen: 127.0.0.1:0\nroutes:\n  chat:\n    provider: sandbox\n    model: echo\n",
    );
    let good = sha256_hex(b"pg-one");
    std::fs::write(
        dir.path().join("keys/a.yaml"),
        format!(concat!(
            "short:\n  sha256: abc123\n",
            "clear:\n  sha256: pg-this-is-the-key-in-clear\n",
            "one:\n  sha256: {g}\n",
            "same-key:\n  sha256: {g}\n",
            "when:\n  sha256: {h}\n  expires: next year\n",
            "fallback:\n  sha256: {i}\n  budget: {{daily: {{tokens: 10}}, fallback_route: cheap}}\n",
            "\"bad id\":\n  sha256: {j}\n",
        ), g = good, h = sha256_hex(b"2"), i = sha256_hex(b"3"), j = sha256_hex(b"4")),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("keys/b.yaml"),
        format!("one:\n  sha256: {}\n", sha256_hex(b"5")),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("keys/c.yaml"),
        "x:\n  sha256: 00\n  colour: blue\n",
    )
    .unwrap();
    let out = check(dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let has = |file: &str, field: &str, what: &str| {
        assert!(
            err.lines()
                .any(|l| l.contains(file) && l.contains(field) && l.contains(what)),
            "no `{file}` / `{field}` / `{what}` in:\n{err}"
        );
    };
    has("a.yaml:2", "short.sha256", "64 hex digits");
    has("a.yaml:4", "clear.sha256", "64 hex digits");
    has("a.yaml:8", "same-key.sha256", "already key `one`");
    has("a.yaml:11", "when.expires", "next year");
    has(
        "a.yaml:14",
        "fallback.budget.fallback_route",
        "no route `cheap`",
    );
    has("a.yaml:15", "bad id", "key id must be");
    has("b.yaml:1", "one", "also defined in");
    has("c.yaml", "colour", "unknown field");
    // A value written where the hash belongs is not echoed (it may be the key).
    assert!(!err.contains("pg-this-is-the-key-in-clear"), "{err}");
}

#[test]
fn serve_states_the_auth_mode_and_warns_when_off_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    sandbox_config(
        dir.path(),
        "listen: 127.0.0.1:0\nroutes:\n  chat:\n    provider: sandbox\n    model: echo\n",
    );
    let config = dir.path().join("promptgate.yaml");
    let stderr_of = |listen: &str| {
        let mut child = bin()
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", listen, "--admin-listen", "127.0.0.1:0"])
            .env("PROMPTGATE_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        // Read until the auth line (or the warning after it) arrives.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut all = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
                let _ = tx.send(String::from_utf8_lossy(&all).into_owned());
            }
        });
        let mut text = String::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            match rx.recv_timeout(std::time::Duration::from_millis(200)) {
                Ok(t) => text = t,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => break,
            }
            if text.contains("auth: off")
                && (listen.starts_with("127.") || text.contains("auth is off and"))
            {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        text
    };
    let local = stderr_of("127.0.0.1:0");
    assert_eq!(local.matches("auth: off").count(), 1, "{local}");
    assert!(!local.contains("auth is off and"), "{local}");
    let open = stderr_of("0.0.0.0:0");
    assert!(open.contains("auth: off"), "{open}");
    assert!(
        open.contains("auth is off and the gateway listens beyond this machine"),
        "{open}"
    );
}

#[tokio::test]
async fn no_key_or_hash_appears_in_the_log_even_at_debug() {
    let dir = tempfile::tempdir().unwrap();
    sandbox_config(dir.path(), "listen: 127.0.0.1:0\nauth: {mode: required}\nroutes:\n  chat:\n    provider: sandbox\n    model: echo\n  other:\n    provider: sandbox\n    model: echo\n");
    let mut keys = keys_file();
    keys = keys.replace("\"fake-c?at\"", "\"chat\"");
    std::fs::write(dir.path().join("keys/team.yaml"), &keys).unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let gw = GatewayProcess::start_limited(
        &dir.path().join("promptgate.yaml"),
        &[("PROMPTGATE_LOG", "debug")],
        1024,
        log.clone(),
    );
    let send = |route: &str, stream: bool, header: (&str, String)| {
        client()
            .post(format!("{}/v1/chat/completions", gw.base))
            .header(header.0, header.1)
            .json(&chat_body(route, stream))
            .send()
    };
    for stream in [false, true] {
        for s in SECRETS {
            for h in [bearer(s), ("x-api-key", s.to_owned())] {
                let r = send("chat", stream, h).await.unwrap();
                let status = r.status().as_u16();
                let body = r.text().await.unwrap();
                assert_no_secret(&body);
                let expected = match s {
                    TEAM_A | TEAM_B | NARROW => 200,
                    _ => 401,
                };
                assert_eq!(status, expected, "{body}");
            }
        }
        let r = send("other", stream, bearer(NARROW)).await.unwrap();
        assert_eq!(r.status(), 403);
    }
    // A keys file that is refused on reload: its problems are logged.
    std::fs::write(
        dir.path().join("keys/broken.yaml"),
        format!("copy:\n  sha256: {}\n", sha256_hex(TEAM_A.as_bytes())),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("keys/clear.yaml"),
        format!("clear:\n  sha256: {TEAM_B}\n"),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("already key"))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(gw);
    let log = log.lock().unwrap().join("\n");
    assert!(
        log.contains("the same key is already key `copy`"),
        "the refused reload was not logged:\n{log}"
    );
    assert!(log.contains("clear.sha256"), "{log}");
    assert!(log.contains("auth: required"), "{log}");
    assert_no_secret(&log);
}

#[test]
fn check_states_the_auth_mode_and_notes_globs_that_match_nothing() {
    let dir = tempfile::tempdir().unwrap();
    sandbox_config(dir.path(), "listen: 127.0.0.1:0\nauth: {mode: required}\nroutes:\n  chat-fast:\n    provider: sandbox\n    model: echo\n");
    std::fs::write(
        dir.path().join("keys/k.yaml"),
        format!(
            "typo:\n  sha256: {}\n  routes: [\"chat-*\", \"chta*\"]\n  prompts: [\"support\"]\n",
            sha256_hex(b"k")
        ),
    )
    .unwrap();
    let out = check(dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("auth: required — 1 gateway keys"),
        "{stdout}"
    );
    assert!(
        stdout.contains("k.yaml: key `typo`: route pattern `chta*` matches no configured route"),
        "{stdout}"
    );
    assert!(
        stdout.contains("key `typo`: prompt pattern `support` matches no configured prompt"),
        "{stdout}"
    );
    assert!(!stdout.contains("`chat-*`"), "{stdout}");
}
