//! Address classification for SSRF protection: which target addresses are refused by default
//! (not globally routable, or a cloud metadata service), after unwrapping the IPv6 forms that embed
//! an IPv4 address; and which rule CIDRs may open them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why an address is not a public destination. The names are stable: they appear in logs and
/// `explain` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialRange {
    /// A cloud provider's instance metadata or host service (credentials live there).
    Metadata,
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
    /// Inside `policy.clusterNetworks`: the cluster's own nodes, pods, Services or API server,
    /// which may use any address (global IPv6, public IPv4 ranges used internally).
    ClusterNetwork,
}

impl SpecialRange {
    /// A short, stable name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SpecialRange::Metadata => "metadata",
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
            SpecialRange::ClusterNetwork => "cluster-network",
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

/// Instance metadata and host services of the clouds Kubernetes runs on. They open only to a rule
/// CIDR that names them exactly, never to a broader private range.
pub const METADATA_V4: [Ipv4Addr; 6] = [
    Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle, ...
    Ipv4Addr::new(169, 254, 170, 2),   // AWS ECS task credentials
    Ipv4Addr::new(169, 254, 170, 23),  // AWS EKS Pod Identity agent
    Ipv4Addr::new(169, 254, 0, 23),    // Tencent Cloud
    Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
    Ipv4Addr::new(168, 63, 129, 16),   // Azure WireServer (a public address, reachable only from VMs)
];

/// IPv6 metadata endpoints (AWS Nitro IMDS and EKS Pod Identity).
pub const METADATA_V6: [Ipv6Addr; 2] =
    [Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254), Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)];

fn classify_v4(ip: Ipv4Addr) -> Option<SpecialRange> {
    if METADATA_V4.contains(&ip) {
        return Some(SpecialRange::Metadata);
    }
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
    if METADATA_V6.contains(&ip) {
        return Some(SpecialRange::Metadata);
    }
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

/// `ip` in its canonical form, then every IPv4 address its IPv6 form embeds and reaches through a
/// translator or tunnel: IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96` (RFC 6052; in an
/// IPv6-only cluster with DNS64 every IPv4-only name resolves to that form), 6to4 `2002::/16`, and
/// both Teredo addresses. What refuses an address (deny rules, the cluster's networks) refuses all of
/// them; what opens one (allow rules) keeps requiring the form it names.
pub fn embedded_forms(ip: IpAddr) -> impl Iterator<Item = IpAddr> {
    let ip = canonical(ip);
    let mut embedded: [Option<Ipv4Addr>; 2] = [None, None];
    if let IpAddr::V6(v6) = ip {
        let s = v6.segments();
        let compatible = !v6.is_unspecified() && !v6.is_loopback() && s[..6] == [0; 6];
        if compatible || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
            embedded[0] = Some(embedded_v4(s[6], s[7]));
        } else if s[0] == 0x2002 {
            embedded[0] = Some(embedded_v4(s[1], s[2]));
        } else if s[0] == 0x2001 && s[1] == 0 {
            embedded = [Some(embedded_v4(s[2], s[3])), Some(embedded_v4(!s[6], !s[7]))];
        }
    }
    std::iter::once(ip).chain(embedded.into_iter().flatten().map(IpAddr::V4))
}

/// Whether an allow rule's CIDR `net`, which contains a refused address of class `range`, opens
/// that address. A CIDR that contains any public address (`0.0.0.0/0`, `::/0`, `8.0.0.0/5`) never
/// does: that is how people write "the internet". Metadata, loopback and unspecified addresses
/// (0.0.0.0 connects to the local host) open only to a CIDR that names exactly one address;
/// every other refused address to a CIDR that lies entirely inside refused space (`10.20.0.0/16`).
pub fn opens(net: &IpNet, range: SpecialRange) -> bool {
    match range {
        SpecialRange::Metadata | SpecialRange::Loopback | SpecialRange::Unspecified => {
            net.prefix_len() == net.max_prefix_len()
        }
        _ => entirely_refused(net),
    }
}

/// Whether every address of `net` is refused by default (per [`classify`]).
pub fn entirely_refused(net: &IpNet) -> bool {
    if net.prefix_len() == net.max_prefix_len() {
        return classify(net.addr()).is_some();
    }
    covered(net, refused_blocks())
}

/// Whether `net` holds refused addresses and public ones together: such a CIDR in an allow rule
/// opens only its public part, which `check` points out.
pub fn mixes_public_and_refused(net: &IpNet) -> bool {
    !entirely_refused(net) && refused_blocks().iter().any(|b| net.contains(b) || b.contains(net))
}

