//! `cargo xtask setup`: installs what the build, the tests and the lab need, checking each
//! piece first and saying in one line what it installs and why. Idempotent; safe to run on
//! every `cargo xtask test` and `cargo xtask demo`. The recipe is docs/TOOLCHAIN.md.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::util;

/// A Debian package, how to tell it is installed, and why we need it.
struct Package {
    name: &'static str,
    why: &'static str,
}

const PACKAGES: &[Package] = &[
    Package {
        name: "rustc-web",
        why: "Debian's rustc, the one compiler here with a prebuilt core for the BPF target",
    },
    Package {
        name: "libstd-rust-web-dev-bpf",
        why: "the precompiled core/alloc for bpfel-unknown-none (rust-src cannot be fetched)",
    },
    Package {
        name: "iproute2",
        why: "ip: network namespaces, veths, addresses and routes for the labs",
    },
    Package {
        name: "ethtool",
        why: "veth offload settings that XDP forwarding needs",
    },
    Package {
        name: "procps",
        why: "sysctl, to switch forwarding and ARP behaviour inside lab namespaces",
    },
    Package {
        name: "nginx-light",
        why: "the real HTTP servers behind the VIP in the labs, the tests and the demo",
    },
    Package {
        name: "nftables",
        why: "nft, to cut the heartbeat path in failover tests (and the NAT peer in benchmarks)",
    },
    Package {
        name: "curl",
        why: "the HTTP client the demo shows requests with",
    },
    Package {
        name: "dpkg-dev",
        why: "dpkg-shlibdeps, which works out the Debian package's library dependencies (cargo xtask package)",
    },
    Package {
        name: "man-db",
        why: "man, with which the package test reads the installed manual pages",
    },
    Package {
        name: "systemd",
        why: "systemd-analyze, with which the tests verify and rate dist/lb-daemon.service",
    },
    Package {
        name: "prometheus",
        why: "promtool, with which the tests check that /metrics is valid, linted Prometheus text",
    },
    Package {
        name: "resource-agents",
        why: "ocf-tester and ocf-shellfuncs, with which the tests check the OCF agent dist/ocf/lb",
    },
    Package {
        name: "libxml2-utils",
        why: "xmllint, with which ocf-tester checks the OCF agent's meta-data against its DTD",
    },
    Package {
        name: "corosync",
        why: "the membership and quorum layer of the Pacemaker test's three-node cluster",
    },
    Package {
        name: "pacemaker",
        why: "the cluster manager that runs lb as a promotable clone in the Pacemaker test",
    },
    Package {
        name: "crmsh",
        why: "crm configure, with which the Pacemaker test loads docs/HA.md's snippet",
    },
    Package {
        name: "bpftool",
        why: "the BPF programs and maps that lb-cli collect puts in its bundle (and the bench's path counter dumps maps with it)",
    },
];

/// The peers `cargo xtask bench` measures lb against (nftables is in [`PACKAGES`]).
const BENCH_PACKAGES: &[Package] = &[
    Package {
        name: "haproxy",
        why: "the HTTP benchmark's proxy peer (mode tcp)",
    },
    Package {
        name: "wrk",
        why: "the HTTP benchmark's load generator",
    },
    Package {
        name: "keepalived",
        why: "the failover benchmark's peer (VRRP)",
    },
    Package {
        name: "netsniff-ng",
        why: "trafgen, the packets-per-second generator where the kernel refuses live-frame test runs",
    },
];

