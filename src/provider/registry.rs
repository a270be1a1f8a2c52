//! Builds a provider from its validated config by `kind`. Adding a backend is one
//! codec module and one arm here; nothing else in the gateway matches on kinds.

use std::sync::Arc;

use http::HeaderMap;

use super::auth::{Credential, QianfanToken, ZhipuJwt};
use super::http::{HttpProvider, HttpSettings};
use super::openai::{OpenAiCodec, Quirks};
use super::sandbox::SandboxProvider;
use super::{Codec, Provider};
use crate::config::{Auth, KindSettings, ProviderConfig, ProviderKind};

/// A provider ready to serve, or the reason it cannot (e.g. its key is unset).
#[derive(Clone)]
pub enum ProviderState {
    Ready(Arc<dyn Provider>),
    Unavailable(String),
}

/// Reads an environment variable; injectable so tests need no process-global state.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

fn openai_quirks(cfg: &ProviderConfig) -> Quirks {
    Quirks {
        stream_usage: cfg.stream_usage,
        chat_path: cfg.chat_path.clone(),
        embeddings_path: cfg.embeddings_path.clone(),
        legacy_functions: cfg.legacy_functions,
    }
}

/// The codec for an HTTP provider's protocol: the one `match` on provider kinds.
pub fn codec(cfg: &ProviderConfig) -> Result<Arc<dyn Codec>, String> {
    Ok(match (cfg.kind, &cfg.settings) {
        (ProviderKind::Openai, _) => Arc::new(OpenAiCodec {
            quirks: openai_quirks(cfg),
        }),
        (
            ProviderKind::Anthropic,
            KindSettings::Anthropic {
                version,
                default_max_tokens,
            },
        ) => Arc::new(super::anthropic::AnthropicCodec::new(
            version,
            *default_max_tokens,
        )),
        (ProviderKind::Llamacpp, KindSettings::Llamacpp { templates }) => {
            Arc::new(super::llamacpp::LlamacppCodec::new(templates)?)
        }
        (ProviderKind::Ollama, KindSettings::Ollama { keep_alive }) => {
            Arc::new(super::ollama::OllamaCodec::new(keep_alive.clone()))
        }
        (ProviderKind::Gemini, _) => Arc::new(super::gemini::GeminiCodec::new()),
        (ProviderKind::Dashscope, _) => Arc::new(super::dashscope::DashscopeCodec::new()),
        (ProviderKind::Zhipu, _) => Arc::new(super::zhipu::ZhipuCodec::new()),
        (ProviderKind::Chatglm, KindSettings::Chatglm { max_length }) => {
            Arc::new(super::chatglm::ChatglmCodec::new(*max_length))
        }
        (ProviderKind::Azure, KindSettings::Azure { api_version }) => {
            Arc::new(super::azure::AzureCodec::new(api_version, cfg.stream_usage))
        }
        (ProviderKind::Qianfan, KindSettings::Qianfan { .. }) => {
            Arc::new(super::qianfan::QianfanCodec::new())
        }
        (kind, _) => {
            return Err(format!(
                "provider kind `{}` has no HTTP codec (or its settings are missing)",
                kind.as_str()
            ))
        }
    })
}

pub fn build(cfg: &ProviderConfig, env: EnvLookup<'_>) -> ProviderState {
    if let (ProviderKind::Sandbox, KindSettings::Sandbox(models)) = (cfg.kind, &cfg.settings) {
        return ProviderState::Ready(Arc::new(SandboxProvider::new(
            &cfg.id,
            models.clone(),
            cfg.timeouts,
        )));
    }
    let codec = match codec(cfg) {
        Ok(c) => c,
        Err(e) => return ProviderState::Unavailable(e),
    };
    let secret = match &cfg.api_key_env {
        None => None,
        Some(var) => match env(var) {
            Some(v) if !v.trim().is_empty() => Some(v.trim().to_owned()),
            _ => {
                return ProviderState::Unavailable(format!(
                    "environment variable {var} (its API key) is not set"
                ))
            }
        },
    };
    let credential = match credential(cfg, secret.as_deref(), env) {
        Ok(c) => c,
        Err(e) => return ProviderState::Unavailable(e),
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
    match HttpProvider::new(settings, codec) {
        // Qianfan v1 retries once with a fresh token when Baidu refuses the old one.
        Ok(p) if cfg.kind == ProviderKind::Qianfan => {
            ProviderState::Ready(Arc::new(super::qianfan::TokenRetry::new(Arc::new(p))))
        }
        Ok(p) => ProviderState::Ready(Arc::new(p)),
        Err(e) => ProviderState::Unavailable(e),
    }
}

/// How a provider authenticates, from its auth setting and kind settings.
fn credential(
    cfg: &ProviderConfig,
    secret: Option<&str>,
    env: EnvLookup<'_>,
) -> Result<Credential, String> {
    let Some(secret) = secret else {
        return Ok(Credential::None);
    };
    match &cfg.settings {
        KindSettings::Zhipu { jwt: true, jwt_ttl } => {
            return Ok(Credential::Dynamic(Box::new(ZhipuJwt::new(
                secret, *jwt_ttl,
            )?)))
        }
        KindSettings::Qianfan {
            secret_key_env,
            token_url,
        } => {
            let sk = env(secret_key_env)
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| {
                    format!("environment variable {secret_key_env} (its secret key) is not set")
                })?;
            return Ok(Credential::Dynamic(Box::new(QianfanToken::new(
                token_url,
                secret,
                sk.trim(),
            ))));
        }
        _ => {}
    }
    match &cfg.auth {
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
