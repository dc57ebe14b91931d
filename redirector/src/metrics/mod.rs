//! The agent's metrics for Prometheus (`/metrics`, `OpenMetrics` text) and its health
//! (`/healthz`), on `metrics_listen`. Started next to the agent, like the admin socket: the
//! agent does not know who watches it. Each scrape reads the agent's status (the datapath's
//! counters included, summed over CPUs) and the hand-overs it counted as they ended.

mod http;

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::{Registry, Unit},
};

pub use self::http::serve;
use crate::{admin::api::Status, agent::tally::Tally};

type Labeled = Family<[(&'static str, String); 1], Gauge<f64, AtomicU64>>;

/// One scrape: the status (read now) and the tally, as `OpenMetrics` text.
#[must_use]
pub fn render(status: &Status, tally: &Tally, healthy: bool) -> String {
    let mut r = Registry::with_prefix("redirector");
    let gauge = |v: u64| ConstGauge::new(v);
    r.register("load", "Established connections of this node's applications", gauge(status.load));
    r.register("high_watermark", "Load above which this node sheds clients to its siblings", gauge(status.high_watermark));
    r.register("low_watermark", "Load this node sheds down to, and under which clients come home", gauge(status.low_watermark));
    r.register("shedding", "1 while this node negotiates with its siblings to shed load", gauge(u64::from(status.shedding)));
    r.register("drained", "1 while this node is drained (`redirector drain`): its clients move away, none comes home", gauge(u64::from(status.drain.is_some())));
    r.register(
        "drain_clients_left",
        "On a drained node, clients with connections here still to move (0 otherwise)",
        gauge(len(status.drain.as_ref().map_or(0, |d| d.clients_left))),
    );
    r.register("promised", "Connections kept for adopted clients that have not arrived yet", gauge(status.promised));
    r.register("healthy", "1 when /healthz passes: the classifier attached, an application for every service that keeps sessions", gauge(u64::from(healthy)));
    let (up, age, load) = (Labeled::default(), Labeled::default(), Labeled::default());
    for s in &status.siblings {
        let l = [("sibling", s.name.clone())];
        up.get_or_create(&l).set(if s.up { 1.0 } else { 0.0 });
        load.get_or_create(&l).set(precise(s.load));
        if let Some(ms) = s.last_heartbeat_ms {
            age.get_or_create(&l).set(precise(ms) / 1000.0);
        }
    }
    r.register("sibling_up", "1 while the link to the sibling is up and its heartbeats arrive", up);
    r.register_with_unit("sibling_heartbeat_age", "Time since the sibling's last heartbeat", Unit::Seconds, age);
    r.register("sibling_load", "The sibling's load, from its last heartbeat", load);
    if let Some(c) = &status.cluster {
        r.register("cluster_members", "Other members the gossip holds live", gauge(len(c.members.len())));
        r.register("gossip_refused", "Gossip datagrams dropped unread: not sealed with the cluster's gossip key", ConstCounter::new(c.refused));
    }
    r.register("clients_moved_out", "Clients of this node steered to a sibling now", gauge(len(status.migrated_out.len())));
    r.register("clients_adopted", "Clients this node serves for an origin now", gauge(len(status.adopted.len())));
    r.register("rules_draining", "Rules of clients that came home whose open connections still go to the volunteer", gauge(len(status.draining)));
    r.register("handoff_clients_in_progress", "Clients held by a hand-over in progress", gauge(len(status.handoffs.clients_in_progress)));
    r.register("handoffs_awaiting_outcome", "Hand-overs this node took part in whose outcome it awaits from their origin", gauge(len(status.handoffs.awaiting_outcome)));
    r.register("handoffs_undecided", "Hand-overs this node started that are not decided yet", gauge(len(status.handoffs.undecided)));
    r.register("hook_applications", "Services with an application registered on the hook", gauge(len(status.hook.registered.len())));
    r.register("sessions_lost", "Sessions of clients that came home from a sibling that could not be reached", ConstCounter::new(status.sessions_lost));
    r.register("handoffs_started", "Hand-overs this node started, by direction (out: to a volunteer; back: home)", tally.started.clone());
    r.register("handoffs_committed", "Hand-overs this node started that committed, by direction", tally.committed.clone());
    r.register("handoffs_aborted", "Hand-overs this node started that aborted, by direction and the stage they stopped at", tally.aborted.clone());
    r.register("handoff_clients", "Clients moved by committed hand-overs, by direction", tally.clients.clone());
    r.register("handoff_sessions", "Sessions moved by committed hand-overs, by direction", tally.sessions.clone());
    r.register_with_unit("handoff_session", "Session bytes moved by committed hand-overs, by direction", Unit::Bytes, tally.session_bytes.clone());
    r.register_with_unit("handoff_duration", "From a hand-over's start to its commit, by direction", Unit::Seconds, tally.duration.clone());
    let packets: Family<[(&'static str, String); 1], Counter> = Family::default();
    for (name, v) in &status.counters {
        packets.get_or_create(&[("counter", name.clone())]).inc_by(*v);
    }
    r.register("datapath_packets", "Decisions of the kernel programs, by counter (as `redirector stats` names them), summed over CPUs", packets);
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String");
    out
}

fn len(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[allow(clippy::cast_precision_loss, reason = "a metric: far below 2^53 in practice, and approximate past it")]
fn precise(v: u64) -> f64 {
    v as f64
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::agent::tally::End;

    #[test]
    fn a_scrape_holds_the_status_and_the_hand_overs_counted() {
        let status: Status = serde_json::from_value(serde_json::json!({
            "node": "a", "load": 7, "high_watermark": 100, "low_watermark": 50, "shedding": false,
            "last_shed_ms": null, "last_round": null, "promised": 0,
            "siblings": [{"name": "b", "address": "198.18.0.2:7470", "up": true, "last_heartbeat_ms": 250, "last_seen_ms": 250, "load": 3}],
            "migrated_out": [], "adopted": [], "draining": 0, "orphaned": [],
            "hook": {"registered": ["198.18.0.10:80"], "unconfirmed": 0},
            "handoffs": {"clients_in_progress": 0, "awaiting_outcome": 0, "undecided": 0, "handed_back": 0, "last_home_ms": null},
            "sessions_lost": 2, "leaving": false, "counters": {"forwarded-new": 5}
        }))
        .expect("a status");
        let tally = Tally::default();
        tally.started(crate::agent::Dir::Out);
        tally.ended(crate::agent::Dir::Out, &End::Committed, Duration::from_millis(3), 2, 2, 2048);
        let text = render(&status, &tally, true);
        for line in [
            "redirector_load 7",
            "redirector_sibling_up{sibling=\"b\"} 1.0",
            "redirector_sibling_heartbeat_age_seconds{sibling=\"b\"} 0.25",
            "redirector_sessions_lost_total 2",
            "redirector_handoffs_started_total{dir=\"out\"} 1",
            "redirector_handoff_session_bytes_total{dir=\"out\"} 2048",
            "redirector_handoff_duration_seconds_count{dir=\"out\"} 1",
            "redirector_handoff_duration_seconds_bucket{le=\"0.004\",dir=\"out\"} 1",
            "redirector_datapath_packets_total{counter=\"forwarded-new\"} 5",
            "redirector_healthy 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
