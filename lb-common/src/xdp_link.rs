//! Setting an interface's XDP program with RTM_SETLINK. Unlike a BPF link, an attachment
//! made this way outlives the process that made it, until it is cleared or the interface
//! goes: the daemon relies on that (see `Settings::lease_ns`), and the labs use it for
//! their switch ports.

use std::os::fd::RawFd;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// XDP in the generic (skb) path.
pub const SKB_MODE: u32 = 1 << 1;
/// XDP in the driver (native).
pub const DRV_MODE: u32 = 1 << 2;

/// A route netlink socket of the calling thread's network namespace (interface indices are
/// per namespace: keep the socket to clear the program later in the same one).
pub fn socket() -> std::io::Result<Socket> {
    let mut s = Socket::new(NETLINK_ROUTE)?;
    // The kernel says why it refuses an attachment ("Peer MTU is too large to set XDP")
    // only in an extended ack; capped, so the request is not echoed back with it.
    s.set_ext_ack(true)?;
    s.set_cap_ack(true)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    Ok(s)
}

/// Sets (`Some(fd)`) or clears (`None`) the XDP program of interface `ifindex`.
pub fn set(socket: &Socket, ifindex: u32, fd: Option<RawFd>, flags: u32) -> std::io::Result<()> {
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    link.attributes.push(LinkAttribute::Xdp(std::vec![
        LinkXdp::Fd(fd.unwrap_or(-1)),
        LinkXdp::Flags(flags),
    ]));
    let mut msg = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::SetLink(link)),
    );
    msg.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    msg.finalize();
    let mut buf = std::vec![0u8; msg.header.length as usize];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut reply = std::vec::Vec::with_capacity(4096);
    socket.recv(&mut reply, 0)?;
    let ack = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|e| std::io::Error::other(std::format!("netlink reply: {e}")))?;
    match ack.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => {
                let errno = std::io::Error::from_raw_os_error(-code.get());
                Err(match extack_message(&reply) {
                    Some(why) => std::io::Error::new(errno.kind(), std::format!("{errno}: {why}")),
                    None => errno,
                })
            }
        },
        other => Err(std::io::Error::other(std::format!(
            "unexpected netlink reply {other:?}"
        ))),
    }
}

/// The kernel's reason in an error ack's extended-ack attributes (NLMSGERR_ATTR_MSG), if it
/// gave one. Layout: the ack's header (16 bytes), the error code (4), the request's header
/// (16; its payload is not echoed on a socket with NETLINK_CAP_ACK), then attributes when the
/// ack's flags have NLM_F_ACK_TLVS.
fn extack_message(reply: &[u8]) -> Option<std::string::String> {
    const NLM_F_ACK_TLVS: u16 = 0x200;
    const NLMSGERR_ATTR_MSG: u16 = 1;
    let flags = u16::from_ne_bytes(reply.get(6..8)?.try_into().ok()?);
    let len = u32::from_ne_bytes(reply.get(0..4)?.try_into().ok()?) as usize;
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let mut at = 16 + 4 + 16;
    let end = len.min(reply.len());
    while at + 4 <= end {
        let nla_len = u16::from_ne_bytes(reply[at..at + 2].try_into().ok()?) as usize;
        let nla_type = u16::from_ne_bytes(reply[at + 2..at + 4].try_into().ok()?) & 0x3fff;
        if nla_len < 4 || at + nla_len > end {
            return None;
        }
        if nla_type == NLMSGERR_ATTR_MSG {
            let text = &reply[at + 4..at + nla_len];
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            return Some(std::string::String::from_utf8_lossy(text).into_owned());
        }
        at += nla_len.next_multiple_of(4);
    }
    None
}
