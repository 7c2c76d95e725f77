//! The reconcile loop: watches TunnelPolicies, ClusterTunnelPolicies, Namespaces (their labels),
//! Pods, the base ConfigMap and Secrets into caches;
//! any change wakes one debounced, single-writer reconcile (leader only) that renders, checks with
//! the proxy's parser, applies the ConfigMap and Secret by server-side apply when their hash
//! changes, and writes each policy's status and events.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, PodSpec, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, reflector, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::crd::{ClusterTunnelPolicy, TunnelPolicy, TunnelPolicyStatus};
use crate::metrics::Metrics;
use crate::render::{self, Cluster, ClusterPolicyIn, Input, PodIn, PolicyIn, RenderError, TlsIn};
use crate::secrets::{htpasswd_from_secret, tls_from_secret};
use crate::status::{self, NotInForce};

/// Field manager of every write (server-side apply).
pub const MANAGER: &str = "tunnelgate-operator";
/// Annotation holding the hash of what the operator wrote.
pub const HASH_ANNOTATION: &str = "tunnelgate.io/config-sha256";

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("base ConfigMap {0} (key config.yaml) not found")]
    BaseMissing(String),
    #[error("cannot render the proxy configuration")]
    Render(#[from] RenderError),
    #[error("cannot apply {0}")]
    Apply(String, #[source] kube::Error),
}

impl Error {
    /// Closed-set label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::BaseMissing(_) => "base_missing",
            Error::Render(RenderError::TooLarge { .. }) => "too_large",
            Error::Render(_) => "render",
            Error::Apply(..) => "apply",
        }
    }

    fn not_in_force(&self) -> NotInForce {
        let reason = match self {
            Error::BaseMissing(_) => "BaseMissing",
            Error::Render(RenderError::TooLarge { .. }) => "TooLarge",
            Error::Render(_) => "RenderFailed",
            Error::Apply(..) => "ApplyFailed",
        };
        NotInForce { reason, message: crate::error_chain(self) }
    }
}

/// Static settings of the loop.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Namespace of the release (base ConfigMap, TLS Secrets, outputs).
    pub namespace: String,
    /// Release name: inputs `<release>-base`, outputs `<release>-proxy` and `<release>-proxy-tls`.
    pub release: String,
    /// Where the proxy mounts `<release>-proxy-tls`.
    pub tls_dir: String,
    /// Quiet time before a reconcile, so a burst of changes causes one write.
    pub debounce: Duration,
    /// This replica's name, for events.
    pub identity: String,
}

impl Settings {
    fn base_name(&self) -> String {
        format!("{}-base", self.release)
    }
    /// Name of the rendered ConfigMap.
    pub fn config_name(&self) -> String {
        format!("{}-proxy", self.release)
    }
    /// Name of the rendered TLS Secret.
    pub fn tls_name(&self) -> String {
        format!("{}-proxy-tls", self.release)
    }
}

struct Caches {
    policies: Store<TunnelPolicy>,
    cluster_policies: Store<ClusterTunnelPolicy>,
    namespaces: Store<Namespace>,
    nodes: Store<Node>,
    /// The `kubernetes` Service and its EndpointSlices in `default`: the API server's addresses.
    api_service: Store<Service>,
    api_endpoints: Store<EndpointSlice>,
    /// ServiceCIDRs, when the API server has them (Kubernetes 1.33 and later).
    service_cidrs: Option<Store<ServiceCIDR>>,
    pods: Store<Pod>,
    base: Store<ConfigMap>,
    secrets: Store<Secret>,
}

