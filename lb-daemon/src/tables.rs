//! The /proc-like tables: their names, their exact text formats (DESIGN.md, "Control
//! surfaces"), and the parsing of writes. Pure functions over snapshots, shared by the FUSE
//! files, the control socket and the metrics endpoint.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use lb_common::DecapStat;

use crate::{config, dataplane::Capacities};

pub use lb_api::tables::Table;

/// A write to a table, parsed and range-checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Resize the maps (drops every connection).
    Config(Capacities),
    Debug(bool),
    /// The TCP idle timeout in seconds, at once and not saved.
    Timeout(u32),
    /// `tcp tcpfin udp` in seconds, 0 leaving one as it is (`ipvsadm --set`), at once and
    /// not saved.
    Timeouts([u32; 3]),
    /// The log's filter directives (checked), at once and not saved.
    LogLevel(String),
}

/// The most a write to a table may carry: three numbers fit many times over, and a value
/// is applied whole or not at all, never piece by piece.
pub const MAX_WRITE: usize = 4096;

/// Parses what was written to `table`. The error says what is wrong, for EINVAL and lb-cli.
pub fn parse_write(table: Table, text: &str) -> Result<Write, String> {
    if text.len() > MAX_WRITE {
        return Err(format!(
            "a value written to a table is at most {MAX_WRITE} bytes, not {}",
            text.len()
        ));
    }
    let fields: Vec<&str> = text.split_whitespace().collect();
    let number = |s: &str, what: &str| -> Result<i64, String> {
        s.parse::<i64>()
            .map_err(|_| format!("{what}: {s:?} is not a number"))
    };
    let in_range = |v: i64, r: std::ops::RangeInclusive<i64>, what: &str| -> Result<u32, String> {
        if r.contains(&v) {
            Ok(v as u32)
        } else {
            Err(format!(
                "{what}: {v} is out of range {}..{}",
                r.start(),
                r.end()
            ))
        }
    };
    match table {
        Table::Config => {
            let [s, v, c] = fields[..] else {
                return Err(format!(
                    "config takes three numbers (services servers connections), not {}",
                    fields.len()
                ));
            };
            Ok(Write::Config(Capacities {
                services: in_range(number(s, "services")?, config::SERVICES_RANGE, "services")?,
                servers: in_range(number(v, "servers")?, config::SERVERS_RANGE, "servers")?,
                connections: in_range(
                    number(c, "connections")?,
                    config::CONNECTIONS_RANGE,
                    "connections",
                )?,
            }))
        }
        Table::Debug => match fields[..] {
            ["0"] => Ok(Write::Debug(false)),
            ["1"] => Ok(Write::Debug(true)),
            _ => Err(format!("debug takes 0 or 1, not {:?}", text.trim())),
        },
        Table::Timeout => {
            let [t] = fields[..] else {
                return Err(format!(
                    "timeout takes one number of seconds, not {}",
                    fields.len()
                ));
            };
            Ok(Write::Timeout(in_range(
                number(t, "timeout")?,
                config::TIMEOUT_RANGE,
                "timeout",
            )?))
        }
        Table::Timeouts => {
            let [tcp, fin, udp] = fields[..] else {
                return Err(format!(
                    "timeouts takes three numbers of seconds (tcp tcpfin udp, 0 to leave one \
                     as it is), not {}",
                    fields.len()
                ));
            };
            let mut out = [0; 3];
            for (o, (v, what)) in out
                .iter_mut()
                .zip([(tcp, "tcp"), (fin, "tcpfin"), (udp, "udp")])
            {
                let n = number(v, what)?;
                *o = if n == 0 {
                    0
                } else {
                    in_range(n, config::TIMEOUT_RANGE, what)?
                };
            }
            if out == [0; 3] {
                return Err("timeouts: 0 0 0 changes nothing".into());
            }
            Ok(Write::Timeouts(out))
        }
        Table::LogLevel => {
            let [d] = fields[..] else {
                return Err(format!(
                    "loglevel takes one word (error, warn, info, debug, trace, or LB_LOG's \
                     directives such as info,lb_daemon::ha=debug), not {}",
                    fields.len()
                ));
            };
            crate::logging::parse(d).map_err(|e| format!("loglevel: {d:?}: {e}"))?;
            Ok(Write::LogLevel(d.to_string()))
        }
        t => Err(format!("{} is read-only", t.name())),
    }
}

