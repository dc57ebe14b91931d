//! A client's session and how a list of them travels: version 1 puts each blob in base64 in
//! the line; version 2 puts each blob's length in the line and the blobs, in list order, in
//! the raw bytes after it.

use std::net::IpAddr;

use base64::{Engine as _, engine::general_purpose::STANDARD};

use crate::{Version, client::parse_client, msg::WireSession};

/// A client's session as the application exported it: opaque bytes to redirector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub client: IpAddr,
    pub blob: Vec<u8>,
}

/// Length of `n` bytes in base64 with padding.
#[must_use]
pub fn base64_len(n: usize) -> usize {
    n.div_ceil(3).saturating_mul(4)
}

/// The line's list for `sessions` in `version`, and its `bytes` (the raw bytes that follow).
#[must_use]
pub fn to_wire<'a>(sessions: impl IntoIterator<Item = (IpAddr, &'a [u8])>, version: Version) -> (Vec<WireSession>, u64) {
    let mut bytes = 0u64;
    let list = sessions
        .into_iter()
        .map(|(client, blob)| match version {
            Version::V1 => WireSession { client: client.to_string(), blob: Some(STANDARD.encode(blob)), len: None },
            Version::V2 | Version::V3 => {
                let len = u64::try_from(blob.len()).unwrap_or(u64::MAX);
                bytes = bytes.saturating_add(len);
                listed_len(client, len)
            }
        })
        .collect();
    (list, bytes)
}

/// The line's list for `sessions` in `version`, written as it is serialized: the same JSON
/// as [`to_wire`]'s list, but version 1's base64 goes straight into the writer, so an
/// application's first byte leaves once its sessions are at hand, not after all of them are
/// encoded, and no copy of them a third larger is held (640 MiB of sessions would be 853 MiB
/// of strings held before the first byte).
pub struct WireList<'a> {
    pub sessions: &'a [(IpAddr, Vec<u8>)],
    pub version: Version,
}

impl WireList<'_> {
    /// The raw bytes that follow the line (0 in version 1).
    #[must_use]
    pub fn bytes(&self) -> u64 {
        if self.version == Version::V1 { 0 } else { self.sessions.iter().fold(0u64, |n, s| n.saturating_add(u64::try_from(s.1.len()).unwrap_or(u64::MAX))) }
    }
}

impl serde::Serialize for WireList<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq as _, SerializeStruct as _};
        /// One element, with [`WireSession`]'s fields in its order.
        struct One<'a>(IpAddr, &'a [u8], Version);
        impl serde::Serialize for One<'_> {
            fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let mut st = ser.serialize_struct("WireSession", 2)?;
                st.serialize_field("client", &self.0.to_string())?;
                match self.2 {
                    Version::V1 => st.serialize_field("blob", &Base64(self.1))?,
                    Version::V2 | Version::V3 => st.serialize_field("len", &u64::try_from(self.1.len()).unwrap_or(u64::MAX))?,
                }
                st.end()
            }
        }
        let mut seq = ser.serialize_seq(Some(self.sessions.len()))?;
        for (client, blob) in self.sessions {
            seq.serialize_element(&One(*client, blob, self.version))?;
        }
        seq.end()
    }
}

/// Bytes serialized as a base64 string, encoded piece by piece into the serializer's writer.
struct Base64<'a>(&'a [u8]);

impl serde::Serialize for Base64<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_str(&base64::display::Base64Display::new(self.0, &STANDARD))
    }
}

/// The line's list (version 2) for sessions whose blobs are not at hand yet, each a client
/// and the length of its blob, and its `bytes`: what [`to_wire`] makes of the same blobs.
#[must_use]
pub fn lengths_to_wire(sessions: impl IntoIterator<Item = (IpAddr, u64)>) -> (Vec<WireSession>, u64) {
    let mut bytes = 0u64;
    let list = sessions
        .into_iter()
        .map(|(client, len)| {
            bytes = bytes.saturating_add(len);
            listed_len(client, len)
        })
        .collect();
    (list, bytes)
}

fn listed_len(client: IpAddr, len: u64) -> WireSession {
    WireSession { client: client.to_string(), blob: None, len: Some(len) }
}

/// The raw bytes that follow the line of `blobs` in `version`, in order (none in version 1):
/// borrowed to write them, or owned to send them on.
#[must_use]
pub fn raw_parts<B>(blobs: impl IntoIterator<Item = B>, version: Version) -> Vec<B> {
    if version.raw_blobs() { blobs.into_iter().collect() } else { Vec::new() }
}

/// A session as its line lists it: its blob (version 1, decoded from the base64), or the
/// length of its blob among the raw bytes after the line (version 2, in list order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listed {
    Blob(Vec<u8>),
    Len(usize),
}

