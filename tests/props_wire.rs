//! Property tests for every backend wire decoder, driven through the public
//! `Codec` / `StreamDecoder` traits exactly as the transport drives them: the
//! recorded samples in tests/fixtures, mutated (bytes flipped, inserted, cut,
//! duplicated, numbers swapped for giant, negative or fractional ones), and
//! plain random bytes. Whatever arrives, a decoder returns a value or an error:
//! it never panics, and what it returns is bounded by a fixed multiple of its
//! input (no size is taken from a number in the input).
#![allow(clippy::unwrap_used)]

mod props_common;

use promptgate::backend::Codec;
use promptgate::framing::{FrameDecoder, Framing};
use proptest::prelude::*;
use proptest::sample::Index;

use props_common::{
    bound, held, held_bound, mutate, mutations, size_of, subjects, Held, Mutation, Subject,
};

/// What a stream decoder produced from its input.
struct Produced {
    /// The `Debug` size of all events.
    size: usize,
    /// The memory all events would hold if kept (as a stream's head is kept
    /// until its first output, or an assembler keeps a whole answer).
    held: usize,
    /// The most the caller's event buffer ever held, spare capacity included:
    /// a decoder that reserves from a number in its input shows here.
    buffer: usize,
    /// How many events.
    count: usize,
}

/// Feeds `input` to a fresh stream decoder in `piece`-byte pieces, as the
/// transport does, until the end or the first error.
fn run_stream(codec: &dyn Codec, input: &[u8], piece: usize) -> Produced {
    let mut frames = FrameDecoder::with_max_line(codec.stream_framing(), 64 * 1024);
    let mut dec = codec.stream_decoder();
    let mut events = Vec::new();
    let mut produced = 0;
    let mut kept = 0usize;
    let mut buffer = 0usize;
    let mut count = 0usize;
    let mut frame_count = 0usize;
    'feed: for chunk in input.chunks(piece.max(1)) {
        frames.push(chunk);
        while let Some(f) = frames.next_frame() {
            frame_count += 1;
            let r = dec.frame(f, &mut events);
            count += events.len();
            produced += events.iter().map(size_of).sum::<usize>();
            kept += events.iter().map(held).sum::<usize>();
            buffer = buffer.max(events.heap());
            events.clear();
            if r.is_err() || dec.finished() {
                break 'feed;
            }
        }
    }
    if let Some(f) = frames.finish() {
        frame_count += 1;
        let _ = dec.frame(f, &mut events);
        count += events.len();
        produced += events.iter().map(size_of).sum::<usize>();
        kept += events.iter().map(held).sum::<usize>();
        buffer = buffer.max(events.heap());
    }
    // Each frame is at least a byte and its line ending.
    assert!(
        frame_count <= input.len() / 2 + 1,
        "{frame_count} frames from {} bytes",
        input.len()
    );
    // A frame may expand into a few events (meta, deltas per choice, usage,
    // done), never into a number of them taken from its content.
    assert!(
        count <= 8 * frame_count + input.len() / 4 + 8,
        "{count} events from {frame_count} frames"
    );
    Produced {
        size: produced,
        held: kept,
        buffer,
        count,
    }
}

/// Every decoding entry point of `codec` on `input`, with its size bounds.
fn check(s: &Subject, name: &str, input: &[u8], piece: usize) {
    let limit = bound(input.len());
    let held_limit = held_bound(input.len());
    let codec = &*s.codec;
    if let Ok(r) = codec.chat_response(input) {
        let n = size_of(&r);
        assert!(
            n <= limit,
            "{}: chat_response of {} bytes gave {n}",
            s.name,
            input.len()
        );
        let h = held(&r);
        assert!(
            h <= held_limit,
            "{}: chat_response of {} bytes holds {h} bytes",
            s.name,
            input.len()
        );
    }
    if let Ok(r) = codec.embeddings_response(input) {
        let h = held(&r);
        assert!(
            h <= held_limit,
            "{}: embeddings_response of {} bytes holds {h} bytes",
            s.name,
            input.len()
        );
        let floats: usize = r.vectors.iter().map(Vec::len).sum();
        assert!(
            floats <= input.len(),
            "{}: {floats} floats from {} bytes",
            s.name,
            input.len()
        );
    }
    for status in [400, 401, 404, 413, 422, 429, 500, 503] {
        let e = codec.error(status, input);
        assert!(
            e.message.len() <= limit,
            "{}: error message of {} bytes from {}",
            s.name,
            e.message.len(),
            input.len()
        );
    }
    if name.ends_with(".sse") || name.ends_with(".ndjson") || name == "random" {
        let p = run_stream(codec, input, piece);
        assert!(
            p.size <= limit,
            "{}: stream of {} bytes gave {}",
            s.name,
            input.len(),
            p.size
        );
        assert!(
            p.held <= held_limit && p.buffer <= held_limit,
            "{}: stream of {} bytes holds {} bytes in events, {} in the buffer",
            s.name,
            input.len(),
            p.held,
            p.buffer
        );
    }
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(1500))]

    /// Recorded samples, mutated.
    #[test]
    fn decoders_survive_mutated_samples(
        subject in any::<Index>(),
        sample in any::<Index>(),
        muts in mutations(),
        piece in 1usize..600,
    ) {
        let s = &subjects()[subject.index(subjects().len())];
        let (name, base) = &s.samples[sample.index(s.samples.len())];
        let input = mutate(base, &muts);
        check(s, name, &input, piece);
    }
}

