//! The config file's public types: what a validated file is, its defaults and its limits.
//! Every default is written once here, as a constant or a `Default`, and the readers take it
//! from here.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    path::PathBuf,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use lb_common::{IPPROTO_UDP, Method, Sched};

use crate::Capacities;

/// One problem with the file, at a line (1-based; 0 when it concerns the whole file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

/// The whole cluster, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub cluster: Cluster,
    pub tables: Capacities,
    pub nat: Option<Nat>,
    pub ha: Ha,
    pub control: Control,
    pub atms: Vec<Atm>,
    pub services: Vec<ServiceCfg>,
}

impl Config {
    /// The shortest idle timeout of an open connection of any service, in seconds: the
    /// service's own, or the cluster's for its protocol. (The cluster's `tcp` when there is
    /// no service.) Backups must hear of live connections more often than this.
    pub fn shortest_idle_timeout(&self) -> u32 {
        let t = &self.cluster.timeouts;
        self.services
            .iter()
            .map(|s| {
                let idle = s
                    .timeouts
                    .idle
                    .unwrap_or(if s.proto == lb_common::IPPROTO_UDP {
                        t.udp()
                    } else {
                        t.tcp
                    });
                // A half-open connection's entry too: it lives tcp_syn.
                if s.proto == lb_common::IPPROTO_TCP {
                    idle.min(t.tcp_syn())
                } else {
                    idle
                }
            })
            .min()
            .unwrap_or(t.tcp)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    pub name: String,
    /// Idle connection timeouts (`timeout`, `[cluster.timeouts]`).
    pub timeouts: Timeouts,
    pub debug: bool,
    /// Shared secret for ATM messages (required when there is more than one ATM).
    pub auth_key_file: Option<PathBuf>,
    /// Seconds a hook may run before it is killed.
    pub notify_timeout: u32,
}

/// The cluster's idle connection timeouts in seconds, as `ipvsadm --set tcp tcpfin udp`:
/// `tcp` is TCL's one `timeout`; `tcp_fin` and `udp` follow it unless set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A TCP connection that has seen no FIN or RST.
    pub tcp: u32,
    /// One that has seen a FIN or RST, either way; `None`: `tcp`.
    pub tcp_fin: Option<u32>,
    /// A UDP flow; `None`: `tcp`.
    pub udp: Option<u32>,
    /// A half-open TCP connection (only SYNs from the client yet); `None`: IPVS's 60 s, or
    /// `tcp` if shorter.
    pub tcp_syn: Option<u32>,
}

impl Timeouts {
    pub fn new(tcp: u32) -> Self {
        Timeouts {
            tcp,
            tcp_fin: None,
            udp: None,
            tcp_syn: None,
        }
    }

    pub fn tcp_syn(&self) -> u32 {
        self.tcp_syn.unwrap_or(DEFAULT_TCP_SYN.min(self.tcp))
    }

    pub fn tcp_fin(&self) -> u32 {
        self.tcp_fin.unwrap_or(self.tcp)
    }

    pub fn udp(&self) -> u32 {
        self.udp.unwrap_or(self.tcp)
    }
}

/// A service's own timeouts in seconds (`[service.timeouts]`): `idle` is `tcp` or `udp`,
/// by the service's protocol, `fin` is `tcp_fin`; `None`: the cluster's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceTimeouts {
    pub idle: Option<u32>,
    pub fin: Option<u32>,
}

/// `[nat]`: the servers' side of NAT, in IPv4 (NAT44), IPv6 (NAT66) or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat {
    /// `subnet`, `gateway` and `pool`.
    pub v4: Option<Nat4>,
    /// `subnet6` and `gateway6`.
    pub v6: Option<Nat6>,
    /// Seconds a NAT source port stays held after its connection closed (a RST, or a FIN
    /// each way with the client's first) before another connection may take it.
    pub port_hold: u32,
    /// Seconds it stays held when the server closed first: the server's TIME_WAIT (60 s on
    /// Linux), during which it may refuse a new connection on the same ports.
    pub time_wait: u32,
}

/// The IPv4 NAT subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat4 {
    pub subnet: Ipv4Addr,
    pub prefix: u8,
    /// Alias held by the primary; also the first source address of NAT-ed packets.
    pub gateway: Ipv4Addr,
    /// More source addresses (`pool`), held by the primary as /32 aliases: each multiplies
    /// the source ports toward every server. `pool[..pool_len]`.
    pub pool: [Ipv4Addr; NAT_POOL_MAX - 1],
    pub pool_len: u8,
}

