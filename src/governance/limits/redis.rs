//! Rate-limit counters in Redis, so several replicas enforce one limit.
//!
//! Keys (under `limits.redis.prefix`): `limit:{key|route}:{name}:rpm` and
//! `…:tpm` hold a GCRA theoretical arrival time (µs on Redis's clock, from
//! `TIME`, so replicas' clocks do not matter); each expires once the counter
//! is back to its full allowance, so idle counters vanish. `…:conc` is a
//! sorted set of leases, one per request in flight, scored by its expiry.
//!
//! One Lua script checks every counter of a request and, only when all admit
//! it, charges them all: atomic, and a refusal takes nothing. The script runs
//! by `EVALSHA` (its digest from `SCRIPT LOAD`), falling back to `EVAL` when
//! Redis has forgotten it (`NOSCRIPT`, e.g. after a restart).
//!
//! Concurrency leases rather than `INCR`/`DECR`: a replica that crashes or
//! loses Redis with requests in flight would leak their slots forever with a
//! counter. A lease expires [`LEASE`] after it was last renewed; each replica
//! renews its live leases every [`RENEW`], so a long stream keeps its slot,
//! and removes a lease when its request ends. Expired leases are dropped by
//! the next request that counts the set.
//!
//! Every call is bounded by `limits.redis.timeout`; a failure (or timeout)
//! makes the caller apply `limits.on_store_error`, and for a second after it
//! Redis is not tried at all, so an outage costs requests no waiting. The
//! first failure of an outage is logged, and so is the recovery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use super::{gcra, Counter, Decision, Inner, Party, Scope};
use crate::config::RedisStore;

/// How long a concurrency lease lives without renewal.
pub const LEASE: Duration = Duration::from_secs(30);
/// How often live leases are renewed.
pub const RENEW: Duration = Duration::from_secs(10);
/// After a failure, how long requests do not try Redis.
const REST: Duration = Duration::from_secs(1);
/// The error of a call not made because Redis is resting after a failure.
pub const RESTING: &str = "not tried: Redis failed less than a second ago";

/// Checks then charges: KEYS = the rate counters, then the concurrency sets;
/// ARGV = count of rate counters, count of sets, window (µs), lease (ms),
/// lease member, each rate counter's increment (µs), each set's limit.
/// Returns `{admitted, now, tat…, in_flight…}` (after charging when admitted).
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nowms = math.floor(now / 1000)
local r = tonumber(ARGV[1])
local c = tonumber(ARGV[2])
local w = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local member = ARGV[5]
local out = {0, now}
local ok = 1
for i = 1, r do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  local inc = tonumber(ARGV[5 + i])
  if inc > w or tat + inc > now + w then ok = 0 end
  out[2 + i] = tat
end
for j = 1, c do
  local k = KEYS[r + j]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', nowms)
  local n = redis.call('ZCARD', k)
  if n >= tonumber(ARGV[5 + r + j]) then ok = 0 end
  out[2 + r + j] = n
end
if ok == 1 then
  for i = 1, r do
    local tat = out[2 + i] + tonumber(ARGV[5 + i])
    out[2 + i] = tat
    redis.call('SET', KEYS[i], string.format('%d', tat), 'PX',
      string.format('%d', math.floor((tat - now) / 1000) + 1000))
  end
  for j = 1, c do
    local k = KEYS[r + j]
    redis.call('ZADD', k, string.format('%d', nowms + lease), member)
    redis.call('PEXPIRE', k, lease)
    out[2 + r + j] = out[2 + r + j] + 1
  end
end
out[1] = ok
return out
";

/// Charges output tokens regardless of the limit (debt): KEYS = token
/// counters, ARGV = their increments (µs).
const CHARGE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  tat = tat + tonumber(ARGV[i])
  redis.call('SET', KEYS[i], string.format('%d', tat), 'PX',
    string.format('%d', math.floor((tat - now) / 1000) + 1000))
end
return #KEYS
";

/// Renews leases: KEYS = concurrency sets, ARGV = lease (ms), then the
/// member in each set. A lease already gone is not brought back.
const RENEW_SCRIPT: &str = r"
local t = redis.call('TIME')
local nowms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', string.format('%d', nowms + lease), ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], lease)
end
return #KEYS
";

/// A Lua script run by digest, loaded on first use.
struct Script {
    text: &'static str,
    sha: Mutex<Option<String>>,
}

