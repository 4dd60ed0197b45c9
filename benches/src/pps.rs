//! Packets per second through a namespace lab: generator -> balancer -> sink, the same
//! generator for every variant. The generator is an XDP program run by BPF_PROG_TEST_RUN
//! with live frames (each run transmits its frame; trafgen tops out near 1 Mpps here); the
//! sink counts and drops in XDP. Variants: plain routing, nftables DNAT with conntrack, a bare
//! XDP forwarder, and lb by direct routing, tunnel and NAT; each over IPv4 and over IPv6 (IPv6
//! DNAT, IPv6-in-IPv6, NAT66). A fresh lab for every variant and round, rounds alternating
//! variants.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, PerCpuArray},
    programs::Xdp,
};
use lb_common::{
    Addr, IPPROTO_UDP, Method, SETTINGS_ACTIVE, Sched, Settings,
    bench::{BareFwd, maps, programs},
    xdp_link,
};
use lb_daemon::dataplane::{
    AttachMode, BENCH_OBJECT, Capacities, Dataplane, RunMode, ServerSpec, ServiceSpec,
    enable_fib_lookup, run_xdp,
};
use lb_tests::{
    fixture::frames::{udp, udp6},
    lab::Lab,
};
use std::os::fd::{AsFd, AsRawFd};

use crate::report;

const GEN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];
const LB0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x02];
const LB1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x01];
const SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x02];
const VIP: [u8; 4] = [192, 0, 2, 100];
const SINK: [u8; 4] = [198, 51, 100, 2];
/// IPv6: the generator's segment 2001:db8:a::/64, the sink's 2001:db8:b::/64.
const GEN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const LB1_6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 1);
const SINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 2);

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// The generator straight into an XDP sink on the balancer's interface: its ceiling.
    Generator,
    Routing,
    Nftables,
    BareXdp,
    Lb(Method),
}

impl Variant {
    /// Its name in the report; over IPv6, with " (IPv6)".
    fn label(self, v6: bool) -> String {
        if v6 {
            format!("{} (IPv6)", self.name())
        } else {
            self.name()
        }
    }

    fn name(self) -> String {
        match self {
            Variant::Generator => "generator alone (one veth hop)".into(),
            Variant::Routing => "plain routing (kernel forwarding)".into(),
            Variant::Nftables => "nftables DNAT + conntrack".into(),
            Variant::BareXdp => "bare XDP forwarder".into(),
            Variant::Lb(m) => format!("lb {}", m.name()),
        }
    }
}

/// The lab of one measurement and what must live as long as it.
struct Rig {
    lab: Lab,
    _programs: Vec<Ebpf>,
    _dp: Option<Dataplane>,
    /// The counting sink's map.
    sink: PerCpuArray<aya::maps::MapData, u64>,
    gen_ebpf: Ebpf,
    gen_ifindex: u32,
}

fn load_program(name: &'static str) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new().load(BENCH_OBJECT)?;
    let p: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
    p.load()?;
    Ok(ebpf)
}

/// Attaches program `name` of `ebpf` natively to `dev` in namespace `ns` (through netlink,
/// so it stays until the namespace goes).
fn attach(lab: &Lab, ns: &str, dev: &str, ebpf: &Ebpf, name: &'static str) -> Result<()> {
    let space = lab.ns(ns);
    let ifindex = space.ifindex(dev);
    let prog: &Xdp = ebpf.program(name).context(name)?.try_into()?;
    let fd = prog.fd()?.as_fd().as_raw_fd();
    let _in = space.enter();
    let sock = xdp_link::socket()?;
    xdp_link::set(&sock, ifindex, Some(fd), xdp_link::DRV_MODE)?;
    Ok(())
}

