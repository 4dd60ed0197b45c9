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
            Some(code) => Err(std::io::Error::from_raw_os_error(-code.get())),
        },
        other => Err(std::io::Error::other(std::format!(
            "unexpected netlink reply {other:?}"
        ))),
    }
}
