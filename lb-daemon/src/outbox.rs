//! Messages to the other ATMs, numbered and sent by one task in the order they go out (the
//! receivers refuse anything not newer than the last they accepted). Two queues: urgent
//! (heartbeats, yields, sync requests, the stream of connection events) always goes first;
//! bulk (whole-table transfers, up to millions of records) fills the gaps, so a transfer
//! never holds back a heartbeat. A mark in the bulk queue reports, once everything queued
//! before it has been sent, on the channel given to [`Outbox::start`]: a handover waits for
//! its table transfer that way.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::UdpSocket, sync::mpsc};

use crate::ha::{self, Body, Message};

/// An item of the bulk queue.
pub enum Bulk {
    Send(Option<usize>, Body),
    Mark(u64),
}

/// Where the daemon and its worker threads queue messages.
#[derive(Clone)]
pub struct Outbox {
    urgent: mpsc::UnboundedSender<(Option<usize>, Body)>,
    bulk: mpsc::UnboundedSender<Bulk>,
}

/// What the sending task needs.
pub struct Link {
    pub socket: Arc<UdpSocket>,
    pub key: Vec<u8>,
    pub cluster: String,
    /// Our index among the ATMs, and every ATM's [ha] address.
    pub me: usize,
    pub peers: Vec<SocketAddr>,
}

impl Outbox {
    /// Starts the sending task; marks reached are reported on `marks`.
    pub fn start(link: Link, marks: mpsc::UnboundedSender<u64>) -> Outbox {
        let (urgent, urgent_rx) = mpsc::unbounded_channel();
        let (bulk, bulk_rx) = mpsc::unbounded_channel();
        tokio::spawn(send_all(link, urgent_rx, bulk_rx, marks));
        Outbox { urgent, bulk }
    }

    /// Queues `body` for ATM `to`, or every other ATM, ahead of any bulk.
    pub fn send(&self, to: Option<usize>, body: Body) {
        let _ = self.urgent.send((to, body));
    }

    /// Queues part of a bulk transfer.
    pub fn send_bulk(&self, to: Option<usize>, body: Body) {
        let _ = self.bulk.send(Bulk::Send(to, body));
    }

    /// Queues a mark after the bulk queued so far.
    pub fn mark(&self, token: u64) {
        let _ = self.bulk.send(Bulk::Mark(token));
    }
}

async fn send_all(
    link: Link,
    mut urgent: mpsc::UnboundedReceiver<(Option<usize>, Body)>,
    mut bulk: mpsc::UnboundedReceiver<Bulk>,
    marks: mpsc::UnboundedSender<u64>,
) {
    // Our boot epoch: with the sequence number, what receivers check for replays.
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut seq = 0u64;
    loop {
        let (to, body) = tokio::select! {
            biased;
            Some(u) = urgent.recv() => u,
            Some(b) = bulk.recv() => match b {
                Bulk::Send(to, body) => (to, body),
                Bulk::Mark(token) => {
                    let _ = marks.send(token);
                    continue;
                }
            },
            else => return,
        };
        seq += 1;
        let wire = ha::encode(
            &link.cluster,
            &link.key,
            &Message {
                sender: link.me as u16,
                epoch,
                seq,
                body,
            },
        );
        for (i, addr) in link.peers.iter().enumerate() {
            if i != link.me && to.is_none_or(|t| t == i) {
                // Unreachable peers are the election's business, not an error here.
                let _ = link.socket.send_to(&wire, addr).await;
            }
        }
    }
}
