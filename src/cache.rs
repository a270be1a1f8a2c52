//! The response cache: exact match on a stable hash of the canonical request
//! after prompt rendering and route resolution. Level 1 is in memory (moka,
//! bounded by bytes, per-entry TTL); an optional level 2 in Redis is shared by
//! replicas, with compressed entries and a short timeout: when Redis is down or
//! slow the gateway serves without it and counts the failure. Concurrent
//! identical misses make one upstream call (single flight). Entries hold the
//! canonical response, so a hit is replayed in any dialect, as JSON or as a
//! stream. Errors, cut streams and `finish_reason: error` are never stored.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::canonical::*;
use crate::config::{CacheConfig, CacheMode, RouteCache};

pub type Key = [u8; 32];

/// One cached response.
#[derive(Debug)]
pub struct Entry {
    pub response: ChatResponse,
    /// The target that produced it.
    pub target: String,
    pub route: String,
    pub prompt: Option<String>,
    pub created: SystemTime,
    pub ttl: Duration,
    pub bytes: u32,
}

impl Entry {
    pub fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.created)
            .unwrap_or_default()
    }
}

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

/// What the client asked of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Normal,
    /// Do not read; store the fresh answer (`Cache-Control: no-cache`).
    Refresh,
    /// Neither read nor store (`Cache-Control: no-store`).
    Bypass,
}

impl Directive {
    pub fn from_headers(h: &http::HeaderMap) -> Directive {
        if let Some(v) = h.get("x-promptgate-cache").and_then(|v| v.to_str().ok()) {
            match v.trim().to_ascii_lowercase().as_str() {
                "refresh" | "no-cache" => return Directive::Refresh,
                "bypass" | "no-store" => return Directive::Bypass,
                _ => {}
            }
        }
        let cc = h
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|d| d.trim().to_ascii_lowercase())
            .collect::<Vec<_>>();
        if cc.iter().any(|d| d == "no-store") {
            Directive::Bypass
        } else if cc.iter().any(|d| d == "no-cache") {
            Directive::Refresh
        } else {
            Directive::Normal
        }
    }
}

/// Whether a route's policy lets this request use the cache.
pub fn eligible(policy: &RouteCache, req: &ChatRequest) -> bool {
    match policy.mode {
        CacheMode::Off => false,
        CacheMode::On => true,
        CacheMode::Deterministic => {
            req.params.temperature == Some(0.0) || req.params.seed.is_some()
        }
    }
}

// === the key ===

fn content_json(c: &Content) -> Value {
    match c {
        Content::Text(t) => Value::String(t.clone()),
        Content::Parts(parts) => Value::Array(
            parts
                .iter()
                .map(|p| match p {
                    // A single text part means the same as plain text.
                    Part::Text(t) => json!({"text": t}),
                    Part::Image { url, detail } => json!({"image": url, "detail": detail}),
                    Part::Other(v) => v.clone(),
                })
                .collect(),
        ),
    }
}

fn normalized_content(c: &Content) -> Value {
    match c {
        Content::Parts(p) if p.len() == 1 && matches!(p[0], Part::Text(_)) => {
            Value::String(c.text().into_owned())
        }
        _ => content_json(c),
    }
}

fn nonzero(x: Option<f64>) -> Value {
    match x {
        Some(v) if v != 0.0 => json!(v),
        _ => Value::Null,
    }
}

