//! `cargo xtask package`: lb as a Debian package, as operators install software: the two
//! binaries, the systemd unit, the OCF agent, the example configs and the docs, manual
//! pages and shell completions generated from the clap definitions (docs/DAEMON.md,
//! "Packages"). Built with dpkg-deb from a staging tree, no debian/ directory to keep.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util;

/// What to package.
pub struct Opts {
    /// The debug build (what the tests have built already) instead of a release build.
    pub debug: bool,
    /// Where to write the .deb (default target/package/).
    pub output: Option<PathBuf>,
}

/// Builds the package; returns its path.
pub fn run(o: &Opts) -> Result<PathBuf> {
    crate::setup::run()?;
    let profile = if o.debug { "debug" } else { "release" };
    util::step(&format!(
        "package: building lb-daemon and lb-cli ({profile})"
    ));
    let mut build = vec![
        "build",
        "--bins",
        "-p",
        "lb-daemon",
        "-p",
        "lb-cli",
        "--quiet",
    ];
    if !o.debug {
        build.push("--release");
    }
    util::cargo(&build)?;
    let root = util::workspace();
    let bins = root.join("target").join(profile);
    let version = env!("CARGO_PKG_VERSION");
    let arch = output_of(Command::new("dpkg").arg("--print-architecture"))?;
    let name = format!("lb_{version}_{arch}");
    let work = root.join("target/package");
    let stage = work.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    util::step(&format!("package: staging {}", stage.display()));

    // The binaries, without their debug sections.
    for (bin, dir) in [("lb-daemon", "usr/sbin"), ("lb-cli", "usr/bin")] {
        let to = stage.join(dir).join(bin);
        mkdir(to.parent().unwrap())?;
        util::run(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&to)
                .arg(bins.join(bin)),
        )?;
        chmod(&to, 0o755)?;
    }
    // The unit, pointing at the packaged binary.
    let unit = fs::read_to_string(root.join("dist/lb-daemon.service"))?;
    if !unit.contains("ExecStart=/usr/local/sbin/lb-daemon ") {
        bail!(
            "dist/lb-daemon.service: no ExecStart=/usr/local/sbin/lb-daemon line to point at /usr/sbin"
        );
    }
    let unit = unit.replace(
        "ExecStart=/usr/local/sbin/lb-daemon ",
        "ExecStart=/usr/sbin/lb-daemon ",
    );
    put(
        &stage,
        "lib/systemd/system/lb-daemon.service",
        unit.as_bytes(),
        0o644,
    )?;
    put(
        &stage,
        "usr/lib/ocf/resource.d/lb/atm",
        &fs::read(root.join("dist/ocf/lb"))?,
        0o755,
    )?;
    // Docs and examples.
    let doc = "usr/share/doc/lb";
    put(
        &stage,
        &format!("{doc}/README.md"),
        &fs::read(root.join("README.md"))?,
        0o644,
    )?;
    put(
        &stage,
        &format!("{doc}/copyright"),
        copyright().as_bytes(),
        0o644,
    )?;
    put(
        &stage,
        &format!("{doc}/filesystem-sandbox.conf"),
        &fs::read(root.join("dist/filesystem-sandbox.conf"))?,
        0o644,
    )?;
    for (from, to) in [("docs", "docs"), ("examples", "examples")] {
        for entry in fs::read_dir(root.join(from))? {
            let path = entry?.path();
            if path.is_file() {
                let file = path.file_name().unwrap().to_string_lossy().into_owned();
                put(
                    &stage,
                    &format!("{doc}/{to}/{file}"),
                    &fs::read(&path)?,
                    0o644,
                )?;
            }
        }
    }
    mkdir(&stage.join("etc/lb"))?;
    chmod(&stage.join("etc/lb"), 0o700)?;

    // Manual pages and completions, from the binaries' own clap definitions.
    let man1 = stage.join("usr/share/man/man1");
    let man8 = stage.join("usr/share/man/man8");
    mkdir(&man1)?;
    mkdir(&man8)?;
    let cli = stage.join("usr/bin/lb-cli");
    util::run(Command::new(&cli).arg("manpage").arg(&man1))?;
    let daemon_page = output_of(Command::new(stage.join("usr/sbin/lb-daemon")).arg("--manpage"))?;
    fs::write(man8.join("lb-daemon.8"), daemon_page + "\n")?;
    for dir in [&man1, &man8] {
        for entry in fs::read_dir(dir)? {
            let page = entry?.path();
            chmod(&page, 0o644)?;
            util::run(Command::new("gzip").args(["-9n"]).arg(&page))?;
        }
    }
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/lb-cli"),
        ("zsh", "usr/share/zsh/vendor-completions/_lb-cli"),
        ("fish", "usr/share/fish/vendor_completions.d/lb-cli.fish"),
    ] {
        let script = output_of(Command::new(&cli).args(["completions", shell]))?;
        put(&stage, path, (script + "\n").as_bytes(), 0o644)?;
    }

    // The control files.
    let depends = shlib_depends(&work, &[&cli, &stage.join("usr/sbin/lb-daemon")])?;
    let size_kib = du_kib(&stage)?;
    let control = format!(
        "Package: lb\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: lb developers <lb@example.invalid>\n\
         Installed-Size: {size_kib}\n\
         Depends: {depends}\n\
         Recommends: iproute2, ethtool\n\
         Suggests: bpftool, resource-agents\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://example.invalid/lb\n\
         Description: XDP load balancer with a TCL-style control plane\n \
         lb forwards virtual-IP traffic to real servers by NAT, direct routing or\n \
         IP-in-IP tunnel with an eBPF/XDP dataplane. lb-daemon, the ATM, checks the\n \
         servers, elects one primary among several balancers, syncs connections and\n \
         shows its state as /proc-style tables; lb-cli operates it.\n"
    );
    put(&stage, "DEBIAN/control", control.as_bytes(), 0o644)?;
    put(&stage, "DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    put(&stage, "DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    put(&stage, "DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;

    let out_dir = o.output.clone().unwrap_or(work);
    mkdir(&out_dir)?;
    let deb = out_dir.join(format!("{name}.deb"));
    // xz for a release; gzip for a debug build, which the tests make beside the labs: a
    // third of xz's CPU time.
    let compress = if o.debug { "-Zgzip" } else { "-Zxz" };
    util::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", compress, "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!("package: {}", deb.display());
    Ok(deb)
}

/// After install: systemd learns of the unit. The daemon is not enabled or started: it
/// needs /etc/lb/lb.toml first (docs/DAEMON.md, "Packages").
const POSTINST: &str = "#!/bin/sh\nset -e\n\
if [ -d /run/systemd/system ]; then\n    systemctl daemon-reload || true\nfi\n";

/// Before removal: a running daemon stops (an ATM removes its aliases and detaches).
const PRERM: &str = "#!/bin/sh\nset -e\n\
if [ \"$1\" = remove ] && [ -d /run/systemd/system ]; then\n    \
systemctl stop lb-daemon.service || true\nfi\n";

/// After removal: systemd forgets the unit.
const POSTRM: &str = "#!/bin/sh\nset -e\n\
if [ -d /run/systemd/system ]; then\n    systemctl daemon-reload || true\nfi\n";

fn copyright() -> String {
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: lb\n\n\
         Files: *\n\
         License: {}\n",
        env!("CARGO_PKG_LICENSE")
    )
}

