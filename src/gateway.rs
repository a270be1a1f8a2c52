//! The request pipeline, as plain async functions over canonical types: resolve
//! the route in the request's snapshot, pick the arm (sticky), walk the fallback
//! chain with retries, breakers and drill faults, and fill in what the backend
//! left out (usage). One loop serves streaming and non-streaming requests: an
//! attempt succeeds when a complete response arrives, or, for a stream, when the
//! first output event arrives (the commit point). Dialect-free: the ingress
//! decodes before and encodes after.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use http::HeaderMap;
use tokio::time::Instant;

use crate::backend::EventStream;
use crate::backend::ProviderState;
use crate::canonical::*;
use crate::config::Subject;
use crate::error::{ErrorKind, GatewayError, UpstreamError};
use crate::metrics::Metrics;
use crate::router::{counts_against_target, Book, FaultKind};
use crate::snapshot::{Arm, Route, Snapshot, Target};
use crate::tokens;

/// Header that restricts a request to self-hosted providers.
pub const PRIVATE_HEADER: &str = "x-promptgate-data";

pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    book: Arc<Book>,
    pub cache: Arc<crate::cache::Cache>,
    pub metrics: Metrics,
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

/// What an attempt produced.
enum Answer {
    Complete(ChatResponse),
    Stream(Vec<StreamEvent>, EventStream),
}

/// A request's headers (privacy flag, split subject, cache directives, tenant)
/// and the prompt version it was rendered from.
pub struct RequestMeta<'a> {
    pub headers: &'a HeaderMap,
    pub prompt: Option<(String, u32)>,
}

