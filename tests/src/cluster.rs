//! The standard lab: a client, ATMs and real servers on one Ethernet segment (a bridge in a
//! switch namespace), addressed from the documentation ranges. Tests, the demo and the
//! benchmarks build on it.

use std::{
    io::Read,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{lab::Lab, netns::NetNs};

/// The segment: 192.0.2.0/24.
pub const PREFIX: u8 = 24;
pub const CLIENT: &str = "192.0.2.50";
/// The service's virtual IP.
pub const VIP: &str = "192.0.2.100";
/// The NAT subnet, on the same segment: 203.0.113.0/24, gateway .1.
pub const NAT_GATEWAY: &str = "203.0.113.1";

/// Address of ATM `i` (1-based): 192.0.2.(1+i).
pub fn atm_addr(i: usize) -> String {
    format!("192.0.2.{}", 1 + i)
}

/// Address of server `i` (1-based): 192.0.2.(10+i).
pub fn server_addr(i: usize) -> String {
    format!("192.0.2.{}", 10 + i)
}

/// NAT-subnet address of server `i` (1-based): 203.0.113.(10+i).
pub fn server_nat_addr(i: usize) -> String {
    format!("203.0.113.{}", 10 + i)
}

/// Two-arm NAT: address of ATM `i` (1-based) on the inside segment: 203.0.113.(1+i).
pub fn atm_inside_addr(i: usize) -> String {
    format!("203.0.113.{}", 1 + i)
}

/// Namespace names used in the lab.
pub fn atm(i: usize) -> String {
    format!("atm{i}")
}
pub fn server(i: usize) -> String {
    format!("s{i}")
}

/// IPv6 beside it (see [`build_dual_stack`]): the segment is 2001:db8::/64, the NAT66 subnet
/// 2001:db8:1::/64 on the same segment.
pub const CLIENT6: &str = "2001:db8::50";
/// The IPv6 VIP.
pub const VIP6: &str = "2001:db8::100";
/// The NAT66 gateway.
pub const NAT6_GATEWAY: &str = "2001:db8:1::1";

/// IPv6 address of ATM `i` (1-based): 2001:db8::(1+i).
pub fn atm6(i: usize) -> String {
    format!("2001:db8::{}", 1 + i)
}

/// IPv6 address of server `i` (1-based): 2001:db8::(10+i).
pub fn server6(i: usize) -> String {
    format!("2001:db8::{}", 10 + i)
}

/// Address `host` in the NAT66 subnet: 2001:db8:1::`host` (ATM `i` has 1+i, server `i` 10+i).
pub fn nat6(host: usize) -> String {
    format!("2001:db8:1::{host}")
}

/// Builds the segment with `client`, `atms` ATMs and `servers` servers, each with `eth0`
/// on the segment. Servers also hold their NAT-subnet address; nothing else is configured
/// (no VIPs, no programs).
pub fn build(lab: &mut Lab, atms: usize, servers: usize) {
    build_with(lab, atms, servers, false);
}

/// [`build`] with IPv6 beside IPv4 on every machine (`nodad`): the client [`CLIENT6`], ATM
/// `i` [`atm6`] and NAT66 address `nat6(1 + i)` (its own, so a backup checks NAT66 servers
/// from inside the subnet), server `i` [`server6`] and `nat6(10 + i)`.
pub fn build_dual_stack(lab: &mut Lab, atms: usize, servers: usize) {
    build_with(lab, atms, servers, true);
}

fn build_with(lab: &mut Lab, atms: usize, servers: usize, v6: bool) {
    lab.switch("sw");
    // (namespace, IPv4 addresses, IPv6 addresses), each with its prefix.
    let mut hosts = vec![(
        "client".to_string(),
        vec![format!("{CLIENT}/{PREFIX}")],
        vec![format!("{CLIENT6}/64")],
    )];
    for i in 1..=atms {
        hosts.push((
            atm(i),
            vec![format!("{}/{PREFIX}", atm_addr(i))],
            vec![format!("{}/64", atm6(i)), format!("{}/64", nat6(1 + i))],
        ));
    }
    for i in 1..=servers {
        hosts.push((
            server(i),
            vec![
                format!("{}/{PREFIX}", server_addr(i)),
                format!("{}/24", server_nat_addr(i)),
            ],
            vec![format!("{}/64", server6(i)), format!("{}/64", nat6(10 + i))],
        ));
    }
    for (ns, v4_addrs, v6_addrs) in &hosts {
        lab.add_ns(ns);
        if v6 {
            lab.ipv6(ns);
        }
        lab.plug(ns, "eth0", "sw");
        for a in v4_addrs {
            lab.addr(ns, "eth0", a);
        }
        if v6 {
            for a in v6_addrs {
                lab.addr6(ns, "eth0", a);
            }
        }
    }
}

/// What a real server in direct or tunnel mode needs (TCL's node role, done by hand here):
/// the VIP on `lo`, and no ARP answers for it.
pub fn hold_vip_on_lo(lab: &Lab, ns: &str, vip: &str) {
    lab.addr(ns, "lo", &format!("{vip}/32"));
    for (k, v) in [
        ("net.ipv4.conf.all.arp_ignore", "1"),
        ("net.ipv4.conf.all.arp_announce", "2"),
        ("net.ipv4.conf.eth0.arp_ignore", "1"),
        ("net.ipv4.conf.eth0.arp_announce", "2"),
    ] {
        lab.sysctl(ns, k, v);
    }
}

/// Two-arm NAT: the client and `atms` ATMs on the outside segment (switch `sw`,
/// 192.0.2.0/24, each ATM's `eth0`), and the ATMs' `eth1` and `servers` servers on the
/// inside segment (switch `inside`), the NAT subnet 203.0.113.0/24, where the gateway alias
/// goes. Servers have only their NAT-subnet address, on `eth0`: they reach nothing but the
/// ATMs' inside interfaces, and answer the NAT address there.
pub fn build_two_arm(lab: &mut Lab, atms: usize, servers: usize) {
    lab.switch("sw");
    lab.switch("inside");
    lab.add_ns("client");
    lab.plug("client", "eth0", "sw");
    lab.addr("client", "eth0", &format!("{CLIENT}/{PREFIX}"));
    for i in 1..=atms {
        let ns = atm(i);
        lab.add_ns(&ns);
        lab.plug(&ns, "eth0", "sw");
        lab.addr(&ns, "eth0", &format!("{}/{PREFIX}", atm_addr(i)));
        lab.plug(&ns, "eth1", "inside");
        lab.addr(&ns, "eth1", &format!("{}/24", atm_inside_addr(i)));
    }
    for i in 1..=servers {
        let ns = server(i);
        lab.add_ns(&ns);
        lab.plug(&ns, "eth0", "inside");
        lab.addr(&ns, "eth0", &format!("{}/24", server_nat_addr(i)));
    }
}

/// One HTTP request to the VIP on a new connection, from the calling thread's namespace,
/// all of it within `timeout`; the body, or why it failed.
pub fn request(timeout: Duration) -> Result<String, String> {
    let agent = ureq::AgentBuilder::new()
        .max_idle_connections(0)
        .timeout(timeout)
        // Else connecting may take ureq's own 30 s, whatever `timeout` says: a SYN into a
        // black hole would hold up the test that long.
        .timeout_connect(timeout)
        .build();
    agent
        .get(&format!("http://{VIP}/"))
        .call()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|e| e.to_string())
}

