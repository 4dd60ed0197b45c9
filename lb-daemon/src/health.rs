//! Health checks, as TCL has them: every server is pinged (unless `ping = false`) and every
//! service's check (its ASA) runs against each of its servers. `fall` failures in a row take
//! a server line out of the scheduler tables, `rise` successes bring it back. Each probe runs
//! in a task of its own, so a hanging server never delays the others, with a little jitter so
//! probes do not fire in lockstep.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use crate::{
    config::{CheckKind, Config, Nat},
    services::{LineKey, svc_key},
};

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
    pub source: Option<Ipv4Addr>,
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

/// Health-check pings' identifiers start here ("lb", 0x6c62), one per probe: the answers
/// of each probe are its own, and apart from `track`'s.
pub const PING_ID: u16 = 0x6c62;

/// The source address this machine would use toward `addr`, `None` without a route.
/// connect(2) on a UDP socket asks the routing table and sends nothing.
fn source_toward(addr: Ipv4Addr) -> Option<Ipv4Addr> {
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    match s.connect((addr, 9)) {
        Err(e) if e.kind() == std::io::ErrorKind::NetworkUnreachable => None,
        // Another error says nothing about routes: count the failure as usual.
        Err(_) => Some(Ipv4Addr::UNSPECIFIED),
        Ok(()) => match s.local_addr() {
            Ok(std::net::SocketAddr::V4(a)) => Some(*a.ip()),
            _ => Some(Ipv4Addr::UNSPECIFIED),
        },
    }
}

/// Whether a failed probe says something about the server, seen from this ATM. The primary
/// counts every failure. A backup counts one that went out with a route (`source`), and for
/// a NAT server (`nat`: its subnet) from an address of its own in the NAT subnet: from
/// anywhere else the server's answers go to its gateway, the alias the primary holds.
pub fn failure_counts(source: Option<Ipv4Addr>, primary: bool, nat: Option<&Nat>) -> bool {
    primary
        || source.is_some_and(|src| {
            src.is_unspecified() || nat.is_none_or(|n| n.contains(src) && src != n.gateway)
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
        let ping_client = surge_ping::Client::new(&surge_ping::Config::default()).ok();
        for s in &config.services {
            let k = svc_key(s);
            for v in &s.servers {
                let line = (k, v.address, v.port);
                let every = Duration::from_millis(s.check.interval_ms as u64);
                let timeout = Duration::from_millis(s.check.timeout_ms as u64);
                if v.ping
                    && let Some(client) = ping_client.clone()
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
                    let ctx = CheckCtx {
                        service: s.name.clone(),
                        addr: v.address,
                        port: v.port,
                    };
                    tasks.push(tokio::spawn(run_check(
                        kind,
                        ctx,
                        line,
                        every,
                        timeout,
                        tx.clone(),
                    )));
                }
            }
        }
        let note = if ping_client.is_none() && pings == 0 {
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
    u32::from(line.1) as u64 ^ ((line.2 as u64) << 32) ^ ((line.0.1 as u64) << 48) ^ salt
}

async fn run_ping(
    client: surge_ping::Client,
    id: u16,
    line: LineKey,
    every: Duration,
    timeout: Duration,
    tx: mpsc::Sender<Outcome>,
) {
    let mut pinger = client
        .pinger(IpAddr::V4(line.1), surge_ping::PingIdentifier(id))
        .await;
    pinger.timeout(timeout);
    let mut seq = 0u16;
    let mut n = 0u64;
    loop {
        tokio::time::sleep(jitter(every, seed(&line, n))).await;
        let started = Instant::now();
        let failure = match pinger.ping(surge_ping::PingSequence(seq), &[0u8; 16]).await {
            Ok(_) => None,
            Err(surge_ping::SurgeError::Timeout { .. }) => Some(format!(
                "no answer to ping within {} ms",
                timeout.as_millis()
            )),
            Err(e) => Some(format!("ping: {e}")),
        };
        seq = seq.wrapping_add(1);
        n += 1;
        if tx.send(Outcome::new(line, true, failure)).await.is_err() {
            return;
        }
        tokio::time::sleep(every.saturating_sub(started.elapsed())).await;
    }
}

/// What a service check needs to know about its target.
#[derive(Clone, Debug)]
struct CheckCtx {
    service: String,
    addr: Ipv4Addr,
    port: u16,
}

async fn run_check(
    kind: CheckKind,
    ctx: CheckCtx,
    line: LineKey,
    every: Duration,
    timeout: Duration,
    tx: mpsc::Sender<Outcome>,
) {
    let http = match &kind {
        CheckKind::Http { https, verify, .. } => reqwest::Client::builder()
            .timeout(timeout)
            .danger_accept_invalid_certs(*https && !*verify)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .build()
            .ok(),
        _ => None,
    };
    let mut n = 0u64;
    loop {
        tokio::time::sleep(jitter(every, seed(&line, 1 << 20 | n))).await;
        let started = Instant::now();
        let failure = match &kind {
            CheckKind::None => None,
            CheckKind::Tcp => tcp(&ctx, timeout).await,
            CheckKind::Http {
                https,
                path,
                expect,
                body,
                ..
            } => match &http {
                Some(client) => {
                    http_check(client, &ctx, *https, path, *expect, body.as_deref()).await
                }
                None => Some("cannot build an HTTP client".into()),
            },
            CheckKind::Script(p) => script(p, &ctx, timeout).await,
        };
        n += 1;
        if tx.send(Outcome::new(line, false, failure)).await.is_err() {
            return;
        }
        tokio::time::sleep(every.saturating_sub(started.elapsed())).await;
    }
}

async fn tcp(ctx: &CheckCtx, timeout: Duration) -> Option<String> {
    let addr = SocketAddr::from((ctx.addr, ctx.port));
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("tcp connect: {e}")),
        Err(_) => Some(format!(
            "tcp connect timed out after {} ms",
            timeout.as_millis()
        )),
    }
}

