//! The config file: one TOML file describes the whole cluster and is the same on every machine.
//!
//! Parsing keeps every value's position, so each problem is reported with the line it is on,
//! and all problems are reported at once (a daemon that stops at the first one makes an
//! operator restart it once per typo). `lb-cli check-config` and the daemon share this code.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    fs::OpenOptions,
    io::Read,
    net::{Ipv4Addr, SocketAddr},
    ops::{Range, RangeInclusive},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, Method, Sched};
use toml_edit::{Document, Item, Key, TableLike};

use crate::Capacities;

/// One problem with the file, at a line (1-based; 0 when it concerns the whole file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

/// The whole cluster, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub cluster: Cluster,
    pub tables: Capacities,
    pub nat: Option<Nat>,
    pub ha: Ha,
    pub control: Control,
    pub atms: Vec<Atm>,
    pub services: Vec<ServiceCfg>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    pub name: String,
    /// Idle connection timeout, seconds.
    pub timeout: u32,
    pub debug: bool,
    /// Shared secret for ATM messages (required when there is more than one ATM).
    pub auth_key_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat {
    pub subnet: Ipv4Addr,
    pub prefix: u8,
    /// Alias held by the primary; also the first source address of NAT-ed packets.
    pub gateway: Ipv4Addr,
    /// More source addresses (`pool`), held by the primary as /32 aliases: each multiplies
    /// the source ports toward every server. `pool[..pool_len]`.
    pub pool: [Ipv4Addr; NAT_POOL_MAX - 1],
    pub pool_len: u8,
    /// Seconds a NAT source port stays held after its connection closed (a RST, or a FIN
    /// each way with the client's first) before another connection may take it.
    pub port_hold: u32,
    /// Seconds it stays held when the server closed first: the server's TIME_WAIT (60 s on
    /// Linux), during which it may refuse a new connection on the same ports.
    pub time_wait: u32,
}

/// Source addresses of NAT-ed packets, the gateway included (the dataplane's settings hold
/// this many).
pub const NAT_POOL_MAX: usize = lb_common::NAT_POOL_MAX;
/// The default `[nat] port_hold`, seconds.
pub const DEFAULT_PORT_HOLD: u32 = 2;
/// The default `[nat] time_wait`, seconds: Linux's TIME_WAIT.
pub const DEFAULT_TIME_WAIT: u32 = 60;

