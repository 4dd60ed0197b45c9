//! The services and servers the ATM balances, as the control plane keeps them: stable ids
//! and indices across reloads (so connections to servers that remain keep flowing), each
//! server's health and operator state, and the programming of the dataplane from them.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{Connection, FlowKey, Method};

use crate::{
    config::{Config, ServerCfg, ServiceCfg},
    dataplane::{self, Capacities, Counts, Dataplane, ServerSpec, ServiceSpec},
    tables::{ServerLine, ServiceLine},
};

/// A service's identity: what a client addresses.
pub type SvcKey = (IpAddr, u16, u8);
/// A server line's identity: the service and the server's address and port.
pub type LineKey = (SvcKey, IpAddr, u16);

pub fn svc_key(s: &ServiceCfg) -> SvcKey {
    (s.vip, s.port, s.proto)
}

/// Server `v` of service `s` as a line.
pub fn line_key(s: &ServiceCfg, v: &ServerCfg) -> LineKey {
    (svc_key(s), v.address, v.port)
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

#[derive(Clone, Default)]
pub struct Plane {
    ids: HashMap<SvcKey, u32>,
    /// Shared with the copies that surfaces read beside the loop, as are `services`.
    indices: Arc<HashMap<LineKey, u32>>,
    states: HashMap<LineKey, LineState>,
    /// The services as last applied, in config order.
    services: Arc<Vec<ServiceCfg>>,
    /// Indices of server lines that left with a reload and whose connection entries are
    /// still being dropped beside the event loop: not handed out again until that is done,
    /// or a new line would inherit the old one's connections.
    draining: HashSet<u32>,
    /// Lines whose state changed while a reload or resize is worked out from a copy.
    journal: Option<Vec<LineKey>>,
    /// Each service's up or down as last judged with its quorum and hysteresis (which
    /// remember); a service not judged yet is up with `quorum` servers up.
    quorate: HashMap<SvcKey, bool>,
    /// What each server index is, worked out once per numbering (where the plane is made,
    /// beside the event loop): sync and the connections table read it on every turn.
    lines: Arc<Lines>,
}

/// Each server index's server (address, port, method) and service (VIP, port).
#[derive(Default)]
pub struct Lines {
    pub server: HashMap<u32, (IpAddr, u16, Method)>,
    /// The service of each server line.
    pub vip: HashMap<u32, SvcKey>,
    /// The lines of services with timeouts of their own: (idle, closing) in seconds, 0
    /// for the cluster's (as in their server records).
    pub timeouts: HashMap<u32, (u32, u32)>,
    /// The lines of sticky services (`persistence`): the service's id and its
    /// `persistence_netmask` (0: the whole client address), which name its clients'
    /// persistence entries.
    pub persist: HashMap<u32, (u32, u8)>,
}

/// When a connection entry is dead, for everything that judges entries beside the
/// dataplane (the sweep, the tables, sync): by the same rule as the dataplane
/// (`lb_common::Timeouts::limit_ns`), from the cluster's timeouts and the server lines'.
#[derive(Clone)]
pub struct Expiry {
    base: lb_common::Timeouts,
    lines: Arc<Lines>,
}

impl Expiry {
    pub fn new(base: lb_common::Timeouts, lines: Arc<Lines>) -> Self {
        Expiry { base, lines }
    }

    /// What each server index is.
    pub fn lines(&self) -> &Lines {
        &self.lines
    }

    /// How long entry `c` (keyed `key`) may be idle.
    pub fn limit_ns(&self, key: &FlowKey, c: &Connection) -> u64 {
        let (idle, fin) = self
            .lines
            .timeouts
            .get(&c.server)
            .copied()
            .unwrap_or((0, 0));
        self.base.limit_ns(key.proto, c.flags, idle, fin)
    }

    /// Whether entry `c` has been idle at most its limit at `now` (ns, the dataplane's clock).
    pub fn live(&self, key: &FlowKey, c: &Connection, now: u64) -> bool {
        now.saturating_sub(c.last_seen_ns) <= self.limit_ns(key, c)
    }
}

/// Where the plane programs its services: the dataplane's maps (and, in the unit tests, a
/// record of what was programmed).
pub trait Programs {
    /// Programs service `id` whole: its servers, its row, its record.
    fn install(&mut self, id: u32, spec: &ServiceSpec) -> Result<(), dataplane::Error>;
    /// Changes one server line of installed service `id`: its record and its service's row.
    fn set_server_state(
        &mut self,
        id: u32,
        index: u32,
        up: bool,
        weight: u32,
    ) -> Result<(), dataplane::Error>;
}

impl Programs for Dataplane {
    fn install(&mut self, id: u32, spec: &ServiceSpec) -> Result<(), dataplane::Error> {
        Dataplane::install(self, id, spec)
    }
    fn set_server_state(
        &mut self,
        id: u32,
        index: u32,
        up: bool,
        weight: u32,
    ) -> Result<(), dataplane::Error> {
        Dataplane::set_server_state(self, id, index, up, weight)
    }
}

/// What taking a new config will do, worked out without touching the dataplane.
pub struct Plan {
    /// The plane once the config is taken.
    pub plane: Plane,
    /// Ids of the services that leave.
    pub removed_services: Vec<u32>,
    /// Indices of the server lines that leave (their connections are to be dropped).
    pub removed_lines: Vec<u32>,
    pub changes: Changes,
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

    /// How many of a service's servers take new connections: up, with a weight.
    pub fn servers_up(&self, s: &ServiceCfg) -> u32 {
        s.servers
            .iter()
            .filter(|v| {
                let lk = line_key(s, v);
                !v.sorry && self.up(&lk) && self.weight(&lk, v.weight) > 0
            })
            .count() as u32
    }

    /// Whether a service is up: it has its `quorum` of servers taking connections (one by
    /// default), judged with its hysteresis.
    pub fn service_up(&self, s: &ServiceCfg) -> bool {
        let up = self.servers_up(s);
        match self.quorate.get(&svc_key(s)) {
            Some(was) => s.quorate(up, *was),
            None => up >= s.quorum,
        }
    }

    /// The weight in force for a line.
    pub fn weight(&self, line: &LineKey, configured: u32) -> u32 {
        self.state(line).admin.weight.unwrap_or(configured)
    }

    /// Server line indices whose connections are still being dropped.
    pub fn draining(&self) -> usize {
        self.draining.len()
    }

    /// Whether `caps` can hold the services and server lines in force, and why not.
    pub fn fits(&self, caps: &Capacities) -> Result<(), String> {
        let lines: usize = self.services.iter().map(|s| s.servers.len()).sum();
        if self.services.len() > caps.services as usize || lines > caps.servers as usize {
            return Err(format!(
                "the running config needs {} services and {lines} servers",
                self.services.len()
            ));
        }
        Ok(())
    }

    /// Works out taking `config`'s services into tables of `caps`: the ids and indices of
    /// what remains are kept (so its connections keep flowing), what left is freed, and
    /// what came gets the smallest free ones. Nothing is touched: the caller carries the
    /// plan out, or drops it and nothing has changed.
    pub fn plan(&self, config: &Config, caps: &Capacities) -> Result<Plan, String> {
        let mut next = self.clone();
        next.journal = None;
        let mut changes = Changes::default();
        let new_keys: HashSet<SvcKey> = config.services.iter().map(svc_key).collect();
        let new_lines: HashSet<LineKey> = config
            .services
            .iter()
            .flat_map(|s| s.servers.iter().map(move |v| line_key(s, v)))
            .collect();

        let mut removed_services = Vec::new();
        next.ids.retain(|k, id| {
            let keep = new_keys.contains(k);
            if !keep {
                removed_services.push(*id);
            }
            keep
        });
        changes.services_removed = removed_services.len();
        let mut removed_lines = Vec::new();
        let indices = Arc::make_mut(&mut next.indices);
        indices.retain(|k, i| {
            let keep = new_lines.contains(k);
            if !keep {
                removed_lines.push(*i);
            }
            keep
        });
        next.states.retain(|k, _| new_lines.contains(k));
        changes.lines_removed = removed_lines.len();
        next.draining.extend(removed_lines.iter().copied());

        let mut free_ids = free(next.ids.values().copied(), caps.services);
        let mut free_indices = free(
            indices.values().chain(next.draining.iter()).copied(),
            caps.servers,
        );
        let (in_use, draining) = (indices.len(), next.draining.len());
        for s in &config.services {
            let k = svc_key(s);
            if let std::collections::hash_map::Entry::Vacant(e) = next.ids.entry(k) {
                let id = free_ids.pop_first().ok_or_else(|| {
                    format!(
                        "{} services do not fit the tables' {} services",
                        config.services.len(),
                        caps.services
                    )
                })?;
                e.insert(id);
                changes.services_added += 1;
            }
            for v in &s.servers {
                let lk = line_key(s, v);
                if let std::collections::hash_map::Entry::Vacant(e) = indices.entry(lk) {
                    let i = free_indices.pop_first().ok_or_else(|| {
                        format!(
                            "no free server index: the tables hold {} servers ({in_use} kept, \
                             {draining} still being drained)",
                            caps.servers,
                        )
                    })?;
                    e.insert(i);
                    changes.lines_added += 1;
                }
            }
        }
        if let Some(i) = next
            .ids
            .values()
            .find(|i| **i >= caps.services)
            .or_else(|| next.indices.values().find(|i| **i >= caps.servers))
        {
            return Err(format!(
                "id or index {i} is beyond the tables ({} services, {} servers)",
                caps.services, caps.servers
            ));
        }
        next.services = Arc::new(config.services.clone());
        next.number_lines();
        Ok(Plan {
            plane: next,
            removed_services,
            removed_lines,
            changes,
        })
    }

    /// The same services and states numbered afresh from 0 in config order, for a new,
    /// empty dataplane (a resize): ids and indices fit any tables that hold them, and none
    /// is draining, since a new dataplane has no connections.
    pub fn compact(&self) -> Plane {
        let mut next = Plane {
            states: self.states.clone(),
            services: self.services.clone(),
            ..Plane::default()
        };
        let mut index = 0;
        let mut indices = HashMap::new();
        for (id, s) in self.services.iter().enumerate() {
            let k = svc_key(s);
            next.ids.insert(k, id as u32);
            for v in &s.servers {
                indices.insert(line_key(s, v), index);
                index += 1;
            }
        }
        next.indices = Arc::new(indices);
        next.number_lines();
        next
    }

    /// Works out [`Plane::lines`] for the numbering in force.
    fn number_lines(&mut self) {
        let mut lines = Lines::default();
        for s in self.services.iter() {
            for v in &s.servers {
                if let Some(i) = self.index(&line_key(s, v)) {
                    lines.server.insert(i, (v.address, v.port, v.method));
                    lines.vip.insert(i, svc_key(s));
                    if s.persistence > 0
                        && let Some(id) = self.ids.get(&svc_key(s))
                    {
                        lines.persist.insert(i, (*id, s.persistence_netmask));
                    }
                    let t = &s.timeouts;
                    if t.idle.is_some() || t.fin.is_some() {
                        lines
                            .timeouts
                            .insert(i, (t.idle.unwrap_or(0), t.fin.unwrap_or(0)));
                    }
                }
            }
        }
        self.lines = Arc::new(lines);
    }

    /// Takes the health and operator state of `running`'s `lines` that are also here: they
    /// changed while a reload or resize was being worked out from an older copy.
    pub fn keep_states_of(&mut self, running: &Plane, lines: &[LineKey]) {
        for line in lines {
            if self.indices.contains_key(line) {
                self.states.insert(*line, running.state(line));
            }
        }
    }

    /// From now on, remember which lines change state (see [`Plane::take_journal`]).
    pub fn start_journal(&mut self) {
        self.journal = Some(Vec::new());
    }

    pub fn stop_journal(&mut self) {
        self.journal = None;
    }

    /// The lines whose state changed since [`Plane::start_journal`].
    pub fn take_journal(&mut self) -> Vec<LineKey> {
        self.journal.take().unwrap_or_default()
    }

    /// Lines whose connections have been dropped: their indices may be handed out again.
    pub fn drained(&mut self, indices: &[u32]) {
        for i in indices {
            self.draining.remove(i);
        }
    }

    /// Takes `config`'s services on start-up and programs the dataplane.
    pub fn apply(
        &mut self,
        dp: &mut Dataplane,
        config: &Config,
    ) -> Result<Changes, dataplane::Error> {
        let plan = self
            .plan(config, &dp.capacities())
            .map_err(dataplane::Error::Invalid)?;
        for id in &plan.removed_services {
            dp.uninstall(*id)?;
        }
        *self = plan.plane;
        self.reinstall(dp)?;
        Ok(plan.changes)
    }

    /// Every service as it should be programmed, with its id.
    pub fn specs(&self) -> Vec<(u32, ServiceSpec)> {
        self.services
            .iter()
            .map(|s| (self.ids[&svc_key(s)], self.spec(s)))
            .collect()
    }

    /// Service `s` as it should be programmed now.
    pub fn spec(&self, s: &ServiceCfg) -> ServiceSpec {
        ServiceSpec {
            vip: s.vip,
            port: s.port,
            proto: s.proto,
            sched: s.scheduler,
            persistence_s: s.persistence,
            one_packet: s.one_packet,
            persistence_prefix: s.persistence_netmask,
            timeout_s: s.timeouts.idle.unwrap_or(0),
            fin_timeout_s: s.timeouts.fin.unwrap_or(0),
            max_new_per_sec: s.max_new_per_sec,
            max_new_per_src: s.max_new_per_sec_per_source,
            limit_prefix: s.rate_limit_prefix,
            servers: s
                .servers
                .iter()
                .map(|v| {
                    let lk = line_key(s, v);
                    ServerSpec {
                        index: self.indices[&lk],
                        addr: v.address,
                        port: v.port,
                        weight: self.weight(&lk, v.weight),
                        method: v.method,
                        up: self.up(&lk),
                        sorry: v.sorry,
                    }
                })
                .collect(),
        }
    }

    /// Programs one service as the plane has it now.
    fn install(&self, dp: &mut impl Programs, s: &ServiceCfg) -> Result<(), dataplane::Error> {
        dp.install(self.ids[&svc_key(s)], &self.spec(s))
    }

    /// Programs every service again (after the dataplane was reloaded).
    pub fn reinstall(&self, dp: &mut impl Programs) -> Result<(), dataplane::Error> {
        for s in self.services.iter() {
            self.install(dp, s)?;
        }
        Ok(())
    }

    /// Changes a line's health or operator state and reprograms that server and its
    /// service's row (not the whole service). A line that stops taking connections should
    /// have its existing ones dropped when `drop_connections` (a server that failed its
    /// checks, as TCL does); a drained one (weight 0) keeps them. Returns the server index
    /// whose connections to drop: the caller does it beside the event loop (a big table
    /// takes a while), and nothing is forwarded to a server that is down meanwhile (the
    /// dataplane checks its record).
    ///
    /// While a reload is being written (the journal is on), the dataplane may already hold
    /// the new config's version of the service, without this line: the change is then
    /// left to the reload, which reprograms every service whose lines changed meanwhile.
    pub fn set_state(
        &mut self,
        dp: &mut impl Programs,
        line: &LineKey,
        f: impl FnOnce(&mut LineState),
        drop_connections: bool,
    ) -> Result<Option<u32>, dataplane::Error> {
        let Some(index) = self.index(line) else {
            return Ok(None);
        };
        let mut state = self.state(line);
        f(&mut state);
        let pos = self.services.iter().position(|s| svc_key(s) == line.0);
        let (Some(id), Some(pos), Some(configured)) = (
            self.id(&line.0),
            pos,
            pos.and_then(|i| {
                self.services[i]
                    .servers
                    .iter()
                    .find(|v| (v.address, v.port) == (line.1, line.2))
            })
            .map(|v| v.weight),
        ) else {
            return Ok(None);
        };
        let up = state.healthy && !state.admin.disabled;
        let weight = state.admin.weight.unwrap_or(configured);
        match dp.set_server_state(id, index, up, weight) {
            Err(dataplane::Error::Invalid(_)) if self.journal.is_some() => {}
            r => r?,
        }
        // Taken only once programmed: a failed write leaves the line as it was. The
        // service's up or down is judged before and after, so hysteresis remembers.
        let was = self.service_up(&self.services[pos]);
        self.states.insert(*line, state);
        let s = &self.services[pos];
        let now = s.quorate(self.servers_up(s), was);
        self.quorate.insert(line.0, now);
        if let Some(j) = self.journal.as_mut() {
            j.push(*line);
        }
        Ok((drop_connections && !up).then_some(index))
    }

    /// The `services` table, with packet counts from `counts` (one read per service: see
    /// [`Dataplane::counter_tables`] to do it beside the event loop).
    pub fn service_lines(&self, counts: &impl Counts) -> Vec<ServiceLine> {
        self.services
            .iter()
            .map(|s| {
                let k = svc_key(s);
                let packets = self.id(&k).map_or(0, |id| counts.service(id).packets);
                ServiceLine {
                    proto: s.proto,
                    vip: s.vip,
                    port: s.port,
                    up: self.service_up(s),
                    persistent: s.persistence > 0,
                    packets,
                }
            })
            .collect()
    }

    /// The `servers` table: one line per (service, server), in config order, with packet
    /// counts from `counts` (one read per server line).
    pub fn server_lines(&self, counts: &impl Counts) -> Vec<ServerLine> {
        let mut out = Vec::new();
        for s in self.services.iter() {
            for v in &s.servers {
                let lk = line_key(s, v);
                let packets = self.index(&lk).map_or(0, |i| counts.server(i).packets);
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

    /// What each server index is, for sync and the connections table.
    pub fn lines(&self) -> Arc<Lines> {
        self.lines.clone()
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
        Ok(line_key(s, v))
    }
}

/// The ids below `cap` not in `used`.
fn free(used: impl Iterator<Item = u32>, cap: u32) -> BTreeSet<u32> {
    let used: HashSet<u32> = used.collect();
    (0..cap).filter(|i| !used.contains(i)).collect()
}

#[cfg(test)]
mod tests;
