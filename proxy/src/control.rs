//! What reload, the admin server and the drain own ([`Control`]): the running listeners, the
//! reload lock, the outcome of the last reload, the change counter `/config` long-polls wait on,
//! the dry-run counts `/config` reports, the ACME certificate sources that outlive configuration
//! generations, and the node's redirect rules last written. Connections never read it; they count dry-run verdicts into it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::sync::lock;
use crate::tls::acme::AcmeCerts;

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

/// The control plane's state.
pub struct Control {
    pub(crate) listeners: Mutex<Vec<RunningListener>>,
    /// Serializes reloads (the first load too), so exactly one snapshot wins and listener changes
    /// never interleave.
    pub(crate) reload_lock: tokio::sync::Mutex<()>,
    /// ACME certificate sources, which outlive configuration generations.
    pub acme: AcmeCerts,
    /// The node's redirect rules last written (`None`: none written by this process).
    pub(crate) redirect: Mutex<Option<String>>,
    /// Why the last reload failed (`None`: it succeeded, or none was tried).
    last_reload_failure: Mutex<Option<&'static str>>,
    /// Bumped on every new snapshot and every reload outcome: `/config` long-polls wait on it.
    changes: watch::Sender<u64>,
    /// Dry-run verdicts by rule since the start: [would deny, would allow], for `/config`.
    dry_run_counts: Mutex<BTreeMap<String, [u64; 2]>>,
    /// When dry-run counts last woke the `/config` long-polls (at most every 5 s, so traffic never
    /// turns the operator's long-polls into a storm).
    dry_run_announced: Mutex<Option<tokio::time::Instant>>,
}

impl Control {
    pub(crate) fn new(acme: AcmeCerts) -> Control {
        Control {
            listeners: Mutex::new(Vec::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            acme,
            redirect: Mutex::new(None),
            last_reload_failure: Mutex::new(None),
            changes: watch::channel(0).0,
            dry_run_counts: Mutex::new(BTreeMap::new()),
            dry_run_announced: Mutex::new(None),
        }
    }

    /// Deletes the node's redirect rules if this process wrote them (the proxy is leaving for good);
    /// returns whether it did.
    pub async fn remove_redirect(&self) -> Result<bool, crate::redirect::RedirectError> {
        crate::redirect::remove(&self.redirect).await
    }

    /// Something `/config` reports changed.
    pub(crate) fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    pub(crate) fn set_reload_failure(&self, reason: Option<&'static str>) {
        let mut f = lock(&self.last_reload_failure);
        if *f != reason {
            *f = reason;
            self.changed();
        }
    }

    /// Why the last reload failed, if it did.
    pub fn reload_failure(&self) -> Option<&'static str> {
        *lock(&self.last_reload_failure)
    }

    /// A receiver that sees every change of what `/config` reports.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub(crate) fn count_dry_run(&self, rule: &str, would_deny: bool) {
        let mut counts = lock(&self.dry_run_counts);
        // Rule names come from the configuration (bounded); a rule that left the configuration
        // keeps its count until the process restarts.
        let c = counts.entry(rule.to_owned()).or_default();
        c[usize::from(!would_deny)] += 1;
        drop(counts);
        let mut announced = lock(&self.dry_run_announced);
        if announced.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            *announced = Some(tokio::time::Instant::now());
            self.changed();
        }
    }

    /// Dry-run verdicts by rule since the start, as `/config` reports them.
    pub fn dry_run_counts(&self) -> BTreeMap<String, proxy_config::status::DryRunCount> {
        let counts = lock(&self.dry_run_counts);
        counts
            .iter()
            .map(|(r, c)| (r.clone(), proxy_config::status::DryRunCount { would_deny: c[0], would_allow: c[1] }))
            .collect()
    }

    /// Bound address of each listener, by name.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        lock(&self.listeners).iter().map(|l| (l.name.clone(), l.addr)).collect()
    }
}
