//! lb's XDP programs.
//!
//! `lb_xdp`, the balancer: for packets to a configured VIP:port/protocol it finds the
//! connection or picks a server (persistence, then the service's scheduler row), and forwards
//! by the server's method: direct (MAC rewrite), tunnel (IPv4-in-IPv4) or nat (addresses and
//! ports rewritten, replies translated back). Everything else passes untouched; malformed
//! packets for a service are dropped; every packet lands in exactly one outcome counter.
//! When its daemon is gone (the settings' lease ran out) it drops service traffic and ARP
//! requests for the VIPs and the NAT address, which the stack would otherwise answer.
//!
//! `lb_decap`, for real servers in tunnel mode: strips the outer header of IPIP packets from
//! configured ATMs and passes the inner packet to the stack.
#![no_std]
#![no_main]
// A compare-and-swap on map memory (claiming a NAT port): the BPF target's atomics have no
// CAS in core's API, but the instruction exists (BPF_CMPXCHG, kernel 5.12).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod net;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_F_MMAPABLE, BPF_NOEXIST},
    cty::c_void,
    helpers::generated::{
        bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_loop, bpf_redirect, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail, bpf_xdp_get_buff_len,
    },
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
    EbpfContext,
};
use aya_log_ebpf::info;
use core::ptr::NonNull;
use lb_common::{
    csum, hash, nat, Addr, BareFwd, ConnEvent, Connection, Counters, DecapStat, FlowKey, Method,
    Persist, PersistKey, Sched, Server, Service, ServiceKey, Settings, Stat, CONN_EVENTS_BYTES,
    CONN_FIN, CONN_NAT, CONN_PEER_FIN, CONN_PEER_RST, CONN_REPLY, CONN_RST,
    CONN_SERVER_CLOSED_FIRST, DEFAULT_CONNECTIONS, DEFAULT_SERVERS, DEFAULT_SERVICES, EVENT_CLOSE,
    EVENT_OPEN, IPPROTO_ICMP, IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP, NAT_POOL_MAX, RING_SIZE,
    SERVER_UP, SETTINGS_ACTIVE, SETTINGS_SYNC, VIP_FILTER_SLOTS,
};

use net::*;

/// (VIP, port, protocol) -> service record.
#[map(name = "services")]
static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(DEFAULT_SERVICES, 0);

/// VIP -> number of services on it.
#[map(name = "vips")]
static VIPS: HashMap<Addr, u32> = HashMap::with_max_entries(DEFAULT_SERVICES, 0);

/// Counts of VIPs and NAT addresses by `vip_filter_slot`: a packet whose slot is zero is not
/// ours, known after one array read.
#[map(name = "vip_filter")]
static VIP_FILTER: Array<u32> = Array::with_max_entries(VIP_FILTER_SLOTS, 0);

/// Server index -> server record (one per service/server line).
#[map(name = "servers")]
static SERVERS: Array<Server> = Array::with_max_entries(DEFAULT_SERVERS, 0);

/// Scheduler rows, `RING_SIZE` slots per service: slot -> server index. Mappable, so the
/// daemon rewrites a row with one copy.
#[map(name = "sched_table")]
static SCHED_TABLE: Array<u32> =
    Array::with_max_entries(DEFAULT_SERVICES * RING_SIZE, BPF_F_MMAPABLE as u32);

/// Per-CPU round-robin cursor per service.
#[map(name = "rr_cursor")]
static RR_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(DEFAULT_SERVICES, 0);

/// 5-tuple -> connection (LRU: the oldest go first when it is full).
#[map(name = "connections")]
static CONNECTIONS: LruHashMap<FlowKey, Connection> =
    LruHashMap::with_max_entries(DEFAULT_CONNECTIONS, 0);

/// (client, service) -> server, for sticky services.
#[map(name = "persistence")]
static PERSISTENCE: LruHashMap<PersistKey, Persist> =
    LruHashMap::with_max_entries(DEFAULT_CONNECTIONS, 0);

/// Global per-CPU counters, indexed by `Stat`.
#[map(name = "stat")]
static STAT: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Per-CPU packets and bytes per service id.
#[map(name = "service_stats")]
static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(DEFAULT_SERVICES, 0);

/// Per-CPU packets and bytes per server index.
#[map(name = "server_stats")]
static SERVER_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(DEFAULT_SERVERS, 0);

/// The one settings record.
#[map(name = "settings")]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// New and closed connections, for the daemon to stream to backups.
#[map(name = "conn_events")]
static CONN_EVENTS: RingBuf = RingBuf::with_byte_size(CONN_EVENTS_BYTES, 0);

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

/// lb_decap: ATM addresses whose IPIP packets are decapsulated.
#[map(name = "decap_sources")]
static DECAP_SOURCES: HashMap<Addr, u32> = HashMap::with_max_entries(16, 0);

/// lb_decap: per-CPU counters indexed by `DecapStat`.
#[map(name = "decap_stat")]
static DECAP_STAT: PerCpuArray<u64> = PerCpuArray::with_max_entries(DecapStat::COUNT, 0);

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

/// Per-CPU room for the structures too big for the 512-byte BPF stack when every path is
/// inlined into one function: the FIB query and connection entries being built.
#[repr(C)]
struct Scratch {
    fib: FibParams,
    conn: Connection,
    reply: Connection,
}

