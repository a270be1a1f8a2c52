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

use crate::canonical::{ChatRequest, EmbeddingEncoding};
use crate::error::GatewayError;
use crate::error::{ErrorKind, UpstreamError};
use crate::gateway::{ChatOutcome, Gateway, RequestMeta, Served};
use crate::prompt::PromptRef;
use crate::wire::openai::{self as wire, OpenAi};
use crate::wire::Dialect;

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
}

#[derive(Clone)]
struct AppState {
    gw: Arc<Gateway>,
    settings: ServerSettings,
}

/// The request's id, set by the edge layer (or generated here if a handler runs
/// without it, e.g. in a unit test).
#[derive(Clone)]
pub struct RequestId(pub Arc<str>);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = Infallible;
    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(|| RequestId(new_request_id().into())))
    }
}

/// The prompt version a response used.
#[derive(Clone)]
struct PromptUse {
    id: String,
    version: u32,
}

/// What a handler tells the edge about its response, for headers and metrics.
#[derive(Clone)]
struct Outcome {
    prompt: Option<PromptUse>,
    route: Option<Arc<str>>,
    /// The provider that answered.
    provider: Option<Arc<str>>,
    arm: Option<(Arc<str>, Arc<crate::router::ArmStats>)>,
    upstream: Duration,
    error: Option<&'static str>,
    /// Streams record their own duration when they end.
    streaming: bool,
}

fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let prefix = *PREFIX.get_or_init(rand::random);
    format!(
        "pg-{prefix:08x}{:012x}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
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
        None => new_request_id().into(),
    };
    req.extensions_mut().insert(RequestId(id.clone()));
    let anthropic = req.uri().path() == "/v1/messages";
    let metrics = &app.gw.metrics;
    metrics.in_flight.inc();
    let mut resp = next.run(req).await;
    metrics.in_flight.dec();
    if resp.extensions().get::<Panicked>().is_some() {
        resp = panic_body(&id, anthropic);
    }
    let elapsed = start.elapsed();
    let outcome = resp.extensions_mut().remove::<Outcome>();
    let upstream = outcome.as_ref().map(|o| o.upstream).unwrap_or_default();
    let overhead = elapsed.saturating_sub(upstream);
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert(REQUEST_ID, v);
    }
    h.insert(OVERHEAD, HeaderValue::from(overhead.as_micros() as u64));
    if let Some(o) = outcome {
        let route = o.route.as_deref().unwrap_or("");
        let provider = o.provider.as_deref().unwrap_or("");
        let status = resp.status();
        let mut code = itoa::Buffer::new();
        metrics
            .requests
            .with_label_values(&[route, provider, code.format(status.as_u16())])
            .inc();
        if let Some(kind) = o.error {
            metrics.errors.with_label_values(&[kind, route]).inc();
        }
        if let Some(p) = &o.prompt {
            let mut v = itoa::Buffer::new();
            metrics
                .prompt_requests
                .with_label_values(&[&p.id, v.format(p.version), code.format(status.as_u16())])
                .inc();
        }
        if let Some((arm, stats)) = &o.arm {
            metrics
                .arm_requests
                .with_label_values(&[route, arm, code.format(status.as_u16())])
                .inc();
            if !o.streaming {
                metrics
                    .arm_seconds
                    .with_label_values(&[route, arm])
                    .observe(elapsed.as_secs_f64());
                stats.record(status.is_success(), elapsed, 0);
            }
        }
        if o.route.is_some() {
            metrics
                .overhead_seconds
                .with_label_values(&[route])
                .observe(overhead.as_secs_f64());
            if !o.streaming {
                metrics
                    .request_seconds
                    .with_label_values(&[route])
                    .observe(elapsed.as_secs_f64());
            }
        }
    }
    resp
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
    route: Option<Arc<str>>,
) -> Response {
    let status =
        StatusCode::from_u16(dialect.error_status(&err)).unwrap_or(StatusCode::BAD_GATEWAY);
    if status.is_server_error() {
        tracing::warn!(request_id = %id.0, status = status.as_u16(), code = err.code(), error = %err, "request failed");
    } else {
        tracing::info!(request_id = %id.0, status = status.as_u16(), code = err.code(), error = %err, "request rejected");
    }
    let mut resp = json_response(status, dialect.error_body(&err, &id.0));
    if let GatewayError::Upstream(e) = &err {
        if let Some(ra) = e.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(ra.as_secs()));
        }
    }
    let provider = match &err {
        GatewayError::Upstream(e) if !e.provider.is_empty() => Some(Arc::from(e.provider.as_str())),
        _ => None,
    };
    resp.extensions_mut().insert(Outcome {
        prompt: None,
        route,
        provider,
        arm: None,
        upstream: Duration::ZERO,
        error: Some(err.code()),
        streaming: false,
    });
    resp
}

