//! Tier 3: health checks with real servers behind the VIP. A stopped HTTP service is taken
//! out within fall × interval and clients stop seeing failures; it comes back after rise ×
//! interval; the status and body an http check expects; ping = false keeps a server up that
//! drops ICMP; https with and without certificate verification; a hanging script is killed
//! at its timeout while other servers' checks go on; a failed server's open connections are
//! dropped; drain and disable.

use std::{
    io::Read,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    cluster,
    lab::{BIG_BYTES, Lab},
    procs::Daemon,
};

const START: Duration = Duration::from_secs(20);
const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 150;
const RISE: u64 = 2;
const FALL: u64 = 3;

fn header() -> String {
    format!(
        r#"[cluster]
name = "lab"
timeout = 100

[[atm]]
name = "atm1"
address = "{}"
interface = "eth0"
"#,
        cluster::atm_addr(1)
    )
}

fn service(name: &str, vip: &str, port: u16, check: &str, servers: &[(usize, &str)]) -> String {
    let mut s = format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nscheduler = \"rr\"\n\
         [service.check]\n{check}\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}\n"
    );
    for (i, extra) in servers {
        s += &format!(
            "[[service.server]]\nname = \"s{i}\"\naddress = \"{}\"\n{extra}\n",
            cluster::server_addr(*i)
        );
    }
    s
}

/// A lab with one ATM and three nginx servers holding the VIPs on lo.
fn lab(vips: &[&str]) -> Lab {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 3);
    for i in 1..=3 {
        let ns = cluster::server(i);
        lab.nginx(&ns, &ns, &[80]);
        for v in vips {
            cluster::hold_vip_on_lo(&lab, &ns, v);
        }
    }
    lab
}

/// The lab most tests use: `lab(&[VIP])` and one ATM running an `http` service on the VIP
/// with an http check of `/` on s1, s2 and s3. (The daemon drops before the lab.)
fn http_lab() -> (Lab, Daemon) {
    let mut lab = lab(&[cluster::VIP]);
    // s2's hooks write their event to s2-hooks.log.
    let hook = lab.dir().join("s2-hook.sh");
    lb_tests::lab::write_executable(
        &hook,
        &format!(
            "#!/bin/sh\nprintf '%s %s %s\\n' \"$LB_EVENT\" \"$LB_SERVER_NAME\" \"$LB_REASON\" >> {}\n",
            lab.dir().join("s2-hooks.log").display()
        ),
    );
    let hooks = format!("notify_up = \"{0}\"\nnotify_down = \"{0}\"", hook.display());
    let config = header()
        + &service(
            "http",
            cluster::VIP,
            80,
            "kind = \"http\"\npath = \"/\"",
            &[(1, ""), (2, &hooks), (3, "")],
        );
    let d = start(&mut lab, &config);
    (lab, d)
}

fn start(lab: &mut Lab, config: &str) -> Daemon {
    let path: PathBuf = lab.dir().join("lb.toml");
    std::fs::write(&path, config).unwrap();
    let mut d = Daemon::start(lab, &cluster::atm(1), &path, &[]);
    d.wait_log("This ATM is primary", START);
    d
}

/// The state column of the servers-table line of `server:port` in service `vip:port`.
fn state(d: &Daemon, server: &str, vip: &str) -> Option<String> {
    d.cat("servers").lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f[1] == server && f[2] == vip).then(|| f[3].to_string())
    })
}

fn wait_state(
    lab: &Lab,
    d: &Daemon,
    server: &str,
    vip: &str,
    want: &str,
    limit: Duration,
) -> Instant {
    lab.wait_for(&format!("{server} to be {want} in {vip}"), limit, || {
        state(d, server, vip).as_deref() == Some(want)
    });
    Instant::now()
}

