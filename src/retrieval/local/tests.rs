#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::config::ChunkConfig;
use crate::retrieval::ingest::{Chunk, Document, IndexWriter};
use crate::retrieval::{EmbedSide, Filter};

/// A real `Embedder` for unit tests of the ranking: every text is mapped to
/// a fixed vector by the topic words it contains (refund, invoice, leave,
/// travel). Not a stand-in for the embedding route, which the pipeline and
/// benchmark tests exercise.
struct TopicEmbedder;

const TOPICS: [&[&str]; 4] = [
    &["refund", "退货", "退款", "money back", "reimburse"],
    &["invoice", "发票", "bill"],
    &["leave", "vacation", "年假", "休假"],
    &["travel", "出差", "trip"],
];

fn topic_vector(text: &str) -> Vec<f32> {
    let lower = text.to_lowercase();
    let mut v: Vec<f32> = TOPICS
        .iter()
        .map(|words| words.iter().filter(|w| lower.contains(*w)).count() as f32)
        .collect();
    // A little of everything, so no vector is zero.
    v.push(0.1);
    v
}

impl Embedder for TopicEmbedder {
    fn embed<'a>(
        &'a self,
        _spec: &'a EmbeddingSpec,
        _side: Side,
        texts: Vec<String>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, SearchError>> {
        async move { Ok(texts.iter().map(|t| topic_vector(t)).collect()) }.boxed()
    }
}

/// An embedder a lexical retriever must never call.
struct NoEmbedder;

impl Embedder for NoEmbedder {
    fn embed<'a>(
        &'a self,
        _spec: &'a EmbeddingSpec,
        _side: Side,
        _texts: Vec<String>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, SearchError>> {
        async move { Err(SearchError::Failed("not expected to embed".into())) }.boxed()
    }
}

fn config(path: &Path, mode: Mode, weights: Weights) -> RetrieverConfig {
    let embedding = (mode != Mode::Lexical).then(|| EmbeddingSpec {
        route: "embed".into(),
        query: EmbedSide::default(),
        document: EmbedSide::default(),
        batch: 32,
    });
    RetrieverConfig {
        id: "kb".into(),
        file: path.with_file_name("kb.yaml"),
        description: None,
        kind: RetrieverKind::Local {
            path: path.to_owned(),
            mode,
            weights,
        },
        private: false,
        timeout: Duration::from_secs(5),
        top_k: 4,
        template: String::new(),
        cache_ttl: Duration::ZERO,
        cache_max_entries: 0,
        embedding,
        chunk: ChunkConfig::default(),
    }
}

const EVEN: Weights = Weights {
    lexical: 1.0,
    dense: 1.0,
};

fn doc(source: &str, version: &str, metadata: Value) -> Document {
    let Value::Object(metadata) = metadata else {
        panic!("metadata must be an object")
    };
    Document {
        source: source.into(),
        hash: format!("sha256:{:0>16}", format!("{source}{version}").len()),
        title: source.trim_end_matches(".md").into(),
        metadata,
    }
}

fn chunks(texts: &[&str]) -> Vec<Chunk> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| Chunk {
            text: (*t).into(),
            title: String::new(),
            position: i as u32,
            tokens: t.len() as u32 / 4,
        })
        .collect()
}

/// Puts `docs` (source, metadata, chunk texts) in one transaction, with
/// vectors when `dense`.
async fn ingest(path: &Path, dense: bool, docs: &[(&str, Value, &[&str])]) {
    let mut w = store::writer(path).unwrap();
    for (source, meta, texts) in docs {
        let d = doc(source, "1", meta.clone());
        let cs = chunks(texts);
        let vs: Vec<Vec<f32>> = texts.iter().map(|t| topic_vector(t)).collect();
        w.put(&d, &cs, dense.then_some(&vs[..])).await.unwrap();
    }
    Box::new(w).commit().await.unwrap();
}

fn query(q: &str, k: u32) -> Search {
    Search {
        query: q.into(),
        top_k: k,
        filter: Filter::default(),
    }
}

fn sources(ps: &[Passage]) -> Vec<&str> {
    ps.iter().map(|p| p.source.as_str()).collect()
}

