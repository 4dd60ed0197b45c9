//! Connections: a new one's server picked and recorded (`to_service`), the established
//! path, the hand-off to the other ATM during a planned handover, events for the backups,
//! and the NAT source port search (`nat_reserve`, `nat_full`).

use aya_ebpf::{
    bindings::BPF_NOEXIST, cty::c_void, helpers::generated::bpf_loop, macros::map, maps::Array,
    programs::XdpContext,
};
use aya_log_ebpf::info;
use core::ptr::NonNull;
use lb_common::{
    nat, Addr, ConnEvent, Connection, FlowKey, Method, PersistKey, Server, Service, Settings, Stat,
    CONN_FIN, CONN_HALF_OPEN, CONN_NAT, CONN_PEER_FIN, CONN_PEER_RST, CONN_REPLY, CONN_RST,
    DEFAULT_SERVERS, EVENT_CLOSE, EVENT_OPEN, IPPROTO_TCP, NAT_POOL_MAX, SERVER_UP,
    SERVICE_ONE_PACKET, SETTINGS_SYNC,
};

use crate::{finish, flows::*, fwd::*, hop::*, maps::*, net::*, parse::*, sched::*, Outcome};

/// Reports a connection event when backups are to be kept in step.
#[inline(always)]
fn report(settings: &Settings, kind: u8, key: &FlowKey, c: &Connection, peer_mac: [u8; 6]) {
    if settings.flags & SETTINGS_SYNC == 0 {
        return;
    }
    match CONN_EVENTS.reserve::<ConnEvent>(0) {
        Some(mut e) => {
            // Field by field into the ring: a whole ConnEvent built on the stack first does
            // not fit beside everything else in the 512-byte BPF stack.
            let p = e.as_mut_ptr();
            // SAFETY: `p` points to a reserved, writable ConnEvent; every field is written
            // before submit.
            unsafe {
                // Copies known not to overlap: a plain write of map memory into the ring
                // would call BPF's byte-looping memmove.
                core::ptr::copy_nonoverlapping(key, core::ptr::addr_of_mut!((*p).key), 1);
                core::ptr::copy_nonoverlapping(
                    &c.nat_addr,
                    core::ptr::addr_of_mut!((*p).nat_addr),
                    1,
                );
                core::ptr::addr_of_mut!((*p).server).write(c.server);
                core::ptr::addr_of_mut!((*p).flags).write(c.flags);
                core::ptr::addr_of_mut!((*p).nat_port).write(c.nat_port);
                core::ptr::addr_of_mut!((*p).kind).write(kind);
                core::ptr::addr_of_mut!((*p)._pad).write(0);
                core::ptr::addr_of_mut!((*p).peer_mac).write(peer_mac);
            }
            e.submit(0);
        }
        None => count(Stat::SyncLost, 1),
    }
}

/// Whether `daddr` is the IPv6 NAT source address.
#[inline(always)]
pub fn is_nat_addr6(settings: &Settings, daddr: &Addr) -> bool {
    settings.nat_addr6.w != [0; 4] && settings.nat_addr6 == *daddr
}

/// Whether `daddr` is one of the NAT source addresses (the gateway or the pool).
#[inline(always)]
pub fn is_nat_addr(settings: &Settings, daddr: u32) -> bool {
    // `nat_addr` is IPv4-mapped or unset (NAT66's is `nat_addr6`): its last word and the
    // mapping's are enough, two compares where `as_v4_raw` makes four.
    if settings.nat_addr.w[3] == daddr && settings.nat_addr.w[2] == lb_common::V4_MAPPED {
        return true;
    }
    let n = settings.nat_pool_len as usize;
    for i in 1..NAT_POOL_MAX {
        if i < n && settings.nat_pool[i] == daddr {
            return true;
        }
    }
    false
}

/// Whether a connection entry is the server-to-ATM leg of a NAT connection.
#[inline(always)]
pub fn is_reply(c: NonNull<Connection>) -> bool {
    // SAFETY: a map value, read only.
    unsafe { c.as_ref() }.flags & CONN_REPLY != 0
}