impl RequestMeta<'_> {
    pub fn private(&self) -> bool {
        self.headers
            .get(PRIVATE_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("private"))
    }

    pub fn subject(&self, s: &Subject, req: &ChatRequest) -> Option<String> {
        match s {
            Subject::User => req.params.user.clone(),
            Subject::Header(h) => self
                .headers
                .get(h.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            Subject::Key => self
                .headers
                .get(http::header::AUTHORIZATION)
                .or_else(|| self.headers.get("x-api-key"))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }
}

impl Gateway {
    pub fn new(snapshot: Snapshot, book: Arc<Book>) -> Result<Arc<Self>, prometheus::Error> {
        let metrics = Metrics::new()?;
        let cache = crate::cache::Cache::new(
            &snapshot.config.cache,
            crate::cache::CacheMetrics {
                evictions: metrics.cache_evictions.clone(),
                redis_errors: metrics.cache_redis_errors.clone(),
            },
        );
        Ok(Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(snapshot),
            book,
            cache,
            metrics,
        }))
    }

    /// Updates the cache gauges (called when metrics are scraped).
    pub async fn refresh_cache_gauges(&self) {
        let (entries, bytes) = self.cache.figures().await;
        self.metrics.cache_entries.set(entries as i64);
        self.metrics.cache_bytes.set(bytes as i64);
    }

    fn cache_count(&self, route: &Route, status: crate::cache::Status) {
        self.metrics
            .cache_requests
            .with_label_values(&[&route.name, status.as_str()])
            .inc();
    }

    /// The current snapshot; a request loads it once and uses it throughout.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot atomically; requests in flight keep the old one.
    pub fn swap(&self, next: Snapshot) {
        next.prune_book(&self.book);
        self.snapshot.store(Arc::new(next));
    }

    /// State that survives reloads: breakers, experiments, drill faults.
    pub fn book(&self) -> &Arc<Book> {
        &self.book
    }

    fn route<'s>(snap: &'s Snapshot, model: &str) -> Result<&'s Arc<Route>, GatewayError> {
        snap.route(model).ok_or_else(|| GatewayError::UnknownModel {
            model: model.to_owned(),
            available: snap.route_list.clone(),
        })
    }

    /// The prompt selector of the arm a request would be assigned to, for a split
    /// over prompt versions.
    pub fn arm_prompt(
        &self,
        snap: &Snapshot,
        req: &ChatRequest,
        meta: &RequestMeta<'_>,
    ) -> Option<crate::prompt::Selector> {
        let route = snap.route(&req.model)?;
        let subject = match &route.plan {
            crate::snapshot::Plan::Split { subject, .. } => meta.subject(subject, req),
            crate::snapshot::Plan::Chain(_) => return None,
        };
        route.pick(subject.as_deref()).1?.prompt.clone()
    }

    pub async fn chat(
        self: &Arc<Self>,
        snap: &Snapshot,
        mut req: ChatRequest,
        meta: &RequestMeta<'_>,
    ) -> Result<Served<ChatOutcome>, GatewayError> {
        if req.messages.is_empty() {
            return Err(GatewayError::invalid(
                "invalid field `messages`: at least one message is required",
                Some("messages"),
            ));
        }
        let route = Self::route(snap, &req.model)?;
        let subject = match &route.plan {
            crate::snapshot::Plan::Split { subject, .. } => meta.subject(subject, &req),
            crate::snapshot::Plan::Chain(_) => None,
        };
        let (chain, arm) = route.pick(subject.as_deref());
        let private = route.private || meta.private();
        // The cache: a hit answers here; a miss makes this request the leader
        // that fills the entry (identical misses wait for it).
        // The request's deadline covers waiting for an identical call too.
        let now = Instant::now();
        let deadline = now
            .checked_add(route.retry.deadline)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        let directive = crate::cache::Directive::from_headers(meta.headers);
        let mut lease = None;
        let mut cache_use = None;
        if route.cache.mode != crate::config::CacheMode::Off {
            let usable = directive != crate::cache::Directive::Bypass
                && crate::cache::eligible(&route.cache, &req);
            if usable {
                let targets: Vec<&str> = chain.iter().map(|t| &*t.id).collect();
                let tenant = if route.cache.shared {
                    None
                } else {
                    crate::cache::tenant_of(meta.headers)
                };
                let prompt = meta.prompt.as_ref().map(|(id, v)| (id.as_str(), *v));
                let key = crate::cache::key_of(&crate::cache::canonical(
                    &route.name,
                    &targets,
                    tenant.as_deref(),
                    prompt,
                    &req,
                ));
                let refresh = directive == crate::cache::Directive::Refresh;
                match self.cache.lookup(key, refresh, deadline).await {
                    crate::cache::Lookup::Hit(entry) => {
                        self.cache_count(route, crate::cache::Status::Hit);
                        return Ok(self.serve_hit(route, chain, arm, &entry, req.stream));
                    }
                    crate::cache::Lookup::Lead(l) => {
                        let status = if refresh {
                            crate::cache::Status::Refresh
                        } else {
                            crate::cache::Status::Miss
                        };
                        self.cache_count(route, status);
                        cache_use = Some(CacheUse { status, age: None });
                        lease = Some(l);
                    }
                }
            } else {
                self.cache_count(route, crate::cache::Status::Bypass);
                cache_use = Some(CacheUse {
                    status: crate::cache::Status::Bypass,
                    age: None,
                });
            }
        }
        let started = Instant::now();
        let (answer, target, attempts, counts) = self
            .run_chain(snap, route, chain, &req, private, deadline)
            .await?;
        // Counted for a context window already (overrides change no text), the
        // prompt is not counted again for the estimate.
        let prompt_tokens = counts.known(target.encoding);
        let store = lease.map(|lease| Store {
            lease,
            route: route.name.to_string(),
            prompt: meta.prompt.as_ref().map(|(id, _)| id.clone()),
            target: target.id.to_string(),
            ttl: route.cache.ttl.unwrap_or(snap.config.cache.ttl),
        });
        let upstream = started.elapsed();
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
                self.count_tokens(route, &target, arm, &usage);
                if let Some(store) = store {
                    store.put(&resp).await;
                }
                ChatOutcome::Complete(resp)
            }
            Answer::Stream(head, rest) => {
                self.metrics
                    .ttft_seconds
                    .with_label_values(&[&route.name, &target.provider_id])
                    .observe(upstream.as_secs_f64());
                if let Some(a) = arm {
                    self.metrics
                        .arm_ttft_seconds
                        .with_label_values(&[&route.name, &a.name])
                        .observe(upstream.as_secs_f64());
                }
                let tap = UsageTap {
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
                    store: store.map(|s| (s, self.cache.assembler())),
                };
                ChatOutcome::Stream(tap.wrap(head, rest))
            }
        };
        Ok(Served {
            route: route.clone(),
            target,
            arm: arm_name,
            attempts,
            value,
            upstream,
            cache: cache_use,
        })
    }

    /// Answers from a cache entry, as JSON or as a replayed stream.
    fn serve_hit(
        &self,
        route: &Arc<Route>,
        chain: &[Arc<Target>],
        arm: Option<&Arm>,
        entry: &crate::cache::Entry,
        stream: bool,
    ) -> Served<ChatOutcome> {
        let target = route
            .targets()
            .into_iter()
            .find(|t| *t.id == entry.target)
            .or_else(|| chain.first())
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
            arm: arm.map(|a| a.name.clone()),
            attempts: 0,
            value,
            upstream: Duration::ZERO,
            cache: Some(CacheUse {
                status: crate::cache::Status::Hit,
                age: Some(entry.age()),
            }),
        }
    }

    /// Why a target cannot take this request, before anything is sent.
    fn unfit(&self, t: &Target, req: &ChatRequest, private: bool) -> Option<Skip> {
        if private && !t.self_hosted {
            return Some(Skip::NotPrivate);
        }
        if let ProviderState::Unavailable(r) = &t.provider {
            return Some(Skip::Unavailable(
                t.provider_id.clone(),
                r.clone(),
                "it is not configured for use",
            ));
        }
        if self
            .book
            .fault(&t.provider_id)
            .is_some_and(|f| f.kind == FaultKind::Disabled)
        {
            return Some(Skip::Unavailable(
                t.provider_id.clone(),
                "disabled by an operator".into(),
                "disabled by an operator",
            ));
        }
        if let Err(capability) = check_capabilities(t, req) {
            return Some(Skip::Capability(capability));
        }
        None
    }

    /// Tries the chain in order: the next target on a retryable failure, at once
    /// on a non-retryable one; retries with backoff when the chain is exhausted
    /// and attempts remain; within the route's deadline.
    async fn run_chain(
        &self,
        snap: &Snapshot,
        route: &Route,
        chain: &[Arc<Target>],
        req: &ChatRequest,
        private: bool,
        deadline: Instant,
    ) -> Result<(Answer, Arc<Target>, u32, tokens::PromptCounts), GatewayError> {
        let policy = route.retry;
        let max_attempts = policy.max_attempts.unwrap_or(chain.len() as u32).max(1);
        let mut attempts = 0u32;
        let mut errors: Vec<(Arc<str>, UpstreamError)> = Vec::new();
        let mut skips: Vec<Skip> = Vec::new();
        // The prompt's tokens: bounded from its bytes once, counted (per
        // encoding) only for a window the bound does not settle.
        let mut bound: Option<u32> = None;
        let mut counts = tokens::PromptCounts::default();
        let mut previous: Option<&Arc<Target>> = None;
        let mut round = 0u32;
        'rounds: while attempts < max_attempts {
            let mut tried_this_round = false;
            for t in chain {
                if attempts >= max_attempts {
                    break 'rounds;
                }
                if let Some(skip) = self.unfit(t, req, private) {
                    if round == 0 {
                        skips.push(skip);
                    }
                    continue;
                }
                if let Some(window) = t.capabilities.context_window {
                    let output = req.params.output_limit().unwrap_or(0);
                    let bound = *bound.get_or_insert_with(|| tokens::prompt_bound(req));
                    // Saturating: an output limit near u32::MAX must not wrap
                    // into a small number that fits.
                    let need = if tokens::fits_uncounted(bound, output, window) {
                        0
                    } else {
                        counts.get(t.encoding, req).await.saturating_add(output)
                    };
                    if need > window {
                        if round == 0 {
                            skips.push(Skip::Context(need, window));
                        }
                        continue;
                    }
                }
                // Back off before trying the same target again.
                if round > 0 || previous.is_some_and(|p| Arc::ptr_eq(p, t)) {
                    // A target whose breaker is open is passed over without
                    // waiting for it; the pass asked for here is given back at
                    // once, so no half-open probe slot is held while sleeping.
                    if t.health.admit(&snap.breaker).is_none() {
                        if round == 0 {
                            skips.push(Skip::Open);
                        }
                        continue;
                    }
                    let exp = policy.backoff.saturating_mul(1 << (round.min(10)));
                    let jitter = 0.5 + rand::random::<f64>() / 2.0;
                    let mut wait = exp.min(policy.max_backoff).mul_f64(jitter);
                    if let Some((_, e)) = errors.last() {
                        if let Some(ra) = e.retry_after {
                            // A backend's number: capped, and compared without adding
                            // it to an Instant (which would overflow).
                            wait = wait.max(ra.min(crate::error::MAX_RETRY_AFTER));
                        }
                    }
                    if wait >= deadline.saturating_duration_since(Instant::now()) {
                        break 'rounds;
                    }
                    tokio::time::sleep(wait).await;
                }
                // Taken after any backoff. Dropped unrecorded (cancelled, or no
                // time left), the pass gives a half-open probe slot back.
                let Some(pass) = t.health.admit(&snap.breaker) else {
                    if round == 0 {
                        skips.push(Skip::Open);
                    }
                    continue;
                };
                if Instant::now() >= deadline {
                    // Spent waiting for an identical call: no time left to start one.
                    let mut e = UpstreamError::new(
                        ErrorKind::Timeout,
                        "the route's deadline passed before a call could start",
                    );
                    e.provider = t.provider_id.to_string();
                    errors.push((t.id.clone(), e));
                    break 'rounds;
                }
                attempts += 1;
                tried_this_round = true;
                let sent: Cow<'_, ChatRequest> = if t.overrides.is_empty() {
                    Cow::Borrowed(req)
                } else {
                    let mut r = req.clone();
                    t.overrides.apply(&mut r);
                    Cow::Owned(r)
                };
                let started = Instant::now();
                let remaining = deadline.saturating_duration_since(started);
                let result = match tokio::time::timeout(remaining, self.attempt(t, &sent)).await {
                    Ok(r) => r,
                    Err(_) => Err(UpstreamError::new(
                        ErrorKind::Timeout,
                        "the route's deadline passed during the attempt",
                    )),
                };
                self.metrics
                    .upstream_seconds
                    .with_label_values(&[&t.provider_id])
                    .observe(started.elapsed().as_secs_f64());
                match result {
                    Ok(answer) => {
                        let state = pass.record(&snap.breaker, false);
                        self.metrics
                            .breaker_state
                            .with_label_values(&[&t.id])
                            .set(state.gauge());
                        self.metrics
                            .attempts
                            .with_label_values(&[&route.name, &t.id, "ok"])
                            .inc();
                        if let Some((from, e)) = errors.last() {
                            self.metrics
                                .fallbacks
                                .with_label_values(&[&route.name, from, &t.id, e.kind.as_str()])
                                .inc();
                        }
                        return Ok((answer, t.clone(), attempts, counts));
                    }
                    Err(mut e) => {
                        if e.provider.is_empty() {
                            e.provider = t.provider_id.to_string();
                        }
                        let state = pass.record(&snap.breaker, counts_against_target(e.kind));
                        self.metrics
                            .breaker_state
                            .with_label_values(&[&t.id])
                            .set(state.gauge());
                        self.metrics
                            .attempts
                            .with_label_values(&[&route.name, &t.id, e.kind.as_str()])
                            .inc();
                        tracing::info!(route = %route.name, target = %t.id, kind = e.kind.as_str(),
                            error = %crate::server::LogSafe(&e.message), "attempt failed");
                        let retry = e.kind.retryable() || e.kind == ErrorKind::ContextLength;
                        errors.push((t.id.clone(), e));
                        if !retry {
                            break 'rounds;
                        }
                        previous = Some(t);
                    }
                }
            }
            round += 1;
            if !tried_this_round {
                break;
            }
        }
        Err(give_up(&route.name, errors, skips, private))
    }

    /// One call to one target, with the drill fault of its provider applied.
    async fn attempt(&self, t: &Target, req: &ChatRequest) -> Result<Answer, UpstreamError> {
        let ProviderState::Ready(provider) = &t.provider else {
            return Err(UpstreamError::new(
                ErrorKind::Connect,
                "provider unavailable",
            ));
        };
        let fault = self.book.fault(&t.provider_id).map(|f| f.kind);
        if let Some(f) = &fault {
            if let Some(e) = f.failure() {
                return Err(e);
            }
            if let FaultKind::Slow(d) = f {
                tokio::time::sleep(*d).await;
            }
        }
        let stall = fault == Some(FaultKind::Stall);
        if !req.stream {
            if stall {
                tokio::time::sleep(t.headers_timeout).await;
                return Err(stall_error(t.headers_timeout));
            }
            return provider.chat(req, &t.model).await.map(Answer::Complete);
        }
        let cut = match fault {
            Some(FaultKind::StreamCut(n)) => Some(n),
            _ => None,
        };
        let first_output = async {
            if stall {
                futures_util::future::pending::<()>().await;
            }
            let mut stream = provider.chat_stream(req, &t.model).await?;
            if let Some(n) = cut {
                stream = cut_after(stream, n);
            }
            peek_output(stream).await
        };
        match tokio::time::timeout(t.first_token_timeout, first_output).await {
            Ok(Ok((head, rest))) => Ok(Answer::Stream(head, rest)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(UpstreamError::new(
                ErrorKind::Timeout,
                format!(
                    "no output within the first-token timeout of {}",
                    humantime::format_duration(t.first_token_timeout)
                ),
            )),
        }
    }

    pub async fn embed(
        self: &Arc<Self>,
        snap: &Snapshot,
        req: EmbeddingsRequest,
    ) -> Result<Served<EmbeddingsResponse>, GatewayError> {
        let route = Self::route(snap, &req.model)?;
        let (chain, arm) = route.pick(req.user.as_deref());
        let target = chain
            .iter()
            .find(|t| t.capabilities.embeddings && matches!(t.provider, ProviderState::Ready(_)))
            .ok_or_else(|| GatewayError::Unsupported {
                route: route.name.to_string(),
                capability: "embeddings".into(),
            })?;
        let ProviderState::Ready(provider) = &target.provider else {
            return Err(GatewayError::Internal("unreachable: filtered above".into()));
        };
        let started = Instant::now();
        let result = match self
            .book
            .fault(&target.provider_id)
            .and_then(|f| f.kind.failure())
        {
            Some(e) => Err(e),
            None => provider.embed(&req, &target.model).await,
        };
        let upstream = started.elapsed();
        self.metrics
            .upstream_seconds
            .with_label_values(&[&target.provider_id])
            .observe(upstream.as_secs_f64());
        let mut resp = result?;
        if resp.vectors.len() != req.input.len() {
            return Err(UpstreamError::new(
                ErrorKind::MalformedResponse,
                format!(
                    "backend returned {} embeddings for {} inputs",
                    resp.vectors.len(),
                    req.input.len()
                ),
            )
            .into());
        }
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
        self.count_tokens(route, target, arm, &resp.usage);
        Ok(Served {
            route: route.clone(),
            target: target.clone(),
            arm: arm.map(|a| a.name.clone()),
            attempts: 1,
            value: resp,
            upstream,
            cache: None,
        })
    }

    fn count_tokens(&self, route: &Route, t: &Target, arm: Option<&Arm>, u: &Usage) {
        let source = if u.estimated { "estimated" } else { "reported" };
        let labels = |dir| [&*route.name, &*t.provider_id, dir, source];
        self.metrics
            .tokens
            .with_label_values(&labels("in"))
            .inc_by(u64::from(u.prompt_tokens));
        self.metrics
            .tokens
            .with_label_values(&labels("out"))
            .inc_by(u64::from(u.completion_tokens));
        if let Some(a) = arm {
            self.metrics
                .arm_tokens
                .with_label_values(&[&route.name, &a.name])
                .inc_by(u64::from(u.total_tokens));
        }
    }
}

