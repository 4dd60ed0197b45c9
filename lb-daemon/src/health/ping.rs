//! ICMP and ICMPv6 echo: the health checks' `ping` of every server, and `track`'s of its
//! addresses.

use std::{net::IpAddr, time::Duration};

pub use surge_ping::Client;

/// Health-check pings' identifiers start here ("lb", 0x6c62), one per probe: the answers
/// of each probe are its own, and apart from `track`'s.
pub const PING_ID: u16 = 0x6c62;

/// The ICMP socket (ICMPv6 for `v6`) all pingers of a kind and family share.
pub fn client(v6: bool) -> std::io::Result<Client> {
    let kind = if v6 {
        surge_ping::ICMP::V6
    } else {
        surge_ping::ICMP::V4
    };
    Client::new(&surge_ping::Config::builder().kind(kind).build())
}

/// Echo requests to one address under one identifier, numbered in turn.
pub struct Pinger {
    inner: surge_ping::Pinger,
    seq: u16,
    timeout: Duration,
}

impl Pinger {
    /// `client` must be of `addr`'s family.
    pub async fn new(client: &Client, addr: IpAddr, id: u16, timeout: Duration) -> Pinger {
        let mut inner = client.pinger(addr, surge_ping::PingIdentifier(id)).await;
        inner.timeout(timeout);
        Pinger {
            inner,
            seq: 0,
            timeout,
        }
    }

    /// One echo: `None` when answered within the timeout, else why not.
    pub async fn once(&mut self) -> Option<String> {
        let r = self
            .inner
            .ping(surge_ping::PingSequence(self.seq), &[0u8; 16])
            .await;
        self.seq = self.seq.wrapping_add(1);
        match r {
            Ok(_) => None,
            Err(surge_ping::SurgeError::Timeout { .. }) => Some(format!(
                "no answer to ping within {} ms",
                self.timeout.as_millis()
            )),
            Err(e) => Some(format!("ping: {e}")),
        }
    }
}
