//! The readers of a `[[service]]`, its `[[service.server]]`s and its `[service.check]`, with
//! the words each choice is written with.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, Method, Sched};
use toml_edit::TableLike;

use super::{
    checks::reserved_in,
    reader::{At, Cx, Tab},
    sections::{ServiceRead, TimeoutsRead, read_timeouts},
    types::{Check, CheckKind, Nat, ServerCfg, ServiceCfg, ServiceTimeouts, WEIGHT_RANGE},
};

const SCHEDULERS: &[(&str, Sched)] = &[
    ("rr", Sched::Rr),
    ("wrr", Sched::Wrr),
    ("sh", Sched::Sh),
    ("maglev", Sched::Maglev),
    ("lc", Sched::Lc),
    ("wlc", Sched::Wlc),
    ("sed", Sched::Sed),
];
const METHODS: &[(&str, Method)] = &[
    ("nat", Method::Nat),
    ("direct", Method::Direct),
    ("tunnel", Method::Tunnel),
    ("local", Method::Local),
];
/// New connections a second a service or a client prefix may open.
const RATE_RANGE: std::ops::RangeInclusive<i64> = 1..=100_000_000;
const PROTOCOLS: &[(&str, u8)] = &[("tcp", IPPROTO_TCP), ("udp", IPPROTO_UDP)];

