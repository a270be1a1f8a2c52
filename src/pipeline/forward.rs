//! The same-dialect fast path: an OpenAI client's request to an
//! OpenAI-compatible target is sent as the client's bytes, with only `model`
//! (and, for a stream, `stream_options`) spliced in, and the answer's bytes go
//! back with only `model` replaced by the name the client asked for. A tap
//! reads what the gateway must know on the way: usage, an error inside a 200
//! or inside the stream, the stream's commit point (its first output) and its
//! end. Everything else (fallback, retries, breakers, drill faults, limits,
//! spend, metrics, the audit record) is the canonical path's, unchanged: the
//! attempt loop runs a [`Forward`] operation, and a target that cannot forward
//! in the chain is served by the canonical attempt.
//!
//! Taken only when nothing needs the canonical form: the server passes the
//! client's bytes only for an OpenAI request without a prompt, retrieval or
//! redaction; [`Gateway::chat`](super::Gateway::chat) forwards only with the
//! cache off or bypassed, no audit content, and `fast_path` on.

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use super::attempt::{self, Answer, Chat, Operation};
use super::stream::{cut_after, event_bytes, is_output, peek_output, UsageTap};
use super::stream::{HEAD_MAX_BYTES, HEAD_MAX_EVENTS};
use super::Gateway;
use crate::backend::openai::{decode_chat_response, ChunkDecoder, ChunkEncoder};
use crate::backend::{EventStream, ProviderState, RawAnswer, RawCall, StreamDecoder};
use crate::canonical::*;
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::{Frame, FrameDecoder, Framing};
use crate::snapshot::Target;

/// A forwarded answer's bytes as the client gets them: a whole JSON body, or
/// the stream's SSE bytes, ending after `data: [DONE]` or with one error (the
/// server writes it as the dialect's error event).
pub enum Raw {
    /// The body. Its usage is always the backend's: a body without usage is
    /// answered canonically, with the estimate.
    Whole(Bytes),
    Stream(BoxStream<'static, Result<Bytes, UpstreamError>>),
}

/// What the pipeline answers a chat request with.
pub enum Reply {
    /// The canonical answer: the server encodes it in the client's dialect.
    Canonical(super::ChatOutcome),
    /// The fast path's: bytes for the client as they are.
    Forwarded(Raw),
}

/// The model name an answer shows (the route the client asked for, also when
/// its budget moved the request to a fallback route), as a JSON string.
pub(super) fn shown(ctx: &super::RequestContext, route: &str) -> Bytes {
    let name = ctx
        .ticket
        .as_ref()
        .and_then(|t| t.moved_from.as_deref())
        .unwrap_or(route);
    Bytes::from(serde_json::to_vec(name).unwrap_or_default())
}

/// Whether the request's audit record keeps the answer's text (captured from
/// the canonical answer).
pub(super) fn audits_content(ctx: &super::RequestContext) -> bool {
    let mut wanted = false;
    if let Some(t) = &ctx.ticket {
        t.note(|l| wanted = l.content.is_some());
    }
    wanted
}

/// What a forwarding attempt produced.
pub(super) enum Forwarded {
    /// A target that cannot forward, or an answer the fast path leaves to the
    /// canonical path (a body without usage, a JSON answer to a stream).
    Canonical(Answer),
    /// A whole body, `model` spliced, and the usage it reports.
    Whole(Bytes, Usage),
    /// A stream up to its first output: the bytes held so far and their events.
    Stream(Box<Head>),
}

/// A stream read up to its commit point.
pub(super) struct Head {
    pub bytes: Vec<u8>,
    pub events: Vec<StreamEvent>,
    pub reader: Reader,
}

/// A chat request sent as the client's bytes where the target takes them.
pub(super) struct Forward<'r> {
    pub req: &'r ChatRequest,
    /// The client's body.
    pub raw: &'r Bytes,
    /// The model name the answer shows, as a JSON string.
    pub shown: Bytes,
    /// The request's span (the answer's id, model and finish reasons).
    pub trace: &'r crate::otel::Trace,
}

