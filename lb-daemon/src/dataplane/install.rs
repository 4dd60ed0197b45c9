//! Programming services into the maps: server records, scheduler rows, and the service
//! record published last, so lb_xdp never sees a half-written service.

use lb_common::{
    Method, SERVER_UP, Sched, Server, Service, ServiceKey, ring_slots,
    sched::{self, Backend},
};

use super::{Dataplane, Error};

impl Dataplane {
    /// Programs service `id`: its server records, its scheduler row from the servers that
    /// are up, then the service record itself (so the row is complete before any packet can
    /// index it).
    pub fn install(&mut self, id: u32, spec: &ServiceSpec) -> Result<(), Error> {
        self.install_row(id, spec, &row(spec))
    }

    /// [`Dataplane::install`] with the scheduler row already computed by [`row`] (beside
    /// the event loop: a Maglev ring takes a millisecond or two).
    pub fn install_row(&mut self, id: u32, spec: &ServiceSpec, row: &[u32]) -> Result<(), Error> {
        self.write_servers(id, spec, 0..spec.servers.len())?;
        self.publish_row(id, spec, row)
    }

    /// The first part of installing service `id`: server records `range` of `spec`. A
    /// service is installed piece by piece this way (a reload bounds each piece of work on
    /// the event loop), then published with [`Dataplane::publish_row`].
    pub fn write_servers(
        &mut self,
        id: u32,
        spec: &ServiceSpec,
        range: std::ops::Range<usize>,
    ) -> Result<(), Error> {
        if let Some(s) = spec.servers.iter().find(|s| s.index >= self.caps.servers) {
            return Err(Error::Invalid(format!(
                "server index {} is beyond the capacity of {} servers",
                s.index, self.caps.servers
            )));
        }
        if id >= self.caps.services {
            return Err(Error::Invalid(format!(
                "service id {id} is beyond the capacity of {} services",
                self.caps.services
            )));
        }
        if range.start == 0
            && let Some(old) = self.installed.get(&id)
            && old.spec.key() != spec.key()
        {
            // The id served another VIP:port: that one goes before its servers change.
            let old_key = old.spec.key();
            self.remove_service(&old_key)?;
        }
        for s in spec.servers.get(range).unwrap_or_default() {
            let record = Server {
                addr: s.addr.into(),
                vip: spec.vip.into(),
                port: s.port.to_be(),
                vport: spec.port.to_be(),
                method: s.method as u8,
                flags: if s.up { SERVER_UP } else { 0 },
                proto: spec.proto,
                weight: s.weight,
                service: id,
                timeout_s: spec.timeout_s,
                fin_timeout_s: spec.fin_timeout_s,
                ..Default::default()
            };
            self.set_server(s.index, &record)?;
        }
        Ok(())
    }

    /// The last part of installing service `id`: its row (from [`row`]), then its record.
    pub fn publish_row(&mut self, id: u32, spec: &ServiceSpec, row: &[u32]) -> Result<(), Error> {
        let inst = self.installed.entry(id).or_insert_with(|| Installed {
            spec: spec.clone(),
            pages: Vec::new(),
        });
        inst.spec = spec.clone();
        self.publish(id, row)
    }

    /// The spec service `id` was last installed with.
    pub fn installed(&self, id: u32) -> Option<&ServiceSpec> {
        self.installed.get(&id).map(|i| &i.spec)
    }

    /// Marks server record `index` down (a line that left with a reload): the dataplane
    /// forwards a connection without asking `services` only while its server is up.
    pub fn mark_down(&mut self, index: u32) -> Result<(), Error> {
        let mut record = self.server(index)?;
        if record.flags & SERVER_UP != 0 {
            record.flags &= !SERVER_UP;
            self.set_server(index, &record)?;
        }
        Ok(())
    }