/// The IPv6 NAT subnet: its gateway is the one source address of NAT66 (no pool: see
/// DAEMON.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat6 {
    pub subnet: Ipv6Addr,
    pub prefix: u8,
    pub gateway: Ipv6Addr,
}

/// Source addresses of NAT-ed packets, the gateway included (the dataplane's settings hold
/// this many).
pub const NAT_POOL_MAX: usize = lb_common::NAT_POOL_MAX;
/// The default `[nat] port_hold`, seconds.
pub const DEFAULT_PORT_HOLD: u32 = 2;
/// The default `[nat] time_wait`, seconds: Linux's TIME_WAIT.
pub const DEFAULT_TIME_WAIT: u32 = 60;
/// The prefix lengths `subnet6` takes: a /127 or /128 leaves no room for servers.
pub const NAT6_PREFIX_RANGE: RangeInclusive<u8> = 16..=126;

impl Nat {
    /// An IPv4 NAT subnet with its gateway, no pool, no IPv6 and the default hold.
    pub fn new(subnet: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Nat {
        Nat {
            v4: Some(Nat4 {
                subnet,
                prefix,
                gateway,
                pool: [Ipv4Addr::UNSPECIFIED; NAT_POOL_MAX - 1],
                pool_len: 0,
            }),
            v6: None,
            port_hold: DEFAULT_PORT_HOLD,
            time_wait: DEFAULT_TIME_WAIT,
        }
    }

    /// Whether `a` is in the NAT subnet of its family.
    pub fn contains(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => self.v4.is_some_and(|n| n.net().contains(&a)),
            IpAddr::V6(a) => self.v6.is_some_and(|n| n.net().contains(&a)),
        }
    }

    /// The gateway of `a`'s family, if there is a NAT subnet of that family.
    pub fn gateway_for(&self, a: IpAddr) -> Option<IpAddr> {
        match a {
            IpAddr::V4(_) => self.v4.map(|n| n.gateway.into()),
            IpAddr::V6(_) => self.v6.map(|n| n.gateway.into()),
        }
    }

    /// Whether `a` is a gateway (of either family).
    pub fn is_gateway(&self, a: IpAddr) -> bool {
        self.gateway_for(a) == Some(a)
    }

    /// Every NAT subnet, IPv4 first.
    pub fn nets(&self) -> impl Iterator<Item = IpNet> + '_ {
        let v4 = self.v4.map(|n| IpNet::V4(n.net()));
        let v6 = self.v6.map(|n| IpNet::V6(n.net()));
        v4.into_iter().chain(v6)
    }

    /// Every NAT source address: the IPv4 gateway and its pool, then the IPv6 gateway.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.v4.iter().flat_map(|n| n.addresses().map(IpAddr::V4));
        let v6 = self.v6.iter().map(|n| IpAddr::V6(n.gateway));
        v4.chain(v6)
    }
}

impl Nat4 {
    /// The NAT subnet, `subnet/prefix`.
    pub fn net(&self) -> Ipv4Net {
        Ipv4Net::new(self.subnet, self.prefix).expect("a NAT prefix is at most 32")
    }

    /// Every IPv4 NAT source address: the gateway first, then the pool.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        std::iter::once(self.gateway).chain(self.pool[..self.pool_len as usize].iter().copied())
    }
}

impl Nat6 {
    /// The NAT subnet, `subnet6`.
    pub fn net(&self) -> Ipv6Net {
        Ipv6Net::new(self.subnet, self.prefix).expect("a NAT prefix is at most 128")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ha {
    pub port: u16,
    pub heartbeat_ms: u32,
    /// Missed heartbeats before a peer counts as down.
    pub dead_after: u32,
    /// Addresses an ATM must reach to be allowed to become primary (either family).
    pub track: Vec<IpAddr>,
    /// `quorum`: whether an ATM must hear a majority of the listed ATMs to be primary.
    pub quorum: Quorum,
    /// `manager`: who decides which ATM is primary.
    pub manager: Manager,
    /// Hooks run when this ATM becomes primary, becomes backup, or can no longer be primary
    /// (keepalived's notify_master, notify_backup, notify_fault).
    pub notify_primary: Option<PathBuf>,
    pub notify_backup: Option<PathBuf>,
    pub notify_fault: Option<PathBuf>,
}

/// `[ha] manager`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Manager {
    /// lb's own election (TCL's).
    #[default]
    Lb,
    /// A cluster manager through the OCF agent (`dist/ocf/lb`): the election never promotes
    /// or demotes by itself; `lb-cli promote` and `demote` do, at once.
    Pacemaker,
}

/// `[ha] quorum`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Quorum {
    /// Any ATM may lead alone (TCL's election).
    #[default]
    None,
    /// With three ATMs or more, only one that hears a majority of them (itself included);
    /// two ATMs keep the election without quorum, as corosync's `two_node` does.
    Majority,
}

