//! Prometheus metrics. One registry per gateway instance (so tests running several
//! gateways in one process do not share counters). Labels are low-cardinality:
//! route and provider names come from config, `kind` from [`crate::error`].

use std::time::Duration;

use crate::canonical::Usage;
use crate::error::ErrorKind;
use crate::ids::{ProviderId, RouteId, TargetId};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// A target's metric handles, resolved once per snapshot (on first use) for its
/// route, provider and id: the per-request events of a target record without
/// looking labels up.
pub struct TargetHandles {
    upstream: prometheus::Histogram,
    breaker: IntGauge,
    attempt_ok: prometheus::IntCounter,
    ttft: prometheus::Histogram,
    /// in/reported, out/reported, in/estimated, out/estimated
    tokens: [prometheus::IntCounter; 4],
}

impl TargetHandles {
    /// Time one backend call took.
    pub fn upstream(&self, took: Duration) {
        self.upstream.observe(took.as_secs_f64());
    }

    /// The target's breaker state after an outcome.
    pub fn breaker(&self, state: crate::health::BreakerState) {
        self.breaker.set(state.gauge());
    }

    /// An attempt that succeeded.
    pub fn attempt_ok(&self) {
        self.attempt_ok.inc();
    }

    fn ttft(&self, took: Duration) {
        self.ttft.observe(took.as_secs_f64());
    }

    fn tokens(&self, u: &Usage) {
        let base = if u.estimated { 2 } else { 0 };
        self.tokens[base].inc_by(u64::from(u.prompt_tokens));
        self.tokens[base + 1].inc_by(u64::from(u.completion_tokens));
    }
}

/// A route's metric handles, resolved once per snapshot (on first use).
pub struct RouteHandles {
    overhead: prometheus::Histogram,
    request_seconds: prometheus::Histogram,
    /// hit, miss, bypass, refresh
    cache: [prometheus::IntCounter; 4],
}

impl RouteHandles {
    /// A cache decision of the route.
    pub fn cache(&self, status: crate::cache::Status) {
        use crate::cache::Status;
        let i = match status {
            Status::Hit => 0,
            Status::Miss => 1,
            Status::Bypass => 2,
            Status::Refresh => 3,
        };
        self.cache[i].inc();
    }
}

/// A search branch, as the retrieval latency's `branch` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    Lexical,
    Dense,
    /// A remote kind's one search (http, chroma), or a search that found nothing.
    Search,
}

/// Why a search failed, as the retrieval error's `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrievalError {
    Invalid,
    Timeout,
    Failed,
    /// The retriever cannot serve (missing index, unset key).
    Unavailable,
}

impl RetrievalError {
    pub fn as_str(self) -> &'static str {
        match self {
            RetrievalError::Invalid => "invalid",
            RetrievalError::Timeout => "timeout",
            RetrievalError::Failed => "failed",
            RetrievalError::Unavailable => "unavailable",
        }
    }
}

/// A retriever's metric handles, resolved once per configured retriever.
#[derive(Clone)]
pub struct RetrieverHandles {
    /// lexical, dense, search
    seconds: [prometheus::Histogram; 3],
    passages: prometheus::IntCounter,
    empty: prometheus::IntCounter,
    /// invalid, timeout, failed, unavailable
    errors: [prometheus::IntCounter; 4],
    /// hit, miss
    cache: [prometheus::IntCounter; 2],
}

impl RetrieverHandles {
    /// A search that answered: its latency under each branch that produced
    /// its passages, and what it returned.
    pub fn searched(&self, took: Duration, branches: &[Branch], passages: usize) {
        for b in branches {
            let i = match b {
                Branch::Lexical => 0,
                Branch::Dense => 1,
                Branch::Search => 2,
            };
            self.seconds[i].observe(took.as_secs_f64());
        }
        self.passages.inc_by(passages as u64);
        if passages == 0 {
            self.empty.inc();
        }
    }

    /// A search that failed.
    pub fn error(&self, kind: RetrievalError) {
        let i = match kind {
            RetrievalError::Invalid => 0,
            RetrievalError::Timeout => 1,
            RetrievalError::Failed => 2,
            RetrievalError::Unavailable => 3,
        };
        self.errors[i].inc();
    }

    /// A results-cache lookup.
    pub fn cache(&self, hit: bool) {
        self.cache[usize::from(!hit)].inc();
    }
}

