//! The cache stage: whether a request may use the cache is decided in one call
//! ([`admission`]); a hit is replayed here (as JSON or as a stream); a miss
//! makes the request the leader that fills the entry ([`Store`]), and identical
//! misses wait for it.

use std::time::Duration;

use tokio::time::Instant;

use super::context::RequestContext;
use super::{CacheUse, ChatOutcome, Gateway, Served};
use crate::cache::{Directive, Status};
use crate::canonical::{ChatRequest, ChatResponse, StreamEvent};
use crate::config::CacheMode;
use crate::error::UpstreamError;

/// The cache's part in a request, decided once.
pub enum Admission {
    /// The route does not cache.
    Off,
    /// The route caches, but not this request (the client's directive, or a
    /// request the policy leaves out).
    Bypass,
    /// Look the key up (`refresh`: skip the stored entry and fill it anew).
    Lookup { key: [u8; 32], refresh: bool },
}

/// Decides the cache's part in `req`, placed by `ctx`.
pub fn admission(ctx: &RequestContext, req: &ChatRequest) -> Admission {
    let route = ctx.route();
    if route.cache.mode == CacheMode::Off {
        return Admission::Off;
    }
    if ctx.directive == Directive::Bypass || !crate::cache::eligible(&route.cache, req) {
        return Admission::Bypass;
    }
    let targets: Vec<&str> = ctx.chain().iter().map(|t| &*t.id).collect();
    let prompt = ctx.prompt.as_ref().map(|p| (p.id.as_str(), p.version));
    let key = crate::cache::key_of(&crate::cache::canonical(
        &route.name,
        &targets,
        ctx.tenant.as_deref(),
        prompt,
        req,
    ));
    Admission::Lookup {
        key,
        refresh: ctx.directive == Directive::Refresh,
    }
}

/// What the cache stage hands on: an answer, or leave to call the backend
/// (holding the lease to fill, on a miss).
pub enum Cached {
    Hit(Served<ChatOutcome>),
    Miss {
        lease: Option<crate::cache::Lease>,
        cache: Option<CacheUse>,
    },
}

/// Runs the cache stage of a chat request.
pub async fn lookup(
    gw: &Gateway,
    ctx: &RequestContext,
    req: &ChatRequest,
    deadline: Instant,
) -> Cached {
    let route = ctx.route();
    match admission(ctx, req) {
        Admission::Off => Cached::Miss {
            lease: None,
            cache: None,
        },
        Admission::Bypass => {
            route.metrics(&gw.metrics).cache(Status::Bypass);
            Cached::Miss {
                lease: None,
                cache: Some(CacheUse {
                    status: Status::Bypass,
                    age: None,
                }),
            }
        }
        Admission::Lookup { key, refresh } => {
            // Its span covers waiting for an identical request's answer too.
            let mut span = ctx.trace.child(
                || "cache lookup".to_owned(),
                opentelemetry::trace::SpanKind::Internal,
                Vec::new,
            );
            let found = gw.cache.lookup(key, refresh, deadline).await;
            lookup_result(gw, ctx, req, found, refresh, &mut span)
        }
    }
}

/// A lookup's answer: a hit served, or the lease to fill.
fn lookup_result(
    gw: &Gateway,
    ctx: &RequestContext,
    req: &ChatRequest,
    found: crate::cache::Lookup,
    refresh: bool,
    span: &mut crate::otel::Child,
) -> Cached {
    let route = ctx.route();
    match found {
        crate::cache::Lookup::Hit(entry) => {
            route.metrics(&gw.metrics).cache(Status::Hit);
            span.set(|| opentelemetry::KeyValue::new("promptgate.cache", "hit"));
            ctx.trace.response(&entry.response);
            Cached::Hit(serve_hit(ctx, &entry, req.stream))
        }
        crate::cache::Lookup::Lead(lease) => {
            let status = if refresh {
                Status::Refresh
            } else {
                Status::Miss
            };
            span.set(|| opentelemetry::KeyValue::new("promptgate.cache", status.as_str()));
            route.metrics(&gw.metrics).cache(status);
            Cached::Miss {
                lease: Some(lease),
                cache: Some(CacheUse { status, age: None }),
            }
        }
    }
}

/// Answers from a cache entry, as JSON or as a replayed stream.
fn serve_hit(
    ctx: &RequestContext,
    entry: &crate::cache::Entry,
    stream: bool,
) -> Served<ChatOutcome> {
    let route = ctx.route();
    let target = route
        .targets()
        .into_iter()
        .find(|t| *t.id == entry.target)
        .or_else(|| ctx.chain().first())
        .cloned()
        .expect("a route has at least one target (validated)");
    let resp = entry.response.clone();
    let value = if stream {
        let events: Vec<Result<StreamEvent, UpstreamError>> =
            crate::backend::transport::response_events(resp)
                .into_iter()
                .map(Ok)
                .collect();
        ChatOutcome::Stream(Box::pin(futures_util::stream::iter(events)))
    } else {
        ChatOutcome::Complete(resp)
    };
    Served {
        route: route.clone(),
        target,
        arm: ctx.arm().map(|a| a.name.clone()),
        attempts: 0,
        value,
        upstream: Duration::ZERO,
        cache: Some(CacheUse {
            status: Status::Hit,
            age: Some(entry.age()),
        }),
    }
}

/// A cache lease and what the entry needs besides the response.
pub struct Store {
    pub lease: crate::cache::Lease,
    pub route: String,
    pub prompt: Option<String>,
    pub target: String,
    pub ttl: Duration,
}

impl Store {
    /// Fills the entry if the response may be cached; otherwise releases the
    /// waiters to call upstream themselves.
    pub async fn put(self, resp: &ChatResponse) {
        let entry = crate::cache::cacheable(resp).then(|| crate::cache::Entry {
            bytes: crate::cache::weight(resp),
            response: resp.clone(),
            target: self.target,
            route: self.route,
            prompt: self.prompt,
            created: std::time::SystemTime::now(),
            ttl: self.ttl,
        });
        self.lease.complete(entry).await;
    }
}
