//! The cache's shared tier: Redis, behind a short timeout. Entries are stored in
//! the cache's own canonical form (`Entry::encode`, format `entry::FORMAT`),
//! LZ4-compressed, with a Redis-side expiry. Every Redis failure —
//! refused connection, timeout, bad entry — is counted and treated as a miss:
//! a cache outage never fails a request. After a failure the tier rests for a
//! second before trying again, so a dead Redis costs nothing per request.
//!
//! Nothing read from Redis is trusted. An entry is
//! `"PGC" | version | mode | tag (32 bytes) | length (u32 LE) | LZ4 block`, where
//! the tag is HMAC-SHA256 under the secret of `cache.redis.secret_env` (mode 1)
//! or, without a secret, a plain SHA-256 checksum (mode 0: catches corruption,
//! not forgery by someone who can write to Redis). The tag covers the cache key
//! too, so an entry copied under another key is rejected. Reads fetch at most
//! the largest entry this gateway could have written, the tag is checked before
//! anything is decompressed, the length is checked against
//! `cache.max_entry_bytes` (at most 64 MiB) before it sizes an allocation, and
//! the stored TTL and creation time are clamped. An entry of another version
//! (seal or entry format) is a miss, counted as a `decode` failure. Entries
//! over 256 KiB (stored or declared) are checked and decoded on the blocking
//! pool, not a runtime worker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::time::Instant;

use super::entry::{Entry, MAX_TTL};
use super::key::Key;
use super::shared::{BoxFuture, SharedTier};
use crate::config::RedisConfig;

pub struct RedisTier {
    client: Option<redis::Client>,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    resting_until: Mutex<Option<Instant>>,
    timeout: Duration,
    prefix: String,
    errors: Failures,
    seal: Seal,
}

/// What a failure was, for the log and the `op` label of the error counter.
#[derive(Clone, Copy)]
enum Op {
    Connect,
    Get,
    Set,
    Decode,
}

impl Op {
    const ALL: [Op; 4] = [Op::Connect, Op::Get, Op::Set, Op::Decode];

    fn as_str(self) -> &'static str {
        match self {
            Op::Connect => "connect",
            Op::Get => "get",
            Op::Set => "set",
            Op::Decode => "decode",
        }
    }
}

/// The error counter's handle for each `Op`, resolved once.
struct Failures([prometheus::IntCounter; 4]);

impl Failures {
    fn new(errors: &prometheus::IntCounterVec) -> Failures {
        Failures(Op::ALL.map(|op| errors.with_label_values(&[op.as_str()])))
    }

    fn count(&self, op: Op) {
        self.0[op as usize].inc();
    }
}

/// The format version written and the only one read. 1 held the response as
/// OpenAI wire JSON; 2 holds the canonical entry form (`entry::FORMAT` 2).
const VERSION: u8 = 2;
const MAGIC: &[u8; 3] = b"PGC";
/// Magic, version, mode, tag, length.
const HEADER: usize = 3 + 1 + 1 + 32 + 4;
/// The whole of a purge, however many keys it walks.
const PURGE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest index value (a Redis key name) read.
const MAX_NAME: usize = 4096;

/// How entries are sealed and checked.
#[derive(Clone)]
pub struct Seal {
    /// The MAC, keyed once from the secret; `None`: plain checksums.
    mac: Option<hmac::Hmac<sha2::Sha256>>,
    /// The largest decompressed entry accepted.
    max_entry_bytes: usize,
}

