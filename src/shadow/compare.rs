//! The comparison of a primary's and a candidate's answer to the same request.
//!
//! Pure functions, run off the request path (in the shadow task or by
//! `promptgate replay`) on outputs of up to 64 KiB. Every measure is defined
//! here, in one place:
//!
//! - **exact**: the texts are equal after trimming whitespace at both ends,
//!   and the tool calls agree (see *tool_agreement*; no tool call on either
//!   side counts as agreeing).
//! - **token_f1**: the bag-of-tokens F1 of the two normalised texts: the
//!   multiset overlap `c` of the token lists `a` and `b` gives precision
//!   `c/|b|` and recall `c/|a|`, so F1 = `2c / (|a| + |b|)`. Normalisation:
//!   letters lowercased; every character that is neither a letter, a digit
//!   nor whitespace (punctuation, symbols, combining marks, emoji) dropped
//!   without leaving a gap (`don't` → `dont`); the rest split on whitespace,
//!   and each CJK character (Han, Hiragana, Katakana, Hangul) a token of its
//!   own. Both texts without a token → 1.0; one of them → 0.0. No Unicode
//!   normalisation (NFC/NFKC) is applied.
//! - **char_similarity**: the Dice coefficient `2c / (|A| + |B|)` of the
//!   multisets of character bigrams of the normalised texts with whitespace
//!   removed — it needs no word segmentation, so it measures Chinese as well
//!   as English. When either text has fewer than two characters, single
//!   characters are compared instead. Both empty → 1.0.
//! - **json** (only when `response_format` asks for JSON): each text is
//!   valid when, after trimming and after removing one surrounding Markdown
//!   code fence (```` ``` ```` or ```` ```json ````, the closing ```` ``` ```` at
//!   the very end), it parses as a JSON value. `schema_agree`: for
//!   `json_object`, both are valid and have the same shape (see
//!   `same_shape`); for `json_schema`, both are valid against the schema,
//!   checked by the small validator below (the keywords models are asked to
//!   follow; see `Validator`).
//! - **tool_agreement**: `None` when neither side called a tool; otherwise
//!   the same number of calls, the same function names in order, and
//!   arguments equal as JSON values (object key order and `1` vs `1.0` do not
//!   matter; empty arguments count as `{}`; arguments that do not parse are
//!   compared as trimmed strings).
//! - **refusal**: a heuristic. An answer without tool calls is a refusal when,
//!   within its first [`REFUSAL_WINDOW`] characters, a sentence or clause
//!   starts with one of [`REFUSAL_PHRASES`] (case-insensitive; curly
//!   apostrophes read as straight ones).
//! - **empty**: trimmed text empty and no tool call.
//! - **length_ratio**: characters of the candidate's trimmed text over the
//!   primary's; `None` when the primary's trimmed text is empty.
//!
//! `embedding_similarity` is left `None`: the caller fills it with [`cosine`]
//! of the two texts' embeddings when the route names an embeddings route.

use std::cmp::Ordering;

use serde_json::{Map, Number, Value};

use super::{Comparison, JsonCheck, Side, ToolCallOut};
use crate::canonical::ResponseFormat;

/// What the request's `response_format` asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum JsonAsk<'a> {
    /// Text (or nothing said).
    No,
    /// `json_object`: any JSON; the two answers should have the same shape.
    Object,
    /// `json_schema`: the schema both answers should be valid against.
    Schema(&'a Value),
}

/// Reads the canonical request's `response_format`. The canonical
/// `JsonSchema` holds OpenAI's `json_schema` object (`{name, schema,
/// strict}`); its `schema` member is the schema (the whole object when it has
/// none).
pub fn json_ask(rf: Option<&ResponseFormat>) -> JsonAsk<'_> {
    match rf {
        None | Some(ResponseFormat::Text) => JsonAsk::No,
        Some(ResponseFormat::JsonObject) => JsonAsk::Object,
        Some(ResponseFormat::JsonSchema(v)) => JsonAsk::Schema(v.get("schema").unwrap_or(v)),
    }
}

/// Compares two answered sides. Fills every field but
/// `embedding_similarity`.
pub fn compare(primary: &Side, candidate: &Side, ask: JsonAsk<'_>) -> Comparison {
    let pt = primary.text.trim();
    let ct = candidate.text.trim();
    let tool_agreement = tool_agreement(&primary.tool_calls, &candidate.tool_calls);
    let pn = normalise(pt);
    let cn = normalise(ct);
    let primary_chars = pt.chars().count();
    let length_ratio =
        (primary_chars > 0).then(|| ct.chars().count() as f64 / primary_chars as f64);
    Comparison {
        exact: pt == ct && tool_agreement != Some(false),
        token_f1: token_f1(&pn, &cn),
        char_similarity: char_similarity(&pn, &cn),
        json: json_check(pt, ct, ask),
        tool_agreement,
        primary_refusal: primary.tool_calls.is_empty() && is_refusal(pt),
        candidate_refusal: candidate.tool_calls.is_empty() && is_refusal(ct),
        primary_empty: pt.is_empty() && primary.tool_calls.is_empty(),
        candidate_empty: ct.is_empty() && candidate.tool_calls.is_empty(),
        length_ratio,
        embedding_similarity: None,
    }
}

