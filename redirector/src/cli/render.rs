//! What commands report, rendered apart from the work: text and tables for people, one JSON
//! document for scripts (`--json`).

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde_json::json;

use crate::{
    admin::api::{DrainState, GivenBack, Moved, Status},
    agent::ago,
    datapath::{Load, Prefix, RuleInfo, ServiceInfo, Stats},
};

/// Now, in Unix seconds.
fn unix_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// What a command did or found, for [`print`].
#[derive(Debug)]
#[expect(clippy::large_enum_variant, reason = "one report per run: its size does not matter")]
pub(super) enum Report {
    /// Done, nothing to say: the exit code tells.
    Done,
    ServiceAdded {
        service: ServiceInfo,
        dev: String,
    },
    Services(Vec<ServiceInfo>),
    RuleAdded {
        prefix: Prefix,
        to: IpAddr,
    },
    Draining {
        prefix: Prefix,
        period: Duration,
    },
    Rules(Vec<RuleInfo>),
    Siblings(Vec<IpAddr>),
    /// Adopted services: address, port, and whether a listener receives them.
    Adopted(Vec<(IpAddr, u16, bool)>),
    Stats(Stats),
    /// Programs replaced by `attach --replace`.
    Replaced(usize),
    Load(Load),
    /// A running agent's status; `now` is the Unix time it was asked at (ages count from it).
    Status {
        status: Status,
        now: u64,
    },
    /// `asked`: how many clients the agent was asked to move.
    Moved {
        moved: Moved,
        asked: usize,
    },
    GivenBack(GivenBack),
    /// What `drain --no-wait` or `undrain` changed.
    DrainState(DrainState),
    /// A drain that finished.
    Drained(super::drain::DrainSummary),
    /// `config check` found no problem.
    ConfigOk {
        file: PathBuf,
        node: String,
        siblings: usize,
        services: usize,
    },
    CaWritten {
        dir: PathBuf,
        /// When it expires (Unix seconds).
        until: i64,
    },
    NodeCertWritten {
        name: String,
        dir: PathBuf,
        until: i64,
        /// SHA-256 of the certificate, as `[tls] deny` would list it.
        fingerprint: String,
    },
    /// `tls show`: a certificate's names, expiry and fingerprint.
    CertShown {
        file: PathBuf,
        names: Vec<String>,
        until: i64,
        fingerprint: String,
    },
    /// What `doctor` found.
    Doctor(Vec<crate::doctor::Check>),
}

/// What `--json` prints of a report.
enum ForScripts {
    /// One JSON document.
    Json(String),
    /// Nothing: the command only confirms an action, and its exit code says it was done.
    Silent,
    /// The text for people: the command has no JSON form.
    Text,
}

