//! Changes to the running configuration: reloads (SIGHUP, `lb-cli reload`) and writes to the
//! `config` table (a resize). Each either applies whole or leaves the running state as it
//! was, and the outcome is logged.
//!
//! The event loop sends the heartbeats, so everything that grows with the config runs
//! beside it: reading and checking the file, working out ids and indices, computing
//! scheduler rows, and building a new dataplane for new table sizes (a map of 16 million
//! connections takes seconds to create). The loop applies the result a few milliseconds at
//! a time ([`Applying`]) or swaps the new dataplane's programs in for the old ones.
//! Connections of server lines that left are dropped beside the loop too; their indices are
//! not handed out again until that is done.

use std::{
    collections::VecDeque,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use tracing::{Span, error, info, info_span, warn};

use super::{Daemon, identify};

mod prepare;

use crate::{
    config::{self, Config},
    control::Response,
    dataplane::{self, AttachMode, Attached, Capacities, ServiceSpec},
    services::{Changes, Plane},
};
pub(super) use prepare::Prepared;
use prepare::{How, prepare};

/// Work done beside the event loop, reporting back to it.
pub(super) enum Job {
    /// The config file, read and checked.
    Parsed {
        config: Box<Result<Config, Vec<config::Problem>>>,
        /// Its fingerprint (`ha::config_fingerprint`), worked out here too: on a config of
        /// 65,536 lines it takes longer than a heartbeat interval.
        fingerprint: Option<u64>,
        reply: Option<oneshot::Sender<Response>>,
    },
    /// A reload worked out: what to write, or a new dataplane to take over.
    Prepared {
        result: Result<Box<Prepared>, String>,
        reply: Option<oneshot::Sender<Response>>,
    },
    /// Probes restarted after a reload, with the health of the lines kept.
    Checks {
        health: std::collections::HashMap<crate::services::LineKey, crate::health::LineHealth>,
        checks: crate::health::Checks,
        note: String,
        addrs: Vec<IpAddr>,
    },
    /// `lb-cli restart`'s checks of the binary and the file (see `restart`).
    Restart {
        checked: Box<Result<super::restart::Checked, String>>,
        reply: oneshot::Sender<Response>,
    },
    /// The connection entries of server lines that left were dropped.
    Drained {
        generation: u64,
        indices: Vec<u32>,
        dropped: Result<usize, String>,
    },
}

impl Job {
    /// What the loop does with it, for [`super::Busy`].
    pub(super) fn what(&self) -> &'static str {
        match self {
            Job::Parsed { .. } => "a reload's parsed config",
            Job::Prepared { .. } => "a prepared reload",
            Job::Checks { .. } => "a reload's new probes",
            Job::Drained { .. } => "drained connections",
            Job::Restart { .. } => "a restart's checks",
        }
    }
}

/// A rewrite being applied by the loop between its other work.
pub(super) struct Applying {
    steps: VecDeque<Step>,
    prepared: Prepared,
    /// Service ids written so far (to restore them if a write fails).
    written: Vec<u32>,
    reply: Option<oneshot::Sender<Response>>,
}

/// One bounded piece of a rewrite.
enum Step {
    Uninstall(u32),
    MarkDown(Vec<u32>),
    /// Server records `from..to` of a service that changes.
    Servers {
        id: u32,
        spec: Arc<ServiceSpec>,
        from: usize,
        to: usize,
    },
    /// The row and the service record, once its servers are written.
    Publish {
        id: u32,
        spec: Arc<ServiceSpec>,
        row: Vec<u32>,
    },
}

/// Server records written per step: a few milliseconds of map updates.
const SERVERS_PER_STEP: usize = 512;
/// How long the loop spends on a rewrite before it looks at its other work again.
const STEP_BUDGET: Duration = Duration::from_millis(5);

/// What of `new` a reload cannot apply to a running daemon: these are read once, at start.
pub fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.cluster.name != new.cluster.name {
        // Messages carry the name: the ATMs would stop hearing each other (a split brain)
        // until every one had reloaded.
        out.push("[cluster] name");
    }
    if old.cluster.auth_key_file != new.cluster.auth_key_file {
        out.push("[cluster] auth_key_file");
    }
    if old.ha != new.ha {
        out.push("[ha]");
    }
    if old.atms != new.atms {
        out.push("the [[atm]] list");
    }
    if old.control != new.control {
        out.push("[control]");
    }
    out
}

