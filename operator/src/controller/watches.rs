//! The operator's view of the cluster: one reflector per input (TunnelPolicies,
//! ClusterTunnelPolicies, namespaces' labels, pods, nodes, the API server's Service and
//! EndpointSlices, ServiceCIDRs, the base ConfigMap, Secrets), slimmed to what rendering needs;
//! any change wakes the reconcile loop.

use std::sync::Arc;

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, PodSpec, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::crd::{ClusterTunnelPolicy, TunnelPolicy};
use crate::render::PodIn;

/// The caches the reconcile reads.
pub(super) struct Caches {
    pub(super) policies: Store<TunnelPolicy>,
    pub(super) cluster_policies: Store<ClusterTunnelPolicy>,
    pub(super) namespaces: Store<Namespace>,
    pub(super) nodes: Store<Node>,
    /// The `kubernetes` Service and its EndpointSlices in `default`: the API server's addresses.
    pub(super) api_service: Store<Service>,
    pub(super) api_endpoints: Store<EndpointSlice>,
    /// ServiceCIDRs, when the API server has them (Kubernetes 1.33 and later).
    pub(super) service_cidrs: Option<Store<ServiceCIDR>>,
    pub(super) pods: Store<Pod>,
    pub(super) base: Store<ConfigMap>,
    pub(super) secrets: Store<Secret>,
}

/// Starts every watch; `wake` is notified on any change (deletions included).
pub(super) async fn start(
    client: &Client,
    ns: &str,
    base_name: &str,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> Caches {
    let client = client.clone();
    let (pol_store, pol_w) = reflector::store();
    let (pod_store, pod_w) = reflector::store();
    let (base_store, base_w) = reflector::store();
    let (sec_store, sec_w) = reflector::store();
    let (cpol_store, cpol_w) = reflector::store();
    let (node_store, node_w) = reflector::store();
    let (apisvc_store, apisvc_w) = reflector::store();
    let (apiep_store, apiep_w) = reflector::store();
    // Nodes: only their addresses and pod ranges matter (clusterNetworks).
    let nodes = reflector(
        node_w,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()).modify(|n: &mut Node| {
            n.metadata.managed_fields = None;
            n.metadata.annotations = None;
            n.metadata.labels = None;
            if let Some(st) = n.status.as_mut() {
                st.images = None;
                st.conditions = None;
                st.volumes_attached = None;
                st.volumes_in_use = None;
            }
        }),
    )
    .default_backoff()
    .touched_objects()
    .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
    .boxed();
    let api_service = reflector(
        apisvc_w,
        watcher(
            Api::<Service>::namespaced(client.clone(), "default"),
            watcher::Config::default().fields("metadata.name=kubernetes"),
        ),
    )
    .default_backoff()
    .touched_objects()
    .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
    .boxed();
    let api_endpoints = reflector(
        apiep_w,
        watcher(
            Api::<EndpointSlice>::namespaced(client.clone(), "default"),
            watcher::Config::default().labels("kubernetes.io/service-name=kubernetes"),
        ),
    )
    .default_backoff()
    .touched_objects()
    .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
    .boxed();
    let (ns_store, ns_w) = reflector::store();
    let cluster_policies =
        reflector(cpol_w, watcher(Api::<ClusterTunnelPolicy>::all(client.clone()), watcher::Config::default()))
            .default_backoff()
            .touched_objects()
            .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
            .boxed();
    // Only the labels of a namespace matter (namespaceSelector).
    let namespaces = reflector(
        ns_w,
        watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default()).modify(|n: &mut Namespace| {
            n.metadata.managed_fields = None;
            n.metadata.annotations = None;
            n.spec = None;
            n.status = None;
        }),
    )
    .default_backoff()
    .touched_objects()
    .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
    .boxed();
    let policies = reflector(pol_w, watcher(Api::<TunnelPolicy>::all(client.clone()), watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
        .boxed();
    // Only what rendering needs is kept of each pod.
    let pods = reflector(pod_w, watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).modify(slim_pod))
        .default_backoff()
        .touched_objects()
        .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
        .boxed();
    let base_cfg = watcher::Config::default().fields(&format!("metadata.name={}", base_name));
    let base = reflector(base_w, watcher(Api::<ConfigMap>::namespaced(client.clone(), ns), base_cfg))
        .default_backoff()
        .touched_objects()
        .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
        .boxed();
    let secrets = reflector(sec_w, watcher(Api::<Secret>::namespaced(client.clone(), ns), watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
        .boxed();
    // ServiceCIDR is GA from Kubernetes 1.33; on older clusters the Service range comes from the
    // chart's config.clusterNetworks only (a watch of a missing API would never sync).
    let has_service_cidrs = client
        .list_api_group_resources("networking.k8s.io/v1")
        .await
        .is_ok_and(|l| l.resources.iter().any(|r| r.name == "servicecidrs"));
    let (svc_cidr_store, service_cidrs) = if has_service_cidrs {
        let (store, w) = reflector::store();
        let s = reflector(w, watcher(Api::<ServiceCIDR>::all(client.clone()), watcher::Config::default()))
            .default_backoff()
            .touched_objects()
            .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
            .boxed();
        (Some(store), s)
    } else {
        info!("the API has no networking.k8s.io/v1 ServiceCIDR: the Service range comes from config.clusterNetworks");
        (None, stream::empty().boxed())
    };
    let mut events = stream::select_all([
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
    ]);
    let w = wake.clone();
    let stop = shutdown.clone();
    // Deletions arrive as watch events too, so a deleted object also wakes the loop.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                e = events.next() => match e {
                    Some(Ok(())) => w.notify_one(),
                    Some(Err(e)) => warn!(error = %e, "watch error; retrying with backoff"),
                    None => return,
                },
            }
        }
    });
    Caches {
        policies: pol_store,
        cluster_policies: cpol_store,
        namespaces: ns_store,
        nodes: node_store,
        api_service: apisvc_store,
        api_endpoints: apiep_store,
        service_cidrs: svc_cidr_store,
        pods: pod_store,
        base: base_store,
        secrets: sec_store,
    }
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
    let _ = c.pods.wait_until_ready().await;
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

