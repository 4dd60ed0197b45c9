//! `cargo xtask soak`: lb at steady work for a long time, watched for leaks. The demo's lab
//! (a client, two ATMs, three servers; a VIP of each family served by direct routing,
//! tunnel and NAT; each service limiting new connections per client /24) under a bounded
//! load of new HTTP connections, while both ATMs are reloaded every minute, the role moves
//! by a drill every two and a half, a burst of spoofed SYNs hits the VIP every half
//! minute, and the tables are written to (timeout, debug, a server's weight) every 45 s.
//! Every ten seconds each ATM daemon's resident memory (and its anonymous part), open
//! descriptors and threads are sampled. The samples go to `samples.csv`, a plot to
//! `soak.png` (gnuplot), a summary with every role change to `report.md`, and the daemons'
//! logs to `atm1.log` and `atm2.log` in the output directory; the run fails if a daemon's memory, descriptors or threads kept growing after
//! warm-up, or requests failed.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_tests::{
    cluster,
    fixture::frames::{self, Mac},
    lab::Lab,
    netns::NetNs,
    procs::Daemon,
    raw::{FrameSender, mac_of},
};

use crate::{demo, setup, util};

/// Seconds between samples.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Seconds between reloads of both ATMs.
const RELOAD_EVERY: Duration = Duration::from_secs(60);
/// Seconds between drills (the primary demoted: the role moves to the other ATM).
const DRILL_EVERY: Duration = Duration::from_secs(150);
/// Client threads, each with a new connection every `PAUSE` at most.
const CLIENTS: usize = 2;
const PAUSE: Duration = Duration::from_millis(20);
/// Seconds between bursts of spoofed SYNs, and the SYNs in a burst (from random addresses
/// of 198.51.100.0/24, a /24 that may open `PER_SOURCE` connections a second).
const FLOOD_EVERY: Duration = Duration::from_secs(30);
const FLOOD_BURST: usize = 5_000;
const PER_SOURCE: u32 = 300;
/// Seconds between rounds of table writes.
const WRITE_EVERY: Duration = Duration::from_secs(45);

/// One sample of one daemon.
#[derive(Clone, Copy, Debug)]
struct Sample {
    seconds: u64,
    rss_kib: u64,
    anon_kib: u64,
    fds: u64,
    threads: u64,
}