/// One HTTP/1.1 request on a keep-alive connection `s`: the body, trimmed (a lab server's
/// name). Panics if the connection was closed or the answer does not come.
pub fn get_on(s: &mut std::net::TcpStream) -> String {
    use std::io::{Read, Write};
    s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).expect("read a response");
        assert!(n > 0, "the keep-alive connection was closed");
        buf.extend_from_slice(&chunk[..n]);
        let t = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = t.find("\r\n\r\n") {
            let len: usize = t[..end]
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            if buf.len() >= end + 4 + len {
                return t[end + 4..end + 4 + len].trim().to_string();
            }
        }
    }
}

/// One HTTP/1.0 request to the VIP's port 80 from source address `src` (held by the calling
/// thread's namespace), all of it within `timeout`: the body, trimmed (a lab server's
/// name), or why it failed.
pub fn request_from(src: &str, timeout: Duration) -> Result<String, String> {
    request_from_to(src, VIP, timeout)
}

/// [`request_from`] to `vip`:80, of either family (the source's).
pub fn request_from_to(src: &str, vip: &str, timeout: Duration) -> Result<String, String> {
    use std::io::{Read, Write};
    let fail = |what: &str, e: std::io::Error| format!("{what} from {src}: {e}");
    let from: std::net::IpAddr = src.parse().map_err(|e| format!("{src:?}: {e}"))?;
    let domain = if from.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let sock =
        socket2::Socket::new(domain, socket2::Type::STREAM, None).map_err(|e| fail("socket", e))?;
    sock.bind(&std::net::SocketAddr::new(from, 0).into())
        .map_err(|e| fail("bind", e))?;
    let vip = std::net::SocketAddr::new(vip.parse().map_err(|e| format!("{vip:?}: {e}"))?, 80);
    sock.connect_timeout(&vip.into(), timeout)
        .map_err(|e| fail("connect", e))?;
    let mut stream: std::net::TcpStream = sock.into();
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: lb\r\n\r\n")
        .map_err(|e| fail("send", e))?;
    let mut got = Vec::new();
    stream.read_to_end(&mut got).map_err(|e| fail("read", e))?;
    let text = String::from_utf8_lossy(&got);
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
        _ => Err(format!("from {src}: not a 200 answer: {text:?}")),
    }
}

/// Downloads `/big` (the lab nginx's throttled 2 MB, about 12 s) through the VIP from the
/// namespace named `client`, on a thread, setting `done` when the download ends either
/// way: its length, whether every byte is as served, and how long it took.
pub fn big_download(
    client: String,
    done: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<(usize, bool, Duration), String>> {
    thread::spawn(move || {
        let ns = NetNs::attach(&client);
        let _in = ns.enter();
        let agent = ureq::AgentBuilder::new()
            .timeout_read(Duration::from_secs(10))
            .build();
        let started = Instant::now();
        let resp = agent
            .get(&format!("http://{VIP}/big"))
            .call()
            .map_err(|e| e.to_string());
        let mut body = Vec::new();
        let r = resp.and_then(|r| {
            r.into_reader()
                .read_to_end(&mut body)
                .map_err(|e| format!("after {} bytes: {e}", body.len()))
        });
        done.store(true, Ordering::SeqCst);
        r?;
        let intact = body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8);
        Ok((body.len(), intact, started.elapsed()))
    })
}
