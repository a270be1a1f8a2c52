//! The index file: schema, opening (with the checks that give clear errors)
//! and the writer `promptgate ingest` fills it through.
//!
//! One SQLite file in WAL mode:
//!
//! | table | holds |
//! |---|---|
//! | `meta` | `schema_version`, `generation` (changes at every commit that changed something), `dim` (vector size, 0 = no vectors yet) |
//! | `documents` | `id`, `source` (unique), `hash`, `title`, `metadata` (JSON object) |
//! | `chunks` | `id` (row id, never reused), `doc`, `chunk_id` (`Chunk::id`), `position`, `title`, `text`, `tokens` |
//! | `chunks_fts` | FTS5, contentless, `porter unicode61 remove_diacritics 2`, over the segmented title + text; rowid = `chunks.id` |
//! | `vectors` | `chunk` (= `chunks.id`), `vector` (L2-normalised little-endian f32s) |
//!
//! A writer does all its work in one transaction, committed by
//! [`IndexWriter::commit`]; readers (WAL) see the old index until then and
//! the new one after, never a mix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::oneshot;

use super::dense;
use super::lexical;
use crate::retrieval::ingest::{Chunk, Document, IndexWriter};

/// The schema this build reads and writes.
pub const SCHEMA_VERSION: i64 = 1;
/// `PRAGMA application_id` of a promptgate index ("pgix").
const APPLICATION_ID: i64 = 0x7067_6978;
/// How long a connection waits for another one's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE documents (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL,
    title TEXT NOT NULL,
    metadata TEXT NOT NULL
);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc INTEGER NOT NULL,
    chunk_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    tokens INTEGER NOT NULL
);
CREATE INDEX chunks_doc ON chunks (doc);
CREATE VIRTUAL TABLE chunks_fts USING fts5 (
    body,
    content = '',
    contentless_delete = 1,
    tokenize = 'porter unicode61 remove_diacritics 2'
);
CREATE TABLE vectors (chunk INTEGER PRIMARY KEY, vector BLOB NOT NULL);
";

fn sql_err(path: &Path, e: rusqlite::Error) -> String {
    format!("index {}: {e}", path.display())
}

/// Whether `e` says the file is not a SQLite database.
fn not_a_database(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase)
    )
}

/// The error of the first read of an index file: "not a database" said in
/// words a user can act on, anything else as it is.
fn first_read_err(path: &Path, e: rusqlite::Error) -> String {
    if not_a_database(&e) {
        format!(
            "index {} is not a SQLite database (corrupt or another kind of file); delete it and run `promptgate ingest` again",
            path.display()
        )
    } else {
        sql_err(path, e)
    }
}

/// Checks that `conn` holds a promptgate index of [`SCHEMA_VERSION`].
fn check_index(conn: &Connection, path: &Path) -> Result<(), String> {
    let not_ours = || {
        format!(
            "index {} is not a promptgate index (a SQLite file of something else); point `path` at another file, or delete it and run `promptgate ingest`",
            path.display()
        )
    };
    let app: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| first_read_err(path, e))?;
    if app != APPLICATION_ID {
        return Err(not_ours());
    }
    let version: Option<i64> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|_| not_ours())?;
    match version {
        Some(SCHEMA_VERSION) => Ok(()),
        Some(v) => Err(format!(
            "index {} has schema version {v}; this promptgate reads version {SCHEMA_VERSION}: delete it and run `promptgate ingest` again",
            path.display()
        )),
        None => Err(not_ours()),
    }
}

/// What a missing index file says.
pub fn missing(path: &Path, id: &str) -> String {
    format!(
        "index {} does not exist: run `promptgate ingest {id} PATH…` to build it",
        path.display()
    )
}

