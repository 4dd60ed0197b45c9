//! Map names, keys, values and counter indices shared by `lb-ebpf` and `lb-daemon`.
//!
//! Every type is `#[repr(C)]` with explicit padding fields (so no byte the kernel copies is
//! left uninitialised) and a compile-time size assertion. Addresses are 16 bytes wide so IPv6
//! needs no ABI change; ports and addresses are kept in network byte order, as on the wire.

use crate::{ring::RING_PAGES_MAX, timeouts::Timeouts};

/// Map names, as they appear in the eBPF object (and in `bpftool map`); the benchmarks' are
/// in [`crate::bench`].
pub mod maps {
    /// (VIP, port, protocol) -> [`super::Service`].
    pub const SERVICES: &str = "services";
    /// VIP -> number of services on it.
    pub const VIPS: &str = "vips";
    /// Array of [`super::VIP_FILTER_SLOTS`] counts, by [`super::vip_filter_slot`] of an
    /// address: how many VIPs and NAT addresses fall in the slot. Zero lets a packet pass
    /// after one array read, with no hash lookup.
    pub const VIP_FILTER: &str = "vip_filter";
    /// Server index -> [`super::Server`]; one entry per (service, server) line.
    pub const SERVERS: &str = "servers";
    /// Server index -> [`super::ServerLoad`]: connections opened and closed (by FIN or RST),
    /// counted by lb_xdp for the least-connection schedulers.
    pub const SERVER_LOAD: &str = "server_load";
    /// Server index -> connections that ended without a FIN or RST (idle timeout, evicted,
    /// dropped), as the daemon reckons them at each sweep.
    pub const SERVER_GONE: &str = "server_gone";
    /// The scheduler rows' pool: page -> [`crate::RING_PAGE`] server indices. A service's
    /// row is in the pages its [`super::Service::pages`] names, slot `s` at index `s %
    /// RING_PAGE` of page `pages[s / RING_PAGE]`.
    pub const SCHED_TABLE: &str = "sched_table";
    /// Per-CPU round-robin cursor, one per service.
    pub const RR_CURSOR: &str = "rr_cursor";
    /// LRU: [`super::FlowKey`] -> [`super::Connection`].
    pub const CONNECTIONS: &str = "connections";
    /// LRU: [`super::PersistKey`] -> [`super::Persist`].
    pub const PERSISTENCE: &str = "persistence";
    /// Per service id: the theoretical arrival time of its next new connection under
    /// `max_new_per_sec` (see `crate::rate`).
    pub const NEW_RATE: &str = "new_rate";
    /// LRU: [`super::PersistKey`] (the client prefix, the service) -> the same per client
    /// prefix, under `max_new_per_sec_per_source`.
    pub const SOURCE_RATE: &str = "source_rate";
    /// Per-CPU global counters indexed by [`super::Stat`].
    pub const STAT: &str = "stat";
    /// Per-CPU [`super::Counters`] per service id.
    pub const SERVICE_STATS: &str = "service_stats";
    /// Per-CPU [`super::Counters`] per server index.
    pub const SERVER_STATS: &str = "server_stats";
    /// One [`super::Settings`] record: timeout, debug, active flag, local addresses.
    pub const SETTINGS: &str = "settings";
    /// Ring buffer of [`super::ConnEvent`]: new and closed connections, streamed to backups.
    pub const CONN_EVENTS: &str = "conn_events";
    pub const NAT_FULL: &str = "nat_full";
    /// Per-CPU [`crate::CachedFlow`]s: the established IPv4 flows this CPU forwarded last,
    /// forwarded again without a `connections` lookup.
    pub const FLOW_CACHE: &str = "flow_cache";
    /// Per-CPU [`crate::CachedFlow6`]s: the same for IPv6 flows.
    pub const FLOW_CACHE6: &str = "flow_cache6";
    /// lb_decap: ATM address -> 1 for every ATM whose IPIP packets are accepted.
    pub const DECAP_SOURCES: &str = "decap_sources";
    /// lb_decap: per-CPU counters indexed by [`super::DecapStat`].
    pub const DECAP_STAT: &str = "decap_stat";
}

/// Slots of the `vip_filter` map.
pub const VIP_FILTER_SLOTS: u32 = 256;

/// The `vip_filter` slot of an IPv4 address as loaded from a packet (network byte order in
/// memory): its last octet, which differs most between addresses of one segment.
#[inline(always)]
pub const fn vip_filter_slot(raw: u32) -> u32 {
    raw.to_ne_bytes()[3] as u32
}