/// A packet for a service with no live connection (a new one, or one that idled out, was
/// reopened, or whose server went down): pick a server, record the connection, forward.
#[inline(always)]
pub fn to_service(
    ctx: &XdpContext,
    settings: &Settings,
    svc: &Service,
    ip: &Ip,
    l4: &L4,
) -> Outcome {
    let bytes = ip.bytes as u64;
    let Some(key) = packet_key() else {
        return Outcome::Drop(Stat::DropError);
    };
    let key: &FlowKey = key;
    let now = ip.now;
    let fin_rst = tcp_end_flags(l4.flags);
    let mut nat_addr = 0u32;
    let mut nat_port = 0u16;
    if (svc.new_interval_ns | svc.src_interval_ns) != 0 && !within_limits(svc, key, ip.v6, now) {
        return Outcome::Drop(Stat::DropRateLimited);
    }
    let Some(id) = pick_server(svc, &key, ip.v6, now) else {
        return Outcome::Drop(Stat::DropNoServer);
    };
    let Some(server) = SERVERS.get(id) else {
        return Outcome::Drop(Stat::DropNoServer);
    };
    // Of this service: a row's pages are reused once a newer row is published, and a packet
    // that read the old record just before may index them after.
    if server.flags & SERVER_UP == 0 || server.service != svc.id {
        return Outcome::Drop(Stat::DropNoServer);
    }
    // Direct and tunnel servers take up a connection midway (after a failover without its
    // entry, the server still has it); a NAT server would see a new source port and reset.
    // In a planned handover the other ATM may have made the connection: it gets the packet.
    // Just after a takeover the entry may be on its way: drop, the client retransmits.
    // Otherwise the connection is gone, and the stack's reset (it holds the VIP) says so.
    if server.method == Method::Nat as u8
        && ip.proto == IPPROTO_TCP
        && l4.flags & (TCP_SYN | TCP_ACK) != TCP_SYN
    {
        return no_connection(ctx, settings, now);
    }
    let Some(sc) = scratch() else {
        return Outcome::Drop(Stat::DropError);
    };
    if server.method == Method::Nat as u8 {
        let Some((addr, port)) = nat_reserve(ctx, settings, &key, id, now, &mut sc.reply, ip.v6)
        else {
            return Outcome::Drop(Stat::DropNatPorts);
        };
        nat_addr = addr;
        nat_port = port;
    }
    let conn = &mut sc.conn;
    conn.last_seen_ns = now;
    conn.packets = 1;
    conn.bytes = bytes;
    conn.server = id;
    conn.flags = fin_rst;
    // Half-open until the client's first packet without SYN (the handshake's ACK).
    if ip.proto == IPPROTO_TCP && l4.flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        conn.flags |= CONN_HALF_OPEN;
    }
    conn.nat_port = nat_port;
    // Volatile zeroing and a non-overlapping copy: plain stores would be merged into
    // calls to BPF's byte-looping memset and memmove on every new connection.
    zero_words(&mut conn.nat_addr);
    zero_macs(conn);
    zero_words(&mut conn.ifindex);
    if server.method == Method::Nat as u8 {
        conn.flags |= CONN_NAT;
        if ip.v6 {
            copy_addr(&mut conn.nat_addr, &settings.nat_addr6.w);
        } else {
            conn.nat_addr.w[2] = lb_common::V4_MAPPED;
            conn.nat_addr.w[3] = nat_addr;
        }
    }
    // One-packet scheduling (UDP, direct or tunnel servers: the config says so): the
    // datagram goes alone, leaving no entry for the next to find, and nothing to sync.
    if svc.flags & SERVICE_ONE_PACKET == 0 {
        if CONNECTIONS.insert(key, &*conn, 0).is_err() {
            return Outcome::Drop(Stat::DropError);
        }
        count_load(id, false);
        if fin_rst != 0 {
            count_load(id, true);
        }
        let peer_mac = if conn.flags & CONN_NAT != 0 {
            sc.reply.peer_mac
        } else {
            [0; 6]
        };
        report(settings, EVENT_OPEN, &key, conn, peer_mac);
    }
    count(Stat::NewConns, 1);
    if settings.debug != 0 {
        log_new(ctx, ip, l4, server);
    }
    count_traffic(&SERVICE_STATS, svc.id, bytes);
    count_traffic(&SERVER_STATS, id, bytes);
    // Sent by lb_xdp itself (`forward_xdp`): this function's frame and forward's do not
    // fit the 512-byte stack together beside lb_xdp's.
    let Some(parsed) = PARSED.get_ptr_mut(0) else {
        return Outcome::Drop(Stat::DropError);
    };
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU.
    let next = unsafe { &mut (*parsed).next };
    next.server = id;
    // Only NAT's forward reads the source it translates to.
    if conn.flags & CONN_NAT != 0 {
        copy_addr(&mut next.nat_addr, &conn.nat_addr.w);
    }
    next.nat_port = nat_port;
    Outcome::Action(FORWARD)
}