/// The cosine similarity of two embeddings, in [-1, 1]; `None` when their
/// lengths differ, either is empty or has a zero norm, or a figure is not
/// finite.
pub fn cosine(a: &[f32], b: &[f32]) -> Option<f64> {
    if a.len() != b.len() {
        return None;
    }
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return None;
    }
    let c = dot / (na.sqrt() * nb.sqrt());
    c.is_finite().then(|| c.clamp(-1.0, 1.0))
}

// ---------------------------------------------------------------------------
// Text

/// Han (CJK Unified Ideographs and their extensions, compatibility
/// ideographs), Hiragana, Katakana, Hangul. Only called on alphanumeric
/// characters, so the blocks' punctuation never reaches it.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF
        | 0x20000..=0x2EBEF | 0x2F800..=0x2FA1F | 0x30000..=0x323AF
        | 0x3005..=0x3007 // 々 〆 〇
        | 0x3040..=0x309F // Hiragana
        | 0x30A0..=0x30FF | 0x31F0..=0x31FF | 0xFF66..=0xFF9F // Katakana
        | 0x1100..=0x11FF | 0x3130..=0x318F | 0xA960..=0xA97F
        | 0xAC00..=0xD7AF | 0xD7B0..=0xD7FF // Hangul
    )
}

/// The normalised text: tokens separated by one space, no leading or
/// trailing space (see the module documentation).
fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // The last character written is a separator (or nothing is written yet).
    let mut sep = true;
    for c in text.chars() {
        if c.is_whitespace() {
            if !sep {
                out.push(' ');
                sep = true;
            }
        } else if !c.is_alphanumeric() {
            // Punctuation, symbols, marks: dropped without a gap.
        } else if is_cjk(c) {
            if !sep {
                out.push(' ');
            }
            out.push(c);
            out.push(' ');
            sep = true;
        } else {
            out.extend(c.to_lowercase());
            sep = false;
        }
    }
    if out.ends_with(' ') {
        out.pop();
    }
    out
}

/// The size of the multiset intersection of two lists (sorts both).
fn overlap<T: Ord>(a: &mut [T], b: &mut [T]) -> usize {
    a.sort_unstable();
    b.sort_unstable();
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            Ordering::Less => i += 1,
            Ordering::Greater => j += 1,
            Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

/// `2c / (a + b)`; 1.0 when both are empty.
fn dice(common: usize, a: usize, b: usize) -> f64 {
    let total = a.saturating_add(b);
    if total == 0 {
        1.0
    } else {
        2.0 * common as f64 / total as f64
    }
}

/// Token F1 of two normalised texts.
fn token_f1(a: &str, b: &str) -> f64 {
    let mut ta: Vec<&str> = a.split(' ').filter(|t| !t.is_empty()).collect();
    let mut tb: Vec<&str> = b.split(' ').filter(|t| !t.is_empty()).collect();
    let common = overlap(&mut ta, &mut tb);
    dice(common, ta.len(), tb.len())
}

/// Character-bigram Dice of two normalised texts, whitespace removed.
fn char_similarity(a: &str, b: &str) -> f64 {
    let ca: Vec<char> = a.chars().filter(|&c| c != ' ').collect();
    let cb: Vec<char> = b.chars().filter(|&c| c != ' ').collect();
    if ca.len() < 2 || cb.len() < 2 {
        let (mut ua, mut ub) = (ca, cb);
        let common = overlap(&mut ua, &mut ub);
        return dice(common, ua.len(), ub.len());
    }
    let mut ba: Vec<(char, char)> = ca.windows(2).map(|w| (w[0], w[1])).collect();
    let mut bb: Vec<(char, char)> = cb.windows(2).map(|w| (w[0], w[1])).collect();
    let common = overlap(&mut ba, &mut bb);
    dice(common, ba.len(), bb.len())
}

// ---------------------------------------------------------------------------
// Refusals

/// How far into an answer a refusal phrase may start, in characters.
pub const REFUSAL_WINDOW: usize = 200;

/// The phrases that mark a refusal when a sentence or clause of the answer's
/// first [`REFUSAL_WINDOW`] characters starts with one. Lowercase, straight
/// apostrophes. A heuristic: it misses refusals worded otherwise and may
/// flag an answer that merely starts a sentence this way ("I cannot stress
/// enough…"); the report shows it as a rate, not per answer.
pub const REFUSAL_PHRASES: &[&str] = &[
    "i can't",
    "i cannot",
    "i can not",
    "i'm sorry, but",
    "i am sorry, but",
    "sorry, but",
    "i'm sorry, i",
    "i am sorry, i",
    "i apologize, but",
    "i'm unable to",
    "i am unable to",
    "i'm not able to",
    "i am not able to",
    "i won't be able to",
    "i must decline",
    "as an ai",
    "抱歉",
    "很抱歉",
    "非常抱歉",
    "对不起，我",
    "对不起,我",
    "我无法",
    "我不能",
    "作为一个ai",
    "作为ai",
    "作为一个人工智能",
    "作为人工智能",
    "作为一个语言模型",
];

/// Characters after which a new sentence or clause starts.
fn is_boundary(c: char) -> bool {
    matches!(
        c,
        '.' | '!' | '?' | ',' | ':' | ';' | '\n' | '。' | '！' | '？' | '，' | '：' | '；'
    )
}

/// Characters skipped before a sentence's first word (whitespace, Markdown
/// emphasis, quotes).
fn is_lead(c: char) -> bool {
    c.is_whitespace() || matches!(c, '*' | '_' | '#' | '>' | '"' | '`' | '“' | '「' | '-')
}

fn is_refusal(text: &str) -> bool {
    let mut head = String::with_capacity(REFUSAL_WINDOW.saturating_mul(2));
    for c in text.chars().take(REFUSAL_WINDOW) {
        match c {
            '\u{2018}' | '\u{2019}' => head.push('\''),
            c => head.extend(c.to_lowercase()),
        }
    }
    let mut at_start = true;
    for (i, c) in head.char_indices() {
        if at_start && !is_lead(c) {
            let rest = &head[i..];
            if REFUSAL_PHRASES.iter().any(|p| rest.starts_with(p)) {
                return true;
            }
            at_start = false;
        }
        if is_boundary(c) {
            at_start = true;
        }
    }
    false
}

// ---------------------------------------------------------------------------
// Tool calls and JSON equality

fn tool_agreement(a: &[ToolCallOut], b: &[ToolCallOut]) -> Option<bool> {
    if a.is_empty() && b.is_empty() {
        return None;
    }
    Some(
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.name == y.name && arguments_equal(&x.arguments, &y.arguments)),
    )
}

