//! Connection sync: the primary turns its connection events (and, periodically, its whole
//! table) into records that name servers by address and port; a backup installs them with
//! its own server indices, so that once promoted it forwards established connections to the
//! same servers, NAT translations included.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    Addr, CONN_FIN, CONN_NAT, CONN_PEER_FIN, CONN_PEER_RST, CONN_REPLY, CONN_RST,
    CONN_SERVER_CLOSED_FIRST, CONN_SYNCED, ConnEvent, Connection, EVENT_CLOSE, EVENT_OPEN, FlowKey,
    Method, Persist, PersistKey,
};

use crate::{
    dataplane::{self, Dataplane},
    ha::{IDLE_UNKNOWN, SyncRecord},
    services::{Expiry, Lines, Plane},
};

/// Server index -> (address, port), as the primary's plane has them.
pub type ServerMap = HashMap<u32, (IpAddr, u16, Method)>;

fn ap(a: &Addr, port_be: u16) -> SocketAddr {
    SocketAddr::new(a.to_ip(), u16::from_be(port_be))
}

/// How long, in whole milliseconds (saturating), an entry last seen at `last_seen_ns` has
/// been idle at `now_ns`.
fn idle_ms(last_seen_ns: u64, now_ns: u64) -> u32 {
    (now_ns.saturating_sub(last_seen_ns) / 1_000_000).min(u32::MAX as u64 - 1) as u32
}

/// The primary's persistence entries as records for backups ([`crate::ha::Body::Persist`]):
/// the client or client prefix the entry names (port 0), its service and the server of its
/// line, and how long the entry has been idle. Entries of lines this plane no longer has,
/// or no longer sticky, are left out.
pub fn persist_records(
    entries: &[(PersistKey, Persist)],
    lines: &Lines,
    now_ns: u64,
) -> Vec<SyncRecord> {
    entries
        .iter()
        .filter_map(|(k, p)| {
            let &(vip, port, proto) = lines.vip.get(&p.server)?;
            let &(addr, server_port, _) = lines.server.get(&p.server)?;
            let &(service, _) = lines.persist.get(&p.server)?;
            if service != k.service {
                return None;
            }
            let client = ap(&k.client, 0);
            let unset = if vip.is_ipv6() {
                IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)
            };
            Some(SyncRecord {
                kind: EVENT_OPEN,
                proto,
                flags: 0,
                client,
                vip: SocketAddr::new(vip, port),
                server: SocketAddr::new(addr, server_port),
                nat: SocketAddr::new(unset, 0),
                peer_mac: [0; 6],
                idle_ms: idle_ms(p.last_seen_ns, now_ns),
            })
        })
        .collect()
}

/// A record from a dataplane event; `None` for a server index the plane no longer has.
pub fn from_event(e: &ConnEvent, servers: &ServerMap) -> Option<SyncRecord> {
    let (addr, port, _) = servers.get(&e.server)?;
    Some(SyncRecord {
        kind: e.kind,
        proto: e.key.proto,
        flags: e.flags,
        client: ap(&e.key.src, e.key.sport),
        vip: ap(&e.key.dst, e.key.dport),
        server: SocketAddr::from((*addr, *port)),
        nat: ap(&e.nat_addr, e.nat_port),
        peer_mac: e.peer_mac,
        // Made as the packet went through.
        idle_ms: 0,
    })
}

/// The key of the reply leg of NAT client leg `c` (keyed `k`) toward server `addr`:`port`.
fn rk_of(k: &FlowKey, c: &Connection, addr: IpAddr, port: u16) -> FlowKey {
    FlowKey {
        src: addr.into(),
        dst: c.nat_addr,
        sport: port.to_be(),
        dport: c.nat_port,
        proto: k.proto,
        _pad: [0; 3],
    }
}

/// Flags with the two sides' closing bits swapped: FIN and RST (the side a leg's own packets
/// come from) for `CONN_PEER_FIN` and `CONN_PEER_RST` (the other side's), and back;
/// `CONN_SERVER_CLOSED_FIRST` kept. A record's flags are its client leg's, which never
/// carries the `CONN_PEER_*` and `CONN_SERVER_CLOSED_FIRST` bits: in a record these say how
/// the server's side closed, as its reply leg holds it. So the whole table's record takes
/// `swap_sides` of the reply leg's own bits ([`server_close`]), and a synced reply leg takes
/// `swap_sides` of the record's ([`reply_close`]). Receivers of the version before take the
/// extra bits as a closing connection's, which it is.
fn swap_sides(flags: u16) -> u16 {
    let mut f = flags & CONN_SERVER_CLOSED_FIRST;
    for (own, other) in [(CONN_FIN, CONN_PEER_FIN), (CONN_RST, CONN_PEER_RST)] {
        if flags & own != 0 {
            f |= other;
        }
        if flags & other != 0 {
            f |= own;
        }
    }
    f
}

/// The server's side of a NAT connection, for its record, from its reply leg's flags (not
/// the client's FIN or RST, which the reply leg holds as `CONN_PEER_*`).
fn server_close(reply_flags: u16) -> u16 {
    swap_sides(reply_flags & (CONN_FIN | CONN_RST | CONN_SERVER_CLOSED_FIRST))
}

