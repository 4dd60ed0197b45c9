//! The reader of the whole file and those of its tables but `[[service]]` (in `services`):
//! each checks what it can alone and returns what it read, with the lines that the checks
//! across tables point at.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::{Ipv4AddrRange, Ipv4Net, Ipv6Net};
use lb_common::IPPROTO_UDP;
use toml_edit::TableLike;

use super::{
    checks::{Across, check_across, reserved_in},
    reader::{At, Cx, Tab, kind},
    services::read_service,
    types::{
        Atm, CONNECTIONS_RANGE, Cluster, Config, Control, DEFAULT_NOTIFY_TIMEOUT,
        DEFAULT_PORT_HOLD, DEFAULT_TIME_WAIT, DEFAULT_TIMEOUT, Ha, Manager, NAT_POOL_MAX,
        NAT6_PREFIX_RANGE, NOTIFY_TIMEOUT_RANGE, Nat, Nat4, Nat6, Quorum, SERVERS_RANGE,
        SERVICES_RANGE, ServiceCfg, TIMEOUT_RANGE, Timeouts, proto_name,
    },
};
use crate::Capacities;

/// A [tables] as read, with the line each capacity was set on (its key's, else the table's),
/// for the checks that count services and server lines against it.
pub(super) struct TablesRead {
    pub(super) caps: Capacities,
    pub(super) services_line: usize,
    pub(super) servers_line: usize,
}

/// A [nat] as read, with the lines the checks across tables point at.
pub(super) struct NatRead {
    pub(super) nat: Nat,
    pub(super) subnet_line: usize,
    pub(super) gateway_line: usize,
    /// The `pool` key's line (the table's header if there is none).
    pub(super) pool_line: usize,
    /// `subnet6` and `gateway6` (the table's header when there is no NAT66).
    pub(super) subnet6_line: usize,
    pub(super) gateway6_line: usize,
}

impl NatRead {
    /// The line of the gateway of `a`'s family.
    pub(super) fn gateway_line_for(&self, a: IpAddr) -> usize {
        if a.is_ipv6() {
            self.gateway6_line
        } else {
            self.gateway_line
        }
    }

    /// The line of the subnet of `a`'s family.
    pub(super) fn subnet_line_for(&self, a: IpAddr) -> usize {
        if a.is_ipv6() {
            self.subnet6_line
        } else {
            self.subnet_line
        }
    }
}

/// An [[atm]] as read: its header line for duplicates, its address line for what collides
/// with the address.
pub(super) struct AtmRead {
    pub(super) atm: Atm,
    pub(super) line: usize,
    pub(super) address_line: usize,
    /// `address6`'s line (`address`'s when there is none).
    pub(super) address6_line: usize,
}

impl AtmRead {
    /// The line of its address `a`.
    pub(super) fn line_of(&self, a: IpAddr) -> usize {
        if a == self.atm.address {
            self.address_line
        } else {
            self.address6_line
        }
    }
}

/// A [[service]] as read, with its header and `vip` lines and each server's `address` line
/// (in the order of `service.servers`).
pub(super) struct ServiceRead {
    pub(super) service: ServiceCfg,
    pub(super) line: usize,
    pub(super) vip_line: usize,
    pub(super) address_lines: Vec<usize>,
}

