//! lb's XDP programs.
//!
//! `lb_xdp`, the balancer: for IPv4 and IPv6 packets to a configured VIP:port/protocol it
//! finds the connection or picks a server (persistence, then the service's scheduler row),
//! and forwards by the server's method: direct (MAC rewrite), tunnel (IPv4-in-IPv4,
//! IPv6-in-IPv6) or nat (IPv4: addresses and ports rewritten, replies translated back). Everything else passes untouched; malformed
//! packets for a service are dropped; every packet lands in exactly one outcome counter.
//! When its daemon is gone (the settings' lease ran out) it drops service traffic and ARP
//! requests for the VIPs and the NAT address, which the stack would otherwise answer.
//!
//! `lb_decap`, for real servers in tunnel mode: strips the outer header of IPIP and
//! IPv6-in-IPv6 packets from configured ATMs and passes the inner packet to the stack.
//!
//! This file holds the entry points and reads as a packet's path; the work is in `parse`
//! (headers), `conn` (connections, NAT ports), `flows` (the per-CPU flow cache), `sched`
//! (server choice), `fwd` (rewriting, next hop), `icmp` and `decap`, over the maps of `maps`.
#![no_std]
#![no_main]
// A compare-and-swap on map memory (claiming a NAT port): the BPF target's atomics have no
// CAS in core's API, but the instruction exists (BPF_CMPXCHG, kernel 5.12).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod clock;
mod conn;
mod decap;
mod flows;
mod frag;
mod fwd;
mod hop;
mod icmp;
mod maps;
mod net;
mod parse;
mod sched;

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_redirect, macros::xdp, programs::XdpContext,
};
use core::ptr::NonNull;
use lb_common::{
    flow_cache_slot, flow_cache_slot6, Addr, CachedFlow, CachedFlow6, Connection, DecapStat,
    Service, Settings, Stat, CONN_REPLY, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    SETTINGS_ACTIVE,
};

use crate::{conn::*, decap::*, flows::*, frag::*, fwd::*, icmp::*, maps::*, net::*, parse::*};

/// What happens to a packet; each maps to one XDP action and one outcome counter.
enum Outcome {
    Pass,
    /// To a `local` server: up this ATM's own stack, counted as forwarded.
    Local,
    Tx,
    Redirect(u32),
    Drop(Stat),
    /// An answer built from the packet goes back out (its outcome was counted already).
    Reply,
    /// A called BPF function finished the packet: this XDP action, already counted.
    Action(u32),
}

// `frags`: frames bigger than a page (jumbo MTUs, GRO-merged segments in generic mode) come
// as a first buffer holding the headers and fragments holding the rest. Headers are parsed
// in the first buffer (`ptr_at` checks its bounds); a packet's length is checked against
// the whole frame (`within_frame`); payload is never touched, so it goes on as it came.
#[xdp(frags)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    settle(balance(&ctx), true)
}

/// Counts an outcome and turns it into an XDP action.
#[inline(always)]
fn finish(outcome: Outcome) -> u32 {
    settle(outcome, false)
}

/// Counts an outcome (and, `packet`, the packet itself: lb_xdp's last step) in one lookup
/// of the counters, and turns it into an XDP action.
#[inline(always)]
fn settle(outcome: Outcome, packet: bool) -> u32 {
    let (stat, action) = match outcome {
        Outcome::Pass => (Some(Stat::Passed), xdp_action::XDP_PASS),
        Outcome::Local => (Some(Stat::Forwarded), xdp_action::XDP_PASS),
        Outcome::Tx => (Some(Stat::Forwarded), xdp_action::XDP_TX),
        // SAFETY: plain helper call.
        Outcome::Redirect(ifindex) => (Some(Stat::Forwarded), unsafe {
            bpf_redirect(ifindex, 0) as u32
        }),
        Outcome::Drop(reason) => (Some(reason), xdp_action::XDP_DROP),
        Outcome::Reply => (None, xdp_action::XDP_TX),
        Outcome::Action(action) => (None, action),
    };
    // An outcome a called function counted already, in a call of that function: nothing.
    if packet || stat.is_some() {
        if let Some(b) = stat_block() {
            if packet {
                add(b, Stat::Packets, 1);
            }
            if let Some(s) = stat {
                add(b, s, 1);
            }
        }
    }
    action
}

