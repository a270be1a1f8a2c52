//! The built-in detectors: hand-written scanners that look at a text once.
//!
//! One loop walks the bytes. Bytes that cannot start anything (non-ASCII
//! text, spaces, punctuation) are skipped at once; at the start of an ASCII
//! word the word is classified, once:
//!
//! - **email** — a local part (`[A-Za-z0-9._%+-]`, starting at a word start)
//!   followed by `@` and a domain of at least two dot-separated labels
//!   (`[A-Za-z0-9-]`, not starting with `-`) whose last label is 2+ letters.
//! - **digits** (a word starting with a digit, not preceded by a decimal
//!   point, and not followed by a letter, digit or `_`):
//!   - `ipv4`: four dot-separated octets 0–255 without leading zeros, not
//!     followed by another `.digit`.
//!   - `cn_id`: 17 digits and a check character (digit or `X`/`x`): the first
//!     digit 1–8 (a province), a birth date `YYYYMMDD` that exists (1900–2099),
//!     and a valid ISO 7064 MOD 11-2 check character.
//!   - `cn_mobile`: 11 digits `1[3-9]…`, optionally after `+86`, `0086`,
//!     `+86 `/`+86-` or `0086 `/`0086-`.
//!   - `bank_card`: 13–19 digits, either in one run or in groups of 3–6
//!     digits (the first of 4) separated by single spaces or single dashes
//!     (one kind throughout); the first digit 2–6 (the issuer ranges in use)
//!     and a valid Luhn check digit. A longer sequence is not a card.
//! - **secret** (on a token of `[A-Za-z0-9_-]` starting at a word start):
//!   `sk-ant-` + 20 or more, `sk-` + 20 or more holding a letter and a digit,
//!   `AKIA` + exactly 16 `[0-9A-Z]`, `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_` + 36 or
//!   more letters and digits, `github_pat_` + 22 or more, `xoxb-`/`xoxp-`/
//!   `xoxa-`/`xoxr-`/`xoxs-` + 10 or more holding a digit, `AIza` + exactly 35;
//!   and after a word ending in `key`, `token` or `secret` (any case, e.g.
//!   `api_key`, `access_token`), then `=` or `:` (quotes and spaces allowed
//!   around it), a value of 32 or more `[A-Za-z0-9_-]` with at least two of
//!   lower case, upper case and digits and a Shannon entropy of at least 3.5
//!   bits per character (only the value is the hit, not the word before it).

/// What a detector found: its kind and where, as byte offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub start: usize,
    pub end: usize,
    /// Index into the scanner's kinds: the built-ins first (in the order of
    /// [`super::BUILTIN`]), then the operator's detectors.
    pub kind: u16,
}

pub const CN_ID: u16 = 0;
pub const CN_MOBILE: u16 = 1;
pub const BANK_CARD: u16 = 2;
pub const EMAIL: u16 = 3;
pub const IPV4: u16 = 4;
pub const SECRET: u16 = 5;

/// The enabled built-in detectors, one bit per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Enabled(pub u8);

impl Enabled {
    pub fn all() -> Enabled {
        Enabled(0b11_1111)
    }
    pub fn has(self, kind: u16) -> bool {
        self.0 & (1 << kind) != 0
    }
    pub fn with(self, kind: u16) -> Enabled {
        Enabled(self.0 | (1 << kind))
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

// Byte classes, as flags: a word byte (ASCII letter, digit, `_`), `-` (also
// in tokens), `.`/`%`/`+` (also in e-mail local parts).
const WORD: u8 = 1;
const DASH: u8 = 2;
const LOCAL: u8 = 4;

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = b'0';
    while c <= b'9' {
        t[c as usize] = WORD;
        c += 1;
    }
    let mut c = b'a';
    while c <= b'z' {
        t[c as usize] = WORD;
        t[(c - 32) as usize] = WORD;
        c += 1;
    }
    t[b'_' as usize] = WORD;
    t[b'-' as usize] = DASH;
    t[b'.' as usize] = LOCAL;
    t[b'%' as usize] = LOCAL;
    t[b'+' as usize] = LOCAL;
    t
};

fn is_word(b: u8) -> bool {
    CLASS[b as usize] & WORD != 0
}

fn is_token(b: u8) -> bool {
    CLASS[b as usize] & (WORD | DASH) != 0
}

fn is_local(b: u8) -> bool {
    CLASS[b as usize] != 0
}

/// Longest e-mail local part looked at (RFC 5321 allows 64 bytes).
const MAX_LOCAL: usize = 64;

fn digits_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    i
}

