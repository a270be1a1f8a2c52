//! Stream framing, written once for every backend: Server-Sent Events and
//! newline-delimited JSON. Bytes arrive in arbitrary pieces; the decoders buffer
//! only the unfinished frame and hand out whole frames. Codecs see frames, never
//! bytes. `\n`, `\r\n` and `\r` line endings are all accepted (Python servers built
//! on sse-starlette write CRLF), and SSE comment lines (`: ping`) are skipped.
//!
//! What is buffered is bounded: a line, or an SSE event being gathered from its
//! lines, longer than the decoder's limit stops the decoder ([`FrameDecoder::overflowed`])
//! and nothing more is kept, so an endless line costs at most the limit.

use bytes::{Buf, BytesMut};

/// One SSE event: its `event:` name (if any) and its `data:` lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
    /// Lines with a field name other than `data`, `event`, `id`, `retry` (some
    /// servers write `error: {json}`); kept as (name, value).
    pub other: Vec<(String, String)>,
}

/// Which framing a backend's stream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Sse,
    Ndjson,
}

/// A frame handed to a codec: an SSE event or one NDJSON line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Sse(SseEvent),
    Line(String),
}

/// The default bound on one line or one SSE event: 8 MiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

/// Incremental decoder for either framing.
#[derive(Debug)]
pub struct FrameDecoder {
    framing: Framing,
    buf: BytesMut,
    /// Where to resume scanning for a line end (avoids rescanning a long partial line).
    scanned: usize,
    pending: SseEvent,
    pending_has_field: bool,
    /// Bytes held by `pending` (data, event name, other fields).
    pending_bytes: usize,
    max_line: usize,
    overflowed: bool,
}

impl FrameDecoder {
    /// A decoder with the default line limit ([`DEFAULT_MAX_LINE_BYTES`]).
    pub fn new(framing: Framing) -> Self {
        Self::with_max_line(framing, DEFAULT_MAX_LINE_BYTES)
    }

    /// A decoder that gives up on a line, or an SSE event, longer than `max_line` bytes.
    pub fn with_max_line(framing: Framing, max_line: usize) -> Self {
        let max_line = max_line.max(1);
        FrameDecoder {
            framing,
            buf: BytesMut::with_capacity(4096.min(max_line)),
            scanned: 0,
            pending: SseEvent::default(),
            pending_has_field: false,
            pending_bytes: 0,
            max_line,
            overflowed: false,
        }
    }

