//! Wiring: binds the admin port, creates the shared state ([`Inner`]), loads the first
//! configuration as a reload from nothing (the listeners through the reload's own path), and runs
//! the shutdown sequence (readiness off → accept grace → stop accepting → drain → force close).

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::Registry;
use proxy_config::ProxyConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Duration};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin;
use crate::control::RunningListener;
use crate::listeners;
use crate::metrics::ProxyMetrics;
use crate::snapshot::{Snapshot, SnapshotError};
use crate::state::Inner;
use crate::sync::lock;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] listeners::BindError),
    #[error("redirect: cannot write the node's rules")]
    Redirect(#[from] crate::redirect::RedirectError),
    #[error("cannot bind the admin server on {addr}")]
    BindAdmin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration")]
    Snapshot(#[from] SnapshotError),
    #[error("cannot register metrics")]
    Metrics(#[from] prometheus::Error),
}

/// What the drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Tunnels still open at the drain deadline, closed with reason `shutdown`.
    pub forced: usize,
}

/// A running proxy.
pub struct ProxyHandle {
    /// Bound address of each listener at start, by name, in config order.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    pub inner: Arc<Inner>,
    shutdown: CancellationToken,
    done: JoinHandle<DrainReport>,
}

impl ProxyHandle {
    /// Bound address of listener `name` now.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.inner.control.listener_addrs().into_iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    /// Starts the graceful shutdown (as on SIGTERM).
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for the shutdown to finish.
    pub async fn wait(self) -> DrainReport {
        self.done.await.unwrap_or(DrainReport { forced: 0 })
    }
}

/// Binds everything and starts serving `config` (parsed from `text`). Returns once every port is bound.
pub async fn start(config: ProxyConfig, text: &str) -> Result<ProxyHandle, StartError> {
    let registry = Registry::new();
    let metrics = ProxyMetrics::register(&registry)?;
    let acme = crate::tls::acme::AcmeCerts::new(metrics.clone());
    let auth_memory = Arc::new(crate::auth::AuthMemory::default());
    let snapshot = Arc::new(Snapshot::build(config, text, 1, &acme, &auth_memory)?);
    let cfg = &snapshot.config;

    let admin_sock = TcpListener::bind(cfg.admin.bind)
        .await
        .map_err(|source| StartError::BindAdmin { addr: cfg.admin.bind, source })?;
    let admin_addr =
        admin_sock.local_addr().map_err(|source| StartError::BindAdmin { addr: cfg.admin.bind, source })?;
    let inner = Arc::new(Inner::new(metrics, registry, snapshot.clone(), admin_addr, acme, auth_memory));
    // The first load is a reload from nothing: the listeners are planned against none running
    // (every address bound before any accepts, so a failure leaves nothing half-started), then
    // started, and the outcome recorded, by the code every reload runs.
    {
        let _serial = inner.control.reload_lock.lock().await;
        let plans = listeners::plan(&inner, &snapshot.config.listeners).await?;
        let cfg = &snapshot.config;
        crate::redirect::sync(&inner.control.redirect, cfg.redirect.as_ref(), &cfg.policy.cluster_networks).await?;
        listeners::apply(&inner, &snapshot.config.listeners, plans).await;
    }
    crate::snapshot::log_warnings(&snapshot.config);
    crate::reload::record(&inner, &Ok(crate::reload::ReloadOutcome::Applied { generation: 1, revoked: 0 }));
    tokio::spawn(housekeeping(inner.clone()));
    let sampled = inner.clone();
    tokio::spawn(async move {
        let s = &sampled;
        crate::memory::watch(&s.memory, &s.metrics, || s.snapshot().config.limits.memory_budget).await;
    });
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::run(inner.clone(), admin_sock, admin_stop.clone()));
    info!(addr = %admin_addr, "admin listening");

    let shutdown = CancellationToken::new();
    let done = tokio::spawn(drain(inner.clone(), shutdown.clone(), admin_stop, admin_task));
    Ok(ProxyHandle { listeners: inner.control.listener_addrs(), admin: admin_addr, inner, shutdown, done })
}

/// Periodic upkeep: closes idle pooled upstream connections past `http.upstreamIdleTimeout` (all of
/// them once the proxy drains), and re-reads the host's addresses for the self-connection check.
async fn housekeeping(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                inner.upstream_pool.sweep(inner.snapshot().config.http.upstream_idle_timeout);
                inner.refresh_own_endpoints();
            }
            () = inner.listeners_closed.cancelled() => {
                inner.upstream_pool.sweep(Duration::ZERO);
                return;
            }
        }
    }
}

/// The shutdown sequence: readiness off, keep accepting for `drainDelay`, stop accepting, give
/// tunnels `drainTimeout`, then close what is left.
async fn drain(
    inner: Arc<Inner>,
    shutdown: CancellationToken,
    admin_stop: CancellationToken,
    admin_task: JoinHandle<()>,
) -> DrainReport {
    shutdown.cancelled().await;
    let limits = inner.snapshot().config.limits;
    inner.set_draining();
    inner.metrics.draining.set(1);
    info!(delay_ms = limits.drain_delay.as_millis() as u64, "draining: readiness off, still accepting");
    // Keep accepting while endpoints converge, so clients that still pick this pod are served.
    sleep(limits.drain_delay).await;
    {
        // A reload in progress finishes first; later ones see `draining` and do nothing.
        let _reload = inner.control.reload_lock.lock().await;
        let running: Vec<RunningListener> = std::mem::take(&mut *lock(&inner.control.listeners));
        for l in &running {
            l.stop.cancel();
        }
        for l in running {
            drop(l.task.await);
        }
    }
    // Idle keep-alive connections close now; HTTP requests in flight finish with `Connection: close`.
    inner.listeners_closed.cancel();
    inner.http_connections.stop_all();
    inner.tracker.close();
    let open = inner.tracker.len();
    info!(
        connections = open,
        timeout_ms = limits.drain_timeout.as_millis() as u64,
        "listeners closed, waiting for tunnels"
    );
    let mut forced = 0;
    if timeout(limits.drain_timeout, inner.tracker.wait()).await.is_err() {
        forced = inner.tunnels.active();
        warn!(tunnels = forced, connections = inner.tracker.len(), "drain deadline passed, closing what is left");
        inner.tunnels.stop_all();
        inner.shutdown.cancel();
        // Closing is quick (FIN both ways, bounded); do not wait forever on a stuck peer.
        let _ = timeout(Duration::from_secs(5), inner.tracker.wait()).await;
    }
    info!(forced, "drained");
    // No listener serves a certificate any more: stop ordering and renewing.
    inner.control.acme.stop_all();
    admin_stop.cancel();
    let _ = admin_task.await;
    DrainReport { forced }
}
