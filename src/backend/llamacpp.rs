//! llama.cpp server's native completion API (`POST /completion`). It takes a raw
//! prompt, so the chat transcript is rendered here with the provider's chat
//! templates (minijinja, compiled once in [`Templates::compile`]). Answers are one
//! JSON object, or SSE `data:` events ending with the one that has `stop: true`
//! (there is no `[DONE]`). Errors are `{"error":{"code","message","type"}}`; older
//! builds wrote stream errors as an `error: {json}` SSE line.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Codec, HttpCall, Kind, Settings, StreamDecoder};
use crate::canonical::*;
use crate::config::{Capabilities, ProviderConfig, Section, Text};
use crate::error::{ErrorKind, UpstreamError};
use crate::framing::Frame;

/// A chat template for llama.cpp's raw-prompt API: the minijinja source
/// (rendered with `messages`, `add_generation_prompt`, `bos_token`) and the stop
/// words that end a turn.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    pub source: String,
    pub stop: Vec<String>,
}
use crate::backend::common::{
    self, classify_error_value, finish_stream, malformed_json, new_completion_id, open_stream,
    stream_meta,
};

/// The key of the template used for models without their own.
pub const FALLBACK_TEMPLATE: &str = "*";

/// Request fields taken from `ChatRequest::extra` as they are: llama.cpp's own
/// sampling knobs, which the OpenAI request has no field for.
const NATIVE_KNOBS: &[&str] = &[
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repeat_last_n",
    "penalize_nl",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "grammar",
    "n_probs",
    "min_keep",
    "n_keep",
    "dynatemp_range",
    "dynatemp_exponent",
    "xtc_probability",
    "xtc_threshold",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "dry_sequence_breakers",
    "ignore_eos",
    "samplers",
    "id_slot",
    "t_max_predict_ms",
];

// === chat templates ===

/// The provider's chat templates, compiled once. Rendering is strict: a variable
/// the template uses but the gateway does not pass is an error, not an empty
/// string.
pub struct Templates {
    env: minijinja::Environment<'static>,
    /// Stop words by template key (the template is registered under the same key).
    stops: HashMap<String, Vec<String>>,
}

/// One message as a template sees it: `{role, content}`, content as text.
#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'static str,
    content: std::borrow::Cow<'a, str>,
}

/// The environment chat templates compile and render in (and `check` renders
/// its sample in): one set of settings for both.
pub fn chat_env() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    // Hugging Face renders chat templates with these settings; templates copied
    // from a model card keep their whitespace.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    crate::prompt::limit(&mut env);
    // Used by many published templates to reject transcripts they cannot render.
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env
}

impl Templates {
    /// Compiles every template; the error names the one that does not compile.
    pub fn compile(templates: &BTreeMap<String, ChatTemplate>) -> Result<Self, String> {
        let mut env = chat_env();
        let mut stops = HashMap::with_capacity(templates.len());
        for (model, t) in templates {
            env.add_template_owned(model.clone(), t.source.clone())
                .map_err(|e| format!("chat template `{model}` does not compile: {e}"))?;
            stops.insert(model.clone(), t.stop.clone());
        }
        Ok(Templates { env, stops })
    }

    /// The key of the template for `model`: its own, else the `*` fallback.
    fn key_for<'a>(&'a self, model: &str) -> Option<&'a str> {
        self.stops
            .get_key_value(model)
            .or_else(|| self.stops.get_key_value(FALLBACK_TEMPLATE))
            .map(|(k, _)| k.as_str())
    }

    /// Renders the transcript of `req` into a prompt for `model`; returns the prompt
    /// and the template's stop words. Message text is passed as data, so template
    /// syntax inside a message is never evaluated.
    pub fn render(
        &self,
        req: &ChatRequest,
        model: &str,
    ) -> Result<(String, &[String]), UpstreamError> {
        let Some(key) = self.key_for(model) else {
            return Err(UpstreamError::new(
                ErrorKind::BadRequest,
                format!(
                    "no chat template for model `{model}`: add one under `llamacpp.templates` (or a `*` fallback)"
                ),
            ));
        };
        let messages: Vec<TemplateMessage<'_>> = req
            .messages
            .iter()
            .map(|m| TemplateMessage {
                role: match m.role {
                    Role::System | Role::Developer => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                    Role::Tool => "tool",
                },
                content: m
                    .content
                    .as_ref()
                    .map(Content::text)
                    .unwrap_or(std::borrow::Cow::Borrowed("")),
            })
            .collect();
        let render_error = |e: minijinja::Error| {
            let why = if crate::prompt::over_limits(&e) {
                crate::prompt::limits_message()
            } else {
                e.to_string()
            };
            UpstreamError::new(
                ErrorKind::BadRequest,
                format!("chat template `{key}` cannot render this conversation: {why}"),
            )
        };
        let template = self.env.get_template(key).map_err(render_error)?;
        let input = messages
            .iter()
            .map(|m| m.content.len().saturating_add(16))
            .fold(0, usize::saturating_add);
        let prompt = crate::prompt::render_capped(
            &template,
            minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                // llama-server adds the model's BOS itself when it tokenizes the
                // prompt; writing it here too would double it.
                bos_token => "",
            },
            crate::prompt::output_cap(input),
        )
        .map_err(render_error)?;
        let stop = self.stops.get(key).map(Vec::as_slice).unwrap_or(&[]);
        Ok((prompt, stop))
    }
}

