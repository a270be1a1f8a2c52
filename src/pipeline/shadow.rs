//! The shadow stage: a sampled copy of a live chat request goes to each
//! candidate of its route (or arm) once the client's answer is chosen, and
//! the two answers are compared when both have ended.
//!
//! On the request's path there is only [`Gateway::shadow_offer`] (a random
//! draw, then one permit per candidate from the route's gate, taken without
//! waiting: a busy gate drops the copy and counts it) and [`Offer::launch`]
//! (one spawned task). The client's answer never waits for a candidate and is
//! never changed by one: the task receives the primary's outcome by message
//! ([`PrimaryTx`]) when the answer (or the stream) has ended.
//!
//! A candidate call is one attempt, without retries, breakers, fallbacks or
//! the response cache; it does not count in the live metrics. Privacy is the
//! request's: a private request is never copied to a candidate that is not
//! self-hosted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::attempt::{check_capabilities, Answer, Chat, Operation};
use super::context::RequestContext;
use super::Gateway;
use crate::canonical::*;
use crate::ids::RouteId;
use crate::shadow::{compare, store, Comparison, Pair, Side, ToolCallOut};
use crate::snapshot::{Shadow, Target};

/// The most of one answer's text a pair keeps (and compares).
pub const MAX_TEXT: usize = 64 * 1024;

/// A stream is assembled up to this many bytes; past it the side has no text.
pub(super) const MAX_ASSEMBLED: usize = 1024 * 1024;

/// Process-wide shadow state: the live figures by route, arm and candidate
/// (they outlive snapshots) and the store's writer, opened on the first pair.
pub struct Shadows {
    live: Mutex<BTreeMap<LiveKey, Arc<Live>>>,
    /// The store's writer, opened on the first pair; `closed` at shutdown.
    writer: Mutex<WriterState>,
    path: std::path::PathBuf,
    /// Pairs older than this are deleted from the store.
    retention: Option<Duration>,
}

#[derive(Default)]
struct WriterState {
    writer: Option<store::Writer>,
    closed: bool,
}

/// (route, arm, candidate)
type LiveKey = (String, Option<String>, String);

impl Shadows {
    pub fn new(path: std::path::PathBuf, retention: Option<Duration>) -> Self {
        Shadows {
            retention,
            live: Mutex::new(BTreeMap::new()),
            writer: Mutex::new(WriterState::default()),
            path,
        }
    }

    fn live(&self, route: &str, arm: Option<&str>, candidate: &str) -> Arc<Live> {
        let mut map = self.live.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((
            route.to_owned(),
            arm.map(str::to_owned),
            candidate.to_owned(),
        ))
        .or_default()
        .clone()
    }

    /// Every pair's figures so far, for `/admin/experiments`.
    pub fn figures(&self) -> Vec<(LiveKey, Figures)> {
        let map = self.live.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.figures())).collect()
    }

    /// Keeps a pair in the store; false when its queue is full (or the store
    /// was closed at shutdown).
    fn keep(&self, pair: Pair) -> bool {
        let mut st = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if st.closed {
            return false;
        }
        st.writer
            .get_or_insert_with(|| store::Writer::open(self.path.clone(), self.retention))
            .try_send(pair)
    }

    /// Writes out what the store's queue holds, for at most `within`; pairs
    /// after this are not kept.
    pub fn close(&self, within: Duration) {
        let writer = {
            let mut st = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            st.closed = true;
            st.writer.take()
        };
        if let Some(w) = writer {
            w.close(within);
        }
    }
}

/// Live figures of one candidate against its primary: counts, and windows
/// of the latest latencies and similarities for their quantiles.
#[derive(Default)]
pub struct Live {
    inner: Mutex<LiveInner>,
}

#[derive(Default)]
struct LiveInner {
    pairs: u64,
    primary_errors: u64,
    candidate_errors: u64,
    compared: u64,
    exact: u64,
    tool_pairs: u64,
    tool_agree: u64,
    json_asked: u64,
    json_valid: u64,
    primary_ms: Window,
    candidate_ms: Window,
    similarity: Window,
    embedding: Window,
    primary_cost: f64,
    candidate_cost: f64,
    primary_tokens: u64,
    candidate_tokens: u64,
}

/// The latest values, at most [`Window::SIZE`].
#[derive(Default)]
struct Window {
    values: std::collections::VecDeque<f64>,
}

impl Window {
    const SIZE: usize = 1024;

