//! The request pipeline, as plain async functions over canonical types: resolve the
//! route in the request's snapshot, apply its overrides, call the provider, and
//! fill in what the backend left out (usage). Dialect-free: the ingress decodes
//! before and encodes after.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use tokio::time::Instant;

use crate::canonical::*;
use crate::error::{GatewayError, UpstreamError};
use crate::metrics::Metrics;
use crate::provider::registry::ProviderState;
use crate::provider::{EventStream, Provider};
use crate::snapshot::{Route, Snapshot};
use crate::tokens;

pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
}

/// A pipeline result plus what the edge reports about it.
pub struct Served<T> {
    pub route: Arc<Route>,
    pub value: T,
    /// Time spent waiting on the backend before the response could start.
    pub upstream: Duration,
}

pub enum ChatOutcome {
    Complete(ChatResponse),
    /// A stream whose first output has arrived: nothing has gone to the client yet,
    /// so a failure before this point is still an ordinary error response.
    Stream(EventStream),
}

impl Gateway {
    pub fn new(snapshot: Snapshot) -> Result<Arc<Self>, prometheus::Error> {
        Ok(Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics: Metrics::new()?,
        }))
    }

    /// The current snapshot; a request loads it once and uses it throughout.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot atomically; requests in flight keep the old one.
    pub fn swap(&self, next: Snapshot) {
        self.snapshot.store(Arc::new(next));
    }

    fn resolve<'s>(
        snap: &'s Snapshot,
        model: &str,
    ) -> Result<(&'s Arc<Route>, &'s Arc<dyn Provider>), GatewayError> {
        let route = snap
            .route(model)
            .ok_or_else(|| GatewayError::UnknownModel {
                model: model.to_owned(),
                available: snap.route_list.clone(),
            })?;
        match &route.provider {
            ProviderState::Ready(p) => Ok((route, p)),
            ProviderState::Unavailable(reason) => Err(GatewayError::ProviderUnavailable {
                provider: route.provider_id.to_string(),
                reason: reason.clone(),
            }),
        }
    }

    pub async fn chat(
        self: &Arc<Self>,
        snap: &Snapshot,
        mut req: ChatRequest,
    ) -> Result<Served<ChatOutcome>, GatewayError> {
        if req.messages.is_empty() {
            return Err(GatewayError::invalid(
                "invalid field `messages`: at least one message is required",
                Some("messages"),
            ));
        }
        let (route, provider) = Self::resolve(snap, &req.model)?;
        if !route.overrides.is_empty() {
            route.overrides.apply(&mut req);
        }
        check_capabilities(route, &req)?;
        let started = Instant::now();
        if !req.stream {
            let result = provider.chat(&req, &route.model).await;
            let upstream = started.elapsed();
            self.observe_upstream(route, upstream);
            let mut resp = result?;
            let usage = match resp.usage {
                Some(u) => u,
                None => tokens::estimate(route.encoding, &req, &tokens::response_text(&resp)),
            };
            resp.usage = Some(usage);
            self.count_tokens(route, &usage);
            return Ok(Served {
                route: route.clone(),
                value: ChatOutcome::Complete(resp),
                upstream,
            });
        }
        let stream = provider.chat_stream(&req, &route.model).await;
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                self.observe_upstream(route, started.elapsed());
                return Err(e.into());
            }
        };
        // Hold the response until the first output: a backend that fails before
        // producing anything gets a proper error status, not a broken stream.
        let (head, rest) = match peek_output(stream).await {
            Ok(x) => x,
            Err(e) => {
                self.observe_upstream(route, started.elapsed());
                return Err(e.into());
            }
        };
        let upstream = started.elapsed();
        self.observe_upstream(route, upstream);
        self.metrics
            .ttft_seconds
            .with_label_values(&[&route.name, &route.provider_id])
            .observe(upstream.as_secs_f64());
        let tap = UsageTap {
            gateway: self.clone(),
            route: route.clone(),
            req,
            started,
            output: String::new(),
            usage: None,
        };
        Ok(Served {
            route: route.clone(),
            value: ChatOutcome::Stream(tap.wrap(head, rest)),
            upstream,
        })
    }

    pub async fn embed(
        self: &Arc<Self>,
        snap: &Snapshot,
        req: EmbeddingsRequest,
    ) -> Result<Served<EmbeddingsResponse>, GatewayError> {
        let (route, provider) = Self::resolve(snap, &req.model)?;
        if !route.capabilities.embeddings {
            return Err(unsupported(route, "embeddings"));
        }
        let started = Instant::now();
        let result = provider.embed(&req, &route.model).await;
        let upstream = started.elapsed();
        self.observe_upstream(route, upstream);
        let mut resp = result?;
        if resp.vectors.len() != req.input.len() {
            return Err(UpstreamError::new(
                crate::error::ErrorKind::MalformedResponse,
                format!(
                    "backend returned {} embeddings for {} inputs",
                    resp.vectors.len(),
                    req.input.len()
                ),
            )
            .into());
        }
        if resp.usage.prompt_tokens == 0 {
            let n = match &req.input {
                EmbeddingInput::Texts(t) => {
                    t.iter().map(|s| tokens::count(route.encoding, s)).sum()
                }
                EmbeddingInput::Tokens(t) => t.iter().map(|v| v.len() as u32).sum(),
            };
            resp.usage = Usage::new(n, 0);
            resp.usage.estimated = true;
        }
        self.count_tokens(route, &resp.usage);
        Ok(Served {
            route: route.clone(),
            value: resp,
            upstream,
        })
    }

    fn observe_upstream(&self, route: &Route, d: Duration) {
        self.metrics
            .upstream_seconds
            .with_label_values(&[&route.provider_id])
            .observe(d.as_secs_f64());
    }

    fn count_tokens(&self, route: &Route, u: &Usage) {
        let source = if u.estimated { "estimated" } else { "reported" };
        let labels = |dir| [&*route.name, &*route.provider_id, dir, source];
        self.metrics
            .tokens
            .with_label_values(&labels("in"))
            .inc_by(u64::from(u.prompt_tokens));
        self.metrics
            .tokens
            .with_label_values(&labels("out"))
            .inc_by(u64::from(u.completion_tokens));
    }
}

