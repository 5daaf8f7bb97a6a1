//! Tokenisation for the mapper: lower-case word tokens (kept whole for embeddings) and stemmed terms
//! (for lexical scoring), with security-aware splitting of file names, command lines and paths.

use std::collections::HashSet;
use std::sync::LazyLock;

use rust_stemmers::{Algorithm, Stemmer};

/// English function words plus words every ATT&CK text uses ("adversary", "malware") that carry no
/// signal about which technique is meant.
const STOPWORDS: &[&str] = &[
    "a",
    "about",
    "above",
    "after",
    "again",
    "against",
    "all",
    "also",
    "am",
    "an",
    "and",
    "any",
    "are",
    "as",
    "at",
    "be",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "but",
    "by",
    "can",
    "could",
    "did",
    "do",
    "does",
    "doing",
    "down",
    "during",
    "each",
    "either",
    "etc",
    "few",
    "for",
    "from",
    "further",
    "had",
    "has",
    "have",
    "having",
    "he",
    "her",
    "here",
    "hers",
    "herself",
    "him",
    "himself",
    "his",
    "how",
    "i",
    "if",
    "in",
    "into",
    "is",
    "it",
    "its",
    "itself",
    "just",
    "may",
    "me",
    "might",
    "more",
    "most",
    "must",
    "my",
    "myself",
    "no",
    "nor",
    "not",
    "now",
    "of",
    "off",
    "on",
    "once",
    "only",
    "or",
    "other",
    "our",
    "ours",
    "ourselves",
    "out",
    "over",
    "own",
    "same",
    "she",
    "should",
    "so",
    "some",
    "such",
    "than",
    "that",
    "the",
    "their",
    "theirs",
    "them",
    "themselves",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "to",
    "too",
    "under",
    "until",
    "up",
    "us",
    "very",
    "via",
    "was",
    "we",
    "were",
    "what",
    "when",
    "where",
    "which",
    "while",
    "who",
    "whom",
    "why",
    "will",
    "with",
    "within",
    "would",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
    "e.g",
    "i.e",
    "eg",
    "ie",
    "use",
    "used",
    "uses",
    "using",
    "adversary",
    "adversaries",
    "attacker",
    "attackers",
    "actor",
    "actors",
    "threat",
    "malware",
    "malicious",
    "has",
    "been",
    "able",
    "capability",
    "capable",
    "observed",
    "known",
    "leveraged",
    "leverage",
    "s",
    "t",
    "new",
    "one",
    "two",
    "well",
];

static STOP: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| STOPWORDS.iter().copied().collect());

/// True for a stopword (after lower-casing).
pub fn is_stopword(w: &str) -> bool {
    STOP.contains(w)
}

/// Longest token kept; longer runs (base64 blobs, hashes) are cut so one hostile string cannot
/// flood the vocabulary.
const MAX_TOKEN: usize = 40;

/// Split text into lower-case tokens. Letters and digits form tokens; `.`, `_`, `-` and `$` are kept
/// inside a token when surrounded by word characters (`cmd.exe`, `lsass.exe`, `net1`, `c$`), and the
/// pieces of such compound tokens are emitted too (`cmd.exe` → `cmd.exe`, `cmd`, `exe`) so both the
/// whole and its parts can match.
pub fn tokens(text: &str, out: &mut Vec<String>) {
    out.clear();
    let mut cur = String::new();
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        let t = cur.trim_matches(|c: char| matches!(c, '.' | '_' | '-' | '$'));
        if !t.is_empty() {
            let t: String = t.chars().take(MAX_TOKEN).collect();
            let has_joiner = t.contains(['.', '_', '-']);
            if has_joiner {
                for p in t.split(['.', '_', '-']).filter(|p| !p.is_empty()) {
                    out.push(p.to_string());
                }
            }
            out.push(t);
        }
        cur.clear();
    };
    for c in text.chars() {
        if c.is_alphanumeric() {
            for l in c.to_lowercase() {
                cur.push(l);
            }
        } else if matches!(c, '.' | '_' | '-' | '$') && !cur.is_empty() {
            cur.push(c);
        } else if !cur.is_empty() {
            flush(&mut cur, out);
        }
    }
    if !cur.is_empty() {
        flush(&mut cur, out);
    }
}

/// Stemmer shared by build and query time.
pub struct Analyzer {
    stemmer: Stemmer,
}

