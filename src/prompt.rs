//! Versioned prompt templates. A prompt has typed variables, immutable numbered
//! versions (chat messages as minijinja templates, a default route and
//! parameters, reserved retrieval hooks) and labels that point at versions. The
//! [`Registry`] compiles every template once per config snapshot, with strict
//! undefined variables and no loader (rendering cannot read files, environment or
//! network). User variables are data: they are passed as values, never parsed as
//! template code.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::canonical::{ChatRequest, Message, ResponseFormat, Role, Tool, ToolChoice};
use crate::config::Problem;
use crate::error::GatewayError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarType {
    String,
    Number,
    Integer,
    Boolean,
    List,
    Object,
}

impl VarType {
    pub fn as_str(self) -> &'static str {
        match self {
            VarType::String => "string",
            VarType::Number => "number",
            VarType::Integer => "integer",
            VarType::Boolean => "boolean",
            VarType::List => "list",
            VarType::Object => "object",
        }
    }

    pub fn accepts(self, v: &Value) -> bool {
        match self {
            VarType::String => v.is_string(),
            VarType::Number => v.is_number(),
            VarType::Integer => v.is_i64() || v.is_u64(),
            VarType::Boolean => v.is_boolean(),
            VarType::List => v.is_array(),
            VarType::Object => v.is_object(),
        }
    }

    /// Reads a command-line value (`--var k=v`) as this type.
    pub fn parse_text(self, s: &str) -> Option<Value> {
        match self {
            VarType::String => Some(Value::String(s.to_owned())),
            _ => serde_json::from_str::<Value>(s)
                .ok()
                .filter(|v| self.accepts(v)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct VarDef {
    pub name: String,
    pub ty: VarType,
    /// `None` = required.
    pub default: Option<Value>,
    pub description: Option<String>,
}

/// Parameters a version sets for its requests (defaults: a request's own values win).
#[derive(Debug, Clone, Default)]
pub struct PromptParams {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    pub response_format: Option<ResponseFormat>,
}

/// A retrieval hook: fills variable `into` with passages from `retriever` for
/// the rendered `query` (a template over the prompt's variables), before the
/// messages are rendered.
#[derive(Debug, Clone)]
pub struct Hook {
    pub retriever: String,
    pub query: String,
    pub top_k: u32,
    /// Passages scoring below it are dropped (the [0, 1] similarity scale).
    pub min_score: Option<f32>,
    /// Token budget of the passages (tiktoken): the lowest-ranked are dropped
    /// until it holds.
    pub max_tokens: Option<u32>,
    pub filter: crate::retrieval::Filter,
    pub on_error: OnError,
    pub into: String,
}

/// What a failed retrieval does to its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The request fails (502 / 504, kind `retrieval`).
    Fail,
    /// The template gets an empty list; the failure is counted and logged.
    Empty,
}

#[derive(Debug, Clone)]
pub struct MessageTemplate {
    pub role: Role,
    pub source: String,
    /// Line in the prompt file where the template starts.
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct VersionDef {
    pub number: u32,
    /// `sha256:` + 16 hex digits over the version's content.
    pub hash: String,
    pub description: Option<String>,
    pub route: Option<String>,
    pub params: PromptParams,
    pub retrieval: Vec<Hook>,
    pub messages: Vec<MessageTemplate>,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct PromptDef {
    pub id: String,
    pub file: PathBuf,
    pub description: Option<String>,
    pub variables: Vec<VarDef>,
    pub labels: BTreeMap<String, u32>,
    pub versions: BTreeMap<u32, VersionDef>,
}

/// Which version a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Version(u32),
    Label(String),
}

impl Default for Selector {
    fn default() -> Self {
        Selector::Label("production".into())
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Version(v) => write!(f, "version {v}"),
            Selector::Label(l) => write!(f, "label `{l}`"),
        }
    }
}

impl Selector {
    /// `ID`, `ID@3` or `ID@staging`.
    pub fn parse_ref(s: &str) -> (String, Selector) {
        match s.split_once('@') {
            None => (s.to_owned(), Selector::default()),
            Some((id, sel)) => (
                id.to_owned(),
                match sel.parse::<u32>() {
                    Ok(n) => Selector::Version(n),
                    Err(_) => Selector::Label(sel.to_owned()),
                },
            ),
        }
    }
}

/// A request's use of a prompt: the extension object of the chat APIs.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRef {
    pub id: String,
    pub selector: Selector,
    /// The selector the request named itself (`None`: the default, production).
    pub explicit_selector: Option<Selector>,
    pub variables: Map<String, Value>,
}

impl PromptRef {
    /// Reads `{"id", "version"?, "label"?, "variables"?}`.
    pub fn from_json(v: Value) -> Result<PromptRef, GatewayError> {
        let bad = |m: &str, p: &str| GatewayError::invalid(m.to_owned(), Some(p));
        let Value::Object(mut o) = v else {
            return Err(bad("`prompt` must be an object with `id`", "prompt"));
        };
        let id = match o.remove("id") {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => return Err(bad("`prompt.id` must be a non-empty string", "prompt.id")),
        };
        let explicit = match (o.remove("version"), o.remove("label")) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "give `prompt.version` or `prompt.label`, not both",
                    "prompt.version",
                ))
            }
            (Some(v), None) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) => Some(Selector::Version(n)),
                None => {
                    return Err(bad(
                        "`prompt.version` must be a version number",
                        "prompt.version",
                    ))
                }
            },
            (None, Some(Value::String(l))) => Some(Selector::Label(l)),
            (None, Some(_)) => return Err(bad("`prompt.label` must be a string", "prompt.label")),
            (None, None) => None,
        };
        let selector = explicit.clone().unwrap_or_default();
        let variables = match o.remove("variables") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => {
                return Err(bad(
                    "`prompt.variables` must be an object",
                    "prompt.variables",
                ))
            }
        };
        if let Some(k) = o.keys().next() {
            return Err(bad(
                &format!("unknown field `prompt.{k}`"),
                &format!("prompt.{k}"),
            ));
        }
        Ok(PromptRef {
            id,
            selector,
            explicit_selector: explicit,
            variables,
        })
    }
}