fn rig(v: Variant, v6: bool) -> Result<Rig> {
    let mut lab = Lab::new();
    for ns in ["gen", "lb", "sink"] {
        lab.add_ns(ns);
        if v6 {
            lab.ipv6(ns);
        }
    }
    lab.veth(("gen", "eth0"), ("lb", "eth0"));
    lab.veth(("lb", "eth1"), ("sink", "eth0"));
    lab.mac("gen", "eth0", &mac(GEN_MAC));
    lab.mac("lb", "eth0", &mac(LB0_MAC));
    lab.mac("lb", "eth1", &mac(LB1_MAC));
    lab.mac("sink", "eth0", &mac(SINK_MAC));
    lab.addr("gen", "eth0", "192.0.2.1/24");
    lab.addr("lb", "eth0", "192.0.2.2/24");
    lab.addr("lb", "eth0", "192.0.2.100/32");
    lab.addr("lb", "eth1", "198.51.100.1/24");
    lab.addr("sink", "eth0", "198.51.100.2/24");
    lab.neigh("lb", "eth1", "198.51.100.2", &mac(SINK_MAC));
    lab.neigh("lb", "eth0", "192.0.2.1", &mac(GEN_MAC));
    if v6 {
        lab.addr6("gen", "eth0", &format!("{GEN6}/64"));
        lab.addr6("lb", "eth0", "2001:db8:a::2/64");
        lab.addr6("lb", "eth0", &format!("{VIP6}/128"));
        lab.addr6("lb", "eth1", &format!("{LB1_6}/64"));
        lab.addr6("sink", "eth0", &format!("{SINK6}/64"));
        lab.neigh("lb", "eth1", &SINK6.to_string(), &mac(SINK_MAC));
        lab.neigh("lb", "eth0", &GEN6.to_string(), &mac(GEN_MAC));
    }

    let mut programs = Vec::new();
    let sink_ebpf = load_program(programs::SINK_COUNT)?;
    let sink_at = if v == Variant::Generator {
        ("lb", "eth0")
    } else {
        ("sink", "eth0")
    };
    attach(&lab, sink_at.0, sink_at.1, &sink_ebpf, programs::SINK_COUNT)?;
    let mut sink_ebpf = sink_ebpf;
    let sink = PerCpuArray::try_from(sink_ebpf.take_map(maps::SINK_COUNT).context("sink map")?)?;
    programs.push(sink_ebpf);

    let mut dp = None;
    match v {
        Variant::Generator => {}
        Variant::Routing | Variant::Nftables => {
            lab.sysctl("lb", "net.ipv4.ip_forward", "1");
            if v6 {
                lab.sysctl("lb", "net.ipv6.conf.all.forwarding", "1");
            }
            // The generator's frames reach the balancer's veth only if it runs XDP (see
            // lb_tests::xdp_pass); the pass program costs the kernel paths a few ns.
            let ifindex = lab.ns("lb").ifindex("eth0");
            let _in = lab.ns("lb").enter();
            lb_tests::xdp_pass::attach(ifindex)?;
            drop(_in);
            if v == Variant::Nftables && v6 {
                crate::nft_dnat(
                    &lab,
                    "lb",
                    "ip6",
                    &format!("ip6 daddr {VIP6} udp dport 9000 dnat to {SINK6}"),
                );
            } else if v == Variant::Nftables {
                crate::nft_dnat(
                    &lab,
                    "lb",
                    "ip",
                    "ip daddr 192.0.2.100 udp dport 9000 dnat to 198.51.100.2",
                );
            }
        }
        Variant::BareXdp => {
            let mut e = load_program(programs::BARE_FWD)?;
            let lb1 = lab.ns("lb").ifindex("eth1");
            let mut cfg =
                Array::<_, BareFwd>::try_from(e.map_mut(maps::BARE_FWD).context("bare_fwd_cfg")?)?;
            cfg.set(
                0,
                BareFwd {
                    dmac: SINK_MAC,
                    smac: LB1_MAC,
                    ifindex: lb1,
                },
                0,
            )?;
            attach(&lab, "lb", "eth0", &e, programs::BARE_FWD)?;
            programs.push(e);
        }
        Variant::Lb(method) => {
            let mut d = Dataplane::load(Capacities {
                services: 4,
                servers: 16,
                connections: 1 << 18,
            })?;
            d.install(
                0,
                &ServiceSpec::new(
                    if v6 { VIP6.into() } else { VIP.into() },
                    9000,
                    IPPROTO_UDP,
                    Sched::Maglev,
                    vec![ServerSpec {
                        index: 0,
                        addr: if v6 { SINK6.into() } else { SINK.into() },
                        port: 9000,
                        weight: 1,
                        method,
                        up: true,
                        sorry: false,
                    }],
                ),
            )?;
            d.set_settings(&Settings {
                timeouts: lb_common::Timeouts::same(100_000_000_000),
                flags: SETTINGS_ACTIVE,
                local_addr: Addr::from(Ipv4Addr::new(198, 51, 100, 1)),
                nat_addr: Addr::from(Ipv4Addr::new(198, 51, 100, 1)),
                local_addr6: Addr::from(LB1_6),
                nat_addr6: Addr::from(LB1_6),
                nat_port_min: 20_000,
                nat_port_max: 59_999,
                tick_ns: lb_daemon::dataplane::tick_ns(),
                ..Default::default()
            })?;
            let _in = lab.ns("lb").enter();
            enable_fib_lookup()?;
            d.attach("eth0", AttachMode::Driver)?;
            drop(_in);
            dp = Some(d);
        }
    }
    let gen_ebpf = load_program(if v6 {
        programs::GEN_TX6
    } else {
        programs::GEN_TX
    })?;
    let gen_ifindex = lab.ns("gen").ifindex("eth0");
    Ok(Rig {
        lab,
        _programs: programs,
        _dp: dp,
        sink,
        gen_ebpf,
        gen_ifindex,
    })
}

