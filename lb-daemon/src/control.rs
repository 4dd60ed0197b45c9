//! The control socket's server side: the daemon hands each request to its event loop and
//! writes back what it answers. The protocol itself (requests, responses, the client) is in
//! lb-api, shared with lb-cli.

use std::{os::unix::fs::PermissionsExt, path::Path};

pub use lb_api::control::*;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

/// A request on its way to the daemon's event loop, with where to send the answer.
pub type Call = (Request, oneshot::Sender<Response>);

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
                    tracing::warn!("Control socket: refused a request: {msg}");
                    let _ = send(&mut write, Response::error(msg)).await;
                    return;
                }
                let resp = match serde_json::from_slice::<Request>(&line) {
                    Ok(req) => {
                        tracing::debug!("Control socket: {req:?}");
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
                                    if send(&mut write, still).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => Response::error(format!("not a request: {e}")),
                };
                if send(&mut write, resp).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Writes one response line. The JSON is written on a blocking thread: a listing of 65,536
/// servers takes a while to write, and the runtime's workers carry the heartbeats.
async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, r: Response) -> std::io::Result<()> {
    let out = crate::background(move || {
        let mut out = serde_json::to_string(&r).unwrap_or_default();
        out.push('\n');
        out
    })
    .await
    .map_err(std::io::Error::other)?;
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