#[map(name = "scratch")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Flow keys being built: the packet's own (0), a NAT reply leg's (1), and the client leg
/// of a NAT connection whose port is being reused (2). Apart from `SCRATCH` so that a key
/// and the scratch area can be borrowed at once.
#[map(name = "flow_keys")]
static KEYS: PerCpuArray<[FlowKey; 3]> = PerCpuArray::with_max_entries(1, 0);

/// The key of a `services` lookup being made, here rather than on the stack: `lb_xdp`'s
/// frame and that of the BPF function it calls must fit 512 bytes together.
#[map(name = "service_key")]
static SERVICE_KEY: PerCpuArray<ServiceKey> = PerCpuArray::with_max_entries(1, 0);

/// The service at `vip`:`port` (network byte order) for `proto`.
#[inline(always)]
fn find_service(vip: u32, port: u16, proto: u8) -> Option<NonNull<Service>> {
    let k = SERVICE_KEY.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU, and the key is only used
    // for the lookup below.
    let k = unsafe { &mut *k };
    k.vip = Addr::v4_raw(vip);
    k.port = port;
    k.proto = proto;
    k._pad = 0;
    SERVICES
        .get_ptr(k)
        .and_then(|p| NonNull::new(p as *mut Service))
}

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU, so nothing else uses it now.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Builds a flow key in slot `SLOT` of the scratch area (keys are 40 bytes, and the BPF
/// stack has no room for the several an inlined program would otherwise hold).
#[inline(always)]
fn scratch_key<const SLOT: usize>(
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
    proto: u8,
) -> Option<&'static mut FlowKey> {
    let keys = KEYS.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU. Each slot has one user at a
    // time on a packet's path.
    let k = unsafe { &mut (*keys)[SLOT] };
    k.src = src;
    k.dst = dst;
    k.sport = sport;
    k.dport = dport;
    k.proto = proto;
    // Byte by byte: `[0; 3]` would be a call to BPF's byte-looping memset on every packet.
    k._pad[0] = 0;
    k._pad[1] = 0;
    k._pad[2] = 0;
    Some(k)
}

/// The packet's own flow key, as on the wire (slot 0).
#[inline(always)]
fn packet_key(ip: &Ip, l4: &L4) -> Option<&'static mut FlowKey> {
    scratch_key::<0>(
        Addr::v4_raw(ip.saddr),
        Addr::v4_raw(ip.daddr),
        l4.sport,
        l4.dport,
        ip.proto,
    )
}

#[inline(always)]
fn count(s: Stat, n: u64) {
    if let Some(p) = STAT.get_ptr_mut(s as u32) {
        // SAFETY: a per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *p += n };
    }
}

/// Counts a packet (and its bytes) for a VIP or the NAT address.
#[inline(always)]
fn count_vip(ctx: &XdpContext) {
    count(Stat::VipPackets, 1);
    count(Stat::VipBytes, frame_len(ctx) as u64);
}

/// The whole frame's length, fragments included (`data_end - data` covers the first buffer
/// only).
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    // SAFETY: plain helper call on the program's own context.
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) as usize }
}

/// Whether `daddr` is one of the NAT source addresses (the gateway or the pool).
#[inline(always)]
fn is_nat_addr(settings: &Settings, daddr: u32) -> bool {
    if settings.nat_addr.as_v4_raw() == Some(daddr) {
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
fn is_reply(c: NonNull<Connection>) -> bool {
    // SAFETY: a map value, read only.
    unsafe { c.as_ref() }.flags & CONN_REPLY != 0
}

#[inline(always)]
fn count_traffic(map: &PerCpuArray<Counters>, index: u32, bytes: u64) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot.
        unsafe {
            (*p).packets += 1;
            (*p).bytes += bytes;
        }
    }
}

/// What happens to a packet; each maps to one XDP action and one outcome counter.
enum Outcome {
    Pass,
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
// in the first buffer (`ptr_at` checks its bounds); lengths are the whole frame's
// (`frame_len`); payload is never touched, so it goes on as it came.
#[xdp(frags)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    count(Stat::Packets, 1);
    finish(balance(&ctx))
}

/// Counts an outcome and turns it into an XDP action.
#[inline(always)]
fn finish(outcome: Outcome) -> u32 {
    match outcome {
        Outcome::Pass => {
            count(Stat::Passed, 1);
            xdp_action::XDP_PASS
        }
        Outcome::Tx => {
            count(Stat::Forwarded, 1);
            xdp_action::XDP_TX
        }
        Outcome::Redirect(ifindex) => {
            count(Stat::Forwarded, 1);
            // SAFETY: plain helper call.
            unsafe { bpf_redirect(ifindex, 0) as u32 }
        }
        Outcome::Drop(reason) => {
            count(reason, 1);
            xdp_action::XDP_DROP
        }
        Outcome::Reply => xdp_action::XDP_TX,
        Outcome::Action(action) => action,
    }
}

// The three paths below are separate BPF functions, each with its own stack frame: inlined
// into one, their locals would not fit the 512-byte BPF stack. A BPF function cannot return
// a struct, so each finishes its outcome itself and returns the XDP action.

