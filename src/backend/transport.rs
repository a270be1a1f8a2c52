//! The shared upstream transport: one pooled hyper client per provider
//! ([`Upstream`]: hyper-util's pooled client over a `TCP_NODELAY` connector,
//! rustls with the webpki roots for https, ALPN h2 and http/1.1), auth
//! headers, the four timeouts (connect, response headers, idle gap between stream
//! chunks, total), classification of network failures, and the stream loop that
//! feeds a codec's [`StreamDecoder`] whole frames. Codecs never touch the network.
//!
//! Nothing an upstream sends is trusted to be small: bodies, streams and stream
//! lines are read under the provider's [`ResponseLimits`] (past them the answer
//! ends as `malformed_response`), error bodies and health-check bodies are read
//! only up to a short prefix, and `Retry-After` is capped at [`MAX_RETRY_AFTER`].

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
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

/// A body being read whole under a size limit: the buffer grows with what
/// arrives, never from a length the backend announces, and the common case (one
/// chunk) is kept without a copy.
struct Gather {
    first: Option<Bytes>,
    buf: BytesMut,
    max: usize,
}

impl Gather {
    fn new(max: usize) -> Self {
        Gather {
            first: None,
            buf: BytesMut::new(),
            max,
        }
    }

    fn push(&mut self, chunk: Bytes) -> Result<(), UpstreamError> {
        let held = self.first.as_ref().map_or(0, Bytes::len) + self.buf.len();
        if held.saturating_add(chunk.len()) > self.max {
            return Err(too_large("response body", self.max));
        }
        if self.first.is_none() && self.buf.is_empty() {
            self.first = Some(chunk);
        } else {
            if let Some(f) = self.first.take() {
                self.buf.extend_from_slice(&f);
            }
            self.buf.extend_from_slice(&chunk);
        }
        Ok(())
    }

    fn finish(self) -> Bytes {
        match self.first {
            Some(f) => f,
            None => self.buf.freeze(),
        }
    }
}

/// Reads a whole body of the reqwest client (remote retrievers), failing with
/// `malformed_response` once it passes `max` bytes (at once when
/// `Content-Length` already says so).
pub async fn read_body(resp: reqwest::Response, max: usize) -> Result<Bytes, UpstreamError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large("response body", max));
    }
    let mut stream = resp.bytes_stream();
    let mut gather = Gather::new(max);
    while let Some(chunk) = stream.next().await {
        gather.push(chunk.map_err(classify_transport_error)?)?;
    }
    Ok(gather.finish())
}

/// The next data chunk of a provider's answer (trailers are skipped).
async fn next_chunk(body: &mut Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        match body.frame().await? {
            Ok(frame) => match frame.into_data() {
                Ok(data) => return Some(Ok(data)),
                Err(_) => continue,
            },
            Err(e) => return Some(Err(e)),
        }
    }
}

/// Reads a provider's whole answer, failing with `malformed_response` once it
/// passes `max` bytes (at once when `Content-Length` already says so).
async fn read_incoming(resp: Response<Incoming>, max: usize) -> Result<Bytes, UpstreamError> {
    use hyper::body::Body as _;
    let mut body = resp.into_body();
    if body.size_hint().lower() > max as u64 {
        return Err(too_large("response body", max));
    }
    let mut gather = Gather::new(max);
    while let Some(chunk) = next_chunk(&mut body).await {
        gather.push(chunk.map_err(|e| body_error(&e, "backend body was cut"))?)?;
    }
    Ok(gather.finish())
}

/// Reads at most `max` bytes of a body and drops the rest (and the connection
/// with it): enough of an error answer to classify it.
async fn read_prefix(resp: Response<Incoming>, max: usize) -> Bytes {
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    while let Some(Ok(chunk)) = next_chunk(&mut body).await {
        let room = max - buf.len();
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= max {
            break;
        }
    }
    buf.freeze()
}

/// The pooled reqwest client the remote retrievers use: the connect timeout,
/// no Nagle delay, idle connections kept 90 s. Per-call timeouts and body
/// limits are the caller's. Providers use [`Upstream`].
pub fn client(connect: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| format!("cannot build HTTP client: {e}"))
}

/// How long an idle upstream connection is kept, and how many per host.
const POOL_IDLE: Duration = Duration::from_secs(90);
const POOL_MAX_IDLE_PER_HOST: usize = 256;
/// Keepalive probes on provider connections: first after 15 s of silence, then
/// every 15 s, 3 unanswered end the connection.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
/// How long sent data may stay unacknowledged before the connection is
/// dropped (where the OS has the option).
#[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