/// Program names in the eBPF object (the benchmarks' are in [`crate::bench`]).
pub mod programs {
    /// The balancer, attached to the ATM's interfaces.
    pub const LB_XDP: &str = "lb_xdp";
    /// IPIP decapsulation for real servers in tunnel mode.
    pub const LB_DECAP: &str = "lb_decap";
}

/// Default capacities (the `config` table), used when the config file names none.
pub const DEFAULT_SERVICES: u32 = 64;
pub const DEFAULT_SERVERS: u32 = 256;
pub const DEFAULT_CONNECTIONS: u32 = 262_144;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// IPv6-in-IPv6 (the next header of a v6 tunnel's outer header).
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;

/// A 16-byte address. IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`); each word holds the
/// bytes in network order, exactly as loaded from a packet.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub w: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<Addr>() == 16);

impl Addr {
    /// This address with only its first `prefix` bits kept (of the IPv4 address in the
    /// last word for an IPv4-mapped one, `v6` false); 0 keeps it whole.
    #[inline(always)]
    pub fn masked(&self, prefix: u8, v6: bool) -> Addr {
        let mut a = *self;
        if prefix == 0 {
            return a;
        }
        let keep = |bits: u32| -> u32 {
            match bits {
                0 => 0,
                32.. => u32::MAX,
                b => !(u32::MAX >> b),
            }
        };
        if v6 {
            for (i, w) in a.w.iter_mut().enumerate() {
                *w &= keep((prefix as u32).saturating_sub(32 * i as u32)).to_be();
            }
        } else {
            a.w[3] &= keep(prefix as u32).to_be();
        }
        a
    }
}

/// `0x0000ffff` in network byte order: the third word of an IPv4-mapped address.
pub const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    /// From an IPv4 address as loaded from a packet (network byte order in memory).
    #[inline(always)]
    pub const fn v4_raw(raw: u32) -> Self {
        Addr {
            w: [0, 0, V4_MAPPED, raw],
        }
    }

    /// The IPv4 address in network byte order as stored in a packet, if this is one.
    #[inline(always)]
    pub const fn as_v4_raw(&self) -> Option<u32> {
        if self.w[0] == 0 && self.w[1] == 0 && self.w[2] == V4_MAPPED {
            Some(self.w[3])
        } else {
            None
        }
    }

    pub const fn from_v4_octets(o: [u8; 4]) -> Self {
        Self::v4_raw(u32::from_ne_bytes(o))
    }

    pub fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self.w[i].to_ne_bytes();
            out[i * 4..i * 4 + 4].copy_from_slice(&b);
            i += 1;
        }
        out
    }
}

#[cfg(feature = "std")]
impl From<core::net::Ipv4Addr> for Addr {
    fn from(a: core::net::Ipv4Addr) -> Self {
        Addr::from_v4_octets(a.octets())
    }
}

#[cfg(feature = "std")]
impl From<core::net::IpAddr> for Addr {
    fn from(a: core::net::IpAddr) -> Self {
        match a {
            core::net::IpAddr::V4(v4) => v4.into(),
            core::net::IpAddr::V6(v6) => v6.into(),
        }
    }
}

#[cfg(feature = "std")]
impl From<core::net::Ipv6Addr> for Addr {
    fn from(a: core::net::Ipv6Addr) -> Self {
        let o = a.octets();
        let mut w = [0u32; 4];
        for (i, c) in o.chunks_exact(4).enumerate() {
            w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
        Addr { w }
    }
}

#[cfg(feature = "std")]
impl Addr {
    pub fn to_ip(&self) -> core::net::IpAddr {
        match self.as_v4_raw() {
            Some(raw) => core::net::IpAddr::V4(core::net::Ipv4Addr::from(raw.to_ne_bytes())),
            None => core::net::IpAddr::V6(core::net::Ipv6Addr::from(self.octets())),
        }
    }
}

#[cfg(feature = "std")]
impl core::fmt::Debug for Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.to_ip())
    }
}

#[cfg(not(feature = "std"))]
impl core::fmt::Debug for Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Addr").field("w", &self.w).finish()
    }
}

/// A port in network byte order from one in host order.
#[inline(always)]
pub const fn port_be(port: u16) -> u16 {
    port.to_be()
}

/// Scheduler of a service: how its row in `sched_table` is filled and indexed.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sched {
    /// Round robin: each up server once, cycled by a per-CPU cursor.
    Rr = 1,
    /// Weighted round robin: an interleaved weighted sequence, cycled by the cursor.
    Wrr = 2,
    /// Source hash: the client address hashed into the weighted sequence.
    Sh = 3,
    /// Maglev: the 5-tuple hashed into a Maglev ring of [`crate::ring_slots`] slots.
    Maglev = 4,
    /// Least connections: the up server with the fewest active connections.
    Lc = 5,
    /// Weighted least connections: the fewest active connections per unit of weight.
    Wlc = 6,
    /// Shortest expected delay: the least (active connections + 1) per unit of weight.
    Sed = 7,
}

