//! Data protection: detectors for sensitive values (Chinese resident ID
//! numbers, mainland mobile numbers, bank cards, e-mail addresses, IPv4
//! addresses, API-key-like secrets, operator regexes) and the policies applied
//! to a request in which they found something: `redact` (placeholders before
//! the call, restored in the answer, streams included), `block`, `private`.
//!
//! What is scanned: the text of every message of the canonical request after
//! rendering (system, developer, user, assistant, tool results; text parts of
//! multi-part content; assistant reasoning) and the arguments of tool calls in
//! the conversation. Prompt variables and retrieved passages render into
//! messages, so they are scanned too. Tool definitions, images and parts the
//! gateway does not model are not scanned.
//!
//! - [`detect`]: the built-in detectors, one pass over a text.
//! - [`restore`]: placeholders back into complete answers and streams.

pub mod detect;
pub mod restore;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::canonical::{ChatRequest, Content, EmbeddingInput, EmbeddingsRequest, Part};
use crate::config::{DataPolicy, ProtectConfig};
use crate::error::GatewayError;
use crate::metrics::GovMetrics;
use crate::pipeline::{ChatOutcome, RequestContext};
use crate::snapshot::{Route, Snapshot};

use detect::{Enabled, Hit};
pub use restore::Restorer;

/// The built-in detectors, by name.
pub const BUILTIN: &[&str] = &["cn_id", "cn_mobile", "bank_card", "email", "ipv4", "secret"];

/// Most bytes in an operator's pattern.
const MAX_PATTERN: usize = 1024;
/// Most memory the compiled form of an operator's pattern may use.
const REGEX_SIZE: usize = 1 << 20;
/// Longest detector name (it becomes part of a placeholder).
const MAX_NAME: usize = 32;

fn compile(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE)
        .dfa_size_limit(REGEX_SIZE)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(_) => {
                format!("pattern is too large once compiled (over {REGEX_SIZE} bytes)")
            }
            e => format!("invalid regular expression: {e}"),
        })
}

/// Checks an operator-defined detector (`data_protection.custom`): its name
/// (`[a-z][a-z0-9_]*`, at most 32 bytes, not a built-in name) and its pattern
/// (a regular expression of at most 1024 bytes whose compiled form stays under
/// 1 MiB, which does not match the empty string).
pub fn check_custom(name: &str, pattern: &str) -> Result<(), String> {
    let valid_name = name.len() <= MAX_NAME
        && name.bytes().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
    if !valid_name {
        return Err(format!(
            "invalid detector name `{name}`: use a lower-case letter, then letters, digits or `_` (at most {MAX_NAME})"
        ));
    }
    if BUILTIN.contains(&name) {
        return Err(format!(
            "`{name}` is a built-in detector; choose another name"
        ));
    }
    if pattern.len() > MAX_PATTERN {
        return Err(format!(
            "pattern is {} bytes; at most {MAX_PATTERN}",
            pattern.len()
        ));
    }
    let re = compile(pattern)?;
    if re.is_match("") {
        return Err("pattern matches the empty string".into());
    }
    Ok(())
}

struct Custom {
    re: regex::Regex,
}

/// The detectors of a snapshot, compiled once.
#[derive(Default)]
pub struct Scanner {
    builtin: Enabled,
    custom: Vec<Custom>,
    /// Names by kind: the built-ins, then the operator's.
    names: Vec<Arc<str>>,
    /// Placeholder labels by kind (`CN_MOBILE`).
    labels: Vec<String>,
}

impl Scanner {
    pub fn build(cfg: &ProtectConfig) -> Scanner {
        let mut builtin = Enabled::default();
        for (k, name) in BUILTIN.iter().enumerate() {
            if cfg.detectors.iter().any(|d| d == name) {
                builtin = builtin.with(k as u16);
            }
        }
        let mut names: Vec<Arc<str>> = BUILTIN.iter().map(|n| Arc::from(*n)).collect();
        let mut custom = Vec::new();
        for (name, pattern) in &cfg.custom {
            // Validated by `check`; a pattern that fails here is left out, loudly.
            match compile(pattern) {
                Ok(re) => {
                    custom.push(Custom { re });
                    names.push(Arc::from(name.as_str()));
                }
                Err(e) => tracing::error!(detector = %name, error = %e, "custom detector left out"),
            }
        }
        let labels = names.iter().map(|n| n.to_ascii_uppercase()).collect();
        Scanner {
            builtin,
            custom,
            names,
            labels,
        }
    }

