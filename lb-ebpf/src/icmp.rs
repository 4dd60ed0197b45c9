//! ICMP and ICMPv6 to a VIP: echo to the stack, errors about a connection steered to its
//! server (and translated for NAT). And the ICMP lb_xdp sends itself: fragmentation needed
//! (IPv4) or packet too big (IPv6) to a client whose packet no longer fits its path once
//! encapsulated.

use aya_ebpf::{
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    csum, Addr, Connection, FlowKey, Method, Server, Stat, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{conn::*, fwd::*, hop::*, maps::*, net::*, parse::*, Outcome};

/// ICMP to a VIP: echo goes to the stack (the primary answers); an error about one of our
/// connections (fragmentation needed, say) goes to that connection's server, found by the
/// header it quotes; anything else passes.
#[inline(always)]
pub fn icmp_to_vip(ctx: &XdpContext, ip: &Ip, next: &mut Next) -> Outcome {
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, ip.l4()) else {
        return Outcome::Drop(Stat::DropMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let kind = unsafe { (*icmp).kind };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETERPROB {
        return Outcome::Pass;
    }
    let inner_at = ip.l4() + ICMP_HLEN;
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, inner_at) else {
        return Outcome::Pass;
    };
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &*inner };
    if inner.vihl != 0x45 || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return Outcome::Pass;
    }
    let Some(ports) = ptr_at::<[u16; 2]>(ctx, inner_at + IPV4_HLEN) else {
        return Outcome::Pass;
    };
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { *ports };
    // The quoted packet went VIP -> client; its connection is keyed client -> VIP.
    let Some(key) = scratch_key::<0>(
        Addr::v4_raw(inner.daddr),
        Addr::v4_raw(inner.saddr),
        ports[1],
        ports[0],
        inner.proto,
    ) else {
        return Outcome::Pass;
    };
    let Some((conn, server)) = quoted_connection(key) else {
        return Outcome::Pass;
    };
    if server.method == Method::Nat as u8 {
        let Some(_server_addr) = server.addr.as_v4_raw() else {
            return Outcome::Drop(Stat::DropNoRoute);
        };
        if nat_icmp(ctx, ip, inner_at, server, conn).is_none() {
            return Outcome::Drop(Stat::DropError);
        }
        let hop = match server_hop(ctx, conn.server, Src::V4(ip.saddr.w[3]), ip.tot_len, ip.now) {
            Ok(h) => h,
            Err(e) => return e.outcome(),
        };
        return send(ctx, &hop);
    }
    to_forward(next, conn)
}

/// Translates an ICMP error about a NAT connection for the server: the outer destination
/// becomes the server, and the quoted packet (VIP:vport -> client:cport) becomes what the
/// server sent (server:port -> NAT address:port). IPv4, quoted IPv4 and ICMP checksums are
/// updated incrementally.
#[inline(always)]
fn nat_icmp(
    ctx: &XdpContext,
    ip: &Ip,
    inner_at: usize,
    server: &Server,
    conn: &Connection,
) -> Option<()> {
    let server_addr = server.addr.as_v4_raw()?;
    let nat_addr = conn.nat_addr.as_v4_raw()?;
    let outer = ptr_at_mut::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        let h = &mut *outer;
        h.check = csum::replace4(h.check, h.daddr, server_addr);
        h.daddr = server_addr;
    }
    let icmp = ptr_at_mut::<IcmpHdr>(ctx, ip.l4())?;
    let inner = ptr_at_mut::<Ipv4Hdr>(ctx, inner_at)?;
    let ports = ptr_at_mut::<[u16; 2]>(ctx, inner_at + IPV4_HLEN)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        let h = &mut *inner;
        let p = &mut *ports;
        let mut ic = (*icmp).check;
        let old_check = h.check;
        let (old_s, old_d, old_sp, old_dp) = (h.saddr, h.daddr, p[0], p[1]);
        h.check = csum::replace4(csum::replace4(h.check, old_s, server_addr), old_d, nat_addr);
        h.saddr = server_addr;
        h.daddr = nat_addr;
        p[0] = server.port;
        p[1] = conn.nat_port;
        ic = csum::replace4(ic, old_s, server_addr);
        ic = csum::replace4(ic, old_d, nat_addr);
        ic = csum::replace2(ic, old_sp, server.port);
        ic = csum::replace2(ic, old_dp, conn.nat_port);
        ic = csum::replace2(ic, old_check, h.check);
        (*icmp).check = ic;
    }
    Some(())
}

