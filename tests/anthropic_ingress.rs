//! The Anthropic front door: clients speak the Messages API (`POST /v1/messages`)
//! to the gateway, which serves them from any backend — here the fake
//! OpenAI-compatible upstream of `tests/common` (routes `fake-<behaviour>`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};

const TEXT: &str = "Hello from the fake upstream.";

async fn post(gw: &Gw, body: &Value) -> reqwest::Response {
    client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", "client-key")
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

fn messages_body(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "max_tokens": 100,
        "stream": stream,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Say hello."}]
    })
}

fn weather_tool() -> Value {
    json!([{"name": "get_weather", "description": "Current weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}])
}

/// (event name, data) of every event of an Anthropic-style stream.
fn events(raw: &str) -> Vec<(String, Value)> {
    raw.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = None;
            let mut data = None;
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(d).unwrap());
                }
            }
            (
                name.unwrap_or_else(|| panic!("event without a name: {e}")),
                data.unwrap(),
            )
        })
        .collect()
}

/// Checks the Anthropic error shape; returns (status, error.type, body).
async fn error_of(resp: reqwest::Response) -> (u16, String, Value) {
    let status = resp.status().as_u16();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["request_id"], id.as_str(), "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(!v.to_string().contains(FAKE_KEY));
    (status, v["error"]["type"].as_str().unwrap().to_owned(), v)
}

#[tokio::test]
async fn text_message_round_trip() {
    let (fake, gw) = setup().await;
    let mut body = messages_body("fake-chat", false);
    body["temperature"] = json!(0.3);
    body["stop_sequences"] = json!(["END"]);
    body["metadata"] = json!({"user_id": "u-1"});
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-promptgate-route"], "fake-chat");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "fake-chat");
    assert!(v["id"].as_str().unwrap().starts_with("msg_"), "{v}");
    assert_eq!(v["content"], json!([{"type": "text", "text": TEXT}]));
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["stop_sequence"].is_null());
    // 12 prompt tokens, 4 of them read from cache: Anthropic counts those apart.
    assert_eq!(
        v["usage"],
        json!({"input_tokens": 8, "output_tokens": 6, "cache_read_input_tokens": 4})
    );

    // The system prompt reached the upstream as a system message.
    let up = fake.last().body;
    assert_eq!(
        up["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."}
        ])
    );
    assert_eq!(up["model"], "chat");
    assert_eq!(up["max_tokens"], 100);
    assert_eq!(up["temperature"], 0.3);
    assert_eq!(up["stop"], json!(["END"]));
    assert_eq!(up["user"], "u-1");
    // The client's Anthropic key is not forwarded; the provider's own is.
    assert_eq!(
        fake.last().headers["authorization"],
        format!("Bearer {FAKE_KEY}")
    );
}

#[tokio::test]
async fn system_blocks_and_content_blocks_are_accepted() {
    let (fake, gw) = setup().await;
    let body = json!({
        "model": "fake-chat", "max_tokens": 50,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]
    });
    assert_eq!(post(&gw, &body).await.status(), 200);
    let up = fake.last().body;
    assert_eq!(
        up["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."}
        ])
    );
}

#[tokio::test]
async fn stream_has_the_named_event_sequence() {
    let (fake, gw) = setup().await;
    let resp = post(&gw, &messages_body("fake-chat", true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let raw = resp.text().await.unwrap();
    let evs = events(&raw);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "message_start", "{raw}");
    assert_eq!(names[1], "content_block_start", "{raw}");
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"],
        "{raw}"
    );
    assert!(names[2..names.len() - 3]
        .iter()
        .all(|n| *n == "content_block_delta"));
    for (name, data) in &evs {
        assert_eq!(
            data["type"],
            name.as_str(),
            "data.type matches the event name"
        );
    }
    let start = &evs[0].1["message"];
    assert_eq!(start["model"], "fake-chat");
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(
        evs[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = evs
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, TEXT);
    let delta = &evs[evs.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["input_tokens"], 12);
    assert_eq!(delta["usage"]["output_tokens"], 6);
    // The upstream was asked for usage (the dialect always reports it).
    assert_eq!(
        fake.last().body["stream_options"],
        json!({"include_usage": true})
    );
}

#[tokio::test]
async fn tool_use_round_trip() {
    let (fake, gw) = setup().await;
    let mut body = messages_body("fake-tools", false);
    body["tools"] = weather_tool();
    body["tool_choice"] = json!({"type": "any"});
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["content"],
        json!([{"type": "tool_use", "id": "call_weather_1", "name": "get_weather",
            "input": {"city": "Paris", "unit": "c"}}])
    );
    assert_eq!(v["stop_reason"], "tool_use");
    // Tools reached the OpenAI upstream in its own format.
    let up = fake.last().body;
    assert_eq!(
        up["tools"],
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    );
    assert_eq!(up["tool_choice"], "required");

    // The client answers with a tool_result.
    let follow = json!({
        "model": "fake-chat", "max_tokens": 100, "tools": weather_tool(),
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": v["content"].clone()},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_weather_1", "content": "18C and sunny"}
            ]}
        ]
    });
    let resp = post(&gw, &follow).await;
    assert_eq!(resp.status(), 200);
    let up = fake.last().body;
    assert_eq!(
        up["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_weather_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"unit\":\"c\"}"}}]},
            {"role": "tool", "tool_call_id": "call_weather_1", "content": "18C and sunny"}
        ])
    );
}

