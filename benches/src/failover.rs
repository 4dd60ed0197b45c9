//! Failover time over repeated drills, lb beside keepalived's VRRP at equal timers (heartbeat
//! or advertisement every 100 ms, three missed = dead). Same topology (a client and two
//! balancers on one segment); the failure is the primary's link going down; the time is from
//! the cut to the first new connection the client completes through the VIP. Each drill cuts
//! whichever balancer is primary, then restores its link and waits for the cluster to settle.

use std::{
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_tests::{cluster, lab::Lab, netns::NetNs, procs::Daemon};

use crate::report;

/// Which balancer holds the VIP.
fn holder(lab: &Lab) -> Option<usize> {
    (1..=2).find(|i| {
        lab.ns(&cluster::atm(*i))
            .exec_ok(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
            .contains(&format!("{}/32", cluster::VIP))
    })
}

/// One connection through the VIP from the client namespace: connect, ask, get an answer.
fn serve_once(client: &str, vip: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let ns = NetNs::attach(client);
    let _in = ns.enter();
    let Ok(mut s) = TcpStream::connect_timeout(&vip, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
    let mut b = [0u8; 64];
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_ok() && matches!(s.read(&mut b), Ok(n) if n > 0)
}

/// Cuts `i`'s link, then times the first new connection through the VIP. A new attempt starts
/// every 5 ms, each on its own thread (at most ~120 at once: each gives up within 600 ms),
/// so the figure is within 5 ms of the moment the VIP serves again; one attempt at a time,
/// each waiting out its own timeout after a lost SYN, would round it up to the next attempt.
fn drill(lab: &Lab, i: usize) -> Result<f64> {
    let ns = lab.ns(&cluster::atm(i));
    let client = lab.ns("client").name().to_string();
    let vip: SocketAddr = format!("{}:80", cluster::VIP).parse()?;
    let (tx, rx) = std::sync::mpsc::channel::<f64>();
    ns.exec_ok(&["ip", "link", "set", "eth0", "down"]);
    let cut = Instant::now();
    let mut attempts = Vec::new();
    let ms = loop {
        if let Ok(ms) = rx.try_recv() {
            break ms;
        }
        if cut.elapsed() > Duration::from_secs(20) {
            bail!("no failover within 20 s");
        }
        let (tx, client) = (tx.clone(), client.clone());
        attempts.push(std::thread::spawn(move || {
            if serve_once(&client, vip) {
                let _ = tx.send(cut.elapsed().as_secs_f64() * 1000.0);
            }
        }));
        attempts.retain(|t| !t.is_finished());
        std::thread::sleep(Duration::from_millis(5));
    };
    for t in attempts {
        let _ = t.join();
    }
    ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
    // Let the cluster settle: one holder, the restored balancer back as backup.
    std::thread::sleep(Duration::from_secs(2));
    Ok(ms)
}

fn lb_rig() -> Result<(Lab, Vec<Daemon>)> {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 2, 1);
    lab.nginx("s1", "s1", &[80]);
    let dir = lab.dir();
    let key = dir.join("authkey");
    std::fs::write(&key, b"benchmark-key-0123456789")?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let config = format!(
        "[cluster]\nname = \"bench\"\nauth_key_file = \"{}\"\n[ha]\nheartbeat_ms = 100\ndead_after = 3\n\
         [[atm]]\nname = \"atm1\"\naddress = \"{}\"\ninterface = \"eth0\"\n\
         [[atm]]\nname = \"atm2\"\naddress = \"{}\"\ninterface = \"eth0\"\n\
         [[service]]\nname = \"http\"\nvip = \"{}\"\nport = 80\n[service.check]\nkind = \"none\"\n\
         [[service.server]]\nname = \"s1\"\naddress = \"{}\"\nping = false\n",
        key.display(),
        cluster::atm_addr(1),
        cluster::atm_addr(2),
        cluster::VIP,
        cluster::server_addr(1)
    );
    let path = dir.join("lb.toml");
    std::fs::write(&path, config)?;
    let mut node = Daemon::start(&mut lab, "s1", &path, &["--node", "s1"]);
    node.wait_log("Control socket", Duration::from_secs(20));
    let mut a1 = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    a1.wait_log("This ATM is primary", Duration::from_secs(20));
    let mut a2 = Daemon::start(&mut lab, &cluster::atm(2), &path, &[]);
    a2.wait_log("is primary", Duration::from_secs(20));
    Ok((lab, vec![a1, a2, node]))
}

fn keepalived_rig() -> Result<Lab> {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 2, 0);
    for i in 1..=2 {
        let ns = cluster::atm(i);
        // Each balancer serves the VIP itself: VRRP moves an address, nothing more.
        lab.nginx(&ns, &ns, &[80]);
        let dir = lab.dir().join(format!("keepalived-{ns}"));
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("keepalived.conf");
        std::fs::write(
            &conf,
            format!(
                "global_defs {{\n  vrrp_version 3\n  script_user root\n  enable_script_security\n}}\n\
                 vrrp_instance vip {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  priority {}\n\
                 advert_int 0.1\n  nopreempt\n  virtual_ipaddress {{\n    {}/32 dev eth0\n  }}\n}}\n",
                110 - i * 10,
                cluster::VIP
            ),
        )?;
        let d = dir.display();
        lab.spawn(
            &ns,
            &[
                "keepalived",
                "-n",
                "-l",
                "-P",
                "-f",
                conf.to_str().unwrap(),
                "-p",
                &format!("{d}/k.pid"),
                "-r",
                &format!("{d}/v.pid"),
            ],
        );
    }
    lab.wait_for(
        "keepalived to elect a master",
        Duration::from_secs(20),
        || holder(&lab).is_some(),
    );
    std::thread::sleep(Duration::from_secs(1));
    Ok(lab)
}

pub fn run(drills: usize) -> Result<()> {
    let mut lb = Vec::new();
    {
        let (lab, _daemons) = lb_rig()?;
        for _ in 0..drills {
            let p = holder(&lab).context("no balancer holds the VIP")?;
            lb.push(drill(&lab, p)?);
        }
    }
    let mut ka = Vec::new();
    {
        let lab = keepalived_rig()?;
        for _ in 0..drills {
            let p = holder(&lab).context("no keepalived holds the VIP")?;
            ka.push(drill(&lab, p)?);
        }
    }
    report("failover", "lb (heartbeat 100 ms, dead after 3)", "ms", lb);
    report("failover", "keepalived VRRPv3 (advert 0.1 s)", "ms", ka);
    Ok(())
}
