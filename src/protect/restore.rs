//! Restoring redacted values in the answer.
//!
//! A placeholder is `[LABEL_N]`: `[`, the detector's name in upper case, `_`,
//! a number counted per detector within the request, `]` (e.g.
//! `[CN_MOBILE_1]`). Models copy such bracketed tokens verbatim. A number
//! whose placeholder already occurs in the client's own text is skipped, so
//! restoring never rewrites something the client wrote. Only exact
//! placeholders of this request are restored; an altered one stays as the
//! model wrote it.
//!
//! In a stream, each choice's content, reasoning and each tool call's
//! arguments are restored separately. A chunk that ends in what may be the
//! start of one of the request's placeholders keeps that tail back until the
//! next chunk completes or refutes it; the rest is sent at once. What is held
//! is sent when the choice finishes, before the end of the stream, and before
//! an error event.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};

use crate::backend::EventStream;
use crate::canonical::{ChatResponse, Content, Delta, Part, StreamEvent, ToolCallDelta};
use crate::error::UpstreamError;

/// The placeholders of one request and the values they stand for.
#[derive(Default)]
pub struct Restorer {
    map: HashMap<String, String>,
    /// The longest placeholder, in bytes.
    longest: usize,
}

impl Restorer {
    pub(super) fn insert(&mut self, placeholder: String, value: String) {
        self.longest = self.longest.max(placeholder.len());
        self.map.insert(placeholder, value);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// `s` with this request's placeholders replaced by their values
    /// (JSON-escaped when `json`: inside tool-call arguments).
    pub fn restore_str<'a>(&self, s: &'a str, json: bool) -> Cow<'a, str> {
        if self.map.is_empty() || !s.contains('[') {
            return Cow::Borrowed(s);
        }
        let mut out = String::new();
        let mut copied = 0;
        let mut from = 0;
        while let Some(off) = s[from..].find('[') {
            let p = from + off;
            let window = &s.as_bytes()[p..s.len().min(p + self.longest)];
            let value = window
                .iter()
                .position(|&c| c == b']')
                .and_then(|q| self.map.get(&s[p..=p + q]).map(|v| (v, p + q + 1)));
            match value {
                Some((v, end)) => {
                    out.push_str(&s[copied..p]);
                    if json {
                        push_json(&mut out, v);
                    } else {
                        out.push_str(v);
                    }
                    copied = end;
                    from = end;
                }
                None => from = p + 1,
            }
        }
        if copied == 0 {
            return Cow::Borrowed(s);
        }
        out.push_str(&s[copied..]);
        Cow::Owned(out)
    }

    /// How many bytes at the end of `s` may be the start of a placeholder.
    fn hold_len(&self, s: &str) -> usize {
        let Some(p) = s.rfind('[') else {
            return 0;
        };
        let tail = &s[p..];
        if tail.len() >= self.longest {
            return 0;
        }
        if self
            .map
            .keys()
            .any(|k| k.len() > tail.len() && k.starts_with(tail))
        {
            tail.len()
        } else {
            0
        }
    }

    /// Restores a complete answer: each choice's text, reasoning and tool-call
    /// arguments.
    pub fn restore_response(&self, resp: &mut ChatResponse) {
        for c in &mut resp.choices {
            let m = &mut c.message;
            match &mut m.content {
                Some(Content::Text(t)) => self.restore_in(t, false),
                Some(Content::Parts(parts)) => {
                    for p in parts {
                        if let Part::Text(t) = p {
                            self.restore_in(t, false);
                        }
                    }
                }
                None => {}
            }
            if let Some(r) = &mut m.reasoning {
                self.restore_in(r, false);
            }
            for call in &mut m.tool_calls {
                self.restore_in(&mut call.arguments, true);
            }
        }
    }

    fn restore_in(&self, s: &mut String, json: bool) {
        if let Cow::Owned(o) = self.restore_str(s, json) {
            *s = o;
        }
    }
}

