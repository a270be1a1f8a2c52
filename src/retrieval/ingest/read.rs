//! File readers: bytes of one file → its title and its text in sections (a
//! section starts at a heading; the chunker never lets a chunk cross one).
//! `.txt`, `.md`, `.html`/`.htm`, `.pdf` (text layer) and `.jsonl` (one
//! document per line).

use std::path::Path;

use serde_json::{Map, Value};

/// The formats ingest reads, by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Markdown,
    Html,
    Pdf,
    Jsonl,
}

impl Format {
    /// The format of a file, from its extension (case-insensitive); `None`
    /// for any other file.
    pub fn of(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "txt" | "text" => Format::Text,
            "md" | "markdown" => Format::Markdown,
            "html" | "htm" => Format::Html,
            "pdf" => Format::Pdf,
            "jsonl" | "ndjson" => Format::Jsonl,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "txt",
            Format::Markdown => "md",
            Format::Html => "html",
            Format::Pdf => "pdf",
            Format::Jsonl => "jsonl",
        }
    }
}

/// A run of text under one heading path.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Section {
    /// The headings above the text, outermost first (empty before the first
    /// heading). The text starts with the innermost heading's own line.
    pub path: Vec<String>,
    pub text: String,
}

/// One document's readable content.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    pub title: String,
    pub sections: Vec<Section>,
}

impl Parsed {
    /// Whether there is any text at all.
    pub fn is_empty(&self) -> bool {
        self.sections.iter().all(|s| s.text.trim().is_empty())
    }

    /// Bytes of text.
    pub fn text_bytes(&self) -> usize {
        self.sections.iter().map(|s| s.text.len()).sum()
    }
}

/// Bytes as text: UTF-8 (a BOM dropped; invalid bytes replaced, which the
/// second value reports), line ends as `\n`, control characters other than
/// tab and newline removed.
pub fn decode(bytes: &[u8]) -> (String, bool) {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let (text, lossy) = match std::str::from_utf8(bytes) {
        Ok(s) => (std::borrow::Cow::Borrowed(s), false),
        Err(_) => (String::from_utf8_lossy(bytes), true),
    };
    (clean(&text), lossy)
}