impl Operation for Forward<'_> {
    type Output = Forwarded;

    fn lacks(&self, t: &Target) -> Option<&'static str> {
        attempt::check_capabilities(t, self.req).err()
    }

    fn prompt(&self) -> Option<&ChatRequest> {
        Some(self.req)
    }

    async fn call<'a>(
        &'a self,
        gw: &'a Gateway,
        t: &'a Target,
    ) -> Result<Forwarded, UpstreamError> {
        let forwarding = match &t.provider {
            ProviderState::Ready(p) if t.overrides.is_empty() => p.forwarding(),
            _ => None,
        };
        let body = forwarding.and_then(|(f, max_line)| {
            let force_usage = self.req.stream && f.stream_usage && !self.req.include_usage;
            let model = serde_json::to_vec(&t.model).ok()?;
            let body = splice_request(self.raw, &model, self.req.stream, force_usage)?;
            Some((body, max_line))
        });
        match body {
            Some((body, max_line)) => self.forward(gw, t, body, max_line).await,
            None => Chat(self.req).call(gw, t).await.map(Forwarded::Canonical),
        }
    }
}

impl Forward<'_> {
    /// One forwarded call, the drill fault of the target's provider applied as
    /// in the canonical attempt.
    async fn forward(
        &self,
        gw: &Gateway,
        t: &Target,
        body: Bytes,
        max_line: usize,
    ) -> Result<Forwarded, UpstreamError> {
        let (provider, drill) = attempt::prepare(gw, t).await?;
        let stream = self.req.stream;
        let not_forwarding =
            || UpstreamError::new(ErrorKind::Connect, "the provider stopped forwarding");
        if !stream {
            drill.stall_whole(t).await?;
            let call = provider
                .forward(RawCall { body, stream })
                .ok_or_else(not_forwarding)?;
            return match call.await? {
                RawAnswer::Whole(b) => self.whole(b),
                RawAnswer::Stream(_) => Err(UpstreamError::new(
                    ErrorKind::MalformedResponse,
                    "backend answered a request without `stream` with a stream",
                )),
            };
        }
        let cut = drill.cut;
        let first_output = async {
            drill.stall_stream().await;
            let call = provider
                .forward(RawCall { body, stream })
                .ok_or_else(not_forwarding)?;
            match call.await? {
                // A backend that ignored `stream` or put an error in a 200 body:
                // replayed as events, as the canonical attempt does.
                RawAnswer::Whole(b) => {
                    let resp = decode_chat_response(&b)?;
                    let events: Vec<Result<StreamEvent, UpstreamError>> =
                        crate::backend::transport::response_events(resp)
                            .into_iter()
                            .map(Ok)
                            .collect();
                    let mut events: EventStream = Box::pin(futures_util::stream::iter(events));
                    if let Some(n) = cut {
                        events = cut_after(events, n);
                    }
                    let (head, rest) = peek_output(events).await?;
                    Ok(Forwarded::Canonical(Answer::Stream(head, rest)))
                }
                RawAnswer::Stream(body) => {
                    let reader = Reader::new(
                        body,
                        max_line,
                        self.shown.clone(),
                        !self.req.include_usage,
                        cut,
                    );
                    reader.head().await.map(|h| Forwarded::Stream(Box::new(h)))
                }
            }
        };
        attempt::within_first_token_timeout(t, first_output).await
    }

    /// A whole answer: decoded as the canonical path decodes it (an error
    /// inside a 200, a malformed body fail the attempt alike), passed on as
    /// bytes when it reports usage.
    fn whole(&self, body: Bytes) -> Result<Forwarded, UpstreamError> {
        let resp = decode_chat_response(&body)?;
        let Some(usage) = resp.usage else {
            // The canonical path records it on the request's span.
            // The estimate needs the canonical answer: it is shown in the body.
            return Ok(Forwarded::Canonical(Answer::Complete(resp)));
        };
        match splice_answer(&body, &self.shown, false) {
            Some(out) => {
                self.trace.response(&resp);
                Ok(Forwarded::Whole(Bytes::from(out), usage))
            }
            None => Ok(Forwarded::Canonical(Answer::Complete(resp))),
        }
    }
}