/// A line of `services`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLine {
    pub proto: u8,
    pub vip: IpAddr,
    pub port: u16,
    /// At least one server can take connections.
    pub up: bool,
    pub persistent: bool,
    pub packets: u64,
}

/// A line of `servers`: one per (service, server).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLine {
    pub proto: u8,
    pub server: IpAddr,
    pub port: u16,
    pub vip: IpAddr,
    pub vport: u16,
    pub up: bool,
    pub weight: u32,
    pub method: &'static str,
    pub packets: u64,
}

/// A line of `connections`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnLine {
    pub proto: u8,
    /// The client, or for the second line of a NAT connection our NAT-subnet source.
    pub src: (IpAddr, u16),
    /// The service's VIP:port.
    pub vip: (IpAddr, u16),
    /// Seconds until it times out.
    pub timeout: u64,
    pub server: (IpAddr, u16),
    pub packets: u64,
    /// As ipvsadm -Lc names it: SYN_RECV (half-open), ESTABLISHED, FIN_WAIT (a FIN seen),
    /// CLOSE (a RST seen), UDP.
    pub state: &'static str,
}

/// The numbers of `stat`: TCL's six, then the half-open connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatLine {
    pub services: u64,
    pub server_lines: u64,
    pub active: u64,
    pub packets: u64,
    pub dropped: u64,
    pub new: u64,
    /// Live connections whose client has sent only SYNs (not in `active`).
    pub half_open: u64,
}

/// A line of `atms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AtmLine {
    pub name: String,
    pub address: IpAddr,
    /// primary, backup or idle.
    pub role: &'static str,
    /// online or offline.
    pub state: &'static str,
    /// Milliseconds since last heard; 0 for this ATM itself.
    pub last_heard_ms: Option<u64>,
}

pub fn render_config(c: &Capacities) -> String {
    format!("{} {} {}\n", c.services, c.servers, c.connections)
}

pub fn render_debug(on: bool) -> String {
    format!("{}\n", on as u8)
}

pub fn render_loglevel(asked: &str) -> String {
    format!("{asked}\n")
}

pub fn render_timeout(seconds: u32) -> String {
    format!("{seconds}\n")
}

/// `tcp tcpfin udp`, as `ipvsadm -L --timeout` lists them.
pub fn render_timeouts(t: &config::Timeouts) -> String {
    format!("{} {} {}\n", t.tcp, t.tcp_fin(), t.udp())
}

pub fn render_nat(nat: Option<&config::Nat>) -> String {
    match nat {
        Some(n) => n
            .nets()
            .map(|net| format!("{} {}\n", net.network(), net.prefix_len()))
            .collect(),
        None => String::new(),
    }
}

pub fn render_services(lines: &[ServiceLine]) -> String {
    let mut out = String::new();
    for l in lines {
        let _ = writeln!(
            out,
            "{} {} {} {} {}",
            config::proto_name(l.proto),
            SocketAddr::new(l.vip, l.port),
            up_down(l.up),
            l.persistent as u8,
            l.packets
        );
    }
    out
}

pub fn render_servers(lines: &[ServerLine]) -> String {
    let mut out = String::new();
    for l in lines {
        let _ = writeln!(
            out,
            "{} {} {} {} {} {} {}",
            config::proto_name(l.proto),
            SocketAddr::new(l.server, l.port),
            SocketAddr::new(l.vip, l.vport),
            up_down(l.up),
            l.weight,
            l.method,
            l.packets
        );
    }
    out
}

