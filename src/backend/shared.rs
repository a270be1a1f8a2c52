//! What every backend must use: portable tool-call ids and the one bound on
//! choice indexes; and the hostile-number test over every backend's recorded
//! samples. (OpenAI-shaped helpers several backends share are `backend::common`.)

use crate::error::{ErrorKind, UpstreamError};

/// Choice indexes a backend may use in a stream: `0..MAX_CHOICES`, as many as a
/// client may ask for with `n` (checked at the edge). Decoders keep
/// per-choice state, and an index is an upstream-controlled number, so anything
/// beyond this is a malformed response rather than a reason to allocate.
pub const MAX_CHOICES: u32 = 128;

/// `index` when it is below [`MAX_CHOICES`], else a `malformed_response` error.
pub fn choice_index(index: u32) -> Result<u32, UpstreamError> {
    if index < MAX_CHOICES {
        Ok(index)
    } else {
        Err(UpstreamError::new(
            ErrorKind::MalformedResponse,
            format!(
                "backend sent choice index {index}; at most {MAX_CHOICES} choices are accepted"
            ),
        ))
    }
}

/// Tool-call ids that every protocol accepts.
///
/// A tool call's id travels from the backend that made it, through the client, to
/// whichever backend receives the next turn (possibly another one after a
/// fallback). OpenAI accepts at most 40 characters, Anthropic only
/// `[A-Za-z0-9_-]`, and backends invent ids of every shape (ChatGLM3 sends none,
/// some servers send 46 characters, old Gemini ids carried a thought signature).
/// So every id the gateway writes, to a client or to a backend, goes through
/// [`tool_id::portable`]: an id already within 40 characters of `[A-Za-z0-9_-]`
/// is kept as it is; any other id is replaced by `call_` + 32 hex digits of its
/// SHA-256. The mapping is a pure function, so a call and the tool result that
/// answers it map to the same id on every backend without any state, and a mapped
/// id maps to itself.
/// `prefix` and 32 hex digits of the SHA-256 of `text`: a stable stand-in for an
/// id a backend would refuse (tool-call ids, Zhipu's `user_id`).
pub fn hashed_id(prefix: &str, text: &str) -> String {
    use sha2::Digest;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = sha2::Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(prefix.len() + 32);
    out.push_str(prefix);
    for b in &digest[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

pub mod tool_id {
    use std::borrow::Cow;

    /// The longest id every protocol accepts (OpenAI's limit).
    pub const MAX_LEN: usize = 40;

    /// True when `id` is within [`MAX_LEN`] characters of `[A-Za-z0-9_-]`.
    pub fn is_portable(id: &str) -> bool {
        !id.is_empty()
            && id.len() <= MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }

    /// `id` unchanged when portable, else its stable portable replacement.
    pub fn portable(id: &str) -> Cow<'_, str> {
        if is_portable(id) {
            return Cow::Borrowed(id);
        }
        Cow::Owned(super::hashed_id("call_", id))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn portable_ids_are_kept_and_others_mapped_stably() {
            for id in ["call_abc", "toolu_01A-b_c", "x", &"a".repeat(40)] {
                assert!(matches!(portable(id), Cow::Borrowed(_)), "{id}");
            }
            let odd = [
                "",
                "call_1~ts~c2lnbmF0dXJl+/=",
                "chatcmpl-tool-0123456789abcdef0123456789abcdef",
                "call.1",
                "调用",
            ];
            for id in odd {
                let p = portable(id);
                assert!(is_portable(&p), "{id} → {p}");
                assert_eq!(p, portable(id), "stable");
                assert_eq!(portable(&p), p, "a mapped id maps to itself");
            }
            assert_ne!(portable("a.b"), portable("a.c"));
        }
    }
}

/// Every backend decoder against its recorded samples with their numbers
/// replaced by hostile ones (huge, negative, fractional) and cut at every
/// point: an error is fine, a panic or an allocation sized by a number is not.
#[cfg(test)]
mod hostile_numbers {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use crate::backend::common::testing::{decode_response, decode_stream};
    use crate::backend::{self, Codec};

    /// A codec for every fixture folder: the shipped provider files' codecs
    /// (folder named after the provider, else after its kind), and ChatGLM3's
    /// legacy function calling. Every HTTP kind must have recorded samples.
    fn codecs() -> BTreeMap<String, Arc<dyn Codec>> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let fixtures = root.join("tests/fixtures");
        let cfg = crate::config::load(&root.join("promptgate.yaml")).unwrap();
        let mut out: BTreeMap<String, Arc<dyn Codec>> = BTreeMap::new();
        for (id, p) in &cfg.providers {
            if p.kind.in_process {
                continue;
            }
            let codec = backend::codec(p).unwrap();
            if fixtures.join(id).is_dir() {
                out.insert(id.clone(), codec);
            } else {
                out.entry(p.kind.name.to_owned()).or_insert(codec);
            }
        }
        out.insert(
            "chatglm3".into(),
            Arc::new(backend::openai::OpenAiCodec::new(backend::openai::Quirks {
                legacy_functions: true,
                ..backend::openai::Quirks::default()
            })),
        );
        for kind in backend::KINDS.iter().filter(|k| !k.in_process) {
            assert!(
                out.contains_key(kind.name) && fixtures.join(kind.name).is_dir(),
                "kind `{}` needs a shipped provider file and tests/fixtures/{}/",
                kind.name,
                kind.name
            );
        }
        out
    }

    /// `text` with every run of digits replaced by `with`.
    fn replace_numbers(text: &str, with: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut in_digits = false;
        for c in text.chars() {
            if c.is_ascii_digit() {
                if !in_digits {
                    out.push_str(with);
                }
                in_digits = true;
            } else {
                in_digits = false;
                out.push(c);
            }
        }
        out
    }

    fn stream(codec: &dyn Codec, body: &[u8], chunk: usize) {
        let (out, _, _) = decode_stream(codec, body, chunk.max(1));
        assert!(out.len() <= body.len() + 8, "events bounded by input");
    }

    #[test]
    fn recorded_samples_with_hostile_numbers_never_panic() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let hostile = [
            "4294967295",
            "18446744073709551615",
            "-1",
            "1e300",
            "0.5",
            "99999999999999999999999999",
        ];
        for (dir, codec) in codecs() {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                for h in hostile {
                    let body = replace_numbers(&text, h);
                    let _ = decode_response(codec.as_ref(), body.as_bytes());
                    let _ = codec.embeddings_response(body.as_bytes());
                    let _ = codec.error(400, body.as_bytes());
                    if name.ends_with(".sse") || name.ends_with(".ndjson") {
                        for chunk in [1, 7, body.len()] {
                            stream(codec.as_ref(), body.as_bytes(), chunk);
                        }
                    }
                }
                // Cut at every point.
                let bytes = text.as_bytes();
                for cut in 0..bytes.len() {
                    let _ = decode_response(codec.as_ref(), &bytes[..cut]);
                    if name.ends_with(".sse") || name.ends_with(".ndjson") {
                        stream(codec.as_ref(), &bytes[..cut], 13);
                    }
                }
            }
        }
    }
}
