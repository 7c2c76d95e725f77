//! Document parsing: defaults, the ARCHITECTURE example, and errors with paths (L-01).
use super::*;
use crate::policy::Action;

fn errors(doc: &str) -> Vec<String> {
    match ProxyConfig::from_yaml(doc) {
        Ok(_) => panic!("expected errors for:\n{doc}"),
        Err(e) => e.errors().iter().map(ToString::to_string).collect(),
    }
}

const BASE: &str = "version: 1\nlisteners: [{name: forward, bind: '127.0.0.1:3128'}]\n";

#[test]
fn embedded_default_is_valid_and_safe() {
    let c = ProxyConfig::embedded_default().unwrap();
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].bind, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.admin.bind, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(c.policy.default_action, Action::Allow);
    assert!(c.policy.deny_private_addresses);
}

#[test]
fn architecture_example_parses() {
    let doc = r#"
version: 1
listeners:
  - name: forward
    bind: "0.0.0.0:3128"
    mode: forward
    tls:
      certFile: /etc/tunnelgate/tls/forward.crt
      keyFile:  /etc/tunnelgate/tls/forward.key
admin:
  bind: "127.0.0.1:9090"
policy:
  defaultAction: deny
  denyPrivateAddresses: true
  reevaluateOnReload: false
  rules:
    - name: payments/allow-github
      action: allow
      clients: ["10.244.1.17/32"]
      hosts: ["api.github.com", "*.githubusercontent.com"]
      hostRegex: "(?i)^(.+\\.)?rust-lang\\.org$"
      cidrs: ["203.0.113.0/24"]
      ports: [443, "8000-8099"]
      relay: { idleTimeout: 60s, maxLifetime: 1h, maxBytesPerSecond: 1048576, minBytesPerMinute: 1024, maxTotalBytes: 1073741824 }
relay:
  connectTimeout: 10s
  idleTimeout: 5m
  maxLifetime: 24h
dns:
  cacheTtl: 60s
  negativeTtl: 5s
limits:
  maxConnections: 10000
  maxConnectionsPerClient: 1000
  requestHeadTimeout: 10s
  maxRequestHeadBytes: 16384
  drainTimeout: 30s
logging:
  format: text
  accessLog: false
"#;
    let c = ProxyConfig::from_yaml(doc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.policy.rules[0].ports.len(), 2);
    assert!(c.listeners[0].tls.is_some());
    // JSON is YAML too
    let json = r#"{"version": 1, "listeners": [{"name": "a", "bind": "[::1]:0"}]}"#;
    assert!(ProxyConfig::from_yaml(json).is_ok());
}

#[test]
fn l01_every_error_names_its_path() {
    let cases: &[(&str, &str)] = &[
        ("version: 2\nlisteners: []\n", "version: unsupported version 2"),
        ("listeners: []\n", "version: missing field"),
        ("", "document is empty"),
        ("version: 1\nlisteners: [\n", "invalid YAML at line"),
        ("version: 1\nlistenrs: []\n", "unknown field `listenrs`"),
        ("policy:\n  rules:\n    - {name: a, action: allow, hosts: [x.test], portz: [1]}\n", "policy.rules[0].portz: unknown field `portz`"),
        ("policy:\n  rules:\n    - {name: a, action: allow, cidrs: [\"10.0.0.0/33\"]}\n", "policy.rules[0].cidrs[0]:"),
        ("policy:\n  rules:\n    - {name: a, action: allow, hosts: [x.test], ports: [70000]}\n", "policy.rules[0].ports[0]: 70000 is not a port"),
        ("policy:\n  rules:\n    - {name: a, action: allow, hosts: [x.test], ports: [0]}\n", "policy.rules[0].ports[0]: 0 is not a port"),
        ("policy:\n  rules:\n    - {name: a, action: allow, hosts: [\"a.*.test\"]}\n", "policy.rules[0].hosts[0]: wildcard must be the leftmost label"),
        ("policy:\n  rules:\n    - {name: a, action: allow, hosts: [\"*\"]}\n", "policy.rules[0].hosts[0]: a lone"),
        ("policy:\n  rules:\n    - {name: a, action: permit, hosts: [x.test]}\n", "policy.rules[0].action: unknown action \"permit\""),
        ("policy:\n  rules:\n    - {name: a, action: allow, hosts: []}\n", "policy.rules[0].hosts: must not be empty"),
        ("policy:\n  rules:\n    - {name: a, action: allow}\n", "policy.rules[0]: rule has no destination"),
        ("policy:\n  rules:\n    - {name: a, action: allow, hostRegex: \"(\"}\n", "policy.rules[0].hostRegex: invalid regular expression"),
        ("policy:\n  rules:\n    - {name: a, action: allow, hosts: [x.test], relay: {idleTimeout: 5}}\n", "policy.rules[0].relay.idleTimeout: invalid type"),
        ("policy:\n  rules:\n    - {name: a, action: allow, hosts: [x.test], relay: {idleTimeout: 5 parsecs}}\n", "policy.rules[0].relay.idleTimeout: invalid duration"),
        ("policy:\n  rules:\n    - {name: a, action: allow, hosts: [x.test]}\n    - {name: a, action: deny, hosts: [y.test]}\n", "policy.rules[1].name: duplicate rule name"),
        ("policy: {defaultAction: maybe}\n", "policy.defaultAction: unknown action"),
        ("limits: {maxConnections: 0}\n", "limits.maxConnections: must be greater than 0"),
        ("dns: {nameservers: [\"127.0.0.1\"]}\n", "dns.nameservers[0]:"),
        ("logging: {format: xml}\n", "logging.format: unknown format"),
    ];
    for (tail, want) in cases {
        let doc = if tail.starts_with("version") || tail.starts_with("listeners") || tail.is_empty() {
            (*tail).to_owned()
        } else {
            format!("{BASE}{tail}")
        };
        let errs = errors(&doc);
        assert!(errs.iter().any(|e| e.contains(want)), "want {want:?} in {errs:?}");
    }
}

