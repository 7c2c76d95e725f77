//! The target of an absolute-form plain-HTTP request: never a panic; an accepted target prints back
//! to itself, and the Host value sent upstream is a valid header value naming the same host.
#![no_main]

use hyper::header::HeaderValue;
use hyper::Uri;
use libfuzzer_sys::fuzz_target;
use proxy_config::Authority;
use tunnelgate_proxy::forward::http::target;

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = Uri::try_from(data) else { return };
    if let Ok((authority, host)) = target(&uri) {
        let again: Authority = authority.to_string().parse().expect("an accepted target prints as a valid target");
        assert_eq!(again, authority);
        assert!(HeaderValue::from_str(&host).is_ok(), "Host value {host:?}");
        assert!(!host.contains('@') && !host.contains('/'), "Host value {host:?}");
        assert!(host.starts_with(&authority.host.to_string()), "{host:?} vs {authority}");
    }
});
