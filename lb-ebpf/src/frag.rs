//! Fragments that follow their first (`lb_common::frag`, docs/DATAPLANE.md "Fragments").
//! A first fragment of ours writes down its flow key (`remember`). A fragment after it
//! lacks only its ports: `route_ports4` and `route_ports6` give it its first fragment's,
//! and from there it takes the path of any packet of that flow (its connection, the flow
//! cache, a NAT reply leg), with no flags, no new connection made for it, and the L4
//! header, which only the first fragment has, left alone by the rewrites.

use lb_common::{
    frag::{route_fresh, NO_SERVER},
    Addr, FragKey, Stat, SERVICE_ONE_PACKET,
};

use crate::{conn::*, finish, maps::*, net::*, parse::*, Outcome};

/// The fields of a `fragments` key after the addresses.
#[inline(always)]
fn frag_key_rest(k: &mut FragKey, id: u32, proto: u8) {
    k.id = id;
    k.proto = proto;
    k._pad[0] = 0;
    k._pad[1] = 0;
    k._pad[2] = 0;
}

/// A first fragment of ours (`ip`), its ports `sport` and `dport`: its flow key is where
/// the fragments after it go. Written before the packet's own path is taken; a first
/// fragment then dropped leaves a route to no connection, and those after it are dropped.
/// A BPF function of its own: lb_xdp's frame has no room for its work.
#[inline(never)]
pub fn remember(ip: &Ip, sport: u16, dport: u16) -> u32 {
    let Some(sc) = scratch() else {
        return 0;
    };
    let k = &mut sc.frag_key;
    copy_addr(&mut k.src, &ip.saddr.w);
    copy_addr(&mut k.dst, &ip.daddr.w);
    frag_key_rest(k, ip.frag_id, ip.proto);
    let r = &mut sc.frag_route;
    copy_addr(&mut r.conn.src, &ip.saddr.w);
    copy_addr(&mut r.conn.dst, &ip.daddr.w);
    key_rest(&mut r.conn, sport, dport, ip.proto);
    r.server = NO_SERVER;
    r._pad = 0;
    r.seen_ns = ip.now;
    let _ = FRAGMENTS.insert(&sc.frag_key, r, 0);
    1
}

/// A one-packet service chose server `id` for a first fragment (`remember` was called for
/// it): those after it go there too, there being no connection entry to find. A BPF
/// function of its own, as `remember`: `to_service_xdp`'s frame has no room for more.
#[inline(never)]
pub fn remember_server(id: u32) -> u32 {
    let Some(sc) = scratch() else {
        return 0;
    };
    if let Some(r) = FRAGMENTS.get_ptr_mut(&sc.frag_key) {
        // SAFETY: a map value; its first fragment's CPU is its only writer.
        unsafe { (*r).server = id };
    }
    1
}

/// An IPv4 fragment after the first, from `saddr` to `daddr` (as on the wire), of
/// identification `id` and protocol `proto`: its first fragment's ports, as [`ports_of`]
/// gives them.
#[inline(never)]
pub fn route_ports4(saddr: u32, daddr: u32, id: u16, proto: u8, now: u64) -> u32 {
    let Some(sc) = scratch() else {
        return 0;
    };
    let k = &mut sc.frag_key;
    k.src = Addr::v4_raw(saddr);
    k.dst = Addr::v4_raw(daddr);
    frag_key_rest(k, id as u32, proto);
    ports_of(now)
}

/// An IPv6 fragment after the first, its addresses, identification and protocol in
/// `parsed`'s `ip`: its first fragment's ports, as [`ports_of`] gives them.
#[inline(never)]
pub fn route_ports6(now: u64) -> u32 {
    let (Some(sc), Some(p)) = (scratch(), PARSED.get_ptr(0)) else {
        return 0;
    };
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU.
    let ip = unsafe { &(*p).ip };
    let k = &mut sc.frag_key;
    copy_addr(&mut k.src, &ip.saddr.w);
    copy_addr(&mut k.dst, &ip.daddr.w);
    frag_key_rest(k, ip.frag_id, ip.proto);
    ports_of(now)
}

/// The route of the fragment whose key is in the scratch area: its first fragment's
/// source and destination ports (as on the wire, in the low and high half) if one was
/// seen within `FRAG_LIFETIME_NS`, else 0 (no service or NAT port is 0). They go into
/// `parsed`'s `l4` too, with no flags, and a one-packet service's server into its `next`.
#[inline(always)]
fn ports_of(now: u64) -> u32 {
    let (Some(sc), Some(p)) = (scratch(), PARSED.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU.
    let parsed = unsafe { &mut *p };
    parsed.l4.sport = 0;
    parsed.l4.dport = 0;
    parsed.l4.flags = 0;
    let Some(r) = FRAGMENTS.get_ptr(&sc.frag_key) else {
        return 0;
    };
    // SAFETY: a map value, read only.
    let r = unsafe { &*r };
    if !route_fresh(r.seen_ns, now) {
        return 0;
    }
    parsed.l4.sport = r.conn.sport;
    parsed.l4.dport = r.conn.dport;
    parsed.next.server = r.server;
    r.conn.sport as u32 | (r.conn.dport as u32) << 16
}

/// A fragment after the first, of service `service` (whose flags are `flags`), `bytes`
/// long, whose connection is gone or never was: if the service is one-packet and its
/// first fragment's server (`parsed`'s `next.server`, from `ports_of`) is up and still the
/// service's, the fragment is counted for both and goes there: [`FORWARD`], `next` naming
/// the server. Otherwise dropped as `drop_fragment`.
#[inline(never)]
pub fn later_fragment_xdp(service: u32, flags: u8, bytes: u32) -> u32 {
    let Some(p) = PARSED.get_ptr_mut(0) else {
        return finish(Outcome::Drop(Stat::DropError));
    };
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU.
    let next = unsafe { &mut (*p).next };
    let id = next.server;
    if flags & SERVICE_ONE_PACKET == 0 || id == NO_SERVER || !server_ok(id, service) {
        return finish(Outcome::Drop(Stat::DropFragment));
    }
    next.nat_port = 0;
    count_traffic(&SERVICE_STATS, service, bytes as u64);
    count_traffic(&SERVER_STATS, id, bytes as u64);
    FORWARD
}