/// The outcome of rendering: messages to put first, and the version's defaults.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub id: String,
    pub version: u32,
    pub messages: Vec<Message>,
    pub route: Option<String>,
    pub params: PromptParams,
}

impl Rendered {
    /// Puts the rendered messages before the client's and fills in the version's
    /// parameters wherever the request did not set its own.
    pub fn apply(self, req: &mut ChatRequest) {
        let mut messages = self.messages;
        messages.append(&mut req.messages);
        req.messages = messages;
        if let Some(route) = self.route {
            req.model = route;
        }
        let p = &mut req.params;
        let d = self.params;
        p.temperature = p.temperature.or(d.temperature);
        p.top_p = p.top_p.or(d.top_p);
        if p.max_tokens.is_none() && p.max_completion_tokens.is_none() {
            p.max_tokens = d.max_tokens;
        }
        if p.stop.is_empty() {
            p.stop = d.stop;
        }
        p.seed = p.seed.or(d.seed);
        if req.tools.is_empty() {
            req.tools = d.tools;
        }
        if req.tool_choice.is_none() {
            req.tool_choice = d.tool_choice;
        }
        if req.response_format.is_none() {
            req.response_format = d.response_format;
        }
    }
}

/// The execution budget of one template render, in minijinja instructions
/// (roughly one per output tag, filter, test or loop step). Real prompts and chat
/// templates use a few thousand; a runaway loop stops here after a few hundred
/// milliseconds at most instead of holding a worker thread.
pub const TEMPLATE_FUEL: u64 = 1_000_000;
/// How deep loops, conditions and calls may nest in a template.
pub const TEMPLATE_RECURSION_LIMIT: usize = 64;

/// The fixed part of a render's output budget; the rest scales with the text the
/// request brought (see [`output_cap`]).
pub const TEMPLATE_OUTPUT_BASE: usize = 8 * 1024 * 1024;
/// How many times its own text a request's render may write beyond the base.
pub const TEMPLATE_OUTPUT_FACTOR: usize = 4;
/// The largest integer (in magnitude) a prompt variable may carry, anywhere in
/// its value: integers can size strings (`"-" * n`), indentation and slices in a
/// template, so a client cannot ask for gigabytes with one number.
pub const MAX_VARIABLE_INTEGER: u64 = 1_000_000;
/// The largest `indent` width or `tojson` indentation a template may use.
const MAX_TEMPLATE_INDENT: usize = 256;
const OUTPUT_CAP_MESSAGE: &str = "template output exceeded its byte cap";

/// The output budget of a render whose inputs (messages or variables) hold
/// `input_bytes` bytes of text: a fixed 8 MiB plus four times the input.
pub fn output_cap(input_bytes: usize) -> usize {
    TEMPLATE_OUTPUT_BASE.saturating_add(input_bytes.saturating_mul(TEMPLATE_OUTPUT_FACTOR))
}

