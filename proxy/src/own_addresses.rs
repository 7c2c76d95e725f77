//! This proxy's own addresses, which are never destinations: the host's interfaces; whether an
//! address and port reach one of the proxy's endpoints is decided in `proxy_config::addr`.

use std::net::IpAddr;

pub use proxy_config::addr::is_own_endpoint;

/// Every address of this host's interfaces (empty when they cannot be read; loopback and the
/// unspecified address count as the host's without this list).
pub fn host_addresses() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(ifs) => ifs.iter().map(|i| i.ip().to_canonical()).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the host's addresses; only loopback counts as the proxy itself");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s01_every_address_of_the_host_reaches_a_wildcard_listener() {
        let eps: Vec<std::net::SocketAddr> = vec!["0.0.0.0:3128".parse().unwrap(), "127.0.0.1:9090".parse().unwrap()];
        let host: Vec<IpAddr> = vec!["192.0.2.2".parse().unwrap(), "2001:db8::2".parse().unwrap()];
        let own = |ip: &str, port| is_own_endpoint(&eps, &host, ip.parse().unwrap(), port);
        for ip in ["192.0.2.2", "::ffff:192.0.2.2", "2001:db8::2", "127.0.0.9", "0.0.0.0", "::1"] {
            assert!(own(ip, 3128), "{ip}");
        }
        assert!(own("127.0.0.1", 9090));
        assert!(!own("192.0.2.2", 9090), "admin is bound to loopback only");
        assert!(!own("192.0.2.3", 3128), "another host");
        assert!(!own("192.0.2.2", 443), "another port");
        for ip in ["0.0.0.0", "::", "::ffff:0.0.0.0"] {
            assert!(own(ip, 443) && own(ip, 9090), "{ip} on any port");
        }
    }
}
