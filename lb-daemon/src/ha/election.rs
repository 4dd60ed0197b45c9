//! The election as a pure state machine that the daemon feeds with heartbeats and clock
//! ticks; it answers with actions.

use std::time::Duration;

use tokio::time::Instant;

use lb_api::views::QuorumStatus as Votes;

use super::wire::{Heartbeat, Role};

/// What the election asks the daemon to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `from`: in a planned handover, the ATM handing over (still forwarding for a moment).
    BecomePrimary {
        term: u64,
        reason: String,
        from: Option<usize>,
    },
    /// `to`: in a planned handover, the ATM named to take over, about to.
    BecomeBackup { reason: String, to: Option<usize> },
}

/// What this ATM knows of another.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub last_heard: Option<Instant>,
    pub heartbeat: Option<Heartbeat>,
}

/// The election, as a pure state machine: feed it heartbeats and ticks with the time; it
/// answers with at most one action each time.
#[derive(Clone, Debug)]
pub struct Election {
    me: usize,
    /// A peer unheard for this long is down.
    dead: Duration,
    /// One heartbeat interval.
    heartbeat: Duration,
    /// A backup looks for a primary until then before it may stand: `dead` after start-up,
    /// and after regaining quorum (a primary on the other side of a healed partition is
    /// heard within that time; promoting on the first heartbeat heard would make a second
    /// primary of the same term, which the higher-listed wins).
    looking_until: Instant,
    role: Role,
    /// The highest term seen (ours when primary).
    term: u64,
    /// Reaches its `track` addresses.
    eligible: bool,
    peers: Vec<Peer>,
    /// After handing over on purpose: stand aside until another ATM is primary, or until this.
    stand_aside_until: Option<Instant>,
    /// During a planned handover: who is to take over.
    yield_to: Option<usize>,
    /// `[ha] quorum = "majority"` among three ATMs or more: only an ATM that hears a
    /// majority of the listed ATMs (itself included) may be or become primary.
    majority: bool,
    /// `[ha] manager = "pacemaker"`: the role changes only when asked ([`Election::force_promote`],
    /// [`Election::step_down`]), and when another ATM was promoted later (two primaries: a
    /// node the manager lost, unfenced, keeps its role until it hears the new one).
    managed: bool,
}

impl Election {
    /// ATM `me` of `n`, heartbeats every `heartbeat`, peers dead after `dead_after` missed.
    pub fn new(
        me: usize,
        n: usize,
        heartbeat: Duration,
        dead_after: u32,
        now: Instant,
    ) -> Election {
        Election {
            me,
            dead: heartbeat * dead_after,
            heartbeat,
            looking_until: now + heartbeat * dead_after,
            role: Role::Backup,
            term: 0,
            eligible: true,
            peers: vec![
                Peer {
                    last_heard: None,
                    heartbeat: None
                };
                n
            ],
            stand_aside_until: None,
            yield_to: None,
            majority: false,
            managed: false,
        }
    }

    /// `[ha] manager = "pacemaker"`: a cluster manager decides the role (module docs).
    pub fn managed(mut self) -> Election {
        self.managed = true;
        self.majority = false;
        self
    }

    pub fn is_managed(&self) -> bool {
        self.managed
    }

    /// `[ha] quorum = "majority"`: enforced with three ATMs or more; two keep the election
    /// without quorum, as corosync's `two_node` does (either may lead alone, or a failover
    /// could never happen).
    pub fn majority_quorum(mut self) -> Election {
        self.majority = self.peers.len() >= 3;
        self
    }

