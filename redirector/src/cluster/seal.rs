//! Every membership datagram is authenticated: an HMAC-SHA256 tag keyed by the cluster's gossip
//! key (made by the member that started the cluster, and handed over mutual TLS to a node that
//! joins, so only holders of a certificate of the cluster CA have it). A datagram that fails
//! the check is dropped before any of it is decoded.
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
pub struct Key {
    hmac: hmac::Key,
    bytes: Vec<u8>,
}

/// A key's length: what [`Key::generate`] makes and the least [`Key::from_bytes`] takes.
pub const KEY_LEN: usize = 32;

impl Key {
    /// Key bytes: 32 or more (HMAC-SHA256's block is 64; a shorter key is weaker).
    #[must_use]
    pub fn new(bytes: &[u8]) -> Self {
        Self { hmac: hmac::Key::new(hmac::HMAC_SHA256, bytes), bytes: bytes.to_vec() }
    }

    /// A key received or read back: refused if shorter than [`KEY_LEN`].
    ///
    /// # Errors
    /// The key is too short.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < KEY_LEN {
            return Err(format!("a gossip key has at least {KEY_LEN} bytes, this one {}", bytes.len()));
        }
        Ok(Self::new(bytes))
    }

    /// A new random key, for a cluster that starts.
    ///
    /// # Errors
    /// The system's random source failed.
    pub fn generate() -> Result<Self, String> {
        let mut bytes = [0u8; KEY_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| "the system's random source failed".to_string())?;
        Ok(Self::new(&bytes))
    }

    /// The key's bytes, to hand over to a member that joins, or keep.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Seals `body` as a datagram of `kind`.
#[must_use]
pub fn seal(key: &Key, kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OVERHEAD + body.len());
    out.extend_from_slice(&[VERSION, kind as u8]);
    out.extend_from_slice(body);
    let tag = hmac::sign(&key.hmac, &out);
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
    hmac::verify(&key.hmac, signed, tag).ok()?;
    Some((kind, &signed[2..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_key_is_random_and_a_short_one_is_refused() {
        let (k1, k2) = (Key::generate().unwrap(), Key::generate().unwrap());
        assert_eq!(k1.bytes().len(), KEY_LEN);
        assert_ne!(k1.bytes(), k2.bytes(), "two clusters never share a key by chance");
        let again = Key::from_bytes(k1.bytes()).unwrap();
        assert_eq!(open(&again, &seal(&k1, Kind::Load, b"x")), Some((Kind::Load, &b"x"[..])), "the key as handed over works");
        assert!(Key::from_bytes(&[1; KEY_LEN - 1]).is_err());
    }

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
