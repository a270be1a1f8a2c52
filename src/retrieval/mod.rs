//! Retrieval: the knowledge half. A retriever (`retrievers/<name>.yaml`) is a
//! named source of passages for prompts: `local` (an embedded SQLite index,
//! lexical FTS5 + dense vectors, fused), `http` (an enterprise's own search
//! service, over a documented JSON contract) or `chroma` (a Chroma vector
//! database). The pipeline sees only [`Retriever`]; the kinds are files of
//! this module. Ingestion (`promptgate ingest`) lives in [`ingest`].
//!
//! Scores: every score a user sees is a similarity in [0, 1], higher is better
//! (see [`score`]); each passage also carries its per-branch ranks and raw
//! scores for debugging ([`Branches`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

pub mod chroma;
pub mod http;
pub mod ingest;
pub mod local;
pub mod score;

/// One retrieved chunk of a document.
#[derive(Debug, Clone, PartialEq)]
pub struct Passage {
    pub text: String,
    /// Where the chunk comes from (a path relative to the ingest root, a URL…).
    pub source: String,
    /// The document title and heading path, joined with " > " ("" when none).
    pub title: String,
    /// Similarity in [0, 1], higher is better (the module's one scale).
    pub score: f32,
    /// Stable id of the chunk within its retriever.
    pub chunk_id: String,
    pub metadata: Map<String, Value>,
    /// Per-branch ranks and raw scores (local searches, every mode; empty for
    /// remote kinds).
    pub branches: Branches,
}

/// Where a passage ranked in each branch of a search, for debugging
/// (`promptgate search --explain`, `"explain": true` on the search endpoint).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Branches {
    pub lexical: Option<BranchHit>,
    pub dense: Option<BranchHit>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BranchHit {
    /// 1-based rank within the branch.
    pub rank: u32,
    /// The branch's own score (BM25 for lexical, higher = better; cosine for dense).
    pub raw: f32,
}

/// A metadata filter: every key must match. A scalar matches equal values; a
/// list matches any of its values. The key `source` filters on the passage's
/// source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter(pub BTreeMap<String, FilterValue>);

#[derive(Debug, Clone, PartialEq)]
pub enum FilterValue {
    One(Value),
    AnyOf(Vec<Value>),
}

impl Filter {
    /// Reads a filter from JSON: an object of keys to scalars or lists of
    /// scalars. `None`/`null` is the empty filter. The error names the field.
    pub fn from_json(v: Option<&Value>) -> Result<Filter, SearchError> {
        let obj = match v {
            None | Some(Value::Null) => return Ok(Filter::default()),
            Some(Value::Object(o)) => o,
            Some(_) => {
                return Err(SearchError::invalid(
                    "filter",
                    "must be an object of metadata keys to values",
                ))
            }
        };
        if obj.len() > MAX_FILTER_KEYS {
            return Err(SearchError::invalid(
                "filter",
                format!("at most {MAX_FILTER_KEYS} keys"),
            ));
        }
        let scalar = |v: &Value| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_));
        let mut out = BTreeMap::new();
        for (k, v) in obj {
            let fv = match v {
                Value::Array(items) if !items.is_empty() && items.len() <= MAX_FILTER_VALUES => {
                    if !items.iter().all(scalar) {
                        return Err(SearchError::invalid(
                            &format!("filter.{k}"),
                            "a list may hold only strings, numbers or booleans",
                        ));
                    }
                    FilterValue::AnyOf(items.clone())
                }
                Value::Array(_) => {
                    return Err(SearchError::invalid(
                        &format!("filter.{k}"),
                        format!("a list must hold 1 to {MAX_FILTER_VALUES} values"),
                    ))
                }
                v if scalar(v) => FilterValue::One(v.clone()),
                _ => {
                    return Err(SearchError::invalid(
                        &format!("filter.{k}"),
                        "must be a string, number, boolean or a list of them",
                    ))
                }
            };
            out.insert(k.clone(), fv);
        }
        Ok(Filter(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a passage with this source and metadata passes the filter.
    pub fn matches(&self, source: &str, metadata: &Map<String, Value>) -> bool {
        self.0.iter().all(|(k, want)| {
            let have = if k == "source" {
                Some(Value::String(source.to_owned()))
            } else {
                metadata.get(k).cloned()
            };
            match (want, have) {
                (_, None) => false,
                (FilterValue::One(w), Some(h)) => *w == h,
                (FilterValue::AnyOf(ws), Some(h)) => ws.contains(&h),
            }
        })
    }

    /// The filter as JSON (for cache keys, logs and the http contract).
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        FilterValue::One(v) => v.clone(),
                        FilterValue::AnyOf(vs) => Value::Array(vs.clone()),
                    };
                    (k.clone(), v)
                })
                .collect(),
        )
    }
}

