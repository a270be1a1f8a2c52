//! The cache's shared tier: Redis, behind a short timeout. Entries are stored as
//! LZ4-compressed JSON (the response in the OpenAI wire format, which the gateway
//! already reads and writes) with a Redis-side expiry. Every Redis failure —
//! refused connection, timeout, bad entry — is counted and treated as a miss:
//! a cache outage never fails a request. After a failure the tier rests for a
//! second before trying again, so a dead Redis costs nothing per request.

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
}

fn hex(k: &Key) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

impl RedisTier {
    pub fn new(cfg: &RedisConfig, errors: prometheus::IntCounterVec) -> RedisTier {
        RedisTier {
            client: redis::Client::open(cfg.url.as_str()).ok(),
            conn: tokio::sync::Mutex::new(None),
            resting_until: Mutex::new(None),
            timeout: cfg.timeout,
            prefix: cfg.prefix.clone(),
            errors,
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
        let get = async {
            let name: Option<String> = redis::cmd("GET")
                .arg(self.lookup_key(k))
                .query_async(&mut conn)
                .await?;
            match name {
                None => Ok(None),
                Some(n) => {
                    redis::cmd("GET")
                        .arg(n)
                        .query_async::<Option<Vec<u8>>>(&mut conn)
                        .await
                }
            }
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
        match decode(&bytes) {
            Some(e) => Some(e),
            None => {
                self.fail("decode", "an entry could not be read");
                None
            }
        }
    }

    /// Stores in the background: a slow Redis never delays the response.
    pub fn store(self: &Arc<Self>, k: &Key, e: &Entry) {
        let Some(bytes) = encode(e) else { return };
        let name = self.redis_key(k, &e.route, e.prompt.as_deref());
        let index = self.lookup_key(k);
        let ttl_ms = e.ttl.as_millis().max(1) as u64;
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
    pub async fn purge(&self, route: Option<&str>, prompt: Option<&str>) -> Result<u64, String> {
        let Some(mut conn) = self.connection().await else {
            return Err("redis is unreachable".into());
        };
        let pattern = format!(
            "{}{}:{}:*",
            self.prefix,
            route.unwrap_or("*"),
            prompt.unwrap_or("*")
        );
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                removed += n;
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
    let response: Value = serde_json::from_slice(&crate::wire::openai::encode_chat_response(
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
    Some(lz4_flex::compress_prepend_size(
        &serde_json::to_vec(&v).ok()?,
    ))
}

fn decode(bytes: &[u8]) -> Option<Entry> {
    let raw = lz4_flex::decompress_size_prepended(bytes).ok()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    let mut response =
        crate::wire::openai::decode_chat_response(v["response"].to_string().as_bytes()).ok()?;
    if let (Some(u), Some(true)) = (response.usage.as_mut(), v["estimated"].as_bool()) {
        u.estimated = true;
    }
    let created = SystemTime::UNIX_EPOCH + Duration::from_millis(v["created_ms"].as_u64()?);
    let ttl = Duration::from_millis(v["ttl_ms"].as_u64()?);
    let age = SystemTime::now()
        .duration_since(created)
        .unwrap_or_default();
    let remaining = ttl.checked_sub(age)?;
    Some(Entry {
        bytes: crate::cache::weight(&response),
        response,
        target: v["target"].as_str()?.to_owned(),
        route: v["route"].as_str()?.to_owned(),
        prompt: v["prompt"].as_str().map(str::to_owned),
        created,
        // L1 keeps it only as long as Redis does.
        ttl: remaining.max(Duration::from_millis(1)),
    })
}
