//! The balancer side of an ATM: its dataplane and settings, becoming primary (the VIP and
//! NAT aliases, gratuitous ARPs) and backup, the periodic sweep, and stopping.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use lb_common::{Addr, Connection, FlowKey, SETTINGS_ACTIVE, SETTINGS_SYNC, Settings, Stat};
use tokio::time::Instant;
use tracing::{Instrument, error, info, info_span, warn};

use super::{ANNOUNCE_AT, Atm, AtmParts, Daemon, Grace, NAT_PORTS, Part, Restarted, Role, SETTLE};
use crate::{
    addrs::{self, IfAddr, Mark, NAT_LABEL, VIP_LABEL},
    config,
    dataplane::{self, AttachMode, Attached, Capacities, Dataplane, Kept, kept},
    neighbours,
    services::Plane,
};

/// 2^64 divided by the golden ratio: multiplying by it spreads nearby seeds over the whole
/// range (Fibonacci hashing).
const GOLDEN_RATIO_64: u64 = 0x9e37_79b9_7f4a_7c15;

impl Daemon {
    pub(super) fn settings(&self, active: bool) -> Settings {
        // Each family's own address (the tunnels' outer source), and on an ATM the NAT
        // subnets.
        let (v4, v6, nat) = match &self.role {
            Role::Atm(i) => {
                let atm = &self.config.atms[*i];
                (atm.v4(), atm.v6(), self.config.nat)
            }
            Role::Node(IpAddr::V4(a)) => (Some(*a), None, None),
            Role::Node(IpAddr::V6(a)) => (None, Some(*a), None),
        };
        let peer = self.part.atm().and_then(|a| a.peer);
        let mut nat_pool = [0u32; lb_common::NAT_POOL_MAX];
        let mut nat_pool_len = 0;
        if let Some(n) = nat.and_then(|n| n.v4) {
            for (slot, a) in nat_pool.iter_mut().zip(n.addresses()) {
                *slot = u32::from_ne_bytes(a.octets());
                nat_pool_len += 1;
            }
        }
        Settings {
            timeouts: self.dataplane_timeouts(),
            debug: self.debug as u32,
            flags: if active {
                SETTINGS_ACTIVE
                    | if self.config.atms.len() > 1 {
                        SETTINGS_SYNC
                    } else {
                        0
                    }
            } else {
                0
            },
            local_addr: v4.map(Addr::from).unwrap_or_default(),
            nat_addr: nat
                .and_then(|n| n.v4)
                .map(|n| n.gateway.into())
                .unwrap_or_default(),
            nat_port_min: NAT_PORTS.0,
            nat_port_max: NAT_PORTS.1,
            flow_gen: 0,
            lease_ns: dataplane::now_ns() + self.lease().as_nanos() as u64,
            settle_until_ns: self.part.atm().map_or(0, |a| a.settle_until_ns),
            port_hold_ns: self
                .config
                .nat
                .map_or(0, |n| n.port_hold as u64 * 1_000_000_000),
            time_wait_ns: self
                .config
                .nat
                .map_or(0, |n| n.time_wait as u64 * 1_000_000_000),
            nat_pool,
            nat_pool_len,
            nat_cursor_base: self.part.atm().map_or(0, |a| a.nat_cursor_base),
            peer_addr: match peer {
                Some((IpAddr::V4(addr), _)) => u32::from_ne_bytes(addr.octets()),
                _ => 0,
            },
            peer_addr6: match peer {
                Some((addr @ IpAddr::V6(_), _)) => addr.into(),
                _ => Addr::default(),
            },
            tick_ns: dataplane::tick_ns(),
            // The old primary the even NAT ports, the new one the odd (while both forward).
            nat_stripe: match self.part.atm() {
                Some(a) if a.peer.is_some() => {
                    if a.primary {
                        2
                    } else {
                        1
                    }
                }
                _ => 0,
            },
            peer_until_ns: peer.map_or(0, |(_, until)| until),
            local_addr6: v6.map(Addr::from).unwrap_or_default(),
            nat_addr6: nat
                .and_then(|n| n.v6)
                .map(|n| n.gateway.into())
                .unwrap_or_default(),
        }
    }

    /// How long the dataplane trusts this daemon without hearing from it: twice the time
    /// after which the other ATMs give up on it.
    pub(super) fn lease(&self) -> Duration {
        Duration::from_millis(
            self.config.ha.heartbeat_ms as u64 * self.config.ha.dead_after as u64 * 2,
        )
    }

