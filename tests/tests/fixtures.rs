//! Tier 2: packet fixtures through BPF_PROG_TEST_RUN.
//!
//! The program runs inside a namespace of its own whose routes and (permanent) neighbours are
//! known, so next hops and MACs from `bpf_fib_lookup` are predictable. Expected frames are
//! built independently: choices predicted from the scheduler rows the dataplane holds,
//! headers edited byte by byte and every checksum recomputed from scratch by etherparse, so
//! the program's incremental arithmetic is compared with a full computation.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::{Icmpv4Header, Icmpv4Type, Ipv4Header, PacketBuilder, TcpHeaderSlice, icmpv4};
use lb_common::{
    Addr, Connection, FlowKey, IPPROTO_TCP, IPPROTO_UDP, Method, SETTINGS_ACTIVE, Sched, Settings,
    Stat, hash,
};
use lb_daemon::dataplane::{
    Capacities, Dataplane, ServerSpec, ServiceSpec, enable_fib_lookup, now_ns,
};
use lb_tests::{
    fixture::{
        Fixture, Rng, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, action_name, decode, frames::*,
    },
    lab::Lab,
};

const LB_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const LB_NAT_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x01];
const ROUTER_MAC: Mac = [0x02, 0, 0, 0, 0, 0xfe];
const LB: [u8; 4] = [192, 0, 2, 1];
const NAT: [u8; 4] = [203, 0, 113, 1];
const CLIENT: [u8; 4] = [198, 51, 100, 7];
const VIP: [u8; 4] = [192, 0, 2, 100];
const VIP_STICKY: [u8; 4] = [192, 0, 2, 101];
const VIP_DEAD: [u8; 4] = [192, 0, 2, 102];
const OTHER: [u8; 4] = [192, 0, 2, 50];
const NAT_PORT_MIN: u16 = 20_000;
const NAT_PORT_MAX: u16 = 59_999;

/// Direct/tunnel servers on the balancer's segment, and NAT servers on its second interface.
const S1: [u8; 4] = [192, 0, 2, 11];
const S2: [u8; 4] = [192, 0, 2, 12];
const S3: [u8; 4] = [192, 0, 2, 13];
const N1: [u8; 4] = [203, 0, 113, 21];
const N2: [u8; 4] = [203, 0, 113, 22];

fn mac_of(ip: [u8; 4]) -> Mac {
    match ip {
        [192, 0, 2, x] => [0x02, 0, 0, 0, 0, x],
        [203, 0, 113, x] => [0x02, 0, 0, 0, 0x01, x],
        _ => panic!("no MAC for {ip:?}"),
    }
}

fn mac_str(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

// Service ids and their first server index.
const HTTP: u32 = 0; // 192.0.2.100:80/tcp maglev, direct S1 S2 -> servers 0, 1
const TUN: u32 = 1; // 192.0.2.100:81/tcp rr, tunnel S1 S2 S3 -> 2, 3, 4
const NATSVC: u32 = 2; // 192.0.2.100:82/tcp wrr, nat N1:8080 w3, N2:8080 w1 -> 5, 6
const DNS: u32 = 3; // 192.0.2.100:53/udp sh, direct S1 S2 -> 7, 8
const STICKY: u32 = 4; // 192.0.2.101:80/tcp maglev, persistence 300 s, direct S1 S2 S3 -> 9..11
const NATUDP: u32 = 5; // 192.0.2.100:5353/udp rr, nat N1:53 -> 12
const DEAD: u32 = 6; // 192.0.2.102:80/tcp maglev, its one server down -> 13

fn v4(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("{a} is not an IPv4 address"),
    }
}

fn server(addr: [u8; 4], port: u16, weight: u32, method: Method) -> ServerSpec {
    ServerSpec {
        index: 0,
        addr: Ipv4Addr::from(addr).into(),
        port,
        weight,
        method,
        up: true,
        sorry: false,
    }
}

fn service(
    vip: [u8; 4],
    port: u16,
    proto: u8,
    sched: Sched,
    servers: Vec<ServerSpec>,
) -> ServiceSpec {
    ServiceSpec::new(Ipv4Addr::from(vip).into(), port, proto, sched, servers)
}

/// The namespace, the loaded dataplane and its interfaces.
struct Bench {
    lab: Lab,
    dp: Dataplane,
    eth0: u32,
    eth1: u32,
    /// (service id, first server index, spec) as installed.
    services: Vec<(u32, u32, ServiceSpec)>,
}

impl Bench {
    fn new() -> Bench {
        Bench::with_caps(Capacities::default())
    }

    fn with_caps(caps: Capacities) -> Bench {
        let mut lab = Lab::new();
        lab.add_ns("fx");
        lab.veth(("fx", "eth0"), ("fx", "peer0"));
        lab.veth(("fx", "eth1"), ("fx", "peer1"));
        lab.mac("fx", "eth0", &mac_str(LB_MAC));
        lab.mac("fx", "eth1", &mac_str(LB_NAT_MAC));
        lab.addr("fx", "eth0", "192.0.2.1/24");
        lab.addr("fx", "eth1", "203.0.113.1/24");
        // A narrower path toward the NAT servers, to see path-MTU handling.
        lab.ns("fx")
            .exec_ok(&["ip", "link", "set", "eth1", "mtu", "1400"]);
        for (ip, dev) in [
            (S1, "eth0"),
            (S2, "eth0"),
            (S3, "eth0"),
            ([192, 0, 2, 254], "eth0"),
            (N1, "eth1"),
            (N2, "eth1"),
        ] {
            lab.neigh(
                "fx",
                dev,
                &Ipv4Addr::from(ip).to_string(),
                &mac_str(mac_of(ip)),
            );
        }
        lab.route("fx", &["198.51.100.0/24", "via", "192.0.2.254"]);
        let fx = lab.ns("fx");
        let (eth0, eth1) = (fx.ifindex("eth0"), fx.ifindex("eth1"));
        {
            let _in = lab.ns("fx").enter();
            enable_fib_lookup().unwrap();
        }

        let mut dp = Dataplane::load(caps).expect("load the dataplane");
        let mut sticky = service(
            VIP_STICKY,
            80,
            IPPROTO_TCP,
            Sched::Maglev,
            vec![
                server(S1, 80, 1, Method::Direct),
                server(S2, 80, 1, Method::Direct),
                server(S3, 80, 1, Method::Direct),
            ],
        );
        sticky.persistence_s = 300;
        let mut dead = service(
            VIP_DEAD,
            80,
            IPPROTO_TCP,
            Sched::Maglev,
            vec![server(S1, 80, 1, Method::Direct)],
        );
        dead.servers[0].up = false;
        let services = vec![
            (
                HTTP,
                0,
                service(
                    VIP,
                    80,
                    IPPROTO_TCP,
                    Sched::Maglev,
                    vec![
                        server(S1, 80, 1, Method::Direct),
                        server(S2, 80, 1, Method::Direct),
                    ],
                ),
            ),
            (
                TUN,
                2,
                service(
                    VIP,
                    81,
                    IPPROTO_TCP,
                    Sched::Rr,
                    vec![
                        server(S1, 81, 1, Method::Tunnel),
                        server(S2, 81, 1, Method::Tunnel),
                        server(S3, 81, 1, Method::Tunnel),
                    ],
                ),
            ),
            (
                NATSVC,
                5,
                service(
                    VIP,
                    82,
                    IPPROTO_TCP,
                    Sched::Wrr,
                    vec![
                        server(N1, 8080, 3, Method::Nat),
                        server(N2, 8080, 1, Method::Nat),
                    ],
                ),
            ),
            (
                DNS,
                7,
                service(
                    VIP,
                    53,
                    IPPROTO_UDP,
                    Sched::Sh,
                    vec![
                        server(S1, 53, 1, Method::Direct),
                        server(S2, 53, 1, Method::Direct),
                    ],
                ),
            ),
            (STICKY, 9, sticky),
            (
                NATUDP,
                12,
                service(
                    VIP,
                    5353,
                    IPPROTO_UDP,
                    Sched::Rr,
                    vec![server(N1, 53, 1, Method::Nat)],
                ),
            ),
            (DEAD, 13, dead),
        ];
        let services: Vec<(u32, u32, ServiceSpec)> = services
            .into_iter()
            .map(|(id, first, mut spec)| {
                for (i, s) in spec.servers.iter_mut().enumerate() {
                    s.index = first + i as u32;
                }
                (id, first, spec)
            })
            .collect();
        for (id, _, spec) in &services {
            dp.install(*id, spec).expect("install a service");
        }
        dp.set_settings(&settings()).unwrap();
        Bench {
            lab,
            dp,
            eth0,
            eth1,
            services,
        }
    }

    fn spec(&self, id: u32) -> (u32, &ServiceSpec) {
        let (_, first, spec) = self.services.iter().find(|s| s.0 == id).unwrap();
        (*first, spec)
    }

    /// The scheduler row of service `id`, as the program indexes it.
    fn row(&self, id: u32) -> Vec<u32> {
        let svc = self
            .dp
            .services()
            .unwrap()
            .into_iter()
            .find(|(_, s)| s.id == id)
            .unwrap()
            .1;
        self.dp.table(id, svc.table_len as usize).unwrap()
    }

    /// Address and port of server `index`.
    fn server_addr(&self, index: u32) -> ([u8; 4], u16) {
        for (_, first, spec) in &self.services {
            if index >= *first && index < first + spec.servers.len() as u32 {
                let s = &spec.servers[(index - first) as usize];
                return (v4(s.addr).octets(), s.port);
            }
        }
        panic!("no server {index}");
    }

    /// The server Maglev picks for a flow of service `id`.
    fn maglev(&self, id: u32, key: &FlowKey) -> u32 {
        let row = self.row(id);
        row[(hash::flow(key) % row.len() as u32) as usize]
    }

    fn run(&self, fixtures: &[Fixture]) {
        let _inside = self.lab.ns("fx").enter();
        let mut failures = Vec::new();
        for fx in fixtures {
            let (action, out) = self
                .dp
                .test_run(&fx.input, fx.ingress.unwrap_or(self.eth0))
                .expect("test_run");
            if let Err(e) = fx.check(action, &out) {
                failures.push(e);
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} fixtures failed:\n{}",
            failures.len(),
            fixtures.len(),
            failures.join("\n")
        );
    }

    /// One run of `frame` from the client's side: the action and the frame that left.
    fn once(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let _inside = self.lab.ns("fx").enter();
        self.dp.test_run(frame, self.eth0).expect("test_run")
    }