/// Runs until `shutdown`. Writes only while `leader` is true.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    mut leader: watch::Receiver<bool>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let ns = settings.namespace.clone();
    let wake = Arc::new(Notify::new());
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
    let base_cfg = watcher::Config::default().fields(&format!("metadata.name={}", settings.base_name()));
    let base = reflector(base_w, watcher(Api::<ConfigMap>::namespaced(client.clone(), &ns), base_cfg))
        .default_backoff()
        .touched_objects()
        .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
        .boxed();
    let secrets = reflector(sec_w, watcher(Api::<Secret>::namespaced(client.clone(), &ns), watcher::Config::default()))
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
    let caches = Caches {
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
    };
    tokio::select! {
        () = shutdown.cancelled() => return,
        () = wait_synced(&caches) => {}
    }
    ready.store(true, Ordering::Relaxed);
    info!("caches synced");
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: MANAGER.into(), instance: Some(settings.identity.clone()) },
    );
    let mut state = LoopState { last_hash: None, warned: HashMap::new() };
    metrics.leader.set(i64::from(*leader.borrow()));
    wake.notify_one();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wake.notified() => {}
            r = leader.changed() => {
                if r.is_err() { return; }
                metrics.leader.set(i64::from(*leader.borrow()));
                info!(leader = *leader.borrow(), "leadership changed");
                // A new leader starts from what is in the cluster.
                state.last_hash = None;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(settings.debounce) => {}
        }
        if !*leader.borrow() {
            continue;
        }
        let timer = metrics.reconcile_duration.start_timer();
        let result = reconcile(&client, &settings, &caches, &metrics, &recorder, &mut state).await;
        timer.observe_duration();
        match result {
            Ok(()) => metrics.reconciles.with_label_values(&["success"]).inc(),
            Err(e) => {
                metrics.reconciles.with_label_values(&["error"]).inc();
                warn!(error = %crate::error_chain(&e), kind = e.kind(), "reconcile failed; the configuration in force is unchanged");
                // Retry later even without a change (apply failures are often transient).
                let w = wake.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    w.notify_one();
                });
            }
        }
    }
}

