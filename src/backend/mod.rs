//! Backends, one file per kind (`openai/` and `anthropic/` are folders: they are
//! also client dialects). A kind's file holds its wire types, its [`Codec`] and its
//! [`Kind`] descriptor; [`KINDS`] lists the descriptors, and nothing else in the
//! gateway knows which kinds exist.
//!
//! [`Provider`] is the only interface the rest of the gateway has to a backend: a
//! `dyn`-compatible trait with boxed futures and streams. Most providers are a
//! [`transport::HttpProvider`] pairing the shared transport with a [`Codec`] (a
//! pure translation between canonical types and one wire protocol); the sandbox is
//! an in-process provider. [`build`] turns a validated provider file into a
//! [`ProviderState`] through the settings its kind parsed.

pub mod anthropic;
pub mod auth;
pub mod azure;
pub mod chatglm;
pub mod common;
pub mod dashscope;
pub mod gemini;
pub mod llamacpp;
pub mod ollama;
pub mod openai;
pub mod qianfan;
pub mod sandbox;
pub mod shared;
pub mod transport;
pub mod zhipu;

// What every backend file uses as `super::…`.
pub use shared::{choice_index, hashed_id, tool_id, MAX_CHOICES};

use std::fmt;
use std::sync::Arc;

use http::HeaderMap;

use crate::config::{Auth, Capabilities, ProviderConfig, Section};
use auth::Credential;
use transport::{HttpProvider, HttpSettings};

use std::pin::Pin;

use futures_util::future::BoxFuture;
use futures_util::Stream;

use crate::canonical::{
    ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse, StreamEvent,
};
use crate::error::UpstreamError;
use crate::framing::{Frame, Framing};

/// A stream of canonical events from a backend. It ends after `StreamEvent::Done`,
/// or with one `Err` when the backend fails, cuts the stream or stalls. Dropping it
/// cancels the backend call.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, UpstreamError>> + Send>>;

/// One configured backend.
pub trait Provider: Send + Sync {
    /// A non-streaming chat completion with the backend's model `model`.
    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<ChatResponse, UpstreamError>>;

    /// A streaming chat completion. Resolves once the backend has accepted the
    /// request (response headers); events follow on the stream.
    fn chat_stream<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<EventStream, UpstreamError>>;

    fn embed<'a>(
        &'a self,
        req: &'a EmbeddingsRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<EmbeddingsResponse, UpstreamError>>;

    /// An active health check: a cheap request showing the backend can serve.
    /// `None` when the backend has no such request.
    fn health(&self) -> Option<BoxFuture<'_, Result<(), UpstreamError>>> {
        None
    }

    /// The same-dialect fast path: sends `body` (an OpenAI chat completion
    /// request, already in this backend's format) as it is, and returns the
    /// answer's bytes untouched. `None` when this backend does not speak
    /// OpenAI's chat format byte for byte (its codec says so: see
    /// [`Codec::forwards_openai_chat`]). A non-2xx answer is classified by the
    /// codec, exactly as for [`Provider::chat`]; the caller reads the bytes
    /// (usage, an error inside a 200, the stream's end).
    fn forward(&self, _call: RawCall) -> Option<BoxFuture<'_, Result<RawAnswer, UpstreamError>>> {
        None
    }

    /// Whether [`Provider::forward`] takes bodies, and how (`None`: it does
    /// not), with the bound on one stream event the provider reads under.
    fn forwarding(&self) -> Option<(Forwarding<'_>, usize)> {
        None
    }
}

/// How a backend takes forwarded OpenAI chat bodies.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The chat completions path under the base URL.
    pub path: &'a str,
    /// Streams must ask for the final usage chunk
    /// (`stream_options.include_usage`) even when the client did not.
    pub stream_usage: bool,
}

/// A request forwarded as bytes by the fast path.
#[derive(Debug, Clone)]
pub struct RawCall {
    /// The request body, in the backend's format (the client's bytes with the
    /// backend's model spliced in).
    pub body: bytes::Bytes,
    /// The body asks for a stream: the answer is read as one.
    pub stream: bool,
}

