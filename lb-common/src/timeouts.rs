//! Idle timeouts by protocol and TCP state (`[cluster.timeouts]`, `[service.timeouts]`):
//! pure, so the XDP program and the daemon (the sweep, the tables, sync) judge a
//! connection's life alike.

use crate::{CONN_FIN, CONN_HALF_OPEN, CONN_PEER_FIN, CONN_PEER_RST, CONN_RST, IPPROTO_TCP};

/// Idle timeouts by protocol and TCP state, as `ipvsadm --set tcp tcpfin udp`: how long a
/// connection may be quiet before its entry is dead (a packet of its tuple then starts a
/// new connection, and the sweep deletes it).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A TCP connection that has seen no FIN or RST.
    pub tcp_ns: u64,
    /// A TCP connection that has seen a FIN or RST, either way.
    pub tcp_fin_ns: u64,
    /// A UDP flow (and any protocol but TCP).
    pub udp_ns: u64,
    /// A half-open TCP connection (`CONN_HALF_OPEN`: only SYNs from the client yet); never
    /// longer than an open one of its service.
    pub tcp_syn_ns: u64,
}

impl Timeouts {
    /// One timeout for every protocol and state.
    pub const fn same(ns: u64) -> Self {
        Timeouts {
            tcp_ns: ns,
            tcp_fin_ns: ns,
            udp_ns: ns,
            tcp_syn_ns: ns,
        }
    }

    /// The idle limit of a connection of protocol `proto` with `CONN_*` bits `flags`, whose
    /// service overrides the timeout with `idle_s` (`tcp` or `udp`, by its protocol) and
    /// `fin_s` (`tcp_fin`) seconds; 0 keeps these.
    #[inline(always)]
    pub fn limit_ns(&self, proto: u8, flags: u16, idle_s: u32, fin_s: u32) -> u64 {
        const S: u64 = 1_000_000_000;
        let (own, base) = if proto != IPPROTO_TCP {
            (idle_s, self.udp_ns)
        } else if flags & (CONN_FIN | CONN_RST | CONN_PEER_FIN | CONN_PEER_RST) != 0 {
            (fin_s, self.tcp_fin_ns)
        } else {
            (idle_s, self.tcp_ns)
        };
        let limit = if own != 0 { own as u64 * S } else { base };
        if proto == IPPROTO_TCP
            && flags & CONN_HALF_OPEN != 0
            && flags & (CONN_FIN | CONN_RST) == 0
            && self.tcp_syn_ns < limit
        {
            return self.tcp_syn_ns;
        }
        limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn each_state_has_its_timeout_and_a_service_may_override_each() {
        let t = Timeouts {
            tcp_ns: 900 * S,
            tcp_fin_ns: 120 * S,
            udp_ns: 300 * S,
            tcp_syn_ns: 60 * S,
        };
        assert_eq!(t.limit_ns(IPPROTO_TCP, 0, 0, 0), 900 * S);
        for f in [CONN_FIN, CONN_RST, CONN_PEER_FIN, CONN_PEER_RST] {
            assert_eq!(t.limit_ns(IPPROTO_TCP, f, 0, 0), 120 * S, "{f}");
            assert_eq!(t.limit_ns(IPPROTO_TCP, f, 3600, 0), 120 * S, "{f}");
            assert_eq!(t.limit_ns(IPPROTO_TCP, f, 0, 5), 5 * S, "{f}");
        }
        assert_eq!(t.limit_ns(IPPROTO_TCP, crate::CONN_NAT, 3600, 5), 3600 * S);
        assert_eq!(t.limit_ns(crate::IPPROTO_UDP, 0, 0, 0), 300 * S);
        // A UDP flow has no FIN: its flags never pick tcp_fin.
        assert_eq!(t.limit_ns(crate::IPPROTO_UDP, CONN_FIN, 0, 5), 300 * S);
        assert_eq!(t.limit_ns(crate::IPPROTO_UDP, 0, 30, 5), 30 * S);
        // Half-open: tcp_syn, never longer than the service's open timeout; a RST or FIN
        // makes it closing.
        assert_eq!(t.limit_ns(IPPROTO_TCP, CONN_HALF_OPEN, 0, 0), 60 * S);
        assert_eq!(t.limit_ns(IPPROTO_TCP, CONN_HALF_OPEN, 20, 0), 20 * S);
        assert_eq!(
            t.limit_ns(IPPROTO_TCP, CONN_HALF_OPEN | CONN_RST, 0, 5),
            5 * S
        );
        assert_eq!(
            t.limit_ns(crate::IPPROTO_UDP, CONN_HALF_OPEN, 0, 0),
            300 * S
        );
    }
}
