//! Membership of a large cluster by gossip: SWIM (the `foca` crate) over UDP, every datagram
//! authenticated with the cluster's gossip key; each member's load carried by the gossip, so
//! that an overloaded member asks a few members with room rather than all of them.

mod loads;
mod member;
mod node;
pub mod sample;
pub mod seal;

pub use self::{
    loads::LoadRecord,
    member::Member,
    node::{Event, Gossip, SUSPICION, Settings, Traffic, swim_config},
};

#[cfg(test)]
mod tests;
