//! Choosing a server for a new connection: the persistence entry of a sticky service, else
//! the service's scheduler row (filled by the daemon; this only indexes it).

use lb_common::{
    hash, FlowKey, Persist, PersistKey, Sched, Service, LEAST_MAX, RING_MAX, RING_PAGE,
    RING_PAGES_MAX,
};

use aya_ebpf::{cty::c_void, helpers::generated::bpf_loop};

use crate::{conn::*, maps::*};

/// The server for a new connection: the client's persistence entry if the service is sticky
/// and it is still valid, else the scheduler's choice. `v6`: the key's family (an IPv4
/// key's addresses are IPv4-mapped, which the hashes fold).
#[inline(always)]
pub fn pick_server(svc: &Service, key: &FlowKey, v6: bool, now: u64) -> Option<u32> {
    if svc.persistence_s == 0 {
        return schedule(svc, key, v6);
    }
    let pkey = PersistKey {
        client: key.src.masked(svc.persist_prefix, v6),
        service: svc.id,
    };
    let ttl = svc.persistence_s as u64 * 1_000_000_000;
    if let Some(p) = PERSISTENCE.get_ptr_mut(&pkey) {
        // SAFETY: a map value.
        let p = unsafe { &mut *p };
        if now.saturating_sub(p.last_seen_ns) <= ttl && server_ok(p.server, svc.id) {
            p.last_seen_ns = now;
            return Some(p.server);
        }
    }
    let id = schedule(svc, key, v6)?;
    let entry = Persist {
        last_seen_ns: now,
        server: id,
        _pad: 0,
    };
    // Failing to record stickiness costs stickiness, not the connection.
    let _ = PERSISTENCE.insert(&pkey, &entry, 0);
    Some(id)
}

/// Indexes the service's scheduler row (in the pages its record names).
#[inline(always)]
fn schedule(svc: &Service, key: &FlowKey, v6: bool) -> Option<u32> {
    let len = svc.table_len;
    if len == 0 || len > RING_MAX {
        return None;
    }
    let slot = match Sched::from_u8(svc.sched) {
        Some(Sched::Maglev) if v6 => hash::flow(key) % len,
        Some(Sched::Maglev) => hash::flow_v4(key) % len,
        Some(Sched::Sh) if v6 => hash::addr(&key.src) % len,
        Some(Sched::Sh) => hash::addr_v4(&key.src) % len,
        Some(Sched::Lc) | Some(Sched::Wlc) | Some(Sched::Sed) => {
            return least(svc, len);
        }
        Some(Sched::Rr) | Some(Sched::Wrr) => {
            let cursor = RR_CURSOR.get_ptr_mut(svc.id)?;
            // SAFETY: a per-CPU slot.
            unsafe {
                let at = *cursor % len;
                *cursor = (at + 1) % len;
                at
            }
        }
        None => return None,
    };
    // The mask tells the verifier what `slot < len <= RING_MAX` already says: it keeps no
    // bound through a remainder. Read through a volatile load, or LLVM, which knows the
    // bound, drops the mask.
    // SAFETY: reading a local.
    let slot = unsafe { core::ptr::read_volatile(&slot) };
    let page = svc.pages[(slot / RING_PAGE) as usize & (RING_PAGES_MAX - 1)];
    SCHED_TABLE
        .get(page as u32)
        .map(|p| p[(slot % RING_PAGE) as usize])
}

/// The least-connection schedulers (IPVS's): of the servers in the service's row (each up
/// server once, at most `LEAST_MAX`, all in its first page), the one with the fewest
/// active connections (`lc`), the fewest per unit of weight (`wlc`), or the least
/// (active + 1) per unit of weight (`sed`, which prefers an idle heavy server). Ties go to
/// the first in the row. A `bpf_loop`, so the verifier checks one step, not `LEAST_MAX`.
#[inline(always)]
fn least(svc: &Service, len: u32) -> Option<u32> {
    let mut l = Least {
        page: svc.pages[0] as u32,
        sched: svc.sched as u32,
        best: u32::MAX,
        _pad: 0,
        best_load: 0,
        best_weight: 1,
    };
    // SAFETY: the helper calls `least_step` with `l`, which lives on this frame for the
    // whole call.
    unsafe {
        bpf_loop(
            len.min(LEAST_MAX),
            least_step as *mut c_void,
            &mut l as *mut Least as *mut c_void,
            0,
        );
    }
    (l.best != u32::MAX).then_some(l.best)
}

/// The best server so far of [`least`].
#[repr(C)]
struct Least {
    page: u32,
    sched: u32,
    best: u32,
    _pad: u32,
    best_load: u64,
    best_weight: u64,
}

/// Row slot `i` of [`least`] (a `bpf_loop` callback): 0 to go on, 1 to stop.
#[inline(never)]
extern "C" fn least_step(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `least` passes its Least.
    let l = unsafe { &mut *(ctx as *mut Least) };
    let Some(row) = SCHED_TABLE.get(l.page) else {
        return 1;
    };
    let id = row[(i as u32 & (RING_PAGE - 1)) as usize];
    let Some(server) = SERVERS.get(id) else {
        return 0;
    };
    let weight = server.weight as u64;
    if weight == 0 {
        return 0;
    }
    let active = active_of(id);
    let (load, w) = match Sched::from_u8(l.sched as u8) {
        Some(Sched::Lc) => (active, 1),
        Some(Sched::Sed) => (active + 1, weight),
        _ => (active, weight),
    };
    // load / w < best_load / best_weight, without dividing.
    if l.best == u32::MAX || load * l.best_weight < l.best_load * w {
        l.best = id;
        l.best_load = load;
        l.best_weight = w;
    }
    0
}