/// Reads a forwarded stream: frames its bytes, decodes each frame as the
/// canonical path does (for output, usage, errors and the end) and writes the
/// frame's bytes for the client, `model` replaced.
pub(super) struct Reader {
    body: BoxStream<'static, Result<Bytes, UpstreamError>>,
    frames: FrameDecoder,
    decoder: ChunkDecoder,
    /// The body has ended.
    eof: bool,
    /// The shown model, a JSON string.
    shown: Bytes,
    /// The client did not ask for usage: `usage` members and usage-only
    /// chunks are left out, as the canonical encoder leaves them.
    strip_usage: bool,
    /// A drill's cut: after this many output events.
    cut: Option<usize>,
    outputs: usize,
    /// Writes what cannot be passed through (a frame the splice cannot
    /// read, the estimated usage chunk) the canonical way.
    encoder: ChunkEncoder,
}

impl Reader {
    fn new(
        body: BoxStream<'static, Result<Bytes, UpstreamError>>,
        max_line: usize,
        shown: Bytes,
        strip_usage: bool,
        cut: Option<usize>,
    ) -> Reader {
        let name: String = serde_json::from_slice(&shown).unwrap_or_default();
        Reader {
            body,
            frames: FrameDecoder::with_max_line(Framing::Sse, max_line),
            decoder: ChunkDecoder::default(),
            eof: false,
            shown,
            strip_usage,
            cut,
            outputs: 0,
            encoder: ChunkEncoder::new(&name, !strip_usage),
        }
    }

    /// Reads up to the first output event, holding what comes before it,
    /// bounded as [`peek_output`] bounds it.
    async fn head(mut self) -> Result<Head, UpstreamError> {
        let mut bytes = Vec::new();
        let mut events = Vec::new();
        let mut held = 0usize;
        loop {
            let from = events.len();
            if !self.next_frame(&mut bytes, &mut events).await? {
                break;
            }
            if events[from..].iter().any(is_output) {
                break;
            }
            held = events[from..]
                .iter()
                .map(event_bytes)
                .fold(held, usize::saturating_add);
            if events.len() > HEAD_MAX_EVENTS
                || held > HEAD_MAX_BYTES
                || bytes.len() > HEAD_MAX_BYTES
            {
                return Err(UpstreamError::new(
                    ErrorKind::MalformedResponse,
                    format!(
                        "backend sent more than {HEAD_MAX_EVENTS} events or {HEAD_MAX_BYTES} bytes before any output"
                    ),
                ));
            }
        }
        Ok(Head {
            bytes,
            events,
            reader: self,
        })
    }

    /// Reads one frame: its events onto `events`, its bytes for the client
    /// onto `out` (the end marker is left to the caller). `false` once the
    /// stream has finished; an error for a stream that fails, stalls, is cut
    /// or ends before its end marker.
    async fn next_frame(
        &mut self,
        out: &mut Vec<u8>,
        events: &mut Vec<StreamEvent>,
    ) -> Result<bool, UpstreamError> {
        loop {
            if self.decoder.finished() {
                return Ok(false);
            }
            if let Some(frame) = self.frames.next_frame() {
                self.frame(frame, out, events)?;
                return Ok(true);
            }
            let limit = self.frames.max_line();
            let too_long = || {
                UpstreamError::new(
                    ErrorKind::MalformedResponse,
                    format!("backend stream line or event exceeded the provider's limit of {limit} bytes"),
                )
            };
            if self.frames.overflowed() {
                return Err(too_long());
            }
            if self.eof {
                if let Some(frame) = self.frames.finish() {
                    self.frame(frame, out, events)?;
                    return Ok(true);
                }
                if self.frames.overflowed() {
                    return Err(too_long());
                }
                return Err(UpstreamError::new(
                    ErrorKind::MalformedResponse,
                    "backend closed the stream before it was complete",
                ));
            }
            match self.body.next().await {
                Some(Ok(b)) => self.frames.push(&b),
                Some(Err(e)) => return Err(e),
                None => self.eof = true,
            }
        }
    }

