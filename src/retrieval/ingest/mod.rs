//! `promptgate ingest`: documents → text → chunks → an index (the local
//! SQLite file, or a Chroma collection), incremental by content hash.

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

/// One source document as the index knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Its id in the index: the path relative to the ingest root (`/`
    /// separated), or `file#line` for one line of a `.jsonl` file.
    pub source: String,
    /// `sha256:` + hex of the document's bytes (of its line, for `.jsonl`).
    pub hash: String,
    /// Its title (first heading, `<title>`, the PDF's title, or the file name).
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
