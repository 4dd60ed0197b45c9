//! Tier 3: real HTTP through the VIP. A client, one balancer and three real servers running
//! nginx share one Ethernet segment; lb_xdp runs natively on the balancer, whose kernel has
//! IPv4 forwarding off, so whatever reaches a server through the VIP was forwarded by XDP.
//! For each method: 300 requests on new connections all succeed and spread over the servers
//! in proportion to their weights, and a long-lived connection stays on one server.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    time::Duration,
};

use lb_common::{Addr, IPPROTO_TCP, Method, SETTINGS_ACTIVE, Sched, Settings, Stat};
use lb_daemon::{
    dataplane::{
        AttachMode, Attached, Capacities, Dataplane, ServerSpec, ServiceSpec, enable_fib_lookup,
    },
    neighbours,
};
use lb_tests::{cluster, lab::Lab};

const REQUESTS: usize = 300;

struct Case {
    method: Method,
    sched: Sched,
    weights: [u32; 3],
    /// Port the servers listen on (the service is on port 80).
    server_port: u16,
}

/// Builds the lab, programs the balancer for `case`, and returns the lab with the running
/// dataplanes (the balancer's first).
fn setup(case: &Case) -> (Lab, Dataplane, Vec<Dataplane>) {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 3);
    let lb = cluster::atm(1);
    // The balancer answers ARP for the VIP and owns the NAT source address.
    lab.addr(&lb, "eth0", &format!("{}/32", cluster::VIP));
    lab.addr(&lb, "eth0", &format!("{}/24", cluster::NAT_GATEWAY));
    lab.sysctl(&lb, "net.ipv4.ip_forward", "0");

    let mut decaps = Vec::new();
    for i in 1..=3 {
        let ns = cluster::server(i);
        lab.nginx(&ns, &ns, &[case.server_port]);
        match case.method {
            Method::Direct => cluster::hold_vip_on_lo(&lab, &ns, cluster::VIP),
            Method::Tunnel => {
                cluster::hold_vip_on_lo(&lab, &ns, cluster::VIP);
                let mut dp = Dataplane::load(Capacities {
                    services: 1,
                    servers: 1,
                    connections: 1,
                })
                .expect("load lb_decap");
                dp.set_decap_sources(&[cluster::atm_addr(1).parse::<Ipv4Addr>().unwrap().into()])
                    .unwrap();
                let _in = lab.ns(&ns).enter();
                dp.attach_decap("eth0", AttachMode::Driver)
                    .expect("attach lb_decap");
                decaps.push(dp);
            }
            // The daemon's namespace test serves local ones (tests/tests/daemon.rs).
            Method::Nat | Method::Local => {}
        }
    }

    let servers: Vec<ServerSpec> = (1..=3)
        .map(|i| ServerSpec {
            index: i as u32 - 1,
            addr: if case.method == Method::Nat {
                cluster::server_nat_addr(i)
            } else {
                cluster::server_addr(i)
            }
            .parse()
            .unwrap(),
            port: case.server_port,
            weight: case.weights[i - 1],
            method: case.method,
            up: true,
            sorry: false,
        })
        .collect();
    let spec = ServiceSpec::new(
        cluster::VIP.parse().unwrap(),
        80,
        IPPROTO_TCP,
        case.sched,
        servers.clone(),
    );
    let mut dp = Dataplane::load(Default::default()).expect("load the dataplane");
    dp.install(0, &spec).unwrap();
    dp.set_settings(&Settings {
        timeouts: lb_common::Timeouts::same(100_000_000_000),
        debug: 0,
        flags: SETTINGS_ACTIVE,
        local_addr: Addr::from(cluster::atm_addr(1).parse::<Ipv4Addr>().unwrap()),
        nat_addr: Addr::from(cluster::NAT_GATEWAY.parse::<Ipv4Addr>().unwrap()),
        nat_port_min: 20_000,
        nat_port_max: 59_999,
        lease_ns: 0,
        settle_until_ns: 0,
        ..Default::default()
    })
    .unwrap();
    {
        let _in = lab.ns(&lb).enter();
        enable_fib_lookup().unwrap();
        let mode = dp
            .attach("eth0", AttachMode::Driver)
            .expect("attach lb_xdp");
        assert_eq!(mode, Attached::Driver);
        let addrs: Vec<std::net::IpAddr> = servers.iter().map(|s| s.addr).collect();
        let missing = neighbours::prime(&addrs, Duration::from_secs(3));
        assert!(missing.is_empty(), "servers not resolved: {missing:?}");
    }
    (lab, dp, decaps)
}

