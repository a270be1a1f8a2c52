//! Hot reload. A reload reads and validates the whole configuration (gateway file,
//! providers, prompts) into a new snapshot off the request path, checks that no
//! published prompt version changed, and swaps it in atomically. If anything is
//! wrong nothing changes: the last good snapshot keeps serving and the problems
//! are logged, counted and kept for `GET /admin/status`. Triggers: file changes
//! (notify, debounced; editors' write-then-rename saves and Kubernetes ConfigMap
//! symlink swaps both show up as events in the watched folders), SIGHUP, and
//! `POST /admin/reload`. The listen address and limits are read at start only;
//! the TLS certificate and key files are inputs too (whether TLS is on is read
//! at start): a reload that reads a good new pair serves it to the next
//! handshake, a broken one is refused like any other problem.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::config::Problem;
use crate::pipeline::Gateway;
use crate::snapshot::Snapshot;

/// Reads environment variables for provider keys; shared with the reload task.
pub type SharedEnv = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

#[derive(Debug, Clone)]
pub struct FailedReload {
    pub at: SystemTime,
    pub trigger: String,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone)]
pub struct ReloadStatus {
    pub last_success: SystemTime,
    pub last_failure: Option<FailedReload>,
    pub succeeded: u64,
    pub failed: u64,
}

pub struct Reloader {
    gw: Arc<Gateway>,
    config_path: PathBuf,
    env: SharedEnv,
    status: Mutex<ReloadStatus>,
    /// One reload at a time.
    running: tokio::sync::Mutex<()>,
    /// The digest of the input files as the last load read them: a file event
    /// that leaves them unchanged reloads nothing.
    inputs: Mutex<Option<[u8; 32]>>,
    /// The TLS certificate and key files of the serving configuration
    /// (absolute), watched and digested with the configuration's own files.
    tls_files: Arc<Mutex<Vec<PathBuf>>>,
}

/// The `tls` section's files, absolute, so that they compare equal to the
/// paths file events carry.
fn tls_files(snapshot: &Snapshot) -> Vec<PathBuf> {
    snapshot
        .config
        .tls
        .iter()
        .flat_map(|t| [&t.cert, &t.key])
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .collect()
}

/// Whether `path` is (or may lead to) a file the configuration reads: the
/// gateway file, a `*.yaml`/`*.yml` under `providers/`, `prompts/` or `retrievers/`, those
/// folders themselves, or the `..`-prefixed entries Kubernetes swaps when it
/// updates a ConfigMap mount. Logs, editor swap files and anything else
/// written into these folders are not.
fn is_input(path: &Path, gateway_file: &Path) -> bool {
    let dir = gateway_file.parent().unwrap_or_else(|| Path::new(""));
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if path == gateway_file || name.starts_with("..") {
        return true;
    }
    let folders = crate::config::config_dirs(gateway_file);
    if path.parent() == Some(dir) && folders.iter().any(|f| f == path) {
        return true;
    }
    crate::config::is_yaml(path) && folders.iter().any(|f| path.starts_with(f))
}

/// SHA-256 over every file the configuration reads (name and content, links
/// followed): the gateway file and the `*.yaml`/`*.yml` files directly in
/// `providers/`, `prompts/` and `retrievers/`.
pub fn input_digest(gateway_file: &Path) -> [u8; 32] {
    input_digest_with(gateway_file, &[])
}

