//! Codec hot path: decode a typical client request, encode it for an
//! OpenAI-compatible backend, decode + re-encode a response, and re-frame a
//! 50-chunk stream (bytes → frames → canonical events → client SSE bytes).
#![allow(clippy::unwrap_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use promptgate::backend::openai as wire;
use promptgate::canonical::StreamEvent;
use promptgate::framing::{Frame, FrameDecoder, Framing};

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

/// A 50-content-chunk stream in a protocol's own format, built from its fixture
/// by repeating the event that carries "Hello".
fn stream_of_50(fixture: &str, framing: Framing) -> Option<String> {
    let sep = match framing {
        Framing::Sse => {
            if fixture.contains("\r\n\r\n") {
                "\r\n\r\n"
            } else {
                "\n\n"
            }
        }
        Framing::Ndjson => "\n",
    };
    let frames: Vec<&str> = fixture.split_inclusive(sep).collect();
    let i = frames.iter().position(|f| f.contains("Hello"))?;
    let mut out = String::new();
    for f in &frames[..i] {
        out.push_str(f);
    }
    for _ in 0..50 {
        out.push_str(frames[i]);
    }
    for f in &frames[i + 1..] {
        out.push_str(f);
    }
    Some(out)
}

/// Every native codec, built from the shipped provider files: encode a typical
/// request, decode a typical response, and re-frame a 50-chunk stream into the
/// client's OpenAI SSE.
fn native_codecs(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = promptgate::config::load(&root.join("promptgate.yaml")).unwrap();
    let mut req = wire::decode_chat_request(REQUEST.as_bytes()).unwrap();
    let mut seen = Vec::new();
    for p in cfg.providers.values() {
        let kind = p.kind.name;
        if seen.contains(&kind) || kind == "sandbox" {
            continue;
        }
        seen.push(kind);
        let codec = promptgate::backend::codec(p).unwrap();
        let dir = root.join("tests/fixtures").join(kind);
        let Ok(body) = std::fs::read(dir.join("chat.json")) else {
            continue;
        };
        let mut g = c.benchmark_group(format!("codec/{kind}"));
        req.stream = false;
        g.bench_function("encode_request", |b| {
            b.iter(|| codec.chat_call(black_box(&req), "model").unwrap())
        });
        g.bench_function("decode_response", |b| {
            b.iter(|| codec.chat_response(black_box(&body)).unwrap())
        });
        let ext = match codec.stream_framing() {
            Framing::Sse => "sse",
            Framing::Ndjson => "ndjson",
        };
        let stream = std::fs::read_to_string(dir.join(format!("chat.{ext}")))
            .ok()
            .filter(|_| codec.native_streaming())
            .and_then(|f| stream_of_50(&f, codec.stream_framing()));
        if let Some(stream) = stream {
            g.throughput(Throughput::Elements(50));
            g.bench_function("reframe_50_chunks", |b| {
                b.iter(|| {
                    let mut frames = FrameDecoder::new(codec.stream_framing());
                    let mut dec = codec.stream_decoder();
                    let mut enc = wire::ChunkEncoder::new("route", true);
                    let mut events = Vec::new();
                    let mut out = Vec::with_capacity(512);
                    let mut sent = 0;
                    for piece in stream.as_bytes().chunks(1460) {
                        frames.push(piece);
                        while let Some(f) = frames.next_frame() {
                            dec.frame(f, &mut events).unwrap();
                            for e in events.drain(..) {
                                enc.encode(&e, &mut out);
                            }
                            sent += out.len();
                            out.clear();
                        }
                    }
                    sent
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, codec, native_codecs);
criterion_main!(benches);