/// Line ends as `\n`; control characters but tab and newline dropped.
fn clean(text: &str) -> String {
    let needs = text
        .bytes()
        .any(|b| b < 0x20 && b != b'\n' && b != b'\t' || b == 0x7f);
    if !needs {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() != Some(&'\n') {
                    out.push('\n');
                }
            }
            // A form feed separates PDF pages: a paragraph break.
            '\u{c}' => out.push_str("\n\n"),
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// A file name without its extension: the title of a document that has none.
pub fn title_from_path(path: &Path) -> String {
    path.file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Plain text: one section, titled by the caller (the file name).
pub fn text(text: &str, title: &str) -> Parsed {
    Parsed {
        title: title.to_owned(),
        sections: vec![Section {
            path: Vec::new(),
            text: text.trim().to_owned(),
        }],
    }
}

/// Markdown: `#` to `######` headings (and `===`/`---` underlined ones)
/// give the heading path; lines inside fenced code blocks are text. The
/// title is the first level-1 heading, else the first heading, else
/// `fallback_title`.
pub fn markdown(text: &str, fallback_title: &str) -> Parsed {
    let mut sections = Vec::new();
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut cur = String::new();
    let mut fence: Option<(char, usize)> = None;
    let mut first_h1: Option<String> = None;
    let mut first_any: Option<String> = None;
    // Where the current single-line paragraph starts in `cur` (a candidate for
    // an underlined heading), if the previous line is one.
    let mut para_line: Option<usize> = None;
    let mut prev_blank = true;

    for line in text.split('\n') {
        let trimmed = line.trim_start_matches(' ');
        let indent = line.len() - trimmed.len();
        // Fenced code: ``` or ~~~ (three or more), closed by the same.
        if indent <= 3 {
            if let Some(c) = trimmed.chars().next().filter(|c| *c == '`' || *c == '~') {
                let n = trimmed.chars().take_while(|x| *x == c).count();
                if n >= 3 {
                    match fence {
                        None => fence = Some((c, n)),
                        Some((fc, fnum))
                            if fc == c && n >= fnum && trimmed[n..].trim().is_empty() =>
                        {
                            fence = None
                        }
                        Some(_) => {}
                    }
                    cur.push_str(line);
                    cur.push('\n');
                    para_line = None;
                    prev_blank = false;
                    continue;
                }
            }
        }
        if fence.is_some() {
            cur.push_str(line);
            cur.push('\n');
            continue;
        }
        let heading = if indent <= 3 {
            atx_heading(trimmed)
        } else {
            None
        };
        // An underline turns the single paragraph line above it into a heading.
        let setext = match para_line {
            Some(at) if indent <= 3 => {
                let t = trimmed.trim_end();
                let level = if !t.is_empty() && t.chars().all(|c| c == '=') {
                    Some(1)
                } else if t.len() >= 2 && t.chars().all(|c| c == '-') {
                    Some(2)
                } else {
                    None
                };
                level.map(|l| {
                    let h = cur[at..].trim().to_owned();
                    cur.truncate(at);
                    (l, h)
                })
            }
            _ => None,
        };
        if let Some((level, h)) = heading.or(setext) {
            end_section(&mut sections, &mut cur, &path);
            while path.last().is_some_and(|(l, _)| *l >= level) {
                path.pop();
            }
            if level == 1 && first_h1.is_none() {
                first_h1 = Some(h.clone());
            }
            if first_any.is_none() {
                first_any = Some(h.clone());
            }
            cur.push_str(&h);
            cur.push_str("\n\n");
            path.push((level, h));
            para_line = None;
            prev_blank = true;
            continue;
        }
        let blank = line.trim().is_empty();
        para_line = if !blank && prev_blank {
            Some(cur.len())
        } else {
            None
        };
        prev_blank = blank;
        cur.push_str(line);
        cur.push('\n');
    }
    end_section(&mut sections, &mut cur, &path);
    let title = first_h1
        .or(first_any)
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| fallback_title.to_owned());
    Parsed { title, sections }
}

/// Ends the section whose text is `cur` (kept when it holds any text) under
/// the heading path `path` (level, heading).
fn end_section(sections: &mut Vec<Section>, cur: &mut String, path: &[(usize, String)]) {
    let text = std::mem::take(cur);
    if !text.trim().is_empty() {
        sections.push(Section {
            path: path.iter().map(|(_, h)| h.clone()).collect(),
            text: text.trim().to_owned(),
        });
    }
}

/// `# text` … `###### text` (closing `#`s dropped) → level and text.
fn atx_heading(line: &str) -> Option<(usize, String)> {
    let level = line.bytes().take_while(|b| *b == b'#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let rest = &line[level..];
    if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t')) {
        return None;
    }
    let mut h = rest.trim();
    let stripped = h.trim_end_matches('#');
    if stripped.is_empty() || stripped.ends_with(' ') || stripped.ends_with('\t') {
        h = stripped.trim_end();
    }
    Some((level, h.to_owned()))
}

/// Elements whose content is not document text.
const HTML_SKIP: &[&str] = &[
    "script", "style", "nav", "noscript", "template", "head", "svg", "iframe", "object", "canvas",
];

/// Elements that stand as paragraphs of their own.
const HTML_BLOCKS: &[&str] = &[
    "p",
    "div",
    "section",
    "article",
    "main",
    "header",
    "footer",
    "aside",
    "blockquote",
    "pre",
    "ul",
    "ol",
    "dl",
    "table",
    "figure",
    "figcaption",
    "form",
    "fieldset",
    "address",
    "details",
    "summary",
    "hr",
    "body",
    "html",
];

/// Elements that start a line of their own.
const HTML_LINES: &[&str] = &["br", "li", "tr", "dt", "dd", "option", "caption"];

/// Separator waiting to be written before the next text.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Gap {
    None,
    Space,
    Line,
    Para,
}

struct Out {
    text: String,
    gap: Gap,
}

impl Out {
    fn gap(&mut self, g: Gap) {
        self.gap = self.gap.max(g);
    }

    fn push(&mut self, s: &str, pre: bool) {
        if pre {
            if s.is_empty() {
                return;
            }
            self.flush_gap();
            self.text.push_str(s);
            return;
        }
        if s.starts_with(char::is_whitespace) {
            self.gap(Gap::Space);
        }
        let mut words = s.split_whitespace();
        if let Some(w) = words.next() {
            self.flush_gap();
            self.text.push_str(w);
            for w in words {
                self.text.push(' ');
                self.text.push_str(w);
            }
            if s.ends_with(char::is_whitespace) {
                self.gap(Gap::Space);
            }
        }
    }

