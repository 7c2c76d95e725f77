//! Table tests of rendering: pods, deny over allow, determinism, TLS, limits.
use std::collections::BTreeMap;

/// No parent files.
static NO_PARENTS: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::crd::{ClusterTunnelPolicySpec, Destination, PolicyAction};
use proxy_config::origin::PolicyId;
use proxy_config::ProxyConfig;
use serde_json::{json, Value};

const BASE: &str = "version: 1\nlisteners:\n  - {name: forward, bind: '0.0.0.0:3128'}\nadmin: {bind: '0.0.0.0:9090'}\npolicy: {denyPrivateAddresses: true}\n";

fn spec(action: PolicyAction, app: &str, hosts: &[&str]) -> TunnelPolicySpec {
    TunnelPolicySpec {
        pod_selector: LabelSelector {
            match_labels: Some(BTreeMap::from([("app".to_owned(), app.to_owned())])),
            ..Default::default()
        },
        action,
        destinations: vec![Destination {
            hosts: Some(hosts.iter().map(|s| s.to_string()).collect()),
            ports: Some(vec![IntOrString::Int(443)]),
            ..Default::default()
        }],
        relay: None,
        enforcement: None,
    }
}

fn pod(ns: &str, app: &str, ip: &str) -> PodIn {
    PodIn {
        namespace: ns.into(),
        labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
        ips: vec![ip.parse().unwrap()],
        eligible: true,
        node: String::new(),
    }
}

fn run(
    specs: &[(&str, &str, TunnelPolicySpec)],
    pods: &[PodIn],
) -> (Vec<PolicyOutcome>, Result<Rendered, RenderError>) {
    let tls = BTreeMap::new();
    let policies = specs.iter().map(|(ns, n, s)| PolicyIn { namespace: ns, name: n, spec: s }).collect();
    render(&Input {
        base: BASE,
        policies,
        pods,
        tls: &tls,
        tls_dir: "/etc/tunnelgate/tls",
        per_node: None,
        prior_nodes: None,
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster: Default::default(),
    })
}

/// [`run`] with per-node documents, every pod on node `n1`: its document must fit one ConfigMap
/// (the whole-cluster document can go in shards).
fn run_on_one_node(
    specs: &[(&str, &str, TunnelPolicySpec)],
    pods: &[PodIn],
) -> (Vec<PolicyOutcome>, Result<Rendered, RenderError>) {
    let tls = BTreeMap::new();
    let pods: Vec<PodIn> = pods.iter().map(|p| PodIn { node: "n1".into(), ..p.clone() }).collect();
    let nodes = ["n1".to_owned()];
    let policies = specs.iter().map(|(ns, n, s)| PolicyIn { namespace: ns, name: n, spec: s }).collect();
    render(&Input {
        base: BASE,
        policies,
        pods: &pods,
        tls: &tls,
        tls_dir: "/etc/tunnelgate/tls",
        per_node: Some(&nodes),
        prior_nodes: None,
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster: Default::default(),
    })
}

/// An input of owned policy specs (namespace, name, spec), no TLS, no cluster policies, one
/// document.
fn input_of<'a>(
    specs: &'a [(String, String, TunnelPolicySpec)],
    pods: &'a [PodIn],
    tls: &'a BTreeMap<String, TlsIn>,
) -> Input<'a> {
    Input {
        base: BASE,
        policies: specs.iter().map(|(ns, n, s)| PolicyIn { namespace: ns, name: n, spec: s }).collect(),
        pods,
        tls,
        tls_dir: "/t",
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster: Default::default(),
        per_node: None,
        prior_nodes: None,
    }
}

fn rules(r: &Rendered) -> Vec<Value> {
    let v: Value = serde_yaml::from_str(&r.config).unwrap();
    v["policy"]["rules"].as_array().unwrap().clone()
}

#[test]
fn o03_no_policies_renders_explicit_default_deny() {
    let (_, r) = run(&[], &[]);
    let r = r.unwrap();
    assert!(r.config.contains("defaultAction: deny"), "{}", r.config);
    assert!(rules(&r).is_empty());
    assert!(ProxyConfig::from_yaml(&r.config).unwrap().policy.rules.is_empty());
}

#[test]
fn policies_become_rules_with_pod_ips_as_clients() {
    let pods = [
        pod("payments", "checkout", "10.244.1.17"),
        pod("payments", "checkout", "fd00::17"),
        pod("payments", "other", "10.244.1.18"),
        pod("shop", "checkout", "10.244.2.1"),
    ];
    let (out, r) =
        run(&[("payments", "allow-github", spec(PolicyAction::Allow, "checkout", &["api.github.com"]))], &pods);
    let r = r.unwrap();
    let rs = rules(&r);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0]["name"], "payments/allow-github");
    assert_eq!(rs[0]["clients"], json!(["10.244.1.17", "fd00::17"]));
    assert_eq!(rs[0]["hosts"], json!(["api.github.com"]));
    assert_eq!(out[0].result.as_ref().unwrap().matched_pods, 2);
    // The proxy parses it and decides as intended.
    let cfg = ProxyConfig::from_yaml(&r.config).unwrap();
    let host = proxy_config::Host::Name(proxy_config::host::normalize_name("api.github.com").unwrap());
    assert!(matches!(
        cfg.policy.decide("10.244.1.17".parse().unwrap(), &host, 443, &["140.82.112.5".parse().unwrap()]),
        proxy_config::Decision::Allow { .. }
    ));
    assert!(matches!(
        cfg.policy.decide("10.244.2.1".parse().unwrap(), &host, 443, &["140.82.112.5".parse().unwrap()]),
        proxy_config::Decision::Deny { .. }
    ));
}

#[test]
fn pod_churn_deletion_and_non_running_pods() {
    let s = spec(PolicyAction::Allow, "a", &["x.test"]);
    let mut pods = vec![pod("ns", "a", "10.0.0.1"), pod("ns", "a", "10.0.0.2")];
    let (_, r1) = run(&[("ns", "p", s.clone())], &pods);
    pods[1].eligible = false; // terminating, not running, or host network
    let (_, r2) = run(&[("ns", "p", s.clone())], &pods);
    assert_eq!(rules(&r1.unwrap())[0]["clients"], json!(["10.0.0.1", "10.0.0.2"]));
    assert_eq!(rules(&r2.unwrap())[0]["clients"], json!(["10.0.0.1"]));
    // No pod left: no rule at all (never an empty clients list, which would mean any client).
    let (out, r3) = run(&[("ns", "p", s)], &[]);
    assert!(rules(&r3.unwrap()).is_empty());
    assert_eq!(out[0].result.as_ref().unwrap().matched_pods, 0);
}

#[test]
fn o04_deny_wins_and_two_policies_for_the_same_pods() {
    let pods = [pod("a", "web", "10.0.0.1")];
    let (_, r) = run(
        &[
            ("a", "allow", spec(PolicyAction::Allow, "web", &["x.test"])),
            ("a", "deny", spec(PolicyAction::Deny, "web", &["x.test"])),
        ],
        &pods,
    );
    let cfg = ProxyConfig::from_yaml(&r.unwrap().config).unwrap();
    let host = proxy_config::Host::Name(proxy_config::host::normalize_name("x.test").unwrap());
    let d = cfg.policy.decide("10.0.0.1".parse().unwrap(), &host, 443, &["93.184.216.34".parse().unwrap()]);
    assert!(matches!(d, proxy_config::Decision::Deny { .. }));
    assert_eq!(
        cfg.policy.rule_name(match d {
            proxy_config::Decision::Deny { rule, .. } => rule,
            _ => None,
        }),
        "a/deny"
    );
}

#[test]
fn o02_one_bad_policy_does_not_block_the_rest_and_output_is_deterministic() {
    let pods: Vec<PodIn> =
        (0..100).map(|i| pod("ns", &format!("app{i}"), &format!("10.1.{}.{}", i / 250, i % 250 + 1))).collect();
    let mut specs: Vec<(String, TunnelPolicySpec)> = (0..100)
        .map(|i| (format!("p{i:03}"), spec(PolicyAction::Allow, &format!("app{i}"), &[&format!("h{i}.test")])))
        .collect();
    specs.push(("bad".into(), spec(PolicyAction::Allow, "app1", &["a.*.test"])));
    let tls = BTreeMap::new();
    let mk = |order: &[usize]| {
        let policies =
            order.iter().map(|&i| PolicyIn { namespace: "ns", name: &specs[i].0, spec: &specs[i].1 }).collect();
        render(&Input {
            base: BASE,
            policies,
            pods: &pods,
            tls: &tls,
            tls_dir: "/t",
            per_node: None,
            prior_nodes: None,
            htpasswd: None,
            parent_files: &NO_PARENTS,
            cluster: Default::default(),
        })
    };
    let forward: Vec<usize> = (0..specs.len()).collect();
    let (out, r) = mk(&forward);
    let r = r.unwrap();
    assert_eq!(rules(&r).len(), 100);
    let bad = out.iter().find(|o| o.id.name() == "bad").unwrap();
    assert!(bad.result.as_ref().unwrap_err()[0].to_string().contains("spec.destinations[0].hosts[0]"));
    // Shuffled inputs, same bytes.
    let mut shuffled = forward.clone();
    for k in 0..20 {
        shuffled.rotate_left(7 + k);
        shuffled.swap(k, specs.len() - 1 - k);
        let (_, again) = mk(&shuffled);
        assert_eq!(again.unwrap(), r);
    }
}