/// Scans `text` with the enabled built-in detectors, appending hits in order
/// (they never overlap).
pub fn scan(text: &str, on: Enabled, out: &mut Vec<Hit>) {
    let b = text.as_bytes();
    let n = b.len();
    let emails = on.has(EMAIL);
    let numbers = on.has(CN_ID) || on.has(CN_MOBILE) || on.has(BANK_CARD) || on.has(IPV4);
    let secrets = on.has(SECRET);
    // Positions before these are inside a run already found not to be an
    // email / a secret token (each byte is looked at a bounded number of times).
    let mut no_email_until = 0;
    let mut no_secret_until = 0;
    // The next `@` at or after `i` (`n`: none): only a word that starts
    // within a local part's length of it can begin an e-mail address.
    let mut next_at = 0;
    let mut at_known = false;
    let mut i = 0;
    while i < n {
        // Skip what cannot start a word.
        while i < n && !is_word(b[i]) {
            i += 1;
        }
        if i >= n {
            break;
        }
        // `i` starts a word: the byte before it is not a word byte.
        let first = b[i];
        let mut word_end = 0;
        let mut token_end = 0;
        if emails && (!at_known || next_at < i) {
            next_at = text[i..].find('@').map_or(n, |p| i + p);
            at_known = true;
        }
        if emails && i >= no_email_until && next_at < n && next_at - i <= MAX_LOCAL {
            // One pass over the local-part run gives the word and token ends too.
            let mut e = i;
            while e < n && is_local(b[e]) {
                let c = b[e];
                if word_end == 0 && !is_word(c) {
                    word_end = e;
                }
                if token_end == 0 && !is_token(c) {
                    token_end = e;
                }
                e += 1;
            }
            if word_end == 0 {
                word_end = e;
            }
            if token_end == 0 {
                token_end = e;
            }
            if e < n && b[e] == b'@' {
                if let Some(end) = domain(b, e + 1) {
                    out.push(Hit {
                        start: i,
                        end,
                        kind: EMAIL,
                    });
                    i = end;
                    continue;
                }
            }
            no_email_until = e;
        }
        if word_end == 0 {
            let mut e = i;
            while e < n && is_word(b[e]) {
                e += 1;
            }
            word_end = e;
        }
        if first.is_ascii_digit() {
            if numbers {
                if let Some(h) = number(b, i, on) {
                    out.push(h);
                    i = h.end;
                    continue;
                }
            }
        } else if secrets && i >= no_secret_until {
            if token_end == 0 {
                let mut e = word_end;
                while e < n && is_token(b[e]) {
                    e += 1;
                }
                token_end = e;
            }
            no_secret_until = token_end;
            if let Some(h) = secret(b, i, token_end) {
                out.push(h);
                i = h.end;
                continue;
            }
        }
        i = word_end.max(i + 1);
    }
}

/// The end of a domain starting at `p` (after `@`), if it is one.
fn domain(b: &[u8], mut p: usize) -> Option<usize> {
    let n = b.len();
    let mut labels = 0;
    let mut end = 0;
    let mut last_alpha = false;
    let mut last_len = 0;
    loop {
        if p >= n || !b[p].is_ascii_alphanumeric() {
            break;
        }
        let s = p;
        let mut alpha = true;
        while p < n && (b[p].is_ascii_alphanumeric() || b[p] == b'-') {
            alpha &= b[p].is_ascii_alphabetic();
            p += 1;
        }
        if p - s > 63 || b[p - 1] == b'-' {
            return None;
        }
        labels += 1;
        end = p;
        last_alpha = alpha;
        last_len = p - s;
        if p + 1 < n && b[p] == b'.' && b[p + 1].is_ascii_alphanumeric() {
            p += 1;
        } else {
            break;
        }
    }
    // Not followed by more of a word (e.g. `a@b.c_d`).
    let clean = end >= n || !(is_word(b[end]) || b[end] == b'@');
    (labels >= 2 && last_alpha && last_len >= 2 && clean).then_some(end)
}

/// Whether a number ending at `end` is not continued by a word byte or a
/// decimal part.
fn ends_clean(b: &[u8], end: usize) -> bool {
    match b.get(end) {
        None => true,
        Some(&c) if is_word(c) => false,
        Some(b'.') => !b.get(end + 1).is_some_and(u8::is_ascii_digit),
        Some(_) => true,
    }
}

