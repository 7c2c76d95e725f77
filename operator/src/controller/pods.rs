//! The pods, held once, as the renderer reads them: the pod watch converts each event into a
//! [`PodRow`] at once (no store of Pod objects), queues it on the [`PodFeed`], and the reconcile
//! applies the queue to its [`PodTable`], learning exactly which pods changed — the work per
//! reconcile follows the changes, not the number of pods.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::ResourceExt;
use tokio::sync::watch;

use crate::render::{PodChanges, PodIn};

/// What rendering and the rollout view need of one pod.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PodRow {
    /// `namespace/name`.
    pub(super) key: String,
    pub(super) render: PodIn,
    /// For a pod of the release's namespace labelled as a proxy: what the rollout view reads.
    pub(super) proxy: Option<ProxyPod>,
}

/// A proxy pod's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ProxyPod {
    pub(super) name: String,
    pub(super) uid: Option<String>,
    /// Its `app.kubernetes.io/instance` label.
    pub(super) instance: String,
    pub(super) node: String,
    pub(super) ip: Option<IpAddr>,
    /// Running and not terminating.
    pub(super) live: bool,
}

/// A pod's `namespace/name`, the key of its row.
pub(super) fn key_of(p: &Pod) -> String {
    format!("{}/{}", p.metadata.namespace.as_deref().unwrap_or_default(), p.name_any())
}

/// Converts a watched pod; `release_ns` is where proxy pods are looked for.
pub(super) fn row_of(p: &Pod, release_ns: &str) -> PodRow {
    let namespace = p.namespace().unwrap_or_default();
    let name = p.name_any();
    let status = p.status.as_ref();
    let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
    let terminating = p.metadata.deletion_timestamp.is_some();
    let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
    let labels = p.labels();
    let proxy = (namespace == release_ns
        && labels.get("app.kubernetes.io/component").map(String::as_str) == Some("proxy"))
    .then(|| ProxyPod {
        name: name.clone(),
        uid: p.metadata.uid.clone(),
        instance: labels.get("app.kubernetes.io/instance").cloned().unwrap_or_default(),
        node: node.clone(),
        ip: status.and_then(|s| s.pod_ip.as_deref()).and_then(|i| i.parse().ok()),
        live: running && !terminating,
    });
    let host_network = p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().filter_map(|i| i.ip.parse().ok()).collect())
        .unwrap_or_default();
    if let Some(ip) = status.and_then(|s| s.pod_ip.as_ref()).and_then(|i| i.parse().ok()) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let eligible = running && !host_network && !terminating;
    PodRow {
        key: key_of(p),
        render: PodIn {
            // The renderer matches selectors against clients only: no copy of the others' labels.
            labels: if eligible { labels.clone() } else { BTreeMap::new() },
            namespace,
            ips,
            eligible,
            node,
        },
        proxy,
    }
}

/// One change the pod watch saw.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum PodEvent {
    Applied(Box<PodRow>),
    /// By `namespace/name`.
    Deleted(String),
    /// The watch listed every pod again (at start, or after it lost its place): the whole set.
    Relisted(Vec<PodRow>),
}

/// Between the pod watch and the reconcile: the events not yet applied, and whether the first
/// list has arrived.
#[derive(Debug, Clone)]
pub(super) struct PodFeed {
    pending: Arc<Mutex<Vec<PodEvent>>>,
    synced: watch::Sender<bool>,
}

impl Default for PodFeed {
    fn default() -> PodFeed {
        PodFeed { pending: Arc::default(), synced: watch::channel(false).0 }
    }
}

impl PodFeed {
    /// Queues an event (the watch's side).
    pub(super) fn push(&self, e: PodEvent) {
        if matches!(e, PodEvent::Relisted(_)) {
            // A re-list replaces whatever was queued before it.
            let mut q = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            q.clear();
            q.push(e);
            drop(q);
            self.synced.send_replace(true);
            return;
        }
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).push(e);
    }

    /// The events queued since the last call (the reconcile's side).
    pub(super) fn take(&self) -> Vec<PodEvent> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Waits for the first complete list of pods.
    pub(super) async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// The renderer's pods, by row, with their proxies.
#[derive(Debug, Default)]
pub(super) struct PodTable {
    rows: Vec<PodIn>,
    /// Each row's `namespace/name`, and the row of each.
    keys: Vec<String>,
    index: HashMap<String, usize>,
    /// The proxy pods of the release's namespace, by `namespace/name`.
    proxies: BTreeMap<String, ProxyPod>,
    /// Filled at least once (before that, everything is a change).
    synced: bool,
}

/// What changed in one [`PodTable::apply`]: the changed pods before and after.
#[derive(Debug, Default)]
pub(super) struct Changed {
    all: bool,
    pods: Vec<PodIn>,
}

