//! Host names and authorities: the strict request-target grammar (`host:port`) and the
//! normalization (lower case, no trailing dot, ASCII) that requests and policies share.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Longest host name accepted, in octets (RFC 1035 §2.3.4 without the root label).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label accepted, in octets (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// A normalized DNS name: ASCII, lower case, no trailing dot, valid labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(String);

impl HostName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The destination host of a request: a name to resolve, or a literal address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name.
    Name(HostName),
    /// An IPv4 dotted quad or a bracketed IPv6 literal.
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n.as_str()),
            Host::Ip(IpAddr::V4(a)) => write!(f, "{a}"),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
        }
    }
}

/// A validated `host:port` request target (RFC 9112 §3.2.3 authority-form).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authority {
    /// The normalized host.
    pub host: Host,
    /// The port, 1..=65535.
    pub port: u16,
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Why a request target or host was refused. The text is safe to send to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("missing port")]
    MissingPort,
    #[error("invalid port")]
    InvalidPort,
    #[error("empty host")]
    EmptyHost,
    #[error("forbidden character in host")]
    ForbiddenChar,
    #[error("IPv6 address must be in brackets")]
    UnbracketedIpv6,
    #[error("invalid IPv6 literal")]
    InvalidIpv6,
    #[error("address is not a canonical dotted-quad IPv4 address")]
    NonCanonicalIpv4,
    #[error("empty label in host name")]
    EmptyLabel,
    #[error("label longer than 63 octets")]
    LabelTooLong,
    #[error("host name longer than 253 octets")]
    NameTooLong,
    #[error("invalid punycode label")]
    InvalidPunycode,
    #[error("IP address where a host name is required")]
    AddressNotName,
    #[error("userinfo in the target")]
    Userinfo,
    #[error("only http:// URLs (or host:port) can be forwarded; https:// goes through CONNECT")]
    Scheme,
}

impl FromStr for Authority {
    type Err = HostError;

    /// Parses `host:port` strictly: bracketed IPv6 (no zone), canonical IPv4 or a DNS name;
    /// a decimal port without sign or leading zero. No userinfo, no scheme, no path.
    fn from_str(s: &str) -> Result<Self, HostError> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let close = rest.find(']').ok_or(HostError::InvalidIpv6)?;
            let inner = &rest[..close];
            let after = &rest[close + 1..];
            let port = after.strip_prefix(':').ok_or(if after.is_empty() {
                HostError::MissingPort
            } else {
                HostError::ForbiddenChar
            })?;
            // RFC 3986 IP-literal: only HEXDIG, ":" and "." (no zone identifier, no IPvFuture).
            if inner.is_empty() || !inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
                return Err(HostError::InvalidIpv6);
            }
            let ip = Ipv6Addr::from_str(inner).map_err(|_| HostError::InvalidIpv6)?;
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or(HostError::MissingPort)?;
            if host.contains(':') {
                return Err(if host.contains(']') || port.contains(']') {
                    HostError::InvalidIpv6
                } else {
                    HostError::UnbracketedIpv6
                });
            }
            (parse_host(host)?, port)
        };
        Ok(Authority { host, port: parse_port(port)? })
    }
}

/// The authority of an absolute-form `http://` target as the request line spells it (`host` or
/// `host:port`, port 80 when omitted), with the strict grammar of CONNECT targets; userinfo is
/// refused.
pub fn http_authority(text: &str) -> Result<Authority, HostError> {
    if text.contains('@') {
        return Err(HostError::Userinfo);
    }
    let has_port = text.rsplit_once(':').is_some_and(|(h, p)| !p.is_empty() && !h.ends_with('[') && !p.contains(']'));
    if has_port {
        text.parse()
    } else {
        format!("{text}:80").parse()
    }
}

/// A request's target as a user writes it for `explain`: `host:port` (a CONNECT target) or
/// `http://host[:port][/path]` (a plain-HTTP target, port 80 by default), with the grammar the
/// proxy applies to requests.
pub fn parse_target(target: &str) -> Result<Authority, HostError> {
    match target.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("http://") => {
            let rest = target.get(7..).unwrap_or_default();
            http_authority(rest.split(['/', '?', '#']).next().unwrap_or_default())
        }
        _ if target.contains("://") => Err(HostError::Scheme),
        _ => target.parse(),
    }
}

/// Parses a port strictly: 1..=65535, decimal digits only, no leading zero (Squid `parsePort`).
pub fn parse_port(s: &str) -> Result<u16, HostError> {
    if s.is_empty() {
        return Err(HostError::MissingPort);
    }
    if s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) || s.starts_with('0') {
        return Err(HostError::InvalidPort);
    }
    match s.parse::<u32>() {
        Ok(p @ 1..=65535) => u16::try_from(p).map_err(|_| HostError::InvalidPort),
        _ => Err(HostError::InvalidPort),
    }
}

