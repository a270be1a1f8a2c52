//! The cache key and the decisions made before a lookup: which requests a
//! route's policy admits, what the client asked of the cache, and the tenant a
//! request belongs to. The key is a SHA-256 of a canonical JSON form of
//! everything that shapes the answer, computed after prompt rendering, so every
//! dialect and both streaming modes share entries.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::canonical::*;
use crate::config::{CacheMode, RouteCache};

pub type Key = [u8; 32];

/// What the client asked of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Normal,
    /// Do not read; store the fresh answer (`Cache-Control: no-cache`).
    Refresh,
    /// Neither read nor store (`Cache-Control: no-store`).
    Bypass,
}

impl Directive {
    pub fn from_headers(h: &http::HeaderMap) -> Directive {
        if let Some(v) = h.get("x-promptgate-cache").and_then(|v| v.to_str().ok()) {
            match v.trim().to_ascii_lowercase().as_str() {
                "refresh" | "no-cache" => return Directive::Refresh,
                "bypass" | "no-store" => return Directive::Bypass,
                _ => {}
            }
        }
        let cc = h
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|d| d.trim().to_ascii_lowercase())
            .collect::<Vec<_>>();
        if cc.iter().any(|d| d == "no-store") {
            Directive::Bypass
        } else if cc.iter().any(|d| d == "no-cache") {
            Directive::Refresh
        } else {
            Directive::Normal
        }
    }
}

/// Whether a route's policy lets this request use the cache.
pub fn eligible(policy: &RouteCache, req: &ChatRequest) -> bool {
    match policy.mode {
        CacheMode::Off => false,
        CacheMode::On => true,
        CacheMode::Deterministic => {
            req.params.temperature == Some(0.0) || req.params.seed.is_some()
        }
    }
}

fn content_json(c: &Content) -> Value {
    match c {
        Content::Text(t) => Value::String(t.clone()),
        Content::Parts(parts) => Value::Array(
            parts
                .iter()
                .map(|p| match p {
                    // A single text part means the same as plain text.
                    Part::Text(t) => json!({"text": t}),
                    Part::Image { url, detail } => json!({"image": url, "detail": detail}),
                    Part::Other(v) => v.clone(),
                })
                .collect(),
        ),
    }
}

fn normalized_content(c: &Content) -> Value {
    match c {
        Content::Parts(p) if p.len() == 1 && matches!(p[0], Part::Text(_)) => {
            Value::String(c.text().into_owned())
        }
        _ => content_json(c),
    }
}

fn nonzero(x: Option<f64>) -> Value {
    match x {
        Some(v) if v != 0.0 => json!(v),
        _ => Value::Null,
    }
}

/// The canonical form of everything that shapes the answer. Defaults are
/// normalized (absent = the API's default), order-insensitive parts are sorted
/// by the canonical writer, and fields that cannot change the output (`user`,
/// `stream`, `stream_options`) are left out.
pub fn canonical(
    route: &str,
    targets: &[&str],
    tenant: Option<&str>,
    prompt: Option<(&str, u32)>,
    req: &ChatRequest,
) -> Value {
    let p = &req.params;
    let messages: Vec<Value> = req
        .messages
        .iter()
        .map(|m| {
            json!({
                "role": match m.role { Role::Developer => "system", r => r.as_str() },
                "content": m.content.as_ref().map(normalized_content),
                "name": m.name,
                "tool_calls": m.tool_calls.iter().map(|t| json!([t.id, t.name, t.arguments])).collect::<Vec<_>>(),
                "tool_call_id": m.tool_call_id,
            })
        })
        .collect();
    let tools: Vec<Value> = req
        .tools
        .iter()
        .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters, "strict": t.strict}))
        .collect();
    let tool_choice = match (&req.tool_choice, req.tools.is_empty()) {
        (None | Some(ToolChoice::Auto), false) => Value::Null,
        (None | Some(ToolChoice::None), true) => Value::Null,
        (Some(ToolChoice::None), false) => json!("none"),
        (Some(ToolChoice::Auto), true) => Value::Null,
        (Some(ToolChoice::Required), _) => json!("required"),
        (Some(ToolChoice::Function(f)), _) => json!({"function": f}),
    };
    let response_format = match &req.response_format {
        None | Some(ResponseFormat::Text) => Value::Null,
        Some(ResponseFormat::JsonObject) => json!("json_object"),
        Some(ResponseFormat::JsonSchema(s)) => json!({"json_schema": s}),
    };
    json!({
        "v": 1,
        "route": route,
        "targets": targets,
        "tenant": tenant,
        "prompt": prompt.map(|(id, v)| json!([id, v])),
        "messages": messages,
        "temperature": p.temperature,
        "top_p": p.top_p.filter(|t| *t != 1.0),
        "max_output": p.output_limit(),
        "stop": p.stop,
        "seed": p.seed,
        "n": p.n.filter(|n| *n != 1),
        "presence_penalty": nonzero(p.presence_penalty),
        "frequency_penalty": nonzero(p.frequency_penalty),
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls.filter(|p| !*p),
        "response_format": response_format,
        "extra": Value::Object(req.extra.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect::<Map<_, _>>()),
    })
}

