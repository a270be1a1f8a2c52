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
use crate::prompt::PromptRef;
use crate::snapshot::Snapshot;

/// What rendering decided.
#[derive(Default)]
pub struct Prepared {
    /// The route and arm, when the arm chose the prompt version.
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
    // A split over prompt versions: a request that names no version gets its
    // arm's, and stays on the split route.
    let mut placement = None;
    if p.explicit_selector.is_none() {
        if let Some(route) = snap.route(&req.model) {
            let placed = Placement::place(route, headers, req.params.user.as_deref());
            if let Some(sel) = placed.arm().and_then(|a| a.prompt.clone()) {
                p.selector = sel;
                placement = Some(placed);
            }
        }
    }
    match snap.prompts.render(&p) {
        Ok(r) => {
            let used = PromptUse {
                id: r.id.clone(),
                version: r.version,
            };
            r.apply(req);
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
        Err(e) => {
            // Only configured ids become labels: a client naming random
            // prompts must not grow the metrics without bound.
            let label = if snap.prompts.get(&p.id).is_some() {
                p.id.as_str()
            } else {
                "unknown"
            };
            metrics.prompt_error(label);
            Err(Refused {
                error: e,
                prompt_id: Some(p.id),
            })
        }
    }
}
