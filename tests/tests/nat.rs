//! Tier 3: NAT that keeps up with short connections. A client opens HTTP connections back to
//! back through a NAT service of three servers, several times more than the NAT port range
//! holds, and none may lose its SYN: a closed connection's port is free again after the
//! short hold, not after the idle timeout. Only a packet the lab's own links lost (counted
//! on their devices) may cost a connection a retransmission.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{cluster, lab::Lab, procs::Daemon};

/// New connections to open: over six times the 31,744 ports toward each server.
const CONNECTIONS: u64 = 200_000;
const THREADS: u64 = 4;
/// A connection that takes this long has lost its SYN (the first retransmission comes 1 s
/// after it).
const SLOW: Duration = Duration::from_millis(900);

fn config(pool: &str) -> String {
    let mut c = format!(
        r#"[cluster]
name = "lab"
timeout = 60

[tables]
connections = 1048576

[nat]
subnet = "203.0.113.0/24"
gateway = "{gw}"
{pool}

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
"#,
        gw = cluster::NAT_GATEWAY,
        atm = cluster::atm_addr(1),
        vip = cluster::VIP
    );
    for i in 1..=3 {
        c += &format!(
            "[[service.server]]\nname = \"n{i}\"\naddress = \"{}\"\nport = 8080\nmethod = \"nat\"\n",
            cluster::server_nat_addr(i)
        );
    }
    c
}

/// The client's count of retransmitted SYNs.
fn syn_retrans(lab: &Lab) -> u64 {
    lab.tcp_ext("client", "TCPSynRetrans")
}

/// How a connection ends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Close {
    /// HTTP/1.0: the server closes first (and keeps TIME_WAIT).
    ServerFirst,
    /// HTTP/1.1, then the client resets (no TIME_WAIT anywhere).
    ClientReset,
}

