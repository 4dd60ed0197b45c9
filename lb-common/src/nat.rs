//! NAT source ports: which the dataplane tries, in what order, and when one is free again.
//! Pure, so the XDP program and the host's unit tests share them.
//!
//! A NAT connection toward server S takes a source (address, port) from the NAT addresses
//! (the gateway and the `[nat] pool`) times the port range; its reply leg, keyed by
//! (S, address, port), holds it. Each server keeps a cursor that moves on with every port
//! handed out, so the (address, port) pairs are taken in turn: the next one tried is the
//! one handed out longest ago, the likeliest to be free. A search goes on from the cursor
//! until it finds a free pair or has tried them all.

use crate::{CONN_FIN, CONN_PEER_FIN, CONN_PEER_RST, CONN_RST, CONN_SERVER_CLOSED_FIRST};

/// How long a closed connection's (address, port) stays held: `hold`, after a RST or when
/// the client closed first; `time_wait`, when the server closed first, for the server then
/// keeps the connection in TIME_WAIT and answers a new SYN on the same addresses and ports
/// with an ACK of the old connection whenever the new one's sequence number and timestamp
/// do not happen to be higher (Linux clients pick both at random per connection): that SYN
/// would be lost, and the client would send it again only a second later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holds {
    /// The idle timeout of an open connection (`Timeouts::limit_ns`).
    pub timeout_ns: u64,
    /// The idle timeout of one that has seen a FIN or RST.
    pub fin_timeout_ns: u64,
    pub hold_ns: u64,
    pub time_wait_ns: u64,
}

/// The pair tried at cursor value `c`: (index of the NAT address, offset in the port
/// range). Every port of the first address, then every port of the next.
#[inline(always)]
pub fn candidate(c: u32, span: u32, addresses: u32) -> (u32, u32) {
    if span == 0 || addresses == 0 {
        return (0, 0);
    }
    ((c / span) % addresses, c % span)
}

/// Whether the pair at port offset `off` is this ATM's to hand out under `stripe` (see
/// `Settings::nat_stripe`): all with 0, the even offsets with 1, the odd ones with 2.
#[inline(always)]
pub fn in_stripe(off: u32, stripe: u32) -> bool {
    match stripe {
        1 => off.is_multiple_of(2),
        2 => off % 2 == 1,
        _ => true,
    }
}

