//! The ABI of the benchmark object (`lb-bench-progs`), which `lb-bench` loads beside the
//! balancer's: its map and program names and the `bare_fwd_cfg` record. Kept out of the
//! crate root on purpose: the production object has none of these.

/// Map names in the benchmark object.
pub mod maps {
    /// The one [`super::BareFwd`] record of `bare_fwd`.
    pub const BARE_FWD: &str = "bare_fwd_cfg";
    /// The 42 header bytes (Ethernet, IPv4, UDP) `gen_tx` writes on every frame.
    pub const GEN_TEMPLATE: &str = "gen_template";
    /// The 62 header bytes (Ethernet, IPv6, UDP) `gen_tx6` writes on every frame.
    pub const GEN_TEMPLATE6: &str = "gen_template6";
    /// Per-CPU packets counted (and dropped) by `sink_count`.
    pub const SINK_COUNT: &str = "sink_count_stat";
}

/// Program names in the benchmark object.
pub mod programs {
    /// The reference: the least a forwarder does (MAC rewrite, then out).
    pub const BARE_FWD: &str = "bare_fwd";
    /// Traffic generator under BPF_PROG_TEST_RUN live frames.
    pub const GEN_TX: &str = "gen_tx";
    /// [`GEN_TX`] for IPv6 frames.
    pub const GEN_TX6: &str = "gen_tx6";
    /// An empty program (the cost of a test run itself).
    pub const BENCH_NOP: &str = "bench_nop";
    /// A sink: counts and drops.
    pub const SINK_COUNT: &str = "sink_count";
}

/// The one record of `bare_fwd_cfg`: where the benchmarks' bare forwarder sends frames.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BareFwd {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// Egress interface; 0 or the ingress one means XDP_TX.
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<BareFwd>() == 16);

// SAFETY: #[repr(C)], Copy, no padding and no pointers, so any bit pattern the kernel hands
// back is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for BareFwd {}
