//! Tier 3: changes to a running ATM that must apply whole or not at all, and that must not
//! stall its heartbeats: writes to the `config` table, reloads that change the table sizes,
//! the largest allowed resize and a 10 MB reload.

use std::{
    collections::BTreeMap,
    net::UdpSocket,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{cluster, lab::Lab, procs::Daemon};

const START: Duration = Duration::from_secs(20);

/// One ATM, two direct-routing services: http on :80 over servers 1-3, alt on :8080 over
/// servers 4-5 (each server runs nginx on both ports and holds the VIP on `lo`).
fn config(tables: &str, with_http: bool, extra: &str) -> String {
    let mut c = format!(
        r#"[cluster]
name = "lab"
{extra}
[tables]
{tables}

[[atm]]
name = "atm1"
address = "{atm}"
interface = "eth0"
"#,
        atm = cluster::atm_addr(1),
    );
    if with_http {
        c += &service("http", 80, 1..=3);
    }
    c += &service("alt", 8080, 4..=5);
    c
}

fn service(name: &str, port: u16, servers: std::ops::RangeInclusive<usize>) -> String {
    let mut c = format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{}\"\nport = {port}\nscheduler = \"rr\"\n\
         [service.check]\nkind = \"none\"\n",
        cluster::VIP
    );
    for i in servers {
        c += &format!(
            "[[service.server]]\nname = \"web{i}\"\naddress = \"{}\"\n",
            cluster::server_addr(i)
        );
    }
    c
}

fn lab() -> Lab {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 5);
    for i in 1..=5 {
        let ns = cluster::server(i);
        lab.nginx(&ns, &ns, &[80, 8080]);
        cluster::hold_vip_on_lo(&lab, &ns, cluster::VIP);
    }
    lab
}

fn start(lab: &mut Lab, path: &Path) -> Daemon {
    let mut d = Daemon::start(lab, &cluster::atm(1), path, &[]);
    d.wait_log("This ATM is primary", START);
    d
}

/// How many of `n` fresh connections to the VIP on `port` get an answer within 2 s.
fn answered(lab: &Lab, port: u16, n: usize) -> usize {
    let _in = lab.ns("client").enter();
    let vip: std::net::Ipv4Addr = cluster::VIP.parse().unwrap();
    (0..n)
        .filter(|_| {
            let Ok(mut s) =
                std::net::TcpStream::connect_timeout(&(vip, port).into(), Duration::from_secs(2))
            else {
                return false;
            };
            use std::io::{Read, Write};
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            if s.write_all(b"GET / HTTP/1.0\r\nHost: lb\r\n\r\n").is_err() {
                return false;
            }
            let mut body = String::new();
            s.read_to_string(&mut body).is_ok() && body.contains("200 OK")
        })
        .count()
}

#[test]
fn an_undersized_config_write_is_refused_and_changes_nothing() {
    let mut lab = lab();
    let path = lab.dir().join("lb.toml");
    std::fs::write(
        &path,
        config("services = 8\nservers = 32\nconnections = 65536", true, ""),
    )
    .unwrap();
    let mut d = start(&mut lab, &path);
    assert_eq!(answered(&lab, 80, 5), 5);
    assert_eq!(answered(&lab, 8080, 5), 5);

    // Two services of 3 and 2 servers: neither fits 1 service of 1 server, nor 3 services
    // of 2 servers, nor 1 service of 5.
    for value in ["1 1 1024", "3 2 1024", "1 5 1024"] {
        let out = d.cli(&["write", "config", value]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "write config {value}: {err}");
        assert!(
            err.contains("the running config needs"),
            "write config {value}: {err}"
        );
        let e = std::fs::write(d.mount.join("config"), format!("{value}\n"))
            .expect_err("the mounted file refuses it too");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{value}: {e}");
        assert_eq!(d.cat("config"), "8 32 65536\n", "after {value}");
        assert_eq!(answered(&lab, 80, 5), 5, "http after {value}");
        assert_eq!(answered(&lab, 8080, 5), 5, "alt after {value}");
    }
    let log = d.log();
    assert!(
        log.contains("Refused write to config: 1 services, 1 servers: the running config needs"),
        "{log}"
    );

    // The smallest sizes that fit are taken, and both services still answer.
    d.cli_ok(&["write", "config", "2 5 1024"]);
    assert_eq!(d.cat("config"), "2 5 1024\n");
    assert_eq!(answered(&lab, 80, 5), 5);
    assert_eq!(answered(&lab, 8080, 5), 5);
    d.wait_log("Table sizes set to 2 5 1024", Duration::from_secs(5));
}

