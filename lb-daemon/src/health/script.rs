//! The `script` check: a program that exits 0, given the server in its environment.

use std::{path::PathBuf, time::Duration};

use super::CheckCtx;

/// Runs a check script in a process group of its own, so that at the timeout the script and
/// everything it started are killed together.
pub(super) async fn check(path: &PathBuf, ctx: &CheckCtx, timeout: Duration) -> Option<String> {
    let child = tokio::process::Command::new(path)
        .env("LB_SERVER", ctx.addr.to_string())
        .env("LB_PORT", ctx.port.to_string())
        .env("LB_SERVICE", &ctx.service)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Some(format!("script {}: {e}", path.display())),
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(s)) if s.success() => None,
        Ok(Ok(s)) => Some(format!("script exited with {s}")),
        Ok(Err(e)) => Some(format!("script: {e}")),
        Err(_) => {
            if let Some(pid) = child.id() {
                // SAFETY: plain killpg(2) on the group the script leads.
                unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
            }
            let _ = child.kill().await;
            Some(format!("script killed after {} ms", timeout.as_millis()))
        }
    }
}
