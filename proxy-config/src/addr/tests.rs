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
    assert_eq!(c("::ffff:169.254.169.254"), Some(SpecialRange::LinkLocal));
    assert_eq!(c("::127.0.0.1"), Some(SpecialRange::Loopback));
    assert_eq!(c("64:ff9b::a00:1"), Some(SpecialRange::Private));
    assert_eq!(c("2002:a00:1::1"), Some(SpecialRange::Private));
    assert!(c("2001:0:4136:e378:8000:63bf:3fff:fdd2").is_some());
    assert!(c("64:ff9b:1::1").is_some());
    assert_eq!(c("64:ff9b::808:808"), None);
}