/// Opens an existing index for reading (checked). The connection is
/// read-only; its statements are cached per connection.
pub fn open_reader(path: &Path, id: &str) -> Result<Connection, String> {
    if !path.exists() {
        return Err(missing(path, id));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| sql_err(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| sql_err(path, e))?;
    conn.set_prepared_statement_cache_capacity(32);
    check_index(&conn, path)?;
    conn.execute_batch(super::bm25::CONNECTION_SETUP)
        .map_err(|e| sql_err(path, e))?;
    Ok(conn)
}

/// The index's generation, as of `conn`'s current read.
pub fn generation(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = 'generation'")?
        .query_row([], |r| r.get(0))
}

/// Counts of what an index holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub documents: i64,
    pub chunks: i64,
    /// Chunks that have a vector.
    pub vectors: i64,
}

pub fn counts(conn: &Connection) -> rusqlite::Result<Counts> {
    conn.query_row(
        "SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks), (SELECT count(*) FROM vectors)",
        [],
        |r| {
            Ok(Counts {
                documents: r.get(0)?,
                chunks: r.get(1)?,
                vectors: r.get(2)?,
            })
        },
    )
}

/// Opens (creating when missing) the index at `path` for writing and starts
/// the writer's transaction.
pub fn writer(path: &Path) -> Result<Writer, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the folder of index {}: {e}", path.display()))?;
    }
    let conn = Connection::open(path).map_err(|e| sql_err(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| sql_err(path, e))?;
    conn.set_prepared_statement_cache_capacity(32);
    // An empty file (new) gets the schema in a transaction of its own, so a
    // gateway that opens the index while the first ingest runs sees a valid,
    // empty index rather than "not an index".
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(|e| first_read_err(path, e))?;
    if tables == 0 {
        create(&conn, path)?;
    }
    check_index(&conn, path)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| sql_err(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!(
            "index {}: cannot switch to WAL mode (journal mode is {mode})",
            path.display()
        ));
    }
    // A larger page cache keeps FTS5's segment writes in memory during a run.
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA cache_size = -65536")
        .map_err(|e| sql_err(path, e))?;
    conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) {
            format!(
                "index {} is being written by another ingest; try again when it has finished",
                path.display()
            )
        } else {
            sql_err(path, e)
        }
    })?;
    let dim: i64 = conn
        .query_row("SELECT value FROM meta WHERE key = 'dim'", [], |r| r.get(0))
        .map_err(|e| sql_err(path, e))?;
    Writer::start(WriterState {
        conn,
        path: path.to_owned(),
        dim: usize::try_from(dim).unwrap_or(0),
        changed: false,
    })
}

fn create(conn: &Connection, path: &Path) -> Result<(), String> {
    let sql = format!(
        "BEGIN IMMEDIATE;
         PRAGMA application_id = {APPLICATION_ID};
         {SCHEMA}
         INSERT INTO meta (key, value) VALUES
             ('schema_version', {SCHEMA_VERSION}), ('generation', 0), ('dim', 0);
         COMMIT;"
    );
    conn.execute_batch(&sql).map_err(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        sql_err(path, e)
    })
}

/// The writer of one ingest run: every change in one transaction, applied
/// by a thread of its own. A call hands its work over and returns: the
/// caller prepares the next document (reads, chunks, embeds it; `put`
/// segments it) while the thread inserts the previous one. A failure of the
/// thread is returned by the next call, and nothing is committed.
pub struct Writer {
    ops: Option<SyncSender<Op>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The thread's first failure.
    failed: Arc<Mutex<Option<String>>>,
    path: PathBuf,
    /// Size of the vectors in the index (0 = none yet).
    dim: usize,
    /// A call is under way: set while its future runs. Still set when the
    /// next call starts means that future was dropped midway.
    busy: bool,
}

enum Op {
    Put {
        doc: Document,
        chunks: Vec<Chunk>,
        /// Each chunk's title and text, segmented.
        bodies: Vec<String>,
        /// Normalised.
        vectors: Option<Vec<Vec<f32>>>,
    },
    Remove(String),
    Documents(oneshot::Sender<Result<BTreeMap<String, String>, String>>),
    Commit(oneshot::Sender<Result<(), String>>),
}