impl Sched {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Sched::Rr),
            2 => Some(Sched::Wrr),
            3 => Some(Sched::Sh),
            4 => Some(Sched::Maglev),
            5 => Some(Sched::Lc),
            6 => Some(Sched::Wlc),
            7 => Some(Sched::Sed),
            _ => None,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Sched::Rr => "rr",
            Sched::Wrr => "wrr",
            Sched::Sh => "sh",
            Sched::Maglev => "maglev",
            Sched::Lc => "lc",
            Sched::Wlc => "wlc",
            Sched::Sed => "sed",
        }
    }
}

/// Forwarding method of a server, chosen per server as in TCL.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Rewrite the destination MAC; the server holds the VIP on `lo`.
    Direct = 1,
    /// IPv4-in-IPv4 to the server, outer source the ATM.
    Tunnel = 2,
    /// Destination and source rewritten; replies translated back on the ATM.
    Nat = 3,
    /// TCL's `local`: the primary ATM serves it itself; its packets go up its own stack
    /// (`XDP_PASS`), which holds the VIP.
    Local = 4,
}

impl Method {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Method::Direct),
            2 => Some(Method::Tunnel),
            3 => Some(Method::Nat),
            4 => Some(Method::Local),
            _ => None,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Method::Direct => "direct",
            Method::Tunnel => "tunnel",
            Method::Nat => "nat",
            Method::Local => "local",
        }
    }
}

/// Key of `services`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub vip: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// Value of `services`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index of the service in `rr_cursor` and `service_stats`, and what its servers'
    /// [`Server::service`] says.
    pub id: u32,
    /// Valid slots in the service's row; 0 means no server can take a new connection.
    pub table_len: u32,
    /// Seconds a client sticks to its server; 0 = not sticky.
    pub persistence_s: u32,
    /// `max_new_per_sec` as the time between two new connections, in ns (a burst of one
    /// second's worth allowed: see `lb_common::rate`); 0 = no limit.
    pub new_interval_ns: u32,
    /// The same per client prefix (`max_new_per_sec_per_source`); 0 = no limit.
    pub src_interval_ns: u32,
    /// A [`Sched`] value.
    pub sched: u8,
    /// `SERVICE_*` bits.
    pub flags: u8,
    /// Persistence by client prefix: the bits of the client address that name its entry
    /// (of the IPv4 address for an IPv4 service); 0 = the whole address.
    pub persist_prefix: u8,
    /// The client prefix that `src_interval_ns` limits together (`rate_limit_prefix`; of
    /// the IPv4 address for an IPv4 service).
    pub limit_prefix: u8,
    /// The pages of `sched_table` that hold the row, in order; the first
    /// `table_len.div_ceil(RING_PAGE)` are used. A new row goes into fresh pages and is
    /// published with this record, in one update: lb_xdp sees the old row or the new one.
    pub pages: [u16; RING_PAGES_MAX],
}
const _: () = assert!(core::mem::size_of::<Service>() == 24 + 2 * RING_PAGES_MAX);

/// [`Service::flags`]: UDP one-packet scheduling: every datagram is scheduled alone and
/// leaves no connection entry (IPVS's `--ops`).
pub const SERVICE_ONE_PACKET: u8 = 1;

impl Default for Service {
    fn default() -> Self {
        Service {
            id: 0,
            table_len: 0,
            persistence_s: 0,
            new_interval_ns: 0,
            src_interval_ns: 0,
            sched: 0,
            flags: 0,
            persist_prefix: 0,
            limit_prefix: 0,
            pages: [0; RING_PAGES_MAX],
        }
    }
}

/// [`Server::flags`]: the server is up (passed its checks and is enabled).
pub const SERVER_UP: u8 = 1;

/// The most servers a least-connection service (`lc`, `wlc`, `sed`) may have: lb_xdp
/// compares them all for each new connection.
pub const LEAST_MAX: u32 = 1024;

/// Value of `server_load`: what lb_xdp counted of a server's connections. Only ever added
/// to (atomically: every CPU shares the record).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct ServerLoad {
    /// Connections opened (client legs entered in `connections`).
    pub opens: u64,
    /// Of those, closed by a FIN or RST.
    pub closes: u64,
}

impl ServerLoad {
    /// Active connections: opened, not closed, and not gone otherwise. `gone` is the
    /// daemon's correction (see [`ServerLoad::gone`]), a two's-complement i64: negative
    /// when the table holds more than this ATM opened (synced entries a new primary
    /// inherited). Never below 0.
    #[inline(always)]
    pub fn active(&self, gone: u64) -> u64 {
        let a = self.opens.wrapping_sub(self.closes).wrapping_sub(gone) as i64;
        if a < 0 { 0 } else { a as u64 }
    }

