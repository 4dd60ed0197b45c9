//! Tier 3: VLAN-tagged frames are never balanced as untagged ones. The lab's veths carry tags
//! as metadata by default (tx VLAN offload), where XDP cannot see them; the daemon turns that
//! off on the switch port facing its interface, so lb_xdp sees the tag, counts the frame as
//! `tagged` and passes it to the stack, which has no VLAN device for it. Untagged traffic is
//! balanced as before.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb_tests::{
    cluster,
    fixture::frames::{self, Mac},
    lab::Lab,
    procs::Daemon,
    raw::{FrameSender, mac_of},
};

fn mac(lab: &Lab, ns: &str) -> Mac {
    mac_of(lab, ns, "eth0")
}

const START: Duration = Duration::from_secs(20);
/// 802.1Q-tagged SYNs sent, then 802.1ad-tagged ones.
const DOT1Q: u16 = 150;
const DOT1AD: u16 = 50;
/// Tagged SYNs come from these client ports on, one port each.
const FIRST_PORT: u16 = 40_000;

fn config() -> String {
    let mut c = format!(
        r#"[cluster]
name = "lab"

[[atm]]
name = "atm1"
address = "{atm}"
interface = "eth0"

[[service]]
name = "http"
vip = "{vip}"
port = 80
scheduler = "rr"
[service.check]
kind = "none"
"#,
        atm = cluster::atm_addr(1),
        vip = cluster::VIP
    );
    for i in 1..=3 {
        c += &format!(
            "[[service.server]]\nname = \"web{i}\"\naddress = \"{}\"\n",
            cluster::server_addr(i)
        );
    }
    c
}

/// Lab with one ATM and three nginx servers in direct mode; returns the config path.
fn lab() -> (Lab, PathBuf) {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 3);
    for i in 1..=3 {
        let ns = cluster::server(i);
        lab.nginx(&ns, &ns, &[80]);
        cluster::hold_vip_on_lo(&lab, &ns, cluster::VIP);
    }
    let path = lab.dir().join("lb.toml");
    std::fs::write(&path, config()).unwrap();
    (lab, path)
}

/// One HTTP request through the VIP on a new connection; the body (the server's name).
fn get(lab: &Lab) -> String {
    let _in = lab.ns("client").enter();
    let vip = SocketAddr::from((cluster::VIP.parse::<Ipv4Addr>().unwrap(), 80));
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: lb\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the response");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.rsplit("\r\n\r\n").next().unwrap().trim().to_string()
}

/// `frame` with a VLAN tag (`tpid`, VLAN `vid`) after its MAC addresses.
fn tagged(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&tpid.to_be_bytes());
    out.extend_from_slice(&vid.to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

/// A packet socket on `eth0` of namespace `ns`, receiving every protocol (`ETH_P_ALL`).
fn packet_socket(lab: &Lab, ns: &str) -> OwnedFd {
    let ifindex = lab.ns(ns).ifindex("eth0");
    let _in = lab.ns(ns).enter();
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the socket belongs to the namespace it is made in.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto as i32,
        )
    };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: binds our socket to a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

/// How many of the tagged SYNs (client ports from [`FIRST_PORT`]) the socket received
/// addressed to this host, untagged, since it was made.
fn tagged_syns_received(fd: &OwnedFd) -> usize {
    let vip: Ipv4Addr = cluster::VIP.parse().unwrap();
    let ports = FIRST_PORT..FIRST_PORT + DOT1Q + DOT1AD;
    let mut n = 0;
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: as above.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: buf and from are valid for the sizes given.
        let got = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if got < 0 {
            return n;
        }
        // Frames the bridge floods to every port are not for this host.
        if from.sll_pkttype != libc::PACKET_HOST {
            continue;
        }
        let Ok(p) = SlicedPacket::from_ethernet(&buf[..got as usize]) else {
            continue;
        };
        if let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) = (&p.net, &p.transport)
            && ip.header().destination_addr() == vip
            && tcp.destination_port() == 80
            && tcp.syn()
            && !tcp.ack()
            && ports.contains(&tcp.source_port())
        {
            n += 1;
        }
    }
}

/// The dataplane's `tagged` counter, from the daemon's /metrics.
fn tagged_counter(lab: &Lab, d: &Daemon) -> u64 {
    let text = d.scrape(lab);
    let line = r#"lb_dataplane_packets_total{counter="tagged",node="atm1"} "#;
    text.lines()
        .find_map(|l| l.strip_prefix(line))
        .unwrap_or_else(|| panic!("no {line:?} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Sends the tagged SYNs from the client to the ATM's MAC: [`DOT1Q`] with an 802.1Q tag
/// (VLAN 100), then [`DOT1AD`] with an 802.1ad one (VLAN 200).
fn send_tagged_syns(lab: &Lab) {
    let (client, atm) = (mac(lab, "client"), mac(lab, &cluster::atm(1)));
    let out = FrameSender::open(lab, "client", "eth0");
    let src: Ipv4Addr = cluster::CLIENT.parse().unwrap();
    let vip: Ipv4Addr = cluster::VIP.parse().unwrap();
    for i in 0..DOT1Q + DOT1AD {
        let syn = frames::tcp(
            client,
            atm,
            src.octets(),
            FIRST_PORT + i,
            vip.octets(),
            80,
            frames::SYN,
            &[],
        );
        let frame = if i < DOT1Q {
            tagged(&syn, 0x8100, 100)
        } else {
            tagged(&syn, 0x88a8, 200)
        };
        out.send(&frame);
    }
}

#[test]
fn tagged_syns_are_not_balanced_and_untagged_traffic_is() {
    let (mut lab, path) = lab();
    let mut d = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    d.wait_log("This ATM is primary", START);
    let sw = lab.ns("sw");
    let port = format!("p-{}", cluster::atm(1));

    // Untagged traffic first: it also teaches the bridge where the ATM is, so no SYN below
    // reaches a server by flooding.
    for _ in 0..3 {
        assert!(get(&lab).starts_with('s'));
    }
    let taps: Vec<OwnedFd> = (1..=3)
        .map(|i| packet_socket(&lab, &cluster::server(i)))
        .collect();
    send_tagged_syns(&lab);
    std::thread::sleep(Duration::from_millis(500));
    let reached: usize = taps.iter().map(tagged_syns_received).sum();
    assert_eq!(
        reached,
        0,
        "{reached} of {} tagged SYNs reached a server as untagged new connections",
        DOT1Q + DOT1AD
    );

    // They reached lb_xdp with their tag, and it passed them.
    assert_eq!(tagged_counter(&lab, &d), u64::from(DOT1Q + DOT1AD));

    // The daemon said why, and the switch port facing the ATM keeps tags in the frame.
    d.wait_log(
        &format!("eth0: tx VLAN offload (tx-vlan-hw-insert, tx-vlan-stag-hw-insert) turned off on its veth peer {port}"),
        Duration::from_secs(1),
    );
    let k = sw.exec_ok(&["ethtool", "-k", &port]);
    for feature in ["tx-vlan-offload: off", "tx-vlan-stag-hw-insert: off"] {
        assert!(k.contains(feature), "{port}: no {feature:?} in\n{k}");
    }

    // Untagged traffic still works.
    for _ in 0..3 {
        assert!(get(&lab).starts_with('s'));
    }
}
