//! The retrieval stage: searches a request needs before its prompt renders
//! (a prompt version's hooks, the chat `retrieval` extension) and the search
//! endpoint, through one function, [`search`]: the retriever's timeout, the
//! results cache, metrics. Kind-agnostic: it sees only [`Retriever`].
//!
//! A hook's passages are trimmed (`min_score`, then `max_tokens` from the
//! lowest-ranked up) and given to the template as data. A private retriever
//! that returned a passage makes the request private.
//!
//! Queries are searched under the request's data policy
//! ([`crate::protect::protect_query`]), before any search: a sensitive value
//! in a query refuses the request (`block`), keeps the query's embeddings on
//! self-hosted targets and makes the request private (`private`), or is
//! replaced by its placeholder in what is searched (`redact`; the prompt and
//! the retriever's context template still get the query as written, and the
//! rendered request is protected as a whole afterwards).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tokio::time::Instant;

use super::embedder::GatewayEmbedder;
use super::Gateway;
use crate::canonical::{ChatRequest, Message, Role};
use crate::config::{DataPolicy, RetrieverConfig};
use crate::error::GatewayError;
use crate::metrics::{Branch, RetrievalError, RetrieverHandles};
use crate::prompt::{Hook, OnError};
use crate::protect::QueryFound;
use crate::retrieval::{Filter, Passage, RetrieverState, Search, SearchError};
use crate::snapshot::{Route, Snapshot};

/// The gateway's retrieval state that outlives snapshots: a results cache and
/// metric handles per configured retriever.
#[derive(Default)]
pub struct Retrieval {
    per: Mutex<HashMap<Arc<str>, Arc<PerRetriever>>>,
}

struct PerRetriever {
    /// The configuration the cache was made for: a changed retriever file
    /// starts a fresh cache (the same query may now mean another service).
    config: Arc<RetrieverConfig>,
    cache: Option<moka::future::Cache<Key, Arc<[Passage]>>>,
    handles: RetrieverHandles,
}

#[derive(Hash, PartialEq, Eq)]
struct Key {
    generation: u64,
    query: String,
    top_k: u32,
    /// The filter's canonical JSON (keys sorted).
    filter: String,
}

impl Retrieval {
    fn per(&self, metrics: &crate::metrics::Metrics, state: &RetrieverState) -> Arc<PerRetriever> {
        let mut map = self.per.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get(&state.id) {
            if Arc::ptr_eq(&p.config, &state.config) {
                return p.clone();
            }
            // A reload that left the file as it was keeps the cache; the
            // entry now points at the new snapshot's config, so the next
            // search is a pointer comparison again.
            if *p.config == *state.config {
                let kept = Arc::new(PerRetriever {
                    config: state.config.clone(),
                    cache: p.cache.clone(),
                    handles: p.handles.clone(),
                });
                map.insert(state.id.clone(), kept.clone());
                return kept;
            }
        }
        let cfg = &state.config;
        let cache = (!cfg.cache_ttl.is_zero() && cfg.cache_max_entries > 0).then(|| {
            moka::future::Cache::builder()
                .max_capacity(cfg.cache_max_entries)
                .time_to_live(cfg.cache_ttl)
                .build()
        });
        let p = Arc::new(PerRetriever {
            config: cfg.clone(),
            cache,
            handles: metrics.retriever_handles(&state.id),
        });
        map.insert(state.id.clone(), p.clone());
        p
    }

    /// Forgets the retrievers a new snapshot no longer has.
    pub fn prune(&self, snap: &Snapshot) {
        let mut map = self.per.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|id, _| snap.retrievers.get(id).is_some());
    }
}

/// Who searches: the request (for logs and the embeddings route) and whether
/// it is private already (its query must then be embedded on self-hosted
/// targets only, as a private retriever's always is).
#[derive(Clone)]
pub struct Caller {
    pub request_id: Arc<str>,
    pub private: bool,
    /// The request's span: each search is a child of it.
    pub trace: crate::otel::Trace,
}

