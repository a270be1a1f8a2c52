//! Credentials the transport attaches to each backend call. Most are a static
//! header; some are minted or fetched and cached: Zhipu's JWT signed from an
//! `id.secret` key, and Baidu Qianfan v1's OAuth access token (a query parameter).
//! Secrets never leave this module except inside the header or query they belong in.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use http::{HeaderName, HeaderValue};

use crate::error::{ErrorKind, UpstreamError};

/// What to add to a request to authenticate it.
#[derive(Clone)]
pub enum AuthPart {
    Header(HeaderName, HeaderValue),
    Query(&'static str, String),
}

/// A credential that must be produced at call time (and may be cached).
pub trait TokenSource: Send + Sync {
    fn get<'a>(
        &'a self,
        client: &'a reqwest::Client,
    ) -> BoxFuture<'a, Result<AuthPart, UpstreamError>>;
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

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Zhipu's JWT: HS256 over `{"api_key": id, "exp": ms, "timestamp": ms}` with the
/// non-standard header field `sign_type: SIGN`, both times in milliseconds.
pub struct ZhipuJwt {
    id: String,
    secret: String,
    ttl: Duration,
    cached: Mutex<Option<(String, u128)>>,
}

impl ZhipuJwt {
    /// `key` is `<id>.<secret>`.
    pub fn new(key: &str, ttl: Duration) -> Result<Self, String> {
        let (id, secret) = key
            .split_once('.')
            .filter(|(a, b)| !a.is_empty() && !b.is_empty())
            .ok_or_else(|| "a Zhipu JWT key must look like `<id>.<secret>`".to_string())?;
        Ok(ZhipuJwt {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ttl,
            cached: Mutex::new(None),
        })
    }

    /// Signs a token valid from `now` (milliseconds since the epoch).
    pub fn sign(&self, now: u128) -> String {
        use hmac::{Hmac, Mac};
        let header = br#"{"alg":"HS256","sign_type":"SIGN"}"#;
        let payload = serde_json::json!({
            "api_key": self.id,
            "exp": now + self.ttl.as_millis(),
            "timestamp": now,
        })
        .to_string();
        let signing_input = format!("{}.{}", b64url(header), b64url(payload.as_bytes()));
        let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(self.secret.as_bytes()) {
            Ok(m) => m,
            // HMAC accepts keys of any length; this cannot happen.
            Err(_) => return signing_input,
        };
        mac.update(signing_input.as_bytes());
        let sig = mac.finalize().into_bytes();
        format!("{signing_input}.{}", b64url(&sig))
    }

    fn token(&self) -> String {
        let now = now_ms();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        // Reuse until a minute (or a tenth of the lifetime) before expiry.
        let margin = (self.ttl.as_millis() / 10).min(60_000);
        if let Some((tok, exp)) = cached.as_ref() {
            if now + margin < *exp {
                return tok.clone();
            }
        }
        let tok = self.sign(now);
        *cached = Some((tok.clone(), now + self.ttl.as_millis()));
        tok
    }
}

impl TokenSource for ZhipuJwt {
    fn get<'a>(&'a self, _: &'a reqwest::Client) -> BoxFuture<'a, Result<AuthPart, UpstreamError>> {
        let tok = self.token();
        Box::pin(async move {
            let mut v = HeaderValue::from_str(&format!("Bearer {tok}"))
                .map_err(|_| UpstreamError::new(ErrorKind::Auth, "cannot build the JWT header"))?;
            v.set_sensitive(true);
            Ok(AuthPart::Header(http::header::AUTHORIZATION, v))
        })
    }

