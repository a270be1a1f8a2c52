//! The HTTP edge: the axum router, the tower layers for cross-cutting concerns
//! (request id and timing, catch-panic, load shedding, body limit, trace), and the
//! OpenAI-dialect handlers. This is the only place a [`GatewayError`] becomes an
//! HTTP response, and the only place that knows the client's dialect.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use http::{HeaderName, HeaderValue, StatusCode};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::ServiceBuilder;

use crate::backend::openai::{self as wire, OpenAi};
use crate::canonical::{ChatRequest, EmbeddingEncoding};
use crate::dialect::Dialect;
use crate::error::GatewayError;
use crate::error::{ErrorKind, UpstreamError};
use crate::ids::ProviderId;
use crate::pipeline::forward::{Raw, Reply};
use crate::pipeline::retrieve::RetrievalRef;
use crate::pipeline::{render, ChatOutcome, ClientDialect, Gateway, RequestContext, Served};
use crate::prompt::PromptRef;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The gateway's own processing time for the request, in microseconds: everything
/// except waiting on the backend.
pub const OVERHEAD: HeaderName = HeaderName::from_static("x-promptgate-overhead-us");
pub const ROUTE: HeaderName = HeaderName::from_static("x-promptgate-route");
pub const PROVIDER: HeaderName = HeaderName::from_static("x-promptgate-provider");
/// `reported` or `estimated` (counted by the gateway's tokenizer).
pub const USAGE: HeaderName = HeaderName::from_static("x-promptgate-usage");
/// The prompt id and version a response was rendered from.
pub const PROMPT: HeaderName = HeaderName::from_static("x-promptgate-prompt");
pub const PROMPT_VERSION: HeaderName = HeaderName::from_static("x-promptgate-prompt-version");

/// Settings fixed for the life of the listener.
#[derive(Clone)]
pub struct ServerSettings {
    pub max_body_bytes: usize,
    pub max_concurrency: usize,
    pub request_timeout: Duration,
    /// Longest silence while a client sends its request body.
    pub idle_timeout: Duration,
    /// Longest the whole request body may take to arrive.
    pub body_read_timeout: Duration,
    /// Whether "unknown model" and "unknown prompt" errors list the configured ids.
    pub list_ids_in_errors: bool,
}

#[derive(Clone)]
struct AppState {
    gw: Arc<Gateway>,
    settings: ServerSettings,
    /// Requests being served, bodies included (`max_concurrency`).
    permits: Arc<tokio::sync::Semaphore>,
}

tokio::task_local! {
    /// The serving listener's `list_ids_in_errors`, for [`error_response`].
    static LIST_IDS: bool;
}

/// A client- or backend-supplied text made safe for a log line: control
/// characters (newlines above all) are escaped, so no input can forge a line.
pub struct LogSafe<T>(pub T);

impl<T: std::fmt::Display> std::fmt::Display for LogSafe<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        struct Escaping<'a, 'b>(&'a mut std::fmt::Formatter<'b>);
        impl std::fmt::Write for Escaping<'_, '_> {
            fn write_str(&mut self, s: &str) -> std::fmt::Result {
                for part in s.split_inclusive(char::is_control) {
                    match part.char_indices().last() {
                        Some((i, c)) if c.is_control() => {
                            self.0.write_str(&part[..i])?;
                            write!(self.0, "{}", c.escape_default())?;
                        }
                        _ => self.0.write_str(part)?,
                    }
                }
                Ok(())
            }
        }
        std::fmt::write(&mut Escaping(f), format_args!("{}", self.0))
    }
}

/// Held for a request's whole life, body included: a concurrency permit and
/// the in-flight gauge.
struct InFlight {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A response body that keeps `guard` until it ends or is dropped.
struct Guarded<G> {
    inner: Body,
    guard: Option<G>,
}

impl<G: Send + Unpin + 'static> hyper::body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = axum::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let out = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(out, std::task::Poll::Ready(None)) {
            this.guard = None;
        }
        out
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn guard_body<G: Send + Unpin + 'static>(resp: Response, guard: G) -> Response {
    resp.map(|inner| {
        Body::new(Guarded {
            inner,
            guard: Some(guard),
        })
    })
}

/// The request's id, set by the edge layer (or generated here if a handler runs
/// without it, e.g. in a unit test).
#[derive(Clone)]
pub struct RequestId(pub Arc<str>);

/// What the edge layer knows of a request when a handler runs: its id and when
/// it arrived.
#[derive(Clone)]
struct Edge {
    id: RequestId,
    start: Instant,
    /// Who sent it: the gateway key's id and entry, when the key is configured.
    caller: Option<crate::governance::Caller>,
}

impl<S: Send + Sync> FromRequestParts<S> for Edge {
    type Rejection = Infallible;
    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Edge>()
            .cloned()
            .unwrap_or_else(|| Edge {
                id: RequestId(new_request_id()),
                start: Instant::now(),
                caller: None,
            }))
    }
}

/// A handler's response and what it tells about it, for headers and metrics:
/// [`finish`] records it.
struct Handled {
    response: Response,
    outcome: Option<Outcome>,
}

/// What a handler tells about its response, for headers and metrics.
#[derive(Clone)]
struct Outcome {
    prompt: Option<crate::pipeline::PromptUse>,
    route: Option<Arc<crate::snapshot::Route>>,
    /// The provider that answered.
    provider: Option<ProviderId>,
    arm: Option<(Arc<str>, Arc<crate::health::ArmStats>)>,
    upstream: Duration,
    error: Option<&'static str>,
    /// Streams record their own duration when they end.
    streaming: bool,
    /// The request's governance ticket: the response body holds it to its end.
    ticket: Option<Arc<crate::governance::Ticket>>,
    /// For the audit log: the target that answered, the attempts made, the
    /// cache's part (`hit`, `miss`, …).
    target: Option<Arc<crate::snapshot::Target>>,
    attempts: u32,
    cache: Option<&'static str>,
}

/// `pg-` and 20 hex digits: a random per-process prefix (8) and a counter (12).
/// Written on the stack; the one allocation is the id's `Arc<str>`.
fn new_request_id() -> Arc<str> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let prefix = u64::from(*PREFIX.get_or_init(rand::random));
    let n = NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff_ffff;
    let mut out = *b"pg-00000000000000000000";
    for (i, slot) in out[3..11].iter_mut().enumerate() {
        *slot = HEX[((prefix >> (28 - 4 * i)) & 0xf) as usize];
    }
    for (i, slot) in out[11..].iter_mut().enumerate() {
        *slot = HEX[((n >> (44 - 4 * i)) & 0xf) as usize];
    }
    // Only ASCII hex digits were written.
    Arc::from(std::str::from_utf8(&out).unwrap_or("pg-0"))
}

fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// Outermost layer: request id, timing header, request metrics.
async fn edge(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id: Arc<str> = match req
        .headers()
        .get(REQUEST_ID)
        .filter(|v| valid_request_id(v))
    {
        Some(v) => String::from_utf8_lossy(v.as_bytes()).into(),
        None => new_request_id(),
    };
    let anthropic = req.uri().path() == "/v1/messages";
    let http1 = req.version() < http::Version::HTTP_2;
    // Every API call is authenticated here, once: the caller travels in `Edge`.
    let (caller, refused) = if req.uri().path().starts_with("/v1/") {
        match app.gw.snapshot().access.authenticate(req.headers()) {
            Ok(c) => (c, None),
            Err(e) => {
                app.gw.metrics.gov.auth_failure(e.code());
                (None, Some(e))
            }
        }
    } else {
        (None, None)
    };
    let edge = Edge {
        id: RequestId(id.clone()),
        start,
        caller,
    };
    req.extensions_mut().insert(edge.clone());
    let metrics = &app.gw.metrics;
    // The connection's request count, from the listener: it goes into the
    // same body wrapper as the permit.
    let busy = req.extensions_mut().remove::<Busy>();
    // Health checks and scrapes hold no backend and must answer at the
    // concurrency limit too.
    let exempt = matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
    let in_flight = if exempt {
        None
    } else {
        let Ok(permit) = app.permits.clone().try_acquire_owned() else {
            return overloaded(&id);
        };
        metrics.in_flight.inc();
        Some(InFlight {
            _permit: permit,
            gauge: metrics.in_flight.clone(),
        })
    };
    let mut resp = match refused {
        Some(e) => {
            let d: &dyn Dialect = if anthropic {
                &crate::backend::anthropic::Anthropic
            } else {
                &OpenAi
            };
            finish(&app, &edge, error_response(d, e, &edge.id, None))
        }
        None if crate::otel::request_spans() => {
            use tracing::Instrument;
            let span = tracing::info_span!("request", request_id = %id);
            LIST_IDS
                .scope(app.settings.list_ids_in_errors, next.run(req))
                .instrument(span)
                .await
        }
        None => {
            LIST_IDS
                .scope(app.settings.list_ids_in_errors, next.run(req))
                .await
        }
    };
    if resp.extensions().get::<Panicked>().is_some() {
        resp = panic_body(&id, anthropic);
    }
    // The permit, the gauge and the connection's count stay taken until the
    // body (a stream, too) ends. One wrapper for all.
    if in_flight.is_some() || busy.is_some() {
        resp = guard_body(resp, (in_flight, busy));
    }
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert(REQUEST_ID, v);
    }
    // While a shutdown's drain delay runs, HTTP/1 clients are told to close
    // their connection after the answer (one that was running when the
    // signal came, too): their next request opens a new one, which the load
    // balancer no longer sends here.
    if http1 && app.gw.readiness.draining() {
        h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    // Set by `finish` for the API handlers; everything else is all overhead.
    if !h.contains_key(OVERHEAD) {
        h.insert(
            OVERHEAD,
            HeaderValue::from(start.elapsed().as_micros() as u64),
        );
    }
    resp
}

