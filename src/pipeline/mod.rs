//! The request pipeline, as plain async functions over canonical types, in
//! explicit stages, each a module:
//!
//! ```text
//! server (ingress: decode)  →  render  →  route (context)  →  cache  →  attempt loop  →  stream / egress (server: encode)
//! ```
//!
//! - [`context`]: the [`RequestContext`], every per-request decision made once
//!   at the edge: the route (resolved once), the A/B arm (picked once), privacy,
//!   the cache directive and tenant, the prompt version used.
//! - [`render`]: prompt rendering; a split over prompt versions picks its arm here.
//! - [`retrieve`]: the searches a request needs before it renders (prompt
//!   hooks, the chat `retrieval` extension) and the search endpoint's: timeout,
//!   results cache, metrics, citations.
//! - [`cache`]: the admission decision (one call), hit replay, the lease to fill.
//! - [`attempt`]: the one fallback loop, for chat and embeddings alike: retries,
//!   breakers, drill faults, capability and privacy skips, attempt history.
//! - [`stream`]: the stream commit point and the usage tap.
//! - [`forward`]: the same-dialect fast path (an OpenAI client's bytes to an
//!   OpenAI-compatible target, the answer's bytes back, through the same
//!   attempt loop and usage tap).
//! - [`health_checks`]: active health checks.
//!
//! Dialect-free: the server decodes before and encodes after.

pub mod attempt;
pub mod cache;
pub mod context;
pub mod embedder;
pub mod forward;
pub mod health_checks;
pub mod render;
pub mod retrieve;
pub mod shadow;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::backend::EventStream;
use crate::canonical::*;
use crate::error::GatewayError;
use crate::health::Book;
use crate::metrics::Metrics;
use crate::snapshot::{Arm, Route, Snapshot, Target};
use crate::tokens;

pub use context::{ClientDialect, Placement, PromptUse, RequestContext, PRIVATE_HEADER};
pub use health_checks::spawn_health_checks;

use attempt::{Answer, Chat, Embed, Won};
use cache::{Cached, Store};
use forward::{Forward, Forwarded, Raw, Reply};
use stream::UsageTap;

pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    book: Arc<Book>,
    pub cache: Arc<crate::cache::Cache>,
    pub metrics: Metrics,
    /// Retrieval results cache and per-retriever handles.
    pub retrieval: retrieve::Retrieval,
    /// Keys, limits, spend and audit: state that outlives snapshots.
    pub governor: Arc<crate::governance::Governor>,
    /// Shadow traffic's live figures and its store.
    pub shadows: shadow::Shadows,
    /// Whether the process is ready for traffic (`/readyz`): draining, or
    /// the configuration on disk invalid.
    pub readiness: crate::lifecycle::Readiness,
    /// Traces over OTLP, when `serve` started them (never set: off).
    pub tracing: std::sync::OnceLock<crate::otel::Tracing>,
}

/// How the cache took part in a response.
#[derive(Debug, Clone, Copy)]
pub struct CacheUse {
    pub status: crate::cache::Status,
    /// Age of the entry, on a hit.
    pub age: Option<Duration>,
}

/// A pipeline result plus what the edge reports about it.
pub struct Served<T> {
    pub route: Arc<Route>,
    /// The target that answered.
    pub target: Arc<Target>,
    pub arm: Option<Arc<str>>,
    pub attempts: u32,
    pub value: T,
    /// Time spent waiting on backends before the response could start.
    pub upstream: Duration,
    pub cache: Option<CacheUse>,
}

impl<T> Served<T> {
    /// The same facts with the value changed.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Served<U> {
        Served {
            route: self.route,
            target: self.target,
            arm: self.arm,
            attempts: self.attempts,
            value: f(self.value),
            upstream: self.upstream,
            cache: self.cache,
        }
    }

    /// Takes the value out, keeping the facts about who served it.
    pub fn split(self) -> (T, Served<()>) {
        (
            self.value,
            Served {
                route: self.route,
                target: self.target,
                arm: self.arm,
                attempts: self.attempts,
                value: (),
                upstream: self.upstream,
                cache: self.cache,
            },
        )
    }
}

