//! The flow cache (`flow_cache` for IPv4, `flow_cache6` for IPv6; docs/DATAPLANE.md, "The
//! flow cache"): an established flow's packets forwarded from this CPU's slot
//! (`cached_forward`), and the full path's side of it: taking a slot's counts into the
//! shared entry (`take_cached`), filling the slot (`cache_if_due`), and emptying the flow's
//! slot on every CPU (`forget_everywhere`).

use aya_ebpf::{cty::c_void, helpers::generated::bpf_loop, programs::XdpContext};
use core::ptr::NonNull;
use lb_common::{
    Addr, CachedFlow, CachedFlow6, Connection, FlowKey, Method, Server, CONN_FIN, CONN_HALF_OPEN,
    CONN_RST, FLOW_CACHE_SLOTS, FLOW_SYNC_NS,
};

use crate::{conn::*, fwd::*, hop::*, maps::*, net::*, parse::*, Outcome};

/// A packet of cached flow `f` (no SYN, FIN or RST): forwarded to the flow's server, and
/// counted everywhere but in the shared entry, which the full path brings up to date
/// within `FLOW_SYNC_NS`. `None` if the server no longer serves the flow (down, or given
/// to another service): the full path decides.
#[inline(always)]
pub fn cached_forward<S: Slot>(
    ctx: &XdpContext,
    mut f: NonNull<S>,
    ip: &Ip,
    l4: &L4,
    next: &mut Next,
) -> Option<Outcome> {
    // SAFETY: this CPU's slot; XDP runs to completion on its CPU.
    let f = unsafe { f.as_mut() };
    let server = SERVERS.get(f.server())?;
    if !serves(server, ip, l4) {
        return None;
    }
    take_packet(f, server, ip.bytes, ip.now);
    // Direct, with the server's next hop fresh and the packet within its path MTU: a MAC
    // rewrite, here, without a call. Anything else as the full path forwards it.
    if let Some(hop) = direct_hop(server, ip.tot_len, ip.now) {
        return Some(send(ctx, &hop));
    }
    next.server = f.server();
    if server.method == Method::Nat as u8 {
        f.nat_addr(&mut next.nat_addr);
    }
    next.nat_port = f.nat_port();
    Some(Outcome::Action(forward_xdp(ctx, ip, next)))
}

/// What [`cached_forward`] needs of a slot, of either family.
pub trait Slot {
    /// The server index.
    fn server(&self) -> u32;
    /// The NAT source port, as on the wire.
    fn nat_port(&self) -> u16;
    /// Writes the NAT source address into `out`.
    fn nat_addr(&self, out: &mut Addr);
    /// Counts a packet of `bytes` at `now`.
    fn take(&mut self, bytes: u64, now: u64);
    /// Moves what the slot forwarded into `into`, leaving it none.
    fn drain(&mut self, into: &mut Drained);
    /// Moves what the slot forwarded into the shared entry `c`, leaving it none.
    fn give_to(&mut self, c: &mut Connection);
    /// Whether the slot, holding the packet's flow, may forward it at `now`: written by the
    /// full path within `FLOW_SYNC_NS`, in generation `generation`.
    fn answers(&self, now: u64, generation: u32) -> bool;
    /// Marks the slot empty.
    fn empty(&mut self);
}

/// [`Slot`] for a slot type whose NAT source address `$s` writes into `$out` as `$nat`.
macro_rules! slot {
    ($t:ty, |$s:ident, $out:ident| $nat:block, |$e:ident| $empty:block) => {
        impl Slot for $t {
            #[inline(always)]
            fn server(&self) -> u32 {
                self.server
            }
            #[inline(always)]
            fn nat_port(&self) -> u16 {
                self.nat_port
            }
            #[inline(always)]
            fn nat_addr(&self, $out: &mut Addr) {
                let $s = self;
                $nat
            }
            #[inline(always)]
            fn take(&mut self, bytes: u64, now: u64) {
                self.packets += 1;
                self.bytes += bytes;
                self.last_ns = now;
            }
            #[inline(always)]
            fn drain(&mut self, into: &mut Drained) {
                into.packets += self.packets;
                into.bytes += self.bytes;
                if self.last_ns > into.last_ns {
                    into.last_ns = self.last_ns;
                }
                zero_u64(&mut self.packets);
                zero_u64(&mut self.bytes);
            }
            #[inline(always)]
            fn give_to(&mut self, c: &mut Connection) {
                self.merge_into(c);
                zero_u64(&mut self.packets);
                zero_u64(&mut self.bytes);
            }
            #[inline(always)]
            fn answers(&self, now: u64, generation: u32) -> bool {
                now.wrapping_sub(self.synced_ns) < FLOW_SYNC_NS && self.generation == generation
            }
            #[inline(always)]
            fn empty(&mut self) {
                let $e = self;
                $empty
            }
        }
    };
}
// An IPv4 slot is empty when its VIP is 0.0.0.0, an IPv6 one when its key's protocol is 0.
slot!(
    CachedFlow,
    |f, out| {
        out.w[2] = lb_common::V4_MAPPED;
        out.w[3] = f.nat_addr;
    },
    |f| { f.daddr = 0 }
);
slot!(
    CachedFlow6,
    |f, out| { copy_addr(out, &f.nat_addr.w) },
    |f| { f.key.proto = 0 }
);