/// The data policy a request's queries are searched under
/// ([`crate::protect::policy_for`]), and its route when known (the
/// detections' metric label). The default is `off`: nothing is scanned.
#[derive(Clone, Default)]
pub struct Guard {
    pub data: DataPolicy,
    pub route: Option<Arc<Route>>,
}

impl Guard {
    /// Data protection of `query` before it is searched.
    pub fn check(
        &self,
        gw: &Gateway,
        snap: &Snapshot,
        query: &str,
    ) -> Result<QueryFound, GatewayError> {
        crate::protect::protect_query(
            snap,
            self.data,
            self.route.as_deref(),
            &gw.governor.metrics,
            query,
        )
    }
}

impl Caller {
    /// This caller, private when `found` says the query must stay on
    /// self-hosted targets (cloned only then).
    fn kept<'a>(&'a self, found: &QueryFound, private: &'a mut Option<Caller>) -> &'a Caller {
        if !found.private() || self.private {
            return self;
        }
        private.insert(Caller {
            private: true,
            ..self.clone()
        })
    }
}

/// One search through `state`: validated, under the retriever's timeout,
/// through the results cache, counted. At most `search.top_k` passages, best
/// first.
pub async fn search(
    gw: &Arc<Gateway>,
    state: &RetrieverState,
    search: &Search,
    caller: &Caller,
) -> Result<Arc<[Passage]>, SearchError> {
    if !caller.trace.is_on() {
        return search_in(gw, state, search, caller).await;
    }
    let mut span = caller.trace.child(
        || format!("retrieval {}", state.id),
        opentelemetry::trace::SpanKind::Internal,
        || {
            vec![
                opentelemetry::KeyValue::new("gen_ai.operation.name", "retrieval"),
                opentelemetry::KeyValue::new("gen_ai.data_source.id", state.id.to_string()),
                opentelemetry::KeyValue::new("promptgate.retrieval.top_k", i64::from(search.top_k)),
            ]
        },
    );
    let out = search_in(gw, state, search, caller).await;
    match &out {
        Ok(p) => span.set(|| {
            opentelemetry::KeyValue::new(
                "promptgate.retrieval.passages",
                i64::try_from(p.len()).unwrap_or(i64::MAX),
            )
        }),
        Err(SearchError::Invalid { .. }) => span.failed("invalid"),
        Err(SearchError::Timeout(_)) => span.failed("timeout"),
        Err(SearchError::Failed(_)) => span.failed("failed"),
    }
    out
}

async fn search_in(
    gw: &Arc<Gateway>,
    state: &RetrieverState,
    search: &Search,
    caller: &Caller,
) -> Result<Arc<[Passage]>, SearchError> {
    let per = gw.retrieval.per(&gw.metrics, state);
    if let Err(e) = search.validate() {
        per.handles.error(RetrievalError::Invalid);
        return Err(e);
    }
    let retriever = match state.current() {
        Ok(r) => r,
        Err(why) => {
            per.handles.error(RetrievalError::Unavailable);
            return Err(SearchError::Failed(format!("it is unavailable: {why}")));
        }
    };
    let key = per.cache.as_ref().map(|_| Key {
        generation: retriever.generation(),
        query: search.query.clone(),
        top_k: search.top_k,
        filter: search.filter.to_json().to_string(),
    });
    if let (Some(cache), Some(key)) = (&per.cache, &key) {
        if let Some(hit) = cache.get(key).await {
            per.handles.cache(true);
            return Ok(hit);
        }
        per.handles.cache(false);
    }
    let cfg = &state.config;
    let embedder = GatewayEmbedder {
        gateway: gw.clone(),
        request_id: caller.request_id.clone(),
        private: cfg.private || caller.private,
    };
    let started = Instant::now();
    let result = tokio::time::timeout(cfg.timeout, retriever.search(search, &embedder)).await;
    let took = started.elapsed();
    let mut passages = match result {
        Err(_) => {
            per.handles.error(RetrievalError::Timeout);
            return Err(SearchError::Timeout(cfg.timeout));
        }
        Ok(Err(e)) => {
            per.handles.error(match e {
                SearchError::Invalid { .. } => RetrievalError::Invalid,
                SearchError::Timeout(_) => RetrievalError::Timeout,
                SearchError::Failed(_) => RetrievalError::Failed,
            });
            return Err(e);
        }
        Ok(Ok(p)) => p,
    };
    passages.truncate(usize::try_from(search.top_k).unwrap_or(usize::MAX));
    per.handles
        .searched(took, &branches(&passages), passages.len());
    let passages: Arc<[Passage]> = passages.into();
    if let (Some(cache), Some(key)) = (&per.cache, key) {
        cache.insert(key, passages.clone()).await;
    }
    Ok(passages)
}