/// The closing bits of a synced NAT reply leg, from its record: the client's FIN or RST
/// (`CONN_PEER_*` on a reply leg) and the server's. With them the NAT pair is free again
/// after the hold that applies (`lb_common::nat::port_free`), as on the ATM that made the
/// connection; without them it stayed held as an open connection's until the idle timeout,
/// and after a failover the new primary's ports ran out.
fn reply_close(record_flags: u16) -> u16 {
    swap_sides(record_flags)
}

/// The record bits that describe the server's side, not the client leg.
const SERVER_SIDE: u16 = CONN_PEER_FIN | CONN_PEER_RST | CONN_SERVER_CLOSED_FIRST;

/// Every closing bit a reply leg may hold.
const CLOSE_BITS: u16 = CONN_FIN | CONN_RST | SERVER_SIDE;

/// Every live client leg of the table `all` (as read at `now_ns`), as records (NAT ones with
/// the client-side MAC of their reply leg).
pub fn full_table(
    all: &[(FlowKey, Connection)],
    servers: &ServerMap,
    expiry: &Expiry,
    now_ns: u64,
) -> Vec<SyncRecord> {
    let replies: HashMap<FlowKey, Connection> = all
        .iter()
        .filter(|(_, c)| c.flags & CONN_REPLY != 0)
        .map(|(k, c)| (*k, *c))
        .collect();
    let mut out = Vec::new();
    for (k, c) in all {
        if c.flags & CONN_REPLY != 0 || !expiry.live(k, c, now_ns) {
            continue;
        }
        let Some((addr, port, _)) = servers.get(&c.server) else {
            continue;
        };
        let peer_mac = if c.flags & CONN_NAT != 0 {
            replies
                .get(&rk_of(k, c, *addr, *port))
                .map(|r| r.peer_mac)
                .unwrap_or_default()
        } else {
            [0; 6]
        };
        let server_side = if c.flags & CONN_NAT != 0 {
            replies
                .get(&rk_of(k, c, *addr, *port))
                .map_or(0, |r| server_close(r.flags))
        } else {
            0
        };
        out.push(SyncRecord {
            kind: EVENT_OPEN,
            proto: k.proto,
            flags: c.flags | server_side,
            client: ap(&k.src, k.sport),
            vip: ap(&k.dst, k.dport),
            server: SocketAddr::from((*addr, *port)),
            nat: ap(&c.nat_addr, c.nat_port),
            peer_mac,
            idle_ms: idle_ms(c.last_seen_ns, now_ns),
        });
    }
    out
}

/// The local interface a NAT reply leg should fall back to, for the client side.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local {
    pub mac: [u8; 6],
    pub ifindex: u32,
}

/// Where a backup keeps connection entries: the dataplane's `connections` map (and, in the
/// unit tests, a plain map).
pub trait ConnStore {
    fn connection(&self, key: &FlowKey) -> Option<Connection>;
    fn set_connection(&mut self, key: &FlowKey, c: &Connection) -> Result<(), dataplane::Error>;
}

impl ConnStore for Dataplane {
    fn connection(&self, key: &FlowKey) -> Option<Connection> {
        Dataplane::connection(self, key)
    }
    fn set_connection(&mut self, key: &FlowKey, c: &Connection) -> Result<(), dataplane::Error> {
        Dataplane::set_connection(self, key, c)
    }
}

/// Whether entry `c` is this dataplane's own (made from a packet it saw, not synced) and
/// live (neither closed nor idle past its timeout): a sync record does not replace it. It
/// may be another connection on the same addresses and ports than the record's: a client
/// that reused its port just after a close, on the other ATM, during a handover.
fn own_and_live(k: &FlowKey, c: &Connection, now: u64, expiry: &Expiry) -> bool {
    c.flags & (CONN_SYNCED | CONN_FIN | CONN_RST) == 0 && expiry.live(k, c, now)
}

/// How much later than an entry of this ATM a record's connection must have been seen to
/// prevail over it: records are drained every 20 ms and cross in far less than this.
const SEEN_LATER_BY_NS: u64 = 1_000_000_000;

/// Whether record `r`'s connection is live and was seen clearly later than entry `c`, idle
/// at `now`: then `c`, another connection on the same addresses and ports or NAT pair, is
/// over (its client has moved on to the other ATM, and the close this ATM never heard was
/// lost). A record of a closed connection, or one that does not say how idle it is, never
/// prevails.
fn seen_later(r: &SyncRecord, c: &Connection, now: u64) -> bool {
    r.flags & (CONN_FIN | CONN_RST) == 0
        && r.idle_ms != IDLE_UNKNOWN
        && (r.idle_ms as u64 * 1_000_000).saturating_add(SEEN_LATER_BY_NS)
            < now.saturating_sub(c.last_seen_ns)
}

/// The record's addresses and ports, when its client, VIP and server are of one family (as
/// the dataplane keys a connection) and its NAT address is of that family or unset; `None`
/// for a record no ATM would send.
fn parts_of(r: &SyncRecord) -> Option<[(IpAddr, u16); 4]> {
    let v6 = r.vip.is_ipv6();
    let nat_unset = r.nat.ip().is_unspecified() || r.flags & CONN_NAT == 0;
    let ok = r.client.is_ipv6() == v6
        && r.server.is_ipv6() == v6
        && (nat_unset || r.nat.is_ipv6() == v6);
    ok.then(|| [r.client, r.vip, r.server, r.nat].map(|a| (a.ip(), a.port())))
}

