//! The `sandbox` provider: a deterministic, in-process stand-in for a model, so the
//! gateway runs end to end offline. It is not a model. Each configured sandbox
//! "model" is a behaviour: echo the last user message or cycle through scripted
//! replies, stream in chunks with set delays, return deterministic embeddings, or
//! fail on purpose (an HTTP status, a delay past the timeout, a stream cut).
//! It reports no usage, so the gateway's own token estimate is used.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::transport::{response_events, Timeouts};
use super::{Codec, EnvLookup, EventStream, Kind, Provider, Settings};
use crate::canonical::*;
use crate::config::{Capabilities, ProviderConfig, Section, Text};
use crate::error::{ErrorKind, UpstreamError};

pub static KIND: Kind = Kind {
    name: "sandbox",
    gen_ai_provider: "sandbox",
    auth_header: None,
    capabilities: Capabilities::ALL,
    reports_usage: false,
    self_hosted: true,
    in_process: true,
    section: true,
    settings,
};

/// The `sandbox:` section: `models:` by name, each a behaviour.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    models: BTreeMap<String, RawSandboxModel>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSandboxModel {
    #[serde(default)]
    reply: Option<SandboxReply>,
    #[serde(default)]
    script: Vec<Text>,
    #[serde(default)]
    chunk_chars: Option<usize>,
    #[serde(default)]
    chunk_delay: Option<String>,
    #[serde(default)]
    first_token_delay: Option<String>,
    #[serde(default)]
    delay: Option<String>,
    #[serde(default)]
    fail: Option<RawSandboxFail>,
    #[serde(default)]
    cut_after: Option<usize>,
    #[serde(default)]
    embedding_dims: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandboxFail {
    status: u16,
    #[serde(default)]
    message: Option<String>,
}

/// What a sandbox model answers.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SandboxReply {
    /// Repeats the last user message (as JSON under JSON mode).
    #[default]
    Echo,
    /// Cycles through `script`, one entry per user turn.
    Script,
}

#[derive(Debug, Clone)]
pub struct SandboxModel {
    pub reply: SandboxReply,
    pub script: Vec<String>,
    /// Characters per streamed chunk; 0 streams word by word.
    pub chunk_chars: usize,
    pub chunk_delay: Duration,
    pub first_token_delay: Duration,
    /// Added before the answer (or the stream's headers).
    pub delay: Duration,
    pub fail: Option<(u16, String)>,
    /// Cut the stream (an abrupt end, no finish) after this many chunks.
    pub cut_after: Option<usize>,
    pub embedding_dims: usize,
}

/// The sandbox's settings: its models, which are also the provider's model list.
#[derive(Debug)]
pub struct SandboxSettings {
    pub models: BTreeMap<String, SandboxModel>,
}

impl Settings for SandboxSettings {
    fn codec(&self, _cfg: &ProviderConfig) -> Result<Arc<dyn Codec>, String> {
        Err("a sandbox provider answers in-process; it has no HTTP codec".into())
    }

    fn provider(
        &self,
        cfg: &ProviderConfig,
        _env: EnvLookup<'_>,
    ) -> Result<Arc<dyn Provider>, String> {
        Ok(Arc::new(SandboxProvider::new(
            &cfg.id,
            self.models.clone(),
            cfg.timeouts,
        )))
    }

    fn models(&self) -> Option<Vec<String>> {
        Some(self.models.keys().cloned().collect())
    }
}

fn settings(s: &mut Section<'_>) -> Arc<dyn Settings> {
    let mut models = BTreeMap::new();
    let Some(raw) = s.parse::<RawSandbox>() else {
        if !s.is_present() {
            s.problem("", "a sandbox provider needs a `sandbox.models` section");
        }
        return Arc::new(SandboxSettings { models });
    };
    for (name, m) in raw.models {
        let f = |k: &str| format!("models.{name}.{k}");
        if m.reply == Some(SandboxReply::Script) && m.script.is_empty() {
            s.problem(
                &f("script"),
                "`reply: script` needs at least one scripted reply",
            );
        }
        if let Some(fail) = &m.fail {
            if !(400..=599).contains(&fail.status) {
                s.problem(&f("fail.status"), "must be an HTTP error status (400-599)");
            }
        }
        let model = SandboxModel {
            reply: m.reply.unwrap_or_default(),
            script: m.script.into_iter().map(|t| t.0).collect(),
            chunk_chars: m.chunk_chars.unwrap_or(0),
            chunk_delay: s.duration(&f("chunk_delay"), &m.chunk_delay, Duration::ZERO),
            first_token_delay: s.duration(
                &f("first_token_delay"),
                &m.first_token_delay,
                Duration::ZERO,
            ),
            delay: s.duration(&f("delay"), &m.delay, Duration::ZERO),
            fail: m.fail.map(|f| {
                let msg = f
                    .message
                    .unwrap_or_else(|| format!("sandbox: simulated HTTP {} failure", f.status));
                (f.status, msg)
            }),
            cut_after: m.cut_after,
            embedding_dims: m.embedding_dims.unwrap_or(16).clamp(1, 8192),
        };
        models.insert(name, model);
    }
    Arc::new(SandboxSettings { models })
}