#[test]
fn all_semantic_errors_are_reported_at_once() {
    let doc = "version: 1\nlisteners:\n  - {name: Bad_Name, bind: 'nowhere'}\n  - {name: b, bind: '127.0.0.1:1', mode: tunnel}\npolicy:\n  rules:\n    - {name: a, action: allow, hosts: ['a.*.b'], cidrs: ['10.0.0.1/8']}\n";
    let errs = errors(doc);
    for want in [
        "listeners[0].name",
        "listeners[0].bind",
        "listeners[1].upstream: required with mode: tunnel",
        "policy.rules[0].hosts[0]",
        "policy.rules[0].cidrs[0]: \"10.0.0.1/8\" has host bits set",
    ] {
        assert!(errs.iter().any(|e| e.starts_with(want)), "want {want} in {errs:?}");
    }
}

#[test]
fn listener_names_and_binds_are_unique() {
    let doc = "version: 1\nlisteners:\n  - {name: a, bind: '127.0.0.1:3128'}\n  - {name: a, bind: '127.0.0.1:3128'}\n";
    let errs = errors(doc);
    assert!(errs.iter().any(|e| e.starts_with("listeners[1].name: duplicate")));
    assert!(errs.iter().any(|e| e.starts_with("listeners[1].bind: address 127.0.0.1:3128 is used")));
}

#[test]
fn defaults_are_finite_and_deny() {
    let c = ProxyConfig::from_yaml(BASE).unwrap();
    assert_eq!(c.policy.default_action, Action::Deny);
    assert!(c.policy.deny_private_addresses);
    assert_eq!(c.relay.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.policy.defaults.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.limits.max_request_head_bytes, 16_384);
    assert_eq!(c.limits.drain_delay, Duration::from_secs(5));
    assert_eq!(c.dns.nameservers, Vec::<SocketAddr>::new());
}

#[test]
fn unicode_policy_names_become_punycode_and_bare_ips_become_host_routes() {
    let doc = format!("{BASE}policy:\n  rules:\n    - {{name: a, action: allow, hosts: ['Bücher.test.'], clients: ['10.1.2.3', '::1']}}\n");
    let c = ProxyConfig::from_yaml(&doc).unwrap();
    assert_eq!(c.policy.rules[0].hosts[0].to_string(), "xn--bcher-kva.test");
    assert_eq!(c.policy.rules[0].clients[0].to_string(), "10.1.2.3/32");
    assert_eq!(c.policy.rules[0].clients[1].to_string(), "::1/128");
}