proptest! {
    #![proptest_config(config(300))]

    /// Bytes with no structure at all (biased towards the framing's own bytes).
    #[test]
    fn decoders_survive_random_bytes(
        subject in any::<Index>(),
        input in props_common::biased_bytes(b"data: {}[]\",:\n\r0123456789", 1500),
        piece in 1usize..300,
    ) {
        let s = &subjects()[subject.index(subjects().len())];
        check(s, "random", &input, piece);
    }
}

/// Every sample with every number in it replaced by each of the hostile
/// numbers, one number at a time: the mutation that found the sizing bugs,
/// run exhaustively rather than by chance.
#[test]
fn decoders_survive_every_number_made_hostile() {
    for s in subjects() {
        for (name, base) in &s.samples {
            // The first numbers of a sample are its ids, indexes, counts and
            // timestamps; long arrays of floats (embeddings) add nothing new.
            let numbers = props_common::number_spans(base).len().min(16);
            for k in 0..numbers {
                for which in 0..props_common::HOSTILE_NUMBERS.len() {
                    let muts = [Mutation::Number(k, which)];
                    let input = mutate(base, &muts);
                    if std::env::var_os("PROPS_TRACE").is_some() {
                        eprintln!("{} {name} {k} {which}", s.name);
                    }
                    check(s, name, &input, 97);
                }
            }
        }
    }
}

/// Bodies that repeat something small which a decoder might turn into
/// something large: deltas that carry nothing, empty tool-call fragments, empty
/// parts, in each protocol's shape. Every decoder, every body: what comes out
/// holds at most [`props_common::HELD_PER_BYTE`] bytes per input byte.
fn amplifiers() -> Vec<(&'static str, Vec<u8>)> {
    let n = 5_000;
    let sse = |data: &str| format!("data: {data}\n\n").repeat(n).into_bytes();
    let list = |item: &str| vec![item; n].join(",");
    let first = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
    let with_first = |body: Vec<u8>| [first.as_bytes(), &body].concat();
    vec![
        (
            "empty-deltas.sse",
            with_first(sse(r#"{"choices":[{"index":0,"delta":{}}]}"#)),
        ),
        ("no-deltas.sse", with_first(sse(r#"{"choices":[{"index":0}]}"#))),
        (
            "role-only.sse",
            with_first(sse(r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#)),
        ),
        (
            "empty-content.sse",
            with_first(sse(r#"{"choices":[{"index":0,"delta":{"content":""}}]}"#)),
        ),
        (
            "empty-tool-fragments.sse",
            with_first(
                format!(
                    "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"tool_calls\":[{}]}}}}]}}\n\n",
                    list("{}")
                )
                .into_bytes(),
            ),
        ),
        (
            "empty-arguments.sse",
            with_first(sse(
                r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":""}}]}}]}"#,
            )),
        ),
        (
            "empty-message.ndjson",
            "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":false}\n"
                .repeat(n)
                .into_bytes(),
        ),
        (
            "empty-parts.sse",
            format!(
                "data: {{\"candidates\":[{{\"index\":0,\"content\":{{\"role\":\"model\",\"parts\":[{}]}}}}]}}\n\n",
                list("{}")
            )
            .into_bytes(),
        ),
        (
            "empty-text-deltas.sse",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"\"}}\n\n"
                .repeat(n)
                .into_bytes(),
        ),
        (
            "empty-tool-calls.json",
            format!(
                "{{\"id\":\"x\",\"object\":\"chat.completion\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"finish_reason\":\"stop\",\"message\":{{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{}]}}}}]}}",
                list(r#"{"function":{}}"#)
            )
            .into_bytes(),
        ),
        (
            "empty-parts.json",
            format!(
                "{{\"candidates\":[{{\"index\":0,\"content\":{{\"role\":\"model\",\"parts\":[{}]}},\"finishReason\":\"STOP\"}}]}}",
                list("{}")
            )
            .into_bytes(),
        ),
    ]
}

#[test]
fn repeated_nothing_holds_little() {
    let bodies = amplifiers();
    for s in subjects() {
        for (name, body) in &bodies {
            check(s, name, body, 1460);
            if name.ends_with(".sse") || name.ends_with(".ndjson") {
                // Thousands of frames that carry nothing are not thousands of
                // events: a decoder drops them.
                let p = run_stream(&*s.codec, body, 1460);
                assert!(p.count <= 8, "{}: {name} gave {} events", s.name, p.count);
            }
        }
    }
}

/// The samples as recorded decode to something (guards against a broken setup
/// that would make every property vacuous).
#[test]
fn samples_as_recorded_decode() {
    let mut decoded = 0;
    for s in subjects() {
        for (name, body) in &s.samples {
            if name.starts_with("chat") && name.ends_with(".json") && !name.contains("error") {
                assert!(
                    s.codec.chat_response(body).is_ok(),
                    "{}: {name} does not decode",
                    s.name
                );
                decoded += 1;
            }
            if name == "chat.sse" || name == "chat.ndjson" {
                assert!(
                    run_stream(&*s.codec, body, 1460).size > 0,
                    "{}: {name}",
                    s.name
                );
                decoded += 1;
            }
        }
    }
    assert!(decoded >= 15, "{decoded}");
    let _ = Framing::Sse;
}

/// All of the above again in a child process that may use at most 512 MiB of
/// data: no input of a few KiB may make a decoder reserve more.
#[test]
fn properties_hold_under_a_memory_cap() {
    props_common::rerun_under_memory_cap("properties_hold_under_a_memory_cap", 512 * 1024);
}
