//! The names of the daemon's /proc-like tables (DESIGN.md, "Control surfaces"): the files
//! under its mount, and the words of `lb-cli cat/write/collect`. Their formats and writes
//! are the daemon's (lb-daemon's `tables`).

/// A table, as a file name under the mount and a word for `lb-cli cat/write`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    Config,
    Connections,
    Debug,
    Nat,
    Servers,
    Services,
    Stat,
    Timeout,
    /// The idle timeouts by protocol and state: `tcp tcpfin udp`.
    Timeouts,
    Atms,
    /// The log's filter, changed while the daemon runs.
    LogLevel,
    /// A real server's: lb_decap's counters.
    Decap,
}

impl Table {
    pub const ALL: [Table; 11] = [
        Table::Config,
        Table::Connections,
        Table::Debug,
        Table::Nat,
        Table::Servers,
        Table::Services,
        Table::Stat,
        Table::Timeout,
        Table::Timeouts,
        Table::Atms,
        Table::LogLevel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Config => "config",
            Table::Connections => "connections",
            Table::Debug => "debug",
            Table::Nat => "nat",
            Table::Servers => "servers",
            Table::Services => "services",
            Table::Stat => "stat",
            Table::Timeout => "timeout",
            Table::Timeouts => "timeouts",
            Table::Atms => "atms",
            Table::LogLevel => "loglevel",
            Table::Decap => "decap",
        }
    }

    /// A real server's tables (the ATM's mount does not list them).
    pub const NODE: [Table; 1] = [Table::Decap];

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL
            .into_iter()
            .chain(Table::NODE)
            .find(|t| t.name() == name)
    }

    pub fn writable(self) -> bool {
        matches!(
            self,
            Table::Config | Table::Debug | Table::Timeout | Table::Timeouts | Table::LogLevel
        )
    }
}