#[test]
fn a_reload_that_shrinks_the_tables_keeps_the_service_that_remains() {
    let mut lab = lab();
    let path = lab.dir().join("lb.toml");
    std::fs::write(
        &path,
        config("services = 8\nservers = 32\nconnections = 65536", true, ""),
    )
    .unwrap();
    let d = start(&mut lab, &path);
    assert_eq!(answered(&lab, 80, 5), 5);

    // Only alt (2 servers) remains, in tables just big enough for it.
    std::fs::write(
        &path,
        config("services = 1\nservers = 2\nconnections = 4096", false, ""),
    )
    .unwrap();
    for round in 1..=2 {
        let before = d.log().matches("Reloaded").count();
        let out = d.cli(&["reload"]);
        assert!(
            out.status.success(),
            "reload {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            d.log().matches("Reloaded").count(),
            before + 1,
            "{}",
            d.log()
        );
        assert_eq!(d.cat("config"), "1 2 4096\n", "round {round}");
        assert_eq!(answered(&lab, 8080, 5), 5, "alt after reload {round}");
        assert_eq!(
            answered(&lab, 80, 3),
            0,
            "http is gone after reload {round}"
        );
        let services = d.cat("services");
        assert_eq!(services.lines().count(), 1, "{services}");
        assert!(
            services.starts_with(&format!("tcp {}:8080 up ", cluster::VIP)),
            "{services}"
        );
    }

    // A file whose services do not fit its own tables is refused whole.
    std::fs::write(
        &path,
        config("services = 1\nservers = 2\nconnections = 4096", true, ""),
    )
    .unwrap();
    let out = d.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(d.cat("config"), "1 2 4096\n");
    assert_eq!(answered(&lab, 8080, 5), 5);
}

/// Sizes written to `config` hold until the file's own `[tables]` change (docs/DAEMON.md):
/// a reload of a file that needs more than the written sizes is refused whole, rather than
/// numbering services and servers beyond the maps; once the file's `[tables]` change, the
/// reload resizes to them.
#[test]
fn a_reload_after_a_config_write_stays_within_the_written_sizes() {
    let mut lab = lab();
    let path = lab.dir().join("lb.toml");
    let tables = "services = 8\nservers = 32\nconnections = 65536";
    std::fs::write(&path, config(tables, true, "")).unwrap();
    let d = start(&mut lab, &path);
    d.cli_ok(&["write", "config", "2 5 1024"]);
    assert_eq!(d.cat("config"), "2 5 1024\n");

    // A third service: the file's [tables] have room, the written sizes do not.
    let more = format!(
        "{}{}",
        config(tables, true, ""),
        service("more", 8081, 1..=1)
    );
    std::fs::write(&path, &more).unwrap();
    let out = d.cli(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Reload refused"), "{err}");
    assert!(
        err.contains("2 5 1024"),
        "the refusal names the written sizes: {err}"
    );
    assert_eq!(d.cat("config"), "2 5 1024\n");
    assert_eq!(d.cat("services").lines().count(), 2);
    assert_eq!(answered(&lab, 80, 5), 5);
    assert_eq!(answered(&lab, 8080, 5), 5);

    // The file's own sizes change: the reload takes them, and the third service with them.
    let bigger = "services = 4\nservers = 32\nconnections = 65536";
    let more = format!(
        "{}{}",
        config(bigger, true, ""),
        service("more", 8081, 1..=1)
    );
    std::fs::write(&path, &more).unwrap();
    d.cli_ok(&["reload"]);
    assert_eq!(d.cat("config"), "4 32 65536\n");
    assert_eq!(d.cat("services").lines().count(), 3);
    assert_eq!(answered(&lab, 80, 5), 5);
    assert_eq!(answered(&lab, 8080, 5), 5);
}

/// A stand-in for a second ATM: receives what the daemon sends to atm2's address and
/// records when each heartbeat arrived.
struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Instant>>>,
}