/// A 2xx answer to a [`RawCall`], its bytes untouched.
pub enum RawAnswer {
    /// A whole JSON body (a non-streaming answer, or a backend that answered a
    /// stream request with JSON), read under the provider's limits.
    Whole(bytes::Bytes),
    /// The body of an event stream, chunk by chunk as it arrives, bounded by
    /// the provider's idle and total timeouts and size limits; a cut, a stall
    /// or an overflow ends it with one error.
    Stream(futures_util::stream::BoxStream<'static, Result<bytes::Bytes, UpstreamError>>),
}

/// An HTTP call a codec wants made: path relative to the provider's base URL, JSON
/// body, and any headers specific to the protocol (auth is added by the transport).
#[derive(Debug, Clone)]
pub struct HttpCall {
    pub path: String,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

/// A wire protocol, as pure functions: canonical → request bytes, response bytes →
/// canonical. No networking, no clocks, no config parsing.
pub trait Codec: Send + Sync + 'static {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError>;
    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError>;
    /// False for backends without a streaming API: streams are then served from
    /// one complete response, replayed as events.
    fn native_streaming(&self) -> bool {
        true
    }
    /// How the backend frames a stream: SSE unless it says otherwise.
    fn stream_framing(&self) -> Framing {
        Framing::Sse
    }
    fn stream_decoder(&self) -> Box<dyn StreamDecoder>;
    /// Classifies a non-2xx answer.
    fn error(&self, status: u16, body: &[u8]) -> UpstreamError;
    /// The embeddings call; by default the backend has none and says so (a
    /// backend without embeddings overrides this only to say why in its words).
    fn embeddings_call(
        &self,
        _req: &EmbeddingsRequest,
        _model: &str,
    ) -> Result<HttpCall, UpstreamError> {
        Err(no_embeddings())
    }
    /// Never reached by default: the call above failed first.
    fn embeddings_response(&self, _body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        Err(no_embeddings())
    }
    /// A cheap `GET` path (relative to the base URL) that answers 2xx when the
    /// backend is ready to serve, for readiness and health checks.
    /// The path under the base URL where this backend takes OpenAI chat
    /// completion bodies as they are (no rewriting of messages, tools or
    /// parameters beyond `model` and `stream_options`): the fast path may
    /// forward the client's bytes to it. `None` (the default) for every codec
    /// that translates.
    fn forwards_openai_chat(&self) -> Option<Forwarding<'_>> {
        None
    }

    fn health_path(&self) -> Option<&str> {
        None
    }
}

/// What a codec without embeddings answers an embeddings call with.
fn no_embeddings() -> UpstreamError {
    UpstreamError::new(
        crate::error::ErrorKind::BadRequest,
        "this backend has no embeddings API",
    )
}

/// Per-stream state of a codec: turns frames into canonical events. Every
/// backend's wire decoder implements it, so one test driver
/// (`common::testing::decode_stream`) serves them all.
pub trait StreamDecoder: Send {
    /// Decodes one frame, appending events to `out`. An `Err` ends the stream.
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError>;
    /// True once the protocol's end-of-stream marker arrived.
    fn finished(&self) -> bool;
}

/// A frame's SSE event name (`None` for an unnamed event or an NDJSON line) and
/// its data (the line itself for NDJSON).
pub fn event_and_data(frame: &Frame) -> (Option<&str>, &str) {
    match frame {
        Frame::Sse(ev) => (ev.event.as_deref(), &ev.data),
        Frame::Line(l) => (None, l),
    }
}

// === kinds ===

/// Every backend kind, by the name provider files give in `kind:`. Adding a
/// backend is one file with its `KIND` and one line here.
pub static KINDS: &[&Kind] = &[
    &openai::KIND,
    &anthropic::KIND,
    &gemini::KIND,
    &zhipu::KIND,
    &chatglm::KIND,
    &llamacpp::KIND,
    &ollama::KIND,
    &qianfan::KIND,
    &dashscope::KIND,
    &azure::KIND,
    &sandbox::KIND,
];

/// The kind named `name` (a provider file's `kind:`).
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().copied().find(|k| k.name == name)
}