/// Records what a handler tells about its response (the metrics of the request,
/// the arm's figures) and sets the overhead header: one place for every API
/// response.
fn finish(app: &AppState, edge: &Edge, handled: Handled) -> Response {
    let Handled {
        mut response,
        outcome,
    } = handled;
    let elapsed = edge.start.elapsed();
    let upstream = outcome.as_ref().map(|o| o.upstream).unwrap_or_default();
    let overhead = elapsed.saturating_sub(upstream);
    response
        .headers_mut()
        .insert(OVERHEAD, HeaderValue::from(overhead.as_micros() as u64));
    if let Some(o) = outcome {
        let status = response.status();
        let route_name = o.route.as_deref().map_or("", |r| r.name.as_str());
        let gov = &app.gw.metrics.gov;
        if let Some(c) = &edge.caller {
            gov.key_request(&c.id, route_name, status.as_u16());
        }
        match &o.ticket {
            Some(t) => {
                // A replayed stream (a cache hit) is a stream too.
                let sse = response
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
                t.note(|l| {
                    l.status = status.as_u16();
                    l.error = o.error;
                    l.streaming = o.streaming || sse;
                    l.arrived = Some(edge.start.into_std());
                    l.attempts = o.attempts;
                    l.cache = o.cache;
                    // A cache hit settles nothing: the target it replays.
                    if l.target.is_none() {
                        l.target = o.target.clone();
                    }
                });
                for (name, value) in &t.held.headers {
                    if let Ok(v) = HeaderValue::from_str(value) {
                        response.headers_mut().insert(*name, v);
                    }
                }
                if let Some(cost) = t.cost() {
                    if let Ok(v) =
                        HeaderValue::from_str(&crate::governance::spend::format_cost(cost))
                    {
                        response.headers_mut().insert(COST, v);
                    }
                }
                // The ticket ends with the response body (a stream's last byte).
                response = guard_body(response, t.clone());
            }
            None => app.gw.governor.audit.rejected(
                edge.caller.as_ref(),
                o.route.as_ref().map(|r| &r.name),
                &edge.id.0,
                status.as_u16(),
                o.error,
                elapsed,
            ),
        }
        app.gw.metrics.request(&crate::metrics::RequestEnd {
            route: o
                .route
                .as_deref()
                .map(|r| (&r.name, r.metrics(&app.gw.metrics))),
            provider: o.provider.as_ref(),
            status: status.as_u16(),
            error: o.error,
            prompt: o.prompt.as_ref().map(|p| (p.id.as_str(), p.version)),
            arm: o.arm.as_ref().map(|(a, _)| &**a),
            overhead,
            // Streams record their own duration when they end.
            whole: (!o.streaming).then_some(elapsed),
        });
        // A whole answer's tokens and cost were added to its arm where the
        // pipeline counted them; streams record their own end.
        if let Some((_, stats)) = &o.arm {
            if !o.streaming {
                stats.record(status.is_success(), elapsed);
            }
        }
    }
    response
}

/// The error response of a request the pipeline failed, placed by `ctx`: it
/// counts for the request's route and, on a split, for its A/B arm (the
/// experiment's error rate sees failures that never produced a response).
fn pipeline_error(d: &dyn Dialect, err: GatewayError, ctx: &RequestContext) -> Handled {
    let id = RequestId(ctx.request_id.clone());
    let mut handled = error_response(d, err, &id, Some(ctx.route().clone()));
    if let Some(o) = handled.outcome.as_mut() {
        if let Some(a) = ctx.arm() {
            o.arm = Some((a.name.clone(), a.stats.clone()));
        }
        o.ticket = ctx.ticket.clone();
    }
    handled
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The error response for `err` in the client's dialect, logged once here.
fn error_response(
    dialect: &dyn Dialect,
    err: GatewayError,
    id: &RequestId,
    route: Option<Arc<crate::snapshot::Route>>,
) -> Handled {
    let status =
        StatusCode::from_u16(dialect.error_status(&err)).unwrap_or(StatusCode::BAD_GATEWAY);
    let list_ids = LIST_IDS.try_with(|l| *l).unwrap_or(true);
    let err = if list_ids { err } else { unlisted(err) };
    if status.is_server_error() {
        tracing::warn!(request_id = %id.0, status = status.as_u16(), code = err.code(), error = %LogSafe(&err), "request failed");
    } else {
        tracing::info!(request_id = %id.0, status = status.as_u16(), code = err.code(), error = %LogSafe(&err), "request rejected");
    }
    let mut body = dialect.error_body(&err, &id.0);
    if let GatewayError::Upstream(e) = &err {
        if !e.attempts.is_empty() {
            body = with_attempts(body, &e.attempts, list_ids);
        }
    }
    let mut resp = json_response(status, body);
    if matches!(
        err,
        GatewayError::PayloadTooLarge { .. } | GatewayError::BodyTimeout { .. }
    ) {
        // The body was not read whole: the connection cannot carry another
        // request, and a client must not put it back in its pool.
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let GatewayError::Upstream(e) = &err {
        if let Some(ra) = e.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(ra.as_secs()));
        }
    }
    if let GatewayError::Limited {
        retry_after,
        headers,
        ..
    } = &err
    {
        let h = resp.headers_mut();
        if let Some(ra) = retry_after {
            // Whole seconds, rounded up: a client that waits this long is admitted.
            let secs = ra.as_secs() + u64::from(ra.subsec_nanos() > 0);
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        for (name, value) in headers {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(*name, v);
            }
        }
    }

    let provider = match &err {
        GatewayError::Upstream(e) if !e.provider.is_empty() => {
            Some(ProviderId::from(e.provider.as_str()))
        }
        _ => None,
    };
    let attempts = match &err {
        GatewayError::Upstream(e) => u32::try_from(e.attempts.len()).unwrap_or(u32::MAX),
        _ => 0,
    };
    Handled {
        response: resp,
        outcome: Some(Outcome {
            prompt: None,
            route,
            provider,
            arm: None,
            upstream: Duration::ZERO,
            error: Some(err.code()),
            streaming: false,
            ticket: None,
            target: None,
            attempts,
            cache: None,
        }),
    }
}

/// An error body (either dialect: both keep the details in an `error` object)
/// with the route's attempts added to that object:
/// `attempts: [{target, kind, status, elapsed_ms}, …]`, in order; without
/// `target` when configured ids are not listed.
fn with_attempts(body: Vec<u8>, attempts: &[crate::error::Attempt], list_ids: bool) -> Vec<u8> {
    use serde_json::{json, Value};
    let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
        return body;
    };
    let Some(obj) = v.get_mut("error").and_then(Value::as_object_mut) else {
        return body;
    };
    let list: Vec<Value> = attempts
        .iter()
        .map(|a| {
            let mut m = json!({
                "kind": a.kind.as_str(),
                "status": a.status,
                "elapsed_ms": a.elapsed_ms,
            });
            if list_ids {
                m["target"] = Value::from(&*a.target);
            }
            m
        })
        .collect();
    obj.insert("attempts".into(), Value::Array(list));
    serde_json::to_vec(&v).unwrap_or(body)
}

/// `err` without the configured ids it lists (routes, prompts, labels), for
/// deployments whose port is reachable by anyone.
fn unlisted(err: GatewayError) -> GatewayError {
    match err {
        GatewayError::UnknownModel { model, .. } => GatewayError::UnknownModel {
            model,
            available: "not listed".into(),
        },
        GatewayError::NotFoundPrompt { message } => GatewayError::NotFoundPrompt {
            // The lists follow the first clause: "prompt `x` does not exist; prompts: …".
            message: message
                .split_once("; ")
                .map_or(message.as_str(), |(head, _)| head)
                .to_owned(),
        },
        // Which provider, why (an environment variable's name, a file) and
        // which targets were skipped stay in the log; the client learns the
        // kind of failure only.
        GatewayError::ProviderUnavailable { public, .. } => GatewayError::ProviderUnavailable {
            provider: String::new(),
            reason: public.into(),
            public,
        },
        // The earlier attempts, by position instead of by target id.
        GatewayError::Upstream(mut e) if e.attempts.len() > 1 => {
            if let Some(at) = e.message.rfind(crate::error::EARLIER_ATTEMPTS) {
                let earlier: Vec<String> = e.attempts[..e.attempts.len() - 1]
                    .iter()
                    .enumerate()
                    .map(|(i, a)| format!("attempt {}: {}", i + 1, a.kind.as_str()))
                    .collect();
                e.message.truncate(at);
                e.message.push_str(crate::error::EARLIER_ATTEMPTS);
                e.message.push_str(&earlier.join(", "));
                e.message.push(')');
            }
            GatewayError::Upstream(e)
        }
        GatewayError::NoTarget { route, public, .. } => GatewayError::NoTarget {
            route,
            reason: public.clone(),
            public,
        },
        other => other,
    }
}

/// A request body read under the size limit. A too-large body becomes a 413 in
/// the client's dialect (the handler knows which), not the framework's plain text.
struct LimitedBody(Result<Bytes, GatewayError>);

/// The body's frames as one buffer; `total` is their length, already bounded by
/// the body limit (it counts bytes that arrived, not a declared length).
fn join_frames(mut frames: Vec<Bytes>, total: usize) -> Bytes {
    if frames.len() <= 1 {
        return frames.pop().unwrap_or_default();
    }
    let mut buf = bytes::BytesMut::with_capacity(total);
    for f in &frames {
        buf.extend_from_slice(f);
    }
    buf.freeze()
}

