//! The peer links: accepting siblings and connecting to them (mutual TLS, hello), and sending
//! requests and answers on them. Every send has a deadline; the sockets have TCP keepalive and
//! `TCP_USER_TIMEOUT`, so a peer that vanishes without a FIN is noticed within the liveness
//! timeout; inbound requests are handled concurrently, so heartbeats are always read.
//! Heartbeats go both ways on every connection: a sibling is heard as soon as either of the
//! two connections between them is up (after a restart, the other may still be waiting in its
//! reconnect back-off).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use futures::{SinkExt as _, StreamExt as _};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tracing::{debug, info, warn};

use super::{Agent, Streamed, policy};
use crate::peer::{self, Answer, Frame, Half, Heard, Heartbeat, NodeName, PROTOCOL_VERSION, Request};

/// Transfers one inbound connection may have in progress at once (imports run concurrently;
/// past this, the sibling is told to wait).
const TRANSFERS_PER_LINK: usize = 4;

/// `Outcome` questions one inbound connection may have answered at once (each reads the
/// kernel's rules); past this, the sibling is told `Pending` and asks again later.
const OUTCOMES_PER_LINK: usize = 4;

/// Requests that cost this node something (`HelpRequest`, `Outcome`, `HandBack`, `GiveBack`, `Probe`)
/// one inbound connection may make: a burst of this many, then [`REQUESTS_PER_SEC`]. An origin
/// asks once per round, a volunteer about each late hand-over with a growing back-off, so this
/// is far above what a sibling needs, and far below what would keep this node busy.
const REQUEST_BURST: f64 = 100.0;
const REQUESTS_PER_SEC: f64 = 50.0;

/// What a sibling may have in progress at once, and ask for how often, on one inbound
/// connection.
pub(super) struct LinkLimits {
    /// Transfers and hand-backs ([`TRANSFERS_PER_LINK`]).
    pub transfers: Arc<Semaphore>,
    /// `Outcome` questions being answered ([`OUTCOMES_PER_LINK`]).
    pub outcomes: Arc<Semaphore>,
    /// Requests that cost something ([`REQUESTS_PER_SEC`]).
    requests: std::sync::Mutex<policy::TokenBucket>,
}

impl LinkLimits {
    pub fn new() -> Self {
        Self {
            transfers: Arc::new(Semaphore::new(TRANSFERS_PER_LINK)),
            outcomes: Arc::new(Semaphore::new(OUTCOMES_PER_LINK)),
            requests: std::sync::Mutex::new(policy::TokenBucket::new(REQUESTS_PER_SEC, REQUEST_BURST, std::time::Instant::now())),
        }
    }

    /// Whether one more request that costs something may be served now; if not, it gets a
    /// refusal that says so, and the sibling may ask again.
    pub fn may_serve(&self) -> bool {
        self.requests.lock().expect("lock").take(std::time::Instant::now())
    }
}

/// How long a TLS handshake and the hellos may take.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// Keepalive probes and `TCP_USER_TIMEOUT` for a peer socket: a peer silent (or not
/// acknowledging what we sent) for `liveness` is gone.
fn tune(tcp: &TcpStream, liveness: Duration) -> anyhow::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    tcp.set_nodelay(true).context("TCP_NODELAY")?; // small request/answer frames: no Nagle stalls
    let secs = u32::try_from(liveness.as_secs()).unwrap_or(u32::MAX).max(1);
    setsockopt(tcp, sockopt::KeepAlive, &true).context("SO_KEEPALIVE")?;
    setsockopt(tcp, sockopt::TcpKeepIdle, &secs).context("TCP_KEEPIDLE")?;
    setsockopt(tcp, sockopt::TcpKeepInterval, &1).context("TCP_KEEPINTVL")?;
    setsockopt(tcp, sockopt::TcpKeepCount, &3).context("TCP_KEEPCNT")?;
    let ms = u32::try_from(liveness.as_millis()).unwrap_or(u32::MAX);
    setsockopt(tcp, sockopt::TcpUserTimeout, &ms).context("TCP_USER_TIMEOUT")?;
    Ok(())
}