// === requests ===

#[derive(Serialize)]
struct OutCompletion<'a> {
    prompt: &'a str,
    /// Ignored by a single-model server; routes the call on multi-model ones.
    #[serde(skip_serializing_if = "str::is_empty")]
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    n_predict: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop: Vec<&'a str>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    json_schema: Option<Value>,
    cache_prompt: bool,
    #[serde(flatten)]
    knobs: BTreeMap<&'a str, &'a Value>,
}

/// The JSON schema llama.cpp should constrain the output to, if any.
fn json_schema(f: Option<&ResponseFormat>) -> Option<Value> {
    match f? {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(serde_json::json!({"type": "object"})),
        // The OpenAI `json_schema` object wraps the schema with a name.
        ResponseFormat::JsonSchema(v) => {
            Some(v.get("schema").cloned().unwrap_or_else(|| v.clone()))
        }
    }
}

/// Encodes a `POST /completion` body for an already rendered `prompt`.
/// `template_stop` are the template's end-of-turn words, sent before the
/// request's own stop words. Without a token limit the server's default
/// (`-n`, unlimited unless set) applies.
pub fn encode_completion_request(
    req: &ChatRequest,
    model: &str,
    prompt: &str,
    template_stop: &[String],
) -> Result<Vec<u8>, UpstreamError> {
    if req.params.n.is_some_and(|n| n > 1) {
        return Err(UpstreamError::new(
            ErrorKind::BadRequest,
            "llama.cpp's /completion returns one choice: `n` must be 1",
        ));
    }
    // Normally refused earlier by the capabilities (tools and vision are off for
    // this kind); a provider file that turns them on must not lose them silently.
    if !req.tools.is_empty() && req.tool_choice != Some(ToolChoice::None) {
        return Err(UpstreamError::new(
            ErrorKind::BadRequest,
            "llama.cpp's native /completion has no tool calling: use the `openai` kind on the server's /v1 (started with --jinja)",
        ));
    }
    let has_image = req.messages.iter().any(|m| {
        matches!(&m.content, Some(Content::Parts(p)) if p.iter().any(|p| matches!(p, Part::Image { .. })))
    });
    if has_image {
        return Err(UpstreamError::new(
            ErrorKind::BadRequest,
            "the llamacpp kind sends a text prompt: images are not supported",
        ));
    }
    let mut stop: Vec<&str> = Vec::with_capacity(template_stop.len() + req.params.stop.len());
    for s in template_stop.iter().chain(&req.params.stop) {
        if !s.is_empty() && !stop.contains(&s.as_str()) {
            stop.push(s);
        }
    }
    let knobs = req
        .extra
        .iter()
        .filter(|(k, _)| NATIVE_KNOBS.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let out = OutCompletion {
        prompt,
        model,
        n_predict: req.params.output_limit(),
        stop,
        stream: req.stream,
        temperature: req.params.temperature,
        top_p: req.params.top_p,
        seed: req.params.seed,
        presence_penalty: req.params.presence_penalty,
        frequency_penalty: req.params.frequency_penalty,
        json_schema: json_schema(req.response_format.as_ref()),
        cache_prompt: true,
        knobs,
    };
    serde_json::to_vec(&out).map_err(|e| {
        UpstreamError::new(
            ErrorKind::BadRequest,
            format!("cannot encode the request: {e}"),
        )
    })
}

// === responses ===

#[derive(Deserialize, Default)]
struct InTimings {
    #[serde(default)]
    prompt_n: Option<u32>,
}

/// A `/completion` answer, or one stream event (most fields only on the last).
#[derive(Deserialize)]
struct InCompletion {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    stop: bool,
    #[serde(default)]
    stop_type: Option<String>,
    #[serde(default)]
    model: Option<String>,
    /// Prompt tokens, including any served from the prompt cache.
    #[serde(default)]
    tokens_evaluated: Option<u32>,
    #[serde(default)]
    tokens_predicted: Option<u32>,
    /// The prompt did not fit the context and was cut.
    #[serde(default)]
    truncated: bool,
    #[serde(default)]
    timings: Option<InTimings>,
    #[serde(default)]
    error: Option<Value>,
}

impl InCompletion {
    fn finish_reason(&self) -> FinishReason {
        match self.stop_type.as_deref() {
            Some("limit") => FinishReason::Length,
            // `eos`, `word`, and `none` (stopped without a reason, e.g. n_predict 0).
            _ => FinishReason::Stop,
        }
    }

    fn usage(&self) -> Option<Usage> {
        let prompt = self.tokens_evaluated?;
        let mut u = Usage::new(prompt, self.tokens_predicted?);
        // `timings.prompt_n` counts only the prompt tokens processed anew; the rest
        // came from the prompt cache.
        u.cached_tokens = self
            .timings
            .as_ref()
            .and_then(|t| t.prompt_n)
            .map(|n| prompt.saturating_sub(n));
        Some(u)
    }

    /// A prompt cut to fit the context is an error: the answer would ignore part
    /// of the conversation (often the system prompt). Newer builds reject such a
    /// prompt outright with `exceed_context_size_error`.
    fn check_truncated(&self) -> Result<(), UpstreamError> {
        if self.truncated {
            let n = self
                .tokens_evaluated
                .map(|n| format!(" ({n} tokens evaluated)"))
                .unwrap_or_default();
            return Err(UpstreamError::new(
                ErrorKind::ContextLength,
                format!(
                    "the prompt does not fit the model's context window: llama.cpp truncated it{n}"
                ),
            ));
        }
        Ok(())
    }
}

fn parse_completion(text: &[u8]) -> Result<InCompletion, UpstreamError> {
    let c: InCompletion = serde_json::from_slice(text)
        .map_err(|e| malformed_json("a body", "a llama.cpp completion", &e))?;
    if let Some(err) = &c.error {
        return Err(classify_error_value(200, err));
    }
    Ok(c)
}

/// Decodes a `/completion` answer (HTTP 2xx).
pub fn decode_completion_response(body: &[u8]) -> Result<ChatResponse, UpstreamError> {
    let c = parse_completion(body)?;
    c.check_truncated()?;
    let finish = c.finish_reason();
    let usage = c.usage();
    Ok(ChatResponse {
        id: new_completion_id(),
        created: unix_now(),
        model: c.model.unwrap_or_default(),
        choices: vec![Choice {
            index: 0,
            message: Message::text(Role::Assistant, c.content.unwrap_or_default()),
            finish_reason: Some(finish),
        }],
        usage,
        system_fingerprint: None,
    })
}

/// State of one `/completion` stream: each SSE `data:` event carries the next
/// piece of text; the one with `stop: true` carries the finish and the counters
/// and ends the stream.
#[derive(Debug, Default)]
pub struct CompletionStream {
    started: bool,
    role_sent: bool,
    done: bool,
}

impl CompletionStream {
    /// Decodes the `data` of one SSE event.
    pub fn data(&mut self, data: &str, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        let data = data.trim();
        if data.is_empty() || data == "[DONE]" {
            // Not part of the native protocol; a proxy in front may add it.
            return Ok(());
        }
        let mut c = parse_completion(data.as_bytes())?;
        open_stream(&mut self.started, out, || {
            stream_meta(new_completion_id(), None, c.model.take())
        });
        // The eos token and a completed stop word arrive as empty pieces.
        if let Some(text) = c.content.take().filter(|t| !t.is_empty()) {
            out.push(StreamEvent::Delta(Delta {
                role: (!self.role_sent).then_some(Role::Assistant),
                content: Some(text),
                ..Delta::default()
            }));
            self.role_sent = true;
        }
        if c.stop {
            c.check_truncated()?;
            self.done = true;
            finish_stream(c.finish_reason(), c.usage(), out);
        }
        Ok(())
    }

    /// Decodes an `error: {json}` SSE line (older builds) or the data of an
    /// `event: error`.
    pub fn error_line(&self, value: &str) -> UpstreamError {
        refine(common::error_event(value))
    }
}

impl StreamDecoder for CompletionStream {
    fn frame(&mut self, frame: Frame, out: &mut Vec<StreamEvent>) -> Result<(), UpstreamError> {
        // Older builds write a failure as an `error: {json}` line.
        let data = common::stream_data(&frame, |v| self.error_line(v))?;
        self.data(data, out)
    }

    /// True once the event with `stop: true` arrived.
    fn finished(&self) -> bool {
        self.done
    }
}

// === errors ===

/// "Loading model" is llama.cpp's 503 while the model loads: retry later.
fn refine(mut e: UpstreamError) -> UpstreamError {
    if e.kind != ErrorKind::ContextLength
        && e.message.to_ascii_lowercase().contains("loading model")
    {
        e.kind = ErrorKind::Overloaded;
    }
    e
}

/// Classifies a non-2xx answer: `{"error":{"code","message","type"}}`, where
/// `exceed_context_size_error` is a prompt too long for the context and
/// `unavailable_error` (503) a model still loading.
pub fn classify_error_body(status: u16, body: &[u8]) -> UpstreamError {
    refine(common::classify_error_body(status, body))
}

// === kind ===

pub static KIND: Kind = Kind {
    name: "llamacpp",
    gen_ai_provider: "llamacpp",
    auth_header: None,
    capabilities: Capabilities {
        tools: false,
        embeddings: false,
        vision: false,
        ..Capabilities::ALL
    },
    reports_usage: true,
    self_hosted: true,
    in_process: false,
    section: true,
    settings,
};

/// The `llamacpp:` section.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLlamacpp {
    #[serde(default)]
    templates: BTreeMap<String, RawTemplate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    template: String,
    #[serde(default)]
    stop: Vec<Text>,
}