fn delivered(sink: &PerCpuArray<aya::maps::MapData, u64>) -> Result<u64> {
    Ok(sink.get(&0, 0)?.iter().sum())
}

/// One measurement: `packets` frames from the generator; the rate the sink saw them at.
fn measure(v: Variant, v6: bool, packets: u32, generator: Generator) -> Result<(f64, f64)> {
    let mut rig = rig(v, v6)?;
    let to_sink = matches!(v, Variant::Routing | Variant::BareXdp | Variant::Generator);
    if generator == Generator::Trafgen {
        return measure_trafgen(&mut rig, v6, to_sink, packets);
    }
    let (frame, gen_prog) = if v6 {
        let dst = if to_sink { SINK6 } else { VIP6 };
        let frame = udp6(
            GEN_MAC,
            LB0_MAC,
            GEN6.octets(),
            10_000,
            dst.octets(),
            9000,
            &[0u8; 18],
        );
        set_template::<62>(&mut rig.gen_ebpf, maps::GEN_TEMPLATE6, &frame)?;
        (frame, programs::GEN_TX6)
    } else {
        let dst = if to_sink { SINK } else { VIP };
        let mut frame = udp(
            GEN_MAC,
            LB0_MAC,
            [192, 0, 2, 1],
            10_000,
            dst,
            9000,
            &[0u8; 18],
        );
        // No UDP checksum: the generator steps the source port.
        frame[40..42].copy_from_slice(&[0, 0]);
        set_template::<42>(&mut rig.gen_ebpf, maps::GEN_TEMPLATE, &frame)?;
        (frame, programs::GEN_TX)
    };
    let generator: &Xdp = rig
        .gen_ebpf
        .program(gen_prog)
        .context(gen_prog)?
        .try_into()?;
    let _in = rig.lab.ns("gen").enter();
    // Warm up: connections, conntrack entries and neighbour lookups are made outside the timing.
    run_xdp(
        generator,
        &frame,
        rig.gen_ifindex,
        RunMode::Live {
            n: 20_000,
            batch: 64,
        },
    )?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = delivered(&rig.sink)?;
    let start = Instant::now();
    run_xdp(
        generator,
        &frame,
        rig.gen_ifindex,
        RunMode::Live {
            n: packets,
            batch: 64,
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let got = delivered(&rig.sink)? - before;
    if std::env::var_os("LB_BENCH_DEBUG").is_some() {
        if let Some(dp) = &rig._dp {
            let st = dp.stats()?;
            eprintln!("{v:?} stats: {st:?}");
        }
        for ns in ["gen", "lb", "sink"] {
            eprintln!("{ns}: {}", rig.lab.ns(ns).exec_ok(&["ip", "-s", "link"]));
            eprintln!("{ns}: {}", rig.lab.ns(ns).exec_ok(&["nstat", "-a"]));
        }
    }
    Ok((got as f64 / secs, got as f64 / packets as f64))
}

/// The generator's header template: the first `N` bytes of `frame`, into its map `map`.
fn set_template<const N: usize>(ebpf: &mut Ebpf, map: &'static str, frame: &[u8]) -> Result<()> {
    let mut template = Array::<_, [u8; N]>::try_from(ebpf.map_mut(map).context(map)?)?;
    template.set(0, <[u8; N]>::try_from(&frame[..N])?, 0)?;
    Ok(())
}

/// What sends the frames. Live frames unless the kernel refuses them (see `Generator::pick`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Generator {
    /// `gen_tx` / `gen_tx6` by BPF_PROG_TEST_RUN with live frames: about 4 Mpps here.
    Live,
    /// netsniff-ng's trafgen on a packet socket: near 1 Mpps here, below lb's rate, so lb's
    /// figures are then the generator's and their ratios to the peers lower bounds.
    Trafgen,
}

impl Generator {
    /// Live frames if a live test run of the empty program is allowed, else trafgen (the same
    /// for every variant of the run).
    fn pick() -> Result<Generator> {
        let ebpf = load_program(programs::BENCH_NOP)?;
        let nop: &Xdp = ebpf
            .program(programs::BENCH_NOP)
            .context("bench_nop")?
            .try_into()?;
        let frame = udp(GEN_MAC, LB0_MAC, [192, 0, 2, 1], 1, VIP, 9, &[0u8; 18]);
        match run_xdp(nop, &frame, 1, RunMode::Live { n: 1, batch: 1 }) {
            Ok(_) => Ok(Generator::Live),
            Err(e) => {
                eprintln!(
                    "pps: this kernel refuses live-frame test runs ({e}): trafgen sends the \
                     frames instead"
                );
                Ok(Generator::Trafgen)
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Generator::Live => "live frames (gen_tx)",
            Generator::Trafgen => "trafgen",
        }
    }
}

/// [`measure`] with trafgen: `packets` UDP frames of the same shape from the generator's
/// namespace (source port stepped through 1024 values, checksums computed by trafgen), after
/// 20,000 untimed ones; the rate the sink saw them at over trafgen's run.
fn measure_trafgen(rig: &mut Rig, v6: bool, to_sink: bool, packets: u32) -> Result<(f64, f64)> {
    let (l3, ethertype) = if v6 {
        let dst = if to_sink { SINK6 } else { VIP6 };
        (format!("ipv6(saddr={GEN6}, daddr={dst}, hl=64)"), "0x86dd")
    } else {
        let dst = Ipv4Addr::from(if to_sink { SINK } else { VIP });
        (
            format!("ipv4(saddr=192.0.2.1, daddr={dst}, ttl=64)"),
            "0x0800",
        )
    };
    let cfg = format!(
        "{{ eth(da={}, sa={}, type={ethertype}), {l3}, udp(sp=dinc(10000, 11023), dp=9000), \
         fill(0x00, 18) }}\n",
        mac(LB0_MAC),
        mac(GEN_MAC)
    );
    let dir = rig.lab.dir().join("trafgen.cfg");
    std::fs::write(&dir, cfg)?;
    let gen_ns = rig.lab.ns("gen");
    // A veth has no queue of its own (noqueue): give it one, so that a full ring holds
    // trafgen back instead of failing its send.
    gen_ns.exec_ok(&["ip", "link", "set", "eth0", "txqueuelen", "10000"]);
    gen_ns.exec_ok(&[
        "tc", "qdisc", "replace", "dev", "eth0", "root", "pfifo", "limit", "10000",
    ]);
    let send = |n: u32| -> Result<f64> {
        let start = Instant::now();
        let out = gen_ns.exec(&[
            "trafgen",
            "--dev",
            "eth0",
            "--conf",
            dir.to_str().unwrap(),
            "--num",
            &n.to_string(),
            "--cpus",
            "1",
            "--no-cpu-stats",
            // Through the qdisc, one blocking send per frame (`--gap 0`): a veth whose peer
            // is slower than trafgen fills its ring, and trafgen's mmap ring then fails its
            // flush (EAGAIN) instead of waiting.
            "--qdisc-path",
            "--gap",
            "0",
        ]);
        let secs = start.elapsed().as_secs_f64();
        anyhow::ensure!(
            out.status.success(),
            "trafgen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(secs)
    };
    send(20_000)?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = delivered(&rig.sink)?;
    let secs = send(packets)?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let got = delivered(&rig.sink)? - before;
    Ok((got as f64 / secs, got as f64 / packets as f64))
}

pub fn run(packets: u32, rounds: usize, only: Option<&str>) -> Result<()> {
    let generator = Generator::pick()?;
    eprintln!("pps: the generator is {}", generator.name());
    let variants = [
        Variant::Generator,
        Variant::Routing,
        Variant::Nftables,
        Variant::BareXdp,
        Variant::Lb(Method::Direct),
        Variant::Lb(Method::Tunnel),
        Variant::Lb(Method::Nat),
    ];
    let cases: Vec<(Variant, bool)> = [false, true]
        .into_iter()
        .flat_map(|v6| variants.iter().map(move |v| (*v, v6)))
        .filter(|(v, v6)| only.is_none_or(|o| v.label(*v6).contains(o)))
        .collect();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut delivery: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (i, (v, v6)) in cases.iter().enumerate() {
            let (pps, frac) = measure(*v, *v6, packets, generator).with_context(|| v.label(*v6))?;
            rates[i].push(pps);
            delivery[i].push(frac);
        }
    }
    for (i, (v, v6)) in cases.iter().enumerate() {
        let name = v.label(*v6);
        report("pps", &name, "packets/s", rates[i].clone());
        report(
            "pps",
            &format!("{name}: share delivered"),
            "fraction",
            delivery[i].clone(),
        );
    }
    Ok(())
}
