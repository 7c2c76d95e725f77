//! The state shared by every task of one proxy process ([`Inner`]): what connections read and
//! update (the configuration in force, metrics, caps, the upstream pool, tunnels, memory
//! pressure, the proxy's own endpoints, the drain's signals), and the control plane
//! ([`Control`]) that reload, admin and the drain own. It holds those parts; it never imports the
//! paths that use it (accept, conn, forward, reload, admin).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use proxy_config::decide::OwnEndpoints;

use crate::conn_limit::ConnLimiter;
use crate::control::Control;
use crate::forward::pool::UpstreamPool;
use crate::memory::MemoryPressure;
use crate::metrics::ProxyMetrics;
use crate::own_addresses;
use crate::snapshot::SharedSnapshot;
use crate::stop::StopSet;
use crate::sync::lock;
use crate::tunnels::Tunnels;

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
    /// The proxy's own endpoints (listeners and the admin port, on every address of this host):
    /// a target among them is refused. Refreshed when listeners change and periodically (host
    /// addresses come and go).
    own: Mutex<Arc<OwnEndpoints>>,
    /// The admin port's bound address (fixed for the process's life).
    admin_addr: SocketAddr,
    draining: AtomicBool,
    /// Verified credentials and guessing buckets, kept across generations.
    pub auth_memory: Arc<crate::auth::AuthMemory>,
    /// Listeners, reloads, `/config`'s counters, ACME.
    pub control: Control,
    /// Which parent proxies failed, kept across reloads.
    pub parent_health: crate::parent::ParentHealth,
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
        let parent_health = crate::parent::ParentHealth::default();
        parent_health.publish(&snapshot.config.parents, &metrics);
        let (tx, _rx) = watch::channel(snapshot);
        let own = OwnEndpoints { endpoints: vec![admin_addr], hosts: own_addresses::host_addresses() };
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
            own: Mutex::new(Arc::new(own)),
            admin_addr,
            draining: AtomicBool::new(false),
            auth_memory,
            control: Control::new(acme),
            parent_health,
        }
    }

    /// The snapshot in force now (an `Arc` clone; no borrow is held).
    pub fn snapshot(&self) -> SharedSnapshot {
        self.snapshot.borrow().clone()
    }

    pub(crate) fn publish(&self, s: SharedSnapshot) {
        describe(&self.metrics, &s);
        self.parent_health.publish(&s.config.parents, &self.metrics);
        self.snapshot.send_replace(s);
        self.control.changed();
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

    /// Whether a new request must be refused for memory (counted when it is).
    pub fn shed_for_memory(&self) -> bool {
        let shed = self.memory.is_overloaded();
        if shed {
            self.metrics.memory_shed.inc();
        }
        shed
    }

    /// Whether connecting to `ip:port` would connect to this proxy (a listener or the admin port,
    /// on any address of the host).
    pub fn is_self(&self, ip: IpAddr, port: u16) -> bool {
        let own = lock(&self.own).clone();
        own.contains(ip, port)
    }

    /// Reads the listeners' bound addresses and the host's addresses again (after a listener
    /// change, and periodically: interfaces come and go).
    pub(crate) fn refresh_own_endpoints(&self) {
        let mut endpoints: Vec<SocketAddr> = lock(&self.control.listeners).iter().map(|l| l.addr).collect();
        endpoints.push(self.admin_addr);
        *lock(&self.own) = Arc::new(OwnEndpoints { endpoints, hosts: own_addresses::host_addresses() });
    }
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
