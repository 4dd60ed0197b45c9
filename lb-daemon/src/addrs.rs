//! Addresses on interfaces, through netlink: listing them (to find which machine of the
//! config we are, and the ATM's network), and adding or removing the aliases the daemon owns
//! (VIPs labelled `<if>:cs0` or `lo:cs0`, the NAT gateway `<if>:natg`).

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};

/// An IPv4 address on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    pub index: u32,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    /// `eth0`, or `eth0:cs0` for an alias.
    pub label: String,
}

impl IfAddr {
    /// The interface name: the label up to its first colon.
    pub fn interface(&self) -> &str {
        self.label.split(':').next().unwrap_or(&self.label)
    }
}

/// Label suffixes that mark aliases as the daemon's own.
pub const VIP_LABEL: &str = "cs0";
pub const NAT_LABEL: &str = "natg";

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

    /// Every IPv4 address of every interface.
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

    /// Adds `addr/prefix` to interface `index` with `label` (`eth0:cs0`). Already there is
    /// not an error.
    pub async fn add(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
        label: &str,
    ) -> Result<(), rtnetlink::Error> {
        let mut req = self.handle.address().add(index, IpAddr::V4(addr), prefix);
        req.message_mut()
            .attributes
            .push(AddressAttribute::Label(label.to_string()));
        match req.execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            r => r,
        }
    }

    /// Removes `addr` from interface `index`; not there is not an error.
    pub async fn del(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), rtnetlink::Error> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(addr))
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

    /// Removes every alias whose label ends in `:suffix`; returns what it removed.
    pub async fn remove_labelled(&self, suffix: &str) -> Result<Vec<IfAddr>, rtnetlink::Error> {
        let tail = format!(":{suffix}");
        let mut removed = Vec::new();
        for a in self.addresses().await? {
            if a.label.ends_with(&tail) {
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
    for a in &msg.attributes {
        match a {
            AddressAttribute::Local(IpAddr::V4(v)) => addr = Some(*v),
            AddressAttribute::Address(IpAddr::V4(v)) if addr.is_none() => addr = Some(*v),
            AddressAttribute::Label(l) => label = Some(l.clone()),
            _ => {}
        }
    }
    Some(IfAddr {
        index: msg.header.index,
        addr: addr?,
        prefix: msg.header.prefix_len,
        label: label.unwrap_or_default(),
    })
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

/// Sends a gratuitous ARP (a request for `ip` from `ip`, broadcast) out of interface `index`
/// with source MAC `mac`: neighbours update their caches to reach `ip` at `mac`. This is
/// how a new primary takes a VIP over at once.
pub fn gratuitous_arp(index: u32, mac: [u8; 6], ip: Ipv4Addr) -> std::io::Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip.octets());
    // SAFETY: plain socket calls with checked results; the fd is closed on every path.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ARP.to_be();
        sll.sll_ifindex = index as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
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
