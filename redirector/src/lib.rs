//! redirector: servers that share load among themselves.
pub mod cli;
pub mod datapath;
