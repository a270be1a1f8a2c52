//! The loop of the SQLite writer threads (the spend store, the shadow store):
//! rows come from a bounded queue in batches, one transaction each; the file
//! is opened on the first batch and again after a failure; an outage is
//! logged once, and so is the recovery.

use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use rusqlite::Connection;

/// Waits for a row, lets more gather for `gather`, then takes whatever else
/// is queued (up to `max`). `None` once the queue is closed and empty.
///
/// Under load the writer sleeps rather than waits on the queue, so a
/// request's `try_send` seldom has to wake it (a futex wake on the request
/// path), and rows are written in fewer, larger transactions.
pub fn next_batch<T>(rx: &Receiver<T>, gather: Duration, max: usize) -> Option<Vec<T>> {
    let first = rx.recv().ok()?;
    std::thread::sleep(gather);
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// One writer's file and what its log lines say.
pub struct Store<'a> {
    /// `spend`, `shadow`: "the {name} store".
    pub name: &'static str,
    pub path: &'a Path,
    /// What happens to rows while the file cannot be written ("pairs are
    /// dropped until it can").
    pub meanwhile: &'static str,
}

/// Writes every batch of `rx` until the queue closes: `open` on the first
/// batch (and after a failure), `write` per batch; `failed` hears each
/// failure (`open` or `write`) for metrics; `written` runs after each
/// batch that was written (housekeeping such as pruning).
pub fn run<T>(
    rx: &Receiver<T>,
    (gather, max): (Duration, usize),
    store: Store<'_>,
    open: impl Fn(&Path) -> rusqlite::Result<Connection>,
    mut write: impl FnMut(&mut Connection, &[T]) -> rusqlite::Result<()>,
    mut failed: impl FnMut(&'static str),
    mut written: impl FnMut(&Connection),
) {
    let Store {
        name,
        path,
        meanwhile,
    } = store;
    let mut conn: Option<Connection> = None;
    let mut failing = false;
    while let Some(batch) = next_batch(rx, gather, max) {
        if conn.is_none() {
            match open(path) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    failed("open");
                    if !failing {
                        tracing::warn!(path = %path.display(), error = %e, "cannot open the {name} store; {meanwhile}");
                        failing = true;
                    }
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match write(c, &batch) {
            Ok(()) => {
                if failing {
                    tracing::info!(path = %path.display(), "the {name} store is written again");
                    failing = false;
                }
                written(c);
            }
            Err(e) => {
                failed("write");
                if !failing {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the {name} store; {meanwhile}");
                    failing = true;
                }
                // Reopened for the next batch (the file may have been replaced).
                conn = None;
            }
        }
    }
}
