//! Shared by the property tests: mutations of recorded samples, and the size
//! measure that bounds what a decoder may produce from its input.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use promptgate::backend::Codec;
use proptest::prelude::*;

/// Numbers no sane backend or client sends, in the places real ones go.
pub const HOSTILE_NUMBERS: &[&str] = &[
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "99999999999999999999999999",
    "-1",
    "-2147483649",
    "1e300",
    "1e-300",
    "0.5",
    "NaN",
];

/// Up to `max` random bytes, about three in four drawn from `alphabet` (cheap to
/// generate: one `u8` per byte, no union of strategies).
pub fn biased_bytes(alphabet: &'static [u8], max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(move |v| {
        v.into_iter()
            .map(|b| {
                if b < 192 {
                    alphabet[usize::from(b) % alphabet.len()]
                } else {
                    b
                }
            })
            .collect()
    })
}

/// One edit of a sample. Positions are taken modulo the sample's length.
#[derive(Debug, Clone)]
pub enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Truncate(usize),
    /// Replace the k-th number of the sample by `HOSTILE_NUMBERS[i]`.
    Number(usize, usize),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Flip(p, b)),
        2 => (
            any::<usize>(),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 1..8),
                prop::sample::select(vec![
                    b"\n".to_vec(), b"\r\n".to_vec(), b"\n\n".to_vec(), b"data: ".to_vec(),
                    b"{".to_vec(), b"}".to_vec(), b"[".to_vec(), b"]".to_vec(), b"\"".to_vec(),
                    b"null".to_vec(), b",".to_vec(), b"\\u0000".to_vec(), b"\xff\xfe".to_vec(),
                ]),
            ]
        )
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        2 => (any::<usize>(), 1usize..64).prop_map(|(p, n)| Mutation::Delete(p, n)),
        1 => (any::<usize>(), 1usize..256).prop_map(|(p, n)| Mutation::Duplicate(p, n)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        4 => (any::<usize>(), 0..HOSTILE_NUMBERS.len()).prop_map(|(k, i)| Mutation::Number(k, i)),
    ]
}

pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 0..6)
}

/// Byte ranges of the JSON-looking numbers (digit runs with an optional sign).
pub fn number_spans(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = if i > 0 && b[i - 1] == b'-' { i - 1 } else { i };
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.') {
                j += 1;
            }
            out.push((start, j));
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

pub fn mutate(base: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = base.to_vec();
    for m in muts {
        let len = b.len().max(1);
        match m {
            Mutation::Flip(p, x) => {
                if !b.is_empty() {
                    let i = p % b.len();
                    b[i] = *x;
                }
            }
            Mutation::Insert(p, x) => {
                let i = p % (b.len() + 1);
                b.splice(i..i, x.iter().copied());
            }
            Mutation::Delete(p, n) => {
                let i = p % len;
                let end = (i + n).min(b.len());
                if i < end {
                    b.drain(i..end);
                }
            }
            Mutation::Duplicate(p, n) => {
                let i = p % len;
                let end = (i + n).min(b.len());
                if i < end {
                    let copy = b[i..end].to_vec();
                    b.splice(end..end, copy);
                }
            }
            Mutation::Truncate(p) => b.truncate(p % (b.len() + 1)),
            Mutation::Number(k, which) => {
                let spans = number_spans(&b);
                if !spans.is_empty() {
                    let (s, e) = spans[k % spans.len()];
                    b.splice(s..e, HOSTILE_NUMBERS[*which].bytes());
                }
            }
        }
    }
    b
}

/// The size of a decoded value: the length of its `Debug` text, which grows
/// with every string, element and field it holds (escapes included).
pub fn size_of<T: std::fmt::Debug>(v: &T) -> usize {
    format!("{v:?}").len()
}

/// The most a decoder may produce from `n` input bytes: a fixed multiple of
/// the input (escaping and per-field overhead) plus a constant.
pub fn bound(n: usize) -> usize {
    64 * n + 64 * 1024
}

/// One codec and the samples recorded for its protocol.
pub struct Subject {
    pub name: String,
    pub codec: Arc<dyn Codec>,
    pub samples: Vec<(String, Vec<u8>)>,
}

