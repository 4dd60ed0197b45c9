//! Tier 3: lb as a promotable clone (the OCF agent dist/ocf/lb, `[ha] manager =
//! "pacemaker"`) in a real three-node Pacemaker + Corosync cluster. Each node is an ATM's
//! network namespace with a private mount namespace of its own for /etc/corosync,
//! /var/lib/pacemaker, /var/lib/corosync, /run, /dev/shm and the agent's directory
//! (`../shared/PACEMAKER.md`'s recipe). The CIB is loaded with the `crm configure` text of
//! docs/HA.md, "Pacemaker", read from the document itself.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    cluster,
    lab::{BIG_BYTES, Lab},
    procs::{Daemon, bin},
};

const START: Duration = Duration::from_secs(20);
/// Corosync forms its membership and Pacemaker elects its DC in about 30 s here.
const QUORATE: Duration = Duration::from_secs(90);

/// The three Pacemaker nodes: per node, the shell that holds its mount namespace (corosync
/// and pacemakerd are its children). Dropping it kills every process in the nodes' network
/// namespaces, lb-daemon included, before the lab deletes them.
struct Nodes {
    shells: Vec<(String, Child)>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for _ in 0..3 {
            for (ns, _) in &self.shells {
                let out = Command::new("ip").args(["netns", "pids", ns]).output();
                for pid in out
                    .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                    .unwrap_or_default()
                    .split_whitespace()
                {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill(2) on a process of a namespace this test made.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
        for (_, child) in &mut self.shells {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Cluster {
    // Fields drop in order: the nodes' processes first, then the servers, then the lab.
    nodes: Nodes,
    _servers: Vec<Daemon>,
    dir: PathBuf,
    lab: Lab,
}

fn config(dir: &Path) -> String {
    let mut c = format!(
        r#"[cluster]
name = "lab"
timeout = 100
auth_key_file = "{key}"

[ha]
heartbeat_ms = 100
dead_after = 3
manager = "pacemaker"

[control]
socket = "/run/lb/control.sock"
mount = "/run/lb/tables"
metrics = "off"

[[service]]
name = "http"
vip = "{vip}"
port = 80
scheduler = "maglev"
[service.check]
kind = "none"
"#,
        key = dir.join("authkey").display(),
        vip = cluster::VIP
    );
    for i in 1..=3 {
        c += &format!(
            "[[service.server]]\nname = \"s{i}\"\naddress = \"{}\"\nmethod = \"direct\"\n",
            cluster::server_addr(i)
        );
    }
    for i in 1..=3 {
        c += &format!(
            "[[atm]]\nname = \"{}\"\naddress = \"{}\"\ninterface = \"eth0\"\n",
            cluster::atm(i),
            cluster::atm_addr(i)
        );
    }
    c
}

fn corosync_conf() -> String {
    let mut nodes = String::new();
    for i in 1..=3 {
        nodes += &format!(
            "    node {{\n        ring0_addr: {}\n        name: {}\n        nodeid: {i}\n    }}\n",
            cluster::atm_addr(i),
            cluster::atm(i)
        );
    }
    format!(
        "totem {{\n    version: 2\n    cluster_name: lblab\n    transport: knet\n    \
         crypto_cipher: aes256\n    crypto_hash: sha256\n    token: 1000\n}}\n\
         nodelist {{\n{nodes}}}\n\
         quorum {{\n    provider: corosync_votequorum\n}}\n\
         logging {{\n    to_stderr: yes\n    to_syslog: no\n}}\n"
    )
}

/// The `crm configure` snippet of docs/HA.md, with this lab's paths for its placeholders.
fn crm_snippet(dir: &Path) -> String {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/HA.md"))
        .unwrap();
    let start = doc.find("```crm\n").expect("docs/HA.md has a ```crm block") + "```crm\n".len();
    let len = doc[start..].find("```").unwrap();
    doc[start..start + len]
        .replace(
            "/etc/lb/lb.toml",
            &dir.join("lb.toml").display().to_string(),
        )
        .replace(
            "/usr/local/sbin/lb-daemon",
            &bin("lb-daemon").display().to_string(),
        )
        .replace(
            "/usr/local/bin/lb-cli",
            &bin("lb-cli").display().to_string(),
        )
        .replace("/var/log/lb-daemon.log", "/run/lb/lb-daemon.log")
}

/// What each node's shell does in its own mount namespace before it starts corosync and
/// pacemakerd: PACEMAKER.md's binds and tmpfs mounts, and the agent installed where
/// Pacemaker looks for ocf:lb:atm.
fn node_script(d: &Path, agent: &Path) -> String {
    format!(
        r#"set -e
D={d}
mkdir -p $D/corosync $D/corosync-lib $D/pacemaker/cib $D/pacemaker/pengine $D/pacemaker/blackbox $D/pacemaker/cores
cp {conf} $D/corosync/corosync.conf
cp {key} $D/corosync/authkey
chmod 0400 $D/corosync/authkey
mount --bind $D/corosync /etc/corosync
mount --bind $D/corosync-lib /var/lib/corosync
mount --bind $D/pacemaker /var/lib/pacemaker
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /usr/lib/ocf/resource.d
mkdir -p /run/crm /run/lb /run/resource-agents /usr/lib/ocf/resource.d/lb
install -m 0755 {agent} /usr/lib/ocf/resource.d/lb/atm
chown -R hacluster:haclient $D/pacemaker /run/crm
corosync -f &
sleep 1
/usr/sbin/pacemakerd &
wait
"#,
        d = d.display(),
        conf = d.parent().unwrap().join("corosync.conf").display(),
        key = d.parent().unwrap().join("corosync.key").display(),
        agent = agent.display(),
    )
}

impl Cluster {
    fn start() -> Cluster {
        let mut lab = Lab::new();
        cluster::build(&mut lab, 3, 3);
        let dir = lab.dir();
        let key = dir.join("authkey");
        std::fs::write(&key, b"lab-secret-0123456789").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        std::fs::write(dir.join("lb.toml"), config(&dir)).unwrap();
        std::fs::write(dir.join("corosync.conf"), corosync_conf()).unwrap();
        let ckey: Vec<u8> = (0..256u32).map(|i| (i * 151 + 7) as u8).collect();
        std::fs::write(dir.join("corosync.key"), ckey).unwrap();
        let mut servers = Vec::new();
        for i in 1..=3 {
            let ns = cluster::server(i);
            lab.nginx(&ns, &ns, &[80]);
            let mut d = Daemon::start(
                &mut lab,
                &ns,
                &dir.join("lb.toml"),
                &["--node", &format!("s{i}")],
            );
            d.wait_log("Control socket", START);
            servers.push(d);
        }
        let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/ocf/lb");
        let mut shells = Vec::new();
        for i in 1..=3 {
            let ns = lab.ns(&cluster::atm(i)).name().to_string();
            let d = dir.join(format!("pc{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let log = std::fs::File::create(dir.join(format!("pc{i}.log"))).unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", &ns, "unshare", "--mount", "--propagation"])
                .args(["private", "bash", "-c", &node_script(&d, &agent)])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            shells.push((ns, child));
        }
        let c = Cluster {
            nodes: Nodes { shells },
            _servers: servers,
            dir,
            lab,
        };
        c.wait(
            "a quorate partition with all three nodes online",
            QUORATE,
            |c| {
                let m = c.crm_mon();
                m.contains("partition with quorum") && m.contains("Online: [ atm1 atm2 atm3 ]")
            },
        );
        // The lab has no fencing device.
        let out = c.on(
            1,
            &[
                "crm",
                "configure",
                "property",
                "stonith-enabled=false",
                "no-quorum-policy=stop",
            ],
        );
        assert!(
            out.status.success(),
            "crm configure property: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cib = c.dir.join("lb.crm");
        std::fs::write(&cib, crm_snippet(&c.dir)).unwrap();
        let out = c.on(
            1,
            &["crm", "configure", "load", "update", cib.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "crm configure load update:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    /// Runs `args` inside node `i`'s network and mount namespaces.
    fn on(&self, i: usize, args: &[&str]) -> Output {
        let pid = self.nodes.shells[i - 1].1.id().to_string();
        Command::new("nsenter")
            .args(["-t", &pid, "-m", "-n", "--"])
            .args(args)
            .output()
            .unwrap()
    }

    fn crm_mon(&self) -> String {
        for i in 1..=3 {
            // A node whose corosync is gone still answers, with pacemakerd's state only.
            let out = self.on(i, &["crm_mon", "-1"]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if out.status.success() && text.contains("Current DC") {
                return text;
            }
        }
        String::new()
    }

    /// The node crm_mon names Promoted, if exactly one.
    fn promoted(&self) -> Option<usize> {
        let m = self.crm_mon();
        let line = m.lines().find(|l| l.contains("Promoted: ["))?;
        let names: Vec<&str> = line
            .split('[')
            .nth(1)?
            .split(']')
            .next()?
            .split_whitespace()
            .collect();
        match names.as_slice() {
            [one] => one.strip_prefix("atm")?.parse().ok(),
            _ => None,
        }
    }

    /// Which ATMs hold the VIP on eth0 right now.
    fn vip_holders(&self) -> Vec<usize> {
        (1..=3)
            .filter(|i| {
                self.lab
                    .ns(&cluster::atm(*i))
                    .exec_ok(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
                    .contains(&format!("{}/32", cluster::VIP))
            })
            .collect()
    }

    /// The pid of the process named `comm` in node `i`'s network namespace.
    fn pid_of(&self, i: usize, comm: &str) -> Option<i32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.nodes.shells[i - 1].0])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
            })
    }

    /// lb-daemon's log on node `i` (under its private /run).
    fn lb_log(&self, i: usize) -> String {
        let out = self.on(i, &["cat", "/run/lb/lb-daemon.log"]);
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn wait(&self, what: &str, limit: Duration, mut cond: impl FnMut(&Cluster) -> bool) {
        let t = Instant::now();
        while !cond(self) {
            if t.elapsed() > limit {
                let logs: String = (1..=3)
                    .map(|i| {
                        let pc = std::fs::read_to_string(self.dir.join(format!("pc{i}.log")))
                            .unwrap_or_default();
                        let tail: Vec<&str> = pc.lines().rev().take(25).collect();
                        format!(
                            "--- node {i}, last corosync/pacemaker lines:\n{}\n--- lb:\n{}\n",
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                            self.lb_log(i)
                        )
                    })
                    .collect();
                panic!(
                    "timed out after {limit:?} waiting for {what}\ncrm_mon:\n{}\n{logs}",
                    self.crm_mon()
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits for one Promoted instance, on a node that holds the VIP alone; returns it.
    fn wait_promoted(&self, limit: Duration) -> usize {
        let mut found = 0;
        self.wait(
            "one Promoted instance holding the VIP alone",
            limit,
            |c| match c.promoted() {
                Some(p) if c.vip_holders() == vec![p] => {
                    found = p;
                    true
                }
                _ => false,
            },
        );
        found
    }
}

#[test]
fn pacemaker_promotes_one_atm_moves_it_on_purpose_and_on_a_node_failure() {
    let c = Cluster::start();
    // Pacemaker runs the agent's validate-all with the resource's parameters.
    let out = c.on(1, &["crm_resource", "--validate", "--resource", "lb"]);
    assert!(
        out.status.success(),
        "crm_resource --validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let first = c.wait_promoted(Duration::from_secs(60));
    // crm_mon lists the other two together once their monitors are not in flight (a loaded
    // run caught both shown apart, "Unpromoted atm2 (Monitoring)", just after promotion).
    c.wait(
        "crm_mon to show the Unpromoted instances",
        Duration::from_secs(20),
        |c| c.crm_mon().contains("Unpromoted: ["),
    );
    eprintln!("Promoted: atm{first}");

    // A planned move under client load: not one request may fail.
    let target = if first == 1 { 2 } else { 1 };
    let stop = Arc::new(AtomicBool::new(false));
    let client = c.lab.ns("client").name().to_string();
    let load = {
        let stop = stop.clone();
        thread::spawn(move || {
            let ns = lb_tests::netns::NetNs::attach(&client);
            let _in = ns.enter();
            let (mut ok, mut failed) = (0, Vec::new());
            let t = Instant::now();
            while !stop.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(90) {
                match cluster::request(Duration::from_secs(5)) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("at {:?}: {e}", t.elapsed())),
                }
                thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        })
    };
    thread::sleep(Duration::from_secs(1));
    let node = cluster::atm(target);
    let out = c.on(
        first,
        &[
            "crm_resource",
            "--move",
            "--resource",
            "lb-clone",
            "--node",
            &node,
            "--promoted",
        ],
    );
    assert!(
        out.status.success(),
        "crm_resource --move: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait("the move", Duration::from_secs(60), |c| {
        c.promoted() == Some(target) && c.vip_holders() == vec![target]
    });
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = load.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "only {ok} requests");
    eprintln!("planned move atm{first} -> atm{target}: {ok} requests, none failed");
    // Let the role stay where it is from now on, whatever the move's constraint said.
    c.on(
        target,
        &["crm_resource", "--clear", "--resource", "lb-clone"],
    );

    // A long transfer through the VIP, then the promoted node's corosync killed.
    let client = c.lab.ns("client").name().to_string();
    let done = Arc::new(AtomicBool::new(false));
    let transfer = cluster::big_download(client, done.clone());
    thread::sleep(Duration::from_secs(3));
    assert!(!done.load(Ordering::SeqCst), "the transfer must still run");
    // The other ATMs hold the transfer's connection, from the promoted one's sync stream.
    let cli = bin("lb-cli").display().to_string();
    for i in (1..=3).filter(|i| *i != target) {
        let conns = c.on(i, &[&cli, "cat", "connections"]);
        let text = String::from_utf8_lossy(&conns.stdout);
        assert!(
            text.lines().any(|l| l.contains(cluster::CLIENT)),
            "atm{i} has no connection of the client's: {text}"
        );
    }
    let pid = c
        .pid_of(target, "corosync")
        .expect("corosync runs on the promoted node");
    // SAFETY: kill(2) on a process of a namespace this test made.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let killed = Instant::now();
    let mut next = 0;
    c.wait("another node promoted", Duration::from_secs(60), |c| {
        let m = c.crm_mon();
        match c.promoted() {
            Some(p) if p != target && !m.is_empty() => {
                next = p;
                true
            }
            _ => false,
        }
    });
    c.wait(
        "the VIP at the new primary alone",
        Duration::from_secs(20),
        |c| c.vip_holders() == vec![next],
    );
    eprintln!(
        "corosync killed on atm{target}: atm{next} promoted and alone with the VIP after {:?}",
        killed.elapsed()
    );
    let (len, intact, took) = transfer
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the transfer broke: {e}"));
    assert_eq!(len, BIG_BYTES);
    assert!(intact, "corrupted");
    eprintln!("the 2 MB transfer through the VIP completed in {took:?}");
    let old = c.lb_log(target);
    assert!(
        old.contains("is primary with term"),
        "the cut-off node's lb stepped down on hearing the later promotion:\n{old}"
    );
}
