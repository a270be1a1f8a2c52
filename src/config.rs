//! Configuration loading, in two phases: raw serde structs read from YAML (unknown
//! keys are errors), then validation into a [`Config`] whose cross-references
//! (route → provider → model) are checked. Every problem names its file and field.
//! This is the only module that knows YAML.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

mod governance;
mod prompts;
mod retrievers;
mod routes;
mod shadow;
mod telemetry;

pub use governance::{
    keys_dir, AuditConfig, AuthMode, Budget, BudgetLimit, DataPolicy, KeyConfig, OnStoreError,
    Price, PriceTable, ProtectConfig, RateLimitStore, RateLimits, RedisStore, RouteGovernance,
    SpendConfig,
};

pub use retrievers::{
    retrievers_dir, ChunkConfig, Mode, RetrieverConfig, RetrieverKind, Weights, DEFAULT_TEMPLATE,
};
pub use routes::{
    ArmConfig, BreakerConfig, RetryPolicy, RouteConfig, Strategy, Subject, TargetConfig,
};
pub use shadow::{Readiness, ShadowConfig, ShadowStore};
pub use telemetry::{peek_log_format, HeaderSource, LogFormat, TracingConfig};

use crate::backend::transport::{ResponseLimits, Timeouts};
use crate::backend::{Kind, Settings};
use crate::canonical::{ChatRequest, Params};

// === raw files ===

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    routes: BTreeMap<String, routes::RawRoute>,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    breaker: routes::RawBreaker,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    auth: governance::RawAuth,
    #[serde(default)]
    spend: governance::RawSpend,
    #[serde(default)]
    audit: governance::RawAudit,
    #[serde(default)]
    data_protection: governance::RawProtect,
    #[serde(default)]
    tls: Option<RawTls>,
    /// The same-dialect fast path (OpenAI client, OpenAI-compatible target):
    /// on unless set to `false`.
    #[serde(default)]
    fast_path: Option<bool>,
    /// `shadow: {store: PATH}`: where shadow comparisons are kept.
    #[serde(default)]
    shadow: Option<shadow::RawShadowStore>,
    /// `text` (default) or `json`: read at start only.
    #[serde(default)]
    log_format: Option<String>,
    /// OpenTelemetry traces over OTLP/HTTP; off without it. Read at start only.
    #[serde(default)]
    tracing: Option<telemetry::RawTracing>,
}

/// `tls: {cert: PATH, key: PATH}`: PEM files, relative to the gateway file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
}

/// TLS on the public listener: where the pair lives, and the pair as read.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub pair: crate::tls::Pair,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default)]
    max_bytes: Option<u64>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    time_to_idle: Option<String>,
    #[serde(default)]
    max_entry_bytes: Option<u64>,
    #[serde(default)]
    redis: Option<RawRedis>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: String,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
}

/// The response cache's settings (process-wide; read at start).
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Memory bound of the in-process tier, in bytes.
    pub max_bytes: u64,
    /// TTL for routes that do not set their own.
    pub ttl: Duration,
    pub time_to_idle: Option<Duration>,
    /// The largest response either tier stores or reads back, in bytes.
    pub max_entry_bytes: u64,
    pub redis: Option<RedisConfig>,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub timeout: Duration,
    pub prefix: String,
    /// The environment variable holding the key that signs entries.
    pub secret_env: Option<String>,
    /// Its value, filled in at start (`crate::load`).
    pub secret: Option<Secret>,
}

/// Secret bytes that never show in `Debug` output or logs.
#[derive(Clone)]
pub struct Secret(pub std::sync::Arc<[u8]>);

/// The largest `cache.max_entry_bytes`: it bounds what one Redis entry may
/// decompress to, so even a forged entry (no secret configured) costs at most this.
pub const MAX_CACHE_ENTRY_BYTES: u64 = 64 * 1024 * 1024;

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A route's cache policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    #[default]
    Off,
    On,
    /// Only requests with temperature 0 or a seed.
    Deterministic,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RouteCache {
    pub mode: CacheMode,
    /// `None`: the gateway's default TTL.
    pub ttl: Option<Duration>,
    /// Shared by all clients instead of partitioned by their key.
    pub shared: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    key_env: Option<String>,
}

/// The admin listener: its own address (loopback by default) and its own key.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Environment variable holding the admin key; without it admin calls are refused.
    pub key_env: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    max_body_bytes: Option<usize>,
    #[serde(default)]
    max_concurrency: Option<usize>,
    #[serde(default)]
    request_timeout: Option<String>,
    #[serde(default)]
    header_read_timeout: Option<String>,
    #[serde(default)]
    idle_timeout: Option<String>,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    shutdown_grace: Option<String>,
    #[serde(default)]
    drain_delay: Option<String>,
    #[serde(default)]
    fail_readiness_on_invalid_config: Option<bool>,
    #[serde(default)]
    list_ids_in_errors: Option<bool>,
    #[serde(default)]
    write_timeout: Option<String>,
    #[serde(default)]
    body_read_timeout: Option<String>,
    #[serde(default)]
    max_streams: Option<u32>,
    /// Where rate-limit counters live (`memory` or `redis`).
    #[serde(flatten)]
    rate: governance::RawRateStore,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawParams {
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    stop: Option<Vec<String>>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    /// Backend-specific fields added to the request body as they are.
    #[serde(default)]
    extra: Map<String, Value>,
}