    fn push(&mut self, v: f64) {
        if self.values.len() == Self::SIZE {
            self.values.pop_front();
        }
        self.values.push_back(v);
    }

    /// Nearest-rank quantile, as the readiness report computes it; `None`
    /// when empty.
    fn quantile(&self, q: f64) -> Option<f64> {
        let mut v: Vec<f64> = self.values.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        crate::shadow::report::quantile(&v, q)
    }
}

/// What `/admin/experiments` shows of one candidate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub pairs: u64,
    pub primary_errors: u64,
    pub candidate_errors: u64,
    pub compared: u64,
    pub exact_match_rate: Option<f64>,
    pub similarity_p50: Option<f64>,
    pub embedding_similarity_p50: Option<f64>,
    pub tool_agreement: Option<f64>,
    pub json_validity: Option<f64>,
    pub primary_latency_p50_ms: Option<f64>,
    pub primary_latency_p95_ms: Option<f64>,
    pub candidate_latency_p50_ms: Option<f64>,
    pub candidate_latency_p95_ms: Option<f64>,
    pub primary_cost: f64,
    pub candidate_cost: f64,
    /// Input plus output tokens of each side, summed over the pairs.
    pub primary_tokens: u64,
    pub candidate_tokens: u64,
}

fn ratio(n: u64, d: u64) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

impl Live {
    fn record(&self, pair: &Pair) {
        let mut l = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        l.pairs += 1;
        if pair.primary.error.is_some() {
            l.primary_errors += 1;
        } else {
            l.primary_ms.push(pair.primary.latency_ms);
        }
        if pair.candidate.error.is_some() {
            l.candidate_errors += 1;
        } else {
            l.candidate_ms.push(pair.candidate.latency_ms);
        }
        l.primary_cost += pair.primary.cost.unwrap_or(0.0);
        l.candidate_cost += pair.candidate.cost.unwrap_or(0.0);
        let tokens =
            |s: &crate::shadow::Side| u64::from(s.input_tokens) + u64::from(s.output_tokens);
        l.primary_tokens = l.primary_tokens.saturating_add(tokens(&pair.primary));
        l.candidate_tokens = l.candidate_tokens.saturating_add(tokens(&pair.candidate));
        if let Some(c) = &pair.comparison {
            l.compared += 1;
            l.exact += u64::from(c.exact);
            l.similarity.push(c.char_similarity);
            if let Some(e) = c.embedding_similarity {
                l.embedding.push(e);
            }
            if let Some(t) = c.tool_agreement {
                l.tool_pairs += 1;
                l.tool_agree += u64::from(t);
            }
            if let Some(j) = c.json {
                l.json_asked += 1;
                l.json_valid += u64::from(j.candidate_valid);
            }
        }
    }

    fn figures(&self) -> Figures {
        let l = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Figures {
            pairs: l.pairs,
            primary_errors: l.primary_errors,
            candidate_errors: l.candidate_errors,
            compared: l.compared,
            exact_match_rate: ratio(l.exact, l.compared),
            similarity_p50: l.similarity.quantile(0.5),
            embedding_similarity_p50: l.embedding.quantile(0.5),
            tool_agreement: ratio(l.tool_agree, l.tool_pairs),
            json_validity: ratio(l.json_valid, l.json_asked),
            primary_latency_p50_ms: l.primary_ms.quantile(0.5),
            primary_latency_p95_ms: l.primary_ms.quantile(0.95),
            candidate_latency_p50_ms: l.candidate_ms.quantile(0.5),
            candidate_latency_p95_ms: l.candidate_ms.quantile(0.95),
            primary_cost: l.primary_cost,
            candidate_cost: l.candidate_cost,
            primary_tokens: l.primary_tokens,
            candidate_tokens: l.candidate_tokens,
        }
    }
}

/// A request before rendering, for candidates that render another prompt
/// version ([`Shadow::prompt`]).
pub struct Source {
    pub req: ChatRequest,
    pub prompt: crate::prompt::PromptRef,
    pub caller: Option<crate::governance::Caller>,
    pub dialect: super::ClientDialect,
}

/// A sampled request's copy, its candidates' permits taken.
pub struct Offer {
    shadow: Arc<Shadow>,
    snapshot: Arc<crate::snapshot::Snapshot>,
    source: Option<Arc<Source>>,
    candidates: Vec<(Arc<Target>, OwnedSemaphorePermit)>,
    route: RouteId,
    arm: Option<Arc<str>>,
    request_id: Arc<str>,
    private: bool,
    /// A candidate's call ends by then at the latest: the route's deadline.
    deadline: Duration,
}

