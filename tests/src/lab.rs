//! A small lab builder: network namespaces joined by veth pairs (and bridges), with addresses,
//! routes and the veth settings XDP needs; processes started in it are killed and the
//! namespaces deleted when the `Lab` drops, whatever happened in between.

use std::{
    collections::HashMap,
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use crate::netns::NetNs;

/// Size of the `/big` download every lab nginx serves.
pub const BIG_BYTES: usize = 2_000_000;

#[derive(Default)]
pub struct Lab {
    spaces: Vec<NetNs>,
    index: HashMap<String, usize>,
    children: Vec<(String, Child)>,
    /// Scratch directory for config files, logs and pid files; removed on drop.
    dir: Option<std::path::PathBuf>,
    /// Fixed namespace names `<prefix>-<label>` instead of unique ones (the demo's).
    prefix: Option<String>,
}

impl Lab {
    pub fn new() -> Lab {
        Lab::default()
    }

    /// A lab whose namespaces are named `<prefix>-<label>` and whose files live in `dir`, so
    /// a user can find them (`ip netns exec lbdemo-client ...`). Leftovers of an earlier lab
    /// with the same prefix are removed first.
    pub fn named(prefix: &str, dir: &std::path::Path) -> Lab {
        let list = crate::netns::run_ok(Command::new("ip").args(["netns", "list"]));
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with(&format!("{prefix}-")) {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut lab = Lab::default();
        lab.dir = Some(dir.to_path_buf());
        lab.prefix = Some(prefix.to_string());
        lab
    }

    /// Leaves everything running when the lab drops (`cargo xtask demo --keep`).
    pub fn keep(mut self) {
        self.children.clear();
        self.dir = None;
        for ns in self.spaces.drain(..) {
            std::mem::forget(ns);
        }
    }

    /// Adds a namespace called `label` (its real name is made unique).
    pub fn add_ns(&mut self, label: &str) -> &NetNs {
        assert!(!self.index.contains_key(label), "namespace {label} twice");
        let ns = match &self.prefix {
            Some(p) => NetNs::named(&format!("{p}-{label}")),
            None => NetNs::new(label),
        };
        // IPv4 only unless a lab asks for IPv6 (`ipv6`): no router solicitations or MLD
        // reports in the counters.
        ns.exec_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"]);
        self.spaces.push(ns);
        self.index.insert(label.to_string(), self.spaces.len() - 1);
        self.spaces.last().unwrap()
    }

    /// Turns IPv6 on in namespace `ns` (labs start IPv4 only) for the devices made after,
    /// without router solicitations; add its addresses `nodad`, or they wait out DAD.
    pub fn ipv6(&self, ns: &str) {
        let space = self.ns(ns);
        for key in [
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.default.disable_ipv6=0",
            "net.ipv6.conf.all.router_solicitations=0",
            "net.ipv6.conf.default.router_solicitations=0",
        ] {
            space.exec_ok(&["sysctl", "-q", "-w", key]);
        }
    }

    pub fn ns(&self, label: &str) -> &NetNs {
        let i = self
            .index
            .get(label)
            .unwrap_or_else(|| panic!("no namespace {label} in this lab"));
        &self.spaces[*i]
    }

    /// A veth pair from `a` = (namespace, device) to `b`, both ends up, with checksum and
    /// segmentation offloads off (frames rewritten by XDP must carry full checksums) and GRO
    /// on (frames XDP sends into a veth are dropped unless the far end has NAPI: GRO or XDP).
    pub fn veth(&mut self, a: (&str, &str), b: (&str, &str)) {
        let (na, nb) = (
            self.ns(a.0).name().to_string(),
            self.ns(b.0).name().to_string(),
        );
        let tmp_a = format!("lbv{}", rand_suffix());
        let tmp_b = format!("lbw{}", rand_suffix());
        crate::netns::run_ok(Command::new("ip").args([
            "link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b,
        ]));
        for (tmp, (label, dev), ns) in [(&tmp_a, a, &na), (&tmp_b, b, &nb)] {
            crate::netns::run_ok(Command::new("ip").args(["link", "set", tmp, "netns", ns]));
            let space = self.ns(label);
            space.exec_ok(&["ip", "link", "set", tmp, "name", dev]);
            space.exec_ok(&["ip", "link", "set", dev, "up"]);
            space.exec_ok(&[
                "ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off", "gro", "on",
            ]);
        }
    }

    /// A bridge `name` in namespace `ns`, up, with `ports` (devices already in `ns`) enslaved.
    pub fn bridge(&self, ns: &str, name: &str, ports: &[&str]) {
        let space = self.ns(ns);
        space.exec_ok(&["ip", "link", "add", name, "type", "bridge"]);
        space.exec_ok(&[
            "ip",
            "link",
            "set",
            name,
            "type",
            "bridge",
            "forward_delay",
            "0",
        ]);
        space.exec_ok(&["ip", "link", "set", name, "up"]);
        for p in ports {
            space.exec_ok(&["ip", "link", "set", p, "master", name]);
        }
    }

    pub fn addr(&self, ns: &str, dev: &str, cidr: &str) {
        self.ns(ns)
            .exec_ok(&["ip", "addr", "add", cidr, "dev", dev]);
    }

    /// Adds an IPv6 `cidr` to `dev` without duplicate address detection (usable at once).
    pub fn addr6(&self, ns: &str, dev: &str, cidr: &str) {
        self.ns(ns)
            .exec_ok(&["ip", "-6", "addr", "add", cidr, "dev", dev, "nodad"]);
    }

    pub fn mac(&self, ns: &str, dev: &str, mac: &str) {
        self.ns(ns)
            .exec_ok(&["ip", "link", "set", dev, "address", mac]);
    }

    /// A permanent neighbour entry in `ns`: `ip` is at `mac` on `dev` (no ARP for it).
    pub fn neigh(&self, ns: &str, dev: &str, ip: &str, mac: &str) {
        self.ns(ns).exec_ok(&[
            "ip",
            "neigh",
            "replace",
            ip,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }

    /// `ip route add ARGS...` in `ns`.
    pub fn route(&self, ns: &str, args: &[&str]) {
        let mut v = vec!["ip", "route", "add"];
        v.extend_from_slice(args);
        self.ns(ns).exec_ok(&v);
    }

    /// `sysctl -w key=value` in `ns`.
    pub fn sysctl(&self, ns: &str, key: &str, value: &str) {
        self.ns(ns)
            .exec_ok(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }

    /// A `TcpExt` counter of namespace `ns` from /proc/net/netstat (`TCPSynRetrans`, say).
    pub fn tcp_ext(&self, ns: &str, name: &str) -> u64 {
        let text = self.ns(ns).exec_ok(&["cat", "/proc/net/netstat"]);
        let mut lines = text.lines();
        while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
            if !names.starts_with("TcpExt:") {
                continue;
            }
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if n == name {
                    return v.parse().unwrap();
                }
            }
        }
        panic!("no TcpExt {name} in /proc/net/netstat of {ns}:\n{text}");
    }

    /// Packets the lab's own links lost, summed over every device of every namespace: the
    /// drops of `ip -s link` (a full veth ring, a full backlog) and the XDP transmit errors
    /// of `ethtool -S` (a frame XDP_TX or XDP_REDIRECT could not queue), with the devices
    /// that lost any. An XDP program's own XDP_DROP is not among them (`xdp_drops`), so
    /// a test can tell a packet lb dropped from one a loaded machine's veths did.
    pub fn losses(&self) -> (u64, String) {
        let mut total = 0;
        let mut detail = String::new();
        for ns in &self.spaces {
            let json = ns.exec_ok(&["ip", "-s", "-j", "link", "show"]);
            let links: Vec<serde_json::Value> = serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("ip -s -j link in {}: {e}", ns.name()));
            for link in links {
                let dev = link["ifname"].as_str().unwrap_or("?").to_string();
                let stats = &link["stats64"];
                let mut lost = ["rx", "tx"]
                    .iter()
                    .map(|d| stats[d]["dropped"].as_u64().unwrap_or(0))
                    .sum::<u64>();
                if link["link_type"] == "ether" {
                    let out = ns.exec(&["ethtool", "-S", &dev]);
                    for line in String::from_utf8_lossy(&out.stdout).lines() {
                        if let Some((name, v)) = line.trim().split_once(": ")
                            && (name.ends_with("xdp_tx_errors")
                                || name.ends_with("xdp_xmit_errors"))
                        {
                            lost += v.trim().parse::<u64>().unwrap_or(0);
                        }
                    }
                }
                if lost > 0 {
                    total += lost;
                    detail += &format!("{}/{dev}: {lost}; ", ns.name());
                }
            }
        }
        (total, detail)
    }

    /// Starts a long-running process in `ns`; it is killed when the lab drops.
    pub fn spawn(&mut self, ns: &str, args: &[&str]) {
        let child = self.ns(ns).spawn(args);
        self.children.push((format!("{ns}: {args:?}"), child));
    }

    /// Takes over a process started by the caller in `ns`: killed when the lab drops.
    pub fn adopt(&mut self, ns: &str, child: Child) {
        self.children.push((format!("{ns}: adopted"), child));
    }

    /// The lab's scratch directory (created on first use, removed when the lab drops).
    pub fn dir(&mut self) -> std::path::PathBuf {
        self.dir
            .get_or_insert_with(|| {
                let d = std::env::temp_dir().join(crate::netns::unique_name("lab"));
                std::fs::create_dir_all(&d)
                    .unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
                d
            })
            .clone()
    }

    /// A namespace `name` holding a bridge `br0`: one Ethernet segment for [`Lab::plug`].
    pub fn switch(&mut self, name: &str) {
        self.add_ns(name);
        self.bridge(name, "br0", &[]);
    }

    /// Plugs `ns` into the switch namespace `sw` with a veth whose end in `ns` is `dev`. The
    /// switch port runs a pass-through XDP program, so frames XDP sends back out of `dev`
    /// move on at once (see [`crate::xdp_pass`]).
    pub fn plug(&mut self, ns: &str, dev: &str, sw: &str) {
        let port = format!("p-{}", ns.chars().take(10).collect::<String>());
        self.veth((ns, dev), (sw, &port));
        let space = self.ns(sw);
        space.exec_ok(&["ip", "link", "set", &port, "master", "br0"]);
        let ifindex = space.ifindex(&port);
        let _inside = space.enter();
        crate::xdp_pass::attach(ifindex)
            .unwrap_or_else(|e| panic!("attaching the pass program to {port}: {e}"));
    }

    /// Starts nginx in `ns` answering every request on `ports` with `name` and a newline
    /// (and `/big` with [`BIG_BYTES`] at 160 kB/s, `/unavailable` with a 503), and waits
    /// until it listens.
    pub fn nginx(&mut self, ns: &str, name: &str, ports: &[u16]) {
        self.nginx_tls(ns, name, ports, None);
    }

    /// Like [`Lab::nginx`], also serving HTTPS on `tls.0` with the PEM certificate and key
    /// `tls.1` and `tls.2`.
    pub fn nginx_tls(
        &mut self,
        ns: &str,
        name: &str,
        ports: &[u16],
        tls: Option<(u16, &str, &str)>,
    ) {
        let dir = self.dir().join(format!("nginx-{ns}"));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        // With IPv6 on in `ns` (see `ipv6`), on both families.
        let v6 = self
            .ns(ns)
            .exec_ok(&["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"])
            .trim()
            == "0";
        let mut listens: String = ports
            .iter()
            .map(|p| {
                if v6 {
                    format!("listen {p} reuseport; listen [::]:{p} reuseport; ")
                } else {
                    format!("listen {p} reuseport; ")
                }
            })
            .collect();
        if let Some((port, cert, key)) = tls {
            std::fs::write(dir.join("cert.pem"), cert).unwrap();
            std::fs::write(dir.join("key.pem"), key).unwrap();
            listens += &format!(
                "listen {port} ssl reuseport; ssl_certificate {d}/cert.pem; \
                 ssl_certificate_key {d}/key.pem; "
            );
            if v6 {
                listens += &format!("listen [::]:{port} ssl reuseport; ");
            }
        }
        // /big: a 2 MB download served at 160 kB/s (about 12 s), for long-lived transfers.
        let big: Vec<u8> = (0..BIG_BYTES).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("big"), big).unwrap();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; \
             fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi; \
             keepalive_requests 10000; keepalive_timeout 60s; \
             server {{ {listens} location = /big {{ alias {d}/big; limit_rate 160k; }} \
             location = /unavailable {{ return 503 \"unavailable\\n\"; }} \
             location /files/ {{ alias {d}/files/; }} \
             location / {{ default_type text/plain; return 200 \"{name}\\n\"; }} }} }}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        self.spawn(ns, &["nginx", "-c", path.to_str().unwrap()]);
        let space = self.ns(ns);
        for p in ports.iter().chain(tls.iter().map(|t| &t.0)) {
            let want = format!(":{p} ");
            self.wait_for(
                &format!("nginx in {ns} to listen on {p}"),
                Duration::from_secs(10),
                || space.exec_ok(&["ss", "-Hltn"]).contains(&want),
            );
        }
    }

    /// A file of `bytes` bytes that the nginx in `ns` serves unthrottled at `/files/NAME`
    /// (start nginx first).
    pub fn serve_file(&mut self, ns: &str, name: &str, bytes: usize) {
        let dir = self.dir().join(format!("nginx-{ns}")).join("files");
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..bytes).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.join(name), data).unwrap();
    }

    /// Sets the MTU of `dev` in `ns`.
    pub fn mtu(&self, ns: &str, dev: &str, mtu: u32) {
        self.ns(ns)
            .exec_ok(&["ip", "link", "set", dev, "mtu", &mtu.to_string()]);
    }

    /// Stops the processes started in `ns` so far (to inject a failure): SIGTERM, so that
    /// nginx takes its workers down with it, then SIGKILL after 2 s.
    pub fn kill(&mut self, ns: &str) {
        let prefix = format!("{ns}: ");
        for (what, child) in self.children.iter_mut() {
            if what.starts_with(&prefix) {
                stop(child);
            }
        }
        self.children.retain(|(what, _)| !what.starts_with(&prefix));
    }

    /// Waits until `cond` holds, polling every 20 ms, for at most `limit`; panics with `what`.
    pub fn wait_for(&self, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            if start.elapsed() > limit {
                panic!("timed out after {limit:?} waiting for {what}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGTERM, a bounded wait, then SIGKILL.
fn stop(child: &mut Child) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in self.children.iter_mut() {
            stop(child);
        }
        // The connection state a daemon of the lab kept in the BPF filesystem (a daemon
        // killed, not stopped, leaves it): named for the namespace's inode.
        for ns in &self.spaces {
            forget_kept_state(ns.name());
        }
        // NetNs::drop deletes each namespace (and the veths in it).
        self.spaces.clear();
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Removes what lb-daemons in namespace `name` kept under /sys/fs/bpf/lb
/// (`lb_daemon::dataplane::kept`): the directories `<its inode>-<interface>`.
pub fn forget_kept_state(name: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(ino) = std::fs::metadata(format!("/run/netns/{name}")).map(|m| m.ino()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf/lb") else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{ino}-"))
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:x}{:x}",
        std::process::id() & 0xffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes `text` to `path` as a program the daemon may run (mode 0755): a check script or
/// a hook.
pub fn write_executable(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
