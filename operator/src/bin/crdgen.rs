//! Prints the TunnelPolicy CRD as YAML (`cargo run -p tunnelgate-operator --bin crdgen > crds/tunnelpolicies.yaml`).

use kube::CustomResourceExt;

fn main() {
    match serde_yaml::to_string(&tunnelgate_operator::crd::TunnelPolicy::crd()) {
        Ok(y) => print!("{y}"),
        Err(e) => {
            eprintln!("crdgen: {e}");
            std::process::exit(1);
        }
    }
}
