//! Tier 3: floods. A SYN flood from spoofed addresses, larger than the connection table,
//! against a service with new-connection limits: what the limits turn away is counted, and
//! long transfers, idle keep-alive connections and a legitimate client's new connections
//! go on (docs/DATAPLANE.md, "New-connection limits").

use std::{
    net::{Ipv4Addr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    cluster,
    fixture::{Rng, frames},
    lab::{BIG_BYTES, Lab},
    procs::Daemon,
    raw::{FrameSender, mac_of},
};

const START: Duration = Duration::from_secs(20);
/// Spoofed SYNs: five times the table.
const FLOOD: usize = 20_000;
const TABLE: u32 = 4096;
/// Each /24 may open this many a second (and a burst of as many).
const PER_SOURCE: u32 = 50;
/// Seconds a half-open connection lives: long enough that the flood's last ones are still
/// there when the tables are read on a loaded machine.
const TCP_SYN: u64 = 8;

fn config() -> String {
    let mut c = format!(
        r#"[cluster]
name = "lab"
timeout = 100
[cluster.timeouts]
tcp_syn = {TCP_SYN}

[tables]
connections = {TABLE}

[[atm]]
name = "atm1"
address = "{atm}"
interface = "eth0"

[[service]]
name = "http"
vip = "{vip}"
port = 80
max_new_per_sec = 2000
max_new_per_sec_per_source = {PER_SOURCE}
[service.check]
kind = "none"
"#,
        atm = cluster::atm_addr(1),
        vip = cluster::VIP
    );
    for i in 1..=3 {
        c += &format!(
            "[[service.server]]\nname = \"web{i}\"\naddress = \"{}\"\n",
            cluster::server_addr(i)
        );
    }
    c
}

fn stat(d: &Daemon) -> Vec<u64> {
    d.cat("stat")
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

fn counter(d: &Daemon, lab: &Lab, name: &str) -> u64 {
    let line = format!("counter=\"{name}\"");
    d.scrape(lab)
        .lines()
        .find(|l| l.starts_with("lb_dataplane_packets_total{") && l.contains(&line))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse().unwrap())
}

#[test]
fn a_spoofed_syn_flood_is_rate_limited_and_established_and_legitimate_connections_go_on() {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 3);
    for i in 1..=3 {
        let ns = cluster::server(i);
        lab.nginx(&ns, &ns, &[80]);
        cluster::hold_vip_on_lo(&lab, &ns, cluster::VIP);
    }
    let path = lab.dir().join("lb.toml");
    std::fs::write(&path, config()).unwrap();
    let mut d = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    d.wait_log("This ATM is primary", START);

    // Before the flood: a long transfer under way and an idle keep-alive connection.
    let done = Arc::new(AtomicBool::new(false));
    let transfer = cluster::big_download(lab.ns("client").name().to_string(), done.clone());
    let mut idle = {
        let _in = lab.ns("client").enter();
        let s = TcpStream::connect((cluster::VIP, 80)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    };
    let first = cluster::get_on(&mut idle);
    let before = stat(&d);

    // The flood: SYNs from random addresses and ports of 198.51.100.0/24, straight at the
    // ATM's MAC, as fast as one thread sends them; meanwhile the client at 192.0.2.50 opens
    // new connections, each of which must be answered within a second.
    let (client_mac, atm_mac) = (
        mac_of(&lab, "client", "eth0"),
        mac_of(&lab, &cluster::atm(1), "eth0"),
    );
    let out = FrameSender::open(&lab, "client", "eth0");
    let vip: Ipv4Addr = cluster::VIP.parse().unwrap();
    let flooding = AtomicBool::new(true);
    let (flood_took, answered) = thread::scope(|s| {
        let flooder = s.spawn(|| {
            let mut rng = Rng(7);
            let t = Instant::now();
            for n in 0..FLOOD {
                // About three seconds of it, so the legitimate client's requests meet it.
                if n % 200 == 199 {
                    thread::sleep(Duration::from_millis(30));
                }
                let src = [198, 51, 100, 1 + rng.below(254) as u8];
                let sport = 1024 + rng.below(60_000) as u16;
                out.send(&frames::tcp(
                    client_mac,
                    atm_mac,
                    src,
                    sport,
                    vip.octets(),
                    80,
                    frames::SYN,
                    &[],
                ));
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "the flood is bounded"
                );
            }
            flooding.store(false, Ordering::SeqCst);
            t.elapsed()
        });
        let mut answered = 0;
        {
            let _in = lab.ns("client").enter();
            let t = Instant::now();
            while flooding.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(30) {
                let body = cluster::request(Duration::from_secs(1))
                    .unwrap_or_else(|e| panic!("a legitimate request during the flood: {e}"));
                assert!(body.starts_with('s'), "{body}");
                answered += 1;
                // At most 20 a second: well within its /24's PER_SOURCE.
                thread::sleep(Duration::from_millis(50));
            }
        }
        (flooder.join().unwrap(), answered)
    });
    eprintln!("flood: {FLOOD} SYNs in {flood_took:?}; {answered} legitimate requests answered");
    assert!(
        answered >= 20,
        "{answered} legitimate requests in the {flood_took:?} of the flood"
    );

    // What the flood got in: a burst and the rate, for its one /24; the rest was counted.
    let limited = counter(&d, &lab, "drop_rate_limited");
    let let_in = FLOOD as u64 - limited;
    let most = PER_SOURCE as u64 * (2 + flood_took.as_secs() + 1);
    assert!(
        let_in <= most,
        "{let_in} of the flood's SYNs let in (at most {most}), {limited} limited"
    );
    let after = stat(&d);
    assert!(
        after[4] - before[4] >= limited,
        "the stat table's dropped counts them: {before:?} -> {after:?}"
    );

    // The flood's SYNs let in are half-open (SYN_RECV), apart from the active connections
    // in `stat`, the connections table and lb-cli; they go after tcp_syn, the others stay.
    let table = d.cat("connections");
    let syn_recv = table
        .lines()
        .filter(|l| l.contains(" 198.51.100.") && l.ends_with(" SYN_RECV"))
        .count() as u64;
    assert!(
        syn_recv > 0 && syn_recv <= let_in,
        "{syn_recv} of {let_in}:\n{table}"
    );
    // (Read a moment after the table: some may have timed out since.)
    let now = stat(&d);
    assert_eq!(now.len(), 7, "{now:?}");
    assert!(now[6] > 0, "half-open in stat: {now:?}");
    assert!(now[2] >= 1, "the keep-alive connection is active: {now:?}");
    let listed = d.cli_ok(&["list", "connections"]);
    assert!(
        listed.lines().next().unwrap().ends_with("STATE")
            && listed.lines().any(|l| l.ends_with("SYN_RECV"))
            && listed.lines().any(|l| l.ends_with("ESTABLISHED")),
        "{listed}"
    );
    lab.wait_for(
        "the half-open connections to time out",
        Duration::from_secs(TCP_SYN + 5),
        || stat(&d)[6] == 0,
    );
    assert!(
        !d.cat("connections").contains(" SYN_RECV"),
        "{}",
        d.cat("connections")
    );

    // The idle keep-alive connection and the transfer went on.
    assert_eq!(
        cluster::get_on(&mut idle),
        first,
        "the idle keep-alive connection"
    );
    let (len, intact, _) = transfer
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the transfer broke: {e}"));
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(len, BIG_BYTES);
    assert!(intact, "the transfer arrived corrupted");
}
