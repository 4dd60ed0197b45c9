//! The typed interface to the XDP programs: load the embedded object with the capacities of
//! the `config` table, attach the programs to interfaces, program services, servers and
//! scheduler rows, read connections and counters, and run a program on a frame through
//! BPF_PROG_TEST_RUN. The daemon and the tests use the same calls.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::{ProgramError, Xdp},
};
use aya_log::EbpfLogger;
use lb_common::{
    Addr, ConnEvent, Connection, Counters, DecapStat, FlowKey, Persist, PersistKey, Server,
    ServerLoad, Service, ServiceKey, Settings, Stat, StatBlock, VIP_FILTER_SLOTS, maps, programs,
    ring_pool_pages, vip_filter_slot, xdp_link,
};

/// The eBPF object built by build.rs from the `lb-ebpf` crate.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// (Only with the `testing` feature: the daemon never loads it.)
/// The benchmarks' eBPF object, built beside [`OBJECT`] from the `lb-ebpf` crate's
/// `lb-bench-progs` binary: `bare_fwd`, `gen_tx`, `bench_nop` and `sink_count`, with their
/// maps (names and types in `lb_common::bench`). The daemon never loads it; `lb-bench` does.
#[cfg(feature = "testing")]
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

/// What [`Dataplane::load_kept`] found in its directory.
#[derive(Debug, PartialEq, Eq)]
pub enum Kept {
    /// Nothing pinned: new maps, pinned there now.
    Fresh,
    /// The pinned maps, holding this many connection entries (NAT reply legs included).
    Adopted { connections: usize },
    /// Pinned maps that could not be taken (why): replaced by new ones.
    Replaced(String),
}

/// Capacities of the maps: the `config` table (defined with the config, which reads it).
pub use lb_api::Capacities;

mod install;
pub mod kept;
mod sched_table;
#[cfg(feature = "testing")]
mod test_run;

use install::Installed;
pub use install::{ServerSpec, ServiceSpec, row};
use sched_table::SchedTable;
#[cfg(feature = "testing")]
pub use test_run::{RunMode, RunResult, run_xdp};

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

