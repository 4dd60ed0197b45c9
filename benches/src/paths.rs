//! Per-path cost of lb_xdp through BPF_PROG_TEST_RUN, in ns per packet, beside a bare
//! forwarder; and how the established path grows with the connection table and the servers.
//!
//! A repeated run would see its own rewritten output (a NAT-ed packet is no longer addressed
//! to the VIP), so every timed packet is a distinct flow, run once, and timed by the kernel.
//! A one-shot run's timing includes the test run's own overhead (timer reads, context set-up:
//! a few hundred ns here), so an empty program is timed over the same frames in the same
//! round and its mean subtracted: the figures are the programs' own cost. Per packet, the
//! slowest 1% (interrupts, preemption) is left out of the mean. Each round uses flows of its
//! own (a client address per round).

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use aya::{EbpfLoader, maps::Array, programs::Xdp};
use lb_common::{
    Addr, Connection, FlowKey, IPPROTO_TCP, Method, SETTINGS_ACTIVE, Sched, Settings,
    bench::{BareFwd, maps, programs},
};
use lb_daemon::dataplane::{
    BENCH_OBJECT, Capacities, Dataplane, RunMode, ServerSpec, ServiceSpec, enable_fib_lookup,
    run_xdp,
};
use lb_tests::{
    fixture::frames::{ACK, Flags, Mac, SYN, tcp, tcp6},
    lab::Lab,
};

use crate::report;

const LB_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const LB_NAT_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x01];
const ROUTER_MAC: Mac = [0x02, 0, 0, 0, 0, 0xfe];
const VIP: [u8; 4] = [192, 0, 2, 100];
const NAT: [u8; 4] = [203, 0, 113, 1];
const OTHER: [u8; 4] = [192, 0, 2, 50];
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const NAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x50);

fn server_mac(i: usize) -> Mac {
    [0x02, 0, 0, 0x10, (i >> 8) as u8, i as u8]
}

fn mac_str(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A namespace with the balancer's two interfaces, routes, and permanent neighbours for
/// `servers` direct servers (198.18.0.0/15, the benchmarking range) and the NAT servers.
struct Bed {
    lab: Lab,
    eth0: u32,
    eth1: u32,
}

impl Bed {
    fn new(servers: usize) -> Result<Bed> {
        let mut lab = Lab::new();
        lab.add_ns("bench");
        lab.ipv6("bench");
        lab.veth(("bench", "eth0"), ("bench", "peer0"));
        lab.veth(("bench", "eth1"), ("bench", "peer1"));
        lab.mac("bench", "eth0", &mac_str(LB_MAC));
        lab.mac("bench", "eth1", &mac_str(LB_NAT_MAC));
        lab.addr("bench", "eth0", "192.0.2.1/24");
        lab.addr("bench", "eth0", "198.18.0.1/15");
        lab.addr("bench", "eth1", "203.0.113.1/24");
        lab.route("bench", &["198.51.100.0/24", "via", "192.0.2.254"]);
        // IPv6: the clients behind 2001:db8::fe, the IPv6 direct and tunnel servers in
        // 2001:db8:18::/64, the NAT66 ones in 2001:db8:1::/64 on eth1.
        lab.addr6("bench", "eth0", "2001:db8::1/64");
        lab.addr6("bench", "eth0", "2001:db8:18::1/64");
        lab.addr6("bench", "eth1", "2001:db8:1::1/64");
        let mut batch = format!(
            "neigh replace 192.0.2.254 lladdr {} dev eth0 nud permanent\n\
             neigh replace 2001:db8::fe lladdr {} dev eth0 nud permanent\n",
            mac_str(ROUTER_MAC),
            mac_str(ROUTER_MAC)
        );
        for i in 0..3 {
            batch += &format!(
                "neigh replace {} lladdr {} dev eth0 nud permanent\n\
                 neigh replace 2001:db8:1::{} lladdr {} dev eth1 nud permanent\n",
                direct_server6(i),
                mac_str(server_mac(0x600 + i)),
                21 + i,
                mac_str(server_mac(0x900 + i))
            );
        }
        for i in 0..servers {
            batch += &format!(
                "neigh replace {} lladdr {} dev eth0 nud permanent\n",
                direct_server(i),
                mac_str(server_mac(i))
            );
        }
        for i in 0..3 {
            batch += &format!(
                "neigh replace 203.0.113.{} lladdr {} dev eth1 nud permanent\n",
                21 + i,
                mac_str(server_mac(0x800 + i))
            );
        }
        let file = lab.dir().join("neigh.batch");
        std::fs::write(&file, batch)?;
        lab.ns("bench")
            .exec_ok(&["ip", "-batch", file.to_str().unwrap()]);
        lab.route("bench", &["2001:db8:c::/48", "via", "2001:db8::fe"]);
        let ns = lab.ns("bench");
        let (eth0, eth1) = (ns.ifindex("eth0"), ns.ifindex("eth1"));
        {
            let _in = ns.enter();
            enable_fib_lookup()?;
        }
        Ok(Bed { lab, eth0, eth1 })
    }
}

fn direct_server(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 1, 0)) + i as u32)
}