/// A request body read under the size limit. A too-large body becomes a 413 in
/// the client's dialect (the handler knows which), not the framework's plain text.
struct LimitedBody(Result<Bytes, GatewayError>);

impl FromRequest<AppState> for LimitedBody {
    type Rejection = Infallible;
    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(LimitedBody(match Bytes::from_request(req, state).await {
            Ok(b) => Ok(b),
            Err(rej) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(GatewayError::PayloadTooLarge {
                    limit: state.settings.max_body_bytes,
                })
            }
            Err(rej) => Err(GatewayError::invalid(
                format!("cannot read request body: {}", rej.body_text()),
                None,
            )),
        }))
    }
}

/// The target that answered, the attempts it took and the A/B arm.
pub const TARGET: HeaderName = HeaderName::from_static("x-promptgate-target");
pub const ATTEMPTS: HeaderName = HeaderName::from_static("x-promptgate-attempts");
pub const ARM: HeaderName = HeaderName::from_static("x-promptgate-arm");
/// `hit`, `miss`, `bypass` or `refresh` (with `age` on a hit).
pub const CACHE: HeaderName = HeaderName::from_static("x-promptgate-cache");

fn served_headers<T>(resp: &mut Response, served: &Served<T>, streaming: bool) {
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
    resp.extensions_mut().insert(Outcome {
        prompt: None,
        route: Some(served.route.name.clone()),
        provider: Some(served.target.provider_id.clone()),
        arm,
        upstream: served.upstream,
        error: None,
        streaming,
    });
}

/// Chat in any client dialect: decode, run the pipeline, encode the answer or
/// the stream.
async fn chat<D: Dialect + Default>(
    State(app): State<AppState>,
    id: RequestId,
    headers: http::HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Response {
    let dialect = D::default();
    let d: &dyn Dialect = &dialect;
    let mut req = match body.and_then(|b| d.decode_chat(&b)) {
        Ok(r) => r,
        Err(e) => return error_response(d, e, &id, None),
    };
    // The prompt extension object, in any dialect.
    let prompt = match req.extra.remove("prompt").map(PromptRef::from_json) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => return error_response(d, e, &id, None),
    };
    serve_chat(app, d, id, &headers, req, prompt).await
}

