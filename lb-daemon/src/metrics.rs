//! `/metrics` in the Prometheus text format 0.0.4, the one Prometheus scrapes and `promtool
//! check metrics` lints. A small HTTP server thread answers each scrape with a snapshot the
//! event loop makes; this module turns a snapshot into the exposition text with the
//! `prometheus` crate, so names, types, HELP lines and escaping are the library's.

use std::{net::SocketAddr, thread};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::sync::mpsc;

use crate::control::{Call, Request, ask_blocking};

/// The Content-Type of a scrape: what [`render`] writes, [`prometheus::TEXT_FORMAT`], in UTF-8.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything one scrape reports.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub node: String,
    /// primary, backup, idle or node.
    pub role: String,
    /// The dataplane's global counters by name (`Stat::name`).
    pub stat: Vec<(&'static str, u64)>,
    pub active_connections: u64,
    /// Live connections whose client has sent only SYNs (the stat table's seventh number).
    pub half_open_connections: u64,
    pub services: Vec<ServiceMetrics>,
    pub servers: Vec<ServerMetrics>,
    /// ATM messages refused, by reason.
    pub ha_rejected: Vec<(&'static str, u64)>,
    /// Each other ATM heard from: whether its config differs from this ATM's.
    pub config_differs: Vec<(String, bool)>,
    /// A real server's lb_decap counters by name (`DecapStat::NAMES`).
    pub decap: Vec<(&'static str, u64)>,
    /// An ATM's idle timeouts in force, in seconds, by state (`tcp`, `tcp_fin`, `udp`).
    pub timeouts: Vec<(&'static str, u32)>,
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
    /// direct, tunnel, nat or local.
    pub method: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub active: u64,
    /// Live connections that have seen a FIN or RST (IPVS's InActConn).
    pub inactive: u64,
}

/// A counter family `lb_NAME` (NAME ends in `_total`) with HELP `help`, registered in `r`.
fn counters(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let f =
        IntCounterVec::new(Opts::new(name, help), labels).expect("a valid name, help and labels");
    r.register(Box::new(f.clone()))
        .expect("each family is registered once");
    f
}

/// A gauge family `lb_NAME` with HELP `help`, registered in `r`.
fn gauges(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let f = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid name, help and labels");
    r.register(Box::new(f.clone()))
        .expect("each family is registered once");
    f
}

/// The labels of the per-service families: a service as the tables name it.
const SERVICE: &[&str] = &["service", "vip", "port", "protocol"];
/// The labels of the per-server-line families.
const SERVER: &[&str] = &["service", "server", "address", "port"];

/// The exposition text for `s`, in [`CONTENT_TYPE`]. A family with no samples (no services,
/// say) is left out whole, HELP and TYPE too.
pub fn render(s: &Snapshot) -> String {
    let r = Registry::new_custom(Some("lb".into()), None).expect("a valid prefix");
    let node = s.node.as_str();

    let role = gauges(
        &r,
        "role",
        "This daemon's role (1 for the role it has)",
        &["node", "role"],
    );
    for name in ["primary", "backup", "idle", "node"] {
        role.with_label_values(&[node, name])
            .set((s.role == name) as i64);
    }

    let stat = counters(
        &r,
        "dataplane_packets_total",
        "Packets seen by the dataplane, by counter (outcomes add up to `packets`)",
        &["node", "counter"],
    );
    for (name, v) in &s.stat {
        stat.with_label_values(&[node, name]).inc_by(*v);
    }
    gauges(
        &r,
        "active_connections",
        "Live connections (the stat table's third number)",
        &["node"],
    )
    .with_label_values(&[node])
    .set(s.active_connections as i64);
    gauges(
        &r,
        "half_open_connections",
        "Live connections whose client has sent only SYNs (the stat table's seventh number)",
        &["node"],
    )
    .with_label_values(&[node])
    .set(s.half_open_connections as i64);

    let sp = counters(
        &r,
        "service_packets_total",
        "Packets forwarded for a service",
        SERVICE,
    );
    let sb = counters(
        &r,
        "service_bytes_total",
        "Bytes forwarded for a service",
        SERVICE,
    );
    let su = gauges(
        &r,
        "service_up",
        "1 when at least one server can take connections",
        SERVICE,
    );
    let sa = gauges(
        &r,
        "service_active_connections",
        "Live connections of a service",
        SERVICE,
    );
    for v in &s.services {
        let port = v.port.to_string();
        let l = [v.name.as_str(), &v.vip, &port, v.proto];
        sp.with_label_values(&l).inc_by(v.packets);
        sb.with_label_values(&l).inc_by(v.bytes);
        su.with_label_values(&l).set(v.up as i64);
        sa.with_label_values(&l).set(v.active as i64);
    }

    let vp = counters(
        &r,
        "server_packets_total",
        "Packets forwarded to or from a server",
        SERVER,
    );
    let vb = counters(
        &r,
        "server_bytes_total",
        "Bytes forwarded to or from a server",
        SERVER,
    );
    let vu = gauges(
        &r,
        "server_up",
        "1 when the server takes new connections",
        SERVER,
    );
    let vw = gauges(&r, "server_weight", "The weight in force", SERVER);
    let va = gauges(
        &r,
        "server_active_connections",
        "Live connections on a server",
        SERVER,
    );
    let vi = gauges(
        &r,
        "server_inactive_connections",
        "Live connections on a server that have seen a FIN or RST (IPVS's InActConn)",
        SERVER,
    );
    let mut info_labels = SERVER.to_vec();
    info_labels.push("method");
    let vinfo = gauges(
        &r,
        "server_info",
        "1 for each server line, with its forwarding method",
        &info_labels,
    );
    for v in &s.servers {
        let port = v.port.to_string();
        let l = [v.service.as_str(), &v.server, &v.address, &port];
        vp.with_label_values(&l).inc_by(v.packets);
        vb.with_label_values(&l).inc_by(v.bytes);
        vu.with_label_values(&l).set(v.up as i64);
        vw.with_label_values(&l).set(v.weight as i64);
        va.with_label_values(&l).set(v.active as i64);
        vi.with_label_values(&l).set(v.inactive as i64);
        vinfo
            .with_label_values(&[l[0], l[1], l[2], l[3], v.method])
            .set(1);
    }

    let timeouts = gauges(
        &r,
        "connection_timeout_seconds",
        "The cluster's idle timeout in force by state (the timeouts table; a service may \
         have its own)",
        &["node", "state"],
    );
    for (state, v) in &s.timeouts {
        timeouts.with_label_values(&[node, state]).set(*v as i64);
    }

    let rej = counters(
        &r,
        "ha_rejected_messages_total",
        "ATM messages refused: malformed, other cluster, failed authentication, replayed",
        &["node", "reason"],
    );
    for (reason, v) in &s.ha_rejected {
        rej.with_label_values(&[node, reason]).inc_by(*v);
    }

    let drift = gauges(
        &r,
        "ha_config_differs",
        "1 if the other ATM's config (its fingerprint) differs from this ATM's, 0 if the same",
        &["node", "atm"],
    );
    for (atm, differs) in &s.config_differs {
        drift.with_label_values(&[node, atm]).set(*differs as i64);
    }

    let decap = counters(
        &r,
        "decap_packets_total",
        "Packets seen by a real server's lb_decap: IPIP from the ATMs decapsulated, others \
         passed, malformed IPIP dropped",
        &["node", "counter"],
    );
    for (name, v) in &s.decap {
        decap.with_label_values(&[node, name]).inc_by(*v);
    }

    TextEncoder::new()
        .encode_to_string(&r.gather())
        .expect("every family has a name, HELP and samples of its type")
}

/// Serves `GET /metrics` on `addr` in a thread of its own.
pub fn serve(addr: SocketAddr, tx: mpsc::Sender<Call>) -> std::io::Result<()> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            crate::background_thread();
            for req in server.incoming_requests() {
                let response = if req.url() == "/metrics" && *req.method() == tiny_http::Method::Get
                {
                    let resp = ask_blocking(&tx, Request::Metrics);
                    match resp.text {
                        Some(t) if resp.ok => tiny_http::Response::from_string(t).with_header(
                            tiny_http::Header::from_bytes(
                                &b"Content-Type"[..],
                                CONTENT_TYPE.as_bytes(),
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
    use prometheus::TEXT_FORMAT;

    use super::*;

    /// A snapshot with a sample in every family.
    fn full() -> Snapshot {
        Snapshot {
            node: "atm1".into(),
            role: "primary".into(),
            stat: vec![("vip_packets", 10), ("drop_malformed", 2)],
            decap: vec![("decapsulated", 4), ("dropped", 1)],
            active_connections: 3,
            half_open_connections: 2,
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
            servers: vec![ServerMetrics {
                service: "http".into(),
                server: "web1".into(),
                address: "192.0.2.11".into(),
                port: 80,
                up: true,
                weight: 2,
                method: "local",
                packets: 10,
                bytes: 1000,
                active: 3,
                inactive: 1,
            }],
            ha_rejected: vec![("replay", 2)],
            config_differs: vec![("atm2".into(), true)],
            timeouts: vec![("tcp", 900), ("tcp_fin", 120), ("udp", 300)],
        }
    }

    #[test]
    fn renders_prometheus_text() {
        let t = render(&full());
        // The text format names counters with their `_total`; labels come sorted by name.
        assert!(
            t.contains("# TYPE lb_dataplane_packets_total counter\n"),
            "{t}"
        );
        assert!(
            t.contains("lb_dataplane_packets_total{counter=\"vip_packets\",node=\"atm1\"} 10\n"),
            "{t}"
        );
        assert!(
            t.contains("lb_role{node=\"atm1\",role=\"primary\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("lb_role{node=\"atm1\",role=\"backup\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("lb_active_connections{node=\"atm1\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("lb_connection_timeout_seconds{node=\"atm1\",state=\"tcp_fin\"} 120\n"),
            "{t}"
        );
        assert!(
            t.contains(
                "lb_server_info{address=\"192.0.2.11\",method=\"local\",port=\"80\",server=\"web1\",service=\"http\"} 1\n"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "lb_server_inactive_connections{address=\"192.0.2.11\",port=\"80\",server=\"web1\",service=\"http\"} 1\n"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "lb_service_up{port=\"80\",protocol=\"tcp\",service=\"http\",vip=\"192.0.2.100\"} 1\n"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "lb_server_weight{address=\"192.0.2.11\",port=\"80\",server=\"web1\",service=\"http\"} 2\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("lb_ha_rejected_messages_total{node=\"atm1\",reason=\"replay\"} 2\n")
                && t.contains("lb_ha_config_differs{atm=\"atm2\",node=\"atm1\"} 1\n"),
            "{t}"
        );
        assert!(
            !t.contains("# EOF"),
            "OpenMetrics' end marker in 0.0.4 text:\n{t}"
        );
    }

    /// What promtool's lint asks of every family, checked here without promtool (the test
    /// tier runs promtool itself on a real daemon's scrape).
    #[test]
    fn every_family_has_help_and_type_and_counters_end_in_total() {
        let t = render(&full());
        let mut families = Vec::new();
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            if !families.contains(&name) {
                families.push(name);
            }
        }
        assert_eq!(families.len(), 19, "{t}");
        for name in families {
            assert!(
                t.contains(&format!("# HELP {name} ")),
                "no HELP for {name}:\n{t}"
            );
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            assert!(
                t.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} is not a {kind}:\n{t}"
            );
        }
    }

    #[test]
    fn an_empty_family_is_left_out_whole() {
        let t = render(&Snapshot {
            services: vec![],
            servers: vec![],
            ..full()
        });
        assert!(!t.contains("lb_service"), "{t}");
        assert!(!t.contains("lb_server"), "{t}");
        assert!(t.contains("# HELP lb_role "), "{t}");
    }

    #[test]
    fn content_type_names_the_format_written() {
        assert!(
            CONTENT_TYPE.starts_with(TEXT_FORMAT),
            "{CONTENT_TYPE} vs {TEXT_FORMAT}"
        );
    }
}