pub enum ChatOutcome {
    Complete(ChatResponse),
    /// A stream whose first output has arrived: nothing has gone to the client yet,
    /// so a failure before this point is still an ordinary error response (and
    /// could fall back); after it, failures end the stream with an error event.
    Stream(EventStream),
}

impl Gateway {
    pub fn new(snapshot: Snapshot, book: Arc<Book>) -> Result<Arc<Self>, String> {
        let metrics = Metrics::new().map_err(|e| format!("cannot set up metrics: {e}"))?;
        let governor = crate::governance::Governor::new(&snapshot.config, &metrics.gov)?;
        let cache = crate::cache::Cache::new(
            &snapshot.config.cache,
            crate::cache::CacheMetrics {
                evictions: metrics.cache_evictions.clone(),
                redis_errors: metrics.cache_redis_errors.clone(),
            },
        );
        let shadows = shadow::Shadows::new(
            snapshot.config.shadow.path.clone(),
            snapshot.config.shadow.retention,
        );
        // Read at start, like the other limits.
        let unready_when_invalid = snapshot.config.limits.fail_readiness_on_invalid_config;
        Ok(Arc::new(Gateway {
            shadows,
            snapshot: ArcSwap::from_pointee(snapshot),
            book,
            cache,
            metrics,
            retrieval: retrieve::Retrieval::default(),
            governor,
            readiness: crate::lifecycle::Readiness::new(unready_when_invalid),
            tracing: std::sync::OnceLock::new(),
        }))
    }

    /// Updates the cache gauges (called when metrics are scraped).
    pub async fn refresh_cache_gauges(&self) {
        let (entries, bytes) = self.cache.figures().await;
        self.metrics.cache_entries.set(entries as i64);
        self.metrics.cache_bytes.set(bytes as i64);
    }

    /// Updates the gauges computed at scrape time: each route's targets and
    /// how many can take a request now, each key's budgets and its spend in
    /// them (as this replica knows it).
    pub fn refresh_scrape_gauges(&self) {
        use crate::health::BreakerState;
        use crate::metrics::{BudgetFigures, RouteFigures};
        let snap = self.snapshot();
        let up = |t: &Target| {
            let breaker = t.health.summary(&snap.breaker).0;
            // The gauge follows an open breaker's cooldown even when no
            // request comes to move it.
            if let Some(h) = t.metrics_if_used() {
                h.breaker(breaker);
            }
            matches!(t.provider, crate::backend::ProviderState::Ready(_))
                && !self.disabled(&t.provider_id)
                && breaker != BreakerState::Open
        };
        let routes: Vec<RouteFigures<'_>> = snap
            .routes()
            .map(|r| {
                let targets = r.targets();
                RouteFigures {
                    route: r.name.as_str(),
                    targets: targets.len(),
                    available: targets.iter().filter(|t| up(t)).count(),
                }
            })
            .collect();
        let mut budgets = Vec::new();
        for c in snap.access.callers() {
            let Some(b) = c.key.budget.as_ref() else {
                continue;
            };
            let spent = self.governor.spend.current_totals(&c.id);
            let periods = [
                ("daily", &b.daily, spent.day_tokens, spent.day_cost),
                ("monthly", &b.monthly, spent.month_tokens, spent.month_cost),
            ];
            for (period, limit, tokens, cost) in periods {
                let Some(l) = limit else { continue };
                if let Some(max) = l.tokens {
                    budgets.push(BudgetFigures {
                        key: &c.id,
                        period,
                        unit: "tokens",
                        limit: max as f64,
                        spent: tokens as f64,
                    });
                }
                if let Some(max) = l.cost {
                    budgets.push(BudgetFigures {
                        key: &c.id,
                        period,
                        unit: "cost",
                        limit: max,
                        spent: cost,
                    });
                }
            }
        }
        self.metrics.scraped.fill(&routes, &budgets);
    }

