//! HTTP/2 on the public listener, against the real binary with real clients:
//! h2c with prior knowledge (curl, the `h2` crate multiplexing many requests on
//! one connection), TLS with ALPN `h2` and `http/1.1` under a test CA made here
//! with the `openssl` CLI (curl, rustls, the official `openai` Python SDK), the
//! certificate reloaded from disk, a broken pair refused by `check` and by
//! reload, and the connection protections (a silent client closed after the
//! header read timeout, idle HTTP/2 connections closed, stream floods and rapid
//! resets bounded, graceful drain with `GOAWAY`).
// Test clients are started freely; the gateway's own tasks go through
// promptgate::task::spawn (clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

const SANDBOX: &str = "kind: sandbox
sandbox:
  models:
    echo: {}
    slow:
      chunk_delay: 150ms
";

/// A config folder with the sandbox provider and `echo` / `slow` routes.
fn config(dir: &Path, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("providers")).unwrap();
    std::fs::create_dir_all(dir.join("prompts")).unwrap();
    std::fs::write(dir.join("providers/sb.yaml"), SANDBOX).unwrap();
    let path = dir.join("promptgate.yaml");
    std::fs::write(
        &path,
        format!("{extra}\nroutes:\n  echo: {{provider: sb, model: echo}}\n  slow: {{provider: sb, model: slow}}\n"),
    )
    .unwrap();
    path
}

