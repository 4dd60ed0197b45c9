//! Tier 3: fragments follow their first. A dual-stack lab whose client sends 4,000-byte UDP
//! datagrams over a 1,500-byte MTU, so its kernel sends each in three fragments, to a VIP of
//! each family with a service in each method (direct, tunnel, NAT, and a one-packet direct
//! one). The servers (lb-daemon in node role: the VIPs on `lo`, decapsulation) echo each
//! datagram whole, with their name in front, and fragment their answers too: a NAT
//! service's come back through the ATM in fragments. Every datagram must arrive and come
//! back whole, both kernels must have reassembled, and the ATM must have dropped no
//! fragment.
//!
//! The segment runs at a 1,600-byte MTU (the client's interface at 1,500): a tunnel adds 20
//! or 40 bytes to a 1,500-byte fragment, which may not be fragmented again on the way
//! (docs/DATAPLANE.md, "Fragments"). The servers send to the client and to the NAT addresses
//! at 1,500.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use lb_tests::{
    cluster::{self, CLIENT, CLIENT6, NAT_GATEWAY, NAT6_GATEWAY, VIP, VIP6},
    lab::Lab,
    netns::NetNs,
    procs::Daemon,
};

const START: Duration = Duration::from_secs(20);
/// The datagram size: three fragments at a 1,500-byte MTU.
const DATAGRAM: usize = 4_000;
/// Datagrams per service, each from a new client port.
const PER_SERVICE: usize = 12;
/// (port, method, one_packet) of the services on each VIP.
const SERVICES: [(u16, &str, bool); 4] = [
    (5001, "direct", false),
    (5002, "tunnel", false),
    (5003, "nat", false),
    (5004, "direct", true),
];

fn config() -> String {
    let mut c = format!(
        "[cluster]\nname = \"frag\"\n\n[nat]\nsubnet = \"203.0.113.0/24\"\ngateway = \"{NAT_GATEWAY}\"\n\
         subnet6 = \"2001:db8:1::/64\"\ngateway6 = \"{NAT6_GATEWAY}\"\n\n[[atm]]\nname = \"atm1\"\n\
         address = \"{}\"\naddress6 = \"{}\"\ninterface = \"eth0\"\n",
        cluster::atm_addr(1),
        cluster::atm6(1)
    );
    for (family, vip) in [("4", VIP), ("6", VIP6)] {
        for (port, method, one_packet) in SERVICES {
            c += &format!(
                "\n[[service]]\nname = \"{method}{port}v{family}\"\nvip = \"{vip}\"\nport = {port}\n\
                 protocol = \"udp\"\none_packet = {one_packet}\n[service.check]\nkind = \"none\"\n"
            );
            for i in 1..=3 {
                let addr = match (method, family) {
                    ("nat", "4") => cluster::server_nat_addr(i),
                    ("nat", _) => cluster::nat6(10 + i),
                    (_, "4") => cluster::server_addr(i),
                    _ => cluster::server6(i),
                };
                c += &format!(
                    "[[service.server]]\nname = \"s{i}\"\naddress = \"{addr}\"\nmethod = \"{method}\"\n"
                );
            }
        }
    }
    c
}

/// Echo servers: in each server namespace, a thread per socket that answers each datagram
/// with the server's name, a space, and the datagram. Stopped and joined when dropped.
struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Echo {
    fn start(lab: &Lab) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 1..=3 {
            let ns = lab.ns(&cluster::server(i)).name().to_string();
            let mut binds: Vec<SocketAddr> = Vec::new();
            for (port, method, _) in SERVICES {
                let (v4, v6): (IpAddr, IpAddr) = if method == "nat" {
                    (
                        cluster::server_nat_addr(i).parse().unwrap(),
                        cluster::nat6(10 + i).parse().unwrap(),
                    )
                } else {
                    (VIP.parse().unwrap(), VIP6.parse().unwrap())
                };
                binds.push(SocketAddr::new(v4, port));
                binds.push(SocketAddr::new(v6, port));
            }
            for at in binds {
                let (ns, stop) = (ns.clone(), stop.clone());
                let name = cluster::server(i);
                threads.push(std::thread::spawn(move || {
                    let _in = NetNs::attach(&ns).enter();
                    let s = UdpSocket::bind(at).unwrap_or_else(|e| panic!("{ns}: bind {at}: {e}"));
                    s.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    let mut buf = vec![0u8; 65_536];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = s.recv_from(&mut buf) {
                            let mut answer = format!("{name} ").into_bytes();
                            answer.extend_from_slice(&buf[..n]);
                            let _ = s.send_to(&answer, from);
                        }
                    }
                }));
            }
        }
        Echo { stop, threads }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `Ip: ReasmOKs` of namespace `ns`: datagrams its kernel put together from fragments.