impl Listener {
    fn start(lab: &Lab, key: Vec<u8>) -> Listener {
        let stop = Arc::new(AtomicBool::new(false));
        let sock = {
            let _in = lab.ns(&cluster::atm(2)).enter();
            UdpSocket::bind((cluster::atm_addr(2).as_str(), 5780)).unwrap()
        };
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut beats = Vec::new();
            let mut buf = vec![0u8; 65_536];
            while !flag.load(Ordering::Relaxed) {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                if let Ok(m) = lb_daemon::ha::decode("lab", &key, &buf[..n])
                    && matches!(m.body, lb_daemon::ha::Body::Heartbeat(_))
                {
                    beats.push(Instant::now());
                }
            }
            beats
        });
        Listener {
            stop,
            thread: Some(thread),
        }
    }

    /// The heartbeat arrival times so far; stops listening.
    fn finish(mut self) -> Vec<Instant> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// The longest gap between heartbeats, and where it was.
fn longest_gap(beats: &[Instant]) -> (Duration, usize) {
    beats
        .windows(2)
        .enumerate()
        .map(|(i, w)| (w[1] - w[0], i))
        .max()
        .unwrap_or_default()
}

/// A valid config of about 10 MB: 64 NAT services of 1024 server lines each (65,536, the
/// most the tables take), addressed over the NAT subnet's hosts and five ports each.
fn big_config(key: &Path, weight: u32) -> String {
    let mut c = format!(
        r#"[cluster]
name = "lab"
auth_key_file = "{key}"

[tables]
services = 64
servers = 65536
connections = 65536

[nat]
subnet = "203.0.113.0/24"
gateway = "203.0.113.1"

[[atm]]
name = "atm1"
address = "{a1}"
interface = "eth0"

[[atm]]
name = "atm2"
address = "{a2}"
interface = "eth0"
"#,
        key = key.display(),
        a1 = cluster::atm_addr(1),
        a2 = cluster::atm_addr(2),
    );
    for s in 0..64u32 {
        c += &format!(
            "\n[[service]]\nname = \"svc{s}\"\nvip = \"{}\"\nport = {}\n\
             [service.check]\nkind = \"none\"\n",
            cluster::VIP,
            10_000 + s
        );
        for i in 0..1024u32 {
            c += &format!(
                "[[service.server]]\n# server {i} of service {s}, a line of padding to bring \
                 the file to the size of a big site's config\nname = \"s{s}-{i}\"\n\
                 address = \"203.0.113.{}\"\nport = {}\nmethod = \"nat\"\nping = false\n\
                 weight = {weight}\n",
                2 + i % 200,
                8000 + i / 200
            );
        }
    }
    c
}

