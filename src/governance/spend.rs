//! Cost and budgets: each response's cost from its target's price table,
//! per-key budgets per UTC day and month, and the durable spend store.
//!
//! - Cost: input (less its cached part), cached input and output tokens at the
//!   target's price per million tokens ([`cost`]).
//! - Spend: when a request's ticket drops, [`Spend::record`] counts its tokens
//!   and cost in the metrics, adds them to the caller's in-memory totals for
//!   the current day and month, and queues a row for the store. The store is
//!   written by a thread of its own fed by a bounded queue ([`QUEUE`] rows),
//!   in batches: the request path never waits on the disk or Redis. A full
//!   queue drops the row from the store (counted as `queue_full`) but not from
//!   the in-memory totals, so budgets stay right in this process.
//! - Store: a SQLite file (WAL) by default, one row per UTC day, key, route,
//!   provider and model ([`store`]); or Redis ([`redis`]), which several
//!   replicas share.
//! - Budgets: [`Spend::check`] runs before a request is sent. With SQLite it
//!   reads the in-memory totals (loaded from the file at startup). With Redis
//!   it reads them through a per-key cache refreshed from Redis when older than
//!   [`redis::FRESH`], so another replica's spend is seen at most that long
//!   (plus its write queue's delay) after it was recorded. A request is
//!   checked before it runs: the one that crosses a budget is served in full.

pub mod redis;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::canonical::Usage;
use crate::config::{BudgetLimit, Price, SpendConfig};
use crate::error::GatewayError;
use crate::ids::RouteId;
use crate::metrics::GovMetrics;
use crate::pipeline::RequestContext;
use crate::snapshot::Target;

use super::{Caller, Governor, Ledger};

/// Rows waiting for the store at most; past it a row is dropped from the store
/// (its spend still counts in this process) and `queue_full` is counted.
pub const QUEUE: usize = 10_000;
/// Rows written in one transaction (Redis pipeline) at most.
const BATCH: usize = 1_000;

/// The cost of `usage` at `price` (per million tokens). `prompt_tokens`
/// includes the cached part, which is charged at the cached price.
pub fn cost(price: &Price, usage: &Usage) -> f64 {
    let input = u64::from(usage.prompt_tokens);
    let cached = u64::from(usage.cached_tokens.unwrap_or(0)).min(input);
    let output = u64::from(usage.completion_tokens);
    ((input - cached) as f64 * price.input
        + cached as f64 * price.cached
        + output as f64 * price.output)
        / 1_000_000.0
}

/// A cost for a header or a report: up to 8 decimals, no trailing zeros.
pub fn format_cost(cost: f64) -> String {
    let s = format!("{cost:.8}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".into()
    } else {
        s.to_owned()
    }
}

// === UTC calendar ===

/// The UTC day and month a time falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    /// Days since 1970-01-01.
    pub day: i64,
    /// `year * 12 + month - 1`.
    pub month: i64,
}

impl Period {
    pub fn at(unix_secs: u64) -> Period {
        let day = (unix_secs / 86_400) as i64;
        let (y, m, _) = civil(day);
        Period {
            day,
            month: y * 12 + i64::from(m) - 1,
        }
    }

    pub fn now() -> Period {
        Period::at(unix_now())
    }

    /// The first second of the next day.
    pub fn day_end(&self) -> u64 {
        (self.day.saturating_add(1).max(0) as u64).saturating_mul(86_400)
    }

    /// The first second of the next month.
    pub fn month_end(&self) -> u64 {
        let next = self.month + 1;
        let first = days_from_civil(next.div_euclid(12), (next.rem_euclid(12) + 1) as u32, 1);
        (first.max(0) as u64).saturating_mul(86_400)
    }