/// Parses an unbracketed host: a canonical dotted-quad IPv4 address or a DNS name.
/// Hosts that look numeric (last label all digits, or `0x` hex) must be canonical
/// dotted quads, so `2130706433`, `0x7f.1`, `0177.0.0.1` and `127.1` never reach a resolver.
pub fn parse_host(s: &str) -> Result<Host, HostError> {
    if s.is_empty() {
        return Err(HostError::EmptyHost);
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_') {
        return Err(HostError::ForbiddenChar);
    }
    let trimmed = s.strip_suffix('.').unwrap_or(s);
    let last = trimmed.rsplit('.').next().unwrap_or(trimmed);
    if looks_numeric(last) {
        // A trailing dot is not part of a canonical address either.
        return match Ipv4Addr::from_str(s) {
            Ok(ip) if ip.to_string() == s => Ok(Host::Ip(IpAddr::V4(ip))),
            _ => Err(HostError::NonCanonicalIpv4),
        };
    }
    normalize_name(s).map(Host::Name)
}

fn looks_numeric(label: &str) -> bool {
    if label.is_empty() {
        return false;
    }
    if label.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let lower = label.to_ascii_lowercase();
    match lower.strip_prefix("0x") {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

/// Normalizes an ASCII DNS name: lower case, one trailing dot removed, labels checked,
/// and `xn--` labels required to be valid punycode.
pub fn normalize_name(s: &str) -> Result<HostName, HostError> {
    if !s.is_ascii() {
        return Err(HostError::ForbiddenChar);
    }
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() {
        return Err(HostError::EmptyHost);
    }
    if s.len() > MAX_NAME_LEN {
        return Err(HostError::NameTooLong);
    }
    let lower = s.to_ascii_lowercase();
    for label in lower.split('.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(HostError::LabelTooLong);
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(HostError::ForbiddenChar);
        }
        if let Some(puny) = label.strip_prefix("xn--") {
            match idna::punycode::decode_to_string(puny) {
                Some(u) if !u.is_empty() => {}
                _ => return Err(HostError::InvalidPunycode),
            }
        }
    }
    Ok(HostName(lower))
}

/// Converts a name written in a policy (possibly Unicode) to its normalized A-label form.
pub fn name_from_policy(s: &str) -> Result<HostName, HostError> {
    let trimmed = s.strip_suffix('.').unwrap_or(s);
    if trimmed.parse::<IpAddr>().is_ok() {
        return Err(HostError::AddressNotName);
    }
    let ascii =
        if s.is_ascii() { s.to_owned() } else { idna::domain_to_ascii(s).map_err(|_| HostError::InvalidPunycode)? };
    let last = ascii.strip_suffix('.').unwrap_or(&ascii);
    let last = last.rsplit('.').next().unwrap_or(last);
    if looks_numeric(last) {
        return Err(HostError::AddressNotName);
    }
    normalize_name(&ascii)
}

/// A host pattern in a policy rule: an exact name, or `*.suffix` matching any name
/// below `suffix` (at any depth) but not `suffix` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Matches exactly this name.
    Exact(HostName),
    /// Matches names ending in `.` + this suffix.
    Wildcard(HostName),
}

/// Why a host pattern was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("wildcard must be the leftmost label, written as \"*.\" followed by a name")]
    MisplacedWildcard,
    #[error("a lone \"*\" is not allowed; use policy.defaultAction")]
    BareWildcard,
    #[error("use cidrs for addresses, hosts holds names")]
    Address,
    #[error("{0}")]
    Name(HostError),
}

impl FromStr for HostPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, PatternError> {
        if s == "*" || s == "*." {
            return Err(PatternError::BareWildcard);
        }
        let (wild, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        if rest.contains('*') {
            return Err(PatternError::MisplacedWildcard);
        }
        let name = name_from_policy(rest).map_err(|e| match e {
            HostError::AddressNotName => PatternError::Address,
            e => PatternError::Name(e),
        })?;
        Ok(if wild { HostPattern::Wildcard(name) } else { HostPattern::Exact(name) })
    }
}

impl HostPattern {
    /// Whether `name` (already normalized) matches this pattern.
    pub fn matches(&self, name: &HostName) -> bool {
        match self {
            HostPattern::Exact(n) => n == name,
            HostPattern::Wildcard(suffix) => {
                let name = name.as_str();
                let suffix = suffix.as_str();
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix)
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(n) => write!(f, "{n}"),
            HostPattern::Wildcard(n) => write!(f, "*.{n}"),
        }
    }
}

#[cfg(test)]
mod tests;