impl Changed {
    pub(super) fn as_changes(&self) -> PodChanges<'_> {
        if self.all {
            return PodChanges::All;
        }
        PodChanges::Pods(self.pods.iter().map(|p| (p.namespace.as_str(), &p.labels)).collect())
    }

    /// How many pods changed (before and after counted apart); `None` for everything.
    pub(super) fn count(&self) -> Option<usize> {
        (!self.all).then_some(self.pods.len())
    }
}

impl PodTable {
    pub(super) fn rows(&self) -> &[PodIn] {
        &self.rows
    }

    /// Applies the watch's events and says which pods changed.
    pub(super) fn apply(&mut self, events: Vec<PodEvent>) -> Changed {
        let mut changed = Changed { all: !self.synced, pods: Vec::new() };
        for e in events {
            match e {
                PodEvent::Relisted(rows) => {
                    *self = PodTable::default();
                    for row in rows {
                        self.upsert(row);
                    }
                    changed = Changed { all: true, pods: Vec::new() };
                }
                PodEvent::Applied(row) => {
                    if let Some((before, after)) = self.upsert(*row) {
                        if !changed.all {
                            changed.pods.extend(before);
                            changed.pods.push(after);
                        }
                    }
                }
                PodEvent::Deleted(key) => {
                    if let Some(gone) = self.remove(&key) {
                        if !changed.all {
                            changed.pods.push(gone);
                        }
                    }
                }
            }
        }
        self.synced = true;
        changed
    }

    /// Inserts or replaces a row; `None` when nothing the renderer reads changed, else the row
    /// before (if any) and after.
    fn upsert(&mut self, row: PodRow) -> Option<(Option<PodIn>, PodIn)> {
        let PodRow { key, render, proxy } = row;
        match proxy {
            Some(p) => self.proxies.insert(key.clone(), p),
            None => self.proxies.remove(&key),
        };
        match self.index.get(&key).copied() {
            // A new object with the same facts (a status update of another field) is no change.
            Some(i) if self.rows[i] == render => None,
            Some(i) => Some((Some(std::mem::replace(&mut self.rows[i], render)), self.rows[i].clone())),
            None => {
                self.index.insert(key.clone(), self.rows.len());
                self.keys.push(key);
                self.rows.push(render.clone());
                Some((None, render))
            }
        }
    }

    fn remove(&mut self, key: &str) -> Option<PodIn> {
        self.proxies.remove(key);
        let i = self.index.remove(key)?;
        let gone = self.rows.swap_remove(i);
        self.keys.swap_remove(i);
        if let Some(moved) = self.keys.get(i) {
            self.index.insert(moved.clone(), i);
        }
        Some(gone)
    }

    /// The release's running proxy pods with an IP (labelled with `instance`), for the rollout view.
    pub(super) fn proxy_endpoints(&self, instance: &str) -> Vec<super::rollout::Endpoint> {
        self.proxies
            .values()
            .filter(|p| p.live && p.instance == instance)
            .filter_map(|p| Some(super::rollout::Endpoint { pod: p.name.clone(), node: p.node.clone(), ip: p.ip? }))
            .collect()
    }