#[inline(never)]
fn to_service_xdp(ctx: &XdpContext, svc: &Service, ip: &Ip, l4: &L4) -> u32 {
    let Some(settings) = SETTINGS.get(0) else {
        return finish(Outcome::Pass);
    };
    finish(to_service(ctx, settings, svc, ip, l4))
}

#[inline(never)]
fn nat_reply_xdp(ctx: &XdpContext, reply: &mut Connection, ip: &Ip, tcp_flags: u8) -> u32 {
    finish(nat_reply(ctx, reply, ip, tcp_flags))
}

#[inline(never)]
fn icmp_to_vip_xdp(ctx: &XdpContext, ip: &Ip) -> u32 {
    let Some(settings) = SETTINGS.get(0) else {
        return finish(Outcome::Pass);
    };
    finish(icmp_to_vip(ctx, settings, ip))
}

/// The parsed headers of an IPv4 packet, offsets from the start of the frame.
struct Ip {
    saddr: u32,
    daddr: u32,
    proto: u8,
    /// Offset of the L4 header (a u16, to keep lb_xdp's stack frame small: see `l4()`).
    l4_at: u16,
    /// IPv4 total length.
    tot_len: u16,
    /// Don't-fragment is set.
    df: bool,
    /// The monotonic clock at arrival, coarse (a few ms): read once per packet. A precise
    /// read costs as much as a map lookup, and every time the dataplane keeps (idle timeouts,
    /// the lease, the next-hop cache) is in seconds.
    now: u64,
}

impl Ip {
    /// Offset of the L4 header. It is at most 14 + 60; the mask says so to the verifier,
    /// which knows nothing of a u16 read back from the stack but that it is below 65,536,
    /// too much to let a packet pointer move by.
    #[inline(always)]
    fn l4(&self) -> usize {
        (self.l4_at & 0xff) as usize
    }
}

/// The headers of the packet being handled, in a per-CPU map rather than on lb_xdp's stack:
/// its frame and those of the BPF functions it calls must fit 512 bytes together.
struct Parsed {
    ip: Ip,
    l4: L4,
}

#[map(name = "parsed")]
static PARSED: PerCpuArray<Parsed> = PerCpuArray::with_max_entries(1, 0);