impl RawParams {
    fn into_overrides(self) -> ParamOverrides {
        ParamOverrides {
            params: Params {
                temperature: self.temperature,
                top_p: self.top_p,
                max_tokens: self.max_tokens,
                max_completion_tokens: self.max_completion_tokens,
                stop: self.stop.unwrap_or_default(),
                seed: self.seed,
                n: None,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                user: None,
            },
            extra: self.extra,
        }
    }
}

/// What a model can serve. A request needing something its target lacks is
/// rejected with a 400 naming the capability, before anything is sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub streaming: bool,
    pub tools: bool,
    pub json_mode: bool,
    pub embeddings: bool,
    pub vision: bool,
    /// Prompt + output tokens the model accepts, when known.
    pub context_window: Option<u32>,
}

impl Capabilities {
    /// Everything, with no known context window.
    pub const ALL: Capabilities = Capabilities {
        streaming: true,
        tools: true,
        json_mode: true,
        embeddings: true,
        vision: true,
        context_window: None,
    };
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities::ALL
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawCapabilities {
    #[serde(default)]
    streaming: Option<bool>,
    #[serde(default)]
    tools: Option<bool>,
    #[serde(default)]
    json_mode: Option<bool>,
    #[serde(default)]
    embeddings: Option<bool>,
    #[serde(default)]
    vision: Option<bool>,
    #[serde(default)]
    context_window: Option<u32>,
}

impl RawCapabilities {
    fn over(self, base: Capabilities) -> Capabilities {
        Capabilities {
            streaming: self.streaming.unwrap_or(base.streaming),
            tools: self.tools.unwrap_or(base.tools),
            json_mode: self.json_mode.unwrap_or(base.json_mode),
            embeddings: self.embeddings.unwrap_or(base.embeddings),
            vision: self.vision.unwrap_or(base.vision),
            context_window: self.context_window.or(base.context_window),
        }
    }
}

/// A model entry: a bare name, or a name with its own capabilities.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawModel {
    Name(String),
    Detailed {
        name: String,
        #[serde(flatten)]
        caps: RawCapabilitiesFlat,
    },
}

/// `RawCapabilities` for use under `flatten` (which cannot deny unknown fields).
#[derive(Deserialize, Default)]
struct RawCapabilitiesFlat {
    #[serde(default)]
    streaming: Option<bool>,
    #[serde(default)]
    tools: Option<bool>,
    #[serde(default)]
    json_mode: Option<bool>,
    #[serde(default)]
    embeddings: Option<bool>,
    #[serde(default)]
    vision: Option<bool>,
    #[serde(default)]
    context_window: Option<u32>,
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    kind: RawKind,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    timeouts: RawTimeouts,
    /// Bytes of one response body or stream (default 64 MiB).
    #[serde(default)]
    max_response_bytes: Option<u64>,
    /// Bytes of one stream line or SSE event (default 8 MiB).
    #[serde(default)]
    max_line_bytes: Option<u64>,
    #[serde(default)]
    models: Option<Vec<RawModel>>,
    #[serde(default)]
    capabilities: RawCapabilities,
    #[serde(default)]
    self_hosted: Option<bool>,
    /// Active health checks: `{interval: 10s}`.
    #[serde(default)]
    health_check: Option<RawHealthCheck>,
    #[serde(default)]
    stream_usage: Option<bool>,
    /// OpenAI-compatible servers that only know the legacy function-calling roles.
    #[serde(default)]
    legacy_functions: Option<bool>,
    #[serde(default)]
    chat_path: Option<String>,
    #[serde(default)]
    embeddings_path: Option<String>,
    /// Prices per million tokens, per model.
    #[serde(default)]
    prices: Option<governance::RawPrices>,
}

/// A provider file's `kind:`, looked up in the backend table.
struct RawKind(&'static Kind);

impl<'de> Deserialize<'de> for RawKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        match crate::backend::kind(&name) {
            Some(k) => Ok(RawKind(k)),
            None => {
                let known: Vec<String> = crate::backend::KINDS
                    .iter()
                    .map(|k| format!("`{}`", k.name))
                    .collect();
                Err(serde::de::Error::custom(format_args!(
                    "unknown variant `{name}`, expected one of {}",
                    known.join(", ")
                )))
            }
        }
    }
}

/// A provider file: the fields every provider has ([`RawProvider`], unknown keys
/// refused), and the sections named after a kind (`zhipu:` …), kept as JSON for
/// that kind to read.
struct RawProviderFile {
    common: RawProvider,
    sections: BTreeMap<&'static str, Value>,
}

impl<'de> Deserialize<'de> for RawProviderFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ProviderFileVisitor)
    }
}