/// Prints `report` on stdout: for scripts when `json`, else for people.
///
/// # Errors
/// The report cannot be encoded as JSON.
pub(super) fn print(report: &Report, json: bool) -> serde_json::Result<()> {
    if json {
        match report.for_scripts()? {
            ForScripts::Json(doc) => println!("{doc}"),
            ForScripts::Silent => {}
            ForScripts::Text => print!("{}", report.text()),
        }
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

impl Report {
    /// For people: lines and tables, each line ending in a newline.
    fn text(&self) -> String {
        match self {
            Self::Done => String::new(),
            Self::ServiceAdded { service: s, dev } => {
                format!("steering {} on {dev} (tunnel source {}, MSS clamp {}{})\n", s.service(), s.tunnel_src, s.mss_clamp, if s.xdp { ", XDP fast path" } else { "" })
            }
            Self::Services(list) => {
                let mut rows = vec![vec!["SERVICE".into(), "TUNNEL-SRC".into(), "MSS-CLAMP".into(), "IFINDEX".into(), "XDP".into()]];
                rows.extend(
                    list.iter().map(|s| vec![s.service(), s.tunnel_src.to_string(), s.mss_clamp.to_string(), s.ifindex.to_string(), if s.xdp { "yes" } else { "no" }.into()]),
                );
                table(&rows)
            }
            Self::RuleAdded { prefix, to } => format!("{prefix} -> {to}\n"),
            Self::Draining { prefix, period } => format!("{prefix} draining for {} s\n", period.as_secs()),
            Self::Rules(rules) => {
                let mut rows = vec![vec!["PREFIX".into(), "TARGET".into(), "STATE".into(), "DRAIN-LEFT".into()]];
                rows.extend(rules.iter().map(|r| {
                    vec![
                        r.prefix.to_string(),
                        r.target.to_string(),
                        format!("{:?}", r.state).to_lowercase(),
                        if r.drain_left_ms > 0 { format!("{}.{}s", r.drain_left_ms / 1000, r.drain_left_ms % 1000 / 100) } else { "-".into() },
                    ]
                }));
                table(&rows)
            }
            Self::Siblings(list) => list.iter().fold(String::new(), |mut out, s| {
                let _ = writeln!(out, "{s}");
                out
            }),
            Self::Adopted(list) => list.iter().fold(String::new(), |mut out, (a, p, l)| {
                let _ = writeln!(out, "{}{}", SocketAddr::new(*a, *p), if *l { "  (listener)" } else { "" });
                out
            }),
            Self::Stats(s) => {
                let mut rows = vec![vec!["COUNTER".into(), "PACKETS".into()]];
                rows.extend(s.counters.iter().map(|(n, v)| vec![(*n).to_string(), v.to_string()]));
                table(&rows)
            }
            Self::Replaced(n) => format!("replaced {n} attached program(s)\n"),
            Self::Load(load) => {
                let mut rows = vec![vec!["CLIENT".into(), "CONNECTIONS".into()]];
                rows.extend(load.clients.iter().map(|(a, n)| vec![a.to_string(), n.to_string()]));
                format!("total {}\n{}", load.total, table(&rows))
            }
            Self::Status { status, now } => status_text(status, *now),
            Self::Moved { moved: m, asked } => format!("moved {} of {asked} client(s) with their sessions in {:.0} ms\n", m.moved, m.ms),
            Self::GivenBack(g) => format!("{} of {} client(s) given back with their sessions in {:.0} ms\n", g.given_back, g.asked, g.ms),
            Self::DrainState(d) => match (d.drained, d.already) {
                (true, true) => "already drained: its clients are moving away (`redirector status`)\n".into(),
                (true, false) => "drained: its clients are moving away (`redirector status` shows how far)\n".into(),
                (false, true) => "not drained: nothing to do\n".into(),
                (false, false) => "undrained: the node takes load again (moved clients come home after home_after_secs)\n".into(),
            },
            Self::Drained(d) => {
                let mut out = format!("drained in {:.1} s: {} client(s) on siblings, nothing left to move", d.seconds, d.moved_out);
                if d.connections_finishing > 0 {
                    let _ = write!(out, "; {} connection(s) of moved clients still finishing here", d.connections_finishing);
                }
                out.push('\n');
                out
            }
            Self::ConfigOk { file, node, siblings, services } => format!("{}: ok (node {node}, {siblings} sibling(s), {services} service(s))\n", file.display()),
            Self::CaWritten { dir, until } => {
                format!("cluster CA written to {}/ca.pem and ca.key (keep ca.key secret), valid until {}\n", dir.display(), crate::peer::tls::date(*until))
            }
            Self::NodeCertWritten { name, dir, until, fingerprint } => {
                format!("certificate for {name} written to {}/{name}.pem and {name}.key, valid until {} (sha256 {fingerprint})\n", dir.display(), crate::peer::tls::date(*until))
            }
            Self::CertShown { file, names, until, fingerprint } => {
                let left = (*until - unix_secs()) / 86_400;
                let state = if left < 0 { "EXPIRED".to_string() } else { format!("{left} days left") };
                format!("{}: {}, valid until {} ({state}), sha256 {fingerprint}\n", file.display(), names.join(" "), crate::peer::tls::date(*until))
            }
            Self::Doctor(checks) => checks.iter().fold(String::new(), |mut out, c| {
                let word = match c.outcome {
                    crate::doctor::Outcome::Pass => "PASS",
                    crate::doctor::Outcome::Warn => "WARN",
                    crate::doctor::Outcome::Fail => "FAIL",
                };
                let _ = writeln!(out, "{word}  {}: {}", c.name, c.detail);
                if let Some(fix) = &c.fix {
                    let _ = writeln!(out, "      fix: {fix}");
                }
                out
            }),
        }
    }

    /// For scripts.
    fn for_scripts(&self) -> serde_json::Result<ForScripts> {
        let doc = match self {
            Self::Done | Self::RuleAdded { .. } | Self::Draining { .. } | Self::Replaced(_) => return Ok(ForScripts::Silent),
            Self::ConfigOk { .. } | Self::CaWritten { .. } | Self::NodeCertWritten { .. } => return Ok(ForScripts::Text),
            Self::CertShown { file, names, until, fingerprint } => {
                json!({"file": file, "names": names, "not_after_unix": until, "expired": *until <= unix_secs(), "sha256": fingerprint}).to_string()
            }
            Self::ServiceAdded { service: s, .. } => json!({"service": s.service(), "tunnel_src": s.tunnel_src, "mss_clamp": s.mss_clamp, "xdp": s.xdp}).to_string(),
            Self::Services(list) => {
                let v: Vec<_> =
                    list.iter().map(|s| json!({"service": s.service(), "tunnel_src": s.tunnel_src, "mss_clamp": s.mss_clamp, "ifindex": s.ifindex, "xdp": s.xdp})).collect();
                json!({ "services": v }).to_string()
            }
            Self::Rules(rules) => json!({ "rules": rules }).to_string(),
            Self::Siblings(list) => json!({ "siblings": list }).to_string(),
            Self::Adopted(list) => {
                let v: Vec<_> = list.iter().map(|(a, p, l)| json!({"service": SocketAddr::new(*a, *p).to_string(), "listener": l})).collect();
                json!({ "adopted": v }).to_string()
            }
            Self::Stats(s) => {
                let m: serde_json::Map<String, serde_json::Value> = s.counters.iter().map(|(n, v)| ((*n).to_string(), json!(v))).collect();
                json!({ "counters": m }).to_string()
            }
            Self::Load(load) => serde_json::to_string(load)?,
            Self::Status { status, .. } => serde_json::to_string(status)?,
            Self::Moved { moved, .. } => serde_json::to_string(moved)?,
            Self::GivenBack(g) => serde_json::to_string(g)?,
            Self::DrainState(d) => serde_json::to_string(d)?,
            Self::Drained(d) => serde_json::to_string(d)?,
            Self::Doctor(checks) => json!({ "ok": !checks.iter().any(|c| c.outcome == crate::doctor::Outcome::Fail), "checks": checks }).to_string(),
        };
        Ok(ForScripts::Json(doc))
    }
}

/// The status of an agent as tables for people; `now` is the current Unix time (ages are
/// counted from it).
fn status_text(s: &Status, now: u64) -> String {
    let mut out = String::new();
    let since = |t: u64| ago(now.saturating_sub(t));
    let ms_ago = |x: Option<u64>| x.map_or_else(|| "never".to_string(), |m| if m < 10_000 { format!("{}.{}s ago", m / 1000, m % 1000 / 100) } else { ago(m / 1000) });
    let _ = writeln!(out, "node {}  load {} (high {}, low {}){}", s.node, s.load, s.high_watermark, s.low_watermark, if s.shedding { "  shedding" } else { "" });
    if let Some(r) = &s.last_round {
        let _ = writeln!(out, "last shedding round: {r}");
    }
    if s.promised > 0 {
        let _ = writeln!(out, "room promised to adopted clients not arrived yet: {} connections", s.promised);
    }
    let apps = &s.hook.registered;
    let _ = writeln!(out, "applications registered: {}", if apps.is_empty() { "none".to_string() } else { apps.join(", ") });
    let (unconfirmed, h) = (s.hook.unconfirmed, &s.handoffs);
    if unconfirmed + h.awaiting_outcome + h.undecided + h.clients_in_progress > 0 {
        let _ = writeln!(
            out,
            "hand-overs unfinished: {} in progress here, {} awaiting their origin's outcome, {unconfirmed} outcomes not confirmed by an application yet ({} clients held)",
            h.undecided, h.awaiting_outcome, h.clients_in_progress
        );
    }
    if h.handed_back > 0 {
        let _ = writeln!(out, "clients that came home with their sessions: {}", h.handed_back);
    }
    if s.sessions_lost > 0 {
        let _ = writeln!(out, "sessions lost (their clients came home from a sibling that stayed unreachable): {}", s.sessions_lost);
    }
    if s.leaving {
        let _ = writeln!(out, "stopping: handing clients back");
    }
    if let Some(d) = &s.drain {
        let left = if d.done { "nothing left to move".to_string() } else { format!("{} client(s) with {} connections left to move", d.clients_left, d.connections_left) };
        let _ = writeln!(out, "DRAINED {} (`redirector undrain` to take load again): {left}", since(d.since_unix));
    }
    let mut rows = vec![vec!["SIBLING".into(), "ADDRESS".into(), "UP".into(), "LAST-HEARTBEAT".into(), "LOAD".into()]];
    for x in &s.siblings {
        rows.push(vec![x.name.clone(), x.address.to_string(), if x.up { "up".into() } else { "down".into() }, ms_ago(x.last_heartbeat_ms), x.load.to_string()]);
    }
    out.push_str(&table(&rows));
    if let Some(c) = &s.cluster {
        let _ = writeln!(out, "gossip at {}: {} other member(s) live; datagrams sent {}, received {}, refused {}", c.gossip, c.members.len(), c.sent, c.received, c.refused);
        if !c.standby.is_empty() {
            let _ = writeln!(out, "linked in advance (standby): {}", c.standby.join(", "));
        }
        let mut rows = vec![vec!["MEMBER".into(), "CONTROL".into(), "ROOM".into()]];
        for m in &c.members {
            rows.push(vec![m.name.clone(), m.control.to_string(), m.room.map_or_else(|| "-".into(), |r| r.to_string())]);
        }
        out.push_str(&table(&rows));
    }
    let mut rows = vec![vec!["MIGRATED-OUT".into(), "TO".into(), "SINCE".into(), "CONNECTIONS".into()]];
    for m in &s.migrated_out {
        rows.push(vec![m.client.to_string(), m.to.clone(), since(m.since_unix), m.connections.to_string()]);
    }
    out.push_str(&table(&rows));
    let mut rows = vec![vec!["ADOPTED".into(), "FROM".into(), "SINCE".into(), "PROMISED".into(), "HERE".into()]];
    for a in &s.adopted {
        rows.push(vec![a.client.to_string(), a.from.clone(), since(a.since_unix), a.promised.to_string(), a.connections.to_string()]);
    }
    out.push_str(&table(&rows));
    if s.draining > 0 {
        let _ = writeln!(out, "rules draining: {}", s.draining);
    }
    if !s.orphaned.is_empty() {
        let mut rows = vec![vec!["ORPHANED-RULE".into(), "TARGET".into(), "WHY".into()]];
        for o in &s.orphaned {
            rows.push(vec![o.prefix.clone(), o.target.to_string(), o.why.clone()]);
        }
        out.push_str(&table(&rows));
    }
    let mut rows = vec![vec!["COUNTER".into(), "PACKETS".into()]];
    rows.extend(s.counters.iter().map(|(n, c)| vec![n.clone(), c.to_string()]));
    out.push_str(&table(&rows));
    out
}

/// Rows as aligned columns, one line each.
fn table(rows: &[Vec<String>]) -> String {
    let Some(first) = rows.first() else { return String::new() };
    let mut widths = vec![0; first.len()];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status table says ages as people do and shows the datapath's counters.
    #[test]
    fn status_tables_show_ages_and_counters() {
        let v = json!({
            "node": "a", "load": 12, "high_watermark": 20, "low_watermark": 10, "shedding": false,
            "last_round": "moved 3 client(s)", "promised": 0, "draining": 1,
            "siblings": [{"name": "b", "address": "198.18.0.2:7470", "up": true, "last_heartbeat_ms": 230, "load": 4}],
            "migrated_out": [{"client": "198.18.1.5", "to": "b", "since_unix": 1000, "connections": 2}],
            "adopted": [{"client": "198.18.1.9", "from": "c", "since_unix": 925, "promised": 1, "connections": 0}],
            "orphaned": [{"prefix": "198.18.1.39/32", "target": "198.18.0.99", "why": "target 198.18.0.99 is not a configured sibling"}],
            "counters": {"forwarded-new": 17, "passed": 3},
            "hook": {"registered": ["198.18.0.10:80"], "unconfirmed": 1},
            "handoffs": {"clients_in_progress": 2, "awaiting_outcome": 0, "undecided": 0, "handed_back": 0},
            "sessions_lost": 0, "leaving": false,
        });
        let s: Status = serde_json::from_value(v).expect("a status as the agent writes it");
        let t = status_text(&s, 1012);
        for want in [
            "0.2s ago",
            "198.18.1.5    b   12s ago",
            "1m27s ago",
            "forwarded-new  17",
            "198.18.1.39/32",
            "rules draining: 1",
            "moved 3 client(s)",
            "applications registered: 198.18.0.10:80",
            "1 outcomes not confirmed by an application yet (2 clients held)",
        ] {
            assert!(t.contains(want), "{want:?} in:\n{t}");
        }
        assert!(!t.contains("1000"), "no raw Unix times:\n{t}");
    }

    fn scripts(r: &Report) -> String {
        match r.for_scripts().unwrap() {
            ForScripts::Json(doc) => doc,
            ForScripts::Silent => "(silent)".into(),
            ForScripts::Text => "(text)".into(),
        }
    }

    /// Scripts parse these: the JSON documents and tables keep their shape.
    #[test]
    fn listings_read_the_same_for_people_and_scripts() {
        let rule = RuleInfo {
            prefix: "198.18.1.0/24".parse().unwrap(),
            target: "198.18.0.2".parse().unwrap(),
            state: crate::datapath::RuleState::Draining,
            drain_left_ms: 1500,
            since_unix: 7,
        };
        let r = Report::Rules(vec![rule]);
        assert_eq!(r.text(), "PREFIX         TARGET      STATE     DRAIN-LEFT\n198.18.1.0/24  198.18.0.2  draining  1.5s\n");
        assert_eq!(scripts(&r), r#"{"rules":[{"drain_left_ms":1500,"prefix":"198.18.1.0/24","since_unix":7,"state":"draining","target":"198.18.0.2"}]}"#);
        let r = Report::Adopted(vec![("198.18.0.10".parse().unwrap(), 80, true), ("2001:db8::a".parse().unwrap(), 443, false)]);
        assert_eq!(r.text(), "198.18.0.10:80  (listener)\n[2001:db8::a]:443\n");
        assert_eq!(scripts(&r), r#"{"adopted":[{"listener":true,"service":"198.18.0.10:80"},{"listener":false,"service":"[2001:db8::a]:443"}]}"#);
        let r = Report::Stats(Stats { counters: vec![("passed", 3), ("forwarded-new", 17)] });
        assert_eq!(r.text(), "COUNTER        PACKETS\npassed         3\nforwarded-new  17\n");
        assert_eq!(scripts(&r), r#"{"counters":{"forwarded-new":17,"passed":3}}"#);
        let r = Report::Load(Load { total: 3, clients: vec![("198.18.1.5".parse().unwrap(), 3)] });
        assert_eq!(r.text(), "total 3\nCLIENT      CONNECTIONS\n198.18.1.5  3\n");
        assert_eq!(scripts(&r), r#"{"total":3,"clients":[["198.18.1.5",3]]}"#);
        assert_eq!(Report::Siblings(Vec::new()).text(), "", "nothing listed, nothing printed");
        // Commands that only confirm an action say nothing to scripts; tls and config check
        // have no JSON form and say their line either way.
        let prefix: Prefix = "198.18.1.5".parse().unwrap();
        assert_eq!(scripts(&Report::RuleAdded { prefix, to: "198.18.0.2".parse().unwrap() }), "(silent)");
        assert_eq!(scripts(&Report::Draining { prefix, period: Duration::from_mins(1) }), "(silent)");
        assert_eq!(scripts(&Report::Done), "(silent)");
        assert_eq!(scripts(&Report::CaWritten { dir: ".".into(), until: 0 }), "(text)");
    }
}
