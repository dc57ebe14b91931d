//! The origin's side of connections moving out to a volunteer: after the export, the
//! connections handed over are frozen and dumped at once; their dumps go after the sessions
//! (`Connections`), counted in `Sealed`. Before the commit point, once the freeze settled,
//! each dumped socket is checked to be as it was dumped ([`settled`]). Committed (the rules
//! are in), the dumped sockets close without a word, the volunteer takes its restored ones
//! live (`Live`), the kept packets go to them through the tunnel and the flows thaw (from then
//! the classifier forwards their packets, as the origin has no socket for them). Aborted, the
//! dumped sockets resume, the kept packets go to them, and the flows thaw.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{ConnFrame, Freeze, Leaving, Opened, deliver_here};
use crate::{
    agent::Agent,
    app::{AppConnection, Exported},
    peer::{Answer, Request},
};

/// How long the origin waits for the volunteer to take the connections live before it lets
/// their packets through anyway.
const LIVE_WAIT: Duration = Duration::from_secs(2);

/// The dump of a hand-over's connections, on a blocking thread: the connections, and the
/// flows of those that cannot move (to thaw).
type Dumping = tokio::task::JoinHandle<(Leaving, Vec<super::Flow>)>;

/// The connections of a hand-over out, on the origin, from the export to its end.
pub(in crate::agent) struct Moving {
    /// The connections, once dumped ([`Agent::dumped`]).
    leaving: Leaving,
    /// Their dump, under way: it runs while the sessions travel (1,000 connections took
    /// 13-20 ms to dump here, and as long to stream their sessions).
    dumping: Option<Dumping>,
    handed_over: usize,
    freeze: Freeze,
    /// When the flows froze.
    frozen_at: Instant,
}

impl Moving {
    pub(in crate::agent) fn is_empty(&self) -> bool {
        self.handed_over == 0
    }
}

impl Agent {
    /// Takes the connections the applications handed over with their exports; those that may
    /// move are frozen (their packets kept by the copies `holds` opens), then dumped, on a
    /// blocking thread ([`Agent::dumped`] waits for it).
    pub(in crate::agent) async fn freeze_connections(self: &Arc<Self>, exports: &mut [(SocketAddr, Exported)], handoff: &str, holds: Opened) -> Moving {
        let mut leaving = Leaving::take(exports);
        let t0 = Instant::now();
        let flows = if leaving.is_empty() { Vec::new() } else { leaving.flows(handoff) };
        let freeze = self.freeze(flows, holds, handoff).await;
        let handed_over = leaving.conns.len();
        let mut m = Moving { leaving: Leaving::default(), dumping: None, handed_over, freeze, frozen_at: Instant::now() };
        if handed_over == 0 {
            return m;
        }
        let t_frozen = t0.elapsed();
        let (frozen, handoff) = (m.freeze.flows.clone(), handoff.to_string());
        m.dumping = Some(tokio::task::spawn_blocking(move || {
            let failed = leaving.dump(&frozen, &handoff);
            info!(
                handoff,
                connections = frozen.len() - failed.len(),
                handed_over,
                dump_us = t0.elapsed().as_micros(),
                frozen_us = t_frozen.as_micros(),
                "connections frozen and dumped"
            );
            (leaving, failed)
        }));
        m
    }

    /// Waits for the dump of `m`'s connections, if it is under way; those that cannot move
    /// thaw.
    async fn dumped(self: &Arc<Self>, m: &mut Moving) {
        let Some(dumping) = m.dumping.take() else { return };
        match dumping.await {
            Ok((leaving, failed)) => {
                m.leaving = leaving;
                self.unfreeze(&mut m.freeze, failed).await;
            }
            // Nothing in a dump panics; should it, its sockets are gone with it (closed in
            // repair mode or not), and nothing is left to move or to give back.
            Err(e) => warn!(connections = m.handed_over, "dumping the moving connections did not finish ({e}): they are lost"),
        }
    }