/// ICMPv6 to a VIP, as [`icmp_to_vip`]: destination unreachable, packet too big, time
/// exceeded and parameter problem about one of our connections go to its server, found by
/// the packet they quote (which must follow the ICMPv6 header directly, without extension
/// headers); anything else passes (echo is answered by the primary's stack). Only an error
/// whose outer header has no extension headers is steered.
#[inline(always)]
pub fn icmp6_to_vip(ctx: &XdpContext, ip: &Ip, next: &mut Next) -> Outcome {
    const ICMP_AT: usize = ETH_HLEN + IPV6_HLEN;
    const INNER_AT: usize = ICMP_AT + ICMP_HLEN;
    if ip.l4() != ICMP_AT {
        return Outcome::Pass;
    }
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, ICMP_AT) else {
        return Outcome::Drop(Stat::DropMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let kind = unsafe { (*icmp).kind };
    if !(ICMPV6_DEST_UNREACH..=ICMPV6_PARAMPROB).contains(&kind) {
        return Outcome::Pass;
    }
    let Some(inner) = ptr_at::<Ipv6Hdr>(ctx, INNER_AT) else {
        return Outcome::Pass;
    };
    let Some(ports) = ptr_at::<[u16; 2]>(ctx, INNER_AT + IPV6_HLEN) else {
        return Outcome::Pass;
    };
    // SAFETY: bounds checked by ptr_at.
    let (inner, ports) = unsafe { (&*inner, *ports) };
    if inner.nexthdr != IPPROTO_TCP && inner.nexthdr != IPPROTO_UDP {
        return Outcome::Pass;
    }
    // The quoted packet went VIP -> client; its connection is keyed client -> VIP.
    let Some(key) = key_slot::<0>() else {
        return Outcome::Pass;
    };
    copy_addr(&mut key.src, &inner.daddr);
    copy_addr(&mut key.dst, &inner.saddr);
    let key = key_rest(key, ports[1], ports[0], inner.nexthdr);
    let Some((conn, server)) = quoted_connection(key) else {
        return Outcome::Pass;
    };
    if server.method == Method::Nat as u8 {
        if nat_icmp6(ctx, server, conn).is_none() {
            return Outcome::Drop(Stat::DropError);
        }
        let hop = match server_hop(ctx, conn.server, Src::V6(&ip.saddr), ip.tot_len, ip.now) {
            Ok(h) => h,
            Err(e) => return e.outcome(),
        };
        return send(ctx, &hop);
    }
    to_forward(next, conn)
}

/// The connection (keyed `key`) an ICMP error quotes, and its server; the error is counted
/// as steered.
#[inline(always)]
fn quoted_connection(key: &FlowKey) -> Option<(&'static Connection, &'static Server)> {
    let conn = CONNECTIONS.get_ptr(key)?;
    // SAFETY: a map value, read only.
    let conn = unsafe { &*conn };
    let server = SERVERS.get(conn.server)?;
    count(Stat::IcmpSteered, 1);
    Some((conn, server))
}

/// Hands an error about direct or tunnel connection `conn` to `forward_xdp`, which sends it
/// to the connection's server: [`FORWARD`], with `next` naming the server. (`forward`
/// inlined here would not fit the stack beside lb_xdp's frame.)
#[inline(always)]
fn to_forward(next: &mut Next, conn: &Connection) -> Outcome {
    next.server = conn.server;
    copy_addr(&mut next.nat_addr, &conn.nat_addr.w);
    next.nat_port = 0;
    Outcome::Action(FORWARD)
}

/// [`nat_icmp`] for ICMPv6: the outer destination becomes the server, and the quoted packet
/// (VIP:vport -> client:cport) what the server sent (server:port -> NAT address:port). The
/// ICMPv6 checksum, whose pseudo-header holds the outer destination, is updated
/// incrementally for every word changed.
#[inline(always)]
fn nat_icmp6(ctx: &XdpContext, server: &Server, conn: &Connection) -> Option<()> {
    const ICMP_AT: usize = ETH_HLEN + IPV6_HLEN;
    const INNER_AT: usize = ICMP_AT + ICMP_HLEN;
    let outer = ptr_at_mut::<Ipv6Hdr>(ctx, ETH_HLEN)?;
    let icmp = ptr_at_mut::<IcmpHdr>(ctx, ICMP_AT)?;
    let inner = ptr_at_mut::<Ipv6Hdr>(ctx, INNER_AT)?;
    let ports = ptr_at_mut::<[u16; 2]>(ctx, INNER_AT + IPV6_HLEN)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        let (o, q, p) = (&mut *outer, &mut *inner, &mut *ports);
        let mut c = (*icmp).check;
        for i in 0..4 {
            let to_server = core::ptr::read_volatile(&server.addr.w[i]);
            let to_nat = core::ptr::read_volatile(&conn.nat_addr.w[i]);
            c = csum::replace4(c, o.daddr[i], to_server);
            o.daddr[i] = to_server;
            c = csum::replace4(c, q.saddr[i], to_server);
            q.saddr[i] = to_server;
            c = csum::replace4(c, q.daddr[i], to_nat);
            q.daddr[i] = to_nat;
        }
        c = csum::replace2(c, p[0], server.port);
        c = csum::replace2(c, p[1], conn.nat_port);
        p[0] = server.port;
        p[1] = conn.nat_port;
        (*icmp).check = c;
    }
    Some(())
}

