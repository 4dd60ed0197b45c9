//! lb-daemon: the ATM. Parses arguments, sets up logging (see `logging`), runs the daemon.

use std::path::PathBuf;

use clap::Parser;
use lb_daemon::daemon::{self, Options};

#[derive(Parser)]
#[command(
    name = "lb-daemon",
    version,
    about = "lb's Advanced Traffic Manager: programs the XDP dataplane from the cluster's \
             config, checks the servers, elects one primary among the ATMs, and serves the \
             tables (FUSE mount, control socket for lb-cli, Prometheus metrics)"
)]
struct Args {
    /// The cluster's config file (the same on every machine).
    #[arg(long, default_value = "/etc/lb/lb.toml")]
    config: PathBuf,
    /// Which [[atm]] or server of the config this machine is (default: the one whose
    /// address is local).
    #[arg(long)]
    node: Option<String>,
    /// Append the log to this file instead of standard error.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Control socket path (overrides [control] socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Where to mount the tables (overrides [control] mount).
    #[arg(long)]
    mount: Option<PathBuf>,
    /// Metrics address, or "off" (overrides [control] metrics).
    #[arg(long)]
    metrics: Option<String>,
    /// How to attach lb_xdp: auto (driver mode where the driver supports it, generic
    /// otherwise, with the kernel's reason logged), driver, or generic (for a driver whose
    /// native XDP misbehaves).
    #[arg(long, default_value = "auto", value_parser = ["auto", "driver", "generic"])]
    xdp_mode: String,
    /// Print this manual page (roff) and exit, as the Debian package installs it.
    #[arg(long, hide = true)]
    manpage: bool,
    /// Print the version of the kept maps this build adopts, and its own version, and
    /// exit: a running daemon asks its successor before `lb-cli restart` executes it.
    #[arg(long, hide = true)]
    kept_abi: bool,
    /// Set by a daemon that re-executes itself (`lb-cli restart`): what it was
    /// (primary:TERM or backup).
    #[arg(long, hide = true, value_parser = daemon::Restarted::parse)]
    restarted: Option<daemon::Restarted>,
}

/// Allocations of this size or more get pages of their own (mmap), given back whole when
/// they are freed.
const MMAP_THRESHOLD: i32 = 64 * 1024;

/// glibc puts a large allocation in pages of its own only until the first such block is
/// freed: from then on its threshold follows the largest block freed (up to 32 MiB), and
/// blocks below it come from the thread's arena, which keeps their pages when they are
/// freed. The sweep, a full sync and a table read build buffers the size of the connection
/// table on whichever thread of tokio's blocking pool runs them, so each arena settled at
/// the high-water mark of what it built (docs/SOAK.md). A fixed threshold keeps every such
/// buffer in its own pages: freed, they go back to the kernel at once.
fn fix_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt changes a malloc parameter under malloc's own lock; it touches no
        // memory of ours.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.manpage {
        use clap::CommandFactory;
        clap_mangen::Man::new(Args::command())
            .section("8")
            .render(&mut std::io::stdout())?;
        return Ok(());
    }
    if args.kept_abi {
        println!(
            "{} {}",
            lb_daemon::dataplane::kept::KEPT_ABI,
            env!("CARGO_PKG_VERSION")
        );
        return Ok(());
    }
    fix_mmap_threshold();
    lb_daemon::logging::init(args.log_file.as_deref()).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(daemon::run(Options {
        config: args.config,
        node: args.node,
        socket: args.socket,
        mount: args.mount,
        metrics: args.metrics,
        log_file: args.log_file.clone(),
        restarted: args.restarted,
        xdp_mode: match args.xdp_mode.as_str() {
            "driver" => lb_daemon::dataplane::AttachMode::Driver,
            "generic" => lb_daemon::dataplane::AttachMode::Generic,
            _ => lb_daemon::dataplane::AttachMode::Auto,
        },
    }));
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    result
}
