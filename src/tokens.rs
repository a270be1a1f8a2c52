//! Token counting with tiktoken, for usage a backend did not report. Each encoding
//! loads once per process. The encodings that routes to backends without usage
//! reporting will need are loaded at startup, in the background; any other is
//! loaded the first time a backend leaves usage out (the tables take tens of MB,
//! so a gateway whose backends all report usage never loads them).

use std::borrow::Cow;
use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use crate::canonical::{ChatRequest, ChatResponse, Content, Message, Part, Usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// GPT-4o, GPT-4.1, GPT-5 and the o-series.
    O200k,
    /// GPT-4, GPT-3.5, OpenAI embeddings; also the approximation for open models
    /// (LLaMA, GLM, Qwen…) whose own tokenizers are not bundled.
    Cl100k,
}

/// The encoding for a model name (the upstream model, not the route).
pub fn encoding_for(model: &str) -> Encoding {
    let m = model
        .rsplit('/')
        .next()
        .unwrap_or(model)
        .to_ascii_lowercase();
    let o200k = [
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "chatgpt-4o",
        "o1",
        "o3",
        "o4",
        "gpt-oss",
    ];
    if o200k.iter().any(|p| m.starts_with(p)) {
        Encoding::O200k
    } else {
        Encoding::Cl100k
    }
}

static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();

fn table(enc: Encoding) -> &'static OnceLock<Option<CoreBPE>> {
    match enc {
        Encoding::O200k => &O200K,
        Encoding::Cl100k => &CL100K,
    }
}

fn bpe(enc: Encoding) -> Option<&'static CoreBPE> {
    table(enc)
        .get_or_init(|| match enc {
            Encoding::O200k => tiktoken_rs::o200k_base().ok(),
            Encoding::Cl100k => tiktoken_rs::cl100k_base().ok(),
        })
        .as_ref()
}

/// Loads `encodings`; call at startup, off the request path.
pub fn warm(encodings: &[Encoding]) {
    for e in encodings {
        let _ = bpe(*e);
    }
}

/// Bytes of one request (or one response) the tokenizer sees; the text beyond
/// them is estimated at four bytes a token. Tokenizing is superlinear on long
/// words and runs of whitespace, so an unbounded input is a denial of service.
pub const EXACT_BYTES: usize = 256 * 1024;
/// Counts over less text than this run on the calling thread (if the encoding
/// is loaded); larger ones go to the blocking pool, a few at a time.
pub const INLINE_BYTES: usize = 8 * 1024;

/// Heavy counts running at once: one per CPU the process may use (more would
/// only queue for the CPUs); further counts wait their turn.
pub fn heavy_slots() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}

fn heavy() -> &'static tokio::sync::Semaphore {
    static HEAVY: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    HEAVY.get_or_init(|| tokio::sync::Semaphore::new(heavy_slots()))
}

/// About four bytes per token: the estimate where the tokenizer is not used.
fn rough(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(4)).unwrap_or(u32::MAX)
}

fn exact(bpe: &CoreBPE, text: &str) -> u32 {
    // tiktoken unwraps its regex matches; a backtracking limit hit on hostile
    // input panics. That must cost an estimate, never the response.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        bpe.encode_ordinary(text).len()
    }))
    .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    .unwrap_or_else(|_| rough(text.len()))
}

/// Counts the tokens of `text`, exactly for its first [`EXACT_BYTES`] and
/// estimated beyond. Never panics.
pub fn count(enc: Encoding, text: &str) -> u32 {
    let mut t = Tally::default();
    t.add(text);
    t.run(enc)
}

/// What one count covers: the texts the tokenizer will see (within a byte
/// budget), the bytes past the budget, and fixed per-message overheads.
#[derive(Default)]
struct Tally<'a> {
    pieces: Vec<Cow<'a, str>>,
    exact_bytes: usize,
    rest_bytes: usize,
    fixed: u32,
}

impl<'a> Tally<'a> {
    fn add(&mut self, text: impl Into<Cow<'a, str>>) {
        let text = text.into();
        if text.is_empty() {
            return;
        }
        let room = EXACT_BYTES - self.exact_bytes;
        if text.len() <= room {
            self.exact_bytes += text.len();
            self.pieces.push(text);
            return;
        }
        let mut cut = room;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.rest_bytes = self.rest_bytes.saturating_add(text.len() - cut);
        if cut > 0 {
            self.exact_bytes += cut;
            self.pieces.push(Cow::Owned(text[..cut].to_owned()));
        }
    }

    fn fixed(&mut self, n: u32) {
        self.fixed = self.fixed.saturating_add(n);
    }

