//! Hot reload. A reload reads and validates the whole configuration (gateway file,
//! providers, prompts) into a new snapshot off the request path, checks that no
//! published prompt version changed, and swaps it in atomically. If anything is
//! wrong nothing changes: the last good snapshot keeps serving and the problems
//! are logged, counted and kept for `GET /admin/status`. Triggers: file changes
//! (notify, debounced; editors' write-then-rename saves and Kubernetes ConfigMap
//! symlink swaps both show up as events in the watched folders), SIGHUP, and
//! `POST /admin/reload`. The listen address and limits are read at start only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::config::Problem;
use crate::gateway::Gateway;
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
        let _one = self.running.lock().await;
        let path = self.config_path.clone();
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
                self.gw.swap(next);
                status.last_success = at;
                status.succeeded += 1;
                self.gw.metrics.reloads.with_label_values(&["ok"]).inc();
                self.gw.metrics.last_reload.set(unix(at));
                tracing::info!(trigger, "configuration reloaded");
                Ok(())
            }
            Err(problems) => {
                for p in &problems {
                    tracing::error!(trigger, problem = %p, "configuration reload rejected; the last good configuration keeps serving");
                }
                status.failed += 1;
                status.last_failure = Some(FailedReload {
                    at: SystemTime::now(),
                    trigger: trigger.to_owned(),
                    problems: problems.clone(),
                });
                self.gw.metrics.reloads.with_label_values(&["error"]).inc();
                Err(problems)
            }
        }
    }

    /// Watches the gateway file's folder, `providers/` and `prompts/`, and reloads
    /// once changes have been quiet for `debounce`. The returned watcher must be
    /// kept alive.
    pub fn watch(
        self: &Arc<Self>,
        debounce: Duration,
    ) -> notify::Result<notify::RecommendedWatcher> {
        use notify::{EventKind, RecursiveMode, Watcher};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if let Ok(ev) = res {
                    // Reading the files (ours included) must not trigger a reload.
                    let relevant = !matches!(
                        ev.kind,
                        EventKind::Access(_)
                            | EventKind::Modify(notify::event::ModifyKind::Metadata(_))
                    );
                    if relevant {
                        let _ = tx.send(());
                    }
                }
            })?;
        let dir = self
            .config_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."))
            .to_owned();
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        for sub in ["providers", "prompts"] {
            let p = dir.join(sub);
            if p.is_dir() {
                watcher.watch(&p, RecursiveMode::Recursive)?;
            }
        }
        let this = self.clone();
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // Wait for the burst of events of one save to settle.
                loop {
                    match tokio::time::timeout(debounce, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let _ = this.reload("file change").await;
            }
        });
        Ok(watcher)
    }
}
