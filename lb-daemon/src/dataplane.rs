//! The typed interface to the XDP programs: load the embedded object, attach it to interfaces,
//! program its maps, read its counters, and run it on a frame through BPF_PROG_TEST_RUN.
//! The daemon and the tests use the same calls.

// aya's ProgramError and MapError are large; these errors are rare and far from any packet.
#![allow(clippy::result_large_err)]

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode},
};
use lb_common::{Service, ServiceKey, Stat, maps, programs};

/// The eBPF object built by build.rs from the `lb-ebpf` crate.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no {kind} named {name:?}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {program} to {interface} in {mode} mode failed: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

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

/// A loaded balancer: the `lb_xdp` program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, Service>,
    stat: PerCpuArray<MapData, u64>,
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

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { name, source }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name)
        .ok_or(Error::Missing { kind: "map", name })
}

impl Dataplane {
    /// Loads the object and the `lb_xdp` program (not yet attached anywhere).
    pub fn load() -> Result<Self, Error> {
        let mut ebpf = EbpfLoader::new().load(OBJECT)?;
        {
            let prog: &mut Xdp = program(&mut ebpf, programs::LB_XDP)?;
            prog.load().map_err(|source| Error::Program {
                name: programs::LB_XDP,
                source,
            })?;
        }
        let services = HashMap::try_from(take_map(&mut ebpf, maps::SERVICES)?)
            .map_err(map_err(maps::SERVICES))?;
        let stat =
            PerCpuArray::try_from(take_map(&mut ebpf, maps::STAT)?).map_err(map_err(maps::STAT))?;
        Ok(Dataplane {
            ebpf,
            services,
            stat,
        })
    }

    /// Attaches `lb_xdp` to `interface`. The attachment lives as long as the `Dataplane`.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<Attached, Error> {
        let prog: &mut Xdp = program(&mut self.ebpf, programs::LB_XDP)?;
        attach(prog, programs::LB_XDP, interface, mode)
    }

    /// Adds or replaces a service.
    pub fn set_service(&mut self, key: ServiceKey, service: Service) -> Result<(), Error> {
        self.services
            .insert(key, service, 0)
            .map_err(map_err(maps::SERVICES))
    }

    /// Removes a service; removing one that is not there is not an error.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), Error> {
        match self.services.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(maps::SERVICES)(e)),
        }
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

    /// Runs `lb_xdp` once on `frame` (BPF_PROG_TEST_RUN) as if it arrived on the interface
    /// `ingress_ifindex` of the caller's network namespace; returns the XDP action and the
    /// frame as the program left it.
    pub fn test_run(&self, frame: &[u8], ingress_ifindex: u32) -> Result<(u32, Vec<u8>), Error> {
        let prog: &Xdp = self
            .ebpf
            .program(programs::LB_XDP)
            .ok_or(Error::Missing {
                kind: "program",
                name: programs::LB_XDP,
            })?
            .try_into()
            .map_err(|source| Error::Program {
                name: programs::LB_XDP,
                source,
            })?;
        test_run(prog, programs::LB_XDP, frame, ingress_ifindex)
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, Error> {
    ebpf.program_mut(name)
        .ok_or(Error::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn attach(
    prog: &mut Xdp,
    name: &'static str,
    interface: &str,
    mode: AttachMode,
) -> Result<Attached, Error> {
    let err = |mode, source| Error::Attach {
        program: name,
        interface: interface.to_string(),
        mode,
        source,
    };
    match mode {
        AttachMode::Driver => prog
            .attach(interface, XdpMode::Driver)
            .map(|_| Attached::Driver)
            .map_err(|e| err("driver", e)),
        AttachMode::Generic => prog
            .attach(interface, XdpMode::Skb)
            .map(|_| Attached::Generic)
            .map_err(|e| err("generic", e)),
        AttachMode::Auto => match prog.attach(interface, XdpMode::Driver) {
            Ok(_) => Ok(Attached::Driver),
            Err(ProgramError::UnknownInterface { name: n }) => {
                Err(err("driver", ProgramError::UnknownInterface { name: n }))
            }
            Err(_) => prog
                .attach(interface, XdpMode::Skb)
                .map(|_| Attached::Generic)
                .map_err(|e| err("generic", e)),
        },
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

/// Headroom the program may claim with `bpf_xdp_adjust_head` (IPIP) beyond the input length.
const TEST_RUN_GROWTH: usize = 256;

fn test_run(
    prog: &Xdp,
    name: &'static str,
    frame: &[u8],
    ingress_ifindex: u32,
) -> Result<(u32, Vec<u8>), Error> {
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
    let mut out = vec![0u8; frame.len() + TEST_RUN_GROWTH];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(ctx);
    let res = prog
        .test_run(opts)
        .map_err(|source| Error::Program { name, source })?;
    out.truncate(res.data_size_out as usize);
    Ok((res.return_value, out))
}
