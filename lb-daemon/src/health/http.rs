//! The `http` and `https` checks: a GET answered with the expected status (and body).

use std::time::Duration;

use super::CheckCtx;

/// What a check asks for and expects back.
pub(super) struct Want<'a> {
    pub path: &'a str,
    pub status: u16,
    pub body: Option<&'a str>,
}

pub(super) async fn check(
    client: &reqwest::Client,
    ctx: &CheckCtx,
    https: bool,
    want: &Want<'_>,
    timeout: Duration,
) -> Option<String> {
    let Want {
        path,
        status: expect,
        body,
    } = *want;
    let scheme = if https { "https" } else { "http" };
    // An IPv6 literal goes in brackets (RFC 3986), as SocketAddr writes it.
    let url = format!(
        "{scheme}://{}{path}",
        std::net::SocketAddr::new(ctx.addr, ctx.port)
    );
    let resp = match client.get(&url).timeout(timeout).send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Some(format!("{scheme} GET {path} timed out")),
        Err(e) => return Some(format!("{scheme} GET {path}: {}", root_cause(&e))),
    };
    let status = resp.status().as_u16();
    if status != expect {
        return Some(format!("{scheme} GET {path} returned {status}"));
    }
    if let Some(want) = body {
        match resp.text().await {
            Ok(t) if t.contains(want) => {}
            Ok(_) => return Some(format!("{scheme} GET {path}: the body lacks {want:?}")),
            Err(e) => {
                return Some(format!(
                    "{scheme} GET {path}: reading the body: {}",
                    root_cause(&e)
                ));
            }
        }
    }
    None
}

/// The innermost cause of an error (reqwest wraps the interesting part).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
