//! N replicas on one machine: three real `promptgate serve` processes on
//! loopback behind a real nginx (round robin), sharing one redis-server (the
//! cache's shared tier, the rate-limit store, the spend) and one configuration
//! folder laid out as a Kubernetes ConfigMap mount (`..data` swapped by
//! symlink). What is shared holds across replicas (a cache entry, a limit, a
//! budget, a configuration change and a broken one); what is per replica stays
//! so (breakers, drill faults); and a replica killed mid-traffic costs no
//! request nginx can retry.
// The test drives its clients on tasks of its own.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/process.rs"]
mod process;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peers::{Nginx, Redis};
use common::*;
use process::Process;
use serde_json::{json, Value};
use sha2::Digest;

const CAPPED_KEY: &str = "pg-test-replicas-capped-0123456789";

/// A configuration folder as the kubelet writes a ConfigMap (or projected)
/// volume: each version in a `..<timestamp>` folder, `..data` a link to the
/// current one, and every entry (`promptgate.yaml`, `providers`, …) a link
/// through `..data`. An update writes a new version, points `..data_tmp` at
/// it, renames that over `..data` (one atomic swap) and removes the old one.
struct ConfigMap {
    dir: PathBuf,
    /// Top-level names: files (`promptgate.yaml`) and folders (`providers`).
    entries: Vec<&'static str>,
    version: u32,
}

fn version_dir(n: u32) -> String {
    format!("..2026_11_30_12_00_00.{n:09}")
}