    fn run_decap(&self, fixtures: &[Fixture]) {
        let _inside = self.lab.ns("fx").enter();
        let mut failures = Vec::new();
        for fx in fixtures {
            let (action, out) = self
                .dp
                .test_run_decap(&fx.input, self.eth0)
                .expect("test_run");
            if let Err(e) = fx.check(action, &out) {
                failures.push(e);
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

fn settings() -> Settings {
    Settings {
        timeouts: lb_common::Timeouts::same(100_000_000_000),
        debug: 0,
        flags: SETTINGS_ACTIVE,
        local_addr: Addr::from_v4_octets(LB),
        nat_addr: Addr::from_v4_octets(NAT),
        nat_port_min: NAT_PORT_MIN,
        nat_port_max: NAT_PORT_MAX,
        lease_ns: 0,
        settle_until_ns: 0,
        ..Default::default()
    }
}

/// Round robin and the per-CPU cursors need the test thread on one CPU.
fn pin_to_cpu0() {
    pin_to_cpu(0);
}

fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: Addr::from_v4_octets(src),
        dst: Addr::from_v4_octets(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// A client TCP frame to `dst:dport` as it arrives from the router.
fn from_client(sport: u16, dst: [u8; 4], dport: u16, flags: Flags, payload: &[u8]) -> Vec<u8> {
    tcp(
        ROUTER_MAC, LB_MAC, CLIENT, sport, dst, dport, flags, payload,
    )
}

/// The frame with new MACs: what direct routing does.
fn with_macs(frame: &[u8], smac: Mac, dmac: Mac) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&dmac);
    out[6..12].copy_from_slice(&smac);
    out
}

/// The frame IPIP-encapsulated from the balancer to `server`, as tunnel mode sends it.
fn ipip(frame: &[u8], server: [u8; 4]) -> Vec<u8> {
    let inner = &frame[14..];
    let inner_h = Ipv4Header::from_slice(inner).unwrap().0;
    let mut outer = Ipv4Header::new(
        inner.len() as u16,
        64,
        etherparse::IpNumber::IPV4,
        LB,
        server,
    )
    .unwrap();
    outer.identification = 0;
    outer.dont_fragment = inner_h.dont_fragment;
    outer.dscp = inner_h.dscp;
    outer.ecn = inner_h.ecn;
    outer.header_checksum = outer.calc_header_checksum();
    let mut packet = Vec::new();
    outer.write(&mut packet).unwrap();
    packet.extend_from_slice(inner);
    ethernet(LB_MAC, mac_of(server), &packet)
}

/// The frame with addresses, ports and MACs rewritten and every checksum recomputed from
/// scratch by etherparse: what NAT must produce.
fn nat_expected(
    frame: &[u8],
    (smac, dmac): (Mac, Mac),
    (src, sport): ([u8; 4], u16),
    (dst, dport): ([u8; 4], u16),
) -> Vec<u8> {
    let mut out = with_macs(frame, smac, dmac);
    out[26..30].copy_from_slice(&src);
    out[30..34].copy_from_slice(&dst);
    out[34..36].copy_from_slice(&sport.to_be_bytes());
    out[36..38].copy_from_slice(&dport.to_be_bytes());
    fix_checksums(&mut out);
    out
}

/// Recomputes the IPv4 and TCP/UDP checksums of an Ethernet/IPv4 frame (no options) with
/// etherparse. A UDP checksum of zero (none) stays zero.
fn fix_checksums(frame: &mut [u8]) {
    fix_ipv4_checksum(frame);
    let ip = Ipv4Header::from_slice(&frame[14..]).unwrap().0;
    let l4 = 14 + ip.header_len();
    let end = 14 + ip.total_len as usize;
    match ip.protocol {
        etherparse::IpNumber::TCP => {
            let t = TcpHeaderSlice::from_slice(&frame[l4..end]).unwrap();
            let body = frame[l4 + t.slice().len()..end].to_vec();
            let c = t.to_header().calc_checksum_ipv4(&ip, &body).unwrap();
            frame[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        }
        etherparse::IpNumber::UDP => {
            if frame[l4 + 6..l4 + 8] == [0, 0] {
                return;
            }
            let u = etherparse::UdpHeaderSlice::from_slice(&frame[l4..end]).unwrap();
            let c = u
                .to_header()
                .calc_checksum_ipv4(&ip, &frame[l4 + 8..end])
                .unwrap();
            frame[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
        }
        _ => {}
    }
}

/// The NAT source ports the program hands out, server by server: each server's ports in
/// turn from the bottom of the range (the range is empty in these fixtures, and installing
/// a service starts its servers' cursors at 0).
#[derive(Default)]
struct NatPorts(std::collections::HashMap<u32, u16>);

impl NatPorts {
    /// The port the next new NAT connection to server index `server` gets.
    fn next(&mut self, server: u32) -> u16 {
        let n = self.0.entry(server).or_default();
        *n += 1;
        NAT_PORT_MIN + *n - 1
    }
}

/// An ICMP fragmentation-needed from a router on the client's side to `to`, quoting the
/// first 28 bytes of the IPv4 packet `quoted`.
fn frag_needed(to: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
        .ipv4([198, 51, 100, 254], to, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ));
    let q = &quoted[..28];
    let mut out = Vec::new();
    b.write(&mut out, q).unwrap();
    out
}

/// The ICMP fragmentation-needed the balancer answers `frame` with: from `from` to the
/// client, quoting the IPv4 header and 8 bytes of the original, with next-hop MTU `mtu`.
fn too_big_reply(frame: &[u8], from: [u8; 4], mtu: u16) -> Vec<u8> {
    let quote = &frame[14..14 + 28];
    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: mtu,
        }),
        quote,
    );
    let mut ip = Ipv4Header::new(
        (icmp.header_len() + quote.len()) as u16,
        64,
        etherparse::IpNumber::ICMP,
        from,
        CLIENT,
    )
    .unwrap();
    ip.dont_fragment = false;
    ip.header_checksum = ip.calc_header_checksum();
    let mut packet = Vec::new();
    ip.write(&mut packet).unwrap();
    icmp.write(&mut packet).unwrap();
    packet.extend_from_slice(quote);
    ethernet(LB_MAC, ROUTER_MAC, &packet)
}

/// A packet the server side sent toward the client: what an ICMP error quotes.
fn server_reply_packet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let f = tcp(
        LB_MAC,
        ROUTER_MAC,
        src,
        sport,
        dst,
        dport,
        ACK,
        &[0u8; 1400],
    );
    f[14..].to_vec()
}

