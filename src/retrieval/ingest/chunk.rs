//! The chunker: a document's sections → chunks of at most `chunk.max_tokens`
//! tokens (tiktoken cl100k), each repeating about `chunk.overlap` tokens of
//! the one before it.
//!
//! Text is never cut inside a token array: it is split at boundaries into
//! units whose tokens are counted once each, and a chunk is a run of whole
//! units. The boundaries, from preferred to last resort:
//!
//! 1. sentence ends: `。！？；` (and closing quotes or brackets after them);
//!    `.`, `!`, `?` followed by a space or a line end; paragraph breaks
//!    (a blank line). A heading always starts a new chunk (sections are
//!    chunked apart).
//! 2. line ends, inside a unit of level 1 that alone is over the limit;
//! 3. clause marks (`，、：` and `,;:` before a space);
//! 4. spaces between words;
//! 5. character boundaries, a few dozen bytes apart; a chunk that ends in
//!    such a run takes the longest prefix of the next piece that still fits.
//!
//! Newlines after a sentence end stay with it; spaces go with the next
//! sentence, so units tokenize as they would inside the whole text and the
//! sum of their counts bounds the chunk's count.

use std::collections::VecDeque;

use super::read::Section;
use super::Chunk;
use crate::config::ChunkConfig;
use crate::tokens::{count, Encoding};

/// The smallest chunk size the chunker works with.
pub const MIN_MAX_TOKENS: u32 = 16;

fn tokens(s: &str) -> u32 {
    count(Encoding::Cl100k, s)
}

/// How a unit was cut from its text (see the module's list).
const SENTENCE: u8 = 0;
const LINE: u8 = 1;
const CLAUSE: u8 = 2;
const WORD: u8 = 3;
const CHARS: u8 = 4;

/// A piece of a section's text with its token count.
#[derive(Debug, Clone, Copy)]
struct Unit {
    start: usize,
    end: usize,
    tokens: u32,
    /// The boundary level that produced it.
    level: u8,
    /// Its end is not a boundary (a cut inside a run of characters).
    glued: bool,
}

/// Cuts a document into chunks. `title` is the document title; each chunk's
/// title is the title and its section's heading path, joined with " > ".
/// Positions count from 0 across the whole document.
pub fn chunk(title: &str, sections: &[Section], cfg: ChunkConfig) -> Vec<Chunk> {
    let max = cfg.max_tokens.max(MIN_MAX_TOKENS);
    let overlap = cfg.overlap.min(max / 2);
    let mut out = Vec::new();
    let mut position = 0u32;
    for s in sections {
        let text = s.text.as_str();
        if text.trim().is_empty() {
            continue;
        }
        let label = heading_label(title, &s.path);
        let mut units = Vec::new();
        for (a, b) in split(text, 0, text.len(), SENTENCE, max) {
            consider(text, a, b, SENTENCE, max, &mut units);
        }
        pack(text, units, max, overlap, &label, &mut position, &mut out);
    }
    out
}

/// The title and the heading path, joined with " > " (a first heading equal
/// to the title is not repeated).
pub fn heading_label(title: &str, path: &[String]) -> String {
    let mut parts: Vec<&str> = Vec::with_capacity(path.len() + 1);
    if !title.is_empty() {
        parts.push(title);
    }
    for (i, h) in path.iter().enumerate() {
        if i == 0 && h == title {
            continue;
        }
        parts.push(h);
    }
    parts.join(" > ")
}

/// Units longer than this many bytes are split before they are counted
/// (they cannot fit, and tokenizing one long run is quadratic).
fn count_limit(max: u32) -> usize {
    usize::try_from(max)
        .unwrap_or(usize::MAX)
        .saturating_mul(8)
        .max(256)
}

/// `text[a..b]`, cut at `level`: a unit if it fits in `max`, else cut finer.
fn consider(text: &str, a: usize, b: usize, level: u8, max: u32, out: &mut Vec<Unit>) {
    if b - a <= count_limit(max) {
        let t = tokens(&text[a..b]);
        if t <= max {
            out.push(Unit {
                start: a,
                end: b,
                tokens: t,
                level,
                glued: false,
            });
            return;
        }
    }
    finer(text, a, b, level + 1, max, out);
}

