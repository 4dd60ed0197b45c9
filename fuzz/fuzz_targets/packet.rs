//! The packet path: lb_xdp run on frames through BPF_PROG_TEST_RUN, in a network namespace
//! of the fuzzer's own (its interfaces, neighbours and route are the packet fixtures'), with
//! a service of each method. libFuzzer's coverage stops at the kernel, so this mutates
//! frames with little guidance; what it checks is what must hold for any frame:
//! - the program never fails to run, and counts the frame once, in exactly one outcome
//!   (passed, forwarded, or a drop);
//! - a frame passed to the stack leaves untouched;
//! - a frame that came with valid checksums and is sent on (to a server, rewritten for
//!   NAT, tunnelled, or a NAT reply) leaves with valid checksums.
//!
//! The input's first byte says how to read the rest: below 128, the rest is the frame;
//! else it picks a valid frame to a service, and the rest is XORed onto it, so mutations
//! start from frames the program takes far in. Needs root (the fuzz tier runs as root).
#![no_main]

use std::{cell::RefCell, net::Ipv4Addr, process::Command};

use lb_common::{
    Addr, IPPROTO_TCP, IPPROTO_UDP, Method, SETTINGS_ACTIVE, Sched, Settings, Stat, Timeouts,
};
use lb_daemon::dataplane::{
    Capacities, Dataplane, ServerSpec, ServiceSpec, Stats, enable_fib_lookup,
};
use lb_tests::fixture::{XDP_PASS, XDP_REDIRECT, XDP_TX, frames, verify_checksums};
use libfuzzer_sys::fuzz_target;

const LB_MAC: frames::Mac = [0x02, 0, 0, 0, 0, 0x01];
const ROUTER_MAC: frames::Mac = [0x02, 0, 0, 0, 0, 0xfe];
const CLIENT: [u8; 4] = [198, 51, 100, 7];
const VIP: [u8; 4] = [192, 0, 2, 100];
const NAT: [u8; 4] = [203, 0, 113, 1];
const SERVERS: [[u8; 4]; 3] = [[192, 0, 2, 11], [192, 0, 2, 12], [203, 0, 113, 21]];

struct Bench {
    dp: Dataplane,
    eth0: u32,
}

thread_local! {
    static BENCH: RefCell<Option<Bench>> = const { RefCell::new(None) };
}

fn ip(args: &str) {
    let out = Command::new("ip")
        .args(args.split(' '))
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mac(octets: [u8; 4]) -> String {
    format!(
        "02:00:{:02x}:{:02x}:{:02x}:{:02x}",
        octets[0], octets[1], octets[2], octets[3]
    )
}

fn server(index: u32, addr: [u8; 4], port: u16, method: Method) -> ServerSpec {
    ServerSpec {
        index,
        addr: Ipv4Addr::from(addr).into(),
        port,
        weight: 1,
        method,
        up: true,
        sorry: false,
    }
}

fn service(port: u16, proto: u8, sched: Sched, servers: Vec<ServerSpec>) -> ServiceSpec {
    ServiceSpec::new(Ipv4Addr::from(VIP).into(), port, proto, sched, servers)
}

/// A network namespace of this thread's own (gone with the process, whatever ends it),
/// the fixtures' interfaces in it, and the dataplane loaded with four services.
fn setup() -> Bench {
    // SAFETY: unshare(2) of this thread's network namespace; nothing else is shared yet.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {} (run as root)",
        std::io::Error::last_os_error()
    );
    ip("link set lo up");
    ip("link add eth0 type veth peer name peer0");
    ip("link add eth1 type veth peer name peer1");
    ip("link set eth0 address 02:00:00:00:00:01");
    for dev in ["eth0", "peer0", "eth1", "peer1"] {
        ip(&format!("link set {dev} up"));
    }
    ip("addr add 192.0.2.1/24 dev eth0");
    ip("addr add 203.0.113.1/24 dev eth1");
    for (addr, dev) in [
        (SERVERS[0], "eth0"),
        (SERVERS[1], "eth0"),
        ([192, 0, 2, 254], "eth0"),
        (SERVERS[2], "eth1"),
    ] {
        ip(&format!(
            "neigh replace {} lladdr {} dev {dev} nud permanent",
            Ipv4Addr::from(addr),
            mac(addr)
        ));
    }
    ip("route add 198.51.100.0/24 via 192.0.2.254");
    enable_fib_lookup().expect("enable forwarding for bpf_fib_lookup");
    let eth0 = nix::net::if_::if_nametoindex("eth0").expect("eth0's index");
    let mut dp = Dataplane::load(Capacities {
        services: 8,
        servers: 16,
        connections: 4096,
    })
    .expect("load the dataplane (root?)");
    let specs = [
        service(
            80,
            IPPROTO_TCP,
            Sched::Maglev,
            vec![
                server(0, SERVERS[0], 80, Method::Direct),
                server(1, SERVERS[1], 80, Method::Direct),
            ],
        ),
        service(
            81,
            IPPROTO_TCP,
            Sched::Rr,
            vec![server(2, SERVERS[0], 81, Method::Tunnel)],
        ),
        service(
            82,
            IPPROTO_TCP,
            Sched::Wrr,
            vec![server(3, SERVERS[2], 8080, Method::Nat)],
        ),
        service(
            53,
            IPPROTO_UDP,
            Sched::Sh,
            vec![server(4, SERVERS[1], 53, Method::Direct)],
        ),
    ];
    for (id, spec) in specs.iter().enumerate() {
        dp.install(id as u32, spec).expect("install a service");
    }
    dp.set_settings(&Settings {
        timeouts: Timeouts::same(100_000_000_000),
        flags: SETTINGS_ACTIVE,
        local_addr: Addr::from_v4_octets([192, 0, 2, 1]),
        nat_addr: Addr::from_v4_octets(NAT),
        nat_port_min: 20_000,
        nat_port_max: 59_999,
        ..Default::default()
    })
    .expect("settings");
    Bench { dp, eth0 }
}