fn number(b: &[u8], i: usize, on: Enabled) -> Option<Hit> {
    // A decimal part (`3.14159…`) is not a number of its own.
    if i >= 2 && b[i - 1] == b'.' && b[i - 2].is_ascii_digit() {
        return None;
    }
    let d = digits_end(b, i);
    let run = &b[i..d];
    let hit = |start, end, kind| {
        Some(Hit {
            start,
            end,
            kind: kind as u16,
        })
    };
    if on.has(IPV4) && d < b.len() && b[d] == b'.' && run.len() <= 3 {
        if let Some(end) = ipv4(b, i) {
            return hit(i, end, IPV4 as usize);
        }
    }
    if on.has(CN_ID) {
        let end = match (run.len(), b.get(d)) {
            (17, Some(b'X' | b'x')) => Some(d + 1),
            (18, _) => Some(d),
            _ => None,
        };
        if let Some(end) = end {
            if ends_clean(b, end) && cn_id(&b[i..end]) {
                return hit(i, end, CN_ID as usize);
            }
        }
    }
    if on.has(CN_MOBILE) {
        if let Some((start, end)) = mobile(b, i, d) {
            return hit(start, end, CN_MOBILE as usize);
        }
    }
    if on.has(BANK_CARD) {
        if let Some(end) = card(b, i, d) {
            return hit(i, end, BANK_CARD as usize);
        }
    }
    None
}

fn ipv4(b: &[u8], i: usize) -> Option<usize> {
    if i > 0 && b[i - 1] == b'.' {
        return None;
    }
    let mut p = i;
    for k in 0..4 {
        if k > 0 {
            if b.get(p) != Some(&b'.') {
                return None;
            }
            p += 1;
        }
        let e = digits_end(b, p);
        let len = e - p;
        if len == 0 || len > 3 || (len > 1 && b[p] == b'0') {
            return None;
        }
        let v = b[p..e]
            .iter()
            .fold(0u32, |v, c| v * 10 + u32::from(c - b'0'));
        if v > 255 {
            return None;
        }
        p = e;
    }
    ends_clean(b, p).then_some(p)
}

