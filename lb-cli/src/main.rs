//! lb-cli: the operator's command. Talks to lb-daemon over its control socket (except
//! `check-config`, which works offline) and prints tables as ipvsadm does: the raw tables
//! as they are, listings with a header and aligned columns.

use std::{
    fmt::Write as _,
    io::{IsTerminal, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

mod collect;

use clap::{Parser, Subcommand};
use lb_api::{
    config,
    control::{self, Request, Response, ServerAction},
    views::{ConnectionLine, ServerLine, ServiceLine, Status},
};

#[derive(Parser)]
#[command(
    name = "lb-cli",
    version,
    about = "Operate an lb cluster: status, tables, drills",
    after_help = "Exit status: 0 done; 1 refused or failed (the reason on standard error); \
                  2 a command line that does not parse."
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = config::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Who is primary, which ATMs are online, the VIPs, servers up and down.
    Status {
        /// The whole status as JSON, as the daemon sends it.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw the status in place every --interval seconds, as crm_mon does, until
        /// Ctrl-C (or --count redraws).
        #[arg(long)]
        watch: bool,
        /// With --watch: seconds between redraws.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600), requires = "watch")]
        interval: u64,
        /// With --watch: stop after this many redraws.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
    /// This daemon's role, one word: primary, backup, idle or node (for scripts, such as
    /// the OCF agent dist/ocf/lb).
    Role,
    /// Print a table as the mounted file shows it: config, connections, debug, nat,
    /// servers, services, stat, timeout, timeouts, atms, loglevel; on a real server, decap.
    Cat { table: String },
    /// Write a table: config (3 numbers), debug (0/1), timeout (seconds), timeouts (tcp
    /// tcpfin udp in seconds, 0 keeps one), loglevel.
    Write {
        table: String,
        #[arg(required = true, num_args = 1..)]
        value: Vec<String>,
    },
    /// List services, servers or connections with a header and aligned columns.
    List {
        #[arg(value_parser = ["services", "servers", "connections"])]
        what: String,
        /// Print JSON instead, for machines.
        #[arg(long)]
        json: bool,
    },
    /// The stat table's numbers with their names (TCL's six, then the half-open
    /// connections); --watch repeats every second.
    Stat {
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after this many lines.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Take the primary role (run on a backup ATM).
    Promote,
    /// Hand the primary role to a backup (run on the primary).
    Demote,
    /// Re-read the config file, as SIGHUP does.
    Reload,
    /// Re-execute lb-daemon from its binary on disk (after an upgrade), keeping the XDP
    /// program forwarding, its connections and, on a primary, the VIPs; waits until the new
    /// daemon answers. Refused (nothing changes) if the new binary cannot adopt the
    /// connections, the config file would not start the same ATM, or this is a primary
    /// while another ATM runs (demote it first).
    Restart,
    /// Enable, disable, drain or re-weight a server of a service.
    Server {
        #[command(subcommand)]
        action: ServerCmd,
    },
    /// Check a config file offline; prints every problem with its line; exit 1 if any.
    CheckConfig { file: PathBuf },
    /// Show the daemon's log level, or set it until the next restart: error, warn, info,
    /// debug, trace, or LB_LOG's directives (info,lb_daemon::ha=debug). The loglevel table.
    LogLevel { level: Option<String> },
    /// Make a support bundle: a tar.gz of the status, every table, /metrics, the daemon's
    /// log and config (never the auth key), and the machine's addresses, links, routes,
    /// drivers, kernel and BPF programs. Prints its path.
    Collect {
        /// Where to write it (default /var/tmp/lb-HOST-DATE.tar.gz).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// The config file, when the daemon does not answer to say which it read.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a new random auth key (32 bytes, mode 0600) for [cluster] auth_key_file, as
    /// corosync-keygen does; refuses to overwrite a file. Copy it to every ATM.
    Keygen { file: PathBuf },
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell); the
    /// Debian package installs bash's, zsh's and fish's.
    Completions { shell: clap_complete::Shell },
    /// Write lb-cli's manual pages (roff) into DIR: lb-cli.1 and one lb-cli-COMMAND.1 per
    /// command, as the Debian package installs them.
    #[command(hide = true)]
    Manpage { dir: PathBuf },
}

#[derive(Subcommand)]
enum ServerCmd {
    /// Back into the tables (undoes disable, drain and weight).
    Enable { service: String, server: String },
    /// Out of the tables whatever its checks say; its connections are dropped.
    Disable { service: String, server: String },
    /// Weight 0: no new connections, existing ones finish.
    Drain { service: String, server: String },
    /// Set the weight (0..65535) until the next `enable` or restart.
    Weight {
        weight: u32,
        service: String,
        server: String,
    },
}

fn main() -> ExitCode {
    // Like any Unix tool, end quietly when the reader goes away (`lb-cli list connections |
    // head`): Rust ignores SIGPIPE, and every print would then panic on EPIPE.
    // SAFETY: nothing has run yet that could depend on the disposition.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-cli: {e}");
            ExitCode::FAILURE
        }
    }
}

/// lb-cli.1, and lb-cli-COMMAND.1 for each command that is not hidden.
fn write_manpages(dir: &Path) -> Result<(), String> {
    use clap::CommandFactory;
    let write = |name: &str, cmd: clap::Command| -> Result<(), String> {
        let path = dir.join(format!("{name}.1"));
        let mut out = std::fs::File::create(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        clap_mangen::Man::new(cmd)
            .render(&mut out)
            .map_err(|e| format!("writing {}: {e}", path.display()))
    };
    let cli = Cli::command();
    for sub in cli.get_subcommands().filter(|c| !c.is_hide_set()) {
        // clap names commands with &'static str; these few live until lb-cli exits.
        let name: &'static str = Box::leak(format!("lb-cli-{}", sub.get_name()).into_boxed_str());
        write(name, sub.clone().name(name))?;
    }
    write("lb-cli", cli)
}

fn ask(socket: &Path, req: Request) -> Result<Response, String> {
    // Long work (a resize, a reload, a handover) is announced by the daemon every second
    // while it lasts; silence for this long means it is stuck.
    let wait = Duration::from_secs(10);
    let mut said = None::<std::time::Instant>;
    let r = control::call(socket, &req, wait, |note| {
        if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            eprintln!("lb-cli: lb-daemon is {note}");
            said = Some(std::time::Instant::now());
        }
    })?;
    if r.ok {
        Ok(r)
    } else {
        Err(r.error.unwrap_or_else(|| "the daemon refused".into()))
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let s = &cli.socket;
    match cli.cmd {
        Cmd::Status {
            json: false,
            watch: false,
            ..
        } => {
            print!("{}", render_status(&ask(s, Request::Status)?.into_view()?))
        }
        Cmd::Status {
            json: false,
            watch: true,
            interval,
            count,
        } => watch_status(s, interval, count)?,
        Cmd::Status { json: true, .. } => {
            let d: Status = ask(s, Request::Status)?.into_view()?;
            println!(
                "{}",
                serde_json::to_string_pretty(&d).map_err(|e| e.to_string())?
            );
        }
        Cmd::Role => {
            let d: Status = ask(s, Request::Status)?.into_view()?;
            println!("{}", d.role);
        }
        Cmd::Cat { table } => print!(
            "{}",
            ask(s, Request::Cat { table })?.text.unwrap_or_default()
        ),
        Cmd::Write { table, value } => {
            let r = ask(
                s,
                Request::Write {
                    table,
                    value: value.join(" "),
                },
            )?;
            println!("{}", r.text.unwrap_or_default());
        }
        Cmd::List { what, json } => {
            let r = ask(s, Request::List { what: what.clone() })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r.data.unwrap_or_default()).unwrap_or_default()
                );
            } else {
                print!("{}", list_table(&what, r)?);
            }
        }
        Cmd::Stat { watch, count } => {
            let names = [
                "services",
                "servers",
                "active",
                "packets",
                "dropped",
                "new",
                "half-open",
            ];
            let widths = [8, 8, 8, 12, 10, 10, 9];
            let header: Vec<String> = names
                .iter()
                .zip(widths)
                .map(|(n, w)| format!("{n:>w$}"))
                .collect();
            println!("{}", header.join(" "));
            let mut n = 0;
            loop {
                let text = ask(
                    s,
                    Request::Cat {
                        table: "stat".into(),
                    },
                )?
                .text
                .unwrap_or_default();
                let cols: Vec<String> = text
                    .split_whitespace()
                    .zip(widths)
                    .map(|(v, w)| format!("{v:>w$}"))
                    .collect();
                println!("{}", cols.join(" "));
                n += 1;
                if !watch || count.is_some_and(|c| n >= c) {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Cmd::Promote => println!("{}", ask(s, Request::Promote)?.text.unwrap_or_default()),
        Cmd::Demote => println!("{}", ask(s, Request::Demote)?.text.unwrap_or_default()),
        Cmd::Reload => println!("{}", ask(s, Request::Reload)?.text.unwrap_or_default()),
        Cmd::Restart => {
            println!("{}", ask(s, Request::Restart)?.text.unwrap_or_default());
            // The old daemon removed its socket before answering: whoever answers there
            // now is the new one.
            let limit = Duration::from_secs(60);
            let started = std::time::Instant::now();
            let status: Status = loop {
                match control::call(s, &Request::Status, Duration::from_secs(5), |_| {}) {
                    Ok(r) if r.ok => break r.into_view()?,
                    _ if started.elapsed() < limit => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    Ok(r) => return Err(r.error.unwrap_or_default()),
                    Err(e) => {
                        return Err(format!(
                            "the new lb-daemon did not answer within {} s: {e} (see its log)",
                            limit.as_secs()
                        ));
                    }
                }
            };
            println!(
                "lb-daemon is back after {:.1} s: {} is {}",
                started.elapsed().as_secs_f64(),
                status.name,
                status.role
            );
        }
        Cmd::Server { action } => {
            let (action, service, server) = match action {
                ServerCmd::Enable { service, server } => (ServerAction::Enable, service, server),
                ServerCmd::Disable { service, server } => (ServerAction::Disable, service, server),
                ServerCmd::Drain { service, server } => (ServerAction::Drain, service, server),
                ServerCmd::Weight {
                    weight,
                    service,
                    server,
                } => (ServerAction::Weight(weight), service, server),
            };
            println!(
                "{}",
                ask(
                    s,
                    Request::Server {
                        action,
                        service,
                        server
                    }
                )?
                .text
                .unwrap_or_default()
            );
        }
        Cmd::LogLevel { level: None } => print!(
            "{}",
            ask(
                s,
                Request::Cat {
                    table: "loglevel".into()
                }
            )?
            .text
            .unwrap_or_default()
        ),
        Cmd::LogLevel { level: Some(level) } => println!(
            "{}",
            ask(
                s,
                Request::Write {
                    table: "loglevel".into(),
                    value: level
                }
            )?
            .text
            .unwrap_or_default()
        ),
        Cmd::Collect { output, config } => {
            let (path, failed) = collect::collect(s, output, config, |req| ask(s, req))?;
            if failed > 0 {
                eprintln!(
                    "lb-cli: {failed} parts could not be taken: MANIFEST.txt in the bundle says why"
                );
            }
            println!("{}", path.display());
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "lb-cli", &mut std::io::stdout());
        }
        Cmd::Manpage { dir } => write_manpages(&dir)?,
        Cmd::Keygen { file } => {
            keygen(&file)?;
            println!(
                "{}: {KEY_BYTES} random bytes, mode 0600: copy it to every ATM and name it in \
                 [cluster] auth_key_file",
                file.display()
            );
        }
        Cmd::CheckConfig { file } => {
            return match config::load(&file) {
                Ok(c) => {
                    let servers: usize = c.services.iter().map(|s| s.servers.len()).sum();
                    println!(
                        "{}: OK: cluster {:?}, {} ATMs, {} services, {servers} server lines",
                        file.display(),
                        c.cluster.name,
                        c.atms.len(),
                        c.services.len()
                    );
                    Ok(())
                }
                Err(problems) => {
                    for p in &problems {
                        println!("{}:{}: {}", file.display(), p.line, p.message);
                    }
                    Err(format!("{}: {} problems", file.display(), problems.len()))
                }
            };
        }
    }
    Ok(())
}

/// The length of a key `keygen` writes: HMAC-SHA256's block is 64 bytes, its output 32;
/// 32 random bytes are as strong as the MAC.
const KEY_BYTES: usize = 32;

/// Writes a new random key to `file`, mode 0600, never over an existing file (nor through
/// a symlink). A failure leaves no partial key behind.
fn keygen(file: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; KEY_BYTES];
    getrandom::fill(&mut key).map_err(|e| format!("no random bytes from the kernel: {e}"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!(
                "{} exists: keygen does not overwrite a key (every ATM must hold the same \
                 one); remove it first to replace it",
                file.display()
            ),
            _ => format!("cannot create {}: {e}", file.display()),
        })?;
    if let Err(e) = f.write_all(&key).and_then(|_| f.sync_all()) {
        let _ = std::fs::remove_file(file);
        return Err(format!("cannot write {}: {e}", file.display()));
    }
    Ok(())
}

