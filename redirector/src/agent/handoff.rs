//! What both directions of a hand-over share: the clients it keeps busy, its session frames and
//! their checks, and how it ends (recorded, the volunteer told, the origin's applications told
//! until they confirm). Its name, as applications see it, is a [`crate::peer::HandoffId`].
//!
//! Two phases each way. Out (`transfer.rs`): the origin's applications export (freeze) ->
//! `Sessions` and `Transfer` -> the volunteer imports (tentative) and acknowledges -> the
//! origin installs its rules (the commit point) -> commit. Back (`handback.rs`): the
//! volunteer's applications export (freeze) -> `Sessions` and `Returning` -> the origin imports
//! (tentative) -> the origin withdraws its rules (the commit point) -> commit. The origin's
//! rules are pinned in the kernel and outlive the agent, so how any hand-over ended can always
//! be read from them (`verdict.rs`). Applications never decide: commit and abort are retried
//! until they confirm them.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use tracing::warn;

use super::{
    Agent,
    records::{Dir, Record},
};
use crate::{
    app::Exported,
    peer::{self, HandoffId, OUTCOME_SAMPLE, Request, SessionBlob, SessionSet, Verdict},
};

/// At most this many clients are named in one log line.
pub(super) const NAMED: usize = 16;

/// Some of `clients`, of each family, for an `Outcome` question.
pub(super) fn sample(clients: &[IpAddr]) -> Vec<IpAddr> {
    let half = OUTCOME_SAMPLE / 2;
    let v4 = clients.iter().filter(|c| c.is_ipv4()).take(half);
    let v6 = clients.iter().filter(|c| c.is_ipv6()).take(half);
    v4.chain(v6).copied().collect()
}

/// Clients in a hand-over in progress: no longer busy when dropped, unless taken.
pub(super) struct Busy {
    agent: Arc<Agent>,
    clients: Vec<IpAddr>,
}

impl Busy {
    /// Takes over `clients`, already marked busy.
    pub(super) fn new(agent: Arc<Agent>, clients: Vec<IpAddr>) -> Self {
        Self { agent, clients }
    }

    /// The clients it holds.
    pub(super) fn clients(&self) -> &[IpAddr] {
        &self.clients
    }

    /// Hands the clients on (to whoever frees them later).
    pub(super) fn take(&mut self) -> Vec<IpAddr> {
        std::mem::take(&mut self.clients)
    }

    /// Frees `keep`'s complement now: clients that will not be part of any transfer.
    pub(super) fn keep_only(&mut self, keep: &std::collections::HashSet<IpAddr>) {
        let (stay, free): (Vec<IpAddr>, Vec<IpAddr>) = self.clients.iter().partition(|c| keep.contains(c));
        self.agent.unbusy(&free);
        self.clients = stay;
    }
}

/// A hand-over this node runs as its origin (either way), until it ends: its record (what is
/// decided and told), the clients it holds busy until the applications confirm its end, and
/// when it started.
pub(super) struct Handover {
    pub rec: Arc<Record>,
    pub busy: Busy,
    pub t0: Instant,
}

impl Handover {
    /// Its name as applications see it, with `node` its origin.
    pub(super) fn name(&self, node: &str) -> String {
        HandoffId::new(node, self.rec.id, self.rec.volunteer.as_str()).to_string()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.agent.unbusy(&self.clients);
    }
}

/// Sends the sessions of `exports` on as they arrive from the applications (`Request::Sessions`
/// out, `Answer::Sessions` back, made and sent by `send` from a service as the peer knows it
/// and some of its sessions): each service's sessions in frames under `max_frame`, one service
/// after the other. Returns the count and digest of each service's sessions, which the
/// `Transfer` or `Returning` after them carries.
pub(super) async fn send_sessions<'a>(
    exports: Vec<(SocketAddr, Exported)>,
    max_frame: usize,
    mut send: impl FnMut(SocketAddr, Vec<SessionBlob>) -> BoxFuture<'a, anyhow::Result<()>>,
) -> anyhow::Result<Vec<SessionSet>> {
    let budget = max_frame.saturating_sub(4096).max(1);
    let mut sets = Vec::with_capacity(exports.len());
    for (service, mut exported) in exports {
        let mut set = SessionSet { service, count: 0, digest: 0 };
        while let Some(batch) = exported.next_batch(budget).await.map_err(|e| anyhow::anyhow!("export failed: {e:#}"))? {
            let blobs: Vec<SessionBlob> = batch.into_iter().map(Into::into).collect();
            set.count += u64::try_from(blobs.len()).unwrap_or(u64::MAX);
            set.digest = set.digest.wrapping_add(peer::digest(&blobs));
            send(service, blobs).await?;
        }
        sets.push(set);
    }
    Ok(sets)
}

