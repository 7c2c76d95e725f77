//! Wiring: binds the listeners and the admin port, owns the shared state ([`Inner`]), and runs
//! the shutdown sequence (readiness off → accept grace → stop accepting → drain → force close).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::Registry;
use proxy_config::addr::{classify, SpecialRange};
use proxy_config::ProxyConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Duration};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::accept::{self, ConnLimiter};
use crate::admin;
use crate::metrics::ProxyMetrics;
use crate::relay::Stops;
use crate::snapshot::{SharedSnapshot, Snapshot, SnapshotError};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind listener \"{name}\" on {addr}")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
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

/// State shared by every task of one proxy process.
pub struct Inner {
    pub metrics: ProxyMetrics,
    pub registry: Registry,
    snapshot: watch::Sender<SharedSnapshot>,
    pub limiter: Arc<ConnLimiter>,
    /// Every connection task (negotiating or relaying): the drain waits on it.
    pub tracker: TaskTracker,
    pub stops: Stops,
    pub next_conn_id: AtomicU64,
    pub active_tunnels: AtomicUsize,
    draining: AtomicBool,
    /// Addresses this process listens on: a target equal to one is refused (self-connection).
    local_endpoints: RwLock<Vec<SocketAddr>>,
}

impl Inner {
    /// The snapshot in force now (an `Arc` clone; never held across an await by the caller's borrow).
    pub fn snapshot(&self) -> SharedSnapshot {
        self.snapshot.borrow().clone()
    }

    /// Ready: serving, not draining.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
    }

    /// Whether connecting to `ip:port` would connect to this proxy.
    pub fn is_self(&self, ip: IpAddr, port: u16) -> bool {
        let ip = ip.to_canonical();
        let eps = self
            .local_endpoints
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        eps.iter().any(|ep| {
            ep.port() == port
                && (ep.ip().to_canonical() == ip
                    || (ep.ip().is_unspecified()
                        && matches!(
                            classify(ip),
                            Some(SpecialRange::Loopback | SpecialRange::Unspecified)
                        )))
        })
    }
}

/// What the drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Tunnels still open at the drain deadline, closed with reason `shutdown`.
    pub forced: usize,
}

/// A running proxy.
pub struct ProxyHandle {
    /// Bound address of each listener, by name, in config order.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    pub inner: Arc<Inner>,
    shutdown: CancellationToken,
    done: JoinHandle<DrainReport>,
}

impl ProxyHandle {
    /// Bound address of listener `name`.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
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
    let snapshot = Arc::new(Snapshot::build(config, text, 1)?);
    let cfg = &snapshot.config;

    // Bind everything before serving anything, so a failure leaves nothing half-started.
    let mut bound = Vec::new();
    for l in &cfg.listeners {
        let sock = TcpListener::bind(l.bind)
            .await
            .map_err(|source| StartError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            })?;
        bound.push((l.name.clone(), sock));
    }
    let admin_sock =
        TcpListener::bind(cfg.admin.bind)
            .await
            .map_err(|source| StartError::BindAdmin {
                addr: cfg.admin.bind,
                source,
            })?;
    let admin_addr = admin_sock
        .local_addr()
        .map_err(|source| StartError::BindAdmin {
            addr: cfg.admin.bind,
            source,
        })?;
    let mut addrs = Vec::new();
    for (name, s) in &bound {
        let a = s.local_addr().map_err(|source| StartError::Bind {
            name: name.clone(),
            addr: cfg.admin.bind,
            source,
        })?;
        addrs.push((name.clone(), a));
    }

    metrics.config_reloads.with_label_values(&["success"]).inc();
    metrics.config_generation.set(1);
    metrics.config_last_reload_success.set(unix_now());
    info!(generation = 1, sha256 = %snapshot.sha256, "configuration loaded");

    let mut endpoints: Vec<SocketAddr> = addrs.iter().map(|(_, a)| *a).collect();
    endpoints.push(admin_addr);
    let (tx, _rx) = watch::channel(snapshot);
    let inner = Arc::new(Inner {
        metrics,
        registry,
        snapshot: tx,
        limiter: Arc::new(ConnLimiter::default()),
        tracker: TaskTracker::new(),
        stops: Stops::default(),
        next_conn_id: AtomicU64::new(1),
        active_tunnels: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
        local_endpoints: RwLock::new(endpoints),
    });

    let stop_accepting = CancellationToken::new();
    let mut accept_tasks = Vec::new();
    for ((name, sock), (_, addr)) in bound.into_iter().zip(&addrs) {
        info!(listener = %name, addr = %addr, "listening");
        accept_tasks.push(tokio::spawn(accept::run(
            inner.clone(),
            Arc::from(name.as_str()),
            sock,
            stop_accepting.child_token(),
        )));
    }
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::run(inner.clone(), admin_sock, admin_stop.clone()));
    info!(addr = %admin_addr, "admin listening");

    let shutdown = CancellationToken::new();
    let done = tokio::spawn(drain(
        inner.clone(),
        shutdown.clone(),
        stop_accepting,
        accept_tasks,
        admin_stop,
        admin_task,
    ));
    Ok(ProxyHandle {
        listeners: addrs,
        admin: admin_addr,
        inner,
        shutdown,
        done,
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The shutdown sequence of SECURITY-CASES §10.8.
async fn drain(
    inner: Arc<Inner>,
    shutdown: CancellationToken,
    stop_accepting: CancellationToken,
    accept_tasks: Vec<JoinHandle<()>>,
    admin_stop: CancellationToken,
    admin_task: JoinHandle<()>,
) -> DrainReport {
    shutdown.cancelled().await;
    let limits = inner.snapshot().config.limits;
    inner.draining.store(true, Ordering::Relaxed);
    inner.metrics.draining.set(1);
    info!(
        delay_ms = limits.drain_delay.as_millis() as u64,
        "draining: readiness off, still accepting"
    );
    // Keep accepting while endpoints converge, so clients that still pick this pod are served.
    sleep(limits.drain_delay).await;
    stop_accepting.cancel();
    for t in accept_tasks {
        let _ = t.await;
    }
    inner.tracker.close();
    let open = inner.tracker.len();
    info!(
        connections = open,
        timeout_ms = limits.drain_timeout.as_millis() as u64,
        "listeners closed, waiting for tunnels"
    );
    let mut forced = 0;
    if timeout(limits.drain_timeout, inner.tracker.wait())
        .await
        .is_err()
    {
        forced = inner.active_tunnels.load(Ordering::Relaxed);
        warn!(
            tunnels = forced,
            connections = inner.tracker.len(),
            "drain deadline passed, closing what is left"
        );
        inner.stops.shutdown.cancel();
        // Closing is quick (FIN both ways, bounded); do not wait forever on a stuck peer.
        let _ = timeout(Duration::from_secs(5), inner.tracker.wait()).await;
    }
    info!(forced, "drained");
    admin_stop.cancel();
    let _ = admin_task.await;
    DrainReport { forced }
}