/// `v` as the inside of a JSON string.
fn push_json(out: &mut String, v: &str) {
    match serde_json::to_string(v) {
        Ok(q) => out.push_str(&q[1..q.len() - 1]),
        Err(_) => out.push_str(v),
    }
}

/// Collects the placeholder-shaped tokens (`[A-Z][A-Z0-9_]*_[0-9]+]`) in `s`.
pub(super) fn placeholders_in(s: &str, taken: &mut HashSet<String>) {
    let b = s.as_bytes();
    let mut from = 0;
    while let Some(off) = s[from..].find('[') {
        let p = from + off;
        from = p + 1;
        let mut q = p + 1;
        if !b.get(q).is_some_and(u8::is_ascii_uppercase) {
            continue;
        }
        while q < b.len()
            && q - p < 64
            && (b[q].is_ascii_uppercase() || b[q].is_ascii_digit() || b[q] == b'_')
        {
            q += 1;
        }
        if b.get(q) != Some(&b']') {
            continue;
        }
        let inner = &s[p + 1..q];
        let shaped = inner
            .rsplit_once('_')
            .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
        if shaped {
            taken.insert(s[p..=q].to_owned());
        }
    }
}

/// Which text of a choice a held tail belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Content,
    Reasoning,
    Tool(u32),
}

struct Held {
    choice: u32,
    slot: Slot,
    text: String,
}

struct Restoring {
    inner: EventStream,
    map: Arc<Restorer>,
    held: Vec<Held>,
    queue: VecDeque<Result<StreamEvent, UpstreamError>>,
    ended: bool,
}

/// Wraps a stream so its placeholders are restored, also when one is split
/// across chunks.
pub fn restore_stream(map: Arc<Restorer>, inner: EventStream) -> EventStream {
    Box::pin(Restoring {
        inner,
        map,
        held: Vec::new(),
        queue: VecDeque::new(),
        ended: false,
    })
}

impl Restoring {
    /// The text to send now for `text` arriving in a slot; keeps back a
    /// possible placeholder start unless `flush`.
    fn feed(&mut self, choice: u32, slot: Slot, text: String, flush: bool) -> String {
        let held = self
            .held
            .iter()
            .position(|h| h.choice == choice && h.slot == slot)
            .map(|i| self.held.swap_remove(i).text);
        if held.is_none() && !text.contains('[') {
            // Nothing to restore and nothing that can start a placeholder.
            return text;
        }
        let mut s = match held {
            Some(mut h) => {
                h.push_str(&text);
                h
            }
            None => text,
        };
        let keep = if flush { 0 } else { self.map.hold_len(&s) };
        if keep > 0 {
            let tail = s.split_off(s.len() - keep);
            self.held.push(Held {
                choice,
                slot,
                text: tail,
            });
        }
        match self.map.restore_str(&s, matches!(slot, Slot::Tool(_))) {
            Cow::Borrowed(_) => s,
            Cow::Owned(o) => o,
        }
    }

    fn delta(&mut self, mut d: Delta) -> Option<Delta> {
        let finish = d.finish_reason.is_some();
        let choice = d.choice;
        if let Some(c) = d.content.take() {
            d.content = Some(self.feed(choice, Slot::Content, c, finish)).filter(|s| !s.is_empty());
        }
        if let Some(r) = d.reasoning.take() {
            d.reasoning =
                Some(self.feed(choice, Slot::Reasoning, r, finish)).filter(|s| !s.is_empty());
        }
        for t in &mut d.tool_calls {
            if let Some(a) = t.arguments.take() {
                t.arguments = Some(self.feed(choice, Slot::Tool(t.index), a, finish))
                    .filter(|s| !s.is_empty());
            }
        }
        if finish {
            self.flush_into(&mut d);
        }
        d.tool_calls
            .retain(|t| t.id.is_some() || t.name.is_some() || t.arguments.is_some());
        let empty = d.content.is_none()
            && d.reasoning.is_none()
            && d.tool_calls.is_empty()
            && d.role.is_none()
            && d.finish_reason.is_none();
        (!empty).then_some(d)
    }