/// One HTTP/1.1 request on an open connection; returns the body.
fn request(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
        .expect("write request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).expect("read response");
        assert!(
            n > 0,
            "connection closed mid-response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .expect("Content-Length")
                .trim()
                .parse()
                .unwrap();
            if buf.len() >= end + 4 + len {
                assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                return text[end + 4..end + 4 + len].trim().to_string();
            }
        }
    }
}

fn run(case: Case) {
    let (lab, dp, _decaps) = setup(&case);
    let url = format!("http://{}/", cluster::VIP);
    let mut counts: HashMap<String, usize> = HashMap::new();
    let (long_server, long_port);
    {
        let _in = lab.ns("client").enter();
        // A long-lived connection, opened first and used before, during and after the rest.
        let mut long = TcpStream::connect((cluster::VIP, 80)).expect("connect long-lived");
        long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        long_port = long.local_addr().unwrap().port();
        long_server = request(&mut long);
        let agent = ureq::AgentBuilder::new()
            .max_idle_connections(0)
            .timeout(Duration::from_secs(5))
            .build();
        for i in 0..REQUESTS {
            let body = agent
                .get(&url)
                .call()
                .unwrap_or_else(|e| panic!("request {i} through the VIP failed: {e}"))
                .into_string()
                .unwrap();
            *counts.entry(body.trim().to_string()).or_default() += 1;
            if i % 50 == 0 {
                assert_eq!(
                    request(&mut long),
                    long_server,
                    "the long-lived connection moved"
                );
            }
        }
        for _ in 0..5 {
            assert_eq!(
                request(&mut long),
                long_server,
                "the long-lived connection moved"
            );
        }
        assert_eq!(long.local_addr().unwrap().port(), long_port);
    }

    eprintln!(
        "{:?} {:?} weights {:?}: {counts:?}",
        case.method, case.sched, case.weights
    );
    // Spread in proportion to weight, within 10 percentage points.
    let total_w: u32 = case.weights.iter().sum();
    for i in 1..=3 {
        let name = cluster::server(i);
        let got = *counts.get(&name).unwrap_or(&0) as f64 / REQUESTS as f64;
        let want = case.weights[i - 1] as f64 / total_w as f64;
        assert!(
            (got - want).abs() <= 0.10,
            "{:?}: {name} got {:.1}% of requests, weight says {:.1}% ({counts:?})",
            case.method,
            got * 100.0,
            want * 100.0
        );
    }

    // The kernel could not have forwarded any of it.
    let lb = lab.ns(&cluster::atm(1));
    assert_eq!(
        lb.exec_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
        "0"
    );
    assert_eq!(
        lb.exec_ok(&["cat", "/proc/sys/net/ipv4/conf/eth0/forwarding"])
            .trim(),
        "0"
    );
    let s = dp.stats().unwrap();
    assert_eq!(s.get(Stat::NewConns), REQUESTS as u64 + 1, "{s:?}");
    assert!(s.get(Stat::Forwarded) >= 3 * REQUESTS as u64, "{s:?}");
    assert_eq!(s.dropped(), 0, "{s:?}");
}

#[test]
fn direct_routing_spreads_by_weight_and_keeps_connections() {
    run(Case {
        method: Method::Direct,
        sched: Sched::Maglev,
        weights: [1, 2, 3],
        server_port: 80,
    });
}

#[test]
fn tunnel_with_lb_decap_spreads_by_weight_and_keeps_connections() {
    run(Case {
        method: Method::Tunnel,
        sched: Sched::Wrr,
        weights: [1, 2, 3],
        server_port: 80,
    });
}

#[test]
fn nat_spreads_by_weight_and_keeps_connections() {
    run(Case {
        method: Method::Nat,
        sched: Sched::Wrr,
        weights: [3, 2, 1],
        server_port: 8080,
    });
}