    fn flush_gap(&mut self) {
        if !self.text.is_empty() {
            match self.gap {
                Gap::None => {}
                Gap::Space => {
                    if !self.text.ends_with(char::is_whitespace) {
                        self.text.push(' ')
                    }
                }
                Gap::Line => {
                    while self.text.ends_with([' ', '\t']) {
                        self.text.pop();
                    }
                    if !self.text.ends_with('\n') {
                        self.text.push('\n')
                    }
                }
                Gap::Para => {
                    while self.text.ends_with([' ', '\t', '\n']) {
                        self.text.pop();
                    }
                    self.text.push_str("\n\n");
                }
            }
        }
        self.gap = Gap::None;
    }
}

/// HTML: `<title>` (else the first `<h1>`, else `fallback_title`) is the
/// title; `<h1>`…`<h6>` give the heading path; block elements are
/// paragraphs; scripts, styles and navigation are skipped.
pub fn html(source: &str, fallback_title: &str) -> Parsed {
    let doc = scraper::Html::parse_document(source);
    let mut title = String::new();
    let mut first_h1 = None;
    let mut sections = Vec::new();
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut out = Out {
        text: String::new(),
        gap: Gap::None,
    };
    // The heading being read: its level and text.
    let mut heading: Option<(usize, Out)> = None;
    let mut skip = 0usize;
    let mut pre = 0usize;
    let mut in_title = 0usize;

    let root = doc.tree.root();
    let mut node = root;
    // An iterative walk (a deep document must not exhaust the stack): open a
    // node, descend; when a node has no more children, close it and move to
    // its next sibling or up.
    loop {
        match node.value() {
            scraper::Node::Element(e) => {
                let name = e.name();
                if name == "title" {
                    in_title += 1;
                } else if skip > 0 || HTML_SKIP.contains(&name) {
                    skip += 1;
                } else if let Some(level) = heading_level(name) {
                    if heading.is_none() {
                        heading = Some((
                            level,
                            Out {
                                text: String::new(),
                                gap: Gap::None,
                            },
                        ));
                    }
                } else if name == "pre" {
                    pre += 1;
                    out.gap(Gap::Para);
                } else if HTML_BLOCKS.contains(&name) {
                    out.gap(Gap::Para);
                } else if HTML_LINES.contains(&name) {
                    out.gap(Gap::Line);
                } else if matches!(name, "td" | "th") {
                    out.gap(Gap::Space);
                }
            }
            scraper::Node::Text(t) => {
                if in_title > 0 {
                    if title.is_empty() {
                        title = t.split_whitespace().collect::<Vec<_>>().join(" ");
                    }
                } else if skip == 0 {
                    match &mut heading {
                        Some((_, h)) => h.push(t, false),
                        None => out.push(t, pre > 0),
                    }
                }
            }
            _ => {}
        }
        if let Some(c) = node.first_child() {
            node = c;
            continue;
        }
        // Close `node` and every ancestor whose children are done.
        loop {
            if let scraper::Node::Element(e) = node.value() {
                let name = e.name();
                if name == "title" {
                    in_title = in_title.saturating_sub(1);
                } else if skip > 0 {
                    skip -= 1;
                } else if let Some(level) = heading_level(name) {
                    if heading.as_ref().is_some_and(|(l, _)| *l == level) {
                        if let Some((level, h)) = heading.take() {
                            let h = h.text.trim().to_owned();
                            if !h.is_empty() {
                                end_section(&mut sections, &mut out.text, &path);
                                while path.last().is_some_and(|(l, _)| *l >= level) {
                                    path.pop();
                                }
                                if level == 1 && first_h1.is_none() {
                                    first_h1 = Some(h.clone());
                                }
                                out.text.push_str(&h);
                                out.gap = Gap::Para;
                                path.push((level, h));
                            }
                        }
                    }
                } else if name == "pre" {
                    pre = pre.saturating_sub(1);
                    out.gap(Gap::Para);
                } else if HTML_BLOCKS.contains(&name) {
                    out.gap(Gap::Para);
                } else if HTML_LINES.contains(&name) && name != "br" {
                    out.gap(Gap::Line);
                }
            }
            if node == root {
                break;
            }
            if let Some(s) = node.next_sibling() {
                node = s;
                break;
            }
            match node.parent() {
                Some(p) => node = p,
                None => break,
            }
        }
        if node == root {
            break;
        }
    }
    end_section(&mut sections, &mut out.text, &path);
    let title = Some(title)
        .filter(|t| !t.is_empty())
        .or(first_h1)
        .unwrap_or_else(|| fallback_title.to_owned());
    Parsed { title, sections }
}

