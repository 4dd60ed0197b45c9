//! Tier 3: IPv6 through the real daemon in a dual-stack lab. A VIP of each family in front
//! of the same three nginx servers by direct routing: real HTTP over both, the tables in
//! ipvsadm's `[addr]:port` form, and a health check taking an IPv6 server down and up.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use lb_tests::{cluster, lab::Lab, procs::Daemon};

const START: Duration = Duration::from_secs(20);
const VIP6: &str = "2001:db8::100";
const CLIENT6: &str = "2001:db8::50";

fn server6(i: usize) -> String {
    format!("2001:db8::{}", 10 + i)
}

fn atm6(i: usize) -> String {
    format!("2001:db8::{}", 1 + i)
}

/// The standard segment with IPv6 beside IPv4 in every namespace (2001:db8::/64, `nodad`).
fn dual_stack_lab() -> (Lab, PathBuf) {
    let mut lab = Lab::new();
    lab.switch("sw");
    let mut hosts = vec![(
        "client".to_string(),
        cluster::CLIENT.to_string(),
        CLIENT6.to_string(),
    )];
    hosts.push((cluster::atm(1), cluster::atm_addr(1), atm6(1)));
    for i in 1..=3 {
        hosts.push((cluster::server(i), cluster::server_addr(i), server6(i)));
    }
    for (ns, v4, v6) in &hosts {
        lab.add_ns(ns);
        lab.ipv6(ns);
        lab.plug(ns, "eth0", "sw");
        lab.addr(ns, "eth0", &format!("{v4}/{}", cluster::PREFIX));
        lab.ns(ns).exec_ok(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
    }
    for i in 1..=3 {
        let ns = cluster::server(i);
        cluster::hold_vip_on_lo(&lab, &ns, cluster::VIP);
        // Linux answers neighbour solicitations only for addresses on the interface asked:
        // the VIP on `lo` stays silent, as arp_ignore makes IPv4's.
        lab.ns(&ns).exec_ok(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{VIP6}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
        lab.nginx(&ns, &ns, &[80]);
    }
    let mut c = format!(
        r#"[cluster]
name = "lab6"

[[atm]]
name = "atm1"
address = "{atm}"
interface = "eth0"
"#,
        atm = cluster::atm_addr(1),
    );
    for (name, vip, addr) in [
        (
            "http",
            cluster::VIP.to_string(),
            cluster::server_addr as fn(usize) -> String,
        ),
        ("http6", VIP6.to_string(), server6 as fn(usize) -> String),
    ] {
        c += &format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nscheduler = \"rr\"\n\
             [service.check]\nkind = \"http\"\npath = \"/\"\ninterval_ms = 300\ntimeout_ms = 1000\n\
             rise = 1\nfall = 2\n"
        );
        for i in 1..=3 {
            c += &format!(
                "[[service.server]]\nname = \"web{i}\"\naddress = \"{}\"\n",
                addr(i)
            );
        }
    }
    let path = lab.dir().join("lb.toml");
    std::fs::write(&path, c).unwrap();
    (lab, path)
}

/// One GET over a new connection to `vip`:80 from the client; the answering server's name.
fn get(lab: &Lab, vip: &str) -> Result<String, String> {
    let _in = lab.ns("client").enter();
    let to = SocketAddr::new(vip.parse().unwrap(), 80);
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .map_err(|e| format!("connect to {to}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send to {to}: {e}"))?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .map_err(|e| format!("read from {to}: {e}"))?;
    body.rsplit("\r\n\r\n")
        .next()
        .map(|b| b.trim().to_string())
        .ok_or_else(|| format!("no body from {to}"))
}

#[test]
fn http_over_ipv6_and_ipv4_through_the_same_servers_with_checks_and_tables() {
    let (mut lab, path) = dual_stack_lab();
    let mut d = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    d.wait_log("This ATM is primary", START);
    let held = lab
        .ns(&cluster::atm(1))
        .exec_ok(&["ip", "-6", "addr", "show", "dev", "eth0"]);
    // The v6 VIP is held, with no duplicate address detection to wait out, and deprecated:
    // never the source of the ATM's own traffic (its health checks).
    let vip_line = held
        .lines()
        .find(|l| l.contains(&format!("{VIP6}/128")))
        .unwrap_or_else(|| panic!("no {VIP6}/128 on eth0:\n{held}"));
    assert!(
        !vip_line.contains("tentative") && vip_line.contains("deprecated"),
        "{held}"
    );
    lab.wait_for("every server up", Duration::from_secs(10), || {
        d.cat("servers").matches(" up ").count() == 6
    });

    // Both families, round robin over the three servers, no request failing.
    for vip in [VIP6, cluster::VIP] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..30 {
            seen.insert(get(&lab, vip).unwrap_or_else(|e| panic!("{e}\n{}", d.log())));
        }
        assert_eq!(seen.len(), 3, "{vip}: {seen:?}");
    }

    // The tables write IPv6 addresses as ipvsadm does.
    let services = d.cat("services");
    assert!(
        services.contains(&format!("tcp [{VIP6}]:80 up ")),
        "{services}"
    );
    assert!(
        services.contains(&format!("tcp {}:80 up ", cluster::VIP)),
        "{services}"
    );
    let servers = d.cat("servers");
    assert!(
        servers.contains(&format!("tcp [{}]:80 [{VIP6}]:80 up ", server6(1))),
        "{servers}"
    );
    let conns = {
        let _keep = get(&lab, VIP6).unwrap();
        d.cat("connections")
    };
    assert!(conns.contains(&format!("tcp [{CLIENT6}]:")), "{conns}");

    // A failed check takes the v6 line of s2 down (its v4 line too: the same nginx), and
    // no request goes there; back up, it takes requests again.
    lab.kill(&cluster::server(2));
    lab.wait_for("web2 down", Duration::from_secs(10), || {
        d.cat("servers")
            .contains(&format!("tcp [{}]:80 [{VIP6}]:80 down ", server6(2)))
    });
    for _ in 0..12 {
        let who = get(&lab, VIP6).unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        assert_ne!(who, cluster::server(2));
    }
    lab.nginx(&cluster::server(2), &cluster::server(2), &[80]);
    lab.wait_for("web2 up again", Duration::from_secs(10), || {
        d.cat("servers")
            .contains(&format!("tcp [{}]:80 [{VIP6}]:80 up ", server6(2)))
    });
    let mut back = false;
    for _ in 0..12 {
        back |= get(&lab, VIP6).unwrap() == cluster::server(2);
    }
    assert!(back, "web2 takes requests again");
    // Killed, the daemon leaves its IPv6 alias; the next start finds it by its address
    // protocol (IPv6 addresses have no labels) and removes it before anything else.
    d.kill();
    let held = lab
        .ns(&cluster::atm(1))
        .exec_ok(&["ip", "-6", "addr", "show", "dev", "eth0"]);
    assert!(held.contains(VIP6), "{held}");
    let mut d = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    d.wait_log(&format!("Removed stale alias {VIP6}/128"), START);
    d.wait_log("This ATM is primary", START);
    assert!(d.stop(), "the daemon stops cleanly");
    // Its IPv6 alias goes with it.
    let held = lab
        .ns(&cluster::atm(1))
        .exec_ok(&["ip", "-6", "addr", "show", "dev", "eth0"]);
    assert!(!held.contains(VIP6), "{held}");
}