/// Set by SIGINT or SIGTERM while `status --watch` runs.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: nix::libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// `status --watch`: the status redrawn in place (on a terminal; appended, separated by a
/// blank line, when piped), until Ctrl-C or `count` redraws. A daemon that stops answering
/// is shown as such and asked again, as crm_mon does; Ctrl-C ends with status 0.
fn watch_status(socket: &Path, interval: u64, count: Option<u64>) -> Result<(), String> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { signal(sig, SigHandler::Handler(on_stop)) }
            .map_err(|e| format!("cannot catch {sig}: {e}"))?;
    }
    let tty = std::io::stdout().is_terminal();
    let mut stdout = std::io::stdout().lock();
    let mut drawn = 0u64;
    let result = loop {
        let screen = match ask(socket, Request::Status).and_then(|r| r.into_view()) {
            Ok(d) => render_status(&d),
            Err(e) => format!("lb-cli: {e}\n"),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = format!(
            "Every {interval} s, {:02}:{:02}:{:02} UTC (Ctrl-C to stop)\n\n",
            now / 3600 % 24,
            now / 60 % 60,
            now % 60
        );
        // Home, the new screen, then clear what the old one left below it.
        let frame = if tty {
            let clear = if drawn == 0 { "\x1b[2J" } else { "" };
            format!(
                "{clear}\x1b[H{}\x1b[J",
                (header + &screen).replace('\n', "\x1b[K\n")
            )
        } else if drawn == 0 {
            header + &screen
        } else {
            format!("\n{header}{screen}")
        };
        if stdout
            .write_all(frame.as_bytes())
            .and_then(|_| stdout.flush())
            .is_err()
        {
            break Ok(());
        }
        drawn += 1;
        if count.is_some_and(|c| drawn >= c) {
            break Ok(());
        }
        // Sleep in short steps so that Ctrl-C ends the watch at once.
        let until = std::time::Instant::now() + Duration::from_secs(interval);
        while !STOP.load(Ordering::Relaxed) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        if STOP.load(Ordering::Relaxed) {
            break Ok(());
        }
    };
    if tty {
        let _ = stdout.write_all(b"\n");
    }
    let _ = stdout.flush();
    result
}

