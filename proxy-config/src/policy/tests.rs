//! Policy evaluation: matching, deny over allow, private addresses, strictest limits.
use std::net::IpAddr;
use std::time::Duration;

use crate::config::ProxyConfig;
use crate::host::Authority;

use super::*;
use crate::host::Host;

fn policy(rules_yaml: &str, default: &str) -> Policy {
    let doc = format!(
        "version: 1\nlisteners: [{{name: f, bind: '127.0.0.1:0'}}]\nrelay: {{idleTimeout: 5m, maxLifetime: 24h}}\npolicy:\n  defaultAction: {default}\n  rules:\n{rules_yaml}"
    );
    ProxyConfig::from_yaml(&doc).unwrap_or_else(|e| panic!("{e}")).policy
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn decide(p: &Policy, client: &str, target: &str, addrs: &[&str]) -> Decision {
    let a: Authority = target.parse().unwrap();
    let addrs: Vec<IpAddr> = addrs.iter().map(|s| ip(s)).collect();
    p.decide(ip(client), &a.host, a.port, &addrs)
}

fn allowed_by(d: &Decision, p: &Policy) -> Option<String> {
    match d {
        Decision::Allow { rule, .. } => Some(p.rule_name(*rule).to_owned()),
        Decision::Deny { .. } => None,
    }
}

const RULES: &str = r#"
    - name: gh
      action: allow
      clients: ["10.244.1.0/24"]
      hosts: ["api.github.com", "*.githubusercontent.com"]
      ports: [443]
    - name: rust
      action: allow
      hostRegex: "(.+\\.)?rust-lang\\.org"
      ports: ["8000-8099", 443]
    - name: block-evil
      action: deny
      hosts: ["*.evil.test", "evil.test"]
    - name: nets
      action: allow
      cidrs: ["203.0.113.0/24", "10.9.0.0/16"]
      ports: [5432]
"#;

#[test]
fn allow_rule_matches_client_host_and_port() {
    let p = policy(RULES, "deny");
    let d = decide(&p, "10.244.1.17", "api.github.com:443", &["140.82.112.5"]);
    assert_eq!(allowed_by(&d, &p).as_deref(), Some("gh"));
    let d = decide(&p, "10.244.1.17", "raw.githubusercontent.com:443", &["185.199.108.133"]);
    assert_eq!(allowed_by(&d, &p).as_deref(), Some("gh"));
    // other client, other port, apex of a wildcard: default deny
    for (client, target) in [
        ("10.244.2.1", "api.github.com:443"),
        ("10.244.1.17", "api.github.com:22"),
        ("10.244.1.17", "githubusercontent.com:443"),
    ] {
        let d = decide(&p, client, target, &["140.82.112.5"]);
        assert_eq!(d, Decision::Deny { rule: None, reason: DenyReason::Default }, "{client} {target}");
    }
}

#[test]
fn regex_is_whole_name_and_port_ranges_work() {
    let p = policy(RULES, "deny");
    assert!(allowed_by(&decide(&p, "1.2.3.4", "static.rust-lang.org:8080", &["151.101.1.1"]), &p).is_some());
    assert!(allowed_by(&decide(&p, "1.2.3.4", "rust-lang.org:443", &["151.101.1.1"]), &p).is_some());
    assert!(allowed_by(&decide(&p, "1.2.3.4", "rust-lang.org.evil.com:443", &["151.101.1.1"]), &p).is_none());
    assert!(allowed_by(&decide(&p, "1.2.3.4", "rust-lang.org:8100", &["151.101.1.1"]), &p).is_none());
}

#[test]
fn deny_overrides_allow_regardless_of_order() {
    let p = policy(
        "    - {name: d, action: deny, hosts: [\"x.test\"]}\n    - {name: a, action: allow, hosts: [\"x.test\"]}\n",
        "allow",
    );
    let q = policy(
        "    - {name: a, action: allow, hosts: [\"x.test\"]}\n    - {name: d, action: deny, hosts: [\"x.test\"]}\n",
        "allow",
    );
    for pol in [&p, &q] {
        let d = decide(pol, "1.2.3.4", "x.test:443", &["93.184.216.34"]);
        assert!(matches!(d, Decision::Deny { reason: DenyReason::Rule, .. }));
        assert_eq!(
            pol.pre_resolve(ip("1.2.3.4"), &crate::host::normalize_name("x.test").unwrap(), 443),
            PreDecision::Deny(d)
        );
    }
}

#[test]
fn p06_trailing_dot_and_case_cannot_bypass_deny() {
    let p = policy(RULES, "allow");
    for t in ["evil.test.:443", "EVIL.test:443", "a.Evil.TEST.:443"] {
        assert!(
            matches!(decide(&p, "1.2.3.4", t, &["93.184.216.34"]), Decision::Deny { reason: DenyReason::Rule, .. }),
            "{t}"
        );
    }
}

#[test]
fn cidr_rules_match_addresses_not_names() {
    let p = policy(RULES, "deny");
    assert_eq!(allowed_by(&decide(&p, "1.2.3.4", "db.example:5432", &["203.0.113.7"]), &p).as_deref(), Some("nets"));
    assert_eq!(allowed_by(&decide(&p, "1.2.3.4", "203.0.113.7:5432", &["203.0.113.7"]), &p).as_deref(), Some("nets"));
    // mapped form of an allowed address
    assert!(allowed_by(&decide(&p, "1.2.3.4", "[::ffff:203.0.113.7]:5432", &["::ffff:203.0.113.7"]), &p).is_some());
    // any address outside the allowed CIDR denies the whole request
    assert!(allowed_by(&decide(&p, "1.2.3.4", "db.example:5432", &["203.0.113.7", "198.51.100.1"]), &p).is_none());
}

#[test]
fn s09_port_policy() {
    let p = policy("    - {name: a, action: allow, hosts: [\"allowed.test\"], ports: [443]}\n", "deny");
    for port in [25, 22, 6379, 10250, 2379] {
        let d = decide(&p, "1.2.3.4", &format!("allowed.test:{port}"), &["93.184.216.34"]);
        assert_eq!(d, Decision::Deny { rule: None, reason: DenyReason::Default });
    }
}

#[test]
fn private_addresses_need_an_explicit_cidr() {
    let p = policy(RULES, "allow");
    let d = decide(&p, "1.2.3.4", "internal.attacker.test:443", &["10.0.0.5"]);
    assert!(matches!(d, Decision::Deny { reason: DenyReason::PrivateAddress { .. }, .. }));
    // fail closed on mixed answers
    let d = decide(&p, "1.2.3.4", "mixed.test:443", &["93.184.216.34", "127.0.0.1"]);
    assert!(matches!(d, Decision::Deny { reason: DenyReason::PrivateAddress { .. }, .. }));
    // 10.9.0.0/16 is listed by "nets", but only for port 5432
    assert!(allowed_by(&decide(&p, "1.2.3.4", "10.9.0.1:5432", &["10.9.0.1"]), &p).is_some());
    assert!(allowed_by(&decide(&p, "1.2.3.4", "10.9.0.1:443", &["10.9.0.1"]), &p).is_none());
    // a host rule allowing the name does not open a private address
    assert!(allowed_by(&decide(&p, "10.244.1.1", "api.github.com:443", &["10.0.0.1"]), &p).is_none());
}

#[test]
fn deny_private_false_allows_private_targets() {
    let doc = "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:0'}]\npolicy: {defaultAction: allow, denyPrivateAddresses: false}\n";
    let p = ProxyConfig::from_yaml(doc).unwrap().policy;
    assert!(allowed_by(&decide(&p, "1.2.3.4", "10.0.0.1:22", &["10.0.0.1"]), &p).is_some());
}

#[test]
fn pre_resolve_skips_dns_when_nothing_could_allow() {
    let p = policy(RULES, "deny");
    let n = |s: &str| crate::host::normalize_name(s).unwrap();
    assert!(matches!(p.pre_resolve(ip("1.2.3.4"), &n("nothing.test"), 443), PreDecision::Deny(_)));
    assert_eq!(p.pre_resolve(ip("10.244.1.5"), &n("api.github.com"), 443), PreDecision::Resolve);
    // a CIDR rule for port 5432 could allow any name on that port
    assert_eq!(p.pre_resolve(ip("1.2.3.4"), &n("nothing.test"), 5432), PreDecision::Resolve);
}

#[test]
fn strictest_limits_among_matching_allows() {
    let p = policy(
        r#"
    - {name: a, action: allow, hosts: ["x.test"], relay: {idleTimeout: 60s, maxBytesPerSecond: 1000, minBytesPerMinute: 10}}
    - {name: b, action: allow, hosts: ["*.test"], relay: {idleTimeout: 30s, maxTotalBytes: 5000, minBytesPerMinute: 20}}
    - {name: c, action: allow, hosts: ["y.test"], relay: {maxLifetime: 48h}}
"#,
        "deny",
    );
    match decide(&p, "1.2.3.4", "x.test:443", &["93.184.216.34"]) {
        Decision::Allow { rule, limits } => {
            assert_eq!(p.rule_name(rule), "a");
            assert_eq!(limits.idle_timeout, Duration::from_secs(30));
            assert_eq!(limits.max_lifetime, Duration::from_secs(86_400));
            assert_eq!(limits.max_bytes_per_second, Some(1000));
            assert_eq!(limits.min_bytes_per_minute, Some(20));
            assert_eq!(limits.max_total_bytes, Some(5000));
        }
        d => panic!("{d:?}"),
    }
    // a rule may loosen a default: it overrides field by field
    match decide(&p, "1.2.3.4", "y.test:443", &["93.184.216.34"]) {
        Decision::Allow { limits, .. } => {
            assert_eq!(limits.max_lifetime, Duration::from_secs(48 * 3600))
        }
        d => panic!("{d:?}"),
    }
}

const ANYWHERE: &str = r#"
    - name: anyv4
      action: allow
      cidrs: ["0.0.0.0/0"]
    - name: anyv6
      action: allow
      cidrs: ["::/0"]
    - name: broad-halves
      action: allow
      cidrs: ["0.0.0.0/1", "8.0.0.0/5"]
"#;

fn private_denial(d: &Decision) -> Option<(SpecialRange, Option<usize>)> {
    match d {
        Decision::Deny { reason: DenyReason::PrivateAddress { range, not_opened_by }, rule: None } => {
            Some((*range, *not_opened_by))
        }
        _ => None,
    }
}

#[test]
fn a_catch_all_allow_never_opens_refused_addresses() {
    let p = policy(ANYWHERE, "deny");
    for (target, range) in [
        ("169.254.169.254:80", SpecialRange::Metadata),
        ("10.0.0.5:443", SpecialRange::Private),
        ("127.0.0.1:22", SpecialRange::Loopback),
        ("[fd00:ec2::254]:80", SpecialRange::Metadata),
        ("[::ffff:169.254.169.254]:80", SpecialRange::Metadata),
        ("[64:ff9b::a9fe:a9fe]:80", SpecialRange::Metadata),
        ("[64:ff9b::a00:5]:80", SpecialRange::Private),
        ("[::ffff:10.0.0.5]:80", SpecialRange::Private),
        ("[fd12::1]:80", SpecialRange::UniqueLocal),
        ("[::1]:22", SpecialRange::Loopback),
        ("100.100.100.200:80", SpecialRange::Metadata),
    ] {
        let a: Authority = target.parse().unwrap();
        let Host::Ip(addr) = a.host else { panic!("{target}") };
        let d = p.decide(ip("10.1.1.1"), &a.host, a.port, &[addr]);
        let (got, by) = private_denial(&d).unwrap_or_else(|| panic!("{target}: {d:?}"));
        assert_eq!(got, range, "{target}");
        assert!(by.is_some(), "{target}: explain must name the rule whose CIDR is not an opt-in");
    }
    // Public addresses are still allowed by the same rules.
    assert_eq!(
        allowed_by(&decide(&p, "10.1.1.1", "93.184.216.34:443", &["93.184.216.34"]), &p).as_deref(),
        Some("anyv4")
    );
    assert_eq!(
        allowed_by(&decide(&p, "10.1.1.1", "[2606:2800::1]:443", &["2606:2800::1"]), &p).as_deref(),
        Some("anyv6")
    );
    assert!(allowed_by(&decide(&p, "10.1.1.1", "9.9.9.9:53", &["9.9.9.9"]), &p).is_some());
    // A name that resolves to a metadata address through the catch-all: refused (fail closed).
    let d = decide(&p, "10.1.1.1", "metadata.attacker.test:80", &["93.184.216.34", "169.254.169.254"]);
    assert_eq!(private_denial(&d).map(|x| x.0), Some(SpecialRange::Metadata));
}

#[test]
fn refused_space_opens_only_to_cidrs_inside_it_and_metadata_only_when_named() {
    let rules = r#"
    - name: vpc
      action: allow
      cidrs: ["10.0.0.0/8", "fd00::/8"]
    - name: link-local
      action: allow
      cidrs: ["169.254.0.0/16"]
    - name: imds
      action: allow
      clients: ["10.244.9.9/32"]
      cidrs: ["169.254.169.254/32", "fd00:ec2::254/128"]
    - name: loopback-range
      action: allow
      cidrs: ["127.0.0.0/8"]
    - name: loopback-one
      action: allow
      cidrs: ["127.0.0.1/32"]
      ports: [8080]
"#;
    let p = policy(rules, "deny");
    assert_eq!(allowed_by(&decide(&p, "10.1.1.1", "10.20.3.4:5432", &["10.20.3.4"]), &p).as_deref(), Some("vpc"));
    assert_eq!(allowed_by(&decide(&p, "10.1.1.1", "[fd00:1::5]:80", &["fd00:1::5"]), &p).as_deref(), Some("vpc"));
    assert_eq!(
        allowed_by(&decide(&p, "10.1.1.1", "169.254.10.1:80", &["169.254.10.1"]), &p).as_deref(),
        Some("link-local")
    );
    // Metadata: not through the VPC's fd00::/8 nor the link-local /16; only the named /32 and /128,
    // for the one client that rule selects.
    for (target, addr) in [("169.254.169.254:80", "169.254.169.254"), ("[fd00:ec2::254]:80", "fd00:ec2::254")] {
        let d = decide(&p, "10.1.1.1", target, &[addr]);
        assert_eq!(private_denial(&d).map(|x| x.0), Some(SpecialRange::Metadata), "{target}");
        assert_eq!(allowed_by(&decide(&p, "10.244.9.9", target, &[addr]), &p).as_deref(), Some("imds"), "{target}");
    }
    // Loopback: only the exact address, and only on the rule's port.
    assert!(private_denial(&decide(&p, "10.1.1.1", "127.0.0.2:8080", &["127.0.0.2"])).is_some());
    assert!(private_denial(&decide(&p, "10.1.1.1", "127.0.0.1:22", &["127.0.0.1"])).is_some());
    assert_eq!(
        allowed_by(&decide(&p, "10.1.1.1", "127.0.0.1:8080", &["127.0.0.1"]), &p).as_deref(),
        Some("loopback-one")
    );
}

/// The precedence table of the platform tier (rules with `priority`) against ordinary rules.
#[test]
fn tier_precedence_table() {
    let rules = r#"
    - {name: cluster/deny-nodes, action: deny, priority: 100, cidrs: ["10.0.0.0/8"]}
    - {name: cluster/allow-db, action: allow, priority: 10, clients: ["10.244.1.0/24"], cidrs: ["10.1.2.3/32"]}
    - {name: cluster/allow-web, action: allow, priority: 100, hosts: [web.test]}
    - {name: cluster/deny-web-tie, action: deny, priority: 100, clients: ["10.244.9.0/24"], hosts: [web.test]}
    - {name: ns/allow-nodes, action: allow, clients: ["10.244.2.0/24"], cidrs: ["10.0.0.0/8"]}
    - {name: ns/deny-db, action: deny, clients: ["10.244.1.7/32"], cidrs: ["10.1.2.3/32"]}
"#;
    let p = policy(rules, "deny");
    let cases: &[(&str, &str, &str, Option<&str>, &str)] = &[
        // A better-priority tier allow outranks a tier deny, and opens the private address.
        ("10.244.1.5", "db.test:5432", "10.1.2.3", Some("cluster/allow-db"), "tier allow over tier deny"),
        // An ordinary deny still narrows a tier allow.
        ("10.244.1.7", "db.test:5432", "10.1.2.3", None, "ordinary deny narrows tier allow"),
        // A tier deny beats an ordinary allow.
        ("10.244.2.5", "node.test:22", "10.9.9.9", None, "tier deny over ordinary allow"),
        // Same priority: the deny wins.
        ("10.244.9.5", "web.test:443", "93.184.216.34", None, "deny wins a tie"),
        ("10.244.8.5", "web.test:443", "93.184.216.34", Some("cluster/allow-web"), "tier allow"),
        // Clients the better allow does not select stay under the tier deny.
        ("10.244.3.5", "db.test:5432", "10.1.2.3", None, "tier deny for others"),
    ];
    for (client, target, addr, want, why) in cases {
        let d = decide(&p, client, target, &[addr]);
        assert_eq!(allowed_by(&d, &p).as_deref(), *want, "{why}: {d:?}");
    }
    // Before DNS: a tier deny by name waits when a better tier allow could still match by CIDR.
    let name = crate::host::normalize_name("web.test").unwrap();
    assert!(matches!(p.pre_resolve(ip("10.244.9.5"), &name, 443), PreDecision::Deny(_)), "a tie is decided by name");
    let strict = policy("    - {name: d, action: deny, priority: 5, hosts: [web.test]}\n    - {name: a, action: allow, priority: 9, cidrs: ['0.0.0.0/0']}\n", "allow");
    assert!(matches!(strict.pre_resolve(ip("10.0.0.1"), &name, 443), PreDecision::Deny(_)));
    let outranked = policy("    - {name: d, action: deny, priority: 9, hosts: [web.test]}\n    - {name: a, action: allow, priority: 5, cidrs: ['0.0.0.0/0']}\n", "allow");
    assert_eq!(outranked.pre_resolve(ip("10.0.0.1"), &name, 443), PreDecision::Resolve);
    assert!(matches!(decide(&outranked, "10.0.0.1", "web.test:443", &["93.184.216.34"]), Decision::Allow { .. }));
}

/// The cluster's own networks are refused with their own reason whatever range they use (global
/// IPv6 pod and Service ranges, public IPv4 used internally), and open like private space.
#[test]
fn cluster_networks_are_refused_unless_a_contained_cidr_opens_them() {
    let doc = "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:0'}]\npolicy:\n  defaultAction: allow\n  clusterNetworks: ['2600:1f18:aaaa::/56', '100.96.0.0/12', '34.118.224.0/20', '192.0.2.7']\n  rules:\n    - {name: everything, action: allow, cidrs: ['0.0.0.0/0', '::/0']}\n    - {name: svc-db, action: allow, clients: ['10.0.0.9'], cidrs: ['34.118.230.0/24']}\n";
    let p = ProxyConfig::from_yaml(doc).unwrap().policy;
    for (target, addr) in
        [("pod.test:443", "2600:1f18:aaaa:1::5"), ("svc.test:443", "34.118.224.10"), ("node.test:22", "192.0.2.7")]
    {
        let d = decide(&p, "10.0.0.1", target, &[addr]);
        match d {
            Decision::Deny { reason, .. } => assert_eq!(reason.as_str(), "cluster_network", "{target}"),
            other => panic!("{target} {addr}: {other:?}"),
        }
    }
    // Outside them, the catch-all works; inside, a contained CIDR opens for its client only.
    assert!(matches!(decide(&p, "10.0.0.1", "example.test:443", &["34.118.240.1"]), Decision::Allow { .. }));
    assert_eq!(allowed_by(&decide(&p, "10.0.0.9", "db.test:5432", &["34.118.230.4"]), &p).as_deref(), Some("svc-db"));
    assert!(matches!(decide(&p, "10.0.0.1", "db.test:5432", &["34.118.230.4"]), Decision::Deny { .. }));
    // Refused even with denyPrivateAddresses off: they were listed on purpose.
    let off = ProxyConfig::from_yaml(
        &doc.replace("defaultAction: allow", "defaultAction: allow\n  denyPrivateAddresses: false"),
    )
    .unwrap()
    .policy;
    assert!(matches!(decide(&off, "10.0.0.1", "svc.test:443", &["34.118.224.10"]), Decision::Deny { .. }));
    assert!(ProxyConfig::from_yaml(&doc.replace("'192.0.2.7'", "'300.0.0.0/8'"))
        .unwrap_err()
        .to_string()
        .contains("policy.clusterNetworks[3]"));
}

/// Dry-run rules decide nothing; the verdict says what they would have changed.
#[test]
fn dry_run_rules_only_report_what_they_would_change() {
    let rules = r#"
    - {name: web, action: allow, clients: ["10.0.0.0/24"], hosts: [api.test]}
    - {name: ns/p-deny, action: deny, dryRun: true, clients: ["10.0.0.5/32"], hosts: [api.test]}
    - {name: ns/p-allow, action: allow, dryRun: true, clients: ["10.0.0.9/32"], hosts: [new.test]}
"#;
    let p = policy(rules, "deny");
    assert_eq!(p.rules.len(), 1, "dry-run rules are not enforced");
    let host = |n: &str| Host::Name(crate::host::normalize_name(n).unwrap());
    let a = [ip("93.184.216.34")];
    let run = |client: &str, name: &str| {
        let d = p.decide(ip(client), &host(name), 443, &a);
        let v = p.dry_run(ip(client), None, &host(name), 443, &a, &d);
        (matches!(d, Decision::Allow { .. }), v)
    };
    assert_eq!(run("10.0.0.5", "api.test"), (true, Some(DryRunVerdict::WouldDeny("ns/p-deny".into()))));
    assert_eq!(run("10.0.0.6", "api.test"), (true, None), "the dry-run deny does not select this client");
    assert_eq!(run("10.0.0.9", "new.test"), (false, Some(DryRunVerdict::WouldAllow("ns/p-allow".into()))));
    assert_eq!(run("10.0.0.8", "new.test"), (false, None));
    assert!(policy("    - {name: a, action: allow, hosts: [x.test]}\n", "deny").shadow.is_none());
}

#[test]
fn a_dry_run_allow_is_judged_when_the_name_alone_was_denied() {
    let p = policy("    - {name: ns/new, action: allow, dryRun: true, hosts: [new.test]}\n", "deny");
    let name = crate::host::normalize_name("new.test").unwrap();
    let PreDecision::Deny(d) = p.pre_resolve(ip("10.0.0.1"), &name, 443) else { panic!("denied without DNS") };
    assert_eq!(
        p.dry_run_by_name(ip("10.0.0.1"), None, &name, 443, &d),
        Some(DryRunVerdict::WouldAllow("ns/new".into()))
    );
    let other = crate::host::normalize_name("other.test").unwrap();
    assert_eq!(p.dry_run_by_name(ip("10.0.0.1"), None, &other, 443, &d), None);
}

/// The client index only skips rules that cannot match: every decision equals a scan of all rules,
/// over a mix of exact-address rules (as the operator renders), wide client networks, rules for
/// any client, denies, the platform tier and IPv4-mapped clients.
#[test]
fn client_index_decides_as_a_scan_of_every_rule() {
    let mut rules = String::new();
    for i in 0..40u32 {
        let clients = match i % 5 {
            0 => String::new(),
            1 => "      clients: [\"10.1.0.0/16\"]\n".to_owned(),
            _ => format!(
                "      clients: [\"10.1.{}.{}/32\", \"10.1.{}.{}\", \"fd00::{:x}/128\"]\n",
                i % 3,
                i % 7,
                i % 2,
                i % 11,
                i % 4
            ),
        };
        let action = if i % 6 == 0 { "deny" } else { "allow" };
        let priority = if i % 9 == 0 { format!("      priority: {}\n", i) } else { String::new() };
        rules.push_str(&format!(
            "    - name: r{i}\n      action: {action}\n{clients}{priority}      cidrs: [\"93.184.{}.0/24\"]\n      hosts: [\"h{}.test\"]\n",
            i % 4,
            i % 5
        ));
    }
    for default in ["allow", "deny"] {
        let indexed = policy(&rules, default);
        let mut scan = indexed.clone();
        scan.by_client = ClientIndex { exact: HashMap::new(), wide: (0..scan.rules.len()).collect() };
        let mut compared = 0;
        for c in 0..12 {
            for client in [
                format!("10.1.{}.{}", c % 3, c % 11),
                format!("::ffff:10.1.{}.{}", c % 2, c % 7),
                format!("fd00::{:x}", c % 4),
                "192.0.2.1".to_owned(),
            ] {
                for t in 0..5 {
                    for a in 0..5 {
                        let target = format!("h{t}.test:443");
                        let addr = format!("93.184.{a}.7");
                        assert_eq!(
                            decide(&indexed, &client, &target, &[&addr]),
                            decide(&scan, &client, &target, &[&addr]),
                            "{client} → {target} ({addr}), default {default}"
                        );
                        let Ok(Host::Name(name)) = crate::host::parse_host(&format!("h{t}.test")) else { panic!() };
                        assert_eq!(
                            indexed.pre_resolve(ip(&client), &name, 443),
                            scan.pre_resolve(ip(&client), &name, 443)
                        );
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, 12 * 4 * 25);
        assert!(indexed.by_client.exact.len() > 10 && indexed.by_client.wide.len() < indexed.rules.len());
    }
}

#[test]
fn deny_rules_and_cluster_networks_match_every_form_that_embeds_an_address() {
    // 203.0.113.7 written as NAT64 (what DNS64 answers for an IPv4-only name in an IPv6-only
    // cluster), 6to4, IPv4-compatible, mapped and Teredo (as the client inside).
    let forms = [
        "203.0.113.7",
        "64:ff9b::cb00:7107",
        "2002:cb00:7107::1",
        "::cb00:7107",
        "::ffff:203.0.113.7",
        "2001:0:4136:e378:8000:63bf:34ff:8ef8",
    ];
    let deny = policy(
        "    - {name: all, action: allow, cidrs: ['0.0.0.0/0', '::/0']}\n    - {name: no, action: deny, cidrs: ['203.0.113.0/24']}\n  denyPrivateAddresses: false\n",
        "deny",
    );
    for f in &forms[..5] {
        let d = decide(&deny, "10.0.0.1", &format!("[{f}]:443").replace("[203.0.113.7]", "203.0.113.7"), &[f]);
        assert!(matches!(d, Decision::Deny { reason: DenyReason::Rule, .. }), "{f}: {d:?}");
    }
    // The Teredo client address 203.0.113.7 is inverted in the last 32 bits.
    let teredo: std::net::Ipv6Addr = "2001:0:4136:e378:8000:63bf:34ff:8ef8".parse().unwrap();
    let s = teredo.segments();
    let client = std::net::Ipv4Addr::from(((u32::from(!s[6])) << 16) | u32::from(!s[7]));
    assert_eq!(client, std::net::Ipv4Addr::new(203, 0, 113, 7));
    let d = decide(&deny, "10.0.0.1", &format!("[{}]:443", forms[5]), &[forms[5]]);
    assert!(matches!(d, Decision::Deny { reason: DenyReason::Rule, .. }), "{d:?}");
    // An allow rule opens only the form it names.
    let allow =
        policy("    - {name: v4, action: allow, cidrs: ['203.0.113.0/24']}\n  denyPrivateAddresses: false\n", "deny");
    assert!(allowed_by(&decide(&allow, "10.0.0.1", "203.0.113.7:443", &["203.0.113.7"]), &allow).is_some());
    let d = decide(&allow, "10.0.0.1", "[64:ff9b::cb00:7107]:443", &["64:ff9b::cb00:7107"]);
    assert!(matches!(d, Decision::Deny { reason: DenyReason::Default, .. }), "{d:?}");
    // A cluster network (public addresses, as in EKS/GKE IPv6 or nodes with public IPs) refuses
    // its addresses in every form.
    let cluster = policy(
        "    - {name: all, action: allow, cidrs: ['0.0.0.0/0', '::/0']}\n  clusterNetworks: ['203.0.113.0/24']\n",
        "deny",
    );
    for f in ["203.0.113.7", "64:ff9b::cb00:7107", "2002:cb00:7107::1"] {
        let d = decide(&cluster, "10.0.0.1", &format!("[{f}]:443").replace("[203.0.113.7]", "203.0.113.7"), &[f]);
        assert!(
            matches!(
                d,
                Decision::Deny { reason: DenyReason::PrivateAddress { range: SpecialRange::ClusterNetwork, .. }, .. }
            ),
            "{f}: {d:?}"
        );
    }
}
