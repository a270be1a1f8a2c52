//! The `chroma` kind: a Chroma vector database over its HTTP API (v2),
//! queried with embeddings computed through a gateway embeddings route.

use std::sync::Arc;

use super::Retriever;
use crate::backend::EnvLookup;
use crate::config::RetrieverConfig;

pub fn build(cfg: &RetrieverConfig, env: EnvLookup<'_>) -> Result<Arc<dyn Retriever>, String> {
    let _ = (cfg, env);
    Err("the chroma kind is not built yet".into())
}

/// The writer `promptgate ingest` fills the collection through (created when
/// missing).
pub fn writer(
    cfg: &RetrieverConfig,
    env: EnvLookup<'_>,
) -> Result<Box<dyn super::ingest::IndexWriter>, String> {
    let _ = (cfg, env);
    Err("the chroma kind is not built yet".into())
}
