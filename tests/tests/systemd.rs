//! Tier 1: the systemd unit, `dist/lb-daemon.service`, alone and with the optional drop-in
//! `dist/filesystem-sandbox.conf`. `systemd-analyze verify` must load each without a word
//! about it, and `systemd-analyze security` must rate each no worse than it was measured.
//! Nothing is started: there is no systemd to start it here (docs/DAEMON.md, "systemd").

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use lb_tests::{netns::unique_name, procs::bin};

/// The unit alone: 4.4 measured with systemd 252 (Debian bookworm), and the limit is that
/// measure. What keeps it there is what the daemon needs, [`NEEDED`] and
/// [`HOST_MOUNT_NAMESPACE`]. A systemd other than 252 weighs the checks differently: measure
/// again on a new Debian release.
const UNIT_MAX: f64 = 4.4;

/// With the drop-in's private file-system view: 2.6 measured.
const SANDBOXED_MAX: f64 = 2.6;

/// The checks of `systemd-analyze security` the unit fails, with or without the drop-in,
/// and why it must. The overall score rounds away a single small loosening (UMask=, say):
/// the tests compare the failed checks with these lists as well.
const NEEDED: &[(&str, &str)] = &[
    (
        "User=/DynamicUser=",
        "root owns the config and the key file (mode 0600)",
    ),
    (
        "RootDirectory=/RootImage=",
        "check scripts are the host's programs",
    ),
    (
        "PrivateUsers=",
        "capabilities must hold in the host's user namespace",
    ),
    ("PrivateNetwork=", "it balances the host's own traffic"),
    ("IPAddressDeny=", "servers and ATMs may be at any address"),
    (
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "mount(2) for the FUSE tables",
    ),
    (
        "CapabilityBoundingSet=~CAP_NET_ADMIN",
        "XDP attach, VIP aliases, net sysctls",
    ),
    (
        "CapabilityBoundingSet=~CAP_BPF",
        "the dataplane's maps and programs",
    ),
    (
        "CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)",
        "CAP_NET_RAW: gratuitous ARP and ICMP pings",
    ),
    ("RestrictAddressFamilies=~AF_PACKET", "gratuitous ARP"),
    (
        "RestrictAddressFamilies=~AF_NETLINK",
        "addresses and XDP by rtnetlink",
    ),
    (
        "RestrictAddressFamilies=~AF_UNIX",
        "the control socket and sd_notify",
    ),
    (
        "RestrictAddressFamilies=~AF_(INET|INET6)",
        "checks, heartbeats, metrics",
    ),
    (
        "SystemCallFilter=~@privileged",
        "bpf(2), and capset(2) for iputils ping",
    ),
    (
        "SystemCallFilter=~@mount",
        "mount(2) and umount2(2) for the FUSE tables",
    ),
    ("DeviceAllow=", "/dev/fuse"),
    ("ProcSubset=", "/proc/sys/net and /proc/thread-self/net/arp"),
];

/// The checks only a mount namespace of the service's own would pass: the unit leaves them
/// to the drop-in, because a mount made inside one (the tables) is not seen on the host.
const HOST_MOUNT_NAMESPACE: &[&str] = &[
    "ProtectSystem=",
    "ProtectHome=",
    "PrivateTmp=",
    "PrivateDevices=",
    "PrivateMounts=",
    "ProtectKernelTunables=",
    "ProtectKernelModules=",
    "ProtectKernelLogs=",
    "ProtectControlGroups=",
    "ProtectProc=",
];

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

/// A copy of the unit (and, if asked, the drop-in) in a directory of its own, removed on drop.
struct UnitCopy {
    dir: PathBuf,
}

impl UnitCopy {
    /// `verify` insists that ExecStart's program exists, and it is not installed in
    /// /usr/local/sbin on a build machine: the copy runs the lb-daemon that was just built.
    fn new(with_drop_in: bool) -> UnitCopy {
        let dir = std::env::temp_dir().join(unique_name("systemd"));
        let unit = std::fs::read_to_string(dist().join("lb-daemon.service"))
            .expect("reading dist/lb-daemon.service");
        let daemon = bin("lb-daemon");
        let mut exec_starts = 0;
        let copy: String = unit
            .lines()
            .map(|line| match line.strip_prefix("ExecStart=") {
                Some(cmd) => {
                    exec_starts += 1;
                    let args = cmd.split_once(' ').map_or("", |(_, args)| args);
                    format!("ExecStart={} {args}\n", daemon.display())
                }
                None => format!("{line}\n"),
            })
            .collect();
        assert_eq!(
            exec_starts, 1,
            "dist/lb-daemon.service: one ExecStart= line"
        );
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        std::fs::write(dir.join("lb-daemon.service"), copy).expect("writing the unit's copy");
        if with_drop_in {
            // Where systemd looks for drop-ins of a unit it loads from this directory.
            let d = dir.join("lb-daemon.service.d");
            std::fs::create_dir(&d).expect("creating the drop-in directory");
            std::fs::copy(
                dist().join("filesystem-sandbox.conf"),
                d.join("filesystem-sandbox.conf"),
            )
            .expect("copying dist/filesystem-sandbox.conf");
        }
        UnitCopy { dir }
    }