/// A cache lease and what the entry needs besides the response.
struct Store {
    lease: crate::cache::Lease,
    route: String,
    prompt: Option<String>,
    target: String,
    ttl: Duration,
}

impl Store {
    /// Fills the entry if the response may be cached; otherwise releases the
    /// waiters to call upstream themselves.
    async fn put(self, resp: &ChatResponse) {
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

/// Runs the providers' active health checks (those with `health_check` set) for
/// the life of the gateway; each result counts for the breakers of every target
/// on that provider. Follows reloads: the schedule is read from the current
/// snapshot every tick.
pub fn spawn_health_checks(gw: Arc<Gateway>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let snap = gw.snapshot();
            for (id, p) in &snap.config.providers {
                let Some(every) = p.health_check else {
                    continue;
                };
                if last.get(id).is_some_and(|t| t.elapsed() < every) {
                    continue;
                }
                last.insert(id.clone(), Instant::now());
                let Some(ProviderState::Ready(provider)) = snap.providers.get(id).cloned() else {
                    continue;
                };
                let (gw, snap, id) = (gw.clone(), snap.clone(), id.clone());
                tokio::spawn(async move {
                    let Some(check) = provider.health() else {
                        return;
                    };
                    let result = check.await;
                    let failed = result.is_err();
                    gw.metrics
                        .health_checks
                        .with_label_values(&[id.as_str(), if failed { "failed" } else { "ok" }])
                        .inc();
                    if let Err(e) = &result {
                        tracing::warn!(provider = %id, kind = e.kind.as_str(), error = %crate::server::LogSafe(&e.message), "health check failed");
                    }
                    for route in snap.routes() {
                        for t in route.targets() {
                            if *t.provider_id == *id {
                                let state = t.health.record(&snap.breaker, failed);
                                gw.metrics
                                    .breaker_state
                                    .with_label_values(&[&t.id])
                                    .set(state.gauge());
                            }
                        }
                    }
                });
            }
        }
    })
}

