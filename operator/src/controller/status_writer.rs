//! The status writer: policy statuses leave the reconcile through a queue that keeps only the
//! latest wanted status per policy and writes them at a bounded rate, so a burst (a start, or a
//! change that touches every policy) never delays the next render, and an API outage costs one
//! log line and a backoff, not an error per policy. A write the API refuses for that policy alone
//! (too large, invalid) backs off alone: the other policies' statuses go on being written.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use proxy_config::origin::PolicyId;

use crate::crd::{ClusterTunnelPolicy, TunnelPolicy, TunnelPolicyStatus};
use crate::lenient::Lenient;
use crate::metrics::Metrics;

/// Statuses waiting to be written, newest wins, and what was written lately.
#[derive(Default)]
struct Queue {
    pending: BTreeMap<String, (PolicyId, TunnelPolicyStatus)>,
    /// What was written and when: the reflector lags a write by a moment, and a reconcile in that
    /// moment would queue the same status again.
    written: HashMap<String, (TunnelPolicyStatus, Instant)>,
    /// Policies whose last write the API refused for them alone: not before, and the backoff.
    retry_at: HashMap<String, (Instant, Duration)>,
}

/// How long a write suppresses the same status queued again.
const ECHO_WINDOW: Duration = Duration::from_secs(5);
/// Longest pause after failed writes.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The handle the reconcile queues statuses on.
#[derive(Clone)]
pub(super) struct StatusWriter {
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    /// False on a release that must not write policy status (another release in the cluster
    /// does): two operators with different proxies would rewrite each other's counts forever.
    enabled: bool,
}

impl StatusWriter {
    /// Starts the writing task: at most `per_second` writes a second.
    pub(super) fn spawn(
        client: Client,
        metrics: Metrics,
        per_second: u32,
        enabled: bool,
        shutdown: CancellationToken,
    ) -> StatusWriter {
        let w = StatusWriter { queue: Arc::default(), wake: Arc::new(Notify::new()), enabled };
        let task = w.clone();
        let spacing = Duration::from_secs(1) / per_second.max(1);
        tokio::spawn(async move { task.run(client, metrics, spacing, shutdown).await });
        w
    }

    /// Wants `status` (the whole `status` object) written for `target`; replaces a pending one.
    pub(super) fn want(&self, target: PolicyId, status: TunnelPolicyStatus) {
        if !self.enabled {
            return;
        }
        let key = target.to_string();
        {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            if q.written.get(&key).is_some_and(|(s, at)| *s == status && at.elapsed() < ECHO_WINDOW) {
                q.pending.remove(&key);
                return;
            }
            // A new status for a policy whose write was refused is tried at once.
            if q.pending.get(&key).is_none_or(|(_, pending)| *pending != status) {
                q.retry_at.remove(&key);
            }
            q.pending.insert(key, (target, status));
        }
        self.wake.notify_one();
    }

