//! The ATM messages' decoder. Raw datagrams first (anything from the network: refused
//! without a panic); then the same bytes as the body of a datagram signed with the cluster's
//! key, which takes the fuzzer past the HMAC into the heartbeat, sync and config parsers.
#![no_main]

use hmac::{Hmac, KeyInit, Mac};
use lb_daemon::ha::decode;
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const CLUSTER: &str = "lab";
const KEY: &[u8] = b"fuzz-key-0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    let _ = decode(CLUSTER, KEY, data);
    // MAGIC, version 1, then the kind, the cluster's name and what the fuzzer made.
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let mut signed = b"LBHA\x01".to_vec();
    signed.push(kind);
    signed.push(CLUSTER.len() as u8);
    signed.extend_from_slice(CLUSTER.as_bytes());
    signed.extend_from_slice(body);
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(KEY).expect("any key length");
    mac.update(&signed);
    signed.extend_from_slice(&mac.finalize().into_bytes());
    let _ = decode(CLUSTER, KEY, &signed);
});
