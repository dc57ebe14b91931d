//! Steering on the origin: where a migrated client's TCP packet goes (forwarded to its target,
//! or kept for a flow that lives here).

use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use redirector_common::{
    Counter, RuleValue, ServiceValue,
    decide::{self, Found, Place, Step, migrated_step},
};

use crate::{
    clamp::clamp_syn,
    counters::count_extra,
    flow::{lookup_packet_v4, lookup_packet_v6},
    forward::forward,
    hdr::{ETH_LEN, IP4_LEN, IP6_LEN, TcpHdr},
    packet::{ptr_at, subprogram_ctx},
    rules::now_if_draining,
    verdict::{Error, Verdict, pass},
};

/// A TCP packet of a migrated client (`rule`) to a steered service: forward a new connection,
/// keep a flow that lives here, forward one that does not.
#[inline(never)]
pub fn steer<const V6: bool>(skb: *mut __sk_buff, service: &ServiceValue, rule: &RuleValue) -> Result<Verdict, Error> {
    let ctx = &subprogram_ctx(skb);
    let v6 = V6;
    let l4 = if v6 { ETH_LEN + IP6_LEN } else { ETH_LEN + IP4_LEN };
    let tcp: *const TcpHdr = ptr_at(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let flags = unsafe { (*tcp).flags };
    match migrated_step(flags, rule, now_if_draining(rule)) {
        Step::Inert => Ok(pass(Counter::PassedNotMigrated)),
        Step::KeepDraining => Ok(pass(Counter::KeptDraining)),
        Step::ForwardNew => {
            clamp_syn(ctx, l4, service.mss_clamp);
            forward::<V6>(ctx.skb.skb, &service.tunnel_src, &rule.target, Counter::ForwardedNew)
        }
        Step::CheckSocket => {
            let found = if v6 { lookup_packet_v6(ctx)? } else { lookup_packet_v4(ctx)? };
            keep_or_forward::<V6>(ctx, found, service, rule, Counter::ForwardedExisting, Counter::ForwardedTimeWait)
        }
    }
}

/// Keeps the packet or forwards it to the target (see [`decide::place`]), counted as
/// `forwarded` when no socket is here and as `past_time_wait` when only a time-wait socket is.
#[inline(always)]
pub fn keep_or_forward<const V6: bool>(
    ctx: &TcContext,
    found: Found,
    service: &ServiceValue,
    rule: &RuleValue,
    forwarded: Counter,
    past_time_wait: Counter,
) -> Result<Verdict, Error> {
    match decide::place(found, rule) {
        Place::Local => Ok(pass(Counter::KeptLocal)),
        Place::Syncookie => Ok(pass(Counter::KeptSyncookie)),
        Place::Target => forward::<V6>(ctx.skb.skb, &service.tunnel_src, &rule.target, forwarded),
        Place::TargetPastTimeWait => {
            let verdict = forward::<V6>(ctx.skb.skb, &service.tunnel_src, &rule.target, past_time_wait)?;
            count_extra(past_time_wait);
            Ok(verdict)
        }
    }
}
