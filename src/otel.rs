//! OpenTelemetry traces over OTLP/HTTP (protobuf), off unless `tracing` is
//! configured. One span per API request (kind SERVER, named
//! `{operation} {request model}` as the GenAI conventions ask), a CLIENT child
//! span per upstream attempt, INTERNAL children for the cache lookup and each
//! retrieval search. Attributes follow the GenAI semantic conventions
//! (`gen_ai.*`), plus `promptgate.*`; never message content, never a key.
//!
//! Off (no `tracing` section), a request's [`Trace`] is `None`: every method
//! here returns at once and nothing is allocated. On, finished spans go to the
//! SDK's batch processor (a bounded queue, its own thread; a full queue drops
//! spans rather than waiting); each export is one POST made by the tree's
//! reqwest client on the gateway's runtime ([`Export`]); a failure is counted
//! and logged once per outage, never seen by a client.
//!
//! W3C trace context: a request's `traceparent` / `tracestate` are continued;
//! each attempt's call carries a `traceparent` naming the attempt's span. The
//! transport adds it to whatever request it builds ([`outgoing_headers`]) from
//! the task-local the attempt loop scopes around the call ([`scoped`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};

use crate::canonical::{ChatRequest, ChatResponse, FinishReason, Usage};
use crate::config::{HeaderSource, TracingConfig};

/// Whether each API request runs in a log span carrying its id (JSON logs:
/// every line a request logs names it). Off for text logs, where the span
/// would cost its fields' formatting per request for nothing shown.
static REQUEST_SPANS: AtomicBool = AtomicBool::new(false);

/// Called once, when logging starts with JSON lines.
pub fn log_request_spans() {
    REQUEST_SPANS.store(true, Ordering::Relaxed);
}

pub fn request_spans() -> bool {
    REQUEST_SPANS.load(Ordering::Relaxed)
}

