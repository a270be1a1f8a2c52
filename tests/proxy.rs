//! End to end through the real server: a gateway on loopback in front of a fake
//! OpenAI-compatible upstream that replays recorded wire samples and faults.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

async fn post(gw: &Gw, path: &str, body: &Value) -> reqwest::Response {
    client().post(gw.url(path)).json(body).send().await.unwrap()
}

async fn error_of(resp: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap();
    let id = headers["x-request-id"].to_str().unwrap();
    assert_eq!(
        body["error"]["request_id"], id,
        "error JSON carries the request id"
    );
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(body["error"]["type"].is_string());
    (status, headers, body)
}

#[tokio::test]
async fn chat_is_forwarded_with_mapping_auth_and_passthrough() {
    let (fake, gw) = setup().await;
    let mut body = chat_body("fake-chat", false);
    body["top_k"] = json!(5);
    body["vendor_flag"] = json!({"nested": [1, 2]});
    body["temperature"] = json!(0.3);
    let resp = post(&gw, "/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert!(h["x-request-id"].to_str().unwrap().starts_with("pg-"));
    assert!(h["x-promptgate-overhead-us"]
        .to_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    assert_eq!(h["x-promptgate-route"], "fake-chat");
    assert_eq!(h["x-promptgate-provider"], "fake");
    assert_eq!(h["x-promptgate-usage"], "reported");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "fake-chat");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello from the fake upstream."
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 12);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["usage"]["total_tokens"], 18);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 4);

    let up = fake.last();
    assert_eq!(up.body["model"], "chat", "route maps to the upstream model");
    assert_eq!(up.body["top_k"], 5);
    assert_eq!(up.body["vendor_flag"], json!({"nested": [1, 2]}));
    assert_eq!(up.body["temperature"], 0.3);
    assert_eq!(
        up.body["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert!(up.body.get("stream").is_none() && up.body.get("stream_options").is_none());
    assert_eq!(up.headers["authorization"], format!("Bearer {FAKE_KEY}"));
}

#[tokio::test]
async fn route_overrides_replace_client_parameters() {
    let fake = spawn_fake().await;
    let (g, p) = fake_config(
        &fake,
        "  pinned:\n    provider: fake\n    model: chat\n    params:\n      temperature: 0.1\n      max_tokens: 64\n      extra: {top_k: 3}\n",
    );
    let gw = spawn_gateway(&g, &p).await;
    let mut body = chat_body("pinned", false);
    body["temperature"] = json!(1.5);
    assert_eq!(post(&gw, "/v1/chat/completions", &body).await.status(), 200);
    let up = fake.last().body;
    assert_eq!(up["temperature"], 0.1);
    assert_eq!(up["max_tokens"], 64);
    assert_eq!(up["top_k"], 3);
}

#[tokio::test]
async fn stream_is_reframed_and_ends_with_done() {
    let (fake, gw) = setup().await;
    let resp = post(&gw, "/v1/chat/completions", &chat_body("fake-chat", true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let mut content = String::new();
    let mut finish = None;
    for d in &data[..data.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "fake-chat");
        assert!(c.get("usage").is_none(), "no usage unless the client asked");
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            content.push_str(t);
        }
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    assert_eq!(content, "Hello from the fake upstream.");
    assert_eq!(finish.as_deref(), Some("stop"));
    // The gateway always asks the backend for usage, to count tokens.
    assert_eq!(fake.last().body["stream_options"]["include_usage"], true);
}

fn final_usage(text: &str) -> Value {
    let data = sse_data(text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let u: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(u["choices"], json!([]), "usage chunk has no choices");
    u["usage"].clone()
}

#[tokio::test]
async fn stream_usage_reported_or_estimated() {
    let (_fake, gw) = setup().await;
    let mut body = chat_body("fake-chat", true);
    body["stream_options"] = json!({"include_usage": true});
    let text = post(&gw, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let u = final_usage(&text);
    assert_eq!(
        u,
        json!({"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18})
    );

    // The backend reports nothing: the gateway counts with tiktoken and says so.
    let mut body = chat_body("fake-nousage", true);
    body["stream_options"] = json!({"include_usage": true});
    let text = post(&gw, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let u = final_usage(&text);
    assert_eq!(u["estimated"], true);
    // "Hello from the fake upstream." is 6 tokens in cl100k.
    assert_eq!(u["completion_tokens"], 6);
    assert!(u["prompt_tokens"].as_u64().unwrap() > 5);
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + 6
    );
}

#[tokio::test]
async fn missing_usage_is_estimated_and_marked() {
    let (_fake, gw) = setup().await;
    let resp = post(
        &gw,
        "/v1/chat/completions",
        &chat_body("fake-nousage", false),
    )
    .await;
    assert_eq!(resp.headers()["x-promptgate-usage"], "estimated");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["usage"]["estimated"], true);
}

#[tokio::test]
async fn tool_calls_round_trip_in_both_modes() {
    let (fake, gw) = setup().await;
    let mut body = chat_body("fake-tools", false);
    body["tools"] = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    body["tool_choice"] = json!({"type": "function", "function": {"name": "get_weather"}});
    let v: Value = post(&gw, "/v1/chat/completions", &body)
        .await
        .json()
        .await
        .unwrap();
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["id"], "call_weather_1");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(
        call["function"]["arguments"],
        "{\"city\":\"Paris\",\"unit\":\"c\"}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let up = fake.last().body;
    assert_eq!(up["tools"], body["tools"]);
    assert_eq!(up["tool_choice"], body["tool_choice"]);

    body["stream"] = json!(true);
    let text = post(&gw, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for d in sse_data(&text).iter().filter(|d| *d != "[DONE]") {
        let c: Value = serde_json::from_str(d).unwrap();
        for tc in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = tc["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            if let Some(id) = tc["id"].as_str() {
                calls[i].0 = id.into();
            }
            if let Some(n) = tc["function"]["name"].as_str() {
                calls[i].1 = n.into();
            }
            if let Some(a) = tc["function"]["arguments"].as_str() {
                calls[i].2.push_str(a);
            }
        }
    }
    assert_eq!(
        calls,
        vec![
            (
                "call_weather_1".into(),
                "get_weather".into(),
                "{\"city\":\"Paris\",\"unit\":\"c\"}".into()
            ),
            ("call_time_2".into(), "get_time".into(), "{}".into()),
        ]
    );
}

#[tokio::test]
async fn recorded_llamacpp_responses_pass_through() {
    let (_fake, gw) = setup().await;
    let v: Value = post(
        &gw,
        "/v1/chat/completions",
        &chat_body("fake-llamacpp", false),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello from the tiny test model"
    );
    assert_eq!(v["usage"]["total_tokens"], 30);
    let mut body = chat_body("fake-llamacpp", true);
    body["stream_options"] = json!({"include_usage": true});
    let text = post(&gw, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    // llama.cpp puts usage on the finishing chunk, not on a separate one.
    let u = final_usage(&text);
    assert_eq!(u["completion_tokens"], 7);
    assert!(u.get("estimated").is_none());
}

#[tokio::test]
async fn crlf_framing_and_comments_are_accepted() {
    let (_fake, gw) = setup().await;
    let text = post(&gw, "/v1/chat/completions", &chat_body("fake-crlf", true))
        .await
        .text()
        .await
        .unwrap();
    assert!(text.contains("\" upstream\""));
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn backend_errors_are_classified() {
    let (_fake, gw) = setup().await;
    let cases = [
        ("fake-status-429", 429, "rate_limited", Some(429)),
        ("fake-status-500", 503, "overloaded", Some(500)),
        ("fake-status-503", 503, "overloaded", Some(503)),
        ("fake-status-401", 502, "auth", Some(401)),
        (
            "fake-status-400-context",
            400,
            "context_length_exceeded",
            Some(400),
        ),
        ("fake-error-in-200", 503, "overloaded", None),
        ("fake-invalid-json", 502, "malformed_response", None),
    ];
    for (model, status, code, upstream) in cases {
        let resp = post(&gw, "/v1/chat/completions", &chat_body(model, false)).await;
        let (s, h, v) = error_of(resp).await;
        assert_eq!(s, status, "{model}: {v}");
        assert_eq!(v["error"]["code"], code, "{model}");
        assert_eq!(v["error"]["provider"], "fake", "{model}");
        match upstream {
            Some(u) => assert_eq!(v["error"]["upstream_status"], u, "{model}"),
            None => assert!(v["error"].get("upstream_status").is_none(), "{model}"),
        }
        let raw = v.to_string();
        assert!(!raw.contains(FAKE_KEY), "{model}: credential leaked: {raw}");
        if model == "fake-status-429" {
            assert_eq!(h["retry-after"], "7");
        }
    }
}

#[tokio::test]
async fn stream_requests_fail_cleanly_before_the_first_token() {
    // A backend that fails before streaming anything gets a real error status.
    let (_fake, gw) = setup().await;
    let resp = post(
        &gw,
        "/v1/chat/completions",
        &chat_body("fake-status-429", true),
    )
    .await;
    let (s, _, v) = error_of(resp).await;
    assert_eq!(s, 429);
    assert_eq!(v["error"]["code"], "rate_limited");
}

#[tokio::test]
async fn hanging_backend_times_out() {
    let (_fake, gw) = setup().await;
    for stream in [false, true] {
        let t = Instant::now();
        let resp = post(&gw, "/v1/chat/completions", &chat_body("fake-hang", stream)).await;
        let (s, _, v) = error_of(resp).await;
        assert_eq!(s, 504);
        assert_eq!(v["error"]["code"], "timeout");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "gave up after the 1s headers timeout"
        );
    }
}

#[tokio::test]
async fn unreachable_backend_is_a_connect_error() {
    let fake = spawn_fake().await;
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let (g, mut p) = fake_config(&fake, "  dead:\n    provider: dead\n    model: m\n");
    p.push((
        "dead.yaml".into(),
        format!(
            "kind: openai\nbase_url: http://127.0.0.1:{port}/v1\napi_key_env: FAKE_UPSTREAM_KEY\n"
        ),
    ));
    let gw = spawn_gateway(&g, &p).await;
    let (s, _, v) =
        error_of(post(&gw, "/v1/chat/completions", &chat_body("dead", false)).await).await;
    assert_eq!(s, 502);
    assert_eq!(v["error"]["code"], "connect");
    assert!(!v.to_string().contains(FAKE_KEY));
}

/// Reads an SSE response to its end and returns the parsed final event.
async fn last_event(gw: &Gw, model: &str) -> (String, Value) {
    let resp = post(gw, "/v1/chat/completions", &chat_body(model, true)).await;
    assert_eq!(
        resp.status(),
        200,
        "{model}: the stream had begun, so the status is 200"
    );
    let text = resp.text().await.unwrap();
    let data = sse_data(&text);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap_or(Value::Null);
    (text, last)
}

#[tokio::test]
async fn failures_after_the_stream_began_end_with_an_error_event() {
    let (_fake, gw) = setup().await;
    let cases = [
        ("fake-cut", "malformed_response"),
        ("fake-garbage", "malformed_response"),
        ("fake-stall", "timeout"),
        ("fake-stream-error", "overloaded"),
        ("fake-no-done", "malformed_response"),
    ];
    for (model, code) in cases {
        let (text, last) = last_event(&gw, model).await;
        assert!(
            !text.contains("[DONE]"),
            "{model}: no clean end after a failure"
        );
        assert!(
            text.contains("\"content\":\"Hello\""),
            "{model}: output before the failure was forwarded"
        );
        assert_eq!(last["error"]["code"], code, "{model}: {text}");
        assert_eq!(last["error"]["provider"], "fake");
        assert!(last["error"]["request_id"]
            .as_str()
            .unwrap()
            .starts_with("pg-"));
    }
    let metrics = gw.metrics().await;
    assert!(metrics.contains(
        "promptgate_stream_errors_total{kind=\"malformed_response\",provider=\"fake\",route=\"fake-cut\"} 1"
    ));
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_call() {
    let (fake, gw) = setup().await;
    let mut resp = post(&gw, "/v1/chat/completions", &chat_body("fake-slow", true)).await;
    assert_eq!(resp.status(), 200);
    // First bytes arrive while the backend is still sending (no buffering).
    let first = tokio::time::timeout(Duration::from_secs(2), resp.chunk())
        .await
        .expect("first chunk arrives promptly")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("w0"));
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(3);
    while fake
        .state
        .cancelled
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the upstream stream was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        fake.state
            .completed
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn bad_input_gets_precise_errors() {
    let (fake, gw) = setup().await;
    let c = client();
    let send = |body: Vec<u8>| {
        c.post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let (s, _, v) = error_of(send(b"{\"model\": \"fake-chat\", ".to_vec()).await.unwrap()).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));

    let (s, _, v) = error_of(send(br#"{"model":"fake-chat"}"#.to_vec()).await.unwrap()).await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "messages");

    let (s, _, v) = error_of(
        send(br#"{"model":"fake-chat","messages":[{"role":"user","content":5}]}"#.to_vec())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "messages[0].content");

    let (s, _, v) = error_of(
        send(br#"{"model":"fake-chat","messages":[]}"#.to_vec())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("messages")));

    let (s, _, v) = error_of(
        send(br#"{"messages":[{"role":"user","content":"x"}]}"#.to_vec())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("model")));

    let big = json!({"model": "fake-chat", "messages": [{"role": "user", "content": "x".repeat(70_000)}]});
    let resp = send(serde_json::to_vec(&big).unwrap()).await.unwrap();
    // Refused before its body was read: the connection must not be reused.
    assert_eq!(resp.headers()["connection"], "close");
    let (s, _, v) = error_of(resp).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    let (s, _, v) = error_of(
        send(serde_json::to_vec(&chat_body("gpt-nonexistent", false)).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(v["error"]["param"], "model");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("fake-chat"));

    let (s, _, v) = error_of(c.get(gw.url("/v1/nothing-here")).send().await.unwrap()).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));

    let (s, _, v) = error_of(
        send(serde_json::to_vec(&chat_body("needs-key", false)).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("provider_unavailable"))
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("PROMPTGATE_TEST_UNSET_KEY"));
    assert_eq!(v["error"]["provider"], "keyless");

    assert!(
        fake.requests().is_empty(),
        "nothing invalid reached the backend"
    );
}

#[tokio::test]
async fn request_id_is_propagated() {
    let (_fake, gw) = setup().await;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "client-trace-42")
        .json(&chat_body("fake-chat", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-trace-42");
    let resp = client().get(gw.url("/healthz")).send().await.unwrap();
    assert!(resp.headers().contains_key("x-request-id"));
    assert!(resp.headers().contains_key("x-promptgate-overhead-us"));
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "ok");
}

#[tokio::test]
async fn embeddings_float_and_base64() {
    let (fake, gw) = setup().await;
    let v: Value = post(
        &gw,
        "/v1/embeddings",
        &json!({"model": "fake-chat", "input": ["a", "b"]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "fake-chat");
    assert_eq!(v["data"][1]["embedding"], json!([0.5, -0.25, 0.125, 1.0]));
    assert_eq!(v["usage"]["prompt_tokens"], 8);
    assert_eq!(fake.last().body["encoding_format"], "float");

    let v: Value = post(
        &gw,
        "/v1/embeddings",
        &json!({"model": "fake-chat", "input": ["a", "b"], "encoding_format": "base64"}),
    )
    .await
    .json()
    .await
    .unwrap();
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["data"][1]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(floats, vec![0.5, -0.25, 0.125, 1.0]);

    // The sandbox is deterministic.
    let a: Value = post(
        &gw,
        "/v1/embeddings",
        &json!({"model": "sandbox-echo", "input": "same"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let b: Value = post(
        &gw,
        "/v1/embeddings",
        &json!({"model": "sandbox-echo", "input": "same"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(a["data"][0]["embedding"], b["data"][0]["embedding"]);
    assert_eq!(a["data"][0]["embedding"].as_array().unwrap().len(), 16);
}

#[tokio::test]
async fn models_lists_routes() {
    let (_fake, gw) = setup().await;
    let v: Value = client()
        .get(gw.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"fake-chat") && ids.contains(&"sandbox-echo"));
    let one = client()
        .get(gw.url("/v1/models/fake-chat"))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    let missing = client()
        .get(gw.url("/v1/models/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn metrics_count_requests_errors_latency_and_tokens() {
    let (_fake, gw) = setup().await;
    post(&gw, "/v1/chat/completions", &chat_body("fake-chat", false)).await;
    post(&gw, "/v1/chat/completions", &chat_body("fake-chat", true))
        .await
        .text()
        .await
        .unwrap();
    post(
        &gw,
        "/v1/chat/completions",
        &chat_body("fake-status-429", false),
    )
    .await;
    let m = gw.metrics().await;
    for needle in [
        "promptgate_requests_total{provider=\"fake\",route=\"fake-chat\",status=\"200\"} 2",
        "promptgate_requests_total{provider=\"fake\",route=\"fake-status-429\",status=\"429\"} 1",
        "promptgate_errors_total{kind=\"rate_limited\",route=\"fake-status-429\"} 1",
        "promptgate_tokens_total{direction=\"in\",provider=\"fake\",route=\"fake-chat\",source=\"reported\"} 24",
        "promptgate_tokens_total{direction=\"out\",provider=\"fake\",route=\"fake-chat\",source=\"reported\"} 12",
        "promptgate_time_to_first_token_seconds_count{provider=\"fake\",route=\"fake-chat\"} 1",
        "promptgate_upstream_duration_seconds_count{provider=\"fake\"} 3",
        "promptgate_request_duration_seconds_count{route=\"fake-chat\"} 2",
        "promptgate_gateway_overhead_seconds_count{route=\"fake-chat\"} 2",
    ] {
        assert!(m.contains(needle), "missing `{needle}` in\n{m}");
    }
}

#[tokio::test]
async fn sandbox_round_trip_and_faults() {
    let (_fake, gw) = setup().await;
    let mut body = chat_body("sandbox-echo", false);
    body["messages"][1]["content"] = json!("ping {{ not a template }}");
    let v: Value = post(&gw, "/v1/chat/completions", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "ping {{ not a template }}"
    );

    body["response_format"] = json!({"type": "json_object"});
    let v: Value = post(&gw, "/v1/chat/completions", &body)
        .await
        .json()
        .await
        .unwrap();
    let inner: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(inner["echo"], "ping {{ not a template }}");

    let fake = spawn_fake().await;
    let (g, p) = fake_config(
        &fake,
        "  sb-cut:\n    provider: sandbox\n    model: cut\n  sb-503:\n    provider: sandbox\n    model: overloaded\n",
    );
    let gw = spawn_gateway(&g, &p).await;
    let (s, _, v) =
        error_of(post(&gw, "/v1/chat/completions", &chat_body("sb-503", false)).await).await;
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("overloaded")));
    let mut body = chat_body("sb-cut", true);
    body["messages"][1]["content"] = json!("one two three four five");
    let text = post(&gw, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    assert!(text.contains("\"one \"") && text.contains("\"two \""));
    assert!(!text.contains("[DONE]"));
    assert!(text.contains("malformed_response"));
}
