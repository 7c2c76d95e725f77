//! `tunnelgate-operator` entry point: arguments, logs, Kubernetes client, leader election,
//! admin server and the reconcile loop; SIGTERM/SIGINT stop it gracefully (the Lease is released).

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kube_lease_manager::LeaseManagerBuilder;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tunnelgate_operator::controller::{self, Settings};
use tunnelgate_operator::metrics::Metrics;
use tunnelgate_operator::{admin, error_chain};

// The caches hold every pod of the cluster and each render allocates and frees documents of
// megabytes: glibc's arenas kept that churn resident (bench/RESULTS.md, propagation at 100,000 pods).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tunnelgate operator: renders TunnelPolicies and ClusterTunnelPolicies, the pods they select and
/// the Secrets the base names into the proxies' configuration (one ConfigMap, and one per node when
/// asked), reports each policy's status and rollout, and enrols pods for transparent interception.
#[derive(Debug, Parser)]
#[command(name = "tunnelgate-operator", version)]
struct Args {
    /// The proxies' admin port: the operator long-polls each proxy pod's `/config` there to report
    /// which render every proxy has loaded (`status.loaded`, condition `Enforced`). Omit to skip.
    #[arg(long)]
    proxy_admin_port: Option<u16>,
    /// A file holding the token the proxies' `/config` requires (their `admin.configTokenFile`);
    /// read again for every request, so a rotated token is picked up.
    #[arg(long)]
    proxy_admin_token_file: Option<std::path::PathBuf>,
    /// Namespace of the release (base ConfigMap, TLS Secrets, outputs, Lease).
    #[arg(long, env = "POD_NAMESPACE", default_value = "tunnelgate")]
    namespace: String,
    /// Release name: reads `<release>-base`, writes `<release>-proxy` and `<release>-proxy-tls`.
    #[arg(long, env = "TUNNELGATE_RELEASE", default_value = "tunnelgate")]
    release: String,
    /// A proxy that has not loaded the latest render for this long (without a failed reload: it
    /// does not see the ConfigMap, or does not answer) gets a Warning event `ProxyBehind`.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    behind_warning_after: Duration,
    /// Render one document per node as well (`<release>-proxy-node-<node>`, rules listing only that
    /// node's pods), for proxies started with `--node-name`: past one ConfigMap's 1 MiB (about
    /// 30,000 selected pods), and so a pod change rewrites only its node's document.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    config_per_node: bool,
    /// Write TunnelPolicy and ClusterTunnelPolicy status. Exactly one release in a cluster should:
    /// two operators with different proxies would overwrite each other's rollout counts forever.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    policy_status: bool,
    /// Policy status writes per second at most: a burst (a start, a change that touches every
    /// policy) is spread out instead of flooding the API server, and never delays rendering.
    #[arg(long, default_value_t = 100)]
    status_writes_per_second: u32,
    /// At most one Normal event per dry-run policy per this interval, with what its rules would
    /// have denied and allowed since the previous one.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    dry_run_event_interval: Duration,
    /// The proxy pods' `app.kubernetes.io/instance` label, to find them for `--proxy-admin-port`
    /// (the Helm release name; defaults to `--release`).
    #[arg(long)]
    proxy_instance: Option<String>,
    /// Directory where the proxy mounts the rendered TLS Secret.
    #[arg(long, default_value = "/etc/tunnelgate/tls")]
    tls_dir: String,
    /// Admin server (metrics, health).
    #[arg(long, default_value = "0.0.0.0:8080")]
    admin_bind: SocketAddr,
    /// Quiet time before a reconcile: a change within it restarts it, so bursts become one write.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    debounce: Duration,
    /// Longest wait from the first change to the reconcile, however long changes keep coming.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    debounce_max: Duration,
    /// The pods of one namespace wake a render at most once per this interval (changes in between
    /// are merged into one render when it ends); other namespaces' changes are not delayed.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    namespace_churn_interval: Duration,
    /// Take part in leader election through a coordination.k8s.io Lease (one writer at a time).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// How long a Lease holds without renewal (seconds); a standby takes over after at most this.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// How long before expiry the holder renews (seconds); less than --lease-duration.
    #[arg(long, default_value_t = 5)]
    lease_grace: u64,
    /// Name of this replica (events, Lease holder).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TUNNELGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let sub = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if args.log_format == "json" { sub.json().flatten_event(true).try_init() } else { sub.try_init() };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tunnelgate-operator: cannot start the runtime: {e}");
            std::process::exit(70);
        }
    };
    let code = rt.block_on(run(args));
    std::process::exit(code);
}

async fn run(args: Args) -> i32 {
    let registry = Registry::new();
    let metrics = match Metrics::register(&registry) {
        Ok(m) => m,
        Err(e) => {
            error!(error = %e, "cannot register metrics");
            return 70;
        }
    };
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            error!(error = %error_chain(&e), "cannot create the Kubernetes client");
            return 1;
        }
    };
    let identity = args.identity.clone().unwrap_or_else(|| format!("tunnelgate-operator-{}", std::process::id()));
    let shutdown = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let admin_sock = match tokio::net::TcpListener::bind(args.admin_bind).await {
        Ok(s) => s,
        Err(e) => {
            error!(addr = %args.admin_bind, error = %e, "cannot bind the admin server");
            return 1;
        }
    };
    let admin_task = tokio::spawn(admin::run(admin_sock, registry, ready.clone(), shutdown.clone()));
    let (leader, lease_task) = if args.leader_election {
        let built = LeaseManagerBuilder::new(client.clone(), format!("{}-operator", args.release))
            .with_namespace(args.namespace.clone())
            .with_identity(identity.clone())
            .with_duration(args.lease_duration)
            .with_grace(args.lease_grace)
            // Per replica: a shared field manager would let two replicas both "win" the apply.
            .with_field_manager(format!("{}-{identity}", controller::MANAGER))
            .build()
            .await;
        match built {
            Ok(m) => {
                let (rx, task) = m.watch().await;
                (rx, Some(task))
            }
            Err(e) => {
                error!(error = %error_chain(&e), "cannot set up leader election");
                return 1;
            }
        }
    } else {
        let (tx, rx) = tokio::sync::watch::channel(true);
        // Kept alive for the process's lifetime: without election this replica always writes.
        std::mem::forget(tx);
        (rx, None)
    };
    let settings = Settings {
        namespace: args.namespace,
        release: args.release.clone(),
        tls_dir: args.tls_dir,
        debounce: args.debounce,
        debounce_max: args.debounce_max.max(args.debounce),
        namespace_churn_interval: args.namespace_churn_interval,
        proxy_admin_port: args.proxy_admin_port,
        proxy_admin_token_file: args.proxy_admin_token_file,
        dry_run_event_interval: args.dry_run_event_interval,
        status_writes_per_second: args.status_writes_per_second,
        policy_status: args.policy_status,
        config_per_node: args.config_per_node,
        behind_warning_after: args.behind_warning_after,
        proxy_instance: args.proxy_instance.unwrap_or_else(|| args.release.clone()),
        identity,
    };
    info!(namespace = %settings.namespace, release = %settings.release, "starting");
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = wait_signal().await;
        info!("shutdown requested");
        stop.cancel();
    });
    controller::run(client, settings, metrics, leader, ready, shutdown.clone()).await;
    shutdown.cancel();
    // Dropping the receiver makes the lease manager release the Lease.
    if let Some(t) = lease_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = admin_task.await;
    info!("stopped");
    0
}

async fn wait_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
