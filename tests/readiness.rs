//! `promptgate readiness`: the real binary over a config and a shadow store
//! written by the store's writer; the report's figures in both files, the
//! filters, and the errors.
#![allow(clippy::unwrap_used, clippy::float_cmp)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use promptgate::shadow::store::Writer;
use promptgate::shadow::{Comparison, JsonCheck, Pair, Side, ToolCallOut};
use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_promptgate"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

const GATEWAY: &str = "\
shadow: {store: data/pairs.sqlite}
routes:
  support:
    targets:
      - {provider: up, model: m1}
      - {provider: up, model: m2}
    readiness: {max_error_rate: 0.2, max_p95_latency_ratio: 2, min_tool_agreement: 0, min_json_validity: 0.5, min_similarity_p50: 0.5, min_pairs: 9}
  billing:
    provider: up
    model: m1
";

/// Pair i (1..=10) of `candidate`: character similarity i/10, token F1
/// i/20; primary latency 100·i ms, the candidate `slowdown` times that; the
/// candidate failed pair 3 (timeout), called the wrong tool in pair 5, and
/// wrote invalid JSON in pair 8 (pairs 7 and 8 asked for JSON).
fn pair(candidate: &str, i: u32, at_ms: i64, slowdown: f64) -> Pair {
    let f = f64::from(i);
    let failed = i == 3;
    let mut primary = Side {
        target: "up/m1".into(),
        latency_ms: 100.0 * f,
        finish: Some("stop".into()),
        input_tokens: 10,
        output_tokens: i,
        text: format!("primary answer {i}"),
        ..Side::default()
    };
    let mut cand = Side {
        target: candidate.into(),
        latency_ms: 100.0 * f * slowdown,
        error: failed.then(|| "timeout".into()),
        finish: (!failed).then(|| "stop".into()),
        input_tokens: 10,
        output_tokens: 2 * i,
        text: if failed {
            String::new()
        } else {
            format!("candidate answer {i}")
        },
        ..Side::default()
    };
    if i == 5 {
        primary.tool_calls = vec![ToolCallOut {
            name: "lookup".into(),
            arguments: "{\"id\":1}".into(),
        }];
        cand.tool_calls = vec![ToolCallOut {
            name: "search".into(),
            arguments: "{}".into(),
        }];
    }
    Pair {
        at_ms,
        request_id: format!("{candidate}-{i}"),
        route: "support".into(),
        arm: None,
        source: "live".into(),
        stream: false,
        primary,
        candidate: cand,
        comparison: (!failed).then(|| Comparison {
            exact: i == 10,
            token_f1: f / 20.0,
            char_similarity: f / 10.0,
            json: (i == 7 || i == 8).then_some(JsonCheck {
                primary_valid: true,
                candidate_valid: i == 7,
                schema_agree: i == 7,
            }),
            tool_agreement: (i == 5).then_some(false),
            length_ratio: Some(2.0),
            ..Comparison::default()
        }),
        request: Some(format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"question {i}\"}}]}}"
        )),
    }
}

/// The config, and a store holding: `local/fast` (10 recent pairs, ready),
/// `local/slow` (10 recent pairs, 3× slower: not ready), `local/old` (10
/// pairs two days old).
fn setup(dir: &Path) {
    common::write_config(
        dir,
        GATEWAY,
        &[(
            "up.yaml".into(),
            "kind: openai\nbase_url: http://127.0.0.1:1/v1\nmodels: [m1, m2]\n".into(),
        )],
    );
    let now = now_ms();
    let w = Writer::open(dir.join("data/pairs.sqlite"), None);
    for i in 1..=10 {
        let recent = now - 600_000 + i64::from(i);
        assert!(w.try_send(pair("local/fast", i, recent, 1.5)));
        assert!(w.try_send(pair("local/slow", i, recent, 3.0)));
        assert!(w.try_send(pair("local/old", i, now - 48 * 3_600_000, 1.0)));
    }
    let mut elsewhere = pair("local/fast", 1, now, 1.0);
    elsewhere.route = "billing".into();
    assert!(w.try_send(elsewhere));
    assert!(w.close(Duration::from_secs(30)));
}

