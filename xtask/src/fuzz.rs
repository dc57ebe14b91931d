//! `cargo xtask fuzz [TARGET] [--secs N]`: the coverage-guided fuzz targets in `fuzz/`
//! (cargo-fuzz, libFuzzer, on the machine's nightly), each for N seconds. Seeds that are worth
//! keeping (valid inputs, and every crash once fixed) live in `fuzz/seeds/TARGET` and are
//! read on every run; what libFuzzer finds meanwhile goes to `fuzz/corpus/TARGET` (not kept).

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{root, setup};

/// Every fuzz target, one per decoder of the agent's inputs.
pub const TARGETS: [&str; 5] = ["peer_frame", "hook_line", "admin_request", "config", "packet_decisions"];

/// cargo-fuzz, installed on first use (it builds in about a minute).
fn ensure_cargo_fuzz() -> Result<()> {
    let works = || Command::new("cargo").args(["fuzz", "--version"]).env("PATH", setup::path_with_cargo_bin()).output().is_ok_and(|o| o.status.success());
    if works() {
        return Ok(());
    }
    println!("fuzz: installing cargo-fuzz (about a minute)");
    let status =
        Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]).env("PATH", setup::path_with_cargo_bin()).status().context("running cargo install cargo-fuzz")?;
    if !status.success() || !works() {
        bail!("cargo install cargo-fuzz failed");
    }
    Ok(())
}

/// Runs `targets` (all when `None`) for `secs` seconds each; fails on the first crash, naming
/// the input that caused it.
pub fn run(target: Option<&str>, secs: u64) -> Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("unknown fuzz target {t:?}: one of {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    ensure_cargo_fuzz()?;
    let fuzz = root().join("fuzz");
    for t in targets {
        let corpus = fuzz.join("corpus").join(t);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = fuzz.join("seeds").join(t);
        let mut c = Command::new("rustup");
        // The machine's nightly as it is (libFuzzer's instrumentation needs nightly flags);
        // no sanitizer: the decoders are safe Rust, and a panic is what is looked for.
        c.args(["run", "nightly", "cargo", "fuzz", "run", "--sanitizer", "none", t]).arg(&corpus);
        // (A target may have no seeds: git keeps no empty folder.)
        if seeds.is_dir() {
            c.arg(&seeds);
        }
        c.args(["--", &format!("-max_total_time={secs}"), "-print_final_stats=1"]).current_dir(root()).env("PATH", setup::path_with_cargo_bin());
        for v in ["RUSTUP_TOOLCHAIN", "CARGO", "RUSTC", "RUSTDOC"] {
            c.env_remove(v);
        }
        println!("fuzz: {t} for {secs} s");
        let status = c.status().context("starting cargo fuzz")?;
        if !status.success() {
            bail!(
                "cargo fuzz run {t} failed ({status}); if it found a crash, the input is in fuzz/artifacts/{t}: fix it, copy the input to fuzz/seeds/{t} and add a regression test"
            );
        }
    }
    Ok(())
}

/// Removes the fuzz targets' build (`fuzz/target`); the corpus and seeds stay.
pub fn remove_build() -> Result<()> {
    let dir = root().join("fuzz").join("target");
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("removing {}", dir.display())),
        _ => Ok(()),
    }
}
