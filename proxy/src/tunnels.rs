//! Established tunnels (CONNECT and upgraded HTTP connections): a registry with an RAII
//! registration that keeps the active gauge and count, lets a reload revoke what its policy no
//! longer allows, and tells the drain how many are left.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntGaugeVec;
use proxy_config::{Decision, Host, Policy};
use tokio_util::sync::CancellationToken;

use crate::state::lock;

/// What a reload needs to know about an established tunnel to re-decide it.
pub struct Admitted {
    pub client: IpAddr,
    pub host: Host,
    pub port: u16,
    /// The addresses the decision was made on.
    pub addrs: Vec<IpAddr>,
    pub user: Option<String>,
    /// Whether a policy decision admitted it (false for a tunnel listener's fixed upstream).
    pub revocable: bool,
}

struct Entry {
    admitted: Admitted,
    revoke: CancellationToken,
}

/// The registry; one per process.
pub struct Tunnels {
    entries: Arc<Mutex<HashMap<u64, Entry>>>,
    active: Arc<AtomicUsize>,
    next_id: AtomicU64,
    gauge: IntGaugeVec,
}

/// One established tunnel; deregisters when dropped (however the tunnel ends).
pub struct Registration {
    id: u64,
    entries: Arc<Mutex<HashMap<u64, Entry>>>,
    active: Arc<AtomicUsize>,
    gauge: prometheus::IntGauge,
    /// Cancelled when a reload's policy no longer allows this tunnel.
    pub revoke: CancellationToken,
}

impl Tunnels {
    pub(crate) fn new(gauge: IntGaugeVec) -> Tunnels {
        Tunnels { entries: Arc::default(), active: Arc::default(), next_id: AtomicU64::new(1), gauge }
    }

    /// Registers a tunnel of `listener`.
    pub fn register(&self, listener: &str, admitted: Admitted) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let revoke = CancellationToken::new();
        lock(&self.entries).insert(id, Entry { admitted, revoke: revoke.clone() });
        self.active.fetch_add(1, Ordering::Relaxed);
        let gauge = self.gauge.with_label_values(&[listener]);
        gauge.inc();
        Registration { id, entries: self.entries.clone(), active: self.active.clone(), gauge, revoke }
    }

    /// Tunnels open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Revokes the tunnels `policy` no longer allows (close reason `revoked`); returns how many.
    pub(crate) fn revoke_denied(&self, policy: &Policy) -> usize {
        let entries = lock(&self.entries);
        let mut n = 0;
        for e in entries.values().filter(|e| e.admitted.revocable) {
            let t = &e.admitted;
            if let Decision::Deny { .. } = policy.decide_as(t.client, t.user.as_deref(), &t.host, t.port, &t.addrs) {
                e.revoke.cancel();
                n += 1;
            }
        }
        n
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.entries).remove(&self.id);
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}
