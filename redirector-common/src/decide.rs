//! Packet decisions as pure functions, shared by the classifier and host unit tests.

use crate::{Addr, RuleValue, as_v4};

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

/// Where a rule is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    /// Not withdrawn: new connections go to the target.
    Active,
    /// Withdrawn, for `left_ns` more: new connections stay here, flows living on the target
    /// still go there.
    Draining { left_ns: u64 },
    /// The drain period ended: the rule is inert (as if there were none) until user space
    /// removes it.
    Drained,
}

/// Where `rule` is in its life at `now_ns` (`CLOCK_MONOTONIC`, as `bpf_ktime_get_ns`): the one
/// place that decides whether a rule has drained, for the classifier, the listing and the
/// removal of drained rules.
#[must_use]
pub const fn drain_state(rule: &RuleValue, now_ns: u64) -> Drain {
    if rule.drain_until_ns == 0 {
        Drain::Active
    } else if now_ns >= rule.drain_until_ns {
        Drain::Drained
    } else {
        Drain::Draining { left_ns: rule.drain_until_ns - now_ns }
    }
}

/// Decides the first step for a TCP packet with `tcp_flags` from a migrated client.
#[must_use]
pub const fn migrated_step(tcp_flags: u8, rule: &RuleValue, now_ns: u64) -> Step {
    let draining = match drain_state(rule, now_ns) {
        Drain::Drained => return Step::Inert,
        Drain::Draining { .. } => true,
        Drain::Active => false,
    };
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN { if draining { Step::KeepDraining } else { Step::ForwardNew } } else { Step::CheckSocket }
}

/// A source no client has: loopback, unspecified or "this network" (`0.0.0.0/8`), IPv4 or IPv6
/// (`a` in the 16-byte form). A tunnelled packet from such a source is a forgery.
#[must_use]
pub const fn never_a_client(a: &Addr) -> bool {
    match as_v4(a) {
        Some([b0, ..]) => b0 == 127 || b0 == 0,
        None => {
            let mut i = 0;
            while i < 15 {
                if a[i] != 0 {
                    return false;
                }
                i += 1;
            }
            a[15] <= 1
        }
    }
}

/// Whether TCP `flags` are those of an answer to a connection attempt (SYN-ACK or RST): what
/// a readiness probe gets back.
#[must_use]
pub const fn is_answer(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) || flags & TCP_RST != 0
}

/// What a socket lookup for a non-SYN packet found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// No socket at all for this service on this host.
    Nothing,
    /// An established or request (half-open) socket: the flow lives here.
    Flow,
    /// A time-wait socket (`TCP_TIME_WAIT`): a connection that ended here, which only ever
    /// receives retransmissions of its end.
    TimeWait,
    /// Only the listener; `cookie_ok` says whether the packet is a valid SYN-cookie ACK.
    Listener { cookie_ok: bool },
}

/// TCP states as `bpf_sock.state` reports them (the kernel's `TCP_*` numbers).
pub const TCP_ESTABLISHED: u32 = 1;
/// Also the state of a time-wait socket kept for a closed socket's `FIN_WAIT2`.
pub const TCP_TIME_WAIT: u32 = 6;
pub const TCP_LISTEN: u32 = 10;
/// A request socket (half-open, SYN-ACK sent).
pub const TCP_NEW_SYN_RECV: u32 = 12;

/// What a socket lookup found, from the state of the socket it returned. `cookie_ok` is asked
/// only for a listener: whether the packet is a valid SYN-cookie ACK.
#[must_use]
#[inline(always)]
pub fn found_socket(state: u32, cookie_ok: impl FnOnce() -> bool) -> Found {
    match state {
        TCP_LISTEN => Found::Listener { cookie_ok: cookie_ok() },
        TCP_TIME_WAIT => Found::TimeWait,
        _ => Found::Flow,
    }
}

/// Where a non-SYN packet of a migrated client (or an ICMP error about its flow) goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Its flow lives here: it stays.
    Local,
    /// It completes this host's own SYN-cookie handshake: it stays.
    Syncookie,
    /// No socket here: its flow lives on the target.
    Target,
    /// Only a time-wait socket here while the rule is active: the connection that ended here
    /// is over for the application, and the client's new connections (a new incarnation of
    /// the same 4-tuple included) live on the target.
    TargetPastTimeWait,
}