fn heading_level(name: &str) -> Option<usize> {
    match name {
        "h1" => Some(1),
        "h2" => Some(2),
        "h3" => Some(3),
        "h4" => Some(4),
        "h5" => Some(5),
        "h6" => Some(6),
        _ => None,
    }
}

/// A PDF's text layer (pdf-extract) and its title (the document's `Title`,
/// else `fallback_title`). `Ok(None)`: the PDF has no text layer (a scan).
pub fn pdf(bytes: &[u8], fallback_title: &str) -> Result<Option<Parsed>, String> {
    // The extractor panics on some malformed files: that costs this file,
    // never the run.
    let extracted = std::panic::catch_unwind(|| -> Result<(String, Option<String>), String> {
        let mut doc = pdf_extract::Document::load_mem(bytes).map_err(|e| e.to_string())?;
        if doc.is_encrypted() {
            // Files protected only against editing open with the empty password.
            doc.decrypt("")
                .map_err(|_| "the PDF is encrypted".to_owned())?;
        }
        let title = pdf_title(&doc);
        let mut text = String::new();
        {
            let mut out = pdf_extract::PlainTextOutput::new(&mut text);
            pdf_extract::output_doc(&doc, &mut out).map_err(|e| e.to_string())?;
        }
        Ok((text, title))
    });
    let (raw, title) = match extracted {
        Ok(r) => r?,
        Err(_) => return Err("the PDF could not be parsed".into()),
    };
    let text = tidy_pdf_text(&clean(&raw));
    if text.trim().is_empty() {
        return Ok(None);
    }
    let title = title.unwrap_or_else(|| fallback_title.to_owned());
    Ok(Some(self::text(&text, &title)))
}

fn pdf_title(doc: &pdf_extract::Document) -> Option<String> {
    let info = match doc.trailer.get(b"Info").ok()? {
        pdf_extract::Object::Reference(id) => doc.get_dictionary(*id).ok()?,
        pdf_extract::Object::Dictionary(d) => d,
        _ => return None,
    };
    let t = info.get(b"Title").ok()?;
    let t = match t {
        pdf_extract::Object::Reference(id) => doc.get_object(*id).ok()?,
        t => t,
    };
    let t = pdf_extract::decode_text_string(t).ok()?;
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    (!t.is_empty()).then_some(t)
}

/// Trailing spaces dropped, runs of blank lines kept to one.
fn tidy_pdf_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blanks = 0;
    for line in text.split('\n') {
        let line = line.trim_end();
        if line.trim().is_empty() {
            blanks += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blanks > 0 { "\n\n" } else { "\n" });
        }
        blanks = 0;
        out.push_str(line);
    }
    out
}

/// One line of a `.jsonl` file as a document.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonlDoc {
    /// `id` (or `_id`, or `source`) of the line, when it names one.
    pub id: Option<String>,
    pub title: String,
    pub text: String,
    pub metadata: Map<String, Value>,
}