impl Script {
    const fn new(text: &'static str) -> Script {
        Script {
            text,
            sha: Mutex::new(None),
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
        keys: &[String],
        args: &[String],
    ) -> redis::RedisResult<T> {
        let known = self.sha.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sha = match known {
            Some(s) => s,
            None => {
                let s: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(self.text)
                    .query_async(conn)
                    .await?;
                *self.sha.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
                s
            }
        };
        let by_digest = redis::cmd("EVALSHA")
            .arg(&sha)
            .arg(keys.len())
            .arg(keys)
            .arg(args)
            .query_async(conn)
            .await;
        match by_digest {
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                redis::cmd("EVAL")
                    .arg(self.text)
                    .arg(keys.len())
                    .arg(keys)
                    .arg(args)
                    .query_async(conn)
                    .await
            }
            r => r,
        }
    }
}

/// A request's concurrency leases: its member and the sets it is in.
#[derive(Debug)]
pub struct Lease {
    member: Arc<str>,
    sets: Vec<String>,
}

pub struct RedisLimits {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    prefix: String,
    timeout: Duration,
    resting_until: Mutex<Option<Instant>>,
    /// In an outage (logged when it starts and when it ends).
    down: AtomicBool,
    /// The connection failed: the next call makes a new one rather than wait
    /// for the old one's own reconnection.
    stale: AtomicBool,
    /// This replica's lease names: a random id and a sequence.
    replica: String,
    seq: AtomicU64,
    /// Live leases (member → sets), renewed every [`RENEW`].
    leases: Arc<Mutex<HashMap<Arc<str>, Vec<String>>>>,
    renewing: AtomicBool,
    acquire: Script,
    charge: Arc<Script>,
    renew: Arc<Script>,
}

impl RedisLimits {
    pub fn new(cfg: &RedisStore) -> Result<RedisLimits, String> {
        let client =
            redis::Client::open(cfg.url.as_str()).map_err(|e| format!("limits.redis.url: {e}"))?;
        Ok(RedisLimits {
            client,
            conn: tokio::sync::Mutex::new(None),
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            resting_until: Mutex::new(None),
            down: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            replica: format!("{:016x}", rand::random::<u64>()),
            seq: AtomicU64::new(0),
            leases: Arc::default(),
            renewing: AtomicBool::new(false),
            acquire: Script::new(ACQUIRE),
            charge: Arc::new(Script::new(CHARGE)),
            renew: Arc::new(Script::new(RENEW_SCRIPT)),
        })
    }

    fn key(&self, p: &Party, what: &str) -> String {
        let scope = match p.scope {
            Scope::Key => "key",
            Scope::Route => "route",
        };
        format!("{}limit:{scope}:{}:{what}", self.prefix, &*p.name)
    }