#[test]
fn dataplane_fixtures() {
    pin_to_cpu0();
    let b = Bench::new();
    let mut fx = Vec::new();

    // --- direct (maglev): SYN, established, FIN all go to the same server by MAC rewrite.
    let k = key(CLIENT, 40001, VIP, 80, IPPROTO_TCP);
    let chosen = b.maglev(HTTP, &k);
    let (srv, _) = b.server_addr(chosen);
    for (what, flags, payload) in [
        ("SYN", SYN, &b""[..]),
        ("established", ACK, &b"GET /"[..]),
        ("FIN", FIN, &b""[..]),
    ] {
        let f = from_client(40001, VIP, 80, flags, payload);
        fx.push(
            Fixture::new(
                format!("direct {what} goes to maglev's server by MAC rewrite"),
                f.clone(),
                XDP_TX,
            )
            .output(with_macs(&f, LB_MAC, mac_of(srv))),
        );
    }

    // --- tunnel (rr): SYN, established, FIN encapsulated to the first server of the cycle;
    // two more new connections go to the next servers in turn.
    let (first, tun) = b.spec(TUN);
    let row = b.row(TUN);
    assert_eq!(
        row,
        (first..first + tun.servers.len() as u32).collect::<Vec<_>>()
    );
    for (what, flags) in [("SYN", SYN), ("established", ACK), ("FIN", FIN)] {
        let f = from_client(40002, VIP, 81, flags, b"");
        fx.push(
            Fixture::new(
                format!("tunnel {what} is IPIP to the server rr chose"),
                f.clone(),
                XDP_TX,
            )
            .output(ipip(&f, b.server_addr(row[0]).0)),
        );
    }
    for (i, port) in [(1usize, 40003u16), (2, 40004), (0, 40005)] {
        let f = from_client(port, VIP, 81, SYN, b"");
        fx.push(
            Fixture::new(
                format!(
                    "rr: new connection {} goes to server {i} of the cycle",
                    i + 1
                ),
                f.clone(),
                XDP_TX,
            )
            .output(ipip(&f, b.server_addr(row[i]).0)),
        );
    }

    // --- NAT (wrr 3:1): forward leg, reply leg, established and FIN; then the weighted cycle.
    let wrr = b.row(NATSVC);
    assert_eq!(wrr, vec![5, 5, 6, 5], "smooth wrr for weights 3 and 1");
    let mut ports = NatPorts::default();
    let port = ports.next(wrr[0]);
    let (n_addr, n_port) = b.server_addr(wrr[0]);
    let syn = from_client(40010, VIP, 82, SYN, b"");
    fx.push(
        Fixture::new(
            "nat SYN: to the server from the NAT address, checksums updated",
            syn.clone(),
            XDP_REDIRECT,
        )
        .output(nat_expected(
            &syn,
            (LB_NAT_MAC, mac_of(n_addr)),
            (NAT, port),
            (n_addr, n_port),
        )),
    );
    let synack = tcp(
        mac_of(n_addr),
        LB_NAT_MAC,
        n_addr,
        n_port,
        NAT,
        port,
        Flags {
            syn: true,
            ack: true,
            ..Default::default()
        },
        b"",
    );
    fx.push(
        Fixture::new(
            "nat reply: translated back to VIP -> client",
            synack.clone(),
            XDP_REDIRECT,
        )
        .on(b.eth1)
        .output(nat_expected(
            &synack,
            (LB_MAC, ROUTER_MAC),
            (VIP, 82),
            (CLIENT, 40010),
        )),
    );
    for (what, flags) in [("established", ACK), ("FIN", FIN)] {
        let f = from_client(40010, VIP, 82, flags, b"data");
        fx.push(
            Fixture::new(
                format!("nat {what}: same server, same NAT port"),
                f.clone(),
                XDP_REDIRECT,
            )
            .output(nat_expected(
                &f,
                (LB_NAT_MAC, mac_of(n_addr)),
                (NAT, port),
                (n_addr, n_port),
            )),
        );
    }
    for (i, cport) in [(1usize, 40011u16), (2, 40012), (3, 40013)] {
        let f = from_client(cport, VIP, 82, SYN, b"");
        let (a, p) = b.server_addr(wrr[i]);
        let nat = ports.next(wrr[i]);
        fx.push(
            Fixture::new(
                format!("wrr: new connection {} follows the weighted cycle", i + 1),
                f.clone(),
                XDP_REDIRECT,
            )
            .output(nat_expected(
                &f,
                (LB_NAT_MAC, mac_of(a)),
                (NAT, nat),
                (a, p),
            )),
        );
    }

    // --- sh: the client's address decides, whatever its port.
    let sh_row = b.row(DNS);
    let sh_server =
        sh_row[(hash::addr(&Addr::from_v4_octets(CLIENT)) % sh_row.len() as u32) as usize];
    for port in [5000u16, 5001] {
        let f = udp(ROUTER_MAC, LB_MAC, CLIENT, port, VIP, 53, b"query");
        fx.push(
            Fixture::new(
                format!("sh: udp from port {port} goes to the client's server"),
                f.clone(),
                XDP_TX,
            )
            .output(with_macs(&f, LB_MAC, mac_of(b.server_addr(sh_server).0))),
        );
    }

    // --- maglev's choice for another flow, independently predicted.
    let k2 = key(CLIENT, 40100, VIP, 80, IPPROTO_TCP);
    let f = from_client(40100, VIP, 80, SYN, b"");
    fx.push(
        Fixture::new(
            "maglev: the ring slot of the flow hash decides",
            f.clone(),
            XDP_TX,
        )
        .output(with_macs(
            &f,
            LB_MAC,
            mac_of(b.server_addr(b.maglev(HTTP, &k2)).0),
        )),
    );

    // --- persistence: a second connection from the client sticks to the first one's server,
    // even from a port maglev would send elsewhere.
    let k_a = key(CLIENT, 41000, VIP_STICKY, 80, IPPROTO_TCP);
    let sticky_server = b.maglev(STICKY, &k_a);
    let other_port = (41001..42000)
        .find(|p| b.maglev(STICKY, &key(CLIENT, *p, VIP_STICKY, 80, IPPROTO_TCP)) != sticky_server)
        .unwrap();
    for p in [41000, other_port] {
        let f = from_client(p, VIP_STICKY, 80, SYN, b"");
        fx.push(
            Fixture::new(
                format!("persistence: connection from port {p} sticks to one server"),
                f.clone(),
                XDP_TX,
            )
            .output(with_macs(
                &f,
                LB_MAC,
                mac_of(b.server_addr(sticky_server).0),
            )),
        );
    }

    // --- UDP through NAT: checksum updated; a datagram without checksum keeps none.
    let f = udp(ROUTER_MAC, LB_MAC, CLIENT, 6000, VIP, 5353, b"query");
    let udp_server = b.row(NATUDP)[0];
    fx.push(
        Fixture::new(
            "nat udp: rewritten with its checksum updated",
            f.clone(),
            XDP_REDIRECT,
        )
        .output(nat_expected(
            &f,
            (LB_NAT_MAC, mac_of(N1)),
            (NAT, ports.next(udp_server)),
            (N1, 53),
        )),
    );
    let mut f = udp(ROUTER_MAC, LB_MAC, CLIENT, 6001, VIP, 5353, b"query");
    f[40..42].copy_from_slice(&[0, 0]);
    let want = nat_expected(
        &f,
        (LB_NAT_MAC, mac_of(N1)),
        (NAT, ports.next(udp_server)),
        (N1, 53),
    );
    assert_eq!(want[40..42], [0, 0]);
    fx.push(Fixture::new("nat udp without checksum keeps none", f, XDP_REDIRECT).output(want));

    // --- ICMP.
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
        .ipv4(CLIENT, VIP, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut echo, b"ping")
        .unwrap();
    fx.push(Fixture::new(
        "echo request to the VIP passes to the stack",
        echo,
        XDP_PASS,
    ));
    let (direct_srv, _) = b.server_addr(b.maglev(HTTP, &key(CLIENT, 40001, VIP, 80, IPPROTO_TCP)));
    let f = frag_needed(VIP, &server_reply_packet(VIP, 80, CLIENT, 40001));
    fx.push(
        Fixture::new(
            "frag-needed about a direct connection goes to its server",
            f.clone(),
            XDP_TX,
        )
        .output(with_macs(&f, LB_MAC, mac_of(direct_srv))),
    );
    let f = frag_needed(VIP, &server_reply_packet(VIP, 81, CLIENT, 40002));
    fx.push(
        Fixture::new(
            "frag-needed about a tunnel connection is tunnelled to its server",
            f.clone(),
            XDP_TX,
        )
        .output(ipip(&f, b.server_addr(row[0]).0)),
    );
    let nat_k = key(CLIENT, 40010, VIP, 82, IPPROTO_TCP);
    let f = frag_needed(VIP, &server_reply_packet(VIP, 82, CLIENT, 40010));
    let want = {
        // What the server sent: N1:8080 -> NAT:port; the outer packet now goes to the server.
        let quoted = server_reply_packet(n_addr, n_port, NAT, port);
        let mut w = frag_needed(n_addr, &quoted);
        w[0..6].copy_from_slice(&mac_of(n_addr));
        w[6..12].copy_from_slice(&LB_NAT_MAC);
        w
    };
    fx.push(
        Fixture::new(
            "frag-needed about a NAT connection is translated for its server",
            f,
            XDP_REDIRECT,
        )
        .output(want),
    );
    let f = frag_needed(VIP, &server_reply_packet(VIP, 80, CLIENT, 9));
    fx.push(Fixture::new(
        "ICMP error about no known connection passes",
        f,
        XDP_PASS,
    ));

    // --- not for a service: untouched.
    fx.push(Fixture::new(
        "tcp to another address passes",
        from_client(40000, OTHER, 80, SYN, b""),
        XDP_PASS,
    ));
    fx.push(Fixture::new(
        "tcp to the VIP on another port passes",
        from_client(40000, VIP, 22, SYN, b""),
        XDP_PASS,
    ));
    fx.push(Fixture::new(
        "udp to the VIP's tcp port passes",
        udp(ROUTER_MAC, LB_MAC, CLIENT, 40000, VIP, 80, b"x"),
        XDP_PASS,
    ));
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&ROUTER_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    fx.push(Fixture::new("arp passes", arp, XDP_PASS));
    // A tagged frame is VLAN traffic, never balanced as untagged (docs/DATAPLANE.md, "VLANs").
    for (tpid, what) in [(0x8100u16, "802.1Q"), (0x88a8, "802.1ad")] {
        let syn = from_client(40001, VIP, 80, SYN, b"");
        let mut frame = syn[..12].to_vec();
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&100u16.to_be_bytes());
        frame.extend_from_slice(&syn[12..]);
        fx.push(Fixture::new(
            format!("{what}-tagged SYN to the VIP passes"),
            frame,
            XDP_PASS,
        ));
    }

    // --- malformed: dropped, never forwarded.
    let syn = from_client(40200, VIP, 80, SYN, b"");
    let u = udp(ROUTER_MAC, LB_MAC, CLIENT, 5000, VIP, 53, b"query");
    fx.push(Fixture::new(
        "IPv4 frame with nothing after the Ethernet header",
        syn[..14].to_vec(),
        XDP_DROP,
    ));
    fx.push(Fixture::new(
        "IPv4 header cut short",
        syn[..14 + 12].to_vec(),
        XDP_DROP,
    ));
    let mut cut = syn[..14 + 20 + 10].to_vec();
    cut[16..18].copy_from_slice(&30u16.to_be_bytes());
    fix_ipv4_checksum(&mut cut);
    fx.push(Fixture::new(
        "TCP header cut short (to a service)",
        cut,
        XDP_DROP,
    ));
    let mut cut = u[..14 + 20 + 4].to_vec();
    cut[16..18].copy_from_slice(&24u16.to_be_bytes());
    fix_ipv4_checksum(&mut cut);
    fx.push(Fixture::new(
        "UDP header cut short (to a service)",
        cut,
        XDP_DROP,
    ));
    let mut bad = syn.clone();
    bad[14] = 0x44;
    fx.push(Fixture::new("IHL of 4 (16-byte header)", bad, XDP_DROP));
    let mut bad = syn.clone();
    bad[14] = 0x65;
    fx.push(Fixture::new("version 6 in an IPv4 frame", bad, XDP_DROP));
    let mut bad = syn.clone();
    bad[24] ^= 0x55;
    fx.push(Fixture::new(
        "wrong IPv4 header checksum (to a service)",
        bad,
        XDP_DROP,
    ));
    let mut bad = syn.clone();
    bad[16..18].copy_from_slice(&1000u16.to_be_bytes());
    fix_ipv4_checksum(&mut bad);
    fx.push(Fixture::new(
        "IPv4 total length beyond the frame",
        bad,
        XDP_DROP,
    ));
    let mut frag = syn.clone();
    frag[20..22].copy_from_slice(&(0x2000u16 | 100).to_be_bytes());
    fix_ipv4_checksum(&mut frag);
    fx.push(Fixture::new(
        "non-first fragment to the VIP",
        frag,
        XDP_DROP,
    ));
    let mut frag = syn.clone();
    frag[20..22].copy_from_slice(&50u16.to_be_bytes());
    fix_ipv4_checksum(&mut frag);
    fx.push(Fixture::new(
        "last fragment to another address passes",
        {
            let mut f = frag.clone();
            f[30..34].copy_from_slice(&OTHER);
            fix_ipv4_checksum(&mut f);
            f
        },
        XDP_PASS,
    ));

    // --- IP options and first fragments are forwarded like any packet of the connection.
    let opts = {
        let plain = from_client(40001, VIP, 80, ACK, b"more");
        let mut f = plain[..34].to_vec();
        f[14] = 0x46;
        let len = u16::from_be_bytes([f[16], f[17]]) + 4;
        f[16..18].copy_from_slice(&len.to_be_bytes());
        f.extend_from_slice(&[0x01, 0x01, 0x01, 0x00]); // NOP NOP NOP EOL
        f.extend_from_slice(&plain[34..]);
        fix_ipv4_checksum(&mut f);
        f
    };
    fx.push(
        Fixture::new(
            "IPv4 options: forwarded with its options by direct routing",
            opts.clone(),
            XDP_TX,
        )
        .output(with_macs(&opts, LB_MAC, mac_of(direct_srv))),
    );
    let mut first_frag = from_client(40001, VIP, 80, ACK, b"first fragment");
    first_frag[20..22].copy_from_slice(&0x2000u16.to_be_bytes());
    fix_ipv4_checksum(&mut first_frag);
    fx.push(
        Fixture::new(
            "first fragment (ports present) follows its connection",
            first_frag.clone(),
            XDP_TX,
        )
        .output(with_macs(&first_frag, LB_MAC, mac_of(direct_srv))),
    );

    // --- too big for the path to the server: an ICMP fragmentation-needed goes back to the
    // client with the MTU it must use (IPIP adds 20 bytes; the NAT side's MTU is 1400).
    let big = from_client(40400, VIP, 81, ACK, &[0u8; 1460]);
    fx.push(
        Fixture::new(
            "tunnel: 1500 bytes with DF get frag-needed, MTU 1480",
            big.clone(),
            XDP_TX,
        )
        .output(too_big_reply(&big, VIP, 1480)),
    );
    let big = from_client(40401, VIP, 82, SYN, &[0u8; 1460]);
    fx.push(
        Fixture::new(
            "nat: 1500 bytes toward a 1400 MTU get frag-needed, MTU 1400",
            big.clone(),
            XDP_TX,
        )
        .output(too_big_reply(&big, VIP, 1400)),
    );
    let mut big = from_client(40402, VIP, 81, ACK, &[0u8; 1460]);
    big[20] = 0; // DF off
    fix_ipv4_checksum(&mut big);
    fx.push(Fixture::new(
        "tunnel: too big without DF is dropped",
        big,
        XDP_DROP,
    ));

    // --- a service whose only server is down takes no connection.
    fx.push(Fixture::new(
        "no server up: the SYN is dropped",
        from_client(40300, VIP_DEAD, 80, SYN, b""),
        XDP_DROP,
    ));

    assert!(fx.len() >= 30, "{} fixtures", fx.len());
    b.run(&fx);

    // Every packet landed in exactly one outcome.
    let s = b.dp.stats().unwrap();
    let outcomes = s.get(Stat::Passed) + s.get(Stat::Forwarded) + s.dropped();
    assert_eq!(s.get(Stat::Packets), fx.len() as u64, "{s:?}");
    assert_eq!(outcomes, s.get(Stat::Packets), "{s:?}");
    assert_eq!(s.get(Stat::IcmpSteered), 3, "{s:?}");
    assert_eq!(s.get(Stat::DropFragment), 1, "{s:?}");
    assert_eq!(s.get(Stat::DropNoServer), 1, "{s:?}");
    assert_eq!(
        (s.get(Stat::DropTooBig), s.get(Stat::IcmpSent)),
        (3, 2),
        "{s:?}"
    );
    assert_eq!(s.get(Stat::DropMalformed), 8, "{s:?}");
    assert_eq!(s.get(Stat::Tagged), 2, "{s:?}");

    // NAT connections are two entries; the reply leg records the client.
    let conns = b.dp.connections().unwrap();
    let fwd = conns
        .iter()
        .find(|(k, _)| *k == nat_k)
        .expect("NAT forward entry")
        .1;
    assert_ne!(fwd.flags & lb_common::CONN_NAT, 0);
    let reply_key = key(n_addr, n_port, NAT, port, IPPROTO_TCP);
    let reply = conns
        .iter()
        .find(|(k, _)| *k == reply_key)
        .expect("NAT reply entry")
        .1;
    assert_eq!(reply.nat_addr, Addr::from_v4_octets(CLIENT));
    assert_eq!(reply.packets, 1);
}

/// In a planned handover both ATMs make NAT connections for a moment, each before the
/// other's records arrive: the new primary takes the odd port offsets, the old one the even,
/// so no pair is handed out twice. After the handover every port is handed out again.
#[test]
fn during_a_handover_an_atm_hands_out_only_its_stripe_of_nat_ports() {
    pin_to_cpu0();
    let mut b = Bench::new();
    let wrr = b.row(NATSVC);
    let (n_addr, n_port) = b.server_addr(wrr[0]);
    let mut s = settings();
    s.peer_addr = u32::from_ne_bytes([192, 0, 2, 9]);
    s.peer_until_ns = now_ns() + 60_000_000_000;
    s.nat_stripe = 2;
    b.dp.set_settings(&s).unwrap();
    // wrr sends the first connection to wrr[0]: a new primary takes offset 1, not 0.
    let syn = from_client(40400, VIP, 82, SYN, b"");
    let expected = |f: &[u8], port| {
        nat_expected(
            f,
            (LB_NAT_MAC, mac_of(n_addr)),
            (NAT, port),
            (n_addr, n_port),
        )
    };
    b.run(&[Fixture::new(
        "new primary in a handover: odd offsets",
        syn.clone(),
        XDP_REDIRECT,
    )
    .output(expected(&syn, NAT_PORT_MIN + 1))]);
    // The handover over, the even offsets are handed out again.
    s.peer_until_ns = now_ns().saturating_sub(1);
    b.dp.set_settings(&s).unwrap();
    // wrr goes 5, 5, 6, 5: the next connection to wrr[0] is the next but one.
    assert_eq!(wrr[1], wrr[0]);
    let syn = from_client(40401, VIP, 82, SYN, b"");
    b.run(&[Fixture::new(
        "after the handover: every offset",
        syn.clone(),
        XDP_REDIRECT,
    )
    .output(expected(&syn, NAT_PORT_MIN + 2))]);
}

