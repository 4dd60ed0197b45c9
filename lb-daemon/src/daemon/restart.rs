//! `lb-cli restart`: the daemon re-executes its binary from disk (an upgrade, or the same
//! build) and the new program takes over what the old one leaves running. The XDP program
//! stays attached and forwarding, its connection state stays pinned in the BPF filesystem
//! (`dataplane::kept`), and a primary keeps its VIP aliases: the new program adopts the
//! kept maps, writes its services and settings into its own program's maps, and swaps that
//! program in for the old one in one netlink request. Nothing is withdrawn, so clients see
//! at most the delay of the packets that came while no daemon ran (none are dropped: the old
//! program forwards them).
//!
//! Refused, with the running daemon left as it was, when the new binary keeps its maps in
//! another format (`--kept-abi`), when the config file would not start the same ATM with
//! the same tables, while a reload, resize or handover is under way, and on a primary while
//! another ATM runs: then `lb-cli demote` first (the handover carries the connections
//! over), and restart it as a backup.

use std::{
    ffi::OsString,
    net::IpAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use tokio::{sync::oneshot, time::Instant};
use tracing::{error, info, warn};

use super::{Daemon, identify, reload::Job};
use crate::{
    config::{self, Config},
    control::Response,
    dataplane::{self, kept::KEPT_ABI},
    ha,
};

/// What a daemon was before it re-executed itself: the new program's `--restarted`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restarted {
    /// The primary of election term `term`: it stays primary.
    Primary { term: u64 },
    /// A backup: it starts as one, as usual.
    Backup,
}

impl Restarted {
    /// Reads `primary:TERM` or `backup`.
    pub fn parse(s: &str) -> Result<Restarted, String> {
        match s.split_once(':') {
            None if s == "backup" => Ok(Restarted::Backup),
            Some(("primary", term)) => term
                .parse()
                .map(|term| Restarted::Primary { term })
                .map_err(|_| format!("--restarted {s}: the term is not a number")),
            _ => Err(format!("--restarted {s}: expected primary:TERM or backup")),
        }
    }

    fn arg(self) -> String {
        match self {
            Restarted::Primary { term } => format!("primary:{term}"),
            Restarted::Backup => "backup".into(),
        }
    }
}

/// How long the dataplane of a primary that re-executes forwards without its daemon: the
/// new program renews the lease within its start-up, a few seconds at most; if it never
/// comes, the dataplane passes traffic again after this, as after a crash.
const RESTART_LEASE: Duration = Duration::from_secs(30);

/// How long the new binary may take to say its kept-maps version.
const ASK_LIMIT: Duration = Duration::from_secs(10);

/// A restart that passed its checks: what to execute, and as what.
pub(super) struct Plan {
    exe: PathBuf,
    version: String,
    as_: Restarted,
    reply: oneshot::Sender<Response>,
}

/// The file this process runs: after an upgrade replaced it, its path names the new one.
fn binary() -> Result<PathBuf, String> {
    let exe = std::fs::read_link("/proc/self/exe")
        .map_err(|e| format!("cannot tell which binary runs (/proc/self/exe): {e}"))?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

/// Asks `exe --kept-abi` which version of the kept maps it reads and which lb-daemon it is.
fn ask_binary(exe: &Path) -> Result<(u32, String), String> {
    let mut child = Command::new(exe)
        .arg("--kept-abi")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let started = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < ASK_LIMIT => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --kept-abi did not answer within {} s",
                    exe.display(),
                    ASK_LIMIT.as_secs()
                ));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("reading {} --kept-abi: {e}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    match (words.next().map(str::parse::<u32>), words.next()) {
        (Some(Ok(abi)), Some(version)) if out.status.success() => Ok((abi, version.to_string())),
        _ => Err(format!(
            "{} is not an lb-daemon that can take over a running one (--kept-abi answered \
             {:?})",
            exe.display(),
            text.trim()
        )),
    }
}

