//! `promptgate replay`: recorded requests sent to a candidate at a bounded
//! rate, offline, compared as live shadow pairs are — for a candidate that
//! cannot take live traffic yet.
//!
//! Two inputs, one JSON object per line, told apart line by line:
//! - an OpenAI chat request (it has `messages`): the primary is the route's
//!   first target, called now beside the candidate;
//! - an audit record kept with content (`content.messages`, `content.response`):
//!   the recorded answer is the primary's side (its target, latency, tokens,
//!   cost, text). An audit record holds messages and the answer's text only
//!   (not tools or `response_format`), so those pairs compare text.
//!
//! Records that cannot be replayed are counted, never sent: truncated or
//! withheld content, a failed or refused request with no messages, and a
//! record of a private request (data action `private`, or content marked
//! `private`: its header, its route, a private retriever's passages) when the
//! candidate is not self-hosted.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::{Pair, Side};
use crate::canonical::ChatRequest;
use crate::config::{Config, ShadowConfig, TargetConfig};

/// One request to replay.
pub struct Item {
    pub req: ChatRequest,
    pub request_id: String,
    /// The recorded primary side, for an audit record.
    pub primary: Option<Side>,
    /// The record says the request was private.
    pub private: bool,
}

/// Lines read but not replayed, by reason.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Skipped {
    pub unreadable: u64,
    pub truncated: u64,
    pub no_content: u64,
    pub private: u64,
}

/// Reads the file's lines into requests for `route`.
pub fn read(path: &Path, route: &str) -> Result<(Vec<Item>, Skipped), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut items = Vec::new();
    let mut skipped = Skipped::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            skipped.unreadable += 1;
            continue;
        };
        match item(&v, route, i + 1, &mut skipped) {
            Some(it) => items.push(it),
            None => continue,
        }
    }
    Ok((items, skipped))
}

fn item(v: &Value, route: &str, line: usize, skipped: &mut Skipped) -> Option<Item> {
    if v.get("messages").is_some() {
        let mut body = v.clone();
        body["model"] = json!(route);
        let Ok(req) = crate::backend::openai::decode_chat_request(body.to_string().as_bytes())
        else {
            skipped.unreadable += 1;
            return None;
        };
        return Some(Item {
            req,
            request_id: format!("replay-{line}"),
            primary: None,
            private: false,
        });
    }
    // An audit record.
    let Some(content) = v.get("content").filter(|c| c.get("messages").is_some()) else {
        skipped.no_content += 1;
        return None;
    };
    if content["request_truncated"] == json!(true) || content["response_truncated"] == json!(true) {
        skipped.truncated += 1;
        return None;
    }
    let messages: Vec<Value> = content["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let mut out = json!({"role": m["role"], "content": m.get("content").cloned().unwrap_or(json!(""))});
                    if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
                        out["tool_calls"] = calls
                            .iter()
                            .enumerate()
                            .map(|(i, c)| {
                                json!({"id": format!("call_{i}"), "type": "function",
                                    "function": {"name": c["name"], "arguments": c["arguments"]}})
                            })
                            .collect();
                        if out["content"] == json!("") {
                            out["content"] = Value::Null;
                        }
                    }
                    if let Some(id) = m.get("tool_call_id") {
                        out["tool_call_id"] = id.clone();
                    }
                    out
                })
                .collect()
        })
        .unwrap_or_default();
    let stream = v["stream"] == json!(true);
    let body = json!({"model": route, "messages": messages, "stream": stream});
    let Ok(req) = crate::backend::openai::decode_chat_request(body.to_string().as_bytes()) else {
        skipped.unreadable += 1;
        return None;
    };
    let status = v["status"].as_u64().unwrap_or(0);
    let error = match (status, v["error"].as_str()) {
        (200, None) => None,
        (_, Some(e)) => Some(e.to_owned()),
        (s, None) => Some(format!("status_{s}")),
    };
    let primary = Side {
        target: v["target"].as_str().unwrap_or("recorded").to_owned(),
        latency_ms: v["latency_ms"].as_f64().unwrap_or(0.0),
        ttft_ms: None,
        finish: None,
        input_tokens: v["tokens"]["input"].as_u64().unwrap_or(0) as u32,
        output_tokens: v["tokens"]["output"].as_u64().unwrap_or(0) as u32,
        cost: v["cost"].as_f64(),
        text: content["response"].as_str().unwrap_or("").to_owned(),
        tool_calls: Vec::new(),
        error,
    };
    Some(Item {
        req,
        request_id: v["request_id"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("replay-{line}")),
        primary: Some(primary),
        private: v["data_action"] == json!("private") || content["private"] == json!(true),
    })
}

