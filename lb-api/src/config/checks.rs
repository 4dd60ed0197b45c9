//! The checks on addresses and between tables: what no machine can hold, and what two tables
//! that were each read without fault still get wrong together.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

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
        match atm_addrs.get(&IpAddr::V4(atm.atm.address)) {
            Some(first) => cx.err(
                atm.line,
                format!(
                    "duplicate ATM address {} (first on line {})",
                    atm.atm.address, first.line
                ),
            ),
            None => {
                atm_addrs.insert(IpAddr::V4(atm.atm.address), atm);
            }
        }
    }

    // The first server at each address, as (service, server) indices. A service with a
    // server at its own VIP was refused where it was read and is not here, so the server
    // found at a VIP is always another service's.
    let mut servers_at: HashMap<IpAddr, (usize, usize)> = HashMap::new();
    for (i, s) in a.services.iter().enumerate() {
        for (j, server) in s.service.servers.iter().enumerate() {
            servers_at.entry(server.address).or_insert((i, j));
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
            if svc.vip == n.nat.gateway {
                cx.err(
                    s.vip_line,
                    format!(
                        "the VIP {} is the NAT gateway (line {})",
                        svc.vip, n.gateway_line
                    ),
                );
            } else if n.nat.contains(svc.vip) {
                cx.err(
                    s.vip_line,
                    format!(
                        "the VIP {} is inside the NAT subnet {}/{} (line {}), which is the NAT \
                         servers' side",
                        svc.vip, n.nat.subnet, n.nat.prefix, n.subnet_line
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
                && n.nat.addresses().skip(1).any(|p| p == server.address)
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
                && server.address == n.nat.gateway
            {
                cx.err(
                    address_line,
                    format!(
                        "server {} is the NAT gateway (line {}): the primary ATM holds that \
                         address",
                        server.address, n.gateway_line
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
                        atm.address_line
                    ),
                );
            }
        }
    }
    if let Some(n) = a.nat
        && let Some(atm) = n
            .nat
            .addresses()
            .skip(1)
            .find_map(|p| atm_addrs.get(&IpAddr::V4(p)))
    {
        cx.err(
            n.pool_line,
            format!(
                "a NAT pool address is ATM {:?}'s own address (line {})",
                atm.atm.name, atm.address_line
            ),
        );
    }
    if let Some(n) = a.nat
        && let Some(atm) = atm_addrs.get(&IpAddr::V4(n.nat.gateway))
    {
        cx.err(
            n.gateway_line,
            format!(
                "the NAT gateway {} is an ATM's own address (ATM {:?}, line {})",
                n.nat.gateway, atm.atm.name, atm.address_line
            ),
        );
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
