//! Gateway keys: the table built per snapshot, authentication and
//! authorization.
//!
//! A client presents its key as `Authorization: Bearer KEY` (OpenAI SDKs, and
//! Anthropic SDKs given an auth token) or `x-api-key: KEY` (Anthropic SDKs);
//! both are accepted on every door, `x-api-key` first. The gateway keeps only
//! each key's SHA-256 (`keys/*.yaml`); it hashes what it is given and looks
//! the digest up. A key never appears in an error, a log line, a metric or the
//! admin API: callers are named by their key id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use sha2::Digest;
use subtle::ConstantTimeEq;

use super::Caller;
use crate::config::{AuthMode, Config};
use crate::error::GatewayError;
use crate::pipeline::RequestContext;

/// The keys of a snapshot, by SHA-256 of the key, and the auth mode.
#[derive(Default)]
pub struct Access {
    pub mode: AuthMode,
    /// Keys, limits or prices are configured: requests need a ticket.
    pub active: bool,
    by_hash: HashMap<[u8; 32], Caller>,
}

/// Why a presented credential was refused (each a distinct error `code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No credential (or an empty one, or `Authorization` without `Bearer`).
    Missing,
    /// A credential that is no configured key.
    Invalid,
    /// A configured key with `enabled: false`.
    Disabled,
    /// A configured key past its `expires` time.
    Expired,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Missing => "missing_api_key",
            Refusal::Invalid => "invalid_api_key",
            Refusal::Disabled => "key_disabled",
            Refusal::Expired => "key_expired",
        }
    }
}

impl Access {
    pub fn build(cfg: &Config) -> Access {
        let by_hash: HashMap<[u8; 32], Caller> = cfg
            .keys
            .values()
            .map(|k| {
                (
                    k.sha256,
                    Caller {
                        id: k.id.as_str().into(),
                        key: Arc::new(k.clone()),
                    },
                )
            })
            .collect();
        let limits = cfg.routes.values().any(|r| !r.governance.limits.is_empty());
        let prices = cfg.providers.values().any(|p| p.prices.is_some());
        Access {
            mode: cfg.auth,
            active: !by_hash.is_empty() || limits || prices,
            by_hash,
        }
    }