/// Every codec the shipped provider files configure, plus ChatGLM3's
/// legacy-functions variant; each paired with its fixtures.
pub fn subjects() -> &'static [Subject] {
    static SUBJECTS: OnceLock<Vec<Subject>> = OnceLock::new();
    SUBJECTS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("providers")).unwrap();
        std::fs::create_dir(dir.path().join("prompts")).unwrap();
        std::fs::write(dir.path().join("promptgate.yaml"), "routes: {}\n").unwrap();
        for entry in std::fs::read_dir(root.join("providers")).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, dir.path().join("providers").join(p.file_name().unwrap())).unwrap();
        }
        std::fs::write(
            dir.path().join("providers/chatglm3.yaml"),
            "kind: openai\nbase_url: http://127.0.0.1:1/v1\nself_hosted: true\nlegacy_functions: true\n",
        )
        .unwrap();
        let cfg = promptgate::config::load(&dir.path().join("promptgate.yaml")).unwrap();
        let mut out = Vec::new();
        for (id, p) in &cfg.providers {
            let kind = p.kind.name;
            if p.kind.in_process {
                continue;
            }
            let fixtures = [id.as_str(), kind]
                .iter()
                .map(|d| root.join("tests/fixtures").join(d))
                .find(|d| d.is_dir());
            let Some(fixtures) = fixtures else { continue };
            let mut samples: Vec<(String, Vec<u8>)> = std::fs::read_dir(&fixtures)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.is_file())
                .map(|p| {
                    (
                        p.file_name().unwrap().to_string_lossy().into_owned(),
                        std::fs::read(&p).unwrap(),
                    )
                })
                .collect();
            samples.sort();
            out.push(Subject {
                name: id.clone(),
                codec: promptgate::backend::codec(p).unwrap(),
                samples,
            });
        }
        assert!(out.len() >= 10, "only {} codecs", out.len());
        out
    })
}

/// Runs this test binary again, every test but `me`, under a data-segment
/// limit of `kib` KiB (`ulimit -d`, which covers heap and anonymous mappings).
/// An allocation sized from a number in the input then fails (and aborts the
/// child) even where overcommit would have let it pass unnoticed here.
pub fn rerun_under_memory_cap(me: &str, kib: u64) {
    if std::env::var_os("PROPS_UNDER_CAP").is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -d {kib} && exec \"$0\" \"$@\""))
        .arg(&exe)
        .args(["--skip", me, "--test-threads", "2"])
        .env("PROPS_UNDER_CAP", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the properties failed under a {kib} KiB data limit ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a decoded value holds in memory: its own size and every heap block it
/// owns, by capacity, so a buffer reserved from a number in the input counts
/// even while it stays empty. Unlike [`size_of`] (the length of its `Debug`
/// text), this is the memory a decoder's output keeps alive.
pub trait Held {
    /// Heap bytes owned, not counting the value itself.
    fn heap(&self) -> usize;
}

/// The memory `v` holds: its own size plus [`Held::heap`].
pub fn held<T: Held>(v: &T) -> usize {
    std::mem::size_of::<T>() + v.heap()
}

/// The explicit bound on held memory: a decoded value may hold at most this
/// many bytes per input byte… The canonical values are fixed-size structs (a
/// message is about 140 bytes before its text, a tool call or a fragment of
/// one 72–80) while the smallest JSON that yields one is 10–16 bytes, and a
/// vector grown while parsing may have twice its length in capacity: a list of
/// empty messages comes to about 20 bytes per byte, the worst found. The
/// factor leaves room for that and no more: anything sized from a number, or
/// a few bytes that each become a struct with a buffer, exceeds it.
pub const HELD_PER_BYTE: usize = 32;
/// …plus this much whatever the input (generated ids, the fixed size of a
/// response).
pub const HELD_SLACK: usize = 16 * 1024;

pub fn held_bound(n: usize) -> usize {
    HELD_PER_BYTE.saturating_mul(n).saturating_add(HELD_SLACK)
}

impl Held for String {
    fn heap(&self) -> usize {
        self.capacity()
    }
}

impl<T: Held> Held for Option<T> {
    fn heap(&self) -> usize {
        self.as_ref().map_or(0, Held::heap)
    }
}

impl<T: Held> Held for Vec<T> {
    fn heap(&self) -> usize {
        self.capacity() * std::mem::size_of::<T>() + self.iter().map(Held::heap).sum::<usize>()
    }
}

impl Held for f32 {
    fn heap(&self) -> usize {
        0
    }
}

impl Held for u32 {
    fn heap(&self) -> usize {
        0
    }
}

impl Held for serde_json::Value {
    fn heap(&self) -> usize {
        use serde_json::Value;
        match self {
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
            Value::String(s) => s.heap(),
            Value::Array(a) => a.heap(),
            // A map entry: its key, its value and about three words of node.
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| k.heap() + std::mem::size_of::<(String, Value)>() + 3 * 8 + v.heap())
                .sum(),
        }
    }
}

