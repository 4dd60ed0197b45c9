//! The control socket: one JSON request per line, one JSON response per line, over a Unix
//! socket of mode 0600. `lb-cli` is the client; the daemon's side hands each request to the
//! daemon's event loop and writes back what it answers.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

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
    /// The Prometheus text of /metrics.
    Metrics,
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
    pub fn error(e: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(e.into()),
            ..Default::default()
        }
    }
}

/// A request on its way to the daemon's event loop, with where to send the answer.
pub type Call = (Request, oneshot::Sender<Response>);

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

/// Binds the control socket (removing a stale one), mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves connections until the listener fails; each line is a request for `tx`.
pub async fn serve(listener: UnixListener, tx: mpsc::Sender<Call>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut reader = TokioBufReader::new(read);
            loop {
                let mut line = Vec::new();
                match (&mut reader)
                    .take(MAX_REQUEST as u64 + 1)
                    .read_until(b'\n', &mut line)
                    .await
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if line.len() > MAX_REQUEST {
                    let msg = format!(
                        "a request line is at most {} bytes: this one is longer",
                        MAX_REQUEST
                    );
                    log::warn!("Control socket: refused a request: {msg}");
                    let _ = send(&mut write, &Response::error(msg)).await;
                    return;
                }
                let resp = match serde_json::from_slice::<Request>(&line) {
                    Ok(req) => {
                        let (rtx, mut rrx) = oneshot::channel();
                        if tx.send((req, rtx)).await.is_err() {
                            return;
                        }
                        let started = tokio::time::Instant::now();
                        loop {
                            match tokio::time::timeout(PENDING_EVERY, &mut rrx).await {
                                Ok(r) => {
                                    break r.unwrap_or_else(|_| {
                                        Response::error("the daemon is shutting down")
                                    });
                                }
                                Err(_) => {
                                    let still = Response {
                                        pending: Some(format!(
                                            "still working ({} s so far)",
                                            started.elapsed().as_secs()
                                        )),
                                        ..Default::default()
                                    };
                                    if send(&mut write, &still).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => Response::error(format!("not a request: {e}")),
                };
                if send(&mut write, &resp).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Writes one response line.
async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_string(r).unwrap_or_default();
    out.push('\n');
    write.write_all(out.as_bytes()).await
}

/// For threads outside the runtime (FUSE, metrics): asks the event loop and waits.
pub fn ask_blocking(tx: &mpsc::Sender<Call>, req: Request) -> Response {
    let (rtx, rrx) = oneshot::channel();
    if tx.blocking_send((req, rtx)).is_err() {
        return Response::error("the daemon is shutting down");
    }
    rrx.blocking_recv()
        .unwrap_or_else(|_| Response::error("the daemon is shutting down"))
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
