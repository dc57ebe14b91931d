//! The pinned instance the datapath commands work on: opening it (as root, in the asked
//! network namespace), and the commands on the instance as a whole (`stats`, `load`,
//! `attach`, `teardown`).

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::{Global, render::Report};
use crate::datapath::{self, Datapath, Location};

/// Checks that we may change the datapath, enters the namespace and says which instance.
fn location(global: &Global) -> anyhow::Result<Location> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("{}", datapath::Error::NotRoot);
    }
    if let Some(ns) = &global.netns {
        super::enter_netns(ns)?;
    }
    Ok(Location { bpffs: global.bpffs.clone().unwrap_or_else(|| PathBuf::from(datapath::DEFAULT_BPFFS)), instance: global.instance.clone().unwrap_or_else(|| "default".into()) })
}

/// Opens the instance, which must exist: only the set-up commands create one ([`create`]), so
/// a typo never leaves pins and programs behind.
pub(super) fn existing(global: &Global) -> anyhow::Result<Datapath> {
    Ok(Datapath::open_existing(&location(global)?)?)
}

/// Opens the instance for a set-up command, creating it if needed once its interface `dev`
/// is known to exist.
pub(super) fn create(global: &Global, dev: Option<&str>) -> anyhow::Result<Datapath> {
    let loc = location(global)?;
    if let Some(dev) = dev {
        datapath::interface_index(dev)?;
    }
    Ok(Datapath::open(&loc)?)
}

/// `stats`: the per-decision counters.
pub(super) fn stats(global: &Global) -> anyhow::Result<Report> {
    Ok(Report::Stats(existing(global)?.stats()?))
}

/// `load`: established connections per client, counting for `cgroup` first if given.
pub(super) fn load(global: &Global, cgroup: Option<&Path>) -> anyhow::Result<Report> {
    let mut dp = match cgroup {
        Some(cg) => {
            let mut dp = create(global, None)?;
            dp.attach_load(cg)?;
            dp
        }
        None => existing(global)?,
    };
    Ok(Report::Load(dp.load()?))
}

/// `attach`: loads and attaches the programs on `dev`; `replace` swaps in this binary's.
pub(super) fn attach(global: &Global, dev: &str, replace: bool) -> anyhow::Result<Report> {
    let mut dp = create(global, Some(dev))?;
    dp.attach_ingress(dev, false)?;
    if replace {
        return Ok(Report::Replaced(dp.upgrade()?));
    }
    Ok(Report::Done)
}

/// `teardown`: everything out; `force` only removes the pins, without reading the maps.
pub(super) fn teardown(global: &Global, force: bool) -> anyhow::Result<Report> {
    if force {
        datapath::remove_instance(&location(global)?)?;
    } else {
        existing(global)?.teardown()?;
    }
    Ok(Report::Done)
}
