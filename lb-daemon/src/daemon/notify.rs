//! What the hooks hear (see `crate::hooks` and docs/DAEMON.md, "Hooks"): this ATM's role
//! and faults, and services and servers going up or down.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tokio::time::Instant;
use tracing::{info, warn};

use super::Daemon;
use crate::services::{LineKey, svc_key};

/// A line's service and server, up or not, before a change.
#[derive(Clone, Copy)]
pub(super) struct Before {
    service_up: bool,
    server_up: bool,
}

impl Daemon {
    fn notify(
        &self,
        hook: &'static str,
        program: Option<&PathBuf>,
        env: Vec<(&'static str, String)>,
    ) {
        if let Some(p) = program {
            let timeout = Duration::from_secs(self.config.cluster.notify_timeout as u64);
            self.hooks.run(hook, p, env, timeout);
        }
    }

    /// What every hook is told: the event, why, the cluster, this ATM and its role.
    /// `role`: the role it has now, or takes with this event.
    fn hook_env(&self, event: &str, reason: &str, role: &str) -> Vec<(&'static str, String)> {
        vec![
            ("LB_EVENT", event.to_string()),
            ("LB_REASON", reason.to_string()),
            ("LB_CLUSTER", self.config.cluster.name.clone()),
            ("LB_ATM", self.name.clone()),
            ("LB_ROLE", role.to_string()),
        ]
    }

    /// This ATM became primary (`term`) or backup: `notify_primary` or `notify_backup`.
    pub(super) fn notify_role(&self, primary: bool, reason: &str, term: Option<u64>) {
        let (hook, event, program) = if primary {
            ("notify_primary", "primary", &self.config.ha.notify_primary)
        } else {
            ("notify_backup", "backup", &self.config.ha.notify_backup)
        };
        let mut env = self.hook_env(event, reason, event);
        if let Some(t) = term {
            env.push(("LB_TERM", t.to_string()));
        }
        self.notify(hook, program.as_ref(), env);
    }

    /// Looks whether this ATM may be primary: not while a track address does not answer,
    /// nor without quorum. Entering that fault runs `notify_fault`, leaving it (as a backup)
    /// `notify_backup`, as keepalived's FAULT state does. Not during the first dead interval
    /// (the ATM has not heard its peers yet), nor under Pacemaker (whose business it is).
    pub(super) fn look_at_fault(&mut self) {
        let Some(ha) = self.part.ha() else { return };
        if ha.election.is_managed() || ha.ticks <= self.config.ha.dead_after as u64 {
            return;
        }
        let why = if !ha.election.eligible() {
            Some("a track address does not answer".to_string())
        } else {
            let v = ha.election.votes(Instant::now());
            match v.needed {
                Some(n) if v.heard < n => Some(format!(
                    "no quorum: {} of {} ATMs heard (this one included), {n} needed",
                    v.heard, v.expected
                )),
                _ => None,
            }
        };
        match (&self.fault, why) {
            (None, Some(w)) => {
                warn!("Fault: this ATM may not be primary ({w})");
                let env = self.hook_env("fault", &w, self.role_name());
                self.notify("notify_fault", self.config.ha.notify_fault.as_ref(), env);
                self.fault = Some(w);
            }
            (Some(was), None) => {
                let reason = format!("fault cleared ({was})");
                info!("This ATM may be primary again: {reason}");
                self.fault = None;
                if self.role_name() == "backup" {
                    self.notify_role(false, &reason, None);
                }
            }
            _ => {}
        }
    }

    /// Whether `line`'s service and server take connections: before a change to it, for
    /// [`Daemon::notify_line`].
    pub(super) fn before(&self, line: &LineKey) -> Option<Before> {
        let a = self.part.atm()?;
        let s = a.plane.services().iter().find(|s| svc_key(s) == line.0)?;
        Some(Before {
            service_up: a.plane.service_up(s),
            server_up: a.plane.up(line),
        })
    }

    /// After a change to `line` (a check's verdict, lb-cli server): the server's
    /// `notify_up`/`notify_down` if it went up or down, then its service's if that did.
    pub(super) fn notify_line(&self, line: &LineKey, before: Option<Before>, reason: &str) {
        let (Some(before), Some(a)) = (before, self.part.atm()) else {
            return;
        };
        let Some(s) = a.plane.services().iter().find(|s| svc_key(s) == line.0) else {
            return;
        };
        let service_env = |event: &str| {
            let mut env = self.hook_env(event, reason, self.role_name());
            env.extend([
                ("LB_SERVICE", s.name.clone()),
                ("LB_PROTOCOL", s.proto_name().to_string()),
                ("LB_VIP", s.vip.to_string()),
                ("LB_VPORT", s.port.to_string()),
            ]);
            env
        };
        let server_up = a.plane.up(line);
        if server_up != before.server_up
            && let Some(v) = s
                .servers
                .iter()
                .find(|v| v.address == line.1 && v.port == line.2)
        {
            let event = if server_up { "up" } else { "down" };
            let mut env = service_env(event);
            env.extend([
                ("LB_SERVER_NAME", v.name.clone()),
                // As a check script's: the server's address and port.
                ("LB_SERVER", v.address.to_string()),
                ("LB_PORT", v.port.to_string()),
                ("LB_METHOD", v.method.name().to_string()),
            ]);
            let (hook, program) = if server_up {
                ("notify_up", &v.notify_up)
            } else {
                ("notify_down", &v.notify_down)
            };
            self.notify(hook, program.as_ref(), env);
        }
        let service_up = a.plane.service_up(s);
        if service_up != before.service_up {
            let (hook, event, program) = if service_up {
                ("notify_up", "up", &s.notify_up)
            } else {
                ("notify_down", "down", &s.notify_down)
            };
            let n = a.plane.servers_up(s);
            let what = match (service_up, s.quorum) {
                (true, 1) => "a server takes connections again".to_string(),
                (false, 1) => "no server takes connections".to_string(),
                (_, q) => format!(
                    "{n} of {} servers take connections, quorum {q}",
                    s.servers.len()
                ),
            };
            let at = SocketAddr::new(s.vip, s.port);
            if service_up {
                info!("Service {} {at} is up: {what}", s.name);
            } else {
                warn!("Service {} {at} is down: {what}", s.name);
            }
            let mut env = service_env(event);
            env.push(("LB_SERVERS_UP", n.to_string()));
            self.notify(hook, program.as_ref(), env);
        }
    }
}
