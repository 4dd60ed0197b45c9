//! The daemon's log: one line per event, `TIMESTAMP LEVEL [span{fields}: ]message`, with the
//! timestamp in UTC to the millisecond:
//!
//! ```text
//! 2026-12-06T03:23:00.123Z INFO  Configuration OK: cluster "web", 2 services, this is atm1
//! 2026-12-06T03:23:04.567Z INFO  reload: Reloaded: 1 server added
//! ```
//!
//! Work that spans several turns of the event loop (a reload, a resize, a handover, taking a
//! role) runs in a span, whose name starts each of its lines. The `log` records of aya-log
//! (the dataplane's messages) and of fuser arrive through tracing-log. `LB_LOG` takes
//! tracing's filter directives (`debug`, `lb_daemon=debug`, ...); fuser stays at `error`
//! unless named, since it reports every operation it does not implement. The `loglevel`
//! table (`lb-cli log-level`) replaces the filter while the daemon runs.

use std::{
    fmt,
    fs::File,
    path::Path,
    sync::{Mutex, OnceLock},
};

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter, format::Writer,
        writer::BoxMakeWriter,
    },
    registry::LookupSpan,
    util::SubscriberInitExt,
};

/// The filter when `LB_LOG` is unset or empty.
pub const DEFAULT_FILTER: &str = "info";
/// The levels a directive may name.
pub const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
/// Always in force unless `LB_LOG` names fuser itself.
const QUIET: &str = "fuser=error";

/// The filter for `LB_LOG`'s value, or an error that names the bad directive.
pub fn filter(lb_log: Option<&str>) -> Result<EnvFilter, String> {
    let given = lb_log.map(str::trim).filter(|s| !s.is_empty());
    parse(given.unwrap_or(DEFAULT_FILTER))
        .map_err(|e| format!("LB_LOG={:?}: {e}", given.unwrap_or_default()))
}

/// The filter for directives `asked` (`debug`, `info,lb_daemon::ha=debug`, ...), with fuser
/// kept quiet unless named.
pub fn parse(asked: &str) -> Result<EnvFilter, String> {
    // tracing reads a bare word as a target at every level: `verbose` would quietly turn
    // on everything for a target of that name. Each directive must end in a level.
    for part in asked.split(',').filter(|p| !p.is_empty()) {
        let level = part.rsplit_once('=').map_or(part, |(_, l)| l);
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(format!(
                "{part:?} names no level: use one of {}, or TARGET=LEVEL",
                LEVELS.join(", ")
            ));
        }
    }
    let directives = if asked.contains("fuser") {
        asked.to_string()
    } else {
        format!("{QUIET},{asked}")
    };
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|e| e.to_string())
}

/// The process's filter as asked for, and how to replace it: set once by [`init`].
struct Level {
    asked: Mutex<String>,
    set: Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>,
}

static LEVEL: OnceLock<Level> = OnceLock::new();

/// The filter in force, as asked for (`LB_LOG`'s value, or the last `loglevel` write).
pub fn level() -> String {
    LEVEL.get().map_or_else(
        || DEFAULT_FILTER.to_string(),
        |l| l.asked.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    )
}

/// Replaces the filter at run time (the `loglevel` table): returns the one it replaced.
/// `asked` was checked with [`parse`]; until the next restart, which goes back to `LB_LOG`.
pub fn set_level(asked: &str) -> Result<String, String> {
    let level = LEVEL
        .get()
        .ok_or("the log is not set up: its level cannot change")?;
    let filter = parse(asked)?;
    let mut now = level.asked.lock().unwrap_or_else(|e| e.into_inner());
    (level.set)(filter)?;
    Ok(std::mem::replace(&mut *now, asked.to_string()))
}

/// Sets the log up for the process: to `file` (appended) or standard error.
pub fn init(file: Option<&Path>) -> Result<(), String> {
    let lb_log = std::env::var("LB_LOG").ok();
    let filter = filter(lb_log.as_deref())?;
    let asked = lb_log
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_FILTER)
        .to_string();
    let writer = match file {
        Some(path) => {
            let f = File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
            BoxMakeWriter::new(Mutex::new(f))
        }
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let (sub, set) = subscriber(filter, writer);
    sub.try_init()
        .map_err(|e| format!("cannot set up the log: {e}"))?;
    let _ = LEVEL.set(Level {
        asked: Mutex::new(asked),
        set: Box::new(set),
    });
    Ok(())
}

