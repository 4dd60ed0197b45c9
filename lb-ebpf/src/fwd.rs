//! Sending a packet on: by the server's method (direct MAC rewrite, IPIP or IPv6-in-IPv6
//! tunnel, NAT rewrite), NAT replies translated back, the next hop from the kernel's FIB (cached per
//! CPU), and fragmentation-needed answers when the path is too small.

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    helpers::generated::{bpf_fib_lookup, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::map,
    maps::LruPerCpuHashMap,
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    csum, Addr, Connection, Method, Server, Settings, Stat, CONN_FIN, CONN_PEER_FIN,
    CONN_SERVER_CLOSED_FIRST, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_IPIP, IPPROTO_IPV6,
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{conn::*, finish, maps::*, net::*, parse::*, Outcome};

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

/// [`forward`] for a new connection, to the server `to_service_xdp` chose (`next`), as a
/// BPF function of its own, its outcome finished: `to_service_xdp`'s frame and forward's
/// do not fit the 512-byte stack together beside lb_xdp's.
#[inline(never)]
pub fn forward_xdp(ctx: &XdpContext, ip: &Ip, next: &Next) -> u32 {
    let Some(settings) = SETTINGS.get(0) else {
        return finish(Outcome::Pass);
    };
    finish(forward(
        ctx,
        settings,
        next.server,
        ip,
        &next.nat_addr,
        next.nat_port,
    ))
}

/// Sends the packet to server `id` by its method; a NAT connection's source is `nat`:`nat_port`.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    settings: &Settings,
    id: u32,
    ip: &Ip,
    nat: &Addr,
    nat_port: u16,
) -> Outcome {
    let Some(server) = SERVERS.get(id) else {
        return Outcome::Drop(Stat::DropNoServer);
    };
    if ip.v6 {
        return forward6(ctx, settings, id, ip, nat, nat_port);
    }
    let nat_addr = nat.w[3];
    let (method, server_port) = (server.method, server.port);
    let Some(server_addr) = server.addr.as_v4_raw() else {
        return Outcome::Drop(Stat::DropNoRoute);
    };
    match Method::from_u8(method) {
        Some(Method::Direct) => {
            match server_hop(ctx, id, Src::V4(ip.saddr.w[3]), ip.tot_len, ip.now) {
                Ok(hop) => send(ctx, &hop),
                Err(e) => too_big_or(ctx, ip, e, 0),
            }
        }
        Some(Method::Tunnel) => {
            let Some(local) = settings.local_addr.as_v4_raw() else {
                return Outcome::Drop(Stat::DropNoRoute);
            };
            let outer_len = ip.tot_len as u32 + IPV4_HLEN as u32;
            if outer_len > 0xffff {
                return Outcome::Drop(Stat::DropTooBig);
            }
            let hop = match server_hop(ctx, id, Src::V4(local), outer_len as u16, ip.now) {
                Ok(h) => h,
                Err(e) => return too_big_or(ctx, ip, e, IPV4_HLEN as u16),
            };
            if encapsulate(ctx, local, server_addr, ip.tot_len).is_none() {
                return Outcome::Drop(Stat::DropError);
            }
            send(ctx, &hop)
        }
        Some(Method::Nat) => {
            // Route first: a packet too big for the path is answered as the client sent it.
            let hop = match server_hop(ctx, id, Src::V4(nat_addr), ip.tot_len, ip.now) {
                Ok(h) => h,
                Err(e) => return too_big_or(ctx, ip, e, 0),
            };
            if rewrite(ctx, ip, nat_addr, server_addr, nat_port, server_port).is_none() {
                return Outcome::Drop(Stat::DropError);
            }
            send(ctx, &hop)
        }
        None => Outcome::Drop(Stat::DropNoRoute),
    }
}