struct ProviderFileVisitor;

impl<'de> serde::de::Visitor<'de> for ProviderFileVisitor {
    type Value = RawProviderFile;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a provider file (a mapping)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let mut sections = BTreeMap::new();
        let common =
            RawProvider::deserialize(serde::de::value::MapAccessDeserializer::new(KindSections {
                inner: map,
                sections: &mut sections,
            }))?;
        Ok(RawProviderFile { common, sections })
    }
}

/// The keys of a provider file with the kind sections taken out (into `sections`).
struct KindSections<'s, A> {
    inner: A,
    sections: &'s mut BTreeMap<&'static str, Value>,
}

enum KeyOrSection<T, K> {
    Key(T),
    Section(&'static str, K),
}

/// Reads one key: a kind's section name, or a key `K` deserializes. The key is
/// judged inside the deserializer's own visit, so an unknown key is reported at
/// its line, as a derived struct would.
struct SectionSeed<K>(K);

impl<'de, K: serde::de::DeserializeSeed<'de>> serde::de::DeserializeSeed<'de> for SectionSeed<K> {
    type Value = KeyOrSection<K::Value, K>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, K: serde::de::DeserializeSeed<'de>> serde::de::Visitor<'de> for SectionSeed<K> {
    type Value = KeyOrSection<K::Value, K>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        use serde::de::IntoDeserializer;
        if let Some(kind) = crate::backend::kind(key).filter(|k| k.section) {
            return Ok(KeyOrSection::Section(kind.name, self.0));
        }
        self.0
            .deserialize(key.into_deserializer())
            .map(KeyOrSection::Key)
    }
}

impl<'de, A: serde::de::MapAccess<'de>> serde::de::MapAccess<'de> for KindSections<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let mut seed = seed;
        loop {
            match self.inner.next_key_seed(SectionSeed(seed))? {
                None => return Ok(None),
                Some(KeyOrSection::Key(k)) => return Ok(Some(k)),
                Some(KeyOrSection::Section(name, back)) => {
                    let value: Value = self.inner.next_value()?;
                    // `zhipu:` with nothing under it is no section.
                    if !value.is_null() && self.sections.insert(name, value).is_some() {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate field `{name}`"
                        )));
                    }
                    seed = back;
                }
            }
        }
    }

    fn next_value_seed<V: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, A::Error> {
        self.inner.next_value_seed(seed)
    }
}

/// A kind's own section of a provider file, handed to the kind's parser
/// ([`Kind::settings`]): its problems are reported as `<kind>.<field>`.
pub struct Section<'a> {
    name: &'static str,
    value: Option<&'a Value>,
    file: &'a Path,
    problems: &'a mut Problems,
}

impl Section<'_> {
    /// Whether the file has the section.
    pub fn is_present(&self) -> bool {
        self.value.is_some()
    }

    /// The section read into the kind's own struct (which should deny unknown
    /// fields); `None` when the file has no section or it does not fit (a
    /// problem is reported then).
    pub fn parse<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        let value = self.value?;
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let path = e.path().to_string();
                let field = if path == "." { String::new() } else { path };
                self.problem(&field, e.into_inner().to_string());
                None
            }
        }
    }

    /// Reports a problem with `field` of the section (the section itself when empty).
    pub fn problem(&mut self, field: &str, message: impl Into<String>) {
        let field = if field.is_empty() {
            self.name.to_owned()
        } else {
            format!("{}.{field}", self.name)
        };
        self.problems.add(self.file, field, message);
    }

    /// A duration field of the section (`30m`), `default` when unset or invalid.
    pub fn duration(&mut self, field: &str, raw: &Option<String>, default: Duration) -> Duration {
        let field = format!("{}.{field}", self.name);
        self.problems.duration(self.file, &field, raw, default)
    }
}

/// Text a file may write as a bare number or boolean (`keep_alive: -1`): YAML
/// reads those as numbers, a kind's section as JSON keeps them so, the setting
/// wants the text (as reading the YAML straight into a string would).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Text(s)),
            Value::Number(n) => Ok(Text(n.to_string())),
            Value::Bool(b) => Ok(Text(b.to_string())),
            _ => Err(serde::de::Error::custom("expected a string")),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    interval: String,
    /// The longest one check may take (default 10s).
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default)]
    connect: Option<String>,
    #[serde(default)]
    headers: Option<String>,
    #[serde(default)]
    idle: Option<String>,
    #[serde(default)]
    total: Option<String>,
}

// === validated config ===

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    Bearer,
    Header(String),
    None,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub id: String,
    pub file: PathBuf,
    pub kind: &'static Kind,
    pub description: Option<String>,
    pub base_url: String,
    pub api_key_env: Option<String>,
    pub auth: Auth,
    pub headers: BTreeMap<String, String>,
    pub timeouts: Timeouts,
    /// How much of one answer the gateway holds before ending it as malformed.
    pub limits: ResponseLimits,
    /// The models routes may use, with their capabilities; `None` = any model,
    /// with the provider's capabilities.
    pub models: Option<Vec<(String, Capabilities)>>,
    pub capabilities: Capabilities,
    pub self_hosted: bool,
    /// How often to run the provider's active health check, if at all.
    pub health_check: Option<Duration>,
    pub stream_usage: bool,
    pub legacy_functions: bool,
    pub chat_path: String,
    pub embeddings_path: String,
    /// Prices per million tokens, in `spend.currency`.
    pub prices: Option<PriceTable>,
    /// What the kind read from its own section; it builds the provider.
    pub settings: std::sync::Arc<dyn Settings>,
}

