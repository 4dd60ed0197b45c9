//! Tier 3: a daemon that re-executes itself (`lb-cli restart`), and one started again after
//! it was killed, adopt the connection state its dataplane kept in the BPF filesystem
//! (docs/DAEMON.md, "Connections kept across a restart"). A NAT download through a single
//! ATM goes on whole across an `lb-cli restart` and then a SIGKILL of its daemon and a new
//! start: the new daemon takes the connection's two legs (client to server, and the NAT
//! port the server answers to) from the kept maps, where a new, empty table would have
//! the ATM's stack reset the server's answers; new connections made all along, one after
//! another, all succeed (a SYN lost in the stall is sent again). Before that, restarts the
//! daemon must refuse (a bad config file, a binary that keeps its maps in another format)
//! leave it running as it was. A plain stop then removes the kept state.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lb_tests::{
    cluster,
    lab::{BIG_BYTES, Lab},
    procs::Daemon,
};

const START: Duration = Duration::from_secs(20);

fn config() -> String {
    format!(
        r#"[cluster]
name = "restart"

[ha]
heartbeat_ms = 100
dead_after = 3

[nat]
subnet = "203.0.113.0/24"
gateway = "{gw}"

[[atm]]
name = "atm1"
address = "{atm}"
interface = "eth0"

[[service]]
name = "web"
vip = "{vip}"
port = 80
[service.check]
kind = "none"
[[service.server]]
name = "s1"
address = "{server}"
port = 8080
method = "nat"
"#,
        gw = cluster::NAT_GATEWAY,
        atm = cluster::atm_addr(1),
        vip = cluster::VIP,
        server = cluster::server_nat_addr(1),
    )
}

/// Where atm1's daemon keeps its dataplane's state: asked of `kept_dir` inside its namespace.
fn kept_dir(lab: &Lab) -> PathBuf {
    let _in = lab.ns(&cluster::atm(1)).enter();
    lb_daemon::dataplane::kept::kept_dir(Path::new("/sys/fs/bpf"), "eth0").unwrap()
}

/// Puts `text` (mode 0755) at `to` by a rename, as a package upgrade does: the file a
/// process runs cannot be written over.
fn replace_file(to: &Path, text: &[u8]) {
    let tmp = to.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// `lb-cli restart` must fail saying `why`, leaving the daemon as it was.
fn refused(d: &Daemon, why: &str) {
    let before = d.cli_ok(&["role"]);
    let out = d.cli(&["restart"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(why), "{err}");
    assert_eq!(d.cli_ok(&["role"]), before);
    assert!(d.log().contains("Refused restart"), "{}", d.log());
}

#[test]
fn a_nat_download_goes_on_across_lb_cli_restart_a_sigkill_and_a_new_start_of_the_daemon() {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 1);
    lab.nginx(&cluster::server(1), "s1", &[8080]);
    let path = lab.dir().join("lb.toml");
    std::fs::write(&path, config()).unwrap();
    let atm = cluster::atm(1);
    // Run from a copy that can be replaced, as an installed binary is.
    let program = lab.dir().join("lb-daemon");
    let built = std::fs::read(lb_tests::procs::bin("lb-daemon")).unwrap();
    replace_file(&program, &built);
    let mut d = Daemon::start_program(&mut lab, &atm, &program, &path, &[]);
    d.wait_log("This ATM is primary", START);

    // Refused restarts change nothing: a config the new daemon would not start with...
    std::fs::write(
        &path,
        config().replace("port = 80\n", "port = 80\nport = 81\n"),
    )
    .unwrap();
    refused(&d, "line ");
    std::fs::write(&path, config()).unwrap();
    // ... and a binary that keeps its maps in another format.
    replace_file(&program, b"#!/bin/sh\necho 999 9.9.9\n");
    refused(&d, "format 999");
    replace_file(&program, &built);
    let dir = kept_dir(&lab);
    assert!(
        d.log()
            .contains(&format!("Connection state kept at {}", dir.display())),
        "{}",
        d.log()
    );
    assert!(dir.join("connections").exists());

    // /big comes at 160 kB/s: about 12 s.
    let done = Arc::new(AtomicBool::new(false));
    let download = cluster::big_download(lab.ns("client").name().to_string(), done.clone());
    // And new connections all along, one at a time, until the download is over: a SYN the
    // stall loses is sent again (1 s, then 3 s on), so each may take up to 10 s.
    let client = lab.ns("client").name().to_string();
    let requests = {
        let done = done.clone();
        std::thread::spawn(move || {
            let _in = lb_tests::netns::NetNs::attach(&client).enter();
            let (mut ok, mut failed) = (0, Vec::new());
            let started = std::time::Instant::now();
            // Bounded by the download's end, and by a minute.
            while !done.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(60) {
                match cluster::request(Duration::from_secs(10)) {
                    Ok(body) if body.trim() == "s1" => ok += 1,
                    Ok(body) => failed.push(format!("answered {body:?}")),
                    Err(e) => failed.push(e),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (ok, failed)
        })
    };
    lab.wait_for("the download's connection", Duration::from_secs(5), || {
        d.cat("connections").lines().count() >= 2
    });
    std::thread::sleep(Duration::from_secs(1));

    // lb-cli restart: the same process runs the binary again and stays primary.
    let pid = d.pid();
    let said = d.cli_ok(&["restart"]);
    assert!(
        said.contains("Re-executing") && said.contains("atm1 is primary"),
        "{said}"
    );
    assert_eq!(d.pid(), pid);
    let log = d.log();
    for line in [
        "Re-executing",
        "Resuming as primary ATM (term 1) after lb-cli restart",
        "Adopted the dataplane state kept at",
    ] {
        assert!(log.contains(line), "{line:?} not in the log:\n{log}");
    }
    assert!(
        !log.contains("Removed stale alias"),
        "a restart keeps the VIP:\n{log}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !done.load(Ordering::SeqCst),
        "the download ended before the SIGKILL: make it longer"
    );
    d.kill();

    // The same log file goes on: what the new start says comes after `seen`.
    let seen = d.log().len();
    let mut d = Daemon::start_program(&mut lab, &atm, &program, &path, &[]);
    lab.wait_for("the new daemon to be primary", START, || {
        d.log()[seen..].contains("This ATM is primary")
    });
    let log = d.log()[seen..].to_string();
    assert!(log.contains("Removed stale alias"), "{log}");
    // The connection's two legs at least.
    let adopted = log
        .lines()
        .find(|l| l.contains("Adopted the dataplane state kept at"))
        .unwrap_or_else(|| panic!("nothing adopted:\n{log}"))
        .to_string();
    let entries: usize = adopted
        .rsplit(": ")
        .next()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(entries >= 2, "{adopted}");
    let (len, intact, took) = download
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the download failed: {e}\n{}", d.log()));
    assert_eq!(len, BIG_BYTES, "{}", d.log());
    assert!(intact, "the bytes came whole and in order");
    eprintln!("the download took {took:?} across the restart");
    let (ok, failed) = requests.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 10, "only {ok} requests in the download's time");

    // A plain stop ends the connections: the VIP goes, and so does the kept state.
    assert!(d.stop(), "{}", d.log());
    assert!(!dir.exists(), "{} left after a stop", dir.display());
    assert!(
        d.log().contains(&format!(
            "Removed the connection state kept at {}",
            dir.display()
        )),
        "{}",
        d.log()
    );
}
