//! The `http` kind: an enterprise's own retrieval service over a documented
//! JSON contract.
//!
//! The gateway sends `POST {url}` with `Content-Type: application/json`, the
//! file's extra `headers`, and `Authorization: Bearer <key>` when
//! `api_key_env` is set, and the body
//! `{"query": string, "top_k": integer, "filter": object}` (the filter always
//! an object, `{}` when empty; a scalar value means equal, a list means any of;
//! the key `source` filters on the result's source). The service answers 200
//! with `{"results": [{text, score, source?, metadata?, title?, chunk_id?}]}`:
//!
//! - `text` (string) and `score` (number) are required; a result without them
//!   fails the whole answer (the service is broken, not the query);
//! - `score` is a similarity in [0, 1], higher is better; a value outside is
//!   clamped to the range, counted, and logged (once per retriever);
//! - `source`, `title` (strings) default to `""`, `metadata` (an object) to
//!   `{}`; `chunk_id` (a string) defaults to a stable hash of source and text;
//! - other fields are ignored; results are ordered by score (best first, ties
//!   keep the service's order) and cut to `top_k`; the service applies the
//!   filter.
//!
//! The answer is read up to [`MAX_RESPONSE_BYTES`] before it is parsed. A 400
//! or 422 is the query's fault ([`SearchError::Invalid`], naming the field
//! when the body does); any other status, an unreachable service, or a
//! malformed answer is [`SearchError::Failed`]; no answer within the
//! retriever's `timeout` is [`SearchError::Timeout`]. No error text ever holds
//! the key.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Branches, Embedder, Passage, Retriever, Search, SearchError};
use crate::backend::transport;
use crate::backend::EnvLookup;
use crate::config::{RetrieverConfig, RetrieverKind};
use crate::error::ErrorKind;

/// The largest answer read from a retrieval service.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// How much of an error answer is read.
const ERROR_BODY_BYTES: usize = 64 * 1024;

/// How much of a service's error message is kept in the error.
const MAX_MESSAGE_CHARS: usize = 300;

pub fn build(cfg: &RetrieverConfig, env: EnvLookup<'_>) -> Result<Arc<dyn Retriever>, String> {
    Ok(Arc::new(HttpRetriever::new(cfg, env)?))
}

/// A retriever backed by a service speaking the contract above.
pub struct HttpRetriever {
    id: String,
    url: reqwest::Url,
    client: reqwest::Client,
    headers: HeaderMap,
    /// The key, so it can be scrubbed from any error text.
    secret: Option<String>,
    timeout: Duration,
    clamped: AtomicU64,
    warned: AtomicBool,
}