/// A packet of cached direct flow `f`, before `balance` writes the parsed packet down: its
/// IPv4 header checked, its L4 header (`proto`) at `l4_at`, `tot_len` and `bytes` as in
/// `Ip`. Sent on with a MAC rewrite, as [`cached_forward`] would; `None`, having changed
/// nothing, leaves it to the rest of lb_xdp: not direct, a SYN, FIN or RST, a server that no
/// longer serves the flow, a stale next hop, a packet too big for the path.
#[inline(always)]
pub fn cached_direct(
    ctx: &XdpContext,
    mut f: NonNull<CachedFlow>,
    proto: u8,
    l4_at: usize,
    tot_len: u16,
    bytes: u32,
    now: u64,
) -> Option<Outcome> {
    // SAFETY: this CPU's slot; XDP runs to completion on its CPU.
    let f = unsafe { f.as_mut() };
    if f.method != Method::Direct as u8 {
        return None;
    }
    let l4 = parse_l4_at(ctx, proto, l4_at, tot_len, tot_len)?;
    if l4.flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return None;
    }
    let server = SERVERS.get(f.server)?;
    // The slot holds the packet's flow: its key is the packet's.
    if !serves_at(server, &Addr::v4_raw(f.daddr), f.dport, f.proto) {
        return None;
    }
    let hop = direct_hop(server, tot_len, now)?;
    take_packet(f, server, bytes, now);
    Some(send(ctx, &hop))
}

/// The next hop for a packet of `tot_len` bytes to `server` by a MAC rewrite alone: if the
/// server is direct, its cached next hop fresh and the packet within its path MTU.
#[inline(always)]
fn direct_hop(server: &Server, tot_len: u16, now: u64) -> Option<Hop> {
    if server.method != Method::Direct as u8 || tot_len > server.mtu {
        return None;
    }
    fresh_hop(server, now)
}

/// Counts a packet of `bytes` forwarded from cached flow `f` to `server`: everywhere but in
/// the shared entry, which the full path brings up to date within `FLOW_SYNC_NS`.
#[inline(always)]
fn take_packet<S: Slot>(f: &mut S, server: &Server, bytes: u32, now: u64) {
    count_vip(bytes);
    count_traffic(&SERVICE_STATS, server.service, bytes as u64);
    count_traffic(&SERVER_STATS, f.server(), bytes as u64);
    f.take(bytes as u64, now);
}

/// What this CPU forwarded of the packet's flow from its cache goes into the shared entry
/// `c`: its last packet may be newer than the entry's. The slot is emptied, and filled again
/// by [`cache_if_due`] if the connection goes on.
#[inline(always)]
pub fn take_cached(c: &mut Connection, ip: &Ip) {
    if !ip.slot_holds {
        return;
    }
    /// The slot's counts into `c`, and the slot emptied.
    #[inline(always)]
    fn hand_in<S: Slot>(f: *mut S, c: &mut Connection) {
        // SAFETY: this CPU's slot; XDP runs to completion on its CPU.
        let f = unsafe { &mut *f };
        f.give_to(c);
        f.empty();
    }
    if ip.v6 {
        if let Some(f) = FLOW_CACHE6.get_ptr_mut(ip.slot) {
            hand_in(f, c);
        }
    } else if let Some(f) = FLOW_CACHE.get_ptr_mut(ip.slot) {
        hand_in(f, c);
    }
}

/// The packets a connection has seen (this one counted) before the full path caches it.
const CACHE_AFTER: u64 = 3;

