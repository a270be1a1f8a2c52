//! `promptgate ingest`: documents → text → chunks → an index (the local
//! SQLite file, or a Chroma collection), incremental by content hash.
//!
//! [`read`] turns a file into a title and sections, [`chunk`] cuts sections
//! into token-sized chunks, and [`ingest`] drives a run: it walks the roots,
//! skips documents whose hash the index already holds, replaces the chunks of
//! changed ones, embeds when the retriever needs vectors, optionally prunes
//! documents whose files are gone, and commits once at the end.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{Embedder, EmbeddingSpec, Side};
use crate::config::{ChunkConfig, Mode, RetrieverConfig, RetrieverKind};
use read::Format;

pub mod chunk;
pub mod read;

/// One source document as the index knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Its id in the index: the path relative to the ingest root (`/`
    /// separated), or `file#line` for one line of a `.jsonl` file.
    pub source: String,
    /// `sha256:` + hex of the document's bytes (of its line, for `.jsonl`)
    /// and of the settings that shape its chunks and vectors ([`fingerprint`]):
    /// changing those re-indexes it.
    pub hash: String,
    /// Its title (first heading, `<title>`, the PDF's title, or the file name
    /// without extension; a `.jsonl` line's `title`, else "").
    pub title: String,
    pub metadata: Map<String, Value>,
}

/// One chunk of a document, in document order.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub text: String,
    /// The heading path at the chunk's start, joined with " > " (the title first).
    pub title: String,
    /// 0-based position of the chunk in its document.
    pub position: u32,
    /// Its size in tokens (tiktoken cl100k).
    pub tokens: u32,
}

impl Chunk {
    /// The chunk's id in its retriever: stable while the document's source
    /// and content are, and different for the same content at two sources
    /// (an index keyed by chunk id, like Chroma, would otherwise keep one copy).
    pub fn id(doc: &Document, position: u32) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(doc.source.as_bytes());
        h.update([0u8]);
        h.update(doc.hash.as_bytes());
        let d = h.finalize();
        let mut out = String::with_capacity(28);
        for b in &d[..8] {
            out.push_str(&format!("{b:02x}"));
        }
        out.push('#');
        out.push_str(itoa::Buffer::new().format(position));
        out
    }
}

/// Where ingest writes: a retriever's index. Every change made through one
/// writer becomes visible to searches at once, at [`IndexWriter::commit`]
/// (a running gateway sees the old index or the new one, never a mix).
pub trait IndexWriter: Send {
    /// Every document in the index: source → content hash.
    fn documents(&mut self) -> BoxFuture<'_, Result<BTreeMap<String, String>, String>>;
    /// Adds a document, replacing any earlier chunks of the same source.
    /// `vectors`, when the index is dense, has one vector per chunk.
    fn put<'a>(
        &'a mut self,
        doc: &'a Document,
        chunks: &'a [Chunk],
        vectors: Option<&'a [Vec<f32>]>,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Removes a document and its chunks.
    fn remove<'a>(&'a mut self, source: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Makes every change visible at once.
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), String>>;
}

/// Files larger than this are skipped (with a warning) unless
/// [`Options::max_file_bytes`] says otherwise.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 20;

/// Bumped whenever the readers or the chunker change what they produce, so
/// the next run re-indexes everything.
const CHUNKER_VERSION: u32 = 1;

/// Warnings kept in the summary (and printed) at most; the rest are counted.
const MAX_WARNINGS: usize = 1000;

/// How one ingest run behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Remove documents whose files are gone (only sources under the roots).
    pub prune: bool,
    /// Files larger than this are skipped with a warning.
    pub max_file_bytes: u64,
    /// Draw a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Print warnings to stderr as they happen.
    pub echo_warnings: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            prune: false,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            progress: false,
            echo_warnings: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Documents indexed for the first time.
    pub new: usize,
    /// Documents whose content (or the index settings) changed: re-indexed.
    pub changed: usize,
    pub unchanged: usize,
    /// Documents removed: pruned, or now without any text.
    pub removed: usize,
    /// Documents not indexed because of a problem (each has a warning).
    pub skipped: usize,
    /// Files of other types, ignored.
    pub other_files: usize,
    /// Chunks written, and their tokens.
    pub chunks: u64,
    pub tokens: u64,
    /// Bytes of the files read.
    pub bytes: u64,
    pub seconds: f64,
    /// The first warnings (at most 1000); `warning_count` counts them all.
    pub warnings: Vec<String>,
    pub warning_count: usize,
}

impl Summary {
    /// Megabytes (10⁶ bytes) read per second.
    pub fn mb_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / 1e6 / self.seconds
        } else {
            0.0
        }
    }

    /// Documents written or removed.
    pub fn changes(&self) -> usize {
        self.new + self.changed + self.removed
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "documents: {} new, {} changed, {} unchanged, {} removed, {} skipped",
            self.new, self.changed, self.unchanged, self.removed, self.skipped
        )?;
        if self.other_files > 0 {
            write!(f, " ({} other files ignored)", self.other_files)?;
        }
        writeln!(f)?;
        writeln!(f, "chunks: {} ({} tokens)", self.chunks, self.tokens)?;
        write!(
            f,
            "read {:.2} MB in {:.2} s ({:.1} MB/s)",
            self.bytes as f64 / 1e6,
            self.seconds,
            self.mb_per_second()
        )?;
        if self.warning_count > 0 {
            write!(f, "\n{} warning(s)", self.warning_count)?;
        }
        Ok(())
    }
}

/// Why a run failed. Nothing of a failed run is visible in the index.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The retriever cannot be ingested into as configured.
    #[error("{0}")]
    Setup(String),
    #[error("cannot read `{path}`: {error}")]
    Root { path: String, error: String },
    #[error("index: {0}")]
    Index(String),
    #[error("embedding: {0}")]
    Embedding(String),
}

/// The settings that shape a document's chunks and vectors, hashed with its
/// content: changing any of them re-indexes every document.
pub fn fingerprint(chunk: ChunkConfig, embedding: Option<&EmbeddingSpec>) -> String {
    let mut f = format!(
        "promptgate-ingest/{CHUNKER_VERSION} cl100k max_tokens={} overlap={}",
        chunk.max_tokens, chunk.overlap
    );
    if let Some(e) = embedding {
        let d = &e.document;
        f.push_str(&format!(
            " embedding route={:?} prefix={:?} fields={}",
            e.route,
            d.prefix,
            Value::Object(d.extra.clone())
        ));
    }
    f
}

