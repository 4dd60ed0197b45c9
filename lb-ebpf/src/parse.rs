//! What lb_xdp reads from a packet: the IPv4 or IPv6 header checked and summarised (`Ip`),
//! IPv6's extension headers walked (`walk_ipv6`), the TCP/UDP ports and flags (`L4`), the
//! frame's whole length.

use aya_ebpf::{
    helpers::generated::bpf_xdp_get_buff_len, macros::map, maps::PerCpuArray, programs::XdpContext,
};
use lb_common::{csum, Addr, IPPROTO_TCP};

use crate::net::*;

/// Whether a packet of `len` bytes from the frame's start lies within the frame. The first
/// buffer's bounds answer for nearly every packet; only one that runs past them (a
/// multi-buffer frame, or a lying length) costs the helper call of [`frame_len`].
#[inline(always)]
pub fn within_frame(ctx: &XdpContext, len: usize) -> bool {
    len <= ctx.data_end() - ctx.data() || len <= frame_len(ctx)
}

/// The whole frame's length, fragments included (`data_end - data` covers the first buffer
/// only).
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    // SAFETY: plain helper call on the program's own context.
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) as usize }
}

/// The parsed headers of an IPv4 or IPv6 packet, offsets from the start of the frame.
pub struct Ip {
    /// Source and destination; an IPv4 packet's are IPv4-mapped (`Addr::v4_raw`), so
    /// `w[3]` is the IPv4 address as on the wire.
    pub saddr: Addr,
    pub daddr: Addr,
    /// The L4 protocol: IPv6's last next header, after the extension headers.
    pub proto: u8,
    pub v6: bool,
    /// Don't-fragment is set (always, for IPv6: routers never fragment it).
    pub df: bool,
    /// Offset of the L4 header (a u16, to keep lb_xdp's stack frame small: see `l4()`).
    pub l4_at: u16,
    /// The IP packet's length: IPv4's total length, IPv6's payload length plus its fixed
    /// header.
    pub tot_len: u16,
    /// The packet's bytes as counted: the IP packet with its Ethernet header (a frame's
    /// trailing padding is not counted). Checked to lie within the frame (`within_frame`).
    pub bytes: u32,
    /// The monotonic clock at arrival, coarse (a tick: `clock::now`): read once per packet.
    /// Every time the dataplane keeps (idle timeouts, the lease, the next-hop cache) is in
    /// seconds.
    pub now: u64,
    /// The packet's flow cache slot (in `flow_cache` for IPv4, `flow_cache6` for IPv6: a
    /// TCP or UDP packet's not to the NAT address; else [`NO_SLOT`]), found by `balance`
    /// or `balance6`, and whether it holds this flow (fresh or not): the full path takes
    /// its counts in and fills it without looking again.
    pub slot: u32,
    pub slot_holds: bool,
    /// [`FRAG_NONE`], [`FRAG_FIRST`] or [`FRAG_LATER`].
    pub frag: u8,
    /// A fragment's IP identification, as on the wire (IPv4's in the low 16 bits).
    pub frag_id: u32,
}

/// [`Ip::frag`] of an IPv4 packet whose flags and fragment offset are `frag_off` (as on the
/// wire).
#[inline(always)]
pub fn frag_kind(frag_off: u16) -> u8 {
    let f = u16::from_be(frag_off);
    if f & IP_OFFMASK != 0 {
        FRAG_LATER
    } else if f & IP_MF != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    }
}

/// [`Ip::frag`]: a whole packet.
pub const FRAG_NONE: u8 = 0;
/// [`Ip::frag`]: a datagram's first fragment (offset 0, more to come): it has the ports.
pub const FRAG_FIRST: u8 = 1;
/// [`Ip::frag`]: a fragment after the first: no L4 header, it follows its first
/// (`frag::follow`).
pub const FRAG_LATER: u8 = 2;

/// [`Ip::slot`] of a packet that has none.
pub const NO_SLOT: u32 = u32::MAX;