/// Whether a new connection of `svc` from `key`'s client is within the service's limits:
/// its client prefix's (`max_new_per_sec_per_source`) first, so a flood from one prefix is
/// turned away before it spends the whole service's (`max_new_per_sec`).
/// Inlined: as a BPF function of its own, its frame, rounded up to 32 bytes, would push
/// the chain lb_xdp -> to_service_xdp -> it past the 512 bytes of stack.
#[inline(always)]
fn within_limits(svc: &Service, key: &FlowKey, v6: bool, now: u64) -> bool {
    if svc.src_interval_ns != 0 {
        let Some(pkey) = LIMIT_KEY.get_ptr_mut(0) else {
            return true;
        };
        // SAFETY: a per-CPU slot; XDP runs to completion on its CPU.
        let pkey = unsafe { &mut *pkey };
        pkey.client = key.src.masked(svc.limit_prefix, v6);
        pkey.service = svc.id;
        let pkey: &PersistKey = pkey;
        let interval = svc.src_interval_ns as u64;
        match SOURCE_RATE.get_ptr_mut(pkey) {
            Some(tat) => {
                if !take(tat, now, interval) {
                    return false;
                }
            }
            None => {
                // A prefix not seen lately starts with a full burst (racing CPUs may both
                // insert: one more connection let through, not fewer).
                let _ = SOURCE_RATE.insert(pkey, &(now + interval), 0);
            }
        }
    }
    if svc.new_interval_ns != 0 {
        if let Some(tat) = NEW_RATE.get_ptr_mut(svc.id) {
            return take(tat, now, svc.new_interval_ns as u64);
        }
    }
    true
}

/// Takes one connection from the bucket whose TAT is at `tat` (a map value): one
/// compare-and-swap; a CPU that loses the race to another one is let through.
#[inline(always)]
fn take(tat: *mut u64, now: u64, interval: u64) -> bool {
    // SAFETY: an aligned u64 in map memory.
    let seen = unsafe { core::ptr::read_volatile(tat) };
    let Some(next) = lb_common::rate::admit(seen, now, interval) else {
        return false;
    };
    // SAFETY: as above.
    unsafe {
        use core::intrinsics::AtomicOrdering::SeqCst;
        core::intrinsics::atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(tat, seen, next);
    }
    true
}

/// What becomes of a packet that belongs to no known connection and cannot open one (a NAT
/// connection taken up midway, or a reply to a NAT port): in a planned handover the other ATM
/// may have made the connection moments ago, and gets it; just after a takeover its entry may
/// be on its way, so it is dropped and the peer retransmits; otherwise it is the stack's
/// business (a reset says the connection is gone).
#[inline(always)]
pub fn no_connection(ctx: &XdpContext, settings: &Settings, now: u64) -> Outcome {
    let action = to_peer_xdp(ctx, now);
    if action != NOT_TO_PEER {
        return Outcome::Action(action);
    }
    if now < settings.settle_until_ns {
        return Outcome::Drop(Stat::DropNoConnection);
    }
    Outcome::Pass
}

