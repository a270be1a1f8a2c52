//! The config snapshot: everything derived from the configuration files (routes
//! with their targets, built providers, compiled prompts, pre-encoded model list),
//! immutable once built. The gateway holds the current one behind an `ArcSwap`; a
//! request loads it once and keeps that `Arc` to its end, so a reload never
//! changes a request midway. State that must survive reloads (breakers,
//! experiment figures, drill faults) lives in the [`Book`] and is looked up here,
//! once per snapshot, never per request.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::backend::{self, EnvLookup, ProviderState};
use crate::config::{
    BreakerConfig, Capabilities, Config, ParamOverrides, RetryPolicy, Strategy, Subject,
};
use crate::health::{ArmStats, Book, Health};
use crate::ids::{ProviderId, RouteId, TargetId};
use crate::prompt::Selector;
use crate::tokens::{encoding_for, Encoding};

/// A provider + model a route can send to.
pub struct Target {
    /// `provider/model`: the name in headers, metrics and the admin status.
    pub id: TargetId,
    pub provider_id: ProviderId,
    pub provider: ProviderState,
    /// The backend's model name.
    pub model: String,
    pub overrides: ParamOverrides,
    /// What the target model can serve.
    pub capabilities: Capabilities,
    /// Tokenizer used when the backend reports no usage.
    pub encoding: Encoding,
    pub self_hosted: bool,
    pub first_token_timeout: Duration,
    /// The provider's response-headers timeout (bounds a stalled call).
    pub headers_timeout: Duration,
    pub health: Arc<Health>,
    /// Its price per million tokens, from the provider's price table.
    pub price: Option<crate::config::Price>,
    /// Its metric handles, resolved on first use ([`Target::metrics`]).
    handles: std::sync::OnceLock<crate::metrics::TargetHandles>,
    /// The route it belongs to (a target is built per route).
    route: RouteId,
}

impl Target {
    /// The target's metric handles in `metrics` (the gateway's; a snapshot
    /// serves one gateway), resolved once.
    pub fn metrics(&self, metrics: &crate::metrics::Metrics) -> &crate::metrics::TargetHandles {
        self.handles
            .get_or_init(|| metrics.target_handles(&self.route, &self.id, &self.provider_id))
    }

    /// Its metric handles if a request already made them (a scrape refreshes
    /// those without adding series for targets nobody used).
    pub fn metrics_if_used(&self) -> Option<&crate::metrics::TargetHandles> {
        self.handles.get()
    }
}

pub struct Arm {
    pub name: Arc<str>,
    /// Upper end of this arm's share of [0, 1).
    pub upper: f64,
    pub chain: Vec<Arc<Target>>,
    pub prompt: Option<Selector>,
    pub stats: Arc<ArmStats>,
    /// The arm's own shadow candidates (else the route's).
    pub shadow: Option<Arc<Shadow>>,
}

impl Arm {
    /// Its name and running figures, as the pipeline counts an answer for it.
    pub fn figures(&self) -> (&str, &ArmStats) {
        (&self.name, &self.stats)
    }
}

/// A route's (or arm's) shadow candidates, built once per snapshot.
pub struct Shadow {
    /// Each candidate, built like a route target (health is never recorded
    /// for shadow calls: a candidate's failures open no breaker).
    pub candidates: Vec<Arc<Target>>,
    pub sample: f64,
    /// Candidate calls in flight at most (a per-snapshot gate: after a reload
    /// the calls of the old snapshot finish under the old gate).
    pub gate: Arc<tokio::sync::Semaphore>,
    /// The prompt version candidates render instead of the live one.
    pub prompt: Option<Selector>,
    pub keep_outputs: bool,
    /// The embeddings route for embedding similarity.
    pub embeddings: Option<String>,
}

pub enum Plan {
    Chain(Vec<Arc<Target>>),
    Split { subject: Subject, arms: Vec<Arm> },
}

/// A public model name and how it is served.
pub struct Route {
    pub name: RouteId,
    pub plan: Plan,
    pub retry: RetryPolicy,
    pub private: bool,
    pub cache: crate::config::RouteCache,
    /// Rate limits, data policy, audit content.
    pub governance: crate::config::RouteGovernance,
    /// Shadow candidates of the whole route (an arm may have its own).
    pub shadow: Option<Arc<Shadow>>,
    /// Thresholds of its readiness report.
    pub readiness: crate::config::Readiness,
    /// Its metric handles, resolved on first use ([`Route::metrics`]).
    handles: std::sync::OnceLock<crate::metrics::RouteHandles>,
}