/// Fills in `cache.redis.secret` from the variable `cache.redis.secret_env`
/// names; a named variable that is unset or empty is a configuration problem.
pub fn resolve_secret(
    cfg: &mut crate::config::Config,
    file: &std::path::Path,
    env: crate::backend::EnvLookup<'_>,
) -> Result<(), Vec<crate::config::Problem>> {
    let Some(r) = cfg.cache.redis.as_mut() else {
        return Ok(());
    };
    match &r.secret_env {
        None => {
            tracing::warn!("cache.redis.secret_env is not set: Redis entries carry a plain checksum, which detects corruption but not entries forged by someone with write access to Redis");
            Ok(())
        }
        Some(var) => match env(var).filter(|v| !v.is_empty()) {
            Some(v) => {
                r.secret = Some(crate::config::Secret(v.into_bytes().into()));
                Ok(())
            }
            None => Err(vec![crate::config::Problem {
                file: file.display().to_string(),
                line: None,
                field: "cache.redis.secret_env".into(),
                message: format!("the environment variable `{var}` (the key that signs Redis cache entries) is not set"),
            }]),
        },
    }
}

impl Seal {
    pub fn new(secret: Option<crate::config::Secret>, max_entry_bytes: u64) -> Seal {
        use hmac::Mac;
        Seal {
            // HMAC takes keys of any length: keying cannot fail.
            mac: secret.and_then(|s| hmac::Hmac::<sha2::Sha256>::new_from_slice(&s.0).ok()),
            max_entry_bytes: usize::try_from(max_entry_bytes).unwrap_or(usize::MAX),
        }
    }

    fn mode(&self) -> u8 {
        u8::from(self.mac.is_some())
    }

    /// The largest stored value this gateway writes: reads fetch no more.
    fn max_stored(&self) -> usize {
        HEADER.saturating_add(lz4_flex::block::get_maximum_output_size(
            self.max_entry_bytes,
        ))
    }

    /// The tag over the cache key and `parts` (the header without the tag, then
    /// the body): HMAC-SHA256 under the secret, else a plain SHA-256.
    fn tag(&self, key: &Key, parts: &[&[u8]]) -> [u8; 32] {
        use hmac::Mac;
        use sha2::Digest;
        match &self.mac {
            Some(mac) => {
                let mut mac = mac.clone();
                mac.update(key);
                for p in parts {
                    mac.update(p);
                }
                mac.finalize().into_bytes().into()
            }
            None => {
                let mut h = sha2::Sha256::new();
                h.update(key);
                for p in parts {
                    h.update(p);
                }
                h.finalize().into()
            }
        }
    }

    /// Whether `tag` is the entry's tag, compared in constant time: the
    /// comparison reveals nothing about the right tag.
    fn tag_matches(&self, key: &Key, parts: &[&[u8]], tag: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.tag(key, parts)[..].ct_eq(tag))
    }

    /// Seals the stored form of an entry (`Entry::encode`); `None` if it is
    /// over the size bound.
    pub fn seal(&self, key: &Key, raw: &[u8]) -> Option<Vec<u8>> {
        if raw.len() > self.max_entry_bytes {
            return None;
        }
        let len = u32::try_from(raw.len()).ok()?;
        let body = lz4_flex::block::compress(raw);
        let head = [MAGIC[0], MAGIC[1], MAGIC[2], VERSION, self.mode()];
        let tag = self.tag(key, &[&head, &len.to_le_bytes(), &body]);
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(&tag);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&body);
        Some(out)
    }

    /// Checks and opens a stored value: the stored form inside, or why not.
    pub fn open(&self, key: &Key, bytes: &[u8]) -> Result<Vec<u8>, &'static str> {
        if bytes.len() < HEADER || &bytes[..3] != MAGIC {
            return Err("not a promptgate cache entry");
        }
        if bytes[3] != VERSION {
            return Err("an entry of another format version");
        }
        if bytes[4] != self.mode() {
            return Err(if self.mac.is_some() {
                "an unsigned entry (this gateway requires signed entries)"
            } else {
                "a signed entry (this gateway has no secret to check it)"
            });
        }
        if bytes.len() > self.max_stored() {
            return Err("an entry larger than cache.max_entry_bytes allows");
        }
        let (head, rest) = bytes.split_at(5);
        let (tag, rest) = rest.split_at(32);
        let (len, body) = rest.split_at(4);
        if !self.tag_matches(key, &[head, len, body], tag) {
            return Err("a checksum mismatch (corrupt, forged or stored under another key)");
        }
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > self.max_entry_bytes {
            return Err("an entry larger than cache.max_entry_bytes");
        }
        match lz4_flex::block::decompress(body, len) {
            Ok(raw) if raw.len() == len => Ok(raw),
            _ => Err("an entry that does not decompress"),
        }
    }
}