    fn unit(&self) -> PathBuf {
        self.dir.join("lb-daemon.service")
    }
}

impl Drop for UnitCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn systemd_analyze(args: &[&str], unit: &Path) -> Output {
    let out = Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        // Plain text: no colours, no pager, no emoji.
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .env("SYSTEMD_EMOJI", "0")
        .output();
    match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "systemd-analyze is not installed: run `cargo xtask setup` (it installs Debian's \
             systemd package)"
        ),
        Err(e) => panic!("cannot run systemd-analyze: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `systemd-analyze verify`: a clean unit prints nothing. Unknown keys and bad values are
/// only warnings (exit status 0), so every line naming the unit or its drop-in fails the
/// test; lines about other units (its dependencies on this machine) are shown, not judged.
fn assert_verifies(copy: &UnitCopy) {
    let out = systemd_analyze(&["verify", "--recursive-errors=no"], &copy.unit());
    let all = text(&out);
    let dir = copy.dir.to_string_lossy();
    let ours: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("lb-daemon") || l.contains(dir.as_ref()))
        .collect();
    let others: Vec<&str> = all.lines().filter(|l| !ours.contains(l)).collect();
    if !others.is_empty() {
        eprintln!(
            "systemd-analyze verify, about other units:\n{}",
            others.join("\n")
        );
    }
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {} ({}):\n{}",
        copy.unit().display(),
        out.status,
        ours.join("\n")
    );
}

/// What `systemd-analyze security --offline=true` makes of the unit: the overall exposure,
/// and the checks it fails (name, description).
struct Security {
    score: f64,
    failed: Vec<(String, String)>,
}

fn security(copy: &UnitCopy) -> Security {
    let run = |extra: &[&str]| {
        let mut args = vec!["security", "--offline=true", "--no-pager"];
        args.extend_from_slice(extra);
        let out = systemd_analyze(&args, &copy.unit());
        assert!(
            out.status.success(),
            "systemd-analyze {} ({}):\n{}",
            args.join(" "),
            out.status,
            text(&out)
        );
        // Warnings go to standard error (verify judges them); the table to standard output.
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = run(&[]);
    // "→ Overall exposure level for lb-daemon.service: 4.4 OK :-)"
    let score = table
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{table}"));
    // The same table as JSON: a failed check has a non-zero exposure, a passed one null.
    let json = run(&["--json=short"]);
    let checks: Vec<serde_json::Value> = serde_json::from_str(json.trim())
        .unwrap_or_else(|e| panic!("systemd-analyze security --json=short: {e}:\n{json}"));
    let failed = checks
        .iter()
        .filter(|c| {
            c["exposure"]
                .as_str()
                .and_then(|e| e.parse::<f64>().ok())
                .is_some_and(|e| e > 0.0)
        })
        .map(|c| {
            let field = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (field("name"), field("description"))
        })
        .collect();
    Security { score, failed }
}

/// The unit is rated at most `max` and fails exactly the checks in `expected`.
fn assert_security(copy: &UnitCopy, max: f64, expected: &[&str]) {
    let s = security(copy);
    println!("exposure {} (at most {max})", s.score);
    let loosened: Vec<String> = s
        .failed
        .iter()
        .filter(|(name, _)| !expected.contains(&name.as_str()))
        .map(|(name, why)| format!("  {name}: {why}"))
        .collect();
    assert!(
        loosened.is_empty(),
        "the unit now fails these checks of systemd-analyze security (restore the directive, \
         or say in NEEDED and docs/DAEMON.md why the daemon needs it):\n{}",
        loosened.join("\n")
    );
    let tightened: Vec<&&str> = expected
        .iter()
        .filter(|name| !s.failed.iter().any(|(n, _)| n == *name))
        .collect();
    assert!(
        tightened.is_empty(),
        "the unit now passes {tightened:?}: take them out of the lists here and update \
         docs/DAEMON.md and the measured exposure"
    );
    assert!(
        s.score <= max,
        "systemd-analyze security rates the unit {}, over {max}",
        s.score
    );
}

fn needed() -> Vec<&'static str> {
    NEEDED.iter().map(|(name, _)| *name).collect()
}

#[test]
fn unit_verifies_cleanly() {
    assert_verifies(&UnitCopy::new(false));
}

#[test]
fn unit_with_the_filesystem_drop_in_verifies_cleanly() {
    assert_verifies(&UnitCopy::new(true));
}

#[test]
fn unit_fails_only_the_checks_the_daemon_needs_it_to() {
    let mut expected = needed();
    expected.extend_from_slice(HOST_MOUNT_NAMESPACE);
    assert_security(&UnitCopy::new(false), UNIT_MAX, &expected);
}

#[test]
fn filesystem_drop_in_passes_the_mount_namespace_checks() {
    assert_security(&UnitCopy::new(true), SANDBOXED_MAX, &needed());
}
