//! The plane without BPF or root: reload diffs, id reuse, health-to-plane updates.

use super::*;
use crate::config;
use std::net::Ipv4Addr;

/// A config with `services`: (port, [server last octets]), all on VIP 192.0.2.100, each
/// server on the service's port.
fn config(services: &[(u16, &[u8])]) -> Config {
    let mut text = String::from(
        "[cluster]\nname = \"c\"\n[[atm]]\nname = \"atm1\"\naddress = \"192.0.2.2\"\n\
         interface = \"eth0\"\n",
    );
    for (port, servers) in services {
        text += &format!("[[service]]\nname = \"s{port}\"\nvip = \"192.0.2.100\"\nport = {port}\n");
        for o in *servers {
            text += &format!("[[service.server]]\nname = \"web{o}\"\naddress = \"192.0.2.{o}\"\n");
        }
    }
    config::parse(&text, std::path::Path::new("/")).unwrap()
}

fn caps(services: u32, servers: u32) -> Capacities {
    Capacities {
        services,
        servers,
        connections: 1024,
    }
}

fn line(port: u16, o: u8) -> LineKey {
    (
        ("192.0.2.100".parse().unwrap(), port, lb_common::IPPROTO_TCP),
        Ipv4Addr::new(192, 0, 2, o).into(),
        port,
    )
}

#[test]
fn a_reload_keeps_what_remains_and_hands_out_freed_indices_only_once_drained() {
    let p0 = Plane::new()
        .plan(&config(&[(80, &[11, 12, 13]), (8080, &[14])]), &caps(4, 8))
        .unwrap()
        .plane;
    let svc80 = line(80, 11).0;
    assert_eq!(p0.id(&svc80), Some(0));
    let before: Vec<_> = [11, 12, 13].map(|o| p0.index(&line(80, o)).unwrap()).into();
    assert_eq!(before, vec![0, 1, 2]);
    assert_eq!(p0.index(&line(8080, 14)), Some(3));

    // web12 and the :8080 service leave, a :81 service with web15 comes.
    let plan = p0
        .plan(&config(&[(80, &[11, 13]), (81, &[15])]), &caps(4, 8))
        .unwrap();
    assert_eq!(plan.removed_services, vec![1]);
    let mut removed = plan.removed_lines.clone();
    removed.sort_unstable();
    assert_eq!(removed, vec![1, 3]);
    assert_eq!(
        plan.changes,
        Changes {
            services_added: 1,
            services_removed: 1,
            lines_added: 1,
            lines_removed: 2,
            connections_dropped: 0,
        }
    );
    let p1 = plan.plane;
    // What remains keeps its id and indices: its connections keep flowing.
    assert_eq!(p1.id(&svc80), Some(0));
    assert_eq!(p1.index(&line(80, 11)), Some(0));
    assert_eq!(p1.index(&line(80, 13)), Some(2));
    // The freed service id is taken at once; the freed indices are not, while their
    // connections are being dropped.
    assert_eq!(p1.id(&line(81, 15).0), Some(1));
    assert_eq!(p1.index(&line(81, 15)), Some(4));
    assert_eq!(p1.draining(), 2);

    let mut p1 = p1;
    p1.drained(&[1, 3]);
    let p2 = p1
        .plan(&config(&[(80, &[11, 13, 16]), (81, &[15])]), &caps(4, 8))
        .unwrap()
        .plane;
    assert_eq!(
        p2.index(&line(80, 16)),
        Some(1),
        "the smallest drained index"
    );
}

#[test]
fn a_plan_beyond_the_tables_is_refused_with_what_is_kept_and_draining() {
    let p0 = Plane::new()
        .plan(&config(&[(80, &[11, 12, 13])]), &caps(2, 3))
        .unwrap()
        .plane;
    // web13 leaves and web14 comes: web13's index is still draining.
    let e = p0
        .plan(&config(&[(80, &[11, 12, 14])]), &caps(2, 3))
        .err()
        .unwrap();
    assert!(e.contains("2 kept, 1 still being drained"), "{e}");
    let e = Plane::new()
        .plan(
            &config(&[(80, &[11]), (81, &[12]), (82, &[13])]),
            &caps(2, 3),
        )
        .err()
        .unwrap();
    assert!(
        e.contains("3 services do not fit the tables' 2 services"),
        "{e}"
    );
    // Planning touched nothing.
    assert_eq!(p0.index(&line(80, 13)), Some(2));
}

/// What the plane programmed, in order, and the services as installed (as the
/// dataplane keeps them, so a change to a line it does not hold is refused as there).
#[derive(Default)]
struct Record {
    installed: HashMap<u32, ServiceSpec>,
    calls: Vec<Programmed>,
}

#[derive(Debug, PartialEq, Eq)]
enum Programmed {
    Service(u32),
    Server {
        id: u32,
        index: u32,
        up: bool,
        weight: u32,
    },
}

impl Programs for Record {
    fn install(&mut self, id: u32, spec: &ServiceSpec) -> Result<(), dataplane::Error> {
        self.installed.insert(id, spec.clone());
        self.calls.push(Programmed::Service(id));
        Ok(())
    }
    fn set_server_state(
        &mut self,
        id: u32,
        index: u32,
        up: bool,
        weight: u32,
    ) -> Result<(), dataplane::Error> {
        let held = self
            .installed
            .get(&id)
            .is_some_and(|s| s.servers.iter().any(|v| v.index == index));
        if !held {
            return Err(dataplane::Error::Invalid(format!(
                "service {id} has no server with index {index}"
            )));
        }
        self.calls.push(Programmed::Server {
            id,
            index,
            up,
            weight,
        });
        Ok(())
    }
}