fn readiness(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = bin()
        .arg("readiness")
        .arg("--config")
        .arg(dir.join("promptgate.yaml"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["verdict"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == name)
        .unwrap()
}

#[test]
fn the_report_judges_each_candidate_with_exact_figures() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let prefix = dir.path().join("reports/nested/support");
    let (ok, stdout, stderr) = readiness(
        dir.path(),
        &[
            "--route",
            "support",
            "--since",
            "24h",
            "--out",
            prefix.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("readiness of route `support`: 20 pairs in the last 1day"),
        "{stdout}"
    );
    assert!(
        stdout.contains("local/fast: ready: every applicable threshold met over 9 compared pairs"),
        "{stdout}"
    );
    assert!(
        stdout.contains("local/slow: not ready: p95 latency ratio 3 > 2"),
        "{stdout}"
    );
    assert!(!stdout.contains("local/old"), "{stdout}");

    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(json["route"], "support");
    assert_eq!(json["primary"], "up/m1 → up/m2");
    assert_eq!(json["pairs"], 20);
    assert_eq!(json["thresholds"]["min_pairs"], 9);
    let cands = json["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 2);
    let fast = &cands[0];
    assert_eq!(fast["candidate"], "local/fast");
    assert_eq!(fast["pairs"], 10);
    assert_eq!(fast["compared"], 9);
    assert_eq!(fast["candidate_side"]["errors"], 1);
    assert_eq!(fast["candidate_side"]["errors_by_kind"]["timeout"], 1);
    assert_eq!(fast["primary_side"]["latency_ms"]["p50"], 600.0);
    assert_eq!(fast["primary_side"]["latency_ms"]["p95"], 1000.0);
    assert_eq!(fast["candidate_side"]["latency_ms"]["p95"], 1500.0);
    assert_eq!(fast["candidate_side"]["output_tokens"]["sum"], 110);
    assert_eq!(fast["similarity"]["char_similarity"]["p50"], 0.6);
    assert_eq!(fast["similarity"]["char_similarity"]["p10"], 0.1);
    assert_eq!(fast["similarity"]["char_similarity"]["p90"], 1.0);
    assert_eq!(fast["similarity"]["token_f1"]["p50"], 0.3);
    assert_eq!(
        fast["similarity"]["char_histogram"],
        serde_json::json!([0, 1, 1, 0, 1, 1, 1, 1, 1, 2])
    );
    assert_eq!(fast["json"]["candidate_validity"], 0.5);
    assert_eq!(fast["tools"]["pairs"], 1);
    assert_eq!(fast["tools"]["agreement"], 0.0);
    assert_eq!(check(fast, "error_rate")["figure"], 0.1);
    assert_eq!(check(fast, "p95_latency_ratio")["figure"], 1.5);
    assert_eq!(check(fast, "similarity_p50")["met"], true);
    assert_eq!(fast["verdict"]["ready"], true);
    let worst: Vec<&str> = fast["worst"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        &worst[..3],
        ["local/fast-3", "local/fast-5", "local/fast-8"]
    );

    let slow = &cands[1];
    assert_eq!(slow["candidate"], "local/slow");
    assert_eq!(check(slow, "p95_latency_ratio")["figure"], 3.0);
    assert_eq!(check(slow, "p95_latency_ratio")["met"], false);
    assert_eq!(slow["verdict"]["ready"], false);

    let md = std::fs::read_to_string(prefix.with_extension("md")).unwrap();
    assert!(
        md.starts_with("# Readiness report: route `support`"),
        "{md}"
    );
    assert!(
        md.contains("| local/fast | 10 | 9 | 10% | 1.5 | 0.6 | ✅ ready |"),
        "{md}"
    );
    assert!(
        md.contains("| local/slow | 10 | 9 | 10% | 3 | 0.6 | ❌ not ready |"),
        "{md}"
    );
    assert!(md.contains("| p95 latency ratio | ≤ 2 | 3 | ❌ |"), "{md}");
    assert!(md.contains("| latency p95 (ms) | 1000 | 1500 |"), "{md}");
    assert!(md.contains("request: `` question 3 ``"), "{md}");
    let moving = &md[md.find("## Moving traffic").unwrap()..];
    assert!(moving.contains("- name: candidate\n          weight: 5\n          targets:\n            - {provider: local, model: fast}"), "{moving}");
    assert!(
        moving.contains("`local/slow` is not ready: fix first"),
        "{moving}"
    );
    assert!(moving.contains("promptgate drill"), "{moving}");

    // The canary snippet is a route the gateway accepts.
    let snippet = moving
        .split("```yaml\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let canary = dir.path().join("canary");
    std::fs::create_dir_all(&canary).unwrap();
    common::write_config(
        &canary,
        &snippet
            .replace("provider: local", "provider: up")
            .replace("model: fast", "model: m2"),
        &[(
            "up.yaml".into(),
            "kind: openai\nbase_url: http://127.0.0.1:1/v1\nmodels: [m1, m2]\n".into(),
        )],
    );
    let out = bin()
        .args(["check", "--config"])
        .arg(canary.join("promptgate.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{snippet}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn filters_an_empty_window_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let prefix = dir.path().join("one");
    let out = prefix.to_str().unwrap();

    // One candidate, every stored pair (no window): the old one too.
    let (ok, stdout, stderr) = readiness(
        dir.path(),
        &[
            "--route",
            "support",
            "--candidate",
            "local/old",
            "--out",
            out,
        ],
    );
    assert!(ok, "{stdout}{stderr}");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(json["pairs"], 10);
    assert_eq!(json["candidates"].as_array().unwrap().len(), 1);
    assert_eq!(json["candidates"][0]["candidate"], "local/old");
    assert_eq!(json["since"], Value::Null);

    // A window with nothing in it: a report that says so, exit 0.
    let (ok, stdout, stderr) = readiness(
        dir.path(),
        &[
            "--route",
            "support",
            "--candidate",
            "local/old",
            "--since",
            "1h",
            "--out",
            out,
        ],
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("no shadow pairs for candidate `local/old`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("stored candidates: local/fast, local/old, local/slow"),
        "{stdout}"
    );
    let md = std::fs::read_to_string(prefix.with_extension("md")).unwrap();
    assert!(
        md.contains("No shadow pairs are stored for this route in this window"),
        "{md}"
    );
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(json["pairs"], 0);
    assert_eq!(json["candidates"], serde_json::json!([]));

    // An unknown route names the routes.
    let (ok, _, stderr) = readiness(dir.path(), &["--route", "nope", "--out", out]);
    assert!(!ok);
    assert!(
        stderr.contains("unknown route `nope`; the routes are: billing, support"),
        "{stderr}"
    );

    // A store that is not there.
    let (ok, _, stderr) = readiness(
        dir.path(),
        &[
            "--route",
            "support",
            "--store",
            "absent.sqlite",
            "--out",
            out,
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains("no shadow store at absent.sqlite"),
        "{stderr}"
    );

    // A bad duration is clap's error, before anything is read.
    let (ok, _, stderr) = readiness(
        dir.path(),
        &["--route", "support", "--since", "soon", "--out", out],
    );
    assert!(!ok);
    assert!(stderr.contains("--since"), "{stderr}");

    // --store overrides the config's path.
    std::fs::rename(
        dir.path().join("data/pairs.sqlite"),
        dir.path().join("moved.sqlite"),
    )
    .unwrap();
    let _ = std::fs::remove_file(dir.path().join("data/pairs.sqlite-wal"));
    let _ = std::fs::remove_file(dir.path().join("data/pairs.sqlite-shm"));
    let moved = dir.path().join("moved.sqlite");
    let (ok, stdout, stderr) = readiness(
        dir.path(),
        &[
            "--route",
            "billing",
            "--store",
            moved.to_str().unwrap(),
            "--out",
            out,
        ],
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("readiness of route `billing`: 1 pairs"),
        "{stdout}"
    );
    assert!(
        stdout.contains("local/fast: not enough evidence (1 of 20 compared pairs)"),
        "{stdout}"
    );
}