/// `[ha]` without a key takes it from here; no `[ha]` at all is all of it.
impl Default for Ha {
    fn default() -> Self {
        Ha {
            port: DEFAULT_HA_PORT,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            dead_after: DEFAULT_DEAD_AFTER,
            track: Vec::new(),
            quorum: Quorum::None,
            manager: Manager::Lb,
            notify_primary: None,
            notify_backup: None,
            notify_fault: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Control {
    pub socket: PathBuf,
    pub mount: PathBuf,
    /// `None`: no metrics endpoint.
    pub metrics: Option<SocketAddr>,
}

/// `[control]` without a key takes it from here; no `[control]` at all is all of it.
impl Default for Control {
    fn default() -> Self {
        Control {
            socket: DEFAULT_SOCKET.into(),
            mount: DEFAULT_MOUNT.into(),
            metrics: Some(DEFAULT_METRICS.parse().expect("default metrics address")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Atm {
    pub name: String,
    /// Where the other ATMs send heartbeats and sync: every ATM's is of one family.
    pub address: IpAddr,
    /// An IPv6 address of an ATM whose `address` is IPv4 (a dual-stack ATM).
    pub address6: Option<Ipv6Addr>,
    pub interface: String,
}

impl Atm {
    /// The ATM's IPv4 address: the outer source of its IPv4-in-IPv4 tunnels.
    pub fn v4(&self) -> Option<Ipv4Addr> {
        match self.address {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }

    /// The ATM's IPv6 address (`address`, else `address6`): the outer source of its
    /// IPv6-in-IPv6 tunnels.
    pub fn v6(&self) -> Option<Ipv6Addr> {
        match self.address {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => self.address6,
        }
    }

    /// Its address of `a`'s family.
    pub fn address_for(&self, a: IpAddr) -> Option<IpAddr> {
        match a {
            IpAddr::V4(_) => self.v4().map(IpAddr::V4),
            IpAddr::V6(_) => self.v6().map(IpAddr::V6),
        }
    }

    /// Every address of the ATM.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> {
        std::iter::once(self.address).chain(self.address6.map(IpAddr::V6))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceCfg {
    pub name: String,
    /// IPv4 or IPv6; its servers share its family.
    pub vip: IpAddr,
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub scheduler: Sched,
    /// Seconds; 0 = off.
    pub persistence: u32,
    pub check: Check,
    pub servers: Vec<ServerCfg>,
    /// Hooks run when the service goes up (a server can take connections again) or down.
    pub notify_up: Option<PathBuf>,
    pub notify_down: Option<PathBuf>,
    /// `persistence_netmask`: the client prefix length that persistence sticks together
    /// (IPVS's `-M`); 0 = each client address alone.
    pub persistence_netmask: u8,
    /// `one_packet = true` (UDP only): each datagram is scheduled alone, with no connection
    /// entry (IPVS's one-packet scheduling, for DNS and syslog).
    pub one_packet: bool,
    /// Servers that must take connections for the service to be up (keepalived's `quorum`,
    /// counted in servers): 1 by default.
    pub quorum: u32,
    /// Below `quorum - hysteresis` it goes down, at `quorum + hysteresis` up again.
    pub hysteresis: u32,
    /// Its own idle timeouts, if any.
    pub timeouts: ServiceTimeouts,
    /// New connections a second the whole service accepts (`max_new_per_sec`); 0 = no limit.
    pub max_new_per_sec: u32,
    /// The same per client prefix (`max_new_per_sec_per_source`); 0 = no limit.
    pub max_new_per_sec_per_source: u32,
    /// The client prefix that limit counts together (`rate_limit_prefix`): 24 for an IPv4
    /// service, 64 for IPv6, unless set.
    pub rate_limit_prefix: u8,
}

impl ServiceCfg {
    /// Whether the service is up with `up` servers taking connections, given whether it was:
    /// `quorum` with `hysteresis` (keepalived's rule).
    pub fn quorate(&self, up: u32, was: bool) -> bool {
        if was {
            up + self.hysteresis >= self.quorum
        } else {
            up >= self.quorum + self.hysteresis
        }
    }
}

impl ServiceCfg {
    pub fn proto_name(&self) -> &'static str {
        proto_name(self.proto)
    }
}

pub fn proto_name(proto: u8) -> &'static str {
    if proto == IPPROTO_UDP { "udp" } else { "tcp" }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerCfg {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub method: Method,
    /// false is TCL's `noping`.
    pub ping: bool,
    /// Hooks run when the server goes up or down (its checks, or lb-cli server).
    pub notify_up: Option<PathBuf>,
    pub notify_down: Option<PathBuf>,
    /// `sorry_server = true`: it takes the service's new connections only while none of
    /// its other servers is up (keepalived's `sorry_server`).
    pub sorry: bool,
}

/// The service check (TCL's ASA), run against every server of the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub kind: CheckKind,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub rise: u32,
    pub fall: u32,
}

/// A TCP check: a service without `[service.check]`, and what `[service.check]` leaves out.
impl Default for Check {
    fn default() -> Self {
        Check {
            kind: CheckKind::Tcp,
            interval_ms: DEFAULT_CHECK_INTERVAL_MS,
            timeout_ms: DEFAULT_CHECK_TIMEOUT_MS,
            rise: DEFAULT_CHECK_RISE,
            fall: DEFAULT_CHECK_FALL,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    None,
    Tcp,
    Http {
        https: bool,
        path: String,
        expect: u16,
        body: Option<String>,
        verify: bool,
    },
    Script(PathBuf),
}

/// Defaults, as DESIGN.md's example shows them.
pub const DEFAULT_TIMEOUT: u32 = 100;
/// A half-open connection's timeout unless set: IPVS's SYN_RECV.
pub const DEFAULT_TCP_SYN: u32 = 60;
/// `[cluster] notify_timeout`: seconds a hook may run.
pub const DEFAULT_NOTIFY_TIMEOUT: u32 = 10;
pub const NOTIFY_TIMEOUT_RANGE: RangeInclusive<i64> = 1..=3_600;
pub const DEFAULT_SOCKET: &str = "/run/lb/control.sock";
/// `[ha]` without `heartbeat_ms` / `dead_after`, or no `[ha]` at all.
pub const DEFAULT_HEARTBEAT_MS: u32 = 100;
pub const DEFAULT_DEAD_AFTER: u32 = 3;
/// A service's check: what `[service.check]` leaves out, and a TCP check when it is absent.
pub const DEFAULT_CHECK_INTERVAL_MS: u32 = 2000;
pub const DEFAULT_CHECK_TIMEOUT_MS: u32 = 1000;
pub const DEFAULT_CHECK_RISE: u32 = 2;
pub const DEFAULT_CHECK_FALL: u32 = 3;
pub const DEFAULT_MOUNT: &str = "/run/lb/cluster";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9780";
pub const DEFAULT_HA_PORT: u16 = 5780;

/// Limits. The scheduler rows' pool grows with services and servers
/// (`lb_common::ring_pool_pages`): at the largest, 16,384 services and 65,536 lines, about
/// 114 MiB; a service record names its row's pages by 16-bit numbers.
pub const SERVICES_RANGE: RangeInclusive<i64> = 1..=16_384;
pub const SERVERS_RANGE: RangeInclusive<i64> = 1..=65_536;
pub const CONNECTIONS_RANGE: RangeInclusive<i64> = 1024..=16_777_216;
pub const TIMEOUT_RANGE: RangeInclusive<i64> = 1..=86_400;
pub const WEIGHT_RANGE: RangeInclusive<i64> = 0..=65_535;
/// The longest name (cluster, ATM, service, server), in bytes. Names go into the tables'
/// space-separated lines and into ATM messages, whose cluster name field is 255 bytes: a
/// longer name was cut on send and compared whole on receive.
pub const NAME_MAX: usize = 64;
