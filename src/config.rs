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

mod prompts;
mod routes;

pub use routes::{
    ArmConfig, BreakerConfig, RetryPolicy, RouteConfig, Strategy, Subject, TargetConfig,
};

use crate::canonical::{ChatRequest, Params};
use crate::provider::http::{ResponseLimits, Timeouts};

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
    list_ids_in_errors: Option<bool>,
    #[serde(default)]
    write_timeout: Option<String>,
    #[serde(default)]
    body_read_timeout: Option<String>,
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

/// The backend protocols the gateway speaks. Each kind maps to one codec module.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Any OpenAI-compatible Chat Completions server.
    Openai,
    /// The built-in deterministic stand-in (no network).
    Sandbox,
    /// Anthropic Messages API.
    Anthropic,
    /// Google Gemini generateContent.
    Gemini,
    /// Zhipu GLM open platform v4 (API key or JWT auth).
    Zhipu,
    /// Self-hosted ChatGLM-6B `api.py` (`POST /` with prompt + history).
    Chatglm,
    /// llama.cpp server's native `/completion`.
    Llamacpp,
    /// Ollama's native `/api/chat` and `/api/embed`.
    Ollama,
    /// Baidu Qianfan v1 (wenxinworkshop) with OAuth access tokens.
    Qianfan,
    /// Alibaba DashScope native text-generation API.
    Dashscope,
    /// Azure OpenAI (deployments, api-version, api-key header).
    Azure,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Sandbox => "sandbox",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Zhipu => "zhipu",
            ProviderKind::Chatglm => "chatglm",
            ProviderKind::Llamacpp => "llamacpp",
            ProviderKind::Ollama => "ollama",
            ProviderKind::Qianfan => "qianfan",
            ProviderKind::Dashscope => "dashscope",
            ProviderKind::Azure => "azure",
        }
    }

    /// The auth header a kind uses when the file does not say.
    fn default_auth(self) -> Auth {
        match self {
            ProviderKind::Anthropic => Auth::Header("x-api-key".into()),
            ProviderKind::Gemini => Auth::Header("x-goog-api-key".into()),
            ProviderKind::Azure => Auth::Header("api-key".into()),
            _ => Auth::Bearer,
        }
    }

    /// Whether the protocol reports token usage; the gateway estimates it otherwise.
    pub fn reports_usage(self) -> bool {
        !matches!(self, ProviderKind::Sandbox | ProviderKind::Chatglm)
    }

    /// What the protocol can carry at all; a provider file may narrow it.
    fn default_capabilities(self) -> Capabilities {
        let all = Capabilities::default();
        match self {
            ProviderKind::Chatglm => Capabilities {
                tools: false,
                json_mode: false,
                embeddings: false,
                vision: false,
                ..all
            },
            ProviderKind::Llamacpp => Capabilities {
                tools: false,
                embeddings: false,
                vision: false,
                ..all
            },
            ProviderKind::Qianfan => Capabilities {
                vision: false,
                ..all
            },
            _ => all,
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

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            streaming: true,
            tools: true,
            json_mode: true,
            embeddings: true,
            vision: true,
            context_window: None,
        }
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
struct RawAnthropic {
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    default_max_tokens: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAzure {
    api_version: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZhipu {
    /// `api_key` (default: the key as a bearer token) or `jwt` (sign from `id.secret`).
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    jwt_ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQianfan {
    secret_key_env: String,
    #[serde(default)]
    token_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    template: String,
    #[serde(default)]
    stop: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLlamacpp {
    #[serde(default)]
    templates: BTreeMap<String, RawTemplate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChatglm {
    #[serde(default)]
    max_length: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOllama {
    #[serde(default)]
    keep_alive: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    kind: ProviderKind,
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
    #[serde(default)]
    sandbox: Option<RawSandbox>,
    #[serde(default)]
    anthropic: Option<RawAnthropic>,
    #[serde(default)]
    azure: Option<RawAzure>,
    #[serde(default)]
    zhipu: Option<RawZhipu>,
    #[serde(default)]
    qianfan: Option<RawQianfan>,
    #[serde(default)]
    llamacpp: Option<RawLlamacpp>,
    #[serde(default)]
    chatglm: Option<RawChatglm>,
    #[serde(default)]
    ollama: Option<RawOllama>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    models: BTreeMap<String, RawSandboxModel>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSandboxModel {
    #[serde(default)]
    reply: Option<SandboxReply>,
    #[serde(default)]
    script: Vec<String>,
    #[serde(default)]
    chunk_chars: Option<usize>,
    #[serde(default)]
    chunk_delay: Option<String>,
    #[serde(default)]
    first_token_delay: Option<String>,
    #[serde(default)]
    delay: Option<String>,
    #[serde(default)]
    fail: Option<RawSandboxFail>,
    #[serde(default)]
    cut_after: Option<usize>,
    #[serde(default)]
    embedding_dims: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandboxFail {
    status: u16,
    #[serde(default)]
    message: Option<String>,
}

// === validated config ===

/// What a sandbox model answers.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SandboxReply {
    /// Repeats the last user message (as JSON under JSON mode).
    #[default]
    Echo,
    /// Cycles through `script`, one entry per user turn.
    Script,
}

#[derive(Debug, Clone)]
pub struct SandboxModel {
    pub reply: SandboxReply,
    pub script: Vec<String>,
    /// Characters per streamed chunk; 0 streams word by word.
    pub chunk_chars: usize,
    pub chunk_delay: Duration,
    pub first_token_delay: Duration,
    /// Added before the answer (or the stream's headers).
    pub delay: Duration,
    pub fail: Option<(u16, String)>,
    /// Cut the stream (an abrupt end, no finish) after this many chunks.
    pub cut_after: Option<usize>,
    pub embedding_dims: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    Bearer,
    Header(String),
    None,
}

/// A chat template for backends that take a raw prompt (llama.cpp native): the
/// minijinja source (rendered with `messages`, `add_generation_prompt`,
/// `bos_token`) and the stop words that end a turn.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    pub source: String,
    pub stop: Vec<String>,
}

/// Settings only one kind of provider has.
#[derive(Debug, Clone)]
pub enum KindSettings {
    None,
    Sandbox(BTreeMap<String, SandboxModel>),
    Anthropic {
        version: String,
        default_max_tokens: u32,
    },
    Azure {
        api_version: String,
    },
    Zhipu {
        jwt: bool,
        jwt_ttl: Duration,
    },
    Qianfan {
        secret_key_env: String,
        token_url: String,
    },
    /// Chat templates by upstream model name; `*` is the fallback for any model.
    Llamacpp {
        templates: BTreeMap<String, ChatTemplate>,
    },
    Chatglm {
        max_length: Option<u32>,
    },
    Ollama {
        keep_alive: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub id: String,
    pub file: PathBuf,
    pub kind: ProviderKind,
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
    pub settings: KindSettings,
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
    /// Whether "unknown model/prompt" errors list the configured ids (and
    /// unavailability errors name providers and their settings).
    pub list_ids_in_errors: bool,
    /// Longest a response write may wait on a client that reads nothing; then
    /// the connection is closed (and the backend call with it).
    pub write_timeout: Duration,
    /// Longest the whole request body may take to arrive, however steadily.
    pub body_read_timeout: Duration,
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
            list_ids_in_errors: true,
            write_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
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
    pub breaker: BreakerConfig,
    pub cache: CacheConfig,
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
                if let Some(raw) = read_yaml::<RawProvider>(&file, &mut problems) {
                    let p = validate_provider(id.clone(), file, raw, &mut problems);
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
    };
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

    let route_names: Vec<&str> = routes.keys().map(String::as_str).collect();
    let prompts = prompts::load_dir(&prompts_dir(gateway_file), &route_names, &mut problems);

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
            breaker,
            cache,
        })
    } else {
        Err(problems.list)
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
    raw: RawProvider,
    problems: &mut Problems,
) -> ProviderConfig {
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
        None => raw.kind.default_auth(),
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

    // Kind-specific sections: only the provider's own kind may have one.
    let sections: [(&str, bool, ProviderKind); 8] = [
        ("sandbox", raw.sandbox.is_some(), ProviderKind::Sandbox),
        (
            "anthropic",
            raw.anthropic.is_some(),
            ProviderKind::Anthropic,
        ),
        ("azure", raw.azure.is_some(), ProviderKind::Azure),
        ("zhipu", raw.zhipu.is_some(), ProviderKind::Zhipu),
        ("qianfan", raw.qianfan.is_some(), ProviderKind::Qianfan),
        ("llamacpp", raw.llamacpp.is_some(), ProviderKind::Llamacpp),
        ("chatglm", raw.chatglm.is_some(), ProviderKind::Chatglm),
        ("ollama", raw.ollama.is_some(), ProviderKind::Ollama),
    ];
    for (name, present, kind) in sections {
        if present && kind != raw.kind {
            problems.add(
                &file,
                name,
                format!(
                    "a `{name}` section belongs to `kind: {name}`, not `kind: {}`",
                    raw.kind.as_str()
                ),
            );
        }
    }

    let mut base_url = raw.base_url.clone().unwrap_or_default();
    if raw.kind == ProviderKind::Sandbox {
        if raw.base_url.is_some() {
            problems.add(
                &file,
                "base_url",
                "a sandbox provider has no base_url (it answers in-process)",
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

    let settings = match raw.kind {
        ProviderKind::Sandbox => match raw.sandbox {
            None => {
                problems.add(
                    &file,
                    "sandbox",
                    "a sandbox provider needs a `sandbox.models` section",
                );
                KindSettings::Sandbox(BTreeMap::new())
            }
            Some(s) => KindSettings::Sandbox(sandbox_models(&file, s, problems)),
        },
        ProviderKind::Anthropic => {
            let a = raw.anthropic.unwrap_or(RawAnthropic {
                version: None,
                default_max_tokens: None,
            });
            KindSettings::Anthropic {
                version: a.version.unwrap_or_else(|| "2023-06-01".into()),
                default_max_tokens: a.default_max_tokens.unwrap_or(4096),
            }
        }
        ProviderKind::Azure => match raw.azure {
            Some(a) => KindSettings::Azure {
                api_version: a.api_version,
            },
            None => {
                problems.add(
                    &file,
                    "azure.api_version",
                    "Azure OpenAI needs an api_version (e.g. `2024-10-21`)",
                );
                KindSettings::None
            }
        },
        ProviderKind::Zhipu => {
            let z = raw.zhipu.unwrap_or(RawZhipu {
                auth: None,
                jwt_ttl: None,
            });
            let jwt = match z.auth.as_deref() {
                None | Some("api_key") => false,
                Some("jwt") => true,
                Some(other) => {
                    problems.add(
                        &file,
                        "zhipu.auth",
                        format!("`{other}` is not `api_key` or `jwt`"),
                    );
                    false
                }
            };
            KindSettings::Zhipu {
                jwt,
                jwt_ttl: problems.duration(
                    &file,
                    "zhipu.jwt_ttl",
                    &z.jwt_ttl,
                    Duration::from_secs(1800),
                ),
            }
        }
        ProviderKind::Qianfan => match raw.qianfan {
            Some(q) => {
                if !valid_env_name(&q.secret_key_env) {
                    problems.add(
                        &file,
                        "qianfan.secret_key_env",
                        "must be the name of an environment variable",
                    );
                }
                KindSettings::Qianfan {
                    secret_key_env: q.secret_key_env,
                    token_url: q
                        .token_url
                        .unwrap_or_else(|| "https://aip.baidubce.com/oauth/2.0/token".into()),
                }
            }
            None => {
                problems.add(
                    &file,
                    "qianfan.secret_key_env",
                    "Qianfan v1 needs the secret key's environment variable (the API key is api_key_env)",
                );
                KindSettings::None
            }
        },
        ProviderKind::Llamacpp => {
            let mut templates = BTreeMap::new();
            for (model, t) in raw.llamacpp.map(|l| l.templates).unwrap_or_default() {
                if let Err(e) = crate::prompt::check_chat_template(&t.template) {
                    problems.add(&file, format!("llamacpp.templates.{model}.template"), e);
                }
                templates.insert(
                    model,
                    ChatTemplate {
                        source: t.template,
                        stop: t.stop,
                    },
                );
            }
            if templates.is_empty() {
                problems.add(
                    &file,
                    "llamacpp.templates",
                    "llama.cpp's native API takes a raw prompt: give at least one chat template (`*` for every model)",
                );
            }
            KindSettings::Llamacpp { templates }
        }
        ProviderKind::Chatglm => KindSettings::Chatglm {
            max_length: raw.chatglm.and_then(|c| c.max_length),
        },
        ProviderKind::Ollama => KindSettings::Ollama {
            keep_alive: raw.ollama.and_then(|o| o.keep_alive),
        },
        ProviderKind::Openai | ProviderKind::Gemini | ProviderKind::Dashscope => KindSettings::None,
    };

    let capabilities = raw.capabilities.over(raw.kind.default_capabilities());
    let models = match (&settings, raw.models) {
        (KindSettings::Sandbox(m), _) => Some(m.keys().map(|k| (k.clone(), capabilities)).collect()),
        (_, None) => None,
        (_, Some(list)) => Some(
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
        kind: raw.kind,
        description: raw.description,
        base_url,
        api_key_env: raw.api_key_env,
        auth,
        headers: raw.headers,
        timeouts,
        limits,
        models,
        capabilities,
        self_hosted: raw.self_hosted.unwrap_or(matches!(
            raw.kind,
            ProviderKind::Sandbox
                | ProviderKind::Chatglm
                | ProviderKind::Llamacpp
                | ProviderKind::Ollama
        )),
        health_check,
        stream_usage: raw.stream_usage.unwrap_or(true),
        legacy_functions: raw.legacy_functions.unwrap_or(false),
        chat_path: raw.chat_path.unwrap_or_else(|| "/chat/completions".into()),
        embeddings_path: raw.embeddings_path.unwrap_or_else(|| "/embeddings".into()),
        settings,
    }
}

fn valid_env_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn sandbox_models(
    file: &Path,
    s: RawSandbox,
    problems: &mut Problems,
) -> BTreeMap<String, SandboxModel> {
    let mut out = BTreeMap::new();
    for (name, m) in s.models {
        let f = |k: &str| format!("sandbox.models.{name}.{k}");
        if m.reply == Some(SandboxReply::Script) && m.script.is_empty() {
            problems.add(
                file,
                f("script"),
                "`reply: script` needs at least one scripted reply",
            );
        }
        if let Some(fail) = &m.fail {
            if !(400..=599).contains(&fail.status) {
                problems.add(
                    file,
                    f("fail.status"),
                    "must be an HTTP error status (400-599)",
                );
            }
        }
        let model = SandboxModel {
            reply: m.reply.unwrap_or_default(),
            script: m.script,
            chunk_chars: m.chunk_chars.unwrap_or(0),
            chunk_delay: problems.duration(file, &f("chunk_delay"), &m.chunk_delay, Duration::ZERO),
            first_token_delay: problems.duration(
                file,
                &f("first_token_delay"),
                &m.first_token_delay,
                Duration::ZERO,
            ),
            delay: problems.duration(file, &f("delay"), &m.delay, Duration::ZERO),
            fail: m.fail.map(|f| {
                let msg = f
                    .message
                    .unwrap_or_else(|| format!("sandbox: simulated HTTP {} failure", f.status));
                (f.status, msg)
            }),
            cut_after: m.cut_after,
            embedding_dims: m.embedding_dims.unwrap_or(16).clamp(1, 8192),
        };
        out.insert(name, model);
    }
    out
}
