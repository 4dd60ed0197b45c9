//! The flow caches' ABI (`flow_cache`, `flow_cache6`; docs/DATAPLANE.md, "The flow
//! cache"): the slots, how a flow finds its slot, and how long a slot answers. Apart from
//! `abi` like the rings' sizes (`ring`), and re-exported at the crate's root.

use crate::{Addr, Connection, FlowKey};

/// Slots of each CPU's flow cache (`flow_cache`), a power of two.
pub const FLOW_CACHE_SLOTS: u32 = 4096;

/// How long a cached flow is forwarded from the cache: its next packet after that takes
/// the full path, which brings the shared entry up to date (and so the `connections` table
/// lags by at most this much), refreshes its place in the LRU, and caches it again.
pub const FLOW_SYNC_NS: u64 = 1_000_000_000;

/// The flow cache slot of an IPv4 flow, from its addresses and ports as on the wire.
#[inline(always)]
pub const fn flow_cache_slot(saddr: u32, daddr: u32, sport: u16, dport: u16) -> u32 {
    let ports = sport as u32 | (dport as u32) << 16;
    let h = (saddr ^ daddr.rotate_left(11) ^ ports.rotate_left(21)).wrapping_mul(0x9e37_79b1);
    h >> (32 - FLOW_CACHE_SLOTS.trailing_zeros())
}

/// Value of `flow_cache`: an established IPv4 flow (the client's leg) as the full path
/// last forwarded it on this CPU, and what the cache forwarded of it since. A slot whose
/// `daddr` is 0 is empty (no VIP is 0.0.0.0).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct CachedFlow {
    /// The flow's addresses and ports, as on the wire.
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// The server's [`crate::Method`] when the slot was filled: lb_xdp's shortest path is for
    /// direct flows (the server's record has the last word).
    pub method: u8,
    /// The connection's NAT source port (nat), as on the wire.
    pub nat_port: u16,
    /// `Settings::flow_gen` when the full path wrote the slot.
    pub generation: u32,
    pub _pad2: u32,
    /// Server index.
    pub server: u32,
    /// The connection's NAT source address (nat), as on the wire.
    pub nat_addr: u32,
    /// When the full path last brought the shared entry up to date.
    pub synced_ns: u64,
    /// The last packet's time.
    pub last_ns: u64,
    /// Packets and bytes forwarded from the cache, not yet in the shared entry.
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<CachedFlow>() == 64);

impl CachedFlow {
    /// The flow's `connections` key.
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src: Addr::v4_raw(self.saddr),
            dst: Addr::v4_raw(self.daddr),
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// Whether the slot holds the IPv4 flow of these addresses, ports (as on the wire) and
    /// protocol.
    #[inline(always)]
    pub fn is(&self, saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> bool {
        self.daddr == daddr
            && self.saddr == saddr
            && self.sport == sport
            && self.dport == dport
            && self.proto == proto
    }
}

/// The counts a flow cache slot keeps for its flow, the same in both families' slots.
macro_rules! slot_counts {
    ($t:ty) => {
        impl $t {
            /// Adds what the cache forwarded to the shared entry `c`.
            #[inline(always)]
            pub fn merge_into(&self, c: &mut Connection) {
                c.packets += self.packets;
                c.bytes += self.bytes;
                if self.last_ns > c.last_seen_ns {
                    c.last_seen_ns = self.last_ns;
                }
            }

            /// Adds what another CPU's slot forwarded of the same flow to this one's counts.
            #[inline(always)]
            pub fn absorb(&mut self, packets: u64, bytes: u64, last_ns: u64) {
                self.packets += packets;
                self.bytes += bytes;
                if last_ns > self.last_ns {
                    self.last_ns = last_ns;
                }
            }
        }
    };
}
slot_counts!(CachedFlow);
slot_counts!(CachedFlow6);

/// The flow cache slot (`flow_cache6`) of an IPv6 flow's `connections` key.
#[inline(always)]
pub const fn flow_cache_slot6(k: &FlowKey) -> u32 {
    let (s, d) = (&k.src.w, &k.dst.w);
    let saddr = s[0] ^ s[1].rotate_left(7) ^ s[2].rotate_left(13) ^ s[3].rotate_left(19);
    let daddr = d[0] ^ d[1].rotate_left(5) ^ d[2].rotate_left(17) ^ d[3].rotate_left(23);
    flow_cache_slot(saddr, daddr, k.sport, k.dport)
}

/// Value of `flow_cache6`: [`CachedFlow`] for an IPv6 flow, which it names by its whole
/// `connections` key. A slot whose key's protocol is 0 is empty.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct CachedFlow6 {
    pub key: FlowKey,
    /// The server's [`crate::Method`] when the slot was filled.
    pub method: u8,
    pub _pad: u8,
    /// The connection's NAT source port (nat), as on the wire.
    pub nat_port: u16,
    /// `Settings::flow_gen` when the full path wrote the slot.
    pub generation: u32,
    /// Server index.
    pub server: u32,
    pub _pad2: u32,
    /// The connection's NAT source address (nat).
    pub nat_addr: Addr,
    /// When the full path last brought the shared entry up to date.
    pub synced_ns: u64,
    /// The last packet's time.
    pub last_ns: u64,
    /// Packets and bytes forwarded from the cache, not yet in the shared entry.
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<CachedFlow6>() == 104);

impl FlowKey {
    /// Whether this is key `k`, compared word by word (a derived compare of 40 bytes can
    /// become a call of BPF's byte-looping memcmp).
    #[inline(always)]
    pub fn same(&self, k: &FlowKey) -> bool {
        self.dst.w == k.dst.w
            && self.src.w == k.src.w
            && self.sport == k.sport
            && self.dport == k.dport
            && self.proto == k.proto
    }
}