/// Writes JSON with object keys sorted and nulls dropped, so equal requests
/// give equal bytes whatever their field order.
fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| k)
                .collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                write_canonical(&m[k.as_str()], out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

pub fn key_of(canonical: &Value) -> Key {
    let mut buf = Vec::with_capacity(1024);
    write_canonical(canonical, &mut buf);
    Sha256::digest(&buf).into()
}

/// A short, stable tenant id from the client's credential (never the key itself).
pub fn tenant_of(h: &http::HeaderMap) -> Option<String> {
    let v = h
        .get(http::header::AUTHORIZATION)
        .or_else(|| h.get("x-api-key"))?
        .as_bytes();
    let d = Sha256::digest(v);
    Some(d[..8].iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(body: &str) -> ChatRequest {
        crate::backend::openai::decode_chat_request(body.as_bytes()).unwrap()
    }

    fn key(body: &str) -> Key {
        key_of(&canonical("r", &["p/m"], Some("t"), None, &req(body)))
    }

    const BASE: &str = r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0}"#;

    #[test]
    fn every_output_affecting_field_changes_the_key() {
        let base = key(BASE);
        let variants = [
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi!"}],"temperature":0}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:x"}}]}],"temperature":0}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0.5}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"top_p":0.5}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"max_tokens":5}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"stop":["x"]}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"seed":1}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"tools":[{"type":"function","function":{"name":"f"}}]}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required"}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"response_format":{"type":"json_object"}}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"reasoning_effort":"high"}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"thinking":{"type":"enabled"}}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"top_k":3}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"presence_penalty":0.5}"#,
        ];
        for v in variants {
            assert_ne!(key(v), base, "{v}");
        }
        let r = req(BASE);
        assert_ne!(
            key_of(&canonical("r", &["p/m"], Some("other"), None, &r)),
            base,
            "tenant"
        );
        assert_ne!(
            key_of(&canonical("r", &["p/x"], Some("t"), None, &r)),
            base,
            "target"
        );
        assert_ne!(
            key_of(&canonical("r", &["p/m"], Some("t"), Some(("p", 2)), &r)),
            base,
            "prompt version"
        );
    }

    #[test]
    fn order_defaults_and_non_output_fields_do_not() {
        let base = key(BASE);
        for same in [
            r#"{"temperature":0,"messages":[{"content":"s","role":"system"},{"content":"hi","role":"user"}],"model":"r"}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"temperature":0,"top_p":1,"n":1,"presence_penalty":0}"#,
            r#"{"model":"r","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"user":"u1","stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"r","messages":[{"role":"developer","content":"s"},{"role":"user","content":"hi"}],"temperature":0,"response_format":{"type":"text"}}"#,
        ] {
            assert_eq!(key(same), base, "{same}");
        }
        let a = key(
            r#"{"model":"r","messages":[{"role":"user","content":"hi"}],"temperature":0,"vendor":{"a":1,"b":2}}"#,
        );
        let b = key(
            r#"{"model":"r","messages":[{"role":"user","content":"hi"}],"temperature":0,"vendor":{"b":2,"a":1}}"#,
        );
        assert_eq!(a, b, "nested field order");
    }

    #[test]
    fn directives_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(Directive::from_headers(&h), Directive::Normal);
        h.insert("cache-control", "max-age=0, no-cache".parse().unwrap());
        assert_eq!(Directive::from_headers(&h), Directive::Refresh);
        h.insert("cache-control", "no-store".parse().unwrap());
        assert_eq!(Directive::from_headers(&h), Directive::Bypass);
        h.remove("cache-control");
        h.insert("x-promptgate-cache", "refresh".parse().unwrap());
        assert_eq!(Directive::from_headers(&h), Directive::Refresh);
    }
}