/// Splits `text[a..b]`, which does not fit in `max`, at `level` and finer.
fn finer(text: &str, a: usize, b: usize, level: u8, max: u32, out: &mut Vec<Unit>) {
    if level >= CHARS {
        let parts = split(text, a, b, CHARS, max);
        let last = parts.len().saturating_sub(1);
        for (i, (pa, pb)) in parts.into_iter().enumerate() {
            out.push(Unit {
                start: pa,
                end: pb,
                tokens: tokens(&text[pa..pb]),
                level: CHARS,
                glued: i < last,
            });
        }
        return;
    }
    let parts = split(text, a, b, level, max);
    if parts.len() <= 1 {
        // No boundary of this level inside: the next one.
        return finer(text, a, b, level + 1, max, out);
    }
    for (pa, pb) in parts {
        consider(text, pa, pb, level, max, out);
    }
}

/// Cuts `text[a..b]` at the boundaries of `level` into contiguous ranges.
fn split(text: &str, a: usize, b: usize, level: u8, max: u32) -> Vec<(usize, usize)> {
    let t = &text[a..b];
    let mut cuts: Vec<usize> = Vec::new();
    match level {
        SENTENCE => {
            let mut i = 0;
            while i < t.len() {
                let Some(c) = t[i..].chars().next() else {
                    break;
                };
                let next = i + c.len_utf8();
                let cut = match c {
                    '。' | '！' | '？' | '；' => {
                        Some(absorb_newlines(t, after_closers(t, next)))
                    }
                    '.' | '!' | '?' => {
                        let j = after_closers(t, next);
                        match t[j..].chars().next() {
                            Some(w) if w.is_whitespace() => Some(absorb_newlines(t, j)),
                            _ => None,
                        }
                    }
                    '\n' => {
                        let j = absorb_newlines(t, i);
                        (t[i..j].bytes().filter(|b| *b == b'\n').count() >= 2).then_some(j)
                    }
                    _ => None,
                };
                match cut {
                    Some(j) => {
                        cuts.push(j);
                        i = j.max(next);
                    }
                    None => i = next,
                }
            }
        }
        LINE => cuts.extend(t.match_indices('\n').map(|(i, _)| i + 1)),
        CLAUSE => {
            let mut chars = t.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                let end = i + c.len_utf8();
                let cut = match c {
                    '，' | '、' | '：' | '；' => true,
                    ',' | ';' | ':' => chars.peek().is_some_and(|(_, n)| n.is_whitespace()),
                    _ => false,
                };
                if cut {
                    cuts.push(end);
                }
            }
        }
        WORD => {
            let mut prev_space = true;
            for (i, c) in t.char_indices() {
                let space = c.is_whitespace();
                if space && !prev_space {
                    cuts.push(i);
                }
                prev_space = space;
            }
        }
        _ => {
            // At most `frag` bytes each (at least one character), so at most
            // `frag` tokens.
            let frag = usize::try_from(max).unwrap_or(usize::MAX).clamp(1, 64);
            let mut start = 0;
            let mut last = 0;
            for (i, c) in t.char_indices() {
                let end = i + c.len_utf8();
                if end - start > frag && last > start {
                    cuts.push(last);
                    start = last;
                }
                last = end;
            }
        }
    }
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for c in cuts {
        if c > start && c < t.len() {
            out.push((a + start, a + c));
            start = c;
        }
    }
    if start < t.len() {
        out.push((a + start, b));
    }
    out
}

/// Past closing quotes and brackets that follow a sentence end.
fn after_closers(t: &str, mut p: usize) -> usize {
    for c in t[p..].chars() {
        if matches!(
            c,
            '"' | '\'' | '”' | '’' | ')' | '）' | '」' | '』' | '】' | '》' | ']' | '〕'
        ) {
            p += c.len_utf8();
        } else {
            break;
        }
    }
    p
}

/// Past the whitespace at `p` up to and including its last newline (the
/// spaces after it belong to what follows).
fn absorb_newlines(t: &str, p: usize) -> usize {
    let mut end = p;
    for (off, c) in t[p..].char_indices() {
        if c == '\n' {
            end = p + off + 1;
        } else if !c.is_whitespace() {
            break;
        }
    }
    end
}

