//! Tier 3: IPv6 through the real daemon. A dual-stack lab: a VIP of each family in front of
//! the same three nginx servers by direct routing, real HTTP over both, the tables in
//! ipvsadm's `[addr]:port` form, and a health check taking an IPv6 server down and up. And
//! an IPv6-only cluster of two ATMs (heartbeats and sync over IPv6) with a service in each
//! method: long transfers across a SIGKILL failover, and drills under load. And every check
//! kind (ICMPv6 ping, tcp, https, script) against servers at their IPv6 addresses. And
//! persistence by an IPv6 client prefix.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    cluster::{self, CLIENT6, VIP6, atm6, nat6, server6},
    lab::Lab,
    procs::Daemon,
};

const START: Duration = Duration::from_secs(20);

/// The standard segment with IPv6 beside IPv4 ([`cluster::build_dual_stack`]), one ATM, and
/// the servers holding both VIPs on `lo` and running nginx; a config with a VIP of each
/// family, direct routing to the same three servers.
fn dual_stack_lab() -> (Lab, PathBuf) {
    let mut lab = Lab::new();
    cluster::build_dual_stack(&mut lab, 1, 3);
    for i in 1..=3 {
        let ns = cluster::server(i);
        cluster::hold_vip_on_lo(&lab, &ns, cluster::VIP);
        // Linux answers neighbour solicitations only for addresses on the interface asked:
        // the VIP on `lo` stays silent, as arp_ignore makes IPv4's.
        lab.addr6(&ns, "lo", &format!("{VIP6}/128"));
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
    // lb-cli's listings and JSON, and /metrics, carry the IPv6 addresses as such.
    let servers_json: serde_json::Value =
        serde_json::from_str(&d.cli_ok(&["list", "servers", "--json"])).unwrap();
    let v6_line = servers_json
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["address"] == server6(1))
        .unwrap_or_else(|| panic!("no {} in {servers_json}", server6(1)));
    assert_eq!(v6_line["vip"], VIP6, "{v6_line}");
    let listed = d.cli_ok(&["list", "connections"]);
    assert!(listed.contains(&format!("[{CLIENT6}]:")), "{listed}");
    let metrics = d.scrape(&lab);
    for want in [
        format!("lb_service_up{{port=\"80\",protocol=\"tcp\",service=\"http6\",vip=\"{VIP6}\"}} 1"),
        format!(
            "lb_server_up{{address=\"{}\",port=\"80\",server=\"web1\",service=\"http6\"}} 1",
            server6(1)
        ),
    ] {
        assert!(metrics.contains(&want), "no {want} in:\n{metrics}");
    }
    lb_tests::procs::promtool_check(&metrics);

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

/// The ports of the HA lab's three IPv6 services on [`VIP6`]: direct, tunnel, NAT66.
const PORTS: [(u16, &str); 3] = [(80, "direct"), (81, "tunnel"), (82, "nat")];

/// A cluster over IPv6 alone: two ATMs whose `address`es are IPv6 (heartbeats and sync over
/// IPv6), three servers running lb-daemon in node role, and one IPv6 VIP with a service in
/// each method. The lab, the daemons (atm1 primary, atm2 backup) and the nodes.
struct Ha6 {
    atms: Vec<Option<Daemon>>,
    _nodes: Vec<Daemon>,
    path: PathBuf,
    lab: Lab,
}

impl Ha6 {
    fn new() -> Ha6 {
        // IPv4 is there too, but nothing in this cluster uses it.
        let mut lab = Lab::new();
        cluster::build_dual_stack(&mut lab, 2, 3);
        let dir = lab.dir();
        let key = dir.join("authkey");
        std::fs::write(&key, b"lab-secret-0123456789").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let mut c = format!(
            "[cluster]\nname = \"lab6\"\nauth_key_file = \"{}\"\n\n[ha]\nheartbeat_ms = 100\n\
             dead_after = 3\n\n[nat]\nsubnet6 = \"2001:db8:1::/64\"\ngateway6 = \"{}\"\n",
            key.display(),
            cluster::NAT6_GATEWAY
        );
        for i in 1..=2 {
            c += &format!(
                "\n[[atm]]\nname = \"{}\"\naddress = \"{}\"\ninterface = \"eth0\"\n",
                cluster::atm(i),
                atm6(i)
            );
        }
        for (port, method) in PORTS {
            c += &format!(
                "\n[[service]]\nname = \"{method}6\"\nvip = \"{VIP6}\"\nport = {port}\n\
                 [service.check]\nkind = \"http\"\npath = \"/\"\ninterval_ms = 300\n\
                 timeout_ms = 250\nrise = 2\nfall = 2\n"
            );
            for i in 1..=3 {
                let (addr, server_port) = if method == "nat" {
                    (nat6(10 + i), 8080)
                } else {
                    (server6(i), port)
                };
                c += &format!(
                    "[[service.server]]\nname = \"s{i}\"\naddress = \"{addr}\"\nport = {server_port}\n\
                     method = \"{method}\"\n"
                );
            }
        }
        let path = dir.join("lb.toml");
        std::fs::write(&path, c).unwrap();
        let mut nodes = Vec::new();
        for i in 1..=3 {
            let ns = cluster::server(i);
            lab.nginx(&ns, &ns, &[80, 81, 8080]);
            let mut d = Daemon::start(&mut lab, &ns, &path, &["--node", &ns]);
            d.wait_log("Control socket", START);
            nodes.push(d);
        }
        let mut atm1 = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
        atm1.wait_log("This ATM is primary", START);
        let mut atm2 = Daemon::start(&mut lab, &cluster::atm(2), &path, &[]);
        atm2.wait_log(&format!("ATM atm1 ({}) is primary", atm6(1)), START);
        Ha6 {
            atms: vec![Some(atm1), Some(atm2)],
            _nodes: nodes,
            path,
            lab,
        }
    }

    fn atm(&self, i: usize) -> &Daemon {
        self.atms[i - 1].as_ref().unwrap()
    }

    /// Which ATMs hold the IPv6 VIP on their interface.
    fn vip_holders(&self) -> Vec<usize> {
        (1..=2)
            .filter(|i| {
                self.lab
                    .ns(&cluster::atm(*i))
                    .exec_ok(&["ip", "-6", "-o", "addr", "show", "dev", "eth0"])
                    .contains(&format!("{VIP6}/128"))
            })
            .collect()
    }
}

/// One HTTP/1.0 GET of `path` from [`VIP6`]`:port` on a new connection, from the namespace
/// the thread is in, each step allowed `timeout`: the body.
fn get6(port: u16, path: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let to = SocketAddr::new(VIP6.parse().unwrap(), port);
    let mut s =
        TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect to {to}: {e}"))?;
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .map_err(|e| format!("send to {to}: {e}"))?;
    let mut answer = Vec::new();
    let r = s.read_to_end(&mut answer);
    r.map_err(|e| format!("{to}{path}: after {} bytes: {e}", answer.len()))?;
    let head = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{to}{path}: no header end"))?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "{to}{path}: {:?}",
            String::from_utf8_lossy(&answer[..head])
        ));
    }
    Ok(answer[head + 4..].to_vec())
}