/// During a planned handover (`Settings::peer_addr`, or `peer_addr6`), sends a packet of no known connection
/// unchanged to the other ATM, which may have made the connection in the last moments (its
/// record not here yet): the new primary receives the servers' replies, and clients, for
/// connections the old one made; the old one, for connections the new one made, until the
/// servers' and clients' ARP caches have moved. [`NOT_TO_PEER`] when there is no handover,
/// no neighbour entry for the other ATM, or the packet came from it (it does not know the
/// connection either: no ping-pong); the caller then goes on as without a peer.
///
/// A BPF function that calls none: it runs from inside `to_service_xdp`, and the frames of a
/// chain of calls share the 512-byte stack.
#[inline(never)]
fn to_peer_xdp(ctx: &XdpContext, now: u64) -> u32 {
    let (Some(settings), Some(sc)) = (SETTINGS.get(0), scratch()) else {
        return NOT_TO_PEER;
    };
    let v6 = settings.peer_addr == 0;
    if (v6 && settings.peer_addr6.w == [0; 4]) || now >= settings.peer_until_ns {
        return NOT_TO_PEER;
    }
    let p = &mut sc.fib;
    let rc = if v6 {
        fib_query6(ctx, p, &settings.peer_addr6, &settings.local_addr6, 0)
    } else {
        let src = settings.local_addr.as_v4_raw().unwrap_or(0);
        fib_query(ctx, p, settings.peer_addr, src, 0)
    };
    if rc != FIB_SUCCESS {
        return NOT_TO_PEER;
    }
    let Some(eth) = ptr_at_mut::<EthHdr>(ctx, 0) else {
        return NOT_TO_PEER;
    };
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        if (*eth).src == p.dmac {
            return NOT_TO_PEER;
        }
        put_mac(&mut (*eth).dst, &p.dmac);
        put_mac(&mut (*eth).src, &p.smac);
    }
    count(Stat::ToPeer, 1);
    finish(if p.ifindex == ctx.ingress_ifindex() as u32 {
        Outcome::Tx
    } else {
        Outcome::Redirect(p.ifindex)
    })
}

/// What `to_service_xdp` returns for a packet to be sent to the server in `Parsed::next`.
pub const FORWARD: u32 = u32::MAX - 1;

/// What [`to_peer_xdp`] returns for a packet that does not go to the other ATM.
const NOT_TO_PEER: u32 = u32::MAX;

/// What [`established_xdp`] returns for a packet that is not of a live connection.
pub const NOT_ESTABLISHED: u32 = u32::MAX;

/// A packet of known connection `c` (not a NAT reply leg): forwarded to its server if the
/// connection is live; else [`NOT_ESTABLISHED`], and the caller treats it as new.
#[inline(never)]
pub fn established_xdp(ctx: &XdpContext, c: &mut Connection, ip: &Ip, l4: &L4) -> u32 {
    let Some(settings) = SETTINGS.get(0) else {
        return finish(Outcome::Pass);
    };
    match established(ctx, settings, c, ip, l4) {
        Some(outcome) => finish(outcome),
        None => NOT_ESTABLISHED,
    }
}

