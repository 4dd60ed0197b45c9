//! The ATM daemon's life: start-up logged step by step as TCL's clusterserverd does it
//! (reference §7.5.2), idle mode on a bad config, the event loop that owns the dataplane and
//! answers the control surfaces, reloads on SIGHUP, and clean-up on SIGTERM.
//!
//! One task owns all state. The control socket, the FUSE thread and the metrics thread send
//! it requests over a channel; nothing else touches the dataplane.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    net::UdpSocket,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    time::{Instant, MissedTickBehavior, interval, sleep_until},
};
use tracing::{Instrument, Span, error, info, warn};

mod atm;
mod checks;
mod node;
mod notify;
mod peers;
mod reload;
mod restart;
mod role;
mod surfaces;

use peers::track;
pub use restart::Restarted;
use role::{AtmParts, Part};
pub use role::{Role, identify};

use crate::{
    addrs::Net,
    config::{self, Config},
    control::{self, Call, Request, Response},
    dataplane::{AttachMode, Attached, Capacities, Dataplane},
    fuse,
    ha::{Election, Reject, Replay},
    health::{self, LineHealth},
    metrics, neighbours,
    outbox::Outbox,
    services::Plane,
    sync,
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
    /// `--log-file`, for `lb-cli collect`.
    pub log_file: Option<PathBuf>,
    /// `--restarted`: this process is a daemon that re-executed itself (`lb-cli restart`).
    pub restarted: Option<Restarted>,
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

/// NAT source ports handed out to connections (the range the dataplane probes). Below the
/// kernel's own ephemeral ports (32768-60999 unless changed), which this ATM's connections
/// from the NAT address (health checks of NAT servers) use: the dataplane takes a packet to
/// a NAT port as a NAT reply and never hands it to the stack.
pub const NAT_PORTS: (u16, u16) = (1024, 32_767);

/// The loop's own clocks: idle connections swept, NAT exhaustion watched and server
/// neighbours refreshed every 2 s; the dataplane's debug log flushed every 100 ms; new and
/// closed connections streamed to the backups every 20 ms (what a failover can lose).
const SWEEP_EVERY: Duration = Duration::from_secs(2);
const LOG_FLUSH_EVERY: Duration = Duration::from_millis(100);
const SYNC_EVERY: Duration = Duration::from_millis(20);
/// At most this many received messages are taken in before an election deadline is acted
/// on (see the loop).
const DRAIN_BEFORE_DEADLINE: usize = 1024;
/// How often freed heap memory is handed back to the kernel (see [`trim_heap`]).
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Build identity for the start-up log.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const BUILD_DATE: &str = env!("LB_BUILD_DATE");

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
    peer: Option<(IpAddr, u64)>,
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
    /// Where the dataplane keeps its connection state across restarts (`dataplane::kept`).
    kept: Option<std::path::PathBuf>,
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
    vips: Vec<IpAddr>,
    /// The interface whose ARP settings were made quiet for the VIPs, once done.
    arp_quiet: Option<String>,
}

struct Daemon {
    opts: Options,
    config: Config,
    net: Net,
    name: String,
    /// What the config says this machine is.
    role: Role,
    /// What it runs as that.
    part: Part,
    /// In force now (a write to `timeout`, `timeouts` or `debug` changes them until the next
    /// reload).
    timeouts: config::Timeouts,
    debug: bool,
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
    /// The log span of the reload or resize under way: its lines, over many turns of the
    /// loop, begin with its name.
    busy_span: Span,
    /// A SIGHUP came during a reload: read the file again when it is done.
    reload_again: bool,
    /// A reload's writes to the dataplane, applied a few milliseconds at a time.
    applying: Option<reload::Applying>,
    /// Every server address, once each (for neighbour resolution): kept, not recomputed
    /// from a config of up to 65,536 lines every sweep.
    server_addrs: Arc<Vec<IpAddr>>,
    /// The queue to the hook runner.
    hooks: crate::hooks::Hooks,
    /// This ATM cannot be primary (its track addresses do not answer, or it lost quorum):
    /// why, as last told to `notify_fault`.
    fault: Option<String>,
    /// The fingerprint of the config a reload is taking, worked out beside the loop.
    next_fingerprint: Option<u64>,
}