/// What [`Metrics::request`] records of a request's end.
pub struct RequestEnd<'a> {
    /// The route that took the request, with its handles (`None`: refused
    /// before one was chosen).
    pub route: Option<(&'a RouteId, &'a RouteHandles)>,
    /// The provider that answered, or whose error ended the request.
    pub provider: Option<&'a ProviderId>,
    pub status: u16,
    /// The error's code, for an error response.
    pub error: Option<&'a str>,
    /// The prompt id and version the request was rendered from.
    pub prompt: Option<(&'a str, u32)>,
    pub arm: Option<&'a str>,
    /// The gateway's own time (everything but waiting on the backend).
    pub overhead: Duration,
    /// The whole time to the response; `None` for a stream, which records its
    /// own duration when it ends.
    pub whole: Option<Duration>,
}

pub struct Metrics {
    registry: Registry,
    /// Requests by route, provider and final HTTP status.
    pub requests: IntCounterVec,
    /// Whole request time as the client sees it (to response end), by route.
    pub request_seconds: HistogramVec,
    /// Time waiting on the backend (to response headers / full body), by provider.
    pub upstream_seconds: HistogramVec,
    /// Time to the first streamed token, by route and provider.
    pub ttft_seconds: HistogramVec,
    /// The gateway's own processing time per request.
    pub overhead_seconds: HistogramVec,
    /// Tokens by route, provider, direction (`in`/`out`) and source (`reported`/`estimated`).
    pub tokens: IntCounterVec,
    /// Errors by kind (the error JSON's `code`) and route.
    pub errors: IntCounterVec,
    /// Streams that ended with an error event after they began.
    pub stream_errors: IntCounterVec,
    pub in_flight: IntGauge,
    /// Requests that used a prompt, by prompt, version and HTTP status.
    pub prompt_requests: IntCounterVec,
    /// Prompt lookups or renders that failed (unknown prompt/label, bad variables).
    pub prompt_errors: IntCounterVec,
    /// Config reloads by result (`ok`, `error`).
    pub reloads: IntCounterVec,
    /// Unix time of the last successful config load.
    pub last_reload: IntGauge,
    /// Unix time of the last reload that was rejected (0: none yet).
    pub last_reload_failure: IntGauge,
    /// 1 while the latest configuration load succeeded, 0 after a rejected one.
    pub last_reload_successful: IntGauge,
    /// Attempts by route, target and result (`ok` or the error kind).
    pub attempts: IntCounterVec,
    /// Fallbacks by route, from-target, to-target and the kind that caused them.
    pub fallbacks: IntCounterVec,
    /// Breaker state per target: 0 closed, 1 half-open, 2 open.
    pub breaker_state: prometheus::IntGaugeVec,
    /// Per A/B arm: requests by status, latency, time to first token, tokens.
    pub arm_requests: IntCounterVec,
    pub arm_seconds: HistogramVec,
    pub arm_ttft_seconds: HistogramVec,
    pub arm_tokens: IntCounterVec,
    /// Cache decisions by route and result (hit, miss, bypass, refresh).
    pub cache_requests: IntCounterVec,
    pub cache_evictions: prometheus::IntCounter,
    /// Trace export attempts that failed (the collector unreachable or refusing).
    pub trace_export_failures: prometheus::IntCounter,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    /// Failures of the Redis tier by operation.
    pub cache_redis_errors: IntCounterVec,
    /// Active health checks by provider and result.
    pub health_checks: IntCounterVec,
    /// Retrieval latency by retriever and branch.
    pub retrieval_seconds: HistogramVec,
    /// Passages retrievers returned, by retriever.
    pub retrieval_passages: IntCounterVec,
    /// Searches that returned nothing, by retriever.
    pub retrieval_empty: IntCounterVec,
    /// Failed searches by retriever and kind.
    pub retrieval_errors: IntCounterVec,
    /// Results-cache lookups by retriever and result.
    pub retrieval_cache: IntCounterVec,
    /// Time of the embeddings calls retrievers make, by embeddings route.
    pub embedding_seconds: HistogramVec,
    /// Keys, limits, spend, audit and data protection.
    pub gov: GovMetrics,
    /// Shadow traffic: candidate calls, drops, latency, similarity.
    pub shadow: ShadowMetrics,
    /// Gauges filled when `/metrics` is scraped (routes' targets, keys' budgets).
    pub scraped: ScrapeGauges,
}

/// Gauges computed when `/metrics` is scraped, so the request path pays
/// nothing for them: each route's targets (configured, and able to take a
/// request now) and each key's budgets with its spend in them. A series whose
/// route, key or budget is gone after a reload is removed at the next scrape.
pub struct ScrapeGauges {
    /// Targets of a route (every arm's), by route.
    route_targets: prometheus::IntGaugeVec,
    /// Targets of a route that could take a request now, by route.
    route_available: prometheus::IntGaugeVec,
    /// A key's budget, by key, period (`daily`/`monthly`) and unit (`tokens`/`cost`).
    key_budget: prometheus::GaugeVec,
    /// A key's spend in its budget's period, by key, period and unit.
    key_spend: prometheus::GaugeVec,
    /// The label sets set at the last scrape: routes, then `key|period|unit`.
    last: std::sync::Mutex<(Vec<String>, Vec<[String; 3]>)>,
}