#[test]
fn a_stopped_server_leaves_within_fall_intervals_and_returns_after_rise() {
    let (mut lab, d) = http_lab();
    assert!(
        d.log()
            .contains("Checks started: 3 server pings, 3 service checks"),
        "{}",
        d.log()
    );

    // A client sending requests on new connections throughout.
    type Log = Vec<(Instant, Result<String, String>)>;
    let results: Arc<Mutex<Log>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = lab.ns("client").name().to_string();
    let load = {
        let (results, stop) = (results.clone(), stop.clone());
        thread::spawn(move || {
            let ns = lb_tests::netns::NetNs::attach(&client);
            let _in = ns.enter();
            let agent = ureq::AgentBuilder::new()
                .max_idle_connections(0)
                .timeout(Duration::from_secs(2))
                .build();
            let begin = Instant::now();
            while !stop.load(Ordering::SeqCst) && begin.elapsed() < Duration::from_secs(30) {
                let t = Instant::now();
                let r = agent
                    .get(&format!("http://{}/", cluster::VIP))
                    .call()
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.into_string().map_err(|e| e.to_string()));
                results
                    .lock()
                    .unwrap()
                    .push((t, r.map(|b| b.trim().to_string())));
                thread::sleep(Duration::from_millis(10));
            }
        })
    };
    thread::sleep(Duration::from_secs(1));
    let s2 = format!("{}:80", cluster::server_addr(2));
    let vip = format!("{}:80", cluster::VIP);
    assert_eq!(state(&d, &s2, &vip).as_deref(), Some("up"));

    lab.kill("s2");
    let stopped = Instant::now();
    let down = wait_state(&lab, &d, &s2, &vip, "down", Duration::from_secs(5));
    let detection = down - stopped;
    let bound = Duration::from_millis(FALL * INTERVAL_MS + TIMEOUT_MS + 300);
    eprintln!(
        "stopped server detected down after {} ms (bound {} ms)",
        detection.as_millis(),
        bound.as_millis()
    );
    assert!(detection <= bound, "{detection:?}");
    // And not before `fall` probes could have failed (the first comes at once at worst).
    assert!(
        detection >= Duration::from_millis((FALL - 1) * INTERVAL_MS - 20),
        "down after {detection:?}: fewer than {FALL} failures counted"
    );
    thread::sleep(Duration::from_secs(2));

    lab.nginx("s2", "s2", &[80]);
    let restarted = Instant::now();
    let up = wait_state(&lab, &d, &s2, &vip, "up", Duration::from_secs(5));
    let recovery = up - restarted;
    eprintln!("restarted server up after {} ms", recovery.as_millis());
    assert!(
        recovery <= Duration::from_millis(RISE * INTERVAL_MS + TIMEOUT_MS + 300),
        "{recovery:?}"
    );
    assert!(
        recovery >= Duration::from_millis((RISE - 1) * INTERVAL_MS - 20),
        "up after {recovery:?}: fewer than {RISE} passes counted"
    );
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();

    let results = results.lock().unwrap();
    let failed: Vec<(Duration, &String)> = results
        .iter()
        .filter_map(|(t, r)| {
            r.as_ref().err().map(|e| {
                // One in flight to s2 at the stop may fail; nothing earlier.
                assert!(
                    stopped.saturating_duration_since(*t) < Duration::from_millis(100),
                    "a request {:?} before the stop failed: {e}",
                    stopped - *t
                );
                (t.saturating_duration_since(stopped), e)
            })
        })
        .collect();
    // Failures only for requests that went to s2 while the checks were finding out.
    for (after_stop, e) in &failed {
        assert!(
            *after_stop <= detection + Duration::from_millis(100),
            "a request {} ms after the stop failed, after the server was taken out: {e}",
            after_stop.as_millis()
        );
    }
    let before_stop = results.iter().filter(|(t, _)| *t < stopped).count();
    assert!(
        before_stop > 20 && results.len() > 200,
        "{} requests",
        results.len()
    );
    let to_s2_after_up = results
        .iter()
        .filter(|(t, r)| *t > up && r.as_deref() == Ok("s2"))
        .count();
    assert!(to_s2_after_up > 0, "s2 takes requests again");
    eprintln!(
        "{} requests, {} failed during detection",
        results.len(),
        failed.len()
    );

    let log = d.log();
    assert!(
        log.contains(&format!("s2 {s2} down: http GET /: "))
            && log.contains(&format!(", {FALL} of {FALL} failed")),
        "{log}"
    );
    assert!(
        log.contains(&format!("s2 {s2} up: {RISE} checks in a row passed")),
        "{log}"
    );
    assert_eq!(
        log.matches(&format!("s2 {s2} down")).count(),
        1,
        "logged once"
    );
    // The server's own hooks ran on the checks' verdicts, with the reason.
    let hooks = std::fs::read_to_string(lab.dir().join("s2-hooks.log")).unwrap_or_default();
    let lines: Vec<&str> = hooks.lines().collect();
    assert!(
        lines.len() == 2
            && lines[0].starts_with("down s2 http GET /: ")
            && lines[1].starts_with(&format!("up s2 {RISE} checks in a row passed")),
        "{hooks}"
    );
}

