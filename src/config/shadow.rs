//! `shadow:` and `readiness:` on a route (and `shadow:` on an A/B arm), and the
//! gateway-wide `shadow: {store}`: which candidates receive a sampled copy of
//! live traffic, and the thresholds a readiness report judges them against.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Problems, RawParams, TargetConfig};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShadow {
    targets: Vec<RawShadowTarget>,
    #[serde(default)]
    sample: Option<f64>,
    #[serde(default)]
    max_in_flight: Option<u32>,
    /// `{label: NAME}` or `{version: N}`: the prompt version candidates render.
    #[serde(default)]
    prompt: Option<RawShadowPrompt>,
    /// Keep both outputs (and the request) in the store, for review.
    #[serde(default)]
    keep_outputs: Option<bool>,
    /// An embeddings route: the two outputs' embedding similarity is compared too.
    #[serde(default)]
    embeddings: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShadowTarget {
    pub provider: String,
    pub model: String,
    #[serde(default)]
    pub params: Option<RawParams>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShadowPrompt {
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    version: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReadiness {
    #[serde(default)]
    max_error_rate: Option<f64>,
    #[serde(default)]
    max_p95_latency_ratio: Option<f64>,
    #[serde(default)]
    min_tool_agreement: Option<f64>,
    #[serde(default)]
    min_json_validity: Option<f64>,
    #[serde(default)]
    min_similarity_p50: Option<f64>,
    #[serde(default)]
    min_pairs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShadowStore {
    /// The SQLite file (relative paths beside the gateway file).
    #[serde(default)]
    store: Option<String>,
    /// Pairs older than this are deleted (`30d` by default; `forever` keeps them).
    #[serde(default)]
    retention: Option<String>,
}

/// Where a route's (or arm's) live traffic is copied to.
#[derive(Debug, Clone)]
pub struct ShadowConfig {
    pub targets: Vec<TargetConfig>,
    /// The share of requests copied, in [0, 1].
    pub sample: f64,
    /// Candidate calls in flight for this route at most; a copy beyond it is
    /// dropped (and counted).
    pub max_in_flight: u32,
    /// The prompt version candidates render (a request that uses a prompt).
    pub prompt: Option<crate::prompt::Selector>,
    pub keep_outputs: bool,
    /// The embeddings route for embedding similarity.
    pub embeddings: Option<String>,
}

/// A route's readiness thresholds; a report shows each as met or not (and
/// carries them, serialized, in its JSON).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Readiness {
    /// Candidate errors / pairs.
    pub max_error_rate: f64,
    /// Candidate p95 latency / primary p95 latency.
    pub max_p95_latency_ratio: f64,
    /// Pairs whose tool calls agree / pairs where either side called a tool.
    pub min_tool_agreement: f64,
    /// Candidate answers that are valid JSON / pairs that asked for JSON.
    pub min_json_validity: f64,
    /// The median of the character-level similarity.
    pub min_similarity_p50: f64,
    /// Fewer compared pairs than this: no verdict ("not enough evidence").
    pub min_pairs: u64,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            max_error_rate: 0.02,
            max_p95_latency_ratio: 1.5,
            min_tool_agreement: 0.95,
            min_json_validity: 0.98,
            min_similarity_p50: 0.6,
            min_pairs: 20,
        }
    }
}

/// The gateway-wide shadow settings.
#[derive(Debug, Clone)]
pub struct ShadowStore {
    /// The SQLite file pairs are written to.
    pub path: PathBuf,
    /// Pairs older than this are deleted (`None`: kept forever).
    pub retention: Option<std::time::Duration>,
}