pub fn run(minutes: u64, output: Option<PathBuf>, heaptrack: bool) -> Result<()> {
    util::require_root("cargo xtask soak")?;
    if minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    setup::run()?;
    setup::soak(heaptrack)?;
    util::step("build: lb-daemon (with the eBPF object) and lb-cli");
    util::cargo(&["build", "--bins", "--quiet"])?;
    // The tree measured: the commit at the start (the run takes long enough for another).
    let commit = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(util::workspace())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let out = output.unwrap_or_else(|| util::workspace().join("target/soak"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    util::step("lab: the demo's (a client, atm1 and atm2, s1-s3; dual stack), in lbt namespaces");
    let mut lab = Lab::new();
    cluster::build_dual_stack(&mut lab, 2, 3);
    for (i, method) in [(1, "direct"), (2, "tunnel"), (3, "nat")] {
        let ns = cluster::server(i);
        lab.nginx(&ns, &format!("{ns} {method}"), &[80, 8080]);
    }
    let dir = lab.dir();
    let key = dir.join("authkey");
    std::fs::write(&key, demo::random_key()?)?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let config = dir.join("lb.toml");
    // As a site under attack would: new connections limited per client /24 (the soak's
    // clients make at most 100 a second, all from one /24).
    let text = demo::config(&key).replace(
        "scheduler = \"wrr\"\n",
        &format!("scheduler = \"wrr\"\nmax_new_per_sec_per_source = {PER_SOURCE}\n"),
    );
    std::fs::write(&config, text)?;
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let ns = cluster::server(i);
        let mut d = Daemon::start(&mut lab, &ns, &config, &["--node", &ns]);
        d.wait_log("Control socket", Duration::from_secs(20));
        nodes.push(d);
    }
    let mut atms = Vec::new();
    for i in 1..=2 {
        let mut d = if heaptrack {
            // What the heaptrack script does, but with the daemon in the wrapper's process
            // (signals and samples reach it): its allocations go down a pipe to the
            // interpreter, whose record is compressed into the output directory.
            let wrapper = dir.join(format!("heaptrack-atm{i}"));
            let lib = "/usr/lib/heaptrack";
            std::fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\npipe={pipe}\nrm -f $pipe; mkfifo $pipe\n\
                     {lib}/libexec/heaptrack_interpret < $pipe | gzip > {record} &\n\
                     LD_PRELOAD={lib}/libheaptrack_preload.so DUMP_HEAPTRACK_OUTPUT=$pipe \
                     exec {daemon} \"$@\"\n",
                    pipe = dir.join(format!("heaptrack-atm{i}.fifo")).display(),
                    record = out.join(format!("heaptrack-atm{i}.gz")).display(),
                    daemon = lb_tests::procs::bin("lb-daemon").display()
                ),
            )?;
            std::fs::set_permissions(
                &wrapper,
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )?;
            Daemon::start_program(&mut lab, &cluster::atm(i), &wrapper, &config, &[])
        } else {
            Daemon::start(&mut lab, &cluster::atm(i), &config, &[])
        };
        d.wait_log("Tables mounted at", Duration::from_secs(20));
        atms.push(d);
    }
    lab.wait_for("a primary", Duration::from_secs(20), || {
        atms.iter().any(|d| d.cli_ok(&["role"]).contains("primary"))
    });

    let duration = Duration::from_secs(minutes * 60);
    util::step(&format!(
        "soak: {minutes} min of new HTTP connections to both VIPs ({CLIENTS} clients, at most \
         one each per {} ms), a reload every {} s, a drill every {} s, {FLOOD_BURST} spoofed \
         SYNs every {} s, table writes every {} s; a sample every {} s",
        PAUSE.as_millis(),
        RELOAD_EVERY.as_secs(),
        DRILL_EVERY.as_secs(),
        FLOOD_EVERY.as_secs(),
        WRITE_EVERY.as_secs(),
        SAMPLE_EVERY.as_secs()
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = lab.ns("client").name().to_string();
    let loaders: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let (stop, ok, failed, client) =
                (stop.clone(), ok.clone(), failed.clone(), client.clone());
            thread::spawn(move || {
                let _in = NetNs::attach(&client).enter();
                let vips: [SocketAddr; 2] = [
                    SocketAddr::new(cluster::VIP.parse().unwrap(), 80),
                    SocketAddr::new(cluster::VIP6.parse().unwrap(), 80),
                ];
                let mut i = n;
                // Bounded in time by `stop`, set at the end of the run (or on an error).
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match get(vips[i % 2]) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    i += 1;
                    thread::sleep(PAUSE.saturating_sub(t.elapsed()));
                }
            })
        })
        .collect();
    let flooder = {
        let stop = stop.clone();
        let out = FrameSender::open(&lab, "client", "eth0");
        let from = mac_of(&lab, "client", "eth0");
        let to: Vec<_> = (1..=2)
            .map(|i| mac_of(&lab, &cluster::atm(i), "eth0"))
            .collect();
        thread::spawn(move || flood(&out, from, &to, &stop))
    };
    let result = watch(&atms, duration, &lab);
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        let _ = l.join();
    }
    let syns = flooder.join().unwrap_or(0);
    let samples = result?;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    // What the lab's links lost, and the heartbeats' sockets: an unplanned role change
    // is explained by these or by the daemons' logs.
    let (lost, where_lost) = lab.losses();
    let mut network = format!("packets the lab's links lost: {lost} {where_lost}");
    for i in 1..=2 {
        let ns = cluster::atm(i);
        let nstat = lab
            .ns(&ns)
            .exec_ok(&["nstat", "-az", "UdpRcvbufErrors", "UdpInErrors"]);
        let counts: Vec<String> = nstat
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some(format!("{} {}", w.next()?, w.next()?))
            })
            .filter(|l| l.starts_with("Udp"))
            .collect();
        network += &format!("; atm{i}: {}", counts.join(", "));
    }
    let logs: Vec<String> = atms.iter().map(|d| d.log()).collect();
    for (i, log) in logs.iter().enumerate() {
        std::fs::write(out.join(format!("atm{}.log", i + 1)), log)?;
    }
    drop(atms);
    drop(nodes);
    if heaptrack {
        summarize_heaptrack(&out)?;
    }
    report(
        &out,
        (minutes, &commit),
        &samples,
        (ok, failed, syns),
        &logs,
        &network,
    )
}

