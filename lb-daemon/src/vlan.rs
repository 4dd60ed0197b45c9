//! Keeps VLAN tags in the frame, where lb_xdp can see them. A NIC that strips 802.1Q/802.1ad
//! tags on receive, or a veth whose peer leaves them out of the frame on transmit, hands XDP
//! an untagged frame (the tag travels as metadata XDP cannot read), which lb_xdp would balance
//! as native traffic. With the tag in the frame lb_xdp sees EtherType 0x8100 or 0x88a8 and
//! passes the frame to the stack. Nothing is restored on exit: see docs/DATAPLANE.md ("VLANs").

use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
};

use lb_common::xdp_link;
use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    nsid::{NsidAttribute, NsidMessage},
};
use netlink_sys::Socket;
use tracing::{info, warn};

/// The receive offloads that strip the tag into metadata (`ethtool -K DEV rxvlan off
/// rx-vlan-stag-hw-parse off`).
const RX_STRIP: [&str; 2] = ["rx-vlan-hw-parse", "rx-vlan-stag-hw-parse"];
/// The transmit offloads that carry the tag as metadata (`ethtool -K DEV txvlan off
/// tx-vlan-stag-hw-insert off`); on a veth the receiver gets it that way.
const TX_INSERT: [&str; 2] = ["tx-vlan-hw-insert", "tx-vlan-stag-hw-insert"];

/// Makes the tags of frames arriving on `interface` (of the calling thread's namespace) reach
/// XDP: rx VLAN offload off on a NIC, tx VLAN offload off on a veth's peer. Logs what it
/// changed, and warns with the command to run when it cannot.
pub fn expose_tags(interface: &str) {
    // A veth's own rx VLAN offload changes nothing: it never strips a tag, its peer decides
    // on transmit whether the tag is in the frame.
    match veth_peer(interface) {
        Ok(None) => expose_on_nic(interface),
        Ok(Some(peer)) => expose_on_peer(interface, &peer),
        Err(e) => warn!(
            "{interface}: cannot tell whether it is a veth ({e}); if it is, run `ethtool -K \
             PEER txvlan off tx-vlan-stag-hw-insert off` on its peer, or tagged frames arriving \
             on {interface} are balanced as untagged ones"
        ),
    }
}

fn expose_on_nic(interface: &str) {
    match turn_off(interface, &RX_STRIP) {
        Ok(t) => {
            if !t.off.is_empty() {
                info!(
                    "{interface}: rx VLAN offload ({}) turned off so that tagged frames reach \
                     XDP with their tag",
                    t.off.join(", ")
                );
            }
            if !t.fixed.is_empty() {
                warn!(
                    "{interface}: the driver strips VLAN tags on receive and cannot stop \
                     ({} fixed on): tagged frames arriving on {interface} are balanced as \
                     untagged ones",
                    t.fixed.join(", ")
                );
            }
        }
        Err(e) => warn!(
            "{interface}: cannot turn rx VLAN offload off ({e}): run `ethtool -K {interface} \
             rxvlan off rx-vlan-stag-hw-parse off`, or tagged frames arriving on {interface} are \
             balanced as untagged ones"
        ),
    }
}

/// A veth's other end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Peer {
    index: u32,
    /// Its name, when the kernel told it.
    name: Option<String>,
    /// Its namespace's id as seen from ours; `None` when it shares ours.
    nsid: Option<i32>,
}

/// Offloads to turn off on a veth's peer, and what to say about it.
struct Change {
    names: &'static [&'static str],
    /// `ethtool -K` arguments that do the same.
    ethtool: &'static str,
    /// What they are, e.g. "tx VLAN offload".
    what: &'static str,
    /// Why, e.g. "so that tagged frames reach XDP with their tag".
    why: &'static str,
    /// What happens if they stay on.
    otherwise: &'static str,
}

const TAGS: Change = Change {
    names: &TX_INSERT,
    ethtool: "txvlan off tx-vlan-stag-hw-insert off",
    what: "tx VLAN offload",
    why: "so that tagged frames reach XDP with their tag",
    otherwise: "tagged frames arriving here are balanced as untagged ones",
};