/// Sends one frame within `deadline`.
pub(super) async fn send_frame<T: AsyncRead + AsyncWrite + Unpin>(framed: &mut Framed<T, LengthDelimitedCodec>, msg: &Frame, deadline: Duration) -> anyhow::Result<()> {
    tokio::time::timeout(deadline, framed.send(msg.frame()))
        .await
        .map_err(|_| anyhow!("sending timed out after {} ms (the peer does not read)", deadline.as_millis()))?
        .context("sending")
}

/// Closes a connection cleanly (TLS `close_notify`, then FIN) within `deadline`, or gives up.
pub(super) async fn close_gently<T: AsyncRead + AsyncWrite + Unpin>(framed: &mut Framed<T, LengthDelimitedCodec>, deadline: Duration) {
    let _ = tokio::time::timeout(deadline, tokio::io::AsyncWriteExt::shutdown(framed.get_mut())).await;
}

/// A connection this node opened to another, under TLS.
pub(super) type PeerStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Why an outbound link ended.
struct LinkEnd {
    /// The link was up (hellos exchanged) before it failed.
    established: bool,
    error: anyhow::Error,
}

/// Removes a pending request when its asker stops waiting, however it stops.
struct PendingGuard<'a> {
    agent: &'a Agent,
    key: (NodeName, u64),
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.agent.state().links.take_waiter(&self.key.0, self.key.1);
    }
}

impl Agent {
    /// Deadline of every send on a peer link: a peer that does not take a frame for this long
    /// is as good as dead.
    pub(super) fn send_deadline(&self) -> Duration {
        Duration::from_millis(self.cfg.liveness_ms)
    }

    /// Records a heartbeat from `name` (on either connection) and the load it says.
    pub(super) fn heartbeat(&self, name: &str, load: u64) {
        self.state().links.heartbeat(name, load, Instant::now());
    }

    /// Records that `name` was heard from (any frame, on either connection).
    pub(super) fn heard(&self, name: &str) {
        if self.state().links.heard(name, Instant::now()) {
            info!(sibling = %name, "the sibling's agent is back");
        }
    }

