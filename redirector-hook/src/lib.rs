//! The application hook protocol, defined once for both ends: the agent (`redirector::app`)
//! and the Rust SDK (`redirector-sdk`) use these types; the Node.js SDK implements the same
//! page (docs/app-protocol.md) and replays the same transcripts (`transcripts/*.jsonl`).
//!
//! - [`msg`]: every message, typed and tagged by `op` (requests and answers).
//! - [`frame`]: how a message is written and read: one JSON line, followed in version 2 by
//!   the raw bytes its `bytes` field announces (session blobs, not base64).
//! - [`session`]: a client's session and how a list of them travels in each version.
//! - [`register`]: the register line and the agent's rules for it.
//! - [`fds`]: descriptors passed with a line (version 3: open connections).
//! - [`transcript`]: the shared transcripts, for tests of every implementation.

pub mod client;
pub mod fds;
pub mod frame;
pub mod msg;
pub mod register;
pub mod session;
pub mod transcript;

pub use client::parse_client;
pub use msg::{AgentMsg, Answer, Role};
pub use session::Session;

/// The hook protocol versions there are. An application registers with one; the connection
/// speaks it in both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// JSON lines; session blobs in base64 inside them.
    V1 = 1,
    /// As version 1, but session blobs travel as raw bytes after their JSON line.
    V2 = 2,
    /// As version 2, and open TCP connections move with their sessions: their descriptors
    /// pass with a line (`SCM_RIGHTS`), each with a blob among the raw bytes.
    V3 = 3,
}

impl Version {
    /// The newest version, which the SDKs try first.
    pub const NEWEST: Self = Self::V3;

    /// The version numbered `n`, if there is one.
    #[must_use]
    pub fn from_number(n: u64) -> Option<Self> {
        match n {
            1 => Some(Self::V1),
            2 => Some(Self::V2),
            3 => Some(Self::V3),
            _ => None,
        }
    }

    #[must_use]
    pub fn number(self) -> u64 {
        self as u64
    }

    /// Whether blobs travel as raw bytes after their line (version 2 and later).
    #[must_use]
    pub fn raw_blobs(self) -> bool {
        self >= Self::V2
    }

    /// Whether open connections move with their sessions (version 3 and later).
    #[must_use]
    pub fn moves_connections(self) -> bool {
        self >= Self::V3
    }
}
