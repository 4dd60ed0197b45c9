//! The ATM daemon's life: start-up logged step by step as TCL's clusterserverd does it
//! (reference §7.5.2), idle mode on a bad config, the event loop that owns the dataplane and
//! answers the control surfaces, reloads on SIGHUP, and clean-up on SIGTERM.
//!
//! One task owns all state. The control socket, the FUSE thread and the metrics thread send
//! it requests over a channel; nothing else touches the dataplane.

use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use lb_common::{
    CONN_FIN, CONN_REPLY, CONN_RST, Connection, FlowKey, Method, SETTINGS_ACTIVE, SETTINGS_SYNC,
    Settings, Stat,
};
use log::{error, info, warn};
use serde_json::json;
use tokio::{
    net::UdpSocket,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    time::{Instant, MissedTickBehavior, interval, sleep_until},
};

mod node;
mod reload;

use crate::{
    addrs::{self, IfAddr, NAT_LABEL, Net, VIP_LABEL},
    config::{self, Config},
    control::{self, Call, Request, Response, ServerAction},
    dataplane::{self, AttachMode, Attached, Capacities, Dataplane},
    fuse,
    ha::{self, Action, Body, Election, Reject, Replay},
    health::{self, Checks, LineHealth, Transition, Verdict},
    metrics, neighbours,
    outbox::{Link, Outbox},
    services::{Plane, svc_key, v4},
    sync,
    tables::{self, ConnLine, StatLine, Table, Write},
};

/// The command line, as main.rs parsed it.
#[derive(Clone, Debug)]
pub struct Options {
    pub config: PathBuf,
    /// Which machine of the config this is, when its addresses do not say.
    pub node: Option<String>,
    pub socket: Option<PathBuf>,
    pub mount: Option<PathBuf>,
    /// "off" disables.
    pub metrics: Option<String>,
    /// How lb_xdp is attached: driver mode where the driver has it (auto), or forced.
    pub xdp_mode: AttachMode,
}

/// How long a handover may take to send the connection table (paced at about 150,000
/// connections a second) before it is abandoned, and how long `lb-cli promote` waits.
pub const HANDOVER_LIMIT: Duration = Duration::from_secs(30);
const PROMOTE_WAIT: Duration = Duration::from_secs(32);

/// How long a new primary drops, rather than resets, NAT packets of connections it does not
/// know: the entries of the old primary's last connections may still be on their way. In a
/// planned handover, also how long the two ATMs cover for each other: both forward, and each
/// sends the other the packets of connections it does not know (`Settings::peer_addr`).
const SETTLE: Duration = Duration::from_secs(2);

/// When a new primary sends its gratuitous ARPs, from the moment it holds the addresses.
/// Three at once, 100 ms apart, move every neighbour that hears one. The later ones are for
/// neighbours that did not: an announcement lost on a busy segment, a stack that ignores an
/// update within `locktime` (1 s on Linux) of the last, or an entry a killed primary's kernel
/// answered for until its dataplane fenced the VIP (its lease, twice the dead interval, may
/// outlast the first three). Spaced out, they cost nothing; after 4 s the dead ATM is fenced
/// and a neighbour's own probes find the new primary.
const ANNOUNCE_AT: [Duration; 6] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// Calls `round` with each round's number at each of the offsets `at` from now.
async fn rounds_at(at: &[Duration], mut round: impl FnMut(usize)) {
    let start = tokio::time::Instant::now();
    for (i, t) in at.iter().enumerate() {
        tokio::time::sleep_until(start + *t).await;
        round(i);
    }
}

/// NAT source ports handed out to connections (the range the dataplane probes). Below the
/// kernel's own ephemeral ports (32768-60999 unless changed), which this ATM's connections
/// from the NAT address (health checks of NAT servers) use: the dataplane takes a packet to
/// a NAT port as a NAT reply and never hands it to the stack.
pub const NAT_PORTS: (u16, u16) = (1024, 32_767);

/// Build identity for the start-up log.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const BUILD_DATE: &str = env!("LB_BUILD_DATE");

/// What this machine is in the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The ATM at this position of the config's [[atm]] list.
    Atm(usize),
    /// A real server with this address.
    Node(Ipv4Addr),
}