    /// No detector is enabled.
    pub fn is_empty(&self) -> bool {
        self.builtin.is_empty() && self.custom.is_empty()
    }

    /// The hits in `text`, in order, not overlapping.
    pub fn scan(&self, text: &str, out: &mut Vec<Hit>) {
        let before = out.len();
        detect::scan(text, self.builtin, out);
        if self.custom.is_empty() {
            return;
        }
        let builtin_end = out.len();
        for (k, c) in self.custom.iter().enumerate() {
            let kind = (BUILTIN.len() + k) as u16;
            for m in c.re.find_iter(text) {
                if !m.is_empty() {
                    out.push(Hit {
                        start: m.start(),
                        end: m.end(),
                        kind,
                    });
                }
            }
        }
        if out.len() == builtin_end {
            return;
        }
        // Built-in hits win over operator hits that overlap them; among
        // operator hits, the one that starts first (then the longest).
        let found = &mut out[before..];
        found.sort_by(|a, b| {
            a.start
                .cmp(&b.start)
                .then((b.kind < BUILTIN.len() as u16).cmp(&(a.kind < BUILTIN.len() as u16)))
                .then(b.end.cmp(&a.end))
        });
        let mut kept: Vec<Hit> = Vec::with_capacity(found.len());
        for h in found.iter() {
            match kept.last_mut() {
                Some(last) if h.start < last.end => {
                    let builtin = |h: &Hit| h.kind < BUILTIN.len() as u16;
                    if builtin(h) && !builtin(last) {
                        *last = *h;
                    }
                }
                _ => kept.push(*h),
            }
        }
        // A built-in hit that replaced an operator hit may now overlap the one before.
        kept.dedup_by(|b, a| b.start < a.end);
        out.truncate(before);
        out.extend(kept);
    }

    pub fn name(&self, kind: u16) -> &Arc<str> {
        &self.names[kind as usize]
    }
}

/// What data protection did to a request, and how to undo it in the answer.
#[derive(Default)]
pub struct Protection {
    /// Detections by type (counts only).
    pub detections: Vec<(std::sync::Arc<str>, u32)>,
    /// `redact`, `block` or `private`, when something was found.
    pub action: Option<&'static str>,
    /// Placeholders → values, when something was redacted.
    map: Option<Arc<Restorer>>,
}

/// The policy of a request: its key's, else its route's, else the gateway's.
pub fn policy(ctx: &RequestContext) -> DataPolicy {
    policy_for(&ctx.snapshot, ctx.caller.as_ref(), Some(ctx.route()))
}

/// The policy of a request before its context exists (the render stage, the
/// search endpoint): `caller`'s key's, else `route`'s, else the gateway's.
pub fn policy_for(
    snapshot: &Snapshot,
    caller: Option<&crate::governance::Caller>,
    route: Option<&Route>,
) -> DataPolicy {
    caller
        .and_then(|c| c.key.data)
        .or(route.and_then(|r| r.governance.data))
        .unwrap_or(snapshot.config.protect.policy)
}

/// What data protection found in a retrieval query, and what it did.
#[derive(Debug, Clone, Default)]
pub struct QueryFound {
    /// Detections by type (counts only); empty when the query is clean.
    pub detections: Vec<(Arc<str>, u32)>,
    /// `redact` or `private`, when something was found.
    pub action: Option<&'static str>,
    /// The query to search with when values were replaced by placeholders.
    pub redacted: Option<String>,
}

impl QueryFound {
    /// The query must be embedded on self-hosted targets only, and the
    /// request it serves becomes private.
    pub fn private(&self) -> bool {
        self.action == Some("private")
    }
}

