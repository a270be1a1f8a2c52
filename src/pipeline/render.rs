//! The render stage: a request that names a prompt gets the prompt's rendered
//! messages and parameters, its retrieval hooks run first (concurrently, see
//! [`super::retrieve`]); a request with the chat `retrieval` extension gets its
//! passages as a system message. On a split over prompt versions, a request
//! that names no version gets its arm's: the arm is picked here, once, and the
//! request stays on the split route with that arm ([`Placement`]).

use std::sync::Arc;

use http::HeaderMap;

use super::context::{Placement, PromptUse};
use super::retrieve::{self, Caller, Guard, RetrievalRef, Retrieved};
use super::Gateway;
use crate::canonical::ChatRequest;
use crate::error::GatewayError;
use crate::prompt::{PromptRef, Rendered};
use crate::snapshot::{Plan, Route, Snapshot};

/// What rendering decided.
#[derive(Default)]
pub struct Prepared {
    /// The route and arm, when the request was placed on a split here.
    pub placement: Option<Placement>,
    pub prompt: Option<PromptUse>,
    /// The passages retrieval put into the request (citations, privacy).
    pub retrieved: Retrieved,
}

/// A prompt that could not be rendered: the error, and the prompt id the
/// client named (for the response's prompt header).
pub struct Refused {
    pub error: GatewayError,
    pub prompt_id: Option<String>,
}

/// Renders `prompt` into `req`, if there is one, running its retrieval hooks;
/// then runs the `retrieval` extension, if there is one.
// The request's parts, each used by a different step; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn render(
    gw: &Arc<Gateway>,
    request_id: &Arc<str>,
    snap: &Arc<Snapshot>,
    headers: &HeaderMap,
    who: Option<&crate::governance::Caller>,
    req: &mut ChatRequest,
    prompt: Option<PromptRef>,
    retrieval: Option<RetrievalRef>,
    trace: &crate::otel::Trace,
) -> Result<Prepared, Refused> {
    if prompt.is_none() && retrieval.is_none() {
        return Ok(Prepared::default());
    }
    let caller = Caller {
        request_id: request_id.clone(),
        private: super::context::private_header(headers),
        trace: trace.clone(),
    };
    let mut prepared = match prompt {
        Some(p) => render_prompt(gw, snap, headers, who, req, p, &caller).await?,
        None => Prepared::default(),
    };
    if let Some(r) = retrieval {
        // The question goes to the embeddings route only as far as the
        // request itself may go: a private route keeps it self-hosted, and
        // it is searched under the request's data policy.
        let route = snap.route(&req.model).cloned();
        let caller = Caller {
            private: caller.private || route.as_ref().is_some_and(|r| r.private),
            ..caller
        };
        let guard = Guard {
            data: crate::protect::policy_for(snap, who, route.as_deref()),
            route,
        };
        let found = retrieve::run_extension(gw, snap, r, req, &caller, &guard)
            .await
            .map_err(|error| Refused {
                error,
                prompt_id: None,
            })?;
        prepared.retrieved.private |= found.private;
        prepared.retrieved.used.extend(found.used);
        prepared.retrieved.protected.merge(found.protected);
    }
    Ok(prepared)
}

async fn render_prompt(
    gw: &Arc<Gateway>,
    snap: &Arc<Snapshot>,
    headers: &HeaderMap,
    who: Option<&crate::governance::Caller>,
    req: &mut ChatRequest,
    mut p: PromptRef,
    caller: &Caller,
) -> Result<Prepared, Refused> {
    // A split: the request is placed here, once, and a split over prompt
    // versions gives a request that names no version its arm's version (and
    // keeps it on the split route). The placement is kept for every split, so
    // the arm that chose the version is the arm that serves.
    let split = |name: &str| {
        snap.route(name)
            .filter(|r| matches!(r.plan, Plan::Split { .. }))
            .cloned()
    };
    let mut placement: Option<Placement> = None;
    if p.explicit_selector.is_none() {
        let user = req.params.user.as_deref();
        if let Some(route) = split(&req.model) {
            placement = Some(place(&route, headers, user, who, &mut p));
        }
        // No route in the request (the prompt endpoint): the version names
        // it, and when that route is a split over prompt versions its arm
        // decides the version. Decided before rendering, so the version's
        // retrieval runs once.
        if placement.is_none() {
            let version_route = snap
                .prompts
                .resolve(&p.id, &p.selector)
                .map(|(_, v)| v.route.clone())
                .map_err(|e| refuse(gw, snap, &p, e))?;
            if let Some(route) = version_route.as_deref().and_then(split) {
                placement = Some(place(&route, headers, user, who, &mut p));
            }
        }
    }
    // The hooks' queries are embedded only as far as the request may go: a
    // private route (the client's, the version's or the arm's) keeps them on
    // self-hosted targets.
    let version_route = snap
        .prompts
        .resolve(&p.id, &p.selector)
        .ok()
        .and_then(|(_, v)| v.route.clone());
    // Their data policy is the request's: the route it will be served on is
    // the arm's split, else the version's route, else the client's.
    let route = match &placement {
        Some(pl) => Some(pl.route.clone()),
        None => version_route
            .as_deref()
            .and_then(|r| snap.route(r))
            .or_else(|| snap.route(&req.model))
            .cloned(),
    };
    let caller = Caller {
        private: caller.private
            || private_route(snap, &req.model)
            || version_route.is_some_and(|r| private_route(snap, &r))
            || placement.as_ref().is_some_and(|pl| pl.route.private),
        ..caller.clone()
    };
    let guard = Guard {
        data: crate::protect::policy_for(snap, who, route.as_deref()),
        route,
    };
    let (r, retrieved) = render_version(gw, snap, &p, &caller, &guard).await?;
    let used = PromptUse {
        id: r.id.clone(),
        version: r.version,
    };
    r.apply(req);
    // A request placed on a split stays on it, whatever route the version names.
    if let Some(placed) = &placement {
        req.model = placed.route.name.to_string();
    }
    if req.model.is_empty() {
        return Err(Refused {
            error: GatewayError::invalid(
                format!(
                    "prompt `{}` version {} names no route: give `model`",
                    used.id, used.version
                ),
                Some("model"),
            ),
            prompt_id: None,
        });
    }
    Ok(Prepared {
        placement,
        prompt: Some(used),
        retrieved,
    })
}