#[test]
fn tls_listeners_point_at_mounted_files_and_keys_stay_out_of_the_configmap() {
    let base = "version: 1\nlisteners:\n  - {name: secure, bind: '0.0.0.0:3129', tls: {secretName: proxy-cert}}\n";
    assert_eq!(tls_refs(base).unwrap(), vec![(0, "secure".to_owned(), "proxy-cert".to_owned())]);
    let mut tls = BTreeMap::new();
    let missing = render(&Input {
        base,
        policies: vec![],
        pods: &[],
        tls: &tls,
        tls_dir: "/etc/tunnelgate/tls",
        per_node: None,
        prior_nodes: None,
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster: Default::default(),
    })
    .1;
    assert!(matches!(missing, Err(RenderError::MissingTls { .. })));
    tls.insert(
        "secure".to_owned(),
        TlsIn {
            cert_pem: "CERT".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----SECRET".into(),
            sha256: "ab12".into(),
            not_after: "2030-01-01T00:00:00Z".into(),
        },
    );
    let r = render(&Input {
        base,
        policies: vec![],
        pods: &[],
        tls: &tls,
        tls_dir: "/etc/tunnelgate/tls",
        per_node: None,
        prior_nodes: None,
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster: Default::default(),
    })
    .1
    .unwrap();
    assert!(
        r.config.contains("certFile: /etc/tunnelgate/tls/secure.crt")
            && r.config.contains("keyFile: /etc/tunnelgate/tls/secure.key")
    );
    assert!(!r.config.contains("SECRET"), "private keys never enter the ConfigMap");
    assert!(r.config.contains("sha256=ab12"));
    assert_eq!(r.tls_data["secure.key"], "-----BEGIN PRIVATE KEY-----SECRET");
    assert_eq!(r.annotations["tunnelgate.io/tls-secure-not-after"], "2030-01-01T00:00:00Z");

    // A tunnel listener keeps its other TLS settings; only the Secret becomes files.
    let base = "version: 1\nlisteners:\n  - {name: secure, bind: '0.0.0.0:8443', mode: tunnel, upstream: 'app.test:80', sendProxyProtocol: v2, tls: {secretName: proxy-cert, alpn: [h2], minVersion: '1.3'}}\n";
    let r = render(&Input {
        base,
        policies: vec![],
        pods: &[],
        tls: &tls,
        tls_dir: "/etc/tunnelgate/tls",
        per_node: None,
        prior_nodes: None,
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster: Default::default(),
    })
    .1
    .unwrap();
    let cfg = proxy_config::ProxyConfig::from_yaml(&r.config).unwrap();
    let t = cfg.listeners[0].tls.as_ref().unwrap();
    assert_eq!(t.alpn, ["h2"]);
    assert_eq!(t.min_version, proxy_config::TlsVersion::V1_3);
    assert_eq!(t.certificates[0].key_file, std::path::Path::new("/etc/tunnelgate/tls/secure.key"));
    assert!(!r.config.contains("secretName"));
}

#[test]
fn o03_too_large_and_base_errors_write_nothing() {
    let pods: Vec<PodIn> =
        (0..60_000u32).map(|i| pod("ns", "a", &format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))).collect();
    // One node's document past the limit. A Deny is never left out to make room: too large,
    // nothing is written.
    let s = spec(PolicyAction::Deny, "a", &["x.test"]);
    let (_, r) = run_on_one_node(&[("ns", "p", s)], &pods);
    assert!(matches!(r, Err(RenderError::TooLarge { .. })));
    // An Allow is left out instead, and says so; the rest is written.
    let (outcomes, r) = run_on_one_node(&[("ns", "p", spec(PolicyAction::Allow, "a", &["x.test"]))], &pods);
    let doc = r.unwrap();
    assert!(rules(&doc).is_empty());
    let node: Value = serde_yaml::from_str(&doc.nodes["n1"].config).unwrap();
    assert!(node["policy"]["rules"].as_array().is_none_or(Vec::is_empty));
    let a = outcomes[0].result.as_ref().unwrap();
    assert!(
        a.rules.is_empty() && a.over_budget.as_deref().is_some_and(|m| m.contains("limit of a ConfigMap")),
        "{a:?}"
    );
    let tls = BTreeMap::new();
    let with_rules = "version: 1\nlisteners: [{name: f, bind: '0.0.0.0:1'}]\npolicy: {rules: [{name: x, action: allow, hosts: [a.test]}]}\n";
    assert!(matches!(
        render(&Input {
            base: with_rules,
            policies: vec![],
            pods: &[],
            tls: &tls,
            tls_dir: "/t",
            per_node: None,
            prior_nodes: None,
            htpasswd: None,
            parent_files: &NO_PARENTS,
            cluster: Default::default()
        })
        .1,
        Err(RenderError::Base(_))
    ));
    let bad_field = "version: 1\nlisteners: [{name: f, bind: '0.0.0.0:1'}]\nlimitz: {}\n";
    assert!(matches!(
        render(&Input {
            base: bad_field,
            policies: vec![],
            pods: &[],
            tls: &tls,
            tls_dir: "/t",
            per_node: None,
            prior_nodes: None,
            htpasswd: None,
            parent_files: &NO_PARENTS,
            cluster: Default::default()
        })
        .1,
        // Read in the configuration's own types: the unknown field is named, and nothing is written.
        Err(RenderError::Base(m)) if m.contains("unknown field `limitz`")
    ));
}

#[test]
fn ipv6_pods_and_multi_destination_names() {
    let mut s = spec(PolicyAction::Allow, "a", &["x.test"]);
    s.destinations.push(Destination { cidrs: Some(vec!["2606:4700::/32".into()]), ..Default::default() });
    let (_, r) = run(&[("ns", "p", s)], &[pod("ns", "a", "fd00::1")]);
    let rs = rules(&r.unwrap());
    assert_eq!(rs[0]["name"], "ns/p/0");
    assert_eq!(rs[1]["name"], "ns/p/1");
    assert_eq!(rs[1]["clients"], json!(["fd00::1"]));
}

#[test]
fn auth_secret_is_rendered_into_the_proxy_secret_never_the_configmap() {
    let tls = BTreeMap::new();
    let base = "version: 1\nlisteners: [{name: forward, bind: '0.0.0.0:3128'}]\nauth: {secretName: proxy-users, realm: corp}\n";
    let missing = render(&Input {
        base,
        policies: vec![],
        pods: &[],
        tls: &tls,
        tls_dir: "/t",
        per_node: None,
        prior_nodes: None,
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster: Default::default(),
    })
    .1;
    assert!(matches!(missing, Err(RenderError::MissingAuth { ref secret }) if secret == "proxy-users"));
    let file = "alice:$2y$05$abcdefghijklmnopqrstuu0123456789012345678901234567890\n";
    let r = render(&Input {
        base,
        policies: vec![],
        pods: &[],
        tls: &tls,
        tls_dir: "/t",
        per_node: None,
        prior_nodes: None,
        htpasswd: Some(file),
        parent_files: &NO_PARENTS,
        cluster: Default::default(),
    })
    .1
    .unwrap();
    assert!(r.config.contains("htpasswdFile: /t/htpasswd") && r.config.contains("realm: corp"), "{}", r.config);
    assert!(!r.config.contains("$2y$") && !r.config.contains("secretName"), "{}", r.config);
    assert_eq!(r.tls_data.get("htpasswd").map(String::as_str), Some(file));
    assert!(r.config.contains("# auth htpasswd: sha256="));
    assert_eq!(crate::render::auth_ref(base).as_deref(), Some("proxy-users"));
}

