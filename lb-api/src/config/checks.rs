//! The checks on addresses and between tables: what no machine can hold, and what two tables
//! that were each read without fault still get wrong together.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use lb_common::Method;

use super::{
    reader::Cx,
    sections::{AtmRead, NatRead, ServiceRead, TablesRead},
    types::Cluster,
};

/// Why no machine can hold `a` (so it cannot be a VIP, a server, an ATM or the NAT
/// gateway), if that is so.
pub(super) fn unusable(a: IpAddr) -> Option<&'static str> {
    match a {
        IpAddr::V4(a) => {
            if a.is_unspecified() {
                Some("the unspecified address")
            } else if a.is_broadcast() {
                Some("the broadcast address")
            } else if a.is_loopback() {
                Some("a loopback address")
            } else if a.is_multicast() {
                Some("a multicast address")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            if a.is_unspecified() {
                Some("the unspecified address")
            } else if a.is_loopback() {
                Some("a loopback address")
            } else if a.is_multicast() {
                Some("a multicast address")
            } else if a.is_unicast_link_local() {
                // Its scope is one link: neither routed nor looked up without an interface.
                Some("a link-local address")
            } else if a.to_ipv4_mapped().is_some() {
                // The dataplane keys IPv4 by exactly these addresses.
                Some("an IPv4-mapped address (write the IPv4 address itself)")
            } else {
                None
            }
        }
    }
}

/// Which of the subnet's addresses that no host may hold `a` is (its network or broadcast
/// address), if it is one: `net` is a NAT subnet, /8 to /30.
pub(super) fn reserved_in(net: &ipnet::Ipv4Net, a: Ipv4Addr) -> Option<&'static str> {
    if a == net.network() {
        Some("network")
    } else if a == net.broadcast() {
        Some("broadcast")
    } else {
        None
    }
}

/// The tables that were read without fault, for the checks between them.
pub(super) struct Across<'a> {
    /// With the [cluster] header's line.
    pub(super) cluster: Option<(&'a Cluster, usize)>,
    pub(super) tables: Option<&'a TablesRead>,
    pub(super) nat: Option<&'a NatRead>,
    pub(super) atms: Vec<&'a AtmRead>,
    pub(super) services: Vec<&'a ServiceRead>,
}