/// Entries larger than this (stored or declared decompressed size) are checked,
/// decompressed and parsed on the blocking pool, not on a runtime worker.
pub const BLOCKING_DECODE_BYTES: usize = 256 * 1024;

/// The decompressed length an entry declares (0 when it has no header).
fn declared_len(bytes: &[u8]) -> usize {
    match bytes.get(HEADER - 4..HEADER) {
        Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]) as usize,
        _ => 0,
    }
}

/// Checks, decompresses and parses a stored value: inline when small, on the
/// blocking pool when the stored or declared size is over
/// [`BLOCKING_DECODE_BYTES`] (an HMAC, LZ4 and decoding pass over up to
/// `cache.max_entry_bytes` would otherwise hold a worker thread).
async fn open_entry(seal: &Seal, k: &Key, bytes: Vec<u8>) -> Result<Entry, &'static str> {
    if bytes.len().max(declared_len(&bytes)) <= BLOCKING_DECODE_BYTES {
        return seal.open(k, &bytes).and_then(|raw| Entry::decode(&raw));
    }
    let (seal, k) = (seal.clone(), *k);
    tokio::task::spawn_blocking(move || seal.open(&k, &bytes).and_then(|raw| Entry::decode(&raw)))
        .await
        .unwrap_or(Err("the entry's decoding failed"))
}

fn hex(k: &Key) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

impl RedisTier {
    pub fn new(
        cfg: &RedisConfig,
        max_entry_bytes: u64,
        errors: prometheus::IntCounterVec,
    ) -> RedisTier {
        RedisTier {
            client: redis::Client::open(cfg.url.as_str()).ok(),
            conn: tokio::sync::Mutex::new(None),
            resting_until: Mutex::new(None),
            timeout: cfg.timeout,
            prefix: cfg.prefix.clone(),
            errors: Failures::new(&errors),
            seal: Seal::new(cfg.secret.clone(), max_entry_bytes),
        }
    }

