//! `cargo xtask`: what cargo alone cannot do. `setup` installs the eBPF toolchain and the
//! tools the labs use; `test` runs every test tier; `demo` shows the lab to a new user.

mod demo;
mod setup;
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
    /// through BPF_PROG_TEST_RUN, and network-namespace labs. Needs root.
    Test,
    /// Set up if needed, then build a lab in network namespaces and show lb working in it.
    /// Needs root.
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test => test(),
        Cmd::Demo => demo::run(),
    }
}

/// Every tier, in one test run so that the output ends with one summary of all of them.
fn test() -> Result<()> {
    util::require_root("cargo xtask test")?;
    setup::run()?;
    util::step("lint: cargo fmt --check, cargo clippy -D warnings");
    util::cargo(&["fmt", "--all", "--check"])?;
    util::cargo(&["clippy", "--all-targets", "--quiet", "--", "-D", "warnings"])?;
    util::step("build: lb-daemon and lb-cli, which the namespace labs run");
    util::cargo(&["build", "--bins", "--quiet"])?;
    util::step("tests: host unit tests, packet fixtures, network-namespace labs");
    util::cargo(&["nextest", "run", "--no-fail-fast", "--profile", "ci"])
}