/// Caches the packet's flow on connection `c` (its server's method `method`), just brought
/// up to date, in generation `generation`, unless the packet or the connection says not to.
/// Not a SYN, FIN or RST, nor a closing connection: its NAT port may soon be another's, and
/// a late packet of it must then find no entry, as without the cache. Nor a connection of
/// fewer than [`CACHE_AFTER`] packets yet: most of the shortest flows would fill a slot for
/// nothing (and the cost shows when every flow is new); a long one is cached from its third
/// packet.
#[inline(always)]
pub fn cache_if_due(c: &Connection, ip: &Ip, l4: &L4, method: u8, generation: u32) {
    if l4.flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
        || c.flags & (CONN_FIN | CONN_RST | CONN_HALF_OPEN) != 0
        || c.packets < CACHE_AFTER
    {
        return;
    }
    if ip.v6 {
        if let Some(f) = FLOW_CACHE6.get_ptr_mut(ip.slot) {
            // SAFETY: this CPU's slot.
            cache_flow6(unsafe { &mut *f }, ip, l4, c, method, generation);
        }
        return;
    }
    if let Some(f) = FLOW_CACHE.get_ptr_mut(ip.slot) {
        // SAFETY: this CPU's slot.
        cache_flow(unsafe { &mut *f }, ip, l4, c, method, generation);
    }
}

/// [`cache_flow`] for an IPv6 flow, in its slot of `flow_cache6`.
#[inline(always)]
fn cache_flow6(f: &mut CachedFlow6, ip: &Ip, l4: &L4, c: &Connection, method: u8, generation: u32) {
    if f.key.proto != 0 && f.packets != 0 {
        // The slot's own key, a map value, names the entry.
        if let Some(v) = CONNECTIONS.get_ptr_mut(&f.key) {
            // SAFETY: a map value; racing updates of counters only blur them.
            f.merge_into(unsafe { &mut *v });
        }
    }
    copy_addr(&mut f.key.src, &ip.saddr.w);
    copy_addr(&mut f.key.dst, &ip.daddr.w);
    f.key.sport = l4.sport;
    f.key.dport = l4.dport;
    f.key.proto = ip.proto;
    f.key._pad[0] = 0;
    f.key._pad[1] = 0;
    f.key._pad[2] = 0;
    f.method = method;
    f._pad = 0;
    f.nat_port = c.nat_port;
    f.generation = generation;
    f.server = c.server;
    f._pad2 = 0;
    copy_addr(&mut f.nat_addr, &c.nat_addr.w);
    f.synced_ns = ip.now;
    f.last_ns = ip.now;
    zero_u64(&mut f.packets);
    zero_u64(&mut f.bytes);
}

/// Caches the IPv4 flow of packet `ip`, `l4` on connection `c` in its slot `f`. Another
/// flow's packets in the slot that its shared entry has not seen yet go there first.
#[inline(always)]
fn cache_flow(f: &mut CachedFlow, ip: &Ip, l4: &L4, c: &Connection, method: u8, generation: u32) {
    if f.daddr != 0 && f.packets != 0 {
        if let Some(k) = scratch_key::<1>(
            Addr::v4_raw(f.saddr),
            Addr::v4_raw(f.daddr),
            f.sport,
            f.dport,
            f.proto,
        ) {
            if let Some(v) = CONNECTIONS.get_ptr_mut(&*k) {
                // SAFETY: a map value; racing updates of counters only blur them.
                f.merge_into(unsafe { &mut *v });
            }
        }
    }
    f.saddr = ip.saddr.w[3];
    f.daddr = ip.daddr.w[3];
    f.sport = l4.sport;
    f.dport = l4.dport;
    f.proto = ip.proto;
    f.method = method;
    f.nat_port = c.nat_port;
    f.generation = generation;
    f._pad2 = 0;
    f.server = c.server;
    f.nat_addr = c.nat_addr.w[3];
    f.synced_ns = ip.now;
    f.last_ns = ip.now;
    zero_u64(&mut f.packets);
    zero_u64(&mut f.bytes);
}

/// The most CPUs [`forget_everywhere`] visits; it stops at the first that does not exist.
const CPUS_MAX: u32 = 4096;

/// The flow [`forget_on_cpu`] removes from each CPU's cache, and what the CPUs had
/// forwarded of it. Fields of its own rather than a `CachedFlow`: a zeroed one is built by
/// a call of BPF's byte-looping memset, and takes a bigger stack frame.
#[repr(C)]
struct Forget {
    slot: u32,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    counts: Drained,
}

/// What the CPUs' slots of one flow had forwarded, gathered by a `bpf_loop` callback.
#[repr(C)]
pub struct Drained {
    last_ns: u64,
    packets: u64,
    bytes: u64,
}

impl Drained {
    /// Nothing yet (word by word: see `zero_u64`).
    #[inline(always)]
    fn clear(&mut self) {
        zero_u64(&mut self.last_ns);
        zero_u64(&mut self.packets);
        zero_u64(&mut self.bytes);
    }

