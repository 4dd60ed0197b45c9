//! The services and servers the ATM balances, as the control plane keeps them: stable ids
//! and indices across reloads (so connections to servers that remain keep flowing), each
//! server's health and operator state, and the programming of the dataplane from them.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use lb_common::{Addr, Method};

use crate::{
    config::{Config, ServiceCfg},
    dataplane::{self, Dataplane, ServerSpec, ServiceSpec},
    tables::{ServerLine, ServiceLine},
};

/// A service's identity: what a client addresses.
pub type SvcKey = (Ipv4Addr, u16, u8);
/// A server line's identity: the service and the server's address and port.
pub type LineKey = (SvcKey, Ipv4Addr, u16);

pub fn svc_key(s: &ServiceCfg) -> SvcKey {
    (s.vip, s.port, s.proto)
}

/// What the operator said about a server (`lb-cli server ...`), kept across reloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Admin {
    /// `server disable`: out of the tables whatever its checks say.
    pub disabled: bool,
    /// `server weight N` or `server drain` (0): replaces the config's weight.
    pub weight: Option<u32>,
}

/// The state of one server line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineState {
    /// What the checks say (true until they say otherwise).
    pub healthy: bool,
    pub admin: Admin,
}

impl Default for LineState {
    fn default() -> Self {
        LineState {
            healthy: true,
            admin: Admin::default(),
        }
    }
}

/// What a reload changed, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub services_added: usize,
    pub services_removed: usize,
    pub lines_added: usize,
    pub lines_removed: usize,
    /// Connection entries dropped because their server left.
    pub connections_dropped: usize,
}

#[derive(Default)]
pub struct Plane {
    ids: HashMap<SvcKey, u32>,
    indices: HashMap<LineKey, u32>,
    states: HashMap<LineKey, LineState>,
    /// The services as last applied, in config order.
    services: Vec<ServiceCfg>,
}

impl Plane {
    pub fn new() -> Plane {
        Plane::default()
    }

    /// The services as last applied.
    pub fn services(&self) -> &[ServiceCfg] {
        &self.services
    }

    pub fn id(&self, key: &SvcKey) -> Option<u32> {
        self.ids.get(key).copied()
    }

    pub fn index(&self, line: &LineKey) -> Option<u32> {
        self.indices.get(line).copied()
    }

    pub fn state(&self, line: &LineKey) -> LineState {
        self.states.get(line).cloned().unwrap_or_default()
    }

    /// Whether a line takes new connections: healthy and not disabled.
    pub fn up(&self, line: &LineKey) -> bool {
        let s = self.state(line);
        s.healthy && !s.admin.disabled
    }

    /// The weight in force for a line.
    pub fn weight(&self, line: &LineKey, configured: u32) -> u32 {
        self.state(line).admin.weight.unwrap_or(configured)
    }

    /// Takes `config`'s services: keeps the ids and indices of what remains, frees those of
    /// what left (dropping their connection entries), and programs the dataplane.
    pub fn apply(
        &mut self,
        dp: &mut Dataplane,
        config: &Config,
    ) -> Result<Changes, dataplane::Error> {
        let mut changes = Changes::default();
        let new_keys: HashSet<SvcKey> = config.services.iter().map(svc_key).collect();
        let new_lines: HashSet<LineKey> = config
            .services
            .iter()
            .flat_map(|s| {
                s.servers
                    .iter()
                    .map(move |v| (svc_key(s), v.address, v.port))
            })
            .collect();

        // What left.
        let gone_services: Vec<(SvcKey, u32)> = self
            .ids
            .iter()
            .filter(|(k, _)| !new_keys.contains(k))
            .map(|(k, id)| (*k, *id))
            .collect();
        for (k, id) in gone_services {
            dp.uninstall(id)?;
            self.ids.remove(&k);
            changes.services_removed += 1;
        }
        let gone_lines: Vec<(LineKey, u32)> = self
            .indices
            .iter()
            .filter(|(k, _)| !new_lines.contains(k))
            .map(|(k, i)| (*k, *i))
            .collect();
        let gone_indices: HashSet<u32> = gone_lines.iter().map(|(_, i)| *i).collect();
        for (k, _) in &gone_lines {
            self.indices.remove(k);
            self.states.remove(k);
            changes.lines_removed += 1;
        }
        if !gone_indices.is_empty() {
            changes.connections_dropped =
                dp.remove_connections_where(|c| gone_indices.contains(&c.server))?;
        }

        // What came, with the smallest free ids and indices.
        let mut free_ids = free(self.ids.values().copied(), config.tables.services);
        let mut free_indices = free(self.indices.values().copied(), config.tables.servers);
        for s in &config.services {
            let k = svc_key(s);
            if let std::collections::hash_map::Entry::Vacant(e) = self.ids.entry(k) {
                let id = free_ids.pop_first().ok_or_else(|| {
                    dataplane::Error::Invalid("no free service id (capacity)".into())
                })?;
                e.insert(id);
                changes.services_added += 1;
            }
            for v in &s.servers {
                let lk = (k, v.address, v.port);
                if let std::collections::hash_map::Entry::Vacant(e) = self.indices.entry(lk) {
                    let i = free_indices.pop_first().ok_or_else(|| {
                        dataplane::Error::Invalid("no free server index (capacity)".into())
                    })?;
                    e.insert(i);
                    changes.lines_added += 1;
                }
            }
        }
        self.services = config.services.clone();
        for s in &config.services {
            self.install(dp, s)?;
        }
        Ok(changes)
    }

