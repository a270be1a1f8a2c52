//! The attempt loop: one fallback loop for every operation (chat, streaming or
//! not, and embeddings). It walks the placed chain in order with retries and
//! backoff, passes over targets that cannot take the request (privacy,
//! availability, operator drains, capabilities, context window, open breakers),
//! applies drill faults, records each attempt's outcome on the target's breaker
//! and in the metrics, and, when everything failed, keeps each attempt's history
//! in the error.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::stream::{cut_after, peek_output};
use super::Gateway;
use crate::backend::ProviderState;
use crate::backend::{EventStream, Provider};
use crate::canonical::*;
use crate::error::{Attempt, ErrorKind, GatewayError, UpstreamError};
use crate::health::{counts_against_target, FaultKind};
use crate::ids::{ProviderId, TargetId};
use crate::snapshot::{Route, Snapshot, Target};
use crate::tokens;

/// What one attempt of an operation does with one target.
pub(super) trait Operation: Sync {
    type Output: Send;
    /// Its GenAI operation name (an attempt's span is `{operation} {model}`).
    const OPERATION: &'static str = "chat";
    /// The capability a target lacks for this request, if it lacks one.
    fn lacks(&self, t: &Target) -> Option<&'static str>;
    /// The chat request, for the context-window check (`None`: no window applies).
    fn prompt(&self) -> Option<&ChatRequest>;
    /// One call to `t`, drill faults applied.
    fn call<'a>(
        &'a self,
        gw: &'a Gateway,
        t: &'a Target,
    ) -> impl Future<Output = Result<Self::Output, UpstreamError>> + Send + 'a;
}

/// What a chat attempt produced.
pub(super) enum Answer {
    Complete(ChatResponse),
    Stream(Vec<StreamEvent>, EventStream),
}

/// A chat request, as an operation.
pub(super) struct Chat<'r>(pub &'r ChatRequest);

impl Operation for Chat<'_> {
    type Output = Answer;

    fn lacks(&self, t: &Target) -> Option<&'static str> {
        check_capabilities(t, self.0).err()
    }

    fn prompt(&self) -> Option<&ChatRequest> {
        Some(self.0)
    }

    async fn call<'a>(&'a self, gw: &'a Gateway, t: &'a Target) -> Result<Answer, UpstreamError> {
        let sent: Cow<'_, ChatRequest> = if t.overrides.is_empty() {
            Cow::Borrowed(self.0)
        } else {
            let mut r = self.0.clone();
            t.overrides.apply(&mut r);
            Cow::Owned(r)
        };
        chat_attempt(gw, t, &sent).await
    }
}

/// An embeddings request, as an operation.
pub(super) struct Embed<'r>(pub &'r EmbeddingsRequest);

impl Operation for Embed<'_> {
    type Output = EmbeddingsResponse;
    const OPERATION: &'static str = "embeddings";

    fn lacks(&self, t: &Target) -> Option<&'static str> {
        (!t.capabilities.embeddings).then_some("embeddings")
    }

    fn prompt(&self) -> Option<&ChatRequest> {
        None
    }

    async fn call<'a>(
        &'a self,
        gw: &'a Gateway,
        t: &'a Target,
    ) -> Result<EmbeddingsResponse, UpstreamError> {
        let (provider, drill) = prepare(gw, t).await?;
        drill.stall_whole(t).await?;
        let req = self.0;
        let resp = provider.embed(req, &t.model).await?;
        if resp.vectors.len() != req.input.len() {
            return Err(UpstreamError::new(
                ErrorKind::MalformedResponse,
                format!(
                    "backend returned {} embeddings for {} inputs",
                    resp.vectors.len(),
                    req.input.len()
                ),
            ));
        }
        Ok(resp)
    }
}

/// The attempt that succeeded.
pub(super) struct Won<O> {
    pub output: O,
    pub target: Arc<Target>,
    /// Calls made, this one included.
    pub attempts: u32,
    /// The prompt's tokens, where a context window needed them counted.
    pub counts: tokens::PromptCounts,
}

