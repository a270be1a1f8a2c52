//! The request context: every per-request decision the pipeline needs, made once
//! at the edge from the headers and the decoded request. The route is resolved
//! once and the A/B arm is picked once ([`Placement`]); the stages after it read
//! the context and never look at headers again.

use std::sync::Arc;

use http::HeaderMap;

use crate::cache::Directive;
use crate::canonical::{ChatRequest, EmbeddingsRequest};
use crate::config::{CacheMode, Subject};
use crate::error::GatewayError;
use crate::governance::Caller;
use crate::snapshot::{Arm, Route, Snapshot, Target};

/// Header that restricts a request to self-hosted providers.
pub const PRIVATE_HEADER: &str = "x-promptgate-data";

/// The API dialect a request arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientDialect {
    OpenAi,
    Anthropic,
}

/// The prompt version a request was rendered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptUse {
    pub id: String,
    pub version: u32,
}

/// A route and the arm of it a request is assigned to, decided once.
#[derive(Clone)]
pub struct Placement {
    pub route: Arc<Route>,
    /// Index into the split's arms; `None` for a plain chain.
    arm: Option<usize>,
}

impl Placement {
    /// Resolves nothing: places a request on `route`, drawing its arm (sticky
    /// on the split's subject, at random without one). Called once per request.
    pub fn place(
        route: &Arc<Route>,
        headers: &HeaderMap,
        user: Option<&str>,
        caller: Option<&Caller>,
    ) -> Placement {
        let arm = match &route.plan {
            crate::snapshot::Plan::Chain(_) => None,
            crate::snapshot::Plan::Split { subject, .. } => {
                let subject = subject_of(subject, headers, user, caller);
                Some(route.arm_index(subject))
            }
        };
        Placement {
            route: route.clone(),
            arm,
        }
    }

    pub fn arm(&self) -> Option<&Arm> {
        self.arm.and_then(|i| self.route.arm_at(i))
    }

    /// The fallback chain of the placed arm (or the route's chain).
    pub fn chain(&self) -> &[Arc<Target>] {
        match self.arm() {
            Some(a) => &a.chain,
            None => self.route.chain(),
        }
    }
}

/// The split subject a request carries, if any.
fn subject_of<'a>(
    s: &Subject,
    headers: &'a HeaderMap,
    user: Option<&'a str>,
    caller: Option<&'a Caller>,
) -> Option<&'a str> {
    match s {
        Subject::User => user,
        Subject::Header(h) => headers.get(h.as_str()).and_then(|v| v.to_str().ok()),
        // The key's id when the key is configured, else the raw credential.
        Subject::Key if caller.is_some() => caller.map(|c| &*c.id),
        Subject::Key => headers
            .get(http::header::AUTHORIZATION)
            .or_else(|| headers.get("x-api-key"))
            .and_then(|v| v.to_str().ok()),
    }
}

/// Whether the client marked the request private.
pub(crate) fn private_header(headers: &HeaderMap) -> bool {
    headers
        .get(PRIVATE_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("private"))
}

/// Everything decided about a request before the pipeline runs it.
pub struct RequestContext {
    pub request_id: Arc<str>,
    pub dialect: ClientDialect,
    /// The snapshot the request was placed in; it serves the request to its end.
    pub snapshot: Arc<Snapshot>,
    pub placement: Placement,
    /// Only self-hosted targets may serve it (the route's or the client's choice).
    pub private: bool,
    /// The client's cache directive (`Normal` when the route does not cache).
    pub directive: Directive,
    /// The cache tenant (from the client's credential), when the route caches
    /// per tenant.
    pub tenant: Option<String>,
    pub prompt: Option<PromptUse>,
    /// Who sent it (the gateway key's id and entry), when known.
    pub caller: Option<crate::governance::Caller>,
    /// Its hold on governance state (limits, spend, audit), once admitted.
    pub ticket: Option<Arc<crate::governance::Ticket>>,
    /// The request before rendering, kept when its route's shadow candidates
    /// render another prompt version.
    pub shadow_source: Option<Arc<super::shadow::Source>>,
    /// Its span, when tracing is on (`Trace::default()`: off).
    pub trace: crate::otel::Trace,
}

