//! Table tests of spec validation: every bad field is named.
use super::*;
use crate::crd::{Destination, RelaySpec};
use serde::Deserialize;

fn spec(dests: Vec<Destination>) -> TunnelPolicySpec {
    TunnelPolicySpec {
        pod_selector: Default::default(),
        action: PolicyAction::Allow,
        destinations: dests,
        relay: None,
        enforcement: None,
    }
}

fn hosts(h: &[&str]) -> Destination {
    Destination { hosts: Some(h.iter().map(|s| s.to_string()).collect()), ..Default::default() }
}

fn errors(s: &TunnelPolicySpec) -> Vec<String> {
    validate(s).err().unwrap_or_default().iter().map(ToString::to_string).collect()
}

#[test]
fn o01_bad_fields_are_named() {
    let mut s = spec(vec![
        hosts(&["ok.test", "a.*.test", "*", "has space.test"]),
        Destination { cidrs: Some(vec!["10.0.0.0/33".into(), "10.0.0.1/8".into()]), ..Default::default() },
        Destination {
            hosts: Some(vec!["x.test".into()]),
            ports: Some(vec![
                IntOrString::Int(0),
                IntOrString::Int(65536),
                IntOrString::String("9-1".into()),
                IntOrString::String("https".into()),
            ]),
            ..Default::default()
        },
        Destination::default(),
    ]);
    s.relay =
        Some(RelaySpec { idle_timeout: Some("5 parsecs".into()), max_total_bytes: Some(0), ..Default::default() });
    let e = errors(&s);
    for want in [
        "spec.destinations[0].hosts[1]: \"a.*.test\": wildcard must be the leftmost label",
        "spec.destinations[0].hosts[2]",
        "spec.destinations[0].hosts[3]",
        "spec.destinations[1].cidrs[0]",
        "spec.destinations[1].cidrs[1]: \"10.0.0.1/8\" has host bits set; did you mean 10.0.0.0/8?",
        "spec.destinations[2].ports[0]: 0 is not a port",
        "spec.destinations[2].ports[1]: 65536 is not a port",
        "spec.destinations[2].ports[2]: range \"9-1\" is reversed",
        "spec.destinations[2].ports[3]",
        "spec.destinations[3]: a destination needs hosts or cidrs",
        "spec.relay.idleTimeout",
        "spec.relay.maxTotalBytes: must be greater than 0",
    ] {
        assert!(e.iter().any(|x| x.starts_with(want)), "want {want:?} in {e:#?}");
    }
    assert!(errors(&spec(vec![])).iter().any(|x| x.starts_with("spec.destinations: at least one")));
}

#[test]
fn hosts_are_normalized_and_summarized() {
    let s = spec(vec![
        Destination {
            hosts: Some(vec!["Allowed.TEST.".into(), "*.Stripe.com".into()]),
            ports: Some(vec![IntOrString::Int(443)]),
            ..Default::default()
        },
        Destination {
            cidrs: Some(vec!["203.0.113.0/24".into(), "10.1.2.3".into()]),
            ports: Some(vec![IntOrString::String("8000-8099".into())]),
            ..Default::default()
        },
    ]);
    let v = validate(&s).unwrap();
    let strings = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(v.destinations[0].hosts, strings(&["allowed.test", "*.stripe.com"]));
    assert_eq!(v.destinations[1].cidrs, strings(&["203.0.113.0/24", "10.1.2.3"]));
    assert_eq!(v.destinations[1].ports, Some(vec![proxy_config::raw::RawPort::Text("8000-8099".into())]));
    assert_eq!(v.summary, "allowed.test:443, *.stripe.com:443, 203.0.113.0/24:8000-8099, 10.1.2.3:8000-8099");
}

#[test]
fn lists_longer_than_the_crd_allows_are_rejected_with_their_path() {
    let d = Destination { cidrs: Some(vec!["203.0.113.0/24".into(); 65]), ..Default::default() };
    let errs = validate(&spec(vec![d])).unwrap_err();
    assert!(
        errs.iter().any(|e| e.path == "spec.destinations[0].cidrs" && e.message.contains("at most 64")),
        "{errs:?}"
    );
}

/// The examples users copy pass the operator's own validation too (not only the CRD schema).
#[test]
fn example_manifests_pass_the_operators_validation() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let docs = |dir: &str| -> Vec<serde_yaml::Value> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(format!("{root}/{dir}/valid")).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                out.push(serde_yaml::Value::deserialize(doc).unwrap());
            }
        }
        out
    };
    let tps = docs("tunnelpolicies");
    assert!(!tps.is_empty());
    for d in tps {
        let spec: crate::crd::TunnelPolicySpec = serde_yaml::from_value(d["spec"].clone()).unwrap();
        assert!(validate(&spec).is_ok(), "{d:?}");
    }
    let ctps = docs("clustertunnelpolicies");
    assert_eq!(ctps.len(), 4);
    for d in ctps {
        let spec: crate::crd::ClusterTunnelPolicySpec = serde_yaml::from_value(d["spec"].clone()).unwrap();
        assert!(validate_cluster(&spec).is_ok(), "{d:?}");
    }
}

#[test]
fn a_delegation_grants_exactly_what_it_states_or_is_refused() {
    let d: crate::crd::ClusterTunnelPolicySpec = serde_json::from_value(serde_json::json!({
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "payments"}},
        "podSelector": {"matchLabels": {"app": "db-client"}},
        "action": "Allow",
        "delegate": true,
        "enforcement": "DryRun",
        "destinations": [{"cidrs": ["10.20.0.0/16"], "ports": [5432]}, {"cidrs": ["10.21.0.0/16"], "hosts": ["db.internal"]}]
    }))
    .unwrap();
    let errs = validate_cluster(&d).unwrap_err();
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["spec.podSelector", "spec.destinations[0].ports", "spec.destinations[1].hosts", "spec.enforcement"],
        "{errs:?}"
    );
    // What it can honour is accepted.
    let ok: crate::crd::ClusterTunnelPolicySpec = serde_json::from_value(serde_json::json!({
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "payments"}},
        "action": "Allow", "delegate": true, "destinations": [{"cidrs": ["10.20.0.0/16"]}]
    }))
    .unwrap();
    assert!(validate_cluster(&ok).is_ok());
}