// The three paths below are separate BPF functions, each with its own stack frame: inlined
// into one, their locals would not fit the 512-byte BPF stack. A BPF function cannot return
// a struct, so each finishes its outcome itself and returns the XDP action.

#[inline(never)]
fn to_service_xdp(ctx: &XdpContext, svc: &Service, ip: &Ip, l4: &L4) -> u32 {
    // A fragment after the first whose connection is gone, or never was: not a new
    // connection. Only a one-packet service's goes on, to its first fragment's server.
    let Some(settings) = SETTINGS.get(0) else {
        return finish(Outcome::Pass);
    };
    finish(to_service(ctx, settings, svc, ip, l4))
}

#[inline(never)]
fn nat_reply_xdp(ctx: &XdpContext, reply: &mut Connection, ip: &Ip, tcp_flags: u8) -> u32 {
    finish(nat_reply(ctx, reply, ip, tcp_flags))
}

/// An ICMP error for a VIP: [`FORWARD`] if `next` names the server to send it to.
#[inline(never)]
fn icmp_to_vip_xdp(ctx: &XdpContext, ip: &Ip, next: &mut Next) -> u32 {
    finish(icmp_to_vip(ctx, ip, next))
}

/// [`icmp_to_vip_xdp`] for ICMPv6.
#[inline(never)]
fn icmp6_to_vip_xdp(ctx: &XdpContext, ip: &Ip, next: &mut Next) -> u32 {
    finish(icmp6_to_vip(ctx, ip, next))
}