#[test]
fn namespaced_allows_never_open_refused_address_space() {
    let cidr_dest = |cidrs: &[&str]| Destination {
        cidrs: Some(cidrs.iter().map(|s| s.to_string()).collect()),
        ports: Some(vec![IntOrString::Int(80)]),
        ..Default::default()
    };
    let mut s = spec(PolicyAction::Allow, "a", &["x.test"]);
    s.destinations.push(cidr_dest(&["169.254.169.254/32"])); // metadata
    s.destinations.push(cidr_dest(&["10.0.0.0/8", "8.8.8.0/24"])); // node network + public
    s.destinations.push(cidr_dest(&["0.0.0.0/0"])); // the internet: opens only public space
    s.destinations.push(cidr_dest(&["fd00::/8"])); // IPv6 unique local
    let pods = [pod("ns", "a", "10.1.0.1")];
    let (out, r) = run(&[("ns", "p", s.clone())], &pods);
    let a = out[0].result.as_ref().unwrap();
    assert_eq!(
        a.restricted,
        [
            "spec.destinations[1].cidrs[0] 169.254.169.254/32",
            "spec.destinations[2].cidrs[0] 10.0.0.0/8",
            "spec.destinations[4].cidrs[0] fd00::/8"
        ]
    );
    let names: Vec<Value> = rules(&r.unwrap()).iter().map(|r| r["name"].clone()).collect();
    assert_eq!(names, [json!("ns/p/0"), json!("ns/p/3")], "restricted destinations are not rendered");
    // A Deny may name any space; a policy that selects no pod still reports what it would leave out.
    let mut d = s.clone();
    d.action = PolicyAction::Deny;
    let (out, r) = run(&[("ns", "p", d)], &pods);
    assert!(out[0].result.as_ref().unwrap().restricted.is_empty());
    assert_eq!(rules(&r.unwrap()).len(), 5);
    let (out, _) = run(&[("ns", "p", s)], &[]);
    assert_eq!(out[0].result.as_ref().unwrap().restricted.len(), 3);
    // The status says so, with the paths.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-01-01T00:00:00Z".parse().unwrap());
    let seen = crate::status::Seen { generation: Some(1), status: None, now: &now };
    let st = crate::status::desired(&out[0], &seen, "tunnelgate-proxy", Ok("abc"), None);
    let restricted = st.conditions.iter().find(|c| c.type_ == "Restricted").unwrap();
    assert_eq!((restricted.status.as_str(), restricted.reason.as_str()), ("True", "RefusedAddressSpace"));
    assert!(restricted.message.contains("spec.destinations[1].cidrs[0] 169.254.169.254/32"));
}

#[test]
fn address_grants_let_named_namespaces_open_refused_space() {
    let mut s = spec(PolicyAction::Allow, "a", &["x.test"]);
    s.destinations = vec![Destination {
        cidrs: Some(vec!["10.96.0.0/16".into(), "169.254.169.254/32".into()]),
        ..Default::default()
    }];
    let base =
        format!("{BASE}addressGrants:\n  - {{namespaces: [payments], cidrs: ['10.96.0.0/12', '169.254.169.254']}}\n");
    let tls = BTreeMap::new();
    let pods = [pod("payments", "a", "10.1.0.1"), pod("shop", "a", "10.1.0.2")];
    let input = |policies| Input {
        base: &base,
        policies,
        pods: &pods,
        tls: &tls,
        tls_dir: "/t",
        per_node: None,
        prior_nodes: None,
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster: Default::default(),
    };
    let (out, r) = render(&input(vec![
        PolicyIn { namespace: "payments", name: "p", spec: &s },
        PolicyIn { namespace: "shop", name: "p", spec: &s },
    ]));
    let r = r.unwrap();
    assert!(out[0].result.as_ref().unwrap().restricted.is_empty(), "granted to payments");
    assert_eq!(out[1].result.as_ref().unwrap().restricted.len(), 2, "not to shop");
    let names: Vec<Value> = rules(&r).iter().map(|r| r["name"].clone()).collect();
    assert_eq!(names, [json!("payments/p")]);
    assert!(!r.config.contains("addressGrants"), "the grants are the operator's, not the proxy's");
    // A broad grant does not cover a wider CIDR; a bad grant list stops the write.
    let wider = format!("{BASE}addressGrants:\n  - {{namespaces: ['*'], cidrs: ['10.96.0.0/24']}}\n");
    let (out, _) = render(&Input { base: &wider, ..input(vec![PolicyIn { namespace: "shop", name: "p", spec: &s }]) });
    assert_eq!(out[0].result.as_ref().unwrap().restricted.len(), 2);
    let bad = format!("{BASE}addressGrants:\n  - {{namespaces: [a], cidrs: ['10.0.0.0/33']}}\n");
    let (_, r) = render(&Input { base: &bad, ..input(vec![]) });
    assert!(matches!(r, Err(RenderError::Base(m)) if m.contains("addressGrants[0]: cidrs")));
}

fn cluster_spec(
    action: PolicyAction,
    ns: LabelSelector,
    cidrs: &[&str],
    priority: Option<u32>,
) -> ClusterTunnelPolicySpec {
    ClusterTunnelPolicySpec {
        namespace_selector: ns,
        pod_selector: LabelSelector::default(),
        action,
        priority,
        delegate: None,
        destinations: vec![Destination {
            cidrs: Some(cidrs.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }],
        relay: None,
        enforcement: None,
        route: None,
    }
}

fn ns_named(name: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), name.to_owned())])),
        ..Default::default()
    }
}

