//! Prompt files (`prompts/*.yaml`): raw YAML structs and their validation into
//! [`crate::prompt::PromptDef`]s. Problems carry `file:line`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{read_yaml, Problem, Problems};
use crate::canonical::Role;
use crate::prompt::{
    Hook, MessageTemplate, OnError, PromptDef, PromptParams, VarDef, VarType, VersionDef,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrompt {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    variables: BTreeMap<String, RawVar>,
    #[serde(default)]
    labels: BTreeMap<String, u32>,
    versions: BTreeMap<u32, RawVersion>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RawVarType {
    String,
    Number,
    Integer,
    Boolean,
    List,
    Object,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVar {
    #[serde(rename = "type")]
    ty: RawVarType,
    #[serde(default)]
    required: Option<bool>,
    #[serde(default)]
    default: Option<Value>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPromptParams {
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    stop: Option<Vec<String>>,
    #[serde(default)]
    seed: Option<i64>,
    /// OpenAI-shaped tool definitions.
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    retriever: String,
    query: String,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    min_score: Option<f32>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    filter: Option<Value>,
    #[serde(default)]
    on_error: Option<RawOnError>,
    into: String,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RawOnError {
    Fail,
    Empty,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVersion {
    /// The content hash recorded when the version was published.
    #[serde(default)]
    hash: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    params: Option<Value>,
    #[serde(default)]
    retrieval: Vec<RawHook>,
    messages: Vec<RawMessage>,
}

/// Line numbers of a version and of each message's content in the file text (a
/// best effort: YAML parsers do not report value positions).
fn locate(text: &str, version: u32, messages: usize) -> (usize, Vec<usize>) {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_start().starts_with("versions:"))
        .unwrap_or(0);
    let key = |l: &str| {
        let t = l.trim().trim_end_matches(':');
        t.trim_matches(|c| c == '"' || c == '\'') == version.to_string() && l.trim().ends_with(':')
    };
    let vline = lines
        .iter()
        .enumerate()
        .skip(start)
        .find(|(_, l)| key(l))
        .map(|(i, _)| i)
        .unwrap_or(start);
    let mut out = Vec::with_capacity(messages);
    let mut i = vline + 1;
    while out.len() < messages && i < lines.len() {
        let t = lines[i].trim_start().trim_start_matches("- ").trim_start();
        if let Some(rest) = t.strip_prefix("content:") {
            let rest = rest.trim();
            // Block scalars start on the next line.
            let block = rest.starts_with('|') || rest.starts_with('>') || rest.is_empty();
            out.push(if block { i + 2 } else { i + 1 });
        }
        i += 1;
    }
    while out.len() < messages {
        out.push(vline + 1);
    }
    (vline + 1, out)
}

type ToolParams = (
    Vec<crate::canonical::Tool>,
    Option<crate::canonical::ToolChoice>,
    Option<crate::canonical::ResponseFormat>,
);

/// Decodes OpenAI-shaped tools / tool_choice / response_format with the one
/// parser the gateway has for them.
fn openai_params(v: &RawPromptParams) -> Result<ToolParams, String> {
    let mut probe =
        serde_json::json!({"model": "-", "messages": [{"role": "user", "content": "-"}]});
    if let Some(t) = &v.tools {
        probe["tools"] = Value::Array(t.clone());
    }
    if let Some(t) = &v.tool_choice {
        probe["tool_choice"] = t.clone();
    }
    if let Some(r) = &v.response_format {
        probe["response_format"] = r.clone();
    }
    let req = crate::backend::openai::decode_chat_request(probe.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    Ok((req.tools, req.tool_choice, req.response_format))
}

/// Loads every `*.yaml` / `*.yml` in `dir`. `routes` are the configured route
/// names, for checking the versions' `route`.
pub(super) fn load_dir(
    dir: &Path,
    routes: &[&str],
    retrievers: &BTreeMap<String, crate::config::RetrieverConfig>,
    problems: &mut Problems,
) -> BTreeMap<String, PromptDef> {
    let mut out = BTreeMap::new();
    let files = match super::yaml_files(dir) {
        Ok(f) => f,
        // No prompts folder: no prompts.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
        Err(e) => {
            problems.add(dir, "", format!("cannot read the prompts folder: {e}"));
            return out;
        }
    };
    for file in files {
        let Some(stem) = file.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let Some(raw) = read_yaml::<RawPrompt>(&file, problems) else {
            continue;
        };
        let id = raw.id.clone().unwrap_or(stem);
        if let Some(prev) = out.get(&id) {
            let prev: &PromptDef = prev;
            problems.add(
                &file,
                "id",
                format!("prompt `{id}` is also defined in {}", prev.file.display()),
            );
            continue;
        }
        if let Some(p) = validate(&id, &file, &text, raw, routes, retrievers, problems) {
            out.insert(id, p);
        }
    }
    out
}

/// A hook as the version hash sees it: the original four fields, and each
/// later one only when set (so hashes recorded before they existed still hold).
fn hook_content(h: &RawHook) -> Value {
    let mut o = serde_json::json!({"retriever": h.retriever, "query": h.query, "top_k": h.top_k, "into": h.into});
    if let Some(m) = o.as_object_mut() {
        if let Some(s) = h.min_score {
            m.insert("min_score".into(), serde_json::json!(s));
        }
        if let Some(t) = h.max_tokens {
            m.insert("max_tokens".into(), serde_json::json!(t));
        }
        if let Some(f) = &h.filter {
            m.insert("filter".into(), f.clone());
        }
        if let Some(e) = h.on_error {
            m.insert(
                "on_error".into(),
                serde_json::json!(match e {
                    RawOnError::Fail => "fail",
                    RawOnError::Empty => "empty",
                }),
            );
        }
    }
    o
}

fn at(problems: &mut Problems, file: &Path, line: usize, field: String, message: String) {
    problems.list.push(Problem {
        file: file.display().to_string(),
        line: Some(line),
        field,
        message,
    });
}

fn validate(
    id: &str,
    file: &Path,
    text: &str,
    raw: RawPrompt,
    routes: &[&str],
    retrievers: &BTreeMap<String, crate::config::RetrieverConfig>,
    problems: &mut Problems,
) -> Option<PromptDef> {
    let before = problems.list.len();
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        problems.add(
            file,
            "id",
            "a prompt id must be letters, digits, `-`, `_` or `.`",
        );
    }
    let mut variables = Vec::new();
    for (name, v) in raw.variables {
        let ty = match v.ty {
            RawVarType::String => VarType::String,
            RawVarType::Number => VarType::Number,
            RawVarType::Integer => VarType::Integer,
            RawVarType::Boolean => VarType::Boolean,
            RawVarType::List => VarType::List,
            RawVarType::Object => VarType::Object,
        };
        let required = v.required.unwrap_or(v.default.is_none());
        if required && v.default.is_some() {
            problems.add(
                file,
                format!("variables.{name}"),
                "a required variable cannot have a default",
            );
        }
        if let Some(d) = &v.default {
            if !ty.accepts(d) {
                problems.add(
                    file,
                    format!("variables.{name}.default"),
                    format!("must be a {}", ty.as_str()),
                );
            }
        }
        let default = if required {
            None
        } else {
            Some(v.default.unwrap_or(Value::Null))
        };
        variables.push(VarDef {
            name,
            ty,
            default,
            description: v.description,
        });
    }
    if raw.versions.is_empty() {
        problems.add(file, "versions", "a prompt needs at least one version");
    }
    let mut versions = BTreeMap::new();
    for (n, v) in raw.versions {
        let (vline, mlines) = locate(text, n, v.messages.len());
        let field = |k: &str| format!("versions.{n}.{k}");
        if n == 0 {
            at(
                problems,
                file,
                vline,
                format!("versions.{n}"),
                "versions are numbered from 1".into(),
            );
        }
        if v.messages.is_empty() {
            at(
                problems,
                file,
                vline,
                field("messages"),
                "a version needs at least one message".into(),
            );
        }
        if let Some(r) = &v.route {
            if !routes.contains(&r.as_str()) {
                at(
                    problems,
                    file,
                    vline,
                    field("route"),
                    format!("unknown route `{r}` (routes: {})", routes.join(", ")),
                );
            }
        }
        // The hash covers everything that shapes the requests of this version.
        let content = serde_json::json!({
            "route": v.route,
            "params": v.params,
            "retrieval": v.retrieval.iter().map(hook_content).collect::<Vec<_>>(),
            "messages": v.messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
        });
        let hash = crate::prompt::version_hash(&content);
        if let Some(recorded) = &v.hash {
            if recorded != &hash {
                at(
                    problems,
                    file,
                    vline,
                    field("hash"),
                    format!("version {n} was published as {recorded} but its content now hashes to {hash}: published versions are immutable, add a new version instead"),
                );
            }
        }
        let raw_params: RawPromptParams = match v.params.clone().map(serde_json::from_value) {
            None => RawPromptParams::default(),
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                at(problems, file, vline, field("params"), e.to_string());
                RawPromptParams::default()
            }
        };
        let (tools, tool_choice, response_format) = match openai_params(&raw_params) {
            Ok(x) => x,
            Err(e) => {
                at(problems, file, vline, field("params"), e);
                (Vec::new(), None, None)
            }
        };
        let mut messages = Vec::new();
        for (i, (m, line)) in v.messages.into_iter().zip(mlines).enumerate() {
            let role = match m.role.as_str() {
                "system" => Role::System,
                "developer" => Role::Developer,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    at(
                        problems,
                        file,
                        line,
                        format!("versions.{n}.messages[{i}].role"),
                        format!("`{other}` is not system, developer, user or assistant"),
                    );
                    Role::User
                }
            };
            messages.push(MessageTemplate {
                role,
                source: m.content,
                line,
            });
        }
        let mut retrieval = Vec::with_capacity(v.retrieval.len());
        for (i, h) in v.retrieval.into_iter().enumerate() {
            let field = |f: &str| format!("versions.{n}.retrieval[{i}].{f}");
            if !retrievers.contains_key(&h.retriever) {
                let known: Vec<&str> = retrievers.keys().map(String::as_str).collect();
                at(
                    problems,
                    file,
                    vline,
                    field("retriever"),
                    format!(
                        "retriever `{}` is not configured (retrievers: {})",
                        h.retriever,
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
            let top_k = h.top_k.unwrap_or(4);
            if top_k == 0 || top_k > crate::retrieval::MAX_TOP_K {
                at(
                    problems,
                    file,
                    vline,
                    field("top_k"),
                    format!("must be from 1 to {}", crate::retrieval::MAX_TOP_K),
                );
            }
            if let Some(s) = h.min_score {
                if !(0.0..=1.0).contains(&s) {
                    at(
                        problems,
                        file,
                        vline,
                        field("min_score"),
                        "must be from 0 to 1 (scores are similarities, higher is better)".into(),
                    );
                }
            }
            if h.max_tokens == Some(0) {
                at(
                    problems,
                    file,
                    vline,
                    field("max_tokens"),
                    "must be at least 1".into(),
                );
            }
            let filter = match crate::retrieval::Filter::from_json(h.filter.as_ref()) {
                Ok(f) => f,
                Err(e) => {
                    at(problems, file, vline, field("filter"), e.to_string());
                    crate::retrieval::Filter::default()
                }
            };
            if h.into.is_empty()
                || !h
                    .into
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                at(
                    problems,
                    file,
                    vline,
                    field("into"),
                    "must be a variable name (letters, digits, `_`)".into(),
                );
            } else if variables.iter().any(|var: &VarDef| var.name == h.into) {
                at(
                    problems,
                    file,
                    vline,
                    field("into"),
                    format!("`{}` is already a declared variable", h.into),
                );
            }
            retrieval.push(Hook {
                retriever: h.retriever,
                query: h.query,
                top_k,
                min_score: h.min_score,
                max_tokens: h.max_tokens,
                filter,
                on_error: match h.on_error {
                    Some(RawOnError::Empty) => OnError::Empty,
                    _ => OnError::Fail,
                },
                into: h.into,
            });
        }
        versions.insert(
            n,
            VersionDef {
                number: n,
                hash,
                description: v.description,
                route: v.route,
                params: PromptParams {
                    temperature: raw_params.temperature,
                    top_p: raw_params.top_p,
                    max_tokens: raw_params.max_tokens,
                    stop: raw_params.stop.unwrap_or_default(),
                    seed: raw_params.seed,
                    tools,
                    tool_choice,
                    response_format,
                },
                retrieval,
                messages,
                line: vline,
            },
        );
    }
    for (label, n) in &raw.labels {
        if !versions.contains_key(n) {
            let line = text
                .lines()
                .position(|l| l.trim_start().starts_with(&format!("{label}:")))
                .map(|i| i + 1)
                .unwrap_or(1);
            let vs: Vec<String> = versions.keys().map(u32::to_string).collect();
            at(
                problems,
                file,
                line,
                format!("labels.{label}"),
                format!(
                    "points at version {n}, which does not exist (versions: {})",
                    vs.join(", ")
                ),
            );
        }
    }
    if problems.list.len() > before {
        return None;
    }
    Some(PromptDef {
        id: id.to_owned(),
        file: file.to_owned(),
        description: raw.description,
        variables,
        labels: raw.labels,
        versions,
    })
}
