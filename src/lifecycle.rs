//! Readiness: whether this process should be sent new traffic, as `GET /readyz`
//! (and `/admin/status`) report it. Liveness (`/healthz`) is another question:
//! a process that is draining or holds an invalid configuration on disk is
//! alive and serving, only not ready.
//!
//! Two things make a process unready: a shutdown has begun (`draining`, set
//! the moment the signal arrives and never cleared), or the configuration on
//! disk fails to load (the last reload attempt failed and no later one
//! succeeded; the last good snapshot keeps serving meanwhile). A load balancer
//! or Kubernetes takes an unready replica out of rotation; with a broken
//! configuration on every replica, each one keeps serving its last good one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::config::Problem;

pub struct Readiness {
    draining: AtomicBool,
    /// The problems of the configuration on disk, while its last reload
    /// failed; `None` once a load succeeded.
    invalid: Mutex<Option<Vec<String>>>,
    /// `limits.fail_readiness_on_invalid_config`: whether those problems make
    /// the process unready, or are only reported.
    fail_on_invalid: bool,
}

impl Readiness {
    pub fn new(fail_on_invalid: bool) -> Self {
        Readiness {
            draining: AtomicBool::new(false),
            invalid: Mutex::new(None),
            fail_on_invalid,
        }
    }

    /// A shutdown began: readiness fails from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// A reload was refused: the configuration on disk is invalid.
    pub fn config_failed(&self, problems: &[Problem]) {
        let list = problems.iter().map(ToString::to_string).collect();
        *self.invalid.lock().unwrap_or_else(|e| e.into_inner()) = Some(list);
    }

    /// A configuration was loaded: what is on disk serves.
    pub fn config_loaded(&self) {
        *self.invalid.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether the process is ready, and the body `/readyz` answers:
    /// `{"status":"ready"}`, `{"status":"draining"}`, or
    /// `{"status":"config_invalid","problems":[..]}` (draining wins when both);
    /// with `fail_on_invalid` off, `{"status":"ready","config":"invalid",
    /// "problems":[..]}` instead of the last.
    pub fn report(&self) -> (bool, Value) {
        if self.draining() {
            return (false, json!({"status": "draining"}));
        }
        match &*self.invalid.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(problems) if self.fail_on_invalid => (
                false,
                json!({"status": "config_invalid", "problems": problems}),
            ),
            Some(problems) => (
                true,
                json!({"status": "ready", "config": "invalid", "problems": problems}),
            ),
            None => (true, json!({"status": "ready"})),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem() -> Problem {
        Problem {
            file: "promptgate.yaml".into(),
            line: Some(3),
            field: "routes.x".into(),
            message: "unknown provider".into(),
        }
    }

    #[test]
    fn readiness_follows_reloads_and_draining_wins() {
        let r = Readiness::new(true);
        assert_eq!(r.report(), (true, json!({"status": "ready"})));
        r.config_failed(&[problem()]);
        let (ready, body) = r.report();
        assert!(!ready);
        assert_eq!(body["status"], "config_invalid");
        assert_eq!(body["problems"][0], problem().to_string());
        r.config_loaded();
        assert!(r.report().0);
        r.config_failed(&[problem()]);
        r.start_draining();
        assert_eq!(r.report(), (false, json!({"status": "draining"})));
        // Draining is for good.
        r.config_loaded();
        assert_eq!(r.report(), (false, json!({"status": "draining"})));
    }

    #[test]
    fn an_invalid_configuration_can_be_reported_without_failing() {
        let r = Readiness::new(false);
        r.config_failed(&[problem()]);
        let (ready, body) = r.report();
        assert!(ready);
        assert_eq!(body["status"], "ready");
        assert_eq!(body["config"], "invalid");
        assert_eq!(body["problems"][0], problem().to_string());
        r.start_draining();
        assert_eq!(r.report(), (false, json!({"status": "draining"})));
    }
}
