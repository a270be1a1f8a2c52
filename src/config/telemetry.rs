//! `log_format` and `tracing`: how the process reports itself. Both are read at
//! start only (a reload keeps what the process started with).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{valid_env_name, Problems};

/// `tracing: {otlp_endpoint, service_name, sample_ratio, headers, headers_env,
/// timeout, flush_interval, max_queue}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTracing {
    otlp_endpoint: String,
    #[serde(default)]
    service_name: Option<String>,
    #[serde(default)]
    sample_ratio: Option<f64>,
    /// Header values as written.
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Header values read from environment variables (name → variable).
    #[serde(default)]
    headers_env: BTreeMap<String, String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    flush_interval: Option<String>,
    #[serde(default)]
    max_queue: Option<usize>,
}

/// Where a header's value comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum HeaderSource {
    Value(String),
    /// The environment variable, read when tracing starts.
    Env(String),
}

/// Never prints a value: header values are credentials.
impl std::fmt::Debug for HeaderSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderSource::Value(_) => f.write_str("Value(..)"),
            HeaderSource::Env(v) => write!(f, "Env({v})"),
        }
    }
}

/// OpenTelemetry traces over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// The collector's traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub endpoint: String,
    pub service_name: String,
    /// Share of new traces kept (0..=1); a continued trace follows its parent.
    pub sample_ratio: f64,
    pub headers: Vec<(String, HeaderSource)>,
    /// One export's time limit.
    pub timeout: Duration,
    /// How often finished spans are sent.
    pub flush_interval: Duration,
    /// Spans waiting to be sent at most; beyond it they are dropped.
    pub max_queue: usize,
}

/// The log lines' format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

pub(super) fn log_format(file: &Path, raw: Option<&str>, problems: &mut Problems) -> LogFormat {
    match raw {
        None => LogFormat::Text,
        Some(s) => LogFormat::parse(s).unwrap_or_else(|| {
            problems.add(file, "log_format", format!("`{s}` is not `text` or `json`"));
            LogFormat::Text
        }),
    }
}

pub(super) fn tracing(file: &Path, raw: RawTracing, problems: &mut Problems) -> TracingConfig {
    let endpoint = raw.otlp_endpoint.trim().to_owned();
    match endpoint.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {}
        _ => problems.add(
            file,
            "tracing.otlp_endpoint",
            "must be an http:// or https:// URL, e.g. http://127.0.0.1:4318/v1/traces",
        ),
    }
    let service_name = raw.service_name.unwrap_or_else(|| "promptgate".into());
    if service_name.trim().is_empty() {
        problems.add(file, "tracing.service_name", "must not be empty");
    }
    let sample_ratio = raw.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        problems.add(file, "tracing.sample_ratio", "must be between 0 and 1");
    }
    let mut headers = Vec::new();
    for (name, value) in raw.headers {
        let field = format!("tracing.headers.{name}");
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            problems.add(file, &field, "not a valid header name");
        } else if http::HeaderValue::from_str(&value).is_err() {
            // The value is not repeated: it may be a credential.
            problems.add(file, &field, "not a valid header value");
        } else {
            headers.push((name, HeaderSource::Value(value)));
        }
    }
    for (name, var) in raw.headers_env {
        let field = format!("tracing.headers_env.{name}");
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            problems.add(file, &field, "not a valid header name");
        } else if !valid_env_name(&var) {
            problems.add(file, &field, "must be an environment variable's name");
        } else if headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name)) {
            problems.add(file, &field, "also set in `tracing.headers`");
        } else {
            headers.push((name, HeaderSource::Env(var)));
        }
    }
    let timeout = problems.duration(
        file,
        "tracing.timeout",
        &raw.timeout,
        Duration::from_secs(5),
    );
    let flush_interval = problems.duration(
        file,
        "tracing.flush_interval",
        &raw.flush_interval,
        Duration::from_secs(5),
    );
    for (field, d) in [
        ("tracing.timeout", timeout),
        ("tracing.flush_interval", flush_interval),
    ] {
        if d.is_zero() {
            problems.add(file, field, "must be more than zero");
        }
    }
    let max_queue = raw.max_queue.unwrap_or(2048);
    if !(1..=1_000_000).contains(&max_queue) {
        problems.add(file, "tracing.max_queue", "must be between 1 and 1000000");
    }
    TracingConfig {
        endpoint,
        service_name,
        sample_ratio,
        headers,
        timeout,
        flush_interval,
        max_queue,
    }
}