/// Receive offloads that merge segments into frames of up to 64 KiB before generic XDP
/// sees them.
const RX_MERGE: [&str; 3] = [
    "generic-receive-offload",
    "large-receive-offload",
    "rx-gro-hw",
];

const SEGMENTS: Change = Change {
    names: &[
        "tx-tcp-segmentation",
        "tx-tcp6-segmentation",
        "tx-generic-segmentation",
        "tx-udp-segmentation",
    ],
    ethtool: "tso off gso off tx-udp-segmentation off",
    what: "segmentation offload",
    why: "so that generic XDP gets frames of at most the MTU",
    otherwise: "merged frames whose checksums are left to the offload get NAT-rewritten \
                wrongly and are lost",
};

/// In generic (skb) mode, frames merged by GRO, LRO or a veth peer's segmentation offload
/// reach XDP as one frame of up to 64 KiB whose TCP checksum is left to the offload (only
/// the pseudo-header summed): NAT's incremental update of the ports would corrupt it. Native
/// XDP never sees such frames (drivers and veth turn these off for it). So for generic mode
/// this turns off the merging on `interface` and, on a veth, the segmentation offloads of
/// its peer, and logs what it changed.
pub fn no_merged_frames(interface: &str) {
    match turn_off(interface, &RX_MERGE) {
        Ok(t) if !t.off.is_empty() => info!(
            "{interface}: receive merging ({}) turned off so that generic XDP gets frames of \
             at most the MTU",
            t.off.join(", ")
        ),
        Ok(_) => {}
        Err(e) => warn!(
            "{interface}: cannot turn receive merging off ({e}): run `ethtool -K {interface} gro \
             off lro off`, or merged frames are lost to NAT in generic mode"
        ),
    }
    if let Ok(Some(peer)) = veth_peer(interface) {
        change_peer(interface, &peer, &SEGMENTS);
    }
}

fn expose_on_peer(interface: &str, peer: &Peer) {
    change_peer(interface, peer, &TAGS);
}

fn change_peer(interface: &str, peer: &Peer, change: &'static Change) {
    let name = peer.name.clone().unwrap_or_else(|| "PEER".to_string());
    let Some(nsid) = peer.nsid else {
        let result = turn_off(&name, change.names);
        report_peer(interface, &name, "this namespace", "", change, result);
        return;
    };
    let Some(ns) = find_namespace(nsid) else {
        report_peer(
            interface,
            &name,
            &format!("the namespace with id {nsid} as seen from this one"),
            "",
            change,
            Err(io::Error::other("its namespace was not found")),
        );
        return;
    };
    let file = ns.file;
    let target = name.clone();
    let index = peer.index;
    // setns(2) moves only the calling thread: a thread of its own, gone afterwards, so that
    // no other work ever runs in the peer's namespace.
    let result = std::thread::Builder::new()
        .name("vlan-peer".into())
        .spawn(move || -> io::Result<Turned> {
            // SAFETY: plain setns(2) on a namespace file we hold open.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let name = index_to_name(index).unwrap_or(target);
            turn_off(&name, change.names)
        })
        .and_then(|t| {
            t.join()
                .unwrap_or_else(|_| Err(io::Error::other("thread panicked")))
        });
    report_peer(
        interface,
        &name,
        &format!("namespace {}", ns.label),
        &ns.exec,
        change,
        result,
    );
}

/// Logs the outcome of turning `change`'s offloads off on `peer`, which lives in `place`;
/// `exec` is the prefix that runs a command there.
fn report_peer(
    interface: &str,
    peer: &str,
    place: &str,
    exec: &str,
    change: &Change,
    result: io::Result<Turned>,
) {
    let command = format!("{exec}ethtool -K {peer} {}", change.ethtool);
    let (what, why, otherwise) = (change.what, change.why, change.otherwise);
    match result {
        Ok(t) => {
            if !t.off.is_empty() {
                info!(
                    "{interface}: {what} ({}) turned off on its veth peer {peer} ({place}) \
                     {why}",
                    t.off.join(", ")
                );
            }
            if !t.fixed.is_empty() {
                warn!(
                    "{interface}: its veth peer {peer} ({place}) cannot turn {what} off ({} \
                     fixed on): {otherwise}",
                    t.fixed.join(", ")
                );
            }
        }
        Err(e) => warn!(
            "{interface}: cannot turn {what} off on its veth peer {peer} in {place} ({e}): run \
             `{command}` there, or {otherwise}"
        ),
    }
}