pub(super) fn read(cx: &mut Cx, root: &dyn TableLike) -> Option<Config> {
    let mut top = Tab::new(root, "the file", 0);

    let (cluster, cluster_line) = match top.table(cx, "cluster") {
        Some((t, line)) => (read_cluster(cx, t, line), line),
        None => {
            if !root.contains_key("cluster") {
                cx.err(0, "the file needs a [cluster] table");
            }
            (None, 0)
        }
    };
    let tables = match top.table(cx, "tables") {
        Some((t, line)) => read_tables(cx, t, line),
        // Defaults: no line to point at.
        None => Some(TablesRead {
            caps: Capacities::default(),
            services_line: 0,
            servers_line: 0,
        }),
    };
    let nat = match top.table(cx, "nat") {
        Some((t, line)) => read_nat(cx, t, line).map(Some),
        None => Some(None),
    };
    let ha = match top.table(cx, "ha") {
        Some((t, line)) => read_ha(cx, t, line),
        None => Some(Ha::default()),
    };
    let control = match top.table(cx, "control") {
        Some((t, line)) => read_control(cx, t, line),
        None => Some(Control::default()),
    };
    let atm_tables = top.tables(cx, "atm");
    if atm_tables.is_empty() && !root.contains_key("atm") {
        cx.err(0, "the file needs at least one [[atm]]");
    }
    let atms: Vec<Option<AtmRead>> = atm_tables
        .into_iter()
        .map(|(t, line)| read_atm(cx, t, line))
        .collect();
    let service_tables = top.tables(cx, "service");
    let nat_read = nat.as_ref().and_then(Option::as_ref);
    // A [nat] that was refused has had its say: its NAT servers are not refused again.
    let nat_arg = match &nat {
        Some(n) => Ok(n.as_ref().map(|n| &n.nat)),
        None => Err(()),
    };
    let services: Vec<Option<ServiceRead>> = service_tables
        .into_iter()
        .map(|(t, line)| read_service(cx, t, line, nat_arg))
        .collect();
    top.finish(cx);

    check_across(
        cx,
        &Across {
            cluster: cluster.as_ref().map(|c| (c, cluster_line)),
            tables: tables.as_ref(),
            nat: nat_read,
            atms: atms.iter().flatten().collect(),
            services: services.iter().flatten().collect(),
        },
    );

    Some(Config {
        cluster: cluster?,
        tables: tables?.caps,
        nat: nat?.map(|n| n.nat),
        ha: ha?,
        control: control?,
        atms: atms
            .into_iter()
            .map(|a| a.map(|a| a.atm))
            .collect::<Option<Vec<_>>>()?,
        services: services
            .into_iter()
            .map(|s| s.map(|s| s.service))
            .collect::<Option<Vec<_>>>()?,
    })
}

fn read_cluster(cx: &mut Cx, t: &dyn TableLike, line: usize) -> Option<Cluster> {
    let mut tab = Tab::new(t, "[cluster]", line);
    let name = tab.name(cx);
    let timeout = tab.int(cx, "timeout", TIMEOUT_RANGE, " seconds");
    let timeout_bad = t.contains_key("timeout") && timeout.is_none();
    let debug = tab.bool(cx, "debug");
    let debug_bad = t.contains_key("debug") && debug.is_none();
    let key = tab.str(cx, "auth_key_file");
    let notify = tab.int(cx, "notify_timeout", NOTIFY_TIMEOUT_RANGE, " seconds");
    let notify_bad = t.contains_key("notify_timeout") && notify.is_none();
    let timeouts = match tab.table(cx, "timeouts") {
        Some((tt, tline)) => read_timeouts(cx, tt, tline, "[cluster.timeouts]", None),
        None if t.contains_key("timeouts") => None,
        None => Some(TimeoutsRead::default()),
    };
    tab.finish(cx);
    let timeouts = timeouts?;
    if let (Some(old), Some(new)) = (&timeout, &timeouts.tcp) {
        cx.err(
            new.line,
            format!(
                "`tcp` sets the same timeout as [cluster] `timeout` on line {}: keep one of \
                 them",
                old.line
            ),
        );
        return None;
    }
    if timeout_bad || debug_bad || notify_bad {
        return None;
    }
    let tcp = timeouts
        .tcp
        .or(timeout)
        .map_or(DEFAULT_TIMEOUT, |t| t.v as u32);
    Some(Cluster {
        name: name?.v,
        timeouts: Timeouts {
            tcp,
            tcp_fin: timeouts.tcp_fin.map(|t| t.v as u32),
            udp: timeouts.udp.map(|t| t.v as u32),
            tcp_syn: timeouts.tcp_syn.map(|t| t.v as u32),
        },
        debug: debug.map(|d| d.v).unwrap_or(false),
        auth_key_file: key.map(|k| PathBuf::from(k.v)),
        notify_timeout: notify.map(|n| n.v as u32).unwrap_or(DEFAULT_NOTIFY_TIMEOUT),
    })
}

