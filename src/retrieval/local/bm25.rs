//! BM25 exactly as FTS5's `bm25()` computes it (k1 = 1.2, b = 0.75, idf
//! `ln((N − n + 0.5) / (n + 0.5))`, at least 1e-6), from FTS5's own index,
//! without FTS5's per-row cost.
//!
//! `ORDER BY bm25()` calls the ranking function once per matching row, with a
//! lookup of the row's size each time: a query whose words are common (most
//! questions have one) matches thousands of chunks and takes milliseconds.
//! Here the index's terms are read through `fts5vocab` (the same tokenizer
//! output FTS5 matches on, stemmed by FTS5 itself) once per term and index
//! generation, and scores are accumulated over those postings in memory.
//! A query's terms are stemmed by FTS5 too (a tokenizer-only temp table on
//! each read connection), so both sides agree by construction; the unit test
//! compares the scores with `bm25()` itself.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use rusqlite::Connection;

const K1: f64 = 1.2;
const B: f64 = 0.75;
/// The most postings (term, chunk) kept in memory per index generation;
/// past it the cache starts again.
const MAX_CACHED_POSTINGS: usize = 8 << 20;
/// Query terms whose FTS5 tokens are remembered (process-wide).
const MAX_CACHED_STEMS: usize = 100_000;

/// The temp tables a read connection needs: a tokenizer-only FTS5 table
/// (FTS5 stems query terms) and the vocabularies of it and the index.
pub const CONNECTION_SETUP: &str = "
CREATE VIRTUAL TABLE temp.pg_tok USING fts5 (x, tokenize = 'porter unicode61 remove_diacritics 2');
CREATE VIRTUAL TABLE temp.pg_tok_terms USING fts5vocab (temp, pg_tok, instance);
CREATE VIRTUAL TABLE temp.pg_terms USING fts5vocab (main, chunks_fts, instance);
";

/// Query term → its FTS5 tokens (usually one: the lowercased stem).
static STEMS: LazyLock<Mutex<HashMap<String, Box<[String]>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The distinct FTS5 tokens of `terms`, in order.
pub fn tokens(conn: &Connection, terms: &[String]) -> rusqlite::Result<Vec<String>> {
    let mut per_term: Vec<Option<Box<[String]>>> = {
        let cache = STEMS.lock().unwrap_or_else(|p| p.into_inner());
        terms
            .iter()
            .map(|t| cache.get(t.as_str()).cloned())
            .collect()
    };
    let missing: Vec<usize> = (0..terms.len())
        .filter(|i| per_term[*i].is_none())
        .collect();
    if !missing.is_empty() {
        conn.prepare_cached("DELETE FROM temp.pg_tok")?
            .execute([])?;
        {
            let mut insert =
                conn.prepare_cached("INSERT INTO temp.pg_tok (rowid, x) VALUES (?1, ?2)")?;
            for i in &missing {
                insert.execute(rusqlite::params![*i as i64, terms[*i]])?;
            }
        }
        let mut found: Vec<Vec<String>> = vec![Vec::new(); terms.len()];
        {
            let mut read = conn
                .prepare_cached("SELECT doc, term FROM temp.pg_tok_terms ORDER BY doc, offset")?;
            let mut rows = read.query([])?;
            while let Some(r) = rows.next()? {
                let doc: i64 = r.get(0)?;
                if let Some(f) = usize::try_from(doc).ok().and_then(|d| found.get_mut(d)) {
                    f.push(r.get(1)?);
                }
            }
        }
        conn.prepare_cached("DELETE FROM temp.pg_tok")?
            .execute([])?;
        let mut cache = STEMS.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() + missing.len() > MAX_CACHED_STEMS {
            cache.clear();
        }
        for i in missing {
            let f = std::mem::take(&mut found[i]).into_boxed_slice();
            cache.insert(terms[i].clone(), f.clone());
            per_term[i] = Some(f);
        }
    }
    let mut out: Vec<String> = Vec::with_capacity(terms.len());
    for t in per_term.into_iter().flatten() {
        for token in t.iter() {
            if !out.contains(token) {
                out.push(token.clone());
            }
        }
    }
    Ok(out)
}

