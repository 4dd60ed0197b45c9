//! Tier 3: frames bigger than a page. lb_xdp takes multi-buffer frames (`xdp.frags`), so an
//! ATM on a jumbo-MTU link attaches natively and forwards 9000-byte frames in every method,
//! and big NAT downloads run at full speed, not throttled as the other labs' are.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{cluster, lab::Lab, procs::Daemon};

/// The download: 64 MiB.
const BYTES: usize = 64 << 20;

/// One ATM, a NAT service on :80 (servers' NAT addresses, port 8080) and a direct one on
/// :81 and a tunnel one on :82 (servers' own addresses).
fn config() -> String {
    let mut c = format!(
        r#"[cluster]
name = "lab"

[nat]
subnet = "203.0.113.0/24"
gateway = "{gw}"

[[atm]]
name = "atm1"
address = "{atm}"
interface = "eth0"
"#,
        gw = cluster::NAT_GATEWAY,
        atm = cluster::atm_addr(1),
    );
    // Direct first: a node finds itself by the first server line at one of its addresses,
    // and these servers are the direct and tunnel servers (their NAT side needs nothing).
    for (name, port, method) in [
        ("direct", 81, "direct"),
        ("tunnel", 82, "tunnel"),
        ("nat", 80, "nat"),
    ] {
        c += &format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{}\"\nport = {port}\nscheduler = \"rr\"\n\
             [service.check]\nkind = \"none\"\n",
            cluster::VIP
        );
        for i in 1..=3 {
            let (addr, sport) = if method == "nat" {
                (cluster::server_nat_addr(i), 8080)
            } else {
                (cluster::server_addr(i), port)
            };
            c += &format!(
                "[[service.server]]\nname = \"s{i}\"\naddress = \"{addr}\"\nport = {sport}\n\
                 method = \"{method}\"\n"
            );
        }
    }
    c
}

/// The lab at `mtu`, nginx on every server serving `/files/big` unthrottled, the daemons
/// (the ATM and, for direct and tunnel, the servers in node role) started.
fn lab(mtu: u32) -> (Lab, Vec<Daemon>) {
    lab_with(mtu, false)
}

/// [`lab`]; with `gro`, the switch ports and the servers segment and merge TCP as veths do
/// by default (the other labs turn that off), and lb_xdp runs in generic mode, where the
/// segments the switch merged reach it as one frame of up to 64 KiB.
fn lab_with(mtu: u32, gro: bool) -> (Lab, Vec<Daemon>) {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 3);
    let mut spaces = vec!["client".to_string(), cluster::atm(1)];
    spaces.extend((1..=3).map(cluster::server));
    lab.mtu("sw", "br0", mtu);
    for ns in &spaces {
        let port = format!("p-{}", ns.chars().take(10).collect::<String>());
        lab.mtu("sw", &port, mtu);
        lab.mtu(ns, "eth0", mtu);
    }
    for i in 1..=3 {
        let ns = cluster::server(i);
        lab.nginx(&ns, &ns, &[8080, 81, 82]);
        lab.serve_file(&ns, "big", BYTES);
    }
    let path = lab.dir().join("lb.toml");
    std::fs::write(&path, config()).unwrap();
    let mut daemons = Vec::new();
    if gro {
        for ns in &spaces {
            let port = format!("p-{}", ns.chars().take(10).collect::<String>());
            lab.ns("sw").exec_ok(&[
                "ethtool", "-K", &port, "tx", "on", "sg", "on", "tso", "on", "gso", "on",
            ]);
        }
        for i in 1..=3 {
            lab.ns(&cluster::server(i)).exec_ok(&[
                "ethtool", "-K", "eth0", "tx", "on", "sg", "on", "tso", "on", "gso", "on",
            ]);
        }
    }
    let extra: &[&str] = if gro { &["--xdp-mode", "generic"] } else { &[] };
    let mut atm = Daemon::start(&mut lab, &cluster::atm(1), &path, extra);
    atm.wait_log("This ATM is primary", Duration::from_secs(20));
    daemons.push(atm);
    for i in 1..=3 {
        let mut d = Daemon::start(&mut lab, &cluster::server(i), &path, &[]);
        d.wait_log("lb_decap attached", Duration::from_secs(20));
        daemons.push(d);
    }
    (lab, daemons)
}