/// `sha256:` + hex of the fingerprint and the content.
pub fn content_hash(fingerprint: &str, content: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(fingerprint.as_bytes());
    h.update([0u8]);
    h.update(content);
    format!("sha256:{:x}", h.finalize())
}

/// The embedding settings ingest must use for `cfg`, `None` when its index
/// holds no vectors (a lexical local index).
fn vector_spec(cfg: &RetrieverConfig) -> Result<Option<&EmbeddingSpec>, IngestError> {
    let needs = match &cfg.kind {
        RetrieverKind::Http { .. } => {
            return Err(IngestError::Setup(format!(
                "retriever `{}` is of kind http: an http retriever is indexed by its own service",
                cfg.id
            )))
        }
        RetrieverKind::Local { mode, .. } => *mode != Mode::Lexical,
        RetrieverKind::Chroma { .. } => true,
    };
    if !needs {
        return Ok(None);
    }
    cfg.embedding.as_ref().map(Some).ok_or_else(|| {
        IngestError::Setup(format!(
            "retriever `{}` needs vectors but has no `embedding: {{route: NAME}}`",
            cfg.id
        ))
    })
}

/// One file found under a root.
#[derive(Debug, Clone)]
struct FileEntry {
    path: PathBuf,
    /// Relative to its root, `/`-separated (the file name for a file root).
    source: String,
    format: Option<Format>,
    size: u64,
}

/// Every file under the roots, and which sources the roots cover.
struct Walk {
    files: Vec<FileEntry>,
    /// A root is a folder: every source of the index is under it.
    any_dir: bool,
    /// The sources of the roots that are files.
    file_roots: Vec<String>,
}

impl Walk {
    /// Whether `source` belongs to what the roots cover (for `--prune`).
    fn covers(&self, source: &str) -> bool {
        self.any_dir
            || self.file_roots.iter().any(|f| {
                source == f
                    || source
                        .strip_prefix(f.as_str())
                        .is_some_and(|r| r.starts_with('#'))
            })
    }
}

/// Walks the roots: folders recursively, in sorted order; names starting
/// with `.` are skipped, and so are symbolic links to folders.
fn walk(roots: &[PathBuf], warn: &mut dyn FnMut(String)) -> Result<Walk, IngestError> {
    let mut out = Walk {
        files: Vec::new(),
        any_dir: false,
        file_roots: Vec::new(),
    };
    for root in roots {
        let meta = std::fs::metadata(root).map_err(|e| IngestError::Root {
            path: root.display().to_string(),
            error: e.to_string(),
        })?;
        if meta.is_file() {
            let source = root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| root.display().to_string());
            out.file_roots.push(source.clone());
            out.files.push(FileEntry {
                format: Format::of(root),
                path: root.clone(),
                source,
                size: meta.len(),
            });
            continue;
        }
        if !meta.is_dir() {
            return Err(IngestError::Root {
                path: root.display().to_string(),
                error: "neither a file nor a folder".into(),
            });
        }
        out.any_dir = true;
        let mut found = Vec::new();
        let mut stack = vec![(root.clone(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) => {
                    warn(format!("cannot read folder {}: {e}", dir.display()));
                    continue;
                }
            };
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let rel = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                let path = entry.path();
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                let meta = if kind.is_symlink() {
                    match std::fs::metadata(&path) {
                        Ok(m) if m.is_file() => m,
                        Ok(m) if m.is_dir() => {
                            warn(format!("{rel}: a link to a folder, not followed"));
                            continue;
                        }
                        _ => {
                            warn(format!("{rel}: a broken link, skipped"));
                            continue;
                        }
                    }
                } else if kind.is_dir() {
                    stack.push((path, rel));
                    continue;
                } else if kind.is_file() {
                    match entry.metadata() {
                        Ok(m) => m,
                        Err(e) => {
                            warn(format!("{rel}: {e}"));
                            continue;
                        }
                    }
                } else {
                    continue;
                };
                found.push(FileEntry {
                    format: Format::of(&path),
                    path,
                    source: rel,
                    size: meta.len(),
                });
            }
        }
        found.sort_by(|a, b| a.source.cmp(&b.source));
        out.files.extend(found);
    }
    Ok(out)
}

/// What reading one file gave.
enum Item {
    /// The index holds this content already.
    Unchanged(String),
    /// To (re)index.
    Ready { doc: Document, chunks: Vec<Chunk> },
    /// No text: removed from the index if it is there.
    Empty(String),
    /// Not indexed because of a problem (warned); its old version, if any, stays.
    Skipped(String),
}

impl Item {
    fn source(&self) -> &str {
        match self {
            Item::Unchanged(s) | Item::Empty(s) | Item::Skipped(s) => s,
            Item::Ready { doc, .. } => &doc.source,
        }
    }
}

struct FileOutcome {
    entry: FileEntry,
    /// Bytes read (of its lines, for a block of a `.jsonl` file).
    bytes: u64,
    /// Bytes of the walk this outcome completes (for the progress bar).
    progress: u64,
    items: Vec<Item>,
    warnings: Vec<String>,
    /// The file could not be read at all: what the index holds from it stays.
    unreadable: bool,
    /// `.jsonl` lines that are not documents.
    bad_lines: usize,
}

impl FileOutcome {
    fn new(entry: FileEntry) -> FileOutcome {
        FileOutcome {
            entry,
            bytes: 0,
            progress: 0,
            items: Vec::new(),
            warnings: Vec::new(),
            unreadable: false,
            bad_lines: 0,
        }
    }

    fn failed(entry: FileEntry, warning: String) -> FileOutcome {
        let mut out = FileOutcome::new(entry);
        out.progress = out.entry.size;
        out.warnings.push(warning);
        out.unreadable = true;
        out
    }
}

/// What every job of a run shares.
struct Shared {
    /// The index's documents: source → hash.
    existing: BTreeMap<String, String>,
    fingerprint: String,
    chunk: ChunkConfig,
    max_file_bytes: u64,
}

