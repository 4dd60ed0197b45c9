//! Health: the probes of every server line, and what their outcomes and the operator's
//! `lb-cli server` actions do to the plane.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use lb_common::Method;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::{Daemon, reload};
use crate::{
    config::{self, Config},
    control::ServerAction,
    health::{self, Checks, LineHealth, Transition, Verdict},
    services::{line_key, svc_key},
};

impl Daemon {
    /// Starts the probes for the config's servers (at start-up).
    pub(super) fn start_checks(&mut self) {
        let (health, checks, note) = checks_for(
            &self.config,
            std::mem::take(&mut self.health),
            &self.checks_tx,
        );
        info!("{note}");
        self.health = health;
        if let Some(slot) = self.part.checks_mut() {
            *slot = Some(checks);
        }
        self.server_addrs = Arc::new(server_addrs(&self.config));
    }

    /// Restarts the probes after a reload, beside the loop (a config may have 65,536
    /// server lines); health of lines that remain is kept. Until the new probes are in
    /// place ([`reload::Job::Checks`]), outcomes are not judged.
    pub(super) fn restart_checks(&mut self) {
        let old = self.part.checks_mut().and_then(Option::take);
        let health = std::mem::take(&mut self.health);
        let config = self.config.clone();
        let tx = self.checks_tx.clone();
        let jobs = self.jobs_tx.clone();
        crate::background(move || {
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
    pub(super) fn on_probe(&mut self, o: health::Outcome) {
        let Some(h) = self.health.get_mut(&o.line) else {
            return; // a line that left with a reload
        };
        let primary = self.part.atm().is_some_and(|a| a.primary);
        let server = self
            .config
            .services
            .iter()
            .filter(|s| svc_key(s) == o.line.0)
            .flat_map(|s| s.servers.iter())
            .find(|v| v.address == o.line.1 && v.port == o.line.2);
        let name = || server.map(|v| v.name.clone()).unwrap_or_default();
        debug!(
            "Check of {} {}: {}",
            name(),
            SocketAddr::new(o.line.1, o.line.2),
            match &o.failure {
                Some(why) => format!("failed: {why}"),
                None => "passed".into(),
            }
        );
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
                    "{} {} not judged while backup: {}; this ATM has no route to it, or \
                     (a NAT server) no address of its own in the NAT subnet for the answers \
                     to come back to, so it keeps its last state until this ATM is primary",
                    name(),
                    SocketAddr::new(o.line.1, o.line.2),
                    o.failure.as_deref().unwrap_or_default()
                );
                return;
            }
        };
        let name = name();
        let before = self.before(&o.line);
        let Some(a) = self.part.atm_mut() else { return };
        let healthy = matches!(t, Transition::Up { .. });
        let to_drop = a
            .plane
            .set_state(&mut a.dp, &o.line, |s| s.healthy = healthy, true)
            .unwrap_or_else(|e| {
                error!("Applying the health of {name}: {e}");
                None
            });
        let why = match t {
            Transition::Down {
                reason,
                failed,
                fall,
            } => {
                let why = format!("{reason}, {failed} of {fall} failed");
                warn!("{name} {} down: {why}", SocketAddr::new(o.line.1, o.line.2));
                why
            }
            Transition::Up { passed } => {
                let why = format!("{passed} checks in a row passed");
                info!("{name} {} up: {why}", SocketAddr::new(o.line.1, o.line.2));
                why
            }
        };
        self.notify_line(&o.line, before, &why);
        if let Some(index) = to_drop {
            self.drop_connections_of(
                index,
                format!("{name} {}", SocketAddr::new(o.line.1, o.line.2)),
            );
        }
    }

    /// Drops the connections of server index `index` beside the event loop, and logs how
    /// many went, naming the server as `who`.
    pub(super) fn drop_connections_of(&self, index: u32, who: String) {
        let Some(a) = self.part.atm() else { return };
        let table = match a.dp.conn_table() {
            Ok(t) => t,
            Err(e) => {
                error!("Dropping the connections of {who}: {e}");
                return;
            }
        };
        crate::background(move || {
            let mut t = table;
            match t.remove_where(|c| c.server == index) {
                Ok(0) => {}
                Ok(dropped) => info!("{who}: {dropped} connections dropped"),
                Err(e) => error!("Dropping the connections of {who}: {e}"),
            }
        });
    }

    pub(super) fn server_admin(
        &mut self,
        action: ServerAction,
        service: &str,
        server: &str,
    ) -> std::result::Result<String, String> {
        let line = self
            .part
            .atm()
            .ok_or("this is not an ATM")?
            .plane
            .find_line(service, server)?;
        let before = self.before(&line);
        let a = self.part.atm_mut().ok_or("this is not an ATM")?;
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
        let at = SocketAddr::new(line.1, line.2);
        let msg = format!("{service}/{server} {at} {what}");
        info!("Server {msg} (by lb-cli)");
        self.notify_line(&line, before, &format!("lb-cli server: {what}"));
        if let Some(index) = to_drop {
            self.drop_connections_of(index, format!("{service}/{server} {at}"));
        }
        Ok(msg)
    }
}

/// Health state for `config`'s lines (kept from `old` for those that remain) and probes
/// started for them.
pub(super) fn checks_for(
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
        for v in &s.servers {
            let line = line_key(s, v);
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

/// Every server address of `config`, once each, whose neighbours the dataplane needs (not a
/// local server's: its packets go up this ATM's own stack).
pub(super) fn server_addrs(config: &Config) -> Vec<IpAddr> {
    config
        .services
        .iter()
        .flat_map(|s| {
            s.servers
                .iter()
                .filter(|v| v.method != lb_common::Method::Local)
                .map(|v| v.address)
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}
