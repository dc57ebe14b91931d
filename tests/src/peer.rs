//! A sibling's side of the peer channel, driven by a test: mutual TLS with any certificate,
//! frames and messages, to send what a real agent never would.

use std::{io::Read as _, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use redirector::peer::{Answer, Frame, Heard, PROTOCOL_VERSION};

use crate::in_netns;

/// A TLS connection to an agent's peer channel.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A TLS client connection to `addr` from namespace `ns` that trusts the CA in `ca` and
/// presents certificate `cert` (`<cert>.pem` and `<cert>.key`).
#[must_use]
pub fn tls_connect(ns: &str, ca: &Path, cert: &Path, server_name: &str, addr: SocketAddr) -> TlsStream {
    let tls = redirector::peer::tls::Tls::load(ca, &cert.with_extension("pem"), &cert.with_extension("key")).expect("load test certificates");
    let tcp = in_netns(ns, move || std::net::TcpStream::connect(addr)).expect("TCP connect");
    tcp.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let conn = rustls::ClientConnection::new(Arc::clone(&tls.client), server_name.to_string().try_into().expect("name")).expect("TLS client");
    rustls::StreamOwned::new(conn, tcp)
}

/// Writes one frame (length, then `body`).
pub fn send_frame(s: &mut impl std::io::Write, body: &[u8]) -> std::io::Result<()> {
    s.write_all(&u32::try_from(body.len()).expect("small").to_be_bytes())?;
    s.write_all(body)?;
    s.flush()
}

/// Sends one frame (a hello, or a request as the opener of the connection), panicking if it
/// cannot.
pub fn send(s: &mut TlsStream, m: impl Into<Frame>) {
    let m = m.into();
    send_frame(s, &m.encode()).unwrap_or_else(|e| panic!("sending {m:?}: {e}"));
}

/// Reads one frame, skipping heartbeats (they flow on every connection, at any time).
pub fn read_msg(s: &mut TlsStream) -> std::io::Result<Frame> {
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body)?;
        match Frame::decode(&body).map_err(std::io::Error::other)? {
            Frame::Heartbeat(_) => {}
            m => return Ok(m),
        }
    }
}

/// Reads the agent's next answer after the hellos (skipping heartbeats); any other frame is
/// an error.
pub fn read_answer(s: &mut TlsStream) -> std::io::Result<Answer> {
    match read_msg(s)?.heard::<Answer>().map_err(std::io::Error::other)? {
        Heard::Said(a) => Ok(a),
        Heard::Heartbeat(_) => unreachable!("read_msg skips heartbeats"),
    }
}

/// The hello of node `node` in this protocol version.
#[must_use]
pub fn hello(node: &str) -> Frame {
    Frame::Hello { version: PROTOCOL_VERSION, node: node.into() }
}

/// Connects to an agent at `addr` as sibling `me` (with the cluster certificates in `tls`)
/// and exchanges hellos.
#[must_use]
pub fn connect_as(ns: &str, tls: &Path, me: &str, agent: &str, addr: SocketAddr) -> TlsStream {
    let mut s = tls_connect(ns, &tls.join("ca.pem"), &tls.join(me), agent, addr);
    send(&mut s, hello(me));
    match read_msg(&mut s) {
        Ok(Frame::Hello { .. }) => s,
        other => panic!("{agent} should greet {me}: {other:?}"),
    }
}