pub struct SandboxProvider {
    id: Arc<str>,
    models: BTreeMap<String, SandboxModel>,
    timeouts: Timeouts,
}

impl SandboxProvider {
    pub fn new(id: &str, models: BTreeMap<String, SandboxModel>, timeouts: Timeouts) -> Self {
        SandboxProvider {
            id: id.into(),
            models,
            timeouts,
        }
    }

    fn model(&self, name: &str) -> Result<&SandboxModel, UpstreamError> {
        self.models.get(name).ok_or_else(|| {
            self.err(
                UpstreamError::new(
                    ErrorKind::BadRequest,
                    format!("sandbox has no model `{name}`"),
                )
                .with_status(404),
            )
        })
    }

    fn err(&self, mut e: UpstreamError) -> UpstreamError {
        e.provider = self.id.to_string();
        e
    }

    /// The configured delay before answering, bounded by the headers timeout as a
    /// real backend's silence would be; then the configured failure, if any.
    async fn before_answer(&self, m: &SandboxModel) -> Result<(), UpstreamError> {
        if !m.delay.is_zero() {
            if m.delay > self.timeouts.headers {
                tokio::time::sleep(self.timeouts.headers).await;
                return Err(self.err(UpstreamError::new(
                    ErrorKind::Timeout,
                    format!(
                        "backend sent no response headers within {}",
                        humantime::format_duration(self.timeouts.headers)
                    ),
                )));
            }
            tokio::time::sleep(m.delay).await;
        }
        if let Some((status, message)) = &m.fail {
            return Err(self.err(
                UpstreamError::new(ErrorKind::from_status(*status), message.clone())
                    .with_status(*status),
            ));
        }
        Ok(())
    }
}

fn last_user_text(req: &ChatRequest) -> String {
    req.last_user_text().unwrap_or_default()
}