/// Chat templates by upstream model name; `*` is the fallback for any model.
#[derive(Debug)]
struct LlamacppSettings {
    templates: BTreeMap<String, ChatTemplate>,
}

impl Settings for LlamacppSettings {
    fn codec(&self, _cfg: &ProviderConfig) -> Result<Arc<dyn Codec>, String> {
        Ok(Arc::new(LlamacppCodec::new(&self.templates)?))
    }
}

fn settings(s: &mut Section<'_>) -> Arc<dyn Settings> {
    let mut templates = BTreeMap::new();
    for (model, t) in s.parse::<RawLlamacpp>().unwrap_or_default().templates {
        if let Err(e) = check_chat_template(&t.template) {
            s.problem(&format!("templates.{model}.template"), e);
        }
        templates.insert(
            model,
            ChatTemplate {
                source: t.template,
                stop: t.stop.into_iter().map(|t| t.0).collect(),
            },
        );
    }
    if templates.is_empty() {
        s.problem(
            "templates",
            "llama.cpp's native API takes a raw prompt: give at least one chat template (`*` for every model)",
        );
    }
    Arc::new(LlamacppSettings { templates })
}

/// `check` for a llama.cpp chat template: it must compile, and a sample
/// conversation must render within the execution limits.
pub fn check_chat_template(source: &str) -> Result<(), String> {
    let mut env = chat_env();
    env.add_template("t", source)
        .map_err(|e| format!("does not compile: {e}"))?;
    let sample = minijinja::context! {
        messages => serde_json::json!([
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello, who are you?"},
            {"role": "assistant", "content": "An assistant. How can I help?"},
            {"role": "user", "content": "Summarise our conversation."},
        ]),
        add_generation_prompt => true,
        bos_token => "",
    };
    match env
        .get_template("t")
        .and_then(|t| crate::prompt::render_capped(&t, sample, crate::prompt::output_cap(0)))
    {
        Err(e) if crate::prompt::over_limits(&e) => Err(format!(
            "{} on a sample four-message conversation",
            crate::prompt::limits_message()
        )),
        _ => Ok(()),
    }
}