/// Finds this machine in the config: `--node NAME` (an ATM or server name), else the first
/// ATM whose address is local, else a server whose address is local.
pub fn identify(
    config: &Config,
    local: &[Ipv4Addr],
    node: Option<&str>,
) -> Result<(Role, String), String> {
    if let Some(name) = node {
        if let Some(i) = config.atms.iter().position(|a| a.name == name) {
            return Ok((Role::Atm(i), name.to_string()));
        }
        for s in &config.services {
            if let Some(v) = s.servers.iter().find(|v| v.name == name) {
                return Ok((Role::Node(v.address), name.to_string()));
            }
        }
        return Err(format!(
            "--node {name:?}: no [[atm]] or server of that name in the config"
        ));
    }
    if let Some(i) = config.atms.iter().position(|a| local.contains(&a.address)) {
        return Ok((Role::Atm(i), config.atms[i].name.clone()));
    }
    for s in &config.services {
        if let Some(v) = s.servers.iter().find(|v| local.contains(&v.address)) {
            return Ok((Role::Node(v.address), v.name.clone()));
        }
    }
    Err(format!(
        "this machine ({}) is neither an ATM nor a server in the config: give --node NAME",
        local
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The balancer side of an ATM.
struct Atm {
    index: usize,
    dp: Dataplane,
    plane: Plane,
    /// Interfaces lb_xdp is attached to, and how.
    attached: Vec<(String, Attached)>,
    primary: bool,
    /// Where the NAT gateway alias goes (the interface with an address in the NAT subnet,
    /// else the ATM's interface).
    nat_interface: String,
    /// Dataplane capacities in force (the `config` table; a write changes them).
    caps: Capacities,
    /// After a planned handover: how long this ATM keeps forwarding.
    grace: Option<Grace>,
    /// In a planned handover, the other ATM and the dataplane clock until which packets of
    /// connections this ATM does not know go to it (`Settings::peer_addr`).
    peer: Option<(Ipv4Addr, u64)>,
    /// A sweep of the connection table is running.
    sweeping: Arc<std::sync::atomic::AtomicBool>,
    /// Dataplane clock until which NAT packets of unknown connections are dropped, not
    /// passed (`Settings::settle_until_ns`): set on becoming primary.
    settle_until_ns: u64,
    /// `drop_nat_ports` at the last sweep, and where the current burst of NAT port
    /// exhaustion started (see `watch_nat_ports`).
    nat_drops_seen: u64,
    nat_burst: Option<u64>,
    /// See `Settings::nat_cursor_base`; drawn anew on becoming primary.
    nat_cursor_base: u32,
    /// Counts the dataplanes this ATM has had (a resize makes a new one): work on the old
    /// one's connection table that reports late is ignored.
    generation: u64,
    /// The gratuitous ARPs of the last promotion, while they go out (`ANNOUNCE_AT`): stopped
    /// when this ATM stops being primary, lest a backup draw clients back to itself.
    announcing: Option<tokio::task::AbortHandle>,
}

/// A former primary's forwarding after a planned handover: clients and servers still reach it
/// until the new primary's gratuitous ARPs have moved them, and connections it made in the
/// last moments are its alone until their records reach the new primary.
struct Grace {
    /// Forward until then: the lease while the new primary has not shown up, and once it
    /// has, `SETTLE` from then, while the two cover for each other.
    until: Instant,
    /// The new primary has been heard.
    overlap: bool,
}

/// The real-server side of a node.
#[derive(Default)]
struct Node {
    /// lb_decap, when this server is in tunnel mode for some service.
    decap: Option<Dataplane>,
    /// The VIPs it holds on `lo`.
    vips: Vec<Ipv4Addr>,
    /// The interface whose ARP settings were made quiet for the VIPs, once done.
    arp_quiet: Option<String>,
}

struct Daemon {
    opts: Options,
    config: Config,
    net: Net,
    name: String,
    role: Role,
    atm: Option<Atm>,
    node: Option<Node>,
    /// In force now (a write to `timeout`/`debug` changes them until the next reload).
    timeout: u32,
    debug: bool,
    /// The election and the messages between ATMs (ATM role only).
    ha: Option<Ha>,
    /// The probe tasks (ATM role only), restarted on reload.
    checks: Option<Checks>,
    /// Where probe outcomes go.
    checks_tx: mpsc::Sender<health::Outcome>,
    /// Rise/fall state of every server line.
    health: HashMap<crate::services::LineKey, LineHealth>,
    /// Where the outbox reports marks reached (the end of a table transfer).
    marks_tx: mpsc::UnboundedSender<(u64, bool)>,
    /// Where work done beside the event loop (reloads, resizes) reports back.
    jobs_tx: mpsc::UnboundedSender<reload::Job>,
    /// A reload or resize under way: a second one is refused, not interleaved.
    busy: Option<&'static str>,
    /// A SIGHUP came during a reload: read the file again when it is done.
    reload_again: bool,
    /// A reload's writes to the dataplane, applied a few milliseconds at a time.
    applying: Option<reload::Applying>,
    /// Every server address, once each (for neighbour resolution): kept, not recomputed
    /// from a config of up to 65,536 lines every sweep.
    server_addrs: Arc<Vec<Ipv4Addr>>,
}

/// A planned handover waiting for its table transfer to be sent.
struct Handover {
    mark: u64,
    target: usize,
    /// The `lb-cli demote` to answer, if it came from one.
    reply: Option<oneshot::Sender<Response>>,
    since: Instant,
}

/// An ATM's part in the election: its state machine and the socket to the other ATMs.
struct Ha {
    election: Election,
    /// Shared secret; `None` for a lone ATM (nobody to talk to).
    key: Option<Vec<u8>>,
    socket: Option<Arc<UdpSocket>>,
    /// The [ha] address of every ATM, by index.
    peers: Vec<SocketAddr>,
    /// Messages to the other ATMs (`None` for a lone ATM).
    out: Option<Outbox>,
    /// Table transfers queued and not yet sent; the last mark handed out; the handover
    /// waiting for its transfer.
    transfers: usize,
    next_mark: u64,
    handover: Option<Handover>,
    replay: Replay,
    rejects: HashMap<Reject, u64>,
    last_reject_log: Option<Instant>,
    /// The primary as last logged, to log changes once.
    known_primary: Option<usize>,
    /// An `lb-cli promote` waiting for the primary to hand over.
    pending_promote: Option<(oneshot::Sender<Response>, Instant)>,
    /// Our interface's MAC and index, for NAT reply legs installed from sync records.
    local: sync::Local,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(opts: Options) -> Result<()> {
    info!("Starting Advanced Traffic Manager daemon");
    info!("lb-daemon version {VERSION} (built {BUILD_DATE})");
    let net = Net::new().context("cannot open a netlink socket")?;
    let local = net.addresses().await.context("listing local addresses")?;
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into());
    let first = local
        .iter()
        .find(|a| !a.addr.is_loopback())
        .map(|a| a.addr.to_string())
        .unwrap_or_else(|| "no address".into());
    info!("Running on {host} ({first})");
    info!("Configuration file: {}", opts.config.display());

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let local_addrs: Vec<Ipv4Addr> = local.iter().map(|a| a.addr).collect();
    let (config, role, name) = loop {
        match load(&opts, &local_addrs) {
            Ok(x) => break x,
            Err(()) => {
                error!("Bad configuration file! Going to idle mode");
                // Started, but idle: systemd must not wait for us, nor restart us.
                let _ = sd_notify::notify(&[
                    sd_notify::NotifyState::Ready,
                    sd_notify::NotifyState::Status(
                        "idle: bad configuration file (fix it and send SIGHUP)",
                    ),
                ]);
                tokio::select! {
                    _ = hup.recv() => info!("Received SIGHUP: re-reading {}", opts.config.display()),
                    _ = term.recv() => { info!("Received SIGTERM in idle mode: stopping"); return Ok(()); }
                    _ = int.recv() => { info!("Received SIGINT in idle mode: stopping"); return Ok(()); }
                }
            }
        }
    };
    info!(
        "Configuration OK: cluster {:?}, {} services, this is {name}",
        config.cluster.name,
        config.services.len()
    );

    let (checks_tx, mut checks_rx) = mpsc::channel::<health::Outcome>(1024);
    let (marks_tx, mut marks_rx) = mpsc::unbounded_channel::<(u64, bool)>();
    let (jobs_tx, mut jobs_rx) = mpsc::unbounded_channel::<reload::Job>();
    let mut d = Daemon {
        timeout: config.cluster.timeout,
        debug: config.cluster.debug,
        opts,
        config,
        net,
        name,
        role,
        atm: None,
        node: None,
        ha: None,
        checks: None,
        checks_tx,
        health: HashMap::new(),
        marks_tx,
        jobs_tx,
        busy: None,
        reload_again: false,
        applying: None,
        server_addrs: Arc::default(),
    };
    match d.role.clone() {
        Role::Atm(i) => {
            d.start_atm(i, &local).await?;
            d.start_checks();
        }
        Role::Node(addr) => d.start_node(addr).await?,
    }

    // Control surfaces.
    let (tx, mut rx) = mpsc::channel::<Call>(64);
    let socket = d
        .opts
        .socket
        .clone()
        .unwrap_or_else(|| d.config.control.socket.clone());
    let listener = control::bind(&socket)
        .with_context(|| format!("binding the control socket {}", socket.display()))?;
    tokio::spawn(control::serve(listener, tx.clone()));
    info!("Control socket {}", socket.display());
    let mut _mount = None;
    if d.atm.is_some() {
        let path = d
            .opts
            .mount
            .clone()
            .unwrap_or_else(|| d.config.control.mount.clone());
        match fuse::mount(&path, tx.clone()) {
            Ok(m) => {
                info!("Tables mounted at {}", path.display());
                _mount = Some(m);
            }
            Err(e) => warn!(
                "Cannot mount the tables at {}: {e} (lb-cli still works)",
                path.display()
            ),
        }
        if let Some(addr) = d.metrics_addr()? {
            metrics::serve(addr, tx.clone())
                .with_context(|| format!("serving metrics on {addr}"))?;
            info!("Metrics at http://{addr}/metrics");
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let mut sweep = interval(Duration::from_secs(2));
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut logs = interval(Duration::from_millis(100));
    logs.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut heartbeat = interval(Duration::from_millis(d.config.ha.heartbeat_ms as u64));
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sync_events = interval(Duration::from_millis(20));
    sync_events.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Backups must see live connections refreshed well within the timeout.
    let mut full_sync = interval(Duration::from_secs(
        (d.config.cluster.timeout as u64 / 3).clamp(2, 60),
    ));
    full_sync.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (udp_tx, mut udp_rx) = mpsc::channel::<(Vec<u8>, SocketAddr)>(1024);
    if let Some(sock) = d.ha.as_ref().and_then(|h| h.socket.clone()) {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                if udp_tx.send((buf[..n].to_vec(), from)).await.is_err() {
                    return;
                }
            }
        });
    }
    let (track_tx, mut track_rx) = mpsc::channel::<bool>(4);
    if d.atm.is_some() && !d.config.ha.track.is_empty() {
        tokio::spawn(track(d.config.ha.track.clone(), track_tx));
    }
    loop {
        // Wake when the election's clock runs out (a peer's dead interval), not only at ticks.
        let deadline =
            d.ha.as_ref()
                .and_then(|h| h.election.next_deadline(Instant::now()));
        tokio::select! {
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                let _b = Busy::new("the election's deadline");
                d.on_election_deadline().await;
            }
            Some((req, reply)) = rx.recv() => {
                let _b = Busy::new("a control request");
                if req == Request::Promote {
                    d.promote(reply).await;
                } else if req == Request::Demote {
                    d.demote(reply).await;
                } else if req == Request::Reload {
                    d.begin_reload(Some(reply));
                } else if let Some(caps) = d.config_write(&req) {
                    d.begin_resize(caps, Some(reply));
                } else if let Some(job) = d.table_job(&req) {
                    job.run(reply);
                } else {
                    let resp = d.handle(req).await;
                    let _ = reply.send(resp);
                }
            }
            Some((bytes, from)) = udp_rx.recv() => {
                let _b = Busy::new("an ATM message");
                d.on_datagram(&bytes, from).await
            }
            // Held back while a reload rewrites the services: they wait in the channel.
            Some(outcome) = checks_rx.recv(), if d.applying.is_none() => {
                let _b = Busy::new("a probe's outcome");
                d.on_probe(outcome)
            }
            Some((mark, whole)) = marks_rx.recv() => {
                let _b = Busy::new("a sent transfer");
                d.on_transfer_sent(mark, whole).await
            }
            _ = heartbeat.tick(), if d.ha.is_some() => {
                let _b = Busy::new("the heartbeat");
                d.on_heartbeat_tick().await
            }
            _ = sync_events.tick(), if d.atm.is_some() => {
                let _b = Busy::new("connection sync");
                d.sync_tick().await
            }
            _ = full_sync.tick(), if d.atm.is_some() => {
                let _b = Busy::new("a full sync");
                d.periodic_full_sync()
            }
            Some(ok) = track_rx.recv() => {
                let _b = Busy::new("a track outcome");
                if ok {
                    info!("The track addresses answer: this ATM may become primary");
                } else {
                    warn!("A track address does not answer: this ATM may not be primary");
                }
                if let Some(a) = d.ha.as_mut().and_then(|h| h.election.set_eligible(ok, Instant::now())) {
                    d.act(a).await;
                }
            }
            _ = hup.recv() => {
                info!("Received SIGHUP: re-reading {}", d.opts.config.display());
                d.begin_reload(None);
            }
            Some(job) = jobs_rx.recv() => {
                let _b = Busy::new(job.what());
                match job {
                reload::Job::Parsed { config, reply } => d.on_parsed(config, reply).await,
                reload::Job::Prepared { result, reply } => d.on_prepared(result, reply).await,
                reload::Job::Drained { generation, indices, dropped } => {
                    d.on_drained(generation, indices, dropped)
                }
                reload::Job::Checks { health, checks, note, addrs } => {
                    info!("{note}");
                    d.health = health;
                    d.checks = Some(checks);
                    d.server_addrs = Arc::new(addrs);
                    // New servers must be resolved before XDP can reach them.
                    let addrs = d.server_addrs();
                    tokio::task::spawn_blocking(move || neighbours::request(&addrs));
                }
            }},
            // Always ready while a reload's writes remain: one bounded step per turn, with
            // every other branch served in between.
            _ = std::future::ready(()), if d.applying.is_some() => {
                let _b = Busy::new("a reload step");
                d.apply_step().await
            }
            _ = term.recv() => { info!("Received SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("Received SIGINT: stopping"); break; }
            _ = sweep.tick() => {
                let _b = Busy::new("the sweep");
                d.sweep()
            }
            _ = logs.tick() => {
                let _b = Busy::new("the dataplane's log");
                if let Some(a) = d.atm.as_mut() {
                    a.dp.flush_log();
                }
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    d.stop().await;
    drop(_mount);
    let _ = std::fs::remove_file(&socket);
    info!("Stopped");
    Ok(())
}

/// Warns when one turn of the event loop held it for longer than [`BUSY_LIMIT`], naming what
/// it did: the loop sends the heartbeats, so a long turn delays them.
struct Busy {
    what: &'static str,
    since: Instant,
}

/// A turn of the event loop longer than this is logged (a heartbeat interval is 100 ms by
/// default).
const BUSY_LIMIT: Duration = Duration::from_millis(50);

impl Busy {
    fn new(what: &'static str) -> Self {
        Busy {
            what,
            since: Instant::now(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let took = self.since.elapsed();
        if took > BUSY_LIMIT {
            warn!(
                "The event loop was busy for {} ms with {} (heartbeats wait meanwhile)",
                took.as_millis(),
                self.what
            );
        }
    }
}

/// Health state for `config`'s lines (kept from `old` for those that remain) and probes
/// started for them.
fn checks_for(
    config: &Config,
    mut old: HashMap<crate::services::LineKey, LineHealth>,
    tx: &mpsc::Sender<health::Outcome>,
) -> (
    HashMap<crate::services::LineKey, LineHealth>,
    Checks,
    String,
) {
    let mut keep = HashMap::new();
    for s in &config.services {
        let k = svc_key(s);
        for v in &s.servers {
            let line = (k, v.address, v.port);
            let h = match old.remove(&line) {
                Some(mut h) => {
                    h.set_limits(s.check.rise, s.check.fall);
                    h
                }
                None => LineHealth::new(s.check.rise, s.check.fall),
            };
            keep.insert(line, h);
        }
    }
    let (checks, note) = Checks::start(config, tx.clone());
    (keep, checks, note)
}

/// Every server address of `config`, once each.
fn server_addrs(config: &Config) -> Vec<Ipv4Addr> {
    config
        .services
        .iter()
        .flat_map(|s| s.servers.iter().map(|v| v.address))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Warns when the kernel's ephemeral ports overlap the NAT ports: the replies to this ATM's
/// own connections from the NAT address would be dropped as NAT replies without an entry.
fn check_port_range() {
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

/// Reads the config and finds this machine in it, logging every problem.
fn load(opts: &Options, local: &[Ipv4Addr]) -> std::result::Result<(Config, Role, String), ()> {
    match config::load(&opts.config) {
        Err(problems) => {
            for p in problems {
                error!("{}: {p}", opts.config.display());
            }
            Err(())
        }
        Ok(c) => match identify(&c, local, opts.node.as_deref()) {
            Ok((role, name)) => Ok((c, role, name)),
            Err(e) => {
                error!("{}: {e}", opts.config.display());
                Err(())
            }
        },
    }
}

impl Daemon {
    fn metrics_addr(&self) -> Result<Option<SocketAddr>> {
        match self.opts.metrics.as_deref() {
            Some("off") | Some("") => Ok(None),
            Some(a) => Ok(Some(a.parse().map_err(|_| {
                anyhow!("--metrics {a:?} must be ADDRESS:PORT or off")
            })?)),
            None => Ok(self.config.control.metrics),
        }
    }

    fn settings(&self, active: bool) -> Settings {
        let (local, nat) = match &self.role {
            Role::Atm(i) => (
                self.config.atms[*i].address.into(),
                self.config
                    .nat
                    .map(|n| n.gateway.into())
                    .unwrap_or_default(),
            ),
            Role::Node(a) => ((*a).into(), Default::default()),
        };
        let peer = self.atm.as_ref().and_then(|a| a.peer);
        let mut nat_pool = [0u32; lb_common::NAT_POOL_MAX];
        let mut nat_pool_len = 0;
        if let (Role::Atm(_), Some(n)) = (&self.role, self.config.nat) {
            for (slot, a) in nat_pool.iter_mut().zip(n.addresses()) {
                *slot = u32::from_ne_bytes(a.octets());
                nat_pool_len += 1;
            }
        }
        Settings {
            timeout_ns: self.timeout_ns(),
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
            local_addr: local,
            nat_addr: nat,
            nat_port_min: NAT_PORTS.0,
            nat_port_max: NAT_PORTS.1,
            _pad: 0,
            lease_ns: dataplane::now_ns() + self.lease().as_nanos() as u64,
            settle_until_ns: self.atm.as_ref().map_or(0, |a| a.settle_until_ns),
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
            nat_cursor_base: self.atm.as_ref().map_or(0, |a| a.nat_cursor_base),
            peer_addr: peer.map_or(0, |(addr, _)| u32::from_ne_bytes(addr.octets())),
            _pad2: 0,
            peer_until_ns: peer.map_or(0, |(_, until)| until),
        }
    }

    /// How long the dataplane trusts this daemon without hearing from it: twice the time
    /// after which the other ATMs give up on it.
    fn lease(&self) -> Duration {
        Duration::from_millis(
            self.config.ha.heartbeat_ms as u64 * self.config.ha.dead_after as u64 * 2,
        )
    }

    async fn start_atm(&mut self, index: usize, local: &[IfAddr]) -> Result<()> {
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
            .or_else(|| local.iter().find(|a| a.index == ifindex))
        {
            Some(a) => {
                let mask = u32::MAX.checked_shl(32 - a.prefix as u32).unwrap_or(0);
                let net = Ipv4Addr::from(u32::from(a.addr) & mask);
                let bcast = Ipv4Addr::from(u32::from(a.addr) | !mask);
                info!(
                    "Network {net}/{} (broadcast {bcast}) on {}",
                    a.prefix, atm.interface
                );
            }
            None => warn!("{} has no IPv4 address", atm.interface),
        }
        // Read (and a bad key refused) before anything is attached or aliased.
        let key = self.cluster_key()?;
        dataplane::enable_fib_lookup()?;
        let caps = self.config.tables;
        let (dp, attached) = load_dataplane(
            caps,
            &self.interfaces(&atm.interface, local),
            self.opts.xdp_mode,
        )?;
        let nat_interface = self.nat_interface(&atm.interface, local);
        if self.config.nat.is_some() {
            check_port_range();
        }
        for suffix in [VIP_LABEL, NAT_LABEL] {
            for a in self.net.remove_labelled(suffix).await? {
                info!("Removed stale alias {}/{} ({})", a.addr, a.prefix, a.label);
            }
        }
        let mut plane = Plane::new();
        let mut dp = dp;
        plane.apply(&mut dp, &self.config)?;
        dp.set_settings(&self.settings(false))?;
        self.atm = Some(Atm {
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
        });
        self.start_ha(index, ifindex, key).await?;
        info!("Starting as backup ATM");
        info!("Looking for a primary ATM");
        Ok(())
    }

    /// Sets up the election and, with other ATMs, the authenticated socket to them.
    /// The cluster's shared secret when there are other ATMs to talk to, with its file.
    fn cluster_key(&self) -> Result<Option<(Vec<u8>, PathBuf)>> {
        if self.config.atms.len() < 2 {
            return Ok(None);
        }
        let path = self
            .config
            .cluster
            .auth_key_file
            .clone()
            .ok_or_else(|| anyhow!("more than one ATM needs auth_key_file"))?;
        let key = ha::load_key(&path).map_err(|e| anyhow!(e))?;
        Ok(Some((key, path)))
    }

    async fn start_ha(
        &mut self,
        index: usize,
        ifindex: u32,
        key: Option<(Vec<u8>, PathBuf)>,
    ) -> Result<()> {
        let ha_cfg = self.config.ha.clone();
        let n = self.config.atms.len();
        let peers: Vec<SocketAddr> = self
            .config
            .atms
            .iter()
            .map(|a| SocketAddr::from((a.address, ha_cfg.port)))
            .collect();
        let (key, socket) = if let Some((key, path)) = key {
            let sock = UdpSocket::bind(peers[index])
                .await
                .with_context(|| format!("binding the HA socket {}", peers[index]))?;
            info!(
                "Talking to {} other ATMs on UDP port {} (authenticated with {})",
                n - 1,
                ha_cfg.port,
                path.display()
            );
            (Some(key), Some(Arc::new(sock)))
        } else {
            (None, None)
        };
        let mac = self.net.mac(ifindex).await?.unwrap_or_default();
        let out = match (&key, &socket) {
            (Some(key), Some(socket)) => Some(Outbox::start(
                Link {
                    socket: socket.clone(),
                    key: key.clone(),
                    cluster: self.config.cluster.name.clone(),
                    me: index,
                    peers: peers.clone(),
                },
                self.marks_tx.clone(),
            )),
            _ => None,
        };
        self.ha = Some(Ha {
            election: {
                let e = Election::new(
                    index,
                    n,
                    Duration::from_millis(ha_cfg.heartbeat_ms as u64),
                    ha_cfg.dead_after,
                    Instant::now(),
                );
                if ha_cfg.track.is_empty() {
                    e
                } else {
                    info!(
                        "Not standing for primary until the track addresses answer ({})",
                        ha_cfg
                            .track
                            .iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    e.awaiting_track()
                }
            },
            key,
            socket,
            peers,
            out,
            transfers: 0,
            next_mark: 0,
            handover: None,
            replay: Replay::new(n),
            rejects: HashMap::new(),
            last_reject_log: None,
            known_primary: None,
            pending_promote: None,
            local: sync::Local { mac, ifindex },
        });
        Ok(())
    }

    /// The interfaces to attach to: the ATM's, and for two-arm NAT the one with an address in
    /// the NAT subnet.
    fn interfaces(&self, main: &str, local: &[IfAddr]) -> Vec<String> {
        let mut out = vec![main.to_string()];
        let nat_if = self.nat_interface(main, local);
        if nat_if != main {
            out.push(nat_if);
        }
        out
    }

    fn nat_interface(&self, main: &str, local: &[IfAddr]) -> String {
        let Some(nat) = self.config.nat else {
            return main.to_string();
        };
        local
            .iter()
            .filter(|a| {
                nat.contains(a.addr) && a.addr != nat.gateway && !a.label.ends_with(NAT_LABEL)
            })
            .map(|a| a.interface().to_string())
            .next()
            .unwrap_or_else(|| main.to_string())
    }

    /// Every server address of the config (kept from the last reload).
    fn server_addrs(&self) -> Arc<Vec<Ipv4Addr>> {
        self.server_addrs.clone()
    }

    fn vips(&self) -> Vec<Ipv4Addr> {
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
    async fn become_primary(&mut self, from: Option<usize>) -> Result<()> {
        let Role::Atm(i) = self.role else {
            return Ok(());
        };
        let from = from.map(|f| self.config.atms[f].address);
        if let Some(a) = self.atm.as_mut() {
            a.settle_until_ns = dataplane::now_ns() + SETTLE.as_nanos() as u64;
            a.peer = from.map(|addr| (addr, a.settle_until_ns));
            // A fresh place to hand NAT pairs out from (see Settings::nat_cursor_base).
            a.nat_cursor_base = (dataplane::now_ns() ^ (std::process::id() as u64) << 20)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15) as u32;
        }
        let settings = self.settings(true);
        let servers = self.server_addrs();
        let a = self.atm.as_mut().expect("an ATM");
        a.primary = true;
        a.grace = None;
        a.dp.set_settings(&settings)?;
        // Backups keep the servers they have a route to resolved (see sweep), so this rarely
        // has work to do; it must not wait either: failover time is counted in heartbeats.
        neighbours::request(&servers);
        let atm = self.config.atms[i].clone();
        let ifindex =
            addrs::ifindex(&atm.interface).ok_or_else(|| anyhow!("{} is gone", atm.interface))?;
        let label = format!("{}:{VIP_LABEL}", atm.interface);
        for vip in self.vips() {
            self.net.add(ifindex, vip, 32, &label).await?;
            info!("VIP {vip} configured on {label}");
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

    /// The NAT gateway (with the subnet's prefix) and the pool addresses (/32) as aliases on
    /// the NAT interface, labelled `<if>:natg`.
    async fn add_nat_aliases(&self) -> Result<()> {
        let (Some(nat), Some(a)) = (self.config.nat, &self.atm) else {
            return Ok(());
        };
        let nat_if = a.nat_interface.clone();
        let idx = addrs::ifindex(&nat_if).ok_or_else(|| anyhow!("{nat_if} is gone"))?;
        let label = format!("{nat_if}:{NAT_LABEL}");
        self.net.add(idx, nat.gateway, nat.prefix, &label).await?;
        info!(
            "NAT gateway {}/{} configured on {label}",
            nat.gateway, nat.prefix
        );
        let pool: Vec<Ipv4Addr> = nat.addresses().skip(1).collect();
        for p in &pool {
            self.net.add(idx, *p, 32, &label).await?;
        }
        if !pool.is_empty() {
            info!(
                "NAT pool {} configured on {label}",
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
    async fn announce(&mut self, ifindex: u32) {
        let Some(mac) = self.ha.as_ref().map(|h| h.local.mac) else {
            return;
        };
        let mut addrs: Vec<(u32, [u8; 6], Ipv4Addr)> =
            self.vips().into_iter().map(|v| (ifindex, mac, v)).collect();
        if let (Some(nat), Some(a)) = (self.config.nat, &self.atm)
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
                    if let Err(e) = addrs::gratuitous_arp(*i, *mac, *ip)
                        && round == 0
                    {
                        warn!("Gratuitous ARP for {ip}: {e}");
                    }
                }
            })
            .await
        });
        if let Some(a) = self.atm.as_mut()
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
    async fn become_backup(&mut self, to: Option<usize>) -> Result<()> {
        if let Some(task) = self.atm.as_mut().and_then(|a| a.announcing.take()) {
            task.abort();
        }
        for suffix in [VIP_LABEL, NAT_LABEL] {
            for r in self.net.remove_labelled(suffix).await? {
                info!("Removed alias {}/{} ({})", r.addr, r.prefix, r.label);
            }
        }
        let lease = self.lease();
        let to = to.map(|t| self.config.atms[t].address);
        let Some(a) = self.atm.as_mut() else {
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

    /// The new primary of our planned handover is up: forward `SETTLE` more, covering for
    /// it (and it for us) while clients and servers move and the last records cross.
    fn overlap(&mut self, primary: usize, now: Instant) {
        let addr = self.config.atms[primary].address;
        let Some(a) = self.atm.as_mut() else { return };
        let Some(g) = a.grace.as_mut().filter(|g| !g.overlap) else {
            return;
        };
        g.overlap = true;
        g.until = now + SETTLE;
        a.peer = Some((addr, dataplane::now_ns() + SETTLE.as_nanos() as u64));
        if let Err(e) = self.push_settings() {
            warn!("Handing over: {e}");
        }
    }

    /// Sends `body` to ATM `to`, or to every other ATM (ahead of any table transfer).
    fn ha_send(&self, to: Option<usize>, body: Body) {
        if let Some(out) = self.ha.as_ref().and_then(|h| h.out.as_ref()) {
            out.send(to, body);
        }
    }

    fn role_index(&self) -> usize {
        match self.role {
            Role::Atm(i) => i,
            Role::Node(_) => usize::MAX,
        }
    }

    /// Every heartbeat interval: renew the dataplane's lease, let the election look at the
    /// clock, then announce ourselves.
    async fn on_heartbeat_tick(&mut self) {
        if let Err(e) = self.push_settings() {
            warn!("Renewing the dataplane's lease: {e}");
        }
        if let Some(ha) = self.ha.as_mut()
            && let Some((_, since)) = &ha.pending_promote
            && since.elapsed() > PROMOTE_WAIT
        {
            let (reply, _) = ha.pending_promote.take().expect("pending");
            let _ = reply.send(Response::error(format!(
                "the primary did not hand over within {} s",
                PROMOTE_WAIT.as_secs()
            )));
        }
        if let Some(ha) = self.ha.as_mut()
            && ha
                .handover
                .as_ref()
                .is_some_and(|h| h.since.elapsed() > HANDOVER_LIMIT)
        {
            let h = ha.handover.take().expect("pending");
            warn!(
                "Handover abandoned: the connection table was not sent within {} s",
                HANDOVER_LIMIT.as_secs()
            );
            if let Some(r) = h.reply {
                let _ = r.send(Response::error(
                    "the connection table was not sent in time: staying primary",
                ));
            }
        }
        self.look_at_election().await;
        self.send_heartbeat().await;
    }

    /// A peer's dead interval ran out between ticks: let the election look at once, and
    /// announce a promotion without waiting for the next tick.
    async fn on_election_deadline(&mut self) {
        if self.look_at_election().await {
            self.send_heartbeat().await;
        }
    }

    /// Lets the election look at the clock and carries out what it decides; true if it
    /// decided something.
    async fn look_at_election(&mut self) -> bool {
        let now = Instant::now();
        let Some(ha) = self.ha.as_mut() else {
            return false;
        };
        let act = ha.election.tick(now);
        self.note_primary(now);
        match act {
            Some(a) => {
                self.act(a).await;
                true
            }
            None => false,
        }
    }

    async fn send_heartbeat(&mut self) {
        let Some(ha) = self.ha.as_ref() else { return };
        let hb = ha.election.heartbeat(Instant::now());
        self.ha_send(None, Body::Heartbeat(hb));
    }

    /// Logs once when another ATM is seen to become (or stop being) primary.
    fn note_primary(&mut self, now: Instant) {
        let names: Vec<String> = self
            .config
            .atms
            .iter()
            .map(|a| format!("{} ({})", a.name, a.address))
            .collect();
        let Some(ha) = self.ha.as_mut() else { return };
        let p = ha.election.primary_peer(now);
        if p != ha.known_primary {
            match (p, ha.known_primary) {
                (Some(i), _) => info!("ATM {} is primary", names[i]),
                (None, Some(old)) if !ha.election.alive(old, now) => {
                    warn!("Primary ATM {} stopped answering", names[old])
                }
                (None, _) => {}
            }
            ha.known_primary = p;
        }
    }

    /// A datagram on the HA socket.
    async fn on_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        let now = Instant::now();
        let cluster = self.config.cluster.name.clone();
        let me = self.role_index();
        let Some(ha) = self.ha.as_mut() else { return };
        let Some(key) = ha.key.as_ref() else { return };
        let checked = ha::decode(&cluster, key, bytes).and_then(|m| {
            if m.sender as usize >= ha.peers.len() {
                return Err(Reject::Malformed);
            }
            if m.sender as usize == me {
                // Authenticated with our key and naming us: one of our own messages, sent
                // back (a reflection or a replay), not a malformed one.
                return Err(Reject::Replay);
            }
            ha.replay.check(&m).map(|()| m)
        });
        let msg = match checked {
            Ok(m) => m,
            Err(r) => {
                *ha.rejects.entry(r).or_default() += 1;
                // At most one line every 10 s: a flood must not flood the log too.
                if ha
                    .last_reject_log
                    .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
                {
                    ha.last_reject_log = Some(now);
                    warn!(
                        "Refused an ATM message from {from}: {} ({} refused so far)",
                        r.name(),
                        ha.rejects.values().sum::<u64>()
                    );
                }
                return;
            }
        };
        let from_atm = msg.sender as usize;
        match msg.body {
            Body::Heartbeat(hb) => {
                let act = ha.election.on_heartbeat(from_atm, hb, now);
                if hb.role == ha::Role::Primary {
                    self.overlap(from_atm, now);
                }
                if let Some(a) = act {
                    self.act(a).await;
                }
                self.note_primary(now);
            }
            Body::Sync(records) => {
                // From the primary, or (to a new primary) from a former one forwarding in its
                // handover grace; not between two primaries of a split brain.
                let sender_primary = ha
                    .election
                    .peers()
                    .get(from_atm)
                    .and_then(|p| p.heartbeat)
                    .is_some_and(|h| h.role == ha::Role::Primary);
                let accept = ha.election.role() == ha::Role::Backup || !sender_primary;
                let local = ha.local;
                if accept && let Some(a) = self.atm.as_mut() {
                    match sync::install(&mut a.dp, &a.plane, &records, local) {
                        Ok((_, skipped)) if skipped > 0 => {
                            warn!(
                                "Connection sync: {skipped} records name servers this ATM does not have (configs differ?)"
                            )
                        }
                        Ok(_) => {}
                        Err(e) => warn!("Connection sync: {e}"),
                    }
                }
            }
            Body::SyncRequest => {
                if ha.election.role() == ha::Role::Primary {
                    self.full_sync(Some(from_atm));
                }
            }
            Body::Yield => {
                if ha.election.role() == ha::Role::Primary {
                    info!(
                        "ATM {} asks to take over (lb-cli promote)",
                        self.config.atms[from_atm].name
                    );
                    if let Err(e) = self.hand_over(Some(from_atm), None) {
                        warn!("Not handing over: {e}");
                    }
                }
            }
        }
    }

    /// A planned handover to `to`, or the highest-listed running backup: the new primary gets
    /// the whole connection table first. The transfer runs beside the event loop; the
    /// handover itself happens when it has been sent (see `on_transfer_sent`), and `reply`
    /// (an `lb-cli demote`) is answered then.
    fn hand_over(
        &mut self,
        to: Option<usize>,
        reply: Option<oneshot::Sender<Response>>,
    ) -> std::result::Result<(), String> {
        let now = Instant::now();
        let ha = self.ha.as_ref().ok_or("this is not an ATM")?;
        if ha.handover.is_some() {
            return Err("a handover is already under way".into());
        }
        let target = to
            .or_else(|| ha.election.successor(now))
            .ok_or("no other ATM is running to take over: staying primary")?;
        let mark = self
            .full_sync(Some(target))
            .ok_or("cannot send the connection table")?;
        let ha = self.ha.as_mut().expect("an ATM");
        ha.handover = Some(Handover {
            mark,
            target,
            reply,
            since: now,
        });
        Ok(())
    }

    /// A table transfer has been sent (`whole`: all of it): if a handover waited for it, hand
    /// over now, unless the table could not be read or the target is no longer there to
    /// take over (it died or lost its track addresses meanwhile).
    async fn on_transfer_sent(&mut self, mark: u64, whole: bool) {
        let now = Instant::now();
        let Some(ha) = self.ha.as_mut() else { return };
        ha.transfers = ha.transfers.saturating_sub(1);
        if ha.handover.as_ref().is_none_or(|h| h.mark != mark) {
            return;
        }
        let h = ha.handover.take().expect("checked");
        let target = &self.config.atms[h.target].name;
        let act = if !whole {
            Err("the connection table could not be read: staying primary".to_string())
        } else if !ha.election.can_take_over(h.target, now) {
            Err(format!(
                "{target} stopped answering or may not become primary: staying primary"
            ))
        } else {
            ha.election
                .hand_over(Some(h.target), now)
                .ok_or_else(|| "this ATM is no longer primary: nothing to hand over".to_string())
        };
        let answer = match act {
            Ok(a) => {
                let msg = format!("{} handed over to {target}", self.name);
                self.act(a).await;
                Response::text(msg)
            }
            Err(why) => {
                warn!("Handover abandoned: {why}");
                Response::error(why)
            }
        };
        self.send_heartbeat().await;
        if let Some(r) = h.reply {
            let _ = r.send(answer);
        }
    }

    /// Carries out what the election decided.
    async fn act(&mut self, a: Action) {
        match a {
            Action::BecomePrimary { term, reason, from } => {
                info!("Elected primary (term {term}): {reason}");
                if let Err(e) = self.become_primary(from).await {
                    error!("Becoming primary: {e:#}");
                }
                if let Some(ha) = self.ha.as_mut()
                    && let Some((reply, _)) = ha.pending_promote.take()
                {
                    let _ = reply.send(Response::text(format!("{} is primary", self.name)));
                }
                self.send_heartbeat().await;
            }
            Action::BecomeBackup { reason, to } => {
                info!("Becoming backup: {reason}");
                if let Err(e) = self.become_backup(to).await {
                    error!("Becoming backup: {e:#}");
                }
                // A new primary wants our table only if we were primary; a backup asks.
                self.ha_send(None, Body::SyncRequest);
            }
        }
    }

    /// Drains the dataplane's connection events and streams them to the other ATMs. Only a
    /// forwarding dataplane makes events: the primary's, and a former primary's during a
    /// handover's grace (and the last of them just after it), whose connections the new
    /// primary must know, for it now receives the servers' replies.
    async fn sync_tick(&mut self) {
        let Some(a) = self.atm.as_mut() else { return };
        let events = a.dp.drain_events();
        if events.is_empty() {
            return;
        }
        let lines = a.plane.lines();
        let records: Vec<ha::SyncRecord> = events
            .iter()
            .filter_map(|e| sync::from_event(e, &lines.server))
            .collect();
        for chunk in records.chunks(ha::RECORDS_PER_MESSAGE) {
            self.ha_send(None, Body::Sync(chunk.to_vec()));
        }
    }

    /// Queues the whole live connection table for one backup, or all of them, and a mark
    /// after it (returned). The table is read and turned into records on a blocking thread:
    /// with millions of connections that takes long enough to starve the heartbeats.
    fn full_sync(&mut self, to: Option<usize>) -> Option<u64> {
        let timeout_ns = self.timeout_ns();
        let ha = self.ha.as_mut()?;
        let a = self.atm.as_ref()?;
        if ha.election.role() != ha::Role::Primary {
            return None;
        }
        let out = ha.out.clone()?;
        let table = match a.dp.conn_table() {
            Ok(t) => t,
            Err(e) => {
                warn!("Reading the connection table for sync: {e}");
                return None;
            }
        };
        let lines = a.plane.lines();
        ha.next_mark += 1;
        let mark = ha.next_mark;
        ha.transfers += 1;
        tokio::task::spawn_blocking(move || {
            let whole = match table.entries() {
                Ok(all) => {
                    let records =
                        sync::full_table(&all, &lines.server, timeout_ns, dataplane::now_ns());
                    for chunk in records.chunks(ha::RECORDS_PER_MESSAGE) {
                        out.send_bulk(to, Body::Sync(chunk.to_vec()));
                    }
                    true
                }
                Err(e) => {
                    warn!("Reading the connection table for sync: {e}");
                    false
                }
            };
            out.mark(mark, whole);
        });
        Some(mark)
    }

    /// The periodic full table for every backup, unless a transfer is still going out (a
    /// big table on a slow link must not pile up copies of itself).
    fn periodic_full_sync(&mut self) {
        if self.ha.as_ref().is_some_and(|h| h.transfers == 0) {
            self.full_sync(None);
        }
    }

    /// Starts the probes for the config's servers (at start-up).
    fn start_checks(&mut self) {
        let (health, checks, note) = checks_for(
            &self.config,
            std::mem::take(&mut self.health),
            &self.checks_tx,
        );
        info!("{note}");
        self.health = health;
        self.checks = Some(checks);
        self.server_addrs = Arc::new(server_addrs(&self.config));
    }

    /// Restarts the probes after a reload, beside the loop (a config may have 65,536
    /// server lines); health of lines that remain is kept. Until the new probes are in
    /// place ([`reload::Job::Checks`]), outcomes are not judged.
    fn restart_checks(&mut self) {
        let old = self.checks.take();
        let health = std::mem::take(&mut self.health);
        let config = self.config.clone();
        let tx = self.checks_tx.clone();
        let jobs = self.jobs_tx.clone();
        tokio::task::spawn_blocking(move || {
            drop(old);
            let (health, checks, note) = checks_for(&config, health, &tx);
            let addrs = server_addrs(&config);
            let _ = jobs.send(reload::Job::Checks {
                health,
                checks,
                note,
                addrs,
            });
        });
    }

    /// A probe's outcome: rise/fall, and on a transition the tables change and the log says
    /// why, once.
    fn on_probe(&mut self, o: health::Outcome) {
        let Some(h) = self.health.get_mut(&o.line) else {
            return; // a line that left with a reload
        };
        let primary = self.atm.as_ref().is_some_and(|a| a.primary);
        let server = self
            .config
            .services
            .iter()
            .filter(|s| svc_key(s) == o.line.0)
            .flat_map(|s| s.servers.iter())
            .find(|v| v.address == o.line.1 && v.port == o.line.2);
        let name = || server.map(|v| v.name.clone()).unwrap_or_default();
        let nat = self
            .config
            .nat
            .as_ref()
            .filter(|_| server.is_some_and(|v| v.method == Method::Nat));
        let counts = health::failure_counts(o.source, primary, nat);
        let t = match h.judge(&o, counts) {
            Verdict::Counted(Some(t)) => t,
            Verdict::Counted(None) | Verdict::Unjudged { first: false } => return,
            Verdict::Unjudged { first: true } => {
                info!(
                    "{} {}:{} not judged while backup: {}; this ATM has no route to it, or \
                     (a NAT server) no address of its own in the NAT subnet for the answers \
                     to come back to, so it keeps its last state until this ATM is primary",
                    name(),
                    o.line.1,
                    o.line.2,
                    o.failure.as_deref().unwrap_or_default()
                );
                return;
            }
        };
        let name = name();
        let Some(a) = self.atm.as_mut() else { return };
        let healthy = matches!(t, Transition::Up { .. });
        let to_drop = a
            .plane
            .set_state(&mut a.dp, &o.line, |s| s.healthy = healthy, true)
            .unwrap_or_else(|e| {
                error!("Applying the health of {name}: {e}");
                None
            });
        match t {
            Transition::Down {
                reason,
                failed,
                fall,
            } => warn!(
                "{name} {}:{} down: {reason}, {failed} of {fall} failed",
                o.line.1, o.line.2,
            ),
            Transition::Up { passed } => info!(
                "{name} {}:{} up: {passed} checks in a row passed",
                o.line.1, o.line.2
            ),
        }
        if let Some(index) = to_drop {
            self.drop_connections_of(index, format!("{name} {}:{}", o.line.1, o.line.2));
        }
    }

    /// Drops the connections of server index `index` beside the event loop, and logs how
    /// many went, naming the server as `who`.
    fn drop_connections_of(&self, index: u32, who: String) {
        let Some(a) = &self.atm else { return };
        let table = match a.dp.conn_table() {
            Ok(t) => t,
            Err(e) => {
                error!("Dropping the connections of {who}: {e}");
                return;
            }
        };
        tokio::task::spawn_blocking(move || {
            let mut t = table;
            match t.remove_where(|c| c.server == index) {
                Ok(0) => {}
                Ok(dropped) => info!("{who}: {dropped} connections dropped"),
                Err(e) => error!("Dropping the connections of {who}: {e}"),
            }
        });
    }

    async fn stop(&mut self) {
        if self.atm.is_some() {
            if let Err(e) = self.become_backup(None).await {
                error!("Removing aliases: {e}");
            }
            if let Some(a) = self.atm.take() {
                for (i, _) in &a.attached {
                    info!("Detaching lb_xdp from {i}");
                }
            }
        }
        if let Some(n) = self.node.take() {
            // A node keeps its VIP aliases (as TCL does): the servers stay reachable.
            if !n.vips.is_empty() {
                info!("Leaving the VIPs on lo:{VIP_LABEL}");
            }
            if n.decap.is_some() {
                info!("Detaching lb_decap");
            }
        }
    }

    /// Logs NAT port exhaustion once per burst: when new connections start being refused for
    /// want of a free NAT (address, port) toward a server, and when that stops, with the
    /// count (the `drop_nat_ports` counter, in `stat`'s drops, /metrics and `lb-cli status`).
    fn watch_nat_ports(&mut self) {
        let Some(a) = self.atm.as_mut() else { return };
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
    fn sweep(&mut self) {
        let timeout_ns = self.timeout_ns();
        self.watch_nat_ports();
        if self.atm.is_some() {
            let addrs = self.server_addrs();
            tokio::task::spawn_blocking(move || neighbours::request(&addrs));
        }
        let Some(a) = self.atm.as_mut() else { return };
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
        tokio::task::spawn_blocking(move || {
            let _done = done;
            let idle =
                |c: &Connection| dataplane::now_ns().saturating_sub(c.last_seen_ns) > timeout_ns;
            let swept = table.and_then(|mut t| {
                t.remove_where(idle)
                    .map_err(|e| dataplane::Error::Invalid(e.to_string()))
            });
            if let Err(e) = swept {
                warn!("Sweeping connections: {e}");
            }
        });
    }

    async fn handle(&mut self, req: Request) -> Response {
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
            Request::Status => Response::data(self.status()),
            Request::List { what } => match self.list(&what) {
                Ok(v) => Response::data(v),
                Err(e) => Response::error(e),
            },
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
            Request::Metrics => Response::text(metrics::render(&self.snapshot())),
        }
    }

    /// `lb-cli promote`: with a live primary, ask it to hand over (the answer comes when
    /// this ATM is primary); without one, take over at once.
    async fn promote(&mut self, reply: oneshot::Sender<Response>) {
        let now = Instant::now();
        let Some(ha) = self.ha.as_mut() else {
            let _ = reply.send(Response::error("this is not an ATM"));
            return;
        };
        if ha.election.role() == ha::Role::Primary {
            let _ = reply.send(Response::error("this ATM is already primary"));
            return;
        }
        if !ha.election.eligible() {
            let _ = reply.send(Response::error(
                "this ATM may not become primary (it does not reach its track addresses)",
            ));
            return;
        }
        info!("Promotion requested by lb-cli");
        match ha.election.primary_peer(now) {
            Some(p) => {
                ha.pending_promote = Some((reply, now));
                self.ha_send(Some(p), Body::Yield);
            }
            None => {
                match ha.election.force_promote(now) {
                    Some(a) => {
                        ha.pending_promote = Some((reply, now));
                        self.act(a).await;
                    }
                    None => {
                        let _ = reply.send(Response::error("this ATM may not become primary (it does not reach its track addresses)"));
                    }
                }
            }
        }
    }

    /// `lb-cli demote`: hand over to the highest-listed running backup.
    async fn demote(&mut self, reply: oneshot::Sender<Response>) {
        let Some(ha) = self.ha.as_ref() else {
            let _ = reply.send(Response::error("this is not an ATM"));
            return;
        };
        if ha.election.role() != ha::Role::Primary {
            let _ = reply.send(Response::error("this ATM is not primary"));
            return;
        }
        info!("Demotion requested by lb-cli");
        // On success the answer comes when the table has gone and the role has moved.
        let (tx, rx) = oneshot::channel();
        match self.hand_over(None, Some(tx)) {
            Ok(()) => {
                tokio::spawn(async move {
                    let answer = rx.await.unwrap_or_else(|_| {
                        Response::error("the handover was abandoned (see the log)")
                    });
                    let _ = reply.send(answer);
                });
            }
            Err(e) => {
                let _ = reply.send(Response::error(e));
            }
        }
    }

    fn server_admin(
        &mut self,
        action: ServerAction,
        service: &str,
        server: &str,
    ) -> std::result::Result<String, String> {
        let a = self.atm.as_mut().ok_or("this is not an ATM")?;
        let line = a.plane.find_line(service, server)?;
        type Change = Box<dyn FnOnce(&mut crate::services::LineState)>;
        let (f, drop_conns, what): (Change, bool, String) = match action {
            ServerAction::Enable => (
                Box::new(|s| s.admin = Default::default()),
                false,
                "enabled".into(),
            ),
            ServerAction::Disable => (
                Box::new(|s| s.admin.disabled = true),
                true,
                "disabled: out of the tables, its connections dropped".into(),
            ),
            ServerAction::Drain => (
                Box::new(|s| s.admin.weight = Some(0)),
                false,
                "draining: weight 0, existing connections finish".into(),
            ),
            ServerAction::Weight(w) => {
                if !config::WEIGHT_RANGE.contains(&(w as i64)) {
                    return Err(format!("weight {w} is out of range 0..65535"));
                }
                (
                    Box::new(move |s| s.admin.weight = Some(w)),
                    false,
                    format!("weight set to {w}"),
                )
            }
        };
        let to_drop = a
            .plane
            .set_state(&mut a.dp, &line, f, drop_conns)
            .map_err(|e| e.to_string())?;
        let msg = format!("{service}/{server} {}:{} {what}", line.1, line.2);
        info!("Server {msg} (by lb-cli)");
        if let Some(index) = to_drop {
            self.drop_connections_of(index, format!("{service}/{server} {}:{}", line.1, line.2));
        }
        Ok(msg)
    }

    fn role_name(&self) -> &'static str {
        match (&self.role, &self.atm) {
            (Role::Node(_), _) => "node",
            (_, Some(a)) if a.primary => "primary",
            (_, Some(_)) => "backup",
            _ => "idle",
        }
    }

    fn atm_lines(&self) -> Vec<tables::AtmLine> {
        let now = Instant::now();
        self.config
            .atms
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let me = self.role == Role::Atm(i);
                let (role, state, heard) = match (&self.ha, me) {
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
    fn connection_lines(&self) -> std::result::Result<Vec<ConnLine>, dataplane::Error> {
        match (self.conn_view(), &self.atm) {
            (Some(v), Some(a)) => Ok(v.lines(&a.dp.connections()?)),
            _ => Ok(Vec::new()),
        }
    }

    /// What turning table entries into lines needs, owned (for a blocking thread).
    fn conn_view(&self) -> Option<ConnView> {
        let a = self.atm.as_ref()?;
        Some(ConnView {
            timeout_ns: self.timeout_ns(),
            lines: a.plane.lines(),
        })
    }

    fn stat_line(&self) -> std::result::Result<StatLine, dataplane::Error> {
        let mut line = self.stat_base()?;
        if let Some(a) = &self.atm {
            line.active = count_active(&a.dp.connections()?, self.timeout_ns());
        }
        Ok(line)
    }

    /// The `stat` line but for the active connections (which need the whole table).
    fn stat_base(&self) -> std::result::Result<StatLine, dataplane::Error> {
        let Some(a) = &self.atm else {
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
        })
    }

    fn timeout_ns(&self) -> u64 {
        self.timeout as u64 * 1_000_000_000
    }

    /// A request that reads the whole connection table, as work for a blocking thread: the
    /// table may hold millions of entries, and the event loop sends the heartbeats. `None`:
    /// handle it on the loop (it needs no table, or this is not an ATM).
    fn table_job(&self, req: &Request) -> Option<TableJob> {
        let a = self.atm.as_ref()?;
        let timeout_ns = self.timeout_ns();
        let finish: TableFinish = match req {
            Request::Cat { table } if Table::from_name(table) == Some(Table::Connections) => {
                let v = self.conn_view()?;
                Box::new(move |all| Response::text(tables::render_connections(&v.lines(all))))
            }
            Request::Cat { table } if Table::from_name(table) == Some(Table::Stat) => {
                let mut line = self.stat_base().ok()?;
                Box::new(move |all| {
                    line.active = count_active(all, timeout_ns);
                    Response::text(tables::render_stat(&line))
                })
            }
            Request::List { what } if what == "connections" => {
                let v = self.conn_view()?;
                Box::new(move |all| Response::data(connections_json(&v.lines(all))))
            }
            Request::Metrics => {
                let (mut snap, lines) = self.snapshot_base();
                Box::new(move |all| {
                    fill_active(&mut snap, &lines, all, timeout_ns);
                    Response::text(metrics::render(&snap))
                })
            }
            _ => return None,
        };
        Some(TableJob {
            table: a.dp.conn_table().ok()?,
            finish,
        })
    }

    fn cat(&self, t: Table) -> std::result::Result<String, dataplane::Error> {
        Ok(match t {
            Table::Config => tables::render_config(
                &self
                    .atm
                    .as_ref()
                    .map(|a| a.caps)
                    .unwrap_or(self.config.tables),
            ),
            Table::Debug => tables::render_debug(self.debug),
            Table::Timeout => tables::render_timeout(self.timeout),
            Table::Nat => tables::render_nat(self.config.nat.as_ref()),
            Table::Atms => tables::render_atms(&self.atm_lines()),
            Table::Stat => tables::render_stat(&self.stat_line()?),
            Table::Connections => tables::render_connections(&self.connection_lines()?),
            Table::Services => match &self.atm {
                Some(a) => tables::render_services(&a.plane.service_lines(&a.dp)),
                None => String::new(),
            },
            Table::Servers => match &self.atm {
                Some(a) => tables::render_servers(&a.plane.server_lines(&a.dp)),
                None => String::new(),
            },
        })
    }

    fn write(&mut self, t: Table, value: &str) -> std::result::Result<String, String> {
        let w = tables::parse_write(t, value)
            .inspect_err(|e| warn!("Refused write to {}: {e}", t.name()))?;
        if self.atm.is_none() {
            return Err("this is not an ATM: it has no tables to write".into());
        }
        let msg = match w {
            Write::Timeout(s) => {
                self.timeout = s;
                self.push_settings()?;
                format!("Timeout set to {s} s (until the next reload; not saved to the file)")
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
            Write::Config(_) => unreachable!("a write to config answers asynchronously"),
        };
        info!("{msg}");
        Ok(msg)
    }

    /// A write to the `config` table, checked: its new sizes (refused writes are answered
    /// by `handle`).
    fn config_write(&self, req: &Request) -> Option<Capacities> {
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

    /// The settings the dataplane should have now: forwarding while primary, or during a
    /// planned handover's grace.
    fn current_settings(&self) -> Settings {
        let now = Instant::now();
        let primary = self
            .atm
            .as_ref()
            .is_some_and(|a| a.primary || a.grace.as_ref().is_some_and(|g| now < g.until));
        self.settings(primary)
    }

    fn push_settings(&mut self) -> std::result::Result<(), String> {
        let s = self.current_settings();
        if let Some(a) = self.atm.as_mut() {
            a.dp.set_settings(&s).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        let services: Vec<serde_json::Value> = match &self.atm {
            Some(a) => a
                .plane
                .services()
                .iter()
                .map(|s| {
                    let k = svc_key(s);
                    json!({
                        "name": s.name,
                        "protocol": s.proto_name(),
                        "vip": s.vip.to_string(),
                        "port": s.port,
                        "servers": s.servers.iter().map(|v| {
                            let lk = (k, v.address, v.port);
                            json!({
                                "name": v.name,
                                "address": v.address.to_string(),
                                "port": v.port,
                                "method": v.method.name(),
                                "up": a.plane.up(&lk),
                                "weight": a.plane.weight(&lk, v.weight),
                            })
                        }).collect::<Vec<_>>(),
                    })
                })
                .collect(),
            None => Vec::new(),
        };
        json!({
            "cluster": self.config.cluster.name,
            "name": self.name,
            "role": self.role_name(),
            "atms": self.atm_lines().iter().map(|l| json!({
                "name": l.name, "address": l.address.to_string(), "role": l.role,
                "state": l.state, "last_heard_ms": l.last_heard_ms,
            })).collect::<Vec<_>>(),
            "vips": self.vips().iter().map(|v| v.to_string()).collect::<Vec<_>>(),
            "term": self.ha.as_ref().map(|h| h.election.term()),
            "rejected": self.ha.as_ref().map(|h| Reject::ALL.iter().map(|r| (r.name().to_string(), json!(h.rejects.get(r).copied().unwrap_or(0)))).collect::<serde_json::Map<_, _>>()),
            "nat": self.config.nat.map(|n| json!({
                "addresses": n.addresses().map(|a| a.to_string()).collect::<Vec<_>>(),
                "ports": format!("{}-{}", NAT_PORTS.0, NAT_PORTS.1),
                "port_hold": n.port_hold,
                "time_wait": n.time_wait,
                "exhausted_drops": self.atm.as_ref().and_then(|a| a.dp.stats().ok()).map_or(0, |s| s.get(Stat::DropNatPorts)),
                "exhausted_now": self.atm.as_ref().is_some_and(|a| a.nat_burst.is_some()),
            })),
            "attached": self.atm.as_ref().map(|a| a.attached.iter().map(|(i, m)| json!({"interface": i, "mode": m.name()})).collect::<Vec<_>>()),
            "services": services,
        })
    }

    fn list(&self, what: &str) -> std::result::Result<serde_json::Value, String> {
        let a = self.atm.as_ref().ok_or("this is not an ATM")?;
        match what {
            "services" => {
                let lines = a.plane.service_lines(&a.dp);
                Ok(json!(a.plane.services().iter().zip(lines).map(|(s, l)| json!({
                    "name": s.name, "protocol": s.proto_name(), "vip": s.vip.to_string(), "port": s.port,
                    "scheduler": s.scheduler.name(), "persistence": s.persistence,
                    "state": if l.up { "up" } else { "down" }, "packets": l.packets,
                })).collect::<Vec<_>>()))
            }
            "servers" => {
                let lines = a.plane.server_lines(&a.dp);
                let names = a.plane.services().iter().flat_map(|s| {
                    s.servers
                        .iter()
                        .map(move |v| (s.name.clone(), v.name.clone()))
                });
                Ok(json!(names.zip(lines).map(|((svc, name), l)| json!({
                    "service": svc, "name": name, "protocol": config::proto_name(l.proto),
                    "address": l.server.to_string(), "port": l.port, "vip": l.vip.to_string(), "vport": l.vport,
                    "state": if l.up { "up" } else { "down" }, "weight": l.weight, "method": l.method, "packets": l.packets,
                })).collect::<Vec<_>>()))
            }
            "connections" => Ok(connections_json(
                &self.connection_lines().map_err(|e| e.to_string())?,
            )),
            other => Err(format!(
                "list takes services, servers or connections, not {other:?}"
            )),
        }
    }

    fn snapshot(&self) -> metrics::Snapshot {
        let (mut snap, lines) = self.snapshot_base();
        if let Some(a) = &self.atm
            && let Ok(all) = a.dp.connections()
        {
            fill_active(&mut snap, &lines, &all, self.timeout_ns());
        }
        snap
    }

    /// The metrics but for the active connections (which need the whole table), with, for
    /// each of `snap.servers`, its service's place in `snap.services` and its server index.
    fn snapshot_base(&self) -> (metrics::Snapshot, Vec<(usize, u32)>) {
        let mut snap = metrics::Snapshot {
            node: self.name.clone(),
            role: self.role_name().into(),
            ..Default::default()
        };
        let mut lines = Vec::new();
        if let Some(ha) = &self.ha {
            snap.ha_rejected = Reject::ALL
                .iter()
                .map(|r| (r.name(), ha.rejects.get(r).copied().unwrap_or(0)))
                .collect();
        }
        let Some(a) = &self.atm else {
            return (snap, lines);
        };
        if let Ok(s) = a.dp.stats() {
            snap.stat = Stat::ALL.iter().map(|x| (x.name(), s.get(*x))).collect();
        }
        for s in a.plane.services() {
            let k = svc_key(s);
            let id = a.plane.id(&k).unwrap_or(0);
            let c = a.dp.service_counters(id).unwrap_or_default();
            for v in &s.servers {
                let lk = (k, v.address, v.port);
                let index = a.plane.index(&lk).unwrap_or(u32::MAX);
                let sc = a.dp.server_counters(index).unwrap_or_default();
                lines.push((snap.services.len(), index));
                snap.servers.push(metrics::ServerMetrics {
                    service: s.name.clone(),
                    server: v.name.clone(),
                    address: v.address.to_string(),
                    port: v.port,
                    up: a.plane.up(&lk),
                    weight: a.plane.weight(&lk, v.weight),
                    packets: sc.packets,
                    bytes: sc.bytes,
                    active: 0,
                });
            }
            snap.services.push(metrics::ServiceMetrics {
                name: s.name.clone(),
                vip: s.vip.to_string(),
                port: s.port,
                proto: s.proto_name(),
                up: s.servers.iter().any(|v| {
                    let lk = (k, v.address, v.port);
                    a.plane.up(&lk) && a.plane.weight(&lk, v.weight) > 0
                }),
                packets: c.packets,
                bytes: c.bytes,
                active: 0,
            });
        }
        (snap, lines)
    }
}

/// Finishes a request from the whole connection table, on a blocking thread.
type TableFinish = Box<dyn FnOnce(&[(FlowKey, Connection)]) -> Response + Send>;

/// A request waiting for the connection table (see `Daemon::table_job`).
struct TableJob {
    table: crate::conntable::ConnTable,
    finish: TableFinish,
}

impl TableJob {
    /// Reads the table and answers `reply`, beside the event loop.
    fn run(self, reply: oneshot::Sender<Response>) {
        tokio::task::spawn_blocking(move || {
            let answer = match self.table.entries() {
                Ok(all) => (self.finish)(&all),
                Err(e) => Response::error(format!("reading the connection table: {e}")),
            };
            let _ = reply.send(answer);
        });
    }
}

/// What turning connection entries into table lines needs (see `Daemon::conn_view`).
struct ConnView {
    timeout_ns: u64,
    /// Server index -> its server, and the VIP and port it serves.
    lines: Arc<crate::services::Lines>,
}

impl ConnView {
    /// Live connections as table lines (expired entries left out), sorted.
    fn lines(&self, all: &[(FlowKey, Connection)]) -> Vec<ConnLine> {
        let now = dataplane::now_ns();
        let mut out = Vec::new();
        for (k, c) in all {
            let idle = now.saturating_sub(c.last_seen_ns);
            if idle > self.timeout_ns {
                continue;
            }
            let left = (self.timeout_ns - idle) / 1_000_000_000;
            let line = if c.flags & CONN_REPLY != 0 {
                // The ATM-to-server leg of a NAT connection: our NAT-subnet source.
                ConnLine {
                    proto: k.proto,
                    src: (v4(&k.dst), u16::from_be(k.dport)),
                    vip: self
                        .lines
                        .vip
                        .get(&c.server)
                        .copied()
                        .unwrap_or((Ipv4Addr::UNSPECIFIED, 0)),
                    timeout: left,
                    server: (v4(&k.src), u16::from_be(k.sport)),
                    packets: c.packets,
                }
            } else {
                let (sa, sp) = self
                    .lines
                    .server
                    .get(&c.server)
                    .map(|(a, p, _)| (*a, *p))
                    .unwrap_or((Ipv4Addr::UNSPECIFIED, 0));
                ConnLine {
                    proto: k.proto,
                    src: (v4(&k.src), u16::from_be(k.sport)),
                    vip: (v4(&k.dst), u16::from_be(k.dport)),
                    timeout: left,
                    server: (sa, sp),
                    packets: c.packets,
                }
            };
            out.push(line);
        }
        out.sort();
        out
    }
}

/// `lb-cli list connections`.
fn connections_json(lines: &[ConnLine]) -> serde_json::Value {
    json!(
        lines
            .iter()
            .map(|l| json!({
                "protocol": config::proto_name(l.proto),
                "client": format!("{}:{}", l.src.0, l.src.1),
                "vip": format!("{}:{}", l.vip.0, l.vip.1),
                "timeout": l.timeout,
                "server": format!("{}:{}", l.server.0, l.server.1),
                "packets": l.packets,
            }))
            .collect::<Vec<_>>()
    )
}

fn count_active(all: &[(FlowKey, Connection)], timeout_ns: u64) -> u64 {
    let now = dataplane::now_ns();
    all.iter()
        .filter(|(_, c)| active(c, now, timeout_ns))
        .count() as u64
}

/// Fills the active connections into metrics made by `Daemon::snapshot_base`; `lines`: for
/// each of `snap.servers`, its service's place in `snap.services` and its server index.
fn fill_active(
    snap: &mut metrics::Snapshot,
    lines: &[(usize, u32)],
    all: &[(FlowKey, Connection)],
    timeout_ns: u64,
) {
    let now = dataplane::now_ns();
    let mut by_index: HashMap<u32, u64> = HashMap::new();
    for (_, c) in all.iter().filter(|(_, c)| active(c, now, timeout_ns)) {
        *by_index.entry(c.server).or_default() += 1;
    }
    snap.active_connections = by_index.values().sum();
    for (m, (service, index)) in snap.servers.iter_mut().zip(lines) {
        m.active = by_index.get(index).copied().unwrap_or(0);
        if let Some(svc) = snap.services.get_mut(*service) {
            svc.active += m.active;
        }
    }
}

/// An active connection, for `stat` and the metrics alike: a client's leg (not a NAT reply
/// leg), live, and not closing. Closing ones (FIN or RST seen) stay in `connections` until
/// they time out, as TCL lists them.
fn active(c: &lb_common::Connection, now: u64, timeout_ns: u64) -> bool {
    c.flags & (CONN_REPLY | CONN_FIN | CONN_RST) == 0
        && now.saturating_sub(c.last_seen_ns) <= timeout_ns
}

fn unknown_table(name: &str) -> String {
    format!(
        "no table {name:?}: the tables are {}",
        Table::ALL
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Pings the `track` addresses every second; reports when reaching all of them (two
/// answers in a row) or not (two misses in a row) changes.
async fn track(addrs: Vec<Ipv4Addr>, tx: mpsc::Sender<bool>) {
    let client = match surge_ping::Client::new(&surge_ping::Config::default()) {
        Ok(c) => c,
        Err(e) => {
            error!("Cannot ping the track addresses: {e}");
            let _ = tx.send(false).await;
            return;
        }
    };
    let mut state: Option<bool> = None;
    let mut streak = (0u32, 0u32);
    let mut seq = 0u16;
    loop {
        let mut all = true;
        for (i, a) in addrs.iter().enumerate() {
            let mut p = client
                .pinger(
                    std::net::IpAddr::V4(*a),
                    surge_ping::PingIdentifier(0x4c42 + i as u16),
                )
                .await;
            p.timeout(Duration::from_millis(800));
            if p.ping(surge_ping::PingSequence(seq), &[0u8; 16])
                .await
                .is_err()
            {
                all = false;
            }
        }
        seq = seq.wrapping_add(1);
        streak = if all {
            (streak.0 + 1, 0)
        } else {
            (0, streak.1 + 1)
        };
        // The first round decides (the election waits for it); after that it takes two in
        // a row to change the verdict, so one lost ping moves nothing.
        let now = if state.is_none() {
            Some(all)
        } else if streak.0 >= 2 {
            Some(true)
        } else if streak.1 >= 2 {
            Some(false)
        } else {
            state
        };
        if now != state
            && let Some(v) = now
        {
            state = now;
            if tx.send(v).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Loads the dataplane and attaches lb_xdp to each interface (driver mode where the driver
/// supports it, generic otherwise), logging how.
fn load_dataplane(
    caps: Capacities,
    interfaces: &[String],
    mode: AttachMode,
) -> Result<(Dataplane, Vec<(String, Attached)>)> {
    let mut dp = Dataplane::load(caps).context("loading the dataplane")?;
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
    Ok((dp, attached))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn identify_by_name_then_by_address() {
        let text = r#"
[cluster]
name = "c"
auth_key_file = "/etc/lb/authkey"
[[atm]]
name = "atm1"
address = "192.0.2.2"
interface = "eth0"
[[atm]]
name = "atm2"
address = "192.0.2.3"
interface = "eth0"
[[service]]
name = "http"
vip = "192.0.2.100"
port = 80
[[service.server]]
name = "web1"
address = "192.0.2.11"
"#;
        let c = config::parse(text, std::path::Path::new("/")).unwrap();
        let a2: Ipv4Addr = "192.0.2.3".parse().unwrap();
        let s1: Ipv4Addr = "192.0.2.11".parse().unwrap();
        assert_eq!(
            identify(&c, &[a2], None).unwrap(),
            (Role::Atm(1), "atm2".into())
        );
        assert_eq!(
            identify(&c, &[s1], None).unwrap(),
            (Role::Node(s1), "web1".into())
        );
        assert_eq!(
            identify(&c, &[], Some("atm1")).unwrap(),
            (Role::Atm(0), "atm1".into())
        );
        assert!(identify(&c, &[], None).unwrap_err().contains("--node"));
        assert!(identify(&c, &[], Some("nope")).is_err());
    }
}