    /// A reference to a proxy pod, for events about it.
    pub(super) fn proxy_ref(&self, namespace: &str, name: &str) -> Option<ObjectReference> {
        let p = self.proxies.get(&format!("{namespace}/{name}"))?;
        Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(p.name.clone()),
            namespace: Some(namespace.into()),
            uid: p.uid.clone(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: &str, running: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                uid: Some(format!("uid-{name}")),
                labels: Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
                ..Default::default()
            },
            spec: Some(PodSpec { node_name: Some("node-1".into()), ..Default::default() }),
            status: Some(PodStatus {
                phase: Some(if running { "Running" } else { "Pending" }.into()),
                pod_ip: Some(ip.into()),
                pod_ips: Some(vec![PodIP { ip: ip.into() }]),
                ..Default::default()
            }),
        }
    }

    fn web(name: &str, app: &str, ip: &str) -> PodEvent {
        PodEvent::Applied(Box::new(row_of(&pod("ns", name, &[("app", app)], ip, true), "tunnelgate")))
    }

    fn apps(t: &PodTable) -> Vec<String> {
        let mut v: Vec<String> = t.rows().iter().map(|r| format!("{}@{}", r.labels["app"], r.ips[0])).collect();
        v.sort();
        v
    }

    /// The table follows the watch: the first list is "everything", an unchanged pod is no
    /// change, and an update, an addition and a deletion are reported (an update before and after).
    #[test]
    fn the_pod_table_reports_only_what_changed() {
        let mut t = PodTable::default();
        let first = t.apply(vec![PodEvent::Relisted(
            [("a", "web", "10.0.0.1"), ("b", "web", "10.0.0.2"), ("c", "db", "10.0.0.3")]
                .iter()
                .map(|(n, a, ip)| row_of(&pod("ns", n, &[("app", a)], ip, true), "tunnelgate"))
                .collect(),
        )]);
        assert_eq!(first.count(), None, "first list: everything");
        assert_eq!(t.apply(vec![]).count(), Some(0));
        assert_eq!(t.apply(vec![web("a", "web", "10.0.0.1")]).count(), Some(0), "the same facts are no change");
        // Relabelled: before and after.
        let ch = t.apply(vec![web("b", "db", "10.0.0.2")]);
        let PodChanges::Pods(list) = ch.as_changes() else { panic!("not all") };
        let labels: Vec<&str> = list.iter().map(|(_, l)| l["app"].as_str()).collect();
        assert_eq!(labels, ["web", "db"]);
        // The first row deleted: the last one takes its place and is still found afterwards.
        assert_eq!(t.apply(vec![PodEvent::Deleted("ns/a".into())]).count(), Some(1));
        assert_eq!(apps(&t), ["db@10.0.0.2", "db@10.0.0.3"]);
        assert_eq!(t.apply(vec![web("c", "web", "10.0.0.3")]).count(), Some(2));
        assert_eq!(t.apply(vec![web("d", "web", "10.0.0.4")]).count(), Some(1), "an addition");
        assert_eq!(apps(&t), ["db@10.0.0.2", "web@10.0.0.3", "web@10.0.0.4"]);
        assert_eq!(t.apply(vec![PodEvent::Deleted("ns/gone".into())]).count(), Some(0), "an unknown pod");
        // A pod that stops running keeps its row (its address is no client) without its labels.
        let pending =
            PodEvent::Applied(Box::new(row_of(&pod("ns", "d", &[("app", "web")], "10.0.0.4", false), "tunnelgate")));
        assert_eq!(t.apply(vec![pending]).count(), Some(2));
        assert!(t.rows().iter().any(|r| !r.eligible && r.labels.is_empty()));
        let all: Vec<PodEvent> = ["b", "c", "d"].iter().map(|n| PodEvent::Deleted(format!("ns/{n}"))).collect();
        assert_eq!(t.apply(all).count(), Some(3), "all deleted");
        assert!(t.rows().is_empty());
        // A re-list replaces everything and is reported as everything.
        assert_eq!(t.apply(vec![web("e", "web", "10.0.0.5"), PodEvent::Relisted(vec![])]).count(), None);
        assert!(t.rows().is_empty());
    }

    /// The feed keeps events in order, and a re-list drops what was queued before it.
    #[tokio::test]
    async fn the_feed_queues_events_and_a_relist_replaces_the_queue() {
        let feed = PodFeed::default();
        feed.push(web("a", "web", "10.0.0.1"));
        feed.push(PodEvent::Deleted("ns/a".into()));
        assert_eq!(feed.take().len(), 2);
        assert!(feed.take().is_empty());
        feed.push(web("a", "web", "10.0.0.1"));
        feed.push(PodEvent::Relisted(vec![]));
        feed.push(PodEvent::Deleted("ns/b".into()));
        assert_eq!(feed.take(), [PodEvent::Relisted(vec![]), PodEvent::Deleted("ns/b".into())]);
        // Synced once a list arrived.
        tokio::time::timeout(std::time::Duration::from_secs(1), feed.wait_synced()).await.unwrap();
    }

    /// Proxy pods of the release's namespace are found by instance, only while live, and leave
    /// with their pod; a pod of another namespace with the proxy labels is none of them.
    #[test]
    fn proxy_pods_are_the_live_ones_of_the_release() {
        let labels = [("app.kubernetes.io/component", "proxy"), ("app.kubernetes.io/instance", "tg")];
        let mut t = PodTable::default();
        t.apply(vec![PodEvent::Relisted(vec![
            row_of(&pod("tunnelgate", "p1", &labels, "10.0.0.1", true), "tunnelgate"),
            row_of(&pod("tunnelgate", "p2", &labels, "10.0.0.2", false), "tunnelgate"),
            row_of(&pod("other", "p3", &labels, "10.0.0.3", true), "tunnelgate"),
        ])]);
        let eps = t.proxy_endpoints("tg");
        assert_eq!(eps.iter().map(|e| e.pod.as_str()).collect::<Vec<_>>(), ["p1"]);
        assert!(t.proxy_endpoints("other-release").is_empty());
        assert_eq!(t.proxy_ref("tunnelgate", "p1").and_then(|r| r.uid), Some("uid-p1".into()));
        t.apply(vec![PodEvent::Deleted("other/p1".into())]);
        assert_eq!(t.proxy_endpoints("tg").len(), 1, "a same-named pod elsewhere is not the proxy");
        t.apply(vec![PodEvent::Deleted("tunnelgate/p1".into())]);
        assert!(t.proxy_endpoints("tg").is_empty());
    }
}
