//! Governance settings: gateway keys (`keys/*.yaml`), `auth`, rate limits,
//! budgets and spend, the audit log, data protection, and the price tables of
//! provider files. Raw serde structs here; validated into the types the
//! `governance` and `protect` modules build their runtime state from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::Problems;

// === promptgate.yaml sections ===

/// `auth:` — whether requests must carry a gateway key.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(default)]
    pub mode: Option<AuthMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// No key needed (the offline default); keys, when sent and known, still
    /// identify the caller.
    #[default]
    Off,
    /// Every API request needs a valid key.
    Required,
}

/// Where shared counters (rate limits, spend) live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Store {
    #[default]
    Memory,
    Sqlite,
    Redis,
}

/// What a rate limit does when its shared store (Redis) fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Fall back to this replica's own counters (counted, logged once).
    #[default]
    FailOpen,
    /// Refuse the request (503).
    FailClosed,
}

/// The rate-limit part of `limits:` (the rest of that section is the server's).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateStore {
    #[serde(default)]
    pub store: Option<Store>,
    #[serde(default)]
    pub redis: Option<RawRedisStore>,
    #[serde(default)]
    pub on_store_error: Option<OnStoreError>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedisStore {
    pub url: String,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
}

/// A Redis server a governance store uses.
#[derive(Debug, Clone)]
pub struct RedisStore {
    pub url: String,
    pub prefix: String,
    pub timeout: Duration,
}

/// Where rate-limit counters live.
#[derive(Debug, Clone, Default)]
pub struct RateLimitStore {
    /// `None`: in process (per replica).
    pub redis: Option<RedisStore>,
    pub on_store_error: OnStoreError,
}

/// `spend:` — where spend is kept and in which currency budgets are counted.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpend {
    #[serde(default)]
    pub store: Option<Store>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub redis: Option<RawRedisStore>,
    #[serde(default)]
    pub currency: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SpendConfig {
    /// The SQLite file (default `data/spend.sqlite` beside the gateway file),
    /// when Redis is not configured.
    pub path: PathBuf,
    pub redis: Option<RedisStore>,
    /// Every price table and money budget is in this currency (default `USD`).
    pub currency: String,
}

/// Most records `audit.queue` may hold (its slots are allocated up front).
pub const MAX_AUDIT_QUEUE: usize = 1_000_000;
/// Most rotated files `audit.keep` may keep.
pub const MAX_AUDIT_KEEP: u32 = 1000;

/// `audit:` — the audit log.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub stdout: Option<bool>,
    #[serde(default)]
    pub max_bytes: Option<u64>,
    #[serde(default)]
    pub keep: Option<u32>,
    #[serde(default)]
    pub queue: Option<usize>,
    #[serde(default)]
    pub content: Option<bool>,
}

#[derive(Debug, Clone, Default)]
pub struct AuditConfig {
    /// The JSON-lines file, if any (relative paths resolved beside the gateway file).
    pub path: Option<PathBuf>,
    /// Also (or only) to standard output, for container logging.
    pub stdout: bool,
    /// Rotate the file when it reaches this size.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
    /// Records waiting to be written at most; past it records are dropped and counted.
    pub queue: usize,
    /// Message content for every request (keys and routes may opt in alone).
    pub content: bool,
}

impl AuditConfig {
    pub fn enabled(&self) -> bool {
        self.path.is_some() || self.stdout
    }
}

/// `data_protection:` — detectors and the gateway-wide default policy.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProtect {
    #[serde(default)]
    pub policy: Option<DataPolicy>,
    /// Built-in detectors to run (default: all).
    #[serde(default)]
    pub detectors: Option<Vec<String>>,
    /// Operator-defined detectors: `{name, pattern}`.
    #[serde(default)]
    pub custom: Vec<RawCustomDetector>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCustomDetector {
    pub name: String,
    pub pattern: String,
}

/// What happens to a request in which a detector found something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataPolicy {
    /// Nothing is scanned.
    #[default]
    Off,
    /// Values are replaced by placeholders before the call and restored in the answer.
    Redact,
    /// The request is refused (400 `sensitive_data`).
    Block,
    /// The request may go to self-hosted targets only.
    Private,
}

#[derive(Debug, Clone, Default)]
pub struct ProtectConfig {
    /// The default for routes and keys that set none.
    pub policy: DataPolicy,
    /// The built-in detectors enabled, by name.
    pub detectors: Vec<String>,
    /// Operator-defined detectors: name and (validated) regular expression.
    pub custom: Vec<(String, String)>,
}

