//! Control-plane costs the daemon pays: building a Maglev ring for 1000 servers, rendering
//! the connections table with a million entries, parsing a config with 1000 services.

use std::{hint::black_box, net::Ipv4Addr, path::Path};

use criterion::{Criterion, criterion_group, criterion_main};
use lb_common::{IPPROTO_TCP, RING_MAX, sched};
use lb_daemon::{config, tables};

fn maglev(c: &mut Criterion) {
    let backends: Vec<sched::Backend> = (0..1000u32)
        .map(|i| sched::Backend::new(i, Ipv4Addr::from(0xc000_0200 + i).into(), 80, 1 + i % 4))
        .collect();
    c.bench_function("maglev_ring_1000_servers", |b| {
        b.iter(|| sched::maglev(black_box(&backends), RING_MAX as usize))
    });
}

fn render(c: &mut Criterion) {
    let lines: Vec<tables::ConnLine> = (0..1_000_000u32)
        .map(|i| tables::ConnLine {
            proto: IPPROTO_TCP,
            src: (
                Ipv4Addr::from(0xc633_6400 + (i >> 16)).into(),
                (i & 0xffff) as u16,
            ),
            vip: (Ipv4Addr::new(192, 0, 2, 100).into(), 80),
            timeout: 99,
            server: (Ipv4Addr::new(192, 0, 2, 11 + (i % 3) as u8).into(), 80),
            packets: i as u64,
            state: "ESTABLISHED",
        })
        .collect();
    let mut g = c.benchmark_group("tables");
    g.sample_size(10);
    g.bench_function("render_connections_1m", |b| {
        b.iter(|| tables::render_connections(black_box(&lines)))
    });
    g.finish();
}

fn parse(c: &mut Criterion) {
    let mut text = String::from(
        "[cluster]\nname = \"big\"\n[tables]\nservices = 1024\nservers = 65536\n\
         [[atm]]\nname = \"atm1\"\naddress = \"192.0.2.2\"\ninterface = \"eth0\"\n",
    );
    for i in 0..1000u32 {
        text += &format!(
            "[[service]]\nname = \"svc{i}\"\nvip = \"{}\"\nport = {}\n[service.check]\nkind = \"tcp\"\n\
             [[service.server]]\nname = \"a\"\naddress = \"192.0.2.11\"\n\
             [[service.server]]\nname = \"b\"\naddress = \"192.0.2.12\"\n",
            Ipv4Addr::from(0xcb00_7100 + (i % 200)),
            1000 + i
        );
    }
    c.bench_function("parse_config_1000_services", |b| {
        b.iter(|| {
            let r = config::parse(black_box(&text), Path::new("/"));
            black_box(r.is_ok() || r.is_err())
        })
    });
}

criterion_group!(benches, maglev, render, parse);
criterion_main!(benches);