/// IPv6 direct (and tunnel) server `i`: 2001:db8:18::(100+i).
fn direct_server6(i: usize) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x100)) + i as u128)
}

fn settings() -> Settings {
    Settings {
        timeouts: lb_common::Timeouts::same(100_000_000_000),
        flags: SETTINGS_ACTIVE,
        local_addr: Addr::from_v4_octets([192, 0, 2, 1]),
        local_addr6: Addr::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        nat_addr6: Addr::from(NAT6),
        nat_addr: Addr::from_v4_octets(NAT),
        nat_port_min: 20_000,
        nat_port_max: 59_999,
        // As the daemon sets it: lb_xdp's clock runs from jiffies from the second packet.
        tick_ns: lb_daemon::dataplane::tick_ns(),
        ..Default::default()
    }
}

/// [`spec`]'s IPv6 twin, on [`VIP6`]: NAT66 servers 2001:db8:1::21-23, direct and tunnel
/// ones [`direct_server6`].
fn spec6(port: u16, method: Method, first_index: u32) -> ServiceSpec {
    let mut s = spec(port, Sched::Maglev, method, 3, first_index);
    s.vip = VIP6.into();
    for (i, v) in s.servers.iter_mut().enumerate() {
        v.addr = match method {
            Method::Nat => Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x21 + i as u16).into(),
            _ => direct_server6(i).into(),
        };
    }
    s
}

fn spec(port: u16, sched: Sched, method: Method, servers: usize, first_index: u32) -> ServiceSpec {
    ServiceSpec::new(
        VIP.into(),
        port,
        IPPROTO_TCP,
        sched,
        (0..servers)
            .map(|i| {
                let (addr, sport) = match method {
                    Method::Nat => (
                        Ipv4Addr::new(203, 0, 113, 21 + (i % 3) as u8),
                        8080 + i as u16,
                    ),
                    _ => (direct_server(i), port),
                };
                ServerSpec {
                    index: first_index + i as u32,
                    addr: addr.into(),
                    port: sport,
                    weight: 1 + (i % 3) as u32,
                    method,
                    up: true,
                    sorry: false,
                }
            })
            .collect(),
    )
}

/// A dataplane with room for `servers`, one direct maglev service of `count` servers on
/// port 80, and the benchmarks' settings.
fn direct_dataplane(servers: u32, count: usize) -> Result<Dataplane> {
    let mut dp = Dataplane::load(Capacities {
        services: 8,
        servers,
        connections: 1 << 21,
    })?;
    dp.install(0, &spec(80, Sched::Maglev, Method::Direct, count, 0))?;
    dp.set_settings(&settings())?;
    Ok(dp)
}

/// A client's TCP frame from 198.51.100.`host`:`sport` as the router delivers it.
fn client(host: u8, sport: u16, dst: [u8; 4], dport: u16, flags: Flags) -> Vec<u8> {
    tcp(
        ROUTER_MAC,
        LB_MAC,
        [198, 51, 100, host],
        sport,
        dst,
        dport,
        flags,
        b"",
    )
}

/// [`client`] over IPv6: from 2001:db8:c::`host`.
fn client6(host: u8, sport: u16, dst: Ipv6Addr, dport: u16, flags: Flags) -> Vec<u8> {
    tcp6(
        ROUTER_MAC,
        LB_MAC,
        Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, host as u16).octets(),
        sport,
        dst.octets(),
        dport,
        flags,
        b"",
    )
}