/// The checks that compare tables with each other. Each problem goes on the line of the
/// later or offending value and names the other's line, so both can be found.
pub(super) fn check_across(cx: &mut Cx, a: &Across) {
    let mut atm_names = HashMap::new();
    let mut atm_addrs: HashMap<IpAddr, &AtmRead> = HashMap::new();
    for atm in &a.atms {
        if let Some(first) = atm_names.insert(atm.atm.name.as_str(), atm.line) {
            cx.err(
                atm.line,
                format!(
                    "duplicate ATM name {:?} (first on line {first})",
                    atm.atm.name
                ),
            );
        }
        for addr in atm.atm.addresses() {
            match atm_addrs.get(&addr) {
                Some(first) => cx.err(
                    atm.line_of(addr),
                    format!(
                        "duplicate ATM address {addr} (first on line {})",
                        first.line_of(addr)
                    ),
                ),
                None => {
                    atm_addrs.insert(addr, atm);
                }
            }
        }
    }
    // Heartbeats and sync go from one ATM's `address` to the others' on one socket.
    if let Some(first) = a.atms.first() {
        for atm in &a.atms[1..] {
            if atm.atm.address.is_ipv6() != first.atm.address.is_ipv6() {
                cx.err(
                    atm.address_line,
                    format!(
                        "ATM {:?}'s address {} and ATM {:?}'s {} (line {}) are of two families: \
                         heartbeats go between the ATMs' `address`es, which share one (a \
                         dual-stack ATM takes its other family's address in `address6`)",
                        atm.atm.name,
                        atm.atm.address,
                        first.atm.name,
                        first.atm.address,
                        first.address_line
                    ),
                );
            }
        }
    }

    // The first server at each address, as (service, server) indices. A service with a
    // server at its own VIP was refused where it was read and is not here, so the server
    // found at a VIP is always another service's. A local server (the ATM itself, at its
    // service's VIP) is not at an address of its own.
    let mut servers_at: HashMap<IpAddr, (usize, usize)> = HashMap::new();
    for (i, s) in a.services.iter().enumerate() {
        for (j, server) in s.service.servers.iter().enumerate() {
            if server.method != Method::Local {
                servers_at.entry(server.address).or_insert((i, j));
            }
        }
    }

    let mut service_keys: HashMap<(IpAddr, u16, u8), usize> = HashMap::new();
    let mut service_names = HashMap::new();
    let mut lines = 0usize;
    for s in &a.services {
        let (svc, line) = (&s.service, s.line);
        lines += svc.servers.len();
        if let Some(first) = service_names.insert(svc.name.as_str(), line) {
            cx.err(
                line,
                format!(
                    "duplicate service name {:?} (first on line {first})",
                    svc.name
                ),
            );
        }
        if let Some(first) = service_keys.insert((svc.vip, svc.port, svc.proto), line) {
            cx.err(
                line,
                format!(
                    "duplicate service {} {}:{} (first on line {first})",
                    svc.proto_name(),
                    svc.vip,
                    svc.port
                ),
            );
        }
        if atm_addrs.contains_key(&svc.vip) {
            cx.err(line, format!("the VIP {} is an ATM's own address", svc.vip));
        }
        // The NAT subnet is the servers' side: the gateway answers there, and the dataplane
        // takes packets from it for NAT replies, not for a VIP's clients.
        if let Some(n) = a.nat {
            if n.nat.is_gateway(svc.vip) {
                cx.err(
                    s.vip_line,
                    format!(
                        "the VIP {} is the NAT gateway (line {})",
                        svc.vip,
                        n.gateway_line_for(svc.vip)
                    ),
                );
            } else if n.nat.contains(svc.vip) {
                let net = n.nat.nets().find(|net| net.contains(&svc.vip));
                cx.err(
                    s.vip_line,
                    format!(
                        "the VIP {} is inside the NAT subnet {} (line {}), which is the NAT \
                         servers' side",
                        svc.vip,
                        net.expect("contains"),
                        n.subnet_line_for(svc.vip)
                    ),
                );
            }
        }
        // A VIP is held by the primary ATM; a server answering at it too would take its
        // clients' packets, or be balanced to itself.
        if let Some(&(k, j)) = servers_at.get(&svc.vip) {
            let other = a.services[k];
            cx.err(
                s.vip_line,
                format!(
                    "the VIP {} is server {:?} of service {:?} (line {})",
                    svc.vip,
                    other.service.servers[j].name,
                    other.service.name,
                    other.address_lines[j]
                ),
            );
        }
        for (server, &address_line) in svc.servers.iter().zip(&s.address_lines) {
            if let Some(n) = a.nat
                && n.nat.addresses().any(|p| p == server.address)
                && !n.nat.is_gateway(server.address)
            {
                cx.err(
                    address_line,
                    format!(
                        "server {} is a NAT pool address (line {}): the primary ATM holds \
                         that address",
                        server.address, n.pool_line
                    ),
                );
            }
            if let Some(n) = a.nat
                && n.nat.is_gateway(server.address)
            {
                cx.err(
                    address_line,
                    format!(
                        "server {} is the NAT gateway (line {}): the primary ATM holds that \
                         address",
                        server.address,
                        n.gateway_line_for(server.address)
                    ),
                );
            }
            // A tunnel leaves from the primary's own address of the server's family.
            if server.method == Method::Tunnel
                && let Some(atm) = a
                    .atms
                    .iter()
                    .find(|atm| atm.atm.address_for(server.address).is_none())
            {
                let (family, key) = if server.address.is_ipv6() {
                    ("IPv6", "address6")
                } else {
                    ("IPv4", "address")
                };
                cx.err(
                    address_line,
                    format!(
                        "tunnel server {} is {family}: its tunnel leaves from the primary ATM's \
                         {family} address, and ATM {:?} (line {}) has none (give it `{key}`)",
                        server.address, atm.atm.name, atm.line
                    ),
                );
            }
            // Whatever the method, the ATM would send the server's packets to itself.
            if let Some(atm) = atm_addrs.get(&server.address) {
                cx.err(
                    address_line,
                    format!(
                        "{} server {} is the address of ATM {:?} (line {}): an ATM cannot \
                         balance to itself",
                        server.method.name(),
                        server.address,
                        atm.atm.name,
                        atm.line_of(server.address)
                    ),
                );
            }
        }
    }
    if let Some(n) = a.nat {
        for p in n.nat.addresses() {
            let Some(atm) = atm_addrs.get(&p) else {
                continue;
            };
            if n.nat.is_gateway(p) {
                cx.err(
                    n.gateway_line_for(p),
                    format!(
                        "the NAT gateway {p} is an ATM's own address (ATM {:?}, line {})",
                        atm.atm.name,
                        atm.line_of(p)
                    ),
                );
            } else {
                cx.err(
                    n.pool_line,
                    format!(
                        "a NAT pool address is ATM {:?}'s own address (line {})",
                        atm.atm.name,
                        atm.line_of(p)
                    ),
                );
            }
        }
    }
    if let Some(t) = a.tables {
        let n = a.services.len();
        if n > t.caps.services as usize {
            cx.err(
                t.services_line,
                format!(
                    "{n} services do not fit [tables] services = {}",
                    t.caps.services
                ),
            );
        }
        if lines > t.caps.servers as usize {
            cx.err(
                t.servers_line,
                format!(
                    "{lines} server lines do not fit [tables] servers = {}",
                    t.caps.servers
                ),
            );
        }
    }
    if a.atms.len() > 1
        && let Some((c, line)) = a.cluster
        && c.auth_key_file.is_none()
    {
        cx.err(
            line,
            "more than one [[atm]] needs [cluster] auth_key_file: ATM messages are authenticated",
        );
    }
}