fn unsupported(route: &Route, capability: &str) -> GatewayError {
    GatewayError::Unsupported {
        route: route.name.to_string(),
        capability: capability.to_owned(),
    }
}

/// Rejects a request its target cannot serve, before anything is sent.
fn check_capabilities(route: &Route, req: &ChatRequest) -> Result<(), GatewayError> {
    let caps = &route.capabilities;
    if req.stream && !caps.streaming {
        return Err(unsupported(route, "streaming"));
    }
    if !req.tools.is_empty() && !caps.tools {
        return Err(unsupported(route, "tools (function calling)"));
    }
    if matches!(
        req.response_format,
        Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema(_))
    ) && !caps.json_mode
    {
        return Err(unsupported(route, "JSON mode (response_format)"));
    }
    if !caps.vision {
        let has_image = req.messages.iter().any(|m| {
            matches!(&m.content, Some(Content::Parts(p)) if p.iter().any(|p| matches!(p, Part::Image { .. })))
        });
        if has_image {
            return Err(unsupported(route, "vision (image input)"));
        }
    }
    Ok(())
}

/// Reads events until the first one a client would see as output (text, a tool
/// call, usage or the end). Returns them with the rest of the stream.
async fn peek_output(
    mut stream: EventStream,
) -> Result<(Vec<StreamEvent>, EventStream), UpstreamError> {
    let mut head = Vec::new();
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        let output = match &ev {
            StreamEvent::Delta(d) => d.has_output() || d.finish_reason.is_some(),
            StreamEvent::Usage(_) | StreamEvent::Done => true,
            StreamEvent::Meta(_) => false,
        };
        head.push(ev);
        if output {
            break;
        }
    }
    Ok((head, stream))
}

/// Watches a stream go by: collects output text and reported usage, and at the end
/// inserts an estimated usage event if the backend sent none, then records metrics.
struct UsageTap {
    gateway: Arc<Gateway>,
    route: Arc<Route>,
    req: ChatRequest,
    started: Instant,
    output: String,
    usage: Option<Usage>,
}

impl UsageTap {
    fn observe(&mut self, ev: &StreamEvent) {
        match ev {
            StreamEvent::Delta(d) => {
                if let Some(c) = &d.content {
                    self.output.push_str(c);
                }
                if let Some(r) = &d.reasoning {
                    self.output.push_str(r);
                }
                for t in &d.tool_calls {
                    if let Some(n) = &t.name {
                        self.output.push_str(n);
                    }
                    if let Some(a) = &t.arguments {
                        self.output.push_str(a);
                    }
                }
            }
            // Some backends repeat usage on several chunks; the last one is the total.
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::Meta(_) | StreamEvent::Done => {}
        }
    }

    fn finish(&mut self) -> Usage {
        let usage = match self.usage {
            Some(u) => u,
            None => tokens::estimate(self.route.encoding, &self.req, &self.output),
        };
        self.gateway.count_tokens(&self.route, &usage);
        self.record_end();
        usage
    }

    fn record_end(&self) {
        self.gateway
            .metrics
            .request_seconds
            .with_label_values(&[&self.route.name])
            .observe(self.started.elapsed().as_secs_f64());
    }

    fn fail(&self, e: &UpstreamError) {
        self.gateway
            .metrics
            .stream_errors
            .with_label_values(&[&self.route.name, &self.route.provider_id, e.kind.as_str()])
            .inc();
        self.gateway
            .metrics
            .errors
            .with_label_values(&[e.kind.as_str(), &self.route.name])
            .inc();
        self.record_end();
        tracing::warn!(route = %self.route.name, provider = %self.route.provider_id,
            kind = e.kind.as_str(), error = %e.message, "stream failed after it began");
    }

    fn wrap(mut self, head: Vec<StreamEvent>, mut rest: EventStream) -> EventStream {
        Box::pin(async_stream::stream! {
            let mut pending = head.into_iter();
            loop {
                let ev = match pending.next() {
                    Some(ev) => ev,
                    None => match rest.next().await {
                        Some(Ok(ev)) => ev,
                        Some(Err(e)) => {
                            self.fail(&e);
                            yield Err(e);
                            return;
                        }
                        None => return,
                    },
                };
                if ev == StreamEvent::Done {
                    if self.usage.is_none() {
                        let usage = self.finish();
                        yield Ok(StreamEvent::Usage(usage));
                    } else {
                        self.finish();
                    }
                    yield Ok(ev);
                    return;
                }
                self.observe(&ev);
                yield Ok(ev);
            }
        })
    }
}