impl Nat {
    /// A NAT subnet with its gateway, no pool and the default hold.
    pub fn new(subnet: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Nat {
        Nat {
            subnet,
            prefix,
            gateway,
            pool: [Ipv4Addr::UNSPECIFIED; NAT_POOL_MAX - 1],
            pool_len: 0,
            port_hold: DEFAULT_PORT_HOLD,
            time_wait: DEFAULT_TIME_WAIT,
        }
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        in_subnet(a, self.subnet, self.prefix)
    }

    /// Every NAT source address: the gateway first, then the pool.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        std::iter::once(self.gateway).chain(self.pool[..self.pool_len as usize].iter().copied())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ha {
    pub port: u16,
    pub heartbeat_ms: u32,
    /// Missed heartbeats before a peer counts as down.
    pub dead_after: u32,
    /// Addresses an ATM must reach to be allowed to become primary.
    pub track: Vec<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Control {
    pub socket: PathBuf,
    pub mount: PathBuf,
    /// `None`: no metrics endpoint.
    pub metrics: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Atm {
    pub name: String,
    pub address: Ipv4Addr,
    pub interface: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceCfg {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub scheduler: Sched,
    /// Seconds; 0 = off.
    pub persistence: u32,
    pub check: Check,
    pub servers: Vec<ServerCfg>,
}

impl ServiceCfg {
    pub fn proto_name(&self) -> &'static str {
        proto_name(self.proto)
    }
}

pub fn proto_name(proto: u8) -> &'static str {
    if proto == IPPROTO_UDP { "udp" } else { "tcp" }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerCfg {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
    pub method: Method,
    /// false is TCL's `noping`.
    pub ping: bool,
}

/// The service check (TCL's ASA), run against every server of the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub kind: CheckKind,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    None,
    Tcp,
    Http {
        https: bool,
        path: String,
        expect: u16,
        body: Option<String>,
        verify: bool,
    },
    Script(PathBuf),
}

/// Defaults, as DESIGN.md's example shows them.
pub const DEFAULT_TIMEOUT: u32 = 100;
pub const DEFAULT_SOCKET: &str = "/run/lb/control.sock";
/// `[ha]` without `heartbeat_ms` / `dead_after`, or no `[ha]` at all.
pub const DEFAULT_HEARTBEAT_MS: u32 = 100;
pub const DEFAULT_DEAD_AFTER: u32 = 3;
/// A service's check: what `[service.check]` leaves out, and a TCP check when it is absent.
pub const DEFAULT_CHECK_INTERVAL_MS: u32 = 2000;
pub const DEFAULT_CHECK_TIMEOUT_MS: u32 = 1000;
pub const DEFAULT_CHECK_RISE: u32 = 2;
pub const DEFAULT_CHECK_FALL: u32 = 3;
pub const DEFAULT_MOUNT: &str = "/run/lb/cluster";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9780";
pub const DEFAULT_HA_PORT: u16 = 5780;

/// Limits. Each scheduler row takes 65,537 slots of 8 bytes (512 KiB), hence few services.
pub const SERVICES_RANGE: RangeInclusive<i64> = 1..=256;
pub const SERVERS_RANGE: RangeInclusive<i64> = 1..=65_536;
pub const CONNECTIONS_RANGE: RangeInclusive<i64> = 1024..=16_777_216;
pub const TIMEOUT_RANGE: RangeInclusive<i64> = 1..=86_400;
pub const WEIGHT_RANGE: RangeInclusive<i64> = 0..=65_535;
/// The longest name (cluster, ATM, service, server), in bytes. Names go into the tables'
/// space-separated lines and into ATM messages, whose cluster name field is 255 bytes: a
/// longer name was cut on send and compared whole on receive.
pub const NAME_MAX: usize = 64;

/// The largest config file read. 65,536 server lines, the most the tables hold, take about
/// 5-6 MB; the bound keeps `check-config /dev/zero` or a runaway generator from eating all
/// memory before the parser says anything.
pub const CONFIG_MAX_BYTES: u64 = 16 << 20;

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
    let whole = |message: String| vec![Problem { line: 0, message }];
    let cannot = |e: std::io::Error| whole(format!("cannot read {}: {e}", path.display()));
    // Non-blocking, so that a FIFO without a writer is refused below rather than hanging
    // the open; reads of a regular file ignore the flag.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot)?;
    // Checked on the open file, so what is read is what was checked. Devices and pipes have
    // no size to trust (/dev/zero never ends).
    if !file.metadata().map_err(cannot)?.is_file() {
        return Err(whole(format!("{} is not a regular file", path.display())));
    }
    let mut bytes = Vec::new();
    // One byte past the bound tells a file at the limit from a larger one.
    (&mut file)
        .take(CONFIG_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > CONFIG_MAX_BYTES {
        return Err(whole(format!(
            "{} is larger than {} MiB (the limit for a config file)",
            path.display(),
            CONFIG_MAX_BYTES >> 20
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let bad = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..bad].iter().filter(|b| **b == b'\n').count() + 1;
        vec![Problem {
            line,
            message: "not UTF-8 text".into(),
        }]
    })?;
    parse(&text, path.parent().unwrap_or(Path::new(".")))
}

/// Validates config text; relative script paths are taken from `base`.
pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
    let doc = Document::parse(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
        let msg = e.message().trim().to_string();
        vec![Problem {
            line,
            message: format!("not valid TOML: {msg}"),
        }]
    })?;
    let mut cx = Cx {
        newlines: text.match_indices('\n').map(|(i, _)| i).collect(),
        base,
        problems: Vec::new(),
    };
    let root = doc
        .as_item()
        .as_table_like()
        .expect("a document is a table");
    let config = read(&mut cx, root);
    if cx.problems.is_empty() {
        Ok(config.expect("no problems means a config"))
    } else {
        cx.problems.sort_by_key(|p| p.line);
        cx.problems.dedup();
        Err(cx.problems)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn in_subnet(a: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(a) & mask == u32::from(net) & mask
}

struct Cx<'a> {
    /// Offsets of the text's newlines, to turn a span into a line number in O(log n)
    /// (counting from the start each time made a big file's parse quadratic).
    newlines: Vec<usize>,
    base: &'a Path,
    problems: Vec<Problem>,
}

impl Cx<'_> {
    fn line(&self, span: Option<Range<usize>>) -> usize {
        span.map(|s| self.newlines.partition_point(|&n| n < s.start) + 1)
            .unwrap_or(0)
    }
    fn err(&mut self, line: usize, message: impl Into<String>) {
        self.problems.push(Problem {
            line,
            message: message.into(),
        });
    }
}

/// A value and the line it is on.
#[derive(Clone, Debug)]
struct At<T> {
    v: T,
    line: usize,
}

/// One table being read: remembers the keys taken, so the rest can be reported as unknown.
struct Tab<'a> {
    t: &'a dyn TableLike,
    /// How the operator wrote it: `[cluster]`, `[[service.server]]`...
    name: String,
    line: usize,
    known: Vec<&'static str>,
}

impl<'a> Tab<'a> {
    fn new(t: &'a dyn TableLike, name: impl Into<String>, line: usize) -> Self {
        Tab {
            t,
            name: name.into(),
            line,
            known: Vec::new(),
        }
    }

    /// The item under `key` and its line (the key's line).
    fn item(&mut self, cx: &Cx, key: &'static str) -> Option<(&'a Item, usize)> {
        self.known.push(key);
        let (k, item): (&Key, &Item) = self.t.get_key_value(key)?;
        Some((item, cx.line(k.span()).max(cx.line(item.span()))))
    }

    fn missing(&self, cx: &mut Cx, key: &str) {
        cx.err(self.line, format!("{} needs `{key}`", self.name));
    }

    fn str(&mut self, cx: &mut Cx, key: &'static str) -> Option<At<String>> {
        let (item, line) = self.item(cx, key)?;
        match item.as_str() {
            Some(s) => Some(At {
                v: s.to_string(),
                line,
            }),
            None => {
                cx.err(
                    line,
                    format!("`{key}` must be a string, not {}", kind(item)),
                );
                None
            }
        }
    }

    fn req_str(&mut self, cx: &mut Cx, key: &'static str) -> Option<At<String>> {
        let v = self.str(cx, key);
        if v.is_none() && !self.t.contains_key(key) {
            self.missing(cx, key);
        }
        match v {
            Some(s) if s.v.trim().is_empty() => {
                cx.err(s.line, format!("`{key}` must not be empty"));
                None
            }
            v => v,
        }
    }