/// Where a non-SYN packet of a client migrated by `rule` (active or draining, not drained)
/// goes, given what the socket lookup `found`.
///
/// While the rule drains, new connections are served here, so a time-wait socket here may be
/// followed by a new incarnation here: it counts as a flow living here.
#[must_use]
pub const fn place(found: Found, rule: &RuleValue) -> Place {
    match found {
        Found::Flow => Place::Local,
        Found::TimeWait if rule.drain_until_ns != 0 => Place::Local,
        Found::TimeWait => Place::TargetPastTimeWait,
        Found::Listener { cookie_ok: true } => Place::Syncookie,
        Found::Listener { cookie_ok: false } | Found::Nothing => Place::Target,
    }
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

/// Size of the buffer TCP options are copied into: 64 bytes for at most 40 of options, so
/// that every index masked with 63 is inside it (which the verifier can see).
pub const OPTS_BUF: usize = 64;

/// Offset and value of the MSS option among the first `len` (at most 40) option bytes.
#[must_use]
#[inline(always)]
pub fn find_mss(opts: &[u8; OPTS_BUF], len: usize) -> Option<(usize, u16)> {
    // Masked: in bounds whichever offset the compiler reads at.
    let at = |i: usize| opts[i & (OPTS_BUF - 1)];
    let len = if len > 40 { 40 } else { len };
    // Written for the verifier, which walks every path through it in each program that clamps:
    // every position is visited in turn, so where the next option starts (`next`, from the
    // packet, capped) is only compared with it; and `len` is looked at once, for the option
    // found, because the walk never crosses it before (positions only grow). Walking from
    // option to option (`i += len`, `i < len` at each step) made each offset the packet could
    // give a path of its own: more than half a million instructions processed per program,
    // seconds of each load.
    let mut next = 0usize;
    for pos in 0..40 {
        // Opaque to the compiler, which would otherwise skip straight to `next` and read there,
        // at an offset from the packet, undoing the above.
        let pos = core::hint::black_box(pos);
        if pos < next {
            continue;
        }
        match at(pos) {
            0 => return None,
            1 => next = pos + 1,
            2 => return if at(pos + 1) == 4 && pos + 4 <= len { Some((pos, u16::from_be_bytes([at(pos + 2), at(pos + 3)]))) } else { None },
            _ => {
                let olen = usize::from(at(pos + 1));
                if olen < 2 {
                    return None;
                }
                next = if pos + olen > 40 { 40 } else { pos + olen };
            }
        }
    }
    None
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

/// Sets the TCP checksum of `p`, a whole TCP packet from its IP header on (IPv4 with its
/// header length, or IPv6 without extension headers), over the pseudo-header and the segment
/// its IP header says (never past the end of `p`); a packet too short for a TCP header is left
/// alone. For packets user space builds or forwards (the readiness probe, replayed packets).
pub fn set_tcp_checksum(p: &mut [u8]) {
    let Some(&first) = p.first() else { return };
    let v4 = first >> 4 == 4;
    // Where the segment starts and ends, and the pseudo-header's addresses.
    let (l4, end, addrs) = match (v4, p.get(2..6)) {
        (true, Some(&[a, b, _, _])) => (usize::from(first & 0x0f) * 4, usize::from(u16::from_be_bytes([a, b])), 12..20),
        (false, Some(&[_, _, a, b])) => (40, 40 + usize::from(u16::from_be_bytes([a, b])), 8..40),
        _ => return,
    };
    let end = end.min(p.len());
    if end < l4 + 18 {
        return;
    }
    p[l4 + 16] = 0;
    p[l4 + 17] = 0;
    let len = u32::try_from(end - l4).unwrap_or(0);
    // The pseudo-header: addresses, protocol, segment length; then the segment.
    let mut sum: u32 = 6 + (len >> 16) + (len & 0xffff);
    for chunk in p[addrs].chunks(2).chain(p[l4..end].chunks(2)) {
        sum += u32::from(u16::from_be_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let c = !(sum as u16);
    p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
}

/// Checksum of the outer IPv4 header the classifier writes (version 4, 20 bytes, TTL 64,
/// protocol 4, no fragment offset), from its variable fields, without serializing it.
#[must_use]
#[inline(always)]
pub fn outer_v4_checksum(tos: u8, total: [u8; 2], id: [u8; 2], df: u8, src: [u8; 4], dst: [u8; 4]) -> u16 {
    let w = |a: u8, b: u8| u32::from(u16::from_be_bytes([a, b]));
    let mut sum = w(0x45, tos) + w(total[0], total[1]) + w(id[0], id[1]) + w(df, 0) + w(64, 4) + w(src[0], src[1]) + w(src[2], src[3]) + w(dst[0], dst[1]) + w(dst[2], dst[3]);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    !folded
}

/// The outer IPv4 header of a tunnelled packet from `src` to `dst` around an inner IPv4 packet
/// of `inner_len` bytes whose first 8 header bytes are `first`: it keeps the inner header's
/// TOS, id and DF bit (a non-DF outer datagram that gets fragmented on the way needs a real
/// id). The classifier and the XDP fast path both write this header.
#[must_use]
#[inline(always)]
pub fn outer_v4(first: [u8; 8], inner_len: u32, src: [u8; 4], dst: [u8; 4]) -> [u8; 20] {
    let total = u16::try_from(inner_len + 20).unwrap_or(u16::MAX).to_be_bytes();
    let (tos, id, df) = (first[1], [first[4], first[5]], first[6] & 0x40);
    let csum = outer_v4_checksum(tos, total, id, df, src, dst).to_be_bytes();
    [0x45, tos, total[0], total[1], id[0], id[1], df, 0, 64, 4, csum[0], csum[1], src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3]]
}

/// The outer IPv6 header of a tunnelled packet from `src` to `dst` around an inner IPv6 packet
/// of `inner_len` bytes whose first 4 header bytes (version, traffic class, flow label) are
/// `first`, which it keeps.
#[must_use]
#[inline(always)]
pub fn outer_v6(first: [u8; 4], inner_len: u32, src: &Addr, dst: &Addr) -> [u8; 40] {
    let payload = u16::try_from(inner_len).unwrap_or(u16::MAX).to_be_bytes();
    let mut outer = [0u8; 40];
    outer[0..4].copy_from_slice(&first);
    outer[4..6].copy_from_slice(&payload);
    outer[6] = 41;
    outer[7] = 64;
    outer[8..24].copy_from_slice(src);
    outer[24..40].copy_from_slice(dst);
    outer
}

/// A checksum (as stored, network order value) after one 16-bit word it covers changed from
/// `old` to `new` (RFC 1624: `~(~sum + ~old + new)`), for programs without the kernel's
/// checksum helpers (XDP).
#[must_use]
#[inline(always)]
pub const fn csum_replace16(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!csum) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Big-endian field `v` at byte `at` of checksummed data, as the word it adds to the checksum
/// in memory order (what the kernel's checksum helpers take): a field at an odd offset
/// straddles two of the checksum's words, so its bytes count swapped there. (An MSS option may
/// sit at an odd offset; updating the checksum as if it did not left the segment invalid.)
#[must_use]
#[inline(always)]
pub const fn csum_word(at: usize, v: u16) -> u16 {
    let [hi, lo] = v.to_be_bytes();
    u16::from_ne_bytes(if at.is_multiple_of(2) { [hi, lo] } else { [lo, hi] })
}

/// What the origin's XDP fast path does with a non-SYN packet of a migrated client, given where
/// [`place`] puts it: forward it to the target (with the classifier's own counter), or `None`:
/// the flow stays here (a socket, a SYN-cookie handshake), which the classifier keeps and
/// counts, so the packet is passed on to it.
#[must_use]
pub const fn fast_forward(place: Place) -> Option<crate::Counter> {
    match place {
        Place::Target => Some(crate::Counter::ForwardedExisting),
        Place::TargetPastTimeWait => Some(crate::Counter::ForwardedTimeWait),
        Place::Local | Place::Syncookie => None,
    }
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

    #[test]
    fn loopback_and_unspecified_sources_are_never_clients() {
        let v6 = |s: &str| s.parse::<core::net::Ipv6Addr>().unwrap().octets();
        for a in [crate::v4_mapped([127, 0, 0, 1]), crate::v4_mapped([127, 9, 9, 9]), crate::v4_mapped([0, 0, 0, 0]), crate::v4_mapped([0, 1, 2, 3]), v6("::1"), v6("::")] {
            assert!(never_a_client(&a), "{a:?}");
        }
        for a in [crate::v4_mapped([198, 18, 1, 5]), crate::v4_mapped([128, 0, 0, 1]), v6("2001:db8::1"), v6("::2")] {
            assert!(!never_a_client(&a), "{a:?}");
        }
    }

    fn rule(drain_until_ns: u64) -> RuleValue {
        RuleValue { target: [0; 16], drain_until_ns, since_unix: 0 }
    }

    #[test]
    fn a_rule_drains_at_its_deadline() {
        for now in [0, 1, u64::MAX] {
            assert_eq!(drain_state(&rule(0), now), Drain::Active, "a rule without deadline is active at {now}");
        }
        assert_eq!(drain_state(&rule(1), 0), Drain::Draining { left_ns: 1 });
        assert_eq!(drain_state(&rule(100), 50), Drain::Draining { left_ns: 50 });
        assert_eq!(drain_state(&rule(100), 99), Drain::Draining { left_ns: 1 });
        assert_eq!(drain_state(&rule(100), 100), Drain::Drained, "drained at the deadline itself");
        assert_eq!(drain_state(&rule(100), 101), Drain::Drained);
        assert_eq!(drain_state(&rule(u64::MAX), u64::MAX), Drain::Drained);
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
        for r in [rule(0), rule(100)] {
            assert_eq!(place(Found::Flow, &r), Place::Local);
            assert_eq!(place(Found::Listener { cookie_ok: true }, &r), Place::Syncookie);
            assert_eq!(place(Found::Listener { cookie_ok: false }, &r), Place::Target);
            assert_eq!(place(Found::Nothing, &r), Place::Target);
        }
    }

    #[test]
    fn socket_states() {
        let no_cookie = || -> bool { panic!("the SYN cookie is checked for listeners only") };
        assert_eq!(found_socket(TCP_ESTABLISHED, no_cookie), Found::Flow);
        assert_eq!(found_socket(TCP_NEW_SYN_RECV, no_cookie), Found::Flow);
        // FIN_WAIT1, CLOSE_WAIT, LAST_ACK: full sockets of a connection still ending here.
        for state in [4, 8, 9] {
            assert_eq!(found_socket(state, no_cookie), Found::Flow);
        }
        assert_eq!(found_socket(TCP_TIME_WAIT, no_cookie), Found::TimeWait);
        assert_eq!(found_socket(TCP_LISTEN, || true), Found::Listener { cookie_ok: true });
        assert_eq!(found_socket(TCP_LISTEN, || false), Found::Listener { cookie_ok: false });
    }

    #[test]
    fn time_wait_is_passed_by_an_active_rule_and_kept_by_a_draining_one() {
        let no_cookie = || -> bool { panic!("not a listener") };
        // Active: new connections of the client live on the target, a new incarnation too.
        assert_eq!(place(found_socket(TCP_TIME_WAIT, no_cookie), &rule(0)), Place::TargetPastTimeWait);
        // Draining: new connections are served here, so is a new incarnation.
        assert_eq!(place(found_socket(TCP_TIME_WAIT, no_cookie), &rule(100)), Place::Local);
        // Established and half-open flows stay either way.
        for r in [rule(0), rule(100)] {
            assert_eq!(place(found_socket(TCP_ESTABLISHED, no_cookie), &r), Place::Local);
            assert_eq!(place(found_socket(TCP_NEW_SYN_RECV, no_cookie), &r), Place::Local);
        }
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
        let h = [0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7];
        assert_eq!(ipv4_header_checksum(&h), 0xb861);
    }

    /// The one's-complement sum over the pseudo-header and the segment, checksum included:
    /// 0xffff when the checksum is right.
    fn tcp_sum(p: &[u8], l4: usize, addrs: core::ops::Range<usize>) -> u32 {
        let len = u32::try_from(p.len() - l4).unwrap();
        let mut sum = 6 + len;
        for c in p[addrs].chunks(2).chain(p[l4..].chunks(2)) {
            sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum
    }

    #[test]
    fn tcp_checksums_are_set_for_both_families_and_odd_lengths() {
        let mut v4 = [0x45, 0, 0, 45, 0, 0, 0x40, 0, 64, 6, 0, 0, 198, 18, 1, 5, 198, 18, 0, 10].to_vec();
        v4.extend([0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 4, 0, 0xde, 0xad, 0, 0]);
        v4.extend(b"hello");
        set_tcp_checksum(&mut v4);
        assert_ne!(&v4[36..38], &[0xde, 0xad]);
        assert_eq!(tcp_sum(&v4, 20, 12..20), 0xffff);
        let mut v6 = [0x60, 0, 0, 0, 0, 21, 6, 64].to_vec();
        v6.extend([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 5]);
        v6.extend([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        v6.extend([0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 4, 0, 0, 0, 0, 0, b'!']);
        set_tcp_checksum(&mut v6);
        assert_eq!(tcp_sum(&v6, 40, 8..40), 0xffff);
        // Too short for a TCP header: left alone.
        let mut short = v4[..30].to_vec();
        short[2..4].copy_from_slice(&30u16.to_be_bytes());
        let before = short.clone();
        set_tcp_checksum(&mut short);
        assert_eq!(short, before);
        set_tcp_checksum(&mut []);
    }

    #[test]
    fn outer_checksum_matches_the_serialized_header() {
        for (tos, total, id, df, src, dst) in [
            (0u8, [0u8, 60], [0x12, 0x34], 0x40u8, [198, 18, 0, 1], [198, 18, 0, 2]),
            (0xb8, [0xff, 0xff], [0xff, 0xff], 0, [255, 255, 255, 255], [0, 0, 0, 0]),
            (0x10, [5, 220], [0, 0], 0x40, [10, 1, 2, 3], [192, 168, 254, 254]),
        ] {
            let h = [0x45, tos, total[0], total[1], id[0], id[1], df, 0, 64, 4, 0, 0, src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3]];
            assert_eq!(outer_v4_checksum(tos, total, id, df, src, dst), ipv4_header_checksum(&h));
        }
    }

    fn opts(bytes: &[u8]) -> [u8; OPTS_BUF] {
        let mut o = [0u8; OPTS_BUF];
        o[..bytes.len()].copy_from_slice(bytes);
        o
    }

    #[test]
    fn mss_is_found_wherever_it_is() {
        assert_eq!(find_mss(&opts(&[2, 4, 5, 0xb4]), 4), Some((0, 1460)));
        // NOP, NOP, timestamps, then MSS.
        let o = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2, 2, 4, 0x05, 0x78];
        assert_eq!(find_mss(&opts(&o), o.len()), Some((12, 1400)));
        // End of options, a bad length, a truncated MSS, none at all: no MSS.
        assert_eq!(find_mss(&opts(&[0, 2, 4, 5, 0xb4]), 5), None);
        assert_eq!(find_mss(&opts(&[3, 0, 2, 4, 5, 0xb4]), 6), None);
        assert_eq!(find_mss(&opts(&[2, 4, 5]), 3), None);
        assert_eq!(find_mss(&opts(&[1, 1, 1, 1]), 4), None);
        // A length claiming more than 40 bytes is capped.
        assert_eq!(find_mss(&opts(&[1; 40]), 255), None);
    }

    /// The plain walk from option to option, as the scan was first written: what
    /// [`find_mss`] must find, on any bytes.
    fn walk(opts: &[u8; OPTS_BUF], len: usize) -> Option<(usize, u16)> {
        let len = len.min(40);
        let mut i = 0;
        while i < len {
            match opts[i] {
                0 => return None,
                1 => i += 1,
                kind => {
                    if i + 1 >= len {
                        return None;
                    }
                    let olen = usize::from(opts[i + 1]);
                    if kind == 2 {
                        return (olen == 4 && i + 4 <= len).then(|| (i, u16::from_be_bytes([opts[i + 2], opts[i + 3]])));
                    }
                    if olen < 2 {
                        return None;
                    }
                    i += olen;
                }
            }
        }
        None
    }

    #[test]
    fn the_scan_finds_what_the_plain_walk_finds_on_any_options() {
        // Options made of the kinds a SYN carries, NOPs, ends and junk, with lengths right and
        // wrong, and bytes past `len` that are not zero; every `len` up to past 40.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut found = 0;
        for _ in 0..200_000 {
            let mut o = [0u8; OPTS_BUF];
            let mut i = 0;
            while i < OPTS_BUF {
                let r = next();
                let (kind, olen) = match r % 8 {
                    0 | 1 => (1, 1),
                    2 => (2, 4),
                    3 => (8, 10),
                    4 => (4, 2),
                    5 => (3, 3),
                    6 => (0, 1),
                    _ => ((r >> 8) as u8, ((r >> 16) % 12) as usize),
                };
                o[i] = kind;
                if olen > 1 && i + 1 < OPTS_BUF {
                    // Now and then a length that lies.
                    o[i + 1] = if (r >> 24) % 16 == 0 { (r >> 32) as u8 } else { olen as u8 };
                    for b in o.iter_mut().take((i + olen).min(OPTS_BUF)).skip(i + 2) {
                        *b = (next() >> 40) as u8;
                    }
                }
                i += olen.max(1);
            }
            let len = (next() % 48) as usize;
            let want = walk(&o, len);
            found += usize::from(want.is_some());
            assert_eq!(find_mss(&o, len), want, "options {o:?}, len {len}");
        }
        assert!(found > 10_000, "the options had an MSS often enough to mean something: {found}");
    }

    #[test]
    fn a_field_at_an_odd_offset_updates_the_checksum_as_a_full_sum_would() {
        // The checksum in memory order, as the kernel keeps it, over bytes of odd length too.
        let sum = |b: &[u8]| -> u16 {
            let mut s: u32 = b.chunks(2).map(|w| u32::from(u16::from_ne_bytes([w[0], *w.get(1).unwrap_or(&0)]))).sum();
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            !(s as u16)
        };
        let mut data = [0u8; 41];
        for (i, b) in (0u8..).zip(data.iter_mut()) {
            *b = i.wrapping_mul(37).wrapping_add(11);
        }
        for at in 0..data.len() - 1 {
            for new in [0x05b4u16, 0x0000, 0xffff, 0x1234] {
                let old = u16::from_be_bytes([data[at], data[at + 1]]);
                let mut after = data;
                after[at..at + 2].copy_from_slice(&new.to_be_bytes());
                assert_eq!(csum_replace16(sum(&data), csum_word(at, old), csum_word(at, new)), sum(&after), "field at {at}: {old:#x} -> {new:#x}");
            }
        }
    }

    #[test]
    fn outer_headers_are_the_inner_packets_own() {
        let first = [0x45, 0xb8, 0, 60, 0x12, 0x34, 0x40, 0];
        let h = outer_v4(first, 60, [198, 18, 0, 1], [198, 18, 0, 2]);
        assert_eq!(&h[..10], &[0x45, 0xb8, 0, 80, 0x12, 0x34, 0x40, 0, 64, 4]);
        assert_eq!(u16::from_be_bytes([h[10], h[11]]), outer_v4_checksum(0xb8, [0, 80], [0x12, 0x34], 0x40, [198, 18, 0, 1], [198, 18, 0, 2]));
        assert_eq!(&h[12..], &[198, 18, 0, 1, 198, 18, 0, 2]);
        assert_eq!(&outer_v4(first, 70_000, [0; 4], [0; 4])[2..4], &[0xff, 0xff], "capped");
        let (src, dst) = ([1u8; 16], [2u8; 16]);
        let h = outer_v6([0x60, 0x0a, 0xbc, 0xde], 1280, &src, &dst);
        assert_eq!(&h[..8], &[0x60, 0x0a, 0xbc, 0xde, 0x05, 0x00, 41, 64]);
        assert_eq!((&h[8..24], &h[24..]), (&src[..], &dst[..]));
    }

    #[test]
    fn a_replaced_word_updates_the_checksum_as_a_full_sum_would() {
        // A TCP-like segment: the checksum over the words, one of them changed.
        let sum = |w: &[u16]| -> u16 {
            let mut s: u32 = w.iter().map(|x| u32::from(*x)).sum();
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            !(s as u16)
        };
        for (words, i, new) in [([0x0204, 0x05b4, 0x1234, 0xffff], 1, 0x05a0), ([0, 0, 0xfffe, 0], 2, 0xffff), ([0x8000, 0x7fff, 1, 0], 0, 0)] {
            let before = sum(&words);
            let mut after = words;
            after[i] = new;
            assert_eq!(csum_replace16(before, words[i], new), sum(&after), "{words:x?}[{i}] -> {new:#x}");
        }
    }

    #[test]
    fn the_fast_path_forwards_only_what_the_classifier_forwards() {
        assert_eq!(fast_forward(Place::Target), Some(crate::Counter::ForwardedExisting));
        assert_eq!(fast_forward(Place::TargetPastTimeWait), Some(crate::Counter::ForwardedTimeWait));
        assert_eq!(fast_forward(Place::Local), None);
        assert_eq!(fast_forward(Place::Syncookie), None);
    }

    #[test]
    fn icmp_error_types() {
        assert!(icmp4_is_error(3));
        assert!(!icmp4_is_error(8));
        assert!(icmp6_is_error(2));
        assert!(!icmp6_is_error(128));
    }
}
