//! `controlplane`: starts the end-to-end suite's Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager on loopback) by hand, prints an admin `KUBECONFIG`, and runs until
//! interrupted. `cargo run -p e2e --bin controlplane [DIR]`.

use std::path::PathBuf;
use std::process::ExitCode;

use e2e::controlplane::{ControlPlane, Options};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("tunnelgate-controlplane-{}", std::process::id())));
    eprintln!("starting the control plane in {} ...", dir.display());
    let cp = match ControlPlane::start(&dir, Options::default()).await {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("controlplane: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("export KUBECONFIG={}", cp.admin_kubeconfig().display());
    eprintln!("ready (API server on https://127.0.0.1:{}); Ctrl-C stops it and removes {}", cp.api_port, dir.display());
    let _ = tokio::signal::ctrl_c().await;
    drop(cp);
    ExitCode::SUCCESS
}
