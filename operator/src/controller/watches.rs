//! The operator's view of the cluster: one reflector per input (TunnelPolicies,
//! ClusterTunnelPolicies, namespaces' labels, pods, nodes, the API server's Service and
//! EndpointSlices, ServiceCIDRs, the base ConfigMap, Secrets), slimmed to what rendering needs;
//! any change wakes the reconcile loop, except that the pods of one namespace wake it at most once
//! per churn interval ([`ChurnLimiter`]): a namespace flipping its pods' labels cannot make every
//! proxy reload many times a second, and other namespaces' changes are not delayed by it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::pods::{key_of, row_of, PodEvent, PodFeed, PodRow};
use crate::crd::{ClusterTunnelPolicy, TunnelPolicy};
use crate::lenient::Lenient;

/// The caches the reconcile reads.
pub(super) struct Caches {
    /// Read leniently: one object that does not deserialize must not stall the watch.
    pub(super) policies: Store<Lenient<TunnelPolicy>>,
    pub(super) cluster_policies: Store<Lenient<ClusterTunnelPolicy>>,
    pub(super) namespaces: Store<Namespace>,
    pub(super) nodes: Store<Node>,
    /// The `kubernetes` Service and its EndpointSlices in `default`: the API server's addresses.
    pub(super) api_service: Store<Service>,
    pub(super) api_endpoints: Store<EndpointSlice>,
    /// ServiceCIDRs, when the API server has them (Kubernetes 1.33 and later).
    pub(super) service_cidrs: Option<Store<ServiceCIDR>>,
    /// Pods are not stored as objects: each event becomes a row for the reconcile's table.
    pub(super) pods: PodFeed,
    pub(super) base: Store<ConfigMap>,
    pub(super) secrets: Store<Secret>,
}

/// Starts every watch; `wake` is notified on any change (deletions included), a namespace's pod
/// changes at most once per `churn_interval`.
pub(super) async fn start(
    client: &Client,
    ns: &str,
    base_name: &str,
    wake: Arc<Notify>,
    churn_interval: Duration,
    shutdown: CancellationToken,
) -> Caches {
    let client = client.clone();
    // Policies wake the loop when their spec changes (or they come or go), not when the operator
    // writes their status: its own status writes would otherwise render again at once, with the
    // pods as they are now, past the churn limit of their namespace.
    let (policies, policy_changes) = spec_cache(Api::<Lenient<TunnelPolicy>>::all(client.clone()));
    let (cluster_policies, cluster_policy_changes) =
        spec_cache(Api::<Lenient<ClusterTunnelPolicy>>::all(client.clone()));
    let (namespaces, namespace_changes) =
        cache(Api::<Namespace>::all(client.clone()), watcher::Config::default(), slim_namespace);
    let (nodes, node_changes) = cache(Api::<Node>::all(client.clone()), watcher::Config::default(), slim_node);
    let (api_service, api_service_changes) = cache(
        Api::<Service>::namespaced(client.clone(), "default"),
        watcher::Config::default().fields("metadata.name=kubernetes"),
        keep,
    );
    let (api_endpoints, api_endpoint_changes) = cache(
        Api::<EndpointSlice>::namespaced(client.clone(), "default"),
        watcher::Config::default().labels("kubernetes.io/service-name=kubernetes"),
        keep,
    );
    let pods = PodFeed::default();
    let pod_changes = pod_events(Api::<Pod>::all(client.clone()), pods.clone(), ns.to_owned());
    let (base, base_changes) = cache(
        Api::<ConfigMap>::namespaced(client.clone(), ns),
        watcher::Config::default().fields(&format!("metadata.name={base_name}")),
        keep,
    );
    let (secrets, secret_changes) =
        cache(Api::<Secret>::namespaced(client.clone(), ns), watcher::Config::default(), keep);
    // ServiceCIDR is GA from Kubernetes 1.33; on older clusters the Service range comes from the
    // chart's config.clusterNetworks only (a watch of a missing API would never sync).
    let has_service_cidrs = client
        .list_api_group_resources("networking.k8s.io/v1")
        .await
        .is_ok_and(|l| l.resources.iter().any(|r| r.name == "servicecidrs"));
    let (service_cidrs, service_cidr_changes) = if has_service_cidrs {
        let (store, changes) = cache(Api::<ServiceCIDR>::all(client.clone()), watcher::Config::default(), keep);
        (Some(store), changes)
    } else {
        info!("the API has no networking.k8s.io/v1 ServiceCIDR: the Service range comes from config.clusterNetworks");
        (None, stream::empty().boxed())
    };
    let others = stream::select_all([
        policy_changes,
        cluster_policy_changes,
        namespace_changes,
        node_changes,
        api_service_changes,
        api_endpoint_changes,
        service_cidr_changes,
        base_changes,
        secret_changes,
    ])
    .map(|r| r.map(|()| None));
    let events = stream::select(others, pod_changes).boxed();
    tokio::spawn(wake_on_changes(events, wake, churn_interval, shutdown));
    Caches {
        policies,
        cluster_policies,
        namespaces,
        nodes,
        api_service,
        api_endpoints,
        service_cidrs,
        pods,
        base,
        secrets,
    }
}