/// bpf-linker's version, pinned with the LLVM it is built against (docs/TOOLCHAIN.md).
const BPF_LINKER: &str = "0.13.0";
const LLVM_PACKAGE: &str = "llvm-22-dev";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> Result<()> {
    util::step("setup: checking the toolchain and lab tools");
    let mut apt = Apt::default();
    let mut installed = 0;
    for p in PACKAGES {
        if apt.ensure(p.name, p.why)? {
            installed += 1;
        }
    }
    if !bpf_linker_ok() {
        apt.ensure(
            LLVM_PACKAGE,
            "LLVM 22 libraries to build bpf-linker against",
        )?;
        println!(
            "installing bpf-linker {BPF_LINKER}: links the eBPF object (built against LLVM 22, \
             about two minutes)"
        );
        util::run(
            Command::new(cargo())
                .args(["install", "--quiet"])
                .arg(format!("bpf-linker@{BPF_LINKER}"))
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )
        .context("installing bpf-linker failed")?;
        if !bpf_linker_ok() {
            bail!("bpf-linker {BPF_LINKER} was installed but does not run");
        }
        installed += 1;
    }
    if !util::succeeds(Command::new(cargo()).args(["nextest", "--version"])) {
        println!("installing cargo-nextest: runs every test tier and ends with one summary");
        util::run(Command::new(cargo()).args(["install", "--locked", "--quiet", "cargo-nextest"]))
            .context("installing cargo-nextest failed")?;
        installed += 1;
    }
    if !util::succeeds(Command::new(cargo()).args(["fuzz", "--version"])) {
        println!(
            "installing cargo-fuzz: builds the fuzz targets in fuzz/ with libFuzzer, which the \
             test tier runs for a bounded time"
        );
        util::run(Command::new(cargo()).args(["install", "--locked", "--quiet", "cargo-fuzz"]))
            .context("installing cargo-fuzz failed")?;
        installed += 1;
    }
    if installed == 0 {
        println!("setup: everything is already installed");
    }
    Ok(())
}

/// What `cargo xtask bench` needs beyond [`run`]: the peers it measures against.
pub fn bench() -> Result<()> {
    let mut apt = Apt::default();
    for p in BENCH_PACKAGES {
        apt.ensure(p.name, p.why)?;
    }
    Ok(())
}

/// What `cargo xtask soak` needs beyond [`run`]: gnuplot, for its plot.
pub fn soak(heaptrack: bool) -> Result<()> {
    let mut apt = Apt::default();
    apt.ensure(
        "gnuplot-nox",
        "draws the soak report's plot of memory, descriptors and threads over time",
    )?;
    if heaptrack {
        apt.ensure(
            "heaptrack",
            "records the soaked daemons' allocations by call stack (soak --heaptrack)",
        )?;
    }
    Ok(())
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn bpf_linker_ok() -> bool {
    let out = Command::new("bpf-linker").arg("--version").output();
    matches!(out, Ok(o) if o.status.success()
        && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER))
}

/// Installs Debian packages, running `apt-get update` once before the first install.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    /// Installs `name` unless it is installed; true if it installed it.
    fn ensure(&mut self, name: &str, why: &str) -> Result<bool> {
        if is_installed(name) {
            return Ok(false);
        }
        println!("installing {name}: {why}");
        util::require_root("installing Debian packages")?;
        if !self.updated {
            util::run(
                Command::new("apt-get")
                    .args(["update", "-qq"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
            .context("apt-get update failed: is Debian's archive reachable?")?;
            self.updated = true;
        }
        // dpkg's progress is noise on success; on failure it is the explanation.
        let out = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", name])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null())
            .output()
            .context("failed to run apt-get")?;
        if !out.status.success() {
            bail!(
                "could not install the Debian package {name} ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if !is_installed(name) {
            bail!("apt-get reported success but {name} is not installed");
        }
        // Only the tools are wanted; these packages also enable a service on the host (the
        // tests run their own corosync and Pacemaker, in network namespaces).
        let unit = match name {
            "prometheus" => Some("prometheus.service: only promtool is needed"),
            "corosync" => Some("corosync.service: the Pacemaker test runs its own nodes"),
            "pacemaker" => Some("pacemaker.service: the Pacemaker test runs its own nodes"),
            _ => None,
        };
        if let Some(unit) = unit
            && Path::new("/run/systemd/system").exists()
        {
            println!("stopping and disabling {unit}");
            let service = unit.split(':').next().expect("a unit name");
            let _ = Command::new("systemctl")
                .args(["disable", "--now", service])
                .status();
        }
        Ok(true)
    }
}

fn is_installed(name: &str) -> bool {
    // rustc-web's compiler, checked by the file the build uses as well as by dpkg.
    if name == "rustc-web" && !Path::new("/usr/bin/rustc").exists() {
        return false;
    }
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output();
    matches!(out, Ok(o) if o.status.success()
        && String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}
