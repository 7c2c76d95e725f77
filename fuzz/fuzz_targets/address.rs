//! The address classifier (what the SSRF rules refuse) and the strict host grammar of targets:
//! never a panic; an IPv6 address that embeds a refused IPv4 address is refused itself; a host that
//! parses prints back to itself.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use proxy_config::addr::{classify, embedded_forms};
use proxy_config::Authority;

fuzz_target!(|data: &[u8]| {
    let ip = match data.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3]))),
        16 => <[u8; 16]>::try_from(data).ok().map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        _ => None,
    };
    if let Some(ip) = ip {
        let class = classify(ip);
        for form in embedded_forms(ip).skip(1) {
            if classify(form).is_some() {
                assert!(class.is_some(), "{ip} embeds refused {form} but is not refused itself");
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(a) = text.parse::<Authority>() {
            let again: Authority = a.to_string().parse().expect("a parsed authority prints as a valid one");
            assert_eq!(again, a);
        }
    }
});
