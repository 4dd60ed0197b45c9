//! Tier 3: a daemon started again after it was killed adopts the connection state its
//! dataplane kept in the BPF filesystem (docs/DATAPLANE.md, "Kept across restarts"). A NAT
//! download through a single ATM goes on whole across a SIGKILL of its daemon and a new
//! start: the new daemon takes the connection's two legs (client to server, and the NAT
//! port the server answers to) from the kept maps, where a new, empty table would have
//! the ATM's stack reset the server's answers; new connections made all along, one after
//! another, all succeed (a SYN lost in the stall is sent again). A plain stop then removes
//! the kept state.

use std::{
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

#[test]
fn a_nat_download_goes_on_across_a_sigkill_and_a_new_start_of_the_daemon() {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 1);
    lab.nginx(&cluster::server(1), "s1", &[8080]);
    let path = lab.dir().join("lb.toml");
    std::fs::write(&path, config()).unwrap();
    let atm = cluster::atm(1);
    let mut d = Daemon::start(&mut lab, &atm, &path, &[]);
    d.wait_log("This ATM is primary", START);
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
    std::thread::sleep(Duration::from_secs(2));
    d.kill();

    let mut d = Daemon::start(&mut lab, &atm, &path, &[]);
    d.wait_log("Adopted the dataplane state kept at", START);
    d.wait_log("This ATM is primary", START);
    // The connection's two legs at least.
    let adopted = d
        .log()
        .lines()
        .find(|l| l.contains("Adopted the dataplane state kept at"))
        .unwrap()
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
