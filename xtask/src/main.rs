//! `cargo xtask`: the project's own set-up and workflows.
//!
//! Every command runs `setup` first, so a fresh machine needs nothing but this repository, the
//! machine's Rust toolchains (stable and nightly) and root.

mod checks;
mod fuzz;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "redirector's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building needs (nightly rust-src, bpf-linker) and check the kernel.
    Setup,
    /// Build the workspace (the eBPF object is built and embedded by redirector/build.rs).
    Build {
        /// Release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run the whole test suite (as root): unit, classifier and network-namespace tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build and run the redirector binary with ARGS.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build a namespace topology and show steering happen.
    Demo {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Fuzz the decoders of the agent's inputs (fuzz/: peer frames, hook lines, admin
    /// requests, configuration, packet decisions), each for SECS seconds.
    Fuzz {
        /// One target (default: all).
        target: Option<String>,
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// Benchmarks: `cargo xtask bench datapath|negotiate|handoff|migrate|scale|xdp|compare|cluster [--json]`.
    Bench {
        /// Which benchmark.
        which: String,
        /// Arguments for the benchmark (e.g. --json).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf()
}

/// `cargo` with PATH including ~/.cargo/bin (bpf-linker lives there).
fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root()).env("PATH", setup::path_with_cargo_bin());
    if on_ci() {
        // CI builds a fresh clone once: incremental caches would only take disk (2 GB of the
        // 11 GB a run took), and a CI machine once ran out of it.
        c.env("CARGO_INCREMENTAL", "0");
    }
    c
}

/// Whether this runs on CI (`CI` set, as `.ci/run` has it): a fresh clone, built once.
fn on_ci() -> bool {
    std::env::var_os("CI").is_some()
}

fn run(mut c: Command, what: &str) -> Result<()> {
    let status = c.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (eBPF programs, network namespaces, bpffs): run it with sudo or as root");
    }
    Ok(())
}

/// Seconds each fuzz target runs in `cargo xtask test` (longer runs: `cargo xtask fuzz`).
const FUZZ_SECS_IN_TESTS: u64 = 10;

/// The cargo feature the tests' agent is built with: faults a test can inject.
const TEST_FAULTS: &str = "redirector/test-faults";

fn build(release: bool, features: &[&str]) -> Result<()> {
    let mut c = cargo();
    // The eBPF crate builds only for the BPF target (through redirector/build.rs).
    c.args(["build", "--workspace", "--exclude", "redirector-ebpf", "--bins"]);
    for f in features {
        c.args(["--features", f]);
    }
    if release {
        c.arg("--release");
    }
    run(c, "cargo build")
}

fn bin_path(release: bool) -> PathBuf {
    root().join("target").join(if release { "release" } else { "debug" }).join("redirector")
}

fn test(args: &[String]) -> Result<()> {
    require_root("cargo xtask test")?;
    checks::run_all()?;
    node_sdk_tests()?;
    // Every decoder, briefly: a crash found here fails the run.
    fuzz::run(None, FUZZ_SECS_IN_TESTS)?;
    if on_ci() {
        // Its instrumented build (1.5 GB) is not used again on a fresh clone: room for the tests'.
        fuzz::remove_build()?;
    }
    build(false, &[TEST_FAULTS])?;
    // Tests that cannot run say so in this file (libtest hides a passing test's output).
    let skip_log = std::env::temp_dir().join(format!("redirector-skips-{}", std::process::id()));
    let _ = std::fs::remove_file(&skip_log);
    let mut c = cargo();
    // The same features as the build above, or this would build the agent again without them.
    c.args(["test", "--workspace", "--exclude", "redirector-ebpf", "--no-fail-fast", "--features", TEST_FAULTS])
        .args(args)
        .env("REDIRECTOR_BIN", bin_path(false))
        .env("REDIRECTOR_SKIP_LOG", &skip_log);
    let status = c.status().context("starting cargo test")?;
    let skipped: Vec<String> = std::fs::read_to_string(&skip_log).map(|s| s.lines().map(str::to_string).collect()).unwrap_or_default();
    let _ = std::fs::remove_file(&skip_log);
    if !skipped.is_empty() {
        println!("{} test(s) skipped:\n  {}", skipped.len(), skipped.join("\n  "));
    }
    if !status.success() {
        bail!("tests failed ({status})");
    }
    if !skipped.is_empty() && on_ci() {
        bail!("{} test(s) skipped on CI, where every test must run", skipped.len());
    }
    Ok(())
}

/// The Node.js SDK's tests, with Node's own test runner (no packages to install).
fn node_sdk_tests() -> Result<()> {
    let mut c = Command::new("node");
    c.arg("--test").current_dir(root().join("redirector-sdk-node"));
    match c.status() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("`node` (Node.js 20 or newer) is not installed: the Node.js SDK's tests (redirector-sdk-node) and the Node.js demo's need it")
        }
        Err(e) => Err(e).context("starting `node --test` in redirector-sdk-node"),
        Ok(status) if !status.success() => bail!("the Node.js SDK's tests (node --test in redirector-sdk-node) failed ({status})"),
        Ok(_) => Ok(()),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let quiet = !matches!(cli.command, Cmd::Setup);
    setup::setup(quiet)?;
    match cli.command {
        Cmd::Setup => Ok(()),
        Cmd::Build { release } => build(release, &[]),
        Cmd::Test { args } => test(&args),
        Cmd::Fuzz { target, secs } => fuzz::run(target.as_deref(), secs),
        Cmd::Run { args } => {
            build(false, &[])?;
            let mut c = Command::new(bin_path(false));
            c.args(&args);
            run(c, "redirector")
        }
        Cmd::Demo { args } => {
            require_root("cargo xtask demo")?;
            build(false, &[])?;
            let mut c = cargo();
            c.args(["run", "--quiet", "-p", "redirector-tests", "--bin", "redirector-demo", "--"]).args(&args).env("REDIRECTOR_BIN", bin_path(false));
            run(c, "the demo")
        }
        Cmd::Bench { which, args } => {
            require_root("cargo xtask bench")?;
            match which.as_str() {
                "datapath" | "negotiate" | "handoff" | "migrate" | "scale" | "xdp" | "cluster" => {}
                // The load generator, the proxy it is compared with, and the plot's font.
                "compare" => setup::ensure_debs(&[("wrk", "wrk"), ("haproxy", "haproxy"), ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "fonts-dejavu-core")])?,
                other => bail!("unknown benchmark {other:?}: try `cargo xtask bench datapath`, `negotiate`, `handoff`, `migrate`, `scale`, `xdp`, `cluster` or `compare`"),
            }
            build(true, &[])?;
            let mut c = cargo();
            c.args(["run", "--quiet", "--release", "-p", "redirector-tests", "--bin", "redirector-bench", "--", &which]).args(&args).env("REDIRECTOR_BIN", bin_path(true));
            run(c, "the benchmark")
        }
    }
}