pub const MAX_FILTER_KEYS: usize = 16;
pub const MAX_FILTER_VALUES: usize = 64;
/// The longest query accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;
/// The most passages one search returns.
pub const MAX_TOP_K: u32 = 100;

/// One search.
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    pub query: String,
    pub top_k: u32,
    pub filter: Filter,
}

impl Search {
    /// Checks the client-controlled sizes; the error names the field.
    pub fn validate(&self) -> Result<(), SearchError> {
        if self.query.trim().is_empty() {
            return Err(SearchError::invalid("query", "must not be empty"));
        }
        if self.query.len() > MAX_QUERY_BYTES {
            return Err(SearchError::invalid(
                "query",
                format!("is longer than {MAX_QUERY_BYTES} bytes"),
            ));
        }
        if self.top_k == 0 || self.top_k > MAX_TOP_K {
            return Err(SearchError::invalid(
                "top_k",
                format!("must be from 1 to {MAX_TOP_K}"),
            ));
        }
        Ok(())
    }
}

/// Why a search failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SearchError {
    /// The search itself is invalid (a client error: 400 naming the field).
    #[error("invalid `{field}`: {message}")]
    Invalid { field: String, message: String },
    /// The retriever did not answer within its timeout (504).
    #[error("retriever timed out after {0:?}")]
    Timeout(Duration),
    /// The retriever (its service, index or embedding route) failed (502).
    #[error("{0}")]
    Failed(String),
}

