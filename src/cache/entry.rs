//! One cached response (`Entry`), what it weighs in memory, which responses
//! may become one, and the entry's stored form.
//!
//! The stored form is the gateway's own: a format byte ([`FORMAT`]) followed
//! by JSON written from private mirror structs of the canonical types (which
//! are not `Serialize`), never a dialect's wire JSON. Every field of the
//! canonical response is kept, so a stored entry replays exactly what was
//! answered. The conversions destructure the canonical types completely: a
//! field added to them does not compile here until the stored form keeps it
//! (and [`FORMAT`] is bumped).

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::canonical::*;

/// The version of the stored form, its first byte; entries of any other
/// version are refused. 1 was the OpenAI wire JSON of the response.
pub const FORMAT: u8 = 2;
/// The longest an entry may still live once read back, whatever it says.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How far in the future an entry's creation time may lie (clock skew).
const MAX_SKEW: Duration = Duration::from_secs(60);

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

    /// The stored form: [`FORMAT`], then the JSON of the entry.
    pub fn encode(&self) -> Option<Vec<u8>> {
        let mut out = vec![FORMAT];
        serde_json::to_writer(&mut out, &stored::entry(self)).ok()?;
        Some(out)
    }

    /// Reads a stored form. The times in it are clamped: created no later than
    /// now (give or take clock skew), living at most [`MAX_TTL`] more; the
    /// entry keeps the time it has left.
    pub fn decode(raw: &[u8]) -> Result<Entry, &'static str> {
        let json = match raw.split_first() {
            Some((&FORMAT, json)) => json,
            Some(_) => return Err("an entry of another format version"),
            None => return Err("an empty entry"),
        };
        let s: stored::Entry<'_> =
            serde_json::from_slice(json).map_err(|_| "an entry with missing or invalid fields")?;
        let now = SystemTime::now();
        let created = SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_millis(s.created_ms))
            .ok_or("an entry with an invalid creation time")?;
        if created
            .duration_since(now)
            .is_ok_and(|ahead| ahead > MAX_SKEW)
        {
            return Err("an entry created in the future");
        }
        let ttl = Duration::from_millis(s.ttl_ms).min(MAX_TTL);
        let age = now.duration_since(created).unwrap_or_default();
        let remaining = ttl.checked_sub(age).ok_or("an expired entry")?;
        let response = stored::response(s.response);
        Ok(Entry {
            bytes: weight(&response),
            response,
            target: s.target.into_owned(),
            route: s.route.into_owned(),
            prompt: s.prompt.map(Cow::into_owned),
            created: created.min(now),
            // The memory tier keeps it only as long as the stored copy lives.
            ttl: remaining.max(Duration::from_millis(1)),
        })
    }
}

