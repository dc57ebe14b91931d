//! How nodes and hand-overs are named: on the wire, in records on disk and to applications.

use std::{borrow::Borrow, fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// A node's name: the name in its certificate, `node` or a `[[sibling]]` name in the
/// configuration (see [`crate::config::check_name`]). Serialized as the bare string, so the
/// wire and the records keep their encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeName(String);

impl NodeName {
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeName {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl From<String> for NodeName {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl Borrow<str> for NodeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A node name reads as its string wherever one is expected (logs, `&str` parameters).
impl std::ops::Deref for NodeName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for NodeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for NodeName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for NodeName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A hand-over: its origin, the origin's id for it (unique across the origin's restarts) and
/// its volunteer. Applications see it as `ORIGIN/ID/VOLUNTEER` (node names never contain
/// '/'); that text is in their records, so it never changes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HandoffId {
    pub origin: NodeName,
    pub id: u64,
    pub volunteer: NodeName,
}

impl HandoffId {
    #[must_use]
    pub fn new(origin: impl Into<NodeName>, id: u64, volunteer: impl Into<NodeName>) -> Self {
        Self { origin: origin.into(), id, volunteer: volunteer.into() }
    }
}

impl fmt::Display for HandoffId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.origin, self.id, self.volunteer)
    }
}

/// A text that is not `ORIGIN/ID/VOLUNTEER`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a hand-over name (ORIGIN/ID/VOLUNTEER)")]
pub struct NotAHandoff(String);

impl FromStr for HandoffId {
    type Err = NotAHandoff;

    fn from_str(h: &str) -> Result<Self, Self::Err> {
        let bad = || NotAHandoff(h.to_string());
        let mut it = h.split('/');
        let (o, id, v) = (it.next().ok_or_else(bad)?, it.next().and_then(|i| i.parse().ok()).ok_or_else(bad)?, it.next().ok_or_else(bad)?);
        if it.next().is_some() || o.is_empty() || v.is_empty() {
            return Err(bad());
        }
        Ok(Self::new(o, id, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_over_names_carry_origin_id_and_volunteer() {
        let h = HandoffId::new("node-1", 12345, "b").to_string();
        assert_eq!(h, "node-1/12345/b");
        assert_eq!(h.parse::<HandoffId>().ok(), Some(HandoffId::new("node-1", 12345, "b")));
        for bad in ["a-1-b", "a/x/b", "a/1", "a/1/b/c", "/1/b", "a/1/"] {
            assert_eq!(bad.parse::<HandoffId>().ok(), None, "{bad}");
        }
    }

    /// A node name is its bare string on the wire and in records.
    #[test]
    fn a_node_name_serializes_as_its_string() {
        assert_eq!(postcard::to_stdvec(&NodeName::from("b")).unwrap(), postcard::to_stdvec("b").unwrap());
        assert_eq!(serde_json::to_string(&NodeName::from("b")).unwrap(), "\"b\"");
    }
}