/// Mean kernel time per run, in ns, of running each frame once, the slowest 1% left out.
fn time_frames(
    bed: &Bed,
    frames: &[(Vec<u8>, u32)],
    run: impl Fn(&[u8], u32) -> Result<u128>,
) -> Result<f64> {
    let _in = bed.lab.ns("bench").enter();
    let mut times = Vec::with_capacity(frames.len());
    for (f, ifindex) in frames {
        times.push(run(f, *ifindex)?);
    }
    times.sort_unstable();
    let keep = (times.len() - times.len() / 100).max(1);
    Ok(times[..keep].iter().sum::<u128>() as f64 / keep as f64)
}

fn lb_run(dp: &Dataplane) -> impl Fn(&[u8], u32) -> Result<u128> + '_ {
    move |f, i| Ok(dp.run(f, i, RunMode::Once)?.per_run.as_nanos())
}

/// The reference programs: the bare forwarder (sending everything to the first direct
/// server) and the empty program whose timing is the test run's own overhead.
struct Refs {
    ebpf: aya::Ebpf,
}

impl Refs {
    fn load() -> Result<Refs> {
        let mut ebpf = EbpfLoader::new().load(BENCH_OBJECT)?;
        for name in [programs::BARE_FWD, programs::BENCH_NOP] {
            let p: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load()?;
        }
        let mut cfg =
            Array::<_, BareFwd>::try_from(ebpf.map_mut(maps::BARE_FWD).context("bare_fwd_cfg")?)?;
        cfg.set(
            0,
            BareFwd {
                dmac: server_mac(0),
                smac: LB_MAC,
                ifindex: 0,
            },
            0,
        )?;
        Ok(Refs { ebpf })
    }

    fn prog(&self, name: &str) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(name)
            .context(name.to_string())?
            .try_into()?)
    }

    fn run(&self, name: &'static str) -> impl Fn(&[u8], u32) -> Result<u128> + '_ {
        move |f, i| {
            Ok(run_xdp(self.prog(name)?, f, i, RunMode::Once)?
                .per_run
                .as_nanos())
        }
    }

    /// The test run's overhead over `frames`, to subtract.
    fn overhead(&self, bed: &Bed, frames: &[(Vec<u8>, u32)]) -> Result<f64> {
        time_frames(bed, frames, self.run(programs::BENCH_NOP))
    }
}

/// Runs every frame once, untimed (to create connections).
fn warm(bed: &Bed, dp: &Dataplane, frames: &[Vec<u8>]) -> Result<()> {
    let _in = bed.lab.ns("bench").enter();
    for f in frames {
        dp.test_run(f, bed.eth0)?;
    }
    Ok(())
}