/// Cluster policies against namespaced ones, decided by the proxy's own policy on the rendered
/// document: cluster Deny beats a namespaced Allow, a namespaced Deny narrows a cluster Allow,
/// priority orders cluster policies, only cluster policies (or their delegation) open refused space.
#[test]
fn cluster_policies_precedence_and_delegation_table() {
    let tenant = LabelSelector {
        match_labels: Some(BTreeMap::from([("tier".to_owned(), "tenant".to_owned())])),
        ..Default::default()
    };
    let deny_public = cluster_spec(PolicyAction::Deny, tenant.clone(), &["8.8.0.0/16"], Some(100));
    let allow_dns = cluster_spec(PolicyAction::Allow, ns_named("payments"), &["8.8.8.8/32"], Some(10));
    let open_metadata = cluster_spec(PolicyAction::Allow, ns_named("ops"), &["169.254.169.254/32"], None);
    let mut delegate = cluster_spec(PolicyAction::Allow, ns_named("payments"), &["10.20.0.0/16"], None);
    delegate.delegate = Some(true);
    let mut bad = cluster_spec(PolicyAction::Deny, LabelSelector::default(), &["8.8.4.4/32"], None);
    bad.delegate = Some(true);
    let cidr_spec = |action, cidrs: &[&str]| {
        let mut s = spec(action, "a", &["x.test"]);
        s.destinations =
            vec![Destination { cidrs: Some(cidrs.iter().map(|c| c.to_string()).collect()), ..Default::default() }];
        s
    };
    let ns_allow_public = cidr_spec(PolicyAction::Allow, &["8.8.0.0/16"]);
    let ns_allow_db = cidr_spec(PolicyAction::Allow, &["10.20.5.0/24"]);
    let ns_deny_dns = cidr_spec(PolicyAction::Deny, &["8.8.8.8/32"]);
    let pods = [pod("payments", "a", "10.1.0.1"), pod("shop", "a", "10.1.0.2"), pod("ops", "a", "10.1.0.3")];
    let tls = BTreeMap::new();
    let namespaces = BTreeMap::from([
        ("payments".to_owned(), BTreeMap::from([("tier".to_owned(), "tenant".to_owned())])),
        ("shop".to_owned(), BTreeMap::from([("tier".to_owned(), "tenant".to_owned())])),
        ("ops".to_owned(), BTreeMap::new()),
    ]);
    let input = |policies: Vec<PolicyIn<'static>>, cluster: Vec<ClusterPolicyIn<'static>>| -> Input<'static> {
        Input {
            base: BASE,
            policies,
            pods: Box::leak(Box::new(pods.clone())),
            tls: Box::leak(Box::new(tls.clone())),
            tls_dir: "/t",
            per_node: None,
            prior_nodes: None,
            htpasswd: None,
            parent_files: &NO_PARENTS,
            cluster: Cluster { policies: cluster, namespaces: namespaces.clone(), networks: Vec::new() },
        }
    };
    let leak = |s: ClusterTunnelPolicySpec| -> &'static ClusterTunnelPolicySpec { Box::leak(Box::new(s)) };
    let leak_ns = |s: TunnelPolicySpec| -> &'static TunnelPolicySpec { Box::leak(Box::new(s)) };
    let (out, r) = render(&input(
        vec![
            PolicyIn { namespace: "shop", name: "public", spec: leak_ns(ns_allow_public) },
            PolicyIn { namespace: "payments", name: "db", spec: leak_ns(ns_allow_db.clone()) },
            PolicyIn { namespace: "shop", name: "db", spec: leak_ns(ns_allow_db) },
            PolicyIn { namespace: "payments", name: "no-dns", spec: leak_ns(ns_deny_dns) },
        ],
        vec![
            ClusterPolicyIn { name: "deny-public", spec: leak(deny_public) },
            ClusterPolicyIn { name: "allow-dns", spec: leak(allow_dns) },
            ClusterPolicyIn { name: "open-metadata", spec: leak(open_metadata) },
            ClusterPolicyIn { name: "delegate-db", spec: leak(delegate) },
            ClusterPolicyIn { name: "bad", spec: leak(bad) },
        ],
    ));
    let r = r.unwrap();
    let outcome = |ns: &str, name: &str| {
        let id = if ns.is_empty() { PolicyId::cluster(name) } else { PolicyId::namespaced(ns, name) };
        out.iter().find(|o| o.id == id).unwrap().result.clone()
    };
    assert!(outcome("", "bad").unwrap_err().iter().any(|e| e.path == "spec.delegate"));
    assert_eq!(outcome("", "delegate-db").unwrap().delegated_to, Some(1));
    assert!(outcome("payments", "db").unwrap().restricted.is_empty(), "delegated to payments");
    assert_eq!(outcome("shop", "db").unwrap().restricted.len(), 1, "not to shop");
    let text = r.config.clone();
    assert!(text.contains("cluster:deny-public") && text.contains("priority: 100"));
    let policy = proxy_config::ProxyConfig::from_yaml(&text).unwrap().policy;
    let decide = |client: &str, addr: &str| {
        let a: std::net::IpAddr = addr.parse().unwrap();
        match policy.decide(client.parse().unwrap(), &proxy_config::Host::Ip(a), 443, &[a]) {
            proxy_config::Decision::Allow { rule, .. } => Some(policy.rule_name(rule).to_owned()),
            proxy_config::Decision::Deny { .. } => None,
        }
    };
    let table: &[(&str, &str, Option<&str>, &str)] = &[
        ("10.1.0.2", "8.8.4.4", None, "cluster Deny beats the shop's Allow"),
        ("10.1.0.1", "8.8.8.8", None, "payments' Deny narrows the cluster Allow"),
        ("10.1.0.3", "169.254.169.254", Some("cluster:open-metadata"), "a cluster Allow opens metadata"),
        ("10.1.0.1", "169.254.169.254", None, "for the namespaces it selects only"),
        ("10.1.0.1", "10.20.5.9", Some("payments/db"), "delegated private space"),
        ("10.1.0.2", "10.20.5.9", None, "not delegated to shop"),
    ];
    for (client, addr, want, why) in table {
        assert_eq!(decide(client, addr).as_deref(), *want, "{why}");
    }
    // Priority: without the namespaced Deny, payments' better-priority cluster Allow beats the
    // tenants' cluster Deny.
    let (_, r) = render(&input(
        vec![],
        vec![
            ClusterPolicyIn {
                name: "deny-public",
                spec: leak(cluster_spec(PolicyAction::Deny, tenant, &["8.8.0.0/16"], Some(100))),
            },
            ClusterPolicyIn {
                name: "allow-dns",
                spec: leak(cluster_spec(PolicyAction::Allow, ns_named("payments"), &["8.8.8.8/32"], Some(10))),
            },
        ],
    ));
    let policy = proxy_config::ProxyConfig::from_yaml(&r.unwrap().config).unwrap().policy;
    let a: std::net::IpAddr = "8.8.8.8".parse().unwrap();
    let d = policy.decide("10.1.0.1".parse().unwrap(), &proxy_config::Host::Ip(a), 443, &[a]);
    assert!(matches!(d, proxy_config::Decision::Allow { .. }), "{d:?}");
    let d = policy.decide("10.1.0.2".parse().unwrap(), &proxy_config::Host::Ip(a), 443, &[a]);
    assert!(matches!(d, proxy_config::Decision::Deny { .. }), "shop is not selected by the allow: {d:?}");
}

#[test]
fn cluster_networks_join_the_bases_sorted_and_deduplicated() {
    let base = BASE.replace(
        "policy: {denyPrivateAddresses: true}",
        "policy: {defaultAction: allow, denyPrivateAddresses: true, clusterNetworks: ['10.96.0.0/12']}",
    );
    let tls = BTreeMap::new();
    let networks =
        ["2600:1f18::10", "10.244.1.0/24", "10.96.0.1", "not-an-address", "10.244.1.0/24"].map(String::from).to_vec();
    let cluster = Cluster { networks, ..Default::default() };
    let input = Input {
        base: &base,
        policies: vec![],
        pods: &[],
        tls: &tls,
        tls_dir: "/t",
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster,
        per_node: None,
        prior_nodes: None,
    };
    let r = render(&input).1.unwrap();
    let v: Value = serde_yaml::from_str(&r.config).unwrap();
    assert_eq!(
        v["policy"]["clusterNetworks"],
        json!(["10.96.0.0/12", "10.96.0.1/32", "10.244.1.0/24", "2600:1f18::10/128"])
    );
    let policy = proxy_config::ProxyConfig::from_yaml(&r.config).unwrap().policy;
    let a: std::net::IpAddr = "2600:1f18::10".parse().unwrap();
    match policy.decide("10.0.0.1".parse().unwrap(), &proxy_config::Host::Ip(a), 443, &[a]) {
        proxy_config::Decision::Deny { reason, .. } => assert_eq!(reason.as_str(), "cluster_network"),
        d => panic!("{d:?}"),
    }
    // A typo in the base is not dropped: the proxy's parser names it.
    let bad = BASE.replace("policy: {denyPrivateAddresses: true}", "policy: {clusterNetworks: ['10.96.0.0/33']}");
    let r = render(&Input { base: &bad, ..input }).1;
    assert!(matches!(r, Err(RenderError::Invalid(e)) if e.to_string().contains("policy.clusterNetworks")));
}

#[test]
fn dry_run_policies_render_rules_the_proxy_does_not_enforce() {
    let mut s = spec(PolicyAction::Deny, "a", &["x.test"]);
    s.enforcement = Some(crate::crd::Enforcement::DryRun);
    let (_, r) = run(&[("ns", "p", s)], &[pod("ns", "a", "10.0.0.1")]);
    let r = r.unwrap();
    assert_eq!(rules(&r)[0]["dryRun"], json!(true));
    let policy = proxy_config::ProxyConfig::from_yaml(&r.config).unwrap().policy;
    assert!(policy.rules.is_empty() && policy.shadow.is_some(), "counted, never enforced");
}

