//! The shadow store: an embedded SQLite file with one row per
//! primary/candidate pair. The columns a report filters on (time, route, arm,
//! candidate, source, request id) are columns, indexed on (route, candidate,
//! time); the whole [`Pair`] is kept as JSON text beside them. WAL mode, so
//! `promptgate readiness` reads the file while the gateway writes it.
//!
//! Only the writer thread writes: the request side hands it pairs through a
//! bounded queue ([`Writer::try_send`] never blocks; a full queue drops the
//! pair and says so), and it writes whatever is queued in one transaction.
//! The file and its folder are created on the first write.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};

use super::Pair;

/// Pairs waiting for the writer at most; beyond it a pair is dropped.
pub const QUEUE: usize = 4096;

/// Pairs per transaction at most.
const BATCH: usize = 512;

/// How long pairs gather after the first of a batch arrives: under load the
/// writer sleeps rather than waits on the queue, so a request's `try_send`
/// seldom has to wake it, and transactions are fewer and larger.
const GATHER: Duration = Duration::from_millis(10);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    route TEXT NOT NULL,
    arm TEXT,
    candidate TEXT NOT NULL,
    source TEXT NOT NULL,
    request_id TEXT NOT NULL,
    pair TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pairs_by_candidate ON pairs (route, candidate, at_ms);
CREATE INDEX IF NOT EXISTS pairs_by_time ON pairs (at_ms);
";

/// How often the writer deletes the pairs past the retention (and once after
/// its first write).
const PRUNE_EVERY: Duration = Duration::from_secs(600);

fn open_rw(path: &Path) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// Opens the file read-only; a missing file is an error that names it.
fn open_ro(path: &Path) -> rusqlite::Result<Option<Connection>> {
    if !path.exists() {
        return Err(rusqlite::Error::InvalidPath(path.to_path_buf()));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // A gateway that has just created the file may not have written the
    // schema yet: no table is no pairs.
    let has_table: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'pairs')",
        [],
        |r| r.get(0),
    )?;
    Ok(has_table.then_some(conn))
}

fn write(conn: &mut Connection, batch: &[Pair]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO pairs (at_ms, route, arm, candidate, source, request_id, pair) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for p in batch {
            // A `Pair` holds strings, numbers and options only: it always
            // serialises (non-finite floats become null).
            let json = serde_json::to_string(p).unwrap_or_default();
            stmt.execute(params![
                p.at_ms,
                p.route,
                p.arm,
                p.candidate.target,
                p.source,
                p.request_id,
                json,
            ])?;
        }
    }
    tx.commit()
}

/// The handle the gateway writes pairs through. Clones share one queue and
/// one writer thread.
#[derive(Clone)]
pub struct Writer {
    tx: SyncSender<Pair>,
    /// Signalled (closed) when the writer thread ends.
    done: Arc<Mutex<Option<Receiver<()>>>>,
}

