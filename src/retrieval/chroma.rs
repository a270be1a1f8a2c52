//! The `chroma` kind: a Chroma vector database over its HTTP API (v2),
//! queried with embeddings computed through a gateway embeddings route.
//!
//! Searching: the collection's id is resolved by name
//! (`GET …/collections/{name}`) once and kept, and resolved again when Chroma
//! answers 404 (the collection was dropped and created anew); the query is
//! embedded through the retriever's embedding route ([`Side::Query`]) and
//! sent as `query_embeddings` with `n_results` = top_k and a `where` built
//! from the filter (`$eq` for a value, `$in` for a list, `$and` over keys).
//! Chroma's distances become the module's [0, 1] similarity by the
//! collection's space (see [`similarity`]).
//!
//! Ingest ([`writer`]): the collection is created when missing (cosine
//! space); each chunk is stored under [`Chunk::id`] with its vector, its text
//! and the metadata `source`, `title`, `position`, `doc_hash` plus the
//! document's scalar metadata. Chroma has no transactions: a put is applied
//! per document (upsert the new chunks, then delete the source's other
//! chunks), so a search during ingest may see some documents new and others
//! old, never a document without chunks; `commit` does nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Method};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::ingest::{Chunk, Document, IndexWriter};
use super::{
    Branches, Embedder, EmbeddingSpec, FilterValue, Passage, Retriever, Search, SearchError, Side,
};
use crate::backend::transport;
use crate::backend::EnvLookup;
use crate::config::{RetrieverConfig, RetrieverKind};
use crate::error::ErrorKind;

/// The largest answer read from Chroma (a query's documents and metadata,
/// one page of `get`).
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// How much of an error answer is read.
const ERROR_BODY_BYTES: usize = 64 * 1024;
/// Chunk ids read per `get` page when listing documents.
const PAGE: usize = 1000;
/// Chunks per upsert request.
const UPSERT_BATCH: usize = 256;
/// The least time one ingest request may take, whatever the retriever's
/// (search) timeout.
const MIN_INGEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Metadata keys the gateway writes on every chunk; a document's own
/// metadata never overrides them.
pub const SOURCE_KEY: &str = "source";
pub const TITLE_KEY: &str = "title";
pub const POSITION_KEY: &str = "position";
pub const HASH_KEY: &str = "doc_hash";

pub fn build(cfg: &RetrieverConfig, env: EnvLookup<'_>) -> Result<Arc<dyn Retriever>, String> {
    let client = Client::new(cfg, env, cfg.timeout)?;
    let embedding = cfg
        .embedding
        .clone()
        .ok_or("a chroma retriever needs `embedding: {route: NAME}`")?;
    Ok(Arc::new(ChromaRetriever {
        id: cfg.id.clone(),
        client,
        embedding,
        timeout: cfg.timeout,
        resolved: ArcSwapOption::empty(),
    }))
}

/// The writer `promptgate ingest` fills the collection through (created when
/// missing, with cosine space).
pub fn writer(cfg: &RetrieverConfig, env: EnvLookup<'_>) -> Result<Box<dyn IndexWriter>, String> {
    let client = Client::new(cfg, env, cfg.timeout.max(MIN_INGEST_TIMEOUT))?;
    Ok(Box::new(ChromaWriter {
        client,
        collection: None,
    }))
}

/// The distance space of a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    Cosine,
    L2,
    Ip,
}

impl Space {
    fn parse(s: &str) -> Option<Space> {
        match s {
            "cosine" => Some(Space::Cosine),
            "l2" => Some(Space::L2),
            "ip" => Some(Space::Ip),
            _ => None,
        }
    }
}

