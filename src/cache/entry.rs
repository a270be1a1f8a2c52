//! One cached response (`Entry`), what it weighs in memory, and which
//! responses may become one.

use std::time::{Duration, SystemTime};

use crate::canonical::*;

/// One cached response.
#[derive(Debug)]
pub struct Entry {
    pub response: ChatResponse,
    /// The target that produced it.
    pub target: String,
    pub route: String,
    pub prompt: Option<String>,
    pub created: SystemTime,
    pub ttl: Duration,
    pub bytes: u32,
}

impl Entry {
    pub fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.created)
            .unwrap_or_default()
    }
}

/// Whether a response may be stored.
pub fn cacheable(resp: &ChatResponse) -> bool {
    !resp.choices.is_empty()
        && resp
            .choices
            .iter()
            .all(|c| c.finish_reason.is_some() && c.finish_reason != Some(FinishReason::Error))
}

/// The approximate memory an entry takes: its text plus a fixed cost for the
/// entry, key, response structure and the cache's own bookkeeping (measured at
/// about 1.5 KB per small entry under load).
pub fn weight(resp: &ChatResponse) -> u32 {
    let mut n = 1200 + resp.id.len() + resp.model.len();
    for c in &resp.choices {
        n += 64;
        if let Some(t) = &c.message.content {
            n += t.text().len();
        }
        if let Some(r) = &c.message.reasoning {
            n += r.len();
        }
        for t in &c.message.tool_calls {
            n += 48 + t.id.len() + t.name.len() + t.arguments.len();
        }
    }
    n.min(u32::MAX as usize) as u32
}