/// An ICMP(v6) error for a VIP, sent on by `to_server` (one of the two above), or to the
/// server it names through `forward_xdp`.
#[inline(always)]
fn icmp_error(
    ctx: &XdpContext,
    ip: &Ip,
    next: &mut Next,
    to_server: fn(&XdpContext, &Ip, &mut Next) -> u32,
) -> Outcome {
    count_vip(ip.bytes);
    let action = to_server(ctx, ip, next);
    if action != FORWARD {
        return Outcome::Action(action);
    }
    Outcome::Action(forward_xdp(ctx, ip, next))
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Outcome {
    let Some(settings) = SETTINGS.get(0) else {
        return Outcome::Pass;
    };
    // A backup ATM (or one not yet programmed) leaves everything to the stack.
    if settings.flags & SETTINGS_ACTIVE == 0 {
        return Outcome::Pass;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Outcome::Drop(Stat::DropMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let proto = unsafe { (*eth).proto };
    if proto == ETH_P_IPV6_BE {
        return balance6(ctx, settings);
    }
    if proto != ETH_P_IP_BE {
        if proto == ETH_P_ARP_BE {
            return arp(ctx, settings);
        }
        // The daemon keeps tags in the frame (vlan.rs), so tagged traffic is never taken for
        // untagged; counted, since the stack drops it unless a VLAN device takes it.
        if proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE {
            count(Stat::Tagged, 1);
        }
        return Outcome::Pass;
    }
    let Some(iph) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Outcome::Drop(Stat::DropMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let iph = unsafe { &*iph };
    if iph.vihl >> 4 != 4 || iph.vihl & 0x0f < 5 {
        return Outcome::Drop(Stat::DropMalformed);
    }
    let daddr = iph.daddr;
    let ihl = ((iph.vihl & 0x0f) as usize) * 4;
    // Most traffic that is not ours leaves here, after one array read: no VIP and no NAT
    // address falls in its slot.
    if VIP_FILTER
        .get(lb_common::vip_filter_slot(daddr))
        .is_none_or(|n| *n == 0)
    {
        return Outcome::Pass;
    }
    // The common case first: a TCP or UDP packet of a known connection (or a NAT reply) is
    // found by one lookup, its 5-tuple; only a packet with no connection asks `services`,
    // and only one with neither asks `vips`. The ports are read before the headers are
    // validated; a packet found this way is validated below like any other of ours.
    // NonNull, not raw pointers: an Option of one is a word, and lb_xdp's stack frame must
    // stay small (it and the BPF function it calls share 512 bytes).
    let now = clock::now(settings.tick_ns);
    let mut conn: Option<NonNull<Connection>> = None;
    let mut svc: Option<NonNull<Service>> = None;
    let mut cached: Option<NonNull<CachedFlow>> = None;
    let (mut slot, mut slot_holds) = (NO_SLOT, false);
    // A server's reply to the NAT address is never cached: no probe for it.
    let to_nat = is_nat_addr(settings, daddr);
    if iph.proto == IPPROTO_TCP || iph.proto == IPPROTO_UDP {
        // A fragment after the first has no ports: its first fragment's stand in (0 if
        // none was seen), and it goes that flow's way.
        let ports = if iph.frag_off & IP_OFFMASK_BE != 0 {
            Some(route_ports4(iph.saddr, daddr, iph.id, iph.proto, now))
        } else {
            // SAFETY: bounds checked by ptr_at; the two ports, as on the wire.
            ptr_at::<u32>(ctx, ETH_HLEN + ihl).map(|p| unsafe { *p })
        };
        if let Some(ports) = ports {
            let (sport, dport) = (ports as u16, (ports >> 16) as u16);
            // An established flow this CPU forwarded within the last second needs no
            // lookup: `steer` forwards it from the cache (or, for a SYN, FIN or RST, looks
            // it up after all).
            if !to_nat {
                slot = flow_index(flow_cache_slot(iph.saddr, daddr, sport, dport));
            }
            if let Some(f) = FLOW_CACHE.get_ptr_mut(slot).and_then(NonNull::new) {
                // SAFETY: a per-CPU slot.
                let r = unsafe { f.as_ref() };
                slot_holds = r.is(iph.saddr, daddr, sport, dport, iph.proto);
                if slot_holds && r.answers(now, settings.flow_gen) {
                    cached = Some(f);
                }
            }
            if cached.is_none() {
                let Some(key) = scratch_key::<0>(
                    Addr::v4_raw(iph.saddr),
                    Addr::v4_raw(daddr),
                    sport,
                    dport,
                    iph.proto,
                ) else {
                    return Outcome::Drop(Stat::DropError);
                };
                conn = CONNECTIONS.get_ptr_mut(&*key).and_then(NonNull::new);
                if conn.is_none() {
                    svc = find_service_v4(daddr, dport, iph.proto);
                }
            }
        }
    }
    // A connection's key names the VIP it was made for (or, a reply leg's, the NAT
    // address); whether its service is still there is checked before it is forwarded
    // (`established`).
    let to_vip = cached.is_some()
        || conn.is_some_and(|c| !is_reply(c))
        || svc.is_some()
        || VIPS.get_ptr(&Addr::v4_raw(daddr)).is_some();
    if !to_vip && !to_nat {
        return Outcome::Pass;
    }

    // A daemon that stopped renewing its lease is gone (crashed, killed): the program is
    // still attached and the VIP alias still up, so what reached the stack would be answered
    // with resets. Drop instead: clients retransmit to the ATM that takes over.
    if lease_over(settings, now) {
        return Outcome::Drop(Stat::DropOrphaned);
    }

    // From here the packet is ours: it must be well formed.
    let tot_len = u16::from_be(iph.tot_len);
    let len = ETH_HLEN + tot_len as usize;
    if (tot_len as usize) < ihl || !within_frame(ctx, len) {
        return Outcome::Drop(Stat::DropMalformed);
    }
    if !ipv4_header_ok(ctx, ihl) {
        return Outcome::Drop(Stat::DropMalformed);
    }
    // A cached direct flow's packet goes before the parsed packet is even written down
    // (not a fragment: a first one is written down for those after it, in `steer`).
    if let (Some(f), 0) = (cached, iph.frag_off & IP_FRAGMENT_BE) {
        let at = ETH_HLEN + ihl;
        if let Some(outcome) = cached_direct(ctx, f, iph.proto, at, tot_len, len as u32, now) {
            return outcome;
        }
    }
    let Some(parsed) = PARSED.get_ptr_mut(0) else {
        return Outcome::Drop(Stat::DropError);
    };
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU, so this packet is its only
    // user.
    let Parsed { ip, l4, next } = unsafe { &mut *parsed };
    *ip = Ip {
        saddr: Addr::v4_raw(iph.saddr),
        daddr: Addr::v4_raw(daddr),
        proto: iph.proto,
        v6: false,
        df: iph.frag_off & IP_DF_BE != 0,
        l4_at: (ETH_HLEN + ihl) as u16,
        tot_len,
        bytes: len as u32,
        now,
        slot,
        slot_holds,
        frag: frag_kind(iph.frag_off),
        frag_id: iph.id as u32,
    };
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => {}
        IPPROTO_ICMP if to_vip && ip.frag != FRAG_LATER => {
            return icmp_error(ctx, ip, next, icmp_to_vip_xdp);
        }
        // Another protocol's fragments follow their first to the stack.
        _ => return Outcome::Pass,
    }
    let ip: &Ip = ip;
    steer(ctx, settings, ip, l4, next, cached, conn, svc, to_nat)
}

/// An IPv6 packet on an active ATM. The same path as IPv4's, with the extension headers
/// walked to find the L4 header, and neighbour discovery always left to the stack.
#[inline(always)]
fn balance6(ctx: &XdpContext, settings: &Settings) -> Outcome {
    let Some(h) = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN) else {
        return Outcome::Drop(Stat::DropMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*h };
    if u32::from_be(h.vtcfl) >> 28 != 6 {
        return Outcome::Drop(Stat::DropMalformed);
    }
    // As for IPv4: what is not ours leaves after one array read, by the address's last byte.
    if VIP_FILTER
        .get(lb_common::vip_filter_slot(h.daddr[3]))
        .is_none_or(|n| *n == 0)
    {
        return Outcome::Pass;
    }
    // An IPv4-mapped destination is no IPv6 VIP's (the config refuses them), and it would
    // find IPv4's connections and services, which are keyed by exactly those addresses: a
    // forged IPv6 RST could close an IPv4 connection. Not ours.
    if h.daddr[0] == 0 && h.daddr[1] == 0 && h.daddr[2] == lb_common::V4_MAPPED {
        return Outcome::Pass;
    }
    let Some(parsed) = PARSED.get_ptr_mut(0) else {
        return Outcome::Drop(Stat::DropError);
    };
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU, so this packet is its only
    // user.
    let Parsed { ip, l4, next } = unsafe { &mut *parsed };
    copy_addr(&mut ip.saddr, &h.saddr);
    copy_addr(&mut ip.daddr, &h.daddr);
    ip.v6 = true;
    ip.df = true;
    let tot_len = u16::from_be(h.payload_len) as usize + IPV6_HLEN;
    let walked = walk_ipv6_xdp(ctx, h.nexthdr, tot_len as u32);
    if walked == WALK_MALFORMED {
        return vip_or_pass(ctx, settings, ip, Stat::DropMalformed);
    }
    let (proto, l4_at) = (walked as u8, (walked >> 8) as usize & L4_AT_MAX);
    // A fragment after the first has no L4 header: a TCP or UDP one takes its first
    // fragment's ports (below); any other follows its first to the stack.
    if ip.frag == FRAG_LATER && proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Outcome::Pass;
    }
    ip.proto = proto;
    if proto == IPPROTO_ICMPV6 {
        // Neighbour discovery is the stack's, whatever it is for: an ATM answers for the
        // VIPs it holds, and a backup's own addresses share their slots.
        // Type and code: a one-byte read at a variable offset gets checked as `>=` the
        // packet's end, which the verifier does not take as proof of the byte.
        let Some(t) = ptr_at_var::<[u8; 2]>(ctx, l4_at) else {
            return vip_or_pass(ctx, settings, ip, Stat::DropMalformed);
        };
        // SAFETY: bounds checked by ptr_at.
        let t = unsafe { (*t)[0] };
        if t == NDISC_NEIGHBOUR_SOLICITATION && settings.lease_ns != 0 {
            return neighbour_solicitation(ctx, settings, l4_at);
        }
        if (NDISC_ROUTER_SOLICITATION..=NDISC_REDIRECT).contains(&t) {
            return Outcome::Pass;
        }
    }
    let mut conn: Option<NonNull<Connection>> = None;
    let mut svc: Option<NonNull<Service>> = None;
    let mut cached: Option<NonNull<CachedFlow6>> = None;
    let (mut slot, mut slot_holds) = (NO_SLOT, false);
    let now = clock::now(settings.tick_ns);
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        let ports = if ip.frag == FRAG_LATER {
            Some(route_ports6(now))
        } else {
            // SAFETY: bounds checked by ptr_at; the two ports, as on the wire.
            ptr_at_var::<u32>(ctx, l4_at).map(|p| unsafe { *p })
        };
        if let Some(ports) = ports {
            let (sport, dport) = (ports as u16, (ports >> 16) as u16);
            let Some(key) = flow_key(ip, sport, dport, proto) else {
                return Outcome::Drop(Stat::DropError);
            };
            // As for IPv4: an established flow this CPU forwarded within the last second
            // needs no lookup. A server's reply to the NAT address is never cached.
            if !is_nat_addr6(settings, &ip.daddr) {
                slot = flow_index(flow_cache_slot6(key));
            }
            if let Some(f) = FLOW_CACHE6.get_ptr_mut(slot).and_then(NonNull::new) {
                // SAFETY: a per-CPU slot.
                let r = unsafe { f.as_ref() };
                slot_holds = r.key.same(key);
                if slot_holds && r.answers(now, settings.flow_gen) {
                    cached = Some(f);
                }
            }
            if cached.is_none() {
                conn = CONNECTIONS.get_ptr_mut(&*key).and_then(NonNull::new);
                if conn.is_none() {
                    svc = find_service(&ip.daddr, dport, proto);
                }
            }
        }
    }
    let to_vip = cached.is_some()
        || conn.is_some_and(|c| !is_reply(c))
        || svc.is_some()
        || VIPS.get_ptr(&ip.daddr).is_some();
    if !to_vip && !is_nat_addr6(settings, &ip.daddr) {
        return Outcome::Pass;
    }
    if lease_over(settings, now) {
        return Outcome::Drop(Stat::DropOrphaned);
    }
    // From here the packet is ours: it must be well formed. The walk kept the extension
    // headers within the payload length; the payload length must lie within the frame.
    let len = ETH_HLEN + tot_len;
    if !within_frame(ctx, len) {
        return Outcome::Drop(Stat::DropMalformed);
    }
    ip.bytes = len as u32;
    ip.slot = slot;
    ip.slot_holds = slot_holds;
    ip.l4_at = l4_at as u16;
    ip.tot_len = tot_len as u16;
    ip.now = now;
    let ip: &Ip = ip;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {}
        IPPROTO_ICMPV6 if to_vip => {
            return icmp_error(ctx, ip, next, icmp6_to_vip_xdp);
        }
        _ => return Outcome::Pass,
    }
    // Worked out again rather than kept: lb_xdp's frame has no room for one more value.
    let to_nat = is_nat_addr6(settings, &ip.daddr);
    steer(ctx, settings, ip, l4, next, cached, conn, svc, to_nat)
}