/// A Chroma distance as the module's similarity in [0, 1], higher is better:
///
/// - `cosine` (d = 1 − cos θ): 1 − d, clamped (the cosine, negatives as 0);
/// - `ip` (d = 1 − a·b): 1 − d, clamped (the same as cosine for normalised
///   vectors, which embedding models produce);
/// - `l2` (d = squared Euclidean distance): 1 / (1 + d), which is 1 for the
///   same vector and falls towards 0 with distance.
///
/// A distance that is not a finite number scores 0.
pub fn similarity(space: Space, d: f64) -> f32 {
    if !d.is_finite() {
        return 0.0;
    }
    let s = match space {
        Space::Cosine | Space::Ip => 1.0 - d,
        Space::L2 => 1.0 / (1.0 + d.max(0.0)),
    };
    s.clamp(0.0, 1.0) as f32
}

/// What the collection's description says its space is: the HNSW (or SPANN)
/// configuration, the legacy `hnsw:space` metadata, the schema's embedding
/// index; Chroma's default, l2, when none says.
fn space_of(collection: &Value) -> Space {
    let cfg = &collection["configuration_json"];
    [
        &cfg["hnsw"]["space"],
        &cfg["spann"]["space"],
        &collection["metadata"]["hnsw:space"],
        &collection["schema"]["keys"]["#embedding"]["float_list"]["vector_index"]["config"]
            ["space"],
    ]
    .into_iter()
    .find_map(|v| v.as_str().and_then(Space::parse))
    .unwrap_or(Space::L2)
}

/// A failed Chroma call.
#[derive(Debug)]
enum CallError {
    Timeout,
    /// Chroma answered with this status.
    Status(u16, String),
    Other(String),
}

impl CallError {
    fn text(&self) -> String {
        match self {
            CallError::Timeout => "no answer in time".into(),
            CallError::Status(s, m) => format!("Chroma answered HTTP {s}: {m}"),
            CallError::Other(m) => m.clone(),
        }
    }
}

/// The HTTP side: the transport's client, the collections URL, auth.
struct Client {
    id: String,
    client: reqwest::Client,
    /// `{url}/api/v2/tenants/{tenant}/databases/{database}/collections`
    collections: String,
    collection: String,
    headers: HeaderMap,
    secret: Option<String>,
    /// Longest one call may take.
    timeout: Duration,
}

impl Client {
    fn new(cfg: &RetrieverConfig, env: EnvLookup<'_>, timeout: Duration) -> Result<Client, String> {
        let RetrieverKind::Chroma {
            url,
            collection,
            tenant,
            database,
            api_key_env,
        } = &cfg.kind
        else {
            return Err("not a chroma retriever".into());
        };
        let secret = super::key_from_env(api_key_env.as_deref(), env)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(key) = &secret {
            let mut v = HeaderValue::from_str(key).map_err(|_| {
                "the api_key_env variable holds characters a header cannot carry".to_owned()
            })?;
            v.set_sensitive(true);
            headers.insert("x-chroma-token", v);
        }
        let root = url.trim_end_matches('/');
        let root = root.strip_suffix("/api/v2").unwrap_or(root);
        let collections =
            format!("{root}/api/v2/tenants/{tenant}/databases/{database}/collections");
        reqwest::Url::parse(&collections).map_err(|e| format!("invalid `url`: {e}"))?;
        Ok(Client {
            id: cfg.id.clone(),
            client: transport::client(timeout.min(Duration::from_secs(5)))?,
            collections,
            collection: collection.clone(),
            headers,
            secret,
            timeout,
        })
    }

    fn redact(&self, mut text: String) -> String {
        if let Some(s) = self.secret.as_deref().filter(|s| !s.is_empty()) {
            if text.contains(s) {
                text = text.replace(s, "[redacted]");
            }
        }
        text
    }

