//! The configuration document (YAML, of which JSON is a subset), as a file or the operator writes
//! it: never a panic; a document that loads has warnings that can be listed and a policy that can
//! decide.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_config::ProxyConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = ProxyConfig::from_yaml(text) {
        let _ = cfg.warnings();
        let client = std::net::IpAddr::from([10, 0, 0, 1]);
        let host = proxy_config::host::parse_host("example.com").expect("a valid name");
        let addrs = [std::net::IpAddr::from([93, 184, 215, 14]), std::net::IpAddr::from([127, 0, 0, 1])];
        let _ = cfg.policy.decide(client, &host, 443, &addrs);
    }
});