/// Why a target was passed over without a call.
enum Skip {
    NotPrivate,
    /// (provider, why, why without its settings)
    Unavailable(Arc<str>, String, &'static str),
    Capability(&'static str),
    Context(u32, u32),
    Open,
}

fn stall_error(after: Duration) -> UpstreamError {
    UpstreamError::new(
        ErrorKind::Timeout,
        format!(
            "backend sent no response headers within {}",
            humantime::format_duration(after)
        ),
    )
}

/// The error for a request no target could serve: the last attempt's error,
/// with every attempt listed; or, if nothing was tried, why.
fn give_up(
    route: &str,
    mut errors: Vec<(Arc<str>, UpstreamError)>,
    skips: Vec<Skip>,
    private: bool,
) -> GatewayError {
    if let Some((_, last)) = errors.pop() {
        let mut e = last;
        if !errors.is_empty() {
            let earlier: Vec<String> = errors
                .iter()
                .map(|(t, err)| format!("{t}: {}", err.kind.as_str()))
                .collect();
            e.message = format!(
                "{} (after earlier attempts: {})",
                e.message,
                earlier.join(", ")
            );
        }
        return GatewayError::Upstream(e);
    }
    if let Some(Skip::Capability(c)) = skips.iter().find(|s| matches!(s, Skip::Capability(_))) {
        if skips
            .iter()
            .all(|s| matches!(s, Skip::Capability(_) | Skip::NotPrivate))
        {
            return GatewayError::Unsupported {
                route: route.to_owned(),
                capability: (*c).to_owned(),
            };
        }
    }
    if private && skips.iter().all(|s| matches!(s, Skip::NotPrivate)) {
        let reason = "the request is private and no target of this route is a self-hosted provider";
        return GatewayError::NoTarget {
            route: route.to_owned(),
            reason: reason.into(),
            public: reason.into(),
        };
    }
    // Every target's provider is unavailable (e.g. its key is unset): name it.
    if let Some(Skip::Unavailable(provider, reason, public)) = skips.first() {
        if skips
            .iter()
            .all(|s| matches!(s, Skip::Unavailable(p, ..) if p == provider))
        {
            return GatewayError::ProviderUnavailable {
                provider: provider.to_string(),
                reason: reason.clone(),
                public,
            };
        }
    }
    if let Some(Skip::Context(need, window)) = skips.iter().find(|s| matches!(s, Skip::Context(..)))
    {
        if skips
            .iter()
            .all(|s| matches!(s, Skip::Context(..) | Skip::NotPrivate))
        {
            return GatewayError::Upstream(UpstreamError::new(
                ErrorKind::ContextLength,
                format!("the request needs about {need} tokens; no target of this route holds more than {window}"),
            ));
        }
    }
    // Each clause twice: as logged, and without the provider's name and settings.
    let mut reasons: Vec<String> = Vec::with_capacity(skips.len());
    let mut public: Vec<String> = Vec::with_capacity(skips.len());
    for s in &skips {
        let (full, bare) = match s {
            Skip::NotPrivate => ("not self-hosted".to_string(), None),
            Skip::Unavailable(p, r, _) => (format!("{p}: {r}"), Some("provider unavailable")),
            Skip::Capability(c) => (format!("no {c}"), None),
            Skip::Context(n, w) => (format!("{n} tokens > window {w}"), None),
            Skip::Open => ("circuit open".to_string(), None),
        };
        let bare = bare.map_or_else(|| full.clone(), str::to_owned);
        if !public.contains(&bare) {
            public.push(bare);
        }
        reasons.push(full);
    }
    GatewayError::NoTarget {
        route: route.to_owned(),
        reason: reasons.join("; "),
        public: public.join("; "),
    }
}

/// Whether a target can serve what the request needs.
fn check_capabilities(t: &Target, req: &ChatRequest) -> Result<(), &'static str> {
    let caps = &t.capabilities;
    if req.stream && !caps.streaming {
        return Err("streaming");
    }
    if !req.tools.is_empty() && !caps.tools {
        return Err("tools (function calling)");
    }
    if matches!(
        req.response_format,
        Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema(_))
    ) && !caps.json_mode
    {
        return Err("JSON mode (response_format)");
    }
    if !caps.vision {
        let has_image = req.messages.iter().any(|m| {
            matches!(&m.content, Some(Content::Parts(p)) if p.iter().any(|p| matches!(p, Part::Image { .. })))
        });
        if has_image {
            return Err("vision (image input)");
        }
    }
    Ok(())
}

