//! lb's own programs in a lab: finding the built binaries, and an lb-daemon process that is
//! stopped (SIGTERM, then SIGKILL) and whose mount is detached when it drops.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::lab::Lab;

/// A binary of the workspace (`lb-daemon`, `lb-cli`) next to the running test or program.
/// `cargo xtask test` builds them before the tests run.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/test-binary or target/<profile>/xtask
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is not built next to {} (run `cargo build --bins` first; cargo xtask test does)",
        exe.display()
    );
}

/// A running lb-daemon.
pub struct Daemon {
    pub ns: String,
    child: Option<Child>,
    pub log: PathBuf,
    pub socket: PathBuf,
    pub mount: PathBuf,
    /// ADDRESS:PORT of the metrics endpoint inside the daemon's namespace.
    pub metrics: String,
    /// Left running on drop (`cargo xtask demo --keep`).
    kept: bool,
}

impl Daemon {
    /// Starts `lb-daemon --config CONFIG` in namespace `ns` with its log, socket and mount
    /// under the lab's directory, named after `ns`.
    pub fn start(lab: &mut Lab, ns: &str, config: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_program(lab, ns, &bin("lb-daemon"), config, extra)
    }

    /// [`Daemon::start`] with another lb-daemon than the one built here (an installed one).
    pub fn start_program(
        lab: &mut Lab,
        ns: &str,
        program: &Path,
        config: &Path,
        extra: &[&str],
    ) -> Daemon {
        let dir = lab.dir();
        let log = dir.join(format!("{ns}.log"));
        let socket = dir.join(format!("{ns}.sock"));
        let mount = dir.join(format!("{ns}-tables"));
        let metrics = "127.0.0.1:9780".to_string();
        let mut cmd = lab.ns(ns).command(program);
        cmd.arg("--config")
            .arg(config)
            .arg("--log-file")
            .arg(&log)
            .arg("--socket")
            .arg(&socket)
            .arg("--mount")
            .arg(&mount)
            .args(["--metrics", &metrics])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("spawn lb-daemon");
        Daemon {
            ns: ns.to_string(),
            child: Some(child),
            log,
            socket,
            mount,
            metrics,
            kept: false,
        }
    }

    /// Leaves the daemon running when this value drops.
    pub fn keep(mut self) {
        self.kept = true;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics with the log after `limit`.
    pub fn wait_log(&mut self, needle: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "lb-daemon in {} exited ({status}) before logging {needle:?}:\n{}",
                    self.ns,
                    self.log()
                );
            }
            if start.elapsed() > limit {
                panic!(
                    "lb-daemon in {} did not log {needle:?} within {limit:?}:\n{}",
                    self.ns,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the daemon to exit by itself; panics with the log after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        let child = self.child.as_mut().expect("a running daemon");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status;
            }
            if start.elapsed() > limit {
                panic!(
                    "lb-daemon in {} still runs after {limit:?}:\n{}",
                    self.ns,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `lb-cli --socket SOCKET ARGS...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("lb-cli"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run lb-cli")
    }

    /// `lb-cli ... ARGS` that must succeed; its standard output.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "lb-cli {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A table file from the mount.
    pub fn cat(&self, table: &str) -> String {
        let p = self.mount.join(table);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cat {}: {e}", p.display()))
    }

    /// A scrape of the daemon's `/metrics`, from inside its namespace (`lab`'s), read
    /// whole however long it is.
    pub fn scrape(&self, lab: &Lab) -> String {
        let _in = lab.ns(&self.ns).enter();
        let url = format!("http://{}/metrics", self.metrics);
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut ureq::get(&url)
                .call()
                .unwrap_or_else(|e| panic!("GET {url}: {e}"))
                .into_reader(),
            &mut text,
        )
        .unwrap_or_else(|e| panic!("reading {url}: {e}"));
        text
    }

    /// Sends a signal (by number).
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// SIGTERM and wait (at most 10 s, then SIGKILL); returns whether it exited by itself.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: plain kill(2).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        self.stop();
        if let Ok(c) = std::ffi::CString::new(self.mount.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid C string; lazily detaches a mount a killed daemon left.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// `promtool check metrics` on a scrape, as operators' Prometheus would take it: it parses
/// the body and lints it (HELP and TYPE on every family, `_total` on counters), and prints
/// nothing and exits 0 only for a clean exposition. Panics with what it said otherwise.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: run `cargo xtask setup` (it installs Debian's \
             prometheus package)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.is_empty(),
        "promtool check metrics: {}\n{said}\non:\n{text}",
        out.status
    );
}
