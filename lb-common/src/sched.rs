//! Scheduler tables, computed by the daemon and only indexed by the dataplane: a weighted
//! Maglev ring, a smooth weighted round-robin sequence and a plain round-robin sequence.
//! Each table is a list of server indices that becomes one service's row of `sched_table`.

use crate::abi::{Addr, Sched};
use std::vec;
use std::vec::Vec;

/// One server as the table builders see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Server index (the value stored in the table).
    pub id: u32,
    /// Stable identity (address and port) that fixes the server's Maglev permutation, so that
    /// every ATM computes the same ring whatever the order of the config.
    pub key: u64,
    /// 0 = drain: no slots.
    pub weight: u32,
}

impl Backend {
    pub fn new(id: u32, addr: Addr, port: u16, weight: u32) -> Self {
        let mut bytes = [0u8; 18];
        bytes[..16].copy_from_slice(&addr.octets());
        bytes[16..].copy_from_slice(&port.to_be_bytes());
        Backend {
            id,
            key: fnv1a(&bytes),
            weight,
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser with a seed: two independent hashes of one key.
fn remix(key: u64, seed: u64) -> u64 {
    let mut z = key ^ seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The table for `sched` over `backends` (servers that are up; weight 0 ones get no slots)
/// in a row of `slots` (a prime, `abi::ring_slots`): a Maglev ring of that size, a weighted
/// sequence of at most that length. Empty when no backend has a weight: the service then
/// refuses new connections.
pub fn table(sched: Sched, backends: &[Backend], slots: u32) -> Vec<u32> {
    match sched {
        // The least-connection schedulers compare every up server: their row lists each
        // once, as rr's does.
        Sched::Rr | Sched::Lc | Sched::Wlc | Sched::Sed => rr(backends),
        Sched::Wrr | Sched::Sh => wrr(backends, slots as usize),
        Sched::Maglev => maglev(backends, slots as usize),
    }
}

/// Every backend with a non-zero weight once, in the given order.
pub fn rr(backends: &[Backend]) -> Vec<u32> {
    backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| b.id)
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Smooth weighted round robin (as nginx does it): one period of the sequence, with each
/// backend appearing `weight / gcd` times and spread out rather than in bursts. When the
/// period would exceed `cap`, the weights are scaled down to fit (every weight stays >= 1).
pub fn wrr(backends: &[Backend], cap: usize) -> Vec<u32> {
    let live: Vec<&Backend> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() {
        return Vec::new();
    }
    let g = live.iter().fold(0u64, |g, b| gcd(g, b.weight as u64));
    let mut weights: Vec<u64> = live.iter().map(|b| b.weight as u64 / g).collect();
    let total: u64 = weights.iter().sum();
    if total > cap as u64 {
        for w in weights.iter_mut() {
            *w = ((*w * cap as u64) / total).max(1);
        }
        // Scaling with max(1) can still overshoot with many tiny weights; trim the largest.
        while weights.iter().sum::<u64>() > cap as u64 {
            let (i, _) = weights
                .iter()
                .enumerate()
                .max_by_key(|(_, w)| **w)
                .expect("non-empty");
            weights[i] -= 1;
        }
    }
    let total: u64 = weights.iter().sum();
    let mut current = vec![0i64; live.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..live.len() {
            current[i] += weights[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        seq.push(live[best].id);
    }
    seq
}

/// A weighted Maglev ring of `m` slots (`m` prime). Each backend walks its own permutation of
/// the slots (offset and skip from its key); in each round every backend earns credit in
/// proportion to its weight and claims one free slot per full credit, so slot shares follow
/// weights and removing a backend frees only its own slots plus a few reshuffled ones.
pub fn maglev(backends: &[Backend], m: usize) -> Vec<u32> {
    let mut live: Vec<&Backend> = backends.iter().filter(|b| b.weight > 0).collect();
    // Slots contested within a round go to the first in this order: make it the keys' order,
    // not the config's, so every ATM builds the same ring.
    live.sort_by_key(|b| (b.key, b.id));
    if live.is_empty() {
        return Vec::new();
    }
    // Probing adds in u32 (a position and a skip are both below m).
    assert!(m < 1 << 31, "a Maglev ring of {m} slots is too large");
    let (m64, m32) = (m as u64, m as u32);
    // Each backend's place in its permutation, offset + n * skip (mod m), kept as a running
    // position: one addition per probe instead of a division.
    let mut pos: Vec<u32> = Vec::with_capacity(live.len());
    let mut skips: Vec<u32> = Vec::with_capacity(live.len());
    for b in &live {
        pos.push((remix(b.key, 0x5851_f42d_4c95_7f2d) % m64) as u32);
        skips.push((remix(b.key, 0x1405_7b7e_f767_814f) % (m64 - 1) + 1) as u32);
    }
    // Contiguous copies of what each round reads, rather than a pointer per backend.
    let weights: Vec<u64> = live.iter().map(|b| b.weight as u64).collect();
    let wmax = *weights.iter().max().expect("non-empty");
    let ids: Vec<u32> = live.iter().map(|b| b.id).collect();
    let mut credit = vec![0u64; live.len()];
    // Backends claiming a slot this round, in order. A weight is at most `wmax`, so a backend
    // claims at most once per round; listing the claimants without a branch first spares the
    // round loop a mispredicted branch for every backend whose credit is not yet full.
    let mut claimants = vec![0usize; live.len()];
    let mut round = |claimants: &mut [usize]| {
        let mut n = 0;
        for i in 0..credit.len() {
            let c = credit[i] + weights[i];
            let claims = c >= wmax;
            credit[i] = c - wmax * u64::from(claims);
            claimants[n] = i;
            n += usize::from(claims);
        }
        n
    };
    let mut ring = vec![0u32; m];
    // Most probes find the slot taken: ask a bitmap that stays in L1 cache (8 KiB for 65,537
    // slots) rather than the ring (256 KiB).
    let mut taken = Bitmap(vec![0u64; m.div_ceil(64)]);
    // Probing costs m / free probes per claim, so the last slots cost the most (half of all
    // probes go to the last ~sqrt(m)). The last `tail` claims instead take the free slot the
    // fewest skips ahead (below). Same ring, fewer steps.
    let tail = ((m as f64).sqrt() as usize).clamp(1, m);
    let (mut filled, mut n, mut next) = (0, 0, 0);
    'probing: while filled < m - tail {
        n = round(&mut claimants);
        next = 0;
        while next < n {
            let i = claimants[next];
            next += 1;
            let (mut at, skip) = (pos[i], skips[i]);
            let c = loop {
                let c = at;
                let p = at + skip;
                // A conditional move, not a branch: whether it wraps is a coin toss.
                at = if p >= m32 { p - m32 } else { p };
                if taken.take(c) {
                    break c;
                }
            };
            pos[i] = at;
            ring[c as usize] = ids[i];
            filled += 1;
            if filled == m - tail {
                break 'probing;
            }
        }
    }
    // The tail: the free slot the fewest skips ahead of a backend's position p is the one
    // with the least (slot - p) / skip (mod m), one multiplication per free slot. The inverse
    // skips are worked out for the backends that claim here only, which few of 1000 do.
    let reduce = Barrett::new(m64);
    let mut free = taken.clear_ones(m);
    let mut inverse = vec![0u64; live.len()]; // 0: not worked out yet (no inverse is 0)
    loop {
        while next < n {
            let i = claimants[next];
            next += 1;
            if inverse[i] == 0 {
                inverse[i] = inverse_mod(u64::from(skips[i]), &reduce);
            }
            let (p, inv) = (u64::from(pos[i]), inverse[i]);
            let nearest = free
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| reduce.rem((**c + m64 - p) * inv))
                .map(|(k, _)| k)
                .expect("a free slot while the ring is not full");
            let c = free.swap_remove(nearest);
            pos[i] = ((c + u64::from(skips[i])) % m64) as u32;
            ring[c as usize] = ids[i];
            filled += 1;
            if filled == m {
                return ring;
            }
        }
        n = round(&mut claimants);
        next = 0;
    }
}

/// One bit per ring slot: taken or free.
struct Bitmap(Vec<u64>);

impl Bitmap {
    /// Takes slot `c` if it is free, and says whether it was.
    #[inline(always)]
    fn take(&mut self, c: u32) -> bool {
        let (word, bit) = (&mut self.0[c as usize / 64], 1u64 << (c % 64));
        // Set only when free: a store on every probe would make the next probe of the same
        // word wait for it.
        let free = *word & bit == 0;
        if free {
            *word |= bit;
        }
        free
    }

    /// The free slots below `m`, in order.
    fn clear_ones(&self, m: usize) -> Vec<u64> {
        let mut free = Vec::new();
        for (w, bits) in self.0.iter().enumerate() {
            let mut f = !bits;
            while f != 0 {
                let c = w * 64 + f.trailing_zeros() as usize;
                if c >= m {
                    break;
                }
                free.push(c as u64);
                f &= f - 1;
            }
        }
        free
    }
}

/// `x mod m` by a multiplication instead of a division (Barrett reduction).
struct Barrett {
    m: u64,
    /// floor(2^64 / m)
    r: u64,
}

impl Barrett {
    fn new(m: u64) -> Barrett {
        assert!(m > 1);
        Barrett {
            m,
            r: (u128::from(u64::MAX) + 1).div_euclid(u128::from(m)) as u64,
        }
    }

    /// Exact for any `x < 2^64`: the estimated quotient is at most one short.
    #[inline]
    fn rem(&self, x: u64) -> u64 {
        let q = ((u128::from(x) * u128::from(self.r)) >> 64) as u64;
        let r = x - q * self.m;
        r - self.m * u64::from(r >= self.m)
    }
}

/// `a`'s inverse modulo the prime `m`, by Fermat: a^(m-2), with Barrett reductions: with a
/// division each, the ~34 steps for each of 1000 backends cost about as much as the tail.
fn inverse_mod(a: u64, m: &Barrett) -> u64 {
    let (mut base, mut e, mut r) = (m.rem(a), m.m - 2, 1u64);
    while e > 0 {
        if e & 1 == 1 {
            r = m.rem(r * base);
        }
        base = m.rem(base * base);
        e >>= 1;
    }
    debug_assert_eq!(m.rem(a * r), 1, "{} is not prime", m.m);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::RING_MAX;
    use core::net::Ipv4Addr;
    use std::collections::HashMap;

    fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let ip = Ipv4Addr::new(192, 0, 2, 10 + i as u8);
                Backend::new(i as u32, ip.into(), 80, *w)
            })
            .collect()
    }

    /// The ring as the formula states it, offset + n * skip (mod m) with a division per probe:
    /// `maglev`'s running positions must give exactly this ring.
    fn maglev_by_formula(backends: &[Backend], m: usize) -> Vec<u32> {
        let mut live: Vec<&Backend> = backends.iter().filter(|b| b.weight > 0).collect();
        live.sort_by_key(|b| (b.key, b.id));
        let m64 = m as u64;
        let perms: Vec<(u64, u64)> = live
            .iter()
            .map(|b| {
                (
                    remix(b.key, 0x5851_f42d_4c95_7f2d) % m64,
                    remix(b.key, 0x1405_7b7e_f767_814f) % (m64 - 1) + 1,
                )
            })
            .collect();
        let wmax = live.iter().map(|b| b.weight as u64).max().unwrap();
        let (mut next, mut credit) = (vec![0u64; live.len()], vec![0u64; live.len()]);
        let mut ring = vec![u32::MAX; m];
        let mut filled = 0;
        loop {
            for i in 0..live.len() {
                credit[i] += live[i].weight as u64;
                while credit[i] >= wmax {
                    credit[i] -= wmax;
                    loop {
                        let c = ((perms[i].0 + next[i] * perms[i].1) % m64) as usize;
                        next[i] += 1;
                        if ring[c] == u32::MAX {
                            ring[c] = live[i].id;
                            filled += 1;
                            break;
                        }
                    }
                    if filled == m {
                        return ring;
                    }
                }
            }
        }
    }

    #[test]
    fn barrett_reduction_equals_the_remainder() {
        for m in [2u64, 251, 65_537, (1 << 31) - 1, u64::MAX / 3] {
            let b = Barrett::new(m);
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..10_000 {
                x = remix(x, m);
                for v in [x, x % (m * 2), m - 1, m, m + 1, 0, u64::MAX] {
                    assert_eq!(b.rem(v), v % m, "{v} mod {m}");
                }
            }
        }
    }

    #[test]
    fn maglev_matches_the_formula() {
        for weights in [&[1u32][..], &[1, 1, 1], &[3, 1, 2, 0, 5], &[7; 40]] {
            let b = backends(weights);
            assert_eq!(
                maglev(&b, 65_537),
                maglev_by_formula(&b, 65_537),
                "{weights:?}"
            );
            assert_eq!(maglev(&b, 251), maglev_by_formula(&b, 251), "{weights:?}");
        }
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut m = HashMap::new();
        for id in table {
            *m.entry(*id).or_default() += 1;
        }
        m
    }

    #[test]
    fn maglev_shares_follow_weights_within_one_percent() {
        for weights in [
            vec![1, 1, 1],
            vec![1, 2, 3, 4],
            vec![5, 1],
            vec![100, 1, 50, 7, 3],
        ] {
            let b = backends(&weights);
            let ring = maglev(&b, RING_MAX as usize);
            assert_eq!(ring.len(), RING_MAX as usize);
            let total_w: u32 = weights.iter().sum();
            let s = shares(&ring);
            for (i, w) in weights.iter().enumerate() {
                let got = *s.get(&(i as u32)).unwrap_or(&0) as f64 / ring.len() as f64;
                let want = *w as f64 / total_w as f64;
                assert!(
                    (got - want).abs() <= 0.01,
                    "weights {weights:?}: server {i} has {got:.4}, wants {want:.4}"
                );
            }
        }
    }

    #[test]
    fn maglev_removal_moves_about_one_nth() {
        for n in [3usize, 5, 10, 50] {
            let b = backends(&vec![1; n]);
            let before = maglev(&b, RING_MAX as usize);
            for gone in [0, n / 2, n - 1] {
                let rest: Vec<Backend> =
                    b.iter().copied().filter(|x| x.id != gone as u32).collect();
                let after = maglev(&rest, RING_MAX as usize);
                let moved = before
                    .iter()
                    .zip(&after)
                    .filter(|(x, y)| x != y && **x != gone as u32)
                    .count();
                let freed = before.iter().filter(|x| **x == gone as u32).count();
                let changed = moved + freed;
                let bound = RING_MAX as f64 * (1.0 / n as f64 + 0.01);
                assert!(
                    (changed as f64) <= bound,
                    "n={n}, removing {gone}: {changed} slots changed, bound {bound:.0}"
                );
            }
        }
    }

    #[test]
    fn maglev_is_independent_of_backend_order() {
        let b = backends(&[1, 2, 3]);
        let mut rev = b.clone();
        rev.reverse();
        assert_eq!(maglev(&b, 251), maglev(&rev, 251));
    }

    #[test]
    fn weight_zero_gets_no_slots_and_all_zero_gives_empty_tables() {
        let b = backends(&[1, 0, 1]);
        for s in [Sched::Rr, Sched::Wrr, Sched::Sh, Sched::Maglev] {
            let t = table(s, &b, 1021);
            assert!(!t.is_empty());
            assert!(!t.contains(&1), "{s:?}");
            assert!(table(s, &backends(&[0, 0]), 1021).is_empty(), "{s:?}");
        }
    }

    #[test]
    fn wrr_sequence_is_weighted_and_interleaved() {
        let seq = wrr(&backends(&[5, 1, 1]), 1000);
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
        let seq = wrr(&backends(&[2, 4, 6]), 1000);
        assert_eq!(seq.len(), 6, "gcd reduces the period");
        let s = shares(&seq);
        assert_eq!((s[&0], s[&1], s[&2]), (1, 2, 3));
        // No server appears twice in a row when another has weight as large.
        let seq = wrr(&backends(&[3, 3]), 1000);
        assert!(seq.windows(2).all(|w| w[0] != w[1]), "{seq:?}");
    }

    #[test]
    fn wrr_scales_down_to_the_cap() {
        let seq = wrr(&backends(&[60_000, 30_000, 1]), 1000);
        assert!(seq.len() <= 1000);
        let s = shares(&seq);
        assert!(s[&2] >= 1, "every live server keeps a slot");
        let ratio = s[&0] as f64 / s[&1] as f64;
        assert!((ratio - 2.0).abs() < 0.05, "{ratio}");
    }

    #[test]
    fn rr_lists_live_servers_once() {
        assert_eq!(rr(&backends(&[3, 0, 1])), vec![0, 2]);
    }
}
