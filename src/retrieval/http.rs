//! The `http` kind: an enterprise's own retrieval service over a documented
//! JSON contract (`POST {query, top_k, filter}` → `{results: [{text, score,
//! source, metadata}]}`).

use std::sync::Arc;

use super::Retriever;
use crate::backend::EnvLookup;
use crate::config::RetrieverConfig;

pub fn build(cfg: &RetrieverConfig, env: EnvLookup<'_>) -> Result<Arc<dyn Retriever>, String> {
    let _ = (cfg, env);
    Err("the http kind is not built yet".into())
}
