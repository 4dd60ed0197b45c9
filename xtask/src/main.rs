//! `cargo xtask`: what cargo alone cannot do. `setup` installs the eBPF toolchain and the
//! tools the labs use; `test` runs every test tier; `demo` shows the lab to a new user;
//! `package` builds the Debian package; `bench` measures lb against its peers
//! (docs/BENCHMARKS.md); `soak` watches it for leaks under hours of work (docs/SOAK.md).

mod bench;
mod demo;
mod fuzz;
mod package;
mod setup;
mod soak;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "lb's set-up, tests and demo")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the labs need (Debian packages, bpf-linker, cargo-nextest);
    /// skips whatever is already there.
    Setup,
    /// Set up if needed, then run every test tier: lints, host unit tests, packet fixtures
    /// through BPF_PROG_TEST_RUN, network-namespace labs, and each fuzz target for 30 s.
    /// Needs root.
    Test,
    /// Set up if needed, then build a lab in network namespaces (a client, two ATMs, three
    /// servers) and show lb working in it: requests, tables, a failover drill. Needs root.
    Demo {
        /// Leave the lab running at the end and print commands to explore it.
        #[arg(long)]
        keep: bool,
        /// Remove a lab left by --keep, and nothing else.
        #[arg(long)]
        clean: bool,
    },
    /// Set up if needed, then run each fuzz target of fuzz/ (cargo fuzz, nightly) for a
    /// bounded time from the corpus in the repository; a crash fails it (docs/FUZZING.md).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// One target only: config, control, table_write, wire or packet.
        target: Option<String>,
    },
    /// Set up if needed, then build the Debian package: lb-daemon, lb-cli, the systemd unit,
    /// the OCF agent, example configs, docs, man pages and shell completions. Writes
    /// target/package/lb_VERSION_ARCH.deb (install with `apt-get install ./lb_*.deb`).
    Package {
        /// Package the debug build instead of a release build (the tests do, to save one).
        #[arg(long)]
        debug: bool,
        /// The directory to write the .deb into.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Set up if needed (plus the peers: HAProxy, wrk, keepalived), then measure lb against
    /// them: per-path cost, growth, packets per second, HTTP, failover, control plane. Writes
    /// target/bench/results.{json,md} and prints the table. Needs root; about fifteen minutes.
    Bench {
        /// Rounds per measurement (medians are reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per HTTP load run.
        #[arg(long, default_value_t = 5)]
        http_seconds: u32,
        /// Failover drills per balancer.
        #[arg(long, default_value_t = 10)]
        drills: usize,
        /// Measure nothing: re-read target/bench/results.json, check the targets again and
        /// rewrite the tables.
        #[arg(long)]
        report: bool,
        /// Also build commit REV's lb-bench (in a worktree under target/bench/against) and
        /// time its per-path costs alternately with this tree's, round by round: the
        /// results show both, and a target says whether any path got slower.
        #[arg(long, value_name = "REV")]
        against: Option<String>,
    },
    /// Set up if needed (plus gnuplot), then run the demo's lab under steady load, SYN
    /// bursts, table writes, reloads and drills for MINUTES, sampling each ATM daemon's
    /// memory, descriptors and threads. Writes report.md, samples.csv, soak.png and the ATMs'
    /// logs to target/soak (or --output); fails if any of them grew after warm-up or
    /// requests failed (docs/SOAK.md). Needs root.
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// The directory for the report.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
        /// Run the ATM daemons under heaptrack (installed if missing) and write what each
        /// still held at the end, and its peak, by call stack, to heaptrack-atmN.txt: to
        /// find what grows. Slows the daemons' allocations down.
        #[arg(long)]
        heaptrack: bool,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test => test(),
        Cmd::Demo { clean: true, .. } => demo::clean(),
        Cmd::Demo { keep, .. } => demo::run(keep),
        Cmd::Fuzz { seconds, target } => {
            setup::run()?;
            fuzz::run(seconds, target.as_deref())
        }
        Cmd::Package { debug, output } => package::run(&package::Opts { debug, output }).map(drop),
        Cmd::Soak {
            minutes,
            output,
            heaptrack,
        } => soak::run(minutes, output, heaptrack),
        Cmd::Bench { report: true, .. } => bench::report(),
        Cmd::Bench {
            rounds,
            http_seconds,
            drills,
            report: false,
            against,
        } => bench::run(bench::Size {
            rounds,
            http_seconds,
            drills,
            against,
        }),
    }
}

