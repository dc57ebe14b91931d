//! The code checks `cargo xtask test` runs before the tests: formatting (nightly rustfmt with
//! the project's `rustfmt.toml`) and clippy with warnings denied, for the workspace and for the
//! eBPF crate (which builds for its own target with the nightly toolchain).

use std::process::Command;

use anyhow::Result;

use crate::{cargo, root, run, setup};

/// `cargo` of the nightly toolchain (through rustup), from the workspace's root.
fn nightly_cargo() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo"]).current_dir(root()).env("PATH", setup::path_with_cargo_bin());
    // Cargo started by xtask would otherwise pass its own toolchain down.
    c.env_remove("RUSTUP_TOOLCHAIN").env_remove("CARGO").env_remove("RUSTC");
    c
}

pub fn run_all() -> Result<()> {
    let mut fmt = nightly_cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run(fmt, "cargo fmt --check (run `cargo +nightly fmt --all` to fix)")?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--exclude", "redirector-ebpf", "--all-targets", "--", "-D", "warnings"]);
    run(clippy, "cargo clippy (workspace)")?;
    let mut ebpf = nightly_cargo();
    // Its own target folder: a bpfel build must not invalidate the host's.
    ebpf.current_dir(root().join("redirector-ebpf"))
        .args(["clippy", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core", "--target-dir"])
        .arg(root().join("target/ebpf-clippy"))
        .args(["--", "-D", "warnings"]);
    run(ebpf, "cargo clippy (redirector-ebpf)")
}
