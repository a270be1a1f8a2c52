//! `promptgate ingest` through the binary: what it refuses, and how it says so.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_promptgate"))
}

/// A gateway folder with a sandbox provider and the given retriever files.
fn config(dir: &Path, retrievers: &[(&str, &str)]) {
    std::fs::write(
        dir.join("promptgate.yaml"),
        "listen: 127.0.0.1:0\nroutes:\n  echo:\n    provider: sandbox\n    model: echo\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("providers")).unwrap();
    std::fs::write(
        dir.join("providers/sandbox.yaml"),
        "kind: sandbox\nsandbox:\n  models:\n    echo:\n      reply: echo\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("retrievers")).unwrap();
    for (name, text) in retrievers {
        std::fs::write(dir.join("retrievers").join(name), text).unwrap();
    }
}

fn ingest(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = bin()
        .arg("ingest")
        .args(args)
        .arg("--config")
        .arg(dir.join("promptgate.yaml"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ingest_refuses_unknown_and_http_retrievers_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    config(
        dir.path(),
        &[(
            "search-service.yaml",
            "kind: http\nurl: http://127.0.0.1:1/search\n",
        )],
    );
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "Some text.").unwrap();
    let docs = docs.to_str().unwrap();

    let (ok, err) = ingest(dir.path(), &["nope", docs]);
    assert!(!ok);
    assert!(
        err.contains("no retriever `nope` (retrievers: search-service)"),
        "{err}"
    );

    let (ok, err) = ingest(dir.path(), &["search-service", docs]);
    assert!(!ok);
    assert!(
        err.contains("an http retriever is indexed by its own service"),
        "{err}"
    );
}

#[test]
fn ingest_reports_an_invalid_configuration() {
    let dir = tempfile::tempdir().unwrap();
    config(
        dir.path(),
        &[("kb.yaml", "kind: local\nmode: dense\npath: kb.sqlite\n")],
    );
    let (ok, err) = ingest(dir.path(), &["kb", "."]);
    assert!(!ok);
    assert!(
        err.contains("kb.yaml: embedding: mode `dense` needs"),
        "{err}"
    );
    assert!(!err.contains("sandbox"), "{err}");
}
