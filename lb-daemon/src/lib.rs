//! The ATM daemon as a library: `main.rs` parses arguments and calls in here, lb-cli uses
//! the config checker and the control protocol, and the tests drive the same code.

pub mod addrs;
pub mod config;
pub mod conntable;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod fuse;
pub mod ha;
pub mod health;
pub mod metrics;
pub mod neighbours;
pub mod outbox;
pub mod services;
pub mod sync;
pub mod tables;
pub mod vlan;