/// The deterministic answer to `req`.
fn answer(m: &SandboxModel, req: &ChatRequest) -> ChatResponse {
    let last = req.messages.last();
    let forced_tool = match &req.tool_choice {
        Some(ToolChoice::Required) => req.tools.first(),
        Some(ToolChoice::Function(name)) => req.tools.iter().find(|t| &t.name == name),
        _ => None,
    };
    let mut message = Message::text(Role::Assistant, "");
    let mut finish = FinishReason::Stop;
    if let (Some(tool), false) = (forced_tool, last.is_some_and(|l| l.role == Role::Tool)) {
        let args = serde_json::json!({ "input": last_user_text(req) }).to_string();
        message.content = None;
        message.tool_calls.push(ToolCall {
            id: format!("call_sandbox_{}", req.messages.len()),
            name: tool.name.clone(),
            arguments: args,
        });
        finish = FinishReason::ToolCalls;
    } else {
        let mut text = match m.reply {
            SandboxReply::Echo => match last {
                Some(l) if l.role == Role::Tool => l
                    .content
                    .as_ref()
                    .map(|c| c.text().into_owned())
                    .unwrap_or_default(),
                _ => last_user_text(req),
            },
            SandboxReply::Script => {
                let turns = req.messages.iter().filter(|m| m.role == Role::User).count();
                m.script[turns.saturating_sub(1) % m.script.len()].clone()
            }
        };
        if let Some(limit) = req.params.output_limit() {
            let words: Vec<&str> = text.split_inclusive(' ').collect();
            if words.len() > limit as usize {
                text = words[..limit as usize].concat().trim_end().to_owned();
                finish = FinishReason::Length;
            }
        }
        if matches!(
            req.response_format,
            Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema(_))
        ) {
            text = serde_json::json!({ "echo": text }).to_string();
        }
        message.content = Some(Content::Text(text));
    }
    ChatResponse {
        id: format!(
            "chatcmpl-sandbox-{:016x}",
            fnv(last_user_text(req).as_bytes())
        ),
        created: unix_now(),
        model: String::new(),
        choices: vec![Choice {
            index: 0,
            message,
            finish_reason: Some(finish),
        }],
        usage: None,
        system_fingerprint: None,
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A unit vector derived from the text alone.
fn embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut state = fnv(text.as_bytes()) | 1;
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// Splits `text` into stream pieces: `chunk_chars` characters each, or words.
fn pieces(text: &str, chunk_chars: usize) -> Vec<String> {
    if chunk_chars == 0 {
        text.split_inclusive(' ').map(str::to_owned).collect()
    } else {
        let chars: Vec<char> = text.chars().collect();
        chars
            .chunks(chunk_chars)
            .map(|c| c.iter().collect())
            .collect()
    }
}

impl Provider for SandboxProvider {
    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<ChatResponse, UpstreamError>> {
        Box::pin(async move {
            let m = self.model(model)?;
            self.before_answer(m).await?;
            let mut resp = answer(m, req);
            resp.model = model.to_owned();
            Ok(resp)
        })
    }

    fn chat_stream<'a>(
        &'a self,
        req: &'a ChatRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<EventStream, UpstreamError>> {
        Box::pin(async move {
            let m = self.model(model)?.clone();
            self.before_answer(&m).await?;
            let mut resp = answer(&m, req);
            resp.model = model.to_owned();
            let provider = self.id.clone();
            let idle = self.timeouts.idle;
            let stream: EventStream = Box::pin(async_stream::stream! {
                let mut sent = 0usize;
                let mut first = true;
                for ev in response_events(resp) {
                    let text_delta = match &ev {
                        StreamEvent::Delta(d) => d.content.clone().filter(|c| !c.is_empty()).map(|c| (d.clone(), c)),
                        _ => None,
                    };
                    let Some((delta, text)) = text_delta else {
                        yield Ok(ev);
                        continue;
                    };
                    for piece in pieces(&text, m.chunk_chars) {
                        let wait = if first { m.first_token_delay } else { m.chunk_delay };
                        first = false;
                        if wait > idle {
                            tokio::time::sleep(idle).await;
                            let mut e = UpstreamError::new(ErrorKind::Timeout, "backend stream stalled past the idle timeout");
                            e.provider = provider.to_string();
                            yield Err(e);
                            return;
                        }
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        if m.cut_after.is_some_and(|n| sent >= n) {
                            let mut e = UpstreamError::new(
                                ErrorKind::MalformedResponse,
                                format!("backend stream was cut after {sent} chunks (sandbox cut_after)"),
                            );
                            e.provider = provider.to_string();
                            yield Err(e);
                            return;
                        }
                        sent += 1;
                        yield Ok(StreamEvent::Delta(Delta {
                            content: Some(piece),
                            role: delta.role.filter(|_| sent == 1),
                            tool_calls: Vec::new(),
                            ..delta.clone()
                        }));
                    }
                    if !delta.tool_calls.is_empty() {
                        yield Ok(StreamEvent::Delta(Delta { content: None, ..delta }));
                    }
                }
            });
            Ok(stream)
        })
    }

    fn embed<'a>(
        &'a self,
        req: &'a EmbeddingsRequest,
        model: &'a str,
    ) -> BoxFuture<'a, Result<EmbeddingsResponse, UpstreamError>> {
        Box::pin(async move {
            let m = self.model(model)?;
            self.before_answer(m).await?;
            // Like a real embedding model, the sandbox can shorten its vectors
            // but not lengthen them past its native size.
            let dims = match req.dimensions {
                None => m.embedding_dims,
                Some(d) if d as usize <= m.embedding_dims => d as usize,
                Some(d) => {
                    return Err(self.err(
                        UpstreamError::new(
                            ErrorKind::BadRequest,
                            format!(
                                "dimensions {d} is larger than the model's {} dimensions",
                                m.embedding_dims
                            ),
                        )
                        .with_status(400),
                    ))
                }
            };
            let texts: Vec<String> = match &req.input {
                EmbeddingInput::Texts(t) => t.clone(),
                EmbeddingInput::Tokens(t) => t
                    .iter()
                    .map(|ids| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))
                    .collect(),
            };
            Ok(EmbeddingsResponse {
                model: model.to_owned(),
                vectors: texts.iter().map(|t| embedding(t, dims.max(1))).collect(),
                usage: Usage::default(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sandbox() -> SandboxProvider {
        let model = SandboxModel {
            reply: SandboxReply::Echo,
            script: Vec::new(),
            chunk_chars: 0,
            chunk_delay: std::time::Duration::ZERO,
            first_token_delay: std::time::Duration::ZERO,
            delay: std::time::Duration::ZERO,
            fail: None,
            cut_after: None,
            embedding_dims: 16,
        };
        SandboxProvider::new(
            "sandbox",
            BTreeMap::from([("echo".to_owned(), model)]),
            Timeouts::default(),
        )
    }

    fn embed_request(dimensions: Option<u32>) -> EmbeddingsRequest {
        EmbeddingsRequest {
            model: "r".into(),
            input: EmbeddingInput::Texts(vec!["hello".into()]),
            encoding: EmbeddingEncoding::Float,
            dimensions,
            user: None,
            extra: Default::default(),
        }
    }

    #[tokio::test]
    async fn embeddings_never_grow_past_the_model_size() {
        let s = sandbox();
        let e = s
            .embed(&embed_request(Some(u32::MAX)), "echo")
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert_eq!(e.status, Some(400));
        let short = s.embed(&embed_request(Some(8)), "echo").await.unwrap();
        assert_eq!(short.vectors[0].len(), 8);
        let native = s.embed(&embed_request(None), "echo").await.unwrap();
        assert_eq!(native.vectors[0].len(), 16);
    }
}
