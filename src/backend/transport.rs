//! The shared upstream transport: one pooled HTTP client per provider, auth
//! headers, the four timeouts (connect, response headers, idle gap between stream
//! chunks, total), classification of network failures, and the stream loop that
//! feeds a codec's [`StreamDecoder`] whole frames. Codecs never touch the network.
//!
//! Nothing an upstream sends is trusted to be small: bodies, streams and stream
//! lines are read under the provider's [`ResponseLimits`] (past them the answer
//! ends as `malformed_response`), error bodies and health-check bodies are read
//! only up to a short prefix, and `Retry-After` is capped at [`MAX_RETRY_AFTER`].

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;

use super::auth::{AuthPart, Credential};
use super::{Codec, EventStream, HttpCall, Provider, RawAnswer, RawCall, StreamDecoder};
use crate::canonical::*;
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::FrameDecoder;

/// Timeouts for one provider.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// From sending the request to the response headers.
    pub headers: Duration,
    /// Longest silence between two stream chunks.
    pub idle: Duration,
    /// The whole call, body or stream included.
    pub total: Duration,
    /// A whole active health check (credential, request and answer).
    pub health: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            headers: Duration::from_secs(120),
            idle: Duration::from_secs(60),
            total: Duration::from_secs(600),
            health: Duration::from_secs(10),
        }
    }
}

/// How much of one backend answer the gateway will hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseLimits {
    /// A whole response body, or all the bytes of one stream.
    pub max_response_bytes: usize,
    /// One stream line (an NDJSON frame) or one SSE event.
    pub max_line_bytes: usize,
}

impl Default for ResponseLimits {
    fn default() -> Self {
        ResponseLimits {
            max_response_bytes: 64 * 1024 * 1024,
            max_line_bytes: crate::framing::DEFAULT_MAX_LINE_BYTES,
        }
    }
}

pub use crate::error::MAX_RETRY_AFTER;

/// How much of a non-2xx or health-check body is read to classify it.
const ERROR_BODY_BYTES: usize = 64 * 1024;

/// `now + d`, saturating far in the future instead of overflowing.
fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

fn too_large(what: &str, limit: usize) -> UpstreamError {
    UpstreamError::new(
        ErrorKind::MalformedResponse,
        format!("backend {what} exceeded the provider's limit of {limit} bytes"),
    )
}

/// Reads a whole body, failing with `malformed_response` once it passes `max`
/// bytes (at once when `Content-Length` already says so). The buffer grows with
/// what arrives, never from a length the backend announces.
pub async fn read_body(resp: reqwest::Response, max: usize) -> Result<Bytes, UpstreamError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large("response body", max));
    }
    let mut stream = resp.bytes_stream();
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(classify_transport_error)?;
        let held = first.as_ref().map_or(0, Bytes::len) + buf.len();
        if held.saturating_add(chunk.len()) > max {
            return Err(too_large("response body", max));
        }
        if first.is_none() && buf.is_empty() {
            // The common case, one chunk, is returned without a copy.
            first = Some(chunk);
        } else {
            if let Some(f) = first.take() {
                buf.extend_from_slice(&f);
            }
            buf.extend_from_slice(&chunk);
        }
    }
    Ok(match first {
        Some(f) => f,
        None => buf.freeze(),
    })
}

/// Reads at most `max` bytes of a body and drops the rest (and the connection
/// with it): enough of an error answer to classify it.
async fn read_prefix(resp: reqwest::Response, max: usize) -> Bytes {
    let mut stream = resp.bytes_stream();
    let mut buf = BytesMut::new();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = max - buf.len();
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= max {
            break;
        }
    }
    buf.freeze()
}

/// The pooled HTTP client every outgoing call of the gateway uses (providers,
/// remote retrievers): the connect timeout, no Nagle delay, idle connections
/// kept 90 s. Per-call timeouts and body limits are the caller's.
pub fn client(connect: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| format!("cannot build HTTP client: {e}"))
}

/// Everything an HTTP provider needs, resolved from its config file.
pub struct HttpSettings {
    pub id: String,
    pub base_url: String,
    pub credential: Credential,
    /// The raw secret, so it can be scrubbed from any error text.
    pub secret: Option<String>,
    pub headers: HeaderMap,
    pub timeouts: Timeouts,
    pub limits: ResponseLimits,
}

