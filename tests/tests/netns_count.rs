//! Tier 3 (smallest): lb_xdp attached natively to a veth counts exactly the packets that
//! crossed it, service traffic apart from the rest.

use std::net::UdpSocket;

use lb_common::{Addr, IPPROTO_UDP, SETTINGS_ACTIVE, Service, ServiceKey, Settings, Stat};
use lb_daemon::dataplane::{AttachMode, Attached, Dataplane};
use lb_tests::lab::Lab;

#[test]
fn native_xdp_on_a_veth_counts_every_packet_sent() {
    let mut lab = Lab::new();
    lab.add_ns("client");
    lab.add_ns("lb");
    lab.veth(("client", "eth0"), ("lb", "eth0"));
    lab.mac("client", "eth0", "02:00:00:00:01:01");
    lab.mac("lb", "eth0", "02:00:00:00:01:02");
    lab.addr("client", "eth0", "192.0.2.1/24");
    lab.addr("lb", "eth0", "192.0.2.2/24");
    // Static neighbours: no ARP frames in the count.
    lab.neigh("client", "eth0", "192.0.2.2", "02:00:00:00:01:02");
    lab.neigh("client", "eth0", "192.0.2.100", "02:00:00:00:01:02");

    // The balancer's stack answers port 6000 with ICMP errors: it must not ARP either.
    lab.neigh("lb", "eth0", "192.0.2.1", "02:00:00:00:01:01");

    let mut dp = Dataplane::load(Default::default()).expect("load the dataplane");
    {
        let _in_lb = lab.ns("lb").enter();
        let mode = dp
            .attach("eth0", AttachMode::Driver)
            .expect("attach in driver mode");
        assert_eq!(mode, Attached::Driver);
    }
    dp.set_service(
        ServiceKey {
            vip: Addr::from_v4_octets([192, 0, 2, 100]),
            port: 5000u16.to_be(),
            proto: IPPROTO_UDP,
            _pad: 0,
        },
        // A service with no server up: its packets are counted, then dropped.
        Service::default(),
    )
    .unwrap();
    dp.set_settings(&Settings {
        flags: SETTINGS_ACTIVE,
        ..Default::default()
    })
    .unwrap();

    const TO_VIP: u64 = 700;
    const OTHER: u64 = 300;
    {
        let _in_client = lab.ns("client").enter();
        let sock = UdpSocket::bind("192.0.2.1:0").unwrap();
        for i in 0..TO_VIP {
            sock.send_to(&i.to_be_bytes(), "192.0.2.100:5000").unwrap();
        }
        for i in 0..OTHER {
            sock.send_to(&i.to_be_bytes(), "192.0.2.2:6000").unwrap();
        }
    }
    // The veth delivers asynchronously; wait (bounded) for the last packet to be counted.
    lab.wait_for(
        "all packets counted",
        std::time::Duration::from_secs(5),
        || dp.stats().unwrap().get(Stat::Packets) >= TO_VIP + OTHER,
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let s = dp.stats().unwrap();
    assert_eq!(s.get(Stat::Packets), TO_VIP + OTHER, "{s:?}");
    assert_eq!(s.get(Stat::VipPackets), TO_VIP, "{s:?}");
    assert_eq!(s.get(Stat::Passed), OTHER, "{s:?}");
    assert_eq!(s.get(Stat::DropNoServer), TO_VIP, "{s:?}");
    assert_eq!(s.dropped(), TO_VIP, "{s:?}");
}