/// Puts `candidate` (`provider/model`) on `route` as its one shadow
/// candidate, so the snapshot builds it as it builds any target. The
/// route's own `shadow` settings (kept outputs, embeddings) stay; outputs are
/// kept when the route keeps them or `keep_outputs` asks.
pub fn prepare(
    cfg: &mut Config,
    route: &str,
    candidate: &str,
    keep_outputs: bool,
) -> Result<(), String> {
    let (provider, model) = candidate
        .split_once('/')
        .filter(|(p, m)| !p.is_empty() && !m.is_empty())
        .ok_or_else(|| format!("--candidate must be PROVIDER/MODEL (got `{candidate}`)"))?;
    let Some(p) = cfg.providers.get(provider) else {
        let known: Vec<&str> = cfg.providers.keys().map(String::as_str).collect();
        return Err(format!(
            "no provider `{provider}` (providers: {})",
            known.join(", ")
        ));
    };
    if !p.has_model(model) {
        return Err(format!("provider `{provider}` has no model `{model}`"));
    }
    let names: Vec<String> = cfg.routes.keys().cloned().collect();
    let Some(r) = cfg.routes.get_mut(route) else {
        return Err(format!("no route `{route}` (routes: {})", names.join(", ")));
    };
    let kept = r.shadow.take();
    r.shadow = Some(ShadowConfig {
        targets: vec![TargetConfig {
            provider: provider.to_owned(),
            model: model.to_owned(),
            overrides: Default::default(),
            first_token_timeout: Duration::from_secs(30),
        }],
        sample: 1.0,
        max_in_flight: u32::MAX,
        prompt: None,
        keep_outputs: keep_outputs || kept.as_ref().is_some_and(|s| s.keep_outputs),
        embeddings: kept.and_then(|s| s.embeddings),
    });
    Ok(())
}

/// What a run did: the pairs in the order they completed, and the items not
/// sent — private ones (for a candidate that is not self-hosted) and those
/// the route's data protection blocks.
#[derive(Default)]
pub struct Ran {
    pub pairs: Vec<Pair>,
    pub private: u64,
    pub blocked: u64,
}

/// Sends every item at most `rps` a second, `concurrency` at once, each under
/// the route's data protection as a live request is (a block is not sent; a
/// request it makes private goes to a self-hosted candidate only; redacted
/// values leave as placeholders).
pub async fn run(
    gw: &Arc<crate::Gateway>,
    route: &str,
    items: Vec<Item>,
    rps: f64,
    concurrency: usize,
) -> Ran {
    let snap = gw.snapshot();
    let Some(route) = snap.route(route).cloned() else {
        return Ran::default();
    };
    let self_hosted = route
        .shadow
        .as_ref()
        .and_then(|s| s.candidates.first())
        .is_some_and(|c| c.self_hosted);
    let period = Duration::from_secs_f64(1.0 / rps.clamp(0.001, 100_000.0));
    let mut tick = tokio::time::interval(period);
    // After a stall the pace resumes; missed ticks are not made up in a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut running = tokio::task::JoinSet::new();
    let mut ran = Ran::default();
    for mut it in items {
        let mut ctx = match crate::pipeline::RequestContext::for_chat(
            Arc::from(it.request_id.as_str()),
            crate::pipeline::ClientDialect::OpenAi,
            snap.clone(),
            &http::HeaderMap::new(),
            &it.req,
            crate::pipeline::render::Prepared::default(),
            None,
        ) {
            Ok(ctx) => ctx,
            Err(_) => continue,
        };
        if crate::protect::apply(&mut ctx, &mut it.req, &gw.governor.metrics).is_err() {
            ran.blocked += 1;
            continue;
        }
        let private = it.private || ctx.private;
        if private && !self_hosted {
            ran.private += 1;
            continue;
        }
        tick.tick().await;
        let Ok(permit) = gate.clone().acquire_owned().await else {
            break;
        };
        let gw = gw.clone();
        let route = route.clone();
        running.spawn(async move {
            let pair = crate::pipeline::shadow::replay_pair(
                &gw,
                &route,
                it.req,
                it.request_id,
                it.primary,
                private,
            )
            .await;
            drop(permit);
            pair
        });
    }
    while let Some(done) = running.join_next().await {
        if let Ok(Some(p)) = done {
            ran.pairs.push(p);
        }
    }
    ran
}