/// A `.jsonl` file is read once and cut into blocks of lines of about this
/// size, prepared in parallel and written while later blocks are chunked.
const JSONL_BLOCK_BYTES: usize = 256 * 1024;

/// One unit of work for the blocking pool.
enum Job {
    /// A whole file.
    File(FileEntry),
    /// Lines `text[start..end]` of a `.jsonl` file, the first being line
    /// number `first_line`.
    Lines {
        entry: FileEntry,
        text: Arc<str>,
        start: usize,
        end: usize,
        first_line: usize,
    },
    /// Nothing left to do (a file that could not be read, a warning).
    Done(FileOutcome),
}

impl Job {
    fn entry(&self) -> &FileEntry {
        match self {
            Job::File(e) | Job::Lines { entry: e, .. } => e,
            Job::Done(o) => &o.entry,
        }
    }
}

/// The file's bytes, within the size limit; `None` (with a warning in `out`)
/// when it cannot be read.
fn load(out: &mut FileOutcome, max_file_bytes: u64) -> Option<Vec<u8>> {
    let source = &out.entry.source;
    let too_big = |size: u64| {
        format!("{source}: {size} bytes is over the limit of {max_file_bytes} bytes; skipped")
    };
    let warning = if out.entry.size > max_file_bytes {
        too_big(out.entry.size)
    } else {
        match read_bounded(&out.entry.path, max_file_bytes) {
            Ok(Some(b)) => {
                out.bytes = b.len() as u64;
                return Some(b);
            }
            Ok(None) => too_big(max_file_bytes.saturating_add(1)),
            Err(e) => format!("{source}: cannot read: {e}"),
        }
    };
    out.warnings.push(warning);
    out.unreadable = true;
    out.progress = out.entry.size;
    None
}

/// A `.jsonl` file → its blocks of lines (on a blocking thread).
fn plan_jsonl(entry: FileEntry, shared: &Shared) -> Vec<Job> {
    let mut head = FileOutcome::new(entry);
    let Some(bytes) = load(&mut head, shared.max_file_bytes) else {
        return vec![Job::Done(head)];
    };
    head.bytes = 0;
    let (text, lossy) = read::decode(&bytes);
    drop(bytes);
    if lossy {
        head.warnings.push(format!(
            "{}: not valid UTF-8; the invalid bytes were replaced",
            head.entry.source
        ));
    }
    let text: Arc<str> = text.into();
    let mut jobs = Vec::new();
    let (mut start, mut line) = (0usize, 1usize);
    while start < text.len() {
        let from = (start + JSONL_BLOCK_BYTES).min(text.len());
        let end = text.as_bytes()[from..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(text.len(), |i| from + i + 1);
        jobs.push(Job::Lines {
            entry: head.entry.clone(),
            text: text.clone(),
            start,
            end,
            first_line: line,
        });
        line += text.as_bytes()[start..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        start = end;
    }
    if jobs.is_empty() || !head.warnings.is_empty() {
        jobs.insert(0, Job::Done(head));
    }
    jobs
}

/// Reads, hashes and chunks one job's documents (on a blocking thread).
fn prepare(job: Job, shared: &Shared) -> FileOutcome {
    let entry = match job {
        Job::Done(o) => return o,
        Job::Lines {
            entry,
            text,
            start,
            end,
            first_line,
        } => {
            let mut out = FileOutcome::new(entry);
            out.bytes = (end - start) as u64;
            out.progress = out.bytes;
            prepare_lines(shared, &text[start..end], first_line, &mut out);
            return out;
        }
        Job::File(entry) => entry,
    };
    let mut out = FileOutcome::new(entry);
    out.progress = out.entry.size;
    let Some(format) = out.entry.format else {
        return out;
    };
    let Some(bytes) = load(&mut out, shared.max_file_bytes) else {
        return out;
    };
    let source = out.entry.source.clone();
    let hash = content_hash(&shared.fingerprint, &bytes);
    if shared.existing.get(&source) == Some(&hash) {
        out.items.push(Item::Unchanged(source));
        return out;
    }
    let fallback = read::title_from_path(&out.entry.path);
    let parsed = match format {
        Format::Pdf => match read::pdf(&bytes, &fallback) {
            Ok(Some(p)) => p,
            Ok(None) => {
                out.warnings.push(format!(
                    "{source}: the PDF has no text layer (a scan?); skipped"
                ));
                out.items.push(Item::Skipped(source));
                return out;
            }
            Err(e) => {
                out.warnings
                    .push(format!("{source}: cannot read the PDF: {e}; skipped"));
                out.items.push(Item::Skipped(source));
                return out;
            }
        },
        _ => {
            let (text, lossy) = read::decode(&bytes);
            if lossy {
                out.warnings.push(format!(
                    "{source}: not valid UTF-8; the invalid bytes were replaced"
                ));
            }
            match format {
                Format::Markdown => read::markdown(&text, &fallback),
                Format::Html => read::html(&text, &fallback),
                _ => read::text(&text, &fallback),
            }
        }
    };
    let chunks = chunk::chunk(&parsed.title, &parsed.sections, shared.chunk);
    if chunks.is_empty() {
        out.items.push(Item::Empty(source));
        return out;
    }
    out.items.push(Item::Ready {
        doc: Document {
            source,
            hash,
            title: parsed.title,
            metadata: Map::new(),
        },
        chunks,
    });
    out
}

/// The file's bytes; `None` when it holds more than `limit` (it grew since
/// it was listed).
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    f.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= limit).then_some(buf))
}

/// `.jsonl` lines, one document each; a bad line is a warning naming its
/// number.
fn prepare_lines(shared: &Shared, lines: &str, first_line: usize, out: &mut FileOutcome) {
    let source = out.entry.source.clone();
    for (n, line) in lines.split('\n').enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = first_line + n;
        let d = match read::jsonl_line(line) {
            Ok(d) => d,
            Err(e) => {
                // Not a document: nothing of the index is kept for it.
                out.warnings
                    .push(format!("{source}: line {line_no}: {e}; skipped"));
                out.bad_lines += 1;
                continue;
            }
        };
        let src = d.id.unwrap_or_else(|| format!("{source}#{line_no}"));
        let hash = content_hash(&shared.fingerprint, line.as_bytes());
        if shared.existing.get(&src) == Some(&hash) {
            out.items.push(Item::Unchanged(src));
            continue;
        }
        let sections = [read::Section {
            path: Vec::new(),
            text: d.text,
        }];
        let chunks = chunk::chunk(&d.title, &sections, shared.chunk);
        if chunks.is_empty() {
            out.items.push(Item::Empty(src));
            continue;
        }
        out.items.push(Item::Ready {
            doc: Document {
                source: src,
                hash,
                title: d.title,
                metadata: d.metadata,
            },
            chunks,
        });
    }
}

