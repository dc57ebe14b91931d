//! Packet decisions as pure functions, shared by the classifier and host unit tests.

use crate::RuleValue;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Outer header sizes added by the tunnel.
pub const OUTER_V4: u16 = 20;
pub const OUTER_V6: u16 = 40;

/// What to do with a TCP packet from a client that matched a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The rule has finished draining: behave as if there were none.
    Inert,
    /// A new connection while the rule is active: send it to the target.
    ForwardNew,
    /// A new connection while the rule drains: keep it here.
    KeepDraining,
    /// Part of an existing flow: it stays if this host holds a socket for it.
    CheckSocket,
}

/// Decides the first step for a TCP packet with `tcp_flags` from a migrated client.
#[must_use]
pub const fn migrated_step(tcp_flags: u8, rule: &RuleValue, now_ns: u64) -> Step {
    let draining = rule.drain_until_ns != 0;
    if draining && now_ns >= rule.drain_until_ns {
        return Step::Inert;
    }
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        if draining { Step::KeepDraining } else { Step::ForwardNew }
    } else {
        Step::CheckSocket
    }
}

/// What a socket lookup for a non-SYN packet found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// No socket at all for this service on this host.
    Nothing,
    /// An established, request (half-open) or TIME_WAIT socket: the flow lives here.
    Flow,
    /// Only the listener; `cookie_ok` says whether the packet is a valid SYN-cookie ACK.
    Listener { cookie_ok: bool },
}

/// Whether a non-SYN packet of a migrated client stays on this host.
#[must_use]
pub const fn stays_local(found: Found) -> bool {
    matches!(found, Found::Flow | Found::Listener { cookie_ok: true })
}

/// Largest MSS that fits an uplink of `mtu` bytes once tunnelled.
///
/// `v6` is the family of both the inner and the outer header (they are always the same).
#[must_use]
pub const fn mss_clamp(mtu: u32, v6: bool) -> u16 {
    let overhead: u32 = if v6 { 40 + 40 + 20 } else { 20 + 20 + 20 };
    if mtu <= overhead + 64 {
        return 64;
    }
    let mss = mtu - overhead;
    if mss > 0xffff { 0xffff } else { mss as u16 }
}

/// New MSS value for a SYN announcing `announced`, or `None` if it already fits.
#[must_use]
pub const fn clamped(announced: u16, clamp: u16) -> Option<u16> {
    if clamp != 0 && announced > clamp { Some(clamp) } else { None }
}

/// Internet checksum of an IPv4 header of 20 bytes with its checksum field zero.
#[must_use]
#[inline(always)]
pub fn ipv4_header_checksum(h: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    for pair in h.chunks_exact(2) {
        if let [a, b] = pair {
            sum += u32::from(u16::from_be_bytes([*a, *b]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    !folded
}

/// ICMPv4 types that quote the offending packet and concern a flow.
#[must_use]
pub const fn icmp4_is_error(ty: u8) -> bool {
    matches!(ty, 3 | 11 | 12)
}

/// ICMPv6 types that quote the offending packet and concern a flow.
#[must_use]
pub const fn icmp6_is_error(ty: u8) -> bool {
    matches!(ty, 1..=4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(drain_until_ns: u64) -> RuleValue {
        RuleValue { target: [0; 16], drain_until_ns, since_unix: 0 }
    }

    #[test]
    fn syn_of_active_rule_is_forwarded() {
        assert_eq!(migrated_step(TCP_SYN, &rule(0), 5), Step::ForwardNew);
    }

    #[test]
    fn syn_ack_and_ack_check_the_socket() {
        assert_eq!(migrated_step(TCP_SYN | TCP_ACK, &rule(0), 5), Step::CheckSocket);
        assert_eq!(migrated_step(TCP_ACK, &rule(0), 5), Step::CheckSocket);
        assert_eq!(migrated_step(TCP_RST, &rule(0), 5), Step::CheckSocket);
        assert_eq!(migrated_step(TCP_FIN | TCP_ACK, &rule(0), 5), Step::CheckSocket);
    }

    #[test]
    fn draining_rule_keeps_new_flows_and_forwards_old_ones() {
        assert_eq!(migrated_step(TCP_SYN, &rule(100), 50), Step::KeepDraining);
        assert_eq!(migrated_step(TCP_ACK, &rule(100), 50), Step::CheckSocket);
    }

    #[test]
    fn drained_rule_is_inert() {
        assert_eq!(migrated_step(TCP_SYN, &rule(100), 100), Step::Inert);
        assert_eq!(migrated_step(TCP_ACK, &rule(100), 101), Step::Inert);
    }

    #[test]
    fn socket_decisions() {
        assert!(stays_local(Found::Flow));
        assert!(stays_local(Found::Listener { cookie_ok: true }));
        assert!(!stays_local(Found::Listener { cookie_ok: false }));
        assert!(!stays_local(Found::Nothing));
    }

    #[test]
    fn mss_fits_tunnelled_packets() {
        assert_eq!(mss_clamp(1500, false), 1440);
        assert_eq!(mss_clamp(1500, true), 1400);
        assert_eq!(mss_clamp(9000, false), 8940);
        assert_eq!(mss_clamp(10, false), 64);
        assert_eq!(clamped(1460, 1440), Some(1440));
        assert_eq!(clamped(1400, 1440), None);
        assert_eq!(clamped(1460, 0), None);
    }

    #[test]
    fn ipv4_checksum_matches_known_header() {
        // Example from RFC 1071 style captures: 45 00 00 73 00 00 40 00 40 11 .. c0 a8 00 01 c0 a8 00 c7
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
            0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&h), 0xb861);
    }

    #[test]
    fn icmp_error_types() {
        assert!(icmp4_is_error(3));
        assert!(!icmp4_is_error(8));
        assert!(icmp6_is_error(2));
        assert!(!icmp6_is_error(128));
    }
}
