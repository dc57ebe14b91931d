//! redirector: servers that share load among themselves.
pub mod admin;
pub mod agent;
pub mod app;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod datapath;
pub mod doctor;
pub mod metrics;
pub mod peer;
pub mod plane;
pub mod probe;
pub mod repair;
pub mod sock;
pub mod sockopt;
pub mod tunnel;
