//! The wire format of the messages between ATMs: HMAC-SHA256 authenticated, guarded
//! against replays, with the shared key's loading.

use std::{os::unix::fs::PermissionsExt, path::Path};

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

/// A connection, as backups install it (servers named by address, not by index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncRecord {
    /// `EVENT_OPEN` or `EVENT_CLOSE`.
    pub kind: u8,
    pub proto: u8,
    /// `CONN_*` bits of the client's leg.
    pub flags: u16,
    pub client: ([u8; 4], u16),
    pub vip: ([u8; 4], u16),
    pub server: ([u8; 4], u16),
    /// NAT: our source address and port toward the server.
    pub nat: ([u8; 4], u16),
    /// NAT: the MAC the client's packets come from.
    pub peer_mac: [u8; 6],
}

const RECORD: usize = 34;
/// Records per datagram: keeps datagrams under 1,400 bytes.
pub const RECORDS_PER_MESSAGE: usize = 38;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Heartbeat(Heartbeat),
    /// New, refreshed or closed connections, from the primary.
    Sync(Vec<SyncRecord>),
    /// A backup asks the primary for its whole connection table.
    SyncRequest,
    /// A backup asks the primary to hand over to it (`lb-cli promote`).
    Yield,
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
}

impl Reject {
    pub const ALL: [Reject; 4] = [
        Reject::Malformed,
        Reject::OtherCluster,
        Reject::Auth,
        Reject::Replay,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::OtherCluster => "other_cluster",
            Reject::Auth => "authentication",
            Reject::Replay => "replay",
        }
    }
}

fn mac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// Serialises and signs a message.
pub fn encode(cluster: &str, key: &[u8], m: &Message) -> Vec<u8> {
    let name = cluster.as_bytes();
    let mut b = Vec::with_capacity(64 + RECORD * RECORDS_PER_MESSAGE);
    b.extend_from_slice(MAGIC);
    b.push(VERSION);
    let kind = match &m.body {
        Body::Heartbeat(_) => 1,
        Body::Sync(_) => 2,
        Body::SyncRequest => 3,
        Body::Yield => 4,
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
        Body::Sync(records) => {
            b.extend_from_slice(&(records.len() as u16).to_be_bytes());
            for r in records {
                b.push(r.kind);
                b.push(r.proto);
                b.extend_from_slice(&r.flags.to_be_bytes());
                for (a, p) in [r.client, r.vip, r.server, r.nat] {
                    b.extend_from_slice(&a);
                    b.extend_from_slice(&p.to_be_bytes());
                }
                b.extend_from_slice(&r.peer_mac);
            }
        }
        Body::SyncRequest | Body::Yield => {}
    }
    let mut h = mac(key);
    h.update(&b);
    b.extend_from_slice(&h.finalize().into_bytes());
    b
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
    fn u64(&mut self) -> Result<u64, Reject> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn addr_port(&mut self) -> Result<([u8; 4], u16), Reject> {
        let a: [u8; 4] = self.take(4)?.try_into().expect("4 bytes");
        Ok((a, self.u16()?))
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
        1 => {
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
        2 => {
            let n = r.u16()? as usize;
            let mut records = Vec::with_capacity(n.min(RECORDS_PER_MESSAGE * 2));
            for _ in 0..n {
                records.push(SyncRecord {
                    kind: r.u8()?,
                    proto: r.u8()?,
                    flags: r.u16()?,
                    client: r.addr_port()?,
                    vip: r.addr_port()?,
                    server: r.addr_port()?,
                    nat: r.addr_port()?,
                    peer_mac: r.take(6)?.try_into().expect("6 bytes"),
                });
            }
            Body::Sync(records)
        }
        3 => Body::SyncRequest,
        4 => Body::Yield,
        _ => return Err(Reject::Malformed),
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
            body: Body::Sync(vec![SyncRecord {
                kind: 1,
                proto: 6,
                flags: 1,
                client: ([198, 51, 100, 7], 40000),
                vip: ([192, 0, 2, 100], 80),
                server: ([203, 0, 113, 11], 8080),
                nat: ([203, 0, 113, 1], 20001),
                peer_mac: [2, 0, 0, 0, 0, 1],
            }]),
        };
        assert_eq!(decode("web", key, &encode("web", key, &sync)), Ok(sync));

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