    fn invalidate(&self) {
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The longest lifetime taken from a token answer (Baidu's tokens last 30 days).
const MAX_TOKEN_LIFE: Duration = Duration::from_secs(30 * 86_400);

/// When a token fetched at `now` that lives `expires_in` seconds (a day when the
/// answer does not say) should be refreshed: five minutes, or a tenth of its
/// lifetime, early. The lifetime is the endpoint's number, so it is capped
/// rather than trusted to fit a clock.
fn token_refresh_at(expires_in: Option<u64>, now: SystemTime) -> SystemTime {
    let life = Duration::from_secs(expires_in.unwrap_or(86_400)).min(MAX_TOKEN_LIFE);
    let early = (life / 10).min(Duration::from_secs(300));
    now.checked_add(life - early).unwrap_or(now)
}

/// Baidu Qianfan v1: an access token from the OAuth endpoint (API key + secret
/// key), cached until shortly before it expires, sent as `?access_token=`.
pub struct QianfanToken {
    token_url: String,
    api_key: String,
    secret_key: String,
    cached: tokio::sync::Mutex<Option<(String, SystemTime)>>,
}

impl QianfanToken {
    pub fn new(token_url: &str, api_key: &str, secret_key: &str) -> Self {
        QianfanToken {
            token_url: token_url.to_owned(),
            api_key: api_key.to_owned(),
            secret_key: secret_key.to_owned(),
            cached: tokio::sync::Mutex::new(None),
        }
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<(String, SystemTime), UpstreamError> {
        #[derive(serde::Deserialize)]
        struct TokenReply {
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
            #[serde(default)]
            error_description: Option<String>,
        }
        let resp = client
            .post(&self.token_url)
            .query(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.api_key.as_str()),
                ("client_secret", self.secret_key.as_str()),
            ])
            .send()
            .await
            .map_err(super::transport::classify_transport_error)?;
        let status = resp.status().as_u16();
        // A token reply is a few hundred bytes; a larger one is not read whole.
        let body = super::transport::read_body(resp, 64 * 1024).await?;
        let reply: TokenReply = serde_json::from_slice(&body).map_err(|_| {
            UpstreamError::new(
                ErrorKind::Auth,
                format!("token endpoint answered HTTP {status} with no token"),
            )
        })?;
        match reply.access_token {
            Some(t) if !t.is_empty() => {
                Ok((t, token_refresh_at(reply.expires_in, SystemTime::now())))
            }
            _ => Err(UpstreamError::new(
                ErrorKind::Auth,
                format!(
                    "token endpoint refused the credentials: {}",
                    reply
                        .error_description
                        .unwrap_or_else(|| format!("HTTP {status}"))
                ),
            )),
        }
    }
}

impl TokenSource for QianfanToken {
    fn get<'a>(
        &'a self,
        client: &'a reqwest::Client,
    ) -> BoxFuture<'a, Result<AuthPart, UpstreamError>> {
        Box::pin(async move {
            let mut cached = self.cached.lock().await;
            if let Some((tok, until)) = cached.as_ref() {
                if SystemTime::now() < *until {
                    return Ok(AuthPart::Query("access_token", tok.clone()));
                }
            }
            let (tok, until) = self.fetch(client).await?;
            *cached = Some((tok.clone(), until));
            Ok(AuthPart::Query("access_token", tok))
        })
    }

    fn invalidate(&self) {
        if let Ok(mut c) = self.cached.try_lock() {
            *c = None;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use base64::Engine;

    #[test]
    fn zhipu_jwt_has_the_documented_shape_and_verifies() {
        use hmac::{Hmac, Mac};
        let jwt = ZhipuJwt::new("myid.mysecret", Duration::from_secs(210)).unwrap();
        let tok = jwt.sign(1_700_000_000_000);
        let parts: Vec<&str> = tok.split('.').collect();
        assert_eq!(parts.len(), 3);
        let dec = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .unwrap()
        };
        let header: serde_json::Value = serde_json::from_slice(&dec(parts[0])).unwrap();
        assert_eq!(
            header,
            serde_json::json!({"alg": "HS256", "sign_type": "SIGN"})
        );
        let payload: serde_json::Value = serde_json::from_slice(&dec(parts[1])).unwrap();
        assert_eq!(
            payload,
            serde_json::json!({"api_key": "myid", "exp": 1_700_000_210_000u64, "timestamp": 1_700_000_000_000u64})
        );
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"mysecret").unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&dec(parts[2])).unwrap();
        assert!(ZhipuJwt::new("no-dot", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn token_lifetimes_from_the_endpoint_are_capped() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            token_refresh_at(Some(2_592_000), now),
            now + Duration::from_secs(2_592_000 - 300)
        );
        assert_eq!(
            token_refresh_at(None, now),
            now + Duration::from_secs(86_400 - 300)
        );
        assert_eq!(
            token_refresh_at(Some(100), now),
            now + Duration::from_secs(90)
        );
        // u64::MAX seconds would overflow the clock.
        assert_eq!(
            token_refresh_at(Some(u64::MAX), now),
            now + MAX_TOKEN_LIFE - Duration::from_secs(300)
        );
    }

    #[test]
    fn zhipu_jwt_is_cached_until_near_expiry() {
        let jwt = ZhipuJwt::new("a.b", Duration::from_secs(600)).unwrap();
        let t1 = jwt.token();
        assert_eq!(jwt.token(), t1);
        jwt.invalidate();
        // A new token is minted after invalidation (its timestamp may equal the old
        // one within the same millisecond, so only check it is well-formed).
        assert_eq!(jwt.token().split('.').count(), 3);
    }
}