/// The pod watch's events, converted to rows as they arrive and queued on `feed`; each yields the
/// pod's namespace (for the churn limit), a completed list `None` (everything changed).
fn pod_events(
    api: Api<Pod>,
    feed: PodFeed,
    release_ns: String,
) -> stream::BoxStream<'static, Result<Option<String>, String>> {
    let mut listing: Vec<PodRow> = Vec::new();
    watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |e| {
            let out = match e {
                Ok(watcher::Event::Init) => {
                    listing.clear();
                    None
                }
                Ok(watcher::Event::InitApply(p)) => {
                    listing.push(row_of(&p, &release_ns));
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    feed.push(PodEvent::Relisted(std::mem::take(&mut listing)));
                    Some(Ok(None))
                }
                Ok(watcher::Event::Apply(p)) => {
                    let ns = p.metadata.namespace.clone();
                    feed.push(PodEvent::Applied(Box::new(row_of(&p, &release_ns))));
                    Some(Ok(ns))
                }
                Ok(watcher::Event::Delete(p)) => {
                    feed.push(PodEvent::Deleted(key_of(&p)));
                    Some(Ok(p.metadata.namespace.clone()))
                }
                Err(e) => Some(Err(e.to_string())),
            };
            std::future::ready(out)
        })
        .boxed()
}

/// A change (`Some(namespace)` for a pod's) wakes the loop; the pods of one namespace at most once
/// per `churn_interval`. Deletions arrive as watch events too, so a deleted object also wakes it.
async fn wake_on_changes(
    mut events: stream::BoxStream<'static, Result<Option<String>, String>>,
    w: Arc<Notify>,
    churn_interval: Duration,
    stop: CancellationToken,
) {
    let mut churn = ChurnLimiter::new(churn_interval);
    loop {
        let next_due = churn.next_due();
        tokio::select! {
            () = stop.cancelled() => return,
            () = sleep_until_opt(next_due) => {
                if churn.take_due(Instant::now()) {
                    w.notify_one();
                }
            }
            e = events.next() => match e {
                Some(Ok(None)) => w.notify_one(),
                Some(Ok(Some(namespace))) => {
                    if churn.change(&namespace, Instant::now()) {
                        w.notify_one();
                    }
                }
                Some(Err(e)) => warn!(error = %e, "watch error; retrying with backoff"),
                None => return,
            },
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// At most one wake per namespace per interval from its pods' changes: the first change wakes the
/// loop at once; further changes within the interval are held and wake it once when the interval
/// ends (the render reads the cache then, so nothing is lost, only merged). Another namespace's
/// change wakes at once, and its render takes every namespace's latest state with it.
pub(super) struct ChurnLimiter {
    interval: Duration,
    /// Per namespace: when it last woke the loop, and whether changes are held since.
    last: HashMap<String, (Instant, bool)>,
}

impl ChurnLimiter {
    pub(super) fn new(interval: Duration) -> ChurnLimiter {
        ChurnLimiter { interval, last: HashMap::new() }
    }

    /// A change of a pod of `namespace` at `now`: whether it wakes the loop now.
    pub(super) fn change(&mut self, namespace: &str, now: Instant) -> bool {
        match self.last.get_mut(namespace) {
            Some((at, held)) if now < *at + self.interval => {
                *held = true;
                false
            }
            Some(entry) => {
                *entry = (now, false);
                true
            }
            None => {
                // Namespaces quiet for an interval are forgotten, so the map stays small.
                let interval = self.interval;
                self.last.retain(|_, (at, held)| *held || now < *at + interval);
                self.last.insert(namespace.to_owned(), (now, false));
                true
            }
        }
    }

    /// When the earliest held change is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.last.values().filter(|(_, held)| *held).map(|(at, _)| *at + self.interval).min()
    }

    /// Releases the held changes due by `now`: whether any was.
    pub(super) fn take_due(&mut self, now: Instant) -> bool {
        let mut any = false;
        for (at, held) in self.last.values_mut() {
            if *held && now >= *at + self.interval {
                *at = now;
                *held = false;
                any = true;
            }
        }
        any
    }
}

/// A reflector's change notifications (errors as text, for the log).
type Changes = futures::stream::BoxStream<'static, Result<(), String>>;

/// A cache of `api` (as `config` selects, each object trimmed by `slim` to what rendering reads)
/// and the stream of its changes, with the watcher's default backoff.
fn cache<K>(api: Api<K>, config: watcher::Config, slim: fn(&mut K)) -> (Store<K>, Changes)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let changes = reflector(writer, watcher(api, config).modify(slim))
        .default_backoff()
        .touched_objects()
        .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
        .boxed();
    (store, changes)
}

/// A cache of `api` whose changes are those of the objects' specs: an object added or deleted, a
/// new `metadata.generation` (which status writes leave alone), a re-list.
fn spec_cache<K>(api: Api<K>) -> (Store<K>, Changes)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let mut generations: HashMap<(Option<String>, Option<String>), Option<i64>> = HashMap::new();
    let changes = reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .filter_map(move |event| {
            let key = |o: &K| (o.meta().namespace.clone(), o.meta().name.clone());
            let change = match event {
                Ok(watcher::Event::Apply(o)) => {
                    let generation = o.meta().generation;
                    (generations.insert(key(&o), generation) != Some(generation)).then_some(Ok(()))
                }
                Ok(watcher::Event::Delete(o)) => {
                    generations.remove(&key(&o));
                    Some(Ok(()))
                }
                Ok(watcher::Event::Init) => {
                    generations.clear();
                    None
                }
                Ok(watcher::Event::InitApply(o)) => {
                    generations.insert(key(&o), o.meta().generation);
                    None
                }
                Ok(watcher::Event::InitDone) => Some(Ok(())),
                Err(e) => Some(Err(e.to_string())),
            };
            std::future::ready(change)
        })
        .boxed();
    (store, changes)
}

