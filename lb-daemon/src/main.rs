//! lb-daemon: the ATM. Parses arguments, sets up logging, runs the daemon.

use std::{io::Write, path::PathBuf};

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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut logger = env_logger::Builder::new();
    logger
        .filter_level(log::LevelFilter::Info)
        // fuser reports every operation it does not implement (xattrs...) as a warning.
        .filter_module("fuser", log::LevelFilter::Error)
        .parse_env("LB_LOG")
        .format(|buf, r| {
            let ts = buf.timestamp_millis();
            writeln!(buf, "{ts} {:<5} {}", r.level(), r.args())
        });
    if let Some(path) = &args.log_file {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("cannot open the log file {}: {e}", path.display()))?;
        logger.target(env_logger::Target::Pipe(Box::new(file)));
    }
    logger.init();
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
        xdp_mode: match args.xdp_mode.as_str() {
            "driver" => lb_daemon::dataplane::AttachMode::Driver,
            "generic" => lb_daemon::dataplane::AttachMode::Generic,
            _ => lb_daemon::dataplane::AttachMode::Auto,
        },
    }));
    if let Err(e) = &result {
        log::error!("{e:#}");
    }
    result
}
