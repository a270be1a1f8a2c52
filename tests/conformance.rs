//! The conformance suite: the same cases run against every backend protocol,
//! each through the real gateway in front of a fixture-driven fake of that
//! protocol (`tests/common/native.rs`). A protocol is one file in
//! `tests/protocols/` and one line in `protocols!` below.
#![allow(clippy::unwrap_used)]

mod common;

use common::native::{self, Protocol, EXPECTED_TEXT};
use common::{client, spawn_gateway, sse_data};
use serde_json::{json, Value};

struct Setup {
    gw: common::Gw,
    fake: native::NativeState,
}

/// Which path an OpenAI request to an OpenAI-compatible backend takes: the
/// fast path (the client's bytes forwarded, the default) or, with
/// `fast_path: false`, the canonical one. Both pass every case.
#[derive(Clone, Copy)]
pub enum Path {
    Fast,
    Canonical,
}

async fn setup(proto: &'static Protocol) -> Setup {
    setup_on(proto, Path::Fast).await
}

async fn setup_on(proto: &'static Protocol, path: Path) -> Setup {
    let (base, fake) = native::spawn(proto).await;
    let knob = match path {
        Path::Fast => "",
        Path::Canonical => "fast_path: false\n",
    };
    let gateway = format!(
        "listen: 127.0.0.1:0\n{knob}routes:\n  conf:\n    provider: {k}\n    model: {m}\n",
        k = proto.kind,
        m = proto.model
    );
    let providers = vec![(format!("{}.yaml", proto.kind), (proto.provider_yaml)(&base))];
    let gw = spawn_gateway(&gateway, &providers).await;
    Setup { gw, fake }
}

fn request(scenario: &str, stream: bool) -> Value {
    json!({
        "model": "conf",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": scenario}
        ]
    })
}

fn weather_tool() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