/// One route's targets, as [`ScrapeGauges::fill`] takes them.
pub struct RouteFigures<'a> {
    pub route: &'a str,
    pub targets: usize,
    /// Targets whose provider is configured and enabled and whose breaker is
    /// not open.
    pub available: usize,
}

/// One budget of a key with the spend counted against it.
pub struct BudgetFigures<'a> {
    pub key: &'a str,
    /// `daily` or `monthly`.
    pub period: &'static str,
    /// `tokens` or `cost` (in `spend.currency`).
    pub unit: &'static str,
    pub limit: f64,
    pub spent: f64,
}

impl ScrapeGauges {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let route_targets = prometheus::IntGaugeVec::new(
            Opts::new(
                "route_targets",
                "Targets configured on a route (every arm's), by route",
            ),
            &["route"],
        )?;
        let route_available = prometheus::IntGaugeVec::new(
            Opts::new(
                "route_targets_available",
                "Targets of a route that can take a request now (provider configured and enabled, breaker not open)",
            ),
            &["route"],
        )?;
        let key_budget = prometheus::GaugeVec::new(
            Opts::new(
                "key_budget",
                "A gateway key's budget, by key, period (daily, monthly) and unit (tokens, cost in the spend currency)",
            ),
            &["key", "period", "unit"],
        )?;
        let key_spend = prometheus::GaugeVec::new(
            Opts::new(
                "key_spend",
                "A gateway key's spend in its budget's current period as this replica knows it, by key, period and unit",
            ),
            &["key", "period", "unit"],
        )?;
        registry.register(Box::new(route_targets.clone()))?;
        registry.register(Box::new(route_available.clone()))?;
        registry.register(Box::new(key_budget.clone()))?;
        registry.register(Box::new(key_spend.clone()))?;
        Ok(ScrapeGauges {
            route_targets,
            route_available,
            key_budget,
            key_spend,
            last: std::sync::Mutex::new((Vec::new(), Vec::new())),
        })
    }

    /// Sets every route's and budget's figures and removes the series of
    /// routes and budgets no longer configured.
    pub fn fill(&self, routes: &[RouteFigures<'_>], budgets: &[BudgetFigures<'_>]) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        for r in routes {
            let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
            self.route_targets
                .with_label_values(&[r.route])
                .set(n(r.targets));
            self.route_available
                .with_label_values(&[r.route])
                .set(n(r.available));
        }
        for b in budgets {
            let labels = [b.key, b.period, b.unit];
            self.key_budget.with_label_values(&labels).set(b.limit);
            self.key_spend.with_label_values(&labels).set(b.spent);
        }
        for gone in last
            .0
            .iter()
            .filter(|g| !routes.iter().any(|r| r.route == *g))
        {
            let _ = self.route_targets.remove_label_values(&[gone]);
            let _ = self.route_available.remove_label_values(&[gone]);
        }
        for gone in last.1.iter().filter(|g| {
            !budgets
                .iter()
                .any(|b| b.key == g[0] && b.period == g[1] && b.unit == g[2])
        }) {
            let labels = [gone[0].as_str(), gone[1].as_str(), gone[2].as_str()];
            let _ = self.key_budget.remove_label_values(&labels);
            let _ = self.key_spend.remove_label_values(&labels);
        }
        last.0 = routes.iter().map(|r| r.route.to_owned()).collect();
        last.1 = budgets
            .iter()
            .map(|b| [b.key.to_owned(), b.period.to_owned(), b.unit.to_owned()])
            .collect();
    }
}

/// Governance metrics (keys, limits, budgets and cost, audit, data
/// protection). Key labels are key ids, never keys; detection labels are
/// types, never values.
#[derive(Clone)]
pub struct GovMetrics {
    /// Requests refused for their credential, by reason (the error code).
    pub auth_failures: IntCounterVec,
    /// Requests by key, route and HTTP status.
    pub key_requests: IntCounterVec,
    /// Tokens by key, route and direction (`in`/`out`).
    pub key_tokens: IntCounterVec,
    /// Cost in `spend.currency` by key, route and provider.
    pub cost: prometheus::CounterVec,
    /// Requests refused by a rate limit, by key, route, scope (`key`/`route`)
    /// and limit (`rpm`/`tpm`/`concurrency`).
    pub limited: IntCounterVec,
    /// Rate-limit store failures by policy outcome (`fail_open`/`fail_closed`).
    pub limit_store_errors: IntCounterVec,
    /// Requests over a budget, by key, period and action (`reject`/`fallback`).
    pub budget_exceeded: IntCounterVec,
    /// Spend store failures by operation.
    pub spend_store_errors: IntCounterVec,
    /// Audit records written, by sink (`file`/`stdout`).
    pub audit_records: IntCounterVec,
    /// Audit records dropped, by reason (`queue_full`/`write_error`).
    pub audit_dropped: IntCounterVec,
    /// Sensitive values found, by type, route and action.
    pub detections: IntCounterVec,
}