/// An old primary in one-arm NAT gives the gateway's address away, and with it the NAT
/// subnet's route, while it still forwards for the clients and servers that have not moved:
/// its connections go on through the server's last known hop, not into `drop_no_route`.
#[test]
fn a_nat_server_whose_route_went_away_is_reached_through_its_last_hop() {
    pin_to_cpu0();
    let mut b = Bench::new();
    let wrr = b.row(NATSVC);
    let port = NatPorts::default().next(wrr[0]);
    let (n_addr, n_port) = b.server_addr(wrr[0]);
    let expected = |f: &[u8]| {
        nat_expected(
            f,
            (LB_NAT_MAC, mac_of(n_addr)),
            (NAT, port),
            (n_addr, n_port),
        )
    };
    let syn = from_client(40300, VIP, 82, SYN, b"");
    b.run(&[
        Fixture::new("SYN: the hop is looked up", syn.clone(), XDP_REDIRECT).output(expected(&syn)),
    ]);
    b.lab
        .ns("fx")
        .exec_ok(&["ip", "addr", "del", "203.0.113.1/24", "dev", "eth1"]);
    let mut s = b.dp.server(wrr[0]).unwrap();
    s.hop_until_ns = 0;
    b.dp.set_server(wrr[0], &s).unwrap();
    let ack = from_client(40300, VIP, 82, ACK, b"GET / HTTP/1.0\r\n\r\n");
    b.run(&[
        Fixture::new("no route any more: the last hop", ack.clone(), XDP_REDIRECT)
            .output(expected(&ack)),
    ]);
    assert_eq!(b.dp.stats().unwrap().get(Stat::DropNoRoute), 0);
}

/// A synced entry carries the daemon's time, which may be a little ahead of the dataplane's
/// coarse clock: it is fresh, not (by a wrapping subtraction) 2^64 ns idle. Such an entry
/// was rescheduled, and in NAT mode its next segment went to the other ATM.
#[test]
fn an_entry_stamped_ahead_of_the_dataplanes_clock_is_fresh() {
    pin_to_cpu0();
    let mut b = Bench::new();
    let (first, _) = b.spec(TUN);
    let row = b.row(TUN);
    let k = key(CLIENT, 45100, VIP, 81, IPPROTO_TCP);
    let ahead = Connection {
        last_seen_ns: now_ns() + 5_000_000,
        packets: 1,
        server: first + 2,
        ..Default::default()
    };
    b.dp.set_connection(&k, &ahead).unwrap();
    // rr would start a new connection at slot 0: the entry's server is elsewhere.
    assert_ne!(row[0], first + 2);
    let f = from_client(45100, VIP, 81, ACK, b"");
    b.run(&[
        Fixture::new("stamped 5 ms ahead: its own server", f.clone(), XDP_TX)
            .output(ipip(&f, b.server_addr(first + 2).0)),
    ]);
    assert_eq!(b.dp.connection(&k).unwrap().packets, 2);
}

/// lb_xdp's clock is worked out from jiffies (lb-ebpf/src/clock.rs): it must follow
/// CLOCK_MONOTONIC_COARSE, the clock the daemon stamps entries with, within a tick or two,
/// from a CPU's first packet past a new base (every 1,000 jiffies: 4 s at HZ 250, 1 s at
/// HZ 1000). Both ways: at the rate the daemon gives (`Settings::tick_ns`, as lb-daemon
/// does) and at the rate the CPU measures when it is not given. Read back from the time it
/// writes into a connection's entry.
#[test]
fn the_dataplanes_clock_follows_the_coarse_clock() {
    pin_to_cpu0();
    for tick_ns in [lb_daemon::dataplane::tick_ns(), 0] {
        // A fresh dataplane: its per-CPU clock starts from nothing.
        let mut b = Bench::new();
        b.dp.set_settings(&Settings {
            tick_ns,
            ..settings()
        })
        .unwrap();
        let (first, _) = b.spec(TUN);
        let k = key(CLIENT, 45200, VIP, 81, IPPROTO_TCP);
        b.dp.set_connection(
            &k,
            &Connection {
                last_seen_ns: now_ns(),
                packets: 1,
                server: first,
                ..Default::default()
            },
        )
        .unwrap();
        let f = from_client(45200, VIP, 81, ACK, b"");
        // Two ticks at HZ 100, the coarsest kernels build.
        const SLACK: u64 = 20_000_000;
        let mut worst = 0i64;
        let start = std::time::Instant::now();
        let mut n = 0;
        while start.elapsed() < std::time::Duration::from_millis(4_500) {
            let before = now_ns();
            {
                let _in = b.lab.ns("fx").enter();
                let (action, _) = b.dp.test_run(&f, b.eth0).unwrap();
                assert_eq!(action, XDP_TX);
            }
            let after = now_ns();
            let seen = b.dp.connection(&k).unwrap().last_seen_ns;
            assert!(
                seen + SLACK >= before && seen <= after + SLACK,
                "tick_ns {tick_ns}, packet {n}: the dataplane said {seen}, the coarse clock \
                 {before}..{after}"
            );
            let off = if seen < before {
                before as i64 - seen as i64
            } else if seen > after {
                after as i64 - seen as i64
            } else {
                0
            };
            if off.abs() > worst.abs() {
                worst = off;
            }
            n += 1;
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
        assert!(n > 100, "only {n} packets in 4.5 s");
        eprintln!(
            "tick_ns {tick_ns}: {n} packets over 4.5 s; the farthest from the coarse clock: \
             {worst} ns"
        );
    }
}

#[test]
fn idle_connections_count_as_new_and_down_servers_lose_theirs() {
    pin_to_cpu0();
    let mut b = Bench::new();
    let (first, _) = b.spec(TUN);
    let row = b.row(TUN);
    // A connection that last saw a packet longer ago than the timeout...
    let k = key(CLIENT, 45000, VIP, 81, IPPROTO_TCP);
    let stale = Connection {
        last_seen_ns: now_ns() - 200_000_000_000,
        packets: 5,
        server: first + 2,
        ..Default::default()
    };
    b.dp.set_connection(&k, &stale).unwrap();
    let f = from_client(45000, VIP, 81, ACK, b"");
    // ...is scheduled afresh: rr's cursor starts at slot 0, not at the stale server.
    b.run(&[
        Fixture::new("idle past the timeout: rescheduled", f.clone(), XDP_TX)
            .output(ipip(&f, b.server_addr(row[0]).0)),
    ]);
    let c = b.dp.connection(&k).unwrap();
    assert_eq!((c.server, c.packets), (row[0], 1));

    // Its server goes down: the next packet of the connection goes to a server that is up
    // (rr's cursor has moved on to slot 1).
    assert_eq!(row[0], first);
    b.dp.set_server_state(TUN, first, false, 1).unwrap();
    let row = b.row(TUN);
    assert_eq!(row, vec![first + 1, first + 2]);
    let f = from_client(45000, VIP, 81, ACK, b"");
    b.run(
        &[Fixture::new("server down: rescheduled", f.clone(), XDP_TX)
            .output(ipip(&f, b.server_addr(row[1]).0))],
    );
    assert_eq!(b.dp.connection(&k).unwrap().server, row[1]);

    // A SYN reusing the tuple of a finished connection is a new connection.
    let k = key(CLIENT, 45001, VIP, 81, IPPROTO_TCP);
    let finished = Connection {
        last_seen_ns: now_ns(),
        server: row[1],
        flags: lb_common::CONN_FIN,
        ..Default::default()
    };
    b.dp.set_connection(&k, &finished).unwrap();
    let f = from_client(45001, VIP, 81, SYN, b"");
    b.run(&[
        Fixture::new("SYN after FIN: rescheduled", f.clone(), XDP_TX)
            .output(ipip(&f, b.server_addr(row[0]).0)),
    ]);
    assert_eq!(b.dp.stats().unwrap().get(Stat::NewConns), 3);
}

/// `max_new_per_sec_per_source` and `max_new_per_sec`: a client prefix's new connections
/// past its burst are dropped and counted, then the service's past its own; packets of the
/// connections let in go on.
#[test]
fn new_connections_over_a_services_limits_are_dropped_and_established_ones_go_on() {
    pin_to_cpu0();
    let b = Bench::new();
    let mut spec = b.spec(HTTP).1.clone();
    // Bursts of one second's worth: 2 per /24, 3 for the service.
    spec.max_new_per_sec = 3;
    spec.max_new_per_src = 2;
    spec.limit_prefix = 24;
    let mut b = b;
    b.dp.install(HTTP, &spec).unwrap();
    let syn = |src: [u8; 4], sport: u16| tcp(ROUTER_MAC, LB_MAC, src, sport, VIP, 80, SYN, b"");
    let other = |last: u8| [192, 0, 2, last];
    let steps = [
        ("the /24's first", syn(CLIENT, 41001), XDP_TX),
        ("the /24's second", syn(CLIENT, 41002), XDP_TX),
        (
            "another of the /24: over its limit",
            syn([198, 51, 100, 8], 41003),
            XDP_DROP,
        ),
        (
            "the first connection's next packet",
            from_client(41001, VIP, 80, ACK, b"data"),
            XDP_TX,
        ),
        ("another /24's first", syn(other(77), 41004), XDP_TX),
        (
            "that /24's second: over the service's limit",
            syn(other(78), 41005),
            XDP_DROP,
        ),
        (
            "a retransmitted SYN of a connection let in",
            syn(CLIENT, 41002),
            XDP_TX,
        ),
    ];
    for (what, frame, want) in steps {
        let (got, _) = b.once(&frame);
        assert_eq!(
            action_name(got),
            action_name(want),
            "{what}: {}",
            decode(&frame)
        );
    }
    let st = b.dp.stats().unwrap();
    assert_eq!(st.get(Stat::DropRateLimited), 2);
    assert_eq!(st.get(Stat::NewConns), 3);
    assert_eq!(st.dropped(), 2, "counted among the drops");
}

#[test]
fn nat_packets_of_unknown_connections_are_dropped_while_settling_then_passed() {
    pin_to_cpu0();
    let mut b = Bench::new();
    let mut s = settings();
    s.settle_until_ns = now_ns() + 60_000_000_000;
    b.dp.set_settings(&s).unwrap();
    // Just after a takeover: a mid-stream packet of a connection this ATM never saw (its
    // entry still on its way) would draw a reset from the server as a fresh translation, and
    // from the stack if passed: dropped, and nothing recorded. (Direct and tunnel take such
    // packets up: see the test above.)
    let ack = from_client(46000, VIP, 82, ACK, b"data");
    // A server's packet to the NAT address on a NAT port with no entry: the stack holds the
    // address and would reset the server's side. On a port outside the NAT range it is the
    // stack's (the ATM's own connections).
    let reply = |port| {
        tcp(
            mac_of(N1),
            LB_NAT_MAC,
            N1,
            8080,
            NAT,
            port,
            ACK,
            b"response",
        )
    };
    b.run(&[
        Fixture::new(
            "settling: nat, an ACK of no connection is dropped",
            ack.clone(),
            XDP_DROP,
        ),
        Fixture::new(
            "settling: nat address, NAT port, no entry: dropped",
            reply(NAT_PORT_MIN + 7),
            XDP_DROP,
        )
        .on(b.eth1),
        Fixture::new(
            "nat address, a port above the NAT range: passed",
            reply(NAT_PORT_MAX + 2),
            XDP_PASS,
        )
        .on(b.eth1),
    ]);
    assert!(
        b.dp.connection(&key(CLIENT, 46000, VIP, 82, IPPROTO_TCP))
            .is_none()
    );
    let stats = b.dp.stats().unwrap();
    assert_eq!(stats.get(Stat::DropNoConnection), 2);
    assert_eq!(stats.get(Stat::NewConns), 0);
    // Settled: such a connection is gone, and the stack's reset says so at once.
    b.dp.set_settings(&settings()).unwrap();
    b.run(&[
        Fixture::new(
            "settled: nat, an ACK of no connection passes",
            ack,
            XDP_PASS,
        ),
        Fixture::new(
            "settled: nat address, NAT port, no entry: passes",
            reply(NAT_PORT_MIN + 7),
            XDP_PASS,
        )
        .on(b.eth1),
    ]);
    let stats = b.dp.stats().unwrap();
    assert_eq!(stats.get(Stat::DropNoConnection), 2);
    assert_eq!(stats.get(Stat::NewConns), 0);
    // (A SYN opens one: the NAT fixtures of dataplane_fixtures.)
}

/// A planned handover: for a moment both ATMs forward, and each may receive packets of a
/// connection the other made moments ago (its record not here yet). Such packets go to the
/// other ATM unchanged; never back to it (a connection neither knows is dropped while
/// settling, as without a peer).
#[test]
fn in_a_planned_handover_packets_of_unknown_nat_connections_go_to_the_other_atm() {
    pin_to_cpu0();
    let mut b = Bench::new();
    const PEER: [u8; 4] = [192, 0, 2, 3];
    b.lab.neigh(
        "fx",
        "eth0",
        &Ipv4Addr::from(PEER).to_string(),
        &mac_str(mac_of(PEER)),
    );
    let mut s = settings();
    s.settle_until_ns = now_ns() + 60_000_000_000;
    s.peer_addr = u32::from_ne_bytes(PEER);
    s.peer_until_ns = s.settle_until_ns;
    b.dp.set_settings(&s).unwrap();
    let ack = from_client(46000, VIP, 82, ACK, b"data");
    let reply = tcp(
        mac_of(N1),
        LB_NAT_MAC,
        N1,
        8080,
        NAT,
        NAT_PORT_MIN + 7,
        ACK,
        b"response",
    );
    let from_peer = with_macs(&reply, mac_of(PEER), LB_MAC);
    b.run(&[
        Fixture::new(
            "handover: a client's ACK of no connection goes to the other ATM",
            ack.clone(),
            XDP_TX,
        )
        .output(with_macs(&ack, LB_MAC, mac_of(PEER))),
        Fixture::new(
            "handover: a server's reply to a NAT port of no connection goes to the other ATM",
            reply.clone(),
            XDP_REDIRECT,
        )
        .on(b.eth1)
        .output(with_macs(&reply, LB_MAC, mac_of(PEER))),
        Fixture::new(
            "handover: from the other ATM, unknown there too: not sent back",
            from_peer,
            XDP_DROP,
        ),
    ]);
    let stats = b.dp.stats().unwrap();
    assert_eq!(stats.get(Stat::ToPeer), 2);
    assert_eq!(stats.get(Stat::DropNoConnection), 1);
    assert_eq!(stats.get(Stat::NewConns), 0);
    // The handover over (a second ago: the program reads a coarse clock): settling as
    // without a peer.
    s.peer_until_ns = now_ns() - 1_000_000_000;
    b.dp.set_settings(&s).unwrap();
    b.run(&[Fixture::new(
        "handover over: dropped while settling",
        ack,
        XDP_DROP,
    )]);
    let stats = b.dp.stats().unwrap();
    assert_eq!(stats.get(Stat::ToPeer), 2);
    assert_eq!(stats.get(Stat::DropNoConnection), 2);
}

#[test]
fn the_connection_table_reads_whole_across_batches() {
    let mut b = Bench::new();
    // More than two batches of 4096, so the kernel's resume token is exercised.
    let n = 10_000u32;
    for i in 0..n {
        let k = key(
            [198, 51, 100, (i >> 8) as u8],
            (i & 0xff) as u16 + 1,
            VIP,
            80,
            IPPROTO_TCP,
        );
        let c = Connection {
            last_seen_ns: now_ns(),
            packets: i as u64,
            ..Default::default()
        };
        b.dp.set_connection(&k, &c).unwrap();
    }
    let all = b.dp.connections().unwrap();
    assert_eq!(all.len(), n as usize);
    let mut seen: Vec<u64> = all.iter().map(|(_, c)| c.packets).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..n as u64).collect::<Vec<_>>(), "every entry once");
    for (k, c) in &all {
        assert_eq!(
            b.dp.connection(k).unwrap().packets,
            c.packets,
            "keys match values"
        );
    }
    // The handle the sweep uses, from another thread: reads the same, removes for real.
    let mut t = b.dp.conn_table().unwrap();
    let (k0, c0) = all[0];
    std::thread::spawn(move || {
        assert_eq!(t.entries().unwrap().len(), n as usize);
        assert_eq!(t.remove_where(|c| c.packets == c0.packets).unwrap(), 1);
    })
    .join()
    .unwrap();
    assert!(b.dp.connection(&k0).is_none());
    assert_eq!(b.dp.connections().unwrap().len(), n as usize - 1);
}