    pub(super) async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.server.clone());
        let mut failures = crate::sock::AcceptFailures::default();
        loop {
            let (tcp, peer_addr) = match listener.accept().await {
                Ok(a) => {
                    failures.reset();
                    a
                }
                Err(e) => {
                    failures.wait("peer connections", &e).await;
                    continue;
                }
            };
            let source = peer_addr.ip().to_canonical();
            let sibling = self.sibling_at(source).is_some();
            let pass = match self.gate.admit(source, sibling, self.cfg.control_siblings_only) {
                Ok(p) => p,
                Err(why) => {
                    if let Some(held_back) = self.gate.may_log() {
                        warn!(peer = %peer_addr, held_back, "control connection closed at once: {why}");
                    }
                    continue;
                }
            };
            let (me, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move {
                if let Err(e) = me.clone().serve_inbound(acceptor, tcp, source, pass).await
                    && let Some(held_back) = me.gate.may_log()
                {
                    warn!(peer = %peer_addr, held_back, "peer connection closed: {e:#}");
                }
            });
        }
    }

    /// Serves a connection a sibling opened from `peer_ip`: its certificate must name a
    /// configured sibling, and the connection come from that sibling's configured control
    /// address (its agent binds to it). `pass`: its place at the gate, until it proved that.
    async fn serve_inbound(self: Arc<Self>, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream, peer_ip: IpAddr, pass: super::gate::Pass) -> anyhow::Result<()> {
        tune(&tcp, Duration::from_millis(self.cfg.liveness_ms))?;
        let tls = tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake timed out"))?
            .context("TLS handshake refused (no certificate from the cluster CA?)")?;
        let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned().ok_or_else(|| anyhow!("no client certificate"))?;
        let mut framed = Framed::new(tls, peer::codec(self.cfg.max_frame));
        let deadline = self.send_deadline();
        let hello = tokio::time::timeout(HANDSHAKE, next_frame(&mut framed)).await.map_err(|_| anyhow!("no hello in time"))??;
        let me_hello = Frame::Hello { version: PROTOCOL_VERSION, node: self.cfg.node.as_str().into() };
        // Static: a configured sibling. Gossip: any node the CA vouches for, under the name
        // its hello gives; one gossip does not know yet may only ask to join.
        let names: Vec<String> = if self.cfg.cluster.gossip() {
            match &hello {
                Frame::Hello { node, .. } => vec![node.to_string()],
                _ => Vec::new(),
            }
        } else {
            self.cfg.siblings.iter().map(|s| s.name.clone()).collect()
        };
        let mut joiner = false;
        let checked = peer::tls::identity(&cert, names.iter().map(String::as_str))
            .map(str::to_string)
            .ok_or_else(|| anyhow!("refused: the certificate is not for a configured sibling"))
            .and_then(|name| if self.cfg.tls.denies(&cert) { Err(anyhow!("refused: {name}'s certificate is on this node's deny list")) } else { Ok(name) })
            .and_then(|name| match self.sibling(&name) {
                Some(s) if s.control_addresses().contains(&peer_ip.to_canonical()) => Ok(name),
                Some(s) => Err(anyhow!(
                    "refused: {name}'s certificate, but the connection comes from {peer_ip}, not {name}'s {} control address ({})",
                    if self.cfg.cluster.gossip() { "gossiped" } else { "configured" },
                    list(&s.control_addresses())
                )),
                None => {
                    joiner = true;
                    Ok(name)
                }
            })
            .and_then(|name| peer::check_hello(&hello, &name).map(|()| name));
        let name = match checked {
            Ok(name) => name,
            Err(e) => {
                // Tell the peer why before closing: our hello if versions differ (a peer of
                // any version reads it and says so), otherwise a refusal with the reason.
                let answer = match hello {
                    Frame::Hello { version, .. } if version != PROTOCOL_VERSION => me_hello,
                    _ => Frame::Refused { reason: format!("{e:#}") },
                };
                if send_frame(&mut framed, &answer, deadline).await.is_ok() {
                    close_gently(&mut framed, deadline).await;
                }
                return Err(e);
            }
        };
        send_frame(&mut framed, &me_hello, deadline).await?;
        drop(pass);
        if joiner {
            return self.serve_joiner(&mut framed, &name).await;
        }
        self.heard(&name);
        info!(sibling = %name, "sibling connected");
        let (mut sink, mut stream) = framed.split();
        let (reply, mut replies) = mpsc::channel::<Answer>(64);
        // Answers, and heartbeats on this connection too: the sibling hears this node even
        // while its own connection here is down.
        let writer = {
            let me = self.clone();
            async move {
                let mut beat = tokio::time::interval(Duration::from_millis(me.cfg.heartbeat_ms));
                loop {
                    let frame = tokio::select! {
                        m = replies.recv() => match m {
                            Some(a) => Frame::Answer(a),
                            None => return Ok::<(), anyhow::Error>(()),
                        },
                        _ = beat.tick() => match me.heartbeat_msg() {
                            Some(hb) => hb,
                            None => continue,
                        },
                    };
                    tokio::time::timeout(deadline, sink.send(frame.frame()))
                        .await
                        .map_err(|_| anyhow!("answering timed out after {} ms (the peer does not read)", deadline.as_millis()))??;
                }
            }
        };
        tokio::select! {
            r = writer => r,
            r = self.read_requests(&name, &mut stream, &reply) => r,
        }
        .with_context(|| format!("link from {name}"))
    }

    /// What sibling `name` says on the connection it opened (heartbeats, requests), until it
    /// closes it: cleanly (TLS `close_notify`: it exits, or retired an idle link) or not.
    async fn read_requests<S>(self: &Arc<Self>, name: &str, stream: &mut S, reply: &mpsc::Sender<Answer>) -> anyhow::Result<()>
    where
        S: futures::Stream<Item = Result<bytes::BytesMut, std::io::Error>> + Unpin,
    {
        let limits = LinkLimits::new();
        loop {
            let Some(frame) = stream.next().await else {
                info!(sibling = %name, "sibling closed its link");
                return Ok(());
            };
            let heard = decode_heard(Some(frame))?;
            self.heard(name);
            match heard {
                Heard::Heartbeat(hb) => self.heartbeat(name, hb.load),
                Heard::Said(r) => self.clone().handle_request(name, r, reply, &limits).await?,
            }
        }
    }

    /// Keeps a link to `name` at `addr` from now on, unless one is kept already.
    pub(super) fn dial_loop(self: Arc<Self>, name: &str, addr: SocketAddr) {
        if self.state().links.dial(name) {
            tokio::spawn(self.connect_loop(name.to_string(), addr));
        }
    }

    /// A link to sibling `name`, opened if there is none (gossip mode: links are opened when
    /// needed), waiting for it at most `wait`; whether it is up.
    pub(super) async fn link_to(&self, name: &str, wait: Duration) -> bool {
        if self.state().links.linked(name) {
            return true;
        }
        let (Some(s), Some(me)) = (self.sibling(name), self.me.upgrade()) else { return false };
        let t0 = Instant::now();
        while t0.elapsed() < wait {
            // Woken as soon as a link comes up (a handshake on a LAN takes a millisecond or
            // two: a poll's period would be most of the negotiation).
            let up = self.link_up.notified();
            tokio::pin!(up);
            up.as_mut().enable();
            // Again each time: a link retired a moment ago ends its dialer only now.
            me.clone().dial_loop(name, s.address);
            tokio::select! {
                () = up => {}
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            if self.state().links.linked(name) {
                return true;
            }
        }
        false
    }

    /// Links to `name` at `addr` again and again, until the agent exits or (gossip mode) a
    /// link fails to a member gossip no longer holds live (it is opened again when needed).
    async fn connect_loop(self: Arc<Self>, name: String, addr: SocketAddr) {
        self.connect_until_gone(&name, addr).await;
        self.state().links.dialing.remove(&name);
    }

    async fn connect_until_gone(self: &Arc<Self>, name: &str, addr: SocketAddr) {
        let connector = tokio_rustls::TlsConnector::from(self.tls.client.clone());
        let mut backoff = policy::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut failures = 0u32;
        loop {
            let end = self.clone().connect_once(&connector, name, addr).await;
            // Requests waiting for an answer on this link will not get one: they fail now.
            let closing = {
                let mut st = self.state();
                // Hand-backs waiting for what this link brought will not get it.
                st.moved.link_down(name);
                st.links.down(name)
            };
            if closing {
                return;
            }
            if self.cfg.cluster.gossip() && !self.member_live(name) {
                info!(sibling = %name, "not linking again: the member is not live in the cluster");
                return;
            }
            if end.established {
                // A session that was up: start over quickly, and say once that it ended.
                warn!(sibling = %name, %addr, "link down: {:#}", end.error);
                backoff.reset();
                failures = 0;
            } else {
                failures += 1;
                if policy::warn_on_failure(failures) {
                    warn!(sibling = %name, %addr, failures, "cannot link up: {:#}", end.error);
                } else {
                    debug!(sibling = %name, %addr, failures, "cannot link up: {:#}", end.error);
                }
            }
            tokio::time::sleep(backoff.next_wait()).await;
            if let Some(d) = self.faults.reconnect_delay {
                warn!(sibling = %name, "TEST FAULT reconnect-delay: waiting {} ms before linking up again", d.as_millis());
                tokio::time::sleep(d).await;
            }
        }
    }

    /// This node's heartbeat (none with the `mute-heartbeats` test fault).
    fn heartbeat_msg(&self) -> Option<Frame> {
        (!self.faults.mute_heartbeats).then(|| Frame::Heartbeat(Heartbeat { load: self.state().load.total, high: self.cfg.high_watermark, low: self.cfg.low_watermark }))
    }

    /// Opens a connection to node `name` at `addr` up to the hellos: from this node's own
    /// control address of its family (it accepts this node from that address only), mutual
    /// TLS for `name`, a certificate not on the deny list.
    pub(super) async fn dial(&self, connector: &tokio_rustls::TlsConnector, name: &str, addr: SocketAddr) -> anyhow::Result<Framed<PeerStream, LengthDelimitedCodec>> {
        let tcp = match tokio::time::timeout(Duration::from_secs(2), connect_from(self.cfg.control_address(addr.ip()), addr)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(anyhow!(e).context(format!("connecting to {addr}"))),
            Err(_) => bail!("connecting to {addr} timed out"),
        };
        tune(&tcp, Duration::from_millis(self.cfg.liveness_ms))?;
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|_| anyhow!("{name:?} cannot be a certificate name"))?;
        let tls = match tokio::time::timeout(HANDSHAKE, connector.connect(server_name, tcp)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(anyhow!(e).context(format!("TLS handshake with {name} at {addr}"))),
            Err(_) => bail!("TLS handshake with {addr} timed out"),
        };
        if tls.get_ref().1.peer_certificates().and_then(|c| c.first()).is_some_and(|c| self.cfg.tls.denies(c)) {
            bail!("{name} at {addr} presents a certificate on this node's deny list ([tls] deny): not linking");
        }
        let mut framed = Framed::new(tls, peer::codec(self.cfg.max_frame));
        send_frame(&mut framed, &Frame::Hello { version: PROTOCOL_VERSION, node: self.cfg.node.as_str().into() }, self.send_deadline()).await?;
        match tokio::time::timeout(HANDSHAKE, next_frame(&mut framed)).await.map_err(|_| anyhow!("no hello from {name} in time"))?? {
            Frame::Refused { reason } => bail!("{name} refused this node: {}", crate::peer::Said(&reason)),
            m => peer::check_hello(&m, name)?,
        }
        Ok(framed)
    }

    async fn connect_once(self: Arc<Self>, connector: &tokio_rustls::TlsConnector, name: &str, addr: SocketAddr) -> LinkEnd {
        let mut framed = match self.dial(connector, name, addr).await {
            Ok(f) => f,
            Err(error) => return LinkEnd { established: false, error },
        };
        let (tx, mut rx) = mpsc::channel::<Request>(64);
        // Dropped when this connection ends: `close_links` waits for that.
        let (_ended, ended) = oneshot::channel::<()>();
        let unreleased = self.state().links.up(name, tx, ended, Instant::now());
        self.link_up.notify_waiters();
        info!(sibling = %name, %addr, "link up");
        let error = self.run_link(name, &mut framed, &mut rx, unreleased).await;
        LinkEnd { established: true, error }
    }

    /// An outbound link once up: releases owed from when it was down first, then heartbeats,
    /// requests and their answers until something fails.
    async fn run_link<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        name: &str,
        framed: &mut Framed<T, LengthDelimitedCodec>,
        rx: &mut mpsc::Receiver<Request>,
        unreleased: Vec<IpAddr>,
    ) -> anyhow::Error {
        let deadline = self.send_deadline();
        let n = unreleased.len();
        for chunk in peer::addr_chunks(unreleased, self.cfg.max_frame) {
            if let Err(e) = send_frame(framed, &Request::Release { clients: chunk }.into(), deadline).await {
                return e;
            }
        }
        if n > 0 {
            info!(sibling = %name, clients = n, "released the clients taken back while the link was down");
        }
        let mut beat = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        loop {
            let r: anyhow::Result<()> = tokio::select! {
                _ = beat.tick() => match self.heartbeat_msg() {
                    Some(hb) => send_frame(framed, &hb, deadline).await,
                    None => Ok(()),
                },
                out = rx.recv() => if let Some(m) = out {
                    if let (Request::Commit { .. }, Some(d)) = (&m, self.faults.delay_commit) {
                        warn!(sibling = %name, "TEST FAULT delay-commit: this Commit leaves in {} ms", d.as_millis());
                        tokio::time::sleep(d).await;
                    }
                    send_frame(framed, &m.into(), deadline).await
                } else {
                    // Everything queued has left: close cleanly (TLS close_notify).
                    close_gently(framed, deadline).await;
                    Err(anyhow!("link closed by this agent"))
                },
                frame = framed.next() => match decode_heard(frame) {
                    Ok(heard) => {
                        self.heard(name);
                        match heard {
                            Heard::Heartbeat(hb) => self.heartbeat(name, hb.load),
                            Heard::Said(a) => self.handle_answer(name, a).await,
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = r {
                return e;
            }
        }
    }

    /// An answer from `name`: to the request waiting for it, or (what comes around a
    /// hand-back's `Returning`) to the hand-back. The sessions that follow a `Returning` go on
    /// to its import as they come: this link waits while the import is behind.
    async fn handle_answer(&self, name: &str, answer: Answer) {
        let now = Instant::now();
        let (id, to) = match answer {
            Answer::Listed { id, service, sessions } => return self.returned_listed(name, id, service, sessions),
            Answer::Sessions { id, service, sessions } if sessions.is_empty() => return self.returned_listed(name, id, service, Vec::new()),
            Answer::Sessions { id, service, sessions } => (id, Streamed::Sessions(service, sessions)),
            Answer::Sealed { id, sessions } => (id, Streamed::Sealed(sessions)),
            Answer::Freeze { id, flows } => (id, Streamed::Freeze(flows)),
            Answer::Connections { id, service, connections } => (id, Streamed::Connections(service, connections)),
            Answer::ConnectionBytes { id, service, bytes } => (id, Streamed::ConnectionBytes(service, bytes)),
            answer => {
                let waiter = self.state().links.take_waiter(name, answer.id());
                match (waiter, answer) {
                    (Some(tx), answer) => {
                        let _ = tx.send(answer);
                        return;
                    }
                    // A volunteer that gives up on a hand-back after its `Returning`.
                    (None, Answer::Abort { id, reason }) => (id, Streamed::Abort(reason)),
                    (None, _) => return,
                }
            }
        };
        let stream = self.state().moved.back_stream(name, id, now);
        if let Some(s) = stream {
            let _ = s.send(to).await;
        } else {
            debug!(sibling = %name, id, "dropping what came of a hand-back that is not in progress here");
        }
    }

    /// The queue of the link to `name`, opened now if there is none (gossip mode: links are
    /// opened when needed; static: they are kept to every sibling, and one that is down is
    /// down).
    async fn queue_to(&self, name: &str) -> anyhow::Result<mpsc::Sender<Request>> {
        let out = {
            let mut st = self.state();
            st.links.used(name, Instant::now());
            st.links.sender(name)
        };
        if let Some(out) = out {
            return Ok(out);
        }
        if self.cfg.cluster.gossip()
            && self.link_to(name, Duration::from_millis(self.cfg.negotiate_timeout_ms)).await
            && let Some(out) = self.state().links.sender(name)
        {
            return Ok(out);
        }
        bail!("no link to {name}")
    }

    /// Sends a request to `name` and waits for its answer, all within `timeout` (queueing the
    /// request included).
    pub(super) async fn ask(&self, name: &str, msg: Request, id: u64, timeout: Duration) -> anyhow::Result<Answer> {
        let (tx, rx) = oneshot::channel();
        let key = (NodeName::from(name), id);
        self.state().links.await_answer(name, id, tx);
        let _guard = PendingGuard { agent: self, key };
        let out = self.queue_to(name).await?;
        tokio::time::timeout(timeout, async {
            out.send(msg).await.map_err(|_| anyhow!("link to {name} closed"))?;
            rx.await.map_err(|_| anyhow!("link to {name} closed"))
        })
        .await
        .map_err(|_| anyhow!("{name} did not answer within {} ms", timeout.as_millis()))?
    }

    /// Runs `work` (which sends request `id` to `name`, and maybe more after it) and waits for
    /// the answer to `id`, all within `timeout`. An answer that comes while `work` still runs
    /// (a refusal) ends it; so does an error of `work`.
    pub(super) async fn ask_while(&self, name: &str, id: u64, timeout: Duration, work: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<Answer> {
        let (tx, mut rx) = oneshot::channel();
        let key = (NodeName::from(name), id);
        self.state().links.await_answer(name, id, tx);
        let _guard = PendingGuard { agent: self, key };
        tokio::time::timeout(timeout, async {
            tokio::select! {
                r = work => r?,
                a = &mut rx => return a.map_err(|_| anyhow!("link to {name} closed")),
            }
            rx.await.map_err(|_| anyhow!("link to {name} closed"))
        })
        .await
        .map_err(|_| anyhow!("{name} did not answer within {} ms", timeout.as_millis()))?
    }

    /// Queues `msg` for `name` on its link, within the send deadline.
    pub(super) async fn send_to(&self, name: &str, msg: Request) -> anyhow::Result<()> {
        let out = self.queue_to(name).await?;
        out.send_timeout(msg, self.send_deadline()).await.map_err(|e| match e {
            mpsc::error::SendTimeoutError::Timeout(_) => anyhow!("the link to {name} is stuck"),
            mpsc::error::SendTimeoutError::Closed(_) => anyhow!("link to {name} closed"),
        })
    }

    /// The agent exits: each outbound link sends what is queued on it (a hand-over's last
    /// `Commit`, say), then closes cleanly; waits for that at most `limit`. None opens again.
    pub(super) async fn close_links(&self, limit: Duration) {
        let ended = self.state().links.close();
        let n = ended.len();
        if tokio::time::timeout(limit, futures::future::join_all(ended)).await.is_err() {
            warn!(
                links = n,
                limit_ms = limit.as_millis(),
                "links not closed in time: what was queued on them may be lost (siblings ask how hand-overs ended when the agent is back)"
            );
        }
    }

    /// Tells `name` the outcome of hand-over `handoff` (`Commit` or `Abort`); a loss is logged:
    /// the volunteer asks how it ended (`Outcome`) when neither comes.
    pub(super) async fn tell(&self, name: &str, handoff: &str, msg: Request) {
        let what = match &msg {
            Request::Commit { .. } => "Commit",
            Request::Abort { .. } => "Abort",
            _ => "message",
        };
        if let Err(e) = self.send_to(name, msg).await {
            warn!(sibling = %name, handoff, "{what} not delivered: {e:#}; the volunteer will ask how the hand-over ended");
        }
    }

    /// Tells `name` that this node took `clients` back (in frames under the limit); while the
    /// link is down, they are released when it is up again.
    pub(super) async fn release(&self, name: &str, clients: Vec<IpAddr>) {
        if clients.is_empty() {
            return;
        }
        let mut undelivered = Vec::new();
        for chunk in peer::addr_chunks(clients, self.cfg.max_frame) {
            if !undelivered.is_empty() || self.send_to(name, Request::Release { clients: chunk.clone() }).await.is_err() {
                undelivered.extend(chunk);
            }
        }
        if !undelivered.is_empty() {
            debug!(sibling = %name, clients = undelivered.len(), "release deferred until the link is up");
            self.state().links.owe_release(name, undelivered);
        }
    }
}

pub(super) async fn next_frame<T: AsyncRead + AsyncWrite + Unpin>(framed: &mut Framed<T, LengthDelimitedCodec>) -> anyhow::Result<Frame> {
    decode_frame(framed.next().await)
}

fn decode_frame(frame: Option<Result<bytes::BytesMut, std::io::Error>>) -> anyhow::Result<Frame> {
    match frame {
        None => bail!("connection closed by the peer"),
        Some(Err(e)) => bail!("bad frame: {e}"),
        Some(Ok(b)) => Frame::decode(&b),
    }
}

/// A frame read after the hellos, by the side that receives `T`.
fn decode_heard<T: Half>(frame: Option<Result<bytes::BytesMut, std::io::Error>>) -> anyhow::Result<Heard<T>> {
    decode_frame(frame)?.heard()
}

/// Connects to `addr` from `local` (any port), or from whatever address routing picks.
async fn connect_from(local: Option<IpAddr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    if let Some(ip) = local {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

fn list(addrs: &[IpAddr]) -> String {
    addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}