    /// Adds what was gathered into connection `c`.
    #[inline(always)]
    fn add_to(&self, c: &mut Connection) {
        c.packets += self.packets;
        c.bytes += self.bytes;
        if self.last_ns > c.last_seen_ns {
            c.last_seen_ns = self.last_ns;
        }
    }
}

/// Removes the IPv4 flow of packet `ip`, `l4` from the cache of every CPU (its slot in each
/// CPU's part of `flow_cache`), and adds what they forwarded of it into its connection `c`.
/// For a change that every CPU must see at once: a cached flow on another CPU would
/// otherwise go on to the old server or NAT port for up to `FLOW_SYNC_NS`.
#[inline(always)]
pub fn forget_everywhere(c: &mut Connection, ip: &Ip, l4: &L4) {
    if ip.slot == NO_SLOT {
        return;
    }
    if ip.v6 {
        forget6_everywhere(c, ip, l4);
        return;
    }
    let mut f = Forget {
        slot: ip.slot % FLOW_CACHE_SLOTS,
        saddr: ip.saddr.w[3],
        daddr: ip.daddr.w[3],
        sport: l4.sport,
        dport: l4.dport,
        proto: ip.proto,
        counts: Drained {
            last_ns: 0,
            packets: 0,
            bytes: 0,
        },
    };
    f.counts.clear();
    // SAFETY: the helper calls `forget_on_cpu` with `f`, which lives on this stack frame
    // for the whole call.
    unsafe {
        bpf_loop(
            CPUS_MAX,
            forget_on_cpu as *mut c_void,
            &mut f as *mut Forget as *mut c_void,
            0,
        );
    }
    f.counts.add_to(c);
}

/// One CPU of [`forget_everywhere`] (a `bpf_loop` callback): 1 to stop (no such CPU).
#[inline(never)]
extern "C" fn forget_on_cpu(cpu: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `forget_everywhere` passes its Forget.
    let p = unsafe { &mut *(ctx as *mut Forget) };
    // Past the last CPU's slots: done.
    let Some(f) = FLOW_CACHE.get_ptr_mut(cpu as u32 * FLOW_CACHE_SLOTS + p.slot) else {
        return 1;
    };
    // SAFETY: a slot of another CPU, which may be forwarding a packet of the flow right
    // now: that packet's counts may be lost, nothing worse.
    let f = unsafe { &mut *f };
    if f.is(p.saddr, p.daddr, p.sport, p.dport, p.proto) {
        f.empty();
        f.drain(&mut p.counts);
    }
    0
}

/// The IPv6 flow [`forget6_on_cpu`] removes, and what the CPUs had forwarded of it: in a
/// per-CPU map value, not on the stack, which has no room for a key of 40 bytes here
/// (`bpf_loop` runs its callback on this CPU, so the value is this packet's).
#[repr(C)]
pub struct Forget6 {
    key: FlowKey,
    slot: u32,
    _pad: u32,
    counts: Drained,
}

#[aya_ebpf::macros::map(name = "forget6")]
static FORGET6: aya_ebpf::maps::PerCpuArray<Forget6> =
    aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);

/// [`forget_everywhere`] for an IPv6 flow, from `flow_cache6`.
#[inline(always)]
fn forget6_everywhere(c: &mut Connection, ip: &Ip, l4: &L4) {
    let Some(p) = FORGET6.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU value; XDP runs to completion on its CPU.
    let p = unsafe { &mut *p };
    copy_addr(&mut p.key.src, &ip.saddr.w);
    copy_addr(&mut p.key.dst, &ip.daddr.w);
    p.key.sport = l4.sport;
    p.key.dport = l4.dport;
    p.key.proto = ip.proto;
    p.slot = ip.slot % FLOW_CACHE_SLOTS;
    p.counts.clear();
    // SAFETY: the callback takes no context: it reads FORGET6.
    unsafe {
        bpf_loop(
            CPUS_MAX,
            forget6_on_cpu as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    p.counts.add_to(c);
}

/// One CPU of [`forget6_everywhere`] (a `bpf_loop` callback): 1 to stop (no such CPU).
#[inline(never)]
extern "C" fn forget6_on_cpu(cpu: u64, _ctx: *mut c_void) -> i64 {
    let Some(p) = FORGET6.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's value, filled by forget6_everywhere.
    let p = unsafe { &mut *p };
    let Some(f) = FLOW_CACHE6.get_ptr_mut(cpu as u32 * FLOW_CACHE_SLOTS + p.slot) else {
        return 1;
    };
    // SAFETY: a slot of another CPU, which may be forwarding a packet of the flow right
    // now: that packet's counts may be lost, nothing worse.
    let f = unsafe { &mut *f };
    if f.key.same(&p.key) {
        f.empty();
        f.drain(&mut p.counts);
    }
    0
}
