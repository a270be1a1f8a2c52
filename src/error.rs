//! The error model. Backend failures are classified once, into [`ErrorKind`], where
//! the codec or transport first sees them; routing (retry, fallback) decides on the
//! kind, metrics label by it, and the ingress turns a [`GatewayError`] into the
//! client dialect's error JSON exactly once, at the edge.

use std::time::Duration;

/// What went wrong with a backend call. Low cardinality: used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The backend could not be reached (refused, DNS, TLS, reset before a reply).
    Connect,
    /// The backend did not answer in time (headers, first token, idle gap or total).
    Timeout,
    /// 429, or a vendor code meaning the same.
    RateLimited,
    /// 5xx, 529, "loading", "overloaded".
    Overloaded,
    /// The gateway's credentials for the backend were refused (401/403).
    Auth,
    /// The backend rejected the request as invalid (400/404/422).
    BadRequest,
    /// The prompt does not fit the model's context window.
    ContextLength,
    /// The backend's safety filter blocked the prompt or the answer.
    ContentFilter,
    /// The backend answered with something that is not its documented format, or
    /// cut a stream short.
    MalformedResponse,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Auth => "auth",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::ContextLength => "context_length",
            ErrorKind::ContentFilter => "content_filter",
            ErrorKind::MalformedResponse => "malformed_response",
        }
    }

    /// Whether another attempt (same or next target) may succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Connect
                | ErrorKind::Timeout
                | ErrorKind::RateLimited
                | ErrorKind::Overloaded
                | ErrorKind::MalformedResponse
        )
    }

    /// The HTTP status the gateway answers with for this kind.
    pub fn client_status(self, upstream_status: Option<u16>) -> u16 {
        match self {
            ErrorKind::Connect | ErrorKind::MalformedResponse | ErrorKind::Auth => 502,
            ErrorKind::Timeout => 504,
            ErrorKind::RateLimited => 429,
            ErrorKind::Overloaded => 503,
            ErrorKind::ContextLength | ErrorKind::ContentFilter => 400,
            ErrorKind::BadRequest => upstream_status
                .filter(|s| matches!(s, 400 | 404 | 409 | 413 | 415 | 422))
                .unwrap_or(400),
        }
    }

    /// Classification of a bare HTTP status, before any vendor-specific refinement.
    pub fn from_status(status: u16) -> ErrorKind {
        match status {
            401 | 403 => ErrorKind::Auth,
            408 | 504 => ErrorKind::Timeout,
            429 => ErrorKind::RateLimited,
            413 => ErrorKind::ContextLength,
            400..=499 => ErrorKind::BadRequest,
            _ => ErrorKind::Overloaded,
        }
    }
}

/// A classified backend failure. The message is safe to show to a client: it never
/// contains the provider's credentials (see [`UpstreamError::redact`]).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{provider}: {kind:?}: {message}")]
pub struct UpstreamError {
    pub kind: ErrorKind,
    /// The backend's HTTP status, when it answered at all.
    pub status: Option<u16>,
    pub message: String,
    /// Provider id (filled in by the transport).
    pub provider: String,
    /// At most [`MAX_RETRY_AFTER`] wherever a backend's number is read.
    pub retry_after: Option<Duration>,
    /// The backend refused the gateway's short-lived credential itself (an
    /// expired or invalid access token): a fresh one fixes it, so the call may be
    /// made once more. Set by the codec that recognises it.
    pub credential_refused: bool,
    /// When this is the last failure of a route's attempt loop: every attempt
    /// the route made, in order, this one included. Empty otherwise (no
    /// allocation).
    pub attempts: Vec<Attempt>,
}

/// One backend call a route made for a request that ended in an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The target's id (`provider/model`).
    pub target: crate::ids::TargetId,
    pub kind: ErrorKind,
    /// The backend's HTTP status, when it answered at all.
    pub status: Option<u16>,
    pub elapsed_ms: u64,
}

/// What joins the last failure's message to the list of the earlier ones.
pub const EARLIER_ATTEMPTS: &str = " (after earlier attempts: ";

/// The longest `Retry-After` the gateway honours or repeats (one hour); larger
/// values, up to any number a backend writes, are clamped to it where they are
/// read (the transport's header and error bodies, Gemini's `retryDelay`).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