type Connector = hyper_rustls::HttpsConnector<Connect>;
type Proxies = hyper_util::client::proxy::matcher::Matcher;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens a provider connection: directly, or through the proxy the
/// environment names for its destination (`HTTPS_PROXY`, `HTTP_PROXY`,
/// `ALL_PROXY`, `NO_PROXY`, as reqwest read them): https through a `CONNECT`
/// tunnel, plain http by sending requests to the proxy in absolute form.
/// Decided per new connection, never per request.
#[derive(Clone)]
pub struct Connect {
    http: HttpConnector,
    proxies: Option<Arc<Proxies>>,
}

impl tower::Service<Uri> for Connect {
    type Response = Conn;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Conn, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let via = self.proxies.as_ref().and_then(|p| p.intercept(&dst));
        Box::pin(async move {
            let Some(via) = via else {
                let io = http.call(dst).await?;
                return Ok(Conn { io, proxied: false });
            };
            if via.uri().scheme_str() != Some("http") {
                return Err("only http:// proxies are supported".into());
            }
            if dst.scheme_str() == Some("https") {
                let mut tunnel = hyper_util::client::legacy::connect::proxy::Tunnel::new(
                    via.uri().clone(),
                    http,
                );
                if let Some(auth) = via.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                let io = tunnel.call(dst).await?;
                Ok(Conn { io, proxied: false })
            } else {
                let io = http.call(via.uri().clone()).await?;
                Ok(Conn { io, proxied: true })
            }
        })
    }
}

/// A provider connection; `proxied` when requests on it go to a proxy in
/// absolute form.
pub struct Conn {
    io: hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    proxied: bool,
}

impl hyper_util::client::legacy::connect::Connection for Conn {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

/// The proxies the environment names, or `None` when it names none.
fn env_proxies() -> Option<Arc<Proxies>> {
    let set = [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
    set.then(|| Arc::new(Proxies::from_env()))
}

/// The TCP side of every provider connection: `TCP_NODELAY`, the connect
/// timeout, and TCP keepalive and user timeout as reqwest set them (a peer that
/// vanished is noticed on an idle pooled connection too).
fn tcp_connector(connect: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect));
    http.enforce_http(false);
    http.set_keepalive(Some(TCP_KEEPALIVE));
    http.set_keepalive_interval(Some(TCP_KEEPALIVE));
    http.set_keepalive_retries(Some(3));
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    http.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
    http
}

/// The TLS settings every provider connection shares: rustls (ring) with the
/// webpki roots, built once per process.
fn default_tls() -> Result<rustls::ClientConfig, String> {
    static TLS: OnceLock<Result<rustls::ClientConfig, String>> = OnceLock::new();
    TLS.get_or_init(|| {
        use hyper_rustls::ConfigBuilderExt;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .with_webpki_roots()
            .with_no_client_auth())
    })
    .clone()
}

/// One provider's pooled HTTP client on hyper: `TCP_NODELAY`, TCP keepalive,
/// the provider's connect timeout, idle connections kept 90 s (256 per host); https through
/// rustls, offering h2 and http/1.1 (plain http is HTTP/1.1). Request bodies
/// go out as one buffer. Cloning shares the pool.
#[derive(Clone)]
pub struct Upstream {
    client: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    proxies: Option<Arc<Proxies>>,
}

impl Upstream {
    pub fn new(connect: Duration) -> Result<Self, String> {
        Ok(Upstream::with_tls(connect, default_tls()?, env_proxies()))
    }

    /// The client with its own TLS settings and proxies (tests trust their own
    /// root and name their own proxy).
    fn with_tls(
        connect: Duration,
        tls: rustls::ClientConfig,
        proxies: Option<Arc<Proxies>>,
    ) -> Self {
        let http = tcp_connector(connect);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(Connect {
                http,
                proxies: proxies.clone(),
            });
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .build(https);
        Upstream { client, proxies }
    }

    /// The `Proxy-Authorization` a plain-http request to `uri` needs: the
    /// proxy that forwards it has a user and password.
    fn proxy_auth(&self, uri: &Uri) -> Option<HeaderValue> {
        let via = self.proxies.as_ref()?.intercept(uri)?;
        (uri.scheme_str() == Some("http"))
            .then(|| via.basic_auth().cloned())
            .flatten()
    }

    /// Sends a request; resolves at the response headers. A failure before
    /// them is classified by [`classify_client_error`].
    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, UpstreamError> {
        self.client
            .request(req)
            .await
            .map_err(classify_client_error)
    }