    /// Marks server line `index` of service `id` up or down and sets its weight, then
    /// rebuilds that service's row: a server that went down leaves the table at once. Only
    /// that server's record and that service's row and record are written. An error if the
    /// service, as last installed, has no such line.
    pub fn set_server_state(
        &mut self,
        id: u32,
        index: u32,
        up: bool,
        weight: u32,
    ) -> Result<(), Error> {
        let inst = self
            .installed
            .get_mut(&id)
            .ok_or_else(|| Error::Invalid(format!("no service with id {id}")))?;
        let s = inst
            .spec
            .servers
            .iter_mut()
            .find(|s| s.index == index)
            .ok_or_else(|| {
                Error::Invalid(format!("service {id} has no server with index {index}"))
            })?;
        s.up = up;
        s.weight = weight;
        let mut record = self.server(index)?;
        record.flags = if up { SERVER_UP } else { 0 };
        record.weight = weight;
        self.set_server(index, &record)?;
        let row = row(&self.installed[&id].spec);
        self.publish(id, &row)
    }

    /// Writes service `id`'s row into fresh pages of the pool, then republishes its record
    /// naming them, and gives the old row's pages back. On an error the record and the old
    /// row are left as they were.
    pub(super) fn publish(&mut self, id: u32, row: &[u32]) -> Result<(), Error> {
        let spec = &self.installed[&id].spec;
        let key = spec.key();
        let mut record = Service {
            id,
            table_len: row.len() as u32,
            persistence_s: spec.persistence_s,
            sched: spec.sched as u8,
            persist_prefix: spec.persistence_prefix,
            new_interval_ns: lb_common::rate::interval_ns(spec.max_new_per_sec),
            src_interval_ns: lb_common::rate::interval_ns(spec.max_new_per_src),
            limit_prefix: spec.limit_prefix,
            flags: if spec.one_packet {
                lb_common::SERVICE_ONE_PACKET
            } else {
                0
            },
            ..Default::default()
        };
        let pages = self
            .sched
            .write(row)
            .map_err(|e| Error::Invalid(format!("service id {id}: {e}")))?;
        for (slot, page) in record.pages.iter_mut().zip(&pages) {
            *slot = *page;
        }
        if let Err(e) = self.set_service(key, record) {
            self.sched.release(&pages);
            return Err(e);
        }
        let inst = self.installed.get_mut(&id).expect("installed above");
        let old = std::mem::replace(&mut inst.pages, pages);
        self.sched.release(&old);
        Ok(())
    }

    /// Removes service `id` installed with [`Dataplane::install`], and marks its servers
    /// down: a connection is forwarded without asking `services` only while its server is
    /// up, so none of the service's connections is forwarded any more. (A server index
    /// already given to another service is left alone.)
    pub fn uninstall(&mut self, id: u32) -> Result<(), Error> {
        if let Some(inst) = self.installed.remove(&id) {
            if let Err(e) = self.remove_service(&inst.spec.key()) {
                self.installed.insert(id, inst);
                return Err(e);
            }
            self.sched.release(&inst.pages);
            for s in &inst.spec.servers {
                let mut record = self.server(s.index)?;
                if record.service == id && record.flags & SERVER_UP != 0 {
                    record.flags &= !SERVER_UP;
                    self.set_server(s.index, &record)?;
                }
            }
        }
        Ok(())
    }
}

/// The scheduler row of a service: its up servers by the service's scheduler, or, while
/// none is up, its up sorry servers. Pure, so it can be computed beside the event loop.
pub fn row(spec: &ServiceSpec) -> Vec<u32> {
    let real = spec
        .servers
        .iter()
        .any(|s| s.up && !s.sorry && s.weight > 0);
    let backends: Vec<Backend> = spec
        .servers
        .iter()
        .filter(|s| s.up && s.sorry != real)
        .map(|s| Backend::new(s.index, s.addr.into(), s.port, s.weight))
        .collect();
    sched::table(spec.sched, &backends, ring_slots(spec.servers.len()))
}