/// Whether a reply leg's (address, port) may be handed out again: its connection has been
/// idle past its idle timeout (the closing one once it saw a FIN or RST), or it closed (a RST either way, or a FIN each way) and has
/// been quiet since for the hold that applies (see [`Holds`]).
#[inline(always)]
pub fn port_free(flags: u16, last_seen_ns: u64, now_ns: u64, h: &Holds) -> bool {
    let idle = now_ns.saturating_sub(last_seen_ns);
    let closing = flags & (CONN_FIN | CONN_RST | CONN_PEER_FIN | CONN_PEER_RST) != 0;
    if idle
        > if closing {
            h.fin_timeout_ns
        } else {
            h.timeout_ns
        }
    {
        return true;
    }
    if flags & (CONN_RST | CONN_PEER_RST) != 0 {
        return idle >= h.hold_ns;
    }
    let both_fin = CONN_FIN | CONN_PEER_FIN;
    if flags & both_fin != both_fin {
        return false;
    }
    if flags & CONN_SERVER_CLOSED_FIRST != 0 {
        idle >= h.time_wait_ns
    } else {
        idle >= h.hold_ns
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::HashMap, vec::Vec};

    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn the_two_stripes_of_a_handover_share_no_port() {
        let span = 31_744;
        for off in 0..span {
            assert!(in_stripe(off, 0));
            assert_ne!(in_stripe(off, 1), in_stripe(off, 2), "offset {off}");
        }
    }

    #[test]
    fn a_closed_port_is_free_after_the_hold_an_open_one_after_the_timeout() {
        let h = Holds {
            timeout_ns: 100 * S,
            fin_timeout_ns: 80 * S,
            hold_ns: 2 * S,
            time_wait_ns: 60 * S,
        };
        // Open: only the idle timeout frees it.
        assert!(!port_free(0, 0, 50 * S, &h));
        assert!(port_free(0, 0, 101 * S, &h));
        // Half closed (one FIN): data may still flow the other way, until the closing
        // timeout.
        assert!(!port_free(CONN_FIN, 0, 50 * S, &h));
        assert!(!port_free(CONN_PEER_FIN, 0, 50 * S, &h));
        assert!(port_free(CONN_PEER_FIN, 0, 81 * S, &h));
        // Closed both ways (the client first), or reset: free once quiet for the hold.
        let server_first = CONN_FIN | CONN_PEER_FIN | CONN_SERVER_CLOSED_FIRST;
        for f in [
            CONN_FIN | CONN_PEER_FIN,
            CONN_RST,
            CONN_PEER_RST,
            server_first | CONN_RST,
        ] {
            assert!(!port_free(f, 10 * S, 11 * S, &h), "{f}");
            assert!(port_free(f, 10 * S, 12 * S, &h), "{f}");
        }
        // The server closed first: its TIME_WAIT.
        assert!(!port_free(server_first, 10 * S, 69 * S, &h));
        assert!(port_free(server_first, 10 * S, 70 * S, &h));
        // A packet seen after `now` was read (another CPU): not idle at all.
        assert!(!port_free(CONN_RST, 12 * S, 11 * S, &h));
    }

    #[test]
    fn candidates_walk_every_pair_once_per_round() {
        let (span, addrs) = (7, 3);
        let mut seen: Vec<(u32, u32)> = (0..span * addrs)
            .map(|c| candidate(c + 5, span, addrs))
            .collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len() as u32, span * addrs);
        assert_eq!(candidate(0, 0, 3), (0, 0));
    }

    /// The dataplane's search, on the host: from the cursor, the first free pair.
    struct Allocator {
        span: u32,
        addrs: u32,
        cursor: u32,
        /// (address, port) -> (flags, last seen)
        held: HashMap<(u32, u32), (u16, u64)>,
    }

    impl Allocator {
        fn take(&mut self, now: u64, timeout: u64, hold: u64) -> Option<(u32, u32)> {
            let h = Holds {
                timeout_ns: timeout,
                fin_timeout_ns: timeout,
                hold_ns: hold,
                time_wait_ns: 60 * S,
            };
            let start = self.cursor;
            for i in 0..self.span * self.addrs {
                let pair = candidate(start + i, self.span, self.addrs);
                let free = match self.held.get(&pair) {
                    None => true,
                    Some((f, seen)) => port_free(*f, *seen, now, &h),
                };
                if free {
                    self.cursor = start + i + 1;
                    self.held.insert(pair, (0, now));
                    return Some(pair);
                }
            }
            None
        }
    }

    #[test]
    fn the_allocator_finds_the_last_free_port_and_reuses_closed_ones_after_the_hold() {
        let (timeout, hold) = (60 * S, 2 * S);
        let mut a = Allocator {
            span: 100,
            addrs: 2,
            cursor: 0,
            held: HashMap::new(),
        };
        // Every pair once, in order, then none.
        let all: Vec<_> = (0..200)
            .map(|_| a.take(0, timeout, hold).unwrap())
            .collect();
        assert_eq!(all[0], (0, 0));
        assert_eq!(all[100], (1, 0));
        assert_eq!(a.take(S, timeout, hold), None);
        // One connection closes: its pair is the one found, and only after the hold.
        a.held.insert((1, 42), (CONN_FIN | CONN_PEER_FIN, 10 * S));
        assert_eq!(a.take(11 * S, timeout, hold), None);
        assert_eq!(a.take(12 * S, timeout, hold), Some((1, 42)));
        // The rest close too. Then over twice the range of short connections, closing as
        // they go: never short of a port.
        for v in a.held.values_mut() {
            v.0 = CONN_RST;
        }
        let mut now = 20 * S;
        for n in 0..500 {
            let pair = a
                .take(now, timeout, hold)
                .unwrap_or_else(|| panic!("connection {n} found no port"));
            a.held.insert(pair, (CONN_RST, now));
            now += S / 10;
            // Ports held by connections still open are skipped, not reused.
            if n == 0 {
                a.held.insert((0, 7), (0, now));
            }
        }
        assert_eq!(a.held[&(0, 7)].0, 0, "the open connection kept its port");
    }
}
