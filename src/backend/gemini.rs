//! The Google Gemini API wire format (`generateContent`,
//! `streamGenerateContent?alt=sse`, `batchEmbedContents`), backend direction only.
//! Wire structs are private to this module; the codec in `provider::gemini` sees
//! canonical types and the functions below.
//!
//! Translation notes:
//! - `system`/`developer` messages are concatenated into `systemInstruction`;
//!   `assistant` is `model`; tool results are `functionResponse` parts in a `user`
//!   turn, named after the assistant tool call with the same id earlier in the
//!   transcript. Adjacent turns of the same role are merged.
//! - Tool-call arguments are objects on the wire and JSON strings in canonical
//!   types. Every call reaches the client under an id the gateway mints,
//!   `call_<32 hex>` (128 random bits, so ids cannot be guessed): Gemini may omit
//!   ids, and the ids it does give are neither random nor always portable. What
//!   the client's id cannot carry stays in the gateway, in a bounded in-process
//!   map ([`signatures`]) keyed by the minted id: the call's `thoughtSignature`
//!   (Gemini 3 rejects replayed calls without it; hundreds of base64 characters)
//!   and Gemini's own id, which is sent back as `functionCall.id` and
//!   `functionResponse.id` when the call is replayed. Replayed calls whose
//!   signature is unknown (history from another backend or another gateway
//!   process, or evicted) get Google's documented bypass value on Gemini ≥ 3
//!   models and no id. Ids of the older form `<id>~ts~<signature>` are still read.
//! - Tool and response schemas are cut down to the OpenAPI subset Gemini accepts
//!   (see [`gemini_schema`]).
//! - Streamed `usageMetadata` is a running total: only the last one is emitted, once,
//!   when every candidate has finished.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{Codec, HttpCall, Kind, Sectionless, StreamDecoder};
use crate::backend::common::{
    body_excerpt, close_stream, join_system, malformed, malformed_json, new_completion_id,
    new_wide_call_id, open_stream, push_delta, push_turn, reported_usage, stream_meta,
};
use crate::canonical::*;
use crate::config::Capabilities;
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::Frame;

/// Separates our call id from the Gemini thought signature it carries.
pub const SIGNATURE_MARK: &str = "~ts~";

/// The value Google documents for replayed function calls that have no real
/// thought signature (history from another model, or from a client that dropped it).
const SKIP_SIGNATURE: &str = "skip_thought_signature_validator";

/// What the gateway keeps of the function calls it handed to clients, by the
/// call id the client saw: the call's thought signature and the id Gemini gave
/// the call, if any.
///
/// Only ids the gateway minted itself (`call_<32 hex>`, 128 random bits) are
/// keys: ids Gemini assigns are not random and could repeat across tenants, so a
/// call that comes with a Gemini id or a signature is always shown to the client
/// under a fresh random id, and Gemini's id is restored when the call is
/// replayed. One tenant cannot name another's entry without its id.
///
/// Bounded by entries and bytes, oldest first out; a signature that is gone is
/// replaced by the documented bypass value, which costs the model its saved
/// reasoning, never the request. One map per process, shared by every Gemini
/// provider and every config snapshot, so an entry survives a reload.
pub mod signatures {
    use std::collections::{HashMap, VecDeque};
    use std::sync::{Arc, Mutex, PoisonError};

    /// At most this many calls are kept.
    pub const MAX_ENTRIES: usize = 65_536;
    /// At most this many bytes of ids and signatures are kept.
    pub const MAX_BYTES: usize = 64 << 20;
    /// A longer signature is not kept (Gemini's are a few kilobytes at most).
    pub const MAX_SIGNATURE: usize = 64 << 10;
    /// A longer Gemini call id is not kept.
    pub const MAX_UPSTREAM_ID: usize = 1024;

    /// What is known of one call.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Call {
        pub signature: Option<Arc<str>>,
        /// The id Gemini gave the call, sent back with the replayed call and its
        /// function response.
        pub gemini_id: Option<Arc<str>>,
    }

    impl Call {
        fn cost(&self) -> usize {
            self.signature.as_deref().map_or(0, str::len)
                + self.gemini_id.as_deref().map_or(0, str::len)
        }
    }

    #[derive(Default)]
    struct Book {
        map: HashMap<Arc<str>, Call>,
        order: VecDeque<Arc<str>>,
        bytes: usize,
    }

    static BOOK: Mutex<Option<Book>> = Mutex::new(None);

    /// Remembers what is worth keeping of a call shown to the client as `id`
    /// (an id the gateway minted). Oversized parts are dropped.
    pub fn remember(id: &str, signature: Option<&str>, gemini_id: Option<&str>) {
        let call = Call {
            signature: signature
                .filter(|s| !s.is_empty() && s.len() <= MAX_SIGNATURE)
                .map(Arc::from),
            gemini_id: gemini_id
                .filter(|s| !s.is_empty() && s.len() <= MAX_UPSTREAM_ID)
                .map(Arc::from),
        };
        if call == Call::default() {
            return;
        }
        let mut guard = BOOK.lock().unwrap_or_else(PoisonError::into_inner);
        let book = guard.get_or_insert_with(Book::default);
        let id: Arc<str> = Arc::from(id);
        let cost = id.len() + call.cost();
        if let Some(old) = book.map.insert(Arc::clone(&id), call) {
            book.bytes = book.bytes.saturating_sub(id.len() + old.cost());
        } else {
            book.order.push_back(id);
        }
        book.bytes = book.bytes.saturating_add(cost);
        while book.map.len() > MAX_ENTRIES || book.bytes > MAX_BYTES {
            let Some(oldest) = book.order.pop_front() else {
                break;
            };
            if let Some(old) = book.map.remove(&oldest) {
                book.bytes = book.bytes.saturating_sub(oldest.len() + old.cost());
            }
        }
    }

    /// What is remembered of the call the client knows as `id`.
    pub fn recall(id: &str) -> Option<Call> {
        let guard = BOOK.lock().unwrap_or_else(PoisonError::into_inner);
        guard.as_ref()?.map.get(id).cloned()
    }

    #[cfg(test)]
    pub(crate) fn len() -> usize {
        let guard = BOOK.lock().unwrap_or_else(PoisonError::into_inner);
        guard.as_ref().map_or(0, |b| b.map.len())
    }
}

/// Splits an id we handed out into (id, thought signature).
fn split_call_id(id: &str) -> (&str, Option<&str>) {
    match id.split_once(SIGNATURE_MARK) {
        Some((base, sig)) if !sig.is_empty() => (base, Some(sig)),
        _ => (id, None),
    }
}

/// The resource path of a model: `models/<name>` unless the name already has a
/// collection (`models/…`, `tunedModels/…`).
pub fn model_resource(model: &str) -> Cow<'_, str> {
    if model.contains('/') {
        Cow::Borrowed(model)
    } else {
        Cow::Owned(format!("models/{model}"))
    }
}

/// Gemini 3 and later validate thought signatures on replayed function calls.
fn validates_signatures(model: &str) -> bool {
    let name = model.rsplit('/').next().unwrap_or(model);
    let Some(rest) = name.strip_prefix("gemini-") else {
        return false;
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse::<u32>().is_ok_and(|major| major >= 3)
}

// === encoding a request ===

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutBlob<'a> {
    mime_type: Cow<'a, str>,
    data: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutFile<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    mime_type: Option<&'static str>,
    file_uri: &'a str,
}

#[derive(Serialize)]
struct OutFunctionCall<'a> {
    /// The id Gemini gave the call, when it gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    name: &'a str,
    args: Value,
}

#[derive(Serialize)]
struct OutFunctionResponse<'a> {
    /// The id of the call answered, when Gemini gave the call one.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    name: &'a str,
    response: Value,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct OutPart<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inline_data: Option<OutBlob<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_data: Option<OutFile<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_call: Option<OutFunctionCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_response: Option<OutFunctionResponse<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thought_signature: Option<Cow<'a, str>>,
}

impl<'a> OutPart<'a> {
    fn text(t: Cow<'a, str>) -> Self {
        OutPart {
            text: Some(t),
            ..OutPart::default()
        }
    }
}

