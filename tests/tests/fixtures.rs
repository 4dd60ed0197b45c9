//! Tier 2: packet fixtures through BPF_PROG_TEST_RUN, in a namespace of their own so that
//! route and neighbour lookups see a known table.

use lb_common::{Addr, IPPROTO_TCP, Service, ServiceKey, Stat};
use lb_daemon::dataplane::Dataplane;
use lb_tests::{
    fixture::{Fixture, XDP_DROP, XDP_PASS, frames::*},
    lab::Lab,
};

const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const LB_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT: [u8; 4] = [198, 51, 100, 7];
const VIP: [u8; 4] = [192, 0, 2, 100];
const OTHER: [u8; 4] = [192, 0, 2, 1];

/// One namespace with a veth pair; the program runs as if frames arrived on `eth0`.
struct Bench {
    lab: Lab,
    dp: Dataplane,
    ifindex: u32,
}

impl Bench {
    fn new() -> Bench {
        let mut lab = Lab::new();
        lab.add_ns("fx");
        lab.veth(("fx", "eth0"), ("fx", "peer0"));
        lab.mac("fx", "eth0", "02:00:00:00:00:02");
        lab.addr("fx", "eth0", "192.0.2.1/24");
        let ifindex = lab.ns("fx").ifindex("eth0");
        let mut dp = Dataplane::load().expect("load the dataplane");
        dp.set_service(
            ServiceKey {
                vip: Addr::from_v4_octets(VIP),
                port: 80u16.to_be(),
                proto: IPPROTO_TCP,
                _pad: 0,
            },
            Service::default(),
        )
        .unwrap();
        Bench { lab, dp, ifindex }
    }

    fn run(&self, fixtures: &[Fixture]) {
        let _inside = self.lab.ns("fx").enter();
        let mut failures = Vec::new();
        for fx in fixtures {
            let (action, out) = self.dp.test_run(&fx.input, self.ifindex).expect("test_run");
            if let Err(e) = fx.check(action, &out) {
                failures.push(e);
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} fixtures failed:\n{}",
            failures.len(),
            fixtures.len(),
            failures.join("\n")
        );
    }
}

#[test]
fn non_service_traffic_passes_untouched_and_truncated_frames_are_dropped() {
    let b = Bench::new();
    let syn = tcp(CLIENT_MAC, LB_MAC, CLIENT, 40000, VIP, 80, SYN, b"");
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let fixtures = vec![
        Fixture::new(
            "tcp to another address passes",
            tcp(CLIENT_MAC, LB_MAC, CLIENT, 40000, OTHER, 80, SYN, b""),
            XDP_PASS,
        ),
        Fixture::new(
            "tcp to the VIP on another port passes",
            tcp(CLIENT_MAC, LB_MAC, CLIENT, 40000, VIP, 22, SYN, b""),
            XDP_PASS,
        ),
        Fixture::new(
            "udp to the VIP's tcp port passes",
            udp(CLIENT_MAC, LB_MAC, CLIENT, 40000, VIP, 80, b"x"),
            XDP_PASS,
        ),
        Fixture::new("arp passes", arp, XDP_PASS),
        Fixture::new(
            "IPv4 frame with nothing after the Ethernet header is dropped",
            syn[..14].to_vec(),
            XDP_DROP,
        ),
        Fixture::new(
            "IPv4 header cut short is dropped",
            syn[..14 + 12].to_vec(),
            XDP_DROP,
        ),
    ];
    b.run(&fixtures);
    let s = b.dp.stats().unwrap();
    assert_eq!(s.get(Stat::Packets), fixtures.len() as u64);
    assert_eq!(s.get(Stat::Passed), 4);
    assert_eq!(s.get(Stat::DropMalformed), 2);
}
