//! The ATM daemon as a library: `main.rs` parses arguments and calls in here, and the tests
//! drive the same code.

pub mod dataplane;
pub mod neighbours;