    /// A bodiless `POST` to `uri` (a token endpoint): the status and at most
    /// `max` bytes of the answer.
    pub async fn post_empty(&self, uri: &str, max: usize) -> Result<(u16, Bytes), UpstreamError> {
        let uri: Uri = uri.parse().map_err(|e: http::uri::InvalidUri| {
            UpstreamError::new(ErrorKind::Connect, format!("invalid URL: {e}"))
        })?;
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        req.headers_mut()
            .insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
        let resp = self.send(req).await?;
        let status = resp.status().as_u16();
        Ok((status, read_incoming(resp, max).await?))
    }
}

/// A provider's base URL, parsed once: every call joins only its path (and a
/// query credential) to it.
enum Base {
    Parts {
        scheme: Scheme,
        authority: Authority,
        /// The base URL's path (no trailing slash), `""` for none.
        prefix: Box<str>,
    },
    /// A base URL the fast join cannot take: every call falls back to the
    /// full URL parser (which also reports an invalid URL).
    Text(Box<str>),
}

impl Base {
    fn parse(base_url: &str) -> Base {
        let fast = base_url.parse::<Uri>().ok().and_then(|uri| {
            let p = uri.into_parts();
            let (scheme, authority) = (p.scheme?, p.authority?);
            let after = base_url.find("://")? + 3;
            let rest = &base_url[after..];
            let prefix = &rest[rest.find(['/', '?', '#']).unwrap_or(rest.len())..];
            (!prefix.contains(['?', '#'])).then(|| Base::Parts {
                scheme,
                authority,
                prefix: prefix.into(),
            })
        });
        fast.unwrap_or_else(|| Base::Text(base_url.into()))
    }

    /// The URI of `path` under the base, with `query` (a credential) appended
    /// to its query string, form-encoded.
    fn uri(&self, path: &str, query: Option<(&str, &str)>) -> Result<Uri, UpstreamError> {
        if let Base::Parts {
            scheme,
            authority,
            prefix,
        } = self
        {
            let extra = query.map_or(0, |(k, v)| k.len() + 3 * v.len() + 2);
            let mut pq = String::with_capacity(prefix.len() + path.len() + extra);
            pq.push_str(prefix);
            pq.push_str(path);
            if let Some((k, v)) = query {
                pq.push(if pq.contains('?') { '&' } else { '?' });
                form_encode(&mut pq, k);
                pq.push('=');
                form_encode(&mut pq, v);
            }
            if pq.starts_with('/') {
                if let Ok(pq) = PathAndQuery::from_maybe_shared(Bytes::from(pq)) {
                    let mut parts = http::uri::Parts::default();
                    parts.scheme = Some(scheme.clone());
                    parts.authority = Some(authority.clone());
                    parts.path_and_query = Some(pq);
                    if let Ok(uri) = Uri::from_parts(parts) {
                        return Ok(uri);
                    }
                }
            }
        }
        self.slow_uri(path, query)
    }

    /// The general join, through the URL parser: percent-encodes what a URI
    /// may not hold as it is, reports a URL that cannot be one.
    fn slow_uri(&self, path: &str, query: Option<(&str, &str)>) -> Result<Uri, UpstreamError> {
        let text = match self {
            Base::Parts {
                scheme,
                authority,
                prefix,
            } => format!("{scheme}://{authority}{prefix}{path}"),
            Base::Text(base) => format!("{base}{path}"),
        };
        let invalid = |e: String| {
            UpstreamError::new(ErrorKind::BadRequest, format!("invalid backend URL: {e}"))
        };
        let mut url = reqwest::Url::parse(&text).map_err(|e| invalid(e.to_string()))?;
        if let Some((k, v)) = query {
            url.query_pairs_mut().append_pair(k, v);
        }
        url.as_str()
            .parse::<Uri>()
            .map_err(|e| invalid(e.to_string()))
    }
}

/// Appends `s` form-urlencoded (`application/x-www-form-urlencoded`, as query
/// strings carry values): letters, digits and `*-._` as they are, a space as
/// `+`, every other byte as `%XX`.
fn form_encode(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
        }
    }
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
    base: Base,
    client: Upstream,
    /// Sent with every call: the file's headers, a static credential, the
    /// content type.
    headers: HeaderMap,
    credential: Credential,
    secret: Option<String>,
    timeouts: Timeouts,
    limits: ResponseLimits,
    codec: Arc<dyn Codec>,
    /// The last path's URI: most codecs use one path per call kind.
    last_uri: arc_swap::ArcSwapOption<(Box<str>, Uri)>,
}

