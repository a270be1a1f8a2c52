//! `promptgate ingest`: documents → text → chunks → an index (the local
//! SQLite file, or a Chroma collection), incremental by content hash.
//!
//! [`read`] turns a file into a title and sections, [`chunk`] cuts sections
//! into token-sized chunks.

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

pub mod chunk;
pub mod read;

/// One source document as the index knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Its id in the index: the path relative to the ingest root (`/`
    /// separated), or `file#line` for one line of a `.jsonl` file.
    pub source: String,
    /// `sha256:` + hex of the document's bytes (of its line, for `.jsonl`)
    /// and of the settings that shape its chunks and vectors: changing those
    /// re-indexes it.
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
    /// The chunk's id in its retriever: stable while the document's content is.
    pub fn id(doc: &Document, position: u32) -> String {
        let h = doc.hash.trim_start_matches("sha256:");
        format!("{}#{}", &h[..h.len().min(16)], position)
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