#[inline(always)]
pub fn established(
    ctx: &XdpContext,
    settings: &Settings,
    c: &mut Connection,
    ip: &Ip,
    l4: &L4,
) -> Option<Outcome> {
    let now = ip.now;
    let syn_only = l4.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // What this CPU forwarded of the flow from its cache goes into the shared entry first:
    // its last packet may be newer than the entry's. The slot is emptied, and filled again
    // below if the connection goes on. A SYN (the tuple starts another connection), FIN or
    // RST changes the connection for every CPU: the flow leaves every CPU's cache, whose
    // packets of it go into the entry.
    if l4.flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        forget_everywhere(c, ip, l4);
    } else {
        take_cached(c, ip);
    }
    let server = SERVERS.get(c.server)?;
    // Saturating: an entry the daemon installed (a synced one) may carry a time a little
    // ahead of this coarse clock, and is then as fresh as can be, not 2^64 ns old.
    if now.saturating_sub(c.last_seen_ns) > server.idle_limit_ns(&settings.timeouts, c.flags)
        || (syn_only && c.flags & (CONN_FIN | CONN_RST) != 0)
    {
        return None;
    }
    // Its server must be up and still serve the VIP, port and protocol the connection was
    // made for: a server taken out, a service removed (its servers are marked down) or a
    // server index given to another service loses the connection, as `services` would.
    if !serves(server, ip, l4) {
        // The connection moves to another server: no CPU may send it to this one again,
        // should it come back up within the cache's second.
        forget_everywhere(c, ip, l4);
        return None;
    }
    let bytes = ip.bytes as u64;
    count_vip(ip.bytes);
    c.last_seen_ns = now;
    c.packets += 1;
    c.bytes += bytes;
    let fin_rst = tcp_end_flags(l4.flags);
    if fin_rst != 0 && c.flags & (CONN_FIN | CONN_RST) == 0 {
        if c.flags & CONN_REPLY == 0 {
            count_load(c.server, true);
        }
        c.flags |= fin_rst;
        let key = packet_key()?;
        report(settings, EVENT_CLOSE, key, c, [0; 6]);
    }
    if fin_rst != 0 && c.flags & CONN_NAT != 0 {
        mark_reply_leg(c, server, fin_rst, ip.proto);
    }
    c.flags |= fin_rst;
    if l4.flags & TCP_SYN == 0 {
        c.flags &= !CONN_HALF_OPEN;
    }
    let (id, service, method) = (c.server, server.service, server.method);
    count_traffic(&SERVICE_STATS, service, bytes);
    count_traffic(&SERVER_STATS, id, bytes);
    cache_if_due(c, ip, l4, method, settings.flow_gen);
    Some(forward(ctx, settings, id, ip, &c.nat_addr, c.nat_port))
}

/// Whether `server` still serves a packet of a connection made to it: up, and the VIP,
/// port and protocol of its service are the packet's. A server taken out, a service
/// removed (its servers are marked down) or a server index given to another service loses
/// the connection, as `services` would.
#[inline(always)]
pub fn serves(server: &Server, ip: &Ip, l4: &L4) -> bool {
    serves_at(server, &ip.daddr, l4.dport, ip.proto)
}

/// [`serves`], for a packet to `daddr`, port `dport` (as on the wire), protocol `proto`.
#[inline(always)]
pub fn serves_at(server: &Server, daddr: &Addr, dport: u16, proto: u8) -> bool {
    server.flags & SERVER_UP != 0
        && server.vip == *daddr
        && server.vport == dport
        && server.proto == proto
}

/// The client's leg of NAT connection `c` saw a FIN or RST (`fin_rst`): says so on the
/// reply leg, whose NAT port is free again once both sides have closed (`lb_common::nat`).
#[inline(always)]
fn mark_reply_leg(c: &Connection, server: &Server, fin_rst: u16, proto: u8) {
    let Some(key) = scratch_key::<1>(server.addr, c.nat_addr, server.port, c.nat_port, proto)
    else {
        return;
    };
    if let Some(r) = CONNECTIONS.get_ptr_mut(&*key) {
        let mut peer = 0;
        if fin_rst & CONN_FIN != 0 {
            peer |= CONN_PEER_FIN;
        }
        if fin_rst & CONN_RST != 0 {
            peer |= CONN_PEER_RST;
        }
        // SAFETY: a map value; a racing update of the flags only delays a port's reuse.
        unsafe { (*r).flags |= peer };
    }
}

#[inline(always)]
pub fn tcp_end_flags(flags: u8) -> u16 {
    let mut f = 0;
    if flags & TCP_FIN != 0 {
        f |= CONN_FIN;
    }
    if flags & TCP_RST != 0 {
        f |= CONN_RST;
    }
    f
}

/// Server `id` is up and belongs to service `service` (an index freed by a reload and given
/// to another service must not inherit the old one's clients).
#[inline(always)]
pub fn server_ok(id: u32, service: u32) -> bool {
    matches!(SERVERS.get(id), Some(s) if s.flags & SERVER_UP != 0 && s.service == service)
}

