//! Property tests for the ingress decoders (OpenAI chat and embeddings, the
//! Anthropic Messages front door), and for every backend's request encoder fed
//! what they decode: mutated realistic requests and random bytes decode to a
//! request or a client error, never a panic, and neither the request nor any
//! backend body built from it is larger than a fixed multiple of the input.
#![allow(clippy::unwrap_used)]

mod props_common;

use promptgate::backend::{anthropic, openai};
use promptgate::canonical::ChatRequest;
use proptest::prelude::*;
use proptest::sample::Index;

use props_common::{bound, held, held_bound, mutate, mutations, size_of, subjects};

const OPENAI: &[&str] = &[
    r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Say hello."}],"temperature":0.2,"top_p":0.9,"max_tokens":256,"n":1,"stop":["\n\n","END"],"seed":7,"user":"u-1","stream":true,"stream_options":{"include_usage":true}}"#,
    r#"{"model":"m","messages":[{"role":"developer","content":"Use tools."},{"role":"user","content":[{"type":"text","text":"What is in this image?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo=","detail":"low"}}]},{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},{"role":"tool","tool_call_id":"call_1","content":"18C"}],"tools":[{"type":"function","function":{"name":"get_weather","description":"Weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]},"strict":true}}],"tool_choice":{"type":"function","function":{"name":"get_weather"}},"parallel_tool_calls":false,"max_completion_tokens":100,"top_logprobs":5,"logprobs":true,"presence_penalty":0.5,"frequency_penalty":-0.5}"#,
    r#"{"model":"m","messages":[{"role":"user","content":"json please"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object"}}},"reasoning_effort":"high","logit_bias":{"50256":-100},"metadata":{"k":"v"}}"#,
];

const ANTHROPIC: &[&str] = &[
    r#"{"model":"claude","max_tokens":1024,"system":"Be brief.","messages":[{"role":"user","content":"Hello"}],"temperature":0.5,"top_k":40,"stop_sequences":["END"],"stream":true}"#,
    r#"{"model":"claude","max_tokens":512,"system":[{"type":"text","text":"Use tools.","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":[{"type":"text","text":"Look"},{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgo="}}]},{"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":"sig"},{"type":"text","text":"Calling."},{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Paris"}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":[{"type":"text","text":"18C"}],"is_error":false}]}],"tools":[{"name":"get_weather","description":"Weather","input_schema":{"type":"object","properties":{"city":{"type":"string"}}}}],"tool_choice":{"type":"tool","name":"get_weather"},"thinking":{"type":"enabled","budget_tokens":2048},"metadata":{"user_id":"u-1"}}"#,
];

const EMBEDDINGS: &[&str] = &[
    r#"{"model":"text-embedding-3-small","input":["one","two"],"dimensions":256,"encoding_format":"base64","user":"u"}"#,
    r#"{"model":"e","input":[[1,2,3],[4,5]]}"#,
    r#"{"model":"e","input":"just text"}"#,
];

/// Every backend's request body for `req` is bounded by the client's input.
fn encode_everywhere(req: &ChatRequest, input_len: usize) {
    for s in subjects() {
        for stream in [false, true] {
            let mut r = req.clone();
            r.stream = stream;
            if let Ok(call) = s.codec.chat_call(&r, "model-x") {
                assert!(
                    call.body.len() <= bound(input_len),
                    "{}: {} body bytes from {input_len}",
                    s.name,
                    call.body.len()
                );
            }
        }
    }
}

fn check_chat(
    decode: fn(&[u8]) -> Result<ChatRequest, promptgate::error::GatewayError>,
    input: &[u8],
) {
    if let Ok(req) = decode(input) {
        let n = size_of(&req);
        assert!(
            n <= bound(input.len()),
            "request of {} bytes decoded to {n}",
            input.len()
        );
        let h = held(&req);
        assert!(
            h <= held_bound(input.len()),
            "request of {} bytes holds {h} bytes",
            input.len()
        );
        encode_everywhere(&req, input.len());
    }
}