#[test]
fn ping_false_keeps_a_server_up_that_drops_icmp() {
    let mut lab = lab(&[cluster::VIP]);
    for ns in ["s1", "s2"] {
        let s = lab.ns(ns);
        s.nft_filter("noping", "input", "icmp type echo-request drop");
    }
    let config = header()
        + &service(
            "http",
            cluster::VIP,
            80,
            "kind = \"tcp\"",
            &[(1, "ping = false"), (2, ""), (3, "")],
        );
    let d = start(&mut lab, &config);
    let vip = format!("{}:80", cluster::VIP);
    let s2 = format!("{}:80", cluster::server_addr(2));
    wait_state(&lab, &d, &s2, &vip, "down", Duration::from_secs(5));
    assert!(
        d.log().contains(&format!(
            "s2 {s2} down: no answer to ping within {TIMEOUT_MS} ms"
        )),
        "{}",
        d.log()
    );
    thread::sleep(Duration::from_millis(FALL * INTERVAL_MS * 2));
    assert_eq!(
        state(&d, &format!("{}:80", cluster::server_addr(1)), &vip).as_deref(),
        Some("up")
    );
    assert!(
        d.log()
            .contains("Checks started: 2 server pings, 3 service checks")
    );
}

#[test]
fn https_checks_with_and_without_certificate_verification() {
    let mut lab = lab(&[cluster::VIP, "192.0.2.101"]);
    let cert = rcgen::generate_simple_self_signed(vec![cluster::server_addr(1)]).unwrap();
    lab.kill("s1");
    lab.nginx_tls(
        "s1",
        "s1",
        &[80],
        Some((443, &cert.cert.pem(), &cert.signing_key.serialize_pem())),
    );
    let config = header()
        + &service(
            "lax",
            cluster::VIP,
            443,
            "kind = \"https\"\npath = \"/\"\nverify = false",
            &[(1, "")],
        )
        + &service(
            "strict",
            "192.0.2.101",
            443,
            "kind = \"https\"\npath = \"/\"",
            &[(1, "")],
        );
    let d = start(&mut lab, &config);
    let s1 = format!("{}:443", cluster::server_addr(1));
    wait_state(
        &lab,
        &d,
        &s1,
        "192.0.2.101:443",
        "down",
        Duration::from_secs(5),
    );
    thread::sleep(Duration::from_millis(FALL * INTERVAL_MS * 2));
    assert_eq!(
        state(&d, &s1, &format!("{}:443", cluster::VIP)).as_deref(),
        Some("up"),
        "verify = false accepts it"
    );
    let log = d.log();
    assert!(
        log.contains(&format!("s1 {s1} down: https GET /: ")),
        "{log}"
    );
    assert!(
        log.to_lowercase().contains("certificate"),
        "the reason names the certificate: {log}"
    );
}

