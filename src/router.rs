//! Routing state that outlives a config snapshot: per-target health (circuit
//! breaker and recent error rate), per-arm experiment statistics, and drill
//! faults injected by operators. Also the sticky arm assignment. The fallback
//! loop itself is `Gateway::chat` (one loop for streaming and non-streaming).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::config::BreakerConfig;
use crate::error::{ErrorKind, UpstreamError};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Half-open: this call is one of the limited probes.
    Probe,
    Rejected,
}

#[derive(Debug)]
struct HealthState {
    state: BreakerState,
    open_until: Option<Instant>,
    consecutive_failures: u32,
    probes_in_flight: u32,
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
                open_until: None,
                consecutive_failures: 0,
                probes_in_flight: 0,
                recent: VecDeque::new(),
            }),
        }
    }
}

impl Health {
    pub fn admit(&self, cfg: &BreakerConfig) -> Admission {
        let mut s = lock(&self.inner);
        let now = Instant::now();
        if s.state == BreakerState::Open {
            match s.open_until {
                Some(t) if now < t => return Admission::Rejected,
                _ => {
                    s.state = BreakerState::HalfOpen;
                    s.probes_in_flight = 0;
                }
            }
        }
        match s.state {
            BreakerState::Closed => Admission::Allowed,
            BreakerState::HalfOpen if s.probes_in_flight < cfg.half_open_probes => {
                s.probes_in_flight += 1;
                Admission::Probe
            }
            _ => Admission::Rejected,
        }
    }

    /// Records an outcome; returns the state after it.
    pub fn record(&self, cfg: &BreakerConfig, failed: bool, probe: bool) -> BreakerState {
        let mut s = lock(&self.inner);
        let now = Instant::now();
        s.recent.push_back((now, failed));
        while s
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > cfg.window)
        {
            s.recent.pop_front();
        }
        while s.recent.len() > 10_000 {
            s.recent.pop_front();
        }
        if probe {
            s.probes_in_flight = s.probes_in_flight.saturating_sub(1);
        }
        if failed {
            s.consecutive_failures += 1;
        } else {
            s.consecutive_failures = 0;
        }
        match s.state {
            BreakerState::HalfOpen if probe || !failed => {
                if failed {
                    s.state = BreakerState::Open;
                    s.open_until = Some(now + cfg.cooldown);
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
                    s.state = BreakerState::Open;
                    s.open_until = Some(now + cfg.cooldown);
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
        if s.state == BreakerState::Open && s.open_until.is_some_and(|t| now >= t) {
            s.state = BreakerState::HalfOpen;
            s.probes_in_flight = 0;
        }
        while s
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > cfg.window)
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
    /// The most recent latencies, seconds.
    latencies: VecDeque<f64>,
}

impl ArmStats {
    pub fn record(&self, ok: bool, latency: Duration, tokens: u64) {
        let mut s = lock(&self.inner);
        s.requests += 1;
        if !ok {
            s.errors += 1;
        }
        s.tokens += tokens;
        s.latencies.push_back(latency.as_secs_f64());
        if s.latencies.len() > 2048 {
            s.latencies.pop_front();
        }
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
    health: Mutex<HashMap<String, Arc<Health>>>,
    arms: Mutex<HashMap<String, Arc<ArmStats>>>,
    faults: ArcSwap<HashMap<String, Fault>>,
}

impl Book {
    pub fn health(&self, target: &str) -> Arc<Health> {
        lock(&self.health)
            .entry(target.to_owned())
            .or_default()
            .clone()
    }

    pub fn arm(&self, route: &str, arm: &str) -> Arc<ArmStats> {
        lock(&self.arms)
            .entry(format!("{route}\u{0}{arm}"))
            .or_default()
            .clone()
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
        let mut map: HashMap<String, Fault> = (**self.faults.load()).clone();
        map.retain(|_, f| Instant::now() < f.until);
        map.insert(
            provider.to_owned(),
            Fault {
                kind,
                until: Instant::now() + duration,
                until_wall: std::time::SystemTime::now() + duration,
            },
        );
        self.faults.store(Arc::new(map));
    }

    pub fn clear_fault(&self, provider: &str) -> bool {
        let mut map: HashMap<String, Fault> = (**self.faults.load()).clone();
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
            .map(|(k, f)| (k.clone(), f.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
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

    #[tokio::test]
    async fn breaker_opens_half_opens_and_closes() {
        let cfg = BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 1.0,
            min_requests: 100,
            window: Duration::from_secs(10),
            cooldown: Duration::from_millis(50),
            half_open_probes: 1,
        };
        let h = Health::default();
        for _ in 0..2 {
            assert_eq!(h.admit(&cfg), Admission::Allowed);
            assert_eq!(h.record(&cfg, true, false), BreakerState::Closed);
        }
        assert_eq!(h.record(&cfg, true, false), BreakerState::Open);
        assert_eq!(h.admit(&cfg), Admission::Rejected);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(h.admit(&cfg), Admission::Probe);
        assert_eq!(h.admit(&cfg), Admission::Rejected, "one probe at a time");
        assert_eq!(
            h.record(&cfg, true, true),
            BreakerState::Open,
            "a failed probe reopens"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(h.admit(&cfg), Admission::Probe);
        assert_eq!(h.record(&cfg, false, true), BreakerState::Closed);
        assert_eq!(h.admit(&cfg), Admission::Allowed);
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
        h.record(&cfg, false, false);
        h.record(&cfg, true, false);
        h.record(&cfg, false, false);
        assert_eq!(h.record(&cfg, true, false), BreakerState::Open);
    }
}
