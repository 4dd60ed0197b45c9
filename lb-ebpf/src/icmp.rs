//! ICMP and ICMPv6 to a VIP: echo to the stack, errors about a connection steered to its
//! server (and translated for NAT).

use aya_ebpf::programs::XdpContext;
use lb_common::{csum, Addr, Connection, FlowKey, Method, Server, Stat, IPPROTO_TCP, IPPROTO_UDP};

use crate::{conn::FORWARD, fwd::*, maps::*, net::*, parse::*, Outcome};

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