/// A reply to a control request, if there is one to give.
fn answer(reply: Option<oneshot::Sender<Response>>, r: Response) {
    if let Some(reply) = reply {
        let _ = reply.send(r);
    }
}

fn attach_mode(m: Attached) -> AttachMode {
    match m {
        Attached::Driver => AttachMode::Driver,
        Attached::Generic => AttachMode::Generic,
    }
}

impl Daemon {
    /// Refuses a second reload or resize while one is under way.
    pub(super) fn refuse_if_busy(&self, reply: &mut Option<oneshot::Sender<Response>>) -> bool {
        let Some(what) = self.busy else {
            return false;
        };
        let msg = format!("a {what} is under way: try again when it is done");
        warn!("Refused: {msg}");
        answer(reply.take(), Response::error(msg));
        true
    }

    /// SIGHUP or `lb-cli reload`: reads the file beside the loop (see [`Job::Parsed`]).
    pub(super) fn begin_reload(&mut self, mut reply: Option<oneshot::Sender<Response>>) {
        if self.busy.is_some() {
            if reply.is_none() {
                // A second SIGHUP: the file may have changed again since the first.
                info!("A reload is under way: the file will be read again after it");
                self.reload_again = true;
                return;
            }
            self.refuse_if_busy(&mut reply);
            return;
        }
        self.busy = Some("reload");
        self.busy_span = info_span!("reload");
        let path = self.opts.config.clone();
        let jobs = self.jobs_tx.clone();
        crate::background(move || {
            let config = config::load(&path);
            let fingerprint = config.as_ref().ok().map(crate::ha::config_fingerprint);
            let _ = jobs.send(Job::Parsed {
                config: Box::new(config),
                fingerprint,
                reply,
            });
        });
    }

    /// The file has been read: refuse it, apply it (node role), or work it out beside the
    /// loop (see [`prepare`]).
    pub(super) async fn on_parsed(
        &mut self,
        parsed: Box<Result<Config, Vec<config::Problem>>>,
        fingerprint: Option<u64>,
        reply: Option<oneshot::Sender<Response>>,
    ) {
        self.next_fingerprint = fingerprint;
        let new = match self.check_reload(*parsed).await {
            Ok(new) => new,
            Err(msg) => {
                error!("{msg}");
                self.done(reply, Err(msg));
                return;
            }
        };
        let Some(a) = self.part.atm_mut() else {
            let outcome = self.apply_node_config(new).await;
            self.done(reply, outcome);
            return;
        };
        // Sizes written to `config` stay until the file's own [tables] change.
        let caps = if new.tables != self.config.tables {
            new.tables
        } else {
            a.caps
        };
        let written = caps != new.tables;
        let running = a.plane.clone();
        a.plane.start_journal();
        let running_caps = a.caps;
        let jobs = self.jobs_tx.clone();
        crate::background(move || {
            let result = prepare(running, running_caps, Some(new), caps).map_err(|why| {
                let sizes = if written {
                    format!(
                        "; the tables are as written to `config`, {} {} {}, until the \
                         file's [tables] change",
                        caps.services, caps.servers, caps.connections
                    )
                } else {
                    String::new()
                };
                format!("Reload refused: {why}{sizes} (keeping the running configuration)")
            });
            let _ = jobs.send(Job::Prepared {
                result: result.map(Box::new),
                reply,
            });
        });
    }

    /// A new config that a running daemon can take, or why not.
    async fn check_reload(
        &mut self,
        parsed: Result<Config, Vec<config::Problem>>,
    ) -> Result<Config, String> {
        let file = self.opts.config.display().to_string();
        let new = parsed.map_err(|problems| {
            for p in &problems {
                error!("{file}: {p}");
            }
            format!(
                "Bad configuration file: keeping the running configuration ({} problems)",
                problems.len()
            )
        })?;
        let listed = self
            .net
            .addresses()
            .await
            .map_err(|e| format!("listing local addresses: {e}"))?;
        let local: Vec<IpAddr> = listed.iter().map(|a| a.addr).collect();
        let (role, name) = identify(&new, &local, self.opts.node.as_deref())?;
        super::role::foreign_claims(&new, &role, &listed)?;
        if role != self.role || name != self.name {
            return Err(format!(
                "Reload would make this machine {name} ({role:?}) instead of {}: restart the \
                 daemon for that (keeping the running configuration)",
                self.name
            ));
        }
        let fixed = restart_only(&self.config, &new);
        if !fixed.is_empty() {
            return Err(format!(
                "Reload changes {}, which take effect only at start: restart the daemon for \
                 that (keeping the running configuration)",
                fixed.join(", ")
            ));
        }
        Ok(new)
    }