/// `[cluster.timeouts]` or `[service.timeouts]` as read: each in seconds, with its line.
#[derive(Default)]
pub(super) struct TimeoutsRead {
    pub(super) tcp: Option<At<i64>>,
    pub(super) tcp_fin: Option<At<i64>>,
    pub(super) udp: Option<At<i64>>,
    pub(super) tcp_syn: Option<At<i64>>,
}

/// Reads a `timeouts` table, `name` in messages. `proto`: a service's protocol, whose
/// connections only its own keys apply to (`tcp` and `tcp_fin`, or `udp`); `None`: the
/// cluster's, where all three do.
pub(super) fn read_timeouts(
    cx: &mut Cx,
    t: &dyn TableLike,
    line: usize,
    name: &str,
    proto: Option<u8>,
) -> Option<TimeoutsRead> {
    let mut tab = Tab::new(t, name, line);
    let mut bad = false;
    let mut get = |tab: &mut Tab, cx: &mut Cx, key| {
        let v = tab.int(cx, key, TIMEOUT_RANGE, " seconds");
        bad |= t.contains_key(key) && v.is_none();
        v
    };
    let read = TimeoutsRead {
        tcp: get(&mut tab, cx, "tcp"),
        tcp_fin: get(&mut tab, cx, "tcp_fin"),
        udp: get(&mut tab, cx, "udp"),
        tcp_syn: if proto.is_none() {
            get(&mut tab, cx, "tcp_syn")
        } else {
            None
        },
    };
    tab.finish(cx);
    if let Some(p) = proto {
        let own = if p == IPPROTO_UDP {
            "`udp`"
        } else {
            "`tcp` and `tcp_fin`"
        };
        let keys = [
            ("tcp", &read.tcp),
            ("tcp_fin", &read.tcp_fin),
            ("udp", &read.udp),
        ];
        for (key, v) in keys {
            if let Some(v) = v
                && (key == "udp") != (p == IPPROTO_UDP)
            {
                cx.err(
                    v.line,
                    format!(
                        "`{key}` does not apply to a {} service: its connections take {own}",
                        proto_name(p)
                    ),
                );
                bad = true;
            }
        }
    }
    (!bad).then_some(read)
}

fn read_tables(cx: &mut Cx, t: &dyn TableLike, line: usize) -> Option<TablesRead> {
    let mut tab = Tab::new(t, "[tables]", line);
    let d = Capacities::default();
    let mut ok = true;
    let mut get = |tab: &mut Tab, cx: &mut Cx, key, range, default: u32| {
        let present = t.contains_key(key);
        match tab.int(cx, key, range, "") {
            Some(v) => (v.v as u32, v.line),
            None => {
                ok &= !present;
                (default, line)
            }
        }
    };
    let services = get(&mut tab, cx, "services", SERVICES_RANGE, d.services);
    let servers = get(&mut tab, cx, "servers", SERVERS_RANGE, d.servers);
    let (connections, _) = get(
        &mut tab,
        cx,
        "connections",
        CONNECTIONS_RANGE,
        d.connections,
    );
    tab.finish(cx);
    ok.then_some(TablesRead {
        caps: Capacities {
            services: services.0,
            servers: servers.0,
            connections,
        },
        services_line: services.1,
        servers_line: servers.1,
    })
}