#[test]
fn a_backup_passes_everything_untouched() {
    let mut b = Bench::new();
    let mut s = settings();
    s.flags = 0;
    b.dp.set_settings(&s).unwrap();
    b.run(&[
        Fixture::new(
            "SYN to a VIP on a backup",
            from_client(40001, VIP, 80, SYN, b""),
            XDP_PASS,
        ),
        Fixture::new(
            "malformed on a backup",
            from_client(40001, VIP, 80, SYN, b"")[..20].to_vec(),
            XDP_PASS,
        ),
    ]);
    assert_eq!(b.dp.stats().unwrap().get(Stat::VipPackets), 0);
}

#[test]
fn an_orphaned_primary_drops_service_traffic_instead_of_passing_it() {
    let mut b = Bench::new();
    let mut s = settings();
    // A second ago: the dataplane reads a coarse clock, up to a tick behind.
    s.lease_ns = now_ns() - 1_000_000_000;
    b.dp.set_settings(&s).unwrap();
    b.run(&[
        Fixture::new(
            "SYN to a service past the lease",
            from_client(40001, VIP, 80, SYN, b""),
            XDP_DROP,
        ),
        Fixture::new(
            "other traffic still passes",
            from_client(40001, OTHER, 80, SYN, b""),
            XDP_PASS,
        ),
    ]);
    assert_eq!(b.dp.stats().unwrap().get(Stat::DropOrphaned), 1);
    s.lease_ns = now_ns() + 10_000_000_000;
    b.dp.set_settings(&s).unwrap();
    b.run(&[Fixture::new(
        "renewed: forwarded again",
        from_client(40001, VIP, 80, SYN, b""),
        XDP_TX,
    )
    .output(with_macs(
        &from_client(40001, VIP, 80, SYN, b""),
        LB_MAC,
        mac_of(
            b.server_addr(b.maglev(HTTP, &key(CLIENT, 40001, VIP, 80, IPPROTO_TCP)))
                .0,
        ),
    ))]);
}

/// A killed daemon leaves its VIP aliases behind, and the kernel would answer ARP for them:
/// past the lease the orphan drops those requests, so that clients resolve the VIPs and the
/// NAT address to the ATM that took over. Other ARP is the stack's, whatever the lease.
#[test]
fn an_orphaned_primary_fences_its_vips_and_nat_address_at_layer_2() {
    const ROUTER: [u8; 4] = [192, 0, 2, 254];
    let mut b = Bench::new();
    let who_has = |target: [u8; 4]| arp_request(ROUTER_MAC, ROUTER, target);
    let nat_who_has = |target: [u8; 4]| arp_request(mac_of(N1), N1, target);
    let mut s = settings();
    s.lease_ns = now_ns() + 10_000_000_000;
    b.dp.set_settings(&s).unwrap();
    b.run(&[
        Fixture::new("who-has a VIP, lease valid", who_has(VIP), XDP_PASS),
        Fixture::new(
            "who-has the NAT address, lease valid",
            nat_who_has(NAT),
            XDP_PASS,
        )
        .on(b.eth1),
        Fixture::new(
            "who-has another address, lease valid",
            who_has(OTHER),
            XDP_PASS,
        ),
    ]);
    let stats = b.dp.stats().unwrap();
    assert_eq!(
        (stats.get(Stat::Passed), stats.get(Stat::DropFenced)),
        (3, 0),
        "{stats:?}"
    );

    // A second ago: the dataplane reads a coarse clock, up to a tick behind.
    s.lease_ns = now_ns() - 1_000_000_000;
    b.dp.set_settings(&s).unwrap();
    b.run(&[
        Fixture::new("who-has a VIP past the lease", who_has(VIP), XDP_DROP),
        Fixture::new("who-has another VIP", who_has(VIP_STICKY), XDP_DROP),
        Fixture::new(
            "who-has a VIP whose one server is down",
            who_has(VIP_DEAD),
            XDP_DROP,
        ),
        Fixture::new(
            "who-has the NAT address from a NAT server",
            nat_who_has(NAT),
            XDP_DROP,
        )
        .on(b.eth1),
        Fixture::new(
            "the new primary's gratuitous ARP (a request for the VIP from the VIP)",
            arp_request([0x02, 0, 0, 0, 0, 0x03], VIP, VIP),
            XDP_DROP,
        ),
        Fixture::new("who-has another address", who_has(OTHER), XDP_PASS),
        Fixture::new("who-has the ATM's own address", who_has(LB), XDP_PASS),
        Fixture::new(
            "who-has an address ending like a VIP",
            who_has([198, 51, 100, 100]),
            XDP_PASS,
        ),
        Fixture::new(
            "a reply to the VIP (to a request the stack made) is no question",
            arp_reply(ROUTER_MAC, ROUTER, LB_MAC, VIP),
            XDP_PASS,
        ),
        Fixture::new(
            "a truncated request is the stack's to refuse",
            who_has(VIP)[..40].to_vec(),
            XDP_PASS,
        ),
    ]);
    let stats = b.dp.stats().unwrap();
    assert_eq!(stats.get(Stat::DropFenced), 5, "{stats:?}");
    assert_eq!(stats.get(Stat::DropOrphaned), 0, "{stats:?}");
    assert_eq!(
        stats.get(Stat::VipPackets),
        0,
        "ARP is no service traffic: {stats:?}"
    );
    assert_eq!(
        stats.get(Stat::Passed) + stats.get(Stat::Forwarded) + stats.dropped(),
        stats.get(Stat::Packets),
        "{stats:?}"
    );

    // Renewed (a daemon that was stalled, not dead): answered again.
    s.lease_ns = now_ns() + 10_000_000_000;
    b.dp.set_settings(&s).unwrap();
    b.run(&[
        Fixture::new("who-has a VIP, lease renewed", who_has(VIP), XDP_PASS),
        Fixture::new(
            "who-has the NAT address, lease renewed",
            nat_who_has(NAT),
            XDP_PASS,
        )
        .on(b.eth1),
    ]);

    // A backup holds no aliases; its dataplane leaves everything to the stack, lease or not.
    s.flags = 0;
    s.lease_ns = now_ns() - 1_000_000_000;
    b.dp.set_settings(&s).unwrap();
    b.run(&[
        Fixture::new("who-has a VIP on a backup", who_has(VIP), XDP_PASS),
        Fixture::new(
            "who-has the NAT address on a backup",
            nat_who_has(NAT),
            XDP_PASS,
        )
        .on(b.eth1),
    ]);
    assert_eq!(b.dp.stats().unwrap().get(Stat::DropFenced), 5);
}

#[test]
fn connections_of_a_removed_service_pass_and_the_vip_filter_follows_the_services() {
    let mut b = Bench::new();
    // Slots count the VIPs (192.0.2.100, .101, .102) and the NAT address (203.0.113.1).
    let filter = b.dp.vip_filter().unwrap();
    let lit: Vec<usize> = (0..filter.len()).filter(|i| filter[*i] != 0).collect();
    assert_eq!(lit, vec![1, 100, 101, 102]);

    let syn = from_client(41000, VIP, 80, SYN, b"");
    let srv = b.server_addr(b.maglev(HTTP, &key(CLIENT, 41000, VIP, 80, IPPROTO_TCP)));
    b.run(&[
        Fixture::new("SYN: a connection to a direct server", syn.clone(), XDP_TX)
            .output(with_macs(&syn, LB_MAC, mac_of(srv.0))),
        // Its last octet is a VIP's, so it gets past the filter, and no lookup claims it.
        Fixture::new(
            "tcp to another address ending like a VIP passes",
            from_client(41000, [198, 51, 100, 100], 80, SYN, b""),
            XDP_PASS,
        ),
    ]);
    let vip_packets = b.dp.stats().unwrap().get(Stat::VipPackets);

    // The service goes: its connection is found first, but its server is marked down with
    // it, so the packet is nobody's (the VIP keeps other services: not filtered out).
    b.dp.uninstall(HTTP).unwrap();
    let ack = from_client(41000, VIP, 80, ACK, b"");
    let tun = from_client(41001, VIP, 81, SYN, b"");
    let row = b.row(TUN);
    b.run(&[
        Fixture::new(
            "ACK of a removed service's connection passes",
            ack,
            XDP_PASS,
        ),
        Fixture::new(
            "the VIP's other services still forward",
            tun.clone(),
            XDP_TX,
        )
        .output(ipip(&tun, b.server_addr(row[0]).0)),
    ]);
    assert_eq!(b.dp.stats().unwrap().get(Stat::VipPackets), vip_packets + 1);

    // The last service of 192.0.2.102 goes: its slot empties; the others stay.
    b.dp.uninstall(DEAD).unwrap();
    let filter = b.dp.vip_filter().unwrap();
    assert_eq!((filter[100], filter[101], filter[102]), (1, 1, 0));
    b.run(&[Fixture::new(
        "SYN to a VIP with no service left passes",
        from_client(41002, VIP_DEAD, 80, SYN, b""),
        XDP_PASS,
    )]);
}

