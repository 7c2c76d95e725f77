//! Established tunnels (CONNECT, upgraded HTTP connections and tunnel listeners' connections): a
//! registry with an RAII registration that keeps the active gauge and count, lets a reload revoke
//! what its policy no longer allows, and lets the drain count and stop what is left.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntGaugeVec;
use proxy_config::{Decision, Host, Policy};

use crate::stop::{Membership, StopReason, StopSet};

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

/// The registry; one per process.
pub struct Tunnels {
    set: StopSet<Admitted>,
    active: Arc<AtomicUsize>,
    gauge: IntGaugeVec,
}

/// One established tunnel; deregisters when dropped (however the tunnel ends).
pub struct Registration {
    /// Its stop signal (`stop`) is set when a reload's policy no longer allows this tunnel, or at
    /// the drain deadline.
    pub membership: Membership<Admitted>,
    active: Arc<AtomicUsize>,
    gauge: prometheus::IntGauge,
}

impl Tunnels {
    pub(crate) fn new(gauge: IntGaugeVec) -> Tunnels {
        Tunnels { set: StopSet::default(), active: Arc::default(), gauge }
    }

    /// Registers a tunnel of `listener`.
    pub fn register(&self, listener: &str, admitted: Admitted) -> Registration {
        let membership = self.set.join(admitted);
        self.active.fetch_add(1, Ordering::Relaxed);
        let gauge = self.gauge.with_label_values(&[listener]);
        gauge.inc();
        Registration { membership, active: self.active.clone(), gauge }
    }

    /// Tunnels open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Revokes the tunnels `policy` no longer allows (close reason `revoked`); returns how many.
    pub(crate) fn revoke_denied(&self, policy: &Policy) -> usize {
        self.set.stop_where(StopReason::Revoked, |t| {
            t.revocable
                && matches!(
                    policy.decide_as(t.client, t.user.as_deref(), &t.host, t.port, &t.addrs),
                    Decision::Deny { .. }
                )
        })
    }

    /// Stops every tunnel (close reason `shutdown`), and any registered from now on.
    pub(crate) fn stop_all(&self) {
        self.set.stop_all();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnels() -> Tunnels {
        let gauge = IntGaugeVec::new(prometheus::Opts::new("t", "t"), &["listener"]).unwrap();
        Tunnels::new(gauge)
    }

    fn admitted() -> Admitted {
        let host = proxy_config::host::parse_host("example.com").unwrap();
        Admitted { client: [10, 0, 0, 1].into(), host, port: 443, addrs: vec![], user: None, revocable: true }
    }

    /// The drain stops the tunnels open at its deadline and any established after it (a
    /// connection that finished dialling meanwhile), each with the close reason `shutdown`.
    #[test]
    fn stop_all_stops_open_tunnels_and_later_ones() {
        let t = tunnels();
        let open = t.register("l", admitted());
        assert_eq!(open.membership.stop.reason(), None);
        t.stop_all();
        assert_eq!(open.membership.stop.reason(), Some(StopReason::Shutdown));
        let later = t.register("l", admitted());
        assert_eq!(later.membership.stop.reason(), Some(StopReason::Shutdown));
        assert_eq!(t.active(), 2);
        drop((open, later));
        assert_eq!(t.active(), 0);
    }
}
