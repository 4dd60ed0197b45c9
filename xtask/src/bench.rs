//! `cargo xtask bench`: every measurement of docs/BENCHMARKS.md in one run, on this machine.
//! Installs the peers, builds in release mode, runs `lb-bench` (dataplane, packets per second,
//! HTTP, failover) and the criterion benches, then writes `target/bench/results.json` and
//! `target/bench/results.md` and prints the table with the ratios against the peers.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{setup, util};

/// How long the whole run is, through the measurements' sizes.
#[derive(Clone)]
pub struct Size {
    /// Rounds per measurement (the median is reported).
    pub rounds: usize,
    /// Seconds per wrk run.
    pub http_seconds: u32,
    /// Failover drills per balancer.
    pub drills: usize,
    /// Another commit whose per-path costs are measured beside this tree's, alternately.
    pub against: Option<String>,
}

/// One result line of `lb-bench` or criterion.
#[derive(Clone, Debug)]
struct Measured {
    group: String,
    name: String,
    unit: String,
    median: f64,
    rounds: Vec<f64>,
}

pub fn run(size: Size) -> Result<()> {
    util::require_root("cargo xtask bench")?;
    setup::run()?;
    setup::bench()?;
    util::step("build: release binaries (lb-daemon, lb-bench)");
    util::cargo(&["build", "--release", "--bins", "--quiet"])?;
    let root = util::workspace();
    let bench_bin = root.join("target/release/lb-bench");
    let rounds = size.rounds.to_string();
    let mut all = Vec::new();
    let other = match &size.against {
        Some(rev) => Some(build_against(&root, rev)?),
        None => None,
    };
    let runs: [(&str, Vec<String>); 6] = [
        (
            "per-path cost through BPF_PROG_TEST_RUN",
            vec!["paths".into()],
        ),
        (
            "growth: connection table and server count",
            vec!["growth".into()],
        ),
        (
            "packets per second through a namespace lab",
            vec!["pps".into()],
        ),
        (
            "HTTP through the VIP with wrk",
            vec![
                "http".into(),
                "--seconds".into(),
                size.http_seconds.to_string(),
            ],
        ),
        (
            "map memory of 4,096 services of 10 servers (bpftool)",
            vec!["capacity".into()],
        ),
        (
            "failover drills, lb and keepalived",
            vec![
                "failover".into(),
                "--drills".into(),
                size.drills.to_string(),
            ],
        ),
    ];
    for (what, args) in runs {
        util::step(&format!("bench: {what}"));
        if let (Some((sha, other_bin)), true) = (&other, args[0] == "paths") {
            all.extend(paths_beside(&bench_bin, other_bin, sha, size.rounds)?);
            continue;
        }
        all.extend(lb_bench(&bench_bin, &rounds, &args)?);
    }
    util::step("bench: control plane (criterion)");
    util::cargo(&[
        "bench",
        "--quiet",
        "-p",
        "lb-benches",
        "--bench",
        "control_plane",
    ])?;
    for (id, name) in [
        (
            "maglev_ring_1000_servers",
            "Maglev ring, 1000 servers (65,521 slots)",
        ),
        (
            "tables/render_connections_1m",
            "render the connections table, 1M entries",
        ),
        (
            "parse_config_1000_services",
            "parse and check a config with 1000 services",
        ),
    ] {
        all.push(criterion_result(
            &root.join("target/criterion").join(id),
            name,
        )?);
    }

    write(&root.join("target/bench"), &all, &machine())
}

