//! Raw Ethernet frames in a lab: a namespace interface's MAC address, and a packet socket
//! that sends hand-made frames (tagged, spoofed, malformed) out of it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::{fixture::frames::Mac, lab::Lab};

/// The MAC address of `dev` in namespace `ns`.
pub fn mac_of(lab: &Lab, ns: &str, dev: &str) -> Mac {
    let text = lab
        .ns(ns)
        .exec_ok(&["cat", &format!("/sys/class/net/{dev}/address")]);
    let mut m = [0u8; 6];
    for (b, h) in m.iter_mut().zip(text.trim().split(':')) {
        *b = u8::from_str_radix(h, 16).unwrap();
    }
    m
}

/// A packet socket that sends whole frames out of one interface of a namespace (made in
/// the namespace, it stays there whichever thread then uses it).
pub struct FrameSender {
    fd: OwnedFd,
    ifindex: u32,
}

impl FrameSender {
    pub fn open(lab: &Lab, ns: &str, dev: &str) -> FrameSender {
        let ifindex = lab.ns(ns).ifindex(dev);
        let _in = lab.ns(ns).enter();
        // SAFETY: plain socket(2); protocol 0: it only sends.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        FrameSender { fd, ifindex }
    }

    /// Sends `frame` (its destination MAC first) as it is; panics if the kernel takes less.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid start.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = self.ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and to are valid for the sizes given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            sent,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }
}