/// Operations queued for the writer thread at most.
const QUEUE: usize = 16;

struct WriterState {
    conn: Connection,
    path: PathBuf,
    /// Size of the vectors in the index (0 = none yet).
    dim: usize,
    /// Whether this transaction changed anything (commit bumps the generation).
    changed: bool,
}

impl Writer {
    fn start(state: WriterState) -> Result<Writer, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let failed = Arc::new(Mutex::new(None));
        let path = state.path.clone();
        let dim = state.dim;
        let thread_failed = failed.clone();
        let thread = std::thread::Builder::new()
            .name("promptgate-index-writer".into())
            .spawn(move || apply(state, rx, thread_failed))
            .map_err(|e| format!("cannot start the index writer: {e}"))?;
        Ok(Writer {
            ops: Some(tx),
            thread: Some(thread),
            failed,
            path,
            dim,
            busy: false,
        })
    }

    /// Why no call can succeed any more, if so.
    fn broken(&self) -> Option<String> {
        if self.busy {
            return Some("the index writer was abandoned midway; nothing was written".into());
        }
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Queues `op` (waiting, off the runtime, while the queue is full).
    async fn send(&self, op: Op) -> Result<(), String> {
        let Some(ops) = self.ops.clone() else {
            return Err("the index writer has finished".into());
        };
        let sent = tokio::task::spawn_blocking(move || ops.send(op).is_ok())
            .await
            .map_err(|e| format!("the index writer failed: {e}"))?;
        self.sent(sent)
    }

    /// `Ok` if an operation was queued, else why the thread stopped.
    fn sent(&self, sent: bool) -> Result<(), String> {
        if sent {
            return Ok(());
        }
        Err(self
            .broken()
            .unwrap_or_else(|| "the index writer stopped".into()))
    }

    /// Checks and normalises `vectors` for `chunks`; the first sets the
    /// index's vector size.
    fn check_vectors(
        &mut self,
        source: &str,
        n: usize,
        vectors: Option<&[Vec<f32>]>,
    ) -> Result<Option<Vec<Vec<f32>>>, String> {
        let Some(vs) = vectors else { return Ok(None) };
        if vs.len() != n {
            return Err(format!("{source}: {} vectors for {n} chunks", vs.len()));
        }
        let mut out = Vec::with_capacity(vs.len());
        for v in vs {
            if v.is_empty() {
                return Err(format!("{source}: an empty vector"));
            }
            if self.dim != 0 && v.len() != self.dim {
                return Err(format!(
                    "{source}: a vector of {} dimensions, but index {} holds vectors of {} (was the embedding model changed? ingest into a new index file)",
                    v.len(),
                    self.path.display(),
                    self.dim
                ));
            }
            let mut v = v.clone();
            if !dense::normalise(&mut v) {
                return Err(format!(
                    "{source}: the embedding route returned a vector with NaN or infinite values"
                ));
            }
            self.dim = v.len();
            out.push(v);
        }
        Ok(Some(out))
    }

    async fn put_owned(
        &mut self,
        doc: Document,
        chunks: Vec<Chunk>,
        vectors: Option<Vec<Vec<f32>>>,
    ) -> Result<(), String> {
        let ops = self
            .ops
            .clone()
            .ok_or_else(|| "the index writer has finished".to_owned())?;
        // Segmenting is the CPU-heavy part: done here, on the blocking pool,
        // while the writer thread inserts what came before.
        let sent = tokio::task::spawn_blocking(move || {
            let bodies = chunks
                .iter()
                .map(|c| {
                    let mut body = String::with_capacity(c.title.len() + c.text.len() + 64);
                    lexical::segment_into(&c.title, &mut body);
                    body.push('\n');
                    lexical::segment_into(&c.text, &mut body);
                    body
                })
                .collect();
            ops.send(Op::Put {
                doc,
                chunks,
                bodies,
                vectors,
            })
            .is_ok()
        })
        .await
        .map_err(|e| format!("the index writer failed: {e}"))?;
        self.sent(sent)
    }
}