fn read_nat(cx: &mut Cx, t: &dyn TableLike, line: usize) -> Option<NatRead> {
    let mut tab = Tab::new(t, "[nat]", line);
    let has4 = ["subnet", "gateway", "pool"]
        .iter()
        .any(|k| t.contains_key(k));
    let has6 = ["subnet6", "gateway6"].iter().any(|k| t.contains_key(k));
    if !has4 && !has6 {
        cx.err(
            line,
            "[nat] needs `subnet` and `gateway` (NAT44), `subnet6` and `gateway6` (NAT66), or \
             both",
        );
        tab.finish(cx);
        return None;
    }
    let (subnet, gateway) = if has4 {
        (
            tab.req_str(cx, "subnet"),
            tab.addr(cx, "gateway", "the NAT gateway"),
        )
    } else {
        (None, None)
    };
    let (subnet6, gateway6) = if has6 {
        let subnet6 = tab.req_str(cx, "subnet6");
        let gateway6 = match tab.ip6(cx, "gateway6", "the NAT66 gateway") {
            Ok(None) => {
                tab.missing(cx, "gateway6");
                None
            }
            Ok(g) => g,
            Err(()) => None,
        };
        (subnet6, gateway6)
    } else {
        (None, None)
    };
    let hold = tab.int(cx, "port_hold", 0..=600, " seconds");
    let time_wait = tab.int(cx, "time_wait", 0..=600, " seconds");
    let hold_bad = (t.contains_key("port_hold") && hold.is_none())
        || (t.contains_key("time_wait") && time_wait.is_none());
    let pool_item = tab.item(cx, "pool");
    tab.finish(cx);
    let v4 = if has4 {
        Some(read_nat4(cx, subnet?, gateway?, pool_item, line)?)
    } else {
        None
    };
    let v6 = if has6 {
        Some(read_nat6(cx, subnet6?, gateway6?)?)
    } else {
        None
    };
    if hold_bad {
        return None;
    }
    Some(NatRead {
        nat: Nat {
            v4: v4.as_ref().map(|r| r.0),
            v6: v6.as_ref().map(|r| r.0),
            port_hold: hold.map(|h| h.v as u32).unwrap_or(DEFAULT_PORT_HOLD),
            time_wait: time_wait.map(|h| h.v as u32).unwrap_or(DEFAULT_TIME_WAIT),
        },
        subnet_line: v4.as_ref().map_or(line, |r| r.1),
        gateway_line: v4.as_ref().map_or(line, |r| r.2),
        pool_line: v4.as_ref().map_or(line, |r| r.3),
        subnet6_line: v6.as_ref().map_or(line, |r| r.1),
        gateway6_line: v6.as_ref().map_or(line, |r| r.2),
    })
}