// === route and key settings ===

/// Rate limits of a key or a route: `{rpm, tpm, concurrency}`.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimits {
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub concurrency: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute (input counted before the call, output settled after).
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub concurrency: Option<u32>,
}

impl RateLimits {
    pub fn is_empty(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.concurrency.is_none()
    }
}

/// A route's governance settings (in its `routes.<name>` entry).
#[derive(Debug, Clone, Default)]
pub struct RouteGovernance {
    pub limits: RateLimits,
    /// `None`: the gateway default (`data_protection.policy`).
    pub data: Option<DataPolicy>,
    /// Audit records of this route carry message content.
    pub audit_content: bool,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouteAudit {
    #[serde(default)]
    pub content: Option<bool>,
}

/// One period's budget: tokens, money, or both.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudgetLimit {
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(default)]
    pub cost: Option<f64>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    #[serde(default)]
    pub daily: Option<RawBudgetLimit>,
    #[serde(default)]
    pub monthly: Option<RawBudgetLimit>,
    /// Over budget, serve from this route instead of refusing.
    #[serde(default)]
    pub fallback_route: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BudgetLimit {
    pub tokens: Option<u64>,
    /// In `spend.currency`.
    pub cost: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Budget {
    /// Per UTC day.
    pub daily: Option<BudgetLimit>,
    /// Per UTC calendar month.
    pub monthly: Option<BudgetLimit>,
    pub fallback_route: Option<String>,
}

/// One entry of a `keys/*.yaml` file: `ID: {sha256, …}`.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub sha256: String,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub team: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Route globs the key may use (default: all).
    #[serde(default)]
    pub routes: Option<Vec<String>>,
    /// Prompt globs the key may use (default: all).
    #[serde(default)]
    pub prompts: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Option<RawRateLimits>,
    #[serde(default)]
    pub budget: Option<RawBudget>,
    /// RFC 3339 time after which the key is refused.
    #[serde(default)]
    pub expires: Option<String>,
    #[serde(default)]
    pub data: Option<DataPolicy>,
    #[serde(default)]
    pub audit: Option<RawRouteAudit>,
    /// `false` turns the key off without deleting it.
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// A gateway key: who a client is and what it may do. The key itself is never
/// stored, only its SHA-256.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub id: String,
    pub file: PathBuf,
    /// The key's SHA-256.
    pub sha256: [u8; 32],
    pub owner: Option<String>,
    pub team: Option<String>,
    pub description: Option<String>,
    /// Route globs (`*` and `?`); empty = none allowed.
    pub routes: Vec<String>,
    pub prompts: Vec<String>,
    pub limits: RateLimits,
    pub budget: Option<Budget>,
    /// Unix seconds after which the key is refused.
    pub expires: Option<u64>,
    pub data: Option<DataPolicy>,
    pub audit_content: bool,
    pub enabled: bool,
}

// === provider price tables ===

/// `prices:` in a provider file: `{currency, models: {MODEL or "*": {input, output, cached}}}`,
/// prices per million tokens.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrices {
    #[serde(default)]
    pub currency: Option<String>,
    pub models: BTreeMap<String, RawPrice>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    pub input: f64,
    pub output: f64,
    #[serde(default)]
    pub cached: Option<f64>,
}

/// A model's price, per million tokens, in the table's currency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Cached input tokens (default: the input price).
    pub cached: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    pub currency: String,
    /// By model; `*` is the provider's default.
    pub models: BTreeMap<String, Price>,
}

impl PriceTable {
    /// The price of `model`, or the table's `*` entry.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.models
            .get(model)
            .or_else(|| self.models.get("*"))
            .copied()
    }
}

// === validation ===

/// The `keys/` folder beside the gateway file.
pub fn keys_dir(gateway_file: &Path) -> PathBuf {
    gateway_file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("keys")
}

