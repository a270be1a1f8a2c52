//! The loopback OTLP/HTTP receiver (`tests/ops/otlp_receiver.py`, on the
//! venv's Python with `opentelemetry-proto`): it decodes every export's
//! protobuf and keeps each span as a JSON line, which [`Receiver::spans`] reads.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The receiver process; killed (and reaped) on drop.
pub struct Receiver {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Receiver {
    /// Starts the receiver on an ephemeral port and waits until it listens.
    pub fn start() -> Receiver {
        let python = super::peers::venv_bin().join("python");
        assert!(
            python.exists(),
            "{} does not exist: run the tests with `scripts/test` (it creates .venv with \
             opentelemetry-proto) or set PROMPTGATE_PYTHON",
            python.display()
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ops/otlp_receiver.py");
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(python)
            .arg(script)
            .arg(dir.path().join("spans.jsonl"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("otlp-receiver-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            })
            .unwrap();
        let port = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line
                .strip_prefix("listening ")
                .and_then(|p| p.trim().parse::<u16>().ok())
                .unwrap_or_else(|| panic!("the OTLP receiver said {line:?}")),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the OTLP receiver did not start (is opentelemetry-proto in the venv?)");
            }
        };
        Receiver { child, port, dir }
    }

    /// The traces URL to configure as `tracing.otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.port)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("spans.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Polls (at most 20 s) until `pick` finds what it looks for in the spans.
    pub async fn wait_for<T>(&self, what: &str, mut pick: impl FnMut(&[Value]) -> Option<T>) -> T {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = pick(&self.spans()) {
                return v;
            }
            assert!(
                Instant::now() < until,
                "timed out waiting for {what}; spans: {:#?}",
                self.spans()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
