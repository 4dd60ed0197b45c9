//! HTTP through the VIP with wrk against nginx backends: requests per second on keep-alive
//! connections, and new connections per second (`Connection: close`), with the whole
//! machine's CPU time per connection. Variants: lb (NAT, and direct routing), HAProxy in
//! `mode tcp`, nftables DNAT, and plain routing to one backend (no balancer: the baseline
//! each balancer's own CPU per connection is computed from). A fresh lab per variant and
//! round; rounds alternate variants, so no TIME_WAIT or conntrack state carries over.

use std::{process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use lb_common::{Addr, IPPROTO_TCP, Method, SETTINGS_ACTIVE, Sched, Settings};
use lb_daemon::{
    dataplane::{AttachMode, Capacities, Dataplane, ServerSpec, ServiceSpec, enable_fib_lookup},
    neighbours,
};
use lb_tests::{cluster, lab::Lab};

use crate::report;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Routing,
    Nftables,
    Haproxy,
    LbNat,
    LbDirect,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Routing => "plain routing, one backend (baseline)",
            Variant::Nftables => "nftables DNAT",
            Variant::Haproxy => "HAProxy mode tcp",
            Variant::LbNat => "lb nat",
            Variant::LbDirect => "lb direct",
        }
    }
}

const BACKENDS: [&str; 3] = ["203.0.113.11", "203.0.113.12", "203.0.113.13"];

/// A lab for one variant, and what must live as long as it.
struct Rig {
    lab: Lab,
    _dp: Option<Dataplane>,
    url: String,
}

/// Two arms: the client on 192.0.2.0/24, the backends behind the balancer on
/// 203.0.113.0/24 routing back through it.
fn two_arm(v: Variant) -> Result<Rig> {
    let mut lab = Lab::new();
    lab.add_ns("client");
    lab.add_ns("lb");
    lab.veth(("client", "eth0"), ("lb", "eth0"));
    lab.addr("client", "eth0", "192.0.2.50/24");
    lab.route("client", &["default", "via", "192.0.2.2"]);
    load_generator("client", &lab);
    lab.addr("lb", "eth0", "192.0.2.2/24");
    lab.addr("lb", "eth0", "192.0.2.100/32");
    lab.switch("sw");
    lab.plug("lb", "eth1", "sw");
    lab.addr("lb", "eth1", "203.0.113.1/24");
    for (i, b) in BACKENDS.iter().enumerate() {
        let ns = format!("s{}", i + 1);
        lab.add_ns(&ns);
        lab.plug(&ns, "eth0", "sw");
        lab.addr(&ns, "eth0", &format!("{b}/24"));
        lab.route(&ns, &["default", "via", "203.0.113.1"]);
        lab.nginx(&ns, &ns, &[80]);
    }
    // Frames XDP sends toward the client need the client's veth in XDP mode too.
    for (ns, dev) in [("client", "eth0"), ("lb", "eth0")] {
        let i = lab.ns(ns).ifindex(dev);
        let _in = lab.ns(ns).enter();
        if !(ns == "lb" && matches!(v, Variant::LbNat)) {
            lb_tests::xdp_pass::attach(i)?;
        }
    }
    let mut dp = None;
    let url = match v {
        Variant::Routing => {
            lab.sysctl("lb", "net.ipv4.ip_forward", "1");
            format!("http://{}/", BACKENDS[0])
        }
        Variant::Nftables => {
            lab.sysctl("lb", "net.ipv4.ip_forward", "1");
            crate::nft_dnat(
                &lab,
                "lb",
                "ip",
                "ip daddr 192.0.2.100 tcp dport 80 dnat to numgen inc mod 3 map { 0 : 203.0.113.11, 1 : 203.0.113.12, 2 : 203.0.113.13 }",
            );
            "http://192.0.2.100/".into()
        }
        Variant::Haproxy => {
            let conf = lab.dir().join("haproxy.cfg");
            let mut c = String::from(
                "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                 frontend f\n  bind 192.0.2.100:80\n  default_backend b\nbackend b\n  balance roundrobin\n",
            );
            for (i, b) in BACKENDS.iter().enumerate() {
                c += &format!("  server s{i} {b}:80\n");
            }
            std::fs::write(&conf, c)?;
            lab.spawn("lb", &["haproxy", "-db", "-f", conf.to_str().unwrap()]);
            lab.wait_for("haproxy to listen", Duration::from_secs(10), || {
                lab.ns("lb")
                    .exec_ok(&["ss", "-Hltn"])
                    .contains("192.0.2.100:80")
            });
            "http://192.0.2.100/".into()
        }
        Variant::LbNat => {
            let mut d = programmed(Method::Nat, &BACKENDS, [203, 0, 113, 1])?;
            // As an operator would run NAT at this rate (docs/DATAPLANE.md, "Capacity"):
            // the daemon's port range and holds, and a pool of 16 NAT addresses, since the
            // backends close first and keep TIME_WAIT for 60 s.
            let mut s = settings([192, 0, 2, 2], [203, 0, 113, 1]);
            s.nat_port_min = 1024;
            s.nat_port_max = 32_767;
            s.port_hold_ns = 2_000_000_000;
            s.time_wait_ns = 60_000_000_000;
            // The gateway and 203.0.113.101-115 (the backends are .11-.13).
            for (i, slot) in s.nat_pool.iter_mut().enumerate() {
                let last = if i == 0 { 1 } else { 100 + i as u8 };
                *slot = u32::from_ne_bytes([203, 0, 113, last]);
                if i > 0 {
                    lab.addr("lb", "eth1", &format!("203.0.113.{last}/32"));
                }
            }
            s.nat_pool_len = s.nat_pool.len() as u32;
            d.set_settings(&s)?;
            let _in = lab.ns("lb").enter();
            enable_fib_lookup()?;
            d.attach("eth0", AttachMode::Driver)?;
            d.attach("eth1", AttachMode::Driver)?;
            let addrs: Vec<std::net::IpAddr> = BACKENDS
                .iter()
                .map(|b| b.parse().unwrap())
                .chain(["192.0.2.50".parse().unwrap()])
                .collect();
            neighbours::prime(&addrs, Duration::from_secs(3));
            drop(_in);
            dp = Some(d);
            "http://192.0.2.100/".into()
        }
        Variant::LbDirect => unreachable!("one-arm"),
    };
    Ok(Rig { lab, _dp: dp, url })
}