    /// True once a line or an event went past the limit. The decoder then yields
    /// no more frames and buffers nothing; the stream must be ended as malformed.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// The limit on one line or one SSE event, in bytes.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    fn overflow(&mut self) {
        self.overflowed = true;
        self.buf = BytesMut::new();
        self.scanned = 0;
        self.pending = SseEvent::default();
        self.pending_has_field = false;
        self.pending_bytes = 0;
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.overflowed {
            return;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Takes one complete line out of the buffer, without its line ending.
    fn next_line(&mut self) -> Option<String> {
        if self.overflowed {
            return None;
        }
        let start = self.scanned;
        let pos = self.buf[start..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r');
        match pos {
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max_line {
                    self.overflow();
                }
                None
            }
            Some(i) => {
                let end = start + i;
                if end > self.max_line {
                    self.overflow();
                    return None;
                }
                let mut skip = 1;
                if self.buf[end] == b'\r' {
                    if end + 1 >= self.buf.len() {
                        // A lone \r at the end of what arrived: it may be the first
                        // half of \r\n, so wait for the next byte.
                        self.scanned = end;
                        return None;
                    }
                    if self.buf[end + 1] == b'\n' {
                        skip = 2;
                    }
                }
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.advance(end + skip);
                self.scanned = 0;
                Some(line)
            }
        }
    }

    /// The next complete frame, if one has fully arrived.
    pub fn next_frame(&mut self) -> Option<Frame> {
        match self.framing {
            Framing::Ndjson => loop {
                let line = self.next_line()?;
                if !line.trim().is_empty() {
                    return Some(Frame::Line(line));
                }
            },
            Framing::Sse => loop {
                let line = self.next_line()?;
                if line.is_empty() {
                    if self.pending_has_field {
                        self.pending_has_field = false;
                        self.pending_bytes = 0;
                        return Some(Frame::Sse(std::mem::take(&mut self.pending)));
                    }
                    continue;
                }
                self.sse_field(&line);
                if self.overflowed {
                    return None;
                }
            },
        }
    }

    fn sse_field(&mut self, line: &str) {
        if line.starts_with(':') {
            return; // comment / keep-alive
        }
        // An event gathered from many lines is bounded like one line.
        self.pending_bytes = self.pending_bytes.saturating_add(line.len() + 1);
        if self.pending_bytes > self.max_line {
            self.overflow();
            return;
        }
        let (name, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match name {
            "data" => {
                if self.pending_has_field && !self.pending.data.is_empty() {
                    self.pending.data.push('\n');
                }
                self.pending.data.push_str(value);
            }
            "event" => self.pending.event = Some(value.to_owned()),
            "id" | "retry" => {}
            other => self
                .pending
                .other
                .push((other.to_owned(), value.to_owned())),
        }
        self.pending_has_field = true;
    }

    /// Called when the byte stream ends. Returns a final frame that was complete
    /// except for its terminating blank line.
    pub fn finish(&mut self) -> Option<Frame> {
        if self.overflowed {
            return None;
        }
        if self.buf.len() > self.max_line {
            self.overflow();
            return None;
        }
        let rest = std::mem::take(&mut self.buf);
        let text = String::from_utf8_lossy(&rest);
        let mut frame = None;
        match self.framing {
            Framing::Ndjson => {
                let t = text.trim();
                if !t.is_empty() {
                    frame = Some(Frame::Line(t.to_owned()));
                }
            }
            Framing::Sse => {
                for line in text.split(['\n', '\r']).filter(|l| !l.is_empty()) {
                    self.sse_field(line);
                    if self.overflowed {
                        return None;
                    }
                }
                if self.pending_has_field {
                    self.pending_has_field = false;
                    self.pending_bytes = 0;
                    frame = Some(Frame::Sse(std::mem::take(&mut self.pending)));
                }
            }
        }
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(framing: Framing, pieces: &[&[u8]]) -> Vec<Frame> {
        let mut d = FrameDecoder::new(framing);
        let mut out = Vec::new();
        for p in pieces {
            d.push(p);
            while let Some(f) = d.next_frame() {
                out.push(f);
            }
        }
        out.extend(d.finish());
        out
    }

    fn data(s: &str) -> Frame {
        Frame::Sse(SseEvent {
            data: s.into(),
            ..SseEvent::default()
        })
    }

    #[test]
    fn sse_split_anywhere_gives_same_events() {
        let text =
            b"data: {\"a\":1}\n\n: ping\n\nevent: message_stop\ndata: {}\n\ndata: [DONE]\n\n";
        let whole = all(Framing::Sse, &[text]);
        assert_eq!(whole.len(), 3);
        for cut in 1..text.len() {
            let (a, b) = text.split_at(cut);
            assert_eq!(all(Framing::Sse, &[a, b]), whole, "cut at {cut}");
        }
        assert_eq!(whole[0], data("{\"a\":1}"));
        assert_eq!(
            whole[1],
            Frame::Sse(SseEvent {
                event: Some("message_stop".into()),
                data: "{}".into(),
                other: vec![]
            })
        );
    }

    #[test]
    fn sse_crlf_and_multiline_data() {
        let got = all(
            Framing::Sse,
            &[b"data: a\r\ndata: b\r\n\r\ndata: c\r", b"\n\r\n"],
        );
        assert_eq!(got, vec![data("a\nb"), data("c")]);
    }

    #[test]
    fn sse_unterminated_last_event_is_returned_by_finish() {
        let got = all(Framing::Sse, &[b"data: x\n\ndata: y"]);
        assert_eq!(got, vec![data("x"), data("y")]);
    }

    #[test]
    fn sse_other_fields_are_kept() {
        let got = all(Framing::Sse, &[b"error: {\"m\":1}\n\n"]);
        let Frame::Sse(e) = &got[0] else {
            panic!("not sse")
        };
        assert_eq!(
            e.other,
            vec![("error".to_string(), "{\"m\":1}".to_string())]
        );
    }

    #[test]
    fn ndjson_lines() {
        let got = all(
            Framing::Ndjson,
            &[b"{\"a\":1}\n{\"b\"", b":2}\n\n{\"c\":3}"],
        );
        assert_eq!(
            got,
            vec![
                Frame::Line("{\"a\":1}".into()),
                Frame::Line("{\"b\":2}".into()),
                Frame::Line("{\"c\":3}".into())
            ]
        );
    }

    #[test]
    fn endless_line_stops_the_decoder_and_buffers_nothing_more() {
        for framing in [Framing::Sse, Framing::Ndjson] {
            let mut d = FrameDecoder::with_max_line(framing, 1024);
            d.push(b"data: {\"a\":1}\n\n");
            assert!(d.next_frame().is_some());
            let chunk = [b'x'; 100];
            for _ in 0..1000 {
                d.push(&chunk);
                assert_eq!(d.next_frame(), None);
                assert!(d.buf.len() <= 1024 + chunk.len(), "{framing:?}");
            }
            assert!(d.overflowed(), "{framing:?}");
            assert_eq!(d.buf.capacity(), 0);
            d.push(b"\n\ndata: late\n\n");
            assert_eq!(d.next_frame(), None);
            assert_eq!(d.finish(), None);
        }
    }

    #[test]
    fn long_line_in_one_piece_overflows() {
        let mut d = FrameDecoder::with_max_line(Framing::Ndjson, 16);
        d.push(b"{\"ok\":1}\n{\"this line is far too long\":1}\n");
        assert_eq!(d.next_frame(), Some(Frame::Line("{\"ok\":1}".into())));
        assert_eq!(d.next_frame(), None);
        assert!(d.overflowed());
    }

    #[test]
    fn an_event_of_many_short_lines_is_bounded_like_a_line() {
        let mut d = FrameDecoder::with_max_line(Framing::Sse, 1024);
        for _ in 0..200 {
            d.push(b"data: 0123456789\n");
            assert_eq!(d.next_frame(), None);
        }
        assert!(d.overflowed());
        let mut d = FrameDecoder::with_max_line(Framing::Sse, 1024);
        for _ in 0..200 {
            d.push(b"x-junk: 0123456789\n");
            let _ = d.next_frame();
        }
        assert!(d.overflowed());
    }

    #[test]
    fn lines_up_to_the_limit_pass() {
        let line = format!("data: {}", "y".repeat(58));
        assert_eq!(line.len(), 64);
        let text = format!("{line}\n\n{line}\n\n");
        let mut d = FrameDecoder::with_max_line(Framing::Sse, 65);
        d.push(text.as_bytes());
        assert!(d.next_frame().is_some());
        assert!(d.next_frame().is_some());
        assert!(!d.overflowed());
        let mut d = FrameDecoder::with_max_line(Framing::Sse, 65);
        d.push(line.as_bytes());
        assert!(d.finish().is_some());
    }
}
