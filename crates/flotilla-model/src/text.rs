//! Text that came from a machine (health-check bodies, service output, failure reasons,
//! activation messages), made safe to show on a terminal and to keep in the ledger.
//!
//! A service controls what it prints and what its health check answers; written raw to the
//! operator's terminal, an escape sequence in it could retitle the window, clear the screen,
//! rewrite earlier lines or, on some terminals, answer back as if typed. Every C0 and C1
//! control character (and DEL) is therefore written as a visible escape (`\x1b`, `\u{9b}`),
//! except a newline and a tab where a multi-line block is shown. Nothing else is changed, so
//! ordinary text reads as it did.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `s` for one line of a table or a message: every control character escaped, newlines and
/// tabs included.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// `s` for a block of lines (an error with its causes, service logs): control characters
/// escaped, but newlines and tabs kept.
pub fn escape_controls_block(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

fn escape(s: &str, block: bool) -> Cow<'_, str> {
    let kept = |c: char| block && (c == '\n' || c == '\t');
    if !s.chars().any(|c| c.is_control() && !kept(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if kept(c) || !c.is_control() => out.push(c),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_become_visible_text() {
        let evil = "\x1b]0;pwned\x07\x1b[2Jok";
        assert_eq!(escape_controls(evil), "\\x1b]0;pwned\\x07\\x1b[2Jok");
        assert_eq!(escape_controls("a\u{9b}31m\x7f"), "a\\u{9b}31m\\x7f");
        assert_eq!(escape_controls("one\r\ntwo\tx"), "one\\r\\ntwo\\tx");
        assert_eq!(escape_controls_block("one\r\ntwo\tx\x1b[2J"), "one\\r\ntwo\tx\\x1b[2J");
    }

    #[test]
    fn plain_text_is_untouched() {
        for s in ["", "machine web1: health check failed: HTTP 500", "grüße → ünïcödé", "a \\x1b b"] {
            assert!(matches!(escape_controls(s), Cow::Borrowed(b) if b == s), "{s}");
        }
        assert!(matches!(escape_controls_block("a\nb\tc"), Cow::Borrowed(_)));
    }
}