#[test]
fn heartbeats_keep_their_interval_through_the_largest_resize_and_a_10_mb_reload() {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 2, 1);
    let dir = lab.dir();
    let key_path = dir.join("authkey");
    let key = b"0123456789abcdef0123456789abcdef".to_vec();
    std::fs::write(&key_path, &key).unwrap();
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let small = config(
        "services = 8\nservers = 32\nconnections = 65536",
        true,
        &format!("auth_key_file = \"{}\"", key_path.display()),
    )
    .replace(
        "interface = \"eth0\"\n",
        &format!(
            "interface = \"eth0\"\n\n[[atm]]\nname = \"atm2\"\naddress = \"{}\"\ninterface = \"eth0\"\n",
            cluster::atm_addr(2)
        ),
    );
    let path: PathBuf = dir.join("lb.toml");
    std::fs::write(&path, &small).unwrap();
    let listener = Listener::start(&lab, key.clone());
    let mut d = start(&mut lab, &path);

    let mut marks = BTreeMap::new();
    // The largest allowed resize: 16,384 services, 65,536 servers, 16,777,216 connections.
    marks.insert("resize starts", Instant::now());
    let out = d.cli(&["write", "config", "16384 65536 16777216"]);
    marks.insert("resize answered", Instant::now());
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    assert_eq!(d.cat("config"), "16384 65536 16777216\n");

    // A 10 MB file that is refused (its last line is bad), then a good one.
    let big = big_config(&key_path, 1);
    assert!(big.len() > 10_000_000, "{} bytes", big.len());
    std::fs::write(&path, format!("{big}\ncolour = \"red\"\n")).unwrap();
    marks.insert("bad 10 MB reload starts", Instant::now());
    let out = d.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    std::fs::write(&path, &big).unwrap();
    marks.insert("good 10 MB reload starts", Instant::now());
    let out = d.cli(&["reload"]);
    marks.insert("good 10 MB reload answered", Instant::now());
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    assert_eq!(d.cat("services").lines().count(), 64);
    // The same tables, every server line reweighted: all 64 rows and 65,536 server records
    // are rewritten in the running dataplane.
    std::fs::write(&path, big_config(&key_path, 2)).unwrap();
    marks.insert("reweighting reload starts", Instant::now());
    let out = d.cli(&["reload"]);
    marks.insert("reweighting reload answered", Instant::now());
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    d.wait_log("Checks started: 0 server pings", Duration::from_secs(10));
    // Listing 65,536 server lines reads a counter per line: beside the loop, while the
    // heartbeats are counted.
    marks.insert("listings of 65,536 lines start", Instant::now());
    let servers = d.cat("servers");
    assert_eq!(servers.lines().count(), 65_536);
    assert!(
        servers.lines().all(|l| l.contains(" up 2 nat ")),
        "every line reweighted"
    );
    let listed: serde_json::Value =
        serde_json::from_str(&d.cli_ok(&["list", "servers", "--json"])).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(65_536));
    let scrape = d.scrape(&lab);
    let server_up = scrape
        .lines()
        .filter(|l| l.starts_with("lb_server_up{"))
        .count();
    assert_eq!(server_up, 65_536);
    marks.insert("listings answered", Instant::now());
    std::thread::sleep(Duration::from_millis(500));
    let beats = listener.finish();

    let since = |t: Instant| beats.iter().filter(|b| **b >= t).count();
    assert!(
        since(marks["resize starts"]) > 20,
        "heartbeats during the test: {}",
        beats.len()
    );
    let during = &beats[beats.len() - since(marks["resize starts"])..];
    let t0 = marks["resize starts"];
    let (gap, _) = longest_gap(during);
    let long: Vec<String> = during
        .windows(2)
        .filter(|w| w[1] - w[0] > Duration::from_millis(150))
        .map(|w| format!("{:?} at {:?}", w[1] - w[0], w[0] - t0))
        .collect();
    assert!(
        gap <= Duration::from_millis(200),
        "gaps between heartbeats (heartbeat_ms = 100): {long:?}; marks: {:?}\n{}",
        marks.iter().map(|(k, v)| (k, *v - t0)).collect::<Vec<_>>(),
        d.log()
    );
}