fn parse_arguments(s: &str) -> Option<Value> {
    let t = s.trim();
    if t.is_empty() {
        return Some(Value::Object(Map::new()));
    }
    serde_json::from_str(t).ok()
}

fn arguments_equal(a: &str, b: &str) -> bool {
    match (parse_arguments(a), parse_arguments(b)) {
        (Some(x), Some(y)) => json_eq(&x, &y),
        _ => a.trim() == b.trim(),
    }
}

fn number_eq(x: &Number, y: &Number) -> bool {
    if let (Some(p), Some(q)) = (x.as_i64(), y.as_i64()) {
        return p == q;
    }
    if let (Some(p), Some(q)) = (x.as_u64(), y.as_u64()) {
        return p == q;
    }
    x.as_f64() == y.as_f64()
}

/// JSON equality with numbers compared by value (`1` equals `1.0`) and
/// objects regardless of key order.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_eq(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

// ---------------------------------------------------------------------------
// JSON answers

/// The text without one surrounding Markdown code fence: an opening
/// ```` ``` ```` with no info string or `json` (any case) and a newline, and
/// a closing ```` ``` ```` at the very end. Anything else is returned as is.
fn unfence(t: &str) -> &str {
    let Some(body) = t.strip_prefix("```").and_then(|r| r.strip_suffix("```")) else {
        return t;
    };
    let Some((tag, inner)) = body.split_once('\n') else {
        return t;
    };
    let tag = tag.trim();
    if tag.is_empty() || tag.eq_ignore_ascii_case("json") {
        inner.trim()
    } else {
        t
    }
}

/// The answer as JSON (the text is already trimmed).
fn parse_answer(t: &str) -> Option<Value> {
    serde_json::from_str(unfence(t)).ok()
}

fn json_check(pt: &str, ct: &str, ask: JsonAsk<'_>) -> Option<JsonCheck> {
    let schema = match ask {
        JsonAsk::No => return None,
        JsonAsk::Object => None,
        JsonAsk::Schema(s) => Some(s),
    };
    let p = parse_answer(pt);
    let c = parse_answer(ct);
    let schema_agree = match (&p, &c, schema) {
        (Some(p), Some(c), None) => {
            let mut budget = SHAPE_BUDGET;
            same_shape(p, c, &mut budget)
        }
        (Some(p), Some(c), Some(s)) => {
            Validator::new(s).is_valid(p) && Validator::new(s).is_valid(c)
        }
        _ => false,
    };
    Some(JsonCheck {
        primary_valid: p.is_some(),
        candidate_valid: c.is_some(),
        schema_agree,
    })
}

/// The most value pairs one shape comparison visits; past it the shapes
/// count as different. Arrays compare every element against the other's
/// first, so a crafted answer could otherwise cost its size squared.
const SHAPE_BUDGET: u32 = 1 << 20;

/// Two JSON values have the same shape when they are of the same JSON type;
/// objects must have the same keys, each with values of the same shape;
/// two non-empty arrays agree when every element of each has the shape of the
/// other's first element (lengths may differ), and an empty array agrees
/// with any array.
fn same_shape(a: &Value, b: &Value, budget: &mut u32) -> bool {
    if *budget == 0 {
        return false;
    }
    *budget -= 1;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_shape(v, w, budget)))
        }
        (Value::Array(x), Value::Array(y)) => match (x.first(), y.first()) {
            (Some(x0), Some(y0)) => {
                x.iter().all(|e| same_shape(e, y0, budget))
                    && y.iter().all(|e| same_shape(x0, e, budget))
            }
            _ => true,
        },
        _ => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}