pub fn paths(packets: usize, rounds: usize) -> Result<()> {
    let bed = Bed::new(3)?;
    let mut dp = Dataplane::load(Capacities {
        services: 16,
        servers: 64,
        connections: 1 << 21,
    })?;
    let ports: [(u16, Sched, Method); 6] = [
        (80, Sched::Maglev, Method::Direct),
        (81, Sched::Rr, Method::Direct),
        (82, Sched::Wrr, Method::Direct),
        (83, Sched::Sh, Method::Direct),
        (84, Sched::Maglev, Method::Tunnel),
        (85, Sched::Maglev, Method::Nat),
    ];
    for (id, (port, sched, method)) in ports.iter().enumerate() {
        dp.install(id as u32, &spec(*port, *sched, *method, 3, id as u32 * 3))?;
    }
    // The same three methods over IPv6, on VIP6 with the same ports.
    let ports6: [(u16, Method); 3] = [
        (80, Method::Direct),
        (84, Method::Tunnel),
        (85, Method::Nat),
    ];
    for (k, (port, method)) in ports6.iter().enumerate() {
        let id = (ports.len() + k) as u32;
        dp.install(id, &spec6(*port, *method, id * 3))?;
    }
    dp.set_settings(&settings())?;

    let refs = Refs::load()?;

    let n = packets.min(60_000);
    let mut results: Vec<(&str, Vec<f64>)> = Vec::new();
    let mut results6: Vec<(&str, Vec<f64>)> = Vec::new();
    let mut repeated: Vec<(&str, Vec<f64>)> = Vec::new();
    let mut push = |name: &'static str, v: f64| match results.iter_mut().find(|r| r.0 == name) {
        Some(r) => r.1.push(v),
        None => results.push((name, vec![v])),
    };
    for round in 0..rounds {
        let host = 1 + round as u8;
        let sports = || (0..n).map(|i| (1024 + i) as u16);
        let eth0 = bed.eth0;
        // Bare forwarder and non-VIP pass: any frames will do.
        let frames: Vec<(Vec<u8>, u32)> = sports()
            .map(|p| (client(host, p, OTHER, 80, ACK), eth0))
            .collect();
        let overhead = refs.overhead(&bed, &frames)?;
        push("test-run overhead (subtracted below)", overhead);
        let mut push = |name: &'static str, v: f64| push(name, v - overhead);
        push(
            "bare forwarder (MAC rewrite, XDP_TX)",
            time_frames(&bed, &frames, refs.run(programs::BARE_FWD))?,
        );
        push(
            "pass: not for a service",
            time_frames(&bed, &frames, lb_run(&dp))?,
        );
        // New connections per scheduler.
        for (name, port) in [
            ("new: maglev", 80),
            ("new: rr", 81),
            ("new: wrr", 82),
            ("new: sh", 83),
        ] {
            let frames: Vec<(Vec<u8>, u32)> = sports()
                .map(|p| (client(host, p, VIP, port, SYN), eth0))
                .collect();
            push(name, time_frames(&bed, &frames, lb_run(&dp))?);
        }
        for (name, port) in [
            ("established: direct", 80u16),
            ("established: tunnel", 84),
            ("established: nat", 85),
        ] {
            push(name, time_established(&bed, &dp, host, n, false, port)?);
        }
        let replies = nat_replies(&bed, &dp, host, n, false)?;
        push(
            "nat reply (server -> client)",
            time_frames(&bed, &replies, lb_run(&dp))?,
        );
        paths6(&bed, &dp, &refs, host, n, &mut results6)?;
        // One packet run 10,000 times (test-run's own cost per repeat included, nothing
        // subtracted), where a path is idempotent: the bare forwarder and lb's established
        // direct packet, whose flow is then in the CPU's flow cache after the first run
        // (IPv6 flows are not cached). The connections were made by the round's SYNs.
        for (name, frame, bare) in [
            (
                "repeated: bare forwarder (MAC rewrite, XDP_TX)",
                client(host, 1024, OTHER, 80, ACK),
                true,
            ),
            (
                "repeated: established: direct",
                client(host, 1024, VIP, 80, ACK),
                false,
            ),
            (
                "IPv6: repeated: bare forwarder (MAC rewrite, XDP_TX)",
                client6(host, 1024, OTHER6, 80, ACK),
                true,
            ),
            (
                "IPv6: repeated: established: direct",
                client6(host, 1024, VIP6, 80, ACK),
                false,
            ),
        ] {
            let mode = RunMode::Repeat(10_000);
            let _in = bed.lab.ns("bench").enter();
            let per_run = if bare {
                run_xdp(refs.prog(programs::BARE_FWD)?, &frame, eth0, mode)?.per_run
            } else {
                dp.run(&frame, eth0, mode)?.per_run
            };
            match repeated.iter_mut().find(|r| r.0 == name) {
                Some(r) => r.1.push(per_run.as_nanos() as f64),
                None => repeated.push((name, vec![per_run.as_nanos() as f64])),
            }
        }
    }
    for (name, v) in results.into_iter().chain(results6).chain(repeated) {
        report("path", name, "ns/packet", v);
    }
    Ok(())
}

