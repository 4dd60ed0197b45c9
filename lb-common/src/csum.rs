//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624).
//!
//! The one's-complement sum does not depend on byte order as long as every word is taken the
//! same way, so these work on 16-bit words exactly as loaded from packet memory: the dataplane
//! loads a field, calls one of these, and stores the result back without byte swapping.

/// Folds a 32-bit accumulator of 16-bit words into 16 bits (end-around carry).
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after one 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub const fn replace2(csum: u16, old: u16, new: u16) -> u16 {
    !fold((!csum) as u32 + (!old) as u32 + new as u32)
}

/// The checksum after one 32-bit word (two 16-bit words) changed from `old` to `new`.
#[inline(always)]
pub const fn replace4(csum: u16, old: u32, new: u32) -> u16 {
    let old_hi = (old >> 16) as u16;
    let old_lo = old as u16;
    let new_hi = (new >> 16) as u16;
    let new_lo = new as u16;
    !fold((!csum) as u32 + (!old_hi) as u32 + (!old_lo) as u32 + new_hi as u32 + new_lo as u32)
}

/// The checksum of an IPv4 header of five 32-bit words (no options) whose checksum field is
/// zero, given as ten 16-bit words in memory order.
#[inline(always)]
pub const fn ipv4_header(words: &[u16; 10]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 10 {
        sum += words[i] as u32;
        i += 1;
    }
    !fold(sum)
}

/// One's-complement sum of bytes taken as big-endian 16-bit words (odd length padded with a
/// zero byte): the reference computation the incremental updates are tested against.
pub fn sum_be(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u16::from_be_bytes([c[0], c[1]]) as u32);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u16::from_be_bytes([*last, 0]) as u32);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full recomputation over a buffer whose checksum sits at `at` (big-endian).
    fn full(buf: &[u8], at: usize) -> u16 {
        let mut b = buf.to_vec();
        b[at] = 0;
        b[at + 1] = 0;
        !fold(sum_be(&b))
    }

    /// A deterministic pseudo-random generator so the test covers many values reproducibly.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn incremental_updates_match_full_recomputation() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut buf = [0u8; 40];
            for b in buf.iter_mut() {
                *b = xorshift(&mut rng) as u8;
            }
            let csum = full(&buf, 10);
            buf[10..12].copy_from_slice(&csum.to_be_bytes());

            // Change a 32-bit word (an address) at an even offset, and a 16-bit word (a port).
            let at = 2 * (xorshift(&mut rng) as usize % 4) + 12;
            let old = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap());
            let new = xorshift(&mut rng) as u32;
            buf[at..at + 4].copy_from_slice(&new.to_ne_bytes());
            let stored = u16::from_ne_bytes([buf[10], buf[11]]);
            let updated = replace4(stored, old, new);
            buf[10..12].copy_from_slice(&updated.to_ne_bytes());
            assert_eq!(
                u16::from_be_bytes([buf[10], buf[11]]),
                full(&buf, 10),
                "replace4 at {at}"
            );

            let old16 = u16::from_ne_bytes([buf[30], buf[31]]);
            let new16 = xorshift(&mut rng) as u16;
            buf[30..32].copy_from_slice(&new16.to_ne_bytes());
            let stored = u16::from_ne_bytes([buf[10], buf[11]]);
            let updated = replace2(stored, old16, new16);
            buf[10..12].copy_from_slice(&updated.to_ne_bytes());
            assert_eq!(u16::from_be_bytes([buf[10], buf[11]]), full(&buf, 10));
            // A correct checksum makes the whole sum 0xffff.
            assert_eq!(fold(sum_be(&buf)), 0xffff);
        }
    }

    #[test]
    fn ipv4_header_checksum_matches_reference() {
        // RFC 1071 style example header: 45 00 00 73 00 00 40 00 40 11 .. .. c0 a8 00 01 c0 a8 00 c7
        let hdr: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00,
            0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let mut words = [0u16; 10];
        for (i, w) in words.iter_mut().enumerate() {
            *w = u16::from_ne_bytes([hdr[2 * i], hdr[2 * i + 1]]);
        }
        let c = ipv4_header(&words);
        assert_eq!(u16::from_be_bytes(c.to_ne_bytes()), 0xb861);
        assert_eq!(full(&hdr, 10), 0xb861);
    }
}