    /// Counts here and now.
    fn run(&self, enc: Encoding) -> u32 {
        let mut n = self.fixed.saturating_add(rough(self.rest_bytes));
        match bpe(enc) {
            Some(b) => {
                for p in &self.pieces {
                    n = n.saturating_add(exact(b, p));
                }
            }
            None => n = n.saturating_add(rough(self.exact_bytes)),
        }
        n
    }

    /// Counts on the calling thread when cheap, else on the blocking pool with
    /// at most [`heavy_slots`] counts running; a failed count is an estimate.
    async fn run_async(self, enc: Encoding) -> u32 {
        let loaded = table(enc).get().is_some();
        if loaded && self.exact_bytes < INLINE_BYTES {
            return self.run(enc);
        }
        let fallback = self
            .fixed
            .saturating_add(rough(self.exact_bytes.saturating_add(self.rest_bytes)));
        let Ok(permit) = heavy().acquire().await else {
            return fallback;
        };
        let owned = Tally {
            pieces: self
                .pieces
                .into_iter()
                .map(|p| Cow::Owned(p.into_owned()))
                .collect(),
            ..self
        };
        // The permit goes with the work: a caller that gives up does not free
        // a slot while its count still runs.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            owned.run(enc)
        })
        .await
        .unwrap_or(fallback)
    }
}

fn add_message<'a>(t: &mut Tally<'a>, m: &'a Message) {
    // Each message costs its text plus a few tokens of framing (role, separators),
    // as chat formats wrap every message.
    t.fixed(4);
    if let Some(c) = &m.content {
        t.add(c.text());
    }
    for tc in &m.tool_calls {
        t.add(tc.name.as_str());
        t.add(tc.arguments.as_str());
    }
}

fn add_prompt<'a>(t: &mut Tally<'a>, req: &'a ChatRequest) {
    t.fixed(3); // the reply's priming
    for m in &req.messages {
        add_message(t, m);
    }
    for tool in &req.tools {
        t.add(tool.name.as_str());
        if let Some(d) = &tool.description {
            t.add(d.as_str());
        }
        if let Some(p) = &tool.parameters {
            t.add(p.to_string());
        }
    }
}

/// An upper bound on [`prompt_tokens`] for any encoding, without tokenizing:
/// every token covers at least one byte (and text past [`EXACT_BYTES`] is
/// estimated at a quarter of its bytes), so the text's bytes plus the
/// per-message framing are never fewer than the count. Linear, allocation-free.
pub fn prompt_bound(req: &ChatRequest) -> u32 {
    let mut bytes = 0usize;
    let mut fixed = 3u32;
    for m in &req.messages {
        fixed = fixed.saturating_add(4);
        match &m.content {
            Some(Content::Text(t)) => bytes = bytes.saturating_add(t.len()),
            Some(Content::Parts(parts)) => {
                for p in parts {
                    if let Part::Text(t) = p {
                        bytes = bytes.saturating_add(t.len());
                    }
                }
            }
            None => {}
        }
        for tc in &m.tool_calls {
            bytes = bytes
                .saturating_add(tc.name.len())
                .saturating_add(tc.arguments.len());
        }
    }
    for tool in &req.tools {
        bytes = bytes
            .saturating_add(tool.name.len())
            .saturating_add(tool.description.as_ref().map_or(0, String::len));
        if let Some(p) = &tool.parameters {
            bytes = bytes.saturating_add(json_len(p));
        }
    }
    u32::try_from(bytes)
        .unwrap_or(u32::MAX)
        .saturating_add(fixed)
}

/// The length of a value's compact JSON text, without writing it anywhere.
fn json_len(v: &serde_json::Value) -> usize {
    struct Len(usize);
    impl std::io::Write for Len {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = Len(0);
    let _ = serde_json::to_writer(&mut w, v);
    w.0
}

/// Whether a request surely fits a context window without counting its
/// tokens: its [`prompt_bound`] plus the output it asks for is within the
/// window. Only when this is false is an exact count worth its cost.
pub fn fits_uncounted(bound: u32, output_limit: u32, window: u32) -> bool {
    bound.saturating_add(output_limit) <= window
}

/// A request's prompt tokens, counted at most once per encoding and shared by
/// the context-window checks and the usage estimate.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PromptCounts {
    o200k: Option<u32>,
    cl100k: Option<u32>,
}

impl PromptCounts {
    fn slot(&mut self, enc: Encoding) -> &mut Option<u32> {
        match enc {
            Encoding::O200k => &mut self.o200k,
            Encoding::Cl100k => &mut self.cl100k,
        }
    }

