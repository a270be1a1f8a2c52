//! The stream stage: reading a backend stream up to its first output (the
//! commit point of an attempt), a drill's stream cut, and the tap that watches a
//! committed stream go by to account its usage, record its metrics and fill
//! the cache once it has ended properly.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use super::cache::Store;
use super::Gateway;
use crate::backend::EventStream;
use crate::canonical::*;
use crate::error::{ErrorKind, UpstreamError};
use crate::snapshot::{Route, Target};
use crate::tokens;

/// A drill's stream cut: the stream ends with an error after `n` events that
/// carry output.
pub(super) fn cut_after(mut inner: EventStream, n: usize) -> EventStream {
    Box::pin(async_stream::stream! {
        let mut seen = 0usize;
        while let Some(ev) = inner.next().await {
            let output = matches!(&ev, Ok(StreamEvent::Delta(d)) if d.has_output());
            if output {
                if seen >= n {
                    yield Err(UpstreamError::new(ErrorKind::MalformedResponse, format!("drill: stream cut after {n} chunks")));
                    return;
                }
                seen += 1;
            }
            yield ev;
        }
    })
}

/// Events a stream may send before its first output: the stream's identity
/// and a role per choice (at most `wire::MAX_CHOICES`) are all a well-behaved backend sends, and
/// the decoders drop deltas that carry nothing.
pub(super) const HEAD_MAX_EVENTS: usize = 256;
/// Bytes those events may hold (their own size and their text).
pub(super) const HEAD_MAX_BYTES: usize = 256 * 1024;

/// What an event held in memory costs, roughly: its own size and its text.
pub(super) fn event_bytes(ev: &StreamEvent) -> usize {
    let text = match ev {
        StreamEvent::Meta(m) => {
            m.id.len() + m.model.len() + m.system_fingerprint.as_ref().map_or(0, String::len)
        }
        StreamEvent::Delta(d) => {
            let tools: usize = d
                .tool_calls
                .iter()
                .map(|t| {
                    std::mem::size_of::<ToolCallDelta>()
                        + [&t.id, &t.name, &t.arguments]
                            .iter()
                            .map(|s| s.as_ref().map_or(0, String::len))
                            .sum::<usize>()
                })
                .sum();
            d.content.as_ref().map_or(0, String::len)
                + d.reasoning.as_ref().map_or(0, String::len)
                + tools
        }
        StreamEvent::Usage(_) | StreamEvent::Done => 0,
    };
    std::mem::size_of::<StreamEvent>().saturating_add(text)
}

/// Whether a client would see `ev` as output (text, a tool call, a finish,
/// usage or the end): the stream's commit point.
pub(super) fn is_output(ev: &StreamEvent) -> bool {
    match ev {
        StreamEvent::Delta(d) => d.has_output() || d.finish_reason.is_some(),
        StreamEvent::Usage(_) | StreamEvent::Done => true,
        StreamEvent::Meta(_) => false,
    }
}

/// Reads events until the first one a client would see as output (text, a tool
/// call, usage or the end). Returns them with the rest of the stream.
///
/// What comes before the output is held, so it is bounded: past
/// [`HEAD_MAX_EVENTS`] events or [`HEAD_MAX_BYTES`] bytes without output the
/// attempt fails with `malformed_response`. Nothing has gone to the client yet,
/// so the route can still fall back; a legitimate stream never comes near it.
pub(super) async fn peek_output(
    mut stream: EventStream,
) -> Result<(Vec<StreamEvent>, EventStream), UpstreamError> {
    let mut head = Vec::new();
    let mut held = 0usize;
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        let output = is_output(&ev);
        if !output {
            held = held.saturating_add(event_bytes(&ev));
            if head.len() >= HEAD_MAX_EVENTS || held > HEAD_MAX_BYTES {
                return Err(UpstreamError::new(
                    ErrorKind::MalformedResponse,
                    format!(
                        "backend sent more than {} events or {} bytes before any output",
                        HEAD_MAX_EVENTS, HEAD_MAX_BYTES
                    ),
                ));
            }
        }
        head.push(ev);
        if output {
            break;
        }
    }
    Ok((head, stream))
}

/// Appends as much of `text` as fits under `cap` bytes, cut on a char boundary;
/// returns the bytes appended.
fn push_capped(out: &mut String, text: &str, cap: usize) -> usize {
    let room = cap.saturating_sub(out.len());
    let mut end = text.len().min(room);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.push_str(&text[..end]);
    end
}

/// Watches a stream go by: collects output text and reported usage, and at the end
/// inserts an estimated usage event if the backend sent none, then records metrics.
pub(super) struct UsageTap {
    pub gateway: Arc<Gateway>,
    pub route: Arc<Route>,
    pub target: Arc<Target>,
    pub arm: Option<(Arc<str>, Arc<crate::health::ArmStats>)>,
    pub req: ChatRequest,
    /// The request's prompt tokens in the target's encoding, if already counted.
    pub prompt_tokens: Option<u32>,
    pub started: Instant,
    /// Output text for the estimate, up to the tokenizer's budget…
    pub output: String,
    /// …and the bytes of output past it, estimated.
    pub output_beyond: usize,
    pub usage: Option<Usage>,
    /// A cache lease to fill once the stream has ended properly.
    pub store: Option<(Store, crate::cache::Assembler)>,
    /// The request's governance ticket: settled with the usage at the end.
    pub ticket: Option<Arc<crate::governance::Ticket>>,
    /// A copied request's stream, assembled for its shadow comparison.
    pub shadow: Option<ShadowTap>,
    /// The request's span: the stream's id, model, finish reasons and usage.
    pub trace: crate::otel::Trace,
    /// The choices' finish reasons, for the span (kept only when it records).
    pub finish_reasons: Vec<crate::canonical::FinishReason>,
}

