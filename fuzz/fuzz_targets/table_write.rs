//! A write to any table, as FUSE and lb-cli hand it to the daemon: parsed and range-checked
//! or refused with a reason, never a panic. A read-only table refuses everything.
#![no_main]

use lb_daemon::tables::{Table, parse_write};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let all: Vec<Table> = Table::ALL.into_iter().chain(Table::NODE).collect();
    let table = all[which as usize % all.len()];
    match parse_write(table, text) {
        Ok(_) => assert!(table.writable(), "{} took a write", table.name()),
        Err(e) => assert!(!e.is_empty()),
    }
});