/// Packs a section's units into chunks.
fn pack(
    text: &str,
    units: Vec<Unit>,
    max: u32,
    overlap: u32,
    label: &str,
    position: &mut u32,
    out: &mut Vec<Chunk>,
) {
    let mut queue: VecDeque<Unit> = units.into();
    let mut win: VecDeque<Unit> = VecDeque::new();
    let mut win_tokens = 0u32;
    // Whether the window holds anything past the overlap it started with.
    let mut fresh = false;
    while let Some(u) = queue.pop_front() {
        if win_tokens.saturating_add(u.tokens) <= max {
            win_tokens += u.tokens;
            win.push_back(u);
            fresh = true;
            continue;
        }
        if u.glued {
            // A cut inside a run: fill the chunk with as much of it as fits.
            if let Some((head, rest)) = split_to_fit(text, u, max - win_tokens) {
                win_tokens += head.tokens;
                win.push_back(head);
                emit(text, &win, win_tokens, label, position, out);
                (win, win_tokens) = tail(text, &win, overlap.min(max.saturating_sub(rest.tokens)));
                fresh = false;
                queue.push_front(rest);
                continue;
            }
        }
        if fresh {
            emit(text, &win, win_tokens, label, position, out);
            (win, win_tokens) = tail(text, &win, overlap.min(max.saturating_sub(u.tokens)));
        }
        while win_tokens.saturating_add(u.tokens) > max {
            match win.pop_front() {
                Some(w) => win_tokens -= w.tokens,
                None => break,
            }
        }
        win_tokens = win_tokens.saturating_add(u.tokens);
        win.push_back(u);
        fresh = true;
    }
    if fresh {
        emit(text, &win, win_tokens, label, position, out);
    }
}

fn emit(
    text: &str,
    win: &VecDeque<Unit>,
    tokens: u32,
    label: &str,
    position: &mut u32,
    out: &mut Vec<Chunk>,
) {
    let (Some(first), Some(last)) = (win.front(), win.back()) else {
        return;
    };
    let t = text[first.start..last.end].trim();
    if t.is_empty() {
        return;
    }
    out.push(Chunk {
        text: t.to_owned(),
        title: label.to_owned(),
        position: *position,
        tokens,
    });
    *position = position.saturating_add(1);
}

/// The end of `win` to repeat at the start of the next chunk: whole units
/// while they fit in `limit`; when not even the last one does, its end.
fn tail(text: &str, win: &VecDeque<Unit>, limit: u32) -> (VecDeque<Unit>, u32) {
    let mut out = VecDeque::new();
    let mut t = 0u32;
    for u in win.iter().rev() {
        if t + u.tokens <= limit {
            out.push_front(*u);
            t += u.tokens;
            continue;
        }
        // Nothing whole fits: the end of the last unit, cut finer (a
        // sentence at its clauses or words; never a word into characters).
        let room = limit - t;
        if out.is_empty() && room > 0 && u.level < WORD {
            let mut subs = Vec::new();
            finer(text, u.start, u.end, u.level + 1, room, &mut subs);
            for s in subs.iter().rev() {
                if t + s.tokens <= limit {
                    out.push_front(*s);
                    t += s.tokens;
                } else {
                    break;
                }
            }
        }
        break;
    }
    (out, t)
}

