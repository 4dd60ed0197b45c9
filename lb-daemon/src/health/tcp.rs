//! The `tcp` check: a connection to the server's port opens within the timeout.

use std::{net::SocketAddr, time::Duration};

use super::CheckCtx;

pub(super) async fn check(ctx: &CheckCtx, timeout: Duration) -> Option<String> {
    let addr = SocketAddr::from((ctx.addr, ctx.port));
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("tcp connect: {e}")),
        Err(_) => Some(format!(
            "tcp connect timed out after {} ms",
            timeout.as_millis()
        )),
    }
}