    fn frame(
        &mut self,
        frame: Frame,
        out: &mut Vec<u8>,
        events: &mut Vec<StreamEvent>,
    ) -> Result<(), UpstreamError> {
        let from = events.len();
        let data = match frame {
            Frame::Sse(ev)
                if ev.event.as_deref() != Some("error")
                    && !ev.other.iter().any(|(k, _)| k == "error") =>
            {
                self.decoder.decode(&ev.data, events)?;
                ev.data
            }
            // An error event: the decoder says what it is.
            other => {
                return self.decoder.frame(other, events);
            }
        };
        let new = &events[from..];
        if let Some(n) = self.cut {
            for ev in new {
                if matches!(ev, StreamEvent::Delta(d) if d.has_output()) {
                    if self.outputs >= n {
                        return Err(UpstreamError::new(
                            ErrorKind::MalformedResponse,
                            format!("drill: stream cut after {n} chunks"),
                        ));
                    }
                    self.outputs += 1;
                }
            }
        }
        let mut delta = false;
        let mut usage = None;
        for ev in new {
            match ev {
                StreamEvent::Meta(_) => self.encoder.encode(ev, &mut Vec::new()),
                StreamEvent::Delta(_) => delta = true,
                StreamEvent::Usage(u) => usage = Some(*u),
                // The caller writes the end, after any estimated usage.
                StreamEvent::Done => return Ok(()),
            }
        }
        // What the canonical encoder writes: a chunk per delta, usage in a
        // chunk of its own and only when the client asked for it.
        let own_usage = usage.filter(|_| !self.strip_usage);
        if !delta && own_usage.is_none() {
            return Ok(());
        }
        let start = out.len();
        out.extend_from_slice(b"data: ");
        let strip = self.strip_usage || (delta && usage.is_some());
        match splice_answer(data.as_bytes(), &self.shown, strip) {
            Some(b) => {
                out.extend_from_slice(&b);
                out.extend_from_slice(b"\n\n");
                if let Some(u) = own_usage.filter(|_| delta) {
                    self.encoder.encode(&StreamEvent::Usage(u), out);
                }
            }
            None => {
                out.truncate(start);
                for ev in &events[from..] {
                    self.encoder.encode(ev, out);
                }
            }
        }
        Ok(())
    }
}

/// A committed forwarded stream: its bytes for the client, watched by the
/// canonical path's [`UsageTap`] (usage, tokens, ticket, arm, end metrics).
pub(super) fn committed(
    mut tap: UsageTap,
    head: Box<Head>,
) -> BoxStream<'static, Result<Bytes, UpstreamError>> {
    let Head {
        bytes,
        events,
        mut reader,
    } = *head;
    Box::pin(async_stream::stream! {
        let mut out = bytes;
        let mut events = events;
        loop {
            let mut done = false;
            for ev in events.drain(..) {
                if ev == StreamEvent::Done {
                    done = true;
                } else {
                    tap.observe(&ev);
                }
            }
            if done {
                tap.mark_end();
                let estimated = tap.usage.is_none();
                let usage = tap.usage().await;
                let usage = tap.finish(usage);
                if estimated && !reader.strip_usage {
                    reader.encoder.encode(&StreamEvent::Usage(usage), &mut out);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                yield Ok(Bytes::from(out));
                return;
            }
            if !out.is_empty() {
                yield Ok(Bytes::from(std::mem::take(&mut out)));
            }
            match reader.next_frame(&mut out, &mut events).await {
                Ok(true) => {}
                Ok(false) => {
                    tap.shadow_failed(ErrorKind::MalformedResponse);
                    yield Err(UpstreamError::new(
                        ErrorKind::MalformedResponse,
                        "the backend stream ended without a finish",
                    ));
                    return;
                }
                Err(mut e) => {
                    if e.provider.is_empty() {
                        e.provider = tap.target.provider_id.to_string();
                    }
                    tap.fail(&e);
                    yield Err(e);
                    return;
                }
            }
        }
    })
}