/// A resident ID number: 17 digits and a check character.
pub fn cn_id(s: &[u8]) -> bool {
    if s.len() != 18 || !(b'1'..=b'8').contains(&s[0]) {
        return false;
    }
    let num =
        |r: std::ops::Range<usize>| s[r].iter().fold(0u32, |v, c| v * 10 + u32::from(c - b'0'));
    let (year, month, day) = (num(6..10), num(10..12), num(12..14));
    if !(1900..=2099).contains(&year) || !(1..=12).contains(&month) || day == 0 {
        return false;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day > days {
        return false;
    }
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = s[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(c, w)| u32::from(c - b'0') * w)
        .sum();
    let check = b"10X98765432"[(sum % 11) as usize];
    s[17].to_ascii_uppercase() == check
}

fn is_mobile(s: &[u8]) -> bool {
    s.len() == 11 && s[0] == b'1' && (b'3'..=b'9').contains(&s[1])
}

/// The end of a mobile number at `p`: 11 digits, or 3-4-4 digits separated
/// by single spaces or dashes (one kind).
fn mobile_at(b: &[u8], p: usize) -> Option<usize> {
    let e = digits_end(b, p);
    if is_mobile(&b[p..e]) {
        return ends_clean(b, e).then_some(e);
    }
    if e - p != 3 || b[p] != b'1' || !(b'3'..=b'9').contains(&b[p + 1]) {
        return None;
    }
    let sep = *b.get(e)?;
    if sep != b' ' && sep != b'-' {
        return None;
    }
    let e2 = digits_end(b, e + 1);
    if e2 - (e + 1) != 4 || b.get(e2) != Some(&sep) {
        return None;
    }
    let e3 = digits_end(b, e2 + 1);
    let more = b.get(e3) == Some(&sep) && b.get(e3 + 1).is_some_and(u8::is_ascii_digit);
    (e3 - (e2 + 1) == 4 && ends_clean(b, e3) && !more).then_some(e3)
}

/// A mobile number whose digits start at `i` (run to `d`), with its prefix.
fn mobile(b: &[u8], i: usize, d: usize) -> Option<(usize, usize)> {
    let run = &b[i..d];
    let plus = i > 0 && b[i - 1] == b'+';
    let start = if plus { i - 1 } else { i };
    match run.len() {
        11 | 3 => mobile_at(b, i).map(|e| (i, e)),
        13 if plus && run.starts_with(b"86") => mobile_at(b, i + 2).map(|e| (start, e)),
        15 if run.starts_with(b"0086") => mobile_at(b, i + 4).map(|e| (i, e)),
        2 | 4 if (plus && run == b"86") || run == b"0086" => {
            let mut p = d;
            if matches!(b.get(p), Some(b' ' | b'-')) {
                p += 1;
            }
            if !b.get(p).is_some_and(u8::is_ascii_digit) {
                return None;
            }
            mobile_at(b, p).map(|e| (start, e))
        }
        _ => None,
    }
}

fn luhn(digits: impl DoubleEndedIterator<Item = u8>) -> bool {
    let mut sum = 0u32;
    for (k, c) in digits.rev().enumerate() {
        let mut v = u32::from(c - b'0');
        if k % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum % 10 == 0
}

/// A card number starting at `i` (first digit run to `d`): the end, if valid.
fn card(b: &[u8], i: usize, d: usize) -> Option<usize> {
    if !(b'2'..=b'6').contains(&b[i]) {
        return None;
    }
    let len = d - i;
    if (13..=19).contains(&len) {
        let ok = ends_clean(b, d) && luhn(b[i..d].iter().copied());
        return ok.then_some(d);
    }
    // Grouped: the first group of 4, then groups of 3–6, one separator kind.
    if len != 4 {
        return None;
    }
    let sep = *b.get(d)?;
    if sep != b' ' && sep != b'-' {
        return None;
    }
    let mut total = len;
    let mut end = d;
    while b.get(end) == Some(&sep) {
        let s = end + 1;
        let e = digits_end(b, s);
        if !(3..=6).contains(&(e - s)) {
            break;
        }
        total += e - s;
        end = e;
        if total > 19 {
            return None;
        }
    }
    if !(13..=19).contains(&total) || !ends_clean(b, end) {
        return None;
    }
    // A further group that did not fit (e.g. `… 12`) makes it something else.
    if b.get(end) == Some(&sep) && b.get(end + 1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let digits = b[i..end].iter().copied().filter(u8::is_ascii_digit);
    let digits: Vec<u8> = digits.collect();
    luhn(digits.into_iter()).then_some(end)
}

fn has_digit(s: &[u8]) -> bool {
    s.iter().any(u8::is_ascii_digit)
}

fn has_alpha(s: &[u8]) -> bool {
    s.iter().any(u8::is_ascii_alphabetic)
}

/// A secret in the token `b[i..t]` (or the value after it, for a keyword).
fn secret(b: &[u8], i: usize, t: usize) -> Option<Hit> {
    let tok = &b[i..t];
    let whole = Some(Hit {
        start: i,
        end: t,
        kind: SECRET,
    });
    let found = match tok[0] {
        b's' => match tok.strip_prefix(b"sk-") {
            Some(_) if tok.starts_with(b"sk-ant-") => tok.len() >= 7 + 20,
            Some(rest) => rest.len() >= 20 && has_digit(rest) && has_alpha(rest),
            None => false,
        },
        b'A' => {
            (tok.len() == 20
                && tok.starts_with(b"AKIA")
                && tok[4..]
                    .iter()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()))
                || (tok.len() == 39 && tok.starts_with(b"AIza"))
        }
        b'g' => {
            (tok.len() >= 40
                && matches!(&tok[..4], b"ghp_" | b"gho_" | b"ghu_" | b"ghs_" | b"ghr_")
                && tok[4..].iter().all(u8::is_ascii_alphanumeric))
                || (tok.len() >= 11 + 22 && tok.starts_with(b"github_pat_"))
        }
        b'x' => {
            tok.len() >= 15
                && matches!(
                    &tok[..5],
                    b"xoxb-" | b"xoxp-" | b"xoxa-" | b"xoxr-" | b"xoxs-"
                )
                && has_digit(&tok[5..])
        }
        _ => false,
    };
    if found {
        return whole;
    }
    keyword_value(b, t, tok)
}

/// After a word ending in `key`, `token` or `secret`: `=`/`:` and a long,
/// high-entropy value.
fn keyword_value(b: &[u8], t: usize, tok: &[u8]) -> Option<Hit> {
    let ends = |suffix: &[u8]| {
        tok.len() >= suffix.len() && tok[tok.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
    };
    if !(ends(b"key") || ends(b"token") || ends(b"secret")) {
        return None;
    }
    let n = b.len();
    let mut p = t;
    let skip = |p: &mut usize, quotes: bool| {
        let mut k = 0;
        while *p < n && k < 4 && (b[*p] == b' ' || (quotes && matches!(b[*p], b'"' | b'\''))) {
            *p += 1;
            k += 1;
        }
    };
    skip(&mut p, true);
    if p >= n || !matches!(b[p], b'=' | b':') {
        return None;
    }
    p += 1;
    skip(&mut p, true);
    let s = p;
    while p < n && is_token(b[p]) {
        p += 1;
    }
    let v = &b[s..p];
    if v.len() < 32 || (p < n && b[p] >= 0x80) {
        return None;
    }
    let classes = u8::from(v.iter().any(u8::is_ascii_lowercase))
        + u8::from(v.iter().any(u8::is_ascii_uppercase))
        + u8::from(has_digit(v));
    (classes >= 2 && entropy(v) >= 3.5).then_some(Hit {
        start: s,
        end: p,
        kind: SECRET,
    })
}

/// Shannon entropy in bits per byte.
fn entropy(v: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &c in v {
        counts[c as usize] += 1;
    }
    let n = v.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn found(text: &str) -> Vec<(&'static str, &str)> {
        let mut hits = Vec::new();
        scan(text, Enabled::all(), &mut hits);
        hits.iter()
            .map(|h| {
                (
                    super::super::BUILTIN[h.kind as usize],
                    &text[h.start..h.end],
                )
            })
            .collect()
    }

    fn kinds(text: &str) -> Vec<&'static str> {
        found(text).into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn resident_ids_need_a_valid_check_character_and_birth_date() {
        assert_eq!(
            found("身份证号11010519491231002X，请核实"),
            [("cn_id", "11010519491231002X")]
        );
        assert_eq!(
            found("id 11010519491231002x."),
            [("cn_id", "11010519491231002x")]
        );
        assert_eq!(
            found("440308199901011234"),
            [("cn_id", "440308199901011234")]
        );
        // The same digits with a wrong check character are no ID (nor a card:
        // they start with 1).
        assert!(found("110105194912310021").is_empty());
        assert!(found("11010519491231002X".replace('X', "3").as_str()).is_empty());
        // A date that does not exist (31 February), a 13th month.
        let mut bad = *b"11010519490231000X";
        let sum: u32 = bad[..17]
            .iter()
            .zip([7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2])
            .map(|(c, w)| u32::from(c - b'0') * w)
            .sum();
        bad[17] = b"10X98765432"[(sum % 11) as usize];
        assert!(!cn_id(&bad), "31 February");
        assert!(!cn_id(b"110105194913310020"));
        // Inside a longer digit run, or glued to a word.
        assert!(found("911010519491231002X").is_empty());
        assert!(found("11010519491231002X1").is_empty());
        assert!(found("a11010519491231002X").is_empty());
    }

    #[test]
    fn mobile_numbers_with_and_without_country_prefix() {
        assert_eq!(found("电话13800138000。"), [("cn_mobile", "13800138000")]);
        assert_eq!(
            found("call +8613912345678"),
            [("cn_mobile", "+8613912345678")]
        );
        assert_eq!(
            found("call +86 139-1234-5678"),
            [("cn_mobile", "+86 139-1234-5678")]
        );
        assert_eq!(
            found("手机 138 0013 8000 谢谢"),
            [("cn_mobile", "138 0013 8000")]
        );
        assert!(found("138 0013 8000 1234").is_empty());
        assert!(found("138-0013 8000").is_empty());
        assert_eq!(
            found("call +86 13912345678"),
            [("cn_mobile", "+86 13912345678")]
        );
        assert_eq!(
            found("0086-15012345678"),
            [("cn_mobile", "0086-15012345678")]
        );
        assert_eq!(found("008615012345678"), [("cn_mobile", "008615012345678")]);
        // Not 1[3-9], inside longer runs, a decimal, glued to letters.
        assert!(found("12012345678").is_empty());
        assert!(found("113800138000").is_empty());
        assert!(found("1380013800012").is_empty());
        assert!(found("0.13800138000").is_empty());
        assert!(found("ab13800138000").is_empty());
        assert!(found("13800138000cd").is_empty());
    }

    #[test]
    fn bank_cards_must_pass_luhn_in_a_run_or_in_groups() {
        assert_eq!(
            found("card 4111111111111111"),
            [("bank_card", "4111111111111111")]
        );
        assert_eq!(
            found("卡号6222 0212 3456 7890 128，"),
            [("bank_card", "6222 0212 3456 7890 128")]
        );
        assert_eq!(
            found("4111-1111-1111-1111"),
            [("bank_card", "4111-1111-1111-1111")]
        );
        // A 19-digit order number that fails Luhn; one that starts with 1.
        assert!(found("order 6222020200112233445").is_empty());
        assert!(found("order 1234567890123456789").is_empty());
        // Mixed separators, a longer sequence, a number too long.
        assert!(found("4111 1111-1111 1111").is_empty());
        assert!(found("4111 1111 1111 1111 1111").is_empty());
        assert!(found("41111111111111110000").is_empty());
    }

    #[test]
    fn emails() {
        assert_eq!(
            found("写信给 zhang.san+work@mail.example.com.cn 吧"),
            [("email", "zhang.san+work@mail.example.com.cn")]
        );
        assert_eq!(found("12345@qq.com."), [("email", "12345@qq.com")]);
        assert!(found("not an email: a@b, x@localhost, @home, a@b.c").is_empty());
        assert!(found("user@-bad.com").is_empty());
        // A local part is at most 64 bytes; a word further from the `@` is not one.
        let long = format!("{}@example.com", "a".repeat(65));
        assert!(found(&long).is_empty());
        let ok = format!("x {}@example.com", "a".repeat(64));
        assert_eq!(found(&ok).len(), 1);
    }

    #[test]
    fn ipv4_addresses_are_word_bounded() {
        assert_eq!(found("host 10.0.12.255:8080"), [("ipv4", "10.0.12.255")]);
        assert_eq!(found("(192.168.1.1)"), [("ipv4", "192.168.1.1")]);
        assert!(found("256.1.1.1 1.2.3 1.2.3.4.5 01.2.3.4 v1.2.3.4 1.2.3.4a").is_empty());
    }

    #[test]
    fn secrets_by_prefix_and_after_a_keyword() {
        let k = "sk-proj-4f9Qx2LmN8pR7sT1vW3yZ6aB";
        assert_eq!(found(&format!("key {k}.")), [("secret", k)]);
        let a = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz";
        assert_eq!(found(a), [("secret", a)]);
        assert_eq!(
            found("AKIAIOSFODNN7EXAMPLE"),
            [("secret", "AKIAIOSFODNN7EXAMPLE")]
        );
        let g = "ghp_0123456789abcdefghijABCDEFGHIJ012345";
        assert_eq!(found(g), [("secret", g)]);
        let s = "xoxb-123456789012-abcdef";
        assert_eq!(found(s), [("secret", s)]);
        let z = "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW";
        assert_eq!(found(z), [("secret", z)]);
        let v = "Zx8Kq2Lm9Np4Rs7Tv1Wy3Ab6Cd0Ef5Gh";
        assert_eq!(found(&format!("api_key = \"{v}\"")), [("secret", v)]);
        assert_eq!(found(&format!("ACCESS_TOKEN: {v}")), [("secret", v)]);
        // Words that merely look alike.
        assert!(kinds("sk-learn is a library; sk-abc; AKIA1234; ghp_short").is_empty());
        assert!(kinds("my_secret: this_is_not_a_real_secret_value_really_no").is_empty());
        assert!(kinds("token: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").is_empty());
        assert!(kinds(&format!("monkey {v}")).is_empty(), "no = or :");
        assert!(kinds("keyboard: Zx8Kq2Lm9Np4Rs7Tv1Wy3Ab6Cd0Ef5Gh").is_empty());
    }

    #[test]
    fn several_kinds_in_mixed_text_in_order() {
        let text =
            "您好，我是张三，手机13912345678，邮箱 zs@example.cn，身份证11010519491231002X，\
                    卡号 4111111111111111，服务器 172.16.0.1。Thanks!";
        assert_eq!(
            kinds(text),
            ["cn_mobile", "email", "cn_id", "bank_card", "ipv4"]
        );
        // Disabled detectors find nothing.
        let mut hits = Vec::new();
        scan(text, Enabled::default().with(EMAIL), &mut hits);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].kind, EMAIL);
    }

    #[test]
    fn long_runs_without_hits_are_linear_and_clean() {
        let dots = "a.".repeat(50_000);
        let dashes = "a-".repeat(50_000);
        let digits = "1".repeat(100_000);
        for t in [&dots, &dashes, &digits] {
            assert!(found(t).is_empty());
        }
    }
}