impl HttpRetriever {
    /// Resolves the file's settings; `Err` says why the retriever cannot serve
    /// (an unset key variable is named, its value never).
    pub fn new(cfg: &RetrieverConfig, env: EnvLookup<'_>) -> Result<HttpRetriever, String> {
        let RetrieverKind::Http {
            url,
            api_key_env,
            headers: extra,
        } = &cfg.kind
        else {
            return Err("not an http retriever".into());
        };
        let url = reqwest::Url::parse(url).map_err(|e| format!("invalid `url`: {e}"))?;
        let secret = super::key_from_env(api_key_env.as_deref(), env)?;
        let mut headers = HeaderMap::new();
        for (k, v) in extra {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("`headers`: `{k}` is not a valid header name"))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| format!("`headers.{k}`: the value is not a valid header value"))?;
            headers.insert(name, value);
        }
        if let Some(key) = &secret {
            let mut v = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                "the api_key_env variable holds characters a header cannot carry".to_owned()
            })?;
            v.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, v);
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            http::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        );
        let client = transport::client(cfg.timeout.min(Duration::from_secs(5)))?;
        Ok(HttpRetriever {
            id: cfg.id.clone(),
            url,
            client,
            headers,
            secret,
            timeout: cfg.timeout,
            clamped: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        })
    }

    /// Scores outside [0, 1] this retriever clamped so far.
    pub fn clamped_scores(&self) -> u64 {
        self.clamped.load(Ordering::Relaxed)
    }

    fn redact(&self, mut text: String) -> String {
        if let Some(s) = self.secret.as_deref().filter(|s| !s.is_empty()) {
            if text.contains(s) {
                text = text.replace(s, "[redacted]");
            }
        }
        text
    }

    fn failed(&self, message: String) -> SearchError {
        SearchError::Failed(self.redact(format!("retriever `{}`: {message}", self.id)))
    }

    async fn call(&self, search: &Search) -> Result<Vec<Passage>, SearchError> {
        let body = serde_json::json!({
            "query": search.query,
            "top_k": search.top_k,
            "filter": search.filter.to_json(),
        });
        let body = serde_json::to_vec(&body).map_err(|e| self.failed(e.to_string()))?;
        let resp = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(transport::classify_transport_error(e)))?;
        let status = resp.status();
        if !status.is_success() {
            // Enough of an error answer to read what it says; a longer one is
            // not read at all.
            let body = transport::read_body(resp, ERROR_BODY_BYTES)
                .await
                .unwrap_or_default();
            return Err(self.status_error(status.as_u16(), &body));
        }
        let body = transport::read_body(resp, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| self.transport_error(e))?;
        let answer: Answer = serde_json::from_slice(&body).map_err(|e| {
            self.failed(format!(
                "the service's answer is not the documented JSON ({e})"
            ))
        })?;
        let mut out = Vec::with_capacity(answer.results.len().min(search.top_k as usize));
        for (i, r) in answer.results.into_iter().enumerate() {
            out.push(self.passage(i, r)?);
        }
        // Best first; a stable sort keeps the service's order among equals.
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        out.truncate(search.top_k as usize);
        Ok(out)
    }

    fn passage(&self, i: usize, r: RawResult) -> Result<Passage, SearchError> {
        let text = r
            .text
            .ok_or_else(|| self.failed(format!("result {i} has no string `text`")))?;
        let raw = r
            .score
            .ok_or_else(|| self.failed(format!("result {i} has no number `score`")))?;
        let score = if (0.0..=1.0).contains(&raw) {
            raw as f32
        } else {
            let n = self
                .clamped
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    retriever = %self.id,
                    score = raw,
                    clamped = n,
                    "retrieval service sent a score outside [0, 1]; scores are clamped (the contract wants a similarity in [0, 1], higher is better)"
                );
            }
            raw.clamp(0.0, 1.0) as f32
        };
        let source = r.source.unwrap_or_default();
        let chunk_id = match r.chunk_id {
            Some(id) if !id.is_empty() => id,
            _ => default_chunk_id(&source, &text),
        };
        Ok(Passage {
            text,
            title: r.title.unwrap_or_default(),
            score,
            chunk_id,
            metadata: r.metadata.unwrap_or_default(),
            source,
            branches: Branches::default(),
        })
    }

    fn transport_error(&self, e: crate::error::UpstreamError) -> SearchError {
        match e.kind {
            ErrorKind::Timeout => SearchError::Timeout(self.timeout),
            // `read_body`'s size refusal.
            ErrorKind::MalformedResponse if e.message.contains("exceeded") => self.failed(format!(
                "the service's answer is larger than {} MiB",
                MAX_RESPONSE_BYTES / (1024 * 1024)
            )),
            ErrorKind::MalformedResponse => {
                self.failed(format!("the service's answer broke off: {}", e.message))
            }
            _ => self.failed(format!("cannot reach the service: {}", e.message)),
        }
    }

    fn status_error(&self, status: u16, body: &[u8]) -> SearchError {
        let said = ServiceError::read(body);
        let message = said
            .message
            .map(|m| self.redact(cut(&m)))
            .unwrap_or_else(|| format!("the service answered HTTP {status}"));
        match status {
            400 | 422 => SearchError::Invalid {
                field: said.field.unwrap_or_else(|| "query".to_owned()),
                message,
            },
            _ => self.failed(format!("the service answered HTTP {status}: {message}")),
        }
    }
}

