//! Addresses on interfaces, through netlink: listing them (to find which machine of the
//! config we are, and the ATM's network), and adding or removing the aliases the daemon owns
//! (VIPs labelled `<if>:cs0` or `lo:cs0`, the NAT gateway `<if>:natg`).
//!
//! IPv6 addresses carry no labels. Every address the daemon adds, of either family, also
//! carries an address protocol (IFA_PROTO, Linux 5.18 on) of its own, [`Mark::proto`]: that
//! is how a restarted daemon finds its stale IPv6 aliases, as it finds the IPv4 ones by
//! label. IPv6 aliases are added with `nodad` (duplicate address detection would hold a
//! VIP unusable for a second or more after a takeover) and deprecated (see [`Net::add`]).

use std::net::IpAddr;

use futures_util::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressProtocol, CacheInfo,
};

/// An address on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix: u8,
    /// `eth0`, or `eth0:cs0` for an IPv4 alias; empty for IPv6 (see [`Net::addresses`]).
    pub label: String,
    /// IFA_PROTO: who added the address (0 when unset).
    pub proto: u8,
}

impl IfAddr {
    /// The interface name: the label up to its first colon.
    pub fn interface(&self) -> &str {
        self.label.split(':').next().unwrap_or(&self.label)
    }

    /// Whether the daemon added this address as `mark`.
    pub fn is(&self, mark: Mark) -> bool {
        self.proto == mark.proto() || self.label.ends_with(&format!(":{}", mark.suffix()))
    }
}

/// Label suffixes that mark IPv4 aliases as the daemon's own.
pub const VIP_LABEL: &str = "cs0";
pub const NAT_LABEL: &str = "natg";

/// What an address the daemon adds is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// A VIP (on the ATM's interface, or `lo` on a node).
    Vip,
    /// The NAT gateway or a pool address.
    Nat,
}

impl Mark {
    /// The IPv4 label suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            Mark::Vip => VIP_LABEL,
            Mark::Nat => NAT_LABEL,
        }
    }

    /// The IFA_PROTO value. The kernel's own are 0 to 3; these are lb's ("cs" and "ng").
    pub fn proto(self) -> u8 {
        match self {
            Mark::Vip => 0xc5,
            Mark::Nat => 0x9a,
        }
    }
}

/// The prefix length of a single address of `a`'s family.
pub fn host_prefix(a: IpAddr) -> u8 {
    if a.is_ipv6() { 128 } else { 32 }
}

pub struct Net {
    handle: rtnetlink::Handle,
}

impl Net {
    /// A netlink connection in the calling process's network namespace (needs a tokio runtime).
    pub fn new() -> std::io::Result<Net> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Net { handle })
    }

    /// Every address of every interface. An IPv6 address's label is filled in with its
    /// interface's name, which netlink does not give.
    pub async fn addresses(&self) -> Result<Vec<IfAddr>, rtnetlink::Error> {
        let mut out = Vec::new();
        let mut stream = self.handle.address().get().execute();
        while let Some(msg) = stream.try_next().await? {
            if let Some(a) = to_ifaddr(&msg) {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Adds `addr/prefix` to interface `index` (named `interface`) as the daemon's `mark`:
    /// an IPv4 address labelled `<interface>:<suffix>`, an IPv6 one without duplicate address
    /// detection. Already there is not an error.
    pub async fn add(
        &self,
        index: u32,
        interface: &str,
        addr: IpAddr,
        prefix: u8,
        mark: Mark,
    ) -> Result<(), rtnetlink::Error> {
        let mut req = self.handle.address().add(index, addr, prefix);
        let attrs = &mut req.message_mut().attributes;
        attrs.push(AddressAttribute::Protocol(AddressProtocol::Other(
            mark.proto(),
        )));
        if addr.is_ipv6() {
            attrs.push(AddressAttribute::Flags(AddressFlags::Nodad));
            // Deprecated from the start (preferred lifetime 0, valid for ever): it takes
            // traffic and answers on its connections, but is never chosen as the source of
            // the machine's own. A /128 matches more of a neighbour's address than the
            // interface's /64 does (RFC 6724 rule 8, capped at the prefix length), so the
            // stack would otherwise send health checks from the VIP, whose answers the
            // servers keep (they hold it too).
            let mut life = CacheInfo::default();
            life.ifa_preferred = 0;
            life.ifa_valid = u32::MAX;
            attrs.push(AddressAttribute::CacheInfo(life));
        } else {
            attrs.push(AddressAttribute::Label(format!(
                "{interface}:{}",
                mark.suffix()
            )));
        }
        match req.execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            r => r,
        }
    }

    /// Removes `addr` from interface `index`; not there is not an error.
    pub async fn del(&self, index: u32, addr: IpAddr, prefix: u8) -> Result<(), rtnetlink::Error> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr)
            .execute();
        while let Some(msg) = stream.try_next().await? {
            if msg.header.prefix_len == prefix {
                match self.handle.address().del(msg).execute().await {
                    Err(rtnetlink::Error::NetlinkError(e))
                        if e.raw_code() == -libc::EADDRNOTAVAIL => {}
                    r => r?,
                }
            }
        }
        Ok(())
    }

    /// Removes every address the daemon added as `mark` (by label or address protocol);
    /// returns what it removed.
    pub async fn remove_marked(&self, mark: Mark) -> Result<Vec<IfAddr>, rtnetlink::Error> {
        let mut removed = Vec::new();
        for a in self.addresses().await? {
            if a.is(mark) {
                self.del(a.index, a.addr, a.prefix).await?;
                removed.push(a);
            }
        }
        Ok(removed)
    }
}

