//! Shadow traffic: a sampled copy of a live request goes to each candidate
//! target of its route (or arm) after the client's answer is chosen; the two
//! answers are compared as the candidate completes, the comparison kept in
//! live figures (`/admin/experiments`) and in an embedded SQLite file that
//! `promptgate readiness` reports on. `promptgate replay` produces the same
//! pairs from recorded requests, offline.
//!
//! - [`compare`]: the comparison of two outputs (pure).
//! - [`store`]: the SQLite file: schema, the writer thread, the report's read.
//! - [`report`]: the readiness report (Markdown + JSON) and its verdict.

pub mod compare;
pub mod replay;
pub mod report;
pub mod store;

use serde::{Deserialize, Serialize};

/// Unix time in milliseconds: when a pair completed, a report's "now".
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A tool call as the comparison sees it: the function and its arguments
/// (the JSON text the model wrote).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCallOut {
    pub name: String,
    pub arguments: String,
}

/// What one side of a pair (the primary or a candidate) did with the request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Side {
    /// `provider/model`.
    pub target: String,
    /// Time to the whole answer (a stream: to its end), milliseconds.
    pub latency_ms: f64,
    /// Time to the first output, for a streamed request.
    pub ttft_ms: Option<f64>,
    /// The failure's kind (`ErrorKind::as_str`, or `cancelled` when the client
    /// left before the primary's answer ended); `None`: answered.
    pub error: Option<String>,
    /// `stop`, `length`, `tool_calls`, `content_filter`, …
    pub finish: Option<String>,
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// From the provider's price table, when it has one.
    pub cost: Option<f64>,
    /// The answer's text (choice 0), bounded; stored only when the route keeps
    /// outputs.
    pub text: String,
    pub tool_calls: Vec<ToolCallOut>,
}

/// JSON checks, for a request whose `response_format` asks for JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct JsonCheck {
    pub primary_valid: bool,
    pub candidate_valid: bool,
    /// Both valid and of the same shape (the same keys with values of the same
    /// JSON types, recursively; for `json_schema`, both valid against it).
    pub schema_agree: bool,
}

/// The comparison of two answered sides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The texts are equal after trimming.
    pub exact: bool,
    /// Token-level F1 over normalised text (lowercase, punctuation dropped,
    /// each CJK character a token), in [0, 1].
    pub token_f1: f64,
    /// Character-level similarity (character-bigram Dice over normalised
    /// text; works for Chinese), in [0, 1].
    pub char_similarity: f64,
    /// `None` when the request did not ask for JSON.
    pub json: Option<JsonCheck>,
    /// `None` when neither side called a tool; else the same functions with
    /// arguments equal as JSON, in order.
    pub tool_agreement: Option<bool>,
    pub primary_refusal: bool,
    pub candidate_refusal: bool,
    pub primary_empty: bool,
    pub candidate_empty: bool,
    /// Candidate length / primary length (characters); `None` when the
    /// primary's text is empty.
    pub length_ratio: Option<f64>,
    /// Cosine similarity of the two texts' embeddings, when the route names an
    /// embeddings route for it.
    pub embedding_similarity: Option<f64>,
}

/// One primary/candidate pair, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// Unix time, milliseconds, when the pair completed.
    pub at_ms: i64,
    pub request_id: String,
    pub route: String,
    /// The A/B arm the request was placed on.
    pub arm: Option<String>,
    /// `live` or `replay`.
    pub source: String,
    /// Whether the request was streamed (both sides were called alike).
    pub stream: bool,
    pub primary: Side,
    pub candidate: Side,
    /// `None` when either side failed.
    pub comparison: Option<Comparison>,
    /// The request (canonical JSON), kept only when the route keeps outputs.
    pub request: Option<String>,
}