fn check_embeddings(input: &[u8]) {
    if let Ok(req) = openai::decode_embeddings_request(input) {
        let n = size_of(&req);
        assert!(n <= bound(input.len()), "{n}");
        let h = held(&req);
        assert!(
            h <= held_bound(input.len()),
            "embeddings request of {} bytes holds {h} bytes",
            input.len()
        );
        for s in subjects() {
            if let Ok(call) = s.codec.embeddings_call(&req, "model-x") {
                assert!(call.body.len() <= bound(input.len()), "{}", s.name);
            }
        }
    }
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn openai_requests_survive_mutation(seed in any::<Index>(), muts in mutations()) {
        let base = OPENAI[seed.index(OPENAI.len())].as_bytes();
        check_chat(openai::decode_chat_request, &mutate(base, &muts));
    }

    #[test]
    fn anthropic_requests_survive_mutation(seed in any::<Index>(), muts in mutations()) {
        let base = ANTHROPIC[seed.index(ANTHROPIC.len())].as_bytes();
        check_chat(anthropic::decode_chat_request, &mutate(base, &muts));
    }

    #[test]
    fn embeddings_requests_survive_mutation(seed in any::<Index>(), muts in mutations()) {
        let base = EMBEDDINGS[seed.index(EMBEDDINGS.len())].as_bytes();
        check_embeddings(&mutate(base, &muts));
    }

    #[test]
    fn ingress_survives_random_bytes(
        input in props_common::biased_bytes(b"{}[]\",:0123456789-e.aeiou", 800),
    ) {
        check_chat(openai::decode_chat_request, &input);
        check_chat(anthropic::decode_chat_request, &input);
        check_embeddings(&input);
    }
}

/// Every number of every seed replaced by each hostile number.
#[test]
fn ingress_survives_every_number_made_hostile() {
    use props_common::{number_spans, Mutation, HOSTILE_NUMBERS};
    let cases: [(&[&str], u8); 3] = [(OPENAI, 0), (ANTHROPIC, 1), (EMBEDDINGS, 2)];
    for (seeds, which) in cases {
        for seed in seeds {
            for k in 0..number_spans(seed.as_bytes()).len() {
                for n in 0..HOSTILE_NUMBERS.len() {
                    let input = mutate(seed.as_bytes(), &[Mutation::Number(k, n)]);
                    match which {
                        0 => check_chat(openai::decode_chat_request, &input),
                        1 => check_chat(anthropic::decode_chat_request, &input),
                        _ => check_embeddings(&input),
                    }
                }
            }
        }
    }
}

/// Requests that repeat something small many times: what they decode to
/// holds at most a fixed multiple of their size.
#[test]
fn repeated_small_items_hold_little() {
    let n = 5_000;
    let list = |item: &str| vec![item; n].join(",");
    let openai_bodies = [
        format!(
            r#"{{"model":"m","messages":[{}]}}"#,
            list(r#"{"role":"user"}"#)
        ),
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{}]}}]}}"#,
            list(r#"{"type":"text","text":""}"#)
        ),
        format!(
            r#"{{"model":"m","messages":[{{"role":"assistant","tool_calls":[{}]}}]}}"#,
            list(r#"{"id":"a","type":"function","function":{"name":"f"}}"#)
        ),
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"stop":[{}]}}"#,
            list(r#""""#)
        ),
    ];
    for body in &openai_bodies {
        check_chat(openai::decode_chat_request, body.as_bytes());
    }
    let anthropic_bodies = [
        format!(
            r#"{{"model":"c","max_tokens":1,"messages":[{}]}}"#,
            list(r#"{"role":"user","content":"x"}"#)
        ),
        format!(
            r#"{{"model":"c","max_tokens":1,"messages":[{{"role":"user","content":[{}]}}]}}"#,
            list(r#"{"type":"text","text":"x"}"#)
        ),
    ];
    for body in &anthropic_bodies {
        check_chat(anthropic::decode_chat_request, body.as_bytes());
    }
    check_embeddings(format!(r#"{{"model":"e","input":[{}]}}"#, list("[]")).as_bytes());
    check_embeddings(format!(r#"{{"model":"e","input":[{}]}}"#, list(r#""""#)).as_bytes());
}

#[test]
fn seeds_decode() {
    for s in OPENAI {
        openai::decode_chat_request(s.as_bytes()).unwrap();
    }
    for s in ANTHROPIC {
        anthropic::decode_chat_request(s.as_bytes()).unwrap();
    }
    for s in EMBEDDINGS {
        openai::decode_embeddings_request(s.as_bytes()).unwrap();
    }
}

/// All of the above again in a child process that may use at most 512 MiB of
/// data: no request of a few KiB may make a decoder or encoder reserve more.
#[test]
fn properties_hold_under_a_memory_cap() {
    props_common::rerun_under_memory_cap("properties_hold_under_a_memory_cap", 512 * 1024);
}
