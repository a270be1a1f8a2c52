//! Token counting with tiktoken, for usage a backend did not report. Each encoding
//! loads once per process. The encodings that routes to backends without usage
//! reporting will need are loaded at startup, in the background; any other is
//! loaded the first time a backend leaves usage out (the tables take tens of MB,
//! so a gateway whose backends all report usage never loads them).

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

fn bpe(enc: Encoding) -> Option<&'static CoreBPE> {
    static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
    static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
    match enc {
        Encoding::O200k => O200K
            .get_or_init(|| tiktoken_rs::o200k_base().ok())
            .as_ref(),
        Encoding::Cl100k => CL100K
            .get_or_init(|| tiktoken_rs::cl100k_base().ok())
            .as_ref(),
    }
}

/// Loads `encodings`; call at startup, off the request path.
pub fn warm(encodings: &[Encoding]) {
    for e in encodings {
        let _ = bpe(*e);
    }
}

pub fn count(enc: Encoding, text: &str) -> u32 {
    if text.is_empty() {
        return 0;
    }
    match bpe(enc) {
        Some(b) => b.encode_ordinary(text).len() as u32,
        // Without a tokenizer, about four characters per token.
        None => text.len().div_ceil(4) as u32,
    }
}

fn message_tokens(enc: Encoding, m: &Message) -> u32 {
    // Each message costs its text plus a few tokens of framing (role, separators),
    // as chat formats wrap every message.
    let mut n = 4;
    if let Some(c) = &m.content {
        n += count(enc, &c.text());
    }
    for t in &m.tool_calls {
        n += count(enc, &t.name) + count(enc, &t.arguments);
    }
    n
}

pub fn prompt_tokens(enc: Encoding, req: &ChatRequest) -> u32 {
    let mut n = 3; // the reply's priming
    for m in &req.messages {
        n += message_tokens(enc, m);
    }
    for t in &req.tools {
        n += count(enc, &t.name);
        if let Some(d) = &t.description {
            n += count(enc, d);
        }
        if let Some(p) = &t.parameters {
            n += count(enc, &p.to_string());
        }
    }
    n
}

/// Usage for a request and the text it produced, marked as estimated.
pub fn estimate(enc: Encoding, req: &ChatRequest, output: &str) -> Usage {
    let mut u = Usage::new(prompt_tokens(enc, req), count(enc, output));
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
    fn counts_known_text() {
        // "hello world" is two tokens in both encodings.
        assert_eq!(count(Encoding::Cl100k, "hello world"), 2);
        assert_eq!(count(Encoding::O200k, "hello world"), 2);
        assert_eq!(count(Encoding::Cl100k, ""), 0);
    }
}