    /// One call: `path` below the collections URL, a JSON body, a JSON answer.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        let work = async {
            let mut rb = self
                .client
                .request(method, format!("{}{path}", self.collections))
                .headers(self.headers.clone());
            if let Some(b) = body {
                let bytes = serde_json::to_vec(b).map_err(|e| CallError::Other(e.to_string()))?;
                rb = rb.body(bytes);
            }
            let resp = rb.send().await.map_err(|e| {
                let e = transport::classify_transport_error(e);
                match e.kind {
                    ErrorKind::Timeout => CallError::Timeout,
                    _ => CallError::Other(format!("cannot reach Chroma: {}", e.message)),
                }
            })?;
            let status = resp.status();
            if !status.is_success() {
                let body = transport::read_body(resp, ERROR_BODY_BYTES)
                    .await
                    .unwrap_or_default();
                return Err(CallError::Status(status.as_u16(), error_text(&body)));
            }
            let body = transport::read_body(resp, MAX_RESPONSE_BYTES)
                .await
                .map_err(|e| match e.kind {
                    ErrorKind::Timeout => CallError::Timeout,
                    _ => CallError::Other(format!("reading Chroma's answer: {}", e.message)),
                })?;
            serde_json::from_slice(&body)
                .map_err(|e| CallError::Other(format!("Chroma's answer is not JSON: {e}")))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// The message of a failed call, for an error (the key scrubbed).
    fn message(&self, what: &str, e: &CallError) -> String {
        self.redact(format!("retriever `{}`: {what}: {}", self.id, e.text()))
    }
}

/// Chroma's error answers are `{"error": "NotFoundError", "message": "…"}`.
fn error_text(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let part = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let text = match (part("error"), part("message")) {
        ("", "") => String::from_utf8_lossy(body).trim().to_owned(),
        (e, "") => e.to_owned(),
        ("", m) => m.to_owned(),
        (e, m) => format!("{e}: {m}"),
    };
    match text.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text,
    }
}

/// A resolved collection.
#[derive(Debug)]
struct Collection {
    id: String,
    space: Space,
}

fn collection_of(v: &Value) -> Result<Collection, String> {
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or("Chroma's collection has no id")?;
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        return Err("Chroma's collection id is not a plain id".into());
    }
    Ok(Collection {
        id: id.to_owned(),
        space: space_of(v),
    })
}

/// The filter as a Chroma `where`: `{key: {$eq: v}}` or `{key: {$in: [..]}}`,
/// several keys under `$and`; `None` when empty.
pub fn where_of(filter: &super::Filter) -> Option<Value> {
    let mut parts: Vec<Value> = filter
        .0
        .iter()
        .map(|(k, v)| match v {
            FilterValue::One(v) => json!({ k: {"$eq": v} }),
            FilterValue::AnyOf(vs) => json!({ k: {"$in": vs} }),
        })
        .collect();
    match parts.len() {
        0 => None,
        1 => parts.pop(),
        _ => Some(json!({ "$and": parts })),
    }
}

struct ChromaRetriever {
    id: String,
    client: Client,
    embedding: EmbeddingSpec,
    timeout: Duration,
    resolved: ArcSwapOption<Collection>,
}

impl ChromaRetriever {
    fn failed(&self, what: &str, e: &CallError) -> SearchError {
        match e {
            CallError::Timeout => SearchError::Timeout(self.timeout),
            _ => SearchError::Failed(self.client.message(what, e)),
        }
    }

    async fn resolve(&self, fresh: bool) -> Result<Arc<Collection>, SearchError> {
        if !fresh {
            if let Some(c) = self.resolved.load_full() {
                return Ok(c);
            }
        }
        let name = &self.client.collection;
        let v = match self
            .client
            .call(Method::GET, &format!("/{name}"), None)
            .await
        {
            Ok(v) => v,
            Err(CallError::Status(404, _)) => {
                self.resolved.store(None);
                return Err(SearchError::Failed(format!(
                    "retriever `{}`: Chroma has no collection `{name}` (ingest into it first)",
                    self.id
                )));
            }
            Err(e) => return Err(self.failed("finding the collection", &e)),
        };
        let c = Arc::new(
            collection_of(&v)
                .map_err(|m| SearchError::Failed(format!("retriever `{}`: {m}", self.id)))?,
        );
        self.resolved.store(Some(c.clone()));
        Ok(c)
    }

