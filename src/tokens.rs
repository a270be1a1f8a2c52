//! Token counting with tiktoken, for usage a backend did not report. Each encoding
//! loads once per process. The encodings that routes to backends without usage
//! reporting will need are loaded at startup, in the background; any other is
//! loaded the first time a backend leaves usage out (the tables take tens of MB,
//! so a gateway whose backends all report usage never loads them).

use std::borrow::Cow;
use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use crate::canonical::{ChatRequest, ChatResponse, Message, Usage};

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
/// Heavy counts running at once; more wait their turn.
const HEAVY_AT_ONCE: usize = 2;

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
    /// at most [`HEAVY_AT_ONCE`] counts running; a failed count is an estimate.
    async fn run_async(self, enc: Encoding) -> u32 {
        let loaded = table(enc).get().is_some();
        if loaded && self.exact_bytes < INLINE_BYTES {
            return self.run(enc);
        }
        static HEAVY: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(HEAVY_AT_ONCE);
        let fallback = self
            .fixed
            .saturating_add(rough(self.exact_bytes.saturating_add(self.rest_bytes)));
        let Ok(permit) = HEAVY.acquire().await else {
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
/// `output_beyond` is output text not kept (past the budget), in bytes.
pub async fn estimate_async(
    enc: Encoding,
    req: &ChatRequest,
    output: &str,
    output_beyond: usize,
) -> Usage {
    let prompt = prompt_tokens_async(enc, req).await;
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
        let u = estimate_async(Encoding::Cl100k, &req, "hello world", 400).await;
        assert_eq!(u.completion_tokens, 2 + 100);
        assert!(u.estimated);
    }

    #[test]
    fn counts_known_text() {
        // "hello world" is two tokens in both encodings.
        assert_eq!(count(Encoding::Cl100k, "hello world"), 2);
        assert_eq!(count(Encoding::O200k, "hello world"), 2);
        assert_eq!(count(Encoding::Cl100k, ""), 0);
    }
}
