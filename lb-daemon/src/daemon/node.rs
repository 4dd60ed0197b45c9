//! The node role: a real server sets itself up for the forwarding methods the config gives
//! it, as TCL's nodes do. Direct and tunnel: the VIP on `lo` (label `lo:cs0`) and no ARP
//! answers for it (`arp_ignore=1`, `arp_announce=2`, today's form of TCL's `hidden` flag);
//! tunnel also: lb_decap on the interface, accepting IPIP from the config's ATMs. NAT-only
//! servers need nothing. A reload brings the same in line with the new file.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::{Context, Result, anyhow};
use lb_common::Method;
use tracing::info;

use super::{Daemon, Part, Role, atm::alias_name};
use crate::{
    addrs::{self, Mark},
    config::Config,
    dataplane::{AttachMode, Capacities, Dataplane},
};

/// The VIPs a node holds on `lo`, and whether it decapsulates tunnels: for every server line
/// at one of its addresses `mine` (a dual-stack server is on IPv4 lines and IPv6 ones).
fn wants(config: &Config, mine: &[IpAddr]) -> (BTreeSet<IpAddr>, bool) {
    let mut vips = BTreeSet::new();
    let mut tunnel = false;
    for s in &config.services {
        for v in s.servers.iter().filter(|v| mine.contains(&v.address)) {
            match v.method {
                Method::Direct => {
                    vips.insert(s.vip);
                }
                Method::Tunnel => {
                    vips.insert(s.vip);
                    tunnel = true;
                }
                Method::Nat | Method::Local => {}
            }
        }
    }
    (vips, tunnel)
}

impl Daemon {
    pub(super) async fn start_node(&mut self, addr: IpAddr) -> Result<()> {
        info!("Running as a real server (node role) for {addr}");
        for a in self.net.remove_marked(Mark::Vip).await? {
            info!("Removed stale alias {}/{} ({})", a.addr, a.prefix, a.label);
        }
        self.part = Part::Node(Box::default());
        let summary = self.apply_node(addr).await?;
        if summary.is_empty() {
            info!("This server is NAT-only: nothing to configure");
        }
        Ok(())
    }

    /// Brings the node in line with the config: returns what changed, each also logged.
    pub(super) async fn apply_node(&mut self, addr: IpAddr) -> Result<String> {
        let local = self
            .net
            .addresses()
            .await
            .context("listing local addresses")?;
        let iface = local
            .iter()
            .find(|a| a.addr == addr)
            .map(|a| a.interface().to_string())
            .ok_or_else(|| anyhow!("no interface holds {addr}"))?;
        // Not the VIPs this node put on `lo` itself: only its own addresses.
        let mine: Vec<IpAddr> = local
            .iter()
            .filter(|a| !a.is(Mark::Vip))
            .map(|a| a.addr)
            .collect();
        let (vips, tunnel) = wants(&self.config, &mine);
        // Both families: IPIP comes from an ATM's IPv4 address, IPv6-in-IPv6 from its IPv6.
        let atms: Vec<lb_common::Addr> = self
            .config
            .atms
            .iter()
            .flat_map(|a| a.addresses())
            .map(Into::into)
            .collect();
        let node = self.part.node_mut().ok_or_else(|| anyhow!("not a node"))?;
        let lo = addrs::ifindex("lo").ok_or_else(|| anyhow!("no lo interface"))?;
        let mut changed = Vec::new();
        for vip in node.vips.iter().filter(|v| !vips.contains(v)) {
            self.net.del(lo, *vip, addrs::host_prefix(*vip)).await?;
            changed.push(format!(
                "VIP {vip} removed from {}",
                alias_name("lo", *vip, Mark::Vip)
            ));
        }
        for vip in vips.iter().filter(|v| !node.vips.contains(v)) {
            self.net
                .add(lo, "lo", *vip, addrs::host_prefix(*vip), Mark::Vip)
                .await?;
            changed.push(format!(
                "VIP {vip} configured on {}",
                alias_name("lo", *vip, Mark::Vip)
            ));
        }
        node.vips = vips.iter().copied().collect();
        if !vips.is_empty() && node.arp_quiet.as_deref() != Some(iface.as_str()) {
            for (k, v) in [
                ("all", "arp_ignore=1"),
                ("all", "arp_announce=2"),
                (iface.as_str(), "arp_ignore=1"),
                (iface.as_str(), "arp_announce=2"),
            ] {
                let (key, val) = v.split_once('=').expect("key=value");
                let path = format!("/proc/sys/net/ipv4/conf/{k}/{key}");
                std::fs::write(&path, val).with_context(|| format!("writing {val} to {path}"))?;
            }
            node.arp_quiet = Some(iface.clone());
            changed.push(format!(
                "ARP for the VIPs silenced: arp_ignore=1, arp_announce=2 on all and {iface}"
            ));
        }
        match (&mut node.decap, tunnel) {
            (None, true) => {
                let mut dp = Dataplane::load(Capacities {
                    services: 1,
                    servers: 1,
                    connections: 1,
                })?;
                dp.set_decap_sources(&atms)?;
                let mode = dp.attach_decap(&iface, AttachMode::Auto)?;
                changed.push(format!(
                    "lb_decap attached to {iface} in {} mode for tunnels from {} ATM addresses",
                    mode.name(),
                    atms.len()
                ));
                node.decap = Some(dp);
            }
            (Some(dp), true) => dp.set_decap_sources(&atms)?,
            (Some(_), false) => {
                // Dropping the dataplane detaches the program.
                node.decap = None;
                changed.push(format!(
                    "lb_decap detached from {iface}: no tunnel service here any more"
                ));
            }
            (None, false) => {}
        }
        for c in &changed {
            info!("{c}");
        }
        Ok(changed.join("; "))
    }