/// The refused metadata addresses inside `net` that it does not name exactly.
pub fn metadata_in(net: &IpNet) -> Vec<IpAddr> {
    if net.prefix_len() == net.max_prefix_len() {
        return Vec::new();
    }
    let v4 = METADATA_V4.iter().map(|a| IpAddr::V4(*a));
    let v6 = METADATA_V6.iter().map(|a| IpAddr::V6(*a));
    v4.chain(v6).filter(|a| net.contains(a)).collect()
}

/// Whether the union of `blocks` covers `net`. CIDRs either nest or are disjoint, so `net` is
/// covered when one block holds it, or when both its halves are covered; a half that holds no
/// block at all is not. The recursion only descends towards blocks inside `net`, so it is bounded
/// by their number times the prefix length.
fn covered(net: &IpNet, blocks: &[IpNet]) -> bool {
    if blocks.iter().any(|b| b.contains(net)) {
        return true;
    }
    if net.prefix_len() == net.max_prefix_len() || !blocks.iter().any(|b| net.contains(b)) {
        return false;
    }
    match net.subnets(net.prefix_len() + 1) {
        Ok(halves) => halves.into_iter().all(|h| covered(&h, blocks)),
        Err(_) => false,
    }
}

/// Refused space as CIDR blocks (every address in each block is refused by [`classify`]; a unit
/// test checks that). Blocks only ever narrow what a rule can open: space missing here is refused
/// all the same, it just cannot be opened by a CIDR wider than one address.
fn refused_blocks() -> &'static [IpNet] {
    static BLOCKS: OnceLock<Vec<IpNet>> = OnceLock::new();
    BLOCKS.get_or_init(|| {
        let v4: Vec<Ipv4Net> = [
            "0.0.0.0/8",
            "10.0.0.0/8",
            "100.64.0.0/10",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "172.16.0.0/12",
            "192.0.0.0/24",
            "192.0.2.0/24",
            "192.88.99.0/24",
            "192.168.0.0/16",
            "198.18.0.0/15",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "224.0.0.0/3",
        ]
        .iter()
        .filter_map(|s| s.parse().ok())
        .chain(METADATA_V4.iter().filter_map(|a| Ipv4Net::new(*a, 32).ok()))
        .collect();
        let mut out: Vec<IpNet> = v4.iter().map(|n| IpNet::V4(*n)).collect();
        // Native IPv6 special space, and everything outside 2000::/3 that embeds no IPv4 address
        // (4000::/2, 8000::/1; 0::/3 holds the mapped, compatible and NAT64 forms).
        for s in [
            "::/128",
            "::1/128",
            "100::/64",
            "64:ff9b:1::/48",
            "2001:db8::/32",
            "2001:1::/32",
            "2001:2::/31",
            "2001:4::/30",
            "2001:8::/29",
            "2001:10::/28",
            "2001:20::/27",
            "2001:40::/26",
            "2001:80::/25",
            "2001:100::/24",
            "3fff::/20",
            "5f00::/16",
            "4000::/2",
            "8000::/1",
        ] {
            if let Ok(n) = s.parse::<Ipv6Net>() {
                out.push(IpNet::V6(n));
            }
        }
        out.extend(METADATA_V6.iter().filter_map(|a| Ipv6Net::new(*a, 128).ok()).map(IpNet::V6));
        // The IPv6 forms that embed a refused IPv4 block: mapped ::ffff:0:0/96, compatible ::/96,
        // NAT64 64:ff9b::/96 (IPv4 in the last 32 bits), 6to4 2002::/16 (bits 16..48), Teredo
        // 2001::/32 (server in bits 32..64).
        for n in &v4 {
            let bits = u128::from(u32::from(n.network()));
            let len = n.prefix_len();
            for (prefix, shift, base_len) in [
                (0xffff_u128 << 32, 0, 96),
                (0, 0, 96),
                (0x0064_ff9b_u128 << 96, 0, 96),
                (0x2002_u128 << 112, 80, 16),
                (0x2001_0000_u128 << 96, 64, 32),
            ] {
                if let Ok(net) = Ipv6Net::new(Ipv6Addr::from(prefix | (bits << shift)), base_len + len) {
                    out.push(IpNet::V6(net));
                }
            }
        }
        out
    })
}

/// Whether `ip:port` reaches one of `endpoints`. A listener bound to 0.0.0.0 or :: is reached on
/// every address of the host: loopback, unspecified, and each of `host_addrs` (all interfaces);
/// the unspecified address itself is this host on every port.
pub fn is_own_endpoint(endpoints: &[std::net::SocketAddr], host_addrs: &[IpAddr], ip: IpAddr, port: u16) -> bool {
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

#[cfg(test)]
mod tests;