/// The process's exporter and tracer, started once by `serve`.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Tracing {
    /// Starts the batch exporter. `failures` counts failed exports; header
    /// values named by `headers_env` are read from `env` now.
    pub fn start(
        cfg: &TracingConfig,
        runtime: tokio::runtime::Handle,
        failures: prometheus::IntCounter,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Tracing, String> {
        let mut headers = std::collections::HashMap::new();
        for (name, source) in &cfg.headers {
            let value = match source {
                HeaderSource::Value(v) => v.clone(),
                HeaderSource::Env(var) => match env(var).filter(|v| !v.is_empty()) {
                    Some(v) => v,
                    None => {
                        tracing::warn!(header = %name, variable = %var,
                            "the variable of a trace exporter header is not set: the header is not sent");
                        continue;
                    }
                },
            };
            headers.insert(name.clone(), value);
        }
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .build()
            .map_err(|e| format!("cannot build the trace exporter's client: {e}"))?;
        let export = Export {
            client,
            runtime,
            state: Arc::new(ExportState {
                down: AtomicBool::new(false),
                failures,
            }),
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(export)
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(cfg.endpoint.clone())
            .with_timeout(cfg.timeout)
            .with_headers(headers)
            .build()
            .map_err(|e| format!("cannot set up the trace exporter: {e}"))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(cfg.max_queue)
            .with_max_export_batch_size(cfg.max_queue.clamp(1, 512))
            .with_scheduled_delay(cfg.flush_interval)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(cfg.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("promptgate");
        Ok(Tracing { provider, tracer })
    }

    /// Sends what is queued and stops the exporter, within `limit`.
    pub fn shutdown(&self, limit: Duration) {
        let _ = self.provider.shutdown_with_timeout(limit);
    }

    /// The span of a request that arrived at `arrived` (continuing the trace
    /// its `traceparent` names, if any): `{operation} {model}`, kind SERVER.
    pub fn request(
        &self,
        headers: &HeaderMap,
        operation: &'static str,
        model: &str,
        request_id: &str,
        arrived: SystemTime,
    ) -> Trace {
        let parent =
            TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
        let name = if model.is_empty() {
            operation.to_owned()
        } else {
            format!("{operation} {model}")
        };
        let mut attrs = vec![
            KeyValue::new("gen_ai.operation.name", operation),
            KeyValue::new("promptgate.request_id", request_id.to_owned()),
        ];
        if !model.is_empty() {
            attrs.push(KeyValue::new("gen_ai.request.model", model.to_owned()));
        }
        let span = self.tracer.build_with_context(
            SpanBuilder::from_name(name)
                .with_kind(SpanKind::Server)
                .with_start_time(arrived)
                .with_attributes(attrs),
            &parent,
        );
        Trace(Some(Arc::new(Live {
            cx: parent.with_span(span),
            tracer: self.tracer.clone(),
        })))
    }
}

/// A request's span, shared by the stages that add to it; it ends when the
/// last holder lets it go (the response body's end, a stream's included).
/// `Trace::default()` is tracing off.
#[derive(Clone, Default)]
pub struct Trace(Option<Arc<Live>>);

struct Live {
    cx: Context,
    tracer: SdkTracer,
}

impl Trace {
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    fn with(&self, f: impl FnOnce(&Live)) {
        if let Some(l) = &self.0 {
            if l.cx.span().is_recording() {
                f(l)
            }
        }
    }

    /// Sets one attribute (computed only when the span records).
    pub fn set(&self, kv: impl FnOnce() -> KeyValue) {
        self.with(|l| l.cx.span().set_attribute(kv()));
    }

    /// The request's own parameters, as the conventions name them.
    pub fn chat_request(&self, req: &ChatRequest) {
        self.with(|l| {
            let span = l.cx.span();
            let p = &req.params;
            if let Some(m) = p.output_limit() {
                span.set_attribute(KeyValue::new("gen_ai.request.max_tokens", i64::from(m)));
            }
            if let Some(t) = p.temperature {
                span.set_attribute(KeyValue::new("gen_ai.request.temperature", t));
            }
            if let Some(t) = p.top_p {
                span.set_attribute(KeyValue::new("gen_ai.request.top_p", t));
            }
            span.set_attribute(KeyValue::new("promptgate.stream", req.stream));
        });
    }

    /// The model the request names, once known (a prompt's route).
    pub fn model(&self, operation: &'static str, model: &str) {
        self.with(|l| {
            let span = l.cx.span();
            span.update_name(format!("{operation} {model}"));
            span.set_attribute(KeyValue::new("gen_ai.request.model", model.to_owned()));
        });
    }

    /// Where the request was placed.
    pub fn placed(&self, route: &str, arm: Option<&str>) {
        self.with(|l| {
            let span = l.cx.span();
            span.set_attribute(KeyValue::new("promptgate.route", route.to_owned()));
            if let Some(a) = arm {
                span.set_attribute(KeyValue::new("promptgate.arm", a.to_owned()));
            }
        });
    }

    /// Who answered: the provider (its kind's `gen_ai.provider.name`) and the target.
    pub fn served(&self, kind: &str, provider: &str, target: &str, attempts: u32) {
        self.with(|l| {
            let span = l.cx.span();
            span.set_attribute(KeyValue::new("gen_ai.provider.name", kind.to_owned()));
            span.set_attribute(KeyValue::new("promptgate.provider", provider.to_owned()));
            span.set_attribute(KeyValue::new("promptgate.target", target.to_owned()));
            span.set_attribute(KeyValue::new("promptgate.attempts", i64::from(attempts)));
        });
    }

    pub fn cache_status(&self, status: &'static str) {
        self.set(|| KeyValue::new("promptgate.cache", status));
    }

    /// A complete answer's id, model, finish reasons and usage.
    pub fn response(&self, resp: &ChatResponse) {
        self.with(|l| {
            let span = l.cx.span();
            span.set_attribute(KeyValue::new("gen_ai.response.id", resp.id.clone()));
            span.set_attribute(KeyValue::new("gen_ai.response.model", resp.model.clone()));
            span.set_attribute(finish_reasons(
                resp.choices.iter().filter_map(|c| c.finish_reason),
            ));
        });
        if let Some(u) = &resp.usage {
            self.usage(u);
        }
    }

    /// A stream's id and model, from its first event.
    pub fn response_meta(&self, id: &str, model: &str) {
        self.with(|l| {
            let span = l.cx.span();
            if !id.is_empty() {
                span.set_attribute(KeyValue::new("gen_ai.response.id", id.to_owned()));
            }
            if !model.is_empty() {
                span.set_attribute(KeyValue::new("gen_ai.response.model", model.to_owned()));
            }
        });
    }

    /// A stream's finish reasons, once it ended.
    pub fn finish_reasons(&self, reasons: &[FinishReason]) {
        if reasons.is_empty() {
            return;
        }
        self.with(|l| {
            l.cx.span()
                .set_attribute(finish_reasons(reasons.iter().copied()))
        });
    }

    pub fn usage(&self, u: &Usage) {
        self.with(|l| {
            let span = l.cx.span();
            span.set_attribute(KeyValue::new(
                "gen_ai.usage.input_tokens",
                i64::from(u.prompt_tokens),
            ));
            span.set_attribute(KeyValue::new(
                "gen_ai.usage.output_tokens",
                i64::from(u.completion_tokens),
            ));
            if u.estimated {
                span.set_attribute(KeyValue::new("promptgate.usage", "estimated"));
            }
        });
    }

    /// The request failed: `error.type`, and for a server-side failure (a
    /// 5xx, a stream cut after it began) the span's error status — a client's
    /// error (4xx) leaves a SERVER span's status unset, as the HTTP
    /// conventions say.
    pub fn failed(&self, error: &str, server_fault: bool) {
        self.with(|l| {
            let span = l.cx.span();
            span.set_attribute(KeyValue::new("error.type", error.to_owned()));
            if server_fault {
                span.set_status(Status::error(error.to_owned()));
            }
        });
    }

    /// The HTTP status the client got.
    pub fn status(&self, status: u16) {
        self.set(|| KeyValue::new("http.response.status_code", i64::from(status)));
    }

    /// A child span (`None` when tracing is off). Under a request that is
    /// not sampled the child is not recorded either, but it exists: its id
    /// goes upstream in `traceparent` (marked not sampled), so its name and
    /// attributes are not even built then.
    pub fn child(
        &self,
        name: impl FnOnce() -> String,
        kind: SpanKind,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) -> Child {
        let Some(l) = &self.0 else {
            return Child(None);
        };
        let parent = l.cx.span();
        if !parent.is_recording() && !parent.span_context().is_valid() {
            return Child(None);
        }
        let builder = if parent.is_recording() {
            SpanBuilder::from_name(name())
                .with_kind(kind)
                .with_attributes(attrs())
        } else {
            SpanBuilder::from_name("").with_kind(kind)
        };
        Child(Some(l.tracer.build_with_context(builder, &l.cx)))
    }
}

fn finish_reasons(reasons: impl Iterator<Item = FinishReason>) -> KeyValue {
    let list: Vec<StringValue> = reasons.map(|r| StringValue::from(r.as_str())).collect();
    KeyValue::new(
        "gen_ai.response.finish_reasons",
        Value::Array(Array::String(list)),
    )
}

/// A child span: an attempt, a cache lookup, a search. Ends when dropped.
pub struct Child(Option<opentelemetry_sdk::trace::Span>);

impl Child {
    pub fn off() -> Child {
        Child(None)
    }

    pub fn set(&mut self, kv: impl FnOnce() -> KeyValue) {
        if let Some(s) = &mut self.0 {
            if s.is_recording() {
                s.set_attribute(kv());
            }
        }
    }

    pub fn failed(&mut self, error: &str) {
        if let Some(s) = &mut self.0 {
            s.set_attribute(KeyValue::new("error.type", error.to_owned()));
            s.set_status(Status::error(error.to_owned()));
        }
    }

    /// The headers a call made within this span carries: its `traceparent`
    /// (and the trace's `tracestate`).
    pub fn outgoing(&self) -> Option<Outgoing> {
        let sc = self.0.as_ref()?.span_context();
        if !sc.is_valid() {
            return None;
        }
        let traceparent = format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        );
        let state = sc.trace_state().header();
        Some(Outgoing {
            traceparent: HeaderValue::from_str(&traceparent).ok()?,
            tracestate: (!state.is_empty())
                .then(|| HeaderValue::from_str(&state).ok())
                .flatten(),
        })
    }
}

/// The trace headers of one upstream call.
#[derive(Clone)]
pub struct Outgoing {
    traceparent: HeaderValue,
    tracestate: Option<HeaderValue>,
}

tokio::task_local! {
    static OUTGOING: Outgoing;
}

/// `call`, with `headers` given to every upstream request it builds.
pub fn scoped<F: Future>(
    headers: Option<Outgoing>,
    call: F,
) -> futures_util::future::Either<F, tokio::task::futures::TaskLocalFuture<Outgoing, F>> {
    match headers {
        None => futures_util::future::Either::Left(call),
        Some(h) => futures_util::future::Either::Right(OUTGOING.scope(h, call)),
    }
}

/// Adds the current attempt's trace headers, if it has any, to an upstream
/// request's headers.
pub fn outgoing_headers(headers: &mut HeaderMap) {
    let _ = OUTGOING.try_with(|o| {
        headers.insert(
            http::HeaderName::from_static("traceparent"),
            o.traceparent.clone(),
        );
        if let Some(s) = &o.tracestate {
            headers.insert(http::HeaderName::from_static("tracestate"), s.clone());
        }
    });
}

/// The `server.address` and `server.port` of a base URL.
pub fn server_of(base_url: &str) -> Vec<KeyValue> {
    let Ok(uri) = base_url.parse::<http::Uri>() else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(2);
    if let Some(h) = uri.host() {
        out.push(KeyValue::new("server.address", h.to_owned()));
    }
    let port = uri.port_u16().or(match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    });
    if let Some(p) = port {
        out.push(KeyValue::new("server.port", i64::from(p)));
    }
    out
}