/// `interface`'s peer if it is a veth, `None` for anything else.
fn veth_peer(interface: &str) -> io::Result<Option<Peer>> {
    let index = name_to_index(interface)?;
    let socket = xdp_link::socket()?;
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    let RouteNetlinkMessage::NewLink(link) = request(&socket, RouteNetlinkMessage::GetLink(msg))?
    else {
        return Err(io::Error::other("unexpected reply to RTM_GETLINK"));
    };
    let mut peer = Peer {
        index: 0,
        name: None,
        nsid: None,
    };
    let mut veth = false;
    for a in &link.attributes {
        match a {
            LinkAttribute::LinkInfo(infos) => {
                veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            LinkAttribute::Link(i) => peer.index = *i,
            LinkAttribute::LinkNetNsId(id) => peer.nsid = Some(*id),
            _ => {}
        }
    }
    if !veth {
        return Ok(None);
    }
    if peer.index == 0 {
        return Err(io::Error::other("the kernel did not say which its peer is"));
    }
    // The name, for the log and for a command an operator can paste; asked through our own
    // socket (IFLA_TARGET_NETNSID) since it is needed even when the namespace is not found.
    let mut msg = LinkMessage::default();
    msg.header.index = peer.index;
    if let Some(id) = peer.nsid {
        msg.attributes.push(LinkAttribute::IfNetnsId(id));
    }
    if let Ok(RouteNetlinkMessage::NewLink(link)) =
        request(&socket, RouteNetlinkMessage::GetLink(msg))
    {
        peer.name = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
    }
    Ok(Some(peer))
}

/// A network namespace found by its id.
struct Namespace {
    file: File,
    /// How the log names it: an `ip netns` name, or the path of its file.
    label: String,
    /// The prefix that runs a command in it.
    exec: String,
}

/// The namespace that has id `nsid` in ours: among those `ip netns` names, then those of
/// running processes (init's first), each asked for its id (RTM_GETNSID).
fn find_namespace(nsid: i32) -> Option<Namespace> {
    let socket = xdp_link::socket().ok()?;
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let processes = pids
        .into_iter()
        .map(|p| PathBuf::from(format!("/proc/{p}/ns/net")));
    let mut seen = Vec::new();
    for path in named.chain(processes) {
        let Ok(file) = File::open(&path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else {
            continue;
        };
        let key = (meta.dev(), meta.ino());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        if namespace_id(&socket, &file) != Some(nsid) {
            continue;
        }
        let (label, exec) = match path.strip_prefix("/run/netns") {
            Ok(name) => {
                let name = name.display().to_string();
                (name.clone(), format!("ip netns exec {name} "))
            }
            Err(_) => (
                path.display().to_string(),
                format!("nsenter --net={} ", path.display()),
            ),
        };
        return Some(Namespace { file, label, exec });
    }
    None
}

/// The id the namespace open as `file` has in ours, if it has one.
fn namespace_id(socket: &Socket, file: &File) -> Option<i32> {
    let mut msg = NsidMessage::default();
    msg.attributes
        .push(NsidAttribute::Fd(file.as_raw_fd() as u32));
    match request(socket, RouteNetlinkMessage::GetNsId(msg)).ok()? {
        RouteNetlinkMessage::NewNsId(m) => m.attributes.iter().find_map(|a| match a {
            NsidAttribute::Id(id) if *id >= 0 => Some(*id),
            _ => None,
        }),
        _ => None,
    }
}

/// Sends one route netlink request and returns the kernel's answer.
fn request(socket: &Socket, msg: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
    let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
    msg.header.flags = NLM_F_REQUEST;
    msg.finalize();
    let mut buf = vec![0u8; msg.header.length as usize];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut reply = Vec::with_capacity(65536);
    socket.recv(&mut reply, 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|e| io::Error::other(format!("netlink reply: {e}")))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(m) => Ok(m),
        NetlinkPayload::Error(e) => Err(match e.code {
            Some(code) => io::Error::from_raw_os_error(-code.get()),
            None => io::Error::other("netlink: an ack instead of an answer"),
        }),
        other => Err(io::Error::other(format!(
            "unexpected netlink reply {other:?}"
        ))),
    }
}

fn name_to_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// The name of interface `index` in the calling thread's namespace.
fn index_to_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IFNAMSIZ];
    // SAFETY: buf has room for IFNAMSIZ bytes, as if_indextoname needs.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// What [`turn_off`] did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Turned {
    /// Features that were on and are off now.
    off: Vec<&'static str>,
    /// Features that are on and cannot be changed.
    fixed: Vec<&'static str>,
}