fn to_ifaddr(msg: &AddressMessage) -> Option<IfAddr> {
    let mut addr = None;
    let mut label = None;
    let mut proto = 0;
    for a in &msg.attributes {
        match a {
            AddressAttribute::Local(v) => addr = Some(*v),
            AddressAttribute::Address(v) if addr.is_none() => addr = Some(*v),
            AddressAttribute::Label(l) => label = Some(l.clone()),
            AddressAttribute::Protocol(p) => proto = u8::from(*p),
            _ => {}
        }
    }
    let index = msg.header.index;
    let label = label.unwrap_or_else(|| interface_name(index).unwrap_or_default());
    Some(IfAddr {
        index,
        addr: addr?,
        prefix: msg.header.prefix_len,
        label,
        proto,
    })
}

/// The name of interface `index` in the calling thread's namespace.
fn interface_name(index: u32) -> Option<String> {
    let name = nix::net::if_::if_indextoname(index).ok()?;
    Some(name.to_string_lossy().into_owned())
}

/// The interface index of `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

impl Net {
    /// The MAC address of interface `index`.
    pub async fn mac(&self, index: u32) -> Result<Option<[u8; 6]>, rtnetlink::Error> {
        use netlink_packet_route::link::LinkAttribute;
        let mut stream = self.handle.link().get().match_index(index).execute();
        while let Some(msg) = stream.try_next().await? {
            for a in &msg.attributes {
                if let LinkAttribute::Address(bytes) = a
                    && let Ok(mac) = <[u8; 6]>::try_from(bytes.as_slice())
                {
                    return Ok(Some(mac));
                }
            }
        }
        Ok(None)
    }
}

/// Tells the link that `ip` is now at `mac`, out of interface `index`: a gratuitous ARP for
/// IPv4, an unsolicited neighbour advertisement for IPv6 (RFC 4861 7.2.6). Neighbours
/// update their caches at once: this is how a new primary takes a VIP over.
pub fn announce(index: u32, mac: [u8; 6], ip: IpAddr) -> std::io::Result<()> {
    match ip {
        IpAddr::V4(ip) => gratuitous_arp(index, mac, ip),
        IpAddr::V6(ip) => unsolicited_na(index, mac, ip),
    }
}

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

/// A gratuitous ARP: a request for `ip` from `ip`, broadcast.
fn gratuitous_arp(index: u32, mac: [u8; 6], ip: std::net::Ipv4Addr) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip.octets());
    send_frame(index, ETH_P_ARP, &frame)
}

/// An unsolicited neighbour advertisement for `ip` at `mac` to all nodes (ff02::1), with
/// the override flag and the target link-layer address option.
fn unsolicited_na(index: u32, mac: [u8; 6], ip: std::net::Ipv6Addr) -> std::io::Result<()> {
    const ALL_NODES: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[136, 0, 0, 0]); // neighbour advertisement, checksum later
    icmp.extend_from_slice(&[0x20, 0, 0, 0]); // override
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]); // target link-layer address, 8 bytes
    icmp.extend_from_slice(&mac);
    let mut sum = 0u32;
    let mut add = |bytes: &[u8]| {
        for w in bytes.chunks(2) {
            sum += u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32;
        }
    };
    add(&ip.octets());
    add(&ALL_NODES.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(&icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut frame = Vec::with_capacity(14 + 40 + icmp.len());
    frame.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[58, 255]); // ICMPv6, hop limit 255 as NDP requires
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&ALL_NODES.octets());
    frame.extend_from_slice(&icmp);
    send_frame(index, ETH_P_IPV6, &frame)
}

/// Sends a whole Ethernet frame (its destination MAC first) of `proto` out of `index`.
fn send_frame(index: u32, proto: u16, frame: &[u8]) -> std::io::Result<()> {
    // SAFETY: plain socket calls with checked results; the fd is closed on every path.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto.to_be();
        sll.sll_ifindex = index as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        let r = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            return Err(err);
        }
    }
    Ok(())
}
