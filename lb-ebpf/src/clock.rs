//! lb_xdp's clock: CLOCK_MONOTONIC in nanoseconds at the coarse clock's precision (a tick),
//! as `bpf_ktime_get_coarse_ns` gives it, without calling it on every packet. That helper is
//! a real call (about 23 ns here, with the return-thunk mitigations); `bpf_jiffies64` is
//! inlined by the verifier into a load. Each CPU keeps a base (jiffies and nanoseconds read
//! together) and works the time out from the jiffies at the kernel's HZ, which the daemon
//! gives (`Settings::tick_ns`) or, without it, the CPU measures; it reads the coarse clock
//! again only to take its first base, to measure, and every `REBASE_JIFFIES`.
//!
//! Every time the dataplane keeps is in seconds (idle timeouts, the lease, the next-hop
//! cache, NAT port holds), and the coarse clock itself moves a tick at a time: an answer
//! within a tick of the coarse clock's is as good as its own. Per CPU, so that no CPU ever
//! reads a base another is rewriting.

use aya_ebpf::{
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::PerCpuArray,
};

#[repr(C)]
pub struct Clock {
    /// Jiffies when `base_ns` was read (0: never).
    base_jiffies: u64,
    base_ns: u64,
    /// Measured over at least `CALIBRATE_JIFFIES` (0: not yet).
    ns_per_jiffy: u64,
}

#[map(name = "clock")]
static CLOCK: PerCpuArray<Clock> = PerCpuArray::with_max_entries(1, 0);

/// The shortest span the nanoseconds per jiffy are measured over: a tick of error in the
/// coarse clock is then at most 1/16 of one jiffy's worth (6%), inside the margin between
/// the nominal rates (250 and 300 Hz are 20% apart: `nominal`). Short, so that a CPU's
/// clock stops calling the helper within 16-160 ms of its first packet.
const CALIBRATE_JIFFIES: u64 = 16;
/// How many jiffies an answer is worked out from one base (1 s to 10 s, by HZ): the coarse
/// clock is read again after that (and a measured rate measured again over the span).
const REBASE_JIFFIES: u64 = 1000;

/// The time now, as `bpf_ktime_get_coarse_ns` would say within a tick. `tick_ns`: the
/// nanoseconds per jiffy as the daemon read them (`Settings::tick_ns`, the coarse clock's
/// resolution), or 0, and then each CPU measures them over its first 16 jiffies.
#[inline(always)]
pub fn now(tick_ns: u64) -> u64 {
    // SAFETY: plain helper call (inlined by the verifier).
    let j = unsafe { bpf_jiffies64() };
    let Some(c) = CLOCK.get_ptr_mut(0) else {
        return coarse();
    };
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU.
    let c = unsafe { &mut *c };
    let since = j.wrapping_sub(c.base_jiffies);
    let rate = if tick_ns != 0 {
        tick_ns
    } else {
        c.ns_per_jiffy
    };
    if rate != 0 && c.base_jiffies != 0 && since < REBASE_JIFFIES {
        return c.base_ns + since * rate;
    }
    let ns = coarse();
    if c.base_jiffies == 0 || since > (u64::MAX >> 1) || tick_ns != 0 {
        // First use on this CPU, a new base at the daemon's rate (or jiffies behind the
        // base, which they never are).
        c.base_jiffies = j;
        c.base_ns = ns;
    } else if since >= CALIBRATE_JIFFIES {
        let measured = ns.saturating_sub(c.base_ns).checked_div(since).unwrap_or(0);
        c.ns_per_jiffy = nominal(measured);
        c.base_jiffies = j;
        c.base_ns = ns;
    }
    ns
}

/// The nanoseconds per jiffy of the HZ that `measured` is nearest to, of those kernels are
/// built with (100, 250, 300, 1000), if it is within a fifth of it; else `measured`. A
/// measurement is off by up to a tick over its span (the coarse clock and jiffies move at
/// ticks that need not be where the span starts and ends): extrapolated over a thousand
/// jiffies, 1/16 of a tick per jiffy would be 60 ticks. The nominal rate is exact.
#[inline(always)]
fn nominal(measured: u64) -> u64 {
    let mut best = measured;
    let mut best_off = u64::MAX;
    for ns in [10_000_000u64, 4_000_000, 3_333_333, 1_000_000] {
        let off = measured.abs_diff(ns);
        if off < ns / 5 && off < best_off {
            best = ns;
            best_off = off;
        }
    }
    best
}

#[inline(always)]
fn coarse() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}
