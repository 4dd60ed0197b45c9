//! The typed interface to the XDP programs: load the embedded object with the capacities of
//! the `config` table, attach the programs to interfaces, program services, servers and
//! scheduler rows, read connections and counters, and run a program on a frame through
//! BPF_PROG_TEST_RUN. The daemon and the tests use the same calls.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use aya_log::EbpfLogger;
use lb_common::{
    Addr, ConnEvent, Connection, Counters, DecapStat, FlowKey, Method, RING_SIZE, SERVER_UP, Sched,
    Server, Service, ServiceKey, Settings, Stat, VIP_FILTER_SLOTS, maps, programs,
    sched::{self, Backend},
    vip_filter_slot, xdp_link,
};

/// The eBPF object built by build.rs from the `lb-ebpf` crate.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// The benchmarks' eBPF object, built beside [`OBJECT`] from the `lb-ebpf` crate's
/// `lb-bench-progs` binary: `bare_fwd`, `gen_tx`, `bench_nop` and `sink_count`, with their
/// maps (names and types in `lb_common::bench`). The daemon never loads it; `lb-bench` does.
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-progs.o"));

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the eBPF object has no {kind} named {name:?}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {program} to {interface} in {mode} mode failed: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        mode: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Capacities of the maps: the `config` table (defined with the config, which reads it).
pub use lb_api::Capacities;

/// How to attach an XDP program to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (native XDP); fails where the driver has no XDP support.
    Driver,
    /// In the generic (skb) path: works everywhere, slower.
    Generic,
    /// Driver mode if the driver supports it, generic otherwise.
    Auto,
}

/// The mode an attachment ended up in, as the daemon logs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Driver,
    Generic,
}

impl Attached {
    pub fn name(self) -> &'static str {
        match self {
            Attached::Driver => "driver",
            Attached::Generic => "generic",
        }
    }
}

/// The global counters summed over CPUs, indexed by [`Stat`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats(pub [u64; Stat::COUNT as usize]);

impl Stats {
    pub fn get(&self, s: Stat) -> u64 {
        self.0[s as usize]
    }
    /// All drop outcomes together.
    pub fn dropped(&self) -> u64 {
        Stat::DROPS.iter().map(|s| self.get(*s)).sum()
    }
}

/// The scheduler table, mapped into our memory (the map is created BPF_F_MMAPABLE), so that
/// rewriting a 65,537-slot Maglev row is a copy rather than 65,537 system calls. An array
/// map stores each value in an 8-byte element (value sizes are rounded up to 8), value first.
struct SchedTable {
    ptr: NonNull<u32>,
    entries: usize,
    /// Keeps the map (and so the mapping's backing) alive.
    _map: MapData,
}

/// Bytes per element of a BPF array map whose values are 4 bytes.
const SCHED_STRIDE: usize = 8;

// SAFETY: the mapping is plain shared memory owned by this value; writes go through &mut self.
unsafe impl Send for SchedTable {}

impl SchedTable {
    fn new(map: Map, entries: usize) -> Result<Self, Error> {
        let Map::Array(data) = map else {
            return Err(Error::Invalid(format!(
                "map {} is not an array",
                maps::SCHED_TABLE
            )));
        };
        // SAFETY: mapping a BPF array map fd as the kernel documents for BPF_F_MMAPABLE.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::bytes(entries),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Io {
                what: format!("mmap of map {}", maps::SCHED_TABLE),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(SchedTable {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned a non-null address"),
            entries,
            _map: data,
        })
    }

    fn bytes(entries: usize) -> usize {
        (entries * SCHED_STRIDE).next_multiple_of(page_size())
    }

    /// The u32 holding element `i`.
    fn slot(&self, i: usize) -> *mut u32 {
        debug_assert!(i < self.entries);
        // SAFETY: in bounds of the mapping (callers check i < entries).
        unsafe { self.ptr.as_ptr().add(i * SCHED_STRIDE / 4) }
    }

    fn write_row(&mut self, service: u32, table: &[u32]) -> bool {
        let start = service as usize * RING_SIZE as usize;
        if table.len() > RING_SIZE as usize || start + RING_SIZE as usize > self.entries {
            return false;
        }
        for (i, v) in table.iter().enumerate() {
            // SAFETY: in bounds, checked above; the kernel reads these words concurrently,
            // which is fine for aligned 4-byte stores.
            unsafe { std::ptr::write_volatile(self.slot(start + i), *v) };
        }
        true
    }