    /// The first day of the month.
    pub fn month_start_day(&self) -> i64 {
        days_from_civil(
            self.month.div_euclid(12),
            (self.month.rem_euclid(12) + 1) as u32,
            1,
        )
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `(year, month 1–12, day 1–31)` of a day counted from 1970-01-01 (the
/// proleptic Gregorian calendar, by 400-year eras).
pub fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146096
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // 0..399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..365, from March 1st
    let mp = (5 * doy + 2) / 153; // 0 = March
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The inverse of [`civil`].
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` of a day.
pub fn date(day: i64) -> String {
    let (y, m, d) = civil(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM` of a month index.
pub fn month_name(month: i64) -> String {
    format!(
        "{:04}-{:02}",
        month.div_euclid(12),
        month.rem_euclid(12) + 1
    )
}

/// The day of a `YYYY-MM-DD` date.
pub fn parse_date(s: &str) -> Option<i64> {
    let mut it = s.splitn(3, '-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: u32 = it.next()?.parse().ok()?;
    let d: u32 = it.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || d == 0 || !(1..=9999).contains(&y) {
        return None;
    }
    let day = days_from_civil(y, m, d);
    // 2026-02-31 is not a date.
    (civil(day) == (y, m, d)).then_some(day)
}

/// `2026-12-01T00:00:00Z`
fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

// === the spend ===

/// A finished request's spend, on its way to the store.
pub struct Row {
    pub day: i64,
    pub key: Arc<str>,
    pub route: RouteId,
    pub target: Arc<Target>,
    pub input: u64,
    pub cached: u64,
    pub output: u64,
    pub cost: f64,
}

/// A key's tokens and cost in the current day and month.
#[derive(Clone, Copy, Default, Debug)]
pub struct Totals {
    pub day: i64,
    pub day_tokens: u64,
    pub day_cost: f64,
    pub month: i64,
    pub month_tokens: u64,
    pub month_cost: f64,
    /// When they were last read from Redis (shared spend only).
    fetched: Option<Instant>,
}

impl Totals {
    /// Forgets a past day's or month's figures.
    fn roll(&mut self, now: Period) {
        if self.day != now.day {
            self.day = now.day;
            self.day_tokens = 0;
            self.day_cost = 0.0;
        }
        if self.month != now.month {
            self.month = now.month;
            self.month_tokens = 0;
            self.month_cost = 0.0;
        }
    }

    fn add(&mut self, now: Period, tokens: u64, cost: f64) {
        self.roll(now);
        self.day_tokens = self.day_tokens.saturating_add(tokens);
        self.month_tokens = self.month_tokens.saturating_add(tokens);
        if cost.is_finite() && cost > 0.0 {
            self.day_cost += cost;
            self.month_cost += cost;
        }
    }
}

/// The spend store (SQLite file or Redis) and the in-memory totals per key.
pub struct Spend {
    currency: String,
    metrics: GovMetrics,
    totals: Mutex<HashMap<Arc<str>, Totals>>,
    queue: std::sync::mpsc::SyncSender<Row>,
    shared: Option<Arc<redis::SharedSpend>>,
}

impl Spend {
    /// Opens the store: with SQLite, loads this month's totals from the file
    /// if it exists (it is created on the first write); starts the writer.
    pub fn open(cfg: &SpendConfig, metrics: &GovMetrics) -> Result<Spend, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Row>(QUEUE);
        let now = Period::now();
        let mut totals = HashMap::new();
        let shared = match &cfg.redis {
            Some(r) => {
                let shared = Arc::new(redis::SharedSpend::new(r, metrics.clone())?);
                redis::start_writer(shared.clone(), rx, metrics.clone())?;
                Some(shared)
            }
            None => {
                if cfg.path.exists() {
                    totals = store::load_totals(&cfg.path, now).map_err(|e| {
                        format!("cannot read the spend store {}: {e}", cfg.path.display())
                    })?;
                }
                store::start_writer(cfg.path.clone(), rx, metrics.clone())?;
                None
            }
        };
        Ok(Spend {
            currency: cfg.currency.clone(),
            metrics: metrics.clone(),
            totals: Mutex::new(totals),
            queue: tx,
            shared,
        })
    }

    fn totals(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Totals>> {
        self.totals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A key's totals now: from memory, or (shared spend) refreshed from
    /// Redis when the cached figures are older than [`redis::FRESH`].
    async fn current(&self, key: &Arc<str>, now: Period) -> Totals {
        if let Some(shared) = &self.shared {
            let stale = self
                .totals()
                .get(&**key)
                .and_then(|t| t.fetched)
                .is_none_or(|f| f.elapsed() >= redis::FRESH);
            if stale {
                if let Some(mut fresh) = shared.read(key, now).await {
                    fresh.fetched = Some(Instant::now());
                    self.totals().insert(key.clone(), fresh);
                }
            }
        }
        let mut t = self.totals().get(&**key).copied().unwrap_or_default();
        t.roll(now);
        t
    }

    /// Refuses a caller over its budget (429 `budget_exceeded`, `Retry-After`
    /// until the period ends), or moves the request to the budget's fallback
    /// route. A request without a caller, or whose key has no budget, passes.
    pub async fn check(
        &self,
        gov: &Arc<Governor>,
        ctx: &mut RequestContext,
    ) -> Result<(), GatewayError> {
        let Some(caller) = ctx.caller.clone() else {
            return Ok(());
        };
        let Some(budget) = caller.key.budget.as_ref() else {
            return Ok(());
        };
        let secs = unix_now();
        let now = Period::at(secs);
        let t = self.current(&caller.id, now).await;
        let over = |l: &Option<BudgetLimit>, tokens: u64, cost: f64| -> Option<String> {
            let l = l.as_ref()?;
            if l.tokens.is_some_and(|max| tokens >= max) {
                return Some(format!("{} tokens", l.tokens.unwrap_or(0)));
            }
            if l.cost.is_some_and(|max| cost >= max) {
                return Some(format!(
                    "{} {}",
                    format_cost(l.cost.unwrap_or(0.0)),
                    self.currency
                ));
            }
            None
        };
        let (period, limit, ends) = if let Some(l) = over(&budget.daily, t.day_tokens, t.day_cost) {
            ("daily", l, now.day_end())
        } else if let Some(l) = over(&budget.monthly, t.month_tokens, t.month_cost) {
            ("monthly", l, now.month_end())
        } else {
            return Ok(());
        };
        // Over budget: a cheaper route if the key names one (and the request
        // is not on it already), else a refusal.
        if let Some(fallback) = budget.fallback_route.as_deref() {
            if ctx.route().name.as_str() != fallback {
                if let Some(route) = ctx.snapshot.route(fallback).cloned() {
                    gov.metrics.budget_exceeded(&caller.id, period, "fallback");
                    move_to(ctx, &route, &caller);
                    return super::keys::authorize(ctx);
                }
            } else {
                return Ok(());
            }
        }
        gov.metrics.budget_exceeded(&caller.id, period, "reject");
        Err(GatewayError::Limited {
            message: format!(
                "key `{}` has used its {period} budget ({limit}); it resets at {}",
                caller.id,
                rfc3339(ends)
            ),
            code: "budget_exceeded",
            retry_after: Some(Duration::from_secs(ends.saturating_sub(secs).max(1))),
            headers: Vec::new(),
        })
    }

    /// Adds a finished request's tokens and cost to its caller's spend (the
    /// metrics, the in-memory totals, the store's queue). A request no target
    /// answered spent nothing; one without a key is stored (as `anonymous`)
    /// only when its target has a price.
    pub fn record(&self, caller: Option<&Caller>, route: &RouteId, ledger: &Ledger) {
        let (Some(target), Some(usage)) = (&ledger.target, &ledger.usage) else {
            return;
        };
        let key = Caller::label(caller);
        let cost = ledger.cost.filter(|c| c.is_finite() && *c > 0.0);
        // Tokens per key only for keys (requests without one are in the
        // route's token counters already); cost for everyone, as `anonymous`.
        if caller.is_some() {
            self.metrics.key_tokens(key, route, usage);
        }
        if let Some(c) = cost {
            self.metrics
                .cost(key, route, target.provider_id.as_str(), c);
        }
        let input = u64::from(usage.prompt_tokens);
        let output = u64::from(usage.completion_tokens);
        let now = Period::now();
        let key: Arc<str> = match caller {
            Some(c) => {
                self.totals().entry(c.id.clone()).or_default().add(
                    now,
                    input.saturating_add(output),
                    cost.unwrap_or(0.0),
                );
                c.id.clone()
            }
            // Requests without a key are stored only when they cost
            // something: free anonymous traffic has nobody to account to.
            None if cost.is_none() => return,
            None => Arc::from(super::ANONYMOUS),
        };
        let row = Row {
            day: now.day,
            key,
            route: route.clone(),
            target: target.clone(),
            input,
            cached: u64::from(usage.cached_tokens.unwrap_or(0)).min(input),
            output,
            cost: cost.unwrap_or(0.0),
        };
        match self.queue.try_send(row) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                self.metrics.spend_store_error("queue_full")
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                self.metrics.spend_store_error("writer_gone")
            }
        }
    }

    /// A key's totals in the current UTC day and month, as this replica knows
    /// them (with Redis, as of its last read), for the scrape-time gauges.
    pub fn current_totals(&self, key: &str) -> Totals {
        self.totals_in(key, Period::now())
    }

    /// A key's totals rolled to the periods of `now`.
    fn totals_in(&self, key: &str, now: Period) -> Totals {
        let mut t = self.totals().get(key).copied().unwrap_or_default();
        t.roll(now);
        t
    }

    /// A key's spend in its budget periods, for the admin API: this UTC day's
    /// and month's tokens and cost, as this replica knows them (with Redis,
    /// as of its last read).
    pub fn usage(&self, key: &str) -> serde_json::Value {
        let now = Period::now();
        let t = self.totals_in(key, now);
        json!({
            "currency": self.currency,
            "day": {
                "date": date(now.day),
                "tokens": t.day_tokens,
                "cost": t.day_cost,
                "resets_at": rfc3339(now.day_end()),
            },
            "month": {
                "month": month_name(now.month),
                "tokens": t.month_tokens,
                "cost": t.month_cost,
                "resets_at": rfc3339(now.month_end()),
            },
        })
    }
}

/// Places an over-budget request on its key's fallback route (a fresh
/// placement: a split there is placed by key, or at random). The client still
/// sees the model name it asked for.
fn move_to(ctx: &mut RequestContext, route: &Arc<crate::snapshot::Route>, caller: &Caller) {
    ctx.placement =
        crate::pipeline::Placement::place(route, &http::HeaderMap::new(), None, Some(caller));
    let caches = route.cache.mode != crate::config::CacheMode::Off;
    ctx.tenant = if caches && !route.cache.shared {
        Some(format!("key:{}", caller.id))
    } else {
        None
    };
}

// === `promptgate usage` ===

/// One line of the usage report.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct UsageLine {
    pub key: String,
    pub route: String,
    pub model: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost: f64,
}

/// What `promptgate usage` reads: the days from `since` (inclusive), one key or all.
pub struct UsageQuery {
    pub since: i64,
    pub key: Option<String>,
}

/// `7d` (the seven UTC days ending today), `2026-11-01`, or nothing (this month).
pub fn parse_since(s: Option<&str>, today: Period) -> Result<i64, String> {
    let Some(s) = s else {
        return Ok(today.month_start_day());
    };
    if let Some(n) = s.strip_suffix('d') {
        let n: i64 = n
            .parse()
            .ok()
            .filter(|n| (1..=36_600).contains(n))
            .ok_or_else(|| format!("`{s}` is not a number of days like 7d"))?;
        return Ok(today.day - (n - 1));
    }
    parse_date(s)
        .ok_or_else(|| format!("`{s}` is neither a number of days (7d) nor a date (2026-11-01)"))
}

/// Reads the report from the store a config names.
pub async fn report(cfg: &SpendConfig, q: &UsageQuery) -> Result<Vec<UsageLine>, String> {
    match &cfg.redis {
        Some(r) => redis::report(r, q).await,
        None => {
            let path = cfg.path.clone();
            let (since, key) = (q.since, q.key.clone());
            tokio::task::spawn_blocking(move || store::report(&path, since, key.as_deref()))
                .await
                .map_err(|e| e.to_string())?
        }
    }
}

/// The report as a table, with a total line.
pub fn render_table(lines: &[UsageLine], currency: &str) -> String {
    let head = [
        "KEY", "ROUTE", "MODEL", "REQUESTS", "INPUT", "OUTPUT", "COST",
    ];
    let total = total(lines);
    let mut rows: Vec<[String; 7]> = lines
        .iter()
        .chain(std::iter::once(&total))
        .map(|l| {
            [
                l.key.clone(),
                l.route.clone(),
                l.model.clone(),
                l.requests.to_string(),
                l.input_tokens.to_string(),
                l.output_tokens.to_string(),
                format_cost(l.cost),
            ]
        })
        .collect();
    rows.insert(0, head.map(str::to_owned));
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let n = rows.len();
    for (i, r) in rows.iter().enumerate() {
        if i + 1 == n {
            let rule: usize = widths.iter().sum::<usize>() + 2 * 6;
            out.push_str(&"-".repeat(rule));
            out.push('\n');
        }
        let mut line = String::new();
        for (j, (c, w)) in r.iter().zip(widths).enumerate() {
            // Names left, numbers right.
            if j < 3 {
                line.push_str(&format!("{c:<w$}"));
            } else {
                line.push_str(&format!("{c:>w$}"));
            }
            if j < 6 {
                line.push_str("  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&format!("(cost in {currency})\n"));
    out
}

/// The sum of the report's lines, as a line named `total`.
pub fn total(lines: &[UsageLine]) -> UsageLine {
    let mut t = UsageLine {
        key: "total".into(),
        ..UsageLine::default()
    };
    for l in lines {
        t.requests = t.requests.saturating_add(l.requests);
        t.input_tokens = t.input_tokens.saturating_add(l.input_tokens);
        t.output_tokens = t.output_tokens.saturating_add(l.output_tokens);
        t.cost += l.cost;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_charges_cached_input_at_its_own_price() {
        let p = Price {
            input: 2.5,
            output: 10.0,
            cached: 1.25,
        };
        let mut u = Usage::new(12, 6);
        u.cached_tokens = Some(4);
        // 8 × 2.5 + 4 × 1.25 + 6 × 10 = 85 per million.
        assert!((cost(&p, &u) - 85e-6).abs() < 1e-15);
        assert_eq!(format_cost(cost(&p, &u)), "0.000085");
        // More cached than input (a confused upstream) is capped at the input.
        u.cached_tokens = Some(50);
        assert!((cost(&p, &u) - (12.0 * 1.25 + 60.0) / 1e6).abs() < 1e-15);
        assert_eq!(format_cost(0.0), "0");
        assert_eq!(format_cost(1.5), "1.5");
    }

    #[test]
    fn calendar_round_trips_and_periods_end_where_they_should() {
        for day in [-1000i64, 0, 59, 60, 365, 11_016, 20_000, 20_787, 30_000] {
            let (y, m, d) = civil(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(parse_date("2026-11-30"), Some(20_787));
        assert_eq!(date(20_787), "2026-11-30");
        assert_eq!(parse_date("2026-02-29"), None);
        assert_eq!(
            parse_date("2024-02-29").map(date).as_deref(),
            Some("2024-02-29")
        );
        // 2026-11-30T14:00:00Z
        let p = Period::at(20_787 * 86_400 + 14 * 3600);
        assert_eq!(rfc3339(p.day_end()), "2026-12-01T00:00:00Z");
        assert_eq!(rfc3339(p.month_end()), "2026-12-01T00:00:00Z");
        assert_eq!(date(p.month_start_day()), "2026-11-01");
        assert_eq!(month_name(p.month), "2026-11");
        // December rolls into the next year.
        let dec = Period::at(parse_date("2026-12-15").unwrap_or(0) as u64 * 86_400);
        assert_eq!(rfc3339(dec.month_end()), "2027-01-01T00:00:00Z");
        assert_eq!(parse_since(Some("7d"), p), Ok(20_781));
        assert_eq!(parse_since(Some("2026-11-01"), p), Ok(20_758));
        assert_eq!(parse_since(None, p), Ok(20_758));
        assert!(parse_since(Some("0d"), p).is_err());
        assert!(parse_since(Some("last week"), p).is_err());
    }

    #[test]
    fn totals_forget_a_past_day_but_keep_the_month() {
        let d1 = Period::at(20_787 * 86_400);
        let d2 = Period::at(20_788 * 86_400); // 2026-12-01: a new month too
        let d0 = Period::at(20_786 * 86_400);
        let mut t = Totals::default();
        t.add(d0, 10, 0.5);
        t.add(d1, 5, 0.25);
        assert_eq!((t.day_tokens, t.month_tokens), (5, 15));
        t.add(d2, 1, 0.0);
        assert_eq!((t.day_tokens, t.month_tokens), (1, 1));
        assert!((t.month_cost - 0.0).abs() < 1e-12);
    }
}