/// How the primary's outcome reaches the shadow task: sent when the answer
/// (or the stream) ended; dropped unsent when the client left first.
pub type PrimaryTx = oneshot::Sender<Primary>;

/// The primary's side of a pair.
pub struct Primary {
    pub target: Arc<Target>,
    /// From the start of the attempt loop to the answer's end.
    pub latency: Duration,
    /// To the first output, for a stream.
    pub ttft: Option<Duration>,
    /// The failure's name (an upstream failure's kind, else the gateway
    /// error's code, e.g. `no_target_available`).
    pub result: Result<Answered, &'static str>,
}

/// The primary's answer as the request's path has it.
pub enum Answered {
    Decoded(ChatResponse),
    /// A forwarded (fast path) answer's bytes, decoded by the shadow task
    /// off the request's path, and its usage (estimated where the backend
    /// reported none).
    Forwarded(bytes::Bytes, Usage),
}

impl Gateway {
    /// The request's copy, offered and launched once its answer is chosen
    /// (`None`, the common case: a route without candidates, a draw that did
    /// not sample it, or no candidate free to take it).
    pub(super) fn shadow_launch(
        self: &Arc<Self>,
        ctx: &RequestContext,
        req: &ChatRequest,
    ) -> Option<PrimaryTx> {
        if ctx.route().shadow.is_none() && ctx.arm().is_none_or(|a| a.shadow.is_none()) {
            return None;
        }
        let offer = self.shadow_offer(ctx, req)?;
        let (tx, rx) = oneshot::channel();
        offer.launch(self, req.clone(), rx);
        Some(tx)
    }

    /// Draws whether this request is copied to its route's (or arm's)
    /// candidates, and takes a permit for each candidate that may take it.
    /// `None` (the common case) costs one random draw, or nothing on a route
    /// without candidates.
    pub(super) fn shadow_offer(&self, ctx: &RequestContext, req: &ChatRequest) -> Option<Offer> {
        let route = ctx.route();
        let shadow = ctx
            .arm()
            .and_then(|a| a.shadow.as_ref())
            .or(route.shadow.as_ref())?;
        if !(shadow.sample >= 1.0 || rand::random::<f64>() < shadow.sample) {
            return None;
        }
        let m = &self.metrics.shadow;
        let mut candidates = Vec::with_capacity(shadow.candidates.len());
        for c in &shadow.candidates {
            if ctx.private && !c.self_hosted {
                m.dropped(&route.name, "private");
                continue;
            }
            if check_capabilities(c, req).is_err() {
                m.dropped(&route.name, "unsupported");
                continue;
            }
            match shadow.gate.clone().try_acquire_owned() {
                Ok(p) => candidates.push((c.clone(), p)),
                Err(_) => m.dropped(&route.name, "in_flight"),
            }
        }
        if candidates.is_empty() {
            return None;
        }
        Some(Offer {
            shadow: shadow.clone(),
            snapshot: ctx.snapshot.clone(),
            source: ctx.shadow_source.clone(),
            candidates,
            route: route.name.clone(),
            arm: ctx.arm().map(|a| a.name.clone()),
            request_id: ctx.request_id.clone(),
            private: ctx.private,
            deadline: route.retry.deadline,
        })
    }
}

impl Offer {
    /// Starts the candidates' calls now (the client's answer has been
    /// chosen); they are compared with the primary's outcome when `primary`
    /// delivers it.
    pub(super) fn launch(
        self,
        gw: &Arc<Gateway>,
        req: ChatRequest,
        primary: oneshot::Receiver<Primary>,
    ) {
        let gw = gw.clone();
        // The task's whole state machine (the candidates' calls, the
        // re-render, the comparison) is large: it is boxed inside the task,
        // so the request's path moves and allocates only the small launcher.
        crate::task::spawn("shadow", async move {
            Box::pin(self.run(gw, req, primary)).await;
        });
    }