async fn wait_synced(c: &Caches) {
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
fn cluster_networks(c: &Caches) -> Vec<String> {
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
    p.spec =
        p.spec.take().map(|s| PodSpec { host_network: s.host_network, containers: Vec::new(), ..Default::default() });
    if let Some(st) = p.status.as_mut() {
        st.conditions = None;
        st.container_statuses = None;
        st.init_container_statuses = None;
    }
}

struct LoopState {
    /// Hash of the last document written or found in force.
    last_hash: Option<String>,
    /// Last warning published per object, so an unchanged problem is not re-announced.
    warned: HashMap<String, String>,
}

fn pod_in(p: &Pod) -> PodIn {
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

async fn warn_once(
    recorder: &Recorder,
    state: &mut LoopState,
    key: String,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    reason: &str,
    note: String,
) {
    if state.warned.get(&key) == Some(&note) {
        return;
    }
    let ev = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note.clone()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, reference).await {
        debug!(error = %e, "cannot publish event");
    }
    state.warned.insert(key, note);
}

async fn reconcile(
    client: &Client,
    s: &Settings,
    c: &Caches,
    metrics: &Metrics,
    recorder: &Recorder,
    state: &mut LoopState,
) -> Result<(), Error> {
    let ns = &s.namespace;
    let policies = c.policies.state();
    let pods: Vec<PodIn> = c.pods.state().iter().map(|p| pod_in(p)).collect();
    let base_cm = c.base.get(&ObjectRef::new(&s.base_name()).within(ns));
    let base = base_cm.as_ref().and_then(|cm| cm.data.as_ref()?.get("config.yaml").cloned());

    // TLS: validated Secrets; an invalid one falls back to what the proxy already has.
    let mut tls: BTreeMap<String, TlsIn> = BTreeMap::new();
    if let Some(base) = &base {
        let previous = c.secrets.get(&ObjectRef::new(&s.tls_name()).within(ns));
        for (_, listener, secret_name) in render::tls_refs(base).unwrap_or_default() {
            let secret = c.secrets.get(&ObjectRef::new(&secret_name).within(ns));
            let result = match &secret {
                Some(sec) => tls_from_secret(sec).map_err(|e| e.to_string()),
                None => Err("not found".to_owned()),
            };
            match result {
                Ok(t) => {
                    state.warned.remove(&format!("secret/{secret_name}"));
                    tls.insert(listener, t);
                }
                Err(msg) => {
                    if let Some(sec) = &secret {
                        let note = format!("TLS Secret for listener {listener} is invalid: {msg}; the previous certificate stays in use");
                        warn_once(
                            recorder,
                            state,
                            format!("secret/{secret_name}"),
                            &sec.object_ref(&()),
                            "InvalidSecret",
                            note,
                        )
                        .await;
                    }
                    warn!(listener = %listener, secret = %secret_name, error = %msg, "TLS Secret unusable; keeping the previous certificate");
                    let prev = previous.as_ref().and_then(|p| p.data.as_ref()).and_then(|d| {
                        let crt = d.get(&format!("{listener}.crt"))?;
                        let key = d.get(&format!("{listener}.key"))?;
                        crate::secrets::tls_from_pem(&crt.0, &key.0).ok()
                    });
                    if let Some(p) = prev {
                        tls.insert(listener, p);
                    }
                }
            }
        }
    }

    // Proxy users: a validated htpasswd Secret; an invalid one keeps the users the proxy has.
    let mut htpasswd = None;
    if let Some(secret_name) = base.as_deref().and_then(render::auth_ref) {
        let secret = c.secrets.get(&ObjectRef::new(&secret_name).within(ns));
        match secret.as_ref().map(|sec| htpasswd_from_secret(sec)) {
            Some(Ok(text)) => {
                state.warned.remove(&format!("secret/{secret_name}"));
                htpasswd = Some(text);
            }
            other => {
                let msg = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "not found".to_owned(),
                };
                if let Some(sec) = &secret {
                    let note = format!("htpasswd Secret is invalid: {msg}; the previous users stay in force");
                    warn_once(
                        recorder,
                        state,
                        format!("secret/{secret_name}"),
                        &sec.object_ref(&()),
                        "InvalidSecret",
                        note,
                    )
                    .await;
                }
                warn!(secret = %secret_name, error = %msg, "htpasswd Secret unusable; keeping the previous users");
                let previous = c.secrets.get(&ObjectRef::new(&s.tls_name()).within(ns));
                htpasswd = previous
                    .as_ref()
                    .and_then(|p| p.data.as_ref()?.get("htpasswd"))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok());
            }
        }
    }

    let inputs: Vec<PolicyIn<'_>> = policies
        .iter()
        .map(|p| PolicyIn {
            namespace: p.metadata.namespace.as_deref().unwrap_or_default(),
            name: p.metadata.name.as_deref().unwrap_or_default(),
            spec: &p.spec,
        })
        .collect();
    let cluster_policies = c.cluster_policies.state();
    let namespaces = c.namespaces.state();
    let cluster = Cluster {
        policies: cluster_policies
            .iter()
            .map(|p| ClusterPolicyIn { name: p.metadata.name.as_deref().unwrap_or_default(), spec: &p.spec })
            .collect(),
        namespaces: namespaces
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone().unwrap_or_default())))
            .collect(),
        networks: cluster_networks(c),
    };
    let base_text = base.clone().unwrap_or_default();
    let (outcomes, rendered) = render::render(&Input {
        base: &base_text,
        policies: inputs,
        pods: &pods,
        tls: &tls,
        tls_dir: &s.tls_dir,
        htpasswd: htpasswd.as_deref(),
        cluster,
    });
    let applied: Result<String, Error> = match (base.is_some(), rendered) {
        (false, _) => Err(Error::BaseMissing(format!("{ns}/{}", s.base_name()))),
        (true, Err(e)) => Err(Error::Render(e)),
        (true, Ok(r)) => apply(client, s, metrics, state, &r).await.map(|()| r.hash.clone()),
    };

    // Statuses and events.
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let not_in_force = applied.as_ref().err().map(Error::not_in_force);
    let in_force = match (&applied, &not_in_force) {
        (Ok(h), _) => Ok(h.as_str()),
        (Err(_), Some(n)) => Err(n),
        (Err(_), None) => Ok(""),
    };
    let (mut accepted, mut rejected) = (0, 0);
    // Warnings remembered for objects that are gone or fixed are forgotten, so the map stays bounded.
    let mut live: std::collections::HashSet<String> =
        state.warned.keys().filter(|k| k.starts_with("secret/")).cloned().collect();
    // Outcomes name their policy; pair by name rather than relying on the renderer's order.
    let by_name: HashMap<(&str, &str), &Arc<TunnelPolicy>> = policies
        .iter()
        .map(|p| {
            ((p.metadata.namespace.as_deref().unwrap_or_default(), p.metadata.name.as_deref().unwrap_or_default()), p)
        })
        .collect();
    let cluster_by_name: HashMap<&str, &Arc<ClusterTunnelPolicy>> =
        cluster_policies.iter().map(|p| (p.metadata.name.as_deref().unwrap_or_default(), p)).collect();
    for o in &outcomes {
        // Cluster policies' outcomes have no namespace.
        if o.namespace.is_empty() {
            let Some(p) = cluster_by_name.get(o.name.as_str()) else { continue };
            if o.result.is_ok() {
                accepted += 1
            } else {
                rejected += 1
            }
            let desired =
                status::desired(o, p.metadata.generation, &s.config_name(), in_force, p.status.as_ref(), &now);
            if p.status.as_ref() != Some(&desired) {
                write_cluster_status(client, p, &desired).await;
            }
            if let Err(errs) = &o.result {
                let note = errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                let key = format!("ctp/{}/{}", o.name, p.metadata.generation.unwrap_or(0));
                live.insert(key.clone());
                warn_once(recorder, state, key, &p.object_ref(&()), "InvalidSpec", format!("rejected: {note}")).await;
            }
            continue;
        }
        let Some(p) = by_name.get(&(o.namespace.as_str(), o.name.as_str())) else { continue };
        if o.result.is_ok() {
            accepted += 1
        } else {
            rejected += 1
        }
        let desired = status::desired(o, p.metadata.generation, &s.config_name(), in_force, p.status.as_ref(), &now);
        if p.status.as_ref() != Some(&desired) {
            write_status(client, p, &desired).await;
        }
        if let Err(errs) = &o.result {
            let note = errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            let key = format!("tp/{}/{}/{}", o.namespace, o.name, p.metadata.generation.unwrap_or(0));
            live.insert(key.clone());
            warn_once(recorder, state, key, &p.object_ref(&()), "InvalidSpec", format!("rejected: {note}")).await;
        }
    }
    state.warned.retain(|k, _| live.contains(k));
    metrics.policies.with_label_values(&["accepted"]).set(accepted);
    metrics.policies.with_label_values(&["rejected"]).set(rejected);
    applied.map(|_| ())
}

