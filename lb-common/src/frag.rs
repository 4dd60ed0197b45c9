//! Fragments that follow their first (docs/DATAPLANE.md, "Fragments"). Only a datagram's
//! first fragment carries its ports, so only it can be matched to a connection or a
//! service. When the dataplane handles a first fragment of ours, it writes down, by the
//! fields every fragment of the datagram shares (source, destination, IP identification,
//! protocol), the connection the first one belongs to: its flow key, and, for a one-packet
//! service, which leaves no connection entry, the server chosen. The fragments after it
//! look that up and go the same way, NAT included. No reassembly: each fragment is sent on
//! as it came, and the server (or, for a NAT reply, the client) reassembles.

use crate::{Addr, FlowKey};

/// Key of `fragments`: what every fragment of one datagram shares.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: Addr,
    pub dst: Addr,
    /// The IP identification: IPv4's 16 bits, IPv6's fragment header's 32, as on the wire.
    pub id: u32,
    /// The upper-layer protocol.
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// Value of `fragments`: where the fragments of a datagram go.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct FragRoute {
    /// The first fragment's flow key, as on the wire: the connection entry (a client leg,
    /// or a NAT reply leg) whose path the fragments after it take.
    pub conn: FlowKey,
    /// A one-packet service's server for this datagram ([`NO_SERVER`] otherwise): it keeps
    /// no connection entry to find.
    pub server: u32,
    pub _pad: u32,
    /// When the first fragment passed (the dataplane's clock).
    pub seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FragRoute>() == 56);

/// [`FragRoute::server`] of a datagram whose connection entry names its server.
pub const NO_SERVER: u32 = u32::MAX;

/// Entries of `fragments` (an LRU map: a flood of first fragments pushes out the oldest).
/// Each entry lives [`FRAG_LIFETIME_NS`], so this holds 8,192 fragmented datagrams a second.
pub const FRAG_ROUTES: u32 = 16_384;

/// How long after its first fragment a datagram's later fragments may follow it. Longer
/// than any reordering on one path; short against the wrap of IPv4's 16-bit
/// identification between two hosts, so that a later fragment whose first was lost is not
/// sent after an older datagram's first of the same identification.
pub const FRAG_LIFETIME_NS: u64 = 2_000_000_000;

/// Whether a route written at `seen_ns` still guides a fragment arriving at `now_ns`.
#[inline(always)]
pub fn route_fresh(seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(seen_ns) <= FRAG_LIFETIME_NS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_guides_its_fragments_for_the_lifetime_only() {
        let t = 10_000_000_000;
        assert!(route_fresh(t, t));
        assert!(route_fresh(t, t + FRAG_LIFETIME_NS));
        assert!(!route_fresh(t, t + FRAG_LIFETIME_NS + 1));
        // A route written a tick ahead of a reader's clock is fresh, not ancient.
        assert!(route_fresh(t + 1, t));
    }
}