impl FromRequest<AppState> for LimitedBody {
    type Rejection = Infallible;
    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        // Frame by frame, each within the idle timeout, all within the body
        // read timeout: a client that stops, or drips its body a byte at a
        // time, holds a connection for that long at most.
        use http_body_util::BodyExt;
        let limit = state.settings.max_body_bytes;
        let idle = state.settings.idle_timeout;
        let whole = state.settings.body_read_timeout;
        let started = Instant::now();
        // A declared length over the limit is refused before reading a byte.
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Ok(LimitedBody(Err(GatewayError::PayloadTooLarge { limit })));
        }
        let mut body = http_body_util::Limited::new(req.into_body(), limit);
        // The frames as they arrive, joined once at the end into a buffer of the
        // exact size (or taken as they are when there is one): growing a buffer
        // frame by frame copied a large body about twice over and faulted in
        // fresh pages at each doubling.
        let mut frames: Vec<Bytes> = Vec::new();
        let mut total = 0usize;
        loop {
            // A frame already received (the usual small body arrives with its
            // head) is taken without arming a timer.
            let ready = futures_util::FutureExt::now_or_never(body.frame());
            let next = match ready {
                Some(frame) => Ok(frame),
                None => {
                    let left = whole.saturating_sub(started.elapsed());
                    tokio::time::timeout(idle.min(left), body.frame())
                        .await
                        .map_err(|_| left <= idle)
                }
            };
            match next {
                Err(true) => {
                    return Ok(LimitedBody(Err(GatewayError::BodyTimeout {
                        message: format!(
                            "the request body did not arrive within {}",
                            humantime::format_duration(whole)
                        ),
                    })))
                }
                Err(false) => {
                    return Ok(LimitedBody(Err(GatewayError::BodyTimeout {
                        message: format!(
                            "the request body stalled: nothing arrived for {}",
                            humantime::format_duration(idle)
                        ),
                    })))
                }
                Ok(None) => break,
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            total = total.saturating_add(data.len());
                            frames.push(data);
                        }
                    }
                }
                Ok(Some(Err(e))) => {
                    let too_large = e.is::<http_body_util::LengthLimitError>()
                        || std::error::Error::source(&*e)
                            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
                    return Ok(LimitedBody(Err(if too_large {
                        GatewayError::PayloadTooLarge { limit }
                    } else {
                        GatewayError::invalid(format!("cannot read request body: {e}"), None)
                    })));
                }
            }
        }
        Ok(LimitedBody(Ok(join_frames(frames, total))))
    }
}

/// The target that answered, the attempts it took and the A/B arm.
pub const TARGET: HeaderName = HeaderName::from_static("x-promptgate-target");
pub const ATTEMPTS: HeaderName = HeaderName::from_static("x-promptgate-attempts");
pub const ARM: HeaderName = HeaderName::from_static("x-promptgate-arm");
/// `hit`, `miss`, `bypass` or `refresh` (with `age` on a hit).
pub const CACHE: HeaderName = HeaderName::from_static("x-promptgate-cache");
/// The response's cost in `spend.currency` (a complete response whose target has a price).
pub const COST: HeaderName = HeaderName::from_static("x-promptgate-cost");

fn served_headers<T>(resp: &mut Response, served: &Served<T>, streaming: bool) -> Outcome {
    let h = resp.headers_mut();
    for (name, value) in [
        (ROUTE, &*served.route.name),
        (PROVIDER, &*served.target.provider_id),
        (TARGET, &*served.target.id),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    }
    h.insert(ATTEMPTS, HeaderValue::from(served.attempts));
    if let Some(c) = &served.cache {
        h.insert(CACHE, HeaderValue::from_static(c.status.as_str()));
        if let Some(age) = c.age {
            h.insert(http::header::AGE, HeaderValue::from(age.as_secs()));
        }
    }
    let arm = served.arm.as_ref().and_then(|name| {
        let stats = match &served.route.plan {
            crate::snapshot::Plan::Split { arms, .. } => {
                arms.iter().find(|a| &a.name == name)?.stats.clone()
            }
            crate::snapshot::Plan::Chain(_) => return None,
        };
        Some((name.clone(), stats))
    });
    if let Some((name, _)) = &arm {
        if let Ok(v) = HeaderValue::from_str(name) {
            h.insert(ARM, v);
        }
    }
    Outcome {
        prompt: None,
        route: Some(served.route.clone()),
        provider: Some(served.target.provider_id.clone()),
        arm,
        upstream: served.upstream,
        error: None,
        ticket: None,
        target: Some(served.target.clone()),
        attempts: served.attempts,
        cache: served.cache.map(|c| c.status.as_str()),
        // A stream records its own duration when it ends, except a replayed
        // cache hit, which is in memory and has no tap to do it.
        streaming: streaming
            && !served
                .cache
                .is_some_and(|c| matches!(c.status, crate::cache::Status::Hit)),
    }
}

/// Bodies at least this large are decoded on the blocking pool: parsing
/// megabytes of JSON would hold an async worker (and every connection queued
/// on it) for that long.
const DECODE_OFF_THREAD_BYTES: usize = 256 * 1024;

async fn off_thread_if_large<T: Send + 'static>(
    body: Bytes,
    decode: impl FnOnce(&[u8]) -> Result<T, GatewayError> + Send + 'static,
) -> Result<T, GatewayError> {
    if body.len() < DECODE_OFF_THREAD_BYTES {
        return decode(&body);
    }
    tokio::task::spawn_blocking(move || decode(&body))
        .await
        .unwrap_or_else(|_| Err(GatewayError::Internal("decoding the request failed".into())))
}

/// The wire codec of a client dialect.
fn codec(d: ClientDialect) -> &'static dyn Dialect {
    match d {
        ClientDialect::OpenAi => &OpenAi,
        ClientDialect::Anthropic => &crate::backend::anthropic::Anthropic,
    }
}

async fn chat_openai(
    State(app): State<AppState>,
    edge: Edge,
    headers: http::HeaderMap,
    body: LimitedBody,
) -> Response {
    // Boxed: the pipeline's state is many KiB, and the handler's future is
    // moved several times on its way into hyper; a box moves a pointer.
    let handled = Box::pin(chat(&app, &edge, headers, body, ClientDialect::OpenAi)).await;
    finish(&app, &edge, handled)
}

async fn chat_anthropic(
    State(app): State<AppState>,
    edge: Edge,
    headers: http::HeaderMap,
    body: LimitedBody,
) -> Response {
    let handled = Box::pin(chat(&app, &edge, headers, body, ClientDialect::Anthropic)).await;
    finish(&app, &edge, handled)
}

/// Chat in any client dialect: decode, run the pipeline, encode the answer or
/// the stream.
async fn chat(
    app: &AppState,
    edge: &Edge,
    headers: http::HeaderMap,
    LimitedBody(body): LimitedBody,
    dialect: ClientDialect,
) -> Handled {
    let id = edge.id.clone();
    let d = codec(dialect);
    // The client's bytes, for the fast path: an OpenAI body may be forwarded as it is.
    let mut raw = None;
    let decoded = match body {
        Ok(b) => {
            if dialect == ClientDialect::OpenAi {
                raw = Some(b.clone());
            }
            off_thread_if_large(b, move |b| codec(dialect).decode_chat(b)).await
        }
        Err(e) => Err(e),
    };
    let mut req = match decoded {
        Ok(r) => r,
        Err(e) => return error_response(d, e, &id, None),
    };
    // The prompt extension object, in any dialect.
    let prompt = match req.extra.remove("prompt").map(PromptRef::from_json) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => return error_response(d, e, &id, None),
    };
    // A request that names a prompt is rendered: its bytes are not the call's.
    let raw = raw.filter(|_| prompt.is_none());
    serve_chat(app, dialect, edge, &headers, req, prompt, raw).await
}

/// A request body that must be a JSON object (the gateway's own endpoints).
fn json_object(
    body: Result<Bytes, GatewayError>,
) -> Result<serde_json::Map<String, serde_json::Value>, GatewayError> {
    let v = serde_json::from_slice::<serde_json::Value>(&body?)
        .map_err(|e| GatewayError::invalid(format!("request body is not valid JSON: {e}"), None))?;
    match v {
        serde_json::Value::Object(o) => Ok(o),
        _ => Err(GatewayError::invalid(
            "request body must be a JSON object",
            None,
        )),
    }
}

/// `POST /v1/prompts/{id}/chat/completions`: the body holds `variables`, an
/// optional `version` or `label`, and the usual chat options; `model` and
/// `messages` are optional (the version names its route; messages are appended).
async fn prompt_chat(
    State(app): State<AppState>,
    edge: Edge,
    Path(prompt_id): Path<String>,
    headers: http::HeaderMap,
    body: LimitedBody,
) -> Response {
    let handled = Box::pin(prompt_chat_handled(&app, &edge, prompt_id, headers, body)).await;
    finish(&app, &edge, handled)
}