fn assert_scores_ordered(ps: &[Passage]) {
    for p in ps {
        assert!((0.0..=1.0).contains(&p.score), "{} off the scale", p.score);
    }
    for w in ps.windows(2) {
        assert!(
            w[0].score >= w[1].score,
            "{} before {}",
            w[0].score,
            w[1].score
        );
    }
}

const RETURNS_ZH: &str = "商品签收后七天内可以无理由退货，退货时请保持商品完好并附上原包装。";
const INVOICE_ZH: &str = "报销时须提供增值税发票，发票抬头必须是公司全称，税号不能有误。";
const LEAVE_ZH: &str = "员工每年享有带薪年假，年假天数按工龄计算，须提前一周申请。";
const REFUND_EN: &str = "A refund is issued to the original payment method within 5 business days.";
const TRAVEL_EN: &str = "Employees on a business trip book travel through the company portal.";
const INVOICE_EN: &str = "Suppliers must send an invoice with a purchase order number.";

async fn corpus(path: &Path, dense: bool) {
    ingest(
        path,
        dense,
        &[
            (
                "returns-zh.md",
                json!({"lang": "zh", "team": "service"}),
                &[RETURNS_ZH],
            ),
            (
                "invoice-zh.md",
                json!({"lang": "zh", "team": "finance"}),
                &[INVOICE_ZH],
            ),
            (
                "leave-zh.md",
                json!({"lang": "zh", "team": "hr"}),
                &[LEAVE_ZH],
            ),
            (
                "refund-en.md",
                json!({"lang": "en", "team": "service"}),
                &[REFUND_EN],
            ),
            (
                "travel-en.md",
                json!({"lang": "en", "team": "hr"}),
                &[TRAVEL_EN],
            ),
            (
                "invoice-en.md",
                json!({"lang": "en", "team": "finance"}),
                &[INVOICE_EN],
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn chinese_two_character_queries_find_their_passages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb.db");
    corpus(&path, false).await;
    let r = LocalRetriever::open(&config(&path, Mode::Lexical, EVEN)).unwrap();
    let hits = r.search(&query("退货", 3), &NoEmbedder).await.unwrap();
    assert_eq!(sources(&hits), vec!["returns-zh.md"]);
    assert_eq!(hits[0].text, RETURNS_ZH);
    let hits = r.search(&query("发票", 3), &NoEmbedder).await.unwrap();
    assert_eq!(sources(&hits), vec!["invoice-zh.md"]);
    let hits = r
        .search(&query("年假怎么申请", 3), &NoEmbedder)
        .await
        .unwrap();
    assert_eq!(hits[0].source, "leave-zh.md");
    let hits = r.search(&query("发票抬头", 3), &NoEmbedder).await.unwrap();
    assert_eq!(hits[0].source, "invoice-zh.md");
    assert_scores_ordered(&hits);

    // Why segmentation is needed: FTS5's own tokenizers cannot do this.
    // `unicode61` splits only at separators, and a Chinese clause has none,
    // so 商品签收后七天内可以无理由退货 is one token and 退货 matches
    // nothing; `trigram` indexes 3-character sequences and cannot match a
    // 2-character query at all.
    let db = Connection::open_in_memory().unwrap();
    db.execute_batch(
        "CREATE VIRTUAL TABLE plain USING fts5(body, tokenize = 'unicode61');
         CREATE VIRTUAL TABLE tri USING fts5(body, tokenize = 'trigram');",
    )
    .unwrap();
    for table in ["plain", "tri"] {
        db.execute(
            &format!("INSERT INTO {table} (body) VALUES (?1)"),
            [RETURNS_ZH],
        )
        .unwrap();
        let n: i64 = db
            .query_row(
                &format!("SELECT count(*) FROM {table} WHERE {table} MATCH '\"退货\"'"),
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0, "{table} unexpectedly matched 退货");
    }
}

#[tokio::test]
async fn english_is_stemmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb.db");
    corpus(&path, false).await;
    let r = LocalRetriever::open(&config(&path, Mode::Lexical, EVEN)).unwrap();
    // "refunds" finds "refund", "issuing" finds "issued", "invoices" "invoice".
    let hits = r.search(&query("refunds", 3), &NoEmbedder).await.unwrap();
    assert_eq!(sources(&hits), vec!["refund-en.md"]);
    let hits = r
        .search(&query("When are refunds issuing?", 3), &NoEmbedder)
        .await
        .unwrap();
    assert_eq!(hits[0].source, "refund-en.md");
    let hits = r.search(&query("INVOICES", 3), &NoEmbedder).await.unwrap();
    assert_eq!(sources(&hits), vec!["invoice-en.md"]);
    // The lexical branch is reported with its rank and raw BM25.
    let b = hits[0].branches.lexical.unwrap();
    assert_eq!(b.rank, 1);
    assert!(b.raw > 0.0);
    assert!((hits[0].score - score::lexical(b.raw)).abs() < 1e-6);
    assert!(hits[0].branches.dense.is_none());
    // Nothing to search for: no passages, no error.
    assert!(r
        .search(&query("?!", 3), &NoEmbedder)
        .await
        .unwrap()
        .is_empty());
    assert!(r
        .search(&query("zebra", 3), &NoEmbedder)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn passages_carry_their_document() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb.db");
    let mut w = store::writer(&path).unwrap();
    let d = doc("guide.md", "1", json!({"lang": "en", "year": 2024}));
    let cs = vec![Chunk {
        text: "Refund requests need the order number.".into(),
        title: "Guide > Refunds".into(),
        position: 3,
        tokens: 8,
    }];
    w.put(&d, &cs, None).await.unwrap();
    Box::new(w).commit().await.unwrap();
    let r = LocalRetriever::open(&config(&path, Mode::Lexical, EVEN)).unwrap();
    let hits = r
        .search(&query("order number", 2), &NoEmbedder)
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
    let p = &hits[0];
    assert_eq!(p.title, "Guide > Refunds");
    assert_eq!(p.chunk_id, Chunk::id(&d, 3));
    assert_eq!(
        Value::Object(p.metadata.clone()),
        json!({"lang": "en", "year": 2024})
    );
    // The title is searchable too.
    let hits = r.search(&query("guide", 2), &NoEmbedder).await.unwrap();
    assert_eq!(hits.len(), 1);
}

#[tokio::test]
async fn filters_apply_before_the_top_k_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb.db");
    // Twenty English refund passages rank above the one Chinese one for
    // "refund" (it says it once, in a longer text); a filter on lang=zh must
    // still find it with top_k 1.
    let mut docs: Vec<(String, Value, Vec<String>)> = (0..20)
        .map(|i| {
            (
                format!("en-{i:02}.md"),
                json!({"lang": "en", "n": i}),
                vec![format!("refund refund policy number {i}")],
            )
        })
        .collect();
    docs.push((
        "zh.md".into(),
        json!({"lang": "zh"}),
        vec![format!(
            "{RETURNS_ZH} 英文叫 refund，详见说明，另有很多其他的文字在这里。"
        )],
    ));
    let owned: Vec<(&str, Value, Vec<&str>)> = docs
        .iter()
        .map(|(s, m, t)| {
            (
                s.as_str(),
                m.clone(),
                t.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    let refs: Vec<(&str, Value, &[&str])> = owned
        .iter()
        .map(|(s, m, t)| (*s, m.clone(), &t[..]))
        .collect();
    ingest(&path, true, &refs).await;

    for mode in [Mode::Lexical, Mode::Dense, Mode::Hybrid] {
        let r = LocalRetriever::open(&config(&path, mode, EVEN)).unwrap();
        let unfiltered = r.search(&query("refund", 1), &TopicEmbedder).await.unwrap();
        assert_eq!(unfiltered.len(), 1);
        assert_ne!(unfiltered[0].source, "zh.md", "{mode:?}");

        let mut s = query("refund", 1);
        s.filter = Filter::from_json(Some(&json!({"lang": "zh"}))).unwrap();
        let hits = r.search(&s, &TopicEmbedder).await.unwrap();
        assert_eq!(sources(&hits), vec!["zh.md"], "{mode:?}");

        // A list matches any of its values; `source` filters on the source.
        let mut s = query("refund", 10);
        s.filter = Filter::from_json(Some(&json!({"n": [3, 7], "lang": "en"}))).unwrap();
        let hits = r.search(&s, &TopicEmbedder).await.unwrap();
        let mut got = sources(&hits);
        got.sort();
        assert_eq!(got, vec!["en-03.md", "en-07.md"], "{mode:?}");
        let mut s = query("refund", 10);
        s.filter = Filter::from_json(Some(&json!({"source": "en-11.md"}))).unwrap();
        let hits = r.search(&s, &TopicEmbedder).await.unwrap();
        assert_eq!(sources(&hits), vec!["en-11.md"], "{mode:?}");
        // A filter nothing passes: nothing.
        let mut s = query("refund", 10);
        s.filter = Filter::from_json(Some(&json!({"lang": "fr"}))).unwrap();
        assert!(r.search(&s, &TopicEmbedder).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn dense_and_hybrid_rank_and_explain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb.db");
    corpus(&path, true).await;

    // Dense: "money back" shares no word with any passage, but its vector
    // is the refund topic's.
    let dense = LocalRetriever::open(&config(&path, Mode::Dense, EVEN)).unwrap();
    let hits = dense
        .search(&query("money back", 6), &TopicEmbedder)
        .await
        .unwrap();
    let top2: Vec<&str> = sources(&hits)[..2].to_vec();
    assert!(
        top2.contains(&"refund-en.md") && top2.contains(&"returns-zh.md"),
        "{top2:?}"
    );
    assert_scores_ordered(&hits);
    let b = hits[0].branches.dense.unwrap();
    assert_eq!(b.rank, 1);
    assert!((hits[0].score - score::dense(b.raw)).abs() < 1e-6);
    assert!(hits[0].branches.lexical.is_none());

    // Hybrid: "refund invoice" — lexically the two English passages, densely
    // the refund and invoice topics in both languages; fused, the passages
    // both branches found lead.
    let hybrid = LocalRetriever::open(&config(&path, Mode::Hybrid, EVEN)).unwrap();
    let hits = hybrid
        .search(&query("refund invoice", 6), &TopicEmbedder)
        .await
        .unwrap();
    assert_scores_ordered(&hits);
    for p in &hits[..2] {
        assert!(
            p.branches.lexical.is_some() && p.branches.dense.is_some(),
            "{p:?}"
        );
        assert!(p.source.ends_with("-en.md"));
    }
    // Found by dense only: ranked after, with only a dense rank.
    let zh = hits.iter().find(|p| p.source == "returns-zh.md").unwrap();
    assert!(zh.branches.lexical.is_none());
    assert!(zh.branches.dense.is_some());
    // The score is the fused value over the best possible one.
    for p in &hits {
        let mut v = 0.0;
        if let Some(l) = p.branches.lexical {
            v += score::rrf_term(1.0, l.rank);
        }
        if let Some(d) = p.branches.dense {
            v += score::rrf_term(1.0, d.rank);
        }
        let expect = score::hybrid(v, score::rrf_best(&[1.0, 1.0]));
        assert!((p.score - expect).abs() < 1e-6);
    }

    // A query vector of another size is a clear failure, not a misread.
    struct Short;
    impl Embedder for Short {
        fn embed<'a>(
            &'a self,
            _: &'a EmbeddingSpec,
            _: Side,
            _: Vec<String>,
        ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, SearchError>> {
            async { Ok(vec![vec![1.0, 0.0]]) }.boxed()
        }
    }
    let err = hybrid
        .search(&query("refund", 2), &Short)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("2 dimensions"), "{err}");
    // The embedding route failing fails the search.
    let err = hybrid
        .search(&query("refund", 2), &NoEmbedder)
        .await
        .unwrap_err();
    assert!(matches!(err, SearchError::Failed(_)));
}

#[tokio::test]
async fn readers_see_the_old_index_until_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb.db");
    corpus(&path, false).await;
    let r = LocalRetriever::open(&config(&path, Mode::Lexical, EVEN)).unwrap();
    let g0 = r.generation();
    assert!(g0 > 0);
    let hits = r.search(&query("invoice", 4), &NoEmbedder).await.unwrap();
    assert_eq!(sources(&hits), vec!["invoice-en.md"]);

    let mut w = store::writer(&path).unwrap();
    let docs = w.documents().await.unwrap();
    assert_eq!(docs.len(), 6);
    assert_eq!(
        docs["invoice-en.md"],
        doc("invoice-en.md", "1", json!({})).hash
    );
    // Replace the invoice passage, remove the refund one, add a new one.
    let d = doc("invoice-en.md", "2", json!({}));
    w.put(&d, &chunks(&["Every invoice needs a VAT number."]), None)
        .await
        .unwrap();
    w.remove("refund-en.md").await.unwrap();
    let d = doc("new-en.md", "1", json!({}));
    w.put(&d, &chunks(&["A new invoice portal opens in May."]), None)
        .await
        .unwrap();

    // Before the commit: the old index, the old generation.
    let hits = r.search(&query("invoice", 4), &NoEmbedder).await.unwrap();
    assert_eq!(sources(&hits), vec!["invoice-en.md"]);
    assert_eq!(hits[0].text, INVOICE_EN);
    assert_eq!(
        r.search(&query("refund", 4), &NoEmbedder)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(r.generation(), g0);

    Box::new(w).commit().await.unwrap();

    // After: the new one, without reopening.
    let g1 = r.generation();
    assert!(g1 > g0);
    let hits = r.search(&query("invoice", 4), &NoEmbedder).await.unwrap();
    let mut got = sources(&hits);
    got.sort();
    assert_eq!(got, vec!["invoice-en.md", "new-en.md"]);
    assert!(hits
        .iter()
        .any(|p| p.text == "Every invoice needs a VAT number."));
    assert!(
        !hits.iter().any(|p| p.text == INVOICE_EN),
        "old chunks replaced"
    );
    assert!(r
        .search(&query("refund", 4), &NoEmbedder)
        .await
        .unwrap()
        .is_empty());

    // A writer dropped without commit changes nothing.
    let mut w = store::writer(&path).unwrap();
    w.remove("new-en.md").await.unwrap();
    drop(w);
    assert_eq!(r.generation(), g1);
    assert_eq!(
        r.search(&query("opens", 4), &NoEmbedder)
            .await
            .unwrap()
            .len(),
        1
    );

    // A commit that changed nothing keeps the generation (caches stay valid).
    let mut w = store::writer(&path).unwrap();
    let _ = w.documents().await.unwrap();
    Box::new(w).commit().await.unwrap();
    assert_eq!(r.generation(), g1);
}

#[tokio::test]
async fn dense_catalog_is_reloaded_after_a_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb.db");
    corpus(&path, true).await;
    let r = LocalRetriever::open(&config(&path, Mode::Dense, EVEN)).unwrap();
    let hits = r.search(&query("trip", 1), &TopicEmbedder).await.unwrap();
    assert_eq!(sources(&hits), vec!["travel-en.md"]);
    let mut w = store::writer(&path).unwrap();
    w.remove("travel-en.md").await.unwrap();
    let d = doc("trip-zh.md", "1", json!({}));
    let text = "出差须提前在系统中申请。";
    w.put(&d, &chunks(&[text]), Some(&[topic_vector(text)]))
        .await
        .unwrap();
    Box::new(w).commit().await.unwrap();
    let hits = r.search(&query("trip", 1), &TopicEmbedder).await.unwrap();
    assert_eq!(sources(&hits), vec!["trip-zh.md"]);
}

#[tokio::test]
async fn opening_explains_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();

    // Missing.
    let path = dir.path().join("missing.db");
    let err = open(&config(&path, Mode::Lexical, EVEN)).err().unwrap();
    assert!(err.contains("does not exist"), "{err}");
    assert!(err.contains("promptgate ingest kb PATH"), "{err}");
    assert!(!path.exists(), "opening must not create the file");

    // Not a SQLite file.
    let path = dir.path().join("corrupt.db");
    std::fs::write(
        &path,
        b"this is not a database, just some text ".repeat(200),
    )
    .unwrap();
    let err = open(&config(&path, Mode::Lexical, EVEN)).err().unwrap();
    assert!(err.contains("is not a SQLite database"), "{err}");
    let err = store::writer(&path).err().unwrap();
    assert!(err.contains("is not a SQLite database"), "{err}");

    // A SQLite file of something else.
    let path = dir.path().join("other.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    let err = open(&config(&path, Mode::Lexical, EVEN)).err().unwrap();
    assert!(err.contains("is not a promptgate index"), "{err}");
    let err = store::writer(&path).err().unwrap();
    assert!(err.contains("is not a promptgate index"), "{err}");

    // Another schema version.
    let path = dir.path().join("future.db");
    corpus(&path, false).await;
    Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE meta SET value = 99 WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
    let err = open(&config(&path, Mode::Lexical, EVEN)).err().unwrap();
    assert!(err.contains("schema version 99"), "{err}");

    // Dense or hybrid over an index built without vectors.
    let path = dir.path().join("lexical.db");
    corpus(&path, false).await;
    assert!(open(&config(&path, Mode::Lexical, EVEN)).is_ok());
    for mode in [Mode::Dense, Mode::Hybrid] {
        let err = open(&config(&path, mode, EVEN)).err().unwrap();
        assert!(err.contains("no vectors for 6 of its 6 chunks"), "{err}");
    }
    // An empty index (created, nothing ingested yet) opens in every mode.
    let path = dir.path().join("empty.db");
    Box::new(store::writer(&path).unwrap())
        .commit()
        .await
        .unwrap();
    for mode in [Mode::Lexical, Mode::Dense, Mode::Hybrid] {
        let r = open(&config(&path, mode, EVEN)).unwrap();
        assert!(r
            .search(&query("refund", 3), &TopicEmbedder)
            .await
            .unwrap()
            .is_empty());
    }
}

#[tokio::test]
async fn the_writer_checks_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb.db");
    corpus(&path, true).await;
    let mut w = store::writer(&path).unwrap();
    let d = doc("x.md", "1", json!({}));
    let cs = chunks(&["one", "two"]);
    let err = w.put(&d, &cs, Some(&[vec![1.0; 5]])).await.unwrap_err();
    assert!(err.contains("1 vectors for 2 chunks"), "{err}");
    let err = w
        .put(&d, &cs, Some(&[vec![1.0; 3], vec![1.0; 3]]))
        .await
        .unwrap_err();
    assert!(
        err.contains("3 dimensions") && err.contains("holds vectors of 5"),
        "{err}"
    );
    let err = w
        .put(&d, &cs, Some(&[vec![1.0; 5], vec![f32::NAN; 5]]))
        .await
        .unwrap_err();
    assert!(err.contains("NaN"), "{err}");
}

#[tokio::test]
async fn a_writer_holds_the_write_lock_until_done() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb.db");
    corpus(&path, false).await;
    let w = store::writer(&path).unwrap();
    // The first holds the write lock for its whole run.
    let conn = Connection::open(&path).unwrap();
    conn.busy_timeout(Duration::from_millis(10)).unwrap();
    assert!(conn.execute_batch("BEGIN IMMEDIATE").is_err());
    drop(w);
    assert!(conn.execute_batch("BEGIN IMMEDIATE; COMMIT").is_ok());
}

/// The in-memory BM25 of `path`'s index for `q` and FTS5's `bm25()` for the
/// same query: (chunks.id, BM25 higher = better), best first.
type Ranking = Vec<(i64, f64)>;

fn both_bm25(path: &Path, q: &str) -> (Ranking, Ranking) {
    let conn = store::open_reader(path, "kb").unwrap();
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM chunks ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let index_of: HashMap<i64, u32> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as u32))
        .collect();
    let bm = bm25::Bm25::load(&conn, &index_of).unwrap();
    let tokens = bm25::tokens(&conn, &lexical::query_terms(q)).unwrap();
    let mine = bm
        .search(&conn, &index_of, &tokens, 100, |_| true)
        .unwrap()
        .into_iter()
        .map(|(i, s)| (ids[i as usize], s))
        .collect();
    let fts = conn
        .prepare("SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ?1 ORDER BY rank")
        .unwrap()
        .query_map([lexical::fts_query(q).unwrap()], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (mine, fts)
}

const BM25_QUERIES: [&str; 7] = [
    "refunds",
    "refund receipt days",
    "invoices email company",
    "退货",
    "发票 退款 申请",
    "Employees book travel",
    "zebra",
];

#[tokio::test]
async fn in_memory_bm25_equals_fts5_bm25() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb.db");
    corpus(&path, false).await;
    let mut w = store::writer(&path).unwrap();
    let d = doc("more-en.md", "1", json!({}));
    let text = "Refunds: a refund is issued within five days; refund requests need the receipt.";
    w.put(
        &d,
        &chunks(&[text, "Invoices for refunds are sent by email."]),
        None,
    )
    .await
    .unwrap();
    let d = doc("more-zh.md", "1", json!({}));
    w.put(
        &d,
        &chunks(&["退货退款须在七天内申请，发票随退款一并作废。"]),
        None,
    )
    .await
    .unwrap();
    Box::new(w).commit().await.unwrap();
    for q in BM25_QUERIES {
        let (mine, fts) = both_bm25(&path, q);
        assert_eq!(mine.len(), fts.len(), "{q}: {mine:?} vs {fts:?}");
        for ((row, s), (fts_row, b)) in mine.iter().zip(&fts) {
            assert_eq!(row, fts_row, "{q}: {mine:?} vs {fts:?}");
            assert!((s - b).abs() < 1e-9 * b.abs().max(1.0), "{q}: {s} vs {b}");
        }
    }

    // After deletions FTS5 (contentless) still counts the deleted rows in
    // its N and average length; the in-memory statistics count the live
    // rows only. The same chunks match.
    let mut w = store::writer(&path).unwrap();
    w.remove("travel-en.md").await.unwrap();
    w.remove("refund-en.md").await.unwrap();
    Box::new(w).commit().await.unwrap();
    for q in BM25_QUERIES {
        let (mine, fts) = both_bm25(&path, q);
        let mut a: Vec<i64> = mine.iter().map(|h| h.0).collect();
        let mut b: Vec<i64> = fts.iter().map(|h| h.0).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{q}");
    }

    // Query terms are stemmed by FTS5 itself.
    let conn = store::open_reader(&path, "kb").unwrap();
    let tokens =
        bm25::tokens(&conn, &["refunds".into(), "Invoices".into(), "退货".into()]).unwrap();
    assert_eq!(tokens, vec!["refund", "invoic", "退货"]);
}

/// The branch large indexes use (FTS5 ranks with `bm25()`): the same
/// order as the in-memory one, and `keep` applied before the cut.
#[tokio::test]
async fn fts5_ranking_agrees_and_filters_before_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb.db");
    corpus(&path, false).await;
    let mut conn = store::open_reader(&path, "kb").unwrap();
    for q in BM25_QUERIES {
        let (mine, _) = both_bm25(&path, q);
        let tx = conn.transaction().unwrap();
        let hits = match lexical::fts_query(q) {
            Some(fq) => lexical::search(&tx, &fq, 100, true, |_| true).unwrap(),
            None => Vec::new(),
        };
        let rows: Vec<i64> = hits.iter().map(|h| h.row).collect();
        assert_eq!(rows, mine.iter().map(|m| m.0).collect::<Vec<_>>(), "{q}");
        for (h, m) in hits.iter().zip(&mine) {
            assert!((f64::from(h.bm25) - m.1).abs() < 1e-4, "{q}");
        }
        // With a filter: rows are read in rank order until enough pass.
        if rows.len() >= 2 {
            let second = rows[1];
            let kept = lexical::search(&tx, &lexical::fts_query(q).unwrap(), 1, false, |r| {
                r == second
            })
            .unwrap();
            assert_eq!(kept.iter().map(|h| h.row).collect::<Vec<_>>(), vec![second]);
        }
    }
}
