//! What the classifiers do with a packet, and why a packet could not be handled normally.

use aya_ebpf::bindings::TC_ACT_SHOT;
use redirector_common::Counter;

/// Leaves the packet to the next program in the TCX chain (then the stack): redirector only
/// ends the chain for packets it owns (forwarded or dropped).
pub const TCX_NEXT: i32 = -1;
/// `TC_ACT_REDIRECT`: what `bpf_redirect_neigh` returns when it will send the packet.
pub const TC_ACT_REDIRECT: i32 = 7;

/// What the classifier does with a packet, and which counter says so.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: i32,
    pub counter: Counter,
}

pub const fn pass(counter: Counter) -> Verdict {
    Verdict { action: TCX_NEXT, counter }
}

pub const fn drop(counter: Counter) -> Verdict {
    Verdict { action: TC_ACT_SHOT, counter }
}

/// Why a packet could not be handled normally; each maps to a verdict.
#[derive(Clone, Copy)]
pub enum Error {
    /// Shorter than its headers claim: pass untouched.
    Truncated,
    /// Tunnelled packet that must not be delivered.
    BadTunnel,
    /// Tunnelled packet from a sibling for something not adopted here.
    NotAdopted,
    /// Tunnelled packet from a sibling whose inner source is this node's, a sibling's or
    /// loopback.
    Spoofed,
    /// Encapsulation failed before the packet was changed: keep it here.
    ForwardKept,
    /// Encapsulation or redirect failed after the packet was changed: drop.
    ForwardLost,
}

impl Error {
    pub const fn verdict(self) -> Verdict {
        match self {
            Error::Truncated => pass(Counter::PassedMalformed),
            Error::BadTunnel => drop(Counter::DroppedBad),
            Error::NotAdopted => drop(Counter::DroppedNotAdopted),
            Error::Spoofed => drop(Counter::DroppedSpoofed),
            Error::ForwardKept => pass(Counter::ErrorForward),
            Error::ForwardLost => drop(Counter::ErrorForward),
        }
    }

    /// Whether the kernel reports it in the agent's log ([`crate::report`]): every error but a
    /// truncated packet, which is the sender's problem, not this host's.
    pub const fn reported(self) -> bool {
        !matches!(self, Error::Truncated)
    }
}