    pub(super) async fn start_atm(&mut self, index: usize, local: &[IfAddr]) -> Result<()> {
        let atm = self.config.atms[index].clone();
        let ifindex = addrs::ifindex(&atm.interface).ok_or_else(|| {
            anyhow!(
                "interface {} of {} does not exist here",
                atm.interface,
                atm.name
            )
        })?;
        match local
            .iter()
            .find(|a| a.index == ifindex && a.addr == atm.address)
            .or_else(|| {
                local
                    .iter()
                    .find(|a| a.index == ifindex && a.addr.is_ipv4())
            }) {
            Some(a) => {
                // The kernel gives prefixes within the family's length.
                if let Ok(net) = ipnet::IpNet::new(a.addr, a.prefix) {
                    info!(
                        "Network {}/{} (broadcast {}) on {}",
                        net.network(),
                        a.prefix,
                        net.broadcast(),
                        atm.interface
                    );
                }
            }
            None => warn!("{} has no IPv4 address", atm.interface),
        }
        // Read (and a bad key refused) before anything is attached or aliased.
        let key = self.cluster_key()?;
        dataplane::enable_fib_lookup()?;
        // The aliases a daemon that died left go before this one's program is attached: it
        // passes everything until this ATM is primary, and a stack still holding a VIP
        // would answer the connections this dataplane may adopt with resets. A primary that
        // re-executed itself keeps them: its program forwards from the first packet.
        let resumed = match self.opts.restarted {
            Some(Restarted::Primary { term }) => Some(term),
            _ => None,
        };
        if resumed.is_none() {
            for mark in [Mark::Vip, Mark::Nat] {
                for a in self.net.remove_marked(mark).await? {
                    info!("Removed stale alias {}/{} ({})", a.addr, a.prefix, a.label);
                }
            }
        }
        let caps = self.config.tables;
        let kept = kept_dir(&atm.interface);
        let mut dp = load_dataplane(caps, kept.as_deref())?;
        // Kept only if the maps could be pinned there (else the load said why not).
        let kept = kept.filter(|d| d.join(lb_common::maps::CONNECTIONS).exists());
        let nat_interface = self.nat_interface(&atm.interface, local);
        if self.config.nat.is_some() {
            check_port_range();
        }
        // The services and settings are written before the program is attached: its first
        // packet already meets them (after `lb-cli restart`, the first of a primary's).
        let mut plane = Plane::new();
        plane.apply(&mut dp, &self.config)?;
        dp.set_settings(&self.settings(resumed.is_some()))?;
        let attached = attach_dataplane(
            &mut dp,
            &self.interfaces(&atm.interface, local),
            self.opts.xdp_mode,
        )?;
        let atm = Atm {
            index,
            dp,
            plane,
            attached,
            primary: false,
            nat_interface,
            caps,
            grace: None,
            peer: None,
            sweeping: Arc::default(),
            settle_until_ns: 0,
            generation: 0,
            nat_drops_seen: 0,
            nat_burst: None,
            nat_cursor_base: 0,
            announcing: None,
            kept,
        };
        let mut ha = self.start_ha(index, ifindex, key).await?;
        if let Some(term) = resumed {
            ha.election.resume_primary(term, Instant::now());
        }
        self.part = Part::Atm(Box::new(AtmParts {
            atm,
            ha,
            checks: None,
        }));
        if let Some(term) = resumed {
            // The role did not change: no hook runs.
            info!("Resuming as primary ATM (term {term}) after lb-cli restart");
            return self
                .become_primary(None)
                .instrument(info_span!("primary", term))
                .await;
        }
        info!("Starting as backup ATM");
        self.notify_role(false, "start", None);
        info!("Looking for a primary ATM");
        Ok(())
    }

    /// The interfaces to attach to: the ATM's, and for two-arm NAT the one with an address in
    /// the NAT subnet.
    pub(super) fn interfaces(&self, main: &str, local: &[IfAddr]) -> Vec<String> {
        let mut out = vec![main.to_string()];
        let nat_if = self.nat_interface(main, local);
        if nat_if != main {
            out.push(nat_if);
        }
        out
    }