/// The client as load generators are set up: wrk closes first about half the time, and each
/// such port then sits in TIME_WAIT for 60 s. Connect takes even ports (some 14,000 of the
/// default range): at these rates they run out within seconds, and from then on every
/// variant measures the client's connect(), about 500 a second. Ports 1024-65535, and
/// TIME_WAIT ports reused after a second (timestamps keep old segments apart).
fn load_generator(ns: &str, lab: &Lab) {
    lab.sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65535");
    lab.sysctl(ns, "net.ipv4.tcp_tw_reuse", "1");
}

/// A dataplane for the balancer at 192.0.2.2 with one service on the VIP over `backends`,
/// NAT-ing from `nat` (for the nat method).
fn programmed(method: Method, backends: &[&str], nat: [u8; 4]) -> Result<Dataplane> {
    let mut d = Dataplane::load(Capacities {
        services: 4,
        servers: 16,
        connections: 1 << 20,
    })?;
    d.install(0, &service(method, backends))?;
    d.set_settings(&settings([192, 0, 2, 2], nat))?;
    Ok(d)
}

/// One arm: client, balancer and backends on one segment; backends hold the VIP on lo and
/// answer the client directly.
fn one_arm() -> Result<Rig> {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 3);
    load_generator("client", &lab);
    let lb = cluster::atm(1);
    lab.addr(&lb, "eth0", &format!("{}/32", cluster::VIP));
    let mut servers = Vec::new();
    for i in 1..=3 {
        let ns = cluster::server(i);
        lab.nginx(&ns, &ns, &[80]);
        cluster::hold_vip_on_lo(&lab, &ns, cluster::VIP);
        servers.push(cluster::server_addr(i));
    }
    let servers: Vec<&str> = servers.iter().map(|s| s.as_str()).collect();
    let mut d = programmed(Method::Direct, &servers, [192, 0, 2, 2])?;
    {
        let _in = lab.ns(&lb).enter();
        enable_fib_lookup()?;
        d.attach("eth0", AttachMode::Driver)?;
        let addrs: Vec<std::net::IpAddr> = servers.iter().map(|b| b.parse().unwrap()).collect();
        neighbours::prime(&addrs, Duration::from_secs(3));
    }
    Ok(Rig {
        lab,
        _dp: Some(d),
        url: format!("http://{}/", cluster::VIP),
    })
}