/// Installs records on a backup; returns (installed, skipped: servers it does not have, or
/// a record of mixed families).
/// A record never replaces a live entry this dataplane made itself ([`own_and_live`]) for
/// another connection (another server or translation), and a close marks only the entry
/// of the same connection.
pub fn install(
    dp: &mut impl ConnStore,
    plane: &Plane,
    records: &[SyncRecord],
    local: Local,
    expiry: &Expiry,
) -> Result<(usize, usize), dataplane::Error> {
    let now = dataplane::now_ns();
    let (mut installed, mut skipped) = (0, 0);
    for r in records {
        let Some([client, vip, server, nat_at]) = parts_of(r) else {
            skipped += 1;
            continue;
        };
        let svc = (vip.0, vip.1, r.proto);
        let line = (svc, server.0, server.1);
        let Some(index) = plane.index(&line) else {
            skipped += 1;
            continue;
        };
        let key = FlowKey {
            src: client.0.into(),
            dst: vip.0.into(),
            sport: client.1.to_be(),
            dport: vip.1.to_be(),
            proto: r.proto,
            _pad: [0; 3],
        };
        let nat = r.flags & CONN_NAT != 0;
        let reply_key = FlowKey {
            src: server.0.into(),
            dst: nat_at.0.into(),
            sport: server.1.to_be(),
            dport: nat_at.1.to_be(),
            proto: r.proto,
            _pad: [0; 3],
        };
        let existing = dp.connection(&key);
        let same = |c: &Connection| c.server == index && c.nat_port == nat_at.1.to_be();
        let client_addr: Addr = client.0.into();
        let names_client =
            |c: &Connection| c.nat_addr == client_addr && c.nat_port == client.1.to_be();
        if r.kind == EVENT_CLOSE {
            // Marked, not removed: a half-closed connection still carries data one way, and
            // the entry ages out as the primary's does (a SYN on the tuple starts afresh).
            if let Some(mut c) = existing.filter(same) {
                c.flags |= r.flags & (CONN_FIN | CONN_RST);
                dp.set_connection(&key, &c)?;
                // Its reply leg too, which holds the NAT pair.
                if c.flags & CONN_NAT != 0
                    && let Some(mut rl) = dp.connection(&reply_key).filter(names_client)
                {
                    rl.flags |= reply_close(r.flags);
                    dp.set_connection(&reply_key, &rl)?;
                }
            }
            installed += 1;
            continue;
        }
        // Another connection on the same addresses and ports, made here, keeps the client's
        // leg. (The same connection is refreshed, so the entry lives on as long as the other
        // ATM sees it.) The record's reply leg goes in all the same: its NAT pair is taken.
        if !existing.is_some_and(|c| {
            own_and_live(&key, &c, now, expiry) && !same(&c) && !seen_later(r, &c, now)
        }) {
            // A full table read before a close record arrived must not undo the close mark
            // (the same connection: same server and translation).
            let closed = existing
                .filter(same)
                .map_or(0, |c| c.flags & (CONN_FIN | CONN_RST));
            dp.set_connection(
                &key,
                &Connection {
                    last_seen_ns: now,
                    server: index,
                    flags: (r.flags & !SERVER_SIDE) | closed | CONN_SYNCED,
                    nat_port: nat_at.1.to_be(),
                    nat_addr: if nat {
                        nat_at.0.into()
                    } else {
                        Addr::default()
                    },
                    ..Default::default()
                },
            )?;
        }
        // The reply leg, unless another client's connection holds that NAT pair: one this
        // dataplane made and still sees (both ATMs handed out the same pair in the moments
        // records took to cross), or any not yet idle when the record's own connection has
        // ended. A closed connection's record (a full table read carries it until it ages
        // out) must not take replies away from the live connection that reused its pair.
        let ended = r.flags & (CONN_FIN | CONN_RST) != 0;
        let pair_taken = dp.connection(&reply_key).is_some_and(|c| {
            (c.nat_addr != client_addr || c.nat_port != client.1.to_be())
                && ((own_and_live(&reply_key, &c, now, expiry) && !seen_later(r, &c, now))
                    || (ended && expiry.live(&reply_key, &c, now)))
        });
        // A close already marked on the reply leg stays (a whole table read before the
        // close arrived carries the connection as open).
        let prior = dp.connection(&reply_key).filter(names_client);
        let reply_closed = prior.map_or(0, |c| c.flags & CLOSE_BITS);
        // A record without the client-side MAC (a whole table whose walk missed the reply
        // leg while the map changed under it) keeps the one known: with none, a new primary
        // that has no neighbour entry for the client drops the server's replies.
        let peer_mac = match prior {
            Some(c) if r.peer_mac == [0; 6] => c.peer_mac,
            _ => r.peer_mac,
        };
        if nat && !pair_taken {
            dp.set_connection(
                &reply_key,
                &Connection {
                    last_seen_ns: now,
                    server: index,
                    flags: CONN_NAT
                        | CONN_REPLY
                        | CONN_SYNCED
                        | reply_close(r.flags)
                        | reply_closed,
                    nat_port: client.1.to_be(),
                    nat_addr: client_addr,
                    peer_mac,
                    local_mac: local.mac,
                    ifindex: local.ifindex,
                    ..Default::default()
                },
            )?;
        }
        installed += 1;
    }
    Ok((installed, skipped))
}