/// [`forward`] for an IPv6 packet: direct, tunnel (IPv6-in-IPv6 from the ATM's IPv6
/// address) or NAT66.
#[inline(always)]
fn forward6(
    ctx: &XdpContext,
    settings: &Settings,
    id: u32,
    ip: &Ip,
    nat: &Addr,
    nat_port: u16,
) -> Outcome {
    let Some(server) = SERVERS.get(id) else {
        return Outcome::Drop(Stat::DropNoServer);
    };
    match Method::from_u8(server.method) {
        Some(Method::Direct) => match server_hop(ctx, id, Src::V6(&ip.saddr), ip.tot_len, ip.now) {
            Ok(hop) => send(ctx, &hop),
            Err(e) => too_big_or(ctx, ip, e, 0),
        },
        Some(Method::Tunnel) => {
            let local = &settings.local_addr6;
            if local.w == [0; 4] {
                return Outcome::Drop(Stat::DropNoRoute);
            }
            let outer_len = ip.tot_len as u32 + IPV6_HLEN as u32;
            if outer_len > 0xffff {
                return Outcome::Drop(Stat::DropTooBig);
            }
            let hop = match server_hop(ctx, id, Src::V6(local), outer_len as u16, ip.now) {
                Ok(h) => h,
                Err(e) => return too_big_or(ctx, ip, e, IPV6_HLEN as u16),
            };
            if encapsulate6(ctx, local, &server.addr, ip.tot_len).is_none() {
                return Outcome::Drop(Stat::DropError);
            }
            send(ctx, &hop)
        }
        Some(Method::Nat) => {
            let hop = match server_hop(ctx, id, Src::V6(nat), ip.tot_len, ip.now) {
                Ok(h) => h,
                Err(e) => return too_big_or(ctx, ip, e, 0),
            };
            if rewrite6(ctx, ip, nat, &server.addr, nat_port, server.port).is_none() {
                return Outcome::Drop(Stat::DropError);
            }
            send(ctx, &hop)
        }
        None => Outcome::Drop(Stat::DropNoRoute),
    }
}

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
    if now < s.hop_until_ns {
        if tot_len > s.mtu {
            return Err(NoHop::TooBig(s.mtu));
        }
        return Ok(Hop::of_server(s));
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

/// The outcome of a failed next-hop lookup. A packet too big for the path to the server
/// (`overhead` = what forwarding adds) that forbids fragmentation is answered with an ICMP
/// fragmentation-needed, so the client's path MTU discovery shrinks its packets; it is
/// still counted as dropped.
#[inline(always)]
fn too_big_or(ctx: &XdpContext, ip: &Ip, e: NoHop, overhead: u16) -> Outcome {
    match e {
        NoHop::TooBig(mtu) => too_big(ctx, ip, mtu, overhead),
        NoHop::Route => e.outcome(),
    }
}

/// See [`too_big_or`]. For IPv6 (whose routers never fragment), a packet-too-big, when
/// the packet has no extension headers and the MTU to announce is at least IPv6's minimum
/// of 1,280.
#[inline(always)]
fn too_big(ctx: &XdpContext, ip: &Ip, mtu: u16, overhead: u16) -> Outcome {
    if ip.v6 {
        if ip.l4() != ETH_HLEN + IPV6_HLEN || mtu < overhead + IPV6_MIN_MTU {
            return Outcome::Drop(Stat::DropTooBig);
        }
        if packet_too_big(ctx, ip, mtu - overhead).is_some() {
            count(Stat::IcmpSent, 1);
            count(Stat::DropTooBig, 1);
            return Outcome::Reply;
        }
        return Outcome::Drop(Stat::DropTooBig);
    }
    if !ip.df || ip.l4() != ETH_HLEN + IPV4_HLEN || mtu <= overhead + 68 {
        return Outcome::Drop(Stat::DropTooBig);
    }
    if frag_needed(ctx, ip, mtu - overhead).is_some() {
        count(Stat::IcmpSent, 1);
        count(Stat::DropTooBig, 1);
        // Counted as a drop above; the action itself is sending the ICMP back.
        return Outcome::Reply;
    }
    Outcome::Drop(Stat::DropTooBig)
}

/// Turns the packet (IPv4 without options) into an ICMP fragmentation-needed from its
/// destination back to its source: a new IPv4 and ICMP header go in front of the original
/// IPv4 header and first 8 bytes of its payload, the rest is cut, the MACs are swapped.
#[inline(always)]
fn frag_needed(ctx: &XdpContext, ip: &Ip, mtu: u16) -> Option<()> {
    const QUOTE: usize = IPV4_HLEN + 8;
    const GROW: usize = IPV4_HLEN + ICMP_HLEN;
    const TOTAL: usize = ETH_HLEN + GROW + QUOTE;
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { *eth };
    // The quote must be whole before anything changes.
    ptr_at::<[u8; QUOTE]>(ctx, ETH_HLEN)?;
    // SAFETY: grows the headroom; every pointer is derived again below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROW as i32)) } != 0 {
        return None;
    }
    let len = frame_len(ctx);
    if len < TOTAL {
        return None;
    }
    // SAFETY: shrinks the tail to the ICMP message; no pointer is used afterwards.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - TOTAL) as i32)) } != 0 {
        return None;
    }
    let new_eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    let new_ip = ptr_at_mut::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    let icmp = ptr_at_mut::<IcmpHdr>(ctx, ETH_HLEN + IPV4_HLEN)?;
    let mut h = Ipv4Hdr {
        vihl: 0x45,
        tos: 0,
        tot_len: ((GROW + QUOTE) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        proto: IPPROTO_ICMP,
        check: 0,
        saddr: ip.daddr.w[3],
        daddr: ip.saddr.w[3],
    };
    h.check = ipv4_checksum(&h);
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        *new_eth = EthHdr {
            dst: eth.src,
            src: eth.dst,
            proto: ETH_P_IP_BE,
        };
        *new_ip = h;
        *icmp = IcmpHdr {
            kind: ICMP_DEST_UNREACH,
            code: ICMP_FRAG_NEEDED,
            check: 0,
            // Bytes 4-5 unused, 6-7 the next-hop MTU (RFC 1191).
            rest: u32::from_ne_bytes([0, 0, (mtu >> 8) as u8, mtu as u8]),
        };
    }
    // The ICMP checksum covers its header and the quote: 36 bytes, read in one piece (a
    // loop of small bounds checks gets folded into arithmetic the verifier rejects).
    let body = ptr_at::<[u16; (ICMP_HLEN + QUOTE) / 2]>(ctx, ETH_HLEN + IPV4_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let body = unsafe { *body };
    let mut sum = 0u32;
    for w in body {
        sum += w as u32;
    }
    // SAFETY: bounds checked above.
    unsafe { (*icmp).check = !csum::fold(sum) };
    Some(())
}