/// A drill's stream cut: the stream ends with an error after `n` events that
/// carry output.
fn cut_after(mut inner: EventStream, n: usize) -> EventStream {
    Box::pin(async_stream::stream! {
        let mut seen = 0usize;
        while let Some(ev) = inner.next().await {
            let output = matches!(&ev, Ok(StreamEvent::Delta(d)) if d.has_output());
            if output {
                if seen >= n {
                    yield Err(UpstreamError::new(ErrorKind::MalformedResponse, format!("drill: stream cut after {n} chunks")));
                    return;
                }
                seen += 1;
            }
            yield ev;
        }
    })
}

/// Events a stream may send before its first output: the stream's identity
/// and a role per choice (at most `wire::MAX_CHOICES`) are all a well-behaved backend sends, and
/// the decoders drop deltas that carry nothing.
const HEAD_MAX_EVENTS: usize = 256;
/// Bytes those events may hold (their own size and their text).
const HEAD_MAX_BYTES: usize = 256 * 1024;

/// What an event held in memory costs, roughly: its own size and its text.
fn event_bytes(ev: &StreamEvent) -> usize {
    let text = match ev {
        StreamEvent::Meta(m) => {
            m.id.len() + m.model.len() + m.system_fingerprint.as_ref().map_or(0, String::len)
        }
        StreamEvent::Delta(d) => {
            let tools: usize = d
                .tool_calls
                .iter()
                .map(|t| {
                    std::mem::size_of::<ToolCallDelta>()
                        + [&t.id, &t.name, &t.arguments]
                            .iter()
                            .map(|s| s.as_ref().map_or(0, String::len))
                            .sum::<usize>()
                })
                .sum();
            d.content.as_ref().map_or(0, String::len)
                + d.reasoning.as_ref().map_or(0, String::len)
                + tools
        }
        StreamEvent::Usage(_) | StreamEvent::Done => 0,
    };
    std::mem::size_of::<StreamEvent>().saturating_add(text)
}

