//! A handle on the connection table that may leave the event loop. Reading the whole table
//! is proportional to its size (up to millions of entries), so the sweep and the full sync
//! do it on a blocking thread with a handle of their own, and heartbeats never wait for it.
//! Reads go a batch at a time (`BPF_MAP_LOOKUP_BATCH`: one system call per 4096 entries
//! rather than two per entry, which is all aya 0.14 offers).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
};

use aya::maps::{HashMap, Map, MapData, MapError};
use lb_common::{CachedFlow, CachedFlow6, Connection, FlowKey};
use std::collections::HashMap as StdHashMap;

/// Entries per batch.
const BATCH: usize = 4096;
/// `enum bpf_cmd` in the kernel's uapi/linux/bpf.h.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The connection table, through a file descriptor of its own, with the CPUs' flow caches
/// (whose counts of recent packets the entries take in when read).
pub struct ConnTable {
    map: HashMap<MapData, FlowKey, Connection>,
    cache: OwnedFd,
    cache6: OwnedFd,
}

impl ConnTable {
    /// Second handles on the connection table behind `fd` and the flow caches behind
    /// `cache` (IPv4) and `cache6` (IPv6).
    pub fn open(
        fd: BorrowedFd<'_>,
        cache: BorrowedFd<'_>,
        cache6: BorrowedFd<'_>,
    ) -> Result<ConnTable, MapError> {
        let dup = |fd: BorrowedFd<'_>| {
            fd.try_clone_to_owned().map_err(|io_error| {
                MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error,
                })
            })
        };
        let data = MapData::from_fd(dup(fd)?)?;
        Ok(ConnTable {
            map: HashMap::try_from(Map::LruHashMap(data))?,
            cache: dup(cache)?,
            cache6: dup(cache6)?,
        })
    }

    /// Every entry (both legs of NAT connections), with what the flow caches forwarded of
    /// it taken in.
    pub fn entries(&self) -> Result<Vec<(FlowKey, Connection)>, MapError> {
        let mut all = entries(&self.map)?;
        let pending =
            pending(self.cache.as_raw_fd(), self.cache6.as_raw_fd()).map_err(|io_error| {
                MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error,
                })
            })?;
        merge_pending(&mut all, &pending);
        Ok(all)
    }

    /// Removes every entry that `pick` picks, as read with the flow caches' counts (an
    /// entry whose latest packets went by the cache is as fresh as they are), and looked up
    /// again first (a packet may have changed it since); returns how many went.
    pub fn remove_where(&mut self, pick: impl Fn(&Connection) -> bool) -> Result<usize, MapError> {
        self.remove_where_seeing(|_, c| pick(c), |_| {})
    }

    /// [`ConnTable::remove_where`], with the key to judge by too, showing `kept` every
    /// entry it leaves, in the same walk.
    pub fn remove_where_seeing(
        &mut self,
        pick: impl Fn(&FlowKey, &Connection) -> bool,
        mut kept: impl FnMut(&Connection),
    ) -> Result<usize, MapError> {
        let mut removed = 0;
        for (k, c) in self.entries()? {
            if !pick(&k, &c) {
                kept(&c);
                continue;
            }
            if self.map.get(&k, 0).is_ok_and(|c| pick(&k, &c)) {
                match self.map.remove(&k) {
                    Ok(()) => removed += 1,
                    Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }
}

/// Every entry of `map`, in batches where the kernel can, else key by key.
pub fn entries(
    map: &HashMap<MapData, FlowKey, Connection>,
) -> Result<Vec<(FlowKey, Connection)>, MapError> {
    use aya::maps::IterableMap;
    let fd = map.map().fd().as_fd().as_raw_fd();
    match lookup_batch(fd) {
        Ok(all) => Ok(all),
        // EINVAL/ENOTSUPP: a kernel or map type without batch lookups.
        Err(_) => {
            let mut out = Vec::new();
            for item in map.iter() {
                match item {
                    Ok(kv) => out.push(kv),
                    // Evicted or expired between listing its key and reading it.
                    Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        }
    }
}

fn lookup_batch(fd: RawFd) -> io::Result<Vec<(FlowKey, Connection)>> {
    let (keys, values) = lookup_batch_of::<FlowKey, Connection>(fd)?;
    Ok(keys.into_iter().zip(values).collect())
}

/// Every key of the map behind `fd` with its value, a batch of `BATCH` keys per system
/// call.
fn lookup_batch_of<K: Copy + Default, V: Copy + Default>(
    fd: RawFd,
) -> io::Result<(Vec<K>, Vec<V>)> {
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // The kernel's resume point: opaque (a bucket number for hash maps, an index for arrays).
    let (mut token, mut next) = (0u64, 0u64);
    let (mut out_keys, mut out_values) = (Vec::new(), Vec::new());
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u64 as u64
            },
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: bpf(2) with an attr that points at buffers of BATCH keys and values of
        // the map's own types, and at the two resume tokens; all outlive the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let done = if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
            true
        } else {
            false
        };
        // The kernel writes the count back even with ENOENT (the last, partial batch).
        let n = (attr.count as usize).min(BATCH);
        out_keys.extend_from_slice(&keys[..n]);
        out_values.extend_from_slice(&values[..n]);
        if done {
            return Ok((out_keys, out_values));
        }
        token = next;
        first = false;
    }
}

/// What the CPUs' flow caches (`flow_cache` behind `fd`, `flow_cache6` behind `fd6`, every
/// CPU's slots in one array each) forwarded that the shared entries have not seen yet, by
/// flow: packets and bytes summed over the CPUs, the latest packet's time (in a
/// `CachedFlow6`, whose counts are all that is used).
pub fn pending(fd: RawFd, fd6: RawFd) -> io::Result<StdHashMap<FlowKey, CachedFlow6>> {
    let mut out: StdHashMap<FlowKey, CachedFlow6> = StdHashMap::new();
    let (_, values) = lookup_batch_of::<u32, CachedFlow>(fd)?;
    for f in values.iter().filter(|f| f.daddr != 0 && f.packets != 0) {
        out.entry(f.key())
            .or_default()
            .absorb(f.packets, f.bytes, f.last_ns);
    }
    let (_, values) = lookup_batch_of::<u32, CachedFlow6>(fd6)?;
    for f in values.iter().filter(|f| f.key.proto != 0 && f.packets != 0) {
        out.entry(f.key)
            .or_default()
            .absorb(f.packets, f.bytes, f.last_ns);
    }
    Ok(out)
}

/// `entries` with what the flow caches hold of each connection taken in (see [`pending`]).
pub fn merge_pending(
    entries: &mut [(FlowKey, Connection)],
    pending: &StdHashMap<FlowKey, CachedFlow6>,
) {
    if pending.is_empty() {
        return;
    }
    for (k, c) in entries.iter_mut() {
        if let Some(f) = pending.get(k) {
            f.merge_into(c);
        }
    }
}