/// A backend kind: what the gateway knows about a protocol before any provider
/// file names it, and how to read the section of a file that is the kind's own.
pub struct Kind {
    /// The `kind:` of provider files, and the name of the kind's own section.
    pub name: &'static str,
    /// `gen_ai.provider.name` in traces: the OpenTelemetry GenAI conventions'
    /// name of the service the kind speaks to, or the kind's own name where
    /// they list none (self-hosted servers among them).
    pub gen_ai_provider: &'static str,
    /// The header the API key goes in when the file sets no `auth`; `None` is
    /// `Authorization: Bearer`.
    pub auth_header: Option<&'static str>,
    /// What the protocol can carry at all; a provider file may narrow it.
    pub capabilities: Capabilities,
    /// Whether the protocol reports token usage; the gateway estimates it otherwise.
    pub reports_usage: bool,
    /// Whether providers of this kind are self-hosted unless the file says.
    pub self_hosted: bool,
    /// Answers in-process: no `base_url`, no transport.
    pub in_process: bool,
    /// Whether provider files may have a section named after the kind.
    pub section: bool,
    /// Reads the kind's section (absent when the file has none) into the settings
    /// its providers are built from, reporting problems as `<name>.<field>`.
    pub settings: fn(&mut Section<'_>) -> Arc<dyn Settings>,
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl PartialEq for Kind {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Kind {}

/// What a kind read from a provider file, opaque to everything but the kind:
/// it builds the kind's codec and provider. Its `Debug` form must show every
/// setting (a provider's fingerprint is its config's `Debug` form).
pub trait Settings: fmt::Debug + Send + Sync {
    /// The codec of an HTTP backend.
    fn codec(&self, cfg: &ProviderConfig) -> Result<Arc<dyn Codec>, String>;

    /// The provider ready to serve: by default the codec on the shared
    /// transport, with the API key where the file's `auth` says.
    fn provider(
        &self,
        cfg: &ProviderConfig,
        env: EnvLookup<'_>,
    ) -> Result<Arc<dyn Provider>, String> {
        let codec = self.codec(cfg)?;
        Ok(Arc::new(http_provider(cfg, env, codec, |_| Ok(None))?))
    }

    /// The models the settings themselves define (the sandbox's), in place of
    /// the file's `models:`.
    fn models(&self) -> Option<Vec<String>> {
        None
    }
}

/// The settings of a kind without a section: its codec from the generic fields.
pub struct Sectionless(pub fn(&ProviderConfig) -> Arc<dyn Codec>);

impl fmt::Debug for Sectionless {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sectionless")
    }
}

impl Settings for Sectionless {
    fn codec(&self, cfg: &ProviderConfig) -> Result<Arc<dyn Codec>, String> {
        Ok((self.0)(cfg))
    }
}

// === registry ===

/// A provider ready to serve, or the reason it cannot (e.g. its key is unset).
#[derive(Clone)]
pub enum ProviderState {
    Ready(Arc<dyn Provider>),
    Unavailable(String),
}

/// Reads an environment variable; injectable so tests need no process-global state.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The provider a validated provider file describes.
pub fn build(cfg: &ProviderConfig, env: EnvLookup<'_>) -> ProviderState {
    match cfg.settings.provider(cfg, env) {
        Ok(p) => ProviderState::Ready(p),
        Err(e) => ProviderState::Unavailable(e),
    }
}

/// The codec of an HTTP provider file.
pub fn codec(cfg: &ProviderConfig) -> Result<Arc<dyn Codec>, String> {
    cfg.settings.codec(cfg)
}

/// A provider on the shared transport: `codec`, the file's base URL, headers,
/// timeouts and limits, and its API key (read from `api_key_env`). `credential`
/// may turn the key into a kind's own credential (a signed or fetched token);
/// when it returns `None` the key goes where the file's `auth` says.
pub fn http_provider(
    cfg: &ProviderConfig,
    env: EnvLookup<'_>,
    codec: Arc<dyn Codec>,
    credential: impl FnOnce(&str) -> Result<Option<Credential>, String>,
) -> Result<HttpProvider, String> {
    let secret = match &cfg.api_key_env {
        None => None,
        Some(var) => match env(var) {
            Some(v) if !v.trim().is_empty() => Some(v.trim().to_owned()),
            _ => {
                return Err(format!(
                    "environment variable {var} (its API key) is not set"
                ))
            }
        },
    };
    let credential = match secret.as_deref() {
        None => Credential::None,
        Some(secret) => match credential(secret)? {
            Some(c) => c,
            None => static_credential(&cfg.auth, secret)?,
        },
    };
    let mut headers = HeaderMap::new();
    for (k, v) in &cfg.headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            headers.insert(k, v);
        }
    }
    let settings = HttpSettings {
        id: cfg.id.clone(),
        base_url: cfg.base_url.clone(),
        credential,
        secret,
        headers,
        timeouts: cfg.timeouts,
        limits: cfg.limits,
    };
    HttpProvider::new(settings, codec)
}

