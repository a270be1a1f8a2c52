//! The SQLite spend store: one row per UTC day, key, route, provider and
//! model, summed for months and reports. WAL mode, so `promptgate usage` reads
//! it while the gateway writes. Written only by the writer thread, in batches
//! of whatever the queue holds (one transaction each); the file and its
//! folder are created on the first write.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use rusqlite::{params, Connection, OpenFlags};

use super::{date, parse_date, Period, Row, Totals, UsageLine, BATCH};
use crate::metrics::GovMetrics;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS spend (
    day TEXT NOT NULL,
    key TEXT NOT NULL,
    route TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    PRIMARY KEY (day, key, route, provider, model)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spend_by_key ON spend (key, day);
";

fn open_rw(path: &Path) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

fn open_ro(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Every key's totals in the current day and month, from the file.
pub fn load_totals(path: &Path, now: Period) -> rusqlite::Result<HashMap<Arc<str>, Totals>> {
    let conn = open_ro(path)?;
    let mut stmt = conn.prepare(
        "SELECT key, day, SUM(input_tokens + output_tokens), SUM(cost) FROM spend \
         WHERE day >= ?1 GROUP BY key, day",
    )?;
    let mut rows = stmt.query(params![date(now.month_start_day())])?;
    let mut out: HashMap<Arc<str>, Totals> = HashMap::new();
    while let Some(r) = rows.next()? {
        let key: String = r.get(0)?;
        let day: String = r.get(1)?;
        let tokens = r.get::<_, i64>(2)?.max(0) as u64;
        let cost: f64 = r.get(3)?;
        let t = out.entry(Arc::from(key)).or_default();
        t.roll(now);
        if parse_date(&day) == Some(now.day) {
            t.day_tokens = t.day_tokens.saturating_add(tokens);
            t.day_cost += cost;
        }
        t.month_tokens = t.month_tokens.saturating_add(tokens);
        t.month_cost += cost;
    }
    Ok(out)
}

fn write(conn: &mut Connection, batch: &[Row]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO spend (day, key, route, provider, model, requests, input_tokens, \
             cached_tokens, output_tokens, cost) VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, ?8, ?9) \
             ON CONFLICT (day, key, route, provider, model) DO UPDATE SET \
             requests = requests + 1, input_tokens = input_tokens + excluded.input_tokens, \
             cached_tokens = cached_tokens + excluded.cached_tokens, \
             output_tokens = output_tokens + excluded.output_tokens, cost = cost + excluded.cost",
        )?;
        for r in batch {
            stmt.execute(params![
                date(r.day),
                &*r.key,
                r.route.as_str(),
                r.target.provider_id.as_str(),
                r.target.model,
                r.input.min(i64::MAX as u64) as i64,
                r.cached.min(i64::MAX as u64) as i64,
                r.output.min(i64::MAX as u64) as i64,
                r.cost,
            ])?;
        }
    }
    tx.commit()
}

/// Starts the thread that writes queued rows to the file.
pub fn start_writer(path: PathBuf, rx: Receiver<Row>, metrics: GovMetrics) -> Result<(), String> {
    std::thread::Builder::new()
        .name("promptgate-spend".into())
        .spawn(move || {
            crate::sqlite_writer::run(
                &rx,
                (GATHER, BATCH),
                crate::sqlite_writer::Store {
                    name: "spend",
                    path: &path,
                    meanwhile: "spend is counted in memory until it can",
                },
                open_rw,
                write,
                |stage| metrics.spend_store_error(stage),
                |_| {},
            );
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the spend writer: {e}"))
}

/// How long rows gather after the first of a batch arrives.
pub(super) const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// The usage report: sums per key, route and model from `since` on.
pub fn report(path: &Path, since: i64, key: Option<&str>) -> Result<Vec<UsageLine>, String> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let read = || -> rusqlite::Result<Vec<UsageLine>> {
        let conn = open_ro(path)?;
        // A gateway that has just created the file may not have written its
        // schema yet: no table is no spend.
        let has_table: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'spend')",
            [],
            |r| r.get(0),
        )?;
        if !has_table {
            return Ok(Vec::new());
        }
        let mut stmt = conn.prepare(
            "SELECT key, route, model, SUM(requests), SUM(input_tokens), SUM(output_tokens), \
             SUM(cost) FROM spend WHERE day >= ?1 AND (?2 IS NULL OR key = ?2) \
             GROUP BY key, route, model ORDER BY key, route, model",
        )?;
        let rows = stmt.query_map(params![date(since), key], |r| {
            Ok(UsageLine {
                key: r.get(0)?,
                route: r.get(1)?,
                model: r.get(2)?,
                requests: r.get::<_, i64>(3)?.max(0) as u64,
                input_tokens: r.get::<_, i64>(4)?.max(0) as u64,
                output_tokens: r.get::<_, i64>(5)?.max(0) as u64,
                cost: r.get(6)?,
            })
        })?;
        rows.collect()
    };
    read().map_err(|e| format!("cannot read the spend store {}: {e}", path.display()))
}