async fn prompt_chat_handled(
    app: &AppState,
    edge: &Edge,
    prompt_id: String,
    headers: http::HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Handled {
    let id = edge.id.clone();
    let d: &dyn Dialect = &OpenAi;
    let mut obj = match json_object(body) {
        Ok(o) => o,
        Err(e) => return error_response(d, e, &id, None),
    };
    let mut pref = serde_json::Map::new();
    pref.insert("id".into(), serde_json::Value::String(prompt_id));
    for k in ["variables", "version", "label"] {
        if let Some(v) = obj.remove(k) {
            pref.insert(k.into(), v);
        }
    }
    let prompt = match PromptRef::from_json(serde_json::Value::Object(pref)) {
        Ok(p) => p,
        Err(e) => return error_response(d, e, &id, None),
    };
    obj.entry("model")
        .or_insert_with(|| serde_json::Value::String(String::new()));
    obj.entry("messages")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    let req = match d.decode_chat(&serde_json::to_vec(&obj).unwrap_or_default()) {
        Ok(r) => r,
        Err(e) => return error_response(d, e, &id, None),
    };
    serve_chat(
        app,
        ClientDialect::OpenAi,
        edge,
        &headers,
        req,
        Some(prompt),
        None,
    )
    .await
}

/// Most `top_logprobs`, as OpenAI documents.
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// Most tools (functions) per request, as OpenAI documents.
pub const MAX_TOOLS: usize = 128;

/// The client-controlled counts a backend sizes its work or its answer by,
/// against their documented bounds. Token limits need no bound here: every sum
/// over them saturates.
fn check_sizes(req: &ChatRequest) -> Result<(), GatewayError> {
    if let Some(n) = req.params.n {
        if !(1..=crate::backend::MAX_CHOICES).contains(&n) {
            return Err(GatewayError::invalid(
                format!(
                    "invalid field `n`: {n} is outside 1..={}",
                    crate::backend::MAX_CHOICES
                ),
                Some("n"),
            ));
        }
    }
    if let Some(v) = req.extra.get("top_logprobs") {
        if v.as_u64().is_none_or(|k| k > MAX_TOP_LOGPROBS) {
            return Err(GatewayError::invalid(
                format!(
                    "invalid field `top_logprobs`: expected an integer in 0..={MAX_TOP_LOGPROBS}"
                ),
                Some("top_logprobs"),
            ));
        }
    }
    if req.tools.len() > MAX_TOOLS {
        return Err(GatewayError::invalid(
            format!(
                "invalid field `tools`: {} tools; at most {MAX_TOOLS} are allowed",
                req.tools.len()
            ),
            Some("tools"),
        ));
    }
    Ok(())
}

/// Runs a decoded chat request through the pipeline's stages (render, then the
/// context that places it on its route and arm, once) and encodes the outcome
/// in the client's dialect.
async fn serve_chat(
    app: &AppState,
    dialect: ClientDialect,
    edge: &Edge,
    headers: &http::HeaderMap,
    req: ChatRequest,
    prompt: Option<PromptRef>,
    raw: Option<Bytes>,
) -> Handled {
    let trace = request_trace(app, edge, headers, "chat", &req.model);
    trace.chat_request(&req);
    let handled = serve_chat_in(app, dialect, edge, headers, req, prompt, raw, trace.clone()).await;
    traced(app, trace, handled)
}

/// The request's span, when tracing is on: it began when the request arrived.
fn request_trace(
    app: &AppState,
    edge: &Edge,
    headers: &http::HeaderMap,
    operation: &'static str,
    model: &str,
) -> crate::otel::Trace {
    match app.gw.tracing.get() {
        None => crate::otel::Trace::default(),
        Some(t) => {
            let now = std::time::SystemTime::now();
            let arrived = now.checked_sub(edge.start.elapsed()).unwrap_or(now);
            t.request(headers, operation, model, &edge.id.0, arrived)
        }
    }
}

/// Records what the handler tells about the response on its span, which the
/// response body then holds to its end (a stream's last byte).
fn traced(app: &AppState, trace: crate::otel::Trace, mut handled: Handled) -> Handled {
    if !trace.is_on() {
        return handled;
    }
    trace.status(handled.response.status().as_u16());
    if let Some(o) = &handled.outcome {
        if let Some(e) = o.error {
            trace.failed(e, handled.response.status().is_server_error());
        }
        if let Some(c) = o.cache {
            trace.cache_status(c);
        }
        if let Some(t) = &o.target {
            let snap = app.gw.snapshot();
            let kind = snap
                .config
                .providers
                .get(&*t.provider_id)
                .map_or("", |p| p.kind.gen_ai_provider);
            trace.served(kind, &t.provider_id, &t.id, o.attempts);
        }
    }
    handled.response = guard_body(handled.response, trace);
    handled
}

#[allow(clippy::too_many_arguments)]
async fn serve_chat_in(
    app: &AppState,
    dialect: ClientDialect,
    edge: &Edge,
    headers: &http::HeaderMap,
    mut req: ChatRequest,
    prompt: Option<PromptRef>,
    raw: Option<Bytes>,
    trace: crate::otel::Trace,
) -> Handled {
    let id = edge.id.clone();
    let caller = edge.caller.as_ref();
    let d = codec(dialect);
    if let Err(e) = check_sizes(&req) {
        return error_response(d, e, &id, None);
    }
    // The retrieval extension object, read here once for every door.
    let retrieval = match req.extra.remove("retrieval").map(RetrievalRef::from_json) {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => return error_response(d, e, &id, None),
    };
    let retrieval_used = retrieval.is_some().then_some(());
    let snap = app.gw.snapshot();
    // A key refused its prompt (or, without one, its route) costs no rendering
    // or retrieval; the placed route is checked again below.
    if caller.is_some() {
        let named = prompt.as_ref().map(|p| p.id.as_str());
        let route = named.is_none().then(|| snap.route(&req.model)).flatten();
        let name = route.map(|r| r.name.as_str());
        if let Err(e) = crate::governance::keys::precheck(caller, name, named) {
            return error_response(d, e, &id, route.cloned());
        }
    }
    // Shadow candidates that render another prompt version start from the
    // request as it was before rendering.
    let shadow_source = prompt
        .as_ref()
        .filter(|_| snap.route(&req.model).is_some_and(|r| r.shadow_renders()))
        .map(|p| {
            Arc::new(crate::pipeline::shadow::Source {
                req: req.clone(),
                prompt: p.clone(),
                caller: caller.cloned(),
                dialect,
            })
        });
    // The prompt endpoint's request names no model: its version's route is the model.
    let model_named = !req.model.is_empty();
    let rendered = render::render(
        &app.gw, &id.0, &snap, headers, caller, &mut req, prompt, retrieval, &trace,
    )
    .await;
    let mut prepared = match rendered {
        Ok(p) => p,
        Err(refused) => {
            let mut resp = error_response(d, refused.error, &id, None);
            if let Some(p) = refused.prompt_id {
                resp.response.headers_mut().insert(
                    PROMPT,
                    HeaderValue::from_str(&p).unwrap_or(HeaderValue::from_static("-")),
                );
            }
            return resp;
        }
    };
    let used = prepared.prompt.clone();
    let citing = Citing::new(std::mem::take(&mut prepared.retrieved.used));
    let queries = std::mem::take(&mut prepared.retrieved.protected);
    let mut ctx = match RequestContext::for_chat(
        id.0.clone(),
        dialect,
        snap,
        headers,
        &req,
        prepared,
        caller.cloned(),
    ) {
        Ok(ctx) => ctx,
        Err((e, route)) => return error_response(d, e, &id, route),
    };
    ctx.shadow_source = shadow_source;
    if trace.is_on() {
        if !model_named {
            trace.model("chat", &req.model);
        }
        trace.placed(&ctx.route().name, ctx.arm().map(|a| &*a.name));
        ctx.trace = trace;
    }
    // Governance, in order: may the caller use this route and prompt; what
    // may leave (data protection, which can make the request private); then
    // budgets and rate limits, which hand out the request's ticket.
    if let Err(e) = crate::governance::keys::authorize(&ctx) {
        return pipeline_error(d, e, &ctx);
    }
    let mut protection = match crate::protect::apply(&mut ctx, &mut req, &app.gw.governor.metrics) {
        Ok(p) => p,
        Err(e) => return pipeline_error(d, e, &ctx),
    };
    // The retrieval queries were protected when they were searched.
    protection.absorb(&queries);
    match app.gw.governor.admit(&mut ctx, Some(&req), None).await {
        Ok(t) => ctx.ticket = t,
        Err(e) => return pipeline_error(d, e, &ctx),
    }
    if let Some(t) = &ctx.ticket {
        protection.note(t);
    }
    // The client's bytes are the call only when nothing rewrote the request:
    // no prompt rendered, no passages inserted, nothing redacted.
    let raw = raw.filter(|_| {
        used.is_none()
            && retrieval_used.is_none()
            && citing.is_none()
            && protection.action != Some("redact")
    });
    let mut handled = run_chat(app, d, &id, &ctx, req, citing, &protection, raw).await;
    if let Some(u) = used {
        let h = handled.response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&u.id) {
            h.insert(PROMPT, v);
        }
        h.insert(PROMPT_VERSION, HeaderValue::from(u.version));
        if let Some(o) = &mut handled.outcome {
            o.prompt = Some(u);
        }
    }
    handled
}

/// The citations of a response that used retrieval: the
/// `x-promptgate-retrieval` header and the `promptgate` member its JSON body
/// (or its final stream event) carries.
struct Citing {
    header: HeaderValue,
    /// `,"promptgate":{"citations":[…]}`, spliced into a JSON object.
    member: Vec<u8>,
}

/// Passages of which retrievers a response used, and how many:
/// `retriever=count`, comma-separated.
pub const RETRIEVAL: HeaderName = HeaderName::from_static("x-promptgate-retrieval");