/// Reserves a NAT source (address, port) toward `server` for the connection `key` (an IPv6
/// one, `v6`, from the one IPv6 NAT address, whose value is then not returned): takes
/// the first free pair from the server's cursor on (see `lb_common::nat`) and installs the
/// reply leg's entry (server -> NAT address:port) there. Returns the pair, or `None` when
/// every pair is held: then further searches toward this server wait a little
/// (`NAT_FULL_BACKOFF_NS`), so a flood at exhaustion costs no full search per packet.
#[inline(always)]
fn nat_reserve(
    ctx: &XdpContext,
    settings: &Settings,
    key: &FlowKey,
    id: u32,
    now: u64,
    reply: &mut Connection,
    v6: bool,
) -> Option<(u32, u16)> {
    let lo = settings.nat_port_min as u32;
    let hi = settings.nat_port_max as u32;
    let no_addr = if v6 {
        settings.nat_addr6.w == [0; 4]
    } else {
        settings.nat_addr.as_v4_raw().is_none()
    };
    if no_addr || hi < lo {
        return None;
    }
    if let Some(until) = NAT_FULL.get(id) {
        if now < *until {
            return None;
        }
    }
    let span = hi - lo + 1;
    let addrs = if settings.nat_pool_len == 0 || v6 {
        1
    } else {
        settings.nat_pool_len.min(NAT_POOL_MAX as u32)
    };
    let server = SERVERS.get_ptr_mut(id)?;
    // SAFETY: a map value. Two CPUs racing here may start from the same pair; the reply
    // leg goes in with BPF_NOEXIST, so only one of them takes it and the other goes on.
    let cursor = unsafe {
        let c = (*server).nat_cursor;
        (*server).nat_cursor = c.wrapping_add(1);
        c
    };
    let start = cursor.wrapping_add(settings.nat_cursor_base);
    let (saddr, sport) = unsafe { ((*server).addr, (*server).port) };
    let (smac, dmac) = match ptr_at::<EthHdr>(ctx, 0) {
        // SAFETY: bounds checked by ptr_at.
        Some(eth) => unsafe { ((*eth).src, (*eth).dst) },
        None => return None,
    };
    scratch_key::<1>(saddr, settings.nat_addr, sport, 0, key.proto)?;
    reply.last_seen_ns = now;
    zero_words(&mut reply.packets);
    zero_words(&mut reply.bytes);
    reply.server = id;
    reply.flags = CONN_NAT | CONN_REPLY;
    reply.nat_port = key.sport;
    reply.nat_addr = key.src;
    reply.peer_mac = smac;
    reply.local_mac = dmac;
    reply.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: a map value.
    let t = &settings.timeouts;
    let (timeout_ns, fin_timeout_ns) = unsafe {
        (
            (*server).idle_limit_ns(t, 0),
            (*server).idle_limit_ns(t, CONN_FIN),
        )
    };
    let mut probe = NatProbe {
        timeout_ns,
        fin_timeout_ns,
        start,
        span,
        addrs,
        lo,
        found: 0,
        v6: v6 as u32,
    };
    // SAFETY: the helper calls `nat_probe` with `probe`, which lives on this stack frame for
    // the whole call.
    unsafe {
        bpf_loop(
            span * addrs,
            nat_probe as *mut c_void,
            &mut probe as *mut NatProbe as *mut c_void,
            0,
        );
    }
    if probe.found == 0 {
        if let Some(p) = NAT_FULL.get_ptr_mut(id) {
            // SAFETY: a map value; racing writers write the same kind of value.
            unsafe { *p = now + NAT_FULL_BACKOFF_NS };
        }
        return None;
    }
    // The cursor goes on after the pair taken (if no other CPU moved it meanwhile).
    if let Some(s) = SERVERS.get_ptr_mut(id) {
        // SAFETY: a map value.
        unsafe {
            if (*s).nat_cursor == cursor.wrapping_add(1) {
                (*s).nat_cursor = cursor.wrapping_add(probe.found);
            }
        }
    }
    let (slot, off) = nat::candidate(start.wrapping_add(probe.found - 1), span, addrs);
    Some((nat_pool_addr(settings, slot), ((lo + off) as u16).to_be()))
}

/// How long searches for a NAT port toward a server wait after one found every port held.
const NAT_FULL_BACKOFF_NS: u64 = 250_000_000;

