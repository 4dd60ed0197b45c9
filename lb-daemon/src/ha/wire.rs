//! The wire format of the messages between ATMs: HMAC-SHA256 authenticated, guarded
//! against replays, with the shared key's loading.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::Path,
};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 4] = b"LBHA";
const VERSION: u8 = 1;
const TAG: usize = 32;

/// Reads the shared secret. Refused if the file is readable by group or others (as
/// corosync refuses its authkey) or shorter than 16 bytes.
pub fn load_key(path: &Path) -> Result<Vec<u8>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("auth key file {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "auth key file {} is readable by group or others (mode {mode:o}): chmod 600 it",
            path.display()
        ));
    }
    let key = std::fs::read(path).map_err(|e| format!("auth key file {}: {e}", path.display()))?;
    if key.len() < 16 {
        return Err(format!(
            "auth key file {} holds {} bytes: use at least 16 random bytes",
            path.display(),
            key.len()
        ));
    }
    Ok(key)
}

/// The role an ATM announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Backup,
    Primary,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Backup => "backup",
            Role::Primary => "primary",
        }
    }
}

/// What an ATM says about itself every heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub role: Role,
    /// The election term of the primary this ATM is or follows.
    pub term: u64,
    /// It may become primary now (reaches its `track` addresses, is not standing aside after
    /// handing over).
    pub candidate: bool,
    /// During a planned handover: the ATM that is to take over.
    pub yield_to: Option<u16>,
}

/// A connection, as backups install it (servers named by address, not by index). Its four
/// addresses are of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncRecord {
    /// `EVENT_OPEN` or `EVENT_CLOSE`.
    pub kind: u8,
    pub proto: u8,
    /// `CONN_*` bits of the client's leg.
    pub flags: u16,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub server: SocketAddr,
    /// NAT: our source address and port toward the server.
    pub nat: SocketAddr,
    /// NAT: the MAC the client's packets come from.
    pub peer_mac: [u8; 6],
    /// How long before the record was made the sender last saw a packet of the connection,
    /// in milliseconds (saturating); [`IDLE_UNKNOWN`] from an ATM of the first record format,
    /// which did not say.
    pub idle_ms: u32,
}

/// [`SyncRecord::idle_ms`] of a record that did not say.
pub const IDLE_UNKNOWN: u32 = u32::MAX;

/// Message kinds. `SYNC_V1` is the first record format (IPv4 only, no idle time): still
/// read, from an ATM of the version before, never sent.
const HEARTBEAT: u8 = 1;
const SYNC_V1: u8 = 2;
const SYNC_REQUEST: u8 = 3;
const YIELD: u8 = 4;
const SYNC: u8 = 5;
const CONFIG: u8 = 6;
const PERSIST: u8 = 7;

/// The record format of `SYNC` messages, their first byte. A receiver refuses a format,
/// message kind or address family it does not know as [`Reject::Unsupported`], and never
/// guesses at the rest of the message.
const RECORD_FORMAT: u8 = 2;
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Bytes of records per `SYNC` message: with the header and the longest cluster name a
/// datagram stays under 1,500 bytes (v4 records take 39 bytes, v6 ones 87).
const RECORD_BYTES_PER_MESSAGE: usize = 1_100;

/// A record's size on the wire.
fn record_len(r: &SyncRecord) -> usize {
    let addr = if r.client.is_ipv4() { 4 } else { 16 };
    5 + 4 * (addr + 2) + 6 + 4
}