    /// The correction that makes [`ServerLoad::active`] say `live`.
    pub fn gone(&self, live: u64) -> u64 {
        self.opens.wrapping_sub(self.closes).wrapping_sub(live)
    }
}

/// Value of `servers` (an array indexed by server index).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Server {
    /// The real server's address.
    pub addr: Addr,
    /// The VIP of the service this line belongs to (restored as source on NAT replies).
    pub vip: Addr,
    /// Server port, network byte order.
    pub port: u16,
    /// Service port, network byte order.
    pub vport: u16,
    /// A [`Method`] value.
    pub method: u8,
    /// [`SERVER_UP`].
    pub flags: u8,
    /// The service's protocol (with `vip` and `vport`, what a connection to this server
    /// must match to be forwarded without asking `services`).
    pub proto: u8,
    pub _pad: u8,
    /// Scheduler weight (the daemon builds the tables from it; kept here for the tables).
    pub weight: u32,
    /// The service's id.
    pub service: u32,
    /// The next hop toward the server: its MAC (or its router's), cached by the dataplane
    /// from the kernel's FIB until `hop_until_ns`, and still used after that if the FIB has
    /// lost the neighbour entry. All zero = unknown.
    pub mac: [u8; 6],
    /// Our MAC on `ifindex`, the source of frames sent with `mac`.
    pub smac: [u8; 6],
    /// Egress interface toward the server (0 = unknown).
    pub ifindex: u32,
    /// `bpf_ktime_get_ns()` until which `mac`, `smac`, `ifindex` and `mtu` are fresh.
    pub hop_until_ns: u64,
    /// Path MTU toward the server.
    pub mtu: u16,
    pub _pad3: [u8; 2],
    /// NAT: where the search for a free source port toward this server starts next; it
    /// moves on with every port handed out, so ports are taken in turn, the one free
    /// longest first.
    pub nat_cursor: u32,
    /// The service's own idle timeout in seconds (`[service.timeouts]` `tcp`, or `udp` for
    /// a UDP service); 0: the cluster's, in [`Settings::timeouts`].
    pub timeout_s: u32,
    /// The service's own timeout for a TCP connection that has seen a FIN or RST
    /// (`tcp_fin`); 0: the cluster's.
    pub fin_timeout_s: u32,
}
const _: () = assert!(core::mem::size_of::<Server>() == 88);

impl Server {
    /// How long a connection to this server with `CONN_*` bits `flags` may be idle (see
    /// [`Timeouts::limit_ns`]).
    #[inline(always)]
    pub fn idle_limit_ns(&self, t: &Timeouts, flags: u16) -> u64 {
        t.limit_ns(self.proto, flags, self.timeout_s, self.fin_timeout_s)
    }
}

/// Key of `connections`: a 5-tuple as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// [`Connection::flags`]: the connection is NAT-ed.
pub const CONN_NAT: u16 = 1;
/// [`Connection::flags`]: this entry is the server-to-ATM leg of a NAT connection.
pub const CONN_REPLY: u16 = 2;
/// [`Connection::flags`]: a FIN was seen.
pub const CONN_FIN: u16 = 4;
/// [`Connection::flags`]: a RST was seen.
pub const CONN_RST: u16 = 8;
/// [`Connection::flags`] of a NAT reply leg: the client's leg saw a FIN (so with
/// [`CONN_FIN`] on the reply leg, each side has finished sending).
pub const CONN_PEER_FIN: u16 = 16;
/// [`Connection::flags`] of a NAT reply leg: the client's leg saw a RST.
pub const CONN_PEER_RST: u16 = 32;
/// [`Connection::flags`] of a NAT reply leg: the server sent its FIN before the client did,
/// so the server keeps the connection in TIME_WAIT (60 s on Linux) and would refuse a new
/// connection on the same addresses and ports meanwhile.
pub const CONN_SERVER_CLOSED_FIRST: u16 = 64;
/// [`Connection::flags`]: the entry came from another ATM's sync records, not from a packet
/// this ATM's dataplane saw. A record may replace such an entry; one this dataplane made,
/// while live, is its own and stays (a client that reused its port moments after a close
/// would otherwise have its new connection replaced by the old one).
pub const CONN_SYNCED: u16 = 128;
/// [`Connection::flags`]: half-open: the client has sent only SYNs (IPVS's SYN_RECV). Its
/// first packet without SYN (the handshake's ACK) clears it. Its own short timeout
/// (`Timeouts::tcp_syn_ns`) lets a flood's entries go first. Client legs only.
pub const CONN_HALF_OPEN: u16 = 256;