/// The branches that produced `passages` (for the latency label): lexical
/// and/or dense for a local index, `search` for a remote kind or no result.
fn branches(passages: &[Passage]) -> Vec<Branch> {
    let lexical = passages.iter().any(|p| p.branches.lexical.is_some());
    let dense = passages.iter().any(|p| p.branches.dense.is_some());
    match (lexical, dense) {
        (false, false) => vec![Branch::Search],
        (true, false) => vec![Branch::Lexical],
        (false, true) => vec![Branch::Dense],
        (true, true) => vec![Branch::Lexical, Branch::Dense],
    }
}

/// What one retrieval put into a request: the passages it used, for the
/// response's citations.
#[derive(Debug, Clone)]
pub struct Used {
    pub retriever: Arc<str>,
    pub passages: Vec<Passage>,
}

/// Everything a request's retrievals gave it.
#[derive(Debug, Default, Clone)]
pub struct Retrieved {
    pub used: Vec<Used>,
    /// A private retriever returned at least one passage, or a query held
    /// sensitive data under the `private` policy.
    pub private: bool,
    /// What data protection found in the queries (for the audit log).
    pub protected: QueryFound,
}

impl Retrieved {
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// `retriever=count` per retriever, comma-separated (the
    /// `x-promptgate-retrieval` header).
    pub fn header(&self) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for u in &self.used {
            match counts.iter_mut().find(|(r, _)| *r == &*u.retriever) {
                Some((_, n)) => *n += u.passages.len(),
                None => counts.push((&u.retriever, u.passages.len())),
            }
        }
        counts
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `{"citations": [{retriever, source, chunk_id, score}, …]}`, the
    /// `promptgate` member of a response.
    pub fn citations_json(&self) -> Value {
        let list: Vec<Value> = self
            .used
            .iter()
            .flat_map(|u| {
                u.passages.iter().map(|p| {
                    serde_json::json!({
                        "retriever": &*u.retriever,
                        "source": p.source,
                        "chunk_id": p.chunk_id,
                        "score": score_json(p.score),
                    })
                })
            })
            .collect();
        serde_json::json!({ "citations": list })
    }
}

/// A score as JSON: six decimals, so an `f32` does not print as
/// 0.8999999761581421.
pub fn score_json(score: f32) -> Value {
    let s = (f64::from(score) * 1e6).round() / 1e6;
    serde_json::Number::from_f64(s).map_or(Value::Null, Value::Number)
}

/// A passage as a template (and the search endpoint) sees it.
pub fn passage_json(p: &Passage) -> Value {
    serde_json::json!({
        "text": p.text,
        "source": p.source,
        "title": p.title,
        "score": score_json(p.score),
        "chunk_id": p.chunk_id,
        "metadata": p.metadata,
    })
}

/// The per-branch ranks and raw scores of a passage (`explain`).
pub fn ranks_json(p: &Passage) -> Value {
    let hit = |h: &Option<crate::retrieval::BranchHit>| match h {
        Some(h) => serde_json::json!({"rank": h.rank, "raw": score_json(h.raw)}),
        None => Value::Null,
    };
    serde_json::json!({
        "lexical": hit(&p.branches.lexical),
        "dense": hit(&p.branches.dense),
    })
}