/// Reads events until the first one a client would see as output (text, a tool
/// call, usage or the end). Returns them with the rest of the stream.
///
/// What comes before the output is held, so it is bounded: past
/// [`HEAD_MAX_EVENTS`] events or [`HEAD_MAX_BYTES`] bytes without output the
/// attempt fails with `malformed_response`. Nothing has gone to the client yet,
/// so the route can still fall back; a legitimate stream never comes near it.
async fn peek_output(
    mut stream: EventStream,
) -> Result<(Vec<StreamEvent>, EventStream), UpstreamError> {
    let mut head = Vec::new();
    let mut held = 0usize;
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        let output = match &ev {
            StreamEvent::Delta(d) => d.has_output() || d.finish_reason.is_some(),
            StreamEvent::Usage(_) | StreamEvent::Done => true,
            StreamEvent::Meta(_) => false,
        };
        if !output {
            held = held.saturating_add(event_bytes(&ev));
            if head.len() >= HEAD_MAX_EVENTS || held > HEAD_MAX_BYTES {
                return Err(UpstreamError::new(
                    ErrorKind::MalformedResponse,
                    format!(
                        "backend sent more than {} events or {} bytes before any output",
                        HEAD_MAX_EVENTS, HEAD_MAX_BYTES
                    ),
                ));
            }
        }
        head.push(ev);
        if output {
            break;
        }
    }
    Ok((head, stream))
}