#[derive(Serialize)]
struct OutContent<'a> {
    role: &'static str,
    parts: Vec<OutPart<'a>>,
}

#[derive(Serialize)]
struct OutSystem<'a> {
    parts: [OutPart<'a>; 1],
}

#[derive(Serialize)]
struct OutFunctionDecl<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
}

/// Gemini groups declarations under one tool (`functionDeclarations`), and its
/// parameters are a schema subset; not the OpenAI shape of [`crate::backend::common::OutTool`].
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutTool<'a> {
    function_declarations: Vec<OutFunctionDecl<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutRequest<'a> {
    contents: Vec<OutContent<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<OutSystem<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<Value>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    generation_config: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    safety_settings: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cached_content: Option<&'a Value>,
}

/// `data:<mime>;base64,<data>` → (mime, data).
fn parse_data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let mime = meta.strip_suffix(";base64")?;
    Some((
        if mime.is_empty() {
            "application/octet-stream"
        } else {
            mime
        },
        data,
    ))
}

/// A MIME type for a file URI by its extension, when it is an obvious one.
fn guess_mime(uri: &str) -> Option<&'static str> {
    let path = uri.split(['?', '#']).next().unwrap_or(uri);
    let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "heic" => "image/heic",
        "pdf" => "application/pdf",
        "mp3" => "audio/mp3",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        _ => return None,
    })
}

fn media_part(url: &str) -> OutPart<'_> {
    match parse_data_url(url) {
        Some((mime, data)) => OutPart {
            inline_data: Some(OutBlob {
                mime_type: Cow::Borrowed(mime),
                data,
            }),
            ..OutPart::default()
        },
        None => OutPart {
            file_data: Some(OutFile {
                mime_type: guess_mime(url),
                file_uri: url,
            }),
            ..OutPart::default()
        },
    }
}

/// Content parts the gateway does not model: audio and inline files become
/// `inlineData`; anything else has no Gemini equivalent and is left out.
fn other_part(v: &Value) -> Option<OutPart<'_>> {
    match v.get("type").and_then(Value::as_str)? {
        "input_audio" => {
            let a = v.get("input_audio")?;
            let data = a.get("data")?.as_str()?;
            let format = a.get("format").and_then(Value::as_str).unwrap_or("wav");
            Some(OutPart {
                inline_data: Some(OutBlob {
                    mime_type: Cow::Owned(format!("audio/{format}")),
                    data,
                }),
                ..OutPart::default()
            })
        }
        "file" => {
            let url = v.get("file")?.get("file_data")?.as_str()?;
            parse_data_url(url)?;
            Some(media_part(url))
        }
        _ => None,
    }
}

fn content_parts<'a>(c: &'a Content, out: &mut Vec<OutPart<'a>>) {
    match c {
        Content::Text(t) => {
            if !t.is_empty() {
                out.push(OutPart::text(Cow::Borrowed(t)));
            }
        }
        Content::Parts(parts) => {
            for p in parts {
                match p {
                    Part::Text(t) => out.push(OutPart::text(Cow::Borrowed(t))),
                    Part::Image { url, .. } => out.push(media_part(url)),
                    Part::Other(v) => out.extend(other_part(v)),
                }
            }
        }
    }
}

/// Tool-call arguments (JSON text) as the object Gemini wants.
fn args_object(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return Value::Object(Map::new());
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        Ok(other) => json!({ "arguments": other }),
        Err(_) => json!({ "arguments": arguments }),
    }
}

/// A tool result as the `response` object of a `functionResponse`.
fn response_object(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => v,
        Ok(other) => json!({ "result": other }),
        Err(_) => json!({ "result": text }),
    }
}

/// Schema keywords Gemini's `Schema` (an OpenAPI 3.0 subset) accepts.
const SCHEMA_KEYS: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "propertyOrdering",
    "default",
    "minimum",
    "maximum",
];

/// Cuts a JSON Schema down to what Gemini's `parameters`/`responseSchema` accept:
/// unknown keywords (`additionalProperties`, `$schema`, `$ref`, `const`, …) are
/// dropped or rewritten (`const` → one-value `enum`, `oneOf` → `anyOf`, a type list
/// with `"null"` → `nullable`), recursively through `properties`, `items`, `anyOf`.
pub fn gemini_schema(v: &Value) -> Value {
    let Value::Object(o) = v else {
        return v.clone();
    };
    let mut out = Map::new();
    for (k, val) in o {
        match k.as_str() {
            "properties" => {
                if let Value::Object(props) = val {
                    let props = props
                        .iter()
                        .map(|(name, s)| (name.clone(), gemini_schema(s)))
                        .collect();
                    out.insert(k.clone(), Value::Object(props));
                }
            }
            "items" => {
                out.insert(k.clone(), gemini_schema(val));
            }
            "anyOf" | "oneOf" => {
                if let Value::Array(alts) = val {
                    out.insert(
                        "anyOf".into(),
                        Value::Array(alts.iter().map(gemini_schema).collect()),
                    );
                }
            }
            "const" => {
                out.entry("enum")
                    .or_insert_with(|| Value::Array(vec![val.clone()]));
            }
            "type" => match val {
                Value::Array(types) => {
                    let real: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
                    if real.len() < types.len() {
                        out.insert("nullable".into(), Value::Bool(true));
                    }
                    match real.as_slice() {
                        [] => {}
                        [one] => {
                            out.insert("type".into(), (*one).clone());
                        }
                        many => {
                            out.insert(
                                "anyOf".into(),
                                Value::Array(many.iter().map(|t| json!({ "type": t })).collect()),
                            );
                        }
                    }
                }
                other => {
                    out.insert(k.clone(), other.clone());
                }
            },
            key if SCHEMA_KEYS.contains(&key) => {
                out.insert(k.clone(), val.clone());
            }
            _ => {}
        }
    }
    Value::Object(out)
}

/// Function parameters for Gemini. An object schema without properties is left
/// out (Gemini rejects `properties: {}` on an OBJECT).
fn tool_parameters(p: Option<&Value>) -> Option<Value> {
    let s = gemini_schema(p?);
    let empty_object = s.get("type").and_then(Value::as_str) == Some("object")
        && s.get("properties")
            .and_then(Value::as_object)
            .is_none_or(Map::is_empty);
    (!empty_object && s.as_object().is_some_and(|o| !o.is_empty())).then_some(s)
}

/// `toolConfig`, only beside tool declarations (it means nothing without them).
fn tool_config(req: &ChatRequest) -> Option<Value> {
    if req.tools.is_empty() {
        return None;
    }
    let mode = match req.tool_choice.as_ref()? {
        ToolChoice::None => json!({"mode": "NONE"}),
        ToolChoice::Auto => json!({"mode": "AUTO"}),
        ToolChoice::Required => json!({"mode": "ANY"}),
        ToolChoice::Function(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
    };
    Some(json!({ "functionCallingConfig": mode }))
}

/// The first of `keys` present in `extra`.
fn extra_field<'a>(extra: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| extra.get(*k))
}

fn generation_config(req: &ChatRequest) -> Map<String, Value> {
    let p = &req.params;
    let mut g = Map::new();
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            g.insert(k.to_owned(), v);
        }
    };
    set(
        "temperature",
        p.temperature.map(|t| json!(t.clamp(0.0, 2.0))),
    );
    set("topP", p.top_p.map(|t| json!(t.clamp(0.0, 1.0))));
    set("topK", extra_field(&req.extra, &["top_k", "topK"]).cloned());
    set("maxOutputTokens", p.output_limit().map(|n| json!(n)));
    set("stopSequences", (!p.stop.is_empty()).then(|| json!(p.stop)));
    set("seed", p.seed.map(|s| json!(s)));
    set("candidateCount", p.n.filter(|n| *n != 1).map(|n| json!(n)));
    match &req.response_format {
        Some(ResponseFormat::JsonObject) => {
            set("responseMimeType", Some(json!("application/json")));
        }
        Some(ResponseFormat::JsonSchema(spec)) => {
            set("responseMimeType", Some(json!("application/json")));
            // OpenAI's `json_schema` is {name, schema, strict}; a bare schema also works.
            let schema = spec.get("schema").unwrap_or(spec);
            if schema.is_object() {
                set("responseSchema", Some(gemini_schema(schema)));
            }
        }
        Some(ResponseFormat::Text) | None => {}
    }
    set(
        "thinkingConfig",
        extra_field(&req.extra, &["thinking_config", "thinkingConfig"]).cloned(),
    );
    g
}