/// A JSON Schema validator for the subset structured-output requests use:
/// `type` (a name or a list; `integer` is a number without a fraction),
/// `enum`, `const`, `properties`, `required`, `additionalProperties` (false
/// or a schema; not checked when `patternProperties` is present),
/// `items` (a schema, or the old list form), `prefixItems`, `anyOf`,
/// `allOf`, `oneOf`, `not`, `minItems`/`maxItems`, `minLength`/`maxLength`,
/// `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum` (numbers), and
/// local `$ref` (`#`, `#/$defs/…`, `#/definitions/…`, any JSON pointer into
/// the schema). Boolean schemas are honoured. Other keywords (`pattern`,
/// `format`, …) and unknown type names are not checked: they never make an
/// answer invalid. A schema that needs more than [`Validator::BUDGET`] steps
/// or nests deeper than [`Validator::MAX_DEPTH`] (a `$ref` cycle) fails.
struct Validator<'s> {
    root: &'s Value,
    budget: u32,
    /// The budget or the depth ran out: no verdict, so not valid.
    gave_up: bool,
}

impl<'s> Validator<'s> {
    const BUDGET: u32 = 1 << 20;
    const MAX_DEPTH: u32 = 256;

    fn new(root: &'s Value) -> Self {
        Validator {
            root,
            budget: Self::BUDGET,
            gave_up: false,
        }
    }

    fn is_valid(&mut self, v: &Value) -> bool {
        self.valid(self.root, v, 0) && !self.gave_up
    }

    fn valid(&mut self, s: &'s Value, v: &Value, depth: u32) -> bool {
        if self.gave_up || self.budget == 0 || depth > Self::MAX_DEPTH {
            self.gave_up = true;
            return false;
        }
        self.budget -= 1;
        let s = match s {
            Value::Bool(b) => return *b,
            Value::Object(m) => m,
            _ => return true,
        };
        let d = depth + 1;
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            if let Some(target) = self.resolve(r) {
                if !self.valid(target, v, d) {
                    return false;
                }
            }
        }
        if let Some(t) = s.get("type") {
            let ok = match t {
                Value::String(name) => type_is(name, v),
                Value::Array(names) => names
                    .iter()
                    .any(|n| n.as_str().is_none_or(|n| type_is(n, v))),
                _ => true,
            };
            if !ok {
                return false;
            }
        }
        if let Some(Value::Array(options)) = s.get("enum") {
            if !options.iter().any(|o| json_eq(o, v)) {
                return false;
            }
        }
        if let Some(c) = s.get("const") {
            if !json_eq(c, v) {
                return false;
            }
        }
        if let Some(Value::Array(subs)) = s.get("allOf") {
            for sub in subs {
                if !self.valid(sub, v, d) {
                    return false;
                }
            }
        }
        if let Some(Value::Array(subs)) = s.get("anyOf") {
            let mut any = false;
            for sub in subs {
                if self.valid(sub, v, d) {
                    any = true;
                    break;
                }
            }
            if !any {
                return false;
            }
        }
        if let Some(Value::Array(subs)) = s.get("oneOf") {
            let mut n = 0;
            for sub in subs {
                if self.valid(sub, v, d) {
                    n += 1;
                }
            }
            if n != 1 {
                return false;
            }
        }
        if let Some(sub) = s.get("not") {
            if self.valid(sub, v, d) || self.gave_up {
                return false;
            }
        }
        match v {
            Value::Object(obj) => self.object(s, obj, d),
            Value::Array(items) => self.array(s, items, d),
            Value::String(text) => {
                let n = text.chars().count() as u64;
                s.get("minLength")
                    .and_then(Value::as_u64)
                    .is_none_or(|m| n >= m)
                    && s.get("maxLength")
                        .and_then(Value::as_u64)
                        .is_none_or(|m| n <= m)
            }
            Value::Number(x) => x.as_f64().is_none_or(|x| number_bounds(s, x)),
            _ => true,
        }
    }

    fn object(&mut self, s: &'s Map<String, Value>, obj: &Map<String, Value>, d: u32) -> bool {
        if let Some(Value::Array(required)) = s.get("required") {
            if !required
                .iter()
                .all(|k| k.as_str().is_none_or(|k| obj.contains_key(k)))
            {
                return false;
            }
        }
        let props = match s.get("properties") {
            Some(Value::Object(p)) => Some(p),
            _ => None,
        };
        if let Some(props) = props {
            for (k, sub) in props {
                if let Some(x) = obj.get(k) {
                    if !self.valid(sub, x, d) {
                        return false;
                    }
                }
            }
        }
        match s.get("additionalProperties") {
            Some(extra) if !s.contains_key("patternProperties") => {
                for (k, x) in obj {
                    if props.is_some_and(|p| p.contains_key(k)) {
                        continue;
                    }
                    if !self.valid(extra, x, d) {
                        return false;
                    }
                }
                true
            }
            _ => true,
        }
    }

    fn array(&mut self, s: &'s Map<String, Value>, items: &[Value], d: u32) -> bool {
        let n = items.len() as u64;
        if !(s
            .get("minItems")
            .and_then(Value::as_u64)
            .is_none_or(|m| n >= m)
            && s.get("maxItems")
                .and_then(Value::as_u64)
                .is_none_or(|m| n <= m))
        {
            return false;
        }
        let mut positional = 0;
        let prefix = match (s.get("prefixItems"), s.get("items")) {
            (Some(Value::Array(p)), _) | (None, Some(Value::Array(p))) => Some(p),
            _ => None,
        };
        if let Some(prefix) = prefix {
            for (sub, x) in prefix.iter().zip(items) {
                if !self.valid(sub, x, d) {
                    return false;
                }
            }
            positional = prefix.len();
        }
        if let Some(rest @ (Value::Object(_) | Value::Bool(_))) = s.get("items") {
            for x in items.iter().skip(positional) {
                if !self.valid(rest, x, d) {
                    return false;
                }
            }
        }
        true
    }

    /// A local reference: `#` or a JSON pointer after it.
    fn resolve(&self, r: &str) -> Option<&'s Value> {
        let pointer = r.strip_prefix('#')?;
        if pointer.is_empty() {
            Some(self.root)
        } else {
            self.root.pointer(pointer)
        }
    }
}