impl HttpProvider {
    pub fn new(settings: HttpSettings, codec: Arc<dyn Codec>) -> Result<Self, String> {
        let client = Upstream::new(settings.timeouts.connect)?;
        Ok(Self::with_client(settings, codec, client))
    }

    fn with_client(settings: HttpSettings, codec: Arc<dyn Codec>, client: Upstream) -> Self {
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
        if !headers.contains_key(http::header::ACCEPT) {
            headers.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
        }
        let base_url = normalize_base(settings.base_url.trim_end_matches('/'), &mut headers);
        let base = Base::parse(&base_url);
        if let Some(auth) = base.uri("/", None).ok().and_then(|u| client.proxy_auth(&u)) {
            headers.insert(http::header::PROXY_AUTHORIZATION, auth);
        }
        HttpProvider {
            id: settings.id.into(),
            base,
            client,
            headers,
            credential,
            secret: settings.secret,
            timeouts: settings.timeouts,
            limits: settings.limits,
            codec,
            last_uri: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// The URI for `path`, with a query credential when there is one. Without
    /// one, the last path's URI is kept and reused instead of rebuilt.
    fn uri_for(&self, path: &str, query: Option<(&str, &str)>) -> Result<Uri, UpstreamError> {
        if query.is_some() {
            return self.base.uri(path, query);
        }
        if let Some(hit) = self.last_uri.load().as_ref().filter(|h| *h.0 == *path) {
            return Ok(hit.1.clone());
        }
        let uri = self.base.uri(path, None)?;
        self.last_uri
            .store(Some(Arc::new((path.into(), uri.clone()))));
        Ok(uri)
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

    /// The request for `path`: the provider's headers, `extra` headers, the
    /// credential (a header, or a query parameter), `body` as one buffer.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        extra: Vec<(&'static str, String)>,
    ) -> Result<Request<Full<Bytes>>, UpstreamError> {
        let dynamic = match &self.credential {
            Credential::None => None,
            Credential::Static(part) => Some(part.clone()),
            Credential::Dynamic(src) => Some(src.get(&self.client).await?),
        };
        let query = match &dynamic {
            Some(AuthPart::Query(k, v)) => Some((*k, v.as_str())),
            _ => None,
        };
        let uri = self.uri_for(path, query)?;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = self.headers.clone();
        let headers = req.headers_mut();
        for (k, v) in extra {
            let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_maybe_shared(Bytes::from(v)),
            ) else {
                return Err(UpstreamError::new(
                    ErrorKind::BadRequest,
                    format!("invalid header `{k}` for the backend"),
                ));
            };
            headers.append(k, v);
        }
        if let Some(AuthPart::Header(k, v)) = dynamic {
            headers.append(k, v);
        }
        // The attempt's `traceparent`, when tracing is on (every kind alike).
        crate::otel::outgoing_headers(headers);
        Ok(req)
    }

    /// Sends `call` and waits for response headers. Non-2xx answers are read and
    /// classified by the codec.
    async fn send(&self, call: HttpCall) -> Result<Response<Incoming>, UpstreamError> {
        self.send_body(&call.path, Bytes::from(call.body), call.headers)
            .await
    }

    async fn send_body(
        &self,
        path: &str,
        body: Bytes,
        headers: Vec<(&'static str, String)>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let req = self.request(Method::POST, path, body, headers).await?;
        let resp = match tokio::time::timeout(self.timeouts.headers, self.client.send(req)).await {
            Err(_) => {
                return Err(UpstreamError::new(
                    ErrorKind::Timeout,
                    format!(
                        "backend sent no response headers within {}",
                        humantime::format_duration(self.timeouts.headers)
                    ),
                ))
            }
            Ok(r) => r?,
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
            let body = read_incoming(resp, self.limits.max_response_bytes).await?;
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

/// The base URL as the URL parser writes it (host names in their ASCII form,
/// what a URI may not hold percent-encoded), with any user and password moved
/// into a basic `Authorization` header (unless the file sets one). A URL the
/// parser refuses is kept as it is: every call then reports it.
fn normalize_base(base_url: &str, headers: &mut HeaderMap) -> String {
    let Ok(mut url) = reqwest::Url::parse(base_url) else {
        return base_url.to_owned();
    };
    if !url.username().is_empty() || url.password().is_some() {
        use base64::Engine;
        let pair = format!("{}:{}", url.username(), url.password().unwrap_or(""));
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        );
        if let Ok(mut v) = HeaderValue::from_str(&value) {
            v.set_sensitive(true);
            headers.entry(http::header::AUTHORIZATION).or_insert(v);
        }
        let _ = url.set_username("");
        let _ = url.set_password(None);
    }
    url.as_str().trim_end_matches('/').to_owned()
}

impl Provider for HttpProvider {
    fn health(&self) -> Option<BoxFuture<'_, Result<(), UpstreamError>>> {
        let path = self.codec.health_path()?.to_owned();
        let limit = self.timeouts.health;
        let check = async move {
            let req = self
                .request(Method::GET, &path, Bytes::new(), Vec::new())
                .await
                .map_err(|e| self.own(e))?;
            let resp = self.client.send(req).await.map_err(|e| self.own(e))?;
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
                    read_incoming(resp, self.limits.max_response_bytes),
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
                    read_incoming(resp, self.limits.max_response_bytes),
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
    resp: Response<Incoming>,
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
        let mut body = resp.into_body();
        let mut received: usize = 0;
        loop {
            let wait_until = deadline_after(limits.idle).min(limits.deadline);
            let next = match tokio::time::timeout_at(wait_until, next_chunk(&mut body)).await {
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
                    yield Err(own(body_error(&e, "backend stream was cut")));
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
/// stream or line past the provider's [`ResponseLimits`]. The bytes come from
/// [`byte_stream`] (timeouts, cut and size bound), as the fast path's do.
fn event_stream(
    resp: Response<Incoming>,
    mut decoder: Box<dyn StreamDecoder>,
    framing: crate::framing::Framing,
    limits: StreamLimits,
    provider: Arc<str>,
    secret: Option<String>,
) -> EventStream {
    let max_line = limits.sizes.max_line_bytes;
    let mut body = byte_stream(resp, limits, provider.clone(), secret.clone());
    let own = move |e: UpstreamError| {
        let mut e = e.redact(secret.as_deref());
        e.provider = provider.to_string();
        e
    };
    Box::pin(async_stream::stream! {
        let mut frames = FrameDecoder::with_max_line(framing, max_line);
        let mut events = Vec::with_capacity(8);
        loop {
            let bytes = match body.next().await {
                None => {
                    let mut result = Ok(());
                    if let Some(f) = frames.finish() {
                        result = decoder.frame(f, &mut events);
                    } else if frames.overflowed() {
                        result = Err(too_large("stream line or event", max_line));
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
                // Already the provider's own error (stall, cut, overflow).
                Some(Err(e)) => {
                    yield Err(e);
                    return;
                }
                Some(Ok(b)) => b,
            };
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
                yield Err(own(too_large("stream line or event", max_line)));
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

/// Classifies a failure of the reqwest client (remote retrievers).
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
    UpstreamError::new(kind, error_chain(&e))
}

/// An error and its sources, `: `-separated. None of the hyper client's errors
/// carries the URL (some backends take credentials in the query string).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Whether a timeout (a connect timeout, an OS-level one) caused `e`.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut src = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        if s.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        src = s.source();
    }
    false
}

/// Classifies a failure of a provider call before its response headers (no
/// HTTP answer to classify): a timeout (connecting included) is `timeout`,
/// everything else (refused, reset, closed, not HTTP) is `connect`.
pub fn classify_client_error(e: hyper_util::client::legacy::Error) -> UpstreamError {
    let kind = if timed_out(&e) {
        ErrorKind::Timeout
    } else {
        ErrorKind::Connect
    };
    UpstreamError::new(kind, error_chain(&e))
}

/// A failure while reading an answer's body: the connection broke off
/// mid-answer (`malformed_response`, "`what`: ...").
fn body_error(e: &hyper::Error, what: &str) -> UpstreamError {
    if timed_out(e) {
        return UpstreamError::new(ErrorKind::Timeout, format!("{what}: {}", error_chain(e)));
    }
    UpstreamError::new(
        ErrorKind::MalformedResponse,
        format!("{what}: {}", error_chain(e)),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::auth::TokenSource;
    use crate::backend::openai::{OpenAiCodec, Quirks};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Mutex;

    const TLS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{TLS_DIR}/{name}")).unwrap()
    }

    fn settings(base_url: String, credential: Credential, secret: Option<&str>) -> HttpSettings {
        HttpSettings {
            id: "p".into(),
            base_url,
            credential,
            secret: secret.map(str::to_owned),
            headers: HeaderMap::new(),
            timeouts: Timeouts::default(),
            limits: ResponseLimits::default(),
        }
    }

    /// What the test upstream saw of one request.
    #[derive(Debug, Clone)]
    struct Seen {
        version: http::Version,
        target: String,
        /// The request target as it came (absolute form through a proxy).
        uri: String,
        proxy_authorization: Option<String>,
        authorization: Option<String>,
        body: Bytes,
    }

    const ANSWER: &str = r#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
    const STREAM: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}]}\n\ndata: [DONE]\n\n";

    /// An upstream on 127.0.0.1 that records each request and answers a chat
    /// completion (an event stream when the body asks for one); with `tls`,
    /// behind the test certificate, offering the given ALPN protocols.
    async fn upstream(tls: Option<Vec<Vec<u8>>>) -> (std::net::SocketAddr, Arc<Mutex<Vec<Seen>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let acceptor = tls.map(|alpn| {
            let certs = CertificateDer::pem_slice_iter(&fixture("server.pem"))
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(&fixture("server.key")).unwrap();
            let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
            cfg.alpn_protocols = alpn;
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        });
        let log = seen.clone();
        crate::task::spawn("test-upstream", async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let log = log.clone();
                let acceptor = acceptor.clone();
                crate::task::spawn("test-upstream-conn", async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move {
                            let version = req.version();
                            let target = req.uri().path_and_query().unwrap().to_string();
                            let uri = req.uri().to_string();
                            let proxy_authorization = req
                                .headers()
                                .get(http::header::PROXY_AUTHORIZATION)
                                .map(|v| v.to_str().unwrap().to_owned());
                            let authorization = req
                                .headers()
                                .get(http::header::AUTHORIZATION)
                                .map(|v| v.to_str().unwrap().to_owned());
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let stream = body.windows(13).any(|w| w == b"\"stream\":true");
                            log.lock().unwrap().push(Seen {
                                version,
                                target,
                                uri,
                                proxy_authorization,
                                authorization,
                                body,
                            });
                            let (ct, text) = if stream {
                                ("text/event-stream", STREAM)
                            } else {
                                ("application/json", ANSWER)
                            };
                            let mut resp =
                                Response::new(Full::new(Bytes::from_static(text.as_bytes())));
                            resp.headers_mut()
                                .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let io = match acceptor {
                        Some(a) => {
                            let tls = a.accept(tcp).await.unwrap();
                            server
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await
                        }
                        None => {
                            server
                                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                                .await
                        }
                    };
                    drop(io);
                });
            }
        });
        (addr, seen)
    }

    /// TLS settings that trust the test certificate authority alone.
    fn test_tls() -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&fixture("ca.pem")) {
            roots.add(ca.unwrap()).unwrap();
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
    }

    /// A client that trusts the test certificate authority alone, no proxy.
    fn test_client() -> Upstream {
        Upstream::with_tls(Duration::from_secs(5), test_tls(), None)
    }

    fn chat_request(stream: bool) -> ChatRequest {
        crate::backend::openai::decode_chat_request(
            format!(
                r#"{{"model":"r","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn openai(base_url: String, credential: Credential, client: Upstream) -> HttpProvider {
        HttpProvider::with_client(
            settings(base_url, credential, Some("sk-test-secret")),
            Arc::new(OpenAiCodec::new(Quirks::default())),
            client,
        )
    }

    /// An https provider: rustls with ALPN; h2 when the upstream offers it,
    /// HTTP/1.1 when it offers only that; the base URL's path prefix kept; the
    /// static credential sent; whole answers, event streams and forwarded bodies.
    #[tokio::test]
    async fn https_providers_negotiate_h2_or_http1_over_rustls() {
        for (alpn, version) in [
            (
                vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                http::Version::HTTP_2,
            ),
            (vec![b"http/1.1".to_vec()], http::Version::HTTP_11),
        ] {
            let (addr, seen) = upstream(Some(alpn)).await;
            let cred = Credential::header(http::header::AUTHORIZATION, "Bearer sk-test-secret");
            let p = openai(
                format!("https://localhost:{}/prefix/v1/", addr.port()),
                cred.unwrap(),
                test_client(),
            );
            let resp = p.chat(&chat_request(false), "m").await.unwrap();
            assert_eq!(
                resp.choices[0].message.content.as_ref().unwrap().text(),
                "hello"
            );
            let mut events = p.chat_stream(&chat_request(true), "m").await.unwrap();
            let mut n = 0;
            while let Some(ev) = events.next().await {
                ev.unwrap();
                n += 1;
            }
            assert!(n >= 2, "stream events: {n}");
            let body = Bytes::from_static(br#"{"model":"m","stream":true,"messages":[]}"#);
            let Some(RawAnswer::Stream(mut bytes)) = p
                .forward(RawCall {
                    body: body.clone(),
                    stream: true,
                })
                .unwrap()
                .await
                .ok()
            else {
                panic!("a forwarded stream is a stream");
            };
            let mut got = Vec::new();
            while let Some(b) = bytes.next().await {
                got.extend_from_slice(&b.unwrap());
            }
            assert_eq!(got, STREAM.as_bytes());
            let seen = seen.lock().unwrap().clone();
            assert_eq!(seen.len(), 3);
            for s in &seen {
                assert_eq!(s.version, version);
                assert_eq!(s.target, "/prefix/v1/chat/completions");
                assert_eq!(s.authorization.as_deref(), Some("Bearer sk-test-secret"));
            }
            assert_eq!(seen[2].body, body, "a forwarded body goes out as it is");
        }
    }

    /// A certificate no root vouches for is a `connect` failure, named as such.
    #[tokio::test]
    async fn an_untrusted_certificate_is_a_connect_error() {
        let (addr, seen) = upstream(Some(vec![b"http/1.1".to_vec()])).await;
        let p = openai(
            format!("https://localhost:{}/v1", addr.port()),
            Credential::None,
            Upstream::new(Duration::from_secs(5)).unwrap(),
        );
        let e = p.chat(&chat_request(false), "m").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Connect, "{e:?}");
        assert!(
            e.message.to_lowercase().contains("certificate"),
            "{}",
            e.message
        );
        assert!(seen.lock().unwrap().is_empty());
    }

    /// A `CONNECT` proxy on 127.0.0.1 that records each request head and
    /// tunnels to where it asks.
    async fn connect_proxy() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let log = heads.clone();
        crate::task::spawn("test-proxy", async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let log = log.clone();
                crate::task::spawn("test-proxy-conn", async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let mut b = [0u8; 1];
                        if tcp.read(&mut b).await.unwrap() == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let head = String::from_utf8(head).unwrap();
                    let dst = head.split(' ').nth(1).unwrap().to_owned();
                    log.lock().unwrap().push(head);
                    let port = dst.rsplit(':').next().unwrap();
                    let mut up = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
                        .await
                        .unwrap();
                    tcp.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
                });
            }
        });
        (addr, heads)
    }

    fn proxies(http: Option<String>, https: Option<String>) -> Option<Arc<Proxies>> {
        let mut b = Proxies::builder();
        if let Some(h) = http {
            b = b.http(h);
        }
        if let Some(h) = https {
            b = b.https(h);
        }
        Some(Arc::new(b.build()))
    }

    /// Through a proxy the environment names: https through a `CONNECT`
    /// tunnel (TLS end to end, the proxy's credentials on the `CONNECT`),
    /// plain http as absolute-form requests to the proxy, its credentials in
    /// `Proxy-Authorization`.
    #[tokio::test]
    async fn providers_reach_their_upstream_through_an_environment_proxy() {
        let (up, seen) = upstream(Some(vec![b"h2".to_vec()])).await;
        let (proxy, heads) = connect_proxy().await;
        let client = Upstream::with_tls(
            Duration::from_secs(5),
            test_tls(),
            proxies(None, Some(format!("http://u:pw@{proxy}"))),
        );
        let p = openai(
            format!("https://localhost:{}/v1", up.port()),
            Credential::None,
            client,
        );
        p.chat(&chat_request(false), "m").await.unwrap();
        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 1, "{heads:?}");
        assert!(
            heads[0].starts_with(&format!("CONNECT localhost:{} HTTP/1.1\r\n", up.port())),
            "{}",
            heads[0]
        );
        assert!(
            heads[0]
                .to_ascii_lowercase()
                .contains("proxy-authorization: basic dtpwdw=="),
            "{}",
            heads[0]
        );
        let s = seen.lock().unwrap().clone();
        assert_eq!(s[0].version, http::Version::HTTP_2);
        assert_eq!(
            s[0].proxy_authorization, None,
            "credentials stay with the proxy"
        );

        // Plain http: the "proxy" is the test upstream itself, which sees the
        // absolute-form target of a host it never had to resolve.
        let (up, seen) = upstream(None).await;
        let client = Upstream::with_tls(
            Duration::from_secs(5),
            default_tls().unwrap(),
            proxies(Some(format!("http://u:pw@{up}")), None),
        );
        let p = openai(
            "http://upstream.invalid:9/v1".into(),
            Credential::None,
            client,
        );
        p.chat(&chat_request(false), "m").await.unwrap();
        let s = seen.lock().unwrap().clone();
        assert_eq!(s[0].uri, "http://upstream.invalid:9/v1/chat/completions");
        assert_eq!(s[0].proxy_authorization.as_deref(), Some("Basic dTpwdw=="));
    }

    /// Provider sockets: no Nagle delay, TCP keepalive, a user timeout.
    #[tokio::test]
    async fn provider_sockets_have_nodelay_and_keepalive() {
        use tower::Service;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connect = Connect {
            http: tcp_connector(Duration::from_secs(5)),
            proxies: None,
        };
        let conn = connect
            .call(format!("http://{addr}/").parse().unwrap())
            .await
            .unwrap();
        let sock = socket2::SockRef::from(conn.io.inner());
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(TCP_USER_TIMEOUT));
    }

    /// A token that travels in the query string.
    struct QueryToken(&'static str);

    impl TokenSource for QueryToken {
        fn get<'a>(&'a self, _: &'a Upstream) -> BoxFuture<'a, Result<AuthPart, UpstreamError>> {
            Box::pin(async move { Ok(AuthPart::Query("access_token", self.0.to_owned())) })
        }
    }

    /// A query credential is appended to the path's own query, form-encoded,
    /// under the base URL's path prefix.
    #[tokio::test]
    async fn a_query_credential_joins_the_path_under_the_prefix() {
        let (addr, seen) = upstream(None).await;
        let p = HttpProvider::with_client(
            settings(
                format!("http://127.0.0.1:{}/rpc/2.0/x/", addr.port()),
                Credential::Dynamic(Box::new(QueryToken("t k&n=1/é"))),
                None,
            ),
            Arc::new(OpenAiCodec::new(Quirks {
                chat_path: "/chat/completions?api-version=1".into(),
                ..Quirks::default()
            })),
            test_client(),
        );
        p.chat(&chat_request(false), "m").await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen[0].target,
            "/rpc/2.0/x/chat/completions?api-version=1&access_token=t+k%26n%3D1%2F%C3%A9"
        );
        assert_eq!(seen[0].version, http::Version::HTTP_11);
    }

    /// A failure's text names neither the URL nor the credential, even when
    /// the credential is in the query string.
    #[tokio::test]
    async fn errors_never_carry_the_url_or_the_credential() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let p = HttpProvider::with_client(
            settings(
                format!("http://127.0.0.1:{port}/v1"),
                Credential::Dynamic(Box::new(QueryToken("tok-sekrit"))),
                Some("tok-sekrit"),
            ),
            Arc::new(OpenAiCodec::new(Quirks::default())),
            test_client(),
        );
        let e = p.chat(&chat_request(false), "m").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Connect, "{e:?}");
        assert_eq!(e.provider, "p");
        for leak in ["tok-sekrit", "access_token", "127.0.0.1", "/v1"] {
            assert!(!e.message.contains(leak), "{leak} in {}", e.message);
        }
    }

    #[test]
    fn base_urls_are_parsed_once_and_joined_per_call() {
        let base = Base::parse("http://h:8080/p/v1");
        assert!(matches!(base, Base::Parts { .. }));
        let uri = base.uri(
            "/models/g:streamGenerateContent?alt=sse",
            Some(("key", "a b")),
        );
        assert_eq!(
            uri.unwrap().to_string(),
            "http://h:8080/p/v1/models/g:streamGenerateContent?alt=sse&key=a+b"
        );
        assert_eq!(
            Base::parse("https://h")
                .uri("/x", None)
                .unwrap()
                .to_string(),
            "https://h/x"
        );
        // What a URI cannot hold as it is goes through the URL parser.
        assert_eq!(
            base.uri("/models/a b", None).unwrap().to_string(),
            "http://h:8080/p/v1/models/a%20b"
        );
        // An invalid base URL is reported by every call, not at build.
        let bad = Base::parse("http://[::1");
        let e = bad.uri("/x", None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(
            e.message.starts_with("invalid backend URL"),
            "{}",
            e.message
        );
    }

    #[test]
    fn base_urls_are_normalized_and_lose_their_user_info() {
        let mut headers = HeaderMap::new();
        let base = normalize_base("https://user:pa%20ss@Bücher.example/v1", &mut headers);
        assert_eq!(base, "https://xn--bcher-kva.example/v1");
        use base64::Engine;
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("user:pa%20ss")
        );
        assert_eq!(headers[http::header::AUTHORIZATION], want.as_str());
        assert!(headers[http::header::AUTHORIZATION].is_sensitive());
        let mut headers = HeaderMap::new();
        assert_eq!(normalize_base("http://h:9/", &mut headers), "http://h:9");
        assert!(headers.is_empty());
    }
}