#[test]
fn a_health_change_reprograms_only_its_server_and_says_whose_connections_to_drop() {
    let mut p = Plane::new()
        .plan(&config(&[(80, &[11, 12]), (81, &[13])]), &caps(4, 8))
        .unwrap()
        .plane;
    let mut dp = Record::default();
    p.reinstall(&mut dp).unwrap();
    assert_eq!(
        dp.calls,
        vec![Programmed::Service(0), Programmed::Service(1)]
    );
    dp.calls.clear();
    p.start_journal();
    // web12 fails its checks: its record and its service's row only; its connections go.
    let drop = p
        .set_state(&mut dp, &line(80, 12), |s| s.healthy = false, true)
        .unwrap();
    assert_eq!(drop, Some(1));
    let web12_down = Programmed::Server {
        id: 0,
        index: 1,
        up: false,
        weight: 1,
    };
    assert_eq!(dp.calls, vec![web12_down]);
    // Drained (weight 0), web13 keeps its connections: nothing to drop.
    dp.calls.clear();
    let drop = p
        .set_state(&mut dp, &line(81, 13), |s| s.admin.weight = Some(0), false)
        .unwrap();
    assert_eq!(drop, None);
    let web13_drained = Programmed::Server {
        id: 1,
        index: 2,
        up: true,
        weight: 0,
    };
    assert_eq!(dp.calls, vec![web13_drained]);
    // A line that left with a reload changes nothing.
    dp.calls.clear();
    let drop = p
        .set_state(&mut dp, &line(80, 99), |s| s.healthy = false, true)
        .unwrap();
    assert_eq!((drop, dp.calls.len()), (None, 0));
    // Mid-reload the dataplane may hold the new version of a service, without the
    // line: the reload takes the change over...
    dp.installed.remove(&1);
    let drop = p
        .set_state(&mut dp, &line(81, 13), |s| s.healthy = false, true)
        .unwrap();
    assert_eq!(drop, Some(2));
    assert_eq!(
        p.take_journal(),
        vec![line(80, 12), line(81, 13), line(81, 13)]
    );
    assert!(!p.state(&line(80, 12)).healthy);
    // ...but outside a reload, a plane and dataplane that disagree are an error, and
    // the line stays as it was.
    let e = p
        .set_state(&mut dp, &line(81, 13), |s| s.healthy = true, true)
        .unwrap_err();
    assert!(e.to_string().contains("no server with index 2"), "{e}");
    assert!(!p.up(&line(81, 13)));
}

#[test]
fn every_index_names_its_server_and_service_after_a_plan_and_a_compaction() {
    let p = Plane::new()
        .plan(&config(&[(80, &[11, 12]), (81, &[13])]), &caps(4, 8))
        .unwrap()
        .plane;
    let l = p.lines();
    let vip: IpAddr = "192.0.2.100".parse().unwrap();
    assert_eq!(
        l.server[&2],
        (Ipv4Addr::new(192, 0, 2, 13).into(), 81, Method::Direct)
    );
    assert_eq!(l.vip[&2], (vip, 81, lb_common::IPPROTO_TCP));
    let p = p
        .plan(&config(&[(81, &[13])]), &caps(4, 8))
        .unwrap()
        .plane
        .compact();
    assert_eq!(p.index(&line(81, 13)), Some(0));
    assert_eq!(p.lines().vip[&0], (vip, 81, lb_common::IPPROTO_TCP));
    assert_eq!(p.lines().server.len(), 1);
}

/// `quorum` with `hysteresis`, as keepalived judges it: with quorum 2 and hysteresis 1 of
/// three servers, the service goes down only below 1 server up, and up again only with 3.
#[test]
fn a_service_is_up_with_its_quorum_of_servers_and_hysteresis_remembers() {
    let text = "[cluster]\nname = \"c\"\n[[atm]]\nname = \"atm1\"\naddress = \"192.0.2.2\"\n\
                interface = \"eth0\"\n[[service]]\nname = \"s80\"\nvip = \"192.0.2.100\"\n\
                port = 80\nquorum = 2\nhysteresis = 1\n";
    let mut text = text.to_string();
    for o in [11, 12, 13] {
        text += &format!("[[service.server]]\nname = \"web{o}\"\naddress = \"192.0.2.{o}\"\n");
    }
    let c = config::parse(&text, std::path::Path::new("/")).unwrap();
    let mut p = Plane::new().plan(&c, &caps(4, 8)).unwrap().plane;
    let mut dp = Record::default();
    p.reinstall(&mut dp).unwrap();
    let s = p.services()[0].clone();
    let mut set = |p: &mut Plane, o: u8, healthy: bool| {
        p.set_state(&mut dp, &line(80, o), |st| st.healthy = healthy, true)
            .unwrap();
        p.service_up(&s)
    };
    assert!(p.service_up(&s), "3 of 3");
    assert!(set(&mut p, 11, false), "2 of 3: at quorum");
    assert!(set(&mut p, 12, false), "1 of 3: within the hysteresis");
    assert!(!set(&mut p, 13, false), "0 of 3: down");
    assert!(!set(&mut p, 11, true), "1 of 3: still down");
    assert!(
        !set(&mut p, 12, true),
        "2 of 3: quorum, not quorum + hysteresis"
    );
    assert!(set(&mut p, 13, true), "3 of 3: up again");
    // Without hysteresis: down below the quorum, up at it.
    let mut q = s.clone();
    q.hysteresis = 0;
    assert!(!q.quorate(1, true) && q.quorate(2, false));
}