/// The API key as the file's `auth` setting places it.
fn static_credential(auth: &Auth, secret: &str) -> Result<Credential, String> {
    match auth {
        Auth::None => Ok(Credential::None),
        Auth::Bearer => {
            Credential::header(http::header::AUTHORIZATION, &format!("Bearer {secret}"))
        }
        Auth::Header(name) => {
            let h = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("invalid auth header `{name}`"))?;
            Credential::header(h, secret)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{Config, Problem};

    #[test]
    fn kinds_name_their_service_as_the_genai_conventions_do() {
        let name = |k: &str| kind(k).map(|k| k.gen_ai_provider);
        assert_eq!(name("openai"), Some("openai"));
        assert_eq!(name("anthropic"), Some("anthropic"));
        assert_eq!(name("azure"), Some("azure.ai.openai"));
        assert_eq!(name("gemini"), Some("gcp.gemini"));
        // Kinds the conventions do not list keep their own name.
        assert_eq!(name("llamacpp"), Some("llamacpp"));
        for k in KINDS {
            assert!(!k.gen_ai_provider.is_empty(), "{}", k.name);
        }
    }

    /// Loads a gateway with one provider file `p.yaml`.
    fn load(provider: &str) -> Result<Config, Vec<Problem>> {
        load_in(&tempfile::tempdir().unwrap(), provider)
    }

    fn load_in(dir: &tempfile::TempDir, provider: &str) -> Result<Config, Vec<Problem>> {
        std::fs::create_dir_all(dir.path().join("providers")).unwrap();
        std::fs::write(dir.path().join("promptgate.yaml"), "routes: {}\n").unwrap();
        std::fs::write(dir.path().join("providers/p.yaml"), provider).unwrap();
        crate::config::load(&dir.path().join("promptgate.yaml"))
    }

    fn problems(provider: &str) -> Vec<(String, String)> {
        load(provider)
            .err()
            .unwrap_or_else(|| panic!("`{provider}` loaded"))
            .into_iter()
            .map(|p| (p.field, p.message))
            .collect()
    }

    #[test]
    fn every_kind_is_listed_once_and_found_by_name() {
        for k in KINDS {
            assert_eq!(kind(k.name), Some(*k));
            assert_eq!(KINDS.iter().filter(|o| o.name == k.name).count(), 1);
        }
        assert!(kind("telepathy").is_none());
    }

    #[test]
    fn an_unknown_kind_lists_the_known_ones() {
        let p = load("kind: telepathy\n").unwrap_err();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].line, p[0].field.as_str()), (Some(1), "kind"));
        assert!(p[0]
            .message
            .starts_with("unknown variant `telepathy`, expected one of"));
        for k in KINDS {
            assert!(
                p[0].message.contains(&format!("`{}`", k.name)),
                "{}",
                k.name
            );
        }
    }

    #[test]
    fn a_kind_section_belongs_to_its_kind() {
        assert_eq!(
            problems("kind: openai\nbase_url: http://x\nzhipu: {auth: jwt}\n"),
            [(
                "zhipu".to_owned(),
                "a `zhipu` section belongs to `kind: zhipu`, not `kind: openai`".to_owned()
            )]
        );
        let p =
            load("kind: zhipu\nbase_url: http://x\nzhipu: {auth: jwt}\nzhipu: {}\n").unwrap_err();
        assert!(p[0].message.starts_with("duplicate field `zhipu`"), "{p:?}");
        // Kinds without settings have no section: the key is an unknown field.
        let p = load("kind: gemini\nbase_url: http://x\ngemini: {}\n").unwrap_err();
        assert_eq!((p[0].line, p[0].field.as_str()), (Some(3), "gemini"));
        assert!(p[0].message.starts_with("unknown field `gemini`"), "{p:?}");
    }

    #[test]
    fn a_kind_reads_its_own_section_and_names_its_fields() {
        let p = problems("kind: zhipu\nbase_url: http://x\nzhipu: {colour: blue}\n");
        assert_eq!(p[0].0, "zhipu.colour");
        assert!(p[0].1.starts_with("unknown field `colour`"), "{p:?}");
        assert_eq!(
            problems("kind: zhipu\nbase_url: http://x\nzhipu: {auth: magic, jwt_ttl: soon}\n"),
            [
                (
                    "zhipu.auth".to_owned(),
                    "`magic` is not `api_key` or `jwt`".to_owned()
                ),
                (
                    "zhipu.jwt_ttl".to_owned(),
                    "`soon` is not a duration like `500ms` or `30s`: expected number at 0"
                        .to_owned()
                ),
            ]
        );
        assert_eq!(
            problems("kind: azure\nbase_url: http://x\n"),
            [(
                "azure.api_version".to_owned(),
                "Azure OpenAI needs an api_version (e.g. `2024-10-21`)".to_owned()
            )]
        );
        let p = problems("kind: azure\nbase_url: http://x\nazure: {}\n");
        assert_eq!(p[0].0, "azure");
        assert!(p[0].1.starts_with("missing field `api_version`"), "{p:?}");
        assert_eq!(
            problems("kind: qianfan\nbase_url: http://x\nqianfan: {secret_key_env: not a name}\n"),
            [(
                "qianfan.secret_key_env".to_owned(),
                "must be the name of an environment variable".to_owned()
            )]
        );
        assert_eq!(
            problems("kind: sandbox\nsandbox:\n  models:\n    m: {fail: {status: 200}}\n"),
            [(
                "sandbox.models.m.fail.status".to_owned(),
                "must be an HTTP error status (400-599)".to_owned()
            )]
        );
        assert_eq!(
            problems("kind: sandbox\n"),
            [(
                "sandbox".to_owned(),
                "a sandbox provider needs a `sandbox.models` section".to_owned()
            )]
        );
        assert_eq!(
            problems("kind: sandbox\nbase_url: http://x\nsandbox: {models: {m: {}}}\n"),
            [(
                "base_url".to_owned(),
                "a sandbox provider has no base_url (it answers in-process)".to_owned()
            )]
        );
        let p = problems("kind: llamacpp\nbase_url: http://x\n");
        assert_eq!(p[0].0, "llamacpp.templates");
    }

    #[test]
    fn kind_defaults_come_from_the_descriptor() {
        let cfg = load("kind: chatglm\nbase_url: http://x\n").unwrap();
        let p = &cfg.providers["p"];
        assert_eq!(p.kind.name, "chatglm");
        assert!(p.self_hosted && !p.kind.reports_usage);
        assert!(!p.capabilities.tools && p.capabilities.streaming);
        let cfg = load("kind: anthropic\nbase_url: http://x\n").unwrap();
        assert_eq!(cfg.providers["p"].auth, Auth::Header("x-api-key".into()));
        let cfg = load("kind: openai\nbase_url: http://x\n").unwrap();
        assert_eq!(cfg.providers["p"].auth, Auth::Bearer);
        assert!(!cfg.providers["p"].self_hosted);
        let cfg = load("kind: sandbox\nsandbox: {models: {a: {}, b: {}}}\nmodels: [c]\n").unwrap();
        let models: Vec<&str> = cfg.providers["p"]
            .models
            .as_ref()
            .unwrap()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(models, ["a", "b"]);
    }

    #[test]
    fn text_settings_may_be_written_as_numbers() {
        let cfg = load("kind: ollama\nbase_url: http://x\nollama: {keep_alive: -1}\n").unwrap();
        let codec = codec(&cfg.providers["p"]).unwrap();
        let req = openai::decode_chat_request(
            br#"{"model":"r","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let body: serde_json::Value =
            serde_json::from_slice(&codec.chat_call(&req, "m").unwrap().body).unwrap();
        // As when the YAML is read straight into the setting's string.
        assert_eq!(body["keep_alive"], -1);
    }

    #[test]
    fn a_changed_kind_setting_changes_the_provider_config() {
        // A provider's fingerprint (which keeps or resets its health across a
        // reload) is the `Debug` form of its config, kind settings included.
        let dir = tempfile::tempdir().unwrap();
        let debug = |yaml: &str| format!("{:?}", load_in(&dir, yaml).unwrap().providers["p"]);
        let base = "kind: zhipu\nbase_url: http://x\nzhipu: {auth: jwt, jwt_ttl: 10m}\n";
        assert_eq!(debug(base), debug(base));
        assert_ne!(
            debug(base),
            debug("kind: zhipu\nbase_url: http://x\nzhipu: {auth: jwt, jwt_ttl: 11m}\n")
        );
        assert_ne!(
            debug("kind: ollama\nbase_url: http://x\nollama: {keep_alive: 5m}\n"),
            debug("kind: ollama\nbase_url: http://x\nollama: {keep_alive: 6m}\n")
        );
        assert_ne!(
            debug("kind: sandbox\nsandbox: {models: {a: {delay: 1s}}}\n"),
            debug("kind: sandbox\nsandbox: {models: {a: {delay: 2s}}}\n")
        );
    }

    #[test]
    fn qianfan_retries_a_refused_token_and_others_need_their_key() {
        let cfg = load(
            "kind: qianfan\nbase_url: http://x\napi_key_env: AK\nqianfan: {secret_key_env: SK}\n",
        )
        .unwrap();
        let p = &cfg.providers["p"];
        let env = |v: &str| (v == "AK").then(|| "ak".to_owned());
        match build(p, &env) {
            ProviderState::Unavailable(e) => {
                assert_eq!(e, "environment variable SK (its secret key) is not set")
            }
            ProviderState::Ready(_) => panic!("built without its secret key"),
        }
        let none = |_: &str| None;
        match build(p, &none) {
            ProviderState::Unavailable(e) => {
                assert_eq!(e, "environment variable AK (its API key) is not set")
            }
            ProviderState::Ready(_) => panic!("built without its key"),
        }
    }
}