/// [`input_digest`] with `extra` files (the TLS pair) digested too.
fn input_digest_with(gateway_file: &Path, extra: &[PathBuf]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let add = |h: &mut Sha256, p: &Path| {
        h.update(p.as_os_str().as_encoded_bytes());
        h.update([0]);
        match std::fs::read(p) {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            Err(e) => h.update(format!("unreadable: {:?}", e.kind())),
        }
        h.update([0]);
    };
    add(&mut h, gateway_file);
    for dir in crate::config::config_dirs(gateway_file) {
        let files = crate::config::yaml_files(&dir).unwrap_or_default();
        h.update(dir.as_os_str().as_encoded_bytes());
        h.update([1]);
        for f in &files {
            add(&mut h, f);
        }
    }
    for f in extra {
        add(&mut h, f);
    }
    h.finalize().into()
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Published versions are immutable: a version already serving must keep its hash.
fn changed_versions(old: &Snapshot, new: &Snapshot) -> Vec<Problem> {
    let mut out = Vec::new();
    for p in new.prompts.prompts() {
        let Some(prev) = old.prompts.get(&p.id) else {
            continue;
        };
        for v in p.versions.values() {
            if let Some(pv) = prev.versions.get(&v.number) {
                if pv.hash != v.hash {
                    out.push(Problem {
                        file: p.file.display().to_string(),
                        line: Some(v.line),
                        field: format!("versions.{}", v.number),
                        message: format!(
                            "version {} of prompt `{}` changed on disk while serving ({} → {}): published versions are immutable, add a new version instead",
                            v.number, p.id, pv.hash, v.hash
                        ),
                    });
                }
            }
        }
    }
    out
}

impl Reloader {
    pub fn new(gw: Arc<Gateway>, config_path: &Path, env: SharedEnv) -> Arc<Self> {
        let loaded = gw.snapshot().loaded_at;
        gw.metrics.last_reload.set(unix(loaded));
        let tls = tls_files(&gw.snapshot());
        Arc::new(Reloader {
            gw,
            config_path: config_path.to_owned(),
            env,
            status: Mutex::new(ReloadStatus {
                last_success: loaded,
                last_failure: None,
                succeeded: 0,
                failed: 0,
            }),
            running: tokio::sync::Mutex::new(()),
            inputs: Mutex::new(Some(input_digest_with(config_path, &tls))),
            tls_files: Arc::new(Mutex::new(tls)),
        })
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gw
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Builds and validates a new snapshot and swaps it in; on any problem the
    /// current snapshot stays.
    pub async fn reload(&self, trigger: &str) -> Result<(), Vec<Problem>> {
        self.reload_inner(trigger, false).await.unwrap_or(Ok(()))
    }

    /// A reload for a file event: skipped (`None`) when the input files are
    /// byte for byte what the last load read.
    async fn reload_if_changed(&self, trigger: &str) -> Option<Result<(), Vec<Problem>>> {
        self.reload_inner(trigger, true).await
    }

    async fn reload_inner(
        &self,
        trigger: &str,
        only_if_changed: bool,
    ) -> Option<Result<(), Vec<Problem>>> {
        let _one = self.running.lock().await;
        let path = self.config_path.clone();
        let digest_path = path.clone();
        let tls = self
            .tls_files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Taken before the files are read: a change racing the load makes the
        // next event reload again, never the reverse.
        let digest = tokio::task::spawn_blocking(move || input_digest_with(&digest_path, &tls))
            .await
            .ok();
        {
            let mut last = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
            if only_if_changed && digest.is_some() && *last == digest {
                tracing::debug!(trigger, "configuration files unchanged; no reload");
                return None;
            }
            *last = digest;
        }
        let env = self.env.clone();
        let book = self.gw.book().clone();
        let built = tokio::task::spawn_blocking(move || {
            let cfg = crate::config::load(&path)?;
            Snapshot::build(cfg, &|k: &str| env(k), &book)
        })
        .await
        .unwrap_or_else(|e| {
            Err(vec![Problem {
                file: self.config_path.display().to_string(),
                line: None,
                field: String::new(),
                message: format!("reload task failed: {e}"),
            }])
        });
        let result = built.and_then(|next| {
            let changed = changed_versions(&self.gw.snapshot(), &next);
            if changed.is_empty() {
                Ok(next)
            } else {
                Err(changed)
            }
        });
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(next) => {
                let at = next.loaded_at;
                {
                    let now = &self.gw.snapshot().config;
                    if now.tracing != next.config.tracing
                        || now.log_format != next.config.log_format
                    {
                        tracing::warn!("`tracing` and `log_format` are read at start: the running process keeps its own until it restarts");
                    }
                }
                *self.tls_files.lock().unwrap_or_else(|e| e.into_inner()) = tls_files(&next);
                self.gw.swap(next);
                self.gw.readiness.config_loaded();
                status.last_success = at;
                status.succeeded += 1;
                self.gw.metrics.reload(true);
                self.gw.metrics.last_reload.set(unix(at));
                tracing::info!(trigger, "configuration reloaded");
                Some(Ok(()))
            }
            Err(problems) => {
                for p in &problems {
                    tracing::error!(trigger, problem = %p, "configuration reload rejected; the last good configuration keeps serving");
                }
                self.gw.readiness.config_failed(&problems);
                status.failed += 1;
                status.last_failure = Some(FailedReload {
                    at: SystemTime::now(),
                    trigger: trigger.to_owned(),
                    problems: problems.clone(),
                });
                self.gw.metrics.reload(false);
                Some(Err(problems))
            }
        }
    }

    /// Watches the gateway file's folder, `providers/` and `prompts/` for changes
    /// to the files the configuration reads (see [`is_input`]), and reloads once
    /// they have been quiet for `debounce` (at most 20 × `debounce` after the
    /// first change) and only if those files changed. The returned watcher must
    /// be kept alive.
    pub fn watch(
        self: &Arc<Self>,
        debounce: Duration,
    ) -> notify::Result<notify::RecommendedWatcher> {
        use notify::{EventKind, RecursiveMode, Watcher};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        // Absolute, so that it compares equal to the paths events carry (a
        // relative `promptgate.yaml` is watched as `./promptgate.yaml`).
        let gateway_file =
            std::path::absolute(&self.config_path).unwrap_or_else(|_| self.config_path.clone());
        let file = gateway_file.clone();
        let tls = self.tls_files.clone();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if let Ok(ev) = res {
                    // Reading the files (ours included) must not trigger a reload.
                    let relevant = !matches!(
                        ev.kind,
                        EventKind::Access(_)
                            | EventKind::Modify(notify::event::ModifyKind::Metadata(_))
                    ) && ev.paths.iter().any(|p| {
                        is_input(p, &file)
                            || tls.lock().unwrap_or_else(|e| e.into_inner()).contains(p)
                    });
                    if relevant {
                        let _ = tx.send(());
                    }
                }
            })?;
        let dir = gateway_file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."))
            .to_owned();
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        for p in crate::config::config_dirs(&gateway_file) {
            if p.is_dir() {
                watcher.watch(&p, RecursiveMode::Recursive)?;
            }
        }
        // The folders of the TLS files, where they live elsewhere.
        let tls_dirs: std::collections::BTreeSet<PathBuf> = self
            .tls_files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|f| f.parent().map(Path::to_owned))
            .filter(|d| *d != dir)
            .collect();
        for d in tls_dirs {
            watcher.watch(&d, RecursiveMode::NonRecursive)?;
        }
        let this = self.clone();
        crate::task::spawn("reload-watcher", async move {
            while rx.recv().await.is_some() {
                // Wait for the burst of events of one save to settle, but not
                // forever under a steady trickle.
                let until = tokio::time::Instant::now() + debounce.saturating_mul(20);
                loop {
                    let quiet = (tokio::time::Instant::now() + debounce).min(until);
                    match tokio::time::timeout_at(quiet, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let _ = this.reload_if_changed("file change").await;
            }
        });
        Ok(watcher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_files_the_config_reads_are_inputs() {
        let g = Path::new("/etc/pg/promptgate.yaml");
        for p in [
            "/etc/pg/promptgate.yaml",
            "/etc/pg/providers/openai.yaml",
            "/etc/pg/prompts/greeting.yml",
            "/etc/pg/prompts",
            "/etc/pg/..data",
            "/etc/pg/prompts/..data_tmp",
            "/etc/pg/prompts/..2024_01_01/greeting.yaml",
            "/etc/pg/retrievers/policies.yaml",
            "/etc/pg/retrievers",
        ] {
            assert!(is_input(Path::new(p), g), "{p}");
        }
        for p in [
            "/etc/pg/promptgate.log",
            "/etc/pg/other.yaml",
            "/etc/pg/prompts/notes.txt",
            "/etc/pg/prompts/.greeting.yaml.swp",
            "/etc/pg/providers/access.log",
            "/etc/pg/logs/x.yaml",
            // An index an ingest writes is no configuration input.
            "/etc/pg/index/policies.db",
            "/etc/pg/retrievers/policies.db-wal",
        ] {
            assert!(!is_input(Path::new(p), g), "{p}");
        }
    }
}