async fn post(s: &Setup, body: &Value) -> reqwest::Response {
    client()
        .post(s.gw.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn ok_json(s: &Setup, body: &Value) -> Value {
    let resp = post(s, body).await;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

fn check_usage(proto: &Protocol, u: &Value) {
    if proto.reports_usage {
        assert_eq!(u["prompt_tokens"], 12, "{u}");
        assert_eq!(u["completion_tokens"], 6, "{u}");
        assert_eq!(u["total_tokens"], 18, "{u}");
        assert!(u.get("estimated").is_none(), "{u}");
    } else {
        assert_eq!(u["estimated"], true, "{u}");
        assert!(u["completion_tokens"].as_u64().unwrap() > 0, "{u}");
    }
}

/// Reads a stream; returns (text, finish reason, usage chunk, tool calls by index).
async fn read_stream(
    resp: reqwest::Response,
) -> (
    String,
    Option<String>,
    Option<Value>,
    Vec<(String, String)>,
    String,
) {
    assert_eq!(resp.status(), 200);
    let raw = resp.text().await.unwrap();
    let data = sse_data(&raw);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{raw}");
    let (mut text, mut finish, mut usage, mut calls) =
        (String::new(), None, None, Vec::<(String, String)>::new());
    for d in &data[..data.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        assert!(c.get("error").is_none(), "{raw}");
        if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        let Some(choice) = c["choices"].get(0) else {
            continue;
        };
        if let Some(t) = choice["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
        for tc in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = tc["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            if let Some(n) = tc["function"]["name"].as_str() {
                calls[i].0.push_str(n);
            }
            if let Some(a) = tc["function"]["arguments"].as_str() {
                calls[i].1.push_str(a);
            }
        }
    }
    (text, finish, usage, calls, raw)
}

pub async fn chat(proto: &'static Protocol, path: Path) {
    let s = setup_on(proto, path).await;
    let v = ok_json(&s, &request("chat", false)).await;
    assert_eq!(v["choices"][0]["message"]["content"], EXPECTED_TEXT, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["model"], "conf");
    check_usage(proto, &v["usage"]);
}

pub async fn multi_turn(proto: &'static Protocol, path: Path) {
    let s = setup_on(proto, path).await;
    let body = json!({"model": "conf", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "chat"}
    ]});
    let v = ok_json(&s, &body).await;
    assert_eq!(v["choices"][0]["message"]["content"], EXPECTED_TEXT);
    let log = s.fake.log.lock().unwrap().clone();
    (proto.check_multi_turn)(&log.last().unwrap().1);
}

pub async fn stream(proto: &'static Protocol, path: Path) {
    let s = setup_on(proto, path).await;
    let mut body = request("chat", true);
    body["stream_options"] = json!({"include_usage": true});
    let (text, finish, usage, _, raw) = read_stream(post(&s, &body).await).await;
    assert_eq!(text, EXPECTED_TEXT, "{raw}");
    assert_eq!(finish.as_deref(), Some("stop"), "{raw}");
    check_usage(proto, &usage.expect("a usage chunk"));
}

pub async fn tools(proto: &'static Protocol, path: Path) {
    let s = setup_on(proto, path).await;
    for stream in [false, true] {
        let mut body = request("tools", stream);
        body["tools"] = weather_tool();
        let resp = post(&s, &body).await;
        if !proto.tools {
            assert_eq!(
                resp.status(),
                400,
                "a backend without tools must refuse them"
            );
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["code"], "unsupported");
            assert!(v["error"]["message"].as_str().unwrap().contains("tools"));
            assert!(
                s.fake.log.lock().unwrap().is_empty(),
                "nothing was sent upstream"
            );
            continue;
        }
        let (name, args, finish) = if stream {
            let (_, finish, _, calls, raw) = read_stream(resp).await;
            assert_eq!(calls.len(), 1, "{raw}");
            (calls[0].0.clone(), calls[0].1.clone(), finish)
        } else {
            let v: Value = resp.json().await.unwrap();
            let call = &v["choices"][0]["message"]["tool_calls"][0];
            assert!(call["id"].as_str().is_some_and(|i| !i.is_empty()), "{v}");
            (
                call["function"]["name"].as_str().unwrap().to_owned(),
                call["function"]["arguments"].as_str().unwrap().to_owned(),
                v["choices"][0]["finish_reason"].as_str().map(str::to_owned),
            )
        };
        assert_eq!(name, "get_weather");
        assert_eq!(
            serde_json::from_str::<Value>(&args).unwrap(),
            json!({"city": "Paris"})
        );
        assert_eq!(finish.as_deref(), Some("tool_calls"));
        // The tool definition reached the backend in its own format.
        let log = s.fake.log.lock().unwrap().clone();
        assert!(log.last().unwrap().1.to_string().contains("get_weather"));
    }
}

pub async fn length(proto: &'static Protocol, path: Path) {
    let s = setup_on(proto, path).await;
    let mut body = request("length", false);
    body["max_tokens"] = json!(5);
    let v = ok_json(&s, &body).await;
    let want = if proto.length { "length" } else { "stop" };
    assert_eq!(v["choices"][0]["finish_reason"], want, "{v}");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));
    body["stream"] = json!(true);
    let (text, finish, _, _, raw) = read_stream(post(&s, &body).await).await;
    assert_eq!(finish.as_deref(), Some(want), "{raw}");
    assert!(!text.is_empty());
}

pub async fn errors(proto: &'static Protocol, path: Path) {
    let s = setup_on(proto, path).await;
    let common: [(&str, u16, &str); 5] = [
        ("error_429", 429, "rate_limited"),
        ("error_500", 503, "overloaded"),
        ("error_401", 502, "auth"),
        ("error_400_context", 400, "context_length_exceeded"),
        ("error_400", 400, "bad_request"),
    ];
    for (scenario, status, code) in common.iter().chain(proto.extra_errors) {
        for stream in [false, true] {
            let resp = post(&s, &request(scenario, stream)).await;
            let got = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap();
            assert_eq!(
                (got, v["error"]["code"].as_str()),
                (*status, Some(*code)),
                "{scenario} stream={stream}: {v}"
            );
            assert!(!v.to_string().contains(common::FAKE_KEY));
        }
    }
}

pub async fn stream_error(proto: &'static Protocol, path: Path) {
    let s = setup_on(proto, path).await;
    let resp = post(&s, &request("stream_error", true)).await;
    assert_eq!(resp.status(), 200);
    let raw = resp.text().await.unwrap();
    assert!(
        raw.contains("Hello"),
        "output before the failure is forwarded: {raw}"
    );
    assert!(!raw.contains("[DONE]"));
    let last: Value = serde_json::from_str(sse_data(&raw).last().unwrap()).unwrap();
    assert!(last["error"]["code"].is_string(), "{raw}");
}