/// Reads the sessions a line lists, before (or without) the raw bytes that follow it: every
/// session needs a client address and a blob (version 1) or a length (version 2) of at most
/// `max` bytes; in version 2 the lengths add up to `bytes`. A reader that streams the raw
/// bytes checks the line with this first.
pub fn listed(list: Vec<WireSession>, bytes: u64, version: Version, max: usize) -> Result<Vec<(IpAddr, Listed)>, String> {
    let mut out = Vec::with_capacity(list.len());
    let mut at = 0u64;
    for (i, s) in list.into_iter().enumerate() {
        if s.client.is_empty() {
            return Err(format!("session #{i} lacks a client or a blob"));
        }
        let client = parse_client(&s.client).ok_or_else(|| format!("session #{i} is for {:?}, not an address", s.client))?;
        let listed = match version {
            Version::V1 => {
                let Some(b64) = s.blob else { return Err(format!("session #{i} lacks a client or a blob")) };
                if base64_len(max) < b64.len() {
                    return Err(format!("session of {client} is over the limit of {max} bytes (max_session_bytes)"));
                }
                let blob = STANDARD.decode(&b64).map_err(|e| format!("session of {client}: blob is not base64: {e}"))?;
                if blob.len() > max {
                    return Err(format!("session of {client} is {} bytes, over the limit of {max} (max_session_bytes)", blob.len()));
                }
                Listed::Blob(blob)
            }
            Version::V2 | Version::V3 => {
                let Some(len) = s.len else { return Err(format!("session #{i} lacks a client or a len")) };
                if usize::try_from(len).map_or(true, |l| l > max) {
                    return Err(format!("session of {client} is {len} bytes, over the limit of {max} (max_session_bytes)"));
                }
                at = at.checked_add(len).filter(|e| *e <= bytes).ok_or_else(|| format!("the sessions' lengths add up to more than the {bytes} bytes announced"))?;
                Listed::Len(usize::try_from(len).unwrap_or(usize::MAX))
            }
        };
        out.push((client, listed));
    }
    if version.raw_blobs() && at != bytes {
        return Err(format!("the sessions' lengths add up to {at}, not the {bytes} bytes announced"));
    }
    Ok(out)
}

/// Reads the sessions of a line: its list, its `bytes` and the raw bytes that followed it
/// (checked as [`listed`] says; `raw` is `bytes` long).
pub fn from_wire(list: Vec<WireSession>, bytes: u64, raw: &[u8], version: Version, max: usize) -> Result<Vec<Session>, String> {
    if u64::try_from(raw.len()).ok() != Some(bytes) {
        return Err(format!("{} raw bytes followed a line announcing {bytes}", raw.len()));
    }
    let mut at = 0usize;
    let sessions = listed(list, bytes, version, max)?
        .into_iter()
        .map(|(client, l)| match l {
            Listed::Blob(blob) => Session { client, blob },
            Listed::Len(len) => {
                // In bounds: the lengths add up to `bytes`, which is `raw`'s length.
                let blob = raw[at..at + len].to_vec();
                at += len;
                Session { client, blob }
            }
        })
        .collect();
    Ok(sessions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sessions_travel_in_both_versions() {
        let s = [(a("198.18.1.5"), &b"abcd"[..]), (a("2001:db8::5"), b"hello")];
        for v in [Version::V1, Version::V2] {
            let (list, bytes) = to_wire(s.iter().copied(), v);
            let raw: Vec<u8> = raw_parts(s.iter().map(|s| s.1), v).concat();
            let back = from_wire(list, bytes, &raw, v, 5).unwrap();
            assert_eq!(back.iter().map(|s| (s.client, s.blob.as_slice())).collect::<Vec<_>>(), s, "{v:?}");
        }
        let (list, bytes) = to_wire(s.iter().copied(), Version::V2);
        assert_eq!((list[1].len, bytes), (Some(5), 9));
        assert_eq!(lengths_to_wire(s.iter().map(|(c, b)| (*c, b.len() as u64))), (list, bytes), "the same list from the lengths alone");
        assert_eq!(to_wire(s.iter().copied(), Version::V1).0[0].blob.as_deref(), Some("YWJjZA=="));
    }

    #[test]
    fn the_streamed_list_is_the_same_json_as_the_built_one() {
        let owned = vec![(a("198.18.1.5"), b"abcd".to_vec()), (a("2001:db8::5"), vec![0xff; 70_000]), (a("198.18.1.6"), Vec::new())];
        for v in [Version::V1, Version::V2] {
            let (list, bytes) = to_wire(owned.iter().map(|(c, b)| (*c, b.as_slice())), v);
            let streamed = WireList { sessions: &owned, version: v };
            assert_eq!(serde_json::to_string(&streamed).unwrap(), serde_json::to_string(&list).unwrap(), "{v:?}");
            assert_eq!(streamed.bytes(), bytes, "{v:?}");
        }
    }

    #[test]
    fn what_does_not_add_up_is_refused() {
        let w = |c: &str, blob: Option<&str>, len: Option<u64>| WireSession { client: c.into(), blob: blob.map(Into::into), len };
        let err = |list, bytes, raw: &[u8], v| from_wire(list, bytes, raw, v, 4).unwrap_err();
        assert!(err(vec![w("198.18.1.5", None, Some(3))], 4, b"abcd", Version::V2).contains("add up to 3, not the 4"));
        assert!(err(vec![w("198.18.1.5", None, Some(5))], 5, b"abcde", Version::V2).contains("over the limit"));
        assert!(err(vec![w("198.18.1.5", None, Some(4)), w("198.18.1.6", None, Some(1))], 4, b"abcd", Version::V2).contains("more than the 4"));
        assert!(err(vec![w("198.18.1.5", None, None)], 0, b"", Version::V2).contains("lacks"));
        assert!(err(vec![], 3, b"ab", Version::V2).contains("2 raw bytes followed a line announcing 3"));
        assert!(err(vec![w("", Some("eA=="), None)], 0, b"", Version::V1).contains("lacks a client"));
        assert!(err(vec![w("nobody", Some("eA=="), None)], 0, b"", Version::V1).contains("not an address"));
        assert!(err(vec![w("198.18.1.5", Some("%%"), None)], 0, b"", Version::V1).contains("not base64"));
        assert!(err(vec![w("198.18.1.5", Some("eHl6eHl6eHl6"), None)], 0, b"", Version::V1).contains("over the limit"));
        assert!(err(vec![w("198.18.1.5", Some("eHl6eHk="), None)], 0, b"", Version::V1).contains("5 bytes, over the limit"));
    }
}