    /// The caller a request's credential names (`Authorization: Bearer` or
    /// `x-api-key`). With `auth: required` a missing, unknown, disabled or
    /// expired key is a 401 naming the reason, never the key. With `auth: off`
    /// no key and an unknown key are anonymous (`Ok(None)`: a client may still
    /// send its provider's key, which the gateway does not know), a known key
    /// identifies its caller, and a known key that is disabled or expired is
    /// refused all the same: the operator turned it off.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Caller>, GatewayError> {
        // Nothing to identify: no hashing at all (today's behaviour, as cheap).
        if self.mode == AuthMode::Off && self.by_hash.is_empty() {
            return Ok(None);
        }
        match self.identify(headers, now_unix()) {
            Ok(c) => Ok(Some(c.clone())),
            Err((Refusal::Missing | Refusal::Invalid, _)) if self.mode == AuthMode::Off => Ok(None),
            Err((why, id)) => Err(unauthorized(why, id)),
        }
    }

    /// The configured key `headers` carry, checked against the clock `now`
    /// (Unix seconds); on refusal, the reason and the key's id when known.
    pub fn identify(
        &self,
        headers: &HeaderMap,
        now: u64,
    ) -> Result<&Caller, (Refusal, Option<&str>)> {
        let Some(presented) = credential(headers) else {
            return Err((Refusal::Missing, None));
        };
        // The digest is computed on the stack; nothing is allocated.
        let digest: [u8; 32] = sha2::Sha256::digest(presented).into();
        // Looking the digest up compares digests in variable time, which is
        // harmless: a timing difference can only tell an attacker how much of
        // the SHA-256 of *their own guess* matches a stored digest, and a
        // preimage-resistant hash makes that knowledge useless for building a
        // key (it says nothing about the key's bytes, and digests of nearby
        // guesses are unrelated). The hasher is randomly seeded besides. The
        // match is then confirmed in constant time over all 32 bytes.
        let caller = match self.by_hash.get(&digest) {
            Some(c) if bool::from(c.key.sha256.ct_eq(&digest)) => c,
            _ => return Err((Refusal::Invalid, None)),
        };
        let key = &caller.key;
        if !key.enabled {
            return Err((Refusal::Disabled, Some(&caller.id)));
        }
        if key.expires.is_some_and(|e| now >= e) {
            return Err((Refusal::Expired, Some(&caller.id)));
        }
        Ok(caller)
    }

    /// The number of configured keys.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Every configured key's caller.
    pub fn callers(&self) -> impl Iterator<Item = &Caller> {
        self.by_hash.values()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The credential a request carries, as bytes (not necessarily UTF-8: it is
/// only hashed): `x-api-key`, else the token of `Authorization: Bearer`.
/// Empty values and other `Authorization` schemes are no credential.
pub fn credential(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("x-api-key") {
        let k = v.as_bytes().trim_ascii();
        if !k.is_empty() {
            return Some(k);
        }
    }
    let v = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let v = v.trim_ascii();
    let (scheme, rest) = v.split_at(v.len().min(6));
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    // `Bearer` must be followed by whitespace and a token.
    if !rest.first().is_some_and(|b| b.is_ascii_whitespace()) {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

fn unauthorized(why: Refusal, id: Option<&str>) -> GatewayError {
    let id = id.unwrap_or("");
    let message = match why {
        Refusal::Missing => {
            "no gateway key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`"
                .to_owned()
        }
        Refusal::Invalid => "the gateway key is not valid".to_owned(),
        Refusal::Disabled => format!("gateway key `{id}` is disabled"),
        Refusal::Expired => format!("gateway key `{id}` has expired"),
    };
    GatewayError::Unauthorized {
        message,
        code: why.code(),
    }
}

/// Whether the request's caller may use its route and prompt: 403 otherwise.
/// A request without a caller is not restricted here.
pub fn authorize(ctx: &RequestContext) -> Result<(), GatewayError> {
    let Some(c) = &ctx.caller else {
        return Ok(());
    };
    may_use_route(c, &ctx.route().name)?;
    if let Some(p) = &ctx.prompt {
        may_use_prompt(c, &p.id)?;
    }
    Ok(())
}

/// The checks of [`authorize`] that can be made before a prompt is rendered
/// (so a refused request costs no rendering or retrieval): the prompt the
/// client names, or, without a prompt, the configured route it names (a
/// prompt's version may name another route; [`authorize`] checks the route
/// the request is placed on).
pub fn precheck(
    caller: Option<&Caller>,
    route: Option<&str>,
    prompt: Option<&str>,
) -> Result<(), GatewayError> {
    let Some(c) = caller else {
        return Ok(());
    };
    match (prompt, route) {
        (Some(p), _) => may_use_prompt(c, p),
        (None, Some(r)) => may_use_route(c, r),
        (None, None) => Ok(()),
    }
}

/// Whether the caller may search a retriever. Searching costs what the
/// retriever's query embedding costs, so a key may search a retriever that
/// embeds its queries through a route when it may use that route; a
/// retriever that embeds nothing (lexical) may be searched by any key allowed
/// at least one route.
pub fn authorize_search(
    caller: Option<&Caller>,
    retriever: &str,
    embedding_route: Option<&str>,
) -> Result<(), GatewayError> {
    let Some(c) = caller else {
        return Ok(());
    };
    let allowed = match embedding_route {
        Some(r) => allows(&c.key.routes, r),
        None => !c.key.routes.is_empty(),
    };
    if allowed {
        Ok(())
    } else {
        Err(GatewayError::Forbidden {
            message: format!(
                "key `{}` may not search retriever `{}`{}",
                c.id,
                crate::server::LogSafe(retriever),
                match embedding_route {
                    Some(r) => format!(" (it may not use its embedding route `{r}`)"),
                    None => " (it may use no route)".into(),
                }
            ),
        })
    }
}

fn may_use_route(c: &Caller, route: &str) -> Result<(), GatewayError> {
    if allows(&c.key.routes, route) {
        return Ok(());
    }
    Err(GatewayError::Forbidden {
        message: format!(
            "key `{}` may not use route `{}`",
            c.id,
            crate::server::LogSafe(route)
        ),
    })
}

fn may_use_prompt(c: &Caller, prompt: &str) -> Result<(), GatewayError> {
    if allows(&c.key.prompts, prompt) {
        return Ok(());
    }
    Err(GatewayError::Forbidden {
        message: format!(
            "key `{}` may not use prompt `{}`",
            c.id,
            crate::server::LogSafe(prompt)
        ),
    })
}

/// Whether any of `globs` matches `name`.
fn allows(globs: &[String], name: &str) -> bool {
    globs.iter().any(|g| glob(g.as_bytes(), name.as_bytes()))
}

/// A glob match over whole strings: `*` matches any run of characters (none
/// too), `?` exactly one character (UTF-8 aware); everything else matches
/// itself. Linear backtracking on the last `*`, no allocation.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    // Where to resume after the last `*`: (pattern index after it, text index).
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, t));
                p += 1;
                continue;
            }
            Some(b'?') => {
                p += 1;
                t += char_len(text[t]);
                continue;
            }
            Some(&c) if c == text[t] => {
                p += 1;
                t += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, st)) => {
                // Let the `*` take one more character.
                let st = st + char_len(text[st]);
                star = Some((sp, st));
                p = sp;
                t = st;
            }
            None => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// The length of the UTF-8 sequence `first` starts (1 for a stray byte).