/// Encodes a canonical chat request as a `generateContent` body for `model`.
pub fn encode_chat_request(req: &ChatRequest, model: &str) -> Vec<u8> {
    let mut system = String::new();
    let mut turns: Vec<(&'static str, Vec<OutPart<'_>>)> = Vec::with_capacity(req.messages.len());
    // Tool call id → function name, for the `functionResponse` of a tool result.
    let mut call_names: HashMap<&str, &str> = HashMap::new();
    let sign_calls = validates_signatures(model);

    for m in &req.messages {
        let (role, parts) = match m.role {
            Role::System | Role::Developer => {
                join_system(&mut system, m.content.as_ref(), str::is_empty);
                continue;
            }
            Role::User => {
                let mut parts = Vec::new();
                if let Some(c) = &m.content {
                    content_parts(c, &mut parts);
                }
                ("user", parts)
            }
            Role::Assistant => {
                let mut parts = Vec::new();
                if let Some(c) = &m.content {
                    let t = c.text();
                    if !t.is_empty() {
                        parts.push(OutPart::text(t));
                    }
                }
                let mut signed = false;
                let first_call = parts.len();
                for call in &m.tool_calls {
                    let (signature, gemini_id) = match split_call_id(&call.id) {
                        (_, Some(sig)) => (Some(Cow::Borrowed(sig)), None),
                        (id, None) => match signatures::recall(id) {
                            Some(known) => (
                                known.signature.map(|s| Cow::Owned(s.to_string())),
                                known.gemini_id.map(|g| g.to_string()),
                            ),
                            None => (None, None),
                        },
                    };
                    signed |= signature.is_some();
                    call_names.insert(call.id.as_str(), call.name.as_str());
                    parts.push(OutPart {
                        function_call: Some(OutFunctionCall {
                            id: gemini_id,
                            name: &call.name,
                            args: args_object(&call.arguments),
                        }),
                        thought_signature: signature,
                        ..OutPart::default()
                    });
                }
                if sign_calls && !signed && !m.tool_calls.is_empty() {
                    parts[first_call].thought_signature = Some(Cow::Borrowed(SKIP_SIGNATURE));
                }
                ("model", parts)
            }
            Role::Tool => {
                let name = m
                    .tool_call_id
                    .as_deref()
                    .and_then(|id| call_names.get(id).copied())
                    .or(m.name.as_deref())
                    .unwrap_or("unknown");
                let text = m.content.as_ref().map(Content::text).unwrap_or_default();
                let id = m
                    .tool_call_id
                    .as_deref()
                    .and_then(signatures::recall)
                    .and_then(|c| c.gemini_id)
                    .map(|g| g.to_string());
                let part = OutPart {
                    function_response: Some(OutFunctionResponse {
                        id,
                        name,
                        response: response_object(&text),
                    }),
                    ..OutPart::default()
                };
                ("user", vec![part])
            }
        };
        push_turn(&mut turns, role, parts);
    }

    let declarations: Vec<OutFunctionDecl<'_>> = req
        .tools
        .iter()
        .map(|t| OutFunctionDecl {
            name: &t.name,
            description: t.description.as_deref(),
            parameters: tool_parameters(t.parameters.as_ref()),
        })
        .collect();
    let out = OutRequest {
        contents: turns
            .into_iter()
            .map(|(role, parts)| OutContent { role, parts })
            .collect(),
        system_instruction: (!system.is_empty()).then(|| OutSystem {
            parts: [OutPart::text(Cow::Owned(system))],
        }),
        tools: if declarations.is_empty() {
            Vec::new()
        } else {
            vec![OutTool {
                function_declarations: declarations,
            }]
        },
        tool_config: tool_config(req),
        generation_config: generation_config(req),
        safety_settings: extra_field(&req.extra, &["safety_settings", "safetySettings"]),
        cached_content: extra_field(&req.extra, &["cached_content", "cachedContent"]),
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

// === decoding a response ===

#[derive(Deserialize)]
struct InFunctionCall {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InPart {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: Option<bool>,
    #[serde(default)]
    function_call: Option<InFunctionCall>,
    #[serde(default)]
    thought_signature: Option<String>,
}

#[derive(Deserialize)]
struct InContent {
    #[serde(default)]
    parts: Vec<InPart>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InCandidate {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    content: Option<InContent>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InPromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
    #[serde(default)]
    block_reason_message: Option<String>,
}

/// Gemini's `usageMetadata` (camelCase counts, thoughts counted apart from the
/// candidates), so not the OpenAI-shaped [`crate::backend::common::InUsage`].
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InUsage {
    #[serde(default)]
    prompt_token_count: u32,
    #[serde(default)]
    candidates_token_count: u32,
    #[serde(default)]
    thoughts_token_count: Option<u32>,
    #[serde(default)]
    total_token_count: Option<u32>,
    #[serde(default)]
    cached_content_token_count: Option<u32>,
}

impl InUsage {
    fn canonical(&self) -> Usage {
        let completion = self
            .candidates_token_count
            .saturating_add(self.thoughts_token_count.unwrap_or(0));
        reported_usage(
            self.prompt_token_count,
            completion,
            self.total_token_count,
            self.cached_content_token_count,
            self.thoughts_token_count,
        )
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InResponse {
    #[serde(default)]
    candidates: Vec<InCandidate>,
    #[serde(default)]
    prompt_feedback: Option<InPromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<InUsage>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    response_id: Option<String>,
    #[serde(default)]
    error: Option<Value>,
}

/// Maps a Gemini `finishReason` onto the canonical set (providers.md §11.2).
pub fn finish_reason_from_wire(s: &str) -> FinishReason {
    match s {
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" => {
            FinishReason::ContentFilter
        }
        s if s.starts_with("IMAGE_") => FinishReason::ContentFilter,
        "MALFORMED_FUNCTION_CALL" | "UNEXPECTED_TOOL_CALL" | "TOO_MANY_TOOL_CALLS" => {
            FinishReason::Error
        }
        // STOP, OTHER, LANGUAGE, NO_IMAGE, FINISH_REASON_UNSPECIFIED
        _ => FinishReason::Stop,
    }
}

fn finish(reason: &str, has_calls: bool) -> FinishReason {
    match finish_reason_from_wire(reason) {
        FinishReason::Stop if has_calls => FinishReason::ToolCalls,
        f => f,
    }
}

/// A decoded function call as the client sees it: always under an id the
/// gateway minted (Gemini's own ids are neither random nor always portable);
/// Gemini's id and the thought signature stay in [`signatures`] under it.
fn tool_call(f: InFunctionCall, signature: Option<&str>) -> ToolCall {
    // 128 bits: the id keys the signature store, so it must not collide.
    let id = new_wide_call_id();
    signatures::remember(&id, signature, f.id.as_deref());
    ToolCall {
        id,
        name: f.name.unwrap_or_default(),
        arguments: match f.args {
            Some(v @ Value::Object(_)) => v.to_string(),
            None | Some(Value::Null) => "{}".to_owned(),
            Some(other) => other.to_string(),
        },
    }
}

/// A prompt blocked before generation: 200, `promptFeedback.blockReason`, no candidates.
fn blocked(feedback: Option<&InPromptFeedback>) -> Option<UpstreamError> {
    let f = feedback?;
    let reason = f.block_reason.as_deref()?;
    let mut message = format!("Gemini blocked the prompt ({reason})");
    if let Some(m) = f.block_reason_message.as_deref().filter(|m| !m.is_empty()) {
        message.push_str(": ");
        message.push_str(m);
    }
    Some(UpstreamError::new(ErrorKind::ContentFilter, message))
}

/// What a generation answer that fails to parse is said not to be.
const GENERATION: &str = "a Gemini GenerateContentResponse";

/// Decodes a `generateContent` body (HTTP 2xx).
pub fn decode_chat_response(body: &[u8]) -> Result<ChatResponse, UpstreamError> {
    let r: InResponse =
        serde_json::from_slice(body).map_err(|e| malformed_json("a body", GENERATION, &e))?;
    if let Some(err) = &r.error {
        return Err(classify_error_value(200, err));
    }
    if r.candidates.is_empty() {
        return Err(blocked(r.prompt_feedback.as_ref())
            .unwrap_or_else(|| malformed("Gemini response has no candidates")));
    }
    let choices = r
        .candidates
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut text: Option<String> = None;
            let mut reasoning: Option<String> = None;
            let mut tool_calls = Vec::new();
            for p in c.content.map(|c| c.parts).unwrap_or_default() {
                if let Some(f) = p.function_call {
                    tool_calls.push(tool_call(f, p.thought_signature.as_deref()));
                } else if let Some(t) = p.text {
                    let slot = if p.thought == Some(true) {
                        &mut reasoning
                    } else {
                        &mut text
                    };
                    slot.get_or_insert_with(String::new).push_str(&t);
                }
            }
            let finish_reason = c
                .finish_reason
                .as_deref()
                .map(|f| finish(f, !tool_calls.is_empty()));
            Choice {
                index: c.index.unwrap_or(i as u32),
                message: Message {
                    role: Role::Assistant,
                    content: text.map(Content::Text),
                    name: None,
                    tool_calls,
                    tool_call_id: None,
                    reasoning,
                },
                finish_reason,
            }
        })
        .collect();
    Ok(ChatResponse {
        id: r.response_id.unwrap_or_else(new_completion_id),
        created: unix_now(),
        model: r.model_version.unwrap_or_default(),
        choices,
        usage: r.usage_metadata.as_ref().map(InUsage::canonical),
        system_fingerprint: None,
    })
}

// --- streams ---

#[derive(Debug, Default, Clone, Copy)]
struct CandidateState {
    started: bool,
    tool_calls: u32,
    finished: bool,
}

/// State of one `streamGenerateContent?alt=sse` stream. Each SSE `data:` is a partial
/// GenerateContentResponse; the stream is complete once every candidate that
/// appeared has a `finishReason` (there is no `[DONE]`).
#[derive(Debug, Default)]
pub struct EventDecoder {
    started: bool,
    done: bool,
    candidates: Vec<CandidateState>,
    /// The latest running total of `usageMetadata`.
    usage: Option<Usage>,
}

impl EventDecoder {
    pub fn decode(&mut self, data: &str, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        let data = data.trim();
        if data.is_empty() || self.done {
            return Ok(());
        }
        let r: InResponse = serde_json::from_str(data)
            .map_err(|e| malformed_json("a stream event", GENERATION, &e))?;
        if let Some(err) = &r.error {
            return Err(classify_error_value(200, err));
        }
        if r.candidates.is_empty() {
            if let Some(e) = blocked(r.prompt_feedback.as_ref()) {
                return Err(e);
            }
        }
        open_stream(&mut self.started, out, || {
            stream_meta(
                r.response_id.unwrap_or_else(new_completion_id),
                None,
                r.model_version,
            )
        });
        if let Some(u) = &r.usage_metadata {
            self.usage = Some(u.canonical());
        }
        for (i, c) in r.candidates.into_iter().enumerate() {
            let index = super::choice_index(c.index.unwrap_or(i as u32))?;
            let slot = index as usize;
            if self.candidates.len() <= slot {
                self.candidates.resize(slot + 1, CandidateState::default());
            }
            let state = &mut self.candidates[slot];
            let mut delta = Delta {
                choice: index,
                ..Delta::default()
            };
            for p in c.content.map(|c| c.parts).unwrap_or_default() {
                if let Some(f) = p.function_call {
                    // Gemini sends each call whole: one fragment with id, name, arguments.
                    let call = tool_call(f, p.thought_signature.as_deref());
                    delta.tool_calls.push(ToolCallDelta {
                        index: state.tool_calls,
                        id: Some(call.id),
                        name: Some(call.name),
                        arguments: Some(call.arguments),
                    });
                    state.tool_calls += 1;
                } else if let Some(t) = p.text.filter(|t| !t.is_empty()) {
                    let slot = if p.thought == Some(true) {
                        &mut delta.reasoning
                    } else {
                        &mut delta.content
                    };
                    match slot {
                        Some(s) => s.push_str(&t),
                        None => *slot = Some(t),
                    }
                }
            }
            if let Some(f) = c.finish_reason.as_deref().filter(|f| !f.is_empty()) {
                delta.finish_reason = Some(finish(f, state.tool_calls > 0));
                state.finished = true;
            }
            push_delta(&mut state.started, delta, out);
        }
        let seen = self.candidates.iter().filter(|c| c.started);
        if self.candidates.iter().any(|c| c.finished) && seen.clone().all(|c| c.finished) {
            self.done = true;
            close_stream(self.usage.take(), out);
        }
        Ok(())
    }
}

impl StreamDecoder for EventDecoder {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        let (_, data) = super::event_and_data(&frame);
        self.decode(data, out)
    }

    /// True once every candidate has finished.
    fn finished(&self) -> bool {
        self.done
    }
}

// --- errors ---

/// `"37s"` / `"1.5s"` (a protobuf Duration in JSON) → Duration, at most
/// [`MAX_RETRY_AFTER`](crate::error::MAX_RETRY_AFTER) (a larger one, up to
/// `1e300s`, would overflow a `Duration`).
fn parse_delay(s: &str) -> Option<std::time::Duration> {
    let secs: f64 = s.trim().strip_suffix('s')?.parse().ok()?;
    if !(secs.is_finite() && secs >= 0.0) {
        return None;
    }
    std::time::Duration::try_from_secs_f64(secs.min(crate::error::MAX_RETRY_AFTER.as_secs_f64()))
        .ok()
}

/// Classifies a Google API error object (`{"code","message","status","details"}`)
/// that came with HTTP `status` (200 for an error inside a stream).
pub fn classify_error_value(status: u16, err: &Value) -> UpstreamError {
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| match err {
            Value::String(s) => s.clone(),
            _ => String::new(),
        });
    let word = err.get("status").and_then(Value::as_str).unwrap_or("");
    let code = err
        .get("code")
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok());
    let details = err.get("details").and_then(Value::as_array);
    let reasons = details
        .into_iter()
        .flatten()
        .filter_map(|d| d.get("reason").and_then(Value::as_str));
    let mut kind = match word {
        "INVALID_ARGUMENT"
        | "FAILED_PRECONDITION"
        | "NOT_FOUND"
        | "OUT_OF_RANGE"
        | "ALREADY_EXISTS" => ErrorKind::BadRequest,
        "PERMISSION_DENIED" | "UNAUTHENTICATED" => ErrorKind::Auth,
        "RESOURCE_EXHAUSTED" => ErrorKind::RateLimited,
        "INTERNAL" | "UNAVAILABLE" | "UNKNOWN" | "ABORTED" | "CANCELLED" => ErrorKind::Overloaded,
        "DEADLINE_EXCEEDED" => ErrorKind::Timeout,
        _ => {
            let s = if status == 200 {
                code.filter(|c| (400..600).contains(c)).unwrap_or(500)
            } else {
                status
            };
            ErrorKind::from_status(s)
        }
    };
    let lower = message.to_ascii_lowercase();
    if reasons.clone().any(|r| {
        matches!(
            r,
            "API_KEY_INVALID" | "API_KEY_EXPIRED" | "API_KEY_SERVICE_BLOCKED"
        )
    }) {
        kind = ErrorKind::Auth;
    } else if lower.contains("exceeds the maximum number of tokens")
        || (lower.contains("token count") && lower.contains("exceed"))
        || lower.contains("context window")
    {
        kind = ErrorKind::ContextLength;
    }
    let mut e = UpstreamError::from_backend(kind, message, status);
    // Rate-limit answers carry a google.rpc.RetryInfo with `retryDelay`.
    e.retry_after = details
        .into_iter()
        .flatten()
        .filter_map(|d| d.get("retryDelay").and_then(Value::as_str))
        .find_map(parse_delay);
    e
}

