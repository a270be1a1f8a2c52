//! The `promptgate` command: `serve` runs the gateway, `check` validates the
//! configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use promptgate::provider::registry::ProviderState;

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
    },
    /// Validate the whole configuration and report every problem; exits non-zero
    /// if there is any.
    Check {
        #[arg(long, default_value = "promptgate.yaml")]
        config: PathBuf,
    },
}

fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[allow(clippy::print_stdout)]
fn check(config: PathBuf) -> ExitCode {
    match promptgate::config::load(&config) {
        Err(problems) => {
            for p in &problems {
                eprintln!("error: {p}");
            }
            eprintln!("{} problem(s) found", problems.len());
            ExitCode::FAILURE
        }
        Ok(cfg) => {
            for p in cfg.providers.values() {
                if let ProviderState::Unavailable(reason) =
                    promptgate::provider::registry::build(p, &env_lookup)
                {
                    println!(
                        "note: {}: provider `{}` is unavailable: {reason}",
                        p.file.display(),
                        p.id
                    );
                }
            }
            println!(
                "ok: {} route(s), {} provider(s)",
                cfg.routes.len(),
                cfg.providers.len()
            );
            ExitCode::SUCCESS
        }
    }
}

fn serve(config: PathBuf, listen: Option<SocketAddr>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let (gw, cfg) = match promptgate::load(&config, &env_lookup) {
            Ok(x) => x,
            Err(problems) => {
                for p in &problems {
                    eprintln!("error: {p}");
                }
                eprintln!("the configuration is invalid; run `promptgate check` for details");
                return ExitCode::FAILURE;
            }
        };
        let snap = gw.snapshot();
        for (id, state) in &snap.providers {
            match state {
                ProviderState::Ready(_) => tracing::info!(provider = %id, "provider ready"),
                ProviderState::Unavailable(r) => {
                    tracing::warn!(provider = %id, reason = %r, "provider unavailable")
                }
            }
        }
        // Load the tokenizers now, off the request path.
        tokio::task::spawn_blocking(promptgate::tokens::warm);
        let addr = listen.unwrap_or(cfg.listen);
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(address = %local, routes = cfg.routes.len(), "promptgate listening");
        eprintln!(
            "promptgate listening on http://{local} ({} routes)",
            cfg.routes.len()
        );
        let router = promptgate::server::router(gw, promptgate::server_settings(&cfg));
        let shutdown = async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(t) => t,
                        Err(_) => {
                            let _ = ctrl_c.await;
                            return;
                        }
                    };
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            #[cfg(not(unix))]
            {
                let _ = ctrl_c.await;
            }
        };
        match promptgate::server::serve(listener, router, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: server failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROMPTGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve { config, listen } => serve(config, listen),
        Command::Check { config } => check(config),
    }
}