/// The `connections` table. A million lines is a table an ATM holds, so the fields are put
/// together by hand (itoa for the numbers) rather than through `fmt`: each `{}` of a
/// `writeln!` goes through a trait object, and `SocketAddr`'s Display formats into a
/// buffer of its own first. The text is the same (a test compares the two).
pub fn render_connections(lines: &[ConnLine]) -> String {
    let mut out = String::with_capacity(lines.len() * 64);
    let mut num = itoa::Buffer::new();
    for l in lines {
        out.push_str(config::proto_name(l.proto));
        out.push(' ');
        push_socket(&mut out, l.src, &mut num);
        out.push(' ');
        push_socket(&mut out, l.vip, &mut num);
        out.push(' ');
        out.push_str(num.format(l.timeout));
        out.push(' ');
        push_socket(&mut out, l.server, &mut num);
        out.push(' ');
        out.push_str(num.format(l.packets));
        out.push(' ');
        out.push_str(l.state);
        out.push('\n');
    }
    out
}

/// `address:port` as `SocketAddr` displays it (`[address]:port` for IPv6).
fn push_socket(out: &mut String, (ip, port): (IpAddr, u16), num: &mut itoa::Buffer) {
    match ip {
        IpAddr::V4(a) => {
            let [a, b, c, d] = a.octets();
            out.push_str(num.format(a));
            out.push('.');
            out.push_str(num.format(b));
            out.push('.');
            out.push_str(num.format(c));
            out.push('.');
            out.push_str(num.format(d));
        }
        IpAddr::V6(a) => {
            let _ = write!(out, "[{a}]");
        }
    }
    out.push(':');
    out.push_str(num.format(port));
}

pub fn render_stat(s: &StatLine) -> String {
    format!(
        "{} {} {} {} {} {} {}\n",
        s.services, s.server_lines, s.active, s.packets, s.dropped, s.new, s.half_open
    )
}

/// lb_decap's counters: `packets decapsulated passed dropped` (see `DecapStat`).
pub fn render_decap(c: &[u64; DecapStat::COUNT as usize]) -> String {
    format!("{} {} {} {}\n", c[0], c[1], c[2], c[3])
}

pub fn render_atms(lines: &[AtmLine]) -> String {
    let mut out = String::new();
    for l in lines {
        let heard = l
            .last_heard_ms
            .map(|m| m.to_string())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{} {} {} {} {heard}",
            l.name, l.address, l.role, l.state
        );
    }
    out
}

