//! lb_decap's work on a real server in tunnel mode: strips the outer header of IPIP and
//! IPv6-in-IPv6 packets from configured ATMs.

use aya_ebpf::{
    helpers::generated::bpf_xdp_adjust_head,
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{Addr, DecapStat, IPPROTO_IPIP, IPPROTO_IPV6};

use crate::net::*;

/// lb_decap: ATM addresses whose IPIP packets are decapsulated.
#[map(name = "decap_sources")]
static DECAP_SOURCES: HashMap<Addr, u32> = HashMap::with_max_entries(16, 0);

/// lb_decap: per-CPU counters indexed by `DecapStat`.
#[map(name = "decap_stat")]
static DECAP_STAT: PerCpuArray<u64> = PerCpuArray::with_max_entries(DecapStat::COUNT, 0);

#[inline(always)]
pub fn decap_count(s: DecapStat) {
    if let Some(p) = DECAP_STAT.get_ptr_mut(s as u32) {
        // SAFETY: a per-CPU slot.
        unsafe { *p += 1 };
    }
}

/// Strips the outer IPv4 header of an IPIP packet from a configured ATM.
#[inline(always)]
pub fn decap(ctx: &XdpContext) -> DecapStat {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return DecapStat::Passed;
    };
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { *eth };
    if eth.proto == ETH_P_IPV6_BE {
        return decap6(ctx, eth);
    }
    if eth.proto != ETH_P_IP_BE {
        return DecapStat::Passed;
    }
    let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return DecapStat::Passed;
    };
    // SAFETY: bounds checked by ptr_at.
    let outer = unsafe { &*outer };
    if outer.proto != IPPROTO_IPIP || outer.vihl >> 4 != 4 {
        return DecapStat::Passed;
    }
    if DECAP_SOURCES.get_ptr(&Addr::v4_raw(outer.saddr)).is_none() {
        return DecapStat::Passed;
    }
    // From a configured ATM: it must be a clean IPIP packet as lb_xdp makes them (no outer
    // options, not fragmented), else it is dropped.
    if outer.vihl != 0x45 || u16::from_be(outer.frag_off) & (IP_OFFMASK | IP_MF) != 0 {
        return DecapStat::Dropped;
    }
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN + IPV4_HLEN) else {
        return DecapStat::Dropped;
    };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*inner).vihl } >> 4 != 4 {
        return DecapStat::Dropped;
    }
    // Move the Ethernet header up to sit just before the inner header, then drop the front.
    let Some(new_eth) = ptr_at_mut::<EthHdr>(ctx, IPV4_HLEN) else {
        return DecapStat::Dropped;
    };
    // SAFETY: bounds checked; [20, 34) and [0, 14) do not overlap.
    unsafe { *new_eth = eth };
    // SAFETY: shrinks the front; no pointer is used afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV4_HLEN as i32) } != 0 {
        return DecapStat::Dropped;
    }
    DecapStat::Decapsulated
}

/// Strips the outer IPv6 header of an IPv6-in-IPv6 packet from a configured ATM.
#[inline(always)]
fn decap6(ctx: &XdpContext, eth: EthHdr) -> DecapStat {
    let Some(outer) = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN) else {
        return DecapStat::Passed;
    };
    // SAFETY: bounds checked by ptr_at.
    let outer = unsafe { &*outer };
    if outer.nexthdr != IPPROTO_IPV6 || u32::from_be(outer.vtcfl) >> 28 != 6 {
        return DecapStat::Passed;
    }
    let mut from = Addr::default();
    copy_addr(&mut from, &outer.saddr);
    if DECAP_SOURCES.get_ptr(&from).is_none() {
        return DecapStat::Passed;
    }
    // From a configured ATM: the inner packet follows the outer header directly, as lb_xdp
    // makes them (no extension headers), and is IPv6; anything else is dropped.
    let Some(inner) = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN + IPV6_HLEN) else {
        return DecapStat::Dropped;
    };
    // SAFETY: bounds checked by ptr_at.
    if u32::from_be(unsafe { (*inner).vtcfl }) >> 28 != 6 {
        return DecapStat::Dropped;
    }
    let Some(new_eth) = ptr_at_mut::<EthHdr>(ctx, IPV6_HLEN) else {
        return DecapStat::Dropped;
    };
    // SAFETY: bounds checked; [40, 54) and [0, 14) do not overlap.
    unsafe { *new_eth = eth };
    // SAFETY: shrinks the front; no pointer is used afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV6_HLEN as i32) } != 0 {
        return DecapStat::Dropped;
    }
    DecapStat::Decapsulated
}