pub(super) fn store(
    file: &Path,
    raw: Option<RawShadowStore>,
    problems: &mut Problems,
) -> ShadowStore {
    let raw = raw.unwrap_or_default();
    let retention = match raw.retention.as_deref() {
        Some("forever") => None,
        text => Some(problems.duration(
            file,
            "shadow.retention",
            &text.map(str::to_owned),
            std::time::Duration::from_secs(30 * 86_400),
        ))
        .filter(|d| {
            if d.is_zero() {
                problems.add(
                    file,
                    "shadow.retention",
                    "must be longer than zero (or `forever`)",
                );
            }
            !d.is_zero()
        }),
    };
    ShadowStore {
        path: super::governance::beside(file, raw.store.as_deref().unwrap_or("data/shadow.sqlite")),
        retention,
    }
}

pub(super) fn readiness(
    file: &Path,
    field: &str,
    raw: Option<RawReadiness>,
    problems: &mut Problems,
) -> Readiness {
    let raw = raw.unwrap_or_default();
    let d = Readiness::default();
    let mut share = |name: &str, v: Option<f64>, default: f64| -> f64 {
        match v {
            None => default,
            Some(x) if (0.0..=1.0).contains(&x) => x,
            Some(_) => {
                problems.add(file, format!("{field}.{name}"), "must be between 0 and 1");
                default
            }
        }
    };
    let r = Readiness {
        max_error_rate: share("max_error_rate", raw.max_error_rate, d.max_error_rate),
        min_tool_agreement: share(
            "min_tool_agreement",
            raw.min_tool_agreement,
            d.min_tool_agreement,
        ),
        min_json_validity: share(
            "min_json_validity",
            raw.min_json_validity,
            d.min_json_validity,
        ),
        min_similarity_p50: share(
            "min_similarity_p50",
            raw.min_similarity_p50,
            d.min_similarity_p50,
        ),
        max_p95_latency_ratio: d.max_p95_latency_ratio,
        min_pairs: raw.min_pairs.unwrap_or(d.min_pairs),
    };
    match raw.max_p95_latency_ratio {
        None => r,
        Some(x) if x.is_finite() && x > 0.0 => Readiness {
            max_p95_latency_ratio: x,
            ..r
        },
        Some(_) => {
            problems.add(
                file,
                format!("{field}.max_p95_latency_ratio"),
                "must be a positive number",
            );
            r
        }
    }
}

/// Checks a `shadow` section; `target` validates each candidate like a route
/// target (known provider and model, params).
pub(super) fn shadow(
    file: &Path,
    field: &str,
    raw: RawShadow,
    mut target: impl FnMut(&str, RawShadowTarget, &mut Problems) -> TargetConfig,
    problems: &mut Problems,
) -> ShadowConfig {
    if raw.targets.is_empty() {
        problems.add(
            file,
            format!("{field}.targets"),
            "name at least one candidate",
        );
    }
    let targets = raw
        .targets
        .into_iter()
        .enumerate()
        .map(|(i, t)| target(&format!("{field}.targets[{i}]"), t, problems))
        .collect();
    let sample = match raw.sample {
        None => 0.05,
        Some(x) if (0.0..=1.0).contains(&x) => x,
        Some(_) => {
            problems.add(file, format!("{field}.sample"), "must be between 0 and 1");
            0.0
        }
    };
    let max_in_flight = match raw.max_in_flight {
        None => 8,
        Some(0) => {
            problems.add(file, format!("{field}.max_in_flight"), "must be at least 1");
            1
        }
        Some(n) => n,
    };
    let prompt = match raw.prompt {
        None => None,
        Some(RawShadowPrompt {
            label: Some(l),
            version: None,
        }) => Some(crate::prompt::Selector::Label(l)),
        Some(RawShadowPrompt {
            label: None,
            version: Some(v),
        }) => Some(crate::prompt::Selector::Version(v)),
        Some(_) => {
            problems.add(file, format!("{field}.prompt"), "give `label` or `version`");
            None
        }
    };
    ShadowConfig {
        targets,
        sample,
        max_in_flight,
        prompt,
        keep_outputs: raw.keep_outputs.unwrap_or(false),
        embeddings: raw.embeddings,
    }
}
