//! Attaches lb_xdp natively to an interface with one service, waits for SIGINT/SIGTERM (or a
//! time limit), then prints the counters: the smallest honest demonstration of the dataplane,
//! used by `cargo xtask demo` until the daemon does the job.
//!
//! xdp_count INTERFACE VIP PORT tcp|udp [SECONDS]

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_common::{
    Addr, IPPROTO_TCP, IPPROTO_UDP, SETTINGS_ACTIVE, Service, ServiceKey, Settings, Stat,
};
use lb_daemon::dataplane::{AttachMode, Dataplane};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [iface, vip, port, proto, rest @ ..] = &args[..] else {
        bail!("usage: xdp_count INTERFACE VIP PORT tcp|udp [SECONDS]");
    };
    let vip: Ipv4Addr = vip.parse().context("VIP")?;
    let port: u16 = port.parse().context("PORT")?;
    let proto = match proto.as_str() {
        "tcp" => IPPROTO_TCP,
        "udp" => IPPROTO_UDP,
        p => bail!("protocol must be tcp or udp, not {p:?}"),
    };
    let limit = Duration::from_secs(rest.first().map(|s| s.parse()).transpose()?.unwrap_or(60));

    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut dp = Dataplane::load(Default::default())?;
    let mode = dp.attach(iface, AttachMode::Driver)?;
    dp.set_service(
        ServiceKey {
            vip: Addr::from(vip),
            port: port.to_be(),
            proto,
            _pad: 0,
        },
        Service::default(),
    )?;
    dp.set_settings(&Settings {
        flags: SETTINGS_ACTIVE,
        ..Default::default()
    })?;
    println!(
        "lb_xdp attached to {iface} in {} mode; service {vip}:{port}",
        mode.name()
    );
    let start = Instant::now();
    while !STOP.load(Ordering::Relaxed) && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = dp.stats()?;
    for stat in Stat::ALL {
        println!("{} {}", stat.name(), s.get(stat));
    }
    Ok(())
}