/// Where a backup keeps persistence entries: the dataplane's `persistence` map (and, in the
/// unit tests, a plain map).
pub trait PersistStore {
    fn persist(&self, key: &PersistKey) -> Option<Persist>;
    fn set_persist(&mut self, key: &PersistKey, p: &Persist) -> Result<(), dataplane::Error>;
}

impl PersistStore for Dataplane {
    fn persist(&self, key: &PersistKey) -> Option<Persist> {
        Dataplane::persist(self, key)
    }
    fn set_persist(&mut self, key: &PersistKey, p: &Persist) -> Result<(), dataplane::Error> {
        Dataplane::set_persist(self, key, p)
    }
}

/// Installs on a backup the persistence entries that records imply: the client (or its
/// `persistence_netmask` prefix) sticks to the record's server, as last seen when the
/// record's connection was (or, for a record of [`persist_records`], the entry itself). Each
/// connection record carries its client's choice, and each whole table the primary sends
/// is followed by its persistence entries, so a client keeps its server after a failover
/// for `persistence` seconds after it was last seen, even where the backup started after
/// the client's last connection ended. An entry seen later (this ATM's own, or a later
/// record's) is kept. Returns how many were written.
pub fn install_persistence(
    store: &mut impl PersistStore,
    plane: &Plane,
    records: &[SyncRecord],
    now: u64,
) -> Result<usize, dataplane::Error> {
    let lines = plane.lines();
    let mut written = 0;
    for r in records.iter().filter(|r| r.kind == EVENT_OPEN) {
        let Some([client, vip, server, _]) = parts_of(r) else {
            continue;
        };
        let line = ((vip.0, vip.1, r.proto), server.0, server.1);
        let Some(index) = plane.index(&line) else {
            continue;
        };
        let Some(&(service, prefix)) = lines.persist.get(&index) else {
            continue;
        };
        let key = PersistKey {
            client: Addr::from(client.0).masked(prefix, client.0.is_ipv6()),
            service,
        };
        let last_seen_ns = if r.idle_ms == IDLE_UNKNOWN {
            now
        } else {
            now.saturating_sub(r.idle_ms as u64 * 1_000_000)
        };
        if store
            .persist(&key)
            .is_some_and(|p| p.last_seen_ns >= last_seen_ns)
        {
            continue;
        }
        store.set_persist(
            &key,
            &Persist {
                last_seen_ns,
                server: index,
                _pad: 0,
            },
        )?;
        written += 1;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::config;
    use lb_common::Timeouts;

    /// A dataplane address as IPv4 (these tests' records are IPv4).
    fn v4(a: &Addr) -> Ipv4Addr {
        match a.to_ip() {
            std::net::IpAddr::V4(v) => v,
            std::net::IpAddr::V6(v) => v.to_ipv4_mapped().expect("an IPv4-mapped address"),
        }
    }

    impl ConnStore for HashMap<FlowKey, Connection> {
        fn connection(&self, key: &FlowKey) -> Option<Connection> {
            self.get(key).copied()
        }
        fn set_connection(
            &mut self,
            key: &FlowKey,
            c: &Connection,
        ) -> Result<(), dataplane::Error> {
            self.insert(*key, *c);
            Ok(())
        }
    }

    /// A backup's plane: one NAT service, 192.0.2.100:80, with web1 (203.0.113.11:8080)
    /// and web2 (203.0.113.12:8080) at indices 0 and 1; and a NAT66 one, [2001:db8::100]:80,
    /// with web6 ([2001:db8:1::12]:8080) at index 2.
    fn plane() -> Plane {
        let text = "[cluster]\nname = \"c\"\n[[atm]]\nname = \"atm1\"\naddress = \"192.0.2.2\"\n\
                    interface = \"eth0\"\n[nat]\nsubnet = \"203.0.113.0/24\"\n\
                    gateway = \"203.0.113.1\"\nsubnet6 = \"2001:db8:1::/64\"\n\
                    gateway6 = \"2001:db8:1::1\"\n[[service]]\nname = \"http\"\n\
                    vip = \"192.0.2.100\"\nport = 80\n[[service.server]]\nname = \"web1\"\n\
                    address = \"203.0.113.11\"\nport = 8080\nmethod = \"nat\"\n\
                    [[service.server]]\nname = \"web2\"\naddress = \"203.0.113.12\"\n\
                    port = 8080\nmethod = \"nat\"\n\
                    [[service]]\nname = \"http6\"\nvip = \"2001:db8::100\"\nport = 80\n\
                    [[service.server]]\nname = \"web6\"\naddress = \"2001:db8:1::12\"\n\
                    port = 8080\nmethod = \"nat\"\n";
        let c = config::parse(text, std::path::Path::new("/")).unwrap();
        let caps = dataplane::Capacities {
            services: 4,
            servers: 4,
            connections: 64,
        };
        Plane::new().plan(&c, &caps).unwrap().plane
    }

    /// The primary's record of client 198.51.100.7:40000 to web2, translated to
    /// 203.0.113.1:1500.
    fn record(kind: u8, flags: u16) -> SyncRecord {
        SyncRecord {
            kind,
            proto: lb_common::IPPROTO_TCP,
            flags,
            client: "198.51.100.7:40000".parse().unwrap(),
            vip: "192.0.2.100:80".parse().unwrap(),
            server: "203.0.113.12:8080".parse().unwrap(),
            nat: "203.0.113.1:1500".parse().unwrap(),
            peer_mac: [2, 0, 0, 0, 0, 7],
            idle_ms: 0,
        }
    }

    fn client_key() -> FlowKey {
        FlowKey {
            src: Ipv4Addr::new(198, 51, 100, 7).into(),
            dst: Ipv4Addr::new(192, 0, 2, 100).into(),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: lb_common::IPPROTO_TCP,
            _pad: [0; 3],
        }
    }

    /// Installs one record; returns (installed, skipped).
    fn put(
        store: &mut HashMap<FlowKey, Connection>,
        plane: &Plane,
        r: SyncRecord,
    ) -> (usize, usize) {
        install(
            store,
            plane,
            &[r],
            LOCAL,
            &Expiry::new(Timeouts::same(TIMEOUT), plane.lines()),
        )
        .unwrap()
    }

    /// The cluster's timeout: 100 s.
    const TIMEOUT: u64 = 100_000_000_000;

    const LOCAL: Local = Local {
        mac: [2, 0, 0, 0, 0, 2],
        ifindex: 3,
    };

    #[test]
    fn a_nat_record_installs_both_legs_with_this_backups_index_and_interface() {
        let (plane, mut store) = (plane(), HashMap::new());
        let r = put(&mut store, &plane, record(EVENT_OPEN, CONN_NAT));
        assert_eq!(r, (1, 0));
        let c = store[&client_key()];
        assert_eq!(c.server, 1, "web2's index here");
        assert_eq!(c.nat_port, 1500u16.to_be());
        assert_eq!(v4(&c.nat_addr), Ipv4Addr::new(203, 0, 113, 1));
        let back = store[&reply_key()];
        assert_eq!(back.flags, CONN_NAT | CONN_REPLY | CONN_SYNCED);
        assert_eq!(v4(&back.nat_addr), Ipv4Addr::new(198, 51, 100, 7));
        assert_eq!(back.nat_port, 40000u16.to_be());
        assert_eq!(
            (back.peer_mac, back.local_mac),
            ([2, 0, 0, 0, 0, 7], LOCAL.mac)
        );
        assert_eq!(back.ifindex, LOCAL.ifindex);
    }

    #[test]
    fn a_close_survives_a_later_full_table_record_of_the_same_connection() {
        let (plane, mut store) = (plane(), HashMap::new());
        put(&mut store, &plane, record(EVENT_OPEN, CONN_NAT));
        put(&mut store, &plane, record(EVENT_CLOSE, CONN_FIN));
        // The periodic full table was read before the close: it still says open.
        put(&mut store, &plane, record(EVENT_OPEN, CONN_NAT));
        assert_eq!(
            store[&client_key()].flags,
            CONN_NAT | CONN_FIN | CONN_SYNCED
        );
    }

    /// A synced NAT pair is freed as the primary frees it: the client's close and the
    /// server's reach its reply leg, where before it stayed held as an open connection's
    /// until the idle timeout, and a new primary's ports ran out after a failover.
    #[test]
    fn a_synced_reply_leg_learns_both_sides_close_and_frees_its_pair_as_the_primary_does() {
        use lb_common::nat::{Holds, port_free};
        const S: u64 = 1_000_000_000;
        let holds = Holds {
            timeout_ns: TIMEOUT,
            fin_timeout_ns: TIMEOUT,
            hold_ns: 2 * S,
            time_wait_ns: 60 * S,
        };
        let (plane, mut store) = (plane(), HashMap::new());
        put(&mut store, &plane, record(EVENT_OPEN, CONN_NAT));
        let seen = store[&reply_key()].last_seen_ns;
        assert!(!port_free(
            store[&reply_key()].flags,
            seen,
            seen + 90 * S,
            &holds
        ));
        // The client's FIN, from the dataplane's close event.
        put(&mut store, &plane, record(EVENT_CLOSE, CONN_NAT | CONN_FIN));
        assert_eq!(
            store[&reply_key()].flags,
            CONN_NAT | CONN_REPLY | CONN_SYNCED | CONN_PEER_FIN
        );
        // A whole table read before that close keeps it, and one read after says how the
        // server closed: first, so the pair waits out its TIME_WAIT.
        put(&mut store, &plane, record(EVENT_OPEN, CONN_NAT));
        assert_eq!(store[&reply_key()].flags & CONN_PEER_FIN, CONN_PEER_FIN);
        let server_first = CONN_NAT | CONN_FIN | CONN_PEER_FIN | CONN_SERVER_CLOSED_FIRST;
        put(&mut store, &plane, record(EVENT_OPEN, server_first));
        let back = store[&reply_key()];
        assert_eq!(
            back.flags,
            CONN_NAT
                | CONN_REPLY
                | CONN_SYNCED
                | CONN_FIN
                | CONN_PEER_FIN
                | CONN_SERVER_CLOSED_FIRST
        );
        assert_eq!(
            store[&client_key()].flags,
            CONN_NAT | CONN_FIN | CONN_SYNCED,
            "the server's side stays off the client leg"
        );
        let seen = back.last_seen_ns;
        assert!(!port_free(back.flags, seen, seen + 30 * S, &holds));
        assert!(port_free(back.flags, seen, seen + 61 * S, &holds));
        // And the primary's whole table says so, from its reply leg.
        let lines = plane.lines();
        let expiry = Expiry::new(Timeouts::same(TIMEOUT), lines.clone());
        let mut own = store.clone();
        for c in own.values_mut() {
            c.flags &= !CONN_SYNCED;
            c.last_seen_ns = 0;
        }
        let all: Vec<_> = own.into_iter().collect();
        let records = full_table(&all, &lines.server, &expiry, 1);
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].flags, server_first);
    }

    /// A whole table's record that lacks the client-side MAC (its walk missed the reply
    /// leg) keeps the MAC the reply leg has: the new primary's fallback toward the client.
    #[test]
    fn a_record_without_the_client_side_mac_keeps_the_one_known() {
        let (plane, mut store) = (plane(), HashMap::new());
        put(&mut store, &plane, record(EVENT_OPEN, CONN_NAT));
        let mut r = record(EVENT_OPEN, CONN_NAT);
        r.peer_mac = [0; 6];
        put(&mut store, &plane, r);
        assert_eq!(store[&reply_key()].peer_mac, [2, 0, 0, 0, 0, 7]);
    }

    #[test]
    fn a_record_for_a_server_this_backup_does_not_have_is_skipped() {
        let (plane, mut store) = (plane(), HashMap::new());
        let mut r = record(EVENT_OPEN, CONN_NAT);
        r.server = "203.0.113.99:8080".parse().unwrap();
        assert_eq!(put(&mut store, &plane, r), (0, 1));
        assert!(store.is_empty());
    }

    /// The reply leg's key of `record`'s connection.
    fn reply_key() -> FlowKey {
        FlowKey {
            src: Ipv4Addr::new(203, 0, 113, 12).into(),
            dst: Ipv4Addr::new(203, 0, 113, 1).into(),
            sport: 8080u16.to_be(),
            dport: 1500u16.to_be(),
            proto: lb_common::IPPROTO_TCP,
            _pad: [0; 3],
        }
    }

    /// A connection this dataplane made: the same client to web1, NAT port 2000.
    fn own() -> Connection {
        Connection {
            last_seen_ns: dataplane::now_ns(),
            packets: 3,
            server: 0,
            flags: CONN_NAT,
            nat_port: 2000u16.to_be(),
            nat_addr: Ipv4Addr::new(203, 0, 113, 1).into(),
            ..Default::default()
        }
    }

    #[test]
    fn records_of_an_older_connection_leave_a_live_one_this_atm_made_alone() {
        // The client reused its port just after the other ATM closed its connection; this
        // ATM made the new one. The old one's records come late.
        let (plane, mut store) = (plane(), HashMap::new());
        store.insert(client_key(), own());
        for r in [record(EVENT_OPEN, CONN_NAT), record(EVENT_CLOSE, CONN_FIN)] {
            put(&mut store, &plane, r);
            assert_eq!(store[&client_key()], own_with_time(&store));
        }
        // The old connection's NAT pair is still held (its server may be in TIME_WAIT).
        assert_eq!(store[&reply_key()].nat_port, 40000u16.to_be());
        // Closed or idle, it is replaced by the record as before.
        for stale in [
            Connection {
                flags: CONN_NAT | CONN_FIN,
                ..own()
            },
            Connection {
                last_seen_ns: dataplane::now_ns().saturating_sub(TIMEOUT + 1),
                ..own()
            },
        ] {
            store.insert(client_key(), stale);
            put(&mut store, &plane, record(EVENT_OPEN, CONN_NAT));
            let c = store[&client_key()];
            assert_eq!((c.server, c.nat_port), (1, 1500u16.to_be()));
            assert_eq!(c.flags, CONN_NAT | CONN_SYNCED);
        }
        // Its own entry of the same connection is refreshed (it lives on while the other ATM
        // sees its packets).
        let same_one = Connection {
            server: 1,
            nat_port: 1500u16.to_be(),
            last_seen_ns: 1,
            ..own()
        };
        store.insert(
            client_key(),
            Connection {
                last_seen_ns: dataplane::now_ns(),
                ..same_one
            },
        );
        put(&mut store, &plane, record(EVENT_OPEN, CONN_NAT));
        assert_eq!(store[&client_key()].flags, CONN_NAT | CONN_SYNCED);
        // A synced entry is replaced too, and a close marks the same connection.
        put(&mut store, &plane, record(EVENT_CLOSE, CONN_FIN));
        assert_eq!(
            store[&client_key()].flags,
            CONN_NAT | CONN_FIN | CONN_SYNCED
        );
    }

    /// `own()` as stored (its time is the one it was inserted with).
    fn own_with_time(store: &HashMap<FlowKey, Connection>) -> Connection {
        Connection {
            last_seen_ns: store[&client_key()].last_seen_ns,
            ..own()
        }
    }

    #[test]
    fn a_nat_pair_this_atm_holds_for_its_own_connection_keeps_its_reply_leg() {
        let (plane, mut store) = (plane(), HashMap::new());
        let mine = Connection {
            last_seen_ns: dataplane::now_ns(),
            server: 1,
            flags: CONN_NAT | CONN_REPLY,
            nat_port: 41000u16.to_be(),
            nat_addr: Ipv4Addr::new(198, 51, 100, 8).into(),
            ..Default::default()
        };
        store.insert(reply_key(), mine);
        put(&mut store, &plane, record(EVENT_OPEN, CONN_NAT));
        assert_eq!(
            store[&reply_key()],
            mine,
            "this ATM's client keeps its replies"
        );
        assert_eq!(store[&client_key()].nat_port, 1500u16.to_be());
    }

    #[test]
    fn an_ended_connections_record_leaves_the_pair_to_the_live_one_that_reused_it() {
        // The other ATM's record of a live connection on the pair came first (the new
        // primary reused a pair whose old connection's records were still on their way);
        // the old, closed connection's record comes after, as a full table read carries it.
        let (plane, mut store) = (plane(), HashMap::new());
        let mut live = record(EVENT_OPEN, CONN_NAT);
        live.client = "192.0.2.51:46911".parse().unwrap();
        put(&mut store, &plane, live);
        let replies_to = |s: &HashMap<FlowKey, Connection>| {
            let c = s[&reply_key()];
            (v4(&c.nat_addr), u16::from_be(c.nat_port))
        };
        assert_eq!(replies_to(&store), (Ipv4Addr::new(192, 0, 2, 51), 46911));
        put(&mut store, &plane, record(EVENT_OPEN, CONN_NAT | CONN_FIN));
        assert_eq!(
            replies_to(&store),
            (Ipv4Addr::new(192, 0, 2, 51), 46911),
            "the live connection keeps its replies"
        );
        // The old connection's client leg is still known (its last segments still map).
        assert_eq!(store[&client_key()].nat_port, 1500u16.to_be());
        // A live record takes a pair from another synced connection, as before; an ended
        // one takes it once the holder is idle.
        put(&mut store, &plane, record(EVENT_OPEN, CONN_NAT));
        assert_eq!(replies_to(&store).1, 40000);
        put(&mut store, &plane, live);
        store.get_mut(&reply_key()).unwrap().last_seen_ns =
            dataplane::now_ns().saturating_sub(TIMEOUT + 1);
        put(&mut store, &plane, record(EVENT_OPEN, CONN_NAT | CONN_RST));
        assert_eq!(replies_to(&store).1, 40000);
    }

    #[test]
    fn an_own_entry_idle_well_before_the_records_connection_yields_to_it() {
        // The other ATM saw the record's connection just now; this ATM's own connection on
        // the same client port has been silent for 5 s: its client moved on, and the close
        // this ATM never heard was lost.
        let (plane, mut store) = (plane(), HashMap::new());
        let five_s_ago = dataplane::now_ns().saturating_sub(5_000_000_000);
        let silent = Connection {
            last_seen_ns: five_s_ago,
            ..own()
        };
        let silent_reply = Connection {
            last_seen_ns: five_s_ago,
            server: 1,
            flags: CONN_NAT | CONN_REPLY,
            nat_port: 41000u16.to_be(),
            nat_addr: Ipv4Addr::new(198, 51, 100, 8).into(),
            ..Default::default()
        };
        // Not clearly later (4.5 s idle against 5), or not saying: this ATM's entries stay.
        for idle_ms in [4_500, IDLE_UNKNOWN] {
            store.insert(client_key(), silent);
            store.insert(reply_key(), silent_reply);
            put(
                &mut store,
                &plane,
                SyncRecord {
                    idle_ms,
                    ..record(EVENT_OPEN, CONN_NAT)
                },
            );
            assert_eq!(store[&client_key()], silent, "idle {idle_ms} ms");
            assert_eq!(store[&reply_key()], silent_reply, "idle {idle_ms} ms");
        }
        // A closed connection never prevails, however late it was seen.
        put(
            &mut store,
            &plane,
            SyncRecord {
                idle_ms: 500,
                ..record(EVENT_OPEN, CONN_NAT | CONN_FIN)
            },
        );
        assert_eq!(store[&client_key()], silent);
        // Seen 3.5 s after this ATM's last packet, and live: the record's connection
        // prevails, on both legs.
        put(
            &mut store,
            &plane,
            SyncRecord {
                idle_ms: 500,
                ..record(EVENT_OPEN, CONN_NAT)
            },
        );
        let c = store[&client_key()];
        assert_eq!((c.server, c.nat_port), (1, 1500u16.to_be()));
        let back = store[&reply_key()];
        assert_eq!(
            (v4(&back.nat_addr), u16::from_be(back.nat_port)),
            (Ipv4Addr::new(198, 51, 100, 7), 40000)
        );
    }

    #[test]
    fn a_nat66_record_installs_both_legs_and_a_record_of_mixed_families_is_skipped() {
        let (plane, mut store) = (plane(), HashMap::new());
        let v6 = |a: &str| Addr::from(a.parse::<IpAddr>().unwrap());
        let r = SyncRecord {
            client: "[2001:db8:5::7]:40000".parse().unwrap(),
            vip: "[2001:db8::100]:80".parse().unwrap(),
            server: "[2001:db8:1::12]:8080".parse().unwrap(),
            nat: "[2001:db8:1::1]:1500".parse().unwrap(),
            ..record(EVENT_OPEN, CONN_NAT)
        };
        assert_eq!(put(&mut store, &plane, r), (1, 0));
        let key = FlowKey {
            src: v6("2001:db8:5::7"),
            dst: v6("2001:db8::100"),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: lb_common::IPPROTO_TCP,
            _pad: [0; 3],
        };
        let c = store[&key];
        assert_eq!((c.server, c.nat_addr), (2, v6("2001:db8:1::1")));
        let back = store[&FlowKey {
            src: v6("2001:db8:1::12"),
            dst: v6("2001:db8:1::1"),
            sport: 8080u16.to_be(),
            dport: 1500u16.to_be(),
            proto: lb_common::IPPROTO_TCP,
            _pad: [0; 3],
        }];
        assert_eq!(
            (back.flags, back.nat_addr, u16::from_be(back.nat_port)),
            (
                CONN_NAT | CONN_REPLY | CONN_SYNCED,
                v6("2001:db8:5::7"),
                40000
            )
        );
        // An IPv4 client of an IPv6 VIP is no connection the dataplane can have.
        let mut store = HashMap::new();
        let mixed = SyncRecord {
            client: "198.51.100.7:40000".parse().unwrap(),
            ..r
        };
        assert_eq!(put(&mut store, &plane, mixed), (0, 1));
        let mixed = SyncRecord {
            nat: "203.0.113.1:1500".parse().unwrap(),
            ..r
        };
        assert_eq!(put(&mut store, &plane, mixed), (0, 1));
        assert!(store.is_empty());
    }

    impl PersistStore for HashMap<PersistKey, Persist> {
        fn persist(&self, key: &PersistKey) -> Option<Persist> {
            self.get(key).copied()
        }
        fn set_persist(&mut self, key: &PersistKey, p: &Persist) -> Result<(), dataplane::Error> {
            self.insert(*key, *p);
            Ok(())
        }
    }

    #[test]
    fn records_of_a_sticky_services_connections_make_its_persistence_entries() {
        // `plane()`'s, with http sticky by /24.
        let text = "[cluster]\nname = \"c\"\n[[atm]]\nname = \"atm1\"\naddress = \"192.0.2.2\"\n\
                    interface = \"eth0\"\n[nat]\nsubnet = \"203.0.113.0/24\"\n\
                    gateway = \"203.0.113.1\"\n[[service]]\nname = \"other\"\n\
                    vip = \"192.0.2.101\"\nport = 80\n[[service.server]]\nname = \"o1\"\n\
                    address = \"203.0.113.20\"\nport = 80\nmethod = \"nat\"\n\
                    [[service]]\nname = \"http\"\n\
                    vip = \"192.0.2.100\"\nport = 80\npersistence = 60\npersistence_netmask = 24\n\
                    [[service.server]]\nname = \"web1\"\naddress = \"203.0.113.11\"\n\
                    port = 8080\nmethod = \"nat\"\n[[service.server]]\nname = \"web2\"\n\
                    address = \"203.0.113.12\"\nport = 8080\nmethod = \"nat\"\n";
        let c = config::parse(text, std::path::Path::new("/")).unwrap();
        let caps = dataplane::Capacities {
            services: 4,
            servers: 4,
            connections: 64,
        };
        let plane = Plane::new().plan(&c, &caps).unwrap().plane;
        let web2 = plane
            .index(&(
                ("192.0.2.100".parse().unwrap(), 80, lb_common::IPPROTO_TCP),
                "203.0.113.12".parse().unwrap(),
                8080,
            ))
            .unwrap();
        let mut store: HashMap<PersistKey, Persist> = HashMap::new();
        let now = 1_000_000_000_000;
        let mut r = record(EVENT_OPEN, CONN_NAT);
        r.idle_ms = 2_000;
        assert_eq!(
            install_persistence(&mut store, &plane, &[r], now).unwrap(),
            1
        );
        let (&key, &p) = store.iter().next().unwrap();
        assert_eq!(v4(&key.client), Ipv4Addr::new(198, 51, 100, 0), "the /24");
        assert_eq!((p.server, p.last_seen_ns), (web2, now - 2_000_000_000));
        // An older record, a close, or one of a service that is not sticky changes nothing.
        r.idle_ms = 5_000;
        let close = record(EVENT_CLOSE, CONN_NAT | CONN_FIN);
        let mut other = record(EVENT_OPEN, CONN_NAT);
        other.vip = "192.0.2.101:80".parse().unwrap();
        other.server = "203.0.113.20:80".parse().unwrap();
        assert_eq!(
            install_persistence(&mut store, &plane, &[r, close, other], now).unwrap(),
            0
        );
        assert_eq!(store.len(), 1);
        // A later one of another client of the /24 renews it.
        let mut later = record(EVENT_OPEN, CONN_NAT);
        later.client = "198.51.100.200:5000".parse().unwrap();
        assert_eq!(
            install_persistence(&mut store, &plane, &[later], now).unwrap(),
            1
        );
        assert_eq!(store[&key].last_seen_ns, now);

        // The primary's entries, sent as records of their own, make the same entries on a
        // backup that has seen no connection; an entry of a service that is not sticky (a
        // stale one) is not sent.
        let entries: Vec<(PersistKey, Persist)> = store.iter().map(|(k, p)| (*k, *p)).collect();
        let stale = (
            PersistKey {
                client: key.client,
                service: key.service + 1,
            },
            Persist {
                last_seen_ns: now,
                server: web2,
                _pad: 0,
            },
        );
        let sent = persist_records(&[entries[0], stale], &plane.lines(), now + 3_000_000_000);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].client, "198.51.100.0:0".parse().unwrap());
        assert_eq!(sent[0].server, "203.0.113.12:8080".parse().unwrap());
        assert_eq!(sent[0].idle_ms, 3_000);
        let mut backup: HashMap<PersistKey, Persist> = HashMap::new();
        assert_eq!(
            install_persistence(&mut backup, &plane, &sent, now + 3_000_000_000).unwrap(),
            1
        );
        assert_eq!(backup, store);
    }
}