pub struct HttpProvider {
    id: Arc<str>,
    base_url: String,
    client: reqwest::Client,
    headers: HeaderMap,
    credential: Credential,
    secret: Option<String>,
    timeouts: Timeouts,
    limits: ResponseLimits,
    codec: Arc<dyn Codec>,
    last_url: arc_swap::ArcSwapOption<(String, reqwest::Url)>,
}

impl HttpProvider {
    pub fn new(settings: HttpSettings, codec: Arc<dyn Codec>) -> Result<Self, String> {
        let client = client(settings.timeouts.connect)?;
        let mut headers = settings.headers;
        let mut credential = settings.credential;
        // A static header goes into the shared header map once.
        if let Credential::Static(AuthPart::Header(name, value)) = &credential {
            headers.insert(name.clone(), value.clone());
            credential = Credential::None;
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(HttpProvider {
            id: settings.id.into(),
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            client,
            headers,
            credential,
            secret: settings.secret,
            timeouts: settings.timeouts,
            limits: settings.limits,
            codec,
            last_url: arc_swap::ArcSwapOption::empty(),
        })
    }

    /// The parsed URL for `path`. Most codecs use one path per call kind, so the
    /// last parsed URL is kept and reused instead of re-parsing on every request.
    fn url_for(&self, path: &str) -> Result<reqwest::Url, UpstreamError> {
        if let Some(hit) = self.last_url.load().as_ref().filter(|h| h.0 == path) {
            return Ok(hit.1.clone());
        }
        let mut text = String::with_capacity(self.base_url.len() + path.len());
        text.push_str(&self.base_url);
        text.push_str(path);
        let url = reqwest::Url::parse(&text).map_err(|e| {
            UpstreamError::new(ErrorKind::BadRequest, format!("invalid backend URL: {e}"))
        })?;
        self.last_url
            .store(Some(Arc::new((path.to_owned(), url.clone()))));
        Ok(url)
    }

    /// A rejected credential is dropped from the cache so the next call refreshes it.
    fn on_error(&self, e: &UpstreamError) {
        if e.kind == ErrorKind::Auth {
            if let Credential::Dynamic(src) = &self.credential {
                src.invalidate();
            }
        }
    }

    /// Stamps the provider id on an error and removes the credential from its text.
    fn own(&self, e: UpstreamError) -> UpstreamError {
        self.on_error(&e);
        let mut e = e.redact(self.secret.as_deref());
        if e.provider.is_empty() {
            e.provider = self.id.to_string();
        }
        e
    }

    /// Sends `call` and waits for response headers. Non-2xx answers are read and
    /// classified by the codec.
    async fn send(&self, call: HttpCall) -> Result<reqwest::Response, UpstreamError> {
        self.send_body(&call.path, call.body, call.headers).await
    }

    async fn send_body(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        headers: Vec<(&'static str, String)>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut rb = self
            .client
            .post(self.url_for(path)?)
            .headers(self.headers.clone())
            .body(body);
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        let dynamic = match &self.credential {
            Credential::None => None,
            Credential::Static(part) => Some(part.clone()),
            Credential::Dynamic(src) => Some(src.get(&self.client).await?),
        };
        match dynamic {
            Some(AuthPart::Header(k, v)) => rb = rb.header(k, v),
            Some(AuthPart::Query(k, v)) => rb = rb.query(&[(k, v)]),
            None => {}
        }
        let resp = match tokio::time::timeout(self.timeouts.headers, rb.send()).await {
            Err(_) => {
                return Err(UpstreamError::new(
                    ErrorKind::Timeout,
                    format!(
                        "backend sent no response headers within {}",
                        humantime::format_duration(self.timeouts.headers)
                    ),
                ))
            }
            Ok(r) => r.map_err(classify_transport_error)?,
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let cap = ERROR_BODY_BYTES.min(self.limits.max_response_bytes);
        let body = tokio::time::timeout(self.timeouts.idle, read_prefix(resp, cap))
            .await
            .unwrap_or_default();
        let mut err = self.codec.error(status.as_u16(), &body);
        err.status = Some(status.as_u16());
        err.retry_after = retry_after
            .or(err.retry_after)
            .map(|d| d.min(MAX_RETRY_AFTER));
        Err(err)
    }

    async fn call_json<T>(
        &self,
        call: Result<HttpCall, UpstreamError>,
        decode: impl FnOnce(&[u8]) -> Result<T, UpstreamError>,
    ) -> Result<T, UpstreamError> {
        let work = async {
            let resp = self.send(call?).await?;
            let body = read_body(resp, self.limits.max_response_bytes).await?;
            decode(&body)
        };
        match tokio::time::timeout(self.timeouts.total, work).await {
            Ok(r) => r.map_err(|e| self.own(e)),
            Err(_) => Err(self.own(UpstreamError::new(
                ErrorKind::Timeout,
                format!(
                    "backend did not finish within {}",
                    humantime::format_duration(self.timeouts.total)
                ),
            ))),
        }
    }
}

impl Provider for HttpProvider {
    fn health(&self) -> Option<BoxFuture<'_, Result<(), UpstreamError>>> {
        let path = self.codec.health_path()?.to_owned();
        let limit = self.timeouts.health;
        let check = async move {
            let url = format!("{}{path}", self.base_url);
            let mut rb = self.client.get(url).headers(self.headers.clone());
            if let Credential::Dynamic(src) = &self.credential {
                match src.get(&self.client).await.map_err(|e| self.own(e))? {
                    AuthPart::Header(k, v) => rb = rb.header(k, v),
                    AuthPart::Query(k, v) => rb = rb.query(&[(k, v)]),
                }
            }
            let resp = rb
                .send()
                .await
                .map_err(|e| self.own(classify_transport_error(e)))?;
            let status = resp.status();
            // Only a prefix of the body is read: a ready backend's answer to a
            // health path is small, and a hostile one may never end.
            let body = read_prefix(resp, ERROR_BODY_BYTES).await;
            if status.is_success() {
                Ok(())
            } else {
                Err(self.own(
                    self.codec
                        .error(status.as_u16(), &body)
                        .with_status(status.as_u16()),
                ))
            }
        };
        Some(Box::pin(async move {
            match tokio::time::timeout(limit, check).await {
                Ok(r) => r,
                Err(_) => Err(self.own(UpstreamError::new(
                    ErrorKind::Timeout,
                    format!(
                        "health check did not finish within {}",
                        humantime::format_duration(limit)
                    ),
                ))),
            }
        }))
    }

    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<ChatResponse, UpstreamError>> {
        Box::pin(self.call_json(self.codec.chat_call(req, model), |b| {
            self.codec.chat_response(b)
        }))
    }

    fn chat_stream<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<EventStream, UpstreamError>> {
        Box::pin(async move {
            if !self.codec.native_streaming() {
                let full = self.chat(req, model).await?;
                let events: Vec<Result<StreamEvent, UpstreamError>> =
                    response_events(full).into_iter().map(Ok).collect();
                let stream: EventStream = Box::pin(futures_util::stream::iter(events));
                return Ok(stream);
            }
            let deadline = deadline_after(self.timeouts.total);
            let call = self.codec.chat_call(req, model).map_err(|e| self.own(e))?;
            let resp = self.send(call).await.map_err(|e| self.own(e))?;
            let is_json = resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.starts_with("application/json"));
            let stream: EventStream = if is_json {
                // The backend ignored `stream` or put an error in a 200 body: read it
                // whole and replay it as events.
                let body = tokio::time::timeout_at(
                    deadline,
                    read_body(resp, self.limits.max_response_bytes),
                )
                .await
                .map_err(|_| {
                    self.own(UpstreamError::new(
                        ErrorKind::Timeout,
                        "backend body timed out",
                    ))
                })?
                .map_err(|e| self.own(e))?;
                let full = self.codec.chat_response(&body).map_err(|e| self.own(e))?;
                let events: Vec<Result<StreamEvent, UpstreamError>> =
                    response_events(full).into_iter().map(Ok).collect();
                Box::pin(futures_util::stream::iter(events))
            } else {
                event_stream(
                    resp,
                    self.codec.stream_decoder(),
                    self.codec.stream_framing(),
                    StreamLimits {
                        idle: self.timeouts.idle,
                        deadline,
                        sizes: self.limits,
                    },
                    self.id.clone(),
                    self.secret.clone(),
                )
            };
            Ok(stream)
        })
    }

    fn embed<'a>(
        &'a self,
        req: &'a EmbeddingsRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<EmbeddingsResponse, UpstreamError>> {
        Box::pin(self.call_json(self.codec.embeddings_call(req, model), |b| {
            self.codec.embeddings_response(b)
        }))
    }

