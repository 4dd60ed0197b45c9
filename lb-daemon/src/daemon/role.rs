//! Who this machine is in the cluster (found in the config at start) and what it runs as
//! that: an ATM's balancer, election and probes, or a real server's set-up.

use std::net::IpAddr;

use super::{Atm, Ha, Node};
use crate::{config::Config, health::Checks};

/// What this machine is in the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The ATM at this position of the config's [[atm]] list.
    Atm(usize),
    /// A real server with this address.
    Node(IpAddr),
}

/// Finds this machine in the config: `--node NAME` (an ATM or server name), else the first
/// ATM whose address is local, else a server whose address is local.
pub fn identify(
    config: &Config,
    local: &[IpAddr],
    node: Option<&str>,
) -> Result<(Role, String), String> {
    if let Some(name) = node {
        if let Some(i) = config.atms.iter().position(|a| a.name == name) {
            return Ok((Role::Atm(i), name.to_string()));
        }
        for s in &config.services {
            if let Some(v) = s.servers.iter().find(|v| v.name == name) {
                return Ok((Role::Node(v.address), name.to_string()));
            }
        }
        return Err(format!(
            "--node {name:?}: no [[atm]] or server of that name in the config"
        ));
    }
    if let Some(i) = config.atms.iter().position(|a| local.contains(&a.address)) {
        return Ok((Role::Atm(i), config.atms[i].name.clone()));
    }
    for s in &config.services {
        if let Some(v) = s.servers.iter().find(|v| local.contains(&v.address)) {
            return Ok((Role::Node(v.address), v.name.clone()));
        }
    }
    Err(format!(
        "this machine ({}) is neither an ATM nor a server in the config: give --node NAME",
        local
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// On an ATM, the VIPs and NAT source addresses are the daemon's to add and remove: one that
/// is already an IPv4 address of this machine, not added by lb-daemon (a labelled alias), is
/// refused. Else the ATM answered for it as itself, with the kernel's stack (a server's
/// SYN-ACK to a NAT pool address that is also the ATM's own address met a reset there), and
/// a backup, which gives the address up, would take the machine's own address away.
/// (IPv6 addresses carry no labels, and kernels before 5.18 no address protocol either: they
/// are not checked.)
pub fn foreign_claims(
    config: &Config,
    role: &Role,
    local: &[crate::addrs::IfAddr],
) -> Result<(), String> {
    use crate::addrs::Mark;
    if !matches!(role, Role::Atm(_)) {
        return Ok(());
    }
    let nat = config.nat.iter().flat_map(|n| n.addresses());
    let claims = nat
        .map(|a| (a, "[nat] address"))
        .chain(config.services.iter().map(|s| (s.vip, "VIP")));
    let mut found = Vec::new();
    for (addr, what) in claims {
        if let Some(l) = local
            .iter()
            .find(|l| l.addr == addr && addr.is_ipv4() && !l.is(Mark::Nat) && !l.is(Mark::Vip))
            && !found
                .iter()
                .any(|f: &String| f.contains(&format!(" {addr} ")))
        {
            found.push(format!("{what} {addr} is on {}", l.interface()));
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{}, and lb-daemon did not add it: this ATM would answer for it as itself, and give \
         it up as a backup. Use an address no machine of the cluster holds (or remove it from \
         the interface)",
        found.join("; ")
    ))
}

/// What this machine runs in its role, in one value: an ATM never has half its parts, and
/// a real server none of them.
pub(super) enum Part {
    /// Before start-up has made the role's parts, and after `stop` has released them.
    Starting,
    Atm(Box<AtmParts>),
    Node(Box<Node>),
}

/// An ATM's parts.
pub(super) struct AtmParts {
    pub(super) atm: Atm,
    /// The election and the messages between ATMs.
    pub(super) ha: Ha,
    /// The probe tasks, restarted on reload (`None` while a reload makes new ones).
    pub(super) checks: Option<Checks>,
}

impl Part {
    pub(super) fn atm(&self) -> Option<&Atm> {
        match self {
            Part::Atm(p) => Some(&p.atm),
            _ => None,
        }
    }

    pub(super) fn atm_mut(&mut self) -> Option<&mut Atm> {
        match self {
            Part::Atm(p) => Some(&mut p.atm),
            _ => None,
        }
    }

    pub(super) fn ha(&self) -> Option<&Ha> {
        match self {
            Part::Atm(p) => Some(&p.ha),
            _ => None,
        }
    }

    pub(super) fn ha_mut(&mut self) -> Option<&mut Ha> {
        match self {
            Part::Atm(p) => Some(&mut p.ha),
            _ => None,
        }
    }

    /// Both halves of an ATM at once.
    pub(super) fn atm_and_ha(&mut self) -> Option<(&mut Atm, &mut Ha)> {
        match self {
            Part::Atm(p) => Some((&mut p.atm, &mut p.ha)),
            _ => None,
        }
    }

    /// Where an ATM's probe tasks are kept.
    pub(super) fn checks_mut(&mut self) -> Option<&mut Option<Checks>> {
        match self {
            Part::Atm(p) => Some(&mut p.checks),
            _ => None,
        }
    }

    pub(super) fn node(&self) -> Option<&Node> {
        match self {
            Part::Node(n) => Some(n.as_ref()),
            _ => None,
        }
    }

    pub(super) fn node_mut(&mut self) -> Option<&mut Node> {
        match self {
            Part::Node(n) => Some(n.as_mut()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    /// A NAT pool address or VIP that is already this ATM's own address (unlabelled) is
    /// refused, named with its interface; the daemon's own aliases, left by a killed
    /// daemon, and a real server's VIP on `lo` are not.
    #[test]
    fn an_atm_refuses_a_nat_or_vip_address_it_already_holds_as_its_own() {
        use crate::addrs::IfAddr;
        let text = "[cluster]\nname = \"c\"\n[[atm]]\nname = \"atm1\"\naddress = \"192.0.2.2\"\n\
                    interface = \"eth0\"\n[nat]\nsubnet = \"203.0.113.0/24\"\n\
                    gateway = \"203.0.113.1\"\npool = [\"203.0.113.2\"]\n[[service]]\n\
                    name = \"http\"\nvip = \"192.0.2.100\"\nport = 80\n[[service.server]]\n\
                    name = \"web1\"\naddress = \"203.0.113.11\"\nmethod = \"nat\"\n";
        let c = config::parse(text, std::path::Path::new("/")).unwrap();
        let addr = |a: &str, label: &str| IfAddr {
            index: 2,
            addr: a.parse().unwrap(),
            prefix: 24,
            label: label.into(),
            proto: 0,
        };
        let atm = Role::Atm(0);
        let own = [addr("192.0.2.2", "eth0"), addr("203.0.113.2", "eth1")];
        let e = foreign_claims(&c, &atm, &own).unwrap_err();
        assert!(
            e.starts_with("[nat] address 203.0.113.2 is on eth1, "),
            "{e}"
        );
        let vip = [addr("192.0.2.100", "lo")];
        let e = foreign_claims(&c, &atm, &vip).unwrap_err();
        assert!(e.starts_with("VIP 192.0.2.100 is on lo, "), "{e}");
        let ours = [
            addr("192.0.2.2", "eth0"),
            addr("203.0.113.2", "eth1:natg"),
            addr("192.0.2.100", "eth0:cs0"),
        ];
        assert_eq!(foreign_claims(&c, &atm, &ours), Ok(()));
        let server: IpAddr = "203.0.113.11".parse().unwrap();
        assert_eq!(foreign_claims(&c, &Role::Node(server), &vip), Ok(()));
    }

    #[test]
    fn identify_by_name_then_by_address() {
        let text = r#"
[cluster]
name = "c"
auth_key_file = "/etc/lb/authkey"
[[atm]]
name = "atm1"
address = "192.0.2.2"
interface = "eth0"
[[atm]]
name = "atm2"
address = "192.0.2.3"
interface = "eth0"
[[service]]
name = "http"
vip = "192.0.2.100"
port = 80
[[service.server]]
name = "web1"
address = "192.0.2.11"
"#;
        let c = config::parse(text, std::path::Path::new("/")).unwrap();
        let a2: IpAddr = "192.0.2.3".parse().unwrap();
        let s1: IpAddr = "192.0.2.11".parse().unwrap();
        assert_eq!(
            identify(&c, &[a2], None).unwrap(),
            (Role::Atm(1), "atm2".into())
        );
        assert_eq!(
            identify(&c, &[s1], None).unwrap(),
            (Role::Node(s1), "web1".into())
        );
        assert_eq!(
            identify(&c, &[], Some("atm1")).unwrap(),
            (Role::Atm(0), "atm1".into())
        );
        assert!(identify(&c, &[], None).unwrap_err().contains("--node"));
        assert!(identify(&c, &[], Some("nope")).is_err());
    }
}
