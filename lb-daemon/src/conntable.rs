//! A handle on the connection table that may leave the event loop. Reading the whole table
//! is proportional to its size (up to millions of entries), so the sweep and the full sync
//! do it on a blocking thread with a handle of their own, and heartbeats never wait for it.
//! Reads go a batch at a time (`BPF_MAP_LOOKUP_BATCH`: one system call per 4096 entries
//! rather than two per entry, which is all aya 0.14 offers).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
};

use aya::maps::{HashMap, Map, MapData, MapError};
use lb_common::{Connection, FlowKey};

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

/// The connection table, through a file descriptor of its own.
pub struct ConnTable {
    map: HashMap<MapData, FlowKey, Connection>,
}

impl ConnTable {
    /// A second handle on the map behind `fd`.
    pub fn open(fd: BorrowedFd<'_>) -> Result<ConnTable, MapError> {
        let own = fd.try_clone_to_owned().map_err(|io_error| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "dup",
                io_error,
            })
        })?;
        let data = MapData::from_fd(own)?;
        Ok(ConnTable {
            map: HashMap::try_from(Map::LruHashMap(data))?,
        })
    }

    /// Every entry (both legs of NAT connections).
    pub fn entries(&self) -> Result<Vec<(FlowKey, Connection)>, MapError> {
        entries(&self.map)
    }

    /// See [`remove_where`].
    pub fn remove_where(&mut self, pick: impl Fn(&Connection) -> bool) -> Result<usize, MapError> {
        remove_where(&mut self.map, pick)
    }
}

/// Removes every entry of `map` that `pick` picks, looking each up again first (a packet may
/// have changed it since the table was read); returns how many went.
pub fn remove_where(
    map: &mut HashMap<MapData, FlowKey, Connection>,
    pick: impl Fn(&Connection) -> bool,
) -> Result<usize, MapError> {
    let mut removed = 0;
    for (k, c) in entries(map)? {
        if pick(&c) && map.get(&k, 0).is_ok_and(|c| pick(&c)) {
            match map.remove(&k) {
                Ok(()) => removed += 1,
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
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
    let mut keys = vec![FlowKey::default(); BATCH];
    let mut values = vec![Connection::default(); BATCH];
    // The kernel's resume point: opaque (a bucket number for hash maps).
    let (mut token, mut next) = (0u64, 0u64);
    let mut out = Vec::new();
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
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if done {
            return Ok(out);
        }
        token = next;
        first = false;
    }
}