/// One request on a new connection; whether it was answered.
fn request(vip: Ipv4Addr, close: Close) -> std::io::Result<bool> {
    let mut s = TcpStream::connect_timeout(&(vip, 80).into(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    match close {
        Close::ServerFirst => {
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut body = Vec::new();
            s.read_to_end(&mut body)?;
            Ok(body.starts_with(b"HTTP/1.1 200"))
        }
        Close::ClientReset => {
            s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 512];
            // The body is the server's name and a newline.
            while !(buf.ends_with(b"\n") && buf.windows(4).any(|w| w == b"\r\n\r\n")) {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            nix::sys::socket::setsockopt(
                &s,
                nix::sys::socket::sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            )
            .map_err(std::io::Error::from)?;
            Ok(buf.starts_with(b"HTTP/1.1 200"))
        }
    }
}

/// Opens `CONNECTIONS` connections from `THREADS` threads of the client, each closed as
/// `close` says; asserts none failed and none lost its SYN.
fn run(lab: &Lab, d: &Daemon, close: Close) {
    let before = syn_retrans(lab);
    let drops_before = nat_drops(d);
    let (lost_before, _) = lab.losses();
    let challenged_before = challenge_acks(lab);
    let done = Arc::new(AtomicU64::new(0));
    let slow = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let client = lab.ns("client").name().to_string();
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (done, slow, failed) = (done.clone(), slow.clone(), failed.clone());
            let client = client.clone();
            std::thread::spawn(move || {
                let _in = lb_tests::netns::NetNs::attach(&client).enter();
                let vip: Ipv4Addr = cluster::VIP.parse().unwrap();
                // Bounded in count and in time.
                while done.fetch_add(1, Ordering::Relaxed) < CONNECTIONS
                    && started.elapsed() < Duration::from_secs(300)
                {
                    let t = Instant::now();
                    if !request(vip, close).unwrap_or(false) {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    if t.elapsed() >= SLOW {
                        slow.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = started.elapsed();
    let opened = done.load(Ordering::Relaxed).min(CONNECTIONS);
    let retrans = syn_retrans(lab) - before;
    let slow = slow.load(Ordering::Relaxed);
    let (lost, where_lost) = lab.losses();
    let lost = lost - lost_before;
    // A server's challenge ACKs answer a SYN that found a connection of the same tuple
    // still open: the client resets it and sends its SYN again at once (a fast retransmit,
    // not a slow connection). That happens when a port is reused too soon, or when the
    // lab lost the reset that closed the port's last connection.
    let challenged = challenge_acks(lab) - challenged_before;
    eprintln!(
        "{close:?}: {opened} connections in {elapsed:?} ({:.0}/s); SYNs sent again {retrans}, \
         slow {slow}, packets the lab's links lost {lost} ({where_lost}), servers' challenge \
         ACKs {challenged}",
        opened as f64 / elapsed.as_secs_f64(),
    );
    assert_eq!(
        opened, CONNECTIONS,
        "{close:?}: all opened within the time bound"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{close:?}: failed requests"
    );
    // Each lost packet may cost one connection a retransmission (a lost SYN or SYN-ACK: a
    // slow one; a lost reset: a fast one, when its port is next used). A loaded machine's
    // veths may lose a packet in a million; lb may not. With no packet lost, nothing may be
    // sent again.
    assert!(
        slow <= lost,
        "{close:?}: {slow} connections took over {SLOW:?}, and the lab's links lost {lost} packets"
    );
    assert!(
        retrans <= lost,
        "{close:?}: the client sent {retrans} SYNs again, and the lab's links lost {lost} packets"
    );
    assert_eq!(
        nat_drops(d),
        drops_before,
        "{close:?}: refused for want of a port"
    );
}

/// The servers' `TCPChallengeACK` counts, summed.
fn challenge_acks(lab: &Lab) -> u64 {
    (1..=3)
        .map(|i| lab.tcp_ext(&cluster::server(i), "TCPChallengeACK"))
        .sum()
}

/// `drop_nat_ports` as `lb-cli status` shows it.
fn nat_drops(d: &Daemon) -> u64 {
    let status = d.cli_ok(&["status"]);
    let line = status
        .lines()
        .find(|l| l.starts_with("NAT:"))
        .unwrap_or_else(|| panic!("no NAT line in:\n{status}"));
    let (_, rest) = line.split_once("); ").unwrap();
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// Connections the clients reset: their ports come back after `[nat] port_hold` (2 s), so
/// one NAT address serves them all, each port several times. Then connections the servers
/// close first, whose ports wait out the servers' TIME_WAIT: three more pool addresses hold
/// them.
#[test]
fn two_hundred_thousand_nat_connections_back_to_back_lose_no_syn() {
    let mut lab = Lab::new();
    cluster::build(&mut lab, 1, 3);
    for i in 1..=3 {
        let ns = cluster::server(i);
        lab.nginx(&ns, &ns, &[8080]);
    }
    let path = lab.dir().join("lb.toml");
    std::fs::write(&path, config("")).unwrap();
    let mut d = Daemon::start(&mut lab, &cluster::atm(1), &path, &[]);
    d.wait_log("This ATM is primary", Duration::from_secs(20));

    run(&lab, &d, Close::ClientReset);

    std::fs::write(
        &path,
        config("pool = [\"203.0.113.2\", \"203.0.113.3\", \"203.0.113.4\"]"),
    )
    .unwrap();
    d.cli_ok(&["reload"]);
    d.wait_log(
        "NAT pool 203.0.113.2, 203.0.113.3, 203.0.113.4",
        Duration::from_secs(5),
    );
    run(&lab, &d, Close::ServerFirst);

    let stat = d.cli_ok(&["cat", "stat"]);
    let fields: Vec<u64> = stat
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(fields[4], 0, "dropped packets: {stat}");
    assert!(fields[5] >= 2 * CONNECTIONS, "new connections: {stat}");
    assert!(!d.log().contains("NAT ports exhausted"), "{}", d.log());
}