async fn http_check(
    client: &reqwest::Client,
    ctx: &CheckCtx,
    https: bool,
    path: &str,
    expect: u16,
    body: Option<&str>,
) -> Option<String> {
    let scheme = if https { "https" } else { "http" };
    let url = format!("{scheme}://{}:{}{path}", ctx.addr, ctx.port);
    let resp = match client.get(&url).send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Some(format!("{scheme} GET {path} timed out")),
        Err(e) => return Some(format!("{scheme} GET {path}: {}", root_cause(&e))),
    };
    let status = resp.status().as_u16();
    if status != expect {
        return Some(format!("{scheme} GET {path} returned {status}"));
    }
    if let Some(want) = body {
        match resp.text().await {
            Ok(t) if t.contains(want) => {}
            Ok(_) => return Some(format!("{scheme} GET {path}: the body lacks {want:?}")),
            Err(e) => {
                return Some(format!(
                    "{scheme} GET {path}: reading the body: {}",
                    root_cause(&e)
                ));
            }
        }
    }
    None
}

/// The innermost cause of an error (reqwest wraps the interesting part).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Runs a check script in a process group of its own, so that at the timeout the script and
/// everything it started are killed together.
async fn script(path: &PathBuf, ctx: &CheckCtx, timeout: Duration) -> Option<String> {
    let child = tokio::process::Command::new(path)
        .env("LB_SERVER", ctx.addr.to_string())
        .env("LB_PORT", ctx.port.to_string())
        .env("LB_SERVICE", &ctx.service)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Some(format!("script {}: {e}", path.display())),
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(s)) if s.success() => None,
        Ok(Ok(s)) => Some(format!("script exited with {s}")),
        Ok(Err(e)) => Some(format!("script: {e}")),
        Err(_) => {
            if let Some(pid) = child.id() {
                // SAFETY: plain killpg(2) on the group the script leads.
                unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
            }
            let _ = child.kill().await;
            Some(format!("script killed after {} ms", timeout.as_millis()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ping: bool, failure: Option<&str>) -> Outcome {
        Outcome {
            line: (
                ("192.0.2.100".parse().unwrap(), 80, 6),
                "192.0.2.11".parse().unwrap(),
                80,
            ),
            ping,
            failure: failure.map(String::from),
            source: Some(Ipv4Addr::UNSPECIFIED),
        }
    }

    #[test]
    fn fall_failures_take_a_line_down_and_rise_passes_bring_it_back() {
        let mut h = LineHealth::new(2, 3);
        assert_eq!(h.record(&outcome(false, Some("503"))), None);
        assert_eq!(h.record(&outcome(false, Some("503"))), None);
        assert_eq!(
            h.record(&outcome(false, None)),
            None,
            "a pass resets the count"
        );
        for _ in 0..2 {
            assert_eq!(h.record(&outcome(false, Some("503"))), None);
        }
        assert_eq!(
            h.record(&outcome(false, Some("http GET / returned 503"))),
            Some(Transition::Down {
                reason: "http GET / returned 503".into(),
                failed: 3,
                fall: 3
            })
        );
        assert_eq!(h.record(&outcome(false, Some("x"))), None, "already down");
        assert_eq!(h.record(&outcome(false, None)), None);
        assert_eq!(
            h.record(&outcome(false, None)),
            Some(Transition::Up { passed: 2 })
        );
    }

    #[test]
    fn ping_and_check_count_separately_and_both_must_pass() {
        let mut h = LineHealth::new(1, 2);
        assert_eq!(h.record(&outcome(true, Some("no answer"))), None);
        assert_eq!(
            h.record(&outcome(false, None)),
            None,
            "a passing check does not reset the ping's count"
        );
        assert!(matches!(
            h.record(&outcome(true, Some("no answer"))),
            Some(Transition::Down { .. })
        ));
        assert_eq!(
            h.record(&outcome(false, None)),
            None,
            "still down while the ping fails"
        );
        assert_eq!(
            h.record(&outcome(true, None)),
            Some(Transition::Up { passed: 1 })
        );
    }

    #[test]
    fn failures_that_say_nothing_of_the_server_are_not_counted() {
        let mut h = LineHealth::new(1, 1);
        let no_route = outcome(false, Some("tcp connect: Network is unreachable"));
        assert_eq!(h.judge(&no_route, false), Verdict::Unjudged { first: true });
        assert_eq!(
            h.judge(&no_route, false),
            Verdict::Unjudged { first: false }
        );
        assert!(h.healthy(), "a backup keeps the last state");
        assert_eq!(
            h.judge(&outcome(false, None), false),
            Verdict::Counted(None)
        );
        assert_eq!(
            h.judge(&no_route, false),
            Verdict::Unjudged { first: false },
            "told once, not at every demotion"
        );
        assert!(matches!(
            h.judge(&no_route, true),
            Verdict::Counted(Some(Transition::Down { .. }))
        ));
    }

    #[test]
    fn what_a_failure_seen_from_a_backup_says() {
        let nat = Nat::new(
            Ipv4Addr::new(203, 0, 113, 0),
            24,
            Ipv4Addr::new(203, 0, 113, 1),
        );
        let own = Some(Ipv4Addr::new(203, 0, 113, 3));
        let outside = Some(Ipv4Addr::new(192, 0, 2, 3));
        // The primary counts everything.
        assert!(failure_counts(None, true, Some(&nat)));
        // A backup: no route says nothing.
        assert!(!failure_counts(None, false, None));
        assert!(!failure_counts(None, false, Some(&nat)));
        // Direct or tunnel servers: any route will do (backups keep their own view).
        assert!(failure_counts(outside, false, None));
        // NAT servers: only from an address of its own in the NAT subnet.
        assert!(failure_counts(own, false, Some(&nat)));
        assert!(
            !failure_counts(outside, false, Some(&nat)),
            "answers go to the primary"
        );
        assert!(!failure_counts(Some(nat.gateway), false, Some(&nat)));
    }

    #[test]
    fn a_reload_applies_new_limits_to_the_counts_so_far() {
        let mut h = LineHealth::new(1, 5);
        assert_eq!(h.record(&outcome(false, Some("503"))), None);
        h.set_limits(1, 2);
        assert!(matches!(
            h.record(&outcome(false, Some("503"))),
            Some(Transition::Down { fall: 2, .. })
        ));
    }

    #[test]
    fn jitter_stays_within_a_tenth() {
        let every = Duration::from_millis(2000);
        for s in 0..100 {
            assert!(jitter(every, s) <= Duration::from_millis(200));
        }
        assert_ne!(jitter(every, 1), jitter(every, 2));
    }
}
