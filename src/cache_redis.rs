//! The cache's shared tier: Redis, behind a short timeout. Entries are stored as
//! LZ4-compressed JSON (the response in the OpenAI wire format, which the gateway
//! already reads and writes) with a Redis-side expiry. Every Redis failure —
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
//! the stored TTL and creation time are clamped. Entries over 256 KiB (stored or
//! declared) are checked and decoded on the blocking pool, not a runtime worker.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use redis::aio::ConnectionManager;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::cache::{Entry, Key};
use crate::config::RedisConfig;

pub struct RedisTier {
    client: Option<redis::Client>,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    resting_until: Mutex<Option<Instant>>,
    timeout: Duration,
    prefix: String,
    errors: prometheus::IntCounterVec,
    seal: Seal,
}

/// The format version written and the only one read.
const VERSION: u8 = 1;
const MAGIC: &[u8; 3] = b"PGC";
/// Magic, version, mode, tag, length.
const HEADER: usize = 3 + 1 + 1 + 32 + 4;
/// The longest an entry may still live once read back, whatever it says.
const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How far in the future an entry's creation time may lie (clock skew).
const MAX_SKEW: Duration = Duration::from_secs(60);
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

    /// Seals the JSON of an entry; `None` if it is over the size bound.
    pub fn seal(&self, key: &Key, json: &[u8]) -> Option<Vec<u8>> {
        if json.len() > self.max_entry_bytes {
            return None;
        }
        let len = u32::try_from(json.len()).ok()?;
        let body = lz4_flex::block::compress(json);
        let head = [MAGIC[0], MAGIC[1], MAGIC[2], VERSION, self.mode()];
        let tag = self.tag(key, &[&head, &len.to_le_bytes(), &body]);
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(&tag);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&body);
        Some(out)
    }

    /// Checks and opens a stored value: the JSON inside, or why not.
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
            Ok(json) if json.len() == len => Ok(json),
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
/// [`BLOCKING_DECODE_BYTES`] (an HMAC, LZ4 and JSON pass over up to
/// `cache.max_entry_bytes` would otherwise hold a worker thread).
async fn open_entry(seal: &Seal, k: &Key, bytes: Vec<u8>) -> Result<Entry, &'static str> {
    if bytes.len().max(declared_len(&bytes)) <= BLOCKING_DECODE_BYTES {
        return seal.open(k, &bytes).and_then(|json| decode(&json));
    }
    let (seal, k) = (seal.clone(), *k);
    tokio::task::spawn_blocking(move || seal.open(&k, &bytes).and_then(|json| decode(&json)))
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
            errors,
            seal: Seal::new(cfg.secret.clone(), max_entry_bytes),
        }
    }

    fn fail(&self, op: &str, why: &str) {
        self.errors.with_label_values(&[op]).inc();
        tracing::warn!(
            op,
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
                self.fail("connect", &e.to_string());
                None
            }
            Err(_) => {
                self.fail("connect", "timed out");
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

    pub async fn load(&self, k: &Key) -> Option<Entry> {
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
                self.fail("get", &e.to_string());
                return None;
            }
            Err(_) => {
                self.fail("get", "timed out");
                return None;
            }
        };
        match open_entry(&self.seal, k, bytes).await {
            Ok(e) => Some(e),
            Err(why) => {
                self.errors.with_label_values(&["decode"]).inc();
                tracing::warn!(error = why, "ignored a Redis cache entry");
                None
            }
        }
    }

    /// Stores in the background: a slow Redis never delays the response.
    pub fn store(self: &Arc<Self>, k: &Key, e: &Entry) {
        let Some(bytes) = encode(e).and_then(|json| self.seal.seal(k, &json)) else {
            return;
        };
        let name = self.redis_key(k, &e.route, e.prompt.as_deref());
        let index = self.lookup_key(k);
        let ttl_ms = e.ttl.min(MAX_TTL).as_millis().max(1) as u64;
        let this = self.clone();
        tokio::spawn(async move {
            let Some(mut conn) = this.connection().await else {
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
            match tokio::time::timeout(this.timeout * 4, set).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => this.fail("set", &e.to_string()),
                Err(_) => this.fail("set", "timed out"),
            }
        });
    }

    /// Deletes entries of a route and/or prompt (or all of this gateway's).
    /// Gives up after `PURGE_TIMEOUT` in all (each command: the tier's timeout,
    /// at least a second), reporting how far it got.
    pub async fn purge(&self, route: Option<&str>, prompt: Option<&str>) -> Result<u64, String> {
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

fn encode(e: &Entry) -> Option<Vec<u8>> {
    let created = e
        .created
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    let response: Value = serde_json::from_slice(&crate::backend::openai::encode_chat_response(
        &e.response,
        &e.response.model,
    ))
    .ok()?;
    let v = json!({
        "target": e.target,
        "route": e.route,
        "prompt": e.prompt,
        "created_ms": created,
        "ttl_ms": e.ttl.as_millis() as u64,
        "estimated": e.response.usage.is_some_and(|u| u.estimated),
        "response": response,
    });
    serde_json::to_vec(&v).ok()
}

/// Reads the JSON of an opened entry; the times in it are clamped: created no
/// later than now (give or take clock skew), living at most `MAX_TTL` more.
fn decode(raw: &[u8]) -> Result<Entry, &'static str> {
    let bad = "an entry with missing or invalid fields";
    let v: Value = serde_json::from_slice(raw).map_err(|_| bad)?;
    let mut response =
        crate::backend::openai::decode_chat_response(v["response"].to_string().as_bytes())
            .map_err(|_| bad)?;
    if let (Some(u), Some(true)) = (response.usage.as_mut(), v["estimated"].as_bool()) {
        u.estimated = true;
    }
    let now = SystemTime::now();
    let created = SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_millis(v["created_ms"].as_u64().ok_or(bad)?))
        .ok_or(bad)?;
    if created
        .duration_since(now)
        .is_ok_and(|ahead| ahead > MAX_SKEW)
    {
        return Err("an entry created in the future");
    }
    let ttl = Duration::from_millis(v["ttl_ms"].as_u64().ok_or(bad)?).min(MAX_TTL);
    let age = now.duration_since(created).unwrap_or_default();
    let remaining = ttl.checked_sub(age).ok_or("an expired entry")?;
    Ok(Entry {
        bytes: crate::cache::weight(&response),
        response,
        target: v["target"].as_str().ok_or(bad)?.to_owned(),
        route: v["route"].as_str().ok_or(bad)?.to_owned(),
        prompt: v["prompt"].as_str().map(str::to_owned),
        created: created.min(now),
        // L1 keeps it only as long as Redis does.
        ttl: remaining.max(Duration::from_millis(1)),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::future::Future;

    fn secret(s: &str) -> Option<crate::config::Secret> {
        Some(crate::config::Secret(s.as_bytes().into()))
    }

    fn json(created_ms: u64, ttl_ms: u64) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "target": "p/m", "route": "r", "prompt": null, "created_ms": created_ms,
            "ttl_ms": ttl_ms, "estimated": false,
            "response": {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]},
        }))
        .unwrap()
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
            let data = json(now_ms(), 60_000);
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
            let mut other = sealed.clone();
            other[3] = 2;
            assert!(seal.open(&K, &other).unwrap_err().contains("version"));
        }
        let signed = Seal::new(secret("s1"), 1 << 20);
        let sealed = signed.seal(&K, &json(now_ms(), 1)).unwrap();
        assert!(Seal::new(secret("s2"), 1 << 20).open(&K, &sealed).is_err());
        assert!(Seal::new(None, 1 << 20).open(&K, &sealed).is_err());
        let plain = Seal::new(None, 1 << 20)
            .seal(&K, &json(now_ms(), 1))
            .unwrap();
        assert!(
            signed.open(&K, &plain).is_err(),
            "unsigned entries are refused"
        );
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
        let small = seal.seal(&K, &json(now_ms(), 60_000)).unwrap();
        let mut big_json: Value = serde_json::from_slice(&json(now_ms(), 60_000)).unwrap();
        let content: String = (0..400_000u32)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        big_json["response"]["choices"][0]["message"]["content"] = json!(content);
        let big = seal
            .seal(&K, &serde_json::to_vec(&big_json).unwrap())
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
        let mut forged = seal.seal(&K, &json(now_ms(), 60_000)).unwrap();
        forged[HEADER - 4..HEADER].copy_from_slice(&(64u32 << 20).to_le_bytes());
        assert!(rt.block_on(open_entry(&seal, &K, forged)).is_err());
    }

    #[test]
    fn stored_times_are_clamped() {
        let e = decode(&json(now_ms(), u64::MAX)).unwrap();
        assert!(e.ttl <= MAX_TTL);
        assert!(decode(&json(now_ms() + 3_600_000, 60_000)).is_err());
        assert!(decode(&json(u64::MAX, 60_000)).is_err());
        assert!(
            decode(&json(now_ms() - 120_000, 60_000)).is_err(),
            "expired"
        );
        assert!(decode(&json(now_ms(), 60_000)).is_ok());
    }
}