/// NAT source addresses the dataplane takes: the gateway and up to 15 more (`[nat] pool`).
pub const NAT_POOL_MAX: usize = 16;
const _: () = assert!(NAT_POOL_MAX.is_power_of_two());

/// Value of `connections`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Connection {
    /// `bpf_ktime_get_ns()` of the last packet.
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Server index.
    pub server: u32,
    /// `CONN_*` bits.
    pub flags: u16,
    /// NAT forward leg: our source port toward the server. NAT reply leg: the client's port.
    pub nat_port: u16,
    /// NAT forward leg: our source address toward the server. NAT reply leg: the client's address.
    pub nat_addr: Addr,
    /// NAT reply leg: the MAC the client's packets came from (the client or its router), used
    /// toward the client when the kernel's FIB has no neighbour entry for it.
    pub peer_mac: [u8; 6],
    /// NAT reply leg: our MAC that the client's packets were sent to.
    pub local_mac: [u8; 6],
    /// NAT reply leg: the interface the client's packets arrived on.
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<Connection>() == 64);

/// Key of `persistence`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, Hash)]
pub struct PersistKey {
    pub client: Addr,
    pub service: u32,
}
const _: () = assert!(core::mem::size_of::<PersistKey>() == 20);

/// Value of `persistence`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Persist {
    pub last_seen_ns: u64,
    pub server: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Persist>() == 16);

/// [`Settings::flags`]: this ATM is primary; without it every packet passes untouched.
pub const SETTINGS_ACTIVE: u32 = 1;
/// [`Settings::flags`]: report new and closed connections on `conn_events` (there are
/// backups to keep in step).
pub const SETTINGS_SYNC: u32 = 2;

/// Size of the `conn_events` ring buffer.
pub const CONN_EVENTS_BYTES: u32 = 1 << 18;

/// [`ConnEvent::kind`]: a connection was created.
pub const EVENT_OPEN: u8 = 1;
/// [`ConnEvent::kind`]: a connection saw its first FIN or RST.
pub const EVENT_CLOSE: u8 = 2;

/// A record of `conn_events`: what a backup needs to install the same connection.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct ConnEvent {
    /// The client's leg, as on the wire.
    pub key: FlowKey,
    /// NAT: our source address toward the server.
    pub nat_addr: Addr,
    /// Server index (the backup maps it by address and port, not by index).
    pub server: u32,
    /// `CONN_*` bits of the client's leg.
    pub flags: u16,
    /// NAT: our source port toward the server (network order).
    pub nat_port: u16,
    /// `EVENT_OPEN` or `EVENT_CLOSE`.
    pub kind: u8,
    pub _pad: u8,
    /// NAT: the MAC the client's packets came from.
    pub peer_mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<ConnEvent>() == 72);