    fn forwarding(&self) -> Option<(super::Forwarding<'_>, usize)> {
        Some((
            self.codec.forwards_openai_chat()?,
            self.limits.max_line_bytes,
        ))
    }

    fn forward(&self, call: RawCall) -> Option<BoxFuture<'_, Result<RawAnswer, UpstreamError>>> {
        let path = self.codec.forwards_openai_chat()?.path;
        Some(Box::pin(async move {
            let deadline = deadline_after(self.timeouts.total);
            let timed_out = || {
                self.own(UpstreamError::new(
                    ErrorKind::Timeout,
                    format!(
                        "backend did not finish within {}",
                        humantime::format_duration(self.timeouts.total)
                    ),
                ))
            };
            let resp =
                tokio::time::timeout_at(deadline, self.send_body(path, call.body, Vec::new()))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|e| self.own(e))?;
            let is_json = resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.starts_with("application/json"));
            if !call.stream || is_json {
                let body = tokio::time::timeout_at(
                    deadline,
                    read_body(resp, self.limits.max_response_bytes),
                )
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| self.own(e))?;
                return Ok(RawAnswer::Whole(body));
            }
            Ok(RawAnswer::Stream(byte_stream(
                resp,
                StreamLimits {
                    idle: self.timeouts.idle,
                    deadline,
                    sizes: self.limits,
                },
                self.id.clone(),
                self.secret.clone(),
            )))
        }))
    }
}

