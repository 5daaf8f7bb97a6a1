//! Escaping of attacker-controlled intel text for each wire format: CEF and LEEF headers and
//! extensions, Markdown (TheHive renders descriptions), STIX pattern strings, and a length cap that
//! never splits a character.

/// At most `max` bytes of `s`, cut at a character boundary, with `…` when cut.
pub fn cap(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A CEF header field: `\` and `|` escaped; line breaks and other controls become spaces (a header
/// may not span lines).
pub fn cef_header(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A CEF extension value: `\` and `=` escaped, line breaks as `\n`/`\r`, other controls as spaces,
/// so a value can never start a new key or a new event.
pub fn cef_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A LEEF header field: `\` and `|` escaped, controls as spaces.
pub fn leef_header(s: &str) -> String {
    cef_header(s)
}

/// A LEEF attribute value (tab-delimited): the delimiter, line breaks and other controls become
/// spaces (LEEF defines no escape for them), so a value can never start a new attribute or event.
pub fn leef_value(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Text shown as literal Markdown: every character Markdown (and HTML inside it) could interpret is
/// backslash-escaped.
pub fn markdown(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\`*_{}[]()<>#+-.!|~&\"'".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A string literal inside a STIX pattern (`'…'`): `\` and `'` escaped (STIX 2.1 §9.3).
pub fn stix_string(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\'', "\\'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cef_escapes_pipes_equals_backslashes_and_newlines() {
        assert_eq!(cef_header("a|b\\c\nd"), "a\\|b\\\\c d");
        assert_eq!(cef_value("x=1 \\ y\r\nz|"), "x\\=1 \\\\ y\\r\\nz|");
        // A value cannot forge a key: every '=' it holds is escaped.
        let v = cef_value("evil act=blocked");
        assert!(!v.contains(" act="), "{v}");
    }

    #[test]
    fn leef_values_cannot_hold_delimiters_or_line_breaks() {
        assert_eq!(leef_value("a\tb\nc"), "a b c");
        assert_eq!(leef_header("v|1"), "v\\|1");
    }

    #[test]
    fn markdown_and_stix_strings_are_literal() {
        assert_eq!(markdown("[x](javascript:1)"), "\\[x\\]\\(javascript:1\\)");
        assert_eq!(markdown("<img src=x>"), "\\<img src=x\\>");
        assert_eq!(stix_string("it's \\ x"), "it\\'s \\\\ x");
    }

    #[test]
    fn cap_cuts_at_character_boundaries() {
        assert_eq!(cap("abc", 3), "abc");
        let s = "ééééé";
        let c = cap(s, 6);
        assert!(c.len() <= 6 && c.ends_with('…'), "{c}");
        assert_eq!(cap("abcdef", 4), "a…");
    }
}
