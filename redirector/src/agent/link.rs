//! The peer links: accepting siblings and connecting to them (mutual TLS, hello), and sending
//! requests and answers on them.

use std::{net::SocketAddr, sync::Arc, time::{Duration, Instant}};

use anyhow::{Context as _, anyhow, bail};
use futures::{SinkExt as _, StreamExt as _};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tokio_util::codec::Framed;
use tracing::{info, warn};

use super::Agent;
use crate::peer::{self, Msg, PROTOCOL_VERSION};

impl Agent {
    pub(super) async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.server.clone());
        loop {
            let Ok((tcp, peer_addr)) = listener.accept().await else { continue };
            let (me, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move {
                if let Err(e) = me.clone().serve_inbound(acceptor, tcp).await {
                    warn!(peer = %peer_addr, "peer connection closed: {e:#}");
                }
            });
        }
    }

    pub(super) async fn serve_inbound(self: Arc<Self>, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream) -> anyhow::Result<()> {
        // Small request/answer frames: without this, Nagle and delayed ACKs add ~40 ms stalls.
        tcp.set_nodelay(true)?;
        let tls = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake timed out"))?
            .context("TLS handshake refused (no certificate from the cluster CA?)")?;
        let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned().ok_or_else(|| anyhow!("no client certificate"))?;
        let name = peer::identity(&cert, self.cfg.siblings.iter().map(|s| s.name.as_str()))
            .ok_or_else(|| anyhow!("refused: the certificate is not for a configured sibling"))?
            .to_string();
        let mut framed = Framed::new(tls, peer::codec(self.cfg.max_frame));
        let hello = next_msg(&mut framed).await?;
        peer::check_hello(&hello, &name)?;
        framed.send(Msg::Hello { version: PROTOCOL_VERSION, node: self.cfg.node.clone() }.frame()).await?;
        info!(sibling = %name, "sibling connected");
        loop {
            let msg = next_msg(&mut framed).await?;
            let reply = self.clone().handle_request(&name, msg).await;
            if let Some(r) = reply {
                framed.send(r.frame()).await?;
            }
        }
    }

    pub(super) async fn connect_loop(self: Arc<Self>, name: String, addr: SocketAddr) {
        let connector = tokio_rustls::TlsConnector::from(self.tls.client.clone());
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.clone().connect_once(&connector, &name, addr).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    if backoff >= Duration::from_secs(1) {
                        warn!(sibling = %name, "link down: {e:#}");
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            if let Some(s) = self.state().siblings.get_mut(&name) {
                s.out = None;
            }
            tokio::time::sleep(backoff).await;
        }
    }

    pub(super) async fn connect_once(self: Arc<Self>, connector: &tokio_rustls::TlsConnector, name: &str, addr: SocketAddr) -> anyhow::Result<()> {
        let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))??;
        tcp.set_nodelay(true)?;
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).context("sibling name")?;
        let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(server_name, tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake with {addr} timed out"))?
            .with_context(|| format!("TLS handshake with {name} at {addr}"))?;
        let mut framed = Framed::new(tls, peer::codec(self.cfg.max_frame));
        framed.send(Msg::Hello { version: PROTOCOL_VERSION, node: self.cfg.node.clone() }.frame()).await?;
        let hello = next_msg(&mut framed).await?;
        peer::check_hello(&hello, name)?;
        let (tx, mut rx) = mpsc::channel::<Msg>(64);
        self.state().siblings.entry(name.to_string()).or_default().out = Some(tx);
        info!(sibling = %name, %addr, "link up");
        let mut beat = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    let load = self.state().load.total;
                    let hb = Msg::Heartbeat { load, high: self.cfg.high_watermark, low: self.cfg.low_watermark };
                    framed.send(hb.frame()).await?;
                }
                out = rx.recv() => {
                    let Some(m) = out else { bail!("channel closed") };
                    framed.send(m.frame()).await?;
                }
                frame = framed.next() => {
                    let msg = decode_frame(frame)?;
                    self.handle_answer(name, msg);
                }
            }
        }
    }

    pub(super) fn handle_answer(&self, name: &str, msg: Msg) {
        let id = match &msg {
            Msg::Offer { id, .. } | Msg::Decline { id, .. } | Msg::TransferAck { id } | Msg::Abort { id, .. } => *id,
            Msg::Heartbeat { load, .. } => {
                let mut st = self.state();
                let s = st.siblings.entry(name.to_string()).or_default();
                s.load = *load;
                s.last_heartbeat = Some(Instant::now());
                return;
            }
            _ => return,
        };
        if let Some(tx) = self.state().pending.remove(&(name.to_string(), id)) {
            let _ = tx.send(msg);
        }
    }

    pub(super) async fn ask(&self, name: &str, msg: Msg, id: u64, timeout: Duration) -> anyhow::Result<Msg> {
        let (tx, rx) = oneshot::channel();
        let out = {
            let mut st = self.state();
            st.pending.insert((name.to_string(), id), tx);
            st.siblings.get(name).and_then(|s| s.out.clone())
        };
        let out = out.ok_or_else(|| anyhow!("no link to {name}"))?;
        out.send(msg).await.map_err(|_| anyhow!("link to {name} closed"))?;
        let r = tokio::time::timeout(timeout, rx).await;
        self.state().pending.remove(&(name.to_string(), id));
        r.map_err(|_| anyhow!("{name} did not answer within {} ms", timeout.as_millis()))?.map_err(|_| anyhow!("link to {name} closed"))
    }


    pub(super) async fn tell(&self, name: &str, msg: Msg) {
        let out = self.state().siblings.get(name).and_then(|s| s.out.clone());
        if let Some(out) = out {
            let _ = out.send(msg).await;
        }
    }
}

async fn next_msg<T: AsyncRead + AsyncWrite + Unpin>(framed: &mut Framed<T, tokio_util::codec::LengthDelimitedCodec>) -> anyhow::Result<Msg> {
    decode_frame(framed.next().await)
}

fn decode_frame(frame: Option<Result<bytes::BytesMut, std::io::Error>>) -> anyhow::Result<Msg> {
    match frame {
        None => bail!("connection closed by the peer"),
        Some(Err(e)) => bail!("bad frame: {e}"),
        Some(Ok(b)) => Msg::decode(&b),
    }
}