    /// Waits until the freeze of `moving` (connections of a hand-over out, if any) settled,
    /// then checks that no packet reached a dumped socket after its dump (one that had just
    /// passed the classifier as the flows froze). The dumps are read at once rather than after
    /// the settling wait, which goes by meanwhile, while they travel and are restored. An
    /// error: a dump is stale, the hand-over must not commit (its connections go on here, as
    /// they are).
    pub(in crate::agent) async fn settled(self: &Arc<Self>, moving: Option<&mut Moving>) -> Result<(), String> {
        let Some(m) = moving else { return Ok(()) };
        self.dumped(m).await;
        super::settle(m.frozen_at).await;
        let stale = m.leaving.stale();
        match stale.first() {
            None => Ok(()),
            Some(c) => Err(format!("{} of the moving connections (one of {c}) received or were acknowledged something after their dump", stale.len())),
        }
    }

    /// Thaws `flows` of freeze `f` now (their connections do not move).
    async fn unfreeze(self: &Arc<Self>, f: &mut Freeze, flows: Vec<crate::agent::live::Flow>) {
        if !flows.is_empty() {
            f.flows.retain(|x| !flows.contains(x));
            self.thaw(flows).await;
        }
    }

    /// Sends the moving connections to volunteer `name` (`Connections` of transfer `id`), with
    /// the blobs their applications sent after the sessions. Returns how many of each service
    /// went.
    pub(in crate::agent) async fn send_connections(
        self: &Arc<Self>,
        name: &str,
        id: u64,
        moving: &mut Moving,
        exports: &mut [(SocketAddr, Exported)],
    ) -> anyhow::Result<HashMap<SocketAddr, u64>> {
        let blobs = super::blobs(exports).await?;
        self.dumped(moving).await;
        let (frames, thaw) = moving.leaving.frames(blobs, self.cfg.max_frame);
        self.unfreeze(&mut moving.freeze, thaw).await;
        for f in frames {
            self.send_to(
                name,
                match f {
                    ConnFrame::Conns(service, connections) => Request::Connections { id, service, connections },
                    ConnFrame::Bytes(service, bytes) => Request::ConnectionBytes { id, service, bytes },
                },
            )
            .await?;
        }
        Ok(moving.leaving.counts())
    }

    /// Ends the move of hand-over `id` with `name` on the origin: committed, the connections
    /// go live on the volunteer and their packets follow; aborted, they go on here. Returns
    /// the connections to give the applications with the outcome, per service.
    pub(in crate::agent) async fn end_moving(self: &Arc<Self>, name: &str, id: u64, mut moving: Moving, committed: bool) -> HashMap<SocketAddr, Vec<AppConnection>> {
        self.dumped(&mut moving).await;
        let Moving { leaving, freeze, .. } = moving;
        let t0 = Instant::now();
        let frozen = !freeze.flows.is_empty();
        let (back, dumped) = leaving.end(committed);
        let moved = dumped.len();
        // The dumped sockets close on a blocking thread while the volunteer takes its copies
        // live (1,000 took 7.7 ms to close here, and as long to go live): both before the flows
        // thaw, neither waiting for the other.
        let closing = (!dumped.is_empty()).then(|| tokio::task::spawn_blocking(move || super::discard(dumped)));
        let mut live = None;
        if committed && moved > 0 {
            let req = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            live = Some(match self.ask(name, Request::Live { id: req, handoff: id }, req, LIVE_WAIT).await {
                Ok(Answer::Live { live, .. }) => Ok(live),
                Ok(other) => Err(format!("unexpected answer: {}", other.what())),
                Err(e) => Err(format!("{e:#}")),
            });
        }
        if let Some(c) = closing
            && let Err(e) = c.await
        {
            warn!(sibling = %name, id, "closing the moved connections' sockets here did not finish ({e})");
        }
        let t_live = t0.elapsed();
        // The packets kept meanwhile: to the new sockets (committed) or to the resumed ones here.
        let replayed = if committed { self.let_go(freeze, |p| self.replay_to(name, p)).await } else { self.let_go(freeze, |p| deliver_here(&p)).await };
        match live {
            Some(Ok(n)) => {
                info!(sibling = %name, id, connections = moved, live = n, replayed, live_ms = t_live.as_secs_f64() * 1e3, done_ms = t0.elapsed().as_secs_f64() * 1e3, "connections moved live");
            }
            Some(Err(e)) => warn!(sibling = %name, id, connections = moved, "the volunteer did not say the moved connections are live ({e}); their packets go to it anyway"),
            None if frozen => {
                info!(sibling = %name, id, connections = back.values().map(Vec::len).sum::<usize>(), "the hand-over did not commit: its connections go on here");
            }
            None => {}
        }
        back
    }
}
