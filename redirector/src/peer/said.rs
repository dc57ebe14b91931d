//! Text a sibling sent (the reason of a refusal, a decline or an abort) as this node's logs
//! and answers repeat it: cut short and with control characters escaped, so a sibling can
//! neither flood a log line nor write lines of its own into it.

use std::fmt;

/// Characters of a sibling's text shown; the rest is counted.
pub const SAID_MAX: usize = 200;

/// A sibling's text, for display.
#[derive(Clone, Copy, Debug)]
pub struct Said<'a>(pub &'a str);

impl fmt::Display for Said<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (at, ch)) in self.0.char_indices().enumerate() {
            if i == SAID_MAX {
                return write!(f, "... ({} more bytes)", self.0.len() - at);
            }
            // Line breaks, terminal escapes and the marks that reorder text on a terminal.
            if ch.is_control() || matches!(ch, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
                write!(f, "{}", ch.escape_unicode())?;
            } else {
                write!(f, "{ch}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_siblings_text_stays_on_one_short_line() {
        assert_eq!(Said("no room: load 90 of 100").to_string(), "no room: load 90 of 100");
        assert_eq!(Said("x\nFAKE line\r\u{1b}[2J\u{202e}").to_string(), "x\\u{a}FAKE line\\u{d}\\u{1b}[2J\\u{202e}");
        let long = format!("{}é{}", "a".repeat(SAID_MAX - 1), "b".repeat(10_000));
        let shown = Said(&long).to_string();
        assert_eq!(shown, format!("{}é... (10000 more bytes)", "a".repeat(SAID_MAX - 1)));
    }
}