mod held_impls {
    use super::Held;
    use promptgate::canonical::*;

    impl Held for Part {
        fn heap(&self) -> usize {
            match self {
                Part::Text(t) => t.heap(),
                Part::Image { url, detail } => url.heap() + detail.heap(),
                Part::Other(v) => v.heap(),
            }
        }
    }

    impl Held for Content {
        fn heap(&self) -> usize {
            match self {
                Content::Text(t) => t.heap(),
                Content::Parts(p) => p.heap(),
            }
        }
    }

    impl Held for ToolCall {
        fn heap(&self) -> usize {
            self.id.heap() + self.name.heap() + self.arguments.heap()
        }
    }

    impl Held for Message {
        fn heap(&self) -> usize {
            self.content.heap()
                + self.name.heap()
                + self.tool_calls.heap()
                + self.tool_call_id.heap()
                + self.reasoning.heap()
        }
    }

    impl Held for Choice {
        fn heap(&self) -> usize {
            self.message.heap()
        }
    }

    impl Held for ChatResponse {
        fn heap(&self) -> usize {
            self.id.heap()
                + self.model.heap()
                + self.choices.heap()
                + self.system_fingerprint.heap()
        }
    }

    impl Held for ToolCallDelta {
        fn heap(&self) -> usize {
            self.id.heap() + self.name.heap() + self.arguments.heap()
        }
    }

    impl Held for Delta {
        fn heap(&self) -> usize {
            self.content.heap() + self.reasoning.heap() + self.tool_calls.heap()
        }
    }

    impl Held for StreamMeta {
        fn heap(&self) -> usize {
            self.id.heap() + self.model.heap() + self.system_fingerprint.heap()
        }
    }

    impl Held for StreamEvent {
        fn heap(&self) -> usize {
            match self {
                StreamEvent::Meta(m) => m.heap(),
                StreamEvent::Delta(d) => d.heap(),
                StreamEvent::Usage(_) | StreamEvent::Done => 0,
            }
        }
    }

    fn map_heap(m: &serde_json::Map<String, serde_json::Value>) -> usize {
        Held::heap(&serde_json::Value::Object(m.clone()))
    }

    impl Held for Tool {
        fn heap(&self) -> usize {
            self.name.heap() + self.description.heap() + self.parameters.heap()
        }
    }

    impl Held for ToolChoice {
        fn heap(&self) -> usize {
            match self {
                ToolChoice::Function(f) => f.heap(),
                _ => 0,
            }
        }
    }

    impl Held for ResponseFormat {
        fn heap(&self) -> usize {
            match self {
                ResponseFormat::JsonSchema(v) => v.heap(),
                _ => 0,
            }
        }
    }

    impl Held for Params {
        fn heap(&self) -> usize {
            self.stop.heap() + self.user.heap()
        }
    }

    impl Held for ChatRequest {
        fn heap(&self) -> usize {
            self.model.heap()
                + self.messages.heap()
                + self.params.heap()
                + self.tools.heap()
                + self.tool_choice.heap()
                + self.response_format.heap()
                + map_heap(&self.extra)
        }
    }

    impl Held for EmbeddingInput {
        fn heap(&self) -> usize {
            match self {
                EmbeddingInput::Texts(t) => t.heap(),
                EmbeddingInput::Tokens(t) => t.heap(),
            }
        }
    }

    impl Held for EmbeddingsRequest {
        fn heap(&self) -> usize {
            self.model.heap() + self.input.heap() + self.user.heap() + map_heap(&self.extra)
        }
    }

    impl Held for EmbeddingsResponse {
        fn heap(&self) -> usize {
            self.model.heap() + self.vectors.heap()
        }
    }
}
