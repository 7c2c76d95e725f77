//! `controlplane`: starts the end-to-end suites' Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager) by hand or for another test runner, prints an admin `KUBECONFIG` and
//! the directory of the built binaries (helm among them), and runs until interrupted (SIGINT or
//! SIGTERM), then stops everything and removes its directory.
//!
//! `cargo run -p e2e --bin controlplane -- [--bind IP] [DIR]`: the API server listens on
//! 127.0.0.1 unless `--bind` names the host's end of a test network's bridge.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use e2e::controlplane::{ControlPlane, Options};

fn usage() -> ExitCode {
    eprintln!("usage: controlplane [--bind IP] [DIR]");
    ExitCode::from(64)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut opts = Options::default();
    let mut dir = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        if a == "--bind" {
            match args.next().and_then(|v| v.to_str().and_then(|s| s.parse::<IpAddr>().ok())) {
                Some(ip) => opts.bind = ip,
                None => return usage(),
            }
        } else if a.to_string_lossy().starts_with('-') {
            return usage();
        } else {
            dir = Some(PathBuf::from(a));
        }
    }
    let dir =
        dir.unwrap_or_else(|| std::env::temp_dir().join(format!("tunnelgate-controlplane-{}", std::process::id())));
    eprintln!("starting the control plane in {} ...", dir.display());
    let cp = match ControlPlane::start(&dir, opts).await {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("controlplane: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("export TUNNELGATE_CONTROLPLANE_BIN={}", cp.bin_dir().display());
    println!("export KUBECONFIG={}", cp.admin_kubeconfig().display());
    eprintln!("ready (API server on {}); Ctrl-C stops it and removes {}", cp.server(), dir.display());
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        return ExitCode::FAILURE;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(cp);
    ExitCode::SUCCESS
}
