//! Membership by gossip (`[cluster] mode = "gossip"`, docs/cluster.md): the cluster's gossip key
//! (kept in `state_dir`; made by the node that starts the cluster; asked of a seed over mutual
//! TLS by one that joins, so only holders of a certificate of the cluster CA get it), the
//! member this node is (its name, control and gossip addresses, services), the news gossip
//! brings (members known, members dead: their clients are taken home), and this node's load,
//! published for the members that look for room.

use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use tracing::{info, warn};

use super::{Agent, link, policy};
use crate::{
    cluster::{Event, Gossip, Member, Settings, seal::Key},
    config::Seed,
    peer::{Answer, Frame, Request, Said},
};

/// The file in `state_dir` that keeps the cluster's gossip key (mode 0600).
const KEY_FILE: &str = "gossip.key";

/// Members a previous run knew that a restarted member gossips to (with its seeds) until one
/// of them is live: a few are enough, and all of a thousand would be a burst every second.
const KNOWN_SEEDS: usize = 8;

/// How long a node that may only join has to ask.
const JOIN_WAIT: Duration = Duration::from_secs(5);

/// This node's part in the gossip, once it is a member.
pub(super) struct Membership {
    pub gossip: Gossip,
    key: Key,
}

/// Reads the key a previous run kept, if any.
fn read_key(path: &Path) -> anyhow::Result<Option<Key>> {
    match std::fs::read(path) {
        Ok(b) => Key::from_bytes(&b).map(Some).map_err(|e| anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!(e).context(format!("reading {}", path.display()))),
    }
}

impl Agent {
    /// Binds the gossip's socket (gossip mode): this node's control address, `gossip_port`
    /// (a port in use stops the agent's start rather than leaving it out of the cluster).
    pub(super) fn bind_gossip_if_any(&self) -> anyhow::Result<Option<UdpSocket>> {
        if !self.cfg.cluster.gossip() {
            return Ok(None);
        }
        let at = SocketAddr::new(self.cfg.listen().ip(), self.cfg.cluster.gossip_port);
        let s = UdpSocket::bind(at).with_context(|| format!("binding the gossip's socket at {at} ([cluster] gossip_port)"))?;
        s.set_nonblocking(true)?;
        Ok(Some(s))
    }

