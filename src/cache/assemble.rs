//! Rebuilding a complete response from a stream's events, so a stream that
//! ended properly can be stored like any other response.

use std::collections::BTreeMap;

use crate::canonical::*;

/// Text, reasoning, tool calls (by their stream index) and finish reason of one
/// choice being assembled.
#[derive(Default)]
struct PartialChoice {
    text: String,
    reasoning: Option<String>,
    tool_calls: BTreeMap<u32, ToolCall>,
    finish: Option<FinishReason>,
}

/// Rebuilds a complete response from stream events, to store a stream once it
/// has ended properly. Choice and tool-call indexes are the backend's numbers, so
/// they key maps and never size anything; what is kept is bounded by a byte limit.
pub struct Assembler {
    meta: StreamMeta,
    choices: BTreeMap<u32, PartialChoice>,
    usage: Option<Usage>,
    bytes: usize,
    limit: usize,
}

impl Assembler {
    /// An assembler that gives up (and yields an uncacheable response) once it
    /// holds more than `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        Assembler {
            meta: StreamMeta::default(),
            choices: BTreeMap::new(),
            usage: None,
            bytes: 0,
            limit,
        }
    }

    /// Past the limit: what was held is dropped and nothing will be stored.
    fn overflowed(&self) -> bool {
        self.bytes > self.limit
    }

    /// Counts `n` more bytes (a fixed cost for each new choice or tool call
    /// included); false once past the limit, after dropping everything held.
    fn grow(&mut self, n: usize) -> bool {
        self.bytes = self.bytes.saturating_add(n);
        if self.overflowed() {
            self.choices = BTreeMap::new();
        }
        !self.overflowed()
    }

    pub fn push(&mut self, ev: &StreamEvent) {
        if self.overflowed() {
            return;
        }
        match ev {
            StreamEvent::Meta(m) => self.meta = m.clone(),
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::Done => {}
            StreamEvent::Delta(d) => {
                let mut size = d.content.as_ref().map_or(0, String::len)
                    + d.reasoning.as_ref().map_or(0, String::len);
                if !self.choices.contains_key(&d.choice) {
                    size += 64;
                }
                for t in &d.tool_calls {
                    size += [&t.id, &t.name, &t.arguments]
                        .iter()
                        .map(|x| x.as_ref().map_or(0, String::len))
                        .sum::<usize>()
                        + 16;
                }
                if !self.grow(size) {
                    return;
                }
                let c = self.choices.entry(d.choice).or_default();
                if let Some(t) = &d.content {
                    c.text.push_str(t);
                }
                if let Some(r) = &d.reasoning {
                    c.reasoning.get_or_insert_with(String::new).push_str(r);
                }
                for t in &d.tool_calls {
                    let call = c.tool_calls.entry(t.index).or_insert_with(|| ToolCall {
                        id: String::new(),
                        name: String::new(),
                        arguments: String::new(),
                    });
                    if let Some(id) = &t.id {
                        call.id.clone_from(id);
                    }
                    if let Some(n) = &t.name {
                        call.name.push_str(n);
                    }
                    if let Some(a) = &t.arguments {
                        call.arguments.push_str(a);
                    }
                }
                if d.finish_reason.is_some() {
                    c.finish = d.finish_reason;
                }
            }
        }
    }

    /// The assembled response. After an overflow it has no choices, which
    /// [`cacheable`](super::cacheable) refuses.
    pub fn finish(self) -> ChatResponse {
        ChatResponse {
            id: self.meta.id,
            created: self.meta.created,
            model: self.meta.model,
            choices: self
                .choices
                .into_iter()
                .map(|(index, c)| {
                    let tool_calls: Vec<ToolCall> = c.tool_calls.into_values().collect();
                    Choice {
                        index,
                        message: Message {
                            role: Role::Assistant,
                            content: (!c.text.is_empty() || tool_calls.is_empty())
                                .then_some(Content::Text(c.text)),
                            name: None,
                            tool_calls,
                            tool_call_id: None,
                            reasoning: c.reasoning,
                        },
                        finish_reason: c.finish,
                    }
                })
                .collect(),
            usage: self.usage,
            system_fingerprint: self.meta.system_fingerprint,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::entry::cacheable;
    use super::*;

    fn delta(choice: u32, text: &str) -> StreamEvent {
        StreamEvent::Delta(Delta {
            choice,
            content: Some(text.into()),
            ..Delta::default()
        })
    }

    #[test]
    fn assembler_keys_choices_by_index_and_sizes_nothing_from_it() {
        let mut a = Assembler::with_limit(1 << 20);
        a.push(&delta(u32::MAX, "far"));
        a.push(&delta(0, "near"));
        a.push(&StreamEvent::Delta(Delta {
            choice: u32::MAX,
            tool_calls: vec![ToolCallDelta {
                index: u32::MAX,
                id: Some("c1".into()),
                name: Some("f".into()),
                arguments: Some("{}".into()),
            }],
            finish_reason: Some(FinishReason::ToolCalls),
            ..Delta::default()
        }));
        a.push(&StreamEvent::Delta(Delta {
            choice: 0,
            finish_reason: Some(FinishReason::Stop),
            ..Delta::default()
        }));
        let r = a.finish();
        assert_eq!(r.choices.len(), 2);
        assert_eq!(r.choices[0].index, 0);
        assert_eq!(
            r.choices[0].message.content.as_ref().unwrap().text(),
            "near"
        );
        assert_eq!(r.choices[1].index, u32::MAX);
        assert_eq!(r.choices[1].message.tool_calls.len(), 1);
        assert_eq!(r.choices[1].message.tool_calls[0].name, "f");
        assert!(cacheable(&r));
    }

    #[test]
    fn assembler_gives_up_past_its_byte_limit() {
        let mut a = Assembler::with_limit(1000);
        for _ in 0..100 {
            a.push(&delta(0, "0123456789"));
        }
        a.push(&StreamEvent::Delta(Delta {
            choice: 0,
            finish_reason: Some(FinishReason::Stop),
            ..Delta::default()
        }));
        assert!(a.bytes <= 1200 && a.choices.is_empty());
        let r = a.finish();
        assert!(!cacheable(&r), "an overflowed assembly is never stored");
        // Many distinct indexes count too.
        let mut a = Assembler::with_limit(10_000);
        for i in 0..100_000u32 {
            a.push(&delta(i.wrapping_mul(40_503), ""));
        }
        assert!(a.choices.is_empty() && a.overflowed());
    }
}
