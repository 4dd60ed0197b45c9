//! What the control surfaces see and change: the tables, status, lists and metrics, read
//! beside the loop where they grow with the connection table.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use anyhow::{Result, anyhow};
use lb_api::views;
use lb_common::{
    CONN_FIN, CONN_HALF_OPEN, CONN_REPLY, CONN_RST, Connection, DecapStat, FlowKey, Stat,
};
use tokio::{sync::oneshot, time::Instant};
use tracing::{info, warn};

use super::{Daemon, NAT_PORTS, Role};
use crate::{
    config,
    control::{Request, Response},
    dataplane::{self, Capacities, CounterTables, Counts},
    ha::Reject,
    metrics,
    services::{Expiry, Plane, line_key, svc_key},
    tables::{self, ConnLine, StatLine, Table, Write},
};

impl Daemon {
    pub(super) fn metrics_addr(&self) -> Result<Option<SocketAddr>> {
        match self.opts.metrics.as_deref() {
            Some("off") | Some("") => Ok(None),
            Some(a) => Ok(Some(a.parse().map_err(|_| {
                anyhow!("--metrics {a:?} must be ADDRESS:PORT or off")
            })?)),
            None => Ok(self.config.control.metrics),
        }
    }

    pub(super) async fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Cat { table } => match Table::from_name(&table) {
                Some(t) => match self.cat(t) {
                    Ok(text) => Response::text(text),
                    Err(e) => Response::error(e.to_string()),
                },
                None => Response::error(unknown_table(&table)),
            },
            Request::Write { table, value } => match Table::from_name(&table) {
                Some(t) => match self.write(t, &value) {
                    Ok(msg) => Response::text(msg),
                    Err(e) => Response::error(e),
                },
                None => Response::error(unknown_table(&table)),
            },
            Request::Status => Response::view(&self.status()),
            Request::List { what } => self.list(&what).unwrap_or_else(Response::error),
            Request::Reload => unreachable!("reload answers asynchronously"),
            Request::Server {
                action,
                service,
                server,
            } => match self.server_admin(action, &service, &server) {
                Ok(msg) => Response::text(msg),
                Err(e) => Response::error(e),
            },
            Request::Promote => unreachable!("promote answers asynchronously"),
            Request::Demote => unreachable!("demote answers asynchronously"),
            Request::Restart => unreachable!("restart answers asynchronously"),
            Request::Metrics => Response::text(metrics::render(&self.snapshot())),
            Request::Support => {
                let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or(p.to_path_buf());
                Response::view(&views::Support {
                    version: super::VERSION.to_string(),
                    built: super::BUILD_DATE.to_string(),
                    pid: std::process::id(),
                    config: abs(&self.opts.config),
                    log_file: self.opts.log_file.as_deref().map(abs),
                })
            }
        }
    }

    pub(super) fn role_name(&self) -> &'static str {
        match (&self.role, self.part.atm()) {
            (Role::Node(_), _) => "node",
            (_, Some(a)) if a.primary => "primary",
            (_, Some(_)) => "backup",
            _ => "idle",
        }
    }

    pub(super) fn atm_lines(&self) -> Vec<tables::AtmLine> {
        let now = Instant::now();
        self.config
            .atms
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let me = self.role == Role::Atm(i);
                let (role, state, heard) = match (self.part.ha(), me) {
                    (_, true) => (self.role_name(), "online", Some(0)),
                    (Some(ha), false) => {
                        let p = ha.election.peers()[i];
                        let alive = ha.election.alive(i, now);
                        let role = match p.heartbeat {
                            Some(h) if alive => h.role.name(),
                            _ => "backup",
                        };
                        (
                            role,
                            if alive { "online" } else { "offline" },
                            ha.election.last_heard_ms(i, now),
                        )
                    }
                    (None, false) => ("backup", "offline", None),
                };
                tables::AtmLine {
                    name: a.name.clone(),
                    address: a.address,
                    role,
                    state,
                    last_heard_ms: heard,
                }
            })
            .collect()
    }

    /// Live connections as table lines (expired entries left out).
    pub(super) fn connection_lines(&self) -> std::result::Result<Vec<ConnLine>, dataplane::Error> {
        match (self.conn_view(), self.part.atm()) {
            (Some(v), Some(a)) => Ok(v.lines(&a.dp.connections()?)),
            _ => Ok(Vec::new()),
        }
    }

    /// What turning table entries into lines needs, owned (for a blocking thread).
    pub(super) fn conn_view(&self) -> Option<ConnView> {
        let a = self.part.atm()?;
        Some(ConnView {
            expiry: Expiry::new(self.dataplane_timeouts(), a.plane.lines()),
        })
    }

    pub(super) fn stat_line(&self) -> std::result::Result<StatLine, dataplane::Error> {
        let mut line = self.stat_base()?;
        if let (Some(a), Some(e)) = (self.part.atm(), self.expiry()) {
            (line.active, line.half_open) = count_active(&a.dp.connections()?, &e);
        }
        Ok(line)
    }

    /// The `stat` line but for the active connections (which need the whole table).
    pub(super) fn stat_base(&self) -> std::result::Result<StatLine, dataplane::Error> {
        let Some(a) = self.part.atm() else {
            return Ok(StatLine::default());
        };
        let s = a.dp.stats()?;
        Ok(StatLine {
            services: self.config.services.len() as u64,
            server_lines: self
                .config
                .services
                .iter()
                .map(|s| s.servers.len() as u64)
                .sum(),
            active: 0,
            packets: s.get(Stat::VipPackets),
            dropped: s.dropped(),
            new: s.get(Stat::NewConns),
            half_open: 0,
        })
    }

    /// The cluster's timeouts in force, for `Settings`.
    pub(super) fn dataplane_timeouts(&self) -> lb_common::Timeouts {
        const S: u64 = 1_000_000_000;
        let t = &self.timeouts;
        lb_common::Timeouts {
            tcp_ns: t.tcp as u64 * S,
            tcp_fin_ns: t.tcp_fin() as u64 * S,
            udp_ns: t.udp() as u64 * S,
            tcp_syn_ns: t.tcp_syn() as u64 * S,
        }
    }

    /// How entries are judged dead now (an ATM's).
    pub(super) fn expiry(&self) -> Option<Expiry> {
        Some(Expiry::new(
            self.dataplane_timeouts(),
            self.part.atm()?.plane.lines(),
        ))
    }

    /// A request whose answer grows with the connection table or the server lines, as work
    /// for a blocking thread: the table may hold millions of entries, there may be 65,536
    /// server lines whose counters take a system call each, and the event loop sends the
    /// heartbeats. `None`: handle it on the loop (it needs neither, or this is not an ATM).
    pub(super) fn table_job(&self, req: &Request) -> Option<TableJob> {
        let a = self.part.atm()?;
        let expiry = self.expiry()?;
        let with_connections = |finish: TableFinish| {
            let table = a.dp.conn_table().ok()?;
            Some(TableJob(Box::new(move || match table.entries() {
                Ok(all) => finish(&all),
                Err(e) => Response::error(format!("reading the connection table: {e}")),
            })))
        };
        // The plane's copy shares its big parts (services, indices) with the plane.
        let with_counters = |finish: CountsFinish| {
            let counts = a.dp.counter_tables().ok()?;
            let plane = a.plane.clone();
            Some(TableJob(Box::new(move || finish(&plane, &counts))))
        };
        match req {
            Request::Cat { table } => match Table::from_name(table)? {
                Table::Connections => {
                    let v = self.conn_view()?;
                    with_connections(Box::new(move |all| {
                        Response::text(tables::render_connections(&v.lines(all)))
                    }))
                }
                Table::Stat => {
                    let mut line = self.stat_base().ok()?;
                    with_connections(Box::new(move |all| {
                        (line.active, line.half_open) = count_active(all, &expiry);
                        Response::text(tables::render_stat(&line))
                    }))
                }
                Table::Services => with_counters(Box::new(|plane, counts| {
                    Response::text(tables::render_services(&plane.service_lines(counts)))
                })),
                Table::Servers => with_counters(Box::new(|plane, counts| {
                    Response::text(tables::render_servers(&plane.server_lines(counts)))
                })),
                _ => None,
            },
            Request::List { what } => match what.as_str() {
                "connections" => {
                    let v = self.conn_view()?;
                    with_connections(Box::new(move |all| {
                        Response::view(&connection_views(&v.lines(all)))
                    }))
                }
                "services" => with_counters(Box::new(|plane, counts| {
                    Response::view(&service_views(plane, counts))
                })),
                "servers" => {
                    // The counters, and the table for each server's open and closing
                    // connections.
                    let table = a.dp.conn_table().ok()?;
                    let counts = a.dp.counter_tables().ok()?;
                    let plane = a.plane.clone();
                    Some(TableJob(Box::new(move || match table.entries() {
                        Ok(all) => Response::view(&server_views(
                            &plane,
                            &counts,
                            &conns_by_server(&all, &expiry),
                        )),
                        Err(e) => Response::error(format!("reading the connection table: {e}")),
                    })))
                }
                _ => None,
            },
            Request::Metrics => {
                let mut snap = self.snapshot_base();
                let table = a.dp.conn_table().ok()?;
                let counts = a.dp.counter_tables().ok()?;
                let plane = a.plane.clone();
                Some(TableJob(Box::new(move || {
                    let lines = fill_lines(&mut snap, &plane, &counts);
                    match table.entries() {
                        Ok(all) => {
                            fill_active(&mut snap, &lines, &all, &expiry);
                            Response::text(metrics::render(&snap))
                        }
                        Err(e) => Response::error(format!("reading the connection table: {e}")),
                    }
                })))
            }
            _ => None,
        }
    }

    /// ATM `i`'s config fingerprint as known here (this ATM's own, or the last it sent),
    /// and whether it differs from this ATM's.
    pub(super) fn config_of(&self, i: usize) -> (Option<u64>, bool) {
        let Some(ha) = self.part.ha() else {
            return (None, false);
        };
        if i == self.role_index() {
            return (Some(ha.fingerprint), false);
        }
        let theirs = ha.configs.get(i).copied().flatten();
        (theirs, theirs.is_some_and(|t| t != ha.fingerprint))
    }

    pub(super) fn cat(&self, t: Table) -> std::result::Result<String, dataplane::Error> {
        Ok(match t {
            Table::Config => tables::render_config(
                &self
                    .part
                    .atm()
                    .map(|a| a.caps)
                    .unwrap_or(self.config.tables),
            ),
            Table::Debug => tables::render_debug(self.debug),
            Table::Timeout => tables::render_timeout(self.timeouts.tcp),
            Table::Timeouts => tables::render_timeouts(&self.timeouts),
            Table::LogLevel => tables::render_loglevel(&crate::logging::level()),
            Table::Nat => tables::render_nat(self.config.nat.as_ref()),
            Table::Atms => tables::render_atms(&self.atm_lines()),
            Table::Stat => tables::render_stat(&self.stat_line()?),
            Table::Connections => tables::render_connections(&self.connection_lines()?),
            Table::Services => match self.part.atm() {
                Some(a) => tables::render_services(&a.plane.service_lines(&a.dp)),
                None => String::new(),
            },
            Table::Servers => match self.part.atm() {
                Some(a) => tables::render_servers(&a.plane.server_lines(&a.dp)),
                None => String::new(),
            },
            Table::Decap => tables::render_decap(&self.decap_counters().ok_or_else(|| {
                dataplane::Error::Invalid(
                    "decap is a real server's table (lb_decap's counters): this is an ATM".into(),
                )
            })??),
        })
    }

    /// A real server's lb_decap counters: zero while no tunnel service uses it (lb_decap not
    /// loaded); `None` on an ATM.
    pub(super) fn decap_counters(
        &self,
    ) -> Option<std::result::Result<[u64; DecapStat::COUNT as usize], dataplane::Error>> {
        let node = self.part.node()?;
        Some(match &node.decap {
            Some(dp) => dp.decap_stats(),
            None => Ok([0; DecapStat::COUNT as usize]),
        })
    }

    pub(super) fn write(&mut self, t: Table, value: &str) -> std::result::Result<String, String> {
        let w = tables::parse_write(t, value)
            .inspect_err(|e| warn!("Refused write to {}: {e}", t.name()))?;
        if let Write::LogLevel(d) = &w {
            // Any daemon's, an ATM's or a real server's.
            let was = crate::logging::set_level(d)
                .inspect_err(|e| warn!("Refused write to loglevel: {e}"))?;
            let msg = format!("Log level set to {d} (was {was}); a restart goes back to LB_LOG's");
            info!("{msg}");
            return Ok(msg);
        }
        if self.part.atm().is_none() {
            return Err("this is not an ATM: it has no tables to write".into());
        }
        let msg = match w {
            Write::Timeout(s) => {
                self.timeouts.tcp = s;
                self.push_settings()?;
                format!("Timeout set to {s} s (until the next reload; not saved to the file)")
            }
            Write::Timeouts([tcp, fin, udp]) => {
                let t = &mut self.timeouts;
                // tcp_fin and udp that follow tcp keep to their own value from now on.
                let (was_fin, was_udp) = (t.tcp_fin(), t.udp());
                if tcp != 0 {
                    t.tcp = tcp;
                }
                t.tcp_fin = Some(if fin != 0 { fin } else { was_fin });
                t.udp = Some(if udp != 0 { udp } else { was_udp });
                let now = tables::render_timeouts(t);
                self.push_settings()?;
                format!(
                    "Timeouts set to tcp tcpfin udp = {} s (until the next reload; not saved to \
                     the file)",
                    now.trim()
                )
            }
            Write::Debug(on) => {
                self.debug = on;
                self.push_settings()?;
                format!(
                    "Debug log {}",
                    if on {
                        "on: one record per new connection"
                    } else {
                        "off"
                    }
                )
            }
            Write::LogLevel(_) => unreachable!("answered above"),
            Write::Config(_) => unreachable!("a write to config answers asynchronously"),
        };
        info!("{msg}");
        Ok(msg)
    }

    /// A write to the `config` table, checked: its new sizes (refused writes are answered
    /// by `handle`).
    pub(super) fn config_write(&self, req: &Request) -> Option<Capacities> {
        match req {
            Request::Write { table, value } if table == Table::Config.name() => {
                match tables::parse_write(Table::Config, value) {
                    Ok(Write::Config(caps)) => Some(caps),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    pub(super) fn status(&self) -> views::Status {
        let services = match self.part.atm() {
            Some(a) => a
                .plane
                .services()
                .iter()
                .map(|s| views::ServiceStatus {
                    up: a.plane.service_up(s),
                    quorum: s.quorum,
                    name: s.name.clone(),
                    protocol: s.proto_name().into(),
                    vip: s.vip,
                    port: s.port,
                    servers: s
                        .servers
                        .iter()
                        .map(|v| {
                            let lk = line_key(s, v);
                            views::ServerStatus {
                                name: v.name.clone(),
                                address: v.address,
                                port: v.port,
                                method: v.method.name().into(),
                                up: a.plane.up(&lk),
                                weight: a.plane.weight(&lk, v.weight),
                                sorry: v.sorry,
                            }
                        })
                        .collect(),
                })
                .collect(),
            None => Vec::new(),
        };
        let atm = self.part.atm();
        views::Status {
            cluster: self.config.cluster.name.clone(),
            name: self.name.clone(),
            role: self.role_name().into(),
            atms: self
                .atm_lines()
                .into_iter()
                .zip(&self.config.atms)
                .enumerate()
                .map(|(i, (l, a))| {
                    let (config, config_differs) = self.config_of(i);
                    views::AtmStatus {
                        name: l.name,
                        address: l.address,
                        address6: a.address6,
                        role: l.role.into(),
                        state: l.state.into(),
                        last_heard_ms: l.last_heard_ms,
                        config: config.map(|fp| format!("{fp:016x}")),
                        config_differs,
                    }
                })
                .collect(),
            vips: self.vips(),
            term: self.part.ha().map(|h| h.election.term()),
            quorum: self.part.ha().map(|h| h.election.votes(Instant::now())),
            rejected: self.part.ha().map(|h| {
                Reject::ALL
                    .iter()
                    .map(|r| {
                        let n = h.rejects.get(r).copied().unwrap_or(0);
                        (r.name().to_string(), n)
                    })
                    .collect()
            }),
            nat: self.config.nat.map(|n| views::NatStatus {
                addresses: n.addresses().collect(),
                ports: format!("{}-{}", NAT_PORTS.0, NAT_PORTS.1),
                port_hold: n.port_hold,
                time_wait: n.time_wait,
                exhausted_drops: atm
                    .and_then(|a| a.dp.stats().ok())
                    .map_or(0, |s| s.get(Stat::DropNatPorts)),
                exhausted_now: atm.is_some_and(|a| a.nat_burst.is_some()),
            }),
            attached: atm.map(|a| {
                a.attached
                    .iter()
                    .map(|(i, m)| views::Attached {
                        interface: i.clone(),
                        mode: m.name().into(),
                    })
                    .collect()
            }),
            services,
        }
    }

    pub(super) fn list(&self, what: &str) -> std::result::Result<Response, String> {
        let a = self.part.atm().ok_or("this is not an ATM")?;
        match what {
            "services" => Ok(Response::view(&service_views(&a.plane, &a.dp))),
            "servers" => {
                let all = a.dp.connections().map_err(|e| e.to_string())?;
                let expiry = self.expiry().ok_or("this is not an ATM")?;
                Ok(Response::view(&server_views(
                    &a.plane,
                    &a.dp,
                    &conns_by_server(&all, &expiry),
                )))
            }
            "connections" => Ok(Response::view(&connection_views(
                &self.connection_lines().map_err(|e| e.to_string())?,
            ))),
            other => Err(format!(
                "list takes services, servers or connections, not {other:?}"
            )),
        }
    }

    pub(super) fn snapshot(&self) -> metrics::Snapshot {
        let mut snap = self.snapshot_base();
        if let Some(a) = self.part.atm() {
            let lines = fill_lines(&mut snap, &a.plane, &a.dp);
            if let (Ok(all), Some(e)) = (a.dp.connections(), self.expiry()) {
                fill_active(&mut snap, &lines, &all, &e);
            }
        }
        snap
    }

    /// The metrics but for the services and servers (see [`fill_lines`]) and the active
    /// connections (see [`fill_active`]), which grow with the config and the table.
    pub(super) fn snapshot_base(&self) -> metrics::Snapshot {
        let mut snap = metrics::Snapshot {
            node: self.name.clone(),
            role: self.role_name().into(),
            ..Default::default()
        };
        if let Some(ha) = self.part.ha() {
            snap.ha_rejected = Reject::ALL
                .iter()
                .map(|r| (r.name(), ha.rejects.get(r).copied().unwrap_or(0)))
                .collect();
            snap.config_differs = ha
                .configs
                .iter()
                .zip(&self.config.atms)
                .filter_map(|(c, a)| c.map(|fp| (a.name.clone(), fp != ha.fingerprint)))
                .collect();
        }
        if let Some(Ok(c)) = self.decap_counters() {
            snap.decap = DecapStat::NAMES.iter().copied().zip(c).collect();
        }
        if let Some(a) = self.part.atm() {
            if let Ok(s) = a.dp.stats() {
                snap.stat = Stat::ALL.iter().map(|x| (x.name(), s.get(*x))).collect();
            }
            let t = &self.timeouts;
            snap.timeouts = vec![
                ("tcp", t.tcp),
                ("tcp_fin", t.tcp_fin()),
                ("udp", t.udp()),
                ("tcp_syn", t.tcp_syn()),
            ];
        }
        snap
    }
}

/// The services and servers of the metrics, with their counters from `counts`. Returns, for
/// each of `snap.servers`, its service's place in `snap.services` and its server index.
pub(super) fn fill_lines(
    snap: &mut metrics::Snapshot,
    plane: &Plane,
    counts: &impl Counts,
) -> Vec<(usize, u32)> {
    let mut lines = Vec::new();
    for s in plane.services() {
        let k = svc_key(s);
        let c = counts.service(plane.id(&k).unwrap_or(0));
        for v in &s.servers {
            let lk = line_key(s, v);
            let index = plane.index(&lk).unwrap_or(u32::MAX);
            let sc = counts.server(index);
            lines.push((snap.services.len(), index));
            snap.servers.push(metrics::ServerMetrics {
                service: s.name.clone(),
                server: v.name.clone(),
                address: v.address.to_string(),
                port: v.port,
                up: plane.up(&lk),
                weight: plane.weight(&lk, v.weight),
                method: v.method.name(),
                packets: sc.packets,
                bytes: sc.bytes,
                active: 0,
                inactive: 0,
            });
        }
        snap.services.push(metrics::ServiceMetrics {
            name: s.name.clone(),
            vip: s.vip.to_string(),
            port: s.port,
            proto: s.proto_name(),
            up: plane.service_up(s),
            packets: c.packets,
            bytes: c.bytes,
            active: 0,
        });
    }
    lines
}

/// `lb-cli list services`.
pub(super) fn service_views(plane: &Plane, counts: &impl Counts) -> Vec<views::ServiceLine> {
    plane
        .services()
        .iter()
        .zip(plane.service_lines(counts))
        .map(|(s, l)| views::ServiceLine {
            name: s.name.clone(),
            protocol: s.proto_name().into(),
            vip: s.vip,
            port: s.port,
            scheduler: s.scheduler.name().into(),
            persistence: s.persistence,
            state: views::State::of(l.up),
            packets: l.packets,
        })
        .collect()
}

/// `lb-cli list servers`.
pub(super) fn server_views(
    plane: &Plane,
    counts: &impl Counts,
    conns: &HashMap<u32, LiveConns>,
) -> Vec<views::ServerLine> {
    let names = plane.services().iter().flat_map(|s| {
        s.servers
            .iter()
            .map(move |v| (s.name.clone(), v.name.clone()))
    });
    let indices = plane
        .services()
        .iter()
        .flat_map(|s| s.servers.iter().map(move |v| plane.index(&line_key(s, v))));
    names
        .zip(indices)
        .zip(plane.server_lines(counts))
        .map(|(((service, name), index), l)| {
            let c = index
                .and_then(|i| conns.get(&i).copied())
                .unwrap_or_default();
            views::ServerLine {
                service,
                name,
                protocol: config::proto_name(l.proto).into(),
                address: l.server,
                port: l.port,
                vip: l.vip,
                vport: l.vport,
                state: views::State::of(l.up),
                weight: l.weight,
                method: l.method.into(),
                packets: l.packets,
                active: c.active,
                inactive: c.inactive(),
            }
        })
        .collect()
}

/// A server's live connections (client legs), by state.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct LiveConns {
    pub(super) active: u64,
    /// Only SYNs from the client yet.
    pub(super) half_open: u64,
    /// A FIN or RST seen.
    pub(super) closing: u64,
}

impl LiveConns {
    /// IPVS's InActConn: half-open or closing.
    pub(super) fn inactive(&self) -> u64 {
        self.half_open + self.closing
    }
}

/// Per server index: its live connections by state, in one walk of the table.
pub(super) fn conns_by_server(
    all: &[(FlowKey, Connection)],
    expiry: &Expiry,
) -> HashMap<u32, LiveConns> {
    let now = dataplane::now_ns();
    let mut by: HashMap<u32, LiveConns> = HashMap::new();
    for (k, c) in all {
        if c.flags & CONN_REPLY != 0 || !expiry.live(k, c, now) {
            continue;
        }
        let e = by.entry(c.server).or_default();
        if c.flags & (CONN_FIN | CONN_RST) != 0 {
            e.closing += 1;
        } else if c.flags & CONN_HALF_OPEN != 0 {
            e.half_open += 1;
        } else {
            e.active += 1;
        }
    }
    by
}

/// The totals of [`conns_by_server`]: (active, half-open).
fn totals(by: &HashMap<u32, LiveConns>) -> (u64, u64) {
    by.values()
        .fold((0, 0), |(a, h), c| (a + c.active, h + c.half_open))
}

/// What to answer from the connection table's entries.
pub(super) type TableFinish = Box<dyn FnOnce(&[(FlowKey, Connection)]) -> Response + Send>;

/// What to answer from the plane and the counters.
pub(super) type CountsFinish = Box<dyn FnOnce(&Plane, &CounterTables) -> Response + Send>;

/// A request answered beside the event loop (see `Daemon::table_job`).
pub(super) struct TableJob(Box<dyn FnOnce() -> Response + Send>);

impl TableJob {
    /// Works the answer out and sends it to `reply`, on a blocking thread.
    pub(super) fn run(self, reply: oneshot::Sender<Response>) {
        crate::background(move || {
            let _ = reply.send((self.0)());
        });
    }
}

/// What turning connection entries into table lines needs (see `Daemon::conn_view`).
pub(super) struct ConnView {
    /// The timeouts, and each server index's server and the VIP and port it serves.
    expiry: Expiry,
}

impl ConnView {
    /// Live connections as table lines (expired entries left out), sorted.
    fn lines(&self, all: &[(FlowKey, Connection)]) -> Vec<ConnLine> {
        let now = dataplane::now_ns();
        let mut out = Vec::new();
        for (k, c) in all {
            let idle = now.saturating_sub(c.last_seen_ns);
            let limit = self.expiry.limit_ns(k, c);
            if idle > limit {
                continue;
            }
            let left = (limit - idle) / 1_000_000_000;
            let line = if c.flags & CONN_REPLY != 0 {
                // The ATM-to-server leg of a NAT connection: our NAT-subnet source.
                ConnLine {
                    proto: k.proto,
                    src: (k.dst.to_ip(), u16::from_be(k.dport)),
                    vip: self
                        .expiry
                        .lines()
                        .vip
                        .get(&c.server)
                        .map_or((Ipv4Addr::UNSPECIFIED.into(), 0), |&(a, p, _)| (a, p)),
                    timeout: left,
                    server: (k.src.to_ip(), u16::from_be(k.sport)),
                    packets: c.packets,
                    state: conn_state(k, c),
                }
            } else {
                let (sa, sp) = self
                    .expiry
                    .lines()
                    .server
                    .get(&c.server)
                    .map(|(a, p, _)| (*a, *p))
                    .unwrap_or((Ipv4Addr::UNSPECIFIED.into(), 0));
                ConnLine {
                    proto: k.proto,
                    src: (k.src.to_ip(), u16::from_be(k.sport)),
                    vip: (k.dst.to_ip(), u16::from_be(k.dport)),
                    timeout: left,
                    server: (sa, sp),
                    packets: c.packets,
                    state: conn_state(k, c),
                }
            };
            out.push(line);
        }
        out.sort();
        out
    }
}

/// A connection's state as ipvsadm -Lc names it.
fn conn_state(k: &FlowKey, c: &Connection) -> &'static str {
    if k.proto != lb_common::IPPROTO_TCP {
        "UDP"
    } else if c.flags & (CONN_RST | lb_common::CONN_PEER_RST) != 0 {
        "CLOSE"
    } else if c.flags & (CONN_FIN | lb_common::CONN_PEER_FIN) != 0 {
        "FIN_WAIT"
    } else if c.flags & CONN_HALF_OPEN != 0 {
        "SYN_RECV"
    } else {
        "ESTABLISHED"
    }
}

/// `lb-cli list connections`.
pub(super) fn connection_views(lines: &[ConnLine]) -> Vec<views::ConnectionLine> {
    let at = |(a, p): (IpAddr, u16)| SocketAddr::new(a, p);
    lines
        .iter()
        .map(|l| views::ConnectionLine {
            protocol: config::proto_name(l.proto).into(),
            client: at(l.src),
            vip: at(l.vip),
            timeout: l.timeout,
            server: at(l.server),
            packets: l.packets,
            state: l.state.into(),
        })
        .collect()
}

/// The live client legs: (active, half-open).
pub(super) fn count_active(all: &[(FlowKey, Connection)], expiry: &Expiry) -> (u64, u64) {
    totals(&conns_by_server(all, expiry))
}

/// Fills the active connections into metrics made by `Daemon::snapshot_base`; `lines`: for
/// each of `snap.servers`, its service's place in `snap.services` and its server index.
pub(super) fn fill_active(
    snap: &mut metrics::Snapshot,
    lines: &[(usize, u32)],
    all: &[(FlowKey, Connection)],
    expiry: &Expiry,
) {
    let by_index = conns_by_server(all, expiry);
    (snap.active_connections, snap.half_open_connections) = totals(&by_index);
    for (m, (service, index)) in snap.servers.iter_mut().zip(lines) {
        let c = by_index.get(index).copied().unwrap_or_default();
        (m.active, m.inactive) = (c.active, c.inactive());
        if let Some(svc) = snap.services.get_mut(*service) {
            svc.active += m.active;
        }
    }
}

/// A client's leg (not a NAT reply leg) that has seen no FIN or RST, live or not.
pub(super) fn open_leg(c: &lb_common::Connection) -> bool {
    c.flags & (CONN_REPLY | CONN_FIN | CONN_RST) == 0
}

pub(super) fn unknown_table(name: &str) -> String {
    format!(
        "no table {name:?}: the tables are {}, and on a real server {}",
        Table::ALL
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", "),
        Table::NODE
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    )
}