// === cases of one protocol ===
/// The demo runs the calls it detects in a stream itself and streams on, so the
/// client would never see them: a streamed request with tools is asked without
/// streaming and replayed. A replayed call carries the text the model wrote
/// for it (the demo refuses a null content and cannot parse "").
#[tokio::test]
async fn chatglm3_tool_turns_are_asked_whole_and_replayed_with_the_call_text() {
    let s = setup(&chatglm3::PROTOCOL).await;
    let mut body = request("tools", true);
    body["tools"] = weather_tool();
    let (_, finish, _, calls, raw) = read_stream(post(&s, &body).await).await;
    assert_eq!(finish.as_deref(), Some("tool_calls"), "{raw}");
    assert_eq!(calls.len(), 1, "{raw}");
    assert_eq!(calls[0].0, "get_weather");
    let sent = s.fake.log.lock().unwrap().last().unwrap().1.clone();
    assert_ne!(sent["stream"], true, "asked without streaming: {sent}");

    let id = raw
        .split("\"id\":\"")
        .filter_map(|r| r.split('"').next())
        .find(|i| i.starts_with("call_"))
        .unwrap()
        .to_owned();
    let replay = json!({"model": "conf", "tools": weather_tool(), "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": id, "content": "sunny"},
        {"role": "user", "content": "chat"}
    ]});
    let v = ok_json(&s, &replay).await;
    assert_eq!(v["choices"][0]["message"]["content"], native::EXPECTED_TEXT);
    let sent = s.fake.log.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(
        sent["messages"][1],
        json!({"role": "assistant",
            "content": "get_weather\n ```python\ntool_call(city='Paris')\n```",
            "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}),
        "{sent}"
    );
    assert_eq!(
        sent["messages"][2],
        json!({"role": "function", "name": "get_weather", "content": "sunny"})
    );
}

/// Baidu refuses an access token before its announced expiry with error 110 or
/// 111 (inside an HTTP 200): the gateway fetches a new token and calls once more.
#[tokio::test]
async fn qianfan_refreshes_a_refused_token_and_retries_once() {
    let s = setup(&qianfan::PROTOCOL).await;
    for (scenario, stream) in [("token_expired", false), ("token_expired_stream", true)] {
        s.fake.log.lock().unwrap().clear();
        let resp = post(&s, &request(scenario, stream)).await;
        if stream {
            let (text, finish, _, _, raw) = read_stream(resp).await;
            assert_eq!(text, EXPECTED_TEXT, "{raw}");
            assert_eq!(finish.as_deref(), Some("stop"));
        } else {
            assert_eq!(resp.status(), 200);
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["choices"][0]["message"]["content"], EXPECTED_TEXT, "{v}");
        }
        let paths: Vec<String> = s
            .fake
            .log
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.split('?').next().unwrap().to_owned())
            .collect();
        let token = "/oauth/2.0/token";
        let chat = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/completions_pro";
        let expected: Vec<&str> = if stream {
            // The token fetched by the first case is cached.
            vec![chat, token, chat]
        } else {
            vec![token, chat, token, chat]
        };
        assert_eq!(paths, expected, "{scenario}");
    }
    // A token refused again is the answer: one retry, not a loop.
    s.fake.log.lock().unwrap().clear();
    let resp = post(&s, &request("error_in_200_token", false)).await;
    assert_eq!(resp.status(), 502);
    let calls = s.fake.log.lock().unwrap().len();
    assert_eq!(calls, 3, "call, token, call");
}