/// One round of the IPv6 paths, each beside its IPv4 twin in the report: the bare
/// forwarder over IPv6 frames (lb's own reference for IPv6), new and established
/// connections in each method, and NAT66 replies. The test run's overhead is timed over
/// IPv6 frames.
fn paths6(
    bed: &Bed,
    dp: &Dataplane,
    refs: &Refs,
    host: u8,
    n: usize,
    results: &mut Vec<(&'static str, Vec<f64>)>,
) -> Result<()> {
    let sports = || (0..n).map(|i| (1024 + i) as u16);
    let eth0 = bed.eth0;
    let frames: Vec<(Vec<u8>, u32)> = sports()
        .map(|p| (client6(host, p, OTHER6, 80, ACK), eth0))
        .collect();
    let overhead = refs.overhead(bed, &frames)?;
    let mut push = |name: &'static str, v: f64| match results.iter_mut().find(|r| r.0 == name) {
        Some(r) => r.1.push(v - overhead),
        None => results.push((name, vec![v - overhead])),
    };
    push(
        "IPv6: bare forwarder (MAC rewrite, XDP_TX)",
        time_frames(bed, &frames, refs.run(programs::BARE_FWD))?,
    );
    push(
        "IPv6: pass: not for a service",
        time_frames(bed, &frames, lb_run(dp))?,
    );
    let frames: Vec<(Vec<u8>, u32)> = sports()
        .map(|p| (client6(host, p, VIP6, 80, SYN), eth0))
        .collect();
    push("IPv6: new: maglev", time_frames(bed, &frames, lb_run(dp))?);
    for (name, port) in [
        ("IPv6: established: direct", 80u16),
        ("IPv6: established: tunnel", 84),
        ("IPv6: established: nat", 85),
    ] {
        push(name, time_established(bed, dp, host, n, true, port)?);
    }
    let replies = nat_replies(bed, dp, host, n, true)?;
    push(
        "IPv6: nat reply (server -> client)",
        time_frames(bed, &replies, lb_run(dp))?,
    );
    Ok(())
}

/// A client's frame to the VIP of its family (`v6`).
fn to_vip(v6: bool, host: u8, sport: u16, dport: u16, flags: Flags) -> Vec<u8> {
    if v6 {
        client6(host, sport, VIP6, dport, flags)
    } else {
        client(host, sport, VIP, dport, flags)
    }
}

/// An established connection's packet to `port` of the VIP of a family, one per flow: the
/// connections are made untimed first (on port 80 the round's timed SYNs made them).
fn time_established(
    bed: &Bed,
    dp: &Dataplane,
    host: u8,
    n: usize,
    v6: bool,
    port: u16,
) -> Result<f64> {
    let sports = || (0..n).map(|i| (1024 + i) as u16);
    if port != 80 {
        let syns: Vec<Vec<u8>> = sports().map(|p| to_vip(v6, host, p, port, SYN)).collect();
        warm(bed, dp, &syns)?;
    }
    let frames: Vec<(Vec<u8>, u32)> = sports()
        .map(|p| (to_vip(v6, host, p, port, ACK), bed.eth0))
        .collect();
    time_frames(bed, &frames, lb_run(dp))
}

/// The NAT servers' replies, on `eth1`, to the ports the forward legs of the NAT service
/// (port 85) of a family chose.
fn nat_replies(
    bed: &Bed,
    dp: &Dataplane,
    host: u8,
    n: usize,
    v6: bool,
) -> Result<Vec<(Vec<u8>, u32)>> {
    let mut replies = Vec::with_capacity(n);
    for p in (0..n).map(|i| (1024 + i) as u16) {
        let (src, dst) = if v6 {
            (
                Addr::from(Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, host as u16)),
                Addr::from(VIP6),
            )
        } else {
            (
                Addr::from_v4_octets([198, 51, 100, host]),
                Addr::from_v4_octets(VIP),
            )
        };
        let key = FlowKey {
            src,
            dst,
            sport: p.to_be(),
            dport: 85u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let Some(c): Option<Connection> = dp.connection(&key) else {
            continue;
        };
        let srv = dp.server(c.server)?;
        let (sport, dport) = (u16::from_be(srv.port), u16::from_be(c.nat_port));
        let frame = if v6 {
            let sa = srv.addr.octets();
            tcp6(
                server_mac(0x900),
                LB_NAT_MAC,
                sa,
                sport,
                NAT6.octets(),
                dport,
                ACK,
                b"",
            )
        } else {
            let sa = srv.addr.as_v4_raw().unwrap().to_ne_bytes();
            tcp(
                server_mac(0x800),
                LB_NAT_MAC,
                sa,
                sport,
                NAT,
                dport,
                ACK,
                b"",
            )
        };
        replies.push((frame, bed.eth1));
    }
    Ok(replies)
}

