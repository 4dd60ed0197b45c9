//! `cargo xtask demo`: the whole product in a lab, shown to a new user. A client, two ATMs
//! and three real servers on one Ethernet segment (network namespaces joined by a bridge);
//! nginx on each server; one IPv4 and one IPv6 VIP, each served by direct routing, IP-in-IP
//! (IPv6-in-IPv6) tunnel and NAT (NAT66) at once; lb-daemon on every machine from one config;
//! requests over both families, tables, and a failover drill.
//! Everything is torn down at the end, on failure and on Ctrl-C, unless `--keep`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_tests::{cluster, lab::Lab, procs::Daemon};

use crate::{setup, util};

/// Namespaces are `lbdemo-<name>`; files live in DIR.
const PREFIX: &str = "lbdemo";
const DIR: &str = "/run/lb-demo";
const REQUESTS: usize = 30;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: tearing the lab down");
    }
    Ok(())
}

pub fn run(keep: bool) -> Result<()> {
    util::require_root("cargo xtask demo")?;
    setup::run()?;
    // Ctrl-C: finish the current step, then tear everything down (the daemons and nginx get
    // the signal too and stop cleanly).
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .context("installing a Ctrl-C handler")?;

    util::step("build: lb-daemon (with the eBPF object) and lb-cli");
    util::cargo(&["build", "--bins", "--quiet"])?;

    let dir = PathBuf::from(DIR);
    util::step(&format!(
        "lab: network namespaces {PREFIX}-client, -atm1, -atm2, -s1, -s2, -s3 on one dual-stack \
         segment (a bridge in {PREFIX}-sw); files in {DIR}"
    ));
    let mut lab = Lab::named(PREFIX, &dir);
    cluster::build_dual_stack(&mut lab, 2, 3);
    println!(
        "  client {}   atm1 {}   atm2 {}   s1 {}   s2 {}   s3 {} (and {} on the NAT subnet)",
        cluster::CLIENT,
        cluster::atm_addr(1),
        cluster::atm_addr(2),
        cluster::server_addr(1),
        cluster::server_addr(2),
        cluster::server_addr(3),
        cluster::server_nat_addr(3)
    );
    println!(
        "  client {}   atm1 {}   atm2 {}   s1 {}   s2 {}   s3 {} (and {} on the NAT66 subnet)",
        cluster::CLIENT6,
        cluster::atm6(1),
        cluster::atm6(2),
        cluster::server6(1),
        cluster::server6(2),
        cluster::server6(3),
        cluster::nat6(13)
    );
    for (i, method) in [(1, "direct"), (2, "tunnel"), (3, "nat")] {
        let ns = cluster::server(i);
        lab.nginx(&ns, &format!("{ns} {method}"), &[80, 8080]);
    }
    println!("  nginx on s1, s2, s3: each page names its server and how lb reaches it");
    check_interrupt()?;

    let key = dir.join("authkey");
    std::fs::write(&key, random_key()?)?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let config_path = dir.join("lb.toml");
    let config = config(&key);
    std::fs::write(&config_path, &config)?;
    util::step(&format!(
        "config: one file for every machine ({})",
        config_path.display()
    ));
    for line in config.lines() {
        println!("  {line}");
    }

    util::step("start: lb-daemon on s1, s2, s3 (node role), then on atm1 and atm2");
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let ns = cluster::server(i);
        let mut d = Daemon::start(&mut lab, &ns, &config_path, &["--node", &ns]);
        d.wait_log("Control socket", Duration::from_secs(20));
        let what = match i {
            1 => "VIPs on lo, ARP for them silenced",
            2 => "VIPs on lo, ARP silenced, lb_decap attached for IPIP and IPv6-in-IPv6",
            _ => "NAT server: nothing to configure",
        };
        println!("  {ns}: {what}");
        nodes.push(d);
    }
    let mut atm1 = Daemon::start(&mut lab, &cluster::atm(1), &config_path, &[]);
    atm1.wait_log("This ATM is primary", Duration::from_secs(20));
    let mut atm2 = Daemon::start(&mut lab, &cluster::atm(2), &config_path, &[]);
    atm2.wait_log("ATM atm1 (192.0.2.2) is primary", Duration::from_secs(20));
    println!("  atm1: elected primary; atm2: backup. atm1's start-up log:");
    // Up to the line that says it is primary.
    let log = atm1.log();
    let upto = log
        .lines()
        .position(|l| l.contains("This ATM is primary"))
        .map_or(18, |i| i + 1);
    for l in log.lines().take(upto) {
        println!("    {}", l.split_once(' ').map(|x| x.1).unwrap_or(l));
    }
    check_interrupt()?;

    util::step(&format!("lb-cli --socket {} status", atm1.socket.display()));
    indent(&atm1.cli_ok(&["status"]));

    for url in [
        format!("http://{}/", cluster::VIP),
        format!("http://[{}]/", cluster::VIP6),
    ] {
        util::step(&format!("{REQUESTS} requests from the client: curl {url}"));
        let mut tally = std::collections::BTreeMap::<String, usize>::new();
        let mut row = Vec::new();
        for i in 1..=REQUESTS {
            let body = curl(&lab, &url, Duration::from_secs(5))?;
            *tally.entry(body.clone()).or_default() += 1;
            row.push(format!("{i:>2} {body:<10}"));
            if row.len() == 5 {
                println!("  {}", row.join("  "));
                row.clear();
            }
        }
        println!(
            "  answered by: {}",
            tally
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        check_interrupt()?;
    }

    let mount = atm1.mount.clone();
    for table in ["connections", "servers", "services", "stat"] {
        let path = mount.join(table);
        util::step(&format!("cat {}", path.display()));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let lines: Vec<&str> = text.lines().collect();
        // Some of each family: the table lists IPv4 first.
        let shown: Vec<&&str> = if lines.len() > 8 {
            let v6 = lines
                .iter()
                .position(|l| l.contains('['))
                .unwrap_or(lines.len());
            lines[..v6.min(4)]
                .iter()
                .chain(lines[v6..].iter().take(4))
                .collect()
        } else {
            lines.iter().collect()
        };
        for l in shown {
            println!("  {l}");
        }
        if lines.len() > 8 {
            println!(
                "  ... ({} lines; NAT connections have a second line for the ATM-to-server leg)",
                lines.len()
            );
        }
    }
    println!(
        "  (stat: services, server lines, active connections, packets, dropped, new connections, \
         half-open connections)"
    );
    check_interrupt()?;

    util::step(
        "failover drill: kill -9 atm1's lb-daemon while the client keeps requesting (both VIPs)",
    );
    let results: Arc<Mutex<Vec<bool>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = lab.ns("client").name().to_string();
    let load = {
        let (results, stop) = (results.clone(), stop.clone());
        thread::spawn(move || {
            // Both families, in turn.
            let urls = [
                format!("http://{}/", cluster::VIP),
                format!("http://[{}]/", cluster::VIP6),
            ];
            for url in urls.iter().cycle() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let ok = curl_in(&client, url, Duration::from_secs(3)).is_ok();
                results.lock().unwrap().push(ok);
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    thread::sleep(Duration::from_millis(500));
    atm1.kill();
    let killed = Instant::now();
    atm2.wait_log("This ATM is primary", Duration::from_secs(10));
    let switched = killed.elapsed();
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    load.join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?;
    let results = results.lock().unwrap().clone();
    let failed = results.iter().filter(|ok| !**ok).count();
    println!(
        "  atm2 took over {} ms after the kill; {} requests during the drill, {failed} failed",
        switched.as_millis(),
        results.len()
    );
    for l in atm2.log().lines().filter(|l| {
        l.contains("stopped answering") || l.contains("Elected") || l.contains("configured on")
    }) {
        println!("    atm2: {}", l.split_once(' ').map(|x| x.1).unwrap_or(l));
    }
    util::step(&format!("lb-cli --socket {} status", atm2.socket.display()));
    indent(&atm2.cli_ok(&["status"]));
    check_interrupt()?;

    util::step("restart atm1's lb-daemon: a former primary comes back as backup");
    let mut atm1 = Daemon::start(&mut lab, &cluster::atm(1), &config_path, &[]);
    atm1.wait_log("ATM atm2 (192.0.2.3) is primary", Duration::from_secs(20));
    thread::sleep(Duration::from_millis(500));
    util::step(&format!("cat {}", atm1.mount.join("atms").display()));
    indent(&atm1.cat("atms"));
    println!("  (name address role state last-heard-ms)");
    let body = curl(
        &lab,
        &format!("http://{}/", cluster::VIP),
        Duration::from_secs(5),
    )?;
    let body6 = curl(
        &lab,
        &format!("http://[{}]/", cluster::VIP6),
        Duration::from_secs(5),
    )?;
    println!("  and the VIPs still answer: {body} (IPv4), {body6} (IPv6)");

    if keep {
        util::step("--keep: the lab stays up; explore it with");
        let c = lab.ns("client").name().to_string();
        println!("  ip netns exec {c} curl http://{}/", cluster::VIP);
        println!("  ip netns exec {c} curl http://[{}]/", cluster::VIP6);
        println!("  cat {}", atm2.mount.join("connections").display());
        println!(
            "  target/debug/lb-cli --socket {} status",
            atm2.socket.display()
        );
        println!(
            "  target/debug/lb-cli --socket {} demote        # hand back to atm1",
            atm2.socket.display()
        );
        println!(
            "  echo 1 > {}   # one log record per new connection, in {}",
            atm2.mount.join("debug").display(),
            atm2.log.display()
        );
        println!("  remove it with: cargo xtask demo --clean");
        for d in nodes.into_iter().chain([atm1, atm2]) {
            d.keep();
        }
        lab.keep();
        return Ok(());
    }
    util::step("teardown: daemons stopped (SIGTERM), namespaces and files removed");
    drop((atm1, atm2, nodes));
    drop(lab);
    println!("demo: done");
    Ok(())
}

/// Removes a lab left by `--keep`.
pub fn clean() -> Result<()> {
    util::require_root("cargo xtask demo --clean")?;
    for pid in pids_of("lb-daemon")? {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    thread::sleep(Duration::from_secs(1));
    let _ = Command::new("pkill")
        .args(["-f", &format!("nginx -c {DIR}")])
        .status();
    drop(Lab::named(PREFIX, Path::new(DIR)));
    let _ = std::fs::remove_dir_all(DIR);
    println!("demo lab removed");
    Ok(())
}

fn pids_of(name: &str) -> Result<Vec<i32>> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("{name} --config {DIR}")])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

fn indent(text: &str) {
    for l in text.lines() {
        println!("  {l}");
    }
}

/// `curl url` from the client namespace on a new connection; the page's text.
fn curl(lab: &Lab, url: &str, timeout: Duration) -> Result<String> {
    curl_in(lab.ns("client").name(), url, timeout)
}

fn curl_in(ns: &str, url: &str, timeout: Duration) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "--max-time"])
        .arg(format!("{}", timeout.as_secs_f64()))
        .arg(url)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("curl {url} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(crate) fn random_key() -> Result<Vec<u8>> {
    let mut key = vec![0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    Ok(key)
}

/// The cluster's one config file: two dual-stack ATMs, a VIP of each family served three
/// ways.
pub(crate) fn config(key: &Path) -> String {
    let mut c = format!(
        r#"[cluster]
name = "demo"
timeout = 100
auth_key_file = "{key}"

[nat]
subnet = "203.0.113.0/24"
gateway = "{gw}"
subnet6 = "2001:db8:1::/64"
gateway6 = "{gw6}"

[ha]
heartbeat_ms = 100
dead_after = 3
"#,
        key = key.display(),
        gw = cluster::NAT_GATEWAY,
        gw6 = cluster::NAT6_GATEWAY,
    );
    for i in 1..=2 {
        c += &format!(
            "\n[[atm]]\nname = \"atm{i}\"\naddress = \"{}\"\naddress6 = \"{}\"\n\
             interface = \"eth0\"\n",
            cluster::atm_addr(i),
            cluster::atm6(i)
        );
    }
    // The same three servers behind each VIP: s1 by direct routing, s2 by tunnel, s3 by NAT
    // at its address in the NAT subnet of the family.
    for (name, vip, servers) in [
        (
            "http",
            cluster::VIP.to_string(),
            [
                cluster::server_addr(1),
                cluster::server_addr(2),
                cluster::server_nat_addr(3),
            ],
        ),
        (
            "http6",
            cluster::VIP6.to_string(),
            [cluster::server6(1), cluster::server6(2), cluster::nat6(13)],
        ),
    ] {
        c += &format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nscheduler = \"wrr\"\n\
             [service.check]\nkind = \"http\"\npath = \"/\"\ninterval_ms = 1000\n"
        );
        for (i, (addr, method)) in servers.iter().zip(["direct", "tunnel", "nat"]).enumerate() {
            let port = if method == "nat" { "port = 8080\n" } else { "" };
            c += &format!(
                "\n[[service.server]]\nname = \"s{}\"\naddress = \"{addr}\"\n{port}\
                 method = \"{method}\"\n",
                i + 1
            );
        }
    }
    c
}
