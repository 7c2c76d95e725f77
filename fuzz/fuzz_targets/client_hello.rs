//! The TLS ClientHello a TLS listener reads first (through rustls' Acceptor, as the listener's
//! handshake does) and the SNI and ALPN it reads from it: never a panic, whatever the records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls::server::Acceptor;

fuzz_target!(|data: &[u8]| {
    let mut acceptor = Acceptor::default();
    let mut rest = data;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                if let Some(name) = hello.server_name() {
                    assert!(!name.is_empty());
                    let _ = proxy_config::host::parse_host(name);
                }
                if let Some(alpn) = hello.alpn() {
                    for p in alpn {
                        assert!(!p.is_empty());
                    }
                }
                return;
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
});
