//! Keeps the kernel's neighbour table holding the servers' MACs. The dataplane gets next-hop
//! MACs from `bpf_fib_lookup`, which cannot start address resolution itself: a server the
//! kernel has never talked to would be unreachable for XDP. Sending it one datagram through
//! the stack makes the kernel resolve it; health-check pings keep the entries fresh.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

/// The discard port: a datagram there costs the server nothing.
const DISCARD: u16 = 9;

/// Asks the kernel to resolve each address not resolved yet, without waiting; returns how
/// many it asked for.
pub fn request(addrs: &[Ipv4Addr]) -> usize {
    let resolved = resolved();
    let missing: Vec<&Ipv4Addr> = addrs.iter().filter(|a| !resolved.contains(a)).collect();
    if let Ok(sock) = UdpSocket::bind("0.0.0.0:0") {
        for a in &missing {
            // Errors (no route, say) show up as an unresolved address later.
            let _ = sock.send_to(&[0], SocketAddrV4::new(**a, DISCARD));
        }
    }
    missing.len()
}

/// Asks the kernel to resolve each address (in the calling thread's network namespace) and
/// waits up to `limit` for all of them; returns those still unresolved.
pub fn prime(addrs: &[Ipv4Addr], limit: Duration) -> Vec<Ipv4Addr> {
    request(addrs);
    let start = Instant::now();
    loop {
        let resolved = resolved();
        let missing: Vec<Ipv4Addr> = addrs
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

/// Addresses with a complete entry in the ARP table of the calling thread's namespace
/// (/proc/net is the main thread's view; /proc/thread-self/net is ours).
fn resolved() -> Vec<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/thread-self/net/arp").unwrap_or_default();
    parse_arp(&text)
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
