//! `cargo xtask demo`: the lab shown to a new user. For now the smallest honest one: two
//! network namespaces joined by a veth, lb_xdp attached natively on the balancer's end, real
//! UDP traffic from the client, and the counters read back from the program's map.

use std::{
    io::{BufRead, BufReader},
    net::UdpSocket,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};
use lb_tests::lab::Lab;
use nix::{sys::signal, unistd::Pid};

use crate::{setup, util};

const TO_VIP: u64 = 100;
const TO_OTHER: u64 = 50;

/// Kills the child when dropped, so a failed demo leaves no process behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run() -> Result<()> {
    util::require_root("cargo xtask demo")?;
    setup::run()?;

    util::step("build: lb-daemon with the embedded eBPF object, and the xdp_count example");
    util::cargo(&[
        "build",
        "--release",
        "--quiet",
        "-p",
        "lb-daemon",
        "--example",
        "xdp_count",
    ])?;
    let bin = util::workspace().join("target/release/examples/xdp_count");

    util::step("lab: namespaces client (192.0.2.1) and lb (192.0.2.2), joined by a veth");
    let mut lab = Lab::new();
    lab.add_ns("client");
    lab.add_ns("lb");
    lab.veth(("client", "eth0"), ("lb", "eth0"));
    lab.mac("client", "eth0", "02:00:00:00:01:01");
    lab.mac("lb", "eth0", "02:00:00:00:01:02");
    lab.addr("client", "eth0", "192.0.2.1/24");
    lab.addr("lb", "eth0", "192.0.2.2/24");
    // Static neighbours, so the counts below hold only the traffic we send.
    for (ns, ip, mac) in [
        ("client", "192.0.2.2", "02:00:00:00:01:02"),
        ("client", "192.0.2.100", "02:00:00:00:01:02"),
        ("lb", "192.0.2.1", "02:00:00:00:01:01"),
    ] {
        lab.ns(ns).exec_ok(&[
            "ip",
            "neigh",
            "add",
            ip,
            "lladdr",
            mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
    }

    util::step("dataplane: lb_xdp attached to lb's eth0, one service 192.0.2.100:5000/udp");
    let child = Command::new("ip")
        .args(["netns", "exec", lab.ns("lb").name()])
        .arg(&bin)
        .args(["eth0", "192.0.2.100", "5000", "udp", "60"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting xdp_count in the lb namespace")?;
    let mut child = KillOnDrop(child);
    let mut out = BufReader::new(child.0.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    out.read_line(&mut line)?;
    if !line.contains("attached") {
        bail!("xdp_count did not attach: {line:?}");
    }
    print!("  {line}");

    util::step(&format!(
        "traffic: {TO_VIP} UDP datagrams to the service, {TO_OTHER} to lb's own address"
    ));
    {
        let _inside = lab.ns("client").enter();
        let sock = UdpSocket::bind("192.0.2.1:0")?;
        for i in 0..TO_VIP {
            sock.send_to(&i.to_be_bytes(), "192.0.2.100:5000")?;
        }
        for i in 0..TO_OTHER {
            sock.send_to(&i.to_be_bytes(), "192.0.2.2:7")?;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));

    util::step("counters read back from the program's per-CPU `stat` map");
    signal::kill(Pid::from_raw(child.0.id() as i32), signal::Signal::SIGINT)?;
    let mut counters = std::collections::HashMap::new();
    for line in out.lines() {
        let line = line?;
        println!("  {line}");
        if let Some((k, v)) = line.split_once(' ') {
            counters.insert(k.to_string(), v.parse::<u64>().unwrap_or(0));
        }
    }
    let (packets, vip) = (counters["packets"], counters["vip_packets"]);
    if packets != TO_VIP + TO_OTHER || vip != TO_VIP {
        bail!(
            "counters do not match the traffic: packets {packets} (sent {}), vip_packets {vip} \
             (sent {TO_VIP})",
            TO_VIP + TO_OTHER
        );
    }
    println!(
        "demo: the program saw all {packets} packets, {vip} of them for the service; \
         the lab is torn down now"
    );
    Ok(())
}
