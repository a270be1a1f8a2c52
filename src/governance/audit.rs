//! The audit log: one JSON line per request, written off the request path.
//!
//! A request's record is built from its [`Ledger`] when its ticket drops (the
//! response's last byte, a stream's too) or, for a request refused before
//! admission, by [`Audit::rejected`]. The request path only moves the facts
//! into a boxed [`Record`] and offers it to a bounded queue (`audit.queue`);
//! it never waits: a full queue drops the record and counts it. The writer
//! thread ([`sink`]) turns records into JSON lines, writes them in batches to
//! the file (rotated by size) and/or standard output, and counts what it
//! could not write. Requests succeed whatever happens to their record.
//!
//! Message content is kept only when the gateway (`audit.content`), the
//! request's key or its route opts in: the request as it left the gateway
//! (after data protection, so placeholders rather than redacted values) and
//! the answer's text as the backend gave it (before placeholders are put
//! back), each bounded to [`CONTENT_BYTES`].

mod sink;

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::canonical::{ChatRequest, EmbeddingInput, EmbeddingsRequest, Message, Usage};
use crate::config::AuditConfig;
use crate::ids::{ProviderId, RouteId, TargetId};
use crate::metrics::GovMetrics;
use crate::pipeline::{ChatOutcome, PromptUse, RequestContext};

use super::{Caller, Ledger, Ticket};

/// At most this many bytes of request text, and of response text, in a record
/// that carries content; past it the text is cut (at a character boundary)
/// and marked truncated.
pub const CONTENT_BYTES: usize = 64 * 1024;

/// Message content kept for an audit record (only when a key or route opts in).
#[derive(Default)]
pub struct Content {
    /// The chat messages as sent to the backend (after data protection).
    messages: Vec<Said>,
    /// The embeddings input texts.
    input: Vec<String>,
    /// Whether any request text was cut.
    request_truncated: bool,
    /// Room left for request text.
    request_room: usize,
    /// The answer's text.
    response: String,
    response_truncated: bool,
    /// Set when data protection found values it did not redact (`private`:
    /// they went, as they were, to a self-hosted target): the text is not
    /// kept, so detected values never reach the audit log.
    withheld: Option<&'static str>,
    /// The request was private (its header, its route, a private retriever's
    /// passages, data protection): a replay sends it to self-hosted
    /// candidates only.
    private: bool,
}

/// One message of the request, as the record shows it: its role, its text
/// (text parts joined; images and other parts are not kept), its tool calls.
#[derive(Serialize)]
struct Said {
    role: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    content: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<SaidCall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
}

#[derive(Serialize)]
struct SaidCall {
    name: String,
    arguments: String,
}

/// Appends to `out` as much of `s` as `room` allows, cut at a character
/// boundary; returns false when `s` did not fit whole.
fn push_bounded(out: &mut String, s: &str, room: &mut usize) -> bool {
    if s.len() <= *room {
        out.push_str(s);
        *room -= s.len();
        return true;
    }
    let mut cut = *room;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    out.push_str(&s[..cut]);
    *room = 0;
    false
}

impl Content {
    fn new() -> Content {
        Content {
            request_room: CONTENT_BYTES,
            ..Content::default()
        }
    }

    fn take(&mut self, s: &str) -> String {
        let mut out = String::new();
        if self.request_truncated {
            return out;
        }
        if !push_bounded(&mut out, s, &mut self.request_room) {
            self.request_truncated = true;
        }
        out
    }

    fn chat(&mut self, req: &ChatRequest) {
        for m in &req.messages {
            if self.request_truncated {
                break;
            }
            let said = self.message(m);
            self.messages.push(said);
        }
    }

    fn message(&mut self, m: &Message) -> Said {
        let content = match &m.content {
            Some(c) => self.take(&c.text()),
            None => String::new(),
        };
        let tool_calls = m
            .tool_calls
            .iter()
            .map(|t| SaidCall {
                name: self.take(&t.name),
                arguments: self.take(&t.arguments),
            })
            .collect();
        Said {
            role: m.role.as_str(),
            content,
            tool_calls,
            tool_call_id: m.tool_call_id.clone(),
        }
    }

    fn embeddings(&mut self, req: &EmbeddingsRequest) {
        if let EmbeddingInput::Texts(texts) = &req.input {
            for t in texts {
                if self.request_truncated {
                    break;
                }
                let kept = self.take(t);
                self.input.push(kept);
            }
        }
    }