    /// `name`: required, 1 to `NAME_MAX` bytes, and one word. The tables print one record a
    /// line with fields separated by spaces, so a space or a newline in a name would shift
    /// or split a record. A bad name is reported and kept, so the checks across tables
    /// still see its table.
    fn name(&mut self, cx: &mut Cx) -> Option<At<String>> {
        let n = self.req_str(cx, "name")?;
        let long = n.v.len() > NAME_MAX;
        if long {
            cx.err(
                n.line,
                format!(
                    "`name` is {} bytes long: names are at most {NAME_MAX} bytes",
                    n.v.len()
                ),
            );
        }
        if n.v.chars().any(|c| c.is_whitespace() || c.is_control()) {
            // A name over the limit can be the whole file: do not echo it.
            let shown = if long {
                String::new()
            } else {
                format!(" = {:?}", n.v)
            };
            cx.err(
                n.line,
                format!("`name`{shown} must not contain spaces or control characters"),
            );
        }
        Some(n)
    }

    fn int(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        range: RangeInclusive<i64>,
        unit: &str,
    ) -> Option<At<i64>> {
        let (item, line) = self.item(cx, key)?;
        let Some(v) = item.as_integer() else {
            cx.err(
                line,
                format!("`{key}` must be an integer, not {}", kind(item)),
            );
            return None;
        };
        if !range.contains(&v) {
            cx.err(
                line,
                format!(
                    "`{key}` = {v} is out of range: it must be {} to {}{unit}",
                    range.start(),
                    range.end()
                ),
            );
            return None;
        }
        Some(At { v, line })
    }

    fn bool(&mut self, cx: &mut Cx, key: &'static str) -> Option<At<bool>> {
        let (item, line) = self.item(cx, key)?;
        match item.as_bool() {
            Some(v) => Some(At { v, line }),
            None => {
                cx.err(
                    line,
                    format!("`{key}` must be true or false, not {}", kind(item)),
                );
                None
            }
        }
    }

    /// A required address that some machine holds or answers as `role` ("a VIP", "the NAT
    /// gateway"...): not one of the addresses no host can own.
    fn addr(&mut self, cx: &mut Cx, key: &'static str, role: &str) -> Option<At<Ipv4Addr>> {
        let s = self.req_str(cx, key)?;
        let Ok(a) = s.v.parse::<Ipv4Addr>() else {
            cx.err(
                s.line,
                format!("`{key}` = {:?} is not an IPv4 address", s.v),
            );
            return None;
        };
        if let Some(what) = unusable(a) {
            cx.err(
                s.line,
                format!("`{key}` = {a} is {what}: it cannot be {role}"),
            );
            return None;
        }
        Some(At { v: a, line: s.line })
    }

    /// One of `choices` (given as `(word, value)`).
    fn choice<T: Copy>(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        choices: &[(&str, T)],
    ) -> Option<At<T>> {
        let s = self.str(cx, key)?;
        match choices.iter().find(|(w, _)| *w == s.v) {
            Some((_, v)) => Some(At {
                v: *v,
                line: s.line,
            }),
            None => {
                let words: Vec<&str> = choices.iter().map(|(w, _)| *w).collect();
                cx.err(
                    s.line,
                    format!("`{key}` = {:?} must be one of: {}", s.v, words.join(", ")),
                );
                None
            }
        }
    }

    /// A sub-table (`[a.b]` or an inline table) and its line.
    fn table(&mut self, cx: &mut Cx, key: &'static str) -> Option<(&'a dyn TableLike, usize)> {
        let (item, line) = self.item(cx, key)?;
        match item.as_table_like() {
            Some(t) if !item.is_array_of_tables() => Some((t, line)),
            _ => {
                cx.err(line, format!("`{key}` must be a table, not {}", kind(item)));
                None
            }
        }
    }

    /// An array of tables (`[[a.b]]`): each table with its header line.
    fn tables(&mut self, cx: &mut Cx, key: &'static str) -> Vec<(&'a dyn TableLike, usize)> {
        let Some((item, line)) = self.item(cx, key) else {
            return Vec::new();
        };
        match item.as_array_of_tables() {
            Some(a) => a
                .iter()
                .map(|t| (t as &dyn TableLike, cx.line(t.span())))
                .collect(),
            None => {
                cx.err(
                    line,
                    format!(
                        "`{key}` must be written as [[...]] tables, not {}",
                        kind(item)
                    ),
                );
                Vec::new()
            }
        }
    }

    /// Reports every key not taken.
    fn finish(self, cx: &mut Cx) {
        for (k, item) in self.t.iter() {
            if self.known.contains(&k) {
                continue;
            }
            let line = self
                .t
                .key(k)
                .map(|key| cx.line(key.span()))
                .filter(|l| *l > 0)
                .unwrap_or_else(|| cx.line(item.span()));
            let hint = self
                .known
                .iter()
                .find(|known| close(k, known))
                .map(|known| format!(" (did you mean `{known}`?)"))
                .unwrap_or_default();
            cx.err(line, format!("unknown key `{k}` in {}{hint}", self.name));
        }
    }
}

/// Why no machine can hold `a` (so it cannot be a VIP, a server, an ATM or the NAT
/// gateway), if that is so.
fn unusable(a: Ipv4Addr) -> Option<&'static str> {
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

fn kind(item: &Item) -> &'static str {
    if item.is_array_of_tables() {
        "an array of tables"
    } else if item.is_table_like() {
        "a table"
    } else if item.is_str() {
        "a string"
    } else if item.is_integer() {
        "an integer"
    } else if item.is_bool() {
        "a boolean"
    } else if item.is_float() {
        "a float"
    } else if item.is_array() {
        "an array"
    } else {
        "a date"
    }
}

