//! The `promptgate` command: `serve` runs the gateway, `check` validates the
//! configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use promptgate::backend::ProviderState;

/// mimalloc instead of the system allocator: a request allocates and frees many
/// small buffers on two worker threads, and glibc's arenas spent ~14 % of the
/// CPU of a saturated gateway in malloc/free and their lock (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "promptgate",
    version,
    about = "Model-agnostic prompt orchestration gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The gateway file; `providers/` and `prompts/` are read beside it.
        #[arg(long, default_value = "promptgate.yaml")]
        config: PathBuf,
        /// Listen on HOST:PORT instead of the configured address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve the admin API on HOST:PORT instead of the configured address.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Validate the whole configuration and report every problem; exits non-zero
    /// if there is any.
    Check {
        #[arg(long, default_value = "promptgate.yaml")]
        config: PathBuf,
    },
    /// Render a prompt version without calling a model: prints the messages and
    /// the route and parameters the version would use.
    Render {
        /// `ID`, `ID@VERSION` or `ID@LABEL` (default label: production).
        prompt: String,
        /// A variable, `NAME=VALUE` (numbers, booleans, lists and objects as JSON).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        #[arg(long, default_value = "promptgate.yaml")]
        config: PathBuf,
    },
    /// Rehearse a provider outage on a running gateway: send bounded load through
    /// a route, inject a fault on a provider for a while, restore it, and write a
    /// report (Markdown + JSON).
    Drill {
        /// The gateway's base URL (load goes only here).
        #[arg(long)]
        gateway: String,
        /// The gateway's admin API base URL.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Environment variable holding the admin key.
        #[arg(long, default_value = "PROMPTGATE_ADMIN_KEY")]
        admin_key_env: String,
        #[arg(long)]
        route: String,
        #[arg(long)]
        provider: String,
        /// down, error, slow, stall, rate_limited, stream_cut, error_in_200
        #[arg(long)]
        fault: String,
        /// For `error`: the HTTP status.
        #[arg(long)]
        status: Option<u16>,
        /// For `slow`: added latency (e.g. 500ms).
        #[arg(long)]
        latency: Option<String>,
        /// For `stream_cut`: output chunks before the cut.
        #[arg(long)]
        after_chunks: Option<u64>,
        /// How long the fault lasts.
        #[arg(long, default_value = "30s")]
        duration: humantime::Duration,
        #[arg(long, default_value = "5s")]
        warmup: humantime::Duration,
        #[arg(long, default_value = "10s")]
        recovery: humantime::Duration,
        #[arg(long, default_value_t = 20)]
        rps: u32,
        /// Report path prefix: writes PREFIX.md and PREFIX.json.
        #[arg(long, default_value = "drill-report")]
        out: PathBuf,
    },
    /// Send recorded requests (an audit log kept with content, or a JSONL of
    /// OpenAI chat requests) to a candidate at a bounded rate, compare its
    /// answers with the primary's (recorded, or the route's first target
    /// called now) and write the readiness report (Markdown + JSON), offline.
    Replay {
        /// The recorded requests, one JSON object per line.
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        route: String,
        /// PROVIDER/MODEL, a configured provider's model.
        #[arg(long)]
        candidate: String,
        /// Requests a second at most.
        #[arg(long, default_value_t = 5.0)]
        rps: f64,
        /// Requests in flight at most.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, default_value = "promptgate.yaml")]
        config: PathBuf,
        /// The shadow store the pairs are added to (default: `shadow.store`).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Report path prefix: writes PREFIX.md and PREFIX.json.
        #[arg(long, default_value = "replay-report")]
        out: PathBuf,
        /// Keep both answers and the request in the store and the report's
        /// worst disagreements (default: as the route's `shadow.keep_outputs`).
        #[arg(long)]
        keep_outputs: bool,
    },
    /// Index documents into a retriever: .txt, .md, .html, .pdf and .jsonl
    /// files (folders are walked). Unchanged documents are skipped; changed
    /// ones replaced; everything becomes visible at once at the end.
    Ingest {
        /// The retriever (`retrievers/<id>.yaml`).
        retriever: String,
        /// Files or folders; sources are paths relative to each.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, default_value = "promptgate.yaml")]
        config: PathBuf,
        /// Remove documents whose files are gone (only under the given paths).
        #[arg(long)]
        prune: bool,
    },
    /// Gateway keys: make a new one (`keys new`), list the configured ones
    /// (`keys list`).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// List prompts with their versions, content hashes and labels.
    Prompts {
        #[arg(long, default_value = "promptgate.yaml")]
        config: PathBuf,
    },
    /// Search a retriever: prints the ranked passages (score, source, title,
    /// first line); `--explain` adds each branch's rank and raw score.
    Search {
        /// The retriever id (its file name in `retrievers/`).
        retriever: String,
        query: String,
        #[arg(long, default_value = "promptgate.yaml")]
        config: PathBuf,
        /// Passages to return (default: the retriever's `top_k`).
        #[arg(long)]
        top_k: Option<u32>,
        /// A metadata filter as a JSON object, e.g. '{"lang": "zh"}'.
        #[arg(long)]
        filter: Option<String>,
        /// Show each branch's rank and raw score (BM25, cosine).
        #[arg(long)]
        explain: bool,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print spend per key, route and model from the spend store (the SQLite
    /// file or Redis the config names); safe while the gateway runs.
    Usage {
        #[arg(long, default_value = "promptgate.yaml")]
        config: PathBuf,
        /// Only this key id (`anonymous`: requests without a key).
        #[arg(long)]
        key: Option<String>,
        /// `7d` (the 7 UTC days ending today) or a date like 2026-11-01
        /// (default: this UTC month).
        #[arg(long)]
        since: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Judge a route's shadow candidates: read the shadow store and write a
    /// readiness report (PREFIX.md + PREFIX.json) with a verdict against the
    /// route's `readiness` thresholds; safe while the gateway runs.
    Readiness {
        #[arg(long)]
        route: String,
        /// Only this candidate, `provider/model`.
        #[arg(long)]
        candidate: Option<String>,
        /// Only pairs this recent (e.g. 24h, 7d).
        #[arg(long)]
        since: Option<humantime::Duration>,
        #[arg(long, default_value = "promptgate.yaml")]
        config: PathBuf,
        /// The shadow store (default: the config's `shadow.store`).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Report path prefix: writes PREFIX.md and PREFIX.json.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Print a fresh random key (once: only its SHA-256 is kept) and the entry
    /// to paste into `keys/<file>.yaml`.
    New {
        #[arg(long)]
        id: String,
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Route globs, comma-separated (`chat*,embed`); default: every route.
        #[arg(long)]
        routes: Option<String>,
        /// Prompt globs, comma-separated; default: every prompt.
        #[arg(long)]
        prompts: Option<String>,
        /// When the key stops working, RFC 3339 (2027-01-01T00:00:00Z).
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        rpm: Option<u64>,
        #[arg(long)]
        tpm: Option<u64>,
        #[arg(long)]
        concurrency: Option<u32>,
    },
    /// List the configured keys: id, owner, team, expiry, state, routes (never
    /// a key or its hash).
    List {
        #[arg(long, default_value = "promptgate.yaml")]
        config: PathBuf,
    },
}

fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Loads and fully validates the configuration (templates compiled too).
fn load_snapshot(config: &std::path::Path) -> Result<promptgate::snapshot::Snapshot, ExitCode> {
    let problems = match promptgate::config::load(config) {
        Err(p) => p,
        Ok(cfg) => match promptgate::snapshot::Snapshot::build(
            cfg,
            &env_lookup,
            &promptgate::health::Book::default(),
        ) {
            Ok(s) => return Ok(s),
            Err(p) => p,
        },
    };
    for p in &problems {
        eprintln!("error: {p}");
    }
    eprintln!("{} problem(s) found", problems.len());
    Err(ExitCode::FAILURE)
}

#[allow(clippy::print_stdout)]
fn check(config: PathBuf) -> ExitCode {
    match load_snapshot(&config) {
        Err(code) => code,
        Ok(snap) => {
            let cfg = &snap.config;
            // Checked as `serve` checks it at start.
            if let Err(problems) =
                promptgate::cache::resolve_secret(&mut cfg.clone(), &config, &env_lookup)
            {
                return problems_failure(&problems);
            }
            for p in cfg.providers.values() {
                if let ProviderState::Unavailable(reason) =
                    promptgate::backend::build(p, &env_lookup)
                {
                    println!(
                        "note: {}: provider `{}` is unavailable: {reason}",
                        p.file.display(),
                        p.id
                    );
                }
            }
            // A retriever that cannot serve (a missing or corrupt index, an
            // unset key) fails the check: `serve` would run without it.
            let mut unavailable = 0;
            for s in snap.retrievers.iter() {
                if let Err(why) = &s.retriever {
                    eprintln!(
                        "error: {}: retriever `{}` is unavailable: {why}",
                        s.config.file.display(),
                        s.id
                    );
                    unavailable += 1;
                }
            }
            if unavailable > 0 {
                eprintln!("{unavailable} problem(s) found");
                return ExitCode::FAILURE;
            }
            println!(
                "ok: {} route(s), {} provider(s), {} prompt(s), {} retriever(s)",
                cfg.routes.len(),
                cfg.providers.len(),
                cfg.prompts.len(),
                cfg.retrievers.len()
            );
            println!(
                "{}",
                promptgate::governance::describe(cfg.auth, cfg.keys.len())
            );
            for note in promptgate::governance::keys::notes(cfg) {
                println!("note: {note}");
            }
            ExitCode::SUCCESS
        }
    }
}

#[allow(clippy::print_stdout)]
fn render(config: PathBuf, prompt: String, vars: Vec<String>) -> ExitCode {
    use promptgate::prompt::{PromptRef, Selector};
    let snap = match load_snapshot(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let (id, selector) = Selector::parse_ref(&prompt);
    let Some(def) = snap.prompts.get(&id) else {
        let ids: Vec<&str> = snap.prompts.prompts().map(|p| p.id.as_str()).collect();
        eprintln!("error: no prompt `{id}` (prompts: {})", ids.join(", "));
        return ExitCode::FAILURE;
    };
    let mut variables = serde_json::Map::new();
    for v in &vars {
        let Some((name, text)) = v.split_once('=') else {
            eprintln!("error: `--var {v}` is not NAME=VALUE");
            return ExitCode::FAILURE;
        };
        let value = match def.variables.iter().find(|d| d.name == name) {
            Some(d) => match d.ty.parse_text(text) {
                Some(val) => val,
                None => {
                    eprintln!("error: variable `{name}` must be a {}", d.ty.as_str());
                    return ExitCode::FAILURE;
                }
            },
            None => serde_json::Value::String(text.to_owned()),
        };
        variables.insert(name.to_owned(), value);
    }
    let r = PromptRef {
        id,
        explicit_selector: Some(selector.clone()),
        selector,
        variables,
    };
    match snap.prompts.render(&r) {
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Ok(out) => {
            println!(
                "# {}@{}  route: {}",
                out.id,
                out.version,
                out.route.as_deref().unwrap_or("(the request's model)")
            );
            let hooks: Vec<String> = snap
                .prompts
                .get(&out.id)
                .and_then(|p| p.versions.get(&out.version))
                .map(|v| {
                    v.retrieval
                        .iter()
                        .map(|h| format!("{} ← {}", h.into, h.retriever))
                        .collect()
                })
                .unwrap_or_default();
            if !hooks.is_empty() {
                println!(
                    "# retrieval not run here; these are empty lists: {}",
                    hooks.join(", ")
                );
            }
            let p = &out.params;
            let mut params = Vec::new();
            if let Some(t) = p.temperature {
                params.push(format!("temperature={t}"));
            }
            if let Some(t) = p.top_p {
                params.push(format!("top_p={t}"));
            }
            if let Some(t) = p.max_tokens {
                params.push(format!("max_tokens={t}"));
            }
            if let Some(t) = p.seed {
                params.push(format!("seed={t}"));
            }
            if !p.stop.is_empty() {
                params.push(format!("stop={:?}", p.stop));
            }
            if !p.tools.is_empty() {
                params.push(format!(
                    "tools={}",
                    p.tools
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ));
            }
            if p.response_format.is_some() {
                params.push("response_format=json".into());
            }
            if !params.is_empty() {
                println!("# params: {}", params.join(" "));
            }
            for m in &out.messages {
                println!("\n[{}]", m.role.as_str());
                println!(
                    "{}",
                    m.content
                        .as_ref()
                        .map(|c| c.text().into_owned())
                        .unwrap_or_default()
                );
            }
            ExitCode::SUCCESS
        }
    }
}

/// The multi-threaded runtime every command that serves or calls routes runs on.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// The whole gateway, in process (its routes serve `ingest`'s and `search`'s
/// embeddings as they serve requests); every problem printed on failure.
fn load_gateway(
    config: &std::path::Path,
) -> Result<
    (
        std::sync::Arc<promptgate::Gateway>,
        promptgate::config::Config,
    ),
    ExitCode,
> {
    promptgate::load(config, &env_lookup).map_err(|problems| {
        for p in &problems {
            eprintln!("error: {p}");
        }
        eprintln!("the configuration is invalid; run `promptgate check` for details");
        ExitCode::FAILURE
    })
}

struct ReplayArgs {
    from: PathBuf,
    route: String,
    candidate: String,
    rps: f64,
    concurrency: usize,
    config: PathBuf,
    store: Option<PathBuf>,
    out: PathBuf,
    keep_outputs: bool,
}

#[allow(clippy::print_stdout)]
fn replay(a: ReplayArgs) -> ExitCode {
    use promptgate::shadow::replay;
    if !(a.rps.is_finite() && a.rps > 0.0) {
        eprintln!("error: --rps must be a positive number");
        return ExitCode::FAILURE;
    }
    let mut cfg = match promptgate::config::load(&a.config) {
        Ok(c) => c,
        Err(problems) => return problems_failure(&problems),
    };
    if let Err(e) = replay::prepare(&mut cfg, &a.route, &a.candidate, a.keep_outputs) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(s) = &a.store {
        cfg.shadow.path = s.clone();
    }
    let (items, skipped) = match replay::read(&a.from, &a.route) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        if let Err(problems) = promptgate::cache::resolve_secret(&mut cfg, &a.config, &env_lookup)
        {
            return problems_failure(&problems);
        }
        let Some(route_cfg) = cfg.routes.get(&a.route).cloned() else {
            eprintln!("error: no route `{}`", a.route);
            return ExitCode::FAILURE;
        };
        let store_path = cfg.shadow.path.clone();
        let retention = cfg.shadow.retention;
        let gw = match promptgate::gateway_for(cfg, &a.config, &env_lookup) {
            Ok(gw) => gw,
            Err(problems) => return problems_failure(&problems),
        };
        let n = items.len();
        println!("replaying {n} request(s) to {} at {} a second", a.candidate, a.rps);
        let ran = replay::run(&gw, &a.route, items, a.rps, a.concurrency).await;
        let pairs = ran.pairs;
        let writer = promptgate::shadow::store::Writer::open(store_path.clone(), retention);
        let mut lost = 0;
        for p in &pairs {
            if !writer.send(p.clone()) {
                lost += 1;
            }
        }
        writer.close(std::time::Duration::from_secs(10));
        let compared = pairs.iter().filter(|p| p.comparison.is_some()).count();
        println!(
            "{} pair(s), {compared} compared; not replayed: {} unreadable, {} truncated, {} without content, {} private, {} blocked by data protection",
            pairs.len(),
            skipped.unreadable,
            skipped.truncated,
            skipped.no_content,
            skipped.private + ran.private,
            ran.blocked
        );
        if lost > 0 {
            eprintln!("warning: {lost} pair(s) could not be added to the shadow store");
        }
        let now_ms = promptgate::shadow::now_ms();
        match promptgate::shadow::report::replay(&route_cfg, &pairs, &a.out, now_ms) {
            Ok(summary) => {
                print!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Prints each configuration problem; the command fails.
fn problems_failure(problems: &[promptgate::config::Problem]) -> ExitCode {
    for p in problems {
        eprintln!("error: {p}");
    }
    ExitCode::FAILURE
}

/// "No such retriever", listing the configured ones.
fn no_retriever<'a>(name: &str, ids: impl Iterator<Item = &'a str>) -> ExitCode {
    let ids: Vec<&str> = ids.collect();
    eprintln!(
        "error: no retriever `{name}` (retrievers: {})",
        if ids.is_empty() {
            "none".to_owned()
        } else {
            ids.join(", ")
        }
    );
    ExitCode::FAILURE
}

#[allow(clippy::print_stdout)]
fn ingest(config: PathBuf, retriever: String, paths: Vec<PathBuf>, prune: bool) -> ExitCode {
    use promptgate::config::RetrieverKind;
    use promptgate::retrieval::{chroma, ingest, local};
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let code = runtime.block_on(async move {
        // The whole gateway, in process: document embeddings go through the
        // retriever's embeddings route like any request.
        let (gw, cfg) = match load_gateway(&config) {
            Ok(x) => x,
            Err(code) => return code,
        };
        let Some(rcfg) = cfg.retrievers.get(&retriever) else {
            return no_retriever(&retriever, cfg.retrievers.keys().map(String::as_str));
        };
        let writer = match &rcfg.kind {
            RetrieverKind::Local { .. } => local::writer(rcfg),
            RetrieverKind::Chroma { .. } => chroma::writer(rcfg, &env_lookup),
            RetrieverKind::Http { .. } => {
                Err("it is of kind http: an http retriever is indexed by its own service".into())
            }
        };
        let writer = match writer {
            Ok(w) => w,
            Err(why) => {
                eprintln!("error: cannot ingest into retriever `{retriever}`: {why}");
                return ExitCode::FAILURE;
            }
        };
        let embedder = promptgate::pipeline::embedder::GatewayEmbedder {
            gateway: gw.clone(),
            request_id: format!("ingest-{retriever}").into(),
            private: rcfg.private,
        };
        let opts = ingest::Options {
            prune,
            progress: true,
            echo_warnings: true,
            ..ingest::Options::default()
        };
        eprintln!("ingesting into `{retriever}` ({})", rcfg.kind_name());
        match ingest::ingest(rcfg, writer, Some(&embedder), &paths, &opts).await {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: ingest into `{retriever}` failed, the index is unchanged: {e}");
                ExitCode::FAILURE
            }
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

#[allow(clippy::print_stdout)]
fn prompts(config: PathBuf) -> ExitCode {
    let snap = match load_snapshot(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    for p in snap.prompts.prompts() {
        println!("{}  ({})", p.id, p.file.display());
        if let Some(d) = &p.description {
            println!("  {d}");
        }
        println!("  labels: {}", promptgate::prompt::describe_labels(p));
        for v in p.versions.values() {
            let labels: Vec<&str> = p
                .labels
                .iter()
                .filter(|(_, n)| **n == v.number)
                .map(|(l, _)| l.as_str())
                .collect();
            println!(
                "  v{}  {}  route: {}{}",
                v.number,
                v.hash,
                v.route.as_deref().unwrap_or("-"),
                if labels.is_empty() {
                    String::new()
                } else {
                    format!("  [{}]", labels.join(", "))
                }
            );
        }
    }
    ExitCode::SUCCESS
}

/// `promptgate search`: one search through the configured retriever, with
/// query embeddings through the gateway's own route (as `serve` would).
#[allow(clippy::print_stdout)]
fn search(
    config: PathBuf,
    retriever: String,
    query: String,
    top_k: Option<u32>,
    filter: Option<String>,
    explain: bool,
    json: bool,
) -> ExitCode {
    use promptgate::retrieval::{BranchHit, Filter, Search};
    let filter = match filter
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        None => Filter::default(),
        Some(Err(e)) => {
            eprintln!("error: --filter is not JSON: {e}");
            return ExitCode::FAILURE;
        }
        Some(Ok(v)) => match Filter::from_json(Some(&v)) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: --filter: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let gw = match load_gateway(&config) {
            Ok((gw, _)) => gw,
            Err(code) => return code,
        };
        let snap = gw.snapshot();
        let Some(state) = snap.retrievers.get(&retriever) else {
            return no_retriever(&retriever, snap.retrievers.iter().map(|s| &*s.id));
        };
        let r = match state.current() {
            Ok(r) => r,
            Err(why) => {
                eprintln!("error: retriever `{retriever}` cannot serve: {why}");
                return ExitCode::FAILURE;
            }
        };
        let search = Search {
            query,
            top_k: top_k.unwrap_or(state.config.top_k),
            filter,
        };
        if let Err(e) = search.validate() {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
        let embedder = promptgate::pipeline::embedder::GatewayEmbedder {
            gateway: gw.clone(),
            request_id: "cli-search".into(),
            private: state.config.private,
        };
        let started = std::time::Instant::now();
        let found = tokio::time::timeout(state.config.timeout, r.search(&search, &embedder)).await;
        let elapsed = started.elapsed();
        let passages = match found {
            Err(_) => {
                eprintln!(
                    "error: retriever `{retriever}` did not answer within its timeout ({})",
                    humantime::format_duration(state.config.timeout)
                );
                return ExitCode::FAILURE;
            }
            Ok(Err(e)) => {
                eprintln!("error: retriever `{retriever}`: {e}");
                return ExitCode::FAILURE;
            }
            Ok(Ok(p)) => p,
        };
        let hit_json = |h: Option<BranchHit>| {
            h.map_or(
                serde_json::Value::Null,
                |h| serde_json::json!({"rank": h.rank, "raw": h.raw}),
            )
        };
        if json {
            let data: Vec<serde_json::Value> = passages
                .iter()
                .map(|p| {
                    let mut v = serde_json::json!({
                        "text": p.text,
                        "source": p.source,
                        "title": p.title,
                        "score": p.score,
                        "chunk_id": p.chunk_id,
                        "metadata": p.metadata,
                    });
                    if explain {
                        v["ranks"] = serde_json::json!({
                            "lexical": hit_json(p.branches.lexical),
                            "dense": hit_json(p.branches.dense),
                        });
                    }
                    v
                })
                .collect();
            let out = serde_json::json!({
                "object": "list",
                "retriever": retriever,
                "generation": r.generation(),
                "data": data,
            });
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            return ExitCode::SUCCESS;
        }
        if passages.is_empty() {
            println!("no passages found ({} ms)", elapsed.as_millis());
            return ExitCode::SUCCESS;
        }
        for (i, p) in passages.iter().enumerate() {
            // The first line of the text proper (chunks often start with
            // their heading, which the title already shows).
            let heading = p.title.rsplit(" > ").next().unwrap_or("");
            let mut lines = p.text.lines().map(str::trim).filter(|l| !l.is_empty());
            let first = lines
                .clone()
                .find(|l| !l.starts_with('#') && l.trim_start_matches('#').trim() != heading)
                .or_else(|| lines.next())
                .unwrap_or("");
            let first: String = if first.chars().count() > 100 {
                first.chars().take(99).chain(['…']).collect()
            } else {
                first.to_owned()
            };
            let title = if p.title.is_empty() {
                String::new()
            } else {
                format!("  {}", p.title)
            };
            println!("{:>2}. {:.3}  {}{title}", i + 1, p.score, p.source);
            println!("    {first}");
            if explain {
                let branch = |name: &str, what: &str, h: Option<BranchHit>| match h {
                    Some(h) => format!("{name} #{} ({what} {:.4})", h.rank, h.raw),
                    None => format!("{name} -"),
                };
                println!(
                    "    {}  {}  chunk {}",
                    branch("lexical", "bm25", p.branches.lexical),
                    branch("dense", "cosine", p.branches.dense),
                    p.chunk_id
                );
            }
        }
        println!(
            "{} passage(s) from `{retriever}` in {} ms",
            passages.len(),
            elapsed.as_millis()
        );
        ExitCode::SUCCESS
    })
}

fn serve(
    config: PathBuf,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
) -> ExitCode {
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let code = runtime.block_on(async move {
        let (gw, cfg) = match load_gateway(&config) {
            Ok(x) => x,
            Err(code) => return code,
        };
        // Traces: started once; a reload does not change them.
        if let Some(t) = &cfg.tracing {
            let failures = gw.metrics.trace_export_failures.clone();
            match promptgate::otel::Tracing::start(t, tokio::runtime::Handle::current(), failures, &env_lookup) {
                Ok(tracing) => {
                    let _ = gw.tracing.set(tracing);
                    tracing::info!(endpoint = %redacted_url(&t.endpoint), sample_ratio = t.sample_ratio, "traces go to the collector over OTLP/HTTP");
                }
                Err(e) => {
                    say_error(format!("error: {e}"));
                    return ExitCode::FAILURE;
                }
            }
        }
        let traces = gw.clone();
        let snap = gw.snapshot();
        for (id, state) in &snap.providers {
            match state {
                ProviderState::Ready(_) => tracing::info!(provider = %id, "provider ready"),
                ProviderState::Unavailable(r) => {
                    tracing::warn!(provider = %id, reason = %r, "provider unavailable")
                }
            }
        }
        promptgate::pipeline::retrieve::log_unavailable(&snap);
        // Load the tokenizers now, off the request path.
        let encodings = snap.encodings_to_preload();
        tokio::task::spawn_blocking(move || promptgate::tokens::warm(&encodings));
        let addr = listen.unwrap_or(cfg.listen);
        let listener = match bind_public(addr) {
            Ok(l) => l,
            Err(e) => {
                say_error(format!("error: cannot listen on {addr}: {e}"));
                return ExitCode::FAILURE;
            }
        };
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        tracing::info!(address = %local, routes = cfg.routes.len(), tls = cfg.tls.is_some(), "promptgate listening");
        announce(format!(
            "promptgate listening on {scheme}://{local} ({} routes)",
            cfg.routes.len()
        ));
        // The auth mode, once; without keys on a reachable address anyone
        // who reaches the port spends the providers' keys.
        tracing::info!("{}", promptgate::governance::describe(snap.access.mode, snap.access.len()));
        let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
        if snap.access.mode == promptgate::config::AuthMode::Off && !loopback {
            tracing::warn!(address = %local, "auth is off and the gateway listens beyond this machine: anyone who reaches it uses the providers' keys; set `auth: {{mode: required}}` and give clients keys (`promptgate keys new`)");
        }
        let env: promptgate::reload::SharedEnv = std::sync::Arc::new(env_lookup);
        let reloader = promptgate::reload::Reloader::new(gw.clone(), &config, env);
        let _watcher = match reloader.watch(std::time::Duration::from_millis(200)) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the configuration files; reload with SIGHUP or POST /admin/reload");
                None
            }
        };
        #[cfg(unix)]
        {
            let r = reloader.clone();
            if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                promptgate::task::spawn("sighup-reload", async move {
                    while hup.recv().await.is_some() {
                        let _ = r.reload("SIGHUP").await;
                    }
                });
            }
        }
        let admin_addr = admin_listen.unwrap_or(cfg.admin.listen);
        let admin_listener = match tokio::net::TcpListener::bind(admin_addr).await {
            Ok(l) => l,
            Err(e) => {
                say_error(format!("error: cannot listen on {admin_addr} for the admin API: {e}"));
                return ExitCode::FAILURE;
            }
        };
        let admin_key = std::env::var(&cfg.admin.key_env).ok();
        if admin_key.as_deref().is_none_or(str::is_empty) {
            tracing::warn!(variable = %cfg.admin.key_env, "no admin key set: the admin API refuses every call");
        }
        let admin_local = admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        announce(format!("promptgate admin API on http://{admin_local}"));
        let admin = promptgate::admin::router(reloader.clone(), admin_key);
        // The admin port gets the same connection protections as the public one.
        let admin_limits = promptgate::conn_limits(&cfg);
        promptgate::task::spawn("admin-listener", async move {
            let _ = promptgate::server::serve_with(
                admin_listener,
                admin,
                admin_limits,
                std::future::pending::<()>(),
            )
            .await;
        });
        let _health = promptgate::pipeline::spawn_health_checks(gw.clone());
        let governor = gw.governor.clone();
        let shadows = gw.clone();
        // TLS is switched on or off at start; the pair itself follows reloads.
        let tls = match &cfg.tls {
            None => None,
            Some(t) => match promptgate::tls::acceptor(gw.clone(), t.pair.clone()) {
                Ok(a) => Some(a),
                Err(e) => {
                    say_error(format!("error: cannot set up TLS: {e}"));
                    return ExitCode::FAILURE;
                }
            },
        };
        let draining = gw.clone();
        let router = promptgate::server::router(gw, promptgate::server_settings(&cfg));
        let limits = promptgate::conn_limits(&cfg);
        warn_if_over_file_limit(limits.max_connections);
        let signalled = watch_signals(limits.shutdown_grace, cfg.limits.drain_delay, draining);
        let shutdown = async {
            if signalled.await.is_err() {
                // No signal watcher: serve until killed.
                std::future::pending::<()>().await;
            }
        };
        let served = promptgate::server::serve_tls(listener, router, limits, tls, shutdown).await;
        // What is still queued is written out, all three at once within
        // FLUSH (the signal thread's deadline leaves room for it): audit
        // records, shadow pairs, spans (the export runs on this runtime, so
        // every wait is on the blocking pool).
        let audit = tokio::task::spawn_blocking(move || governor.audit.close(FLUSH));
        let pairs = tokio::task::spawn_blocking(move || shadows.shadows.close(FLUSH));
        let spans = tokio::task::spawn_blocking(move || {
            if let Some(t) = traces.tracing.get() {
                t.shutdown(FLUSH);
            }
        });
        let _ = tokio::join!(audit, pairs, spans);
        match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say_error(format!("error: server failed: {e}"));
                ExitCode::FAILURE
            }
        }
    });
    // Work still running (a request past the grace period) is not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

/// Warns when `limits.max_connections` leaves no room under the process's
/// open-file limit (Linux: read from /proc): past it, accepting fails instead
/// of the connection limit applying.
fn warn_if_over_file_limit(max_connections: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    // Listeners, the runtime, backend connections and the watcher need some too.
    if let Some(soft) = soft.filter(|s| max_connections.saturating_add(64) > *s) {
        tracing::warn!(
            max_connections,
            open_file_limit = soft,
            "limits.max_connections is close to or above the open-file limit; lower it or raise the limit"
        );
    }
}

/// The public listener, with an accept queue deep enough that a burst of
/// connections is not answered by dropped handshakes (a second's retransmit).
fn bind_public(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// How long, after the drain, queued audit records, shadow pairs and spans
/// have to be written out (together).
const FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits for SIGTERM or ctrl-c on a thread of its own (so a busy runtime cannot
/// miss it). On the signal readiness fails at once (`/readyz` answers 503
/// `draining`) while the listener keeps accepting and serving for
/// `drain_delay` (load balancers take the process out of rotation meanwhile);
/// then the returned receiver resolves and the server stops accepting and
/// drains. If the process has not exited `grace` + [`FLUSH`] + 0.5 s after
/// that (or on a second signal), it ends it.
fn watch_signals(
    grace: std::time::Duration,
    drain_delay: std::time::Duration,
    gw: std::sync::Arc<promptgate::Gateway>,
) -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("promptgate-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                async fn signal() {
                    let ctrl_c = tokio::signal::ctrl_c();
                    #[cfg(unix)]
                    {
                        use tokio::signal::unix::{signal, SignalKind};
                        match signal(SignalKind::terminate()) {
                            Ok(mut term) => {
                                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
                            }
                            Err(_) => {
                                let _ = ctrl_c.await;
                            }
                        }
                    }
                    #[cfg(not(unix))]
                    {
                        let _ = ctrl_c.await;
                    }
                }
                signal().await;
                gw.readiness.start_draining();
                drop(gw);
                if !drain_delay.is_zero() {
                    tracing::info!(
                        drain_delay = %humantime::format_duration(drain_delay),
                        "shutdown signal: readiness fails; still serving until the drain delay is over"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(drain_delay) => {}
                        _ = signal() => {
                            say_error("promptgate: second signal; exiting now".into());
                            std::process::exit(1);
                        }
                    }
                }
                tracing::info!(grace = %humantime::format_duration(grace), "shutting down");
                let _ = tx.send(());
                // The margin lets an orderly drain that ends right at the grace
                // period return on its own and write out what is queued.
                let margin = FLUSH.saturating_add(std::time::Duration::from_millis(500));
                tokio::select! {
                    _ = tokio::time::sleep(grace.saturating_add(margin)) => {
                        say_error("promptgate: requests still running after the shutdown grace period; exiting".into());
                    }
                    _ = signal() => say_error("promptgate: second signal; exiting now".into()),
                }
                std::process::exit(1);
            });
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch for shutdown signals");
    }
    rx
}

/// `promptgate usage`: reads the spend store (read-only) and prints a table
/// or JSON.
#[allow(clippy::print_stdout)]
fn usage(config: PathBuf, key: Option<String>, since: Option<String>, json: bool) -> ExitCode {
    use promptgate::governance::spend;
    let cfg = match promptgate::config::load(&config) {
        Ok(c) => c,
        Err(problems) => return problems_failure(&problems),
    };
    let today = spend::Period::now();
    let since = match spend::parse_since(since.as_deref(), today) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: --since: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let q = spend::UsageQuery { since, key };
    let lines = match runtime.block_on(spend::report(&cfg.spend, &q)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        let out = serde_json::json!({
            "since": spend::date(since),
            "until": spend::date(today.day),
            "currency": cfg.spend.currency,
            "store": match &cfg.spend.redis {
                Some(_) => "redis".to_owned(),
                None => cfg.spend.path.display().to_string(),
            },
            "lines": lines,
            "total": spend::total(&lines),
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        println!(
            "spend from {} to {} (UTC)",
            spend::date(since),
            spend::date(today.day)
        );
        print!("{}", spend::render_table(&lines, &cfg.spend.currency));
    }
    ExitCode::SUCCESS
}

/// `promptgate readiness`: the report's files and a short summary.
#[allow(clippy::print_stdout)]
fn readiness(args: promptgate::shadow::report::CliArgs) -> ExitCode {
    match promptgate::shadow::report::cli(&args) {
        Ok(summary) => {
            print!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)]
fn drill(plan: promptgate::drill::DrillPlan, out: PathBuf) -> ExitCode {
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(promptgate::drill::run(plan)) {
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Ok(report) => {
            let md = promptgate::drill::markdown(&report);
            let json = serde_json::to_string_pretty(&report).unwrap_or_default();
            let md_path = out.with_extension("md");
            let json_path = out.with_extension("json");
            if let Err(e) =
                std::fs::write(&md_path, &md).and_then(|_| std::fs::write(&json_path, json))
            {
                eprintln!("error: cannot write the report: {e}");
                return ExitCode::FAILURE;
            }
            println!("{md}");
            println!(
                "report written to {} and {}",
                md_path.display(),
                json_path.display()
            );
            ExitCode::SUCCESS
        }
    }
}

#[allow(clippy::print_stdout)]
fn keys(action: KeysAction) -> ExitCode {
    use promptgate::governance::keys as gk;
    match action {
        KeysAction::New {
            id,
            owner,
            team,
            description,
            routes,
            prompts,
            expires,
            rpm,
            tpm,
            concurrency,
        } => {
            let spec = gk::NewKey {
                id,
                owner,
                team,
                description,
                routes: routes.as_deref().map(gk::split_globs).unwrap_or_default(),
                prompts: prompts.as_deref().map(gk::split_globs).unwrap_or_default(),
                expires,
                rpm,
                tpm,
                concurrency,
            };
            // Checked before a key exists, so a refused entry prints no key.
            if let Err(e) = gk::entry_yaml(&spec, &"0".repeat(64)) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            let (key, sha256) = match gk::new_key() {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let entry = match gk::entry_yaml(&spec, &sha256) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            eprintln!(
                "The key is shown once, on the first line: give it to its owner now; the gateway keeps only its SHA-256."
            );
            println!("{key}");
            println!();
            println!("# paste into keys/<file>.yaml beside promptgate.yaml:");
            print!("{entry}");
            ExitCode::SUCCESS
        }
        KeysAction::List { config } => {
            let cfg = match promptgate::config::load(&config) {
                Ok(c) => c,
                Err(problems) => {
                    for p in &problems {
                        eprintln!("error: {p}");
                    }
                    eprintln!("{} problem(s) found", problems.len());
                    return ExitCode::FAILURE;
                }
            };
            let now = gk::now();
            println!(
                "auth: {} — {} keys",
                gk::mode_name(cfg.auth),
                cfg.keys.len()
            );
            for k in cfg.keys.values() {
                let state = if !k.enabled {
                    "disabled"
                } else if k.expires.is_some_and(|e| now >= e) {
                    "expired"
                } else {
                    "enabled"
                };
                println!(
                    "{}  owner: {}  team: {}  expires: {}  {state}  routes: {}  prompts: {}  ({})",
                    k.id,
                    k.owner.as_deref().unwrap_or("-"),
                    k.team.as_deref().unwrap_or("-"),
                    k.expires.map(gk::rfc3339).as_deref().unwrap_or("never"),
                    k.routes.join(","),
                    k.prompts.join(","),
                    k.file.display()
                );
            }
            ExitCode::SUCCESS
        }
    }
}

/// The log lines' format: `PROMPTGATE_LOG_FORMAT`, else the gateway file's
/// `log_format` (for `serve`, read once here, before the first line), else text.
fn log_format(command: &Command) -> promptgate::config::LogFormat {
    use promptgate::config::LogFormat;
    if let Ok(v) = std::env::var("PROMPTGATE_LOG_FORMAT") {
        match LogFormat::parse(v.trim()) {
            Some(f) => return f,
            None => {
                eprintln!("warning: PROMPTGATE_LOG_FORMAT is `{v}`, not `text` or `json`: ignored")
            }
        }
    }
    match command {
        Command::Serve { config, .. } => {
            promptgate::config::peek_log_format(config).unwrap_or_default()
        }
        _ => LogFormat::Text,
    }
}

/// A serving process's fatal or shutdown message: a log line (JSON with
/// `log_format: json`), else plain text on stderr.
fn say_error(line: String) {
    if promptgate::otel::request_spans() {
        tracing::error!("{line}");
    } else {
        eprintln!("{line}");
    }
}

/// A URL for a log line: without user, password or query (where a
/// collector's credential could be).
fn redacted_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.to_string()
        }
        Err(_) => "(unparsable URL)".into(),
    }
}

/// A line for whoever started the process (where it listens): plain on
/// stderr, or a log line when the log is JSON (every line on stderr is then
/// one JSON object).
fn announce(line: String) {
    if promptgate::otel::request_spans() {
        tracing::info!("{line}");
    } else {
        eprintln!("{line}");
    }
}

/// Logging, on stderr, filtered by `PROMPTGATE_LOG` (default `info`); JSON
/// lines carry the request's span (its id) where there is one.
fn init_logging(format: promptgate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PROMPTGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match format {
        promptgate::config::LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        promptgate::config::LogFormat::Json => {
            promptgate::otel::log_request_spans();
            tracing_subscriber::fmt()
                .json()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_current_span(true)
                .with_span_list(false)
                .init()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(log_format(&cli.command));
    match cli.command {
        Command::Serve {
            config,
            listen,
            admin_listen,
        } => serve(config, listen, admin_listen),
        Command::Check { config } => check(config),
        Command::Render {
            prompt,
            vars,
            config,
        } => render(config, prompt, vars),
        Command::Prompts { config } => prompts(config),
        Command::Usage {
            config,
            key,
            since,
            json,
        } => usage(config, key, since, json),
        Command::Keys { action } => keys(action),
        Command::Readiness {
            route,
            candidate,
            since,
            config,
            store,
            out,
        } => readiness(promptgate::shadow::report::CliArgs {
            config,
            route,
            candidate,
            since: since.map(Into::into),
            store,
            out,
        }),
        Command::Ingest {
            retriever,
            paths,
            config,
            prune,
        } => ingest(config, retriever, paths, prune),
        Command::Search {
            retriever,
            query,
            config,
            top_k,
            filter,
            explain,
            json,
        } => search(config, retriever, query, top_k, filter, explain, json),
        Command::Replay {
            from,
            route,
            candidate,
            rps,
            concurrency,
            config,
            store,
            out,
            keep_outputs,
        } => replay(ReplayArgs {
            keep_outputs,
            from,
            route,
            candidate,
            rps,
            concurrency,
            config,
            store,
            out,
        }),
        Command::Drill {
            gateway,
            admin,
            admin_key_env,
            route,
            provider,
            fault,
            status,
            latency,
            after_chunks,
            duration,
            warmup,
            recovery,
            rps,
            out,
        } => {
            let mut f = serde_json::json!({ "fault": fault });
            if let Some(s) = status {
                f["status"] = s.into();
            }
            if let Some(l) = latency {
                f["latency"] = l.into();
            }
            if let Some(n) = after_chunks {
                f["after_chunks"] = n.into();
            }
            let plan = promptgate::drill::DrillPlan {
                gateway: gateway.trim_end_matches('/').to_owned(),
                admin: admin.trim_end_matches('/').to_owned(),
                admin_key: std::env::var(&admin_key_env).unwrap_or_default(),
                route,
                provider,
                fault: f,
                warmup: warmup.into(),
                duration: duration.into(),
                recovery: recovery.into(),
                rps,
            };
            drill(plan, out)
        }
    }
}