/// Rows with a header, each column as wide as its widest cell.
fn aligned(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out += &line(r.iter().map(|s| s.as_str()).collect());
    }
    out
}

fn list_table(what: &str, r: Response) -> Result<String, String> {
    let (header, rows): (&[&str], Vec<Vec<String>>) = match what {
        "services" => (
            &[
                "NAME", "PROT", "VIP", "PORT", "SCHED", "PERSIST", "STATE", "PACKETS",
            ],
            r.into_view::<Vec<ServiceLine>>()?
                .into_iter()
                .map(|l| {
                    vec![
                        l.name,
                        l.protocol,
                        l.vip.to_string(),
                        l.port.to_string(),
                        l.scheduler,
                        l.persistence.to_string(),
                        l.state.name().into(),
                        l.packets.to_string(),
                    ]
                })
                .collect(),
        ),
        "servers" => (
            &[
                "SERVICE",
                "NAME",
                "PROT",
                "ADDRESS",
                "PORT",
                "VIP",
                "VPORT",
                "STATE",
                "WEIGHT",
                "METHOD",
                "ACTIVECONN",
                "INACTCONN",
                "PACKETS",
            ],
            r.into_view::<Vec<ServerLine>>()?
                .into_iter()
                .map(|l| {
                    vec![
                        l.service,
                        l.name,
                        l.protocol,
                        l.address.to_string(),
                        l.port.to_string(),
                        l.vip.to_string(),
                        l.vport.to_string(),
                        l.state.name().into(),
                        l.weight.to_string(),
                        l.method,
                        l.active.to_string(),
                        l.inactive.to_string(),
                        l.packets.to_string(),
                    ]
                })
                .collect(),
        ),
        _ => (
            &[
                "PROT", "CLIENT", "VIP", "TIMEOUT", "SERVER", "PACKETS", "STATE",
            ],
            r.into_view::<Vec<ConnectionLine>>()?
                .into_iter()
                .map(|l| {
                    vec![
                        l.protocol,
                        l.client.to_string(),
                        l.vip.to_string(),
                        l.timeout.to_string(),
                        l.server.to_string(),
                        l.packets.to_string(),
                        l.state,
                    ]
                })
                .collect(),
        ),
    };
    Ok(aligned(header, &rows))
}