impl Ip {
    /// Offset of the L4 header. It is at most 14 + 60 for IPv4, [`L4_AT_MAX`] for IPv6
    /// (`walk_ipv6` stops there); the mask says so to the verifier,
    /// which knows nothing of a u16 read back from the stack but that it is below 65,536,
    /// too much to let a packet pointer move by.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        (self.l4_at & 0xff) as usize
    }

    /// Offset of the TCP or UDP checksum.
    #[inline(always)]
    pub fn l4_check_at(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            self.l4() + 16
        } else {
            self.l4() + 6
        }
    }
}

/// The headers of the packet being handled, in a per-CPU map rather than on lb_xdp's stack:
/// its frame and those of the BPF functions it calls must fit 512 bytes together.
pub struct Parsed {
    pub ip: Ip,
    pub l4: L4,
    /// Where a new connection goes: `to_service_xdp` decides, `forward_xdp` sends.
    pub next: Next,
}

/// A new connection's server and NAT source, handed from `to_service_xdp` to `forward_xdp`.
pub struct Next {
    pub server: u32,
    pub nat_addr: Addr,
    pub nat_port: u16,
}

#[map(name = "parsed")]
pub static PARSED: PerCpuArray<Parsed> = PerCpuArray::with_max_entries(1, 0);

/// The farthest an IPv6 packet's L4 header may start, extension headers included: a packet
/// of ours whose chain goes farther is dropped as malformed. 255 bytes from the frame's
/// start leave 201 bytes of extension headers, more than any chain seen in practice.
pub const L4_AT_MAX: usize = 0xff;
/// The most extension headers `walk_ipv6` steps over (the verifier needs a bound).
pub const IPV6_EXT_MAX: usize = 6;

/// Where the walk of an IPv6 packet's extension headers ended.
pub enum Walk {
    /// At the L4 header: its protocol and offset in the frame.
    L4(u8, usize),
    /// At a fragment header of a non-first fragment: no L4 header follows. The protocol of
    /// the datagram's payload (the fragment header's next header).
    NonFirstFragment(u8),
    /// Truncated, beyond the packet's length, or longer than the bound.
    Malformed,
}

/// Walks an IPv6 packet's extension headers (hop-by-hop, routing, destination options,
/// fragment, authentication) from the fixed header's next header `first`, within the
/// packet's `tot_len` bytes. A chain RFC 8200 forbids (hop-by-hop options anywhere but
/// first) or an authentication header too short to be one is malformed. A fragment
/// header's kind and identification go into `ip` (`frag`, `frag_id`).
#[inline(always)]
pub fn walk_ipv6(ctx: &XdpContext, first: u8, tot_len: usize, ip: &mut Ip) -> Walk {
    ip.frag = FRAG_NONE;
    let mut next = first;
    let mut off = ETH_HLEN + IPV6_HLEN;
    for _ in 0..IPV6_EXT_MAX {
        if !is_ipv6_ext(next) {
            return Walk::L4(next, off);
        }
        // Every extension header starts with its next header and length; a fragment
        // header's offset and identification follow. Each is at least 8 bytes long.
        let Some(h) = ptr_at_var::<[u8; 8]>(ctx, off) else {
            return Walk::Malformed;
        };
        // SAFETY: bounds checked by ptr_at.
        let h = unsafe { *h };
        let len = match next {
            NEXTHDR_FRAGMENT => {
                // The identification: the header's second word, as on the wire.
                ip.frag_id = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
                let offset = u16::from_be_bytes([h[2], h[3]]);
                if offset & IP6_OFFMASK != 0 {
                    ip.frag = FRAG_LATER;
                    return Walk::NonFirstFragment(h[0]);
                }
                if offset & IP6_MF != 0 {
                    ip.frag = FRAG_FIRST;
                }
                8
            }
            // At least its 12 fixed bytes (RFC 4302): a length field of 0 is no AH header.
            NEXTHDR_AUTH if h[1] == 0 => return Walk::Malformed,
            NEXTHDR_AUTH => (h[1] as usize + 2) * 4,
            _ => (h[1] as usize + 1) * 8,
        };
        next = h[0];
        // Hop-by-hop options come first or not at all (RFC 8200 section 4.1).
        if next == NEXTHDR_HOP {
            return Walk::Malformed;
        }
        off += len;
        if off > L4_AT_MAX || off - ETH_HLEN > tot_len {
            return Walk::Malformed;
        }
    }
    if is_ipv6_ext(next) {
        return Walk::Malformed;
    }
    Walk::L4(next, off)
}