/// A render target that refuses to grow past its cap. A refused write stops the
/// render; whatever was written before is whole `str` pieces, so valid UTF-8.
struct CappedOutput {
    buf: Vec<u8>,
    cap: usize,
    overflowed: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.cap {
            self.overflowed = true;
            return Err(std::io::Error::other(OUTPUT_CAP_MESSAGE));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders `t` with `ctx`, writing at most `cap` bytes: past it the render stops
/// with an error [`over_limits`] recognises. Every request-time render goes through here.
pub fn render_capped<S: serde::Serialize>(
    t: &minijinja::Template<'_, '_>,
    ctx: S,
    cap: usize,
) -> Result<String, minijinja::Error> {
    let mut out = CappedOutput {
        buf: Vec::new(),
        cap,
        overflowed: false,
    };
    let result = t.render_captured_to(ctx, &mut out).map(drop);
    if out.overflowed {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            OUTPUT_CAP_MESSAGE,
        ));
    }
    result?;
    Ok(String::from_utf8(out.buf)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// Puts the execution limits on a template environment: every environment that
/// renders (prompts, chat templates, `check`'s sample renders) goes through here.
/// Besides fuel and nesting, the filters whose output a number multiplies
/// (`indent`, `tojson(indent=…)`) refuse widths past a small bound.
pub fn limit(env: &mut minijinja::Environment<'_>) {
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
    env.add_filter(
        "indent",
        |value: minijinja::value::StringInput<'_>,
         width: Option<usize>,
         first: Option<bool>,
         blank: Option<bool>,
         kwargs: minijinja::value::Kwargs|
         -> Result<minijinja::value::Value, minijinja::Error> {
            let w = match width {
                Some(w) => Some(w),
                None => kwargs.get::<Option<usize>>("width")?,
            };
            if w.is_some_and(|w| w > MAX_TEMPLATE_INDENT) {
                return Err(too_wide());
            }
            minijinja::filters::indent(value, w, first, blank, kwargs)
        },
    );
    env.add_filter(
        "tojson",
        |value: &minijinja::value::Value,
         indent: Option<minijinja::value::Value>,
         kwargs: minijinja::value::Kwargs|
         -> Result<minijinja::value::Value, minijinja::Error> {
            let indent = match indent {
                Some(i) => Some(i),
                None => kwargs.get::<Option<minijinja::value::Value>>("indent")?,
            };
            if let Some(n) = indent.as_ref().and_then(minijinja::value::Value::as_usize) {
                if n > MAX_TEMPLATE_INDENT {
                    return Err(too_wide());
                }
            }
            minijinja::filters::tojson(value, indent, kwargs)
        },
    );
}

fn too_wide() -> minijinja::Error {
    minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        format!("indentation wider than {MAX_TEMPLATE_INDENT} columns is not allowed"),
    )
}

/// Whether a render stopped at the execution limits.
pub fn over_limits(e: &minijinja::Error) -> bool {
    match e.kind() {
        minijinja::ErrorKind::OutOfFuel => true,
        minijinja::ErrorKind::InvalidOperation => {
            let s = e.to_string();
            s.contains("recursion limit") || s.contains(OUTPUT_CAP_MESSAGE)
        }
        _ => false,
    }
}

/// The text a render that hit the limits reports.
pub fn limits_message() -> String {
    format!(
        "the template exceeded its execution budget ({TEMPLATE_FUEL} steps, nesting depth {TEMPLATE_RECURSION_LIMIT}, output of {} MiB plus {TEMPLATE_OUTPUT_FACTOR} times the request's text)",
        TEMPLATE_OUTPUT_BASE / (1024 * 1024)
    )
}

/// A plausible value of a declared variable for `check`'s sample render: the
/// default if there is one, else a small value of the declared type.
fn sample_value(v: &VarDef) -> Value {
    if let Some(d) = &v.default {
        return d.clone();
    }
    match v.ty {
        VarType::String => Value::String("sample text".into()),
        VarType::Number => serde_json::json!(1.5),
        VarType::Integer => serde_json::json!(3),
        VarType::Boolean => Value::Bool(true),
        VarType::List => serde_json::json!(["sample one", "sample two", "sample three"]),
        VarType::Object => serde_json::json!({"name": "sample", "value": "sample text"}),
    }
}

fn template_name(id: &str, version: u32, index: usize) -> String {
    format!("{id}@{version}/messages[{index}]")
}

fn query_template_name(id: &str, version: u32, index: usize) -> String {
    format!("{id}@{version}/retrieval[{index}].query")
}

fn context_template_name(retriever: &str) -> String {
    format!("retriever:{retriever}")
}

/// The variables template `t` uses that are neither in `declared` nor the
/// template language's own, sorted.
fn undeclared(t: &minijinja::Template<'_, '_>, declared: &[&str]) -> Vec<String> {
    let mut unknown: Vec<String> = t
        .undeclared_variables(false)
        .into_iter()
        .filter(|n| !declared.contains(&n.as_str()) && !BUILTIN_NAMES.contains(&n.as_str()))
        .collect();
    unknown.sort();
    unknown
}

/// Compiles hook `i`'s query: it may use the prompt's declared variables only
/// (not other hooks' passages: hooks run concurrently).
fn compile_query(
    env: &mut minijinja::Environment<'static>,
    p: &PromptDef,
    v: &VersionDef,
    i: usize,
    h: &Hook,
    declared: &[&str],
    problems: &mut Vec<Problem>,
) {
    let file = p.file.display().to_string();
    let field = format!("versions.{}.retrieval[{i}].query", v.number);
    let name = query_template_name(&p.id, v.number, i);
    if let Err(e) = env.add_template_owned(name.clone(), h.query.clone()) {
        problems.push(Problem {
            file,
            line: Some(v.line),
            field,
            message: format!(
                "query template does not compile: {}",
                e.detail().unwrap_or(&e.to_string())
            ),
        });
        return;
    }
    if let Ok(t) = env.get_template(&name) {
        for n in undeclared(&t, declared) {
            problems.push(Problem {
                file: file.clone(),
                line: Some(v.line),
                field: field.clone(),
                message: format!("query uses `{n}`, which is not a declared variable"),
            });
        }
    }
}

/// Compiles a retriever's context template (the system message of the chat
/// extension); it may use `passages` and `query`.
fn compile_context_template(
    env: &mut minijinja::Environment<'static>,
    r: &crate::config::RetrieverConfig,
    problems: &mut Vec<Problem>,
) {
    let file = r.file.display().to_string();
    let name = context_template_name(&r.id);
    if let Err(e) = env.add_template_owned(name.clone(), r.template.clone()) {
        problems.push(Problem {
            file,
            line: None,
            field: "template".into(),
            message: format!(
                "template does not compile (line {} of the template): {}",
                e.line().unwrap_or(1),
                e.detail().unwrap_or(&e.to_string())
            ),
        });
        return;
    }
    if let Ok(t) = env.get_template(&name) {
        for n in undeclared(&t, &["passages", "query"]) {
            problems.push(Problem {
                file: file.clone(),
                line: None,
                field: "template".into(),
                message: format!("template uses `{n}`; it receives `passages` and `query` only"),
            });
        }
    }
}

/// Names the template language provides itself; they need no declaration.
const BUILTIN_NAMES: &[&str] = &[
    "range",
    "dict",
    "namespace",
    "debug",
    "loop",
    "self",
    "super",
    "varargs",
    "kwargs",
    "caller",
    "true",
    "false",
    "none",
    "True",
    "False",
    "None",
];

/// All prompts of a snapshot, compiled.
pub struct Registry {
    env: minijinja::Environment<'static>,
    prompts: BTreeMap<String, PromptDef>,
}

impl Registry {
    /// Compiles every template; reports each problem with `file:line`.
    pub fn build(prompts: BTreeMap<String, PromptDef>) -> Result<Registry, Vec<Problem>> {
        Registry::build_with(prompts, &BTreeMap::new())
    }

