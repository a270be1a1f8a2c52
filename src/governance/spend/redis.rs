//! Shared spend in Redis, so every replica counts one spend per key.
//!
//! Keys (under `spend.redis.prefix`):
//! - `spend:key:{KEY}:{YYYY-MM-DD}` and `spend:key:{KEY}:{YYYY-MM}`: hashes of
//!   `tokens` (HINCRBY) and `cost` (HINCRBYFLOAT), the budget counters. They
//!   expire two days after their day ends, and a month and a day after the
//!   month's first day plus its length, so nothing is left behind.
//! - `spend:day:{YYYY-MM-DD}`: one hash per day for `promptgate usage`,
//!   fields `{measure}\t{key}\t{route}\t{provider}\t{model}` (measure:
//!   requests, input, cached, output, cost); kept [`KEEP_DAYS`] days.
//!
//! Writes come from the writer thread (its own small runtime), one pipeline
//! per batch. Reads (budget checks) go through a per-key cache in [`super::Spend`]
//! refreshed when older than [`FRESH`], within `spend.redis.timeout`; a Redis
//! that fails is counted (`spend_store_error`), and checks use what this
//! replica knows (its own spend since the last read) — they fail open. After a
//! failure reads rest for a second, so a dead Redis costs a request nothing.

use std::collections::BTreeMap;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use super::{date, month_name, Period, Row, Totals, UsageLine, UsageQuery};
use crate::config::RedisStore;
use crate::metrics::GovMetrics;

/// How long a key's totals read from Redis are used before they are read again:
/// the bound on how late one replica sees another's spend (plus that replica's
/// write queue, normally milliseconds).
pub const FRESH: Duration = Duration::from_secs(1);
/// Days the per-day report hashes are kept (`promptgate usage` reads no further back).
pub const KEEP_DAYS: i64 = 400;
/// How long reads rest after a failure.
const REST: Duration = Duration::from_secs(1);

pub struct SharedSpend {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    resting_until: Mutex<Option<Instant>>,
    prefix: String,
    timeout: Duration,
    metrics: GovMetrics,
}

fn key_day(prefix: &str, key: &str, day: i64) -> String {
    format!("{prefix}spend:key:{key}:{}", date(day))
}

fn key_month(prefix: &str, key: &str, month: i64) -> String {
    format!("{prefix}spend:key:{key}:{}", month_name(month))
}

fn day_hash(prefix: &str, day: i64) -> String {
    format!("{prefix}spend:day:{}", date(day))
}

impl SharedSpend {
    pub fn new(cfg: &RedisStore, metrics: GovMetrics) -> Result<SharedSpend, String> {
        let client =
            redis::Client::open(cfg.url.as_str()).map_err(|e| format!("spend.redis.url: {e}"))?;
        Ok(SharedSpend {
            client,
            conn: tokio::sync::Mutex::new(None),
            resting_until: Mutex::new(None),
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            metrics,
        })
    }

    fn resting(&self) -> bool {
        self.resting_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    fn fail(&self, op: &str, e: &str) {
        self.metrics.spend_store_error(op);
        let mut r = self.resting_until.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            tracing::warn!(error = %e, "cannot read spend from Redis; budgets use this replica's own figures");
        }
        *r = Some(Instant::now() + REST);
    }

    async fn connection(&self) -> Option<ConnectionManager> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Some(c.clone());
        }
        match tokio::time::timeout(
            self.timeout.max(Duration::from_millis(200)),
            ConnectionManager::new(self.client.clone()),
        )
        .await
        {
            Ok(Ok(c)) => {
                *guard = Some(c.clone());
                Some(c)
            }
            Ok(Err(e)) => {
                drop(guard);
                self.fail("connect", &e.to_string());
                None
            }
            Err(_) => {
                drop(guard);
                self.fail("connect", "timed out");
                None
            }
        }
    }

    /// A key's day and month totals in Redis; `None` when Redis failed.
    pub async fn read(&self, key: &str, now: Period) -> Option<Totals> {
        if self.resting() {
            return None;
        }
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(key_day(&self.prefix, key, now.day))
            .arg("tokens")
            .arg("cost")
            .cmd("HMGET")
            .arg(key_month(&self.prefix, key, now.month))
            .arg("tokens")
            .arg("cost");
        type Pair = (Option<u64>, Option<f64>);
        let got: Result<Result<(Pair, Pair), redis::RedisError>, _> =
            tokio::time::timeout(self.timeout, pipe.query_async(&mut conn)).await;
        match got {
            Ok(Ok(((dt, dc), (mt, mc)))) => {
                *self.resting_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Some(Totals {
                    day: now.day,
                    day_tokens: dt.unwrap_or(0),
                    day_cost: dc.unwrap_or(0.0),
                    month: now.month,
                    month_tokens: mt.unwrap_or(0),
                    month_cost: mc.unwrap_or(0.0),
                    fetched: None,
                })
            }
            Ok(Err(e)) => {
                self.fail("read", &e.to_string());
                None
            }
            Err(_) => {
                self.fail("read", "timed out");
                None
            }
        }
    }

    /// The pipeline that adds a batch of rows.
    fn batch(&self, rows: &[Row]) -> redis::Pipeline {
        let p = &self.prefix;
        let mut pipe = redis::pipe();
        for r in rows {
            let now = Period::at(u64::try_from(r.day).unwrap_or(0).saturating_mul(86_400));
            let tokens = r.input.saturating_add(r.output);
            let d = key_day(p, &r.key, r.day);
            let m = key_month(p, &r.key, now.month);
            let day_expiry = now.day_end() + 2 * 86_400;
            let month_expiry = now.month_end() + 86_400;
            pipe.cmd("HINCRBY")
                .arg(&d)
                .arg("tokens")
                .arg(tokens)
                .ignore();
            pipe.cmd("HINCRBYFLOAT")
                .arg(&d)
                .arg("cost")
                .arg(r.cost)
                .ignore();
            pipe.cmd("EXPIREAT").arg(&d).arg(day_expiry).ignore();
            pipe.cmd("HINCRBY")
                .arg(&m)
                .arg("tokens")
                .arg(tokens)
                .ignore();
            pipe.cmd("HINCRBYFLOAT")
                .arg(&m)
                .arg("cost")
                .arg(r.cost)
                .ignore();
            pipe.cmd("EXPIREAT").arg(&m).arg(month_expiry).ignore();
            let h = day_hash(p, r.day);
            let tail = format!(
                "{}\t{}\t{}\t{}",
                r.key,
                r.route.as_str(),
                r.target.provider_id.as_str(),
                r.target.model
            );
            for (measure, n) in [
                ("requests", 1),
                ("input", r.input),
                ("cached", r.cached),
                ("output", r.output),
            ] {
                pipe.cmd("HINCRBY")
                    .arg(&h)
                    .arg(format!("{measure}\t{tail}"))
                    .arg(n)
                    .ignore();
            }
            pipe.cmd("HINCRBYFLOAT")
                .arg(&h)
                .arg(format!("cost\t{tail}"))
                .arg(r.cost)
                .ignore();
            pipe.cmd("EXPIREAT")
                .arg(&h)
                .arg(now.day_end() + KEEP_DAYS as u64 * 86_400)
                .ignore();
        }
        pipe
    }
}

