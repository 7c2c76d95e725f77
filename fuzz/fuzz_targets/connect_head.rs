//! The CONNECT request head as a client sends it: never a panic; a target that parses prints back
//! to itself (what the policy, the dialler and the logs see is one value).
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_config::Authority;
use tunnelgate_proxy::negotiate::parse_head;

fuzz_target!(|data: &[u8]| {
    if let Ok(authority) = parse_head(data) {
        let again: Authority = authority.to_string().parse().expect("a parsed target prints as a valid target");
        assert_eq!(again, authority);
        assert_ne!(authority.port, 0, "port 0 is never a target");
    }
});