impl ProviderConfig {
    /// The capabilities of one of this provider's models.
    pub fn capabilities_of(&self, model: &str) -> Capabilities {
        self.models
            .as_ref()
            .and_then(|m| m.iter().find(|(n, _)| n == model))
            .map(|(_, c)| *c)
            .unwrap_or(self.capabilities)
    }

    pub fn has_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|(n, _)| n == model))
    }
}

/// Parameters a route forces onto every request it serves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamOverrides {
    pub params: Params,
    pub extra: Map<String, Value>,
}

impl ParamOverrides {
    pub fn is_empty(&self) -> bool {
        self.params == Params::default() && self.extra.is_empty()
    }

    pub fn apply(&self, req: &mut ChatRequest) {
        let o = &self.params;
        let p = &mut req.params;
        macro_rules! set {
            ($($f:ident),*) => {$( if o.$f.is_some() { p.$f = o.$f.clone(); } )*};
        }
        set!(
            temperature,
            top_p,
            max_tokens,
            max_completion_tokens,
            seed,
            presence_penalty,
            frequency_penalty
        );
        if !o.stop.is_empty() {
            p.stop.clone_from(&o.stop);
        }
        for (k, v) in &self.extra {
            req.extra.insert(k.clone(), v.clone());
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_concurrency: usize,
    pub request_timeout: Duration,
    /// A connection's request head must be complete within this long of the
    /// connection opening or its previous response ending.
    pub header_read_timeout: Duration,
    /// Longest silence while a client sends a request body.
    pub idle_timeout: Duration,
    /// Open client connections at most (keep it under the open-file limit).
    pub max_connections: usize,
    /// After SIGTERM / ctrl-c, how long running requests may still finish.
    pub shutdown_grace: Duration,
    /// After SIGTERM / ctrl-c and before the listener stops accepting: how
    /// long the process keeps serving new connections while `/readyz` already
    /// fails, so that load balancers (Kubernetes endpoints) stop sending it
    /// traffic first. `shutdown_grace` starts when it ends.
    pub drain_delay: Duration,
    /// Whether `/readyz` fails (503 `config_invalid`) while the configuration
    /// on disk does not load. With one ConfigMap behind every replica a bad
    /// push makes all of them unready at once; `false` keeps them ready
    /// (the answer still says `"config": "invalid"`) and leaves it to alerts.
    pub fail_readiness_on_invalid_config: bool,
    /// Whether "unknown model/prompt" errors list the configured ids (and
    /// unavailability errors name providers and their settings).
    pub list_ids_in_errors: bool,
    /// Longest a response write may wait on a client that reads nothing; then
    /// the connection is closed (and the backend call with it).
    pub write_timeout: Duration,
    /// Longest the whole request body may take to arrive, however steadily.
    pub body_read_timeout: Duration,
    /// Concurrent HTTP/2 streams (requests) one client connection may open.
    pub max_streams: u32,
}

/// The longest any `limits` duration may be: longer is surely a typo, and
/// deadlines computed from it must not overflow.
pub const MAX_LIMIT_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 * 1024 * 1024,
            max_concurrency: 4096,
            request_timeout: Duration::from_secs(600),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(10),
            // Outside an orchestrator nothing reroutes traffic away from a
            // process that says it is draining: waiting would only delay the
            // stop. Kubernetes deployments set it (deploy/kubernetes).
            drain_delay: Duration::ZERO,
            fail_readiness_on_invalid_config: true,
            list_ids_in_errors: true,
            write_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            max_streams: 128,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub prompts_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin: AdminConfig,
    pub limits: Limits,
    pub routes: BTreeMap<String, RouteConfig>,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub prompts: BTreeMap<String, crate::prompt::PromptDef>,
    /// `retrievers/*.yaml`, by id.
    pub retrievers: BTreeMap<String, RetrieverConfig>,
    pub breaker: BreakerConfig,
    pub cache: CacheConfig,
    /// Whether requests need a gateway key.
    pub auth: AuthMode,
    /// `keys/*.yaml`, by key id.
    pub keys: BTreeMap<String, KeyConfig>,
    /// Where rate-limit counters live.
    pub rate_store: RateLimitStore,
    pub spend: SpendConfig,
    pub audit: AuditConfig,
    pub protect: ProtectConfig,
    /// TLS on the public listener (`None`: plain HTTP).
    pub tls: Option<TlsConfig>,
    /// Forward an OpenAI client's bytes to an OpenAI-compatible target when
    /// nothing needs the canonical form (`fast_path`, default true).
    pub fast_path: bool,
    /// Where shadow comparisons are kept.
    pub shadow: ShadowStore,
    /// The log lines' format (applied at start).
    pub log_format: LogFormat,
    /// Traces over OTLP/HTTP (`None`: off; applied at start).
    pub tracing: Option<TracingConfig>,
}

/// One problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// The line in `file`, where known.
    pub line: Option<usize>,
    /// Dotted path of the field, empty when the whole file is at fault.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.field, self.message)
        }
    }
}