/// A failed search as the client's error: an invalid search names its field
/// (`prefix` + the field), a failure or timeout is `retrieval` (502 / 504).
pub fn search_error(retriever: &str, e: SearchError, prefix: &str) -> GatewayError {
    match e {
        SearchError::Invalid { field, message } => GatewayError::invalid(
            format!("invalid field `{prefix}{field}`: {message}"),
            Some(&format!("{prefix}{field}")),
        ),
        SearchError::Timeout(d) => GatewayError::Retrieval {
            retriever: retriever.to_owned(),
            message: format!("no answer within {}", humantime::format_duration(d)),
            timed_out: true,
        },
        SearchError::Failed(message) => GatewayError::Retrieval {
            retriever: retriever.to_owned(),
            message,
            timed_out: false,
        },
    }
}

/// Runs a prompt version's hooks concurrently, each under its `on_error`
/// policy, and trims their passages. Returns each hook's variable (its
/// passages as values) and what the request used.
pub async fn run_hooks(
    gw: &Arc<Gateway>,
    snap: &Snapshot,
    prepared: &crate::prompt::Prepared<'_>,
    caller: &Caller,
    guard: &Guard,
) -> Result<(Map<String, Value>, Retrieved), GatewayError> {
    let hooks = &prepared.version.retrieval;
    let mut searches = Vec::with_capacity(hooks.len());
    let mut found = QueryFound::default();
    // Every query is checked before any search runs.
    for i in 0..hooks.len() {
        let query = snap.prompts.hook_query(prepared, i)?;
        let mut f = guard.check(gw, snap, &query)?;
        searches.push(f.redacted.take().unwrap_or(query));
        if !f.detections.is_empty() {
            found.merge(f);
        }
    }
    let mut private = None;
    let caller = caller.kept(&found, &mut private);
    let runs = hooks
        .iter()
        .zip(searches)
        .map(|(h, query)| run_hook(gw, snap, h, query, caller));
    let results = futures_util::future::join_all(runs).await;
    let mut filled = Map::new();
    let mut out = Retrieved {
        private: found.private(),
        protected: found,
        ..Retrieved::default()
    };
    for (h, r) in hooks.iter().zip(results) {
        let (passages, private) = r?;
        out.private |= private;
        let passages = fit(passages, h.min_score, h.max_tokens).await;
        filled.insert(
            h.into.clone(),
            Value::Array(passages.iter().map(passage_json).collect()),
        );
        out.used.push(Used {
            retriever: h.retriever.as_str().into(),
            passages,
        });
    }
    Ok((filled, out))
}

/// One hook: its search, then its `on_error` policy. Returns the passages and
/// whether they came from a private retriever.
async fn run_hook(
    gw: &Arc<Gateway>,
    snap: &Snapshot,
    h: &Hook,
    query: String,
    caller: &Caller,
) -> Result<(Vec<Passage>, bool), GatewayError> {
    // A query that renders blank (an optional variable left empty) asks
    // nothing: no search, no passages.
    if query.trim().is_empty() {
        return Ok((Vec::new(), false));
    }
    let Some(state) = snap.retrievers.get(&h.retriever) else {
        // Prompt files are validated against the configured retrievers.
        return Err(GatewayError::Internal(format!(
            "retriever `{}` is not in the snapshot",
            h.retriever
        )));
    };
    let s = Search {
        query,
        top_k: h.top_k,
        filter: h.filter.clone(),
    };
    match search(gw, state, &s, caller).await {
        Ok(p) => Ok((p.to_vec(), state.config.private && !p.is_empty())),
        // Only the query comes from the request: an invalid one is the
        // variables' fault.
        Err(e @ SearchError::Invalid { .. }) => Err(GatewayError::invalid(
            format!("the query for retriever `{}`: {e}", h.retriever),
            Some("prompt.variables"),
        )),
        Err(e) => match h.on_error {
            OnError::Fail => Err(search_error(&h.retriever, e, "")),
            OnError::Empty => {
                tracing::warn!(request_id = %caller.request_id, retriever = %h.retriever, error = %crate::server::LogSafe(&e), "retrieval failed; the prompt gets no passages (on_error: empty)");
                Ok((Vec::new(), false))
            }
        },
    }
}