    fn read_row(&self, service: u32, len: usize) -> Option<Vec<u32>> {
        let start = service as usize * RING_SIZE as usize;
        if len > RING_SIZE as usize || start + RING_SIZE as usize > self.entries {
            return None;
        }
        // SAFETY: in bounds, checked above.
        Some(
            (0..len)
                .map(|i| unsafe { std::ptr::read_volatile(self.slot(start + i)) })
                .collect(),
        )
    }
}

impl Drop for SchedTable {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), Self::bytes(self.entries)) };
    }
}

fn page_size() -> usize {
    // SAFETY: plain libc call.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// A loaded balancer: the `lb_xdp` and `lb_decap` programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    caps: Capacities,
    /// Drains the programs' log records (the per-connection debug log) into `log`.
    logger: Option<EbpfLogger<Box<dyn log::Log>>>,
    /// Interfaces the programs are attached to, detached on drop.
    attachments: Vec<Attachment>,
    /// Interfaces where driver mode was refused, and the kernel's reason.
    fallbacks: Vec<(String, String)>,
    services: HashMap<MapData, ServiceKey, Service>,
    vips: HashMap<MapData, Addr, u32>,
    vip_filter: Array<MapData, u32>,
    /// What `vip_filter` holds, so that only changed slots are written.
    filter: Vec<u32>,
    /// The NAT addresses of the last settings written (they are in the filter too).
    nat_addrs: Vec<Addr>,
    servers: Array<MapData, Server>,
    sched: SchedTable,
    connections: HashMap<MapData, FlowKey, Connection>,
    stat: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, Counters>,
    server_stats: PerCpuArray<MapData, Counters>,
    settings: Array<MapData, Settings>,
    decap_sources: HashMap<MapData, Addr, u32>,
    decap_stat: PerCpuArray<MapData, u64>,
    /// New and closed connections reported by lb_xdp (when settings ask for it).
    conn_events: RingBuf<MapData>,
    /// Services programmed, to keep the per-VIP counts in `vips` right.
    service_keys: HashSet<ServiceKey>,
    vip_counts: StdHashMap<Addr, u32>,
    /// Services installed with [`Dataplane::install`], by id, to rebuild their rows.
    installed: StdHashMap<u32, Installed>,
}

/// The scheduler row of a service: its up servers by the service's scheduler. Pure, so it
/// can be computed beside the event loop.
pub fn row(spec: &ServiceSpec) -> Vec<u32> {
    let backends: Vec<Backend> = spec
        .servers
        .iter()
        .filter(|s| s.up)
        .map(|s| Backend::new(s.index, s.addr.into(), s.port, s.weight))
        .collect();
    sched::table(spec.sched, &backends)
}

/// A real server of a service, as the control plane describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSpec {
    /// Its index in the `servers` map (one per service/server line).
    pub index: u32,
    pub addr: std::net::Ipv4Addr,
    pub port: u16,
    pub weight: u32,
    pub method: Method,
    /// Passed its checks and is enabled.
    pub up: bool,
}

/// A service and its servers, as the control plane describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vip: std::net::Ipv4Addr,
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub sched: Sched,
    /// Seconds a client sticks to its server; 0 = off.
    pub persistence_s: u32,
    pub servers: Vec<ServerSpec>,
}

impl ServiceSpec {
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            vip: self.vip.into(),
            port: self.port.to_be(),
            proto: self.proto,
            _pad: 0,
        }
    }
}

