//! Small helpers: running commands with their failures explained, and step headings.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Prints a step heading so a reader can follow a long run.
pub fn step(what: &str) {
    println!("==> {what}");
}

/// The workspace root (xtask lives one level below it).
pub fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Runs `cargo ARGS` in the workspace, inheriting the terminal.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace())
        .status()
        .with_context(|| format!("failed to run {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs a command, inheriting the terminal; fails with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Whether a command exists and exits 0 (its output is discarded).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The effective user is root, or an error saying why root is needed.
pub fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "{what} needs root: it creates network namespaces and attaches XDP programs \
             (run it as root, e.g. with sudo -E)"
        );
    }
    Ok(())
}
