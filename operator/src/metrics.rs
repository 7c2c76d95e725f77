//! Operator metrics on an explicit registry; labels from closed sets only.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every collector the operator exports.
#[derive(Clone)]
pub struct Metrics {
    /// `result` = success | error.
    pub reconciles: IntCounterVec,
    /// Seconds per reconcile. Buckets 1 ms .. ~16 s (×2).
    pub reconcile_duration: Histogram,
    /// `result` = applied | unchanged | failed.
    pub config_writes: IntCounterVec,
    /// `state` = accepted | rejected.
    pub policies: IntGaugeVec,
    /// 1 while this replica holds the Lease.
    pub leader: IntGauge,
    /// The render number of the configuration this replica last wrote or found in force (0 on a
    /// standby replica): a proxy whose `tunnelgate_config_render` is lower is behind.
    pub render: IntGauge,
    /// Policy status writes by `result` = success | failure.
    pub status_writes: IntCounterVec,
    /// Policy statuses waiting for the status writer.
    pub status_pending: IntGauge,
    /// Proxies of the release by `state` = current (the latest render) | behind | failing.
    pub proxies: IntGaugeVec,
    /// Policies validated and matched against pods again (the rest were reused from the previous
    /// render): per change, about the number of policies the change can affect.
    pub policy_evaluations: IntCounter,
    /// Node documents built again by a render (the others were reused): per pod change, its node's.
    pub node_documents_rendered: IntCounter,
    /// Pod changes the reconciles applied (a change before and after counted as two).
    pub pod_changes: IntCounter,
    /// Pods intercepted transparently: the eligible pods of the namespaces the base enrols.
    pub transparent_pods: IntGauge,
}

impl Metrics {
    /// Creates and registers the collectors.
    pub fn register(r: &Registry) -> prometheus::Result<Metrics> {
        let m = Metrics {
            reconciles: IntCounterVec::new(
                Opts::new("tunnelgate_operator_reconciles_total", "Reconciles by result"),
                &["result"],
            )?,
            reconcile_duration: Histogram::with_opts(
                HistogramOpts::new("tunnelgate_operator_reconcile_duration_seconds", "Time per reconcile")
                    .buckets(exponential_buckets(0.001, 2.0, 15)?),
            )?,
            proxies: IntGaugeVec::new(
                Opts::new("tunnelgate_operator_proxies", "Proxies by the render they have in force"),
                &["state"],
            )?,
            config_writes: IntCounterVec::new(
                Opts::new("tunnelgate_operator_config_writes_total", "Writes of the rendered ConfigMap"),
                &["result"],
            )?,
            policies: IntGaugeVec::new(
                Opts::new("tunnelgate_operator_policies", "TunnelPolicies by state"),
                &["state"],
            )?,
            render: IntGauge::new(
                "tunnelgate_operator_render",
                "Render number of the proxy configuration in force (written by the leader)",
            )?,
            status_writes: IntCounterVec::new(
                Opts::new("tunnelgate_operator_status_writes_total", "Policy status writes by result"),
                &["result"],
            )?,
            status_pending: IntGauge::new(
                "tunnelgate_operator_status_writes_pending",
                "Policy statuses waiting to be written",
            )?,
            policy_evaluations: IntCounter::new(
                "tunnelgate_operator_policy_evaluations_total",
                "Policies worked out again by a render (validated and matched against pods)",
            )?,
            node_documents_rendered: IntCounter::new(
                "tunnelgate_operator_node_documents_rendered_total",
                "Per-node documents built again by a render (the others were reused unchanged)",
            )?,
            pod_changes: IntCounter::new(
                "tunnelgate_operator_pod_changes_total",
                "Pod changes applied by reconciles (each changed pod before and after)",
            )?,
            transparent_pods: IntGauge::new(
                "tunnelgate_operator_transparent_pods",
                "Pods enrolled for transparent interception (in every node's documents together)",
            )?,
            leader: IntGauge::new(
                "tunnelgate_operator_leader",
                "Whether this replica holds the Lease (1) or stands by (0)",
            )?,
        };
        r.register(Box::new(m.reconciles.clone()))?;
        r.register(Box::new(m.reconcile_duration.clone()))?;
        r.register(Box::new(m.config_writes.clone()))?;
        r.register(Box::new(m.policies.clone()))?;
        r.register(Box::new(m.leader.clone()))?;
        r.register(Box::new(m.render.clone()))?;
        r.register(Box::new(m.status_writes.clone()))?;
        r.register(Box::new(m.status_pending.clone()))?;
        r.register(Box::new(m.proxies.clone()))?;
        r.register(Box::new(m.policy_evaluations.clone()))?;
        r.register(Box::new(m.transparent_pods.clone()))?;
        r.register(Box::new(m.node_documents_rendered.clone()))?;
        r.register(Box::new(m.pod_changes.clone()))?;
        let build = IntGaugeVec::new(
            Opts::new("tunnelgate_operator_build_info", "Build of this operator; always 1"),
            &["version", "git_sha"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION"), env!("TUNNELGATE_GIT_SHA")]).set(1);
        r.register(Box::new(build))?;
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        // Series exist from the start, so rates and alerts see them before the first event.
        for result in ["success", "error"] {
            m.reconciles.with_label_values(&[result]);
        }
        for result in ["applied", "unchanged", "failed"] {
            m.config_writes.with_label_values(&[result]);
        }
        for result in ["success", "failure"] {
            m.status_writes.with_label_values(&[result]);
        }
        for state in ["current", "behind", "failing"] {
            m.proxies.with_label_values(&[state]);
        }
        for state in ["accepted", "rejected"] {
            m.policies.with_label_values(&[state]);
        }
        Ok(m)
    }
}