/// A tool turn made on Gemini falls over to Anthropic: the call id the client
/// got from Gemini (which keeps its thought signature out of the id) is one
/// Anthropic accepts, and the call and its result agree on it. Back on Gemini,
/// the signature is restored from the id.
#[tokio::test]
async fn a_gemini_tool_turn_falls_over_to_anthropic_with_valid_ids() {
    let (gemini_base, gemini) = native::spawn(&gemini::PROTOCOL).await;
    let (anthropic_base, anthropic) = native::spawn(&anthropic::PROTOCOL).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let gateway = "listen: 127.0.0.1:0\nroutes:\n  gem:\n    provider: gemini\n    model: gemini-3-pro-preview\n  fb:\n    targets:\n      - {provider: gemini-down, model: gemini-3-pro-preview}\n      - {provider: anthropic, model: claude-x}\n";
    let providers = vec![
        (
            "gemini.yaml".to_owned(),
            (gemini::PROTOCOL.provider_yaml)(&gemini_base),
        ),
        (
            "gemini-down.yaml".to_owned(),
            (gemini::PROTOCOL.provider_yaml)(&dead),
        ),
        (
            "anthropic.yaml".to_owned(),
            (anthropic::PROTOCOL.provider_yaml)(&anthropic_base),
        ),
    ];
    let gw = spawn_gateway(gateway, &providers).await;
    let send = |body: Value| {
        let url = gw.url("/v1/chat/completions");
        async move {
            let resp = client().post(url).json(&body).send().await.unwrap();
            let status = resp.status();
            let v: Value = resp.json().await.unwrap();
            assert_eq!(status, 200, "{v}");
            v
        }
    };
    let portable = |id: &str| {
        !id.is_empty()
            && id.len() <= 40
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };

    let first = send(
        json!({"model": "gem", "tools": weather_tool(), "messages": [
        {"role": "user", "content": "signed_call"}]}),
    )
    .await;
    let call = &first["choices"][0]["message"]["tool_calls"][0];
    let id = call["id"].as_str().unwrap().to_owned();
    assert!(portable(&id), "{id}");

    let turn = |route: &str| {
        json!({"model": route, "tools": weather_tool(), "messages": [
            {"role": "user", "content": "signed_call"},
            {"role": "assistant", "content": null, "tool_calls": [call.clone()]},
            {"role": "tool", "tool_call_id": id, "content": "sunny"},
            {"role": "user", "content": "chat"}]})
    };
    let v = send(turn("fb")).await;
    assert_eq!(v["choices"][0]["message"]["content"], EXPECTED_TEXT, "{v}");
    let sent = anthropic.log.lock().unwrap().last().unwrap().1.clone();
    let tool_use = &sent["messages"][1]["content"][0];
    assert_eq!(tool_use["type"], "tool_use", "{sent}");
    let sent_id = tool_use["id"].as_str().unwrap();
    assert!(portable(sent_id), "{sent_id}");
    assert_eq!(
        sent["messages"][2]["content"][0]["tool_use_id"], sent_id,
        "{sent}"
    );

    let v = send(turn("gem")).await;
    assert_eq!(v["choices"][0]["message"]["content"], EXPECTED_TEXT, "{v}");
    let sent = gemini.log.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(
        sent["contents"][1]["parts"][0]["thoughtSignature"], "c2lnbmF0dXJl",
        "{sent}"
    );
}

