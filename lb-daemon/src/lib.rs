//! The ATM daemon as a library: `main.rs` parses arguments and calls in here, and the tests
//! drive the same code. The config and the control protocol are lb-api's, shared with lb-cli.

pub mod addrs;
pub use lb_api::config;
pub mod conntable;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod fuse;
pub mod ha;
pub mod health;
pub mod hooks;
pub mod logging;
pub mod metrics;
pub mod neighbours;
pub mod outbox;
pub mod services;
pub mod sync;
pub mod tables;
pub mod vlan;

/// The nice value of the threads that do the daemon's heavy work: reloads, resizes, sweeps,
/// listings, the scrape, table transfers, dropping an old dataplane. The event loop (the
/// main thread) and the runtime's workers, which send and receive the heartbeats and drive
/// the loop's timers, keep the nice value the daemon was started with, so on a busy machine
/// their turns come first.
pub const BACKGROUND_NICE: i32 = 10;

/// Runs `f` on tokio's blocking pool at [`BACKGROUND_NICE`]: what the daemon does beside
/// its event loop goes through here rather than `spawn_blocking` directly.
pub fn background<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        background_thread();
        f()
    })
}

/// Lowers the calling thread to [`BACKGROUND_NICE`], once per thread (Linux keeps a nice
/// value per thread, and a thread keeps it for the work it takes up next: the blocking
/// pool's threads and the FUSE and metrics threads only ever do background work). A
/// failure only leaves the thread as it was.
pub fn background_thread() {
    thread_local!(static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    LOWERED.with(|l| {
        if !l.replace(true) {
            // SAFETY: setpriority takes plain integers; gettid names the calling thread.
            unsafe {
                libc::setpriority(
                    libc::PRIO_PROCESS,
                    libc::gettid() as libc::id_t,
                    BACKGROUND_NICE,
                );
            }
        }
    });
}
