//! `deploy/`: the signals the alert rules and the dashboard read, the rules
//! themselves under `promtool`, a real Prometheus scraping the real binary
//! (every rule and dashboard expression evaluated against it, every metric
//! they name exported by the gateway), and the Kubernetes manifests validated
//! offline with the gateway's ConfigMaps checked by `promptgate check`.
//!
//! Prometheus, promtool and kubernetes-validate are real peers: missing, the
//! tests that need them skip with a note, and fail under `CI=true`.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

#[path = "common/process.rs"]
mod process;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::peers::{free_port, required_tool, start_prometheus, venv_bin, yaml_documents};
use common::*;
use serde_json::Value;
use sha2::Digest;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sha(k: &str) -> String {
    sha2::Sha256::digest(k.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const TEAM_KEY: &str = "pg-test-deploy-team-0123456789";

// === the gauges computed at scrape time ===

/// `promptgate_route_targets{,_available}`: every route's targets and those
/// that can take a request now (provider configured and not drained, breaker
/// not open), kept current across drains and reloads; a removed route's
/// series goes. `promptgate_key_budget` / `promptgate_key_spend`: each
/// budget of each key with the spend counted against it. A rejected reload
/// notes its time after the last success.
#[tokio::test]
async fn scrape_time_gauges_follow_targets_budgets_and_reloads() {
    let gateway = |with_dead: bool| {
        format!(
            "listen: 127.0.0.1:0\nroutes:\n  up:\n    provider: sandbox\n    model: echo\n  mixed:\n    targets:\n      - {{provider: keyless, model: x}}\n      - {{provider: sandbox, model: echo}}\n{}",
            if with_dead {
                "  dead:\n    provider: keyless\n    model: x\n"
            } else {
                ""
            }
        )
    };
    let providers = vec![
        (
            "sandbox.yaml".to_string(),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\nprices:\n  currency: USD\n  models:\n    \"*\": {input: 1000, output: 1000}\n".to_string(),
        ),
        (
            "keyless.yaml".to_string(),
            "kind: openai\nbase_url: http://127.0.0.1:9/v1\napi_key_env: PROMPTGATE_TEST_UNSET_KEY\n"
                .to_string(),
        ),
    ];
    let keys = format!(
        "team:\n  sha256: {}\n  budget:\n    daily: {{tokens: 1000}}\n    monthly: {{cost: 5}}\nfree:\n  sha256: {}\n",
        sha(TEAM_KEY),
        sha("pg-test-deploy-free-0123456789")
    );
    let gw =
        spawn_gateway_with_files(&gateway(true), &providers, &[("keys/team.yaml", &keys)]).await;

    let m = gw.metrics().await;
    for (route, targets, available) in [("up", 1.0, 1.0), ("mixed", 2.0, 1.0), ("dead", 1.0, 0.0)] {
        assert_eq!(
            sample(
                &m,
                &format!("promptgate_route_targets{{route=\"{route}\"}}")
            ),
            Some(targets),
            "{m}"
        );
        assert_eq!(
            sample(
                &m,
                &format!("promptgate_route_targets_available{{route=\"{route}\"}}")
            ),
            Some(available),
            "{m}"
        );
    }
    let series = |name: &str, period: &str, unit: &str| {
        format!("{name}{{key=\"team\",period=\"{period}\",unit=\"{unit}\"}}")
    };
    assert_eq!(
        sample(&m, &series("promptgate_key_budget", "daily", "tokens")),
        Some(1000.0)
    );
    assert_eq!(
        sample(&m, &series("promptgate_key_budget", "monthly", "cost")),
        Some(5.0)
    );
    assert_eq!(
        sample(&m, &series("promptgate_key_spend", "daily", "tokens")),
        Some(0.0)
    );
    assert!(
        !m.contains("promptgate_key_budget{key=\"free\""),
        "a key without a budget has no budget series: {m}"
    );
    assert!(
        !m.contains(&series("promptgate_key_budget", "monthly", "tokens")),
        "a budget without a token limit has no token series: {m}"
    );

    // A request of the key: its tokens and cost are counted against the budgets.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(TEAM_KEY)
        .json(&chat_body("up", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let total = body["usage"]["total_tokens"].as_f64().unwrap();
    assert!(total > 0.0);
    let m = eventually_metrics(&gw, |m| {
        sample(m, &series("promptgate_key_spend", "daily", "tokens")) == Some(total)
    })
    .await;
    let cost = sample(&m, &series("promptgate_key_spend", "monthly", "cost")).unwrap();
    assert!(cost > 0.0 && cost < 5.0, "{m}");

    // Draining the sandbox takes the routes' last usable target away.
    let r = client()
        .post(gw.admin_url("/admin/providers/sandbox/drain"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let m = gw.metrics().await;
    assert_eq!(
        sample(&m, "promptgate_route_targets_available{route=\"up\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "promptgate_route_targets_available{route=\"mixed\"}"),
        Some(0.0),
        "{m}"
    );
    let r = client()
        .post(gw.admin_url("/admin/providers/sandbox/enable"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A reload without route `dead`: its series are gone, the others stay.
    assert_eq!(
        sample(
            &m,
            "promptgate_config_last_reload_failure_timestamp_seconds"
        ),
        Some(0.0),
        "no reload was rejected yet: {m}"
    );
    assert_eq!(
        sample(&m, "promptgate_config_last_reload_successful"),
        Some(1.0),
        "{m}"
    );
    std::fs::write(gw.config_path(), gateway(false)).unwrap();
    assert_eq!(gw.admin_reload().await.0, 200);
    let m = gw.metrics().await;
    assert!(!m.contains("route=\"dead\""), "{m}");
    assert_eq!(
        sample(&m, "promptgate_route_targets_available{route=\"up\"}"),
        Some(1.0),
        "{m}"
    );

    // A rejected reload is dated after the last success.
    std::fs::write(gw.config_path(), "routes: [not, a, map]\n").unwrap();
    assert_ne!(gw.admin_reload().await.0, 200);
    let m = gw.metrics().await;
    let failed = sample(
        &m,
        "promptgate_config_last_reload_failure_timestamp_seconds",
    )
    .unwrap();
    let succeeded = sample(
        &m,
        "promptgate_config_last_reload_success_timestamp_seconds",
    )
    .unwrap();
    assert!(failed > 0.0 && failed >= succeeded, "{m}");
    // The flag the alert reads has no one-second blind spot.
    assert_eq!(
        sample(&m, "promptgate_config_last_reload_successful"),
        Some(0.0),
        "{m}"
    );
    // A good file again: the flag comes back.
    std::fs::write(gw.config_path(), gateway(false)).unwrap();
    assert_eq!(gw.admin_reload().await.0, 200);
    let m = gw.metrics().await;
    assert_eq!(
        sample(&m, "promptgate_config_last_reload_successful"),
        Some(1.0),
        "{m}"
    );
}

/// `/metrics` until `ok` holds of it (spend is recorded when the response's
/// body is dropped, just after the client has read it).
async fn eventually_metrics(gw: &Gw, ok: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let m = gw.metrics().await;
        if ok(&m) {
            return m;
        }
        assert!(Instant::now() < until, "the metrics never matched: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === the alert rules under promtool ===

/// `promtool check rules` and `promtool test rules` pass, and the unit tests
/// fire every alert the rules define (and keep at least one silent).
#[test]
fn alert_rules_pass_promtool_and_every_alert_is_fired_by_a_unit_test() {
    let Some(promtool) = required_tool("promtool") else {
        return;
    };
    let dir = repo().join("deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yaml"][..],
        &["test", "rules", "alerts_test.yaml"],
        &["check", "config", "prometheus.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = &yaml_documents(&dir.join("alerts.yaml"))[0];
    let alerts: BTreeSet<String> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| {
            assert!(r["labels"]["severity"].is_string(), "{r}");
            assert!(r["annotations"]["summary"].is_string(), "{r}");
            assert!(r["annotations"]["description"].is_string(), "{r}");
            r["alert"].as_str().unwrap().to_owned()
        })
        .collect();
    let tests = &yaml_documents(&dir.join("alerts_test.yaml"))[0];
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .collect();
    let fired: BTreeSet<String> = cases
        .iter()
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .map(|c| c["alertname"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(fired, alerts, "every alert is fired by a unit test");
    assert!(
        cases
            .iter()
            .any(|c| c["exp_alerts"].as_array().is_some_and(Vec::is_empty)),
        "some case shows an alert silent below its threshold"
    );
}

// === a real Prometheus scraping the real binary ===

const SCRAPE_TEAM_KEY: &str = "pg-test-deploy-scrape-team-0123456789";
const SCRAPE_LIMITED_KEY: &str = "pg-test-deploy-scrape-limited-0123456789";

/// A configuration whose traffic makes every series the rules and the
/// dashboard read appear: Redis stores on a port where nothing listens
/// (their failures are counted), the audit log on /dev/full (its drops are
/// counted), a cached route, a fallback chain, a split, a shadow, a stream
/// cut short, a priced sandbox, a budgeted and a limited key, and a provider
/// whose health checks fail.
fn scrape_config(dir: &Path) {
    let dead = free_port();
    let gateway = format!(
        r#"listen: 127.0.0.1:0
limits:
  store: redis
  redis: {{url: "redis://127.0.0.1:{dead}", timeout: 50ms}}
  on_store_error: fail_open
spend:
  store: redis
  redis: {{url: "redis://127.0.0.1:{dead}", timeout: 50ms}}
cache:
  redis: {{url: "redis://127.0.0.1:{dead}", timeout: 50ms}}
audit: {{path: /dev/full}}
routes:
  cached:
    provider: sandbox
    model: echo
    cache: {{mode: on}}
  broken:
    provider: sandbox
    model: overloaded
  cut:
    provider: sandbox
    model: cut
  resilient:
    targets:
      - {{provider: down, model: x}}
      - {{provider: sandbox, model: echo}}
  ab:
    split:
      arms:
        - {{name: a, weight: 50, provider: sandbox, model: echo}}
        - {{name: b, weight: 50, provider: sandbox, model: echo}}
  shadowed:
    provider: sandbox
    model: echo
    shadow:
      targets: [{{provider: sandbox, model: slow}}]
      sample: 1.0
      max_in_flight: 1
"#
    );
    let providers = vec![
        (
            "sandbox.yaml".to_string(),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n    slow: {reply: echo, delay: 700ms}\n    cut: {reply: script, script: [\"one two three four five six\"], cut_after: 2}\n    overloaded: {fail: {status: 503}}\nprices:\n  currency: USD\n  models:\n    \"*\": {input: 1000, output: 1000}\n".to_string(),
        ),
        (
            "down.yaml".to_string(),
            format!(
                "kind: openai\nbase_url: http://127.0.0.1:{dead}/v1\nauth: none\ntimeouts: {{connect: 1s, headers: 1s, idle: 1s, total: 2s}}\n"
            ),
        ),
        // Checked every second, used by no route (so its failed checks open no
        // breaker on the chain above).
        (
            "probed.yaml".to_string(),
            format!(
                "kind: openai\nbase_url: http://127.0.0.1:{dead}/v1\nauth: none\nhealth_check: {{interval: 1s, timeout: 1s}}\n"
            ),
        ),
    ];
    write_config(dir, &gateway, &providers);
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::write(
        dir.join("keys/teams.yaml"),
        format!(
            "team:\n  sha256: {}\n  budget:\n    daily: {{tokens: 10}}\nlimited:\n  sha256: {}\n  limits: {{rpm: 1}}\n",
            sha(SCRAPE_TEAM_KEY),
            sha(SCRAPE_LIMITED_KEY)
        ),
    )
    .unwrap();
}

/// Sends the traffic that makes the series appear.
async fn scrape_traffic(gw: &process::Process) {
    let c = client();
    let chat = |model: &str, stream: bool, key: Option<&str>| {
        let mut r = c
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body(model, stream));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            status
        }
    };
    for _ in 0..2 {
        assert_eq!(chat("cached", false, None).await, 200);
    }
    assert_eq!(chat("broken", false, None).await, 503);
    assert_eq!(chat("cut", true, None).await, 200);
    assert_eq!(chat("resilient", false, None).await, 200);
    assert_eq!(chat("resilient", true, None).await, 200);
    assert_eq!(chat("ab", true, None).await, 200);
    // The first copy keeps the shadow's only slot busy: the second is dropped.
    assert_eq!(chat("shadowed", false, None).await, 200);
    assert_eq!(chat("shadowed", false, None).await, 200);
    // A budget of 10 tokens: the first request crosses it (once its spend is
    // recorded, as its response's body is dropped), the next is refused.
    assert_eq!(chat("ab", false, Some(SCRAPE_TEAM_KEY)).await, 200);
    let spent = "promptgate_key_spend{key=\"team\",period=\"daily\",unit=\"tokens\"}";
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let m = gw.metrics().await;
        if sample(&m, spent).is_some_and(|t| t >= 10.0) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the key's spend was never recorded: {m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(chat("ab", false, Some(SCRAPE_TEAM_KEY)).await, 429);
    // One request a minute.
    assert_eq!(chat("ab", false, Some(SCRAPE_LIMITED_KEY)).await, 200);
    assert_eq!(chat("ab", false, Some(SCRAPE_LIMITED_KEY)).await, 429);
    let r = c
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth(process::ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The metric names a `/metrics` text exposes: its samples' and its HELP and
/// TYPE lines'.
fn exposed_names(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| match l.strip_prefix("# ") {
            Some(meta) => meta.split_whitespace().nth(1),
            None => l.split(['{', ' ']).next(),
        })
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The `promptgate_*` metric names a PromQL expression reads.
fn referenced_names(expr: &str) -> BTreeSet<String> {
    regex::Regex::new(r"promptgate_[a-z0-9_]+")
        .unwrap()
        .find_iter(expr)
        .map(|m| m.as_str().to_owned())
        .collect()
}

/// Every PromQL expression of the dashboard, with Grafana's variables
/// replaced by what "All" and a range mean to Prometheus; and every variable
/// query's metric.
fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/promptgate.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dash["schemaVersion"], 39);
    let vars = dash["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a prometheus data source variable"
    );
    let grafana = |e: &str| {
        e.replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$route", ".*")
            .replace("$provider", ".*")
            .replace("$key", ".*")
    };
    let panels = dash["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for p in panels {
        let g = &p["gridPos"];
        let right = g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap();
        assert!(right <= 24, "{} fits the 24-column grid", p["title"]);
    }
    let mut out = Vec::new();
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let def = v["definition"].as_str().unwrap();
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {def}"));
        let (metric, label) = inner.split_once(", ").unwrap();
        out.push((
            format!("variable {}", v["name"]),
            format!("group by ({label}) ({metric})"),
        ));
    }
    for p in panels {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            out.push((
                format!("panel {}", p["title"]),
                grafana(t["expr"].as_str().unwrap()),
            ));
        }
    }
    assert!(out.iter().all(|(_, e)| !e.contains('$')), "{out:?}");
    out
}

/// A real Prometheus (Debian's) scrapes the real binary every second with
/// the alert rules loaded: the target is up, every rule is healthy after its
/// first evaluation, a gateway series is queryable; every rule's and every
/// dashboard panel's expression evaluates without error, and every metric
/// name they read is one the gateway exposes — renaming a metric fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_gateway_and_every_rule_and_panel_evaluates() {
    let Some(prometheus) = required_tool("prometheus") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    scrape_config(dir.path());
    let gw = process::Process::start(&dir.path().join("promptgate.yaml"), &[]);
    scrape_traffic(&gw).await;

    // Every series the traffic makes, once the shadow call and the health
    // checks have been counted.
    let mut metrics = String::new();
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        metrics = gw.metrics().await;
        if [
            "promptgate_shadow_similarity_bucket",
            "promptgate_health_checks_total",
            "promptgate_audit_dropped_total",
        ]
        .iter()
        .all(|s| metrics.contains(s))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exposed = exposed_names(&metrics);

    let alerts = repo().join("deploy/prometheus/alerts.yaml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: promptgate\n    static_configs:\n      - targets: [\"{}\"]\n",
        alerts.display(),
        gw.base.trim_start_matches("http://")
    );
    let prom = start_prometheus(&prometheus, &config).await;

    // The target is up and a gateway series is queryable.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let v = prom
            .get_json("/api/v1/query", &[("query", "promptgate_requests_total")])
            .await;
        let up = prom
            .get_json("/api/v1/query", &[("query", "up{job=\"promptgate\"}")])
            .await;
        if up["data"]["result"][0]["value"][1] == "1"
            && v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        {
            break;
        }
        assert!(Instant::now() < until, "no scrape of the gateway: {up} {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let targets = prom.get_json("/api/v1/targets", &[]).await;
    assert_eq!(
        targets["data"]["activeTargets"][0]["health"], "up",
        "{targets}"
    );

    // Every rule loaded, evaluated and healthy.
    let mut rules;
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        rules = prom.get_json("/api/v1/rules", &[]).await;
        let all: Vec<&Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        let evaluated = all.iter().all(|r| {
            r["lastEvaluation"]
                .as_str()
                .is_some_and(|t| !t.starts_with("0001"))
        });
        if !all.is_empty() && evaluated {
            for r in &all {
                assert_eq!(r["health"], "ok", "{r}");
            }
            break;
        }
        assert!(
            Instant::now() < until,
            "the rules were not evaluated: {rules}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rule_exprs: Vec<(String, String)> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| {
            (
                format!("alert {}", r["name"]),
                r["query"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let local = &yaml_documents(&alerts)[0];
    let defined = local["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum::<usize>();
    assert_eq!(
        rule_exprs.len(),
        defined,
        "every rule of alerts.yaml loaded"
    );

    // Every expression evaluates; every metric it reads is exported.
    let mut missing = Vec::new();
    for (what, expr) in rule_exprs.iter().chain(dashboard_expressions().iter()) {
        let v = prom.get_json("/api/v1/query", &[("query", expr)]).await;
        assert_eq!(v["status"], "success", "{what}: {expr}: {v}");
        for name in referenced_names(expr) {
            if !exposed.contains(&name) {
                missing.push(format!("{what}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics the gateway does not export:\n{}\n\nexported: {exposed:?}",
        missing.join("\n")
    );
    // The new route gauges reached Prometheus too.
    let v = prom
        .get_json(
            "/api/v1/query",
            &[(
                "query",
                "promptgate_route_targets_available{route=\"cached\"}",
            )],
        )
        .await;
    assert_eq!(v["data"]["result"][0]["value"][1], "1", "{v}");
}

// === Kubernetes ===

fn k8s() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// Every resource of the kustomization, with the file it is in. The
/// kustomization lists every manifest of the folder and nothing else.
fn manifests() -> Vec<(String, Value)> {
    let kustomization = &yaml_documents(&k8s().join("kustomization.yaml"))[0];
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(k8s())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml lists every manifest");
    listed
        .into_iter()
        .flat_map(|f| {
            yaml_documents(&k8s().join(&f))
                .into_iter()
                .map(move |d| (f.clone(), d))
        })
        .collect()
}

fn resource<'a>(all: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    all.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// `a`'s labels all in `b`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| labels[k] == *v)
}

/// The gateway's folder as the Deployment mounts it: each ConfigMap key
/// written at the path its projected volume gives it. Every key of the
/// projected ConfigMaps is projected (a file added to a ConfigMap but not to
/// the volume would never reach the pods).
fn mounted_config(all: &[(String, Value)], into: &Path) {
    let deployment = resource(all, "Deployment", "promptgate");
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let config = volumes.iter().find(|v| v["name"] == "config").unwrap();
    for source in config["projected"]["sources"].as_array().unwrap() {
        let cm = &source["configMap"];
        let data = &resource(all, "ConfigMap", cm["name"].as_str().unwrap())["data"];
        let items = cm["items"].as_array().unwrap();
        let projected: BTreeSet<&str> = items.iter().map(|i| i["key"].as_str().unwrap()).collect();
        let keys: BTreeSet<&str> = data
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            projected, keys,
            "every key of ConfigMap {} is mounted",
            cm["name"]
        );
        for item in items {
            let path = into.join(item["path"].as_str().unwrap());
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, data[item["key"].as_str().unwrap()].as_str().unwrap()).unwrap();
        }
    }
}

/// Every manifest of deploy/kubernetes validates offline with
/// kubernetes-validate (the venv's, its schemas bundled) in strict mode
/// against Kubernetes 1.33. ServiceMonitor and PrometheusRule are custom
/// resources it has no schema for: their required fields are checked here,
/// and the PrometheusRule must hold exactly the groups of
/// deploy/prometheus/alerts.yaml. The Deployment's wiring is checked too:
/// probes, rollout, grace period against `limits.shutdown_grace`, security
/// context, the Secret's keys, the selectors of the Service, the PDB and the
/// ServiceMonitor.
#[test]
fn kubernetes_manifests_validate_offline() {
    let all = manifests();
    let crd = |d: &Value| {
        d["apiVersion"]
            .as_str()
            .unwrap()
            .starts_with("monitoring.coreos.com/")
    };
    let mut files: Vec<&str> = all
        .iter()
        .filter(|(_, d)| !crd(d))
        .map(|(f, _)| f.as_str())
        .collect();
    files.dedup();
    let validator = venv_bin().join("kubernetes-validate");
    assert!(
        validator.exists(),
        "{} is missing: run the tests with scripts/test (the venv has kubernetes-validate)",
        validator.display()
    );
    let out = Command::new(&validator)
        .args(["-k", "1.33.0", "--strict"])
        .args(&files)
        .current_dir(k8s())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    let validated = text.matches("passed for resource").count();
    assert_eq!(
        validated,
        all.iter().filter(|(_, d)| !crd(d)).count(),
        "every built-in resource was validated against a schema:\n{text}"
    );

    // The custom resources.
    let service = resource(&all, "Service", "promptgate");
    let monitor = resource(&all, "ServiceMonitor", "promptgate");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["namespace"], "promptgate");
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    let ports: Vec<&Value> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    for e in monitor["spec"]["endpoints"].as_array().unwrap() {
        assert!(ports.iter().any(|p| p["name"] == e["port"]), "{e}");
        assert_eq!(e["path"], "/metrics");
    }
    let rule = resource(&all, "PrometheusRule", "promptgate");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let alerts = &yaml_documents(&repo().join("deploy/prometheus/alerts.yaml"))[0];
    assert_eq!(
        rule["spec"]["groups"], alerts["groups"],
        "prometheusrule.yaml holds alerts.yaml's groups (regenerate it: see its header)"
    );

    // The gateway's Deployment.
    let deployment = resource(&all, "Deployment", "promptgate");
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(spec["replicas"], 3);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert!(selects(&spec["selector"]["matchLabels"], pod_labels));
    assert!(selects(&service["spec"]["selector"], pod_labels));
    let pdb = resource(&all, "PodDisruptionBudget", "promptgate");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels));
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "promptgate:latest");
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    for r in ["requests", "limits"] {
        assert!(container["resources"][r]["memory"].is_string(), "{r}");
        assert!(container["resources"][r]["cpu"].is_string(), "{r}");
    }
    let port = container["ports"][0]["name"].clone();
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], port);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], port);
    let secret = resource(&all, "Secret", "promptgate-secrets");
    for env in container["env"].as_array().unwrap() {
        if let Some(r) = env["valueFrom"]["secretKeyRef"].as_object() {
            assert_eq!(r["name"], "promptgate-secrets");
            let key = r["key"].as_str().unwrap();
            assert!(
                secret["stringData"][key].is_string(),
                "the Secret has {key}"
            );
        }
    }
    // The grace period covers a preStop pause (if any), the drain delay and
    // the gateway's own grace.
    let dir = tempfile::tempdir().unwrap();
    mounted_config(&all, dir.path());
    let config = &yaml_documents(&dir.path().join("promptgate.yaml"))[0];
    let secs = |field: &str| {
        config["limits"][field]
            .as_str()
            .map_or(0, |d| humantime::parse_duration(d).unwrap().as_secs())
    };
    let grace = secs("shutdown_grace");
    assert!(grace > 0, "the ConfigMap sets limits.shutdown_grace");
    // A drain delay (the listener still serving after SIGTERM) adds to it.
    let grace = grace + secs("drain_delay");
    let pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        secs("drain_delay") > 0 || pause > 0,
        "SIGTERM is followed by some serving while endpoints update"
    );
    let period = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        period > pause + grace,
        "terminationGracePeriodSeconds {period} > preStop {pause} + drain_delay + shutdown_grace {grace}"
    );
    // The admin API stays on the pod's loopback.
    assert!(
        config["admin"]["listen"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{config}"
    );
    // Every Redis URL names a Service of the manifests. The one holding rate
    // limits and spend never evicts (an evicted spend key would re-open a
    // budget); the cache tier has a Redis of its own that may.
    let policy = |section: &str| {
        let url = config[section]["redis"]["url"].as_str().unwrap();
        let host = url
            .trim_start_matches("redis://")
            .split(':')
            .next()
            .unwrap();
        let service = resource(&all, "Service", host);
        let component = &service["spec"]["selector"]["app.kubernetes.io/component"];
        let (_, redis) = all
            .iter()
            .find(|(_, r)| {
                r["kind"] == "Deployment"
                    && &r["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                        == component
            })
            .unwrap_or_else(|| panic!("a Deployment behind Service {host}"));
        let args: Vec<&str> = redis["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let at = args
            .iter()
            .position(|a| *a == "--maxmemory-policy")
            .unwrap();
        (host.to_owned(), args[at + 1].to_owned())
    };
    let (limits_host, limits_policy) = policy("limits");
    let (spend_host, spend_policy) = policy("spend");
    let (cache_host, cache_policy) = policy("cache");
    assert_eq!(limits_policy, "noeviction");
    assert_eq!(spend_policy, "noeviction");
    assert_eq!(cache_policy, "allkeys-lru");
    assert_eq!(limits_host, spend_host);
    assert_ne!(cache_host, limits_host);
    // The NetworkPolicy covers both Redis pods and admits the gateway's.
    let netpol = resource(&all, "NetworkPolicy", "promptgate-redis");
    let matches = |selector: &Value, labels: &Value| {
        let plain = selector["matchLabels"]
            .as_object()
            .is_none_or(|m| m.iter().all(|(k, v)| &labels[k] == v));
        let exprs = selector["matchExpressions"].as_array().is_none_or(|es| {
            es.iter().all(|e| {
                assert_eq!(e["operator"], "In", "{e}");
                e["values"]
                    .as_array()
                    .unwrap()
                    .contains(&labels[e["key"].as_str().unwrap()])
            })
        });
        plain && exprs
    };
    for host in [&limits_host, &cache_host] {
        let service = resource(&all, "Service", host);
        let component = &service["spec"]["selector"]["app.kubernetes.io/component"];
        let (_, redis) = all
            .iter()
            .find(|(_, r)| {
                r["kind"] == "Deployment"
                    && &r["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                        == component
            })
            .unwrap();
        let labels = &redis["spec"]["template"]["metadata"]["labels"];
        assert!(matches(&netpol["spec"]["podSelector"], labels), "{host}");
    }
    let gateway = pod_labels;
    let from = &netpol["spec"]["ingress"][0]["from"][0]["podSelector"];
    assert!(matches(from, gateway), "{from}");
}

/// The ConfigMaps, laid out as the Deployment mounts them, are a
/// configuration `promptgate check` accepts, with the environment the
/// Deployment gives the container from the Secret.
#[test]
fn the_kubernetes_configmaps_pass_promptgate_check() {
    let all = manifests();
    let dir = tempfile::tempdir().unwrap();
    mounted_config(&all, dir.path());
    let secret = resource(&all, "Secret", "promptgate-secrets");
    let container =
        &resource(&all, "Deployment", "promptgate")["spec"]["template"]["spec"]["containers"][0];
    let mut env = Vec::new();
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_owned();
        let value = match e["valueFrom"]["secretKeyRef"]["key"].as_str() {
            Some(key) => secret["stringData"][key].as_str().unwrap().to_owned(),
            None => e["value"].as_str().unwrap().to_owned(),
        };
        env.push((name, value));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["check", "--config"])
        .arg(dir.path().join("promptgate.yaml"))
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "promptgate check rejected the ConfigMaps:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok: 4 route(s), 3 provider(s), 1 prompt(s)"),
        "{stdout}"
    );
}