/// Reads one `.jsonl` line: an object with a string `text`; `id`, `_id` or
/// `source` (a string or a number) names it; `title` is optional; every other
/// field is metadata (the fields of an object-valued `metadata` field are
/// merged in). The error says what is wrong with the line.
pub fn jsonl_line(line: &str) -> Result<JsonlDoc, String> {
    let obj: Map<String, Value> = match serde_json::from_str(line) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return Err("not a JSON object".into()),
        Err(e) => return Err(format!("not valid JSON ({e})")),
    };
    let mut id = None;
    let mut source = None;
    let mut title = String::new();
    let mut text = None;
    let mut metadata = Map::new();
    let mut nested = None;
    for (k, v) in obj {
        match k.as_str() {
            "text" => match v {
                Value::String(s) => text = Some(s),
                _ => return Err("`text` must be a string".into()),
            },
            "id" | "_id" | "source" => {
                let s = match &v {
                    Value::String(s) => s.trim().to_owned(),
                    Value::Number(n) => n.to_string(),
                    _ => return Err(format!("`{k}` must be a string or a number")),
                };
                if s.is_empty() {
                    return Err(format!("`{k}` must not be empty"));
                }
                if k == "source" {
                    source = Some(s);
                } else {
                    id = Some(s);
                }
            }
            "title" => match v {
                Value::String(s) => title = s.trim().to_owned(),
                Value::Null => {}
                _ => return Err("`title` must be a string".into()),
            },
            "metadata" if v.is_object() => nested = Some(v),
            _ => {
                metadata.insert(k, v);
            }
        }
    }
    if let Some(Value::Object(m)) = nested {
        for (k, v) in m {
            metadata.entry(k).or_insert(v);
        }
    }
    // `id` names the document; a `source` beside it is kept as metadata.
    let id = match (id, source) {
        (Some(id), Some(source)) => {
            metadata.insert("source".into(), Value::String(source));
            Some(id)
        }
        (id, source) => id.or(source),
    };
    let text = text.ok_or("`text` is missing")?;
    Ok(JsonlDoc {
        id,
        title,
        text: clean(&text),
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/ingest")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn paths(p: &Parsed) -> Vec<Vec<&str>> {
        p.sections
            .iter()
            .map(|s| s.path.iter().map(String::as_str).collect())
            .collect()
    }

    #[test]
    fn formats_come_from_the_extension() {
        assert_eq!(Format::of(Path::new("a/b.MD")), Some(Format::Markdown));
        assert_eq!(Format::of(Path::new("x.htm")), Some(Format::Html));
        assert_eq!(Format::of(Path::new("x.jsonl")), Some(Format::Jsonl));
        assert_eq!(Format::of(Path::new("x.docx")), None);
        assert_eq!(Format::of(Path::new("README")), None);
    }

    #[test]
    fn decode_drops_the_bom_and_normalises_line_ends() {
        let (t, lossy) = decode(b"\xEF\xBB\xBFa\r\nb\rc\x00d\x0ce");
        assert_eq!(t, "a\nb\ncd\n\ne");
        assert!(!lossy);
        let (t, lossy) = decode(b"ok \xff\xfe end");
        assert!(lossy);
        assert!(t.starts_with("ok ") && t.ends_with(" end"));
    }

    #[test]
    fn markdown_headings_give_the_title_and_heading_paths() {
        let (text, _) = decode(&fixture("handbook.md"));
        let p = markdown(&text, "handbook");
        assert_eq!(p.title, "Employee Handbook");
        assert_eq!(
            paths(&p),
            vec![
                vec!["Employee Handbook"],
                vec!["Employee Handbook", "Leave"],
                vec!["Employee Handbook", "Leave", "Annual leave"],
                vec!["Employee Handbook", "Leave", "Sick leave"],
                vec!["Employee Handbook", "Expenses"],
            ]
        );
        // A section starts with its own heading line.
        assert!(p.sections[2].text.starts_with("Annual leave\n\n"));
        assert!(p.sections[2].text.contains("25 days"));
        // `#` inside a fenced block is code, not a heading.
        let expenses = &p.sections[4].text;
        assert!(expenses.contains("# not a heading"), "{expenses}");
        // An underlined heading.
        assert!(p.sections[4].text.starts_with("Expenses\n\n"));
    }

    #[test]
    fn markdown_without_headings_is_titled_by_the_caller() {
        let p = markdown("just text\n\nmore", "notes");
        assert_eq!(p.title, "notes");
        assert_eq!(p.sections.len(), 1);
        assert!(p.sections[0].path.is_empty());
        assert_eq!(atx_heading("#hashtag"), None);
        assert_eq!(atx_heading("## Closed ##"), Some((2, "Closed".into())));
    }

    #[test]
    fn chinese_text_is_read_whole() {
        let (text, lossy) = decode(&fixture("returns-zh.txt"));
        assert!(!lossy);
        let p = self::text(&text, &title_from_path(Path::new("kb/returns-zh.txt")));
        assert_eq!(p.title, "returns-zh");
        assert_eq!(p.sections.len(), 1);
        assert!(p.sections[0].text.contains("退货"));
        assert!(p.sections[0].text.contains("发票"));
    }

    #[test]
    fn html_reads_title_headings_and_blocks_but_not_scripts_or_navigation() {
        let (source, _) = decode(&fixture("shipping.html"));
        let p = html(&source, "shipping");
        assert_eq!(p.title, "Shipping policy | Example Shop");
        let all: String = p.sections.iter().map(|s| s.text.as_str()).collect();
        assert!(!all.contains("trackVisitor"), "{all}");
        assert!(!all.contains("color:"), "{all}");
        assert!(!all.contains("Home"), "navigation text leaked: {all}");
        assert_eq!(
            paths(&p),
            vec![
                vec!["Shipping"],
                vec!["Shipping", "Domestic orders"],
                vec!["Shipping", "International orders"],
            ]
        );
        let domestic = &p.sections[1].text;
        // Heading line, then paragraphs split by blank lines, inline markup joined.
        assert!(
            domestic.starts_with("Domestic orders\n\nOrders placed before 2 pm ship the same day."),
            "{domestic}"
        );
        assert!(
            domestic.contains("\n\nStandard delivery takes"),
            "{domestic}"
        );
        // List items are lines of their own.
        assert!(
            domestic.contains("Express: 1 day\nStandard: 3 days"),
            "{domestic}"
        );
    }

    #[test]
    fn html_without_a_title_uses_the_first_h1_then_the_file_name() {
        assert_eq!(html("<h1>Top</h1><p>x</p>", "f").title, "Top");
        assert_eq!(html("<p>x</p>", "f").title, "f");
        // A deeply nested document is walked without recursion.
        let deep = format!("{}text{}", "<div>".repeat(2_000), "</div>".repeat(2_000));
        let p = html(&deep, "deep");
        assert_eq!(p.sections.len(), 1);
        assert_eq!(p.sections[0].text, "text");
    }

    #[test]
    fn pdf_text_layer_is_read_with_the_file_name_as_title() {
        let p = pdf(&fixture("warranty.pdf"), "warranty")
            .expect("readable")
            .expect("a text layer");
        assert_eq!(p.title, "warranty");
        let text = &p.sections[0].text;
        assert!(text.contains("Warranty terms"), "{text}");
        assert!(text.contains("two years"), "{text}");
        assert!(text.contains("receipt"), "{text}");
    }

    #[test]
    fn a_pdf_title_is_read_from_the_document() {
        let p = pdf(&fixture("manual.pdf"), "manual")
            .expect("readable")
            .expect("a text layer");
        assert_eq!(p.title, "Router manual");
        assert!(p.sections[0].text.contains("power button"));
    }

    #[test]
    fn a_pdf_without_text_is_none_and_garbage_is_an_error() {
        assert_eq!(pdf(&fixture("scan.pdf"), "scan"), Ok(None));
        assert!(pdf(b"%PDF-1.4 not really", "x").is_err());
        assert!(pdf(b"", "x").is_err());
    }

    #[test]
    fn jsonl_lines_carry_ids_titles_and_metadata() {
        let (text, _) = decode(&fixture("faq.jsonl"));
        let lines: Vec<Result<JsonlDoc, String>> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(jsonl_line)
            .collect();
        assert_eq!(lines.len(), 4);
        let first = lines[0].as_ref().expect("valid");
        assert_eq!(first.id.as_deref(), Some("faq-1"));
        assert_eq!(first.title, "Invoices");
        assert_eq!(first.metadata["lang"], "en");
        assert_eq!(first.metadata["team"], "billing");
        assert!(!first.metadata.contains_key("text"));
        let second = lines[1].as_ref().expect("valid");
        assert_eq!(second.id, None);
        assert_eq!(second.metadata["lang"], "zh");
        assert!(lines[2].as_ref().is_err_and(|e| e.contains("JSON")));
        let fourth = lines[3].as_ref().expect("valid");
        assert_eq!(fourth.id.as_deref(), Some("42"));
        assert_eq!(fourth.metadata["tags"], serde_json::json!(["a", "b"]));
    }

    #[test]
    fn jsonl_line_errors_name_the_problem() {
        assert_eq!(jsonl_line(r#"{"id":"x"}"#), Err("`text` is missing".into()));
        assert_eq!(
            jsonl_line(r#"{"text": 5}"#),
            Err("`text` must be a string".into())
        );
        assert_eq!(jsonl_line("[1]"), Err("not a JSON object".into()));
        let d = jsonl_line(r#"{"source":"s","id":"i","text":"t"}"#).expect("valid");
        assert_eq!(d.id.as_deref(), Some("i"));
        assert_eq!(d.metadata["source"], "s");
        let d = jsonl_line(r#"{"_id":"b1","text":"t","metadata":{"k":1}}"#).expect("valid");
        assert_eq!(d.id.as_deref(), Some("b1"));
        assert_eq!(d.metadata["k"], 1);
    }
}
