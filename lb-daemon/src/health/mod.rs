//! Health checks, as TCL has them: every server is pinged (unless `ping = false`) and every
//! service's check (its ASA) runs against each of its servers. `fall` failures in a row take
//! a server line out of the scheduler tables, `rise` successes bring it back. Each probe runs
//! in a task of its own, so a hanging server never delays the others, with a little jitter so
//! probes do not fire in lockstep.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use lb_common::Method;
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use crate::{
    config::{CheckKind, Config, Nat},
    services::{LineKey, line_key},
};

mod http;
pub mod ping;
mod script;
mod tcp;
#[cfg(test)]
mod tests;

pub use ping::PING_ID;

/// One probe's outcome, sent to the daemon's event loop.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub line: LineKey,
    pub ping: bool,
    /// `None`: passed; `Some(reason)`: failed and why.
    pub failure: Option<String>,
    /// For a failed probe, where it went out from: the source address the kernel picks
    /// toward the server, or `None` with no route at all. A backup ATM without an address of
    /// its own in the NAT subnet has no route to NAT servers, or one whose answers come back
    /// through the primary's gateway alias: either way it cannot judge them.
    pub source: Option<IpAddr>,
}

impl Outcome {
    fn new(line: LineKey, ping: bool, failure: Option<String>) -> Outcome {
        let source = failure.as_ref().and_then(|_| source_toward(line.1));
        Outcome {
            line,
            ping,
            failure,
            source,
        }
    }
}

/// The source address this machine would use toward `addr`, `None` without a route.
/// connect(2) on a UDP socket asks the routing table and sends nothing.
fn source_toward(addr: IpAddr) -> Option<IpAddr> {
    let any: IpAddr = if addr.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let s = std::net::UdpSocket::bind((any, 0)).ok()?;
    match s.connect((addr, 9)) {
        Err(e) if e.kind() == std::io::ErrorKind::NetworkUnreachable => None,
        // Another error says nothing about routes: count the failure as usual.
        Err(_) => Some(any),
        Ok(()) => Some(s.local_addr().map_or(any, |a| a.ip())),
    }
}

/// Whether a failed probe says something about the server, seen from this ATM. The primary
/// counts every failure. A backup counts one that went out with a route (`source`), and for
/// a NAT server (`nat`: its subnet) from an address of its own in the NAT subnet: from
/// anywhere else the server's answers go to its gateway, the alias the primary holds.
pub fn failure_counts(source: Option<IpAddr>, primary: bool, nat: Option<&Nat>) -> bool {
    primary
        || source.is_some_and(|src| {
            src.is_unspecified() || nat.is_none_or(|n| n.contains(src) && !n.is_gateway(src))
        })
}

/// Rise/fall bookkeeping for one probe of one line: the pure part, unit-tested.
#[derive(Clone, Debug)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    /// Consecutive passes and failures.
    passes: u32,
    fails: u32,
    healthy: bool,
}

impl Tracker {
    /// Healthy until `fall` failures in a row say otherwise.
    pub fn new(rise: u32, fall: u32) -> Tracker {
        Tracker {
            rise,
            fall,
            passes: 0,
            fails: 0,
            healthy: true,
        }
    }

    /// Already judged `healthy`, for a verdict the first probe decides (`track`).
    pub fn starting(healthy: bool, rise: u32, fall: u32) -> Tracker {
        Tracker {
            healthy,
            ..Tracker::new(rise, fall)
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records a result; returns whether the verdict changed.
    pub fn record(&mut self, ok: bool) -> bool {
        if ok {
            self.fails = 0;
            self.passes += 1;
            if !self.healthy && self.passes >= self.rise {
                self.healthy = true;
                return true;
            }
        } else {
            self.passes = 0;
            self.fails += 1;
            if self.healthy && self.fails >= self.fall {
                self.healthy = false;
                return true;
            }
        }
        false
    }
}

/// A change of a line's health, to log and apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// `reason` of the last failure; `failed` of `fall` probes in a row.
    Down {
        reason: String,
        failed: u32,
        fall: u32,
    },
    Up {
        passed: u32,
    },
}

/// What one probe's outcome did to a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Counted; the line's health changed (`Some`) or did not.
    Counted(Option<Transition>),
    /// Not counted: this ATM is a backup that cannot judge the server from where it stands
    /// (see [`Outcome::source`]), so it keeps the line's last state for whoever it becomes.
    /// `first`: the first such probe of the line (to log once, not at every demotion).
    Unjudged { first: bool },
}

