//! Single flight: concurrent identical misses make one upstream call. The first
//! becomes the leader and holds a [`Lease`]; the others wait (each at most until
//! its own request's deadline) for the leader's outcome, then hit or lead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;

use super::entry::Entry;
use super::key::Key;
use super::tiers::Tiers;

/// The outcome of waiting for another request's identical call.
#[derive(Clone)]
pub(super) enum Flight {
    Pending,
    Done(Arc<Entry>),
    Failed,
}

/// The keys in flight, and the tiers a leader's entry goes to.
pub(super) struct Flights {
    tiers: Arc<Tiers>,
    /// The registered leader of each key in flight: its token and its outcome.
    inflight: Mutex<HashMap<Key, (u64, watch::Receiver<Flight>)>>,
    /// Leader tokens, unique for the life of the cache.
    next_token: AtomicU64,
}

/// A leader's promise to fill a key: dropping it without `complete` tells the
/// waiters the call failed. A registered lease owns the key's in-flight entry,
/// named by its token, and removes that entry only: a request that leads
/// without registering (a refresh while another call is in flight, a waiter
/// whose deadline passed) never touches another leader's entry.
pub struct Lease {
    key: Key,
    /// Set when this lease is the key's registered leader.
    token: Option<u64>,
    tx: Option<watch::Sender<Flight>>,
    flights: Arc<Flights>,
}

impl Lease {
    /// Whether waiters are following this lease.
    pub fn registered(&self) -> bool {
        self.token.is_some()
    }

    pub async fn complete(mut self, entry: Option<Entry>) -> Option<Arc<Entry>> {
        let stored = match entry {
            Some(e) => Some(self.flights.tiers.insert(self.key, e).await),
            None => None,
        };
        self.finish(stored.clone().map_or(Flight::Failed, Flight::Done));
        stored
    }

    /// Gives up the in-flight entry (first, so a waiter told of the outcome
    /// finds the key free) and tells the waiters.
    fn finish(&mut self, outcome: Flight) {
        if let Some(token) = self.token.take() {
            self.flights.release(&self.key, token);
        }
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(outcome);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.finish(Flight::Failed);
    }
}

/// What a lookup found.
pub enum Lookup {
    Hit(Arc<Entry>),
    /// This request should call upstream and fill the key.
    Lead(Lease),
}

impl Flights {
    pub(super) fn new(tiers: Arc<Tiers>) -> Flights {
        Flights {
            tiers,
            inflight: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
        }
    }

    /// Removes the in-flight entry of `key` if `token` still owns it.
    fn release(&self, key: &Key, token: u64) {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|(t, _)| *t == token) {
            map.remove(key);
        }
    }

    fn lease(self: &Arc<Self>, key: Key, token: Option<u64>, tx: watch::Sender<Flight>) -> Lookup {
        Lookup::Lead(Lease {
            key,
            token,
            tx: Some(tx),
            flights: self.clone(),
        })
    }

    /// Looks `key` up (unless refreshing); on a miss either waits for an
    /// identical call already in flight, at most until the request's own
    /// `deadline`, or makes this request the leader.
    pub(super) async fn lookup(
        self: &Arc<Self>,
        key: Key,
        refresh: bool,
        deadline: Instant,
    ) -> Lookup {
        if !refresh {
            if let Some(e) = self.tiers.get(&key).await {
                return Lookup::Hit(e);
            }
        }
        loop {
            let (token, mut rx) = {
                let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(&key) {
                    Some((token, rx)) if !refresh => (*token, rx.clone()),
                    // A refresh while another call is in flight: call upstream
                    // too, but leave the key to the leader its waiters follow.
                    Some(_) => return self.lease(key, None, watch::channel(Flight::Pending).0),
                    None => {
                        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
                        let (tx, rx) = watch::channel(Flight::Pending);
                        map.insert(key, (token, rx));
                        return self.lease(key, Some(token), tx);
                    }
                }
            };
            let outcome =
                tokio::time::timeout_at(deadline, rx.wait_for(|f| !matches!(f, Flight::Pending)))
                    .await;
            match outcome {
                Ok(Ok(f)) => {
                    if let Flight::Done(e) = &*f {
                        return Lookup::Hit(e.clone());
                    }
                }
                // The leader went away without a word (its entry is stale).
                Ok(Err(_)) => {}
                // Our own deadline passed: no more waiting. What is left of the
                // deadline is the caller's; this lease owns nothing.
                Err(_) => return self.lease(key, None, watch::channel(Flight::Pending).0),
            }
            // The leader failed: its entry is gone (or is removed here if it
            // lingers); try to lead.
            self.release(&key, token);
        }
    }
}
