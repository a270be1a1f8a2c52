//! Prompt hot path: rendering a typical 3-message template with 5 variables from
//! a compiled registry, and the lock-free snapshot load every request does.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use promptgate::canonical::Role;
use promptgate::prompt::*;
use serde_json::json;

fn registry() -> Registry {
    let var = |name: &str, ty, default| VarDef {
        name: name.into(),
        ty,
        default,
        description: None,
    };
    let msg = |role, source: &str| MessageTemplate {
        role,
        source: source.into(),
        line: 1,
    };
    let version = VersionDef {
        number: 1,
        hash: String::new(),
        description: None,
        route: Some("r".into()),
        params: PromptParams::default(),
        retrieval: Vec::new(),
        messages: vec![
            msg(Role::System, "You are a support agent for {{ shop }}. Answer only from the policy:\n{% for p in policy %}- {{ p }}\n{% endfor %}"),
            msg(Role::User, "Customer: {{ name | title }}{% if vip %} (VIP){% endif %}\nOrder total: {{ total }} EUR"),
            msg(Role::User, "Question: {{ question }}"),
        ],
        line: 1,
    };
    let def = PromptDef {
        id: "support".into(),
        file: "support.yaml".into(),
        description: None,
        variables: vec![
            var("shop", VarType::String, Some(json!("Example Shop"))),
            var("policy", VarType::List, Some(json!([]))),
            var("name", VarType::String, None),
            var("vip", VarType::Boolean, Some(json!(false))),
            var("total", VarType::Number, Some(json!(0))),
            var("question", VarType::String, None),
        ],
        labels: BTreeMap::from([("production".to_string(), 1)]),
        versions: BTreeMap::from([(1, version)]),
    };
    Registry::build(BTreeMap::from([("support".to_string(), def)])).unwrap()
}

fn prompt(c: &mut Criterion) {
    let reg = registry();
    let r = PromptRef {
        id: "support".into(),
        selector: Selector::default(),
        explicit_selector: None,
        variables: json!({
            "name": "ada lovelace",
            "vip": true,
            "total": 59.5,
            "question": "Can I return shoes I wore once?",
            "policy": ["Returns within 30 days", "Items must be unused"],
        })
        .as_object()
        .unwrap()
        .clone(),
    };
    c.bench_function("prompt/render_3_messages_5_vars", |b| {
        b.iter(|| reg.render(black_box(&r)).unwrap())
    });
    let swap = arc_swap::ArcSwap::from_pointee(reg);
    c.bench_function("prompt/snapshot_load", |b| {
        b.iter(|| black_box(swap.load_full()))
    });
}

criterion_group!(benches, prompt);
criterion_main!(benches);