/// Appends as much of `text` as fits under `cap` bytes, cut on a char boundary;
/// returns the bytes appended.
fn push_capped(out: &mut String, text: &str, cap: usize) -> usize {
    let room = cap.saturating_sub(out.len());
    let mut end = text.len().min(room);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.push_str(&text[..end]);
    end
}

/// Watches a stream go by: collects output text and reported usage, and at the end
/// inserts an estimated usage event if the backend sent none, then records metrics.
struct UsageTap {
    gateway: Arc<Gateway>,
    route: Arc<Route>,
    target: Arc<Target>,
    arm: Option<(Arc<str>, Arc<crate::router::ArmStats>)>,
    req: ChatRequest,
    /// The request's prompt tokens in the target's encoding, if already counted.
    prompt_tokens: Option<u32>,
    started: Instant,
    /// Output text for the estimate, up to the tokenizer's budget…
    output: String,
    /// …and the bytes of output past it, estimated.
    output_beyond: usize,
    usage: Option<Usage>,
    /// A cache lease to fill once the stream has ended properly.
    store: Option<(Store, crate::cache::Assembler)>,
}

impl UsageTap {
    fn observe(&mut self, ev: &StreamEvent) {
        if let Some((_, asm)) = &mut self.store {
            asm.push(ev);
        }
        match ev {
            StreamEvent::Delta(d) => {
                let texts = d.content.iter().chain(&d.reasoning).chain(
                    d.tool_calls
                        .iter()
                        .flat_map(|t| t.name.iter().chain(&t.arguments)),
                );
                for text in texts {
                    self.keep_output(text);
                }
            }
            // Some backends repeat usage on several chunks; the last one is the total.
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::Meta(_) | StreamEvent::Done => {}
        }
    }

    /// Keeps output text for the estimate, within the tokenizer's budget; the
    /// rest is only measured.
    fn keep_output(&mut self, text: &str) {
        let kept = push_capped(&mut self.output, text, tokens::EXACT_BYTES);
        self.output_beyond = self.output_beyond.saturating_add(text.len() - kept);
    }

    /// The reported usage, or the estimate.
    async fn usage(&self) -> Usage {
        match self.usage {
            Some(u) => u,
            None => {
                tokens::estimate_async(
                    self.target.encoding,
                    &self.req,
                    self.prompt_tokens,
                    &self.output,
                    self.output_beyond,
                )
                .await
            }
        }
    }

    fn finish(&mut self, usage: Usage) -> Usage {
        let m = &self.gateway.metrics;
        let source = if usage.estimated {
            "estimated"
        } else {
            "reported"
        };
        for (dir, n) in [
            ("in", usage.prompt_tokens),
            ("out", usage.completion_tokens),
        ] {
            m.tokens
                .with_label_values(&[&self.route.name, &self.target.provider_id, dir, source])
                .inc_by(u64::from(n));
        }
        if let Some((arm, _)) = &self.arm {
            m.arm_tokens
                .with_label_values(&[&self.route.name, arm])
                .inc_by(u64::from(usage.total_tokens));
        }
        self.record_end(true, u64::from(usage.total_tokens));
        usage
    }