impl Default for Analyzer {
    fn default() -> Self {
        Self {
            stemmer: Stemmer::create(Algorithm::English),
        }
    }
}

impl Analyzer {
    /// Content terms of `text`: tokens minus stopwords and pure numbers, stemmed.
    pub fn terms(&self, text: &str, scratch: &mut Vec<String>, out: &mut Vec<String>) {
        tokens(text, scratch);
        out.clear();
        for t in scratch.iter() {
            if let Some(term) = self.term(t) {
                out.push(term);
            }
        }
    }

    /// The lexical term for one token, or None for stopwords, numbers and one-letter tokens.
    pub fn term(&self, token: &str) -> Option<String> {
        if token.len() < 2 || is_stopword(token) || token.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        // File names and other compounds are matched whole; only plain words are stemmed.
        if token.contains(['.', '_', '-', '$']) || token.chars().any(|c| c.is_ascii_digit()) {
            Some(token.to_string())
        } else {
            Some(self.stemmer.stem(token).into_owned())
        }
    }
}

/// Split prose into sentences (ATT&CK descriptions are several sentences; each is one example).
pub fn sentences(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive(['\n'])
        .flat_map(|line| line.split(". "))
        .map(str::trim)
        .filter(|s| s.split_whitespace().count() >= 3)
}

/// ATT&CK technique ids cited in `input`, upper-cased, sub-techniques with a dot: `T1059.001`,
/// `t1003`, `T1021/001` (as some reports write them); not inside a longer word or number.
pub fn cited_ids(input: &str) -> impl Iterator<Item = String> + '_ {
    let bytes = input.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        while i + 5 <= bytes.len() {
            let boundary = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
            if boundary
                && (bytes[i] == b'T' || bytes[i] == b't')
                && bytes[i + 1..i + 5].iter().all(u8::is_ascii_digit)
            {
                let start = i;
                let mut end = i + 5;
                let sub = end + 4 <= bytes.len()
                    && matches!(bytes[end], b'.' | b'/')
                    && bytes[end + 1..end + 4].iter().all(u8::is_ascii_digit);
                if sub {
                    end += 4;
                }
                i = end;
                if end == bytes.len() || !bytes[end].is_ascii_alphanumeric() {
                    let mut id = input[start..start + 5].to_ascii_uppercase();
                    if sub {
                        id.push('.');
                        id.push_str(&input[start + 6..end]);
                    }
                    return Some(id);
                }
            } else {
                i += 1;
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cited_technique_ids() {
        let ids: Vec<String> =
            cited_ids("Used t1003 and T1059.001, T1021/001; not XT1234, T12345 or T1059.1.")
                .collect();
        assert_eq!(ids, ["T1003", "T1059.001", "T1021.001", "T1059"]);
        assert_eq!(cited_ids("T105 T").count(), 0);
    }

    #[test]
    fn splits_compounds_and_keeps_whole() {
        let mut out = Vec::new();
        tokens(
            "Ran cmd.exe /c \"powershell -enc ...\" via rundll32.exe, then NET1 user.",
            &mut out,
        );
        assert!(out.contains(&"cmd.exe".to_string()) && out.contains(&"cmd".to_string()));
        assert!(out.contains(&"rundll32.exe".to_string()) && out.contains(&"rundll32".to_string()));
        assert!(out.contains(&"net1".to_string()) && out.contains(&"powershell".to_string()));
        assert!(!out.iter().any(|t| t.ends_with('.')));
    }

    #[test]
    fn terms_drop_stopwords_and_stem() {
        let a = Analyzer::default();
        let (mut s, mut out) = (Vec::new(), Vec::new());
        a.terms(
            "The adversary used scheduled tasks for persistence 2024",
            &mut s,
            &mut out,
        );
        assert_eq!(out, vec!["schedul", "task", "persist"]);
    }

    #[test]
    fn hostile_input_is_bounded() {
        let mut out = Vec::new();
        let long = "A".repeat(10_000);
        tokens(&long, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_TOKEN);
        tokens("\u{0}\u{202e}<script>alert(1)</script>", &mut out);
        assert!(out.contains(&"script".to_string()));
    }

    #[test]
    fn sentence_split() {
        let v: Vec<&str> = sentences("One two three. Four five six.\nSeven eight nine").collect();
        assert_eq!(v.len(), 3);
    }
}