impl Citing {
    fn new(used: Vec<crate::pipeline::retrieve::Used>) -> Option<Citing> {
        if used.is_empty() {
            return None;
        }
        let r = crate::pipeline::retrieve::Retrieved {
            used,
            ..Default::default()
        };
        let mut member = b",\"promptgate\":".to_vec();
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut member, &r.citations_json());
        Some(Citing {
            header: HeaderValue::from_str(&r.header()).unwrap_or(HeaderValue::from_static("-")),
            member,
        })
    }

    /// Adds the member to the JSON object `body` (an encoded response).
    fn body(&self, mut body: Vec<u8>) -> Vec<u8> {
        if let Some(end) = body.iter().rposition(|b| *b == b'}') {
            body.splice(end..end, self.member.iter().copied());
        }
        body
    }

    /// Adds the member to the object of the SSE frame that starts with
    /// `marker` in `out[from..]`, if there is one.
    fn frame(&self, out: &mut Vec<u8>, from: usize, marker: &[u8]) -> bool {
        let Some(at) = find(&out[from..], marker).map(|i| from + i) else {
            return false;
        };
        let Some(end) = find(&out[at..], b"\n\n").map(|i| at + i) else {
            return false;
        };
        if end == 0 || out[end - 1] != b'}' {
            return false;
        }
        out.splice(end - 1..end - 1, self.member.iter().copied());
        true
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A stream encoder that puts the citations into the stream's final event:
/// OpenAI's chunk with the `finish_reason`, Anthropic's `message_delta`.
struct CitingEncoder {
    inner: Box<dyn crate::dialect::StreamEncoder>,
    citing: Option<Citing>,
    dialect: ClientDialect,
}

impl crate::dialect::StreamEncoder for CitingEncoder {
    fn encode(&mut self, ev: &crate::canonical::StreamEvent, out: &mut Vec<u8>) {
        let from = out.len();
        self.inner.encode(ev, out);
        let Some(c) = &self.citing else {
            return;
        };
        let done = match self.dialect {
            ClientDialect::OpenAi => match ev {
                crate::canonical::StreamEvent::Delta(d) if d.finish_reason.is_some() => {
                    c.frame(out, from, b"data: ")
                }
                _ => false,
            },
            ClientDialect::Anthropic => c.frame(out, from, b"event: message_delta\ndata: "),
        };
        if done {
            self.citing = None;
        }
    }

    fn encode_error(&mut self, err: &GatewayError, request_id: &str, out: &mut Vec<u8>) {
        self.inner.encode_error(err, request_id, out);
    }
}

/// The model name a response shows: the route the client asked for, also
/// when its budget moved the request to a fallback route.
fn shown_model<'a>(ctx: &'a RequestContext, served: &'a str) -> &'a str {
    ctx.ticket
        .as_ref()
        .and_then(|t| t.moved_from.as_deref())
        .unwrap_or(served)
}

#[allow(clippy::too_many_arguments)]
async fn run_chat(
    app: &AppState,
    d: &dyn Dialect,
    id: &RequestId,
    ctx: &RequestContext,
    req: ChatRequest,
    mut citing: Option<Citing>,
    protection: &crate::protect::Protection,
    raw: Option<Bytes>,
) -> Handled {
    let cited = citing.as_ref().map(|c| c.header.clone());
    // A stream's citations go into its final event, through its encoder.
    let mut encoder = req.stream.then(|| {
        let inner = d.stream_encoder(&req);
        match citing.take() {
            Some(c) => Box::new(CitingEncoder {
                inner,
                citing: Some(c),
                dialect: ctx.dialect,
            }),
            None => inner,
        }
    });
    let id = id.clone();
    let served = match tokio::time::timeout(
        app.settings.request_timeout,
        Box::pin(app.gw.chat(ctx, req, raw)),
    )
    .await
    {
        Err(_) => {
            let e = UpstreamError::new(
                ErrorKind::Timeout,
                "no response from the backend within the gateway's request timeout",
            );
            return pipeline_error(d, e.into(), ctx);
        }
        Ok(Err(e)) => return pipeline_error(d, e, ctx),
        Ok(Ok(s)) => s,
    };
    let (value, served) = served.split();
    let value = match value {
        Reply::Canonical(v) => v,
        Reply::Forwarded(raw) => return forwarded(raw, &served, ctx, id),
    };
    // The audit record's answer text (when it keeps content) is the
    // backend's; redacted values go back into the answer after, before it is
    // encoded.
    let value = crate::governance::audit::capture(ctx.ticket.as_ref(), value);
    let value = protection.restore(value);
    match (value, encoder.take()) {
        (ChatOutcome::Complete(resp), _) => {
            let estimated = resp.usage.is_some_and(|u| u.estimated);
            let mut body = d.encode_chat(&resp, shown_model(ctx, &served.route.name));
            if let Some(c) = citing.take() {
                body = c.body(body);
            }
            let mut out = json_response(StatusCode::OK, body);
            out.headers_mut().insert(
                USAGE,
                HeaderValue::from_static(if estimated { "estimated" } else { "reported" }),
            );
            let mut outcome = served_headers(&mut out, &served, false);
            outcome.ticket = ctx.ticket.clone();
            if let Some(h) = cited {
                out.headers_mut().insert(RETRIEVAL, h);
            }
            Handled {
                response: out,
                outcome: Some(outcome),
            }
        }
        (ChatOutcome::Stream(mut events), Some(mut encoder)) => {
            let request_id = id.0.clone();
            // A stream that fails after it began: its audit record names the error.
            let ticket = ctx.ticket.clone();
            let failed = move |e: &GatewayError| {
                if let Some(t) = &ticket {
                    t.note(|l| l.error = Some(e.code()));
                }
            };
            let body = async_stream::stream! {
                let mut buf = Vec::with_capacity(512);
                let mut done = false;
                while let Some(ev) = events.next().await {
                    match ev {
                        Ok(ev) => {
                            done |= ev == crate::canonical::StreamEvent::Done;
                            encoder.encode(&ev, &mut buf)
                        }
                        Err(e) => {
                            let e = GatewayError::Upstream(e);
                            failed(&e);
                            encoder.encode_error(&e, &request_id, &mut buf);
                            yield Ok::<Bytes, Infallible>(Bytes::from(std::mem::take(&mut buf)));
                            return;
                        }
                    }
                    if !buf.is_empty() {
                        yield Ok(Bytes::from(std::mem::replace(&mut buf, Vec::with_capacity(512))));
                    }
                }
                // A stream that began ends with its end marker or an error event,
                // never silently.
                if !done {
                    let e = UpstreamError::new(
                        ErrorKind::MalformedResponse,
                        "the backend stream ended without a finish",
                    );
                    let e = GatewayError::Upstream(e);
                    failed(&e);
                    encoder.encode_error(&e, &request_id, &mut buf);
                    yield Ok(Bytes::from(buf));
                }
            };
            let mut out = sse_response(body);
            let mut outcome = served_headers(&mut out, &served, true);
            outcome.ticket = ctx.ticket.clone();
            if let Some(h) = cited {
                out.headers_mut().insert(RETRIEVAL, h);
            }
            Handled {
                response: out,
                outcome: Some(outcome),
            }
        }
        (ChatOutcome::Stream(_), None) => error_response(
            d,
            GatewayError::Internal("a stream was returned for a non-streaming request".into()),
            &id,
            Some(served.route.clone()),
        ),
    }
}

/// An event-stream response of `body`, unbuffered by proxies in between.
fn sse_response(
    body: impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    let mut out = Response::new(Body::from_stream(body));
    let h = out.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    out
}

/// The fast path's answer: its bytes as they are, with the headers and the
/// outcome of the canonical path; a stream's failure ends it with OpenAI's
/// error event.
fn forwarded(raw: Raw, served: &Served<()>, ctx: &RequestContext, id: RequestId) -> Handled {
    let (mut out, streaming) = match raw {
        Raw::Whole(body) => {
            let mut out = Response::new(Body::from(body));
            let h = out.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(USAGE, HeaderValue::from_static("reported"));
            (out, false)
        }
        Raw::Stream(mut chunks) => {
            let ticket = ctx.ticket.clone();
            let body = async_stream::stream! {
                while let Some(chunk) = chunks.next().await {
                    match chunk {
                        Ok(b) => yield Ok::<Bytes, Infallible>(b),
                        Err(e) => {
                            let e = GatewayError::Upstream(e);
                            if let Some(t) = &ticket {
                                t.note(|l| l.error = Some(e.code()));
                            }
                            let mut buf = b"data: ".to_vec();
                            buf.extend_from_slice(&OpenAi.error_body(&e, &id.0));
                            buf.extend_from_slice(b"\n\n");
                            yield Ok(Bytes::from(buf));
                            return;
                        }
                    }
                }
            };
            let out = sse_response(body);
            (out, true)
        }
    };
    let mut outcome = served_headers(&mut out, served, streaming);
    outcome.ticket = ctx.ticket.clone();
    Handled {
        response: out,
        outcome: Some(outcome),
    }
}

async fn embeddings(
    State(app): State<AppState>,
    edge: Edge,
    headers: http::HeaderMap,
    body: LimitedBody,
) -> Response {
    let handled = Box::pin(embeddings_handled(&app, &edge, headers, body)).await;
    finish(&app, &edge, handled)
}

async fn embeddings_handled(
    app: &AppState,
    edge: &Edge,
    headers: http::HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Handled {
    let id = edge.id.clone();
    let decoded = match body {
        Ok(b) => off_thread_if_large(b, wire::decode_embeddings_request).await,
        Err(e) => Err(e),
    };
    let req = match decoded {
        Ok(r) => r,
        Err(e) => return error_response(&OpenAi, e, &id, None),
    };
    let trace = request_trace(app, edge, &headers, "embeddings", &req.model);
    let handled = embeddings_in(app, edge, &headers, req, trace.clone()).await;
    traced(app, trace, handled)
}

async fn embeddings_in(
    app: &AppState,
    edge: &Edge,
    headers: &http::HeaderMap,
    req: crate::canonical::EmbeddingsRequest,
    trace: crate::otel::Trace,
) -> Handled {
    let id = edge.id.clone();
    let encoding: EmbeddingEncoding = req.encoding;
    let mut ctx = match RequestContext::for_embeddings(
        id.0.clone(),
        app.gw.snapshot(),
        headers,
        &req,
        edge.caller.clone(),
    ) {
        Ok(ctx) => ctx,
        Err(e) => return error_response(&OpenAi, e, &id, None),
    };
    if trace.is_on() {
        trace.placed(&ctx.route().name, ctx.arm().map(|a| &*a.name));
        ctx.trace = trace;
    }
    if let Err(e) = crate::governance::keys::authorize(&ctx) {
        return pipeline_error(&OpenAi, e, &ctx);
    }
    let mut req = req;
    if let Err(e) = crate::protect::apply_embeddings(&mut ctx, &mut req, &app.gw.governor.metrics) {
        return pipeline_error(&OpenAi, e, &ctx);
    }
    match app.gw.governor.admit(&mut ctx, None, Some(&req)).await {
        Ok(t) => ctx.ticket = t,
        Err(e) => return pipeline_error(&OpenAi, e, &ctx),
    }
    let served = tokio::time::timeout(app.settings.request_timeout, app.gw.embed(&ctx, req)).await;
    match served {
        Err(_) => {
            let e = UpstreamError::new(
                ErrorKind::Timeout,
                "no response from the backend within the gateway's request timeout",
            );
            pipeline_error(&OpenAi, e.into(), &ctx)
        }
        Ok(Err(e)) => pipeline_error(&OpenAi, e, &ctx),
        Ok(Ok(served)) => {
            let mut out = json_response(
                StatusCode::OK,
                wire::encode_embeddings_response(
                    &served.value,
                    shown_model(&ctx, &served.route.name),
                    encoding,
                ),
            );
            out.headers_mut().insert(
                USAGE,
                HeaderValue::from_static(if served.value.usage.estimated {
                    "estimated"
                } else {
                    "reported"
                }),
            );
            let mut outcome = served_headers(&mut out, &served, false);
            outcome.ticket = ctx.ticket.clone();
            Handled {
                response: out,
                outcome: Some(outcome),
            }
        }
    }
}

/// `POST /v1/retrievers/{name}/search`: `{query, top_k?, filter?, explain?}`
/// → `{"object": "list", "retriever", "data": [passage…]}`; errors in the
/// OpenAI shape, an invalid search naming its field.
async fn retriever_search(
    State(app): State<AppState>,
    edge: Edge,
    Path(name): Path<String>,
    headers: http::HeaderMap,
    body: LimitedBody,
) -> Response {
    let handled = Box::pin(retriever_search_handled(&app, &edge, name, &headers, body)).await;
    finish(&app, &edge, handled)
}

async fn retriever_search_handled(
    app: &AppState,
    edge: &Edge,
    name: String,
    headers: &http::HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Handled {
    use crate::pipeline::retrieve;
    use serde_json::Value;
    let id = edge.id.clone();
    let fail = |e: GatewayError| error_response(&OpenAi, e, &id, None);
    let bad = |m: String, p: &str| fail(GatewayError::invalid(m, Some(p)));
    let mut obj = match json_object(body) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let snap = app.gw.snapshot();
    let Some(state) = snap.retrievers.get(&name) else {
        return bad(
            format!(
                "invalid field `retriever`: retriever `{}` is not configured",
                LogSafe(&name)
            ),
            "retriever",
        );
    };
    let embedding_route = state.config.embedding.as_ref().map(|e| e.route.as_str());
    if let Err(e) =
        crate::governance::keys::authorize_search(edge.caller.as_ref(), &name, embedding_route)
    {
        return fail(e);
    }
    let query = match obj.remove("query") {
        Some(Value::String(q)) => q,
        _ => {
            return bad(
                "invalid field `query`: a string is required".into(),
                "query",
            )
        }
    };
    let top_k = match obj.remove("top_k") {
        None | Some(Value::Null) => state.config.top_k,
        Some(v) => match v.as_u64() {
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
            None => {
                return bad(
                    format!(
                        "invalid field `top_k`: must be from 1 to {}",
                        crate::retrieval::MAX_TOP_K
                    ),
                    "top_k",
                )
            }
        },
    };
    let explain = match obj.remove("explain") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return bad(
                "invalid field `explain`: must be a boolean".into(),
                "explain",
            )
        }
    };
    let filter = match crate::retrieval::Filter::from_json(obj.get("filter")) {
        Ok(f) => f,
        Err(e) => return fail(retrieve::search_error(&name, e, "")),
    };
    obj.remove("filter");
    if let Some(k) = obj.keys().next() {
        return bad(format!("unknown field `{}`", LogSafe(k)), k);
    }
    let mut search = crate::retrieval::Search {
        query,
        top_k,
        filter,
    };
    // The query is searched under the caller's data policy (its key's, else
    // the embeddings route's, else the gateway's).
    let route = embedding_route.and_then(|r| snap.route(r)).cloned();
    let guard = retrieve::Guard {
        data: crate::protect::policy_for(&snap, edge.caller.as_ref(), route.as_deref()),
        route,
    };
    let found = match guard.check(&app.gw, &snap, &search.query) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let caller = retrieve::Caller {
        request_id: id.0.clone(),
        private: crate::pipeline::context::private_header(headers) || found.private(),
        trace: crate::otel::Trace::default(),
    };
    if let Some(q) = found.redacted {
        search.query = q;
    }
    let passages = match retrieve::search(&app.gw, state, &search, &caller).await {
        Ok(p) => p,
        Err(e) => return fail(retrieve::search_error(&name, e, "")),
    };
    let data: Vec<Value> = passages
        .iter()
        .map(|p| {
            let mut v = retrieve::passage_json(p);
            if explain {
                v["ranks"] = retrieve::ranks_json(p);
            }
            v
        })
        .collect();
    let body = serde_json::json!({"object": "list", "retriever": name, "data": data});
    Handled {
        response: json_response(StatusCode::OK, body.to_string().into_bytes()),
        outcome: Some(Outcome {
            prompt: None,
            route: None,
            provider: None,
            arm: None,
            upstream: Duration::ZERO,
            error: None,
            streaming: false,
            ticket: None,
            target: None,
            attempts: 0,
            cache: None,
        }),
    }
}

async fn list_models(State(app): State<AppState>) -> Response {
    let mut resp = Response::new(Body::from(app.gw.snapshot().models_body.clone()));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn get_model(State(app): State<AppState>, edge: Edge, Path(model): Path<String>) -> Response {
    let snap = app.gw.snapshot();
    if snap.route(&model).is_none() {
        let handled = error_response(
            &OpenAi,
            GatewayError::UnknownModel {
                model,
                available: snap.route_list.clone(),
            },
            &edge.id,
            None,
        );
        return finish(&app, &edge, handled);
    }
    let created = snap
        .loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let body = serde_json::json!({"id": model, "object": "model", "created": created, "owned_by": "promptgate"});
    json_response(StatusCode::OK, body.to_string().into_bytes())
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, br#"{"status":"ok"}"#.to_vec())
}

/// Readiness (not liveness): 503 while draining or while the configuration on
/// disk fails to load ([`crate::lifecycle::Readiness`], unless
/// `limits.fail_readiness_on_invalid_config` is off).
async fn readyz(State(app): State<AppState>) -> Response {
    let (ready, mut body) = app.gw.readiness.report();
    // The public answer, asked without a key, gives the problems' number:
    // their text names files, fields and ids, and a parser's message may
    // quote a value. The log and the admin API have the text.
    if let Some(problems) = body.get_mut("problems") {
        let n = problems.as_array().map_or(0, Vec::len);
        *problems = serde_json::json!([format!(
            "{n} problem(s) in the configuration; see the log or GET /admin/status"
        )]);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, body.to_string().into_bytes())
}

async fn metrics(State(app): State<AppState>) -> Response {
    app.gw.refresh_cache_gauges().await;
    app.gw.refresh_scrape_gauges();
    let mut resp = Response::new(Body::from(app.gw.metrics.render()));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

async fn not_found(State(app): State<AppState>, edge: Edge, req: Request) -> Response {
    let handled = error_response(
        &OpenAi,
        GatewayError::NotFound {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
        },
        &edge.id,
        None,
    );
    finish(&app, &edge, handled)
}

/// Marks the answer of the catch-panic layer, which runs inside `edge` and does
/// not know the request id: `edge` replaces it with [`panic_body`].
#[derive(Clone, Copy)]
struct Panicked;

fn panic_response(_: Box<dyn std::any::Any + Send>) -> Response {
    tracing::error!("a request handler panicked");
    let mut resp = panic_body("", false);
    resp.extensions_mut().insert(Panicked);
    resp
}

/// The 500 for a handler that panicked, in the client's dialect, with its request id.
fn panic_body(request_id: &str, anthropic: bool) -> Response {
    let err = GatewayError::Internal("the gateway hit an internal error".into());
    let body = if anthropic {
        crate::backend::anthropic::Anthropic.error_body(&err, request_id)
    } else {
        wire::error_body(&err, request_id)
    };
    json_response(StatusCode::INTERNAL_SERVER_ERROR, body)
}

fn overloaded(id: &str) -> Response {
    let err = GatewayError::Upstream(crate::error::UpstreamError::new(
        crate::error::ErrorKind::Overloaded,
        "the gateway is at its concurrency limit; retry shortly",
    ));
    let mut resp = json_response(StatusCode::SERVICE_UNAVAILABLE, wire::error_body(&err, id));
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// The whole HTTP application.
pub fn router(gw: Arc<Gateway>, settings: ServerSettings) -> Router {
    let state = AppState {
        gw,
        permits: Arc::new(tokio::sync::Semaphore::new(settings.max_concurrency)),
        settings: settings.clone(),
    };
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_openai))
        .route("/v1/messages", post(chat_anthropic))
        .route("/v1/prompts/{prompt}/chat/completions", post(prompt_chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/retrievers/{retriever}/search", post(retriever_search))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .with_state(state.clone());
    api.layer(
        ServiceBuilder::new()
            .layer(middleware::from_fn_with_state(state, edge))
            .layer(tower_http::trace::TraceLayer::new_for_http())
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                panic_response,
            )),
    )
}

/// Connection-level protections of the public listener.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    /// A connection must deliver a complete request head within this long of
    /// opening (or of its previous response): slowloris clients and idle
    /// keep-alive connections are closed after it.
    pub header_read_timeout: Duration,
    /// Open connections at most. At the limit, the oldest connection with no
    /// request in progress is closed to make room; if every one is busy, the new
    /// connection is closed at once.
    pub max_connections: usize,
    /// After a shutdown signal: how long running requests may still finish.
    pub shutdown_grace: Duration,
    /// A response write that makes no progress this long (the client reads
    /// nothing) closes the connection, dropping the response and the backend
    /// call behind it.
    pub write_timeout: Duration,
    /// Concurrent HTTP/2 streams (requests) one connection may have open.
    pub max_streams: u32,
}

impl Default for ConnLimits {
    fn default() -> Self {
        let d = crate::config::Limits::default();
        ConnLimits {
            header_read_timeout: d.header_read_timeout,
            max_connections: d.max_connections,
            shutdown_grace: d.shutdown_grace,
            write_timeout: d.write_timeout,
            max_streams: d.max_streams,
        }
    }
}

/// How often an HTTP/2 connection with requests in progress is pinged, and how
/// long the client has to answer before the connection is closed (a peer gone
/// without a word, while its streams wait on a backend).
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs HTTP/2 streams (hyper spawns one task per request) as named gateway
/// tasks, each under the write timeout: HTTP/2 flow control lets a client
/// stop reading one stream while its connection stays busy and its socket
/// drains, so the socket's timer ([`Watched`]) cannot see it. A stream whose
/// response has had a frame waiting on the client for `write_timeout` is
/// reset, dropping the response and the backend call behind it.
#[derive(Clone, Copy)]
struct StreamTasks {
    write_timeout: Duration,
}

tokio::task_local! {
    /// The running HTTP/2 stream's [`StreamClock`], for its response body.
    static STREAM_CLOCK: Arc<StreamClock>;
}

/// When the stream's response body last handed a frame to hyper that hyper
/// has not followed by asking for the next ([`now_ms`]; 0: none waiting).
/// Written and read only inside the stream's own task.
#[derive(Default)]
struct StreamClock {
    handed: std::sync::atomic::AtomicU64,
}

impl<F> hyper::rt::Executor<F> for StreamTasks
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let limit_ms = u64::try_from(self.write_timeout.as_millis()).unwrap_or(u64::MAX);
        crate::task::spawn("h2-stream", async move {
            let clock = Arc::new(StreamClock::default());
            let stream = STREAM_CLOCK.scope(clock.clone(), fut);
            let stalled = Stalled {
                clock: &clock,
                limit_ms,
                timer: None,
            };
            tokio::select! {
                biased;
                out = stream => Some(out),
                () = stalled => {
                    tracing::debug!("an HTTP/2 response waited on its client past the write timeout; stream reset");
                    None
                }
            }
        });
    }
}

