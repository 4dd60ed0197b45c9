//! Keeps the kernel's neighbour table holding the servers' MACs. The dataplane gets next-hop
//! MACs from `bpf_fib_lookup`, which cannot start address resolution itself: a server the
//! kernel has never talked to would be unreachable for XDP. Sending it one datagram through
//! the stack makes the kernel resolve it; health-check pings keep the entries fresh.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

/// The discard port: a datagram there costs the server nothing.
const DISCARD: u16 = 9;

/// Asks the kernel to resolve each address not resolved yet, without waiting; returns how
/// many it asked for.
pub fn request(addrs: &[IpAddr]) -> usize {
    let resolved = resolved(addrs);
    let missing: Vec<&IpAddr> = addrs.iter().filter(|a| !resolved.contains(a)).collect();
    let v4 = UdpSocket::bind("0.0.0.0:0").ok();
    let v6 = UdpSocket::bind("[::]:0").ok();
    for a in &missing {
        let sock = if a.is_ipv6() { &v6 } else { &v4 };
        if let Some(sock) = sock {
            // Errors (no route, say) show up as an unresolved address later.
            let _ = sock.send_to(&[0], SocketAddr::new(**a, DISCARD));
        }
    }
    missing.len()
}

/// Asks the kernel to resolve each address (in the calling thread's network namespace) and
/// waits up to `limit` for all of them; returns those still unresolved.
pub fn prime(addrs: &[IpAddr], limit: Duration) -> Vec<IpAddr> {
    request(addrs);
    let start = Instant::now();
    loop {
        let resolved = resolved(addrs);
        let missing: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| !resolved.contains(a))
            .collect();
        if missing.is_empty() || start.elapsed() >= limit {
            return missing;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Those of `addrs` whose family's neighbour table (of the calling thread's namespace) has
/// a usable entry for: IPv4 from the ARP table (/proc/net is the main thread's view;
/// /proc/thread-self/net is ours), IPv6 from a netlink dump (there is no file).
fn resolved(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if addrs.iter().any(IpAddr::is_ipv4) {
        let text = std::fs::read_to_string("/proc/thread-self/net/arp").unwrap_or_default();
        out.extend(parse_arp(&text).into_iter().map(IpAddr::V4));
    }
    if addrs.iter().any(IpAddr::is_ipv6) {
        out.extend(
            neighbours6()
                .unwrap_or_default()
                .into_iter()
                .map(IpAddr::V6),
        );
    }
    out
}

/// IPv6 neighbours whose entry holds a link-layer address (reachable, stale, delay, probe,
/// permanent): what `bpf_fib_lookup` can use.
fn neighbours6() -> std::io::Result<Vec<Ipv6Addr>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut get = NeighbourMessage::default();
    get.header.family = AddressFamily::Inet6;
    let mut msg = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetNeighbour(get)),
    );
    msg.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    msg.finalize();
    let mut buf = vec![0u8; msg.header.length as usize];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut out = Vec::new();
    loop {
        let mut reply = Vec::with_capacity(64 * 1024);
        socket.recv(&mut reply, 0)?;
        let mut at = 0;
        while at < reply.len() {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[at..])
                .map_err(|e| std::io::Error::other(format!("netlink neighbour dump: {e}")))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return Err(std::io::Error::other(format!(
                        "netlink neighbour dump: {e}"
                    )));
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n))
                    if matches!(
                        n.header.state,
                        NeighbourState::Reachable
                            | NeighbourState::Stale
                            | NeighbourState::Delay
                            | NeighbourState::Probe
                            | NeighbourState::Permanent
                    ) =>
                {
                    out.extend(n.attributes.iter().filter_map(|a| match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(*a),
                        _ => None,
                    }));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len.next_multiple_of(4);
        }
    }
}

/// Parses /proc/net/arp ("IP address  HW type  Flags  HW address  Mask  Device"); an entry
/// is complete when flag 0x2 (ATF_COM) is set.
fn parse_arp(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()?;
            (flags & 0x2 != 0).then(|| f[0].parse().ok()).flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_entries_only() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    192.0.2.11       0x1         0x2         02:00:00:00:00:0b     *        eth0\n\
                    192.0.2.12       0x1         0x0         00:00:00:00:00:00     *        eth0\n";
        assert_eq!(parse_arp(text), vec![Ipv4Addr::new(192, 0, 2, 11)]);
    }
}