/// A line's health: its ping and its service check must both pass.
#[derive(Clone, Debug)]
pub struct LineHealth {
    ping: Tracker,
    check: Tracker,
    /// A probe was not counted once already (see [`Verdict::Unjudged`]).
    told: bool,
}

impl LineHealth {
    pub fn new(rise: u32, fall: u32) -> LineHealth {
        LineHealth {
            ping: Tracker::new(rise, fall),
            check: Tracker::new(rise, fall),
            told: false,
        }
    }

    pub fn healthy(&self) -> bool {
        self.ping.healthy() && self.check.healthy()
    }

    /// New rise/fall limits (a reload), keeping the verdict and the counts so far.
    pub fn set_limits(&mut self, rise: u32, fall: u32) {
        for t in [&mut self.ping, &mut self.check] {
            t.rise = rise;
            t.fall = fall;
        }
    }

    /// Weighs a probe's result; `counts`: whether a failure seen from here says anything
    /// about the server (the daemon decides: always on the primary).
    pub fn judge(&mut self, o: &Outcome, counts: bool) -> Verdict {
        if o.failure.is_some() && !counts {
            let first = !self.told;
            self.told = true;
            return Verdict::Unjudged { first };
        }
        Verdict::Counted(self.record(o))
    }

    /// Records a probe's result; returns the line's transition, if any.
    fn record(&mut self, o: &Outcome) -> Option<Transition> {
        let before = self.healthy();
        let t = if o.ping {
            &mut self.ping
        } else {
            &mut self.check
        };
        t.record(o.failure.is_none());
        let (passed, fall) = (t.passes, t.fall);
        match (before, self.healthy()) {
            (true, false) => Some(Transition::Down {
                reason: o.failure.clone().unwrap_or_default(),
                failed: fall,
                fall,
            }),
            (false, true) => Some(Transition::Up { passed }),
            _ => None,
        }
    }
}

