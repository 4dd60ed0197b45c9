//! A network namespace owned by a test: created on `new`, entered by the calling thread with
//! `enter` (left again when the guard drops), deleted on drop even when the test panics.

use std::{
    fs::File,
    os::fd::AsFd,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use nix::sched::{CloneFlags, setns};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique namespace name: `lbt-<pid>-<n>-<label>` (kernel limit: 255 bytes, fine).
pub fn unique_name(label: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("lbt{}-{}-{}", std::process::id(), n, label)
}

/// A network namespace that lives as long as this value (unless attached by name).
pub struct NetNs {
    name: String,
    /// Deleted on drop: created here, not attached.
    owned: bool,
}

impl NetNs {
    /// Creates a namespace named after `label` (made unique) with `lo` up.
    pub fn new(label: &str) -> NetNs {
        NetNs::named(&unique_name(label))
    }

    /// Creates a namespace with exactly this name, with `lo` up.
    pub fn named(name: &str) -> NetNs {
        let name = name.to_string();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name, owned: true };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A handle on an existing namespace by its full name (from another thread, say); it is
    /// not deleted when the handle drops.
    pub fn attach(name: &str) -> NetNs {
        NetNs {
            name: name.to_string(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> NsGuard {
        let original = File::open("/proc/thread-self/ns/net")
            .expect("open /proc/thread-self/ns/net (is /proc mounted?)");
        let target = File::open(format!("/run/netns/{}", self.name))
            .unwrap_or_else(|e| panic!("open /run/netns/{}: {e}", self.name));
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
        NsGuard { original }
    }

    /// `ip netns exec NAME args...`, returning its output whatever the exit status.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn ip netns exec {} {args:?}: {e}", self.name))
    }

    /// Like [`NetNs::exec`], panicking with the command's stderr unless it succeeds; returns stdout.
    /// Adds an nftables filter rule to the chain on `hook` (input or output) of table
    /// `inet TABLE`, making both if needed; `nft delete table inet TABLE` removes them.
    pub fn nft_filter(&self, table: &str, hook: &str, rule: &str) {
        self.exec_ok(&["nft", &format!("add table inet {table}")]);
        self.exec_ok(&[
            "nft",
            &format!("add chain inet {table} {hook} {{ type filter hook {hook} priority 0 ; }}"),
        ]);
        self.exec_ok(&["nft", &format!("add rule inet {table} {hook} {rule}")]);
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        if !out.status.success() {
            panic!(
                "in netns {}: {:?} failed ({}): {}",
                self.name,
                args,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running process in the namespace.
    pub fn spawn(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn in {}: {args:?}: {e}", self.name))
    }

    /// A command that runs inside the namespace's network stack but, unlike `ip netns exec`,
    /// in the caller's mount namespace: a FUSE mount or a socket file it makes is visible
    /// to the rest of the machine, as it would be for a daemon started by systemd.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        let target = File::open(format!("/run/netns/{}", self.name))
            .unwrap_or_else(|e| panic!("open /run/netns/{}: {e}", self.name));
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; `target` is kept alive by the closure.
        unsafe {
            cmd.pre_exec(move || {
                setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        cmd
    }

    /// The interface index of `dev` inside the namespace.
    pub fn ifindex(&self, dev: &str) -> u32 {
        let s = self.exec_ok(&["cat", &format!("/sys/class/net/{dev}/ifindex")]);
        s.trim()
            .parse()
            .unwrap_or_else(|e| panic!("ifindex of {dev} in {}: {s:?}: {e}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // Whatever still runs in it goes first: a daemon a failed test left behind, or one
        // that a program under test started on its own (the OCF agent's lb-daemon, a
        // Pacemaker node's corosync), which would otherwise outlive the test.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>()
                    && pid as u32 != std::process::id()
                {
                    // SAFETY: kill(2) on a process of a namespace this value made.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // Deleting the namespace also deletes the veths inside it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// While alive, the thread that called [`NetNs::enter`] is inside that namespace.
pub struct NsGuard {
    original: File,
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(self.original.as_fd(), CloneFlags::CLONE_NEWNET) {
            // The thread cannot be trusted to be anywhere sane now.
            eprintln!("setns back to the original namespace failed: {e}");
            std::process::abort();
        }
    }
}

/// Runs a host command, panicking with its stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn namespace_is_removed_even_after_a_panic() {
        let before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let name = std::sync::Mutex::new(String::new());
        let result = std::panic::catch_unwind(|| {
            let ns = NetNs::new("panic");
            *name.lock().unwrap() = ns.name().to_string();
            assert!(Path::new(&format!("/run/netns/{}", ns.name())).exists());
            let _inside = ns.enter();
            panic!("deliberate");
        });
        assert!(result.is_err());
        let name = name.lock().unwrap().clone();
        assert!(!name.is_empty());
        assert!(
            !Path::new(&format!("/run/netns/{name}")).exists(),
            "{name} left behind"
        );
        // And the guard took this thread back to where it started.
        let after = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert_eq!(before, after);
    }
}
