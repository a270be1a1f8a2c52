//! Where entries are kept: level 1 in memory (moka, bounded by bytes, per-entry
//! TTL), level 2 an optional [`SharedTier`] shared by replicas. A level-2 hit is
//! copied into level 1; a stored entry goes to both.

use std::sync::Arc;
use std::time::Duration;

use super::entry::Entry;
use super::key::Key;
use super::shared::SharedTier;
use crate::config::CacheConfig;

pub(super) struct Tiers {
    l1: moka::future::Cache<Key, Arc<Entry>>,
    l2: Option<Arc<dyn SharedTier>>,
    /// Larger responses are served but not stored.
    max_entry_bytes: u64,
}

struct EntryExpiry;

impl moka::Expiry<Key, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _: &Key,
        v: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

impl Tiers {
    pub(super) fn new(
        cfg: &CacheConfig,
        evictions: prometheus::IntCounter,
        l2: Option<Arc<dyn SharedTier>>,
    ) -> Tiers {
        // LRU rather than the default TinyLFU admission: a response cache must
        // admit a new answer (the next identical request is the point), not turn
        // it away because the key has not been seen often enough.
        let mut b = moka::future::Cache::builder()
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .max_capacity(cfg.max_bytes)
            .weigher(|_: &Key, e: &Arc<Entry>| e.bytes)
            .expire_after(EntryExpiry)
            .support_invalidation_closures()
            .eviction_listener(move |_, _, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evictions.inc();
                }
            });
        if let Some(tti) = cfg.time_to_idle {
            b = b.time_to_idle(tti);
        }
        Tiers {
            l1: b.build(),
            l2,
            max_entry_bytes: cfg.max_entry_bytes,
        }
    }

    pub(super) fn max_entry_bytes(&self) -> u64 {
        self.max_entry_bytes
    }

    pub(super) fn shared(&self) -> Option<&Arc<dyn SharedTier>> {
        self.l2.as_ref()
    }

    pub(super) async fn insert(&self, key: Key, e: Entry) -> Arc<Entry> {
        let e = Arc::new(e);
        if u64::from(e.bytes) > self.max_entry_bytes {
            return e;
        }
        if let Some(l2) = &self.l2 {
            l2.clone().store(&key, &e);
        }
        self.l1.insert(key, e.clone()).await;
        e
    }

    pub(super) async fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        if let Some(e) = self.l1.get(key).await {
            return Some(e);
        }
        let l2 = self.l2.as_ref()?;
        let e = Arc::new(l2.load(key).await?);
        self.l1.insert(*key, e.clone()).await;
        Some(e)
    }

    /// Drops entries (all, or of one route, or of one prompt) in both tiers.
    pub(super) async fn purge(
        &self,
        route: Option<&str>,
        prompt: Option<&str>,
    ) -> Result<u64, String> {
        let (r, p) = (route.map(str::to_owned), prompt.map(str::to_owned));
        let matches = move |e: &Entry| {
            r.as_ref().is_none_or(|r| &e.route == r)
                && p.as_ref().is_none_or(|p| e.prompt.as_ref() == Some(p))
        };
        let mut removed = self.l1.iter().filter(|(_, e)| matches(e)).count() as u64;
        if route.is_none() && prompt.is_none() {
            self.l1.invalidate_all();
        } else {
            self.l1
                .invalidate_entries_if(move |_, e| matches(e))
                .map_err(|e| e.to_string())?;
        }
        self.l1.run_pending_tasks().await;
        if let Some(l2) = &self.l2 {
            removed = removed.saturating_add(l2.purge(route, prompt).await?);
        }
        Ok(removed)
    }

    /// (entries, bytes) in memory.
    pub(super) async fn figures(&self) -> (u64, u64) {
        self.l1.run_pending_tasks().await;
        (self.l1.entry_count(), self.l1.weighted_size())
    }
}