/// Why a target was passed over without a call.
enum Skip {
    NotPrivate,
    /// (provider, why, why without its settings)
    Unavailable(ProviderId, String, &'static str),
    Capability(&'static str),
    Context(u32, u32),
    Open,
}

/// A failed call: the target, its error, how long it took.
struct Failed {
    target: TargetId,
    error: UpstreamError,
    elapsed: Duration,
}

/// Why a target cannot take this request, before anything is sent.
fn unfit<O: Operation>(gw: &Gateway, t: &Target, op: &O, private: bool) -> Option<Skip> {
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
    if gw.disabled(&t.provider_id) {
        return Some(Skip::Unavailable(
            t.provider_id.clone(),
            "disabled by an operator".into(),
            "disabled by an operator",
        ));
    }
    op.lacks(t).map(Skip::Capability)
}

/// Tries the chain in order: the next target on a retryable failure, at once
/// on a non-retryable one; retries with backoff when the chain is exhausted
/// and attempts remain; within the route's deadline.
// The request's parts the loop reads, each from its context; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_chain<O: Operation>(
    gw: &Gateway,
    snap: &Snapshot,
    route: &Route,
    chain: &[Arc<Target>],
    op: &O,
    private: bool,
    deadline: Instant,
    trace: &crate::otel::Trace,
) -> Result<Won<O::Output>, GatewayError> {
    let policy = route.retry;
    let max_attempts = policy.max_attempts.unwrap_or(chain.len() as u32).max(1);
    let mut attempts = 0u32;
    let mut errors: Vec<Failed> = Vec::new();
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
            if let Some(skip) = unfit(gw, t, op, private) {
                if round == 0 {
                    skips.push(skip);
                }
                continue;
            }
            if let (Some(window), Some(req)) = (t.capabilities.context_window, op.prompt()) {
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
                // A backend's Retry-After holds back that backend only.
                if let Some(f) = errors.last().filter(|f| f.target == t.id) {
                    if let Some(ra) = f.error.retry_after {
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
                errors.push(Failed {
                    target: t.id.clone(),
                    error: e,
                    elapsed: Duration::ZERO,
                });
                break 'rounds;
            }
            attempts += 1;
            tried_this_round = true;
            let started = Instant::now();
            let remaining = deadline.saturating_duration_since(started);
            // Cut short by the route's deadline, a call counts against its target
            // only if it had at least the target's own headers timeout to answer:
            // a request that spent its budget waiting elsewhere says nothing of it.
            let mut cut_early = false;
            // Boxed: an attempt's future (a provider call, a stream's head) is
            // the bulk of a request's state; a box keeps every future that
            // holds it (this loop, the pipeline, the handler) a pointer wide.
            // Its span (tracing on), whose `traceparent` the call carries.
            let mut span = trace.child(
                || format!("{} {}", O::OPERATION, t.model),
                opentelemetry::trace::SpanKind::Client,
                || attempt_attributes(snap, t, O::OPERATION, attempts, errors.len(), round),
            );
            let call = crate::otel::scoped(span.outgoing(), Box::pin(op.call(gw, t)));
            let result = match tokio::time::timeout(remaining, call).await {
                Ok(r) => r,
                Err(_) => {
                    cut_early = remaining < t.headers_timeout;
                    Err(UpstreamError::new(
                        ErrorKind::Timeout,
                        "the route's deadline passed during the attempt",
                    ))
                }
            };
            let elapsed = started.elapsed();
            let handles = t.metrics(&gw.metrics);
            handles.upstream(elapsed);
            match result {
                Ok(output) => {
                    drop(span);
                    let state = pass.record(&snap.breaker, false);
                    handles.breaker(state);
                    handles.attempt_ok();
                    if let Some(f) = errors.last() {
                        gw.metrics
                            .fallback(&route.name, &f.target, &t.id, f.error.kind);
                    }
                    return Ok(Won {
                        output,
                        target: t.clone(),
                        attempts,
                        counts,
                    });
                }
                Err(mut e) => {
                    if e.provider.is_empty() {
                        e.provider = t.provider_id.to_string();
                    }
                    if let Some(status) = e.status {
                        span.set(|| {
                            opentelemetry::KeyValue::new(
                                "http.response.status_code",
                                i64::from(status),
                            )
                        });
                    }
                    span.failed(e.kind.as_str());
                    drop(span);
                    if cut_early {
                        drop(pass);
                    } else {
                        let state = pass.record(&snap.breaker, counts_against_target(e.kind));
                        handles.breaker(state);
                    }
                    gw.metrics.attempt(&route.name, &t.id, e.kind.as_str());
                    tracing::info!(route = %route.name, target = %t.id, kind = e.kind.as_str(),
                        error = %crate::server::LogSafe(&e.message), "attempt failed");
                    let retry = e.kind.retryable() || e.kind == ErrorKind::ContextLength;
                    errors.push(Failed {
                        target: t.id.clone(),
                        error: e,
                        elapsed,
                    });
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

/// An attempt span's attributes: what is called, where, and its place in
/// the request's attempts (`promptgate.fallback`: failures before it).
fn attempt_attributes(
    snap: &Snapshot,
    t: &Target,
    operation: &'static str,
    attempt: u32,
    fallback: usize,
    round: u32,
) -> Vec<opentelemetry::KeyValue> {
    use opentelemetry::KeyValue;
    let provider = snap.config.providers.get(&*t.provider_id);
    let mut out = vec![
        KeyValue::new("gen_ai.operation.name", operation),
        KeyValue::new("gen_ai.request.model", t.model.clone()),
        KeyValue::new("promptgate.provider", t.provider_id.to_string()),
        KeyValue::new("promptgate.target", t.id.to_string()),
        KeyValue::new("promptgate.attempt", i64::from(attempt)),
        KeyValue::new(
            "promptgate.fallback",
            i64::try_from(fallback).unwrap_or(i64::MAX),
        ),
        KeyValue::new("promptgate.retry", i64::from(round)),
    ];
    if let Some(p) = provider {
        out.push(KeyValue::new(
            "gen_ai.provider.name",
            p.kind.gen_ai_provider,
        ));
        out.extend(crate::otel::server_of(&p.base_url));
    }
    out
}

/// What every call to a target starts with: its provider, and its provider's
/// drill fault, of which failures and slowness are applied here; a stall or a
/// stream cut is left to the call, through the [`Drill`] it gets back.
pub(super) async fn prepare<'t>(
    gw: &Gateway,
    t: &'t Target,
) -> Result<(&'t Arc<dyn Provider>, Drill), UpstreamError> {
    let ProviderState::Ready(provider) = &t.provider else {
        return Err(UpstreamError::new(
            ErrorKind::Connect,
            "provider unavailable",
        ));
    };
    let fault = gw.book.fault(&t.provider_id).map(|f| f.kind);
    if let Some(f) = &fault {
        if let Some(e) = f.failure() {
            return Err(e);
        }
        if let FaultKind::Slow(d) = f {
            tokio::time::sleep(*d).await;
        }
    }
    Ok((
        provider,
        Drill {
            stall: fault == Some(FaultKind::Stall),
            cut: match fault {
                Some(FaultKind::StreamCut(n)) => Some(n),
                _ => None,
            },
        },
    ))
}

/// The part of a drill fault a call applies itself, the same way in every
/// attempt (canonical, forwarded, embeddings).
pub(super) struct Drill {
    stall: bool,
    /// A stream is cut after this many outputs.
    pub cut: Option<usize>,
}

impl Drill {
    /// A call answered whole: a stall waits out the target's headers timeout
    /// and fails as a backend that sent nothing would.
    pub async fn stall_whole(&self, t: &Target) -> Result<(), UpstreamError> {
        if self.stall {
            tokio::time::sleep(t.headers_timeout).await;
            return Err(stall_error(t.headers_timeout));
        }
        Ok(())
    }

    /// A stream: a stall never answers, and the first-token timeout ends it.
    pub async fn stall_stream(&self) {
        if self.stall {
            futures_util::future::pending::<()>().await;
        }
    }
}

/// One chat call to one target, with the drill fault of its provider applied.
async fn chat_attempt(
    gw: &Gateway,
    t: &Target,
    req: &ChatRequest,
) -> Result<Answer, UpstreamError> {
    let (provider, drill) = prepare(gw, t).await?;
    if !req.stream {
        drill.stall_whole(t).await?;
        return provider.chat(req, &t.model).await.map(Answer::Complete);
    }
    let first_output = async {
        drill.stall_stream().await;
        let mut stream = provider.chat_stream(req, &t.model).await?;
        if let Some(n) = drill.cut {
            stream = cut_after(stream, n);
        }
        peek_output(stream).await
    };
    let (head, rest) = within_first_token_timeout(t, first_output).await?;
    Ok(Answer::Stream(head, rest))
}

/// `first_output` (a stream's call up to its first output), failed as a
/// timeout when it takes longer than the target's first-token timeout.
pub(super) async fn within_first_token_timeout<T>(
    t: &Target,
    first_output: impl Future<Output = Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    match tokio::time::timeout(t.first_token_timeout, first_output).await {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::new(
            ErrorKind::Timeout,
            format!(
                "no output within the first-token timeout of {}",
                humantime::format_duration(t.first_token_timeout)
            ),
        )),
    }
}

pub(super) fn stall_error(after: Duration) -> UpstreamError {
    UpstreamError::new(
        ErrorKind::Timeout,
        format!(
            "backend sent no response headers within {}",
            humantime::format_duration(after)
        ),
    )
}

/// The error for a request no target could serve: the last attempt's error,
/// with every attempt kept as typed history (and, as before, listed in its
/// message); or, if nothing was tried, why.
fn give_up(route: &str, mut errors: Vec<Failed>, skips: Vec<Skip>, private: bool) -> GatewayError {
    let history: Vec<Attempt> = errors
        .iter()
        .map(|f| Attempt {
            target: f.target.clone(),
            kind: f.error.kind,
            status: f.error.status,
            elapsed_ms: u64::try_from(f.elapsed.as_millis()).unwrap_or(u64::MAX),
        })
        .collect();
    if let Some(last) = errors.pop() {
        let mut e = last.error;
        if !errors.is_empty() {
            let earlier: Vec<String> = errors
                .iter()
                .map(|f| format!("{}: {}", f.target, f.error.kind.as_str()))
                .collect();
            e.message = format!(
                "{}{}{})",
                e.message,
                crate::error::EARLIER_ATTEMPTS,
                earlier.join(", ")
            );
        }
        e.attempts = history;
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
pub(super) fn check_capabilities(t: &Target, req: &ChatRequest) -> Result<(), &'static str> {
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