/// Data protection of a retrieval query (a prompt hook's rendered query, the
/// chat `retrieval` extension's, the search endpoint's) before it is searched,
/// under `policy`: `block` → 400 `sensitive_data`; `private` → the caller must
/// keep the query on self-hosted embeddings targets (remote `http`/`chroma`
/// retrievers, the enterprise's own services, still get it); `redact` → the
/// query to search with, each value replaced by a placeholder of the shape
/// [`apply`] uses (nothing to restore: passages are not answers). Detections
/// are counted in `metrics` under `route` (the request's route, if known).
/// A clean query (or `off`) allocates nothing.
pub fn protect_query(
    snapshot: &Snapshot,
    policy: DataPolicy,
    route: Option<&Route>,
    metrics: &GovMetrics,
    query: &str,
) -> Result<QueryFound, GatewayError> {
    let scanner = &snapshot.protect;
    if policy == DataPolicy::Off || scanner.is_empty() {
        return Ok(QueryFound::default());
    }
    let mut hits = Vec::new();
    scanner.scan(query, &mut hits);
    if hits.is_empty() {
        return Ok(QueryFound::default());
    }
    let detections = count(scanner, hits.iter());
    let action = action_of(policy);
    let label = route.map_or("unknown", |r| &*r.name);
    for (kind, n) in &detections {
        metrics.detection(kind, label, action, *n);
    }
    match policy {
        DataPolicy::Block => Err(refusal("retrieval query", &detections)),
        DataPolicy::Private => Ok(QueryFound {
            detections,
            action: Some(action),
            redacted: None,
        }),
        _ => {
            let mut r = Redactor::new(scanner, query);
            let mut q = query.to_owned();
            r.redact(&mut q, &hits);
            Ok(QueryFound {
                detections,
                action: Some(action),
                redacted: Some(q),
            })
        }
    }
}

fn action_of(policy: DataPolicy) -> &'static str {
    match policy {
        DataPolicy::Block => "block",
        DataPolicy::Private => "private",
        _ => "redact",
    }
}

/// Detections by type, in the scanner's order.
fn count<'a>(scanner: &Scanner, hits: impl Iterator<Item = &'a Hit>) -> Vec<(Arc<str>, u32)> {
    let mut counts = vec![0u32; scanner.names.len()];
    for h in hits {
        counts[h.kind as usize] = counts[h.kind as usize].saturating_add(1);
    }
    counts
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (scanner.name(k as u16).clone(), *n))
        .collect()
}

/// The `block` answer: the types found, never the values.
fn refusal(what: &str, detections: &[(Arc<str>, u32)]) -> GatewayError {
    let types: Vec<&str> = detections.iter().map(|(k, _)| &**k).collect();
    GatewayError::SensitiveData {
        message: format!(
            "the {what} contains sensitive data ({}), which the data policy of this route does not let leave the gateway",
            types.join(", ")
        ),
    }
}

/// Replaces values by stable placeholders (`[CN_MOBILE_1]`): the same value
/// gets the same placeholder; placeholders the client's own text already
/// holds are not used, so restoring never touches what the client wrote.
struct Redactor<'s> {
    scanner: &'s Scanner,
    taken: HashSet<String>,
    numbers: Vec<u32>,
    by_value: HashMap<String, String>,
    restorer: Restorer,
}