/// Shadow traffic's metrics: every series carries `route` and, per call,
/// `candidate` (`provider/model`), so shadow figures never mix with live ones.
pub struct ShadowMetrics {
    /// Candidate calls by route, candidate and outcome (`ok` or the error kind).
    calls: IntCounterVec,
    /// Copies not sent, by route and reason (`in_flight`: `max_in_flight`
    /// candidates busy; `private`: a private request and a candidate that is
    /// not self-hosted; `unsupported`: the candidate lacks a capability the
    /// request needs; `store_full`: the pair's write queue was full).
    dropped: IntCounterVec,
    /// Candidate latency (the whole answer).
    seconds: HistogramVec,
    /// Character-level similarity of compared pairs.
    similarity: HistogramVec,
    /// Candidate calls in flight, by route.
    in_flight: prometheus::IntGaugeVec,
}

impl ShadowMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let calls = IntCounterVec::new(
            Opts::new(
                "shadow_calls_total",
                "Shadow calls to candidates, by route, candidate and outcome",
            ),
            &["route", "candidate", "outcome"],
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "shadow_dropped_total",
                "Shadow copies not sent (or pairs not stored), by route and reason",
            ),
            &["route", "reason"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "shadow_duration_seconds",
                "Candidate latency to the whole answer, by route and candidate",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "candidate"],
        )?;
        let similarity = HistogramVec::new(
            HistogramOpts::new(
                "shadow_similarity",
                "Character-level similarity of primary and candidate answers",
            )
            .buckets(vec![
                0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0,
            ]),
            &["route", "candidate"],
        )?;
        let in_flight = prometheus::IntGaugeVec::new(
            Opts::new("shadow_in_flight", "Shadow calls in flight, by route"),
            &["route"],
        )?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(similarity.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        Ok(ShadowMetrics {
            calls,
            dropped,
            seconds,
            similarity,
            in_flight,
        })
    }

    /// A copy that was not sent (or a pair that was not stored).
    pub fn dropped(&self, route: &str, reason: &str) {
        self.dropped.with_label_values(&[route, reason]).inc();
    }

    /// A candidate call ended: its outcome and latency.
    pub fn call(&self, route: &str, candidate: &str, outcome: &str, took: Duration) {
        self.calls
            .with_label_values(&[route, candidate, outcome])
            .inc();
        self.seconds
            .with_label_values(&[route, candidate])
            .observe(took.as_secs_f64());
    }

    pub fn similarity(&self, route: &str, candidate: &str, s: f64) {
        self.similarity
            .with_label_values(&[route, candidate])
            .observe(s);
    }

    /// The route's shadow calls in flight went up (`1`) or down (`-1`).
    pub fn in_flight(&self, route: &str, delta: i64) {
        self.in_flight.with_label_values(&[route]).add(delta);
    }
}

impl GovMetrics {
    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    pub fn key_request(&self, key: &str, route: &str, status: u16) {
        let mut code = itoa::Buffer::new();
        self.key_requests
            .with_label_values(&[key, route, code.format(status)])
            .inc();
    }

    pub fn key_tokens(&self, key: &str, route: &str, usage: &Usage) {
        for (direction, n) in [
            ("in", usage.prompt_tokens),
            ("out", usage.completion_tokens),
        ] {
            if n > 0 {
                self.key_tokens
                    .with_label_values(&[key, route, direction])
                    .inc_by(u64::from(n));
            }
        }
    }

    pub fn cost(&self, key: &str, route: &str, provider: &str, amount: f64) {
        if amount.is_finite() && amount > 0.0 {
            self.cost
                .with_label_values(&[key, route, provider])
                .inc_by(amount);
        }
    }

    pub fn limited(&self, key: &str, route: &str, scope: &str, limit: &str) {
        self.limited
            .with_label_values(&[key, route, scope, limit])
            .inc();
    }

    pub fn limit_store_error(&self, policy: &str) {
        self.limit_store_errors.with_label_values(&[policy]).inc();
    }

    pub fn budget_exceeded(&self, key: &str, period: &str, action: &str) {
        self.budget_exceeded
            .with_label_values(&[key, period, action])
            .inc();
    }