/// Resolves once the stream's response has waited on the client for the
/// limit. It needs no waker of its own for a new frame: frames are handed out
/// in the same task, whose every poll polls this too.
struct Stalled<'a> {
    clock: &'a StreamClock,
    limit_ms: u64,
    timer: Option<(u64, std::pin::Pin<Box<tokio::time::Sleep>>)>,
}

impl Future for Stalled<'_> {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::task::Poll;
        let handed = self.clock.handed.load(std::sync::atomic::Ordering::Relaxed);
        if handed == 0 {
            return Poll::Pending;
        }
        let due = handed.saturating_add(self.limit_ms);
        let now = now_ms();
        if now >= due {
            return Poll::Ready(());
        }
        let Some(deadline) = Instant::now().checked_add(Duration::from_millis(due - now)) else {
            return Poll::Pending;
        };
        let this = &mut *self;
        match &mut this.timer {
            Some((at, sleep)) => {
                if *at != handed {
                    *at = handed;
                    sleep.as_mut().reset(deadline);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            None => {
                let mut sleep = Box::pin(tokio::time::sleep_until(deadline));
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                this.timer = Some((handed, sleep));
            }
        }
        Poll::Pending
    }
}

/// An HTTP/2 response body that notes on its stream's clock when a frame it
/// handed out is waiting for the client.
struct Paced {
    inner: Body,
    clock: Arc<StreamClock>,
}