pub(crate) struct Problems {
    list: Vec<Problem>,
}

impl Problems {
    fn add(&mut self, file: &Path, field: impl Into<String>, message: impl Into<String>) {
        self.list.push(Problem {
            file: file.display().to_string(),
            line: None,
            field: field.into(),
            message: message.into(),
        });
    }

    fn duration(
        &mut self,
        file: &Path,
        field: &str,
        raw: &Option<String>,
        default: Duration,
    ) -> Duration {
        match raw {
            None => default,
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) => d,
                Err(e) => {
                    self.add(
                        file,
                        field,
                        format!("`{s}` is not a duration like `500ms` or `30s`: {e}"),
                    );
                    default
                }
            },
        }
    }
}

pub(crate) fn read_yaml<T: serde::de::DeserializeOwned>(
    path: &Path,
    problems: &mut Problems,
) -> Option<T> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            problems.add(path, "", format!("cannot read file: {e}"));
            return None;
        }
    };
    // An empty file is an empty mapping.
    let text = if text.trim().is_empty() {
        "{}"
    } else {
        text.as_str()
    };
    let de = serde_yaml::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Some(v),
        Err(e) => {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            let inner = e.into_inner();
            let mut msg = inner.to_string();
            // serde_yaml prefixes nested errors with its own path; the field says it.
            let mut prefix = field.as_str();
            while !prefix.is_empty() {
                if let Some(rest) = msg.strip_prefix(&format!("{prefix}: ")) {
                    msg = rest.to_owned();
                    break;
                }
                prefix = prefix.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
            }
            // The location is reported as the problem's line instead.
            if let Some(i) = msg.find(" at line ") {
                msg.truncate(i);
            }
            problems.list.push(Problem {
                file: path.display().to_string(),
                line: inner.location().map(|l| l.line()),
                field,
                message: msg,
            });
            None
        }
    }
}

/// The folders that sit beside the gateway file.
pub fn providers_dir(gateway_file: &Path) -> PathBuf {
    gateway_file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("providers")
}

pub fn prompts_dir(gateway_file: &Path) -> PathBuf {
    gateway_file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("prompts")
}

/// The folders beside the gateway file whose `*.yaml` files the
/// configuration reads (and the reload watcher watches).
pub fn config_dirs(gateway_file: &Path) -> [PathBuf; 4] {
    [
        providers_dir(gateway_file),
        prompts_dir(gateway_file),
        retrievers_dir(gateway_file),
        keys_dir(gateway_file),
    ]
}

