//! Every membership datagram is authenticated: an HMAC-SHA256 tag keyed by the cluster's gossip
//! key (meant for holders of a certificate of the cluster CA only, handed over mutual TLS when
//! they join: not built yet, the caller passes the key). A datagram that fails the check is
//! dropped before any of it is decoded.
//!
//! Layout: version (1 byte), kind (1 byte), body, tag (32 bytes). The tag covers everything
//! before it, so a datagram is checked where it lies, without a copy.

use ring::hmac;

/// The layout's version: a node never accepts a layout it does not know.
pub const VERSION: u8 = 1;
/// Bytes a seal adds to a body.
pub const OVERHEAD: usize = 2 + TAG;
const TAG: usize = 32;

/// What a datagram carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A SWIM message (foca's encoding).
    Swim = 1,
    /// A member's load record, sent straight to a member that just came up.
    Load = 2,
}

/// The cluster's gossip key.
#[derive(Clone)]
pub struct Key(hmac::Key);

impl Key {
    /// Key bytes: 32 or more (HMAC-SHA256's block is 64; a shorter key is weaker).
    #[must_use]
    pub fn new(bytes: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }
}

/// Seals `body` as a datagram of `kind`.
#[must_use]
pub fn seal(key: &Key, kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OVERHEAD + body.len());
    out.extend_from_slice(&[VERSION, kind as u8]);
    out.extend_from_slice(body);
    let tag = hmac::sign(&key.0, &out);
    out.extend_from_slice(tag.as_ref());
    out
}

/// The kind and body of an authentic datagram; `None` for anything else (another key, another
/// version, an unknown kind, a truncated or altered datagram).
#[must_use]
pub fn open<'a>(key: &Key, datagram: &'a [u8]) -> Option<(Kind, &'a [u8])> {
    if datagram.len() < OVERHEAD || datagram[0] != VERSION {
        return None;
    }
    let kind = match datagram[1] {
        1 => Kind::Swim,
        2 => Kind::Load,
        _ => return None,
    };
    let (signed, tag) = datagram.split_at(datagram.len() - TAG);
    hmac::verify(&key.0, signed, tag).ok()?;
    Some((kind, &signed[2..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unaltered_datagram_under_the_same_key_opens() {
        let key = Key::new(&[7; 32]);
        let d = seal(&key, Kind::Swim, b"ping");
        assert_eq!(open(&key, &d), Some((Kind::Swim, &b"ping"[..])));
        assert_eq!(open(&Key::new(&[8; 32]), &d), None, "another cluster's key");
        for i in 0..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 1;
            assert_eq!(open(&key, &bad), None, "byte {i} altered");
        }
        assert_eq!(open(&key, &d[..d.len() - 1]), None, "truncated");
        assert_eq!(open(&key, &d[..OVERHEAD - 1]), None, "shorter than a seal");
        let load = seal(&key, Kind::Load, b"");
        assert_eq!(open(&key, &load), Some((Kind::Load, &b""[..])));
    }
}