    /// Statuses not yet written.
    pub(super) fn pending(&self) -> usize {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).pending.len()
    }

    /// The next status to write: the first pending one that is not backing off. `Err` with the
    /// earliest retry when every pending one is backing off.
    fn next(&self) -> Result<Option<(String, PolicyId, TunnelPolicyStatus)>, Instant> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let ready = q.pending.keys().find(|k| q.retry_at.get(*k).is_none_or(|(at, _)| *at <= now)).cloned();
        match ready {
            Some(key) => Ok(q.pending.remove(&key).map(|(t, s)| (key, t, s))),
            None => match q.pending.keys().filter_map(|k| q.retry_at.get(k).map(|(at, _)| *at)).min() {
                Some(at) => Err(at),
                None => Ok(None),
            },
        }
    }

    async fn run(self, client: Client, metrics: Metrics, spacing: Duration, shutdown: CancellationToken) {
        let mut backoff = Duration::ZERO;
        loop {
            let (key, target, status) = match self.next() {
                Ok(Some(next)) => next,
                Ok(None) => {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = self.wake.notified() => continue,
                    }
                }
                Err(at) => {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = self.wake.notified() => continue,
                        () = tokio::time::sleep_until(at) => continue,
                    }
                }
            };
            let started = Instant::now();
            let written = write(&client, &target, &status).await;
            // The queue's length as the writer works through it (not only as of the last plan).
            let left = self.pending() + usize::from(written.is_err());
            metrics.status_pending.set(i64::try_from(left).unwrap_or(i64::MAX));
            match written {
                Ok(()) => {
                    metrics.status_writes.with_label_values(&["success"]).inc();
                    if !backoff.is_zero() {
                        info!("status writes resumed");
                        backoff = Duration::ZERO;
                    }
                    let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                    q.written.retain(|_, (_, at)| at.elapsed() < ECHO_WINDOW);
                    q.retry_at.remove(&key);
                    q.written.insert(key, (status, Instant::now()));
                }
                // Refused for this policy alone (too large, invalid, conflicting): it backs off
                // alone, and the others are written meanwhile.
                Err(kube::Error::Api(e)) if (400..500).contains(&e.code) && e.code != 429 => {
                    metrics.status_writes.with_label_values(&["failure"]).inc();
                    let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                    let last = q.retry_at.get(&key).map_or(Duration::ZERO, |(_, b)| *b);
                    let wait = (last * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
                    if last.is_zero() {
                        warn!(policy = %key, code = e.code, reason = %e.reason, "status write refused for this policy; retrying it alone with backoff");
                    }
                    q.retry_at.insert(key.clone(), (Instant::now() + wait, wait));
                    q.pending.entry(key).or_insert((target, status));
                }
                Err(e) => {
                    metrics.status_writes.with_label_values(&["failure"]).inc();
                    if backoff.is_zero() {
                        // One line per outage; the rest wait for the API to answer again.
                        warn!(error = %e, "status writes failing; retrying with backoff");
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(200), MAX_BACKOFF);
                    let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                    q.pending.entry(key).or_insert((target, status));
                }
            }
            let pause = spacing.saturating_sub(started.elapsed()).max(backoff);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// A merge patch of the status subresource; a policy deleted meanwhile is not an error. The
/// answer is read leniently: a policy that does not deserialize gets a status too.
async fn write(client: &Client, target: &PolicyId, status: &TunnelPolicyStatus) -> Result<(), kube::Error> {
    let body = Patch::Merge(serde_json::json!({ "status": status }));
    // Named, so `managedFields` says who owns the status (as for every other write of the operator).
    let pp = PatchParams { field_manager: Some(super::MANAGER.to_owned()), ..PatchParams::default() };
    let r = match target {
        PolicyId::Namespaced { namespace, name } => Api::<Lenient<TunnelPolicy>>::namespaced(client.clone(), namespace)
            .patch_status(name, &pp, &body)
            .await
            .map(|_| ()),
        PolicyId::Cluster { name } => {
            Api::<Lenient<ClusterTunnelPolicy>>::all(client.clone()).patch_status(name, &pp, &body).await.map(|_| ())
        }
    };
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use prometheus::Registry;
    use serde_json::json;

    fn target(name: &str) -> PolicyId {
        PolicyId::namespaced("ns", name)
    }

    fn generation(n: i64) -> TunnelPolicyStatus {
        TunnelPolicyStatus { observed_generation: Some(n), ..TunnelPolicyStatus::default() }
    }

    #[tokio::test]
    async fn a_refused_policy_backs_off_alone() {
        let w = StatusWriter { queue: Arc::default(), wake: Arc::new(Notify::new()), enabled: true };
        w.want(target("a"), generation(1));
        w.want(target("b"), generation(1));
        let later = Instant::now() + Duration::from_secs(10);
        w.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retry_at
            .insert("ns/a".into(), (later, Duration::from_secs(10)));
        // "a" sorts first but waits; "b" is written meanwhile.
        assert!(matches!(w.next(), Ok(Some((k, _, _))) if k == "ns/b"));
        assert_eq!(w.next().err(), Some(later), "only the backing-off one is left");
        // A changed status for "a" is tried at once.
        w.want(target("a"), generation(2));
        assert!(matches!(w.next(), Ok(Some((k, _, s))) if k == "ns/a" && s.observed_generation == Some(2)));
        assert!(matches!(w.next(), Ok(None)));
    }

    #[tokio::test(start_paused = true)]
    async fn newest_status_wins_failures_back_off_and_an_echo_is_not_rewritten() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let stop = CancellationToken::new();
        let w = StatusWriter::spawn(Client::new(svc, "default"), metrics.clone(), 100, true, stop.clone());
        let p = || PolicyId::namespaced("a", "p");
        // Three statuses before the writer runs: one write, the newest.
        for n in 1..=3 {
            w.want(p(), generation(n));
        }
        let path = "/apis/tunnelgate.io/v1alpha1/namespaces/a/tunnelpolicies/p/status";
        let mut bodies = Vec::new();
        for code in [500u16, 200] {
            let (req, send) = handle.next_request().await.expect("a status write");
            assert_eq!(req.uri().path(), path);
            let body = req.into_body().collect_bytes().await.unwrap();
            bodies.push(serde_json::from_slice::<serde_json::Value>(&body).unwrap());
            let reply = if code == 500 {
                json!({"kind": "Status", "code": 500, "status": "Failure", "reason": "InternalError", "message": "boom"})
            } else {
                json!({"apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy", "metadata": {"name": "p", "namespace": "a"}})
            };
            send.send_response(
                Response::builder().status(code).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap(),
            );
        }
        assert_eq!(
            bodies,
            vec![json!({"status": {"observedGeneration": 3, "conditions": []}}); 2],
            "the newest, retried after the failure"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(metrics.status_writes.with_label_values(&["failure"]).get(), 1);
        assert_eq!(metrics.status_writes.with_label_values(&["success"]).get(), 1);
        // The reflector has not caught up yet and the reconcile asks again: nothing is written.
        w.want(p(), generation(3));
        assert_eq!(w.pending(), 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.cancel();
        assert_eq!(metrics.status_writes.with_label_values(&["success"]).get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_that_does_not_own_status_writes_none() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let stop = CancellationToken::new();
        let w = StatusWriter::spawn(Client::new(svc, "default"), metrics, 100, false, stop.clone());
        w.want(PolicyId::cluster("c"), generation(1));
        assert_eq!(w.pending(), 0);
        let asked = tokio::time::timeout(Duration::from_secs(10), handle.next_request()).await;
        assert!(asked.is_err(), "no status write may be sent");
        stop.cancel();
    }
}
