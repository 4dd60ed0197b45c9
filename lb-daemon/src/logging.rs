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
//! unless named, since it reports every operation it does not implement.

use std::{fmt, fs::File, path::Path, sync::Mutex};

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
/// Always in force unless `LB_LOG` names fuser itself.
const QUIET: &str = "fuser=error";

/// The filter for `LB_LOG`'s value, or an error that names the bad directive.
pub fn filter(lb_log: Option<&str>) -> Result<EnvFilter, String> {
    let given = lb_log.map(str::trim).filter(|s| !s.is_empty());
    let asked = given.unwrap_or(DEFAULT_FILTER);
    let directives = if asked.contains("fuser") {
        asked.to_string()
    } else {
        format!("{QUIET},{asked}")
    };
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|e| format!("LB_LOG={:?}: {e}", given.unwrap_or_default()))
}

/// Sets the log up for the process: to `file` (appended) or standard error.
pub fn init(file: Option<&Path>) -> Result<(), String> {
    let filter = filter(std::env::var("LB_LOG").ok().as_deref())?;
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
    subscriber(filter, writer)
        .try_init()
        .map_err(|e| format!("cannot set up the log: {e}"))
}

/// The subscriber: `filter`, our line format, written to `writer`.
pub fn subscriber<W>(filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .event_format(Line)
        .finish()
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
        let sub = subscriber(super::filter(Some(filter)).unwrap(), out.clone());
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
}
