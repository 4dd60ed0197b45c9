//! A control request as the daemon reads it off its socket (one JSON line): decoded or
//! refused, never a panic; a decoded one encodes back to a request that decodes the same.
#![no_main]

use lb_api::control::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        let again = serde_json::to_vec(&req).expect("a request encodes");
        let back: Request = serde_json::from_slice(&again).expect("and decodes");
        assert_eq!(back, req);
    }
});
