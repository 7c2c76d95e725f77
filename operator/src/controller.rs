//! The reconcile loop: any change the watches ([`watches`]) see wakes one debounced,
//! single-writer reconcile (leader only). A reconcile reads the caches ([`inputs`]), renders,
//! writes through [`apply`] when the hash changed, then executes what [`plan`] works out from the
//! outcome without I/O: statuses queued on the [`status_writer`], events, gauges. Rollout truth
//! comes from [`rollout`], dry-run announcements from [`dryrun`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::render::{self, RenderError};
use crate::status::NotInForce;

mod apply;
mod dryrun;
mod inputs;
mod plan;
mod pods;
mod rollout;
mod status_writer;
mod watches;

use apply::apply;
use inputs::Inputs;
use status_writer::StatusWriter;
use watches::{wait_synced, Caches};

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
                state.writer.forget();
            }
        }
        if !settle(&wake, settings.debounce, settings.debounce_max, &shutdown).await {
            return;
        }
        if !*leader.borrow() {
            continue;
        }
        let timer = metrics.reconcile_duration.start_timer();
        let world = World { client: &client, settings: &settings, caches: &caches, metrics: &metrics };
        let result = reconcile(&world, &recorder, &statuses, &mut state).await;
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

/// What the loop keeps between reconciles, each part owned by the stage that changes it.
struct LoopState {
    /// What is in force (the writer's).
    writer: apply::Writer,
    /// Long-polls of the proxies' `/config`, when the admin port is known.
    proxies: Option<rollout::Proxies>,
    /// The plan's memory: first renders per policy, warnings published, dry-run announcements,
    /// proxies behind.
    memory: plan::Memory,
    /// Look again after this long even without a change (a proxy may become overdue).
    recheck: Option<Duration>,
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
            writer: apply::Writer::default(),
            proxies,
            memory: plan::Memory::new(dry_run_event_interval),
            recheck: None,
            prior_nodes: BTreeMap::new(),
            pods: pods::PodTable::default(),
            memo: render::Memo::default(),
        }
    }
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

/// One reconcile: read the caches, render (re-selecting pods only where a change can matter),
/// write what changed, then tell the cluster what the plan says.
/// What a reconcile reads and writes through: the API, the loop's settings, the watches' caches,
/// the metrics.
struct World<'a> {
    client: &'a Client,
    settings: &'a Settings,
    caches: &'a Caches,
    metrics: &'a Metrics,
}

async fn reconcile(
    w: &World<'_>,
    recorder: &Recorder,
    statuses: &StatusWriter,
    state: &mut LoopState,
) -> Result<(), Error> {
    let World { client, settings: s, caches: c, metrics } = *w;
    let mut inputs = Inputs::read(c, s);
    let changed = state.pods.apply(c.pods.take());
    let input = inputs.render_input(s, state.pods.rows(), &state.prior_nodes);
    let (outcomes, rendered) = render::render_with(&input, &mut state.memo, &changed.as_changes());
    metrics.policy_evaluations.inc_by(u64::try_from(state.memo.evaluated()).unwrap_or(u64::MAX));
    metrics.node_documents_rendered.inc_by(u64::try_from(state.memo.nodes_rendered()).unwrap_or(u64::MAX));
    metrics.pod_changes.inc_by(u64::try_from(changed.count().unwrap_or(state.pods.rows().len())).unwrap_or(u64::MAX));
    metrics.transparent_pods.set(i64::try_from(state.memo.enrolled()).unwrap_or(i64::MAX));
    let applied: Result<String, Error> = match (inputs.base.is_some(), rendered) {
        (false, _) => Err(Error::BaseMissing(format!("{}/{}", s.namespace, s.base_name()))),
        (true, Err(e)) => Err(Error::Render(e)),
        (true, Ok(r)) => {
            let written = apply(client, s, metrics, &mut state.writer, &r).await.map(|()| r.hash.clone());
            state.prior_nodes = r.nodes;
            written
        }
    };
    // Rollout view: the release's proxy pods and the render each has in force (per node, a proxy
    // that has its own node's latest document is as current as it can be).
    let proxies = state.proxies.as_mut().map(|proxies| {
        let endpoints = state.pods.proxy_endpoints(&s.proxy_instance);
        proxies.sync(&endpoints);
        rollout::per_node_current(proxies.view(&endpoints), state.writer.render(), state.writer.node_docs())
    });
    let proxy_pods = proxies
        .iter()
        .flatten()
        .filter_map(|(ep, _)| Some((ep.pod.clone(), state.pods.proxy_ref(&s.namespace, &ep.pod)?)))
        .collect();
    let config_name = s.config_name();
    let view = plan::View {
        outcomes: &outcomes,
        policies: inputs.policy_objects().map(|p| (p.id(), p)).collect(),
        unreadable: &inputs.unreadable,
        warnings: &inputs.warnings,
        in_force: applied.as_ref().map(String::as_str).map_err(Error::not_in_force),
        proxies: proxies.as_deref(),
        proxy_pods,
        render: state.writer.render(),
        config_name: &config_name,
        behind_warning_after: s.behind_warning_after,
    };
    let plan = plan::plan(&view, &mut state.memory, &plan::Clock::now());
    state.recheck = plan.recheck;
    execute(plan, recorder, statuses, metrics).await;
    applied.map(|_| ())
}

/// Queues the plan's statuses on the status writer, publishes its events and sets its gauges.
async fn execute(plan: plan::Plan, recorder: &Recorder, statuses: &StatusWriter, metrics: &Metrics) {
    // Written by the status writer, off the render path (a burst of statuses must not delay the
    // next render).
    for (id, status) in plan.statuses {
        statuses.want(id, status);
    }
    if let Some(states) = plan.proxy_states {
        for (label, n) in states {
            metrics.proxies.with_label_values(&[label]).set(n);
        }
    }
    metrics.policies.with_label_values(&["accepted"]).set(plan.accepted);
    metrics.policies.with_label_values(&["rejected"]).set(plan.rejected);
    metrics.status_pending.set(i64::try_from(statuses.pending()).unwrap_or(i64::MAX));
    for e in plan.events {
        if let Err(e) = recorder.publish(&e.event(), &e.reference).await {
            debug!(error = %e, "cannot publish event");
        }
    }
}

#[cfg(test)]
mod tests;
