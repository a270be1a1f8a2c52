//! Credentials the transport attaches to each backend call. Most are a static
//! header; some are minted or fetched and cached by a [`TokenSource`] that lives
//! with its kind (Zhipu's JWT in `zhipu.rs`, Qianfan v1's access token in
//! `qianfan.rs`). Secrets never leave a credential except inside the header or
//! query they belong in.

use futures_util::future::BoxFuture;
use http::{HeaderName, HeaderValue};

use super::transport::Upstream;
use crate::error::UpstreamError;

/// What to add to a request to authenticate it.
#[derive(Clone)]
pub enum AuthPart {
    Header(HeaderName, HeaderValue),
    Query(&'static str, String),
}

/// A credential that must be produced at call time (and may be cached).
pub trait TokenSource: Send + Sync {
    /// `client` is the provider's own (a token fetched over HTTP shares its pool).
    fn get<'a>(&'a self, client: &'a Upstream) -> BoxFuture<'a, Result<AuthPart, UpstreamError>>;
    /// Drops a cached token the backend has rejected, so the next call refreshes it.
    fn invalidate(&self) {}
}

pub enum Credential {
    None,
    Static(AuthPart),
    Dynamic(Box<dyn TokenSource>),
}

impl Credential {
    pub fn header(name: HeaderName, value: &str) -> Result<Credential, String> {
        let mut v = HeaderValue::from_str(value)
            .map_err(|_| "the API key contains characters not allowed in a header".to_string())?;
        v.set_sensitive(true);
        Ok(Credential::Static(AuthPart::Header(name, v)))
    }
}