    async fn run(self, gw: Arc<Gateway>, req: ChatRequest, primary: oneshot::Receiver<Primary>) {
        let m = &gw.metrics.shadow;
        let route = self.route.clone();
        let rid = &self.request_id;
        let this = &self;
        let calls = self.candidates.iter().map(|(t, _)| {
            let gw = &gw;
            let req = &req;
            let route = &route;
            async move {
                m.in_flight(route, 1);
                // A copy whose re-rendered request turned private is not
                // sent (counted as dropped): no call, no outcome, no pair.
                let called = async {
                    match (&this.shadow.prompt, &this.source) {
                        (Some(selector), Some(source)) => {
                            this.rerendered(gw, t, source, selector).await
                        }
                        _ => Some(call(gw, t, req).await),
                    }
                };
                let side = tokio::time::timeout(this.deadline, called)
                    .await
                    .unwrap_or_else(|_| Some(timed_out(t, this.deadline)));
                m.in_flight(route, -1);
                let side = side?;
                let outcome = side.0.error.as_deref().unwrap_or("ok");
                m.call(route, &t.id, outcome, ms(side.0.latency_ms));
                tracing::debug!(shadow = true, route = %route, candidate = %t.id,
                    request_id = %rid, outcome, latency_ms = side.0.latency_ms,
                    "shadow call ended");
                Some(side)
            }
        });
        let sides = futures_util::future::join_all(calls).await;
        // The permits go back as soon as the candidates have answered.
        let Offer {
            shadow,
            candidates,
            request_id,
            arm,
            private,
            source,
            ..
        } = self;
        // A candidate that rendered its own prompt version may have taken
        // passages the live request did not: its answer is embedded on
        // self-hosted targets only.
        let private = private || (shadow.prompt.is_some() && source.is_some());
        let targets: Vec<Arc<Target>> = candidates.into_iter().map(|(t, _)| t).collect();
        let primary = primary.await.ok();
        let (p_side, p_resp) = match primary {
            Some(p) => primary_side(p),
            None => (
                Side {
                    error: Some("cancelled".into()),
                    ..Side::default()
                },
                None,
            ),
        };
        let at_ms = crate::shadow::now_ms();
        let sent = targets
            .iter()
            .zip(sides)
            .filter_map(|(t, side)| Some((t, side?)));
        for (target, (c_side, c_resp)) in sent {
            let mut pair = Pair {
                at_ms,
                request_id: request_id.to_string(),
                route: route.to_string(),
                arm: arm.as_deref().map(str::to_owned),
                source: "live".into(),
                stream: req.stream,
                primary: p_side.clone(),
                candidate: c_side,
                comparison: None,
                request: None,
            };
            if let (Some(_), Some(_)) = (&p_resp, &c_resp) {
                pair.comparison =
                    Some(compared(&gw, &shadow, &request_id, private, &req, &pair).await);
            }
            if let Some(c) = &pair.comparison {
                m.similarity(&route, &target.id, c.char_similarity);
            }
            gw.shadows
                .live(&route, arm.as_deref(), &target.id)
                .record(&pair);
            if shadow.keep_outputs {
                pair.request = Some(request_json(&req));
            } else {
                forget_outputs(&mut pair);
            }
            if !gw.shadows.keep(pair) {
                m.dropped(&route, "store_full");
            }
        }
    }
}

impl Offer {
    /// A candidate's call with the request rendered at the shadow's prompt
    /// version, under the same data protection as the live request: a block
    /// fails the side (`blocked`), and a request that this makes private is
    /// not sent to a candidate that is not self-hosted.
    async fn rerendered(
        &self,
        gw: &Arc<Gateway>,
        t: &Target,
        source: &Source,
        selector: &crate::prompt::Selector,
    ) -> Option<(Side, Option<ChatResponse>)> {
        let failed = |kind: &str| {
            let side = Side {
                target: t.id.to_string(),
                error: Some(kind.to_owned()),
                ..Side::default()
            };
            Some((side, None))
        };
        let rendered = super::render::for_shadow(
            gw,
            &self.snapshot,
            &self.request_id,
            source,
            selector,
            self.private,
        )
        .await;
        let Some((mut req, mut ctx)) = rendered else {
            return failed("prompt_error");
        };
        if crate::protect::apply(&mut ctx, &mut req, &gw.governor.metrics).is_err() {
            return failed("blocked");
        }
        if ctx.private && !t.self_hosted {
            gw.metrics.shadow.dropped(&self.route, "private");
            return None;
        }
        Some(call(gw, t, &req).await)
    }
}

/// The comparison of two answered sides, with the embedding similarity when
/// the shadow names an embeddings route.
async fn compared(
    gw: &Arc<Gateway>,
    shadow: &Shadow,
    request_id: &Arc<str>,
    private: bool,
    req: &ChatRequest,
    pair: &Pair,
) -> Comparison {
    let mut c = compare::compare(
        &pair.primary,
        &pair.candidate,
        compare::json_ask(req.response_format.as_ref()),
    );
    if let Some(route) = &shadow.embeddings {
        c.embedding_similarity = embedding_similarity(
            gw,
            route,
            request_id,
            private,
            [&pair.primary.text, &pair.candidate.text],
        )
        .await;
    }
    c
}