/// A neighbour solicitation on an ATM whose daemon renews a lease: IPv6's ARP request, and
/// fenced as [`arp`] fences: an orphan drops one for a VIP or the NAT66 address, which its
/// kernel would still answer. Everything else passes.
#[inline(always)]
fn neighbour_solicitation(ctx: &XdpContext, settings: &Settings, l4_at: usize) -> Outcome {
    if !lease_over(settings, clock::now(settings.tick_ns)) {
        return Outcome::Pass;
    }
    // Type, code, checksum, reserved, then the target address (RFC 4861, 4.3).
    let Some(ns) = ptr_at_var::<[u32; 6]>(ctx, l4_at) else {
        return Outcome::Pass;
    };
    // SAFETY: bounds checked by ptr_at; an Addr is four words, as the target is.
    let target = unsafe { &*((ns as *const u32).add(2) as *const Addr) };
    if is_nat_addr6(settings, target) || VIPS.get_ptr(target).is_some() {
        return Outcome::Drop(Stat::DropFenced);
    }
    Outcome::Pass
}

/// An IPv6 packet whose L4 header cannot be found: dropped as `reason` if it is for a VIP
/// or the NAT address (as an orphan, as `drop_orphaned`), passed if not.
#[inline(always)]
fn vip_or_pass(ctx: &XdpContext, settings: &Settings, ip: &Ip, reason: Stat) -> Outcome {
    if VIPS.get_ptr(&ip.daddr).is_none() && !is_nat_addr6(settings, &ip.daddr) {
        return Outcome::Pass;
    }
    if lease_over(settings, clock::now(settings.tick_ns)) {
        return Outcome::Drop(Stat::DropOrphaned);
    }
    count_vip(frame_len(ctx) as u32);
    Outcome::Drop(reason)
}