/// `subnet`, `gateway` and `pool`, with their lines.
fn read_nat4(
    cx: &mut Cx,
    subnet: At<String>,
    gateway: At<Ipv4Addr>,
    pool_item: Option<(&toml_edit::Item, usize)>,
    line: usize,
) -> Option<(Nat4, usize, usize, usize)> {
    let Some((addr, prefix)) = subnet.v.split_once('/') else {
        cx.err(
            subnet.line,
            format!(
                "`subnet` = {:?} must be ADDRESS/PREFIX, e.g. 10.0.0.0/16",
                subnet.v
            ),
        );
        return None;
    };
    let Ok(addr) = addr.parse::<Ipv4Addr>() else {
        cx.err(
            subnet.line,
            format!("`subnet` = {:?}: {addr:?} is not an IPv4 address", subnet.v),
        );
        return None;
    };
    let prefix = match prefix.parse::<u8>() {
        Ok(p) if (8..=30).contains(&p) => p,
        _ => {
            cx.err(
                subnet.line,
                format!(
                    "`subnet` = {:?}: the prefix length must be 8 to 30",
                    subnet.v
                ),
            );
            return None;
        }
    };
    let net = Ipv4Net::new(addr, prefix).expect("a prefix of 8 to 30");
    if net.trunc() != net {
        cx.err(
            subnet.line,
            format!(
                "`subnet` = {:?} has host bits set: write the network address",
                subnet.v
            ),
        );
        return None;
    }
    if !net.contains(&gateway.v) {
        cx.err(
            gateway.line,
            format!("`gateway` {} is not in the NAT subnet {net}", gateway.v),
        );
        return None;
    }
    if let Some(which) = reserved_in(&net, gateway.v) {
        cx.err(
            gateway.line,
            format!(
                "`gateway` {} is the NAT subnet {net}'s {which} address, which no host can have",
                gateway.v
            ),
        );
        return None;
    }
    let mut pool = Vec::new();
    let mut pool_line = line;
    if let Some((item, pline)) = pool_item {
        pool_line = pline;
        let Some(list) = item.as_array() else {
            cx.err(
                pline,
                format!(
                    "`pool` must be an array of addresses or ADDRESS/PREFIX ranges, not {}",
                    kind(item)
                ),
            );
            return None;
        };
        for v in list.iter() {
            let Some(text) = v.as_str() else {
                cx.err(pline, format!("`pool` holds {v}, which is not a string"));
                return None;
            };
            let range = match text.split_once('/') {
                None => match text.parse::<Ipv4Addr>() {
                    Ok(a) => Ipv4Net::from(a),
                    Err(_) => {
                        cx.err(
                            pline,
                            format!("`pool` holds {text:?}, which is not an IPv4 address"),
                        );
                        return None;
                    }
                },
                Some((a, p)) => match (a.parse::<Ipv4Addr>(), p.parse::<u8>()) {
                    (Ok(a), Ok(p)) if (24..=32).contains(&p) => {
                        Ipv4Net::new(a, p).expect("a prefix of 24 to 32")
                    }
                    _ => {
                        cx.err(
                            pline,
                            format!(
                                "`pool` holds {text:?}: a range is ADDRESS/PREFIX with a \
                                 prefix length of 24 to 32"
                            ),
                        );
                        return None;
                    }
                },
            };
            for a in Ipv4AddrRange::new(range.network(), range.broadcast()) {
                // The subnet's own network and broadcast addresses are nobody's: a range skips
                // them. (It skips the first and last of every block of the subnet's size, so a
                // range reaching past the subnet is refused at its first address that is
                // neither.)
                let block = Ipv4Net::new(a, prefix).expect("a prefix of 8 to 30");
                if range.prefix_len() < 32 && (a == block.network() || a == block.broadcast()) {
                    continue;
                }
                let problem = if !net.contains(&a) {
                    Some(format!("is not in the NAT subnet {net}"))
                } else if let Some(which) = reserved_in(&net, a) {
                    Some(format!(
                        "is the NAT subnet {net}'s {which} address, which no host can have"
                    ))
                } else if a == gateway.v {
                    Some("is the gateway, which is always a NAT source address".to_string())
                } else if pool.contains(&a) {
                    Some("is in the pool twice".to_string())
                } else {
                    None
                };
                if let Some(p) = problem {
                    cx.err(pline, format!("`pool` address {a} {p}"));
                    return None;
                }
                pool.push(a);
            }
        }
        if pool.len() > NAT_POOL_MAX - 1 {
            cx.err(
                pline,
                format!(
                    "`pool` holds {} addresses: at most {} (with the gateway, {NAT_POOL_MAX} NAT \
                     source addresses)",
                    pool.len(),
                    NAT_POOL_MAX - 1
                ),
            );
            return None;
        }
    }
    let mut pool_arr = [Ipv4Addr::UNSPECIFIED; NAT_POOL_MAX - 1];
    pool_arr[..pool.len()].copy_from_slice(&pool);
    let nat = Nat4 {
        subnet: addr,
        prefix,
        gateway: gateway.v,
        pool: pool_arr,
        pool_len: pool.len() as u8,
    };
    Some((nat, subnet.line, gateway.line, pool_line))
}

