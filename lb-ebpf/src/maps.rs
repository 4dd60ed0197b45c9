//! The maps lb_xdp shares with the daemon (services, servers, connections, counters,
//! settings) and the per-CPU scratch space that keeps large structures off the 512-byte
//! BPF stack, with the small accessors every path uses.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_F_MMAPABLE},
    helpers::generated::bpf_get_smp_processor_id,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use core::ptr::NonNull;
use lb_common::{
    frag::FRAG_ROUTES, Addr, CachedFlow, CachedFlow6, Connection, Counters, FlowKey, FragKey,
    FragRoute, Persist, PersistKey, Server, ServerLoad, Service, ServiceKey, Settings, Stat,
    StatBlock, CONN_EVENTS_BYTES, DEFAULT_CONNECTIONS, DEFAULT_SERVERS, DEFAULT_SERVICES,
    FLOW_CACHE_SLOTS, RING_PAGE, STAT_SLOTS, VIP_FILTER_SLOTS,
};

use crate::{net::*, parse::*};

/// (VIP, port, protocol) -> service record.
#[map(name = "services")]
static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(DEFAULT_SERVICES, 0);

/// VIP -> number of services on it.
#[map(name = "vips")]
pub static VIPS: HashMap<Addr, u32> = HashMap::with_max_entries(DEFAULT_SERVICES, 0);

/// Counts of VIPs and NAT addresses by `vip_filter_slot`: a packet whose slot is zero is not
/// ours, known after one array read.
#[map(name = "vip_filter")]
pub static VIP_FILTER: Array<u32> = Array::with_max_entries(VIP_FILTER_SLOTS, 0);

/// Server index -> server record (one per service/server line).
#[map(name = "servers")]
pub static SERVERS: Array<Server> = Array::with_max_entries(DEFAULT_SERVERS, 0);

/// Server index -> connections opened and closed (atomic adds: every CPU shares it).
#[map(name = "server_load")]
pub static SERVER_LOAD: Array<ServerLoad> = Array::with_max_entries(DEFAULT_SERVERS, 0);

/// Server index -> connections gone without FIN or RST, written by the daemon alone.
#[map(name = "server_gone")]
pub static SERVER_GONE: Array<u64> = Array::with_max_entries(DEFAULT_SERVERS, 0);

/// A server's active connections, for the least-connection schedulers.
#[inline(always)]
pub fn active_of(index: u32) -> u64 {
    let gone = SERVER_GONE.get(index).copied().unwrap_or(0);
    match SERVER_LOAD.get_ptr(index) {
        // SAFETY: a map value; a torn read of one counter costs one connection's worth of
        // accuracy for one decision.
        Some(l) => unsafe { core::ptr::read_volatile(l) }.active(gone),
        None => 0,
    }
}

/// Counts a connection opened (`closed` false) or closed by FIN or RST on server `index`.
#[inline(always)]
pub fn count_load(index: u32, closed: bool) {
    if let Some(l) = SERVER_LOAD.get_ptr_mut(index) {
        // SAFETY: an aligned u64 in map memory, added to atomically.
        unsafe {
            let field = if closed {
                core::ptr::addr_of_mut!((*l).closes)
            } else {
                core::ptr::addr_of_mut!((*l).opens)
            };
            use core::intrinsics::AtomicOrdering::Relaxed;
            core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(field, 1);
        }
    }
}

/// The scheduler rows' pool: pages of `RING_PAGE` server indices, named by each service's
/// record (`Service::pages`). Mappable, so the daemon writes a row with one copy. The daemon
/// sizes it (`ring_pool_pages`); this default is never loaded.
#[map(name = "sched_table")]
pub static SCHED_TABLE: Array<[u32; RING_PAGE as usize]> =
    Array::with_max_entries(DEFAULT_SERVICES, BPF_F_MMAPABLE as u32);

/// Per-CPU round-robin cursor per service.
#[map(name = "rr_cursor")]
pub static RR_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(DEFAULT_SERVICES, 0);

/// 5-tuple -> connection (LRU: the oldest go first when it is full).
#[map(name = "connections")]
pub static CONNECTIONS: LruHashMap<FlowKey, Connection> =
    LruHashMap::with_max_entries(DEFAULT_CONNECTIONS, 0);

/// (source, destination, IP identification, protocol) -> where the fragments of a
/// datagram whose first fragment was ours go (`lb_common::frag`).
#[map(name = "fragments")]
pub static FRAGMENTS: LruHashMap<FragKey, FragRoute> = LruHashMap::with_max_entries(FRAG_ROUTES, 0);