pub(super) fn read_service(
    cx: &mut Cx,
    t: &dyn TableLike,
    line: usize,
    nat: Result<Option<&Nat>, ()>,
) -> Option<ServiceRead> {
    let mut tab = Tab::new(t, "[[service]]", line);
    let mut bad = false;
    let name = tab.name(cx);
    let vip = tab.ip(cx, "vip", "a VIP");
    let port = tab.int(cx, "port", 1..=65_535, "");
    if !t.contains_key("port") {
        tab.missing(cx, "port");
    }
    let proto = tab.choice(cx, "protocol", PROTOCOLS);
    bad |= t.contains_key("protocol") && proto.is_none();
    let sched = tab.choice(cx, "scheduler", SCHEDULERS);
    bad |= t.contains_key("scheduler") && sched.is_none();
    let persistence = tab.int(cx, "persistence", 0..=86_400, " seconds");
    bad |= t.contains_key("persistence") && persistence.is_none();
    let notify_up = tab.program(cx, "notify_up", "hook");
    let notify_down = tab.program(cx, "notify_down", "hook");
    bad |= notify_up.is_err() || notify_down.is_err();
    let netmask = tab.int(cx, "persistence_netmask", 1..=128, " bits");
    bad |= t.contains_key("persistence_netmask") && netmask.is_none();
    let one_packet = tab.bool(cx, "one_packet");
    bad |= t.contains_key("one_packet") && one_packet.is_none();
    let max_new = tab.int(cx, "max_new_per_sec", RATE_RANGE, " connections a second");
    bad |= t.contains_key("max_new_per_sec") && max_new.is_none();
    let max_new_src = tab.int(
        cx,
        "max_new_per_sec_per_source",
        RATE_RANGE,
        " connections a second",
    );
    bad |= t.contains_key("max_new_per_sec_per_source") && max_new_src.is_none();
    let limit_prefix = tab.int(cx, "rate_limit_prefix", 1..=128, " bits");
    bad |= t.contains_key("rate_limit_prefix") && limit_prefix.is_none();
    if let Some(o) = &one_packet
        && o.v
        && proto.as_ref().map(|p| p.v) != Some(IPPROTO_UDP)
    {
        cx.err(
            o.line,
            "`one_packet` is for udp services (each datagram scheduled alone): a tcp \
             connection needs its entry",
        );
        bad = true;
    }
    let quorum = tab.int(cx, "quorum", 1..=65_536, " servers");
    bad |= t.contains_key("quorum") && quorum.is_none();
    let hysteresis = tab.int(cx, "hysteresis", 0..=65_535, " servers");
    bad |= t.contains_key("hysteresis") && hysteresis.is_none();
    let timeouts = match tab.table(cx, "timeouts") {
        Some((tt, tline)) => read_timeouts(
            cx,
            tt,
            tline,
            "[service.timeouts]",
            Some(proto.as_ref().map_or(IPPROTO_TCP, |p| p.v)),
        ),
        None if t.contains_key("timeouts") => None,
        None => Some(TimeoutsRead::default()),
    };
    bad |= timeouts.is_none();
    let check = match tab.table(cx, "check") {
        Some((c, cline)) => read_check(cx, c, cline, proto.as_ref().map(|p| p.v)),
        None if t.contains_key("check") => None,
        None => Some(Check::default()),
    };
    let server_tables = tab.tables(cx, "server");
    tab.finish(cx);
    let service_port = port.as_ref().map(|p| p.v as u16);
    let mut servers = Vec::new();
    let mut address_lines = Vec::new();
    let mut seen_names: HashMap<String, usize> = HashMap::new();
    let mut seen_addrs: HashSet<(IpAddr, u16)> = HashSet::new();
    for (st, sline) in server_tables {
        match read_server(cx, st, sline, service_port, vip.as_ref().map(|v| v.v), nat) {
            Some((s, address_line)) => {
                if let Some(first) = seen_names.insert(s.name.clone(), sline) {
                    cx.err(
                        sline,
                        format!(
                            "duplicate server name {:?} in this service (first on line {first})",
                            s.name
                        ),
                    );
                    bad = true;
                }
                if !seen_addrs.insert((s.address, s.port)) {
                    let what = if s.method == Method::Local {
                        "a second local server: a service has one at most (the primary ATM)"
                            .to_string()
                    } else {
                        format!(
                            "duplicate server {} in this service",
                            SocketAddr::new(s.address, s.port)
                        )
                    };
                    cx.err(sline, what);
                    bad = true;
                }
                if let Some(v) = &vip
                    && v.v.is_ipv4() != s.address.is_ipv4()
                {
                    cx.err(
                        address_line,
                        format!(
                            "server {} is {} but the VIP {} (line {}) is {}: a service and its \
                             servers share a family",
                            s.address,
                            family(s.address),
                            v.v,
                            v.line,
                            family(v.v)
                        ),
                    );
                    bad = true;
                }
                if let Some(v) = &vip
                    && v.v == s.address
                    && s.method != Method::Local
                {
                    cx.err(sline, format!("server {} is the VIP itself", s.address));
                    bad = true;
                }
                servers.push(s);
                address_lines.push(address_line);
            }
            None => bad = true,
        }
    }
    if let Some(o) = &one_packet
        && o.v
        && servers.iter().any(|s| s.method == Method::Nat)
    {
        cx.err(
            o.line,
            "`one_packet` works with direct and tunnel servers: a NAT server's reply needs \
             the connection entry to be translated back",
        );
        bad = true;
    }
    if let Some(sc) = &sched
        && matches!(sc.v, Sched::Lc | Sched::Wlc | Sched::Sed)
        && servers.len() > lb_common::LEAST_MAX as usize
    {
        cx.err(
            sc.line,
            format!(
                "scheduler {:?} compares every server for each new connection: at most {} \
                 servers, not {} (use maglev or wrr)",
                sc.v.name(),
                lb_common::LEAST_MAX,
                servers.len()
            ),
        );
        bad = true;
    }
    if let Some(n) = &netmask {
        if persistence.as_ref().is_none_or(|p| p.v == 0) {
            cx.err(
                n.line,
                "`persistence_netmask` needs `persistence` (seconds a client prefix sticks to \
                 its server)",
            );
            bad = true;
        } else if let Some(v) = &vip
            && v.v.is_ipv4()
            && n.v > 32
        {
            cx.err(
                n.line,
                format!(
                    "`persistence_netmask` = {} is longer than an IPv4 address (1 to 32 bits)",
                    n.v
                ),
            );
            bad = true;
        }
    }
    if let Some(p) = &limit_prefix {
        if max_new_src.is_none() {
            cx.err(
                p.line,
                "`rate_limit_prefix` needs `max_new_per_sec_per_source` (the new connections a \
                 client prefix may open a second)",
            );
            bad = true;
        } else if let Some(v) = &vip
            && v.v.is_ipv4()
            && p.v > 32
        {
            cx.err(
                p.line,
                format!(
                    "`rate_limit_prefix` = {} is longer than an IPv4 address (1 to 32 bits)",
                    p.v
                ),
            );
            bad = true;
        }
    }
    if let (Some(all), Some(one)) = (&max_new, &max_new_src)
        && one.v > all.v
    {
        cx.err(
            one.line,
            format!(
                "`max_new_per_sec_per_source` = {} is above the service's `max_new_per_sec` = {} \
                 (line {}): a client prefix could never reach it",
                one.v, all.v, all.line
            ),
        );
        bad = true;
    }
    let real = servers.iter().filter(|s| !s.sorry).count();
    if !bad && !servers.is_empty() && real == 0 {
        cx.err(
            line,
            "every server of the service is a sorry server: a sorry server stands in only \
             while the others are down",
        );
        bad = true;
    }
    if let Some(q) = &quorum
        && !bad
        && q.v as usize > real
    {
        cx.err(
            q.line,
            format!(
                "`quorum` = {} but the service has {real} servers (sorry servers not \
                 counted): it could never be up",
                q.v,
            ),
        );
        bad = true;
    }
    if let Some(h) = &hysteresis
        && h.v >= quorum.as_ref().map_or(1, |q| q.v)
    {
        cx.err(
            h.line,
            format!(
                "`hysteresis` = {} must be less than `quorum` ({}): the service would never \
                 go down",
                h.v,
                quorum.as_ref().map_or(1, |q| q.v)
            ),
        );
        bad = true;
    }
    if bad {
        return None;
    }
    let vip = vip?;
    Some(ServiceRead {
        service: ServiceCfg {
            name: name?.v,
            vip: vip.v,
            port: service_port?,
            proto: proto.map(|p| p.v).unwrap_or(IPPROTO_TCP),
            scheduler: sched.map(|s| s.v).unwrap_or(Sched::Maglev),
            persistence: persistence.map(|p| p.v as u32).unwrap_or(0),
            check: check?,
            servers,
            notify_up: notify_up.ok().flatten().map(|p| p.v),
            notify_down: notify_down.ok().flatten().map(|p| p.v),
            one_packet: one_packet.is_some_and(|o| o.v),
            persistence_netmask: netmask.as_ref().map_or(0, |n| n.v as u8),
            max_new_per_sec: max_new.as_ref().map_or(0, |m| m.v as u32),
            max_new_per_sec_per_source: max_new_src.as_ref().map_or(0, |m| m.v as u32),
            rate_limit_prefix: limit_prefix
                .as_ref()
                .map_or(if vip.v.is_ipv4() { 24 } else { 64 }, |p| p.v as u8),
            quorum: quorum.as_ref().map(|q| q.v as u32).unwrap_or(1),
            hysteresis: hysteresis.as_ref().map(|h| h.v as u32).unwrap_or(0),
            timeouts: timeouts.map_or_else(ServiceTimeouts::default, |t| ServiceTimeouts {
                idle: t.tcp.or(t.udp).map(|v| v.v as u32),
                fin: t.tcp_fin.map(|v| v.v as u32),
            }),
        },
        line,
        vip_line: vip.line,
        address_lines,
    })
}

