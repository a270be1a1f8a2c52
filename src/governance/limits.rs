//! Rate limits per key and per route: requests per minute, tokens per minute
//! and concurrent requests.
//!
//! A request is limited by its caller's key (`KeyConfig.limits`, when the
//! caller is known) and by its route (`routes.<name>.limits`). It is admitted
//! only if every limit that applies admits it, and a refusal takes nothing
//! from the others: all are checked first, then all are charged, under one
//! lock (in memory) or in one Lua script (Redis).
//!
//! - Requests and tokens per minute: GCRA ([`gcra`]), burst = the minute's
//!   allowance. Input tokens are counted with tiktoken before the call (in the
//!   encoding of the first target of the request's chain, once, only when a
//!   token limit applies) and charged at admission: a request is admitted
//!   while the bucket has room for its input. Output tokens are charged when
//!   the request ends ([`Limiter::settle`]), from the usage the response
//!   reported or the gateway estimated (a cut stream's output too); they may
//!   push the counter into debt, which delays the next requests.
//! - Concurrency: a count of requests in flight per key and per route; an
//!   admitted request's [`Held`] gives its slot back when it is settled or
//!   dropped, which happens when the response body ends (a stream's last byte).
//! - `limits.store: redis`: the counters live in Redis ([`redis`]) so several
//!   replicas enforce one limit. When Redis fails or is slower than
//!   `limits.redis.timeout`, `limits.on_store_error` decides: `fail_open`
//!   serves from this replica's own counters, `fail_closed` refuses (503).

mod gcra;
mod redis;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::canonical::{ChatRequest, EmbeddingInput, EmbeddingsRequest};
use crate::config::{OnStoreError, RateLimitStore, RateLimits};
use crate::error::GatewayError;
use crate::metrics::GovMetrics;
use crate::pipeline::RequestContext;

use super::Ledger;

/// The limit counters (process-wide; they outlive snapshots).
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    /// The zero of the in-memory clock.
    start: Instant,
    /// This replica's counters (`store: memory`, and the `fail_open` fallback).
    memory: Mutex<Tables>,
    /// `store: redis`: the shared counters, and the state last seen there (for
    /// the admin API).
    redis: Option<redis::RedisLimits>,
    seen: Mutex<Tables>,
    on_error: OnStoreError,
    metrics: GovMetrics,
}

/// Counters by key id and by route name.
#[derive(Default)]
struct Tables {
    keys: HashMap<Box<str>, Counter>,
    routes: HashMap<Box<str>, Counter>,
}

impl Tables {
    fn get(&self, p: &Party) -> Counter {
        let t = match p.scope {
            Scope::Key => &self.keys,
            Scope::Route => &self.routes,
        };
        t.get(&*p.name).copied().unwrap_or_default()
    }

    fn put(&mut self, p: &Party, c: Counter) {
        let t = match p.scope {
            Scope::Key => &mut self.keys,
            Scope::Route => &mut self.routes,
        };
        match t.get_mut(&*p.name) {
            Some(slot) => *slot = c,
            None => {
                t.insert((*p.name).into(), c);
            }
        }
    }
}

/// One counter: the theoretical arrival times of its request and token
/// limits (µs on its store's clock), its requests in flight, and the limits it
/// was last used with.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counter {
    requests: u64,
    tokens: u64,
    in_flight: u32,
    limits: RateLimits,
}

/// Whose limit: the caller's key or the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Key,
    Route,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Route => "route",
        }
    }
}

/// A party whose limits apply to a request.
#[derive(Debug, Clone)]
struct Party {
    scope: Scope,
    name: Name,
    limits: RateLimits,
}

/// A key id or a route name (both shared, never copied per request).
#[derive(Debug, Clone)]
enum Name {
    Key(Arc<str>),
    Route(crate::ids::RouteId),
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Name::Key(k) => k,
            Name::Route(r) => r,
        }
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

/// What a store answered: its clock, whether the request was admitted, and
/// each party's counter after admission (or as it stood, when refused).
struct Decision {
    now: u64,
    admitted: bool,
    state: Vec<Counter>,
}

/// Where an admitted request's slots and tokens were taken.
#[derive(Debug)]
enum Taken {
    Memory,
    Redis(redis::Lease),
}