/// Classifies a non-2xx answer from its status and body.
pub fn classify_error_body(status: u16, body: &[u8]) -> UpstreamError {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    // `streamGenerateContent` without `alt=sse` wraps errors in a JSON array.
    let obj = match parsed {
        Some(Value::Array(mut a)) if !a.is_empty() => Some(a.swap_remove(0)),
        other => other,
    };
    match obj.as_ref().and_then(|o| o.get("error")) {
        Some(err) => classify_error_value(status, err),
        None => {
            let mut e = classify_error_value(status, &Value::String(body_excerpt(body)));
            if e.message.trim().is_empty() {
                e.message = format!("backend answered HTTP {status}");
            }
            e
        }
    }
}

// === embeddings ===

#[derive(Serialize)]
struct OutTextPart<'a> {
    text: &'a str,
}

#[derive(Serialize)]
struct OutEmbedContent<'a> {
    parts: [OutTextPart<'a>; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutEmbedRequest<'a> {
    model: &'a str,
    content: OutEmbedContent<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dimensionality: Option<u32>,
}

#[derive(Serialize)]
struct OutBatchEmbed<'a> {
    requests: Vec<OutEmbedRequest<'a>>,
}

/// Encodes a `batchEmbedContents` body. Gemini embeds text only.
pub fn encode_embeddings_request(
    req: &EmbeddingsRequest,
    model: &str,
) -> Result<Vec<u8>, UpstreamError> {
    let EmbeddingInput::Texts(texts) = &req.input else {
        return Err(UpstreamError::new(
            ErrorKind::BadRequest,
            "Gemini embeds text only; token-id input is not supported",
        ));
    };
    let resource = model_resource(model);
    let out = OutBatchEmbed {
        requests: texts
            .iter()
            .map(|t| OutEmbedRequest {
                model: &resource,
                content: OutEmbedContent {
                    parts: [OutTextPart { text: t }],
                },
                output_dimensionality: req.dimensions,
            })
            .collect(),
    };
    Ok(serde_json::to_vec(&out).unwrap_or_default())
}

