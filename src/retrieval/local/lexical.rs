//! The lexical branch: CJK-aware segmentation (shared by indexing and
//! querying) and the FTS5 BM25 query.
//!
//! FTS5's `unicode61` tokenizer splits text at separators (spaces,
//! punctuation) only, and Chinese has none between words: a whole clause
//! such as `购买后七天内可以退货` would be a single token, so the query 退货
//! would never match it (the `trigram` tokenizer cannot match queries shorter
//! than three characters either). So every run of Han characters is cut into
//! words with jieba (search mode: a long word also yields the shorter
//! dictionary words inside it) before FTS5 sees the text, and the words are
//! joined with spaces. Everything else passes through unchanged; `porter
//! unicode61 remove_diacritics 2` then lowercases, strips diacritics and stems
//! English ("refunds" and "refund" are one term).

use std::sync::LazyLock;

use jieba_rs::Jieba;
use rusqlite::Transaction;

/// The jieba dictionary, loaded once per process (on first use).
static JIEBA: LazyLock<Jieba> = LazyLock::new(Jieba::new);

/// The most terms one query is turned into (the rest are ignored).
pub const MAX_QUERY_TERMS: usize = 64;

/// Loads the segmenter now (it takes a moment), off the request path.
pub fn warm() {
    LazyLock::force(&JIEBA);
}

/// Whether `c` is a Han (Chinese) character: the runs jieba segments.
fn is_han(c: char) -> bool {
    matches!(c,
        '\u{3400}'..='\u{4DBF}'
        | '\u{4E00}'..='\u{9FFF}'
        | '\u{F900}'..='\u{FAFF}'
        | '\u{20000}'..='\u{2FA1F}')
}

/// `text` as FTS5 indexes it: each run of Han characters replaced by its
/// jieba search-mode words, space-separated; the rest unchanged. Indexing
/// and querying both go through this function.
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 2);
    segment_into(text, &mut out);
    out
}

/// [`segment`] appending to `out`.
pub fn segment_into(text: &str, out: &mut String) {
    let mut rest = text;
    while let Some(start) = rest.find(is_han) {
        out.push_str(&rest[..start]);
        let run = &rest[start..];
        let len = run.find(|c: char| !is_han(c)).unwrap_or(run.len());
        let (han, after) = run.split_at(len);
        out.push(' ');
        for token in JIEBA.cut_for_search(han, true) {
            out.push_str(token.word);
            out.push(' ');
        }
        rest = after;
    }
    out.push_str(rest);
}

/// Words that carry no meaning as search terms (asked questions are full of
/// them); dropped from a query unless it has nothing else.
/// `term` is lowercase.
fn is_stopword(term: &str) -> bool {
    const EN: &[&str] = &[
        "a", "about", "after", "all", "am", "an", "and", "any", "are", "as", "at", "be", "been",
        "before", "but", "by", "can", "could", "did", "do", "does", "for", "from", "had", "has",
        "have", "how", "i", "if", "in", "into", "is", "it", "its", "me", "my", "of", "on", "or",
        "our", "should", "so", "than", "that", "the", "their", "them", "then", "there", "these",
        "they", "this", "to", "us", "was", "we", "were", "what", "when", "where", "which", "who",
        "whom", "why", "will", "with", "would", "you", "your",
    ];
    const ZH: &[&str] = &[
        "的",
        "了",
        "是",
        "在",
        "和",
        "与",
        "或",
        "吗",
        "呢",
        "吧",
        "啊",
        "么",
        "怎么",
        "怎样",
        "怎么样",
        "如何",
        "什么",
        "哪些",
        "哪个",
        "哪里",
        "多少",
        "几",
        "我",
        "我们",
        "你",
        "您",
        "他",
        "她",
        "它",
        "他们",
        "请问",
        "一下",
        "可以",
        "能",
        "能否",
        "是否",
        "要",
        "需要",
        "有",
        "没有",
        "这",
        "那",
        "这个",
        "那个",
        "就",
        "都",
        "也",
        "还",
        "被",
        "把",
        "让",
        "给",
        "对",
    ];
    if term.is_ascii() {
        EN.contains(&term)
    } else {
        ZH.contains(&term)
    }
}

/// A user's text as search terms: segmented as indexed, split at every
/// non-alphanumeric character, lowercased, stopwords dropped unless nothing
/// else is left, duplicates dropped, at most [`MAX_QUERY_TERMS`].
pub fn query_terms(text: &str) -> Vec<String> {
    let segmented = segment(text);
    let mut terms: Vec<String> = Vec::new();
    let mut stop: Vec<String> = Vec::new();
    for term in segmented.split(|c: char| !c.is_alphanumeric()) {
        if term.is_empty() {
            continue;
        }
        let term = term.to_lowercase();
        let list = if is_stopword(&term) {
            &mut stop
        } else {
            &mut terms
        };
        if list.len() < MAX_QUERY_TERMS && !list.contains(&term) {
            list.push(term);
        }
    }
    if terms.is_empty() {
        terms = stop;
    }
    terms
}

