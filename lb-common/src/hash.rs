//! Flow hashing: the dataplane hashes a packet's 5-tuple (Maglev) or its source address (sh)
//! into the service's scheduler row. Pure, fixed-length and loop-free after unrolling, so the
//! verifier accepts it; userspace uses the same functions to predict choices in tests.

use crate::abi::{Addr, FlowKey};

const SEED: u32 = 0x6c62_2024;

/// One murmur3 round.
#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// murmur3's finaliser: spreads every input bit over the output.
#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of an address (the `sh` scheduler and persistence fallback).
#[inline(always)]
pub const fn addr(a: &Addr) -> u32 {
    let mut h = SEED;
    h = mix(h, a.w[0]);
    h = mix(h, a.w[1]);
    h = mix(h, a.w[2]);
    h = mix(h, a.w[3]);
    fmix(h ^ 16)
}

/// Hash of a 5-tuple (the `maglev` scheduler). Every ATM computes the same value.
#[inline(always)]
pub const fn flow(k: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, k.src.w[0]);
    h = mix(h, k.src.w[1]);
    h = mix(h, k.src.w[2]);
    h = mix(h, k.src.w[3]);
    h = mix(h, k.dst.w[0]);
    h = mix(h, k.dst.w[1]);
    h = mix(h, k.dst.w[2]);
    h = mix(h, k.dst.w[3]);
    h = mix(h, ((k.sport as u32) << 16) | k.dport as u32);
    h = mix(h, k.proto as u32);
    fmix(h ^ 37)
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    #[test]
    fn flow_hash_spreads_source_ports_evenly() {
        let mut buckets = [0u32; 16];
        let mut k = FlowKey {
            src: Ipv4Addr::new(198, 51, 100, 7).into(),
            dst: Ipv4Addr::new(203, 0, 113, 10).into(),
            dport: 80u16.to_be(),
            proto: 6,
            ..Default::default()
        };
        for p in 0..16_000u16 {
            k.sport = (30_000 + p).to_be();
            buckets[(flow(&k) % 16) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "uneven buckets: {buckets:?}");
        }
    }

    #[test]
    fn addr_hash_depends_on_every_word() {
        let a: Addr = Ipv4Addr::new(192, 0, 2, 1).into();
        let mut b = a;
        b.w[0] = 1;
        assert_ne!(addr(&a), addr(&b));
    }
}
