//! The control protocol: one JSON request per line, one JSON response per line, over the
//! daemon's Unix socket (mode 0600). The daemon serves it (lb-daemon's `control`); lb-cli is
//! the client, with `call`.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// What `lb-cli` can ask.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// A table's text, as `cat MOUNT/TABLE` shows it.
    Cat { table: String },
    /// Write to a table, as `echo VALUE > MOUNT/TABLE` does.
    Write { table: String, value: String },
    /// Who is primary, which ATMs are online, VIPs, servers up/down (structured).
    Status,
    /// services, servers or connections as structured records.
    List { what: String },
    /// Re-read the config file, as SIGHUP does.
    Reload,
    /// enable, disable, drain or weight a server of a service by hand.
    Server {
        action: ServerAction,
        service: String,
        server: String,
    },
    /// Take the primary role from the current primary (run on a backup).
    Promote,
    /// Hand the primary role to a backup (run on the primary).
    Demote,
    /// Re-execute the daemon's binary from disk (an upgrade), keeping the dataplane, its
    /// connections and, on a primary, the VIPs (`lb-cli restart`).
    Restart,
    /// The Prometheus text of /metrics.
    Metrics,
    /// What a support bundle (`lb-cli collect`) needs from the daemon: its version and
    /// files ([`crate::views::Support`]).
    Support,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerAction {
    Enable,
    Disable,
    Drain,
    Weight(u32),
}

/// The answer: text (for tables), data (for structured answers), or an error.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Not an answer yet: the daemon is still working on the request (a resize, a reload,
    /// a handover) and says so about every second, so the client knows to keep waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

/// The longest request line the daemon reads (a table write is far shorter): a client that
/// sends more is answered with an error and disconnected, so nobody can make the daemon
/// buffer without bound.
pub const MAX_REQUEST: usize = 1 << 20;

/// How often the daemon tells a waiting client that it is still working.
pub const PENDING_EVERY: Duration = Duration::from_secs(1);

impl Response {
    pub fn text(t: impl Into<String>) -> Response {
        Response {
            ok: true,
            text: Some(t.into()),
            ..Default::default()
        }
    }
    pub fn data(d: serde_json::Value) -> Response {
        Response {
            ok: true,
            data: Some(d),
            ..Default::default()
        }
    }
    /// A typed view (see `views`) as the answer's data.
    pub fn view(v: &impl Serialize) -> Response {
        match serde_json::to_value(v) {
            Ok(d) => Response::data(d),
            Err(e) => Response::error(format!("cannot write the answer: {e}")),
        }
    }
    /// The answer's data read back as the view it was sent as.
    pub fn into_view<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        serde_json::from_value(self.data.unwrap_or_default())
            .map_err(|e| format!("lb-daemon answered with data lb-cli cannot read: {e}"))
    }
    pub fn error(e: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(e.into()),
            ..Default::default()
        }
    }
}

/// Client side: sends one request and waits for the answer. Errors are written for the
/// operator (daemon not running, permission denied). `timeout` bounds each wait for a
/// line; while the daemon says it is still working, `on_pending` hears it and the wait
/// goes on.
pub fn call(
    socket: &Path,
    req: &Request,
    timeout: Duration,
    mut on_pending: impl FnMut(&str),
) -> Result<Response, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
            "cannot reach lb-daemon at {}: is it running? ({e})",
            socket.display()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on {}: the control socket is for root (mode 0600)",
            socket.display()
        ),
        _ => format!("cannot connect to {}: {e}", socket.display()),
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("writing to {}: {e}", socket.display()))?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut answer = String::new();
        reader.read_line(&mut answer).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "lb-daemon at {} did not answer within {} s",
                socket.display(),
                timeout.as_secs()
            ),
            _ => format!("reading from {}: {e}", socket.display()),
        })?;
        if answer.is_empty() {
            return Err(format!(
                "lb-daemon at {} closed the connection",
                socket.display()
            ));
        }
        let r: Response = serde_json::from_str(&answer)
            .map_err(|e| format!("a garbled answer from lb-daemon: {e}"))?;
        match &r.pending {
            Some(p) => on_pending(p),
            None => return Ok(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json() {
        for r in [
            Request::Cat {
                table: "stat".into(),
            },
            Request::Server {
                action: ServerAction::Weight(3),
                service: "http".into(),
                server: "web1".into(),
            },
            Request::Promote,
        ] {
            let s = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        }
        assert_eq!(
            serde_json::to_string(&Request::Cat {
                table: "stat".into()
            })
            .unwrap(),
            r#"{"cmd":"cat","table":"stat"}"#
        );
    }
}