pub fn growth(packets: usize, rounds: usize) -> Result<()> {
    let n = packets.min(60_000);
    let refs = Refs::load()?;
    // The connection table's size.
    for size in [1_000usize, 10_000, 100_000, 1_000_000] {
        let bed = Bed::new(3)?;
        let mut dp = direct_dataplane(16, 3)?;
        let now = lb_daemon::dataplane::now_ns();
        for i in 0..size {
            let key = FlowKey {
                src: Addr::from_v4_octets([203, 0, 113, (i >> 16) as u8]),
                dst: Addr::from_v4_octets(VIP),
                sport: (i as u16).to_be(),
                dport: 80u16.to_be(),
                proto: IPPROTO_TCP,
                _pad: [0; 3],
            };
            dp.set_connection(
                &key,
                &Connection {
                    last_seen_ns: now,
                    server: (i % 3) as u32,
                    ..Default::default()
                },
            )?;
        }
        let mut v = Vec::new();
        for round in 0..rounds {
            let host = 1 + round as u8;
            let syns: Vec<Vec<u8>> = (0..n)
                .map(|i| client(host, 1024 + i as u16, VIP, 80, SYN))
                .collect();
            warm(&bed, &dp, &syns)?;
            let frames: Vec<(Vec<u8>, u32)> = (0..n)
                .map(|i| (client(host, 1024 + i as u16, VIP, 80, ACK), bed.eth0))
                .collect();
            let overhead = refs.overhead(&bed, &frames)?;
            v.push(time_frames(&bed, &frames, lb_run(&dp))? - overhead);
        }
        report(
            "growth",
            &format!("established, {size} connections in the table"),
            "ns/packet",
            v,
        );
    }
    // The service's server count.
    for servers in [1usize, 10, 100, 1000] {
        let bed = Bed::new(servers)?;
        let dp = direct_dataplane(1024, servers)?;
        let (mut new, mut est) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let host = 1 + round as u8;
            let syns: Vec<(Vec<u8>, u32)> = (0..n)
                .map(|i| (client(host, 1024 + i as u16, VIP, 80, SYN), bed.eth0))
                .collect();
            let overhead = refs.overhead(&bed, &syns)?;
            new.push(time_frames(&bed, &syns, lb_run(&dp))? - overhead);
            let acks: Vec<(Vec<u8>, u32)> = (0..n)
                .map(|i| (client(host, 1024 + i as u16, VIP, 80, ACK), bed.eth0))
                .collect();
            est.push(time_frames(&bed, &acks, lb_run(&dp))? - overhead);
        }
        report(
            "growth",
            &format!("new connection, {servers} servers (maglev)"),
            "ns/packet",
            new,
        );
        report(
            "growth",
            &format!("established, {servers} servers (maglev)"),
            "ns/packet",
            est,
        );
    }
    Ok(())
}

/// `lb-bench hold`: calibrate's dataplane and connection, kept loaded.
pub fn hold(seconds: u64) -> Result<()> {
    let bed = Bed::new(3)?;
    let dp = direct_dataplane(64, 3)?;
    let _in = bed.lab.ns("bench").enter();
    let dir = std::path::Path::new("/tmp/lb-hold");
    std::fs::create_dir_all(dir)?;
    let (syn, ack) = (client(1, 5000, VIP, 80, SYN), client(1, 5000, VIP, 80, ACK));
    dp.test_run(&syn, bed.eth0)?;
    dp.test_run(&ack, bed.eth0)?;
    // Another client port: a new connection when counted.
    std::fs::write(dir.join("syn.bin"), client(1, 6000, VIP, 80, SYN))?;
    std::fs::write(dir.join("ack.bin"), &ack)?;
    std::fs::write(dir.join("ifindex"), bed.eth0.to_string())?;
    eprintln!(
        "lb_xdp loaded, one connection made; frames in {}; holding {seconds} s",
        dir.display()
    );
    std::thread::sleep(std::time::Duration::from_secs(seconds));
    Ok(())
}