#[test]
fn a_hanging_script_is_killed_at_its_timeout_and_counts_as_a_failure() {
    let mut lab = lab(&[cluster::VIP]);
    let script = lab.dir().join("hang.sh");
    lb_tests::lab::write_executable(
        &script,
        "#!/bin/sh\n# The environment names the target: hang for s2, fail for s3.\n\
         [ \"$LB_PORT\" = 80 ] && [ \"$LB_SERVICE\" = http ] || exit 2\n\
         [ \"$LB_SERVER\" = 192.0.2.12 ] && sleep 31.25\n\
         [ \"$LB_SERVER\" = 192.0.2.13 ] && exit 1\nexit 0\n",
    );
    let config = header()
        + &service(
            "http",
            cluster::VIP,
            80,
            &format!("kind = \"script\"\nscript = \"{}\"", script.display()),
            &[(1, ""), (2, ""), (3, "")],
        );
    let d = start(&mut lab, &config);
    let vip = format!("{}:80", cluster::VIP);
    let s2 = format!("{}:80", cluster::server_addr(2));
    wait_state(&lab, &d, &s2, &vip, "down", Duration::from_secs(5));
    assert!(
        d.log().contains(&format!(
            "s2 {s2} down: script killed after {TIMEOUT_MS} ms"
        )),
        "{}",
        d.log()
    );
    // s3's quick failures are counted while s2's probes hang; s1 (right environment, exit
    // 0) stays up well past fall × interval.
    let s3 = format!("{}:80", cluster::server_addr(3));
    wait_state(&lab, &d, &s3, &vip, "down", Duration::from_secs(5));
    assert!(
        d.log()
            .contains(&format!("s3 {s3} down: script exited with exit status: 1")),
        "{}",
        d.log()
    );
    thread::sleep(Duration::from_millis(2 * FALL * INTERVAL_MS));
    assert_eq!(
        state(&d, &format!("{}:80", cluster::server_addr(1)), &vip).as_deref(),
        Some("up")
    );
    // Killed with everything it started: no `sleep 31.25` outlives its check.
    thread::sleep(Duration::from_millis(100));
    let lingering = std::process::Command::new("pgrep")
        .args(["-f", "sleep 31.25"])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&lingering.stdout).lines().count();
    assert!(
        pids <= 1,
        "at most the check in flight may be running: {pids} sleeping"
    );
}

/// A `/big` download through the VIP (about 12 s at 160 kB/s), in a thread: its length or
/// why it broke.
fn start_download(lab: &Lab) -> thread::JoinHandle<Result<usize, String>> {
    let client = lab.ns("client").name().to_string();
    thread::spawn(move || {
        let ns = lb_tests::netns::NetNs::attach(&client);
        let _in = ns.enter();
        let resp = ureq::AgentBuilder::new()
            .timeout_read(Duration::from_secs(5))
            .build()
            .get(&format!("http://{}/big", cluster::VIP))
            .call()
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        resp.into_reader()
            .read_to_end(&mut body)
            .map_err(|e| format!("after {} bytes: {e}", body.len()))?;
        Ok(body.len())
    })
}

/// The server (`address:port`, and its name `sN`) of the only connection in the table.
fn download_server(d: &Daemon) -> (String, String) {
    thread::sleep(Duration::from_millis(500));
    let conns = d.cat("connections");
    let line = conns
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no connection: {conns}"));
    let server = line.split(' ').nth(4).unwrap().to_string();
    let octet: u8 = server
        .split(':')
        .next()
        .unwrap()
        .rsplit('.')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (server, format!("s{}", octet - 10))
}

/// TCL drops a failed server's connections (unlike drain, which lets them finish).
#[test]
fn a_server_that_fails_its_checks_loses_its_open_connections() {
    let (lab, d) = http_lab();
    let download = start_download(&lab);
    let (server, name) = download_server(&d);
    // The server still serves the client; only the ATM's probes go unanswered.
    let s = lab.ns(&name);
    s.nft_filter(
        "nocheck",
        "input",
        &format!("ip saddr {} drop", cluster::atm_addr(1)),
    );
    let vip = format!("{}:80", cluster::VIP);
    wait_state(&lab, &d, &server, &vip, "down", Duration::from_secs(5));
    assert!(
        d.log().contains(&format!("{name} {server} down: ")),
        "{}",
        d.log()
    );
    // Dropped beside the event loop, on a thread at nice 10: on two busy cores that may
    // take a moment.
    let dropped = format!("{name} {server}: 1 connections dropped");
    lab.wait_for(&dropped, Duration::from_secs(10), || {
        d.log().contains(&dropped)
    });
    assert!(
        !d.cat("connections").contains(&server),
        "{}",
        d.cat("connections")
    );
    // Its next packets are scheduled afresh, to a server that knows nothing of them.
    let r = download.join().unwrap();
    assert!(
        r.is_err(),
        "the download survived its server's removal: {r:?}"
    );
}

