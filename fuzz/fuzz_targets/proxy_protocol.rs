//! The PROXY protocol header (v1 and v2) a load balancer sends first: never a panic, never a read
//! past the header's own end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnelgate_proxy::inbound_proxy::read;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let _ = futures::executor::block_on(read(&mut rest));
    // What follows the header is the client's first request: never consumed by the header reader
    // beyond the longest header there can be.
    assert!(data.len() - rest.len() <= 16 + 1024 + 107);
});