    async fn run(
        &self,
        search: &Search,
        embedder: &dyn Embedder,
    ) -> Result<Vec<Passage>, SearchError> {
        let mut vectors = embedder
            .embed(&self.embedding, Side::Query, vec![search.query.clone()])
            .await?;
        let vector = vectors.pop().filter(|v| !v.is_empty()).ok_or_else(|| {
            SearchError::Failed(format!(
                "retriever `{}`: the embedding route returned no vector",
                self.id
            ))
        })?;
        let mut body = json!({
            "query_embeddings": [vector],
            "n_results": search.top_k,
            "include": ["documents", "metadatas", "distances"],
        });
        if let Some(w) = where_of(&search.filter) {
            body["where"] = w;
        }
        let mut collection = self.resolve(false).await?;
        let path = |c: &Collection| format!("/{}/query", c.id);
        let answer = match self
            .client
            .call(Method::POST, &path(&collection), Some(&body))
            .await
        {
            Err(CallError::Status(404, _)) => {
                // Dropped and created anew since it was resolved: once more.
                collection = self.resolve(true).await?;
                self.client
                    .call(Method::POST, &path(&collection), Some(&body))
                    .await
            }
            other => other,
        }
        .map_err(|e| self.failed("query", &e))?;
        let answer: QueryAnswer = serde_json::from_value(answer).map_err(|e| {
            SearchError::Failed(format!(
                "retriever `{}`: Chroma's query answer is not what its API documents: {e}",
                self.id
            ))
        })?;
        Ok(passages(answer, collection.space, search.top_k as usize))
    }
}

impl Retriever for ChromaRetriever {
    fn search<'a>(
        &'a self,
        search: &'a Search,
        embedder: &'a dyn Embedder,
    ) -> BoxFuture<'a, Result<Vec<Passage>, SearchError>> {
        async move {
            match tokio::time::timeout(self.timeout, self.run(search, embedder)).await {
                Ok(r) => r,
                Err(_) => Err(SearchError::Timeout(self.timeout)),
            }
        }
        .boxed()
    }
}

/// A column of a query answer: per query embedding, per result, a value;
/// Chroma writes `null` for what was not included or is missing.
type Column<T> = Option<Vec<Option<Vec<Option<T>>>>>;

/// A query answer: one list per query embedding (the gateway sends one).
#[derive(Deserialize)]
struct QueryAnswer {
    ids: Vec<Vec<String>>,
    #[serde(default)]
    documents: Column<String>,
    #[serde(default)]
    metadatas: Column<Map<String, Value>>,
    #[serde(default)]
    distances: Column<f64>,
}

fn first<T>(v: Option<Vec<Option<Vec<T>>>>) -> Vec<T> {
    v.and_then(|v| v.into_iter().next().flatten())
        .unwrap_or_default()
}

fn passages(answer: QueryAnswer, space: Space, top_k: usize) -> Vec<Passage> {
    let ids = answer.ids.into_iter().next().unwrap_or_default();
    let mut documents = first(answer.documents).into_iter();
    let mut metadatas = first(answer.metadatas).into_iter();
    let mut distances = first(answer.distances).into_iter();
    let mut out: Vec<Passage> = ids
        .into_iter()
        .take(top_k)
        .map(|id| {
            let text = documents.next().flatten().unwrap_or_default();
            let mut metadata = metadatas.next().flatten().unwrap_or_default();
            let score = distances
                .next()
                .flatten()
                .map_or(0.0, |d| similarity(space, d));
            let take = |m: &mut Map<String, Value>, k: &str| match m.remove(k) {
                Some(Value::String(s)) => s,
                _ => String::new(),
            };
            let source = take(&mut metadata, SOURCE_KEY);
            let title = take(&mut metadata, TITLE_KEY);
            metadata.remove(HASH_KEY);
            Passage {
                text,
                source,
                title,
                score,
                chunk_id: id,
                metadata,
                branches: Branches::default(),
            }
        })
        .collect();
    // Chroma answers nearest first; the mapping is monotone, so this only
    // settles equal scores and a misbehaving server.
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    out
}

// === ingest ===

struct ChromaWriter {
    client: Client,
    collection: Option<String>,
}