    /// The end of a reload or resize: answers, and reads the file again if a SIGHUP came
    /// meanwhile.
    fn done(&mut self, reply: Option<oneshot::Sender<Response>>, outcome: Result<String, String>) {
        self.busy = None;
        self.busy_span = Span::none();
        if let Some(a) = self.part.atm_mut() {
            a.plane.stop_journal();
        }
        answer(
            reply,
            match outcome {
                Ok(m) => Response::text(m),
                Err(e) => Response::error(e),
            },
        );
        if std::mem::take(&mut self.reload_again) {
            self.begin_reload(None);
        }
    }

    /// A write to `config`: new table sizes. Refused before anything is touched if the
    /// running services do not fit; else a new dataplane is built beside the loop and takes
    /// over. Every connection goes, as TCL's reset does.
    pub(super) fn begin_resize(
        &mut self,
        caps: Capacities,
        mut reply: Option<oneshot::Sender<Response>>,
    ) {
        let what = format!("{} services, {} servers", caps.services, caps.servers);
        let Some(a) = self.part.atm() else {
            answer(
                reply,
                Response::error("this is not an ATM: it has no tables to write"),
            );
            return;
        };
        if let Err(why) = a.plane.fits(&caps) {
            let msg = format!("{what}: {why}");
            warn!("Refused write to config: {msg}");
            answer(reply, Response::error(msg));
            return;
        }
        if self.refuse_if_busy(&mut reply) {
            return;
        }
        self.busy = Some("resize");
        self.busy_span = info_span!("resize");
        let _s = self.busy_span.clone().entered();
        info!(
            "Resizing the tables to {} {} {}: building a new dataplane",
            caps.services, caps.servers, caps.connections
        );
        let Some(a) = self.part.atm_mut() else { return };
        let running = a.plane.clone();
        a.plane.start_journal();
        let running_caps = a.caps;
        let jobs = self.jobs_tx.clone();
        crate::background(move || {
            let result = prepare(running, running_caps, None, caps);
            let _ = jobs.send(Job::Prepared {
                result: result.map(Box::new),
                reply,
            });
        });
    }

    /// A reload or resize has been worked out: start applying it.
    pub(super) async fn on_prepared(
        &mut self,
        result: Result<Box<Prepared>, String>,
        reply: Option<oneshot::Sender<Response>>,
    ) {
        let what = if self.busy == Some("reload") {
            "Reload"
        } else {
            "Resize"
        };
        let mut prepared = match result {
            Ok(p) => *p,
            Err(e) => {
                let msg = if e.starts_with("Reload refused") {
                    e
                } else {
                    format!("{what} failed: {e}; nothing was changed")
                };
                error!("{msg}");
                self.done(reply, Err(msg));
                return;
            }
        };
        match prepared.how {
            How::Replace(_) => {
                let outcome = self.take_over(prepared).await;
                if let Err(e) = &outcome {
                    error!("{what} failed: {e}");
                }
                self.done(reply, outcome.map_err(|e| format!("{what} failed: {e}")));
            }
            How::Rewrite {
                ref mut removed_services,
                ref mut removed_lines,
                ref mut rows,
            } => {
                let mut steps: VecDeque<Step> = std::mem::take(removed_services)
                    .into_iter()
                    .map(Step::Uninstall)
                    .collect();
                if !removed_lines.is_empty() {
                    steps.push_back(Step::MarkDown(removed_lines.clone()));
                }
                for (id, spec, row) in std::mem::take(rows) {
                    let n = spec.servers.len();
                    for from in (0..n).step_by(SERVERS_PER_STEP) {
                        steps.push_back(Step::Servers {
                            id,
                            spec: spec.clone(),
                            from,
                            to: (from + SERVERS_PER_STEP).min(n),
                        });
                    }
                    steps.push_back(Step::Publish { id, spec, row });
                }
                self.applying = Some(Applying {
                    steps,
                    prepared,
                    written: Vec::new(),
                    reply,
                });
            }
        }
    }