// === splicing JSON without re-serializing it ===
//
// The scanner runs only on bodies serde has already accepted (the client's
// request, decoded for validation; an answer or chunk, decoded by the tap), so
// it needs no error reporting: anything it does not expect (a key written with
// escapes, a key twice) makes it give up, and the caller takes the canonical
// way.

/// A member of a JSON object's top level, as byte offsets.
#[derive(Debug, Clone, Copy)]
struct Member {
    /// Its key's opening quote.
    start: usize,
    /// Its value: start and end.
    value: (usize, usize),
    /// The end of the previous member's value (`None` for the first member).
    prev_end: Option<usize>,
    /// The start of the next member (`None` for the last).
    next_start: Option<usize>,
}

/// The byte ranges that take `members` out of their object, commas included
/// (`members` in the order of the object).
fn removals(members: &[Member], out: &mut Vec<(usize, usize)>) {
    let mut i = 0;
    while i < members.len() {
        let first = members[i];
        let mut last = first;
        while let Some(next) = members
            .get(i + 1)
            .filter(|m| last.next_start == Some(m.start))
        {
            last = *next;
            i += 1;
        }
        out.push(match (last.next_start, first.prev_end) {
            (Some(next), _) => (first.start, next),
            (None, Some(prev)) => (prev, last.value.1),
            (None, None) => (first.start, last.value.1),
        });
        i += 1;
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// One past the closing quote of the string opening at `i`, and whether it
/// holds an escape.
fn string_end(b: &[u8], i: usize) -> Option<(usize, bool)> {
    let mut j = i + 1;
    let mut escaped = false;
    loop {
        j += b.get(j..)?.iter().position(|c| *c == b'"' || *c == b'\\')?;
        if b[j] == b'"' {
            return Some((j + 1, escaped));
        }
        escaped = true;
        j += 2;
    }
}

/// One past the end of the value starting at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i).map(|(e, _)| e),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            // Only quotes and brackets matter: jump from one to the next.
            while let Some(skip) = b
                .get(j..)?
                .iter()
                .position(|c| matches!(c, b'"' | b'{' | b'[' | b'}' | b']'))
            {
                j += skip;
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?.0;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let n = b[i..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(b.len() - i);
            (n > 0).then_some(i + n)
        }
    }
}

/// The opening brace of the object `b` and its top-level members named
/// `keys`; `None` when `b` is not an object, a key is written with escapes, or
/// one of `keys` appears twice.
fn find_members<const N: usize>(
    b: &[u8],
    keys: [&[u8]; N],
) -> Option<(usize, [Option<Member>; N])> {
    let mut found = [None; N];
    let open = skip_ws(b, 0);
    if b.get(open) != Some(&b'{') {
        return None;
    }
    let mut i = skip_ws(b, open + 1);
    if b.get(i) == Some(&b'}') {
        return Some((open, found));
    }
    let mut prev_end = None;
    // The slot filled by the previous member, whose `next_start` is this one.
    let mut previous: Option<usize> = None;
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let start = i;
        let (key_end, escaped) = string_end(b, i)?;
        if escaped {
            return None;
        }
        let key = &b[start + 1..key_end - 1];
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let value_start = skip_ws(b, i + 1);
        let end = value_end(b, value_start)?;
        i = skip_ws(b, end);
        let comma_after = match b.get(i) {
            Some(b',') => Some(i),
            Some(b'}') => None,
            _ => return None,
        };
        if let Some(Some(m)) = previous.take().map(|k| &mut found[k]) {
            m.next_start = Some(start);
        }
        for (k, (want, slot)) in keys.iter().zip(found.iter_mut()).enumerate() {
            if key == *want {
                if slot.is_some() {
                    return None;
                }
                *slot = Some(Member {
                    start,
                    value: (value_start, end),
                    prev_end,
                    next_start: None,
                });
                previous = Some(k);
            }
        }
        match comma_after {
            Some(c) => {
                prev_end = Some(end);
                i = skip_ws(b, c + 1);
            }
            None => return Some((open, found)),
        }
    }
}