    /// Programs one service as the plane has it now.
    fn install(&self, dp: &mut Dataplane, s: &ServiceCfg) -> Result<(), dataplane::Error> {
        let k = svc_key(s);
        let spec = ServiceSpec {
            vip: s.vip,
            port: s.port,
            proto: s.proto,
            sched: s.scheduler,
            persistence_s: s.persistence,
            servers: s
                .servers
                .iter()
                .map(|v| {
                    let lk = (k, v.address, v.port);
                    ServerSpec {
                        index: self.indices[&lk],
                        addr: v.address,
                        port: v.port,
                        weight: self.weight(&lk, v.weight),
                        method: v.method,
                        up: self.up(&lk),
                    }
                })
                .collect(),
        };
        dp.install(self.ids[&k], &spec)
    }

    /// Programs every service again (after the dataplane was reloaded).
    pub fn reinstall(&self, dp: &mut Dataplane) -> Result<(), dataplane::Error> {
        for s in &self.services {
            self.install(dp, s)?;
        }
        Ok(())
    }

    /// Changes a line's health or operator state and reprograms its service. A line that
    /// stops taking connections should have its existing ones dropped when
    /// `drop_connections` (a server that failed its checks, as TCL does); a drained one
    /// (weight 0) keeps them. Returns the server index whose connections to drop: the
    /// caller does it beside the event loop (a big table takes a while), and nothing is
    /// forwarded to a server that is down meanwhile (the dataplane checks its record).
    pub fn set_state(
        &mut self,
        dp: &mut Dataplane,
        line: &LineKey,
        f: impl FnOnce(&mut LineState),
        drop_connections: bool,
    ) -> Result<Option<u32>, dataplane::Error> {
        let Some(index) = self.index(line) else {
            return Ok(None);
        };
        let mut state = self.state(line);
        f(&mut state);
        self.states.insert(*line, state);
        let Some(s) = self.services.iter().find(|s| svc_key(s) == line.0).cloned() else {
            return Ok(None);
        };
        self.install(dp, &s)?;
        Ok((drop_connections && !self.up(line)).then_some(index))
    }

    /// The `services` table.
    pub fn service_lines(&self, dp: &Dataplane) -> Vec<ServiceLine> {
        self.services
            .iter()
            .map(|s| {
                let k = svc_key(s);
                let packets = self
                    .id(&k)
                    .and_then(|id| dp.service_counters(id).ok())
                    .map(|c| c.packets)
                    .unwrap_or(0);
                ServiceLine {
                    proto: s.proto,
                    vip: s.vip,
                    port: s.port,
                    up: s.servers.iter().any(|v| {
                        let lk = (k, v.address, v.port);
                        self.up(&lk) && self.weight(&lk, v.weight) > 0
                    }),
                    persistent: s.persistence > 0,
                    packets,
                }
            })
            .collect()
    }

    /// The `servers` table: one line per (service, server), in config order.
    pub fn server_lines(&self, dp: &Dataplane) -> Vec<ServerLine> {
        let mut out = Vec::new();
        for s in &self.services {
            let k = svc_key(s);
            for v in &s.servers {
                let lk = (k, v.address, v.port);
                let packets = self
                    .index(&lk)
                    .and_then(|i| dp.server_counters(i).ok())
                    .map(|c| c.packets)
                    .unwrap_or(0);
                out.push(ServerLine {
                    proto: s.proto,
                    server: v.address,
                    port: v.port,
                    vip: s.vip,
                    vport: s.port,
                    up: self.up(&lk),
                    weight: self.weight(&lk, v.weight),
                    method: v.method.name(),
                    packets,
                });
            }
        }
        out
    }

    /// The server (address, port) of server index `i`, for the connections table.
    pub fn server_of(&self) -> HashMap<u32, (Ipv4Addr, u16, Method)> {
        let mut m = HashMap::new();
        for s in &self.services {
            let k = svc_key(s);
            for v in &s.servers {
                if let Some(i) = self.index(&(k, v.address, v.port)) {
                    m.insert(i, (v.address, v.port, v.method));
                }
            }
        }
        m
    }

    /// Finds a line by service and server name (for `lb-cli server ...`).
    pub fn find_line(&self, service: &str, server: &str) -> Result<LineKey, String> {
        let s = self
            .services
            .iter()
            .find(|s| s.name == service)
            .ok_or_else(|| format!("no service named {service:?}"))?;
        let v = s
            .servers
            .iter()
            .find(|v| v.name == server)
            .ok_or_else(|| format!("service {service:?} has no server named {server:?}"))?;
        Ok((svc_key(s), v.address, v.port))
    }
}

/// The ids below `cap` not in `used`.
fn free(used: impl Iterator<Item = u32>, cap: u32) -> BTreeSet<u32> {
    let used: HashSet<u32> = used.collect();
    (0..cap).filter(|i| !used.contains(i)).collect()
}

/// Converts a dataplane address to IPv4 (the only family the config speaks today).
pub fn v4(a: &Addr) -> Ipv4Addr {
    match a.to_ip() {
        std::net::IpAddr::V4(v) => v,
        std::net::IpAddr::V6(v) => v.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
    }
}