    /// Appends answer text (a complete response's, or a stream's delta).
    pub fn respond(&mut self, text: &str) {
        if self.response_truncated {
            return;
        }
        let mut room = CONTENT_BYTES.saturating_sub(self.response.len());
        if !push_bounded(&mut self.response, text, &mut room) {
            self.response_truncated = true;
        }
    }
}

/// The content a record keeps: none for a request in which data protection
/// found values it left in place (they would be in the text).
fn kept(
    content: Option<Content>,
    detections: &[(Arc<str>, u32)],
    action: Option<&'static str>,
) -> Option<Content> {
    let content = content?;
    match action {
        Some(a) if a != "redact" && !detections.is_empty() => Some(Content {
            withheld: Some(a),
            ..Content::default()
        }),
        _ => Some(content),
    }
}

/// Whether the request's audit record carries content: the gateway's
/// `audit.content`, its key's or its route's `audit: {content: true}`. If so,
/// the request as it leaves the gateway (`req` or `input`, after data
/// protection) is captured now.
pub fn wants_content(
    ctx: &RequestContext,
    req: Option<&ChatRequest>,
    input: Option<&EmbeddingsRequest>,
) -> Option<Content> {
    let cfg = &ctx.snapshot.config.audit;
    let wanted = cfg.enabled()
        && (cfg.content
            || ctx.route().governance.audit_content
            || ctx.caller.as_ref().is_some_and(|c| c.key.audit_content));
    if !wanted {
        return None;
    }
    let mut c = Content::new();
    c.private = ctx.private;
    if let Some(r) = req {
        c.chat(r);
    }
    if let Some(r) = input {
        c.embeddings(r);
    }
    Some(c)
}

/// Keeps the answer's text in the ticket's record when it carries content:
/// a complete response's at once, a stream's delta by delta as it passes.
/// Called on the answer as the backend gave it (before redacted values are
/// restored).
pub fn capture(ticket: Option<&Arc<Ticket>>, outcome: ChatOutcome) -> ChatOutcome {
    let Some(t) = ticket else {
        return outcome;
    };
    let mut wanted = false;
    t.note(|l| wanted = l.content.is_some());
    if !wanted {
        return outcome;
    }
    match outcome {
        ChatOutcome::Complete(resp) => {
            t.note(|l| {
                if let Some(c) = &mut l.content {
                    for choice in &resp.choices {
                        if let Some(text) = &choice.message.content {
                            c.respond(&text.text());
                        }
                    }
                }
            });
            ChatOutcome::Complete(resp)
        }
        ChatOutcome::Stream(events) => {
            use futures_util::StreamExt;
            let t = t.clone();
            ChatOutcome::Stream(Box::pin(events.inspect(move |ev| {
                if let Ok(crate::canonical::StreamEvent::Delta(d)) = ev {
                    if let Some(text) = &d.content {
                        t.note(|l| {
                            if let Some(c) = &mut l.content {
                                c.respond(text);
                            }
                        });
                    }
                }
            })))
        }
    }
}

/// What an audit line says about a request: moved to the writer thread,
/// which serialises it.
pub(crate) struct Record {
    /// When the request arrived.
    time: SystemTime,
    request_id: Arc<str>,
    key: Option<Arc<str>>,
    route: Option<RouteId>,
    prompt: Option<PromptUse>,
    arm: Option<Arc<str>>,
    target: Option<TargetId>,
    provider: Option<ProviderId>,
    attempts: u32,
    status: u16,
    error: Option<&'static str>,
    usage: Option<Usage>,
    cost: Option<f64>,
    cache: Option<&'static str>,
    detections: Vec<(Arc<str>, u32)>,
    data_action: Option<&'static str>,
    latency: Duration,
    stream: bool,
    content: Option<Content>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    request_id: &'a str,
    key: Option<&'a str>,
    route: Option<&'a str>,
    prompt: Option<String>,
    arm: Option<&'a str>,
    target: Option<&'a str>,
    provider: Option<&'a str>,
    attempts: u32,
    status: u16,
    error: Option<&'a str>,
    tokens: Option<Tokens>,
    cost: Option<f64>,
    cache: Option<&'a str>,
    redactions: std::collections::BTreeMap<&'a str, u32>,
    data_action: Option<&'a str>,
    latency_ms: u64,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<ContentLine<'a>>,
}