/// The primary's stream as its shadow task needs it: assembled, and sent
/// when it ended (dropped unsent when the client left first).
pub(super) struct ShadowTap {
    tx: super::shadow::PrimaryTx,
    asm: crate::cache::Assembler,
    ttft: Duration,
    /// When the stream's end arrived (before its usage was worked out).
    ended: Option<Duration>,
}

impl ShadowTap {
    pub(super) fn new(tx: super::shadow::PrimaryTx, ttft: Duration) -> Self {
        ShadowTap {
            tx,
            asm: crate::cache::Assembler::with_limit(super::shadow::MAX_ASSEMBLED),
            ttft,
            ended: None,
        }
    }

    fn send(self, target: &Arc<Target>, started: Instant, result: Result<Usage, ErrorKind>) {
        let result = result
            .map(|usage| {
                let mut resp = self.asm.finish();
                resp.usage = Some(usage);
                super::shadow::Answered::Decoded(resp)
            })
            .map_err(ErrorKind::as_str);
        let _ = self.tx.send(super::shadow::Primary {
            target: target.clone(),
            latency: self.ended.unwrap_or_else(|| started.elapsed()),
            ttft: Some(self.ttft),
            result,
        });
    }
}

/// A stream that did not reach its end (the client left, the upstream
/// failed) still settles its output so far on the ticket, for token limits and
/// spend: the usage the backend reported, else four bytes a token (no
/// tokenizer on this path: it may run on an async worker at any time).
impl Drop for UsageTap {
    fn drop(&mut self) {
        let Some(t) = self.ticket.take() else {
            return;
        };
        let usage = self.usage.unwrap_or_else(|| {
            let bytes = self.output.len().saturating_add(self.output_beyond);
            let out = u32::try_from(bytes.div_ceil(4)).unwrap_or(u32::MAX);
            let mut u = Usage::new(self.prompt_tokens.unwrap_or(0), out);
            u.estimated = true;
            u
        });
        t.settle(&self.target, &usage);
    }
}

impl UsageTap {
    pub(super) fn observe(&mut self, ev: &StreamEvent) {
        if let Some((_, asm)) = &mut self.store {
            asm.push(ev);
        }
        if let Some(s) = &mut self.shadow {
            s.asm.push(ev);
        }
        if self.trace.is_on() {
            match ev {
                StreamEvent::Meta(m) => self.trace.response_meta(&m.id, &m.model),
                StreamEvent::Delta(d) => {
                    if let Some(r) = d.finish_reason {
                        // Bounded: a backend's choice indexes are capped.
                        if self.finish_reasons.len() < crate::backend::MAX_CHOICES as usize {
                            self.finish_reasons.push(r);
                        }
                    }
                }
                _ => {}
            }
        }
        match ev {
            StreamEvent::Delta(d) => {
                let texts = d.content.iter().chain(&d.reasoning).chain(
                    d.tool_calls
                        .iter()
                        .flat_map(|t| t.name.iter().chain(&t.arguments)),
                );
                for text in texts {
                    self.keep_output(text);
                }
            }
            // Some backends repeat usage on several chunks; the last one is the total.
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::Meta(_) | StreamEvent::Done => {}
        }
    }

    /// Keeps output text for the estimate, within the tokenizer's budget; the
    /// rest is only measured.
    fn keep_output(&mut self, text: &str) {
        let kept = push_capped(&mut self.output, text, tokens::EXACT_BYTES);
        self.output_beyond = self.output_beyond.saturating_add(text.len() - kept);
    }

    /// The reported usage, or the estimate.
    pub(super) async fn usage(&self) -> Usage {
        match self.usage {
            Some(u) => u,
            None => {
                tokens::estimate_async(
                    self.target.encoding,
                    &self.req,
                    self.prompt_tokens,
                    &self.output,
                    self.output_beyond,
                )
                .await
            }
        }
    }

    pub(super) fn finish(&mut self, usage: Usage) -> Usage {
        let arm = self.arm.as_ref().map(|(a, s)| (&**a, &**s));
        self.gateway
            .count_tokens(&self.route, &self.target, arm, &usage);
        if let Some(t) = self.ticket.take() {
            t.settle(&self.target, &usage);
        }
        self.trace.usage(&usage);
        self.trace.finish_reasons(&self.finish_reasons);
        self.record_end(true);
        if let Some(s) = self.shadow.take() {
            s.send(&self.target, self.started, Ok(usage));
        }
        usage
    }