fn service(method: Method, backends: &[&str]) -> ServiceSpec {
    ServiceSpec::new(
        cluster::VIP.parse().unwrap(),
        80,
        IPPROTO_TCP,
        Sched::Maglev,
        backends
            .iter()
            .enumerate()
            .map(|(i, b)| ServerSpec {
                index: i as u32,
                addr: b.parse().unwrap(),
                port: 80,
                weight: 1,
                method,
                up: true,
                sorry: false,
            })
            .collect(),
    )
}

fn settings(local: [u8; 4], nat: [u8; 4]) -> Settings {
    Settings {
        timeouts: lb_common::Timeouts::same(100_000_000_000),
        flags: SETTINGS_ACTIVE,
        local_addr: Addr::from_v4_octets(local),
        nat_addr: Addr::from_v4_octets(nat),
        nat_port_min: 20_000,
        nat_port_max: 59_999,
        tick_ns: lb_daemon::dataplane::tick_ns(),
        ..Default::default()
    }
}

/// Busy and total CPU jiffies of the whole machine.
fn cpu() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let f: Vec<u64> = stat
        .lines()
        .next()
        .context("/proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f.get(7).copied().unwrap_or(0);
    Ok((busy, busy + f[3] + f[4]))
}

/// wrk from the client: requests per second, requests done, and CPU seconds used.
fn wrk(rig: &Rig, seconds: u32, close: bool) -> Result<(f64, f64, f64)> {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        rig.lab.ns("client").name(),
        "wrk",
        "-t1",
        "-c32",
    ])
    .arg(format!("-d{seconds}s"));
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(&rig.url);
    let (b0, _) = cpu()?;
    let out = cmd.output().context("running wrk")?;
    let (b1, _) = cpu()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .context("wrk printed no Requests/sec")?
        .trim()
        .parse()?;
    let requests: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("wrk printed no request count")?;
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        eprintln!("    wrk ({}): {}", rig.url, e.trim());
    }
    // SAFETY: sysconf is always safe to call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((rps, requests, (b1 - b0) as f64 / hz))
}

pub fn run(seconds: u32, rounds: usize) -> Result<()> {
    let variants = [
        Variant::Routing,
        Variant::Nftables,
        Variant::Haproxy,
        Variant::LbNat,
        Variant::LbDirect,
    ];
    let mut keepalive: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut conns: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut cpu_per_conn: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (i, v) in variants.iter().enumerate() {
            for close in [false, true] {
                let rig = if *v == Variant::LbDirect {
                    one_arm()?
                } else {
                    two_arm(*v)?
                };
                let (rps, n, cpu_s) = wrk(&rig, seconds, close).with_context(|| v.name())?;
                if close {
                    conns[i].push(rps);
                    cpu_per_conn[i].push(cpu_s / n * 1e6);
                } else {
                    keepalive[i].push(rps);
                }
            }
        }
    }
    let baseline = crate::median(&cpu_per_conn[0]);
    for (i, v) in variants.iter().enumerate() {
        report(
            "http",
            &format!("{}: keep-alive", v.name()),
            "requests/s",
            keepalive[i].clone(),
        );
        report(
            "http",
            &format!("{}: new connections", v.name()),
            "connections/s",
            conns[i].clone(),
        );
        report(
            "http",
            &format!("{}: CPU per connection", v.name()),
            "us",
            cpu_per_conn[i].clone(),
        );
        if i > 0 {
            let own: Vec<f64> = cpu_per_conn[i].iter().map(|c| c - baseline).collect();
            report(
                "http",
                &format!("{}: own CPU per connection", v.name()),
                "us",
                own,
            );
        }
    }
    Ok(())
}