/// Every reload restarts the health checks. Each HTTP check used to build its own HTTP
/// client, which loads and parses the system's CA certificates, on tokio's two worker
/// threads: the threads that also send and receive the heartbeats. In the soak, after
/// reloads of both ATMs, the primary sent no heartbeat for 214 ms and the backup read none
/// for 380 ms, took the primary for dead, and a second primary stood up. The checks now
/// share one client per process; a reload must not stretch the heartbeats' interval.
#[test]
fn heartbeats_keep_their_interval_while_reloads_restart_the_http_checks() {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 2, 3);
    for i in 1..=3 {
        lab.nginx(&cluster::server(i), "web", &[80]);
    }
    let key_path = write_key(&mut lab);
    let key = std::fs::read(&key_path).unwrap();
    let vips: Vec<String> = (0..8).map(|i| format!("192.0.2.{}", 100 + i)).collect();
    let names: Vec<String> = (0..8).map(|i| format!("web{i}")).collect();
    let services: Vec<(&str, &str)> = names
        .iter()
        .zip(&vips)
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    // 24 checks, a third of them https (which fail: the servers speak plain HTTP), some
    // verifying certificates, some not.
    let base = pair_config("lab", &key_path, &services);
    let parts: Vec<&str> = base.split("kind = \"none\"\n").collect();
    let mut config = parts[0].to_string();
    for (n, part) in parts[1..].iter().enumerate() {
        let kind = match n % 3 {
            0 => "kind = \"https\"\nverify = false\n",
            1 => "kind = \"https\"\n",
            _ => "kind = \"http\"\n",
        };
        config += &format!("{kind}path = \"/\"\ninterval_ms = 500\n{part}");
    }
    let path = lab.dir().join("lb.toml");
    std::fs::write(&path, &config).unwrap();
    let listener = Listener::start(&lab, key);
    let mut d = start(&mut lab, &path);
    d.wait_log("Checks started: 24 server pings, 24 service checks", START);
    let from = Instant::now();
    for round in 2..=6 {
        d.cli_ok(&["reload"]);
        lab.wait_for("the checks to start again", START, || {
            d.log().matches("Checks started").count() >= round
        });
        std::thread::sleep(Duration::from_millis(700));
    }
    let beats = listener.finish();
    let during: Vec<Instant> = beats.into_iter().filter(|b| *b >= from).collect();
    assert!(
        during.len() > 20,
        "{} heartbeats in the reloads",
        during.len()
    );
    let (gap, at) = longest_gap(&during);
    assert!(
        gap <= Duration::from_millis(200),
        "a gap of {gap:?} between heartbeats (heartbeat_ms = 100), {:?} into the reloads\n{}",
        during[at] - from,
        d.log()
    );
}

/// The config for two ATMs and servers 1-3 in direct mode, under cluster `name`, with the
/// services `extra` adds.
fn pair_config(name: &str, key: &Path, services: &[(&str, &str)]) -> String {
    let mut c = format!(
        r#"[cluster]
name = "{name}"
auth_key_file = "{key}"

[[atm]]
name = "atm1"
address = "{a1}"
interface = "eth0"

[[atm]]
name = "atm2"
address = "{a2}"
interface = "eth0"
"#,
        key = key.display(),
        a1 = cluster::atm_addr(1),
        a2 = cluster::atm_addr(2),
    );
    for (svc, vip) in services {
        c += &format!(
            "\n[[service]]\nname = \"{svc}\"\nvip = \"{vip}\"\nport = 80\nscheduler = \"rr\"\n\
             [service.check]\nkind = \"none\"\n"
        );
        for i in 1..=3 {
            c += &format!(
                "[[service.server]]\nname = \"web{i}\"\naddress = \"{}\"\n",
                cluster::server_addr(i)
            );
        }
    }
    c
}