pub(super) fn rate_limits(
    raw: Option<&RawRateLimits>,
    file: &Path,
    field: &str,
    problems: &mut Problems,
) -> RateLimits {
    let Some(r) = raw else {
        return RateLimits::default();
    };
    for (name, v) in [
        ("rpm", r.rpm),
        ("tpm", r.tpm),
        ("concurrency", r.concurrency.map(u64::from)),
    ] {
        if v == Some(0) {
            problems.add(
                file,
                format!("{field}.{name}"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
    }
    RateLimits {
        rpm: r.rpm,
        tpm: r.tpm,
        concurrency: r.concurrency,
    }
}

pub(super) fn price_table(
    raw: &RawPrices,
    currency: &str,
    file: &Path,
    problems: &mut Problems,
) -> PriceTable {
    let table_currency = raw.currency.clone().unwrap_or_else(|| currency.to_owned());
    if !table_currency.eq_ignore_ascii_case(currency) {
        problems.add(
            file,
            "prices.currency",
            format!("`{table_currency}` differs from `spend.currency` (`{currency}`): every price table must use it"),
        );
    }
    let mut models = BTreeMap::new();
    for (m, p) in &raw.models {
        let field = format!("prices.models.{m}");
        for (name, v) in [
            ("input", Some(p.input)),
            ("output", Some(p.output)),
            ("cached", p.cached),
        ] {
            if let Some(v) = v {
                if !v.is_finite() || v < 0.0 {
                    problems.add(
                        file,
                        format!("{field}.{name}"),
                        "must be a price of zero or more",
                    );
                }
            }
        }
        models.insert(
            m.clone(),
            Price {
                input: p.input,
                output: p.output,
                cached: p.cached.unwrap_or(p.input),
            },
        );
    }
    PriceTable {
        currency: table_currency,
        models,
    }
}

/// The governance sections of the gateway file, handed over by `config::load`.
pub(super) struct RawSections {
    pub auth: RawAuth,
    pub rate: RawRateStore,
    pub spend: RawSpend,
    pub audit: RawAudit,
    pub protect: RawProtect,
    /// `spend.currency`, already read (provider price tables are checked against it).
    pub currency: String,
}

/// The validated governance settings.
pub(super) struct Governance {
    pub auth: AuthMode,
    pub keys: BTreeMap<String, KeyConfig>,
    pub rate_store: RateLimitStore,
    pub spend: SpendConfig,
    pub audit: AuditConfig,
    pub protect: ProtectConfig,
}

pub(super) fn beside(gateway_file: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        gateway_file
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(p)
    }
}

fn redis_store(
    raw: Option<RawRedisStore>,
    file: &Path,
    field: &str,
    problems: &mut Problems,
) -> Option<RedisStore> {
    let r = raw?;
    if !(r.url.starts_with("redis://")
        || r.url.starts_with("rediss://")
        || r.url.starts_with("redis+unix://"))
    {
        problems.add(file, format!("{field}.url"), "must be a redis:// URL");
    }
    Some(RedisStore {
        timeout: problems.duration(
            file,
            &format!("{field}.timeout"),
            &r.timeout,
            Duration::from_millis(100),
        ),
        prefix: r.prefix.unwrap_or_else(|| "promptgate:".into()),
        url: r.url,
    })
}

pub(super) fn load(
    gateway_file: &Path,
    raw: RawSections,
    routes: &BTreeMap<String, super::RouteConfig>,
    problems: &mut Problems,
) -> Governance {
    let f = gateway_file;
    // Rate-limit store.
    let store = raw.rate.store.unwrap_or_default();
    let rate_redis = redis_store(raw.rate.redis, f, "limits.redis", problems);
    if store == Store::Redis && rate_redis.is_none() {
        problems.add(f, "limits.redis", "`store: redis` needs `redis: {url: …}`");
    }
    if store == Store::Sqlite {
        problems.add(f, "limits.store", "must be `memory` or `redis`");
    }
    if store == Store::Memory && rate_redis.is_some() {
        problems.add(
            f,
            "limits.redis",
            "is set but `limits.store` is `memory` (the default): add `store: redis` to keep the counters in Redis, or remove `redis`",
        );
    }
    let rate_store = RateLimitStore {
        redis: if store == Store::Redis {
            rate_redis
        } else {
            None
        },
        on_store_error: raw.rate.on_store_error.unwrap_or_default(),
    };
    // Spend.
    let spend_store = raw.spend.store.unwrap_or(Store::Sqlite);
    let spend_redis = redis_store(raw.spend.redis, f, "spend.redis", problems);
    if spend_store == Store::Redis && spend_redis.is_none() {
        problems.add(f, "spend.redis", "`store: redis` needs `redis: {url: …}`");
    }
    if spend_store == Store::Memory {
        problems.add(
            f,
            "spend.store",
            "must be `sqlite` or `redis` (spend is durable)",
        );
    }
    let spend = SpendConfig {
        path: beside(f, raw.spend.path.as_deref().unwrap_or("data/spend.sqlite")),
        redis: if spend_store == Store::Redis {
            spend_redis
        } else {
            None
        },
        currency: raw.currency,
    };
    // Audit.
    let a = raw.audit;
    let audit = AuditConfig {
        path: a
            .path
            .as_deref()
            .filter(|p| !p.trim().is_empty())
            .map(|p| beside(f, p)),
        stdout: a.stdout.unwrap_or(false),
        max_bytes: a.max_bytes.unwrap_or(100 * 1024 * 1024),
        keep: a.keep.unwrap_or(5),
        queue: a.queue.unwrap_or(10_000),
        content: a.content.unwrap_or(false),
    };
    if audit.max_bytes < 4096 {
        problems.add(f, "audit.max_bytes", "must be at least 4096");
    }
    if audit.queue == 0 || audit.queue > MAX_AUDIT_QUEUE {
        problems.add(
            f,
            "audit.queue",
            format!("must be from 1 to {MAX_AUDIT_QUEUE} records"),
        );
    }
    if audit.keep > MAX_AUDIT_KEEP {
        problems.add(
            f,
            "audit.keep",
            format!("must be at most {MAX_AUDIT_KEEP} rotated files"),
        );
    }
    if a.path.as_deref().is_some_and(|p| p.trim().is_empty()) {
        problems.add(
            f,
            "audit.path",
            "must name a file (leave it out for no file)",
        );
    }
    if audit.content && !audit.enabled() {
        problems.add(
            f,
            "audit.content",
            "records content only with a sink: set `path`, `stdout: true` or both",
        );
    }
    // Data protection.
    let p = raw.protect;
    let protect = ProtectConfig {
        policy: p.policy.unwrap_or_default(),
        detectors: p.detectors.unwrap_or_else(|| {
            crate::protect::BUILTIN
                .iter()
                .map(|s| (*s).to_owned())
                .collect()
        }),
        custom: p.custom.into_iter().map(|c| (c.name, c.pattern)).collect(),
    };
    for (i, d) in protect.detectors.iter().enumerate() {
        if !crate::protect::BUILTIN.contains(&d.as_str()) {
            problems.add(
                f,
                format!("data_protection.detectors[{i}]"),
                format!(
                    "unknown detector `{d}`; built-in detectors: {}",
                    crate::protect::BUILTIN.join(", ")
                ),
            );
        }
    }
    for (i, (name, pattern)) in protect.custom.iter().enumerate() {
        if let Err(e) = crate::protect::check_custom(name, pattern) {
            problems.add(f, format!("data_protection.custom[{i}]"), e);
        } else if protect.custom[..i].iter().any(|(n, _)| n == name) {
            problems.add(
                f,
                format!("data_protection.custom[{i}].name"),
                format!("detector `{name}` is defined twice"),
            );
        }
    }
    // Keys.
    let keys = load_keys(&keys_dir(f), routes, problems);
    Governance {
        auth: raw.auth.mode.unwrap_or_default(),
        keys,
        rate_store,
        spend,
        audit,
        protect,
    }
}

/// Reads every `keys/*.yaml` file: a map from key id to its entry. A missing
/// folder is no keys.
fn load_keys(
    dir: &Path,
    routes: &BTreeMap<String, super::RouteConfig>,
    problems: &mut Problems,
) -> BTreeMap<String, KeyConfig> {
    let mut keys: BTreeMap<String, KeyConfig> = BTreeMap::new();
    let files = match super::yaml_files(dir) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return keys,
        Err(e) => {
            problems.add(dir, "", format!("cannot read the keys folder: {e}"));
            return keys;
        }
    };
    let mut hashes: BTreeMap<[u8; 32], String> = BTreeMap::new();
    for file in files {
        let Some(raw) = super::read_yaml::<BTreeMap<String, RawKey>>(&file, problems) else {
            continue;
        };
        let reported = problems.list.len();
        for (id, k) in raw {
            if let Some(key) = validate_key(&file, id.clone(), k, routes, problems) {
                if let Some(prev) = keys.get(&id) {
                    problems.add(
                        &file,
                        &id,
                        format!("key id `{id}` is also defined in {}", prev.file.display()),
                    );
                    continue;
                }
                if let Some(other) = hashes.insert(key.sha256, id.clone()) {
                    problems.add(
                        &file,
                        format!("{id}.sha256"),
                        format!("the same key is already key `{other}`"),
                    );
                    continue;
                }
                keys.insert(id, key);
            }
        }
        if problems.list.len() > reported {
            locate_key_problems(&file, &mut problems.list[reported..]);
        }
    }
    keys
}

/// Gives the problems found in a keys file the line of the entry's field
/// they name (`ID.FIELD…`): the file is read again, only when it has problems.
fn locate_key_problems(file: &Path, found: &mut [super::Problem]) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    // The line an entry `id` starts on (ids may hold dots: the longest id
    // the field path begins with that has an entry wins).
    let entry = |id: &str| {
        let keys = [format!("{id}:"), format!("\"{id}\":"), format!("'{id}':")];
        lines
            .iter()
            .position(|l| keys.iter().any(|k| l.starts_with(k.as_str())))
    };
    for p in found.iter_mut().filter(|p| p.line.is_none()) {
        let mut cuts: Vec<usize> = p.field.match_indices('.').map(|(i, _)| i).collect();
        cuts.push(p.field.len());
        let Some((start, end)) = cuts
            .iter()
            .rev()
            .find_map(|&i| entry(&p.field[..i]).map(|s| (s, i)))
        else {
            continue;
        };
        let field = p.field.get(end + 1..).and_then(|r| r.split('.').next());
        let mut line = start;
        if let Some(f) = field {
            let inner = lines[start + 1..]
                .iter()
                .take_while(|l| l.is_empty() || l.starts_with([' ', '\t', '#']))
                .position(|l| l.trim_start().starts_with(&format!("{f}:")));
            if let Some(i) = inner {
                line = start + 1 + i;
            }
        }
        p.line = Some(line + 1);
    }
}