struct Installed {
    spec: ServiceSpec,
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map {
        name,
        source: Box::new(source),
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> Error {
    move |source| Error::Program {
        name,
        source: Box::new(source),
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, Error> {
    ebpf.take_map(name)
        .ok_or(Error::Missing { kind: "map", name })
}

macro_rules! typed_map {
    ($ebpf:expr, $ty:ident, $name:expr) => {
        $ty::try_from(take_map($ebpf, $name)?).map_err(map_err($name))?
    };
}

impl Dataplane {
    /// Loads the object with the given capacities; the debug log goes to the global logger.
    pub fn load(caps: Capacities) -> Result<Self, Error> {
        Self::load_with_logger(caps, Box::new(GlobalLog))
    }

    /// Loads the object with the given capacities; the programs' log records (the debug
    /// log) go to `log` whenever [`Dataplane::flush_log`] is called.
    pub fn load_with_logger(caps: Capacities, log: Box<dyn log::Log>) -> Result<Self, Error> {
        if caps.services == 0 || caps.servers == 0 || caps.connections == 0 {
            return Err(Error::Invalid(format!(
                "capacities must be at least 1: {caps:?}"
            )));
        }
        let sched_entries = caps
            .services
            .checked_mul(RING_SIZE)
            .ok_or_else(|| Error::Invalid(format!("{} services is too many", caps.services)))?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::SERVICES, caps.services)
            .map_max_entries(maps::VIPS, caps.services)
            .map_max_entries(maps::SERVERS, caps.servers)
            .map_max_entries(maps::SCHED_TABLE, sched_entries)
            .map_max_entries(maps::RR_CURSOR, caps.services)
            .map_max_entries(maps::CONNECTIONS, caps.connections)
            .map_max_entries(maps::PERSISTENCE, caps.connections)
            .map_max_entries(maps::SERVICE_STATS, caps.services)
            .map_max_entries(maps::SERVER_STATS, caps.servers)
            .map_max_entries(maps::NAT_FULL, caps.servers)
            .load(OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;
        // The logger must exist before the programs load: it owns the ring buffer they use.
        let logger = EbpfLogger::init_with_logger(&mut ebpf, log).ok();
        for name in [programs::LB_XDP, programs::LB_DECAP] {
            program(&mut ebpf, name)?.load().map_err(prog_err(name))?;
        }
        let sched = SchedTable::new(
            take_map(&mut ebpf, maps::SCHED_TABLE)?,
            sched_entries as usize,
        )?;
        let mut dp = Dataplane {
            services: typed_map!(&mut ebpf, HashMap, maps::SERVICES),
            vips: typed_map!(&mut ebpf, HashMap, maps::VIPS),
            vip_filter: typed_map!(&mut ebpf, Array, maps::VIP_FILTER),
            filter: vec![0; VIP_FILTER_SLOTS as usize],
            nat_addrs: Vec::new(),
            servers: typed_map!(&mut ebpf, Array, maps::SERVERS),
            connections: typed_map!(&mut ebpf, HashMap, maps::CONNECTIONS),
            stat: typed_map!(&mut ebpf, PerCpuArray, maps::STAT),
            service_stats: typed_map!(&mut ebpf, PerCpuArray, maps::SERVICE_STATS),
            server_stats: typed_map!(&mut ebpf, PerCpuArray, maps::SERVER_STATS),
            settings: typed_map!(&mut ebpf, Array, maps::SETTINGS),
            decap_sources: typed_map!(&mut ebpf, HashMap, maps::DECAP_SOURCES),
            decap_stat: typed_map!(&mut ebpf, PerCpuArray, maps::DECAP_STAT),
            conn_events: RingBuf::try_from(take_map(&mut ebpf, maps::CONN_EVENTS)?)
                .map_err(map_err(maps::CONN_EVENTS))?,
            sched,
            logger,
            attachments: Vec::new(),
            fallbacks: Vec::new(),
            caps,
            ebpf,
            service_keys: HashSet::new(),
            vip_counts: StdHashMap::new(),
            installed: StdHashMap::new(),
        };
        // Inactive until told otherwise: a fresh ATM passes everything.
        dp.set_settings(&Settings::default())?;
        Ok(dp)
    }

    pub fn capacities(&self) -> Capacities {
        self.caps
    }

    /// Attaches `lb_xdp` to `interface` (of the calling thread's network namespace), through
    /// netlink rather than a BPF link: the program stays attached if the process dies, and
    /// then drops service traffic once its lease runs out (see `Settings::lease_ns`) instead of
    /// leaving it to the stack. Dropping the `Dataplane` detaches it.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<Attached, Error> {
        self.attach_program(programs::LB_XDP, interface, mode)
    }

    /// Attaches `lb_decap` (for a real server in tunnel mode) to `interface`.
    pub fn attach_decap(&mut self, interface: &str, mode: AttachMode) -> Result<Attached, Error> {
        self.attach_program(programs::LB_DECAP, interface, mode)
    }

    fn attach_program(
        &mut self,
        name: &'static str,
        interface: &str,
        mode: AttachMode,
    ) -> Result<Attached, Error> {
        let fd = program(&mut self.ebpf, name)?
            .fd()
            .map_err(prog_err(name))?
            .as_fd()
            .as_raw_fd();
        let err = |mode, source| Error::Attach {
            program: name,
            interface: interface.to_string(),
            mode,
            source,
        };
        let ifindex = nix::net::if_::if_nametoindex(interface)
            .map_err(|e| err("any", std::io::Error::from(e)))?;
        let try_mode = |flags: u32, what: &'static str| -> Result<Attachment, Error> {
            let socket = xdp_link::socket().map_err(|e| err(what, e))?;
            xdp_link::set(&socket, ifindex, Some(fd), flags).map_err(|e| err(what, e))?;
            Ok(Attachment {
                socket,
                ifindex,
                flags,
            })
        };
        let (a, mode) = match mode {
            AttachMode::Driver => (try_mode(xdp_link::DRV_MODE, "driver")?, Attached::Driver),
            AttachMode::Generic => (try_mode(xdp_link::SKB_MODE, "generic")?, Attached::Generic),
            AttachMode::Auto => match try_mode(xdp_link::DRV_MODE, "driver") {
                Ok(a) => (a, Attached::Driver),
                Err(driver) => {
                    let a = try_mode(xdp_link::SKB_MODE, "generic")?;
                    self.fallbacks
                        .push((interface.to_string(), driver.to_string()));
                    (a, Attached::Generic)
                }
            },
        };
        self.attachments.push(a);
        Ok(mode)
    }

    /// Why the last attachments that fell back to generic mode could not be native, by
    /// interface (the kernel's own reason), taken.
    pub fn take_fallbacks(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.fallbacks)
    }

    /// Forgets the interfaces this dataplane's programs are attached to, without detaching
    /// them: another dataplane's programs have replaced them there (a resize), and dropping
    /// this one must not take those away.
    pub fn disown_attachments(&mut self) {
        self.attachments.clear();
    }

    /// Replaces the settings record (timeout, debug, active flag, local and NAT addresses).
    pub fn set_settings(&mut self, s: &Settings) -> Result<(), Error> {
        self.settings
            .set(0, s, 0)
            .map_err(map_err(maps::SETTINGS))?;
        let mut nat: Vec<Addr> = s.nat_pool[..(s.nat_pool_len as usize).min(s.nat_pool.len())]
            .iter()
            .map(|raw| Addr::v4_raw(*raw))
            .collect();
        if !nat.contains(&s.nat_addr) && s.nat_addr != Addr::default() {
            nat.push(s.nat_addr);
        }
        self.nat_addrs = nat;
        self.sync_filter()
    }

    /// The `vip_filter` map's counts, slot by slot (for tests and diagnostics).
    pub fn vip_filter(&self) -> Result<Vec<u32>, Error> {
        (0..VIP_FILTER_SLOTS)
            .map(|i| {
                self.vip_filter
                    .get(&i, 0)
                    .map_err(map_err(maps::VIP_FILTER))
            })
            .collect()
    }

    /// Brings `vip_filter` in line with the VIPs and the NAT address: a slot counts the
    /// addresses that fall in it. Only changed slots are written, so the settings written
    /// every heartbeat cost no more than before.
    fn sync_filter(&mut self) -> Result<(), Error> {
        let mut want = vec![0u32; VIP_FILTER_SLOTS as usize];
        for a in self.vip_counts.keys().chain(self.nat_addrs.iter()) {
            if let Some(raw) = a.as_v4_raw() {
                want[vip_filter_slot(raw) as usize] += 1;
            }
        }
        for (i, (have, want)) in self.filter.iter_mut().zip(want).enumerate() {
            if *have != want {
                self.vip_filter
                    .set(i as u32, want, 0)
                    .map_err(map_err(maps::VIP_FILTER))?;
                *have = want;
            }
        }
        Ok(())
    }

    /// Adds or replaces a service.
    pub fn set_service(&mut self, key: ServiceKey, service: Service) -> Result<(), Error> {
        if service.id >= self.caps.services {
            return Err(Error::Invalid(format!(
                "service id {} is beyond the capacity of {} services",
                service.id, self.caps.services
            )));
        }
        self.services
            .insert(key, service, 0)
            .map_err(map_err(maps::SERVICES))?;
        if self.service_keys.insert(key) {
            let n = self.vip_counts.entry(key.vip).or_default();
            *n += 1;
            let n = *n;
            self.vips
                .insert(key.vip, n, 0)
                .map_err(map_err(maps::VIPS))?;
        }
        self.sync_filter()
    }

    /// Removes a service; removing one that is not there is not an error.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), Error> {
        match self.services.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(maps::SERVICES)(e)),
        }
        if self.service_keys.remove(key) {
            let n = self.vip_counts.entry(key.vip).or_default();
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.vip_counts.remove(&key.vip);
                match self.vips.remove(&key.vip) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(maps::VIPS)(e)),
                }
            } else {
                let n = *n;
                self.vips
                    .insert(key.vip, n, 0)
                    .map_err(map_err(maps::VIPS))?;
            }
        }
        self.sync_filter()
    }

    /// The services as the dataplane has them.
    pub fn services(&self) -> Result<Vec<(ServiceKey, Service)>, Error> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::SERVICES))
    }

    /// Writes server record `index`.
    pub fn set_server(&mut self, index: u32, server: &Server) -> Result<(), Error> {
        self.servers
            .set(index, server, 0)
            .map_err(map_err(maps::SERVERS))
    }

    pub fn server(&self, index: u32) -> Result<Server, Error> {
        self.servers.get(&index, 0).map_err(map_err(maps::SERVERS))
    }

    /// Writes the scheduler row of service `id` (server indices, at most `RING_SIZE`). The
    /// caller then sets the service's `table_len` to `table.len()`.
    pub fn set_table(&mut self, service: u32, table: &[u32]) -> Result<(), Error> {
        if table.len() > RING_SIZE as usize {
            return Err(Error::Invalid(format!(
                "a scheduler row holds at most {RING_SIZE} slots, not {}",
                table.len()
            )));
        }
        if !self.sched.write_row(service, table) {
            return Err(Error::Invalid(format!(
                "service id {service} is beyond the capacity of {} services",
                self.caps.services
            )));
        }
        Ok(())
    }

    /// The first `len` slots of the scheduler row of service `id`.
    pub fn table(&self, service: u32, len: usize) -> Option<Vec<u32>> {
        self.sched.read_row(service, len)
    }

    /// Sets the ATM addresses `lb_decap` accepts IPIP packets from.
    pub fn set_decap_sources(&mut self, atms: &[Addr]) -> Result<(), Error> {
        let old: Vec<Addr> = self
            .decap_sources
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::DECAP_SOURCES))?;
        for a in old.iter().filter(|a| !atms.contains(a)) {
            let _ = self.decap_sources.remove(a);
        }
        for a in atms {
            self.decap_sources
                .insert(a, 1, 0)
                .map_err(map_err(maps::DECAP_SOURCES))?;
        }
        Ok(())
    }

    /// Every entry of the connection table (both legs of NAT connections).
    pub fn connections(&self) -> Result<Vec<(FlowKey, Connection)>, Error> {
        crate::conntable::entries(&self.connections).map_err(map_err(maps::CONNECTIONS))
    }

    /// A handle on the connection table for another thread (see [`crate::conntable`]).
    pub fn conn_table(&self) -> Result<crate::conntable::ConnTable, Error> {
        use aya::maps::IterableMap;
        crate::conntable::ConnTable::open(self.connections.map().fd().as_fd())
            .map_err(map_err(maps::CONNECTIONS))
    }

    pub fn connection(&self, key: &FlowKey) -> Option<Connection> {
        self.connections.get(key, 0).ok()
    }

    /// Installs a connection entry (connection sync on a backup, tests).
    pub fn set_connection(&mut self, key: &FlowKey, conn: &Connection) -> Result<(), Error> {
        self.connections
            .insert(key, conn, 0)
            .map_err(map_err(maps::CONNECTIONS))
    }

    /// Removes the connection entries `pick` picks; returns how many went.
    pub fn remove_connections_where(
        &mut self,
        pick: impl Fn(&Connection) -> bool,
    ) -> Result<usize, Error> {
        crate::conntable::remove_where(&mut self.connections, pick)
            .map_err(map_err(maps::CONNECTIONS))
    }

    /// The global counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, Error> {
        let mut out = Stats::default();
        for (i, slot) in out.0.iter_mut().enumerate() {
            let per_cpu = self.stat.get(&(i as u32), 0).map_err(map_err(maps::STAT))?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// lb_decap's counters, summed over CPUs, indexed by [`DecapStat`].
    pub fn decap_stats(&self) -> Result<[u64; DecapStat::COUNT as usize], Error> {
        let mut out = [0u64; DecapStat::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self
                .decap_stat
                .get(&(i as u32), 0)
                .map_err(map_err(maps::DECAP_STAT))?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Packets and bytes of service `id`, summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<Counters, Error> {
        sum_counters(&self.service_stats, id, maps::SERVICE_STATS)
    }

    /// Packets and bytes of server `index`, summed over CPUs.
    pub fn server_counters(&self, index: u32) -> Result<Counters, Error> {
        sum_counters(&self.server_stats, index, maps::SERVER_STATS)
    }

    /// Programs service `id`: its server records, its scheduler row from the servers that
    /// are up, then the service record itself (so the row is complete before any packet can
    /// index it).
    pub fn install(&mut self, id: u32, spec: &ServiceSpec) -> Result<(), Error> {
        self.install_row(id, spec, &row(spec))
    }

    /// [`Dataplane::install`] with the scheduler row already computed by [`row`] (beside
    /// the event loop: a Maglev ring takes a millisecond or two).
    pub fn install_row(&mut self, id: u32, spec: &ServiceSpec, row: &[u32]) -> Result<(), Error> {
        self.write_servers(id, spec, 0..spec.servers.len())?;
        self.publish_row(id, spec, row)
    }

    /// The first part of installing service `id`: server records `range` of `spec`. A
    /// service is installed piece by piece this way (a reload bounds each piece of work on
    /// the event loop), then published with [`Dataplane::publish_row`].
    pub fn write_servers(
        &mut self,
        id: u32,
        spec: &ServiceSpec,
        range: std::ops::Range<usize>,
    ) -> Result<(), Error> {
        if let Some(s) = spec.servers.iter().find(|s| s.index >= self.caps.servers) {
            return Err(Error::Invalid(format!(
                "server index {} is beyond the capacity of {} servers",
                s.index, self.caps.servers
            )));
        }
        if id >= self.caps.services {
            return Err(Error::Invalid(format!(
                "service id {id} is beyond the capacity of {} services",
                self.caps.services
            )));
        }
        if range.start == 0
            && let Some(old) = self.installed.get(&id)
            && old.spec.key() != spec.key()
        {
            // The id served another VIP:port: that one goes before its servers change.
            let old_key = old.spec.key();
            self.remove_service(&old_key)?;
        }
        for s in spec.servers.get(range).unwrap_or_default() {
            let record = Server {
                addr: s.addr.into(),
                vip: spec.vip.into(),
                port: s.port.to_be(),
                vport: spec.port.to_be(),
                method: s.method as u8,
                flags: if s.up { SERVER_UP } else { 0 },
                proto: spec.proto,
                weight: s.weight,
                service: id,
                ..Default::default()
            };
            self.set_server(s.index, &record)?;
        }
        Ok(())
    }

    /// The last part of installing service `id`: its row (from [`row`]), then its record.
    pub fn publish_row(&mut self, id: u32, spec: &ServiceSpec, row: &[u32]) -> Result<(), Error> {
        self.installed.insert(id, Installed { spec: spec.clone() });
        self.publish(id, row)
    }

    /// The spec service `id` was last installed with.
    pub fn installed(&self, id: u32) -> Option<&ServiceSpec> {
        self.installed.get(&id).map(|i| &i.spec)
    }

    /// Marks server record `index` down (a line that left with a reload): the dataplane
    /// forwards a connection without asking `services` only while its server is up.
    pub fn mark_down(&mut self, index: u32) -> Result<(), Error> {
        let mut record = self.server(index)?;
        if record.flags & SERVER_UP != 0 {
            record.flags &= !SERVER_UP;
            self.set_server(index, &record)?;
        }
        Ok(())
    }

    /// Marks server `pos` of service `id` up or down and sets its weight, then rebuilds the
    /// service's row: a server that went down leaves the table at once.
    pub fn set_server_state(
        &mut self,
        id: u32,
        pos: usize,
        up: bool,
        weight: u32,
    ) -> Result<(), Error> {
        let inst = self
            .installed
            .get_mut(&id)
            .ok_or_else(|| Error::Invalid(format!("no service with id {id}")))?;
        let s = inst
            .spec
            .servers
            .get_mut(pos)
            .ok_or_else(|| Error::Invalid(format!("service {id} has no server {pos}")))?;
        s.up = up;
        s.weight = weight;
        let index = s.index;
        let mut record = self.server(index)?;
        record.flags = if up { SERVER_UP } else { 0 };
        record.weight = weight;
        self.set_server(index, &record)?;
        let row = row(&self.installed[&id].spec);
        self.publish(id, &row)
    }

    /// Writes service `id`'s row, then republishes its record with the row's length.
    fn publish(&mut self, id: u32, row: &[u32]) -> Result<(), Error> {
        let spec = &self.installed[&id].spec;
        let key = spec.key();
        let record = Service {
            id,
            table_len: row.len() as u32,
            persistence_s: spec.persistence_s,
            sched: spec.sched as u8,
            flags: 0,
            _pad: [0; 2],
        };
        self.set_table(id, row)?;
        self.set_service(key, record)
    }

    /// Removes service `id` installed with [`Dataplane::install`], and marks its servers
    /// down: a connection is forwarded without asking `services` only while its server is
    /// up, so none of the service's connections is forwarded any more. (A server index
    /// already given to another service is left alone.)
    pub fn uninstall(&mut self, id: u32) -> Result<(), Error> {
        if let Some(inst) = self.installed.remove(&id) {
            self.remove_service(&inst.spec.key())?;
            for s in &inst.spec.servers {
                let mut record = self.server(s.index)?;
                if record.service == id && record.flags & SERVER_UP != 0 {
                    record.flags &= !SERVER_UP;
                    self.set_server(s.index, &record)?;
                }
            }
        }
        Ok(())
    }

    /// The connection events reported since the last call (oldest first).
    pub fn drain_events(&mut self) -> Vec<ConnEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.conn_events.next() {
            if item.len() >= std::mem::size_of::<ConnEvent>() {
                // SAFETY: the program writes exactly one ConnEvent per record; read unaligned
                // because ring buffer records are only 8-byte aligned by convention.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ConnEvent>()) });
            }
        }
        out
    }

    /// Hands the programs' pending log records to the logger.
    pub fn flush_log(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    /// Runs `lb_xdp` once on `frame` (BPF_PROG_TEST_RUN) as if it arrived on interface
    /// `ingress_ifindex` of the caller's network namespace; returns the XDP action and the
    /// frame as the program left it.
    pub fn test_run(&self, frame: &[u8], ingress_ifindex: u32) -> Result<(u32, Vec<u8>), Error> {
        test_run(
            self.program(programs::LB_XDP)?,
            programs::LB_XDP,
            frame,
            ingress_ifindex,
        )
    }

    /// Runs `lb_xdp` on `frame` in `mode` (timings, live frames).
    pub fn run(
        &self,
        frame: &[u8],
        ingress_ifindex: u32,
        mode: RunMode,
    ) -> Result<RunResult, Error> {
        run_xdp(
            self.program(programs::LB_XDP)?,
            frame,
            ingress_ifindex,
            mode,
        )
        .map_err(prog_err(programs::LB_XDP))
    }

    /// Like [`Dataplane::test_run`], for `lb_decap`.
    pub fn test_run_decap(
        &self,
        frame: &[u8],
        ingress_ifindex: u32,
    ) -> Result<(u32, Vec<u8>), Error> {
        test_run(
            self.program(programs::LB_DECAP)?,
            programs::LB_DECAP,
            frame,
            ingress_ifindex,
        )
    }

    fn program(&self, name: &'static str) -> Result<&Xdp, Error> {
        self.ebpf
            .program(name)
            .ok_or(Error::Missing {
                kind: "program",
                name,
            })?
            .try_into()
            .map_err(prog_err(name))
    }
}

fn sum_counters(
    map: &PerCpuArray<MapData, Counters>,
    index: u32,
    name: &'static str,
) -> Result<Counters, Error> {
    let per_cpu = map.get(&index, 0).map_err(map_err(name))?;
    Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
    }))
}