    fn fail(&self, op: Op, why: &str) {
        self.errors.count(op);
        tracing::warn!(
            op = op.as_str(),
            error = why,
            "redis cache tier failed; serving without it"
        );
        *self.resting_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + Duration::from_secs(1));
    }

    fn resting(&self) -> bool {
        self.resting_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    async fn connection(&self) -> Option<ConnectionManager> {
        if self.resting() {
            return None;
        }
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Some(c.clone());
        }
        let client = self.client.clone()?;
        match tokio::time::timeout(
            self.timeout.max(Duration::from_millis(200)),
            ConnectionManager::new(client),
        )
        .await
        {
            Ok(Ok(c)) => {
                *guard = Some(c.clone());
                Some(c)
            }
            Ok(Err(e)) => {
                self.fail(Op::Connect, &e.to_string());
                None
            }
            Err(_) => {
                self.fail(Op::Connect, "timed out");
                None
            }
        }
    }

    fn redis_key(&self, k: &Key, route: &str, prompt: Option<&str>) -> String {
        format!(
            "{}{route}:{}:{}",
            self.prefix,
            prompt.unwrap_or("-"),
            hex(k)
        )
    }

    /// The key by hash alone (the route and prompt parts are unknown on a read).
    fn lookup_key(&self, k: &Key) -> String {
        format!("{}idx:{}", self.prefix, hex(k))
    }

    /// The entry under `k`, if Redis answers in time and the entry checks out.
    async fn get(&self, k: &Key) -> Option<Entry> {
        let mut conn = self.connection().await?;
        // GETRANGE rather than GET: whatever Redis holds, no more than the
        // largest value this gateway writes is read (a missing key reads as "").
        let get = async {
            let name: Vec<u8> = redis::cmd("GETRANGE")
                .arg(self.lookup_key(k))
                .arg(0)
                .arg(MAX_NAME - 1)
                .query_async(&mut conn)
                .await?;
            if name.is_empty() {
                return Ok(None);
            }
            let value: Vec<u8> = redis::cmd("GETRANGE")
                .arg(name)
                .arg(0)
                .arg(self.seal.max_stored())
                .query_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>((!value.is_empty()).then_some(value))
        };
        let bytes = match tokio::time::timeout(self.timeout, get).await {
            Ok(Ok(b)) => b?,
            Ok(Err(e)) => {
                self.fail(Op::Get, &e.to_string());
                return None;
            }
            Err(_) => {
                self.fail(Op::Get, "timed out");
                return None;
            }
        };
        match open_entry(&self.seal, k, bytes).await {
            Ok(e) => Some(e),
            Err(why) => {
                self.errors.count(Op::Decode);
                tracing::warn!(error = why, "ignored a Redis cache entry");
                None
            }
        }
    }

    /// Stores in the background: a slow Redis never delays the response.
    fn set(self: Arc<Self>, k: &Key, e: &Entry) {
        let Some(bytes) = e.encode().and_then(|raw| self.seal.seal(k, &raw)) else {
            return;
        };
        let name = self.redis_key(k, &e.route, e.prompt.as_deref());
        let index = self.lookup_key(k);
        let ttl_ms = e.ttl.min(MAX_TTL).as_millis().max(1) as u64;
        crate::task::spawn("cache-store", async move {
            let Some(mut conn) = self.connection().await else {
                return;
            };
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(&name)
                .arg(bytes)
                .arg("PX")
                .arg(ttl_ms)
                .ignore()
                .cmd("SET")
                .arg(&index)
                .arg(&name)
                .arg("PX")
                .arg(ttl_ms)
                .ignore();
            let set = pipe.query_async::<()>(&mut conn);
            match tokio::time::timeout(self.timeout * 4, set).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.fail(Op::Set, &e.to_string()),
                Err(_) => self.fail(Op::Set, "timed out"),
            }
        });
    }

    /// Deletes entries of a route and/or prompt (or all of this gateway's).
    /// Gives up after `PURGE_TIMEOUT` in all (each command: the tier's timeout,
    /// at least a second), reporting how far it got.
    async fn delete(&self, route: Option<&str>, prompt: Option<&str>) -> Result<u64, String> {
        let Some(conn) = self.connection().await else {
            return Err("redis is unreachable".into());
        };
        let removed = std::sync::atomic::AtomicU64::new(0);
        let each = self.timeout.max(Duration::from_secs(1));
        match tokio::time::timeout(
            PURGE_TIMEOUT,
            self.purge_keys(conn, route, prompt, each, &removed),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the purge timed out after {}s ({} keys removed)",
                PURGE_TIMEOUT.as_secs(),
                removed.load(std::sync::atomic::Ordering::Relaxed)
            )),
        }
    }

    async fn purge_keys(
        &self,
        mut conn: ConnectionManager,
        route: Option<&str>,
        prompt: Option<&str>,
        each: Duration,
        counted: &std::sync::atomic::AtomicU64,
    ) -> Result<u64, String> {
        let timed_out = |_| format!("a Redis command timed out after {}ms", each.as_millis());
        let pattern = format!(
            "{}{}:{}:*",
            self.prefix,
            route.unwrap_or("*"),
            prompt.unwrap_or("*")
        );
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = tokio::time::timeout(
                each,
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(500)
                    .query_async(&mut conn),
            )
            .await
            .map_err(timed_out)?
            .map_err(|e| e.to_string())?;
            if !keys.is_empty() {
                let n: u64 =
                    tokio::time::timeout(each, redis::cmd("DEL").arg(&keys).query_async(&mut conn))
                        .await
                        .map_err(timed_out)?
                        .map_err(|e| e.to_string())?;
                removed = removed.saturating_add(n);
                counted.store(removed, std::sync::atomic::Ordering::Relaxed);
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(removed)
    }
}