#[test]
fn http_settings_default_and_are_validated_with_their_paths() {
    let cfg = ProxyConfig::from_yaml("version: 1\nlisteners: [{name: f, bind: '127.0.0.1:0'}]\n").unwrap();
    let Serves::Forward(http) = &cfg.listeners[0].serves else { panic!("a forward listener by default") };
    assert!(http.enabled && !http.forwarded_for && http.via == "tunnelgate", "plain HTTP on, client addresses private");
    assert_eq!(cfg.http.response_head_timeout, std::time::Duration::from_secs(60));
    assert_eq!(cfg.limits.requests_per_second, None);
    let doc = "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:0', http: {via: 'bad via', colour: red}}]\nlimits: {requestBurst: 5, requestsPerSecond: 0}\nhttp: {maxIdlePerUpstream: 2000000, responseHeadTimeout: soon}\n";
    let errs = ProxyConfig::from_yaml(doc).unwrap_err().to_string();
    assert!(errs.contains("listeners[0].http"), "{errs}");
    let doc = "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:0', http: {via: 'bad via'}}]\nlimits: {requestBurst: 5, requestsPerSecond: 0}\nhttp: {maxIdlePerUpstream: 2000000, responseHeadTimeout: soon}\n";
    let errs = ProxyConfig::from_yaml(doc).unwrap_err().to_string();
    for want in [
        "listeners[0].http.via",
        "limits.requestsPerSecond",
        "limits.requestBurst: needs limits.requestsPerSecond",
        "http.maxIdlePerUpstream",
        "http.responseHeadTimeout",
    ] {
        assert!(errs.contains(want), "{want} in {errs}");
    }
    let ok = "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:0', http: {enabled: false, forwardedFor: true, via: egress-1}}]\nlimits: {requestsPerSecond: 50, requestBurst: 100}\n";
    let cfg = ProxyConfig::from_yaml(ok).unwrap();
    let Serves::Forward(http) = &cfg.listeners[0].serves else { panic!("forward") };
    assert!(!http.enabled && http.forwarded_for);
    assert_eq!((cfg.limits.requests_per_second, cfg.limits.request_burst), (Some(50), Some(100)));
}

#[test]
fn tunnel_listeners_need_a_valid_upstream_and_take_no_http_settings() {
    let doc = "version: 1\nlisteners:\n  - {name: a, bind: '127.0.0.1:1', mode: tunnel, upstream: 'unix:relative.sock'}\n  - {name: b, bind: '127.0.0.1:2', mode: tunnel, upstream: 'db.internal', http: {enabled: false}, sendProxyProtocol: v3}\n  - {name: c, bind: '127.0.0.1:3', upstream: 'db.internal:5432'}\n  - {name: d, bind: '127.0.0.1:4', mode: sideways}\n";
    let errs = errors(doc);
    for want in [
        "listeners[0].upstream: \"unix:relative.sock\": the socket path must be absolute",
        "listeners[1].upstream: \"db.internal\"",
        "listeners[1].http: only valid with mode: forward",
        "listeners[1].sendProxyProtocol: \"v3\"",
        "listeners[2].upstream: only valid with mode: tunnel",
        "listeners[3].mode: unknown mode \"sideways\" (expected forward, tunnel or transparent)",
    ] {
        assert!(errs.iter().any(|e| e.starts_with(want)), "want {want} in {errs:?}");
    }
    let ok = "version: 1\nlisteners:\n  - {name: a, bind: '127.0.0.1:1', mode: tunnel, upstream: 'unix:/run/app.sock'}\n  - {name: b, bind: '127.0.0.1:2', mode: tunnel, upstream: 'db.internal:5432', sendProxyProtocol: none}\n";
    let cfg = ProxyConfig::from_yaml(ok).unwrap();
    assert!(matches!(
        &cfg.listeners[0].serves,
        Serves::Tunnel { upstream: TunnelUpstream::Unix(p), send_proxy_protocol: ProxyProtocol::None, .. } if p.to_str() == Some("/run/app.sock")
    ));
    assert!(
        matches!(&cfg.listeners[1].serves, Serves::Tunnel { upstream: TunnelUpstream::Tcp(a), .. } if a.to_string() == "db.internal:5432")
    );
}