/// How a client appears in a log line: its address, with its connections when known.
pub(super) trait Named {
    fn named(&self) -> String;
}

impl Named for IpAddr {
    fn named(&self) -> String {
        self.to_string()
    }
}

impl Named for (IpAddr, u64) {
    fn named(&self) -> String {
        format!("{}({})", self.0, self.1)
    }
}

/// The first [`NAMED`] of `clients` for a log line, and how many more there are.
pub(super) fn names<T: Named>(clients: &[T]) -> String {
    let mut s: Vec<String> = clients.iter().take(NAMED).map(Named::named).collect();
    if clients.len() > NAMED {
        s.push(format!("and {} more", clients.len() - NAMED));
    }
    s.join(" ")
}

/// Checks the sessions that arrived for a hand-over against what its last frame counts: for
/// each service listed, exactly the sessions it counts (number and digest: none lost or added
/// on the way), of `clients` only, each once, each within `max` bytes; no service unlisted.
/// Returns them by service. Reads every byte: run it off the async workers.
pub(super) fn check_received(
    sets: &[SessionSet],
    mut received: HashMap<SocketAddr, Vec<SessionBlob>>,
    clients: &HashSet<IpAddr>,
    max: usize,
) -> Result<Vec<(SocketAddr, Vec<SessionBlob>)>, String> {
    if let Some(svc) = received.keys().find(|s| !sets.iter().any(|x| x.service == **s)) {
        return Err(format!("received sessions of {svc}, which the hand-over does not list"));
    }
    let mut out = Vec::with_capacity(sets.len());
    for set in sets {
        let got = received.remove(&set.service).unwrap_or_default();
        let n = u64::try_from(got.len()).unwrap_or(u64::MAX);
        let digest = peer::digest(&got);
        if n != set.count || digest != set.digest {
            return Err(format!(
                "received {n} of the {} sessions of {} (digest {}): some were lost or changed on the way; nothing imported",
                set.count,
                set.service,
                if digest == set.digest { "matches" } else { "differs" }
            ));
        }
        let mut seen = HashSet::with_capacity(got.len());
        for s in &got {
            if !clients.contains(&s.client) {
                return Err(format!("a session of {}, a client the hand-over does not hand over", s.client));
            }
            if !seen.insert(s.client) {
                return Err(format!("two sessions of {} for {}", s.client, set.service));
            }
            if s.blob.len() > max {
                return Err(format!("a session is over max_session_bytes ({max})"));
            }
        }
        out.push((set.service, got));
    }
    Ok(out)
}

impl Agent {
    pub(super) fn unbusy(&self, clients: &[IpAddr]) {
        if clients.is_empty() {
            return;
        }
        self.state().free(clients);
    }