/// `b` with the byte ranges of `edits` replaced (ranges do not overlap).
fn apply(b: &[u8], edits: &mut [((usize, usize), &[u8])]) -> Vec<u8> {
    edits.sort_by_key(|((s, e), _)| (*s, *e));
    let extra: usize = edits.iter().map(|(_, w)| w.len()).sum();
    let mut out = Vec::with_capacity(b.len().saturating_add(extra));
    let mut at = 0;
    for ((s, e), with) in edits.iter() {
        out.extend_from_slice(&b[at..*s]);
        out.extend_from_slice(with);
        at = *e;
    }
    out.extend_from_slice(&b[at..]);
    out
}

const FORCED_USAGE: &[u8] = br#"{"include_usage":true}"#;

/// The client's request body for a target: `model` replaced by the target's
/// (a JSON string), `stream_options` asking for usage when `force_usage`;
/// `stream` and `stream_options` left out of a request that does not stream,
/// as the canonical encoder leaves them out. `None` when the body cannot be
/// spliced.
fn splice_request(raw: &[u8], model: &[u8], stream: bool, force_usage: bool) -> Option<Bytes> {
    let (open, [m, flag, options]) = find_members(raw, [b"model", b"stream", b"stream_options"])?;
    let m = m?;
    let inserted;
    let mut edits: Vec<((usize, usize), &[u8])> = vec![(m.value, model)];
    if !stream {
        let mut gone: Vec<Member> = flag.into_iter().chain(options).collect();
        gone.sort_by_key(|g| g.start);
        let mut ranges = Vec::new();
        removals(&gone, &mut ranges);
        edits.extend(ranges.into_iter().map(|r| (r, b"".as_slice())));
    } else if force_usage {
        match options {
            Some(o) => edits.push((o.value, FORCED_USAGE)),
            None => {
                inserted = [br#""stream_options":"#.as_slice(), FORCED_USAGE, b","].concat();
                edits.push(((open + 1, open + 1), &inserted));
            }
        }
    }
    Some(Bytes::from(apply(raw, &mut edits)))
}

/// An answer (a whole body, or a chunk's data) with `model` shown as `shown`
/// (a JSON string), without its `usage` member when `strip_usage`.
fn splice_answer(data: &[u8], shown: &[u8], strip_usage: bool) -> Option<Vec<u8>> {
    let (open, [m, usage]) = find_members(data, [b"model", b"usage"])?;
    let inserted;
    let mut edits: Vec<((usize, usize), &[u8])> = Vec::with_capacity(2);
    match m {
        Some(m) => edits.push((m.value, shown)),
        None => {
            let at = skip_ws(data, open + 1);
            let empty = data.get(at) == Some(&b'}');
            inserted = [
                b"\"model\":".as_slice(),
                shown,
                if empty { b"" } else { b"," },
            ]
            .concat();
            edits.push(((open + 1, open + 1), &inserted));
        }
    }
    if let Some(u) = usage.filter(|_| strip_usage) {
        let mut ranges = Vec::with_capacity(1);
        removals(&[u], &mut ranges);
        edits.extend(ranges.into_iter().map(|r| (r, b"".as_slice())));
    }
    Some(apply(data, &mut edits))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::{json, Value};

    fn spliced(raw: &str, stream: bool, force: bool) -> Option<Value> {
        splice_request(raw.as_bytes(), br#""m-2""#, stream, force)
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn the_request_keeps_its_bytes_but_model_and_stream_options() {
        let raw = r#"{ "messages" : [{"role":"user","content":"a \"model\": {x}"}], "model":"conf" ,"top_k":5}"#;
        let out = splice_request(raw.as_bytes(), br#""m-2""#, false, false).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "messages" : [{"role":"user","content":"a \"model\": {x}"}], "model":"m-2" ,"top_k":5}"#
        );
        let v = spliced(
            r#"{"model":"conf","stream":true,"messages":[]}"#,
            true,
            true,
        )
        .unwrap();
        assert_eq!(v["stream_options"], json!({"include_usage": true}));
        assert_eq!(v["model"], "m-2");
        let v = spliced(
            r#"{"model":"conf","stream":true,"stream_options":{"include_usage":false},"messages":[]}"#,
            true,
            true,
        )
        .unwrap();
        assert_eq!(v["stream_options"], json!({"include_usage": true}));
        // Not streaming: `stream` and stream_options are left out, wherever they stood.
        for raw in [
            r#"{"stream_options":{"include_usage":true},"model":"conf"}"#,
            r#"{"model":"conf","stream_options":{"include_usage":true}}"#,
            r#"{"model":"conf","stream_options":{"include_usage":true},"n":1}"#,
            r#"{"model":"conf","stream":false,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"conf","stream_options":{},"n":1,"stream":false}"#,
            r#"{"stream":false,"stream_options":{},"model":"conf"}"#,
            r#"{"model":"conf", "stream" : false , "stream_options":{} , "n":1}"#,
        ] {
            let v = spliced(raw, false, false).unwrap();
            assert!(v.get("stream_options").is_none(), "{raw}: {v}");
            assert!(v.get("stream").is_none(), "{raw}: {v}");
            assert_eq!(v["model"], "m-2");
        }
        // What the scanner does not read is left to the canonical path.
        assert!(spliced(r#"{"mod\u0065l":"conf"}"#, false, false).is_none());
        assert!(spliced(r#"{"model":"a","model":"b"}"#, false, false).is_none());
        assert!(spliced(r#"[1]"#, false, false).is_none());
    }

    #[test]
    fn a_value_ends_where_serde_says_it_does() {
        let values = [
            json!({"a": [1, {"b": "]}\\\"{["}], "c": {}}),
            json!([[[]], {"x": "\\"}, "}", 1.5e3, null, true]),
            json!("plain \"quoted\" \\"),
            json!(-12),
        ];
        for v in values {
            for text in [
                serde_json::to_string(&v).unwrap(),
                serde_json::to_string_pretty(&v).unwrap(),
            ] {
                let padded = format!("{text} , ");
                assert_eq!(value_end(padded.as_bytes(), 0), Some(text.len()), "{text}");
            }
        }
        assert_eq!(value_end(b"{\"a\": [1, 2}", 0), None, "unbalanced: no end");
    }

    #[test]
    fn answers_show_the_model_asked_for_and_usage_only_when_asked() {
        let chunk = br#"{"id":"c","model":"gpt-x","choices":[{"index":0,"delta":{"content":"}]"}}],"usage":null}"#;
        let out = splice_answer(chunk, br#""conf""#, true).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"id":"c","model":"conf","choices":[{"index":0,"delta":{"content":"}]"}}]}"#
        );
        let out = splice_answer(chunk, br#""conf""#, false).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "conf");
        assert!(v["usage"].is_null());
        let out = splice_answer(br#"{"choices":[]}"#, br#""conf""#, false).unwrap();
        assert_eq!(out, br#"{"model":"conf","choices":[]}"#);
        let out = splice_answer(br#"{ }"#, br#""conf""#, false).unwrap();
        assert_eq!(out, br#"{"model":"conf" }"#);
    }
}
