//! The response cache: exact match on a stable hash of the canonical request
//! after prompt rendering and route resolution. Level 1 is in memory (moka,
//! bounded by bytes, per-entry TTL); an optional level 2 (Redis) is shared by
//! replicas, with compressed entries and a short timeout: when it is down or
//! slow the gateway serves without it and counts the failure. Concurrent
//! identical misses make one upstream call (single flight). Entries hold the
//! canonical response, so a hit is replayed in any dialect, as JSON or as a
//! stream. Errors, cut streams and `finish_reason: error` are never stored.
//!
//! This file is the façade the gateway uses (`Cache`, `Status`, and the rest
//! re-exported). Each part imports only the parts below it; none imports the
//! façade, and `redis.rs` knows the cache only as entries, keys and the
//! `SharedTier` trait it implements:
//!
//! ```text
//! mod.rs    Cache: new / lookup / assembler / purge / figures
//!   ├─▶ flight.rs   single flight: Lookup, Lease           ─▶ tiers.rs
//!   ├─▶ tiers.rs    moka (level 1) + dyn SharedTier (level 2) ─▶ shared.rs
//!   └─▶ redis.rs    RedisTier: seal, compression, timeouts  ─▶ shared.rs (impl)
//! shared.rs  the SharedTier trait (object safe, boxed futures)
//! entry.rs   Entry, weight, cacheable, the stored form (format 2)
//! key.rs     the key, route policy, client directive, tenant
//! assemble.rs  a stream's events → one response, to store
//! ```
//!
//! `shared`, `flight`, `tiers` and `redis` use `entry` and `key`; those two
//! and `assemble` use nothing here.

mod assemble;
mod entry;
mod flight;
mod key;
pub mod redis;
pub mod shared;
mod tiers;

use std::sync::Arc;

use tokio::time::Instant;

pub use assemble::Assembler;
pub use entry::{cacheable, weight, Entry};
pub use flight::{Lease, Lookup};
pub use key::{canonical, eligible, key_of, tenant_of, Directive, Key};
pub use redis::resolve_secret;
pub use shared::SharedTier;

use crate::config::CacheConfig;
use flight::Flights;
use tiers::Tiers;

/// How a request used the cache (the `x-promptgate-cache` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Hit,
    Miss,
    Bypass,
    Refresh,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Hit => "hit",
            Status::Miss => "miss",
            Status::Bypass => "bypass",
            Status::Refresh => "refresh",
        }
    }
}

pub struct Cache {
    tiers: Arc<Tiers>,
    flights: Arc<Flights>,
    pub metrics: CacheMetrics,
}

#[derive(Clone)]
pub struct CacheMetrics {
    pub evictions: prometheus::IntCounter,
    pub redis_errors: prometheus::IntCounterVec,
}

impl Cache {
    /// The cache `cfg` describes: a Redis shared tier when `cache.redis` is set.
    pub fn new(cfg: &CacheConfig, metrics: CacheMetrics) -> Arc<Cache> {
        let shared = cfg.redis.as_ref().map(|r| {
            Arc::new(redis::RedisTier::new(
                r,
                cfg.max_entry_bytes,
                metrics.redis_errors.clone(),
            )) as Arc<dyn SharedTier>
        });
        Cache::with_shared(cfg, metrics, shared)
    }

    /// A cache over the given shared tier (or none), whatever `cfg.redis` says.
    pub fn with_shared(
        cfg: &CacheConfig,
        metrics: CacheMetrics,
        shared: Option<Arc<dyn SharedTier>>,
    ) -> Arc<Cache> {
        let tiers = Arc::new(Tiers::new(cfg, metrics.evictions.clone(), shared));
        Arc::new(Cache {
            flights: Arc::new(Flights::new(tiers.clone())),
            tiers,
            metrics,
        })
    }

    /// An assembler for a stream to be stored: it gives up where storing would
    /// refuse the entry (`cache.max_entry_bytes`), so a longer stream is served
    /// without being collected.
    pub fn assembler(&self) -> Assembler {
        Assembler::with_limit(usize::try_from(self.tiers.max_entry_bytes()).unwrap_or(usize::MAX))
    }

    /// The shared tier, if one is configured.
    pub fn redis(&self) -> Option<&Arc<dyn SharedTier>> {
        self.tiers.shared()
    }

    /// Looks `key` up (unless refreshing); on a miss either waits for an
    /// identical call already in flight, at most until the request's own
    /// `deadline`, or makes this request the leader.
    pub async fn lookup(&self, key: Key, refresh: bool, deadline: Instant) -> Lookup {
        self.flights.lookup(key, refresh, deadline).await
    }

    /// Drops entries (all, or of one route, or of one prompt) here and in the
    /// shared tier.
    pub async fn purge(&self, route: Option<&str>, prompt: Option<&str>) -> Result<u64, String> {
        self.tiers.purge(route, prompt).await
    }

