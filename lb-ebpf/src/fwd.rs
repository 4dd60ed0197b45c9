//! Sending a packet on: by the server's method (direct MAC rewrite, IPIP or IPv6-in-IPv6
//! tunnel, NAT rewrite), and NAT replies translated back. The next hop is `hop`'s, the ICMP
//! answer to a packet too big for its path `icmp`'s.

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    csum, Addr, Connection, Method, Settings, Stat, CONN_FIN, CONN_PEER_FIN,
    CONN_SERVER_CLOSED_FIRST, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP,
};

use crate::{conn::*, finish, hop::*, icmp::*, maps::*, net::*, parse::*, Outcome};

/// [`forward`] for a new connection, to the server `to_service_xdp` chose (`next`), as a
/// BPF function of its own, its outcome finished: `to_service_xdp`'s frame and forward's
/// do not fit the 512-byte stack together beside lb_xdp's.
#[inline(never)]
pub fn forward_xdp(ctx: &XdpContext, ip: &Ip, next: &Next) -> u32 {
    // A new connection's first fragment: the server chosen is where those after it go if
    // no connection entry names it (a one-packet service's).
    if ip.frag == FRAG_FIRST {
        crate::frag::remember_server(next.server);
    }
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
    if ip.v6 {
        return forward6(ctx, settings, id, ip, nat, nat_port);
    }
    let Some(server) = SERVERS.get(id) else {
        return Outcome::Drop(Stat::DropNoServer);
    };
    let nat_addr = nat.w[3];
    let (method, server_port) = (server.method, server.port);
    // Only tunnel and NAT write the server's address into the packet (direct does not
    // read it: the checks cost nine instructions a packet).
    let server_v4 = || server.addr.as_v4_raw();
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
            let Some(server_addr) = server_v4() else {
                return Outcome::Drop(Stat::DropNoRoute);
            };
            if encapsulate(ctx, local, server_addr, ip.tot_len).is_none() {
                return Outcome::Drop(Stat::DropError);
            }
            send(ctx, &hop)
        }
        Some(Method::Nat) => {
            let Some(server_addr) = server_v4() else {
                return Outcome::Drop(Stat::DropNoRoute);
            };
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
        Some(Method::Local) => Outcome::Local,
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
        Some(Method::Local) => Outcome::Local,
        None => Outcome::Drop(Stat::DropNoRoute),
    }
}

/// A server's reply on a NAT connection: back to VIP -> client.
#[inline(always)]
pub fn nat_reply(ctx: &XdpContext, reply: &mut Connection, ip: &Ip, tcp_flags: u8) -> Outcome {
    let bytes = ip.bytes as u64;
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
    // A fragment after the first has no L4 header: its first fragment's checksum covers it.
    if ip.frag == FRAG_LATER {
        return Some(());
    }
    let ports = ptr_at_mut::<[u16; 2]>(ctx, ip.l4())?;
    // SAFETY: bounds checked by ptr_at_mut.
    let (old_sp, old_dp) = unsafe {
        let p = &mut *ports;
        let old = (p[0], p[1]);
        p[0] = sport;
        p[1] = dport;
        old
    };
    let check = ptr_at_mut::<u16>(ctx, ip.l4_check_at())?;
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
    // A fragment after the first: the addresses alone (no L4 header, as in `rewrite`).
    if ip.frag == FRAG_LATER {
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe {
            let h = &mut *h;
            for i in 0..4 {
                h.saddr[i] = core::ptr::read_volatile(&saddr.w[i]);
                h.daddr[i] = core::ptr::read_volatile(&daddr.w[i]);
            }
        }
        return Some(());
    }
    let ports = ptr_at_mut::<[u16; 2]>(ctx, ip.l4())?;
    let check = ptr_at_mut::<u16>(ctx, ip.l4_check_at())?;
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
pub fn ipv4_checksum(h: &Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 bytes of plain integers.
    let words: &[u16; 10] = unsafe { &*(h as *const Ipv4Hdr as *const [u16; 10]) };
    csum::ipv4_header(words)
}
