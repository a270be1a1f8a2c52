//! Data-protection detectors: one pass of the built-in detectors (and of one
//! operator regex) over realistic mixed Chinese/English chat text, in bytes
//! per second on one core.
#![allow(clippy::unwrap_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use promptgate::config::{DataPolicy, ProtectConfig};
use promptgate::protect::{Scanner, BUILTIN};

/// About 64 KiB of customer-service style text: Chinese prose, English
/// prose, code and logs with numbers, dates, versions, URLs and prices, and
/// one sensitive value every ~2 KiB.
fn corpus(with_hits: bool) -> String {
    let paragraphs = [
        "您好，关于您在2024年3月15日提交的订单（订单号 20240315123456789），我们已经安排发货，预计3-5个工作日送达。如有问题请随时联系客服。",
        "Thanks for reaching out! Your ticket #48213 was escalated to the billing team on 2024-03-15; they usually reply within 24 hours. Version 2.14.3 fixes the export bug.",
        "根据公司报销制度，单笔金额超过5000元的费用需要部门经理审批，发票抬头必须填写公司全称，税号不得有误。差旅标准：一线城市住宿每晚不超过600元。",
        "fn main() { let total: u64 = items.iter().map(|i| i.price * 100).sum(); println!(\"total = {total}\"); } // see https://docs.example.com/v1/api?page=2",
        "2024-03-15T08:12:44Z INFO request_id=7f3a9c2e route=chat latency_ms=182 tokens_in=1532 tokens_out=211 status=200 upstream=openai model=gpt-4o-mini",
        "请总结以下会议纪要：一、第二季度销售额同比增长12.5%，华东区贡献最大；二、新产品线预计9月上线；三、下周三前提交预算草案。",
        "The quick brown fox jumps over the lazy dog while the model summarises a 30-page contract, listing clauses 4.2, 7.1 and 12.3 as the ones to review first.",
    ];
    let hits = [
        "客户手机13912345678，",
        " mail zhang.san@example.com.cn ",
        "身份证11010519491231002X，",
        " card 6222021234567890128 ",
        " host 10.24.3.17 ",
        " api_key=Zx8Kq2Lm9Np4Rs7Tv1Wy3Ab6Cd0Ef5Gh ",
    ];
    let mut out = String::new();
    let mut k = 0;
    while out.len() < 64 * 1024 {
        for p in paragraphs {
            out.push_str(p);
            out.push('\n');
        }
        if with_hits {
            out.push_str(hits[k % hits.len()]);
            k += 1;
        }
    }
    out
}

fn scanner(custom: bool) -> Scanner {
    Scanner::build(&ProtectConfig {
        policy: DataPolicy::Redact,
        detectors: BUILTIN.iter().map(|s| (*s).to_owned()).collect(),
        custom: if custom {
            vec![("employee_id".into(), r"EMP-\d{6}".into())]
        } else {
            Vec::new()
        },
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("protect");
    for (name, text, custom) in [
        ("builtin_mixed_with_hits", corpus(true), false),
        ("builtin_mixed_clean", corpus(false), false),
        ("builtin_and_one_regex_mixed_with_hits", corpus(true), true),
    ] {
        let s = scanner(custom);
        let mut hits = Vec::new();
        s.scan(&text, &mut hits);
        assert_eq!(hits.is_empty(), name.contains("clean"), "{name}");
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                hits.clear();
                s.scan(black_box(&text), &mut hits);
                black_box(hits.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
