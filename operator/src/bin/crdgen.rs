//! Prints a CRD as YAML: `cargo run -p tunnelgate-operator --bin crdgen -- tunnelpolicies > crds/tunnelpolicies.yaml`
//! (or `clustertunnelpolicies`).

use kube::CustomResourceExt;
use tunnelgate_operator::crd::{ClusterTunnelPolicy, TunnelPolicy};

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "tunnelpolicies".into());
    if which == "-h" || which == "--help" {
        println!("Prints a Tunnelgate CRD as YAML.\n\nUsage: crdgen [tunnelpolicies|clustertunnelpolicies]");
        return;
    }
    let crd = match which.as_str() {
        "tunnelpolicies" => TunnelPolicy::crd(),
        "clustertunnelpolicies" => ClusterTunnelPolicy::crd(),
        other => {
            eprintln!("crdgen: unknown CRD {other:?} (tunnelpolicies or clustertunnelpolicies)");
            std::process::exit(2);
        }
    };
    match serde_yaml::to_string(&crd) {
        Ok(y) => print!("{y}"),
        Err(e) => {
            eprintln!("crdgen: {e}");
            std::process::exit(1);
        }
    }
}
