//! This proxy's own addresses, which are never destinations: the host's interfaces, and whether an
//! address and port reach one of the proxy's listener or admin endpoints.

use std::net::{IpAddr, SocketAddr};

use proxy_config::addr::{classify, SpecialRange};

/// Whether `ip:port` reaches one of `endpoints`. A listener bound to 0.0.0.0 or :: is reached on
/// every address of the host: loopback, unspecified, and each of `host_addrs` (all interfaces);
/// the unspecified address itself is this host on every port.
pub fn is_own_endpoint(endpoints: &[SocketAddr], host_addrs: &[IpAddr], ip: IpAddr, port: u16) -> bool {
    let ip = ip.to_canonical();
    // The unspecified address is never a destination (RFC 1122 3.2.1.3): a connection to it
    // reaches this host, on every port, whatever the listeners are bound to.
    if ip.is_unspecified() {
        return true;
    }
    let on_this_host = || {
        matches!(classify(ip), Some(SpecialRange::Loopback | SpecialRange::Unspecified))
            || host_addrs.iter().any(|a| a.to_canonical() == ip)
    };
    endpoints
        .iter()
        .any(|ep| ep.port() == port && (ep.ip().to_canonical() == ip || (ep.ip().is_unspecified() && on_this_host())))
}

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
        let eps: Vec<SocketAddr> = vec!["0.0.0.0:3128".parse().unwrap(), "127.0.0.1:9090".parse().unwrap()];
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