/// A planned handover waiting for its table transfer to be sent.
struct Handover {
    mark: u64,
    target: usize,
    /// The `lb-cli demote` to answer, if it came from one.
    reply: Option<oneshot::Sender<Response>>,
    since: Instant,
    /// Its log span, from the transfer's start to the role's move.
    span: Span,
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
    /// Authentic heartbeats as the receiving task saw them arrive.
    arrivals: crate::ha::Arrivals,
    rejects: HashMap<Reject, u64>,
    last_reject_log: Option<Instant>,
    /// The primary as last logged, to log changes once.
    known_primary: Option<usize>,
    /// Whether this backup asks the next primary it finds for the whole table: at start-up
    /// and after its primary stopped answering, not after this ATM handed over (it sent its
    /// own table then) or stepped down (it asked as it did).
    ask_table: bool,
    /// An `lb-cli promote` waiting for the primary to hand over.
    pending_promote: Option<(oneshot::Sender<Response>, Instant)>,
    /// Our interface's MAC and index, for NAT reply legs installed from sync records.
    local: sync::Local,
    /// Config fingerprints: ours, and the last each other ATM sent (by index).
    fingerprint: u64,
    configs: Vec<Option<u64>>,
    /// Heartbeat ticks so far: the fingerprint goes out about once a second.
    ticks: u64,
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

