//! What lb_xdp reads from a packet: the IPv4 header checked and summarised (`Ip`), the
//! TCP/UDP ports and flags (`L4`), the frame's whole length.

use aya_ebpf::{
    helpers::generated::bpf_xdp_get_buff_len, macros::map, maps::PerCpuArray, programs::XdpContext,
};
use lb_common::{csum, IPPROTO_TCP};

use crate::net::*;

/// The whole frame's length, fragments included (`data_end - data` covers the first buffer
/// only).
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    // SAFETY: plain helper call on the program's own context.
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) as usize }
}

/// The parsed headers of an IPv4 packet, offsets from the start of the frame.
pub struct Ip {
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    /// Offset of the L4 header (a u16, to keep lb_xdp's stack frame small: see `l4()`).
    pub l4_at: u16,
    /// IPv4 total length.
    pub tot_len: u16,
    /// Don't-fragment is set.
    pub df: bool,
    /// The monotonic clock at arrival, coarse (a few ms): read once per packet. A precise
    /// read costs as much as a map lookup, and every time the dataplane keeps (idle timeouts,
    /// the lease, the next-hop cache) is in seconds.
    pub now: u64,
}

impl Ip {
    /// Offset of the L4 header. It is at most 14 + 60; the mask says so to the verifier,
    /// which knows nothing of a u16 read back from the stack but that it is below 65,536,
    /// too much to let a packet pointer move by.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        (self.l4_at & 0xff) as usize
    }
}

/// The headers of the packet being handled, in a per-CPU map rather than on lb_xdp's stack:
/// its frame and those of the BPF functions it calls must fit 512 bytes together.
pub struct Parsed {
    pub ip: Ip,
    pub l4: L4,
}

#[map(name = "parsed")]
pub static PARSED: PerCpuArray<Parsed> = PerCpuArray::with_max_entries(1, 0);

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

#[inline(always)]
pub fn parse_l4(ctx: &XdpContext, ip: &Ip) -> Option<L4> {
    if ip.proto == IPPROTO_TCP {
        let tcp = ptr_at::<TcpHdr>(ctx, ip.l4())?;
        // SAFETY: bounds checked by ptr_at.
        let tcp = unsafe { &*tcp };
        let doff = ((tcp.doff_res >> 4) as usize) * 4;
        if doff < 20 || ip.l4() - ETH_HLEN + doff > ip.tot_len as usize {
            return None;
        }
        Some(L4 {
            sport: tcp.source,
            dport: tcp.dest,
            flags: tcp.flags,
        })
    } else {
        let udp = ptr_at::<UdpHdr>(ctx, ip.l4())?;
        // SAFETY: bounds checked by ptr_at.
        let udp = unsafe { &*udp };
        let len = u16::from_be(udp.len) as usize;
        if len < 8 || ip.l4() - ETH_HLEN + len > ip.tot_len as usize {
            return None;
        }
        Some(L4 {
            sport: udp.source,
            dport: udp.dest,
            flags: 0,
        })
    }
}