    /// (entries, bytes) in memory.
    pub async fn figures(&self) -> (u64, u64) {
        self.tiers.figures().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures_util::FutureExt;
    use std::time::{Duration, SystemTime};

    fn config() -> CacheConfig {
        CacheConfig {
            max_bytes: 1 << 20,
            max_entry_bytes: 1 << 20,
            ttl: Duration::from_secs(60),
            time_to_idle: None,
            redis: None,
        }
    }

    fn metrics() -> CacheMetrics {
        CacheMetrics {
            evictions: prometheus::IntCounter::new("e", "e").unwrap(),
            redis_errors: prometheus::IntCounterVec::new(prometheus::Opts::new("r", "r"), &["op"])
                .unwrap(),
        }
    }

    fn cache() -> Arc<Cache> {
        Cache::new(&config(), metrics())
    }

    fn entry() -> Entry {
        entry::samples::entry(
            entry::samples::answer("hi"),
            SystemTime::now(),
            Duration::from_secs(60),
        )
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    fn lead(l: Lookup) -> Lease {
        match l {
            Lookup::Lead(l) => l,
            Lookup::Hit(_) => panic!("expected to lead"),
        }
    }

    /// A second lookup of `key` must wait for the registered leader.
    async fn follows_the_leader(c: &Arc<Cache>, key: Key, leader: Lease) {
        let mut waiter = Box::pin(c.lookup(key, false, far()));
        assert!(
            (&mut waiter).now_or_never().is_none(),
            "waits for the leader instead of leading a second call"
        );
        leader.complete(Some(entry())).await;
        assert!(matches!(waiter.await, Lookup::Hit(_)));
    }

    #[tokio::test]
    async fn a_refresh_never_removes_the_leaders_entry() {
        let c = cache();
        let key = [7u8; 32];
        let leader = lead(c.lookup(key, false, far()).await);
        assert!(leader.registered());
        let refresh = lead(c.lookup(key, true, far()).await);
        assert!(!refresh.registered());
        refresh.complete(None).await;
        follows_the_leader(&c, key, leader).await;
    }

    #[tokio::test]
    async fn a_waiter_past_its_deadline_leaves_the_leader_alone() {
        let c = cache();
        let key = [8u8; 32];
        let leader = lead(c.lookup(key, false, far()).await);
        let late = lead(c.lookup(key, false, Instant::now()).await);
        assert!(!late.registered(), "leads its own call, owning nothing");
        drop(late);
        follows_the_leader(&c, key, leader).await;
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wait_at_most_their_own_deadline() {
        let c = cache();
        let key = [9u8; 32];
        let _leader = lead(c.lookup(key, false, far()).await);
        let start = Instant::now();
        let waiter = lead(c.lookup(key, false, start + Duration::from_secs(2)).await);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert!(!waiter.registered());
    }

    #[tokio::test]
    async fn a_failed_leader_hands_the_key_to_one_waiter() {
        let c = cache();
        let key = [10u8; 32];
        let leader = lead(c.lookup(key, false, far()).await);
        let mut a = Box::pin(c.lookup(key, false, far()));
        let mut b = Box::pin(c.lookup(key, false, far()));
        assert!((&mut a).now_or_never().is_none());
        assert!((&mut b).now_or_never().is_none());
        drop(leader);
        let next = lead(a.await);
        assert!(next.registered());
        assert!(
            (&mut b).now_or_never().is_none(),
            "b follows the new leader"
        );
        follows_the_leader(&c, key, next).await;
        assert!(matches!(b.await, Lookup::Hit(_)));
    }

    /// A shared tier kept in process memory, holding entries in their stored
    /// form as any shared tier does.
    #[derive(Default)]
    struct InProcess {
        entries: std::sync::Mutex<std::collections::HashMap<Key, (String, Vec<u8>)>>,
    }

    impl SharedTier for InProcess {
        fn load<'a>(&'a self, key: &'a Key) -> shared::BoxFuture<'a, Option<Entry>> {
            let raw = self
                .entries
                .lock()
                .unwrap()
                .get(key)
                .map(|(_, raw)| raw.clone());
            Box::pin(async move { Entry::decode(&raw?).ok() })
        }

        fn store(self: Arc<Self>, key: &Key, entry: &Entry) {
            let raw = entry.encode().unwrap();
            self.entries
                .lock()
                .unwrap()
                .insert(*key, (entry.route.clone(), raw));
        }

        fn purge<'a>(
            &'a self,
            route: Option<&'a str>,
            _: Option<&'a str>,
        ) -> shared::BoxFuture<'a, Result<u64, String>> {
            let mut map = self.entries.lock().unwrap();
            let before = map.len();
            map.retain(|_, (r, _)| route.is_some_and(|route| route != r));
            let removed = (before - map.len()) as u64;
            Box::pin(async move { Ok(removed) })
        }
    }

    /// The façade knows its shared tier only through `SharedTier`: what one
    /// cache stores, another over the same tier finds (in the stored form,
    /// decoded back to the same response), and a purge reaches the tier.
    #[tokio::test]
    async fn caches_share_entries_through_the_shared_tier_trait() {
        let tier = Arc::new(InProcess::default());
        let a = Cache::with_shared(&config(), metrics(), Some(tier.clone()));
        let b = Cache::with_shared(&config(), metrics(), Some(tier.clone()));
        let key = [11u8; 32];
        let stored = lead(a.lookup(key, false, far()).await)
            .complete(Some(entry()))
            .await
            .unwrap();
        assert_eq!(tier.entries.lock().unwrap().len(), 1);
        match b.lookup(key, false, far()).await {
            Lookup::Hit(e) => assert_eq!(e.response, stored.response),
            Lookup::Lead(_) => panic!("the other cache missed the shared entry"),
        }
        assert_eq!(b.figures().await.0, 1, "a shared hit is kept in memory");
        assert_eq!(b.purge(Some("r"), None).await.unwrap(), 2);
        assert!(tier.entries.lock().unwrap().is_empty());
        assert!(b.redis().is_some() && cache().redis().is_none());
    }
}
