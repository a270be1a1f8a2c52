//! Routes in `promptgate.yaml`: a route is a fallback chain of targets, or a
//! weighted split whose arms are chains; plus its retry policy and privacy flag.
//! Also the gateway-wide circuit-breaker settings.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{ParamOverrides, Problems, ProviderConfig, RawParams};
use crate::prompt::Selector;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    #[serde(default)]
    description: Option<String>,
    /// Shorthand for a single target.
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    params: Option<RawParams>,
    #[serde(default)]
    first_token_timeout: Option<String>,
    /// A fallback chain, tried in order.
    #[serde(default)]
    targets: Option<Vec<RawTarget>>,
    /// A weighted, sticky split (A/B, canary).
    #[serde(default)]
    split: Option<RawSplit>,
    #[serde(default)]
    retry: Option<RawRetry>,
    /// Only self-hosted providers may serve this route.
    #[serde(default)]
    private: Option<bool>,
    #[serde(default)]
    cache: Option<RawRouteCache>,
    /// Rate limits of the whole route: `{rpm, tpm, concurrency}`.
    #[serde(default)]
    limits: Option<super::governance::RawRateLimits>,
    /// Data protection policy (default `data_protection.policy`).
    #[serde(default)]
    data: Option<super::DataPolicy>,
    /// `{content: true}`: audit records of this route carry message content.
    #[serde(default)]
    audit: Option<super::governance::RawRouteAudit>,
    /// Candidates that receive a sampled copy of the route's traffic.
    #[serde(default)]
    shadow: Option<super::shadow::RawShadow>,
    /// The thresholds a readiness report judges candidates against.
    #[serde(default)]
    readiness: Option<super::shadow::RawReadiness>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteCache {
    mode: super::CacheMode,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    shared: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    provider: String,
    model: String,
    #[serde(default)]
    params: Option<RawParams>,
    #[serde(default)]
    first_token_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    /// `user` (the request's `user` field), `header:NAME`, or `key` (the
    /// client's gateway key).
    #[serde(default)]
    subject: Option<String>,
    arms: Vec<RawArm>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArm {
    name: String,
    weight: f64,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    params: Option<RawParams>,
    #[serde(default)]
    targets: Option<Vec<RawTarget>>,
    /// For requests that use a prompt without naming a version: the arm's
    /// prompt version or label.
    #[serde(default)]
    prompt: Option<RawArmPrompt>,
    /// Candidates that receive a sampled copy of the arm's traffic.
    #[serde(default)]
    shadow: Option<super::shadow::RawShadow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArmPrompt {
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    label: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    backoff: Option<String>,
    #[serde(default)]
    max_backoff: Option<String>,
    #[serde(default)]
    deadline: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    #[serde(default)]
    consecutive_failures: Option<u32>,
    #[serde(default)]
    failure_rate: Option<f64>,
    #[serde(default)]
    min_requests: Option<u32>,
    #[serde(default)]
    window: Option<String>,
    #[serde(default)]
    cooldown: Option<String>,
    #[serde(default)]
    half_open_probes: Option<u32>,
}

/// One provider + model a route can send to.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub provider: String,
    pub model: String,
    pub overrides: ParamOverrides,
    /// A stream (or a response) that shows no output within this time is
    /// abandoned and the next target tried.
    pub first_token_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    User,
    Header(String),
    Key,
}

#[derive(Debug, Clone)]
pub struct ArmConfig {
    pub name: String,
    pub weight: f64,
    pub chain: Vec<TargetConfig>,
    pub prompt: Option<Selector>,
    /// Overrides the route's `shadow` for this arm's requests.
    pub shadow: Option<super::ShadowConfig>,
}

#[derive(Debug, Clone)]
pub enum Strategy {
    Chain(Vec<TargetConfig>),
    Split {
        subject: Subject,
        arms: Vec<ArmConfig>,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts across the whole chain; `None`: each target once.
    pub max_attempts: Option<u32>,
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Overall time for all attempts.
    pub deadline: Duration,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub description: Option<String>,
    pub strategy: Strategy,
    pub retry: RetryPolicy,
    pub private: bool,
    pub cache: super::RouteCache,
    /// Rate limits, data policy, audit content.
    pub governance: super::RouteGovernance,
    pub shadow: Option<super::ShadowConfig>,
    pub readiness: super::Readiness,
}

impl RouteConfig {
    /// Every target the route may use.
    pub fn targets(&self) -> Vec<&TargetConfig> {
        match &self.strategy {
            Strategy::Chain(c) => c.iter().collect(),
            Strategy::Split { arms, .. } => arms.iter().flat_map(|a| a.chain.iter()).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Open after this many failures in a row.
    pub consecutive_failures: u32,
    /// …or when this share of the calls in `window` failed (with at least
    /// `min_requests` calls).
    pub failure_rate: f64,
    pub min_requests: u32,
    pub window: Duration,
    /// How long an open breaker skips its target before letting probes through.
    pub cooldown: Duration,
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(10),
            half_open_probes: 1,
        }
    }
}

pub(super) fn breaker(file: &Path, raw: RawBreaker, problems: &mut Problems) -> BreakerConfig {
    let d = BreakerConfig::default();
    let b = BreakerConfig {
        consecutive_failures: raw
            .consecutive_failures
            .unwrap_or(d.consecutive_failures)
            .max(1),
        failure_rate: raw.failure_rate.unwrap_or(d.failure_rate),
        min_requests: raw.min_requests.unwrap_or(d.min_requests),
        window: problems.duration(file, "breaker.window", &raw.window, d.window),
        cooldown: problems.duration(file, "breaker.cooldown", &raw.cooldown, d.cooldown),
        half_open_probes: raw.half_open_probes.unwrap_or(d.half_open_probes).max(1),
    };
    if !(0.0..=1.0).contains(&b.failure_rate) || b.failure_rate == 0.0 {
        problems.add(file, "breaker.failure_rate", "must be in (0, 1]");
    }
    b
}

struct Ctx<'a> {
    file: &'a Path,
    providers: &'a BTreeMap<String, ProviderConfig>,
}

impl Ctx<'_> {
    #[allow(clippy::too_many_arguments)]
    fn target(
        &self,
        field: &str,
        provider: String,
        model: String,
        params: Option<RawParams>,
        ftt: &Option<String>,
        route_ftt: Duration,
        problems: &mut Problems,
    ) -> TargetConfig {
        match self.providers.get(&provider) {
            None => {
                let known: Vec<&str> = self.providers.keys().map(String::as_str).collect();
                problems.add(
                    self.file,
                    format!("{field}.provider"),
                    format!(
                        "unknown provider `{provider}` (providers: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
            Some(p) if !p.has_model(&model) => {
                let names: Vec<&str> = p.models.iter().flatten().map(|(n, _)| n.as_str()).collect();
                problems.add(
                    self.file,
                    format!("{field}.model"),
                    format!(
                        "provider `{}` has no model `{model}` (its models: {})",
                        p.id,
                        names.join(", ")
                    ),
                );
            }
            Some(_) => {}
        }
        let params = params.unwrap_or_default();
        if let Some(t) = params.temperature {
            if !(0.0..=2.0).contains(&t) {
                problems.add(
                    self.file,
                    format!("{field}.params.temperature"),
                    "must be between 0 and 2",
                );
            }
        }
        TargetConfig {
            provider,
            model,
            overrides: params.into_overrides(),
            first_token_timeout: problems.duration(
                self.file,
                &format!("{field}.first_token_timeout"),
                ftt,
                route_ftt,
            ),
        }
    }

    /// A `shadow` section, its candidates checked like route targets.
    fn shadow(
        &self,
        field: &str,
        raw: super::shadow::RawShadow,
        route_ftt: Duration,
        problems: &mut Problems,
    ) -> super::ShadowConfig {
        super::shadow::shadow(
            self.file,
            field,
            raw,
            |f, t, problems| {
                self.target(f, t.provider, t.model, t.params, &None, route_ftt, problems)
            },
            problems,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn chain(
        &self,
        field: &str,
        provider: Option<String>,
        model: Option<String>,
        params: Option<RawParams>,
        targets: Option<Vec<RawTarget>>,
        route_ftt: Duration,
        problems: &mut Problems,
    ) -> Vec<TargetConfig> {
        match (provider, model, targets) {
            (Some(p), Some(m), None) => {
                vec![self.target(field, p, m, params, &None, route_ftt, problems)]
            }
            (None, None, Some(ts)) if !ts.is_empty() => {
                if params.is_some() {
                    problems.add(
                        self.file,
                        format!("{field}.params"),
                        "with `targets`, put `params` on each target",
                    );
                }
                ts.into_iter()
                    .enumerate()
                    .map(|(i, t)| {
                        self.target(
                            &format!("{field}.targets[{i}]"),
                            t.provider,
                            t.model,
                            t.params,
                            &t.first_token_timeout,
                            route_ftt,
                            problems,
                        )
                    })
                    .collect()
            }
            _ => {
                problems.add(
                    self.file,
                    field.to_owned(),
                    "give either `provider` + `model` or a non-empty `targets` list",
                );
                Vec::new()
            }
        }
    }
}

pub(super) fn route(
    file: &Path,
    name: &str,
    r: RawRoute,
    providers: &BTreeMap<String, ProviderConfig>,
    problems: &mut Problems,
) -> RouteConfig {
    let field = format!("routes.{name}");
    let ctx = Ctx { file, providers };
    let route_ftt = problems.duration(
        file,
        &format!("{field}.first_token_timeout"),
        &r.first_token_timeout,
        Duration::from_secs(30),
    );
    let strategy = match r.split {
        Some(split) => {
            if r.provider.is_some()
                || r.model.is_some()
                || r.targets.is_some()
                || r.params.is_some()
            {
                problems.add(
                    file,
                    field.clone(),
                    "a `split` route takes its targets from its arms",
                );
            }
            let subject = match split.subject.as_deref() {
                None | Some("user") => Subject::User,
                Some("key") => Subject::Key,
                Some(h) if h.starts_with("header:") && h.len() > 7 => {
                    Subject::Header(h[7..].trim().to_ascii_lowercase())
                }
                Some(other) => {
                    problems.add(
                        file,
                        format!("{field}.split.subject"),
                        format!("`{other}` is not `user`, `header:NAME` or `key`"),
                    );
                    Subject::User
                }
            };
            if split.arms.is_empty() {
                problems.add(
                    file,
                    format!("{field}.split.arms"),
                    "a split needs at least one arm",
                );
            }
            let mut arms = Vec::new();
            for (i, a) in split.arms.into_iter().enumerate() {
                let af = format!("{field}.split.arms[{i}]");
                if !(a.weight > 0.0 && a.weight.is_finite()) {
                    problems.add(file, format!("{af}.weight"), "must be a positive number");
                }
                if arms.iter().any(|x: &ArmConfig| x.name == a.name) {
                    problems.add(
                        file,
                        format!("{af}.name"),
                        format!("arm `{}` is defined twice", a.name),
                    );
                }
                let prompt = match a.prompt {
                    None => None,
                    Some(RawArmPrompt {
                        version: Some(v),
                        label: None,
                    }) => Some(Selector::Version(v)),
                    Some(RawArmPrompt {
                        version: None,
                        label: Some(l),
                    }) => Some(Selector::Label(l)),
                    Some(_) => {
                        problems.add(file, format!("{af}.prompt"), "give `version` or `label`");
                        None
                    }
                };
                let chain = ctx.chain(
                    &af, a.provider, a.model, a.params, a.targets, route_ftt, problems,
                );
                let shadow = a
                    .shadow
                    .map(|s| ctx.shadow(&format!("{af}.shadow"), s, route_ftt, problems));
                arms.push(ArmConfig {
                    name: a.name,
                    weight: a.weight,
                    chain,
                    prompt,
                    shadow,
                });
            }
            Strategy::Split { subject, arms }
        }
        None => Strategy::Chain(ctx.chain(
            &field, r.provider, r.model, r.params, r.targets, route_ftt, problems,
        )),
    };
    let raw_retry = r.retry.unwrap_or(RawRetry {
        max_attempts: None,
        backoff: None,
        max_backoff: None,
        deadline: None,
    });
    let retry = RetryPolicy {
        max_attempts: raw_retry.max_attempts,
        backoff: problems.duration(
            file,
            &format!("{field}.retry.backoff"),
            &raw_retry.backoff,
            Duration::from_millis(100),
        ),
        max_backoff: problems.duration(
            file,
            &format!("{field}.retry.max_backoff"),
            &raw_retry.max_backoff,
            Duration::from_secs(2),
        ),
        deadline: problems.duration(
            file,
            &format!("{field}.retry.deadline"),
            &raw_retry.deadline,
            Duration::from_secs(600),
        ),
    };
    if retry.max_attempts == Some(0) {
        problems.add(
            file,
            format!("{field}.retry.max_attempts"),
            "must be at least 1",
        );
    }
    let private = r.private.unwrap_or(false);
    let shadow = r
        .shadow
        .map(|s| ctx.shadow(&format!("{field}.shadow"), s, route_ftt, problems));
    let readiness =
        super::shadow::readiness(file, &format!("{field}.readiness"), r.readiness, problems);
    let cache = match r.cache {
        None => super::RouteCache::default(),
        Some(c) => super::RouteCache {
            mode: c.mode,
            ttl: c.ttl.as_ref().map(|_| {
                problems.duration(
                    file,
                    &format!("{field}.cache.ttl"),
                    &c.ttl,
                    Duration::from_secs(600),
                )
            }),
            shared: c.shared.unwrap_or(false),
        },
    };
    let route = RouteConfig {
        name: name.to_owned(),
        description: r.description,
        strategy,
        retry,
        private,
        cache,
        governance: super::RouteGovernance {
            limits: super::governance::rate_limits(
                r.limits.as_ref(),
                file,
                &format!("{field}.limits"),
                problems,
            ),
            data: r.data,
            audit_content: r.audit.and_then(|a| a.content).unwrap_or(false),
        },
        shadow,
        readiness,
    };
    if private {
        let public: Vec<String> = route
            .targets()
            .iter()
            .filter(|t| providers.get(&t.provider).is_some_and(|p| !p.self_hosted))
            .map(|t| t.provider.clone())
            .collect();
        if !public.is_empty() && public.len() == route.targets().len() {
            problems.add(
                file,
                format!("{field}.private"),
                format!(
                    "a private route needs a self-hosted target; {} are not `self_hosted`",
                    public.join(", ")
                ),
            );
        }
    }
    route
}