/// Turns off those of the features `names` that `interface` (of the calling thread's
/// namespace) has on, the way `ethtool -K` does (ETHTOOL_SFEATURES, by name).
fn turn_off(interface: &str, names: &[&'static str]) -> io::Result<Turned> {
    let dev = Ethtool::open(interface)?;
    let all = dev.feature_names()?;
    let before = dev.features(all.len())?;
    let mut turned = Turned::default();
    let mut clear = Vec::new();
    for (name, bit) in feature_bits(&all, names) {
        let f = before.get(bit);
        if !f.active {
            continue;
        }
        if f.available {
            clear.push((name, bit));
        } else {
            turned.fixed.push(name);
        }
    }
    if clear.is_empty() {
        return Ok(turned);
    }
    let bits: Vec<usize> = clear.iter().map(|(_, b)| *b).collect();
    dev.clear_features(&clear_request(all.len(), &bits))?;
    let after = dev.features(all.len())?;
    for (name, bit) in clear {
        if after.get(bit).active {
            turned.fixed.push(name);
        } else {
            turned.off.push(name);
        }
    }
    Ok(turned)
}

/// The index of each of `wanted` among the kernel's feature names (absent ones are left out:
/// an older kernel may not know 802.1ad offloads).
fn feature_bits(all: &[String], wanted: &[&'static str]) -> Vec<(&'static str, usize)> {
    wanted
        .iter()
        .filter_map(|w| Some((*w, all.iter().position(|n| n == w)?)))
        .collect()
}

/// The words after ETHTOOL_SFEATURES' header that clear `bits` and leave the rest alone:
/// one (valid, requested) pair per 32 features.
fn clear_request(count: usize, bits: &[usize]) -> Vec<u32> {
    let mut words = vec![0u32; 2 * count.div_ceil(32)];
    for b in bits {
        words[2 * (b / 32)] |= 1 << (b % 32);
    }
    words
}

/// The kernel's names of a string set: `count` NUL-padded 32-byte slots.
fn parse_strings(bytes: &[u8], count: usize) -> Vec<String> {
    bytes
        .chunks(ETH_GSTRING_LEN)
        .take(count)
        .map(|s| {
            let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        })
        .collect()
}

const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETHTOOL_SFEATURES: u32 = 0x3b;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;

/// struct ifreq with the `ifr_data` member of its union (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// An interface's features: `ethtool_get_features_block`s, four words per 32 features.
struct Features(Vec<u32>);

/// One feature's state.
struct Feature {
    /// It can be changed.
    available: bool,
    active: bool,
}

impl Features {
    fn get(&self, bit: usize) -> Feature {
        let block = &self.0[4 * (bit / 32)..4 * (bit / 32) + 4];
        let mask = 1 << (bit % 32);
        Feature {
            available: block[0] & mask != 0,
            active: block[2] & mask != 0,
        }
    }
}

/// The SIOCETHTOOL ioctl on one interface, through a socket of the calling thread's
/// namespace.
struct Ethtool {
    socket: OwnedFd,
    name: [libc::c_char; libc::IFNAMSIZ],
}

impl Ethtool {
    fn open(interface: &str) -> io::Result<Ethtool> {
        let bytes = interface.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ {
            return Err(io::Error::other(format!("{interface}: name too long")));
        }
        let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
        for (d, s) in name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd we own.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Ethtool { socket, name })
    }

    /// Runs the command whose structure starts `words` (its first word is the command).
    fn call(&self, words: &mut [u32]) -> io::Result<()> {
        let mut req = IfReq {
            name: self.name,
            data: words.as_mut_ptr().cast(),
            _pad: [0; 16],
        };
        // SAFETY: req names the interface and points at a buffer as large as the command's
        // structure, which the kernel reads and writes within its stated sizes.
        let rc = unsafe { libc::ioctl(self.socket.as_raw_fd(), libc::SIOCETHTOOL as _, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The names of the features, in bit order.
    fn feature_names(&self) -> io::Result<Vec<String>> {
        // struct ethtool_sset_info: cmd, reserved, u64 sset_mask, then one u32 per set asked.
        let mut info = [ETHTOOL_GSSET_INFO, 0, 0, 0, 0];
        let mask = 1u64 << ETH_SS_FEATURES;
        info[2] = mask as u32;
        info[3] = (mask >> 32) as u32;
        if cfg!(target_endian = "big") {
            info.swap(2, 3);
        }
        self.call(&mut info)?;
        let count = info[4] as usize;
        // struct ethtool_gstrings: cmd, string_set, len, then the strings.
        let mut strings = vec![0u32; 3 + count * ETH_GSTRING_LEN / 4];
        strings[..3].copy_from_slice(&[ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count as u32]);
        self.call(&mut strings)?;
        let bytes: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        Ok(parse_strings(&bytes, count))
    }

    /// The state of `count` features.
    fn features(&self, count: usize) -> io::Result<Features> {
        let blocks = count.div_ceil(32);
        let mut words = vec![0u32; 2 + 4 * blocks];
        words[..2].copy_from_slice(&[ETHTOOL_GFEATURES, blocks as u32]);
        self.call(&mut words)?;
        Ok(Features(words.split_off(2)))
    }

    /// ETHTOOL_SFEATURES with the (valid, requested) pairs `request`.
    fn clear_features(&self, request: &[u32]) -> io::Result<()> {
        let mut words = vec![ETHTOOL_SFEATURES, (request.len() / 2) as u32];
        words.extend_from_slice(request);
        self.call(&mut words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_names_are_found_by_position() {
        let all: Vec<String> = ["tx-scatter-gather", "rx-vlan-hw-parse", "tx-vlan-hw-insert"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            feature_bits(&all, &["tx-vlan-hw-insert", "tx-vlan-stag-hw-insert"]),
            vec![("tx-vlan-hw-insert", 2)]
        );
    }

    #[test]
    fn a_clear_request_marks_only_its_bits_valid_and_requests_them_off() {
        // Bits 8 and 40 of 45 features: two blocks of (valid, requested).
        assert_eq!(clear_request(45, &[8, 40]), vec![1 << 8, 0, 1 << 8, 0]);
        assert_eq!(clear_request(32, &[31]), vec![1 << 31, 0]);
    }

    #[test]
    fn strings_are_nul_padded_slots() {
        let mut bytes = vec![0u8; 3 * ETH_GSTRING_LEN];
        bytes[..3].copy_from_slice(b"abc");
        bytes[ETH_GSTRING_LEN..ETH_GSTRING_LEN + 32].copy_from_slice(&[b'x'; 32]);
        assert_eq!(
            parse_strings(&bytes, 2),
            vec!["abc".to_string(), "x".repeat(32)]
        );
    }

    #[test]
    fn features_read_available_and_active_from_their_block() {
        // Block 1 (features 32-63): feature 33 available and active, 34 active only.
        let f = Features(vec![0, 0, 0, 0, 0b010, 0, 0b110, 0]);
        assert!(f.get(33).available && f.get(33).active);
        assert!(!f.get(34).available && f.get(34).active);
        assert!(!f.get(1).active);
    }
}