/// Places a request on the split `route`; when the arm pins a prompt version,
/// it becomes the prompt's selector.
fn place(
    route: &Arc<Route>,
    headers: &HeaderMap,
    user: Option<&str>,
    who: Option<&crate::governance::Caller>,
    p: &mut PromptRef,
) -> Placement {
    let placed = Placement::place(route, headers, user, who);
    if let Some(sel) = placed.arm().and_then(|a| a.prompt.clone()) {
        p.selector = sel;
    }
    placed
}

/// Renders `p`: its variables checked, its hooks run, its messages rendered
/// with the passages.
async fn render_version(
    gw: &Arc<Gateway>,
    snap: &Snapshot,
    p: &PromptRef,
    caller: &Caller,
    guard: &Guard,
) -> Result<(Rendered, Retrieved), Refused> {
    let prepared = snap
        .prompts
        .prepare(p)
        .map_err(|e| refuse(gw, snap, p, e))?;
    let (filled, retrieved) = if prepared.version.retrieval.is_empty() {
        Default::default()
    } else {
        retrieve::run_hooks(gw, snap, &prepared, caller, guard)
            .await
            .map_err(|e| refuse(gw, snap, p, e))?
    };
    let rendered = snap
        .prompts
        .render_prepared(prepared, filled)
        .map_err(|e| refuse(gw, snap, p, e))?;
    Ok((rendered, retrieved))
}

/// A prompt the request cannot use; a prompt error (not a retriever's
/// failure, nor a query the data policy refused) is counted under the
/// prompt's id when it is a configured one.
fn refuse(gw: &Gateway, snap: &Snapshot, p: &PromptRef, e: GatewayError) -> Refused {
    if !matches!(
        e,
        GatewayError::Retrieval { .. } | GatewayError::SensitiveData { .. }
    ) {
        // Only configured ids become labels: a client naming random prompts
        // must not grow the metrics without bound.
        let label = if snap.prompts.get(&p.id).is_some() {
            p.id.as_str()
        } else {
            "unknown"
        };
        gw.metrics.prompt_error(label);
    }
    Refused {
        error: e,
        prompt_id: Some(p.id.clone()),
    }
}

/// Whether `name` is a configured route that only self-hosted targets may serve.
fn private_route(snap: &Snapshot, name: &str) -> bool {
    snap.route(name).is_some_and(|r| r.private)
}

/// A shadow candidate's request: `source` (the request before rendering)
/// rendered at `selector` with its retrieval hooks, and placed like a live
/// request (`private`: the live request was private). `None` when it cannot
/// be rendered (the version is unknown, a variable does not fit it).
pub async fn for_shadow(
    gw: &Arc<Gateway>,
    snap: &Arc<Snapshot>,
    request_id: &Arc<str>,
    source: &super::shadow::Source,
    selector: &crate::prompt::Selector,
    private: bool,
) -> Option<(ChatRequest, super::RequestContext)> {
    let mut req = source.req.clone();
    let mut prompt = source.prompt.clone();
    prompt.selector = selector.clone();
    prompt.explicit_selector = Some(selector.clone());
    let mut headers = HeaderMap::new();
    if private {
        headers.insert(
            super::PRIVATE_HEADER,
            http::HeaderValue::from_static("private"),
        );
    }
    let who = source.caller.as_ref();
    let prepared = render(
        gw,
        request_id,
        snap,
        &headers,
        who,
        &mut req,
        Some(prompt),
        None,
        &crate::otel::Trace::default(),
    )
    .await
    .ok()?;
    let mut ctx = super::RequestContext::for_chat(
        request_id.clone(),
        source.dialect,
        snap.clone(),
        &headers,
        &req,
        prepared,
        source.caller.clone(),
    )
    .ok()?;
    ctx.private |= private;
    Some((req, ctx))
}
