//! A shadow's options: candidates that render their own prompt version (the
//! candidate gets the request rendered at the shadow's label, the client the
//! live version), and the embedding similarity of a pair's answers.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const GREET: &str = r#"
variables:
  name: {type: string}
labels:
  production: 1
  candidate: 2
versions:
  1:
    route: assist
    messages:
      - {role: system, content: "Live version."}
      - {role: user, content: "Hello {{ name }}"}
  2:
    route: assist
    messages:
      - {role: system, content: "Candidate version."}
      - {role: user, content: "Hi {{ name }}"}
"#;

fn system_text(body: &Value) -> String {
    body["messages"][0]["content"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

async fn wait_for(fake: &Fake, n: usize) {
    let until = Instant::now() + Duration::from_secs(10);
    while fake.requests().len() < n {
        assert!(
            Instant::now() < until,
            "the candidate saw {} of {n} requests",
            fake.requests().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_candidate_renders_the_shadows_prompt_label() {
    let primary = spawn_fake().await;
    let candidate = spawn_fake().await;
    let gateway = "listen: 127.0.0.1:0\nroutes:\n  assist:\n    provider: live\n    model: chat\n    shadow:\n      targets: [{provider: cand, model: chat}]\n      sample: 1.0\n      prompt: {label: candidate}\n";
    let provider = |f: &Fake| {
        format!(
            "kind: openai\nbase_url: {}\napi_key_env: FAKE_UPSTREAM_KEY\n",
            f.base_url()
        )
    };
    let providers = vec![
        ("live.yaml".to_string(), provider(&primary)),
        ("cand.yaml".to_string(), provider(&candidate)),
    ];
    let gw = spawn_gateway_with_prompts(gateway, &providers, &[("greet.yaml", GREET)]).await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({
            "model": "assist",
            "messages": [],
            "prompt": {"id": "greet", "variables": {"name": "Ada"}},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-promptgate-prompt-version"], "1");
    wait_for(&candidate, 1).await;
    let live = primary.last().body;
    let shadow = candidate.last().body;
    assert_eq!(system_text(&live), "Live version.");
    assert_eq!(live["messages"][1]["content"], "Hello Ada");
    assert_eq!(system_text(&shadow), "Candidate version.");
    assert_eq!(shadow["messages"][1]["content"], "Hi Ada");
    assert_eq!(primary.requests().len(), 1);

    // A request without a prompt goes to the candidate as it is.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("assist", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_for(&candidate, 2).await;
    assert_eq!(
        candidate.last().body["messages"],
        primary.last().body["messages"]
    );
}

fn figures(gw: &Gw, candidate: &str) -> Option<promptgate::pipeline::shadow::Figures> {
    gw.gw
        .shadows
        .figures()
        .into_iter()
        .find(|((_, _, c), _)| c == candidate)
        .map(|(_, f)| f)
}

#[tokio::test]
async fn pairs_carry_the_embedding_similarity_of_the_two_answers() {
    let other = spawn_fake().await;
    let gateway = "listen: 127.0.0.1:0\nroutes:\n  vectors:\n    provider: sandbox\n    model: echo\n  assist:\n    provider: sandbox\n    model: echo\n    shadow:\n      targets: [{provider: sandbox, model: echo}, {provider: other, model: chat}]\n      sample: 1.0\n      embeddings: vectors\n";
    let providers = vec![
        (
            "sandbox.yaml".to_string(),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n".to_string(),
        ),
        (
            "other.yaml".to_string(),
            format!(
                "kind: openai\nbase_url: {}\napi_key_env: FAKE_UPSTREAM_KEY\n",
                other.base_url()
            ),
        ),
    ];
    let gw = spawn_gateway(gateway, &providers).await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "assist", "messages": [{"role": "user", "content": "the same words"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let until = Instant::now() + Duration::from_secs(10);
    let (same, differs) = loop {
        let same = figures(&gw, "sandbox/echo").filter(|f| f.pairs == 1);
        let differs = figures(&gw, "other/chat").filter(|f| f.pairs == 1);
        if let (Some(s), Some(d)) = (same, differs) {
            break (s, d);
        }
        assert!(Instant::now() < until, "the pairs did not arrive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The same answer embeds to the same vector; another answer does not.
    let s = same.embedding_similarity_p50.unwrap();
    assert!((s - 1.0).abs() < 1e-6, "{s}");
    assert_eq!(same.exact_match_rate, Some(1.0));
    let d = differs.embedding_similarity_p50.unwrap();
    assert!(d < 0.99, "{d}");
    assert_eq!(differs.exact_match_rate, Some(0.0));
}

const CONTACT: &str = r#"
variables:
  name: {type: string}
labels:
  production: 1
  candidate: 2
versions:
  1:
    route: assist
    messages:
      - {role: user, content: "Hello {{ name }}"}
  2:
    route: assist
    messages:
      - {role: system, content: "Escalate to ops@example.com."}
      - {role: user, content: "Hello {{ name }}"}
"#;

#[tokio::test]
async fn a_version_that_makes_the_copy_private_goes_to_self_hosted_candidates_only() {
    let live = spawn_fake().await;
    let commercial = spawn_fake().await;
    let own = spawn_fake().await;
    // The route's data policy makes a request with an e-mail address private:
    // the live version has none, the candidate version has one.
    let gateway = "listen: 127.0.0.1:0\nroutes:\n  assist:\n    data: private\n    provider: live\n    model: chat\n    shadow:\n      targets: [{provider: commercial, model: chat}, {provider: own, model: chat}]\n      sample: 1.0\n      prompt: {label: candidate}\n";
    let provider = |f: &Fake, self_hosted: bool| {
        format!(
            "kind: openai\nbase_url: {}\napi_key_env: FAKE_UPSTREAM_KEY\nself_hosted: {self_hosted}\n",
            f.base_url()
        )
    };
    let providers = vec![
        ("live.yaml".to_string(), provider(&live, true)),
        ("commercial.yaml".to_string(), provider(&commercial, false)),
        ("own.yaml".to_string(), provider(&own, true)),
    ];
    let gw = spawn_gateway_with_prompts(gateway, &providers, &[("contact.yaml", CONTACT)]).await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({
            "model": "assist",
            "messages": [],
            "prompt": {"id": "contact", "variables": {"name": "Ada"}},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_for(&own, 1).await;
    assert_eq!(
        system_text(&own.last().body),
        "Escalate to ops@example.com."
    );
    let until = Instant::now() + Duration::from_secs(10);
    while figures(&gw, "own/chat").is_none_or(|f| f.pairs < 1) {
        assert!(
            Instant::now() < until,
            "no pair for the self-hosted candidate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(commercial.requests().is_empty());
    // Not sent is not a failure of the candidate: no pair, a counted drop.
    assert!(figures(&gw, "commercial/chat").is_none());
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("promptgate_shadow_dropped_total{reason=\"private\",route=\"assist\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("candidate=\"commercial/chat\""),
        "{metrics}"
    );
}

#[test]
fn a_broken_shadow_section_names_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = "listen: 127.0.0.1:0\nshadow: {retention: 0s}\nroutes:\n  assist:\n    provider: sandbox\n    model: echo\n    shadow:\n      targets: [{provider: nowhere, model: x}]\n      sample: 2\n      max_in_flight: 0\n      prompt: {label: a, version: 2}\n      embeddings: missing\n    readiness: {max_error_rate: 1.5, max_p95_latency_ratio: -1}\n";
    write_config(
        dir.path(),
        gateway,
        &[(
            "sandbox.yaml".to_string(),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n".to_string(),
        )],
    );
    let problems = match promptgate::config::load(&dir.path().join("promptgate.yaml")) {
        Ok(_) => panic!("a broken shadow section was accepted"),
        Err(p) => p,
    };
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    for f in [
        "shadow.retention",
        "routes.assist.shadow.targets[0].provider",
        "routes.assist.shadow.sample",
        "routes.assist.shadow.max_in_flight",
        "routes.assist.shadow.prompt",
        "routes.assist.shadow.embeddings",
        "routes.assist.readiness.max_error_rate",
        "routes.assist.readiness.max_p95_latency_ratio",
    ] {
        assert!(fields.contains(&f), "no problem for {f}: {problems:#?}");
    }
}
