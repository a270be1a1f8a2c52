//! Routing state that outlives a config snapshot: per-target health (circuit
//! breaker and recent error rate), per-arm experiment statistics, and drill
//! faults injected by operators, kept in the [`Book`]. Also the sticky arm
//! assignment's hash. Nothing here routes: the fallback loop is
//! `pipeline::attempt::run_chain`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::config::BreakerConfig;
use crate::error::{ErrorKind, UpstreamError};
use crate::ids::{ProviderId, TargetId};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === circuit breaker ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

#[derive(Debug)]
struct HealthState {
    state: BreakerState,
    /// When the breaker last opened; it stays open for the *current* config's
    /// cooldown from then (a reload that shortens the cooldown applies at once).
    opened_at: Option<Instant>,
    consecutive_failures: u32,
    probes_in_flight: u32,
    /// Bumped whenever the probe count starts over (a new half-open period, a
    /// reset): a probe admitted in an earlier period releases nothing.
    epoch: u64,
    /// (time, failed) of recent calls, for the failure rate.
    recent: VecDeque<(Instant, bool)>,
}

/// One target's health: its breaker and recent outcomes.
#[derive(Debug)]
pub struct Health {
    inner: Mutex<HealthState>,
}

/// Failures that say the target is unhealthy (not the request's fault).
pub fn counts_against_target(kind: ErrorKind) -> bool {
    kind.retryable()
}

impl Default for Health {
    fn default() -> Self {
        Health {
            inner: Mutex::new(HealthState {
                state: BreakerState::Closed,
                opened_at: None,
                consecutive_failures: 0,
                probes_in_flight: 0,
                epoch: 0,
                recent: VecDeque::new(),
            }),
        }
    }
}

/// Permission to call a target, from [`Health::admit`]. A half-open probe holds
/// one of the breaker's probe slots; the slot is given back when the pass is
/// dropped without an outcome (the request was cancelled by a client disconnect
/// or a deadline, or gave up before calling), so a lost probe never keeps the
/// breaker from probing again.
#[must_use]
pub struct Pass<'a> {
    health: &'a Health,
    /// The half-open period this probe belongs to, if it is a probe.
    probe: Option<u64>,
}

impl Pass<'_> {
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }

    /// Records the call's outcome; returns the breaker state after it.
    pub fn record(mut self, cfg: &BreakerConfig, failed: bool) -> BreakerState {
        let probe = self.probe.take();
        self.health.record_inner(cfg, failed, probe)
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if let Some(epoch) = self.probe.take() {
            let mut s = lock(&self.health.inner);
            if s.epoch == epoch {
                s.probes_in_flight = s.probes_in_flight.saturating_sub(1);
            }
        }
    }
}

impl HealthState {
    /// Open → half-open once the cooldown has passed.
    fn cool_down(&mut self, cfg: &BreakerConfig, now: Instant) {
        if self.state == BreakerState::Open
            && self
                .opened_at
                .is_none_or(|t| now.saturating_duration_since(t) >= cfg.cooldown)
        {
            self.state = BreakerState::HalfOpen;
            self.probes_in_flight = 0;
            self.epoch = self.epoch.wrapping_add(1);
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = BreakerState::Open;
        self.opened_at = Some(now);
    }
}

impl Health {
    /// Asks to call the target: `None` while the breaker is open or every
    /// half-open probe slot is taken.
    pub fn admit(&self, cfg: &BreakerConfig) -> Option<Pass<'_>> {
        let mut s = lock(&self.inner);
        s.cool_down(cfg, Instant::now());
        match s.state {
            BreakerState::Closed => Some(Pass {
                health: self,
                probe: None,
            }),
            BreakerState::HalfOpen if s.probes_in_flight < cfg.half_open_probes => {
                s.probes_in_flight += 1;
                Some(Pass {
                    health: self,
                    probe: Some(s.epoch),
                })
            }
            _ => None,
        }
    }

    /// Records an outcome that was not admitted by [`Health::admit`] (an active
    /// health check); returns the state after it.
    pub fn record(&self, cfg: &BreakerConfig, failed: bool) -> BreakerState {
        self.record_inner(cfg, failed, None)
    }

