//! The canonical model: one chat request, response, stream event, usage and finish
//! reason, defined once. Every ingress dialect decodes into these types and every
//! provider codec encodes from them; nothing here knows a wire format, so none of
//! these types is `Serialize`/`Deserialize`.

use serde_json::{Map, Value};

/// Who wrote a message. `Developer` is kept distinct so OpenAI-compatible backends
/// receive it as sent; other codecs fold it into `System`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One part of a multi-part message. Parts the gateway does not model (audio, files,
/// vendor extensions) are kept verbatim so OpenAI-compatible backends still get them.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Image { url: String, detail: Option<String> },
    Other(Value),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

impl Content {
    /// The text of the message, parts joined; used for token estimates and by
    /// backends that only take plain text.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Content::Text(t) => std::borrow::Cow::Borrowed(t),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    if let Part::Text(t) = p {
                        out.push_str(t);
                    }
                }
                std::borrow::Cow::Owned(out)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text exactly as the model produced it (it may be invalid JSON).
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: Option<Content>,
    pub name: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub tool_call_id: Option<String>,
    /// Reasoning text some backends return beside the answer.
    pub reasoning: Option<String>,
}

impl Message {
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: Some(Content::Text(text.into())),
            name: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            reasoning: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    pub parameters: Option<Value>,
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Function(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema(Value),
}

/// Sampling and output parameters a route may override.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub user: Option<String>,
}

impl Params {
    /// The output token limit, whichever field carried it.
    pub fn output_limit(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The public model name the client asked for (a route).
    pub model: String,
    pub messages: Vec<Message>,
    pub params: Params,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<ResponseFormat>,
    pub stream: bool,
    /// The client asked for a final usage event in the stream.
    pub include_usage: bool,
    /// Request fields the gateway does not model; OpenAI-compatible backends get them
    /// back unchanged, native codecs pass on those their protocol has a place for.
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    /// The text of the last user message, if there is one.
    pub fn last_user_text(&self) -> Option<String> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .and_then(|m| m.content.as_ref())
            .map(|c| c.text().into_owned())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub cached_tokens: Option<u32>,
    pub reasoning_tokens: Option<u32>,
    /// Counted by the gateway's tokenizer because the backend did not report it.
    pub estimated: bool,
}

impl Usage {
    pub fn new(prompt: u32, completion: u32) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            ..Usage::default()
        }
    }

    /// A backend's figures: its total if it sent one, else the (saturating) sum.
    pub fn reported(prompt: u32, completion: u32, total: Option<u32>) -> Self {
        let mut u = Usage::new(prompt, completion);
        if let Some(t) = total {
            u.total_tokens = t;
        }
        u
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub index: u32,
    pub message: Message,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    pub id: String,
    pub created: u64,
    /// The model that answered, as the backend named it.
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Option<Usage>,
    pub system_fingerprint: Option<String>,
}

/// A fragment of a tool call in a stream, keyed by `index` within its choice.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ToolCallDelta {
    pub index: u32,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delta {
    pub choice: u32,
    pub role: Option<Role>,
    pub content: Option<String>,
    pub reasoning: Option<String>,
    pub tool_calls: Vec<ToolCallDelta>,
    pub finish_reason: Option<FinishReason>,
}

impl Delta {
    /// True when the delta carries something a client would see as output.
    pub fn has_output(&self) -> bool {
        self.content.as_deref().is_some_and(|c| !c.is_empty())
            || self.reasoning.as_deref().is_some_and(|c| !c.is_empty())
            || !self.tool_calls.is_empty()
    }
}

/// Identity of a streamed response, fixed by its first event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
}

/// One canonical stream event. Codecs emit these; the egress encodes them in the
/// client's dialect.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// Identity of the response (id, model); emitted once, before any delta.
    Meta(StreamMeta),
    Delta(Delta),
    Usage(Usage),
    /// The backend ended the stream properly.
    Done,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EmbeddingInput {
    Texts(Vec<String>),
    Tokens(Vec<Vec<u32>>),
}

impl EmbeddingInput {
    pub fn len(&self) -> usize {
        match self {
            EmbeddingInput::Texts(t) => t.len(),
            EmbeddingInput::Tokens(t) => t.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmbeddingEncoding {
    #[default]
    Float,
    Base64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: EmbeddingInput,
    /// How the client wants vectors encoded; backends are always asked for floats.
    pub encoding: EmbeddingEncoding,
    pub dimensions: Option<u32>,
    pub user: Option<String>,
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsResponse {
    pub model: String,
    pub vectors: Vec<Vec<f32>>,
    pub usage: Usage,
}

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