    /// Adds what is held for `d.choice` to `d` (it is finishing).
    fn flush_into(&mut self, d: &mut Delta) {
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].choice != d.choice {
                i += 1;
                continue;
            }
            let h = self.held.remove(i);
            let json = matches!(h.slot, Slot::Tool(_));
            let text = self.map.restore_str(&h.text, json).into_owned();
            match h.slot {
                Slot::Content => d.content.get_or_insert_with(String::new).push_str(&text),
                Slot::Reasoning => d.reasoning.get_or_insert_with(String::new).push_str(&text),
                Slot::Tool(index) => match d.tool_calls.iter_mut().find(|t| t.index == index) {
                    Some(t) => t.arguments.get_or_insert_with(String::new).push_str(&text),
                    None => d.tool_calls.push(ToolCallDelta {
                        index,
                        arguments: Some(text),
                        ..ToolCallDelta::default()
                    }),
                },
            }
        }
    }

    /// Queues what is still held, choice by choice.
    fn flush_all(&mut self) {
        while let Some(first) = self.held.first() {
            let mut d = Delta {
                choice: first.choice,
                ..Delta::default()
            };
            self.flush_into(&mut d);
            self.queue.push_back(Ok(StreamEvent::Delta(d)));
        }
    }
}

impl Stream for Restoring {
    type Item = Result<StreamEvent, UpstreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(ev) = this.queue.pop_front() {
                return Poll::Ready(Some(ev));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match this.inner.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(StreamEvent::Delta(d)))) => {
                    if let Some(d) = this.delta(d) {
                        return Poll::Ready(Some(Ok(StreamEvent::Delta(d))));
                    }
                }
                Poll::Ready(Some(Ok(StreamEvent::Done))) => {
                    this.flush_all();
                    this.queue.push_back(Ok(StreamEvent::Done));
                }
                Poll::Ready(Some(Ok(ev))) => return Poll::Ready(Some(Ok(ev))),
                Poll::Ready(Some(Err(e))) => {
                    this.flush_all();
                    this.queue.push_back(Err(e));
                }
                Poll::Ready(None) => {
                    this.flush_all();
                    this.ended = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::canonical::FinishReason;

    fn restorer() -> Arc<Restorer> {
        let mut r = Restorer::default();
        r.insert("[CN_MOBILE_1]".into(), "13800138000".into());
        r.insert("[CN_ID_1]".into(), "11010519491231002X".into());
        r.insert("[EMPLOYEE_1]".into(), "say \"hi\"".into());
        Arc::new(r)
    }

    fn delta(choice: u32, content: &str) -> StreamEvent {
        StreamEvent::Delta(Delta {
            choice,
            content: Some(content.into()),
            ..Delta::default()
        })
    }

    async fn run(
        events: Vec<Result<StreamEvent, UpstreamError>>,
    ) -> Vec<Result<StreamEvent, UpstreamError>> {
        let inner: EventStream = Box::pin(futures_util::stream::iter(events));
        restore_stream(restorer(), inner).collect().await
    }

    fn text_of(events: &[Result<StreamEvent, UpstreamError>], choice: u32) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                Ok(StreamEvent::Delta(d)) if d.choice == choice => d.content.clone(),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn complete_text_is_restored_and_other_brackets_are_left_alone() {
        let r = restorer();
        assert_eq!(
            r.restore_str(
                "call [CN_MOBILE_1], id [CN_ID_1]; [CN_MOBILE_2] [x] [",
                false
            ),
            "call 13800138000, id 11010519491231002X; [CN_MOBILE_2] [x] ["
        );
        assert!(matches!(
            r.restore_str("no placeholders [here]", false),
            Cow::Borrowed(_)
        ));
        // Inside tool-call arguments the value is JSON-escaped.
        assert_eq!(
            r.restore_str(r#"{"q":"[EMPLOYEE_1]"}"#, true),
            r#"{"q":"say \"hi\""}"#
        );
    }

    #[tokio::test]
    async fn placeholders_split_across_chunks_are_restored_and_nothing_else_waits() {
        // Every split of the text into two chunks.
        let text = "Your phone [CN_MOBILE_1] and ID [CN_ID_1] are on file [ok].";
        let want = "Your phone 13800138000 and ID 11010519491231002X are on file [ok].";
        for cut in 1..text.len() {
            let out = run(vec![
                Ok(delta(0, &text[..cut])),
                Ok(delta(0, &text[cut..])),
                Ok(StreamEvent::Done),
            ])
            .await;
            assert_eq!(text_of(&out, 0).concat(), want, "cut at {cut}");
            assert!(matches!(out.last(), Some(Ok(StreamEvent::Done))));
        }
        // Three-byte chunks.
        let chunks: Vec<_> = text
            .as_bytes()
            .chunks(3)
            .map(|c| Ok(delta(0, std::str::from_utf8(c).unwrap())))
            .collect();
        let out = run(chunks).await;
        assert_eq!(text_of(&out, 0).concat(), want);
        // Text that cannot start a placeholder is sent as it arrives.
        let out = run(vec![Ok(delta(0, "a [b")), Ok(delta(0, "c] [CN_"))]).await;
        assert_eq!(text_of(&out, 0), ["a [b", "c] ", "[CN_"]);
    }

    #[tokio::test]
    async fn held_text_is_sent_at_finish_before_errors_and_per_choice() {
        let finish = StreamEvent::Delta(Delta {
            choice: 0,
            finish_reason: Some(FinishReason::Stop),
            ..Delta::default()
        });
        let out = run(vec![
            Ok(delta(0, "x [CN_MOB")),
            Ok(delta(1, "y [CN_")),
            Ok(delta(0, "ILE_1]")),
            Ok(finish.clone()),
            Ok(delta(1, "ID_1")),
            Err(UpstreamError::new(crate::error::ErrorKind::Connect, "cut")),
        ])
        .await;
        assert_eq!(text_of(&out, 0).concat(), "x 13800138000");
        assert_eq!(text_of(&out, 1).concat(), "y [CN_ID_1");
        assert!(matches!(out.last(), Some(Err(_))));
        // A finishing delta carries what its choice held.
        let out = run(vec![
            Ok(delta(0, "x [CN_MOB")),
            Ok(StreamEvent::Delta(Delta {
                choice: 0,
                content: Some("ILE_1".into()),
                finish_reason: Some(FinishReason::Length),
                ..Delta::default()
            })),
        ])
        .await;
        assert_eq!(text_of(&out, 0), ["x ", "[CN_MOBILE_1"]);
    }

    #[tokio::test]
    async fn tool_call_arguments_are_restored_across_chunks() {
        let args = r#"{"phone":"[CN_MOBILE_1]","note":"[EMPLOYEE_1]"}"#;
        let events = args
            .as_bytes()
            .chunks(4)
            .map(|c| {
                Ok(StreamEvent::Delta(Delta {
                    choice: 0,
                    tool_calls: vec![ToolCallDelta {
                        index: 0,
                        arguments: Some(std::str::from_utf8(c).unwrap().into()),
                        ..ToolCallDelta::default()
                    }],
                    ..Delta::default()
                }))
            })
            .chain([Ok(StreamEvent::Done)])
            .collect();
        let out = run(events).await;
        let got: String = out
            .iter()
            .filter_map(|e| match e {
                Ok(StreamEvent::Delta(d)) => d.tool_calls.first().and_then(|t| t.arguments.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(got, r#"{"phone":"13800138000","note":"say \"hi\""}"#);
    }

    #[test]
    fn placeholder_shapes_in_client_text_are_found() {
        let mut taken = HashSet::new();
        placeholders_in(
            "[CN_MOBILE_1] [EMAIL_12] [NOPE] [A_] [x_1] [B_2",
            &mut taken,
        );
        let mut t: Vec<_> = taken.into_iter().collect();
        t.sort();
        assert_eq!(t, ["[CN_MOBILE_1]", "[EMAIL_12]"]);
    }
}
