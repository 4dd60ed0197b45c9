//! Header layouts and bounds-checked access to packet memory.

use aya_ebpf::programs::XdpContext;
use lb_common::Addr;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const ICMP_HLEN: usize = 8;
pub const IPV6_HLEN: usize = 40;
/// 0x0800 as it sits in the frame.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// 0x86dd as it sits in the frame.
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// 802.1Q and 802.1ad tags (0x8100, 0x88a8) as they sit in the frame.
pub const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();
pub const ETH_P_8021AD_BE: u16 = 0x88a8u16.to_be();
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFMASK: u16 = 0x1fff;
/// The more-fragments bit and the fragment offset as they sit in the frame: zero in a
/// packet that is no fragment.
pub const IP_FRAGMENT_BE: u16 = (IP_MF | IP_OFFMASK).to_be();
/// The fragment offset as it sits in the frame: non-zero in a fragment after the first.
pub const IP_OFFMASK_BE: u16 = IP_OFFMASK.to_be();
/// The don't-fragment bit as it sits in the frame.
pub const IP_DF_BE: u16 = 0x4000u16.to_be();
/// 0x0806 as it sits in the frame.
pub const ETH_P_ARP_BE: u16 = 0x0806u16.to_be();
/// ARP operation 1, request, as it sits in the frame.
pub const ARPOP_REQUEST_BE: u16 = 1u16.to_be();

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETERPROB: u8 = 12;

/// IPv6 extension headers lb_xdp walks to find the L4 header (RFC 8200 section 4).
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_DEST: u8 = 60;
/// The fragment header's offset field (in 8-byte units, shifted left by 3), as read in host
/// order: zero in a first fragment.
pub const IP6_OFFMASK: u16 = 0xfff8;
/// The fragment header's more-fragments flag (host order of the offset field).
pub const IP6_MF: u16 = 0x0001;

/// ICMPv6 types: the errors steered to a connection's server, and neighbour discovery's
/// (router solicitation 133 to redirect 137), which always passes.
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
pub const ICMPV6_TIME_EXCEED: u8 = 3;
pub const ICMPV6_PARAMPROB: u8 = 4;
pub const NDISC_ROUTER_SOLICITATION: u8 = 133;
pub const NDISC_NEIGHBOUR_SOLICITATION: u8 = 135;
pub const NDISC_REDIRECT: u8 = 137;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const LOOPBACK_IFINDEX: u32 = 1;
pub const FIB_SUCCESS: i64 = 0;
pub const FIB_NO_NEIGH: i64 = 7;
pub const FIB_FRAG_NEEDED: i64 = 8;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub proto: u16,
}

/// IPv4 header without options; multi-byte fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// IPv6 fixed header; multi-byte fields in network byte order. `vtcfl` holds version (4
/// bits), traffic class (8) and flow label (20).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub vtcfl: u32,
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

/// An ARP packet for IPv4 over Ethernet (RFC 826); multi-byte fields in network byte order.
#[repr(C)]
pub struct ArpHdr {
    pub htype: u16,
    pub ptype: u16,
    pub hlen: u8,
    pub plen: u8,
    pub oper: u16,
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    /// The address asked about.
    pub tpa: [u8; 4],
}

#[repr(C)]
pub struct TcpHdr {
    pub source: u16,
    pub dest: u16,
    pub seq: u32,
    pub ack_seq: u32,
    pub doff_res: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

#[repr(C)]
pub struct UdpHdr {
    pub source: u16,
    pub dest: u16,
    pub len: u16,
    pub check: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    pub rest: u32,
}

/// A pointer to a `T` at `off` bytes into the packet, if all of it lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// [`ptr_at`] at an offset worked out from the packet (behind IPv6 extension headers),
/// which is at most 255. The mask says so to the verifier, which otherwise loses track of
/// which pointer was checked against the packet's end; it is applied to a volatile read, or
/// LLVM, which knows the bound, drops it.
#[inline(always)]
pub fn ptr_at_var<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    // SAFETY: reading a local.
    let off = unsafe { core::ptr::read_volatile(&off) } & 0xff;
    ptr_at::<T>(ctx, off)
}

/// Like [`ptr_at`], for writing.
#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, off).map(|p| p as *mut T)
}

/// Zeroes `*p` word by word. The stores are volatile so that LLVM cannot fold them back
/// into a call to BPF's byte-looping memset (which `*p = zeroed()` becomes).
#[inline(always)]
pub fn zero_words<T>(p: &mut T) {
    const {
        assert!(core::mem::size_of::<T>() % 4 == 0 && core::mem::align_of::<T>() >= 4);
    }
    let w = p as *mut T as *mut u32;
    for i in 0..core::mem::size_of::<T>() / 4 {
        // SAFETY: in bounds and aligned, by the assertion above.
        unsafe { w.add(i).write_volatile(0) };
    }
}

/// Zeroes a u64 with one volatile store: plain stores of zero to neighbouring fields are
/// merged into a call to BPF's byte-looping memset.
#[inline(always)]
pub fn zero_u64(p: &mut u64) {
    // SAFETY: a valid, aligned u64.
    unsafe { (p as *mut u64).write_volatile(0) };
}

/// Copies a 16-byte address word by word, with volatile reads: a plain copy becomes a call
/// to BPF's byte-looping memmove. `src` may point into the packet.
#[inline(always)]
pub fn copy_addr(dst: &mut Addr, src: *const [u32; 4]) {
    copy_words(&mut dst.w, src);
}

/// [`copy_addr`] into four words anywhere (a header in the packet).
#[inline(always)]
pub fn copy_words(dst: &mut [u32; 4], src: *const [u32; 4]) {
    let src = src as *const u32;
    for (i, d) in dst.iter_mut().enumerate() {
        // SAFETY: `src` points to four readable words.
        *d = unsafe { core::ptr::read_volatile(src.add(i)) };
    }
}
