//! The next hop: the kernel's FIB asked as if from `lo`, its answers cached per CPU, the
//! daemon's resolution of a server as the fallback, and the path MTU.

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams, helpers::generated::bpf_fib_lookup, macros::map,
    maps::LruPerCpuHashMap, programs::XdpContext, EbpfContext,
};
use lb_common::{Addr, Server, Stat};

use crate::{maps::*, net::*, Outcome};

/// How long a cached FIB answer is used.
const HOP_TTL_NS: u64 = 1_000_000_000;

/// A cached FIB answer for one destination.
#[repr(C)]
struct HopCache {
    expires_ns: u64,
    ifindex: u32,
    /// Path MTU toward the destination.
    mtu: u16,
    _pad: u16,
    smac: [u8; 6],
    dmac: [u8; 6],
    _pad2: [u8; 4],
}

/// Per CPU: destination -> next hop, for [`HOP_TTL_NS`].
#[map(name = "next_hops")]
static NEXT_HOPS: LruPerCpuHashMap<u32, HopCache> = LruPerCpuHashMap::with_max_entries(4096, 0);

/// [`NEXT_HOPS`] for IPv6 destinations.
#[map(name = "next_hops6")]
static NEXT_HOPS6: LruPerCpuHashMap<Addr, HopCache> = LruPerCpuHashMap::with_max_entries(4096, 0);

/// The source a next hop is looked up for, of the server's family.
#[derive(Clone, Copy)]
pub enum Src<'a> {
    V4(u32),
    V6(&'a Addr),
}

/// The next hop toward server `id`. Its record caches the FIB's answer for [`HOP_TTL_NS`]:
/// the established path then costs no lookup beyond the server record it reads anyway.
#[inline(always)]
pub fn server_hop(
    ctx: &XdpContext,
    id: u32,
    src: Src,
    tot_len: u16,
    now: u64,
) -> Result<Hop, NoHop> {
    let Some(s) = SERVERS.get_ptr_mut(id) else {
        return Err(NoHop::Route);
    };
    // SAFETY: a map value; two CPUs refreshing it at once write the same answer.
    let s = unsafe { &mut *s };
    if let Some(hop) = fresh_hop(s, now) {
        if tot_len > s.mtu {
            return Err(NoHop::TooBig(s.mtu));
        }
        return Ok(hop);
    }
    let found = match (s.addr.as_v4_raw(), src) {
        (Some(dst), Src::V4(src)) => match fib(ctx, dst, src, 0) {
            (FIB_SUCCESS, Some(hop), _) => Some((hop, path_mtu(ctx, dst, src))),
            _ => None,
        },
        (None, Src::V6(src)) => match fib6(ctx, &s.addr, src, 0) {
            (FIB_SUCCESS, Some(hop), _) => Some((hop, path_mtu6(ctx, &s.addr, src))),
            _ => None,
        },
        _ => return Err(NoHop::Route),
    };
    match found {
        Some((hop, mtu)) => {
            s.mac = hop.dmac;
            s.smac = hop.smac;
            s.ifindex = hop.ifindex;
            s.mtu = mtu;
            s.hop_until_ns = now + HOP_TTL_NS;
            if tot_len > mtu {
                return Err(NoHop::TooBig(mtu));
            }
            Ok(hop)
        }
        // The neighbour entry is gone, or the route: the last known hop is the best there
        // is. (An old primary in one-arm NAT gives the gateway's address away, and with it
        // its route to the NAT subnet, while it still forwards for 2 s for the clients and
        // servers that have not moved yet.)
        None if s.ifindex != 0 && s.mac != [0; 6] => Ok(Hop::of_server(s)),
        None => Err(NoHop::Route),
    }
}

/// The next hop the server record caches, while it is fresh ([`HOP_TTL_NS`]).
#[inline(always)]
pub fn fresh_hop(s: &Server, now: u64) -> Option<Hop> {
    (now < s.hop_until_ns).then(|| Hop::of_server(s))
}

/// The IPv6 path MTU toward `dst`, as [`path_mtu`].
#[inline(always)]
fn path_mtu6(ctx: &XdpContext, dst: &Addr, src: &Addr) -> u16 {
    match fib6(ctx, dst, src, u16::MAX) {
        (FIB_FRAG_NEEDED, _, mtu) => mtu,
        _ => u16::MAX,
    }
}

/// The path MTU toward `dst`: the FIB refuses the largest length and names its MTU.
#[inline(always)]
fn path_mtu(ctx: &XdpContext, dst: u32, src: u32) -> u16 {
    match fib(ctx, dst, src, u16::MAX) {
        (FIB_FRAG_NEEDED, _, mtu) => mtu,
        _ => u16::MAX,
    }
}

