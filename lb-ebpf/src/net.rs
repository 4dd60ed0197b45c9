//! Header layouts and bounds-checked access to packet memory.

use aya_ebpf::programs::XdpContext;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const ICMP_HLEN: usize = 8;
/// 0x0800 as it sits in the frame.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// 802.1Q and 802.1ad tags (0x8100, 0x88a8) as they sit in the frame.
pub const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();
pub const ETH_P_8021AD_BE: u16 = 0x88a8u16.to_be();
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFMASK: u16 = 0x1fff;
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

pub const AF_INET: u8 = 2;
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

/// Zeroes a byte array with volatile stores, for the same reason as [`zero_words`].
#[inline(always)]
pub fn zero_bytes<const N: usize>(p: &mut [u8; N]) {
    for b in p.iter_mut() {
        // SAFETY: a valid, exclusive reference.
        unsafe { core::ptr::write_volatile(b, 0) };
    }
}