/// The status and body a check expects: TCL's ASA looks at the answer, not only the port.
#[test]
fn http_checks_compare_the_status_and_the_body() {
    let vips = ["192.0.2.100", "192.0.2.101", "192.0.2.102"];
    let mut lab = lab(&vips);
    let config = header()
        + &service(
            "unavailable",
            vips[0],
            80,
            "kind = \"http\"\npath = \"/unavailable\"",
            &[(1, ""), (2, "")],
        )
        + &service(
            "expect503",
            vips[1],
            80,
            "kind = \"http\"\npath = \"/unavailable\"\nexpect = 503",
            &[(1, ""), (2, "")],
        )
        + &service(
            "body",
            vips[2],
            80,
            "kind = \"http\"\npath = \"/\"\nbody = \"s1\"",
            &[(1, ""), (2, "")],
        );
    let d = start(&mut lab, &config);
    let (s1, s2) = (
        format!("{}:80", cluster::server_addr(1)),
        format!("{}:80", cluster::server_addr(2)),
    );
    let limit = Duration::from_secs(5);
    let at = |v: &str| format!("{v}:80");
    wait_state(&lab, &d, &s1, &at(vips[0]), "down", limit);
    wait_state(&lab, &d, &s2, &at(vips[0]), "down", limit);
    wait_state(&lab, &d, &s2, &at(vips[2]), "down", limit);
    // Well past fall × interval: the others stay up.
    thread::sleep(Duration::from_millis(2 * FALL * INTERVAL_MS));
    for (s, v) in [(&s1, vips[1]), (&s2, vips[1]), (&s1, vips[2])] {
        assert_eq!(state(&d, s, &at(v)).as_deref(), Some("up"), "{s} in {v}");
    }
    let log = d.log();
    for want in [
        format!("s1 {s1} down: http GET /unavailable returned 503, {FALL} of {FALL} failed"),
        format!("s2 {s2} down: http GET /: the body lacks \"s1\", {FALL} of {FALL} failed"),
    ] {
        assert!(log.contains(&want), "no {want:?} in\n{log}");
    }
}

#[test]
fn drain_lets_an_open_connection_finish_while_new_ones_go_elsewhere() {
    let (lab, d) = http_lab();
    let download = start_download(&lab);
    let (server, name) = download_server(&d);
    let out = d.cli_ok(&["server", "drain", "http", &name]);
    assert!(out.contains("draining"), "{out}");
    let vip = format!("{}:80", cluster::VIP);
    assert!(
        d.cat("servers")
            .contains(&format!("tcp {server} {vip} up 0 direct")),
        "{}",
        d.cat("servers")
    );
    // New connections go elsewhere.
    {
        let _in = lab.ns("client").enter();
        for _ in 0..20 {
            let body = ureq::get(&format!("http://{}/", cluster::VIP))
                .call()
                .unwrap()
                .into_string()
                .unwrap();
            assert_ne!(
                body.trim(),
                name,
                "a new connection went to the drained server"
            );
        }
    }
    // The open one finishes whole.
    assert_eq!(download.join().unwrap(), Ok(BIG_BYTES));

    // disable/enable override the checks by hand; status and metrics show it.
    d.cli_ok(&["server", "enable", "http", &name]);
    d.cli_ok(&["server", "disable", "http", "s3"]);
    let s3 = format!("{}:80", cluster::server_addr(3));
    assert_eq!(state(&d, &s3, &vip).as_deref(), Some("down"));
    assert!(d.cli_ok(&["status"]).contains("s3") && d.cli_ok(&["status"]).contains("down"));
    let metrics = d.scrape(&lab);
    assert!(
        metrics.contains(&format!(
            "lb_server_up{{address=\"{}\",port=\"80\",server=\"s3\",service=\"http\"}} 0",
            cluster::server_addr(3)
        )),
        "{metrics}"
    );
    thread::sleep(Duration::from_millis(FALL * INTERVAL_MS * 2));
    assert_eq!(
        state(&d, &s3, &vip).as_deref(),
        Some("down"),
        "passing checks do not undo disable"
    );
    d.cli_ok(&["server", "enable", "http", "s3"]);
    assert_eq!(state(&d, &s3, &vip).as_deref(), Some("up"));
}