    /// Whether an operator took the provider out of rotation (`drain`,
    /// `disable`): the attempt loop skips its targets.
    pub fn disabled(&self, provider: &crate::ids::ProviderId) -> bool {
        self.book
            .fault(provider)
            .is_some_and(|f| f.kind == crate::health::FaultKind::Disabled)
    }

    /// The current snapshot; a request loads it once and uses it throughout.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot atomically; requests in flight keep the old one.
    pub fn swap(&self, next: Snapshot) {
        next.prune_book(&self.book);
        self.retrieval.prune(&next);
        retrieve::log_unavailable(&next);
        self.snapshot.store(Arc::new(next));
    }

    /// State that survives reloads: breakers, experiments, drill faults.
    pub fn book(&self) -> &Arc<Book> {
        &self.book
    }

    /// The request's deadline: the route's, from now.
    fn deadline(route: &Route) -> Instant {
        let now = Instant::now();
        now.checked_add(route.retry.deadline)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
    }

    /// Chat, after the context is built: cache → attempt loop → usage. `raw`
    /// is the client's body when the server found nothing in the request that
    /// needs the canonical form (an OpenAI request without a prompt, retrieval
    /// or redaction): it is forwarded as it is where the rest allows
    /// ([`forward`]).
    pub async fn chat(
        self: &Arc<Self>,
        ctx: &RequestContext,
        req: ChatRequest,
        raw: Option<bytes::Bytes>,
    ) -> Result<Served<Reply>, GatewayError> {
        let route = ctx.route();
        let snap = &ctx.snapshot;
        // The request's deadline covers waiting for an identical call too.
        let deadline = Self::deadline(route);
        let (lease, cache_use) = match cache::lookup(self, ctx, &req, deadline).await {
            Cached::Hit(served) => return Ok(served.map(Reply::Canonical)),
            Cached::Miss { lease, cache } => (lease, cache),
        };
        // A request copied to shadow candidates takes the path it would take
        // without them (its answer's bytes are the same); the copy is offered
        // once the attempt loop has chosen the answer, so a candidate's permit
        // is never held by a primary still running. The offer, the copy and
        // the task's launch are the gateway's own time, not the upstream's.
        let started = Instant::now();
        let forward = raw
            .filter(|_| snap.config.fast_path && lease.is_none() && !forward::audits_content(ctx));
        let Some(raw) = forward else {
            let won = attempt::run_chain(
                self,
                snap,
                route,
                ctx.chain(),
                &Chat(&req),
                ctx.private,
                deadline,
                &ctx.trace,
            )
            .await;
            let upstream = started.elapsed();
            let shadow = self.shadow_launch(ctx, &req);
            let won = match won {
                Ok(won) => won,
                Err(e) => {
                    shadow::primary_failed(ctx, shadow, started, &e);
                    return Err(e);
                }
            };
            return Ok(self
                .answered(ctx, req, won, started, upstream, lease, cache_use, shadow)
                .await
                .map(Reply::Canonical));
        };
        let op = Forward {
            req: &req,
            raw: &raw,
            shown: forward::shown(ctx, &route.name),
            trace: &ctx.trace,
        };
        let won = attempt::run_chain(
            self,
            snap,
            route,
            ctx.chain(),
            &op,
            ctx.private,
            deadline,
            &ctx.trace,
        )
        .await;
        let upstream = started.elapsed();
        let shadow = self.shadow_launch(ctx, &req);
        let Won {
            output,
            target,
            attempts,
            counts,
        } = match won {
            Ok(won) => won,
            Err(e) => {
                shadow::primary_failed(ctx, shadow, started, &e);
                return Err(e);
            }
        };
        let answer = match output {
            Forwarded::Canonical(answer) => answer,
            Forwarded::Whole(body, usage) => {
                let arm = ctx.arm();
                self.count_tokens(route, &target, arm.map(Arm::figures), &usage);
                if let Some(t) = &ctx.ticket {
                    t.settle(&target, &usage);
                }
                if let Some(tx) = shadow {
                    // The bytes (a reference count): the shadow task
                    // decodes them, off the request's path.
                    let _ = tx.send(shadow::Primary {
                        target: target.clone(),
                        latency: upstream,
                        ttft: None,
                        result: Ok(shadow::Answered::Forwarded(body.clone(), usage)),
                    });
                }
                return Ok(Served {
                    route: route.clone(),
                    target,
                    arm: arm.map(|a| a.name.clone()),
                    attempts,
                    value: Reply::Forwarded(Raw::Whole(body)),
                    upstream,
                    cache: cache_use,
                });
            }
            Forwarded::Stream(head) => {
                let prompt_tokens = counts.known(target.encoding);
                let mut tap = self.tap(ctx, req, &target, prompt_tokens, started, upstream, None);
                tap.shadow = shadow.map(|tx| stream::ShadowTap::new(tx, upstream));
                return Ok(Served {
                    route: route.clone(),
                    arm: ctx.arm().map(|a| a.name.clone()),
                    target,
                    attempts,
                    value: Reply::Forwarded(Raw::Stream(forward::committed(tap, head))),
                    upstream,
                    cache: cache_use,
                });
            }
        };
        let won = Won {
            output: answer,
            target,
            attempts,
            counts,
        };
        Ok(self
            .answered(ctx, req, won, started, upstream, lease, cache_use, shadow)
            .await
            .map(Reply::Canonical))
    }

