//! redirector's kernel programs: thin entry points; each concern lives in its own module,
//! with the maps it owns.
//!
//! - `redirector_ingress` (TC ingress on the uplink): on the origin, steers new TCP connections
//!   of migrated clients to their target through IP-in-IP / IPv6-in-IPv6 ([`steer`],
//!   [`forward`]), keeps flows that live here ([`flow`]), relays ICMP errors of flows that live
//!   on a target ([`icmp`]) and records readiness-probe answers ([`probe`]); on the target,
//!   decapsulates tunnelled packets from configured siblings and drops the rest ([`decap`]).
//!   [`ingress`] tells these apart.
//! - `redirector_egress` (TC egress on a target's uplink): clamps the MSS of adopted services'
//!   SYN-ACKs ([`egress`]).
//! - `redirector_sock_ops` (the application's cgroup): counts established connections per
//!   client ([`load`]).
//! - `redirector_sk_lookup` (netns `sk_lookup`): hands connections to an adopted service address
//!   to the listener registered for it ([`sk_lookup`]).
//! - `redirector_xdp` (XDP on the origin's uplink, for services with `SERVICE_XDP`): the fast
//!   path; forwards migrated clients' packets where it decides exactly as the classifier would,
//!   passes everything else on to it ([`xdp`]).
//! - `redirector_empty`, `redirector_xdp_empty`: the benchmarks' baselines.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod addr;
mod adopted;
mod clamp;
mod counters;
mod decap;
mod egress;
mod flow;
mod forward;
mod frozen;
mod hdr;
mod icmp;
mod ingress;
mod load;
mod packet;
mod probe;
mod report;
mod rules;
mod services;
mod sk_lookup;
mod slot;
mod steer;
mod verdict;
mod xdp;
mod zeroed;

use aya_ebpf::{
    bindings::{sk_action, xdp_action},
    macros::{classifier, sk_lookup, sock_ops, xdp},
    programs::{SkLookupContext, SockOpsContext, TcContext, XdpContext},
};
use redirector_common::Counter;

use crate::{
    counters::{count, count_extra},
    verdict::TCX_NEXT,
};

#[classifier]
pub fn redirector_ingress(ctx: TcContext) -> i32 {
    let verdict = match ingress::try_ingress(&ctx) {
        Ok(v) => v,
        Err(e) => {
            // Only on the error path: the common packet pays nothing for the report.
            if e.reported() {
                report::ingress(ctx.skb.skb, e.verdict().counter);
            }
            e.verdict()
        }
    };
    count(verdict.counter);
    verdict.action
}

/// On the origin's uplink, before the stack: forwards what it can decide as the classifier
/// would, counted under the classifier's own counter and `xdp-forwarded`; passes the rest on to
/// the classifier (`xdp-passed`).
#[xdp]
pub fn redirector_xdp(ctx: XdpContext) -> u32 {
    match xdp::fast_path(&ctx) {
        Ok(counter) => {
            // `forwarded-time-wait` is one of `COUNTERS_EXTRA`, the others of `COUNTERS`.
            count(counter);
            count_extra(counter);
            count_extra(Counter::XdpForwarded);
            xdp_action::XDP_TX
        }
        Err(xdp::Pass) => {
            count_extra(Counter::XdpPassed);
            xdp_action::XDP_PASS
        }
    }
}

/// Does nothing: the XDP benchmark's baseline.
#[xdp]
pub fn redirector_xdp_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The interface [`redirector_xdp_bench_source`] sends to (set at load time).
#[unsafe(no_mangle)]
static XDP_BENCH_TO: u32 = 0;

/// The XDP benchmark's traffic source, never attached by redirector: sends every packet on to
/// interface `XDP_BENCH_TO` as an XDP frame, so that the origin's uplink (a veth) receives
/// frames without a socket buffer, as a NIC's driver hands them to XDP.
#[xdp]
pub fn redirector_xdp_bench_source(_ctx: XdpContext) -> u32 {
    // SAFETY: a global the loader sets; read once per packet.
    let to = unsafe { core::ptr::read_volatile(&raw const XDP_BENCH_TO) };
    // SAFETY: a plain helper call.
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "an XDP action")]
    let action = unsafe { aya_ebpf::helpers::generated::bpf_redirect(to, 0) } as u32;
    action
}

/// On a target's uplink egress: lowers the MSS announced by SYN-ACKs of adopted services, so
/// the client's segments, tunnelled by the origin, fit the uplink. (The origin clamps the
/// client's SYN, which bounds what the target sends; what the client sends is bounded only by
/// the SYN-ACK, which never passes the origin.)
#[classifier]
pub fn redirector_egress(ctx: TcContext) -> i32 {
    if egress::muted(&ctx) {
        count_extra(Counter::DroppedMuted);
        return aya_ebpf::bindings::TC_ACT_SHOT;
    }
    if egress::try_egress(&ctx).unwrap_or(false) {
        count(Counter::ClampedSynAck);
    }
    TCX_NEXT
}

/// On the application's cgroup: counts established connections per client address, up when
/// a connection is accepted, down when it leaves ESTABLISHED.
#[sock_ops]
pub fn redirector_sock_ops(ctx: SockOpsContext) -> u32 {
    load::on_sock_op(&ctx);
    1
}

/// Does nothing: the baseline the benchmark measures the classifier against.
#[classifier]
pub fn redirector_empty(_ctx: TcContext) -> i32 {
    TCX_NEXT
}

/// Hands connections to an adopted service to its listener; every other lookup goes on.
#[sk_lookup]
pub fn redirector_sk_lookup(ctx: SkLookupContext) -> u32 {
    if let Some(counter) = sk_lookup::deliver(&ctx) {
        count(counter);
    }
    sk_action::SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
