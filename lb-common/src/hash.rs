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
    // An IPv4 address's first three words are constants (IPv4-mapped): given as such, the
    // compiler folds their rounds away. The same value either way.
    match a.as_v4_raw() {
        Some(_) => addr_v4(a),
        None => addr_words(a),
    }
}

#[inline(always)]
const fn addr_words(a: &Addr) -> u32 {
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
    match (k.src.as_v4_raw(), k.dst.as_v4_raw()) {
        (Some(_), Some(_)) => flow_v4(k),
        _ => flow_words(&k.src, &k.dst, k),
    }
}

/// [`flow`] of a key its caller knows to be IPv4 (both addresses IPv4-mapped, as the
/// dataplane makes every IPv4 packet's): the same value, with the mapping's constant words
/// given as constants so that the rounds over them fold away (about 50 BPF instructions
/// less on every new connection).
#[inline(always)]
pub const fn flow_v4(k: &FlowKey) -> u32 {
    flow_words(&Addr::v4_raw(k.src.w[3]), &Addr::v4_raw(k.dst.w[3]), k)
}

/// [`addr`] of an IPv4-mapped address, folded as [`flow_v4`].
#[inline(always)]
pub const fn addr_v4(a: &Addr) -> u32 {
    addr_words(&Addr::v4_raw(a.w[3]))
}

#[inline(always)]
const fn flow_words(src: &Addr, dst: &Addr, k: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, src.w[0]);
    h = mix(h, src.w[1]);
    h = mix(h, src.w[2]);
    h = mix(h, src.w[3]);
    h = mix(h, dst.w[0]);
    h = mix(h, dst.w[1]);
    h = mix(h, dst.w[2]);
    h = mix(h, dst.w[3]);
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

    const PINNED_FLOW: u32 = 0x5eb6_b4c4;
    const PINNED_ADDR: u32 = 0x6c0a_4dbe;

    #[test]
    fn ipv4_keys_hash_as_every_word_says() {
        // The folded IPv4 branch must give what the plain rounds give: ATMs of different
        // versions choose the same server for a flow.
        for i in 0..1000u32 {
            let k = FlowKey {
                src: Ipv4Addr::from(0xc633_6400 | (i & 0xff)).into(),
                dst: Ipv4Addr::new(203, 0, 113, (i % 7) as u8).into(),
                sport: (i as u16).wrapping_mul(7919).to_be(),
                dport: 443u16.to_be(),
                proto: if i % 2 == 0 { 6 } else { 17 },
                ..Default::default()
            };
            assert_eq!(flow(&k), flow_words(&k.src, &k.dst, &k));
            assert_eq!(flow_v4(&k), flow_words(&k.src, &k.dst, &k));
            assert_eq!(addr(&k.src), addr_words(&k.src));
            assert_eq!(addr_v4(&k.src), addr_words(&k.src));
        }
        // And the function itself stays what it was (these values came from the rounds
        // above before the IPv4 branch existed).
        let k = FlowKey {
            src: Ipv4Addr::new(198, 51, 100, 7).into(),
            dst: Ipv4Addr::new(203, 0, 113, 10).into(),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            ..Default::default()
        };
        assert_eq!((flow(&k), addr(&k.src)), (PINNED_FLOW, PINNED_ADDR));
    }
}