#[tokio::test]
async fn streamed_tool_use_becomes_input_json_deltas() {
    let (_fake, gw) = setup().await;
    let mut body = messages_body("fake-tools", true);
    body["tools"] = weather_tool();
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 200);
    let raw = resp.text().await.unwrap();
    let evs = events(&raw);
    let start = evs
        .iter()
        .find(|(n, d)| n == "content_block_start" && d["content_block"]["type"] == "tool_use")
        .unwrap_or_else(|| panic!("no tool_use block: {raw}"));
    assert_eq!(
        start.1["content_block"],
        json!({"type": "tool_use", "id": "call_weather_1", "name": "get_weather", "input": {}})
    );
    let index = start.1["index"].clone();
    let args: String = evs
        .iter()
        .filter(|(n, d)| n == "content_block_delta" && d["index"] == index)
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "input_json_delta");
            d["delta"]["partial_json"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"city": "Paris", "unit": "c"})
    );
    let delta = evs.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
    assert_eq!(evs.last().unwrap().0, "message_stop");
}

#[tokio::test]
async fn errors_have_the_anthropic_shape() {
    let (_fake, gw) = setup().await;

    let (status, kind, v) = error_of(post(&gw, &messages_body("no-such-route", false)).await).await;
    assert_eq!((status, kind.as_str()), (404, "not_found_error"), "{v}");

    let mut body = messages_body("fake-chat", false);
    body.as_object_mut().unwrap().remove("max_tokens");
    let (status, kind, v) = error_of(post(&gw, &body).await).await;
    assert_eq!((status, kind.as_str()), (400, "invalid_request_error"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "{v}"
    );

    let resp = post(&gw, &messages_body("fake-status-429", false)).await;
    assert_eq!(resp.headers()["retry-after"], "7");
    let (status, kind, _) = error_of(resp).await;
    assert_eq!((status, kind.as_str()), (429, "rate_limit_error"));

    for stream in [false, true] {
        let (status, kind, v) =
            error_of(post(&gw, &messages_body("fake-status-500", stream)).await).await;
        assert_eq!((status, kind.as_str()), (529, "overloaded_error"), "{v}");
    }

    let (status, kind, _) =
        error_of(post(&gw, &messages_body("fake-status-401", false)).await).await;
    assert_eq!((status, kind.as_str()), (502, "api_error"));

    let (status, kind, _) =
        error_of(post(&gw, &messages_body("fake-status-400-context", false)).await).await;
    assert_eq!((status, kind.as_str()), (400, "invalid_request_error"));
}

#[tokio::test]
async fn a_stream_cut_after_it_began_ends_with_an_error_event() {
    let (_fake, gw) = setup().await;
    let resp = post(&gw, &messages_body("fake-cut", true)).await;
    assert_eq!(resp.status(), 200);
    let raw = resp.text().await.unwrap();
    let evs = events(&raw);
    assert_eq!(evs[0].0, "message_start", "{raw}");
    assert!(
        raw.contains("Hello"),
        "output before the cut is forwarded: {raw}"
    );
    assert!(!evs.iter().any(|(n, _)| n == "message_stop"), "{raw}");
    let (name, data) = evs.last().unwrap();
    assert_eq!(name, "error", "{raw}");
    assert_eq!(data["type"], "error");
    assert!(data["error"]["type"].is_string(), "{raw}");
    assert!(data["error"]["message"].is_string(), "{raw}");
}

#[tokio::test]
async fn an_oversized_body_is_request_too_large() {
    let (fake, gw) = setup().await;
    let mut body = messages_body("fake-chat", false);
    body["messages"][0]["content"] = json!("x".repeat(70_000));
    let (status, kind, _) = error_of(post(&gw, &body).await).await;
    assert_eq!((status, kind.as_str()), (413, "request_too_large"));
    assert!(fake.requests().is_empty(), "nothing was sent upstream");
}