impl<'s> Redactor<'s> {
    fn new(scanner: &'s Scanner, text: &str) -> Redactor<'s> {
        let mut taken = HashSet::new();
        restore::placeholders_in(text, &mut taken);
        Redactor::with_taken(scanner, taken)
    }

    fn with_taken(scanner: &'s Scanner, taken: HashSet<String>) -> Redactor<'s> {
        Redactor {
            scanner,
            taken,
            numbers: vec![0u32; scanner.names.len()],
            by_value: HashMap::new(),
            restorer: Restorer::default(),
        }
    }

    /// Replaces the `hits` of `s` (in order, not overlapping).
    fn redact(&mut self, s: &mut String, hits: &[Hit]) {
        let mut out = String::with_capacity(s.len());
        let mut at = 0;
        for h in hits {
            out.push_str(&s[at..h.start]);
            let value = &s[h.start..h.end];
            if !self.by_value.contains_key(value) {
                let label = &self.scanner.labels[h.kind as usize];
                let n = &mut self.numbers[h.kind as usize];
                let p = loop {
                    *n = n.saturating_add(1);
                    let p = format!("[{label}_{n}]");
                    if !self.taken.contains(&p) {
                        break p;
                    }
                };
                self.restorer.insert(p.clone(), value.to_owned());
                self.by_value.insert(value.to_owned(), p);
            }
            out.push_str(&self.by_value[value]);
            at = h.end;
        }
        out.push_str(&s[at..]);
        *s = out;
    }
}

/// Every scanned text of a chat request, in a fixed order.
fn visit_chat(req: &mut ChatRequest, f: &mut dyn FnMut(&mut String)) {
    for m in &mut req.messages {
        match &mut m.content {
            Some(Content::Text(t)) => f(t),
            Some(Content::Parts(parts)) => {
                for p in parts {
                    if let Part::Text(t) = p {
                        f(t);
                    }
                }
            }
            None => {}
        }
        if let Some(r) = &mut m.reasoning {
            f(r);
        }
        for c in &mut m.tool_calls {
            f(&mut c.arguments);
        }
    }
}

fn visit_embeddings(req: &mut EmbeddingsRequest, f: &mut dyn FnMut(&mut String)) {
    if let EmbeddingInput::Texts(texts) = &mut req.input {
        for t in texts {
            f(t);
        }
    }
}

/// Applies the request's data policy (its key's, else its route's, else the
/// gateway's) to `req`: `block` → 400 `sensitive_data`; `private` → the
/// context is made private; `redact` → values replaced by placeholders.
/// Detections are counted in `metrics` by type, route and action.
pub fn apply(
    ctx: &mut RequestContext,
    req: &mut ChatRequest,
    metrics: &GovMetrics,
) -> Result<Protection, GatewayError> {
    protect(ctx, metrics, |f| visit_chat(req, f), true)
}

/// Data protection of an embeddings request: `block` and `private` as for
/// chat; `redact` replaces values (an embedding has nothing to restore).
/// Token-array inputs are not scanned.
pub fn apply_embeddings(
    ctx: &mut RequestContext,
    req: &mut crate::canonical::EmbeddingsRequest,
    metrics: &GovMetrics,
) -> Result<Protection, GatewayError> {
    protect(ctx, metrics, |f| visit_embeddings(req, f), false)
}

fn protect(
    ctx: &mut RequestContext,
    metrics: &GovMetrics,
    mut visit: impl FnMut(&mut dyn FnMut(&mut String)),
    restorable: bool,
) -> Result<Protection, GatewayError> {
    let policy = policy(ctx);
    if policy == DataPolicy::Off || ctx.snapshot.protect.is_empty() {
        return Ok(Protection::default());
    }
    let snapshot = ctx.snapshot.clone();
    let scanner = &snapshot.protect;
    // Pass 1: the hits of each text (no allocation when there are none).
    let mut found: Vec<(usize, Vec<Hit>)> = Vec::new();
    let mut hits = Vec::new();
    let mut index = 0;
    visit(&mut |s: &mut String| {
        scanner.scan(s, &mut hits);
        if !hits.is_empty() {
            found.push((index, std::mem::take(&mut hits)));
        }
        index += 1;
    });
    if found.is_empty() {
        return Ok(Protection::default());
    }
    let detections = count(scanner, found.iter().flat_map(|(_, h)| h));
    let action = action_of(policy);
    for (kind, n) in &detections {
        metrics.detection(kind, &ctx.route().name, action, *n);
    }
    let mut protection = Protection {
        detections,
        action: Some(action),
        map: None,
    };
    match policy {
        DataPolicy::Block => {
            return Err(refusal("request", &protection.detections));
        }
        DataPolicy::Private => {
            ctx.private = true;
            return Ok(protection);
        }
        _ => {}
    }
    // Redact. Placeholders the client's own text already holds are not used,
    // so restoring never touches what the client wrote.
    let mut taken = HashSet::new();
    visit(&mut |s: &mut String| restore::placeholders_in(s, &mut taken));
    let mut redactor = Redactor::with_taken(scanner, taken);
    let mut next = found.iter().peekable();
    let mut index = 0;
    visit(&mut |s: &mut String| {
        let here = index;
        index += 1;
        if let Some((_, hits)) = next.next_if(|(i, _)| *i == here) {
            redactor.redact(s, hits);
        }
    });
    let restorer = redactor.restorer;
    if restorable {
        protection.map = Some(Arc::new(restorer));
    }
    Ok(protection)
}

impl Protection {
    /// Records the detections on the request's ticket (for the audit log).
    pub fn note(&self, ticket: &crate::governance::Ticket) {
        if self.detections.is_empty() {
            return;
        }
        ticket.note(|l| {
            l.detections = self.detections.clone();
            l.protect_action = self.action;
        });
    }

    /// Puts the redacted values back into the answer (a stream too, across
    /// chunk boundaries).
    pub fn restore(&self, outcome: ChatOutcome) -> ChatOutcome {
        let Some(map) = &self.map else {
            return outcome;
        };
        match outcome {
            ChatOutcome::Complete(mut resp) => {
                map.restore_response(&mut resp);
                ChatOutcome::Complete(resp)
            }
            ChatOutcome::Stream(s) => ChatOutcome::Stream(restore::restore_stream(map.clone(), s)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.detections.is_empty()
    }

    /// Adds what the render stage found in the request's retrieval queries
    /// (counted in metrics there already), for the audit log.
    pub fn absorb(&mut self, queries: &QueryFound) {
        for (kind, n) in &queries.detections {
            match self.detections.iter_mut().find(|(k, _)| k == kind) {
                Some((_, m)) => *m = m.saturating_add(*n),
                None => self.detections.push((kind.clone(), *n)),
            }
        }
        self.action = self.action.or(queries.action);
    }
}

impl QueryFound {
    /// Adds another query's findings to these (the request's queries together).
    pub fn merge(&mut self, other: QueryFound) {
        for (kind, n) in other.detections {
            match self.detections.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, m)) => *m = m.saturating_add(n),
                None => self.detections.push((kind, n)),
            }
        }
        self.action = self.action.or(other.action);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn scanner(custom: &[(&str, &str)]) -> Scanner {
        Scanner::build(&ProtectConfig {
            policy: DataPolicy::Redact,
            detectors: BUILTIN.iter().map(|s| (*s).to_owned()).collect(),
            custom: custom
                .iter()
                .map(|(n, p)| ((*n).to_owned(), (*p).to_owned()))
                .collect(),
        })
    }

    /// A snapshot from a gateway file (sandbox routes) and one keys file.
    fn snapshot(gateway: &str, keys: &str) -> Arc<crate::snapshot::Snapshot> {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("promptgate.yaml"), gateway).unwrap();
        for sub in ["providers", "keys"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(
            d.join("providers/sandbox.yaml"),
            "kind: sandbox\nsandbox:\n  models:\n    echo: {}\n",
        )
        .unwrap();
        std::fs::write(d.join("keys/team.yaml"), keys).unwrap();
        let cfg =
            crate::config::load(&d.join("promptgate.yaml")).unwrap_or_else(|p| panic!("{p:?}"));
        let book = crate::health::Book::default();
        Arc::new(
            crate::snapshot::Snapshot::build(cfg, &|_| None, &book)
                .unwrap_or_else(|p| panic!("{p:?}")),
        )
    }

    fn context(
        snap: &Arc<crate::snapshot::Snapshot>,
        route: &str,
        key: Option<&str>,
    ) -> RequestContext {
        let caller = key.map(|id| crate::governance::Caller {
            id: Arc::from(id),
            key: Arc::new(snap.config.keys[id].clone()),
        });
        let headers = http::HeaderMap::new();
        let placement = crate::pipeline::Placement::place(
            snap.route(route).unwrap(),
            &headers,
            None,
            caller.as_ref(),
        );
        RequestContext::new(
            "req".into(),
            crate::pipeline::ClientDialect::OpenAi,
            snap.clone(),
            placement,
            &headers,
            None,
            caller,
        )
    }

    fn request(text: &str) -> ChatRequest {
        let body = serde_json::json!({"model": "r", "messages": [
            {"role": "user", "content": text},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "lookup", "arguments": format!("{{\"q\":\"{text}\"}}")}}]},
        ]});
        crate::backend::openai::decode_chat_request(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn the_key_policy_wins_over_the_route_and_the_route_over_the_gateway() {
        let hash = "0".repeat(64);
        let snap = snapshot(
            "listen: 127.0.0.1:0\ndata_protection: {policy: redact}\nroutes:\n  plain: {provider: sandbox, model: echo}\n  strict: {provider: sandbox, model: echo, data: block}\n  open: {provider: sandbox, model: echo, data: off}\n",
            &format!("careful: {{sha256: \"{hash}\", data: private}}\nplain: {{sha256: \"{}\"}}\n", "1".repeat(64)),
        );
        let metrics = crate::metrics::Metrics::new().unwrap().gov;
        let text = "call 13800138000";
        let cases = [
            ("plain", None, DataPolicy::Redact),
            ("strict", None, DataPolicy::Block),
            ("open", None, DataPolicy::Off),
            ("strict", Some("careful"), DataPolicy::Private),
            ("open", Some("careful"), DataPolicy::Private),
            ("strict", Some("plain"), DataPolicy::Block),
        ];
        for (route, key, want) in cases {
            let mut ctx = context(&snap, route, key);
            assert_eq!(policy(&ctx), want, "{route} {key:?}");
            let mut req = request(text);
            let result = apply(&mut ctx, &mut req, &metrics);
            match want {
                DataPolicy::Off => {
                    let p = result.unwrap();
                    assert!(p.is_empty());
                    assert_eq!(req, request(text), "nothing changes");
                }
                DataPolicy::Block => {
                    let e = result.err().unwrap();
                    assert_eq!(e.code(), "sensitive_data");
                    assert!(!e.to_string().contains("13800138000"));
                }
                DataPolicy::Private => {
                    let p = result.unwrap();
                    assert!(ctx.private);
                    assert_eq!(p.action, Some("private"));
                    assert_eq!(req, request(text), "sent as is, to self-hosted targets");
                }
                DataPolicy::Redact => {
                    let p = result.unwrap();
                    assert!(!ctx.private);
                    assert_eq!(p.action, Some("redact"));
                    assert_eq!(p.detections, [(Arc::from("cn_mobile"), 2)]);
                    assert_eq!(
                        req,
                        request("call [CN_MOBILE_1]"),
                        "text and tool-call arguments"
                    );
                }
            }
        }
    }

    #[test]
    fn retrieval_queries_are_protected_under_each_policy() {
        let snap = snapshot(
            "listen: 127.0.0.1:0\ndata_protection: {policy: redact}\nroutes:\n  plain: {provider: sandbox, model: echo}\n",
            "{}\n",
        );
        let metrics = crate::metrics::Metrics::new().unwrap().gov;
        let route = snap.route("plain").map(|r| &**r);
        let query = "[CN_MOBILE_1] and 13800138000, again 13800138000";
        let run = |policy, q: &str| protect_query(&snap, policy, route, &metrics, q);
        let off = run(DataPolicy::Off, query).unwrap();
        assert!(off.detections.is_empty() && off.redacted.is_none());
        let clean = run(DataPolicy::Block, "refund policy").unwrap();
        assert!(clean.detections.is_empty() && clean.action.is_none());
        let e = run(DataPolicy::Block, query).err().unwrap();
        assert_eq!(e.code(), "sensitive_data");
        assert!(e
            .to_string()
            .contains("retrieval query contains sensitive data (cn_mobile)"));
        assert!(!e.to_string().contains("13800138000"));
        let private = run(DataPolicy::Private, query).unwrap();
        assert!(private.private());
        assert_eq!(private.detections, [(Arc::from("cn_mobile"), 2)]);
        assert!(
            private.redacted.is_none(),
            "searched as written, self-hosted"
        );
        let redacted = run(DataPolicy::Redact, query).unwrap();
        assert!(!redacted.private());
        // The placeholder the query already held is not reused.
        assert_eq!(
            redacted.redacted.as_deref(),
            Some("[CN_MOBILE_1] and [CN_MOBILE_2], again [CN_MOBILE_2]")
        );
        // What the queries found joins the request's own findings.
        let mut p = Protection::default();
        p.absorb(&redacted);
        assert_eq!(p.detections, [(Arc::from("cn_mobile"), 2)]);
        assert_eq!(p.action, Some("redact"));
    }

    #[test]
    fn custom_detectors_are_checked() {
        assert!(check_custom("employee_id", r"EMP-\d{6}").is_ok());
        assert!(check_custom("Employee", r"x").unwrap_err().contains("name"));
        assert!(check_custom("cn_id", r"x")
            .unwrap_err()
            .contains("built-in"));
        assert!(check_custom("e", r"(unclosed")
            .unwrap_err()
            .contains("invalid regular expression"));
        assert!(check_custom("e", r"\d*").unwrap_err().contains("empty"));
        assert!(check_custom("e", r"\w{1000}\w{1000}")
            .unwrap_err()
            .contains("too large"));
        assert!(check_custom("e", &"a".repeat(2000))
            .unwrap_err()
            .contains("at most"));
    }

    #[test]
    fn custom_hits_join_builtin_hits_and_lose_overlaps_to_them() {
        let s = scanner(&[("employee_id", r"EMP-\d{6}"), ("digits", r"\d{11}")]);
        let text = "EMP-123456 and 13800138000";
        let mut hits = Vec::new();
        s.scan(text, &mut hits);
        let named: Vec<(&str, &str)> = hits
            .iter()
            .map(|h| (&**s.name(h.kind), &text[h.start..h.end]))
            .collect();
        assert_eq!(
            named,
            [("employee_id", "EMP-123456"), ("cn_mobile", "13800138000")]
        );
    }
}