    /// The count in `enc`, if it was taken.
    pub fn known(&self, enc: Encoding) -> Option<u32> {
        match enc {
            Encoding::O200k => self.o200k,
            Encoding::Cl100k => self.cl100k,
        }
    }

    /// The count in `enc`, taken now (off the worker if large) unless it was
    /// taken before.
    pub async fn get(&mut self, enc: Encoding, req: &ChatRequest) -> u32 {
        if let Some(n) = self.known(enc) {
            return n;
        }
        let n = prompt_tokens_async(enc, req).await;
        *self.slot(enc) = Some(n);
        n
    }
}

pub fn prompt_tokens(enc: Encoding, req: &ChatRequest) -> u32 {
    let mut t = Tally::default();
    add_prompt(&mut t, req);
    t.run(enc)
}

/// [`prompt_tokens`] without holding up the async worker on a large request.
pub async fn prompt_tokens_async(enc: Encoding, req: &ChatRequest) -> u32 {
    let mut t = Tally::default();
    add_prompt(&mut t, req);
    t.run_async(enc).await
}

/// The tokens of several texts (embedding inputs), off the worker if large.
pub async fn count_all_async(enc: Encoding, texts: &[String]) -> u32 {
    let mut t = Tally::default();
    for s in texts {
        t.add(s.as_str());
    }
    t.run_async(enc).await
}

/// Usage for a request and the text it produced, marked as estimated.
pub fn estimate(enc: Encoding, req: &ChatRequest, output: &str) -> Usage {
    let mut u = Usage::new(prompt_tokens(enc, req), count(enc, output));
    u.estimated = true;
    u
}

/// [`estimate`] without holding up the async worker on a large request;
/// `prompt` is the request's count in `enc` if it was already taken (it is
/// not taken again); `output_beyond` is output text not kept (past the
/// budget), in bytes.
pub async fn estimate_async(
    enc: Encoding,
    req: &ChatRequest,
    prompt: Option<u32>,
    output: &str,
    output_beyond: usize,
) -> Usage {
    let prompt = match prompt {
        Some(n) => n,
        None => prompt_tokens_async(enc, req).await,
    };
    let mut t = Tally::default();
    t.add(output);
    t.rest_bytes = t.rest_bytes.saturating_add(output_beyond);
    let completion = t.run_async(enc).await;
    let mut u = Usage::new(prompt, completion);
    u.estimated = true;
    u
}