/// The least MTU of an IPv6 link (RFC 8200 section 5).
const IPV6_MIN_MTU: u16 = 1280;

/// Turns the packet (IPv6 without extension headers) into an ICMPv6 packet-too-big from
/// its destination back to its source (RFC 4443 section 3.2): a new IPv6 and ICMPv6 header
/// go in front of the original IPv6 header and the first 8 bytes of its payload (the
/// ports, all the sender needs to find its socket), the rest is cut, the MACs swapped.
#[inline(always)]
fn packet_too_big(ctx: &XdpContext, ip: &Ip, mtu: u16) -> Option<()> {
    // The first steps are `frag_needed`'s, written out again: shared as a function, inlined
    // or not, they cost `established_xdp` 32 bytes of stack, more than the chain has left.
    const QUOTE: usize = IPV6_HLEN + 8;
    const GROW: usize = IPV6_HLEN + ICMP_HLEN;
    const ICMP_LEN: usize = ICMP_HLEN + QUOTE;
    const TOTAL: usize = ETH_HLEN + GROW + QUOTE;
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { *eth };
    ptr_at::<[u8; QUOTE]>(ctx, ETH_HLEN)?;
    // SAFETY: grows the headroom; every pointer is derived again below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROW as i32)) } != 0 {
        return None;
    }
    let len = frame_len(ctx);
    if len < TOTAL {
        return None;
    }
    // SAFETY: shrinks the tail to the ICMPv6 message; no pointer is used afterwards.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - TOTAL) as i32)) } != 0 {
        return None;
    }
    let new_eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    let h = ptr_at_mut::<Ipv6Hdr>(ctx, ETH_HLEN)?;
    let icmp = ptr_at_mut::<IcmpHdr>(ctx, ETH_HLEN + IPV6_HLEN)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        (*new_eth).proto = ETH_P_IPV6_BE;
        put_mac(&mut (*new_eth).dst, &eth.src);
        put_mac(&mut (*new_eth).src, &eth.dst);
        let h = &mut *h;
        h.vtcfl = (6u32 << 28).to_be();
        h.payload_len = (ICMP_LEN as u16).to_be();
        h.nexthdr = IPPROTO_ICMPV6;
        h.hop_limit = 64;
        copy_words(&mut h.saddr, &ip.daddr.w);
        copy_words(&mut h.daddr, &ip.saddr.w);
        *icmp = IcmpHdr {
            kind: ICMPV6_PKT_TOOBIG,
            code: 0,
            check: 0,
            rest: (mtu as u32).to_be(),
        };
    }
    // The checksum covers the pseudo-header (addresses, length, next header) and the whole
    // message, read in one piece (see `frag_needed`).
    let body = ptr_at::<[u16; ICMP_LEN / 2]>(ctx, ETH_HLEN + IPV6_HLEN)?;
    let addrs = ptr_at::<[u16; 16]>(ctx, ETH_HLEN + 8)?;
    // SAFETY: bounds checked by ptr_at.
    let (body, addrs) = unsafe { (*body, *addrs) };
    let mut sum = (ICMP_LEN as u16).to_be() as u32 + (IPPROTO_ICMPV6 as u16).to_be() as u32;
    for w in addrs {
        sum += w as u32;
    }
    for w in body {
        sum += w as u32;
    }
    // SAFETY: bounds checked above.
    unsafe { (*icmp).check = !csum::fold(sum) };
    Some(())
}