impl Route {
    /// The route's metric handles in `metrics` (the gateway's), resolved once.
    pub fn metrics(&self, metrics: &crate::metrics::Metrics) -> &crate::metrics::RouteHandles {
        self.handles
            .get_or_init(|| metrics.route_handles(&self.name))
    }

    /// The index of the arm a subject is assigned to (sticky; drawn at random
    /// without a subject). A split route only; the request context calls it once
    /// per request ([`crate::pipeline::context::Placement`]).
    pub fn arm_index(&self, subject: Option<&str>) -> usize {
        let Plan::Split { arms, .. } = &self.plan else {
            return 0;
        };
        let x = match subject {
            Some(s) => crate::health::unit_interval(&self.name, s),
            None => rand::random::<f64>(),
        };
        arms.iter()
            .position(|a| x < a.upper)
            .unwrap_or(arms.len().saturating_sub(1))
    }

    /// The arm at `i` of a split.
    pub fn arm_at(&self, i: usize) -> Option<&Arm> {
        match &self.plan {
            Plan::Split { arms, .. } => arms.get(i),
            Plan::Chain(_) => None,
        }
    }

    /// Whether some shadow of the route renders its own prompt version (the
    /// request is then kept as it was before rendering).
    pub fn shadow_renders(&self) -> bool {
        let renders = |s: &Option<Arc<Shadow>>| s.as_ref().is_some_and(|s| s.prompt.is_some());
        renders(&self.shadow)
            || matches!(&self.plan, Plan::Split { arms, .. } if arms.iter().any(|a| renders(&a.shadow)))
    }

    /// The chain of a plain route (empty for a split: its arms hold the chains).
    pub fn chain(&self) -> &[Arc<Target>] {
        match &self.plan {
            Plan::Chain(c) => c,
            Plan::Split { .. } => &[],
        }
    }

    pub fn targets(&self) -> Vec<&Arc<Target>> {
        match &self.plan {
            Plan::Chain(c) => c.iter().collect(),
            Plan::Split { arms, .. } => arms.iter().flat_map(|a| a.chain.iter()).collect(),
        }
    }
}

pub struct Snapshot {
    pub config: Config,
    pub prompts: crate::prompt::Registry,
    /// Every configured retriever, built once per snapshot.
    pub retrievers: crate::retrieval::Retrievers,
    routes: HashMap<String, Arc<Route>>,
    pub providers: BTreeMap<String, ProviderState>,
    pub breaker: BreakerConfig,
    /// `GET /v1/models`, encoded once.
    pub models_body: Bytes,
    /// "a, b, c": the route names, for unknown-model errors.
    pub route_list: String,
    pub loaded_at: SystemTime,
    /// Gateway keys by hash and the auth mode, built once per snapshot.
    pub access: crate::governance::Access,
    /// The data-protection detectors, compiled once per snapshot.
    pub protect: crate::protect::Scanner,
}

/// Summarises the backend behind a target id (`provider/model`): its provider's
/// configuration. A reload that changes it starts the target's health over
/// (`Book::health`). Route-level target settings are left out: one target id
/// shared by routes with different settings keeps one health.
fn fingerprint(provider: Option<&crate::config::ProviderConfig>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{provider:?}").hash(&mut h);
    h.finish()
}

