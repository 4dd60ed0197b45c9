//! Messages to the other ATMs, numbered and sent by one task in the order they go out (the
//! receivers refuse anything not newer than the last they accepted). Two queues: urgent
//! (heartbeats, yields, sync requests, the stream of connection events) always goes first;
//! bulk (whole-table transfers, up to millions of records) fills the gaps, paced so that the
//! receiver, which installs each record with a map update, keeps up and its socket never
//! overflows (a lost heartbeat is a step toward a false failover). The bulk queue is
//! bounded: the thread producing a transfer waits for room. A mark in the bulk queue
//! reports, once everything queued before it has been sent, on the channel given to
//! [`Outbox::start`]: a handover waits for its table transfer that way.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::UdpSocket, sync::mpsc, time::Instant};

use crate::ha::{self, Body, Message};

/// An item of the bulk queue.
pub enum Bulk {
    Send(Option<usize>, Body),
    /// A mark, and whether the transfer before it is whole.
    Mark(u64, bool),
}

/// Bulk messages per millisecond: 4000 a second, about 150,000 connection records (a
/// million-entry table in under 7 s).
const BULK_PER_MS: u32 = 4;
/// Room in the bulk queue, in messages.
const BULK_QUEUE: usize = 1024;

/// Where the daemon and its worker threads queue messages.
#[derive(Clone)]
pub struct Outbox {
    urgent: mpsc::UnboundedSender<(Option<usize>, Body)>,
    bulk: mpsc::Sender<Bulk>,
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
    /// Starts the sending task; marks reached are reported on `marks`, with whether the
    /// transfer before them is whole.
    pub fn start(link: Link, marks: mpsc::UnboundedSender<(u64, bool)>) -> Outbox {
        let (urgent, urgent_rx) = mpsc::unbounded_channel();
        let (bulk, bulk_rx) = mpsc::channel(BULK_QUEUE);
        tokio::spawn(send_all(link, urgent_rx, bulk_rx, marks));
        Outbox { urgent, bulk }
    }

    /// Queues `body` for ATM `to`, or every other ATM, ahead of any bulk.
    pub fn send(&self, to: Option<usize>, body: Body) {
        let _ = self.urgent.send((to, body));
    }

    /// Queues part of a bulk transfer, waiting for room: from a blocking thread only.
    pub fn send_bulk(&self, to: Option<usize>, body: Body) {
        let _ = self.bulk.blocking_send(Bulk::Send(to, body));
    }

    /// Queues a mark after the bulk queued so far (`whole`: nothing of the transfer was
    /// left out): from a blocking thread only.
    pub fn mark(&self, token: u64, whole: bool) {
        let _ = self.bulk.blocking_send(Bulk::Mark(token, whole));
    }
}

async fn send_all(
    link: Link,
    mut urgent: mpsc::UnboundedReceiver<(Option<usize>, Body)>,
    mut bulk: mpsc::Receiver<Bulk>,
    marks: mpsc::UnboundedSender<(u64, bool)>,
) {
    // Our boot epoch: with the sequence number, what receivers check for replays.
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut seq = 0u64;
    let (mut budget, mut refill) = (BULK_PER_MS, Instant::now());
    loop {
        let (to, body) = tokio::select! {
            biased;
            Some(u) = urgent.recv() => u,
            Some(b) = bulk.recv(), if budget > 0 => match b {
                Bulk::Send(to, body) => {
                    budget -= 1;
                    (to, body)
                }
                Bulk::Mark(token, whole) => {
                    let _ = marks.send((token, whole));
                    continue;
                }
            },
            _ = tokio::time::sleep_until(refill), if budget == 0 => {
                budget = BULK_PER_MS;
                refill = Instant::now() + Duration::from_millis(1);
                continue;
            }
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
