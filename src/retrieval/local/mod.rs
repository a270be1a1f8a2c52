//! The `local` kind: one SQLite file per retriever (FTS5 BM25 over
//! jieba-segmented, stemmed text; dense vectors searched by exact cosine;
//! hybrid by reciprocal rank fusion).
//!
//! Files: [`store`] (schema, opening, the writer), [`lexical`] (segmentation,
//! the FTS5 query), [`dense`] (vectors, the [`dense::VectorIndex`] seam),
//! [`fuse`] (reciprocal rank fusion). Scores: [`crate::retrieval::score`].
//!
//! Searches run on the blocking pool over a small pool of read-only
//! connections (each caching its prepared statements), each search in one
//! read transaction, so it sees one generation of the index throughout. What
//! is kept in memory (document metadata for filters, the vector matrix) is
//! loaded once per index generation: a committed ingest is noticed by the
//! next search (one cached `SELECT` of the generation), without a restart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use rusqlite::{Connection, Transaction, TransactionBehavior};
use serde_json::{Map, Value};

use super::{score, BranchHit, Branches, Embedder, Passage, Retriever, Search, SearchError, Side};
use crate::config::{Mode, RetrieverConfig, RetrieverKind, Weights};
use crate::retrieval::EmbeddingSpec;

pub mod bm25;
pub mod dense;
pub mod fuse;
pub mod lexical;
pub mod store;

use dense::VectorIndex;
use fuse::rank_of;

/// Read connections kept for reuse (more may be open while searches run).
const POOL_SIZE: usize = 8;

/// Opens the retriever's index. `Err` says why it cannot serve (missing or
/// corrupt index file, a dense index without vectors), for `check` and the
/// startup log.
pub fn open(cfg: &RetrieverConfig) -> Result<Arc<dyn Retriever>, String> {
    Ok(Arc::new(LocalRetriever::open(cfg)?))
}

/// The writer `promptgate ingest` fills the index through (creating the file
/// when it does not exist yet).
pub fn writer(cfg: &RetrieverConfig) -> Result<Box<dyn super::ingest::IndexWriter>, String> {
    let RetrieverKind::Local { path, .. } = &cfg.kind else {
        return Err(format!("retriever `{}` is not a local one", cfg.id));
    };
    Ok(Box::new(store::writer(path)?))
}

/// A local index, searched.
pub struct LocalRetriever {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    path: PathBuf,
    mode: Mode,
    weights: Weights,
    embedding: Option<EmbeddingSpec>,
    pool: Mutex<Vec<Connection>>,
    /// What is cached per index generation (the latest one read).
    catalog: Mutex<Option<Arc<Catalog>>>,
    /// The generation last seen.
    generation: AtomicU64,
}

/// An index generation's chunks, documents (for filters), BM25 statistics
/// and vectors, in memory.
struct Catalog {
    generation: i64,
    docs: Vec<DocMeta>,
    /// Chunk position → `chunks.id`.
    chunks: Vec<i64>,
    /// Chunk position → position in `docs`.
    chunk_docs: Vec<u32>,
    /// `chunks.id` → chunk position.
    index_of: HashMap<i64, u32>,
    /// In-memory BM25 (`None` past [`MAX_MEMORY_CHUNKS`]: FTS5 ranks).
    bm25: Option<bm25::Bm25>,
    dense: Option<DenseRows>,
}

/// Past this many chunks the lexical branch ranks with FTS5's `bm25()`
/// rather than over postings in memory.
const MAX_MEMORY_CHUNKS: usize = 500_000;

struct DocMeta {
    source: String,
    metadata: Map<String, Value>,
}

struct DenseRows {
    /// Row of the index → chunk position.
    positions: Vec<u32>,
    index: Box<dyn VectorIndex>,
}

impl LocalRetriever {
    pub fn open(cfg: &RetrieverConfig) -> Result<LocalRetriever, String> {
        let RetrieverKind::Local {
            path,
            mode,
            weights,
        } = &cfg.kind
        else {
            return Err(format!("retriever `{}` is not a local one", cfg.id));
        };
        let conn = store::open_reader(path, &cfg.id)?;
        let generation =
            store::generation(&conn).map_err(|e| format!("index {}: {e}", path.display()))?;
        if *mode != Mode::Lexical {
            if cfg.embedding.is_none() {
                return Err(format!(
                    "mode `{}` needs `embedding: {{route: NAME}}`",
                    mode.as_str()
                ));
            }
            let c = store::counts(&conn).map_err(|e| format!("index {}: {e}", path.display()))?;
            if c.chunks > c.vectors {
                return Err(format!(
                    "index {} has no vectors for {} of its {} chunks, so mode `{}` cannot search them: run `promptgate ingest {} PATH…` with `embedding` configured (into a new index file if it was built without)",
                    path.display(),
                    c.chunks - c.vectors,
                    c.chunks,
                    mode.as_str(),
                    cfg.id
                ));
            }
        }
        // The segmenter loads once per process; not on the first search.
        lexical::warm();
        Ok(LocalRetriever {
            inner: Arc::new(Inner {
                id: cfg.id.clone(),
                path: path.clone(),
                mode: *mode,
                weights: *weights,
                embedding: cfg.embedding.clone(),
                pool: Mutex::new(vec![conn]),
                catalog: Mutex::new(None),
                generation: AtomicU64::new(generation as u64),
            }),
        })
    }
}