/// The outcome of a failed next-hop lookup. A packet too big for the path to the server
/// (`overhead` = what forwarding adds) that forbids fragmentation is answered with an ICMP
/// fragmentation-needed, so the client's path MTU discovery shrinks its packets; it is
/// still counted as dropped.
#[inline(always)]
pub fn too_big_or(ctx: &XdpContext, ip: &Ip, e: NoHop, overhead: u16) -> Outcome {
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

/// The frame made room for an ICMP(v6) answer quoting its first `QUOTE` bytes after the
/// Ethernet header: `GROW` bytes of new headers in front, the rest of the packet cut.
/// Returns the Ethernet header as it was; every packet pointer must be derived again.
#[inline(always)]
fn reshape<const QUOTE: usize, const GROW: usize>(ctx: &XdpContext) -> Option<EthHdr> {
    let total = ETH_HLEN + GROW + QUOTE;
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { *eth };
    // The quote must be whole before anything changes.
    ptr_at::<[u8; QUOTE]>(ctx, ETH_HLEN)?;
    // SAFETY: grows the headroom; the caller derives every pointer again.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROW as i32)) } != 0 {
        return None;
    }
    let len = frame_len(ctx);
    if len < total {
        return None;
    }
    // SAFETY: shrinks the tail to the ICMP message; no pointer is used afterwards.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - total) as i32)) } != 0 {
        return None;
    }
    Some(eth)
}

/// Turns the packet (IPv4 without options) into an ICMP fragmentation-needed from its
/// destination back to its source: a new IPv4 and ICMP header go in front of the original
/// IPv4 header and first 8 bytes of its payload, the rest is cut, the MACs are swapped.
#[inline(always)]
fn frag_needed(ctx: &XdpContext, ip: &Ip, mtu: u16) -> Option<()> {
    const QUOTE: usize = IPV4_HLEN + 8;
    const GROW: usize = IPV4_HLEN + ICMP_HLEN;
    let eth = reshape::<QUOTE, GROW>(ctx)?;
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
    const QUOTE: usize = IPV6_HLEN + 8;
    const GROW: usize = IPV6_HLEN + ICMP_HLEN;
    const ICMP_LEN: usize = ICMP_HLEN + QUOTE;
    let eth = reshape::<QUOTE, GROW>(ctx)?;
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