#[derive(Serialize)]
struct Tokens {
    input: u32,
    output: u32,
    estimated: bool,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ContentLine<'a> {
    Kept {
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        messages: &'a [Said],
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        input: &'a [String],
        request_truncated: bool,
        response: &'a str,
        response_truncated: bool,
        /// Only when true.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        private: bool,
    },
    /// `{"withheld": "private"}`
    Withheld { withheld: &'a str },
}

impl Record {
    /// Appends the record's JSON line (with its newline) to `out`.
    fn write_line(&self, out: &mut Vec<u8>) {
        let line = Line {
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            request_id: &self.request_id,
            key: self.key.as_deref(),
            route: self.route.as_deref(),
            prompt: self
                .prompt
                .as_ref()
                .map(|p| format!("{}@{}", p.id, p.version)),
            arm: self.arm.as_deref(),
            target: self.target.as_deref(),
            provider: self.provider.as_deref(),
            attempts: self.attempts,
            status: self.status,
            error: self.error,
            tokens: self.usage.map(|u| Tokens {
                input: u.prompt_tokens,
                output: u.completion_tokens,
                estimated: u.estimated,
            }),
            cost: self.cost.filter(|c| c.is_finite()),
            cache: self.cache,
            redactions: self.detections.iter().map(|(k, n)| (&**k, *n)).collect(),
            data_action: self.data_action,
            latency_ms: u64::try_from(self.latency.as_millis()).unwrap_or(u64::MAX),
            stream: self.stream,
            content: self.content.as_ref().map(|c| match c.withheld {
                Some(withheld) => ContentLine::Withheld { withheld },
                None => ContentLine::Kept {
                    messages: &c.messages,
                    input: &c.input,
                    request_truncated: c.request_truncated,
                    response: &c.response,
                    response_truncated: c.response_truncated,
                    private: c.private,
                },
            }),
        };
        // Writing into a Vec cannot fail, and every field serialises.
        let _ = serde_json::to_writer(&mut *out, &line);
        out.push(b'\n');
    }
}

/// What the request path hands the writer thread.
enum Msg {
    Record(Box<Record>),
    /// Write everything queued, then answer and stop.
    Close(SyncSender<()>),
}

/// The audit sink: a bounded queue to a writer thread.
pub struct Audit {
    /// `None`: no sink is configured.
    tx: Option<SyncSender<Msg>>,
    metrics: GovMetrics,
    /// Signalled by the writer thread when it stops.
    stopped: Mutex<Option<Receiver<()>>>,
}

impl Audit {
    /// Starts the writer thread when a sink is configured. The file is opened
    /// by that thread, so a file that blocks (a FIFO nobody reads) or fails
    /// never delays startup or a request.
    pub fn open(cfg: &AuditConfig, metrics: &GovMetrics) -> Result<Audit, String> {
        if !cfg.enabled() {
            return Ok(Audit {
                tx: None,
                metrics: metrics.clone(),
                stopped: Mutex::new(None),
            });
        }
        if let Some(dir) = cfg.path.as_deref().and_then(std::path::Path::parent) {
            // A failure shows when the writer opens the file (logged, counted).
            let _ = std::fs::create_dir_all(dir);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue.max(1));
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let writer = sink::Writer::new(cfg, metrics.clone());
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                writer.run(rx);
                let _ = done_tx.send(());
            })
            .map_err(|e| format!("cannot start the audit writer: {e}"))?;
        Ok(Audit {
            tx: Some(tx),
            metrics: metrics.clone(),
            stopped: Mutex::new(Some(done_rx)),
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues the record of a request (never blocks; a full queue drops and counts).
    pub fn write(
        &self,
        caller: Option<&Caller>,
        route: Option<&RouteId>,
        ledger: Ledger,
        elapsed: Duration,
    ) {
        if self.tx.is_none() {
            return;
        }
        let latency = ledger.arrived.map_or(elapsed, |a| a.elapsed());
        let (target, provider) = match &ledger.target {
            Some(t) => (Some(t.id.clone()), Some(t.provider_id.clone())),
            None => (None, None),
        };
        self.send(Record {
            time: arrival(latency),
            request_id: ledger.request_id,
            key: caller.map(|c| c.id.clone()),
            route: route.cloned(),
            prompt: ledger.prompt,
            arm: ledger.arm,
            target,
            provider,
            attempts: ledger.attempts,
            status: ledger.status,
            error: ledger.error,
            usage: ledger.usage,
            cost: ledger.cost,
            cache: ledger.cache,
            data_action: ledger.protect_action,
            latency,
            stream: ledger.streaming,
            content: kept(ledger.content, &ledger.detections, ledger.protect_action),
            detections: ledger.detections,
        });
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
        if self.tx.is_none() {
            return;
        }
        self.send(Record {
            time: arrival(elapsed),
            request_id: request_id.into(),
            key: caller.map(|c| c.id.clone()),
            route: route.cloned(),
            prompt: None,
            arm: None,
            target: None,
            provider: None,
            attempts: 0,
            status,
            error,
            usage: None,
            cost: None,
            cache: None,
            detections: Vec::new(),
            data_action: None,
            latency: elapsed,
            stream: false,
            content: None,
        });
    }

    fn send(&self, record: Record) {
        let Some(tx) = &self.tx else {
            return;
        };
        match tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.metrics.audit_dropped("queue_full"),
            // The writer is gone (closed at shutdown): nothing will write it.
            Err(TrySendError::Disconnected(_)) => self.metrics.audit_dropped("write_error"),
        }
    }

    /// Writes what is queued and stops the writer, waiting at most `within`
    /// (a sink that blocks is not waited for). Records queued after this are
    /// dropped and counted.
    pub fn close(&self, within: Duration) {
        let Some(tx) = &self.tx else {
            return;
        };
        let until = Instant::now() + within;
        let (reply, answered) = std::sync::mpsc::sync_channel(1);
        let mut msg = Msg::Close(reply);
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(m)) => {
                    if Instant::now() >= until {
                        return;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        let _ = answered.recv_timeout(left);
        if let Some(stopped) = self
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let left = until.saturating_duration_since(Instant::now());
            let _ = stopped.recv_timeout(left);
        }
    }
}

/// When a request that took `latency` so far arrived.
fn arrival(latency: Duration) -> SystemTime {
    let now = SystemTime::now();
    now.checked_sub(latency).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bounded_text_is_cut_at_a_character_boundary_and_marked() {
        let mut c = Content::new();
        let big = "é".repeat(CONTENT_BYTES); // two bytes each
        c.respond("ab");
        c.respond(&big);
        assert!(c.response_truncated);
        assert!(c.response.len() <= CONTENT_BYTES);
        assert!(c.response.len() >= CONTENT_BYTES - 1);
        c.respond("more");
        assert!(!c.response.ends_with("more"));
        let kept = c.take(&big);
        assert!(c.request_truncated);
        assert!(kept.len() <= CONTENT_BYTES && kept.len() >= CONTENT_BYTES - 1);
        assert!(c.take("after").is_empty());
    }

    #[test]
    fn content_with_detected_values_left_in_place_is_withheld() {
        let with_text = || {
            let mut c = Content::new();
            c.respond("13812345678");
            Some(c)
        };
        let found = [(Arc::<str>::from("cn_mobile"), 1)];
        let c = kept(with_text(), &found, Some("private")).unwrap();
        assert_eq!(c.withheld, Some("private"));
        assert!(c.response.is_empty());
        // Redacted text holds placeholders only; nothing found, nothing to withhold.
        assert!(kept(with_text(), &found, Some("redact"))
            .unwrap()
            .withheld
            .is_none());
        assert!(kept(with_text(), &[], None).unwrap().withheld.is_none());
        assert!(kept(None, &found, Some("private")).is_none());
    }

    #[test]
    fn a_record_is_one_line_of_json_with_every_field() {
        let r = Record {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            request_id: "pg-1".into(),
            key: Some("team-a".into()),
            route: Some("chat".into()),
            prompt: Some(PromptUse {
                id: "greet".into(),
                version: 3,
            }),
            arm: None,
            target: None,
            provider: None,
            attempts: 2,
            status: 200,
            error: None,
            usage: Some(Usage::new(10, 5)),
            cost: Some(f64::NAN),
            cache: Some("miss"),
            detections: vec![("cn_mobile".into(), 2)],
            data_action: Some("redact"),
            latency: Duration::from_millis(42),
            stream: true,
            content: None,
        };
        let mut out = Vec::new();
        r.write_line(&mut out);
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        assert!(out.ends_with(b"\n"));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["key"], "team-a");
        assert_eq!(v["prompt"], "greet@3");
        assert_eq!(v["tokens"]["input"], 10);
        assert_eq!(v["tokens"]["output"], 5);
        assert_eq!(v["cost"], serde_json::Value::Null);
        assert_eq!(v["redactions"]["cn_mobile"], 2);
        assert_eq!(v["latency_ms"], 42);
        assert!(v.get("content").is_none());
    }
}
