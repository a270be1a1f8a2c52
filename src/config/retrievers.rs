//! Retriever files (`retrievers/<id>.yaml`, file name = id): raw YAML structs
//! and their validation into [`RetrieverConfig`]s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{read_yaml, valid_env_name, valid_id, Problems};
use crate::retrieval::{EmbedSide, EmbeddingSpec};

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawKind {
    Local,
    Http,
    Chroma,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawMode {
    Lexical,
    Dense,
    Hybrid,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetriever {
    kind: RawKind,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    private: Option<bool>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    cache: Option<RawResultsCache>,
    #[serde(default)]
    embedding: Option<RawEmbedding>,
    #[serde(default)]
    chunk: Option<RawChunk>,
    // local
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    mode: Option<RawMode>,
    #[serde(default)]
    weights: Option<RawWeights>,
    // http, chroma
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    // chroma
    #[serde(default)]
    collection: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    database: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResultsCache {
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    max_entries: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbedding {
    route: String,
    #[serde(default)]
    query: Option<RawEmbedSide>,
    #[serde(default)]
    document: Option<RawEmbedSide>,
    #[serde(default)]
    batch: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEmbedSide {
    #[serde(default)]
    prefix: Option<String>,
    /// Shorthand for `fields: {input_type: …}`.
    #[serde(default)]
    input_type: Option<String>,
    /// Extra fields added to each embeddings request for this side.
    #[serde(default)]
    fields: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChunk {
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    overlap: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeights {
    #[serde(default)]
    lexical: Option<f64>,
    #[serde(default)]
    dense: Option<f64>,
}

// === validated ===

/// A validated retriever file.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrieverConfig {
    pub id: String,
    pub file: PathBuf,
    pub description: Option<String>,
    pub kind: RetrieverKind,
    /// Passages from it make a request private (self-hosted targets only).
    pub private: bool,
    /// Longest one search may take, query embedding included.
    pub timeout: Duration,
    /// Passages returned when a search names no `top_k`.
    pub top_k: u32,
    /// The minijinja template of the system message the chat-completions
    /// `retrieval` extension inserts; it receives `passages` and `query`.
    pub template: String,
    /// How long search results stay cached (zero: not cached).
    pub cache_ttl: Duration,
    pub cache_max_entries: u64,
    /// How it embeds text, when it does (dense/hybrid local, chroma).
    pub embedding: Option<EmbeddingSpec>,
    pub chunk: ChunkConfig,
}

impl RetrieverConfig {
    /// The kind's name, as in the file.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            RetrieverKind::Local { .. } => "local",
            RetrieverKind::Http { .. } => "http",
            RetrieverKind::Chroma { .. } => "chroma",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RetrieverKind {
    Local {
        /// The index file (absolute, resolved against the config's folder).
        path: PathBuf,
        mode: Mode,
        weights: Weights,
    },
    Http {
        url: String,
        api_key_env: Option<String>,
        headers: BTreeMap<String, String>,
    },
    Chroma {
        url: String,
        collection: String,
        tenant: String,
        database: String,
        api_key_env: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Lexical,
    Dense,
    Hybrid,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Lexical => "lexical",
            Mode::Dense => "dense",
            Mode::Hybrid => "hybrid",
        }
    }
}

/// Reciprocal rank fusion weights per branch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    pub lexical: f64,
    pub dense: f64,
}

/// How documents are cut into chunks at ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkConfig {
    /// Tokens per chunk at most (tiktoken cl100k).
    pub max_tokens: u32,
    /// Tokens of the previous chunk repeated at the start of the next.
    pub overlap: u32,
}

impl Default for ChunkConfig {
    fn default() -> Self {
        ChunkConfig {
            max_tokens: 300,
            overlap: 40,
        }
    }
}

/// The default context template: numbered passages with their sources.
pub const DEFAULT_TEMPLATE: &str = "Answer using the passages below. Cite them as [n]. If they do not contain the answer, say so.\n{% for p in passages %}\n[{{ loop.index }}] {{ p.title or p.source }}\n{{ p.text }}\n{% endfor %}";

pub fn retrievers_dir(gateway_file: &Path) -> PathBuf {
    gateway_file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("retrievers")
}

/// Loads every `retrievers/*.yaml` beside the gateway file; `routes` are the
/// configured route names (an embedding route must be one of them).
pub(super) fn load_dir(
    gateway_file: &Path,
    routes: &[&str],
    problems: &mut Problems,
) -> BTreeMap<String, RetrieverConfig> {
    let dir = retrievers_dir(gateway_file);
    let base = gateway_file.parent().unwrap_or_else(|| Path::new("."));
    let mut out = BTreeMap::new();
    let files = match super::yaml_files(&dir) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
        Err(e) => {
            problems.add(&dir, "", format!("cannot read the retrievers folder: {e}"));
            return out;
        }
    };
    for file in files {
        let Some(id) = file.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        if !valid_id(&id) {
            problems.add(
                &file,
                "",
                "a retriever file name must be letters, digits, `-` or `_` (it is the retriever id)",
            );
            continue;
        }
        if out.contains_key(&id) {
            problems.add(
                &file,
                "",
                format!("retriever `{id}` is defined twice (.yaml and .yml)"),
            );
            continue;
        }
        if let Some(raw) = read_yaml::<RawRetriever>(&file, problems) {
            if let Some(r) = validate(id.clone(), &file, base, raw, routes, problems) {
                out.insert(id, r);
            }
        }
    }
    out
}

fn validate(
    id: String,
    file: &Path,
    base: &Path,
    raw: RawRetriever,
    routes: &[&str],
    problems: &mut Problems,
) -> Option<RetrieverConfig> {
    let before = problems.list.len();
    let kind_name = match raw.kind {
        RawKind::Local => "local",
        RawKind::Http => "http",
        RawKind::Chroma => "chroma",
    };
    // Fields that belong to other kinds are mistakes worth naming.
    let mut foreign = |field: &str, present: bool, kinds: &str| {
        if present {
            problems.add(
                file,
                field,
                format!("only a {kinds} retriever has `{field}` (this one is `{kind_name}`)"),
            );
        }
    };
    let local = raw.kind == RawKind::Local;
    let chroma = raw.kind == RawKind::Chroma;
    foreign("path", !local && raw.path.is_some(), "local");
    foreign("mode", !local && raw.mode.is_some(), "local");
    foreign("weights", !local && raw.weights.is_some(), "local");
    foreign(
        "chunk",
        raw.kind == RawKind::Http && raw.chunk.is_some(),
        "local or chroma",
    );
    foreign("url", local && raw.url.is_some(), "http or chroma");
    foreign(
        "api_key_env",
        local && raw.api_key_env.is_some(),
        "http or chroma",
    );
    foreign(
        "headers",
        !matches!(raw.kind, RawKind::Http) && !raw.headers.is_empty(),
        "http",
    );
    foreign("collection", !chroma && raw.collection.is_some(), "chroma");
    foreign("tenant", !chroma && raw.tenant.is_some(), "chroma");
    foreign("database", !chroma && raw.database.is_some(), "chroma");

    let timeout = problems.duration(file, "timeout", &raw.timeout, Duration::from_secs(10));
    if timeout.is_zero() || timeout > Duration::from_secs(600) {
        problems.add(file, "timeout", "must be longer than zero and at most 10m");
    }
    let top_k = raw.top_k.unwrap_or(4);
    if top_k == 0 || top_k > crate::retrieval::MAX_TOP_K {
        problems.add(
            file,
            "top_k",
            format!("must be from 1 to {}", crate::retrieval::MAX_TOP_K),
        );
    }
    let (cache_ttl, cache_max_entries) = match &raw.cache {
        None => (Duration::from_secs(300), 10_000),
        Some(c) => (
            problems.duration(file, "cache.ttl", &c.ttl, Duration::from_secs(300)),
            c.max_entries.unwrap_or(10_000),
        ),
    };
    let embedding = raw.embedding.map(|e| {
        if !routes.contains(&e.route.as_str()) {
            problems.add(
                file,
                "embedding.route",
                format!("route `{}` is not configured", e.route),
            );
        }
        let side = |s: Option<RawEmbedSide>| {
            let s = s.unwrap_or_default();
            let mut extra = s.fields;
            if let Some(t) = s.input_type {
                extra.insert("input_type".into(), Value::String(t));
            }
            EmbedSide {
                prefix: s.prefix.unwrap_or_default(),
                extra,
            }
        };
        let batch = e.batch.unwrap_or(32);
        if batch == 0 || batch > 2048 {
            problems.add(file, "embedding.batch", "must be from 1 to 2048");
        }
        EmbeddingSpec {
            route: e.route,
            query: side(e.query),
            document: side(e.document),
            batch: batch.clamp(1, 2048),
        }
    });
    let chunk = match raw.chunk {
        None => ChunkConfig::default(),
        Some(c) => {
            let d = ChunkConfig::default();
            let max_tokens = c.max_tokens.unwrap_or(d.max_tokens);
            let overlap = c.overlap.unwrap_or(d.overlap.min(max_tokens / 4));
            if !(16..=8192).contains(&max_tokens) {
                problems.add(file, "chunk.max_tokens", "must be from 16 to 8192");
            }
            if overlap >= max_tokens / 2 {
                problems.add(
                    file,
                    "chunk.overlap",
                    "must be less than half of chunk.max_tokens",
                );
            }
            ChunkConfig {
                max_tokens,
                overlap,
            }
        }
    };
    let url = |problems: &mut Problems, raw: Option<String>| -> String {
        match raw {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                u.trim_end_matches('/').to_owned()
            }
            Some(_) => {
                problems.add(file, "url", "must be an http:// or https:// URL");
                String::new()
            }
            None => {
                problems.add(file, "url", format!("a {kind_name} retriever needs `url`"));
                String::new()
            }
        }
    };
    let key_env = |problems: &mut Problems, v: Option<String>| {
        let v = v.filter(|v| !v.is_empty());
        if let Some(name) = &v {
            if !valid_env_name(name) {
                problems.add(
                    file,
                    "api_key_env",
                    "must be the name of an environment variable",
                );
            }
        }
        v
    };
    let kind = match raw.kind {
        RawKind::Local => {
            let mode = match raw.mode.unwrap_or(if embedding.is_some() {
                RawMode::Hybrid
            } else {
                RawMode::Lexical
            }) {
                RawMode::Lexical => Mode::Lexical,
                RawMode::Dense => Mode::Dense,
                RawMode::Hybrid => Mode::Hybrid,
            };
            if mode != Mode::Lexical && embedding.is_none() {
                problems.add(
                    file,
                    "embedding",
                    format!(
                        "mode `{}` needs `embedding: {{route: NAME}}` (an embeddings route of this gateway)",
                        mode.as_str()
                    ),
                );
            }
            let weights = raw.weights.as_ref().map_or(
                Weights {
                    lexical: 1.0,
                    dense: 1.0,
                },
                |w| Weights {
                    lexical: w.lexical.unwrap_or(1.0),
                    dense: w.dense.unwrap_or(1.0),
                },
            );
            for (f, w) in [
                ("weights.lexical", weights.lexical),
                ("weights.dense", weights.dense),
            ] {
                if !(0.0..=100.0).contains(&w) {
                    problems.add(file, f, "must be from 0 to 100");
                }
            }
            let path = match raw.path {
                Some(p) if !p.trim().is_empty() => base.join(p),
                _ => {
                    problems.add(
                        file,
                        "path",
                        "a local retriever needs `path`, its index file (relative to the gateway file)",
                    );
                    PathBuf::new()
                }
            };
            RetrieverKind::Local {
                path,
                mode,
                weights,
            }
        }
        RawKind::Http => RetrieverKind::Http {
            url: url(problems, raw.url),
            api_key_env: key_env(problems, raw.api_key_env),
            headers: raw.headers,
        },
        RawKind::Chroma => {
            if embedding.is_none() {
                problems.add(
                    file,
                    "embedding",
                    "a chroma retriever needs `embedding: {route: NAME}` (queries are embedded through the gateway)",
                );
            }
            let name = |problems: &mut Problems, field: &str, v: Option<String>, d: &str| {
                let v = v.unwrap_or_else(|| d.to_owned());
                if v.is_empty()
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    problems.add(file, field, "must be letters, digits, `-`, `_` or `.`");
                }
                v
            };
            RetrieverKind::Chroma {
                url: url(problems, raw.url),
                collection: name(problems, "collection", raw.collection, ""),
                tenant: name(problems, "tenant", raw.tenant, "default_tenant"),
                database: name(problems, "database", raw.database, "default_database"),
                api_key_env: key_env(problems, raw.api_key_env),
            }
        }
    };
    let template = raw.template.unwrap_or_else(|| DEFAULT_TEMPLATE.to_owned());
    if problems.list.len() > before {
        return None;
    }
    Some(RetrieverConfig {
        id,
        file: file.to_owned(),
        description: raw.description,
        kind,
        private: raw.private.unwrap_or(false),
        timeout,
        top_k,
        template,
        cache_ttl,
        cache_max_entries,
        embedding,
        chunk,
    })
}