/// Server index -> time until which the NAT ports toward it count as all held.
#[map(name = "nat_full")]
static NAT_FULL: Array<u64> = Array::with_max_entries(DEFAULT_SERVERS, 0);

/// What `nat_probe` needs besides the maps: where the search started and how far it goes.
#[repr(C)]
struct NatProbe {
    /// The idle timeouts, open and closing, of a connection toward this server (a pair held
    /// by another server line of the same address and port is judged by these too).
    timeout_ns: u64,
    fin_timeout_ns: u64,
    start: u32,
    span: u32,
    addrs: u32,
    lo: u32,
    /// 1 + the index of the free pair found; 0 while none is.
    found: u32,
    /// 1: the IPv6 NAT address, the only one.
    v6: u32,
}

/// NAT address `slot` of the pool (the gateway is slot 0), as on the wire.
#[inline(always)]
fn nat_pool_addr(settings: &Settings, slot: u32) -> u32 {
    if settings.nat_pool_len == 0 {
        return settings.nat_addr.w[3];
    }
    // The mask tells the verifier what `slot < addresses <= NAT_POOL_MAX` already says (a
    // power of two): it tracks no bounds through a division. Read through a volatile load,
    // or LLVM, which knows the bound, drops the mask.
    // SAFETY: reading a local.
    let slot = unsafe { core::ptr::read_volatile(&slot) } as usize & (NAT_POOL_MAX - 1);
    settings.nat_pool[slot]
}

/// One step of the NAT port search (a `bpf_loop` callback): tries pair `start + i`; the
/// reply key (server side filled in) is slot 1 of the flow keys, the reply entry to install
/// is in the scratch area. Returns 1 to stop (found), 0 to go on.
#[inline(never)]
extern "C" fn nat_probe(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `nat_reserve` passes its NatProbe.
    let p = unsafe { &mut *(ctx as *mut NatProbe) };
    let (Some(settings), Some(keys), Some(sc)) = (SETTINGS.get(0), KEYS.get_ptr_mut(0), scratch())
    else {
        return 1;
    };
    let (slot, off) = nat::candidate(p.start.wrapping_add(i as u32), p.span, p.addrs);
    let now = sc.reply.last_seen_ns;
    // In a planned handover both ATMs make connections: each takes its half of the ports.
    if now < settings.peer_until_ns && !nat::in_stripe(off, settings.nat_stripe) {
        return 0;
    }
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU.
    let key = unsafe { &mut (*keys)[1] };
    if p.v6 != 0 {
        copy_addr(&mut key.dst, &settings.nat_addr6.w);
    } else {
        key.dst = Addr::v4_raw(nat_pool_addr(settings, slot));
    }
    key.dport = ((p.lo + off) as u16).to_be();
    let Some(e) = CONNECTIONS.get_ptr_mut(&*key) else {
        // Never used, or gone: whoever inserts first has it.
        if CONNECTIONS
            .insert(&*key, &sc.reply, BPF_NOEXIST as u64)
            .is_ok()
        {
            p.found = i as u32 + 1;
            return 1;
        }
        return 0;
    };
    // SAFETY: a map value. Another CPU may be reading or claiming it too: the claim below
    // is one compare-and-swap on its last-seen time, so only one CPU takes a stale pair
    // (removing it and inserting afresh would let a second CPU remove the first one's).
    let (flags, seen) = unsafe { ((*e).flags, (*e).last_seen_ns) };
    let holds = nat::Holds {
        timeout_ns: p.timeout_ns,
        fin_timeout_ns: p.fin_timeout_ns,
        hold_ns: settings.port_hold_ns,
        time_wait_ns: settings.time_wait_ns,
    };
    if !nat::port_free(flags, seen, now, &holds) {
        return 0;
    }
    // SAFETY: an aligned u64 in map memory.
    let claimed = unsafe {
        use core::intrinsics::AtomicOrdering::SeqCst;
        core::intrinsics::atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(
            core::ptr::addr_of_mut!((*e).last_seen_ns),
            seen,
            now,
        )
        .1
    };
    if !claimed {
        return 0;
    }
    // SAFETY: claimed: this CPU alone rewrites it (a late packet of the old connection
    // may read it meanwhile; that connection is over).
    unsafe {
        // The old connection's client leg still names this pair: it goes too, or a late
        // packet of it would be translated onto the new connection.
        forget_client_leg(&*e, key);
        // Word by word, volatile: plain stores and copies here became five calls of BPF's
        // byte-looping memset and memmove on every step of the search that reused a pair.
        let r = &sc.reply;
        zero_u64(&mut (*e).packets);
        zero_u64(&mut (*e).bytes);
        (*e).server = r.server;
        (*e).flags = r.flags;
        (*e).nat_port = r.nat_port;
        copy_addr(&mut (*e).nat_addr, &r.nat_addr.w);
        put_mac(&mut (*e).peer_mac, &r.peer_mac);
        put_mac(&mut (*e).local_mac, &r.local_mac);
        (*e).ifindex = r.ifindex;
    }
    p.found = i as u32 + 1;
    1
}