/// A server's reply on a NAT connection: back to VIP -> client.
#[inline(always)]
pub fn nat_reply(ctx: &XdpContext, reply: &mut Connection, ip: &Ip, tcp_flags: u8) -> Outcome {
    let bytes = frame_len(ctx) as u64;
    let Some(server) = SERVERS.get(reply.server) else {
        return Outcome::Drop(Stat::DropNoServer);
    };
    reply.last_seen_ns = ip.now;
    reply.packets += 1;
    reply.bytes += bytes;
    let ends = tcp_end_flags(tcp_flags);
    if ends & CONN_FIN != 0 && reply.flags & (CONN_FIN | CONN_PEER_FIN) == 0 {
        // The server closes first: it will hold the connection in TIME_WAIT.
        reply.flags |= CONN_SERVER_CLOSED_FIRST;
    }
    reply.flags |= ends;
    count_traffic(&SERVICE_STATS, server.service, bytes);
    count_traffic(&SERVER_STATS, reply.server, bytes);
    let fallback = Hop {
        ifindex: reply.ifindex,
        smac: reply.local_mac,
        dmac: reply.peer_mac,
    };
    let (vip, client) = (&server.vip, &reply.nat_addr);
    let hop = if ip.v6 {
        if rewrite6(ctx, ip, vip, client, server.vport, reply.nat_port).is_none() {
            return Outcome::Drop(Stat::DropError);
        }
        next_hop6(ctx, client, vip, ip.tot_len, fallback, ip.now)
    } else {
        let (Some(vip), Some(client)) = (vip.as_v4_raw(), client.as_v4_raw()) else {
            return Outcome::Drop(Stat::DropError);
        };
        if rewrite(ctx, ip, vip, client, server.vport, reply.nat_port).is_none() {
            return Outcome::Drop(Stat::DropError);
        }
        next_hop(ctx, client, vip, ip.tot_len, fallback, ip.now)
    };
    match hop {
        Ok(h) => send(ctx, &h),
        Err(e) => e.outcome(),
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
fn next_hop(
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
fn next_hop6(
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
pub fn fib(ctx: &XdpContext, dst: u32, src: u32, tot_len: u16) -> (i64, Option<Hop>, u16) {
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
pub fn fib6(ctx: &XdpContext, dst: &Addr, src: &Addr, tot_len: u16) -> (i64, Option<Hop>, u16) {
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

/// Writes a MAC byte by byte, with volatile stores: a plain copy of a hop held on the stack
/// becomes a call to BPF's byte-looping memmove.
#[inline(always)]
pub fn put_mac(dst: &mut [u8; 6], mac: &[u8; 6]) {
    for (d, m) in dst.iter_mut().zip(mac) {
        // SAFETY: a valid, exclusive reference.
        unsafe { core::ptr::write_volatile(d, *m) };
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

/// Rewrites source and destination address and port (NAT both ways), updating the IPv4 and
/// L4 checksums incrementally. Addresses and ports in network byte order.
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    ip: &Ip,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
) -> Option<()> {
    let iph = ptr_at_mut::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at_mut.
    let (old_s, old_d) = unsafe {
        let h = &mut *iph;
        let (old_s, old_d) = (h.saddr, h.daddr);
        h.check = csum::replace4(csum::replace4(h.check, old_s, saddr), old_d, daddr);
        h.saddr = saddr;
        h.daddr = daddr;
        (old_s, old_d)
    };
    let ports = ptr_at_mut::<[u16; 2]>(ctx, ip.l4())?;
    // SAFETY: bounds checked by ptr_at_mut.
    let (old_sp, old_dp) = unsafe {
        let p = &mut *ports;
        let old = (p[0], p[1]);
        p[0] = sport;
        p[1] = dport;
        old
    };
    let at = if ip.proto == IPPROTO_TCP {
        ip.l4() + 16
    } else {
        ip.l4() + 6
    };
    let check = ptr_at_mut::<u16>(ctx, at)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        let c = *check;
        if ip.proto == IPPROTO_UDP && c == 0 {
            // UDP without a checksum stays without one.
            return Some(());
        }
        let mut n = csum::replace4(c, old_s, saddr);
        n = csum::replace4(n, old_d, daddr);
        n = csum::replace2(n, old_sp, sport);
        n = csum::replace2(n, old_dp, dport);
        if ip.proto == IPPROTO_UDP && n == 0 {
            n = 0xffff;
        }
        *check = n;
    }
    Some(())
}

/// [`rewrite`] for IPv6 (NAT66): addresses word by word, ports, and the L4 checksum, whose
/// pseudo-header holds the addresses, updated incrementally (IPv6 has no header checksum).
#[inline(always)]
pub fn rewrite6(
    ctx: &XdpContext,
    ip: &Ip,
    saddr: &Addr,
    daddr: &Addr,
    sport: u16,
    dport: u16,
) -> Option<()> {
    let h = ptr_at_mut::<Ipv6Hdr>(ctx, ETH_HLEN)?;
    let ports = ptr_at_mut::<[u16; 2]>(ctx, ip.l4())?;
    let at = if ip.proto == IPPROTO_TCP {
        ip.l4() + 16
    } else {
        ip.l4() + 6
    };
    let check = ptr_at_mut::<u16>(ctx, at)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        let h = &mut *h;
        let mut c = *check;
        for i in 0..4 {
            let new = core::ptr::read_volatile(&saddr.w[i]);
            c = csum::replace4(c, h.saddr[i], new);
            h.saddr[i] = new;
            let new = core::ptr::read_volatile(&daddr.w[i]);
            c = csum::replace4(c, h.daddr[i], new);
            h.daddr[i] = new;
        }
        let p = &mut *ports;
        c = csum::replace2(c, p[0], sport);
        c = csum::replace2(c, p[1], dport);
        p[0] = sport;
        p[1] = dport;
        // A UDP checksum of zero is not allowed over IPv6; one left so stays so.
        if ip.proto == IPPROTO_UDP && *check == 0 {
            return Some(());
        }
        if ip.proto == IPPROTO_UDP && c == 0 {
            c = 0xffff;
        }
        *check = c;
    }
    Some(())
}

/// Puts an outer IPv4 header (protocol 4) in front of the packet, behind the Ethernet header.
#[inline(always)]
fn encapsulate(ctx: &XdpContext, src: u32, dst: u32, inner_len: u16) -> Option<()> {
    let (tos, df) = {
        let inner = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { ((*inner).tos, (*inner).frag_off & IP_DF_BE) }
    };
    // SAFETY: grows the headroom; every pointer is derived again below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_HLEN as i32)) } != 0 {
        return None;
    }
    let eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked; the Ethernet header moves to the new front (proto unchanged).
    unsafe { (*eth).proto = ETH_P_IP_BE };
    let outer = ptr_at_mut::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    let mut h = Ipv4Hdr {
        vihl: 0x45,
        tos,
        tot_len: (inner_len + IPV4_HLEN as u16).to_be(),
        id: 0,
        frag_off: df,
        ttl: 64,
        proto: IPPROTO_IPIP,
        check: 0,
        saddr: src,
        daddr: dst,
    };
    h.check = ipv4_checksum(&h);
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { *outer = h };
    Some(())
}

/// Puts an outer IPv6 header (next header 41) in front of an IPv6 packet of `inner_len`
/// bytes, behind the Ethernet header. Its first word (traffic class, flow label) is the
/// inner packet's, so the flow keeps its class and its path through ECMP.
#[inline(always)]
fn encapsulate6(ctx: &XdpContext, src: &Addr, dst: &Addr, inner_len: u16) -> Option<()> {
    let vtcfl = {
        let inner = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { (*inner).vtcfl }
    };
    // SAFETY: grows the headroom; every pointer is derived again below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV6_HLEN as i32)) } != 0 {
        return None;
    }
    let eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked; the Ethernet header moves to the new front.
    unsafe { (*eth).proto = ETH_P_IPV6_BE };
    let outer = ptr_at_mut::<Ipv6Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at_mut; field by field, the addresses word by word (a
    // whole header built and copied would be a call to BPF's byte-looping memmove).
    unsafe {
        let h = &mut *outer;
        h.vtcfl = vtcfl;
        h.payload_len = inner_len.to_be();
        h.nexthdr = IPPROTO_IPV6;
        h.hop_limit = 64;
        copy_words(&mut h.saddr, &src.w);
        copy_words(&mut h.daddr, &dst.w);
    }
    Some(())
}

#[inline(always)]
fn ipv4_checksum(h: &Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 bytes of plain integers.
    let words: &[u16; 10] = unsafe { &*(h as *const Ipv4Hdr as *const [u16; 10]) };
    csum::ipv4_header(words)
}
