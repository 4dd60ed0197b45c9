//! The ATM daemon as a library: `main.rs` parses arguments and calls in here, and the tests
//! drive the same code. The config and the control protocol are lb-api's, shared with lb-cli.

pub mod addrs;
pub use lb_api::config;
pub mod conntable;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod fuse;
pub mod ha;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod neighbours;
pub mod outbox;
pub mod services;
pub mod sync;
pub mod tables;
pub mod vlan;