/// heaptrack's record of each ATM daemon, printed: what was still allocated at the end
/// ("leaked") and the peak, by call stack.
fn summarize_heaptrack(out: &Path) -> Result<()> {
    // The interpreters finish their records once the daemons have gone.
    let interpreting = || {
        Command::new("pgrep")
            .arg("heaptrack_interp")
            .status()
            .is_ok_and(|s| s.success())
    };
    let since = Instant::now();
    while interpreting() && since.elapsed() < Duration::from_secs(120) {
        thread::sleep(Duration::from_millis(500));
    }
    for i in 1..=2 {
        let record = out.join(format!("heaptrack-atm{i}.gz"));
        let text = Command::new("heaptrack_print")
            .args([
                "--print-leaks",
                "1",
                "--print-peaks",
                "1",
                "--print-allocators",
                "0",
            ])
            .args(["--print-temporary", "0", "--peak-limit", "15"])
            .arg("-f")
            .arg(&record)
            .output()
            .context("running heaptrack_print")?;
        let to = out.join(format!("heaptrack-atm{i}.txt"));
        std::fs::write(&to, &text.stdout)?;
        println!("wrote {}", to.display());
    }
    Ok(())
}

/// Every `FLOOD_EVERY` until `stop`, a burst of `FLOOD_BURST` spoofed SYNs at the IPv4
/// VIP, to both ATMs' MACs (whichever is primary takes them); the SYNs sent.
fn flood(out: &FrameSender, from: Mac, to: &[Mac], stop: &AtomicBool) -> u64 {
    let vip: std::net::Ipv4Addr = cluster::VIP.parse().unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut sent, mut next) = (0, Instant::now() + FLOOD_EVERY);
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() < next {
            thread::sleep(Duration::from_millis(200));
            continue;
        }
        for n in 0..FLOOD_BURST {
            let r = random();
            let src = [198, 51, 100, 1 + (r % 254) as u8];
            let sport = 1024 + (r >> 8) as u16 % 60_000;
            out.send(&frames::tcp(
                from,
                to[n % to.len()],
                src,
                sport,
                vip.octets(),
                80,
                frames::SYN,
                &[],
            ));
            sent += 1;
        }
        next += FLOOD_EVERY;
    }
    sent
}

/// One GET on a new connection; an error unless the answer is a 200.
fn get(to: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("not a 200"));
    }
    Ok(())
}

/// Runs the reloads and drills for `duration`, sampling both ATMs; the samples, by ATM.
fn watch(atms: &[Daemon], duration: Duration, lab: &Lab) -> Result<Vec<Vec<Sample>>> {
    let start = Instant::now();
    let (mut next_sample, mut next_reload, mut next_drill, mut next_write) =
        (Duration::ZERO, RELOAD_EVERY, DRILL_EVERY, WRITE_EVERY);
    let mut round = 0;
    let mut samples = vec![Vec::new(); atms.len()];
    while start.elapsed() < duration {
        let now = start.elapsed();
        if now >= next_sample {
            for (d, s) in atms.iter().zip(samples.iter_mut()) {
                s.push(sample(d.pid(), now.as_secs())?);
                // The control surfaces at work too: status and the biggest table.
                d.cli_ok(&["status"]);
                d.cat("connections");
            }
            let last: Vec<String> = samples
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let s = s.last().unwrap();
                    format!(
                        "atm{} {} KiB {} fds {} threads",
                        i + 1,
                        s.rss_kib,
                        s.fds,
                        s.threads
                    )
                })
                .collect();
            println!("  {:>5} s  {}", now.as_secs(), last.join("   "));
            next_sample += SAMPLE_EVERY;
        }
        if now >= next_reload {
            for d in atms {
                d.cli_ok(&["reload"]);
            }
            next_reload += RELOAD_EVERY;
        }
        if now >= next_drill {
            let primary = atms
                .iter()
                .find(|d| d.cli_ok(&["role"]).contains("primary"))
                .context("no ATM is primary")?;
            primary.cli_ok(&["demote"]);
            lab.wait_for(
                "the other ATM to take over",
                Duration::from_secs(10),
                || {
                    atms.iter().any(|d| {
                        d.pid() != primary.pid() && d.cli_ok(&["role"]).contains("primary")
                    })
                },
            );
            next_drill += DRILL_EVERY;
        }
        if now >= next_write {
            // Through the mount and lb-cli, on both ATMs: values that change nothing a
            // client notices (a reload puts the file's back).
            round += 1;
            for d in atms {
                let write = |table: &str, value: &str| {
                    std::fs::write(d.mount.join(table), format!("{value}\n"))
                        .with_context(|| format!("writing {value} to {table}"))
                };
                write("timeout", if round % 2 == 0 { "100" } else { "120" })?;
                write("debug", if round % 2 == 0 { "0" } else { "1" })?;
                if round % 2 == 0 {
                    d.cli_ok(&["server", "enable", "http", "s1"]);
                } else {
                    d.cli_ok(&["server", "weight", "2", "http", "s1"]);
                }
            }
            next_write += WRITE_EVERY;
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(samples)
}