/// Where warnings go: the summary, and stderr (above the progress bar).
struct Warnings<'a> {
    summary: &'a mut Vec<String>,
    count: usize,
    echo: bool,
    bar: &'a indicatif::ProgressBar,
}

impl Warnings<'_> {
    fn add(&mut self, w: String) {
        self.count += 1;
        if self.count > MAX_WARNINGS {
            return;
        }
        if self.echo {
            let line = if self.count == MAX_WARNINGS {
                format!("warning: {w}\n(further warnings are counted, not shown)")
            } else {
                format!("warning: {w}")
            };
            if self.bar.is_hidden() {
                eprintln!("{line}");
            } else {
                self.bar.println(line);
            }
        }
        self.summary.push(w);
    }
}

/// Chunks waiting for their vectors: embedded `batch` texts at a time,
/// across documents, and written once all of a document's vectors are in.
struct Embedding<'a> {
    embedder: &'a dyn Embedder,
    spec: &'a EmbeddingSpec,
    docs: VecDeque<(Document, Vec<Chunk>)>,
    texts: VecDeque<String>,
    vectors: VecDeque<Vec<f32>>,
    dims: Option<usize>,
}

impl Embedding<'_> {
    async fn push(
        &mut self,
        doc: Document,
        chunks: Vec<Chunk>,
        writer: &mut dyn IndexWriter,
    ) -> Result<(), IngestError> {
        self.texts.extend(chunks.iter().map(|c| c.text.clone()));
        self.docs.push_back((doc, chunks));
        let batch = self.spec.batch.max(1);
        while self.texts.len() >= batch {
            self.embed(batch).await?;
        }
        self.write_ready(writer).await
    }

    async fn finish(&mut self, writer: &mut dyn IndexWriter) -> Result<(), IngestError> {
        while !self.texts.is_empty() {
            let n = self.texts.len().min(self.spec.batch.max(1));
            self.embed(n).await?;
        }
        self.write_ready(writer).await
    }

    async fn embed(&mut self, n: usize) -> Result<(), IngestError> {
        let texts: Vec<String> = self.texts.drain(..n).collect();
        let vectors = self
            .embedder
            .embed(self.spec, Side::Document, texts)
            .await
            .map_err(|e| IngestError::Embedding(e.to_string()))?;
        if vectors.len() != n {
            return Err(IngestError::Embedding(format!(
                "{} vectors for {n} texts",
                vectors.len()
            )));
        }
        for v in vectors {
            let dims = *self.dims.get_or_insert(v.len());
            if v.is_empty() || v.len() != dims {
                return Err(IngestError::Embedding(format!(
                    "a vector of {} dimensions among vectors of {dims}",
                    v.len()
                )));
            }
            self.vectors.push_back(v);
        }
        Ok(())
    }

    async fn write_ready(&mut self, writer: &mut dyn IndexWriter) -> Result<(), IngestError> {
        while self
            .docs
            .front()
            .is_some_and(|(_, c)| c.len() <= self.vectors.len())
        {
            let Some((doc, chunks)) = self.docs.pop_front() else {
                break;
            };
            let vectors: Vec<Vec<f32>> = self.vectors.drain(..chunks.len()).collect();
            writer
                .put(&doc, &chunks, Some(&vectors))
                .await
                .map_err(IngestError::Index)?;
        }
        Ok(())
    }
}