/// The canonical form of everything that shapes the answer. Defaults are
/// normalized (absent = the API's default), order-insensitive parts are sorted
/// by the canonical writer, and fields that cannot change the output (`user`,
/// `stream`, `stream_options`) are left out.
pub fn canonical(
    route: &str,
    targets: &[&str],
    tenant: Option<&str>,
    prompt: Option<(&str, u32)>,
    req: &ChatRequest,
) -> Value {
    let p = &req.params;
    let messages: Vec<Value> = req
        .messages
        .iter()
        .map(|m| {
            json!({
                "role": match m.role { Role::Developer => "system", r => r.as_str() },
                "content": m.content.as_ref().map(normalized_content),
                "name": m.name,
                "tool_calls": m.tool_calls.iter().map(|t| json!([t.id, t.name, t.arguments])).collect::<Vec<_>>(),
                "tool_call_id": m.tool_call_id,
            })
        })
        .collect();
    let tools: Vec<Value> = req
        .tools
        .iter()
        .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters, "strict": t.strict}))
        .collect();
    let tool_choice = match (&req.tool_choice, req.tools.is_empty()) {
        (None | Some(ToolChoice::Auto), false) => Value::Null,
        (None | Some(ToolChoice::None), true) => Value::Null,
        (Some(ToolChoice::None), false) => json!("none"),
        (Some(ToolChoice::Auto), true) => Value::Null,
        (Some(ToolChoice::Required), _) => json!("required"),
        (Some(ToolChoice::Function(f)), _) => json!({"function": f}),
    };
    let response_format = match &req.response_format {
        None | Some(ResponseFormat::Text) => Value::Null,
        Some(ResponseFormat::JsonObject) => json!("json_object"),
        Some(ResponseFormat::JsonSchema(s)) => json!({"json_schema": s}),
    };
    json!({
        "v": 1,
        "route": route,
        "targets": targets,
        "tenant": tenant,
        "prompt": prompt.map(|(id, v)| json!([id, v])),
        "messages": messages,
        "temperature": p.temperature,
        "top_p": p.top_p.filter(|t| *t != 1.0),
        "max_output": p.output_limit(),
        "stop": p.stop,
        "seed": p.seed,
        "n": p.n.filter(|n| *n != 1),
        "presence_penalty": nonzero(p.presence_penalty),
        "frequency_penalty": nonzero(p.frequency_penalty),
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls.filter(|p| !*p),
        "response_format": response_format,
        "extra": Value::Object(req.extra.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect::<Map<_, _>>()),
    })
}

/// Writes JSON with object keys sorted and nulls dropped, so equal requests
/// give equal bytes whatever their field order.
fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| k)
                .collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                write_canonical(&m[k.as_str()], out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

pub fn key_of(canonical: &Value) -> Key {
    let mut buf = Vec::with_capacity(1024);
    write_canonical(canonical, &mut buf);
    Sha256::digest(&buf).into()
}

/// A short, stable tenant id from the client's credential (never the key itself).
pub fn tenant_of(h: &http::HeaderMap) -> Option<String> {
    let v = h
        .get(http::header::AUTHORIZATION)
        .or_else(|| h.get("x-api-key"))?
        .as_bytes();
    let d = Sha256::digest(v);
    Some(d[..8].iter().map(|b| format!("{b:02x}")).collect())
}

// === assembling a streamed response ===

/// Text, reasoning, tool calls (by their stream index) and finish reason of one
/// choice being assembled.
#[derive(Default)]
struct PartialChoice {
    text: String,
    reasoning: Option<String>,
    tool_calls: BTreeMap<u32, ToolCall>,
    finish: Option<FinishReason>,
}

/// Rebuilds a complete response from stream events, to store a stream once it
/// has ended properly. Choice and tool-call indexes are the backend's numbers, so
/// they key maps and never size anything; what is kept is bounded by a byte limit.
pub struct Assembler {
    meta: StreamMeta,
    choices: BTreeMap<u32, PartialChoice>,
    usage: Option<Usage>,
    bytes: usize,
    limit: usize,
}

impl Assembler {
    /// An assembler that gives up (and yields an uncacheable response) once it
    /// holds more than `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        Assembler {
            meta: StreamMeta::default(),
            choices: BTreeMap::new(),
            usage: None,
            bytes: 0,
            limit,
        }
    }

    /// Past the limit: what was held is dropped and nothing will be stored.
    fn overflowed(&self) -> bool {
        self.bytes > self.limit
    }

    /// Counts `n` more bytes (a fixed cost for each new choice or tool call
    /// included); false once past the limit, after dropping everything held.
    fn grow(&mut self, n: usize) -> bool {
        self.bytes = self.bytes.saturating_add(n);
        if self.overflowed() {
            self.choices = BTreeMap::new();
        }
        !self.overflowed()
    }

    pub fn push(&mut self, ev: &StreamEvent) {
        if self.overflowed() {
            return;
        }
        match ev {
            StreamEvent::Meta(m) => self.meta = m.clone(),
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::Done => {}
            StreamEvent::Delta(d) => {
                let mut size = d.content.as_ref().map_or(0, String::len)
                    + d.reasoning.as_ref().map_or(0, String::len);
                if !self.choices.contains_key(&d.choice) {
                    size += 64;
                }
                for t in &d.tool_calls {
                    size += [&t.id, &t.name, &t.arguments]
                        .iter()
                        .map(|x| x.as_ref().map_or(0, String::len))
                        .sum::<usize>()
                        + 16;
                }
                if !self.grow(size) {
                    return;
                }
                let c = self.choices.entry(d.choice).or_default();
                if let Some(t) = &d.content {
                    c.text.push_str(t);
                }
                if let Some(r) = &d.reasoning {
                    c.reasoning.get_or_insert_with(String::new).push_str(r);
                }
                for t in &d.tool_calls {
                    let call = c.tool_calls.entry(t.index).or_insert_with(|| ToolCall {
                        id: String::new(),
                        name: String::new(),
                        arguments: String::new(),
                    });
                    if let Some(id) = &t.id {
                        call.id.clone_from(id);
                    }
                    if let Some(n) = &t.name {
                        call.name.push_str(n);
                    }
                    if let Some(a) = &t.arguments {
                        call.arguments.push_str(a);
                    }
                }
                if d.finish_reason.is_some() {
                    c.finish = d.finish_reason;
                }
            }
        }
    }

    /// The assembled response. After an overflow it has no choices, which
    /// [`cacheable`] refuses.
    pub fn finish(self) -> ChatResponse {
        ChatResponse {
            id: self.meta.id,
            created: self.meta.created,
            model: self.meta.model,
            choices: self
                .choices
                .into_iter()
                .map(|(index, c)| {
                    let tool_calls: Vec<ToolCall> = c.tool_calls.into_values().collect();
                    Choice {
                        index,
                        message: Message {
                            role: Role::Assistant,
                            content: (!c.text.is_empty() || tool_calls.is_empty())
                                .then_some(Content::Text(c.text)),
                            name: None,
                            tool_calls,
                            tool_call_id: None,
                            reasoning: c.reasoning,
                        },
                        finish_reason: c.finish,
                    }
                })
                .collect(),
            usage: self.usage,
            system_fingerprint: self.meta.system_fingerprint,
        }
    }
}

