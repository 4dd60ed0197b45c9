//! The one definition of everything that crosses between the XDP programs and userspace:
//! map names, map keys and values, counter indices, and the pure helpers both sides rely on
//! (checksum arithmetic, flow hashing). Built `no_std` for the BPF target; the `user`
//! feature adds `aya::Pod` impls and the table builders that need an allocator.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

pub mod abi;
pub mod bench;
pub mod csum;
pub mod flow_cache;
pub mod frag;
pub mod hash;
pub mod nat;
pub mod rate;
pub mod ring;
#[cfg(feature = "std")]
pub mod sched;
pub mod timeouts;
#[cfg(feature = "netlink")]
pub mod xdp_link;

pub use abi::*;
pub use flow_cache::*;
pub use frag::{FragKey, FragRoute};
pub use ring::*;
pub use timeouts::Timeouts;