/// Per node: each node's document lists only its own pods (a rule with none of them is left out,
/// never rendered without clients), every node named gets a document, and the whole one stays.
#[test]
fn per_node_documents_list_only_their_nodes_pods() {
    let on = |node: &str, p: PodIn| PodIn { node: node.into(), ..p };
    let pods = [
        on("a", pod("ns", "web", "10.0.0.1")),
        on("b", pod("ns", "web", "10.0.0.2")),
        on("a", pod("ns", "db", "10.0.0.3")),
    ];
    let tls = BTreeMap::new();
    let specs = [
        ("ns", "web", spec(PolicyAction::Allow, "web", &["web.test"])),
        ("ns", "db", spec(PolicyAction::Allow, "db", &["db.test"])),
    ];
    let nodes = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
    let input = |per_node| Input {
        base: BASE,
        policies: specs.iter().map(|(ns, n, s)| PolicyIn { namespace: ns, name: n, spec: s }).collect(),
        pods: &pods,
        tls: &tls,
        tls_dir: "/t",
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster: Default::default(),
        per_node,
        prior_nodes: None,
    };
    let whole = render(&input(None)).1.unwrap();
    let r = render(&input(Some(&nodes))).1.unwrap();
    assert_eq!(r.config, whole.config, "the whole document is unchanged");
    assert_ne!(r.hash, whole.hash, "the node documents are part of what is written");
    assert_eq!(r.nodes.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    let clients = |node: &str| -> Vec<(String, Vec<String>)> {
        let doc = &r.nodes[node];
        let cfg = ProxyConfig::from_yaml(&doc.config).unwrap_or_else(|e| panic!("{node}: {e}"));
        cfg.policy
            .rules
            .iter()
            .map(|x| (x.name.clone(), x.clients.iter().map(|c| c.addr().to_string()).collect()))
            .collect()
    };
    assert_eq!(
        clients("a"),
        [("ns/db".to_owned(), vec!["10.0.0.3".to_owned()]), ("ns/web".to_owned(), vec!["10.0.0.1".to_owned()])]
    );
    assert_eq!(clients("b"), [("ns/web".to_owned(), vec!["10.0.0.2".to_owned()])]);
    assert!(clients("c").is_empty(), "a node without selected pods: no rule (none may go without clients)");
    // A pod change on b leaves a's document as it was.
    let moved = [
        pods[0].clone(),
        PodIn { labels: BTreeMap::from([("app".to_owned(), "db".to_owned())]), ..pods[1].clone() },
        pods[2].clone(),
    ];
    let r2 = render(&Input { pods: &moved, ..input(Some(&nodes)) }).1.unwrap();
    assert_eq!(r2.nodes["a"], r.nodes["a"]);
    assert_ne!(r2.nodes["b"], r.nodes["b"]);
    // With the previous documents at hand, unchanged nodes are reused and the result is the same.
    let r3 = render(&Input { pods: &moved, prior_nodes: Some(&r.nodes), ..input(Some(&nodes)) }).1.unwrap();
    assert_eq!(r3.nodes, r2.nodes);
    assert_eq!(r3.hash, r2.hash);
}

/// Incremental rendering: through a random walk of pod, policy and namespace changes, a render
/// that reuses the previous render's work gives exactly what a full render gives, and a pod change
/// works out again only the policies that select the pod before or after it.
#[test]
fn incremental_render_equals_a_full_render_and_works_out_only_affected_policies() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let namespaces = ["ns-0", "ns-1", "ns-2"];
    let app = |i: usize| format!("app-{i}");
    let mut ns_labels: BTreeMap<String, BTreeMap<String, String>> =
        namespaces.iter().map(|n| (n.to_string(), BTreeMap::from([("tier".to_owned(), "a".to_owned())]))).collect();
    // Pods by name; IPs never reused.
    let mut ip_seq = 0u32;
    let mut fresh_ip = move || {
        ip_seq += 1;
        format!("10.1.{}.{}", ip_seq / 250, ip_seq % 250 + 1)
    };
    let mut pods: Vec<(String, PodIn)> =
        (0..30).map(|i| (format!("pod-{i}"), pod(namespaces[i % 3], &app(i % 5), &fresh_ip()))).collect();
    let mut specs: Vec<(&str, String, TunnelPolicySpec)> = (0..12)
        .map(|j| {
            (namespaces[j % 3], format!("p-{j}"), spec(PolicyAction::Allow, &app(j % 6), &[&format!("h{j}.test")]))
        })
        .collect();
    // One that never validates: it stays rejected, whatever changes.
    specs.push(("ns-1", "bad".into(), spec(PolicyAction::Allow, "app-1", &["bad host!"])));
    let tier_a = LabelSelector {
        match_labels: Some(BTreeMap::from([("tier".to_owned(), "a".to_owned())])),
        ..Default::default()
    };
    let cluster_specs = [
        ("guard", cluster_spec(PolicyAction::Deny, tier_a.clone(), &["8.8.0.0/16"], Some(10))),
        ("delegate", {
            ClusterTunnelPolicySpec {
                delegate: Some(true),
                ..cluster_spec(PolicyAction::Allow, tier_a.clone(), &["10.20.0.0/16"], None)
            }
        }),
    ];
    let tls = BTreeMap::new();
    let mut memo = Memo::default();
    let mut changed_total = 0;
    let mut relabels = 0;
    for step in 0..120 {
        let before: Vec<(String, PodIn)> = pods.clone();
        let mut pod_step = true;
        let mut relabel = None;
        match next(7) {
            0 => {
                let i = next(pods.len());
                pods[i].1.labels.insert("app".into(), app(next(6)));
            }
            1 => {
                let i = next(pods.len());
                pods[i].1.ips = vec![fresh_ip().parse().unwrap()];
            }
            2 => {
                let i = next(pods.len());
                pods[i].1.eligible = !pods[i].1.eligible;
            }
            3 if pods.len() > 5 => {
                pods.remove(next(pods.len()));
            }
            4 => pods.push((format!("pod-new-{step}"), pod(namespaces[next(3)], &app(next(6)), &fresh_ip()))),
            5 => {
                pod_step = false;
                let j = next(specs.len() - 1);
                specs[j].2 = spec(PolicyAction::Allow, &app(next(6)), &[&format!("h{step}.test")]);
            }
            _ => {
                pod_step = false;
                let n = namespaces[next(3)];
                let tier = if next(2) == 0 { "a" } else { "b" };
                let flipped = ns_labels[n]["tier"] != tier;
                ns_labels.insert(n.to_owned(), BTreeMap::from([("tier".to_owned(), tier.to_owned())]));
                // Both cluster policies select tier a: a flip rescopes both, anything else neither.
                relabel = Some(if flipped { 2 } else { 0 });
            }
        }
        // The changed pods, before and after, as the controller's pod table reports them.
        let mut changes: Vec<PodIn> = Vec::new();
        for (name, old) in &before {
            match pods.iter().find(|(n, _)| n == name) {
                Some((_, new)) if new == old => {}
                Some((_, new)) => changes.extend([old.clone(), new.clone()]),
                None => changes.push(old.clone()),
            }
        }
        changes.extend(pods.iter().filter(|(n, _)| !before.iter().any(|(b, _)| b == n)).map(|(_, p)| p.clone()));
        let rows: Vec<PodIn> = pods.iter().map(|(_, p)| p.clone()).collect();
        let full_input = Input {
            base: BASE,
            policies: specs.iter().map(|(ns, n, s)| PolicyIn { namespace: ns, name: n, spec: s }).collect(),
            pods: &rows,
            tls: &tls,
            tls_dir: "/t",
            htpasswd: None,
            parent_files: &NO_PARENTS,
            cluster: Cluster {
                policies: cluster_specs.iter().map(|(n, s)| ClusterPolicyIn { name: n, spec: s }).collect(),
                namespaces: ns_labels.clone(),
                networks: Vec::new(),
            },
            per_node: None,
            prior_nodes: None,
        };
        let pod_changes = if step == 0 {
            PodChanges::All
        } else {
            PodChanges::Pods(changes.iter().map(|p| (p.namespace.as_str(), &p.labels)).collect())
        };
        let incremental = render_with(&full_input, &mut memo, &pod_changes);
        let full = render(&full_input);
        assert_eq!(incremental, full, "step {step}: the incremental render differs from a full one");
        if step > 0 && pod_step {
            // Expected: the namespaced policies of the changed pods' namespaces whose app is one of
            // theirs, and the guard (it selects every pod of a tier-a namespace) when one is in scope.
            let selects = |ns: &str, a: &str| {
                changes.iter().any(|c| c.namespace == ns && c.labels.get("app").map(String::as_str) == Some(a))
            };
            let namespaced = specs
                .iter()
                .filter(|(ns, n, s)| {
                    let a = &s.pod_selector.match_labels.as_ref().unwrap()["app"];
                    n != "bad" && selects(ns, a)
                })
                .count();
            let guard = changes.iter().any(|c| ns_labels[&c.namespace]["tier"] == "a");
            assert_eq!(memo.evaluated(), namespaced + usize::from(guard), "step {step}: {changes:?}");
            changed_total += 1;
        }
        if let (true, Some(expected)) = (step > 0, relabel) {
            assert_eq!(
                memo.evaluated(),
                expected,
                "step {step}: a namespace relabel works out only the cluster policies it rescopes"
            );
            relabels += 1;
        }
    }
    assert!(changed_total > 40, "the walk changed pods {changed_total} times");
    assert!(relabels > 10, "the walk relabelled namespaces {relabels} times");
}

#[test]
fn a_policy_whose_rule_name_the_proxy_would_refuse_is_refused_alone() {
    // A 253-character name is legal in the API; `payments/<name>` is then too long to be a rule
    // name. That policy is refused with the reason; the document stays valid with the other one.
    let long = "p".repeat(253);
    let specs = [
        ("payments", long.as_str(), spec(PolicyAction::Allow, "web", &["a.example"])),
        ("payments", "short", spec(PolicyAction::Allow, "web", &["b.example"])),
    ];
    let (outcomes, rendered) = run(&specs, &[pod("payments", "web", "10.0.0.1")]);
    let refused = outcomes.iter().find(|o| o.id.name() == long).unwrap();
    let errs = refused.result.as_ref().unwrap_err();
    assert_eq!(errs[0].path, "metadata.name", "{errs:?}");
    assert!(errs[0].message.contains("at most 253"), "{errs:?}");
    assert!(outcomes.iter().find(|o| o.id.name() == "short").unwrap().result.is_ok());
    let r = rendered.unwrap();
    proxy_config::ProxyConfig::from_yaml(&r.config).unwrap();
    let names: Vec<String> = rules(&r).iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, ["payments/short"]);
    // Just short enough: accepted, also with several destinations' /<index> suffixes.
    let fits = "q".repeat(253 - "payments/".len() - 2);
    let mut two = spec(PolicyAction::Allow, "web", &["c.example"]);
    two.destinations.push(two.destinations[0].clone());
    let (outcomes, rendered) = run(&[("payments", fits.as_str(), two)], &[pod("payments", "web", "10.0.0.1")]);
    assert!(outcomes[0].result.is_ok(), "{:?}", outcomes[0].result);
    proxy_config::ProxyConfig::from_yaml(&rendered.unwrap().config).unwrap();
}