impl UpstreamError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        UpstreamError {
            kind,
            status: None,
            message: message.into(),
            provider: String::new(),
            retry_after: None,
            credential_refused: false,
            attempts: Vec::new(),
        }
    }

    /// A failure a backend reported (in an error answer, or inside a 200 when
    /// `status` is 200): an empty message becomes "backend answered HTTP N", a long
    /// one is cut to 1,000 bytes (backends sometimes echo the prompt), and the
    /// status is kept unless the answer claimed success.
    pub fn from_backend(kind: ErrorKind, message: impl Into<String>, status: u16) -> Self {
        let mut text: String = message.into();
        if text.trim().is_empty() {
            text = format!("backend answered HTTP {status}");
        }
        if text.len() > 1000 {
            let mut cut = 1000;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let e = UpstreamError::new(kind, text);
        if status == 200 {
            e
        } else {
            e.with_status(status)
        }
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Removes every occurrence of `secret` from the message.
    pub fn redact(mut self, secret: Option<&str>) -> Self {
        if let Some(s) = secret.filter(|s| s.len() >= 4) {
            if self.message.contains(s) {
                self.message = self.message.replace(s, "[redacted]");
            }
        }
        self
    }
}

/// Everything that can end a request with an error, converted to an HTTP response
/// exactly once by the ingress of the client's dialect.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The request body stalled or did not arrive in time (`limits.idle_timeout`,
    /// `limits.body_read_timeout`).
    #[error("{message}")]
    BodyTimeout { message: String },
    #[error("the model `{model}` does not exist; available models: {available}")]
    UnknownModel { model: String, available: String },
    /// An empty `provider` is not named (see `limits.list_ids_in_errors`).
    /// `public` is the reason without settings (environment variables, files),
    /// for `limits.list_ids_in_errors: false`.
    #[error("{}", unavailable_text(provider, reason))]
    ProviderUnavailable {
        provider: String,
        reason: String,
        public: &'static str,
    },
    /// No target of a route could be tried (private-only, breakers open, …).
    /// `public` is `reason` with every clause that names a provider replaced by
    /// a generic one, for `limits.list_ids_in_errors: false`.
    #[error("no target of route `{route}` can take the request: {reason}")]
    NoTarget {
        route: String,
        reason: String,
        public: String,
    },
    #[error("route `{route}` does not support {capability}")]
    Unsupported { route: String, capability: String },
    #[error("{0}")]
    Upstream(UpstreamError),
    #[error("{message}")]
    NotFoundPrompt { message: String },
    #[error("no such endpoint: {method} {path}")]
    NotFound { method: String, path: String },
    /// A retriever a request needed failed (502) or timed out (504); the
    /// request's `on_error` policy was `fail`.
    #[error("retriever `{retriever}` {}: {message}", if *timed_out { "timed out" } else { "failed" })]
    Retrieval {
        retriever: String,
        message: String,
        timed_out: bool,
    },
    /// 401: a missing, unknown, disabled or expired gateway key
    /// (`auth: {mode: required}`). `code` names the reason; the message never
    /// holds the key.
    #[error("{message}")]
    Unauthorized { message: String, code: &'static str },
    /// 403: the key may not use this route or prompt.
    #[error("{message}")]
    Forbidden { message: String },
    /// 429: a rate limit (`rate_limit_exceeded`) or a budget
    /// (`budget_exceeded`). `headers` are the `x-ratelimit-*` headers to send.
    #[error("{message}")]
    Limited {
        message: String,
        code: &'static str,
        retry_after: Option<std::time::Duration>,
        headers: Vec<(&'static str, String)>,
    },
    /// 400: a detector found sensitive data in a request under the `block`
    /// policy. The message names the types found, never the values.
    #[error("{message}")]
    SensitiveData { message: String },
    /// 503: a shared store a request needs (the rate-limit store under
    /// `limits.on_store_error: fail_closed`) is unavailable.
    #[error("{message}")]
    StoreUnavailable { message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        GatewayError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            GatewayError::InvalidRequest { .. } | GatewayError::Unsupported { .. } => 400,
            GatewayError::PayloadTooLarge { .. } => 413,
            GatewayError::BodyTimeout { .. } => 408,
            GatewayError::UnknownModel { .. }
            | GatewayError::NotFound { .. }
            | GatewayError::NotFoundPrompt { .. } => 404,
            GatewayError::ProviderUnavailable { .. } | GatewayError::NoTarget { .. } => 503,
            GatewayError::Upstream(e) => e.kind.client_status(e.status),
            GatewayError::Retrieval { timed_out, .. } => {
                if *timed_out {
                    504
                } else {
                    502
                }
            }
            GatewayError::Unauthorized { .. } => 401,
            GatewayError::Forbidden { .. } => 403,
            GatewayError::Limited { .. } => 429,
            GatewayError::SensitiveData { .. } => 400,
            GatewayError::StoreUnavailable { .. } => 503,
            GatewayError::Internal(_) => 500,
        }
    }

    /// A short, stable name for the error: the `code` of the error JSON and the
    /// `kind` label of the error metric.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::InvalidRequest { .. } => "invalid_request",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::BodyTimeout { .. } => "request_timeout",
            GatewayError::UnknownModel { .. } => "model_not_found",
            GatewayError::ProviderUnavailable { .. } => "provider_unavailable",
            GatewayError::NoTarget { .. } => "no_target_available",
            GatewayError::Unsupported { .. } => "unsupported",
            GatewayError::Upstream(e) => match e.kind {
                ErrorKind::ContextLength => "context_length_exceeded",
                k => k.as_str(),
            },
            GatewayError::NotFound { .. } => "not_found",
            GatewayError::NotFoundPrompt { .. } => "prompt_not_found",
            GatewayError::Retrieval { .. } => "retrieval",
            GatewayError::Unauthorized { code, .. } => code,
            GatewayError::Forbidden { .. } => "permission_denied",
            GatewayError::Limited { code, .. } => code,
            GatewayError::SensitiveData { .. } => "sensitive_data",
            GatewayError::StoreUnavailable { .. } => "store_unavailable",
            GatewayError::Internal(_) => "internal_error",
        }
    }
}

fn unavailable_text(provider: &str, reason: &str) -> String {
    if provider.is_empty() {
        format!("the route's provider is unavailable: {reason}")
    } else {
        format!("provider `{provider}` is unavailable: {reason}")
    }
}

impl From<UpstreamError> for GatewayError {
    fn from(e: UpstreamError) -> Self {
        GatewayError::Upstream(e)
    }
}
