//! The gateway as an [`Embedder`]: retrievers embed queries (and `ingest`
//! embeds documents) through one of the gateway's own embeddings routes, so
//! fallback, breakers, drill faults, privacy and metrics apply to them as to
//! any client's embeddings request.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::context::RequestContext;
use super::Gateway;
use crate::canonical::{EmbeddingEncoding, EmbeddingInput, EmbeddingsRequest};
use crate::retrieval::{Embedder, EmbeddingSpec, SearchError, Side};

/// Embeds through `gateway`'s current snapshot. `private`: only self-hosted
/// targets may embed (the texts come from, or go to, a private retriever).
pub struct GatewayEmbedder {
    pub gateway: Arc<Gateway>,
    pub request_id: Arc<str>,
    pub private: bool,
}

impl Embedder for GatewayEmbedder {
    fn embed<'a>(
        &'a self,
        spec: &'a EmbeddingSpec,
        side: Side,
        texts: Vec<String>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, SearchError>> {
        async move {
            let s = spec.side(side);
            let n = texts.len();
            let input = if s.prefix.is_empty() {
                texts
            } else {
                texts
                    .into_iter()
                    .map(|t| format!("{}{t}", s.prefix))
                    .collect()
            };
            let req = EmbeddingsRequest {
                model: spec.route.clone(),
                input: EmbeddingInput::Texts(input),
                encoding: EmbeddingEncoding::Float,
                dimensions: None,
                user: None,
                extra: s.extra.clone(),
            };
            let snapshot = self.gateway.snapshot();
            let ctx = RequestContext::for_internal_embeddings(
                self.request_id.clone(),
                snapshot,
                &req,
                self.private,
            )
            .map_err(|e| SearchError::Failed(format!("embedding route: {e}")))?;
            let started = tokio::time::Instant::now();
            let served = self.gateway.embed(&ctx, req).await;
            self.gateway
                .metrics
                .embedding(&spec.route, started.elapsed());
            let served = served.map_err(|e| {
                SearchError::Failed(format!("embedding route `{}`: {e}", spec.route))
            })?;
            let vectors = served.value.vectors;
            if vectors.len() != n {
                return Err(SearchError::Failed(format!(
                    "embedding route `{}` returned {} vectors for {n} texts",
                    spec.route,
                    vectors.len()
                )));
            }
            Ok(vectors)
        }
        .boxed()
    }
}
