//! The knowledge base end to end over the embedded `local` kind, through the
//! real binary: `promptgate ingest` into a running `promptgate serve`, prompt
//! hooks whose passages the sandbox echoes back, re-ingest with a changed and
//! a deleted file, a private retriever, and searches during an ingest.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{client, spawn_fake, GatewayProcess};
use serde_json::{json, Value};

fn ingest(config: &Path, retriever: &str, docs: &Path, prune: bool) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_promptgate"));
    c.args(["ingest", retriever])
        .arg(docs)
        .arg("--config")
        .arg(config);
    if prune {
        c.arg("--prune");
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "ingest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

const CORPUS: &[(&str, &str)] = &[
    (
        "returns.md",
        "# 退货政策\n\n## 期限\n\n商品签收后七天内可以无理由退货。退货时请保持商品及包装完好，并附上购物凭证。\n\n## 运费\n\n质量问题导致的退货，运费由公司承担；其他原因的退货运费由顾客承担。\n",
    ),
    (
        "invoice.txt",
        "报销须提供增值税普通发票或专用发票。发票抬头必须填写公司全称，税号不得有误。发票开具日期须在费用发生后三十日内。",
    ),
    (
        "leave.html",
        "<html><head><title>年假规定</title></head><body><h1>年假规定</h1><p>员工工作满一年后，每年享有十天带薪年假。</p><p>年假须提前两周在人事系统中申请，经直属主管批准。</p><script>var x = '发票';</script></body></html>",
    ),
    (
        "refunds.md",
        "# Refunds\n\nA refund is issued to the original payment method within five business days after the returned item arrives at our warehouse.\n\n# Exchanges\n\nItems may be exchanged for another size or colour once, free of charge.\n",
    ),
    (
        "travel.html",
        "<html><head><title>Travel policy</title></head><body><h1>Business travel</h1><p>Employees book flights and hotels through the company travel portal. Economy class is required for flights shorter than six hours.</p></body></html>",
    ),
    (
        "security.jsonl",
        "{\"id\": \"pw\", \"title\": \"Passwords\", \"text\": \"Passwords must be at least fourteen characters long and are rotated every ninety days.\", \"team\": \"it\"}\n{\"id\": \"vpn\", \"title\": \"Remote access\", \"text\": \"Remote access to internal systems requires the corporate VPN and a hardware security key.\", \"team\": \"it\"}\n",
    ),
];

/// A gateway whose `mixed` route tries a commercial (not self-hosted) fake
/// first and the self-hosted sandbox second; `policies` is a public local
/// retriever, `secret` a private one.
fn setup(dir: &Path, fake_base: &str) {
    common::write_config(
        dir,
        "listen: 127.0.0.1:0\nroutes:\n  echo:\n    provider: sandbox\n    model: echo\n  mixed:\n    targets:\n      - {provider: fake, model: chat}\n      - {provider: sandbox, model: echo}\n",
        &[
            (
                "sandbox.yaml".into(),
                "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n".into(),
            ),
            (
                "fake.yaml".into(),
                format!("kind: openai\nbase_url: {fake_base}\nself_hosted: false\n"),
            ),
        ],
    );
    std::fs::create_dir_all(dir.join("retrievers")).unwrap();
    std::fs::write(
        dir.join("retrievers/policies.yaml"),
        "kind: local\npath: index/policies.db\nmode: lexical\ntop_k: 3\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("retrievers/secret.yaml"),
        "kind: local\npath: index/secret.db\nmode: lexical\nprivate: true\n",
    )
    .unwrap();
    let prompt = |retriever: &str, route: &str| {
        format!(
            r#"variables:
  question: {{type: string}}
labels: {{production: 1}}
versions:
  1:
    route: {route}
    retrieval:
      - {{retriever: {retriever}, query: "{{{{ question }}}}", top_k: 3, into: passages}}
    messages:
      - role: user
        content: "{{% for p in passages %}}<{{{{ p.source }}}}|{{{{ p.title }}}}|{{{{ p.text }}}}>{{% endfor %}}"
"#
        )
    };
    std::fs::write(dir.join("prompts/ask.yaml"), prompt("policies", "echo")).unwrap();
    std::fs::write(dir.join("prompts/internal.yaml"), prompt("secret", "mixed")).unwrap();
    std::fs::write(dir.join("prompts/public.yaml"), prompt("policies", "mixed")).unwrap();
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    for (name, text) in CORPUS {
        std::fs::write(docs.join(name), text).unwrap();
    }
}

/// Asks prompt `prompt`; returns the response headers' provider and
/// retrieval summary, the echoed passages and the citations.
async fn ask(gw: &GatewayProcess, prompt: &str, question: &str) -> (String, String, String, Value) {
    let r = client()
        .post(format!("{}/v1/prompts/{prompt}/chat/completions", gw.base))
        .json(&json!({"variables": {"question": question}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{question}");
    let header = |n: &str| {
        r.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (provider, retrieval) = (
        header("x-promptgate-provider"),
        header("x-promptgate-retrieval"),
    );
    let v: Value = r.json().await.unwrap();
    let echoed = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    (
        provider,
        retrieval,
        echoed,
        v["promptgate"]["citations"].clone(),
    )
}

fn first_source(citations: &Value) -> String {
    citations[0]["source"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_documents_to_cited_answers_through_ingest_and_a_running_gateway() {
    let fake = spawn_fake().await;
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), &fake.base_url());
    let config = dir.path().join("promptgate.yaml");
    let docs = dir.path().join("docs");

    // The gateway starts before any index exists: the retrievers cannot
    // serve yet, and the rest of the gateway does.
    let gw = GatewayProcess::start(&config, &[]);
    let r = client()
        .post(format!("{}/v1/prompts/ask/chat/completions", gw.base))
        .json(&json!({"variables": {"question": "退货"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502, "no index yet: on_error fail");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "retrieval", "{v}");

    // The first ingest is picked up by the running gateway, without a reload.
    let out = ingest(&config, "policies", &docs, false);
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(summary.contains("documents: 7 new"), "{summary}");
    ingest(&config, "secret", &docs, false);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Chinese two-character queries, a heading path, HTML without its
    // script, English stemming, jsonl lines with their own ids.
    for (question, source, title) in [
        ("退货", "returns.md", "退货政策 > 期限"),
        ("发票抬头", "invoice.txt", ""),
        ("年假怎么申请", "leave.html", "年假规定"),
        ("refunds", "refunds.md", "Refunds"),
        ("How do I book flights?", "travel.html", "Travel policy"),
        ("password rotation", "pw", "Passwords"),
    ] {
        let (provider, retrieval, echoed, citations) = ask(&gw, "ask", question).await;
        assert_eq!(provider, "sandbox");
        assert!(retrieval.starts_with("policies="), "{retrieval}");
        assert_eq!(first_source(&citations), source, "{question}: {echoed}");
        assert!(
            echoed.starts_with(&format!("<{source}|")),
            "{question}: the best passage comes first in the template: {echoed}"
        );
        if !title.is_empty() {
            assert!(
                echoed.starts_with(&format!("<{source}|{title}")),
                "{question}: {echoed}"
            );
        }
        let score = citations[0]["score"].as_f64().unwrap();
        assert!(score > 0.0 && score <= 1.0, "{score}");
        assert!(!echoed.contains("var x"), "scripts are not text: {echoed}");
    }

    // The search endpoint explains the lexical branch.
    let v: Value = client()
        .post(format!("{}/v1/retrievers/policies/search", gw.base))
        .json(&json!({"query": "发票", "top_k": 2, "explain": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["source"], "invoice.txt", "{v}");
    assert_eq!(v["data"][0]["ranks"]["lexical"]["rank"], 1, "{v}");
    // A filter on jsonl metadata.
    let v: Value = client()
        .post(format!("{}/v1/retrievers/policies/search", gw.base))
        .json(&json!({"query": "security key VPN passwords", "filter": {"team": "it"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sources: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources.len(), 2, "{v}");
    assert!(sources.contains(&"pw") && sources.contains(&"vpn"), "{v}");

    // Privacy: passages from the private retriever keep the request off the
    // commercial target; the public one on the same route goes to it.
    let (provider, _, _, _) = ask(&gw, "public", "refunds").await;
    assert_eq!(provider, "fake");
    let seen = fake.requests().len();
    let (provider, retrieval, _, _) = ask(&gw, "internal", "refunds").await;
    assert_eq!(provider, "sandbox");
    assert!(retrieval.starts_with("secret="), "{retrieval}");
    assert_eq!(
        fake.requests().len(),
        seen,
        "no private passage reached the fake"
    );

    // Re-ingest after a change and a deletion, with --prune: the running
    // gateway serves the new index.
    std::fs::write(
        docs.join("refunds.md"),
        "# Refunds\n\nA refund is issued within ten business days, by bank transfer only.\n",
    )
    .unwrap();
    std::fs::remove_file(docs.join("travel.html")).unwrap();
    let out = ingest(&config, "policies", &docs, true);
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        summary.contains("0 new, 1 changed, 5 unchanged, 1 removed"),
        "{summary}"
    );
    let (_, _, echoed, citations) = ask(&gw, "ask", "refunds").await;
    assert_eq!(first_source(&citations), "refunds.md");
    assert!(echoed.contains("ten business days"), "{echoed}");
    assert!(!echoed.contains("five business days"), "{echoed}");
    let (_, _, echoed, citations) = ask(&gw, "ask", "How do I book flights?").await;
    assert!(
        citations
            .as_array()
            .is_none_or(|c| c.iter().all(|c| c["source"] != "travel.html")),
        "a pruned document is gone: {echoed}"
    );
    // An unchanged corpus changes nothing.
    let out = ingest(&config, "policies", &docs, true);
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        summary.contains("0 new, 0 changed, 6 unchanged, 0 removed"),
        "{summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_during_an_ingest_see_the_old_index_or_the_new_one() {
    let fake = spawn_fake().await;
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), &fake.base_url());
    let config = dir.path().join("promptgate.yaml");
    let docs = dir.path().join("docs");
    ingest(&config, "policies", &docs, false);
    let gw = GatewayProcess::start(&config, &[]);

    // A second, larger batch: every line mentions "zephyr", which nothing
    // in the first one does. A search during the ingest finds none of them
    // or all it asks for, never a part.
    let mut lines = String::new();
    for i in 0..6000 {
        lines.push_str(&format!(
            "{{\"id\": \"bulk-{i}\", \"text\": \"Bulletin {i}: the zephyr procedure applies to site {i} and its storage rooms, warehouses and loading docks, as described in section {i}.\"}}\n"
        ));
    }
    std::fs::write(docs.join("bulk.jsonl"), lines).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["ingest", "policies"])
        .arg(&docs)
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (mut during, mut old, mut new) = (0, 0, 0);
    loop {
        let finished = child.try_wait().unwrap().is_some();
        let r = client()
            .post(format!("{}/v1/retrievers/policies/search", gw.base))
            .json(&json!({"query": "zephyr procedure", "top_k": 50}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let n = v["data"].as_array().unwrap().len();
        assert!(n == 0 || n == 50, "a half-written index: {n} results");
        if !finished {
            during += 1;
            if n == 0 {
                old += 1;
            } else {
                new += 1;
            }
        }
        if finished {
            assert!(child.wait().unwrap().success());
            assert_eq!(n, 50, "after the ingest, the new index serves");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(during > 0, "searched while the ingest ran");
    assert!(
        old > 0,
        "the old index served during the ingest ({new} new)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_route_keeps_retrieval_queries_off_commercial_embeddings() {
    let fake = spawn_fake().await;
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), &fake.base_url());
    let config = dir.path().join("promptgate.yaml");
    // An embeddings route that tries the commercial fake first, a private
    // chat route, and a dense retriever embedding through the former.
    let mut gateway = std::fs::read_to_string(&config).unwrap();
    gateway.push_str(
        "  emb:\n    targets:\n      - {provider: fake, model: chat}\n      - {provider: sandbox, model: echo}\n  secure:\n    private: true\n    provider: sandbox\n    model: echo\n",
    );
    std::fs::write(&config, gateway).unwrap();
    std::fs::write(
        dir.path().join("retrievers/dense.yaml"),
        "kind: local\npath: index/dense.db\nmode: dense\nembedding: {route: emb}\n",
    )
    .unwrap();
    for (name, route) in [("dense-public", "echo"), ("dense-secure", "secure")] {
        std::fs::write(
            dir.path().join(format!("prompts/{name}.yaml")),
            format!(
                "variables:\n  question: {{type: string}}\nlabels: {{production: 1}}\nversions:\n  1:\n    route: {route}\n    retrieval:\n      - {{retriever: dense, query: \"{{{{ question }}}}\", on_error: empty, into: passages}}\n    messages:\n      - role: user\n        content: \"{{{{ passages | length }}}} {{{{ question }}}}\"\n"
            ),
        )
        .unwrap();
    }
    // The documents are public: the fake embeds them.
    ingest(&config, "dense", &dir.path().join("docs"), false);
    assert!(!fake.requests().is_empty());
    let gw = GatewayProcess::start(&config, &[]);

    let before = fake.requests().len();
    ask(&gw, "dense-public", "refund policy").await;
    assert_eq!(
        fake.requests().len(),
        before + 1,
        "a public request's question is embedded by the first target"
    );
    let before = fake.requests().len();
    let (provider, _, _, _) = ask(&gw, "dense-secure", "internal refund question").await;
    assert_eq!(provider, "sandbox");
    // The chat extension on the private route, too.
    let r = client()
        .post(format!("{}/v1/chat/completions", gw.base))
        .json(&json!({"model": "secure", "messages": [{"role": "user", "content": "internal travel question"}],
            "retrieval": {"retriever": "dense"}}))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 500);
    assert_eq!(
        fake.requests().len(),
        before,
        "no question sent on a private route reached the commercial embeddings target"
    );
}