fn char_len(first: u8) -> usize {
    match first {
        0xF0..=0xF7 => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// A new gateway key: `pg-` and 32 bytes from the operating system's random
/// source, base64url without padding; and its SHA-256 in hex.
pub fn new_key() -> Result<(String, String), String> {
    use base64::Engine;
    use rand::TryRngCore;
    let mut bytes = [0u8; 32];
    // `OsRng` reads the operating system's source directly; when it fails no
    // key is made (one from anything weaker must not be handed out).
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| format!("the operating system's random source failed: {e}"))?;
    let key = format!(
        "pg-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let digest = sha256_hex(key.as_bytes());
    Ok((key, digest))
}

/// The SHA-256 of `key` as 64 lower-case hex digits (what a keys file holds).
pub fn sha256_hex(key: &[u8]) -> String {
    use std::fmt::Write;
    let d = sha2::Sha256::digest(key);
    let mut s = String::with_capacity(64);
    for b in d {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// What the admin API shows of a key: everything but its hash. `usage` is
/// its current use of its limits and budget (filled in by the admin API).
pub fn admin_json(c: &Caller, now: u64, usage: serde_json::Value) -> serde_json::Value {
    use serde_json::json;
    let k = &c.key;
    let limit = |l: &crate::config::BudgetLimit| json!({"tokens": l.tokens, "cost": l.cost});
    json!({
        "id": &*c.id,
        "owner": k.owner,
        "team": k.team,
        "description": k.description,
        "file": k.file.display().to_string(),
        "enabled": k.enabled,
        "expires": k.expires.map(rfc3339),
        "expired": k.expires.is_some_and(|e| now >= e),
        "routes": k.routes,
        "prompts": k.prompts,
        "limits": {"rpm": k.limits.rpm, "tpm": k.limits.tpm, "concurrency": k.limits.concurrency},
        "budget": k.budget.as_ref().map(|b| json!({
            "daily": b.daily.as_ref().map(limit),
            "monthly": b.monthly.as_ref().map(limit),
            "fallback_route": b.fallback_route,
        })),
        "data": k.data.map(|d| format!("{d:?}").to_lowercase()),
        "audit_content": k.audit_content,
        "usage": usage,
    })
}

/// The `keys` summary of `/admin/status`.
pub fn status_json(access: &Access, now: u64) -> serde_json::Value {
    let mut enabled = 0usize;
    let mut expired = 0usize;
    for c in access.callers() {
        if c.key.expires.is_some_and(|e| now >= e) {
            expired += 1;
        } else if c.key.enabled {
            enabled += 1;
        }
    }
    serde_json::json!({
        "mode": mode_name(access.mode),
        "count": access.len(),
        "usable": enabled,
        "expired": expired,
    })
}

/// `off` or `required`.
pub fn mode_name(mode: AuthMode) -> &'static str {
    match mode {
        AuthMode::Off => "off",
        AuthMode::Required => "required",
    }
}

/// Unix seconds as an RFC 3339 time (UTC, whole seconds).
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

/// The current time in Unix seconds (the clock expiry is checked against).
pub fn now() -> u64 {
    now_unix()
}

/// `promptgate check`'s notes on the keys: every route or prompt glob that
/// matches nothing configured (most likely a typo; not an error, since the
/// route or prompt may be added later).
pub fn notes(cfg: &Config) -> Vec<String> {
    let routes: Vec<&str> = cfg.routes.keys().map(String::as_str).collect();
    let prompts: Vec<&str> = cfg.prompts.keys().map(String::as_str).collect();
    let mut out = Vec::new();
    for k in cfg.keys.values() {
        for (what, globs, names) in [
            ("route", &k.routes, &routes),
            ("prompt", &k.prompts, &prompts),
        ] {
            // `*` (the default) allows whatever is configured, none included.
            for g in globs.iter().filter(|g| g.as_str() != "*") {
                if !names.iter().any(|n| glob(g.as_bytes(), n.as_bytes())) {
                    out.push(format!(
                        "{}: key `{}`: {what} pattern `{g}` matches no configured {what}",
                        k.file.display(),
                        k.id
                    ));
                }
            }
        }
    }
    out
}

/// What `promptgate keys new` puts in a key's entry.
#[derive(Debug, Default, Clone)]
pub struct NewKey {
    pub id: String,
    pub owner: Option<String>,
    pub team: Option<String>,
    pub description: Option<String>,
    /// Route globs (none given: every route).
    pub routes: Vec<String>,
    pub prompts: Vec<String>,
    /// RFC 3339.
    pub expires: Option<String>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub concurrency: Option<u32>,
}

/// The `keys/*.yaml` entry for a new key whose SHA-256 is `sha256` (hex), as
/// text to paste; checks what the config would refuse. Strings are written
/// as JSON strings, which YAML reads as double-quoted scalars, so no value
/// can change the entry's structure.
pub fn entry_yaml(k: &NewKey, sha256: &str) -> Result<String, String> {
    use std::fmt::Write;
    let ok_id = !k.id.is_empty()
        && k.id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok_id {
        return Err(format!(
            "invalid --id `{}`: a key id must be letters, digits, `-`, `_` or `.`",
            k.id
        ));
    }
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let list = |v: &[String]| {
        let items: Vec<String> = v.iter().map(|s| q(s)).collect();
        format!("[{}]", items.join(", "))
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}:", k.id);
    let _ = writeln!(out, "  sha256: {sha256}");
    for (name, v) in [
        ("owner", &k.owner),
        ("team", &k.team),
        ("description", &k.description),
    ] {
        if let Some(v) = v {
            let _ = writeln!(out, "  {name}: {}", q(v));
        }
    }
    if !k.routes.is_empty() {
        let _ = writeln!(out, "  routes: {}", list(&k.routes));
    }
    if !k.prompts.is_empty() {
        let _ = writeln!(out, "  prompts: {}", list(&k.prompts));
    }
    let mut limits = Vec::new();
    for (name, v) in [
        ("rpm", k.rpm),
        ("tpm", k.tpm),
        ("concurrency", k.concurrency.map(u64::from)),
    ] {
        match v {
            Some(0) => return Err(format!("--{name} must be at least 1")),
            Some(n) => limits.push(format!("{name}: {n}")),
            None => {}
        }
    }
    if !limits.is_empty() {
        let _ = writeln!(out, "  limits: {{{}}}", limits.join(", "));
    }
    if let Some(e) = &k.expires {
        let t = humantime::parse_rfc3339_weak(e)
            .map_err(|why| format!("invalid --expires `{e}`: {why} (e.g. 2027-01-01T00:00:00Z)"))?;
        let _ = writeln!(out, "  expires: {}", humantime::format_rfc3339_seconds(t));
    }
    Ok(out)
}

/// Splits a comma-separated list of globs (`chat*,embed`), dropping blanks.
pub fn split_globs(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::KeyConfig;
    use http::HeaderValue;

    fn key(id: &str, secret: &str) -> KeyConfig {
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&sha2::Sha256::digest(secret.as_bytes()));
        KeyConfig {
            id: id.into(),
            file: "keys/test.yaml".into(),
            sha256,
            owner: None,
            team: None,
            description: None,
            routes: vec!["chat*".into(), "embed".into()],
            prompts: vec!["*".into()],
            limits: Default::default(),
            budget: None,
            expires: None,
            data: None,
            audit_content: false,
            enabled: true,
        }
    }

    fn access(mode: AuthMode, keys: Vec<KeyConfig>) -> Access {
        Access {
            mode,
            active: true,
            by_hash: keys
                .into_iter()
                .map(|k| {
                    (
                        k.sha256,
                        Caller {
                            id: k.id.as_str().into(),
                            key: Arc::new(k),
                        },
                    )
                })
                .collect(),
        }
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    fn code(r: Result<Option<Caller>, GatewayError>) -> &'static str {
        match r {
            Err(e) => e.code(),
            Ok(Some(_)) => "ok",
            Ok(None) => "anonymous",
        }
    }

    #[test]
    fn both_headers_on_every_door_and_each_refusal_has_its_code() {
        let mut expired = key("old", "pg-old");
        expired.expires = Some(1);
        let mut off = key("off", "pg-off");
        off.enabled = false;
        let a = access(
            AuthMode::Required,
            vec![key("team-a", "pg-secret"), expired, off],
        );
        let ok = |h: HeaderMap| a.authenticate(&h).unwrap().unwrap().id.to_string();
        assert_eq!(
            ok(headers(&[("authorization", b"Bearer pg-secret")])),
            "team-a"
        );
        assert_eq!(
            ok(headers(&[("authorization", b"bearer   pg-secret ")])),
            "team-a"
        );
        assert_eq!(ok(headers(&[("x-api-key", b"pg-secret")])), "team-a");
        // x-api-key first, then the bearer token.
        assert_eq!(
            ok(headers(&[
                ("x-api-key", b"pg-secret"),
                ("authorization", b"Bearer nope")
            ])),
            "team-a"
        );
        let c = |h: HeaderMap| code(a.authenticate(&h));
        assert_eq!(c(headers(&[])), "missing_api_key");
        assert_eq!(
            c(headers(&[("authorization", b"Bearer")])),
            "missing_api_key"
        );
        assert_eq!(
            c(headers(&[("authorization", b"Bearer   ")])),
            "missing_api_key"
        );
        assert_eq!(
            c(headers(&[("authorization", b"Basic dXNlcg==")])),
            "missing_api_key"
        );
        assert_eq!(
            c(headers(&[("authorization", b"Bearerpg-secret")])),
            "missing_api_key"
        );
        assert_eq!(c(headers(&[("x-api-key", b"")])), "missing_api_key");
        assert_eq!(c(headers(&[("x-api-key", b"pg-wrong")])), "invalid_api_key");
        // Not UTF-8: hashed like any bytes, so simply unknown.
        assert_eq!(
            c(headers(&[("x-api-key", b"\xff\xfe\x80")])),
            "invalid_api_key"
        );
        assert_eq!(
            c(headers(&[("authorization", b"Bearer \xc3\x28")])),
            "invalid_api_key"
        );
        assert_eq!(c(headers(&[("x-api-key", b"pg-old")])), "key_expired");
        assert_eq!(c(headers(&[("x-api-key", b"pg-off")])), "key_disabled");
    }

    #[test]
    fn refusals_name_the_reason_never_the_key() {
        let mut expired = key("old", "pg-old-secret");
        expired.expires = Some(1);
        let a = access(AuthMode::Required, vec![expired]);
        for (h, v) in [
            ("x-api-key", "pg-wrong-secret"),
            ("x-api-key", "pg-old-secret"),
            ("authorization", "Bearer pg-old-secret"),
        ] {
            let e = a.authenticate(&headers(&[(h, v.as_bytes())])).unwrap_err();
            let m = e.to_string();
            assert!(!m.contains("secret"), "{m}");
            assert!(!m.contains(&sha256_hex(b"pg-old-secret")), "{m}");
            assert_eq!(e.status(), 401);
        }
    }

    #[test]
    fn expiry_is_checked_against_the_given_clock() {
        let mut k = key("k", "pg-k");
        k.expires = Some(1_000);
        let a = access(AuthMode::Required, vec![k]);
        let h = headers(&[("x-api-key", b"pg-k")]);
        assert!(a.identify(&h, 999).is_ok());
        assert_eq!(a.identify(&h, 1_000).unwrap_err().0, Refusal::Expired);
    }

    #[test]
    fn mode_off_identifies_known_keys_and_lets_the_rest_through() {
        let mut off = key("off", "pg-off");
        off.enabled = false;
        let a = access(AuthMode::Off, vec![key("team-a", "pg-secret"), off]);
        let c = |h: HeaderMap| code(a.authenticate(&h));
        assert_eq!(c(headers(&[])), "anonymous");
        assert_eq!(
            c(headers(&[("authorization", b"Bearer sk-provider")])),
            "anonymous"
        );
        assert_eq!(c(headers(&[("authorization", b"Bearer pg-secret")])), "ok");
        assert_eq!(c(headers(&[("x-api-key", b"pg-off")])), "key_disabled");
    }

    #[test]
    fn globs() {
        let m = |p: &str, t: &str| glob(p.as_bytes(), t.as_bytes());
        assert!(m("*", ""));
        assert!(m("*", "chat"));
        assert!(m("chat*", "chat"));
        assert!(m("chat*", "chat-fast"));
        assert!(!m("chat*", "embed"));
        assert!(m("chat-?", "chat-a"));
        assert!(!m("chat-?", "chat-"));
        assert!(!m("chat-?", "chat-ab"));
        assert!(m("?", "问"));
        assert!(m("客服-?", "客服-一"));
        assert!(m("*-fast", "chat-x-fast"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(!m("a*b*c", "aXbYbZ"));
        assert!(m("**", "x"));
        assert!(!m("", "x"));
        assert!(m("", ""));
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exactly"));
        assert!(m("*?", "x"));
        assert!(!m("*?", ""));
    }

    #[test]
    fn new_keys_are_fresh_and_their_digests_match() {
        let (k1, d1) = new_key().unwrap();
        let (k2, _) = new_key().unwrap();
        assert_ne!(k1, k2);
        assert!(k1.starts_with("pg-"));
        assert_eq!(k1.len(), 3 + 43);
        assert_eq!(d1, sha256_hex(k1.as_bytes()));
        assert_eq!(d1.len(), 64);
    }
}