/// Ingests the files under `roots` into the retriever's index through
/// `writer`: unchanged documents (same content hash, same settings) are
/// skipped, changed ones replaced, and with `opts.prune` documents whose
/// files are gone removed (only sources the roots cover). Vectors, when the
/// retriever needs them (a dense or hybrid local index, Chroma), come from
/// `embedder` in batches of `embedding.batch`. Everything becomes visible at
/// once, at the one `commit` at the end; a failed run commits nothing.
pub async fn ingest(
    cfg: &RetrieverConfig,
    mut writer: Box<dyn IndexWriter>,
    embedder: Option<&dyn Embedder>,
    roots: &[PathBuf],
    opts: &Options,
) -> Result<Summary, IngestError> {
    let started = Instant::now();
    let spec = vector_spec(cfg)?;
    let mut embedding = match (spec, embedder) {
        (None, _) => None,
        (Some(spec), Some(embedder)) => Some(Embedding {
            embedder,
            spec,
            docs: VecDeque::new(),
            texts: VecDeque::new(),
            vectors: VecDeque::new(),
            dims: None,
        }),
        (Some(_), None) => {
            return Err(IngestError::Setup(format!(
                "retriever `{}` needs vectors and no embedder was given",
                cfg.id
            )))
        }
    };
    let mut summary = Summary::default();
    let mut warning_list = Vec::new();
    let bar = if opts.progress && std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut warnings = Warnings {
        summary: &mut warning_list,
        count: 0,
        echo: opts.echo_warnings,
        bar: &bar,
    };

    let tree = walk(roots, &mut |w| warnings.add(w))?;
    let shared = Arc::new(Shared {
        existing: writer.documents().await.map_err(IngestError::Index)?,
        fingerprint: fingerprint(cfg.chunk, spec),
        chunk: cfg.chunk,
        max_file_bytes: opts.max_file_bytes,
    });
    let total: u64 = tree.files.iter().map(|f| f.size).sum();
    bar.set_length(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}) {wide_msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }

    // Files are prepared (read, hashed, chunked) on the blocking pool, as
    // many at once as there are CPUs, and written here in walk order.
    let threads = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let plans = {
        let shared = shared.clone();
        futures_util::stream::iter(tree.files.clone())
            .then(move |entry| {
                let shared = shared.clone();
                async move {
                    if entry.format != Some(Format::Jsonl) {
                        return vec![Job::File(entry)];
                    }
                    let e = entry.clone();
                    tokio::task::spawn_blocking(move || plan_jsonl(entry, &shared))
                        .await
                        .unwrap_or_else(|err| {
                            let w = format!("{}: cannot read: {err}", e.source);
                            vec![Job::Done(FileOutcome::failed(e, w))]
                        })
                }
            })
            .flat_map(futures_util::stream::iter)
    };
    let mut outcomes = plans
        .map(|job| {
            let shared = shared.clone();
            let entry = job.entry().clone();
            async move {
                tokio::task::spawn_blocking(move || prepare(job, &shared))
                    .await
                    .unwrap_or_else(|err| {
                        let w = format!("{}: cannot read: {err}", entry.source);
                        FileOutcome::failed(entry, w)
                    })
            }
        })
        .buffered(threads.clamp(1, 8))
        .boxed();
    let existing = &shared.existing;

    let mut seen: HashSet<String> = HashSet::new();
    // Sources of files that could not be read: what the index holds of them stays.
    let mut kept: Vec<String> = Vec::new();
    let mut prune_blocked = false;
    while let Some(outcome) = outcomes.next().await {
        bar.inc(outcome.progress);
        bar.set_message(outcome.entry.source.clone());
        summary.bytes = summary.bytes.saturating_add(outcome.bytes);
        for w in outcome.warnings {
            warnings.add(w);
        }
        if outcome.entry.format.is_none() {
            summary.other_files += 1;
            continue;
        }
        summary.skipped += outcome.bad_lines;
        if outcome.unreadable {
            summary.skipped += 1;
            kept.push(outcome.entry.source.clone());
            // A .jsonl line may name its document anything: none of the
            // documents it held can be told apart from ones really gone.
            prune_blocked |= outcome.entry.format == Some(Format::Jsonl);
        }
        for item in outcome.items {
            if !seen.insert(item.source().to_owned()) {
                warnings.add(format!(
                    "{}: more than one document has this source (in {}); only the first is indexed",
                    item.source(),
                    outcome.entry.source
                ));
                summary.skipped += 1;
                continue;
            }
            match item {
                Item::Unchanged(_) => summary.unchanged += 1,
                Item::Skipped(_) => summary.skipped += 1,
                Item::Empty(source) => {
                    if existing.contains_key(&source) {
                        writer.remove(&source).await.map_err(IngestError::Index)?;
                        summary.removed += 1;
                    } else {
                        warnings.add(format!("{source}: no text; skipped"));
                        summary.skipped += 1;
                    }
                }
                Item::Ready { doc, chunks } => {
                    if existing.contains_key(&doc.source) {
                        summary.changed += 1;
                    } else {
                        summary.new += 1;
                    }
                    summary.chunks += chunks.len() as u64;
                    summary.tokens += chunks.iter().map(|c| u64::from(c.tokens)).sum::<u64>();
                    match &mut embedding {
                        Some(e) => e.push(doc, chunks, writer.as_mut()).await?,
                        None => writer
                            .put(&doc, &chunks, None)
                            .await
                            .map_err(IngestError::Index)?,
                    }
                }
            }
        }
    }
    drop(outcomes);
    if let Some(e) = &mut embedding {
        e.finish(writer.as_mut()).await?;
    }

    if opts.prune {
        if prune_blocked {
            warnings.add(
                "not pruning: a .jsonl file could not be read, so the documents it held are unknown"
                    .into(),
            );
        } else {
            let kept_here = |s: &str| {
                kept.iter().any(|k| {
                    s == k
                        || s.strip_prefix(k.as_str())
                            .is_some_and(|r| r.starts_with('#'))
                })
            };
            for source in existing.keys() {
                if seen.contains(source) || kept_here(source) || !tree.covers(source) {
                    continue;
                }
                writer.remove(source).await.map_err(IngestError::Index)?;
                summary.removed += 1;
            }
        }
    }

    // An unchanged corpus leaves the index untouched (a new one is still
    // created, so it can be opened).
    if summary.changes() > 0 || existing.is_empty() {
        writer.commit().await.map_err(IngestError::Index)?;
    }
    bar.finish_and_clear();
    summary.warning_count = warnings.count;
    summary.warnings = warning_list;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use futures_util::FutureExt;

    use super::*;
    use crate::config::Weights;
    use crate::retrieval::{EmbedSide, SearchError};

    type Stored = (Document, Vec<Chunk>, Option<Vec<Vec<f32>>>);

    /// What an index shows to searches: only committed changes.
    #[derive(Default)]
    struct Store {
        docs: BTreeMap<String, Stored>,
        commits: usize,
    }

    /// An index in memory: changes are staged and applied at commit, all at
    /// once. `fail_put_at`: the n-th put (from 1) fails.
    struct MemWriter {
        store: Arc<Mutex<Store>>,
        staged: Vec<(String, Option<Stored>)>,
        puts: usize,
        fail_put_at: Option<usize>,
    }

    fn writer(store: &Arc<Mutex<Store>>) -> Box<dyn IndexWriter> {
        Box::new(MemWriter {
            store: store.clone(),
            staged: Vec::new(),
            puts: 0,
            fail_put_at: None,
        })
    }

    impl IndexWriter for MemWriter {
        fn documents(&mut self) -> BoxFuture<'_, Result<BTreeMap<String, String>, String>> {
            let map = self
                .store
                .lock()
                .map(|s| {
                    s.docs
                        .iter()
                        .map(|(k, (d, _, _))| (k.clone(), d.hash.clone()))
                        .collect()
                })
                .map_err(|e| e.to_string());
            async move { map }.boxed()
        }

        fn put<'a>(
            &'a mut self,
            doc: &'a Document,
            chunks: &'a [Chunk],
            vectors: Option<&'a [Vec<f32>]>,
        ) -> BoxFuture<'a, Result<(), String>> {
            self.puts += 1;
            let r = if self.fail_put_at == Some(self.puts) {
                Err("disk full".to_owned())
            } else if vectors.is_some_and(|v| v.len() != chunks.len()) {
                Err("one vector per chunk".to_owned())
            } else {
                self.staged.push((
                    doc.source.clone(),
                    Some((doc.clone(), chunks.to_vec(), vectors.map(<[_]>::to_vec))),
                ));
                Ok(())
            };
            async move { r }.boxed()
        }

        fn remove<'a>(&'a mut self, source: &'a str) -> BoxFuture<'a, Result<(), String>> {
            self.staged.push((source.to_owned(), None));
            async { Ok(()) }.boxed()
        }

        fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), String>> {
            let MemWriter { store, staged, .. } = *self;
            let r = store
                .lock()
                .map(|mut s| {
                    for (source, change) in staged {
                        match change {
                            Some(d) => s.docs.insert(source, d),
                            None => s.docs.remove(&source),
                        };
                    }
                    s.commits += 1;
                })
                .map_err(|e| e.to_string());
            async move { r }.boxed()
        }
    }

    /// Vectors from the text itself; records every call.
    #[derive(Default)]
    struct CountingEmbedder {
        calls: Mutex<Vec<(Side, usize)>>,
    }

    impl Embedder for CountingEmbedder {
        fn embed<'a>(
            &'a self,
            _spec: &'a EmbeddingSpec,
            side: Side,
            texts: Vec<String>,
        ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, SearchError>> {
            if let Ok(mut c) = self.calls.lock() {
                c.push((side, texts.len()));
            }
            let v = texts
                .iter()
                .map(|t| vec![t.len() as f32, t.chars().count() as f32, 1.0])
                .collect();
            async move { Ok(v) }.boxed()
        }
    }

    fn config(kind: RetrieverKind, embedding: Option<EmbeddingSpec>) -> RetrieverConfig {
        RetrieverConfig {
            id: "kb".into(),
            file: PathBuf::from("retrievers/kb.yaml"),
            description: None,
            kind,
            private: false,
            timeout: Duration::from_secs(10),
            top_k: 4,
            template: String::new(),
            cache_ttl: Duration::from_secs(60),
            cache_max_entries: 100,
            embedding,
            chunk: ChunkConfig {
                max_tokens: 64,
                overlap: 8,
            },
        }
    }

    fn local(mode: Mode) -> RetrieverKind {
        RetrieverKind::Local {
            path: PathBuf::from("kb.sqlite"),
            mode,
            weights: Weights {
                lexical: 1.0,
                dense: 1.0,
            },
        }
    }

    fn lexical() -> RetrieverConfig {
        config(local(Mode::Lexical), None)
    }

    fn spec(batch: usize) -> EmbeddingSpec {
        EmbeddingSpec {
            route: "embed".into(),
            query: EmbedSide::default(),
            document: EmbedSide::default(),
            batch,
        }
    }

    /// A corpus folder from the fixtures: some files in a subfolder, a
    /// hidden folder, and a file of another type.
    fn corpus() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ingest");
        let copy = |from: &str, to: &str| {
            let to = dir.path().join(to);
            if let Some(p) = to.parent() {
                std::fs::create_dir_all(p).expect("mkdir");
            }
            std::fs::copy(fixtures.join(from), to).expect("copy");
        };
        copy("handbook.md", "handbook.md");
        copy("returns-zh.txt", "zh/returns-zh.txt");
        copy("shipping.html", "web/shipping.html");
        copy("warranty.pdf", "warranty.pdf");
        copy("scan.pdf", "scan.pdf");
        copy("faq.jsonl", "faq.jsonl");
        copy("handbook.md", ".drafts/handbook.md");
        copy("make_pdfs.py", "tools/make_pdfs.py");
        dir
    }

    async fn run(
        cfg: &RetrieverConfig,
        store: &Arc<Mutex<Store>>,
        roots: &[PathBuf],
        opts: &Options,
    ) -> Summary {
        ingest(cfg, writer(store), None, roots, opts)
            .await
            .expect("ingest")
    }

    fn sources(store: &Arc<Mutex<Store>>) -> Vec<String> {
        store
            .lock()
            .map(|s| s.docs.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn commits(store: &Arc<Mutex<Store>>) -> usize {
        store.lock().map(|s| s.commits).unwrap_or(0)
    }

    fn texts_of(store: &Arc<Mutex<Store>>, source: &str) -> String {
        store
            .lock()
            .ok()
            .and_then(|s| {
                s.docs.get(source).map(|(_, c, _)| {
                    c.iter()
                        .map(|c| c.text.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                })
            })
            .unwrap_or_default()
    }

    const ALL: [&str; 8] = [
        "42",
        "faq-1",
        "faq.jsonl#2",
        "handbook.md",
        "warranty.pdf",
        "web/shipping.html",
        "zh/returns-zh.txt",
        // (scan.pdf has no text layer; faq.jsonl line 3 is broken)
        "",
    ];

    fn all() -> Vec<String> {
        ALL.iter()
            .filter(|s| !s.is_empty())
            .map(|s| (*s).to_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_first_run_indexes_every_document_with_sources_relative_to_the_root() {
        let dir = corpus();
        let store = Arc::new(Mutex::new(Store::default()));
        let s = run(
            &lexical(),
            &store,
            &[dir.path().to_owned()],
            &Options::default(),
        )
        .await;
        assert_eq!(sources(&store), all());
        assert_eq!((s.new, s.changed, s.unchanged, s.removed), (7, 0, 0, 0));
        // scan.pdf and the broken jsonl line.
        assert_eq!(s.skipped, 2, "{s:?}");
        assert_eq!(s.other_files, 1);
        assert_eq!(commits(&store), 1);
        assert!(s.chunks >= 7 && s.tokens > 0);
        assert!(s.bytes > 2000);
        let w = s.warnings.join("\n");
        assert!(w.contains("faq.jsonl: line 3:"), "{w}");
        assert!(w.contains("scan.pdf: the PDF has no text layer"), "{w}");
        // Titles and metadata travel with the document and its chunks.
        let guard = store.lock().expect("store");
        let (doc, chunks, vectors) = &guard.docs["handbook.md"];
        assert_eq!(doc.title, "Employee Handbook");
        assert!(doc.hash.starts_with("sha256:"));
        assert!(vectors.is_none());
        assert!(chunks
            .iter()
            .any(|c| c.title == "Employee Handbook > Leave > Annual leave"));
        let positions: Vec<u32> = chunks.iter().map(|c| c.position).collect();
        assert_eq!(positions, (0..chunks.len() as u32).collect::<Vec<_>>());
        let (faq, _, _) = &guard.docs["faq-1"];
        assert_eq!(faq.title, "Invoices");
        assert_eq!(faq.metadata["team"], "billing");
        assert_eq!(guard.docs["warranty.pdf"].0.title, "warranty");
    }

    #[tokio::test]
    async fn reruns_skip_unchanged_documents_and_replace_changed_ones() {
        let dir = corpus();
        let store = Arc::new(Mutex::new(Store::default()));
        let roots = [dir.path().to_owned()];
        let opts = Options::default();
        run(&lexical(), &store, &roots, &opts).await;

        // Nothing changed: nothing written, nothing committed.
        let s = run(&lexical(), &store, &roots, &opts).await;
        assert_eq!((s.new, s.changed, s.unchanged, s.removed), (0, 0, 7, 0));
        assert_eq!(s.chunks, 0);
        assert_eq!(commits(&store), 1);

        // One file and one jsonl line change.
        let md = dir.path().join("handbook.md");
        let text = std::fs::read_to_string(&md).expect("read");
        std::fs::write(&md, text.replace("25 days", "30 days")).expect("write");
        let jl = dir.path().join("faq.jsonl");
        let text = std::fs::read_to_string(&jl).expect("read");
        std::fs::write(
            &jl,
            text.replace("Numbers are ids too.", "Numbers are ids."),
        )
        .expect("write");
        let s = run(&lexical(), &store, &roots, &opts).await;
        assert_eq!((s.new, s.changed, s.unchanged, s.removed), (0, 2, 5, 0));
        assert_eq!(commits(&store), 2);
        let handbook = texts_of(&store, "handbook.md");
        assert!(handbook.contains("30 days") && !handbook.contains("25 days"));
        assert_eq!(texts_of(&store, "42"), "Numbers are ids.");
        assert_eq!(sources(&store), all());
    }

    #[tokio::test]
    async fn changing_the_chunk_settings_or_the_embedding_reindexes() {
        let dir = corpus();
        let store = Arc::new(Mutex::new(Store::default()));
        let roots = [dir.path().to_owned()];
        let opts = Options::default();
        let mut cfg = lexical();
        run(&cfg, &store, &roots, &opts).await;
        cfg.chunk.max_tokens = 100;
        let s = run(&cfg, &store, &roots, &opts).await;
        assert_eq!((s.new, s.changed, s.unchanged), (0, 7, 0));

        // A hybrid index embeds; its document prefix shapes the vectors.
        let embedder = CountingEmbedder::default();
        let mut hybrid = config(local(Mode::Hybrid), Some(spec(8)));
        hybrid.chunk = cfg.chunk;
        let s = ingest(&hybrid, writer(&store), Some(&embedder), &roots, &opts)
            .await
            .expect("ingest");
        assert_eq!(s.changed, 7);
        let s = ingest(&hybrid, writer(&store), Some(&embedder), &roots, &opts)
            .await
            .expect("ingest");
        assert_eq!(s.unchanged, 7);
        if let Some(e) = hybrid.embedding.as_mut() {
            e.document.prefix = "passage: ".into();
            // Batch size does not change a vector.
            e.batch = 2;
        }
        let s = ingest(&hybrid, writer(&store), Some(&embedder), &roots, &opts)
            .await
            .expect("ingest");
        assert_eq!(s.changed, 7);
        if let Some(e) = hybrid.embedding.as_mut() {
            e.batch = 5;
        }
        let s = ingest(&hybrid, writer(&store), Some(&embedder), &roots, &opts)
            .await
            .expect("ingest");
        assert_eq!(s.unchanged, 7);
    }

    #[tokio::test]
    async fn prune_removes_only_documents_whose_files_are_gone_under_the_roots() {
        let dir = corpus();
        let store = Arc::new(Mutex::new(Store::default()));
        let roots = [dir.path().to_owned()];
        run(&lexical(), &store, &roots, &Options::default()).await;

        std::fs::remove_file(dir.path().join("warranty.pdf")).expect("rm");
        let jl = dir.path().join("faq.jsonl");
        let text = std::fs::read_to_string(&jl).expect("read");
        let kept: Vec<&str> = text.lines().filter(|l| !l.contains("faq-1")).collect();
        std::fs::write(&jl, kept.join("\n")).expect("write");

        // Without --prune the index keeps them.
        // Line 2 moved up to line 1: the document named by its line number
        // is new.
        let s = run(&lexical(), &store, &roots, &Options::default()).await;
        assert_eq!((s.removed, s.new), (0, 1));
        assert!(sources(&store).contains(&"warranty.pdf".to_owned()));

        // A file root covers only its own documents.
        let prune = Options {
            prune: true,
            ..Options::default()
        };
        let s = run(
            &lexical(),
            &store,
            &[dir.path().join("handbook.md")],
            &prune,
        )
        .await;
        assert_eq!((s.removed, s.unchanged), (0, 1));
        assert!(sources(&store).contains(&"warranty.pdf".to_owned()));

        // A folder root covers everything under it (the old line 2 is gone
        // too).
        let s = run(&lexical(), &store, &roots, &prune).await;
        assert_eq!(s.removed, 3, "{s:?}");
        assert!(!sources(&store).contains(&"faq.jsonl#2".to_owned()));
        let left = sources(&store);
        assert!(!left.contains(&"warranty.pdf".to_owned()));
        assert!(!left.contains(&"faq-1".to_owned()));
        assert!(left.contains(&"faq.jsonl#1".to_owned()));
        assert!(left.contains(&"handbook.md".to_owned()));
    }

    #[tokio::test]
    async fn files_that_cannot_be_read_are_kept_not_pruned() {
        let dir = corpus();
        let store = Arc::new(Mutex::new(Store::default()));
        let roots = [dir.path().to_owned()];
        run(&lexical(), &store, &roots, &Options::default()).await;
        // Over the size limit now: skipped with a warning, and kept.
        let opts = Options {
            prune: true,
            max_file_bytes: 500,
            ..Options::default()
        };
        let s = run(&lexical(), &store, &roots, &opts).await;
        assert_eq!(s.removed, 0, "{s:?}");
        assert!(s
            .warnings
            .iter()
            .any(|w| w.contains("handbook.md") && w.contains("over the limit of 500 bytes")));
        assert_eq!(sources(&store), all());
    }

    #[tokio::test]
    async fn a_failed_run_leaves_the_index_as_it_was() {
        let dir = corpus();
        let store = Arc::new(Mutex::new(Store::default()));
        let w = Box::new(MemWriter {
            store: store.clone(),
            staged: Vec::new(),
            puts: 0,
            fail_put_at: Some(3),
        });
        let err = ingest(
            &lexical(),
            w,
            None,
            &[dir.path().to_owned()],
            &Options::default(),
        )
        .await
        .expect_err("the third put fails");
        assert!(
            matches!(err, IngestError::Index(ref m) if m == "disk full"),
            "{err}"
        );
        assert!(sources(&store).is_empty());
        assert_eq!(commits(&store), 0);
        // A root that does not exist fails before anything is read.
        let err = ingest(
            &lexical(),
            writer(&store),
            None,
            &[dir.path().join("missing")],
            &Options::default(),
        )
        .await
        .expect_err("no such root");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[tokio::test]
    async fn vectors_are_computed_in_batches_across_documents() {
        let dir = corpus();
        let store = Arc::new(Mutex::new(Store::default()));
        let embedder = CountingEmbedder::default();
        let cfg = config(local(Mode::Dense), Some(spec(3)));
        let s = ingest(
            &cfg,
            writer(&store),
            Some(&embedder),
            &[dir.path().to_owned()],
            &Options::default(),
        )
        .await
        .expect("ingest");
        let calls = embedder.calls.lock().expect("calls").clone();
        assert!(calls.iter().all(|(side, _)| *side == Side::Document));
        let sizes: Vec<usize> = calls.iter().map(|(_, n)| *n).collect();
        assert_eq!(sizes.iter().sum::<usize>() as u64, s.chunks);
        let (last, full) = sizes.split_last().expect("calls");
        assert!(full.iter().all(|n| *n == 3) && *last <= 3, "{sizes:?}");
        let guard = store.lock().expect("store");
        for (doc, chunks, vectors) in guard.docs.values() {
            let vectors = vectors.as_ref().expect("vectors");
            assert_eq!(vectors.len(), chunks.len(), "{}", doc.source);
            for (c, v) in chunks.iter().zip(vectors) {
                // Each chunk got its own vector.
                assert_eq!(v[0], c.text.len() as f32);
            }
        }
    }

    #[tokio::test]
    async fn retrievers_that_cannot_be_ingested_say_why() {
        let http = config(
            RetrieverKind::Http {
                url: "http://127.0.0.1:1".into(),
                api_key_env: None,
                headers: BTreeMap::new(),
            },
            None,
        );
        let store = Arc::new(Mutex::new(Store::default()));
        let err = ingest(&http, writer(&store), None, &[], &Options::default())
            .await
            .expect_err("http");
        assert!(
            err.to_string().contains("indexed by its own service"),
            "{err}"
        );
        let dense = config(local(Mode::Dense), Some(spec(4)));
        let err = ingest(&dense, writer(&store), None, &[], &Options::default())
            .await
            .expect_err("no embedder");
        assert!(err.to_string().contains("needs vectors"), "{err}");
    }

    #[tokio::test]
    async fn the_same_source_twice_is_indexed_once_with_a_warning() {
        let dir = corpus();
        let store = Arc::new(Mutex::new(Store::default()));
        // Two roots each holding handbook.md at their top.
        let other = tempfile::tempdir().expect("temp dir");
        std::fs::copy(
            dir.path().join("handbook.md"),
            other.path().join("handbook.md"),
        )
        .expect("copy");
        let s = run(
            &lexical(),
            &store,
            &[dir.path().to_owned(), other.path().to_owned()],
            &Options::default(),
        )
        .await;
        assert_eq!(s.new, 7);
        assert!(s
            .warnings
            .iter()
            .any(|w| w.starts_with("handbook.md: more than one document")));
    }

    #[tokio::test]
    async fn a_large_jsonl_file_keeps_its_line_numbers_across_blocks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut text = String::new();
        let filler = "x".repeat(300);
        for i in 1..=3000 {
            if i == 2500 {
                text.push_str("{broken\n");
            } else if i % 1000 == 0 {
                text.push('\n');
            } else {
                text.push_str(&format!(
                    "{{\"text\": \"Line {i} says hello. {filler}\", \"n\": {i}}}\n"
                ));
            }
        }
        assert!(text.len() > 3 * JSONL_BLOCK_BYTES);
        std::fs::write(dir.path().join("big.jsonl"), &text).expect("write");
        let store = Arc::new(Mutex::new(Store::default()));
        let s = run(
            &lexical(),
            &store,
            &[dir.path().to_owned()],
            &Options::default(),
        )
        .await;
        assert_eq!((s.new, s.skipped), (2996, 1), "{s:?}");
        assert_eq!(s.bytes, text.len() as u64);
        assert_eq!(s.warnings.len(), 1);
        assert!(
            s.warnings[0].starts_with("big.jsonl: line 2500:"),
            "{:?}",
            s.warnings
        );
        let guard = store.lock().expect("store");
        for i in [1, 999, 1001, 1999, 2001, 2499, 2501, 2999] {
            let (doc, chunks, _) = &guard.docs[&format!("big.jsonl#{i}")];
            assert_eq!(doc.metadata["n"], i);
            assert!(chunks[0].text.starts_with(&format!("Line {i} says")));
        }
        assert!(!guard.docs.contains_key("big.jsonl#1000"));
    }

    #[test]
    fn the_summary_reads_as_a_report() {
        let s = Summary {
            new: 3,
            changed: 1,
            unchanged: 10,
            removed: 2,
            skipped: 1,
            other_files: 4,
            chunks: 40,
            tokens: 9000,
            bytes: 2_500_000,
            seconds: 0.5,
            warnings: vec!["x".into()],
            warning_count: 1,
        };
        assert_eq!(
            s.to_string(),
            "documents: 3 new, 1 changed, 10 unchanged, 2 removed, 1 skipped (4 other files ignored)\n\
             chunks: 40 (9000 tokens)\n\
             read 2.50 MB in 0.50 s (5.0 MB/s)\n\
             1 warning(s)"
        );
    }
}
