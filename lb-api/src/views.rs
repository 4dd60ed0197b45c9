//! The structured answers of the control protocol: what `lb-cli status` and `lb-cli list`
//! (and `--json`) show. The daemon fills these and sends them as the response's `data`;
//! lb-cli reads them back into the same types, so a field renamed on one side cannot go
//! unnoticed on the other.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use serde::{Deserialize, Serialize};

/// What `lb-cli collect` asks of the daemon: what runs, and where its files are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Support {
    pub version: String,
    pub built: String,
    pub pid: u32,
    /// The config file it read (absolute).
    pub config: std::path::PathBuf,
    /// `--log-file`, or none when it logs to standard error (the journal under systemd).
    pub log_file: Option<std::path::PathBuf>,
}

/// `lb-cli status`: who is primary, which ATMs are online, the VIPs, servers up and down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub cluster: String,
    /// This daemon's name.
    pub name: String,
    /// This daemon's role: primary, backup, idle, or node on a real server.
    pub role: String,
    pub atms: Vec<AtmStatus>,
    /// The VIPs this daemon holds now.
    pub vips: Vec<IpAddr>,
    /// The election's term; none without `[ha]`.
    pub term: Option<u64>,
    /// Refused ATM messages by reason; none without `[ha]`.
    pub rejected: Option<BTreeMap<String, u64>>,
    /// Votes heard, as `corosync-quorumtool -s` shows them; none without `[ha]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<QuorumStatus>,
    /// The NAT pool's state; none without `[nat]`.
    pub nat: Option<NatStatus>,
    /// Where lb_xdp is attached; none on a real server.
    pub attached: Option<Vec<Attached>>,
    pub services: Vec<ServiceStatus>,
}

impl Status {
    /// The ATM that is primary now, as this daemon sees it.
    pub fn primary(&self) -> Option<&AtmStatus> {
        self.atms.iter().find(|a| a.role == "primary")
    }
}

/// The election's quorum as this ATM counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumStatus {
    /// This ATM and the ATMs heard within the dead interval.
    pub heard: usize,
    /// The ATMs listed in the config.
    pub expected: usize,
    /// The votes a primary needs: none when quorum is not enforced (`[ha] quorum = "none"`,
    /// or two ATMs).
    pub needed: Option<usize>,
}

impl QuorumStatus {
    pub fn quorate(&self) -> bool {
        self.needed.is_none_or(|n| self.heard >= n)
    }
}

/// A line of the `atms` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtmStatus {
    pub name: String,
    pub address: IpAddr,
    /// A dual-stack ATM's IPv6 address (`[[atm]] address6`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// primary, backup or idle.
    pub role: String,
    /// online or offline.
    pub state: String,
    /// Milliseconds since last heard; 0 for this ATM, none if never heard.
    pub last_heard_ms: Option<u64>,
    /// The fingerprint of its config (16 hex digits): this ATM's own, or the last another
    /// sent; none if not heard yet (or a lone ATM's peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Its config differs from this ATM's (its services, servers or rings may differ).
    #[serde(default)]
    pub config_differs: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatStatus {
    pub addresses: Vec<IpAddr>,
    /// The source-port range handed out, as `first-last`.
    pub ports: String,
    /// Seconds a port is held after a close.
    pub port_hold: u32,
    /// Seconds a port is held when the server closes first.
    pub time_wait: u32,
    /// New connections refused for want of a port, since start.
    pub exhausted_drops: u64,
    /// The pool ran dry within the last seconds.
    pub exhausted_now: bool,
}

/// An interface lb_xdp is attached to, and how (driver or generic).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub interface: String,
    pub mode: String,
}

/// A service as `status` shows it, with its servers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub protocol: String,
    pub vip: IpAddr,
    pub port: u16,
    pub servers: Vec<ServerStatus>,
    /// Up or down, as the `services` table says: with its quorum of servers or not.
    #[serde(default = "up")]
    pub up: bool,
    /// Servers it needs to be up (`quorum`, 1 by default).
    #[serde(default = "one")]
    pub quorum: u32,
}

fn up() -> bool {
    true
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    /// nat, direct or tunnel.
    pub method: String,
    pub up: bool,
    /// The weight in force: the configured one, or the operator's.
    pub weight: u32,
    /// A sorry server (serves only while no other server of the service is up).
    #[serde(default)]
    pub sorry: bool,
}

/// `up` or `down`, as the listings write a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Up,
    Down,
}

impl State {
    pub fn of(up: bool) -> State {
        if up { State::Up } else { State::Down }
    }
    pub fn name(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
        }
    }
}

/// A line of `lb-cli list services`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceLine {
    pub name: String,
    pub protocol: String,
    pub vip: IpAddr,
    pub port: u16,
    pub scheduler: String,
    /// Seconds a client sticks to its server; 0 for none.
    pub persistence: u32,
    pub state: State,
    pub packets: u64,
}

/// A line of `lb-cli list servers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerLine {
    pub service: String,
    pub name: String,
    pub protocol: String,
    pub address: IpAddr,
    pub port: u16,
    pub vip: IpAddr,
    pub vport: u16,
    pub state: State,
    pub weight: u32,
    pub method: String,
    pub packets: u64,
    /// Its live connections that have seen no FIN or RST (IPVS's ActiveConn).
    #[serde(default)]
    pub active: u64,
    /// Its live connections that are half-open (only SYNs from the client yet) or closing
    /// (FIN or RST seen, kept until they time out): IPVS's InActConn.
    #[serde(default)]
    pub inactive: u64,
}

/// A line of `lb-cli list connections`: for NAT, the client's leg and the server's leg are
/// two lines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionLine {
    pub protocol: String,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    /// Seconds until it times out.
    pub timeout: u64,
    pub server: SocketAddr,
    pub packets: u64,
    /// SYN_RECV (half-open), ESTABLISHED, FIN_WAIT, CLOSE or UDP, as ipvsadm -Lc says.
    #[serde(default)]
    pub state: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_are_written_as_operators_read_them() {
        let line = ConnectionLine {
            protocol: "tcp".into(),
            client: "198.51.100.7:40000".parse().unwrap(),
            vip: "192.0.2.100:80".parse().unwrap(),
            timeout: 899,
            server: "192.0.2.11:80".parse().unwrap(),
            packets: 5,
            state: "ESTABLISHED".into(),
        };
        let v = serde_json::to_value(&line).unwrap();
        assert_eq!(v["client"], "198.51.100.7:40000");
        assert_eq!(v["server"], "192.0.2.11:80");
        assert_eq!(serde_json::from_value::<ConnectionLine>(v).unwrap(), line);
        assert_eq!(serde_json::to_value(State::of(false)).unwrap(), "down");
        let v6: SocketAddr = "[2001:db8::7]:443".parse().unwrap();
        assert_eq!(serde_json::to_value(v6).unwrap(), "[2001:db8::7]:443");
    }
}