/// The one record of `settings`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Idle time after which a connection counts as new, by protocol and state (a
    /// service's server records may override it).
    pub timeouts: Timeouts,
    /// 1: one log record per new connection.
    pub debug: u32,
    /// `SETTINGS_*` bits.
    pub flags: u32,
    /// The ATM's own address: the outer source of IPIP packets.
    pub local_addr: Addr,
    /// NAT: the source address used toward servers.
    pub nat_addr: Addr,
    /// NAT: first source port to hand out (host order).
    pub nat_port_min: u16,
    /// NAT: last source port to hand out (host order).
    pub nat_port_max: u16,
    /// The flow caches' generation, set by the daemon's `Dataplane` (whatever the caller
    /// writes): a cached flow of another generation is not used. It moves on each time the
    /// ATM starts forwarding, so a flow cached while it last did (its connection may have
    /// changed on the other ATM since) is looked up afresh.
    pub flow_gen: u32,
    /// `bpf_ktime_get_ns()` until which the daemon vouches for this record; 0 = always.
    /// The daemon renews it every heartbeat. If the daemon dies (the program stays attached),
    /// an active ATM past its lease drops service traffic instead of handing it to the stack,
    /// whose VIP alias would answer every packet of a connection with a reset, and drops ARP
    /// requests for the VIPs and the NAT address, which the stack would answer.
    pub lease_ns: u64,
    /// `bpf_ktime_get_ns()` until which a NAT packet of no known connection (a TCP segment
    /// other than a SYN for a NAT server, anything to a NAT port of the NAT address) is
    /// dropped rather than handed to the stack: just after this ATM became primary its
    /// entry may still be on its way from the old primary, and the stack, which holds the VIP
    /// and the NAT address, would reset it. After, the stack's reset is the right answer (the
    /// connection is gone) and ends it at once.
    pub settle_until_ns: u64,
    /// NAT: how long a source port stays held after its connection closed (a RST, or a FIN
    /// each way, the client's first) before it is handed out again.
    pub port_hold_ns: u64,
    /// NAT: the same when the server sent the first FIN: its TIME_WAIT.
    pub time_wait_ns: u64,
    /// NAT: the source addresses (IPv4, network byte order), the gateway first;
    /// `nat_pool_len` of them are in use.
    pub nat_pool: [u32; NAT_POOL_MAX],
    pub nat_pool_len: u32,
    /// NAT: added to every server's cursor. Each ATM draws its own when it becomes primary,
    /// so a new primary does not search from where the old one was handing out pairs in
    /// the moments before their records reached it.
    pub nat_cursor_base: u32,
    /// The other ATM of a planned handover (IPv4, network byte order; 0: none), its address
    /// in `[[atm]]`. Until `peer_until_ns`, a packet to a VIP or the NAT address that this
    /// ATM has no connection for and that cannot start one goes to it unchanged: the
    /// connection may be one the other ATM made moments ago, whose record is not here yet
    /// (see docs/HA.md, "Planned handovers"). Never one that came from it.
    pub peer_addr: u32,
    /// NAT: which ports this ATM hands out while `peer_addr` is set (a planned handover,
    /// when both ATMs make connections): 1, those at even offsets in the port range (the
    /// old primary); 2, those at odd ones (the new primary); 0, all. Two ATMs never hand out
    /// the same pair in the moments before each other's records arrive (see
    /// `lb_common::nat::in_stripe`).
    pub nat_stripe: u32,
    /// `bpf_ktime_get_ns()` until which packets go to `peer_addr`.
    pub peer_until_ns: u64,
    /// The ATM's own IPv6 address: the outer source of IPv6-in-IPv6 packets; unset (all
    /// zero) when it has none, and then v6 tunnel servers cannot be reached.
    pub local_addr6: Addr,
    /// NAT66: the source address used toward IPv6 NAT servers (the `[nat]` IPv6 gateway);
    /// unset (all zero) when there is none, and then v6 NAT servers cannot be reached.
    pub nat_addr6: Addr,
    /// `peer_addr` when the ATMs' `[[atm]] address`es are IPv6 (`peer_addr` is then 0):
    /// the other ATM of a planned handover, found by an IPv6 route lookup.
    pub peer_addr6: Addr,
    /// Nanoseconds per jiffy (1e9 / HZ: the coarse clock's resolution), with which lb_xdp
    /// works its clock out from jiffies; 0: it measures the rate itself.
    pub tick_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 256);

/// Per-service and per-server traffic counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 16);

/// Slots of a [`StatBlock`]: [`Stat::COUNT`] rounded up to a power of two, so that lb_xdp
/// indexes it under a mask the verifier can check.
pub const STAT_SLOTS: usize = 32;
const _: () = assert!(Stat::COUNT as usize <= STAT_SLOTS && STAT_SLOTS.is_power_of_two());

/// Value of `stat`'s one entry (per CPU): every global counter, indexed by [`Stat`]. One
/// lookup reaches all of them, so a packet's several counts (the packet, its VIP traffic,
/// its outcome) cost one lookup or two, not one each.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatBlock(pub [u64; STAT_SLOTS]);

impl Default for StatBlock {
    fn default() -> Self {
        StatBlock([0; STAT_SLOTS])
    }
}