#[test]
fn tls_blocks_are_checked_with_their_paths() {
    let t = |tls: &str| {
        format!("version: 1\nlisteners: [{{name: a, bind: '127.0.0.1:1', mode: tunnel, upstream: 'b.test:1', tls: {tls}}}]\n")
    };
    let cases: &[(&str, &str)] = &[
        ("{}", "listeners[0].tls: needs a certificate: certFile and keyFile, certificates, or acme"),
        ("{certFile: a.crt}", "listeners[0].tls.keyFile: required"),
        ("{certificates: []}", "listeners[0].tls.certificates: must hold 1 to 64 entries"),
        ("{certificates: [{certFile: '', keyFile: k}]}", "listeners[0].tls.certificates[0].certFile"),
        (
            "{certFile: c, keyFile: k, minVersion: '1.1'}",
            "listeners[0].tls.minVersion: \"1.1\": expected \"1.2\" or \"1.3\"",
        ),
        ("{certFile: c, keyFile: k, alpn: ['']}", "listeners[0].tls.alpn[0]: must be 1-255"),
        ("{certFile: c, keyFile: k, alpn: [acme-tls/1]}", "listeners[0].tls.alpn[0]: acme-tls/1 is reserved"),
        ("{certFile: c, keyFile: k, clientAuth: {caFile: ca, mode: maybe}}", "listeners[0].tls.clientAuth.mode"),
        (
            "{acme: {directory: 'http://x', domains: [a.test], cacheDir: /c}}",
            "listeners[0].tls.acme.directory: must be an https:// URL",
        ),
        (
            "{acme: {directory: 'https://x', domains: ['*.a.test'], cacheDir: /c}}",
            "listeners[0].tls.acme.domains[0]: wildcards need DNS-01",
        ),
        (
            "{acme: {directory: 'https://x', domains: [a.test], contact: [me@x], cacheDir: /c}}",
            "listeners[0].tls.acme.contact[0]: must be a mailto: URL",
        ),
        (
            "{certFile: c, keyFile: k, acme: {directory: 'https://x', domains: [a.test], cacheDir: /c}}",
            "listeners[0].tls.acme: cannot be combined",
        ),
    ];
    for (tls, want) in cases {
        let errs = errors(&t(tls));
        assert!(errs.iter().any(|e| e.contains(want)), "want {want:?} in {errs:?}");
    }
    let forward =
        "version: 1\nlisteners: [{name: a, bind: '127.0.0.1:1', tls: {certFile: c, keyFile: k, alpn: [h2]}}]\n";
    assert!(errors(forward)
        .iter()
        .any(|e| e.contains("listeners[0].tls.alpn: a forward listener speaks only http/1.1")));
    // Both forms together: the single pair is the default (first) certificate.
    let c = ProxyConfig::from_yaml(&t("{certFile: one.crt, keyFile: one.key, certificates: [{certFile: two.crt, keyFile: two.key}], strictSni: true, minVersion: '1.3', alpn: [h2], clientAuth: {caFile: ca.pem, mode: optional}}")).unwrap();
    let tls = c.listeners[0].tls.as_ref().unwrap();
    assert_eq!(
        tls.certificates.iter().map(|p| p.cert_file.to_str().unwrap()).collect::<Vec<_>>(),
        ["one.crt", "two.crt"]
    );
    assert!(tls.strict_sni);
    assert_eq!(tls.min_version, crate::TlsVersion::V1_3);
    assert_eq!(tls.alpn, ["h2"]);
    assert!(!tls.client_auth.as_ref().unwrap().required);
    assert_eq!(tls.files().count(), 5);
    // A tunnel advertises no ALPN unless told; a forward listener advertises http/1.1.
    let plain = ProxyConfig::from_yaml(&t("{certFile: c, keyFile: k}")).unwrap();
    assert!(plain.listeners[0].tls.as_ref().unwrap().alpn.is_empty());
}

#[test]
fn fields_only_the_operators_base_takes_are_refused_by_the_proxy() {
    let e = errors(
        "version: 1\nlisteners:\n  - {name: f, bind: '127.0.0.1:0', tls: {secretName: web-tls}}\n\
         auth: {secretName: users}\naddressGrants: [{namespaces: [a], cidrs: [10.0.0.0/8]}]\n",
    );
    for want in [
        "listeners[0].tls.secretName: only the operator's base ConfigMap takes this",
        "auth.secretName: only the operator's base ConfigMap takes this",
        "auth.htpasswdFile: required",
        "addressGrants: only the operator's base ConfigMap takes this",
    ] {
        assert!(e.iter().any(|x| x.starts_with(want)), "want {want:?} in {e:#?}");
    }
}