/// `Depends:` for the binaries, by dpkg-shlibdeps (libc6 at the version their symbols need).
fn shlib_depends(work: &Path, bins: &[&Path]) -> Result<String> {
    let dir = work.join("shlibdeps");
    put(
        &dir,
        "debian/control",
        b"Source: lb\n\nPackage: lb\nArchitecture: any\n",
        0o644,
    )?;
    let mut cmd = Command::new("dpkg-shlibdeps");
    cmd.arg("-O").current_dir(&dir);
    for b in bins {
        cmd.arg(format!("-e{}", b.display()));
    }
    let out = output_of(&mut cmd)?;
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .with_context(|| format!("dpkg-shlibdeps said no Depends: {out}"))
}

fn du_kib(dir: &Path) -> Result<u64> {
    let out = output_of(Command::new("du").args(["-sk"]).arg(dir))?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du said {out:?}"))
}

fn put(stage: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<()> {
    let to = stage.join(rel);
    mkdir(to.parent().unwrap())?;
    fs::write(&to, bytes).with_context(|| format!("writing {}", to.display()))?;
    chmod(&to, mode)
}

fn mkdir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // dpkg-deb refuses group- or other-writable control directories; keep every one 0755.
    chmod(dir, 0o755)
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// A command's standard output, trimmed; fails with its standard error.
fn output_of(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}
