//! The reconcile loop: any change the watches ([`watches`]) see wakes one debounced,
//! single-writer reconcile (leader only) that takes the usable Secrets ([`inputs`]), renders,
//! checks with the proxy's parser, writes through [`apply`] when the hash changed, and queues each
//! policy's status on the [`status_writer`]; rollout truth comes from [`rollout`], dry-run events
//! from [`dryrun`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::crd::{ClusterTunnelPolicy, TunnelPolicy};
use crate::metrics::Metrics;
use crate::render::{self, Cluster, ClusterPolicyIn, Input, PolicyIn, RenderError};
use crate::status::{self, NotInForce};

mod apply;
mod dryrun;
mod inputs;
mod pods;
mod rollout;
mod status_writer;
mod watches;

use apply::apply;
use status_writer::{StatusWriter, Target};
use watches::{cluster_networks, proxy_endpoints, wait_synced, Caches};

/// Field manager of every write (server-side apply).
pub const MANAGER: &str = "tunnelgate-operator";
/// Annotation holding the hash of what the operator wrote.
pub const HASH_ANNOTATION: &str = "tunnelgate.io/config-sha256";
/// Annotation holding the render number of what the operator wrote (it only grows).
pub const RENDER_ANNOTATION: &str = "tunnelgate.io/render";

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
    /// Longest wait from the first change to the reconcile, however busy the cluster is.
    pub debounce_max: Duration,
    /// The pods of one namespace wake a reconcile at most once per this interval.
    pub namespace_churn_interval: Duration,
    /// The proxies' admin port, for the rollout view (`None`: not reported).
    pub proxy_admin_port: Option<u16>,
    /// The file holding the token the proxies' `/config` requires, when they require one.
    pub proxy_admin_token_file: Option<std::path::PathBuf>,
    /// Render one document per node as well (`<release>-proxy-node-<node>`), read by proxies
    /// started with `--node-name`.
    pub config_per_node: bool,
    /// Whether this release writes policy status (false on a second release in the cluster).
    pub policy_status: bool,
    /// Policy status writes per second at most (the status writer's pace).
    pub status_writes_per_second: u32,
    /// A proxy behind the latest render for this long gets a Warning event.
    pub behind_warning_after: Duration,
    /// At most one dry-run event per policy per this interval.
    pub dry_run_event_interval: Duration,
    /// The proxy pods' `app.kubernetes.io/instance` label (Helm's release name, which differs
    /// from the object-name prefix in `release` when the chart prefixes it).
    pub proxy_instance: String,
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
    let caches = watches::start(
        &client,
        &ns,
        &settings.base_name(),
        wake.clone(),
        settings.namespace_churn_interval,
        shutdown.clone(),
    )
    .await;
    tokio::select! {
        () = shutdown.cancelled() => return,
        () = wait_synced(&caches) => {}
    }
    ready.store(true, Ordering::Relaxed);
    info!("caches synced");
    let statuses = StatusWriter::spawn(
        client.clone(),
        metrics.clone(),
        settings.status_writes_per_second,
        settings.policy_status,
        shutdown.clone(),
    );
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: MANAGER.into(), instance: Some(settings.identity.clone()) },
    );
    let mut state = LoopState::new(
        settings
            .proxy_admin_port
            .map(|port| rollout::Proxies::new(port, settings.proxy_admin_token_file.clone(), wake.clone())),
        settings.dry_run_event_interval,
    );
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
                state.node_docs_read = None;
            }
        }
        if !settle(&wake, settings.debounce, settings.debounce_max, &shutdown).await {
            return;
        }
        if !*leader.borrow() {
            continue;
        }
        let timer = metrics.reconcile_duration.start_timer();
        let result = reconcile(&client, &settings, &caches, &metrics, &recorder, &statuses, &mut state).await;
        timer.observe_duration();
        if let Some(after) = state.recheck.take() {
            // Nothing may change while a proxy becomes overdue: look again then.
            let w = wake.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                w.notify_one();
            });
        }
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

