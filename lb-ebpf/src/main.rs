//! lb's XDP programs. `lb_xdp` is the balancer: it parses Ethernet/IPv4/TCP/UDP with a bounds
//! check before every read, passes everything that is not addressed to a configured service,
//! and counts every packet per CPU.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{Addr, Service, ServiceKey, Stat, IPPROTO_TCP, IPPROTO_UDP};

/// (VIP, port, protocol) -> service record.
#[map(name = "services")]
static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(64, 0);

/// Global per-CPU counters, indexed by `Stat`.
#[map(name = "stat")]
static STAT: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;

#[inline(always)]
fn count(s: Stat, n: u64) {
    if let Some(p) = STAT.get_ptr_mut(s as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += n };
    }
}

/// A pointer to a `T` at `off` bytes into the packet, if all of it lies inside the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

enum Verdict {
    Pass,
    Malformed,
    Service,
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    count(Stat::Packets, 1);
    match classify(&ctx) {
        Verdict::Pass => {
            count(Stat::Passed, 1);
            xdp_action::XDP_PASS
        }
        Verdict::Malformed => {
            count(Stat::DropMalformed, 1);
            xdp_action::XDP_DROP
        }
        Verdict::Service => {
            count(Stat::VipPackets, 1);
            count(Stat::VipBytes, (ctx.data_end() - ctx.data()) as u64);
            // Forwarding comes with the dataplane issue; until then service traffic is only
            // counted and handed to the stack.
            count(Stat::Passed, 1);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Verdict {
    let Some(ethertype) = ptr_at::<u16>(ctx, 12) else {
        return Verdict::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { *ethertype }) != ETH_P_IP {
        return Verdict::Pass;
    }
    let Some(ip) = ptr_at::<[u8; 20]>(ctx, ETH_HLEN) else {
        return Verdict::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let version = ip[0] >> 4;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if version != 4 || ihl < 20 {
        return Verdict::Malformed;
    }
    let proto = ip[9];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Verdict::Pass;
    }
    let dst = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    // Ports sit in the first four bytes of both TCP and UDP headers.
    let Some(ports) = ptr_at::<[u16; 2]>(ctx, ETH_HLEN + ihl) else {
        return Verdict::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let dport = unsafe { (*ports)[1] };
    let key = ServiceKey {
        vip: Addr::v4_raw(dst),
        port: dport,
        proto,
        _pad: 0,
    };
    // SAFETY: read-only use of the value.
    if unsafe { SERVICES.get(&key) }.is_some() {
        Verdict::Service
    } else {
        Verdict::Pass
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
