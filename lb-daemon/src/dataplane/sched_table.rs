//! The scheduler rows: one memory-mapped BPF array shared with lb_xdp, a row of
//! `SCHED_STRIDE`-aligned slots per service, written in place.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::{Map, MapData};
use lb_common::{RING_SIZE, maps};

use super::Error;

/// The scheduler table, mapped into our memory (the map is created BPF_F_MMAPABLE), so that
/// rewriting a 65,537-slot Maglev row is a copy rather than 65,537 system calls. An array
/// map stores each value in an 8-byte element (value sizes are rounded up to 8), value first.
pub(super) struct SchedTable {
    ptr: NonNull<u32>,
    entries: usize,
    /// Keeps the map (and so the mapping's backing) alive.
    _map: MapData,
}

/// Bytes per element of a BPF array map whose values are 4 bytes.
pub(super) const SCHED_STRIDE: usize = 8;

impl SchedTable {
    pub(super) fn new(map: Map, entries: usize) -> Result<Self, Error> {
        let Map::Array(data) = map else {
            return Err(Error::Invalid(format!(
                "map {} is not an array",
                maps::SCHED_TABLE
            )));
        };
        // SAFETY: mapping a BPF array map fd as the kernel documents for BPF_F_MMAPABLE.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::bytes(entries),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Io {
                what: format!("mmap of map {}", maps::SCHED_TABLE),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(SchedTable {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned a non-null address"),
            entries,
            _map: data,
        })
    }

    fn bytes(entries: usize) -> usize {
        (entries * SCHED_STRIDE).next_multiple_of(page_size())
    }

    /// The u32 holding element `i`.
    fn slot(&self, i: usize) -> *mut u32 {
        debug_assert!(i < self.entries);
        // SAFETY: in bounds of the mapping (callers check i < entries).
        unsafe { self.ptr.as_ptr().add(i * SCHED_STRIDE / 4) }
    }

    pub(super) fn write_row(&mut self, service: u32, table: &[u32]) -> bool {
        let start = service as usize * RING_SIZE as usize;
        if table.len() > RING_SIZE as usize || start + RING_SIZE as usize > self.entries {
            return false;
        }
        for (i, v) in table.iter().enumerate() {
            // SAFETY: in bounds, checked above; the kernel reads these words concurrently,
            // which is fine for aligned 4-byte stores.
            unsafe { std::ptr::write_volatile(self.slot(start + i), *v) };
        }
        true
    }

    #[cfg(feature = "testing")]
    pub(super) fn read_row(&self, service: u32, len: usize) -> Option<Vec<u32>> {
        let start = service as usize * RING_SIZE as usize;
        if len > RING_SIZE as usize || start + RING_SIZE as usize > self.entries {
            return None;
        }
        // SAFETY: in bounds, checked above.
        Some(
            (0..len)
                .map(|i| unsafe { std::ptr::read_volatile(self.slot(start + i)) })
                .collect(),
        )
    }
}

pub(super) fn page_size() -> usize {
    // SAFETY: plain libc call.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

impl Drop for SchedTable {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), Self::bytes(self.entries)) };
    }
}
