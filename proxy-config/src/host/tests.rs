//! The request-target grammar (P-02…P-09, S-05) and host patterns.
use super::*;

fn auth(s: &str) -> Result<Authority, HostError> {
    s.parse()
}

#[test]
fn accepts_canonical_forms() {
    let a = auth("Allowed.TEST.:443").unwrap();
    assert_eq!(a.to_string(), "allowed.test:443");
    assert_eq!(auth("[2001:DB8::1]:443").unwrap().to_string(), "[2001:db8::1]:443");
    assert_eq!(auth("[::ffff:127.0.0.1]:443").unwrap().host, Host::Ip("::ffff:127.0.0.1".parse().unwrap()));
    assert_eq!(auth("127.0.0.1:22").unwrap().host, Host::Ip("127.0.0.1".parse().unwrap()));
    assert_eq!(auth("1password.test:443").unwrap().to_string(), "1password.test:443");
    assert_eq!(auth("xn--bcher-kva.test:443").unwrap(), auth("XN--BCHER-KVA.test:443").unwrap());
    assert_eq!(auth("a.test:65535").unwrap().port, 65535);
    assert_eq!(auth("a.test:1").unwrap().port, 1);
}

#[test]
fn p02_missing_or_empty_port() {
    assert_eq!(auth("example.com"), Err(HostError::MissingPort));
    assert_eq!(auth("example.com:"), Err(HostError::MissingPort));
    assert_eq!(auth(":443"), Err(HostError::EmptyHost));
}

#[test]
fn p03_strict_ports() {
    for t in [
        "host:0",
        "host:0443",
        "host:00443",
        "host:65536",
        "host:99999999999999999999",
        "host:-1",
        "host:+443",
        "host:0x1bb",
        "host:443 ",
        "host:https",
    ] {
        assert_eq!(auth(t), Err(HostError::InvalidPort), "{t}");
    }
    assert!(auth("host:443:443").is_err());
}

#[test]
fn p04_p09_metacharacters() {
    for t in [
        "user:pass@allowed.test:443",
        "allowed.test@evil.test:443",
        "allowed.test:443@evil.test:443",
        "user%40x@allowed.test:443",
        "allowed.test/x:443",
        "allowed.test?x:443",
        "allowed.test#x:443",
        "evil.test\\@allowed.test:443",
        "a.test,b.test:443",
        "http://allowed.test:443",
        "/",
        "*",
        "allo\0wed.test:443",
        "allowed.test\r:443",
        "allo wed.test:443",
        "allowed.test\t:443",
        "allowed.test\x7f:443",
        "allowed.test%00.evil:443",
        "%61llowed.test:443",
        "b\u{fc}cher.test:443",
        "allowed\u{ff0e}test:443",
    ] {
        assert!(auth(t).is_err(), "{t:?} must be rejected");
    }
}

#[test]
fn p05_ipv6_literals() {
    for t in [
        "2001:db8::1:443",
        "::1:443",
        "[::1:443",
        "::1]:443",
        "[[::1]]:443",
        "[127.0.0.1]:443",
        "[allowed.test]:443",
        "[v1.fe80::a]:443",
        "[fe80::1%25eth0]:443",
        "[fe80::1%eth0]:443",
        "[fe80::1%251]:443",
        "[::1]",
        "[::1]x:443",
    ] {
        assert!(auth(t).is_err(), "{t:?} must be rejected");
    }
}

#[test]
fn p06_names() {
    assert_eq!(auth("xn--:443"), Err(HostError::InvalidPunycode));
    assert_eq!(auth("allowed.test..:443"), Err(HostError::EmptyLabel));
    assert_eq!(auth(".allowed.test:443"), Err(HostError::EmptyLabel));
}

#[test]
fn p07_lengths() {
    let label64 = format!("{}.test:443", "a".repeat(64));
    assert_eq!(auth(&label64), Err(HostError::LabelTooLong));
    let long = format!("{}.test:443", vec!["a".repeat(50); 5].join("."));
    assert_eq!(auth(&long), Err(HostError::NameTooLong));
    let ok = format!("{}:443", vec!["a".repeat(63); 3].join("."));
    assert!(auth(&ok).is_ok());
}

#[test]
fn s05_odd_ipv4_spellings() {
    for t in [
        "2130706433:443",
        "0x7f000001:443",
        "0x7f.1:443",
        "127.1:443",
        "0177.0.0.1:443",
        "017700000001:443",
        "010.0.0.1:443",
        "127.0.0.1.:443",
        "1.2.3.4.5:443",
        "0x7f.0x0.0x0.0x1:443",
        "test.123:443",
    ] {
        assert_eq!(auth(t), Err(HostError::NonCanonicalIpv4), "{t}");
    }
}

#[test]
fn normalization_is_idempotent() {
    for t in ["Allowed.TEST.:443", "[2001:DB8::1]:443", "XN--BCHER-KVA.test:443", "10.1.2.3:8080"] {
        let once = auth(t).unwrap();
        assert_eq!(auth(&once.to_string()).unwrap(), once);
    }
}

#[test]
fn patterns() {
    let w: HostPattern = "*.Example.com.".parse().unwrap();
    let n = |s: &str| normalize_name(s).unwrap();
    assert!(w.matches(&n("a.example.com")));
    assert!(w.matches(&n("a.b.example.com")));
    assert!(!w.matches(&n("example.com")));
    assert!(!w.matches(&n("badexample.com")));
    let e: HostPattern = "api.github.com".parse().unwrap();
    assert!(e.matches(&n("API.GitHub.com.")));
    assert!(!e.matches(&n("x.api.github.com")));
    assert_eq!("*".parse::<HostPattern>(), Err(PatternError::BareWildcard));
    assert_eq!("a.*.test".parse::<HostPattern>(), Err(PatternError::MisplacedWildcard));
    assert_eq!("*a.test".parse::<HostPattern>(), Err(PatternError::MisplacedWildcard));
    assert_eq!("10.0.0.1".parse::<HostPattern>(), Err(PatternError::Address));
    assert!("a b.test".parse::<HostPattern>().is_err());
    // Policies may be written in Unicode; they are stored as A-labels.
    assert_eq!("bücher.test".parse::<HostPattern>().unwrap().to_string(), "xn--bcher-kva.test");
}
