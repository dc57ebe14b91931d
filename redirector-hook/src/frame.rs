//! How messages travel: one JSON object per line (UTF-8, `\n`-terminated, no newline inside),
//! and in version 2, right after a line whose top-level `bytes` is N, exactly N raw bytes.
//! A reader frames every message without understanding it: read a line, read its `bytes`.
//! In version 3 a line's top-level `fds` counts the descriptors that passed with its bytes
//! ([`crate::fds`]).

use std::io::Write;

use serde::{Deserialize, Serialize};

/// What a reader needs of a line to frame it and route it: its `id` (answers) and how many
/// raw bytes follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// The line's `id`, if it has a non-negative integer one.
    pub id: Option<u64>,
    /// Raw bytes that follow the line (version 2; 0 when absent).
    pub bytes: u64,
    /// Descriptors that passed with the line (version 3; 0 when absent).
    pub fds: u64,
}

impl Head {
    /// Reads the head of a line. An error: the line is not a JSON object, or its `bytes` is
    /// not a non-negative integer (the stream cannot be framed any further).
    pub fn parse(line: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Loose {
            id: Option<serde_json::Value>,
            bytes: Option<serde_json::Value>,
            fds: Option<serde_json::Value>,
        }
        let loose: Loose = serde_json::from_slice(line).map_err(|e| format!("a line that is not a JSON object ({e})"))?;
        let bytes = match loose.bytes {
            None => 0,
            Some(v) => v.as_u64().ok_or_else(|| format!("a line whose \"bytes\" is not a non-negative integer: {}", preview(line)))?,
        };
        let fds = match loose.fds {
            None => 0,
            Some(v) => v.as_u64().ok_or_else(|| format!("a line whose \"fds\" is not a non-negative integer: {}", preview(line)))?,
        };
        Ok(Self { id: loose.id.as_ref().and_then(serde_json::Value::as_u64), bytes, fds })
    }
}

/// Writes `msg` as one line, then `raw` (the bytes its `bytes` field announces, in order).
pub fn write<'a>(out: &mut impl Write, msg: &impl Serialize, raw: impl IntoIterator<Item = &'a [u8]>) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, msg)?;
    out.write_all(b"\n")?;
    for r in raw {
        out.write_all(r)?;
    }
    Ok(())
}

/// `msg` as one line, ready to send (its raw bytes, if any, go after it: [`write`]).
#[must_use]
pub fn line(msg: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write(&mut out, msg, []).expect("writing to memory");
    out
}

/// The start of a line, for a log or error message.
#[must_use]
pub fn preview(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(&line[..line.len().min(120)]).into_owned();
    if line.len() > 120 { format!("{s}...") } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_frame_lines_and_refuse_what_cannot_be_framed() {
        assert_eq!(Head::parse(br#"{"id":7,"ok":true,"bytes":5,"sessions":[]}"#), Ok(Head { id: Some(7), bytes: 5, fds: 0 }));
        assert_eq!(Head::parse(br#"{"op":"registered"}"#), Ok(Head { id: None, bytes: 0, fds: 0 }));
        assert_eq!(Head::parse(br#"{"id":-1}"#), Ok(Head { id: None, bytes: 0, fds: 0 }));
        assert_eq!(Head::parse(br#"{"id":2,"fds":3}"#), Ok(Head { id: Some(2), bytes: 0, fds: 3 }));
        assert!(Head::parse(br#"{"id":2,"fds":"3"}"#).unwrap_err().contains("\"fds\""));
        assert!(Head::parse(br#"{"id":1,"bytes":-5}"#).unwrap_err().contains("\"bytes\""));
        assert!(Head::parse(b"[1]").is_err());
        assert!(Head::parse(b"x").unwrap_err().contains("not a JSON object"));
    }

    #[test]
    fn raw_bytes_follow_their_line() {
        let mut out = Vec::new();
        write(&mut out, &serde_json::json!({"bytes":9}), [&b"abcd"[..], b"hello"]).unwrap();
        assert_eq!(out, b"{\"bytes\":9}\nabcdhello");
        assert_eq!(line(&serde_json::json!({"op":"x"})), b"{\"op\":\"x\"}\n");
    }
}
