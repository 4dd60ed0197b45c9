//! The scheduler rows' sizes: how many slots a service's ring has, and how many pages the
//! pool of rows (`sched_table`) needs for the tables' capacities.

/// Slots of one page of the scheduler rows' pool (`sched_table`): a 4 KiB map value.
pub const RING_PAGE: u32 = 1024;

/// The sizes a service's Maglev ring takes (and the caps of its weighted sequences): for
/// k = 1, 2, 4, ..., 64 pages, the largest prime that fits in k pages, so a ring wastes
/// a few slots of its last page at most. A ring has at least 100 slots per server line
/// ([`ring_slots`]), which keeps each server's share within about 1% of its weight's.
pub const RING_SIZES: [u32; 7] = [1021, 2039, 4093, 8191, 16_381, 32_749, 65_521];

/// The largest row: 64 pages.
pub const RING_MAX: u32 = RING_SIZES[RING_SIZES.len() - 1];

/// Pages of the largest row, and so the length of [`crate::Service::pages`].
pub const RING_PAGES_MAX: usize = RING_MAX.div_ceil(RING_PAGE) as usize;

/// The ring size of a service with `servers` server lines (up or not: health does not
/// resize a ring, so it does not reshuffle one): the smallest of [`RING_SIZES`] of at least
/// 100 slots per line, else the largest.
pub const fn ring_slots(servers: usize) -> u32 {
    let mut i = 0;
    while i < RING_SIZES.len() {
        if RING_SIZES[i] as usize >= servers.saturating_mul(100) {
            return RING_SIZES[i];
        }
        i += 1;
    }
    RING_MAX
}

/// Pages of the pool for tables of `services` services and `servers` server lines: as many
/// as any config within them can fill, plus one largest row, so that a row is always
/// rebuilt in fresh pages and published whole. A ring of up to 10 lines fits one page, and
/// beyond that one page holds at least 328/64 = 5.1 lines' slots (`ring_slots`), so no
/// config needs more than one page per service plus one per 5.1 lines.
pub const fn ring_pool_pages(services: u32, servers: u32) -> u32 {
    let per_service = services.saturating_mul(RING_PAGES_MAX as u32);
    let by_lines = services.saturating_add((servers as u64 * 64).div_ceil(328) as u32);
    let need = if per_service < by_lines {
        per_service
    } else {
        by_lines
    };
    need.saturating_add(RING_PAGES_MAX as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prime(n: u32) -> bool {
        n > 1
            && (2..)
                .take_while(|d| d * d <= n)
                .all(|d| !n.is_multiple_of(d))
    }

    #[test]
    fn ring_sizes_are_the_largest_primes_of_their_pages() {
        for (i, &m) in RING_SIZES.iter().enumerate() {
            let cap = (1u32 << i) * RING_PAGE;
            assert!(prime(m), "{m}");
            assert!(m <= cap && !(m + 1..=cap).any(prime), "{m} in {cap} slots");
        }
        assert_eq!(RING_PAGES_MAX, 64);
    }

    #[test]
    fn a_ring_has_100_slots_per_line_up_to_the_largest() {
        assert_eq!(ring_slots(0), 1021);
        assert_eq!(ring_slots(10), 1021);
        assert_eq!(ring_slots(11), 2039);
        assert_eq!(ring_slots(655), 65_521);
        assert_eq!(ring_slots(100_000), RING_MAX);
        for n in 1..=655 {
            assert!(ring_slots(n) as usize >= 100 * n, "{n} lines");
        }
    }

    #[test]
    fn the_pool_holds_any_config_within_the_tables_and_one_row_more() {
        // Per service: at most one page plus 64/328 of a page per line.
        for n in 1..=70_000usize {
            let pages = ring_slots(n).div_ceil(RING_PAGE) as usize;
            assert!(pages * 328 <= 328 + 64 * n, "{n} lines: {pages} pages");
        }
        // Worst cases: all lines in as few services as fill 64 pages, or one line each.
        assert_eq!(ring_pool_pages(1, 65_536), 128);
        assert_eq!(ring_pool_pages(64, 64), 64 + 13 + 64);
        assert!(ring_pool_pages(200, 65_536) >= 64 * 200);
        // The example: 4,096 services of 10 lines within 64 MiB.
        assert!(ring_pool_pages(4096, 40_960) as u64 * 4096 < 64 << 20);
    }
}
