//! The test harness shared by lb's integration tests and by `cargo xtask demo`: a network
//! namespace guard, a lab builder, and the packet-fixture runner.

pub mod cluster;
pub mod fixture;
pub mod lab;
pub mod netns;
pub mod procs;
pub mod raw;
pub mod xdp_pass;