fn read_server(
    cx: &mut Cx,
    t: &dyn TableLike,
    line: usize,
    service_port: Option<u16>,
    vip: Option<IpAddr>,
    nat: Result<Option<&Nat>, ()>,
) -> Option<(ServerCfg, usize)> {
    let mut tab = Tab::new(t, "[[service.server]]", line);
    let name = tab.name(cx);
    let method = tab.choice(cx, "method", METHODS);
    let method_bad = t.contains_key("method") && method.is_none();
    let local = method.as_ref().is_some_and(|m| m.v == Method::Local);
    // A local server is the primary ATM: it serves at the VIP, and is checked on loopback.
    let address = if local {
        for key in ["address", "ping"] {
            if let Some((_, kline)) = tab.item(cx, key) {
                cx.err(
                    kline,
                    format!(
                        "`{key}` does not apply to a local server: it is the primary ATM \
                         itself, serving at the VIP (its check goes to loopback)"
                    ),
                );
                tab.finish(cx);
                return None;
            }
        }
        vip.map(|v| At { v, line })
    } else {
        tab.ip(cx, "address", "a server's address")
    };
    let port = tab.int(cx, "port", 1..=65_535, "");
    let port_bad = t.contains_key("port") && port.is_none();
    let weight = tab.int(cx, "weight", WEIGHT_RANGE, "");
    let weight_bad = t.contains_key("weight") && weight.is_none();
    let ping = if local { None } else { tab.bool(cx, "ping") };
    let ping_bad = t.contains_key("ping") && ping.is_none();
    let notify_up = tab.program(cx, "notify_up", "hook");
    let notify_down = tab.program(cx, "notify_down", "hook");
    let sorry = tab.bool(cx, "sorry_server");
    let sorry_bad = t.contains_key("sorry_server") && sorry.is_none();
    tab.finish(cx);
    if port_bad || weight_bad || method_bad || ping_bad || sorry_bad {
        return None;
    }
    let (Ok(notify_up), Ok(notify_down)) = (notify_up, notify_down) else {
        return None;
    };
    let m = method.as_ref().map(|m| m.v).unwrap_or(Method::Direct);
    let method_line = method.as_ref().map(|m| m.line).unwrap_or(line);
    let port_v = port.as_ref().map(|p| p.v as u16).or(service_port)?;
    if m != Method::Nat
        && let (Some(p), Some(sp)) = (&port, service_port)
        && p.v as u16 != sp
    {
        cx.err(
            p.line,
            format!(
                "`port` = {} differs from the service's port {sp}: a {} server receives the \
                 packet unchanged, so it must listen on the service's port (use method = \"nat\" \
                 to map ports)",
                p.v,
                m.name()
            ),
        );
        return None;
    }
    let address = address?;
    if m == Method::Nat {
        let problem = match (nat, address.v) {
            // [nat] is there but was refused, which was reported.
            (Err(()), _) => return None,
            (Ok(None), _) => {
                cx.err(
                    method_line,
                    "method = \"nat\" needs a [nat] table with the NAT subnet and gateway",
                );
                return None;
            }
            (Ok(Some(n)), IpAddr::V4(a4)) => match &n.v4 {
                None => Some(
                    "is IPv4, and [nat] has no IPv4 subnet: NAT44 needs `subnet` and `gateway`"
                        .to_string(),
                ),
                Some(n4) => {
                    let net = n4.net();
                    if !net.contains(&a4) {
                        Some(format!("is not in the NAT subnet {net}"))
                    } else {
                        reserved_in(&net, a4).map(|which| {
                            format!(
                                "is the NAT subnet {net}'s {which} address, which no host can \
                                 have"
                            )
                        })
                    }
                }
            },
            (Ok(Some(n)), IpAddr::V6(a6)) => match &n.v6 {
                None => Some(
                    "is IPv6, and [nat] has no IPv6 subnet: NAT66 needs `subnet6` and \
                     `gateway6`"
                        .to_string(),
                ),
                Some(n6) => {
                    let net = n6.net();
                    if !net.contains(&a6) {
                        Some(format!("is not in the NAT subnet {net}"))
                    } else if a6 == net.network() {
                        Some(format!(
                            "is the NAT subnet {net}'s subnet-router anycast address, which no \
                             host can have"
                        ))
                    } else {
                        None
                    }
                }
            },
        };
        if let Some(p) = problem {
            cx.err(address.line, format!("NAT server {} {p}", address.v));
            return None;
        }
    }
    Some((
        ServerCfg {
            name: name?.v,
            address: address.v,
            port: port_v,
            weight: weight.map(|w| w.v as u32).unwrap_or(1),
            method: m,
            ping: ping.map(|p| p.v).unwrap_or(!local),
            notify_up: notify_up.map(|p| p.v),
            notify_down: notify_down.map(|p| p.v),
            sorry: sorry.map(|s| s.v).unwrap_or(false),
        },
        address.line,
    ))
}