/// A TCP or UDP packet to a VIP or the NAT address, its headers in `ip`, with the
/// connection and service found for it: a cached flow forwarded, a NAT reply translated
/// back, an established connection forwarded, or a new one made.
#[inline(always)]
fn steer<S: Slot>(
    ctx: &XdpContext,
    settings: &Settings,
    ip: &Ip,
    l4_slot: &mut L4,
    next: &mut Next,
    cached: Option<NonNull<S>>,
    mut conn: Option<NonNull<Connection>>,
    mut svc: Option<NonNull<Service>>,
    to_nat: bool,
) -> Outcome {
    if ip.frag == FRAG_LATER {
        // Its first fragment's ports are in `l4_slot` already (`route_ports4`, `6`).
        if l4_slot.dport == 0 {
            count_vip(ip.bytes);
            return Outcome::Drop(Stat::DropFragment);
        }
    } else {
        let Some(l4) = parse_l4(ctx, ip) else {
            return Outcome::Drop(Stat::DropMalformed);
        };
        // A first fragment: those after it will look for the connection it finds or makes.
        if ip.frag == FRAG_FIRST {
            remember(ip, l4.sport, l4.dport);
        }
        *l4_slot = l4;
    }
    let l4: &L4 = l4_slot;
    if let Some(f) = cached {
        // A SYN (a reused tuple), FIN or RST changes the connection: the full path's. So
        // does a server that is no longer the flow's.
        if l4.flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
            if let Some(outcome) = cached_forward(ctx, f, ip, l4, next) {
                return outcome;
            }
        }
        // The lookup `balance` skipped.
        let Some(key) = flow_key(ip, l4.sport, l4.dport, ip.proto) else {
            return Outcome::Drop(Stat::DropError);
        };
        conn = CONNECTIONS.get_ptr_mut(&*key).and_then(NonNull::new);
        if conn.is_none() {
            svc = find_service(&ip.daddr, l4.dport, ip.proto);
        }
    }
    if let Some(mut c) = conn {
        // SAFETY: a map value; concurrent updates of counters may race, which only blurs them.
        let c = unsafe { c.as_mut() };
        if c.flags & CONN_REPLY != 0 {
            if !to_nat {
                // A reply leg's key names the NAT address; this is not (any more) ours.
                return Outcome::Pass;
            }
            count_vip(ip.bytes);
            return Outcome::Action(nat_reply_xdp(ctx, c, ip, l4.flags));
        }
        let action = established_xdp(ctx, c, ip, l4);
        if action != NOT_ESTABLISHED {
            return Outcome::Action(action);
        }
        // Idled out, reopened, or its server is gone: a new connection, if the service is
        // still there.
        svc = find_service(&ip.daddr, l4.dport, ip.proto);
    }
    // Another port of the VIP (ssh to the primary, say), or an unknown packet to the NAT
    // address: the stack's business. But just after a takeover, a packet to a NAT port is a
    // reply whose entry may still be on its way from the old primary, and the stack, which
    // holds the NAT address but no socket on the port, would reset the server's side:
    // dropped, it is retransmitted. (The daemon keeps the kernel's own ports apart.)
    // In a planned handover the other ATM may have made that connection moments ago: it
    // gets the packet.
    let Some(svc) = svc else {
        let port = u16::from_be(l4.dport);
        if to_nat && port >= settings.nat_port_min && port <= settings.nat_port_max {
            return no_connection(ctx, settings, ip.now);
        }
        return Outcome::Pass;
    };
    count_vip(ip.bytes);
    // SAFETY: a map value, read only.
    let svc = unsafe { svc.as_ref() };
    // A fragment after the first whose connection is gone, or never was: not a new
    // connection. Only a one-packet service's goes on, to its first fragment's server.
    let action = if ip.frag == FRAG_LATER {
        later_fragment_xdp(svc.id, svc.flags, ip.bytes)
    } else {
        to_service_xdp(ctx, svc, ip, l4)
    };
    if action != FORWARD {
        return Outcome::Action(action);
    }
    Outcome::Action(forward_xdp(ctx, ip, next))
}