    /// Compiles every prompt template, every retrieval hook's query and every
    /// retriever's context template (the chat extension's system message).
    pub fn build_with(
        prompts: BTreeMap<String, PromptDef>,
        retrievers: &BTreeMap<String, crate::config::RetrieverConfig>,
    ) -> Result<Registry, Vec<Problem>> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        limit(&mut env);
        let mut problems = Vec::new();
        // Message templates are compiled here to be checked, then dropped: the
        // environment compiles each again from `sources` the first time a request
        // renders it. A compiled template costs ~15 KiB whatever its size, and a
        // large configuration has thousands of versions of which few serve.
        let mut sources: HashMap<String, String> = HashMap::new();
        for r in retrievers.values() {
            compile_context_template(&mut env, r, &mut problems);
        }
        for p in prompts.values() {
            let file = p.file.display().to_string();
            let mut declared: Vec<&str> = p.variables.iter().map(|v| v.name.as_str()).collect();
            for v in p.versions.values() {
                for (i, h) in v.retrieval.iter().enumerate() {
                    compile_query(&mut env, p, v, i, h, &declared, &mut problems);
                }
                let hooks: Vec<&str> = v.retrieval.iter().map(|h| h.into.as_str()).collect();
                declared.extend(&hooks);
                for (i, m) in v.messages.iter().enumerate() {
                    let name = template_name(&p.id, v.number, i);
                    sources.insert(name.clone(), m.source.clone());
                    if let Err(e) = env.add_template_owned(name.clone(), m.source.clone()) {
                        problems.push(Problem {
                            file: file.clone(),
                            line: Some(m.line + e.line().unwrap_or(1).saturating_sub(1)),
                            field: format!("versions.{}.messages[{i}].content", v.number),
                            message: format!(
                                "template does not compile: {}",
                                e.detail().unwrap_or(&e.to_string())
                            ),
                        });
                        continue;
                    }
                    if let Ok(t) = env.get_template(&name) {
                        // A sample render with typed values of the declared
                        // variables: a template that loops past its budget is
                        // rejected here rather than at the first request.
                        // Other errors depend on real values and are not reported.
                        let mut sample: Map<String, Value> = p
                            .variables
                            .iter()
                            .map(|var| (var.name.clone(), sample_value(var)))
                            .collect();
                        for h in &hooks {
                            sample.insert((*h).to_owned(), Value::String("sample context".into()));
                        }
                        let cap = output_cap(
                            sample
                                .values()
                                .map(text_bytes)
                                .fold(0, usize::saturating_add),
                        );
                        if let Err(e) =
                            render_capped(&t, minijinja::Value::from_serialize(&sample), cap)
                        {
                            if over_limits(&e) {
                                problems.push(Problem {
                                    file: file.clone(),
                                    line: Some(m.line + e.line().unwrap_or(1).saturating_sub(1)),
                                    field: format!("versions.{}.messages[{i}].content", v.number),
                                    message: format!(
                                        "{} on a sample render with typed sample values of the variables: bound its loops",
                                        limits_message()
                                    ),
                                });
                            }
                        }
                        for n in undeclared(&t, &declared) {
                            problems.push(Problem {
                                file: file.clone(),
                                line: Some(m.line),
                                field: format!("versions.{}.messages[{i}].content", v.number),
                                message: format!(
                                    "template uses `{n}`, which is not a declared variable"
                                ),
                            });
                        }
                    }
                    env.remove_template(&name);
                }
                declared.truncate(declared.len() - hooks.len());
            }
        }
        env.set_loader(move |name| Ok(sources.get(name).cloned()));
        if problems.is_empty() {
            Ok(Registry { env, prompts })
        } else {
            Err(problems)
        }
    }