/// `POST /v1/prompts/{id}/chat/completions`: the body holds `variables`, an
/// optional `version` or `label`, and the usual chat options; `model` and
/// `messages` are optional (the version names its route; messages are appended).
async fn prompt_chat(
    State(app): State<AppState>,
    id: RequestId,
    Path(prompt_id): Path<String>,
    headers: http::HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Response {
    let d: &dyn Dialect = &OpenAi;
    let parsed = body.and_then(|b| {
        serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| {
            GatewayError::invalid(format!("request body is not valid JSON: {e}"), None)
        })
    });
    let mut obj = match parsed {
        Ok(serde_json::Value::Object(o)) => o,
        Ok(_) => {
            return error_response(
                d,
                GatewayError::invalid("request body must be a JSON object", None),
                &id,
                None,
            )
        }
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
    serve_chat(app, d, id, &headers, req, Some(prompt)).await
}

/// Runs a decoded chat request (after rendering its prompt, if any) and encodes
/// the outcome in dialect `d`.
async fn serve_chat(
    app: AppState,
    d: &dyn Dialect,
    id: RequestId,
    headers: &http::HeaderMap,
    mut req: ChatRequest,
    prompt: Option<PromptRef>,
) -> Response {
    let snap = app.gw.snapshot();
    let mut meta = RequestMeta {
        headers,
        prompt: None,
    };
    let used = match prompt {
        None => None,
        Some(mut p) => {
            // A split over prompt versions: a request that names no version gets
            // its arm's, and stays on the split route.
            let mut pinned_route = None;
            if p.explicit_selector.is_none() {
                if let Some(sel) = app.gw.arm_prompt(&snap, &req, &meta) {
                    p.selector = sel;
                    pinned_route = Some(req.model.clone());
                }
            }
            match snap.prompts.render(&p) {
                Ok(r) => {
                    let used = PromptUse {
                        id: r.id.clone(),
                        version: r.version,
                    };
                    r.apply(&mut req);
                    if let Some(route) = pinned_route {
                        req.model = route;
                    }
                    meta.prompt = Some((used.id.clone(), used.version));
                    if req.model.is_empty() {
                        let e = GatewayError::invalid(
                            format!(
                                "prompt `{}` version {} names no route: give `model`",
                                used.id, used.version
                            ),
                            Some("model"),
                        );
                        return error_response(d, e, &id, None);
                    }
                    Some(used)
                }
                Err(e) => {
                    let mut resp = error_response(d, e, &id, None);
                    app.gw
                        .metrics
                        .prompt_errors
                        .with_label_values(&[&p.id])
                        .inc();
                    resp.headers_mut().insert(
                        PROMPT,
                        HeaderValue::from_str(&p.id).unwrap_or(HeaderValue::from_static("-")),
                    );
                    return resp;
                }
            }
        }
    };
    let mut resp = run_chat(&app, d, &id, &snap, req, &meta).await;
    if let Some(u) = used {
        if let Ok(v) = HeaderValue::from_str(&u.id) {
            resp.headers_mut().insert(PROMPT, v);
        }
        resp.headers_mut()
            .insert(PROMPT_VERSION, HeaderValue::from(u.version));
        if let Some(o) = resp.extensions_mut().get_mut::<Outcome>() {
            o.prompt = Some(u);
        }
    }
    resp
}

async fn run_chat(
    app: &AppState,
    d: &dyn Dialect,
    id: &RequestId,
    snap: &Arc<crate::snapshot::Snapshot>,
    req: ChatRequest,
    meta: &RequestMeta<'_>,
) -> Response {
    let id = id.clone();
    let route = snap.route(&req.model).map(|r| r.name.clone());
    let mut encoder = req.stream.then(|| d.stream_encoder(&req));
    let served = match tokio::time::timeout(
        app.settings.request_timeout,
        app.gw.chat(snap, req, meta),
    )
    .await
    {
        Err(_) => {
            let e = UpstreamError::new(
                ErrorKind::Timeout,
                "no response from the backend within the gateway's request timeout",
            );
            return error_response(d, e.into(), &id, route);
        }
        Ok(Err(e)) => return error_response(d, e, &id, route),
        Ok(Ok(s)) => s,
    };
    let (value, served) = served.split();
    match (value, encoder.take()) {
        (ChatOutcome::Complete(resp), _) => {
            let estimated = resp.usage.is_some_and(|u| u.estimated);
            let mut out = json_response(StatusCode::OK, d.encode_chat(&resp, &served.route.name));
            out.headers_mut().insert(
                USAGE,
                HeaderValue::from_static(if estimated { "estimated" } else { "reported" }),
            );
            served_headers(&mut out, &served, false);
            out
        }
        (ChatOutcome::Stream(mut events), Some(mut encoder)) => {
            let request_id = id.0.clone();
            let body = async_stream::stream! {
                let mut buf = Vec::with_capacity(512);
                while let Some(ev) = events.next().await {
                    match ev {
                        Ok(ev) => encoder.encode(&ev, &mut buf),
                        Err(e) => {
                            encoder.encode_error(&GatewayError::Upstream(e), &request_id, &mut buf);
                            yield Ok::<Bytes, Infallible>(Bytes::from(std::mem::take(&mut buf)));
                            return;
                        }
                    }
                    if !buf.is_empty() {
                        yield Ok(Bytes::from(std::mem::replace(&mut buf, Vec::with_capacity(512))));
                    }
                }
            };
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
            served_headers(&mut out, &served, true);
            out
        }
        (ChatOutcome::Stream(_), None) => error_response(
            d,
            GatewayError::Internal("a stream was returned for a non-streaming request".into()),
            &id,
            Some(served.route.name.clone()),
        ),
    }
}

async fn embeddings(
    State(app): State<AppState>,
    id: RequestId,
    LimitedBody(body): LimitedBody,
) -> Response {
    let req = match body.and_then(|b| wire::decode_embeddings_request(&b)) {
        Ok(r) => r,
        Err(e) => return error_response(&OpenAi, e, &id, None),
    };
    let encoding: EmbeddingEncoding = req.encoding;
    let snap = app.gw.snapshot();
    let route = snap.route(&req.model).map(|r| r.name.clone());
    match app.gw.embed(&snap, req).await {
        Err(e) => error_response(&OpenAi, e, &id, route),
        Ok(served) => {
            let mut out = json_response(
                StatusCode::OK,
                wire::encode_embeddings_response(&served.value, &served.route.name, encoding),
            );
            out.headers_mut().insert(
                USAGE,
                HeaderValue::from_static(if served.value.usage.estimated {
                    "estimated"
                } else {
                    "reported"
                }),
            );
            served_headers(&mut out, &served, false);
            out
        }
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

async fn get_model(
    State(app): State<AppState>,
    id: RequestId,
    Path(model): Path<String>,
) -> Response {
    let snap = app.gw.snapshot();
    if snap.route(&model).is_none() {
        return error_response(
            &OpenAi,
            GatewayError::UnknownModel {
                model,
                available: snap.route_list.clone(),
            },
            &id,
            None,
        );
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

async fn metrics(State(app): State<AppState>) -> Response {
    app.gw.refresh_cache_gauges().await;
    let mut resp = Response::new(Body::from(app.gw.metrics.render()));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

async fn not_found(id: RequestId, req: Request) -> Response {
    error_response(
        &OpenAi,
        GatewayError::NotFound {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
        },
        &id,
        None,
    )
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
        crate::wire::anthropic::Anthropic.error_body(&err, request_id)
    } else {
        wire::error_body(&err, request_id)
    };
    json_response(StatusCode::INTERNAL_SERVER_ERROR, body)
}

async fn overloaded(_: tower::BoxError) -> Response {
    let err = GatewayError::Upstream(crate::error::UpstreamError::new(
        crate::error::ErrorKind::Overloaded,
        "the gateway is at its concurrency limit; retry shortly",
    ));
    json_response(StatusCode::SERVICE_UNAVAILABLE, wire::error_body(&err, ""))
}

/// The whole HTTP application.
pub fn router(gw: Arc<Gateway>, settings: ServerSettings) -> Router {
    let state = AppState {
        gw,
        settings: settings.clone(),
    };
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::<OpenAi>))
        .route(
            "/v1/messages",
            post(chat::<crate::wire::anthropic::Anthropic>),
        )
        .route("/v1/prompts/{prompt}/chat/completions", post(prompt_chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/healthz", get(healthz))
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
            ))
            .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
            .load_shed()
            .concurrency_limit(settings.max_concurrency),
    )
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        error_response(&OpenAi, self, &RequestId(new_request_id().into()), None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tower::ServiceExt;

    /// A handler that panics behind the same layers as the real router still
    /// answers with a dialect error carrying the request id.
    #[tokio::test]
    async fn a_panicking_handler_answers_with_the_request_id() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("promptgate.yaml"), "routes: {}\n").unwrap();
        std::fs::create_dir(dir.path().join("providers")).unwrap();
        std::fs::create_dir(dir.path().join("prompts")).unwrap();
        let (gw, cfg) = crate::load(&dir.path().join("promptgate.yaml"), &|_| None).unwrap();
        let state = AppState {
            gw,
            settings: crate::server_settings(&cfg),
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
}