/// Indices into a [`StatBlock`]. Every packet lands in exactly one of the outcome counters
/// (`Passed`, `Forwarded`, `Drop*`), so they add up to `Packets`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Every packet the program saw.
    Packets = 0,
    /// Packets for a service (to a VIP, or NAT replies from a server).
    VipPackets,
    /// Bytes of those packets.
    VipBytes,
    /// Connections created.
    NewConns,
    /// Outcome: passed to the stack untouched.
    Passed,
    /// Outcome: forwarded by XDP_TX or XDP_REDIRECT.
    Forwarded,
    /// Outcome: malformed or truncated header.
    DropMalformed,
    /// Outcome: a non-first IPv4 fragment for a service.
    DropFragment,
    /// Outcome: no server can take the connection (none up, or the chosen one is down).
    DropNoServer,
    /// Outcome: no route or neighbour toward the server.
    DropNoRoute,
    /// Outcome: NAT source ports exhausted toward that server.
    DropNatPorts,
    /// Outcome: the packet could not be rewritten (head adjustment failed).
    DropError,
    /// Outcome: too big for the path to the server once encapsulated (an ICMP
    /// fragmentation-needed is sent back when the client set DF).
    DropTooBig,
    /// ICMP errors steered to a connection's server (also counted as forwarded or dropped).
    IcmpSteered,
    /// ICMP fragmentation-needed sent back for packets too big for the path to the server
    /// (the packet itself counts as `DropTooBig`).
    IcmpSent,
    /// Connection events lost because the ring buffer was full (backups catch up at the
    /// next full sync).
    SyncLost,
    /// Outcome: service traffic on an ATM whose daemon stopped renewing its lease.
    DropOrphaned,
    /// Outcome: a packet of no known connection that cannot start one, while the primary
    /// settles in (`Settings::settle_until_ns`): to a NAT server, a TCP packet other than a
    /// SYN (a fresh translation could only draw a reset); to the NAT address, anything on a
    /// NAT port (a reply whose entry is missing). The entry may still be on its way from the
    /// old primary; the peer retransmits. Later such packets pass to the stack. In a planned
    /// handover they go to the other ATM instead (`ToPeer`), unless they came from it.
    DropNoConnection,
    /// 802.1Q- or 802.1ad-tagged frames (the tag in the frame), passed to the stack: lb
    /// balances untagged traffic only (also counted as passed).
    Tagged,
    /// Outcome: an ARP request for a VIP or the NAT address on an ATM whose daemon stopped
    /// renewing its lease. The kernel still holds the aliases and would answer, winning
    /// clients back from the ATM that took over into the orphan's `DropOrphaned`.
    DropFenced,
    /// Packets of no known connection sent on to the other ATM of a planned handover
    /// (`Settings::peer_addr`), which made the connection (also counted as forwarded).
    ToPeer,
    /// Outcome: the first packet of a new connection over its service's
    /// `max_new_per_sec` or `max_new_per_sec_per_source` (established ones are never
    /// limited).
    DropRateLimited,
}

impl Stat {
    pub const COUNT: u32 = Stat::DropRateLimited as u32 + 1;
    pub const ALL: [Stat; Stat::COUNT as usize] = [
        Stat::Packets,
        Stat::VipPackets,
        Stat::VipBytes,
        Stat::NewConns,
        Stat::Passed,
        Stat::Forwarded,
        Stat::DropMalformed,
        Stat::DropFragment,
        Stat::DropNoServer,
        Stat::DropNoRoute,
        Stat::DropNatPorts,
        Stat::DropError,
        Stat::DropTooBig,
        Stat::IcmpSteered,
        Stat::IcmpSent,
        Stat::SyncLost,
        Stat::DropOrphaned,
        Stat::DropNoConnection,
        Stat::Tagged,
        Stat::DropFenced,
        Stat::ToPeer,
        Stat::DropRateLimited,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Packets => "packets",
            Stat::VipPackets => "vip_packets",
            Stat::VipBytes => "vip_bytes",
            Stat::NewConns => "new_connections",
            Stat::Passed => "passed",
            Stat::Forwarded => "forwarded",
            Stat::DropMalformed => "drop_malformed",
            Stat::DropFragment => "drop_fragment",
            Stat::DropNoServer => "drop_no_server",
            Stat::DropNoRoute => "drop_no_route",
            Stat::DropNatPorts => "drop_nat_ports",
            Stat::DropError => "drop_error",
            Stat::DropTooBig => "drop_too_big",
            Stat::IcmpSteered => "icmp_steered",
            Stat::IcmpSent => "icmp_sent",
            Stat::SyncLost => "sync_lost",
            Stat::DropOrphaned => "drop_orphaned",
            Stat::DropNoConnection => "drop_no_connection",
            Stat::Tagged => "tagged",
            Stat::DropFenced => "drop_fenced",
            Stat::ToPeer => "to_peer",
            Stat::DropRateLimited => "drop_rate_limited",
        }
    }
    /// The drop outcomes, whose sum is the `stat` table's "dropped".
    pub const DROPS: [Stat; 11] = [
        Stat::DropMalformed,
        Stat::DropFragment,
        Stat::DropNoServer,
        Stat::DropNoRoute,
        Stat::DropNatPorts,
        Stat::DropError,
        Stat::DropTooBig,
        Stat::DropOrphaned,
        Stat::DropNoConnection,
        Stat::DropFenced,
        Stat::DropRateLimited,
    ];
}

/// Indices of lb_decap's per-CPU `decap_stat` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapStat {
    /// Every packet the program saw.
    Packets = 0,
    /// IPIP packets from a configured ATM, decapsulated and passed up.
    Decapsulated,
    /// Everything else, passed untouched.
    Passed,
    /// Malformed IPIP from a configured ATM, dropped.
    Dropped,
}