/// Idempotent paths timed with repeats (no per-run overhead at all), beside one-shot runs
/// net of the empty program's: a check of the subtraction, printed, not reported.
pub fn calibrate() -> Result<()> {
    let bed = Bed::new(3)?;
    let dp = direct_dataplane(64, 3)?;
    let refs = Refs::load()?;
    let _in = bed.lab.ns("bench").enter();
    dp.test_run(&client(1, 5000, VIP, 80, SYN), bed.eth0)?;
    let ack = vec![(client(1, 5000, VIP, 80, ACK), bed.eth0); 10_000];
    let other = vec![(client(1, 5000, OTHER, 80, ACK), bed.eth0); 10_000];
    let overhead = refs.overhead(&bed, &ack)?;
    let repeat = |prog: &Xdp, frame: &[u8]| -> Result<u128> {
        Ok(run_xdp(prog, frame, bed.eth0, RunMode::Repeat(10_000))?
            .per_run
            .as_nanos())
    };
    eprintln!("test-run overhead (one-shot empty program): {overhead:.0} ns");
    for (name, one_shot, repeated) in [
        (
            "bare",
            time_frames(&bed, &ack, refs.run(programs::BARE_FWD))?,
            repeat(refs.prog(programs::BARE_FWD)?, &ack[0].0)?,
        ),
        (
            "lb established direct",
            time_frames(&bed, &ack, lb_run(&dp))?,
            dp.run(&ack[0].0, bed.eth0, RunMode::Repeat(10_000))?
                .per_run
                .as_nanos(),
        ),
        (
            "lb pass",
            time_frames(&bed, &other, lb_run(&dp))?,
            dp.run(&other[0].0, bed.eth0, RunMode::Repeat(10_000))?
                .per_run
                .as_nanos(),
        ),
    ] {
        eprintln!(
            "{name}: one-shot net {:.0} ns, repeated {repeated} ns",
            one_shot - overhead
        );
    }
    Ok(())
}

/// The map memory of a dataplane holding `services` services of `per` servers each (the
/// issue's 4,096 of 10), as `bpftool map show` reports it: the scheduler rows' pool, and
/// every map of lb_xdp together. One round: the figures do not vary.
pub fn capacity(services: u32, per: u32) -> Result<()> {
    let caps = Capacities {
        services,
        servers: services * per,
        connections: lb_common::DEFAULT_CONNECTIONS,
    };
    let mut dp = Dataplane::load(caps).context("loading the dataplane")?;
    for id in 0..services {
        let spec = ServiceSpec::new(
            Ipv4Addr::from(VIP).into(),
            1 + id as u16,
            IPPROTO_TCP,
            Sched::Maglev,
            (0..per)
                .map(|j| ServerSpec {
                    index: id * per + j,
                    addr: Ipv4Addr::new(192, 0, 2, 10 + (j % 200) as u8).into(),
                    port: 1 + id as u16,
                    weight: 1,
                    method: Method::Direct,
                    up: true,
                    sorry: false,
                })
                .collect(),
        );
        dp.install(id, &spec)
            .with_context(|| format!("installing service {id}"))?;
    }
    let (pages, free) = dp.ring_pages();
    let mut maps = Vec::new();
    for id in dp.map_ids()? {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "id", &id.to_string()])
            .output()
            .context("running bpftool (cargo xtask setup installs it)")?;
        anyhow::ensure!(out.status.success(), "bpftool map show id {id} failed");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let name = v["name"].as_str().unwrap_or("?").to_string();
        let bytes = v["bytes_memlock"].as_u64().unwrap_or(0);
        maps.push((name, bytes));
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.1));
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for (name, bytes) in &maps {
        eprintln!("  {name:<16} {:>10.2} MiB", mib(*bytes));
    }
    eprintln!(
        "  sched_table: {} of {pages} pages of 4 KiB in use",
        pages - free
    );
    let what = format!("{services} services x {per} servers");
    let ring = maps
        .iter()
        .find(|(n, _)| n == lb_common::maps::SCHED_TABLE)
        .context("no sched_table among lb_xdp's maps")?;
    report(
        "capacity",
        &format!("ring memory (sched_table), {what}"),
        "MiB",
        vec![mib(ring.1)],
    );
    report(
        "capacity",
        &format!("rings in use, {what}"),
        "MiB",
        vec![mib(((pages - free) * 4096) as u64)],
    );
    report(
        "capacity",
        &format!(
            "every map of lb_xdp, {what} and {} connections",
            caps.connections
        ),
        "MiB",
        vec![mib(maps.iter().map(|m| m.1).sum())],
    );
    Ok(())
}
