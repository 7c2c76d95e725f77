//! PROXY protocol headers a tunnel listener sends its upstream (HAProxy's proxy-protocol.txt), built
//! with the `ppp` crate: the client's and the listener's TCP addresses in one family (an
//! IPv4-mapped address counts as IPv4; mixed families are both written as IPv6), LOCAL / UNKNOWN
//! when an address is not known, and in v2 the ALPN, authority (SNI) and SSL TLVs of a TLS client.

use std::net::{IpAddr, SocketAddr};

use ppp::v2::{Builder, Command, Protocol, Type, Version};
use proxy_config::ProxyProtocol;

use crate::tls::handshake::TlsFacts;

/// `PP2_CLIENT_SSL`, `PP2_CLIENT_CERT_CONN`: bits of the SSL TLV's client field.
const CLIENT_SSL: u8 = 0x01;
const CLIENT_CERT_CONN: u8 = 0x02;

/// The header to write before any payload, or `None` when the listener sends none.
pub fn header(
    kind: ProxyProtocol,
    client: SocketAddr,
    local: Option<SocketAddr>,
    tls: Option<&TlsFacts>,
) -> Option<Vec<u8>> {
    let pair = local.map(|l| same_family(client, l));
    match kind {
        ProxyProtocol::None => None,
        ProxyProtocol::V1 => Some(match pair {
            Some(p) => ppp::v1::Addresses::from(p).to_string().into_bytes(),
            None => b"PROXY UNKNOWN\r\n".to_vec(),
        }),
        ProxyProtocol::V2 => {
            let builder = match pair {
                Some(p) => Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, p),
                // LOCAL, no addresses: the receiver uses the connection's own.
                None => Builder::with_addresses(
                    Version::Two | Command::Local,
                    Protocol::Unspecified,
                    ppp::v2::Addresses::Unspecified,
                ),
            };
            let mut builder = Some(builder);
            if let (Some(t), Some(_)) = (tls, pair) {
                if let Some(alpn) = &t.alpn {
                    builder = builder.and_then(|b| b.write_tlv(Type::ALPN, alpn).ok());
                }
                if let Some(sni) = &t.sni {
                    builder = builder.and_then(|b| b.write_tlv(Type::Authority, sni.as_bytes()).ok());
                }
                builder = builder.and_then(|b| b.write_tlv(Type::SSL, &ssl_tlv(t)).ok());
            }
            builder.and_then(|b| b.build().ok())
        }
    }
}

/// The value of the SSL TLV (proxy-protocol.txt §2.2.5): client flags, the verify result (0 only
/// for a verified client certificate) and the version, cipher and client CN sub-TLVs.
fn ssl_tlv(t: &TlsFacts) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.push(if t.client_cert { CLIENT_SSL | CLIENT_CERT_CONN } else { CLIENT_SSL });
    v.extend_from_slice(&u32::from(!t.client_cert).to_be_bytes());
    let mut sub = |kind: Type, value: &[u8]| {
        // Sub-TLV values are short by construction (a version name, a cipher name, a CN of at
        // most 64 characters by RFC 5280), far below the u16 length.
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        v.push(kind as u8);
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&value[..usize::from(len)]);
    };
    sub(Type::SSLVersion, t.version.as_bytes());
    if let Some(c) = t.cipher {
        sub(Type::SSLCipher, c.as_bytes());
    }
    if let Some(cn) = &t.client_cn {
        sub(Type::SSLCommonName, cn.as_bytes());
    }
    v
}

/// Both addresses in one family: IPv4 when both are (or map to) IPv4, else both IPv6.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (ia, ib) = (a.ip().to_canonical(), b.ip().to_canonical());
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    };
    if ia.is_ipv4() && ib.is_ipv4() {
        (SocketAddr::new(ia, a.port()), SocketAddr::new(ib, b.port()))
    } else {
        (SocketAddr::new(v6(ia), a.port()), SocketAddr::new(v6(ib), b.port()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_unknown_addresses_give_local_or_unknown_and_mapped_clients_stay_ipv4() {
        let client: SocketAddr = "[::ffff:192.0.2.10]:51234".parse().unwrap_or_else(|_| unreachable!());
        let local: SocketAddr = "198.51.100.5:8443".parse().unwrap_or_else(|_| unreachable!());
        let v1 = header(ProxyProtocol::V1, client, Some(local), None).unwrap_or_default();
        assert_eq!(v1, b"PROXY TCP4 192.0.2.10 198.51.100.5 51234 8443\r\n");
        let mixed =
            header(ProxyProtocol::V1, "[2001:db8::10]:1".parse().unwrap_or_else(|_| unreachable!()), Some(local), None);
        assert_eq!(mixed.unwrap_or_default(), b"PROXY TCP6 2001:db8::10 ::ffff:198.51.100.5 1 8443\r\n");
        assert_eq!(header(ProxyProtocol::V1, client, None, None).unwrap_or_default(), b"PROXY UNKNOWN\r\n");
        let v2 = header(ProxyProtocol::V2, client, None, None).unwrap_or_default();
        assert_eq!(v2, b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00", "LOCAL, no addresses");
        assert_eq!(header(ProxyProtocol::None, client, Some(local), None), None);
    }
}
