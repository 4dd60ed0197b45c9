//! The scheduler rows' pool: one memory-mapped BPF array shared with lb_xdp, of 4 KiB
//! pages of `RING_PAGE` server indices. Each service's row lives in the pages its record
//! names (`Service::pages`); a new row is written into free pages and the record that names
//! them published after, so lb_xdp reads the old row or the new one, never a mix.

use std::{
    collections::VecDeque,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::{Map, MapData};
use lb_common::{RING_PAGE, RING_PAGES_MAX, maps};

use super::Error;

/// The pool, mapped into our memory (the map is created BPF_F_MMAPABLE), so that writing a
/// 65,521-slot Maglev row is a copy rather than 64 system calls. A page is one element of
/// the array map, and elements of 4,096 bytes lie back to back.
pub(super) struct SchedTable {
    ptr: NonNull<u32>,
    pages: usize,
    /// Pages no row holds, the longest free first: a page a row just left is taken last,
    /// after any packet that read the old record has long finished with it.
    free: VecDeque<u16>,
    /// Keeps the map (and so the mapping's backing) alive.
    _map: MapData,
}

/// Bytes of one page (an element of the map: 4-byte slots, no padding).
const PAGE_BYTES: usize = RING_PAGE as usize * 4;

/// A row's pages, as a service record holds them.
pub(super) type Pages = Vec<u16>;

impl SchedTable {
    pub(super) fn new(map: Map, pages: usize) -> Result<Self, Error> {
        let Map::Array(data) = map else {
            return Err(Error::Invalid(format!(
                "map {} is not an array",
                maps::SCHED_TABLE
            )));
        };
        if pages > u16::MAX as usize + 1 {
            return Err(Error::Invalid(format!(
                "{pages} pages of scheduler rows is more than the 65,536 a service record can name"
            )));
        }
        // SAFETY: mapping a BPF array map fd as the kernel documents for BPF_F_MMAPABLE.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::bytes(pages),
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
            pages,
            free: (0..pages).map(|p| p as u16).collect(),
            _map: data,
        })
    }

    fn bytes(pages: usize) -> usize {
        (pages * PAGE_BYTES).next_multiple_of(page_size())
    }

    /// Pages of the pool, and pages no row holds.
    pub(super) fn pages(&self) -> (usize, usize) {
        (self.pages, self.free.len())
    }

    /// Writes `row` into free pages and returns them; none are taken if too few are free.
    pub(super) fn write(&mut self, row: &[u32]) -> Result<Pages, Error> {
        let n = row.len().div_ceil(RING_PAGE as usize);
        if n > RING_PAGES_MAX {
            return Err(Error::Invalid(format!(
                "a scheduler row holds at most {} slots, not {}",
                RING_PAGES_MAX * RING_PAGE as usize,
                row.len()
            )));
        }
        if n > self.free.len() {
            return Err(Error::Invalid(format!(
                "the scheduler rows' pool has {} free pages of {} and this row needs {n}",
                self.free.len(),
                self.pages
            )));
        }
        let pages: Pages = self.free.drain(..n).collect();
        for (chunk, &page) in row.chunks(RING_PAGE as usize).zip(&pages) {
            let base = page as usize * RING_PAGE as usize;
            for (i, v) in chunk.iter().enumerate() {
                // SAFETY: in bounds: page < self.pages, i < RING_PAGE. No packet reads these
                // words until a record names the page.
                unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(base + i), *v) };
            }
        }
        Ok(pages)
    }

    /// Gives pages back to the pool (a row that was replaced or removed).
    pub(super) fn release(&mut self, pages: &[u16]) {
        debug_assert!(pages.iter().all(|p| !self.free.contains(p)));
        self.free.extend(pages);
    }

    #[cfg(feature = "testing")]
    pub(super) fn read_row(&self, pages: &[u16], len: usize) -> Option<Vec<u32>> {
        if len > pages.len() * RING_PAGE as usize || pages.iter().any(|p| *p as usize >= self.pages)
        {
            return None;
        }
        let at = |i: usize| {
            pages[i / RING_PAGE as usize] as usize * RING_PAGE as usize + i % RING_PAGE as usize
        };
        // SAFETY: in bounds, checked above.
        Some(
            (0..len)
                .map(|i| unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(at(i))) })
                .collect(),
        )
    }
}

fn page_size() -> usize {
    // SAFETY: plain libc call.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

impl Drop for SchedTable {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), Self::bytes(self.pages)) };
    }
}