// === codec ===
//
// Codec for llama.cpp server's native `POST /completion`: the transcript is
// rendered into a raw prompt with the provider's chat templates (compiled once,
// here, when the provider is built), and the answer or SSE stream is read back.
// Tools and embeddings are not part of this API (use the `openai` kind on the
// server's `/v1` for those).

pub struct LlamacppCodec {
    /// The minijinja environment with every template compiled.
    templates: Templates,
}

impl LlamacppCodec {
    /// Compiles the chat templates (`*` is the fallback for any model). The error
    /// names the template that does not compile.
    pub fn new(templates: &BTreeMap<String, ChatTemplate>) -> Result<Self, String> {
        Ok(LlamacppCodec {
            templates: Templates::compile(templates)?,
        })
    }
}

impl Codec for LlamacppCodec {
    fn chat_call(&self, req: &ChatRequest, model: &str) -> Result<HttpCall, UpstreamError> {
        let (prompt, stop) = self.templates.render(req, model)?;
        Ok(HttpCall {
            path: "/completion".into(),
            body: encode_completion_request(req, model, &prompt, stop)?,
            headers: Vec::new(),
        })
    }

    fn chat_response(&self, body: &[u8]) -> Result<ChatResponse, UpstreamError> {
        decode_completion_response(body)
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(CompletionStream::default())
    }