impl DecapStat {
    pub const COUNT: u32 = DecapStat::Dropped as u32 + 1;
    /// The counters' names, in index order (the `decap` table's columns, /metrics labels).
    pub const NAMES: [&'static str; DecapStat::COUNT as usize] =
        ["packets", "decapsulated", "passed", "dropped"];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], Copy, has explicit padding fields and no pointers, so
    // any bit pattern the kernel hands back is a valid value.
    unsafe impl aya::Pod for super::Addr {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Server {}
    unsafe impl aya::Pod for super::ServerLoad {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Connection {}
    unsafe impl aya::Pod for super::PersistKey {}
    unsafe impl aya::Pod for super::Persist {}
    unsafe impl aya::Pod for crate::frag::FragKey {}
    unsafe impl aya::Pod for crate::frag::FragRoute {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::StatBlock {}
    unsafe impl aya::Pod for super::ConnEvent {}
    unsafe impl aya::Pod for crate::CachedFlow {}
    unsafe impl aya::Pod for crate::CachedFlow6 {}
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;
    use std::string::ToString;

    #[test]
    fn v4_addresses_round_trip_and_are_mapped() {
        let a = Addr::from(Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(a.as_v4_raw(), Some(u32::from_ne_bytes([192, 0, 2, 10])));
        assert_eq!(
            &a.octets()[..],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 10][..]
        );
        assert_eq!(a.to_ip().to_string(), "192.0.2.10");
    }

    #[test]
    fn stat_all_is_in_index_order() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{}", s.name());
        }
    }

    #[test]
    fn drops_are_every_drop_outcome() {
        let named: std::vec::Vec<&str> = Stat::ALL
            .iter()
            .map(|s| s.name())
            .filter(|n| n.starts_with("drop_"))
            .collect();
        let drops: std::vec::Vec<&str> = Stat::DROPS.iter().map(|s| s.name()).collect();
        assert_eq!(drops, named);
    }

    #[test]
    fn enums_round_trip() {
        for s in [Sched::Rr, Sched::Wrr, Sched::Sh, Sched::Maglev] {
            assert_eq!(Sched::from_u8(s as u8), Some(s));
        }
        for m in [Method::Direct, Method::Tunnel, Method::Nat] {
            assert_eq!(Method::from_u8(m as u8), Some(m));
        }
        assert_eq!(Sched::from_u8(0), None);
        assert_eq!(Method::from_u8(9), None);
    }
}

#[cfg(test)]
mod load_tests {
    use super::ServerLoad;

    #[test]
    fn active_connections_follow_the_daemons_correction_either_way() {
        let l = ServerLoad {
            opens: 10,
            closes: 4,
        };
        assert_eq!(l.active(0), 6);
        // Two idled out: the sweep finds 4 live.
        assert_eq!(l.active(l.gone(4)), 4);
        // A new primary that opened 10 and closed 4 holds 9 (5 synced to it).
        assert_eq!(l.active(l.gone(9)), 9);
        // More closed than opened (synced ones closing) and nothing live: 0, not a wrap.
        let l = ServerLoad {
            opens: 2,
            closes: 5,
        };
        assert_eq!(l.active(0), 0);
        assert_eq!(l.active(l.gone(1)), 1);
    }
}

#[cfg(test)]
mod mask_tests {
    use super::Addr;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn addr(ip: IpAddr) -> Addr {
        let v6 = match ip {
            IpAddr::V4(v) => v.to_ipv6_mapped(),
            IpAddr::V6(v) => v,
        };
        let o = v6.octets();
        let mut a = Addr::default();
        for (i, w) in a.w.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
        }
        a
    }

    #[test]
    fn a_client_address_masked_to_its_prefix() {
        let v4 = |s: &str| addr(IpAddr::V4(s.parse::<Ipv4Addr>().unwrap()));
        let v6 = |s: &str| addr(IpAddr::V6(s.parse::<Ipv6Addr>().unwrap()));
        assert_eq!(v4("192.0.2.77").masked(24, false), v4("192.0.2.0"));
        assert_eq!(v4("192.0.2.77").masked(25, false), v4("192.0.2.0"));
        assert_eq!(v4("192.0.2.200").masked(25, false), v4("192.0.2.128"));
        assert_eq!(v4("192.0.2.77").masked(32, false), v4("192.0.2.77"));
        assert_eq!(v4("192.0.2.77").masked(0, false), v4("192.0.2.77"));
        assert_eq!(
            v6("2001:db8:1:2:3:4:5:6").masked(64, true),
            v6("2001:db8:1:2::")
        );
        assert_eq!(
            v6("2001:db8:1:2:3:4:5:6").masked(36, true),
            v6("2001:db8::")
        );
        assert_eq!(
            v6("2001:db8:1:2:3:4:5:6").masked(128, true),
            v6("2001:db8:1:2:3:4:5:6")
        );
    }
}