    pub fn prompts(&self) -> impl Iterator<Item = &PromptDef> {
        self.prompts.values()
    }

    pub fn get(&self, id: &str) -> Option<&PromptDef> {
        self.prompts.get(id)
    }

    /// Finds the version a selector names.
    pub fn resolve(
        &self,
        id: &str,
        sel: &Selector,
    ) -> Result<(&PromptDef, &VersionDef), GatewayError> {
        let not_found = |message: String| GatewayError::NotFoundPrompt { message };
        let p = self.prompts.get(id).ok_or_else(|| {
            let ids: Vec<&str> = self.prompts.keys().map(String::as_str).collect();
            not_found(format!(
                "prompt `{id}` does not exist; prompts: {}",
                if ids.is_empty() {
                    "none".to_string()
                } else {
                    ids.join(", ")
                }
            ))
        })?;
        let number = match sel {
            Selector::Version(n) => *n,
            Selector::Label(l) => *p.labels.get(l).ok_or_else(|| {
                not_found(format!(
                    "prompt `{id}` has no label `{l}`; labels: {}",
                    describe_labels(p)
                ))
            })?,
        };
        let v = p.versions.get(&number).ok_or_else(|| {
            let vs: Vec<String> = p.versions.keys().map(u32::to_string).collect();
            not_found(format!(
                "prompt `{id}` has no version {number}; versions: {}",
                vs.join(", ")
            ))
        })?;
        Ok((p, v))
    }

    /// Validates the variables (types, required, unknown), applies defaults and
    /// renders the version's messages. Retrieval hooks are not run: each
    /// hook's variable is an empty list (the request path runs them, see
    /// [`Registry::prepare`]).
    pub fn render(&self, r: &PromptRef) -> Result<Rendered, GatewayError> {
        let resolved = self.prepare(r)?;
        let filled = resolved
            .version
            .retrieval
            .iter()
            .map(|h| (h.into.clone(), Value::Array(Vec::new())))
            .collect();
        self.render_prepared(resolved, filled)
    }