    fn error(&self, status: u16, body: &[u8]) -> UpstreamError {
        classify_error_body(status, body)
    }

    fn embeddings_call(
        &self,
        _req: &EmbeddingsRequest,
        _model: &str,
    ) -> Result<HttpCall, UpstreamError> {
        Err(UpstreamError::new(
            ErrorKind::BadRequest,
            "llama.cpp's native API has no OpenAI-style embeddings: serve them through the `openai` kind on the server's /v1",
        ))
    }

    fn health_path(&self) -> Option<&str> {
        // 200 once the model is loaded, 503 `unavailable_error` while it loads.
        Some("/health")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::common::testing::{
        decode_stream, finish_of, fixture, recorded_chat, request as chat, text_of,
    };
    use crate::backend::llamacpp::LlamacppCodec;
    use serde_json::json;

    /// The templates of the shipped sample provider file, read straight from it.
    #[allow(clippy::disallowed_methods, clippy::disallowed_types)]
    fn sample_templates() -> BTreeMap<String, ChatTemplate> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("providers/llamacpp.yaml");
        let v: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let mut out = BTreeMap::new();
        for (k, t) in v["llamacpp"]["templates"].as_mapping().unwrap() {
            out.insert(
                k.as_str().unwrap().to_owned(),
                ChatTemplate {
                    source: t["template"].as_str().unwrap().to_owned(),
                    stop: t["stop"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .map(|s| s.as_str().unwrap().to_owned())
                        .collect(),
                },
            );
        }
        out
    }

    fn one(source: &str) -> Templates {
        let mut m = BTreeMap::new();
        m.insert(
            "*".to_owned(),
            ChatTemplate {
                source: source.to_owned(),
                stop: vec!["</s>".into()],
            },
        );
        Templates::compile(&m).unwrap()
    }

    fn transcript() -> ChatRequest {
        chat(vec![
            Message::text(Role::Developer, "Be brief."),
            Message::text(Role::User, "Hi"),
            Message::text(Role::Assistant, "Hello!"),
            Message::text(Role::User, "chat"),
        ])
    }

    /// Frames a recorded HTTP answer (status line, CRLF headers, blank line, body)
    /// and decodes its SSE body.
    fn sse_events(name: &str) -> Result<Vec<StreamEvent>, UpstreamError> {
        let body = fixture("llamacpp", name);
        let codec = LlamacppCodec::new(&BTreeMap::new()).unwrap();
        let (out, result, finished) = decode_stream(&codec, body.as_bytes(), 0);
        result?;
        assert!(finished, "no stop:true event in {name}");
        Ok(out)
    }

    fn usage_of(events: &[StreamEvent]) -> Option<Usage> {
        events.iter().find_map(|e| match e {
            StreamEvent::Usage(u) => Some(*u),
            _ => None,
        })
    }

    #[test]
    fn sample_chatml_template_matches_the_models_own() {
        // 23-props: the template embedded in the recorded server's model (ChatML).
        let props: Value =
            serde_json::from_str(&fixture("llamacpp", "recorded/23-props.body")).unwrap();
        let theirs = one(props["chat_template"].as_str().unwrap());
        let ours = Templates::compile(&sample_templates()).unwrap();
        let req = transcript();
        let (a, _) = theirs.render(&req, "any").unwrap();
        let (b, stop) = ours.render(&req, "any-model").unwrap();
        assert_eq!(a, b);
        // The one-line form of the README.
        let short = one(
            r"{% for m in messages %}{{ '<|im_start|>' ~ m.role ~ '\n' ~ m.content ~ '<|im_end|>\n' }}{% endfor %}{{ '<|im_start|>assistant\n' }}",
        );
        assert_eq!(short.render(&req, "any").unwrap().0, b);
        // As in Jinja2, one newline at the very end of the template source is
        // dropped: a prompt that must end with one writes it as an expression.
        let literal = one("{% for m in messages %}{{ m.content }}{% endfor %}\n");
        assert_eq!(
            literal.render(&req, "any").unwrap().0,
            "Be brief.HiHello!chat"
        );
        assert_eq!(
            b,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nchat<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert_eq!(stop, ["<|im_end|>".to_string()]);
    }

    #[test]
    fn sample_llama3_template_renders_the_llama3_format() {
        let t = Templates::compile(&sample_templates()).unwrap();
        let (p, stop) = t.render(&transcript(), "llama-3").unwrap();
        assert_eq!(
            p,
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nchat<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(stop, ["<|eot_id|>".to_string()]);
    }

    #[test]
    fn message_text_is_data_not_template_code() {
        let t = Templates::compile(&sample_templates()).unwrap();
        let evil = "{{ messages }} {% for x in [1,2] %}{{ x }}{% endfor %} {{ 7*7 }} {# no #}";
        let req = chat(vec![Message::text(Role::User, evil)]);
        let (p, _) = t.render(&req, "m").unwrap();
        assert_eq!(
            p,
            format!("<|im_start|>user\n{evil}<|im_end|>\n<|im_start|>assistant\n")
        );
    }

    #[test]
    fn template_selection_and_render_errors() {
        let mut m = BTreeMap::new();
        m.insert(
            "only".to_owned(),
            ChatTemplate {
                source: "{{ messages[0].content }}".into(),
                stop: vec![],
            },
        );
        m.insert(
            "strict".to_owned(),
            ChatTemplate {
                source: "{{ eos_token }}{{ messages[0].content }}".into(),
                stop: vec![],
            },
        );
        m.insert(
            "refuses".to_owned(),
            ChatTemplate {
                source: "{% if messages[0].role != 'system' %}{{ raise_exception('needs a system prompt') }}{% endif %}".into(),
                stop: vec![],
            },
        );
        let t = Templates::compile(&m).unwrap();
        let req = chat(vec![Message::text(Role::User, "x")]);
        assert_eq!(t.render(&req, "only").unwrap().0, "x");
        // No `*`: other models have no template.
        let e = t.render(&req, "other").unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.contains("`other`"), "{}", e.message);
        // Strict: an undefined variable is an error naming the template.
        let e = t.render(&req, "strict").unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.contains("`strict`"), "{}", e.message);
        let e = t.render(&req, "refuses").unwrap_err();
        assert!(e.message.contains("needs a system prompt"), "{}", e.message);
        // A template that does not compile is reported with its key.
        m.insert(
            "broken".to_owned(),
            ChatTemplate {
                source: "{% for %}".into(),
                stop: vec![],
            },
        );
        let e = Templates::compile(&m).err().unwrap();
        assert!(e.contains("`broken`"), "{e}");
    }

    #[test]
    fn request_maps_params_and_native_knobs() {
        let mut req = transcript();
        req.stream = true;
        req.params.max_tokens = Some(64);
        req.params.temperature = Some(0.2);
        req.params.top_p = Some(0.9);
        req.params.seed = Some(7);
        req.params.stop = vec!["END".into(), "<|im_end|>".into()];
        req.response_format = Some(ResponseFormat::JsonSchema(
            json!({"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}),
        ));
        req.extra.insert("top_k".into(), json!(20));
        req.extra.insert("mirostat".into(), json!(2));
        req.extra.insert("logprobs".into(), json!(true));
        req.extra.insert("prompt".into(), json!("injected"));
        let body =
            encode_completion_request(&req, "qwen", "PROMPT", &["<|im_end|>".into()]).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({
                "prompt": "PROMPT", "model": "qwen", "n_predict": 64,
                "stop": ["<|im_end|>", "END"], "stream": true,
                "temperature": 0.2, "top_p": 0.9, "seed": 7,
                "json_schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
                "cache_prompt": true, "top_k": 20, "mirostat": 2
            })
        );
        req.response_format = Some(ResponseFormat::JsonObject);
        req.params = Params::default();
        req.extra.clear();
        req.stream = false;
        let v: Value =
            serde_json::from_slice(&encode_completion_request(&req, "", "P", &[]).unwrap())
                .unwrap();
        assert_eq!(
            v,
            json!({"prompt": "P", "stream": false, "json_schema": {"type": "object"}, "cache_prompt": true})
        );
        req.params.n = Some(2);
        assert_eq!(
            encode_completion_request(&req, "", "P", &[])
                .unwrap_err()
                .kind,
            ErrorKind::BadRequest
        );
        // Tools and images cannot travel in a text prompt.
        req.params.n = None;
        req.tools = vec![Tool {
            name: "f".into(),
            description: None,
            parameters: None,
            strict: None,
        }];
        assert_eq!(
            encode_completion_request(&req, "", "P", &[])
                .unwrap_err()
                .kind,
            ErrorKind::BadRequest
        );
        req.tools.clear();
        req.messages[1].content = Some(Content::Parts(vec![Part::Image {
            url: "data:image/png;base64,AAAA".into(),
            detail: None,
        }]));
        assert_eq!(
            encode_completion_request(&req, "", "P", &[])
                .unwrap_err()
                .kind,
            ErrorKind::BadRequest
        );
    }

    #[test]
    fn recorded_answers_decode() {
        // 02: cut at n_predict.
        let r = decode_completion_response(
            fixture("llamacpp", "recorded/02-completion-length.body").as_bytes(),
        )
        .unwrap();
        assert_eq!(
            r.choices[0].message.content,
            Some(Content::Text(
                " alpha bravo charlie delta echo foxtrot golf hotel".into()
            ))
        );
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Length));
        assert_eq!(r.model, "tiny-llama-test");
        let u = r.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (8, 8, 16)
        );
        assert_eq!(u.cached_tokens, Some(1));
        // 04: a stop word; prompt tokens are tokens_evaluated, not timings.prompt_n (1).
        let r = decode_completion_response(
            fixture("llamacpp", "recorded/04-completion-stopword.body").as_bytes(),
        )
        .unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Stop));
        assert_eq!(
            r.choices[0].message.content,
            Some(Content::Text(" alpha bravo charlie".into()))
        );
        let u = r.usage.unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (8, 4));
        assert_eq!(u.cached_tokens, Some(7));
        // 06: end of sequence.
        let r = decode_completion_response(
            fixture("llamacpp", "recorded/06-completion-eos.body").as_bytes(),
        )
        .unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Stop));
        assert_eq!(r.usage.unwrap(), {
            let mut u = Usage::new(7, 5);
            u.cached_tokens = Some(1);
            u
        });
        // 08 (token prompt) and 09 (with completion_probabilities) decode too.
        let r = decode_completion_response(
            fixture("llamacpp", "recorded/08-completion-tokens-prompt.body").as_bytes(),
        )
        .unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Length));
        let r = decode_completion_response(
            fixture("llamacpp", "recorded/09-completion-nprobs.body").as_bytes(),
        )
        .unwrap();
        assert_eq!(
            r.choices[0].message.content,
            Some(Content::Text(" alpha bravo".into()))
        );
    }

    #[test]
    fn a_truncated_prompt_is_a_context_length_error() {
        let e = decode_completion_response(
            fixture("llamacpp", "recorded/29-context-overflow-truncated.body").as_bytes(),
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ContextLength);
        assert!(e.message.contains("347"), "{}", e.message);
    }

    #[test]
    fn recorded_streams_decode() {
        for (name, text, finish, usage) in [
            (
                "03-completion-stream-length.sse",
                " alpha bravo charlie delta echo",
                FinishReason::Length,
                (8, 5),
            ),
            (
                "05-completion-stream-stopword.sse",
                " alpha bravo charlie",
                FinishReason::Stop,
                (8, 4),
            ),
            (
                "07-completion-stream-eos.sse",
                " I do not know",
                FinishReason::Stop,
                (7, 5),
            ),
        ] {
            let events = sse_events(&format!("recorded/{name}")).unwrap();
            assert!(matches!(events[0], StreamEvent::Meta(_)), "{name}");
            assert_eq!(text_of(&events), text, "{name}");
            assert_eq!(finish_of(&events), Some(finish), "{name}");
            let u = usage_of(&events).unwrap();
            assert_eq!((u.prompt_tokens, u.completion_tokens), usage, "{name}");
            assert_eq!(events.last(), Some(&StreamEvent::Done), "{name}");
            // Empty pieces (the eos token, the stop word) produce no delta.
            assert!(events.iter().all(|e| match e {
                StreamEvent::Delta(d) => d.content.as_deref() != Some(""),
                _ => true,
            }));
        }
    }

    #[test]
    fn conformance_fixtures_decode() {
        let r = recorded_chat("llamacpp", decode_completion_response);
        assert_eq!(r.usage.unwrap().total_tokens, 18);
        let events = sse_events("chat.sse").unwrap();
        assert_eq!(text_of(&events), "Hello from the fake upstream.");
        assert_eq!(usage_of(&events).map(|u| u.total_tokens), Some(18));
        let events = sse_events("length.sse").unwrap();
        assert_eq!(finish_of(&events), Some(FinishReason::Length));
        // Older builds: an `error:` line; newer ones: `data: {"error":…}`.
        let e = sse_events("stream_error.sse").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
        let mut dec = CompletionStream::default();
        let e = dec
            .data(
                r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error","n_prompt_tokens":5000,"n_ctx":4096}}"#,
                &mut Vec::new(),
            )
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ContextLength);
        assert_eq!(
            dec.data("not json", &mut Vec::new()).unwrap_err().kind,
            ErrorKind::MalformedResponse
        );
    }

    #[test]
    fn errors_classify() {
        let cases: [(u16, String, ErrorKind); 8] = [
            (
                404,
                fixture("llamacpp", "recorded/26-err-not-found.body"),
                ErrorKind::BadRequest,
            ),
            (
                500,
                fixture("llamacpp", "recorded/27-err-bad-json.body"),
                ErrorKind::Overloaded,
            ),
            (
                500,
                fixture("llamacpp", "recorded/28-err-chat-no-messages.body"),
                ErrorKind::Overloaded,
            ),
            (
                400,
                fixture("llamacpp", "error_400_context.json"),
                ErrorKind::ContextLength,
            ),
            (
                400,
                fixture("llamacpp", "error_400.json"),
                ErrorKind::BadRequest,
            ),
            (401, fixture("llamacpp", "error_401.json"), ErrorKind::Auth),
            (
                429,
                fixture("llamacpp", "error_429.json"),
                ErrorKind::RateLimited,
            ),
            (
                503,
                fixture("llamacpp", "error_503_loading.json"),
                ErrorKind::Overloaded,
            ),
        ];
        for (status, body, kind) in cases {
            let e = classify_error_body(status, body.as_bytes());
            assert_eq!(e.kind, kind, "{status} {body}");
            assert!(!e.message.is_empty());
        }
        let dec = CompletionStream::default();
        assert_eq!(
            dec.error_line(r#"{"code":503,"message":"Loading model","type":"unavailable_error"}"#)
                .kind,
            ErrorKind::Overloaded
        );
    }

    /// llama.cpp templates with `source` as the `*` fallback.
    fn fallback_template(source: &str) -> Templates {
        Templates::compile(
            &[(
                "*".to_string(),
                ChatTemplate {
                    source: source.into(),
                    stop: vec![],
                },
            )]
            .into_iter()
            .collect(),
        )
        .unwrap()
    }

    #[test]
    fn chat_templates_are_checked_against_the_limits() {
        let ok = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        assert_eq!(check_chat_template(ok), Ok(()));
        let runaway = "{% for m in messages %}{% for i in range(100000) %}{% for j in range(100000) %}{{ m.role }}{% endfor %}{% endfor %}{% endfor %}";
        let e = check_chat_template(runaway).unwrap_err();
        assert!(e.contains("execution budget"), "{e}");
        let bomb = "{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}";
        assert!(check_chat_template(bomb)
            .unwrap_err()
            .contains("execution budget"));
        assert!(check_chat_template("{% for %}")
            .unwrap_err()
            .contains("does not compile"));
        // Errors that depend on the conversation are not `check`'s business.
        assert_eq!(
            check_chat_template("{{ raise_exception('roles must alternate') }}"),
            Ok(())
        );
    }

    #[test]
    fn a_chat_template_that_runs_away_on_a_long_conversation_is_a_bad_request() {
        // Passes `check` (four messages), but loops quadratically in the number
        // of messages: a long transcript runs out of budget at render time.
        let source = "{% for m in messages %}{% for n in messages %}{% for i in range(50) %}.{% endfor %}{% endfor %}{% endfor %}";
        assert_eq!(check_chat_template(source), Ok(()));
        let templates = fallback_template(source);
        let messages: Vec<serde_json::Value> = (0..400)
            .map(|i| serde_json::json!({"role": "user", "content": format!("message {i}")}))
            .collect();
        let req = crate::backend::openai::decode_chat_request(
            serde_json::json!({"model": "m", "messages": messages})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let e = templates.render(&req, "m").unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::BadRequest);
        assert!(e.message.contains("execution budget"), "{}", e.message);
    }

    #[test]
    fn a_chat_template_that_amplifies_a_message_stops_at_the_output_cap() {
        // Prints the last (1 MB) message once per message: 300 MB uncapped.
        let source = "{% for m in messages %}{{ messages[-1].content }}{% endfor %}";
        let templates = fallback_template(source);
        let mut messages: Vec<serde_json::Value> = (0..299)
            .map(|_| serde_json::json!({"role": "user", "content": "hi"}))
            .collect();
        messages.push(serde_json::json!({"role": "user", "content": "y".repeat(1 << 20)}));
        let req = crate::backend::openai::decode_chat_request(
            serde_json::json!({"model": "m", "messages": messages})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let e = templates.render(&req, "m").unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::BadRequest);
        assert!(e.message.contains("execution budget"), "{}", e.message);
        // A transcript rendered once is well inside the cap.
        let once = Templates::compile(
            &[(
                "*".to_string(),
                ChatTemplate {
                    source: "{% for m in messages %}{{ m.content }}{% endfor %}".into(),
                    stop: vec![],
                },
            )]
            .into_iter()
            .collect(),
        )
        .unwrap();
        let (p, _) = once.render(&req, "m").unwrap();
        assert_eq!(p.len(), 299 * 2 + (1 << 20));
    }
}