fn up_down(up: bool) -> &'static str {
    if up { "up" } else { "down" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::IPPROTO_TCP;

    #[test]
    fn connections_render_as_socket_addresses_display() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut lines = Vec::new();
        for i in 0..2000 {
            let r = next();
            let ip = |r: u64| -> IpAddr {
                if i % 3 == 0 {
                    std::net::Ipv6Addr::from((r as u128) << (r % 64) | (r as u128 >> 3)).into()
                } else {
                    std::net::Ipv4Addr::from(r as u32).into()
                }
            };
            lines.push(ConnLine {
                proto: if r & 1 == 0 {
                    IPPROTO_TCP
                } else {
                    lb_common::IPPROTO_UDP
                },
                src: (ip(r), (r >> 16) as u16),
                vip: (ip(r.rotate_left(17)), (r >> 32) as u16),
                timeout: r % 100_000,
                server: (ip(r.rotate_left(41)), (r >> 48) as u16),
                packets: next() >> (r % 64),
                state: ["SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE", "UDP"][(r % 5) as usize],
            });
        }
        let mut by_fmt = String::new();
        for l in &lines {
            let _ = writeln!(
                by_fmt,
                "{} {} {} {} {} {} {}",
                config::proto_name(l.proto),
                SocketAddr::from(l.src),
                SocketAddr::from(l.vip),
                l.timeout,
                SocketAddr::from(l.server),
                l.packets,
                l.state
            );
        }
        assert_eq!(render_connections(&lines), by_fmt);
    }

    #[test]
    fn formats_are_exactly_as_designed() {
        let c = ConnLine {
            proto: IPPROTO_TCP,
            src: ("198.51.100.7".parse().unwrap(), 9645),
            vip: ("192.0.2.100".parse().unwrap(), 80),
            timeout: 98,
            server: ("203.0.113.4".parse().unwrap(), 80),
            packets: 113,
            state: "ESTABLISHED",
        };
        // The example line of TCL's documentation, and the state after it.
        assert_eq!(
            render_connections(&[c]),
            "tcp 198.51.100.7:9645 192.0.2.100:80 98 203.0.113.4:80 113 ESTABLISHED\n"
        );
        let s = ServerLine {
            proto: IPPROTO_TCP,
            server: "192.0.2.11".parse().unwrap(),
            port: 80,
            vip: "192.0.2.100".parse().unwrap(),
            vport: 80,
            up: true,
            weight: 1,
            method: "direct",
            packets: 7,
        };
        assert_eq!(
            render_servers(&[s]),
            "tcp 192.0.2.11:80 192.0.2.100:80 up 1 direct 7\n"
        );
        let v = ServiceLine {
            proto: lb_common::IPPROTO_UDP,
            vip: "192.0.2.100".parse().unwrap(),
            port: 53,
            up: false,
            persistent: true,
            packets: 0,
        };
        assert_eq!(render_services(&[v]), "udp 192.0.2.100:53 down 1 0\n");
        let st = StatLine {
            services: 1,
            server_lines: 3,
            active: 2,
            packets: 100,
            dropped: 4,
            new: 9,
            half_open: 5,
        };
        assert_eq!(render_stat(&st), "1 3 2 100 4 9 5\n");
        let nat = config::Nat::new(
            "203.0.113.0".parse().unwrap(),
            24,
            "203.0.113.1".parse().unwrap(),
        );
        assert_eq!(render_nat(Some(&nat)), "203.0.113.0 24\n");
        assert_eq!(render_nat(None), "");
        assert_eq!(render_debug(true), "1\n");
        let mut t = config::Timeouts::new(900);
        assert_eq!(render_timeouts(&t), "900 900 900\n");
        t.udp = Some(300);
        assert_eq!(render_timeouts(&t), "900 900 300\n");
        assert_eq!(render_config(&Capacities::default()), "64 256 262144\n");
        let a = AtmLine {
            name: "atm1".into(),
            address: "192.0.2.2".parse().unwrap(),
            role: "primary",
            state: "online",
            last_heard_ms: Some(0),
        };
        assert_eq!(render_atms(&[a]), "atm1 192.0.2.2 primary online 0\n");
    }

    #[test]
    fn writes_are_checked() {
        assert_eq!(parse_write(Table::Timeout, "5\n"), Ok(Write::Timeout(5)));
        assert_eq!(
            parse_write(Table::Timeouts, "900 0 300\n"),
            Ok(Write::Timeouts([900, 0, 300]))
        );
        assert_eq!(parse_write(Table::Debug, "1"), Ok(Write::Debug(true)));
        assert_eq!(
            parse_write(Table::Config, "25 10 5000"),
            Ok(Write::Config(Capacities {
                services: 25,
                servers: 10,
                connections: 5000
            }))
        );
        for (t, bad, why) in [
            (Table::Timeout, "abc", "not a number"),
            (Table::Timeout, "0", "out of range"),
            (Table::Timeout, "5 6", "one number"),
            (Table::Timeouts, "5 6", "three numbers"),
            (Table::Timeouts, "5 6 x", "udp: \"x\" is not a number"),
            (Table::Timeouts, "5 -1 6", "tcpfin: -1 is out of range"),
            (Table::Timeouts, "0 0 0", "changes nothing"),
            (Table::Debug, "2", "0 or 1"),
            (Table::Config, "25 10", "three numbers"),
            (Table::Config, "25 10 x", "not a number"),
            (Table::Config, "0 10 5000", "out of range"),
            (Table::Stat, "1", "read-only"),
            (Table::Connections, "", "read-only"),
        ] {
            let e = parse_write(t, bad).unwrap_err();
            assert!(e.contains(why), "{t:?} {bad:?}: {e}");
        }
    }
}
