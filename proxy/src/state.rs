//! The state shared by every task of one proxy process ([`Inner`]): what connections read (the
//! configuration in force, metrics, caps, the upstream pool, tunnels, memory pressure, the proxy's
//! own endpoints) and what reload, admin and the drain keep (listeners, the last reload's outcome,
//! the change counter, dry-run counts, ACME). It holds those parts; it never imports the paths that
//! use it (accept, conn, forward, reload, admin).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn_limit::ConnLimiter;
use crate::forward::pool::UpstreamPool;
use crate::memory::MemoryPressure;
use crate::metrics::ProxyMetrics;
use crate::own_addresses;
use crate::snapshot::SharedSnapshot;
use crate::stop::StopSet;
use crate::sync::lock;
use crate::tunnels::Tunnels;

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

/// State shared by every task of one proxy process.
pub struct Inner {
    pub metrics: ProxyMetrics,
    pub registry: Registry,
    snapshot: watch::Sender<SharedSnapshot>,
    pub limiter: Arc<ConnLimiter>,
    /// Every connection task (negotiating, serving HTTP or relaying): the drain waits on it.
    pub tracker: TaskTracker,
    /// The drain deadline passed: connections not yet tunnels close (established tunnels are
    /// stopped through their registry).
    pub shutdown: CancellationToken,
    /// Listeners stopped accepting: housekeeping empties the upstream pool and ends.
    pub listeners_closed: CancellationToken,
    /// Open plain-HTTP connections: when the listeners stop accepting, each finishes the request
    /// in flight and closes.
    pub http_connections: StopSet,
    pub next_conn_id: AtomicU64,
    /// Established tunnels (CONNECT and upgraded HTTP), for the drain and for revocation.
    pub tunnels: Tunnels,
    /// Idle upstream connections of the plain-HTTP path.
    pub upstream_pool: UpstreamPool,
    /// Memory-pressure load shedding.
    pub memory: MemoryPressure,
    /// This host's addresses (all interfaces), refreshed periodically: a listener bound to 0.0.0.0
    /// is reachable on each of them, so each is the proxy itself on its ports.
    host_addrs: Mutex<Arc<Vec<IpAddr>>>,
    draining: AtomicBool,
    pub(crate) listeners: Mutex<Vec<RunningListener>>,
    /// Serializes reloads, so exactly one snapshot wins and listener changes never interleave.
    pub(crate) reload_lock: tokio::sync::Mutex<()>,
    admin_addr: SocketAddr,
    /// ACME certificate sources, which outlive configuration generations.
    pub acme: crate::tls::acme::AcmeCerts,
    /// Verified credentials and guessing buckets, kept across generations.
    pub auth_memory: Arc<crate::auth::AuthMemory>,
    /// Why the last reload failed (`None`: it succeeded, or none was tried).
    last_reload_failure: Mutex<Option<&'static str>>,
    /// Bumped on every new snapshot and every reload outcome: `/config` long-polls wait on it.
    changes: watch::Sender<u64>,
    /// Dry-run verdicts by rule since the start: [would deny, would allow], for `/config`.
    dry_run_counts: Mutex<std::collections::BTreeMap<String, [u64; 2]>>,
    /// When dry-run counts last woke the `/config` long-polls (at most every 5 s, so traffic never
    /// turns the operator's long-polls into a storm).
    dry_run_announced: Mutex<Option<tokio::time::Instant>>,
}

/// Sets the gauges that describe the config in force: its render number, its digest and the
/// expiry of its listeners' certificates.
fn describe(metrics: &ProxyMetrics, s: &crate::snapshot::Snapshot) {
    metrics.config_render.set(s.render.and_then(|r| i64::try_from(r).ok()).unwrap_or(0));
    metrics.config_info.reset();
    metrics.config_info.with_label_values(&[s.sha256.get(..12).unwrap_or(&s.sha256)]).set(1);
    metrics.tls_certificate_expiry.reset();
    for (listener, tls) in &s.tls {
        if let Some(t) = tls.expires {
            metrics.tls_certificate_expiry.with_label_values(&[listener]).set(t);
        }
    }
}

