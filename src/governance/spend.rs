//! Cost and budgets: each response's cost from its target's price table,
//! per-key budgets per day and month, and the durable spend store.

use std::sync::Arc;

use crate::canonical::Usage;
use crate::config::{Price, SpendConfig};
use crate::error::GatewayError;
use crate::ids::RouteId;
use crate::metrics::GovMetrics;
use crate::pipeline::RequestContext;

use super::{Caller, Governor, Ledger};

/// The cost of `usage` at `price` (per million tokens).
pub fn cost(price: &Price, usage: &Usage) -> f64 {
    let _ = (price, usage);
    0.0
}

/// A cost for a header or a report: up to 8 decimals, no trailing zeros.
pub fn format_cost(cost: f64) -> String {
    let s = format!("{cost:.8}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() {
        "0".into()
    } else {
        s.to_owned()
    }
}

/// The spend store (SQLite file or Redis).
pub struct Spend {}

impl Spend {
    pub fn open(cfg: &SpendConfig, metrics: &GovMetrics) -> Result<Spend, String> {
        let _ = (cfg, metrics);
        Ok(Spend {})
    }

    /// Refuses a caller over its budget (429 `budget_exceeded`), or moves the
    /// request to the budget's fallback route.
    pub async fn check(
        &self,
        gov: &Arc<Governor>,
        ctx: &mut RequestContext,
    ) -> Result<(), GatewayError> {
        let _ = (gov, ctx);
        Ok(())
    }

    /// Adds a finished request's tokens and cost to its caller's spend.
    pub fn record(&self, caller: Option<&Caller>, route: &RouteId, ledger: &Ledger) {
        let _ = (caller, route, ledger);
    }

    /// A key's spend in its budget periods, for the admin API.
    pub fn usage(&self, key: &str) -> serde_json::Value {
        let _ = key;
        serde_json::Value::Null
    }
}
