//! Working a reload or resize out beside the event loop, from a copy of the running plane:
//! what to write into the running dataplane, or a new dataplane to take over.

use std::sync::Arc;

use crate::{
    config::Config,
    dataplane::{self, Capacities, Dataplane, ServiceSpec},
    services::{Changes, Plan, Plane},
};

/// A reload or resize, ready for the loop.
pub(in crate::daemon) struct Prepared {
    /// The plane once it is done.
    pub(super) plane: Plane,
    /// The config a reload brings in; `None` for a write to `config`.
    pub(super) reload: Option<Reload>,
    pub(super) how: How,
}

/// How the dataplane gets there.
pub(super) enum How {
    /// The running dataplane is rewritten: services that leave, lines that leave, and the
    /// services that change with their rows.
    Rewrite {
        removed_services: Vec<u32>,
        removed_lines: Vec<u32>,
        rows: Vec<(u32, Arc<ServiceSpec>, Vec<u32>)>,
    },
    /// A new dataplane (new table sizes), already programmed, replaces the running one.
    Replace(Box<Dataplane>),
}

/// What a reload brings besides the dataplane.
pub(super) struct Reload {
    pub(super) config: Config,
    pub(super) changes: Changes,
}

/// Works out a reload (or, with `config` `None`, a resize to `caps`) from a copy of the
/// running plane, beside the loop.
pub(super) fn prepare(
    running: Plane,
    running_caps: Capacities,
    config: Option<Config>,
    caps: Capacities,
) -> Result<Prepared, String> {
    let Some(config) = config else {
        // A resize: the same services, numbered afresh in a new dataplane.
        let plane = running.compact();
        let dp = build(caps, &plane)?;
        return Ok(Prepared {
            plane,
            reload: None,
            how: How::Replace(Box::new(dp)),
        });
    };
    if caps != running_caps {
        // New tables start empty: plan with room enough for any numbering, then number
        // afresh and check what the new sizes hold.
        let lines: usize = config.services.iter().map(|s| s.servers.len()).sum();
        let room = Capacities {
            services: running_caps.services.max(caps.services) + config.services.len() as u32,
            servers: running_caps.servers.max(caps.servers) + lines as u32,
            connections: caps.connections,
        };
        let plan = running.plan(&config, &room)?;
        let plane = plan.plane.compact();
        plane
            .fits(&caps)
            .map_err(|why| why.replace("the running config needs", "the new config needs"))?;
        let dp = build(caps, &plane)?;
        return Ok(Prepared {
            plane,
            reload: Some(Reload {
                config,
                changes: plan.changes,
            }),
            how: How::Replace(Box::new(dp)),
        });
    }
    let Plan {
        plane,
        removed_services,
        removed_lines,
        changes,
    } = running.plan(&config, &caps)?;
    let before: std::collections::HashMap<u32, ServiceSpec> = running.specs().into_iter().collect();
    let rows = plane
        .specs()
        .into_iter()
        .filter(|(id, spec)| before.get(id) != Some(spec))
        .map(|(id, spec)| {
            let row = dataplane::row(&spec);
            (id, Arc::new(spec), row)
        })
        .collect();
    Ok(Prepared {
        plane,
        reload: Some(Reload { config, changes }),
        how: How::Rewrite {
            removed_services,
            removed_lines,
            rows,
        },
    })
}

/// Loads a dataplane of `caps` and programs `plane`'s services into it (not attached).
pub(super) fn build(caps: Capacities, plane: &Plane) -> Result<Dataplane, String> {
    let mut dp = Dataplane::load(caps).map_err(|e| format!("loading the dataplane: {e}"))?;
    for (id, spec) in plane.specs() {
        dp.install(id, &spec)
            .map_err(|e| format!("programming the new dataplane: {e}"))?;
    }
    Ok(dp)
}