/// The status as `lb-cli status` prints it.
fn render_status(d: &Status) -> String {
    let mut out = String::new();
    _ = writeln!(
        out,
        "Cluster {}: {}",
        d.cluster,
        match d.primary() {
            Some(p) => format!("{} is primary", p.name),
            None => "no primary ATM".into(),
        }
    );
    _ = writeln!(out, "This is {} ({})", d.name, d.role);
    _ = writeln!(out, "ATMs:");
    // As wide as the longest address (an IPv6 one is up to 39 characters).
    let width = d
        .atms
        .iter()
        .map(|a| a.address.to_string().len())
        .max()
        .unwrap_or(0)
        .max(15);
    for a in &d.atms {
        let heard = match a.last_heard_ms {
            _ if a.name == d.name => "this ATM".to_string(),
            Some(ms) => format!("heard {ms} ms ago"),
            None => "never heard".to_string(),
        };
        let v6 = a
            .address6
            .map(|v6| format!(" (IPv6 {v6})"))
            .unwrap_or_default();
        let drift = match &a.config {
            Some(fp) if a.config_differs => format!(", CONFIG DIFFERS (fingerprint {fp})"),
            _ => String::new(),
        };
        _ = writeln!(
            out,
            "  {:<10} {:<width$} {:<8} {:<8} {heard}{v6}{drift}",
            a.name,
            a.address.to_string(),
            a.role,
            a.state
        );
    }
    if let Some(mine) = d
        .atms
        .iter()
        .find(|a| a.name == d.name)
        .and_then(|a| a.config.as_ref())
    {
        let differ: Vec<&str> = d
            .atms
            .iter()
            .filter(|a| a.config_differs)
            .map(|a| a.name.as_str())
            .collect();
        _ = writeln!(
            out,
            "Config: fingerprint {mine}{}",
            if differ.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} runs another config (their services, servers or rings may differ)",
                    differ.join(", ")
                )
            }
        );
    }
    let refused: Vec<String> = d
        .rejected
        .iter()
        .flatten()
        .filter(|(_, n)| **n > 0)
        .map(|(why, n)| format!("{why} {n}"))
        .collect();
    if !refused.is_empty() {
        _ = writeln!(out, "Refused ATM messages: {}", refused.join(", "));
    }
    if let Some(q) = &d.quorum {
        // As corosync-quorumtool -s: votes heard out of expected, and whether they suffice.
        match q.needed {
            Some(needed) => {
                _ = writeln!(
                    out,
                    "Quorum: {} of {} votes, {needed} needed: {}",
                    q.heard,
                    q.expected,
                    if q.quorate() {
                        "quorate"
                    } else {
                        "NOT quorate (this ATM may not be primary)"
                    }
                )
            }
            None => {
                _ = writeln!(
                    out,
                    "Quorum: {} of {} votes heard, not enforced",
                    q.heard, q.expected
                )
            }
        }
    }
    let vips: Vec<String> = d.vips.iter().map(|v| v.to_string()).collect();
    _ = writeln!(
        out,
        "VIPs: {}",
        if vips.is_empty() {
            "none".into()
        } else {
            vips.join(", ")
        }
    );
    if let Some(att) = &d.attached {
        let a: Vec<String> = att
            .iter()
            .map(|x| format!("{} ({})", x.interface, x.mode))
            .collect();
        _ = writeln!(out, "Dataplane: lb_xdp on {}", a.join(", "));
    }
    if let Some(n) = &d.nat {
        let addrs: Vec<String> = n.addresses.iter().map(|a| a.to_string()).collect();
        _ = writeln!(
            out,
            "NAT: {} ports {} per server and address, held {} s after close ({} s when the \
             server closes first); {} new connections refused for want of a port{}",
            addrs.join(", "),
            n.ports,
            n.port_hold,
            n.time_wait,
            n.exhausted_drops,
            if n.exhausted_now {
                " (EXHAUSTED now)"
            } else {
                ""
            }
        );
    }
    _ = writeln!(out, "Services:");
    for s in &d.services {
        // Sorry servers stand in for the others: not counted among them.
        let up = s.servers.iter().filter(|v| v.up && !v.sorry).count();
        let real = s.servers.iter().filter(|v| !v.sorry).count();
        // Addresses as ipvsadm writes them: an IPv6 one in brackets before its port.
        let quorum = if s.quorum > 1 {
            format!(
                ", quorum {}: {}",
                s.quorum,
                if s.up { "up" } else { "DOWN" }
            )
        } else if !s.up {
            ": DOWN".into()
        } else {
            String::new()
        };
        _ = writeln!(
            out,
            "  {} {} {}  {up}/{real} servers up{quorum}",
            s.name,
            s.protocol,
            std::net::SocketAddr::new(s.vip, s.port),
        );
        let serving = s.servers.iter().any(|v| v.up && !v.sorry && v.weight > 0);
        for v in &s.servers {
            let sorry = match (v.sorry, serving) {
                (false, _) => "",
                (true, true) => "  sorry server, standing by",
                (true, false) => "  sorry server, SERVING",
            };
            _ = writeln!(
                out,
                "    {:<10} {:>21} {:<6} {:<4} weight {}{sorry}",
                v.name,
                std::net::SocketAddr::new(v.address, v.port).to_string(),
                v.method,
                if v.up { "up" } else { "down" },
                v.weight
            );
        }
    }
    out
}