/// Whether two keys are a typo apart (edit distance 1, or two letters swapped).
fn close(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a == b {
        return false;
    }
    if a.len() == b.len() {
        let diff: Vec<usize> = (0..a.len()).filter(|i| a[*i] != b[*i]).collect();
        return diff.len() == 1
            || (diff.len() == 2
                && diff[1] == diff[0] + 1
                && a[diff[0]] == b[diff[1]]
                && a[diff[1]] == b[diff[0]]);
    }
    let (short, long) = if a.len() < b.len() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    if long.len() - short.len() != 1 {
        return false;
    }
    (0..long.len()).any(|skip| {
        long.iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, c)| c)
            .eq(short.iter())
    })
}

/// A [tables] as read, with the line each capacity was set on (its key's, else the table's),
/// for the checks that count services and server lines against it.
struct TablesRead {
    caps: Capacities,
    services_line: usize,
    servers_line: usize,
}

/// A [nat] as read, with the lines the checks across tables point at.
struct NatRead {
    nat: Nat,
    subnet_line: usize,
    gateway_line: usize,
    /// The `pool` key's line (the table's header if there is none).
    pool_line: usize,
}

/// An [[atm]] as read: its header line for duplicates, its address line for what collides
/// with the address.
struct AtmRead {
    atm: Atm,
    line: usize,
    address_line: usize,
}

/// A [[service]] as read, with its header and `vip` lines and each server's `address` line
/// (in the order of `service.servers`).
struct ServiceRead {
    service: ServiceCfg,
    line: usize,
    vip_line: usize,
    address_lines: Vec<usize>,
}