/// Decodes one SQLite varint (as FTS5 stores sizes); `None` if truncated.
fn varint(b: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for (i, byte) in b.iter().enumerate().take(9) {
        if i == 8 {
            return Some((v << 8) | u64::from(*byte));
        }
        v = (v << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// One index generation's BM25 statistics, and the postings read so far.
pub struct Bm25 {
    /// Chunk position → its size in FTS5 tokens.
    lens: Vec<u32>,
    avgdl: f64,
    postings: Mutex<Postings>,
}

#[derive(Default)]
struct Postings {
    by_token: HashMap<String, Arc<[(u32, u32)]>>,
    entries: usize,
}

impl Bm25 {
    /// Reads the sizes of the chunks (`index_of`: `chunks.id` → position).
    pub fn load(conn: &Connection, index_of: &HashMap<i64, u32>) -> rusqlite::Result<Bm25> {
        let mut lens = vec![0u32; index_of.len()];
        let mut total: u64 = 0;
        let mut rows_n: u64 = 0;
        let mut stmt = conn.prepare("SELECT id, sz FROM chunks_fts_docsize")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let sz = r.get_ref(1)?.as_blob().ok().and_then(varint).unwrap_or(0);
            rows_n += 1;
            total = total.saturating_add(sz);
            if let Some(i) = index_of.get(&id) {
                lens[*i as usize] = u32::try_from(sz).unwrap_or(u32::MAX);
            }
        }
        let avgdl = if rows_n == 0 {
            1.0
        } else {
            (total as f64 / rows_n as f64).max(f64::MIN_POSITIVE)
        };
        Ok(Bm25 {
            lens,
            avgdl,
            postings: Mutex::new(Postings::default()),
        })
    }

    /// The chunks that hold `token`, with how often: read once per
    /// generation.
    fn posting(
        &self,
        conn: &Connection,
        index_of: &HashMap<i64, u32>,
        token: &str,
    ) -> rusqlite::Result<Arc<[(u32, u32)]>> {
        if let Some(p) = self
            .postings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_token
            .get(token)
        {
            return Ok(p.clone());
        }
        let mut list: Vec<(u32, u32)> = Vec::new();
        let mut stmt = conn.prepare_cached("SELECT doc FROM temp.pg_terms WHERE term = ?1")?;
        let mut rows = stmt.query([token])?;
        let mut last: i64 = i64::MIN;
        let mut current: Option<u32> = None;
        while let Some(r) = rows.next()? {
            let doc: i64 = r.get(0)?;
            if doc != last {
                last = doc;
                current = index_of.get(&doc).copied();
                if let Some(i) = current {
                    list.push((i, 0));
                }
            }
            if current.is_some() {
                if let Some(e) = list.last_mut() {
                    e.1 = e.1.saturating_add(1);
                }
            }
        }
        let list: Arc<[(u32, u32)]> = list.into();
        let mut cache = self.postings.lock().unwrap_or_else(|p| p.into_inner());
        if cache.entries + list.len() > MAX_CACHED_POSTINGS {
            *cache = Postings::default();
        }
        cache.entries += list.len();
        cache.by_token.insert(token.to_owned(), list.clone());
        Ok(list)
    }

    /// The `n` best chunk positions for `tokens` among those `keep` accepts,
    /// best first, with their BM25 (as `-bm25()`: higher is better).
    pub fn search(
        &self,
        conn: &Connection,
        index_of: &HashMap<i64, u32>,
        tokens: &[String],
        n: usize,
        keep: impl Fn(u32) -> bool,
    ) -> rusqlite::Result<Vec<(u32, f64)>> {
        let rows = self.lens.len() as f64;
        let mut acc: Vec<f64> = vec![0.0; self.lens.len()];
        let mut touched: Vec<u32> = Vec::new();
        for token in tokens {
            let posting = self.posting(conn, index_of, token)?;
            if posting.is_empty() {
                continue;
            }
            let hits = posting.len() as f64;
            let mut idf = ((rows - hits + 0.5) / (hits + 0.5)).ln();
            if idf <= 0.0 {
                idf = 1e-6;
            }
            for &(i, tf) in posting.iter() {
                let Some(slot) = acc.get_mut(i as usize) else {
                    continue;
                };
                let tf = f64::from(tf);
                let dl = f64::from(self.lens[i as usize]);
                if *slot == 0.0 {
                    touched.push(i);
                }
                *slot += idf * (tf * (K1 + 1.0)) / (tf + K1 * (1.0 - B + B * dl / self.avgdl));
            }
        }
        let mut scored: Vec<(u32, f64)> = touched
            .into_iter()
            .filter(|i| keep(*i))
            .map(|i| (i, acc[i as usize]))
            .collect();
        let better = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if scored.len() > n && n > 0 {
            scored.select_nth_unstable_by(n - 1, better);
        }
        scored.truncate(n);
        scored.sort_unstable_by(better);
        Ok(scored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_decode_as_sqlite_writes_them() {
        assert_eq!(varint(&[0x05]), Some(5));
        assert_eq!(varint(&[0x81, 0x00]), Some(128));
        assert_eq!(varint(&[0x82, 0x81, 0x01]), Some((2 << 14) | (1 << 7) | 1));
        assert_eq!(varint(&[0x81]), None);
        assert_eq!(varint(&[]), None);
    }
}