    /// This ATM and the peers heard within the dead interval, out of all listed, and the
    /// majority needed when quorum is enforced.
    pub fn votes(&self, now: Instant) -> Votes {
        let n = self.peers.len();
        Votes {
            heard: 1 + (0..n).filter(|i| self.alive(*i, now)).count(),
            expected: n,
            needed: self.majority.then_some(n / 2 + 1),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// Whether peer `i` was heard within the dead interval.
    pub fn alive(&self, i: usize, now: Instant) -> bool {
        i != self.me
            && self.peers[i]
                .last_heard
                .is_some_and(|t| now.duration_since(t) <= self.dead)
    }

    /// Whether peer `i` is alive and may become primary.
    pub fn can_take_over(&self, i: usize, now: Instant) -> bool {
        self.alive(i, now) && self.peers[i].heartbeat.is_some_and(|h| h.candidate)
    }

    /// The highest-listed peer that can take over, if any.
    pub fn successor(&self, now: Instant) -> Option<usize> {
        (0..self.peers.len()).find(|i| self.can_take_over(*i, now))
    }

    /// The peer announcing itself primary, if any, heard within [`Election::primary_lease`].
    pub fn primary_peer(&self, now: Instant) -> Option<usize> {
        let lease = self.primary_lease();
        (0..self.peers.len()).find(|i| {
            *i != self.me
                && self.peers[*i]
                    .last_heard
                    .is_some_and(|t| now.duration_since(t) <= lease)
                && self.peers[*i]
                    .heartbeat
                    .is_some_and(|h| h.role == Role::Primary)
        })
    }

    /// How long a backup counts a silent primary as primary. Without quorum, the dead
    /// interval. Under majority quorum, two heartbeat intervals more: a primary cut off from
    /// the majority steps down once it has heard none of it for the dead interval, and its
    /// last heartbeat heard by the others may be up to one interval older than the last one
    /// it heard from them; the second interval is the margin for it to remove its addresses.
    /// So the two sides of a partition never hold the VIP at the same moment.
    pub fn primary_lease(&self) -> Duration {
        if self.majority {
            self.dead + self.heartbeat * 2
        } else {
            self.dead
        }
    }

    fn candidate(&self, now: Instant) -> bool {
        self.eligible
            && self.stand_aside_until.is_none_or(|t| now >= t)
            && self.votes(now).quorate()
    }

    /// What to announce now.
    pub fn heartbeat(&self, now: Instant) -> Heartbeat {
        Heartbeat {
            role: self.role,
            term: self.term,
            candidate: self.candidate(now),
            yield_to: self.yield_to.map(|i| i as u16),
        }
    }

    /// Not eligible until [`Election::set_eligible`] says so: an ATM with `track` addresses
    /// stands for primary only once it has seen them answer.
    pub fn awaiting_track(mut self) -> Election {
        self.eligible = false;
        self
    }

    /// Whether this ATM may become primary (it reaches its `track` addresses).
    pub fn eligible(&self) -> bool {
        self.eligible
    }

    /// Whether this ATM may become primary (reaches its `track` addresses).
    pub fn set_eligible(&mut self, ok: bool, now: Instant) -> Option<Action> {
        self.eligible = ok;
        self.evaluate(now)
    }

    /// Peer `from`'s heartbeat arrived `at` (`Arrivals`), and the loop has not read it yet:
    /// a peer alive until then stays alive from then on. What it said waits for
    /// [`Election::on_heartbeat`], so this never brings back a peer that had gone silent
    /// longer than the dead interval (or was never heard): its last heartbeat's role and
    /// term are stale, and would count as its word (after a partition healed, a former
    /// primary took its peers for the backups they had been and promoted itself).
    pub fn heard_at(&mut self, from: usize, at: Instant) {
        if from == self.me {
            return;
        }
        let dead = self.dead;
        if let Some(p) = self.peers.get_mut(from)
            && p.heartbeat.is_some()
            && p.last_heard
                .is_some_and(|t| t < at && at.duration_since(t) <= dead)
        {
            p.last_heard = Some(at);
        }
    }

    pub fn on_heartbeat(&mut self, from: usize, hb: Heartbeat, now: Instant) -> Option<Action> {
        if from == self.me || from >= self.peers.len() {
            return None;
        }
        let was_quorate = self.votes(now).quorate();
        self.peers[from] = Peer {
            last_heard: Some(now),
            heartbeat: Some(hb),
        };
        if !was_quorate && self.votes(now).quorate() {
            self.looking_until = self.looking_until.max(now + self.dead);
        }
        if hb.role == Role::Primary {
            // Someone else leads now: a handover is over, and nobody needs to stand aside.
            self.stand_aside_until = None;
            self.yield_to = None;
            if self.role == Role::Primary {
                // Two primaries: the later promotion wins; on equal terms the higher-listed.
                let theirs = (hb.term, std::cmp::Reverse(from));
                let ours = (self.term, std::cmp::Reverse(self.me));
                self.term = self.term.max(hb.term);
                if theirs > ours {
                    self.role = Role::Backup;
                    return Some(Action::BecomeBackup {
                        reason: format!(
                            "ATM {from} is primary with term {} (ours {})",
                            hb.term, ours.0
                        ),
                        to: None,
                    });
                }
                return None;
            }
            self.term = self.term.max(hb.term);
            return None;
        }
        if self.managed {
            // A peer's yield, a dead primary: the cluster manager's to act on, not ours.
            return None;
        }
        if hb.yield_to == Some(self.me as u16)
            && self.role == Role::Backup
            && self.eligible
            && self.votes(now).quorate()
        {
            return self.promote(
                now,
                format!("ATM {from} hands over to this ATM"),
                Some(from),
            );
        }
        self.evaluate(now)
    }

    pub fn tick(&mut self, now: Instant) -> Option<Action> {
        self.evaluate(now)
    }

    /// The next instant after `now` at which the passing of time alone can change the
    /// election's answer: a peer's dead interval running out, the start-up search ending, a
    /// stand-aside ending. The daemon wakes at it, so a dead primary is replaced exactly
    /// `dead_after × heartbeat_ms` after it was last heard, not at the next heartbeat tick.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        // A primary under quorum wakes when a peer's dead interval runs out, to count again.
        if self.role == Role::Primary && !self.majority {
            return None;
        }
        // `alive` counts a peer heard exactly `dead` ago as alive: the deadline is just after.
        let after = |t: Instant| t + self.dead + Duration::from_millis(1);
        // A silent primary's lease, which may run out later than its dead interval.
        let lease = self.primary_lease();
        let lease_end = self.peers.iter().filter_map(|p| {
            p.heartbeat
                .is_some_and(|h| h.role == Role::Primary)
                .then_some(p.last_heard?)
                .map(|t| t + lease + Duration::from_millis(1))
        });
        self.peers
            .iter()
            .filter_map(|p| p.last_heard.map(after))
            .chain(lease_end)
            .chain([self.looking_until])
            .chain(self.stand_aside_until)
            .filter(|t| *t > now)
            .min()
    }

    fn promote(&mut self, _now: Instant, reason: String, from: Option<usize>) -> Option<Action> {
        self.role = Role::Primary;
        self.term += 1;
        self.stand_aside_until = None;
        self.yield_to = None;
        Some(Action::BecomePrimary {
            term: self.term,
            reason,
            from,
        })
    }

    fn evaluate(&mut self, now: Instant) -> Option<Action> {
        if self.managed {
            return None;
        }
        if self.role == Role::Primary {
            if !self.eligible {
                self.role = Role::Backup;
                return Some(Action::BecomeBackup {
                    reason: "this ATM no longer reaches its track addresses".into(),
                    to: None,
                });
            }
            let votes = self.votes(now);
            if !votes.quorate() {
                self.role = Role::Backup;
                return Some(Action::BecomeBackup {
                    reason: format!(
                        "quorum lost: this ATM hears {} of {} ATMs (itself included), {} needed",
                        votes.heard,
                        votes.expected,
                        votes.needed.unwrap_or(0)
                    ),
                    to: None,
                });
            }
            return None;
        }
        if now < self.looking_until {
            return None; // still looking for a primary
        }
        if self.primary_peer(now).is_some() || !self.candidate(now) {
            return None;
        }
        // A handover to another live ATM is under way: let it happen.
        if (0..self.peers.len()).any(|i| {
            self.alive(i, now)
                && self.peers[i].heartbeat.is_some_and(|h| {
                    h.yield_to
                        .is_some_and(|t| t as usize != self.me && self.alive(t as usize, now))
                })
        }) {
            return None;
        }
        // The highest-listed running candidate takes it.
        if (0..self.me).any(|i| self.can_take_over(i, now)) {
            return None;
        }
        let reason = if self.peers.iter().all(|p| p.last_heard.is_none()) {
            format!(
                "no primary ATM answered within {} ms",
                self.dead.as_millis()
            )
        } else {
            "no primary ATM is alive and this is the highest-listed running ATM".to_string()
        };
        self.promote(now, reason, None)
    }

    /// A planned handover (`lb-cli demote`, or a backup's `Yield`): become backup, name the
    /// ATM to take over, and stand aside until it has (or for a while if nobody does).
    pub fn hand_over(&mut self, to: Option<usize>, now: Instant) -> Option<Action> {
        if self.role != Role::Primary {
            return None;
        }
        let to = to.or_else(|| self.successor(now));
        self.role = Role::Backup;
        self.yield_to = to;
        self.stand_aside_until = Some(now + self.dead * 4);
        Some(Action::BecomeBackup {
            reason: match to {
                Some(i) => format!("handing over to ATM {i}"),
                None => "demoted with no other ATM running".into(),
            },
            to,
        })
    }

    /// Under a cluster manager, `lb-cli demote` (the OCF agent's demote): backup at once.
    pub fn step_down(&mut self) -> Option<Action> {
        if self.role != Role::Primary {
            return None;
        }
        self.role = Role::Backup;
        Some(Action::BecomeBackup {
            reason: "demoted by the cluster manager".into(),
            to: None,
        })
    }

    /// A primary's daemon re-executed itself (`lb-cli restart`): primary of `term` again
    /// at once, eligible until its track addresses say otherwise (the old program found
    /// them answering), not looking for another.
    pub fn resume_primary(&mut self, term: u64, now: Instant) {
        self.role = Role::Primary;
        self.term = term;
        self.eligible = true;
        self.looking_until = now;
    }

    /// `lb-cli promote` when no primary is alive, or under a cluster manager: take over at
    /// once.
    pub fn force_promote(&mut self, now: Instant) -> Option<Action> {
        if self.role == Role::Primary || !self.eligible || !self.votes(now).quorate() {
            return None;
        }
        let by = if self.managed {
            "promoted by the cluster manager"
        } else {
            "promoted by lb-cli"
        };
        self.promote(now, by.into(), None)
    }

    /// Milliseconds since peer `i` was last heard.
    pub fn last_heard_ms(&self, i: usize, now: Instant) -> Option<u64> {
        self.peers[i]
            .last_heard
            .map(|t| now.duration_since(t).as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;
    const HB: Duration = Duration::from_millis(100);

    /// Three ATMs on a simulated network: each tick every running ATM announces itself to
    /// the others (unless the link between them is cut).
    struct Net {
        atms: Vec<Option<Election>>,
        cut: Vec<(usize, usize)>,
        log: Vec<(usize, Action)>,
        majority: bool,
    }

    impl Net {
        fn new(n: usize) -> Net {
            let mut net = Net {
                atms: Vec::new(),
                cut: Vec::new(),
                log: Vec::new(),
                majority: false,
            };
            net.atms = (0..n).map(|i| Some(net.election(i, n))).collect();
            net
        }
        /// With `[ha] quorum = "majority"`.
        fn majority(n: usize) -> Net {
            let mut net = Net::new(n);
            net.majority = true;
            net.atms = (0..n).map(|i| Some(net.election(i, n))).collect();
            net
        }
        fn election(&self, i: usize, n: usize) -> Election {
            let e = Election::new(i, n, HB, 3, Instant::now());
            if self.majority {
                e.majority_quorum()
            } else {
                e
            }
        }
        fn start(&mut self, i: usize) {
            let n = self.atms.len();
            self.atms[i] = Some(self.election(i, n));
        }
        /// Cuts `a` off from every other ATM.
        fn isolate(&mut self, a: usize) {
            for b in 0..self.atms.len() {
                if b != a {
                    self.cut.push((a, b));
                }
            }
        }
        fn kill(&mut self, i: usize) {
            self.atms[i] = None;
        }
        fn linked(&self, a: usize, b: usize) -> bool {
            !self.cut.contains(&(a, b)) && !self.cut.contains(&(b, a))
        }
        /// One heartbeat interval.
        async fn step(&mut self) {
            advance(HB).await;
            let now = Instant::now();
            let beats: Vec<(usize, Heartbeat)> = self
                .atms
                .iter()
                .enumerate()
                .filter_map(|(i, a)| a.as_ref().map(|a| (i, a.heartbeat(now))))
                .collect();
            for (from, hb) in beats {
                for to in 0..self.atms.len() {
                    if to != from
                        && self.linked(from, to)
                        && let Some(a) = self.atms[to].as_mut()
                        && let Some(act) = a.on_heartbeat(from, hb, now)
                    {
                        self.log.push((to, act));
                    }
                }
            }
            for i in 0..self.atms.len() {
                if let Some(a) = self.atms[i].as_mut()
                    && let Some(act) = a.tick(now)
                {
                    self.log.push((i, act));
                }
            }
        }
        async fn steps(&mut self, n: usize) {
            for _ in 0..n {
                self.step().await;
            }
        }
        fn primaries(&self) -> Vec<usize> {
            self.atms
                .iter()
                .enumerate()
                .filter(|(_, a)| a.as_ref().is_some_and(|a| a.role() == Role::Primary))
                .map(|(i, _)| i)
                .collect()
        }
    }

    /// A heartbeat that arrived but waits behind other work keeps its sender alive from its
    /// arrival; a peer never heard from is not made alive by it.
    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_counts_from_its_arrival_not_from_when_it_is_read() {
        let mut e = Election::new(0, 3, HB, 3, Instant::now());
        let hb = Heartbeat {
            role: Role::Primary,
            term: 1,
            candidate: true,
            yield_to: None,
        };
        assert_eq!(e.on_heartbeat(1, hb, Instant::now()), None);
        advance(HB * 2).await;
        let arrived = Instant::now();
        e.heard_at(1, arrived);
        e.heard_at(2, arrived);
        advance(HB * 2).await;
        // Four intervals since it was read, two since the next one arrived: alive.
        assert!(e.alive(1, Instant::now()));
        assert_eq!(e.primary_peer(Instant::now()), Some(1));
        assert!(!e.alive(2, Instant::now()), "never heard: not alive");
        // An older arrival does not move it back.
        e.heard_at(1, arrived - HB);
        advance(HB * 2).await;
        assert!(
            !e.alive(1, Instant::now()),
            "four intervals since it arrived"
        );
        // Silent past the dead interval, it comes back only with what it says.
        e.heard_at(1, Instant::now());
        assert!(!e.alive(1, Instant::now()), "a stale word would count");
        e.on_heartbeat(1, hb, Instant::now());
        assert!(e.alive(1, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_highest_listed_running_atm_becomes_primary_after_looking() {
        let mut net = Net::new(3);
        net.steps(2).await;
        assert!(net.primaries().is_empty(), "still looking for a primary");
        net.steps(2).await;
        assert_eq!(net.primaries(), vec![0]);
        net.steps(20).await;
        assert_eq!(net.primaries(), vec![0], "stable");
    }

    #[tokio::test(start_paused = true)]
    async fn a_backup_promotes_at_the_deadline_not_at_the_next_tick() {
        let t0 = Instant::now();
        let mut b = Election::new(1, 2, HB, 3, t0);
        let primary = Heartbeat {
            role: Role::Primary,
            term: 1,
            candidate: true,
            yield_to: None,
        };
        // The primary's last heartbeat arrives 40 ms into an interval, then it dies.
        let last = t0 + Duration::from_millis(540);
        assert_eq!(b.on_heartbeat(0, primary, last), None);
        let deadline = b.next_deadline(last).expect("a deadline while backup");
        assert_eq!(deadline, last + Duration::from_millis(301));
        assert_eq!(b.tick(deadline - Duration::from_millis(2)), None);
        assert!(matches!(
            b.tick(deadline),
            Some(Action::BecomePrimary { term: 2, .. })
        ));
        assert_eq!(
            b.next_deadline(deadline),
            None,
            "a primary waits for nothing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_primary_is_replaced_within_dead_after_and_does_not_preempt_on_return() {
        let mut net = Net::new(3);
        net.steps(5).await;
        assert_eq!(net.primaries(), vec![0]);
        net.kill(0);
        net.steps(3).await;
        assert!(net.primaries().is_empty() || net.primaries() == vec![1]);
        net.steps(2).await;
        assert_eq!(
            net.primaries(),
            vec![1],
            "the highest-listed running backup"
        );
        assert!(
            matches!(
                net.log.last(),
                Some((1, Action::BecomePrimary { from: None, .. }))
            ),
            "a failover hands nothing over: {:?}",
            net.log
        );
        net.start(0);
        net.steps(30).await;
        assert_eq!(
            net.primaries(),
            vec![1],
            "a returning former primary stays backup"
        );
        assert_eq!(net.atms[0].as_ref().unwrap().role(), Role::Backup);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_late_starter_does_not_preempt() {
        let mut net = Net::new(2);
        net.kill(0);
        net.steps(5).await;
        assert_eq!(net.primaries(), vec![1], "alone, the second ATM takes over");
        net.start(0);
        net.steps(10).await;
        assert_eq!(net.primaries(), vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn split_brain_heals_to_the_later_promotion() {
        let mut net = Net::new(2);
        net.steps(5).await;
        assert_eq!(net.primaries(), vec![0]);
        net.cut.push((0, 1));
        net.steps(5).await;
        assert_eq!(net.primaries(), vec![0, 1], "both lead while cut off");
        let t1 = net.atms[1].as_ref().unwrap().term();
        assert!(t1 > net.atms[0].as_ref().unwrap().term());
        net.cut.clear();
        net.step().await;
        assert_eq!(
            net.primaries(),
            vec![1],
            "one heartbeat after the heal, the later promotion"
        );
        net.steps(20).await;
        assert_eq!(net.primaries(), vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn two_primaries_on_equal_terms_settle_on_the_higher_listed() {
        let hb = |term| Heartbeat {
            role: Role::Primary,
            term,
            candidate: true,
            yield_to: None,
        };
        let now = Instant::now();
        let mut first = Election::new(0, 2, Duration::from_millis(100), 3, now);
        let mut second = Election::new(1, 2, Duration::from_millis(100), 3, now);
        assert!(first.force_promote(now).is_some());
        assert!(second.force_promote(now).is_some());
        assert_eq!((first.term(), second.term()), (1, 1));
        assert_eq!(
            first.on_heartbeat(1, hb(1), now),
            None,
            "the first keeps it"
        );
        assert_eq!(first.role(), Role::Primary);
        assert!(matches!(
            second.on_heartbeat(0, hb(1), now),
            Some(Action::BecomeBackup { to: None, .. })
        ));
        assert_eq!(second.role(), Role::Backup);
    }

    #[tokio::test(start_paused = true)]
    async fn a_planned_handover_moves_the_role_both_ways() {
        let mut net = Net::new(3);
        net.steps(5).await;
        assert_eq!(net.primaries(), vec![0]);
        let now = Instant::now();
        let act = net.atms[0].as_mut().unwrap().hand_over(Some(2), now);
        assert!(matches!(
            act,
            Some(Action::BecomeBackup { to: Some(2), .. })
        ));
        net.step().await;
        assert_eq!(
            net.primaries(),
            vec![2],
            "the named ATM takes over at the next heartbeat"
        );
        // Each knows the other for the moment they both forward (docs/HA.md).
        assert!(
            matches!(
                net.log.last(),
                Some((2, Action::BecomePrimary { from: Some(0), .. }))
            ),
            "{:?}",
            net.log
        );
        net.steps(30).await;
        assert_eq!(
            net.primaries(),
            vec![2],
            "and keeps it: the old primary stood aside"
        );
        let now = Instant::now();
        net.atms[2].as_mut().unwrap().hand_over(None, now);
        net.step().await;
        assert_eq!(
            net.primaries(),
            vec![0],
            "back to the highest-listed candidate"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_atm_awaiting_its_track_addresses_does_not_promote_until_they_answer() {
        let t0 = Instant::now();
        let mut e = Election::new(0, 1, Duration::from_millis(100), 3, t0).awaiting_track();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            e.tick(Instant::now()),
            None,
            "a lone ATM waits for its track"
        );
        assert_eq!(e.role(), Role::Backup);
        assert!(matches!(
            e.set_eligible(true, Instant::now()),
            Some(Action::BecomePrimary { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_atm_that_cannot_reach_its_track_addresses_never_promotes() {
        let mut net = Net::new(2);
        net.atms[0].as_mut().unwrap().eligible = false;
        net.steps(10).await;
        assert_eq!(
            net.primaries(),
            vec![1],
            "the ineligible first ATM gives way"
        );
        let now = Instant::now();
        let act = net.atms[1].as_mut().unwrap().set_eligible(false, now);
        assert!(matches!(act, Some(Action::BecomeBackup { .. })));
        net.steps(10).await;
        assert!(net.primaries().is_empty(), "nobody may lead");
    }

    #[tokio::test(start_paused = true)]
    async fn with_majority_quorum_an_atm_alone_never_promotes() {
        let mut net = Net::majority(3);
        net.kill(1);
        net.kill(2);
        net.steps(50).await;
        assert!(net.primaries().is_empty(), "1 of 3 is no majority");
        let now = Instant::now();
        let a = net.atms[0].as_mut().unwrap();
        assert_eq!(
            a.votes(now),
            Votes {
                heard: 1,
                expected: 3,
                needed: Some(2)
            }
        );
        assert_eq!(a.force_promote(now), None, "lb-cli promote is refused too");
        net.start(2);
        net.steps(5).await;
        assert_eq!(net.primaries(), vec![0], "2 of 3 elect one");
    }

    #[tokio::test(start_paused = true)]
    async fn with_majority_quorum_a_cut_off_primary_demotes_and_the_majority_elects_one() {
        let mut net = Net::majority(3);
        net.steps(5).await;
        assert_eq!(net.primaries(), vec![0]);
        net.isolate(0);
        // The dead interval is 3 heartbeats: by then the minority's primary has counted
        // itself alone; two intervals later the two others elect the higher-listed of them.
        net.steps(4).await;
        assert_eq!(net.primaries(), Vec::<usize>::new(), "{:?}", net.log);
        net.steps(2).await;
        assert_eq!(net.primaries(), vec![1], "{:?}", net.log);
        assert!(
            net.log.iter().any(|(i, a)| *i == 0
                && matches!(a, Action::BecomeBackup { reason, .. } if reason.starts_with("quorum lost"))),
            "{:?}",
            net.log
        );
        // Never two primaries while cut off, however long.
        for _ in 0..50 {
            net.step().await;
            assert_eq!(net.primaries(), vec![1]);
        }
        net.cut.clear();
        for _ in 0..30 {
            net.step().await;
            assert_eq!(net.primaries(), vec![1], "healed: exactly one primary");
        }
    }

    /// The worst case of a partition's timing: the primary's last heartbeat reaches the
    /// others one interval (less a millisecond) before their last ones reach it. Each ATM
    /// acts at its own deadlines; at no instant are two primary.
    #[tokio::test(start_paused = true)]
    async fn with_majority_quorum_a_cut_off_primary_steps_down_before_another_takes_over() {
        let t0 = Instant::now();
        let mut atms: Vec<Election> = (0..3)
            .map(|i| Election::new(i, 3, HB, 3, t0).majority_quorum())
            .collect();
        // `from`'s heartbeat of `sent`, heard by each of `to` at `heard`.
        let send = |atms: &mut Vec<Election>, from: usize, to: &[usize], sent, heard| {
            let hb = atms[from].heartbeat(sent);
            for t in to {
                atms[*t].on_heartbeat(from, hb, heard);
            }
        };
        // Everyone hears everyone until atm0 is primary.
        let mut now = t0;
        for _ in 0..6 {
            now += HB;
            for from in 0..3 {
                let others: Vec<usize> = (0..3).filter(|t| *t != from).collect();
                send(&mut atms, from, &others, now, now);
            }
            for a in atms.iter_mut() {
                a.tick(now);
            }
        }
        assert_eq!(atms[0].role(), Role::Primary);
        // The cut at `c`: atm0 was last heard at c - HB + 1 ms, the others at c.
        let c = now + HB;
        send(&mut atms, 0, &[1, 2], c, c - HB + Duration::from_millis(1));
        send(&mut atms, 1, &[0, 2], c, c);
        send(&mut atms, 2, &[0, 1], c, c);
        // Then atm1 and atm2 still hear each other every interval; atm0 hears nobody.
        // Step a millisecond at a time, each acting at its deadlines.
        let mut stepped_down = None;
        let mut took_over = None;
        let mut t = c;
        while t < c + HB * 10 {
            t += Duration::from_millis(1);
            if (t - c).as_millis().is_multiple_of(HB.as_millis()) {
                send(&mut atms, 1, &[2], t, t);
                send(&mut atms, 2, &[1], t, t);
            }
            for (i, a) in atms.iter_mut().enumerate() {
                match a.tick(t) {
                    Some(Action::BecomeBackup { .. }) if i == 0 => stepped_down = Some(t),
                    Some(Action::BecomePrimary { .. }) if i == 1 => took_over = Some(t),
                    _ => {}
                }
            }
            let primaries = atms.iter().filter(|a| a.role() == Role::Primary).count();
            assert!(primaries <= 1, "two primaries at {:?}", t - c);
        }
        let (down, up) = (stepped_down.unwrap(), took_over.unwrap());
        assert!(
            up - down >= HB - Duration::from_millis(2),
            "a margin of an interval: {down:?} {up:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_majority_quorum_a_primary_wakes_to_count_its_votes() {
        let t0 = Instant::now();
        let mut p = Election::new(0, 3, HB, 3, t0).majority_quorum();
        let beat = Heartbeat {
            role: Role::Backup,
            term: 0,
            candidate: true,
            yield_to: None,
        };
        let at = t0 + Duration::from_millis(300);
        // Quorum gained: it looks for a primary for a dead interval first.
        assert_eq!(p.on_heartbeat(1, beat, at), None);
        let beat_at = at + Duration::from_millis(200);
        assert_eq!(p.on_heartbeat(1, beat, beat_at), None);
        assert!(matches!(
            p.tick(at + Duration::from_millis(300)),
            Some(Action::BecomePrimary { .. })
        ));
        assert_eq!(
            p.next_deadline(at + Duration::from_millis(310)),
            Some(beat_at + Duration::from_millis(301)),
            "the backup's dead interval"
        );
        assert!(matches!(
            p.tick(beat_at + Duration::from_millis(301)),
            Some(Action::BecomeBackup { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn two_atms_keep_their_election_with_majority_quorum() {
        let mut net = Net::majority(2);
        net.steps(5).await;
        assert_eq!(net.primaries(), vec![0]);
        net.kill(0);
        net.steps(5).await;
        assert_eq!(net.primaries(), vec![1], "as corosync's two_node");
    }

    #[tokio::test(start_paused = true)]
    async fn with_majority_quorum_regaining_it_means_looking_for_the_primary_first() {
        let t0 = Instant::now();
        let mut a = Election::new(0, 3, HB, 3, t0).majority_quorum();
        let backup = Heartbeat {
            role: Role::Backup,
            term: 2,
            candidate: true,
            yield_to: None,
        };
        let primary = Heartbeat {
            role: Role::Primary,
            ..backup
        };
        // Long cut off: no quorum.
        let healed = t0 + Duration::from_secs(10);
        assert_eq!(a.tick(healed), None);
        // The healed partition's backup is heard before its primary: no promotion on it,
        // although this ATM is the highest-listed and now hears a majority.
        assert_eq!(a.on_heartbeat(2, backup, healed), None);
        assert_eq!(a.tick(healed + Duration::from_millis(50)), None);
        assert_eq!(
            a.on_heartbeat(1, primary, healed + Duration::from_millis(90)),
            None
        );
        assert_eq!(a.tick(healed + Duration::from_millis(400)), None);
        assert_eq!(a.role(), Role::Backup);
    }

    #[tokio::test(start_paused = true)]
    async fn under_a_cluster_manager_the_role_changes_only_when_asked() {
        let mut net = Net::new(3);
        for a in net.atms.iter_mut() {
            *a = Some(a.take().unwrap().managed());
        }
        net.steps(20).await;
        assert!(net.primaries().is_empty(), "nobody promotes itself");
        let now = Instant::now();
        assert!(matches!(
            net.atms[2].as_mut().unwrap().force_promote(now),
            Some(Action::BecomePrimary { .. })
        ));
        net.steps(5).await;
        assert_eq!(
            net.primaries(),
            vec![2],
            "no preemption by the higher-listed"
        );
        // Another promoted while the first still is (a node cut off from the cluster manager
        // is not fenced): the later promotion wins, as in lb's own election.
        net.atms[0].as_mut().unwrap().force_promote(Instant::now());
        net.steps(5).await;
        assert_eq!(net.primaries(), vec![0]);
        assert!(net.atms[0].as_mut().unwrap().step_down().is_some());
        assert!(
            net.atms[2]
                .as_mut()
                .unwrap()
                .force_promote(Instant::now())
                .is_some()
        );
        net.steps(3).await;
        assert_eq!(net.primaries(), vec![2]);
        net.kill(2);
        net.steps(20).await;
        assert!(net.primaries().is_empty(), "no failover of its own");
    }
}