async fn embedding_similarity(
    gw: &Arc<Gateway>,
    route: &str,
    request_id: &Arc<str>,
    private: bool,
    texts: [&String; 2],
) -> Option<f64> {
    if texts.iter().any(|t| t.trim().is_empty()) {
        return None;
    }
    let req = EmbeddingsRequest {
        model: route.to_owned(),
        input: EmbeddingInput::Texts(texts.iter().map(|t| t.to_string()).collect()),
        encoding: EmbeddingEncoding::Float,
        dimensions: None,
        user: None,
        extra: Default::default(),
    };
    let ctx =
        RequestContext::for_internal_embeddings(request_id.clone(), gw.snapshot(), &req, private)
            .ok()?;
    let served = gw.embed(&ctx, req).await.ok()?;
    let v = &served.value.vectors;
    compare::cosine(v.first()?, v.get(1)?)
}

fn ms(latency_ms: f64) -> Duration {
    Duration::try_from_secs_f64(latency_ms / 1000.0).unwrap_or_default()
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A side's call, failed as a timeout when it takes longer than `deadline`.
async fn within(
    deadline: Duration,
    t: &Target,
    called: impl std::future::Future<Output = (Side, Option<ChatResponse>)>,
) -> (Side, Option<ChatResponse>) {
    tokio::time::timeout(deadline, called)
        .await
        .unwrap_or_else(|_| timed_out(t, deadline))
}

/// The side of a call that did not end within `deadline`.
fn timed_out(t: &Target, deadline: Duration) -> (Side, Option<ChatResponse>) {
    let side = Side {
        target: t.id.to_string(),
        latency_ms: millis(deadline),
        error: Some(crate::error::ErrorKind::Timeout.as_str().to_owned()),
        ..Side::default()
    };
    (side, None)
}

/// One call to a candidate: a single attempt (no retries, no breaker, no
/// cache), a stream read to its end. The side, and the answer when there is
/// one.
pub(crate) async fn call(
    gw: &Gateway,
    t: &Target,
    req: &ChatRequest,
) -> (Side, Option<ChatResponse>) {
    let started = Instant::now();
    let mut ttft = None;
    let result = match Chat(req).call(gw, t).await {
        Err(e) => Err(e.kind.as_str()),
        Ok(Answer::Complete(resp)) => Ok(resp),
        Ok(Answer::Stream(head, mut rest)) => {
            ttft = Some(started.elapsed());
            let mut asm = crate::cache::Assembler::with_limit(MAX_ASSEMBLED);
            for ev in &head {
                asm.push(ev);
            }
            let mut ended = Ok(());
            while let Some(ev) = rest.next().await {
                match ev {
                    Ok(StreamEvent::Done) => break,
                    Ok(ev) => asm.push(&ev),
                    Err(e) => {
                        ended = Err(e.kind.as_str());
                        break;
                    }
                }
            }
            ended.map(|()| asm.finish())
        }
    };
    let latency = started.elapsed();
    // Usage the backend did not report is estimated, as for live traffic.
    let result = match result {
        Ok(mut resp) if resp.usage.is_none() => {
            let text = crate::tokens::response_text(&resp);
            resp.usage = Some(crate::tokens::estimate_async(t.encoding, req, None, &text, 0).await);
            Ok(resp)
        }
        other => other,
    };
    side_of(t, latency, ttft, result)
}

/// Tells the request's shadow task, if it has one, that the primary failed:
/// an upstream failure by its kind, any other (no target could take it, …)
/// by its code, never as `cancelled` (the client did not leave). The first
/// target of its chain is named.
pub(super) fn primary_failed(
    ctx: &RequestContext,
    tx: Option<PrimaryTx>,
    started: Instant,
    e: &crate::error::GatewayError,
) {
    let (Some(tx), Some(target)) = (tx, ctx.chain().first().cloned()) else {
        return;
    };
    let failure = match e {
        crate::error::GatewayError::Upstream(u) => u.kind.as_str(),
        other => other.code(),
    };
    let _ = tx.send(Primary {
        target,
        latency: started.elapsed(),
        ttft: None,
        result: Err(failure),
    });
}

/// The primary's side and answer.
fn primary_side(p: Primary) -> (Side, Option<ChatResponse>) {
    let result = match p.result {
        Ok(Answered::Decoded(resp)) => Ok(resp),
        Ok(Answered::Forwarded(body, usage)) => crate::backend::openai::decode_chat_response(&body)
            .map(|mut resp| {
                resp.usage.get_or_insert(usage);
                resp
            })
            .map_err(|e| e.kind.as_str()),
        Err(e) => Err(e),
    };
    side_of(&p.target, p.latency, p.ttft, result)
}

/// A side from a target's outcome.
fn side_of(
    t: &Target,
    latency: Duration,
    ttft: Option<Duration>,
    result: Result<ChatResponse, &'static str>,
) -> (Side, Option<ChatResponse>) {
    let mut side = Side {
        target: t.id.to_string(),
        latency_ms: millis(latency),
        ttft_ms: ttft.map(millis),
        ..Side::default()
    };
    match result {
        Err(failure) => {
            side.error = Some(failure.to_owned());
            (side, None)
        }
        Ok(resp) => {
            if let Some(u) = resp.usage {
                side.input_tokens = u.prompt_tokens;
                side.output_tokens = u.completion_tokens;
                side.cost = t
                    .price
                    .as_ref()
                    .map(|p| crate::governance::spend::cost(p, &u));
            }
            if let Some(c) = resp.choices.first() {
                side.finish = c.finish_reason.map(|f| f.as_str().to_owned());
                if let Some(content) = &c.message.content {
                    let text = content.text();
                    let mut end = text.len().min(MAX_TEXT);
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    side.text = text[..end].to_owned();
                }
                side.tool_calls = c
                    .message
                    .tool_calls
                    .iter()
                    .map(|tc| ToolCallOut {
                        name: tc.name.clone(),
                        arguments: tc.arguments.clone(),
                    })
                    .collect();
            }
            (side, Some(resp))
        }
    }
}

/// A pair that does not keep outputs: the texts and tool-call arguments go
/// (the comparison was made already); the tool names stay.
fn forget_outputs(pair: &mut Pair) {
    for side in [&mut pair.primary, &mut pair.candidate] {
        side.text.clear();
        for call in &mut side.tool_calls {
            call.arguments.clear();
        }
    }
}

/// The request as OpenAI chat JSON, for a pair that keeps outputs.
fn request_json(req: &ChatRequest) -> String {
    String::from_utf8_lossy(&crate::backend::openai::encode_chat_request(
        req, &req.model, false,
    ))
    .into_owned()
}

/// One replayed request (`promptgate replay`): the route's shadow candidate
/// called as a live copy would be, against the recorded primary side when the
/// record has one, else against the route's first target called now (one
/// attempt, like the candidate). Both calls run at once.
pub async fn replay_pair(
    gw: &Arc<Gateway>,
    route: &crate::snapshot::Route,
    req: ChatRequest,
    request_id: String,
    recorded: Option<Side>,
    private: bool,
) -> Option<Pair> {
    let shadow = route.shadow.as_ref()?;
    let candidate = shadow.candidates.first()?;
    let deadline = route.retry.deadline;
    let primary = async {
        match recorded {
            Some(side) => {
                let answered = side.error.is_none();
                (side, answered)
            }
            None => match route.targets().first() {
                Some(t) => {
                    let (side, resp) = within(deadline, t, call(gw, t, &req)).await;
                    (side, resp.is_some())
                }
                None => (
                    Side {
                        error: Some("no_target".into()),
                        ..Side::default()
                    },
                    false,
                ),
            },
        }
    };
    let candidate_call = within(deadline, candidate, call(gw, candidate, &req));
    let ((p_side, p_ok), (c_side, c_resp)) =
        futures_util::future::join(primary, candidate_call).await;
    let at_ms = crate::shadow::now_ms();
    let mut pair = Pair {
        at_ms,
        request_id,
        route: route.name.to_string(),
        arm: None,
        source: "replay".into(),
        stream: req.stream,
        primary: p_side,
        candidate: c_side,
        comparison: None,
        request: Some(request_json(&req)),
    };
    if p_ok && c_resp.is_some() {
        let rid: Arc<str> = Arc::from(pair.request_id.as_str());
        let private = private || route.private;
        pair.comparison = Some(compared(gw, shadow, &rid, private, &req, &pair).await);
    }
    if !shadow.keep_outputs {
        forget_outputs(&mut pair);
        pair.request = None;
    }
    Some(pair)
}