// SAFETY: the mapping is plain shared memory owned by this value; writes go through &mut self.
unsafe impl Send for SchedTable {}

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
    persistence: HashMap<MapData, PersistKey, Persist>,
    flow_cache: Array<MapData, lb_common::CachedFlow>,
    flow_cache6: Array<MapData, lb_common::CachedFlow6>,
    /// The flow caches' generation (`Settings::flow_gen`), and whether the last settings
    /// written had lb_xdp forward.
    flow_gen: u32,
    active: bool,
    stat: PerCpuArray<MapData, StatBlock>,
    service_stats: PerCpuArray<MapData, Counters>,
    server_stats: PerCpuArray<MapData, Counters>,
    /// Connections opened and closed per server, and those gone otherwise (see
    /// [`LoadTables`]).
    server_load: Array<MapData, ServerLoad>,
    server_gone: Array<MapData, u64>,
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
        Self::load_inner(caps, log, None)
    }

    /// Loads the object with the given capacities, keeping its connection state pinned in
    /// `dir` ([`kept`]): the maps pinned there are taken if they fit this build and `caps`,
    /// and otherwise replaced (the answer says why).
    pub fn load_kept(caps: Capacities, dir: &Path) -> Result<(Self, Kept), Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let found = kept::check(dir, caps);
        let adopt = found == kept::Pinned::Adoptable;
        let dp = Self::load_inner(caps, Box::new(GlobalLog), Some((dir, adopt)))?;
        let kept = match found {
            kept::Pinned::Adoptable => Kept::Adopted {
                connections: dp.connections.keys().count(),
            },
            kept::Pinned::Unusable(why) => Kept::Replaced(why),
            kept::Pinned::Nothing => Kept::Fresh,
        };
        Ok((dp, kept))
    }

    fn load_inner(
        caps: Capacities,
        log: Box<dyn log::Log>,
        pins: Option<(&Path, bool)>,
    ) -> Result<Self, Error> {
        if caps.services == 0 || caps.servers == 0 || caps.connections == 0 {
            return Err(Error::Invalid(format!(
                "capacities must be at least 1: {caps:?}"
            )));
        }
        let sched_pages = ring_pool_pages(caps.services, caps.servers);
        // Each CPU's flow cache slots in one array.
        let cpus = aya::util::nr_cpus().map_err(|(what, source)| Error::Io {
            what: what.to_string(),
            source,
        })? as u32;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(maps::SERVICES, caps.services)
            .map_max_entries(maps::VIPS, caps.services)
            .map_max_entries(maps::SERVERS, caps.servers)
            .map_max_entries(maps::SCHED_TABLE, sched_pages)
            .map_max_entries(maps::FLOW_CACHE, cpus * lb_common::FLOW_CACHE_SLOTS)
            .map_max_entries(maps::FLOW_CACHE6, cpus * lb_common::FLOW_CACHE_SLOTS)
            .map_max_entries(maps::RR_CURSOR, caps.services)
            .map_max_entries(maps::CONNECTIONS, caps.connections)
            .map_max_entries(maps::PERSISTENCE, caps.connections)
            .map_max_entries(maps::NEW_RATE, caps.services)
            .map_max_entries(maps::SOURCE_RATE, caps.connections)
            .map_max_entries(maps::SERVICE_STATS, caps.services)
            .map_max_entries(maps::SERVER_STATS, caps.servers)
            .map_max_entries(maps::SERVER_LOAD, caps.servers)
            .map_max_entries(maps::SERVER_GONE, caps.servers)
            .map_max_entries(maps::NAT_FULL, caps.servers);
        if let Some((dir, true)) = pins {
            for (name, ..) in kept::KEPT {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        // The logger must exist before the programs load: it owns the ring buffer they use.
        let logger = EbpfLogger::init_with_logger(&mut ebpf, log).ok();
        for name in [programs::LB_XDP, programs::LB_DECAP] {
            program(&mut ebpf, name)?.load().map_err(prog_err(name))?;
        }
        let sched = SchedTable::new(
            take_map(&mut ebpf, maps::SCHED_TABLE)?,
            sched_pages as usize,
        )?;
        let mut dp = Dataplane {
            services: typed_map!(&mut ebpf, HashMap, maps::SERVICES),
            vips: typed_map!(&mut ebpf, HashMap, maps::VIPS),
            vip_filter: typed_map!(&mut ebpf, Array, maps::VIP_FILTER),
            filter: vec![0; VIP_FILTER_SLOTS as usize],
            nat_addrs: Vec::new(),
            servers: typed_map!(&mut ebpf, Array, maps::SERVERS),
            connections: typed_map!(&mut ebpf, HashMap, maps::CONNECTIONS),
            persistence: typed_map!(&mut ebpf, HashMap, maps::PERSISTENCE),
            flow_cache: typed_map!(&mut ebpf, Array, maps::FLOW_CACHE),
            flow_cache6: typed_map!(&mut ebpf, Array, maps::FLOW_CACHE6),
            flow_gen: 0,
            active: false,
            stat: typed_map!(&mut ebpf, PerCpuArray, maps::STAT),
            service_stats: typed_map!(&mut ebpf, PerCpuArray, maps::SERVICE_STATS),
            server_stats: typed_map!(&mut ebpf, PerCpuArray, maps::SERVER_STATS),
            server_load: typed_map!(&mut ebpf, Array, maps::SERVER_LOAD),
            server_gone: typed_map!(&mut ebpf, Array, maps::SERVER_GONE),
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
        // New maps: pinned in place of whatever was there.
        if let Some((dir, false)) = pins {
            dp.pin_kept(dir)?;
        }
        Ok(dp)
    }

    /// Pins this dataplane's kept maps ([`kept::KEPT`]) in `dir`, in place of whatever is
    /// pinned there: after a resize, the new maps are the ones a restart is to find.
    pub fn pin_kept(&self, dir: &Path) -> Result<(), Error> {
        let io = |what: String| {
            move |e: MapError| Error::Io {
                what,
                source: std::io::Error::other(e.to_string()),
            }
        };
        for id in self.map_ids()? {
            let map = MapData::from_id(id).map_err(io(format!("opening map {id}")))?;
            let info = map.info().map_err(io(format!("reading map {id}")))?;
            let Some(name) = info.name_as_str() else {
                continue;
            };
            if !kept::KEPT.iter().any(|(k, ..)| *k == name) {
                continue;
            }
            let path = dir.join(name);
            let _ = std::fs::remove_file(&path);
            map.pin(&path).map_err(|e| Error::Io {
                what: format!("pinning {name} at {}", path.display()),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        Ok(())
    }

    pub fn capacities(&self) -> Capacities {
        self.caps
    }

    /// The kernel's ids of lb_xdp's maps (for `bpftool map show id N`).
    pub fn map_ids(&self) -> Result<Vec<u32>, Error> {
        let name = programs::LB_XDP;
        let prog: &Xdp = as_xdp(self.ebpf.program(name), name)?;
        let ids = prog
            .info()
            .and_then(|i| i.map_ids())
            .map_err(prog_err(name))?;
        Ok(ids.unwrap_or_default())
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
        // The flow caches start a generation whenever lb_xdp starts forwarding: what they
        // hold from an earlier time as primary may no longer be so.
        let active = s.flags & lb_common::SETTINGS_ACTIVE != 0;
        let generation = if active && !self.active {
            self.flow_gen.wrapping_add(1)
        } else {
            self.flow_gen
        };
        let s = &Settings {
            flow_gen: generation,
            ..*s
        };
        self.settings
            .set(0, s, 0)
            .map_err(map_err(maps::SETTINGS))?;
        (self.flow_gen, self.active) = (generation, active);
        let mut nat: Vec<Addr> = s.nat_pool[..(s.nat_pool_len as usize).min(s.nat_pool.len())]
            .iter()
            .map(|raw| Addr::v4_raw(*raw))
            .collect();
        for a in [s.nat_addr, s.nat_addr6] {
            if !nat.contains(&a) && a != Addr::default() {
                nat.push(a);
            }
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
        // An IPv6 address falls in the slot of its last byte, as an IPv4 one does.
        for a in self.vip_counts.keys().chain(self.nat_addrs.iter()) {
            want[vip_filter_slot(a.w[3]) as usize] += 1;
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

    /// The services as the dataplane has them (for the fixture tests).
    #[cfg(feature = "testing")]
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

    /// The first `len` slots of the scheduler row of service `id` (for the fixture tests).
    #[cfg(feature = "testing")]
    pub fn table(&self, service: u32, len: usize) -> Option<Vec<u32>> {
        self.sched
            .read_row(&self.installed.get(&service)?.pages, len)
    }

    /// Pages of the scheduler rows' pool (4 KiB each), and how many no row holds.
    pub fn ring_pages(&self) -> (usize, usize) {
        self.sched.pages()
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

    /// Every entry of the connection table (both legs of NAT connections), with what the
    /// CPUs' flow caches forwarded of it taken in.
    pub fn connections(&self) -> Result<Vec<(FlowKey, Connection)>, Error> {
        let mut all =
            crate::conntable::entries(&self.connections).map_err(map_err(maps::CONNECTIONS))?;
        crate::conntable::merge_pending(&mut all, &self.pending()?);
        Ok(all)
    }

    /// What the CPUs' flow caches forwarded that the connection table has not seen yet.
    fn pending(&self) -> Result<StdHashMap<FlowKey, lb_common::CachedFlow6>, Error> {
        use aya::maps::IterableMap;
        crate::conntable::pending(
            self.flow_cache.map().fd().as_fd().as_raw_fd(),
            self.flow_cache6.map().fd().as_fd().as_raw_fd(),
        )
        .map_err(|e| Error::Io {
            what: format!(
                "reading maps {} and {}",
                maps::FLOW_CACHE,
                maps::FLOW_CACHE6
            ),
            source: e,
        })
    }

    /// A handle on the connection table for another thread (see [`crate::conntable`]).
    pub fn conn_table(&self) -> Result<crate::conntable::ConnTable, Error> {
        use aya::maps::IterableMap;
        crate::conntable::ConnTable::open(
            self.connections.map().fd().as_fd(),
            self.flow_cache.map().fd().as_fd(),
            self.flow_cache6.map().fd().as_fd(),
        )
        .map_err(map_err(maps::CONNECTIONS))
    }

    /// Connection `key`, with what the CPUs' flow caches forwarded of it taken in: one
    /// lookup of its slot, which holds it on any CPU that cached it.
    pub fn connection(&self, key: &FlowKey) -> Option<Connection> {
        let mut c = self.connections.get(key, 0).ok()?;
        if let (Some(saddr), Some(daddr)) = (key.src.as_v4_raw(), key.dst.as_v4_raw()) {
            let slot = lb_common::flow_cache_slot(saddr, daddr, key.sport, key.dport);
            for f in on_every_cpu(&self.flow_cache, slot) {
                if f.daddr != 0 && f.key() == *key {
                    f.merge_into(&mut c);
                }
            }
        } else {
            for f in on_every_cpu(&self.flow_cache6, lb_common::flow_cache_slot6(key)) {
                if f.key.proto != 0 && f.key.same(key) {
                    f.merge_into(&mut c);
                }
            }
        }
        Some(c)
    }

    /// Connection `key` as the shared entry has it, without what the flow caches
    /// forwarded since (for the fixture tests).
    #[cfg(feature = "testing")]
    pub fn connection_entry(&self, key: &FlowKey) -> Option<Connection> {
        self.connections.get(key, 0).ok()
    }

    /// Installs a connection entry (connection sync on a backup, tests).
    pub fn set_connection(&mut self, key: &FlowKey, conn: &Connection) -> Result<(), Error> {
        self.connections
            .insert(key, conn, 0)
            .map_err(map_err(maps::CONNECTIONS))
    }

    /// A persistence entry: which server a client (or client prefix) sticks to.
    pub fn persist(&self, key: &PersistKey) -> Option<Persist> {
        self.persistence.get(key, 0).ok()
    }

    /// Every persistence entry, read through a handle of its own (`entries` on a blocking
    /// thread: a full sync sends them).
    pub fn persist_table(&self) -> Result<PersistTable, Error> {
        use aya::maps::IterableMap;
        let map = dup_map(self.persistence.map(), maps::PERSISTENCE)?;
        Ok(PersistTable(
            HashMap::try_from(Map::LruHashMap(map)).map_err(map_err(maps::PERSISTENCE))?,
        ))
    }

    /// Installs a persistence entry (connection sync on a backup).
    pub fn set_persist(&mut self, key: &PersistKey, p: &Persist) -> Result<(), Error> {
        self.persistence
            .insert(key, p, 0)
            .map_err(map_err(maps::PERSISTENCE))
    }

    /// The global counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, Error> {
        let mut out = Stats::default();
        let per_cpu = self.stat.get(&0, 0).map_err(map_err(maps::STAT))?;
        for block in per_cpu.iter() {
            for (sum, n) in out.0.iter_mut().zip(block.0) {
                *sum += n;
            }
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

    /// The services' and servers' counters through handles of their own, to be read beside
    /// the event loop: one system call per server, and there may be 65,536.
    pub fn counter_tables(&self) -> Result<CounterTables, Error> {
        use aya::maps::IterableMap;
        let open = |m: &MapData, name: &'static str| {
            PerCpuArray::try_from(Map::PerCpuArray(dup_map(m, name)?)).map_err(map_err(name))
        };
        Ok(CounterTables {
            services: open(self.service_stats.map(), maps::SERVICE_STATS)?,
            servers: open(self.server_stats.map(), maps::SERVER_STATS)?,
        })
    }

    /// The servers' connection counts through handles of their own, for the sweep beside
    /// the event loop (see [`LoadTables`]).
    pub fn load_tables(&self) -> Result<LoadTables, Error> {
        use aya::maps::IterableMap;
        let dup = dup_map;
        Ok(LoadTables {
            load: Array::try_from(Map::Array(dup(self.server_load.map(), maps::SERVER_LOAD)?))
                .map_err(map_err(maps::SERVER_LOAD))?,
            gone: Array::try_from(Map::Array(dup(self.server_gone.map(), maps::SERVER_GONE)?))
                .map_err(map_err(maps::SERVER_GONE))?,
            servers: self.caps.servers,
        })
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

/// Where the services' and servers' packet counts are read from.
pub trait Counts {
    /// Service `id`'s packets and bytes (zero if they cannot be read).
    fn service(&self, id: u32) -> Counters;
    /// Server line `index`'s packets and bytes (zero if they cannot be read).
    fn server(&self, index: u32) -> Counters;
}

impl Counts for Dataplane {
    fn service(&self, id: u32) -> Counters {
        self.service_counters(id).unwrap_or_default()
    }
    fn server(&self, index: u32) -> Counters {
        self.server_counters(index).unwrap_or_default()
    }
}

/// A second handle on map `m` (named `name` in errors), which may leave the event loop.
fn dup_map(m: &MapData, name: &'static str) -> Result<MapData, Error> {
    let own = m.fd().as_fd().try_clone_to_owned().map_err(|e| Error::Io {
        what: format!("dup of map {name}"),
        source: e,
    })?;
    MapData::from_fd(own).map_err(map_err(name))
}

/// The persistence map through a handle of its own ([`Dataplane::persist_table`]).
pub struct PersistTable(HashMap<MapData, PersistKey, Persist>);

impl PersistTable {
    /// Every entry; one that goes while the map is walked is skipped.
    pub fn entries(&self) -> Vec<(PersistKey, Persist)> {
        self.0.iter().filter_map(Result::ok).collect()
    }
}

/// The servers' connection counts, as the least-connection schedulers read them: lb_xdp
/// counts the connections each server opened and those closed by FIN or RST
/// (`server_load`); the others end unseen by it (idle past the timeout, evicted, dropped
/// by the daemon), so at each sweep the daemon writes how many those are (`server_gone`):
/// opened - closed - the live ones it counted in the table. It reads the counts before it
/// walks the table, so a connection opened meanwhile is counted live and not opened, and
/// the server looks one busier until the next sweep; never less busy than it is.
pub struct LoadTables {
    load: Array<MapData, ServerLoad>,
    gone: Array<MapData, u64>,
    servers: u32,
}

impl LoadTables {
    /// Every server's counts, to be read before the table is walked.
    pub fn read(&self) -> Vec<ServerLoad> {
        (0..self.servers)
            .map(|i| self.load.get(&i, 0).unwrap_or_default())
            .collect()
    }

    /// Writes each server's gone count from `loads` (read before the walk) and `live`, its
    /// live open connections found by the walk; only those that changed.
    pub fn settle(
        &mut self,
        loads: &[ServerLoad],
        live: &StdHashMap<u32, u64>,
    ) -> Result<(), Error> {
        for (i, l) in loads.iter().enumerate() {
            let i = i as u32;
            let gone = l.gone(live.get(&i).copied().unwrap_or(0));
            if self.gone.get(&i, 0).ok() != Some(gone) {
                self.gone
                    .set(i, gone, 0)
                    .map_err(map_err(maps::SERVER_GONE))?;
            }
        }
        Ok(())
    }
}

/// The counters through handles that may leave the event loop (see
/// [`Dataplane::counter_tables`]).
pub struct CounterTables {
    services: PerCpuArray<MapData, Counters>,
    servers: PerCpuArray<MapData, Counters>,
}

impl Counts for CounterTables {
    fn service(&self, id: u32) -> Counters {
        sum_counters(&self.services, id, maps::SERVICE_STATS).unwrap_or_default()
    }
    fn server(&self, index: u32) -> Counters {
        sum_counters(&self.servers, index, maps::SERVER_STATS).unwrap_or_default()
    }
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

/// One tick of the coarse clock in nanoseconds (1e9 / HZ, its resolution): the rate at
/// which lb_xdp works its clock out from jiffies (`Settings::tick_ns`).
pub fn tick_ns() -> u64 {
    coarse_clock(libc::clock_getres)
}

/// The dataplane's clock as userspace sees it: CLOCK_MONOTONIC_COARSE, which is what
/// `bpf_ktime_get_coarse_ns` reads and lb_xdp's jiffies clock follows within a tick. (The
/// fine clock runs up to a tick ahead of it: an entry installed with its time looked 2^64
/// ns old to the dataplane for that tick.)
pub fn now_ns() -> u64 {
    coarse_clock(libc::clock_gettime)
}

/// `call` (clock_gettime or clock_getres) on CLOCK_MONOTONIC_COARSE, in nanoseconds.
fn coarse_clock(call: unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> i32) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both calls only write into ts.
    unsafe { call(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Lets `bpf_fib_lookup` answer in the calling thread's network namespace without turning on
/// forwarding anywhere that matters: the dataplane asks the FIB as if from `lo`, and the
/// helper refuses unless that interface has forwarding on. `lo` only ever receives local
/// traffic, so its flag makes the kernel forward nothing; IPv4 and IPv6 forwarding can stay
/// off on every real interface.
pub fn enable_fib_lookup() -> Result<(), Error> {
    let write = |path: &str| {
        std::fs::write(path, "1").map_err(|source| Error::Io {
            what: format!("writing 1 to {path}"),
            source,
        })
    };
    write("/proc/sys/net/ipv4/conf/lo/forwarding")?;
    // IPv6's lookups ask the same of lo's IPv6 side, which a kernel without IPv6 lacks.
    let v6 = "/proc/sys/net/ipv6/conf/lo/forwarding";
    if std::path::Path::new(v6).exists() {
        write(v6)?;
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, Error> {
    as_xdp(ebpf.program_mut(name), name)
}

/// Program `name` as found in an object (`&Program` or `&mut Program`), as an XDP program.
fn as_xdp<P, X>(found: Option<P>, name: &'static str) -> Result<X, Error>
where
    P: TryInto<X, Error = ProgramError>,
{
    found
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

/// Flow cache slot `slot` of each CPU, from `cache` (every CPU's slots in one array).
fn on_every_cpu<T: aya::Pod>(cache: &Array<MapData, T>, slot: u32) -> impl Iterator<Item = T> + '_ {
    (0..)
        .map(move |cpu| cache.get(&(cpu * lb_common::FLOW_CACHE_SLOTS + slot), 0))
        .map_while(Result::ok)
}