impl Writer {
    /// Starts the writer thread for the file at `path` (created, with its
    /// folder, on the first write). Never fails: a thread that cannot start is
    /// logged and every `try_send` then reports a drop.
    pub fn open(path: PathBuf, retention: Option<Duration>) -> Writer {
        let (tx, rx) = sync_channel::<Pair>(QUEUE);
        let (done_tx, done_rx) = sync_channel::<()>(1);
        let spawned = std::thread::Builder::new()
            .name("promptgate-shadow".into())
            .spawn(move || {
                run(&path, &rx, retention);
                drop(done_tx);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the shadow store writer; pairs are dropped");
        }
        Writer {
            tx,
            done: Arc::new(Mutex::new(Some(done_rx))),
        }
    }

    /// Queues a pair; `false` when the queue is full (or the writer is gone)
    /// and the pair was dropped: the caller counts it.
    pub fn try_send(&self, pair: Pair) -> bool {
        match self.tx.try_send(pair) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Queues a pair, waiting for room (for a command, not the request
    /// path); `false` when the writer is gone.
    pub fn send(&self, pair: Pair) -> bool {
        self.tx.send(pair).is_ok()
    }

    /// At shutdown: lets the writer drain what is queued, waiting `within` at
    /// most. `true` when everything was written (or given up on after an
    /// error) in time. Other clones of the handle keep the queue open: close
    /// the last one.
    pub fn close(self, within: Duration) -> bool {
        let Writer { tx, done } = self;
        drop(tx);
        let rx = done.lock().ok().and_then(|mut g| g.take());
        match rx {
            None => true,
            Some(rx) => matches!(
                rx.recv_timeout(within),
                Ok(()) | Err(RecvTimeoutError::Disconnected)
            ),
        }
    }
}

/// The writer thread: batches until the queue closes; pairs older than
/// `retention` are deleted after the first write and every [`PRUNE_EVERY`].
fn run(path: &Path, rx: &Receiver<Pair>, retention: Option<Duration>) {
    let mut pruned: Option<std::time::Instant> = None;
    crate::sqlite_writer::run(
        rx,
        (GATHER, BATCH),
        crate::sqlite_writer::Store {
            name: "shadow",
            path,
            meanwhile: "pairs are dropped until it can",
        },
        open_rw,
        write,
        |_| {},
        |c| {
            let Some(keep) = retention else { return };
            if pruned.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
                return;
            }
            pruned = Some(std::time::Instant::now());
            if let Err(e) = prune(c, keep, super::now_ms()) {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete old shadow pairs");
            }
        },
    );
}

/// Deletes the pairs older than `keep` (by when they completed); how many.
fn prune(conn: &Connection, keep: Duration, now_ms: i64) -> rusqlite::Result<usize> {
    let cutoff = now_ms.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    conn.execute("DELETE FROM pairs WHERE at_ms < ?1", params![cutoff])
}

/// The pairs of `route` (of one candidate, `provider/model`, when given) from
/// `since_ms` on, oldest first. The file is opened read-only; a missing file
/// is an error (`InvalidPath`). A row whose JSON no longer reads is skipped.
pub fn read(
    path: &Path,
    route: &str,
    candidate: Option<&str>,
    since_ms: Option<i64>,
) -> rusqlite::Result<Vec<Pair>> {
    let Some(conn) = open_ro(path)? else {
        return Ok(Vec::new());
    };
    let mut stmt = conn.prepare(
        "SELECT pair FROM pairs WHERE route = ?1 AND (?2 IS NULL OR candidate = ?2) \
         AND (?3 IS NULL OR at_ms >= ?3) ORDER BY at_ms, id",
    )?;
    let rows = stmt.query_map(params![route, candidate, since_ms], |r| {
        r.get::<_, String>(0)
    })?;
    let mut out = Vec::new();
    let mut unreadable = 0u64;
    for row in rows {
        match serde_json::from_str::<Pair>(&row?) {
            Ok(p) => out.push(p),
            Err(_) => unreadable = unreadable.saturating_add(1),
        }
    }
    if unreadable > 0 {
        tracing::warn!(path = %path.display(), rows = unreadable, "shadow store rows that do not read as pairs were skipped");
    }
    Ok(out)
}

/// The candidates (`provider/model`) the store holds pairs of for `route`,
/// sorted; empty when the file is missing or unreadable.
pub fn candidates(path: &Path, route: &str) -> Vec<String> {
    let list = || -> rusqlite::Result<Vec<String>> {
        let Some(conn) = open_ro(path)? else {
            return Ok(Vec::new());
        };
        let mut stmt = conn
            .prepare("SELECT DISTINCT candidate FROM pairs WHERE route = ?1 ORDER BY candidate")?;
        let rows = stmt.query_map(params![route], |r| r.get::<_, String>(0))?;
        rows.collect()
    };
    list().unwrap_or_default()
}

/// The error a CLI prints for a failed [`read`].
pub fn describe_error(path: &Path, e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::InvalidPath(_) => format!(
            "no shadow store at {} (no pairs recorded yet, or another `shadow.store`?)",
            path.display()
        ),
        e => format!("cannot read the shadow store {}: {e}", path.display()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::shadow::{Comparison, Side};

    fn pair(at_ms: i64, candidate: &str, id: &str) -> Pair {
        Pair {
            at_ms,
            request_id: id.into(),
            route: "chat".into(),
            arm: Some("control".into()),
            source: "live".into(),
            stream: at_ms % 2 == 0,
            primary: Side {
                target: "openai/gpt-4o-mini".into(),
                latency_ms: 120.5,
                ttft_ms: Some(40.0),
                finish: Some("stop".into()),
                input_tokens: 12,
                output_tokens: 7,
                cost: Some(0.0001),
                text: "你好，世界".into(),
                ..Side::default()
            },
            candidate: Side {
                target: candidate.into(),
                latency_ms: 300.0,
                error: (id == "r3").then(|| "timeout".into()),
                ..Side::default()
            },
            comparison: (id != "r3").then(|| Comparison {
                token_f1: 0.5,
                char_similarity: 0.25,
                ..Comparison::default()
            }),
            request: Some("{\"messages\":[]}".into()),
        }
    }

    #[test]
    fn pairs_past_the_retention_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shadow.sqlite");
        let day = 86_400_000;
        let now = crate::shadow::now_ms();
        let w = Writer::open(path.clone(), Some(Duration::from_secs(7 * 86_400)));
        let old = pair(now - 8 * day, "llamacpp/local", "old");
        let recent = pair(now - 6 * day, "llamacpp/local", "recent");
        assert!(w.try_send(old));
        assert!(w.try_send(recent.clone()));
        assert!(w.close(Duration::from_secs(10)));
        assert_eq!(
            read(&path, "chat", None, None).unwrap(),
            vec![recent.clone()]
        );
        // Without a retention nothing is deleted.
        let w = Writer::open(path.clone(), None);
        assert!(w.try_send(pair(now - 400 * day, "llamacpp/local", "ancient")));
        assert!(w.close(Duration::from_secs(10)));
        assert_eq!(read(&path, "chat", None, None).unwrap().len(), 2);
    }

    #[test]
    fn pairs_written_through_the_writer_read_back_equal_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        // The folder does not exist yet: created on the first write.
        let path = dir.path().join("data/nested/shadow.sqlite");
        let w = Writer::open(path.clone(), None);
        let written = vec![
            pair(1_000, "llamacpp/local", "r1"),
            pair(2_000, "deepseek/deepseek-chat", "r2"),
            pair(3_000, "llamacpp/local", "r3"),
            pair(4_000, "llamacpp/local", "r4"),
        ];
        let mut other = pair(2_500, "llamacpp/local", "r9");
        other.route = "other".into();
        for p in written.iter().cloned().chain([other]) {
            assert!(w.try_send(p));
        }
        assert!(w.close(Duration::from_secs(10)));

        assert_eq!(read(&path, "chat", None, None).unwrap(), written);
        assert_eq!(
            read(&path, "chat", Some("llamacpp/local"), None).unwrap(),
            vec![written[0].clone(), written[2].clone(), written[3].clone()]
        );
        assert_eq!(
            read(&path, "chat", Some("llamacpp/local"), Some(3_000)).unwrap(),
            vec![written[2].clone(), written[3].clone()]
        );
        assert_eq!(read(&path, "chat", None, Some(2_000)).unwrap().len(), 3);
        assert!(read(&path, "nope", None, None).unwrap().is_empty());
        assert_eq!(
            candidates(&path, "chat"),
            vec![
                "deepseek/deepseek-chat".to_owned(),
                "llamacpp/local".to_owned()
            ]
        );
        assert_eq!(
            candidates(&path, "other"),
            vec!["llamacpp/local".to_owned()]
        );
    }

    #[test]
    fn a_missing_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sqlite");
        let e = read(&path, "chat", None, None).unwrap_err();
        let msg = describe_error(&path, &e);
        assert!(msg.contains("no shadow store at"), "{msg}");
        assert!(msg.contains("absent.sqlite"), "{msg}");
        assert!(candidates(&path, "chat").is_empty());
        // Reading does not create it.
        assert!(!path.exists());
    }

    #[test]
    fn a_full_queue_drops_and_says_so() {
        // A queue nobody drains: the pair beyond its bound is refused.
        let (tx, _rx) = sync_channel::<Pair>(QUEUE);
        let w = Writer {
            tx,
            done: Arc::new(Mutex::new(None)),
        };
        for i in 0..QUEUE as i64 {
            assert!(w.try_send(pair(i, "a/b", "r")));
        }
        assert!(!w.try_send(pair(0, "a/b", "r")));
    }

    #[test]
    fn a_store_that_cannot_be_opened_drops_pairs_without_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        // A path under a regular file: every open fails (logged once).
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let w = Writer::open(blocker.join("shadow.sqlite"), None);
        for i in 0..10 {
            assert!(w.try_send(pair(i, "a/b", "r")));
        }
        assert!(w.close(Duration::from_secs(30)));
    }
}