/// The capacity: 4,096 services of 10 servers in one dataplane, each row in a page
/// of the shared pool, and a rebuilt row published whole in fresh pages.
#[test]
fn four_thousand_services_share_the_ring_pool_and_rows_are_replaced_whole() {
    const MANY: u32 = 4096;
    const FIRST_ID: u32 = 7;
    const FIRST_INDEX: u32 = 14;
    let caps = Capacities {
        services: FIRST_ID + MANY,
        servers: FIRST_INDEX + MANY * 10,
        connections: 1024,
    };
    let mut b = Bench::with_caps(caps);
    let (pages, free) = b.dp.ring_pages();
    assert_eq!(
        pages,
        lb_common::ring_pool_pages(caps.services, caps.servers) as usize
    );
    for i in 0..MANY {
        let id = FIRST_ID + i;
        let first = FIRST_INDEX + i * 10;
        let mut spec = service(
            VIP,
            10_000 + i as u16,
            IPPROTO_TCP,
            Sched::Maglev,
            (0..10u16)
                .map(|j| server([S1, S2, S3][j as usize % 3], 10_000 + j, 1, Method::Direct))
                .collect(),
        );
        for (j, s) in spec.servers.iter_mut().enumerate() {
            s.index = first + j as u32;
        }
        b.dp.install(id, &spec).expect("install a service");
        b.services.push((id, first, spec));
    }
    // One page each: a ring of 10 lines has 1021 slots.
    let (_, left) = b.dp.ring_pages();
    assert_eq!(free - left, MANY as usize);
    let last = FIRST_ID + MANY - 1;
    let row = b.row(last);
    assert_eq!(row.len(), 1021);
    let first = FIRST_INDEX + (MANY - 1) * 10;
    assert!(row.iter().all(|s| (first..first + 10).contains(s)));
    assert_eq!(b.dp.services().unwrap().len(), (FIRST_ID + MANY) as usize);

    let port = 10_000 + (MANY - 1) as u16;
    let k = key(CLIENT, 47000, VIP, port, IPPROTO_TCP);
    let chosen = b.maglev(last, &k);
    let syn = from_client(47000, VIP, port, SYN, b"");
    b.run(&[
        Fixture::new("SYN to the last of 4,103 services", syn.clone(), XDP_TX).output(with_macs(
            &syn,
            LB_MAC,
            mac_of(b.server_addr(chosen).0),
        )),
    ]);

    // Its server goes down: the row is rebuilt in a fresh page and the old one comes back
    // to the pool; a new flow that hashed to it now goes elsewhere.
    b.dp.set_server_state(last, chosen, false, 1).unwrap();
    assert_eq!(b.dp.ring_pages().1, left);
    let row = b.row(last);
    assert_eq!(row.len(), 1021);
    assert!(!row.contains(&chosen));
    let k2 = key(CLIENT, 47001, VIP, port, IPPROTO_TCP);
    let syn = from_client(47001, VIP, port, SYN, b"");
    let now = b.maglev(last, &k2);
    b.run(&[
        Fixture::new("SYN after the row was replaced", syn.clone(), XDP_TX).output(with_macs(
            &syn,
            LB_MAC,
            mac_of(b.server_addr(now).0),
        )),
    ]);

    // Removing services gives their pages back.
    for id in FIRST_ID..FIRST_ID + 100 {
        b.dp.uninstall(id).unwrap();
    }
    assert_eq!(b.dp.ring_pages().1, left + 100);
}

/// The bytes the dataplane counts for a frame: its IP length and the Ethernet header.
fn counted(frame: &[u8]) -> u64 {
    u16::from_be_bytes([frame[16], frame[17]]) as u64 + 14
}

/// Established packets after the first go by the CPU's flow cache, in each method, with
/// the same output as the full path; the table (and `connection`) still counts every
/// packet, a down server, a FIN and a colliding flow take the full path, and after a
/// second the full path brings the shared entry up to date.
#[test]
fn established_flows_go_by_the_flow_cache_and_every_packet_is_still_counted() {
    pin_to_cpu0();
    let mut b = Bench::new();
    let mut flows = Vec::new();
    for (svc, port, sport) in [
        (HTTP, 80u16, 46000u16),
        (TUN, 81, 46001),
        (NATSVC, 82, 46002),
    ] {
        let syn = from_client(sport, VIP, port, SYN, b"");
        let (action, _) = b.once(&syn);
        assert!(
            action == XDP_TX || action == XDP_REDIRECT,
            "{svc}: {action}"
        );
        let k = key(CLIENT, sport, VIP, port, IPPROTO_TCP);
        let c = b.dp.connection(&k).unwrap();
        let (server, _) = b.server_addr(c.server);
        let ack = from_client(sport, VIP, port, ACK, b"cached");
        let expected = match svc {
            HTTP => with_macs(&ack, LB_MAC, mac_of(server)),
            TUN => ipip(&ack, server),
            _ => nat_expected(
                &ack,
                (LB_NAT_MAC, mac_of(server)),
                (NAT, u16::from_be(c.nat_port)),
                (server, 8080),
            ),
        };
        // The first two by the full path, the second (the connection's third packet)
        // caching the flow; three from the cache.
        for i in 0..5 {
            let (action, out) = b.once(&ack);
            assert!(
                action == XDP_TX || action == XDP_REDIRECT,
                "{svc} #{i}: {action}"
            );
            assert_eq!(out, expected, "service {svc}, ACK #{i}");
        }
        let raw = b.dp.connection_entry(&k).unwrap();
        assert_eq!(
            raw.packets, 3,
            "service {svc}: the shared entry saw the SYN and two ACKs"
        );
        let c = b.dp.connection(&k).unwrap();
        assert_eq!(c.packets, 6, "service {svc}");
        assert_eq!(c.bytes, counted(&syn) + 5 * counted(&ack), "service {svc}");
        let listed = b.dp.connections().unwrap();
        assert!(listed.iter().any(|(lk, lc)| *lk == k && lc.packets == 6));
        flows.push((svc, port, sport, k, ack));
    }

    // The direct flow's server goes down: its next packet takes the full path, which
    // counts the cached packets in and moves the connection to a server that is up.
    let (_, port, sport, k, ack) = flows[0].clone();
    let old = b.dp.connection(&k).unwrap().server;
    b.dp.set_server_state(HTTP, old, false, 1).unwrap();
    let (action, _) = b.once(&ack);
    assert_eq!(action, XDP_TX);
    let raw = b.dp.connection_entry(&k).unwrap();
    assert_ne!(raw.server, old);
    assert_eq!(raw.packets, 1, "a new connection on the server that is up");
    b.dp.set_server_state(HTTP, old, true, 1).unwrap();

    // A FIN on the tunnel flow: the full path, which takes the cached packets in and
    // leaves the flow uncached.
    let (_, port1, sport1, k1, ack1) = flows[1].clone();
    let fin = from_client(sport1, VIP, port1, FIN, b"");
    b.once(&fin);
    let raw = b.dp.connection_entry(&k1).unwrap();
    assert_eq!(raw.packets, 7);
    assert_ne!(raw.flags & lb_common::CONN_FIN, 0);
    b.once(&ack1);
    assert_eq!(b.dp.connection_entry(&k1).unwrap().packets, 8);

    // A flow in the same slot as the direct one takes its place; the direct one's cached
    // packets go into its shared entry then.
    let slot = |sport: u16| {
        lb_common::flow_cache_slot(
            u32::from_ne_bytes(CLIENT),
            u32::from_ne_bytes(VIP),
            sport.to_be(),
            port.to_be(),
        )
    };
    for _ in 0..4 {
        b.once(&ack); // the second (the third packet) caches it again, two from the cache
    }
    let before = b.dp.connection_entry(&k).unwrap().packets;
    assert_eq!(before, 3);
    let other = (1u16..)
        .map(|p| sport.wrapping_add(p))
        .find(|p| slot(*p) == slot(sport))
        .unwrap();
    b.once(&from_client(other, VIP, port, SYN, b""));
    b.once(&from_client(other, VIP, port, ACK, b""));
    // Its third packet is cached, in the direct flow's slot.
    b.once(&from_client(other, VIP, port, ACK, b""));
    let after = b.dp.connection_entry(&k).unwrap().packets;
    assert_eq!(
        after,
        before + 2,
        "the evicted flow's cached packets reached its entry"
    );

    // After FLOW_SYNC_NS the cache no longer answers: the full path brings the entry up
    // to date. The NAT flow has 3 packets cached.
    let (_, _, _, k2, ack2) = flows[2].clone();
    assert_eq!(b.dp.connection_entry(&k2).unwrap().packets, 3);
    std::thread::sleep(std::time::Duration::from_nanos(
        lb_common::FLOW_SYNC_NS + 100_000_000,
    ));
    b.once(&ack2);
    let raw = b.dp.connection_entry(&k2).unwrap();
    assert_eq!(raw.packets, 7);
    assert_eq!(b.dp.connection(&k2).unwrap().packets, 7);
    // The flow is cached again. The ATM stops forwarding and starts again (a drill): what
    // its caches hold is of an earlier generation, and looked up afresh.
    b.dp.set_settings(&Settings {
        flags: 0,
        ..settings()
    })
    .unwrap();
    b.dp.set_settings(&settings()).unwrap();
    b.once(&ack2);
    assert_eq!(b.dp.connection_entry(&k2).unwrap().packets, 8);

    // A flow cached on CPU 0 is reset on CPU 1, and its tuple starts another connection
    // there, to another server: CPU 0 must not send the new connection's packets to the
    // old one (every CPU's slot of a flow empties on a SYN, FIN or RST).
    // Not available_parallelism: it counts this thread's CPUs, and it is pinned to one.
    // SAFETY: plain libc call.
    if unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } < 2 {
        return;
    }
    let row = b.row(TUN);
    let k3 = key(CLIENT, 46100, VIP, 81, IPPROTO_TCP);
    let ack3 = from_client(46100, VIP, 81, ACK, b"");
    b.once(&from_client(46100, VIP, 81, SYN, b""));
    let first = b.dp.connection(&k3).unwrap().server;
    for _ in 0..3 {
        b.once(&ack3);
    }
    assert_eq!(
        b.dp.connection_entry(&k3).unwrap().packets,
        3,
        "one ACK from the cache"
    );
    pin_to_cpu(1);
    let rst = Flags {
        rst: true,
        ack: true,
        ..Default::default()
    };
    b.once(&from_client(46100, VIP, 81, rst, b""));
    assert_eq!(
        b.dp.connection_entry(&k3).unwrap().packets,
        5,
        "CPU 0's cached packet counted in"
    );
    // CPU 1's round-robin cursor starts at the row's start: connections of other tuples
    // first, so that the reused tuple gets another server than on CPU 0.
    let at = row.iter().position(|s| *s == first).unwrap();
    for i in 0..=at {
        b.once(&from_client(46200 + i as u16, VIP, 81, SYN, b""));
    }
    b.once(&from_client(46100, VIP, 81, SYN, b""));
    let second = b.dp.connection(&k3).unwrap().server;
    assert_ne!(second, first);
    pin_to_cpu(0);
    let (action, out) = b.once(&ack3);
    assert_eq!(action, XDP_TX);
    assert_eq!(
        out,
        ipip(&ack3, b.server_addr(second).0),
        "CPU 0 follows the new connection"
    );
}

