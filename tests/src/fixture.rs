//! Packet fixtures as data: a description, an input frame, the expected XDP action and the
//! expected output frame, run through BPF_PROG_TEST_RUN. On a mismatch both frames are printed
//! decoded. Checksums of every output frame are verified by etherparse, independently of the
//! dataplane's own arithmetic.

use std::fmt::Write;

use etherparse::{
    Ipv4Header, Ipv4Slice, Ipv6Slice, NetSlice, PacketBuilder, SlicedPacket, TcpHeaderSlice,
    TransportSlice,
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub fn action_name(a: u32) -> &'static str {
    match a {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "XDP_?",
    }
}

/// A deterministic generator (xorshift), so a failure of a randomised test can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// One packet through the program and what must come out.
pub struct Fixture {
    pub description: String,
    pub input: Vec<u8>,
    pub action: u32,
    /// The frame the program must leave; `None` means untouched (the input itself).
    pub output: Option<Vec<u8>>,
    /// Interface index the frame arrives on; `None`: the runner's default.
    pub ingress: Option<u32>,
}

impl Fixture {
    pub fn new(description: impl Into<String>, input: Vec<u8>, action: u32) -> Fixture {
        Fixture {
            description: description.into(),
            input,
            action,
            output: None,
            ingress: None,
        }
    }

    /// The frame arrives on interface `ifindex`.
    pub fn on(mut self, ifindex: u32) -> Fixture {
        self.ingress = Some(ifindex);
        self
    }

    pub fn output(mut self, frame: Vec<u8>) -> Fixture {
        self.output = Some(frame);
        self
    }