/// The valid frames mutations start from: to each service, a server's NAT reply, and a
/// datagram's first and last fragments.
fn template(k: u8) -> Vec<u8> {
    let tcp = |dport, flags| {
        frames::tcp(
            ROUTER_MAC,
            LB_MAC,
            CLIENT,
            40_000,
            VIP,
            dport,
            flags,
            b"GET / HTTP/1.1\r\n\r\n",
        )
    };
    // A datagram to the UDP service in two fragments (identification 0x4242): the first,
    // with the UDP header and a length of the whole, and the last, 8 bytes in.
    let fragment = |offset: u16, more: bool| {
        let mut f = frames::udp(ROUTER_MAC, LB_MAC, CLIENT, 5354, VIP, 53, &[7; 40]);
        if more {
            f[38..40].copy_from_slice(&100u16.to_be_bytes());
        }
        f[18..20].copy_from_slice(&0x4242u16.to_be_bytes());
        f[20..22].copy_from_slice(&(offset | if more { 0x2000 } else { 0 }).to_be_bytes());
        frames::fix_ipv4_checksum(&mut f);
        f
    };
    match k % 8 {
        6 => fragment(0, true),
        7 => fragment(1, false),
        0 => tcp(80, frames::SYN),
        1 => tcp(81, frames::ACK),
        2 => tcp(82, frames::SYN),
        3 => frames::udp(ROUTER_MAC, LB_MAC, CLIENT, 5353, VIP, 53, b"a query"),
        4 => frames::tcp(
            [0x02, 0, 0, 0, 0, 0x21],
            LB_MAC,
            SERVERS[2],
            8080,
            NAT,
            20_000,
            frames::Flags {
                syn: true,
                ack: true,
                ..Default::default()
            },
            b"",
        ),
        _ => tcp(80, frames::FIN),
    }
}

fn outcomes(s: &Stats) -> u64 {
    s.get(Stat::Passed) + s.get(Stat::Forwarded) + s.dropped()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let frame = if mode < 128 {
        rest.to_vec()
    } else {
        let mut f = template(mode);
        let len = f.len();
        for (i, b) in rest.iter().enumerate() {
            f[i % len] ^= b;
        }
        f
    };
    // What BPF_PROG_TEST_RUN takes for XDP: an Ethernet header, at most a page.
    if frame.len() < 14 || frame.len() > 3000 {
        return;
    }
    BENCH.with(|b| {
        let mut b = b.borrow_mut();
        let b = b.get_or_insert_with(setup);
        let before = b.dp.stats().expect("stats");
        let (action, out) = b.dp.test_run(&frame, b.eth0).expect("the program runs");
        let after = b.dp.stats().expect("stats");
        assert_eq!(
            after.get(Stat::Packets),
            before.get(Stat::Packets) + 1,
            "counted once"
        );
        assert_eq!(
            outcomes(&after),
            outcomes(&before) + 1,
            "in exactly one outcome"
        );
        if action == XDP_PASS {
            assert_eq!(out, frame, "passed frames leave untouched");
        }
        if (action == XDP_TX || action == XDP_REDIRECT)
            && verify_checksums(&frame).is_ok()
            && after.get(Stat::Forwarded) > before.get(Stat::Forwarded)
        {
            if let Err(e) = verify_checksums(&out) {
                panic!("a valid frame left with {e}");
            }
        }
    });
});
