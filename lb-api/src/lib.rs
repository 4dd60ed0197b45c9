//! What lb-daemon and lb-cli share, with no dataplane in it: the config file (types, reader,
//! checks), the control protocol with its client and the typed views it answers with, and the capacities of the maps. lb-cli
//! builds on this crate alone, so it needs neither aya nor the eBPF toolchain.

pub mod config;
pub mod control;
pub mod tables;
pub mod views;

/// Capacities of the maps: the `config` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub services: u32,
    pub servers: u32,
    pub connections: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            services: lb_common::DEFAULT_SERVICES,
            servers: lb_common::DEFAULT_SERVERS,
            connections: lb_common::DEFAULT_CONNECTIONS,
        }
    }
}