/// (client, service) -> server, for sticky services.
#[map(name = "persistence")]
pub static PERSISTENCE: LruHashMap<PersistKey, Persist> =
    LruHashMap::with_max_entries(DEFAULT_CONNECTIONS, 0);

/// Service id -> the TAT of its next new connection under `max_new_per_sec`
/// (`lb_common::rate`).
#[map(name = "new_rate")]
pub static NEW_RATE: Array<u64> = Array::with_max_entries(DEFAULT_SERVICES, 0);

/// (client prefix, service) -> the same under `max_new_per_sec_per_source`.
#[map(name = "source_rate")]
pub static SOURCE_RATE: LruHashMap<PersistKey, u64> =
    LruHashMap::with_max_entries(DEFAULT_CONNECTIONS, 0);

/// Global per-CPU counters: one `StatBlock`, indexed by `Stat`.
#[map(name = "stat")]
static STAT: PerCpuArray<StatBlock> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU packets and bytes per service id.
#[map(name = "service_stats")]
pub static SERVICE_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_SERVICES, 0);

/// Per-CPU packets and bytes per server index.
#[map(name = "server_stats")]
pub static SERVER_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(DEFAULT_SERVERS, 0);

/// Per CPU, the established IPv4 flows forwarded last (`CachedFlow`): a packet of one is
/// forwarded without the `connections` lookup (`steer`), and the full path takes its counts
/// into the shared entry at least once a second (`FLOW_SYNC_NS`). A plain array, CPU `c`'s
/// slots from `c * FLOW_CACHE_SLOTS` ([`flow_index`]), rather than a per-CPU one: a probe
/// is one memory access, not two (a per-CPU array reaches each value through a table of
/// pointers), and a CPU can reach another's slots. The daemon sizes it for its CPUs.
#[map(name = "flow_cache")]
pub static FLOW_CACHE: Array<CachedFlow> = Array::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// `flow_cache` for IPv6 flows (`CachedFlow6`), laid out the same way.
#[map(name = "flow_cache6")]
pub static FLOW_CACHE6: Array<CachedFlow6> = Array::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// The index in `flow_cache` (or `flow_cache6`) of slot `slot` (`flow_cache_slot`, or
/// `flow_cache_slot6`) of this CPU.
#[inline(always)]
pub fn flow_index(slot: u32) -> u32 {
    // SAFETY: plain helper call (inlined by the verifier).
    let cpu = unsafe { bpf_get_smp_processor_id() };
    cpu * FLOW_CACHE_SLOTS + slot
}

/// The one settings record.
#[map(name = "settings")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// New and closed connections, for the daemon to stream to backups.
#[map(name = "conn_events")]
pub static CONN_EVENTS: RingBuf = RingBuf::with_byte_size(CONN_EVENTS_BYTES, 0);

/// Per-CPU room for the structures too big for the 512-byte BPF stack when every path is
/// inlined into one function: the FIB query and connection entries being built.
#[repr(C)]
pub struct Scratch {
    pub fib: FibParams,
    pub conn: Connection,
    pub reply: Connection,
    /// A fragment's key in `fragments`, and a first fragment's route being written.
    pub frag_key: FragKey,
    pub frag_route: FragRoute,
}

#[map(name = "scratch")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Flow keys being built: the packet's own (0), a NAT reply leg's (1), and the client leg
/// of a NAT connection whose port is being reused (2). Apart from `SCRATCH` so that a key
/// and the scratch area can be borrowed at once.
#[map(name = "flow_keys")]
pub static KEYS: PerCpuArray<[FlowKey; 3]> = PerCpuArray::with_max_entries(1, 0);

/// The key of a `source_rate` lookup being made (the stack has no room for it).
#[map(name = "limit_key")]
pub static LIMIT_KEY: PerCpuArray<PersistKey> = PerCpuArray::with_max_entries(1, 0);

/// The key of a `services` lookup being made, here rather than on the stack: `lb_xdp`'s
/// frame and that of the BPF function it calls must fit 512 bytes together.
#[map(name = "service_key")]
static SERVICE_KEY: PerCpuArray<ServiceKey> = PerCpuArray::with_max_entries(1, 0);

/// The service at `vip`:`port` (network byte order) for `proto`.
#[inline(always)]
pub fn find_service(vip: &Addr, port: u16, proto: u8) -> Option<NonNull<Service>> {
    let k = SERVICE_KEY.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU, and the key is only used
    // for the lookup below.
    let k = unsafe { &mut *k };
    copy_addr(&mut k.vip, &vip.w);
    lookup_service(k, port, proto)
}