    /// Waits, at most `limit`, until none of `clients` is in a hand-over here any more.
    pub(super) async fn until_settled(&self, clients: &[IpAddr], limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && { self.state().any_busy(clients) } {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether `svc` is a local service configured with `sessions = true`.
    pub(super) fn keeps_sessions(&self, svc: SocketAddr) -> bool {
        self.cfg.services.iter().any(|s| s.address == svc && s.sessions)
    }

    /// Ends hand-over `h` as `verdict` (committed or aborted, `why`; the rules already say it):
    /// records it, tells the volunteer, and tells this node's applications that took part until
    /// they confirm; its clients stay busy until then.
    pub(super) async fn conclude(self: &Arc<Self>, h: Handover, verdict: Verdict, why: String) {
        let handoff = h.name(self.cfg.node.as_str());
        let Handover { rec, mut busy, .. } = h;
        let clients = busy.take();
        let commit = verdict == Verdict::Committed;
        self.records().decide(&rec, verdict);
        if commit {
            self.state().moved.just_moved(&rec.clients, Instant::now());
        }
        let me = self.clone();
        let (apps, h) = (rec.apps.clone(), handoff.clone());
        let settled = tokio::spawn(async move {
            futures::future::join_all(apps.iter().map(|s| me.apps.settle(*s, &h, commit))).await;
            me.unbusy(&clients);
        });
        if commit {
            self.tell(&rec.volunteer, &handoff, Request::Commit { id: rec.id }).await;
        } else {
            match rec.dir {
                Dir::Out => warn!(sibling = %rec.volunteer, handoff, "hand-over aborted, nothing steered: {why}"),
                Dir::Back => warn!(sibling = %rec.volunteer, handoff, "hand-back aborted, the clients stay on {} with their sessions: {why}", rec.volunteer),
            }
            if self.faults.drop_abort {
                warn!(sibling = %rec.volunteer, handoff, "TEST FAULT drop-abort: not telling the volunteer");
            } else {
                self.tell(&rec.volunteer, &handoff, Request::Abort { id: rec.id, reason: why }).await;
            }
        }
        // The applications normally confirm at once: the hand-over ends with them (and its
        // clients may move again). One that does not is told in the background, for as long
        // as it takes.
        let _ = tokio::time::timeout(self.limits().timeout, settled).await;
    }

    /// Tells the application of `service` how hand-over `handoff` ended, `clients` busy until
    /// it confirms.
    pub(super) fn settle_app(self: &Arc<Self>, service: SocketAddr, handoff: String, clients: Vec<IpAddr>, commit: bool) {
        self.state().hold(clients.iter().copied());
        let me = self.clone();
        tokio::spawn(async move {
            me.apps.settle(service, &handoff, commit).await;
            me.unbusy(&clients);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_name_a_few_clients_and_count_the_rest() {
        let c: Vec<IpAddr> = (0..=u8::try_from(NAMED).unwrap()).map(|i| IpAddr::from([198, 18, 1, i])).collect();
        let line = names(&c);
        assert!(line.starts_with("198.18.1.0 198.18.1.1 "), "{line}");
        assert!(line.ends_with(&format!("198.18.1.{} and 1 more", NAMED - 1)), "{line}");
        assert_eq!(names(&[(c[5], 3), (c[6], 1)]), "198.18.1.5(3) 198.18.1.6(1)");
    }

    #[test]
    fn outcome_samples_hold_both_families() {
        let many: Vec<IpAddr> = (0..1000u32).map(|i| IpAddr::from(std::net::Ipv4Addr::from(i))).chain([IpAddr::from(std::net::Ipv6Addr::LOCALHOST)]).collect();
        let s = sample(&many);
        assert_eq!(s.len(), OUTCOME_SAMPLE / 2 + 1, "both families are in the sample");
    }

    #[test]
    fn received_sessions_are_exactly_those_counted() {
        let svc: SocketAddr = "198.18.0.10:80".parse().unwrap();
        let s = |c: u8, b: &[u8]| SessionBlob { client: IpAddr::from([198, 18, 1, c]), blob: b.to_vec() };
        let clients: HashSet<IpAddr> = (1..=3).map(|i| IpAddr::from([198, 18, 1, i])).collect();
        let session_sets = |sent: &[(SocketAddr, Vec<SessionBlob>)]| -> Vec<SessionSet> {
            sent.iter().map(|(service, v)| SessionSet { service: *service, count: v.len() as u64, digest: peer::digest(v) }).collect()
        };
        let sets = session_sets(&[(svc, vec![s(1, b"one"), s(2, b"two")])]);
        let got = |v: Vec<SessionBlob>| HashMap::from([(svc, v)]);
        assert_eq!(check_received(&sets, got(vec![s(2, b"two"), s(1, b"one")]), &clients, 10).unwrap()[0].1.len(), 2);
        let err = |v, max| check_received(&sets, got(v), &clients, max).unwrap_err();
        assert!(err(vec![s(1, b"one")], 10).contains("lost or changed"));
        assert!(err(vec![s(1, b"one"), s(2, b"twO")], 10).contains("lost or changed"));
        assert!(err(vec![s(1, b"one"), s(2, b"two")], 2).contains("max_session_bytes"));
        let stranger = session_sets(&[(svc, vec![s(9, b"x")])]);
        assert!(check_received(&stranger, got(vec![s(9, b"x")]), &clients, 10).unwrap_err().contains("does not hand over"));
        let twice = session_sets(&[(svc, vec![s(1, b"x"), s(1, b"x")])]);
        assert!(check_received(&twice, got(vec![s(1, b"x"), s(1, b"x")]), &clients, 10).unwrap_err().contains("two sessions"));
        let other: SocketAddr = "198.18.0.11:80".parse().unwrap();
        assert!(check_received(&sets, HashMap::from([(other, vec![])]), &clients, 10).unwrap_err().contains("does not list"));
    }
}
