//! `cargo xtask fuzz`: runs each coverage-guided fuzz target of `fuzz/` (cargo fuzz, on
//! rustup's nightly toolchain) for a bounded time, from the corpus kept in the repository.
//! New inputs the fuzzer finds go to `target/fuzz-corpus/`, not into the repository; a crash
//! fails the run and leaves its input in `fuzz/artifacts/TARGET/` (docs/FUZZING.md).

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util;

/// The targets, as `fuzz/Cargo.toml` names them.
pub const TARGETS: [&str; 5] = ["config", "control", "table_write", "wire", "packet"];

/// Runs `only` (or every target) for `seconds` each.
pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match only {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!(
            "no fuzz target {t:?}: the targets are {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    let root = util::workspace();
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output();
    if !nightly.is_ok_and(|o| o.status.success()) {
        bail!(
            "cargo fuzz needs rustup's nightly toolchain (libFuzzer's instrumentation); \
             `rustup toolchain list` shows none"
        );
    }
    util::step(
        "fuzz: building the targets (cargo fuzz build on nightly; the dev profile and no \
         sanitizer: the code is safe Rust, and the build takes a third of a release one's time)",
    );
    util::run(nightly_fuzz(&root).args(["build", "--dev", "--sanitizer", "none"]))
        .context("building the fuzz targets failed")?;
    for t in targets {
        util::step(&format!("fuzz: {t} for {seconds} s"));
        let scratch = root.join("target/fuzz-corpus").join(t);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        util::run(
            nightly_fuzz(&root)
                .args(["run", "--dev", "--sanitizer", "none", t])
                .arg(&scratch)
                .arg(root.join("fuzz/corpus").join(t))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                // Quiet: a line every few seconds rather than one per new input.
                .args(["-print_final_stats=1", "-print_funcs=0", "-verbosity=0"]),
        )
        .with_context(|| {
            format!(
                "fuzz target {t} failed: its input is in fuzz/artifacts/{t}/ (reproduce with \
                 `rustup run nightly cargo fuzz run --dev -s none {t} fuzz/artifacts/{t}/FILE`)"
            )
        })?;
    }
    Ok(())
}

/// `cargo fuzz` on rustup's nightly toolchain, in the workspace (`rustup run`: whatever
/// cargo the caller runs under, a toolchain's own or rustup's proxy).
fn nightly_fuzz(root: &std::path::Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(root)
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN");
    cmd
}