/// Resident memory, descriptors and threads of process `pid`.
fn sample(pid: u32, seconds: u64) -> Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("the daemon {pid} is gone"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(Sample {
        seconds,
        rss_kib: field("VmRSS:"),
        anon_kib: field("RssAnon:"),
        fds,
        threads: field("Threads:"),
    })
}

/// The median of `values`.
fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// Growth after warm-up: the median of the last fifth of the samples against that of the
/// samples from a fifth to two fifths in (the daemon's caches, tables and the allocator's
/// arenas have filled by then).
fn growth(samples: &[Sample], of: fn(&Sample) -> u64) -> (u64, u64) {
    let n = samples.len();
    let warm: Vec<u64> = samples[n / 5..(2 * n / 5).max(n / 5 + 1)]
        .iter()
        .map(of)
        .collect();
    let end: Vec<u64> = samples[n - (n / 5).max(1)..].iter().map(of).collect();
    (median(warm), median(end))
}

fn report(
    out: &Path,
    (minutes, commit): (u64, &str),
    samples: &[Vec<Sample>],
    (ok, failed, syns): (u64, u64, u64),
    logs: &[String],
    network: &str,
) -> Result<()> {
    let mut csv = String::from("seconds,atm,rss_kib,anon_kib,fds,threads\n");
    for (i, s) in samples.iter().enumerate() {
        for x in s {
            csv += &format!(
                "{},atm{},{},{},{},{}\n",
                x.seconds,
                i + 1,
                x.rss_kib,
                x.anon_kib,
                x.fds,
                x.threads
            );
        }
    }
    std::fs::write(out.join("samples.csv"), &csv)?;
    plot(out, samples)?;

    let mut problems = Vec::new();
    let mut rows = String::new();
    for (i, s) in samples.iter().enumerate() {
        if s.len() < 5 {
            bail!("too few samples ({}) to judge: soak for longer", s.len());
        }
        let (rss_warm, rss_end) = growth(s, |x| x.rss_kib);
        let (anon_warm, anon_end) = growth(s, |x| x.anon_kib);
        let (fds_warm, fds_end) = growth(s, |x| x.fds);
        let (thr_warm, thr_end) = growth(s, |x| x.threads);
        let peak = s.iter().map(|x| x.rss_kib).max().unwrap_or(0);
        rows += &format!(
            "| atm{} | {} | {rss_warm} | {rss_end} | {peak} | {anon_warm} | {anon_end} | {fds_warm} | {fds_end} | {thr_warm} | {thr_end} |\n",
            i + 1,
            s[0].rss_kib,
        );
        // Allowed: a tenth more memory and 4 MiB (the allocator's arenas settle slowly),
        // two descriptors (a check or hook running at the sample) and four threads (tokio's
        // blocking pool keeps an idle thread ten seconds).
        if rss_end > rss_warm + rss_warm / 10 + 4096 {
            problems.push(format!(
                "atm{}: resident memory grew from {rss_warm} KiB to {rss_end} KiB after warm-up",
                i + 1
            ));
        }
        if fds_end > fds_warm + 2 {
            problems.push(format!(
                "atm{}: open descriptors grew from {fds_warm} to {fds_end}",
                i + 1
            ));
        }
        if thr_end > thr_warm + 4 {
            problems.push(format!(
                "atm{}: threads grew from {thr_warm} to {thr_end}",
                i + 1
            ));
        }
    }
    let total = ok + failed;
    if failed * 1000 > total {
        problems.push(format!("{failed} of {total} requests failed (over 0.1%)"));
    }
    let errors: usize = logs
        .iter()
        .map(|l| l.lines().filter(|l| l.contains(" ERROR ")).count())
        .sum();
    // Every role change, from the daemons' logs.
    let mut roles = String::new();
    for (i, log) in logs.iter().enumerate() {
        for line in log
            .lines()
            .filter(|l| l.contains("This ATM is primary") || l.contains("Becoming backup"))
        {
            roles += &format!("| atm{} | `{}` |\n", i + 1, line.trim());
        }
    }
    let machine = machine();
    let verdict = if problems.is_empty() {
        "no growth after warm-up".to_string()
    } else {
        problems.join("; ")
    };
    let md = format!(
        "# Soak: {minutes} min at {commit}\n\n\
         Machine: {machine}.\n\n\
         Load: {total} HTTP requests on new connections ({failed} failed), both families, \
         every method; {syns} spoofed SYNs in bursts of {FLOOD_BURST}; {} reloads of both \
         ATMs; {} drills; {} rounds of table writes. Daemon log lines at ERROR: {errors}.\n\n\
         | ATM | RSS at start (KiB) | RSS warm (KiB) | RSS at end (KiB) | RSS peak (KiB) | anonymous warm (KiB) | anonymous end (KiB) | fds warm | fds end | threads warm | threads end |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n{rows}\n\
         Warm: the median of the samples from a fifth to two fifths of the run; end: the \
         median of its last fifth. Verdict: {verdict}.\n\n![memory, descriptors and threads](soak.png)\n\n\
         Role changes:\n\n| ATM | log line |\n|---|---|\n{roles}\n\
         The network at the end: {network}.\n",
        minutes * 60 / RELOAD_EVERY.as_secs(),
        minutes * 60 / DRILL_EVERY.as_secs(),
        minutes * 60 / WRITE_EVERY.as_secs(),
    );
    std::fs::write(out.join("report.md"), &md)?;
    println!("{md}");
    println!(
        "wrote {}, samples.csv and soak.png",
        out.join("report.md").display()
    );
    if !problems.is_empty() {
        bail!("the soak found growth or failures: {verdict}");
    }
    Ok(())
}