/// A streamed body's bytes as they arrive, under the stream's idle and total
/// timeouts and its size limit; ends with one error on a stall, a cut or an
/// overflow.
fn byte_stream(
    resp: reqwest::Response,
    limits: StreamLimits,
    provider: Arc<str>,
    secret: Option<String>,
) -> futures_util::stream::BoxStream<'static, Result<Bytes, UpstreamError>> {
    let own = move |e: UpstreamError| {
        let mut e = e.redact(secret.as_deref());
        e.provider = provider.to_string();
        e
    };
    Box::pin(async_stream::stream! {
        let mut body = resp.bytes_stream();
        let mut received: usize = 0;
        loop {
            let wait_until = deadline_after(limits.idle).min(limits.deadline);
            let next = match tokio::time::timeout_at(wait_until, body.next()).await {
                Err(_) => {
                    let what = if Instant::now() >= limits.deadline { "the total time limit" } else { "the idle timeout" };
                    yield Err(own(UpstreamError::new(
                        ErrorKind::Timeout,
                        format!("backend stream stalled past {what}"),
                    )));
                    return;
                }
                Ok(n) => n,
            };
            match next {
                None => return,
                Some(Err(e)) => {
                    let mut e = classify_transport_error(e);
                    if e.kind == ErrorKind::Connect {
                        e.kind = ErrorKind::MalformedResponse;
                        e.message = format!("backend stream was cut: {}", e.message);
                    }
                    yield Err(own(e));
                    return;
                }
                Some(Ok(b)) => {
                    received = received.saturating_add(b.len());
                    if received > limits.sizes.max_response_bytes {
                        yield Err(own(too_large("stream", limits.sizes.max_response_bytes)));
                        return;
                    }
                    yield Ok(b);
                }
            }
        }
    })
}

struct StreamLimits {
    idle: Duration,
    deadline: Instant,
    sizes: ResponseLimits,
}