/// [`find_service`] for an IPv4 VIP as loaded from a packet.
#[inline(always)]
pub fn find_service_v4(vip: u32, port: u16, proto: u8) -> Option<NonNull<Service>> {
    let k = SERVICE_KEY.get_ptr_mut(0)?;
    // SAFETY: as in `find_service`.
    let k = unsafe { &mut *k };
    k.vip = Addr::v4_raw(vip);
    lookup_service(k, port, proto)
}

#[inline(always)]
fn lookup_service(k: &mut ServiceKey, port: u16, proto: u8) -> Option<NonNull<Service>> {
    k.port = port;
    k.proto = proto;
    k._pad = 0;
    SERVICES
        .get_ptr(k)
        .and_then(|p| NonNull::new(p as *mut Service))
}

#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU, so nothing else uses it now.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Builds a flow key in slot `SLOT` of the scratch area (keys are 40 bytes, and the BPF
/// stack has no room for the several an inlined program would otherwise hold).
#[inline(always)]
pub fn scratch_key<const SLOT: usize>(
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
    proto: u8,
) -> Option<&'static mut FlowKey> {
    let k = key_slot::<SLOT>()?;
    k.src = src;
    k.dst = dst;
    Some(key_rest(k, sport, dport, proto))
}

/// Slot `SLOT` of the scratch flow keys, as it is: for a caller that writes the addresses
/// itself (word by word, from the packet) and completes it with [`key_rest`].
#[inline(always)]
pub fn key_slot<const SLOT: usize>() -> Option<&'static mut FlowKey> {
    let keys = KEYS.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU. Each slot has one user at a
    // time on a packet's path.
    Some(unsafe { &mut (*keys)[SLOT] })
}

/// A flow key's ports, protocol and padding.
#[inline(always)]
pub fn key_rest(k: &mut FlowKey, sport: u16, dport: u16, proto: u8) -> &mut FlowKey {
    k.sport = sport;
    k.dport = dport;
    k.proto = proto;
    // Byte by byte: `[0; 3]` would be a call to BPF's byte-looping memset on every packet.
    k._pad[0] = 0;
    k._pad[1] = 0;
    k._pad[2] = 0;
    k
}

/// The packet's own flow key, as on the wire: slot 0, as lb_xdp left it when it looked the
/// packet's connection up (`balance`, `balance6`). Every TCP or UDP packet that reaches a
/// connection or a service was looked up by it, and nothing on that path writes slot 0
/// again (the ICMP paths, which do, never get there): not built twice per packet.
#[inline(always)]
pub fn packet_key() -> Option<&'static mut FlowKey> {
    key_slot::<0>()
}

/// The flow key of a packet from `ip`'s addresses (slot 0), copied word by word.
#[inline(always)]
pub fn flow_key(ip: &Ip, sport: u16, dport: u16, proto: u8) -> Option<&'static mut FlowKey> {
    let k = key_slot::<0>()?;
    copy_addr(&mut k.src, &ip.saddr.w);
    copy_addr(&mut k.dst, &ip.daddr.w);
    Some(key_rest(k, sport, dport, proto))
}

/// This CPU's global counters.
#[inline(always)]
pub fn stat_block() -> Option<&'static mut [u64; STAT_SLOTS]> {
    // SAFETY: a per-CPU value: no other writer while this program runs on this CPU.
    STAT.get_ptr_mut(0).map(|p| unsafe { &mut (*p).0 })
}

/// Adds `n` to counter `s` of block `b`.
#[inline(always)]
pub fn add(b: &mut [u64; STAT_SLOTS], s: Stat, n: u64) {
    b[s as usize & (STAT_SLOTS - 1)] += n;
}

#[inline(always)]
pub fn count(s: Stat, n: u64) {
    if let Some(b) = stat_block() {
        add(b, s, n);
    }
}

/// Counts a packet of `bytes` for a VIP or the NAT address.
#[inline(always)]
pub fn count_vip(bytes: u32) {
    if let Some(b) = stat_block() {
        add(b, Stat::VipPackets, 1);
        add(b, Stat::VipBytes, bytes as u64);
    }
}

#[inline(always)]
pub fn count_traffic(map: &PerCpuArray<Counters>, index: u32, bytes: u64) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot.
        unsafe {
            (*p).packets += 1;
            (*p).bytes += bytes;
        }
    }
}