async fn write_status(client: &Client, p: &TunnelPolicy, status: &TunnelPolicyStatus) {
    let (Some(ns), Some(name)) = (p.metadata.namespace.as_deref(), p.metadata.name.as_deref()) else { return };
    let api = Api::<TunnelPolicy>::namespaced(client.clone(), ns);
    if let Err(e) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await {
        warn!(policy = %format!("{ns}/{name}"), error = %e, "cannot write status");
    }
}

async fn write_cluster_status(client: &Client, p: &ClusterTunnelPolicy, status: &TunnelPolicyStatus) {
    let Some(name) = p.metadata.name.as_deref() else { return };
    let api = Api::<ClusterTunnelPolicy>::all(client.clone());
    if let Err(e) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await {
        warn!(policy = %name, error = %e, "cannot write status");
    }
}

/// Server-side applies the Secret (first, so the files exist) and the ConfigMap when the hash changed.
async fn apply(
    client: &Client,
    s: &Settings,
    metrics: &Metrics,
    state: &mut LoopState,
    r: &render::Rendered,
) -> Result<(), Error> {
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &s.namespace);
    if state.last_hash.is_none() {
        // After a start or a leadership change: what is in force?
        match cms.get_opt(&s.config_name()).await {
            Ok(Some(cm)) => state.last_hash = cm.annotations().get(HASH_ANNOTATION).cloned(),
            Ok(None) => {}
            Err(e) => return Err(Error::Apply(format!("ConfigMap {}", s.config_name()), e)),
        }
    }
    if state.last_hash.as_deref() == Some(r.hash.as_str()) {
        metrics.config_writes.with_label_values(&["unchanged"]).inc();
        return Ok(());
    }
    let labels = json!({ "app.kubernetes.io/managed-by": MANAGER, "app.kubernetes.io/part-of": "tunnelgate" });
    let pp = PatchParams::apply(MANAGER).force();
    if !r.tls_data.is_empty() {
        let data: BTreeMap<String, ByteString> =
            r.tls_data.iter().map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes()))).collect();
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": { "name": s.tls_name(), "namespace": s.namespace, "labels": labels },
            "type": "Opaque",
            "data": data,
        });
        let secrets = Api::<Secret>::namespaced(client.clone(), &s.namespace);
        if let Err(e) = secrets.patch(&s.tls_name(), &pp, &Patch::Apply(&secret)).await {
            metrics.config_writes.with_label_values(&["failed"]).inc();
            return Err(Error::Apply(format!("Secret {}", s.tls_name()), e));
        }
    }
    let mut annotations = r.annotations.clone();
    annotations.insert(HASH_ANNOTATION.into(), r.hash.clone());
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": s.config_name(), "namespace": s.namespace, "labels": labels, "annotations": annotations },
        "data": { "config.yaml": r.config },
    });
    match cms.patch(&s.config_name(), &pp, &Patch::Apply(&cm)).await {
        Ok(_) => {
            metrics.config_writes.with_label_values(&["applied"]).inc();
            info!(configmap = %s.config_name(), sha256 = %r.hash, "proxy configuration applied");
            state.last_hash = Some(r.hash.clone());
            Ok(())
        }
        Err(e) => {
            metrics.config_writes.with_label_values(&["failed"]).inc();
            Err(Error::Apply(format!("ConfigMap {}", s.config_name()), e))
        }
    }
}

#[cfg(test)]
mod tests;