/// The legs in ATM `i`'s connections table, `proto client vip server`, of at least
/// `packets` packets there.
fn legs(c: &Ha6, i: usize, packets: u64) -> Vec<String> {
    let mut v: Vec<String> = c
        .atm(i)
        .cat("connections")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[5].parse::<u64>().unwrap() >= packets)
                .then(|| format!("{} {} {} {}", f[0], f[1], f[2], f[4]))
        })
        .collect();
    v.sort();
    v
}

/// Heartbeats and sync over IPv6, and every method over IPv6 across a failover: a long
/// download through each of the three services survives a SIGKILL of the primary, then
/// promote/demote drills move the role back and forth under load with no failed request.
#[test]
fn an_ipv6_cluster_keeps_long_transfers_in_every_method_across_a_sigkill_and_drills() {
    let mut c = Ha6::new();
    c.lab
        .wait_for("every server up", Duration::from_secs(15), || {
            c.atm(1).cat("servers").matches(" up ").count() == 9
        });
    // The backup hears the primary over IPv6.
    let atms = c.atm(2).cat("atms");
    assert!(
        atms.contains(&format!("atm1 {} primary online", atm6(1))),
        "{atms}"
    );
    // What node role set up on a server: the v6 VIP on lo, lb_decap for IPv6-in-IPv6.
    let s1 = c.lab.ns(&cluster::server(1));
    let lo = s1.exec_ok(&["ip", "-6", "-o", "addr", "show", "dev", "lo"]);
    assert!(lo.contains(&format!("{VIP6}/128")), "{lo}");
    let link = s1.exec_ok(&["ip", "-d", "link", "show", "dev", "eth0"]);
    assert!(link.contains("prog/xdp"), "{link}");
    let nat = c.atm(1).cat("nat");
    assert_eq!(nat, "2001:db8:1:: 64\n");

    // Each service answers, from every server.
    let client = c.lab.ns("client").name().to_string();
    {
        let _in = c.lab.ns("client").enter();
        for (port, method) in PORTS {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..24 {
                let body = get6(port, "/", Duration::from_secs(2))
                    .unwrap_or_else(|e| panic!("{method}: {e}\n{}", c.atm(1).log()));
                seen.insert(String::from_utf8(body).unwrap());
            }
            assert_eq!(seen.len(), 3, "{method}: {seen:?}");
        }
    }

    // A /big download (2 MB at 160 kB/s) through each service; the primary dies 3 s in.
    let transfers: Vec<_> = PORTS
        .iter()
        .map(|&(port, method)| {
            let client = client.clone();
            std::thread::spawn(move || {
                let ns = lb_tests::netns::NetNs::attach(&client);
                let _in = ns.enter();
                let started = Instant::now();
                let body = get6(port, "/big", Duration::from_secs(10))
                    .map_err(|e| format!("{method}: {e}"))?;
                Ok::<_, String>((method, body, started.elapsed()))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    // The backup holds each transfer's connection with the same server (and translation).
    // (The backup counts no packets of them: they went through the primary.)
    let busy = legs(&c, 1, 10);
    assert_eq!(
        busy.len(),
        4,
        "three client legs, one NAT66 reply leg: {busy:?}"
    );
    let on_backup = legs(&c, 2, 0);
    for leg in &busy {
        assert!(
            on_backup.contains(leg),
            "{leg} is not synced to the backup: {on_backup:?}"
        );
    }
    c.atms[0].as_mut().unwrap().kill();
    c.atms[1]
        .as_mut()
        .unwrap()
        .wait_log("This ATM is primary", Duration::from_secs(5));
    for t in transfers {
        let (method, body, took) = t
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("a transfer broke: {e}\n{}", c.atm(2).log()));
        assert_eq!(body.len(), lb_tests::lab::BIG_BYTES, "{method}");
        assert!(
            body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8),
            "{method}: corrupted"
        );
        assert!(took >= Duration::from_secs(10), "{method}: {took:?}");
    }
    // The killed primary's kernel still holds the VIP, but its orphaned dataplane fences it
    // (drops neighbour solicitations for it): the client reaches the VIP at atm2's MAC.
    let mac_of = |ns: &str| {
        c.lab
            .ns(ns)
            .exec_ok(&["cat", "/sys/class/net/eth0/address"])
            .trim()
            .to_string()
    };
    let atm2_mac = mac_of(&cluster::atm(2));
    let neigh = c
        .lab
        .ns("client")
        .exec_ok(&["ip", "-6", "neigh", "show", VIP6, "dev", "eth0"]);
    assert!(neigh.contains(&atm2_mac), "{neigh} (atm2 is {atm2_mac})");

    // atm1 comes back as backup; drills move the role to it and back under load.
    let d = Daemon::start(&mut c.lab, &cluster::atm(1), &c.path, &[]);
    c.atms[0] = Some(d);
    c.atms[0]
        .as_mut()
        .unwrap()
        .wait_log(&format!("ATM atm2 ({}) is primary", atm6(2)), START);
    // Start-up joins the election before it mounts the tables (and first detaches the
    // killed daemon's dead mount), so it may name the primary before they are readable.
    c.lab
        .wait_for("atm1 sees every server up", Duration::from_secs(10), || {
            std::fs::read_to_string(c.atm(1).mount.join("servers"))
                .is_ok_and(|t| t.matches(" up ").count() == 9)
        });
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = PORTS
        .iter()
        .map(|&(port, method)| {
            let (stop, client) = (stop.clone(), client.clone());
            std::thread::spawn(move || {
                let ns = lb_tests::netns::NetNs::attach(&client);
                let _in = ns.enter();
                let start = Instant::now();
                let (mut ok, mut failed) = (0, Vec::new());
                while !stop.load(Ordering::SeqCst)
                    && start.elapsed() < Duration::from_secs(30)
                    && ok + failed.len() < 20_000
                {
                    let at = start.elapsed();
                    match get6(port, "/", Duration::from_secs(5)) {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(format!("{method} at {at:?}: {e}")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        let out = c.atm(1).cli_ok(&["promote"]);
        assert!(out.contains("atm1 is primary"), "{out}");
        assert_eq!(c.vip_holders(), vec![1]);
        std::thread::sleep(Duration::from_millis(500));
        let out = c.atm(1).cli_ok(&["demote"]);
        assert!(out.contains("handed over to atm2"), "{out}");
        c.lab
            .wait_for("atm2 to hold the VIP", Duration::from_secs(2), || {
                c.vip_holders() == vec![2]
            });
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut failed) = (0, Vec::new());
    for t in load {
        let (o, f) = t.join().unwrap();
        ok += o;
        failed.extend(f);
    }
    eprintln!(
        "IPv6 drills: 4 handovers, {ok} requests, {} failed",
        failed.len()
    );
    assert!(ok >= 100, "{ok} requests");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}\n=== atm1\n{}\n=== atm2\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        c.atm(1).log(),
        c.atm(2).log()
    );
}

/// Every check kind over IPv6, against real servers at their IPv6 addresses: a server that
/// drops ICMPv6 echo goes down on its ping, tcp and https (with the address literal) keep
/// the others up, and a script sees the IPv6 address in `LB_SERVER`.
#[test]
fn every_check_kind_runs_over_ipv6() {
    let mut lab = Lab::new();
    cluster::build_dual_stack(&mut lab, 1, 3);
    for i in 1..=3 {
        let ns = cluster::server(i);
        if i == 1 {
            let cert = rcgen::generate_simple_self_signed(vec![server6(1)]).unwrap();
            lab.nginx_tls(
                &ns,
                &ns,
                &[80, 8080],
                Some((443, &cert.cert.pem(), &cert.signing_key.serialize_pem())),
            );
        } else {
            lab.nginx(&ns, &ns, &[80, 8080]);
        }
    }
    lab.ns("s2")
        .nft_filter("noping", "input", "icmpv6 type echo-request drop");
    let seen = lab.dir().join("seen");
    let script = lab.dir().join("check.sh");
    lb_tests::lab::write_executable(
        &script,
        &format!(
            "#!/bin/sh\necho \"$LB_SERVER $LB_PORT\" >> {}\n[ \"$LB_SERVER\" = {} ]\n",
            seen.display(),
            server6(1)
        ),
    );
    let mut c = format!(
        "[cluster]\nname = \"checks6\"\n\n[[atm]]\nname = \"atm1\"\naddress = \"{}\"\n\
         interface = \"eth0\"\n",
        atm6(1)
    );
    for (name, port, check, servers) in [
        ("tcp6", 80, "kind = \"tcp\"".to_string(), &[1, 2, 3][..]),
        (
            "https6",
            443,
            "kind = \"https\"\npath = \"/\"\nverify = false".to_string(),
            &[1][..],
        ),
        (
            "script6",
            8080,
            format!("kind = \"script\"\nscript = \"{}\"", script.display()),
            &[1, 3][..],
        ),
    ] {
        c += &format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{VIP6}\"\nport = {port}\n\
             [service.check]\n{check}\ninterval_ms = 200\ntimeout_ms = 250\nrise = 2\nfall = 2\n"
        );
        for i in servers {
            c += &format!(
                "[[service.server]]\nname = \"s{i}\"\naddress = \"{}\"\n",
                server6(*i)
            );
        }
    }
    let path = lab.dir().join("lb.toml");
    std::fs::write(&path, c).unwrap();
    let mut d = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    d.wait_log("This ATM is primary", START);
    let line = |i: usize, port: u16| format!("tcp [{}]:{port} [{VIP6}]:{port} ", server6(i));
    lab.wait_for(
        "s2 down on its ping, s3 on its script",
        Duration::from_secs(10),
        || {
            let t = d.cat("servers");
            t.contains(&(line(2, 80) + "down")) && t.contains(&(line(3, 8080) + "down"))
        },
    );
    let log = d.log();
    assert!(
        log.contains(&format!(
            "s2 [{}]:80 down: no answer to ping within 250 ms",
            server6(2)
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "s3 [{}]:8080 down: script exited with exit status: 1",
            server6(3)
        )),
        "{log}"
    );
    // The others stay up well past fall intervals: tcp, https and the script's exit 0.
    std::thread::sleep(Duration::from_millis(1500));
    let t = d.cat("servers");
    for want in [line(1, 80), line(3, 80), line(1, 443), line(1, 8080)] {
        assert!(
            t.contains(&(want.clone() + "up")),
            "{want}up in:\n{t}\n{}",
            d.log()
        );
    }
    let seen = std::fs::read_to_string(&seen).unwrap();
    assert!(
        seen.lines().any(|l| l == format!("{} 8080", server6(1)))
            && seen.lines().any(|l| l == format!("{} 8080", server6(3))),
        "LB_SERVER and LB_PORT as the script saw them:\n{seen}"
    );
}

/// `persistence_netmask` of an IPv6 service: seven client addresses of one /120 stick to
/// the first one's server, where rr would spread them.
#[test]
fn ipv6_netmask_persistence_holds_across_clients_of_one_prefix() {
    let (mut lab, path) = dual_stack_lab();
    let text = std::fs::read_to_string(&path).unwrap();
    let http6 = format!("name = \"http6\"\nvip = \"{VIP6}\"\nport = 80\nscheduler = \"rr\"\n");
    assert!(text.contains(&http6), "{text}");
    std::fs::write(
        &path,
        text.replacen(
            &http6,
            &format!("{http6}persistence = 60\npersistence_netmask = 120\n"),
            1,
        ),
    )
    .unwrap();
    let mut d = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    d.wait_log("This ATM is primary", START);
    lab.wait_for("the IPv6 servers' checks", START, || {
        d.cat("servers").matches(" up").count() >= 6
    });
    // Six more addresses in the client's /120 (2001:db8::/120).
    let others: Vec<String> = (0x51..0x57).map(|i| format!("2001:db8::{i:x}")).collect();
    for a in &others {
        lab.addr6("client", "eth0", &format!("{a}/64"));
    }
    let from = |src: &str| -> String {
        let _in = lab.ns("client").enter();
        cluster::request_from_to(src, VIP6, Duration::from_secs(5)).unwrap()
    };
    let first = from(CLIENT6);
    for _ in 0..2 {
        for a in &others {
            assert_eq!(from(a), first, "{a}: the same /120 sticks together");
        }
    }
}