#[test]
fn a_namespace_cannot_open_the_clusters_own_networks_even_public_ones() {
    // Global IPv6 pod and node ranges (EKS, GKE) are not refused space, but they are the
    // cluster's: a namespaced CIDR that overlaps them is restricted unless granted.
    let cidr = |c: &str| Destination {
        cidrs: Some(vec![c.to_owned()]),
        ports: Some(vec![IntOrString::Int(10250)]),
        ..Default::default()
    };
    let mut s = spec(PolicyAction::Allow, "web", &["x.example"]);
    s.destinations =
        vec![cidr("2600:1f00:250::/64"), cidr("2600:1f00:250::17/128"), cidr("2600::/16"), cidr("93.184.216.0/24")];
    let tls = BTreeMap::new();
    let pods = [pod("payments", "web", "10.0.0.1")];
    let (out, rendered) = render(&Input {
        base: BASE,
        policies: vec![PolicyIn { namespace: "payments", name: "p", spec: &s }],
        pods: &pods,
        tls: &tls,
        tls_dir: "/t",
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster: Cluster { networks: vec!["2600:1f00:250::/64".into()], ..Default::default() },
        per_node: None,
        prior_nodes: None,
    });
    let restricted = &out[0].result.as_ref().unwrap().restricted;
    assert_eq!(
        restricted,
        &[
            "spec.destinations[0].cidrs[0] 2600:1f00:250::/64",
            "spec.destinations[1].cidrs[0] 2600:1f00:250::17/128",
            "spec.destinations[2].cidrs[0] 2600::/16",
        ],
        "the range, an address in it, and a range around it"
    );
    let names: Vec<Value> = rules(&rendered.unwrap()).iter().map(|r| r["name"].clone()).collect();
    assert_eq!(names, [json!("payments/p/3")], "only the public destination is rendered");
}

/// `n` distinct host names of about 250 characters each.
fn long_hosts(tag: &str, n: usize) -> Vec<String> {
    let label = "l".repeat(60);
    (0..n).map(|i| format!("{tag}{i}.{label}.{label}.{label}.example.com")).collect()
}

fn wide_spec(action: PolicyAction, app: &str, tag: &str, destinations: usize, hosts: usize) -> TunnelPolicySpec {
    let mut s = spec(action, app, &[]);
    s.destinations = (0..destinations)
        .map(|d| Destination {
            hosts: Some(long_hosts(&format!("{tag}d{d}h"), hosts)),
            ports: Some(vec![IntOrString::Int(443)]),
            ..Default::default()
        })
        .collect();
    s
}

/// One oversized policy is not rendered (and says why) while every other policy is; a namespace
/// that writes many policies is held to its own budget, in the order of their names, and never
/// takes room from another namespace.
#[test]
fn a_policy_and_a_namespace_over_their_budgets_are_not_rendered_alone() {
    let pods = [pod("tenant", "a", "10.0.0.1"), pod("other", "b", "10.0.0.2")];
    // ~577 KB of destinations: the scenario that made the whole document overflow before.
    let huge = wide_spec(PolicyAction::Allow, "a", "huge", 30, 76);
    let (outcomes, r) = run(
        &[
            ("other", "fine", spec(PolicyAction::Allow, "b", &["ok.example.com"])),
            ("tenant", "huge", huge),
            ("tenant", "small", spec(PolicyAction::Allow, "a", &["small.example.com"])),
        ],
        &pods,
    );
    let doc = r.unwrap();
    let names: Vec<String> = rules(&doc).iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, ["other/fine", "tenant/small"]);
    let huge = outcomes.iter().find(|o| o.id.name() == "huge").unwrap().result.as_ref().unwrap();
    assert!(huge.rules.is_empty());
    assert!(huge.over_budget.as_deref().is_some_and(|m| m.contains("65536 one policy may add")), "{huge:?}");

    // Within the policy budget each, over the namespace's together: the later names are left out.
    let each = wide_spec(PolicyAction::Allow, "b", "x", 2, 60); // ~25 KB
    let specs: Vec<(String, TunnelPolicySpec)> =
        (0..8).map(|i| (format!("p{i}"), wide_spec(PolicyAction::Allow, "a", &format!("p{i}x"), 2, 60))).collect();
    let mut all: Vec<(&str, &str, TunnelPolicySpec)> =
        specs.iter().map(|(n, s)| ("tenant", n.as_str(), s.clone())).collect();
    all.push(("other", "fine", each));
    let (outcomes, r) = run(&all, &pods);
    r.unwrap();
    let rendered: Vec<&str> =
        outcomes.iter().filter(|o| o.result.as_ref().is_ok_and(|a| !a.rules.is_empty())).map(|o| o.id.name()).collect();
    let first_out = outcomes.iter().position(|o| o.result.as_ref().is_ok_and(|a| a.over_budget.is_some())).unwrap();
    assert!(rendered.contains(&"fine"), "another namespace keeps its room");
    assert!(first_out > 1, "the namespace's first policies are rendered: {rendered:?}");
    for o in outcomes.iter().filter(|o| o.id.namespace() == Some("tenant")).skip(first_out) {
        let a = o.result.as_ref().unwrap();
        assert!(a.over_budget.as_deref().is_some_and(|m| m.contains("namespace tenant")), "{}: {a:?}", o.id);
    }
}

/// When every policy is within its budgets but together they would not fit in a node's document,
/// whole policies are left out in the documented order (dry-run first, then the Allows of the namespace
/// adding the most, largest first) until the document fits; Denies and cluster policies stay.
#[test]
fn policies_are_left_out_in_a_documented_order_until_the_document_fits() {
    let mut pods = Vec::new();
    let mut specs: Vec<(String, String, TunnelPolicySpec)> = Vec::new();
    // 12 namespaces with ~100 KB each: about 1.2 MB in all, over the 900 KiB limit.
    for n in 0..12 {
        let ns = format!("ns{n:02}");
        pods.push(pod(&ns, "a", &format!("10.1.{n}.1")));
        let size = if n == 5 { 70 } else { 60 }; // ns05 adds the most
        for p in 0..4 {
            specs.push((
                ns.clone(),
                format!("p{p}"),
                wide_spec(PolicyAction::Allow, "a", &format!("{ns}p{p}"), 2, size),
            ));
        }
    }
    let mut dry = wide_spec(PolicyAction::Deny, "a", "dry", 1, 40);
    dry.enforcement = Some(crate::crd::Enforcement::DryRun);
    specs.push(("ns11".into(), "zz-dry".into(), dry));
    specs.push(("ns11".into(), "zz-deny".into(), wide_spec(PolicyAction::Deny, "a", "deny", 1, 40)));
    let input: Vec<(&str, &str, TunnelPolicySpec)> =
        specs.iter().map(|(ns, n, s)| (ns.as_str(), n.as_str(), s.clone())).collect();
    let (outcomes, r) = run_on_one_node(&input, &pods);
    let doc = r.unwrap();
    assert!(doc.nodes["n1"].config.len() <= MAX_CONFIG_BYTES);
    // Without per-node documents the same policies all fit, in shards.
    let (whole_outcomes, whole) = run(&input, &pods);
    assert!(whole.unwrap().shards.len() >= 2);
    assert!(whole_outcomes.iter().all(|o| o.result.as_ref().is_ok_and(|a| a.over_budget.is_none())));
    let left: Vec<String> = outcomes
        .iter()
        .filter(|o| o.result.as_ref().is_ok_and(|a| a.over_budget.is_some()))
        .map(|o| o.id.to_string())
        .collect();
    // The dry-run policy and every policy of the namespace adding the most (ns05) are left out
    // before the namespaces adding less lose more than one policy each.
    assert!(left.contains(&"ns11/zz-dry".to_owned()), "{left:?}");
    assert_eq!(left.iter().filter(|p| p.starts_with("ns05/")).count(), 4, "{left:?}");
    assert!(left.iter().filter(|p| p.starts_with("ns01/")).count() < 4, "{left:?}");
    assert!(left.len() < 16, "no more than needed: {left:?}");
    assert!(!left.iter().any(|p| p == "ns11/zz-deny"), "a Deny is never left out");
    let names: Vec<String> = rules(&doc).iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect();
    assert!(names.contains(&"ns11/zz-deny".to_owned()));
    // Deterministic: the same inputs leave out the same policies.
    let (again, _) = run_on_one_node(&input, &pods);
    assert_eq!(outcomes, again);
}