fn validate_key(
    file: &Path,
    id: String,
    k: RawKey,
    routes: &BTreeMap<String, super::RouteConfig>,
    problems: &mut Problems,
) -> Option<KeyConfig> {
    if !super::valid_id(&id) {
        problems.add(
            file,
            &id,
            "a key id must be letters, digits, `-`, `_` or `.`",
        );
        return None;
    }
    let sha256 = match hex32(&k.sha256) {
        Some(h) => h,
        None => {
            problems.add(
                file,
                format!("{id}.sha256"),
                "must be the key's SHA-256 as 64 hex digits (`promptgate keys new` prints it)",
            );
            return None;
        }
    };
    let expires = match k.expires.as_deref() {
        None => None,
        Some(s) => match humantime::parse_rfc3339_weak(s) {
            Ok(t) => Some(
                t.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            ),
            Err(e) => {
                problems.add(
                    file,
                    format!("{id}.expires"),
                    format!("`{s}` is not a time like 2027-01-31T00:00:00Z: {e}"),
                );
                None
            }
        },
    };
    let limits = rate_limits(k.limits.as_ref(), file, &format!("{id}.limits"), problems);
    let budget = k.budget.map(|b| {
        let mut limit = |l: Option<RawBudgetLimit>, name: &str| {
            l.map(|l| {
                if l.tokens == Some(0) || l.cost.is_some_and(|c| !c.is_finite() || c <= 0.0) {
                    problems.add(
                        file,
                        format!("{id}.budget.{name}"),
                        "a budget must be more than zero",
                    );
                }
                if l.tokens.is_none() && l.cost.is_none() {
                    problems.add(
                        file,
                        format!("{id}.budget.{name}"),
                        "give `tokens`, `cost` or both",
                    );
                }
                BudgetLimit {
                    tokens: l.tokens,
                    cost: l.cost,
                }
            })
        };
        Budget {
            daily: limit(b.daily, "daily"),
            monthly: limit(b.monthly, "monthly"),
            fallback_route: b.fallback_route,
        }
    });
    if let Some(r) = budget.as_ref().and_then(|b| b.fallback_route.as_ref()) {
        if !routes.contains_key(r) {
            problems.add(
                file,
                format!("{id}.budget.fallback_route"),
                format!("no route `{r}` is configured"),
            );
        }
    }
    Some(KeyConfig {
        id,
        file: file.to_owned(),
        sha256,
        owner: k.owner,
        team: k.team,
        description: k.description,
        routes: k.routes.unwrap_or_else(|| vec!["*".into()]),
        prompts: k.prompts.unwrap_or_else(|| vec!["*".into()]),
        limits,
        budget,
        expires,
        data: k.data,
        audit_content: k.audit.and_then(|a| a.content).unwrap_or(false),
        enabled: k.enabled.unwrap_or(true),
    })
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}
