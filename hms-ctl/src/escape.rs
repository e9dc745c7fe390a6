//! Untrusted text made safe to print on a terminal. Everything hms-ctl shows from the agent
//! may come from a caller or another host (a process's `comm`, a request path, a header, a
//! peer's error message): a control character in it could move the cursor, rewrite the
//! screen or fake a table row. Owns the escaping; never decides what is printed.
//!
//! Escaped: C0 controls (tab and newline too in a [`cell`]), DEL, C1 controls, and the
//! Unicode bidirectional overrides and isolates that reorder what follows. Each becomes a
//! visible escape (`\x1b`, `\u{202e}`); a backslash stays as it is.

use std::borrow::Cow;

fn needs_escape(c: char, keep_newlines: bool) -> bool {
    match c {
        '\n' => !keep_newlines,
        c if c.is_control() => true,
        '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => true,
        _ => false,
    }
}

fn escape(s: &str, keep_newlines: bool) -> Cow<'_, str> {
    if !s.chars().any(|c| needs_escape(c, keep_newlines)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c, keep_newlines) {
            match u8::try_from(u32::from(c)) {
                Ok(b) if b < 0x80 => out.push_str(&format!("\\x{b:02x}")),
                _ => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// One table cell: every control character escaped, tabs and newlines included.
pub fn cell(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// Lines of text hms-ctl composed: newlines kept, every other control escaped.
pub fn lines(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escapes_and_bidi_overrides_become_visible() {
        assert_eq!(cell("curl"), "curl");
        assert_eq!(cell("\x1b]0;owned\x07x"), "\\x1b]0;owned\\x07x");
        assert_eq!(cell("a\tb\nc\r"), "a\\x09b\\x0ac\\x0d");
        assert_eq!(cell("evil\u{202e}fdp.exe"), "evil\\u{202e}fdp.exe");
        assert_eq!(cell("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(lines("one\ntwo\x1b[2J"), "one\ntwo\\x1b[2J");
        assert_eq!(cell("päth/ü"), "päth/ü", "printable Unicode stays");
    }
}
