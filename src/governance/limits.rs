//! Rate limits per key and per route: requests per minute, tokens per minute
//! and concurrent requests.

use crate::canonical::{ChatRequest, EmbeddingsRequest};
use crate::config::RateLimitStore;
use crate::error::GatewayError;
use crate::metrics::GovMetrics;
use crate::pipeline::RequestContext;

use super::Ledger;

/// The limit counters (process-wide; they outlive snapshots).
pub struct Limiter {}

/// What an admitted request holds: concurrency slots, the tokens it reserved,
/// and the `x-ratelimit-*` headers for its response.
#[derive(Default)]
pub struct Held {
    pub headers: Vec<(&'static str, String)>,
}

impl Limiter {
    pub fn new(store: &RateLimitStore, metrics: &GovMetrics) -> Result<Limiter, String> {
        let _ = (store, metrics);
        Ok(Limiter {})
    }

    /// Admits the request under its key's and its route's limits, or a 429
    /// (`GatewayError::Limited`) with `Retry-After` and `x-ratelimit-*` headers.
    pub async fn acquire(
        &self,
        ctx: &RequestContext,
        chat: Option<&ChatRequest>,
        embeddings: Option<&EmbeddingsRequest>,
    ) -> Result<Held, GatewayError> {
        let _ = (ctx, chat, embeddings);
        Ok(Held::default())
    }

    /// The request ended: releases its slots and settles its output tokens.
    pub fn settle(&self, held: &Held, ledger: &Ledger) {
        let _ = (held, ledger);
    }

    /// A key's current usage of its limits, for the admin API.
    pub fn usage(&self, key: &str) -> serde_json::Value {
        let _ = key;
        serde_json::Value::Null
    }
}