    let (config, role, name) = loop {
        match load(&opts, &local) {
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
        timeouts: config.cluster.timeouts,
        debug: config.cluster.debug,
        opts,
        config,
        net,
        name,
        role,
        part: Part::Starting,
        checks_tx,
        health: HashMap::new(),
        marks_tx,
        jobs_tx,
        busy: None,
        busy_span: Span::none(),
        reload_again: false,
        applying: None,
        server_addrs: Arc::default(),
        hooks: crate::hooks::Hooks::start(),
        fault: None,
        next_fingerprint: None,
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
    if d.part.atm().is_some() {
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
    }
    if let Some(addr) = d.metrics_addr()? {
        match metrics::serve(addr, tx.clone()) {
            Ok(()) => info!("Metrics at http://{addr}/metrics"),
            // A real server's metrics are lb_decap's counters: not worth failing for.
            Err(e) if d.part.node().is_some() => warn!("Cannot serve metrics on {addr}: {e}"),
            Err(e) => return Err(e).with_context(|| format!("serving metrics on {addr}")),
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let mut sweep = interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut logs = interval(LOG_FLUSH_EVERY);
    logs.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut heartbeat = interval(Duration::from_millis(d.config.ha.heartbeat_ms as u64));
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sync_events = interval(SYNC_EVERY);
    sync_events.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Backups must see live connections refreshed well within the shortest idle timeout
    // (closing ones may expire there first: they are ending).
    let mut full_sync = interval(Duration::from_secs(
        (d.config.shortest_idle_timeout() as u64 / 3).clamp(2, 60),
    ));
    full_sync.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (udp_tx, mut udp_rx) = mpsc::channel::<(Vec<u8>, SocketAddr)>(1024);
    if let Some((sock, key, arrivals)) = d
        .part
        .ha()
        .and_then(|h| Some((h.socket.clone()?, h.key.clone()?, h.arrivals.clone())))
    {
        let (cluster, me) = (d.config.cluster.name.clone(), d.role_index());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                // Heartbeats count from here, however long the loop takes to read them.
                arrivals.note(&cluster, &key, me, &buf[..n], Instant::now());
                if udp_tx.send((buf[..n].to_vec(), from)).await.is_err() {
                    return;
                }
            }
        });
    }
    tokio::spawn(async {
        let mut every = interval(TRIM_EVERY);
        every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let _ = crate::background(trim_heap).await;
        }
    });
    let (track_tx, mut track_rx) = mpsc::channel::<bool>(4);
    if d.part.atm().is_some() && !d.config.ha.track.is_empty() {
        tokio::spawn(track(d.config.ha.track.clone(), track_tx));
    }
    let mut restart = None;
    loop {
        // Wake when the election's clock runs out (a peer's dead interval), not only at ticks.
        let deadline = d
            .part
            .ha()
            .and_then(|h| h.election.next_deadline(Instant::now()));
        tokio::select! {
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                let _b = Busy::new("the election's deadline");
                // What has come in already counts first: after a turn that held the loop,
                // the heartbeat that keeps a peer alive may be waiting behind the deadline.
                for _ in 0..DRAIN_BEFORE_DEADLINE {
                    let Ok((bytes, from)) = udp_rx.try_recv() else { break };
                    d.on_datagram(&bytes, from).await;
                }
                d.on_election_deadline().await;
            }
            Some((req, reply)) = rx.recv() => {
                let _b = Busy::new("a control request");
                if req == Request::Promote {
                    d.promote(reply).await;
                } else if req == Request::Demote {
                    d.demote(reply).await;
                } else if req == Request::Restart {
                    d.begin_restart(reply).await;
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
            _ = heartbeat.tick(), if d.part.ha().is_some() => {
                let _b = Busy::new("the heartbeat");
                d.on_heartbeat_tick().await
            }
            _ = sync_events.tick(), if d.part.atm().is_some() => {
                let _b = Busy::new("connection sync");
                d.sync_tick().await
            }
            _ = full_sync.tick(), if d.part.atm().is_some() => {
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
                let act = d.part.ha_mut().and_then(|h| h.election.set_eligible(ok, Instant::now()));
                // The fault's hook first, as keepalived's MASTER -> FAULT -> BACKUP and
                // FAULT -> BACKUP -> MASTER: then the role's.
                d.look_at_fault();
                if let Some(a) = act {
                    d.act(a).await;
                }
            }
            _ = hup.recv() => {
                info!("Received SIGHUP: re-reading {}", d.opts.config.display());
                d.begin_reload(None);
            }
            Some(job) = jobs_rx.recv() => {
                let _b = Busy::new(job.what());
                let span = d.busy_span.clone();
                match job {
                reload::Job::Parsed { config, fingerprint, reply } => d.on_parsed(config, fingerprint, reply).instrument(span).await,
                reload::Job::Prepared { result, reply } => d.on_prepared(result, reply).instrument(span).await,
                reload::Job::Restart { checked, reply } => {
                    if let Some(plan) = d.on_restart_checked(*checked, reply) {
                        restart = Some(plan);
                        break;
                    }
                }
                reload::Job::Drained { generation, indices, dropped } => {
                    d.on_drained(generation, indices, dropped)
                }
                reload::Job::Checks { health, checks, note, addrs } => {
                    info!("{note}");
                    d.health = health;
                    if let Some(slot) = d.part.checks_mut() {
                        *slot = Some(checks);
                    }
                    d.server_addrs = Arc::new(addrs);
                    // New servers must be resolved before XDP can reach them.
                    let addrs = d.server_addrs();
                    crate::background(move || neighbours::request(&addrs));
                }
            }},
            // Always ready while a reload's writes remain: one bounded step per turn, with
            // every other branch served in between.
            _ = std::future::ready(()), if d.applying.is_some() => {
                let _b = Busy::new("a reload step");
                let span = d.busy_span.clone();
                d.apply_step().instrument(span).await
            }
            _ = term.recv() => { info!("Received SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("Received SIGINT: stopping"); break; }
            _ = sweep.tick() => {
                let _b = Busy::new("the sweep");
                d.sweep()
            }
            _ = logs.tick() => {
                let _b = Busy::new("the dataplane's log");
                if let Some(a) = d.part.atm_mut() {
                    a.dp.flush_log();
                }
            }
        }
    }
    if let Some(plan) = restart {
        // Returns only if the binary could not be executed.
        return Err(d.re_exec(plan, &socket, _mount));
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    d.stop().await;
    drop(_mount);
    let _ = std::fs::remove_file(&socket);
    info!("Stopped");
    Ok(())
}

/// Warns when one turn of the event loop held it for longer than [`BUSY_LIMIT`], naming what
/// it did: the loop sends the heartbeats, so a long turn delays them. The warning says how
/// much of that time the thread ran: the rest it waited, for a CPU or a lock.
struct Busy {
    what: &'static str,
    since: Instant,
    cpu: Duration,
}

/// A turn of the event loop longer than this is logged (a heartbeat interval is 100 ms by
/// default).
const BUSY_LIMIT: Duration = Duration::from_millis(50);

/// The CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

impl Busy {
    fn new(what: &'static str) -> Self {
        Busy {
            what,
            since: Instant::now(),
            cpu: thread_cpu(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let took = self.since.elapsed();
        if took > BUSY_LIMIT {
            let ran = thread_cpu().saturating_sub(self.cpu);
            warn!(
                "The event loop was busy for {} ms with {} ({} ms of it running; heartbeats \
                 wait meanwhile)",
                took.as_millis(),
                self.what,
                ran.as_millis()
            );
        }
    }
}

/// Reads the config and finds this machine in it, logging every problem.
fn load(
    opts: &Options,
    local: &[crate::addrs::IfAddr],
) -> std::result::Result<(Config, Role, String), ()> {
    let addrs: Vec<IpAddr> = local.iter().map(|a| a.addr).collect();
    match config::load(&opts.config) {
        Err(problems) => {
            for p in problems {
                error!("{}: {p}", opts.config.display());
            }
            Err(())
        }
        Ok(c) => match identify(&c, &addrs, opts.node.as_deref())
            .and_then(|(role, name)| role::foreign_claims(&c, &role, local).map(|()| (role, name)))
        {
            Ok((role, name)) => Ok((c, role, name)),
            Err(e) => {
                error!("{}: {e}", opts.config.display());
                Err(())
            }
        },
    }
}

/// Hands the heap's free pages back to the kernel. The daemon's background work (full
/// syncs, listings, sweeps, reloads) builds table-sized buffers on tokio's blocking pool;
/// glibc gives each of those threads an arena of its own, and an arena keeps the pages of
/// freed buffers, so resident memory would settle at every arena's high-water mark. Run on
/// the blocking pool: it walks every arena.
fn trim_heap() {
    // SAFETY: malloc_trim only takes an integer and works on the allocator's own state.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}