    pub(super) fn nat_interface(&self, main: &str, local: &[IfAddr]) -> String {
        let Some(nat) = self.config.nat else {
            return main.to_string();
        };
        local
            .iter()
            .filter(|a| nat.contains(a.addr) && !nat.is_gateway(a.addr) && !a.is(Mark::Nat))
            .map(|a| a.interface().to_string())
            .next()
            .unwrap_or_else(|| main.to_string())
    }

    /// Every server address of the config (kept from the last reload).
    pub(super) fn server_addrs(&self) -> Arc<Vec<IpAddr>> {
        self.server_addrs.clone()
    }

    pub(super) fn vips(&self) -> Vec<IpAddr> {
        self.config
            .services
            .iter()
            .map(|s| s.vip)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Turns the dataplane on, then takes the VIPs and the NAT gateway. In that order: a
    /// VIP alias on an ATM whose dataplane passes traffic makes the stack answer clients with
    /// resets. `from`: the ATM that handed over (a planned handover), still forwarding for a
    /// moment; until this ATM settles, it gets the packets of connections this one does not
    /// know.
    pub(super) async fn become_primary(&mut self, from: Option<usize>) -> Result<()> {
        let Role::Atm(i) = self.role else {
            return Ok(());
        };
        let from = from.map(|f| self.config.atms[f].address);
        let Some(a) = self.part.atm_mut() else {
            return Ok(());
        };
        a.settle_until_ns = dataplane::now_ns() + SETTLE.as_nanos() as u64;
        a.peer = from.map(|addr| (addr, a.settle_until_ns));
        // A fresh place to hand NAT pairs out from (see Settings::nat_cursor_base).
        a.nat_cursor_base = (dataplane::now_ns() ^ (std::process::id() as u64) << 20)
            .wrapping_mul(GOLDEN_RATIO_64) as u32;
        // Before the settings are worked out: they give a new primary the odd NAT ports of
        // a handover, a backup the even.
        a.primary = true;
        a.grace = None;
        self.push_settings().map_err(|e| anyhow!(e))?;
        let servers = self.server_addrs();
        // Backups keep the servers they have a route to resolved (see sweep), so this rarely
        // has work to do; it must not wait either: failover time is counted in heartbeats.
        neighbours::request(&servers);
        let atm = self.config.atms[i].clone();
        let ifindex =
            addrs::ifindex(&atm.interface).ok_or_else(|| anyhow!("{} is gone", atm.interface))?;
        for vip in self.vips() {
            let prefix = addrs::host_prefix(vip);
            self.net
                .add(ifindex, &atm.interface, vip, prefix, Mark::Vip)
                .await?;
            info!(
                "VIP {vip} configured on {}",
                alias_name(&atm.interface, vip, Mark::Vip)
            );
        }
        if self.config.nat.is_some() {
            self.add_nat_aliases().await?;
            // A backup with no address of its own in the NAT subnet had no route to the NAT
            // servers, so nothing resolved them; with the gateway it has (and, unresolved,
            // their packets would be dropped until the next sweep).
            neighbours::request(&servers);
        }
        info!(
            "This ATM is primary: forwarding for {} services",
            self.config.services.len()
        );
        self.announce(ifindex).await;
        Ok(())
    }

    /// The NAT gateways (with their subnet's prefix) and the pool addresses (/32) as aliases
    /// on the NAT interface: IPv4 ones labelled `<if>:natg`, all with IFA_PROTO `Mark::Nat`.
    pub(super) async fn add_nat_aliases(&self) -> Result<()> {
        let (Some(nat), Some(a)) = (self.config.nat, self.part.atm()) else {
            return Ok(());
        };
        let nat_if = a.nat_interface.clone();
        let idx = addrs::ifindex(&nat_if).ok_or_else(|| anyhow!("{nat_if} is gone"))?;
        let gateways = nat
            .v4
            .map(|n| (IpAddr::from(n.gateway), n.prefix))
            .into_iter()
            .chain(nat.v6.map(|n| (IpAddr::from(n.gateway), n.prefix)));
        for (gateway, prefix) in gateways {
            self.net
                .add(idx, &nat_if, gateway, prefix, Mark::Nat)
                .await?;
            info!(
                "NAT gateway {gateway}/{prefix} configured on {}",
                alias_name(&nat_if, gateway, Mark::Nat)
            );
        }
        let pool: Vec<Ipv4Addr> = nat.v4.iter().flat_map(|n| n.addresses().skip(1)).collect();
        for p in &pool {
            self.net
                .add(idx, &nat_if, (*p).into(), 32, Mark::Nat)
                .await?;
        }
        if !pool.is_empty() {
            info!(
                "NAT pool {} configured on {nat_if}:{NAT_LABEL}",
                pool.iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(())
    }

    /// Gratuitous ARPs for the VIPs and the NAT gateway at each of `ANNOUNCE_AT`, so clients,
    /// routers and servers reach them at this ATM at once, and those that missed the first
    /// soon after.
    pub(super) async fn announce(&mut self, ifindex: u32) {
        let Some(mac) = self.part.ha().map(|h| h.local.mac) else {
            return;
        };
        let mut addrs: Vec<(u32, [u8; 6], IpAddr)> =
            self.vips().into_iter().map(|v| (ifindex, mac, v)).collect();
        if let (Some(nat), Some(a)) = (self.config.nat, self.part.atm())
            && let Some(i) = addrs::ifindex(&a.nat_interface)
        {
            // Two-arm NAT: the gateway lives on the inside interface, with its own MAC.
            let nat_mac = if i == ifindex {
                Some(mac)
            } else {
                self.net.mac(i).await.ok().flatten()
            };
            match nat_mac {
                Some(m) => addrs.extend(nat.addresses().map(|n| (i, m, n))),
                None => warn!(
                    "No MAC for {}: no gratuitous ARP for the NAT gateway",
                    a.nat_interface
                ),
            }
        }
        let task = tokio::spawn(async move {
            rounds_at(&ANNOUNCE_AT, |round| {
                for (i, mac, ip) in &addrs {
                    if let Err(e) = addrs::announce(*i, *mac, *ip)
                        && round == 0
                    {
                        warn!("Announcing {ip} (gratuitous ARP or neighbour advertisement): {e}");
                    }
                }
            })
            .await
        });
        if let Some(a) = self.part.atm_mut()
            && let Some(old) = a.announcing.replace(task.abort_handle())
        {
            old.abort();
        }
    }

    /// Gives up the VIPs and the NAT gateway, then turns the dataplane off. On a planned
    /// handover to `to` the dataplane keeps forwarding (without the aliases) until the new
    /// primary has announced itself and settled (see `Grace`), and sends it the packets of
    /// connections this ATM does not know: clients and servers reach this ATM until the new
    /// primary's gratuitous ARPs move them, some on connections it made.
    pub(super) async fn become_backup(&mut self, to: Option<usize>) -> Result<()> {
        if let Some(task) = self.part.atm_mut().and_then(|a| a.announcing.take()) {
            task.abort();
        }
        for mark in [Mark::Vip, Mark::Nat] {
            for r in self.net.remove_marked(mark).await? {
                info!("Removed alias {}/{} ({})", r.addr, r.prefix, r.label);
            }
        }
        let lease = self.lease();
        let to = to.map(|t| self.config.atms[t].address);
        let Some(a) = self.part.atm_mut() else {
            return Ok(());
        };
        a.primary = false;
        a.grace = to.map(|_| Grace {
            until: Instant::now() + lease,
            overlap: false,
        });
        a.peer = to.map(|addr| (addr, dataplane::now_ns() + lease.as_nanos() as u64));
        self.push_settings().map_err(|e| anyhow!(e))
    }

    pub(super) async fn stop(&mut self) {
        if self.part.atm().is_some()
            && let Err(e) = self.become_backup(None).await
        {
            error!("Removing aliases: {e}");
        }
        match std::mem::replace(&mut self.part, Part::Starting) {
            Part::Atm(p) => {
                for (i, _) in &p.atm.attached {
                    info!("Detaching lb_xdp from {i}");
                }
                // A plain stop ends the connections (the VIPs went above): nothing is kept
                // for a next start.
                let kept = p.atm.kept.clone();
                drop(p);
                if let Some(dir) = kept {
                    match kept::unpin(&dir) {
                        Ok(()) => info!("Removed the connection state kept at {}", dir.display()),
                        Err(e) => warn!("{e}"),
                    }
                }
            }
            Part::Node(n) => {
                // A node keeps its VIP aliases (as TCL does): the servers stay reachable.
                if !n.vips.is_empty() {
                    info!("Leaving the VIPs on lo:{VIP_LABEL}");
                }
                if n.decap.is_some() {
                    info!("Detaching lb_decap");
                }
            }
            Part::Starting => {}
        }
    }

    /// Logs NAT port exhaustion once per burst: when new connections start being refused for
    /// want of a free NAT (address, port) toward a server, and when that stops, with the
    /// count (the `drop_nat_ports` counter, in `stat`'s drops, /metrics and `lb-cli status`).
    pub(super) fn watch_nat_ports(&mut self) {
        let Some(a) = self.part.atm_mut() else { return };
        let Ok(stats) = a.dp.stats() else { return };
        let now = stats.get(Stat::DropNatPorts);
        let since = now.saturating_sub(a.nat_drops_seen);
        match (a.nat_burst, since) {
            (None, 0) => {}
            (None, n) => {
                let ports = NAT_PORTS.1 - NAT_PORTS.0 + 1;
                let addrs = self.config.nat.map_or(1, |n| n.addresses().count());
                warn!(
                    "NAT ports exhausted: {n} new connections refused in the last 2 s: every \
                     (address, port) toward a server is held ({addrs} NAT addresses x {ports} \
                     ports per server); add [nat] pool addresses or servers, or lower \
                     [nat] port_hold or the timeout"
                );
                a.nat_burst = Some(a.nat_drops_seen);
            }
            (Some(_), n) if n > 0 => {}
            (Some(start), _) => {
                info!(
                    "NAT ports available again: {} new connections were refused in that burst",
                    now - start
                );
                a.nat_burst = None;
            }
        }
        a.nat_drops_seen = now;
    }

    /// Deletes connection entries idle past the timeout (the LRU map would only evict them
    /// when full), and asks the kernel to resolve servers it has no MAC for (new ones after
    /// a reload, or entries it dropped): the dataplane cannot start that itself.
    pub(super) fn sweep(&mut self) {
        let expiry = self.expiry();
        self.watch_nat_ports();
        if self.part.atm().is_some() {
            let addrs = self.server_addrs();
            crate::background(move || neighbours::request(&addrs));
        }
        let Some(a) = self.part.atm_mut() else { return };
        // Beside the event loop (the table may be huge), one sweep at a time.
        if a.sweeping.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        /// Clears the flag however the sweep ends.
        struct Done(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Release);
            }
        }
        let done = Done(a.sweeping.clone());
        let table = a.dp.conn_table();
        let loads = a.dp.load_tables();
        crate::background(move || {
            let _done = done;
            let idle = |k: &FlowKey, c: &Connection| {
                expiry
                    .as_ref()
                    .is_some_and(|e| !e.live(k, c, dataplane::now_ns()))
            };
            // The servers' counts before the walk (see `LoadTables`).
            let before = loads.as_ref().ok().map(|l| l.read());
            // Each server's live open connections, counted in the same walk.
            let mut live: std::collections::HashMap<u32, u64> = Default::default();
            let swept = table.and_then(|mut t| {
                t.remove_where_seeing(idle, |c| {
                    if super::surfaces::open_leg(c) {
                        *live.entry(c.server).or_default() += 1;
                    }
                })
                .map_err(|e| dataplane::Error::Invalid(e.to_string()))
            });
            match (swept, loads, before) {
                (Ok(_), Ok(mut loads), Some(before)) => {
                    if let Err(e) = loads.settle(&before, &live) {
                        warn!("Counting the servers' connections: {e}");
                    }
                }
                (Err(e), ..) => warn!("Sweeping connections: {e}"),
                (_, Err(e), _) => warn!("Counting the servers' connections: {e}"),
                _ => {}
            }
        });
    }

    /// The settings the dataplane should have now: forwarding while primary, or during a
    /// planned handover's grace.
    pub(super) fn current_settings(&self) -> Settings {
        let now = Instant::now();
        let primary = self
            .part
            .atm()
            .is_some_and(|a| a.primary || a.grace.as_ref().is_some_and(|g| now < g.until));
        self.settings(primary)
    }

    pub(super) fn push_settings(&mut self) -> std::result::Result<(), String> {
        let s = self.current_settings();
        if let Some(a) = self.part.atm_mut() {
            a.dp.set_settings(&s).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// A primary's aliases follow the config: VIPs that left go, new ones come, and the NAT
    /// gateway moves if `[nat]` changed.
    pub(super) async fn follow_aliases(
        &mut self,
        old_vips: &[IpAddr],
        old_nat: Option<config::Nat>,
    ) -> anyhow::Result<()> {
        let Some(a) = self.part.atm() else {
            return Ok(());
        };
        if !a.primary {
            return Ok(());
        }
        let atm_if = self.config.atms[a.index].interface.clone();
        let ifindex = addrs::ifindex(&atm_if).ok_or_else(|| anyhow::anyhow!("{atm_if} is gone"))?;
        let plan = alias_plan(old_vips, &self.vips(), old_nat, self.config.nat);
        for vip in plan.remove {
            self.net.del(ifindex, vip, addrs::host_prefix(vip)).await?;
            info!(
                "VIP {vip} removed from {}",
                alias_name(&atm_if, vip, Mark::Vip)
            );
        }
        for vip in plan.add {
            self.net
                .add(ifindex, &atm_if, vip, addrs::host_prefix(vip), Mark::Vip)
                .await?;
            info!(
                "VIP {vip} configured on {}",
                alias_name(&atm_if, vip, Mark::Vip)
            );
        }
        if plan.nat_moves {
            for r in self.net.remove_marked(Mark::Nat).await? {
                info!("Removed alias {}/{} ({})", r.addr, r.prefix, r.label);
            }
            self.add_nat_aliases().await?;
        }
        Ok(())
    }
}

/// Calls `round` with each round's number at each of the offsets `at` from now.
pub(super) async fn rounds_at(at: &[Duration], mut round: impl FnMut(usize)) {
    let start = tokio::time::Instant::now();
    for (i, t) in at.iter().enumerate() {
        tokio::time::sleep_until(start + *t).await;
        round(i);
    }
}

/// Warns when the kernel's ephemeral ports overlap the NAT ports: the replies to this ATM's
/// own connections from the NAT address would be dropped as NAT replies without an entry.
pub(super) fn check_port_range() {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let range: Vec<u16> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    if let [lo, hi] = range[..]
        && lo <= NAT_PORTS.1
        && hi >= NAT_PORTS.0
    {
        warn!(
            "The kernel's ephemeral ports ({lo}-{hi}, {path}) overlap the NAT ports ({}-{}): \
             this ATM's own connections from the NAT address may fail; start the range \
             above {}",
            NAT_PORTS.0, NAT_PORTS.1, NAT_PORTS.1
        );
    }
}

/// Where the BPF filesystem is (mounted there if it is not).
const BPFFS: &str = "/sys/fs/bpf";

/// Where this ATM's dataplane keeps its connections across restarts (`dataplane::kept`):
/// `None`, with a warning, if no BPF filesystem can be had. Another version's kept state
/// beside it is removed, and said so.
fn kept_dir(interface: &str) -> Option<PathBuf> {
    let root = Path::new(BPFFS);
    match kept::ensure_bpffs(root).and_then(|()| kept::kept_dir(root, interface)) {
        Ok(dir) => {
            for other in kept::other_versions(&dir) {
                warn!(
                    "Removed the connection state kept at {} by another version of lb-daemon: \
                     this one cannot read it (it keeps {})",
                    other.display(),
                    dir.display()
                );
                let _ = kept::unpin(&other);
            }
            Some(dir)
        }
        Err(e) => {
            warn!("Connections will not be kept across a restart of this daemon: {e}");
            None
        }
    }
}

/// Loads the dataplane (keeping its connection state in `kept`, adopting what a daemon
/// before this one left there) and attaches lb_xdp to each interface (driver mode where the
/// driver supports it, generic otherwise), logging how.
pub(super) fn load_dataplane(caps: Capacities, kept: Option<&Path>) -> Result<Dataplane> {
    let loaded = kept.map(|dir| (dir, Dataplane::load_kept(caps, dir)));
    Ok(match loaded {
        None => Dataplane::load(caps).context("loading the dataplane")?,
        // The directory could not be made or the maps pinned there (a read-only /sys, say):
        // the dataplane runs all the same, keeping nothing.
        Some((dir, Err(e @ dataplane::Error::Io { .. }))) => {
            warn!(
                "Connections will not be kept across a restart of this daemon ({}): {e}",
                dir.display()
            );
            Dataplane::load(caps).context("loading the dataplane")?
        }
        Some((_, Err(e))) => return Err(e).context("loading the dataplane"),
        Some((dir, Ok((dp, found)))) => {
            match found {
                Kept::Fresh => info!("Connection state kept at {}", dir.display()),
                Kept::Adopted { connections } => info!(
                    "Adopted the dataplane state kept at {}: {connections} connection entries",
                    dir.display()
                ),
                Kept::Replaced(why) => warn!(
                    "Did not adopt the connection state kept at {} ({why}): starting with \
                     none",
                    dir.display()
                ),
            }
            dp
        }
    })
}

/// Attaches `dp`'s lb_xdp to each of `interfaces`, in place of whatever XDP program is
/// there: the kernel swaps the programs between two packets.
pub(super) fn attach_dataplane(
    dp: &mut Dataplane,
    interfaces: &[String],
    mode: AttachMode,
) -> Result<Vec<(String, Attached)>> {
    let mut attached = Vec::new();
    for i in interfaces {
        crate::vlan::expose_tags(i);
        let mode = dp.attach(i, mode)?;
        info!(
            "Dataplane loaded: lb_xdp attached to {i} in {} mode",
            mode.name()
        );
        for (iface, why) in dp.take_fallbacks() {
            warn!("Native XDP on {iface} was refused ({why}): generic mode works but is slower");
        }
        if mode == Attached::Generic {
            crate::vlan::no_merged_frames(i);
        }
        attached.push((i.clone(), mode));
    }
    Ok(attached)
}

/// What a primary's aliases do when the config changes (see `follow_aliases`).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct AliasPlan {
    /// VIPs that left the config, to remove.
    pub(super) remove: Vec<IpAddr>,
    /// VIPs that came, to add.
    pub(super) add: Vec<IpAddr>,
    /// `[nat]` changed: the gateway and pool aliases are replaced.
    pub(super) nat_moves: bool,
}

/// From the VIPs and `[nat]` before and after a reload: VIPs that stay are not touched
/// (removing one would cut its connections for a moment).
pub(super) fn alias_plan(
    old_vips: &[IpAddr],
    new_vips: &[IpAddr],
    old_nat: Option<config::Nat>,
    new_nat: Option<config::Nat>,
) -> AliasPlan {
    AliasPlan {
        remove: old_vips
            .iter()
            .filter(|v| !new_vips.contains(v))
            .copied()
            .collect(),
        add: new_vips
            .iter()
            .filter(|v| !old_vips.contains(v))
            .copied()
            .collect(),
        nat_moves: old_nat != new_nat,
    }
}

/// How the log names an alias: `eth0:cs0` for IPv4, the interface for IPv6 (no labels).
pub(super) fn alias_name(interface: &str, addr: IpAddr, mark: Mark) -> String {
    if addr.is_ipv6() {
        interface.to_string()
    } else {
        format!("{interface}:{}", mark.suffix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_moves_only_the_aliases_that_changed() {
        let ip = |o: u8| IpAddr::from([192, 0, 2, o]);
        let nat = |g: u8| {
            Some(config::Nat::new(
                "203.0.113.0".parse().unwrap(),
                24,
                Ipv4Addr::new(203, 0, 113, g),
            ))
        };
        assert_eq!(
            alias_plan(&[ip(100), ip(101)], &[ip(101), ip(102)], nat(1), nat(1)),
            AliasPlan {
                remove: vec![ip(100)],
                add: vec![ip(102)],
                nat_moves: false,
            }
        );
        let same = alias_plan(&[ip(100)], &[ip(100)], nat(1), nat(2));
        assert!(same.remove.is_empty() && same.add.is_empty() && same.nat_moves);
        assert!(alias_plan(&[], &[], None, nat(1)).nat_moves);
        assert!(!alias_plan(&[], &[], None, None).nat_moves);
    }

    #[tokio::test(start_paused = true)]
    async fn announcements_go_out_at_once_then_after_one_two_and_four_seconds() {
        let start = tokio::time::Instant::now();
        let mut at = Vec::new();
        rounds_at(&ANNOUNCE_AT, |i| at.push((i, start.elapsed().as_millis()))).await;
        assert_eq!(
            at,
            vec![(0, 0), (1, 100), (2, 200), (3, 1000), (4, 2000), (5, 4000)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stopped_announcements_send_no_more() {
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn({
            let sent = sent.clone();
            async move {
                rounds_at(&ANNOUNCE_AT, |_| {
                    sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 4);
        task.abort();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 4);
    }
}