/// Whether `p` is a file the configuration reads from its folders (`*.yaml`,
/// `*.yml`): the loaders and the reload watcher ask the same question.
pub fn is_yaml(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// The `*.yaml`/`*.yml` files directly in `dir`, sorted.
pub fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_yaml(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Loads and validates the gateway file and the `providers/` folder beside it.
pub fn load(gateway_file: &Path) -> Result<Config, Vec<Problem>> {
    let mut problems = Problems { list: Vec::new() };
    let gw: RawGateway = read_yaml(gateway_file, &mut problems).unwrap_or_default();
    let fast_path = gw.fast_path.unwrap_or(true);

    let currency = gw.spend.currency.clone().unwrap_or_else(|| "USD".into());
    let dir = providers_dir(gateway_file);
    let mut providers = BTreeMap::new();
    match yaml_files(&dir) {
        Err(e) => problems.add(&dir, "", format!("cannot read the providers folder: {e}")),
        Ok(files) => {
            for file in files {
                let Some(id) = file.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                    continue;
                };
                if !valid_id(&id) {
                    problems.add(&file, "", "a provider file name must be letters, digits, `-` or `_` (it is the provider id)");
                    continue;
                }
                if providers.contains_key(&id) {
                    problems.add(
                        &file,
                        "",
                        format!("provider `{id}` is defined twice (.yaml and .yml)"),
                    );
                    continue;
                }
                if let Some(raw) = read_yaml::<RawProviderFile>(&file, &mut problems) {
                    let p = validate_provider(id.clone(), file, raw, &currency, &mut problems);
                    providers.insert(id, p);
                }
            }
        }
    }

    let listen = match gw
        .listen
        .as_deref()
        .unwrap_or("127.0.0.1:8080")
        .parse::<SocketAddr>()
    {
        Ok(a) => a,
        Err(e) => {
            problems.add(
                gateway_file,
                "listen",
                format!("not a HOST:PORT address: {e}"),
            );
            SocketAddr::from(([127, 0, 0, 1], 8080))
        }
    };
    let d = Limits::default();
    let limits = Limits {
        max_body_bytes: gw.limits.max_body_bytes.unwrap_or(d.max_body_bytes),
        max_concurrency: gw.limits.max_concurrency.unwrap_or(d.max_concurrency),
        request_timeout: problems.duration(
            gateway_file,
            "limits.request_timeout",
            &gw.limits.request_timeout,
            d.request_timeout,
        ),
        header_read_timeout: problems.duration(
            gateway_file,
            "limits.header_read_timeout",
            &gw.limits.header_read_timeout,
            d.header_read_timeout,
        ),
        idle_timeout: problems.duration(
            gateway_file,
            "limits.idle_timeout",
            &gw.limits.idle_timeout,
            d.idle_timeout,
        ),
        max_connections: gw.limits.max_connections.unwrap_or(d.max_connections),
        shutdown_grace: problems.duration(
            gateway_file,
            "limits.shutdown_grace",
            &gw.limits.shutdown_grace,
            d.shutdown_grace,
        ),
        drain_delay: problems.duration(
            gateway_file,
            "limits.drain_delay",
            &gw.limits.drain_delay,
            d.drain_delay,
        ),
        fail_readiness_on_invalid_config: gw
            .limits
            .fail_readiness_on_invalid_config
            .unwrap_or(d.fail_readiness_on_invalid_config),
        list_ids_in_errors: gw.limits.list_ids_in_errors.unwrap_or(d.list_ids_in_errors),
        write_timeout: problems.duration(
            gateway_file,
            "limits.write_timeout",
            &gw.limits.write_timeout,
            d.write_timeout,
        ),
        body_read_timeout: problems.duration(
            gateway_file,
            "limits.body_read_timeout",
            &gw.limits.body_read_timeout,
            d.body_read_timeout,
        ),
        max_streams: gw.limits.max_streams.unwrap_or(d.max_streams),
    };
    if limits.max_streams == 0 {
        problems.add(gateway_file, "limits.max_streams", "must be at least 1");
    }
    if limits.max_concurrency == 0 {
        problems.add(gateway_file, "limits.max_concurrency", "must be at least 1");
    }
    if limits.max_connections == 0 {
        problems.add(gateway_file, "limits.max_connections", "must be at least 1");
    }
    for (field, d, may_be_zero) in [
        ("limits.request_timeout", limits.request_timeout, true),
        (
            "limits.header_read_timeout",
            limits.header_read_timeout,
            false,
        ),
        ("limits.idle_timeout", limits.idle_timeout, false),
        ("limits.shutdown_grace", limits.shutdown_grace, true),
        ("limits.drain_delay", limits.drain_delay, true),
        ("limits.write_timeout", limits.write_timeout, false),
        ("limits.body_read_timeout", limits.body_read_timeout, false),
    ] {
        if d.is_zero() && !may_be_zero {
            problems.add(gateway_file, field, "must be longer than zero");
        }
        if d > MAX_LIMIT_DURATION {
            problems.add(
                gateway_file,
                field,
                format!(
                    "`{}` is longer than the most allowed, {}",
                    humantime::format_duration(d),
                    humantime::format_duration(MAX_LIMIT_DURATION)
                ),
            );
        }
    }

    let mut routes = BTreeMap::new();
    for (name, r) in gw.routes {
        let route = routes::route(gateway_file, &name, r, &providers, &mut problems);
        routes.insert(name, route);
    }
    for (name, r) in &routes {
        let arms = match &r.strategy {
            Strategy::Split { arms, .. } => arms.iter().map(|a| &a.shadow).collect(),
            Strategy::Chain(_) => Vec::new(),
        };
        for s in std::iter::once(&r.shadow).chain(arms).flatten() {
            if let Some(e) = s.embeddings.as_deref().filter(|e| !routes.contains_key(*e)) {
                problems.add(
                    gateway_file,
                    format!("routes.{name}.shadow.embeddings"),
                    format!("no route `{e}`"),
                );
            }
        }
    }
    let shadow = shadow::store(gateway_file, gw.shadow, &mut problems);
    let breaker = routes::breaker(gateway_file, gw.breaker, &mut problems);
    let max_bytes = gw.cache.max_bytes.unwrap_or(64 * 1024 * 1024);
    let max_entry_bytes = gw.cache.max_entry_bytes.unwrap_or(4 * 1024 * 1024);
    if !(1024..=MAX_CACHE_ENTRY_BYTES).contains(&max_entry_bytes) {
        problems.add(
            gateway_file,
            "cache.max_entry_bytes",
            "must be from 1024 to 67108864 (64 MiB)",
        );
    }
    let max_entry_bytes = max_entry_bytes
        .clamp(1024, MAX_CACHE_ENTRY_BYTES)
        .min(max_bytes);
    let cache = CacheConfig {
        max_bytes,
        max_entry_bytes,
        ttl: problems.duration(
            gateway_file,
            "cache.ttl",
            &gw.cache.ttl,
            Duration::from_secs(600),
        ),
        time_to_idle: gw.cache.time_to_idle.as_ref().map(|_| {
            problems.duration(
                gateway_file,
                "cache.time_to_idle",
                &gw.cache.time_to_idle,
                Duration::ZERO,
            )
        }),
        redis: gw.cache.redis.map(|r| {
            if !(r.url.starts_with("redis://")
                || r.url.starts_with("rediss://")
                || r.url.starts_with("redis+unix://"))
            {
                problems.add(gateway_file, "cache.redis.url", "must be a redis:// URL");
            }
            RedisConfig {
                timeout: problems.duration(
                    gateway_file,
                    "cache.redis.timeout",
                    &r.timeout,
                    Duration::from_millis(50),
                ),
                prefix: r.prefix.unwrap_or_else(|| "promptgate:".into()),
                url: r.url,
                secret_env: r.secret_env.filter(|v| !v.is_empty()),
                secret: None,
            }
        }),
    };

    let admin_listen = match gw
        .admin
        .listen
        .as_deref()
        .unwrap_or("127.0.0.1:9090")
        .parse::<SocketAddr>()
    {
        Ok(a) => a,
        Err(e) => {
            problems.add(
                gateway_file,
                "admin.listen",
                format!("not a HOST:PORT address: {e}"),
            );
            SocketAddr::from(([127, 0, 0, 1], 9090))
        }
    };
    let admin = AdminConfig {
        listen: admin_listen,
        key_env: gw
            .admin
            .key_env
            .unwrap_or_else(|| "PROMPTGATE_ADMIN_KEY".into()),
    };
    if !valid_env_name(&admin.key_env) {
        problems.add(
            gateway_file,
            "admin.key_env",
            "must be the name of an environment variable",
        );
    }

    let gov = governance::load(
        gateway_file,
        governance::RawSections {
            auth: gw.auth,
            rate: gw.limits.rate,
            spend: gw.spend,
            audit: gw.audit,
            protect: gw.data_protection,
            currency,
        },
        &routes,
        &mut problems,
    );
    let tls = gw.tls.and_then(|t| tls(gateway_file, t, &mut problems));
    let log_format = telemetry::log_format(gateway_file, gw.log_format.as_deref(), &mut problems);
    let tracing = gw
        .tracing
        .map(|t| telemetry::tracing(gateway_file, t, &mut problems));
    let route_names: Vec<&str> = routes.keys().map(String::as_str).collect();
    let retrievers = retrievers::load_dir(gateway_file, &route_names, &mut problems);
    let prompts = prompts::load_dir(
        &prompts_dir(gateway_file),
        &route_names,
        &retrievers,
        &mut problems,
    );

    if problems.list.is_empty() {
        Ok(Config {
            file: gateway_file.to_owned(),
            prompts_dir: prompts_dir(gateway_file),
            listen,
            admin,
            limits,
            routes,
            providers,
            prompts,
            retrievers,
            breaker,
            cache,
            auth: gov.auth,
            keys: gov.keys,
            rate_store: gov.rate_store,
            spend: gov.spend,
            audit: gov.audit,
            protect: gov.protect,
            tls,
            fast_path,
            shadow,
            log_format,
            tracing,
        })
    } else {
        Err(problems.list)
    }
}

/// The `tls` section: both files read (paths relative to the gateway file) and
/// the key checked against the certificate.
fn tls(gateway_file: &Path, raw: RawTls, problems: &mut Problems) -> Option<TlsConfig> {
    let dir = gateway_file.parent().unwrap_or_else(|| Path::new(""));
    let mut path = |field: &str, p: &str| {
        if p.trim().is_empty() {
            problems.add(gateway_file, field, "must be the path of a PEM file");
            None
        } else {
            Some(dir.join(p))
        }
    };
    let (cert, key) = (path("tls.cert", &raw.cert), path("tls.key", &raw.key));
    let (cert, key) = (cert?, key?);
    match crate::tls::load_pair(&cert, &key) {
        Ok(pair) => Some(TlsConfig { cert, key, pair }),
        Err((field, message)) => {
            problems.add(gateway_file, field, message);
            None
        }
    }
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

fn validate_provider(
    id: String,
    file: PathBuf,
    raw: RawProviderFile,
    currency: &str,
    problems: &mut Problems,
) -> ProviderConfig {
    let RawProviderFile {
        common: raw,
        sections,
    } = raw;
    let prices = raw
        .prices
        .as_ref()
        .map(|p| governance::price_table(p, currency, &file, problems));
    let kind = raw.kind.0;
    let d = Timeouts::default();
    let t = &raw.timeouts;
    let mut timeouts = Timeouts {
        connect: problems.duration(&file, "timeouts.connect", &t.connect, d.connect),
        headers: problems.duration(&file, "timeouts.headers", &t.headers, d.headers),
        idle: problems.duration(&file, "timeouts.idle", &t.idle, d.idle),
        total: problems.duration(&file, "timeouts.total", &t.total, d.total),
        health: d.health,
    };
    let dl = ResponseLimits::default();
    let mut byte_limit = |field: &str, raw: Option<u64>, default: usize| match raw {
        None => default,
        Some(n) if n < 1024 => {
            problems.add(&file, field, "must be at least 1024 bytes");
            default
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    };
    let limits = ResponseLimits {
        max_response_bytes: byte_limit(
            "max_response_bytes",
            raw.max_response_bytes,
            dl.max_response_bytes,
        ),
        max_line_bytes: byte_limit("max_line_bytes", raw.max_line_bytes, dl.max_line_bytes),
    };
    let auth = match raw.auth.as_deref() {
        None => kind
            .auth_header
            .map_or(Auth::Bearer, |h| Auth::Header(h.to_owned())),
        Some("bearer") => Auth::Bearer,
        Some("none") => Auth::None,
        Some(h) if h.starts_with("header:") && h.len() > 7 => {
            let name = h[7..].trim().to_owned();
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                problems.add(
                    &file,
                    "auth",
                    format!("`{name}` is not a valid header name"),
                );
            }
            Auth::Header(name)
        }
        Some(other) => {
            problems.add(
                &file,
                "auth",
                format!("`{other}` is not one of `bearer`, `header:NAME`, `none`"),
            );
            Auth::Bearer
        }
    };
    for (k, v) in &raw.headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err()
            || http::HeaderValue::from_str(v).is_err()
        {
            problems.add(&file, format!("headers.{k}"), "not a valid HTTP header");
        }
    }
    if let Some(env) = &raw.api_key_env {
        if !valid_env_name(env) {
            problems.add(
                &file,
                "api_key_env",
                "must be the name of an environment variable",
            );
        }
    }

    // Kind sections: only the provider's own kind may have one.
    for name in sections.keys() {
        if *name != kind.name {
            problems.add(
                &file,
                *name,
                format!(
                    "a `{name}` section belongs to `kind: {name}`, not `kind: {}`",
                    kind.name
                ),
            );
        }
    }

    let mut base_url = raw.base_url.clone().unwrap_or_default();
    if kind.in_process {
        if raw.base_url.is_some() {
            problems.add(
                &file,
                "base_url",
                format!(
                    "a {} provider has no base_url (it answers in-process)",
                    kind.name
                ),
            );
        }
    } else {
        match raw.base_url.as_deref() {
            None => problems.add(&file, "base_url", "an HTTP provider needs a base_url"),
            Some(u) => match reqwest::Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                _ => problems.add(&file, "base_url", format!("`{u}` is not an http(s) URL")),
            },
        }
        base_url = base_url.trim_end_matches('/').to_owned();
    }

    let settings = (kind.settings)(&mut Section {
        name: kind.name,
        value: sections.get(kind.name),
        file: &file,
        problems,
    });

    let capabilities = raw.capabilities.over(kind.capabilities);
    let models = match (settings.models(), raw.models) {
        (Some(m), _) => Some(m.into_iter().map(|k| (k, capabilities)).collect()),
        (None, None) => None,
        (None, Some(list)) => Some(
            list.into_iter()
                .enumerate()
                .map(|(i, m)| match m {
                    RawModel::Name(n) => (n, capabilities),
                    RawModel::Detailed { name, caps } => {
                        for k in caps.unknown.keys() {
                            problems.add(&file, format!("models[{i}].{k}"), "unknown field (expected a capability: streaming, tools, json_mode, embeddings, vision, context_window)");
                        }
                        let c = RawCapabilities {
                            streaming: caps.streaming,
                            tools: caps.tools,
                            json_mode: caps.json_mode,
                            embeddings: caps.embeddings,
                            vision: caps.vision,
                            context_window: caps.context_window,
                        };
                        (name, c.over(capabilities))
                    }
                })
                .collect(),
        ),
    };
    let health_check = raw.health_check.map(|h| {
        let timeout = problems.duration(&file, "health_check.timeout", &h.timeout, timeouts.health);
        if timeout.is_zero() {
            problems.add(&file, "health_check.timeout", "must be longer than zero");
        } else {
            timeouts.health = timeout;
        }
        problems
            .duration(
                &file,
                "health_check.interval",
                &Some(h.interval),
                Duration::from_secs(10),
            )
            .max(Duration::from_millis(100))
    });
    ProviderConfig {
        id,
        file,
        kind,
        description: raw.description,
        base_url,
        api_key_env: raw.api_key_env,
        auth,
        headers: raw.headers,
        timeouts,
        limits,
        models,
        capabilities,
        self_hosted: raw.self_hosted.unwrap_or(kind.self_hosted),
        health_check,
        stream_usage: raw.stream_usage.unwrap_or(true),
        legacy_functions: raw.legacy_functions.unwrap_or(false),
        chat_path: raw.chat_path.unwrap_or_else(|| "/chat/completions".into()),
        embeddings_path: raw.embeddings_path.unwrap_or_else(|| "/embeddings".into()),
        prices,
        settings,
    }
}

/// Whether `s` can name an environment variable.
pub fn valid_env_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}
