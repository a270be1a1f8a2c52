//! The readiness report: what the stored pairs say about each candidate next
//! to the route's primary, and a verdict against the route's `readiness`
//! thresholds. [`build`] is pure (pairs in, [`Report`] out); the JSON form is
//! the report serialised, [`render_markdown`] the form a person reads, ending
//! with the configuration change that moves traffic.
//!
//! Every quantile is nearest-rank: of `n` sorted values, the `p` quantile is
//! the value of rank `ceil(p * n)` (the first for `p = 0`), an observed value,
//! never interpolated.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::Pair;
use crate::config::{Readiness, RouteConfig, Strategy, Subject};

/// The quantile method, as the report states it.
pub const QUANTILE_METHOD: &str =
    "nearest-rank: the p quantile of n sorted values is the value of rank ceil(p*n)";

/// Worst disagreements listed per candidate at most.
const WORST: usize = 10;
/// Characters of an output shown in a disagreement.
const OUTPUT_CHARS: usize = 400;
/// Characters of a request shown in a disagreement.
const REQUEST_CHARS: usize = 200;

/// A target, `provider` and `model`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    pub provider: String,
    pub model: String,
}

/// How the route sends traffic today: what the "moving traffic" snippet
/// rewrites.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Layout {
    /// A fallback chain, tried in order.
    Chain { targets: Vec<Target> },
    /// A weighted split (`subject` as the config writes it).
    Split { subject: String, arms: Vec<Arm> },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Arm {
    pub name: String,
    pub weight: f64,
    pub targets: Vec<Target>,
}

/// The route as the report needs it: its name and layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteView {
    pub name: String,
    pub layout: Layout,
}

impl RouteView {
    pub fn of(route: &RouteConfig) -> RouteView {
        let targets = |chain: &[crate::config::TargetConfig]| {
            chain
                .iter()
                .map(|t| Target {
                    provider: t.provider.clone(),
                    model: t.model.clone(),
                })
                .collect()
        };
        let layout = match &route.strategy {
            Strategy::Chain(c) => Layout::Chain {
                targets: targets(c),
            },
            Strategy::Split { subject, arms } => Layout::Split {
                subject: match subject {
                    Subject::User => "user".to_owned(),
                    Subject::Key => "key".to_owned(),
                    Subject::Header(h) => format!("header:{h}"),
                },
                arms: arms
                    .iter()
                    .map(|a| Arm {
                        name: a.name.clone(),
                        weight: a.weight,
                        targets: targets(&a.chain),
                    })
                    .collect(),
            },
        };
        RouteView {
            name: route.name.clone(),
            layout,
        }
    }

