//! Choosing a server for a new connection: the persistence entry of a sticky service, else
//! the service's scheduler row (filled by the daemon; this only indexes it).

use lb_common::{
    hash, FlowKey, Persist, PersistKey, Sched, Service, RING_MAX, RING_PAGE, RING_PAGES_MAX,
};

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
        client: key.src,
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