/// Whether a response may be stored.
pub fn cacheable(resp: &ChatResponse) -> bool {
    !resp.choices.is_empty()
        && resp
            .choices
            .iter()
            .all(|c| c.finish_reason.is_some() && c.finish_reason != Some(FinishReason::Error))
}

// === the store ===

/// The outcome of waiting for another request's identical call.
#[derive(Clone)]
pub enum Flight {
    Pending,
    Done(Arc<Entry>),
    Failed,
}

pub struct Cache {
    l1: moka::future::Cache<Key, Arc<Entry>>,
    l2: Option<Arc<crate::cache_redis::RedisTier>>,
    /// The registered leader of each key in flight: its token and its outcome.
    inflight: Mutex<HashMap<Key, (u64, watch::Receiver<Flight>)>>,
    /// Leader tokens, unique for the life of the cache.
    next_token: std::sync::atomic::AtomicU64,
    /// Larger responses are served but not stored.
    max_entry_bytes: u64,
    pub metrics: CacheMetrics,
}

#[derive(Clone)]
pub struct CacheMetrics {
    pub evictions: prometheus::IntCounter,
    pub redis_errors: prometheus::IntCounterVec,
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
    cache: Arc<Cache>,
}

impl Lease {
    /// Whether waiters are following this lease.
    pub fn registered(&self) -> bool {
        self.token.is_some()
    }

    pub async fn complete(mut self, entry: Option<Entry>) -> Option<Arc<Entry>> {
        let stored = match entry {
            Some(e) => Some(self.cache.insert(self.key, e).await),
            None => None,
        };
        self.finish(stored.clone().map_or(Flight::Failed, Flight::Done));
        stored
    }

    /// Gives up the in-flight entry (first, so a waiter told of the outcome
    /// finds the key free) and tells the waiters.
    fn finish(&mut self, outcome: Flight) {
        if let Some(token) = self.token.take() {
            self.cache.release(&self.key, token);
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

impl Cache {
    pub fn new(cfg: &CacheConfig, metrics: CacheMetrics) -> Arc<Cache> {
        let ev = metrics.evictions.clone();
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
                    ev.inc();
                }
            });
        if let Some(tti) = cfg.time_to_idle {
            b = b.time_to_idle(tti);
        }
        Arc::new(Cache {
            l1: b.build(),
            l2: cfg.redis.as_ref().map(|r| {
                Arc::new(crate::cache_redis::RedisTier::new(
                    r,
                    cfg.max_entry_bytes,
                    metrics.redis_errors.clone(),
                ))
            }),
            inflight: Mutex::new(HashMap::new()),
            next_token: std::sync::atomic::AtomicU64::new(1),
            max_entry_bytes: cfg.max_entry_bytes,
            metrics,
        })
    }

