//! lb-bench: the dataplane and peer benchmark driver, run by `cargo xtask bench` (as root).
//! Each subcommand measures one thing several times and prints one JSON object per result
//! line on standard output: `{"group", "name", "unit", "rounds": [...], "median"}`.

mod failover;
mod http;
mod paths;
mod pps;

use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "lb-bench",
    about = "lb's dataplane and peer benchmarks (run by cargo xtask bench)"
)]
struct Cli {
    /// Rounds per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Per-path cost through BPF_PROG_TEST_RUN, distinct packets, against a bare forwarder.
    Paths {
        #[arg(long, default_value_t = 20_000)]
        packets: usize,
    },
    /// The established path's cost as the connection table and the server count grow.
    Growth {
        #[arg(long, default_value_t = 20_000)]
        packets: usize,
    },
    /// Packets per second through a namespace lab: generator -> balancer -> sink.
    Pps {
        #[arg(long, default_value_t = 2_000_000)]
        packets: u32,
        /// Only the variants whose name contains this.
        #[arg(long)]
        only: Option<String>,
    },
    /// HTTP through the VIP with wrk: lb against HAProxy, nftables DNAT, plain routing.
    Http {
        #[arg(long, default_value_t = 5)]
        seconds: u32,
    },
    /// The timer overhead of one-shot runs, against repeated runs of idempotent paths.
    Calibrate,
    /// Keeps calibrate's dataplane loaded for SECONDS, one direct connection made, with its
    /// frames (syn.bin, ack.bin) and the ingress ifindex in /tmp/lb-hold: for
    /// benches/tools/bpf_path_count.py, which counts a path's instructions.
    Hold { seconds: u64 },
    /// Map memory (bpftool) of a dataplane holding SERVICES services of PER servers each.
    Capacity {
        #[arg(long, default_value_t = 4096)]
        services: u32,
        #[arg(long, default_value_t = 10)]
        per: u32,
    },
    /// Failover time over drills: lb against keepalived's VRRP at equal timers.
    Failover {
        #[arg(long, default_value_t = 10)]
        drills: usize,
    },
}

/// One measured quantity.
#[derive(Serialize, Clone, Debug)]
pub struct Result {
    pub group: String,
    pub name: String,
    pub unit: String,
    pub rounds: Vec<f64>,
    pub median: f64,
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

/// nftables DNAT in namespace `ns` of `lab`: a nat table of `family` (`ip` or `ip6`), a
/// prerouting chain, and `rule`.
pub fn nft_dnat(lab: &lb_tests::lab::Lab, ns: &str, family: &str, rule: &str) {
    let ns = lab.ns(ns);
    ns.exec_ok(&["nft", &format!("add table {family} nat")]);
    ns.exec_ok(&[
        "nft",
        &format!("add chain {family} nat pre {{ type nat hook prerouting priority -100 ; }}"),
    ]);
    ns.exec_ok(&["nft", &format!("add rule {family} nat pre {rule}")]);
}

/// Prints a result line.
pub fn report(group: &str, name: &str, unit: &str, rounds: Vec<f64>) {
    let r = Result {
        group: group.into(),
        name: name.into(),
        unit: unit.into(),
        median: median(&rounds),
        rounds,
    };
    println!("{}", serde_json::to_string(&r).expect("serialisable"));
    eprintln!("  {group:<10} {name:<44} {:>12.1} {unit}", r.median);
}

/// Keeps the timed runs on one CPU (the last), so that they do not migrate mid-measurement.
fn pin_to_last_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus - 1, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if matches!(
        cli.cmd,
        Cmd::Paths { .. } | Cmd::Growth { .. } | Cmd::Calibrate
    ) {
        pin_to_last_cpu();
    }
    match cli.cmd {
        Cmd::Paths { packets } => paths::paths(packets, cli.rounds),
        Cmd::Growth { packets } => paths::growth(packets, cli.rounds),
        Cmd::Pps { packets, only } => pps::run(packets, cli.rounds, only.as_deref()),
        Cmd::Http { seconds } => http::run(seconds, cli.rounds),
        Cmd::Failover { drills } => failover::run(drills),
        Cmd::Calibrate => paths::calibrate(),
        Cmd::Hold { seconds } => paths::hold(seconds),
        Cmd::Capacity { services, per } => paths::capacity(services, per),
    }
}