    /// A node's reload: its VIPs on `lo`, the ARP settings and lb_decap follow the config,
    /// as they do at start, and the log says what changed.
    pub(super) async fn apply_node_config(&mut self, new: Config) -> Result<String, String> {
        let Role::Node(addr) = self.role else {
            return Err("this is not a node".into());
        };
        let old = std::mem::replace(&mut self.config, new);
        self.timeouts = self.config.cluster.timeouts;
        self.debug = self.config.cluster.debug;
        match self.apply_node(addr).await {
            Ok(changed) if changed.is_empty() => {
                let msg = "Reloaded (node role): nothing to change here".to_string();
                info!("{msg}");
                Ok(msg)
            }
            Ok(changed) => {
                let msg = format!("Reloaded (node role): {changed}");
                info!("{msg}");
                Ok(msg)
            }
            Err(e) => {
                self.config = old;
                Err(format!("Reload failed: {e:#}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dual_stack_node_serves_the_vips_of_both_its_addresses() {
        let text = "[cluster]\nname = \"c\"\n[[atm]]\nname = \"atm1\"\naddress = \"192.0.2.2\"\n\
                    address6 = \"2001:db8::2\"\ninterface = \"eth0\"\n\
                    [[service]]\nname = \"http\"\nvip = \"192.0.2.100\"\nport = 80\n\
                    [[service.server]]\nname = \"s1\"\naddress = \"192.0.2.11\"\n\
                    [[service]]\nname = \"http6\"\nvip = \"2001:db8::100\"\nport = 80\n\
                    [[service.server]]\nname = \"s1\"\naddress = \"2001:db8::11\"\n\
                    method = \"tunnel\"\n";
        let c = crate::config::parse(text, std::path::Path::new("/")).unwrap();
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        let (vips, tunnel) = wants(&c, &[ip("192.0.2.11"), ip("2001:db8::11")]);
        assert_eq!(
            vips.into_iter().collect::<Vec<_>>(),
            [ip("192.0.2.100"), ip("2001:db8::100")]
        );
        assert!(tunnel);
        let (vips, tunnel) = wants(&c, &[ip("192.0.2.11")]);
        assert_eq!(vips.into_iter().collect::<Vec<_>>(), [ip("192.0.2.100")]);
        assert!(!tunnel);
    }
}