/// Why there is no next hop.
pub enum NoHop {
    /// No route, or no neighbour and no fallback MAC.
    Route,
    /// The packet exceeds the path MTU (given).
    TooBig(u16),
}

impl NoHop {
    pub fn outcome(self) -> Outcome {
        match self {
            NoHop::Route => Outcome::Drop(Stat::DropNoRoute),
            NoHop::TooBig(_) => Outcome::Drop(Stat::DropTooBig),
        }
    }
}

/// Where a frame goes next: interface and MACs.
#[derive(Clone, Copy)]
pub struct Hop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

impl Hop {
    /// The daemon's resolution for a server, used when the FIB has no neighbour entry.
    pub fn of_server(s: &Server) -> Hop {
        Hop {
            ifindex: s.ifindex,
            smac: s.smac,
            dmac: s.mac,
        }
    }
}

/// The kernel's FIB decides next hop and MACs. Asked as if from `lo` (whose forwarding flag the
/// daemon sets) so that IPv4 forwarding can stay off on every real interface: the kernel
/// itself forwards nothing. Without a neighbour entry, falls back to the MACs in `fallback`.
///
/// Answers are cached per CPU and destination for [`HOP_TTL_NS`] (a FIB lookup costs most of
/// a packet's time), so route and neighbour changes reach the dataplane within that.
#[inline(always)]
pub fn next_hop(
    ctx: &XdpContext,
    dst: u32,
    src: u32,
    tot_len: u16,
    fallback: Hop,
    now: u64,
) -> Result<Hop, NoHop> {
    if let Some(c) = NEXT_HOPS.get_ptr(&dst) {
        if let Some(found) = cached_hop(c, tot_len, now) {
            return found;
        }
    }
    let hop = match fib(ctx, dst, src, 0) {
        (FIB_SUCCESS, Some(h), _) => h,
        (FIB_NO_NEIGH, _, _) if fallback.ifindex != 0 && fallback.dmac != [0; 6] => {
            return Ok(fallback)
        }
        _ => return Err(NoHop::Route),
    };
    let mtu = path_mtu(ctx, dst, src);
    // A failed insert costs the next packet a lookup, nothing else.
    let _ = NEXT_HOPS.insert(&dst, &hop_cache(&hop, mtu, now), 0);
    fits(hop, mtu, tot_len)
}

/// [`next_hop`] toward an IPv6 destination, cached in `next_hops6`.
#[inline(always)]
pub fn next_hop6(
    ctx: &XdpContext,
    dst: &Addr,
    src: &Addr,
    tot_len: u16,
    fallback: Hop,
    now: u64,
) -> Result<Hop, NoHop> {
    if let Some(c) = NEXT_HOPS6.get_ptr(dst) {
        if let Some(found) = cached_hop(c, tot_len, now) {
            return found;
        }
    }
    let hop = match fib6(ctx, dst, src, 0) {
        (FIB_SUCCESS, Some(h), _) => h,
        (FIB_NO_NEIGH, _, _) if fallback.ifindex != 0 && fallback.dmac != [0; 6] => {
            return Ok(fallback)
        }
        _ => return Err(NoHop::Route),
    };
    let mtu = path_mtu6(ctx, dst, src);
    let _ = NEXT_HOPS6.insert(dst, &hop_cache(&hop, mtu, now), 0);
    fits(hop, mtu, tot_len)
}

/// A cached next hop, if still fresh: the hop, or too big for its path MTU.
#[inline(always)]
fn cached_hop(c: *const HopCache, tot_len: u16, now: u64) -> Option<Result<Hop, NoHop>> {
    // SAFETY: a map value of this CPU, read only.
    let c = unsafe { &*c };
    if now >= c.expires_ns {
        return None;
    }
    if tot_len > c.mtu {
        return Some(Err(NoHop::TooBig(c.mtu)));
    }
    Some(Ok(Hop {
        ifindex: c.ifindex,
        smac: c.smac,
        dmac: c.dmac,
    }))
}

#[inline(always)]
fn hop_cache(hop: &Hop, mtu: u16, now: u64) -> HopCache {
    HopCache {
        expires_ns: now + HOP_TTL_NS,
        ifindex: hop.ifindex,
        mtu,
        _pad: 0,
        smac: hop.smac,
        dmac: hop.dmac,
        _pad2: [0; 4],
    }
}

#[inline(always)]
fn fits(hop: Hop, mtu: u16, tot_len: u16) -> Result<Hop, NoHop> {
    if tot_len > mtu {
        return Err(NoHop::TooBig(mtu));
    }
    Ok(hop)
}