    fn record_end(&self, ok: bool) {
        let elapsed = self.started.elapsed();
        let arm = self.arm.as_ref().map(|(a, _)| &**a);
        let m = &self.gateway.metrics;
        m.stream_end((&self.route.name, self.route.metrics(m)), arm, elapsed);
        if let Some((_, stats)) = &self.arm {
            stats.record(ok, elapsed);
        }
    }

    /// The stream's end arrived: the primary's latency for its shadow
    /// comparison ends here, not after the usage is worked out.
    pub(super) fn mark_end(&mut self) {
        let at = self.started.elapsed();
        if let Some(s) = &mut self.shadow {
            s.ended = Some(at);
        }
    }

    /// The stream ended without its end (the upstream stopped sending): the
    /// shadow comparison records the primary as failed, not as cancelled.
    pub(super) fn shadow_failed(&mut self, kind: ErrorKind) {
        if let Some(s) = self.shadow.take() {
            s.send(&self.target, self.started, Err(kind));
        }
    }

    pub(super) fn fail(&mut self, e: &UpstreamError) {
        if let Some(s) = self.shadow.take() {
            s.send(&self.target, self.started, Err(e.kind));
        }
        self.gateway
            .metrics
            .stream_error(&self.route.name, &self.target.provider_id, e.kind);
        self.record_end(false);
        self.trace.failed(e.kind.as_str(), true);
        tracing::warn!(route = %self.route.name, target = %self.target.id,
            kind = e.kind.as_str(), error = %crate::server::LogSafe(&e.message), "stream failed after it began");
    }

    pub(super) fn wrap(mut self, head: Vec<StreamEvent>, mut rest: EventStream) -> EventStream {
        Box::pin(async_stream::stream! {
            let mut pending = head.into_iter();
            loop {
                let ev = match pending.next() {
                    Some(ev) => ev,
                    None => match rest.next().await {
                        Some(Ok(ev)) => ev,
                        Some(Err(mut e)) => {
                            if e.provider.is_empty() {
                                e.provider = self.target.provider_id.to_string();
                            }
                            self.fail(&e);
                            yield Err(e);
                            return;
                        }
                        None => {
                            self.shadow_failed(ErrorKind::MalformedResponse);
                            return;
                        }
                    },
                };
                if ev == StreamEvent::Done {
                    self.mark_end();
                    let estimated = self.usage.is_none();
                    let usage = self.usage().await;
                    let usage = self.finish(usage);
                    if estimated {
                        yield Ok(StreamEvent::Usage(usage));
                    }
                    if let Some((store, mut asm)) = self.store.take() {
                        asm.push(&StreamEvent::Usage(usage));
                        store.put(&asm.finish()).await;
                    }
                    yield Ok(ev);
                    return;
                }
                self.observe(&ev);
                yield Ok(ev);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn events(evs: Vec<StreamEvent>) -> EventStream {
        Box::pin(futures_util::stream::iter(evs.into_iter().map(Ok)))
    }

    fn role_only(choice: u32) -> StreamEvent {
        StreamEvent::Delta(Delta {
            choice,
            role: Some(Role::Assistant),
            ..Delta::default()
        })
    }

    fn text(t: &str) -> StreamEvent {
        StreamEvent::Delta(Delta {
            content: Some(t.into()),
            ..Delta::default()
        })
    }

    #[tokio::test]
    async fn what_comes_before_the_first_output_is_bounded() {
        // A well-behaved start: the identity, a role per choice, then output.
        let mut evs = vec![StreamEvent::Meta(StreamMeta::default())];
        evs.extend((0..64).map(role_only));
        evs.push(text("hi"));
        evs.push(text("after"));
        let (head, mut rest) = peek_output(events(evs)).await.unwrap();
        assert_eq!(head.len(), 66);
        assert_eq!(head.last(), Some(&text("hi")));
        assert_eq!(rest.next().await.unwrap().unwrap(), text("after"));

        // Events without output, without end: an error once past the count,
        // however much output would follow.
        let mut evs: Vec<StreamEvent> = (0..100_000).map(|i| role_only(i % 64)).collect();
        evs.push(text("too late"));
        let e = match peek_output(events(evs)).await {
            Err(e) => e,
            Ok((head, _)) => panic!("held {} events", head.len()),
        };
        assert_eq!(e.kind, ErrorKind::MalformedResponse);

        // A few events holding a lot of text are stopped by the byte bound.
        let big = StreamEvent::Meta(StreamMeta {
            id: "i".repeat(100 * 1024),
            ..StreamMeta::default()
        });
        let evs = vec![big.clone(), big.clone(), big, text("x")];
        let e = peek_output(events(evs)).await.err().unwrap();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
    }

    #[test]
    fn collected_output_stops_at_its_cap_on_a_char_boundary() {
        let mut out = String::new();
        for _ in 0..100 {
            push_capped(&mut out, "ab€", 12);
        }
        assert_eq!(out, "ab€ab€ab");
        let mut out = String::new();
        push_capped(&mut out, "€€", 4);
        assert_eq!(out, "€");
        push_capped(&mut out, "x", 4);
        assert_eq!(out, "€x");
    }
}