/// Downloads `/files/big` from the VIP on `port`; the bytes received and how long it took.
fn download(lab: &Lab, port: u16) -> (usize, Duration) {
    let _in = lab.ns("client").enter();
    let vip: Ipv4Addr = cluster::VIP.parse().unwrap();
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&(vip, port).into(), Duration::from_secs(5))
        .expect("connect to the VIP");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /files/big HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    let mut header = Vec::new();
    let mut body = 0usize;
    // Bounded: a read times out after 5 s of silence, and the whole after 60 s.
    while t.elapsed() < Duration::from_secs(60) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if header.len() < 4096 && body == 0 {
                    header.extend_from_slice(&buf[..n]);
                    if let Some(end) = header.windows(4).position(|w| w == b"\r\n\r\n") {
                        body = header.len() - end - 4;
                        header.truncate(end);
                    }
                } else {
                    body += n;
                }
            }
            Err(e) => panic!("download on :{port} stalled after {got} bytes: {e}"),
        }
    }
    assert!(
        String::from_utf8_lossy(&header).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&header)
    );
    (body, t.elapsed())
}

fn stat(d: &Daemon) -> Vec<u64> {
    d.cli_ok(&["cat", "stat"])
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

/// The lab's usual 1500-byte links: an unthrottled 64 MiB NAT download (the servers' replies
/// come back through the ATM) arrives whole.
#[test]
fn an_unthrottled_nat_download_of_64_mib_arrives_whole() {
    let (lab, d) = lab(1500);
    let (bytes, took) = download(&lab, 80);
    eprintln!("nat, MTU 1500: {bytes} bytes in {took:?}");
    assert_eq!(bytes, BYTES);
    assert_eq!(stat(&d[0])[4], 0, "nothing dropped: {:?}", stat(&d[0]));
}

/// MTU 9000 everywhere: the ATM attaches natively (a program that cannot take multi-buffer
/// frames is refused on such a veth), and 64 MiB downloads arrive whole by NAT, direct
/// routing and tunnel.
#[test]
fn jumbo_frames_attach_natively_and_flow_in_every_method() {
    let (lab, d) = lab(9000);
    let log = d[0].log();
    assert!(
        log.contains("lb_xdp attached to eth0 in driver mode"),
        "{log}"
    );
    assert!(!log.contains("Native XDP on"), "{log}");
    for (port, what) in [(80, "nat"), (81, "direct"), (82, "tunnel")] {
        let before = vip_traffic(&lab, &d[0]);
        let (bytes, took) = download(&lab, port);
        let after = vip_traffic(&lab, &d[0]);
        let (packets, octets) = (after.0 - before.0, after.1 - before.1);
        eprintln!(
            "{what}, MTU 9000: {bytes} bytes in {took:?}; through the ATM {packets} packets, \
             {octets} bytes"
        );
        assert_eq!(bytes, BYTES, "{what}");
        if what == "nat" {
            // The replies came back through the ATM in 9000-byte frames: far fewer packets
            // than 1500-byte frames would take.
            assert!(
                octets > BYTES as u64,
                "{what}: {octets} bytes through the ATM"
            );
            assert!(
                octets / packets > 4000,
                "{what}: {packets} packets for {octets} bytes"
            );
        }
    }
    let s = stat(&d[0]);
    assert_eq!(s[4], 0, "nothing dropped: {s:?}");
}

/// The dataplane's packets and bytes for services (vip_packets, vip_bytes), from /metrics.
fn vip_traffic(lab: &Lab, d: &Daemon) -> (u64, u64) {
    let text = d.scrape(lab);
    let value = |counter: &str| -> u64 {
        let prefix = format!("lb_dataplane_packets_total{{counter=\"{counter}\"");
        text.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {counter} in:\n{text}")) as u64
    };
    (value("vip_packets"), value("vip_bytes"))
}

/// Generic mode, offloads on: a server's fast stream reaches the ATM as GRO-merged frames
/// far bigger than a page; the NAT replies still arrive whole and nothing is dropped.
#[test]
fn gro_merged_frames_in_generic_mode_flow_through_nat() {
    let (lab, d) = lab_with(1500, true);
    assert!(
        d[0].log()
            .contains("lb_xdp attached to eth0 in generic mode"),
        "{}",
        d[0].log()
    );
    assert!(
        d[0].log()
            .contains("segmentation offload (tx-tcp-segmentation"),
        "{}",
        d[0].log()
    );
    let before = vip_traffic(&lab, &d[0]);
    let (bytes, took) = download(&lab, 80);
    let after = vip_traffic(&lab, &d[0]);
    let (packets, octets) = (after.0 - before.0, after.1 - before.1);
    eprintln!("nat, generic, GRO: {bytes} bytes in {took:?}; {packets} packets, {octets} bytes");
    assert_eq!(bytes, BYTES);
    assert_eq!(stat(&d[0])[4], 0, "nothing dropped: {:?}", stat(&d[0]));
}
