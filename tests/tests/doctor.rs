//! `redirector doctor --config FILE` on a node of a working cluster: every check passes (the
//! direct-server-return probe through the running sibling included); then each requirement
//! taken away in turn makes its own check fail with what to do.

use std::{path::Path, process::Command};

use redirector_tests::{
    agents::{Cluster, expired_cert},
    net::redirector_bin,
    require_root,
};
use serde_json::Value;

/// Runs `doctor --json` (through `sh -c` when `shell` wraps it); whether it exited 0, and what
/// it reported.
fn doctor(config: &Path, wrap: Option<&str>) -> (bool, Value) {
    let cmd = format!("{} doctor --json --config {}", redirector_bin().display(), config.display());
    let out = match wrap {
        Some(w) => Command::new("unshare").args(["-m", "sh", "-c", &format!("{w} && exec {cmd}")]).output(),
        None => Command::new("sh").args(["-c", &cmd]).output(),
    }
    .expect("running doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value =
        serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.success(), v["ok"] == true, "the exit code says what the report says: {v}");
    (out.status.success(), v)
}

/// The check named `name` in a report.
fn check<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == name)).unwrap_or_else(|| panic!("no check {name} in {v}"))
}

/// Asserts that only check `name` failed, saying `says`, with a fix.
fn only_failed(v: &Value, name: &str, says: &str) {
    let failed: Vec<&str> = v["checks"].as_array().into_iter().flatten().filter(|c| c["outcome"] == "fail").filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(failed, [name], "only {name} failed: {v}");
    let c = check(v, name);
    assert!(c["detail"].as_str().is_some_and(|d| d.contains(says)), "{name} says {says:?}: {c}");
    assert!(c["fix"].as_str().is_some_and(|f| !f.is_empty()), "{name} says how to fix it: {c}");
}

#[test]
fn doctor_passes_on_a_working_node_and_says_what_to_fix_when_a_requirement_goes() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(4, &[("a", 30, 20), ("b", 100, 80)]);
    let config = c.dir.join("a.toml");
    let (ok, v) = doctor(&config, None);
    assert!(ok, "every check passes on a working node: {v}");
    for name in ["kernel", "btf", "bpffs", "programs", "uplink eth0", "certificate", "sibling b", "neighbours ipv4", "direct server return via b (IPv4)"] {
        assert_eq!(check(&v, name)["outcome"], "pass", "{name}: {v}");
    }

    // The switch drops what B's port sends as A (anti-spoofing, as clouds and switches do).
    let nft = |args: &[&str]| redirector_tests::net::sh(&[&["ip", "netns", "exec", &c.t.switch, "nft"], args].concat());
    nft(&["add", "table", "bridge", "spoof"]);
    nft(&["add", "chain", "bridge", "spoof", "ports", "{ type filter hook forward priority 0; }"]);
    nft(&["add", "rule", "bridge", "spoof", "ports", "iifname", &c.t.b.ns, "ip", "saddr", "198.18.0.10", "drop"]);
    let (ok, v) = doctor(&config, None);
    nft(&["delete", "table", "bridge", "spoof"]);
    assert!(!ok);
    only_failed(&v, "direct server return via b (IPv4)", "did not arrive");

    // An uplink whose MTU leaves tunnelled segments too small an MSS.
    c.host("a").ip(&["link", "set", "eth0", "mtu", "560"]);
    let (ok, v) = doctor(&config, None);
    c.host("a").ip(&["link", "set", "eth0", "mtu", "1500"]);
    assert!(!ok);
    only_failed(&v, "uplink eth0", "MTU 560");

    // An expired certificate (issued by the cluster CA, for the right name).
    let expired = expired_cert(&c.dir.join("tls"), "a");
    let text = std::fs::read_to_string(&config).expect("config");
    let tls = c.dir.join("tls");
    let swapped = text
        .replace(&tls.join("a.pem").display().to_string(), &expired.join("a.pem").display().to_string())
        .replace(&tls.join("a.key").display().to_string(), &expired.join("a.key").display().to_string());
    assert_ne!(swapped, text, "the configuration names a.pem and a.key");
    let expired_config = c.dir.join("a-expired.toml");
    std::fs::write(&expired_config, swapped).expect("config");
    let (ok, v) = doctor(&expired_config, None);
    assert!(!ok);
    only_failed(&v, "certificate", "xpired");

    // No bpffs where the configuration says (a private mount namespace without it).
    let (ok, v) = doctor(&config, Some(&format!("umount -l {}", c.t.bpffs.display())));
    assert!(!ok);
    only_failed(&v, "bpffs", "not a bpffs");

    // A sibling whose control port is closed (its agent stopped).
    c.kill_agent("b");
    let (ok, v) = doctor(&config, None);
    assert!(!ok);
    only_failed(&v, "sibling b", "198.18.0.2:7470");
}
