//! `lb-cli collect`: a support bundle, as `ovs collect logs` and cilium-bugtool make them. A
//! tar.gz of what the daemon shows (status, every table, /metrics, its log and config) and
//! of the machine around it (addresses, links, routes, drivers, kernel, BPF programs and
//! maps). Each part is taken on its own: one that fails (a daemon that does not answer, a
//! tool that is not installed) is written down in `MANIFEST.txt` and the rest still comes.
//! The auth key file is never read into the bundle, and a part that would hold the key's
//! bytes is left out.

use std::{
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::Command,
};

use lb_api::{
    config,
    control::Request,
    views::{Status, Support},
};

/// The log's tail that goes in: the recent past is what explains a problem, and a bundle
/// must stay small enough to mail.
const LOG_TAIL: u64 = 16 << 20;

/// One file of the bundle, or why it could not be made.
struct Part {
    name: String,
    what: &'static str,
    body: Result<Vec<u8>, String>,
}

/// Makes the bundle at `output` (by default `/var/tmp/lb-HOST-DATE.tar.gz`); returns its
/// path and how many parts could not be taken.
pub fn collect(
    socket: &Path,
    output: Option<PathBuf>,
    config_path: Option<PathBuf>,
    ask: impl Fn(Request) -> Result<lb_api::control::Response, String>,
) -> Result<(PathBuf, usize), String> {
    let now = jiff::Timestamp::now();
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "host".into());
    let stamp = now.strftime("%Y%m%d-%H%M%S").to_string();
    let output =
        output.unwrap_or_else(|| PathBuf::from(format!("/var/tmp/lb-{host}-{stamp}.tar.gz")));
    let top = format!("lb-{host}-{stamp}");
    let mut parts = Vec::new();
    let mut add = |name: &str, what: &'static str, body: Result<Vec<u8>, String>| {
        parts.push(Part {
            name: name.to_string(),
            what,
            body,
        })
    };

    // The daemon.
    let support = ask(Request::Support).and_then(|r| r.into_view::<Support>());
    add(
        "lb/daemon.txt",
        "the daemon: version, pid, config and log files",
        support.as_ref().map_err(Clone::clone).map(|s| {
            format!(
                "lb-daemon {} (built {}), pid {}\nconfig {}\nlog {}\ncontrol socket {}\n",
                s.version,
                s.built,
                s.pid,
                s.config.display(),
                s.log_file
                    .as_ref()
                    .map_or("standard error (the journal under systemd)".into(), |p| {
                        p.display().to_string()
                    }),
                socket.display()
            )
            .into_bytes()
        }),
    );
    let status = ask(Request::Status).and_then(|r| r.into_view::<Status>());
    add(
        "lb/status.txt",
        "lb-cli status",
        status
            .as_ref()
            .map(|s| super::render_status(s).into_bytes())
            .map_err(Clone::clone),
    );
    add(
        "lb/status.json",
        "lb-cli status --json",
        status
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|s| serde_json::to_vec_pretty(s).map_err(|e| e.to_string())),
    );
    let attach = status.as_ref().map_err(Clone::clone).map(|s| {
        match &s.attached {
            Some(a) if !a.is_empty() => a
                .iter()
                .map(|x| format!("lb_xdp on {} ({})\n", x.interface, x.mode))
                .collect::<String>(),
            _ => "lb_xdp is not attached (a real server, or not primary-capable)\n".into(),
        }
        .into_bytes()
    });
    add("lb/dataplane.txt", "the dataplane's attach mode", attach);
    let mut table_text = std::collections::HashMap::new();
    for t in lb_api::tables::Table::ALL.map(|t| t.name()) {
        let text = ask(Request::Cat {
            table: t.to_string(),
        })
        .map(|r| r.text.unwrap_or_default());
        if let Ok(x) = &text {
            table_text.insert(t, x.clone());
        }
        add(
            &format!("lb/tables/{t}"),
            "a table, as lb-cli cat shows it",
            text.map(String::into_bytes),
        );
    }
    add(
        "lb/fill.txt",
        "the maps' sizes and fill: capacities (config) against what is in use",
        fill(&table_text),
    );
    add(
        "lb/metrics.txt",
        "/metrics, as Prometheus scrapes it",
        ask(Request::Metrics).map(|r| r.text.unwrap_or_default().into_bytes()),
    );
    // Its files: the config (never the key it names) and the log's tail.
    let config_file = config_path
        .or_else(|| support.as_ref().ok().map(|s| s.config.clone()))
        .unwrap_or_else(|| PathBuf::from("/etc/lb/lb.toml"));
    add(
        "lb/config.toml",
        "the config file (the auth key file it names is not included)",
        std::fs::read(&config_file).map_err(|e| format!("{}: {e}", config_file.display())),
    );
    let key = key_of(&config_file);
    match support.as_ref().ok().and_then(|s| s.log_file.clone()) {
        Some(log) => add(
            "lb/daemon.log",
            "the daemon's log (its last 16 MiB)",
            tail(&log, LOG_TAIL).map_err(|e| format!("{}: {e}", log.display())),
        ),
        None => add(
            "lb/daemon.log",
            "the daemon's log from the journal (its last 20,000 lines)",
            run(&["journalctl", "-u", "lb-daemon", "-n", "20000", "--no-pager"]),
        ),
    }

    // The machine.
    for (name, what, argv) in [
        (
            "system/uname.txt",
            "the kernel (uname -a)",
            &["uname", "-a"][..],
        ),
        (
            "system/ip-addr.txt",
            "ip -d addr",
            &["ip", "-d", "addr"][..],
        ),
        (
            "system/ip-link.txt",
            "ip -d link (XDP programs attached show as prog/xdp)",
            &["ip", "-d", "link"][..],
        ),
        (
            "system/ip-route.txt",
            "ip -d route",
            &["ip", "-d", "route", "show", "table", "all"][..],
        ),
        (
            "system/ip6-route.txt",
            "ip -d -6 route",
            &["ip", "-d", "-6", "route", "show", "table", "all"][..],
        ),
        ("system/ip-neigh.txt", "ip neigh", &["ip", "neigh"][..]),
        (
            "system/bpftool-prog.txt",
            "the BPF programs loaded (bpftool prog show)",
            &["bpftool", "prog", "show"][..],
        ),
        (
            "system/bpftool-map.txt",
            "the BPF maps, with their sizes (bpftool map show)",
            &["bpftool", "map", "show"][..],
        ),
        (
            "system/bpftool-net.txt",
            "XDP and tc attachments (bpftool net show)",
            &["bpftool", "net", "show"][..],
        ),
    ] {
        add(name, what, run(argv));
    }
    let os = std::fs::read("/etc/os-release").map_err(|e| format!("/etc/os-release: {e}"));
    add("system/os-release.txt", "the distribution", os);
    // From netlink (`ip -o link`), not /sys/class/net, which shows the namespace that
    // mounted sysfs rather than the one lb-cli runs in.
    let ifaces: Vec<String> = run(&["ip", "-o", "link", "show"])
        .map(|out| {
            String::from_utf8_lossy(&out)
                .lines()
                .filter_map(|l| {
                    let name = l.split(": ").nth(1)?;
                    Some(name.split('@').next()?.to_string())
                })
                .filter(|n| n != "lo")
                .collect()
        })
        .unwrap_or_default();
    for i in ifaces {
        add(
            &format!("system/ethtool-i-{i}.txt"),
            "the interface's driver (ethtool -i)",
            run(&["ethtool", "-i", &i]),
        );
    }

    // Nothing that holds the key goes in.
    if let Some(key) = key.filter(|k| !k.is_empty()) {
        for p in &mut parts {
            if p.body.as_ref().is_ok_and(|b| contains(b, &key)) {
                p.body = Err("left out: it holds the auth key's bytes".into());
            }
        }
    }
    let failed = parts.iter().filter(|p| p.body.is_err()).count();
    let mut manifest = format!(
        "lb support bundle, {host}, {} UTC\n\n",
        now.strftime("%Y-%m-%d %H:%M:%S")
    );
    for p in &parts {
        match &p.body {
            Ok(_) => manifest += &format!("{:<32} {}\n", p.name, p.what),
            Err(e) => manifest += &format!("{:<32} NOT TAKEN: {e}\n", p.name),
        }
    }
    write(&output, &top, &manifest, &parts)?;
    Ok((output, failed))
}