/// The exporter's HTTP client: each POST runs on the gateway's runtime (the
/// SDK's batch thread waits for it), under the configured timeout.
#[derive(Debug)]
struct Export {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    state: Arc<ExportState>,
}

struct ExportState {
    /// In an outage: logged once when it starts and once when it ends.
    down: AtomicBool,
    failures: prometheus::IntCounter,
}

impl std::fmt::Debug for ExportState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportState")
    }
}

impl ExportState {
    fn failed(&self, why: &str) {
        self.failures.inc();
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %crate::server::LogSafe(why),
                "cannot send traces to the collector; spans are dropped until it answers again");
        }
    }

    fn succeeded(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("traces reach the collector again");
        }
    }
}

type HttpResult = Result<http::Response<Bytes>, opentelemetry_http::HttpError>;

impl opentelemetry_http::HttpClient for Export {
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: http::Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = HttpResult> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let client = self.client.clone();
        let state = self.state.clone();
        let work = async move {
            let out = post(&client, request).await;
            match &out {
                Ok(r) if r.status().is_success() => state.succeeded(),
                Ok(r) => state.failed(&format!("the collector answered {}", r.status())),
                Err(e) => state.failed(&e.to_string()),
            }
            out
        };
        let _entered = self.runtime.enter();
        let handle = crate::task::spawn("trace-export", work);
        Box::pin(async move {
            handle
                .await
                .map_err(|e| -> opentelemetry_http::HttpError { Box::new(e) })?
        })
    }
}

