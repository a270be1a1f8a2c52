//! The audit writer thread: records from the queue become JSON lines, written
//! in batches (a batch is written when the queue is empty or it reaches
//! [`BATCH_BYTES`]) to the file, rotated by size, and/or to standard output.
//!
//! One thread writes whole lines, so lines are never interleaved; a batch
//! whose write fails is dropped whole (counted `write_error`, logged once per
//! outage) and the file is cut back to its last complete line, so a line is
//! never torn either.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;

use super::Msg;
use crate::config::AuditConfig;
use crate::metrics::GovMetrics;

/// How long the writer lets records gather after writing a batch.
const GATHER: std::time::Duration = std::time::Duration::from_millis(10);

/// A batch is written once it holds this many bytes (or the queue is empty).
const BATCH_BYTES: usize = 64 * 1024;

pub(super) struct Writer {
    file: Option<FileSink>,
    stdout: Option<Batch>,
    metrics: GovMetrics,
}

/// Lines waiting for one sink, and that sink's outage state.
struct Batch {
    sink: &'static str,
    buf: Vec<u8>,
    records: u64,
    /// Records dropped since the sink began failing; `Some` during an outage.
    outage: Option<u64>,
}

impl Batch {
    fn new(sink: &'static str) -> Batch {
        Batch {
            sink,
            buf: Vec::new(),
            records: 0,
            outage: None,
        }
    }

    fn push(&mut self, line: &[u8]) {
        self.buf.extend_from_slice(line);
        self.records += 1;
    }

    fn written(&mut self, m: &GovMetrics) {
        for _ in 0..self.records {
            m.audit_record(self.sink);
        }
        if let Some(dropped) = self.outage.take() {
            tracing::info!(
                sink = self.sink,
                dropped,
                "audit records are being written again"
            );
        }
        self.clear();
    }

    fn failed(&mut self, m: &GovMetrics, e: &std::io::Error) {
        for _ in 0..self.records {
            m.audit_dropped("write_error");
        }
        match &mut self.outage {
            Some(n) => *n = n.saturating_add(self.records),
            None => {
                tracing::warn!(
                    sink = self.sink,
                    error = %e,
                    "cannot write audit records; they are dropped and counted until writing works again"
                );
                self.outage = Some(self.records);
            }
        }
        self.clear();
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.records = 0;
        if self.buf.capacity() > 4 * BATCH_BYTES {
            self.buf.shrink_to(BATCH_BYTES);
        }
    }
}

/// The audit file: appended to, renamed to `.1` (older ones shifted up to
/// `keep`) when the next line would take it past `max_bytes`.
struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<File>,
    /// The file's length after its last complete line.
    len: u64,
    /// A regular file (rotated, cut back after a failed write); not, e.g.,
    /// a device or a FIFO.
    regular: bool,
    rotate_failed: bool,
    batch: Batch,
}

impl FileSink {
    fn open(&mut self) -> std::io::Result<()> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let meta = f.metadata()?;
            self.regular = meta.is_file();
            self.len = if self.regular { meta.len() } else { 0 };
            self.file = Some(f);
        }
        Ok(())
    }

    fn add(&mut self, line: &[u8], m: &GovMetrics) {
        let pending = self.len.saturating_add(self.batch.buf.len() as u64);
        if pending > 0 && pending.saturating_add(line.len() as u64) > self.max_bytes {
            self.flush(m);
            if self.len > 0 && self.regular {
                self.rotate();
            }
        }
        self.batch.push(line);
        if self.batch.buf.len() >= BATCH_BYTES {
            self.flush(m);
        }
    }

    fn flush(&mut self, m: &GovMetrics) {
        if self.batch.records == 0 {
            return;
        }
        match self.write_batch() {
            Ok(()) => self.batch.written(m),
            Err(e) => {
                // Opened again for the next batch (the file may come back).
                self.file = None;
                self.batch.failed(m, &e);
            }
        }
    }

    fn write_batch(&mut self) -> std::io::Result<()> {
        self.open()?;
        let (len, regular) = (self.len, self.regular);
        let Some(f) = self.file.as_mut() else {
            return Err(std::io::Error::other("the audit file is not open"));
        };
        let result = f.write_all(&self.batch.buf);
        if result.is_err() && regular {
            // No torn line: cut what part of the batch got written.
            let _ = f.set_len(len);
        }
        result?;
        self.len = len.saturating_add(self.batch.buf.len() as u64);
        Ok(())
    }

    fn numbered(&self, i: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) {
        self.file = None;
        let result = if self.keep == 0 {
            std::fs::remove_file(&self.path)
        } else {
            for i in (1..self.keep).rev() {
                // A missing older file is nothing to shift.
                let _ = std::fs::rename(self.numbered(i), self.numbered(i + 1));
            }
            std::fs::rename(&self.path, self.numbered(1))
        };
        match result {
            Ok(()) => {
                self.len = 0;
                self.rotate_failed = false;
            }
            Err(e) => {
                if !self.rotate_failed {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot rotate the audit file; it keeps growing");
                    self.rotate_failed = true;
                }
            }
        }
    }
}

impl Writer {
    pub(super) fn new(cfg: &AuditConfig, metrics: GovMetrics) -> Writer {
        Writer {
            file: cfg.path.clone().map(|path| FileSink {
                path,
                max_bytes: cfg.max_bytes,
                keep: cfg.keep,
                file: None,
                len: 0,
                regular: true,
                rotate_failed: false,
                batch: Batch::new("file"),
            }),
            stdout: cfg.stdout.then(|| Batch::new("stdout")),
            metrics,
        }
    }

    /// Writes records until every sender is gone or it is told to close.
    ///
    /// After each batch the writer pauses for [`GATHER`]; the queue bounds
    /// what arrives meanwhile.
    pub(super) fn run(mut self, rx: Receiver<Msg>) {
        if let Some(f) = &mut self.file {
            // Opened now to learn its length; a failure shows at the first write.
            let _ = f.open();
        }
        let mut line = Vec::with_capacity(1024);
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            let mut close = None;
            while let Some(msg) = next {
                match msg {
                    Msg::Record(r) => {
                        line.clear();
                        r.write_line(&mut line);
                        self.add(&line);
                    }
                    Msg::Close(reply) => close = Some(reply),
                }
                next = rx.try_recv().ok();
            }
            // The queue is empty: write the batch.
            self.flush();
            if let Some(reply) = close {
                let _ = reply.send(());
                return;
            }
            // Let the next records gather: a writer that sleeps is not woken
            // by each request (a futex wake on the request path), and writes
            // them in one batch.
            std::thread::sleep(GATHER);
        }
        self.flush();
    }

    fn add(&mut self, line: &[u8]) {
        if let Some(f) = &mut self.file {
            f.add(line, &self.metrics);
        }
        if let Some(b) = &mut self.stdout {
            b.push(line);
            if b.buf.len() >= BATCH_BYTES {
                flush_stdout(b, &self.metrics);
            }
        }
    }

    fn flush(&mut self) {
        if let Some(f) = &mut self.file {
            f.flush(&self.metrics);
        }
        if let Some(b) = &mut self.stdout {
            flush_stdout(b, &self.metrics);
        }
    }
}

fn flush_stdout(b: &mut Batch, m: &GovMetrics) {
    if b.records == 0 {
        return;
    }
    let out = std::io::stdout();
    let mut lock = out.lock();
    match lock.write_all(&b.buf).and_then(|()| lock.flush()) {
        Ok(()) => b.written(m),
        Err(e) => b.failed(m, &e),
    }
}
