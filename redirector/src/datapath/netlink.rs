//! The kernel's own interfaces for what the datapath changes and reads outside BPF: routes
//! through rtnetlink, listening sockets through `sock_diag`. No `ip` to run, no text to parse.

use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols};

use super::{Error, Result};

/// The kernel's `local` routing table.
const RT_TABLE_LOCAL: u8 = 255;

/// Sends `msg` on a fresh netlink socket of `protocol` and hands every message of the answer to
/// `each` until the kernel says it is done (a dump's end, or the acknowledgement of a change).
/// A negative acknowledgement is the error `errno`, with `what` said.
fn exchange<M>(protocol: isize, flags: u16, msg: M, what: &str, mut each: impl FnMut(M)) -> Result<()>
where
    M: NetlinkSerializable + NetlinkDeserializable + std::fmt::Debug,
{
    let io = |e: std::io::Error| Error::io(what.to_string(), e);
    let mut socket = Socket::new(protocol).map_err(io)?;
    socket.bind_auto().map_err(io)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).map_err(io)?;
    let mut rx = Vec::with_capacity(1 << 16);
    loop {
        rx.clear();
        let n = socket.recv(&mut rx, 0).map_err(io)?;
        let mut at = 0;
        while at < n {
            let m = NetlinkMessage::<M>::deserialize(&rx[at..n]).map_err(|e| Error::invalid(format!("{what}: the kernel's answer does not parse: {e}")))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::InnerMessage(inner) => each(inner),
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => match e.code {
                    None => return Ok(()),
                    Some(code) => return Err(Error::io(what.to_string(), std::io::Error::from_raw_os_error(-code.get()))),
                },
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len;
        }
    }
}

/// The `local` route of `addr` through the loopback interface, as `ip route ... local ADDR dev
/// lo table local` writes it.
fn local_route(addr: IpAddr, scope: RouteScope) -> Result<RouteMessage> {
    let lo = super::net::ifindex("lo")?;
    let mut msg = RouteMessage::default();
    msg.header = RouteHeader {
        address_family: if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 },
        destination_prefix_length: if addr.is_ipv4() { 32 } else { 128 },
        table: RT_TABLE_LOCAL,
        protocol: RouteProtocol::Boot,
        scope,
        kind: RouteType::Local,
        ..RouteHeader::default()
    };
    msg.attributes = vec![RouteAttribute::Table(u32::from(RT_TABLE_LOCAL)), RouteAttribute::Destination(RouteAddress::from(addr)), RouteAttribute::Oif(lo)];
    Ok(msg)
}

/// Adds (or replaces) the `local` route of `addr`.
pub fn add_local_route(addr: IpAddr) -> Result<()> {
    let msg = RouteNetlinkMessage::NewRoute(local_route(addr, RouteScope::Host)?);
    exchange(protocols::NETLINK_ROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, msg, &format!("adding the local route of {addr}"), drop)
}

/// Removes the `local` route of `addr`; a route that is not there is fine.
pub fn remove_local_route(addr: IpAddr) -> Result<()> {
    // Scope "nowhere" matches the route whatever its scope, as `ip route del` does.
    let msg = RouteNetlinkMessage::DelRoute(local_route(addr, RouteScope::NoWhere)?);
    match exchange(protocols::NETLINK_ROUTE, NLM_F_REQUEST | NLM_F_ACK, msg, &format!("removing the local route of {addr}"), drop) {
        Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        r => r,
    }
}

/// Inode of the listening TCP socket bound exactly to `addr:port` in this namespace.
pub fn listening_inode(addr: IpAddr, port: u16) -> Result<u64> {
    let request = SockDiagMessage::InetRequest(InetRequest {
        family: if addr.is_ipv4() { AF_INET } else { AF_INET6 },
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::LISTEN,
        socket_id: if addr.is_ipv4() { SocketId::new_v4() } else { SocketId::new_v6() },
    });
    let mut found = None;
    exchange(protocols::NETLINK_SOCK_DIAG, NLM_F_REQUEST | NLM_F_DUMP, request, "listing listening TCP sockets (sock_diag)", |m| {
        if let SockDiagMessage::InetResponse(r) = m
            && r.header.socket_id.source_address == addr
            && r.header.socket_id.source_port == port
        {
            found.get_or_insert(u64::from(r.header.inode));
        }
    })?;
    found.ok_or_else(|| Error::invalid(format!("no TCP socket listens on {} in this network namespace", super::types::sock(addr, port))))
}