fn read(cx: &mut Cx, root: &dyn TableLike) -> Option<Config> {
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
        None => Some(Ha {
            port: DEFAULT_HA_PORT,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            dead_after: DEFAULT_DEAD_AFTER,
            track: Vec::new(),
        }),
    };
    let control = match top.table(cx, "control") {
        Some((t, line)) => read_control(cx, t, line),
        None => Some(Control {
            socket: DEFAULT_SOCKET.into(),
            mount: DEFAULT_MOUNT.into(),
            metrics: Some(DEFAULT_METRICS.parse().expect("default metrics address")),
        }),
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
    let services: Vec<Option<ServiceRead>> = service_tables
        .into_iter()
        .map(|(t, line)| read_service(cx, t, line, nat_read.map(|n| &n.nat)))
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

/// The tables that were read without fault, for the checks between them.
struct Across<'a> {
    /// With the [cluster] header's line.
    cluster: Option<(&'a Cluster, usize)>,
    tables: Option<&'a TablesRead>,
    nat: Option<&'a NatRead>,
    atms: Vec<&'a AtmRead>,
    services: Vec<&'a ServiceRead>,
}

/// The checks that compare tables with each other. Each problem goes on the line of the
/// later or offending value and names the other's line, so both can be found.
fn check_across(cx: &mut Cx, a: &Across) {
    let mut atm_names = HashMap::new();
    let mut atm_addrs: HashMap<Ipv4Addr, &AtmRead> = HashMap::new();
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
        match atm_addrs.get(&atm.atm.address) {
            Some(first) => cx.err(
                atm.line,
                format!(
                    "duplicate ATM address {} (first on line {})",
                    atm.atm.address, first.line
                ),
            ),
            None => {
                atm_addrs.insert(atm.atm.address, atm);
            }
        }
    }

    // The first server at each address, as (service, server) indices. A service with a
    // server at its own VIP was refused where it was read and is not here, so the server
    // found at a VIP is always another service's.
    let mut servers_at: HashMap<Ipv4Addr, (usize, usize)> = HashMap::new();
    for (i, s) in a.services.iter().enumerate() {
        for (j, server) in s.service.servers.iter().enumerate() {
            servers_at.entry(server.address).or_insert((i, j));
        }
    }

    let mut service_keys: HashMap<(Ipv4Addr, u16, u8), usize> = HashMap::new();
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
        && let Some(atm) = n.nat.addresses().skip(1).find_map(|p| atm_addrs.get(&p))
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
        && let Some(atm) = atm_addrs.get(&n.nat.gateway)
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

fn read_cluster(cx: &mut Cx, t: &dyn TableLike, line: usize) -> Option<Cluster> {
    let mut tab = Tab::new(t, "[cluster]", line);
    let name = tab.name(cx);
    let timeout = tab.int(cx, "timeout", TIMEOUT_RANGE, " seconds");
    let timeout_bad = t.contains_key("timeout") && timeout.is_none();
    let debug = tab.bool(cx, "debug");
    let debug_bad = t.contains_key("debug") && debug.is_none();
    let key = tab.str(cx, "auth_key_file");
    tab.finish(cx);
    if timeout_bad || debug_bad {
        return None;
    }
    Some(Cluster {
        name: name?.v,
        timeout: timeout.map(|t| t.v as u32).unwrap_or(DEFAULT_TIMEOUT),
        debug: debug.map(|d| d.v).unwrap_or(false),
        auth_key_file: key.map(|k| PathBuf::from(k.v)),
    })
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
    let subnet = tab.req_str(cx, "subnet");
    let gateway = tab.addr(cx, "gateway", "the NAT gateway");
    let hold = tab.int(cx, "port_hold", 0..=600, " seconds");
    let time_wait = tab.int(cx, "time_wait", 0..=600, " seconds");
    let hold_bad = (t.contains_key("port_hold") && hold.is_none())
        || (t.contains_key("time_wait") && time_wait.is_none());
    let pool_item = tab.item(cx, "pool");
    tab.finish(cx);
    let subnet = subnet?;
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
    if !in_subnet(addr, addr, prefix) || u32::from(addr) & !(u32::MAX << (32 - prefix)) != 0 {
        cx.err(
            subnet.line,
            format!(
                "`subnet` = {:?} has host bits set: write the network address",
                subnet.v
            ),
        );
        return None;
    }
    let gateway = gateway?;
    if !in_subnet(gateway.v, addr, prefix) {
        cx.err(
            gateway.line,
            format!(
                "`gateway` {} is not in the NAT subnet {}/{prefix}",
                gateway.v, addr
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
            let (first, count) = match text.split_once('/') {
                None => match text.parse::<Ipv4Addr>() {
                    Ok(a) => (u32::from(a), 1u64),
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
                        let mask = u32::MAX.checked_shl(32 - p as u32).unwrap_or(0);
                        (u32::from(a) & mask, 1u64 << (32 - p))
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
            for i in 0..count {
                let a = Ipv4Addr::from(first + i as u32);
                let host_bits = u32::from(a) & !(u32::MAX << (32 - prefix));
                if count > 1 && (host_bits == 0 || host_bits == !(u32::MAX << (32 - prefix))) {
                    // The subnet's own network and broadcast addresses are nobody's.
                    continue;
                }
                let problem = if !in_subnet(a, addr, prefix) {
                    Some(format!("is not in the NAT subnet {addr}/{prefix}"))
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
    if hold_bad {
        return None;
    }
    let mut pool_arr = [Ipv4Addr::UNSPECIFIED; NAT_POOL_MAX - 1];
    pool_arr[..pool.len()].copy_from_slice(&pool);
    Some(NatRead {
        nat: Nat {
            subnet: addr,
            prefix,
            gateway: gateway.v,
            pool: pool_arr,
            pool_len: pool.len() as u8,
            port_hold: hold.map(|h| h.v as u32).unwrap_or(DEFAULT_PORT_HOLD),
            time_wait: time_wait.map(|h| h.v as u32).unwrap_or(DEFAULT_TIME_WAIT),
        },
        subnet_line: subnet.line,
        gateway_line: gateway.line,
        pool_line,
    })
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
    let mut track = Vec::new();
    if let Some((item, line)) = tab.item(cx, "track") {
        match item.as_array() {
            Some(a) => {
                for v in a.iter() {
                    match v.as_str().map(|s| s.parse::<Ipv4Addr>()) {
                        Some(Ok(addr)) => track.push(addr),
                        _ => {
                            cx.err(
                                line,
                                format!("`track` holds {v}, which is not an IPv4 address"),
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
    Some(Ha {
        port: port.map(|p| p.v as u16).unwrap_or(DEFAULT_HA_PORT),
        heartbeat_ms: hb.map(|h| h.v as u32).unwrap_or(DEFAULT_HEARTBEAT_MS),
        dead_after: dead.map(|d| d.v as u32).unwrap_or(DEFAULT_DEAD_AFTER),
        track,
    })
}

fn read_control(cx: &mut Cx, t: &dyn TableLike, line: usize) -> Option<Control> {
    let mut tab = Tab::new(t, "[control]", line);
    let socket = tab.str(cx, "socket");
    let mount = tab.str(cx, "mount");
    let metrics = tab.str(cx, "metrics");
    tab.finish(cx);
    let metrics = match metrics {
        None => Some(DEFAULT_METRICS.parse().expect("default metrics address")),
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
    let path = |cx: &mut Cx, v: Option<At<String>>, key: &str, default: &str| match v {
        None => Some(PathBuf::from(default)),
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
    let socket = path(cx, socket, "socket", DEFAULT_SOCKET);
    let mount = path(cx, mount, "mount", DEFAULT_MOUNT);
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
    let address = tab.addr(cx, "address", "an ATM's address");
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
    Some(AtmRead {
        atm: Atm {
            name: name?.v,
            address: address.v,
            interface: interface?.v,
        },
        line,
        address_line: address.line,
    })
}

const SCHEDULERS: &[(&str, Sched)] = &[
    ("rr", Sched::Rr),
    ("wrr", Sched::Wrr),
    ("sh", Sched::Sh),
    ("maglev", Sched::Maglev),
];
const METHODS: &[(&str, Method)] = &[
    ("nat", Method::Nat),
    ("direct", Method::Direct),
    ("tunnel", Method::Tunnel),
];
const PROTOCOLS: &[(&str, u8)] = &[("tcp", IPPROTO_TCP), ("udp", IPPROTO_UDP)];

fn read_service(
    cx: &mut Cx,
    t: &dyn TableLike,
    line: usize,
    nat: Option<&Nat>,
) -> Option<ServiceRead> {
    let mut tab = Tab::new(t, "[[service]]", line);
    let mut bad = false;
    let name = tab.name(cx);
    let vip = tab.addr(cx, "vip", "a VIP");
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
    let check = match tab.table(cx, "check") {
        Some((c, cline)) => read_check(cx, c, cline, proto.as_ref().map(|p| p.v)),
        None if t.contains_key("check") => None,
        None => Some(Check {
            kind: CheckKind::Tcp,
            interval_ms: DEFAULT_CHECK_INTERVAL_MS,
            timeout_ms: DEFAULT_CHECK_TIMEOUT_MS,
            rise: DEFAULT_CHECK_RISE,
            fall: DEFAULT_CHECK_FALL,
        }),
    };
    let server_tables = tab.tables(cx, "server");
    tab.finish(cx);
    let service_port = port.as_ref().map(|p| p.v as u16);
    let mut servers = Vec::new();
    let mut address_lines = Vec::new();
    let mut seen_names: HashMap<String, usize> = HashMap::new();
    let mut seen_addrs: HashSet<(Ipv4Addr, u16)> = HashSet::new();
    for (st, sline) in server_tables {
        match read_server(cx, st, sline, service_port, nat) {
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
                    cx.err(
                        sline,
                        format!("duplicate server {}:{} in this service", s.address, s.port),
                    );
                    bad = true;
                }
                if let Some(v) = &vip
                    && v.v == s.address
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
    nat: Option<&Nat>,
) -> Option<(ServerCfg, usize)> {
    let mut tab = Tab::new(t, "[[service.server]]", line);
    let name = tab.name(cx);
    let address = tab.addr(cx, "address", "a server's address");
    let port = tab.int(cx, "port", 1..=65_535, "");
    let port_bad = t.contains_key("port") && port.is_none();
    let weight = tab.int(cx, "weight", WEIGHT_RANGE, "");
    let weight_bad = t.contains_key("weight") && weight.is_none();
    let method = tab.choice(cx, "method", METHODS);
    let method_bad = t.contains_key("method") && method.is_none();
    let ping = tab.bool(cx, "ping");
    let ping_bad = t.contains_key("ping") && ping.is_none();
    tab.finish(cx);
    if port_bad || weight_bad || method_bad || ping_bad {
        return None;
    }
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
        match nat {
            None => {
                cx.err(
                    method_line,
                    "method = \"nat\" needs a [nat] table with the NAT subnet and gateway",
                );
                return None;
            }
            Some(n) if !n.contains(address.v) => {
                cx.err(
                    address.line,
                    format!(
                        "NAT server {} is not in the NAT subnet {}/{}",
                        address.v, n.subnet, n.prefix
                    ),
                );
                return None;
            }
            _ => {}
        }
    }
    Some((
        ServerCfg {
            name: name?.v,
            address: address.v,
            port: port_v,
            weight: weight.map(|w| w.v as u32).unwrap_or(1),
            method: m,
            ping: ping.map(|p| p.v).unwrap_or(true),
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
    let script = tab.str(cx, "script");
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
            None => {
                cx.err(
                    line,
                    "a check of kind \"script\" needs `script`, the program to run",
                );
                return None;
            }
            Some(s) => {
                let p = if Path::new(&s.v).is_absolute() {
                    PathBuf::from(&s.v)
                } else {
                    cx.base.join(&s.v)
                };
                match std::fs::metadata(&p) {
                    Err(e) => {
                        cx.err(s.line, format!("check script {}: {e}", p.display()));
                        return None;
                    }
                    Ok(m) if !m.is_file() || m.permissions().mode() & 0o111 == 0 => {
                        cx.err(
                            s.line,
                            format!("check script {} is not an executable file", p.display()),
                        );
                        return None;
                    }
                    Ok(_) => CheckKind::Script(p),
                }
            }
        },
    };
    if bad {
        return None;
    }
    let interval_ms = interval.map(|i| i.v).unwrap_or(DEFAULT_CHECK_INTERVAL_MS);
    let timeout_ms = timeout
        .map(|i| i.v)
        .unwrap_or(DEFAULT_CHECK_TIMEOUT_MS.min(interval_ms));
    Some(Check {
        kind,
        interval_ms,
        timeout_ms,
        rise: rise.map(|r| r.v as u32).unwrap_or(DEFAULT_CHECK_RISE),
        fall: fall.map(|f| f.v as u32).unwrap_or(DEFAULT_CHECK_FALL),
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
name = "web"
timeout = 100

[nat]
subnet = "203.0.113.0/24"
gateway = "203.0.113.1"

[[atm]]
name = "atm1"
address = "192.0.2.2"
interface = "eth0"

[[service]]
name = "http"
vip = "192.0.2.100"
port = 80
[service.check]
kind = "http"
path = "/"
[[service.server]]
name = "web1"
address = "192.0.2.11"
[[service.server]]
name = "web2"
address = "203.0.113.12"
port = 8080
method = "nat"
weight = 2
"#;

    #[test]
    fn a_good_file_parses_with_defaults() {
        let c = parse(GOOD, Path::new("/")).unwrap();
        assert_eq!(c.cluster.name, "web");
        assert_eq!(c.tables, Capacities::default());
        assert_eq!(c.ha.port, DEFAULT_HA_PORT);
        assert_eq!(c.control.socket, PathBuf::from(DEFAULT_SOCKET));
        let s = &c.services[0];
        assert_eq!(
            (s.proto, s.scheduler, s.persistence),
            (IPPROTO_TCP, Sched::Maglev, 0)
        );
        assert_eq!(s.servers[0].port, 80, "port defaults to the service's");
        assert_eq!(s.servers[0].method, Method::Direct);
        assert_eq!(s.servers[1].weight, 2);
        assert!(matches!(
            s.check.kind,
            CheckKind::Http {
                expect: 200,
                verify: true,
                ..
            }
        ));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = GOOD
            .replace("timeout = 100", "timeout = 0\ncolour = \"red\"")
            .replace("port = 8080\n", "port = 8080\nweigth = 3\n");
        let problems = parse(&text, Path::new("/")).unwrap_err();
        let lines: Vec<(usize, &str)> = problems
            .iter()
            .map(|p| (p.line, p.message.as_str()))
            .collect();
        assert_eq!(problems.len(), 3, "{lines:?}");
        assert_eq!(problems[0].line, 4);
        assert!(
            problems[0]
                .message
                .contains("`timeout` = 0 is out of range"),
            "{lines:?}"
        );
        assert_eq!(problems[1].line, 5);
        assert!(
            problems[1]
                .message
                .contains("unknown key `colour` in [cluster]"),
            "{lines:?}"
        );
        assert!(
            problems[2]
                .message
                .contains("unknown key `weigth` in [[service.server]] (did you mean `weight`?)"),
            "{lines:?}"
        );
    }

    /// The problems of GOOD with `from` replaced by `to`, as `(line, message)`.
    fn problems_with(from: &str, to: &str) -> Vec<(usize, String)> {
        assert!(GOOD.contains(from), "{from:?} is not in GOOD");
        match parse(&GOOD.replacen(from, to, 1), Path::new("/")) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.into_iter().map(|p| (p.line, p.message)).collect(),
        }
    }

    #[test]
    fn names_are_one_word_of_at_most_64_bytes() {
        // toml_edit writes the name as TOML (Rust's {:?} escapes are not all TOML's).
        let name = |n: &str| {
            let toml = toml_edit::Value::from(n).to_string();
            problems_with("name = \"web1\"", &format!("name = {}", toml.trim()))
        };
        assert_eq!(name(&"w".repeat(NAME_MAX)), vec![]);
        assert_eq!(
            name(&"w".repeat(NAME_MAX + 1)),
            vec![(
                23,
                "`name` is 65 bytes long: names are at most 64 bytes".into()
            )]
        );
        // Multi-byte characters count in bytes, as the tables and messages carry them.
        assert_eq!(
            name(&"é".repeat(33))[0].1,
            "`name` is 66 bytes long: names are at most 64 bytes"
        );
        for bad in [
            "web 1",
            "web\t1",
            "web\n1",
            "web\u{a0}1",
            "web\u{7f}",
            "web\r",
        ] {
            assert_eq!(
                name(bad),
                vec![(
                    23,
                    format!("`name` = {bad:?} must not contain spaces or control characters")
                )],
            );
        }
        // Too long and with spaces: both said, without echoing the long name.
        let long = "w ".repeat(40);
        assert_eq!(
            name(&long),
            vec![
                (
                    23,
                    "`name` is 80 bytes long: names are at most 64 bytes".into()
                ),
                (
                    23,
                    "`name` must not contain spaces or control characters".into()
                ),
            ]
        );
        // Every table's name is checked.
        for from in ["name = \"web\"", "name = \"atm1\"", "name = \"http\""] {
            let p = problems_with(from, "name = \"a b\"");
            assert_eq!(p.len(), 1, "{from}: {p:?}");
            assert!(p[0].1.contains("must not contain spaces"), "{from}: {p:?}");
        }
    }

    #[test]
    fn addresses_no_machine_can_hold_are_refused() {
        let kinds = [
            ("0.0.0.0", "the unspecified address"),
            ("255.255.255.255", "the broadcast address"),
            ("127.0.0.1", "a loopback address"),
            ("127.1.2.3", "a loopback address"),
            ("224.0.0.1", "a multicast address"),
            ("239.255.255.250", "a multicast address"),
        ];
        for (from, key, line, role) in [
            ("vip = \"192.0.2.100\"", "vip", 17, "a VIP"),
            (
                "address = \"192.0.2.11\"",
                "address",
                24,
                "a server's address",
            ),
            ("address = \"192.0.2.2\"", "address", 12, "an ATM's address"),
        ] {
            for (a, what) in kinds {
                assert_eq!(
                    problems_with(from, &format!("{key} = \"{a}\"")),
                    vec![(
                        line,
                        format!("`{key}` = {a} is {what}: it cannot be {role}")
                    )],
                );
            }
        }
        // The gateway must be in its subnet, so each kind needs a subnet of its own.
        for (subnet, a, what) in [
            ("0.0.0.0/8", "0.0.0.0", "the unspecified address"),
            (
                "255.255.255.0/24",
                "255.255.255.255",
                "the broadcast address",
            ),
            ("127.0.0.0/8", "127.0.0.1", "a loopback address"),
            ("224.0.0.0/24", "224.0.0.1", "a multicast address"),
        ] {
            let text = GOOD
                .replace("203.0.113.0/24", subnet)
                .replace("gateway = \"203.0.113.1\"", &format!("gateway = \"{a}\""));
            let problems = parse(&text, Path::new("/")).unwrap_err();
            assert_eq!(
                problems[0],
                Problem {
                    line: 8,
                    message: format!("`gateway` = {a} is {what}: it cannot be the NAT gateway")
                }
            );
        }
        // Addresses next to the refused ranges are fine.
        for a in ["1.0.0.1", "126.255.255.254", "128.0.0.1", "223.255.255.254"] {
            assert_eq!(
                problems_with("vip = \"192.0.2.100\"", &format!("vip = \"{a}\"")),
                vec![]
            );
        }
    }

    #[test]
    fn problems_across_tables_have_a_line() {
        // The NAT gateway at the ATM: on the gateway's line, naming the ATM's.
        assert_eq!(
            problems_with("address = \"192.0.2.2\"", "address = \"203.0.113.1\""),
            vec![(
                8,
                "the NAT gateway 203.0.113.1 is an ATM's own address (ATM \"atm1\", line 12)"
                    .into()
            )]
        );
        // Capacities: on the key's line, else on the [tables] header's.
        let tables = "[tables]\nservices = 1\nservers = 1\n\n[nat]";
        assert_eq!(
            problems_with("[nat]", tables),
            vec![(8, "2 server lines do not fit [tables] servers = 1".into())]
        );
        assert_eq!(
            problems_with(
                "[nat]",
                "[tables]\nconnections = 1024\nservices = 1\n\n[nat]"
            ),
            vec![]
        );
        let text = format!("{GOOD}\n[[service]]\nname = \"b\"\nvip = \"192.0.2.101\"\nport = 80\n");
        let tables = "[tables]\nconnections = 1024\nservices = 1\n\n[nat]";
        let p = parse(&text.replacen("[nat]", tables, 1), Path::new("/")).unwrap_err();
        assert_eq!(
            (p[0].line, p[0].message.as_str()),
            (8, "2 services do not fit [tables] services = 1")
        );
        let p = parse(
            &text.replacen("[nat]", "[tables]\n\n[nat]", 1),
            Path::new("/"),
        );
        assert!(p.is_ok(), "the defaults hold 2 services: {p:?}");
        // Two ATMs without a key: on the [cluster] header.
        let atm2 =
            "[[atm]]\nname = \"atm2\"\naddress = \"192.0.2.3\"\ninterface = \"eth0\"\n\n[[atm]]";
        let p = problems_with("[[atm]]", atm2);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, 2);
    }

    #[test]
    fn a_vip_is_no_other_services_server() {
        // web1's address is also server x of the second service: a third service's VIP at it
        // is refused, naming the first server at it; one at y names y.
        let two = "\n[[service]]\nname = \"two\"\nvip = \"192.0.2.101\"\nport = 80\n\
                   [service.check]\nkind = \"none\"\n\
                   [[service.server]]\nname = \"x\"\naddress = \"192.0.2.11\"\n\
                   [[service.server]]\nname = \"y\"\naddress = \"192.0.2.12\"\n";
        let three = |vip: &str| {
            let text = format!(
                "{GOOD}{two}\n[[service]]\nname = \"three\"\nvip = \"{vip}\"\nport = 80\n\
                 [service.check]\nkind = \"none\"\n"
            );
            let line_of = |l: &str| text.lines().position(|x| x == l).unwrap() + 1;
            let vip_line = line_of(&format!("vip = \"{vip}\""));
            let p = parse(&text, Path::new("/")).unwrap_err();
            (
                p,
                vip_line,
                line_of("address = \"192.0.2.11\""),
                line_of("address = \"192.0.2.12\""),
            )
        };
        let (p, vip_line, web1, _) = three("192.0.2.11");
        assert_eq!(
            p,
            vec![Problem {
                line: vip_line,
                message: format!(
                    "the VIP 192.0.2.11 is server \"web1\" of service \"http\" (line {web1})"
                )
            }]
        );
        let (p, vip_line, _, y) = three("192.0.2.12");
        assert_eq!(
            p,
            vec![Problem {
                line: vip_line,
                message: format!(
                    "the VIP 192.0.2.12 is server \"y\" of service \"two\" (line {y})"
                )
            }]
        );
        // The same server address in two services is fine.
        assert!(parse(&format!("{GOOD}{two}"), Path::new("/")).is_ok());
    }

    #[test]
    fn the_socket_and_the_mount_differ_even_by_default() {
        let control = |c: &str| problems_with("[nat]", &format!("[control]\n{c}\n\n[nat]"));
        assert_eq!(
            control("socket = \"/run/lb/cluster\""),
            vec![(
                7,
                "`socket` = \"/run/lb/cluster\" is the same path as `mount` (its default): the \
                 control socket and the tables' mount need a path each"
                    .into()
            )]
        );
        assert_eq!(
            control("socket = \"/run/lb/x/\"\nmount = \"/run/lb/x\""),
            vec![(
                8,
                "`mount` = \"/run/lb/x/\" is the same path as `socket` (line 7): the control \
                 socket and the tables' mount need a path each"
                    .into()
            )]
        );
        assert_eq!(control("mount = \"/run/lb/control.sock\"")[0].0, 7);
        assert_eq!(
            control("socket = \"/run/lb/a\"\nmount = \"/run/lb/b\""),
            vec![]
        );
    }

    /// A path of its own in the temporary directory, removed when the test ends.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(tag: &str) -> Self {
            let name = format!("lb-config-test-{}-{tag}", std::process::id());
            TempPath(std::env::temp_dir().join(name))
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused_whole() {
        let f = TempPath::new("big.toml");
        // A good config padded with a comment: only its size can be wrong.
        let limit = CONFIG_MAX_BYTES as usize;
        let mut text = GOOD.to_string() + "#";
        text += &"x".repeat(limit - text.len());
        text += "x";
        std::fs::write(&f.0, &text).unwrap();
        let problems = load(&f.0).unwrap_err();
        assert_eq!(
            problems,
            vec![Problem {
                line: 0,
                message: format!(
                    "{} is larger than 16 MiB (the limit for a config file)",
                    f.0.display()
                ),
            }]
        );
        text.pop();
        std::fs::write(&f.0, &text).unwrap();
        assert!(load(&f.0).is_ok(), "a file of exactly the limit is read");
    }

    #[test]
    fn devices_and_pipes_are_refused_without_reading_them() {
        let problems = load(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(problems[0].message, "/dev/zero is not a regular file");
        // A FIFO with no writer would block a plain open.
        let fifo = TempPath::new("fifo");
        nix::unistd::mkfifo(&fifo.0, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let problems = load(&fifo.0).unwrap_err();
        assert_eq!(
            problems[0].message,
            format!("{} is not a regular file", fifo.0.display())
        );
    }

    #[test]
    fn text_that_is_not_utf8_is_reported_at_its_line() {
        let f = TempPath::new("latin1.toml");
        std::fs::write(&f.0, b"[cluster]\nname = \"caf\xe9\"\n").unwrap();
        let problems = load(&f.0).unwrap_err();
        assert_eq!(
            problems,
            vec![Problem {
                line: 2,
                message: "not UTF-8 text".into()
            }]
        );
    }

    #[test]
    fn typos_are_close() {
        assert!(close("weigth", "weight"));
        assert!(close("adress", "address"));
        assert!(close("portt", "port"));
        assert!(!close("colour", "timeout"));
    }
}