#[test]
fn a_transparent_listener_takes_only_its_own_settings() {
    let cfg = ProxyConfig::from_yaml(
        "version: 1\nlisteners:\n  - {name: t, bind: '10.0.0.1:15001', mode: transparent, transparent: {strictDestination: true}}\n",
    )
    .unwrap();
    assert_eq!(cfg.listeners[0].serves, Serves::Transparent(Transparent { strict_destination: true }));
    assert_eq!(cfg.listeners[0].serves.mode().as_str(), "transparent");
    let e = errors(
        "version: 1\nlisteners:\n  - {name: t, bind: '10.0.0.1:15001', mode: transparent, tls: {certFile: a, keyFile: b}, \
         http: {enabled: true}, upstream: 'a.test:1', acceptProxyProtocolFrom: [10.0.0.0/8]}\n\
         \x20 - {name: f, bind: '10.0.0.1:3128', transparent: {strictDestination: true}}\n",
    );
    for want in [
        "listeners[0].tls: not valid with mode: transparent",
        "listeners[0].http: only valid with mode: forward",
        "listeners[0].upstream: only valid with mode: tunnel",
        "listeners[0].acceptProxyProtocolFrom: not valid with mode: transparent",
        "listeners[1].transparent: only valid with mode: transparent",
    ] {
        assert!(e.iter().any(|x| x.starts_with(want)), "want {want:?} in {e:#?}");
    }
}

#[test]
fn the_node_redirect_names_a_transparent_listener_and_valid_addresses() {
    let base = "version: 1\nlisteners:\n  - {name: t, bind: '0.0.0.0:15001', mode: transparent}\n  - {name: f, bind: '127.0.0.1:3128'}\n";
    let cfg = ProxyConfig::from_yaml(&format!(
        "{base}redirect: {{listener: t, enrolled: [10.244.1.5, '::ffff:10.244.1.6']}}\n"
    ))
    .unwrap();
    let r = cfg.redirect.unwrap();
    assert_eq!((r.listener_port, r.ports.as_slice(), r.other_ports), (15001, &[80, 443][..], OtherPorts::Pass));
    assert_eq!(r.enrolled, ["10.244.1.5".parse::<IpAddr>().unwrap(), "10.244.1.6".parse().unwrap()]);
    for (redirect, want) in [
        ("{listener: f}", "redirect.listener: listener \"f\" is not a transparent listener"),
        ("{listener: nope}", "redirect.listener: no listener named \"nope\""),
        ("{listener: t, enrolled: [10.0.0.300]}", "redirect.enrolled[0]: \"10.0.0.300\" is not an address"),
        ("{listener: t, ports: []}", "redirect.ports: ports 1-65535"),
        ("{listener: t, otherPorts: reject}", "redirect.otherPorts: \"reject\": expected pass or drop"),
    ] {
        let e = errors(&format!("{base}redirect: {redirect}\n"));
        assert!(e.iter().any(|x| x.starts_with(want)), "want {want:?} in {e:#?}");
    }
}

