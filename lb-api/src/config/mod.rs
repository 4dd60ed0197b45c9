//! The config file: one TOML file describes the whole cluster and is the same on every machine.
//!
//! Parsing keeps every value's position, so each problem is reported with the line it is on,
//! and all problems are reported at once (a daemon that stops at the first one makes an
//! operator restart it once per typo). `lb-cli check-config` and the daemon share this code.
//!
//! The parts: `types` (what a validated file is, with its defaults and limits), `reader` (a
//! table read key by key, keeping lines), `sections` and `services` (one reader a table) and
//! `checks` (addresses, and the checks between tables).

use std::{fs::OpenOptions, io::Read, os::unix::fs::OpenOptionsExt, path::Path};

use toml_edit::Document;

mod checks;
mod reader;
mod sections;
mod services;
#[cfg(test)]
mod tests;
mod types;

use reader::{Cx, line_of};
use sections::read;
pub use types::{
    Atm, CONNECTIONS_RANGE, Check, CheckKind, Cluster, Config, Control, DEFAULT_CHECK_FALL,
    DEFAULT_CHECK_INTERVAL_MS, DEFAULT_CHECK_RISE, DEFAULT_CHECK_TIMEOUT_MS, DEFAULT_DEAD_AFTER,
    DEFAULT_HA_PORT, DEFAULT_HEARTBEAT_MS, DEFAULT_METRICS, DEFAULT_MOUNT, DEFAULT_PORT_HOLD,
    DEFAULT_SOCKET, DEFAULT_TIME_WAIT, DEFAULT_TIMEOUT, Ha, Manager, NAME_MAX, NAT_POOL_MAX,
    NAT6_PREFIX_RANGE, Nat, Nat4, Nat6, Problem, Quorum, SERVERS_RANGE, SERVICES_RANGE, ServerCfg,
    ServiceCfg, ServiceTimeouts, TIMEOUT_RANGE, Timeouts, WEIGHT_RANGE, proto_name,
};

/// The largest config file read. 65,536 server lines, the most the tables hold, take about
/// 5-6 MB; the bound keeps `check-config /dev/zero` or a runaway generator from eating all
/// memory before the parser says anything.
pub const CONFIG_MAX_BYTES: u64 = 16 << 20;

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
    let whole = |message: String| vec![Problem { line: 0, message }];
    let cannot = |e: std::io::Error| whole(format!("cannot read {}: {e}", path.display()));
    // Non-blocking, so that a FIFO without a writer is refused below rather than hanging
    // the open; reads of a regular file ignore the flag.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot)?;
    // Checked on the open file, so what is read is what was checked. Devices and pipes have
    // no size to trust (/dev/zero never ends).
    if !file.metadata().map_err(cannot)?.is_file() {
        return Err(whole(format!("{} is not a regular file", path.display())));
    }
    let mut bytes = Vec::new();
    // One byte past the bound tells a file at the limit from a larger one.
    (&mut file)
        .take(CONFIG_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > CONFIG_MAX_BYTES {
        return Err(whole(format!(
            "{} is larger than {} MiB (the limit for a config file)",
            path.display(),
            CONFIG_MAX_BYTES >> 20
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let bad = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..bad].iter().filter(|b| **b == b'\n').count() + 1;
        vec![Problem {
            line,
            message: "not UTF-8 text".into(),
        }]
    })?;
    parse(&text, path.parent().unwrap_or(Path::new(".")))
}

/// Validates config text; relative script paths are taken from `base`.
pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
    let doc = Document::parse(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
        let msg = e.message().trim().to_string();
        vec![Problem {
            line,
            message: format!("not valid TOML: {msg}"),
        }]
    })?;
    let mut cx = Cx {
        newlines: text.match_indices('\n').map(|(i, _)| i).collect(),
        base,
        problems: Vec::new(),
    };
    let root = doc
        .as_item()
        .as_table_like()
        .expect("a document is a table");
    let config = read(&mut cx, root);
    if cx.problems.is_empty() {
        Ok(config.expect("no problems means a config"))
    } else {
        cx.problems.sort_by_key(|p| p.line);
        cx.problems.dedup();
        Err(cx.problems)
    }
}