const CHECK_KINDS: &[(&str, u8)] = &[
    ("none", 0),
    ("tcp", 1),
    ("http", 2),
    ("https", 3),
    ("script", 4),
];

fn read_check(cx: &mut Cx, t: &dyn TableLike, line: usize, proto: Option<u8>) -> Option<Check> {
    let mut tab = Tab::new(t, "[service.check]", line);
    let mut bad = false;
    let kind = tab.choice(cx, "kind", CHECK_KINDS);
    bad |= t.contains_key("kind") && kind.is_none();
    let kind_v = kind.as_ref().map(|k| k.v).unwrap_or(1);
    let path = tab.str(cx, "path");
    let expect = tab.int(cx, "expect", 100..=599, "");
    bad |= t.contains_key("expect") && expect.is_none();
    let body = tab.str(cx, "body");
    let verify = tab.bool(cx, "verify");
    bad |= t.contains_key("verify") && verify.is_none();
    let script = tab.program(cx, "script", "check script");
    bad |= script.is_err();
    let script = script.ok().flatten();
    let interval = check_ms(cx, &mut tab, "interval_ms");
    let timeout = check_ms(cx, &mut tab, "timeout_ms");
    bad |= t.contains_key("interval_ms") && interval.is_none();
    bad |= t.contains_key("timeout_ms") && timeout.is_none();
    let rise = tab.int(cx, "rise", 1..=100, "");
    bad |= t.contains_key("rise") && rise.is_none();
    let fall = tab.int(cx, "fall", 1..=100, "");
    bad |= t.contains_key("fall") && fall.is_none();
    tab.finish(cx);

    let http = kind_v == 2 || kind_v == 3;
    for (present, key, kline) in [
        (path.as_ref().map(|p| p.line), "path", http),
        (expect.as_ref().map(|p| p.line), "expect", http),
        (body.as_ref().map(|p| p.line), "body", http),
        (verify.as_ref().map(|p| p.line), "verify", kind_v == 3),
        (script.as_ref().map(|p| p.line), "script", kind_v == 4),
    ] {
        if let Some(l) = present
            && !kline
        {
            let k = CHECK_KINDS.iter().find(|(_, v)| *v == kind_v).unwrap().0;
            cx.err(
                l,
                format!("`{key}` does not apply to a check of kind {k:?}"),
            );
            bad = true;
        }
    }
    if let Some(p) = &path
        && !p.v.starts_with('/')
    {
        cx.err(p.line, format!("`path` = {:?} must start with /", p.v));
        bad = true;
    }
    if (kind_v == 1 || http) && proto == Some(IPPROTO_UDP) {
        let l = kind.as_ref().map(|k| k.line).unwrap_or(line);
        cx.err(
            l,
            "a udp service cannot have a tcp or http check: use kind = \"script\" or \"none\"",
        );
        bad = true;
    }
    let kind = match kind_v {
        0 => CheckKind::None,
        1 => CheckKind::Tcp,
        2 | 3 => CheckKind::Http {
            https: kind_v == 3,
            path: path.map(|p| p.v).unwrap_or_else(|| "/".into()),
            expect: expect.map(|e| e.v as u16).unwrap_or(200),
            body: body.map(|b| b.v),
            verify: verify.map(|v| v.v).unwrap_or(true),
        },
        _ => match script {
            Some(s) => CheckKind::Script(s.v),
            None if bad => return None,
            None => {
                cx.err(
                    line,
                    "a check of kind \"script\" needs `script`, the program to run",
                );
                return None;
            }
        },
    };
    if bad {
        return None;
    }
    let defaults = Check::default();
    let interval_ms = interval.map(|i| i.v).unwrap_or(defaults.interval_ms);
    let timeout_ms = timeout
        .map(|i| i.v)
        .unwrap_or(defaults.timeout_ms.min(interval_ms));
    Some(Check {
        kind,
        interval_ms,
        timeout_ms,
        rise: rise.map(|r| r.v as u32).unwrap_or(defaults.rise),
        fall: fall.map(|f| f.v as u32).unwrap_or(defaults.fall),
    })
}

/// A check period in milliseconds: positive, at most an hour.
fn check_ms(cx: &mut Cx, tab: &mut Tab, key: &'static str) -> Option<At<u32>> {
    let v = tab.int(cx, key, 1..=3_600_000, " ms")?;
    Some(At {
        v: v.v as u32,
        line: v.line,
    })
}

/// "IPv4" or "IPv6".
pub(super) fn family(a: IpAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}
