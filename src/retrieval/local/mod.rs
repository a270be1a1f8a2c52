//! The `local` kind: one SQLite file per retriever (FTS5 BM25 over
//! jieba-segmented, stemmed text; dense vectors searched by exact cosine;
//! hybrid by reciprocal rank fusion).

use std::sync::Arc;

use super::Retriever;
use crate::config::RetrieverConfig;

/// Opens the retriever's index. `Err` says why it cannot serve (missing or
/// corrupt index file), for `check` and the startup log.
pub fn open(cfg: &RetrieverConfig) -> Result<Arc<dyn Retriever>, String> {
    let _ = cfg;
    Err("the local kind is not built yet".into())
}

/// The writer `promptgate ingest` fills the index through (creating the file
/// when it does not exist yet).
pub fn writer(cfg: &RetrieverConfig) -> Result<Box<dyn super::ingest::IndexWriter>, String> {
    let _ = cfg;
    Err("the local kind is not built yet".into())
}