/// Keeps an object whole.
fn keep<K>(_: &mut K) {}

/// Nodes: only their addresses and pod ranges matter (clusterNetworks).
fn slim_node(n: &mut Node) {
    n.metadata.managed_fields = None;
    n.metadata.annotations = None;
    n.metadata.labels = None;
    if let Some(st) = n.status.as_mut() {
        st.images = None;
        st.conditions = None;
        st.volumes_attached = None;
        st.volumes_in_use = None;
    }
}

/// Only the labels of a namespace matter (namespaceSelector).
fn slim_namespace(n: &mut Namespace) {
    n.metadata.managed_fields = None;
    n.metadata.annotations = None;
    n.spec = None;
    n.status = None;
}

pub(super) async fn wait_synced(c: &Caches) {
    let _ = c.policies.wait_until_ready().await;
    let _ = c.cluster_policies.wait_until_ready().await;
    let _ = c.namespaces.wait_until_ready().await;
    let _ = c.nodes.wait_until_ready().await;
    let _ = c.api_service.wait_until_ready().await;
    let _ = c.api_endpoints.wait_until_ready().await;
    if let Some(s) = &c.service_cidrs {
        let _ = s.wait_until_ready().await;
    }
    c.pods.wait_synced().await;
    let _ = c.base.wait_until_ready().await;
    let _ = c.secrets.wait_until_ready().await;
}

/// What the cluster says its own networks are: every node address (internal and external) and
/// pod range, the Service ranges (ServiceCIDRs), the `kubernetes` Service's ClusterIPs and the API
/// server's endpoint addresses.
pub(super) fn cluster_networks(c: &Caches) -> Vec<String> {
    let mut out = Vec::new();
    for n in c.nodes.state() {
        if let Some(st) = &n.status {
            out.extend(st.addresses.iter().flatten().filter(|a| a.type_.ends_with("IP")).map(|a| a.address.clone()));
        }
        if let Some(spec) = &n.spec {
            out.extend(spec.pod_cidrs.iter().flatten().cloned());
            out.extend(spec.pod_cidr.iter().cloned());
        }
    }
    for s in c.api_service.state() {
        if let Some(spec) = &s.spec {
            out.extend(spec.cluster_ips.iter().flatten().filter(|ip| ip.as_str() != "None").cloned());
        }
    }
    for s in c.service_cidrs.iter().flat_map(Store::state) {
        out.extend(s.spec.iter().flat_map(|spec| spec.cidrs.iter().flatten().cloned()));
    }
    for e in c.api_endpoints.state() {
        out.extend(e.endpoints.iter().flatten().flat_map(|ep| ep.addresses.iter().cloned()));
    }
    out
}

#[cfg(test)]
mod churn_tests {
    use super::*;

    #[test]
    fn one_namespace_wakes_at_most_once_per_interval_and_never_delays_another() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut c = ChurnLimiter::new(Duration::from_secs(2));
        assert!(c.change("churn", ms(0)), "the first change wakes at once");
        // A label flipped every 100 ms for 2 s: held, one wake when the interval ends.
        for i in 1..20 {
            assert!(!c.change("churn", ms(i * 100)));
        }
        assert!(c.change("payments", ms(1000)), "another namespace is not held back");
        assert_eq!(c.next_due(), Some(ms(2000)));
        assert!(!c.take_due(ms(1999)));
        assert!(c.take_due(ms(2000)), "the held changes wake once");
        assert_eq!(c.next_due(), None);
        // 8 flips a second for 10 s: at most one wake per interval (5 + the first).
        let mut wakes = 0;
        for i in 0..80 {
            let now = ms(2100 + i * 125);
            wakes += usize::from(c.take_due(now)) + usize::from(c.change("churn", now));
        }
        wakes += usize::from(c.take_due(ms(14_000)));
        assert!(wakes <= 6, "{wakes} wakes in 10 s");
    }
}