/// The subscriber: `filter`, our line format, written to `writer`; and the function that
/// replaces its filter.
pub fn subscriber<W>(
    filter: EnvFilter,
    writer: W,
) -> (
    impl Subscriber + Send + Sync + 'static,
    impl Fn(EnvFilter) -> Result<(), String> + Send + Sync + 'static,
)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .event_format(Line)
        .with_filter_reloading();
    let handle = builder.reload_handle();
    (builder.finish(), move |f: EnvFilter| {
        handle.reload(f).map_err(|e| e.to_string())
    })
}

/// Our line format.
pub struct Line;

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(
            w,
            "{:.3} {:<5} ",
            jiff::Timestamp::now(),
            event.metadata().level().as_str()
        )?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                w.write_str(span.name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(w, "{{{fields}}}")?;
                }
                w.write_str(": ")?;
            }
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::{info, info_span, warn};

    use super::*;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Captured {
            self.clone()
        }
    }

    fn lines(filter: &str, f: impl FnOnce()) -> Vec<String> {
        let out = Captured::default();
        let (sub, _) = subscriber(super::filter(Some(filter)).unwrap(), out.clone());
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn lines_carry_a_utc_millisecond_timestamp_the_level_and_the_spans() {
        let got = lines("", || {
            info!("Configuration OK");
            let _s = info_span!("reload").entered();
            warn!(
                "Refused: {}",
                "a resize is under way, try again when it is done"
            );
            let _h = info_span!("handover", to = "atm2").entered();
            info!("sent");
        });
        assert_eq!(got.len(), 3, "{got:?}");
        let (ts, rest) = got[0].split_once(' ').unwrap();
        // 2026-12-06T03:23:00.123Z
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
        assert!(ts.parse::<jiff::Timestamp>().is_ok(), "{ts}");
        assert_eq!(rest, "INFO  Configuration OK");
        assert!(
            got[1].ends_with(
                " WARN  reload: Refused: a resize is under way, try again when it is done"
            ),
            "{}",
            got[1]
        );
        assert!(
            got[2].ends_with(" INFO  reload: handover{to=\"atm2\"}: sent"),
            "{}",
            got[2]
        );
    }

    #[test]
    fn log_records_of_aya_log_and_fuser_arrive_in_the_same_format() {
        let _ = tracing_log::LogTracer::init();
        let got = lines("", || {
            log::info!(target: "lb_xdp", "dropped a fragment");
            log::warn!(target: "fuser::session", "hidden");
        });
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].ends_with(" INFO  dropped a fragment"), "{}", got[0]);
    }

    #[test]
    fn lb_log_filters_and_a_bad_directive_is_named() {
        let got = lines("warn", || {
            info!("hidden");
            tracing::debug!(target: "fuser", "hidden too");
            tracing::error!(target: "fuser", "shown");
            warn!("shown too");
        });
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].ends_with("ERROR shown"), "{}", got[0]);
        let got = lines("debug", || {
            tracing::debug!("shown");
            tracing::warn!(target: "fuser::session", "hidden: fuser stays at error");
        });
        assert_eq!(got.len(), 1, "{got:?}");
        let got = lines("info,fuser=warn", || {
            tracing::warn!(target: "fuser::session", "shown: fuser named");
        });
        assert_eq!(got.len(), 1, "{got:?}");
        let e = filter(Some("lb_daemon=loud")).map(|_| ()).unwrap_err();
        assert!(e.starts_with("LB_LOG=\"lb_daemon=loud\": "), "{e}");
    }

    #[test]
    fn the_filter_changes_at_run_time() {
        let out = Captured::default();
        let (sub, set) = subscriber(filter(Some("info")).unwrap(), out.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::debug!("hidden");
            set(parse("debug").unwrap()).unwrap();
            tracing::debug!("shown");
            tracing::debug!(target: "fuser::session", "hidden: fuser stays at error");
            set(parse("warn").unwrap()).unwrap();
            info!("hidden again");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let got: Vec<&str> = text.lines().collect();
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].ends_with("DEBUG shown"), "{}", got[0]);
        assert!(parse("lb_daemon=loud").is_err());
        let e = parse("verbose").map(|_| ()).unwrap_err();
        assert!(e.contains("\"verbose\" names no level"), "{e}");
        assert!(parse("info,lb_daemon::ha=DEBUG").is_ok());
    }
}