fn reassembled(lab: &Lab, ns: &str, v6: bool) -> u64 {
    let text = lab
        .ns(ns)
        .exec_ok(&["cat", "/proc/net/snmp", "/proc/net/snmp6"]);
    if v6 {
        return text
            .lines()
            .find_map(|l| l.strip_prefix("Ip6ReasmOKs"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Ip6ReasmOKs in {ns}:\n{text}"));
    }
    let mut lines = text.lines().filter(|l| l.starts_with("Ip: "));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ReasmOKs")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap()
}

#[test]
fn datagrams_in_fragments_reach_their_server_whole_in_every_method_and_both_families() {
    let mut lab = Lab::new();
    cluster::build_dual_stack(&mut lab, 1, 3);
    // Room for a tunnel's outer header on the segment; the client stays at 1,500.
    for line in lab.ns("sw").exec_ok(&["ip", "-o", "link", "show"]).lines() {
        let dev = line
            .split(": ")
            .nth(1)
            .unwrap_or("")
            .split('@')
            .next()
            .unwrap();
        if dev.starts_with("p-") {
            lab.mtu("sw", dev, 1600);
        }
    }
    for i in 1..=3 {
        lab.mtu(&cluster::server(i), "eth0", 1600);
    }
    lab.mtu(&cluster::atm(1), "eth0", 1600);
    lab.mtu("client", "eth0", 1500);
    for i in 1..=3 {
        let ns = cluster::server(i);
        for to in [CLIENT, NAT_GATEWAY] {
            lab.route(&ns, &[&format!("{to}/32"), "dev", "eth0", "mtu", "1500"]);
        }
        for to in [CLIENT6, NAT6_GATEWAY] {
            lab.ns(&ns).exec_ok(&[
                "ip",
                "-6",
                "route",
                "add",
                &format!("{to}/128"),
                "dev",
                "eth0",
                "mtu",
                "1500",
            ]);
        }
    }
    let path = lab.dir().join("lb.toml");
    std::fs::write(&path, config()).unwrap();
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let ns = cluster::server(i);
        let mut d = Daemon::start(&mut lab, &ns, &path, &["--node", &ns]);
        d.wait_log("Control socket", START);
        nodes.push(d);
    }
    let _echo = Echo::start(&lab);
    let mut d = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    d.wait_log("This ATM is primary", START);
    let drops_before = fragment_drops(&d, &lab);

    let before: Vec<(u64, u64)> = ["client", "s1", "s2", "s3"]
        .iter()
        .map(|ns| (reassembled(&lab, ns, false), reassembled(&lab, ns, true)))
        .collect();
    let mut failures = Vec::new();
    {
        let _in = lab.ns("client").enter();
        for (vip, bind) in [(VIP, "0.0.0.0:0"), (VIP6, "[::]:0")] {
            for (port, method, one_packet) in SERVICES {
                let mut servers = std::collections::BTreeSet::new();
                for n in 0..PER_SERVICE {
                    // Each lost datagram costs a timeout: a broken path fails fast.
                    if failures.len() > 5 {
                        break;
                    }
                    let what = format!("{method} {vip} port {port} datagram {n}");
                    let s = UdpSocket::bind(bind).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    s.connect(SocketAddr::new(vip.parse().unwrap(), port))
                        .unwrap();
                    let payload: Vec<u8> = (0..DATAGRAM).map(|i| (i * 7 + n) as u8).collect();
                    s.send(&payload).unwrap();
                    let mut buf = vec![0u8; 65_536];
                    match s.recv(&mut buf) {
                        Ok(got) => {
                            let answer = &buf[..got];
                            let Some(space) = answer.iter().position(|b| *b == b' ') else {
                                failures.push(format!("{what}: no name in the answer"));
                                continue;
                            };
                            if answer[space + 1..] != payload[..] {
                                failures.push(format!(
                                    "{what}: {} bytes came back, not the {DATAGRAM} sent",
                                    got - space - 1
                                ));
                            }
                            servers.insert(String::from_utf8_lossy(&answer[..space]).to_string());
                        }
                        Err(e) => failures.push(format!("{what}: no answer: {e}")),
                    }
                }
                // New client ports spread over the servers (one-packet: each datagram alone).
                if servers.len() < 2 {
                    failures.push(format!(
                        "{method} {vip} port {port} (one_packet {one_packet}): answered only by {servers:?}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n{}\n{}",
        failures.join("\n"),
        d.cat("stat"),
        d.log()
    );
    let after: Vec<(u64, u64)> = ["client", "s1", "s2", "s3"]
        .iter()
        .map(|ns| (reassembled(&lab, ns, false), reassembled(&lab, ns, true)))
        .collect();
    // Every datagram went in fragments and was put together by the server, and every
    // answer by the client.
    let sent = (SERVICES.len() * PER_SERVICE) as u64;
    let servers4: u64 = (1..4).map(|i| after[i].0 - before[i].0).sum();
    let servers6: u64 = (1..4).map(|i| after[i].1 - before[i].1).sum();
    assert_eq!(servers4, sent, "IPv4 datagrams the servers reassembled");
    assert_eq!(servers6, sent, "IPv6 datagrams the servers reassembled");
    assert_eq!(
        after[0].0 - before[0].0,
        sent,
        "IPv4 answers the client reassembled"
    );
    assert_eq!(
        after[0].1 - before[0].1,
        sent,
        "IPv6 answers the client reassembled"
    );
    // No fragment was dropped for want of its first.
    assert_eq!(fragment_drops(&d, &lab), drops_before, "{}", d.log());
    drop(nodes);
}

/// The dataplane's `drop_fragment` count, from /metrics.
fn fragment_drops(d: &Daemon, lab: &Lab) -> u64 {
    let text = d.scrape(lab);
    text.lines()
        .find(|l| {
            l.starts_with("lb_dataplane_packets_total{") && l.contains("counter=\"drop_fragment\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no drop_fragment in /metrics:\n{text}"))
}