/// Every tier, in one test run so that the output ends with one summary of all of them.
fn test() -> Result<()> {
    util::require_root("cargo xtask test")?;
    setup::run()?;
    util::step(
        "lint: cargo fmt --check, cargo clippy -D warnings (the workspace, and lb-daemon alone)",
    );
    util::cargo(&["fmt", "--all", "--check"])?;
    util::cargo(&["clippy", "--all-targets", "--quiet", "--", "-D", "warnings"])?;
    // The daemon alone, as it ships: without the `testing` feature the workspace turns on.
    util::cargo(&[
        "clippy",
        "-p",
        "lb-daemon",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ])?;
    clean_leftovers();
    util::step("build: lb-daemon and lb-cli, which the namespace labs run");
    util::cargo(&["build", "--bins", "--quiet"])?;
    util::step("build: lb-cli alone, with bpf-linker out of reach");
    cli_builds_without_bpf_linker()?;
    util::step("tests: host unit tests, packet fixtures, network-namespace labs");
    let tests = util::cargo(&["nextest", "run", "--no-fail-fast", "--profile", "ci"]);
    // The fuzz targets, each for a bounded time, whatever the tests said: a crash they find
    // is news either way.
    let fuzzed = fuzz::run(FUZZ_SECONDS, None);
    tests.and(fuzzed)
}

/// Seconds each fuzz target runs in the test tier.
const FUZZ_SECONDS: u64 = 30;

/// lb-cli must build where the eBPF toolchain is absent (it needs lb-api only, not
/// lb-daemon, whose build.rs fails without bpf-linker). The build runs in its own target
/// directory with bpf-linker hidden the ways lb-daemon's `find_linker` looks for it:
/// `LB_BPF_LINKER` unset, no PATH directory holding it, and a HOME and CARGO_HOME whose
/// `bin` is empty (the CARGO_HOME links the real registry, so `--offline` still works).
fn cli_builds_without_bpf_linker() -> Result<()> {
    use anyhow::{Context, bail};
    use std::{env, path::PathBuf, process::Command};

    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("failed to run rustc --print sysroot")?;
    let toolchain = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim()).join("bin");
    let path = env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .filter(|d| !d.join("bpf-linker").exists())
        .chain([toolchain.clone()])
        .collect::<Vec<_>>();
    let real_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let scratch = util::workspace().join("target/no-bpf-linker");
    let cargo_home = scratch.join("cargo-home");
    std::fs::create_dir_all(&cargo_home)
        .with_context(|| format!("creating {}", cargo_home.display()))?;
    for shared in ["registry", "git", "config.toml"] {
        let (from, to) = (real_home.join(shared), cargo_home.join(shared));
        if from.exists() && !to.exists() {
            std::os::unix::fs::symlink(&from, &to)
                .with_context(|| format!("linking {}", to.display()))?;
        }
    }
    let status = Command::new(toolchain.join("cargo"))
        .args(["build", "-p", "lb-cli", "--offline", "--quiet"])
        .current_dir(util::workspace())
        .env_remove("LB_BPF_LINKER")
        .env_remove("RUSTC")
        .env("PATH", env::join_paths(path)?)
        .env("HOME", &scratch)
        .env("CARGO_HOME", &cargo_home)
        .env("CARGO_TARGET_DIR", scratch.join("target"))
        .status()
        .context("failed to run cargo build -p lb-cli")?;
    if !status.success() {
        bail!(
            "lb-cli does not build without bpf-linker ({status}): it must depend on lb-api, \
             not on lb-daemon"
        );
    }
    Ok(())
}

/// Namespaces and scratch directories of test runs that were killed (a test killed by a
/// timeout cannot clean up after itself): `lbt<pid>-...` whose process is gone.
fn clean_leftovers() {
    let alive = |name: &str| {
        name.strip_prefix("lbt")
            .and_then(|r| r.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let mut removed = 0;
    if let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    {
        for ns in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
        {
            if ns.starts_with("lbt") && !alive(ns) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", ns])
                    .status();
                removed += 1;
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("lbt") && !alive(&name) {
                let _ = std::fs::remove_dir_all(e.path());
                removed += 1;
            }
        }
    }
    // Connection state kept in the BPF filesystem by lb-daemons of namespaces that are gone
    // (a killed test's): `/sys/fs/bpf/lb/<namespace inode>-<interface>`.
    use std::os::unix::fs::MetadataExt;
    let mut inodes: Vec<u64> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.ino())
                .collect()
        })
        .unwrap_or_default();
    inodes.extend(std::fs::metadata("/proc/1/ns/net").map(|m| m.ino()));
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf/lb") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ino = name.split('-').next().and_then(|i| i.parse::<u64>().ok());
            if ino.is_some_and(|i| !inodes.contains(&i)) {
                let _ = std::fs::remove_dir_all(e.path());
                removed += 1;
            }
        }
    }
    if removed > 0 {
        println!("removed {removed} leftovers of interrupted test runs");
    }
}