/// Drops passages under `min_score`, then the lowest-ranked until the rest
/// fit `max_tokens` (tiktoken cl100k). Large texts are counted off the
/// async workers.
pub async fn fit(
    mut passages: Vec<Passage>,
    min_score: Option<f32>,
    max_tokens: Option<u32>,
) -> Vec<Passage> {
    if let Some(min) = min_score {
        passages.retain(|p| p.score >= min);
    }
    let Some(max) = max_tokens else {
        return passages;
    };
    let bytes = passages
        .iter()
        .map(|p| p.text.len())
        .fold(0usize, usize::saturating_add);
    if bytes <= crate::tokens::INLINE_BYTES {
        return fit_tokens(passages, max);
    }
    let fallback = passages.clone();
    tokio::task::spawn_blocking(move || fit_tokens(passages, max))
        .await
        .unwrap_or(fallback)
}

/// The longest best-first prefix of `passages` whose texts hold at most
/// `max` tokens together.
fn fit_tokens(mut passages: Vec<Passage>, max: u32) -> Vec<Passage> {
    let mut total: u32 = 0;
    let mut keep = 0;
    for p in &passages {
        let n = crate::tokens::count(crate::tokens::Encoding::Cl100k, &p.text);
        total = total.saturating_add(n);
        if total > max {
            break;
        }
        keep += 1;
    }
    passages.truncate(keep);
    passages
}

/// The chat extension `"retrieval": {"retriever", "top_k"?, "filter"?,
/// "query"?}`, decoded once for every door (both dialects, the prompt
/// endpoint).
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalRef {
    pub retriever: String,
    pub top_k: Option<u32>,
    pub filter: Filter,
    pub query: Option<String>,
}

impl RetrievalRef {
    /// Reads the extension object; an error names the field.
    pub fn from_json(v: Value) -> Result<RetrievalRef, GatewayError> {
        let bad = |m: String, p: &str| GatewayError::invalid(m, Some(p));
        let Value::Object(mut o) = v else {
            return Err(bad(
                "`retrieval` must be an object with `retriever`".into(),
                "retrieval",
            ));
        };
        let retriever = match o.remove("retriever") {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => {
                return Err(bad(
                    "`retrieval.retriever` must be a retriever's name".into(),
                    "retrieval.retriever",
                ))
            }
        };
        let top_k = match o.remove("top_k") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) => Some(n),
                None => {
                    return Err(bad(
                        format!(
                            "invalid field `retrieval.top_k`: must be from 1 to {}",
                            crate::retrieval::MAX_TOP_K
                        ),
                        "retrieval.top_k",
                    ))
                }
            },
        };
        let filter = Filter::from_json(o.get("filter"))
            .map_err(|e| search_error(&retriever, e, "retrieval."))?;
        o.remove("filter");
        let query = match o.remove("query") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                return Err(bad(
                    "`retrieval.query` must be a string".into(),
                    "retrieval.query",
                ))
            }
        };
        if let Some(k) = o.keys().next() {
            return Err(bad(
                format!("unknown field `retrieval.{k}`"),
                &format!("retrieval.{k}"),
            ));
        }
        Ok(RetrievalRef {
            retriever,
            top_k,
            filter,
            query,
        })
    }
}