/// The FTS5 query for a user's text: its [`query_terms`], each quoted (`"`
/// doubled) and OR-ed. `None` when the text has no term at all.
pub fn fts_query(text: &str) -> Option<String> {
    let terms = query_terms(text);
    if terms.is_empty() {
        return None;
    }
    let mut q = String::with_capacity(terms.iter().map(|t| t.len() + 6).sum());
    for (i, t) in terms.iter().enumerate() {
        if i > 0 {
            q.push_str(" OR ");
        }
        q.push('"');
        // Split at non-alphanumerics, a term cannot hold `"`; doubled anyway.
        q.push_str(&t.replace('"', "\"\""));
        q.push('"');
    }
    Some(q)
}

/// One ranked lexical hit: the chunk's row id and its BM25 (higher = better).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub row: i64,
    pub bm25: f32,
}

/// The best chunks for `query` (an [`fts_query`]) by BM25, best first: at
/// most `n` of those `keep` accepts (rows are read in rank order until `n`
/// pass). `bounded`: `keep` accepts everything, so SQLite may keep only the
/// best `n` while sorting.
pub fn search(
    tx: &Transaction<'_>,
    query: &str,
    n: usize,
    bounded: bool,
    mut keep: impl FnMut(i64) -> bool,
) -> rusqlite::Result<Vec<Hit>> {
    // bm25() is negative, lower = better: `rank` orders best first.
    let limit: i64 = if bounded {
        i64::try_from(n).unwrap_or(i64::MAX)
    } else {
        -1
    };
    let mut stmt = tx.prepare_cached(
        "SELECT rowid, rank FROM chunks_fts WHERE chunks_fts MATCH ?1 ORDER BY rank LIMIT ?2",
    )?;
    let mut rows = stmt.query(rusqlite::params![query, limit])?;
    let mut hits = Vec::with_capacity(n.min(256));
    while hits.len() < n {
        let Some(row) = rows.next()? else { break };
        let id: i64 = row.get(0)?;
        if !keep(id) {
            continue;
        }
        let rank: f64 = row.get(1)?;
        hits.push(Hit {
            row: id,
            bm25: (-rank) as f32,
        });
    }
    Ok(hits)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn han_runs_are_cut_into_words_the_rest_passes_through() {
        let s = segment("购买后七天内可以退货。Refunds take 5 days");
        // Every word stands alone, separated by spaces.
        let words: Vec<&str> = s.split_whitespace().collect();
        assert!(words.contains(&"退货"), "{s}");
        assert!(s.contains("Refunds take 5 days"), "{s}");
        // No Han word is glued to Latin text.
        let s = segment("iPhone退货");
        assert!(s.split_whitespace().any(|w| w == "iPhone"), "{s}");
        assert!(s.split_whitespace().any(|w| w == "退货"), "{s}");
    }

    #[test]
    fn search_mode_offers_the_words_inside_a_long_word() {
        let s = segment("中华人民共和国");
        let words: Vec<&str> = s.split_whitespace().collect();
        for w in ["中华", "人民", "共和国", "中华人民共和国"] {
            assert!(words.contains(&w), "{w} missing from {s}");
        }
    }

    #[test]
    fn queries_are_quoted_or_ed_terms() {
        assert_eq!(
            fts_query("How do refunds work?").unwrap(),
            r#""refunds" OR "work""#
        );
        assert_eq!(fts_query("退货").unwrap(), r#""退货""#);
        let q = fts_query("发票 抬头怎么写").unwrap();
        assert!(q.contains(r#""发票""#) && q.contains(r#""抬头""#), "{q}");
        assert!(!q.contains("怎么"), "{q}");
        // FTS5 syntax in the text is only text.
        let q = fts_query(r#"refund" OR NEAR(a b) -x * ^y"#).unwrap();
        assert_eq!(q, r#""refund" OR "near" OR "b" OR "x" OR "y""#);
        // Only stopwords: they are searched rather than nothing.
        assert_eq!(fts_query("the").unwrap(), r#""the""#);
        // Only punctuation: no query.
        assert_eq!(fts_query("?!。，…"), None);
        assert_eq!(fts_query("   "), None);
    }

    #[test]
    fn query_terms_are_bounded_and_unique() {
        let text: String = (0..500).map(|i| format!("term{i} ")).collect();
        let q = fts_query(&text).unwrap();
        assert_eq!(q.matches(" OR ").count(), MAX_QUERY_TERMS - 1);
        assert_eq!(fts_query("refund Refund REFUND").unwrap(), r#""refund""#);
    }
}
