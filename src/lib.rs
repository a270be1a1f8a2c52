//! promptgate: a model-agnostic prompt orchestration gateway. See ARCHITECTURE.md
//! for the map; the request flow is `server` (edge, dialect) → `pipeline`
//! (stages) → `backend` (one module per backend kind) → back through `server`.

pub mod admin;
pub mod backend;
pub mod cache;
pub mod canonical;
// The one module that reads YAML (clippy.toml forbids serde_yaml elsewhere).
#[allow(clippy::disallowed_types, clippy::disallowed_methods)]
pub mod config;
pub mod dialect;
pub mod drill;
pub mod error;
pub mod framing;
pub mod governance;
pub mod health;
pub mod ids;
pub mod lifecycle;
pub mod metrics;
pub mod otel;
pub mod pipeline;
pub mod prompt;
pub mod protect;
pub mod reload;
pub mod retrieval;
pub mod server;
pub mod shadow;
pub mod snapshot;
pub mod sqlite_writer;
pub mod task;
pub mod tls;
pub mod tokens;

use std::path::Path;
use std::sync::Arc;

pub use config::Problem;
pub use pipeline::Gateway;

/// Loads the config at `path` and builds a ready gateway plus its server settings,
/// reading provider keys through `env`.
pub fn load(
    path: &Path,
    env: backend::EnvLookup<'_>,
) -> Result<(Arc<Gateway>, config::Config), Vec<Problem>> {
    let mut cfg = config::load(path)?;
    cache::resolve_secret(&mut cfg, path, env)?;
    let gw = gateway_for(cfg.clone(), path, env)?;
    Ok((gw, cfg))
}

/// The gateway of a loaded configuration whose shared-cache secret is
/// resolved (`cache::resolve_secret`); a command may adjust the
/// configuration first (`replay` adds its candidate).
pub fn gateway_for(
    cfg: config::Config,
    path: &Path,
    env: backend::EnvLookup<'_>,
) -> Result<Arc<Gateway>, Vec<Problem>> {
    let book = std::sync::Arc::new(health::Book::default());
    let snapshot = snapshot::Snapshot::build(cfg, env, &book)?;
    Gateway::new(snapshot, book).map_err(|e| {
        vec![Problem {
            file: path.display().to_string(),
            line: None,
            field: String::new(),
            message: e,
        }]
    })
}

/// The server settings a config asks for.
pub fn server_settings(cfg: &config::Config) -> server::ServerSettings {
    server::ServerSettings {
        max_body_bytes: cfg.limits.max_body_bytes,
        max_concurrency: cfg.limits.max_concurrency,
        request_timeout: cfg.limits.request_timeout,
        idle_timeout: cfg.limits.idle_timeout,
        body_read_timeout: cfg.limits.body_read_timeout,
        list_ids_in_errors: cfg.limits.list_ids_in_errors,
    }
}

/// The public listener's connection limits a config asks for.
pub fn conn_limits(cfg: &config::Config) -> server::ConnLimits {
    server::ConnLimits {
        header_read_timeout: cfg.limits.header_read_timeout,
        max_connections: cfg.limits.max_connections,
        shutdown_grace: cfg.limits.shutdown_grace,
        write_timeout: cfg.limits.write_timeout,
        max_streams: cfg.limits.max_streams,
    }
}