/// This machine, as a report names it: CPUs, memory, kernel.
fn machine() -> String {
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(String::new(), |kib| format!("{} GiB", kib / 1024 / 1024));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs, {mem}, Linux {}", kernel.trim())
}

/// soak.png: each ATM's resident memory (left axis) and descriptors and threads (right)
/// over the run, drawn by gnuplot from samples.csv.
fn plot(out: &Path, samples: &[Vec<Sample>]) -> Result<()> {
    let mut script = String::from(
        "set terminal pngcairo size 1000,560\nset output 'soak.png'\nset datafile separator ','\n\
         set key outside bottom center horizontal\nset xlabel 'minutes'\n\
         set ylabel 'resident memory (MiB)'\nset y2label 'descriptors, threads'\n\
         set ytics nomirror\nset y2tics\nset yrange [0:*]\nset y2range [0:*]\nset grid\n\
         set title 'lb-daemon on each ATM during the soak'\nplot ",
    );
    let mut lines = Vec::new();
    for i in 1..=samples.len() {
        let only = format!("(strcol(2) eq 'atm{i}' ? ");
        lines.push(format!(
            "'samples.csv' skip 1 using ($1/60):{only}$3/1024 : 1/0) with lines lw 2 title 'atm{i} memory'"
        ));
        lines.push(format!(
            "'' skip 1 using ($1/60):{only}$4/1024 : 1/0) with lines lw 1 title 'atm{i} anonymous'"
        ));
        lines.push(format!(
            "'' skip 1 using ($1/60):{only}$5 : 1/0) axes x1y2 with lines dt 2 title 'atm{i} descriptors'"
        ));
        lines.push(format!(
            "'' skip 1 using ($1/60):{only}$6 : 1/0) axes x1y2 with lines dt 3 title 'atm{i} threads'"
        ));
    }
    script += &lines.join(", \\\n  ");
    script += "\n";
    std::fs::write(out.join("soak.gp"), &script)?;
    util::run(Command::new("gnuplot").arg("soak.gp").current_dir(out))
        .context("gnuplot could not draw soak.png")
}