/// What an admitted request holds: concurrency slots, the tokens it reserved,
/// and the `x-ratelimit-*` headers for its response.
#[derive(Default)]
pub struct Held {
    pub headers: Vec<(&'static str, String)>,
    grant: Option<Grant>,
}

struct Grant {
    inner: Arc<Inner>,
    parties: Vec<Party>,
    taken: Taken,
    released: AtomicBool,
}

impl Grant {
    /// Gives the request's concurrency slots back (once).
    fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        match &self.taken {
            Taken::Memory => {
                let mut t = lock(&self.inner.memory);
                for p in &self.parties {
                    let mut c = t.get(p);
                    c.in_flight = c.in_flight.saturating_sub(1);
                    t.put(p, c);
                }
            }
            Taken::Redis(lease) => {
                if let Some(r) = &self.inner.redis {
                    r.release(&self.inner, lease);
                }
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(g) = &self.grant {
            g.release();
        }
    }
}

fn lock(m: &Mutex<Tables>) -> std::sync::MutexGuard<'_, Tables> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The parties whose limits apply: the caller's key, then the route.
fn parties(ctx: &RequestContext) -> Vec<Party> {
    let mut out = Vec::new();
    if let Some(c) = &ctx.caller {
        if !c.key.limits.is_empty() {
            out.push(Party {
                scope: Scope::Key,
                name: Name::Key(c.id.clone()),
                limits: c.key.limits,
            });
        }
    }
    let route = ctx.route();
    if !route.governance.limits.is_empty() {
        out.push(Party {
            scope: Scope::Route,
            name: Name::Route(route.name.clone()),
            limits: route.governance.limits,
        });
    }
    out
}

/// The request's input tokens, in the encoding of the first target of its
/// chain (large requests are counted on the blocking pool).
async fn input_tokens(
    ctx: &RequestContext,
    chat: Option<&ChatRequest>,
    embeddings: Option<&EmbeddingsRequest>,
) -> u64 {
    let enc = ctx
        .chain()
        .first()
        .map_or(crate::tokens::Encoding::Cl100k, |t| t.encoding);
    if let Some(req) = chat {
        return u64::from(crate::tokens::prompt_tokens_async(enc, req).await);
    }
    match embeddings.map(|e| &e.input) {
        Some(EmbeddingInput::Texts(t)) => u64::from(crate::tokens::count_all_async(enc, t).await),
        Some(EmbeddingInput::Tokens(t)) => {
            t.iter().fold(0u64, |n, v| n.saturating_add(v.len() as u64))
        }
        None => 0,
    }
}

/// Whether `c` has room for one more request of `tokens` under `l` at `now`.
fn fits(l: &RateLimits, c: &Counter, now: u64, tokens: u64) -> bool {
    l.rpm
        .is_none_or(|r| gcra::admit(c.requests, now, gcra::increment(r, 1)).is_ok())
        && l.tpm
            .is_none_or(|t| gcra::admit(c.tokens, now, gcra::increment(t, tokens)).is_ok())
        && l.concurrency.is_none_or(|n| c.in_flight < n)
}

/// `c` after admitting a request of `tokens` (which [`fits`]).
fn take(l: &RateLimits, mut c: Counter, now: u64, tokens: u64) -> Counter {
    if let Some(r) = l.rpm {
        c.requests = gcra::charge(c.requests, now, gcra::increment(r, 1));
    }
    if let Some(t) = l.tpm {
        c.tokens = gcra::charge(c.tokens, now, gcra::increment(t, tokens));
    }
    c.in_flight = c.in_flight.saturating_add(1);
    c.limits = *l;
    c
}

/// Picks a party's limit and its counter's TAT, for one kind of limit.
type Pick = fn(&Party, &Counter) -> Option<(u64, u64)>;

/// The limit, remaining allowance and reset time (µs) of the tightest limit
/// of one kind among the parties.
fn tightest(parties: &[Party], state: &[Counter], now: u64, pick: Pick) -> Option<(u64, u64, u64)> {
    parties
        .iter()
        .zip(state)
        .filter_map(|(p, c)| {
            let (limit, tat) = pick(p, c)?;
            Some((
                limit,
                gcra::remaining(tat, now, limit),
                gcra::reset(tat, now),
            ))
        })
        .min_by_key(|(_, remaining, _)| *remaining)
}

/// `x-ratelimit-*` headers of the tightest request limit and the tightest
/// token limit among the parties.
fn headers(parties: &[Party], state: &[Counter], now: u64) -> Vec<(&'static str, String)> {
    let kinds: [([&'static str; 3], Pick); 2] = [
        (
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
            |p, c| p.limits.rpm.map(|l| (l, c.requests)),
        ),
        (
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
            |p, c| p.limits.tpm.map(|l| (l, c.tokens)),
        ),
    ];
    let mut out = Vec::new();
    for (names, pick) in kinds {
        if let Some((limit, remaining, reset)) = tightest(parties, state, now, pick) {
            out.push((names[0], limit.to_string()));
            out.push((names[1], remaining.to_string()));
            out.push((names[2], gcra::duration_text(reset)));
        }
    }
    out
}

/// One limit that refused a request.
struct Refused<'a> {
    party: &'a Party,
    limit: &'static str,
    text: String,
    wait: Option<u64>,
}

/// Every limit that does not admit a request of `tokens`, with when it would.
fn refusals<'a>(
    parties: &'a [Party],
    state: &[Counter],
    now: u64,
    tokens: u64,
) -> Vec<Refused<'a>> {
    let mut out = Vec::new();
    for (p, c) in parties.iter().zip(state) {
        let who = match p.scope {
            Scope::Key => format!("key `{}`", p.name),
            Scope::Route => format!("route `{}`", p.name),
        };
        if let Some(r) = p.limits.rpm {
            if let Err(e) = gcra::admit(c.requests, now, gcra::increment(r, 1)) {
                out.push(Refused {
                    party: p,
                    limit: "rpm",
                    text: format!("{who} allows {r} requests per minute (rpm)"),
                    wait: match e {
                        gcra::Refusal::Wait(w) => Some(w),
                        gcra::Refusal::Never => None,
                    },
                });
            }
        }
        if let Some(t) = p.limits.tpm {
            match gcra::admit(c.tokens, now, gcra::increment(t, tokens)) {
                Ok(_) => {}
                Err(gcra::Refusal::Wait(w)) => out.push(Refused {
                    party: p,
                    limit: "tpm",
                    text: format!(
                        "{who} allows {t} tokens per minute (tpm) and this request's input is {tokens} tokens"
                    ),
                    wait: Some(w),
                }),
                Err(gcra::Refusal::Never) => out.push(Refused {
                    party: p,
                    limit: "tpm",
                    text: format!(
                        "{who} allows {t} tokens per minute (tpm): this request's input of {tokens} tokens can never fit"
                    ),
                    wait: None,
                }),
            }
        }
        if let Some(n) = p.limits.concurrency {
            if c.in_flight >= n {
                out.push(Refused {
                    party: p,
                    limit: "concurrency",
                    text: format!("{who} allows {n} concurrent requests"),
                    wait: None,
                });
            }
        }
    }
    out
}

impl Inner {
    /// Microseconds on the in-memory clock.
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn memory_acquire(&self, parties: &[Party], tokens: u64) -> Decision {
        let now = self.now();
        let mut t = lock(&self.memory);
        let mut state: Vec<Counter> = parties.iter().map(|p| t.get(p)).collect();
        let admitted = parties
            .iter()
            .zip(&state)
            .all(|(p, c)| fits(&p.limits, c, now, tokens));
        if admitted {
            for (p, c) in parties.iter().zip(state.iter_mut()) {
                *c = take(&p.limits, *c, now, tokens);
                t.put(p, *c);
            }
        }
        Decision {
            now,
            admitted,
            state,
        }
    }