/// The chat extension: searches `r.retriever` for `r.query` (by default the
/// last user message) and inserts the passages, rendered by the retriever's
/// template, as a system message before the first non-system message.
pub async fn run_extension(
    gw: &Arc<Gateway>,
    snap: &Snapshot,
    r: RetrievalRef,
    req: &mut ChatRequest,
    caller: &Caller,
    guard: &Guard,
) -> Result<Retrieved, GatewayError> {
    let Some(state) = snap.retrievers.get(&r.retriever) else {
        return Err(GatewayError::invalid(
            format!(
                "invalid field `retrieval.retriever`: retriever `{}` is not configured",
                r.retriever
            ),
            Some("retrieval.retriever"),
        ));
    };
    let query = match r.query {
        Some(q) => q,
        None => match req.last_user_text().filter(|t| !t.trim().is_empty()) {
            Some(q) => q,
            None => {
                return Err(GatewayError::invalid(
                    "invalid field `retrieval.query`: the request has no user message to search for; give `retrieval.query`",
                    Some("retrieval.query"),
                ))
            }
        },
    };
    let mut found = guard.check(gw, snap, &query)?;
    // A redacted query is searched; the context template gets the query as
    // written (the rendered request is protected as a whole afterwards).
    let (searched, written) = match found.redacted.take() {
        Some(redacted) => (redacted, Some(query)),
        None => (query, None),
    };
    let mut private = None;
    let caller = caller.kept(&found, &mut private);
    let s = Search {
        query: searched,
        top_k: r.top_k.unwrap_or(state.config.top_k),
        filter: r.filter,
    };
    let passages = search(gw, state, &s, caller)
        .await
        .map_err(|e| search_error(&r.retriever, e, "retrieval."))?;
    let list = Value::Array(passages.iter().map(passage_json).collect());
    let written = written.as_deref().unwrap_or(&s.query);
    let text = snap.prompts.render_context(&r.retriever, &list, written)?;
    let at = req
        .messages
        .iter()
        .position(|m| !matches!(m.role, Role::System | Role::Developer))
        .unwrap_or(req.messages.len());
    req.messages.insert(at, Message::text(Role::System, text));
    Ok(Retrieved {
        private: (state.config.private && !passages.is_empty()) || found.private(),
        used: vec![Used {
            retriever: state.id.clone(),
            passages: passages.to_vec(),
        }],
        protected: found,
    })
}