fn type_is(name: &str, v: &Value) -> bool {
    match name {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        "integer" => match v {
            Value::Number(n) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            _ => false,
        },
        _ => true,
    }
}

fn number_bounds(s: &Map<String, Value>, x: f64) -> bool {
    let bound = |k: &str| s.get(k).and_then(Value::as_f64);
    bound("minimum").is_none_or(|m| x >= m)
        && bound("maximum").is_none_or(|m| x <= m)
        && bound("exclusiveMinimum").is_none_or(|m| x > m)
        && bound("exclusiveMaximum").is_none_or(|m| x < m)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn side(text: &str) -> Side {
        Side {
            text: text.to_string(),
            ..Side::default()
        }
    }

    fn with_calls(text: &str, calls: &[(&str, &str)]) -> Side {
        Side {
            text: text.to_string(),
            tool_calls: calls
                .iter()
                .map(|(n, a)| ToolCallOut {
                    name: n.to_string(),
                    arguments: a.to_string(),
                })
                .collect(),
            ..Side::default()
        }
    }

    fn cmp(a: &str, b: &str) -> Comparison {
        compare(&side(a), &side(b), JsonAsk::No)
    }

    fn close(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-12, "got {got}, want {want}");
    }

    #[test]
    fn english_text() {
        // Tokens: [the cat sat on the mat] vs [the cat is on the mat]; common
        // the×2 cat on mat = 5 → F1 = 2·5/(6+6) = 5/6.
        // Bigrams of "thecatsatonthemat" (16): th² he² ec ca at³ ts sa to on nt
        // em ma; of "thecatisonthemat" (15): th² he² ec ca at² ti is so on nt
        // em ma; common th² he² ec ca at² on nt em ma = 12 → 24/31.
        // Length: 23 vs 21 characters → 21/23.
        let c = cmp("The cat sat on the mat.", "the cat is on the mat");
        assert!(!c.exact);
        close(c.token_f1, 5.0 / 6.0);
        close(c.char_similarity, 24.0 / 31.0);
        close(c.length_ratio.unwrap(), 21.0 / 23.0);
        assert_eq!(c.json, None);
        assert_eq!(c.tool_agreement, None);
        assert!(!c.primary_refusal && !c.candidate_refusal);
        assert!(!c.primary_empty && !c.candidate_empty);
        assert_eq!(c.embedding_similarity, None);
    }

    #[test]
    fn chinese_text() {
        // Each Han character a token: the same 8 tokens → F1 1.
        // Bigrams 北京 京是 是中 中国 国的 的首 首都 vs 中国 国的 的首 首都 都是
        // 是北 北京; common 北京 中国 国的 的首 首都 = 5 → 2·5/14 = 5/7.
        let c = cmp("北京是中国的首都", "中国的首都是北京");
        assert!(!c.exact);
        close(c.token_f1, 1.0);
        close(c.char_similarity, 5.0 / 7.0);
        close(c.length_ratio.unwrap(), 1.0);

        // 今 天 天 气 很 好 vs 今 天 天 气 不 错: common 4 → 8/12.
        // Bigrams 今天 天天 天气 气很 很好 vs 今天 天天 天气 气不 不错: 3 → 6/10.
        let c = cmp("今天天气很好", "今天天气不错");
        close(c.token_f1, 2.0 / 3.0);
        close(c.char_similarity, 0.6);
    }

    #[test]
    fn mixed_text() {
        // [我 爱 rust 语 言] vs [我 爱 rust 编 程]: common 3 → 6/10.
        // "我爱rust语言" vs "我爱rust编程", 7 bigrams each: 我爱 爱r ru us st
        // common, t语 语言 / t编 编程 not → 2·5/14 = 5/7.
        let c = cmp("我爱Rust语言", "我爱 rust 编程");
        close(c.token_f1, 0.6);
        close(c.char_similarity, 5.0 / 7.0);
        // Japanese and Korean characters are tokens too: [こ ん に ち は] vs
        // [こ ん ば ん は]: common こ ん は = 3 → 6/10.
        close(cmp("こんにちは", "こんばんは").token_f1, 0.6);
        // [안 녕] vs [안 녕 하 세 요]: common 2 → 4/7.
        close(cmp("안녕", "안녕하세요").token_f1, 4.0 / 7.0);
    }

    #[test]
    fn punctuation_only_differences() {
        let c = cmp("Hello, world!", "hello world");
        assert!(!c.exact);
        close(c.token_f1, 1.0);
        close(c.char_similarity, 1.0);
        let c = cmp("你好，世界！", "你好世界");
        close(c.token_f1, 1.0);
        close(c.char_similarity, 1.0);
        // Dropped without a gap: "don't" is the token "dont".
        close(cmp("I don't know", "i dont know").token_f1, 1.0);
        // Whitespace at both ends does not count for exact.
        assert!(cmp("  Same answer.\n", "Same answer.").exact);
        assert!(!cmp("Same answer.", "Same answer").exact);
    }

    #[test]
    fn single_characters_compare_as_unigrams() {
        // "a" vs "ab": unigrams {a} and {a, b}: 2·1/3.
        close(cmp("a", "ab").char_similarity, 2.0 / 3.0);
        close(cmp("是", "是").char_similarity, 1.0);
    }

    #[test]
    fn empty_sides() {
        let c = cmp("", "  ");
        assert!(c.exact);
        close(c.token_f1, 1.0);
        close(c.char_similarity, 1.0);
        assert!(c.primary_empty && c.candidate_empty);
        assert_eq!(c.length_ratio, None);

        let c = cmp(" ", "hi");
        assert!(!c.exact);
        close(c.token_f1, 0.0);
        close(c.char_similarity, 0.0);
        assert!(c.primary_empty && !c.candidate_empty);
        assert_eq!(c.length_ratio, None);

        let c = cmp("hi", "");
        close(c.token_f1, 0.0);
        assert!(!c.primary_empty && c.candidate_empty);
        assert_eq!(c.length_ratio, Some(0.0));

        // Punctuation only normalises to nothing: both without a token.
        close(cmp("?!", "…").token_f1, 1.0);

        // Text empty but a tool called: not empty.
        let c = compare(&with_calls("", &[("f", "{}")]), &side(""), JsonAsk::No);
        assert!(!c.primary_empty && c.candidate_empty);
    }

    #[test]
    fn length_ratio_counts_characters() {
        // 4 characters over 2, not 12 bytes over 6.
        close(cmp("你好", "你好世界").length_ratio.unwrap(), 2.0);
        close(cmp("abcd", "ab").length_ratio.unwrap(), 0.5);
        close(cmp("  abcd  ", "abcdabcd").length_ratio.unwrap(), 2.0);
    }

    fn json_of(a: &str, b: &str, ask: JsonAsk<'_>) -> JsonCheck {
        compare(&side(a), &side(b), ask).json.unwrap()
    }

    fn check(primary_valid: bool, candidate_valid: bool, schema_agree: bool) -> JsonCheck {
        JsonCheck {
            primary_valid,
            candidate_valid,
            schema_agree,
        }
    }

    #[test]
    fn json_object_validity_fences_and_shape() {
        let o = JsonAsk::Object;
        // Fenced and reordered, other values, a shorter array: same shape.
        assert_eq!(
            json_of(
                r#"{"a": 1, "b": [1, 2]}"#,
                "```json\n{\"b\": [3], \"a\": 2.5}\n```",
                o
            ),
            check(true, true, true)
        );
        // A bare fence; `JSON` in capitals.
        assert_eq!(
            json_of("```\n{}\n```", "```JSON\n{}\n```", o),
            check(true, true, true)
        );
        // Another language's fence, a cut answer, prose: invalid.
        assert_eq!(
            json_of("```python\n{}\n```", "{}", o),
            check(false, true, false)
        );
        assert_eq!(
            json_of(r#"{"a": 1}"#, r#"{"a": 1,"#, o),
            check(true, false, false)
        );
        assert_eq!(
            json_of("Here it is: {}", "{}", o),
            check(false, true, false)
        );
        // Two fences are not one surrounding fence.
        assert_eq!(
            json_of("```json\n{}\n```\n```json\n{}\n```", "{}", o),
            check(false, true, false)
        );
        // Shape mismatches: a value's type, a missing key, an extra key.
        assert_eq!(
            json_of(r#"{"a": 1}"#, r#"{"a": "1"}"#, o),
            check(true, true, false)
        );
        assert_eq!(
            json_of(r#"{"a": 1}"#, r#"{"b": 1}"#, o),
            check(true, true, false)
        );
        assert_eq!(
            json_of(r#"{"a": 1}"#, r#"{"a": 1, "b": 2}"#, o),
            check(true, true, false)
        );
        assert_eq!(
            json_of(r#"{"a": null}"#, r#"{"a": {}}"#, o),
            check(true, true, false)
        );
        // Arrays: empty agrees with any; elements by their shape.
        assert_eq!(
            json_of(r#"{"xs": []}"#, r#"{"xs": [{"k": 1}]}"#, o),
            check(true, true, true)
        );
        assert_eq!(
            json_of(r#"[{"k": 1}, {"k": 2}]"#, r#"[{"k": 3}]"#, o),
            check(true, true, true)
        );
        assert_eq!(
            json_of(r#"[{"k": 1}, {"j": 2}]"#, r#"[{"k": 3}]"#, o),
            check(true, true, false)
        );
        assert_eq!(
            json_of(r#"[1, 2]"#, r#"[1, "2"]"#, o),
            check(true, true, false)
        );
        // Past the budget the shapes count as different.
        let (a, b) = (json!([[1], [2]]), json!([[3]]));
        assert!(same_shape(&a, &b, &mut SHAPE_BUDGET.clone()));
        assert!(!same_shape(&a, &b, &mut 3));
        // Not asked: no check at all.
        assert_eq!(compare(&side("{}"), &side("x"), JsonAsk::No).json, None);
    }

    #[test]
    fn json_schema_validity() {
        let rf = ResponseFormat::JsonSchema(json!({
            "name": "person",
            "strict": true,
            "schema": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": "integer"}
                },
                "required": ["name", "age"],
                "additionalProperties": false
            }
        }));
        let ask = json_ask(Some(&rf));
        let JsonAsk::Schema(s) = ask else {
            panic!("{ask:?}")
        };
        assert_eq!(s["type"], "object");
        let good = r#"{"name": "Ann", "age": 3}"#;
        // 3.0 is an integer; order does not matter.
        assert_eq!(
            json_of(good, r#"{"age": 3.0, "name": "Bo"}"#, ask),
            check(true, true, true)
        );
        // A wrong type, a missing required key, an extra key.
        assert_eq!(
            json_of(good, r#"{"name": "Ann", "age": "3"}"#, ask),
            check(true, true, false)
        );
        assert_eq!(
            json_of(good, r#"{"name": "Ann", "age": 3.5}"#, ask),
            check(true, true, false)
        );
        assert_eq!(
            json_of(good, r#"{"name": "Ann"}"#, ask),
            check(true, true, false)
        );
        assert_eq!(
            json_of(good, r#"{"name": "Ann", "age": 3, "x": 1}"#, ask),
            check(true, true, false)
        );
        assert_eq!(json_of(good, "not json", ask), check(true, false, false));

        assert_eq!(json_ask(None), JsonAsk::No);
        assert_eq!(json_ask(Some(&ResponseFormat::Text)), JsonAsk::No);
        assert_eq!(json_ask(Some(&ResponseFormat::JsonObject)), JsonAsk::Object);
        // A json_schema object without `schema` is read as the schema.
        let bare = ResponseFormat::JsonSchema(json!({"type": "array"}));
        assert_eq!(
            json_ask(Some(&bare)),
            JsonAsk::Schema(&json!({"type": "array"}))
        );
    }

    fn valid(schema: Value, v: Value) -> bool {
        Validator::new(&schema).is_valid(&v)
    }

    #[test]
    fn schema_keywords() {
        let e = json!({"enum": ["red", "green", 1]});
        assert!(valid(e.clone(), json!("red")));
        assert!(valid(e.clone(), json!(1.0)));
        assert!(!valid(e, json!("blue")));
        assert!(valid(json!({"const": {"a": [1]}}), json!({"a": [1]})));
        assert!(!valid(json!({"const": 2}), json!(3)));
        let any = json!({"anyOf": [{"type": "string"}, {"type": "null"}]});
        assert!(valid(any.clone(), json!(null)));
        assert!(!valid(any, json!(1)));
        assert!(valid(json!({"type": ["string", "null"]}), json!("x")));
        assert!(!valid(json!({"type": ["string", "null"]}), json!(false)));
        let one = json!({"oneOf": [{"type": "number"}, {"type": "integer"}]});
        assert!(valid(one.clone(), json!(1.5)));
        assert!(!valid(one, json!(1)));
        assert!(!valid(json!({"not": {"type": "string"}}), json!("x")));
        let items =
            json!({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2});
        assert!(valid(items.clone(), json!([1, 2])));
        assert!(!valid(items.clone(), json!([1, "2"])));
        assert!(!valid(items.clone(), json!([])));
        assert!(!valid(items, json!([1, 2, 3])));
        let tuple = json!({"prefixItems": [{"type": "string"}], "items": {"type": "integer"}});
        assert!(valid(tuple.clone(), json!(["a", 1, 2])));
        assert!(!valid(tuple, json!([1, 1])));
        assert!(valid(
            json!({"minLength": 2, "maxLength": 3}),
            json!("北京")
        ));
        assert!(!valid(json!({"minLength": 2}), json!("北")));
        assert!(!valid(
            json!({"minimum": 0, "exclusiveMaximum": 10}),
            json!(10)
        ));
        assert!(valid(
            json!({"minimum": 0, "exclusiveMaximum": 10}),
            json!(0)
        ));
        assert!(!valid(json!(false), json!(1)));
        assert!(valid(json!(true), json!(1)));
        let extra = json!({"properties": {"a": {}}, "additionalProperties": {"type": "integer"}});
        assert!(valid(extra.clone(), json!({"a": "x", "b": 2})));
        assert!(!valid(extra, json!({"a": "x", "b": "2"})));
        // Unchecked keywords never fail an answer.
        assert!(valid(
            json!({"type": "string", "pattern": "^[0-9]+$", "format": "date"}),
            json!("x")
        ));
        // Local references, recursive ones too.
        let tree = json!({
            "$defs": {"node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["kids"]
            }},
            "$ref": "#/$defs/node"
        });
        assert!(valid(tree.clone(), json!({"kids": [{"kids": []}]})));
        assert!(!valid(tree, json!({"kids": [{}]})));
        // A reference cycle that never descends: no verdict, not valid.
        assert!(!valid(json!({"$ref": "#"}), json!(1)));
        assert!(!valid(json!({"not": {"$ref": "#"}}), json!(1)));
    }

    fn tools(a: &[(&str, &str)], b: &[(&str, &str)]) -> Comparison {
        compare(&with_calls("", a), &with_calls("", b), JsonAsk::No)
    }

    #[test]
    fn tool_calls() {
        // Reordered keys, whitespace, 1 vs 1.0: the same arguments.
        let c = tools(
            &[("weather", r#"{"city": "Paris", "days": 1}"#)],
            &[("weather", r#" {"days":1.0,"city":"Paris"} "#)],
        );
        assert_eq!(c.tool_agreement, Some(true));
        assert!(c.exact);
        assert!(!c.primary_empty && !c.candidate_empty);
        // A different value.
        let c = tools(
            &[("weather", r#"{"city": "Paris"}"#)],
            &[("weather", r#"{"city": "Lyon"}"#)],
        );
        assert_eq!(c.tool_agreement, Some(false));
        assert!(!c.exact);
        // A different function.
        let c = tools(&[("weather", "{}")], &[("forecast", "{}")]);
        assert_eq!(c.tool_agreement, Some(false));
        // Order and count matter.
        assert_eq!(
            tools(&[("a", "{}"), ("b", "{}")], &[("b", "{}"), ("a", "{}")]).tool_agreement,
            Some(false)
        );
        assert_eq!(
            tools(&[("a", "{}")], &[("a", "{}"), ("a", "{}")]).tool_agreement,
            Some(false)
        );
        assert_eq!(tools(&[("a", "{}")], &[]).tool_agreement, Some(false));
        // Empty arguments are `{}`; unparseable ones compared as trimmed text.
        assert_eq!(
            tools(&[("a", "")], &[("a", "{}")]).tool_agreement,
            Some(true)
        );
        assert_eq!(
            tools(&[("a", "{x")], &[("a", " {x ")]).tool_agreement,
            Some(true)
        );
        assert_eq!(
            tools(&[("a", "{x")], &[("a", "{y")]).tool_agreement,
            Some(false)
        );
        assert_eq!(cmp("x", "x").tool_agreement, None);
    }

    #[test]
    fn refusals() {
        let r = |t: &str| cmp(t, "").primary_refusal;
        assert!(r("I'm sorry, but I can't help with that."));
        assert!(r("I\u{2019}m sorry, but I can\u{2019}t help with that."));
        assert!(r("**I cannot** do that."));
        assert!(r("Thanks for asking. As an AI, I have no opinions."));
        assert!(r("Unfortunately, I am unable to browse the web."));
        assert!(r("抱歉，我无法回答这个问题。"));
        assert!(r("我无法提供该信息。"));
        assert!(r("对不起，我不能帮你做这件事。"));
        assert!(r("作为一个AI语言模型，我没有个人观点。"));
        assert!(r("这个问题很敏感。我不能回答。"));
        assert!(!r("Sure! Here is the code you asked for."));
        assert!(!r("北京是中国的首都。"));
        // Mid-sentence, or past the window: not a refusal.
        assert!(!r("The phrase I cannot is common."));
        assert!(!r(&format!(
            "{}. I cannot do that.",
            "a".repeat(REFUSAL_WINDOW)
        )));
        // Tool calls: an answer, not a refusal.
        let c = compare(
            &with_calls("I cannot answer directly, calling a tool.", &[("f", "{}")]),
            &side("抱歉，我无法回答。"),
            JsonAsk::No,
        );
        assert!(!c.primary_refusal && c.candidate_refusal);
    }

    #[test]
    fn answers_of_64_kib() {
        // "北京是中国的首都 " is 25 bytes; 2622 copies ≈ 64 KiB. The candidate
        // drops the last copy: tokens 8·2622 vs 8·2621, all shared →
        // F1 = 2·8·2621 / (8·2622 + 8·2621) = 5242/5243.
        let p = "北京是中国的首都 ".repeat(2622);
        let c = "北京是中国的首都 ".repeat(2621);
        let r = cmp(&p, &c);
        close(r.token_f1, 5242.0 / 5243.0);
        // Bigrams: 8·2622 − 1 = 20975 vs 8·2621 − 1 = 20967, all of the
        // shorter shared → 2·20967 / 41942.
        close(r.char_similarity, 41934.0 / 41942.0);
        // An array of arrays both ways: within the budget, the same shape.
        let a = format!("[{}]", vec!["[1,2,3,4,5,6,7,8]"; 2000].join(","));
        let j = json_of(&a, &a, JsonAsk::Object);
        assert_eq!(j, check(true, true, true));
    }

    #[test]
    fn cosine_similarity() {
        close(cosine(&[1.0, 0.0], &[0.0, 1.0]).unwrap(), 0.0);
        close(cosine(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).unwrap(), 1.0);
        close(cosine(&[1.0, 0.0], &[-1.0, 0.0]).unwrap(), -1.0);
        // (3·4 + 4·3) / (5·5) = 24/25.
        close(cosine(&[3.0, 4.0], &[4.0, 3.0]).unwrap(), 0.96);
        assert_eq!(cosine(&[1.0], &[1.0, 2.0]), None);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 2.0]), None);
        assert_eq!(cosine(&[], &[]), None);
        assert_eq!(cosine(&[f32::NAN, 1.0], &[1.0, 1.0]), None);
    }
}
