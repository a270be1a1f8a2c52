//! The render stage: a request that names a prompt gets the prompt's rendered
//! messages and parameters. On a split over prompt versions, a request that
//! names no version gets its arm's: the arm is picked here, once, and the
//! request stays on the split route with that arm ([`Placement`]).

use std::sync::Arc;

use http::HeaderMap;

use super::context::{Placement, PromptUse};
use crate::canonical::ChatRequest;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::prompt::{PromptRef, Rendered};
use crate::snapshot::{Plan, Route, Snapshot};

/// What rendering decided.
#[derive(Default)]
pub struct Prepared {
    /// The route and arm, when the request was placed on a split here.
    pub placement: Option<Placement>,
    pub prompt: Option<PromptUse>,
}

/// A prompt that could not be rendered: the error, and the prompt id the
/// client named (for the response's prompt header).
pub struct Refused {
    pub error: GatewayError,
    pub prompt_id: Option<String>,
}

/// Renders `prompt` into `req`, if there is one.
pub fn render(
    metrics: &Metrics,
    snap: &Arc<Snapshot>,
    headers: &HeaderMap,
    req: &mut ChatRequest,
    prompt: Option<PromptRef>,
) -> Result<Prepared, Refused> {
    let Some(mut p) = prompt else {
        return Ok(Prepared::default());
    };
    // A split: the request is placed here, once, and a split over prompt
    // versions gives a request that names no version its arm's version (and
    // keeps it on the split route). The placement is kept for every split, so
    // the arm that chose the version is the arm that serves.
    let user = req.params.user.as_deref();
    let split = |name: &str| {
        snap.route(name)
            .filter(|r| matches!(r.plan, Plan::Split { .. }))
    };
    let mut placement: Option<Placement> = None;
    if p.explicit_selector.is_none() {
        if let Some(route) = split(&req.model) {
            placement = Some(place(route, headers, user, &mut p).0);
        }
    }
    let mut r = render_prompt(metrics, snap, &p)?;
    // No route in the request (the prompt endpoint): the version names it, and
    // when that route is a split over prompt versions its arm decides the version.
    if placement.is_none() && p.explicit_selector.is_none() {
        if let Some(route) = r.route.as_deref().and_then(split) {
            let (placed, chose) = place(route, headers, user, &mut p);
            if chose {
                r = render_prompt(metrics, snap, &p)?;
            }
            placement = Some(placed);
        }
    }
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
    })
}

/// Places a request on the split `route`; when the arm pins a prompt version,
/// it becomes the prompt's selector (true).
fn place(
    route: &Arc<Route>,
    headers: &HeaderMap,
    user: Option<&str>,
    p: &mut PromptRef,
) -> (Placement, bool) {
    let placed = Placement::place(route, headers, user);
    let chose = match placed.arm().and_then(|a| a.prompt.clone()) {
        Some(sel) => {
            p.selector = sel;
            true
        }
        None => false,
    };
    (placed, chose)
}

/// Renders `p`; a render error is counted under the prompt's id when it is a
/// configured one.
fn render_prompt(metrics: &Metrics, snap: &Snapshot, p: &PromptRef) -> Result<Rendered, Refused> {
    snap.prompts.render(p).map_err(|e| {
        // Only configured ids become labels: a client naming random prompts must
        // not grow the metrics without bound.
        let label = if snap.prompts.get(&p.id).is_some() {
            p.id.as_str()
        } else {
            "unknown"
        };
        metrics.prompt_error(label);
        Refused {
            error: e,
            prompt_id: Some(p.id.clone()),
        }
    })
}
