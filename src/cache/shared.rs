//! The shared tier: what the cache needs from a store that several gateway
//! replicas read and write (Redis today, `super::redis`). The cache façade
//! knows only this trait; an implementation knows entries and keys, never the
//! façade. Every method is best effort: a shared tier that is down, slow or
//! holds bad data answers a miss (counted by the implementation), never an
//! error on the request path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::entry::Entry;
use super::key::Key;

/// A boxed future, so the trait stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait SharedTier: Send + Sync {
    /// The entry stored under `key`, if there is a valid one. Anything that
    /// cannot be read, checked or decoded is a miss.
    fn load<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Option<Entry>>;

    /// Stores `entry` under `key` without delaying the caller: the write runs
    /// in the background and its failure is only counted.
    fn store(self: Arc<Self>, key: &Key, entry: &Entry);

    /// Deletes the entries of a route and/or a prompt (all of this gateway's
    /// when both are `None`); how many were removed, or why it stopped.
    fn purge<'a>(
        &'a self,
        route: Option<&'a str>,
        prompt: Option<&'a str>,
    ) -> BoxFuture<'a, Result<u64, String>>;
}
