//! Classification tables (SECURITY-CASES S-03, S-04).
use super::*;

fn c(s: &str) -> Option<SpecialRange> {
    classify(s.parse().unwrap())
}

#[test]
fn s03_special_ranges_denied() {
    for a in [
        "10.0.0.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.0.1",
        "100.64.0.1",
        "100.127.255.254",
        "169.254.1.1",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "198.18.0.1",
        "192.0.0.1",
        "fc00::1",
        "fe80::1",
        "ff02::2",
        "127.0.0.1",
        "127.255.255.254",
        "0.0.0.0",
        "::",
        "::1",
        "169.254.169.254",
        "169.254.170.2",
        "100.100.100.200",
        "fd00:ec2::254",
        "192.0.2.1",
        "2001:db8::1",
        "0.1.2.3",
        "3fff::1",
        "fec0::1",
        "100::1",
        "2001:2::1",
        "::2",
    ] {
        assert!(c(a).is_some(), "{a} must be special");
    }
}

#[test]
fn s03_boundaries_and_public() {
    for a in [
        "100.63.255.254",
        "100.128.0.1",
        "8.8.8.8",
        "1.1.1.1",
        "172.32.0.1",
        "172.15.255.255",
        "2606:4700::1111",
        "2a00:1450::1",
        "::ffff:8.8.8.8",
    ] {
        assert_eq!(c(a), None, "{a} must be public");
    }
}

#[test]
fn s04_embedded_ipv4_unwrapped() {
    assert_eq!(c("::ffff:10.0.0.1"), Some(SpecialRange::Private));
    assert_eq!(c("::ffff:a00:1"), Some(SpecialRange::Private));
    assert_eq!(c("::ffff:127.0.0.1"), Some(SpecialRange::Loopback));
    assert_eq!(c("::ffff:169.254.169.254"), Some(SpecialRange::Metadata));
    assert_eq!(c("::127.0.0.1"), Some(SpecialRange::Loopback));
    assert_eq!(c("64:ff9b::a00:1"), Some(SpecialRange::Private));
    assert_eq!(c("2002:a00:1::1"), Some(SpecialRange::Private));
    assert!(c("2001:0:4136:e378:8000:63bf:3fff:fdd2").is_some());
    assert!(c("64:ff9b:1::1").is_some());
    assert_eq!(c("64:ff9b::808:808"), None);
}

#[test]
fn every_refused_block_is_refused_throughout() {
    // Blocks decide what a CIDR may open, so a block with a public address in it would let a rule
    // open refused space through a CIDR that also holds public space. Check the first and last
    // address and a spread of others in every block.
    for b in refused_blocks() {
        let (first, last) = (b.network(), b.broadcast());
        let mut samples = vec![first, last];
        let (lo, hi): (u128, u128) = match (first, last) {
            (IpAddr::V4(a), IpAddr::V4(z)) => (u32::from(a).into(), u32::from(z).into()),
            (IpAddr::V6(a), IpAddr::V6(z)) => (a.into(), z.into()),
            _ => unreachable!(),
        };
        let span = hi - lo;
        for k in 1..64u128 {
            let x = lo + span / 64 * k + (k * 0x9e37_79b9) % (span / 64 + 1);
            samples.push(match first {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(x).unwrap())),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(x)),
            });
        }
        for a in samples {
            assert!(classify(a).is_some(), "{a} in block {b} is public");
        }
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn cidrs_with_public_space_never_open_refused_addresses() {
    for broad in ["0.0.0.0/0", "0.0.0.0/1", "8.0.0.0/5", "::/0", "2000::/3", "64:ff9b::/96", "169.254.0.0/15"] {
        assert!(!entirely_refused(&net(broad)), "{broad}");
        assert!(mixes_public_and_refused(&net(broad)), "{broad}");
        for range in [SpecialRange::Private, SpecialRange::LinkLocal, SpecialRange::Metadata, SpecialRange::Loopback] {
            assert!(!opens(&net(broad), range), "{broad} opens {range:?}");
        }
    }
    assert!(!mixes_public_and_refused(&net("8.8.8.0/24")));
}

#[test]
fn cidrs_inside_refused_space_open_it_but_metadata_and_loopback_need_an_exact_address() {
    for inside in [
        "10.20.0.0/16",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "fd00:20::/64",
        "fc00::/7",
        "64:ff9b::a00:0/104",
        "100.64.0.0/10",
    ] {
        assert!(entirely_refused(&net(inside)), "{inside}");
        assert!(opens(&net(inside), SpecialRange::Private), "{inside}");
    }
    // Unions of adjacent blocks count as inside: 224/4 (multicast) + 240/4 (reserved).
    assert!(entirely_refused(&net("224.0.0.0/3")));
    assert!(!opens(&net("169.254.0.0/16"), SpecialRange::Metadata));
    assert!(opens(&net("169.254.169.254/32"), SpecialRange::Metadata));
    assert!(opens(&net("fd00:ec2::254/128"), SpecialRange::Metadata));
    assert!(!opens(&net("fd00::/8"), SpecialRange::Metadata));
    assert!(!opens(&net("127.0.0.0/8"), SpecialRange::Loopback));
    assert!(opens(&net("127.0.0.1/32"), SpecialRange::Loopback));
    assert_eq!(metadata_in(&net("169.254.0.0/16")).len(), 4);
    assert!(metadata_in(&net("169.254.169.254/32")).is_empty());
}

#[test]
fn metadata_addresses_in_every_form() {
    for a in [
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "fd00:ec2::254",
        "100.100.100.200",
        "168.63.129.16",
    ] {
        assert_eq!(c(a), Some(SpecialRange::Metadata), "{a}");
    }
}