    fn record_end(&self, ok: bool, tokens: u64) {
        let elapsed = self.started.elapsed();
        let m = &self.gateway.metrics;
        m.request_seconds
            .with_label_values(&[&self.route.name])
            .observe(elapsed.as_secs_f64());
        if let Some((arm, stats)) = &self.arm {
            m.arm_seconds
                .with_label_values(&[&self.route.name, arm])
                .observe(elapsed.as_secs_f64());
            stats.record(ok, elapsed, tokens);
        }
    }

    fn fail(&self, e: &UpstreamError) {
        let m = &self.gateway.metrics;
        m.stream_errors
            .with_label_values(&[&self.route.name, &self.target.provider_id, e.kind.as_str()])
            .inc();
        m.errors
            .with_label_values(&[e.kind.as_str(), &self.route.name])
            .inc();
        self.record_end(false, 0);
        tracing::warn!(route = %self.route.name, target = %self.target.id,
            kind = e.kind.as_str(), error = %crate::server::LogSafe(&e.message), "stream failed after it began");
    }

    fn wrap(mut self, head: Vec<StreamEvent>, mut rest: EventStream) -> EventStream {
        Box::pin(async_stream::stream! {
            let mut pending = head.into_iter();
            loop {
                let ev = match pending.next() {
                    Some(ev) => ev,
                    None => match rest.next().await {
                        Some(Ok(ev)) => ev,
                        Some(Err(mut e)) => {
                            if e.provider.is_empty() {
                                e.provider = self.target.provider_id.to_string();
                            }
                            self.fail(&e);
                            yield Err(e);
                            return;
                        }
                        None => return,
                    },
                };
                if ev == StreamEvent::Done {
                    let estimated = self.usage.is_none();
                    let usage = self.usage().await;
                    let usage = self.finish(usage);
                    if estimated {
                        yield Ok(StreamEvent::Usage(usage));
                    }
                    if let Some((store, mut asm)) = self.store.take() {
                        asm.push(&StreamEvent::Usage(usage));
                        store.put(&asm.finish()).await;
                    }
                    yield Ok(ev);
                    return;
                }
                self.observe(&ev);
                yield Ok(ev);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn events(evs: Vec<StreamEvent>) -> EventStream {
        Box::pin(futures_util::stream::iter(evs.into_iter().map(Ok)))
    }

    fn role_only(choice: u32) -> StreamEvent {
        StreamEvent::Delta(Delta {
            choice,
            role: Some(Role::Assistant),
            ..Delta::default()
        })
    }

    fn text(t: &str) -> StreamEvent {
        StreamEvent::Delta(Delta {
            content: Some(t.into()),
            ..Delta::default()
        })
    }

    #[tokio::test]
    async fn what_comes_before_the_first_output_is_bounded() {
        // A well-behaved start: the identity, a role per choice, then output.
        let mut evs = vec![StreamEvent::Meta(StreamMeta::default())];
        evs.extend((0..64).map(role_only));
        evs.push(text("hi"));
        evs.push(text("after"));
        let (head, mut rest) = peek_output(events(evs)).await.unwrap();
        assert_eq!(head.len(), 66);
        assert_eq!(head.last(), Some(&text("hi")));
        assert_eq!(rest.next().await.unwrap().unwrap(), text("after"));

        // Events without output, without end: an error once past the count,
        // however much output would follow.
        let mut evs: Vec<StreamEvent> = (0..100_000).map(|i| role_only(i % 64)).collect();
        evs.push(text("too late"));
        let e = match peek_output(events(evs)).await {
            Err(e) => e,
            Ok((head, _)) => panic!("held {} events", head.len()),
        };
        assert_eq!(e.kind, ErrorKind::MalformedResponse);

        // A few events holding a lot of text are stopped by the byte bound.
        let big = StreamEvent::Meta(StreamMeta {
            id: "i".repeat(100 * 1024),
            ..StreamMeta::default()
        });
        let evs = vec![big.clone(), big.clone(), big, text("x")];
        let e = peek_output(events(evs)).await.err().unwrap();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
    }

    #[test]
    fn collected_output_stops_at_its_cap_on_a_char_boundary() {
        let mut out = String::new();
        for _ in 0..100 {
            push_capped(&mut out, "ab€", 12);
        }
        assert_eq!(out, "ab€ab€ab");
        let mut out = String::new();
        push_capped(&mut out, "€€", 4);
        assert_eq!(out, "€");
        push_capped(&mut out, "x", 4);
        assert_eq!(out, "€x");
    }
}