impl SearchError {
    pub fn invalid(field: &str, message: impl Into<String>) -> SearchError {
        SearchError::Invalid {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Which side of retrieval a text is embedded for: many embedding models
/// treat questions and documents differently (E5's `query: ` / `passage: `
/// prefixes, an `input_type` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Query,
    Document,
}

/// Turns texts into vectors through one of the gateway's embeddings routes.
/// The gateway implements it over its own embeddings pipeline (fallback,
/// breakers, metrics included); the retriever's embedding settings (prefix,
/// extra fields per side) are applied by the caller, [`EmbeddingSpec::request`].
pub trait Embedder: Send + Sync {
    fn embed<'a>(
        &'a self,
        spec: &'a EmbeddingSpec,
        side: Side,
        texts: Vec<String>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, SearchError>>;
}

/// How a retriever embeds text: the gateway route, and per side a prefix and
/// extra request fields (e.g. `input_type: query`).
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingSpec {
    pub route: String,
    pub query: EmbedSide,
    pub document: EmbedSide,
    /// Texts per embeddings request at ingest.
    pub batch: usize,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbedSide {
    pub prefix: String,
    pub extra: Map<String, Value>,
}

impl EmbeddingSpec {
    pub fn side(&self, side: Side) -> &EmbedSide {
        match side {
            Side::Query => &self.query,
            Side::Document => &self.document,
        }
    }
}

/// A retriever, as the pipeline and the CLI see it. Implementations bound
/// their own work (the caller also applies the retriever's timeout).
pub trait Retriever: Send + Sync {
    /// The top passages for `search`, best first, scores on the module's scale.
    fn search<'a>(
        &'a self,
        search: &'a Search,
        embedder: &'a dyn Embedder,
    ) -> BoxFuture<'a, Result<Vec<Passage>, SearchError>>;

    /// Changes whenever the index behind it changes (results cached under an
    /// older generation are never served). Remote kinds return 0.
    fn generation(&self) -> u64 {
        0
    }
}

/// A configured retriever, built once per snapshot.
pub struct RetrieverState {
    pub id: Arc<str>,
    pub config: Arc<crate::config::RetrieverConfig>,
    /// As built with the snapshot. `Err` holds why it could not serve (a
    /// missing or corrupt index, an unset key): the rest of the gateway
    /// serves; requests that need it follow their `on_error` policy, and
    /// [`RetrieverState::current`] tries a local index again.
    pub retriever: Result<Arc<dyn Retriever>, String>,
    /// A local index that opened after the snapshot was built (the first
    /// `promptgate ingest` into a running gateway).
    late: std::sync::OnceLock<Arc<dyn Retriever>>,
    /// When a failed local index may next be tried (at most once a second).
    retry_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How often a local index that could not be opened is tried again.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

impl RetrieverState {
    pub fn new(
        id: Arc<str>,
        config: Arc<crate::config::RetrieverConfig>,
        retriever: Result<Arc<dyn Retriever>, String>,
    ) -> RetrieverState {
        RetrieverState {
            id,
            config,
            retriever,
            late: std::sync::OnceLock::new(),
            retry_at: std::sync::Mutex::new(None),
        }
    }

    /// The retriever, or why it cannot serve. A local index that was missing
    /// or broken when the snapshot was built is opened again (at most once a
    /// second, only while it keeps failing), so the first ingest into a
    /// running gateway is picked up without a reload; later ingests are seen
    /// by the open index itself.
    pub fn current(&self) -> Result<Arc<dyn Retriever>, String> {
        let why = match &self.retriever {
            Ok(r) => return Ok(r.clone()),
            Err(why) => why,
        };
        if let Some(r) = self.late.get() {
            return Ok(r.clone());
        }
        if !matches!(self.config.kind, crate::config::RetrieverKind::Local { .. }) {
            return Err(why.clone());
        }
        {
            let now = std::time::Instant::now();
            let mut at = self.retry_at.lock().unwrap_or_else(|e| e.into_inner());
            if at.is_some_and(|t| now < t) {
                return Err(why.clone());
            }
            *at = Some(now + REOPEN_EVERY);
        }
        match local::open(&self.config) {
            Ok(r) => {
                tracing::info!(retriever = %self.id, "the retriever's index can now be opened; it serves");
                Ok(self.late.get_or_init(|| r).clone())
            }
            Err(now) => Err(now),
        }
    }
}

/// The key a remote retriever sends, read from the environment variable its
/// file names (`api_key_env`); an unset or blank variable makes the retriever
/// unavailable, and the reason names the variable, never a value.
pub fn key_from_env(
    var: Option<&str>,
    env: crate::backend::EnvLookup<'_>,
) -> Result<Option<String>, String> {
    let Some(var) = var else {
        return Ok(None);
    };
    match env(var) {
        Some(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_owned())),
        _ => Err(format!(
            "environment variable {var} (its api_key_env) is not set"
        )),
    }
}

/// Every configured retriever of a snapshot, built once.
#[derive(Default)]
pub struct Retrievers {
    map: BTreeMap<String, RetrieverState>,
}

impl Retrievers {
    /// Builds each configured retriever; one that cannot serve is kept with
    /// its reason (logged at startup, reported by `check`).
    pub fn build(
        configs: &BTreeMap<String, crate::config::RetrieverConfig>,
        env: crate::backend::EnvLookup<'_>,
    ) -> Retrievers {
        use crate::config::RetrieverKind;
        let map = configs
            .iter()
            .map(|(id, cfg)| {
                let retriever = match &cfg.kind {
                    RetrieverKind::Local { .. } => local::open(cfg),
                    RetrieverKind::Http { .. } => http::build(cfg, env),
                    RetrieverKind::Chroma { .. } => chroma::build(cfg, env),
                };
                let state =
                    RetrieverState::new(id.as_str().into(), Arc::new(cfg.clone()), retriever);
                (id.clone(), state)
            })
            .collect();
        Retrievers { map }
    }

    pub fn get(&self, id: &str) -> Option<&RetrieverState> {
        self.map.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &RetrieverState> {
        self.map.values()
    }

    /// The retrievers that cannot serve, with why.
    pub fn unavailable(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.values().filter_map(|s| match &s.retriever {
            Err(why) => Some((&*s.id, why.as_str())),
            Ok(_) => None,
        })
    }
}