    /// Charges output tokens to the token limits of `parties` (in memory).
    fn memory_charge(&self, parties: &[Party], tokens: u64) {
        let now = self.now();
        let mut t = lock(&self.memory);
        for p in parties {
            if let Some(tpm) = p.limits.tpm {
                let mut c = t.get(p);
                c.tokens = gcra::charge(c.tokens, now, gcra::increment(tpm, tokens));
                t.put(p, c);
            }
        }
    }

    /// Notes what Redis answered, on the local clock, for the admin API.
    fn remember(&self, parties: &[Party], d: &Decision) {
        let local = self.now();
        let shift = |tat: u64| tat.saturating_sub(d.now).saturating_add(local);
        let mut t = lock(&self.seen);
        for (p, c) in parties.iter().zip(&d.state) {
            let mut c = *c;
            c.requests = shift(c.requests);
            c.tokens = shift(c.tokens);
            c.limits = p.limits;
            t.put(p, c);
        }
    }

    fn store_failed(&self, why: &str) -> Result<(), GatewayError> {
        let policy = match self.on_error {
            OnStoreError::FailOpen => "fail_open",
            OnStoreError::FailClosed => "fail_closed",
        };
        self.metrics.limit_store_error(policy);
        if let Some(r) = &self.redis {
            r.outage(why, policy);
        }
        match self.on_error {
            OnStoreError::FailOpen => Ok(()),
            OnStoreError::FailClosed => Err(GatewayError::StoreUnavailable {
                message: "the rate-limit store is unavailable; requests are refused until it is back (limits.on_store_error: fail_closed)".into(),
            }),
        }
    }
}

impl Limiter {
    pub fn new(store: &RateLimitStore, metrics: &GovMetrics) -> Result<Limiter, String> {
        let redis = match &store.redis {
            Some(r) => Some(redis::RedisLimits::new(r)?),
            None => None,
        };
        Ok(Limiter {
            inner: Arc::new(Inner {
                start: Instant::now(),
                memory: Mutex::default(),
                redis,
                seen: Mutex::default(),
                on_error: store.on_store_error,
                metrics: metrics.clone(),
            }),
        })
    }

