//! The real `promptgate serve` binary with everything it prints kept: its
//! standard output (where the audit log's stdout sink writes) and its
//! standard error (the log), line by line. Included with
//! `#[path = "common/process.rs"] mod process;` by the tests that read them.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const ADMIN_KEY: &str = "test-admin-key-for-the-process";

pub struct Process {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT` of the public listener.
    pub base: String,
    /// `http://127.0.0.1:PORT` of the admin API.
    pub admin: String,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn keep_lines(
    from: impl std::io::Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
    announce: Option<std::sync::mpsc::Sender<String>>,
) {
    std::thread::Builder::new()
        .name("test-process-output".into())
        .spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                if std::env::var_os("PROMPTGATE_TEST_ECHO").is_some() {
                    eprintln!("gateway: {line}");
                }
                if let Some(tx) = &announce {
                    let _ = tx.send(line.clone());
                }
                into.lock().unwrap().push(line);
            }
        })
        .unwrap();
}

impl Process {
    /// Starts `promptgate serve --config CONFIG` on ephemeral ports with the
    /// admin key set, and waits until both listeners are up.
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> Process {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_promptgate"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("PROMPTGATE_ADMIN_KEY", ADMIN_KEY)
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        keep_lines(child.stdout.take().unwrap(), stdout.clone(), None);
        keep_lines(child.stderr.take().unwrap(), stderr.clone(), Some(tx));
        let mut base = None;
        let mut admin = None;
        let until = Instant::now() + Duration::from_secs(30);
        while base.is_none() || admin.is_none() {
            let left = until.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the gateway process did not start: {:?}",
                    stderr.lock().unwrap()
                );
            };
            let addr = |marker: &str| {
                line.split(marker)
                    .nth(1)
                    // Up to a space, or a quote when the line is JSON.
                    .and_then(|rest| rest.split(|c: char| c.is_whitespace() || c == '"').next())
                    .map(|a| format!("http://{a}"))
            };
            if let Some(a) = addr("promptgate listening on http://") {
                base = Some(a);
            }
            if let Some(a) = addr("promptgate admin API on http://") {
                admin = Some(a);
            }
        }
        Process {
            child,
            base: base.unwrap(),
            admin: admin.unwrap(),
            stdout,
            stderr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.admin)
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        http_client()
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The JSON of an admin `GET`, with the admin key.
    pub async fn admin_get(&self, path: &str) -> serde_json::Value {
        http_client()
            .get(self.admin_url(path))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the signal `name` (`TERM`, `KILL`, …) to the process.
    pub fn signal(&self, name: &str) {
        let sent = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name} failed");
    }

    /// The process's exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    pub fn terminate(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it gives a value (at most 20 s), yielding to the runtime
/// in between (the fake upstream runs on it).
pub async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A client with a timeout, so a test that waits on the process cannot hang.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}