    /// The first step of rendering: the version a reference names, with its
    /// variables checked and defaults applied.
    pub fn prepare(&self, r: &PromptRef) -> Result<Prepared<'_>, GatewayError> {
        let (def, version) = self.resolve(&r.id, &r.selector)?;
        let vars = check_variables(def, &r.variables)?;
        Ok(Prepared { def, version, vars })
    }

    /// The query of hook `i` of a prepared version, rendered from the
    /// request's variables (as values, never as template source). A query
    /// past [`crate::retrieval::MAX_QUERY_BYTES`] is the client's error.
    pub fn hook_query(&self, r: &Prepared<'_>, i: usize) -> Result<String, GatewayError> {
        let (p, v) = (r.def, r.version);
        let name = query_template_name(&p.id, v.number, i);
        let max = crate::retrieval::MAX_QUERY_BYTES;
        self.env
            .get_template(&name)
            .and_then(|t| render_capped(&t, minijinja::Value::from_serialize(&r.vars), max + 1))
            .map_err(|e| {
                let message = if over_limits(&e) {
                    format!(
                        "prompt `{}` version {}: the query of retrieval[{i}] is longer than {max} bytes or exceeded the template limits",
                        p.id, v.number
                    )
                } else {
                    format!(
                        "prompt `{}` version {} failed to render the query of retrieval[{i}] ({}:{}): {}",
                        p.id,
                        v.number,
                        shown_path(&p.file),
                        v.line,
                        e.detail().map(str::to_owned).unwrap_or_else(|| e.to_string())
                    )
                };
                GatewayError::invalid(message, Some("prompt.variables"))
            })
    }

    /// Renders a prepared version's messages; `filled` holds each hook's
    /// variable (its passages), passed as values like the client's variables.
    pub fn render_prepared(
        &self,
        r: Prepared<'_>,
        filled: Map<String, Value>,
    ) -> Result<Rendered, GatewayError> {
        let (p, v) = (r.def, r.version);
        let mut vars = r.vars;
        vars.extend(filled);
        let ctx = minijinja::Value::from_serialize(&vars);
        // One output budget for all of the version's messages.
        let mut budget = output_cap(vars.values().map(text_bytes).fold(0, usize::saturating_add));
        let mut messages = Vec::with_capacity(v.messages.len());
        for (i, m) in v.messages.iter().enumerate() {
            let name = template_name(&p.id, v.number, i);
            let text =
                self.env
                    .get_template(&name)
                    .and_then(|t| render_capped(&t, &ctx, budget))
                    .map_err(|e| {
                        let line = m.line + e.line().unwrap_or(1).saturating_sub(1);
                        if over_limits(&e) {
                            tracing::warn!(prompt = %p.id, version = v.number, "a prompt render hit the template limits");
                            return GatewayError::invalid(
                                format!(
                                    "prompt `{}` version {} failed to render messages[{i}]: {}",
                                    p.id,
                                    v.number,
                                    limits_message()
                                ),
                                Some("prompt.variables"),
                            );
                        }
                        GatewayError::invalid(
                            format!(
                            "prompt `{}` version {} failed to render messages[{i}] ({}:{line}): {}",
                            p.id,
                            v.number,
                            shown_path(&p.file),
                            e.detail().map(str::to_owned).unwrap_or_else(|| e.to_string())
                        ),
                            Some("prompt.variables"),
                        )
                    })?;
            budget = budget.saturating_sub(text.len());
            messages.push(Message::text(m.role, text));
        }
        Ok(Rendered {
            id: p.id.clone(),
            version: v.number,
            messages,
            route: v.route.clone(),
            params: v.params.clone(),
        })
    }
}

impl Registry {
    /// Renders retriever `retriever`'s context template (compiled with the
    /// snapshot) with `passages` and `query` as values.
    pub fn render_context(
        &self,
        retriever: &str,
        passages: &Value,
        query: &str,
    ) -> Result<String, GatewayError> {
        let cap = output_cap(text_bytes(passages).saturating_add(query.len()));
        let ctx = minijinja::context! {
            passages => minijinja::Value::from_serialize(passages),
            query => query,
        };
        self.env
            .get_template(&context_template_name(retriever))
            .and_then(|t| render_capped(&t, ctx, cap))
            .map_err(|e| {
                let detail = if over_limits(&e) {
                    limits_message()
                } else {
                    e.detail()
                        .map(str::to_owned)
                        .unwrap_or_else(|| e.to_string())
                };
                GatewayError::Internal(format!(
                    "retriever `{retriever}`'s template failed to render: {detail}"
                ))
            })
    }
}

/// A prompt version resolved for a request, its variables checked.
pub struct Prepared<'a> {
    pub def: &'a PromptDef,
    pub version: &'a VersionDef,
    /// The client's variables with the defaults applied.
    pub vars: Map<String, Value>,
}

/// A prompt file as error bodies show it: relative to the configuration
/// (`prompts/<file>`), never the absolute path of the deployment.
fn shown_path(file: &std::path::Path) -> String {
    match file.file_name() {
        Some(name) => format!("prompts/{}", name.to_string_lossy()),
        None => "prompts/".into(),
    }
}