/// `promptgate serve` on ephemeral ports, its log kept.
struct Gateway {
    child: Child,
    /// `HOST:PORT` of the public listener.
    addr: String,
    tls: bool,
    log: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    fn start(config: &Path) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_promptgate"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("PROMPTGATE_ADMIN_KEY", "http2-test-admin-key")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let kept = log.clone();
        std::thread::Builder::new()
            .name("gateway-log".into())
            .spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if std::env::var_os("PROMPTGATE_TEST_ECHO").is_some() {
                        eprintln!("gateway: {line}");
                    }
                    let _ = tx.send(line.clone());
                    kept.lock().unwrap().push(line);
                }
            })
            .unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the gateway did not start: {:?}", log.lock().unwrap());
            };
            for (scheme, tls) in [("http", false), ("https", true)] {
                let marker = format!("promptgate listening on {scheme}://");
                if let Some(rest) = line.split(&marker).nth(1) {
                    let addr = rest.split_whitespace().next().unwrap().to_owned();
                    return Gateway {
                        child,
                        addr,
                        tls,
                        log,
                    };
                }
            }
        }
    }

    fn port(&self) -> &str {
        self.addr.rsplit(':').next().unwrap()
    }

    /// The base URL, by name for TLS (the certificate is for `localhost`).
    fn url(&self, path: &str) -> String {
        if self.tls {
            format!("https://localhost:{}{path}", self.port())
        } else {
            format!("http://{}{path}", self.addr)
        }
    }

    fn log_has(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === the test CA ===

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI (Debian: apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`, `ca.key`) in `dir`.
fn make_ca(dir: &Path) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=promptgate test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    dir.join("ca.pem")
}

/// A server pair `NAME.pem` / `NAME.key` for `localhost` and 127.0.0.1 with
/// the common name `cn`, signed by the CA of `dir`.
fn issue(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            &pem,
        ],
    );
    (dir.join(pem), dir.join(key))
}

/// A gateway over TLS with the pair `server.pem` / `server.key` (CN `first`).
fn tls_gateway(dir: &Path, limits: &str) -> (Gateway, PathBuf) {
    let ca = make_ca(dir);
    issue(dir, "server", "first");
    let path = config(
        dir,
        &format!("tls: {{cert: server.pem, key: server.key}}\nlimits: {{{limits}}}"),
    );
    (Gateway::start(&path), ca)
}

// === clients ===

/// `curl -sS -i ARGS…`: the status line, headers and body.
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The subject the server's certificate names, as curl reports it.
fn served_subject(gw: &Gateway, ca: &Path) -> String {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-v",
            "-o",
            "/dev/null",
            "--max-time",
            "10",
            "--cacert",
        ])
        .arg(ca)
        .arg(gw.url("/healthz"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    err.lines()
        .find_map(|l| l.trim().strip_prefix("*  subject: "))
        .unwrap_or_default()
        .to_owned()
}

fn chat_body(model: &str, stream: bool, text: &str) -> String {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]})
        .to_string()
}

/// An HTTP/2 connection (h2c, prior knowledge) driven by the `h2` crate.
async fn h2c(addr: &str) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// One POST on an HTTP/2 connection: status, `x-request-id`, body.
async fn h2_post(
    send: &h2::client::SendRequest<Bytes>,
    path: &str,
    body: String,
) -> Result<(u16, String, String), h2::Error> {
    let mut send = send.clone().ready().await?;
    let req = http::Request::post(path)
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (resp, mut out) = send.send_request(req, false)?;
    out.send_data(Bytes::from(body), true)?;
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let mut recv = resp.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    Ok((status, id, String::from_utf8_lossy(&text).into_owned()))
}

/// The streamed text of an OpenAI SSE body.
fn streamed_text(sse: &str) -> String {
    let mut text = String::new();
    for data in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    text
}

async fn in_flight(addr: &str) -> f64 {
    let m = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    m.lines()
        .find(|l| l.starts_with("promptgate_requests_in_flight "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

// === tests ===

/// The plain listener speaks HTTP/2 to a client with prior knowledge (curl),
/// streams over it, and still speaks HTTP/1.1 on the same port.
#[test]
fn h2c_with_prior_knowledge_answers_and_streams_beside_http1() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(dir.path(), ""));
    let url = gw.url("/v1/chat/completions");
    let body = chat_body("echo", true, "hello over h2c");
    let out = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "content-type: application/json",
        "-H",
        "x-request-id: h2c-test-1",
        "-d",
        &body,
        &url,
    ]);
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains("x-request-id: h2c-test-1"), "{out}");
    assert!(out.contains("content-type: text/event-stream"), "{out}");
    assert!(out.contains("data: [DONE]"), "{out}");
    let sse = out.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(streamed_text(sse), "hello over h2c");
    // A complete (JSON) answer over h2c, and HTTP/1.1 on the same port.
    let body = chat_body("echo", false, "whole");
    for version in ["--http2-prior-knowledge", "--http1.1"] {
        let out = curl(&[
            version,
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            &url,
        ]);
        let expect = if version == "--http1.1" {
            "HTTP/1.1 200"
        } else {
            "HTTP/2 200"
        };
        assert!(out.starts_with(expect), "{out}");
        assert!(out.contains("\"content\":\"whole\""), "{out}");
    }
}

/// Many requests multiplexed on ONE HTTP/2 connection, more than it may have
/// open at once (the client queues behind the advertised limit): all answered,
/// each with its own request id and its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_share_one_h2c_connection() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(dir.path(), "limits: {max_streams: 32}"));
    let send = h2c(&gw.addr).await;
    // The server's settings have arrived once a request was answered.
    let (status, _, _) = h2_post(&send, "/healthz", String::new()).await.unwrap();
    assert_eq!(status, 405);
    assert_eq!(send.current_max_send_streams(), 32, "the advertised limit");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let send = send.clone();
        tasks.push(tokio::spawn(async move {
            let stream = i % 2 == 0;
            let text = format!("request number {i}");
            let (status, id, body) = h2_post(
                &send,
                "/v1/chat/completions",
                chat_body("echo", stream, &text),
            )
            .await
            .unwrap();
            assert_eq!(status, 200, "{body}");
            let got = if stream {
                streamed_text(&body)
            } else {
                let v: Value = serde_json::from_str(&body).unwrap();
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            };
            assert_eq!(got, text);
            id
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 200, "one request id per request");
}

/// Over TLS the listener offers `h2` and `http/1.1` by ALPN: curl with the test
/// CA gets HTTP/2 (a streamed answer) or HTTP/1.1 as it asks; plain HTTP on the
/// TLS port is no request.
#[test]
fn tls_serves_http2_and_http1_to_curl_with_a_test_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, ca) = tls_gateway(dir.path(), "");
    let ca = ca.to_str().unwrap();
    let url = gw.url("/v1/chat/completions");
    let body = chat_body("slow", true, "streamed over tls");
    let out = curl(&[
        "--http2",
        "--cacert",
        ca,
        "-H",
        "content-type: application/json",
        "-d",
        &body,
        &url,
    ]);
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains("x-request-id: "), "{out}");
    let sse = out.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(streamed_text(sse), "streamed over tls");
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    let out = curl(&["--http1.1", "--cacert", ca, &gw.url("/healthz")]);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // Without the CA the certificate is not trusted.
    let refused = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(gw.url("/healthz"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    // Plain HTTP to the TLS port gets no answer.
    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}/healthz", gw.addr))
        .output()
        .unwrap();
    assert!(!plain.status.success());
}

/// The official `openai` Python SDK over https, trusting the test CA: chat,
/// stream and models, over HTTP/1.1 (its default) and HTTP/2.
#[test]
fn openai_python_sdk_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, ca) = tls_gateway(dir.path(), "");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("PROMPTGATE_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv/bin/python"));
    let out = Command::new(&python)
        .args(["-m", "pytest", "tests/sdk/test_openai_sdk_tls.py"])
        .args(["-q", "-p", "no:cacheprovider"])
        .current_dir(root)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("PROMPTGATE_TLS_BASE_URL", gw.url("/v1"))
        .env("PROMPTGATE_TLS_CA", &ca)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pytest failed; output above");
    assert!(!stdout.contains("skipped"), "{stdout}");
}

/// A new pair written over the files is served from the next handshake on; a
/// key that is not the certificate's is refused by the reload (the old pair
/// keeps serving, requests keep being answered) and by `check`.
#[test]
fn a_swapped_certificate_serves_the_next_handshake_and_a_broken_pair_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, ca) = tls_gateway(dir.path(), "");
    assert_eq!(served_subject(&gw, &ca), "CN=first");
    // The new pair, moved into place (key first, then the certificate: the
    // watcher may see the mismatched state in between, which is refused).
    let (pem, key) = issue(dir.path(), "second", "second");
    std::fs::rename(&key, dir.path().join("server.key")).unwrap();
    std::fs::rename(&pem, dir.path().join("server.pem")).unwrap();
    let until = Instant::now() + Duration::from_secs(15);
    while served_subject(&gw, &ca) != "CN=second" {
        assert!(
            Instant::now() < until,
            "the new certificate is never served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A key of another pair: refused, the current pair stays.
    let (_, other_key) = issue(dir.path(), "third", "third");
    std::fs::copy(&other_key, dir.path().join("server.key")).unwrap();
    let until = Instant::now() + Duration::from_secs(15);
    while !gw.log_has("server.key` is not the private key of the certificate in") {
        assert!(Instant::now() < until, "the broken pair was not reported");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(served_subject(&gw, &ca), "CN=second");
    let out = curl(&[
        "--http2",
        "--cacert",
        ca.to_str().unwrap(),
        "-H",
        "content-type: application/json",
        "-d",
        &chat_body("echo", false, "still served"),
        &gw.url("/v1/chat/completions"),
    ]);
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    let check = Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["check", "--config"])
        .arg(dir.path().join("promptgate.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stderr).into_owned()
        + &String::from_utf8_lossy(&check.stdout);
    assert!(!check.status.success(), "{text}");
    assert!(text.contains("tls.key: `"), "{text}");
    assert!(
        text.contains("server.key` is not the private key of the certificate in `"),
        "{text}"
    );
}

/// `check` names the field and the file of each TLS problem.
#[test]
fn check_names_each_tls_file_problem() {
    let dir = tempfile::tempdir().unwrap();
    make_ca(dir.path());
    issue(dir.path(), "server", "first");
    std::fs::write(dir.path().join("empty.pem"), "nothing here\n").unwrap();
    for (tls, expect) in [
        (
            "{cert: missing.pem, key: server.key}",
            "tls.cert: cannot read `",
        ),
        (
            "{cert: empty.pem, key: server.key}",
            "tls.cert: no certificate in `",
        ),
        (
            "{cert: server.pem, key: server.pem}",
            "tls.key: no private key in `",
        ),
        (
            "{cert: server.pem, key: ca.key}",
            "ca.key` is not the private key of the certificate in `",
        ),
        ("{cert: server.pem}", "tls: missing field `key`"),
        (
            "{cert: server.pem, key: server.key, ca: x}",
            "tls.ca: unknown field `ca`",
        ),
        (
            "{cert: server.pem, key: server.key}\nlimits: {max_streams: 0}",
            "limits.max_streams: must be at least 1",
        ),
    ] {
        let path = config(dir.path(), &format!("tls: {tls}"));
        let out = Command::new(env!("CARGO_BIN_EXE_promptgate"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{tls}: {text}");
        assert!(
            text.contains(expect),
            "{tls}: expected `{expect}` in {text}"
        );
    }
    let path = config(dir.path(), "tls: {cert: server.pem, key: server.key}");
    let out = Command::new(env!("CARGO_BIN_EXE_promptgate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Reads from `s` until it ends; when that was, or `None` if it was still
/// open at `until`.
async fn closed_by<S: tokio::io::AsyncRead + Unpin>(s: &mut S, until: Instant) -> Option<Instant> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(until.into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(Instant::now()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A client that opens a connection to the TLS port and sends nothing, one
/// that stops halfway through its hello, and one that completes the handshake
/// and then sends no request are all closed after the header read timeout;
/// so is an h2c connection that never sends a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_closed_after_the_header_read_timeout() {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (gw, ca) = tls_gateway(dir.path(), "header_read_timeout: 1s");
    let limit = Duration::from_secs(4);
    let opened = Instant::now();
    let until = opened + limit;
    let mut silent = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    // A full handshake, then nothing.
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(&ca).unwrap();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    let mut quiet_tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    for (what, at) in [
        ("silent", closed_by(&mut silent, until).await),
        ("half hello", closed_by(&mut half, until).await),
        ("handshake only", closed_by(&mut quiet_tls, until).await),
    ] {
        let at = at.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        let took = at - opened;
        assert!(
            took >= Duration::from_millis(900),
            "{what}: closed after {took:?}"
        );
    }
    drop(gw);

    // h2c: the preface and settings, then no request: GOAWAY, then closed.
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(dir.path(), "limits: {header_read_timeout: 1s}"));
    let tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let start = Instant::now();
    let ended = tokio::time::timeout(limit, conn).await;
    assert!(
        ended.is_ok(),
        "an idle h2c connection still open after {limit:?}"
    );
    assert!(start.elapsed() >= Duration::from_millis(500));
    drop(send);
    // An h2c connection that has served a request is closed once idle too.
    let send = h2c(&gw.addr).await;
    let (status, _, _) = h2_post(&send, "/v1/chat/completions", chat_body("echo", false, "x"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let until = Instant::now() + limit;
    loop {
        if send.clone().ready().await.is_err() {
            break;
        }
        assert!(Instant::now() < until, "idle after a request, still open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rapid resets (a request opened and cancelled at once, thousands of times)
/// and a flood of streams beyond the concurrency cap on one connection: the
/// process stays small and answers, the cap answers 503 past it, and every
/// permit comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_floods_and_rapid_resets_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(
        dir.path(),
        "limits: {max_streams: 16, max_concurrency: 8}",
    ));
    let rss_before = gw.rss_kib();
    // Rapid reset: open and cancel, as fast as the client can.
    let send = h2c(&gw.addr).await;
    let mut opened = 0;
    let started = Instant::now();
    for _ in 0..5000 {
        let Ok(mut ready) = send.clone().ready().await else {
            break;
        };
        let req = http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        let Ok((_resp, mut out)) = ready.send_request(req, false) else {
            break;
        };
        out.send_reset(h2::Reason::CANCEL);
        opened += 1;
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    println!("rapid reset: {opened} streams opened and cancelled");
    // The process answers at once on a new connection.
    let probe = Instant::now();
    let send2 = h2c(&gw.addr).await;
    let (status, _, _) = h2_post(
        &send2,
        "/v1/chat/completions",
        chat_body("echo", false, "ok"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert!(
        probe.elapsed() < Duration::from_secs(5),
        "{:?}",
        probe.elapsed()
    );

    // 16 slow streams at once on one connection: 8 are served (the
    // concurrency cap), the others answered 503 at once.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let send = send2.clone();
        tasks.push(tokio::spawn(async move {
            h2_post(
                &send,
                "/v1/chat/completions",
                chat_body("slow", true, &format!("flood {i} a b c")),
            )
            .await
            .unwrap()
            .0
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let busy = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(ok + busy, 16, "{statuses:?}");
    assert!((1..=8).contains(&ok), "{statuses:?}");
    // Every permit back.
    let until = Instant::now() + Duration::from_secs(10);
    while in_flight(&gw.addr).await != 0.0 {
        assert!(Instant::now() < until, "requests still counted in flight");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss = gw.rss_kib();
    println!("RSS {rss_before} KiB before, {rss} KiB after");
    assert!(rss < 200 * 1024, "RSS {rss} KiB");
}

/// On SIGTERM an HTTP/2 connection is drained: the stream in progress ends
/// whole, and the client is told (`GOAWAY`) to send nothing more on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_an_h2_connection_with_goaway() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(dir.path(), "limits: {shutdown_grace: 10s}"));
    let send = h2c(&gw.addr).await;
    let words = "one two three four five six seven eight";
    let running = {
        let send = send.clone();
        tokio::spawn(async move {
            h2_post(
                &send,
                "/v1/chat/completions",
                chat_body("slow", true, words),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A new request on the draining connection is refused.
    let refused = h2_post(
        &send,
        "/v1/chat/completions",
        chat_body("echo", false, "late"),
    )
    .await;
    assert!(refused.is_err(), "{refused:?}");
    let (status, _, body) = running.await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert_eq!(streamed_text(&body), words);
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
}

/// An HTTP/2 client that stops reading one stream (it grants no flow-control
/// window) while its connection stays open and answers: past the write timeout
/// that stream is reset, its permit comes back, and the connection still
/// serves other requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_stops_reading_is_reset_after_the_write_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(dir.path(), "limits: {write_timeout: 1s}"));
    let tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    // A 1 KiB stream window, never released: the server can send 1 KiB.
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1024)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut ready = send.clone().ready().await.unwrap();
    let req = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (resp, mut out) = ready.send_request(req, false).unwrap();
    let words = "word ".repeat(2000);
    out.send_data(Bytes::from(chat_body("echo", true, &words)), true)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stuck = resp.into_body();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(in_flight(&gw.addr).await, 1.0, "the stream is being served");
    let until = Instant::now() + Duration::from_secs(6);
    while in_flight(&gw.addr).await != 0.0 {
        assert!(
            Instant::now() < until,
            "the stalled stream still holds its permit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What was sent arrives, then the reset.
    let mut got = 0;
    let ended = loop {
        match stuck.data().await {
            Some(Ok(chunk)) => got += chunk.len(),
            Some(Err(e)) => break Some(e),
            None => break None,
        }
    };
    assert!(got <= 1024, "{got} bytes past the window");
    let reset = ended.expect("the stream ended cleanly instead of being reset");
    assert!(reset.is_reset(), "{reset:?}");
    // The connection is still good.
    let (status, _, body) = h2_post(
        &send,
        "/v1/chat/completions",
        chat_body("echo", false, "after"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
}

/// `max_connections` counts HTTP/2 connections like HTTP/1.1 ones: at the
/// limit the oldest idle one is closed to make room, and while every one has
/// a stream in progress a newcomer is closed instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_evicts_an_idle_h2_connection_never_a_busy_one() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(
        dir.path(),
        "limits: {max_connections: 2, header_read_timeout: 30s}",
    ));
    let mut conns = Vec::new();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        let ended = tokio::spawn(conn);
        let (status, _, _) = h2_post(&send, "/v1/chat/completions", chat_body("echo", false, "x"))
            .await
            .unwrap();
        assert_eq!(status, 200);
        conns.push((send, ended));
    }
    // A third: the oldest idle connection makes room.
    let third = h2c(&gw.addr).await;
    let (status, _, _) = h2_post(
        &third,
        "/v1/chat/completions",
        chat_body("echo", false, "y"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let (_, first) = conns.remove(0);
    tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("the oldest idle connection was not closed")
        .unwrap()
        .ok();
    // Both open connections busy with a stream: a newcomer is closed at once.
    let (second, _) = conns.remove(0);
    let mut running = Vec::new();
    for send in [&second, &third] {
        let send = send.clone();
        running.push(tokio::spawn(async move {
            h2_post(
                &send,
                "/v1/chat/completions",
                chat_body("slow", true, "one two three four five six"),
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(5), h2::client::handshake(tcp))
        .await
        .expect("the newcomer was kept waiting");
    if let Ok((send, conn)) = refused {
        tokio::spawn(conn);
        let r = h2_post(&send, "/healthz", String::new()).await;
        assert!(r.is_err(), "a newcomer was served past the limit: {r:?}");
    }
    for r in running {
        let (status, _, body) = r.await.unwrap().unwrap();
        assert_eq!(status, 200);
        assert_eq!(streamed_text(&body), "one two three four five six");
    }
}
