//! New-connection limits (`max_new_per_sec`, `max_new_per_sec_per_source`) as the generic
//! cell rate algorithm: one time per bucket, the theoretical arrival time (TAT) of the next
//! connection, which each admitted one moves on by the interval (a second / the rate). An
//! arrival is admitted while the TAT is less than a second ahead of it, so a bucket admits
//! a burst of one second's worth, then the rate. One word per bucket, updated with one
//! compare-and-swap in the dataplane. Pure, so the XDP program and the host's unit tests
//! share it.

/// How far ahead of now the TAT may run: the burst, one second's worth of connections.
pub const BURST_NS: u64 = 1_000_000_000;

/// The new TAT if an arrival at `now` is admitted by a bucket whose TAT is `tat`, at one
/// connection per `interval_ns`; `None` if it is over the limit.
#[inline(always)]
pub fn admit(tat: u64, now: u64, interval_ns: u64) -> Option<u64> {
    let from = if tat > now { tat } else { now };
    let next = from + interval_ns;
    if next - now > BURST_NS {
        return None;
    }
    Some(next)
}

/// The interval of `per_sec` connections a second (at least 1 ns).
pub const fn interval_ns(per_sec: u32) -> u32 {
    if per_sec == 0 {
        return 0;
    }
    let i = BURST_NS / per_sec as u64;
    if i == 0 { 1 } else { i as u32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// Admits arrivals at `times` (ns), returning how many got through.
    fn run(per_sec: u32, times: impl Iterator<Item = u64>) -> usize {
        let i = interval_ns(per_sec) as u64;
        let mut tat = 0;
        let mut ok = 0;
        for t in times {
            if let Some(n) = admit(tat, t, i) {
                tat = n;
                ok += 1;
            }
        }
        ok
    }

    #[test]
    fn a_burst_of_one_seconds_worth_then_the_rate() {
        // 1,000 at once into 100/s: the burst.
        assert_eq!(run(100, (0..1000).map(|_| 10 * S)), 100);
        // Ten seconds of 1,000/s into 100/s: the burst and ten seconds' worth (the last
        // arrival is at 10 s - 1 ms).
        let flood = (0..10_000u64).map(|k| 10 * S + k * S / 1000);
        let got = run(100, flood);
        assert!((1090..=1100).contains(&got), "{got}");
        // Under the rate, everything.
        assert_eq!(run(100, (0..500u64).map(|k| 10 * S + k * S / 50)), 500);
    }

    #[test]
    fn an_idle_bucket_fills_up_to_the_burst_and_no_more() {
        let i = interval_ns(10) as u64;
        let mut tat = 0;
        for _ in 0..10 {
            tat = admit(tat, 5 * S, i).unwrap();
        }
        assert_eq!(admit(tat, 5 * S, i), None, "the burst is spent");
        // An hour later: a burst again, not an hour's worth.
        let later = 3600 * S;
        let mut n = 0;
        while let Some(t) = admit(tat, later, i) {
            tat = t;
            n += 1;
        }
        assert_eq!(n, 10);
    }

    #[test]
    fn intervals() {
        assert_eq!(interval_ns(0), 0);
        assert_eq!(interval_ns(1), 1_000_000_000);
        assert_eq!(interval_ns(3), 333_333_333);
        assert_eq!(interval_ns(u32::MAX), 1);
    }
}