#[test]
fn decap_fixtures() {
    let mut b = Bench::new();
    b.dp.set_decap_sources(&[Addr::from_v4_octets(LB)]).unwrap();
    let inner = from_client(40001, VIP, 80, SYN, b"hello");
    let tunnelled = ipip(&inner, S1);
    let decapped = {
        let mut f = tunnelled[..14].to_vec();
        f.extend_from_slice(&inner[14..]);
        f
    };
    let mut stranger = tunnelled.clone();
    stranger[26..30].copy_from_slice(&[192, 0, 2, 77]);
    fix_ipv4_checksum(&mut stranger);
    let mut options = ipip(&inner, S1);
    options[14] = 0x46;
    fix_ipv4_checksum(&mut options);
    b.run_decap(&[
        Fixture::new(
            "IPIP from the ATM: the inner packet goes up",
            tunnelled,
            XDP_PASS,
        )
        .output(decapped),
        Fixture::new(
            "IPIP from an unknown source passes untouched",
            stranger,
            XDP_PASS,
        ),
        Fixture::new("plain TCP passes untouched", inner.clone(), XDP_PASS),
        Fixture::new(
            "IPIP from the ATM with outer options is dropped",
            options,
            XDP_DROP,
        ),
    ]);
    let s = b.dp.decap_stats().unwrap();
    assert_eq!(s, [4, 1, 2, 1]);
}

/// A fragment's (source, destination, identification, protocol): what all fragments of
/// one datagram share.
type FragId = ([u8; 4], [u8; 4], u16, u8);

/// The [`FragId`] of an IPv4 first fragment (more fragments, offset 0) with a correct
/// header checksum, if `frame` is one.
fn first_fragment(frame: &[u8]) -> Option<FragId> {
    let (ip, _) = Ipv4Header::from_slice(frame.get(14..)?).ok()?;
    (frame[12..14] == [0x08, 0x00]
        && raw_ipv4_checksum_ok(&frame[14..14 + ip.header_len()])
        && ip.more_fragments
        && ip.fragment_offset.value() == 0)
        .then_some((ip.source, ip.destination, ip.identification, ip.protocol.0))
}

/// Independently of the program: is this frame traffic the balancer may forward? A complete,
/// unfragmented (or first-fragment) IPv4 packet with a correct header checksum, to a service
/// (TCP/UDP with a whole header, or an ICMP error to a VIP), or to the NAT address; or a
/// later fragment of a datagram whose first fragment (`firsts`) the program was given.
fn forwardable(
    frame: &[u8],
    services: &[([u8; 4], u16, u8)],
    firsts: &std::collections::HashSet<FragId>,
) -> Result<(), String> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return Err("not IPv4".into());
    }
    let (ip, _) = Ipv4Header::from_slice(&frame[14..]).map_err(|e| format!("ipv4: {e}"))?;
    // Summed over the raw bytes: etherparse's header has no field for the reserved flag bit.
    if !raw_ipv4_checksum_ok(&frame[14..14 + ip.header_len()]) {
        return Err("bad IPv4 header checksum".into());
    }
    if 14 + ip.total_len as usize > frame.len() {
        return Err("total length beyond the frame".into());
    }
    if ip.fragment_offset.value() != 0 {
        let id = (ip.source, ip.destination, ip.identification, ip.protocol.0);
        if firsts.contains(&id) {
            return Ok(());
        }
        return Err("non-first fragment with no first seen".into());
    }
    let l4 = &frame[14 + ip.header_len()..14 + ip.total_len as usize];
    let dst = ip.destination;
    let vip = services.iter().any(|s| s.0 == dst);
    match ip.protocol {
        etherparse::IpNumber::TCP => {
            let t = TcpHeaderSlice::from_slice(l4).map_err(|e| format!("tcp: {e}"))?;
            if dst == NAT || services.contains(&(dst, t.destination_port(), IPPROTO_TCP)) {
                Ok(())
            } else {
                Err("tcp not to a service".into())
            }
        }
        etherparse::IpNumber::UDP => {
            let u = etherparse::UdpHeaderSlice::from_slice(l4).map_err(|e| format!("udp: {e}"))?;
            // A first fragment's UDP length is the whole datagram's.
            if (u.length() as usize) < 8 || (u.length() as usize > l4.len() && !ip.more_fragments) {
                return Err("bad udp length".into());
            }
            if dst == NAT || services.contains(&(dst, u.destination_port(), IPPROTO_UDP)) {
                Ok(())
            } else {
                Err("udp not to a service".into())
            }
        }
        etherparse::IpNumber::ICMP if vip && matches!(l4.first(), Some(3 | 11 | 12)) => Ok(()),
        _ => Err("not service traffic".into()),
    }
}