/// Ports and TCP flags of a TCP/UDP packet.
struct L4 {
    sport: u16,
    dport: u16,
    flags: u8,
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
    let mut conn: Option<NonNull<Connection>> = None;
    let mut svc: Option<NonNull<Service>> = None;
    if iph.proto == IPPROTO_TCP || iph.proto == IPPROTO_UDP {
        if let Some(ports) = ptr_at::<[u16; 2]>(ctx, ETH_HLEN + ihl) {
            // SAFETY: bounds checked by ptr_at.
            let (sport, dport) = unsafe { ((*ports)[0], (*ports)[1]) };
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
                svc = find_service(daddr, dport, iph.proto);
            }
        }
    }
    let to_nat = is_nat_addr(settings, daddr);
    // A connection's key names the VIP it was made for (or, a reply leg's, the NAT
    // address); whether its service is still there is checked before it is forwarded
    // (`established`).
    let to_vip = conn.is_some_and(|c| !is_reply(c))
        || svc.is_some()
        || VIPS.get_ptr(&Addr::v4_raw(daddr)).is_some();
    if !to_vip && !to_nat {
        return Outcome::Pass;
    }

    // A daemon that stopped renewing its lease is gone (crashed, killed): the program is
    // still attached and the VIP alias still up, so what reached the stack would be answered
    // with resets. Drop instead: clients retransmit to the ATM that takes over.
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if lease_over(settings, now) {
        return Outcome::Drop(Stat::DropOrphaned);
    }

    // From here the packet is ours: it must be well formed.
    let tot_len = u16::from_be(iph.tot_len);
    if (tot_len as usize) < ihl || ETH_HLEN + tot_len as usize > frame_len(ctx) {
        return Outcome::Drop(Stat::DropMalformed);
    }
    if !ipv4_header_ok(ctx, ihl) {
        return Outcome::Drop(Stat::DropMalformed);
    }
    if u16::from_be(iph.frag_off) & IP_OFFMASK != 0 {
        // No ports in a non-first fragment, so no way to find its connection (yet).
        return Outcome::Drop(Stat::DropFragment);
    }
    let Some(parsed) = PARSED.get_ptr_mut(0) else {
        return Outcome::Drop(Stat::DropError);
    };
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU, so this packet is its only
    // user.
    let Parsed { ip, l4: l4_slot } = unsafe { &mut *parsed };
    *ip = Ip {
        saddr: iph.saddr,
        daddr,
        proto: iph.proto,
        l4_at: (ETH_HLEN + ihl) as u16,
        tot_len,
        df: iph.frag_off & IP_DF_BE != 0,
        now,
    };
    let ip: &Ip = ip;
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => {}
        IPPROTO_ICMP if to_vip => {
            count_vip(ctx);
            return Outcome::Action(icmp_to_vip_xdp(ctx, ip));
        }
        _ => return Outcome::Pass,
    }
    let Some(l4) = parse_l4(ctx, ip) else {
        return Outcome::Drop(Stat::DropMalformed);
    };
    *l4_slot = l4;
    let l4: &L4 = l4_slot;
    if let Some(mut c) = conn {
        // SAFETY: a map value; concurrent updates of counters may race, which only blurs them.
        let c = unsafe { c.as_mut() };
        if c.flags & CONN_REPLY != 0 {
            if !to_nat {
                // A reply leg's key names the NAT address; this is not (any more) ours.
                return Outcome::Pass;
            }
            count_vip(ctx);
            return Outcome::Action(nat_reply_xdp(ctx, c, ip, l4.flags));
        }
        let action = established_xdp(ctx, c, ip, l4);
        if action != NOT_ESTABLISHED {
            return Outcome::Action(action);
        }
        // Idled out, reopened, or its server is gone: a new connection, if the service is
        // still there.
        svc = find_service(daddr, l4.dport, ip.proto);
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
            let action = to_peer_xdp(ctx, now);
            if action != NOT_TO_PEER {
                return Outcome::Action(action);
            }
            if now < settings.settle_until_ns {
                return Outcome::Drop(Stat::DropNoConnection);
            }
        }
        return Outcome::Pass;
    };
    count_vip(ctx);
    // SAFETY: a map value, read only.
    let svc = unsafe { svc.as_ref() };
    Outcome::Action(to_service_xdp(ctx, svc, ip, l4))
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
/// holds an ARP frame costs one coarse clock read more than any other non-IPv4 frame.
#[inline(always)]
fn arp(ctx: &XdpContext, settings: &Settings) -> Outcome {
    if settings.lease_ns == 0 {
        return Outcome::Pass;
    }
    // SAFETY: plain helper call.
    if !lease_over(settings, unsafe { bpf_ktime_get_coarse_ns() }) {
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

#[inline(always)]
fn ipv4_header_ok(ctx: &XdpContext, ihl: usize) -> bool {
    // The usual header, without options, in one read.
    if ihl == IPV4_HLEN {
        let Some(w) = ptr_at::<[u16; 10]>(ctx, ETH_HLEN) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        let w = unsafe { &*w };
        return csum::ipv4_header(w) == 0;
    }
    let mut sum = 0u32;
    // At most 60 bytes: 30 words.
    for i in 0..30usize {
        if i * 2 >= ihl {
            break;
        }
        let Some(w) = ptr_at::<u16>(ctx, ETH_HLEN + i * 2) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        sum += unsafe { *w } as u32;
    }
    csum::fold(sum) == 0xffff
}

#[inline(always)]
fn parse_l4(ctx: &XdpContext, ip: &Ip) -> Option<L4> {
    if ip.proto == IPPROTO_TCP {
        let tcp = ptr_at::<TcpHdr>(ctx, ip.l4())?;
        // SAFETY: bounds checked by ptr_at.
        let tcp = unsafe { &*tcp };
        let doff = ((tcp.doff_res >> 4) as usize) * 4;
        if doff < 20 || ip.l4() - ETH_HLEN + doff > ip.tot_len as usize {
            return None;
        }
        Some(L4 {
            sport: tcp.source,
            dport: tcp.dest,
            flags: tcp.flags,
        })
    } else {
        let udp = ptr_at::<UdpHdr>(ctx, ip.l4())?;
        // SAFETY: bounds checked by ptr_at.
        let udp = unsafe { &*udp };
        let len = u16::from_be(udp.len) as usize;
        if len < 8 || ip.l4() - ETH_HLEN + len > ip.tot_len as usize {
            return None;
        }
        Some(L4 {
            sport: udp.source,
            dport: udp.dest,
            flags: 0,
        })
    }
}

/// A packet for a service with no live connection (a new one, or one that idled out, was
/// reopened, or whose server went down): pick a server, record the connection, forward.
#[inline(always)]
fn to_service(ctx: &XdpContext, settings: &Settings, svc: &Service, ip: &Ip, l4: &L4) -> Outcome {
    let bytes = frame_len(ctx) as u64;
    let Some(key) = packet_key(ip, l4) else {
        return Outcome::Drop(Stat::DropError);
    };
    let key: &FlowKey = key;
    let now = ip.now;
    let fin_rst = tcp_end_flags(l4.flags);
    let mut nat_addr = 0u32;
    let mut nat_port = 0u16;
    let Some(id) = pick_server(svc, &key, now) else {
        return Outcome::Drop(Stat::DropNoServer);
    };
    let Some(server) = SERVERS.get(id) else {
        return Outcome::Drop(Stat::DropNoServer);
    };
    if server.flags & SERVER_UP == 0 {
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
        let action = to_peer_xdp(ctx, now);
        if action != NOT_TO_PEER {
            return Outcome::Action(action);
        }
        if now < settings.settle_until_ns {
            return Outcome::Drop(Stat::DropNoConnection);
        }
        return Outcome::Pass;
    }
    let Some(sc) = scratch() else {
        return Outcome::Drop(Stat::DropError);
    };
    if server.method == Method::Nat as u8 {
        let Some((addr, port)) = nat_reserve(ctx, settings, &key, id, now, &mut sc.reply) else {
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
    conn.nat_port = nat_port;
    // Volatile zeroing and a non-overlapping copy: plain stores would be merged into
    // calls to BPF's byte-looping memset and memmove on every new connection.
    zero_words(&mut conn.nat_addr);
    zero_bytes(&mut conn.peer_mac);
    zero_bytes(&mut conn.local_mac);
    zero_words(&mut conn.ifindex);
    if server.method == Method::Nat as u8 {
        conn.flags |= CONN_NAT;
        conn.nat_addr.w[2] = lb_common::V4_MAPPED;
        conn.nat_addr.w[3] = nat_addr;
    }
    if CONNECTIONS.insert(key, &*conn, 0).is_err() {
        return Outcome::Drop(Stat::DropError);
    }
    let peer_mac = if conn.flags & CONN_NAT != 0 {
        sc.reply.peer_mac
    } else {
        [0; 6]
    };
    report(settings, EVENT_OPEN, &key, conn, peer_mac);
    count(Stat::NewConns, 1);
    if settings.debug != 0 {
        log_new(ctx, ip, l4, server);
    }
    count_traffic(&SERVICE_STATS, svc.id, bytes);
    count_traffic(&SERVER_STATS, id, bytes);
    forward(ctx, settings, id, ip, nat_addr, nat_port)
}

/// During a planned handover (`Settings::peer_addr`), sends a packet of no known connection
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
    if settings.peer_addr == 0 || now >= settings.peer_until_ns {
        return NOT_TO_PEER;
    }
    let src = settings.local_addr.as_v4_raw().unwrap_or(0);
    let p = &mut sc.fib;
    if fib_query(ctx, p, settings.peer_addr, src, 0) != FIB_SUCCESS {
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
        (*eth).dst = p.dmac;
        (*eth).src = p.smac;
    }
    count(Stat::ToPeer, 1);
    finish(if p.ifindex == ctx.ingress_ifindex() as u32 {
        Outcome::Tx
    } else {
        Outcome::Redirect(p.ifindex)
    })
}

/// What [`to_peer_xdp`] returns for a packet that does not go to the other ATM.
const NOT_TO_PEER: u32 = u32::MAX;

/// What [`established_xdp`] returns for a packet that is not of a live connection.
const NOT_ESTABLISHED: u32 = u32::MAX;

/// A packet of known connection `c` (not a NAT reply leg): forwarded to its server if the
/// connection is live; else [`NOT_ESTABLISHED`], and the caller treats it as new.
#[inline(never)]
fn established_xdp(ctx: &XdpContext, c: &mut Connection, ip: &Ip, l4: &L4) -> u32 {
    let Some(settings) = SETTINGS.get(0) else {
        return finish(Outcome::Pass);
    };
    match established(ctx, settings, c, ip, l4) {
        Some(outcome) => finish(outcome),
        None => NOT_ESTABLISHED,
    }
}

#[inline(always)]
fn established(
    ctx: &XdpContext,
    settings: &Settings,
    c: &mut Connection,
    ip: &Ip,
    l4: &L4,
) -> Option<Outcome> {
    let now = ip.now;
    let syn_only = l4.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if now.wrapping_sub(c.last_seen_ns) > settings.timeout_ns
        || (syn_only && c.flags & (CONN_FIN | CONN_RST) != 0)
    {
        return None;
    }
    // Its server must be up and still serve the VIP, port and protocol the connection was
    // made for: a server taken out, a service removed (its servers are marked down) or a
    // server index given to another service loses the connection, as `services` would.
    let server = SERVERS.get(c.server)?;
    if server.flags & SERVER_UP == 0
        || server.vip != Addr::v4_raw(ip.daddr)
        || server.vport != l4.dport
        || server.proto != ip.proto
    {
        return None;
    }
    count_vip(ctx);
    let bytes = frame_len(ctx) as u64;
    c.last_seen_ns = now;
    c.packets += 1;
    c.bytes += bytes;
    let fin_rst = tcp_end_flags(l4.flags);
    if fin_rst != 0 && c.flags & (CONN_FIN | CONN_RST) == 0 {
        c.flags |= fin_rst;
        let key = packet_key(ip, l4)?;
        report(settings, EVENT_CLOSE, key, c, [0; 6]);
    }
    if fin_rst != 0 && c.flags & CONN_NAT != 0 {
        mark_reply_leg(c, server, fin_rst, ip.proto);
    }
    c.flags |= fin_rst;
    let (id, service) = (c.server, server.service);
    count_traffic(&SERVICE_STATS, service, bytes);
    count_traffic(&SERVER_STATS, id, bytes);
    Some(forward(ctx, settings, id, ip, c.nat_addr.w[3], c.nat_port))
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
fn tcp_end_flags(flags: u8) -> u16 {
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
fn server_ok(id: u32, service: u32) -> bool {
    matches!(SERVERS.get(id), Some(s) if s.flags & SERVER_UP != 0 && s.service == service)
}

/// The server for a new connection: the client's persistence entry if the service is sticky
/// and it is still valid, else the scheduler's choice.
#[inline(always)]
fn pick_server(svc: &Service, key: &FlowKey, now: u64) -> Option<u32> {
    if svc.persistence_s == 0 {
        return schedule(svc, key);
    }
    let pkey = PersistKey {
        client: key.src,
        service: svc.id,
    };
    let ttl = svc.persistence_s as u64 * 1_000_000_000;
    if let Some(p) = PERSISTENCE.get_ptr_mut(&pkey) {
        // SAFETY: a map value.
        let p = unsafe { &mut *p };
        if now.wrapping_sub(p.last_seen_ns) <= ttl && server_ok(p.server, svc.id) {
            p.last_seen_ns = now;
            return Some(p.server);
        }
    }
    let id = schedule(svc, key)?;
    let entry = Persist {
        last_seen_ns: now,
        server: id,
        _pad: 0,
    };
    // Failing to record stickiness costs stickiness, not the connection.
    let _ = PERSISTENCE.insert(&pkey, &entry, 0);
    Some(id)
}

/// Indexes the service's scheduler row.
#[inline(always)]
fn schedule(svc: &Service, key: &FlowKey) -> Option<u32> {
    let len = svc.table_len;
    if len == 0 || len > RING_SIZE {
        return None;
    }
    let slot = match Sched::from_u8(svc.sched) {
        Some(Sched::Maglev) => hash::flow(key) % len,
        Some(Sched::Sh) => hash::addr(&key.src) % len,
        Some(Sched::Rr) | Some(Sched::Wrr) => {
            let cursor = RR_CURSOR.get_ptr_mut(svc.id)?;
            // SAFETY: a per-CPU slot.
            unsafe {
                let at = *cursor % len;
                *cursor = (at + 1) % len;
                at
            }
        }
        None => return None,
    };
    SCHED_TABLE.get(svc.id * RING_SIZE + slot).copied()
}

/// Reserves a NAT source (address, port) toward `server` for the connection `key`: takes
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
) -> Option<(u32, u16)> {
    let lo = settings.nat_port_min as u32;
    let hi = settings.nat_port_max as u32;
    if settings.nat_addr.as_v4_raw().is_none() || hi < lo {
        return None;
    }
    if let Some(until) = NAT_FULL.get(id) {
        if now < *until {
            return None;
        }
    }
    let span = hi - lo + 1;
    let addrs = if settings.nat_pool_len == 0 {
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
    let mut probe = NatProbe {
        start,
        span,
        addrs,
        lo,
        found: 0,
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
    start: u32,
    span: u32,
    addrs: u32,
    lo: u32,
    /// 1 + the index of the free pair found; 0 while none is.
    found: u32,
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
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU.
    let key = unsafe { &mut (*keys)[1] };
    key.dst = Addr::v4_raw(nat_pool_addr(settings, slot));
    key.dport = ((p.lo + off) as u16).to_be();
    let now = sc.reply.last_seen_ns;
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
        timeout_ns: settings.timeout_ns,
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
        let r = &sc.reply;
        (*e).packets = 0;
        (*e).bytes = 0;
        (*e).server = r.server;
        (*e).flags = r.flags;
        (*e).nat_port = r.nat_port;
        core::ptr::copy_nonoverlapping(&r.nat_addr, core::ptr::addr_of_mut!((*e).nat_addr), 1);
        (*e).peer_mac = r.peer_mac;
        (*e).local_mac = r.local_mac;
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
    client.src = reply.nat_addr;
    client.dst = server.vip;
    client.sport = reply.nat_port;
    client.dport = server.vport;
    client.proto = key.proto;
    client._pad[0] = 0;
    client._pad[1] = 0;
    client._pad[2] = 0;
    if let Some(c) = CONNECTIONS.get_ptr(&*client) {
        // SAFETY: a map value, read only.
        let c = unsafe { &*c };
        if c.nat_port == key.dport && c.nat_addr.w[3] == key.dst.w[3] {
            let _ = CONNECTIONS.remove(&*client);
        }
    }
}

/// Sends the packet to server `id` by its method.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    settings: &Settings,
    id: u32,
    ip: &Ip,
    nat_addr: u32,
    nat_port: u16,
) -> Outcome {
    let Some(server) = SERVERS.get(id) else {
        return Outcome::Drop(Stat::DropNoServer);
    };
    let (method, server_port) = (server.method, server.port);
    let Some(server_addr) = server.addr.as_v4_raw() else {
        return Outcome::Drop(Stat::DropNoRoute);
    };
    match Method::from_u8(method) {
        Some(Method::Direct) => match server_hop(ctx, id, ip.saddr, ip.tot_len, ip.now) {
            Ok(hop) => send(ctx, &hop),
            Err(e) => too_big_or(ctx, ip, e, 0),
        },
        Some(Method::Tunnel) => {
            let Some(local) = settings.local_addr.as_v4_raw() else {
                return Outcome::Drop(Stat::DropNoRoute);
            };
            let outer_len = ip.tot_len as u32 + IPV4_HLEN as u32;
            if outer_len > 0xffff {
                return Outcome::Drop(Stat::DropTooBig);
            }
            let hop = match server_hop(ctx, id, local, outer_len as u16, ip.now) {
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
            let hop = match server_hop(ctx, id, nat_addr, ip.tot_len, ip.now) {
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

/// The next hop toward server `id`. Its record caches the FIB's answer for [`HOP_TTL_NS`]:
/// the established path then costs no lookup beyond the server record it reads anyway.
#[inline(always)]
fn server_hop(ctx: &XdpContext, id: u32, src: u32, tot_len: u16, now: u64) -> Result<Hop, NoHop> {
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
    let Some(dst) = s.addr.as_v4_raw() else {
        return Err(NoHop::Route);
    };
    match fib(ctx, dst, src, 0) {
        (FIB_SUCCESS, Some(hop), _) => {
            let mtu = path_mtu(ctx, dst, src);
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
        // The neighbour entry is gone: the last known MAC is the best there is.
        (FIB_NO_NEIGH, _, _) if s.ifindex != 0 && s.mac != [0; 6] => Ok(Hop::of_server(s)),
        _ => Err(NoHop::Route),
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

/// See [`too_big_or`].
#[inline(always)]
fn too_big(ctx: &XdpContext, ip: &Ip, mtu: u16, overhead: u16) -> Outcome {
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
        saddr: ip.daddr,
        daddr: ip.saddr,
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

/// A server's reply on a NAT connection: back to VIP -> client.
#[inline(always)]
fn nat_reply(ctx: &XdpContext, reply: &mut Connection, ip: &Ip, tcp_flags: u8) -> Outcome {
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
    let (Some(vip), Some(client)) = (server.vip.as_v4_raw(), reply.nat_addr.as_v4_raw()) else {
        return Outcome::Drop(Stat::DropError);
    };
    count_traffic(&SERVICE_STATS, server.service, bytes);
    count_traffic(&SERVER_STATS, reply.server, bytes);
    if rewrite(ctx, ip, vip, client, server.vport, reply.nat_port).is_none() {
        return Outcome::Drop(Stat::DropError);
    }
    let fallback = Hop {
        ifindex: reply.ifindex,
        smac: reply.local_mac,
        dmac: reply.peer_mac,
    };
    let hop = match next_hop(ctx, client, vip, ip.tot_len, fallback, ip.now) {
        Ok(h) => h,
        Err(e) => return e.outcome(),
    };
    send(ctx, &hop)
}

/// Why there is no next hop.
enum NoHop {
    /// No route, or no neighbour and no fallback MAC.
    Route,
    /// The packet exceeds the path MTU (given).
    TooBig(u16),
}

impl NoHop {
    fn outcome(self) -> Outcome {
        match self {
            NoHop::Route => Outcome::Drop(Stat::DropNoRoute),
            NoHop::TooBig(_) => Outcome::Drop(Stat::DropTooBig),
        }
    }
}

/// Where a frame goes next: interface and MACs.
#[derive(Clone, Copy)]
struct Hop {
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

impl Hop {
    /// The daemon's resolution for a server, used when the FIB has no neighbour entry.
    fn of_server(s: &Server) -> Hop {
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
        // SAFETY: a map value of this CPU, read only.
        let c = unsafe { &*c };
        if now < c.expires_ns {
            if tot_len > c.mtu {
                return Err(NoHop::TooBig(c.mtu));
            }
            return Ok(Hop {
                ifindex: c.ifindex,
                smac: c.smac,
                dmac: c.dmac,
            });
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
    let entry = HopCache {
        expires_ns: now + HOP_TTL_NS,
        ifindex: hop.ifindex,
        mtu,
        _pad: 0,
        smac: hop.smac,
        dmac: hop.dmac,
        _pad2: [0; 4],
    };
    // A failed insert costs the next packet a lookup, nothing else.
    let _ = NEXT_HOPS.insert(&dst, &entry, 0);
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
fn fib_query(ctx: &XdpContext, p: &mut FibParams, dst: u32, src: u32, tot_len: u16) -> i64 {
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

#[inline(always)]
fn set_macs(ctx: &XdpContext, hop: &Hop) {
    if let Some(eth) = ptr_at_mut::<EthHdr>(ctx, 0) {
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe {
            (*eth).dst = hop.dmac;
            (*eth).src = hop.smac;
        }
    }
}

/// Puts the hop's MACs on the frame and sends it out of the hop's interface.
#[inline(always)]
fn send(ctx: &XdpContext, hop: &Hop) -> Outcome {
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
fn rewrite(
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

#[inline(always)]
fn ipv4_checksum(h: &Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 bytes of plain integers.
    let words: &[u16; 10] = unsafe { &*(h as *const Ipv4Hdr as *const [u16; 10]) };
    csum::ipv4_header(words)
}

/// ICMP to a VIP: echo goes to the stack (the primary answers); an error about one of our
/// connections (fragmentation needed, say) goes to that connection's server, found by the
/// header it quotes; anything else passes.
#[inline(always)]
fn icmp_to_vip(ctx: &XdpContext, settings: &Settings, ip: &Ip) -> Outcome {
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
        let Some(server_addr) = server.addr.as_v4_raw() else {
            return Outcome::Drop(Stat::DropNoRoute);
        };
        if nat_icmp(ctx, ip, inner_at, server, conn).is_none() {
            return Outcome::Drop(Stat::DropError);
        }
        let hop = match server_hop(ctx, conn.server, ip.saddr, ip.tot_len, ip.now) {
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
    let srv = server.addr.w[3].to_ne_bytes();
    info!(
        ctx,
        "new {} {:i}:{} -> {:i}:{} via {:i}:{} {}",
        proto,
        ip.saddr.to_ne_bytes(),
        u16::from_be(l4.sport),
        ip.daddr.to_ne_bytes(),
        u16::from_be(l4.dport),
        srv,
        u16::from_be(server.port),
        method
    );
}

#[inline(always)]
fn decap_count(s: DecapStat) {
    if let Some(p) = DECAP_STAT.get_ptr_mut(s as u32) {
        // SAFETY: a per-CPU slot.
        unsafe { *p += 1 };
    }
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

/// Strips the outer IPv4 header of an IPIP packet from a configured ATM.
#[inline(always)]
fn decap(ctx: &XdpContext) -> DecapStat {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return DecapStat::Passed;
    };
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { *eth };
    if eth.proto != ETH_P_IP_BE {
        return DecapStat::Passed;
    }
    let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return DecapStat::Passed;
    };
    // SAFETY: bounds checked by ptr_at.
    let outer = unsafe { &*outer };
    if outer.proto != IPPROTO_IPIP || outer.vihl >> 4 != 4 {
        return DecapStat::Passed;
    }
    if DECAP_SOURCES.get_ptr(&Addr::v4_raw(outer.saddr)).is_none() {
        return DecapStat::Passed;
    }
    // From a configured ATM: it must be a clean IPIP packet as lb_xdp makes them (no outer
    // options, not fragmented), else it is dropped.
    if outer.vihl != 0x45 || u16::from_be(outer.frag_off) & (IP_OFFMASK | IP_MF) != 0 {
        return DecapStat::Dropped;
    }
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN + IPV4_HLEN) else {
        return DecapStat::Dropped;
    };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*inner).vihl } >> 4 != 4 {
        return DecapStat::Dropped;
    }
    // Move the Ethernet header up to sit just before the inner header, then drop the front.
    let Some(new_eth) = ptr_at_mut::<EthHdr>(ctx, IPV4_HLEN) else {
        return DecapStat::Dropped;
    };
    // SAFETY: bounds checked; [20, 34) and [0, 14) do not overlap.
    unsafe { *new_eth = eth };
    // SAFETY: shrinks the front; no pointer is used afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV4_HLEN as i32) } != 0 {
        return DecapStat::Dropped;
    }
    DecapStat::Decapsulated
}

// Benchmark instruments. Not part of the balancer: `cargo xtask bench` measures lb_xdp
// against `bare_fwd`, drives traffic with `gen_tx` and counts it with `sink_count`.

/// Where `bare_fwd` sends frames.
#[map(name = "bare_fwd_cfg")]
static BARE_FWD_CFG: Array<BareFwd> = Array::with_max_entries(1, 0);

/// Per-CPU count of frames `sink_count` saw.
#[map(name = "sink_count_stat")]
static SINK_COUNT_STAT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `gen_tx`'s per-CPU frame counter.
#[map(name = "gen_cursor")]
static GEN_CURSOR: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Ethernet, IPv4 and UDP headers of a generated frame.
#[derive(Clone, Copy)]
#[repr(C)]
struct GenHeaders([u8; 42]);

#[map(name = "gen_template")]
static GEN_TEMPLATE: Array<GenHeaders> = Array::with_max_entries(1, 0);

/// The least a forwarder does: bounds-checked Ethernet and IPv4 headers, MACs rewritten,
/// out by XDP_TX or XDP_REDIRECT. The reference lb_xdp's cost is compared with.
#[xdp]
pub fn bare_fwd(ctx: XdpContext) -> u32 {
    let Some(eth) = ptr_at_mut::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at_mut.
    if unsafe { (*eth).proto } != ETH_P_IP_BE {
        return xdp_action::XDP_PASS;
    }
    if ptr_at::<Ipv4Hdr>(&ctx, ETH_HLEN).is_none() {
        return xdp_action::XDP_DROP;
    }
    let Some(cfg) = BARE_FWD_CFG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        copy_mac(&mut (*eth).dst, &cfg.dmac);
        copy_mac(&mut (*eth).src, &cfg.smac);
    }
    if cfg.ifindex == 0 || cfg.ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(cfg.ifindex, 0) as u32 }
    }
}

/// A traffic generator for BPF_PROG_TEST_RUN with live frames: sends each frame back out of
/// the interface it runs on, its UDP source port stepped through 1024 values (so a balancer
/// sees that many flows; the UDP checksum must be 0, as a port change would void it).
///
/// A live frame's page is recycled once the frame is gone, with whatever the programs it
/// met wrote into it (a balancer's NAT or IPIP rewrite), so the headers are written afresh
/// from `gen_template` on every run.
#[xdp]
pub fn gen_tx(ctx: XdpContext) -> u32 {
    let (Some(cursor), Some(template), Some(hdr)) = (
        GEN_CURSOR.get_ptr_mut(0),
        GEN_TEMPLATE.get(0),
        ptr_at_mut::<GenHeaders>(&ctx, 0),
    ) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: a per-CPU slot; bounds checked by ptr_at_mut.
    unsafe {
        *cursor += 1;
        let hdr = &mut *hdr;
        // Not `*hdr = *template`: packet and map memory may overlap for all LLVM knows, and
        // it would call BPF's byte-looping memmove. They do not; this copy is unrolled.
        core::ptr::copy_nonoverlapping(template, hdr, 1);
        hdr.0[34..36].copy_from_slice(&(10_000 + (*cursor % 1024) as u16).to_be_bytes());
    }
    xdp_action::XDP_TX
}

/// Does nothing: its one-shot test runs measure the kernel's own per-run overhead, which
/// the benchmarks subtract from every path's one-shot timing.
#[xdp]
pub fn bench_nop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// A sink: counts every frame and drops it.
#[xdp]
pub fn sink_count(_ctx: XdpContext) -> u32 {
    if let Some(p) = SINK_COUNT_STAT.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot.
        unsafe { *p += 1 };
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