/// A real server of a service, as the control plane describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSpec {
    /// Its index in the `servers` map (one per service/server line).
    pub index: u32,
    pub addr: std::net::IpAddr,
    pub port: u16,
    pub weight: u32,
    pub method: Method,
    /// Passed its checks and is enabled.
    pub up: bool,
    /// A sorry server: in the row only while no other server of the service is up.
    pub sorry: bool,
}

/// A service and its servers, as the control plane describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vip: std::net::IpAddr,
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub sched: Sched,
    /// Seconds a client sticks to its server; 0 = off.
    pub persistence_s: u32,
    /// UDP one-packet scheduling: each datagram scheduled alone, no connection entry.
    pub one_packet: bool,
    /// Persistence by client prefix (`persistence_netmask`); 0 = the whole address.
    pub persistence_prefix: u8,
    /// The service's own idle timeouts in seconds (`Server::timeout_s`, `fin_timeout_s`);
    /// 0: the cluster's.
    pub timeout_s: u32,
    pub fin_timeout_s: u32,
    /// New-connection limits a second (`max_new_per_sec`, `..._per_source`); 0 = none.
    pub max_new_per_sec: u32,
    pub max_new_per_src: u32,
    /// The client prefix the per-source limit counts together.
    pub limit_prefix: u8,
    pub servers: Vec<ServerSpec>,
}

impl ServiceSpec {
    /// A service with none of the options (persistence, one-packet, its own timeouts,
    /// limits): what the tests and benchmarks start from.
    pub fn new(
        vip: std::net::IpAddr,
        port: u16,
        proto: u8,
        sched: Sched,
        servers: Vec<ServerSpec>,
    ) -> ServiceSpec {
        ServiceSpec {
            vip,
            port,
            proto,
            sched,
            persistence_s: 0,
            one_packet: false,
            persistence_prefix: 0,
            timeout_s: 0,
            fin_timeout_s: 0,
            max_new_per_sec: 0,
            max_new_per_src: 0,
            limit_prefix: 0,
            servers,
        }
    }

    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            vip: self.vip.into(),
            port: self.port.to_be(),
            proto: self.proto,
            _pad: 0,
        }
    }
}

pub(super) struct Installed {
    spec: ServiceSpec,
    /// The pool pages its published row is in.
    pub(super) pages: super::sched_table::Pages,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(index: u32, up: bool, weight: u32, sorry: bool) -> ServerSpec {
        ServerSpec {
            index,
            addr: std::net::Ipv4Addr::new(192, 0, 2, 11 + index as u8).into(),
            port: 80,
            weight,
            method: Method::Direct,
            up,
            sorry,
        }
    }

    fn spec(servers: Vec<ServerSpec>) -> ServiceSpec {
        ServiceSpec::new(
            std::net::Ipv4Addr::new(192, 0, 2, 100).into(),
            80,
            lb_common::IPPROTO_TCP,
            Sched::Rr,
            servers,
        )
    }

    fn members(row: &[u32]) -> Vec<u32> {
        let mut m = row.to_vec();
        m.sort_unstable();
        m.dedup();
        m
    }

    #[test]
    fn the_sorry_server_is_in_the_row_only_while_no_other_server_takes_connections() {
        let up = spec(vec![
            server(0, true, 1, false),
            server(1, false, 1, false),
            server(2, true, 1, true),
        ]);
        assert_eq!(members(&row(&up)), vec![0]);
        let down = spec(vec![
            server(0, false, 1, false),
            server(1, false, 1, false),
            server(2, true, 1, true),
        ]);
        assert_eq!(members(&row(&down)), vec![2]);
        // Drained servers take no new connections either.
        let drained = spec(vec![server(0, true, 0, false), server(2, true, 1, true)]);
        assert_eq!(members(&row(&drained)), vec![2]);
        // A sorry server that is down itself leaves the row empty.
        let none = spec(vec![server(0, false, 1, false), server(2, false, 1, true)]);
        assert!(row(&none).is_empty());
    }
}