/// Milliseconds of `d`, saturated.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The mirror structs of the stored form. Encoding borrows from the entry;
/// decoding owns what it reads. Names are the gateway's own, not a dialect's.
mod stored {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Entry<'a> {
        pub target: Cow<'a, str>,
        pub route: Cow<'a, str>,
        pub prompt: Option<Cow<'a, str>>,
        pub created_ms: u64,
        pub ttl_ms: u64,
        pub response: Response<'a>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Response<'a> {
        id: Cow<'a, str>,
        created: u64,
        model: Cow<'a, str>,
        choices: Vec<Choice<'a>>,
        usage: Option<Usage>,
        system_fingerprint: Option<Cow<'a, str>>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Choice<'a> {
        index: u32,
        message: Message<'a>,
        finish_reason: Option<Finish>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Message<'a> {
        role: StoredRole,
        content: Option<StoredContent<'a>>,
        name: Option<Cow<'a, str>>,
        tool_calls: Vec<Call<'a>>,
        tool_call_id: Option<Cow<'a, str>>,
        reasoning: Option<Cow<'a, str>>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum StoredRole {
        System,
        Developer,
        User,
        Assistant,
        Tool,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    enum StoredContent<'a> {
        Text(Cow<'a, str>),
        Parts(Vec<StoredPart<'a>>),
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    enum StoredPart<'a> {
        Text(Cow<'a, str>),
        Image {
            url: Cow<'a, str>,
            detail: Option<Cow<'a, str>>,
        },
        /// A part the gateway does not model, kept as it came.
        Other(Cow<'a, Value>),
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Call<'a> {
        id: Cow<'a, str>,
        name: Cow<'a, str>,
        arguments: Cow<'a, str>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Finish {
        Stop,
        Length,
        ToolCalls,
        ContentFilter,
        Error,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Usage {
        prompt_tokens: u32,
        completion_tokens: u32,
        total_tokens: u32,
        cached_tokens: Option<u32>,
        reasoning_tokens: Option<u32>,
        estimated: bool,
    }

    fn s(x: &str) -> Cow<'_, str> {
        Cow::Borrowed(x)
    }

    fn o(x: Cow<'_, str>) -> String {
        x.into_owned()
    }

    pub(super) fn entry(e: &super::Entry) -> Entry<'_> {
        let super::Entry {
            response,
            target,
            route,
            prompt,
            created,
            ttl,
            bytes: _,
        } = e;
        Entry {
            target: s(target),
            route: s(route),
            prompt: prompt.as_deref().map(s),
            created_ms: millis(
                created
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default(),
            ),
            ttl_ms: millis(*ttl),
            response: to_response(response),
        }
    }

    fn to_response(r: &ChatResponse) -> Response<'_> {
        let ChatResponse {
            id,
            created,
            model,
            choices,
            usage,
            system_fingerprint,
        } = r;
        Response {
            id: s(id),
            created: *created,
            model: s(model),
            choices: choices.iter().map(to_choice).collect(),
            usage: usage.as_ref().map(to_usage),
            system_fingerprint: system_fingerprint.as_deref().map(s),
        }
    }

    fn to_choice(c: &crate::canonical::Choice) -> Choice<'_> {
        let crate::canonical::Choice {
            index,
            message,
            finish_reason,
        } = c;
        let crate::canonical::Message {
            role,
            content,
            name,
            tool_calls,
            tool_call_id,
            reasoning,
        } = message;
        Choice {
            index: *index,
            message: Message {
                role: match role {
                    Role::System => StoredRole::System,
                    Role::Developer => StoredRole::Developer,
                    Role::User => StoredRole::User,
                    Role::Assistant => StoredRole::Assistant,
                    Role::Tool => StoredRole::Tool,
                },
                content: content.as_ref().map(|c| match c {
                    Content::Text(t) => StoredContent::Text(s(t)),
                    Content::Parts(parts) => StoredContent::Parts(
                        parts
                            .iter()
                            .map(|p| match p {
                                Part::Text(t) => StoredPart::Text(s(t)),
                                Part::Image { url, detail } => StoredPart::Image {
                                    url: s(url),
                                    detail: detail.as_deref().map(s),
                                },
                                Part::Other(v) => StoredPart::Other(Cow::Borrowed(v)),
                            })
                            .collect(),
                    ),
                }),
                name: name.as_deref().map(s),
                tool_calls: tool_calls
                    .iter()
                    .map(|t| {
                        let ToolCall {
                            id,
                            name,
                            arguments,
                        } = t;
                        Call {
                            id: s(id),
                            name: s(name),
                            arguments: s(arguments),
                        }
                    })
                    .collect(),
                tool_call_id: tool_call_id.as_deref().map(s),
                reasoning: reasoning.as_deref().map(s),
            },
            finish_reason: finish_reason.map(|f| match f {
                FinishReason::Stop => Finish::Stop,
                FinishReason::Length => Finish::Length,
                FinishReason::ToolCalls => Finish::ToolCalls,
                FinishReason::ContentFilter => Finish::ContentFilter,
                FinishReason::Error => Finish::Error,
            }),
        }
    }

    fn to_usage(u: &crate::canonical::Usage) -> Usage {
        let crate::canonical::Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens,
            cached_tokens,
            reasoning_tokens,
            estimated,
        } = *u;
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens,
            cached_tokens,
            reasoning_tokens,
            estimated,
        }
    }

