//! Benchmark instruments, an eBPF object of their own (`lb-bench-progs`) so that none of
//! them is in the balancer's: `cargo xtask bench` measures lb_xdp against `bare_fwd`, drives
//! traffic with `gen_tx` and counts it with `sink_count`. Their ABI is `lb_common::bench`.
#![no_std]
#![no_main]

// The header layouts and bounds-checked packet access lb_xdp uses; most of it is not
// needed here.
#[path = "../net.rs"]
#[allow(dead_code)]
mod net;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use lb_common::bench::BareFwd;

use net::*;

/// Copies a MAC from map memory into a frame. An array assignment between the two would be
/// a call to BPF's byte-looping memmove (they may overlap, for all LLVM knows); element by
/// element is a handful of loads and stores.
#[inline(always)]
fn copy_mac(dst: &mut [u8; 6], src: &[u8; 6]) {
    let [a, b, c, d, e, f] = *src;
    *dst = [a, b, c, d, e, f];
}

/// Where `bare_fwd` sends frames.
#[map(name = "bare_fwd_cfg")]
static BARE_FWD_CFG: Array<BareFwd> = Array::with_max_entries(1, 0);

/// Per-CPU count of frames `sink_count` saw.
#[map(name = "sink_count_stat")]
static SINK_COUNT_STAT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `gen_tx`'s per-CPU frame counter.
#[map(name = "gen_cursor")]
static GEN_CURSOR: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Ethernet, IPv4 and UDP headers of a generated frame.
#[derive(Clone, Copy)]
#[repr(C)]
struct GenHeaders([u8; 42]);

#[map(name = "gen_template")]
static GEN_TEMPLATE: Array<GenHeaders> = Array::with_max_entries(1, 0);

/// Ethernet, IPv6 and UDP headers of a generated IPv6 frame.
#[derive(Clone, Copy)]
#[repr(C)]
struct GenHeaders6([u8; 62]);

#[map(name = "gen_template6")]
static GEN_TEMPLATE6: Array<GenHeaders6> = Array::with_max_entries(1, 0);

/// The least a forwarder does: bounds-checked Ethernet and IPv4 (or IPv6) headers, MACs
/// rewritten, out by XDP_TX or XDP_REDIRECT. The reference lb_xdp's cost is compared with,
/// in each family.
#[xdp]
pub fn bare_fwd(ctx: XdpContext) -> u32 {
    let Some(eth) = ptr_at_mut::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at_mut.
    let proto = unsafe { (*eth).proto };
    let whole = if proto == ETH_P_IP_BE {
        ptr_at::<Ipv4Hdr>(&ctx, ETH_HLEN).is_some()
    } else if proto == ETH_P_IPV6_BE {
        ptr_at::<Ipv6Hdr>(&ctx, ETH_HLEN).is_some()
    } else {
        return xdp_action::XDP_PASS;
    };
    if !whole {
        return xdp_action::XDP_DROP;
    }
    let Some(cfg) = BARE_FWD_CFG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        copy_mac(&mut (*eth).dst, &cfg.dmac);
        copy_mac(&mut (*eth).src, &cfg.smac);
    }
    if cfg.ifindex == 0 || cfg.ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(cfg.ifindex, 0) as u32 }
    }
}

/// A traffic generator for BPF_PROG_TEST_RUN with live frames: sends each frame back out of
/// the interface it runs on, its UDP source port stepped through 1024 values (so a balancer
/// sees that many flows; the UDP checksum must be 0, as a port change would void it).
///
/// A live frame's page is recycled once the frame is gone, with whatever the programs it
/// met wrote into it (a balancer's NAT or IPIP rewrite), so the headers are written afresh
/// from `gen_template` on every run.
#[xdp]
pub fn gen_tx(ctx: XdpContext) -> u32 {
    let (Some(cursor), Some(template), Some(hdr)) = (
        GEN_CURSOR.get_ptr_mut(0),
        GEN_TEMPLATE.get(0),
        ptr_at_mut::<GenHeaders>(&ctx, 0),
    ) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: a per-CPU slot; bounds checked by ptr_at_mut.
    unsafe {
        *cursor += 1;
        let hdr = &mut *hdr;
        // Not `*hdr = *template`: packet and map memory may overlap for all LLVM knows, and
        // it would call BPF's byte-looping memmove. They do not; this copy is unrolled.
        core::ptr::copy_nonoverlapping(template, hdr, 1);
        hdr.0[34..36].copy_from_slice(&(10_000 + (*cursor % 1024) as u16).to_be_bytes());
    }
    xdp_action::XDP_TX
}

/// [`gen_tx`] for IPv6 frames, from `gen_template6`. IPv6 has no checksum-free UDP
/// (RFC 8200 8.1; conntrack takes such a datagram for invalid and nftables would not NAT
/// it), so the template carries a valid checksum, updated for each source port (RFC 1624).
#[xdp]
pub fn gen_tx6(ctx: XdpContext) -> u32 {
    let (Some(cursor), Some(template), Some(hdr)) = (
        GEN_CURSOR.get_ptr_mut(0),
        GEN_TEMPLATE6.get(0),
        ptr_at_mut::<GenHeaders6>(&ctx, 0),
    ) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: as gen_tx's.
    unsafe {
        *cursor += 1;
        let hdr = &mut *hdr;
        core::ptr::copy_nonoverlapping(template, hdr, 1);
        let old = u16::from_be_bytes([hdr.0[54], hdr.0[55]]);
        let new = 10_000 + (*cursor % 1024) as u16;
        hdr.0[54..56].copy_from_slice(&new.to_be_bytes());
        let check = u16::from_be_bytes([hdr.0[60], hdr.0[61]]);
        let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let check = match !(sum as u16) {
            0 => 0xffff,
            c => c,
        };
        hdr.0[60..62].copy_from_slice(&check.to_be_bytes());
    }
    xdp_action::XDP_TX
}

/// Does nothing: its one-shot test runs measure the kernel's own per-run overhead, which
/// the benchmarks subtract from every path's one-shot timing.
#[xdp]
pub fn bench_nop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// A sink: counts every frame and drops it.
#[xdp]
pub fn sink_count(_ctx: XdpContext) -> u32 {
    if let Some(p) = SINK_COUNT_STAT.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot.
        unsafe { *p += 1 };
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