    /// Admits the request under its key's and its route's limits, or a 429
    /// (`GatewayError::Limited`) with `Retry-After` and `x-ratelimit-*` headers.
    pub async fn acquire(
        &self,
        ctx: &RequestContext,
        chat: Option<&ChatRequest>,
        embeddings: Option<&EmbeddingsRequest>,
    ) -> Result<Held, GatewayError> {
        let parties = parties(ctx);
        if parties.is_empty() {
            return Ok(Held::default());
        }
        let tokens = if parties.iter().any(|p| p.limits.tpm.is_some()) {
            input_tokens(ctx, chat, embeddings).await
        } else {
            0
        };
        let inner = &self.inner;
        let (decision, taken) = match &inner.redis {
            None => (inner.memory_acquire(&parties, tokens), Taken::Memory),
            Some(r) => match r.acquire(&parties, tokens).await {
                Ok((d, lease)) => {
                    inner.remember(&parties, &d);
                    r.renew_leases(inner);
                    (d, Taken::Redis(lease))
                }
                Err(why) => {
                    inner.store_failed(&why)?;
                    (inner.memory_acquire(&parties, tokens), Taken::Memory)
                }
            },
        };
        let headers = headers(&parties, &decision.state, decision.now);
        if decision.admitted {
            return Ok(Held {
                headers,
                grant: Some(Grant {
                    inner: inner.clone(),
                    parties,
                    taken,
                    released: AtomicBool::new(false),
                }),
            });
        }
        let refused = refusals(&parties, &decision.state, decision.now, tokens);
        let Some(first) = refused.first() else {
            // Not expected: the store and `refusals` apply the same rule to the
            // same figures. Refuse without naming a limit rather than admit.
            return Err(limited("rate limit exceeded".into(), None, headers));
        };
        inner.metrics.limited(
            super::Caller::label(ctx.caller.as_ref()),
            &ctx.route().name,
            first.party.scope.as_str(),
            first.limit,
        );
        // Admitted once every refusing limit admits it; unknown when one
        // never will or waits on requests in flight.
        let retry_after = refused
            .iter()
            .map(|r| r.wait)
            .try_fold(0u64, |m, w| w.map(|w| m.max(w)))
            .map(Duration::from_micros);
        let text: Vec<&str> = refused.iter().map(|r| r.text.as_str()).collect();
        Err(limited(
            format!("rate limit exceeded: {}", text.join("; ")),
            retry_after,
            headers,
        ))
    }

    /// The request ended: releases its slots and settles its output tokens.
    pub fn settle(&self, held: &Held, ledger: &Ledger) {
        let Some(g) = &held.grant else {
            return;
        };
        let output = ledger.usage.map_or(0, |u| u64::from(u.completion_tokens));
        if output > 0 {
            let tpm: Vec<Party> = g
                .parties
                .iter()
                .filter(|p| p.limits.tpm.is_some())
                .cloned()
                .collect();
            if !tpm.is_empty() {
                match (&g.taken, &self.inner.redis) {
                    (Taken::Redis(_), Some(r)) => r.charge(&self.inner, tpm, output),
                    _ => self.inner.memory_charge(&tpm, output),
                }
            }
        }
        g.release();
    }

    /// A key's current usage of its limits, for the admin API: per limit, the
    /// limit and what is left of it (the last state seen in Redis, with
    /// `store: redis`). `null` before the key's first limited request.
    pub fn usage(&self, key: &str) -> Value {
        let inner = &self.inner;
        let (table, store) = match inner.redis {
            Some(_) => (&inner.seen, "redis"),
            None => (&inner.memory, "memory"),
        };
        let Some(c) = lock(table).keys.get(key).copied() else {
            return Value::Null;
        };
        let now = inner.now();
        let rate = |limit: Option<u64>, tat: u64| {
            limit.map(|l| {
                json!({
                    "limit": l,
                    "remaining": gcra::remaining(tat, now, l),
                    "reset": gcra::duration_text(gcra::reset(tat, now)),
                })
            })
        };
        json!({
            "store": store,
            "rpm": rate(c.limits.rpm, c.requests),
            "tpm": rate(c.limits.tpm, c.tokens),
            "concurrency": c.limits.concurrency.map(|l| json!({"limit": l, "in_flight": c.in_flight})),
            "in_flight": c.in_flight,
        })
    }
}

fn limited(
    message: String,
    retry_after: Option<Duration>,
    headers: Vec<(&'static str, String)>,
) -> GatewayError {
    GatewayError::Limited {
        message,
        code: "rate_limit_exceeded",
        retry_after,
        headers,
    }
}