pub fn describe_labels(p: &PromptDef) -> String {
    if p.labels.is_empty() {
        return "none".into();
    }
    p.labels
        .iter()
        .map(|(l, v)| format!("{l}→{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_variables(
    p: &PromptDef,
    given: &Map<String, Value>,
) -> Result<Map<String, Value>, GatewayError> {
    for k in given.keys() {
        if !p.variables.iter().any(|v| &v.name == k) {
            let names: Vec<&str> = p.variables.iter().map(|v| v.name.as_str()).collect();
            return Err(GatewayError::invalid(
                format!(
                    "prompt `{}` has no variable `{k}`; its variables: {}",
                    p.id,
                    names.join(", ")
                ),
                Some(&format!("prompt.variables.{k}")),
            ));
        }
    }
    let mut out = Map::new();
    for v in &p.variables {
        let param = format!("prompt.variables.{}", v.name);
        match (given.get(&v.name), &v.default) {
            (Some(val), _) if !val.is_null() => {
                if !integers_bounded(val) {
                    return Err(GatewayError::invalid(
                        format!(
                            "variable `{}` of prompt `{}` holds an integer beyond ±{MAX_VARIABLE_INTEGER}; pass large numbers such as ids as strings",
                            v.name, p.id
                        ),
                        Some(&param),
                    ));
                }
                if !v.ty.accepts(val) {
                    return Err(GatewayError::invalid(
                        format!(
                            "variable `{}` of prompt `{}` must be a {}, got {}",
                            v.name,
                            p.id,
                            v.ty.as_str(),
                            json_type(val)
                        ),
                        Some(&param),
                    ));
                }
                out.insert(v.name.clone(), val.clone());
            }
            (_, Some(d)) => {
                out.insert(v.name.clone(), d.clone());
            }
            (_, None) => {
                return Err(GatewayError::invalid(
                    format!(
                        "variable `{}` ({}) of prompt `{}` is required",
                        v.name,
                        v.ty.as_str(),
                        p.id
                    ),
                    Some(&param),
                ))
            }
        }
    }
    Ok(out)
}

/// Whether every integer in `v` (floats with no fraction count: templates use
/// them as integers) is within ±[`MAX_VARIABLE_INTEGER`].
fn integers_bounded(v: &Value) -> bool {
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u <= MAX_VARIABLE_INTEGER
            } else if let Some(i) = n.as_i64() {
                i.unsigned_abs() <= MAX_VARIABLE_INTEGER
            } else {
                let f = n.as_f64().unwrap_or(0.0);
                f.fract() != 0.0 || f.abs() <= MAX_VARIABLE_INTEGER as f64
            }
        }
        Value::Array(a) => a.iter().all(integers_bounded),
        Value::Object(o) => o.values().all(integers_bounded),
        Value::Null | Value::Bool(_) | Value::String(_) => true,
    }
}

