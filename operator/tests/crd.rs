//! Golden test: the checked-in CRD equals what the Rust types generate.
//! `UPDATE_GOLDEN=1 cargo test -p tunnelgate-operator --test crd` rewrites it.

use kube::CustomResourceExt;
use tunnelgate_operator::crd::TunnelPolicy;

#[test]
fn checked_in_crd_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/tunnelpolicies.yaml");
    // The chart installs the same file (charts/tests checks the copy is equal).
    let chart_copy = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/tunnelgate/files/crds/tunnelpolicies.yaml");
    let generated = serde_yaml::to_string(&TunnelPolicy::crd()).unwrap();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &generated).unwrap();
        std::fs::write(chart_copy, &generated).unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(chart_copy).unwrap(),
        std::fs::read_to_string(path).unwrap(),
        "chart copy of the CRD differs"
    );
    let on_disk = std::fs::read_to_string(path).unwrap();
    let a: serde_json::Value = serde_yaml::from_str(&on_disk).unwrap();
    let b: serde_json::Value = serde_json::to_value(TunnelPolicy::crd()).unwrap();
    assert!(
        a == b,
        "crds/tunnelpolicies.yaml is stale: run UPDATE_GOLDEN=1 cargo test -p tunnelgate-operator --test crd"
    );
}

#[test]
fn crd_names_and_subresources() {
    let crd = serde_json::to_value(TunnelPolicy::crd()).unwrap();
    assert_eq!(crd["spec"]["group"], "tunnelgate.io");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "tp");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert!(v["subresources"]["status"].is_object());
    let cols: Vec<&str> =
        v["additionalPrinterColumns"].as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(cols, ["Action", "Destinations", "Pods", "Accepted", "Ready", "Age"]);
}