impl SharedTier for RedisTier {
    fn load<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Option<Entry>> {
        Box::pin(self.get(key))
    }

    fn store(self: Arc<Self>, key: &Key, entry: &Entry) {
        self.set(key, entry);
    }

    fn purge<'a>(
        &'a self,
        route: Option<&'a str>,
        prompt: Option<&'a str>,
    ) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(self.delete(route, prompt))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::future::Future;
    use std::time::SystemTime;

    fn secret(s: &str) -> Option<crate::config::Secret> {
        Some(crate::config::Secret(s.as_bytes().into()))
    }

    /// The stored form of an entry answering `content`.
    fn stored_with(created_ms: u64, ttl_ms: u64, content: &str) -> Vec<u8> {
        super::super::entry::samples::entry(
            super::super::entry::samples::answer(content),
            SystemTime::UNIX_EPOCH + Duration::from_millis(created_ms),
            Duration::from_millis(ttl_ms),
        )
        .encode()
        .unwrap()
    }

    fn stored(created_ms: u64, ttl_ms: u64) -> Vec<u8> {
        stored_with(created_ms, ttl_ms, "hi")
    }

    fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    const K: Key = [1u8; 32];

    #[test]
    fn sealed_entries_open_only_with_the_same_key_and_secret() {
        for s in [None, secret("s1")] {
            let seal = Seal::new(s, 1 << 20);
            let data = stored(now_ms(), 60_000);
            let sealed = seal.seal(&K, &data).unwrap();
            assert_eq!(seal.open(&K, &sealed).unwrap(), data);
            assert!(seal.open(&[2u8; 32], &sealed).is_err(), "bound to its key");
            let mut flipped = sealed.clone();
            let last = flipped.len() - 1;
            flipped[last] ^= 1;
            assert!(seal.open(&K, &flipped).is_err());
            for at in [5, 20, 36] {
                let mut bad_tag = sealed.clone();
                bad_tag[at] ^= 0x80;
                assert!(seal
                    .open(&K, &bad_tag)
                    .unwrap_err()
                    .contains("checksum mismatch"));
            }
            for version in [VERSION - 1, VERSION + 1] {
                let mut other = sealed.clone();
                other[3] = version;
                assert!(seal.open(&K, &other).unwrap_err().contains("version"));
            }
        }
        let signed = Seal::new(secret("s1"), 1 << 20);
        let sealed = signed.seal(&K, &stored(now_ms(), 1)).unwrap();
        assert!(Seal::new(secret("s2"), 1 << 20).open(&K, &sealed).is_err());
        assert!(Seal::new(None, 1 << 20).open(&K, &sealed).is_err());
        let plain = Seal::new(None, 1 << 20)
            .seal(&K, &stored(now_ms(), 1))
            .unwrap();
        assert!(
            signed.open(&K, &plain).is_err(),
            "unsigned entries are refused"
        );
    }

    /// What a gateway of the previous version stored: the response as OpenAI
    /// wire JSON, sealed as version 1 with a tag that checks out.
    fn previous_version(seal: &Seal, key: &Key) -> Vec<u8> {
        let json = serde_json::to_vec(&serde_json::json!({
            "target": "p/m", "route": "r", "prompt": null, "created_ms": now_ms(),
            "ttl_ms": 60_000, "estimated": false,
            "response": {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]},
        }))
        .unwrap();
        let len = u32::try_from(json.len()).unwrap().to_le_bytes();
        let body = lz4_flex::block::compress(&json);
        let head = [b'P', b'G', b'C', 1, seal.mode()];
        let tag = seal.tag(key, &[&head[..], &len, &body]);
        [&head[..], &tag, &len, &body].concat()
    }

    /// Entries written in the previous format are refused, as a miss: neither
    /// their seal (version 1) nor their payload (dialect JSON, no format byte)
    /// is read.
    #[test]
    fn an_entry_of_the_previous_format_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for s in [None, secret("s1")] {
            let seal = Seal::new(s, 1 << 20);
            let old = previous_version(&seal, &K);
            assert!(seal.open(&K, &old).unwrap_err().contains("version"));
            assert!(rt.block_on(open_entry(&seal, &K, old.clone())).is_err());
            // Its payload under the current seal is refused by the entry format.
            let mut resealed = old.clone();
            resealed[3] = VERSION;
            let (head, rest) = resealed.split_at(5);
            let (_, rest) = rest.split_at(32);
            let (len, body) = rest.split_at(4);
            let tag = seal.tag(&K, &[head, len, body]);
            let resealed = [head, &tag[..], len, body].concat();
            assert!(seal.open(&K, &resealed).is_ok());
            assert!(rt
                .block_on(open_entry(&seal, &K, resealed))
                .unwrap_err()
                .contains("format version"));
            // The current form opens.
            let current = seal.seal(&K, &stored(now_ms(), 60_000)).unwrap();
            assert!(rt.block_on(open_entry(&seal, &K, current)).is_ok());
        }
    }

    #[test]
    fn a_huge_length_is_refused_before_anything_is_allocated() {
        // Plain checksums can be computed by anyone: a well-formed entry claiming
        // 4 GiB must still fail on the length, not allocate it.
        let seal = Seal::new(None, 1 << 20);
        let body = lz4_flex::block::compress(b"{}");
        let len = u32::MAX.to_le_bytes();
        let head = [b'P', b'G', b'C', VERSION, 0];
        let tag = seal.tag(&K, &[&head[..], &len, &body]);
        let forged = [&head[..], &tag, &len, &body].concat();
        assert!(seal
            .open(&K, &forged)
            .unwrap_err()
            .contains("max_entry_bytes"));
        // The old format (size-prefixed LZ4) is not read at all.
        let mut old = lz4_flex::compress_prepend_size(b"{}");
        old[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(seal.open(&K, &old).is_err());
        assert!(seal.open(&K, b"").is_err());
        // Too large to store.
        assert!(seal.seal(&K, &vec![b' '; (1 << 20) + 1]).is_none());
    }

    /// A large entry is checked, decompressed and parsed on the blocking pool:
    /// the first poll of the load hands it off and returns, leaving the runtime
    /// thread free; a small one is decoded at once. Both decode the same.
    #[test]
    fn large_entries_are_decoded_off_the_runtime_thread() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let seal = Seal::new(secret("s1"), 8 << 20);
        let small = seal.seal(&K, &stored(now_ms(), 60_000)).unwrap();
        let content: String = (0..400_000u32)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let big = seal
            .seal(&K, &stored_with(now_ms(), 60_000, &content))
            .unwrap();
        assert!(declared_len(&big) > BLOCKING_DECODE_BYTES);
        let poll_once = |bytes: Vec<u8>| {
            rt.block_on(async {
                let mut load = std::pin::pin!(open_entry(&seal, &K, bytes));
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match load.as_mut().poll(&mut cx) {
                    std::task::Poll::Ready(r) => (true, r),
                    std::task::Poll::Pending => (false, load.await),
                }
            })
        };
        let (at_once, e) = poll_once(small);
        assert!(at_once, "a small entry is decoded inline");
        assert!(e.is_ok());
        let (at_once, e) = poll_once(big);
        assert!(!at_once, "a large entry went to the blocking pool");
        let e = e.unwrap();
        assert_eq!(
            e.response.choices[0].message.content,
            Some(crate::canonical::Content::Text(content))
        );
        // A forged entry claiming a large size is refused there too.
        let mut forged = seal.seal(&K, &stored(now_ms(), 60_000)).unwrap();
        forged[HEADER - 4..HEADER].copy_from_slice(&(64u32 << 20).to_le_bytes());
        assert!(rt.block_on(open_entry(&seal, &K, forged)).is_err());
    }
}