#[derive(Deserialize)]
struct InEmbedding {
    #[serde(default)]
    values: Vec<f32>,
}

#[derive(Deserialize)]
struct InEmbeddings {
    #[serde(default)]
    embeddings: Option<Vec<InEmbedding>>,
    #[serde(default)]
    error: Option<Value>,
}

/// Decodes a `batchEmbedContents` answer. Gemini reports no token usage (left 0:
/// the gateway estimates it).
pub fn decode_embeddings_response(body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
    let r: InEmbeddings = serde_json::from_slice(body)
        .map_err(|e| malformed_json("a body", "a batchEmbedContents answer", &e))?;
    if let Some(err) = &r.error {
        return Err(classify_error_value(200, err));
    }
    let Some(embeddings) = r.embeddings else {
        return Err(malformed("Gemini answer has no `embeddings`"));
    };
    Ok(EmbeddingsResponse {
        model: String::new(),
        vectors: embeddings.into_iter().map(|e| e.values).collect(),
        usage: Usage::default(),
    })
}

// === kind ===

pub static KIND: Kind = Kind {
    name: "gemini",
    gen_ai_provider: "gcp.gemini",
    auth_header: Some("x-goog-api-key"),
    capabilities: Capabilities::ALL,
    reports_usage: true,
    self_hosted: false,
    in_process: false,
    section: false,
    settings: |_| Arc::new(Sectionless(|_| Arc::new(GeminiCodec::new()))),
};

// === codec ===
//
// Codec for the Google Gemini API (`kind: gemini`): `models/{model}:generateContent`,
// `:streamGenerateContent?alt=sse` and `:batchEmbedContents` under the provider's
// `base_url` (e.g. `https://generativelanguage.googleapis.com/v1beta`). The API key
// travels in the `x-goog-api-key` header (the kind's default auth), never in the URL.

#[derive(Debug, Clone, Default)]
pub struct GeminiCodec;

impl GeminiCodec {
    pub fn new() -> Self {
        GeminiCodec
    }
}

impl Codec for GeminiCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        let method = if req.stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        Ok(HttpCall {
            path: format!("/{}:{method}", model_resource(model)),
            body: encode_chat_request(req, model),
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        decode_chat_response(body)
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(EventDecoder::default())
    }

    fn error(&self, status: u16, body: &[u8]) -> UpstreamError {
        classify_error_body(status, body)
    }

    fn embeddings_call(
        &self,
        req: &EmbeddingsRequest,
        model: &str,
    ) -> Result<HttpCall, UpstreamError> {
        Ok(HttpCall {
            path: format!("/{}:batchEmbedContents", model_resource(model)),
            body: encode_embeddings_request(req, model)?,
            headers: Vec::new(),
        })
    }

    fn embeddings_response(&self, body: &[u8]) -> Result<EmbeddingsResponse, UpstreamError> {
        decode_embeddings_response(body)
    }
}