/// The longest prefix of `u` (at a character boundary) whose tokens fit in
/// `room`, and the rest; `None` when not even one character fits.
fn split_to_fit(text: &str, u: Unit, room: u32) -> Option<(Unit, Unit)> {
    if room == 0 {
        return None;
    }
    let s = &text[u.start..u.end];
    let ends: Vec<usize> = s
        .char_indices()
        .map(|(i, c)| i + c.len_utf8())
        .filter(|e| *e < s.len())
        .collect();
    // The largest `k` with tokens(s[..ends[k]]) <= room.
    let (mut lo, mut hi) = (0usize, ends.len());
    let mut best: Option<(usize, u32)> = None;
    while lo < hi {
        let mid = (lo + hi) / 2;
        let t = tokens(&s[..ends[mid]]);
        if t <= room {
            best = Some((ends[mid], t));
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let (cut, head_tokens) = best?;
    let head = Unit {
        start: u.start,
        end: u.start + cut,
        tokens: head_tokens,
        level: CHARS,
        glued: true,
    };
    let rest = Unit {
        start: u.start + cut,
        end: u.end,
        tokens: tokens(&s[cut..]),
        level: CHARS,
        glued: u.glued,
    };
    Some((head, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_tokens: u32, overlap: u32) -> ChunkConfig {
        ChunkConfig {
            max_tokens,
            overlap,
        }
    }

    fn one(text: &str) -> Vec<Section> {
        vec![Section {
            path: Vec::new(),
            text: text.to_owned(),
        }]
    }

    /// Every chunk holds the limit by a real count of its own text, is a
    /// piece of the source, and positions count up from 0.
    fn check(chunks: &[Chunk], source: &str, max: u32) {
        assert!(!chunks.is_empty());
        for (i, c) in chunks.iter().enumerate() {
            let real = tokens(&c.text);
            assert!(
                real <= max,
                "chunk {i} has {real} tokens > {max}: {:?}",
                c.text
            );
            assert!(real <= c.tokens, "chunk {i} counted {} < {real}", c.tokens);
            assert!(
                source.contains(&c.text),
                "chunk {i} is not a piece of the text"
            );
            assert_eq!(c.position, u32::try_from(i).unwrap_or(u32::MAX));
            assert!(!c.text.is_empty());
        }
    }

    fn english() -> String {
        let mut s = String::new();
        for i in 0..60 {
            s.push_str(&format!(
                "Sentence number {i} explains one rule of the refund policy in plain words. "
            ));
            if i % 7 == 6 {
                s.push_str("\n\n");
            }
        }
        s
    }

    fn chinese() -> String {
        let mut s = String::new();
        for i in 0..80 {
            s.push_str(&format!(
                "第{i}条：顾客在收货后七天内可以申请退货，退货时需要提供发票和完整包装。"
            ));
            if i % 5 == 4 {
                s.push_str("如有疑问请联系客服！");
            }
        }
        s
    }

    #[test]
    fn chunks_hold_the_token_limit_and_end_at_sentence_ends() {
        let text = english();
        let chunks = chunk("Refunds", &one(&text), cfg(64, 0));
        check(&chunks, &text, 64);
        assert!(chunks.len() > 5);
        for c in &chunks {
            assert!(c.text.ends_with('.'), "not a sentence end: {:?}", c.text);
            assert!(c.text.starts_with("Sentence"), "{:?}", c.text);
            assert_eq!(c.title, "Refunds");
        }
        // Without overlap the chunks partition the text.
        let joined: String = chunks
            .iter()
            .map(|c| c.text.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            joined,
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }

    /// The longest end of `a` that `b` starts with, in characters.
    fn overlap_chars(a: &str, b: &str) -> usize {
        b.char_indices()
            .map(|(i, c)| i + c.len_utf8())
            .rfind(|k| a.ends_with(&b[..*k]))
            .map_or(0, |k| b[..k].chars().count())
    }

    #[test]
    fn consecutive_chunks_overlap() {
        let text = english();
        let chunks = chunk("", &one(&text), cfg(80, 20));
        check(&chunks, &text, 80);
        for w in chunks.windows(2) {
            // The next chunk starts with the last sentence of the one before.
            let last = &w[0].text[w[0].text.rfind("Sentence").unwrap_or(0)..];
            assert!(
                w[1].text.starts_with("Sentence") && w[1].text.starts_with(last),
                "no overlap between {:?} and {:?}",
                w[0].text,
                w[1].text
            );
        }
    }

    #[test]
    fn overlap_shorter_than_a_sentence_is_taken_at_words() {
        // Sentences of ~15 tokens, overlap 8: the overlap is the end of the
        // last sentence, cut at a word.
        let text = english();
        let chunks = chunk("", &one(&text), cfg(100, 8));
        check(&chunks, &text, 100);
        for w in chunks.windows(2) {
            let n = overlap_chars(&w[0].text, &w[1].text);
            assert!(
                n >= 5,
                "no overlap between {:?} and {:?}",
                w[0].text,
                w[1].text
            );
            assert!(!w[1].text.starts_with("Sentence"), "{:?}", w[1].text);
            assert!(tokens(&w[1].text[..w[1].text.find('.').unwrap_or(0)]) <= 8);
        }
    }

    #[test]
    fn chinese_breaks_at_sentence_marks_and_never_inside_a_character() {
        let text = chinese();
        let chunks = chunk("退货政策", &one(&text), cfg(120, 30));
        check(&chunks, &text, 120);
        assert!(chunks.len() > 10);
        for c in &chunks {
            let last = c.text.chars().last().unwrap_or(' ');
            assert!(
                matches!(last, '。' | '！' | '？' | '；'),
                "ends mid-sentence: {:?}",
                c.text
            );
            assert_eq!(c.title, "退货政策");
        }
        for w in chunks.windows(2) {
            assert!(
                overlap_chars(&w[0].text, &w[1].text) >= 3,
                "no overlap: {:?} / {:?}",
                w[0].text,
                w[1].text
            );
        }
    }

    #[test]
    fn a_heading_always_starts_a_chunk_and_labels_it() {
        let sections = vec![
            Section {
                path: vec!["Guide".into()],
                text: "Guide\n\nShort intro.".into(),
            },
            Section {
                path: vec!["Guide".into(), "Returns".into()],
                text: "Returns\n\nBring the receipt.".into(),
            },
            Section {
                path: vec!["Guide".into(), "Returns".into(), "Abroad".into()],
                text: "Abroad\n\nShipping is paid by the buyer.".into(),
            },
        ];
        let chunks = chunk("Guide", &sections, cfg(300, 40));
        let got: Vec<(&str, &str)> = chunks
            .iter()
            .map(|c| (c.title.as_str(), c.text.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("Guide", "Guide\n\nShort intro."),
                ("Guide > Returns", "Returns\n\nBring the receipt."),
                (
                    "Guide > Returns > Abroad",
                    "Abroad\n\nShipping is paid by the buyer."
                ),
            ]
        );
        assert_eq!(heading_label("Doc", &["A".into()]), "Doc > A");
        assert_eq!(heading_label("", &["A".into(), "B".into()]), "A > B");
    }

    #[test]
    fn paragraph_breaks_are_boundaries_without_punctuation() {
        let para = "word ".repeat(30);
        let text = format!("{para}\n\n{para}\n\n{para}");
        let chunks = chunk("", &one(&text), cfg(40, 0));
        check(&chunks, &text, 40);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.text == para.trim()));
    }

    #[test]
    fn a_huge_sentence_is_cut_at_words_and_a_huge_run_at_characters() {
        // One English sentence of ~1000 words, no punctuation.
        let text = (0..1000)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let chunks = chunk("", &one(&text), cfg(50, 5));
        check(&chunks, &text, 50);
        for c in &chunks {
            // Whole words only: each chunk starts and ends at a word.
            for w in c.text.split_whitespace() {
                assert!(w.starts_with('w') && w[1..].parse::<u32>().is_ok(), "{w:?}");
            }
        }
        // A run of Chinese with no punctuation at all.
        let run = "退货发票包装客服".repeat(500);
        let chunks = chunk("", &one(&run), cfg(32, 4));
        check(&chunks, &run, 32);
        assert!(chunks.len() > 20);
        // Filled to the limit (the last char boundary that fits), not left short.
        let full = chunks[..chunks.len() - 1]
            .iter()
            .filter(|c| c.tokens >= 30)
            .count();
        assert!(full * 10 >= (chunks.len() - 1) * 8, "chunks under-filled");
        // And nothing is lost: without overlap the pieces rebuild the run.
        let chunks = chunk("", &one(&run), cfg(32, 0));
        assert_eq!(
            chunks.iter().map(|c| c.text.as_str()).collect::<String>(),
            run
        );
    }

    #[test]
    fn empty_sections_give_no_chunks() {
        assert!(chunk("t", &one("  \n\n "), cfg(100, 10)).is_empty());
        assert!(chunk("t", &[], cfg(100, 10)).is_empty());
    }

    #[test]
    fn sentence_split_keeps_newlines_with_the_sentence_and_spaces_with_the_next() {
        let t = "One. Two!\n\nThree？四。五\n六";
        let parts: Vec<&str> = split(t, 0, t.len(), SENTENCE, 100)
            .into_iter()
            .map(|(a, b)| &t[a..b])
            .collect();
        assert_eq!(
            parts,
            vec!["One.", " Two!\n\n", "Three？", "四。", "五\n六"]
        );
        // "3.5" and "e.g.x" are not sentence ends.
        let t = "Version 3.5 is out.";
        assert_eq!(split(t, 0, t.len(), SENTENCE, 100).len(), 1);
    }
}
