//! Hooks: programs the operator names in the config to hear of changes, as keepalived's
//! `notify_master`, `notify_backup` and `notify_fault` and its checkers' `notify_up` and
//! `notify_down`. They run one at a time, in the order of the events, on a task of their
//! own (never on the event loop), each with the event in its environment (docs/DAEMON.md,
//! "Hooks"). One that runs past `[cluster] notify_timeout` is killed with everything it
//! started (its process group). Whatever it prints is logged, a few lines of it.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::sync::mpsc;
use tracing::{info, warn};

/// Hooks waiting to run at most: a server that flaps faster than its hook runs must not
/// pile up work without end.
const QUEUE: usize = 64;
/// Lines of a hook's output that reach the log.
const OUTPUT_LINES: usize = 5;

/// One hook to run.
struct Run {
    /// The config key that names it: `notify_primary`, `notify_up`, ...
    hook: &'static str,
    program: PathBuf,
    env: Vec<(&'static str, String)>,
    timeout: Duration,
}

/// The queue to the hook runner.
#[derive(Clone)]
pub struct Hooks {
    tx: mpsc::Sender<Run>,
}

impl Hooks {
    /// Starts the runner (on the current tokio runtime).
    pub fn start() -> Hooks {
        let (tx, mut rx) = mpsc::channel::<Run>(QUEUE);
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                run(r).await;
            }
        });
        Hooks { tx }
    }

    /// Queues `program` as `hook`, with `env` (and `LB_HOOK`) in its environment.
    pub fn run(
        &self,
        hook: &'static str,
        program: &Path,
        mut env: Vec<(&'static str, String)>,
        timeout: Duration,
    ) {
        env.push(("LB_HOOK", hook.to_string()));
        let r = Run {
            hook,
            program: program.to_path_buf(),
            env,
            timeout,
        };
        if let Err(e) = self.tx.try_send(r) {
            let r = match e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
            };
            warn!(
                "Hook {} ({}) not run: {QUEUE} hooks are waiting already",
                r.hook,
                r.program.display()
            );
        }
    }
}

async fn run(r: Run) {
    let what = format!("Hook {} ({})", r.hook, r.program.display());
    let child = tokio::process::Command::new(&r.program)
        .envs(r.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            warn!("{what} cannot run: {e}");
            return;
        }
    };
    let pid = child.id();
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(r.timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let ms = started.elapsed().as_millis();
            if out.status.success() {
                info!("{what} ran in {ms} ms");
            } else {
                warn!("{what} failed after {ms} ms: {}", out.status);
            }
            for line in String::from_utf8_lossy(&out.stdout)
                .lines()
                .chain(String::from_utf8_lossy(&out.stderr).lines())
                .filter(|l| !l.trim().is_empty())
                .take(OUTPUT_LINES)
            {
                info!("{what} said: {}", line.trim_end());
            }
        }
        Ok(Err(e)) => warn!("{what}: {e}"),
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: plain killpg(2) on the group the hook leads.
                unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
            }
            warn!(
                "{what} was still running after {} s (notify_timeout): killed",
                r.timeout.as_secs()
            );
        }
    }
}