impl ConfigMap {
    /// Mounts `files` (paths relative to `dir`) at `dir`, with `entries` as
    /// the volume's top-level names.
    fn mount(dir: &Path, entries: &[&'static str], files: &[(&str, String)]) -> ConfigMap {
        std::fs::create_dir_all(dir).unwrap();
        let map = ConfigMap {
            dir: dir.to_owned(),
            entries: entries.to_vec(),
            version: 1,
        };
        map.write_version(1, files);
        std::os::unix::fs::symlink(version_dir(1), dir.join("..data")).unwrap();
        for entry in entries {
            std::os::unix::fs::symlink(Path::new("..data").join(entry), dir.join(entry)).unwrap();
        }
        map
    }

    fn write_version(&self, n: u32, files: &[(&str, String)]) {
        let dir = self.dir.join(version_dir(n));
        std::fs::create_dir_all(&dir).unwrap();
        for entry in self.entries.iter().filter(|e| !e.ends_with(".yaml")) {
            std::fs::create_dir_all(dir.join(entry)).unwrap();
        }
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }

    /// The kubelet's atomic update.
    fn update(&mut self, files: &[(&str, String)]) {
        let old = self.version;
        self.version += 1;
        self.write_version(self.version, files);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(version_dir(self.version), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        std::fs::remove_dir_all(self.dir.join(version_dir(old))).unwrap();
    }
}

/// The configuration's files; `extra_routes` go under `routes:`.
fn files(fake: &Fake, redis: &Redis, extra_routes: &str) -> Vec<(&'static str, String)> {
    let url = redis.url();
    let gateway = format!(
        "listen: 127.0.0.1:0
limits:
  max_body_bytes: 65536
  store: redis
  redis: {{url: \"{url}\", prefix: \"pgrep:\", timeout: 500ms}}
  on_store_error: fail_open
cache:
  redis: {{url: \"{url}\", timeout: 500ms}}
spend:
  store: redis
  redis: {{url: \"{url}\", prefix: \"pgrep:\"}}
breaker: {{consecutive_failures: 2, cooldown: 60s}}
routes:
  chat: {{provider: fake, model: chat}}
  slow: {{provider: fake, model: slow-chat}}
  cached: {{provider: fake, model: chat, cache: {{mode: on, ttl: 1h}}}}
  limited: {{provider: fake, model: chat, limits: {{rpm: 6}}}}
  warm: {{provider: fake, model: chat, limits: {{rpm: 1000}}}}
  drill:
    targets:
      - {{provider: fake, model: echo}}
      - {{provider: backup, model: echo}}
{extra_routes}"
    );
    let provider = format!(
        "kind: openai\nbase_url: {}\napi_key_env: FAKE_UPSTREAM_KEY\ntimeouts: {{connect: 1s, headers: 2s, idle: 2s, total: 10s}}\nprices:\n  models:\n    \"*\": {{input: 1, output: 1}}\n",
        fake.base_url()
    );
    let sha: String = sha2::Sha256::digest(CAPPED_KEY.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    vec![
        ("promptgate.yaml", gateway),
        ("providers/fake.yaml", provider.clone()),
        ("providers/backup.yaml", provider),
        (
            "keys/team.yaml",
            format!("capped:\n  sha256: {sha}\n  budget:\n    daily: {{tokens: 30}}\n"),
        ),
    ]
}

/// One chat request: (status, headers, body).
async fn chat(
    base: &str,
    route: &str,
    content: &str,
    key: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut body = chat_body(route, false);
    body["messages"][1]["content"] = json!(content);
    let mut r = client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

async fn get_json(url: &str) -> (u16, Value) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The value of `promptgate_breaker_state{target="TARGET"}`, if reported.
fn breaker_state(metrics: &str, target: &str) -> Option<f64> {
    sample(
        metrics,
        &format!("promptgate_breaker_state{{target=\"{target}\"}}"),
    )
}

async fn redis_conn(redis: &Redis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn redis_keys(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .unwrap()
}

/// Polls `check` (every 50 ms, at most `limit`) until it returns true.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < until, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_behind_nginx_share_redis_and_a_configmap() {
    let redis = Redis::start(None);
    let fake = spawn_fake().await;
    // One projected volume: the gateway file and the folders in one swap.
    let root = tempfile::tempdir().unwrap();
    let mut map = ConfigMap::mount(
        root.path(),
        &["promptgate.yaml", "providers", "prompts", "keys"],
        &files(&fake, &redis, ""),
    );
    let gateway_file = root.path().join("promptgate.yaml");
    let env = [("FAKE_UPSTREAM_KEY", FAKE_KEY)];
    let mut replicas: Vec<Process> = (0..3)
        .map(|_| Process::start(&gateway_file, &env))
        .collect();
    let upstreams: Vec<String> = replicas
        .iter()
        .map(|p| p.base.trim_start_matches("http://").to_owned())
        .collect();
    let nginx = Nginx::start(&upstreams);
    let conn = redis_conn(&redis).await;
    // Every replica reaches Redis (limits, spend) before the races below.
    for r in &replicas {
        assert_eq!(chat(&r.base, "warm", "warm", None).await.0, 200);
        assert_eq!(get_json(&r.url("/readyz")).await.0, 200);
    }

    // (a) A cache entry written through one replica is a hit through the
    // others (from Redis: their own memory tier never saw it).
    let upstream_calls = fake.requests().len();
    let (s, h, first) = chat(&replicas[0].base, "cached", "shared entry", None).await;
    assert_eq!(
        (s, &h["x-promptgate-cache"]),
        (200, &"miss".parse().unwrap())
    );
    within(Duration::from_secs(5), "the entry stored in Redis", || {
        let mut conn = conn.clone();
        async move {
            let conn = &mut conn;
            !redis_keys(conn, "promptgate:idx:*").await.is_empty()
        }
    })
    .await;
    for r in &replicas[1..] {
        let (s, h, body) = chat(&r.base, "cached", "shared entry", None).await;
        assert_eq!(
            (s, &h["x-promptgate-cache"]),
            (200, &"hit".parse().unwrap())
        );
        assert_eq!(body["choices"], first["choices"]);
    }
    assert_eq!(fake.requests().len(), upstream_calls + 1);
    // Through nginx: one miss fills the tier, then every replica hits.
    let (s, h, _) = chat(&nginx.base, "cached", "through nginx", None).await;
    assert_eq!(
        (s, &h["x-promptgate-cache"]),
        (200, &"miss".parse().unwrap())
    );
    within(Duration::from_secs(5), "the second entry in Redis", || {
        let mut conn = conn.clone();
        async move {
            let conn = &mut conn;
            redis_keys(conn, "promptgate:idx:*").await.len() >= 2
        }
    })
    .await;
    for _ in 0..6 {
        let (s, h, _) = chat(&nginx.base, "cached", "through nginx", None).await;
        assert_eq!(
            (s, &h["x-promptgate-cache"]),
            (200, &"hit".parse().unwrap())
        );
    }
    assert_eq!(fake.requests().len(), upstream_calls + 2);

    // (b) A route's limit (6 a minute) holds across replicas: of 18
    // concurrent requests spread over the three, exactly 6 are admitted.
    let mut tasks = Vec::new();
    for i in 0..18 {
        let base = replicas[i % 3].base.clone();
        tasks.push(tokio::spawn(async move {
            chat(&base, "limited", &format!("limited {i}"), None)
                .await
                .0
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        6,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        12,
        "{statuses:?}"
    );
    // A key's budget (30 tokens a day; a call spends 18) holds too: one call
    // through each of two replicas spends it, then all three refuse.
    for r in &replicas[..2] {
        let (s, _, body) = chat(&r.base, "chat", "budget", Some(CAPPED_KEY)).await;
        assert_eq!(s, 200, "{body}");
    }
    within(Duration::from_secs(5), "the spend in Redis", || {
        let mut conn = conn.clone();
        async move {
            let conn = &mut conn;
            let mut total = 0u64;
            for k in redis_keys(conn, "pgrep:spend:key:capped:*").await {
                // The day's counter (YYYY-MM-DD), not the month's.
                if k.len() == "pgrep:spend:key:capped:".len() + 10 {
                    let t: Option<u64> = redis::cmd("HGET")
                        .arg(&k)
                        .arg("tokens")
                        .query_async(conn)
                        .await
                        .unwrap();
                    total += t.unwrap_or(0);
                }
            }
            total >= 36
        }
    })
    .await;
    // Each replica reads the shared totals at most a second old.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for r in &replicas {
        let (s, _, body) = chat(&r.base, "chat", "budget", Some(CAPPED_KEY)).await;
        assert_eq!(s, 429, "{body}");
        assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
    }

    // (c) A configuration change, swapped in the way the kubelet updates a
    // ConfigMap, reaches every replica.
    map.update(&files(
        &fake,
        &redis,
        "  added: {provider: fake, model: chat}\n",
    ));
    for r in &replicas {
        within(
            Duration::from_secs(10),
            "the new route on every replica",
            || async move { chat(&r.base, "added", "new route", None).await.0 == 200 },
        )
        .await;
    }
    // A broken configuration swapped in: every replica reports it on
    // /readyz and keeps serving its last good one.
    let mut broken = files(&fake, &redis, "  added: {provider: fake, model: chat}\n");
    broken[0]
        .1
        .push_str("  wrong: {provider: nowhere, model: chat}\n");
    map.update(&broken);
    for r in &replicas {
        within(
            Duration::from_secs(10),
            "readiness failing on every replica",
            || async move {
                let (s, body) = get_json(&r.url("/readyz")).await;
                s == 503 && body["status"] == "config_invalid"
            },
        )
        .await;
        let (_, body) = get_json(&r.url("/readyz")).await;
        let problems = body["problems"].to_string();
        assert!(problems.contains("1 problem(s)"), "{body}");
        assert_eq!(chat(&r.base, "added", "still serving", None).await.0, 200);
        assert_eq!(get_json(&r.url("/healthz")).await.0, 200);
    }
    // Fixed: ready again everywhere.
    map.update(&files(
        &fake,
        &redis,
        "  added: {provider: fake, model: chat}\n",
    ));
    for r in &replicas {
        within(
            Duration::from_secs(10),
            "readiness back on every replica",
            || async move { get_json(&r.url("/readyz")).await.0 == 200 },
        )
        .await;
    }

    // (e) Breakers and drill faults are per replica: a fault injected on
    // replica 0 opens its breaker only; each replica's /metrics shows its own.
    for r in &replicas {
        let (s, h, _) = chat(&r.base, "drill", "before", None).await;
        assert_eq!(
            (s, &h["x-promptgate-target"]),
            (200, &"fake/echo".parse().unwrap())
        );
    }
    let injected = client()
        .post(replicas[0].admin_url("/admin/faults"))
        .bearer_auth(process::ADMIN_KEY)
        .json(&json!({"provider": "fake", "fault": "down", "duration": "60s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(injected.status(), 201);
    for _ in 0..3 {
        let (s, h, _) = chat(&replicas[0].base, "drill", "fault", None).await;
        assert_eq!(
            (s, &h["x-promptgate-target"]),
            (200, &"backup/echo".parse().unwrap())
        );
    }
    assert_eq!(
        breaker_state(&replicas[0].metrics().await, "fake/echo"),
        Some(2.0)
    );
    for r in &replicas[1..] {
        assert_eq!(breaker_state(&r.metrics().await, "fake/echo"), Some(0.0));
        let (s, h, _) = chat(&r.base, "drill", "healthy here", None).await;
        assert_eq!(
            (s, &h["x-promptgate-target"]),
            (200, &"fake/echo".parse().unwrap())
        );
        let status = r.admin_get("/admin/status").await;
        assert_eq!(status["faults"], json!([]), "{status}");
    }
    let cleared = client()
        .delete(replicas[0].admin_url("/admin/faults/fake"))
        .bearer_auth(process::ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 200);

    // (d) Steady traffic through nginx while one replica is killed: every
    // request is answered 200 (nginx retries what the dead replica dropped).
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6 {
        let base = nginx.base.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let (s, _, body) = chat(&base, "slow", &format!("steady {w} {i}"), None).await;
                statuses.push((s, body));
                i += 1;
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    replicas[2].signal("KILL");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for w in workers {
        for (s, body) in w.await.unwrap() {
            assert_eq!(s, 200, "{body}");
            answered += 1;
        }
    }
    assert!(answered >= 18, "only {answered} requests in the traffic");
    let log = nginx.error_log();
    // Requests were in flight on the killed replica (nginx lost their
    // answer's head there) and were answered by another one.
    assert!(
        log.contains("while reading response header from upstream"),
        "no request was in flight on the killed replica:\n{log}"
    );
    assert!(replicas[2].exited().is_some());
    drop(replicas);
}

const GREET: &str = "versions:
  1:
    route: chat
    messages:
      - role: user
        content: \"{{ question }}\"
variables:
  question: {type: string}
labels: {production: 1}
";

/// The other way to mount: the prompts in a ConfigMap of their own mounted
/// on `prompts/` inside the main one. Its swap (its own `..data`) is a
/// configuration change as well: a prompt added there serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompts_configmap_mounted_on_its_own_reloads_on_its_swap() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(&fake, "  chat: {provider: fake, model: chat}\n");
    let root = tempfile::tempdir().unwrap();
    let mut main_files: Vec<(&str, String)> = vec![("promptgate.yaml", g)];
    let names: Vec<String> = p.iter().map(|(n, _)| format!("providers/{n}")).collect();
    for ((_, text), name) in p.iter().zip(&names) {
        main_files.push((name.as_str(), text.clone()));
    }
    let _main = ConfigMap::mount(root.path(), &["promptgate.yaml", "providers"], &main_files);
    let mut prompts = ConfigMap::mount(&root.path().join("prompts"), &[], &[]);
    let gw = Process::start(
        &root.path().join("promptgate.yaml"),
        &[("FAKE_UPSTREAM_KEY", FAKE_KEY)],
    );
    let ask = || async {
        client()
            .post(gw.url("/v1/prompts/greet/chat/completions"))
            .json(&json!({"variables": {"question": "hello?"}}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ask().await, 404);
    prompts.entries = vec!["greet.yaml"];
    prompts.update(&[("greet.yaml", GREET.to_owned())]);
    std::os::unix::fs::symlink("..data/greet.yaml", root.path().join("prompts/greet.yaml"))
        .unwrap();
    within(
        Duration::from_secs(10),
        "the new prompt served",
        || async move { ask().await == 200 },
    )
    .await;
    assert_eq!(fake.last().body["messages"][0]["content"], "hello?");
}