impl Retriever for HttpRetriever {
    fn search<'a>(
        &'a self,
        search: &'a Search,
        _embedder: &'a dyn Embedder,
    ) -> BoxFuture<'a, Result<Vec<Passage>, SearchError>> {
        async move {
            match tokio::time::timeout(self.timeout, self.call(search)).await {
                Ok(r) => r,
                Err(_) => Err(SearchError::Timeout(self.timeout)),
            }
        }
        .boxed()
    }
}

/// The id of a result the service gave none: stable for the same source and
/// text (`h` + 16 hex digits of SHA-256 over both).
pub fn default_chunk_id(source: &str, text: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(source.as_bytes());
    h.update([0u8]);
    h.update(text.as_bytes());
    let d = h.finalize();
    let mut out = String::with_capacity(17);
    out.push('h');
    for b in &d[..8] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[derive(Deserialize)]
struct Answer {
    results: Vec<RawResult>,
}

/// One result; every field is read leniently so a missing or mistyped one is
/// named in the error instead of failing the parse with a serde message.
#[derive(Deserialize)]
struct RawResult {
    #[serde(default, deserialize_with = "lenient")]
    text: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    score: Option<f64>,
    #[serde(default, deserialize_with = "lenient")]
    source: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    title: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    chunk_id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    metadata: Option<Map<String, Value>>,
}

/// `Some` when the value has the wanted type, `None` otherwise (null included).
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let v = Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

/// What a 4xx body says: the field and message, in the shapes services
/// commonly use (`{error: {message, field}}`, `{message, field}`,
/// `{error: "…"}`, FastAPI's `{detail: [{loc, msg}]}` or `{detail: "…"}`).
#[derive(Default)]
struct ServiceError {
    field: Option<String>,
    message: Option<String>,
}

impl ServiceError {
    fn read(body: &[u8]) -> ServiceError {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            return ServiceError {
                field: None,
                message: (!text.is_empty()).then(|| text.to_owned()),
            };
        };
        let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let mut out = ServiceError::default();
        let err = v.get("error");
        if let Some(e) = err.filter(|e| e.is_object()) {
            out.field = s(e.get("field")).or_else(|| s(e.get("param")));
            out.message = s(e.get("message"));
        } else {
            out.message = s(err);
        }
        out.field = out.field.or_else(|| s(v.get("field")));
        out.message = out.message.or_else(|| s(v.get("message")));
        match v.get("detail") {
            Some(Value::Array(items)) => {
                if let Some(first) = items.first() {
                    if out.field.is_none() {
                        out.field = first.get("loc").and_then(Value::as_array).map(|loc| {
                            loc.iter()
                                .filter(|p| p.as_str() != Some("body"))
                                .map(|p| match p {
                                    Value::String(s) => s.clone(),
                                    other => other.to_string(),
                                })
                                .collect::<Vec<_>>()
                                .join(".")
                        });
                    }
                    out.message = out.message.or_else(|| s(first.get("msg")));
                }
            }
            Some(Value::String(d)) => out.message = out.message.or_else(|| Some(d.clone())),
            _ => {}
        }
        out.field = out.field.filter(|f| !f.is_empty()).map(|f| cut(&f));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_chunk_ids_are_stable_and_tell_source_from_text() {
        assert_eq!(default_chunk_id("a", "bc"), default_chunk_id("a", "bc"));
        assert_ne!(default_chunk_id("a", "bc"), default_chunk_id("ab", "c"));
        assert_eq!(default_chunk_id("a", "b").len(), 17);
    }

    #[test]
    fn service_errors_name_the_field_in_common_shapes() {
        let r = ServiceError::read(br#"{"error":{"message":"bad lang","field":"filter.lang"}}"#);
        assert_eq!(r.field.as_deref(), Some("filter.lang"));
        assert_eq!(r.message.as_deref(), Some("bad lang"));
        let r = ServiceError::read(
            br#"{"detail":[{"loc":["body","top_k"],"msg":"too big","type":"x"}]}"#,
        );
        assert_eq!(r.field.as_deref(), Some("top_k"));
        assert_eq!(r.message.as_deref(), Some("too big"));
        let r = ServiceError::read(b"plain words");
        assert_eq!(r.field, None);
        assert_eq!(r.message.as_deref(), Some("plain words"));
    }
}