/// `subnet6` and `gateway6`, with their lines. IPv6 has no broadcast address, but its
/// subnet's first address is the subnet-router anycast address (RFC 4291), which no host
/// may take.
fn read_nat6(
    cx: &mut Cx,
    subnet: At<String>,
    gateway: At<Ipv6Addr>,
) -> Option<(Nat6, usize, usize)> {
    let net = match subnet.v.parse::<Ipv6Net>() {
        Ok(n) if NAT6_PREFIX_RANGE.contains(&n.prefix_len()) => n,
        Ok(_) => {
            cx.err(
                subnet.line,
                format!(
                    "`subnet6` = {:?}: the prefix length must be {} to {}",
                    subnet.v,
                    NAT6_PREFIX_RANGE.start(),
                    NAT6_PREFIX_RANGE.end()
                ),
            );
            return None;
        }
        Err(_) => {
            cx.err(
                subnet.line,
                format!(
                    "`subnet6` = {:?} must be an IPv6 ADDRESS/PREFIX, e.g. 2001:db8:1::/64",
                    subnet.v
                ),
            );
            return None;
        }
    };
    if net.trunc() != net {
        cx.err(
            subnet.line,
            format!(
                "`subnet6` = {:?} has host bits set: write the network address",
                subnet.v
            ),
        );
        return None;
    }
    if let Some(what) = super::checks::unusable(IpAddr::V6(net.network())) {
        cx.err(
            subnet.line,
            format!(
                "`subnet6` = {:?} is {what}: no server can be in it",
                subnet.v
            ),
        );
        return None;
    }
    if !net.contains(&gateway.v) {
        cx.err(
            gateway.line,
            format!("`gateway6` {} is not in the NAT subnet {net}", gateway.v),
        );
        return None;
    }
    if gateway.v == net.network() {
        cx.err(
            gateway.line,
            format!(
                "`gateway6` {} is the NAT subnet {net}'s subnet-router anycast address, which \
                 no host can have",
                gateway.v
            ),
        );
        return None;
    }
    let nat = Nat6 {
        subnet: net.network(),
        prefix: net.prefix_len(),
        gateway: gateway.v,
    };
    Some((nat, subnet.line, gateway.line))
}

fn read_ha(cx: &mut Cx, t: &dyn TableLike, line: usize) -> Option<Ha> {
    let mut tab = Tab::new(t, "[ha]", line);
    let mut bad = false;
    let port = tab.int(cx, "port", 1..=65_535, "");
    bad |= t.contains_key("port") && port.is_none();
    let hb = tab.int(cx, "heartbeat_ms", 10..=10_000, " ms");
    bad |= t.contains_key("heartbeat_ms") && hb.is_none();
    let dead = tab.int(cx, "dead_after", 1..=100, " heartbeats");
    bad |= t.contains_key("dead_after") && dead.is_none();
    let quorum = tab.choice(
        cx,
        "quorum",
        &[("none", Quorum::None), ("majority", Quorum::Majority)],
    );
    bad |= t.contains_key("quorum") && quorum.is_none();
    let manager = tab.choice(
        cx,
        "manager",
        &[("lb", Manager::Lb), ("pacemaker", Manager::Pacemaker)],
    );
    bad |= t.contains_key("manager") && manager.is_none();
    if let (Some(q), Some(m)) = (&quorum, &manager)
        && q.v == Quorum::Majority
        && m.v == Manager::Pacemaker
    {
        cx.err(
            q.line,
            "`quorum` = \"majority\" is lb's own election's; with `manager` = \"pacemaker\" \
             quorum is corosync's (no-quorum-policy)"
                .to_string(),
        );
        bad = true;
    }
    let mut hooks = [None, None, None];
    for (slot, key) in hooks
        .iter_mut()
        .zip(["notify_primary", "notify_backup", "notify_fault"])
    {
        match tab.program(cx, key, "hook") {
            Ok(p) => *slot = p.map(|p| p.v),
            Err(()) => bad = true,
        }
    }
    let [notify_primary, notify_backup, notify_fault] = hooks;
    let mut track = Vec::new();
    if let Some((item, line)) = tab.item(cx, "track") {
        match item.as_array() {
            Some(a) => {
                for v in a.iter() {
                    match v.as_str().map(|s| s.parse::<IpAddr>()) {
                        Some(Ok(addr)) => track.push(addr),
                        _ => {
                            cx.err(
                                line,
                                format!("`track` holds {v}, which is not an IPv4 or IPv6 address"),
                            );
                            bad = true;
                        }
                    }
                }
            }
            None => {
                cx.err(
                    line,
                    format!("`track` must be an array of addresses, not {}", kind(item)),
                );
                bad = true;
            }
        }
    }
    tab.finish(cx);
    if bad {
        return None;
    }
    let defaults = Ha::default();
    Some(Ha {
        port: port.map(|p| p.v as u16).unwrap_or(defaults.port),
        heartbeat_ms: hb.map(|h| h.v as u32).unwrap_or(defaults.heartbeat_ms),
        dead_after: dead.map(|d| d.v as u32).unwrap_or(defaults.dead_after),
        track,
        quorum: quorum.map(|q| q.v).unwrap_or(defaults.quorum),
        manager: manager.map(|m| m.v).unwrap_or(defaults.manager),
        notify_primary,
        notify_backup,
        notify_fault,
    })
}