/// Forwards to whatever logger is installed when the record arrives.
struct GlobalLog;

impl log::Log for GlobalLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        log::logger().enabled(m)
    }
    fn log(&self, r: &log::Record) {
        log::logger().log(r)
    }
    fn flush(&self) {
        log::logger().flush()
    }
}

/// The dataplane's clock as userspace sees it (CLOCK_MONOTONIC; the dataplane reads the
/// coarse variant, at most a tick behind), to age connection entries.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into ts.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Lets `bpf_fib_lookup` answer in the calling thread's network namespace without turning on
/// forwarding anywhere that matters: the dataplane asks the FIB as if from `lo`, and the
/// helper refuses unless that interface has forwarding on. `lo` only ever receives local
/// traffic, so its flag makes the kernel forward nothing; IPv4 forwarding can stay off on
/// every real interface.
pub fn enable_fib_lookup() -> Result<(), Error> {
    let path = "/proc/sys/net/ipv4/conf/lo/forwarding";
    std::fs::write(path, "1").map_err(|source| Error::Io {
        what: format!("writing 1 to {path}"),
        source,
    })
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, Error> {
    ebpf.program_mut(name)
        .ok_or(Error::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(prog_err(name))
}

/// An XDP program set on an interface through netlink.
struct Attachment {
    /// A netlink socket of the namespace the interface is in (interface indices are per
    /// namespace), kept to detach from the right one.
    socket: netlink_sys::Socket,
    ifindex: u32,
    flags: u32,
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        for a in &self.attachments {
            // The interface may be gone already (its namespace deleted): nothing to undo.
            let _ = xdp_link::set(&a.socket, a.ifindex, None, a.flags);
        }
    }
}

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it in `ctx_in`.
#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Room for what a program may add in front (IPIP) beyond the input length.
const TEST_RUN_GROWTH: usize = 256;

fn test_run(
    prog: &Xdp,
    name: &'static str,
    frame: &[u8],
    ingress_ifindex: u32,
) -> Result<(u32, Vec<u8>), Error> {
    let r = run_xdp(prog, frame, ingress_ifindex, RunMode::Once).map_err(prog_err(name))?;
    Ok((r.action, r.frame))
}

/// How to run a program with BPF_PROG_TEST_RUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Once, returning the frame as the program left it.
    Once,
    /// `n` times over (each run sees what the previous one left), for a timing.
    Repeat(u32),
    /// `n` times as live frames in batches of `batch`: the verdicts are carried out (XDP_TX
    /// sends the frame out of the ingress interface), which makes a packet generator.
    Live { n: u32, batch: u32 },
}

