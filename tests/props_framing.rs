//! Property tests for SSE and NDJSON framing: any bytes, cut anywhere, give the
//! same frames as when they arrive whole; no frame and no buffered line is
//! larger than the decoder's limit; what comes out is bounded by what went in.
#![allow(clippy::unwrap_used)]

mod props_common;

use promptgate::framing::{Frame, FrameDecoder, Framing};
use proptest::prelude::*;

fn frame_len(f: &Frame) -> usize {
    match f {
        Frame::Line(l) => l.len(),
        Frame::Sse(e) => {
            e.data.len()
                + e.event.as_ref().map_or(0, String::len)
                + e.other
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
        }
    }
}

/// All frames of `input` fed in pieces cut at `cuts`, and whether the decoder
/// overflowed.
fn frames(framing: Framing, max_line: usize, input: &[u8], cuts: &[usize]) -> (Vec<Frame>, bool) {
    let mut d = FrameDecoder::with_max_line(framing, max_line);
    let mut out = Vec::new();
    let mut at = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.sort_unstable();
    points.push(input.len());
    for p in points {
        d.push(&input[at..p]);
        at = p;
        while let Some(f) = d.next_frame() {
            out.push(f);
        }
    }
    out.extend(d.finish());
    (out, d.overflowed())
}

/// Random bytes, most of them from the framings' own alphabet.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    props_common::biased_bytes(b"data: {}\n\r:eventx", 1500)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn frames_do_not_depend_on_how_bytes_are_cut(
        input in bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
        sse in any::<bool>(),
    ) {
        let framing = if sse { Framing::Sse } else { Framing::Ndjson };
        let whole = frames(framing, 1 << 20, &input, &[]);
        let cut = frames(framing, 1 << 20, &input, &cuts);
        prop_assert_eq!(&whole, &cut);
        // Lossy UTF-8 turns one bad byte into at most three.
        let total: usize = whole.0.iter().map(frame_len).sum();
        prop_assert!(total <= 3 * input.len());
        prop_assert!(whole.0.len() <= input.len() / 2 + 1);
    }

    #[test]
    fn no_frame_is_larger_than_the_limit(
        input in bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
        sse in any::<bool>(),
        max_line in 1usize..256,
    ) {
        let framing = if sse { Framing::Sse } else { Framing::Ndjson };
        let (out, overflowed) = frames(framing, max_line, &input, &cuts);
        for f in &out {
            // The limit counts raw bytes; lossy decoding may triple them.
            prop_assert!(frame_len(f) <= 3 * max_line, "{} > {}", frame_len(f), max_line);
        }
        if !overflowed {
            // Without an overflow the frames are those of an unlimited decoder.
            let unlimited = frames(framing, usize::MAX, &input, &cuts).0;
            prop_assert_eq!(out, unlimited);
        }
    }
}

/// An endless line and an endless event are cut off at the limit whatever the
/// piece size, and the decoder holds no more than the limit plus one piece.
#[test]
fn endless_input_is_cut_off_at_the_limit() {
    for framing in [Framing::Sse, Framing::Ndjson] {
        for piece in [1usize, 7, 1000, 70_000] {
            let mut d = FrameDecoder::with_max_line(framing, 64 * 1024);
            let chunk = vec![b'a'; piece];
            let mut pushed = 0usize;
            while !d.overflowed() {
                d.push(&chunk);
                pushed += piece;
                assert!(d.next_frame().is_none());
                assert!(pushed <= 64 * 1024 + 2 * piece, "{framing:?} {piece}");
            }
        }
        let mut d = FrameDecoder::with_max_line(Framing::Sse, 64 * 1024);
        let mut n = 0;
        while !d.overflowed() {
            d.push(b"data: 0123456789abcdef\n");
            assert!(d.next_frame().is_none());
            n += 1;
            assert!(n < 10_000);
        }
    }
}