    /// Compares what the program did with what the fixture expects; on a mismatch the error
    /// holds both frames decoded.
    pub fn check(&self, action: u32, out: &[u8]) -> Result<(), String> {
        let want = self.output.as_deref().unwrap_or(&self.input);
        let mut problems = Vec::new();
        if action != self.action {
            problems.push(format!(
                "action {} (want {})",
                action_name(action),
                action_name(self.action)
            ));
        }
        // A dropped frame's bytes do not matter.
        if self.action != XDP_DROP && out != want {
            problems.push("output frame differs".to_string());
        }
        if (self.action == XDP_TX || self.action == XDP_REDIRECT)
            && let Err(e) = verify_checksums(out)
        {
            problems.push(format!("checksum: {e}"));
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(format!(
            "fixture \"{}\": {}\n  input:\n{}\n  expected:\n{}\n  got:\n{}",
            self.description,
            problems.join("; "),
            indent(&decode(&self.input)),
            indent(&decode(want)),
            indent(&decode(out)),
        ))
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

/// A human-readable decoding of an Ethernet frame (with an IPIP inner packet if there is
/// one) followed by a hex dump.
pub fn decode(frame: &[u8]) -> String {
    let mut s = String::new();
    match SlicedPacket::from_ethernet(frame) {
        Err(e) => {
            let _ = writeln!(s, "undecodable: {e}");
        }
        Ok(p) => {
            if let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link {
                let _ = write!(
                    s,
                    "eth {} -> {} type {:#06x}",
                    mac(&eth.source()),
                    mac(&eth.destination()),
                    eth.ether_type().0
                );
            }
            match &p.net {
                Some(NetSlice::Ipv4(ip)) => {
                    s.push_str(" | ");
                    describe_ipv4(&mut s, ip);
                    if ip.header().protocol() == etherparse::IpNumber::IPV4
                        && let Ok(inner) = Ipv4Slice::from_slice(ip.payload().payload)
                    {
                        s.push_str("\n  inner ");
                        describe_ipv4(&mut s, &inner);
                    }
                }
                Some(NetSlice::Arp(arp)) => {
                    let ip = |a: &[u8]| match <[u8; 4]>::try_from(a) {
                        Ok(o) => std::net::Ipv4Addr::from(o).to_string(),
                        Err(_) => format!("{a:02x?}"),
                    };
                    let _ = write!(
                        s,
                        " | arp op {} {} asks for {}",
                        arp.operation().0,
                        ip(arp.sender_protocol_addr()),
                        ip(arp.target_protocol_addr())
                    );
                }
                Some(NetSlice::Ipv6(ip)) => {
                    s.push_str(" | ");
                    describe_ipv6(&mut s, ip);
                    if ip.payload().ip_number == etherparse::IpNumber::IPV6
                        && let Ok(inner) = Ipv6Slice::from_slice(ip.payload().payload)
                    {
                        s.push_str("\n  inner ");
                        describe_ipv6(&mut s, &inner);
                        if let Ok(t) = TcpHeaderSlice::from_slice(inner.payload().payload) {
                            describe_tcp(&mut s, &t);
                        }
                    }
                }
                None => {}
            }
            describe_transport(&mut s, &p.transport);
            s.push('\n');
        }
    }
    for chunk in frame.chunks(16) {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let _ = writeln!(s, "{}", hex.join(" "));
    }
    s
}

fn describe_ipv4(s: &mut String, ip: &Ipv4Slice) {
    let h = ip.header();
    let _ = write!(
        s,
        "ipv4 {} -> {} proto {} ttl {} id {} len {} frag {} csum {:#06x}",
        h.source_addr(),
        h.destination_addr(),
        h.protocol().0,
        h.ttl(),
        h.identification(),
        h.total_len(),
        h.fragments_offset().value(),
        h.header_checksum()
    );
    if ip.header().protocol() == etherparse::IpNumber::IPV4 {
        return;
    }
    let payload = ip.payload().payload;
    if h.protocol() == etherparse::IpNumber::TCP
        && let Ok(t) = TcpHeaderSlice::from_slice(payload)
    {
        describe_tcp(s, &t);
    }
}

fn describe_ipv6(s: &mut String, ip: &Ipv6Slice) {
    let h = ip.header();
    let _ = write!(
        s,
        "ipv6 {} -> {} next {} (after extensions: {}) hop {} len {} class {} flow {}",
        h.source_addr(),
        h.destination_addr(),
        h.next_header().0,
        ip.payload().ip_number.0,
        h.hop_limit(),
        h.payload_length(),
        h.traffic_class(),
        h.flow_label().value()
    );
}

fn describe_tcp(s: &mut String, t: &TcpHeaderSlice) {
    let _ = write!(
        s,
        " | tcp {} -> {} seq {} flags {}{}{}{} csum {:#06x}",
        t.source_port(),
        t.destination_port(),
        t.sequence_number(),
        if t.syn() { "S" } else { "" },
        if t.ack() { "A" } else { "" },
        if t.fin() { "F" } else { "" },
        if t.rst() { "R" } else { "" },
        t.checksum()
    );
}

fn describe_transport(s: &mut String, t: &Option<TransportSlice>) {
    match t {
        Some(TransportSlice::Udp(u)) => {
            let _ = write!(
                s,
                " | udp {} -> {} csum {:#06x}",
                u.source_port(),
                u.destination_port(),
                u.checksum()
            );
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let _ = write!(s, " | icmp type {} code {}", i.type_u8(), i.code_u8());
        }
        _ => {}
    }
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Checks the IPv4 header checksum and the TCP/UDP/ICMP checksums (of the inner packet
/// too, for IPIP and IPv6-in-IPv6) by etherparse's own computation.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if frame.len() < 14 {
        return Err("frame shorter than Ethernet".into());
    }
    match frame[12..14] {
        [0x08, 0x00] => verify_ipv4(&frame[14..], 0),
        [0x86, 0xdd] => verify_ipv6(&frame[14..], 0),
        _ => Ok(()),
    }
}

fn verify_ipv6(packet: &[u8], depth: u32) -> Result<(), String> {
    let ip = Ipv6Slice::from_slice(packet).map_err(|e| format!("ipv6: {e}"))?;
    let (src, dst) = (ip.header().source(), ip.header().destination());
    let p = ip.payload();
    if p.fragmented {
        return Ok(());
    }
    let payload = p.payload;
    let check = |what: &str, got: u16, want: u16| {
        if got == want {
            Ok(())
        } else {
            Err(format!("{what} checksum {got:#06x}, correct {want:#06x}"))
        }
    };
    match p.ip_number {
        etherparse::IpNumber::IPV6 if depth == 0 => verify_ipv6(payload, 1),
        etherparse::IpNumber::TCP => {
            let t = TcpHeaderSlice::from_slice(payload).map_err(|e| format!("tcp: {e}"))?;
            let want = t
                .calc_checksum_ipv6_raw(src, dst, &payload[t.slice().len()..])
                .map_err(|e| format!("tcp checksum: {e}"))?;
            check("tcp", t.checksum(), want)
        }
        etherparse::IpNumber::UDP => {
            let u =
                etherparse::UdpHeaderSlice::from_slice(payload).map_err(|e| format!("udp: {e}"))?;
            let want = u
                .to_header()
                .calc_checksum_ipv6_raw(src, dst, &payload[8..])
                .map_err(|e| format!("udp checksum: {e}"))?;
            check("udp", u.checksum(), want)
        }
        etherparse::IpNumber::IPV6_ICMP => {
            let (icmp, rest) = etherparse::Icmpv6Header::from_slice(payload)
                .map_err(|e| format!("icmpv6: {e}"))?;
            let want = etherparse::Icmpv6Header::with_checksum(icmp.icmp_type, src, dst, rest)
                .map_err(|e| format!("icmpv6 checksum: {e}"))?
                .checksum;
            check("icmpv6", icmp.checksum, want)
        }
        _ => Ok(()),
    }
}

fn verify_ipv4(packet: &[u8], depth: u32) -> Result<(), String> {
    let ip = Ipv4Slice::from_slice(packet).map_err(|e| format!("ipv4: {e}"))?;
    let h = ip.header().to_header();
    if h.header_checksum != h.calc_header_checksum() {
        return Err(format!(
            "ipv4 header checksum {:#06x}, correct {:#06x}",
            h.header_checksum,
            h.calc_header_checksum()
        ));
    }
    let payload = ip.payload().payload;
    if ip.payload().fragmented {
        return Ok(());
    }
    match h.protocol {
        etherparse::IpNumber::IPV4 if depth == 0 => verify_ipv4(payload, 1),
        etherparse::IpNumber::TCP => {
            let t = TcpHeaderSlice::from_slice(payload).map_err(|e| format!("tcp: {e}"))?;
            let body = &payload[t.slice().len()..];
            let want = t
                .to_header()
                .calc_checksum_ipv4(&h, body)
                .map_err(|e| format!("tcp checksum: {e}"))?;
            if t.checksum() != want {
                return Err(format!(
                    "tcp checksum {:#06x}, correct {want:#06x}",
                    t.checksum()
                ));
            }
            Ok(())
        }
        etherparse::IpNumber::ICMP => {
            let (icmp, rest) =
                etherparse::Icmpv4Header::from_slice(payload).map_err(|e| format!("icmp: {e}"))?;
            let want =
                etherparse::Icmpv4Header::with_checksum(icmp.icmp_type.clone(), rest).checksum;
            if icmp.checksum != want {
                return Err(format!(
                    "icmp checksum {:#06x}, correct {want:#06x}",
                    icmp.checksum
                ));
            }
            Ok(())
        }
        etherparse::IpNumber::UDP => {
            let u =
                etherparse::UdpHeaderSlice::from_slice(payload).map_err(|e| format!("udp: {e}"))?;
            if u.checksum() == 0 {
                return Ok(());
            }
            let body = &payload[8..];
            let want = u
                .to_header()
                .calc_checksum_ipv4(&h, body)
                .map_err(|e| format!("udp checksum: {e}"))?;
            if u.checksum() != want {
                return Err(format!(
                    "udp checksum {:#06x}, correct {want:#06x}",
                    u.checksum()
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Builders for the frames fixtures use.
pub mod frames {
    use super::*;

    pub type Mac = [u8; 6];

    /// TCP flags for [`tcp`].
    #[derive(Clone, Copy, Default)]
    pub struct Flags {
        pub syn: bool,
        pub ack: bool,
        pub fin: bool,
        pub rst: bool,
    }
    pub const SYN: Flags = Flags {
        syn: true,
        ack: false,
        fin: false,
        rst: false,
    };
    pub const ACK: Flags = Flags {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
    };
    pub const FIN: Flags = Flags {
        syn: false,
        ack: true,
        fin: true,
        rst: false,
    };

    /// An Ethernet/IPv4/TCP frame.
    #[allow(clippy::too_many_arguments)]
    pub fn tcp(
        smac: Mac,
        dmac: Mac,
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        flags: Flags,
        payload: &[u8],
    ) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(smac, dmac)
            .ipv4(src, dst, 64)
            .tcp(sport, dport, 1000, 64240);
        tcp_frame(b, flags, payload)
    }

    /// A TCP frame from its builder: the flags set, the payload written.
    fn tcp_frame(
        mut b: etherparse::PacketBuilderStep<etherparse::TcpHeader>,
        flags: Flags,
        payload: &[u8],
    ) -> Vec<u8> {
        if flags.syn {
            b = b.syn();
        }
        if flags.ack {
            b = b.ack(1);
        }
        if flags.fin {
            b = b.fin();
        }
        if flags.rst {
            b = b.rst();
        }
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("build tcp frame");
        out
    }

    /// An Ethernet/IPv4/UDP frame.
    pub fn udp(
        smac: Mac,
        dmac: Mac,
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(smac, dmac)
            .ipv4(src, dst, 64)
            .udp(sport, dport);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("build udp frame");
        out
    }

    /// An Ethernet/IPv6/TCP frame.
    #[allow(clippy::too_many_arguments)]
    pub fn tcp6(
        smac: Mac,
        dmac: Mac,
        src: [u8; 16],
        sport: u16,
        dst: [u8; 16],
        dport: u16,
        flags: Flags,
        payload: &[u8],
    ) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(smac, dmac)
            .ipv6(src, dst, 64)
            .tcp(sport, dport, 1000, 64240);
        tcp_frame(b, flags, payload)
    }

    /// An Ethernet/IPv6/UDP frame.
    pub fn udp6(
        smac: Mac,
        dmac: Mac,
        src: [u8; 16],
        sport: u16,
        dst: [u8; 16],
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(smac, dmac)
            .ipv6(src, dst, 64)
            .udp(sport, dport);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("build udp6 frame");
        out
    }

    /// An Ethernet/IPv6/ICMPv6 frame of type `kind` and code 0 (its bytes 4-7 zero), hop
    /// limit 255 as neighbour discovery requires.
    pub fn icmp6(
        smac: Mac,
        dmac: Mac,
        src: [u8; 16],
        dst: [u8; 16],
        kind: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let t = match kind {
            128 => {
                etherparse::Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 })
            }
            _ => etherparse::Icmpv6Type::Unknown {
                type_u8: kind,
                code_u8: 0,
                bytes5to8: [0; 4],
            },
        };
        let b = PacketBuilder::ethernet2(smac, dmac)
            .ipv6(src, dst, 255)
            .icmpv6(t);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("build icmpv6 frame");
        out
    }

    /// An IPv6 frame with extension headers `exts` (type, whole header's bytes after the
    /// next-header byte) put between its fixed header and its payload: lengths and next
    /// headers are set, the payload (and its checksum, which they do not enter) unchanged.
    pub fn with_ext6(frame: &[u8], exts: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut next = frame[20];
        let mut chain = Vec::new();
        for (kind, rest) in exts.iter().rev() {
            let mut h = vec![next];
            h.extend_from_slice(rest);
            h.extend_from_slice(&chain);
            chain = h;
            next = *kind;
        }
        let mut out = frame[..54].to_vec();
        out[20] = next;
        out.extend_from_slice(&chain);
        out.extend_from_slice(&frame[54..]);
        let plen = (out.len() - 54) as u16;
        out[18..20].copy_from_slice(&plen.to_be_bytes());
        out
    }

    /// A destination-options (or hop-by-hop) header's bytes after its next header: `units`
    /// 8-byte units in all, padded with a PadN option.
    pub fn options6(units: usize) -> Vec<u8> {
        let len = units * 8;
        let mut h = vec![(units - 1) as u8, 1, (len - 4) as u8];
        h.resize(len - 1, 0);
        h
    }

    /// A fragment header's bytes after its next header: `offset` in 8-byte units, more
    /// fragments or not.
    pub fn fragment6(offset: u16, more: bool) -> Vec<u8> {
        let field = (offset << 3) | more as u16;
        let mut h = vec![0];
        h.extend_from_slice(&field.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 7]);
        h
    }

    /// A broadcast ARP request (IPv4 over Ethernet) from `sender` at `smac` for `target`.
    pub fn arp_request(smac: Mac, sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
        arp(
            smac,
            [0xff; 6],
            etherparse::ArpOperation::REQUEST,
            sender,
            target,
        )
    }

    /// An ARP reply from `sender` at `smac` to `target` at `dmac`.
    pub fn arp_reply(smac: Mac, sender: [u8; 4], dmac: Mac, target: [u8; 4]) -> Vec<u8> {
        arp(smac, dmac, etherparse::ArpOperation::REPLY, sender, target)
    }

    fn arp(
        smac: Mac,
        dmac: Mac,
        op: etherparse::ArpOperation,
        sender: [u8; 4],
        target: [u8; 4],
    ) -> Vec<u8> {
        // A request does not know the target's MAC yet: zeros.
        let tha = if op == etherparse::ArpOperation::REQUEST {
            [0; 6]
        } else {
            dmac
        };
        let packet = etherparse::ArpPacket::new(
            etherparse::ArpHardwareId::ETHERNET,
            etherparse::EtherType::IPV4,
            op,
            &smac,
            &sender,
            &tha,
            &target,
        )
        .expect("an Ethernet/IPv4 ARP packet");
        let b = PacketBuilder::ethernet2(smac, dmac).arp(packet);
        let mut out = Vec::with_capacity(b.size());
        b.write(&mut out).expect("build arp frame");
        out
    }

    /// An Ethernet header in front of `packet` (an IPv4 packet).
    pub fn ethernet(smac: Mac, dmac: Mac, packet: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(14 + packet.len());
        out.extend_from_slice(&dmac);
        out.extend_from_slice(&smac);
        out.extend_from_slice(&[0x08, 0x00]);
        out.extend_from_slice(packet);
        out
    }

    /// Recomputes the IPv4 header checksum of the frame's (outer) IPv4 header in place.
    pub fn fix_ipv4_checksum(frame: &mut [u8]) {
        let ihl = ((frame[14] & 0x0f) as usize) * 4;
        let h = Ipv4Header::from_slice(&frame[14..14 + ihl])
            .expect("ipv4 header")
            .0;
        let c = h.calc_header_checksum();
        frame[24..26].copy_from_slice(&c.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::frames::*;
    use super::*;

    const A: Mac = [2, 0, 0, 0, 0, 1];
    const B: Mac = [2, 0, 0, 0, 0, 2];

    #[test]
    fn built_frames_have_correct_checksums_and_corruption_is_caught() {
        let f = tcp(A, B, [192, 0, 2, 1], 1234, [192, 0, 2, 2], 80, SYN, b"x");
        verify_checksums(&f).unwrap();
        let mut bad = f.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(verify_checksums(&bad).unwrap_err().contains("tcp checksum"));
        let mut bad = f.clone();
        bad[22] ^= 1; // ttl
        assert!(verify_checksums(&bad).unwrap_err().contains("ipv4 header"));
        let u = udp(A, B, [192, 0, 2, 1], 1234, [192, 0, 2, 2], 53, b"q");
        verify_checksums(&u).unwrap();
    }

    #[test]
    fn arp_frames_are_what_rfc_826_says() {
        let f = arp_request(A, [192, 0, 2, 1], [192, 0, 2, 100]);
        assert_eq!(f.len(), 14 + 28);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[12..22], &[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &A);
        assert_eq!(&f[38..42], &[192, 0, 2, 100]);
        assert!(decode(&f).contains("arp op 1 192.0.2.1 asks for 192.0.2.100"));
        let r = arp_reply(A, [192, 0, 2, 100], B, [192, 0, 2, 1]);
        assert_eq!(&r[..6], &B);
        assert_eq!(&r[20..22], &[0, 2]);
        assert_eq!(&r[32..38], &B);
    }

    #[test]
    fn a_mismatch_prints_both_frames_decoded() {
        let f = tcp(A, B, [192, 0, 2, 1], 1234, [192, 0, 2, 2], 80, SYN, b"");
        let fx = Fixture::new("demo", f.clone(), XDP_PASS);
        fx.check(XDP_PASS, &f).unwrap();
        let mut other = f.clone();
        other[0] = 0xff;
        let err = fx.check(XDP_TX, &other).unwrap_err();
        assert!(err.contains("action XDP_TX (want XDP_PASS)"), "{err}");
        assert!(err.contains("output frame differs"), "{err}");
        assert!(
            err.contains("ipv4 192.0.2.1 -> 192.0.2.2") && err.contains("tcp 1234 -> 80"),
            "{err}"
        );
        assert!(
            err.contains("eth 02:00:00:00:00:01 -> ff:00:00:00:00:02"),
            "{err}"
        );
    }
}