    pub fn spend_store_error(&self, op: &str) {
        self.spend_store_errors.with_label_values(&[op]).inc();
    }

    pub fn audit_record(&self, sink: &str) {
        self.audit_records.with_label_values(&[sink]).inc();
    }

    pub fn audit_dropped(&self, reason: &str) {
        self.audit_dropped.with_label_values(&[reason]).inc();
    }

    pub fn detection(&self, kind: &str, route: &str, action: &str, n: u32) {
        self.detections
            .with_label_values(&[kind, route, action])
            .inc_by(u64::from(n));
    }

    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let cost = prometheus::CounterVec::new(
            Opts::new(
                "cost_total",
                "Cost of responses in the spend currency, by key, route and provider",
            ),
            &["key", "route", "provider"],
        )?;
        registry.register(Box::new(cost.clone()))?;
        Ok(GovMetrics {
            auth_failures: counter(
                "auth_failures_total",
                "Requests refused for their gateway key, by reason",
                &["reason"],
            )?,
            key_requests: counter(
                "key_requests_total",
                "Requests by gateway key id, route and HTTP status",
                &["key", "route", "status"],
            )?,
            key_tokens: counter(
                "key_tokens_total",
                "Tokens by gateway key id, route and direction",
                &["key", "route", "direction"],
            )?,
            cost,
            limited: counter(
                "ratelimit_rejections_total",
                "Requests refused by a rate limit, by key, route, scope and limit",
                &["key", "route", "scope", "limit"],
            )?,
            limit_store_errors: counter(
                "ratelimit_store_errors_total",
                "Rate-limit store failures, by the policy applied",
                &["policy"],
            )?,
            budget_exceeded: counter(
                "budget_exceeded_total",
                "Requests over a key's budget, by key, period and action",
                &["key", "period", "action"],
            )?,
            spend_store_errors: counter(
                "spend_store_errors_total",
                "Spend store failures by operation",
                &["op"],
            )?,
            audit_records: counter(
                "audit_records_total",
                "Audit records written, by sink",
                &["sink"],
            )?,
            audit_dropped: counter(
                "audit_dropped_total",
                "Audit records dropped, by reason",
                &["reason"],
            )?,
            detections: counter(
                "sensitive_detections_total",
                "Sensitive values found in requests, by type, route and action",
                &["type", "route", "action"],
            )?,
        })
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_002, 0.000_004, 0.000_006, 0.000_008, 0.000_010, 0.000_012, 0.000_015, 0.000_020,
    0.000_025, 0.000_030, 0.000_040, 0.000_050, 0.000_075, 0.000_100, 0.000_150, 0.000_250,
    0.000_500, 0.001, 0.005, 0.01,
];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("promptgate".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests by route, provider and HTTP status",
            ),
            &["route", "provider", "status"],
        )?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Request latency seen by the client",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        let upstream_seconds = HistogramVec::new(
            HistogramOpts::new("upstream_duration_seconds", "Time waiting on the backend")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["provider"],
        )?;
        let ttft_seconds = HistogramVec::new(
            HistogramOpts::new(
                "time_to_first_token_seconds",
                "Time to the first streamed token",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "provider"],
        )?;
        let overhead_seconds = HistogramVec::new(
            HistogramOpts::new(
                "gateway_overhead_seconds",
                "Gateway processing time per request, excluding time waiting on the backend",
            )
            .buckets(OVERHEAD_BUCKETS.to_vec()),
            &["route"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "tokens_total",
                "Tokens by route, provider, direction and source",
            ),
            &["route", "provider", "direction", "source"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new("errors_total", "Errors by kind and route"),
            &["kind", "route"],
        )?;
        let stream_errors = IntCounterVec::new(
            Opts::new(
                "stream_errors_total",
                "Streams ended with an error event after they began, by route, provider and kind",
            ),
            &["route", "provider", "kind"],
        )?;
        let in_flight = IntGauge::new("requests_in_flight", "Requests being served")?;
        let prompt_requests = IntCounterVec::new(
            Opts::new(
                "prompt_requests_total",
                "Requests that used a prompt, by prompt, version and status",
            ),
            &["prompt", "version", "status"],
        )?;
        let prompt_errors = IntCounterVec::new(
            Opts::new(
                "prompt_errors_total",
                "Prompt lookups or renders that failed, by prompt",
            ),
            &["prompt"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new("config_reloads_total", "Configuration reloads by result"),
            &["result"],
        )?;
        let last_reload = IntGauge::new(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load",
        )?;
        let last_reload_failure = IntGauge::new(
            "config_last_reload_failure_timestamp_seconds",
            "Unix time of the last rejected configuration reload (0: none since start)",
        )?;
        let last_reload_successful = IntGauge::new(
            "config_last_reload_successful",
            "1 while the latest configuration load succeeded, 0 while the latest was rejected",
        )?;
        last_reload_successful.set(1);
        let attempts = IntCounterVec::new(
            Opts::new(
                "attempts_total",
                "Backend attempts by route, target and result",
            ),
            &["route", "target", "result"],
        )?;
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "fallbacks_total",
                "Fallbacks by route, from-target, to-target and cause",
            ),
            &["route", "from", "to", "kind"],
        )?;
        let breaker_state = prometheus::IntGaugeVec::new(
            Opts::new(
                "breaker_state",
                "Circuit breaker per target: 0 closed, 1 half-open, 2 open",
            ),
            &["target"],
        )?;
        let arm_requests = IntCounterVec::new(
            Opts::new("arm_requests_total", "Requests per A/B arm by status"),
            &["route", "arm", "status"],
        )?;
        let arm_seconds = HistogramVec::new(
            HistogramOpts::new(
                "arm_request_duration_seconds",
                "Request latency per A/B arm",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "arm"],
        )?;
        let arm_ttft_seconds = HistogramVec::new(
            HistogramOpts::new(
                "arm_time_to_first_token_seconds",
                "Time to first token per A/B arm",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "arm"],
        )?;
        let arm_tokens = IntCounterVec::new(
            Opts::new(
                "arm_tokens_total",
                "Tokens (prompt + completion) per A/B arm",
            ),
            &["route", "arm"],
        )?;
        let cache_requests = IntCounterVec::new(
            Opts::new(
                "cache_requests_total",
                "Cache decisions by route and result",
            ),
            &["route", "result"],
        )?;
        let cache_evictions = prometheus::IntCounter::new(
            "cache_evictions_total",
            "Entries evicted from the in-memory cache to stay within its byte bound",
        )?;
        let cache_entries = IntGauge::new("cache_entries", "Entries in the in-memory cache")?;
        let trace_export_failures = prometheus::IntCounter::new(
            "trace_export_failures_total",
            "Trace export attempts to the OTLP collector that failed (a batch is tried up to 4 times, then dropped)",
        )?;
        let cache_bytes = IntGauge::new(
            "cache_bytes",
            "Approximate bytes held by the in-memory cache",
        )?;
        let cache_redis_errors = IntCounterVec::new(
            Opts::new(
                "cache_redis_errors_total",
                "Failures of the Redis cache tier by operation",
            ),
            &["op"],
        )?;
        let health_checks = IntCounterVec::new(
            Opts::new(
                "health_checks_total",
                "Active health checks by provider and result",
            ),
            &["provider", "result"],
        )?;
        let retrieval_seconds = HistogramVec::new(
            HistogramOpts::new(
                "retrieval_duration_seconds",
                "Retrieval latency by retriever and branch",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["retriever", "branch"],
        )?;
        let retrieval_passages = IntCounterVec::new(
            Opts::new("retrieval_passages_total", "Passages returned by retriever"),
            &["retriever"],
        )?;
        let retrieval_empty = IntCounterVec::new(
            Opts::new(
                "retrieval_empty_total",
                "Searches that returned no passage, by retriever",
            ),
            &["retriever"],
        )?;
        let retrieval_errors = IntCounterVec::new(
            Opts::new(
                "retrieval_errors_total",
                "Failed searches by retriever and kind",
            ),
            &["retriever", "kind"],
        )?;
        let retrieval_cache = IntCounterVec::new(
            Opts::new(
                "retrieval_cache_requests_total",
                "Retrieval results-cache lookups by retriever and result",
            ),
            &["retriever", "result"],
        )?;
        let embedding_seconds = HistogramVec::new(
            HistogramOpts::new(
                "retrieval_embedding_duration_seconds",
                "Time of the embeddings calls retrievers make, by embeddings route",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        for c in [
            &retrieval_passages,
            &retrieval_empty,
            &retrieval_errors,
            &retrieval_cache,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(retrieval_seconds.clone()))?;
        registry.register(Box::new(embedding_seconds.clone()))?;
        registry.register(Box::new(health_checks.clone()))?;
        registry.register(Box::new(cache_requests.clone()))?;
        registry.register(Box::new(cache_evictions.clone()))?;
        registry.register(Box::new(trace_export_failures.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(cache_bytes.clone()))?;
        registry.register(Box::new(cache_redis_errors.clone()))?;
        registry.register(Box::new(attempts.clone()))?;
        registry.register(Box::new(fallbacks.clone()))?;
        registry.register(Box::new(breaker_state.clone()))?;
        registry.register(Box::new(arm_requests.clone()))?;
        registry.register(Box::new(arm_seconds.clone()))?;
        registry.register(Box::new(arm_ttft_seconds.clone()))?;
        registry.register(Box::new(arm_tokens.clone()))?;
        registry.register(Box::new(prompt_requests.clone()))?;
        registry.register(Box::new(prompt_errors.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(last_reload.clone()))?;
        registry.register(Box::new(last_reload_failure.clone()))?;
        registry.register(Box::new(last_reload_successful.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_seconds.clone()))?;
        registry.register(Box::new(upstream_seconds.clone()))?;
        registry.register(Box::new(ttft_seconds.clone()))?;
        registry.register(Box::new(overhead_seconds.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(stream_errors.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        let gov = GovMetrics::new(&registry)?;
        let shadow = ShadowMetrics::new(&registry)?;
        let scraped = ScrapeGauges::new(&registry)?;
        Ok(Metrics {
            registry,
            requests,
            request_seconds,
            upstream_seconds,
            ttft_seconds,
            overhead_seconds,
            tokens,
            errors,
            stream_errors,
            in_flight,
            prompt_requests,
            prompt_errors,
            reloads,
            last_reload,
            last_reload_failure,
            last_reload_successful,
            attempts,
            fallbacks,
            breaker_state,
            arm_requests,
            arm_seconds,
            arm_ttft_seconds,
            arm_tokens,
            cache_requests,
            cache_evictions,
            trace_export_failures,
            cache_entries,
            cache_bytes,
            cache_redis_errors,
            health_checks,
            retrieval_seconds,
            retrieval_passages,
            retrieval_empty,
            retrieval_errors,
            retrieval_cache,
            embedding_seconds,
            gov,
            shadow,
            scraped,
        })
    }

    /// A request's end, as the client sees it: one call records every figure
    /// of it (by route, provider, status, error kind, prompt version, arm).
    pub fn request(&self, r: &RequestEnd<'_>) {
        let route = r.route.map_or("", |(id, _)| id.as_str());
        let provider = r.provider.map_or("", ProviderId::as_str);
        let mut code = itoa::Buffer::new();
        let code = code.format(r.status);
        self.requests
            .with_label_values(&[route, provider, code])
            .inc();
        if let Some(kind) = r.error {
            self.errors.with_label_values(&[kind, route]).inc();
        }
        if let Some((id, version)) = r.prompt {
            let mut v = itoa::Buffer::new();
            self.prompt_requests
                .with_label_values(&[id, v.format(version), code])
                .inc();
        }
        if let Some(arm) = r.arm {
            self.arm_requests
                .with_label_values(&[route, arm, code])
                .inc();
            if let Some(whole) = r.whole {
                self.arm_seconds
                    .with_label_values(&[route, arm])
                    .observe(whole.as_secs_f64());
            }
        }
        if let Some((_, handles)) = r.route {
            handles.overhead.observe(r.overhead.as_secs_f64());
            if let Some(whole) = r.whole {
                handles.request_seconds.observe(whole.as_secs_f64());
            }
        }
    }

    /// A configuration reload's result (a rejected one also notes its time).
    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
        self.last_reload_successful.set(i64::from(ok));
        if !ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.last_reload_failure
                .set(i64::try_from(now).unwrap_or(i64::MAX));
        }
    }

    /// Cache decisions of a route so far, by result (for the admin status).
    pub fn cache_count(&self, route: &RouteId, result: &str) -> u64 {
        let route = route.as_str();
        self.cache_requests
            .with_label_values(&[route, result])
            .get()
    }

    /// Failures of the Redis tier so far, for an operation (for the admin status).
    pub fn redis_errors(&self, op: &str) -> u64 {
        self.cache_redis_errors.with_label_values(&[op]).get()
    }

    /// The handles of route `route`.
    pub fn route_handles(&self, route: &RouteId) -> RouteHandles {
        let r = route.as_str();
        let cache = |status: crate::cache::Status| {
            self.cache_requests.with_label_values(&[r, status.as_str()])
        };
        use crate::cache::Status;
        RouteHandles {
            overhead: self.overhead_seconds.with_label_values(&[r]),
            request_seconds: self.request_seconds.with_label_values(&[r]),
            cache: [
                cache(Status::Hit),
                cache(Status::Miss),
                cache(Status::Bypass),
                cache(Status::Refresh),
            ],
        }
    }

    /// The handles of target `target` of route `route`.
    pub fn target_handles(
        &self,
        route: &RouteId,
        target: &TargetId,
        provider: &ProviderId,
    ) -> TargetHandles {
        let (r, t, p) = (route.as_str(), target.as_str(), provider.as_str());
        let tokens = |dir, source| self.tokens.with_label_values(&[r, p, dir, source]);
        TargetHandles {
            upstream: self.upstream_seconds.with_label_values(&[p]),
            breaker: self.breaker_state.with_label_values(&[t]),
            attempt_ok: self.attempts.with_label_values(&[r, t, "ok"]),
            ttft: self.ttft_seconds.with_label_values(&[r, p]),
            tokens: [
                tokens("in", "reported"),
                tokens("out", "reported"),
                tokens("in", "estimated"),
                tokens("out", "estimated"),
            ],
        }
    }

    /// A target's breaker state after an outcome.
    pub fn breaker(&self, target: &TargetId, state: crate::health::BreakerState) {
        let target = target.as_str();
        self.breaker_state
            .with_label_values(&[target])
            .set(state.gauge());
    }

    /// One attempt's result (`ok` or the error kind).
    pub fn attempt(&self, route: &RouteId, target: &TargetId, result: &str) {
        let route = route.as_str();
        let target = target.as_str();
        self.attempts
            .with_label_values(&[route, target, result])
            .inc();
    }

    /// A success on `to` after `from` failed with `kind`.
    pub fn fallback(&self, route: &RouteId, from: &TargetId, to: &TargetId, kind: ErrorKind) {
        let route = route.as_str();
        let from = from.as_str();
        let to = to.as_str();
        self.fallbacks
            .with_label_values(&[route, from, to, kind.as_str()])
            .inc();
    }

    /// Time to the first streamed output, per route and provider and per arm.
    pub fn ttft(&self, target: &TargetHandles, route: &RouteId, arm: Option<&str>, took: Duration) {
        target.ttft(took);
        if let Some(arm) = arm {
            self.arm_ttft_seconds
                .with_label_values(&[route.as_str(), arm])
                .observe(took.as_secs_f64());
        }
    }

    /// A response's usage, per route and provider and per arm.
    pub fn tokens(&self, target: &TargetHandles, route: &RouteId, arm: Option<&str>, u: &Usage) {
        target.tokens(u);
        if let Some(arm) = arm {
            self.arm_tokens
                .with_label_values(&[route.as_str(), arm])
                .inc_by(u64::from(u.total_tokens));
        }
    }

    /// A stream's whole duration (recorded when it ends), per route and arm.
    pub fn stream_end(&self, route: (&RouteId, &RouteHandles), arm: Option<&str>, took: Duration) {
        route.1.request_seconds.observe(took.as_secs_f64());
        if let Some(arm) = arm {
            self.arm_seconds
                .with_label_values(&[route.0.as_str(), arm])
                .observe(took.as_secs_f64());
        }
    }

    /// A stream that failed after it began.
    pub fn stream_error(&self, route: &RouteId, provider: &ProviderId, kind: ErrorKind) {
        let route = route.as_str();
        let provider = provider.as_str();
        self.stream_errors
            .with_label_values(&[route, provider, kind.as_str()])
            .inc();
        self.errors.with_label_values(&[kind.as_str(), route]).inc();
    }

    /// A prompt lookup or render that failed (`prompt`: a configured id or `unknown`).
    pub fn prompt_error(&self, prompt: &str) {
        self.prompt_errors.with_label_values(&[prompt]).inc();
    }

    /// The handles of retriever `id` (a configured id).
    pub fn retriever_handles(&self, id: &str) -> RetrieverHandles {
        let seconds = |b: &str| self.retrieval_seconds.with_label_values(&[id, b]);
        let error = |k: RetrievalError| self.retrieval_errors.with_label_values(&[id, k.as_str()]);
        let cache = |r: &str| self.retrieval_cache.with_label_values(&[id, r]);
        RetrieverHandles {
            seconds: [seconds("lexical"), seconds("dense"), seconds("search")],
            passages: self.retrieval_passages.with_label_values(&[id]),
            empty: self.retrieval_empty.with_label_values(&[id]),
            errors: [
                error(RetrievalError::Invalid),
                error(RetrievalError::Timeout),
                error(RetrievalError::Failed),
                error(RetrievalError::Unavailable),
            ],
            cache: [cache("hit"), cache("miss")],
        }
    }

    /// One embeddings call a retriever made through route `route` (a
    /// configured route: retriever files are validated against them).
    pub fn embedding(&self, route: &str, took: Duration) {
        self.embedding_seconds
            .with_label_values(&[route])
            .observe(took.as_secs_f64());
    }

    /// An active health check's result.
    pub fn health_check(&self, provider: &str, failed: bool) {
        self.health_checks
            .with_label_values(&[provider, if failed { "failed" } else { "ok" }])
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(8192);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}