impl ChromaWriter {
    fn err(&self, what: &str, e: &CallError) -> String {
        self.client.message(what, e)
    }

    /// The collection's id, created (cosine space) when missing.
    async fn collection(&mut self) -> Result<String, String> {
        if let Some(id) = &self.collection {
            return Ok(id.clone());
        }
        let body = json!({
            "name": self.client.collection,
            "configuration": {"hnsw": {"space": "cosine"}},
            "get_or_create": true,
        });
        let v = self
            .client
            .call(Method::POST, "", Some(&body))
            .await
            .map_err(|e| self.err("creating the collection", &e))?;
        let c = collection_of(&v)?;
        if c.space != Space::Cosine {
            tracing::info!(
                collection = %self.client.collection,
                space = ?c.space,
                "the Chroma collection exists with another space than cosine; its scores follow that space's mapping"
            );
        }
        self.collection = Some(c.id.clone());
        Ok(c.id)
    }

    async fn documents_inner(&mut self) -> Result<BTreeMap<String, String>, String> {
        let id = self.collection().await?;
        let mut hashes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut offset = 0usize;
        loop {
            let body = json!({"limit": PAGE, "offset": offset, "include": ["metadatas"]});
            let page = self
                .client
                .call(Method::POST, &format!("/{id}/get"), Some(&body))
                .await
                .map_err(|e| self.err("listing documents", &e))?;
            let ids = page["ids"].as_array().map_or(0, Vec::len);
            if let Some(ms) = page["metadatas"].as_array() {
                for m in ms {
                    let (Some(source), Some(hash)) = (m[SOURCE_KEY].as_str(), m[HASH_KEY].as_str())
                    else {
                        continue;
                    };
                    hashes
                        .entry(source.to_owned())
                        .or_default()
                        .insert(hash.to_owned());
                }
            }
            if ids < PAGE {
                break;
            }
            offset = offset.saturating_add(ids);
        }
        // A document whose chunks disagree on its hash was cut short by a
        // failed put: it is reported as changed so ingest puts it again.
        Ok(hashes
            .into_iter()
            .map(|(source, set)| {
                let hash = if set.len() == 1 {
                    set.into_iter().next().unwrap_or_default()
                } else {
                    "incomplete".to_owned()
                };
                (source, hash)
            })
            .collect())
    }

    async fn put_inner(
        &mut self,
        doc: &Document,
        chunks: &[Chunk],
        vectors: Option<&[Vec<f32>]>,
    ) -> Result<(), String> {
        let vectors = vectors.ok_or(
            "the chroma kind stores vectors: ingest must embed the chunks (the retriever's `embedding`)",
        )?;
        if vectors.len() != chunks.len() {
            return Err(format!(
                "{} vectors for {} chunks of {}",
                vectors.len(),
                chunks.len(),
                doc.source
            ));
        }
        let id = self.collection().await?;
        // The document's own scalar metadata, then the gateway's keys.
        let base: Map<String, Value> = doc
            .metadata
            .iter()
            .filter(|(_, v)| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (start, part) in chunks.chunks(UPSERT_BATCH).enumerate() {
            let offset = start * UPSERT_BATCH;
            let mut ids = Vec::with_capacity(part.len());
            let mut documents = Vec::with_capacity(part.len());
            let mut metadatas = Vec::with_capacity(part.len());
            for c in part {
                ids.push(Chunk::id(doc, c.position));
                documents.push(c.text.as_str());
                let mut m = base.clone();
                m.insert(SOURCE_KEY.into(), Value::String(doc.source.clone()));
                let title = if c.title.is_empty() {
                    &doc.title
                } else {
                    &c.title
                };
                m.insert(TITLE_KEY.into(), Value::String(title.clone()));
                m.insert(POSITION_KEY.into(), Value::from(c.position));
                m.insert(HASH_KEY.into(), Value::String(doc.hash.clone()));
                metadatas.push(Value::Object(m));
            }
            let body = json!({
                "ids": ids,
                "embeddings": &vectors[offset..offset + part.len()],
                "documents": documents,
                "metadatas": metadatas,
            });
            self.client
                .call(Method::POST, &format!("/{id}/upsert"), Some(&body))
                .await
                .map_err(|e| self.err(&format!("storing {}", doc.source), &e))?;
        }
        // Then the source's older chunks: another content hash, or a position
        // past the new chunk count.
        let body = json!({"where": {"$and": [
            {SOURCE_KEY: {"$eq": doc.source}},
            {"$or": [
                {HASH_KEY: {"$ne": doc.hash}},
                {POSITION_KEY: {"$gte": chunks.len()}},
            ]},
        ]}});
        self.client
            .call(Method::POST, &format!("/{id}/delete"), Some(&body))
            .await
            .map_err(|e| self.err(&format!("removing older chunks of {}", doc.source), &e))?;
        Ok(())
    }

    async fn remove_inner(&mut self, source: &str) -> Result<(), String> {
        let id = self.collection().await?;
        let body = json!({"where": {SOURCE_KEY: {"$eq": source}}});
        self.client
            .call(Method::POST, &format!("/{id}/delete"), Some(&body))
            .await
            .map_err(|e| self.err(&format!("removing {source}"), &e))?;
        Ok(())
    }
}

impl IndexWriter for ChromaWriter {
    fn documents(&mut self) -> BoxFuture<'_, Result<BTreeMap<String, String>, String>> {
        self.documents_inner().boxed()
    }