/// Starts the thread that writes queued rows to Redis.
pub fn start_writer(
    shared: Arc<SharedSpend>,
    rx: Receiver<Row>,
    metrics: GovMetrics,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("promptgate-spend".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                tracing::error!("cannot start the spend writer's runtime; spend is not stored");
                return;
            };
            let mut conn: Option<ConnectionManager> = None;
            let mut failing = false;
            while let Some(batch) = crate::sqlite_writer::next_batch(&rx, super::store::GATHER, super::BATCH) {
                let ok: Result<(), String> = rt.block_on(async {
                    if conn.is_none() {
                        let c = tokio::time::timeout(
                            Duration::from_secs(2),
                            ConnectionManager::new(shared.client.clone()),
                        )
                        .await
                        .map_err(|_| "connect: timed out".to_owned())?
                        .map_err(|e| format!("connect: {e}"))?;
                        conn = Some(c);
                    }
                    let Some(c) = conn.as_mut() else {
                        return Ok(());
                    };
                    let pipe = shared.batch(&batch);
                    tokio::time::timeout(
                        Duration::from_secs(2).max(shared.timeout),
                        pipe.query_async::<()>(c),
                    )
                    .await
                    .map_err(|_| "write: timed out".to_owned())?
                    .map_err(|e| format!("write: {e}"))
                });
                match ok {
                    Ok(()) => {
                        if failing {
                            tracing::info!("spend is written to Redis again");
                            failing = false;
                        }
                    }
                    Err(e) => {
                        metrics.spend_store_error("write");
                        if !failing {
                            tracing::warn!(error = %e, "cannot write spend to Redis; it is counted in memory in this replica");
                            failing = true;
                        }
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the spend writer: {e}"))
}

/// The usage report from the per-day hashes.
pub async fn report(cfg: &RedisStore, q: &UsageQuery) -> Result<Vec<UsageLine>, String> {
    let client =
        redis::Client::open(cfg.url.as_str()).map_err(|e| format!("spend.redis.url: {e}"))?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| format!("cannot connect to {}: timed out", cfg.url))?
    .map_err(|e| format!("cannot connect to the spend store in Redis: {e}"))?;
    let today = Period::now().day;
    let since = q.since.max(today - KEEP_DAYS);
    let mut sums: BTreeMap<(String, String, String), UsageLine> = BTreeMap::new();
    for day in since..=today {
        let h: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(day_hash(&cfg.prefix, day))
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("cannot read the spend store in Redis: {e}"))?;
        for (field, value) in h {
            let mut parts = field.split('\t');
            let (Some(measure), Some(key), Some(route), Some(_provider), Some(model)) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                continue;
            };
            if q.key.as_deref().is_some_and(|k| k != key) {
                continue;
            }
            let line = sums
                .entry((key.to_owned(), route.to_owned(), model.to_owned()))
                .or_insert_with(|| UsageLine {
                    key: key.to_owned(),
                    route: route.to_owned(),
                    model: model.to_owned(),
                    ..UsageLine::default()
                });
            let n = || value.parse::<u64>().unwrap_or(0);
            match measure {
                "requests" => line.requests = line.requests.saturating_add(n()),
                "input" => line.input_tokens = line.input_tokens.saturating_add(n()),
                "output" => line.output_tokens = line.output_tokens.saturating_add(n()),
                "cost" => line.cost += value.parse::<f64>().unwrap_or(0.0),
                _ => {}
            }
        }
    }
    Ok(sums.into_values().collect())
}
