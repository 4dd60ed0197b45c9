//! ICMP to a VIP: echo to the stack, errors about a connection steered to its server (and
//! translated for NAT).

use aya_ebpf::programs::XdpContext;
use lb_common::{csum, Addr, Connection, Method, Server, Settings, Stat, IPPROTO_TCP, IPPROTO_UDP};

use crate::{fwd::*, maps::*, net::*, parse::*, Outcome};

/// ICMP to a VIP: echo goes to the stack (the primary answers); an error about one of our
/// connections (fragmentation needed, say) goes to that connection's server, found by the
/// header it quotes; anything else passes.
#[inline(always)]
pub fn icmp_to_vip(ctx: &XdpContext, settings: &Settings, ip: &Ip) -> Outcome {
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
    let Some(conn) = CONNECTIONS.get_ptr(&*key) else {
        return Outcome::Pass;
    };
    // SAFETY: a map value, read only.
    let conn = unsafe { &*conn };
    let Some(server) = SERVERS.get(conn.server) else {
        return Outcome::Pass;
    };
    count(Stat::IcmpSteered, 1);
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
    forward(ctx, settings, conn.server, ip, 0, 0)
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
