//! Builds a provider from its validated config by `kind`. Adding a backend is one
//! codec module and one arm here; nothing else in the gateway matches on kinds.

use std::sync::Arc;

use http::HeaderMap;

use super::http::{HttpProvider, HttpSettings};
use super::openai::{OpenAiCodec, Quirks};
use super::sandbox::SandboxProvider;
use super::{Codec, Provider};
use crate::config::{Auth, ProviderConfig, ProviderKind};

/// A provider ready to serve, or the reason it cannot (e.g. its key is unset).
#[derive(Clone)]
pub enum ProviderState {
    Ready(Arc<dyn Provider>),
    Unavailable(String),
}

/// Reads an environment variable; injectable so tests need no process-global state.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn build(cfg: &ProviderConfig, env: EnvLookup<'_>) -> ProviderState {
    match cfg.kind {
        ProviderKind::Sandbox => ProviderState::Ready(Arc::new(SandboxProvider::new(
            &cfg.id,
            cfg.sandbox.clone(),
            cfg.timeouts,
        ))),
        ProviderKind::Openai => http(
            cfg,
            env,
            Arc::new(OpenAiCodec {
                quirks: Quirks {
                    stream_usage: cfg.stream_usage,
                    chat_path: cfg.chat_path.clone(),
                    embeddings_path: cfg.embeddings_path.clone(),
                },
            }),
        ),
    }
}

fn http(cfg: &ProviderConfig, env: EnvLookup<'_>, codec: Arc<dyn Codec>) -> ProviderState {
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
    let auth = match (&cfg.auth, &secret) {
        (_, None) | (Auth::None, _) => None,
        (Auth::Bearer, Some(s)) => Some((http::header::AUTHORIZATION, format!("Bearer {s}"))),
        (Auth::Header(name), Some(s)) => match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => Some((h, s.clone())),
            Err(_) => return ProviderState::Unavailable(format!("invalid auth header `{name}`")),
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
        auth,
        secret,
        headers,
        timeouts: cfg.timeouts,
    };
    match HttpProvider::new(settings, codec) {
        Ok(p) => ProviderState::Ready(Arc::new(p)),
        Err(e) => ProviderState::Unavailable(e),
    }
}