/// RFC 1071 over the raw header bytes: the words of a correct header sum to 0xffff.
fn raw_ipv4_checksum_ok(header: &[u8]) -> bool {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

#[test]
fn a_hundred_thousand_random_and_mutated_frames() {
    pin_to_cpu0();
    let b = Bench::new();
    let services: Vec<([u8; 4], u16, u8)> = b
        .services
        .iter()
        .map(|(_, _, s)| (v4(s.vip).octets(), s.port, s.proto))
        .collect();
    let n_addr = b.server_addr(b.row(NATSVC)[0]);
    let seeds: Vec<Vec<u8>> = vec![
        from_client(40001, VIP, 80, SYN, b"GET / HTTP/1.1\r\n\r\n"),
        from_client(40002, VIP, 81, ACK, b"x"),
        from_client(40003, VIP, 82, SYN, b""),
        from_client(40004, VIP_STICKY, 80, SYN, b""),
        tcp(
            mac_of(n_addr.0),
            LB_NAT_MAC,
            n_addr.0,
            n_addr.1,
            NAT,
            30000,
            ACK,
            b"reply",
        ),
        udp(ROUTER_MAC, LB_MAC, CLIENT, 5000, VIP, 53, b"query"),
        udp(ROUTER_MAC, LB_MAC, CLIENT, 5001, VIP, 5353, b"query"),
        frag_needed(VIP, &server_reply_packet(VIP, 80, CLIENT, 40001)),
        from_client(40005, OTHER, 80, SYN, b""),
        ipip(&from_client(40006, VIP, 80, SYN, b""), S1),
    ];
    let mut rng = Rng(0x005e_ed1b_2026);
    const FRAMES: usize = 100_000;
    let mut forwarded = 0u64;
    let mut failures = Vec::new();
    let mut firsts = std::collections::HashSet::new();
    {
        let _inside = b.lab.ns("fx").enter();
        for i in 0..FRAMES {
            let mut f = seeds[rng.below(seeds.len())].clone();
            match rng.below(10) {
                // Pure noise.
                0 => {
                    let len = 14 + rng.below(200);
                    f = (0..len).map(|_| rng.next_u64() as u8).collect();
                    if rng.below(2) == 0 {
                        f[12..14].copy_from_slice(&[0x08, 0x00]);
                    }
                }
                // A few flipped bytes in the headers.
                1..=4 => {
                    for _ in 0..1 + rng.below(4) {
                        let at = rng.below(f.len().min(64));
                        f[at] ^= 1 << rng.below(8);
                    }
                }
                // Cut short.
                5 | 6 => {
                    let len = 14 + rng.below(f.len() - 13);
                    f.truncate(len);
                }
                // A header field set to anything, with the IPv4 checksum then made right, so
                // the program has to look past it.
                7 | 8 => {
                    let at = 14 + rng.below(f.len().min(60) - 14);
                    f[at] = rng.next_u64() as u8;
                    if f.len() >= 34 && f[14] >> 4 == 4 && (f[14] & 0x0f) >= 5 {
                        let ihl = ((f[14] & 0x0f) as usize) * 4;
                        if f.len() >= 14 + ihl {
                            f[24..26].copy_from_slice(&[0, 0]);
                            let sum = lb_common::csum::sum_be(&f[14..14 + ihl]);
                            let c = !lb_common::csum::fold(sum);
                            f[24..26].copy_from_slice(&c.to_be_bytes());
                        }
                    }
                }
                // Valid traffic from a new client port.
                _ => {
                    if f.len() >= 38 {
                        let p = rng.next_u64() as u16;
                        f[34..36].copy_from_slice(&p.to_be_bytes());
                    }
                }
            }
            if let Some(id) = first_fragment(&f) {
                firsts.insert(id);
            }
            let (action, out) = b.dp.test_run(&f, b.eth0).expect("test_run");
            if action == XDP_TX || action == XDP_REDIRECT {
                forwarded += 1;
                if let Err(why) = forwardable(&f, &services, &firsts) {
                    failures.push(format!(
                        "frame {i} forwarded but {why}:\n{}",
                        lb_tests::fixture::decode(&f)
                    ));
                }
                let ihl = ((out[14] & 0x0f) as usize) * 4;
                if !raw_ipv4_checksum_ok(&out[14..14 + ihl]) {
                    failures.push(format!("frame {i}: output IPv4 checksum wrong"));
                }
            } else if action != XDP_PASS && action != XDP_DROP {
                failures.push(format!("frame {i}: action {action}"));
            }
            if failures.len() > 5 {
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let s = b.dp.stats().unwrap();
    assert_eq!(s.get(Stat::Packets), FRAMES as u64, "{s:?}");
    assert_eq!(
        s.get(Stat::Passed) + s.get(Stat::Forwarded) + s.dropped(),
        FRAMES as u64,
        "{s:?}"
    );
    assert_eq!(s.get(Stat::Forwarded), forwarded, "{s:?}");
    // The mix really exercised every outcome.
    assert!(
        forwarded > 10_000 && s.get(Stat::DropMalformed) > 10_000 && s.get(Stat::Passed) > 10_000,
        "{s:?}"
    );
}

/// Collects log records (the debug log arrives through the dataplane's logger).
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        self.0.lock().unwrap().push(r.args().to_string());
    }
    fn flush(&self) {}
}

#[test]
fn debug_logs_one_record_per_new_connection_only_when_on() {
    let mut b = Bench::new();
    let capture = Capture::default();
    // A dataplane of its own with the capturing logger, programmed like the bench's.
    let mut dp =
        Dataplane::load_with_logger(Default::default(), Box::new(capture.clone())).unwrap();
    for (id, _, spec) in &b.services {
        dp.install(*id, spec).unwrap();
    }
    let mut s = settings();
    dp.set_settings(&s).unwrap();
    b.dp = dp;
    let syn = from_client(47000, VIP, 80, SYN, b"");
    let run = |b: &Bench, f: &[u8]| {
        let _inside = b.lab.ns("fx").enter();
        b.dp.test_run(f, b.eth0).unwrap().0
    };
    assert_eq!(run(&b, &syn), XDP_TX);
    b.dp.flush_log();
    assert!(capture.0.lock().unwrap().is_empty(), "debug off logged");

    s.debug = 1;
    b.dp.set_settings(&s).unwrap();
    let syn2 = from_client(47001, VIP, 80, SYN, b"");
    let k2 = key(CLIENT, 47001, VIP, 80, IPPROTO_TCP);
    let (srv2, _) = b.server_addr(b.maglev(HTTP, &k2));
    assert_eq!(run(&b, &syn2), XDP_TX);
    assert_eq!(run(&b, &from_client(47001, VIP, 80, ACK, b"x")), XDP_TX);
    b.dp.flush_log();
    let logs = capture.0.lock().unwrap().clone();
    let want = format!(
        "new tcp 198.51.100.7:47001 -> 192.0.2.100:80 via {}:80 direct",
        Ipv4Addr::from(srv2)
    );
    assert_eq!(
        logs,
        vec![want],
        "one record for the new connection, none for the ACK"
    );
}

/// NAT source ports: taken in turn over every NAT address, every one found before a
/// connection is refused, a closed connection's port free again after the hold (and its old
/// client leg gone with it), a half-closed one's not, exhaustion counted.
#[test]
fn nat_ports_are_found_while_any_is_free_and_closed_ones_come_back() {
    pin_to_cpu0();
    let mut b = Bench::new();
    const NAT2: [u8; 4] = [203, 0, 113, 2];
    // One server, four ports, two NAT addresses: eight pairs.
    let (first, spec) = b.spec(NATSVC);
    let mut one = spec.clone();
    one.servers.truncate(1);
    one.servers[0].index = first;
    b.dp.install(NATSVC, &one).unwrap();
    let mut s = settings();
    s.nat_port_min = 30_000;
    s.nat_port_max = 30_003;
    s.nat_pool[0] = u32::from_ne_bytes(NAT);
    s.nat_pool[1] = u32::from_ne_bytes(NAT2);
    s.nat_pool_len = 2;
    s.port_hold_ns = 0;
    b.dp.set_settings(&s).unwrap();
    let _inside = b.lab.ns("fx").enter();
    let open = |b: &Bench, cport: u16| -> Option<([u8; 4], u16)> {
        let (action, out) =
            b.dp.test_run(&from_client(cport, VIP, 82, SYN, b""), b.eth0)
                .unwrap();
        if action != XDP_REDIRECT {
            assert_eq!(action, XDP_DROP, "SYN from {cport}");
            return None;
        }
        let ip = Ipv4Header::from_slice(&out[14..]).unwrap().0;
        let sport = u16::from_be_bytes([out[34], out[35]]);
        Some((ip.source, sport))
    };
    let pairs: Vec<([u8; 4], u16)> = (0..8)
        .map(|i| open(&b, 41_000 + i).expect("a free pair"))
        .collect();
    let want: Vec<([u8; 4], u16)> = [NAT, NAT2]
        .iter()
        .flat_map(|a| (30_000..=30_003).map(move |p| (*a, p)))
        .collect();
    assert_eq!(pairs, want, "every pair, in turn");
    assert_eq!(open(&b, 41_100), None, "a ninth connection finds none");
    assert_eq!(b.dp.stats().unwrap().get(Stat::DropNatPorts), 1);

    // Connection 2 closes: the client's FIN, then the server's.
    let (action, _) =
        b.dp.test_run(&from_client(41_001, VIP, 82, FIN, b""), b.eth0)
            .unwrap();
    assert_eq!(action, XDP_REDIRECT);
    // Connection 3 half-closes: only the client's FIN. Its port stays held.
    b.dp.test_run(&from_client(41_002, VIP, 82, FIN, b""), b.eth0)
        .unwrap();
    let (a2, p2) = pairs[1];
    let server_fin = tcp(mac_of(N1), LB_NAT_MAC, N1, 8080, a2, p2, FIN, b"");
    let (action, _) = b.dp.test_run(&server_fin, b.eth1).unwrap();
    assert_eq!(
        action, XDP_REDIRECT,
        "the server's FIN goes back to the client"
    );
    // Searches wait out the backoff that followed the exhaustion.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        open(&b, 41_200),
        Some(pairs[1]),
        "the closed connection's pair, and only that one"
    );
    assert!(
        b.dp.connection(&key(CLIENT, 41_001, VIP, 82, IPPROTO_TCP))
            .is_none(),
        "the old client leg went with its pair"
    );
    assert!(
        b.dp.connection(&key(CLIENT, 41_002, VIP, 82, IPPROTO_TCP))
            .is_some()
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        open(&b, 41_201),
        None,
        "a half-closed connection keeps its port"
    );
    assert_eq!(b.dp.stats().unwrap().get(Stat::DropNatPorts), 2);
    std::thread::sleep(std::time::Duration::from_millis(300));

    // Connection 5 closes with the server's FIN first: the server's TIME_WAIT applies.
    s.time_wait_ns = 60_000_000_000;
    b.dp.set_settings(&s).unwrap();
    let (a5, p5) = pairs[4];
    b.dp.test_run(
        &tcp(mac_of(N1), LB_NAT_MAC, N1, 8080, a5, p5, FIN, b""),
        b.eth1,
    )
    .unwrap();
    b.dp.test_run(&from_client(41_004, VIP, 82, FIN, b""), b.eth0)
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        open(&b, 41_203),
        None,
        "the server's TIME_WAIT holds its pair"
    );
    s.time_wait_ns = 0;
    b.dp.set_settings(&s).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(open(&b, 41_204), Some(pairs[4]), "and frees it after");

    // With a hold, a closed pair waits it out.
    s.port_hold_ns = 60_000_000_000;
    b.dp.set_settings(&s).unwrap();
    b.dp.test_run(
        &from_client(41_003, VIP, 82, Flags { rst: true, ..ACK }, b""),
        b.eth0,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(open(&b, 41_202), None, "reset, but still within the hold");
}

/// The balancer's object holds its two programs and nothing else: the benchmarks' instruments
/// and their maps are in an object of their own (`BENCH_OBJECT`, ABI in `lb_common::bench`).
#[test]
fn the_production_object_holds_only_lb_xdp_and_lb_decap() {
    use lb_common::{bench, programs};
    use lb_daemon::dataplane::{BENCH_OBJECT, OBJECT};

    let names = |object: &[u8]| {
        let ebpf = aya::Ebpf::load(object).expect("the object loads (its maps are created)");
        let mut programs: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
        let maps: Vec<String> = ebpf.maps().map(|(n, _)| n.to_string()).collect();
        programs.sort();
        (programs, maps)
    };
    let bench_map_names = [
        bench::maps::BARE_FWD,
        bench::maps::GEN_TEMPLATE,
        bench::maps::GEN_TEMPLATE6,
        bench::maps::SINK_COUNT,
    ];
    let (prod_programs, prod_maps) = names(OBJECT);
    assert_eq!(prod_programs, [programs::LB_DECAP, programs::LB_XDP]);
    for map in bench_map_names {
        assert!(
            !prod_maps.iter().any(|m| m == map),
            "{map} is in the production object"
        );
    }
    let (bench_programs, bench_maps) = names(BENCH_OBJECT);
    assert_eq!(
        bench_programs,
        [
            bench::programs::BARE_FWD,
            bench::programs::BENCH_NOP,
            bench::programs::GEN_TX,
            bench::programs::GEN_TX6,
            bench::programs::SINK_COUNT,
        ]
    );
    for map in bench_map_names {
        assert!(bench_maps.iter().any(|m| m == map), "{map} is missing");
    }
}

/// A UDP datagram from `src`:`sport` to `dst`:`dport` carrying `data`, with a correct UDP
/// checksum, in two IPv4 fragments of identification `id` between `smac` and `dmac`: the
/// first with the UDP header and `data[..cut]` (`cut` + 8 a multiple of 8), the last with
/// the rest.
#[allow(clippy::too_many_arguments)]
fn udp_in_two_fragments(
    (smac, dmac): (Mac, Mac),
    (src, sport): ([u8; 4], u16),
    (dst, dport): ([u8; 4], u16),
    data: &[u8],
    id: u16,
    cut: usize,
) -> (Vec<u8>, Vec<u8>) {
    assert_eq!((8 + cut) % 8, 0);
    let whole = udp(smac, dmac, src, sport, dst, dport, data);
    let l4 = whole[34..].to_vec();
    let frame = |part: &[u8], offset: usize, more: bool| {
        let mut f = whole[..34].to_vec();
        f.extend_from_slice(part);
        f[16..18].copy_from_slice(&((20 + part.len()) as u16).to_be_bytes());
        f[18..20].copy_from_slice(&id.to_be_bytes());
        let field = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        f[20..22].copy_from_slice(&field.to_be_bytes());
        fix_ipv4_checksum(&mut f);
        f
    };
    (
        frame(&l4[..8 + cut], 0, true),
        frame(&l4[8 + cut..], 8 + cut, false),
    )
}

/// Whether the UDP datagram whose header and first bytes are in fragment frame `first` and
/// the rest in `last` has a correct checksum for the addresses in `first`.
fn reassembled_udp_checksum_ok(first: &[u8], last: &[u8]) -> bool {
    let ip = Ipv4Header::from_slice(&first[14..]).unwrap().0;
    let mut datagram = first[34..14 + ip.total_len as usize].to_vec();
    let last_len = u16::from_be_bytes([last[16], last[17]]) as usize;
    datagram.extend_from_slice(&last[34..14 + last_len]);
    // The pseudo-header: the addresses, a zero, the protocol, the UDP length.
    let mut pseudo = first[26..34].to_vec();
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
    use lb_common::csum::{fold, sum_be};
    fold(sum_be(&pseudo) + sum_be(&datagram)) == 0xffff
}

/// Fragments follow their first (docs/DATAPLANE.md, "Fragments"). A datagram in two
/// fragments to the NAT service: the first is translated as any packet, the last gets the
/// same addresses and nothing else, so the datagram's checksum holds whole; the server's
/// answer in two fragments comes back to the client the same way. A last fragment whose
/// first was never seen is dropped and counted; one of another protocol passes.
#[test]
fn fragments_follow_their_first_through_nat_both_ways() {
    let b = Bench::new();
    let udp_server = b.row(NATUDP)[0];
    let (n_addr, n_port) = b.server_addr(udp_server);
    let data: Vec<u8> = (0..200u16).map(|i| (i * 13) as u8).collect();
    let (first, last) = udp_in_two_fragments(
        (ROUTER_MAC, LB_MAC),
        (CLIENT, 47001),
        (VIP, 5353),
        &data,
        0x4242,
        96,
    );
    let _inside = b.lab.ns("fx").enter();
    let before = b.dp.stats().unwrap();
    let (action, out_first) = b.dp.test_run(&first, b.eth0).unwrap();
    assert_eq!(action_name(action), action_name(XDP_REDIRECT));
    let (action, out_last) = b.dp.test_run(&last, b.eth0).unwrap();
    assert_eq!(
        action_name(action),
        action_name(XDP_REDIRECT),
        "the last fragment follows its first:\n{}",
        decode(&last)
    );
    // The first: addresses and ports translated; the last: the same addresses, its bytes
    // otherwise as they came.
    assert_eq!(out_first[26..30], NAT);
    assert_eq!(out_first[30..34], n_addr);
    assert_eq!(u16::from_be_bytes([out_first[36], out_first[37]]), n_port);
    let nat_port = u16::from_be_bytes([out_first[34], out_first[35]]);
    assert_eq!(out_last[26..30], NAT);
    assert_eq!(out_last[30..34], n_addr);
    assert_eq!(out_last[34..], last[34..], "the last fragment's payload");
    assert_eq!(out_last[18..22], last[18..22], "identification and offset");
    for out in [&out_first, &out_last] {
        assert!(raw_ipv4_checksum_ok(&out[14..34]));
        assert_eq!(out[0..6], mac_of(n_addr));
    }
    assert!(
        reassembled_udp_checksum_ok(&out_first, &out_last),
        "the datagram's checksum, translated in the first fragment, holds for the whole"
    );

    // The answer, in two fragments from the server to the NAT address and port.
    let answer: Vec<u8> = (0..300u16).map(|i| (i * 7) as u8).collect();
    let (first, last) = udp_in_two_fragments(
        (mac_of(n_addr), LB_NAT_MAC),
        (n_addr, n_port),
        (NAT, nat_port),
        &answer,
        0x0707,
        152,
    );
    let (action, back_first) = b.dp.test_run(&first, b.eth1).unwrap();
    assert_eq!(action_name(action), action_name(XDP_REDIRECT));
    let (action, back_last) = b.dp.test_run(&last, b.eth1).unwrap();
    assert_eq!(action_name(action), action_name(XDP_REDIRECT));
    for back in [&back_first, &back_last] {
        assert_eq!(back[26..30], VIP);
        assert_eq!(back[30..34], CLIENT);
        assert!(raw_ipv4_checksum_ok(&back[14..34]));
    }
    assert_eq!(u16::from_be_bytes([back_first[34], back_first[35]]), 5353);
    assert_eq!(u16::from_be_bytes([back_first[36], back_first[37]]), 47001);
    assert_eq!(back_last[34..], last[34..]);
    assert!(reassembled_udp_checksum_ok(&back_first, &back_last));

    // A last fragment of a datagram whose first never came: dropped, counted.
    let (_, stray) = udp_in_two_fragments(
        (ROUTER_MAC, LB_MAC),
        (CLIENT, 47001),
        (VIP, 5353),
        &data,
        0x4343,
        96,
    );
    let (action, _) = b.dp.test_run(&stray, b.eth0).unwrap();
    assert_eq!(action_name(action), action_name(XDP_DROP));
    // A later fragment of an ICMP datagram to the VIP (a big echo request): its first went
    // to the stack, and so does it.
    let mut icmp_later = stray.clone();
    icmp_later[23] = 1;
    fix_ipv4_checksum(&mut icmp_later);
    let (action, out) = b.dp.test_run(&icmp_later, b.eth0).unwrap();
    assert_eq!(action_name(action), action_name(XDP_PASS));
    assert_eq!(out, icmp_later);

    let after = b.dp.stats().unwrap();
    let d = |s: Stat| after.get(s) - before.get(s);
    assert_eq!(d(Stat::DropFragment), 1);
    assert_eq!(d(Stat::Forwarded), 4);
    assert_eq!(d(Stat::Passed), 1);
    assert_eq!(d(Stat::NewConns), 1, "one connection, not one per fragment");
}