/// [`walk_ipv6_xdp`]'s answer for a malformed chain.
pub const WALK_MALFORMED: u32 = u32::MAX;

/// [`walk_ipv6`] as a BPF function of its own (its loop's registers would otherwise grow
/// lb_xdp's frame), on the packet in `parsed`: the L4 protocol in the low byte and the L4
/// header's offset in the next ([`L4_AT_MAX`] for a fragment after the first, which has
/// none), or [`WALK_MALFORMED`]. The fragment kind and identification go into `parsed`'s `ip`.
#[inline(never)]
pub fn walk_ipv6_xdp(ctx: &XdpContext, first: u8, tot_len: u32) -> u32 {
    let Some(p) = PARSED.get_ptr_mut(0) else {
        return WALK_MALFORMED;
    };
    // SAFETY: a per-CPU slot; XDP runs to completion on its CPU.
    let ip = unsafe { &mut (*p).ip };
    match walk_ipv6(ctx, first, tot_len as usize, ip) {
        Walk::L4(proto, at) => proto as u32 | (at as u32) << 8,
        Walk::NonFirstFragment(proto) => proto as u32 | (L4_AT_MAX as u32) << 8,
        Walk::Malformed => WALK_MALFORMED,
    }
}

#[inline(always)]
fn is_ipv6_ext(next: u8) -> bool {
    matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_AUTH | NEXTHDR_DEST
    )
}

/// Ports and TCP flags of a TCP/UDP packet.
pub struct L4 {
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
}

#[inline(always)]
pub fn ipv4_header_ok(ctx: &XdpContext, ihl: usize) -> bool {
    // The usual header, without options, in one read.
    if ihl == IPV4_HLEN {
        let Some(w) = ptr_at::<[u16; 10]>(ctx, ETH_HLEN) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        let w = unsafe { &*w };
        return csum::ipv4_header(w) == 0;
    }
    let mut sum = 0u32;
    // At most 60 bytes: 30 words.
    for i in 0..30usize {
        if i * 2 >= ihl {
            break;
        }
        let Some(w) = ptr_at::<u16>(ctx, ETH_HLEN + i * 2) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        sum += unsafe { *w } as u32;
    }
    csum::fold(sum) == 0xffff
}

/// The packet's TCP or UDP header. A first fragment's UDP length is the whole datagram's,
/// more than the fragment holds: it is checked against the largest IP packet instead.
#[inline(always)]
pub fn parse_l4(ctx: &XdpContext, ip: &Ip) -> Option<L4> {
    let udp_limit = if ip.frag == FRAG_FIRST {
        u16::MAX
    } else {
        ip.tot_len
    };
    parse_l4_at(ctx, ip.proto, ip.l4(), ip.tot_len, udp_limit)
}

/// The TCP (`proto`) or UDP header at `at` in the frame, checked to fit the IP packet of
/// `tot_len` bytes (a UDP datagram: of `udp_limit` bytes).
#[inline(always)]
pub fn parse_l4_at(
    ctx: &XdpContext,
    proto: u8,
    at: usize,
    tot_len: u16,
    udp_limit: u16,
) -> Option<L4> {
    if proto == IPPROTO_TCP {
        let tcp = ptr_at::<TcpHdr>(ctx, at)?;
        // SAFETY: bounds checked by ptr_at.
        let tcp = unsafe { &*tcp };
        let doff = ((tcp.doff_res >> 4) as usize) * 4;
        if doff < 20 || at - ETH_HLEN + doff > tot_len as usize {
            return None;
        }
        Some(L4 {
            sport: tcp.source,
            dport: tcp.dest,
            flags: tcp.flags,
        })
    } else {
        let udp = ptr_at::<UdpHdr>(ctx, at)?;
        // SAFETY: bounds checked by ptr_at.
        let udp = unsafe { &*udp };
        let len = u16::from_be(udp.len) as usize;
        if len < 8 || at - ETH_HLEN + len > udp_limit as usize {
            return None;
        }
        Some(L4 {
            sport: udp.source,
            dport: udp.dest,
            flags: 0,
        })
    }
}
