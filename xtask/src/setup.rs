//! `cargo xtask setup`: idempotent bootstrap of the eBPF toolchain and kernel checks.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(|| home().join(".cargo"), PathBuf::from).join("bin")
}

/// PATH with cargo's bin folder first, so freshly installed tools are found.
pub fn path_with_cargo_bin() -> OsString {
    let mut parts = vec![cargo_bin()];
    if let Some(p) = std::env::var_os("PATH") {
        parts.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(parts).unwrap_or_default()
}

/// Where the libLLVM symlinks for bpf-linker live. Its path is baked into bpf-linker's
/// RUNPATH, so it must persist (never a temporary folder).
fn llvm_prefix() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME").map_or_else(|| home().join(".local/share"), PathBuf::from).join("redirector/llvm")
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).env("PATH", path_with_cargo_bin()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn say(quiet: bool, msg: &str) {
    if !quiet {
        println!("setup: {msg}");
    }
}

fn ensure_nightly(quiet: bool) -> Result<()> {
    let list = output("rustup", &["toolchain", "list"]).context("running rustup (is Rust installed with rustup?)")?;
    if !list.lines().any(|l| l.starts_with("nightly")) {
        bail!("no nightly toolchain: the eBPF programs need the machine's nightly (rustup toolchain list shows none)");
    }
    // rust-src builds the eBPF programs; rustfmt and clippy check the code (`cargo xtask test`).
    ensure_components(Some("nightly"), &["rust-src", "rustfmt", "clippy"], quiet)?;
    // The workspace's clippy runs on the toolchain that builds it.
    ensure_components(None, &["clippy"], quiet)
}

/// Installs what of `components` `toolchain` (the active one if `None`) lacks.
fn ensure_components(toolchain: Option<&str>, components: &[&str], quiet: bool) -> Result<()> {
    let on: Vec<&str> = toolchain.map(|t| vec!["--toolchain", t]).unwrap_or_default();
    let name = toolchain.unwrap_or("the active toolchain");
    let installed = output("rustup", &[&["component", "list", "--installed"], on.as_slice()].concat()).unwrap_or_default();
    for component in components {
        if installed.lines().any(|l| l.starts_with(component)) {
            say(quiet, &format!("{name} {component}: present"));
            continue;
        }
        println!("setup: installing {component} for {name}");
        let status = Command::new("rustup").args(["component", "add", component]).args(&on).status().context("running rustup component add")?;
        if !status.success() {
            bail!("rustup component add {component} for {name} failed");
        }
    }
    Ok(())
}

fn bpf_linker_works() -> bool {
    output("bpf-linker", &["--version"]).is_some()
}

fn ensure_bpf_linker(quiet: bool) -> Result<()> {
    if bpf_linker_works() {
        say(quiet, "bpf-linker: present");
        return Ok(());
    }
    // bpf-linker needs LLVM 22; the nightly toolchain ships it as a shared library.
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"]).context("asking nightly rustc for its sysroot")?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let lib = fs::read_dir(&lib_dir)
        .with_context(|| format!("listing {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so.22.1-rust-")))
        .with_context(|| format!("no libLLVM.so.22.1-rust-* in {}: bpf-linker needs the nightly toolchain's LLVM 22", lib_dir.display()))?;
    let prefix = llvm_prefix();
    let plib = prefix.join("lib");
    fs::create_dir_all(&plib).with_context(|| format!("creating {}", plib.display()))?;
    let own_name = plib.join(lib.file_name().expect("file name"));
    for link in [plib.join("libLLVM.so"), own_name] {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link).with_context(|| format!("linking {} -> {}", link.display(), lib.display()))?;
    }
    println!("setup: installing bpf-linker against {} (about a minute)", lib.display());
    let status = Command::new("cargo")
        .args(["install", "bpf-linker", "--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", &prefix)
        .env("PATH", path_with_cargo_bin())
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed");
    }
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but `bpf-linker --version` does not run");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Checks a kernel feature by mounting a filesystem of `fstype` on a temporary folder.
fn can_mount(fstype: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("redirector-setup-{fstype}-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, ty) = (c(fstype), c(&dir.to_string_lossy()), c(fstype));
    // SAFETY: valid C strings; the mount is removed right after.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    let res = if rc == 0 {
        // SAFETY: unmounting what was just mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    };
    let _ = fs::remove_dir(&dir);
    res
}

/// Whether the `bpf()` syscall works: creates a one-entry array map.
fn bpf_syscall() -> Result<(), String> {
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 8;
    attr[3] = 1;
    // SAFETY: attr is a valid, zero-padded bpf_attr.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: closing the map we created.
    unsafe { libc::close(i32::try_from(fd).unwrap_or(-1)) };
    Ok(())
}

fn check_kernel(quiet: bool) -> Result<()> {
    if !is_root() {
        say(quiet, "kernel checks skipped: not root (tests, demo and the agent need root)");
        return Ok(());
    }
    let mut missing = Vec::new();
    for (name, res) in [
        ("bpf() syscall", bpf_syscall()),
        ("bpffs mountable", can_mount("bpf")),
        ("cgroup v2 mountable", can_mount("cgroup2")),
        ("iproute2 (ip)", output("ip", &["-V"]).map(|_| ()).ok_or_else(|| "ip not found".to_string())),
    ] {
        match res {
            Ok(()) => say(quiet, &format!("{name}: ok")),
            Err(e) => missing.push(format!("{name}: MISSING ({e})")),
        }
    }
    if !missing.is_empty() {
        bail!("kernel features missing:\n  {}", missing.join("\n  "));
    }
    Ok(())
}

/// Installs Debian packages a command needs, when what they provide is missing: a program on
/// the `PATH`, or a file named by its absolute path.
pub fn ensure_debs(programs_and_packages: &[(&str, &str)]) -> Result<()> {
    let present = |what: &str| if what.starts_with('/') { std::path::Path::new(what).exists() } else { output("which", &[what]).is_some() };
    let missing: Vec<&str> = programs_and_packages.iter().filter(|(what, _)| !present(what)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" "));
    let install = |pkgs: &[&str]| {
        Command::new("apt-get").args(["install", "-y", "--no-install-recommends"]).args(pkgs).env("DEBIAN_FRONTEND", "noninteractive").status().is_ok_and(|s| s.success())
    };
    if install(&missing) {
        return Ok(());
    }
    let _ = Command::new("apt-get").arg("update").status();
    if !install(&missing) {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// Runs every check; prints progress unless `quiet` (then only what it installs or lacks).
pub fn setup(quiet: bool) -> Result<()> {
    ensure_nightly(quiet)?;
    ensure_bpf_linker(quiet)?;
    check_kernel(quiet)?;
    // The Node.js demo application (its test and `cargo xtask demo -- --node`) needs `node`;
    // `ss` and `ip` (iproute2) drive the test networks; `nft` plays a switch that drops
    // spoofed sources (the doctor test); `python3` is the Node.js SDK tests' fake agent that
    // passes descriptors (Node's own API cannot).
    if is_root() {
        ensure_debs(&[("node", "nodejs"), ("ss", "iproute2"), ("nft", "nftables"), ("python3", "python3")])?;
    }
    say(quiet, "node, ss, nft, python3: present");
    say(quiet, "all set");
    Ok(())
}
