//! Governance: who a request comes from (gateway keys), what it may use, how
//! much it may spend (rate limits, budgets, cost), and the record of what it
//! did (the audit log).
//!
//! - [`keys`]: the key table built per snapshot ([`Access`]), authentication
//!   (constant-time), route and prompt authorization, `promptgate keys new`.
//! - [`limits`]: requests, tokens per minute and concurrency per key and per
//!   route; GCRA in process, or one shared limit in Redis.
//! - [`spend`]: cost from the providers' price tables, budgets per day/month,
//!   the durable spend store (SQLite or Redis), `promptgate usage`.
//! - [`audit`]: one JSON line per request, written off the request path.
//!
//! A request admitted by the gateway holds a [`Ticket`]: the pipeline settles
//! its usage on it, the server its status; when the response ends (a stream's
//! last byte too) the ticket is dropped, which releases its concurrency slots,
//! settles its tokens and spend and writes its audit record.

pub mod audit;
pub mod keys;
pub mod limits;
pub mod spend;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::canonical::{ChatRequest, Usage};
use crate::config::{AuthMode, Config, KeyConfig};
use crate::error::GatewayError;
use crate::metrics::GovMetrics;
use crate::pipeline::{ClientDialect, PromptUse, RequestContext};
use crate::snapshot::Target;

pub use keys::Access;

/// Who a request comes from: a configured key's id and entry (never the key).
#[derive(Clone, Debug)]
pub struct Caller {
    pub id: Arc<str>,
    pub key: Arc<KeyConfig>,
}

/// The label a request without a key is counted under.
pub const ANONYMOUS: &str = "anonymous";

impl Caller {
    /// The caller's id, or `anonymous`.
    pub fn label(c: Option<&Caller>) -> &str {
        c.map_or(ANONYMOUS, |c| &c.id)
    }
}

/// Process-wide governance state, which outlives config snapshots: limit
/// counters, the spend store, the audit sink.
pub struct Governor {
    pub limits: limits::Limiter,
    pub spend: spend::Spend,
    pub audit: audit::Audit,
    pub metrics: GovMetrics,
}

impl Governor {
    /// Opens the stores the config names (the spend file, Redis connections,
    /// the audit file). An error is a startup error.
    pub fn new(cfg: &Config, metrics: &GovMetrics) -> Result<Arc<Governor>, String> {
        Ok(Arc::new(Governor {
            limits: limits::Limiter::new(&cfg.rate_store, metrics)?,
            spend: spend::Spend::open(&cfg.spend, metrics)?,
            audit: audit::Audit::open(&cfg.audit, metrics)?,
            metrics: metrics.clone(),
        }))
    }

    /// Whether a request on this snapshot needs a ticket at all: keys,
    /// limits, prices or the audit log are configured.
    pub fn needed(&self, snap: &crate::snapshot::Snapshot) -> bool {
        snap.access.active || self.audit.enabled()
    }

    /// Admission of a placed request, after data protection: the caller's
    /// budget (which may move the request to the budget's fallback route), then
    /// the key's and the route's rate limits. `input_tokens` is counted only
    /// when a token limit applies. `Ok(None)`: nothing to account for.
    pub async fn admit(
        self: &Arc<Self>,
        ctx: &mut RequestContext,
        req: Option<&ChatRequest>,
        input: Option<&crate::canonical::EmbeddingsRequest>,
    ) -> Result<Option<Arc<Ticket>>, GatewayError> {
        if !self.needed(&ctx.snapshot) {
            return Ok(None);
        }
        let asked = ctx.route().name.clone();
        self.spend.check(self, ctx).await?;
        let held = self.limits.acquire(ctx, req, input).await?;
        Ok(Some(Arc::new(Ticket {
            gov: self.clone(),
            caller: ctx.caller.clone(),
            moved_from: (ctx.route().name != asked).then_some(asked),
            route: ctx.route().name.clone(),
            held,
            started: Instant::now(),
            ledger: Mutex::new(Ledger {
                request_id: ctx.request_id.clone(),
                dialect: Some(ctx.dialect),
                prompt: ctx.prompt.clone(),
                arm: ctx.arm().map(|a| a.name.clone()),
                content: audit::wants_content(ctx, req, input),
                ..Ledger::default()
            }),
        })))
    }
}

/// What the audit record, the spend store and the token limits learn about
/// a request as it runs.
#[derive(Default)]
pub struct Ledger {
    pub request_id: Arc<str>,
    pub dialect: Option<ClientDialect>,
    pub prompt: Option<PromptUse>,
    pub arm: Option<Arc<str>>,
    /// The target that answered.
    pub target: Option<Arc<Target>>,
    pub attempts: u32,
    pub status: u16,
    /// The error code, for a failed request.
    pub error: Option<&'static str>,
    pub usage: Option<Usage>,
    /// In `spend.currency`, when the target has a price.
    pub cost: Option<f64>,
    /// `hit`, `miss`, `bypass`, `refresh`, or none when the route does not cache.
    pub cache: Option<&'static str>,
    /// Detections by type (counts only, never values) and the action taken.
    pub detections: Vec<(Arc<str>, u32)>,
    pub protect_action: Option<&'static str>,
    /// Whether the record carries message content, and the content once known.
    pub content: Option<audit::Content>,
    pub streaming: bool,
    /// When the request reached the gateway (noted by `server::finish`; the
    /// audit log's latency is measured from it).
    pub arrived: Option<Instant>,
}

/// A request's hold on governance state; see the module documentation.
pub struct Ticket {
    gov: Arc<Governor>,
    pub caller: Option<Caller>,
    pub route: crate::ids::RouteId,
    /// The route the client asked for, when its budget moved the request to
    /// the fallback route (responses keep showing the name asked for).
    pub moved_from: Option<crate::ids::RouteId>,
    pub held: limits::Held,
    pub started: Instant,
    pub ledger: Mutex<Ledger>,
}

impl Ticket {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pipeline's report: `target` answered with `usage` (for a stream,
    /// when it ended). Computes the cost.
    pub fn settle(&self, target: &Arc<Target>, usage: &Usage) {
        let cost = target.price.map(|p| spend::cost(&p, usage));
        let mut l = self.ledger();
        l.target = Some(target.clone());
        l.usage = Some(*usage);
        l.cost = cost;
    }

    /// The cost settled so far (for the response header).
    pub fn cost(&self) -> Option<f64> {
        self.ledger().cost
    }

    /// Runs `f` on the ledger (the server's and the data protection's facts).
    pub fn note(&self, f: impl FnOnce(&mut Ledger)) {
        f(&mut self.ledger())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let ledger = std::mem::take(&mut *self.ledger());
        let elapsed = self.started.elapsed();
        self.gov.limits.settle(&self.held, &ledger);
        self.gov
            .spend
            .record(self.caller.as_ref(), &self.route, &ledger);
        self.gov
            .audit
            .write(self.caller.as_ref(), Some(&self.route), ledger, elapsed);
    }
}

/// `auth.mode`, for the startup message.
pub fn describe(mode: AuthMode, keys: usize) -> String {
    match mode {
        AuthMode::Off => format!(
            "auth: off — requests need no gateway key ({keys} keys configured identify callers that send one)"
        ),
        AuthMode::Required => format!("auth: required — {keys} gateway keys"),
    }
}