#[cfg(test)]
mod codec_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::common::testing::{embeddings_request, request};

    fn req(stream: bool) -> ChatRequest {
        ChatRequest {
            stream,
            ..request(vec![Message::text(Role::User, "hi")])
        }
    }

    #[test]
    fn paths_keep_the_key_out_of_the_url() {
        let c = GeminiCodec::new();
        let call = c.chat_call(&req(false), "gemini-2.5-flash").unwrap();
        assert_eq!(call.path, "/models/gemini-2.5-flash:generateContent");
        let call = c.chat_call(&req(true), "gemini-2.5-flash").unwrap();
        assert_eq!(
            call.path,
            "/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert!(call.headers.is_empty());
        let e = embeddings_request(&["a"]);
        let call = c.embeddings_call(&e, "gemini-embedding-001").unwrap();
        assert_eq!(call.path, "/models/gemini-embedding-001:batchEmbedContents");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::common::testing::{
        assert_fixture_errors, decode_stream, deltas, embeddings_request, finishes, fixture,
        recorded_chat, request, same_at_every_split, text_of, usages,
    };
    use crate::backend::gemini::GeminiCodec;

    fn encode(req: &ChatRequest, model: &str) -> Value {
        serde_json::from_slice(&encode_chat_request(req, model)).unwrap()
    }

    /// Feeds `sse` to a decoder in pieces of `chunk` bytes.
    fn stream(sse: &str, chunk: usize) -> Result<(Vec<StreamEvent>, bool), UpstreamError> {
        let (out, result, finished) = decode_stream(&GeminiCodec::new(), sse.as_bytes(), chunk);
        result.map(|()| (out, finished))
    }

    fn assistant_call(id: &str, name: &str, args: &str) -> Message {
        Message {
            role: Role::Assistant,
            content: None,
            name: None,
            tool_calls: vec![ToolCall {
                id: id.into(),
                name: name.into(),
                arguments: args.into(),
            }],
            tool_call_id: None,
            reasoning: None,
        }
    }

    fn tool_result(id: &str, text: &str) -> Message {
        Message {
            role: Role::Tool,
            content: Some(Content::Text(text.into())),
            name: None,
            tool_calls: Vec::new(),
            tool_call_id: Some(id.into()),
            reasoning: None,
        }
    }

    #[test]
    fn request_maps_roles_tools_and_parameters() {
        let mut req = request(vec![
            Message::text(Role::System, "Be brief."),
            Message::text(Role::Developer, "Answer in French."),
            Message {
                content: Some(Content::Parts(vec![
                    Part::Text("What is in".into()),
                    Part::Image {
                        url: "data:image/png;base64,iVBORw0=".into(),
                        detail: None,
                    },
                    Part::Image {
                        url: "https://example.invalid/cat.jpg?x=1".into(),
                        detail: Some("low".into()),
                    },
                ])),
                ..Message::text(Role::User, "")
            },
            assistant_call("call_1", "get_weather", r#"{"city":"Paris"}"#),
            assistant_call("call_2", "get_time", ""),
            tool_result("call_1", r#"{"temp":21}"#),
            tool_result("call_2", "noon"),
            Message::text(Role::User, "Thanks"),
        ]);
        req.params = Params {
            temperature: Some(2.5),
            top_p: Some(0.9),
            max_tokens: Some(50),
            max_completion_tokens: Some(100),
            stop: vec!["END".into()],
            seed: Some(7),
            n: Some(2),
            ..Params::default()
        };
        req.tools = vec![
            Tool {
                name: "get_weather".into(),
                description: Some("Weather".into()),
                parameters: Some(json!({
                    "type": "object", "additionalProperties": false, "$schema": "x",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"type": ["string", "null"], "enum": ["c", "f"]},
                        "additionalProperties": {"const": "kept: a property of that name"}
                    },
                    "required": ["city"]
                })),
                strict: Some(true),
            },
            Tool {
                name: "get_time".into(),
                description: None,
                parameters: Some(json!({"type": "object", "properties": {}})),
                strict: None,
            },
        ];
        req.tool_choice = Some(ToolChoice::Function("get_weather".into()));
        req.response_format = Some(ResponseFormat::JsonSchema(json!({
            "name": "w", "strict": true,
            "schema": {"type": "object", "properties": {"t": {"type": "number"}}, "additionalProperties": false}
        })));
        req.extra.insert("top_k".into(), json!(40));
        req.extra.insert("logit_bias".into(), json!({"1": 2}));
        let body = encode(&req, "gemini-2.5-flash");
        assert_eq!(
            body,
            json!({
                "systemInstruction": {"parts": [{"text": "Be brief.\n\nAnswer in French."}]},
                "contents": [
                    {"role": "user", "parts": [
                        {"text": "What is in"},
                        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0="}},
                        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.invalid/cat.jpg?x=1"}}
                    ]},
                    {"role": "model", "parts": [
                        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                        {"functionCall": {"name": "get_time", "args": {}}}
                    ]},
                    {"role": "user", "parts": [
                        {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
                        {"functionResponse": {"name": "get_time", "response": {"result": "noon"}}},
                        {"text": "Thanks"}
                    ]}
                ],
                "tools": [{"functionDeclarations": [
                    {"name": "get_weather", "description": "Weather", "parameters": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string"},
                            "unit": {"type": "string", "nullable": true, "enum": ["c", "f"]},
                            "additionalProperties": {"enum": ["kept: a property of that name"]}
                        },
                        "required": ["city"]
                    }},
                    {"name": "get_time"}
                ]}],
                "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
                "generationConfig": {
                    "temperature": 2.0, "topP": 0.9, "topK": 40, "maxOutputTokens": 100,
                    "stopSequences": ["END"], "seed": 7, "candidateCount": 2,
                    "responseMimeType": "application/json",
                    "responseSchema": {"type": "object", "properties": {"t": {"type": "number"}}}
                }
            })
        );
    }

    #[test]
    fn tool_choice_modes_and_json_mode() {
        let mut req = request(vec![Message::text(Role::User, "x")]);
        req.tool_choice = Some(ToolChoice::Auto);
        assert!(encode(&req, "m").get("toolConfig").is_none(), "no tools");
        req.tools = vec![Tool {
            name: "f".into(),
            description: None,
            parameters: None,
            strict: None,
        }];
        for (choice, want) in [
            (ToolChoice::None, json!({"mode": "NONE"})),
            (ToolChoice::Auto, json!({"mode": "AUTO"})),
            (ToolChoice::Required, json!({"mode": "ANY"})),
        ] {
            req.tool_choice = Some(choice);
            assert_eq!(
                encode(&req, "m")["toolConfig"]["functionCallingConfig"],
                want
            );
        }
        req.tool_choice = None;
        req.tools.clear();
        req.response_format = Some(ResponseFormat::JsonObject);
        let body = encode(&req, "m");
        assert_eq!(
            body["generationConfig"],
            json!({"responseMimeType": "application/json"})
        );
        assert!(body.get("toolConfig").is_none() && body.get("tools").is_none());
    }

    #[test]
    fn empty_generation_config_is_left_out() {
        let body = encode(&request(vec![Message::text(Role::User, "hi")]), "m");
        assert_eq!(
            body,
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
        );
    }

    #[test]
    fn thought_signatures_round_trip_through_call_ids() {
        let resp = decode_chat_response(fixture("gemini", "signed_call.json").as_bytes()).unwrap();
        let call = &resp.choices[0].message.tool_calls[0];
        assert!(call.id.starts_with("call_"), "{}", call.id);
        // The signature stays in the gateway: the id is one every backend accepts.
        assert!(
            crate::backend::tool_id::is_portable(&call.id),
            "{}",
            call.id
        );
        let req = request(vec![
            Message::text(Role::User, "Weather?"),
            assistant_call(&call.id, &call.name, &call.arguments),
            tool_result(&call.id, "sunny"),
        ]);
        let body = encode(&req, "gemini-3-pro-preview");
        assert_eq!(
            body["contents"][1]["parts"][0],
            json!({"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                   "thoughtSignature": "c2lnbmF0dXJl"})
        );
        assert_eq!(
            body["contents"][2]["parts"][0]["functionResponse"]["name"],
            "get_weather"
        );
    }

    #[test]
    fn streamed_signed_calls_have_portable_ids_and_keep_their_signature() {
        let sse = concat!(
            "data: {\"candidates\": [{\"content\": {\"role\": \"model\", \"parts\": [{\"functionCall\": ",
            "{\"name\": \"get_weather\", \"args\": {\"city\": \"Paris\"}}, \"thoughtSignature\": ",
            "\"CiQBVKhc7/+/=c2lnbmF0dXJlIG9mIGEgc3RyZWFtZWQgY2FsbA==\"}]}, \"finishReason\": \"STOP\", \"index\": 0}]}\n\n"
        );
        let (events, done) = stream(sse, 7).unwrap();
        assert!(done);
        let id = events
            .iter()
            .find_map(|e| match e {
                StreamEvent::Delta(d) => d.tool_calls.first().and_then(|t| t.id.clone()),
                _ => None,
            })
            .unwrap();
        assert!(crate::backend::tool_id::is_portable(&id), "{id}");
        let req = request(vec![
            Message::text(Role::User, "Weather?"),
            assistant_call(&id, "get_weather", "{\"city\":\"Paris\"}"),
            tool_result(&id, "sunny"),
        ]);
        let body = encode(&req, "gemini-3-pro-preview");
        assert_eq!(
            body["contents"][1]["parts"][0]["thoughtSignature"],
            json!("CiQBVKhc7/+/=c2lnbmF0dXJlIG9mIGEgc3RyZWFtZWQgY2FsbA==")
        );
    }

    /// Gemini's own call ids are not random: two tenants can receive calls with
    /// the same Gemini id. Each sees its own minted id, and replaying one
    /// tenant's call never carries the other's signature.
    #[test]
    fn gemini_ids_never_key_a_signature_across_tenants() {
        let answer = |sig: &str| {
            json!({"candidates": [{"content": {"role": "model", "parts": [
                {"functionCall": {"id": "fc_0", "name": "lookup", "args": {"q": "x"}},
                 "thoughtSignature": sig}]}, "finishReason": "STOP", "index": 0}]})
            .to_string()
        };
        let a = decode_chat_response(answer("c2lnLXRlbmFudC1h").as_bytes()).unwrap();
        let b = decode_chat_response(answer("c2lnLXRlbmFudC1i").as_bytes()).unwrap();
        let (a, b) = (
            &a.choices[0].message.tool_calls[0],
            &b.choices[0].message.tool_calls[0],
        );
        assert_ne!(a.id, b.id);
        assert_ne!(a.id, "fc_0");
        assert!(a.id.starts_with("call_") && a.id.len() == 37, "{}", a.id);
        // Replaying with Gemini's id (or any id the gateway did not mint)
        // finds nothing: the bypass value, not a tenant's signature.
        let replay = |id: &str| {
            let req = request(vec![
                Message::text(Role::User, "q"),
                assistant_call(id, "lookup", "{\"q\":\"x\"}"),
                tool_result(id, "found"),
            ]);
            encode(&req, "gemini-3-pro-preview")
        };
        let body = replay("fc_0");
        assert_eq!(
            body["contents"][1]["parts"][0]["thoughtSignature"],
            json!(SKIP_SIGNATURE)
        );
        assert!(body["contents"][1]["parts"][0]["functionCall"]
            .get("id")
            .is_none());
        for (call, sig) in [(a, "c2lnLXRlbmFudC1h"), (b, "c2lnLXRlbmFudC1i")] {
            let body = replay(&call.id);
            assert_eq!(
                body["contents"][1]["parts"][0]["thoughtSignature"],
                json!(sig)
            );
        }
    }

    /// A Gemini id is sent back as Gemini gave it, on the replayed call and on
    /// its function response, however unportable it is; the client only ever
    /// sees a portable minted id.
    #[test]
    fn gemini_call_ids_round_trip_to_gemini_unchanged() {
        let odd = "projects/p/calls/7~x+y=";
        for gemini_id in [odd, "fc_0"] {
            let answer = json!({"candidates": [{"content": {"role": "model", "parts": [
                {"functionCall": {"id": gemini_id, "name": "lookup", "args": {}}}]},
                "finishReason": "STOP", "index": 0}]});
            let r = decode_chat_response(answer.to_string().as_bytes()).unwrap();
            let call = &r.choices[0].message.tool_calls[0];
            assert!(
                crate::backend::tool_id::is_portable(&call.id),
                "{}",
                call.id
            );
            let req = request(vec![
                Message::text(Role::User, "q"),
                assistant_call(&call.id, "lookup", "{}"),
                tool_result(&call.id, "found"),
            ]);
            let body = encode(&req, "gemini-2.5-flash");
            assert_eq!(
                body["contents"][1]["parts"][0]["functionCall"],
                json!({"id": gemini_id, "name": "lookup", "args": {}})
            );
            assert_eq!(
                body["contents"][2]["parts"][0]["functionResponse"]["id"],
                json!(gemini_id)
            );
        }
        // Calls Gemini gave no id are replayed without one.
        let r = decode_chat_response(fixture("gemini", "tools.json").as_bytes()).unwrap();
        let call = &r.choices[0].message.tool_calls[0];
        let req = request(vec![
            Message::text(Role::User, "q"),
            assistant_call(&call.id, &call.name, &call.arguments),
            tool_result(&call.id, "sunny"),
        ]);
        let body = encode(&req, "gemini-2.5-flash");
        assert!(body["contents"][1]["parts"][0]["functionCall"]
            .get("id")
            .is_none());
        assert!(body["contents"][2]["parts"][0]["functionResponse"]
            .get("id")
            .is_none());
    }

    #[test]
    fn older_ids_carrying_a_signature_are_still_read() {
        let id = "call_0123456789abcdef~ts~c2lnbmF0dXJl";
        let req = request(vec![
            Message::text(Role::User, "Weather?"),
            assistant_call(id, "f", "{}"),
            tool_result(id, "1"),
        ]);
        let body = encode(&req, "gemini-3-pro-preview");
        assert_eq!(
            body["contents"][1]["parts"][0]["thoughtSignature"],
            json!("c2lnbmF0dXJl")
        );
        assert_eq!(
            body["contents"][2]["parts"][0]["functionResponse"]["name"],
            "f"
        );
    }

    #[test]
    fn the_signature_map_is_bounded() {
        let big = "s".repeat(signatures::MAX_SIGNATURE + 1);
        signatures::remember("call_too_big", Some(&big), None);
        assert!(signatures::recall("call_too_big").is_none());
        for i in 0..(signatures::MAX_ENTRIES + 10) {
            signatures::remember(&format!("call_bound_{i}"), Some("sig"), None);
        }
        assert!(signatures::len() <= signatures::MAX_ENTRIES);
        assert!(signatures::recall("call_bound_0").is_none(), "oldest out");
        let last = format!("call_bound_{}", signatures::MAX_ENTRIES + 9);
        assert_eq!(
            signatures::recall(&last)
                .and_then(|c| c.signature)
                .as_deref(),
            Some("sig")
        );
    }

    #[test]
    fn unsigned_replayed_calls_get_the_bypass_on_gemini_3_only() {
        let req = request(vec![
            Message::text(Role::User, "Weather?"),
            assistant_call("call_x", "f", "{}"),
            tool_result("call_x", "1"),
        ]);
        let sig = |model: &str| {
            encode(&req, model)["contents"][1]["parts"][0]["thoughtSignature"].clone()
        };
        assert_eq!(sig("gemini-3-flash-preview"), json!(SKIP_SIGNATURE));
        assert_eq!(sig("models/gemini-3.1-pro"), json!(SKIP_SIGNATURE));
        assert_eq!(sig("gemini-2.5-flash"), Value::Null);
        assert_eq!(sig("gemma-3-27b-it"), Value::Null);
    }

    #[test]
    fn decodes_text_usage_and_finish() {
        let r = recorded_chat("gemini", decode_chat_response);
        assert_eq!(r.usage, Some(Usage::new(12, 6)));
        assert_eq!(r.model, "gemini-2.5-flash");
        assert_eq!(r.id, "conf-gemini-1");
        let r = decode_chat_response(fixture("gemini", "length.json").as_bytes()).unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Length));
    }

    #[test]
    fn decodes_tool_calls_with_generated_ids() {
        let r = decode_chat_response(fixture("gemini", "tools.json").as_bytes()).unwrap();
        let c = &r.choices[0];
        assert_eq!(c.finish_reason, Some(FinishReason::ToolCalls));
        assert_eq!(c.message.tool_calls.len(), 1);
        let call = &c.message.tool_calls[0];
        assert!(call.id.starts_with("call_") && !call.id.contains(SIGNATURE_MARK));
        assert_eq!(call.name, "get_weather");
        assert_eq!(
            serde_json::from_str::<Value>(&call.arguments).unwrap(),
            json!({"city": "Paris"})
        );
    }

    #[test]
    fn thoughts_become_reasoning_and_count_as_completion() {
        let body = json!({
            "candidates": [{"content": {"role": "model", "parts": [
                {"text": "Let me think.", "thought": true},
                {"text": "42"}
            ]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 44,
                "thoughtsTokenCount": 186, "cachedContentTokenCount": 3, "totalTokenCount": 235}
        });
        let r = decode_chat_response(body.to_string().as_bytes()).unwrap();
        let m = &r.choices[0].message;
        assert_eq!(m.reasoning.as_deref(), Some("Let me think."));
        assert_eq!(m.content, Some(Content::Text("42".into())));
        let u = r.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (5, 230, 235)
        );
        assert_eq!((u.cached_tokens, u.reasoning_tokens), (Some(3), Some(186)));
    }

    #[test]
    fn finish_reasons_map_per_reference() {
        for (w, f) in [
            ("STOP", FinishReason::Stop),
            ("OTHER", FinishReason::Stop),
            ("LANGUAGE", FinishReason::Stop),
            ("MAX_TOKENS", FinishReason::Length),
            ("SAFETY", FinishReason::ContentFilter),
            ("RECITATION", FinishReason::ContentFilter),
            ("BLOCKLIST", FinishReason::ContentFilter),
            ("PROHIBITED_CONTENT", FinishReason::ContentFilter),
            ("SPII", FinishReason::ContentFilter),
            ("IMAGE_SAFETY", FinishReason::ContentFilter),
            ("MALFORMED_FUNCTION_CALL", FinishReason::Error),
            ("UNEXPECTED_TOOL_CALL", FinishReason::Error),
            ("TOO_MANY_TOOL_CALLS", FinishReason::Error),
        ] {
            assert_eq!(finish_reason_from_wire(w), f, "{w}");
        }
        let safety = json!({"candidates": [{"finishReason": "SAFETY", "index": 0}]});
        let r = decode_chat_response(safety.to_string().as_bytes()).unwrap();
        assert_eq!(
            r.choices[0].finish_reason,
            Some(FinishReason::ContentFilter)
        );
        assert_eq!(r.choices[0].message.content, None);
    }

    #[test]
    fn blocked_prompt_is_a_content_filter_error() {
        let e = decode_chat_response(fixture("gemini", "error_in_200_blocked.json").as_bytes())
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ContentFilter);
        assert!(e.message.contains("SAFETY"), "{}", e.message);
        let e = stream(
            "data: {\"promptFeedback\": {\"blockReason\": \"PROHIBITED_CONTENT\"}}\r\n\r\n",
            7,
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ContentFilter);
    }

    #[test]
    fn a_huge_retry_delay_is_capped_not_a_panic() {
        for delay in ["1e300s", "18446744073709551616s", "99999999999999999999s"] {
            let err = json!({"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED",
                "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]});
            let e = classify_error_value(429, &err);
            assert_eq!(e.kind, ErrorKind::RateLimited);
            assert_eq!(
                e.retry_after,
                Some(crate::error::MAX_RETRY_AFTER),
                "{delay}"
            );
        }
        assert_eq!(parse_delay("-1s"), None);
        assert_eq!(
            parse_delay("2.5s"),
            Some(std::time::Duration::from_millis(2500))
        );
    }

    #[test]
    fn a_giant_candidate_index_is_malformed_not_an_allocation() {
        let sse = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"a\"}]}, \"index\": 4294967295}]}\n\n";
        let e = stream(sse, sse.len()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
        let ok = sse.replace("4294967295", "63");
        assert!(stream(&ok, ok.len()).is_ok());
    }

    #[test]
    fn stream_text_at_every_split_gives_the_same_events() {
        let sse = fixture("gemini", "chat.sse");
        let whole = same_at_every_split(&GeminiCodec::new(), sse.as_bytes(), &[1, 2, 3, 5, 17, 64]);
        assert_eq!(text_of(&whole), "Hello from the fake upstream.");
        assert!(matches!(&whole[0], StreamEvent::Meta(m) if m.id == "conf-gemini-s1"));
        let usage = usages(&whole);
        assert_eq!(
            usage,
            vec![&Usage::new(12, 6)],
            "usage once, the final total"
        );
        assert_eq!(whole.last(), Some(&StreamEvent::Done));
        assert_eq!(finishes(&whole), vec![FinishReason::Stop]);
    }

    #[test]
    fn stream_tool_call_arrives_whole() {
        let (events, finished) = stream(&fixture("gemini", "tools.sse"), 9).unwrap();
        assert!(finished);
        let deltas = deltas(&events);
        let call = &deltas[0].tool_calls[0];
        assert_eq!(call.index, 0);
        assert!(call.id.as_deref().is_some_and(|i| i.starts_with("call_")));
        assert_eq!(call.name.as_deref(), Some("get_weather"));
        assert_eq!(call.arguments.as_deref(), Some(r#"{"city":"Paris"}"#));
        assert_eq!(
            deltas.last().unwrap().finish_reason,
            Some(FinishReason::ToolCalls)
        );
    }

    #[test]
    fn stream_length_and_in_band_error() {
        let (events, finished) = stream(&fixture("gemini", "length.sse"), 11).unwrap();
        assert!(finished);
        assert!(events.iter().any(|e| matches!(e,
            StreamEvent::Delta(d) if d.finish_reason == Some(FinishReason::Length))));
        let sse = fixture("gemini", "stream_error.sse");
        let (out, result, finished) = decode_stream(&GeminiCodec::new(), sse.as_bytes(), 0);
        assert_eq!(text_of(&out), "Hello");
        assert_eq!(result.unwrap_err().kind, ErrorKind::Overloaded);
        assert!(!finished);
    }

    #[test]
    fn stream_ends_when_every_candidate_finished() {
        let sse = concat!(
            "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"a\"}]}, \"index\": 0},",
            " {\"content\": {\"parts\": [{\"text\": \"b\"}]}, \"index\": 1}]}\n\n",
            "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"!\"}]}, \"finishReason\": \"STOP\", \"index\": 0}],",
            " \"usageMetadata\": {\"promptTokenCount\": 2, \"candidatesTokenCount\": 1}}\n\n",
        );
        let (events, finished) = stream(sse, 4).unwrap();
        assert!(!finished, "candidate 1 is still open");
        assert!(!events.contains(&StreamEvent::Done));
        let more = "data: {\"candidates\": [{\"finishReason\": \"MAX_TOKENS\", \"index\": 1}], \"usageMetadata\": {\"promptTokenCount\": 2, \"candidatesTokenCount\": 3}}\n\n";
        let (events, finished) = stream(&format!("{sse}{more}"), 4).unwrap();
        assert!(finished);
        let n_usage = events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Usage(u) if *u == Usage::new(2, 3)))
            .count();
        assert_eq!(n_usage, 1);
    }

    #[test]
    fn errors_classify_by_status_word_and_details() {
        let cases: [(u16, &str, ErrorKind); 2] = [
            (400, "error_400_api_key.json", ErrorKind::Auth),
            (403, "error_403.json", ErrorKind::Auth),
        ];
        assert_fixture_errors("gemini", classify_error_body, &cases);
        let e = classify_error_body(429, fixture("gemini", "error_429.json").as_bytes());
        assert_eq!(e.retry_after, Some(std::time::Duration::from_secs(37)));
        let more: [(Value, ErrorKind); 4] = [
            (
                json!({"code": 404, "status": "NOT_FOUND", "message": "models/x is not found"}),
                ErrorKind::BadRequest,
            ),
            (
                json!({"code": 400, "status": "FAILED_PRECONDITION", "message": "User location is not supported"}),
                ErrorKind::BadRequest,
            ),
            (
                json!({"code": 503, "status": "UNAVAILABLE", "message": "The model is overloaded."}),
                ErrorKind::Overloaded,
            ),
            (
                json!({"code": 504, "status": "DEADLINE_EXCEEDED", "message": "Deadline expired"}),
                ErrorKind::Timeout,
            ),
        ];
        for (err, kind) in more {
            let body = json!({ "error": err }).to_string();
            let status = err["code"].as_u64().unwrap() as u16;
            assert_eq!(
                classify_error_body(status, body.as_bytes()).kind,
                kind,
                "{err}"
            );
        }
        // An array-wrapped error, and a body that is not JSON.
        let arr = format!("[{}]", fixture("gemini", "error_429.json"));
        assert_eq!(
            classify_error_body(429, arr.as_bytes()).kind,
            ErrorKind::RateLimited
        );
        let e = classify_error_body(502, b"<html>Bad Gateway</html>");
        assert_eq!(e.kind, ErrorKind::Overloaded);
        assert!(e.message.contains("Bad Gateway"));
    }

    #[test]
    fn error_inside_a_200_body() {
        let body = json!({"error": {"code": 500, "status": "INTERNAL", "message": "boom"}});
        let e = decode_chat_response(body.to_string().as_bytes()).unwrap_err();
        assert_eq!((e.kind, e.status), (ErrorKind::Overloaded, None));
        let e = decode_chat_response(b"{\"candidates\": 7}").unwrap_err();
        assert_eq!(e.kind, ErrorKind::MalformedResponse);
    }

    #[test]
    fn embeddings_round_trip() {
        let req = EmbeddingsRequest {
            dimensions: Some(8),
            ..embeddings_request(&["a", "b"])
        };
        let body: Value = serde_json::from_slice(
            &encode_embeddings_request(&req, "gemini-embedding-001").unwrap(),
        )
        .unwrap();
        assert_eq!(
            body,
            json!({"requests": [
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "a"}]}, "outputDimensionality": 8},
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "b"}]}, "outputDimensionality": 8}
            ]})
        );
        let r = decode_embeddings_response(
            br#"{"embeddings": [{"values": [0.1, 0.2]}, {"values": [0.3, 0.4]}]}"#,
        )
        .unwrap();
        assert_eq!(r.vectors, vec![vec![0.1, 0.2], vec![0.3, 0.4]]);
        assert_eq!(r.usage, Usage::default());
        let tokens = EmbeddingsRequest {
            input: EmbeddingInput::Tokens(vec![vec![1, 2]]),
            ..req
        };
        assert_eq!(
            encode_embeddings_request(&tokens, "m").unwrap_err().kind,
            ErrorKind::BadRequest
        );
    }

    #[test]
    fn model_paths() {
        assert_eq!(
            model_resource("gemini-2.5-flash"),
            "models/gemini-2.5-flash"
        );
        assert_eq!(model_resource("tunedModels/abc"), "tunedModels/abc");
    }
}