/// `records` cut into runs that each fit one `SYNC` message.
pub fn batches(records: &[SyncRecord]) -> Vec<&[SyncRecord]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        let n = record_len(r);
        if bytes + n > RECORD_BYTES_PER_MESSAGE && i > start {
            out.push(&records[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    if start < records.len() {
        out.push(&records[start..]);
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Heartbeat(Heartbeat),
    /// New, refreshed or closed connections, from the primary.
    Sync(Vec<SyncRecord>),
    /// A backup asks the primary for its whole connection table.
    SyncRequest,
    /// A backup asks the primary to hand over to it (`lb-cli promote`).
    Yield,
    /// The fingerprint of the sender's config (see `config_fingerprint`), sent about once a
    /// second and after each reload, beside the heartbeats: a kind of its own, so that an
    /// ATM of the version before, which refuses it as unsupported, still reads heartbeats.
    Config(u64),
    /// The primary's persistence entries, with each whole table it sends: records of kind
    /// open whose client is the client (or client prefix) the entry names, with port 0,
    /// and whose idle time is the entry's. In records of the `Sync` format, under a kind of
    /// their own, which an ATM of the version before refuses as unsupported (and so keeps
    /// deriving the entries from the connections' records, as it did).
    Persist(Vec<SyncRecord>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Index of the sender in the config's [[atm]] list.
    pub sender: u16,
    /// The sender's boot epoch (its start time): sequence numbers restart with it.
    pub epoch: u64,
    pub seq: u64,
    pub body: Body,
}

/// Why a datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    Malformed,
    OtherCluster,
    Auth,
    Replay,
    /// Authentic, but of a message kind, record format or address family this ATM does
    /// not know: sent by a newer lb.
    Unsupported,
}

impl Reject {
    pub const ALL: [Reject; 5] = [
        Reject::Malformed,
        Reject::OtherCluster,
        Reject::Auth,
        Reject::Replay,
        Reject::Unsupported,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::OtherCluster => "other_cluster",
            Reject::Auth => "authentication",
            Reject::Replay => "replay",
            Reject::Unsupported => "unsupported",
        }
    }
}

fn mac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// Serialises and signs a message.
pub fn encode(cluster: &str, key: &[u8], m: &Message) -> Vec<u8> {
    let name = cluster.as_bytes();
    let mut b = Vec::with_capacity(64 + RECORD_BYTES_PER_MESSAGE);
    b.extend_from_slice(MAGIC);
    b.push(VERSION);
    let kind = match &m.body {
        Body::Heartbeat(_) => HEARTBEAT,
        Body::Sync(_) => SYNC,
        Body::SyncRequest => SYNC_REQUEST,
        Body::Yield => YIELD,
        Body::Config(_) => CONFIG,
        Body::Persist(_) => PERSIST,
    };
    b.push(kind);
    b.push(name.len().min(255) as u8);
    b.extend_from_slice(&name[..name.len().min(255)]);
    b.extend_from_slice(&m.sender.to_be_bytes());
    b.extend_from_slice(&m.epoch.to_be_bytes());
    b.extend_from_slice(&m.seq.to_be_bytes());
    match &m.body {
        Body::Heartbeat(h) => {
            b.push(matches!(h.role, Role::Primary) as u8);
            b.extend_from_slice(&h.term.to_be_bytes());
            b.push(h.candidate as u8);
            b.extend_from_slice(&h.yield_to.unwrap_or(u16::MAX).to_be_bytes());
        }
        Body::Sync(records) | Body::Persist(records) => {
            b.push(RECORD_FORMAT);
            b.extend_from_slice(&(records.len() as u16).to_be_bytes());
            for r in records {
                b.push(r.kind);
                b.push(r.proto);
                b.extend_from_slice(&r.flags.to_be_bytes());
                let v4 = r.client.is_ipv4();
                b.push(if v4 { FAMILY_V4 } else { FAMILY_V6 });
                for a in [r.client, r.vip, r.server, r.nat] {
                    match (v4, a.ip()) {
                        (true, IpAddr::V4(ip)) => b.extend_from_slice(&ip.octets()),
                        // Of one family by construction; anything else is written as the
                        // unspecified address of the record's family, never misaligned.
                        (true, IpAddr::V6(ip)) => b.extend_from_slice(
                            &ip.to_ipv4_mapped()
                                .unwrap_or(Ipv4Addr::UNSPECIFIED)
                                .octets(),
                        ),
                        (false, ip) => b.extend_from_slice(&v6_of(ip).octets()),
                    }
                    b.extend_from_slice(&a.port().to_be_bytes());
                }
                b.extend_from_slice(&r.peer_mac);
                b.extend_from_slice(&r.idle_ms.to_be_bytes());
            }
        }
        Body::Config(fp) => b.extend_from_slice(&fp.to_be_bytes()),
        Body::SyncRequest | Body::Yield => {}
    }
    let mut h = mac(key);
    h.update(&b);
    b.extend_from_slice(&h.finalize().into_bytes());
    b
}

/// A config's fingerprint, as ATMs compare them: the first 8 bytes of SHA-256 over the
/// config as this version reads it (its parsed form), so that comments, blank lines and the
/// order of keys within a table do not count, but every value does.
pub fn config_fingerprint(c: &crate::config::Config) -> u64 {
    use sha2::Digest;
    let digest = Sha256::digest(format!("{c:?}").as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn v6_of(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    }
}

/// A cursor over a datagram.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Reject> {
        if self.0.len() < n {
            return Err(Reject::Malformed);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, Reject> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Reject> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, Reject> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, Reject> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// An address of `family` and a port.
    fn addr_port(&mut self, family: u8) -> Result<SocketAddr, Reject> {
        let ip: IpAddr = match family {
            FAMILY_V4 => <[u8; 4]>::try_from(self.take(4)?).expect("4 bytes").into(),
            FAMILY_V6 => <[u8; 16]>::try_from(self.take(16)?)
                .expect("16 bytes")
                .into(),
            _ => return Err(Reject::Unsupported),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }
    /// Records of the current format.
    fn records(&mut self) -> Result<Vec<SyncRecord>, Reject> {
        if self.u8()? != RECORD_FORMAT {
            return Err(Reject::Unsupported);
        }
        let n = self.u16()? as usize;
        let mut records = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let (kind, proto, flags, family) = (self.u8()?, self.u8()?, self.u16()?, self.u8()?);
            records.push(SyncRecord {
                kind,
                proto,
                flags,
                client: self.addr_port(family)?,
                vip: self.addr_port(family)?,
                server: self.addr_port(family)?,
                nat: self.addr_port(family)?,
                peer_mac: self.take(6)?.try_into().expect("6 bytes"),
                idle_ms: self.u32()?,
            });
        }
        Ok(records)
    }
    /// Records of the first format (IPv4, no idle time).
    fn records_v1(&mut self) -> Result<Vec<SyncRecord>, Reject> {
        let n = self.u16()? as usize;
        let mut records = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            records.push(SyncRecord {
                kind: self.u8()?,
                proto: self.u8()?,
                flags: self.u16()?,
                client: self.addr_port(FAMILY_V4)?,
                vip: self.addr_port(FAMILY_V4)?,
                server: self.addr_port(FAMILY_V4)?,
                nat: self.addr_port(FAMILY_V4)?,
                peer_mac: self.take(6)?.try_into().expect("6 bytes"),
                idle_ms: IDLE_UNKNOWN,
            });
        }
        Ok(records)
    }
}

/// Where authentic heartbeats were last received, by sender, as the receiving task saw them
/// arrive: ahead of the event loop, which may be working through a whole table of sync
/// records queued before them. The election counts a peer alive from its heartbeat's
/// arrival, not from the turn in which the loop got to it (see `Election::heard_at`).
#[derive(Clone, Debug, Default)]
pub struct Arrivals(std::sync::Arc<std::sync::Mutex<Vec<Option<Arrival>>>>);

#[derive(Clone, Copy, Debug)]
struct Arrival {
    at: tokio::time::Instant,
    /// (epoch, sequence number): only a newer heartbeat counts, so a replayed one does not.
    stamp: (u64, u64),
}

impl Arrivals {
    pub fn new(atms: usize) -> Arrivals {
        Arrivals(std::sync::Arc::new(std::sync::Mutex::new(vec![None; atms])))
    }

    /// On the receiving task: if `datagram` is an authentic heartbeat of another ATM than
    /// `me`, newer than the last one seen from it, notes that it arrived `at`.
    pub fn note(
        &self,
        cluster: &str,
        key: &[u8],
        me: usize,
        datagram: &[u8],
        at: tokio::time::Instant,
    ) {
        // The kind byte follows the magic and the version: only heartbeats are authenticated
        // here (a whole table's records are left to the loop).
        if datagram.get(MAGIC.len() + 1) != Some(&HEARTBEAT) {
            return;
        }
        let Ok(m) = decode(cluster, key, datagram) else {
            return;
        };
        let sender = m.sender as usize;
        if sender == me || !matches!(m.body, Body::Heartbeat(_)) {
            return;
        }
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = all.get_mut(sender)
            && slot.is_none_or(|a| a.stamp < (m.epoch, m.seq))
        {
            *slot = Some(Arrival {
                at,
                stamp: (m.epoch, m.seq),
            });
        }
    }

    /// When each ATM's newest authentic heartbeat arrived, by index.
    pub fn latest(&self) -> Vec<Option<tokio::time::Instant>> {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().map(|a| a.map(|a| a.at)).collect()
    }
}

/// Checks and parses a datagram: our cluster's name, a valid HMAC with our key. Replays are
/// the receiver's business (see [`Replay`]).
pub fn decode(cluster: &str, key: &[u8], datagram: &[u8]) -> Result<Message, Reject> {
    if datagram.len() < MAGIC.len() + 3 + TAG || &datagram[..4] != MAGIC || datagram[4] != VERSION {
        return Err(Reject::Malformed);
    }
    let (signed, tag) = datagram.split_at(datagram.len() - TAG);
    let mut r = Reader(&signed[5..]);
    let kind = r.u8()?;
    let name_len = r.u8()? as usize;
    if r.take(name_len)? != cluster.as_bytes() {
        return Err(Reject::OtherCluster);
    }
    let mut h = mac(key);
    h.update(signed);
    h.verify_slice(tag).map_err(|_| Reject::Auth)?;
    let sender = r.u16()?;
    let epoch = r.u64()?;
    let seq = r.u64()?;
    let body = match kind {
        HEARTBEAT => {
            let role = if r.u8()? == 1 {
                Role::Primary
            } else {
                Role::Backup
            };
            let term = r.u64()?;
            let candidate = r.u8()? == 1;
            let y = r.u16()?;
            Body::Heartbeat(Heartbeat {
                role,
                term,
                candidate,
                yield_to: (y != u16::MAX).then_some(y),
            })
        }
        SYNC => Body::Sync(r.records()?),
        SYNC_V1 => Body::Sync(r.records_v1()?),
        SYNC_REQUEST => Body::SyncRequest,
        YIELD => Body::Yield,
        CONFIG => Body::Config(r.u64()?),
        PERSIST => Body::Persist(r.records()?),
        _ => return Err(Reject::Unsupported),
    };
    if !r.0.is_empty() {
        return Err(Reject::Malformed);
    }
    Ok(Message {
        sender,
        epoch,
        seq,
        body,
    })
}

/// Per sender, the newest (epoch, sequence) accepted: anything not newer is a replay.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    seen: Vec<Option<(u64, u64)>>,
}

impl Replay {
    pub fn new(n: usize) -> Replay {
        Replay {
            seen: vec![None; n],
        }
    }

    /// Accepts `m` if it is newer than everything seen from its sender.
    pub fn check(&mut self, m: &Message) -> Result<(), Reject> {
        let slot = self
            .seen
            .get_mut(m.sender as usize)
            .ok_or(Reject::Malformed)?;
        if let Some(last) = *slot
            && (m.epoch, m.seq) <= last
        {
            return Err(Reject::Replay);
        }
        *slot = Some((m.epoch, m.seq));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The receiving task notes authentic heartbeats of other ATMs, newest first; a forged
    /// or replayed one, our own, and other kinds of message change nothing.
    #[test]
    fn arrivals_note_only_authentic_newer_heartbeats_of_other_atms() {
        let key = b"0123456789abcdef0123";
        let beat = |sender: u16, seq: u64| {
            encode(
                "web",
                key,
                &Message {
                    sender,
                    epoch: 42,
                    seq,
                    body: Body::Heartbeat(Heartbeat {
                        role: Role::Primary,
                        term: 3,
                        candidate: true,
                        yield_to: None,
                    }),
                },
            )
        };
        let a = Arrivals::new(3);
        let t0 = tokio::time::Instant::now();
        let t1 = t0 + std::time::Duration::from_millis(100);
        a.note("web", key, 0, &beat(1, 7), t0);
        assert_eq!(a.latest(), vec![None, Some(t0), None]);
        // The same heartbeat again (a replay), a forgery, our own, a stranger's cluster.
        a.note("web", key, 0, &beat(1, 7), t1);
        a.note("web", b"another key of 20b..", 0, &beat(1, 8), t1);
        a.note("web", key, 0, &beat(0, 9), t1);
        a.note("db", key, 0, &beat(2, 9), t1);
        let sync = Message {
            sender: 2,
            epoch: 42,
            seq: 10,
            body: Body::Sync(vec![v4_record()]),
        };
        a.note("web", key, 0, &encode("web", key, &sync), t1);
        assert_eq!(a.latest(), vec![None, Some(t0), None]);
        a.note("web", key, 0, &beat(1, 8), t1);
        assert_eq!(a.latest(), vec![None, Some(t1), None]);
    }

    #[test]
    fn messages_round_trip_and_forgeries_replays_and_strangers_are_refused() {
        let key = b"0123456789abcdef0123";
        let m = Message {
            sender: 1,
            epoch: 42,
            seq: 7,
            body: Body::Heartbeat(Heartbeat {
                role: Role::Primary,
                term: 3,
                candidate: true,
                yield_to: Some(0),
            }),
        };
        let wire = encode("web", key, &m);
        assert_eq!(decode("web", key, &wire), Ok(m.clone()));
        assert_eq!(
            decode("web", b"another key of 20b..", &wire),
            Err(Reject::Auth)
        );
        assert_eq!(decode("db", key, &wire), Err(Reject::OtherCluster));
        let mut tampered = wire.clone();
        tampered[20] ^= 1;
        assert_eq!(decode("web", key, &tampered), Err(Reject::Auth));
        assert_eq!(decode("web", key, &wire[..10]), Err(Reject::Malformed));

        let sync = Message {
            sender: 0,
            epoch: 1,
            seq: 1,
            body: Body::Sync(vec![v4_record(), v6_record()]),
        };
        assert_eq!(decode("web", key, &encode("web", key, &sync)), Ok(sync));
        let persist = Message {
            sender: 0,
            epoch: 1,
            seq: 2,
            body: Body::Persist(vec![v4_record(), v6_record()]),
        };
        let wire = encode("web", key, &persist);
        assert_eq!(wire[5], PERSIST, "a kind of its own");
        assert_eq!(decode("web", key, &wire), Ok(persist));
        let config = Message {
            sender: 0,
            epoch: 1,
            seq: 2,
            body: Body::Config(0x0123_4567_89ab_cdef),
        };
        let wire = encode("web", key, &config);
        assert_eq!(decode("web", key, &wire), Ok(config));
        // A config message cut short (and signed so) is malformed, not misread.
        let short = &wire[..wire.len() - TAG - 1];
        let mut h = mac(key);
        h.update(short);
        let resigned = [short, &h.finalize().into_bytes()[..]].concat();
        assert_eq!(decode("web", key, &resigned), Err(Reject::Malformed));

        let mut r = Replay::new(2);
        assert_eq!(r.check(&m), Ok(()));
        assert_eq!(r.check(&m), Err(Reject::Replay), "the same message again");
        let older = Message {
            seq: 6,
            ..m.clone()
        };
        assert_eq!(r.check(&older), Err(Reject::Replay));
        let restarted = Message {
            epoch: 43,
            seq: 1,
            ..m.clone()
        };
        assert_eq!(
            r.check(&restarted),
            Ok(()),
            "a new boot epoch restarts the sequence"
        );
    }

    fn v4_record() -> SyncRecord {
        SyncRecord {
            kind: 1,
            proto: 6,
            flags: 1,
            client: "198.51.100.7:40000".parse().unwrap(),
            vip: "192.0.2.100:80".parse().unwrap(),
            server: "203.0.113.11:8080".parse().unwrap(),
            nat: "203.0.113.1:20001".parse().unwrap(),
            peer_mac: [2, 0, 0, 0, 0, 1],
            idle_ms: 1_500,
        }
    }

    fn v6_record() -> SyncRecord {
        SyncRecord {
            client: "[2001:db8:1::7]:40000".parse().unwrap(),
            vip: "[2001:db8::100]:80".parse().unwrap(),
            server: "[2001:db8:2::11]:8080".parse().unwrap(),
            nat: "[2001:db8:2::1]:20001".parse().unwrap(),
            idle_ms: 0,
            ..v4_record()
        }
    }

    /// A signed datagram of message kind `kind` with `body` after the common header.
    fn datagram(key: &[u8], kind: u8, body: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[VERSION, kind, 3]);
        b.extend_from_slice(b"web");
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&9u64.to_be_bytes());
        b.extend_from_slice(&1u64.to_be_bytes());
        b.extend_from_slice(body);
        let mut h = mac(key);
        h.update(&b);
        b.extend_from_slice(&h.finalize().into_bytes());
        b
    }

    #[test]
    fn records_of_the_first_format_are_still_read_and_newer_formats_refused_unread() {
        let key = b"0123456789abcdef0123";
        // The first format, from an ATM of the version before: IPv4 only, no idle time.
        let mut v1 = 1u16.to_be_bytes().to_vec();
        v1.extend_from_slice(&[1, 6, 0, 1]);
        for (a, p) in [
            ([198, 51, 100, 7], 40000u16),
            ([192, 0, 2, 100], 80),
            ([203, 0, 113, 11], 8080),
            ([203, 0, 113, 1], 20001),
        ] {
            v1.extend_from_slice(&a);
            v1.extend_from_slice(&p.to_be_bytes());
        }
        v1.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        let m = decode("web", key, &datagram(key, SYNC_V1, &v1)).unwrap();
        assert_eq!(
            m.body,
            Body::Sync(vec![SyncRecord {
                idle_ms: IDLE_UNKNOWN,
                ..v4_record()
            }])
        );
        // What a newer lb may send is refused as such, whole, not half read.
        let sync = encode(
            "web",
            key,
            &Message {
                sender: 1,
                epoch: 9,
                seq: 1,
                body: Body::Sync(vec![v4_record()]),
            },
        );
        let body = &sync[4 + 3 + 3 + 18..sync.len() - TAG];
        let mut format = body.to_vec();
        format[0] = RECORD_FORMAT + 1;
        let mut family = body.to_vec();
        family[1 + 2 + 4] = 5;
        for bad in [
            datagram(key, SYNC, &format),
            datagram(key, SYNC, &family),
            datagram(key, 9, &[]),
        ] {
            assert_eq!(decode("web", key, &bad), Err(Reject::Unsupported));
        }
        // Unauthenticated, the same is refused for what it is.
        let mut forged = datagram(key, 9, &[]);
        *forged.last_mut().unwrap() ^= 1;
        assert_eq!(decode("web", key, &forged), Err(Reject::Auth));
        assert_eq!(
            datagram(key, SYNC, body),
            sync,
            "the test's framing is encode's"
        );
    }

    #[test]
    fn records_are_cut_into_messages_by_size() {
        let key = b"0123456789abcdef0123";
        let mut records = vec![v4_record(); 100];
        records.extend(vec![v6_record(); 40]);
        let batches = batches(&records);
        assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), 140);
        for b in &batches {
            let wire = encode(
                &"c".repeat(255),
                key,
                &Message {
                    sender: 0,
                    epoch: 1,
                    seq: 1,
                    body: Body::Sync(b.to_vec()),
                },
            );
            assert!(wire.len() <= 1_500, "{} bytes", wire.len());
        }
        assert_eq!(batches[0].len(), 1_100 / 39);
        assert!(batches.len() <= 8, "{} messages", batches.len());
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = std::env::temp_dir().join(format!("lb-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("authkey");
        std::fs::write(&p, b"0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            load_key(&p)
                .unwrap_err()
                .contains("readable by group or others")
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_key(&p).unwrap().len(), 20);
        std::fs::write(&p, b"short").unwrap();
        assert!(load_key(&p).unwrap_err().contains("at least 16"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