    pub(super) fn response(r: Response<'_>) -> ChatResponse {
        ChatResponse {
            id: o(r.id),
            created: r.created,
            model: o(r.model),
            choices: r.choices.into_iter().map(from_choice).collect(),
            usage: r.usage.map(|u| crate::canonical::Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                total_tokens: u.total_tokens,
                cached_tokens: u.cached_tokens,
                reasoning_tokens: u.reasoning_tokens,
                estimated: u.estimated,
            }),
            system_fingerprint: r.system_fingerprint.map(o),
        }
    }

    fn from_choice(c: Choice<'_>) -> crate::canonical::Choice {
        let m = c.message;
        crate::canonical::Choice {
            index: c.index,
            message: crate::canonical::Message {
                role: match m.role {
                    StoredRole::System => Role::System,
                    StoredRole::Developer => Role::Developer,
                    StoredRole::User => Role::User,
                    StoredRole::Assistant => Role::Assistant,
                    StoredRole::Tool => Role::Tool,
                },
                content: m.content.map(|c| match c {
                    StoredContent::Text(t) => Content::Text(o(t)),
                    StoredContent::Parts(parts) => Content::Parts(
                        parts
                            .into_iter()
                            .map(|p| match p {
                                StoredPart::Text(t) => Part::Text(o(t)),
                                StoredPart::Image { url, detail } => Part::Image {
                                    url: o(url),
                                    detail: detail.map(o),
                                },
                                StoredPart::Other(v) => Part::Other(v.into_owned()),
                            })
                            .collect(),
                    ),
                }),
                name: m.name.map(o),
                tool_calls: m
                    .tool_calls
                    .into_iter()
                    .map(|t| ToolCall {
                        id: o(t.id),
                        name: o(t.name),
                        arguments: o(t.arguments),
                    })
                    .collect(),
                tool_call_id: m.tool_call_id.map(o),
                reasoning: m.reasoning.map(o),
            },
            finish_reason: c.finish_reason.map(|f| match f {
                Finish::Stop => FinishReason::Stop,
                Finish::Length => FinishReason::Length,
                Finish::ToolCalls => FinishReason::ToolCalls,
                Finish::ContentFilter => FinishReason::ContentFilter,
                Finish::Error => FinishReason::Error,
            }),
        }
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

/// Responses and entries for the cache's tests.
#[cfg(test)]
pub(crate) mod samples {
    use super::*;

    /// A one-choice answer saying `content`.
    pub fn answer(content: &str) -> ChatResponse {
        ChatResponse {
            id: "c1".into(),
            created: 1,
            model: "m".into(),
            choices: vec![Choice {
                index: 0,
                message: Message::text(Role::Assistant, content),
                finish_reason: Some(FinishReason::Stop),
            }],
            usage: None,
            system_fingerprint: None,
        }
    }

    /// An entry of route `r`, answered by `p/m`.
    pub fn entry(response: ChatResponse, created: SystemTime, ttl: Duration) -> Entry {
        Entry {
            bytes: weight(&response),
            response,
            target: "p/m".into(),
            route: "r".into(),
            prompt: None,
            created,
            ttl,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::samples::answer;
    use super::*;
    use serde_json::json;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn now_ms() -> u64 {
        millis(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap(),
        )
    }

    fn entry(response: ChatResponse, created_ms: u64, ttl_ms: u64) -> Entry {
        super::samples::entry(response, at(created_ms), Duration::from_millis(ttl_ms))
    }

    /// A response using every field and variant the canonical model has.
    fn rich() -> ChatResponse {
        let message = |role, content, reasoning: Option<&str>| Message {
            role,
            content,
            name: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            reasoning: reasoning.map(str::to_owned),
        };
        let roles = [
            Role::System,
            Role::Developer,
            Role::User,
            Role::Assistant,
            Role::Tool,
        ];
        let finishes = [
            Some(FinishReason::Stop),
            Some(FinishReason::Length),
            Some(FinishReason::ToolCalls),
            Some(FinishReason::ContentFilter),
            Some(FinishReason::Error),
            None,
        ];
        let mut choices: Vec<Choice> = Vec::new();
        choices.push(Choice {
            index: 0,
            message: Message {
                name: Some("helper".into()),
                tool_calls: vec![
                    ToolCall {
                        id: "call_1".into(),
                        name: "lookup".into(),
                        arguments: r#"{"q":"wé\"ather","n":[1,2]}"#.into(),
                    },
                    ToolCall {
                        id: "call_2".into(),
                        name: "broken".into(),
                        // Arguments are kept as text, invalid JSON included.
                        arguments: r#"{"unclosed":"#.into(),
                    },
                ],
                tool_call_id: Some("call_0".into()),
                ..message(Role::Assistant, None, Some("first, think"))
            },
            finish_reason: Some(FinishReason::ToolCalls),
        });
        choices.push(Choice {
            index: 1,
            message: message(
                Role::Assistant,
                Some(Content::Parts(vec![
                    Part::Text("see ".into()),
                    Part::Image {
                        url: "data:image/png;base64,AAAA".into(),
                        detail: Some("high".into()),
                    },
                    Part::Image {
                        url: "https://example.test/x.png".into(),
                        detail: None,
                    },
                    Part::Other(json!({
                        "type": "input_audio",
                        "input_audio": {"data": "UklGRg==", "format": "wav"},
                        "vendor": {"nested": [1, 2.5, null, true, "x"], "empty": {}},
                    })),
                    Part::Text(String::new()),
                ])),
                None,
            ),
            finish_reason: Some(FinishReason::Stop),
        });
        for (i, (role, finish)) in roles.into_iter().zip(finishes).enumerate() {
            choices.push(Choice {
                index: u32::try_from(i).unwrap() + 2,
                message: message(
                    role,
                    Some(Content::Text(format!("text {i} ✓\n\t\u{0}"))),
                    None,
                ),
                finish_reason: finish,
            });
        }
        choices.push(Choice {
            index: u32::MAX,
            message: message(Role::Assistant, Some(Content::Parts(Vec::new())), Some("")),
            finish_reason: None,
        });
        ChatResponse {
            id: "chatcmpl-123".into(),
            created: u64::MAX,
            model: "model-x".into(),
            choices,
            usage: Some(Usage {
                prompt_tokens: 120,
                completion_tokens: 30,
                total_tokens: u32::MAX,
                cached_tokens: Some(100),
                reasoning_tokens: Some(12),
                estimated: true,
            }),
            system_fingerprint: Some("fp_1".into()),
        }
    }

    /// Every field of a response survives the stored form exactly.
    #[test]
    fn the_stored_form_keeps_every_field() {
        let created = now_ms();
        for response in [rich(), answer("hi")] {
            let mut e = entry(response.clone(), created, 3_600_000);
            e.prompt = Some("greeting".into());
            let raw = e.encode().unwrap();
            assert_eq!(raw[0], FORMAT);
            let back = Entry::decode(&raw).unwrap();
            assert_eq!(back.response, response);
            assert_eq!(
                (
                    back.target.as_str(),
                    back.route.as_str(),
                    back.prompt.as_deref()
                ),
                ("p/m", "r", Some("greeting"))
            );
            assert_eq!(back.created, at(created));
            assert!(back.ttl <= e.ttl && back.ttl > e.ttl - Duration::from_secs(60));
            assert_eq!(back.bytes, e.bytes);
        }
        // Usage without the optional figures, and no usage at all.
        let mut r = answer("hi");
        r.usage = Some(Usage::new(3, 4));
        let back = Entry::decode(&entry(r.clone(), created, 60_000).encode().unwrap()).unwrap();
        assert_eq!(back.response, r);
    }

    /// The stored form is the gateway's own, not a dialect's: no OpenAI
    /// envelope fields, and names of the canonical model.
    #[test]
    fn the_stored_form_is_not_a_dialect() {
        let raw = entry(rich(), now_ms(), 60_000).encode().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw[1..]).unwrap();
        let text = v.to_string();
        assert!(!text.contains("chat.completion"), "{text}");
        assert!(!text.contains("\"object\""), "{text}");
        assert_eq!(v["response"]["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["response"]["usage"]["estimated"], true);
    }

    /// Entries of the previous format (the response as OpenAI wire JSON, no
    /// format byte) and of any other format version are refused.
    #[test]
    fn other_formats_are_refused() {
        let previous = serde_json::to_vec(&json!({
            "target": "p/m", "route": "r", "prompt": null, "created_ms": now_ms(),
            "ttl_ms": 60_000, "estimated": false,
            "response": {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]},
        }))
        .unwrap();
        assert!(Entry::decode(&previous)
            .unwrap_err()
            .contains("format version"));
        let mut raw = entry(answer("hi"), now_ms(), 60_000).encode().unwrap();
        for other in [0, 1, FORMAT + 1, b'{'] {
            raw[0] = other;
            assert!(Entry::decode(&raw).unwrap_err().contains("format version"));
        }
        raw[0] = FORMAT;
        assert!(Entry::decode(&raw).is_ok());
        assert!(Entry::decode(b"").is_err());
        // Right version, wrong shape: unknown or missing fields.
        let mut v: serde_json::Value = serde_json::from_slice(&raw[1..]).unwrap();
        v["response"]["object"] = json!("chat.completion");
        let extra = [&[FORMAT][..], &serde_json::to_vec(&v).unwrap()].concat();
        assert!(Entry::decode(&extra).is_err());
        v["response"].as_object_mut().unwrap().remove("object");
        v["response"].as_object_mut().unwrap().remove("choices");
        let missing = [&[FORMAT][..], &serde_json::to_vec(&v).unwrap()].concat();
        assert!(Entry::decode(&missing).is_err());
    }

    fn stored(created_ms: u64, ttl_ms: u64) -> Vec<u8> {
        entry(answer("hi"), created_ms, ttl_ms).encode().unwrap()
    }

    #[test]
    fn stored_times_are_clamped() {
        let e = Entry::decode(&stored(now_ms(), u64::MAX)).unwrap();
        assert!(e.ttl <= MAX_TTL);
        assert!(Entry::decode(&stored(now_ms() + 3_600_000, 60_000)).is_err());
        assert!(Entry::decode(&stored(u64::MAX, 60_000)).is_err());
        assert!(
            Entry::decode(&stored(now_ms() - 120_000, 60_000)).is_err(),
            "expired"
        );
        assert!(Entry::decode(&stored(now_ms(), 60_000)).is_ok());
    }
}