/// Whether the daemon stopped renewing the settings' lease by `now`: it is gone (crashed,
/// killed) and this program is an orphan.
#[inline(always)]
fn lease_over(settings: &Settings, now: u64) -> bool {
    settings.lease_ns != 0 && now > settings.lease_ns
}

/// ARP on an active ATM. An orphan fences its VIPs and the NAT address at layer 2: its
/// kernel still holds their aliases and would answer requests for them, and a client that
/// takes its answer over that of the ATM which took over (it may well come first) sends its
/// traffic into the orphan's `drop_orphaned`. Everything else passes, and while the lease
/// holds an ARP frame costs one clock read more than any other non-IPv4 frame.
#[inline(always)]
fn arp(ctx: &XdpContext, settings: &Settings) -> Outcome {
    if settings.lease_ns == 0 {
        return Outcome::Pass;
    }
    if !lease_over(settings, clock::now(settings.tick_ns)) {
        return Outcome::Pass;
    }
    // Anything but a well-formed IPv4-over-Ethernet request is the stack's to judge: it
    // answers nothing else.
    let Some(arp) = ptr_at::<ArpHdr>(ctx, ETH_HLEN) else {
        return Outcome::Pass;
    };
    // SAFETY: bounds checked by ptr_at.
    let arp = unsafe { &*arp };
    if arp.oper != ARPOP_REQUEST_BE || arp.ptype != ETH_P_IP_BE || arp.hlen != 6 || arp.plen != 4 {
        return Outcome::Pass;
    }
    let target = u32::from_ne_bytes(arp.tpa);
    if is_nat_addr(settings, target) || VIPS.get_ptr(&Addr::v4_raw(target)).is_some() {
        return Outcome::Drop(Stat::DropFenced);
    }
    Outcome::Pass
}

#[xdp(frags)]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    decap_count(DecapStat::Packets);
    let out = decap(&ctx);
    decap_count(out);
    match out {
        DecapStat::Dropped => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