struct LoopState {
    /// Hash of the last document written or found in force.
    last_hash: Option<String>,
    /// Render number of the last document written or found in force.
    render: u64,
    /// Per policy (`ns/name`, `:name` for cluster policies): its generation and rules, and the
    /// first render that carried them.
    policy_renders: HashMap<String, (Option<i64>, Vec<String>, u64)>,
    /// Long-polls of the proxies' `/config`, when the admin port is known.
    proxies: Option<rollout::Proxies>,
    /// Last warning published per object, so an unchanged problem is not re-announced.
    warned: HashMap<String, String>,
    /// When each dry-run policy was last announced.
    dry_run_events: dryrun::DryRunEvents,
    /// Proxies behind the latest render, and since when.
    laggards: rollout::Laggards,
    /// Look again after this long even without a change (a proxy may become overdue).
    recheck: Option<Duration>,
    /// Per node (when rendering per node): the hash and render number of its document in force.
    node_docs: HashMap<String, (String, u64)>,
    /// When `node_docs` was last read from the API (`None`: not since the start, a change of
    /// leader or a failed write).
    node_docs_read: Option<tokio::time::Instant>,
    /// The last render's node documents, reused where nothing of a node changed.
    prior_nodes: BTreeMap<String, render::NodeDoc>,
    /// The pods as last rendered, and what the last render worked out per policy: a render
    /// re-selects pods only for the policies a change can affect.
    pods: pods::PodTable,
    memo: render::Memo,
}