/// One `bpf_fib_lookup`: the result code, the hop on success, the MTU when the length was
/// too big. Its 64-byte query lives in the per-CPU scratch area, and it is a function of its
/// own: inlined into every caller, its copies would not fit the 512-byte BPF stack.
#[inline(never)]
fn fib(ctx: &XdpContext, dst: u32, src: u32, tot_len: u16) -> (i64, Option<Hop>, u16) {
    let Some(sc) = scratch() else {
        return (-1, None, 0);
    };
    let p = &mut sc.fib;
    let rc = fib_query(ctx, p, dst, src, tot_len);
    fib_answer(rc, p)
}

/// What a FIB lookup's result code and answer in `p` come to.
#[inline(always)]
fn fib_answer(rc: i64, p: &FibParams) -> (i64, Option<Hop>, u16) {
    match rc {
        FIB_SUCCESS => (
            rc,
            Some(Hop {
                ifindex: p.ifindex,
                smac: p.smac,
                dmac: p.dmac,
            }),
            0,
        ),
        // SAFETY: on this result the helper stored the MTU in the union.
        FIB_FRAG_NEEDED => (rc, None, unsafe { p.__bindgen_anon_1.mtu_result }),
        _ => (rc, None, 0),
    }
}

/// The FIB lookup itself, its query and answer in `p`.
#[inline(always)]
pub fn fib_query(ctx: &XdpContext, p: &mut FibParams, dst: u32, src: u32, tot_len: u16) -> i64 {
    // An all-zero bpf_fib_lookup is a valid input.
    zero_words(p);
    p.family = AF_INET;
    p.ifindex = LOOPBACK_IFINDEX;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_3.ipv4_src = src;
    p.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: the helper writes only into `p`.
    unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            p as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    }
}

/// [`fib`] for IPv6.
#[inline(never)]
fn fib6(ctx: &XdpContext, dst: &Addr, src: &Addr, tot_len: u16) -> (i64, Option<Hop>, u16) {
    let Some(sc) = scratch() else {
        return (-1, None, 0);
    };
    let p = &mut sc.fib;
    let rc = fib_query6(ctx, p, dst, src, tot_len);
    fib_answer(rc, p)
}

/// [`fib_query`] for IPv6.
#[inline(always)]
pub fn fib_query6(
    ctx: &XdpContext,
    p: &mut FibParams,
    dst: &Addr,
    src: &Addr,
    tot_len: u16,
) -> i64 {
    zero_words(p);
    p.family = AF_INET6;
    p.ifindex = LOOPBACK_IFINDEX;
    p.__bindgen_anon_1.tot_len = tot_len;
    // Word by word (see `copy_addr`): a plain 16-byte store may become a call to memmove.
    // SAFETY: both fields are plain words of the query's unions, set for AF_INET6.
    unsafe {
        copy_words(&mut p.__bindgen_anon_3.ipv6_src, &src.w);
        copy_words(&mut p.__bindgen_anon_4.ipv6_dst, &dst.w);
    }
    // SAFETY: the helper writes only into `p`.
    unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            p as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    }
}

#[inline(always)]
fn set_macs(ctx: &XdpContext, hop: &Hop) {
    if let Some(eth) = ptr_at_mut::<EthHdr>(ctx, 0) {
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe {
            put_mac(&mut (*eth).dst, &hop.dmac);
            put_mac(&mut (*eth).src, &hop.smac);
        }
    }
}

/// Writes a MAC as three 16-bit words, each read and written once (volatile, so that LLVM
/// makes neither a call to BPF's byte-looping memmove nor a byte loop of it: the path every
/// forwarded packet takes). Every MAC lb handles sits at an even offset of a 2-aligned
/// struct: an `EthHdr` (its `u16` type field aligns it, and the kernel starts XDP data
/// 2-aligned), a `Hop`, a `Server`.
#[inline(always)]
pub fn put_mac(dst: &mut [u8; 6], mac: &[u8; 6]) {
    let (d, m) = (dst.as_mut_ptr() as *mut u16, mac.as_ptr() as *const u16);
    // SAFETY: two valid six-byte arrays at even addresses (above).
    unsafe {
        core::ptr::write_volatile(d, core::ptr::read_volatile(m));
        core::ptr::write_volatile(d.add(1), core::ptr::read_volatile(m.add(1)));
        core::ptr::write_volatile(d.add(2), core::ptr::read_volatile(m.add(2)));
    }
}

/// Puts the hop's MACs on the frame and sends it out of the hop's interface.
#[inline(always)]
pub fn send(ctx: &XdpContext, hop: &Hop) -> Outcome {
    set_macs(ctx, hop);
    if hop.ifindex == ctx.ingress_ifindex() as u32 {
        Outcome::Tx
    } else {
        Outcome::Redirect(hop.ifindex)
    }
}
