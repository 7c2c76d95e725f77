//! Wiring: binds the listeners and the admin port, owns the shared state ([`Inner`]), and runs
//! the shutdown sequence (readiness off → accept grace → stop accepting → drain → force close).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::Registry;
use proxy_config::addr::{classify, SpecialRange};
use proxy_config::{Host, ProxyConfig};
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

/// A listener that is accepting now.
pub(crate) struct RunningListener {
    pub(crate) name: String,
    /// The configured address (port may be 0).
    pub(crate) bind: SocketAddr,
    /// The bound address.
    pub(crate) addr: SocketAddr,
    pub(crate) stop: CancellationToken,
    pub(crate) task: JoinHandle<TcpListener>,
}

/// What a reload needs to know about an established tunnel to re-decide it.
pub(crate) struct TunnelEntry {
    pub(crate) client: IpAddr,
    pub(crate) host: Host,
    pub(crate) port: u16,
    pub(crate) addrs: Vec<IpAddr>,
    pub(crate) revoke: CancellationToken,
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
    pub(crate) listeners: Mutex<Vec<RunningListener>>,
    pub(crate) tunnels: Mutex<HashMap<u64, TunnelEntry>>,
    /// Serializes reloads, so exactly one snapshot wins and listener changes never interleave.
    pub(crate) reload_lock: tokio::sync::Mutex<()>,
    admin_addr: SocketAddr,
}

impl Inner {
    /// The snapshot in force now (an `Arc` clone; no borrow is held).
    pub fn snapshot(&self) -> SharedSnapshot {
        self.snapshot.borrow().clone()
    }

    pub(crate) fn publish(&self, s: SharedSnapshot) {
        self.snapshot.send_replace(s);
    }

    /// Ready: serving, not draining.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Bound address of each listener, by name.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        lock(&self.listeners).iter().map(|l| (l.name.clone(), l.addr)).collect()
    }

    /// Whether connecting to `ip:port` would connect to this proxy (a listener or the admin port).
    pub fn is_self(&self, ip: IpAddr, port: u16) -> bool {
        let ip = ip.to_canonical();
        let mut eps: Vec<SocketAddr> = lock(&self.listeners).iter().map(|l| l.addr).collect();
        eps.push(self.admin_addr);
        eps.iter().any(|ep| {
            ep.port() == port
                && (ep.ip().to_canonical() == ip
                    || (ep.ip().is_unspecified()
                        && matches!(classify(ip), Some(SpecialRange::Loopback | SpecialRange::Unspecified))))
        })
    }

    /// Starts accepting on `sock` as listener `name`.
    pub(crate) fn start_listener(
        self: &Arc<Self>,
        name: &str,
        bind: SocketAddr,
        sock: TcpListener,
    ) -> std::io::Result<()> {
        let addr = sock.local_addr()?;
        let stop = CancellationToken::new();
        info!(listener = %name, addr = %addr, "listening");
        let task = tokio::spawn(accept::run(self.clone(), Arc::from(name), sock, stop.clone()));
        lock(&self.listeners).push(RunningListener { name: name.to_owned(), bind, addr, stop, task });
        Ok(())
    }
}

/// Locks a std mutex, ignoring poisoning (no code path panics while holding one).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
        self.inner.listener_addrs().into_iter().find(|(n, _)| n == name).map(|(_, a)| a)
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
        let sock = TcpListener::bind(l.bind).await.map_err(|source| StartError::Bind {
            name: l.name.clone(),
            addr: l.bind,
            source,
        })?;
        bound.push((l.name.clone(), l.bind, sock));
    }
    let admin_sock = TcpListener::bind(cfg.admin.bind)
        .await
        .map_err(|source| StartError::BindAdmin { addr: cfg.admin.bind, source })?;
    let admin_addr =
        admin_sock.local_addr().map_err(|source| StartError::BindAdmin { addr: cfg.admin.bind, source })?;

    metrics.config_reloads.with_label_values(&["success"]).inc();
    metrics.config_generation.set(1);
    metrics.config_last_reload_success.set(unix_now());
    info!(generation = 1, sha256 = %snapshot.sha256, "configuration loaded");
    crate::snapshot::log_warnings(&snapshot.config);

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
        listeners: Mutex::new(Vec::new()),
        tunnels: Mutex::new(HashMap::new()),
        reload_lock: tokio::sync::Mutex::new(()),
        admin_addr,
    });
    for (name, bind, sock) in bound {
        inner.start_listener(&name, bind, sock).map_err(|source| StartError::Bind {
            name: name.clone(),
            addr: bind,
            source,
        })?;
    }
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::run(inner.clone(), admin_sock, admin_stop.clone()));
    info!(addr = %admin_addr, "admin listening");

    let shutdown = CancellationToken::new();
    let done = tokio::spawn(drain(inner.clone(), shutdown.clone(), admin_stop, admin_task));
    Ok(ProxyHandle { listeners: inner.listener_addrs(), admin: admin_addr, inner, shutdown, done })
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The shutdown sequence of SECURITY-CASES §10.8.
async fn drain(
    inner: Arc<Inner>,
    shutdown: CancellationToken,
    admin_stop: CancellationToken,
    admin_task: JoinHandle<()>,
) -> DrainReport {
    shutdown.cancelled().await;
    let limits = inner.snapshot().config.limits;
    inner.draining.store(true, Ordering::Relaxed);
    inner.metrics.draining.set(1);
    info!(delay_ms = limits.drain_delay.as_millis() as u64, "draining: readiness off, still accepting");
    // Keep accepting while endpoints converge, so clients that still pick this pod are served.
    sleep(limits.drain_delay).await;
    {
        // A reload in progress finishes first; later ones see `draining` and do nothing.
        let _reload = inner.reload_lock.lock().await;
        let running: Vec<RunningListener> = std::mem::take(&mut *lock(&inner.listeners));
        for l in &running {
            l.stop.cancel();
        }
        for l in running {
            drop(l.task.await);
        }
    }
    inner.tracker.close();
    let open = inner.tracker.len();
    info!(
        connections = open,
        timeout_ms = limits.drain_timeout.as_millis() as u64,
        "listeners closed, waiting for tunnels"
    );
    let mut forced = 0;
    if timeout(limits.drain_timeout, inner.tracker.wait()).await.is_err() {
        forced = inner.active_tunnels.load(Ordering::Relaxed);
        warn!(tunnels = forced, connections = inner.tracker.len(), "drain deadline passed, closing what is left");
        inner.stops.shutdown.cancel();
        // Closing is quick (FIN both ways, bounded); do not wait forever on a stuck peer.
        let _ = timeout(Duration::from_secs(5), inner.tracker.wait()).await;
    }
    info!(forced, "drained");
    admin_stop.cancel();
    let _ = admin_task.await;
    DrainReport { forced }
}