/// Ports and relay limits are checked only by the proxy's own rule check (the operator has no copy
/// of it): a policy the proxy would refuse is rejected alone, at its field, and every other policy
/// is rendered and enforced by the proxies.
#[test]
fn a_policy_only_the_proxys_parser_rejects_leaves_every_other_policy_enforced() {
    let good = spec(PolicyAction::Allow, "web", &["api.example.com"]);
    let mut reversed = spec(PolicyAction::Allow, "web", &["other.example.com"]);
    reversed.destinations[0].ports = Some(vec![IntOrString::String("9000-8000".into())]);
    let mut unbounded = spec(PolicyAction::Allow, "web", &["third.example.com"]);
    unbounded.relay = Some(crate::crd::RelaySpec { max_total_bytes: Some(0), ..Default::default() });
    let pods = [pod("shop", "web", "10.1.0.5")];
    let (out, r) =
        run(&[("shop", "good", good), ("shop", "reversed", reversed), ("shop", "unbounded", unbounded)], &pods);
    let errors = |name: &str| -> Vec<String> {
        let o = out.iter().find(|o| o.id.name() == name).unwrap();
        o.result.as_ref().err().map(|e| e.iter().map(ToString::to_string).collect()).unwrap_or_default()
    };
    assert_eq!(errors("reversed"), ["spec.destinations[0].ports[0]: range \"9000-8000\" is reversed"]);
    assert_eq!(errors("unbounded"), ["spec.relay.maxTotalBytes: must be greater than 0 (omit it for no limit)"]);
    assert!(errors("good").is_empty());
    let config = proxy_config::ProxyConfig::from_yaml(&r.unwrap().config).expect("the proxies accept the document");
    let target: proxy_config::Authority = "api.example.com:443".parse().unwrap();
    let addr: std::net::IpAddr = "93.184.216.34".parse().unwrap();
    let decided = config.policy.decide("10.1.0.5".parse().unwrap(), &target.host, 443, &[addr]);
    assert!(
        matches!(decided, proxy_config::Decision::Allow { rule: Some(i), .. } if config.policy.rules[i].name == "shop/good"),
        "{decided:?}"
    );
    assert_eq!(config.policy.rules.len(), 1, "only the good policy's rule is rendered");
}

/// Transparent enrolment: the base names the namespaces' labels; each node's document enrols only
/// its own eligible pods of those namespaces (a terminating one never), the whole one all of them,
/// and the proxies accept every document.
#[test]
fn enrolled_pods_are_rendered_per_node_from_the_namespaces_labels() {
    let base = "version: 1\nlisteners:\n  - {name: forward, bind: '0.0.0.0:3128'}\n  - {name: transparent, bind: '0.0.0.0:15001', mode: transparent}\n\
                redirect: {listener: transparent, enrollNamespaces: {tunnelgate.io/transparent: enabled}}\n";
    let on = |node: &str, p: PodIn| PodIn { node: node.into(), ..p };
    let pods = [
        on("a", pod("legacy", "app", "10.0.0.1")),
        on("b", pod("legacy", "app", "10.0.0.2")),
        on("a", PodIn { eligible: false, ..pod("legacy", "old", "10.0.0.3") }),
        on("a", pod("modern", "app", "10.0.0.4")),
    ];
    let tls = BTreeMap::new();
    let nodes = ["a".to_owned(), "b".to_owned()];
    let cluster = Cluster {
        namespaces: BTreeMap::from([
            ("legacy".to_owned(), BTreeMap::from([("tunnelgate.io/transparent".to_owned(), "enabled".to_owned())])),
            ("modern".to_owned(), BTreeMap::new()),
        ]),
        ..Default::default()
    };
    let input = Input {
        base,
        policies: vec![],
        pods: &pods,
        tls: &tls,
        tls_dir: "/t",
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster,
        per_node: Some(&nodes),
        prior_nodes: None,
    };
    let r = render(&input).1.unwrap();
    let enrolled = |config: &str| -> Vec<String> {
        let cfg = ProxyConfig::from_yaml(config).unwrap_or_else(|e| panic!("{e}\n{config}"));
        cfg.redirect.unwrap().enrolled.iter().map(ToString::to_string).collect()
    };
    assert_eq!(enrolled(&r.config), ["10.0.0.1", "10.0.0.2"], "the whole document: every enrolled pod");
    assert_eq!(enrolled(&r.nodes["a"].config), ["10.0.0.1"], "node a: its own, never a terminating pod");
    assert_eq!(enrolled(&r.nodes["b"].config), ["10.0.0.2"]);
    assert!(!r.config.contains("enrollNamespaces"), "the operator-only selector is not rendered");
    // A pod of an enrolled namespace appearing on node b changes only node b's document.
    let more =
        [pods[0].clone(), pods[1].clone(), pods[2].clone(), pods[3].clone(), on("b", pod("legacy", "app", "10.0.0.5"))];
    let r2 = render(&Input { pods: &more, prior_nodes: Some(&r.nodes), ..input.clone() }).1.unwrap();
    assert_eq!(r2.nodes["a"], r.nodes["a"]);
    assert_eq!(enrolled(&r2.nodes["b"].config), ["10.0.0.2", "10.0.0.5"]);
}

#[test]
fn parent_credentials_go_into_the_proxy_secret_never_the_configmap() {
    let tls = BTreeMap::new();
    let base = "version: 1\nlisteners: [{name: forward, bind: '0.0.0.0:3128'}]\nparents: [{name: corp, address: 'proxy.corp.example:3128', credentialsSecret: corp-proxy, tls: {caSecret: corp-ca}}]\npolicy: {defaultRoute: corp}\n";
    let input = |creds| Input {
        base,
        policies: vec![],
        pods: &[],
        tls: &tls,
        tls_dir: "/t",
        per_node: None,
        prior_nodes: None,
        htpasswd: None,
        parent_files: creds,
        cluster: Default::default(),
    };
    let missing = render(&input(&NO_PARENTS)).1;
    assert!(
        matches!(missing, Err(RenderError::MissingParentSecret { ref parent, ref secret, .. }) if parent == "corp" && secret == "corp-proxy")
    );
    let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let only_creds: BTreeMap<String, String> =
        [("parent-corp.credentials".to_owned(), "egress:s3cret\n".to_owned())].into();
    let missing_ca = render(&input(&only_creds)).1;
    assert!(matches!(missing_ca, Err(RenderError::MissingParentSecret { ref secret, .. }) if secret == "corp-ca"));
    let creds: BTreeMap<String, String> = [
        ("parent-corp.credentials".to_owned(), "egress:s3cret\n".to_owned()),
        ("parent-corp-ca.crt".to_owned(), ca.to_owned()),
    ]
    .into();
    let r = render(&input(&creds)).1.unwrap();
    assert!(r.config.contains("credentialsFile: /t/parent-corp.credentials"), "{}", r.config);
    assert!(!r.config.contains("s3cret") && !r.config.contains("credentialsSecret"), "{}", r.config);
    assert!(r.config.contains("# parent-corp.credentials: sha256="), "a rotation changes the document");
    assert_eq!(r.tls_data.get("parent-corp.credentials").map(String::as_str), Some("egress:s3cret\n"));
    assert!(r.config.contains("caFile: /t/parent-corp-ca.crt") && !r.config.contains("caSecret"), "{}", r.config);
    assert_eq!(r.tls_data.get("parent-corp-ca.crt").map(String::as_str), Some(ca));
    let cfg = proxy_config::ProxyConfig::from_yaml(&r.config).unwrap();
    assert_eq!(cfg.policy.route_of(None), proxy_config::Route::Parent(0));
}