/// The text a value brings to a render, roughly: string bytes plus a few bytes
/// per scalar and key. Sizes the output budget; never allocates.
fn text_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(text_bytes).fold(8, usize::saturating_add),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| k.len().saturating_add(text_bytes(v)))
            .fold(8, usize::saturating_add),
        Value::Null | Value::Bool(_) | Value::Number(_) => 8,
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The content hash of a version: everything that shapes its requests.
pub fn version_hash(content: &Value) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(content.to_string().as_bytes());
    let mut s = String::from("sha256:");
    for b in &digest[..8] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn prompt_with_versions(id: &str, versions: u32) -> PromptDef {
        let version = |n: u32| VersionDef {
            number: n,
            hash: format!("sha256:{n:016x}"),
            description: None,
            route: None,
            params: PromptParams::default(),
            retrieval: Vec::new(),
            messages: vec![
                MessageTemplate {
                    role: Role::System,
                    source: format!("Wording {n}.{{% if vip %}} VIP.{{% endif %}}"),
                    line: 1,
                },
                MessageTemplate {
                    role: Role::User,
                    source: format!("{n}: {{{{ question | upper }}}}"),
                    line: 2,
                },
            ],
            line: 1,
        };
        PromptDef {
            id: id.to_owned(),
            file: PathBuf::from(format!("prompts/{id}.yaml")),
            description: None,
            variables: vec![
                VarDef {
                    name: "question".into(),
                    ty: VarType::String,
                    default: None,
                    description: None,
                },
                VarDef {
                    name: "vip".into(),
                    ty: VarType::Boolean,
                    default: Some(Value::Bool(false)),
                    description: None,
                },
            ],
            labels: BTreeMap::from([("production".to_owned(), versions)]),
            versions: (1..=versions).map(|n| (n, version(n))).collect(),
        }
    }

    /// A configuration holds thousands of versions of which few serve: a message
    /// template is checked when the registry is built, then compiled again only
    /// when a request renders it, and renders exactly as before.
    #[test]
    fn message_templates_are_compiled_when_first_rendered() {
        let prompts: BTreeMap<String, PromptDef> = (0..20)
            .map(|i| (format!("p{i}"), prompt_with_versions(&format!("p{i}"), 5)))
            .collect();
        let reg = Registry::build(prompts).unwrap();
        assert_eq!(
            reg.env.templates().count(),
            0,
            "nothing compiled is kept at build"
        );
        let ask = |id: &str, selector: Selector, vip: bool| {
            reg.render(&PromptRef {
                id: id.into(),
                selector,
                explicit_selector: None,
                variables: Map::from_iter([
                    ("question".to_owned(), Value::from("where is my parcel?")),
                    ("vip".to_owned(), Value::Bool(vip)),
                ]),
            })
            .unwrap()
        };
        let r = ask("p3", Selector::Version(2), true);
        let text = |m: &Message| m.content.as_ref().unwrap().text().into_owned();
        let texts: Vec<String> = r.messages.iter().map(text).collect();
        assert_eq!(texts, ["Wording 2. VIP.", "2: WHERE IS MY PARCEL?"]);
        assert_eq!(reg.env.templates().count(), 2, "the two messages of p3@2");
        let r = ask("p3", Selector::Label("production".into()), false);
        assert_eq!(r.version, 5);
        assert_eq!(text(&r.messages[0]), "Wording 5.");
        let r = ask("p3", Selector::Version(2), false);
        assert_eq!(text(&r.messages[0]), "Wording 2.");
        assert_eq!(reg.env.templates().count(), 4, "compiled once each");
    }

    /// Checking still compiles and test-renders every message template of every
    /// version, used or not.
    #[test]
    fn every_version_is_still_checked_at_build() {
        let mut p = prompt_with_versions("p", 5);
        p.versions.get_mut(&3).unwrap().messages[1].source = "{{ question ".into();
        p.versions.get_mut(&4).unwrap().messages[0].source = "{{ nope }}".into();
        let problems = Registry::build(BTreeMap::from([("p".to_owned(), p)]))
            .err()
            .unwrap();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "versions.3.messages[1].content",
                "versions.4.messages[0].content"
            ],
            "{problems:?}"
        );
        assert!(problems[1].message.contains("`nope`"), "{problems:?}");
    }

    #[test]
    fn widths_that_multiply_output_are_bounded() {
        let mut env = minijinja::Environment::new();
        limit(&mut env);
        env.add_template("i", "{{ text|indent(w) }}").unwrap();
        env.add_template("k", "{{ text|indent(width=w, first=true) }}")
            .unwrap();
        env.add_template("j", "{{ items|tojson(indent=w) }}")
            .unwrap();
        let text = "a\n".repeat(1000);
        for name in ["i", "k"] {
            let t = env.get_template(name).unwrap();
            assert_eq!(
                t.render(minijinja::context! {text => "a\nb", w => 2})
                    .unwrap(),
                if name == "i" { "a\n  b" } else { "  a\n  b" }
            );
            let e = t
                .render(minijinja::context! {text => text, w => 1_000_000})
                .unwrap_err();
            assert!(e.to_string().contains("indentation wider"), "{e}");
        }
        let t = env.get_template("j").unwrap();
        assert_eq!(
            t.render(minijinja::context! {items => vec![1], w => 1})
                .unwrap(),
            "[\n 1\n]"
        );
        let e = t
            .render(minijinja::context! {items => vec![1; 1000], w => 1_000_000})
            .unwrap_err();
        assert!(e.to_string().contains("indentation wider"), "{e}");
    }

    #[test]
    fn render_capped_stops_at_the_cap() {
        let mut env = minijinja::Environment::new();
        limit(&mut env);
        env.add_template("t", "{% for i in range(n) %}0123456789{% endfor %}")
            .unwrap();
        let t = env.get_template("t").unwrap();
        assert_eq!(
            render_capped(&t, minijinja::context! {n => 10}, 100)
                .unwrap()
                .len(),
            100
        );
        let e = render_capped(&t, minijinja::context! {n => 11}, 100).unwrap_err();
        assert!(over_limits(&e), "{e}");
    }

    #[test]
    fn deep_nesting_stops_at_the_recursion_limit() {
        let mut env = minijinja::Environment::new();
        limit(&mut env);
        env.add_template(
            "t",
            "{% for x in [items] recursive %}{{ loop(x.children) }}{% endfor %}",
        )
        .unwrap();
        let mut deep = serde_json::json!({"children": []});
        for _ in 0..100 {
            deep = serde_json::json!({"children": [deep]});
        }
        let e = env
            .get_template("t")
            .unwrap()
            .render(minijinja::context! {items => deep})
            .unwrap_err();
        assert!(over_limits(&e), "{e}");
    }
}