impl Snapshot {
    /// Builds providers, routes and compiled prompts from a validated config.
    pub fn build(
        config: Config,
        env: EnvLookup<'_>,
        book: &Book,
    ) -> Result<Snapshot, Vec<crate::config::Problem>> {
        let prompts =
            crate::prompt::Registry::build_with(config.prompts.clone(), &config.retrievers)?;
        let providers: BTreeMap<String, ProviderState> = config
            .providers
            .iter()
            .map(|(id, p)| (id.clone(), backend::build(p, env)))
            .collect();
        let target = |route: &RouteId, t: &crate::config::TargetConfig| -> Arc<Target> {
            let provider = providers
                .get(&t.provider)
                .cloned()
                .unwrap_or_else(|| ProviderState::Unavailable("not configured".into()));
            let pc = config.providers.get(&t.provider);
            let id = TargetId::from(format!("{}/{}", t.provider, t.model));
            Arc::new(Target {
                health: book.health(&id, fingerprint(pc)),
                id,
                provider_id: ProviderId::from(t.provider.as_str()),
                provider,
                model: t.model.clone(),
                overrides: t.overrides.clone(),
                capabilities: pc.map(|p| p.capabilities_of(&t.model)).unwrap_or_default(),
                encoding: encoding_for(&t.model),
                self_hosted: pc.is_some_and(|p| p.self_hosted),
                first_token_timeout: t.first_token_timeout,
                headers_timeout: pc
                    .map(|p| p.timeouts.headers)
                    .unwrap_or(Duration::from_secs(120)),
                price: pc
                    .and_then(|p| p.prices.as_ref())
                    .and_then(|p| p.price(&t.model)),
                handles: std::sync::OnceLock::new(),
                route: route.clone(),
            })
        };
        let mut routes = HashMap::new();
        for (name, r) in &config.routes {
            let route_id = RouteId::from(name.as_str());
            let target = |t: &crate::config::TargetConfig| target(&route_id, t);
            let shadow = |s: &Option<crate::config::ShadowConfig>| {
                s.as_ref().map(|s| {
                    Arc::new(Shadow {
                        candidates: s.targets.iter().map(&target).collect(),
                        sample: s.sample,
                        gate: Arc::new(tokio::sync::Semaphore::new(s.max_in_flight as usize)),
                        prompt: s.prompt.clone(),
                        keep_outputs: s.keep_outputs,
                        embeddings: s.embeddings.clone(),
                    })
                })
            };
            let plan = match &r.strategy {
                Strategy::Chain(c) => Plan::Chain(c.iter().map(target).collect()),
                Strategy::Split { subject, arms } => {
                    let total: f64 = arms.iter().map(|a| a.weight).sum();
                    let mut acc = 0.0;
                    Plan::Split {
                        subject: subject.clone(),
                        arms: arms
                            .iter()
                            .map(|a| {
                                acc += a.weight / total;
                                Arm {
                                    name: a.name.as_str().into(),
                                    upper: acc,
                                    chain: a.chain.iter().map(target).collect(),
                                    prompt: a.prompt.clone(),
                                    stats: book.arm(name, &a.name),
                                    shadow: shadow(&a.shadow),
                                }
                            })
                            .collect(),
                    }
                }
            };
            routes.insert(
                name.clone(),
                Arc::new(Route {
                    name: route_id.clone(),
                    plan,
                    retry: r.retry,
                    private: r.private,
                    cache: r.cache,
                    governance: r.governance.clone(),
                    shadow: shadow(&r.shadow),
                    readiness: r.readiness,
                    handles: std::sync::OnceLock::new(),
                }),
            );
        }
        let loaded_at = SystemTime::now();
        let created = loaded_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let models_body = Bytes::from(crate::backend::openai::encode_models(
            config.routes.keys().map(String::as_str),
            created,
        ));
        let route_list = config
            .routes
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let retrievers = crate::retrieval::Retrievers::build(&config.retrievers, env);
        let access = crate::governance::Access::build(&config);
        let protect = crate::protect::Scanner::build(&config.protect);
        Ok(Snapshot {
            access,
            protect,
            breaker: config.breaker,
            config,
            prompts,
            retrievers,
            routes,
            providers,
            models_body,
            route_list,
            loaded_at,
        })
    }

    /// Drops from `book` the targets and arms this snapshot does not reference;
    /// called when it replaces the current one.
    pub fn prune_book(&self, book: &Book) {
        let targets: std::collections::HashSet<&str> = self
            .routes
            .values()
            .flat_map(|r| r.targets())
            .map(|t| &*t.id)
            .collect();
        let arms: std::collections::HashSet<(&str, &str)> = self
            .routes
            .values()
            .flat_map(|r| match &r.plan {
                Plan::Split { arms, .. } => arms.iter().map(|a| (&*r.name, &*a.name)).collect(),
                Plan::Chain(_) => Vec::new(),
            })
            .collect();
        book.prune(
            |id| targets.contains(id),
            |route, arm| arms.contains(&(route, arm)),
        );
    }

    pub fn route(&self, model: &str) -> Option<&Arc<Route>> {
        self.routes.get(model)
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.values()
    }

    /// Tokenizer encodings that routes to backends without usage reporting,
    /// and retrieval's token budgets, need.
    pub fn encodings_to_preload(&self) -> Vec<Encoding> {
        let mut out = Vec::new();
        for r in self.routes.values() {
            for t in r.targets() {
                let silent = self
                    .config
                    .providers
                    .get(&*t.provider_id)
                    .is_some_and(|p| !p.kind.reports_usage);
                if silent && !out.contains(&t.encoding) {
                    out.push(t.encoding);
                }
            }
        }
        // Retrieval budgets passages (`max_tokens`) in cl100k tokens.
        if !self.config.retrievers.is_empty() && !out.contains(&Encoding::Cl100k) {
            out.push(Encoding::Cl100k);
        }
        out
    }
}
