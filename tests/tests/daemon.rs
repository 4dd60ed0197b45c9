//! Tier 3: the real lb-daemon driven from a config file in a lab: its tables through the
//! FUSE mount and lb-cli, writes to them, reloads, idle mode, and /metrics.

use std::{
    io::Read,
    net::{TcpStream, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_tests::{
    cluster,
    lab::{Lab, write_executable},
    procs::Daemon,
};

const START: Duration = Duration::from_secs(20);

/// The config for the lab: one ATM, services on the VIP served by direct routing.
fn config(servers: usize, extra: &str) -> String {
    let mut c = format!(
        r#"[cluster]
name = "lab"
timeout = 100
{extra}
[tables]
services = 8
servers = 32
connections = 65536

[[atm]]
name = "atm1"
address = "{atm}"
interface = "eth0"

[[service]]
name = "http"
vip = "{vip}"
port = 80
scheduler = "rr"
[service.check]
kind = "none"
"#,
        atm = cluster::atm_addr(1),
        vip = cluster::VIP
    );
    for i in 1..=servers {
        c += &format!(
            "[[service.server]]\nname = \"web{i}\"\naddress = \"{}\"\n",
            cluster::server_addr(i)
        );
    }
    c += &format!(
        r#"
[[service]]
name = "dns"
vip = "{vip}"
port = 53
protocol = "udp"
[service.check]
kind = "none"
[[service.server]]
name = "dns1"
address = "{s1}"
"#,
        vip = cluster::VIP,
        s1 = cluster::server_addr(1)
    );
    c
}

/// Lab with one ATM and `servers` nginx servers in direct mode; returns the config path.
fn lab(servers: usize) -> (Lab, PathBuf) {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 3);
    for i in 1..=3 {
        let ns = cluster::server(i);
        lab.nginx(&ns, &ns, &[80]);
        cluster::hold_vip_on_lo(&lab, &ns, cluster::VIP);
    }
    let path = lab.dir().join("lb.toml");
    std::fs::write(&path, config(servers, "")).unwrap();
    (lab, path)
}

fn start(lab: &mut Lab, path: &Path) -> Daemon {
    let mut d = Daemon::start(lab, &cluster::atm(1), path, &[]);
    d.wait_log("This ATM is primary", START);
    d
}

/// An HTTP/1.1 keep-alive connection from the client to the VIP.
struct Conn {
    stream: TcpStream,
}

impl Conn {
    fn open(lab: &Lab) -> Conn {
        let _in = lab.ns("client").enter();
        let vip =
            std::net::SocketAddr::from((cluster::VIP.parse::<std::net::Ipv4Addr>().unwrap(), 80));
        let stream =
            TcpStream::connect_timeout(&vip, Duration::from_secs(5)).expect("connect to the VIP");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Conn { stream }
    }
    fn port(&self) -> u16 {
        self.stream.local_addr().unwrap().port()
    }
    /// One request; the body (the server's name).
    fn get(&mut self) -> String {
        cluster::get_on(&mut self.stream)
    }
}

/// The connections-table line of the client's connection from `port`.
fn conn_line(table: &str, port: u16) -> Option<Vec<String>> {
    let client = format!("{}:{port}", cluster::CLIENT);
    table
        .lines()
        .map(|l| l.split(' ').map(String::from).collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&client))
}

