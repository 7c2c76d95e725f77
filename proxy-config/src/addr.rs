//! Address classification for SSRF protection (ARCHITECTURE §5): which target addresses are
//! not globally routable, after unwrapping the IPv6 forms that embed an IPv4 address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is not a public destination. The names are stable: they appear in logs and
/// `explain` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialRange {
    Unspecified,
    Loopback,
    Private,
    LinkLocal,
    SharedCgnat,
    Multicast,
    Broadcast,
    Documentation,
    Benchmarking,
    Reserved,
    UniqueLocal,
    /// Any other range that is not global unicast (IETF protocol assignments, discard-only,
    /// site-local, outside 2000::/3, ...).
    NotGlobal,
}

impl SpecialRange {
    /// A short, stable name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SpecialRange::Unspecified => "unspecified",
            SpecialRange::Loopback => "loopback",
            SpecialRange::Private => "private",
            SpecialRange::LinkLocal => "link-local",
            SpecialRange::SharedCgnat => "shared-cgnat",
            SpecialRange::Multicast => "multicast",
            SpecialRange::Broadcast => "broadcast",
            SpecialRange::Documentation => "documentation",
            SpecialRange::Benchmarking => "benchmarking",
            SpecialRange::Reserved => "reserved",
            SpecialRange::UniqueLocal => "unique-local",
            SpecialRange::NotGlobal => "not-global",
        }
    }
}

/// Returns the special range `ip` falls in, or `None` when it is a public unicast address.
/// IPv6 addresses that embed IPv4 (mapped, compatible, NAT64, 6to4, Teredo) are judged by
/// the embedded address(es), so `::ffff:127.0.0.1` is loopback.
pub fn classify(ip: IpAddr) -> Option<SpecialRange> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<SpecialRange> {
    let o = ip.octets();
    let r = match o {
        [0, 0, 0, 0] => SpecialRange::Unspecified,
        [0, ..] => SpecialRange::NotGlobal, // "this network", RFC 791
        [127, ..] => SpecialRange::Loopback,
        [10, ..] => SpecialRange::Private,
        [172, b, ..] if (16..=31).contains(&b) => SpecialRange::Private,
        [192, 168, ..] => SpecialRange::Private,
        [169, 254, ..] => SpecialRange::LinkLocal,
        [100, b, ..] if (64..=127).contains(&b) => SpecialRange::SharedCgnat,
        [192, 0, 0, _] => SpecialRange::NotGlobal, // IETF protocol assignments, RFC 6890
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => SpecialRange::Documentation,
        [192, 88, 99, _] => SpecialRange::NotGlobal, // deprecated 6to4 relay anycast
        [198, b, ..] if b == 18 || b == 19 => SpecialRange::Benchmarking,
        [255, 255, 255, 255] => SpecialRange::Broadcast,
        [a, ..] if (224..=239).contains(&a) => SpecialRange::Multicast,
        [a, ..] if a >= 240 => SpecialRange::Reserved,
        _ => return None,
    };
    Some(r)
}

fn classify_v6(ip: Ipv6Addr) -> Option<SpecialRange> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some(SpecialRange::Unspecified);
    }
    if ip.is_loopback() {
        return Some(SpecialRange::Loopback);
    }
    // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (deprecated compatible).
    if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
        return classify_v4(embedded_v4(s[6], s[7]));
    }
    // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052).
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify_v4(embedded_v4(s[6], s[7]));
    }
    // Local-use NAT64 64:ff9b:1::/48 (RFC 8215) translates to anything, including private space.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return Some(SpecialRange::NotGlobal);
    }
    // 6to4 2002::/16 (RFC 3056): the IPv4 address is in bits 16..48.
    if s[0] == 0x2002 {
        return classify_v4(embedded_v4(s[1], s[2]));
    }
    // Teredo 2001::/32 (RFC 4380): server IPv4 in bits 32..64, client IPv4 inverted in the last 32.
    if s[0] == 0x2001 && s[1] == 0 {
        let server = embedded_v4(s[2], s[3]);
        let client = embedded_v4(!s[6], !s[7]);
        return classify_v4(server).or_else(|| classify_v4(client));
    }
    let r = match s[0] {
        0x2001 if s[1] == 0x0db8 => SpecialRange::Documentation,
        0x2001 if s[1] < 0x0200 => SpecialRange::NotGlobal, // IETF protocol assignments 2001::/23
        0x3fff if s[1] < 0x1000 => SpecialRange::Documentation, // 3fff::/20, RFC 9637
        0x0100 if s[1..4] == [0, 0, 0] => SpecialRange::NotGlobal, // discard-only 100::/64
        a if a & 0xfe00 == 0xfc00 => SpecialRange::UniqueLocal,
        a if a & 0xffc0 == 0xfe80 => SpecialRange::LinkLocal,
        a if a & 0xffc0 == 0xfec0 => SpecialRange::NotGlobal, // deprecated site-local
        a if a & 0xff00 == 0xff00 => SpecialRange::Multicast,
        0x5f00 => SpecialRange::NotGlobal,                    // SRv6 SIDs, RFC 9602
        a if a & 0xe000 != 0x2000 => SpecialRange::NotGlobal, // outside global unicast 2000::/3
        _ => return None,
    };
    Some(r)
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// The form used for CIDR comparisons: IPv4-mapped IPv6 becomes IPv4, so a rule for
/// `10.0.0.0/8` also covers `::ffff:10.0.0.1`.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[cfg(test)]
mod tests;