    /// Joins the cluster on `socket` and follows what gossip says until the agent ends.
    pub(super) async fn gossip_loop(self: Arc<Self>, socket: UdpSocket) {
        let key = self.cluster_key().await;
        let at = socket.local_addr().unwrap_or_else(|_| SocketAddr::new(self.cfg.listen().ip(), self.cfg.cluster.gossip_port));
        let boot = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())).unwrap_or(u64::MAX);
        let me = Member {
            name: self.cfg.node.clone(),
            gossip: at,
            control: self.cfg.listen(),
            dual_stack: self.cfg.dual_stack_address,
            services: self.cfg.services.iter().map(|s| s.address).collect(),
            boot,
        };
        // The configured seeds, and some of the members a previous run knew: a restarted member
        // that started the cluster (no seeds) comes back through them.
        let port = self.cfg.cluster.gossip_port;
        let mut seeds: Vec<SocketAddr> = self.cfg.cluster.seeds.iter().map(|s| SocketAddr::new(s.address.ip(), port)).collect();
        let mut known: Vec<SocketAddr> = self.siblings().iter().filter(|s| s.name != self.cfg.node).map(|s| SocketAddr::new(s.address.ip(), port)).collect();
        rand::seq::SliceRandom::shuffle(known.as_mut_slice(), &mut rand::rng());
        seeds.extend(known.into_iter().take(KNOWN_SEEDS));
        seeds.sort_unstable();
        seeds.dedup();
        let socket = match tokio::net::UdpSocket::from_std(socket) {
            Ok(s) => s,
            Err(e) => return warn!("the gossip's socket: {e}: this node stays out of the cluster"),
        };
        let (gossip, mut events) = Gossip::start(socket, Settings { me, key: key.clone(), seeds, size: self.cfg.cluster.expected_members });
        gossip.set_load(self.state().load.total, self.cfg.high_watermark);
        if self.membership.set(Membership { gossip, key }).is_err() {
            return warn!("gossip started twice: the second is dropped");
        }
        info!(gossip = %at, seeds = self.cfg.cluster.seeds.len(), "gossiping");
        let mut keep = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                e = events.recv() => match e {
                    Some(e) => self.gossip_event(e),
                    None => return,
                },
                _ = keep.tick() => {
                    self.forget_gone();
                    self.keep_known();
                    self.keep_links();
                }
            }
        }
    }

    fn gossip_event(self: &Arc<Self>, e: Event) {
        match e {
            Event::Up(m) => {
                info!(member = %m.name, control = %m.control, "member up");
                self.learn(&m);
                self.state().links.know(&m.name);
            }
            Event::Down(m) => {
                self.lost(&m.name);
                let clients = self.state().moved.on(&m.name);
                warn!(member = %m.name, clients = clients.len(), "member declared dead by the cluster");
                if !clients.is_empty() && self.state().links.suspect(&m.name) {
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.suspect(&m.name, clients, Duration::ZERO).await;
                        me.state().links.unsuspect(&m.name);
                    });
                }
            }
            Event::Rejoined(m) => warn!(boot = m.boot, "this node was declared dead while alive, and rejoined"),
        }
    }

    /// The cluster's gossip key: kept from before, made (no seeds: this node starts the
    /// cluster), or asked of the seeds in turn until one gives it.
    async fn cluster_key(&self) -> Key {
        let dir = self.cfg.state_dir();
        let path = dir.join(KEY_FILE);
        match read_key(&path) {
            Ok(Some(k)) => return k,
            Ok(None) => {}
            Err(e) => warn!("the gossip key kept is unusable ({e:#}): getting it again"),
        }
        let keep = |k: &Key| {
            if let Err(e) = super::records::write_atomic(&path, |w| Ok(std::io::Write::write_all(w, k.bytes())?)) {
                warn!("keeping the gossip key: {e:#}: a restart asks the seeds again");
            }
        };
        if self.cfg.cluster.seeds.is_empty() {
            loop {
                match Key::generate() {
                    Ok(k) => {
                        keep(&k);
                        info!("no seeds: this node starts the cluster (it made the gossip key)");
                        return k;
                    }
                    Err(e) => {
                        warn!("making the gossip key: {e}; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        let connector = tokio_rustls::TlsConnector::from(self.tls.client.clone());
        let mut backoff = policy::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut failures = 0u32;
        loop {
            let mut why = Vec::new();
            for seed in &self.cfg.cluster.seeds {
                match self.ask_key(&connector, seed).await {
                    Ok(k) => {
                        keep(&k);
                        info!(seed = %seed.name, "joined the cluster: the seed gave its gossip key");
                        return k;
                    }
                    Err(e) => why.push(format!("{} at {}: {e:#}", seed.name, seed.address)),
                }
            }
            failures += 1;
            if policy::warn_on_failure(failures) {
                warn!(failures, "cannot join the cluster yet, asking again: {}", why.join("; "));
            }
            tokio::time::sleep(backoff.next_wait()).await;
        }
    }

    /// Asks `seed` for the gossip key.
    async fn ask_key(&self, connector: &tokio_rustls::TlsConnector, seed: &Seed) -> anyhow::Result<Key> {
        let mut framed = self.dial(connector, &seed.name, seed.address).await?;
        link::send_frame(&mut framed, &Request::Join { id: 1 }.into(), self.send_deadline()).await?;
        let answer = tokio::time::timeout(JOIN_WAIT, link::next_frame(&mut framed)).await.map_err(|_| anyhow!("no answer in time"))??;
        link::close_gently(&mut framed, self.send_deadline()).await;
        match answer {
            Frame::Answer(Answer::Joined { key, .. }) => Key::from_bytes(&key).map_err(|e| anyhow!("its key is unusable: {e}")),
            Frame::Answer(Answer::Decline { reason, .. }) => bail!("declined: {}", Said(&reason)),
            Frame::Refused { reason } => bail!("refused: {}", Said(&reason)),
            other => bail!("unexpected answer: {}", other.what()),
        }
    }

    /// Publishes this node's load for the members that look for room (none above `high`).
    pub(super) fn publish_load(&self, load: u64, high: u64) {
        if let Some(m) = self.membership.get() {
            m.gossip.set_load(load, high);
        }
    }

    /// Answers `Join` `id`: the gossip key, if this node is a member.
    pub(super) fn joined(&self, id: u64) -> Answer {
        match self.membership.get() {
            Some(m) => Answer::Joined { id, key: m.key.bytes().to_vec(), gossip: m.gossip.me().gossip },
            None if self.cfg.cluster.gossip() => Answer::Decline { id, reason: "this node has not joined the cluster yet".into() },
            None => Answer::Decline { id, reason: "this node's membership is static ([cluster] mode), not by gossip".into() },
        }
    }

    /// Serves a node the CA vouches for that gossip does not know (yet) on connection
    /// `framed`: it may ask to join, nothing else.
    pub(super) async fn serve_joiner<T>(&self, framed: &mut tokio_util::codec::Framed<T, tokio_util::codec::LengthDelimitedCodec>, name: &str) -> anyhow::Result<()>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let frame = tokio::time::timeout(JOIN_WAIT, link::next_frame(framed)).await.map_err(|_| anyhow!("{name}, not a member, asked nothing in time"))??;
        let answer = match frame {
            Frame::Request(Request::Join { id }) => {
                let a = self.joined(id);
                if matches!(a, Answer::Joined { .. }) {
                    info!(node = %name, "gave the gossip key to a node that joins");
                }
                Frame::Answer(a)
            }
            other => Frame::Refused { reason: format!("{name} is not a member of the cluster (gossip has not brought it here): it may only join, not send {}", other.what()) },
        };
        link::send_frame(framed, &answer, self.send_deadline()).await?;
        link::close_gently(framed, self.send_deadline()).await;
        Ok(())
    }

    /// Leaves the cluster (the agent exits): a few members are told, so that it is known gone
    /// at once rather than after the failure detector's timeouts.
    pub(super) async fn leave_cluster(&self) {
        if let Some(m) = self.membership.get() {
            m.gossip.leave().await;
        }
    }

    /// Whether gossip holds member `name` live.
    pub(super) fn member_live(&self, name: &str) -> bool {
        self.membership.get().is_some_and(|m| m.gossip.live().iter().any(|x| x.name == name))
    }

    /// Whom to ask for room for `need` connections (gossip mode), linked: `to` alone if
    /// given, otherwise `ask` live members drawn among those whose gossiped room fits `need`
    /// (or, if none does, those with any room: the clients may be split among them), those
    /// linked already first (on standby, or asked before).
    pub(super) async fn ask_whom(self: &Arc<Self>, need: u64, to: Option<&str>) -> Vec<String> {
        let names: Vec<String> = match (to, self.membership.get()) {
            (Some(to), _) => vec![to.to_string()],
            (None, None) => Vec::new(),
            (None, Some(m)) => {
                let d = self.cfg.cluster.ask;
                let linked: std::collections::HashSet<String> = {
                    let st = self.state();
                    st.links.siblings.iter().filter(|(_, s)| s.out.is_some()).map(|(n, _)| n.to_string()).collect()
                };
                let mut picked = m.gossip.sample(need, d, |x| linked.contains(&x.name));
                if picked.is_empty() {
                    picked = m.gossip.sample(1, d, |x| linked.contains(&x.name));
                }
                picked.into_iter().map(|(m, _)| m.name).collect()
            }
        };
        let wait = Duration::from_millis(self.cfg.negotiate_timeout_ms);
        let linked = futures::future::join_all(names.iter().map(|n| self.link_to(n, wait))).await;
        names.into_iter().zip(linked).filter_map(|(n, up)| up.then_some(n)).collect()
    }

    /// The members gossip holds live, for the status: (name, control address, room it
    /// published).
    pub(super) fn members_status(&self) -> Option<crate::admin::api::ClusterStatus> {
        let m = self.membership.get()?;
        let rooms: std::collections::HashMap<SocketAddr, u64> = m.gossip.candidates().into_iter().collect();
        let mut members: Vec<crate::admin::api::MemberStatus> =
            m.gossip.live().into_iter().map(|x| crate::admin::api::MemberStatus { room: rooms.get(&x.gossip).copied(), name: x.name, control: x.control }).collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        let t = m.gossip.traffic();
        let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let standby = self.state().links.standby.clone();
        Some(crate::admin::api::ClusterStatus { gossip: m.gossip.me().gossip, members, sent: n(&t.sent), received: n(&t.received), refused: n(&t.refused), standby })
    }
}
