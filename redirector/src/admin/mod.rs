//! The admin channel: a Unix socket (mode 0600) on which operators, scripts and tests ask the
//! running agent for its status and to move clients. One request line, one answer line, both
//! JSON; the types of both ends are defined once, in [`api`].
//!
//! The binary starts the server ([`serve`]) next to the agent; the agent does not know who
//! watches it.

pub mod api;
mod client;
mod server;

pub use client::{ask, drain, give_back, move_clients, move_clients_to, probe, status};
pub use server::serve;