    /// Forgets everything: closed, no recent calls, no probes (those in flight
    /// release nothing when they end).
    pub fn reset(&self) {
        let mut s = lock(&self.inner);
        s.state = BreakerState::Closed;
        s.opened_at = None;
        s.consecutive_failures = 0;
        s.probes_in_flight = 0;
        s.epoch = s.epoch.wrapping_add(1);
        s.recent.clear();
    }

    fn record_inner(&self, cfg: &BreakerConfig, failed: bool, probe: Option<u64>) -> BreakerState {
        let mut s = lock(&self.inner);
        let now = Instant::now();
        s.recent.push_back((now, failed));
        while s
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > cfg.window)
        {
            s.recent.pop_front();
        }
        while s.recent.len() > 10_000 {
            s.recent.pop_front();
        }
        // A probe of the current half-open period decides it; one admitted in an
        // earlier period (or before a reset) only counts as a recent call.
        let current_probe = probe.is_some_and(|e| e == s.epoch);
        if current_probe {
            s.probes_in_flight = s.probes_in_flight.saturating_sub(1);
        }
        if failed {
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        } else {
            s.consecutive_failures = 0;
        }
        match s.state {
            BreakerState::HalfOpen if current_probe || !failed => {
                if failed {
                    s.open(now);
                } else {
                    s.state = BreakerState::Closed;
                    s.recent.clear();
                }
            }
            BreakerState::Closed if failed => {
                let n = s.recent.len() as u32;
                let bad = s.recent.iter().filter(|(_, f)| *f).count() as f64;
                let rate_trip =
                    n >= cfg.min_requests.max(1) && bad / f64::from(n) >= cfg.failure_rate;
                if s.consecutive_failures >= cfg.consecutive_failures || rate_trip {
                    s.open(now);
                }
            }
            _ => {}
        }
        s.state
    }

    /// (state, error rate over the window, calls in the window).
    pub fn summary(&self, cfg: &BreakerConfig) -> (BreakerState, f64, usize) {
        let mut s = lock(&self.inner);
        let now = Instant::now();
        s.cool_down(cfg, now);
        while s
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > cfg.window)
        {
            s.recent.pop_front();
        }
        let n = s.recent.len();
        let bad = s.recent.iter().filter(|(_, f)| *f).count();
        (s.state, if n == 0 { 0.0 } else { bad as f64 / n as f64 }, n)
    }
}

// === experiments ===

/// Running figures of one split arm, for `GET /admin/experiments`.
#[derive(Debug, Default)]
pub struct ArmStats {
    inner: Mutex<ArmInner>,
}

#[derive(Debug, Default)]
struct ArmInner {
    requests: u64,
    errors: u64,
    tokens: u64,
    /// The summed cost of the arm's answers whose target has a price.
    cost: f64,
    /// The most recent latencies, seconds.
    latencies: VecDeque<f64>,
}

impl ArmStats {
    /// A request of the arm ended (its response body, a stream's too).
    pub fn record(&self, ok: bool, latency: Duration) {
        let mut s = lock(&self.inner);
        s.requests += 1;
        if !ok {
            s.errors += 1;
        }
        s.latencies.push_back(latency.as_secs_f64());
        if s.latencies.len() > 2048 {
            s.latencies.pop_front();
        }
    }

    /// An upstream answer's tokens and, when its target has a price, its
    /// cost (in `spend.currency`); the request is recorded apart, when its
    /// response ends.
    pub fn answered(&self, tokens: u64, cost: Option<f64>) {
        let mut s = lock(&self.inner);
        s.tokens = s.tokens.saturating_add(tokens);
        if let Some(c) = cost.filter(|c| c.is_finite() && *c > 0.0) {
            s.cost += c;
        }
    }

    /// (total tokens, total cost) of the arm's answers so far.
    pub fn totals(&self) -> (u64, f64) {
        let s = lock(&self.inner);
        (s.tokens, s.cost)
    }

    /// (requests, errors, p50, p95, mean tokens per request).
    pub fn summary(&self) -> (u64, u64, f64, f64, f64) {
        let s = lock(&self.inner);
        let mut l: Vec<f64> = s.latencies.iter().copied().collect();
        l.sort_by(f64::total_cmp);
        let q = |p: f64| {
            if l.is_empty() {
                0.0
            } else {
                l[((l.len() - 1) as f64 * p).round() as usize]
            }
        };
        let mean = if s.requests == 0 {
            0.0
        } else {
            s.tokens as f64 / s.requests as f64
        };
        (s.requests, s.errors, q(0.5), q(0.95), mean)
    }
}