/// Checks beside the loop: the binary on disk, and the config file it would start with.
fn check(config_path: &Path, local: &[IpAddr], node: Option<&str>) -> Result<Checked, String> {
    let exe = binary()?;
    let (abi, version) = ask_binary(&exe)?;
    if abi != KEPT_ABI {
        return Err(format!(
            "{} (lb-daemon {version}) keeps connections in format {abi}, this daemon in format \
             {KEPT_ABI}: it could not adopt them. Hand over first (lb-cli demote on the \
             primary), or stop and start this daemon (its connections are lost)",
            exe.display()
        ));
    }
    let file = config_path.display();
    let config = config::load(config_path).map_err(|problems| {
        let shown: Vec<String> = problems.iter().take(5).map(|p| p.to_string()).collect();
        format!(
            "{file} has {} problems, so the new daemon would start idle: {}",
            problems.len(),
            shown.join("; ")
        )
    })?;
    let (role, name) = identify(&config, local, node)?;
    Ok(Checked {
        exe,
        version,
        config: Box::new(config),
        role,
        name,
    })
}

pub(super) struct Checked {
    exe: PathBuf,
    version: String,
    config: Box<Config>,
    role: super::Role,
    name: String,
}

impl Daemon {
    /// `lb-cli restart`: refuses at once what the running state forbids, then checks the
    /// binary and the file beside the loop ([`Job::Restart`]).
    pub(super) async fn begin_restart(&mut self, reply: oneshot::Sender<Response>) {
        let mut reply = Some(reply);
        if self.refuse_if_busy(&mut reply) {
            return;
        }
        let refuse = |reply: Option<oneshot::Sender<Response>>, why: String| {
            warn!("Refused restart: {why}");
            if let Some(r) = reply {
                let _ = r.send(Response::error(why));
            }
        };
        if let Err(why) = self.may_restart() {
            return refuse(reply, why);
        }
        let local: Vec<IpAddr> = match self.net.addresses().await {
            Ok(l) => l.iter().map(|a| a.addr).collect(),
            Err(e) => return refuse(reply, format!("listing local addresses: {e}")),
        };
        self.busy = Some("restart");
        let (path, node) = (self.opts.config.clone(), self.opts.node.clone());
        let jobs = self.jobs_tx.clone();
        crate::background(move || {
            let checked = check(&path, &local, node.as_deref());
            let _ = jobs.send(Job::Restart {
                checked: Box::new(checked),
                reply: reply.expect("taken only on refusal"),
            });
        });
    }

    /// Whether the running state lets this daemon restart now (and if not, why not).
    fn may_restart(&self) -> Result<Restarted, String> {
        let (Some(a), Some(ha)) = (self.part.atm(), self.part.ha()) else {
            return Err(
                "lb-cli restart re-executes an ATM's daemon; a real server's \
                        keeps nothing worth it: restart it with systemctl"
                    .into(),
            );
        };
        if a.grace.is_some() || ha.handover.is_some() {
            return Err("a handover is under way: try again when it is done".into());
        }
        if a.kept.is_none() {
            return Err(
                "this daemon keeps no connection state (the BPF filesystem could not \
                        be written, as its start-up log says): a restart would drop every \
                        connection. Stop and start it instead"
                    .into(),
            );
        }
        if ha.election.role() != ha::Role::Primary {
            return Ok(Restarted::Backup);
        }
        let now = Instant::now();
        if let Some(i) =
            (0..self.config.atms.len()).find(|i| *i != a.index && ha.election.alive(*i, now))
        {
            return Err(format!(
                "this ATM is primary and {} is running: hand over first (lb-cli demote: the \
                 handover carries the connections over), then restart this daemon as a backup",
                self.config.atms[i].name
            ));
        }
        Ok(Restarted::Primary {
            term: ha.election.term(),
        })
    }