impl hyper::body::Body for Paced {
    type Data = Bytes;
    type Error = axum::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        use std::sync::atomic::Ordering;
        self.clock.handed.store(0, Ordering::Relaxed);
        let out = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        // The last frame too: hyper holds it until the client has room.
        if matches!(out, std::task::Poll::Ready(Some(Ok(_)))) {
            self.clock.handed.store(now_ms().max(1), Ordering::Relaxed);
        }
        out
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A clock in milliseconds since the first call, for [`Conn::idle_since`].
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    Instant::now().saturating_duration_since(epoch).as_millis() as u64
}

/// One open connection: its requests in progress, whether the client has sent
/// anything yet, and a way to close it.
struct Conn {
    active: std::sync::atomic::AtomicUsize,
    heard: std::sync::atomic::AtomicBool,
    evict: tokio::sync::Notify,
    /// When the connection last had no request in progress ([`now_ms`]): its
    /// opening, then the end of each last response.
    idle_since: std::sync::atomic::AtomicU64,
}

impl Conn {
    fn is_idle(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Acquire) == 0
    }

    /// Resolves when the connection has had no request in progress for
    /// `limit`: from its opening (the TLS handshake, the protocol preface and
    /// the first request head must arrive within it, whatever the protocol),
    /// then from the end of each last response. HTTP/1.1 has hyper's own
    /// header timer too; HTTP/2 has no other.
    async fn idle_for(&self, limit: Duration) {
        use std::sync::atomic::Ordering;
        let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        loop {
            let now = now_ms();
            let wait = if self.is_idle() {
                let since = self.idle_since.load(Ordering::Acquire);
                let until = since.saturating_add(limit_ms);
                if until <= now {
                    return;
                }
                until - now
            } else {
                // Busy: look again a period later (the end of the request
                // moves `idle_since`).
                limit_ms
            };
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
}

/// A client socket that notes the first bytes it reads on its [`Conn`], and
/// fails a write that waits on the client longer than `write_timeout`.
struct Watched {
    io: tokio::net::TcpStream,
    conn: Arc<Conn>,
    write_timeout: Duration,
    /// The deadline of the write now waiting, if one is (`armed`); the timer is
    /// made on the first wait and reused.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl Watched {
    /// Passes a write's outcome through; while writes stay pending, keeps a
    /// deadline, and past it fails the write so the connection ends.
    fn progress<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        out: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future as _;
        use std::task::Poll;
        if out.is_ready() {
            self.armed = false;
            return out;
        }
        if !self.armed {
            // A timeout too long to represent is no deadline at all.
            let Some(deadline) = Instant::now().checked_add(self.write_timeout) else {
                return out;
            };
            match &mut self.stalled {
                Some(s) => s.as_mut().reset(deadline),
                None => self.stalled = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        let Some(sleep) = &mut self.stalled else {
            return out;
        };
        if sleep.as_mut().poll(cx).is_ready() {
            self.armed = false;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing within the write timeout",
            )));
        }
        Poll::Pending
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let out = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn
                .heard
                .store(true, std::sync::atomic::Ordering::Release);
        }
        out
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let out = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(cx, out)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let out = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress(cx, out)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[derive(Default)]
struct Conns {
    open: std::sync::Mutex<std::collections::BTreeMap<u64, Arc<Conn>>>,
    next: std::sync::atomic::AtomicU64,
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, Arc<Conn>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Room for one more connection, if full by evicting the oldest idle one
    /// that never sent a byte, else the oldest idle one.
    fn admit(&self, max: usize) -> Option<(u64, Arc<Conn>)> {
        use std::sync::atomic::Ordering;
        let mut open = self.lock();
        if open.len() >= max {
            let idle = |c: &Conn| c.active.load(Ordering::Acquire) == 0;
            let idle = open
                .iter()
                .find(|(_, c)| idle(c) && !c.heard.load(Ordering::Acquire))
                .or_else(|| open.iter().find(|(_, c)| idle(c)))
                .map(|(id, _)| *id)?;
            if let Some(c) = open.remove(&idle) {
                c.evict.notify_one();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            active: Default::default(),
            heard: Default::default(),
            evict: tokio::sync::Notify::new(),
            idle_since: now_ms().into(),
        });
        open.insert(id, conn.clone());
        Some((id, conn))
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Counts a request on its connection until its response body ends. The
/// listener puts it in the request's extensions; the edge layer keeps it with
/// the response body (a clone counts on its own).
struct Busy(Arc<Conn>);

impl Clone for Busy {
    fn clone(&self) -> Self {
        Busy::new(&self.0)
    }
}

impl Busy {
    fn new(c: &Arc<Conn>) -> Self {
        c.active.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Busy(c.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle_since.store(now_ms(), Ordering::Release);
        }
    }
}

/// Serves `router` on `listener` with the default connection limits until
/// `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, router, ConnLimits::default(), shutdown).await
}

/// Serves `router` on `listener` (plain HTTP/1.1 and h2c) until `shutdown`
/// resolves; then stops accepting, lets running requests finish for at most
/// the grace period, and returns (dropping whatever still runs).
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_tls(listener, router, limits, None, shutdown).await
}