/// Removes the client leg of the NAT connection whose reply leg `reply` (keyed `key`) is
/// about to be replaced, if it still names this (address, port).
#[inline(always)]
fn forget_client_leg(reply: &Connection, key: &FlowKey) {
    let Some(server) = SERVERS.get(reply.server) else {
        return;
    };
    let Some(keys) = KEYS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU slot; slot 2 is only used here.
    let client = unsafe { &mut (*keys)[2] };
    copy_addr(&mut client.src, &reply.nat_addr.w);
    copy_addr(&mut client.dst, &server.vip.w);
    client.sport = reply.nat_port;
    client.dport = server.vport;
    client.proto = key.proto;
    client._pad[0] = 0;
    client._pad[1] = 0;
    client._pad[2] = 0;
    if let Some(c) = CONNECTIONS.get_ptr(&*client) {
        // SAFETY: a map value, read only.
        let c = unsafe { &*c };
        if c.nat_port == key.dport && c.nat_addr == key.dst {
            let _ = CONNECTIONS.remove(&*client);
        }
    }
}

/// The per-connection debug record: "new tcp 1.2.3.4:9645 -> 192.0.2.100:80 via
/// 192.0.2.11:80 direct".
#[inline(always)]
fn log_new(ctx: &XdpContext, ip: &Ip, l4: &L4, server: &Server) {
    let proto = if ip.proto == IPPROTO_TCP {
        "tcp"
    } else {
        "udp"
    };
    let method = match Method::from_u8(server.method) {
        Some(m) => m.name(),
        None => "?",
    };
    if ip.v6 {
        info!(
            ctx,
            "new {} [{:i}]:{} -> [{:i}]:{} via [{:i}]:{} {}",
            proto,
            ip.saddr.octets(),
            u16::from_be(l4.sport),
            ip.daddr.octets(),
            u16::from_be(l4.dport),
            server.addr.octets(),
            u16::from_be(server.port),
            method
        );
        return;
    }
    info!(
        ctx,
        "new {} {:i}:{} -> {:i}:{} via {:i}:{} {}",
        proto,
        ip.saddr.w[3].to_ne_bytes(),
        u16::from_be(l4.sport),
        ip.daddr.w[3].to_ne_bytes(),
        u16::from_be(l4.dport),
        server.addr.w[3].to_ne_bytes(),
        u16::from_be(server.port),
        method
    );
}

/// Zeroes a new connection's two MACs (12 bytes from a 4-aligned offset) as three words:
/// volatile, as `zero_words`, and not byte by byte.
#[inline(always)]
fn zero_macs(conn: &mut Connection) {
    const {
        let at = core::mem::offset_of!(Connection, peer_mac);
        assert!(at % 4 == 0 && core::mem::offset_of!(Connection, local_mac) == at + 6);
    }
    let w = conn.peer_mac.as_mut_ptr() as *mut u32;
    // SAFETY: the two MACs are 12 contiguous bytes of `conn` at a 4-aligned offset of a
    // 8-aligned struct (asserted above).
    unsafe {
        w.write_volatile(0);
        w.add(1).write_volatile(0);
        w.add(2).write_volatile(0);
    }
}
