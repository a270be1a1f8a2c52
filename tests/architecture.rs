//! The layout rules of ARCHITECTURE.md that types alone do not enforce, checked
//! on the source tree: where wire formats, backend kinds, headers, metric labels
//! and the cache's dependencies may appear. Each test names the invariant it keeps.

use std::fs;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file below `dir`, with its path relative to `src/`.
fn files(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("readable source folder") {
            let p = e.expect("readable entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p
                    .strip_prefix(src())
                    .expect("below src")
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, fs::read_to_string(&p).expect("utf-8 source")));
            }
        }
    }
    out.sort();
    out
}

/// The code of a file without its `#[cfg(test)]` modules and comments: what
/// ships. (Test modules sit at the end of a file in this code base.)
fn shipped(text: &str) -> String {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    code.lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("//") || t.starts_with("///") || t.starts_with("//!"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn kind_names() -> Vec<&'static str> {
    promptgate::backend::KINDS.iter().map(|k| k.name).collect()
}

/// Invariant "a backend is one place": every kind is one file (or folder) under
/// `src/backend/`, and the old split into `wire/` + `provider/` is gone.
#[test]
fn every_kind_is_one_file_under_backend() {
    for name in kind_names() {
        let file = src().join(format!("backend/{name}.rs"));
        let folder = src().join(format!("backend/{name}/mod.rs"));
        assert!(
            file.is_file() || folder.is_file(),
            "kind `{name}` has no src/backend/{name}.rs"
        );
    }
    assert!(!src().join("wire").exists() && !src().join("provider").exists());
}

/// Invariant "kinds are never matched": outside `src/backend/`, shipped code
/// names no kind, except the two client dialects at the edge (`openai`,
/// `anthropic`: the ingress decodes and encodes them) and llama.cpp's chat-template
/// environment, which `prompt` shares.
#[test]
fn outside_backend_no_code_names_a_kind() {
    let allowed = ["openai", "anthropic"];
    let mut offences = Vec::new();
    for (path, text) in files(&src()) {
        if path.starts_with("backend/") {
            continue;
        }
        let code = shipped(&text);
        for name in kind_names() {
            if allowed.contains(&name) {
                continue;
            }
            if code.contains(&format!("backend::{name}")) || code.contains(&format!("\"{name}\"")) {
                offences.push(format!("{path} names kind `{name}`"));
            }
        }
    }
    assert!(offences.is_empty(), "{offences:#?}");
}

/// Invariant "only `backend/*` knows a wire format": canonical types are not
/// serializable, so no dialect can be produced from them but by a codec.
#[test]
fn canonical_types_are_not_serializable() {
    let text = fs::read_to_string(src().join("canonical.rs")).expect("canonical.rs");
    let code = shipped(&text);
    assert!(
        !code.contains("Serialize") && !code.contains("Deserialize"),
        "canonical.rs must not derive serde traits"
    );
}

/// Invariant "the pipeline never reads headers": past the context and render
/// stages, which build the request context from them, no stage sees a header map.
#[test]
fn the_pipeline_never_reads_headers_past_its_context() {
    for (path, text) in files(&src().join("pipeline")) {
        if path.ends_with("context.rs") || path.ends_with("render.rs") {
            continue;
        }
        assert!(
            !shipped(&text).contains("HeaderMap"),
            "{path} reads headers; build what it needs into RequestContext"
        );
    }
}

/// Invariant "metrics are recorded in one place per event": label look-ups
/// happen in `metrics.rs` only (the Redis tier resolves its four handles once,
/// when it is built).
#[test]
fn metric_labels_are_resolved_only_by_the_facade() {
    for (path, text) in files(&src()) {
        if path == "metrics.rs" || path == "cache/redis.rs" {
            continue;
        }
        assert!(
            !shipped(&text).contains("with_label_values"),
            "{path} looks up metric labels; add a method to metrics.rs"
        );
    }
    let redis = fs::read_to_string(src().join("cache/redis.rs")).expect("redis.rs");
    assert_eq!(
        shipped(&redis).matches("with_label_values").count(),
        1,
        "the Redis tier resolves its handles in one place"
    );
}

/// Invariant "the cache has one entry point and no cycle; the shared tier
/// stores the canonical format": no cache file imports the façade or a dialect.
#[test]
fn the_cache_imports_neither_its_facade_nor_a_dialect() {
    for (path, text) in files(&src().join("cache")) {
        let code = shipped(&text);
        assert!(
            !code.contains("crate::cache::"),
            "{path} goes through the façade"
        );
        if path != "cache/mod.rs" {
            assert!(
                !code.contains("super::Cache") && !code.contains("use super::{Cache"),
                "{path} imports the façade"
            );
        }
        for name in kind_names() {
            assert!(
                !code.contains(&format!("backend::{name}")),
                "{path} depends on the `{name}` format"
            );
        }
        assert!(
            !code.contains("crate::dialect"),
            "{path} depends on a dialect"
        );
    }
}

/// Invariant "every error leaves through the server": a `GatewayError` becomes
/// HTTP in `server.rs` only (the admin API has its own JSON errors).
#[test]
fn only_the_server_turns_gateway_errors_into_http() {
    for (path, text) in files(&src()) {
        if path == "server.rs" {
            continue;
        }
        assert!(
            !shipped(&text).contains("impl IntoResponse for GatewayError"),
            "{path}"
        );
    }
}