fn stat(d: &Daemon) -> Vec<u64> {
    d.cat("stat")
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

#[test]
fn tables_show_live_traffic_and_writes_take_effect() {
    let (mut lab, path) = lab(3);
    let mut d = start(&mut lab, &path);

    // A live connection: listed, its timeout counting down while idle, its packets growing.
    let mut c = Conn::open(&lab);
    let server = c.get();
    let t1 = d.cat("connections");
    let l1 = conn_line(&t1, c.port()).unwrap_or_else(|| panic!("no line for the client:\n{t1}"));
    assert_eq!(l1.len(), 7, "{l1:?}");
    assert_eq!(l1[0], "tcp");
    assert_eq!(l1[6], "ESTABLISHED", "after TCL's six fields, the state");
    assert_eq!(l1[2], format!("{}:80", cluster::VIP));
    let n = server.trim_start_matches('s');
    assert_eq!(
        l1[4],
        format!("192.0.2.1{n}:80"),
        "the server that answered: {server}"
    );
    std::thread::sleep(Duration::from_millis(2100));
    let l2 = conn_line(&d.cat("connections"), c.port()).unwrap();
    let (to1, to2): (u64, u64) = (l1[3].parse().unwrap(), l2[3].parse().unwrap());
    assert!(
        to2 + 2 <= to1 && to1 <= 100,
        "timeout counts down: {to1} then {to2}"
    );
    assert_eq!(c.get(), server);
    let l3 = conn_line(&d.cat("connections"), c.port()).unwrap();
    assert!(
        l3[5].parse::<u64>().unwrap() > l2[5].parse::<u64>().unwrap(),
        "packets grow: {l2:?} then {l3:?}"
    );
    assert!(
        l3[3].parse::<u64>().unwrap() >= 99,
        "traffic refreshes the timeout: {l3:?}"
    );

    // stat: TCL's six numbers that follow the traffic sent, then the half-open
    // connections.
    let before = stat(&d);
    assert_eq!(before.len(), 7);
    assert_eq!(before[6], 0, "no half-open connection");
    assert_eq!((before[0], before[1]), (2, 4), "2 services, 4 server lines");
    assert_eq!(before[2], 1, "one live connection");
    {
        let _in = lab.ns("client").enter();
        let sock = UdpSocket::bind((cluster::CLIENT, 0)).unwrap();
        for i in 0..50u32 {
            sock.send_to(&i.to_be_bytes(), (cluster::VIP, 53)).unwrap();
        }
    }
    lab.wait_for("50 datagrams counted", Duration::from_secs(5), || {
        stat(&d)[3] >= before[3] + 50
    });
    let after = stat(&d);
    assert_eq!(
        after[3],
        before[3] + 50,
        "packets received: {before:?} -> {after:?}"
    );
    assert_eq!(
        after[4], before[4],
        "nothing dropped: {before:?} -> {after:?}"
    );
    assert_eq!(
        after[5],
        before[5] + 1,
        "one new (udp) connection: {before:?} -> {after:?}"
    );
    assert_eq!(after[2], 2, "two live connections now");
    assert_eq!(
        d.cli_ok(&["cat", "stat"]),
        d.cat("stat"),
        "lb-cli and the mount agree"
    );

    // lb-cli's errors: unknown table, no daemon, not root. Each exits non-zero and says why.
    let out = d.cli(&["cat", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no table \"nosuch\""));
    let out = std::process::Command::new(lb_tests::procs::bin("lb-cli"))
        .args(["--socket", "/nonexistent/lb.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is it running?"));
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(lb_tests::procs::bin("lb-cli"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = d.cli_ok(&["status"]);
    assert!(status.contains("atm1 is primary"), "{status}");
    let list = d.cli_ok(&["list", "servers"]);
    assert!(list.starts_with("SERVICE  NAME  PROT  ADDRESS"), "{list}");
    // IPVS's ActiveConn and InActConn: the open connection is its server's.
    let json: serde_json::Value =
        serde_json::from_str(&d.cli_ok(&["list", "servers", "--json"])).unwrap();
    let line = json
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == format!("web{}", server.trim_start_matches('s')))
        .unwrap_or_else(|| panic!("{server} in {json}"));
    assert_eq!(
        (line["active"].as_u64(), line["inactive"].as_u64()),
        (Some(1), Some(0)),
        "{json}"
    );
    assert!(list.contains("ACTIVECONN  INACTCONN"), "{list}");
    // A connection the client closed is InActConn until it ages out.
    let mut closed = Conn::open(&lab);
    closed.get();
    drop(closed);
    // (ActiveConn, InActConn) of the http service's servers.
    let sums = |d: &Daemon| -> (u64, u64) {
        let json: serde_json::Value =
            serde_json::from_str(&d.cli_ok(&["list", "servers", "--json"])).unwrap();
        let http = json
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["service"] == "http");
        http.fold((0, 0), |(a, i), l| {
            (
                a + l["active"].as_u64().unwrap(),
                i + l["inactive"].as_u64().unwrap(),
            )
        })
    };
    let t = std::time::Instant::now();
    while sums(&d) != (1, 1) {
        assert!(
            t.elapsed() < START,
            "{:?}\n{}\n{}",
            sums(&d),
            d.cat("connections"),
            d.cli_ok(&["list", "servers"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let list = d.cli_ok(&["list", "servers"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("http ") && l.split_whitespace().nth(11) == Some("1")),
        "INACTCONN 1:\n{list}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&d.cli_ok(&["list", "connections", "--json"])).unwrap();
    assert!(json.as_array().is_some_and(|a| !a.is_empty()));

    // Bad writes are refused and change nothing.
    for (table, value) in [
        ("timeout", "abc"),
        ("timeout", "0"),
        ("debug", "2"),
        ("config", "1 2"),
    ] {
        let r = std::fs::write(d.mount.join(table), format!("{value}\n"));
        let e = r.expect_err(&format!("echo {value} > {table} succeeded"));
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{table} {value}: {e}");
        let out = d.cli(&["write", table, value]);
        assert_eq!(out.status.code(), Some(1), "lb-cli write {table} {value}");
        assert!(!out.stderr.is_empty());
    }
    let e = std::fs::write(d.mount.join("stat"), "1\n").expect_err("stat is read-only");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    assert_eq!(d.cat("timeout"), "100\n");
    assert_eq!(d.cat("debug"), "0\n");
    assert_eq!(d.cat("config"), "8 32 65536\n");
    assert!(conn_line(&d.cat("connections"), c.port()).is_some());

    // debug on: a record per new connection in the daemon's log.
    std::fs::write(d.mount.join("debug"), "1\n").unwrap();
    assert_eq!(d.cat("debug"), "1\n");
    let mut c2 = Conn::open(&lab);
    let s2 = c2.get();
    let n2 = s2.trim_start_matches('s');
    d.wait_log(
        &format!(
            "new tcp {}:{} -> {}:80 via 192.0.2.1{n2}:80 direct",
            cluster::CLIENT,
            c2.port(),
            cluster::VIP
        ),
        Duration::from_secs(5),
    );

    // timeout 5: idle connections expire after 5 s.
    std::fs::write(d.mount.join("timeout"), "5\n").unwrap();
    assert_eq!(d.cat("timeout"), "5\n");
    let l = conn_line(&d.cat("connections"), c.port()).unwrap();
    assert!(l[3].parse::<u64>().unwrap() <= 5, "{l:?}");
    lab.wait_for("idle connections to expire", Duration::from_secs(8), || {
        let t = d.cat("connections");
        conn_line(&t, c.port()).is_none() && conn_line(&t, c2.port()).is_none()
    });
    assert_eq!(stat(&d)[2], 0, "no live connection left");
    std::fs::write(d.mount.join("timeout"), "100\n").unwrap();

    // config: resizes the maps and drops every connection.
    let mut c3 = Conn::open(&lab);
    c3.get();
    assert!(conn_line(&d.cat("connections"), c3.port()).is_some());
    std::fs::write(d.mount.join("config"), "16 64 131072\n").unwrap();
    assert_eq!(d.cat("config"), "16 64 131072\n");
    assert_eq!(d.cat("connections"), "", "all connections dropped");
    assert!(d.log().contains("all connections dropped"));
    // And the balancer still balances.
    let mut c4 = Conn::open(&lab);
    assert!(c4.get().starts_with('s'));
}

#[test]
fn a_reload_that_adds_a_server_keeps_established_connections() {
    let (mut lab, path) = lab(2);
    let mut d = start(&mut lab, &path);
    assert_eq!(
        d.cli_ok(&["cat", "servers"])
            .lines()
            .filter(|l| l.contains(":80 "))
            .count(),
        2
    );
    let mut long = Conn::open(&lab);
    let server = long.get();
    let port = long.port();

    std::fs::write(&path, config(3, "")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log(
        "Reloaded: 0 services added, 0 removed; 1 server lines added, 0 removed",
        Duration::from_secs(5),
    );
    let servers = d.cat("servers");
    assert!(
        servers.contains(&format!(
            "tcp {}:80 {}:80 up 1 direct",
            cluster::server_addr(3),
            cluster::VIP
        )),
        "{servers}"
    );

    // The long-lived connection keeps its server and its table line.
    for _ in 0..5 {
        assert_eq!(long.get(), server);
    }
    assert_eq!(long.port(), port);
    assert!(conn_line(&d.cat("connections"), port).is_some());
    // New connections reach the new server too (rr over three).
    let names: std::collections::BTreeSet<String> =
        (0..6).map(|_| Conn::open(&lab).get()).collect();
    assert!(names.contains("s3"), "{names:?}");

    // A bad file on reload keeps the running config.
    std::fs::write(&path, config(3, "colour = \"red\"")).unwrap();
    let out = d.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("keeping the running configuration"));
    assert!(d.log().contains("unknown key `colour` in [cluster]"));
    assert_eq!(long.get(), server);
    // Same lines as before the bad reload, packet counts aside.
    let shape = |t: &str| -> Vec<String> {
        t.lines()
            .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
            .collect()
    };
    assert_eq!(shape(&d.cat("servers")), shape(&servers));
}

/// `track`: an ATM that does not reach its track addresses never becomes primary, not even
/// for a moment at start-up; once they answer, it does.
#[test]
fn an_atm_becomes_primary_only_once_its_track_addresses_answer() {
    let (mut lab, path) = lab(3);
    let absent = "192.0.2.99";
    std::fs::write(
        &path,
        config(3, &format!("\n[ha]\ntrack = [\"{absent}\"]\n")),
    )
    .unwrap();
    let mut d = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    d.wait_log("A track address does not answer", START);
    std::thread::sleep(Duration::from_secs(2));
    let log = d.log();
    assert!(
        log.contains("Not standing for primary until the track addresses answer (192.0.2.99)"),
        "{log}"
    );
    assert!(
        !log.contains("primary:") && !log.contains("Elected"),
        "{log}"
    );
    assert!(
        !lab.ns(&cluster::atm(1))
            .exec_ok(&["ip", "-4", "addr"])
            .contains(cluster::VIP)
    );
    let out = d.cli(&["promote"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("track addresses"),
        "{out:?}"
    );

    // The address appears (on the client): two answers in a row, and it leads.
    lab.addr("client", "eth0", &format!("{absent}/24"));
    d.wait_log("This ATM is primary", Duration::from_secs(10));
    assert!(d.log().contains("The track addresses answer"));
    assert!(Conn::open(&lab).get().starts_with('s'));
}

#[test]
fn a_bad_file_idles_until_sighup_brings_a_good_one() {
    let (mut lab, path) = lab(3);
    std::fs::write(
        &path,
        config(3, "").replace("port = 80\n", "port = 80000\n"),
    )
    .unwrap();
    let mut d = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    d.wait_log("Bad configuration file! Going to idle mode", START);
    assert!(
        d.log().contains("line 18: `port` = 80000 is out of range"),
        "{}",
        d.log()
    );
    // Idle: no VIP, nothing served.
    assert!(
        !lab.ns(&cluster::atm(1))
            .exec_ok(&["ip", "-4", "addr"])
            .contains(cluster::VIP)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!d.log().contains("primary"));

    std::fs::write(&path, config(3, "")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("This ATM is primary", START);
    assert!(
        lab.ns(&cluster::atm(1))
            .exec_ok(&["ip", "-4", "addr"])
            .contains(&format!("{}/32", cluster::VIP))
    );
    assert!(Conn::open(&lab).get().starts_with('s'));
    // SIGTERM removes the alias.
    assert!(d.stop(), "the daemon stops on SIGTERM");
    assert!(
        !lab.ns(&cluster::atm(1))
            .exec_ok(&["ip", "-4", "addr"])
            .contains(cluster::VIP)
    );
    assert!(d.log().contains("Stopped"));
}

#[test]
fn metrics_parse_as_prometheus_text_and_agree_with_stat() {
    let (mut lab, path) = lab(3);
    let d = start(&mut lab, &path);
    for _ in 0..10 {
        Conn::open(&lab).get();
    }
    let text = d.scrape(&lab);
    let stat = stat(&d);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text");
    let value = |name: &str, label: (&str, &str)| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
            .unwrap_or_else(|| panic!("no {name}{{{}={}}} in:\n{text}", label.0, label.1));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        value("lb_dataplane_packets_total", ("counter", "vip_packets")) as u64,
        stat[3],
        "{text}"
    );
    assert_eq!(
        value("lb_dataplane_packets_total", ("counter", "new_connections")) as u64,
        stat[5]
    );
    assert_eq!(
        value("lb_active_connections", ("node", "atm1")) as u64,
        stat[2]
    );
    assert_eq!(value("lb_role", ("role", "primary")), 1.0);
    assert_eq!(value("lb_service_up", ("service", "http")), 1.0);
    let per_server: f64 = scrape
        .samples
        .iter()
        .filter(|s| {
            s.metric == "lb_server_packets_total" && s.labels.get("service") == Some("http")
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{other:?}"),
        })
        .sum();
    assert_eq!(
        per_server,
        value("lb_service_packets_total", ("service", "http"))
    );
    assert!(per_server > 0.0);
}

/// What operators' Prometheus would do with a scrape: `promtool check metrics` parses the
/// body as the format the Content-Type names and lints it (HELP and TYPE on every family,
/// `_total` on counters). It prints nothing and exits 0 only for a clean exposition.
#[test]
fn metrics_pass_promtool_check_in_the_format_they_name() {
    let (mut lab, path) = lab(3);
    let d = start(&mut lab, &path);
    for _ in 0..3 {
        Conn::open(&lab).get();
    }
    let (content_type, text) = {
        let _in = lab.ns(&cluster::atm(1)).enter();
        let resp = ureq::get(&format!("http://{}/metrics", d.metrics))
            .call()
            .unwrap();
        let ct = resp.header("Content-Type").map(String::from);
        (ct, resp.into_string().unwrap())
    };
    assert_eq!(
        content_type.as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(text.contains("lb_server_packets_total{"), "{text}");

    lb_tests::procs::promtool_check(&text);
    // 0.0.4 parsers take OpenMetrics' end marker for a comment: promtool cannot see it.
    assert!(
        !text.contains("# EOF"),
        "OpenMetrics in a 0.0.4 body:\n{text}"
    );
}

/// `lb-cli log-level` (the `loglevel` table) changes what the running daemon logs, and
/// refuses what is not a level; `lb-cli status --watch` redraws until Ctrl-C, as crm_mon.
#[test]
fn the_log_level_changes_at_run_time_and_status_watch_redraws_until_ctrl_c() {
    let (mut lab, path) = lab(1);
    let mut d = start(&mut lab, &path);
    assert_eq!(d.cli_ok(&["log-level"]), "info\n");
    assert_eq!(d.cat("loglevel"), "info\n");
    let debug_lines = |d: &Daemon| {
        d.log()
            .lines()
            .filter(|l| l.contains(" DEBUG Control socket: Cat"))
            .count()
    };
    d.cli_ok(&["cat", "stat"]);
    assert_eq!(debug_lines(&d), 0, "info hides debug lines");

    // Refused, and nothing changes.
    let out = d.cli(&["log-level", "loud"]);
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("loglevel: \"loud\""), "{e}");
    let e = std::fs::write(d.mount.join("loglevel"), "debug info\n").expect_err("two words");
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    assert_eq!(d.cat("loglevel"), "info\n");

    let said = d.cli_ok(&["log-level", "debug"]);
    assert!(
        said.starts_with("Log level set to debug (was info)"),
        "{said}"
    );
    d.wait_log("INFO  Log level set to debug (was info)", START);
    assert_eq!(d.cat("loglevel"), "debug\n");
    d.cli_ok(&["cat", "stat"]);
    assert!(debug_lines(&d) >= 1, "{}", d.log());
    // Back through the file, as TCL's tables are written.
    std::fs::write(d.mount.join("loglevel"), "info\n").unwrap();
    assert_eq!(d.cli_ok(&["log-level"]), "info\n");
    let n = debug_lines(&d);
    d.cli_ok(&["cat", "stat"]);
    assert_eq!(debug_lines(&d), n, "info again");

    // Piped: one status after another, with the time of each.
    let out = d.cli_ok(&["status", "--watch", "--interval", "1", "--count", "2"]);
    assert_eq!(
        out.matches("Cluster lab: atm1 is primary").count(),
        2,
        "{out}"
    );
    assert!(out.starts_with("Every 1 s, "), "{out}");
    assert!(!out.contains('\x1b'), "no escapes into a pipe: {out:?}");
    // On a terminal (script(1) gives it one): cleared once, then redrawn from the top.
    let cmd = format!(
        "{} --socket {} status --watch --interval 1 --count 2",
        lb_tests::procs::bin("lb-cli").display(),
        d.socket.display()
    );
    let tty = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(tty.status.success(), "{tty:?}");
    let screen = String::from_utf8_lossy(&tty.stdout);
    assert_eq!(screen.matches("\x1b[2J").count(), 1, "{screen:?}");
    assert_eq!(screen.matches("\x1b[H").count(), 2, "{screen:?}");
    assert_eq!(screen.matches("atm1 is primary").count(), 2, "{screen:?}");
    // Ctrl-C ends it at once, with status 0.
    let mut watch = std::process::Command::new(lb_tests::procs::bin("lb-cli"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["status", "--watch", "--interval", "30"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = watch.stdout.take().unwrap();
    let mut buf = [0u8; 4096];
    while !first.contains("Services:") {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "the watch ended before its first status: {first}");
        first += &String::from_utf8_lossy(&buf[..n]);
    }
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(watch.id() as i32, libc::SIGINT) };
    let sent = std::time::Instant::now();
    let status = loop {
        if let Some(s) = watch.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "status --watch still runs 2 s after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status}");
}

/// Hooks, as keepalived's notify scripts: each runs with the event in its environment, one
/// at a time in order; one that hangs is killed at `notify_timeout` with what it started.
#[test]
fn hooks_run_with_the_event_in_their_environment_and_a_hanging_one_is_killed() {
    let (mut lab, path) = lab(1);
    let dir = lab.dir();
    let log = dir.join("hooks.log");
    let hook = dir.join("hook.sh");
    write_executable(
        &hook,
        &format!(
            // One write of the whole block, so the test never reads half of one.
            "#!/bin/sh\nb=$(env | grep '^LB_' | sort)\nprintf '== %s\\n%s\\n' \"$LB_HOOK\" \"$b\" >> {}\necho told\n",
            log.display()
        ),
    );
    let hang = dir.join("hang.sh");
    write_executable(&hang, "#!/bin/sh\nsleep 987 &\nsleep 987\n");
    let track = "192.0.2.99";
    lab.addr("client", "eth0", &format!("{track}/24"));
    let h = hook.display();
    let text = config(
        1,
        &format!(
            "notify_timeout = 1\n\n[ha]\ntrack = [\"{track}\"]\nnotify_primary = \"{h}\"\n\
             notify_backup = \"{h}\"\nnotify_fault = \"{}\"\n",
            hang.display()
        ),
    )
    .replacen(
        "scheduler = \"rr\"\n",
        &format!("scheduler = \"rr\"\nnotify_up = \"{h}\"\nnotify_down = \"{h}\"\n"),
        1,
    )
    .replacen(
        "name = \"web1\"\n",
        &format!("name = \"web1\"\nnotify_up = \"{h}\"\nnotify_down = \"{h}\"\n"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    let mut d = start(&mut lab, &path);
    let blocks = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .split("== ")
            .filter(|b| !b.is_empty())
            .map(String::from)
            .collect()
    };
    let wait_blocks = |n: usize, what: &str| {
        lab.wait_for(what, START, || blocks().len() >= n);
        blocks()
    };
    // Start-up: backup, then primary (term 1).
    let b = wait_blocks(2, "notify_backup and notify_primary at start");
    assert!(b[0].starts_with("notify_backup\n"), "{b:?}");
    for line in [
        "LB_EVENT=backup",
        "LB_REASON=start",
        "LB_CLUSTER=lab",
        "LB_ATM=atm1",
        "LB_ROLE=backup",
    ] {
        assert!(b[0].contains(&format!("{line}\n")), "{line} in {}", b[0]);
    }
    assert!(b[1].starts_with("notify_primary\n"), "{b:?}");
    for line in ["LB_EVENT=primary", "LB_ROLE=primary", "LB_TERM=1"] {
        assert!(b[1].contains(&format!("{line}\n")), "{line} in {}", b[1]);
    }
    d.wait_log("Hook notify_primary (", START);
    assert!(d.log().contains("said: told"), "{}", d.log());

    // A server taken out: its notify_down, then its service's (no server left up).
    d.cli_ok(&["server", "disable", "http", "web1"]);
    let b = wait_blocks(4, "notify_down of web1 and of http");
    assert!(b[2].starts_with("notify_down\n"), "{b:?}");
    for line in [
        "LB_EVENT=down",
        "LB_SERVICE=http",
        "LB_SERVER_NAME=web1",
        &format!("LB_SERVER={}", cluster::server_addr(1)),
        "LB_PORT=80",
        &format!("LB_VIP={}", cluster::VIP),
        "LB_VPORT=80",
        "LB_PROTOCOL=tcp",
        "LB_METHOD=direct",
        "LB_REASON=lb-cli server: disabled: out of the tables, its connections dropped",
    ] {
        assert!(b[2].contains(&format!("{line}\n")), "{line} in {}", b[2]);
    }
    assert!(b[3].starts_with("notify_down\n"), "{b:?}");
    assert!(b[3].contains("LB_SERVERS_UP=0\n"), "{}", b[3]);
    assert!(
        !b[3].contains("LB_SERVER_NAME="),
        "a service's hook: {}",
        b[3]
    );
    d.cli_ok(&["server", "enable", "http", "web1"]);
    let b = wait_blocks(6, "notify_up of web1 and of http");
    assert!(b[4].starts_with("notify_up\n") && b[4].contains("LB_SERVER_NAME=web1\n"));
    assert!(b[5].starts_with("notify_up\n") && b[5].contains("LB_SERVERS_UP=1\n"));

    // The track address goes: backup, and a fault hook that hangs, killed at 1 s with the
    // sleep it started.
    lab.ns("client")
        .exec_ok(&["ip", "addr", "del", &format!("{track}/24"), "dev", "eth0"]);
    d.wait_log(
        "Fault: this ATM may not be primary (a track address does not answer)",
        START,
    );
    // The hook runs beside the event loop, never on it: while it hangs, lb-cli status and
    // a table read (both answered by the loop) come back at once.
    let hanging = || {
        std::process::Command::new("pgrep")
            .args(["-f", "sleep 987"])
            .status()
            .unwrap()
            .success()
    };
    lab.wait_for("the fault hook to hang", Duration::from_secs(3), hanging);
    let asked = std::time::Instant::now();
    let status = d.cli_ok(&["status"]);
    let stat = d.cat("stat");
    let took = asked.elapsed();
    assert!(
        hanging() && took < Duration::from_millis(500),
        "status and stat took {took:?} while the hook hung:\n{status}\n{stat}"
    );
    d.wait_log("Hook notify_fault (", Duration::from_secs(5));
    d.wait_log(
        "was still running after 1 s (notify_timeout): killed",
        START,
    );
    // notify_backup runs after the fault's hook, once that one was killed.
    let b = wait_blocks(7, "notify_backup after the fault's hook");
    assert!(b[6].starts_with("notify_backup\n"), "{b:?}");
    lab.wait_for(
        "the fault hook's child to be gone",
        Duration::from_secs(3),
        || {
            !std::process::Command::new("pgrep")
                .args(["-f", "sleep 987"])
                .status()
                .unwrap()
                .success()
        },
    );
    // It answers again: the fault clears (notify_backup), and the ATM leads (notify_primary).
    lab.addr("client", "eth0", &format!("{track}/24"));
    let b = wait_blocks(9, "notify_backup and notify_primary after the fault");
    assert!(b[7].starts_with("notify_backup\n"), "{b:?}");
    assert!(b[7].contains("LB_REASON=fault cleared (a track address does not answer)\n"));
    assert!(
        b[8].starts_with("notify_primary\n") && b[8].contains("LB_TERM=2\n"),
        "{b:?}"
    );
}

/// `lb-cli collect`, run on the ATM: a tar.gz support bundle with the daemon's view and the
/// machine's, mode 0600, that never holds the auth key's bytes.
#[test]
fn collect_makes_a_bundle_of_the_listed_files_and_no_key_material() {
    let (mut lab, path) = lab(2);
    let dir = lab.dir();
    let key = dir.join("authkey");
    let secret = "collect-test-key-0123456789abcdef";
    std::fs::write(&key, secret).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "timeout = 100\n",
        &format!("timeout = 100\nauth_key_file = \"{}\"\n", key.display()),
        1,
    );
    std::fs::write(&path, text).unwrap();
    let d = start(&mut lab, &path);
    // Traffic, so that the connections table has a line to show.
    let mut c = Conn::open(&lab);
    c.get();
    let out_path = dir.join("bundle.tar.gz");
    let out = lab
        .ns(&cluster::atm(1))
        .command(lb_tests::procs::bin("lb-cli"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["collect", "--output"])
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        out_path.display().to_string()
    );
    let meta = std::fs::metadata(&out_path).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    let x = dir.join("bundle");
    std::fs::create_dir(&x).unwrap();
    let untar = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&out_path)
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap();
    assert!(untar.success());
    let top = std::fs::read_dir(&x)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(
        top.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("lb-"),
        "{top:?}"
    );
    let read = |f: &str| {
        std::fs::read_to_string(top.join(f)).unwrap_or_else(|e| panic!("{f} in the bundle: {e}"))
    };
    let manifest = read("MANIFEST.txt");
    for f in [
        "lb/daemon.txt",
        "lb/status.txt",
        "lb/status.json",
        "lb/dataplane.txt",
        "lb/fill.txt",
        "lb/metrics.txt",
        "lb/config.toml",
        "lb/daemon.log",
        "lb/tables/connections",
        "lb/tables/stat",
        "lb/tables/atms",
        "lb/tables/loglevel",
        "system/uname.txt",
        "system/ip-addr.txt",
        "system/ip-link.txt",
        "system/ip-route.txt",
        "system/bpftool-prog.txt",
        "system/bpftool-map.txt",
        "system/ethtool-i-eth0.txt",
    ] {
        assert!(top.join(f).is_file(), "{f} missing; MANIFEST:\n{manifest}");
        assert!(manifest.contains(f), "{f} not in MANIFEST:\n{manifest}");
    }
    assert!(read("lb/status.txt").contains("atm1 is primary"));
    assert!(read("lb/daemon.txt").contains(&format!("config {}", path.display())));
    assert!(read("lb/dataplane.txt").contains("lb_xdp on eth0"));
    assert!(read("lb/daemon.log").contains("Configuration OK"));
    assert!(read("lb/config.toml").contains("auth_key_file"));
    assert!(read("lb/fill.txt").starts_with("services "));
    // Every table the daemon mounts, and the map sizes against their use.
    let mounted: Vec<String> = std::fs::read_dir(&d.mount)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(mounted.len() >= 10, "{mounted:?}");
    for t in &mounted {
        assert!(
            top.join("lb/tables").join(t).is_file(),
            "the {t} table is missing; MANIFEST:\n{manifest}"
        );
    }
    let caps = read("lb/tables/config");
    let conn_cap = caps.split_whitespace().nth(2).unwrap();
    assert!(
        read("lb/fill.txt")
            .lines()
            .any(|l| l.starts_with("connections") && l.contains(&format!("of {conn_cap:>10}"))),
        "{}",
        read("lb/fill.txt")
    );
    // The attach mode, as status says it.
    let mode = d.cli_ok(&["status"]);
    assert!(
        read("lb/dataplane.txt").contains("lb_xdp on eth0 (driver)"),
        "{}\n{mode}",
        read("lb/dataplane.txt")
    );
    assert!(
        read("lb/tables/connections").contains(&format!("{}:{}", cluster::CLIENT, c.port())),
        "the client's connection"
    );
    assert!(read("lb/metrics.txt").contains("lb_active_connections"));
    assert!(
        read("system/ip-link.txt").contains("prog/xdp"),
        "the ATM's namespace"
    );
    assert!(read("system/bpftool-prog.txt").contains("lb_xdp"));
    // The key's bytes are nowhere, in the archive or in any file of it.
    let raw = std::fs::read(&out_path).unwrap();
    let gz = std::process::Command::new("gzip")
        .args(["-dc"])
        .arg(&out_path)
        .output()
        .unwrap();
    for blob in [&raw, &gz.stdout] {
        assert!(
            !blob.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the key is in the bundle"
        );
    }
    let grep = std::process::Command::new("grep")
        .args(["-r", "-l", secret])
        .arg(&x)
        .output()
        .unwrap();
    assert!(
        grep.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&grep.stdout)
    );
    // A place that cannot be written is an error, and no partial file is left.
    let bad = lab
        .ns(&cluster::atm(1))
        .command(lb_tests::procs::bin("lb-cli"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["collect", "--output", "/proc/no-such-dir/b.tar.gz"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot create"));
    // Without --output: /var/tmp/lb-HOST-DATE-TIME.tar.gz, its path printed.
    let out = lab
        .ns(&cluster::atm(1))
        .command(lb_tests::procs::bin("lb-cli"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("collect")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let default = PathBuf::from(&printed);
    let _gone = Removed(default.clone());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let name = default.file_name().unwrap().to_string_lossy().into_owned();
    let stamp = name
        .strip_prefix(&format!("lb-{}-", host.trim()))
        .and_then(|r| r.strip_suffix(".tar.gz"))
        .unwrap_or_else(|| panic!("{printed}"));
    assert!(
        default.parent() == Some(Path::new("/var/tmp"))
            && stamp.len() == 15
            && stamp.chars().enumerate().all(|(i, ch)| if i == 8 {
                ch == '-'
            } else {
                ch.is_ascii_digit()
            }),
        "{printed}"
    );
    let meta = std::fs::metadata(&default).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
}

/// Removes a file when dropped (the default bundle, outside the lab's directory).
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A service's `quorum`: with fewer servers up it is down (the `services` table, status and
/// its hooks say so), and the servers still up go on serving.
#[test]
fn quorum_takes_the_service_down_and_runs_its_hook() {
    let (mut lab, path) = lab(3);
    let dir = lab.dir();
    let log = dir.join("hooks.log");
    let hook = dir.join("hook.sh");
    write_executable(
        &hook,
        &format!(
            "#!/bin/sh\nprintf '%s %s %s\\n' \"$LB_EVENT\" \"$LB_SERVICE\" \"$LB_SERVERS_UP\" >> {}\n",
            log.display()
        ),
    );
    let h = hook.display();
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "scheduler = \"rr\"\n",
        &format!("scheduler = \"rr\"\nquorum = 2\nnotify_up = \"{h}\"\nnotify_down = \"{h}\"\n"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    let mut d = start(&mut lab, &path);
    let http_line = |d: &Daemon| {
        d.cat("services")
            .lines()
            .find(|l| l.contains(":80 "))
            .unwrap()
            .to_string()
    };
    assert!(http_line(&d).contains(" up "), "{}", http_line(&d));
    d.cli_ok(&["server", "disable", "http", "web1"]);
    assert!(http_line(&d).contains(" up "), "2 of 3: {}", http_line(&d));
    d.cli_ok(&["server", "disable", "http", "web2"]);
    assert!(
        http_line(&d).contains(" down "),
        "1 of 3: {}",
        http_line(&d)
    );
    let status = d.cli_ok(&["status"]);
    assert!(
        status.contains("1/3 servers up, quorum 2: DOWN"),
        "{status}"
    );
    d.wait_log("Service http 192.0.2.100:80 is down", START);
    lab.wait_for("the service's notify_down", START, || {
        std::fs::read_to_string(&log).unwrap_or_default() == "down http 1\n"
    });
    // web3 still serves.
    assert_eq!(Conn::open(&lab).get(), "s3");
    d.cli_ok(&["server", "enable", "http", "web2"]);
    assert!(http_line(&d).contains(" up "), "{}", http_line(&d));
    lab.wait_for("the service's notify_up", START, || {
        std::fs::read_to_string(&log).unwrap_or_default() == "down http 1\nup http 2\n"
    });
}

/// `hysteresis`, as keepalived's: with quorum 2 and hysteresis 1 of three servers, an up
/// service goes down only below 1 server up, and a down one comes back only at 3.
#[test]
fn hysteresis_keeps_a_quorum_service_from_flapping_both_ways() {
    let (mut lab, path) = lab(3);
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "scheduler = \"rr\"\n",
        "scheduler = \"rr\"\nquorum = 2\nhysteresis = 1\n",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let mut d = start(&mut lab, &path);
    let state = |d: &Daemon| {
        let line = d
            .cat("services")
            .lines()
            .find(|l| l.contains(":80 "))
            .unwrap()
            .to_string();
        if line.contains(" up ") {
            "up"
        } else if line.contains(" down ") {
            "down"
        } else {
            panic!("{line}")
        }
    };
    assert_eq!(state(&d), "up");
    let steps = [
        ("disable", "web1", "up"),
        // 1 of 3 is below the quorum, not below quorum - hysteresis.
        ("disable", "web2", "up"),
        ("disable", "web3", "down"),
        ("enable", "web1", "down"),
        // 2 of 3 is the quorum, not quorum + hysteresis.
        ("enable", "web2", "down"),
        ("enable", "web3", "up"),
    ];
    for (verb, server, want) in steps {
        d.cli_ok(&["server", verb, "http", server]);
        assert_eq!(
            state(&d),
            want,
            "after {verb} {server}:\n{}",
            d.cli_ok(&["status"])
        );
    }
    d.wait_log("Service http 192.0.2.100:80 is down", START);
    d.wait_log("Service http 192.0.2.100:80 is up", START);
}

/// `sorry_server = true`: a server that takes new connections only while no other server
/// of its service is up, and hands them back on the first one's return; its own open
/// connections go on.
#[test]
fn the_sorry_server_answers_when_every_server_is_down_and_hands_back() {
    let (mut lab, path) = lab(3);
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        &format!(
            "name = \"web3\"\naddress = \"{}\"\n",
            cluster::server_addr(3)
        ),
        &format!(
            "name = \"web3\"\naddress = \"{}\"\nsorry_server = true\n",
            cluster::server_addr(3)
        ),
        1,
    );
    std::fs::write(&path, text).unwrap();
    let d = start(&mut lab, &path);
    let served = |n: usize| -> Vec<String> {
        let mut v: Vec<String> = (0..n).map(|_| Conn::open(&lab).get()).collect();
        v.sort();
        v.dedup();
        v
    };
    assert_eq!(served(8), vec!["s1", "s2"], "the sorry server stands by");
    let status = d.cli_ok(&["status"]);
    assert!(status.contains("2/2 servers up"), "{status}");
    assert!(status.contains("sorry server, standing by"), "{status}");
    d.cli_ok(&["server", "disable", "http", "web1"]);
    assert_eq!(served(4), vec!["s2"]);
    d.cli_ok(&["server", "disable", "http", "web2"]);
    assert_eq!(served(4), vec!["s3"], "no server up: the sorry server");
    let status = d.cli_ok(&["status"]);
    assert!(status.contains("0/2 servers up: DOWN"), "{status}");
    assert!(status.contains("sorry server, SERVING"), "{status}");
    assert!(
        d.cat("services").contains(":80 down "),
        "the service is down"
    );
    // A keep-alive connection to the sorry server, open when web1 returns, goes on there;
    // new ones go to web1.
    let mut open = Conn::open(&lab);
    assert_eq!(open.get(), "s3");
    d.cli_ok(&["server", "enable", "http", "web1"]);
    assert_eq!(served(4), vec!["s1"], "handed back");
    assert_eq!(open.get(), "s3", "its open connection stays");
}

/// `one_packet = true` on a UDP service: each datagram is scheduled alone, so one client
/// port's datagrams spread over every server (rr), and none leaves a connection entry.
#[test]
fn a_one_packet_udp_service_spreads_one_client_ports_datagrams_over_every_server() {
    let (mut lab, path) = lab(1);
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "protocol = \"udp\"\n",
        "protocol = \"udp\"\nscheduler = \"rr\"\none_packet = true\n",
        1,
    ) + &format!(
        "[[service.server]]\nname = \"dns2\"\naddress = \"{}\"\n\
         [[service.server]]\nname = \"dns3\"\naddress = \"{}\"\n",
        cluster::server_addr(2),
        cluster::server_addr(3)
    );
    std::fs::write(&path, text).unwrap();
    let d = start(&mut lab, &path);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let answers = std::thread::scope(|scope| {
        // A UDP server on the VIP (held on lo) in each server's namespace: it answers with
        // its name.
        for i in 1..=3 {
            let (lab, stop) = (&lab, &stop);
            scope.spawn(move || {
                let _in = lab.ns(&cluster::server(i)).enter();
                let sock = UdpSocket::bind((cluster::VIP, 53)).unwrap();
                sock.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut buf = [0u8; 64];
                let start = std::time::Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && start.elapsed() < Duration::from_secs(30)
                {
                    if let Ok((_, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(format!("s{i}").as_bytes(), from);
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(300));
        let _in = lab.ns("client").enter();
        let sock = UdpSocket::bind((cluster::CLIENT, 5353)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut got = Vec::new();
        for i in 0..9u32 {
            sock.send_to(&i.to_be_bytes(), (cluster::VIP, 53)).unwrap();
            let mut buf = [0u8; 64];
            let (n, _) = sock.recv_from(&mut buf).expect("an answer");
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        got
    });
    let mut names = answers.clone();
    names.sort();
    names.dedup();
    assert_eq!(
        names,
        vec!["s1", "s2", "s3"],
        "from one client port: {answers:?}"
    );
    assert!(
        !d.cat("connections").contains(":53 "),
        "no entry: {}",
        d.cat("connections")
    );
}

/// `lc`, IPVS's least-connection scheduler: new connections go to the servers with the
/// fewest active ones, away from a server that holds long connections; closed ones (by FIN
/// or by RST) no longer count.
#[test]
fn lc_sends_new_connections_away_from_a_server_holding_long_connections() {
    let (mut lab, path) = lab(3);
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "scheduler = \"rr\"\n",
        "scheduler = \"lc\"\n",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let d = start(&mut lab, &path);
    // Three long (keep-alive) connections, all to web1 while the others are out.
    d.cli_ok(&["server", "disable", "http", "web2"]);
    d.cli_ok(&["server", "disable", "http", "web3"]);
    let mut long: Vec<Conn> = (0..3).map(|_| Conn::open(&lab)).collect();
    for c in &mut long {
        assert_eq!(c.get(), "s1");
    }
    d.cli_ok(&["server", "enable", "http", "web2"]);
    d.cli_ok(&["server", "enable", "http", "web3"]);
    // Short connections, one after the other: each closes before the next opens, so web2
    // and web3 stay below web1's three.
    let mut got = Vec::new();
    for _ in 0..12 {
        got.push(Conn::open(&lab).get());
    }
    assert!(!got.contains(&"s1".to_string()), "{got:?}");
    // Held open, new ones fill web2 and web3 up to web1's three, then spread evenly.
    let mut held: Vec<Conn> = Vec::new();
    let mut to = Vec::new();
    for _ in 0..6 {
        let mut c = Conn::open(&lab);
        to.push(c.get());
        held.push(c);
    }
    to.sort();
    assert_eq!(to, vec!["s2", "s2", "s2", "s3", "s3", "s3"], "{to:?}");
    let list = d.cli_ok(&["list", "servers", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&list).unwrap();
    for l in json
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["service"] == "http")
    {
        assert_eq!(l["active"], 3, "{json}");
    }
    for c in &mut long {
        assert_eq!(c.get(), "s1", "long connections stay");
    }
    // The long ones end by RST (SO_LINGER 0): web1 counts none at once, with no sweep, so
    // the next three held connections are all its.
    for c in long {
        socket2::SockRef::from(&c.stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    let mut again = Vec::new();
    for _ in 0..3 {
        let mut c = Conn::open(&lab);
        again.push(c.get());
        held.push(c);
    }
    assert_eq!(again, vec!["s1"; 3], "{again:?}");
}

/// `wlc` and `sed`: least connections per unit of weight. With web1 at weight 3 and web2 at
/// 1, eight held connections split 6 to 2 under wlc; sed counts the new one too, (active +
/// 1) / weight, and splits them 6 to 2 as well, but starts on the heavy server twice.
#[test]
fn wlc_and_sed_share_held_connections_by_weight() {
    for (sched, first) in [
        ("wlc", ["s1", "s2", "s1", "s1"]),
        ("sed", ["s1", "s1", "s1", "s2"]),
    ] {
        let (mut lab, path) = lab(3);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replacen(
                "scheduler = \"rr\"\n",
                &format!("scheduler = \"{sched}\"\n"),
                1,
            )
            .replacen(
                &format!(
                    "name = \"web1\"\naddress = \"{}\"\n",
                    cluster::server_addr(1)
                ),
                &format!(
                    "name = \"web1\"\naddress = \"{}\"\nweight = 3\n",
                    cluster::server_addr(1)
                ),
                1,
            );
        std::fs::write(&path, text).unwrap();
        let d = start(&mut lab, &path);
        d.cli_ok(&["server", "disable", "http", "web3"]);
        let mut held = Vec::new();
        let mut to = Vec::new();
        for _ in 0..8 {
            let mut c = Conn::open(&lab);
            to.push(c.get());
            held.push(c);
        }
        assert_eq!(&to[..4], &first, "{sched}: {to:?}");
        let n = |s: &str| to.iter().filter(|t| *t == s).count();
        assert_eq!((n("s1"), n("s2")), (6, 2), "{sched}: {to:?}");
    }
}

/// A connection that ends without FIN or RST (idle past the timeout) stops counting for
/// `lc` once the sweep has found it gone.
#[test]
fn lc_forgets_a_connection_that_idled_out() {
    let (mut lab, path) = lab(3);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replacen("scheduler = \"rr\"\n", "scheduler = \"lc\"\n", 1)
        .replacen("timeout = 100\n", "timeout = 3\n", 1);
    std::fs::write(&path, text).unwrap();
    let d = start(&mut lab, &path);
    d.cli_ok(&["server", "disable", "http", "web2"]);
    let mut idle = Conn::open(&lab);
    assert_eq!(idle.get(), "s1");
    d.cli_ok(&["server", "enable", "http", "web2"]);
    d.cli_ok(&["server", "disable", "http", "web3"]);
    assert_eq!(Conn::open(&lab).get(), "s2", "web1 holds one");
    // Idle past the 3 s timeout and swept (every 2 s): web1 is free again, and first.
    lab.wait_for(
        "web1's idle connection to be forgotten",
        Duration::from_secs(15),
        || Conn::open(&lab).get() == "s1",
    );
    drop(idle);
}

/// `persistence_netmask`: clients of one prefix stick to one server together, where rr
/// would spread them (each new client address gets the next server of its CPU's cursor).
#[test]
fn netmask_persistence_holds_across_clients_of_one_prefix() {
    let (mut lab, path) = lab(3);
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "scheduler = \"rr\"\n",
        "scheduler = \"rr\"\npersistence = 60\npersistence_netmask = 26\n",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let _d = start(&mut lab, &path);
    // Six more client addresses in the client's /26 (192.0.2.0/26).
    let others: Vec<String> = (51..57).map(|i| format!("192.0.2.{i}")).collect();
    for a in &others {
        lab.addr("client", "eth0", &format!("{a}/24"));
    }
    let from = |src: &str| -> String {
        let _in = lab.ns("client").enter();
        cluster::request_from(src, Duration::from_secs(5)).unwrap()
    };
    let first = from(cluster::CLIENT);
    for _ in 0..2 {
        for a in &others {
            assert_eq!(from(a), first, "{a}: the same /26 sticks together");
        }
    }
}

/// Idle timeouts by protocol and TCP state (`[cluster.timeouts]`, as `ipvsadm --set`) and
/// a service's own (`[service.timeouts]`): the connections table counts each connection
/// down from its own, the dataplane starts a new connection past it, and `timeouts` is
/// read and written as `tcp tcpfin udp`.
#[test]
fn each_protocol_and_tcp_state_times_out_by_its_own_timeout_and_a_service_may_override_it() {
    let (mut lab, path) = lab(3);
    let text = config(3, "[cluster.timeouts]\ntcp_fin = 3\nudp = 60\n").replacen(
        "protocol = \"udp\"\n",
        "protocol = \"udp\"\n[service.timeouts]\nudp = 3\n",
        1,
    ) + &format!(
        "\n[[service]]\nname = \"syslog\"\nvip = \"{vip}\"\nport = 514\nprotocol = \"udp\"\n\
         [service.check]\nkind = \"none\"\n[[service.server]]\nname = \"log1\"\n\
         address = \"{s2}\"\n",
        vip = cluster::VIP,
        s2 = cluster::server_addr(2)
    );
    std::fs::write(&path, text).unwrap();
    let d = start(&mut lab, &path);
    assert_eq!(d.cat("timeouts"), "100 3 60\n");
    assert_eq!(d.cat("timeout"), "100\n", "TCL's table: the TCP timeout");
    // Seconds left of the client's connection from `port` to `vport`.
    let left = |port: u16, vport: u16| -> Option<u64> {
        let (client, vip) = (
            format!("{}:{port}", cluster::CLIENT),
            format!("{}:{vport}", cluster::VIP),
        );
        d.cat("connections").lines().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(1) == Some(&client.as_str()) && f.get(2) == Some(&vip.as_str()))
                .then(|| f[3].parse().unwrap())
        })
    };

    // An open TCP connection counts down from tcp; once the client has sent its FIN, from
    // tcp_fin, and it is gone soon after.
    let mut c = Conn::open(&lab);
    c.get();
    let open = left(c.port(), 80).expect("the connection's line");
    assert!((90..=100).contains(&open), "{open} s left");
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    lab.wait_for("the closing connection's timeout", START, || {
        left(c.port(), 80).is_some_and(|s| s <= 3)
    });
    lab.wait_for("the closed connection to time out", START, || {
        left(c.port(), 80).is_none()
    });

    // UDP from one client port to both services: dns has its own 3 s, syslog the
    // cluster's 60 s. A datagram past 3 s starts a new dns connection in the dataplane, and
    // none for syslog.
    let _in = lab.ns("client").enter();
    let sock = UdpSocket::bind((cluster::CLIENT, 5353)).unwrap();
    let send = |port: u16| {
        sock.send_to(b"x", (cluster::VIP, port)).unwrap();
    };
    let new = || stat(&d)[5];
    send(53);
    send(514);
    lab.wait_for("the two UDP entries", START, || {
        left(5353, 53).is_some() && left(5353, 514).is_some()
    });
    assert!(left(5353, 53).unwrap() <= 3);
    assert!((50..=60).contains(&left(5353, 514).unwrap()));
    let before = new();
    send(53);
    send(514);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(new(), before, "within their timeouts: the same connections");
    std::thread::sleep(Duration::from_millis(3800));
    assert_eq!(left(5353, 53), None, "past dns's 3 s");
    send(53);
    send(514);
    lab.wait_for("dns's new connection", START, || new() == before + 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(new(), before + 1, "syslog's connection lives on");

    // Writes, as ipvsadm --set: 0 keeps a value; `timeout` is tcp's.
    d.cli_ok(&["write", "timeouts", "200", "0", "0"]);
    assert_eq!(d.cat("timeouts"), "200 3 60\n");
    d.cli_ok(&["write", "timeout", "150"]);
    assert_eq!(d.cat("timeouts"), "150 3 60\n");
    assert_eq!(d.cat("timeout"), "150\n");
    let bad = d.cli(&["write", "timeouts", "1", "2"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("three numbers"),
        "{bad:?}"
    );
    assert_eq!(
        d.cat("timeouts"),
        "150 3 60\n",
        "a bad write changes nothing"
    );
    let m = d.scrape(&lab);
    assert!(
        m.contains("lb_connection_timeout_seconds{node=\"atm1\",state=\"tcp\"} 150\n")
            && m.contains("lb_connection_timeout_seconds{node=\"atm1\",state=\"tcp_fin\"} 3\n"),
        "{m}"
    );
    // The new tcp timeout applies to connections at once.
    let mut c = Conn::open(&lab);
    c.get();
    let open = left(c.port(), 80).expect("the connection's line");
    assert!((140..=150).contains(&open), "{open} s left");

    // A service's own tcp and tcp_fin, brought in by a reload, beat the cluster's.
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "scheduler = \"rr\"\n",
        "scheduler = \"rr\"\n[service.timeouts]\ntcp = 40\ntcp_fin = 2\n",
        1,
    );
    std::fs::write(&path, text).unwrap();
    d.cli_ok(&["reload"]);
    let mut c = Conn::open(&lab);
    c.get();
    let open = left(c.port(), 80).expect("the connection's line");
    assert!((30..=40).contains(&open), "{open} s left");
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    lab.wait_for("the service's closing timeout", START, || {
        left(c.port(), 80).is_some_and(|s| s <= 2)
    });
    assert_eq!(
        d.cat("timeouts"),
        "100 3 60\n",
        "the cluster's, from the file again: a write lasts until the next reload"
    );
}

/// TCL's `local` method: the primary ATM serves the service itself, its packets going up
/// its own stack (which holds the VIP); `servers` shows it as `local`, at the VIP; its
/// check goes to loopback.
#[test]
fn a_local_server_is_served_by_the_atm_itself() {
    let (mut lab, path) = lab(1);
    let atm = cluster::atm(1);
    lab.nginx(&atm, &atm, &[80]);
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "[service.check]\nkind = \"none\"\n",
        "[service.check]\nkind = \"tcp\"\ninterval_ms = 200\n\
         [[service.server]]\nname = \"self\"\nmethod = \"local\"\n",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let d = start(&mut lab, &path);
    let vip = format!("{}:80", cluster::VIP);
    let local_line = || -> String {
        d.cat("servers")
            .lines()
            .find(|l| l.contains(" local "))
            .unwrap_or_default()
            .to_string()
    };
    lab.wait_for("the local server up by its check", START, || {
        local_line().starts_with(&format!("tcp {vip} {vip} up 1 local "))
    });
    let served = |n: usize| -> Vec<String> {
        let mut v: Vec<String> = (0..n).map(|_| Conn::open(&lab).get()).collect();
        v.sort();
        v.dedup();
        v
    };
    assert_eq!(
        served(6),
        vec![atm.clone(), "s1".to_string()],
        "rr over both"
    );
    let list = d.cli_ok(&["list", "servers"]);
    assert!(
        list.lines()
            .any(|l| l.contains("self") && l.contains("local")),
        "{list}"
    );
    let m = d.scrape(&lab);
    assert!(
        m.lines().any(|l| l.starts_with("lb_server_info{")
            && l.contains("method=\"local\"")
            && l.contains("server=\"self\"")),
        "{m}"
    );
    // Its connections are counted like any server's.
    let packets: u64 = local_line().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(packets > 0, "{}", local_line());
    d.cli_ok(&["server", "disable", "http", "self"]);
    assert_eq!(served(4), vec!["s1"]);
    d.cli_ok(&["server", "enable", "http", "self"]);
    d.cli_ok(&["server", "disable", "http", "web1"]);
    assert_eq!(served(4), vec![atm.clone()], "the ATM alone");
}
