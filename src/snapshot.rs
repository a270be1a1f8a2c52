//! The config snapshot: everything derived from the configuration files (routes,
//! built providers, pre-encoded model list), immutable once built. The gateway
//! holds the current one behind an `ArcSwap`; a request loads it once and keeps
//! that `Arc` to its end, so a reload never changes a request midway.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::config::{Capabilities, Config, ParamOverrides};
use crate::provider::registry::{self, EnvLookup, ProviderState};
use crate::tokens::{encoding_for, Encoding};

/// A public model name and where it goes.
pub struct Route {
    pub name: Arc<str>,
    pub provider_id: Arc<str>,
    pub provider: ProviderState,
    /// The backend's model name.
    pub model: String,
    pub overrides: ParamOverrides,
    /// Tokenizer used when the backend reports no usage.
    pub encoding: Encoding,
    /// What the target model can serve.
    pub capabilities: Capabilities,
}

pub struct Snapshot {
    pub config: Config,
    pub prompts: crate::prompt::Registry,
    routes: HashMap<String, Arc<Route>>,
    pub providers: BTreeMap<String, ProviderState>,
    /// `GET /v1/models`, encoded once.
    pub models_body: Bytes,
    /// "a, b, c": the route names, for unknown-model errors.
    pub route_list: String,
    pub loaded_at: SystemTime,
}

impl Snapshot {
    /// Builds providers, routes and compiled prompts from a validated config.
    pub fn build(
        config: Config,
        env: EnvLookup<'_>,
    ) -> Result<Snapshot, Vec<crate::config::Problem>> {
        let prompts = crate::prompt::Registry::build(config.prompts.clone())?;
        let providers: BTreeMap<String, ProviderState> = config
            .providers
            .iter()
            .map(|(id, p)| (id.clone(), registry::build(p, env)))
            .collect();
        let mut routes = HashMap::new();
        for (name, r) in &config.routes {
            let provider = providers
                .get(&r.provider)
                .cloned()
                .unwrap_or_else(|| ProviderState::Unavailable("not configured".into()));
            let capabilities = config
                .providers
                .get(&r.provider)
                .map(|p| p.capabilities_of(&r.model))
                .unwrap_or_default();
            routes.insert(
                name.clone(),
                Arc::new(Route {
                    name: name.as_str().into(),
                    provider_id: r.provider.as_str().into(),
                    provider,
                    model: r.model.clone(),
                    overrides: r.overrides.clone(),
                    encoding: encoding_for(&r.model),
                    capabilities,
                }),
            );
        }
        let loaded_at = SystemTime::now();
        let created = loaded_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let models_body = Bytes::from(crate::wire::openai::encode_models(
            config.routes.keys().map(String::as_str),
            created,
        ));
        let route_list = config
            .routes
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Snapshot {
            config,
            prompts,
            routes,
            providers,
            models_body,
            route_list,
            loaded_at,
        })
    }

    pub fn route(&self, model: &str) -> Option<&Arc<Route>> {
        self.routes.get(model)
    }

    /// Tokenizer encodings that routes to backends without usage reporting need.
    pub fn encodings_to_preload(&self) -> Vec<Encoding> {
        let mut out = Vec::new();
        for r in self.routes.values() {
            let silent = self
                .config
                .providers
                .get(&*r.provider_id)
                .is_some_and(|p| !p.kind.reports_usage());
            if silent && !out.contains(&r.encoding) {
                out.push(r.encoding);
            }
        }
        out
    }
}