/// Sticky assignment: a stable hash of route and subject, mapped to [0, 1).
pub fn unit_interval(route: &str, subject: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in route
        .bytes()
        .chain(std::iter::once(0))
        .chain(subject.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Finalize (FNV's low bits mix poorly).
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

// === drills ===

#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    /// Connections refused.
    Down,
    /// Every call answers this HTTP status.
    Error(u16),
    /// Added latency before the call.
    Slow(Duration),
    /// Response headers never come.
    Stall,
    RateLimited,
    /// Streams are cut after this many chunks (0: before the first token).
    StreamCut(usize),
    /// HTTP 200 with an error in the body.
    ErrorIn200,
    /// The provider takes no traffic (drain / disable).
    Disabled,
}

impl FaultKind {
    pub fn describe(&self) -> String {
        match self {
            FaultKind::Down => "down".into(),
            FaultKind::Error(s) => format!("error {s}"),
            FaultKind::Slow(d) => format!("slow {}", humantime::format_duration(*d)),
            FaultKind::Stall => "stall".into(),
            FaultKind::RateLimited => "rate_limited".into(),
            FaultKind::StreamCut(n) => format!("stream_cut after {n}"),
            FaultKind::ErrorIn200 => "error_in_200".into(),
            FaultKind::Disabled => "disabled".into(),
        }
    }

    /// The failure the fault produces instead of calling the backend, if any.
    pub fn failure(&self) -> Option<UpstreamError> {
        let e = |k, m: &str| Some(UpstreamError::new(k, format!("drill: {m}")));
        match self {
            FaultKind::Down => e(ErrorKind::Connect, "provider is down (connection refused)"),
            FaultKind::Error(s) => Some(
                UpstreamError::new(
                    ErrorKind::from_status(*s),
                    format!("drill: provider answers HTTP {s}"),
                )
                .with_status(*s),
            ),
            FaultKind::RateLimited => {
                let mut u =
                    UpstreamError::new(ErrorKind::RateLimited, "drill: provider is rate limited")
                        .with_status(429);
                u.retry_after = Some(Duration::from_secs(1));
                Some(u)
            }
            FaultKind::ErrorIn200 => e(
                ErrorKind::Overloaded,
                "provider answered 200 with an error body",
            ),
            FaultKind::Slow(_)
            | FaultKind::Stall
            | FaultKind::StreamCut(_)
            | FaultKind::Disabled => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    pub until: Instant,
    pub until_wall: std::time::SystemTime,
}

/// State shared by every snapshot of a gateway: health, experiment figures and
/// faults survive reloads.
#[derive(Default)]
pub struct Book {
    /// Per target id: the fingerprint of the target's config and its health.
    health: Mutex<HashMap<TargetId, (u64, Arc<Health>)>>,
    arms: Mutex<HashMap<String, Arc<ArmStats>>>,
    faults: ArcSwap<HashMap<ProviderId, Fault>>,
}

impl Book {
    /// The health of a target. `fingerprint` summarises the target's config
    /// (provider settings, model, overrides): a reload that keeps it keeps the
    /// breaker; one that changes it starts the target over with a closed breaker,
    /// since the old failures say nothing about the new backend.
    pub fn health(&self, target: &TargetId, fingerprint: u64) -> Arc<Health> {
        let mut map = lock(&self.health);
        match map.get(target) {
            Some((f, h)) if *f == fingerprint => h.clone(),
            _ => {
                let h = Arc::new(Health::default());
                map.insert(target.clone(), (fingerprint, h.clone()));
                h
            }
        }
    }

    /// Resets the breakers of every target of `provider` (ids `provider/model`);
    /// returns the ids reset.
    pub fn reset_provider(&self, provider: &str) -> Vec<TargetId> {
        let map = lock(&self.health);
        let mut ids = Vec::new();
        for (id, (_, h)) in map.iter() {
            if id.split_once('/').is_some_and(|(p, _)| p == provider) {
                h.reset();
                ids.push(id.clone());
            }
        }
        ids
    }

    pub fn arm(&self, route: &str, arm: &str) -> Arc<ArmStats> {
        lock(&self.arms)
            .entry(arm_key(route, arm))
            .or_default()
            .clone()
    }

    /// Forgets the health of targets and the statistics of arms a new snapshot
    /// no longer has (`keep_target(id)`, `keep_arm(route, arm)`): without this
    /// every target ever configured would stay in the book across reloads.
    /// Snapshots still serving requests hold their own references.
    pub fn prune(&self, keep_target: impl Fn(&str) -> bool, keep_arm: impl Fn(&str, &str) -> bool) {
        lock(&self.health).retain(|id, _| keep_target(id));
        lock(&self.arms).retain(|key, _| {
            let (route, arm) = key.split_once('\u{0}').unwrap_or((key.as_str(), ""));
            keep_arm(route, arm)
        });
    }

    /// The target ids and arms (`route/arm`) the book tracks, sorted.
    pub fn tracked(&self) -> (Vec<String>, Vec<String>) {
        let mut targets: Vec<String> = lock(&self.health).keys().map(|k| k.to_string()).collect();
        let mut arms: Vec<String> = lock(&self.arms)
            .keys()
            .map(|k| k.replacen('\u{0}', "/", 1))
            .collect();
        targets.sort();
        arms.sort();
        (targets, arms)
    }

    /// The active fault of a provider (lock-free read on the hot path).
    pub fn fault(&self, provider: &str) -> Option<Fault> {
        let map = self.faults.load();
        if map.is_empty() {
            return None;
        }
        map.get(provider)
            .filter(|f| Instant::now() < f.until)
            .cloned()
    }

    pub fn set_fault(&self, provider: &str, kind: FaultKind, duration: Duration) {
        let mut map: HashMap<ProviderId, Fault> = (**self.faults.load()).clone();
        map.retain(|_, f| Instant::now() < f.until);
        map.insert(
            ProviderId::from(provider),
            Fault {
                kind,
                until: Instant::now() + duration,
                until_wall: std::time::SystemTime::now() + duration,
            },
        );
        self.faults.store(Arc::new(map));
    }

    pub fn clear_fault(&self, provider: &str) -> bool {
        let mut map: HashMap<ProviderId, Fault> = (**self.faults.load()).clone();
        let had = map
            .remove(provider)
            .is_some_and(|f| Instant::now() < f.until);
        self.faults.store(Arc::new(map));
        had
    }

    pub fn active_faults(&self) -> Vec<(String, Fault)> {
        let now = Instant::now();
        let mut v: Vec<(String, Fault)> = self
            .faults
            .load()
            .iter()
            .filter(|(_, f)| now < f.until)
            .map(|(k, f)| (k.to_string(), f.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

fn arm_key(route: &str, arm: &str) -> String {
    format!("{route}\u{0}{arm}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_is_sticky_and_proportional() {
        assert_eq!(unit_interval("r", "alice"), unit_interval("r", "alice"));
        assert_ne!(unit_interval("r", "alice"), unit_interval("other", "alice"));
        let n = 10_000;
        let below: usize = (0..n)
            .filter(|i| unit_interval("route", &format!("user-{i}")) < 0.1)
            .count();
        // 10% ± 1.5 points over 10,000 subjects.
        assert!((850..=1150).contains(&below), "{below}");
    }

    fn quick() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 1.0,
            min_requests: 100,
            window: Duration::from_secs(10),
            cooldown: Duration::from_millis(50),
            half_open_probes: 1,
        }
    }

    /// Trips the breaker and lets the cooldown pass (paused clock).
    async fn half_open(h: &Health, cfg: &BreakerConfig) {
        for _ in 0..cfg.consecutive_failures {
            h.record(cfg, true);
        }
        assert_eq!(h.summary(cfg).0, BreakerState::Open);
        tokio::time::advance(cfg.cooldown).await;
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_half_opens_and_closes() {
        let cfg = quick();
        let h = Health::default();
        for _ in 0..2 {
            let pass = h.admit(&cfg).expect("closed");
            assert!(!pass.is_probe());
            assert_eq!(pass.record(&cfg, true), BreakerState::Closed);
        }
        assert_eq!(h.record(&cfg, true), BreakerState::Open);
        assert!(h.admit(&cfg).is_none());
        tokio::time::advance(Duration::from_millis(60)).await;
        let probe = h.admit(&cfg).expect("a probe after the cooldown");
        assert!(probe.is_probe());
        assert!(h.admit(&cfg).is_none(), "one probe at a time");
        assert_eq!(
            probe.record(&cfg, true),
            BreakerState::Open,
            "a failed probe reopens"
        );
        tokio::time::advance(Duration::from_millis(60)).await;
        let probe = h.admit(&cfg).expect("probe");
        assert_eq!(probe.record(&cfg, false), BreakerState::Closed);
        assert!(h.admit(&cfg).is_some_and(|p| !p.is_probe()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_gives_its_slot_back() {
        let cfg = quick();
        let h = Health::default();
        half_open(&h, &cfg).await;
        // A probe attempt, cancelled mid-flight: the future holding the pass is
        // dropped before it records anything.
        let attempt = async {
            let _pass = h.admit(&cfg).expect("probe");
            std::future::pending::<()>().await;
        };
        let mut attempt = Box::pin(attempt);
        assert!(futures_util::FutureExt::now_or_never(&mut attempt).is_none());
        assert!(h.admit(&cfg).is_none(), "the slot is taken while it runs");
        drop(attempt);
        assert_eq!(h.summary(&cfg).0, BreakerState::HalfOpen);
        let probe = h.admit(&cfg).expect("the slot came back");
        assert_eq!(probe.record(&cfg, false), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_probe_releases_nothing_of_a_later_period() {
        let cfg = BreakerConfig {
            half_open_probes: 2,
            ..quick()
        };
        let h = Health::default();
        half_open(&h, &cfg).await;
        let slow = h.admit(&cfg).expect("probe 1");
        let failing = h.admit(&cfg).expect("probe 2");
        assert_eq!(failing.record(&cfg, true), BreakerState::Open);
        tokio::time::advance(cfg.cooldown).await;
        // New half-open period: two fresh slots, both taken.
        let (a, b) = (h.admit(&cfg).expect("a"), h.admit(&cfg).expect("b"));
        assert!(h.admit(&cfg).is_none());
        drop(slow);
        assert!(h.admit(&cfg).is_none(), "the old probe freed no new slot");
        drop((a, b));
        assert!(h.admit(&cfg).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn reset_closes_and_cooldown_follows_the_current_config() {
        let cfg = quick();
        let h = Health::default();
        half_open(&h, &cfg).await;
        let probe = h.admit(&cfg).expect("probe");
        h.reset();
        assert_eq!(h.summary(&cfg).0, BreakerState::Closed);
        drop(probe);
        // A long cooldown shortened by a reload applies to a breaker already open.
        let long = BreakerConfig {
            cooldown: Duration::from_secs(3600),
            ..cfg
        };
        for _ in 0..3 {
            h.record(&long, true);
        }
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(h.admit(&long).is_none());
        assert!(h.admit(&cfg).is_some_and(|p| p.is_probe()));
    }

    #[test]
    fn book_keeps_health_only_while_the_target_config_is_the_same() {
        let book = Book::default();
        let pm = TargetId::from("p/m");
        let a = book.health(&pm, 1);
        assert!(Arc::ptr_eq(&a, &book.health(&pm, 1)));
        let b = book.health(&pm, 2);
        assert!(!Arc::ptr_eq(&a, &b), "a changed target starts over");
        let cfg = quick();
        for _ in 0..3 {
            b.record(&cfg, true);
        }
        let other = book.health(&TargetId::from("q/m"), 1);
        for _ in 0..3 {
            other.record(&cfg, true);
        }
        assert_eq!(book.reset_provider("p"), vec![pm]);
        assert_eq!(b.summary(&cfg).0, BreakerState::Closed);
        assert_eq!(other.summary(&cfg).0, BreakerState::Open);
    }

    #[test]
    fn failure_rate_trips_the_breaker() {
        let cfg = BreakerConfig {
            consecutive_failures: 100,
            failure_rate: 0.5,
            min_requests: 4,
            ..BreakerConfig::default()
        };
        let h = Health::default();
        h.record(&cfg, false);
        h.record(&cfg, true);
        h.record(&cfg, false);
        assert_eq!(h.record(&cfg, true), BreakerState::Open);
    }
}
