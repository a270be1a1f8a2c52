//! Codec hot path: decode a typical client request, encode it for an
//! OpenAI-compatible backend, decode + re-encode a response, and re-frame a
//! 50-chunk stream (bytes → frames → canonical events → client SSE bytes).
#![allow(clippy::unwrap_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use promptgate::canonical::StreamEvent;
use promptgate::framing::{Frame, FrameDecoder, Framing};
use promptgate::wire::openai as wire;

const REQUEST: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant for the support team. Answer in two sentences."},{"role":"user","content":"How do I reset my password if I no longer have access to my email account?"}],"temperature":0.2,"max_tokens":256,"stream":false,"user":"user-1234"}"#;

const RESPONSE: &str = r#"{"id":"chatcmpl-abc123","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_1","choices":[{"index":0,"message":{"role":"assistant","content":"Open the sign-in page and choose 'Forgot password', then pick 'I no longer have access to this email'. Support will verify your identity with your recovery phone number and let you set a new address.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":45,"completion_tokens":48,"total_tokens":93}}"#;

fn stream_body(chunks: usize) -> String {
    let mut s = String::new();
    for i in 0..chunks {
        s.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-abc123\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        ));
    }
    s.push_str("data: {\"id\":\"chatcmpl-abc123\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":45,\"completion_tokens\":50,\"total_tokens\":95}}\n\ndata: [DONE]\n\n");
    s
}

/// The whole stream path, fed in network-sized pieces.
fn reframe(body: &[u8], piece: usize) -> usize {
    let mut frames = FrameDecoder::new(Framing::Sse);
    let mut dec = wire::ChunkDecoder::default();
    let mut enc = wire::ChunkEncoder::new("route", true);
    let mut events: Vec<StreamEvent> = Vec::new();
    let mut out = Vec::with_capacity(512);
    let mut sent = 0;
    for p in body.chunks(piece) {
        frames.push(p);
        while let Some(Frame::Sse(ev)) = frames.next_frame() {
            dec.decode(&ev.data, &mut events).unwrap();
            for e in events.drain(..) {
                enc.encode(&e, &mut out);
            }
            sent += out.len();
            out.clear();
        }
    }
    sent
}

fn codec(c: &mut Criterion) {
    c.bench_function("openai/decode_request", |b| {
        b.iter(|| wire::decode_chat_request(black_box(REQUEST.as_bytes())).unwrap())
    });
    let req = wire::decode_chat_request(REQUEST.as_bytes()).unwrap();
    c.bench_function("openai/encode_upstream_request", |b| {
        b.iter(|| wire::encode_chat_request(black_box(&req), "gpt-4o-mini", true))
    });
    c.bench_function("openai/decode_response", |b| {
        b.iter(|| wire::decode_chat_response(black_box(RESPONSE.as_bytes())).unwrap())
    });
    let resp = wire::decode_chat_response(RESPONSE.as_bytes()).unwrap();
    c.bench_function("openai/encode_response", |b| {
        b.iter(|| wire::encode_chat_response(black_box(&resp), "route"))
    });
    let mut g = c.benchmark_group("openai/reframe_stream");
    for chunks in [50usize, 200] {
        let body = stream_body(chunks);
        g.throughput(Throughput::Elements(chunks as u64));
        g.bench_function(format!("{chunks}_chunks"), |b| {
            b.iter(|| reframe(black_box(body.as_bytes()), 1460))
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