    /// An assembler for a stream to be stored: it gives up where `insert` would
    /// refuse the entry (`cache.max_entry_bytes`), so a longer stream is served
    /// without being collected.
    pub fn assembler(&self) -> Assembler {
        Assembler::with_limit(usize::try_from(self.max_entry_bytes).unwrap_or(usize::MAX))
    }

    pub fn redis(&self) -> Option<&Arc<crate::cache_redis::RedisTier>> {
        self.l2.as_ref()
    }

    async fn insert(&self, key: Key, e: Entry) -> Arc<Entry> {
        let e = Arc::new(e);
        if u64::from(e.bytes) > self.max_entry_bytes {
            return e;
        }
        if let Some(l2) = &self.l2 {
            l2.store(&key, &e);
        }
        self.l1.insert(key, e.clone()).await;
        e
    }

    async fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        if let Some(e) = self.l1.get(key).await {
            return Some(e);
        }
        let l2 = self.l2.as_ref()?;
        let e = Arc::new(l2.load(key).await?);
        self.l1.insert(*key, e.clone()).await;
        Some(e)
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
            cache: self.clone(),
        })
    }

    /// Looks `key` up (unless refreshing); on a miss either waits for an
    /// identical call already in flight, at most until the request's own
    /// `deadline`, or makes this request the leader.
    pub async fn lookup(self: &Arc<Self>, key: Key, refresh: bool, deadline: Instant) -> Lookup {
        if !refresh {
            if let Some(e) = self.get(&key).await {
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
                        let token = self
                            .next_token
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

    /// Drops entries (all, or of one route, or of one prompt) here and in Redis.
    pub async fn purge(&self, route: Option<&str>, prompt: Option<&str>) -> Result<u64, String> {
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
            removed += l2.purge(route, prompt).await?;
        }
        Ok(removed)
    }

    /// (entries, bytes) in memory.
    pub async fn figures(&self) -> (u64, u64) {
        self.l1.run_pending_tasks().await;
        (self.l1.entry_count(), self.l1.weighted_size())
    }
}

#[cfg(test)]
mod flight_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures_util::FutureExt;

    fn cache() -> Arc<Cache> {
        Cache::new(
            &CacheConfig {
                max_bytes: 1 << 20,
                max_entry_bytes: 1 << 20,
                ttl: Duration::from_secs(60),
                time_to_idle: None,
                redis: None,
            },
            CacheMetrics {
                evictions: prometheus::IntCounter::new("e", "e").unwrap(),
                redis_errors: prometheus::IntCounterVec::new(
                    prometheus::Opts::new("r", "r"),
                    &["op"],
                )
                .unwrap(),
            },
        )
    }

    fn entry() -> Entry {
        let response = crate::backend::openai::decode_chat_response(
            br#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#,
        )
        .unwrap();
        Entry {
            bytes: weight(&response),
            response,
            target: "p/m".into(),
            route: "r".into(),
            prompt: None,
            created: SystemTime::now(),
            ttl: Duration::from_secs(60),
        }
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
}

/// The approximate memory an entry takes: its text plus a fixed cost for the
/// entry, key, response structure and the cache's own bookkeeping (measured at
/// about 1.5 KB per small entry under load).
pub fn weight(resp: &ChatResponse) -> u32 {
    let mut n = 1200 + resp.id.len() + resp.model.len();
    for c in &resp.choices {
        n += 64;
        if let Some(t) = &c.message.content {
            n += t.text().len();
        }
        if let Some(r) = &c.message.reasoning {
            n += r.len();
        }
        for t in &c.message.tool_calls {
            n += 48 + t.id.len() + t.name.len() + t.arguments.len();
        }
    }
    n.min(u32::MAX as usize) as u32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(body: &str) -> ChatRequest {
        crate::backend::openai::decode_chat_request(body.as_bytes()).unwrap()
    }

    fn key(body: &str) -> Key {
        key_of(&canonical("r", &["p/m"], Some("t"), None, &req(body)))
    }

    const BASE: &str = r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0}"#;

    #[test]
    fn every_output_affecting_field_changes_the_key() {
        let base = key(BASE);
        let variants = [
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi!"}],"temperature":0}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:x"}}]}],"temperature":0}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0.5}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"top_p":0.5}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"max_tokens":5}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"stop":["x"]}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"seed":1}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"tools":[{"type":"function","function":{"name":"f"}}]}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required"}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"response_format":{"type":"json_object"}}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"reasoning_effort":"high"}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"thinking":{"type":"enabled"}}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"top_k":3}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"presence_penalty":0.5}"#,
        ];
        for v in variants {
            assert_ne!(key(v), base, "{v}");
        }
        let r = req(BASE);
        assert_ne!(
            key_of(&canonical("r", &["p/m"], Some("other"), None, &r)),
            base,
            "tenant"
        );
        assert_ne!(
            key_of(&canonical("r", &["p/x"], Some("t"), None, &r)),
            base,
            "target"
        );
        assert_ne!(
            key_of(&canonical("r", &["p/m"], Some("t"), Some(("p", 2)), &r)),
            base,
            "prompt version"
        );
    }

    #[test]
    fn order_defaults_and_non_output_fields_do_not() {
        let base = key(BASE);
        for same in [
            r#"{"temperature":0,"messages":[{"content":"s","role":"system"},{"content":"hi","role":"user"}],"model":"r"}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"temperature":0,"top_p":1,"n":1,"presence_penalty":0}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"user":"u1","stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"r","messages":[{"role":"developer","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"response_format":{"type":"text"}}"#,
        ] {
            assert_eq!(key(same), base, "{same}");
        }
        let a = key(
            r#"{"model":"r","messages":[{"role":"user","content":"hi"}],"temperature":0,"vendor":{"a":1,"b":2}}"#,
        );
        let b = key(
            r#"{"model":"r","messages":[{"role":"user","content":"hi"}],"temperature":0,"vendor":{"b":2,"a":1}}"#,
        );
        assert_eq!(a, b, "nested field order");
    }

    #[test]
    fn directives_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(Directive::from_headers(&h), Directive::Normal);
        h.insert("cache-control", "max-age=0, no-cache".parse().unwrap());
        assert_eq!(Directive::from_headers(&h), Directive::Refresh);
        h.insert("cache-control", "no-store".parse().unwrap());
        assert_eq!(Directive::from_headers(&h), Directive::Bypass);
        h.remove("cache-control");
        h.insert("x-promptgate-cache", "refresh".parse().unwrap());
        assert_eq!(Directive::from_headers(&h), Directive::Refresh);
    }

    fn delta(choice: u32, text: &str) -> StreamEvent {
        StreamEvent::Delta(Delta {
            choice,
            content: Some(text.into()),
            ..Delta::default()
        })
    }

    #[test]
    fn assembler_keys_choices_by_index_and_sizes_nothing_from_it() {
        let mut a = Assembler::with_limit(1 << 20);
        a.push(&delta(u32::MAX, "far"));
        a.push(&delta(0, "near"));
        a.push(&StreamEvent::Delta(Delta {
            choice: u32::MAX,
            tool_calls: vec![ToolCallDelta {
                index: u32::MAX,
                id: Some("c1".into()),
                name: Some("f".into()),
                arguments: Some("{}".into()),
            }],
            finish_reason: Some(FinishReason::ToolCalls),
            ..Delta::default()
        }));
        a.push(&StreamEvent::Delta(Delta {
            choice: 0,
            finish_reason: Some(FinishReason::Stop),
            ..Delta::default()
        }));
        let r = a.finish();
        assert_eq!(r.choices.len(), 2);
        assert_eq!(r.choices[0].index, 0);
        assert_eq!(
            r.choices[0].message.content.as_ref().unwrap().text(),
            "near"
        );
        assert_eq!(r.choices[1].index, u32::MAX);
        assert_eq!(r.choices[1].message.tool_calls.len(), 1);
        assert_eq!(r.choices[1].message.tool_calls[0].name, "f");
        assert!(cacheable(&r));
    }

    #[test]
    fn assembler_gives_up_past_its_byte_limit() {
        let mut a = Assembler::with_limit(1000);
        for _ in 0..100 {
            a.push(&delta(0, "0123456789"));
        }
        a.push(&StreamEvent::Delta(Delta {
            choice: 0,
            finish_reason: Some(FinishReason::Stop),
            ..Delta::default()
        }));
        assert!(a.bytes <= 1200 && a.choices.is_empty());
        let r = a.finish();
        assert!(!cacheable(&r), "an overflowed assembly is never stored");
        // Many distinct indexes count too.
        let mut a = Assembler::with_limit(10_000);
        for i in 0..100_000u32 {
            a.push(&delta(i.wrapping_mul(40_503), ""));
        }
        assert!(a.choices.is_empty() && a.overflowed());
    }
}
