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
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tracing::warn;

use super::{
    Agent, Streamed,
    live::Restoring,
    records::{Dir, Record},
    tally::End,
};
use crate::{
    app::{Exported, Importing},
    peer::{self, HandoffId, ListedSession, OUTCOME_SAMPLE, Request, Said, SessionBlob, SessionSet, Verdict},
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
    /// The sessions it carries and their bytes, once known (for the tally).
    pub sessions: (usize, u64),
    /// The open connections moving with its clients: out, or home.
    pub moving: Option<super::live::Moving>,
    pub coming: Option<super::live::Homecoming>,
}

impl Handover {
    pub(super) fn new(rec: Arc<Record>, busy: Busy, t0: Instant) -> Self {
        Self { rec, busy, t0, sessions: (0, 0), moving: None, coming: None }
    }

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

/// The ticks of an export's keep-alive, every half lease of `lease_ms`, the first one half a
/// lease from now: an interval's immediate first tick waited for the timer's next
/// millisecond (1.2 ms before a volunteer's export began, measured).
pub(super) fn keepalive(lease_ms: u64) -> tokio::time::Interval {
    let every = Duration::from_millis((lease_ms / 2).max(50));
    tokio::time::interval_at(tokio::time::Instant::now() + every, every)
}

/// Sends the sessions of `exports` on as they arrive from the applications (`Request::Sessions`
/// out, `Answer::Sessions` back, made and sent by `send` from a service as the peer knows it
/// and some of its sessions): each service's sessions in frames under `max_frame`, one service
/// after the other. Returns the count and digest of each service's sessions, which the
/// `Transfer` or `Returning` after them carries.
pub(super) async fn send_sessions<'a>(
    exports: &mut [(SocketAddr, Exported)],
    max_frame: usize,
    mut send: impl FnMut(SocketAddr, Vec<SessionBlob>) -> BoxFuture<'a, anyhow::Result<()>>,
) -> anyhow::Result<Vec<SessionSet>> {
    let budget = max_frame.saturating_sub(4096).max(1);
    let mut sets = Vec::with_capacity(exports.len());
    for (service, exported) in exports.iter_mut() {
        let service = *service;
        let mut set = SessionSet { service, count: 0, digest: 0, connections: 0 };
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

/// Checks the sessions a hand-over lists for `svc`: of its `clients` only, each once, each
/// within `max` bytes.
pub(super) fn check_listed(svc: SocketAddr, list: &[ListedSession], clients: &HashSet<IpAddr>, max: usize) -> Result<(), String> {
    let mut seen = HashSet::with_capacity(list.len());
    for l in list {
        if !clients.contains(&l.client) {
            return Err(format!("a session of {}, a client the hand-over does not move", l.client));
        }
        if !seen.insert(l.client) {
            return Err(format!("two sessions of {} for {svc}", l.client));
        }
        if usize::try_from(l.len).map_or(true, |n| n > max) {
            return Err(format!("a session is over max_session_bytes ({max})"));
        }
    }
    Ok(())
}

/// `Sessions` frames of a hand-over read ahead of its import (either way): past them, the link
/// waits (the sender slows down) rather than the receiving agent holding the sessions.
pub(super) const FRAMES_AHEAD: usize = 4;

/// One service's sessions of a transfer, as they arrive: checked against their listing and
/// digested, on their way into the application that imports them.
pub(super) struct Arriving {
    /// The local service whose application imports them.
    pub local: SocketAddr,
    /// The sessions listed and not arrived yet, in order.
    pub expected: VecDeque<ListedSession>,
    pub listed: u64,
    pub digest: u64,
    /// Where they go (none: no application takes them, they are dropped).
    pub import: Option<Importing>,
}

impl Arriving {
    /// Every session arrived: the application's answer to the import, if it had one.
    pub async fn finish(self) -> Option<anyhow::Result<()>> {
        match self.import {
            Some(i) => Some(i.finish().await),
            None => None,
        }
    }
}

/// Takes a hand-over's sessions as they arrive, each checked against the one listed next
/// and pushed on to its import, until `Sealed`, which must count and digest exactly what
/// arrived; open connections that move with them are restored into `restoring` (none may
/// come where it lists no service). `stall`: the longest wait for the next frame. An error:
/// why the hand-over is refused.
pub(super) async fn take_sessions(
    frames: &mut mpsc::Receiver<Streamed>,
    arriving: &mut HashMap<SocketAddr, Arriving>,
    restoring: &mut Restoring,
    stall: Duration,
) -> Result<(), String> {
    loop {
        let frame = match tokio::time::timeout(stall, frames.recv()).await {
            Err(_) => return Err(format!("no sessions came for {} ms", stall.as_millis())),
            Ok(None) => return Err("the hand-over was aborted, or the link went away, before every session arrived".into()),
            Ok(Some(f)) => f,
        };
        match frame {
            Streamed::Sessions(svc, blobs) => {
                if blobs.is_empty() {
                    continue;
                }
                let Some(a) = arriving.get_mut(&svc) else {
                    return Err(format!("sessions of {svc}, which the transfer does not list: some were lost or changed on the way"));
                };
                for b in blobs {
                    let next = a.expected.pop_front();
                    if next.is_none_or(|l| l.client != b.client || usize::try_from(l.len).ok() != Some(b.blob.len())) {
                        return Err(format!("a session of {} for {svc} that is not the one listed next: some were lost or changed on the way", b.client));
                    }
                    a.digest = a.digest.wrapping_add(peer::session_digest(&b));
                    let pushed = match a.import.as_mut() {
                        Some(i) => i.push(b.blob).await,
                        None => Ok(()),
                    };
                    if pushed.is_err() {
                        let a = arriving.remove(&svc).expect("present");
                        let why = match a.finish().await {
                            Some(Err(e)) => format!("{e:#}"),
                            _ => "it stopped taking them".to_string(),
                        };
                        return Err(format!("import failed: {why}"));
                    }
                }
            }
            Streamed::Abort(reason) => return Err(format!("the sender aborted: {}", Said(&reason))),
            Streamed::Freeze(_) => return Err("connections to freeze after the sessions started".into()),
            Streamed::Connections(svc, conns) => restoring.take(svc, conns)?,
            Streamed::ConnectionBytes(svc, bytes) => restoring.more(svc, &bytes)?,
            Streamed::Sealed(sets) => {
                restoring.finish()?;
                for set in &sets {
                    let here = restoring.arrived(set.service);
                    if u64::try_from(here).ok() != Some(set.connections) {
                        return Err(format!("{here} open connections of {} arrived, and the origin counts {}: some were lost on the way", set.service, set.connections));
                    }
                }
                for (svc, a) in arriving.iter() {
                    let set = sets.iter().find(|s| s.service == *svc);
                    if !set.is_some_and(|s| s.count == a.listed && s.digest == a.digest && a.expected.is_empty()) {
                        let arrived = a.listed - u64::try_from(a.expected.len()).unwrap_or(0);
                        return Err(format!(
                            "{arrived} of the {} sessions of {svc} listed arrived, and the origin counts {} (digest {}): some were lost or changed on the way",
                            a.listed,
                            set.map_or(0, |s| s.count),
                            if set.is_some_and(|s| s.digest == a.digest) { "matches" } else { "differs" }
                        ));
                    }
                }
                if let Some(set) = sets.iter().find(|s| s.count > 0 && !arriving.contains_key(&s.service)) {
                    return Err(format!("the origin counts {} sessions of {}, which the transfer does not list: some were lost or changed on the way", set.count, set.service));
                }
                return Ok(());
            }
        }
    }
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

    /// Ends hand-over `h` as `end` (the rules already say it): records and counts it, tells the
    /// volunteer, and tells this node's applications that took part until they confirm; its
    /// clients stay busy until then.
    pub(super) async fn conclude(self: &Arc<Self>, h: Handover, end: End) {
        let handoff = h.name(self.cfg.node.as_str());
        let Handover { rec, mut busy, t0, sessions: (n_sessions, bytes), moving, coming } = h;
        self.tally.ended(rec.dir, &end, t0.elapsed(), rec.clients.len(), n_sessions, bytes);
        let (verdict, why) = match end {
            End::Committed => (Verdict::Committed, String::new()),
            End::Aborted(_, why) => (Verdict::Aborted, why),
        };
        let clients = busy.take();
        let commit = verdict == Verdict::Committed;
        self.records().decide(&rec, verdict);
        if commit {
            self.state().moved.just_moved(&rec.clients, Instant::now());
        }
        // Open connections: live where they go before anyone is told (committed), or back
        // where they were.
        let mut given = match (moving, coming) {
            (Some(m), _) => self.end_moving(&rec.volunteer, rec.id, m, commit).await,
            (None, Some(c)) => self.end_homecoming(&rec.volunteer, rec.id, c, commit).await,
            (None, None) => HashMap::new(),
        };
        let me = self.clone();
        let (apps, h) = (rec.apps.clone(), handoff.clone());
        let settled = tokio::spawn(async move {
            futures::future::join_all(apps.iter().map(|s| me.apps.settle_with(*s, &h, commit, given.remove(s).unwrap_or_default()))).await;
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

    /// Sessions are taken as listed, in order, until `Sealed` counts and digests exactly
    /// them; anything else refuses the hand-over.
    #[tokio::test]
    async fn streamed_sessions_are_exactly_those_listed_and_sealed() {
        let svc: SocketAddr = "198.18.0.10:80".parse().unwrap();
        let s = |c: u8, b: &[u8]| SessionBlob { client: IpAddr::from([198, 18, 1, c]), blob: b.to_vec() };
        let sent = [s(1, b"one"), s(2, b""), s(3, b"three")];
        let sealed = |v: &[SessionBlob]| Streamed::Sealed(vec![SessionSet { service: svc, count: v.len() as u64, digest: peer::digest(v), connections: 0 }]);
        let listed: VecDeque<ListedSession> = sent.iter().map(|s| ListedSession { client: s.client, len: s.blob.len() as u64 }).collect();
        let run = |frames: Vec<Streamed>, keep_open: bool| {
            let listed = listed.clone();
            async move {
                let mut arriving = HashMap::from([(svc, Arriving { local: svc, expected: listed, listed: 3, digest: 0, import: None })]);
                let (tx, mut rx) = mpsc::channel(16);
                for f in frames {
                    tx.try_send(f).unwrap();
                }
                let _open = keep_open.then_some(tx);
                take_sessions(&mut rx, &mut arriving, &mut Restoring::default(), Duration::from_millis(100)).await
            }
        };
        let frames = |parts: &[&[SessionBlob]]| parts.iter().map(|p| Streamed::Sessions(svc, p.to_vec())).collect::<Vec<_>>();
        // In any frames, then sealed: taken.
        let mut ok = frames(&[&sent[..1], &[], &sent[1..]]);
        ok.push(sealed(&sent));
        assert_eq!(run(ok, false).await, Ok(()));
        let err = |r: Result<(), String>| r.unwrap_err();
        // A frame lost on the way: the next session is not the one listed.
        let mut lost = frames(&[&sent[1..]]);
        lost.push(sealed(&sent));
        assert!(err(run(lost, false).await).contains("not the one listed next: some were lost or changed"));
        // One changed in flight: its length, or only its bytes (the digest sees it).
        let changed = [s(1, b"onE"), s(2, b""), s(3, b"three")];
        let mut bytes = frames(&[&changed]);
        bytes.push(sealed(&sent));
        assert!(err(run(bytes, false).await).contains("digest differs"));
        let mut longer = frames(&[&[s(1, b"one!")]]);
        longer.push(sealed(&sent));
        assert!(err(run(longer, false).await).contains("not the one listed next"));
        // Sealed before all arrived, or counting another service.
        let mut short = frames(&[&sent[..2]]);
        short.push(sealed(&sent[..2]));
        assert!(err(run(short, false).await).contains("2 of the 3 sessions"));
        let mut other = frames(&[&sent]);
        other.push(sealed(&sent));
        other.push(Streamed::Sessions("198.18.0.11:80".parse().unwrap(), vec![s(4, b"x")]));
        assert_eq!(run(other, false).await, Ok(()), "nothing is read after Sealed");
        let mut stranger = frames(&[&sent]);
        stranger.insert(0, Streamed::Sessions("198.18.0.11:80".parse().unwrap(), vec![s(4, b"x")]));
        assert!(err(run(stranger, false).await).contains("does not list"));
        // The sender aborts, goes away, or stops sending.
        assert!(err(run(vec![Streamed::Abort("no room".into())], false).await).contains("aborted: no room"));
        assert!(err(run(frames(&[&sent[..1]]), false).await).contains("before every session arrived"));
        assert!(err(run(frames(&[&sent[..1]]), true).await).contains("no sessions came for 100 ms"));
    }
}