impl Retriever for LocalRetriever {
    fn search<'a>(
        &'a self,
        search: &'a Search,
        embedder: &'a dyn Embedder,
    ) -> BoxFuture<'a, Result<Vec<Passage>, SearchError>> {
        async move {
            search.validate()?;
            let query_vector = match (self.inner.mode, &self.inner.embedding) {
                (Mode::Lexical, _) => None,
                (_, None) => {
                    return Err(SearchError::Failed(format!(
                        "retriever `{}` has no embedding route",
                        self.inner.id
                    )))
                }
                (_, Some(spec)) => {
                    let mut vs = embedder
                        .embed(spec, Side::Query, vec![search.query.clone()])
                        .await?;
                    if vs.len() != 1 {
                        return Err(SearchError::Failed(format!(
                            "the embedding route returned {} vectors for one query",
                            vs.len()
                        )));
                    }
                    let mut v = vs.swap_remove(0);
                    if !dense::normalise(&mut v) {
                        return Err(SearchError::Failed(
                            "the embedding route returned a query vector with NaN or infinite values"
                                .into(),
                        ));
                    }
                    Some(v)
                }
            };
            let inner = self.inner.clone();
            let search = search.clone();
            tokio::task::spawn_blocking(move || inner.search(&search, query_vector.as_deref()))
                .await
                .map_err(|e| SearchError::Failed(format!("the search failed: {e}")))?
        }
        .boxed()
    }

    fn generation(&self) -> u64 {
        self.inner.current_generation()
    }
}

/// How deep each branch is read before fusing: the fused top k comes from
/// the best `max(100, 2k)` of each branch.
fn fusion_depth(k: usize) -> usize {
    (k * 2).max(100)
}

impl Inner {
    fn failed(&self, e: impl std::fmt::Display) -> SearchError {
        SearchError::Failed(format!("index {}: {e}", self.path.display()))
    }

    fn connection(&self) -> Result<Connection, SearchError> {
        if let Some(c) = self.pool.lock().ok().and_then(|mut p| p.pop()) {
            return Ok(c);
        }
        store::open_reader(&self.path, &self.id).map_err(SearchError::Failed)
    }

    fn give_back(&self, conn: Connection) {
        if let Ok(mut p) = self.pool.lock() {
            if p.len() < POOL_SIZE {
                p.push(conn);
            }
        }
    }

    /// The index's generation now (one cached `SELECT` on a pooled
    /// connection); the last one seen if the index cannot be read.
    fn current_generation(&self) -> u64 {
        let last = self.generation.load(Ordering::Relaxed);
        let Ok(conn) = self.connection() else {
            return last;
        };
        let read = store::generation(&conn);
        self.give_back(conn);
        match read {
            Ok(g) => {
                let g = g as u64;
                self.generation.store(g, Ordering::Relaxed);
                g
            }
            Err(_) => last,
        }
    }

    fn search(
        &self,
        search: &Search,
        query_vector: Option<&[f32]>,
    ) -> Result<Vec<Passage>, SearchError> {
        let mut conn = self.connection()?;
        let out = self.search_in(&mut conn, search, query_vector);
        // A connection that failed is not reused (it may be in a bad state).
        if out.is_ok() {
            self.give_back(conn);
        }
        out
    }