/// One `lb-bench --rounds ROUNDS ARGS` run: its result lines.
fn lb_bench(bin: &Path, rounds: &str, args: &[String]) -> Result<Vec<Measured>> {
    let out = Command::new(bin)
        .args(["--rounds", rounds])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("failed to run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({})",
            bin.display(),
            args.join(" "),
            out.status
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(parse_line)
        .collect()
}

/// `--against REV`: REV checked out in a worktree under target/bench and its lb-bench built
/// there in release mode (its own target directory, kept for the next run). Returns REV's
/// short hash and the binary.
fn build_against(root: &Path, rev: &str) -> Result<(String, std::path::PathBuf)> {
    let git = |args: &[&str]| -> Result<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(root)
            .stdin(Stdio::null())
            .output()
            .context("failed to run git")?;
        if !out.status.success() {
            bail!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let sha = git(&["rev-parse", "--short", &format!("{rev}^{{commit}}")])
        .with_context(|| format!("--against {rev}: not a commit of this repository"))?;
    let dir = root.join("target/bench/against").join(&sha);
    if !dir.join("Cargo.toml").exists() {
        util::step(&format!("bench: a worktree of {sha} in {}", dir.display()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = git(&["worktree", "prune"]);
        git(&["worktree", "add", "--detach", &dir.to_string_lossy(), &sha])?;
    }
    util::step(&format!(
        "build: lb-bench of {sha} in release mode (the first time takes minutes)"
    ));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(
        Command::new(&cargo)
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "lb-benches",
                "--bins",
            ])
            .env("CARGO_TARGET_DIR", root.join("target/bench/against-target"))
            .current_dir(&dir),
    )?;
    Ok((
        sha,
        root.join("target/bench/against-target/release/lb-bench"),
    ))
}

/// The per-path costs of this tree and of commit `sha` (`other`), one round of each in
/// turn, so that both see the same machine: this tree's results as `path`, the other's as
/// `path @SHA`.
fn paths_beside(this: &Path, other: &Path, sha: &str, rounds: usize) -> Result<Vec<Measured>> {
    let mut mine: Vec<Measured> = Vec::new();
    let mut theirs: Vec<Measured> = Vec::new();
    let args = ["paths".to_string()];
    for _ in 0..rounds {
        for (bin, into) in [(this, &mut mine), (other, &mut theirs)] {
            for m in lb_bench(bin, "1", &args)? {
                match into.iter_mut().find(|a| a.name == m.name) {
                    Some(a) => a.rounds.extend(m.rounds),
                    None => into.push(m),
                }
            }
        }
    }
    for m in &mut theirs {
        m.group = format!("path @{sha}");
    }
    let mut all = mine;
    all.extend(theirs);
    for m in &mut all {
        m.median = median(&m.rounds);
    }
    Ok(all)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// How likely rounds at least as much slower as `mine` are than `theirs` if both came from
/// the same machine state: the one-sided p-value of the Mann-Whitney U test, exact (the
/// count of the pairs in which `mine` is the larger, against its distribution over every
/// ordering of the rounds).
fn slower_p(mine: &[f64], theirs: &[f64]) -> f64 {
    let (m, n) = (mine.len(), theirs.len());
    if m == 0 || n == 0 {
        return 1.0;
    }
    // Twice U, so that a tie counts one half without fractions.
    let u2: usize = mine
        .iter()
        .map(|a| {
            theirs
                .iter()
                .map(|b| match a.total_cmp(b) {
                    std::cmp::Ordering::Greater => 2,
                    std::cmp::Ordering::Equal => 1,
                    std::cmp::Ordering::Less => 0,
                })
                .sum::<usize>()
        })
        .sum();
    // ways[i][j][u]: orderings of i rounds of mine and j of theirs whose U is u.
    let mut ways = vec![vec![vec![0f64; m * n + 1]; n + 1]; m + 1];
    for i in 0..=m {
        for j in 0..=n {
            if i == 0 || j == 0 {
                ways[i][j][0] = 1.0;
                continue;
            }
            for u in 0..=i * j {
                // The largest round is mine (beating all j of theirs) or theirs.
                let a = if u >= j { ways[i - 1][j][u - j] } else { 0.0 };
                ways[i][j][u] = a + ways[i][j - 1][u];
            }
        }
    }
    let total: f64 = ways[m][n].iter().sum();
    let at_least: f64 = ways[m][n][u2.div_ceil(2)..].iter().sum();
    at_least / total
}

/// `--report`: the tables and targets of the last run again, from its results.json (after a
/// target was added, say), without measuring anything.
pub fn report() -> Result<()> {
    let file = util::workspace().join("target/bench/results.json");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("no {} (run cargo xtask bench first)", file.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    let all = v["results"]
        .as_array()
        .with_context(|| format!("{} has no results", file.display()))?
        .iter()
        .map(measured)
        .collect::<Vec<_>>();
    write(file.parent().expect("a directory"), &all, &v["machine"])
}

/// Writes results.json and results.md into `dir` and prints the table.
fn write(dir: &Path, all: &[Measured], machine: &Value) -> Result<()> {
    let table = render(all, machine);
    std::fs::create_dir_all(dir)?;
    let json = json!({
        "machine": machine,
        "results": all.iter().map(|m| json!({
            "group": m.group, "name": m.name, "unit": m.unit,
            "median": m.median, "rounds": m.rounds,
        })).collect::<Vec<_>>(),
        "targets": targets(all).iter().map(|t| json!({
            "target": t.what, "measured": t.measured, "met": t.met,
            "verdict": t.verdict(),
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(dir.join("results.md"), &table)?;
    println!("\n{table}");
    println!(
        "written: {} and {}",
        dir.join("results.json").display(),
        dir.join("results.md").display()
    );
    Ok(())
}

fn parse_line(line: &str) -> Result<Measured> {
    let v: Value =
        serde_json::from_str(line).with_context(|| format!("lb-bench printed {line:?}"))?;
    Ok(measured(&v))
}

/// A result as lb-bench prints it and results.json keeps it.
fn measured(v: &Value) -> Measured {
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    Measured {
        group: s("group"),
        name: s("name"),
        unit: s("unit"),
        median: v["median"].as_f64().unwrap_or(f64::NAN),
        rounds: v["rounds"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default(),
    }
}

/// Criterion's median estimate of one bench, in ms.
fn criterion_result(dir: &Path, name: &str) -> Result<Measured> {
    let file = dir.join("new/estimates.json");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("criterion left no {}", file.display()))?;
    let v: Value = serde_json::from_str(&text)?;
    let ns = v["median"]["point_estimate"]
        .as_f64()
        .context("estimates.json without a median")?;
    Ok(Measured {
        group: "control".into(),
        name: name.into(),
        unit: "ms".into(),
        median: ns / 1e6,
        rounds: vec![ns / 1e6],
    })
}

/// The machine the figures belong to.
fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let cmd = |c: &str, a: &[&str]| {
        Command::new(c)
            .args(a)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "date": cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "memory_gib": (mem_kib as f64 / 1048576.0).round(),
        "kernel": cmd("uname", &["-r"]),
        "virtualization": cmd("systemd-detect-virt", &[]),
    })
}

fn find<'a>(all: &'a [Measured], group: &str, name: &str) -> Option<&'a Measured> {
    all.iter().find(|m| m.group == group && m.name == name)
}

/// A target of docs/BENCHMARKS.md, checked against this run.
struct Target {
    what: String,
    measured: String,
    /// None: the run cannot tell (see `targets`).
    met: Option<bool>,
}

impl Target {
    fn verdict(&self) -> &'static str {
        match self.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not shown (noise)",
        }
    }
}

fn targets(all: &[Measured]) -> Vec<Target> {
    let mut t = Vec::new();
    let mut cpu = Vec::new();
    let ratio = |g: &str, a: &str, b: &str| -> Option<f64> {
        Some(find(all, g, a)?.median / find(all, g, b)?.median)
    };
    fn push(t: &mut Vec<Target>, what: &str, value: Option<f64>, ok: fn(f64) -> bool, unit: &str) {
        if let Some(v) = value {
            t.push(Target {
                what: what.into(),
                measured: format!("{v:.2}{unit}"),
                met: Some(ok(v)),
            });
        }
    }
    // Issue 16, the fast path, for each family against its own references.
    for (v6, fam) in [("", ""), ("IPv6: ", " (IPv6)")] {
        push(
            &mut t,
            &format!("{v6}lb direct >= 4.5x nftables DNAT (packets/s)"),
            ratio(
                "pps",
                &format!("lb direct{fam}"),
                &format!("nftables DNAT + conntrack{fam}"),
            ),
            |v| v >= 4.5,
            "x",
        );
        push(
            &mut t,
            &format!("{v6}lb direct >= 0.85x the bare XDP forwarder (packets/s)"),
            ratio(
                "pps",
                &format!("lb direct{fam}"),
                &format!("bare XDP forwarder{fam}"),
            ),
            |v| v >= 0.85,
            "x",
        );
        push(
            &mut t,
            &format!("{v6}established direct <= 2.0x the bare forwarder, repeated test-runs"),
            ratio(
                "path",
                &format!("{v6}repeated: established: direct"),
                &format!("{v6}repeated: bare forwarder (MAC rewrite, XDP_TX)"),
            ),
            |v| v <= 2.0,
            "x",
        );
        for path in [
            "established: tunnel",
            "established: nat",
            "nat reply (server -> client)",
        ] {
            push(
                &mut t,
                &format!("{v6}{path} <= 1.15x established direct (ns/packet)"),
                ratio(
                    "path",
                    &format!("{v6}{path}"),
                    &format!("{v6}established: direct"),
                ),
                |v| v <= 1.15,
                "x",
            );
        }
    }
    // IPv6 (issue 15): each path at most 1.2x its IPv4 twin, measured in the same run.
    for (v6, v4) in [
        ("IPv6: established: direct", "established: direct"),
        ("IPv6: established: tunnel", "established: tunnel"),
        ("IPv6: established: nat", "established: nat"),
        (
            "IPv6: nat reply (server -> client)",
            "nat reply (server -> client)",
        ),
        ("IPv6: new: maglev", "new: maglev"),
    ] {
        push(
            &mut t,
            &format!("{v6} <= 1.2x IPv4 (ns/packet)"),
            ratio("path", v6, v4),
            |v| v <= 1.2,
            "x",
        );
    }
    for lb in ["lb nat", "lb direct"] {
        let conns = |v: &str| format!("{v}: new connections");
        let own = |v: &str| format!("{v}: own CPU per connection");
        push(
            &mut t,
            &format!("{lb} new connections/s >= 1.3x HAProxy"),
            ratio("http", &conns(lb), &conns("HAProxy mode tcp")),
            |v| v >= 1.3,
            "x",
        );
        push(
            &mut t,
            &format!("{lb} new connections/s >= nftables DNAT"),
            ratio("http", &conns(lb), &conns("nftables DNAT")),
            |v| v >= 1.0,
            "x",
        );
        // Absolute figures: the own cost is a difference from plain routing, and can be
        // below zero (XDP forwarding costs less than the kernel's router), where a ratio
        // means nothing.
        if let (Some(a), Some(b)) = (
            find(all, "http", &own(lb)),
            find(all, "http", &own("nftables DNAT")),
        ) {
            cpu.push(Target {
                what: format!("{lb} own CPU per connection <= 1/4 of nftables'"),
                measured: format!("{:.1} vs {:.1} us", a.median, b.median),
                // A quarter of a reference that is not above zero in every round is a
                // quarter of noise: no verdict either way.
                met: b
                    .rounds
                    .iter()
                    .all(|r| *r > 0.0)
                    .then_some(a.median <= b.median / 4.0),
            });
        }
    }
    let servers: Vec<&Measured> = [1, 10, 100, 1000]
        .iter()
        .filter_map(|n| find(all, "growth", &format!("established, {n} servers (maglev)")))
        .collect();
    if servers.len() == 4 {
        let medians: Vec<f64> = servers.iter().map(|m| m.median).collect();
        let spread = medians.iter().cloned().fold(f64::MIN, f64::max)
            / medians.iter().cloned().fold(f64::MAX, f64::min);
        // Medians further apart than 5% but every round range overlapping every other: the
        // run cannot tell growth from noise.
        let maxes = servers
            .iter()
            .flat_map(|m| m.rounds.iter().cloned().reduce(f64::max));
        let mins = servers
            .iter()
            .flat_map(|m| m.rounds.iter().cloned().reduce(f64::min));
        let overlap = mins.fold(f64::MIN, f64::max) <= maxes.fold(f64::MAX, f64::min);
        t.push(Target {
            what: "established cost flat (within 5%) from 1 to 1000 servers".into(),
            measured: format!("{spread:.2}x max/min"),
            met: if spread <= 1.05 {
                Some(true)
            } else if overlap {
                None
            } else {
                Some(false)
            },
        });
    }
    push(
        &mut t,
        "Maglev ring for 1000 servers <= 1.0 ms",
        find(all, "control", "Maglev ring, 1000 servers (65,521 slots)").map(|m| m.median),
        |v| v <= 1.0,
        " ms",
    );
    push(
        &mut t,
        "render the connections table with 1M entries <= 0.2 s",
        find(all, "control", "render the connections table, 1M entries").map(|m| m.median),
        |v| v <= 200.0,
        " ms",
    );
    // Issue 16: the ring size follows the service, so 4,096 services fit one ATM.
    push(
        &mut t,
        "ring memory of 4,096 services of 10 servers < 64 MiB (bpftool)",
        find(
            all,
            "capacity",
            "ring memory (sched_table), 4096 services x 10 servers",
        )
        .map(|m| m.median),
        |v| v < 64.0,
        " MiB",
    );
    // docs/HA.md: at most 300 ms at the defaults, and no slower than keepalived at equal
    // timers.
    let lb = find(all, "failover", "lb (heartbeat 100 ms, dead after 3)");
    push(
        &mut t,
        "failover <= 300 ms at the defaults (heartbeat 100 ms, dead after 3)",
        lb.map(|m| m.median),
        |v| v <= 300.0,
        " ms",
    );
    push(
        &mut t,
        "failover no slower than keepalived at equal timers",
        ratio(
            "failover",
            "lb (heartbeat 100 ms, dead after 3)",
            "keepalived VRRPv3 (advert 0.1 s)",
        ),
        |v| v <= 1.0,
        "x",
    );
    // `--against REV`: no path of this tree slower than at REV, measured alternately in
    // the same run (issue 15: IPv4 no worse than before IPv6). A median above REV's is
    // "no" only when the rounds say so (Mann-Whitney, p < 0.05); else it is noise.
    let groups: Vec<&str> = all
        .iter()
        .filter_map(|m| m.group.strip_prefix("path @"))
        .fold(Vec::new(), |mut g, s| {
            if !g.contains(&s) {
                g.push(s);
            }
            g
        });
    for sha in groups {
        let group = format!("path @{sha}");
        // Issue 16: distinct flows, established and new, against the earlier commit.
        for v6 in ["", "IPv6: "] {
            for (path, at_most) in [("established: direct", 0.6), ("new: maglev", 0.7)] {
                let name = format!("{v6}{path}");
                if let (Some(mine), Some(theirs)) =
                    (find(all, "path", &name), find(all, &group, &name))
                {
                    let r = mine.median / theirs.median;
                    t.push(Target {
                        what: format!("{name} <= {at_most}x {sha}, distinct flows (ns/packet)"),
                        measured: format!("{r:.2}x"),
                        met: Some(r <= at_most),
                    });
                }
            }
        }
        for theirs in all.iter().filter(|m| m.group == group) {
            if theirs.name.starts_with("test-run") || theirs.name.starts_with("bare") {
                continue;
            }
            let Some(mine) = find(all, "path", &theirs.name) else {
                continue;
            };
            let ratio = mine.median / theirs.median;
            let p = slower_p(&mine.rounds, &theirs.rounds);
            t.push(Target {
                what: format!("{} no slower than at {sha} (ns/packet)", theirs.name),
                measured: format!("{ratio:.2}x (p {p:.2})"),
                met: if ratio <= 1.0 {
                    Some(true)
                } else if p >= 0.05 {
                    None
                } else {
                    Some(false)
                },
            });
        }
    }
    t.append(&mut cpu);
    t
}

/// The Markdown table of a run: every median (with the spread of its rounds), then the
/// targets.
fn render(all: &[Measured], machine: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Measured {} on {} ({} CPUs, {} GiB, kernel {}, {}).\n",
        machine["date"].as_str().unwrap_or(""),
        machine["cpu"].as_str().unwrap_or(""),
        machine["cpus"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or(""),
        machine["virtualization"].as_str().unwrap_or(""),
    );
    let mut group = "";
    for m in all {
        if m.group != group {
            group = &m.group;
            let _ = writeln!(
                s,
                "\n| {group} | median | unit | rounds (min-max) |\n|---|---:|---|---|"
            );
        }
        let (lo, hi) = m
            .rounds
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {}-{} ({}) |",
            m.name,
            fmt(m.median),
            m.unit,
            fmt(lo),
            fmt(hi),
            m.rounds.len()
        );
    }
    let _ = writeln!(s, "\n| target | measured | met |\n|---|---:|---|");
    for t in targets(all) {
        let _ = writeln!(s, "| {} | {} | {} |", t.what, t.measured, t.verdict());
    }
    s
}

/// A figure with sensible precision.
fn fmt(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::slower_p;

    #[test]
    fn mann_whitney_tells_a_shift_from_noise() {
        // Every round slower: the least likely ordering of 5 against 5, 1 in 252.
        let p = slower_p(&[6.0, 7.0, 8.0, 9.0, 10.0], &[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!((p - 1.0 / 252.0).abs() < 1e-12, "{p}");
        // Every round faster: certain to be at least that slow.
        assert_eq!(slower_p(&[1.0, 2.0], &[3.0, 4.0]), 1.0);
        // Interleaved: about even.
        let p = slower_p(&[1.0, 3.0, 5.0, 7.0], &[2.0, 4.0, 6.0, 8.0]);
        assert!((0.4..0.8).contains(&p), "{p}");
        // The run of the docs: new: sh, 1.01x, a noise verdict.
        let p = slower_p(
            &[580.6, 615.7, 626.7, 631.4, 648.0],
            &[603.9, 608.7, 617.8, 623.5, 635.2],
        );
        assert!(p > 0.05, "{p}");
    }
}
