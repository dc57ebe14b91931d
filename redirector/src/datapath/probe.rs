//! Make before break: before steering to a target, send a TCP SYN to each steered service
//! through the real tunnel (IP-in-IP from our tunnel source, as the classifier would) and wait
//! for the target's listener to answer. The answer comes back by direct server return from our
//! own service address; the classifier records it in `PROBES` and drops it.

use std::{
    fs::File,
    io::Read as _,
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use redirector_common::{
    ProbeValue,
    decide::{TCP_ACK, TCP_RST, TCP_SYN},
};

use super::{ServiceInfo, types::sock};
use crate::tunnel::Tunnel;

/// Why a target is not ready.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "target {target} did not answer a probe for {service} through the tunnel within {ms} ms: check that it accepts tunnels from {tunnel_src} (`redirector sibling add`) and serves the service (`redirector adopt add`)"
    )]
    Timeout { target: IpAddr, service: String, tunnel_src: IpAddr, ms: u128 },
    #[error("target {target} received the probe for {service} but nothing listens there (it answered with a reset)")]
    Refused { target: IpAddr, service: String },
    #[error("probing {target}: {what}: {source}")]
    Io {
        target: IpAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    if File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_err() {
        let t = super::monotonic_ns();
        #[expect(clippy::cast_possible_truncation, reason = "mixing bits")]
        return (t ^ (t >> 32)) as u32;
    }
    u32::from_ne_bytes(b)
}

/// Builds the inner packet: IP header from `src` to the service, TCP segment with `flags`.
fn inner_packet(src: IpAddr, service: &ServiceInfo, sport: u16, seq: u32, flags: u8) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&service.port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let mut pkt = Vec::with_capacity(60);
    match (src, service.addr) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[6] = 0x40;
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = redirector_common::decide::ipv4_header_checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            pkt.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            pkt.extend_from_slice(&ip);
        }
        _ => unreachable!("families checked by the caller"),
    }
    pkt.extend_from_slice(&tcp);
    redirector_common::decide::set_tcp_checksum(&mut pkt);
    pkt
}

/// Probes `service` on `target`; Ok once the target's listener answered with a SYN-ACK.
pub fn probe(probes: &mut HashMap<&mut MapData, u32, ProbeValue>, service: &ServiceInfo, target: IpAddr, timeout: Duration) -> Result<(), ProbeError> {
    let tunnel = Tunnel::open(service.tunnel_src, target).map_err(|source| ProbeError::Io { target, what: "opening the tunnel", source })?;
    let send = |pkt: &[u8]| tunnel.send(pkt).map_err(|source| ProbeError::Io { target, what: "sending the probe", source });
    let sport = u16::try_from(40_000 + random_u32() % 20_000).unwrap_or(40_000);
    let isn = random_u32();
    let key = u32::from(sport);
    let empty = ProbeValue { tcp_flags: 0, _pad: [0; 3], ack: isn.wrapping_add(1), seen_ns: 0 };
    probes.insert(key, empty, 0).map_err(|e| ProbeError::Io { target, what: "registering the probe", source: std::io::Error::other(e) })?;
    let syn = inner_packet(service.tunnel_src, service, sport, isn, TCP_SYN);
    let start = Instant::now();
    let mut next_send = start;
    let result = loop {
        if Instant::now() >= next_send {
            if let Err(e) = send(&syn) {
                break Err(e);
            }
            next_send = Instant::now() + Duration::from_millis(200);
        }
        let flags = probes.get(&key, 0).map_or(0, |v| v.tcp_flags);
        if flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
            // Reset the target's half-open connection.
            let rst = inner_packet(service.tunnel_src, service, sport, isn.wrapping_add(1), TCP_RST);
            let _ = send(&rst);
            break Ok(());
        }
        if flags & TCP_RST != 0 {
            break Err(ProbeError::Refused { target, service: sock(service.addr, service.port) });
        }
        if start.elapsed() >= timeout {
            break Err(ProbeError::Timeout { target, service: sock(service.addr, service.port), tunnel_src: service.tunnel_src, ms: timeout.as_millis() });
        }
        // An answer through a healthy tunnel takes well under a millisecond: poll finely at
        // first, then gently until the timeout.
        thread::sleep(if start.elapsed() < Duration::from_millis(20) { Duration::from_micros(100) } else { Duration::from_millis(2) });
    };
    let _ = probes.remove(&key);
    result
}