fn slim_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    p.spec = p.spec.take().map(|s| PodSpec {
        host_network: s.host_network,
        node_name: s.node_name,
        containers: Vec::new(),
        ..Default::default()
    });
    if let Some(st) = p.status.as_mut() {
        st.conditions = None;
        st.container_statuses = None;
        st.init_container_statuses = None;
    }
}

/// The release's running proxy pods with an IP, for the rollout view.
pub(super) fn proxy_endpoints(pods: &[Arc<Pod>], namespace: &str, release: &str) -> Vec<super::rollout::Endpoint> {
    let mut out: Vec<super::rollout::Endpoint> = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace) && p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            let l = p.labels();
            l.get("app.kubernetes.io/instance").map(String::as_str) == Some(release)
                && l.get("app.kubernetes.io/component").map(String::as_str) == Some("proxy")
        })
        .filter_map(|p| {
            let st = p.status.as_ref()?;
            if st.phase.as_deref() != Some("Running") {
                return None;
            }
            Some(super::rollout::Endpoint {
                pod: p.metadata.name.clone()?,
                node: p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
                ip: st.pod_ip.as_deref()?.parse().ok()?,
            })
        })
        .collect();
    out.sort_by(|a, b| a.pod.cmp(&b.pod));
    out
}

pub(super) fn pod_in(p: &Pod) -> PodIn {
    let status = p.status.as_ref();
    let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
    let host_network = p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
    let terminating = p.metadata.deletion_timestamp.is_some();
    let mut ips: Vec<std::net::IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().filter_map(|i| i.ip.parse().ok()).collect())
        .unwrap_or_default();
    if let Some(ip) = status.and_then(|s| s.pod_ip.as_ref()).and_then(|i| i.parse().ok()) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    PodIn {
        namespace: p.namespace().unwrap_or_default(),
        labels: p.labels().clone(),
        ips,
        eligible: running && !host_network && !terminating,
    }
}