#[test]
fn a_cluster_policy_routes_its_traffic_through_a_parent_the_base_defines() {
    let base = "version: 1\nlisteners: [{name: forward, bind: '0.0.0.0:3128'}]\nparents: [{name: corp, address: 'proxy.corp.example:3128'}]\n";
    let tls = BTreeMap::new();
    let pods = [pod("payments", "web", "10.0.0.1")];
    let routed = ClusterTunnelPolicySpec {
        route: Some("corp".into()),
        ..cluster_spec(PolicyAction::Allow, LabelSelector::default(), &["93.184.216.0/24"], None)
    };
    let unknown = ClusterTunnelPolicySpec {
        route: Some("elsewhere".into()),
        ..cluster_spec(PolicyAction::Allow, LabelSelector::default(), &["93.184.217.0/24"], None)
    };
    let (out, rendered) = render(&Input {
        base,
        policies: vec![],
        pods: &pods,
        tls: &tls,
        tls_dir: "/t",
        htpasswd: None,
        parent_files: &NO_PARENTS,
        cluster: Cluster {
            policies: vec![
                ClusterPolicyIn { name: "via-corp", spec: &routed },
                ClusterPolicyIn { name: "lost", spec: &unknown },
            ],
            ..Default::default()
        },
        per_node: None,
        prior_nodes: None,
    });
    let cfg = proxy_config::ProxyConfig::from_yaml(&rendered.unwrap().config).unwrap();
    let rule = cfg.policy.rules.iter().position(|r| r.name.contains("via-corp")).unwrap();
    assert_eq!(cfg.policy.route_of(Some(rule)), proxy_config::Route::Parent(0));
    let lost = out.iter().find(|o| o.id == PolicyId::cluster("lost")).unwrap();
    let errs = lost.result.as_ref().unwrap_err();
    assert_eq!(errs[0].path, "spec.route", "{errs:?}");
    assert!(errs[0].message.contains("\"elsewhere\" is not a parent or group"), "{errs:?}");
    // A Deny, or a delegation, routes nothing.
    let deny = ClusterTunnelPolicySpec {
        route: Some("corp".into()),
        ..cluster_spec(PolicyAction::Deny, LabelSelector::default(), &["1.2.3.0/24"], None)
    };
    let errs = crate::validate::validate_cluster(&deny).unwrap_err();
    assert_eq!(errs[0].path, "spec.route");
}

/// The work of a render follows the change, not the cluster: a pod relabelled from one policy's
/// selector into another's works out those two policies and rebuilds its node's document only,
/// the same with 40 policies as with 400 (and 400 pods as 4,000).
#[test]
fn work_per_pod_change_is_two_policies_and_one_node_document_at_any_size() {
    let tls = BTreeMap::new();
    let mut counts = Vec::new();
    for scale in [1usize, 10] {
        let policies = 40 * scale;
        let nodes: Vec<String> = (0..20 * scale).map(|n| format!("node-{n}")).collect();
        let specs: Vec<(String, String, TunnelPolicySpec)> = (0..policies)
            .map(|j| {
                (
                    format!("ns-{}", j % 4),
                    format!("p-{j}"),
                    spec(PolicyAction::Allow, &format!("app-{j}"), &[&format!("h{j}.test")]),
                )
            })
            .collect();
        // Ten pods per policy, spread over the nodes.
        let mut pods: Vec<PodIn> = (0..policies * 10)
            .map(|i| {
                let j = i / 10;
                let ip = format!("10.{}.{}.{}", i / 62_500, (i / 250) % 250, i % 250 + 1);
                PodIn {
                    node: nodes[i % nodes.len()].clone(),
                    ..pod(&format!("ns-{}", j % 4), &format!("app-{j}"), &ip)
                }
            })
            .collect();
        let mut memo = Memo::default();
        let mut prior = BTreeMap::new();
        let mut step = |pods: &[PodIn], changes: &PodChanges<'_>, memo: &mut Memo| {
            let input = Input { per_node: Some(&nodes), prior_nodes: Some(&prior), ..input_of(&specs, pods, &tls) };
            let (_, r) = render_with(&input, memo, changes);
            prior = r.unwrap().nodes;
        };
        step(&pods, &PodChanges::All, &mut memo);
        assert_eq!((memo.evaluated(), memo.nodes_rendered()), (policies, nodes.len()), "the first render: everything");
        // Pod 0 (policy 0's, in ns-0) relabelled into policy 4's selector (also ns-0).
        let before = pods[0].clone();
        pods[0].labels.insert("app".into(), "app-4".into());
        let after = pods[0].clone();
        step(
            &pods,
            &PodChanges::Pods(vec![(&before.namespace, &before.labels), (&after.namespace, &after.labels)]),
            &mut memo,
        );
        counts.push((memo.evaluated(), memo.nodes_rendered()));
        // Nothing changed: nothing worked out, nothing built.
        step(&pods, &PodChanges::Pods(Vec::new()), &mut memo);
        assert_eq!((memo.evaluated(), memo.nodes_rendered()), (0, 0));
    }
    assert_eq!(counts, [(2, 1), (2, 1)], "two policies and one node document, at either size");
}

/// Past one ConfigMap the whole document comes in shards, each under the limit and valid alone;
/// merged, they are the whole document: every rule with all its clients, a cluster policy that
/// selects every pod split among the shards by client. A pod change rebuilds one shard.
#[test]
fn a_whole_document_past_one_configmap_is_written_in_shards_that_merge_into_it() {
    let tls = BTreeMap::new();
    let n = 40_000;
    let mut pods: Vec<PodIn> = (0..n)
        .map(|i| {
            pod(
                &format!("ns-{}", i % 50),
                &format!("app-{}", i % 400),
                &format!("10.{}.{}.{}", i / 62_500, (i / 250) % 250, i % 250 + 1),
            )
        })
        .collect();
    let specs: Vec<(String, String, TunnelPolicySpec)> = (0..400)
        .map(|j| {
            (
                format!("ns-{}", j % 50),
                format!("p-{j}"),
                spec(PolicyAction::Allow, &format!("app-{j}"), &[&format!("h{j}.test")]),
            )
        })
        .collect();
    let everyone = cluster_spec(PolicyAction::Deny, LabelSelector::default(), &["192.0.2.0/24"], Some(10));
    let mut memo = Memo::default();
    let render_at = |pods: &[PodIn], changes: &PodChanges<'_>, memo: &mut Memo| {
        let cluster =
            Cluster { policies: vec![ClusterPolicyIn { name: "everyone", spec: &everyone }], ..Default::default() };
        let input = Input { cluster, ..input_of(&specs, pods, &tls) };
        render_with(&input, memo, changes).1.unwrap()
    };
    let step = &render_at;
    let r = step(&pods, &PodChanges::All, &mut memo);
    assert!(r.config.is_empty() && r.shards.len() >= 2, "{} shards", r.shards.len());
    for s in &r.shards {
        assert!(s.len() <= MAX_CONFIG_BYTES, "{} bytes", s.len());
        ProxyConfig::from_yaml(s).unwrap();
    }
    let merge = |r: &Rendered| {
        let refs: Vec<proxy_config::shards::ShardRef> = r
            .shards
            .iter()
            .enumerate()
            .map(|(k, t)| proxy_config::shards::ShardRef {
                name: format!("s{k}"),
                sha256: proxy_config::shards::digest(t),
            })
            .collect();
        let texts = r.shards.iter().enumerate().map(|(k, t)| (format!("s{k}"), t.clone())).collect();
        let index = proxy_config::shards::ShardIndex { render: 1, shards: refs };
        ProxyConfig::from_yaml(&proxy_config::shards::assemble(&index, &texts).unwrap().unwrap()).unwrap()
    };
    let whole = merge(&r);
    let clients =
        |cfg: &ProxyConfig, rule: &str| cfg.policy.rules.iter().find(|x| x.name == rule).map_or(0, |x| x.clients.len());
    assert_eq!(whole.policy.rules.len(), 401);
    assert_eq!(clients(&whole, "cluster:everyone"), n, "the split rule's clients, all of them");
    assert_eq!(clients(&whole, "ns-7/p-7"), 100);
    let split = r.shards.iter().filter(|s| s.contains("cluster:everyone")).count();
    assert!(split >= 2, "the cluster policy's clients are split among {split} shards");
    // One pod relabelled from p-7 to p-8 (both in ns-7... p-8 is in ns-8: use p-57, also ns-7).
    let before = pods[7].clone();
    pods[7].labels.insert("app".into(), "app-57".into());
    let after = pods[7].clone();
    let r2 = step(
        &pods,
        &PodChanges::Pods(vec![(&before.namespace, &before.labels), (&after.namespace, &after.labels)]),
        &mut memo,
    );
    assert!(memo.shards_rendered() <= 2, "{} shards rebuilt for one pod", memo.shards_rendered());
    let changed = r.shards.iter().zip(&r2.shards).filter(|(a, b)| a != b).count();
    assert_eq!(changed, memo.shards_rendered());
    let whole2 = merge(&r2);
    assert_eq!((clients(&whole2, "ns-7/p-7"), clients(&whole2, "ns-7/p-57")), (99, 101));
    assert_eq!(r2, render_at(&pods, &PodChanges::All, &mut Memo::default()), "the same as a full render");
}
