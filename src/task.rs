//! Background tasks. Every task the gateway starts goes through [`spawn`]: it has
//! a name, runs inside a (debug-level) tracing span carrying that name, and a panic in it is
//! logged and counted instead of vanishing with a dropped `JoinHandle`.
//! `clippy.toml` forbids calling `tokio::spawn` anywhere else.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::FutureExt;
use tokio::task::JoinHandle;
use tracing::Instrument;

static PANICS: AtomicU64 = AtomicU64::new(0);

/// Background tasks that panicked since the process started.
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// Starts `fut` on the runtime as the task `name`. The handle behaves like
/// tokio's: awaiting it yields the output, or the panic as a `JoinError`.
pub fn spawn<F>(name: &'static str, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let supervised = async move {
        match AssertUnwindSafe(fut).catch_unwind().await {
            Ok(out) => out,
            Err(panic) => {
                PANICS.fetch_add(1, Ordering::Relaxed);
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-text panic".into());
                tracing::error!(task = name, panic = %crate::server::LogSafe(&what), "background task panicked");
                std::panic::resume_unwind(panic)
            }
        }
    };
    // A debug span: disabled at the default log level, so a connection task's
    // every poll does not enter a span (an enabled span costs a lock per enter).
    #[allow(clippy::disallowed_methods)] // the one place tasks are started
    tokio::spawn(supervised.instrument(tracing::debug_span!("task", name)))
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_panicking_task_is_counted_and_its_handle_reports_it() {
        let before = super::panics();
        let ok = super::spawn("test-ok", async { 7 }).await;
        assert_eq!(ok.ok(), Some(7));
        let failed = super::spawn("test-panic", async move {
            if before < u64::MAX {
                panic!("boom");
            }
        })
        .await;
        assert!(failed.is_err_and(|e| e.is_panic()));
        assert!(super::panics() > before);
    }
}