    /// The primary, in words: `openai/gpt-4o-mini → deepseek/deepseek-chat`.
    pub fn describe(&self) -> String {
        let chain = |t: &[Target]| {
            t.iter()
                .map(|t| format!("{}/{}", t.provider, t.model))
                .collect::<Vec<_>>()
                .join(" → ")
        };
        match &self.layout {
            Layout::Chain { targets } => chain(targets),
            Layout::Split { arms, .. } => arms
                .iter()
                .map(|a| format!("{} ({}): {}", a.name, fmt_num(a.weight), chain(&a.targets)))
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub route: String,
    /// The route's targets today.
    pub primary: String,
    pub layout: Layout,
    pub generated_at: String,
    pub generated_at_ms: i64,
    /// The window (`--since`), when one was given.
    pub since: Option<String>,
    pub since_ms: Option<i64>,
    pub quantile_method: &'static str,
    /// The route's thresholds, as the verdict applied them.
    pub thresholds: Readiness,
    /// Pairs read, all candidates.
    pub pairs: u64,
    pub candidates: Vec<CandidateReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateReport {
    /// `provider/model`.
    pub candidate: String,
    pub pairs: u64,
    /// Pairs where both sides answered and were compared.
    pub compared: u64,
    pub first_at: Option<String>,
    pub last_at: Option<String>,
    pub primary_side: SideStats,
    pub candidate_side: SideStats,
    pub similarity: Similarity,
    pub json: JsonStats,
    pub tools: ToolStats,
    pub answers: AnswerStats,
    /// Whether any pair kept its outputs (the worst disagreements need them).
    pub outputs_kept: bool,
    pub worst: Vec<Disagreement>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TtftQuantiles {
    pub p50: f64,
    pub p95: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Tokens {
    pub sum: u64,
    pub mean: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cost {
    pub sum: f64,
    /// Over the priced requests.
    pub per_1k_requests: f64,
    pub priced_requests: u64,
}

/// One side (the primary or the candidate) over a candidate's pairs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SideStats {
    /// The targets that answered on this side (a primary may fall back).
    pub targets: Vec<String>,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Over the pairs where both sides answered (so the two sides compare).
    pub latency_ms: Option<Quantiles>,
    /// Over the streamed pairs where both sides answered.
    pub ttft_ms: Option<TtftQuantiles>,
    pub finish_reasons: BTreeMap<String, u64>,
    pub input_tokens: Tokens,
    pub output_tokens: Tokens,
    pub cost: Option<Cost>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Distribution {
    pub p10: f64,
    pub p25: f64,
    pub p50: f64,
    pub p75: f64,
    pub p90: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Similarity {
    pub char_similarity: Option<Distribution>,
    pub token_f1: Option<Distribution>,
    /// Pairs per tenth of character similarity: `[0, 0.1)`, …, `[0.9, 1]`.
    pub char_histogram: [u64; 10],
    pub exact_match_rate: Option<f64>,
    pub embedding_p50: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JsonStats {
    /// Compared pairs whose request asked for JSON.
    pub pairs: u64,
    pub primary_validity: Option<f64>,
    pub candidate_validity: Option<f64>,
    pub schema_agreement: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ToolStats {
    /// Compared pairs where either side called a tool.
    pub pairs: u64,
    pub agreement: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AnswerStats {
    pub primary_refusals: u64,
    pub candidate_refusals: u64,
    pub primary_empty: u64,
    pub candidate_empty: u64,
    pub length_ratio_p50: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Disagreement {
    /// `failure`, `tool_disagreement`, `invalid_json` or `low_similarity`.
    pub why: &'static str,
    pub request_id: String,
    pub at: String,
    pub char_similarity: Option<f64>,
    pub primary_error: Option<String>,
    pub candidate_error: Option<String>,
    pub request: Option<String>,
    pub primary_output: String,
    pub candidate_output: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub name: &'static str,
    /// `max` (the figure must not exceed it) or `min` (must reach it).
    pub bound: &'static str,
    pub threshold: f64,
    pub figure: Option<f64>,
    /// `None`: not applicable (nothing to judge: no JSON asked, no tool call…).
    pub met: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub ready: bool,
    pub summary: String,
    pub checks: Vec<Check>,
}

/// Nearest-rank quantile of sorted values (`None` when empty).
pub fn quantile(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = (p.clamp(0.0, 1.0) * n as f64).ceil() as usize;
    sorted.get(rank.clamp(1, n) - 1).copied()
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    v
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn rate(n: u64, of: u64) -> Option<f64> {
    (of > 0).then(|| n as f64 / of as f64)
}

fn distribution(values: Vec<f64>) -> Option<Distribution> {
    let v = sorted(values);
    Some(Distribution {
        p10: quantile(&v, 0.10)?,
        p25: quantile(&v, 0.25)?,
        p50: quantile(&v, 0.50)?,
        p75: quantile(&v, 0.75)?,
        p90: quantile(&v, 0.90)?,
        mean: mean(&v)?,
    })
}

fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The first `n` characters, with `…` when cut.
fn excerpt(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

/// The last user message of a canonical request, else the request itself.
fn request_excerpt(request: &str) -> String {
    let last_user = serde_json::from_str::<serde_json::Value>(request)
        .ok()
        .and_then(|v| {
            let msgs = v.get("messages")?.as_array()?;
            let m = msgs
                .iter()
                .rev()
                .find(|m| m.get("role").and_then(|r| r.as_str()) == Some("user"))?;
            match m.get("content")? {
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            }
        });
    excerpt(last_user.as_deref().unwrap_or(request), REQUEST_CHARS)
}

fn side_stats(pairs: &[&Pair], primary: bool) -> SideStats {
    let mut s = SideStats::default();
    let mut targets: Vec<String> = Vec::new();
    let (mut lat, mut ttft, mut cost, mut priced) = (Vec::new(), Vec::new(), 0.0, 0u64);
    for p in pairs {
        let x = if primary { &p.primary } else { &p.candidate };
        if !targets.contains(&x.target) {
            targets.push(x.target.clone());
        }
        s.requests += 1;
        match &x.error {
            Some(kind) => {
                s.errors += 1;
                *s.errors_by_kind.entry(kind.clone()).or_default() += 1;
            }
            None => {
                if let Some(f) = &x.finish {
                    *s.finish_reasons.entry(f.clone()).or_default() += 1;
                }
            }
        }
        if both_answered(p) {
            lat.push(x.latency_ms);
            if p.stream {
                if let Some(t) = x.ttft_ms {
                    ttft.push(t);
                }
            }
        }
        s.input_tokens.sum = s.input_tokens.sum.saturating_add(u64::from(x.input_tokens));
        s.output_tokens.sum = s
            .output_tokens
            .sum
            .saturating_add(u64::from(x.output_tokens));
        if let Some(c) = x.cost.filter(|c| c.is_finite()) {
            cost += c;
            priced += 1;
        }
    }
    targets.sort();
    s.targets = targets;
    s.error_rate = rate(s.errors, s.requests).unwrap_or(0.0);
    let lat = sorted(lat);
    s.latency_ms = quantiles(&lat);
    let ttft = sorted(ttft);
    s.ttft_ms = quantile(&ttft, 0.50)
        .zip(quantile(&ttft, 0.95))
        .map(|(p50, p95)| TtftQuantiles { p50, p95 });
    if s.requests > 0 {
        s.input_tokens.mean = s.input_tokens.sum as f64 / s.requests as f64;
        s.output_tokens.mean = s.output_tokens.sum as f64 / s.requests as f64;
    }
    if priced > 0 {
        s.cost = Some(Cost {
            sum: cost,
            per_1k_requests: cost / priced as f64 * 1000.0,
            priced_requests: priced,
        });
    }
    s
}

fn quantiles(v: &[f64]) -> Option<Quantiles> {
    Some(Quantiles {
        p50: quantile(v, 0.50)?,
        p95: quantile(v, 0.95)?,
        p99: quantile(v, 0.99)?,
    })
}

fn both_answered(p: &Pair) -> bool {
    p.primary.error.is_none() && p.candidate.error.is_none()
}

fn kept_outputs(p: &Pair) -> bool {
    p.request.is_some() || !p.primary.text.is_empty() || !p.candidate.text.is_empty()
}

/// Worst first: failures, then tool disagreement, invalid JSON, then the
/// lowest character similarity (exact matches are no disagreement).
fn worst(pairs: &[&Pair]) -> Vec<Disagreement> {
    let mut ranked: Vec<(u8, f64, i64, &Pair)> = pairs
        .iter()
        .filter(|p| kept_outputs(p))
        .filter_map(|p| {
            let c = p.comparison.as_ref();
            let (class, sim) = if !both_answered(p) {
                (0, 0.0)
            } else {
                // Both answered but not compared: nothing to rank it by.
                let c = c?;
                if c.tool_agreement == Some(false) {
                    (1, c.char_similarity)
                } else if c.json.is_some_and(|j| !j.candidate_valid) {
                    (2, c.char_similarity)
                } else if c.exact {
                    return None;
                } else {
                    (3, c.char_similarity)
                }
            };
            Some((class, sim, p.at_ms, *p))
        })
        .collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked
        .into_iter()
        .take(WORST)
        .map(|(class, _, _, p)| Disagreement {
            why: match class {
                0 => "failure",
                1 => "tool_disagreement",
                2 => "invalid_json",
                _ => "low_similarity",
            },
            request_id: p.request_id.clone(),
            at: time(p.at_ms),
            char_similarity: p.comparison.as_ref().map(|c| c.char_similarity),
            primary_error: p.primary.error.clone(),
            candidate_error: p.candidate.error.clone(),
            request: p.request.as_deref().map(request_excerpt),
            primary_output: excerpt(&output(&p.primary), OUTPUT_CHARS),
            candidate_output: excerpt(&output(&p.candidate), OUTPUT_CHARS),
        })
        .collect()
}

/// The text, followed by any tool calls.
fn output(s: &super::Side) -> String {
    let mut out = s.text.clone();
    for t in &s.tool_calls {
        if !out.is_empty() {
            out.push('\n');
        }
        let _ = write!(out, "[tool] {}({})", t.name, t.arguments);
    }
    out
}

fn candidate_report(name: &str, pairs: &[&Pair], th: &Readiness) -> CandidateReport {
    let compared: Vec<&super::Comparison> = pairs
        .iter()
        .filter(|p| both_answered(p))
        .filter_map(|p| p.comparison.as_ref())
        .collect();
    let n_compared = compared.len() as u64;
    let primary_side = side_stats(pairs, true);
    let candidate_side = side_stats(pairs, false);

    let chars: Vec<f64> = compared.iter().map(|c| c.char_similarity).collect();
    let mut char_histogram = [0u64; 10];
    for c in chars.iter().filter(|c| c.is_finite()) {
        let b = ((c.clamp(0.0, 1.0) * 10.0).floor() as usize).min(9);
        char_histogram[b] += 1;
    }
    let char_similarity = distribution(chars);
    let similarity = Similarity {
        token_f1: distribution(compared.iter().map(|c| c.token_f1).collect()),
        char_histogram,
        exact_match_rate: rate(
            compared.iter().filter(|c| c.exact).count() as u64,
            n_compared,
        ),
        embedding_p50: quantile(
            &sorted(
                compared
                    .iter()
                    .filter_map(|c| c.embedding_similarity)
                    .collect(),
            ),
            0.5,
        ),
        char_similarity,
    };

    let js: Vec<super::JsonCheck> = compared.iter().filter_map(|c| c.json).collect();
    let jn = js.len() as u64;
    let count = |f: fn(&super::JsonCheck) -> bool| js.iter().filter(|j| f(j)).count() as u64;
    let json = JsonStats {
        pairs: jn,
        primary_validity: rate(count(|j| j.primary_valid), jn),
        candidate_validity: rate(count(|j| j.candidate_valid), jn),
        schema_agreement: rate(count(|j| j.schema_agree), jn),
    };

    let tool: Vec<bool> = compared.iter().filter_map(|c| c.tool_agreement).collect();
    let tools = ToolStats {
        pairs: tool.len() as u64,
        agreement: rate(
            tool.iter().filter(|a| **a).count() as u64,
            tool.len() as u64,
        ),
    };

    let answers = AnswerStats {
        primary_refusals: compared.iter().filter(|c| c.primary_refusal).count() as u64,
        candidate_refusals: compared.iter().filter(|c| c.candidate_refusal).count() as u64,
        primary_empty: compared.iter().filter(|c| c.primary_empty).count() as u64,
        candidate_empty: compared.iter().filter(|c| c.candidate_empty).count() as u64,
        length_ratio_p50: quantile(
            &sorted(compared.iter().filter_map(|c| c.length_ratio).collect()),
            0.5,
        ),
    };

    let latency_ratio = match (&primary_side.latency_ms, &candidate_side.latency_ms) {
        (Some(p), Some(c)) if p.p95 > 0.0 => Some(c.p95 / p.p95),
        _ => None,
    };
    let verdict = verdict(
        th,
        pairs.len() as u64,
        n_compared,
        candidate_side.errors,
        latency_ratio,
        tools.agreement,
        json.candidate_validity,
        similarity.char_similarity.as_ref().map(|d| d.p50),
    );

    CandidateReport {
        candidate: name.to_owned(),
        pairs: pairs.len() as u64,
        compared: n_compared,
        first_at: pairs.iter().map(|p| p.at_ms).min().map(time),
        last_at: pairs.iter().map(|p| p.at_ms).max().map(time),
        outputs_kept: pairs.iter().any(|p| kept_outputs(p)),
        worst: worst(pairs),
        primary_side,
        candidate_side,
        similarity,
        json,
        tools,
        answers,
        verdict,
    }
}

#[allow(clippy::too_many_arguments)]
fn verdict(
    th: &Readiness,
    pairs: u64,
    compared: u64,
    candidate_errors: u64,
    latency_ratio: Option<f64>,
    tool_agreement: Option<f64>,
    json_validity: Option<f64>,
    similarity_p50: Option<f64>,
) -> Verdict {
    let max = |name, threshold: f64, figure: Option<f64>| Check {
        name,
        bound: "max",
        threshold,
        figure,
        met: figure.map(|f| f <= threshold),
    };
    let min = |name, threshold: f64, figure: Option<f64>| Check {
        name,
        bound: "min",
        threshold,
        figure,
        met: figure.map(|f| f >= threshold),
    };
    let checks = vec![
        min("compared_pairs", th.min_pairs as f64, Some(compared as f64)),
        max(
            "error_rate",
            th.max_error_rate,
            rate(candidate_errors, pairs),
        ),
        max("p95_latency_ratio", th.max_p95_latency_ratio, latency_ratio),
        min("tool_agreement", th.min_tool_agreement, tool_agreement),
        min("json_validity", th.min_json_validity, json_validity),
        min("similarity_p50", th.min_similarity_p50, similarity_p50),
    ];
    let failed: Vec<String> = checks
        .iter()
        .skip(1)
        .filter(|c| c.met == Some(false))
        .map(|c| {
            format!(
                "{} {} {} {}",
                label(c.name),
                fmt_num(c.figure.unwrap_or(0.0)),
                if c.bound == "max" { ">" } else { "<" },
                fmt_num(c.threshold)
            )
        })
        .collect();
    let enough = compared >= th.min_pairs;
    let ready = enough && failed.is_empty();
    let summary = if !enough {
        let mut s = format!(
            "not enough evidence ({compared} of {} compared pairs)",
            th.min_pairs
        );
        if !failed.is_empty() {
            let _ = write!(s, "; so far failing: {}", failed.join("; "));
        }
        s
    } else if ready {
        format!("ready: every applicable threshold met over {compared} compared pairs")
    } else {
        format!("not ready: {}", failed.join("; "))
    };
    Verdict {
        ready,
        summary,
        checks,
    }
}

fn label(check: &str) -> &'static str {
    match check {
        "compared_pairs" => "compared pairs",
        "error_rate" => "error rate",
        "p95_latency_ratio" => "p95 latency ratio",
        "tool_agreement" => "tool agreement",
        "json_validity" => "JSON validity",
        "similarity_p50" => "similarity p50",
        _ => "check",
    }
}

/// Builds the report over `pairs` (any order; grouped per candidate, sorted
/// by name). `since` is the window the pairs were read over, shown as given.
pub fn build(
    route: &RouteView,
    pairs: &[Pair],
    thresholds: &Readiness,
    now_ms: i64,
    since: Option<Duration>,
) -> Report {
    let th = *thresholds;
    let mut by: BTreeMap<&str, Vec<&Pair>> = BTreeMap::new();
    for p in pairs {
        by.entry(p.candidate.target.as_str()).or_default().push(p);
    }
    let candidates = by
        .iter()
        .map(|(name, ps)| candidate_report(name, ps, &th))
        .collect();
    Report {
        route: route.name.clone(),
        primary: route.describe(),
        layout: route.layout.clone(),
        generated_at: time(now_ms),
        generated_at_ms: now_ms,
        since: since.map(|d| humantime::format_duration(d).to_string()),
        since_ms: since
            .map(|d| now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
        quantile_method: QUANTILE_METHOD,
        thresholds: th,
        pairs: pairs.len() as u64,
        candidates,
    }
}

/// A number as the report prints it: up to three decimals, no trailing zeros.
fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".to_owned();
    }
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map(fmt_num).unwrap_or_else(|| "n/a".to_owned())
}

fn pct(x: Option<f64>) -> String {
    x.map(|x| format!("{}%", fmt_num(x * 100.0)))
        .unwrap_or_else(|| "n/a".to_owned())
}

fn counts(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "–".to_owned();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A cell of a Markdown table: no pipes or line breaks.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn check_row(c: &Check) -> String {
    let mark = match c.met {
        Some(true) => "✅",
        Some(false) => "❌",
        None => "n/a",
    };
    let bound = if c.bound == "max" { "≤" } else { "≥" };
    format!(
        "| {} | {bound} {} | {} | {mark} |",
        label(c.name),
        fmt_num(c.threshold),
        fmt_opt(c.figure)
    )
}

/// The report for a person: a summary, per candidate the side-by-side table,
/// the similarity distribution, the worst disagreements and the verdict, and
/// at the end the change that moves traffic.
pub fn render_markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Readiness report: route `{}`\n", r.route);
    let _ = writeln!(md, "- Primary: {}", r.primary);
    let _ = writeln!(md, "- Generated: {}", r.generated_at);
    match &r.since {
        Some(s) => {
            let _ = writeln!(md, "- Window: the last {s}");
        }
        None => {
            let _ = writeln!(md, "- Window: every stored pair");
        }
    }
    let _ = writeln!(md, "- Pairs: {}", r.pairs);
    let _ = writeln!(md, "- Quantiles: {}\n", r.quantile_method);

    if r.candidates.is_empty() {
        let _ = writeln!(
            md,
            "No shadow pairs are stored for this route{}. Give the route a `shadow:` section \
             (or run `promptgate replay`) and let traffic flow, then report again.\n",
            if r.since.is_some() {
                " in this window"
            } else {
                ""
            }
        );
    } else {
        let _ = writeln!(md, "## Summary\n");
        let _ = writeln!(
            md,
            "| candidate | pairs | compared | error rate | p95 latency ratio | similarity p50 | verdict |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---|");
        for c in &r.candidates {
            let fig = |n: &str| {
                c.verdict
                    .checks
                    .iter()
                    .find(|k| k.name == n)
                    .and_then(|k| k.figure)
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                cell(&c.candidate),
                c.pairs,
                c.compared,
                pct(fig("error_rate")),
                fmt_opt(fig("p95_latency_ratio")),
                fmt_opt(fig("similarity_p50")),
                if c.verdict.ready {
                    "✅ ready"
                } else {
                    "❌ not ready"
                }
            );
        }
        md.push('\n');
    }

    for c in &r.candidates {
        render_candidate(&mut md, c);
    }

    render_moving(&mut md, r);
    md
}

fn render_candidate(md: &mut String, c: &CandidateReport) {
    let (p, k) = (&c.primary_side, &c.candidate_side);
    let _ = writeln!(md, "## Candidate `{}`\n", c.candidate);
    let _ = writeln!(
        md,
        "{} pairs, {} compared (both answered){}.\n",
        c.pairs,
        c.compared,
        match (&c.first_at, &c.last_at) {
            (Some(a), Some(b)) => format!(", from {a} to {b}"),
            _ => String::new(),
        }
    );
    let _ = writeln!(md, "| | primary | candidate |");
    let _ = writeln!(md, "|---|---|---|");
    let row = |md: &mut String, name: &str, a: String, b: String| {
        let _ = writeln!(md, "| {name} | {} | {} |", cell(&a), cell(&b));
    };
    row(md, "target", p.targets.join(", "), k.targets.join(", "));
    row(
        md,
        "requests",
        p.requests.to_string(),
        k.requests.to_string(),
    );
    row(
        md,
        "errors",
        format!("{} ({})", p.errors, pct(Some(p.error_rate))),
        format!("{} ({})", k.errors, pct(Some(k.error_rate))),
    );
    row(
        md,
        "errors by kind",
        counts(&p.errors_by_kind),
        counts(&k.errors_by_kind),
    );
    let lat = |q: &Option<Quantiles>, f: fn(&Quantiles) -> f64| fmt_opt(q.as_ref().map(f));
    row(
        md,
        "latency p50 (ms)",
        lat(&p.latency_ms, |q| q.p50),
        lat(&k.latency_ms, |q| q.p50),
    );
    row(
        md,
        "latency p95 (ms)",
        lat(&p.latency_ms, |q| q.p95),
        lat(&k.latency_ms, |q| q.p95),
    );
    row(
        md,
        "latency p99 (ms)",
        lat(&p.latency_ms, |q| q.p99),
        lat(&k.latency_ms, |q| q.p99),
    );
    let tt = |q: &Option<TtftQuantiles>, f: fn(&TtftQuantiles) -> f64| fmt_opt(q.as_ref().map(f));
    row(
        md,
        "TTFT p50 (ms, streams)",
        tt(&p.ttft_ms, |q| q.p50),
        tt(&k.ttft_ms, |q| q.p50),
    );
    row(
        md,
        "TTFT p95 (ms, streams)",
        tt(&p.ttft_ms, |q| q.p95),
        tt(&k.ttft_ms, |q| q.p95),
    );
    row(
        md,
        "finish reasons",
        counts(&p.finish_reasons),
        counts(&k.finish_reasons),
    );
    let tok = |t: &Tokens| format!("{} (mean {})", t.sum, fmt_num(t.mean));
    row(
        md,
        "input tokens",
        tok(&p.input_tokens),
        tok(&k.input_tokens),
    );
    row(
        md,
        "output tokens",
        tok(&p.output_tokens),
        tok(&k.output_tokens),
    );
    let cost = |c: &Option<Cost>| match c {
        None => "not priced".to_owned(),
        Some(c) => format!(
            "{} ({} per 1k requests)",
            fmt_num4(c.sum),
            fmt_num4(c.per_1k_requests)
        ),
    };
    row(md, "cost", cost(&p.cost), cost(&k.cost));
    row(
        md,
        "refusals",
        c.answers.primary_refusals.to_string(),
        c.answers.candidate_refusals.to_string(),
    );
    row(
        md,
        "empty answers",
        c.answers.primary_empty.to_string(),
        c.answers.candidate_empty.to_string(),
    );
    row(
        md,
        "JSON validity",
        pct(c.json.primary_validity),
        pct(c.json.candidate_validity),
    );
    md.push('\n');

    let s = &c.similarity;
    let _ = writeln!(md, "### Outputs\n");
    let _ = writeln!(md, "| measure | p10 | p25 | p50 | p75 | p90 | mean |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for (name, d) in [
        ("character similarity", &s.char_similarity),
        ("token F1", &s.token_f1),
    ] {
        match d {
            Some(d) => {
                let _ = writeln!(
                    md,
                    "| {name} | {} | {} | {} | {} | {} | {} |",
                    fmt_num(d.p10),
                    fmt_num(d.p25),
                    fmt_num(d.p50),
                    fmt_num(d.p75),
                    fmt_num(d.p90),
                    fmt_num(d.mean)
                );
            }
            None => {
                let _ = writeln!(md, "| {name} | n/a | n/a | n/a | n/a | n/a | n/a |");
            }
        }
    }
    md.push('\n');
    let _ = writeln!(md, "Character similarity, pairs per tenth:\n");
    let _ = writeln!(md, "| range | pairs |");
    let _ = writeln!(md, "|---|---:|");
    for (i, n) in s.char_histogram.iter().enumerate() {
        let hi = if i == 9 { "1.0]" } else { "" };
        let range = if i == 9 {
            format!("[0.9, {hi}")
        } else {
            format!("[{}, {})", fmt_tenth(i), fmt_tenth(i + 1))
        };
        let _ = writeln!(md, "| {range} | {n} |");
    }
    md.push('\n');
    let _ = writeln!(md, "- Exact match: {}", pct(s.exact_match_rate));
    if let Some(e) = s.embedding_p50 {
        let _ = writeln!(md, "- Embedding similarity p50: {}", fmt_num(e));
    }
    let _ = writeln!(
        md,
        "- JSON asked: {} pairs; schema agreement {}",
        c.json.pairs,
        pct(c.json.schema_agreement)
    );
    let _ = writeln!(
        md,
        "- Tool calls: {} pairs; agreement {}",
        c.tools.pairs,
        pct(c.tools.agreement)
    );
    let _ = writeln!(
        md,
        "- Length ratio (candidate / primary) p50: {}\n",
        fmt_opt(c.answers.length_ratio_p50)
    );

    let _ = writeln!(md, "### Worst disagreements\n");
    if !c.outputs_kept {
        let _ = writeln!(
            md,
            "Outputs are not kept for this route (`shadow: {{keep_outputs: true}}` keeps them for review).\n"
        );
    } else if c.worst.is_empty() {
        let _ = writeln!(md, "None: every compared answer matched exactly.\n");
    } else {
        for (i, d) in c.worst.iter().enumerate() {
            let _ = writeln!(
                md,
                "{}. **{}** — request `{}` at {}{}",
                i + 1,
                d.why.replace('_', " "),
                d.request_id,
                d.at,
                d.char_similarity
                    .map(|s| format!(", character similarity {}", fmt_num(s)))
                    .unwrap_or_default()
            );
            if let Some(e) = &d.primary_error {
                let _ = writeln!(md, "   - primary failed: `{e}`");
            }
            if let Some(e) = &d.candidate_error {
                let _ = writeln!(md, "   - candidate failed: `{e}`");
            }
            if let Some(q) = &d.request {
                let _ = writeln!(md, "   - request: {}", quote(q));
            }
            let _ = writeln!(md, "   - primary: {}", quote(&d.primary_output));
            let _ = writeln!(md, "   - candidate: {}", quote(&d.candidate_output));
        }
        md.push('\n');
    }

    let _ = writeln!(md, "### Verdict: {}\n", c.verdict.summary);
    let _ = writeln!(md, "| threshold | required | figure | met |");
    let _ = writeln!(md, "|---|---|---:|---|");
    for k in &c.verdict.checks {
        let _ = writeln!(md, "{}", check_row(k));
    }
    md.push('\n');
}

fn fmt_tenth(i: usize) -> String {
    format!("{:.1}", i as f64 / 10.0)
}

fn fmt_num4(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "n/a".to_owned()
    }
}

/// Inline text, on one line, in backticks that cannot be closed early.
fn quote(s: &str) -> String {
    if s.is_empty() {
        return "(empty)".to_owned();
    }
    let one = s.replace(['\n', '\r'], " ⏎ ");
    format!("`` {} ``", one.replace('`', "'"))
}

fn target_line(t: &Target) -> String {
    format!(
        "{{provider: {}, model: {}}}",
        yaml_scalar(&t.provider),
        yaml_scalar(&t.model)
    )
}

/// A plain YAML scalar when that reads back as the same string, else quoted.
fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n"
        );
    if plain {
        s.to_owned()
    } else {
        serde_json::to_string(s).unwrap_or_default()
    }
}

fn split_target(candidate: &str) -> Target {
    let (provider, model) = candidate.split_once('/').unwrap_or((candidate, ""));
    Target {
        provider: provider.to_owned(),
        model: model.to_owned(),
    }
}

/// What to fix first, for a candidate that is not ready.
fn fixes(c: &CandidateReport) -> Vec<String> {
    let mut out = Vec::new();
    for k in &c.verdict.checks {
        if k.met != Some(false) {
            continue;
        }
        let fig = fmt_opt(k.figure);
        let th = fmt_num(k.threshold);
        out.push(match k.name {
            "compared_pairs" => format!(
                "Collect more evidence: {fig} of {th} compared pairs. Raise the route's `shadow.sample`, wait for more traffic, or replay recorded requests with `promptgate replay`."
            ),
            "error_rate" => format!(
                "Candidate errors: {} of requests failed (at most {} allowed); by kind: {}. Fix the candidate's deployment, timeouts or limits first.",
                pct(k.figure),
                pct(Some(k.threshold)),
                counts(&c.candidate_side.errors_by_kind)
            ),
            "tool_agreement" => format!(
                "Tool calls agree in {} of pairs (at least {} required): check the candidate's tool-calling support and the worst disagreements above.",
                pct(k.figure),
                pct(Some(k.threshold))
            ),
            "json_validity" => format!(
                "Valid JSON in {} of the candidate's JSON answers (at least {} required): try `response_format` with a schema or a prompt version for the candidate (`shadow.prompt`).",
                pct(k.figure),
                pct(Some(k.threshold))
            ),
            "p95_latency_ratio" => format!(
                "The candidate's p95 latency is {fig}× the primary's (at most {th}× allowed): give it more capacity or a faster deployment."
            ),
            "similarity_p50" => format!(
                "The median similarity is {fig} (at least {th} required): read the worst disagreements; a prompt version tuned for the candidate (`shadow.prompt`) may close the gap."
            ),
            _ => continue,
        });
    }
    out
}

/// The closing section: for a ready candidate, the two configuration steps
/// (a small split, then the switch with the old primary as fallback); for
/// one that is not, what to fix first.
fn render_moving(md: &mut String, r: &Report) {
    let _ = writeln!(md, "## Moving traffic\n");
    if r.candidates.is_empty() {
        let _ = writeln!(
            md,
            "Nothing to move yet: there are no pairs to judge a candidate by.\n"
        );
    }
    for c in &r.candidates {
        let cand = split_target(&c.candidate);
        if !c.verdict.ready {
            let _ = writeln!(md, "### `{}` is not ready: fix first\n", c.candidate);
            for (i, f) in fixes(c).iter().enumerate() {
                let _ = writeln!(md, "{}. {f}", i + 1);
            }
            let _ = writeln!(md, "\nThen report again.\n");
            continue;
        }
        let _ = writeln!(md, "### `{}` is ready\n", c.candidate);
        let _ = writeln!(
            md,
            "Step 1, a canary: send a small share of the route's traffic to the candidate \
             (keep the route's other keys: retry, readiness, shadow…; drop the candidate from \
             `shadow.targets`). Watch `GET /admin/experiments` for the two arms.\n"
        );
        let _ = writeln!(
            md,
            "```yaml\nroutes:\n  {}:\n    split:",
            yaml_scalar(&r.route)
        );
        let primary_chain: Vec<Target> = match &r.layout {
            Layout::Chain { targets } => {
                let _ = writeln!(md, "      subject: user\n      arms:");
                let _ = writeln!(
                    md,
                    "        - name: primary\n          weight: 95\n          targets:"
                );
                for t in targets {
                    let _ = writeln!(md, "            - {}", target_line(t));
                }
                targets.clone()
            }
            Layout::Split { subject, arms } => {
                let _ = writeln!(md, "      subject: {}\n      arms:", yaml_scalar(subject));
                let total: f64 = arms.iter().map(|a| a.weight).sum();
                for a in arms {
                    let w = if total > 0.0 {
                        a.weight / total * 95.0
                    } else {
                        0.0
                    };
                    let _ = writeln!(
                        md,
                        "        - name: {}\n          weight: {}\n          targets:",
                        yaml_scalar(&a.name),
                        fmt_num(w)
                    );
                    for t in &a.targets {
                        let _ = writeln!(md, "            - {}", target_line(t));
                    }
                }
                arms.first().map(|a| a.targets.clone()).unwrap_or_default()
            }
        };
        let _ = writeln!(
            md,
            "        - name: candidate\n          weight: 5\n          targets:\n            - {}",
            target_line(&cand)
        );
        let _ = writeln!(md, "```\n");
        let _ = writeln!(
            md,
            "Step 2, the switch, once the canary holds: the candidate becomes the route's \
             target and the old primary its fallback.\n"
        );
        let _ = writeln!(
            md,
            "```yaml\nroutes:\n  {}:\n    targets:\n      - {}",
            yaml_scalar(&r.route),
            target_line(&cand)
        );
        for t in primary_chain.iter().filter(|t| **t != cand) {
            let _ = writeln!(md, "      - {}", target_line(t));
        }
        let _ = writeln!(md, "```\n");
    }
    let _ = writeln!(
        md,
        "Rehearse the outage side of the switch too: `promptgate drill --gateway URL --route {} --provider PROVIDER --fault down` \
         injects a provider fault on a running gateway and reports how the route's fallback held.",
        r.route
    );
}

/// `promptgate readiness`'s arguments.
pub struct CliArgs {
    pub config: std::path::PathBuf,
    pub route: String,
    /// Only this candidate, `provider/model`.
    pub candidate: Option<String>,
    pub since: Option<Duration>,
    /// The store, instead of the config's `shadow.store`.
    pub store: Option<std::path::PathBuf>,
    /// Writes `PREFIX.md` and `PREFIX.json`.
    pub out: std::path::PathBuf,
}

/// `promptgate readiness`: reads the config and the store, writes the two
/// files and returns the summary to print (an error says what went wrong).
pub fn cli(args: &CliArgs) -> Result<String, String> {
    let cfg = crate::config::load(&args.config).map_err(|problems| {
        problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let Some(route) = cfg.routes.get(&args.route) else {
        return Err(format!(
            "unknown route `{}`; the routes are: {}",
            args.route,
            cfg.routes.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    };
    let store = args
        .store
        .clone()
        .unwrap_or_else(|| cfg.shadow.path.clone());
    let now_ms = super::now_ms();
    let since_ms = args
        .since
        .map(|d| now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    let pairs = super::store::read(&store, &route.name, args.candidate.as_deref(), since_ms)
        .map_err(|e| super::store::describe_error(&store, &e))?;
    let report = build(
        &RouteView::of(route),
        &pairs,
        &route.readiness,
        now_ms,
        args.since,
    );

    let written = write(&report, &args.out)?;
    let mut out = summary(&report);
    if report.candidates.is_empty() {
        let _ = write!(out, "  no shadow pairs");
        if let Some(c) = &args.candidate {
            let known = super::store::candidates(&store, &route.name);
            let _ = write!(
                out,
                " for candidate `{c}` (stored candidates: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            );
        }
        out.push('\n');
    }
    for c in &report.candidates {
        let _ = writeln!(out, "  {}: {}", c.candidate, c.verdict.summary);
    }
    out.push_str(&written);
    Ok(out)
}

/// The report's first line: route, pairs, window.
fn summary(report: &Report) -> String {
    format!(
        "readiness of route `{}`: {} pairs{}\n",
        report.route,
        report.pairs,
        report
            .since
            .as_deref()
            .map(|s| format!(" in the last {s}"))
            .unwrap_or_default()
    )
}

/// Writes `PREFIX.md` and `PREFIX.json` (their folder created); the line
/// that says so.
pub fn write(report: &Report, prefix: &std::path::Path) -> Result<String, String> {
    let path = |ext: &str| {
        let mut p = prefix.to_path_buf().into_os_string();
        p.push(ext);
        std::path::PathBuf::from(p)
    };
    let (md_path, json_path) = (path(".md"), path(".json"));
    if let Some(dir) = md_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| format!("cannot serialise the report: {e}"))?;
    std::fs::write(&md_path, render_markdown(report))
        .map_err(|e| format!("cannot write {}: {e}", md_path.display()))?;
    std::fs::write(&json_path, json + "\n")
        .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;
    Ok(format!(
        "wrote {} and {}\n",
        md_path.display(),
        json_path.display()
    ))
}

/// The replay's report (`promptgate replay`): the pairs of this run only, the
/// route's thresholds; written like `readiness`'s, its summary returned.
pub fn replay(
    route: &RouteConfig,
    pairs: &[Pair],
    prefix: &std::path::Path,
    now_ms: i64,
) -> Result<String, String> {
    let report = build(&RouteView::of(route), pairs, &route.readiness, now_ms, None);
    let written = write(&report, prefix)?;
    let mut out = summary(&report);
    for c in &report.candidates {
        let _ = writeln!(out, "  {}: {}", c.candidate, c.verdict.summary);
    }
    out.push_str(&written);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::float_cmp)]
mod tests {
    use super::*;
    use crate::shadow::{Comparison, JsonCheck, Side, ToolCallOut};

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(5.0));
        assert_eq!(quantile(&v, 0.95), Some(10.0));
        assert_eq!(quantile(&v, 0.1), Some(1.0));
        assert_eq!(quantile(&v, 0.25), Some(3.0));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[7.0], 0.99), Some(7.0));
    }

    fn route() -> RouteView {
        RouteView {
            name: "support".into(),
            layout: Layout::Chain {
                targets: vec![
                    Target {
                        provider: "openai".into(),
                        model: "gpt-4o-mini".into(),
                    },
                    Target {
                        provider: "deepseek".into(),
                        model: "deepseek-chat".into(),
                    },
                ],
            },
        }
    }

    /// Ten pairs for `llamacpp/local`: pair i (1..=10) has character
    /// similarity i/10, token F1 i/20, primary latency 100·i ms, candidate
    /// 150·i ms; pair 3 the candidate failed (timeout); pair 5 asked for a
    /// tool and the candidate called another; pairs 7 and 8 asked for JSON,
    /// pair 8's candidate answer is invalid; pair 10 matches exactly.
    fn pairs() -> Vec<Pair> {
        (1..=10)
            .map(|i| {
                let f = f64::from(i);
                let failed = i == 3;
                let mut primary = Side {
                    target: "openai/gpt-4o-mini".into(),
                    latency_ms: 100.0 * f,
                    ttft_ms: Some(10.0 * f),
                    finish: Some("stop".into()),
                    input_tokens: 10,
                    output_tokens: i,
                    cost: Some(0.001),
                    text: format!("primary answer {i}"),
                    ..Side::default()
                };
                let mut candidate = Side {
                    target: "llamacpp/local".into(),
                    latency_ms: 150.0 * f,
                    ttft_ms: Some(20.0 * f),
                    finish: (!failed).then(|| "stop".into()),
                    error: failed.then(|| "timeout".into()),
                    input_tokens: 10,
                    output_tokens: 2 * i,
                    text: if failed {
                        String::new()
                    } else {
                        format!("candidate answer {i}")
                    },
                    ..Side::default()
                };
                if i == 5 {
                    primary.tool_calls = vec![ToolCallOut {
                        name: "lookup".into(),
                        arguments: "{\"id\":1}".into(),
                    }];
                    candidate.tool_calls = vec![ToolCallOut {
                        name: "search".into(),
                        arguments: "{}".into(),
                    }];
                    primary.finish = Some("tool_calls".into());
                    candidate.finish = Some("tool_calls".into());
                }
                Pair {
                    at_ms: 1_700_000_000_000 + i64::from(i) * 1000,
                    request_id: format!("req-{i}"),
                    route: "support".into(),
                    arm: None,
                    source: "live".into(),
                    stream: i % 2 == 0,
                    primary,
                    candidate,
                    comparison: (!failed).then(|| Comparison {
                        exact: i == 10,
                        token_f1: f / 20.0,
                        char_similarity: f / 10.0,
                        json: (i == 7 || i == 8).then_some(JsonCheck {
                            primary_valid: true,
                            candidate_valid: i == 7,
                            schema_agree: i == 7,
                        }),
                        tool_agreement: (i == 5).then_some(false),
                        candidate_empty: false,
                        length_ratio: Some(2.0),
                        ..Comparison::default()
                    }),
                    request: Some(format!(
                        "{{\"messages\":[{{\"role\":\"system\",\"content\":\"be brief\"}},{{\"role\":\"user\",\"content\":\"question {i}\"}}]}}"
                    )),
                }
            })
            .collect()
    }

    fn thresholds() -> Readiness {
        Readiness {
            max_error_rate: 0.2,
            max_p95_latency_ratio: 2.0,
            min_tool_agreement: 0.0,
            min_json_validity: 0.5,
            min_similarity_p50: 0.5,
            min_pairs: 9,
        }
    }

    #[test]
    fn figures_from_hand_built_pairs_are_exact() {
        let r = build(&route(), &pairs(), &thresholds(), 1_700_000_100_000, None);
        assert_eq!(r.pairs, 10);
        assert_eq!(r.primary, "openai/gpt-4o-mini → deepseek/deepseek-chat");
        assert_eq!(r.candidates.len(), 1);
        let c = &r.candidates[0];
        assert_eq!(c.candidate, "llamacpp/local");
        assert_eq!((c.pairs, c.compared), (10, 9));

        let k = &c.candidate_side;
        assert_eq!((k.requests, k.errors, k.error_rate), (10, 1, 0.1));
        assert_eq!(k.errors_by_kind.get("timeout"), Some(&1));
        assert_eq!(c.primary_side.errors, 0);
        // Latency over the nine pairs where both answered (i ≠ 3):
        // primary 100,200,400,…,1000; nearest rank 5 of 9 is 600.
        assert_eq!(
            c.primary_side.latency_ms,
            Some(Quantiles {
                p50: 500.0 + 100.0,
                p95: 1000.0,
                p99: 1000.0
            })
        );
        assert_eq!(k.latency_ms.as_ref().unwrap().p95, 1500.0);
        // TTFT over the streamed ones (even i): 20,40,60,80,100 primary.
        assert_eq!(
            c.primary_side.ttft_ms,
            Some(TtftQuantiles {
                p50: 60.0,
                p95: 100.0
            })
        );
        assert_eq!(c.primary_side.finish_reasons.get("stop"), Some(&9));
        assert_eq!(c.primary_side.finish_reasons.get("tool_calls"), Some(&1));
        assert_eq!(k.finish_reasons.get("stop"), Some(&8));
        assert_eq!(k.output_tokens.sum, 110);
        assert_eq!(k.output_tokens.mean, 11.0);
        assert_eq!(c.primary_side.input_tokens.sum, 100);
        let cost = c.primary_side.cost.as_ref().unwrap();
        assert_eq!(cost.priced_requests, 10);
        assert!((cost.sum - 0.01).abs() < 1e-12);
        assert!((cost.per_1k_requests - 1.0).abs() < 1e-9);
        assert_eq!(k.cost, None);

        // Similarities 0.1,0.2,0.4,…,1.0 (0.3 failed).
        let s = c.similarity.char_similarity.as_ref().unwrap();
        assert_eq!(
            (s.p10, s.p25, s.p50, s.p75, s.p90),
            (0.1, 0.4, 0.6, 0.8, 1.0)
        );
        assert!((s.mean - 5.2 / 9.0).abs() < 1e-12);
        assert_eq!(c.similarity.token_f1.as_ref().unwrap().p50, 0.3);
        assert_eq!(c.similarity.char_histogram, [0, 1, 1, 0, 1, 1, 1, 1, 1, 2]);
        assert_eq!(c.similarity.exact_match_rate, Some(1.0 / 9.0));
        assert_eq!(c.similarity.embedding_p50, None);
        assert_eq!(c.json.pairs, 2);
        assert_eq!(c.json.primary_validity, Some(1.0));
        assert_eq!(c.json.candidate_validity, Some(0.5));
        assert_eq!(c.json.schema_agreement, Some(0.5));
        assert_eq!((c.tools.pairs, c.tools.agreement), (1, Some(0.0)));
        assert_eq!(c.answers.length_ratio_p50, Some(2.0));

        // Worst: the failure, the tool disagreement, the invalid JSON, then
        // lowest similarity; the exact match never.
        let ids: Vec<(&str, &str)> = c
            .worst
            .iter()
            .map(|d| (d.why, d.request_id.as_str()))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("failure", "req-3"),
                ("tool_disagreement", "req-5"),
                ("invalid_json", "req-8"),
                ("low_similarity", "req-1"),
                ("low_similarity", "req-2"),
                ("low_similarity", "req-4"),
                ("low_similarity", "req-6"),
                ("low_similarity", "req-7"),
                ("low_similarity", "req-9"),
            ]
        );
        assert_eq!(c.worst[0].candidate_error.as_deref(), Some("timeout"));
        assert_eq!(c.worst[0].request.as_deref(), Some("question 3"));
        assert_eq!(
            c.worst[1].candidate_output,
            "candidate answer 5\n[tool] search({})"
        );

        // The verdict: p95 ratio 1500/1000 = 1.5 ≤ 2; error rate 0.1 ≤ 0.2;
        // tool agreement 0 ≥ 0; JSON 0.5 ≥ 0.5; similarity p50 0.6 ≥ 0.5.
        let v = &c.verdict;
        let fig = |n: &str| v.checks.iter().find(|k| k.name == n).unwrap().clone();
        assert_eq!(fig("compared_pairs").figure, Some(9.0));
        assert_eq!(fig("error_rate").figure, Some(0.1));
        assert_eq!(fig("p95_latency_ratio").figure, Some(1.5));
        assert_eq!(fig("tool_agreement").figure, Some(0.0));
        assert_eq!(fig("json_validity").figure, Some(0.5));
        assert_eq!(fig("similarity_p50").figure, Some(0.6));
        assert!(v.checks.iter().all(|k| k.met == Some(true)), "{v:?}");
        assert!(v.ready);
        assert_eq!(
            v.summary,
            "ready: every applicable threshold met over 9 compared pairs"
        );
    }

    #[test]
    fn a_failed_threshold_and_too_few_pairs_are_said() {
        let strict = Readiness {
            max_error_rate: 0.05,
            min_tool_agreement: 0.9,
            ..thresholds()
        };
        let r = build(&route(), &pairs(), &strict, 0, None);
        let v = &r.candidates[0].verdict;
        assert!(!v.ready);
        assert_eq!(
            v.summary,
            "not ready: error rate 0.1 > 0.05; tool agreement 0 < 0.9"
        );
        let md = render_markdown(&r);
        assert!(md.contains("| error rate | ≤ 0.05 | 0.1 | ❌ |"), "{md}");
        assert!(md.contains("| similarity p50 | ≥ 0.5 | 0.6 | ✅ |"), "{md}");
        assert!(
            md.contains("`llamacpp/local` is not ready: fix first"),
            "{md}"
        );
        assert!(
            md.contains("Candidate errors: 10% of requests failed"),
            "{md}"
        );
        assert!(!md.contains("weight: 95"), "{md}");

        let few = Readiness {
            min_pairs: 20,
            ..thresholds()
        };
        let r = build(&route(), &pairs(), &few, 0, None);
        let v = &r.candidates[0].verdict;
        assert!(!v.ready);
        assert_eq!(v.summary, "not enough evidence (9 of 20 compared pairs)");
        assert!(render_markdown(&r).contains("Collect more evidence: 9 of 20 compared pairs"));
    }

    #[test]
    fn checks_without_anything_to_judge_are_not_applicable() {
        let plain: Vec<Pair> = pairs()
            .into_iter()
            .map(|mut p| {
                if let Some(c) = p.comparison.as_mut() {
                    c.json = None;
                    c.tool_agreement = None;
                }
                p
            })
            .collect();
        let r = build(&route(), &plain, &thresholds(), 0, None);
        let v = &r.candidates[0].verdict;
        let met = |n: &str| v.checks.iter().find(|k| k.name == n).unwrap().met;
        assert_eq!(met("tool_agreement"), None);
        assert_eq!(met("json_validity"), None);
        assert!(v.ready);
        let md = render_markdown(&r);
        assert!(md.contains("| tool agreement | ≥ 0 | n/a | n/a |"), "{md}");
    }

    #[test]
    fn a_ready_candidate_gets_the_split_then_the_switch() {
        let r = build(
            &route(),
            &pairs(),
            &thresholds(),
            0,
            Some(Duration::from_secs(86_400)),
        );
        assert_eq!(r.since.as_deref(), Some("1day"));
        let md = render_markdown(&r);
        let moving = &md[md.find("## Moving traffic").unwrap()..];
        let split =
            "```yaml\nroutes:\n  support:\n    split:\n      subject: user\n      arms:\n        \
- name: primary\n          weight: 95\n          targets:\n            \
- {provider: openai, model: gpt-4o-mini}\n            \
- {provider: deepseek, model: deepseek-chat}\n        \
- name: candidate\n          weight: 5\n          targets:\n            \
- {provider: llamacpp, model: local}\n```";
        assert!(moving.contains(split), "{moving}");
        let switch = "```yaml\nroutes:\n  support:\n    targets:\n      \
- {provider: llamacpp, model: local}\n      \
- {provider: openai, model: gpt-4o-mini}\n      \
- {provider: deepseek, model: deepseek-chat}\n```";
        assert!(moving.contains(switch), "{moving}");
        assert!(moving.contains("promptgate drill --gateway URL --route support"));
        // The JSON form carries the same figures.
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["candidates"][0]["verdict"]["ready"], true);
        assert_eq!(json["candidates"][0]["candidate_side"]["error_rate"], 0.1);
        assert_eq!(json["quantile_method"], QUANTILE_METHOD);
    }

    #[test]
    fn a_split_route_keeps_its_arms_in_the_canary() {
        let t = |p: &str, m: &str| Target {
            provider: p.into(),
            model: m.into(),
        };
        let split = RouteView {
            name: "support".into(),
            layout: Layout::Split {
                subject: "header:x-team".into(),
                arms: vec![
                    Arm {
                        name: "control".into(),
                        weight: 90.0,
                        targets: vec![t("openai", "gpt-4o-mini")],
                    },
                    Arm {
                        name: "canary".into(),
                        weight: 10.0,
                        targets: vec![t("deepseek", "deepseek-chat")],
                    },
                ],
            },
        };
        assert_eq!(
            split.describe(),
            "control (90): openai/gpt-4o-mini; canary (10): deepseek/deepseek-chat"
        );
        let md = render_markdown(&build(&split, &pairs(), &thresholds(), 0, None));
        let canary = "    split:\n      subject: \"header:x-team\"\n      arms:\n        \
- name: control\n          weight: 85.5\n          targets:\n            \
- {provider: openai, model: gpt-4o-mini}\n        \
- name: canary\n          weight: 9.5\n          targets:\n            \
- {provider: deepseek, model: deepseek-chat}\n        \
- name: candidate\n          weight: 5\n";
        assert!(md.contains(canary), "{md}");
        // The switch keeps the first arm's chain as the fallback.
        assert!(md.contains(
            "    targets:\n      - {provider: llamacpp, model: local}\n      \
- {provider: openai, model: gpt-4o-mini}\n```"
        ));
    }

    #[test]
    fn no_pairs_is_a_report_that_says_so() {
        let r = build(&route(), &[], &Readiness::default(), 0, None);
        assert!(r.candidates.is_empty());
        let md = render_markdown(&r);
        assert!(
            md.contains("No shadow pairs are stored for this route"),
            "{md}"
        );
        assert!(md.contains("## Moving traffic"));
    }
}
