//! A redirected connection's first bytes as a transparent listener reads them: a TLS ClientHello
//! (its SNI), an HTTP/1 head (its Host) or anything else; never a panic, whatever the bytes, and
//! more bytes only ever complete what fewer began.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnelgate_proxy::transparent::first_bytes::{classify, Opening};

fuzz_target!(|data: &[u8]| {
    let Some(full) = classify(data, true) else {
        assert!(data.is_empty(), "with no more bytes to come, only nothing is undecided");
        return;
    };
    if let Opening::Tls { sni: Some(name) } | Opening::Http { host: Some(name) } = &full {
        let _ = proxy_config::host::parse_host(name);
    }
    // Decided early, the same bytes decide the same way.
    if let Some(early) = classify(data, false) {
        assert_eq!(early, full);
    }
});
