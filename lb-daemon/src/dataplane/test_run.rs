//! Running the loaded programs on frames through BPF_PROG_TEST_RUN, for the fixture tests
//! and the benchmarks.

use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp};
use lb_common::programs;

use super::{Dataplane, Error, as_xdp, prog_err};

impl Dataplane {
    /// Program `name` of the balancer's object.
    fn program(&self, name: &'static str) -> Result<&Xdp, Error> {
        as_xdp(self.ebpf.program(name), name)
    }

    /// Runs `lb_xdp` once on `frame` (BPF_PROG_TEST_RUN) as if it arrived on interface
    /// `ingress_ifindex` of the caller's network namespace; returns the XDP action and the
    /// frame as the program left it.
    pub fn test_run(&self, frame: &[u8], ingress_ifindex: u32) -> Result<(u32, Vec<u8>), Error> {
        test_run(
            self.program(programs::LB_XDP)?,
            programs::LB_XDP,
            frame,
            ingress_ifindex,
        )
    }

    /// Runs `lb_xdp` on `frame` in `mode` (timings, live frames).
    pub fn run(
        &self,
        frame: &[u8],
        ingress_ifindex: u32,
        mode: RunMode,
    ) -> Result<RunResult, Error> {
        run_xdp(
            self.program(programs::LB_XDP)?,
            frame,
            ingress_ifindex,
            mode,
        )
        .map_err(prog_err(programs::LB_XDP))
    }

    /// Like [`Dataplane::test_run`], for `lb_decap`.
    pub fn test_run_decap(
        &self,
        frame: &[u8],
        ingress_ifindex: u32,
    ) -> Result<(u32, Vec<u8>), Error> {
        test_run(
            self.program(programs::LB_DECAP)?,
            programs::LB_DECAP,
            frame,
            ingress_ifindex,
        )
    }
}

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it in `ctx_in`.
#[repr(C)]
pub(super) struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Room for what a program may add in front (IPIP) beyond the input length.
pub(super) const TEST_RUN_GROWTH: usize = 256;

pub(super) fn test_run(
    prog: &Xdp,
    name: &'static str,
    frame: &[u8],
    ingress_ifindex: u32,
) -> Result<(u32, Vec<u8>), Error> {
    let r = run_xdp(prog, frame, ingress_ifindex, RunMode::Once).map_err(prog_err(name))?;
    Ok((r.action, r.frame))
}

/// How to run a program with BPF_PROG_TEST_RUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Once, returning the frame as the program left it.
    Once,
    /// `n` times over (each run sees what the previous one left), for a timing.
    Repeat(u32),
    /// `n` times as live frames in batches of `batch`: the verdicts are carried out (XDP_TX
    /// sends the frame out of the ingress interface), which makes a packet generator.
    Live { n: u32, batch: u32 },
}

/// What a test run gave.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub action: u32,
    /// The frame as left by the last run (empty in live mode).
    pub frame: Vec<u8>,
    /// The kernel's time per run.
    pub per_run: std::time::Duration,
}

/// Runs an XDP program on `frame` as if it arrived on `ingress_ifindex` of the calling
/// thread's namespace. The fixture tests, the dataplane API and the benchmarks share it.
pub fn run_xdp(
    prog: &Xdp,
    frame: &[u8],
    ingress_ifindex: u32,
    mode: RunMode,
) -> Result<RunResult, ProgramError> {
    let md = XdpMd {
        data: 0,
        data_end: frame.len() as u32,
        data_meta: 0,
        ingress_ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    };
    // SAFETY: XdpMd is repr(C), plain integers, no padding.
    let ctx = unsafe {
        std::slice::from_raw_parts(
            (&md as *const XdpMd).cast::<u8>(),
            std::mem::size_of::<XdpMd>(),
        )
    };
    let live = matches!(mode, RunMode::Live { .. });
    let mut out = if live {
        Vec::new()
    } else {
        vec![0u8; frame.len() + TEST_RUN_GROWTH]
    };
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(ctx);
    match mode {
        RunMode::Once => opts.repeat = 1,
        RunMode::Repeat(n) => opts.repeat = n,
        RunMode::Live { n, batch } => {
            opts.repeat = n;
            opts.attrs = opts.attrs.xdp_live_frames(batch);
        }
    }
    if !live {
        opts.data_out = Some(&mut out);
    }
    let res = prog.test_run(opts)?;
    out.truncate(res.data_size_out as usize);
    Ok(RunResult {
        action: res.return_value,
        frame: out,
        per_run: res.duration,
    })
}