/// The running probe tasks; dropping it stops them.
pub struct Checks {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Checks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Checks {
    /// Starts every probe the config asks for; outcomes go to `tx`. Returns the tasks and a
    /// line for the log ("N servers pinged, M service checks").
    pub fn start(config: &Config, tx: mpsc::Sender<Outcome>) -> (Checks, String) {
        let mut tasks = Vec::new();
        let (mut pings, mut checks) = (0, 0);
        // One ICMP socket per family, opened only if a server of that family is pinged.
        let wants = |v6: bool| {
            config
                .services
                .iter()
                .flat_map(|s| &s.servers)
                .any(|v| v.ping && v.address.is_ipv6() == v6)
        };
        let ping_clients =
            [false, true].map(|v6| wants(v6).then(|| ping::client(v6).ok()).flatten());
        for s in &config.services {
            for v in &s.servers {
                let line = line_key(s, v);
                let every = Duration::from_millis(s.check.interval_ms as u64);
                let timeout = Duration::from_millis(s.check.timeout_ms as u64);
                if v.ping
                    && let Some(client) = ping_clients[v.address.is_ipv6() as usize].clone()
                {
                    pings += 1;
                    let id = (tasks.len() as u16).wrapping_add(PING_ID);
                    tasks.push(tokio::spawn(run_ping(
                        client,
                        id,
                        line,
                        every,
                        timeout,
                        tx.clone(),
                    )));
                }
                if s.check.kind != CheckKind::None {
                    checks += 1;
                    let kind = s.check.kind.clone();
                    let http = match &kind {
                        CheckKind::Http { https, verify, .. } => http_client(*https && !*verify),
                        _ => None,
                    };
                    // A local server (this ATM) on loopback: it holds the VIP only while
                    // primary, and a backup's check of the VIP would reach the primary.
                    let addr = match (v.method, v.address) {
                        (Method::Local, IpAddr::V4(_)) => Ipv4Addr::LOCALHOST.into(),
                        (Method::Local, IpAddr::V6(_)) => Ipv6Addr::LOCALHOST.into(),
                        (_, a) => a,
                    };
                    let ctx = CheckCtx {
                        service: s.name.clone(),
                        addr,
                        port: v.port,
                    };
                    tasks.push(tokio::spawn(run_check(
                        kind,
                        http,
                        ctx,
                        line,
                        every,
                        timeout,
                        tx.clone(),
                    )));
                }
            }
        }
        let note = if ping_clients.iter().all(Option::is_none) && pings == 0 {
            " (ICMP unavailable: no pings)"
        } else {
            ""
        };
        (
            Checks { tasks },
            format!("Checks started: {pings} server pings, {checks} service checks{note}"),
        )
    }
}

/// A delay of up to 10 % of `every`, different for every task, so probes spread out (the seed
/// mixed as splitmix64 does).
fn jitter(every: Duration, seed: u64) -> Duration {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 27;
    every.mul_f64((z % 1000) as f64 / 10_000.0)
}

fn seed(line: &LineKey, salt: u64) -> u64 {
    let addr = match line.1 {
        IpAddr::V4(a) => u32::from(a) as u64,
        IpAddr::V6(a) => {
            let a = u128::from(a);
            (a as u64) ^ ((a >> 64) as u64)
        }
    };
    addr ^ ((line.2 as u64) << 32) ^ ((line.0.1 as u64) << 48) ^ salt
}

async fn run_ping(
    client: ping::Client,
    id: u16,
    line: LineKey,
    every: Duration,
    timeout: Duration,
    tx: mpsc::Sender<Outcome>,
) {
    let mut pinger = ping::Pinger::new(&client, line.1, id, timeout).await;
    let mut n = 0u64;
    loop {
        tokio::time::sleep(jitter(every, seed(&line, n))).await;
        let started = Instant::now();
        let failure = pinger.once().await;
        n += 1;
        if tx.send(Outcome::new(line, true, failure)).await.is_err() {
            return;
        }
        tokio::time::sleep(every.saturating_sub(started.elapsed())).await;
    }
}

/// What a service check needs to know about its target.
#[derive(Clone, Debug)]
pub(super) struct CheckCtx {
    service: String,
    addr: IpAddr,
    port: u16,
}

/// The HTTP client of the `http` and `https` checks (`accept_invalid`: one that takes any
/// certificate, for `verify = false`), built once per process and shared by every check,
/// from one reload to the next. Building one loads and parses the system's CA certificates:
/// tens of milliseconds of CPU each, which, done by every check task on tokio's two worker
/// threads after each reload, held up the heartbeats that the same threads send and
/// receive, for long enough that a backup took the primary for dead.
fn http_client(accept_invalid: bool) -> Option<reqwest::Client> {
    static CLIENTS: [std::sync::OnceLock<Option<reqwest::Client>>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    CLIENTS[accept_invalid as usize]
        .get_or_init(|| {
            reqwest::Client::builder()
                .danger_accept_invalid_certs(accept_invalid)
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(0)
                .build()
                .ok()
        })
        .clone()
}

async fn run_check(
    kind: CheckKind,
    http: Option<reqwest::Client>,
    ctx: CheckCtx,
    line: LineKey,
    every: Duration,
    timeout: Duration,
    tx: mpsc::Sender<Outcome>,
) {
    let mut n = 0u64;
    loop {
        tokio::time::sleep(jitter(every, seed(&line, 1 << 20 | n))).await;
        let started = Instant::now();
        let failure = match &kind {
            CheckKind::None => None,
            CheckKind::Tcp => tcp::check(&ctx, timeout).await,
            CheckKind::Http {
                https,
                path,
                expect,
                body,
                ..
            } => match &http {
                Some(client) => {
                    let want = http::Want {
                        path,
                        status: *expect,
                        body: body.as_deref(),
                    };
                    http::check(client, &ctx, *https, &want, timeout).await
                }
                None => Some("cannot build an HTTP client".into()),
            },
            CheckKind::Script(p) => script::check(p, &ctx, timeout).await,
        };
        n += 1;
        if tx.send(Outcome::new(line, false, failure)).await.is_err() {
            return;
        }
        tokio::time::sleep(every.saturating_sub(started.elapsed())).await;
    }
}