/// What a test run gave.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub action: u32,
    /// The frame as left by the last run (empty in live mode).
    pub frame: Vec<u8>,
    /// The kernel's time per run.
    pub per_run: std::time::Duration,
}

/// Runs an XDP program on `frame` as if it arrived on `ingress_ifindex` of the calling
/// thread's namespace. The fixture tests, the dataplane API and the benchmarks share it.
pub fn run_xdp(
    prog: &Xdp,
    frame: &[u8],
    ingress_ifindex: u32,
    mode: RunMode,
) -> Result<RunResult, ProgramError> {
    let md = XdpMd {
        data: 0,
        data_end: frame.len() as u32,
        data_meta: 0,
        ingress_ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    };
    // SAFETY: XdpMd is repr(C), plain integers, no padding.
    let ctx = unsafe {
        std::slice::from_raw_parts(
            (&md as *const XdpMd).cast::<u8>(),
            std::mem::size_of::<XdpMd>(),
        )
    };
    let live = matches!(mode, RunMode::Live { .. });
    let mut out = if live {
        Vec::new()
    } else {
        vec![0u8; frame.len() + TEST_RUN_GROWTH]
    };
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(ctx);
    match mode {
        RunMode::Once => opts.repeat = 1,
        RunMode::Repeat(n) => opts.repeat = n,
        RunMode::Live { n, batch } => {
            opts.repeat = n;
            opts.attrs = opts.attrs.xdp_live_frames(batch);
        }
    }
    if !live {
        opts.data_out = Some(&mut out);
    }
    let res = prog.test_run(opts)?;
    out.truncate(res.data_size_out as usize);
    Ok(RunResult {
        action: res.return_value,
        frame: out,
        per_run: res.duration,
    })
}
