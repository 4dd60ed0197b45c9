//! The ATMs among themselves: the election's glue, heartbeats and messages, planned
//! handovers and drills, connection sync, and the `track` pinger.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot},
    time::Instant,
};
use tracing::{Instrument, error, info, info_span, warn};

use super::{Daemon, HANDOVER_LIMIT, Ha, Handover, PROMOTE_WAIT, Role, SETTLE};
use crate::{
    config,
    control::Response,
    dataplane,
    ha::{self, Action, Body, Election, Reject, Replay},
    health,
    outbox::{Link, Outbox},
    sync,
};

/// At most one log line about refused ATM messages this often: a flood must not flood the
/// log too.
const REJECT_LOG_EVERY: Duration = Duration::from_secs(10);

/// `track` pings: identifiers from "LB" (0x4c42), so they are told apart from the health
/// checks' (see `health::PING_ID`); one round a second, each answer awaited 800 ms.
const TRACK_PING_ID: u16 = 0x4c42;
const TRACK_EVERY: Duration = Duration::from_secs(1);
const TRACK_TIMEOUT: Duration = Duration::from_millis(800);

impl Daemon {
    /// Sets up the election and, with other ATMs, the authenticated socket to them.
    /// The cluster's shared secret when there are other ATMs to talk to, with its file.
    pub(super) fn cluster_key(&self) -> Result<Option<(Vec<u8>, PathBuf)>> {
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

    pub(super) async fn start_ha(
        &mut self,
        index: usize,
        ifindex: u32,
        key: Option<(Vec<u8>, PathBuf)>,
    ) -> Result<Ha> {
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
        Ok(Ha {
            election: {
                let e = Election::new(
                    index,
                    n,
                    Duration::from_millis(ha_cfg.heartbeat_ms as u64),
                    ha_cfg.dead_after,
                    Instant::now(),
                );
                let e = match ha_cfg.quorum {
                    config::Quorum::Majority if n >= 3 => {
                        info!(
                            "Quorum: this ATM may be primary only while it hears {} of the {n} ATMs (itself included)",
                            n / 2 + 1
                        );
                        e.majority_quorum()
                    }
                    config::Quorum::Majority => {
                        info!("Quorum: not enforced between two ATMs (either may lead alone)");
                        e.majority_quorum()
                    }
                    config::Quorum::None => e,
                };
                let e = if ha_cfg.manager == config::Manager::Pacemaker {
                    info!(
                        "The primary role is Pacemaker's to give (manager = \"pacemaker\"): \
                         this ATM promotes and demotes only when its OCF agent asks"
                    );
                    e.managed()
                } else {
                    e
                };
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
            arrivals: ha::Arrivals::new(n),
            rejects: HashMap::new(),
            last_reject_log: None,
            known_primary: None,
            ask_table: true,
            pending_promote: None,
            local: sync::Local { mac, ifindex },
            fingerprint: ha::config_fingerprint(&self.config),
            configs: vec![None; n],
            ticks: 0,
        })
    }

    /// The new primary of our planned handover is up: forward `SETTLE` more, covering for
    /// it (and it for us) while clients and servers move and the last records cross.
    pub(super) fn overlap(&mut self, primary: usize, now: Instant) {
        let addr = self.config.atms[primary].address;
        let Some(a) = self.part.atm_mut() else { return };
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
    pub(super) fn ha_send(&self, to: Option<usize>, body: Body) {
        if let Some(out) = self.part.ha().and_then(|h| h.out.as_ref()) {
            out.send(to, body);
        }
    }

    pub(super) fn role_index(&self) -> usize {
        match self.role {
            Role::Atm(i) => i,
            Role::Node(_) => usize::MAX,
        }
    }

    /// Every heartbeat interval: renew the dataplane's lease, let the election look at the
    /// clock, then announce ourselves.
    pub(super) async fn on_heartbeat_tick(&mut self) {
        if let Err(e) = self.push_settings() {
            warn!("Renewing the dataplane's lease: {e}");
        }
        if let Some(ha) = self.part.ha_mut()
            && let Some((_, since)) = &ha.pending_promote
            && since.elapsed() > PROMOTE_WAIT
        {
            let (reply, _) = ha.pending_promote.take().expect("pending");
            let _ = reply.send(Response::error(format!(
                "the primary did not hand over within {} s",
                PROMOTE_WAIT.as_secs()
            )));
        }
        if let Some(ha) = self.part.ha_mut()
            && ha
                .handover
                .as_ref()
                .is_some_and(|h| h.since.elapsed() > HANDOVER_LIMIT)
        {
            let h = ha.handover.take().expect("pending");
            let _s = h.span.enter();
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
        // A fault's hook before the role's (see the track outcome in daemon.rs).
        self.look_at_fault();
        self.look_at_election().await;
        self.send_heartbeat().await;
        let every = (1000 / self.config.ha.heartbeat_ms.max(1)).max(1) as u64;
        if let Some(ha) = self.part.ha_mut() {
            ha.ticks += 1;
            if ha.ticks % every == 1 || every == 1 {
                let fp = ha.fingerprint;
                self.ha_send(None, Body::Config(fp));
            }
        }
    }

    /// After a reload: the new config's fingerprint (worked out beside the loop when the
    /// file was read), compared with the other ATMs' and sent to them at once.
    pub(super) fn config_changed(&mut self) {
        let Some(fp) = self.next_fingerprint.take() else {
            return;
        };
        let Some(ha) = self.part.ha_mut() else { return };
        if ha.fingerprint == fp {
            return;
        }
        ha.fingerprint = fp;
        for (i, theirs) in ha.configs.iter().enumerate() {
            let name = &self
                .config
                .atms
                .get(i)
                .map(|a| a.name.as_str())
                .unwrap_or("?");
            match theirs {
                Some(t) if *t == fp => {
                    info!("ATM {name} runs the same config as this ATM now (fingerprint {fp:016x})")
                }
                Some(t) => warn!(
                    "ATM {name} runs another config than this ATM now (fingerprint {t:016x}, \
                     this ATM's {fp:016x}): its services, servers or rings may differ"
                ),
                None => {}
            }
        }
        self.ha_send(None, Body::Config(fp));
    }

    /// A peer's dead interval ran out between ticks: let the election look at once, and
    /// announce a promotion without waiting for the next tick.
    pub(super) async fn on_election_deadline(&mut self) {
        if self.look_at_election().await {
            self.send_heartbeat().await;
        }
    }

    /// Lets the election look at the clock and carries out what it decides; true if it
    /// decided something.
    pub(super) async fn look_at_election(&mut self) -> bool {
        let now = Instant::now();
        let Some(ha) = self.part.ha_mut() else {
            return false;
        };
        heard_on_arrival(ha);
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

    pub(super) async fn send_heartbeat(&mut self) {
        let Some(ha) = self.part.ha() else { return };
        let hb = ha.election.heartbeat(Instant::now());
        self.ha_send(None, Body::Heartbeat(hb));
    }

    /// Logs once when another ATM is seen to become (or stop being) primary.
    pub(super) fn note_primary(&mut self, now: Instant) {
        let names: Vec<String> = self
            .config
            .atms
            .iter()
            .map(|a| format!("{} ({})", a.name, a.address))
            .collect();
        let Some(ha) = self.part.ha_mut() else { return };
        let p = ha.election.primary_peer(now);
        if p != ha.known_primary {
            match (p, ha.known_primary) {
                (Some(i), _) => {
                    info!("ATM {} is primary", names[i]);
                    // A backup that has just found its primary (at start-up, or after a
                    // failover elsewhere) asks for the whole table at once rather than
                    // wait for the next periodic one, up to a minute away.
                    if ha.election.role() == ha::Role::Backup
                        && std::mem::take(&mut ha.ask_table)
                        && let Some(out) = &ha.out
                    {
                        out.send(Some(i), Body::SyncRequest);
                    }
                }
                (None, Some(old)) if !ha.election.alive(old, now) => {
                    warn!("Primary ATM {} stopped answering", names[old]);
                    ha.ask_table = true;
                }
                (None, _) => {}
            }
            ha.known_primary = p;
        }
    }

    /// A datagram on the HA socket.
    pub(super) async fn on_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        let now = Instant::now();
        let cluster = self.config.cluster.name.clone();
        let me = self.role_index();
        let Some(ha) = self.part.ha_mut() else { return };
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
                    .is_none_or(|t| now.duration_since(t) > REJECT_LOG_EVERY)
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
                // The others' heartbeats that arrived since, still queued behind this one,
                // keep them alive while this one's verdict is worked out.
                heard_on_arrival(ha);
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
                let accept = takes_sync_from(ha, from_atm);
                let local = ha.local;
                let expiry = self.expiry();
                if accept
                    && let Some(expiry) = expiry
                    && let Some(a) = self.part.atm_mut()
                {
                    match sync::install(&mut a.dp, &a.plane, &records, local, &expiry) {
                        Ok((_, skipped)) if skipped > 0 => {
                            warn!(
                                "Connection sync: {skipped} records name servers this ATM does not have (configs differ?)"
                            )
                        }
                        Ok(_) => {}
                        Err(e) => warn!("Connection sync: {e}"),
                    }
                    let now = dataplane::now_ns();
                    if let Err(e) = sync::install_persistence(&mut a.dp, &a.plane, &records, now) {
                        warn!("Connection sync, persistence: {e}");
                    }
                }
            }
            Body::Persist(records) => {
                if takes_sync_from(ha, from_atm)
                    && let Some(a) = self.part.atm_mut()
                {
                    let now = dataplane::now_ns();
                    if let Err(e) = sync::install_persistence(&mut a.dp, &a.plane, &records, now) {
                        warn!("Persistence sync: {e}");
                    }
                }
            }
            Body::SyncRequest => {
                if ha.election.role() == ha::Role::Primary {
                    self.full_sync(Some(from_atm));
                }
            }
            Body::Config(theirs) => {
                let mine = ha.fingerprint;
                let was = ha.configs[from_atm].replace(theirs);
                if was != Some(theirs) {
                    let name = &self.config.atms[from_atm].name;
                    if theirs != mine {
                        warn!(
                            "ATM {name} runs another config than this ATM (fingerprint \
                             {theirs:016x}, this ATM's {mine:016x}): its services, servers or \
                             rings may differ; lb-cli status marks it"
                        );
                    } else if was.is_some() {
                        info!("ATM {name} runs the same config as this ATM again");
                    }
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
    pub(super) fn hand_over(
        &mut self,
        to: Option<usize>,
        reply: Option<oneshot::Sender<Response>>,
    ) -> std::result::Result<(), String> {
        let now = Instant::now();
        let ha = self.part.ha().ok_or("this is not an ATM")?;
        if ha.handover.is_some() {
            return Err("a handover is already under way".into());
        }
        let target = to
            .or_else(|| ha.election.successor(now))
            .ok_or("no other ATM is running to take over: staying primary")?;
        let mark = self
            .full_sync(Some(target))
            .ok_or("cannot send the connection table")?;
        let span = info_span!("handover", to = %self.config.atms[target].name);
        span.in_scope(|| info!("Sending the connection table before handing over"));
        let ha = self.part.ha_mut().ok_or("this is not an ATM")?;
        ha.handover = Some(Handover {
            mark,
            target,
            reply,
            since: now,
            span,
        });
        Ok(())
    }

    /// A table transfer has been sent (`whole`: all of it): if a handover waited for it, hand
    /// over now, unless the table could not be read or the target is no longer there to
    /// take over (it died or lost its track addresses meanwhile).
    pub(super) async fn on_transfer_sent(&mut self, mark: u64, whole: bool) {
        let now = Instant::now();
        let Some(ha) = self.part.ha_mut() else { return };
        ha.transfers = ha.transfers.saturating_sub(1);
        if ha.handover.as_ref().is_none_or(|h| h.mark != mark) {
            return;
        }
        let h = ha.handover.take().expect("checked");
        let span = h.span.clone();
        self.finish_handover(h, whole, now).instrument(span).await;
    }

    /// The connection table of handover `h` has been sent (`whole`: all of it): moves the
    /// role, or says why not.
    async fn finish_handover(&mut self, h: Handover, whole: bool, now: Instant) {
        let Some(ha) = self.part.ha_mut() else { return };
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
                // The connections this ATM made up to now (its dataplane hands out only its
                // half of the NAT ports from here on) reach the new primary before the
                // heartbeat that hands over, on the same queue: it must know their NAT pairs
                // before it hands any out.
                self.sync_tick().await;
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
    pub(super) async fn act(&mut self, a: Action) {
        match a {
            Action::BecomePrimary { term, reason, from } => {
                info!("Elected primary (term {term}): {reason}");
                self.notify_role(true, &reason, Some(term));
                let span = info_span!("primary", term);
                if let Err(e) = self.become_primary(from).instrument(span).await {
                    error!("Becoming primary: {e:#}");
                }
                if let Some(ha) = self.part.ha_mut()
                    && let Some((reply, _)) = ha.pending_promote.take()
                {
                    let _ = reply.send(Response::text(format!("{} is primary", self.name)));
                }
                self.send_heartbeat().await;
            }
            Action::BecomeBackup { reason, to } => {
                info!("Becoming backup: {reason}");
                self.notify_role(false, &reason, None);
                if let Err(e) = self
                    .become_backup(to)
                    .instrument(info_span!("backup"))
                    .await
                {
                    error!("Becoming backup: {e:#}");
                }
                // Displaced (two primaries met), this ATM asks the winner for its table now,
                // and otherwise the next primary it finds. Handing over, it sent its own
                // table just before: the other ATM has what this one has, and a second
                // whole table back would only load both.
                if to.is_none() {
                    self.ha_send(None, Body::SyncRequest);
                }
                if let Some(ha) = self.part.ha_mut() {
                    ha.ask_table = to.is_none();
                }
            }
        }
    }

    /// Drains the dataplane's connection events and streams them to the other ATMs. Only a
    /// forwarding dataplane makes events: the primary's, and a former primary's during a
    /// handover's grace (and the last of them just after it), whose connections the new
    /// primary must know, for it now receives the servers' replies.
    pub(super) async fn sync_tick(&mut self) {
        let Some(a) = self.part.atm_mut() else { return };
        let events = a.dp.drain_events();
        if events.is_empty() {
            return;
        }
        let lines = a.plane.lines();
        let records: Vec<ha::SyncRecord> = events
            .iter()
            .filter_map(|e| sync::from_event(e, &lines.server))
            .collect();
        for batch in ha::batches(&records) {
            self.ha_send(None, Body::Sync(batch.to_vec()));
        }
    }

    /// Queues the whole live connection table for one backup, or all of them, and a mark
    /// after it (returned). The table is read and turned into records on a blocking thread:
    /// with millions of connections that takes long enough to starve the heartbeats.
    pub(super) fn full_sync(&mut self, to: Option<usize>) -> Option<u64> {
        let expiry = self.expiry()?;
        let (a, ha) = self.part.atm_and_ha()?;
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
        // Persistence entries go after the connections (sticky services only).
        let persist = if a.plane.lines().persist.is_empty() {
            None
        } else {
            a.dp.persist_table()
                .inspect_err(|e| warn!("Reading the persistence entries for sync: {e}"))
                .ok()
        };
        let lines = a.plane.lines();
        ha.next_mark += 1;
        let mark = ha.next_mark;
        ha.transfers += 1;
        crate::background(move || {
            let whole = match table.entries() {
                Ok(all) => {
                    let records =
                        sync::full_table(&all, &lines.server, &expiry, dataplane::now_ns());
                    for batch in ha::batches(&records) {
                        out.send_bulk(to, Body::Sync(batch.to_vec()));
                    }
                    true
                }
                Err(e) => {
                    warn!("Reading the connection table for sync: {e}");
                    false
                }
            };
            if let Some(p) = persist {
                let records = sync::persist_records(&p.entries(), &lines, dataplane::now_ns());
                for batch in ha::batches(&records) {
                    out.send_bulk(to, Body::Persist(batch.to_vec()));
                }
            }
            out.mark(mark, whole);
        });
        Some(mark)
    }

    /// The periodic full table for every backup, unless a transfer is still going out (a
    /// big table on a slow link must not pile up copies of itself).
    pub(super) fn periodic_full_sync(&mut self) {
        if self.part.ha().is_some_and(|h| h.transfers == 0) {
            self.full_sync(None);
        }
    }

    /// `lb-cli promote`: with a live primary, ask it to hand over (the answer comes when
    /// this ATM is primary); without one, take over at once.
    pub(super) async fn promote(&mut self, reply: oneshot::Sender<Response>) {
        let now = Instant::now();
        let Some(ha) = self.part.ha_mut() else {
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
        let votes = ha.election.votes(now);
        if !votes.quorate() {
            let _ = reply.send(Response::error(format!(
                "this ATM may not become primary: it hears {} of {} ATMs (itself included), {} needed for quorum",
                votes.heard,
                votes.expected,
                votes.needed.unwrap_or(0)
            )));
            return;
        }
        info!("Promotion requested by lb-cli");
        // Under a cluster manager the old primary has been demoted (or is gone): no yield.
        let primary = ha
            .election
            .primary_peer(now)
            .filter(|_| !ha.election.is_managed());
        match primary {
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
    pub(super) async fn demote(&mut self, reply: oneshot::Sender<Response>) {
        let Some(ha) = self.part.ha() else {
            let _ = reply.send(Response::error("this is not an ATM"));
            return;
        };
        if ha.election.role() != ha::Role::Primary {
            let _ = reply.send(Response::error("this ATM is not primary"));
            return;
        }
        info!("Demotion requested by lb-cli");
        if ha.election.is_managed() {
            // No handover: the manager promotes the next primary once this demote is done,
            // and that ATM has the connections from the sync stream.
            if let Some(a) = self.part.ha_mut().and_then(|h| h.election.step_down()) {
                self.act(a).await;
            }
            let _ = reply.send(Response::text(format!("{} is backup", self.name)));
            return;
        }
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
}

/// Pings the `track` addresses every second; reports when reaching all of them (two
/// answers in a row) or not (two misses in a row) changes.
pub(super) async fn track(addrs: Vec<IpAddr>, tx: mpsc::Sender<bool>) {
    // One ICMP socket per family that is tracked.
    let mut clients = Vec::new();
    for v6 in [false, true] {
        if !addrs.iter().any(|a| a.is_ipv6() == v6) {
            continue;
        }
        match health::ping::client(v6) {
            Ok(c) => clients.push((v6, c)),
            Err(e) => {
                error!("Cannot ping the track addresses: {e}");
                let _ = tx.send(false).await;
                return;
            }
        }
    }
    let mut pingers = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let id = TRACK_PING_ID + i as u16;
        let (_, client) = clients
            .iter()
            .find(|(v6, _)| *v6 == a.is_ipv6())
            .expect("a client for each family tracked");
        pingers.push(health::ping::Pinger::new(client, *a, id, TRACK_TIMEOUT).await);
    }
    // The first round decides (the election waits for it); after that it takes two in a
    // row to change the verdict, so one lost ping moves nothing.
    let mut verdict: Option<health::Tracker> = None;
    loop {
        let mut all = true;
        for p in &mut pingers {
            all &= p.once().await.is_none();
        }
        let changed = match verdict.as_mut() {
            None => {
                verdict = Some(health::Tracker::starting(all, 2, 2));
                true
            }
            Some(t) => t.record(all),
        };
        if changed
            && let Some(t) = &verdict
            && tx.send(t.healthy()).await.is_err()
        {
            return;
        }
        tokio::time::sleep(TRACK_EVERY).await;
    }
}

/// Whether this ATM takes connection and persistence records from ATM `from`: from the
/// primary, or (as a new primary) from a former one forwarding in its handover grace; not
/// between two primaries of a split brain.
fn takes_sync_from(ha: &Ha, from: usize) -> bool {
    let sender_primary = ha
        .election
        .peers()
        .get(from)
        .and_then(|p| p.heartbeat)
        .is_some_and(|h| h.role == ha::Role::Primary);
    ha.election.role() == ha::Role::Backup || !sender_primary
}

/// Tells the election which peers' heartbeats have arrived (`ha::Arrivals`) that the loop
/// has not read yet: a backup working through a whole table must not take a live primary
/// for dead because its heartbeats wait behind the records.
fn heard_on_arrival(ha: &mut Ha) {
    for (i, at) in ha.arrivals.latest().into_iter().enumerate() {
        if let Some(at) = at {
            ha.election.heard_at(i, at);
        }
    }
}