impl Inner {
    pub(crate) fn new(
        metrics: ProxyMetrics,
        registry: Registry,
        snapshot: SharedSnapshot,
        admin_addr: SocketAddr,
        acme: crate::tls::acme::AcmeCerts,
        auth_memory: Arc<crate::auth::AuthMemory>,
    ) -> Inner {
        let tunnels = Tunnels::new(metrics.tunnels_active.clone());
        let upstream_pool = UpstreamPool::new(metrics.upstream_pool_idle.clone());
        describe(&metrics, &snapshot);
        let (tx, _rx) = watch::channel(snapshot);
        Inner {
            metrics,
            registry,
            snapshot: tx,
            limiter: Arc::new(ConnLimiter::default()),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            listeners_closed: CancellationToken::new(),
            http_connections: StopSet::default(),
            next_conn_id: AtomicU64::new(1),
            tunnels,
            upstream_pool,
            memory: MemoryPressure::default(),
            host_addrs: Mutex::new(Arc::new(own_addresses::host_addresses())),
            draining: AtomicBool::new(false),
            listeners: Mutex::new(Vec::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            admin_addr,
            acme,
            auth_memory,
            last_reload_failure: Mutex::new(None),
            dry_run_counts: Mutex::new(std::collections::BTreeMap::new()),
            dry_run_announced: Mutex::new(None),
            changes: watch::channel(0).0,
        }
    }

    /// The snapshot in force now (an `Arc` clone; no borrow is held).
    pub fn snapshot(&self) -> SharedSnapshot {
        self.snapshot.borrow().clone()
    }

    pub(crate) fn publish(&self, s: SharedSnapshot) {
        describe(&self.metrics, &s);
        self.snapshot.send_replace(s);
        self.changes.send_modify(|n| *n += 1);
    }

    pub(crate) fn set_reload_failure(&self, reason: Option<&'static str>) {
        let mut f = lock(&self.last_reload_failure);
        if *f != reason {
            *f = reason;
            self.changes.send_modify(|n| *n += 1);
        }
    }

    pub(crate) fn count_dry_run(&self, rule: &str, would_deny: bool) {
        let mut counts = lock(&self.dry_run_counts);
        // Rule names come from the configuration (bounded); a rule that left the configuration
        // keeps its count until the process restarts.
        let c = counts.entry(rule.to_owned()).or_default();
        c[usize::from(!would_deny)] += 1;
        drop(counts);
        let mut announced = lock(&self.dry_run_announced);
        if announced.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(5)) {
            *announced = Some(tokio::time::Instant::now());
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Dry-run verdicts by rule since the start, as `/config` reports them.
    pub fn dry_run_counts(&self) -> std::collections::BTreeMap<String, proxy_config::status::DryRunCount> {
        let counts = lock(&self.dry_run_counts);
        counts
            .iter()
            .map(|(r, c)| (r.clone(), proxy_config::status::DryRunCount { would_deny: c[0], would_allow: c[1] }))
            .collect()
    }

    /// Why the last reload failed, if it did.
    pub fn reload_failure(&self) -> Option<&'static str> {
        *lock(&self.last_reload_failure)
    }

    /// A receiver that sees every change of what `/config` reports.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Ready: serving, not draining.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Bound address of each listener, by name.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        lock(&self.listeners).iter().map(|l| (l.name.clone(), l.addr)).collect()
    }

    /// Whether connecting to `ip:port` would connect to this proxy (a listener or the admin port,
    /// on any address of the host).
    pub fn is_self(&self, ip: IpAddr, port: u16) -> bool {
        let mut eps: Vec<SocketAddr> = lock(&self.listeners).iter().map(|l| l.addr).collect();
        eps.push(self.admin_addr);
        let host = lock(&self.host_addrs).clone();
        own_addresses::is_own_endpoint(&eps, &host, ip, port)
    }

    /// Whether a new request must be refused for memory (counted when it is).
    pub fn shed_for_memory(&self) -> bool {
        let shed = self.memory.is_overloaded();
        if shed {
            self.metrics.memory_shed.inc();
        }
        shed
    }

    /// Reads the host's addresses again (interfaces come and go).
    pub(crate) fn refresh_host_addrs(&self) {
        *lock(&self.host_addrs) = Arc::new(own_addresses::host_addresses());
    }
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