/// All the output text of a response (content, reasoning, tool calls).
pub fn response_text(resp: &ChatResponse) -> String {
    let mut s = String::new();
    for c in &resp.choices {
        if let Some(t) = &c.message.content {
            s.push_str(&t.text());
        }
        if let Some(r) = &c.message.reasoning {
            s.push_str(r);
        }
        for t in &c.message.tool_calls {
            s.push_str(&t.name);
            s.push_str(&t.arguments);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn families_pick_their_encoding() {
        assert_eq!(encoding_for("gpt-4o-mini"), Encoding::O200k);
        assert_eq!(encoding_for("openai/o3-mini"), Encoding::O200k);
        assert_eq!(encoding_for("gpt-4-turbo"), Encoding::Cl100k);
        assert_eq!(encoding_for("glm-4-flash"), Encoding::Cl100k);
    }

    #[test]
    fn hostile_text_is_estimated_not_fed_whole_to_the_tokenizer() {
        // A run of a million spaces makes the tokenizer's regex give up (a panic
        // inside tiktoken); a multi-megabyte single word is quadratic in BPE.
        let spaces = " ".repeat(1_000_000);
        let n = count(Encoding::Cl100k, &spaces);
        assert!(n >= (1_000_000 - EXACT_BYTES as u32) / 4, "{n}");
        let word = "a".repeat(3_900_000);
        let n = count(Encoding::O200k, &word);
        assert!(n >= (3_900_000 - EXACT_BYTES as u32) / 4, "{n}");
        // Beyond the budget, a multi-byte text is cut on a character boundary.
        let wide = "é".repeat(EXACT_BYTES);
        assert!(count(Encoding::Cl100k, &wide) > 0);
    }

    #[tokio::test]
    async fn async_counts_agree_with_the_sync_ones() {
        let mut req = ChatRequest {
            model: "m".into(),
            messages: vec![Message::text(crate::canonical::Role::User, "hello world")],
            params: Default::default(),
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
            stream: false,
            include_usage: false,
            extra: Default::default(),
        };
        let small = prompt_tokens(Encoding::Cl100k, &req);
        assert_eq!(prompt_tokens_async(Encoding::Cl100k, &req).await, small);
        req.messages.push(Message::text(
            crate::canonical::Role::User,
            " ".repeat(1_000_000),
        ));
        let big = prompt_tokens_async(Encoding::Cl100k, &req).await;
        assert_eq!(big, prompt_tokens(Encoding::Cl100k, &req));
        let u = estimate_async(Encoding::Cl100k, &req, None, "hello world", 400).await;
        assert_eq!(u.completion_tokens, 2 + 100);
        assert!(u.estimated);
    }

    fn request(messages: Vec<Message>) -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages,
            params: Default::default(),
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
            stream: false,
            include_usage: false,
            extra: Default::default(),
        }
    }

    #[test]
    fn the_byte_bound_is_never_below_the_count() {
        use crate::canonical::{Role, Tool, ToolCall};
        let texts = [
            "hello world".to_string(),
            "日本語のテキストと絵文字 🎉🎉🎉 mixed with ASCII".repeat(50),
            " ".repeat(1_000_000),
            "a".repeat(EXACT_BYTES + 10),
            "é".repeat(EXACT_BYTES),
            String::new(),
        ];
        for t in &texts {
            let mut req = request(vec![
                Message::text(Role::System, "be brief"),
                Message::text(Role::User, t.as_str()),
            ]);
            let mut call = Message::text(Role::Assistant, "");
            call.tool_calls.push(ToolCall {
                id: "c".into(),
                name: "lookup".into(),
                arguments: r#"{"q":"ü"}"#.into(),
            });
            req.messages.push(call);
            req.messages.push(Message {
                content: Some(Content::Parts(vec![
                    Part::Text("part one".into()),
                    Part::Text(t.clone()),
                ])),
                ..Message::text(Role::User, "")
            });
            req.tools.push(Tool {
                name: "lookup".into(),
                description: Some("finds things".into()),
                parameters: Some(
                    serde_json::json!({"type": "object", "properties": {"q": {"type": "string"}}}),
                ),
                strict: None,
            });
            let bound = prompt_bound(&req);
            for enc in [Encoding::Cl100k, Encoding::O200k] {
                let n = prompt_tokens(enc, &req);
                assert!(bound >= n, "{enc:?}: bound {bound} < count {n}");
            }
        }
        // Bytes plus the framing: 3 for the reply, 4 per message.
        let req = request(vec![Message::text(Role::User, "hello world")]);
        assert_eq!(prompt_bound(&req), 11 + 3 + 4);
    }

    #[test]
    fn a_window_the_bound_settles_needs_no_count() {
        assert!(fits_uncounted(100, 50, 150));
        assert!(!fits_uncounted(100, 51, 150));
        // Saturating: nothing wraps into a small number that fits.
        assert!(!fits_uncounted(u32::MAX, 1, u32::MAX - 1));
        assert!(!fits_uncounted(10, u32::MAX, 1_000_000));
        assert!(fits_uncounted(0, u32::MAX, u32::MAX));
        // A small prompt on a large window is settled by its bytes alone.
        let req = request(vec![Message::text(
            crate::canonical::Role::User,
            "x".repeat(INLINE_BYTES * 4),
        )]);
        assert!(fits_uncounted(prompt_bound(&req), 4096, 128_000));
        assert!(!fits_uncounted(prompt_bound(&req), 4096, 8_192));
    }

    #[test]
    fn the_heavy_pool_follows_the_cpus() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(heavy_slots(), cpus);
        assert!(heavy_slots() >= 1);
    }

    #[tokio::test]
    async fn a_prompt_is_counted_once_per_encoding_and_reused() {
        let req = request(vec![Message::text(
            crate::canonical::Role::User,
            "hello world",
        )]);
        let mut counts = PromptCounts::default();
        assert_eq!(counts.known(Encoding::Cl100k), None);
        let n = counts.get(Encoding::Cl100k, &req).await;
        assert_eq!(n, prompt_tokens(Encoding::Cl100k, &req));
        assert_eq!(counts.known(Encoding::Cl100k), Some(n));
        assert_eq!(counts.known(Encoding::O200k), None);
        // A count already taken is what the estimate reports, not a new one.
        let u = estimate_async(Encoding::Cl100k, &req, Some(12_345), "hello world", 0).await;
        assert_eq!(u.prompt_tokens, 12_345);
        assert_eq!(u.completion_tokens, 2);
        let u = estimate_async(Encoding::Cl100k, &req, None, "", 0).await;
        assert_eq!(u.prompt_tokens, n);
    }

    #[test]
    fn counts_known_text() {
        // "hello world" is two tokens in both encodings.
        assert_eq!(count(Encoding::Cl100k, "hello world"), 2);
        assert_eq!(count(Encoding::O200k, "hello world"), 2);
        assert_eq!(count(Encoding::Cl100k, ""), 0);
    }
}
