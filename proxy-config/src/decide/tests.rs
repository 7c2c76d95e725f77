//! The pipeline's stages: by name, literal, resolved, the proxy's own endpoints, dry run.
use std::net::IpAddr;

use super::*;
use crate::config::ProxyConfig;
use crate::host::parse_target;

fn config(rules: &str) -> ProxyConfig {
    let doc = format!(
        "version: 1\nlisteners: [{{name: f, bind: '0.0.0.0:3128'}}]\nadmin: {{bind: '127.0.0.1:9090'}}\n\
         policy:\n  defaultAction: deny\n  rules:\n{rules}"
    );
    ProxyConfig::from_yaml(&doc).unwrap_or_else(|e| panic!("{e}"))
}

const RULES: &str = r#"
    - {name: block-ads, action: deny, hosts: ["ads.example.com"]}
    - {name: api, action: allow, hosts: ["api.example.com"], ports: [443]}
    - {name: lan, action: allow, cidrs: ["10.1.0.0/16"], ports: [80, 3128]}
    - {name: try-cdn, action: allow, hosts: ["cdn.example.com"], dryRun: true}
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn run(
    cfg: &ProxyConfig,
    target: &str,
    resolved: &[&str],
) -> Result<(String, &'static str, bool, Option<String>), NeedsResolution> {
    let target = parse_target(target).unwrap();
    let req = Request { client: ip("10.9.0.5"), user: None, target: &target };
    let own = OwnEndpoints::of(cfg, vec![ip("10.1.0.7")]);
    let resolved: Vec<IpAddr> = resolved.iter().map(|s| ip(s)).collect();
    let j = req.judge_given(&cfg.policy, &resolved, |a, p| own.contains(a, p))?;
    let verdict = match j.verdict {
        Verdict::Allow { .. } => "allow",
        Verdict::Deny { .. } => "deny",
        Verdict::SelfConnect => "self",
    };
    Ok((j.verdict.rule_name(&cfg.policy).to_owned(), verdict, j.by_name, j.dry_run.map(|d| d.rule().to_owned())))
}

#[test]
fn a_denied_name_is_decided_without_addresses_and_an_allowed_one_needs_them() {
    let cfg = config(RULES);
    assert_eq!(run(&cfg, "ads.example.com:443", &[]), Ok(("block-ads".into(), "deny", true, None)));
    // Nothing could allow this name: the default denies it before any DNS query.
    assert_eq!(run(&cfg, "other.example.com:443", &[]), Ok(("default".into(), "deny", true, None)));
    assert_eq!(run(&cfg, "api.example.com:443", &[]), Err(NeedsResolution));
    assert_eq!(run(&cfg, "api.example.com:443", &["93.184.216.34"]), Ok(("api".into(), "allow", false, None)));
    // A name that resolves into refused space is not opened by a rule that allows the name.
    assert_eq!(run(&cfg, "api.example.com:443", &["127.0.0.1"]), Ok(("default".into(), "deny", false, None)));
}

#[test]
fn the_proxys_own_endpoints_are_refused_even_when_a_rule_allows_them() {
    let cfg = config(RULES);
    assert_eq!(run(&cfg, "10.1.0.8:3128", &[]), Ok(("lan".into(), "allow", false, None)));
    // 10.1.0.7 is this host: its 3128 is the proxy's listener (bound to 0.0.0.0).
    assert_eq!(run(&cfg, "10.1.0.7:3128", &[]), Ok(("self".into(), "self", false, None)));
    assert_eq!(run(&cfg, "10.1.0.7:80", &[]), Ok(("lan".into(), "allow", false, None)));
    assert_eq!(run(&cfg, "http://10.1.0.7:3128/x", &[]), Ok(("self".into(), "self", false, None)));
}

#[test]
fn dry_run_rules_are_reported_beside_the_enforced_decision() {
    let cfg = config(RULES);
    // The name alone is denied by default; the dry-run allow names it.
    assert_eq!(run(&cfg, "cdn.example.com:443", &[]), Ok(("default".into(), "deny", true, Some("try-cdn".into()))));
}

#[test]
fn one_target_grammar_for_connect_and_http_targets() {
    let a = |s: &str| parse_target(s).map(|a| a.to_string());
    assert_eq!(a("example.com:443"), Ok("example.com:443".into()));
    assert_eq!(a("http://example.com/path?q"), Ok("example.com:80".into()));
    assert_eq!(a("HTTP://Example.com:8080"), Ok("example.com:8080".into()));
    assert_eq!(a("http://[::1]/"), Ok("[::1]:80".into()));
    assert_eq!(a("http://[::1]:81/"), Ok("[::1]:81".into()));
    assert_eq!(a("https://example.com/"), Err(crate::host::HostError::Scheme));
    assert_eq!(a("http://user@example.com/"), Err(crate::host::HostError::Userinfo));
    assert_eq!(a("http://0x7f.1/"), Err(crate::host::HostError::NonCanonicalIpv4));
    assert_eq!(a("example.com"), Err(crate::host::HostError::MissingPort));
}