#[test]
fn parents_groups_and_routes_are_named_and_checked() {
    use crate::parents::{Route, SendTarget};
    let doc = format!(
        "{BASE}parents:\n  - {{name: corp-a, address: 'proxy-a.corp.example:3128', credentialsFile: /etc/tg/corp-a, tls: {{caFile: /etc/tg/ca.pem}}}}\n  - {{name: corp-b, address: '10.0.0.9:3128', connectTimeout: 2s, sendTarget: name}}\nparentGroups:\n  - {{name: corp, members: [corp-a, corp-b], retryAfter: 10s}}\npolicy:\n  defaultRoute: corp\n  rules:\n    - {{name: partner, action: allow, hosts: [api.partner.example], route: corp-b}}\n    - {{name: local, action: allow, hosts: [intranet.example], route: direct}}\n    - {{name: rest, action: allow, hosts: ['*.example']}}\n"
    );
    let c = ProxyConfig::from_yaml(&doc).unwrap();
    let p = &c.parents;
    assert_eq!(p.proxies[0].tls.as_ref().map(|t| t.server_name.as_str()), Some("proxy-a.corp.example"));
    assert_eq!(p.proxies[0].send_target, SendTarget::Address, "the checked address is the default");
    assert_eq!(p.proxies[0].connect_timeout, c.relay.connect_timeout, "relay.connectTimeout unless set");
    assert_eq!((p.proxies[1].send_target, p.proxies[1].connect_timeout), (SendTarget::Name, Duration::from_secs(2)));
    assert_eq!(p.groups[0].members, vec![0, 1]);
    let routes: Vec<Route> = (0..3).map(|i| c.policy.route_of(Some(i))).collect();
    assert_eq!(routes, vec![Route::Parent(1), Route::Direct, Route::Group(0)]);
    assert_eq!(c.policy.route_of(None), Route::Group(0), "the default action's traffic takes the default route");
    assert_eq!(p.describe(Route::Group(0)), "group corp: corp-a, then corp-b");
    assert_eq!(p.describe(Route::Parent(1)), "parent corp-b at 10.0.0.9:3128 (names the target by name)");
    // Without parents every route is direct.
    let plain = ProxyConfig::from_yaml(BASE).unwrap();
    assert_eq!(plain.policy.route_of(None), Route::Direct);

    let bad = format!(
        "{BASE}parents:\n  - {{name: direct, address: 'p:1'}}\n  - {{name: a, address: 'no-port'}}\n  - {{name: b, address: 'b:1', sendTarget: both, credentialsSecret: s}}\n  - {{name: b, address: 'b:2'}}\nparentGroups:\n  - {{name: g, members: [b, nope, b]}}\n  - {{name: e, members: []}}\npolicy:\n  defaultRoute: elsewhere\n  rules:\n    - {{name: r1, action: allow, hosts: [x.example], route: missing}}\n    - {{name: r2, action: deny, hosts: [y.example], route: b}}\n"
    );
    let e = errors(&bad);
    for want in [
        "parents[0].name: must be 1-63 characters a-z, 0-9 and '-', and not \"direct\"",
        "parents[1].address: \"no-port\"",
        "parents[2].sendTarget: \"both\": must be address or name",
        "parents[2].credentialsSecret: only the operator's base ConfigMap takes this",
        "parents[3].name: duplicate name \"b\" (parents and groups share names)",
        "parentGroups[0].members[1]: \"nope\" is not a parent (see parents)",
        "parentGroups[0].members[2]: \"b\" is listed twice",
        "parentGroups[1].members: must name at least one parent",
        "policy.defaultRoute: \"elsewhere\" is not a parent or group",
        "policy.rules[0].route: \"missing\" is not a parent or group",
        "policy.rules[1].route: a deny rule sends nothing anywhere",
    ] {
        assert!(e.iter().any(|x| x.starts_with(want)), "missing {want:?} in {e:#?}");
    }
}

#[test]
fn only_tunnel_listeners_to_a_tcp_upstream_take_a_route() {
    let doc = "version: 1\nparents: [{name: corp, address: 'p.corp.example:3128'}]\nlisteners:\n  - {name: f, bind: '127.0.0.1:1', route: corp}\n  - {name: u, bind: '127.0.0.1:2', mode: tunnel, upstream: 'unix:/run/a.sock', route: corp}\n  - {name: t, bind: '127.0.0.1:3', mode: tunnel, upstream: 'db.internal:5432', route: nowhere}\n";
    let e = errors(doc);
    for want in [
        "listeners[0].route: only valid with mode: tunnel",
        "listeners[1].route: a unix: upstream is local",
        "listeners[2].route: \"nowhere\" is not a parent or group",
    ] {
        assert!(e.iter().any(|x| x.starts_with(want)), "missing {want:?} in {e:#?}");
    }
}

/// A JSON document (read by the JSON parser, after any leading `#` lines) is the same
/// configuration as its YAML spelling, and a duplicate key is refused in either.
#[test]
fn json_documents_read_as_their_yaml_spelling_and_refuse_duplicate_keys() {
    let yaml = "version: 1\nlisteners:\n  - {name: f, bind: '127.0.0.1:3128'}\npolicy:\n  rules:\n    - {name: a, action: allow, clients: [10.0.0.1], hosts: [x.test]}\n";
    let json = "# tunnelgate-render: 3\n# a comment\n{\"version\": 1, \"listeners\": [{\"name\": \"f\", \"bind\": \"127.0.0.1:3128\"}], \"policy\": {\"rules\": [{\"name\": \"a\", \"action\": \"allow\", \"clients\": [\"10.0.0.1\"], \"hosts\": [\"x.test\"]}]}}\n";
    let (a, b) = (ProxyConfig::from_yaml(yaml).unwrap(), ProxyConfig::from_yaml(json).unwrap());
    assert_eq!(format!("{:?}", a.policy), format!("{:?}", b.policy));
    let dup = "{\"version\": 1, \"version\": 1, \"listeners\": []}";
    let e = ProxyConfig::from_yaml(dup).unwrap_err().to_string();
    assert!(e.contains("duplicate"), "{e}");
    let bad = "{\"version\": 1, \"listeners\": [}";
    assert!(ProxyConfig::from_yaml(bad).unwrap_err().to_string().contains("invalid JSON"));
}