/// The archive, mode 0600 (it holds client addresses and the config), written whole to a
/// temporary name and renamed, so a failure leaves no half bundle.
fn write(output: &Path, top: &str, manifest: &str, parts: &[Part]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = output.with_extension("partial");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let entry = |tar: &mut tar::Builder<_>, name: &str, body: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(mtime);
        h.set_cksum();
        tar.append_data(&mut h, format!("{top}/{name}"), body)
    };
    let result = (|| {
        entry(&mut tar, "MANIFEST.txt", manifest.as_bytes())?;
        for p in parts {
            if let Ok(b) = &p.body {
                entry(&mut tar, &p.name, b)?;
            }
        }
        tar.into_inner()?.finish()?.sync_all()
    })();
    if let Err(e) = result.and_then(|_| std::fs::rename(&tmp, output)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", output.display()));
    }
    Ok(())
}

/// A command's standard output; its standard error too when it fails.
fn run(argv: &[&str]) -> Result<Vec<u8>, String> {
    match Command::new(argv[0]).args(&argv[1..]).output() {
        Ok(o) if o.status.success() => Ok(o.stdout),
        Ok(o) => Err(format!(
            "{} {}: {}",
            argv.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{}: {e}", argv[0])),
    }
}

/// The last `max` bytes of a file.
fn tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut out = Vec::new();
    f.take(max).read_to_end(&mut out)?;
    Ok(out)
}

/// The bytes of the auth key the config names, to keep them out of the bundle.
fn key_of(config_file: &Path) -> Option<Vec<u8>> {
    let c = config::load(config_file).ok()?;
    std::fs::read(c.cluster.auth_key_file?).ok()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Capacities (the `config` table) against use: services and server lines from `stat`,
/// live connections from `stat`.
fn fill(tables: &std::collections::HashMap<&str, String>) -> Result<Vec<u8>, String> {
    let nums = |t: &str| -> Result<Vec<u64>, String> {
        tables
            .get(t)
            .ok_or(format!("no {t} table"))?
            .split_whitespace()
            .map(|v| v.parse::<u64>().map_err(|e| format!("{t}: {e}")))
            .collect()
    };
    let caps = nums("config")?;
    let stat = nums("stat")?;
    // TCL's six numbers of stat, then (lb's) the half-open connections.
    if caps.len() != 3 || !(6..=7).contains(&stat.len()) {
        return Err("the config or stat table has an unexpected form".into());
    }
    let live = stat[2] + stat.get(6).copied().unwrap_or(0);
    let pct = |used: u64, cap: u64| used as f64 * 100.0 / cap.max(1) as f64;
    Ok(format!(
        "services      {:>10} of {:>10} ({:.1} %)\n\
         server lines  {:>10} of {:>10} ({:.1} %)\n\
         connections   {:>10} of {:>10} ({:.1} %, live ones, half-open included; the LRU evicts the least recently used when full)\n",
        stat[0],
        caps[0],
        pct(stat[0], caps[0]),
        stat[1],
        caps[1],
        pct(stat[1], caps[1]),
        live,
        caps[2],
        pct(live, caps[2]),
    )
    .into_bytes())
}