impl LoopState {
    /// Nothing known yet: the first reconcile reads what is in force.
    fn new(proxies: Option<rollout::Proxies>, dry_run_event_interval: Duration) -> LoopState {
        LoopState {
            last_hash: None,
            render: 0,
            policy_renders: HashMap::new(),
            proxies,
            warned: HashMap::new(),
            dry_run_events: dryrun::DryRunEvents::new(dry_run_event_interval),
            laggards: rollout::Laggards::default(),
            recheck: None,
            node_docs: HashMap::new(),
            node_docs_read: None,
            prior_nodes: BTreeMap::new(),
            pods: pods::PodTable::default(),
            memo: render::Memo::default(),
        }
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

/// Waits until `quiet` passes without a new change, or `max` after the first one, whichever comes
/// first (a quiet period, not a fixed sleep: a change that lands during the wait extends it, up to
/// `max`). Returns false on shutdown.
async fn settle(wake: &Notify, quiet: Duration, max: Duration, shutdown: &CancellationToken) -> bool {
    let deadline = tokio::time::Instant::now() + max;
    loop {
        let until = (tokio::time::Instant::now() + quiet).min(deadline);
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep_until(until) => return true,
            () = wake.notified() => {
                if tokio::time::Instant::now() >= deadline {
                    // This change is covered by the reconcile about to run.
                    return true;
                }
            }
        }
    }
}

/// A policy of either kind, for the status and event pass.
enum Policy<'a> {
    Namespaced(&'a TunnelPolicy),
    Cluster(&'a ClusterTunnelPolicy),
}

impl Policy<'_> {
    fn generation_and_status(&self) -> (Option<i64>, Option<&crate::crd::TunnelPolicyStatus>) {
        match self {
            Policy::Namespaced(p) => (p.metadata.generation, p.status.as_ref()),
            Policy::Cluster(p) => (p.metadata.generation, p.status.as_ref()),
        }
    }

    /// Warning-event key (`tp/ns/name`, `ctp/name`).
    fn key(&self) -> String {
        match self {
            Policy::Namespaced(p) => format!(
                "tp/{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            ),
            Policy::Cluster(p) => format!("ctp/{}", p.metadata.name.as_deref().unwrap_or_default()),
        }
    }

    fn object_ref(&self) -> k8s_openapi::api::core::v1::ObjectReference {
        match self {
            Policy::Namespaced(p) => p.object_ref(&()),
            Policy::Cluster(p) => p.object_ref(&()),
        }
    }

    fn target(&self) -> Target {
        match self {
            Policy::Namespaced(p) => Target::Namespaced {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
            },
            Policy::Cluster(p) => Target::Cluster { name: p.metadata.name.clone().unwrap_or_default() },
        }
    }
}

async fn reconcile(
    client: &Client,
    s: &Settings,
    c: &Caches,
    metrics: &Metrics,
    recorder: &Recorder,
    statuses: &StatusWriter,
    state: &mut LoopState,
) -> Result<(), Error> {
    let ns = &s.namespace;
    let all_policies = c.policies.state();
    let policies: Vec<Arc<TunnelPolicy>> = all_policies.iter().filter_map(|l| l.read.as_ref().ok().cloned()).collect();
    let changed = state.pods.sync(&c.pods.state());
    let base_cm = c.base.get(&ObjectRef::new(&s.base_name()).within(ns));
    let base = base_cm.as_ref().and_then(|cm| cm.data.as_ref()?.get("config.yaml").cloned());

    let (tls, htpasswd) = inputs::secrets(c, s, base.as_deref(), recorder, state).await;

    let inputs: Vec<PolicyIn<'_>> = policies
        .iter()
        .map(|p| PolicyIn {
            namespace: p.metadata.namespace.as_deref().unwrap_or_default(),
            name: p.metadata.name.as_deref().unwrap_or_default(),
            spec: &p.spec,
        })
        .collect();
    let all_cluster_policies = c.cluster_policies.state();
    let cluster_policies: Vec<Arc<ClusterTunnelPolicy>> =
        all_cluster_policies.iter().filter_map(|l| l.read.as_ref().ok().cloned()).collect();
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
    // Node names matter only when rendering per node: no walk over every Node otherwise.
    let node_names: Vec<String> = if s.config_per_node {
        c.nodes.state().iter().filter_map(|n| n.metadata.name.clone()).collect()
    } else {
        Vec::new()
    };
    let input = Input {
        base: &base_text,
        policies: inputs,
        pods: state.pods.rows(),
        tls: &tls,
        tls_dir: &s.tls_dir,
        htpasswd: htpasswd.as_deref(),
        cluster,
        per_node: s.config_per_node.then_some(node_names.as_slice()),
        prior_nodes: Some(&state.prior_nodes),
    };
    let (outcomes, rendered) = render::render_with(&input, &mut state.memo, &changed.as_changes());
    metrics.policy_evaluations.inc_by(u64::try_from(state.memo.evaluated()).unwrap_or(u64::MAX));
    let applied: Result<String, Error> = match (base.is_some(), rendered) {
        (false, _) => Err(Error::BaseMissing(format!("{ns}/{}", s.base_name()))),
        (true, Err(e)) => Err(Error::Render(e)),
        (true, Ok(r)) => {
            let written = apply(client, s, metrics, state, &r).await.map(|()| r.hash.clone());
            state.prior_nodes = r.nodes;
            written
        }
    };

    // Rollout view: the release's proxy pods and the render each has in force.
    let view = state.proxies.as_mut().map(|proxies| {
        let endpoints = proxy_endpoints(&c.pods.state(), ns, &s.proxy_instance);
        proxies.sync(&endpoints);
        proxies.view(&endpoints)
    });
    // Per node, a proxy that has its own node's latest document is as current as it can be.
    let view = view.map(|v| rollout::per_node_current(v, state.render, &state.node_docs));
    if let Some(v) = &view {
        for (label, n) in rollout::proxy_states(state.render, v) {
            metrics.proxies.with_label_values(&[label]).set(n);
        }
    }
    // Outcomes name their policy; pair by name rather than relying on the renderer's order.
    let by_name: HashMap<(&str, &str), &Arc<TunnelPolicy>> = policies
        .iter()
        .map(|p| {
            ((p.metadata.namespace.as_deref().unwrap_or_default(), p.metadata.name.as_deref().unwrap_or_default()), p)
        })
        .collect();
    let cluster_by_name: HashMap<&str, &Arc<ClusterTunnelPolicy>> =
        cluster_policies.iter().map(|p| (p.metadata.name.as_deref().unwrap_or_default(), p)).collect();
    // Cluster policies' outcomes have no namespace.
    let policy_of = |o: &render::PolicyOutcome| {
        if o.namespace.is_empty() {
            cluster_by_name.get(o.name.as_str()).map(|p| Policy::Cluster(p))
        } else {
            by_name.get(&(o.namespace.as_str(), o.name.as_str())).map(|p| Policy::Namespaced(p))
        }
    };
    // The render that first carried each policy's current rules (a policy unchanged keeps its own).
    let mut renders: HashMap<String, u64> = HashMap::new();
    for o in &outcomes {
        let Ok(a) = &o.result else { continue };
        let key = format!("{}/{}", o.namespace, o.name);
        let generation = policy_of(o).and_then(|p| p.generation_and_status().0);
        let current = state.render;
        let entry = state.policy_renders.entry(key.clone()).or_insert((generation, a.rules.clone(), current));
        if entry.0 != generation || entry.1 != a.rules {
            *entry = (generation, a.rules.clone(), current);
        }
        renders.insert(key, entry.2);
    }
    state.policy_renders.retain(|k, _| renders.contains_key(k));
    let rollout_of = |o: &render::PolicyOutcome| -> Option<status::Rollout> {
        let v = view.as_ref()?;
        applied.as_ref().ok()?;
        let mut r = rollout::policy_rollout(*renders.get(&format!("{}/{}", o.namespace, o.name))?, v);
        if o.result.as_ref().is_ok_and(|a| a.dry_run) {
            let prefix = if o.namespace.is_empty() {
                format!("cluster:{}", o.name)
            } else {
                format!("{}/{}", o.namespace, o.name)
            };
            r.dry_run = Some(rollout::dry_run_totals(&prefix, v));
        }
        Some(r)
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
    let mut dry_run_live = std::collections::HashSet::new();
    for o in &outcomes {
        let Some(p) = policy_of(o) else { continue };
        if o.result.is_ok() {
            accepted += 1
        } else {
            rejected += 1
        }
        let (generation, current) = p.generation_and_status();
        let rollout = rollout_of(o);
        if let Some(totals) = rollout.as_ref().and_then(|r| r.dry_run) {
            let key = format!("{}/{}", o.namespace, o.name);
            dry_run_live.insert(key.clone());
            if let Some((delta, elapsed)) = state.dry_run_events.due(&key, totals, tokio::time::Instant::now()) {
                let ev = Event {
                    type_: EventType::Normal,
                    reason: "DryRun".into(),
                    note: Some(dryrun::note(delta, elapsed)),
                    action: "Reconcile".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&ev, &p.object_ref()).await {
                    debug!(error = %e, "cannot publish event");
                }
            }
        }
        let desired = status::desired(o, generation, &s.config_name(), in_force, current, rollout.as_ref(), &now);
        // Written by the status writer, off the render path (a burst of statuses must not delay
        // the next render).
        if current != Some(&desired) {
            if let Ok(v) = serde_json::to_value(&desired) {
                statuses.want(p.target(), v);
            }
        }
        if let Err(errs) = &o.result {
            let note = status::bounded(errs.iter().map(ToString::to_string), "; ");
            let key = format!("{}/{}", p.key(), generation.unwrap_or(0));
            live.insert(key.clone());
            warn_once(recorder, state, key, &p.object_ref(), "InvalidSpec", format!("rejected: {note}")).await;
        }
    }
    // A proxy that fails its reloads gets one Warning event per failure reason (its logs say more).
    for (ep, report) in view.iter().flatten() {
        let (Some(reason), Some(pod)) = (&report.failed, c.pods.get(&ObjectRef::new(&ep.pod).within(ns))) else {
            continue;
        };
        let key = format!("proxy/{}/{reason}", ep.pod);
        live.insert(key.clone());
        let note = format!("the proxy on node {} cannot load the latest configuration (reason: {reason}); it keeps enforcing the previous one", ep.node);
        warn_once(recorder, state, key, &pod.object_ref(&()), "ReloadFailing", note).await;
    }
    // A proxy that stays behind (no failure: it does not see the new ConfigMap, or does not
    // answer) longer than the threshold gets a Warning event once per render.
    if let Some(v) = &view {
        let (overdue, next) =
            state.laggards.update(state.render, v, tokio::time::Instant::now(), s.behind_warning_after);
        state.recheck = next;
        for ep in overdue {
            let Some(pod) = c.pods.get(&ObjectRef::new(&ep.pod).within(ns)) else { continue };
            let key = format!("proxy/{}/behind/{}", ep.pod, state.render);
            live.insert(key.clone());
            let note = format!(
                "the proxy on node {} has not loaded render {} for over {}; it enforces an older configuration",
                ep.node,
                state.render,
                humantime::format_duration(s.behind_warning_after)
            );
            warn_once(recorder, state, key, &pod.object_ref(&()), "ProxyBehind", note).await;
        }
    }
    // Objects that do not deserialize: told once per generation, by status and event.
    let unreadable = all_policies
        .iter()
        .filter_map(|l| Some((l.read.as_ref().err()?, l.meta_data(), l.object_ref(&()), true)))
        .chain(
            all_cluster_policies
                .iter()
                .filter_map(|l| Some((l.read.as_ref().err()?, l.meta_data(), l.object_ref(&()), false))),
        );
    for (why, meta, reference, namespaced) in unreadable {
        rejected += 1;
        let key = format!(
            "unreadable/{}/{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
            meta.generation.unwrap_or(0)
        );
        live.insert(key.clone());
        if state.warned.contains_key(&key) {
            continue;
        }
        let note = format!(
            "cannot read {}: {}; the policy is ignored until it is fixed (a value from a newer CRD than this operator's?)",
            why.path, why.message
        );
        let name = meta.name.clone().unwrap_or_default();
        let target = match (namespaced, &meta.namespace) {
            (true, Some(ns)) => Target::Namespaced { namespace: ns.clone(), name },
            _ => Target::Cluster { name },
        };
        statuses.want(target, status::unreadable(meta.generation, &note, &now));
        warn_once(recorder, state, key, &reference, "Unreadable", note).await;
    }
    state.warned.retain(|k, _| live.contains(k));
    state.dry_run_events.retain(|k| dry_run_live.contains(k));
    metrics.policies.with_label_values(&["accepted"]).set(accepted);
    metrics.policies.with_label_values(&["rejected"]).set(rejected);
    metrics.status_pending.set(i64::try_from(statuses.pending()).unwrap_or(i64::MAX));
    applied.map(|_| ())
}

#[cfg(test)]
mod tests;