impl Drop for Writer {
    /// Without a commit: stops the thread, which rolls the transaction back
    /// (waiting for it, so the write lock is free when this returns).
    fn drop(&mut self) {
        self.ops = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread: applies the operations in order; after a failure only
/// answers (with it). Ends at commit, or when the writer is dropped (the
/// connection closes and the transaction rolls back).
fn apply(mut state: WriterState, ops: Receiver<Op>, failed: Arc<Mutex<Option<String>>>) {
    let first =
        |failed: &Mutex<Option<String>>| failed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let record = |failed: &Mutex<Option<String>>, r: Result<(), String>| {
        if let Err(e) = r {
            *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        }
    };
    for op in ops {
        match op {
            Op::Put {
                doc,
                chunks,
                bodies,
                vectors,
            } => {
                if first(&failed).is_none() {
                    record(
                        &failed,
                        state.put(&doc, &chunks, &bodies, vectors.as_deref()),
                    );
                }
            }
            Op::Remove(source) => {
                if first(&failed).is_none() {
                    record(&failed, state.remove(&source));
                }
            }
            Op::Documents(reply) => {
                let r = match first(&failed) {
                    Some(e) => Err(e),
                    None => state.documents(),
                };
                let _ = reply.send(r);
            }
            Op::Commit(reply) => {
                let r = match first(&failed) {
                    Some(e) => Err(e),
                    None => state.commit(),
                };
                let _ = reply.send(r);
                return;
            }
        }
    }
}

impl WriterState {
    fn err(&self, e: rusqlite::Error) -> String {
        sql_err(&self.path, e)
    }

    fn documents(&self) -> Result<BTreeMap<String, String>, String> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT source, hash FROM documents")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    fn remove(&mut self, source: &str) -> Result<(), String> {
        let doc: Option<i64> = self
            .conn
            .prepare_cached("SELECT id FROM documents WHERE source = ?1")
            .and_then(|mut s| s.query_row([source], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        let Some(doc) = doc else { return Ok(()) };
        for sql in [
            "DELETE FROM chunks_fts WHERE rowid IN (SELECT id FROM chunks WHERE doc = ?1)",
            "DELETE FROM vectors WHERE chunk IN (SELECT id FROM chunks WHERE doc = ?1)",
            "DELETE FROM chunks WHERE doc = ?1",
            "DELETE FROM documents WHERE id = ?1",
        ] {
            self.conn
                .prepare_cached(sql)
                .and_then(|mut s| s.execute([doc]))
                .map_err(|e| self.err(e))?;
        }
        self.changed = true;
        Ok(())
    }

    fn put(
        &mut self,
        doc: &Document,
        chunks: &[Chunk],
        bodies: &[String],
        vectors: Option<&[Vec<f32>]>,
    ) -> Result<(), String> {
        if let Some(v) = vectors.and_then(|vs| vs.first()) {
            if self.dim == 0 {
                self.dim = v.len();
                let dim = i64::try_from(self.dim).unwrap_or(i64::MAX);
                self.conn
                    .execute("UPDATE meta SET value = ?1 WHERE key = 'dim'", [dim])
                    .map_err(|e| self.err(e))?;
            }
        }
        self.remove(&doc.source)?;
        let metadata = serde_json::Value::Object(doc.metadata.clone()).to_string();
        let conn = &self.conn;
        let err = |e: rusqlite::Error| sql_err(&self.path, e);
        conn.prepare_cached(
            "INSERT INTO documents (source, hash, title, metadata) VALUES (?1, ?2, ?3, ?4)",
        )
        .and_then(|mut s| s.execute(params![doc.source, doc.hash, doc.title, metadata]))
        .map_err(err)?;
        let doc_id = conn.last_insert_rowid();
        let mut insert_chunk = conn
            .prepare_cached(
                "INSERT INTO chunks (doc, chunk_id, position, title, text, tokens) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(err)?;
        let mut insert_fts = conn
            .prepare_cached("INSERT INTO chunks_fts (rowid, body) VALUES (?1, ?2)")
            .map_err(err)?;
        let mut insert_vector = conn
            .prepare_cached("INSERT INTO vectors (chunk, vector) VALUES (?1, ?2)")
            .map_err(err)?;
        for (i, (chunk, body)) in chunks.iter().zip(bodies).enumerate() {
            insert_chunk
                .execute(params![
                    doc_id,
                    Chunk::id(doc, chunk.position),
                    chunk.position,
                    chunk.title,
                    chunk.text,
                    chunk.tokens
                ])
                .map_err(err)?;
            let row = conn.last_insert_rowid();
            insert_fts.execute(params![row, body]).map_err(err)?;
            if let Some(v) = vectors.and_then(|vs| vs.get(i)) {
                insert_vector
                    .execute(params![row, dense::to_blob(v)])
                    .map_err(err)?;
            }
        }
        self.changed = true;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), String> {
        if self.changed {
            // One b-tree per term again: fewer segments to read per query.
            self.conn
                .execute_batch("INSERT INTO chunks_fts (chunks_fts) VALUES ('optimize')")
                .map_err(|e| self.err(e))?;
            // Monotonic, and unlike a plain counter not repeated by an index
            // deleted and built again (results cached under the old one).
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0);
            self.conn
                .execute(
                    "UPDATE meta SET value = max(value + 1, ?1) WHERE key = 'generation'",
                    [now_ms],
                )
                .map_err(|e| self.err(e))?;
        }
        self.conn.execute_batch("COMMIT").map_err(|e| self.err(e))
    }
}

impl IndexWriter for Writer {
    fn documents(&mut self) -> BoxFuture<'_, Result<BTreeMap<String, String>, String>> {
        async move {
            if let Some(e) = self.broken() {
                return Err(e);
            }
            self.busy = true;
            let (tx, rx) = oneshot::channel();
            self.send(Op::Documents(tx)).await?;
            let out = rx.await.map_err(|_| {
                self.broken()
                    .unwrap_or_else(|| "the index writer stopped".into())
            })?;
            self.busy = false;
            out
        }
        .boxed()
    }

    fn put<'a>(
        &'a mut self,
        doc: &'a Document,
        chunks: &'a [Chunk],
        vectors: Option<&'a [Vec<f32>]>,
    ) -> BoxFuture<'a, Result<(), String>> {
        async move {
            if let Some(e) = self.broken() {
                return Err(e);
            }
            let vectors = self.check_vectors(&doc.source, chunks.len(), vectors)?;
            self.busy = true;
            self.put_owned(doc.clone(), chunks.to_vec(), vectors)
                .await?;
            self.busy = false;
            Ok(())
        }
        .boxed()
    }

    fn remove<'a>(&'a mut self, source: &'a str) -> BoxFuture<'a, Result<(), String>> {
        async move {
            if let Some(e) = self.broken() {
                return Err(e);
            }
            self.busy = true;
            self.send(Op::Remove(source.to_owned())).await?;
            self.busy = false;
            Ok(())
        }
        .boxed()
    }

    fn commit(mut self: Box<Self>) -> BoxFuture<'static, Result<(), String>> {
        async move {
            if let Some(e) = self.broken() {
                return Err(e);
            }
            let (tx, rx) = oneshot::channel();
            self.send(Op::Commit(tx)).await?;
            let out = rx.await.map_err(|_| {
                self.broken()
                    .unwrap_or_else(|| "the index writer stopped".into())
            })?;
            self.ops = None;
            if let Some(t) = self.thread.take() {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            out
        }
        .boxed()
    }
}