/// The connection's protocol, HTTP/1.1 or HTTP/2 (the client's preface
/// decides; over TLS, ALPN offers `h2` and `http/1.1`).
type Http = hyper_util::server::conn::auto::Builder<StreamTasks>;

/// Serves `router` on `listener`, over TLS when `tls` is given, like
/// [`serve_with`]. Each connection speaks HTTP/1.1 or HTTP/2 as the client
/// chooses, under the same protections: the TLS handshake and the first request
/// head within `header_read_timeout` (and an idle connection closed after it),
/// the connection cap with idle eviction, the write timeout on the socket, at
/// most `max_streams` concurrent HTTP/2 streams, a graceful drain (`GOAWAY`
/// on HTTP/2) on shutdown.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::TokioTimer;
    let mut http: Http = hyper_util::server::conn::auto::Builder::new(StreamTasks {
        write_timeout: limits.write_timeout,
    });
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let http = Arc::new(http);
    let conns = Arc::new(Conns::default());
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin;
                    // the timeouts free connections.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Some((id, conn)) = conns.admit(limits.max_connections) else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = Watched {
            io: stream,
            conn: conn.clone(),
            write_timeout: limits.write_timeout,
            stalled: None,
            armed: false,
        };
        let conns = conns.clone();
        let served = ConnTask {
            http: http.clone(),
            router: router.clone(),
            conn,
            drain: drain_rx.clone(),
            idle_limit: limits.header_read_timeout,
        };
        let tls = tls.clone();
        crate::task::spawn("connection", async move {
            match tls {
                None => served.run(io).await,
                Some(tls) => {
                    // The handshake counts against the first request's time.
                    let handshake = tokio::select! {
                        r = tls.accept(io) => r.ok(),
                        _ = served.conn.idle_for(served.idle_limit) => None,
                        _ = served.conn.evict.notified() => None,
                    };
                    if let Some(io) = handshake {
                        served.run(io).await;
                    }
                }
            }
            conns.lock().remove(&id);
        });
        // Let the new connection read what its client already sent before the
        // next accept may have to choose a connection to evict.
        tokio::task::yield_now().await;
    }
    drop(listener);
    let _ = drain_tx.send(true);
    // No deadline past the representable: wait for the connections instead.
    let deadline = Instant::now().checked_add(limits.shutdown_grace);
    while conns.len() > 0 && deadline.is_none_or(|d| Instant::now() < d) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = conns.len();
    if left > 0 {
        tracing::warn!(
            connections = left,
            "shutdown grace period over; closing the connections still open"
        );
        for c in conns.lock().values() {
            c.evict.notify_one();
        }
    }
    Ok(())
}

/// What one connection's task needs to serve it.
struct ConnTask {
    http: Arc<Http>,
    router: Router,
    conn: Arc<Conn>,
    drain: tokio::sync::watch::Receiver<bool>,
    idle_limit: Duration,
}

impl ConnTask {
    /// Serves the connection until it ends, is evicted, stays idle past the
    /// limit, or the drain and its grace are over.
    async fn run<I>(mut self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let router = self.router.clone();
        let on_conn = self.conn.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let mut req = req.map(Body::new);
            // Taken by the edge layer, which keeps it until the body ends; a
            // router without that layer (admin) holds it for the handler.
            req.extensions_mut().insert(Busy::new(&on_conn));
            let answer = tower::ServiceExt::oneshot(router.clone(), req);
            async move {
                let resp = answer.await?;
                // An HTTP/2 stream's task has a clock for the write timeout.
                Ok::<_, Infallible>(match STREAM_CLOCK.try_with(Arc::clone) {
                    Ok(clock) => resp.map(|inner| Body::new(Paced { inner, clock })),
                    Err(_) => resp,
                })
            }
        });
        let served = self
            .http
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
        tokio::pin!(served);
        let mut draining = *self.drain.borrow();
        if draining {
            served.as_mut().graceful_shutdown();
        }
        // Idle past the limit: a graceful close (`GOAWAY` on HTTP/2), and if the
        // client does not end it within another period, a hard one.
        let mut closing = false;
        let conn = self.conn.clone();
        loop {
            tokio::select! {
                _ = served.as_mut() => break,
                _ = conn.evict.notified() => break,
                _ = conn.idle_for(self.idle_limit) => {
                    if closing {
                        break;
                    }
                    closing = true;
                    served.as_mut().graceful_shutdown();
                    // A new period from now.
                    conn.idle_since.store(now_ms(), std::sync::atomic::Ordering::Release);
                }
                r = self.drain.changed(), if !draining => {
                    draining = true;
                    if r.is_ok() {
                        served.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        error_response(&OpenAi, self, &RequestId(new_request_id()), None).response
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tower::ServiceExt;

    #[test]
    fn a_body_is_its_frames_in_order() {
        assert_eq!(join_frames(Vec::new(), 0), Bytes::new());
        let one = Bytes::from_static(b"{\"model\":\"m\"}");
        let joined = join_frames(vec![one.clone()], one.len());
        assert_eq!(joined, one);
        assert_eq!(
            joined.as_ptr(),
            one.as_ptr(),
            "a single frame is not copied"
        );
        let parts: Vec<Bytes> = (0..300u32)
            .map(|i| Bytes::from(format!("{i:04},").repeat(1 + (i as usize % 7))))
            .collect();
        let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(join_frames(parts, whole.len()), Bytes::from(whole));
    }

    /// A handler that panics behind the same layers as the real router still
    /// answers with a dialect error carrying the request id.
    #[tokio::test]
    async fn a_panicking_handler_answers_with_the_request_id() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("promptgate.yaml"), "routes: {}\n").unwrap();
        std::fs::create_dir(dir.path().join("providers")).unwrap();
        std::fs::create_dir(dir.path().join("prompts")).unwrap();
        let (gw, cfg) = crate::load(&dir.path().join("promptgate.yaml"), &|_| None).unwrap();
        let settings = crate::server_settings(&cfg);
        let state = AppState {
            gw,
            permits: Arc::new(tokio::sync::Semaphore::new(settings.max_concurrency)),
            settings,
        };
        let app = Router::new()
            .route(
                "/v1/chat/completions",
                post(|| async { panic!("boom") as &'static str }),
            )
            .route(
                "/v1/messages",
                post(|| async { panic!("boom") as &'static str }),
            )
            .layer(
                ServiceBuilder::new()
                    .layer(middleware::from_fn_with_state(state, edge))
                    .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                        panic_response,
                    )),
            );
        for (path, anthropic) in [("/v1/chat/completions", false), ("/v1/messages", true)] {
            let req = Request::builder()
                .method("POST")
                .uri(path)
                .header(REQUEST_ID, "req-panic-1")
                .body(Body::empty())
                .unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(resp.headers()[REQUEST_ID], "req-panic-1");
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let text = v.to_string();
            assert!(text.contains("req-panic-1"), "{path}: {text}");
            if anthropic {
                assert_eq!(v["type"], "error", "{text}");
            } else {
                assert!(v["error"]["message"].is_string(), "{text}");
            }
        }
    }

    #[test]
    fn request_ids_are_pg_and_twenty_hex_digits_and_never_repeat() {
        let a = new_request_id();
        let b = new_request_id();
        for id in [&a, &b] {
            assert_eq!(id.len(), 23, "{id}");
            assert!(id.starts_with("pg-"), "{id}");
            assert!(id[3..]
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        }
        assert_eq!(a[..11], b[..11], "one process prefix");
        assert_ne!(a, b);
    }

    #[test]
    fn log_safe_escapes_control_characters() {
        assert_eq!(
            LogSafe("model `a\nFORGED line`\r\t\u{1b}[31m é").to_string(),
            "model `a\\nFORGED line`\\r\\t\\u{1b}[31m é"
        );
        assert_eq!(LogSafe(42).to_string(), "42");
    }

    #[test]
    fn unlisted_errors_name_no_configured_ids() {
        let e = unlisted(GatewayError::UnknownModel {
            model: "m".into(),
            available: "secret-a, secret-b".into(),
        });
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = unlisted(GatewayError::NotFoundPrompt {
            message: "prompt `x` does not exist; prompts: secret".into(),
        });
        assert_eq!(
            e.to_string(),
            GatewayError::NotFoundPrompt {
                message: "prompt `x` does not exist".into()
            }
            .to_string()
        );
        let e = unlisted(GatewayError::ProviderUnavailable {
            provider: "secret-p".into(),
            reason: "environment variable SECRET_KEY (its API key) is not set".into(),
            public: "it is not configured for use",
        });
        assert_eq!(
            e.to_string(),
            "the route's provider is unavailable: it is not configured for use"
        );
        let e = unlisted(GatewayError::NoTarget {
            route: "r".into(),
            reason: "not self-hosted; secret-a: environment variable SECRET_A is not set; no streaming; 10 tokens > window 5; circuit open; secret-b: disabled by an operator".into(),
            public: "not self-hosted; provider unavailable; no streaming; 10 tokens > window 5; circuit open".into(),
        });
        assert_eq!(
            e.to_string(),
            "no target of route `r` can take the request: not self-hosted; provider unavailable; no streaming; 10 tokens > window 5; circuit open"
        );
    }
}