    fn put<'a>(
        &'a mut self,
        doc: &'a Document,
        chunks: &'a [Chunk],
        vectors: Option<&'a [Vec<f32>]>,
    ) -> BoxFuture<'a, Result<(), String>> {
        self.put_inner(doc, chunks, vectors).boxed()
    }

    fn remove<'a>(&'a mut self, source: &'a str) -> BoxFuture<'a, Result<(), String>> {
        self.remove_inner(source).boxed()
    }

    /// Every put and remove is already applied (Chroma has no transactions).
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), String>> {
        async { Ok(()) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retrieval::Filter;

    #[test]
    fn distances_map_to_similarities_per_space() {
        assert_eq!(similarity(Space::Cosine, 0.0), 1.0);
        assert!((similarity(Space::Cosine, 0.25) - 0.75).abs() < 1e-6);
        assert_eq!(similarity(Space::Cosine, 1.6), 0.0);
        assert_eq!(similarity(Space::Cosine, -0.000_001), 1.0);
        assert!((similarity(Space::Ip, 0.1) - 0.9).abs() < 1e-6);
        assert_eq!(similarity(Space::L2, 0.0), 1.0);
        assert!((similarity(Space::L2, 1.0) - 0.5).abs() < 1e-6);
        assert!(similarity(Space::L2, 1e30) < 1e-6);
        assert_eq!(similarity(Space::L2, f64::NAN), 0.0);
    }

    #[test]
    fn the_space_is_read_where_chroma_keeps_it() {
        let v = json!({"configuration_json": {"hnsw": {"space": "ip"}}});
        assert_eq!(space_of(&v), Space::Ip);
        let v = json!({"configuration_json": {"hnsw": null, "spann": null}, "metadata": {"hnsw:space": "cosine"}});
        assert_eq!(space_of(&v), Space::Cosine);
        assert_eq!(space_of(&json!({})), Space::L2);
    }

    #[test]
    fn filters_become_chroma_wheres() {
        let f = |v: Value| Filter::from_json(Some(&v)).expect("a valid filter");
        assert_eq!(where_of(&f(json!({}))), None);
        assert_eq!(
            where_of(&f(json!({"lang": "zh"}))),
            Some(json!({"lang": {"$eq": "zh"}}))
        );
        assert_eq!(
            where_of(&f(json!({"lang": ["zh", "en"], "year": 2024}))),
            Some(json!({"$and": [
                {"lang": {"$in": ["zh", "en"]}},
                {"year": {"$eq": 2024}},
            ]}))
        );
    }
}
