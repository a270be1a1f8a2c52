//! Stream framing, written once for every backend: Server-Sent Events and
//! newline-delimited JSON. Bytes arrive in arbitrary pieces; the decoders buffer
//! only the unfinished frame and hand out whole frames. Codecs see frames, never
//! bytes. `\n`, `\r\n` and `\r` line endings are all accepted (Python servers built
//! on sse-starlette write CRLF), and SSE comment lines (`: ping`) are skipped.

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

/// Incremental decoder for either framing.
#[derive(Debug)]
pub struct FrameDecoder {
    framing: Framing,
    buf: BytesMut,
    /// Where to resume scanning for a line end (avoids rescanning a long partial line).
    scanned: usize,
    pending: SseEvent,
    pending_has_field: bool,
}

impl FrameDecoder {
    pub fn new(framing: Framing) -> Self {
        FrameDecoder {
            framing,
            buf: BytesMut::with_capacity(4096),
            scanned: 0,
            pending: SseEvent::default(),
            pending_has_field: false,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes one complete line out of the buffer, without its line ending.
    fn next_line(&mut self) -> Option<String> {
        let start = self.scanned;
        let pos = self.buf[start..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r');
        match pos {
            None => {
                self.scanned = self.buf.len();
                None
            }
            Some(i) => {
                let end = start + i;
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
                        return Some(Frame::Sse(std::mem::take(&mut self.pending)));
                    }
                    continue;
                }
                self.sse_field(&line);
            },
        }
    }

    fn sse_field(&mut self, line: &str) {
        if line.starts_with(':') {
            return; // comment / keep-alive
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
                }
                if self.pending_has_field {
                    self.pending_has_field = false;
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
}