/// Reads a streamed body, frames it, and yields the codec's events. Ends with one
/// error on a stall, a cut, a malformed frame, an in-band error event, or a
/// stream or line past the provider's [`ResponseLimits`].
fn event_stream(
    resp: reqwest::Response,
    mut decoder: Box<dyn StreamDecoder>,
    framing: crate::framing::Framing,
    limits: StreamLimits,
    provider: Arc<str>,
    secret: Option<String>,
) -> EventStream {
    let own = move |e: UpstreamError| {
        let mut e = e.redact(secret.as_deref());
        e.provider = provider.to_string();
        e
    };
    Box::pin(async_stream::stream! {
        let mut body = resp.bytes_stream();
        let mut frames = FrameDecoder::with_max_line(framing, limits.sizes.max_line_bytes);
        let mut events = Vec::with_capacity(8);
        let mut received: usize = 0;
        loop {
            let wait_until = deadline_after(limits.idle).min(limits.deadline);
            let next = match tokio::time::timeout_at(wait_until, body.next()).await {
                Err(_) => {
                    let what = if Instant::now() >= limits.deadline { "the total time limit" } else { "the idle timeout" };
                    yield Err(own(UpstreamError::new(
                        ErrorKind::Timeout,
                        format!("backend stream stalled past {what}"),
                    )));
                    return;
                }
                Ok(n) => n,
            };
            let bytes = match next {
                None => {
                    let mut result = Ok(());
                    if let Some(f) = frames.finish() {
                        result = decoder.frame(f, &mut events);
                    } else if frames.overflowed() {
                        result = Err(too_large("stream line or event", limits.sizes.max_line_bytes));
                    }
                    for ev in events.drain(..) {
                        yield Ok(ev);
                    }
                    if let Err(e) = result {
                        yield Err(own(e));
                    } else if !decoder.finished() {
                        yield Err(own(UpstreamError::new(
                            ErrorKind::MalformedResponse,
                            "backend closed the stream before it was complete",
                        )));
                    }
                    return;
                }
                Some(Err(e)) => {
                    let mut e = classify_transport_error(e);
                    if e.kind == ErrorKind::Connect {
                        e.kind = ErrorKind::MalformedResponse;
                        e.message = format!("backend stream was cut: {}", e.message);
                    }
                    yield Err(own(e));
                    return;
                }
                Some(Ok(b)) => b,
            };
            received = received.saturating_add(bytes.len());
            if received > limits.sizes.max_response_bytes {
                yield Err(own(too_large("stream", limits.sizes.max_response_bytes)));
                return;
            }
            frames.push(&bytes);
            while let Some(frame) = frames.next_frame() {
                let result = decoder.frame(frame, &mut events);
                for ev in events.drain(..) {
                    yield Ok(ev);
                }
                if let Err(e) = result {
                    yield Err(own(e));
                    return;
                }
                if decoder.finished() {
                    return;
                }
            }
            if frames.overflowed() {
                yield Err(own(too_large("stream line or event", limits.sizes.max_line_bytes)));
                return;
            }
        }
    })
}

/// Replays a complete response as the events a stream of it would carry.
pub fn response_events(resp: ChatResponse) -> Vec<StreamEvent> {
    let mut out = Vec::with_capacity(4 + resp.choices.len());
    out.push(StreamEvent::Meta(StreamMeta {
        id: resp.id,
        created: resp.created,
        model: resp.model,
        system_fingerprint: resp.system_fingerprint,
    }));
    for c in resp.choices {
        let m = c.message;
        out.push(StreamEvent::Delta(Delta {
            choice: c.index,
            role: Some(Role::Assistant),
            content: m.content.map(|c| c.text().into_owned()),
            reasoning: m.reasoning,
            tool_calls: m
                .tool_calls
                .into_iter()
                .enumerate()
                .map(|(i, t)| ToolCallDelta {
                    index: i as u32,
                    id: Some(t.id),
                    name: Some(t.name),
                    arguments: Some(t.arguments),
                })
                .collect(),
            finish_reason: None,
        }));
        out.push(StreamEvent::Delta(Delta {
            choice: c.index,
            finish_reason: Some(c.finish_reason.unwrap_or(FinishReason::Stop)),
            ..Delta::default()
        }));
    }
    if let Some(u) = resp.usage {
        out.push(StreamEvent::Usage(u));
    }
    out.push(StreamEvent::Done);
    out
}

/// Classifies a failure of the HTTP client itself (no HTTP answer to classify).
pub fn classify_transport_error(e: reqwest::Error) -> UpstreamError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connect() {
        ErrorKind::Connect
    } else if e.is_body() || e.is_decode() {
        ErrorKind::MalformedResponse
    } else {
        ErrorKind::Connect
    };
    // The URL is dropped: some backends carry credentials in the query string.
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    UpstreamError::new(kind, msg)
}