    fn resting(&self) -> bool {
        self.resting_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    /// A failure: logged once per outage; Redis rests a moment (from the
    /// failure, not from the requests that skipped it since).
    pub fn outage(&self, why: &str, policy: &str) {
        if why != RESTING {
            *self.resting_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + REST);
            self.stale.store(true, Ordering::Release);
        }
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                error = why,
                policy,
                "the rate-limit store (Redis) failed; until it is back, limits.on_store_error applies"
            );
        }
    }

    fn recovered(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("the rate-limit store (Redis) is back; limits are shared again");
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        let mut guard = self.conn.lock().await;
        if self.stale.swap(false, Ordering::AcqRel) {
            *guard = None;
        }
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = ConnectionManager::new(self.client.clone())
            .await
            .map_err(|e| e.to_string())?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Checks and charges every counter of `parties` in one script, within
    /// the timeout. `Err`: Redis failed (the caller applies the policy).
    pub async fn acquire(
        self: &RedisLimits,
        parties: &[Party],
        tokens: u64,
    ) -> Result<(Decision, Lease), String> {
        if self.resting() {
            return Err(RESTING.into());
        }
        let member: Arc<str> = format!(
            "{}:{}",
            self.replica,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
        .into();
        let mut rate_keys = Vec::new();
        let mut incs = Vec::new();
        // Which party and field each rate counter and set belongs to.
        let mut rate_of: Vec<(usize, bool)> = Vec::new();
        let mut sets = Vec::new();
        let mut set_limits = Vec::new();
        let mut set_of = Vec::new();
        for (i, p) in parties.iter().enumerate() {
            if let Some(r) = p.limits.rpm {
                rate_keys.push(self.key(p, "rpm"));
                incs.push(gcra::increment(r, 1).to_string());
                rate_of.push((i, false));
            }
            if let Some(t) = p.limits.tpm {
                rate_keys.push(self.key(p, "tpm"));
                incs.push(gcra::increment(t, tokens).to_string());
                rate_of.push((i, true));
            }
            if let Some(n) = p.limits.concurrency {
                sets.push(self.key(p, "conc"));
                set_limits.push(n.to_string());
                set_of.push(i);
            }
        }
        let mut args = vec![
            rate_keys.len().to_string(),
            sets.len().to_string(),
            gcra::WINDOW_US.to_string(),
            LEASE.as_millis().to_string(),
            member.to_string(),
        ];
        args.extend(incs);
        args.extend(set_limits);
        let mut keys = rate_keys;
        keys.extend(sets.iter().cloned());
        let call = async {
            let mut conn = self.connection().await?;
            self.acquire
                .run::<Vec<i64>>(&mut conn, &keys, &args)
                .await
                .map_err(|e| e.to_string())
        };
        let out = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(format!("no answer within {:?}", self.timeout)),
        };
        self.recovered();
        let n = |i: usize| out.get(i).map_or(0, |v| u64::try_from(*v).unwrap_or(0));
        let mut state = vec![Counter::default(); parties.len()];
        for (k, (i, tokens)) in rate_of.iter().enumerate() {
            if *tokens {
                state[*i].tokens = n(2 + k);
            } else {
                state[*i].requests = n(2 + k);
            }
        }
        for (k, i) in set_of.iter().enumerate() {
            state[*i].in_flight = u32::try_from(n(2 + rate_of.len() + k)).unwrap_or(u32::MAX);
        }
        for (c, p) in state.iter_mut().zip(parties) {
            c.limits = p.limits;
        }
        let admitted = n(0) == 1;
        if admitted && !sets.is_empty() {
            self.leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(member.clone(), sets.clone());
        }
        Ok((
            Decision {
                now: n(1),
                admitted,
                state,
            },
            Lease {
                member,
                sets: if admitted { sets } else { Vec::new() },
            },
        ))
    }

    /// Ends a lease (in the background; if Redis is away, the lease expires
    /// by itself).
    pub fn release(&self, inner: &Arc<Inner>, lease: &Lease) {
        if lease.sets.is_empty() {
            return;
        }
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lease.member);
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let member = lease.member.clone();
        let sets = lease.sets.clone();
        let inner = inner.clone();
        crate::task::spawn("limit-release", async move {
            let Some(r) = &inner.redis else {
                return;
            };
            let Some(mut conn) = r.conn.lock().await.clone() else {
                return;
            };
            let mut pipe = redis::pipe();
            for s in &sets {
                pipe.cmd("ZREM").arg(s).arg(&*member).ignore();
            }
            let timeout = r.timeout.max(Duration::from_millis(200));
            let _ = tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await;
        });
    }

    /// Charges output tokens to the token counters of `parties` (in the
    /// background); if Redis fails, to this replica's counters.
    pub fn charge(&self, inner: &Arc<Inner>, parties: Vec<Party>, tokens: u64) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let keys: Vec<String> = parties.iter().map(|p| self.key(p, "tpm")).collect();
        let args: Vec<String> = parties
            .iter()
            .filter_map(|p| p.limits.tpm)
            .map(|t| gcra::increment(t, tokens).to_string())
            .collect();
        let script = self.charge.clone();
        let timeout = self.timeout.max(Duration::from_millis(200));
        let inner = inner.clone();
        crate::task::spawn("limit-charge", async move {
            let conn = match &inner.redis {
                Some(r) => r.conn.lock().await.clone(),
                None => None,
            };
            let done = match conn {
                Some(mut conn) => matches!(
                    tokio::time::timeout(timeout, script.run::<i64>(&mut conn, &keys, &args)).await,
                    Ok(Ok(_))
                ),
                None => false,
            };
            if !done {
                inner.memory_charge(&parties, tokens);
            }
        });
    }

    /// Starts renewing this replica's leases (once).
    pub fn renew_leases(&self, inner: &Arc<Inner>) {
        if self.renewing.swap(true, Ordering::AcqRel)
            || tokio::runtime::Handle::try_current().is_err()
        {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(inner);
        crate::task::spawn("limit-leases", async move {
            loop {
                tokio::time::sleep(RENEW).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let Some(r) = &inner.redis else {
                    return;
                };
                let (keys, mut args) = {
                    let leases = r.leases.lock().unwrap_or_else(|p| p.into_inner());
                    let mut keys = Vec::new();
                    let mut args = vec![LEASE.as_millis().to_string()];
                    for (member, sets) in leases.iter() {
                        for s in sets {
                            keys.push(s.clone());
                            args.push(member.to_string());
                        }
                    }
                    (keys, args)
                };
                if keys.is_empty() {
                    continue;
                }
                let conn = r.conn.lock().await.clone();
                if let Some(mut conn) = conn {
                    let renew = r.renew.clone();
                    let _ = tokio::time::timeout(
                        r.timeout.max(Duration::from_millis(200)),
                        renew.run::<i64>(&mut conn, &keys, &std::mem::take(&mut args)),
                    )
                    .await;
                }
            }
        });
    }
}