/// Logs one error per retriever of `snap` that cannot serve (at startup and
/// after each reload); the rest of the gateway serves.
pub fn log_unavailable(snap: &Snapshot) {
    for (id, why) in snap.retrievers.unavailable() {
        tracing::error!(retriever = %id, reason = %why, "retriever unavailable: requests that need it follow their on_error policy");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::retrieval::{Branches, Embedder, Retriever};
    use futures_util::future::BoxFuture;
    use futures_util::FutureExt;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::Duration;

    /// A retriever whose answers name the generation they came from.
    struct Counting {
        calls: AtomicUsize,
        generation: AtomicU64,
        hang: bool,
    }

    impl Retriever for Counting {
        fn search<'a>(
            &'a self,
            search: &'a Search,
            _: &'a dyn Embedder,
        ) -> BoxFuture<'a, Result<Vec<Passage>, SearchError>> {
            async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if self.hang {
                    std::future::pending::<()>().await;
                }
                let g = self.generation.load(Ordering::SeqCst);
                Ok((0..search.top_k + 3)
                    .map(|i| passage(&format!("g{g} {} #{i}", search.query), 0.9))
                    .collect())
            }
            .boxed()
        }

        fn generation(&self) -> u64 {
            self.generation.load(Ordering::SeqCst)
        }
    }

    fn passage(text: &str, score: f32) -> Passage {
        Passage {
            text: text.into(),
            source: "doc.md".into(),
            title: String::new(),
            score,
            chunk_id: format!("c-{text}"),
            metadata: Map::new(),
            branches: Branches::default(),
        }
    }

    fn config(ttl: Duration) -> crate::config::RetrieverConfig {
        crate::config::RetrieverConfig {
            id: "kb".into(),
            file: "retrievers/kb.yaml".into(),
            description: None,
            kind: crate::config::RetrieverKind::Http {
                url: "http://127.0.0.1:9".into(),
                api_key_env: None,
                headers: Default::default(),
            },
            private: false,
            timeout: Duration::from_millis(300),
            top_k: 4,
            template: String::new(),
            cache_ttl: ttl,
            cache_max_entries: 100,
            embedding: None,
            chunk: Default::default(),
        }
    }

    fn gateway() -> (tempfile::TempDir, Arc<Gateway>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("promptgate.yaml"), "routes: {}\n").unwrap();
        std::fs::create_dir(dir.path().join("providers")).unwrap();
        std::fs::create_dir(dir.path().join("prompts")).unwrap();
        let (gw, _) = crate::load(&dir.path().join("promptgate.yaml"), &|_| None).unwrap();
        (dir, gw)
    }

    fn state(r: Arc<Counting>, ttl: Duration) -> RetrieverState {
        RetrieverState::new("kb".into(), Arc::new(config(ttl)), Ok(r))
    }

    fn counting(hang: bool) -> Arc<Counting> {
        Arc::new(Counting {
            calls: AtomicUsize::new(0),
            generation: AtomicU64::new(1),
            hang,
        })
    }

    fn ask(q: &str) -> Search {
        Search {
            query: q.into(),
            top_k: 2,
            filter: Filter::default(),
        }
    }

    fn caller() -> Caller {
        Caller {
            request_id: "req-1".into(),
            private: false,
            trace: crate::otel::Trace::default(),
        }
    }

    #[tokio::test]
    async fn repeated_searches_are_cached_and_a_new_generation_is_never_served_stale() {
        let (_dir, gw) = gateway();
        let r = counting(false);
        let st = state(r.clone(), Duration::from_secs(60));
        let first = search(&gw, &st, &ask("refunds"), &caller()).await.unwrap();
        assert_eq!(first.len(), 2, "at most top_k passages");
        assert!(first[0].text.starts_with("g1 refunds"));
        let again = search(&gw, &st, &ask("refunds"), &caller()).await.unwrap();
        assert_eq!(again, first);
        assert_eq!(
            r.calls.load(Ordering::SeqCst),
            1,
            "the repeat is a cache hit"
        );
        // Another query, or other parameters, is another entry.
        search(&gw, &st, &ask("invoices"), &caller()).await.unwrap();
        let mut wider = ask("refunds");
        wider.top_k = 3;
        search(&gw, &st, &wider, &caller()).await.unwrap();
        assert_eq!(r.calls.load(Ordering::SeqCst), 3);
        // The index changed: the cached answer is not served.
        r.generation.store(2, Ordering::SeqCst);
        let fresh = search(&gw, &st, &ask("refunds"), &caller()).await.unwrap();
        assert_eq!(r.calls.load(Ordering::SeqCst), 4);
        assert!(fresh[0].text.starts_with("g2 refunds"), "{:?}", fresh[0]);
        let metrics = String::from_utf8(gw.metrics.render()).unwrap();
        assert!(
            metrics.contains(
                "promptgate_retrieval_cache_requests_total{result=\"hit\",retriever=\"kb\"} 1"
            ),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn a_zero_ttl_turns_the_cache_off_and_a_changed_file_starts_a_fresh_cache() {
        let (_dir, gw) = gateway();
        let r = counting(false);
        let off = state(r.clone(), Duration::ZERO);
        search(&gw, &off, &ask("q"), &caller()).await.unwrap();
        search(&gw, &off, &ask("q"), &caller()).await.unwrap();
        assert_eq!(r.calls.load(Ordering::SeqCst), 2);
        let on = state(r.clone(), Duration::from_secs(60));
        search(&gw, &on, &ask("q"), &caller()).await.unwrap();
        search(&gw, &on, &ask("q"), &caller()).await.unwrap();
        assert_eq!(r.calls.load(Ordering::SeqCst), 3);
        // A reload that leaves the file unchanged (a new but equal config)
        // keeps the cached results.
        let reloaded = state(r.clone(), Duration::from_secs(60));
        search(&gw, &reloaded, &ask("q"), &caller()).await.unwrap();
        assert_eq!(r.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_search_past_its_timeout_fails_as_a_timeout() {
        let (_dir, gw) = gateway();
        let st = state(counting(true), Duration::from_secs(60));
        let e = search(&gw, &st, &ask("q"), &caller()).await.unwrap_err();
        assert!(
            matches!(e, SearchError::Timeout(d) if d == Duration::from_millis(300)),
            "{e}"
        );
        let g = search_error("kb", e, "");
        assert_eq!(g.status(), 504);
        assert_eq!(g.code(), "retrieval");
    }

    #[tokio::test]
    async fn invalid_and_unavailable_searches_fail_before_the_retriever() {
        let (_dir, gw) = gateway();
        let r = counting(false);
        let st = state(r.clone(), Duration::from_secs(60));
        let e = search(&gw, &st, &ask(&"x".repeat(9000)), &caller())
            .await
            .unwrap_err();
        let g = search_error("kb", e, "retrieval.");
        assert_eq!(g.status(), 400);
        assert!(
            matches!(&g, GatewayError::InvalidRequest { param: Some(p), .. } if p == "retrieval.query"),
            "{g:?}"
        );
        assert_eq!(r.calls.load(Ordering::SeqCst), 0);
        let down = RetrieverState::new(
            "kb".into(),
            Arc::new(config(Duration::from_secs(60))),
            Err("index file missing".into()),
        );
        let e = search(&gw, &down, &ask("q"), &caller()).await.unwrap_err();
        let g = search_error("kb", e, "");
        assert_eq!(g.status(), 502);
        assert!(g.to_string().contains("index file missing"), "{g}");
    }

    #[tokio::test]
    async fn fit_drops_low_scores_then_the_lowest_ranked_until_the_budget_holds() {
        let ps = vec![
            passage("one two three four", 0.9),
            passage("low", 0.1),
            passage("five six seven eight", 0.8),
            passage("nine ten eleven twelve", 0.7),
        ];
        let kept = fit(ps.clone(), Some(0.5), None).await;
        assert_eq!(kept.len(), 3);
        assert!(kept.iter().all(|p| p.score >= 0.5));
        // Each kept text is 4 tokens: a budget of 9 holds two.
        let kept = fit(ps.clone(), Some(0.5), Some(9)).await;
        let texts: Vec<&str> = kept.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(texts, ["one two three four", "five six seven eight"]);
        assert!(fit(ps, None, Some(1)).await.is_empty());
    }

    #[test]
    fn the_extension_object_names_the_bad_field() {
        let ok = RetrievalRef::from_json(serde_json::json!({
            "retriever": "kb", "top_k": 3, "filter": {"lang": "en"}, "query": "q"
        }))
        .unwrap();
        assert_eq!(ok.top_k, Some(3));
        assert_eq!(ok.query.as_deref(), Some("q"));
        for (v, param) in [
            (serde_json::json!("kb"), "retrieval"),
            (serde_json::json!({"top_k": 1}), "retrieval.retriever"),
            (
                serde_json::json!({"retriever": "kb", "top_k": -1}),
                "retrieval.top_k",
            ),
            (
                serde_json::json!({"retriever": "kb", "filter": [1]}),
                "retrieval.filter",
            ),
            (
                serde_json::json!({"retriever": "kb", "filter": {"a": {"b": 1}}}),
                "retrieval.filter.a",
            ),
            (
                serde_json::json!({"retriever": "kb", "query": 3}),
                "retrieval.query",
            ),
            (
                serde_json::json!({"retriever": "kb", "k": 3}),
                "retrieval.k",
            ),
        ] {
            match RetrievalRef::from_json(v.clone()) {
                Err(GatewayError::InvalidRequest { param: Some(p), .. }) => {
                    assert_eq!(p, param, "{v}")
                }
                other => panic!("{v}: {other:?}"),
            }
        }
    }

    #[test]
    fn citations_count_per_retriever_and_list_every_passage() {
        let r = Retrieved {
            used: vec![
                Used {
                    retriever: "kb".into(),
                    passages: vec![passage("a", 0.5), passage("b", 0.25)],
                },
                Used {
                    retriever: "faq".into(),
                    passages: vec![passage("c", 1.0)],
                },
                Used {
                    retriever: "kb".into(),
                    passages: vec![passage("d", 0.125)],
                },
            ],
            ..Retrieved::default()
        };
        assert_eq!(r.header(), "kb=3,faq=1");
        let c = r.citations_json();
        assert_eq!(c["citations"].as_array().unwrap().len(), 4);
        assert_eq!(
            c["citations"][2],
            serde_json::json!({"retriever": "faq", "source": "doc.md", "chunk_id": "c-c", "score": 1.0})
        );
    }
}