fn read_control(cx: &mut Cx, t: &dyn TableLike, line: usize) -> Option<Control> {
    let mut tab = Tab::new(t, "[control]", line);
    let socket = tab.str(cx, "socket");
    let mount = tab.str(cx, "mount");
    let metrics = tab.str(cx, "metrics");
    tab.finish(cx);
    let defaults = Control::default();
    let metrics = match metrics {
        None => defaults.metrics,
        Some(m) if m.v.is_empty() || m.v == "off" => None,
        Some(m) => match m.v.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                cx.err(
                    m.line,
                    format!("`metrics` = {:?} must be ADDRESS:PORT, or \"off\"", m.v),
                );
                return None;
            }
        },
    };
    let path = |cx: &mut Cx, v: Option<At<String>>, key: &str, default: PathBuf| match v {
        None => Some(default),
        Some(p) if Path::new(&p.v).is_absolute() => Some(PathBuf::from(p.v)),
        Some(p) => {
            cx.err(
                p.line,
                format!("`{key}` = {:?} must be an absolute path", p.v),
            );
            None
        }
    };
    // A default has no line; None sorts first, so the later of two is the one with a line.
    let (socket_line, mount_line) = (
        socket.as_ref().map(|s| s.line),
        mount.as_ref().map(|m| m.line),
    );
    let socket = path(cx, socket, "socket", defaults.socket);
    let mount = path(cx, mount, "mount", defaults.mount);
    let (socket, mount) = (socket?, mount?);
    // One path cannot be both the socket the daemon binds and the directory FUSE mounts.
    if socket == mount {
        let (key, line, other, other_line) = if mount_line > socket_line {
            ("mount", mount_line, "socket", socket_line)
        } else {
            ("socket", socket_line, "mount", mount_line)
        };
        let other_at = match other_line {
            Some(l) => format!("line {l}"),
            None => "its default".to_string(),
        };
        cx.err(
            line.unwrap_or(0),
            format!(
                "`{key}` = {:?} is the same path as `{other}` ({other_at}): the control socket \
                 and the tables' mount need a path each",
                socket.display().to_string()
            ),
        );
        return None;
    }
    Some(Control {
        socket,
        mount,
        metrics,
    })
}

fn read_atm(cx: &mut Cx, t: &dyn TableLike, line: usize) -> Option<AtmRead> {
    let mut tab = Tab::new(t, "[[atm]]", line);
    let name = tab.name(cx);
    let address = tab.ip(cx, "address", "an ATM's address");
    let address6 = tab.ip6(cx, "address6", "an ATM's address");
    let interface = tab.req_str(cx, "interface");
    tab.finish(cx);
    if let Some(i) = &interface
        && (i.v.len() > 15 || i.v.contains(['/', ' ']))
    {
        cx.err(
            i.line,
            format!("`interface` = {:?} is not an interface name", i.v),
        );
        return None;
    }
    let address = address?;
    let address6 = address6.ok()?;
    if let Some(a6) = &address6
        && address.v.is_ipv6()
    {
        cx.err(
            a6.line,
            format!(
                "`address6` = {} beside an IPv6 `address` ({}, line {}): `address6` is the IPv6 \
                 address of an ATM whose `address` is IPv4",
                a6.v, address.v, address.line
            ),
        );
        return None;
    }
    Some(AtmRead {
        atm: Atm {
            name: name?.v,
            address: address.v,
            address6: address6.as_ref().map(|a| a.v),
            interface: interface?.v,
        },
        line,
        address_line: address.line,
        address6_line: address6.map_or(address.line, |a| a.line),
    })
}