fn write_key(lab: &mut Lab) -> PathBuf {
    let path = lab.dir().join("authkey");
    std::fs::write(&path, b"0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

/// Which ATMs hold `vip` on their interface.
fn holders(lab: &Lab, vip: &str) -> Vec<usize> {
    (1..=2)
        .filter(|i| {
            lab.ns(&cluster::atm(*i))
                .exec_ok(&["ip", "-4", "addr", "show", "eth0"])
                .contains(&format!("{vip}/32"))
        })
        .collect()
}

/// A renamed cluster would have each ATM send under the old name and listen for the new:
/// both would think the other dead and take the VIP. The rename needs a restart; the reload
/// is refused whole and says so, and the pair keeps one primary.
#[test]
fn renaming_the_cluster_on_reload_is_refused_and_the_pair_keeps_one_primary() {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 2, 3);
    let key = write_key(&mut lab);
    let path = lab.dir().join("lb.toml");
    std::fs::write(&path, pair_config("lab", &key, &[("http", cluster::VIP)])).unwrap();
    let mut a1 = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    a1.wait_log("This ATM is primary", START);
    let mut a2 = Daemon::start(&mut lab, &cluster::atm(2), &path, &[]);
    a2.wait_log("ATM atm1 (192.0.2.2) is primary", START);

    std::fs::write(
        &path,
        pair_config("renamed", &key, &[("http", cluster::VIP)]),
    )
    .unwrap();
    for d in [&a1, &a2] {
        let out = d.cli(&["reload"]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Reload changes [cluster] name") && err.contains("restart the daemon"),
            "{err}"
        );
    }
    a1.signal(libc::SIGHUP);
    a2.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(holders(&lab, cluster::VIP), vec![1], "one primary");
    for d in [&a1, &a2] {
        let log = d.log();
        assert!(!log.contains("Reloaded"), "{log}");
        assert!(!log.contains("Refused an ATM message"), "{log}");
        assert!(
            d.cli_ok(&["status"])
                .contains("Cluster lab: atm1 is primary")
        );
    }
    assert!(!a2.log().contains("Elected primary"));
}

/// A real server applies a reload as an ATM does: a new direct-routing VIP goes on its `lo`
/// (else the VIP's requests reach it and are refused), a removed one comes off.
#[test]
fn a_node_takes_up_a_new_vip_on_reload_and_lets_a_removed_one_go() {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 3);
    let key = write_key(&mut lab);
    let vip2 = "192.0.2.101";
    for i in 1..=3 {
        let ns = cluster::server(i);
        lab.nginx(&ns, &ns, &[80]);
    }
    let path = lab.dir().join("lb.toml");
    let one = pair_config("lab", &key, &[("http", cluster::VIP)]);
    std::fs::write(&path, &one).unwrap();
    let mut atm = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    atm.wait_log("This ATM is primary", START);
    let mut nodes: Vec<Daemon> = (1..=3)
        .map(|i| Daemon::start(&mut lab, &cluster::server(i), &path, &[]))
        .collect();
    for n in &mut nodes {
        n.wait_log("VIP 192.0.2.100 configured on lo:cs0", START);
    }
    let lo = |lab: &Lab, i: usize| {
        lab.ns(&cluster::server(i))
            .exec_ok(&["ip", "-4", "addr", "show", "lo"])
    };
    let get = |lab: &Lab, vip: &str| -> usize {
        let _in = lab.ns("client").enter();
        let vip: std::net::Ipv4Addr = vip.parse().unwrap();
        (0..6)
            .filter(|_| {
                use std::io::{Read, Write};
                let Ok(mut s) =
                    std::net::TcpStream::connect_timeout(&(vip, 80).into(), Duration::from_secs(2))
                else {
                    return false;
                };
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
                let mut b = String::new();
                s.read_to_string(&mut b).is_ok() && b.contains("200 OK")
            })
            .count()
    };
    assert_eq!(get(&lab, cluster::VIP), 6);

    // A second service on a new VIP.
    std::fs::write(
        &path,
        pair_config("lab", &key, &[("http", cluster::VIP), ("www", vip2)]),
    )
    .unwrap();
    atm.signal(libc::SIGHUP);
    for n in &nodes {
        n.signal(libc::SIGHUP);
    }
    atm.wait_log("Reloaded: 1 services added", Duration::from_secs(10));
    for n in &mut nodes {
        n.wait_log(
            "Reloaded (node role): VIP 192.0.2.101 configured on lo:cs0",
            Duration::from_secs(10),
        );
    }
    for i in 1..=3 {
        assert!(
            lo(&lab, i).contains(&format!("{vip2}/32")),
            "{}",
            lo(&lab, i)
        );
    }
    assert_eq!(get(&lab, vip2), 6, "the new VIP answers");

    // The first service goes.
    std::fs::write(&path, pair_config("lab", &key, &[("www", vip2)])).unwrap();
    for n in &nodes {
        n.signal(libc::SIGHUP);
    }
    for n in &mut nodes {
        n.wait_log(
            "Reloaded (node role): VIP 192.0.2.100 removed from lo:cs0",
            Duration::from_secs(10),
        );
    }
    for i in 1..=3 {
        assert!(
            !lo(&lab, i).contains(&format!("{}/32", cluster::VIP)),
            "{}",
            lo(&lab, i)
        );
    }
}