/// Only the gateway file's `log_format`, read before logging starts (the
/// whole configuration is read, and `log_format` validated, after).
#[derive(Deserialize, Default)]
struct LogOnly {
    #[serde(default)]
    log_format: Option<String>,
}

/// The gateway file's `log_format`, if the file reads and names a known one.
pub fn peek_log_format(gateway_file: &Path) -> Option<LogFormat> {
    let text = std::fs::read_to_string(gateway_file).ok()?;
    let raw: LogOnly = serde_yaml::from_str(&text).ok()?;
    LogFormat::parse(raw.log_format.as_deref()?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn problems_of(yaml: &str) -> (TracingConfig, Vec<String>) {
        let raw: RawTracing = serde_yaml::from_str(yaml).unwrap();
        let mut p = Problems { list: Vec::new() };
        let cfg = tracing(Path::new("promptgate.yaml"), raw, &mut p);
        let list = p.list.iter().map(|p| p.to_string()).collect();
        (cfg, list)
    }

    #[test]
    fn tracing_defaults_and_validation() {
        let (cfg, p) = problems_of("otlp_endpoint: http://127.0.0.1:4318/v1/traces\n");
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(cfg.service_name, "promptgate");
        assert_eq!(cfg.sample_ratio, 1.0);
        assert_eq!(cfg.timeout, Duration::from_secs(5));
        assert_eq!(cfg.flush_interval, Duration::from_secs(5));
        assert_eq!(cfg.max_queue, 2048);
        let (_, p) = problems_of(
            "otlp_endpoint: localhost:4318\nsample_ratio: 1.5\ntimeout: soon\nflush_interval: 0s\nmax_queue: 0\nservice_name: ' '\n",
        );
        for field in [
            "tracing.otlp_endpoint",
            "tracing.sample_ratio",
            "tracing.timeout",
            "tracing.flush_interval",
            "tracing.max_queue",
            "tracing.service_name",
        ] {
            assert!(p.iter().any(|l| l.contains(field)), "{field}: {p:?}");
        }
    }

    #[test]
    fn header_values_are_never_repeated_in_problems_or_debug_output() {
        let (_, p) = problems_of(
            "otlp_endpoint: https://collector/v1/traces\nheaders: {authorization: \"Bearer s3cr3t\\n\"}\nheaders_env: {x-token: not a variable, 'bad name': TOKEN}\n",
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p.iter().all(|l| !l.contains("s3cr3t")), "{p:?}");
        let (cfg, p) = problems_of(
            "otlp_endpoint: https://collector/v1/traces\nheaders: {authorization: Bearer s3cr3t}\nheaders_env: {x-token: OTLP_TOKEN}\n",
        );
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(
            cfg.headers,
            vec![
                (
                    "authorization".into(),
                    HeaderSource::Value("Bearer s3cr3t".into())
                ),
                ("x-token".into(), HeaderSource::Env("OTLP_TOKEN".into())),
            ]
        );
        assert!(!format!("{cfg:?}").contains("s3cr3t"));
    }

    #[test]
    fn log_format_is_text_or_json() {
        let mut p = Problems { list: Vec::new() };
        let file = Path::new("promptgate.yaml");
        assert_eq!(log_format(file, None, &mut p), LogFormat::Text);
        assert_eq!(log_format(file, Some("json"), &mut p), LogFormat::Json);
        assert!(p.list.is_empty());
        assert_eq!(log_format(file, Some("xml"), &mut p), LogFormat::Text);
        assert_eq!(p.list.len(), 1);
        assert_eq!(p.list[0].field, "log_format");
    }
}