/// Most of a collector's answer read (it is a small protobuf message).
const ANSWER_BYTES: usize = 64 * 1024;

async fn post(client: &reqwest::Client, request: http::Request<Bytes>) -> HttpResult {
    let (parts, body) = request.into_parts();
    let mut resp = client
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await
        .map_err(|e| -> opentelemetry_http::HttpError { Box::new(e.without_url()) })?;
    let status = resp.status();
    let headers = std::mem::take(resp.headers_mut());
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| -> opentelemetry_http::HttpError { Box::new(e.without_url()) })?
    {
        if body.len() + chunk.len() > ANSWER_BYTES {
            break;
        }
        body.extend_from_slice(&chunk);
    }
    let mut out = http::Response::new(Bytes::from(body));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn server_address_and_port_come_from_the_base_url() {
        let kv = |v: Vec<KeyValue>| -> Vec<(String, String)> {
            v.into_iter()
                .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                .collect()
        };
        assert_eq!(
            kv(server_of("http://10.0.0.7:8000/v1")),
            vec![
                ("server.address".into(), "10.0.0.7".into()),
                ("server.port".into(), "8000".into())
            ]
        );
        assert_eq!(
            kv(server_of("https://api.example.com/v1")),
            vec![
                ("server.address".into(), "api.example.com".into()),
                ("server.port".into(), "443".into())
            ]
        );
        assert!(server_of("not a url").is_empty());
    }

    #[tokio::test]
    async fn off_means_no_span_no_header() {
        let off = Trace::default();
        assert!(!off.is_on());
        let child = off.child(
            || unreachable!("no name is made when tracing is off"),
            SpanKind::Client,
            || unreachable!("no attribute is made when tracing is off"),
        );
        assert!(child.outgoing().is_none());
        let mut headers = HeaderMap::new();
        scoped(child.outgoing(), async { outgoing_headers(&mut headers) }).await;
        assert!(headers.is_empty());
    }

    #[tokio::test]
    async fn an_attempt_call_carries_its_spans_traceparent() {
        let provider = SdkTracerProvider::builder().build();
        let tracer = provider.tracer("test");
        let mut incoming = HeaderMap::new();
        incoming.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let t = Tracing {
            provider: provider.clone(),
            tracer,
        };
        let trace = t.request(&incoming, "chat", "m", "pg-1", SystemTime::now());
        let child = trace.child(|| "chat x".into(), SpanKind::Client, Vec::new);
        let span_id = child.0.as_ref().unwrap().span_context().span_id();
        let mut headers = HeaderMap::new();
        scoped(child.outgoing(), async { outgoing_headers(&mut headers) }).await;
        assert_eq!(
            headers["traceparent"],
            format!("00-0af7651916cd43dd8448eb211c80319c-{span_id}-01").as_str()
        );
        // Outside the attempt's scope nothing is added.
        let mut other = HeaderMap::new();
        outgoing_headers(&mut other);
        assert!(other.is_empty());
    }
}
