//! `promptgate search` through the real binary, over a local index built
//! through the library's writer with document vectors from the gateway's own
//! (sandbox) embeddings route: the query is embedded through the same route.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use promptgate::pipeline::embedder::GatewayEmbedder;
use promptgate::retrieval::ingest::{Chunk, Document};
use promptgate::retrieval::{Embedder, Side};
use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_promptgate"))
}

const DOCS: &[(&str, &str, &str)] = &[
    (
        "returns.md",
        "zh",
        "商品签收后七天内可以无理由退货，退货时请保持商品完好。",
    ),
    (
        "invoice.md",
        "zh",
        "报销时须提供增值税发票，发票抬头必须是公司全称。",
    ),
    (
        "refunds.md",
        "en",
        "A refund is issued to the original payment method within five business days.",
    ),
    (
        "travel.md",
        "en",
        "Employees on a business trip book travel through the company portal.",
    ),
];

fn write_config(dir: &Path, mode: &str) {
    common::write_config(
        dir,
        "routes:\n  chat:\n    provider: sb\n    model: echo\n  embed:\n    provider: sb\n    model: echo\n",
        &[(
            "sb.yaml".into(),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {embedding_dims: 32}\n".into(),
        )],
    );
    std::fs::create_dir_all(dir.join("retrievers")).unwrap();
    let embedding = if mode == "lexical" {
        String::new()
    } else {
        "embedding: {route: embed}\n".into()
    };
    std::fs::write(
        dir.join("retrievers/kb.yaml"),
        format!("kind: local\npath: index/kb.db\nmode: {mode}\n{embedding}top_k: 3\n"),
    )
    .unwrap();
}

/// Builds the index as `promptgate ingest` would: one chunk per document,
/// vectors through the gateway's `embed` route.
async fn build_index(dir: &Path, dense: bool) {
    let config = dir.join("promptgate.yaml");
    let (gw, cfg) = promptgate::load(&config, &common::test_env).unwrap();
    let rcfg = cfg.retrievers.get("kb").unwrap();
    let embedder = GatewayEmbedder {
        gateway: Arc::clone(&gw),
        request_id: "test-ingest".into(),
        private: false,
    };
    let mut w = promptgate::retrieval::local::writer(rcfg).unwrap();
    for (source, lang, text) in DOCS {
        let mut metadata = serde_json::Map::new();
        metadata.insert("lang".into(), Value::String((*lang).into()));
        let doc = Document {
            source: (*source).into(),
            hash: format!("sha256:{:016x}", text.len()),
            title: source.trim_end_matches(".md").into(),
            metadata,
        };
        let chunks = [Chunk {
            text: (*text).into(),
            title: doc.title.clone(),
            position: 0,
            tokens: 20,
        }];
        let vectors = if dense {
            let spec = rcfg.embedding.as_ref().unwrap();
            Some(
                embedder
                    .embed(spec, Side::Document, vec![(*text).into()])
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        w.put(&doc, &chunks, vectors.as_deref()).await.unwrap();
    }
    w.commit().await.unwrap();
}

fn search(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = bin()
        .arg("search")
        .args(args)
        .arg("--config")
        .arg(dir.join("promptgate.yaml"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn search_prints_ranked_passages_and_explains_them() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "lexical");

    // Before any ingest: a clear message.
    let (ok, _, err) = search(dir.path(), &["kb", "退货"]);
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");
    assert!(err.contains("promptgate ingest kb PATH"), "{err}");

    build_index(dir.path(), false).await;
    let (ok, out, err) = search(dir.path(), &["kb", "退货", "--explain"]);
    assert!(ok, "{err}");
    let first = out.lines().next().unwrap();
    assert!(first.contains("returns.md"), "{out}");
    assert!(out.contains("lexical #1 (bm25"), "{out}");
    assert!(out.contains("1 passage(s) from `kb`"), "{out}");

    // English stemming, a filter and JSON output.
    let (ok, out, err) = search(
        dir.path(),
        &[
            "kb",
            "refunds issued",
            "--json",
            "--explain",
            "--filter",
            r#"{"lang": "en"}"#,
        ],
    );
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data[0]["source"], "refunds.md");
    assert!(data.iter().all(|p| p["metadata"]["lang"] == "en"));
    let score = data[0]["score"].as_f64().unwrap();
    assert!(score > 0.0 && score <= 1.0);
    assert_eq!(data[0]["ranks"]["lexical"]["rank"], 1);
    assert!(v["generation"].as_u64().unwrap() > 0);

    // Bad input: named precisely.
    let (ok, _, err) = search(dir.path(), &["kb", "x", "--filter", "[1]"]);
    assert!(!ok);
    assert!(err.contains("filter"), "{err}");
    let (ok, _, err) = search(dir.path(), &["kb", "x", "--top-k", "0"]);
    assert!(!ok);
    assert!(err.contains("top_k"), "{err}");
    let (ok, _, err) = search(dir.path(), &["nope", "x"]);
    assert!(!ok);
    assert!(
        err.contains("no retriever `nope` (retrievers: kb)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hybrid_search_embeds_the_query_through_the_gateway_route() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "hybrid");
    build_index(dir.path(), true).await;
    // The sandbox embeds identical text identically: the passage's own text
    // is rank 1 in the dense branch (cosine 1) and in the lexical one.
    let text = DOCS[3].2;
    let (ok, out, err) = search(dir.path(), &["kb", text, "--json", "--explain"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let top = &v["data"][0];
    assert_eq!(top["source"], "travel.md");
    assert_eq!(top["ranks"]["dense"]["rank"], 1);
    assert!((top["ranks"]["dense"]["raw"].as_f64().unwrap() - 1.0).abs() < 1e-4);
    assert_eq!(top["ranks"]["lexical"]["rank"], 1);
    assert!((top["score"].as_f64().unwrap() - 1.0).abs() < 1e-6);
    // Every passage is found by the dense branch; all scores on the scale,
    // best first.
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let scores: Vec<f64> = data.iter().map(|p| p["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
}
