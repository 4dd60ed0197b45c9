//! `/metrics` in Prometheus text format. A small HTTP server thread answers each scrape with
//! a snapshot the event loop makes; this module turns a snapshot into the exposition text
//! with prometheus-client, so names, types and escaping are the library's.

use std::{net::SocketAddr, thread};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::mpsc;

use crate::control::{Call, Request, ask_blocking};

/// Everything one scrape reports.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub node: String,
    /// primary, backup, idle or node.
    pub role: String,
    /// The dataplane's global counters by name (`Stat::name`).
    pub stat: Vec<(&'static str, u64)>,
    pub active_connections: u64,
    pub services: Vec<ServiceMetrics>,
    pub servers: Vec<ServerMetrics>,
    /// ATM messages refused, by reason.
    pub ha_rejected: Vec<(&'static str, u64)>,
}

#[derive(Clone, Debug, Default)]
pub struct ServiceMetrics {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub proto: &'static str,
    pub up: bool,
    pub packets: u64,
    pub bytes: u64,
    pub active: u64,
}

#[derive(Clone, Debug, Default)]
pub struct ServerMetrics {
    pub service: String,
    pub server: String,
    pub address: String,
    pub port: u16,
    pub up: bool,
    pub weight: u32,
    pub packets: u64,
    pub bytes: u64,
    pub active: u64,
}

type Labels = Vec<(String, String)>;

fn family<M: prometheus_client::metrics::TypedMetric + Default + Clone + 'static>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<Labels, M>
where
    Family<Labels, M>: prometheus_client::registry::Metric,
{
    let f = Family::<Labels, M>::default();
    registry.register(name, help, f.clone());
    f
}

/// The exposition text for `s`.
pub fn render(s: &Snapshot) -> String {
    let mut r = Registry::with_prefix("lb");
    let node = || vec![("node".to_string(), s.node.clone())];

    let role = family::<Gauge>(&mut r, "role", "This daemon's role (1 for the role it has)");
    for name in ["primary", "backup", "idle", "node"] {
        let mut l = node();
        l.push(("role".into(), name.into()));
        role.get_or_create(&l).set((s.role == name) as i64);
    }

    let stat = family::<Counter>(
        &mut r,
        "dataplane_packets",
        "Packets seen by the dataplane, by counter (outcomes add up to `packets`)",
    );
    for (name, v) in &s.stat {
        let mut l = node();
        l.push(("counter".into(), (*name).into()));
        stat.get_or_create(&l).inc_by(*v);
    }
    let active = family::<Gauge>(
        &mut r,
        "active_connections",
        "Live connections (the stat table's third number)",
    );
    active
        .get_or_create(&node())
        .set(s.active_connections as i64);

    let sp = family::<Counter>(&mut r, "service_packets", "Packets forwarded for a service");
    let sb = family::<Counter>(&mut r, "service_bytes", "Bytes forwarded for a service");
    let su = family::<Gauge>(
        &mut r,
        "service_up",
        "1 when at least one server can take connections",
    );
    let sa = family::<Gauge>(
        &mut r,
        "service_active_connections",
        "Live connections of a service",
    );
    for v in &s.services {
        let l = vec![
            ("service".into(), v.name.clone()),
            ("vip".into(), v.vip.clone()),
            ("port".into(), v.port.to_string()),
            ("protocol".into(), v.proto.into()),
        ];
        sp.get_or_create(&l).inc_by(v.packets);
        sb.get_or_create(&l).inc_by(v.bytes);
        su.get_or_create(&l).set(v.up as i64);
        sa.get_or_create(&l).set(v.active as i64);
    }

    let vp = family::<Counter>(
        &mut r,
        "server_packets",
        "Packets forwarded to or from a server",
    );
    let vb = family::<Counter>(
        &mut r,
        "server_bytes",
        "Bytes forwarded to or from a server",
    );
    let vu = family::<Gauge>(
        &mut r,
        "server_up",
        "1 when the server takes new connections",
    );
    let vw = family::<Gauge>(&mut r, "server_weight", "The weight in force");
    let va = family::<Gauge>(
        &mut r,
        "server_active_connections",
        "Live connections on a server",
    );
    for v in &s.servers {
        let l = vec![
            ("service".into(), v.service.clone()),
            ("server".into(), v.server.clone()),
            ("address".into(), v.address.clone()),
            ("port".into(), v.port.to_string()),
        ];
        vp.get_or_create(&l).inc_by(v.packets);
        vb.get_or_create(&l).inc_by(v.bytes);
        vu.get_or_create(&l).set(v.up as i64);
        vw.get_or_create(&l).set(v.weight as i64);
        va.get_or_create(&l).set(v.active as i64);
    }

    let rej = family::<Counter>(
        &mut r,
        "ha_rejected_messages",
        "ATM messages refused: malformed, other cluster, failed authentication, replayed",
    );
    for (reason, v) in &s.ha_rejected {
        let mut l = node();
        l.push(("reason".into(), (*reason).into()));
        rej.get_or_create(&l).inc_by(*v);
    }

    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

/// Serves `GET /metrics` on `addr` in a thread of its own.
pub fn serve(addr: SocketAddr, tx: mpsc::Sender<Call>) -> std::io::Result<()> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let response = if req.url() == "/metrics" && *req.method() == tiny_http::Method::Get
                {
                    let resp = ask_blocking(&tx, Request::Metrics);
                    match resp.text {
                        Some(t) if resp.ok => tiny_http::Response::from_string(t).with_header(
                            tiny_http::Header::from_bytes(
                                &b"Content-Type"[..],
                                &b"text/plain; version=0.0.4; charset=utf-8"[..],
                            )
                            .expect("a valid header"),
                        ),
                        _ => tiny_http::Response::from_string(resp.error.unwrap_or_default())
                            .with_status_code(503),
                    }
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = req.respond(response);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let s = Snapshot {
            node: "atm1".into(),
            role: "primary".into(),
            stat: vec![("vip_packets", 10), ("drop_malformed", 2)],
            active_connections: 3,
            services: vec![ServiceMetrics {
                name: "http".into(),
                vip: "192.0.2.100".into(),
                port: 80,
                proto: "tcp",
                up: true,
                packets: 10,
                bytes: 1000,
                active: 3,
            }],
            servers: vec![],
            ha_rejected: vec![("replay", 2)],
        };
        let t = render(&s);
        assert!(t.contains("# TYPE lb_dataplane_packets counter"), "{t}");
        assert!(
            t.contains(r#"lb_dataplane_packets_total{node="atm1",counter="vip_packets"} 10"#),
            "{t}"
        );
        assert!(
            t.contains(r#"lb_role{node="atm1",role="primary"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(
                r#"lb_service_up{service="http",vip="192.0.2.100",port="80",protocol="tcp"} 1"#
            ),
            "{t}"
        );
        assert!(
            t.contains(r#"lb_ha_rejected_messages_total{node="atm1",reason="replay"} 2"#),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"), "{t}");
    }
}