    /// The canonical answer of an attempt loop: usage (estimated where the
    /// backend reported none) into metrics and the ticket, the cache filled,
    /// a stream wrapped in its usage tap; the primary's outcome sent to the
    /// request's shadow task, if it has one, when the answer has ended.
    /// `upstream` is the attempt loop's time (to the stream's first output).
    #[allow(clippy::too_many_arguments)]
    async fn answered(
        self: &Arc<Self>,
        ctx: &RequestContext,
        mut req: ChatRequest,
        won: Won<Answer>,
        started: Instant,
        upstream: Duration,
        lease: Option<crate::cache::Lease>,
        cache_use: Option<CacheUse>,
        shadow: Option<shadow::PrimaryTx>,
    ) -> Served<ChatOutcome> {
        let route = ctx.route();
        let snap = &ctx.snapshot;
        let arm = ctx.arm();
        let Won {
            output: answer,
            target,
            attempts,
            counts,
        } = won;
        // Counted for a context window already (overrides change no text), the
        // prompt is not counted again for the estimate.
        let prompt_tokens = counts.known(target.encoding);
        let store = lease.map(|lease| Store {
            lease,
            route: route.name.to_string(),
            prompt: ctx.prompt.as_ref().map(|p| p.id.clone()),
            target: target.id.to_string(),
            ttl: route.cache.ttl.unwrap_or(snap.config.cache.ttl),
        });
        if !target.overrides.is_empty() {
            target.overrides.apply(&mut req);
        }
        let arm_name = arm.map(|a| a.name.clone());
        let value = match answer {
            Answer::Complete(mut resp) => {
                let usage = match resp.usage {
                    Some(u) => u,
                    None => {
                        let text = tokens::response_text(&resp);
                        tokens::estimate_async(target.encoding, &req, prompt_tokens, &text, 0).await
                    }
                };
                resp.usage = Some(usage);
                ctx.trace.response(&resp);
                self.count_tokens(route, &target, arm.map(Arm::figures), &usage);
                if let Some(t) = &ctx.ticket {
                    t.settle(&target, &usage);
                }
                if let Some(store) = store {
                    store.put(&resp).await;
                }
                if let Some(tx) = shadow {
                    let _ = tx.send(shadow::Primary {
                        target: target.clone(),
                        latency: upstream,
                        ttft: None,
                        result: Ok(shadow::Answered::Decoded(resp.clone())),
                    });
                }
                ChatOutcome::Complete(resp)
            }
            Answer::Stream(head, rest) => {
                let store = store.map(|s| (s, self.cache.assembler()));
                let mut tap = self.tap(ctx, req, &target, prompt_tokens, started, upstream, store);
                tap.shadow = shadow.map(|tx| stream::ShadowTap::new(tx, upstream));
                ChatOutcome::Stream(tap.wrap(head, rest))
            }
        };
        Served {
            route: route.clone(),
            target,
            arm: arm_name,
            attempts,
            value,
            upstream,
            cache: cache_use,
        }
    }