    /// The checks are back: the restart's plan, or the refusal answered.
    pub(super) fn on_restart_checked(
        &mut self,
        checked: Result<Checked, String>,
        reply: oneshot::Sender<Response>,
    ) -> Option<Plan> {
        self.busy = None;
        // The state may have moved while the checks ran.
        let result = checked.and_then(|c| {
            let as_ = self.may_restart()?;
            self.same_atm(&c)?;
            Ok((c, as_))
        });
        match result {
            Ok((c, as_)) => Some(Plan {
                exe: c.exe,
                version: c.version,
                as_,
                reply,
            }),
            Err(why) => {
                warn!("Refused restart: {why}");
                let _ = reply.send(Response::error(why));
                None
            }
        }
    }

    /// The file would start this same ATM, on the same interfaces, with tables its kept maps
    /// fit.
    fn same_atm(&self, c: &Checked) -> Result<(), String> {
        let file = self.opts.config.display();
        if c.role != self.role || c.name != self.name {
            return Err(format!(
                "{file} would make this machine {} instead of {}",
                c.name, self.name
            ));
        }
        let Some(a) = self.part.atm() else {
            return Ok(());
        };
        if c.config.tables != a.caps {
            let t = c.config.tables;
            return Err(format!(
                "{file}'s [tables] ({} {} {}) are not the running sizes ({} {} {}, as written \
                 to config or read at start): the new daemon could not adopt the \
                 connections. Reload first, or stop and start",
                t.services,
                t.servers,
                t.connections,
                a.caps.services,
                a.caps.servers,
                a.caps.connections
            ));
        }
        let (old, new) = (
            &self.config.atms[a.index].interface,
            &c.config.atms[a.index].interface,
        );
        if old != new {
            return Err(format!(
                "{file} moves this ATM from {old} to {new}: stop and start for that"
            ));
        }
        Ok(())
    }

    /// The loop has ended for `plan`: leaves the dataplane forwarding on its own (a
    /// primary's for [`RESTART_LEASE`]), gives up the control socket and the mount, answers,
    /// and executes the binary. Returns only if the execution failed.
    pub(super) fn re_exec(
        &mut self,
        plan: Plan,
        socket: &Path,
        mount: Option<crate::fuse::Mount>,
    ) -> anyhow::Error {
        if let Restarted::Primary { .. } = plan.as_ {
            let mut s = self.settings(true);
            s.lease_ns = dataplane::now_ns() + RESTART_LEASE.as_nanos() as u64;
            if let Some(Err(e)) = self.part.atm_mut().map(|a| a.dp.set_settings(&s)) {
                warn!("Lengthening the dataplane's lease for the restart: {e}");
            }
        }
        if let Some(a) = self.part.atm_mut() {
            a.dp.flush_log();
        }
        drop(mount);
        let _ = std::fs::remove_file(socket);
        let what = format!(
            "Re-executing {} (lb-daemon {}) as {}: the dataplane forwards meanwhile",
            plan.exe.display(),
            plan.version,
            match plan.as_ {
                Restarted::Primary { term } => format!("primary of term {term}"),
                Restarted::Backup => "backup".into(),
            }
        );
        info!("{what}");
        let _ = plan.reply.send(Response::text(what));
        // The answer goes out on the control task: give it a moment before the process
        // image goes.
        std::thread::sleep(Duration::from_millis(100));
        let mut args: Vec<OsString> = Vec::new();
        let mut old = std::env::args_os().skip(1);
        while let Some(a) = old.next() {
            if a == "--restarted" {
                old.next();
            } else if !a.to_string_lossy().starts_with("--restarted=") {
                args.push(a);
            }
        }
        let e = Command::new(&plan.exe)
            .args(args)
            .arg("--restarted")
            .arg(plan.as_.arg())
            .exec();
        error!(
            "Cannot execute {}: {e}; stopping with the dataplane and its connections kept \
             (a new start adopts them)",
            plan.exe.display()
        );
        anyhow::anyhow!("re-executing {}: {e}", plan.exe.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restarted_role_reads_back_what_it_writes() {
        for r in [Restarted::Primary { term: 7 }, Restarted::Backup] {
            assert_eq!(Restarted::parse(&r.arg()), Ok(r));
        }
        assert!(Restarted::parse("primary").is_err());
        assert!(Restarted::parse("primary:x").is_err());
        assert!(Restarted::parse("leader:1").is_err());
    }
}
