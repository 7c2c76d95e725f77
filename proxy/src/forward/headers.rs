//! Header rules of the plain-HTTP forward path (RFC 9110 §7.6, RFC 9112 §6): which request heads
//! are refused, which fields never cross the proxy, and what the proxy adds. Pure functions.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::Version;

/// Fields that describe one hop and never cross the proxy (RFC 9110 §7.6.1), plus the proxy's
/// own credentials and the framing the proxy regenerates.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Why a request head is refused before anything is sent upstream (all answered with 400).
pub fn check_request_framing(version: Version, headers: &HeaderMap) -> Result<(), &'static str> {
    let te: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if te.is_empty() {
        return Ok(());
    }
    if version == Version::HTTP_10 {
        return Err("Transfer-Encoding in an HTTP/1.0 request");
    }
    // A Content-Length beside Transfer-Encoding never reaches this point: hyper drops it, frames the
    // body by chunked and closes the connection after the response (RFC 9112 §6.1, as HAProxy does;
    // the F-01 tests hold it to that).
    // Exactly one coding, `chunked` (any case, OWS around it): anything else is either a coding
    // this proxy does not apply or an ambiguous framing.
    let mut codings = Vec::new();
    for v in te {
        let Ok(text) = v.to_str() else { return Err("invalid Transfer-Encoding") };
        for c in text.split(',') {
            codings.push(c.trim_matches([' ', '\t']));
        }
    }
    match codings.as_slice() {
        [only] if only.eq_ignore_ascii_case("chunked") => Ok(()),
        _ => Err("unsupported Transfer-Encoding (only a single \"chunked\" is accepted)"),
    }
}

/// Whether the request asks to switch protocols (`Connection: upgrade` and an `Upgrade` field).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim_matches([' ', '\t']))
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop fields and every field `Connection` nominates; with `keep_upgrade`,
/// keeps `Upgrade` and sets `Connection: upgrade` (the only hop-by-hop signal that crosses, for an
/// upgrade request and its 101 answer).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let nominated: Vec<HeaderName> =
        connection_tokens(headers).filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()).collect();
    let upgrade = headers.get(header::UPGRADE).cloned();
    for name in nominated.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if keep_upgrade {
        if let Some(u) = upgrade {
            headers.insert(header::UPGRADE, u);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
}

/// Appends `1.1 <pseudonym>` (or `1.0 …`) to `Via` (RFC 9110 §7.6.3).
pub fn add_via(headers: &mut HeaderMap, version: Version, pseudonym: &str) {
    let proto = if version == Version::HTTP_10 { "1.0" } else { "1.1" };
    if let Ok(v) = HeaderValue::from_str(&format!("{proto} {pseudonym}")) {
        headers.append(header::VIA, v);
    }
}

/// Appends the client's address to `X-Forwarded-For` and `Forwarded` (RFC 7239). Only on
/// listeners that opt in.
pub fn add_forwarded_for(headers: &mut HeaderMap, client: std::net::IpAddr) {
    let client = client.to_canonical();
    if let Ok(v) = HeaderValue::from_str(&client.to_string()) {
        headers.append(HeaderName::from_static("x-forwarded-for"), v);
    }
    let node = match client {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => format!("\"[{a}]\""),
    };
    if let Ok(v) = HeaderValue::from_str(&format!("for={node}")) {
        headers.append(header::FORWARDED, v);
    }
}

/// Removes what a response must not carry through the proxy. A response with both
/// `Transfer-Encoding` and `Content-Length` is framed by the former (RFC 9112 §6.3): the length
/// is dropped, and the caller must not reuse the upstream connection. Returns whether it was so.
pub fn sanitize_response(headers: &mut HeaderMap, switching: bool) -> bool {
    let conflicting = headers.contains_key(header::TRANSFER_ENCODING) && headers.contains_key(header::CONTENT_LENGTH);
    if conflicting {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(headers, switching);
    conflicting
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn f02_only_a_single_chunked_coding_is_accepted() {
        for ok in ["chunked", "CHUNKED", "\tchunked ", "Chunked"] {
            assert!(check_request_framing(Version::HTTP_11, &map(&[("transfer-encoding", ok)])).is_ok(), "{ok:?}");
        }
        for bad in
            ["chunked, chunked", "chunked, gzip, chunked", "gzip", "chunked, identity", "xchunked", "chunked,", ""]
        {
            assert!(check_request_framing(Version::HTTP_11, &map(&[("transfer-encoding", bad)])).is_err(), "{bad:?}");
        }
        let two = map(&[("transfer-encoding", "chunked"), ("transfer-encoding", "identity")]);
        assert!(check_request_framing(Version::HTTP_11, &two).is_err());
        assert!(check_request_framing(Version::HTTP_10, &map(&[("transfer-encoding", "chunked")])).is_err());
        // Content-Length beside Transfer-Encoding is hyper's to handle (it drops the length): see
        // the F-01 integration tests.
    }

    #[test]
    fn f08_hop_by_hop_and_nominated_fields_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Internal-Auth"),
            ("x-internal-auth", "secret"),
            ("proxy-authorization", "Basic dTpw"),
            ("proxy-connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-a", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-a"]);
    }

    #[test]
    fn upgrade_survives_only_when_asked() {
        let mut h = map(&[("connection", "Upgrade, X-Secret"), ("upgrade", "websocket"), ("x-secret", "1")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert!(h.get("x-secret").is_none());
        assert!(!wants_upgrade(&map(&[("upgrade", "websocket")])));
    }

    #[test]
    fn f10_conflicting_response_framing_drops_the_length() {
        let mut h = map(&[("transfer-encoding", "chunked"), ("content-length", "30")]);
        assert!(sanitize_response(&mut h, false));
        assert!(h.get("content-length").is_none() && h.get("transfer-encoding").is_none());
    }
}