    /// The usage tap of a stream that has begun (its first output came after
    /// `upstream`: the time to first token).
    #[allow(clippy::too_many_arguments)]
    fn tap(
        self: &Arc<Self>,
        ctx: &RequestContext,
        req: ChatRequest,
        target: &Arc<Target>,
        prompt_tokens: Option<u32>,
        started: Instant,
        upstream: Duration,
        store: Option<(Store, crate::cache::Assembler)>,
    ) -> UsageTap {
        let route = ctx.route();
        let arm = ctx.arm();
        self.metrics.ttft(
            target.metrics(&self.metrics),
            &route.name,
            arm.map(|a| &*a.name),
            upstream,
        );
        UsageTap {
            gateway: self.clone(),
            route: route.clone(),
            target: target.clone(),
            arm: arm.map(|a| (a.name.clone(), a.stats.clone())),
            req,
            prompt_tokens,
            started,
            output: String::new(),
            output_beyond: 0,
            usage: None,
            store,
            ticket: ctx.ticket.clone(),
            shadow: None,
            trace: ctx.trace.clone(),
            finish_reasons: Vec::new(),
        }
    }

    /// Embeddings, after the context is built: the same attempt loop as chat
    /// (fallback, retries, breakers, drill faults, capability and privacy skips).
    pub async fn embed(
        self: &Arc<Self>,
        ctx: &RequestContext,
        req: EmbeddingsRequest,
    ) -> Result<Served<EmbeddingsResponse>, GatewayError> {
        let route = ctx.route();
        let arm = ctx.arm();
        let started = Instant::now();
        let Won {
            output: mut resp,
            target,
            attempts,
            ..
        } = attempt::run_chain(
            self,
            &ctx.snapshot,
            route,
            ctx.chain(),
            &Embed(&req),
            ctx.private,
            Self::deadline(route),
            &ctx.trace,
        )
        .await?;
        let upstream = started.elapsed();
        if resp.usage.prompt_tokens == 0 {
            let n = match &req.input {
                EmbeddingInput::Texts(t) => tokens::count_all_async(target.encoding, t).await,
                EmbeddingInput::Tokens(t) => t.iter().fold(0u32, |n, v| {
                    n.saturating_add(u32::try_from(v.len()).unwrap_or(u32::MAX))
                }),
            };
            resp.usage = Usage::new(n, 0);
            resp.usage.estimated = true;
        }
        self.count_tokens(route, &target, arm.map(Arm::figures), &resp.usage);
        if let Some(t) = &ctx.ticket {
            t.settle(&target, &resp.usage);
        }
        ctx.trace.usage(&resp.usage);
        Ok(Served {
            route: route.clone(),
            target,
            arm: arm.map(|a| a.name.clone()),
            attempts,
            value: resp,
            upstream,
            cache: None,
        })
    }

    /// Counts an upstream answer's tokens (metrics) and, on a split, adds
    /// them and their cost at the target's price to the arm's figures — with
    /// or without governance (the status page's per-arm tokens and cost).
    /// Whole answers and streams alike.
    fn count_tokens(
        &self,
        route: &Route,
        t: &Target,
        arm: Option<(&str, &crate::health::ArmStats)>,
        u: &Usage,
    ) {
        self.metrics
            .tokens(t.metrics(&self.metrics), &route.name, arm.map(|a| a.0), u);
        if let Some((_, stats)) = arm {
            let cost = t.price.map(|p| crate::governance::spend::cost(&p, u));
            stats.answered(u64::from(u.total_tokens), cost);
        }
    }
}
