//! `doctor`: whether this host has what the agent needs ([`crate::doctor`]), with the
//! configuration's own requirements when given one.

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::{Global, render::Report};
use crate::{config::Config, doctor, doctor::Check};

/// Runs the checks. An invalid configuration is one failed check (its problems listed); the
/// host's checks still run.
pub(super) fn execute(config: Option<&Path>, global: &Global) -> anyhow::Result<Report> {
    let mut checks: Vec<Check> = Vec::new();
    let valid = match config {
        None => None,
        Some(path) => match Config::load(path)?.validate() {
            Ok(v) => Some(v),
            Err(invalid) => {
                checks.push(Check::fail("configuration", invalid.problems.join("; "), format!("redirector config check {}", path.display())));
                None
            }
        },
    };
    checks.extend(doctor::host(valid.as_ref()));
    // --netns, else the configuration's namespace, as the agent enters it.
    if let Some(ns) = global.netns.clone().or_else(|| valid.as_ref().and_then(|v| v.netns.clone())) {
        super::enter_netns(&ns)?;
    }
    let bpffs: PathBuf = global.bpffs.clone().or_else(|| valid.as_ref().map(|v| v.bpffs.clone())).unwrap_or_else(|| crate::datapath::DEFAULT_BPFFS.into());
    checks.extend(doctor::run(&bpffs, valid.as_ref()));
    Ok(Report::Doctor(checks))
}

/// The error that makes `doctor` exit 1 when a check failed (after the report is printed).
pub(super) fn verdict(checks: &[Check]) -> anyhow::Result<()> {
    let failed = checks.iter().filter(|c| c.outcome == doctor::Outcome::Fail).count();
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}