impl RequestContext {
    /// Builds the context of a request placed on `placement`.
    pub fn new(
        request_id: Arc<str>,
        dialect: ClientDialect,
        snapshot: Arc<Snapshot>,
        placement: Placement,
        headers: &HeaderMap,
        prompt: Option<PromptUse>,
        caller: Option<Caller>,
    ) -> RequestContext {
        let route = &placement.route;
        let caching = route.cache.mode != CacheMode::Off;
        let directive = if caching {
            Directive::from_headers(headers)
        } else {
            Directive::Normal
        };
        // The key's id when the key is configured, else the raw credential's hash.
        let tenant = if caching && !route.cache.shared {
            match &caller {
                Some(c) => Some(format!("key:{}", c.id)),
                None => crate::cache::tenant_of(headers),
            }
        } else {
            None
        };
        RequestContext {
            request_id,
            dialect,
            private: route.private || private_header(headers),
            snapshot,
            placement,
            directive,
            tenant,
            prompt,
            caller,
            ticket: None,
            shadow_source: None,
            trace: crate::otel::Trace::default(),
        }
    }

    /// The route stage of a chat request, after rendering: the route resolved
    /// once and the arm picked once (by the render stage already, when the arm
    /// chose the prompt version). An error carries the route it concerns, if any.
    pub fn for_chat(
        request_id: Arc<str>,
        dialect: ClientDialect,
        snapshot: Arc<Snapshot>,
        headers: &HeaderMap,
        req: &ChatRequest,
        prepared: super::render::Prepared,
        caller: Option<Caller>,
    ) -> Result<RequestContext, (GatewayError, Option<Arc<Route>>)> {
        if req.messages.is_empty() {
            let route = snapshot.route(&req.model).cloned();
            let e = GatewayError::invalid(
                "invalid field `messages`: at least one message is required",
                Some("messages"),
            );
            return Err((e, route));
        }
        let placement = match prepared.placement {
            Some(p) => p,
            None => match snapshot.route(&req.model) {
                Some(route) => {
                    Placement::place(route, headers, req.params.user.as_deref(), caller.as_ref())
                }
                None => return Err((unknown_model(&snapshot, &req.model), None)),
            },
        };
        let mut ctx = RequestContext::new(
            request_id,
            dialect,
            snapshot,
            placement,
            headers,
            prepared.prompt,
            caller,
        );
        // Passages from a private retriever: self-hosted targets only.
        ctx.private |= prepared.retrieved.private;
        Ok(ctx)
    }

    /// The route stage of an embeddings request.
    pub fn for_embeddings(
        request_id: Arc<str>,
        snapshot: Arc<Snapshot>,
        headers: &HeaderMap,
        req: &EmbeddingsRequest,
        caller: Option<Caller>,
    ) -> Result<RequestContext, GatewayError> {
        let Some(route) = snapshot.route(&req.model) else {
            return Err(unknown_model(&snapshot, &req.model));
        };
        let placement = Placement::place(route, headers, req.user.as_deref(), caller.as_ref());
        Ok(RequestContext::new(
            request_id,
            ClientDialect::OpenAi,
            snapshot,
            placement,
            headers,
            None,
            caller,
        ))
    }

    /// The route stage of an embeddings call the gateway makes itself (a
    /// retriever's query or ingest): no client headers; `private` keeps it on
    /// self-hosted targets.
    pub fn for_internal_embeddings(
        request_id: Arc<str>,
        snapshot: Arc<Snapshot>,
        req: &EmbeddingsRequest,
        private: bool,
    ) -> Result<RequestContext, GatewayError> {
        let mut ctx = Self::for_embeddings(request_id, snapshot, &HeaderMap::new(), req, None)?;
        ctx.private |= private;
        Ok(ctx)
    }

    pub fn route(&self) -> &Arc<Route> {
        &self.placement.route
    }

    pub fn arm(&self) -> Option<&Arm> {
        self.placement.arm()
    }

    pub fn chain(&self) -> &[Arc<Target>] {
        self.placement.chain()
    }
}

fn unknown_model(snap: &Snapshot, model: &str) -> GatewayError {
    GatewayError::UnknownModel {
        model: model.to_owned(),
        available: snap.route_list.clone(),
    }
}