/// Gemini gives a call its own id (not random, not portable): every client
/// request still gets a fresh portable id, and replaying the call sends Gemini
/// its own id back on the call and on the function response, with the call's
/// signature. Gemini's id itself names nothing in the gateway.
#[tokio::test]
async fn gemini_call_ids_go_back_to_gemini_unchanged() {
    let (gemini_base, gemini) = native::spawn(&gemini::PROTOCOL).await;
    let gateway = "listen: 127.0.0.1:0\nroutes:\n  gem:\n    provider: gemini\n    model: gemini-3-pro-preview\n";
    let providers = vec![(
        "gemini.yaml".to_owned(),
        (gemini::PROTOCOL.provider_yaml)(&gemini_base),
    )];
    let gw = spawn_gateway(gateway, &providers).await;
    let send = |body: Value| {
        let url = gw.url("/v1/chat/completions");
        async move {
            let resp = client().post(url).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    let ask = json!({"model": "gem", "tools": weather_tool(), "messages": [
        {"role": "user", "content": "signed_call_with_id"}]});
    let a = send(ask.clone()).await["choices"][0]["message"]["tool_calls"][0].clone();
    let b = send(ask).await["choices"][0]["message"]["tool_calls"][0].clone();
    let (id_a, id_b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    assert_ne!(id_a, id_b, "two requests, two ids");
    assert!(id_a.starts_with("call_") && id_a.len() == 37, "{id_a}");

    let turn = |call: &Value, id: &str| {
        json!({"model": "gem", "tools": weather_tool(), "messages": [
            {"role": "user", "content": "signed_call_with_id"},
            {"role": "assistant", "content": null, "tool_calls": [call.clone()]},
            {"role": "tool", "tool_call_id": id, "content": "sunny"},
            {"role": "user", "content": "chat"}]})
    };
    let v = send(turn(&a, id_a)).await;
    assert_eq!(v["choices"][0]["message"]["content"], EXPECTED_TEXT, "{v}");
    let sent = gemini.log.lock().unwrap().last().unwrap().1.clone();
    let part = &sent["contents"][1]["parts"][0];
    assert_eq!(part["functionCall"]["id"], "fc/weather:0", "{sent}");
    assert_eq!(
        part["thoughtSignature"], "c2lnbmF0dXJlLXdpdGgtaWQ=",
        "{sent}"
    );
    assert_eq!(
        sent["contents"][2]["parts"][0]["functionResponse"]["id"], "fc/weather:0",
        "{sent}"
    );
    // Replayed under Gemini's own id, the call finds no signature and no id.
    let mut forged = a.clone();
    forged["id"] = json!("fc/weather:0");
    send(turn(&forged, "fc/weather:0")).await;
    let sent = gemini.log.lock().unwrap().last().unwrap().1.clone();
    let part = &sent["contents"][1]["parts"][0];
    assert_eq!(
        part["thoughtSignature"], "skip_thought_signature_validator",
        "{sent}"
    );
    assert!(part["functionCall"].get("id").is_none(), "{sent}");
}

/// Expands to the suite's test functions for the module's `PROTOCOL`, on
/// the path `conformance_path!()` names where the module is declared.
macro_rules! conformance_cases {
    () => {
        conformance_cases!(no_stream_error);
        #[tokio::test]
        async fn stream_error() {
            crate::stream_error(&PROTOCOL, conformance_path!()).await
        }
    };
    // For backends without a streaming API: streams are replayed from a complete
    // answer, so a failure after the first output cannot happen.
    (no_stream_error) => {
        #[tokio::test]
        async fn chat() {
            crate::chat(&PROTOCOL, conformance_path!()).await
        }
        #[tokio::test]
        async fn multi_turn() {
            crate::multi_turn(&PROTOCOL, conformance_path!()).await
        }
        #[tokio::test]
        async fn stream() {
            crate::stream(&PROTOCOL, conformance_path!()).await
        }
        #[tokio::test]
        async fn tools() {
            crate::tools(&PROTOCOL, conformance_path!()).await
        }
        #[tokio::test]
        async fn length() {
            crate::length(&PROTOCOL, conformance_path!()).await
        }
        #[tokio::test]
        async fn errors() {
            crate::errors(&PROTOCOL, conformance_path!()).await
        }
    };
}

macro_rules! conformance_path {
    () => {
        crate::Path::Fast
    };
}

// One line per backend protocol.
#[path = "protocols/anthropic.rs"]
mod anthropic;
#[path = "protocols/azure.rs"]
mod azure;
#[path = "protocols/chatglm.rs"]
mod chatglm;
#[path = "protocols/chatglm3.rs"]
mod chatglm3;
#[path = "protocols/dashscope.rs"]
mod dashscope;
#[path = "protocols/gemini.rs"]
mod gemini;
#[path = "protocols/llamacpp.rs"]
mod llamacpp;
#[path = "protocols/ollama.rs"]
mod ollama;
#[path = "protocols/openai.rs"]
mod openai;
#[path = "protocols/qianfan.rs"]
mod qianfan;
#[path = "protocols/zhipu.rs"]
mod zhipu;

// The OpenAI-compatible protocols (those whose backends take the client's
// bytes) once more with `fast_path: false`: the same cases pass on both paths.
// Declared last: the definition below holds for what follows it.
macro_rules! conformance_path {
    () => {
        crate::Path::Canonical
    };
}
// The second instance of the protocol's cases is the point.
#[allow(clippy::duplicate_mod)]
#[path = "protocols/openai.rs"]
mod openai_canonical_path;