    /// Applies the next few milliseconds of a rewrite; at its end, takes the new plane and
    /// config. A failed write restores every service as the running plane has it.
    pub(super) async fn apply_step(&mut self) {
        let Some(mut job) = self.applying.take() else {
            return;
        };
        let Some(a) = self.part.atm_mut() else { return };
        let started = Instant::now();
        let mut failed = None;
        while started.elapsed() < STEP_BUDGET {
            let Some(step) = job.steps.pop_front() else {
                break;
            };
            let r = match step {
                Step::Uninstall(id) => {
                    job.written.push(id);
                    a.dp.uninstall(id)
                }
                Step::MarkDown(lines) => lines.iter().try_for_each(|i| a.dp.mark_down(*i)),
                Step::Servers { id, spec, from, to } => {
                    job.written.push(id);
                    a.dp.write_servers(id, &spec, from..to)
                }
                Step::Publish { id, spec, row } => a.dp.publish_row(id, &spec, &row),
            };
            if let Err(e) = r {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            let restored = (|| -> Result<(), dataplane::Error> {
                let running: std::collections::HashMap<u32, ServiceSpec> =
                    a.plane.specs().into_iter().collect();
                job.written.sort_unstable();
                job.written.dedup();
                for id in &job.written {
                    match running.get(id) {
                        Some(spec) => a.dp.install(*id, spec)?,
                        None => a.dp.uninstall(*id)?,
                    }
                }
                Ok(())
            })();
            let msg = match restored {
                Ok(()) => format!("Reload failed: {e}; the running configuration was restored"),
                Err(e2) => format!(
                    "Reload failed: {e}; restoring the running configuration failed too: {e2}"
                ),
            };
            error!("{msg}");
            self.done(job.reply, Err(msg));
            return;
        }
        if !job.steps.is_empty() {
            self.applying = Some(job);
            return;
        }
        // Every write is done: the new plane is in force.
        let Applying {
            prepared, reply, ..
        } = job;
        let Prepared {
            mut plane,
            reload,
            how,
        } = prepared;
        let removed_lines = match how {
            How::Rewrite { removed_lines, .. } => removed_lines,
            How::Replace(_) => Vec::new(),
        };
        self.carry_over(&mut plane);
        let Some(a) = self.part.atm_mut() else { return };
        let old = std::mem::replace(&mut a.plane, plane);
        crate::background(move || drop(old));
        if !removed_lines.is_empty() {
            self.drain(removed_lines);
        }
        let outcome = match reload {
            Some(r) => self.finish_reload(r.config, &r.changes, false).await,
            None => Ok(String::new()),
        };
        self.done(reply, outcome);
    }

    /// Health and operator changes that came while a reload or resize was worked out from
    /// a copy of the running plane: they are in the running plane (and dataplane); take
    /// them into `plane` and reprogram the services they touch.
    fn carry_over(&mut self, plane: &mut Plane) {
        let Some(a) = self.part.atm_mut() else { return };
        let touched = a.plane.take_journal();
        if touched.is_empty() {
            return;
        }
        plane.keep_states_of(&a.plane, &touched);
        let services: std::collections::BTreeSet<crate::services::SvcKey> =
            touched.iter().map(|l| l.0).collect();
        for s in plane
            .services()
            .iter()
            .filter(|s| services.contains(&crate::services::svc_key(s)))
        {
            let Some(id) = plane.id(&crate::services::svc_key(s)) else {
                continue;
            };
            if let Err(e) = a.dp.install(id, &plane.spec(s)) {
                error!("Reprogramming service {} after a reload: {e}", s.name);
            }
        }
    }

    /// Drops the connection entries of server lines that left, beside the loop; their
    /// indices are free again once that is done ([`Job::Drained`]).
    fn drain(&mut self, indices: Vec<u32>) {
        let Some(a) = self.part.atm() else { return };
        let generation = a.generation;
        let table = a.dp.conn_table();
        let jobs = self.jobs_tx.clone();
        crate::background(move || {
            let gone: std::collections::HashSet<u32> = indices.iter().copied().collect();
            let dropped = table.map_err(|e| e.to_string()).and_then(|mut t| {
                t.remove_where(|c| gone.contains(&c.server))
                    .map_err(|e| e.to_string())
            });
            let _ = jobs.send(Job::Drained {
                generation,
                indices,
                dropped,
            });
        });
    }

    pub(super) fn on_drained(
        &mut self,
        generation: u64,
        indices: Vec<u32>,
        dropped: Result<usize, String>,
    ) {
        let Some(a) = self.part.atm_mut() else { return };
        if a.generation != generation {
            // A resize came between: that dataplane and its numbering are gone.
            return;
        }
        match dropped {
            Ok(0) => {}
            Ok(n) => info!("{n} connections to removed servers dropped"),
            Err(e) => {
                // Keep the indices out of use: their connections may still be there.
                error!("Dropping the connections of removed servers: {e}");
                return;
            }
        }
        a.plane.drained(&indices);
    }

    /// A new dataplane is ready: its programs replace the old ones on every interface, in
    /// the same mode, or the old ones stay and nothing has changed.
    async fn take_over(&mut self, prepared: Prepared) -> Result<String, String> {
        let Prepared {
            mut plane,
            reload,
            how: How::Replace(mut dp),
        } = prepared
        else {
            return Err("not a new dataplane".into());
        };
        let settings = self.current_settings();
        let Some(a) = self.part.atm_mut() else {
            return Err("this is not an ATM".into());
        };
        dp.set_settings(&settings).map_err(|e| e.to_string())?;
        let mut swapped: Vec<(String, Attached)> = Vec::new();
        for (iface, mode) in a.attached.clone() {
            if let Err(e) = dp.attach(&iface, attach_mode(mode)) {
                // Put the old programs back where the new ones went.
                for (i, m) in &swapped {
                    if let Err(e2) = a.dp.attach(i, attach_mode(*m)) {
                        error!("Putting the old program back on {i}: {e2}");
                    }
                }
                dp.disown_attachments();
                crate::background(move || drop(dp));
                return Err(format!(
                    "attaching the new dataplane to {iface}: {e}; the running dataplane was kept"
                ));
            }
            swapped.push((iface, mode));
        }
        // From here the new dataplane forwards, and its maps are the ones to keep.
        let mut old = std::mem::replace(&mut a.dp, *dp);
        old.disown_attachments();
        if let Some(dir) = &a.kept
            && let Err(e) = a.dp.pin_kept(dir)
        {
            warn!(
                "Keeping the resized connection table at {}: {e}",
                dir.display()
            );
        }
        a.caps = a.dp.capacities();
        a.generation += 1;
        // Freeing big maps takes a while: not on the loop.
        crate::background(move || drop(old));
        self.carry_over(&mut plane);
        let Some(a) = self.part.atm_mut() else {
            return Err("this is not an ATM".into());
        };
        let old_plane = std::mem::replace(&mut a.plane, plane);
        crate::background(move || drop(old_plane));
        let caps = a.caps;
        let resized = format!(
            "Table sizes set to {} {} {}: the maps were resized and all connections dropped",
            caps.services, caps.servers, caps.connections
        );
        info!("{resized}");
        match reload {
            None => Ok(resized),
            Some(r) => self.finish_reload(r.config, &r.changes, true).await,
        }
    }

    /// The part of a reload after the dataplane: the config in force, timeout and debug as
    /// the file says, checks, settings, the VIP and NAT aliases of a primary.
    async fn finish_reload(
        &mut self,
        new: Config,
        changes: &Changes,
        resized: bool,
    ) -> Result<String, String> {
        let old_vips = self.vips();
        let old_nat = self.config.nat;
        let old = std::mem::replace(&mut self.config, new);
        crate::background(move || drop(old));
        self.timeouts = self.config.cluster.timeouts;
        self.debug = self.config.cluster.debug;
        self.restart_checks();
        if let Err(e) = self.push_settings() {
            error!("Applying the settings after the reload: {e}");
        }
        if let Err(e) = self.follow_aliases(&old_vips, old_nat).await {
            error!("Reload: {e:#}");
        }
        let msg = format!(
            "Reloaded: {} services added, {} removed; {} server lines added, {} removed{}",
            changes.services_added,
            changes.services_removed,
            changes.lines_added,
            changes.lines_removed,
            if resized {
                "; tables resized, all connections dropped"
            } else {
                ""
            }
        );
        info!("{msg}");
        self.config_changed();
        Ok(msg)
    }
}