    fn search_in(
        &self,
        conn: &mut Connection,
        search: &Search,
        query_vector: Option<&[f32]>,
    ) -> Result<Vec<Passage>, SearchError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(|e| self.failed(e))?;
        let generation = store::generation(&tx).map_err(|e| self.failed(e))?;
        self.generation.store(generation as u64, Ordering::Relaxed);
        let k = search.top_k as usize;
        let filtered = !search.filter.is_empty();
        let catalog = self.catalog(&tx, generation)?;
        // Which documents pass the filter, by position in the catalog.
        let passes: Vec<bool> = if filtered {
            catalog
                .docs
                .iter()
                .map(|d| search.filter.matches(&d.source, &d.metadata))
                .collect()
        } else {
            Vec::new()
        };
        let keep_chunk = |i: u32| {
            !filtered
                || catalog
                    .chunk_docs
                    .get(i as usize)
                    .is_some_and(|d| passes.get(*d as usize) == Some(&true))
        };
        let depth = match self.mode {
            Mode::Hybrid => fusion_depth(k),
            _ => k,
        };
        let lexical_hits = if self.mode == Mode::Dense {
            Vec::new()
        } else {
            self.lexical(&tx, &catalog, &search.query, depth, filtered, &keep_chunk)?
        };
        let dense_hits: Vec<(i64, f32)> = match (&catalog.dense, query_vector) {
            (Some(d), Some(q)) if self.mode != Mode::Lexical => {
                if q.len() != d.index.dim() {
                    return Err(SearchError::Failed(format!(
                        "the embedding route returns vectors of {} dimensions, but index {} holds vectors of {} (was the embedding model changed? ingest again into a new index file)",
                        q.len(),
                        self.path.display(),
                        d.index.dim()
                    )));
                }
                let keep = |row: usize| keep_chunk(d.positions[row]);
                d.index
                    .search(q, depth, &keep)
                    .into_iter()
                    .map(|(row, cos)| (catalog.chunks[d.positions[row] as usize], cos))
                    .collect()
            }
            _ => Vec::new(),
        };
        let ranked: Vec<fuse::Ranked> = match self.mode {
            Mode::Lexical => lexical_hits
                .iter()
                .enumerate()
                .map(|(i, h)| fuse::Ranked {
                    row: h.row,
                    score: score::lexical(h.bm25),
                    branches: Branches {
                        lexical: Some(BranchHit {
                            rank: rank_of(i),
                            raw: h.bm25,
                        }),
                        dense: None,
                    },
                })
                .collect(),
            Mode::Dense => dense_hits
                .iter()
                .enumerate()
                .map(|(i, (row, cos))| fuse::Ranked {
                    row: *row,
                    score: score::dense(*cos),
                    branches: Branches {
                        lexical: None,
                        dense: Some(BranchHit {
                            rank: rank_of(i),
                            raw: *cos,
                        }),
                    },
                })
                .collect(),
            Mode::Hybrid => {
                let lex: Vec<(i64, f32)> = lexical_hits.iter().map(|h| (h.row, h.bm25)).collect();
                let mut fused = fuse::rrf(&lex, &dense_hits, self.weights);
                fused.truncate(k);
                fused
            }
        };
        let mut out = Vec::with_capacity(ranked.len().min(k));
        let mut fetch = tx
            .prepare_cached(
                "SELECT c.chunk_id, c.title, c.text, d.source, d.metadata
                 FROM chunks c JOIN documents d ON d.id = c.doc WHERE c.id = ?1",
            )
            .map_err(|e| self.failed(e))?;
        for r in ranked.into_iter().take(k) {
            let row = fetch
                .query_row([r.row], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, String>(4)?,
                    ))
                })
                .map_err(|e| self.failed(e))?;
            let (chunk_id, title, text, source, metadata) = row;
            let metadata = match serde_json::from_str(&metadata) {
                Ok(Value::Object(m)) => m,
                _ => Map::new(),
            };
            out.push(Passage {
                text,
                source,
                title,
                score: r.score,
                chunk_id,
                metadata,
                branches: r.branches,
            });
        }
        drop(fetch);
        // A read transaction: nothing to keep; ending it releases the snapshot.
        tx.rollback().map_err(|e| self.failed(e))?;
        Ok(out)
    }

    /// The catalog of `generation`, loaded (within `tx`, so consistent with
    /// the search) when the cached one is of another generation.
    fn catalog(&self, tx: &Transaction<'_>, generation: i64) -> Result<Arc<Catalog>, SearchError> {
        // Held while loading: concurrent searches of a new generation wait
        // for one load rather than each doing it.
        let mut cached = self
            .catalog
            .lock()
            .map_err(|_| SearchError::Failed("the index cache is poisoned".into()))?;
        if let Some(c) = cached.as_ref().filter(|c| c.generation == generation) {
            return Ok(c.clone());
        }
        let loaded = Arc::new(self.load_catalog(tx, generation)?);
        // A search still reading an older generation does not replace a newer one.
        if cached.as_ref().is_none_or(|c| c.generation < generation) {
            *cached = Some(loaded.clone());
        }
        Ok(loaded)
    }

    /// The lexical branch: BM25 over postings in memory (FTS5's `bm25()`
    /// past [`MAX_MEMORY_CHUNKS`]), best first, `keep`-ing at most `depth`.
    fn lexical(
        &self,
        tx: &Transaction<'_>,
        catalog: &Catalog,
        query: &str,
        depth: usize,
        filtered: bool,
        keep: &dyn Fn(u32) -> bool,
    ) -> Result<Vec<lexical::Hit>, SearchError> {
        let terms = lexical::query_terms(query);
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(bm) = &catalog.bm25 {
            let tokens = bm25::tokens(tx, &terms).map_err(|e| self.failed(e))?;
            let hits = bm
                .search(tx, &catalog.index_of, &tokens, depth, keep)
                .map_err(|e| self.failed(e))?;
            return Ok(hits
                .into_iter()
                .map(|(i, b)| lexical::Hit {
                    row: catalog.chunks[i as usize],
                    bm25: b as f32,
                })
                .collect());
        }
        let Some(q) = lexical::fts_query(query) else {
            return Ok(Vec::new());
        };
        let keep_row = |row: i64| catalog.index_of.get(&row).is_some_and(|i| keep(*i));
        lexical::search(tx, &q, depth, !filtered, keep_row).map_err(|e| self.failed(e))
    }

    fn load_catalog(&self, tx: &Transaction<'_>, generation: i64) -> Result<Catalog, SearchError> {
        let err = |e: rusqlite::Error| self.failed(e);
        let mut docs = Vec::new();
        let mut doc_pos: HashMap<i64, u32> = HashMap::new();
        {
            let mut stmt = tx
                .prepare("SELECT id, source, metadata FROM documents")
                .map_err(err)?;
            let mut rows = stmt.query([]).map_err(err)?;
            while let Some(r) = rows.next().map_err(err)? {
                let id: i64 = r.get(0).map_err(err)?;
                let source: String = r.get(1).map_err(err)?;
                let metadata: String = r.get(2).map_err(err)?;
                let metadata = match serde_json::from_str(&metadata) {
                    Ok(Value::Object(m)) => m,
                    _ => Map::new(),
                };
                doc_pos.insert(id, docs.len() as u32);
                docs.push(DocMeta { source, metadata });
            }
        }
        let mut chunks = Vec::new();
        let mut chunk_docs = Vec::new();
        let mut index_of = HashMap::new();
        {
            let mut stmt = tx
                .prepare("SELECT id, doc FROM chunks ORDER BY id")
                .map_err(err)?;
            let mut rows = stmt.query([]).map_err(err)?;
            while let Some(r) = rows.next().map_err(err)? {
                let id: i64 = r.get(0).map_err(err)?;
                let doc: i64 = r.get(1).map_err(err)?;
                if let Some(p) = doc_pos.get(&doc) {
                    index_of.insert(id, chunks.len() as u32);
                    chunks.push(id);
                    chunk_docs.push(*p);
                }
            }
        }
        let bm25 = if self.mode != Mode::Dense && chunks.len() <= MAX_MEMORY_CHUNKS {
            Some(bm25::Bm25::load(tx, &index_of).map_err(err)?)
        } else {
            None
        };
        let dense = if self.mode == Mode::Lexical {
            None
        } else {
            let dim: i64 = tx
                .query_row("SELECT value FROM meta WHERE key = 'dim'", [], |r| r.get(0))
                .map_err(err)?;
            let dim = usize::try_from(dim).unwrap_or(0);
            if dim == 0 {
                None
            } else {
                let mut positions = Vec::new();
                let mut matrix = Vec::new();
                let mut stmt = tx
                    .prepare("SELECT chunk, vector FROM vectors ORDER BY chunk")
                    .map_err(err)?;
                let mut rows = stmt.query([]).map_err(err)?;
                while let Some(r) = rows.next().map_err(err)? {
                    let id: i64 = r.get(0).map_err(err)?;
                    let Some(pos) = index_of.get(&id) else {
                        continue;
                    };
                    let blob = r.get_ref(1).map_err(err)?;
                    let blob = blob.as_blob().map_err(|e| self.failed(e))?;
                    if dense::extend_from_blob(blob, dim, &mut matrix) {
                        positions.push(*pos);
                    }
                }
                Some(DenseRows {
                    positions,
                    index: Box::new(dense::ExactIndex::new(dim, matrix)),
                })
            }
        };
        Ok(Catalog {
            generation,
            docs,
            chunks,
            chunk_docs,
            index_of,
            bm25,
            dense,
        })
    }
}

#[cfg(test)]
mod tests;
