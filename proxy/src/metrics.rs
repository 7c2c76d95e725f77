//! Prometheus collectors of the proxy, registered on an explicit registry. Label values come
//! only from closed sets (enums) or config-bounded names (listener and rule names).

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

/// Every collector the proxy exports.
#[derive(Clone)]
pub struct ProxyMetrics {
    /// `listener`, `result` (see `TunnelError::kind`, plus `established`).
    pub tunnel_requests: IntCounterVec,
    /// Established tunnels now open, by `listener`.
    pub tunnels_active: IntGaugeVec,
    /// Accepted client connections now open (any stage).
    pub connections_open: IntGauge,
    /// Tunnel lifetime by `close` reason. Buckets 0.01 s .. ~11 h (×4).
    pub tunnel_duration: HistogramVec,
    /// `listener`, `direction` = upstream (client → target) or downstream.
    pub relayed_bytes: IntCounterVec,
    /// Of those, the bytes moved by `splice(2)` without entering the proxy's memory, by `listener`.
    pub spliced_bytes: IntCounterVec,
    /// Time to connect to the upstream. Buckets 0.5 ms .. ~16 s (×2).
    pub upstream_connect_duration: HistogramVec,
    /// `result` = success, not_found, error, timeout, cached_local.
    pub dns_lookups: IntCounterVec,
    /// `decision` = allow | deny, `reason` (as in access events: policy, default,
    /// private_address, cluster_network, self), `rule` = rule name, `default` or `self`.
    pub policy_decisions: IntCounterVec,
    /// Dry-run rules' verdicts by `rule` and `verdict` (would_deny, would_allow).
    pub policy_dry_run: IntCounterVec,
    /// `listener`, `result` (success, failure, timeout, unrecognized_name, acme_challenge) and
    /// `version` (TLSv1.2, TLSv1.3; `unknown` unless the handshake succeeded).
    pub tls_handshakes: IntCounterVec,
    /// Time from accept to the end of the TLS handshake, by `listener`. Buckets 0.5 ms .. ~16 s.
    pub tls_handshake_duration: HistogramVec,
    /// ACME certificate events by `listener`, `result` = issued | cached | error.
    pub acme_events: IntCounterVec,
    /// Errors from accept(2) (EMFILE and the like); the loop backs off and continues.
    pub accept_errors: IntCounter,
    /// `result` = success | failure.
    pub config_reloads: IntCounterVec,
    /// Time from a new document to its snapshot in force (parse, validate, compile, bind, swap),
    /// or to its refusal. Buckets 1 ms .. ~16 s (×2).
    pub config_reload_duration: Histogram,
    /// Generation of the config in force (1 at start).
    pub config_generation: IntGauge,
    /// The operator's render number of the config in force (0 when it has none).
    pub config_render: IntGauge,
    /// Unix time of the last successful (re)load.
    pub config_last_reload_success_timestamp: IntGauge,
    /// 1 when the last (re)load attempt succeeded, 0 when it failed (the previous config serves).
    pub config_last_reload_success: IntGauge,
    /// Always 1, labelled with the `sha256` (first 12 hex digits) of the config in force.
    pub config_info: IntGaugeVec,
    /// The earliest notAfter (Unix time) of the certificates a TLS listener serves, by `listener`.
    pub tls_certificate_expiry: IntGaugeVec,
    /// 1 while draining after SIGTERM.
    pub draining: IntGauge,
    /// Tunnels closed by the drain deadline.
    pub drain_forced_closes: IntCounter,
    /// Plain-HTTP requests by `listener`, `method` (GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS,
    /// other) and `code_class` (1xx .. 5xx).
    pub http_requests: IntCounterVec,
    /// Plain-HTTP request duration (until the response body ended) by `listener`.
    pub http_request_duration: HistogramVec,
    /// Idle pooled upstream connections.
    pub upstream_pool_idle: IntGauge,
    /// Upstream connections used by plain-HTTP requests, `result` = new | reused.
    pub upstream_connections: IntCounterVec,
    /// Requests sent to parent proxies by `parent` and `result` (established, refused_by_parent,
    /// unreachable, timeout, tls_failed, closed, dns_failed).
    pub parent_requests: IntCounterVec,
    /// Time from dialling a parent to its `2xx`, by `parent`.
    pub parent_connect_duration: HistogramVec,
    /// 1 while a parent is usable, 0 while it is skipped after a failure; by `parent`.
    pub parent_up: IntGaugeVec,
    /// Usable members of each parent `group`.
    pub parent_group_healthy: IntGaugeVec,
    /// 1 for the member of each `group` that is tried first now (`parent`).
    pub parent_group_active: IntGaugeVec,
    /// Heap bytes the proxy holds (resident memory when embedded as a library), every 100 ms.
    pub memory_in_use: IntGauge,
    /// The memory budget in force, bytes (0: none).
    pub memory_budget: IntGauge,
    /// 1 while new requests are refused because memory is over budget.
    pub memory_overloaded: IntGauge,
    /// Requests refused (503) because memory was over budget.
    pub memory_shed: IntCounter,
}

impl ProxyMetrics {
    /// Creates the collectors and registers them on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = ProxyMetrics {
            tunnel_requests: IntCounterVec::new(
                Opts::new("tunnelgate_tunnel_requests_total", "CONNECT requests by outcome"),
                &["listener", "result"],
            )?,
            tunnels_active: IntGaugeVec::new(
                Opts::new("tunnelgate_tunnels_active", "Established tunnels now open"),
                &["listener"],
            )?,
            connections_open: IntGauge::new("tunnelgate_connections_open", "Accepted client connections now open")?,
            tunnel_duration: HistogramVec::new(
                HistogramOpts::new("tunnelgate_tunnel_duration_seconds", "Tunnel lifetime by close reason")
                    .buckets(exponential_buckets(0.01, 4.0, 13)?),
                &["close"],
            )?,
            relayed_bytes: IntCounterVec::new(
                Opts::new("tunnelgate_relayed_bytes_total", "Bytes relayed through tunnels"),
                &["listener", "direction"],
            )?,
            spliced_bytes: IntCounterVec::new(
                Opts::new(
                    "tunnelgate_relayed_spliced_bytes_total",
                    "Bytes relayed through tunnels by splice(2), without copying (also counted in tunnelgate_relayed_bytes_total)",
                ),
                &["listener"],
            )?,
            upstream_connect_duration: HistogramVec::new(
                HistogramOpts::new("tunnelgate_upstream_connect_duration_seconds", "Time to connect to the upstream")
                    .buckets(exponential_buckets(0.0005, 2.0, 16)?),
                &["result"],
            )?,
            dns_lookups: IntCounterVec::new(
                Opts::new("tunnelgate_dns_lookups_total", "DNS lookups by result"),
                &["result"],
            )?,
            policy_decisions: IntCounterVec::new(
                Opts::new("tunnelgate_policy_decisions_total", "Policy decisions by deciding rule"),
                &["decision", "reason", "rule"],
            )?,
            policy_dry_run: IntCounterVec::new(
                Opts::new("tunnelgate_policy_dry_run_total", "What dry-run rules would have changed"),
                &["rule", "verdict"],
            )?,
            tls_handshakes: IntCounterVec::new(
                Opts::new("tunnelgate_tls_handshakes_total", "TLS handshakes with clients"),
                &["listener", "result", "version"],
            )?,
            tls_handshake_duration: HistogramVec::new(
                HistogramOpts::new("tunnelgate_tls_handshake_duration_seconds", "TLS handshake duration")
                    .buckets(exponential_buckets(0.0005, 2.0, 16)?),
                &["listener"],
            )?,
            acme_events: IntCounterVec::new(
                Opts::new("tunnelgate_acme_events_total", "ACME certificate events (issued, cached, error)"),
                &["listener", "result"],
            )?,
            accept_errors: IntCounter::new("tunnelgate_accept_errors_total", "Errors from accept")?,
            config_reloads: IntCounterVec::new(
                Opts::new("tunnelgate_config_reloads_total", "Configuration loads by result"),
                &["result"],
            )?,
            config_reload_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "tunnelgate_config_reload_duration_seconds",
                    "Time to parse, compile and switch to a new configuration (or refuse it)",
                )
                .buckets(exponential_buckets(0.001, 2.0, 15)?),
            )?,
            config_generation: IntGauge::new(
                "tunnelgate_config_generation",
                "Generation of the configuration in force",
            )?,
            config_render: IntGauge::new(
                "tunnelgate_config_render",
                "The operator's render number of the configuration in force (0: none)",
            )?,
            config_last_reload_success_timestamp: IntGauge::new(
                "tunnelgate_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful configuration load",
            )?,
            config_last_reload_success: IntGauge::new(
                "tunnelgate_config_last_reload_success",
                "1 when the last configuration load succeeded, 0 when it failed",
            )?,
            config_info: IntGaugeVec::new(
                Opts::new("tunnelgate_config_info", "The configuration in force (sha256 prefix); always 1"),
                &["sha256"],
            )?,
            tls_certificate_expiry: IntGaugeVec::new(
                Opts::new(
                    "tunnelgate_tls_certificate_expiry_timestamp_seconds",
                    "Earliest notAfter of the certificates a TLS listener serves",
                ),
                &["listener"],
            )?,
            draining: IntGauge::new("tunnelgate_draining", "1 while the proxy drains after SIGTERM")?,
            drain_forced_closes: IntCounter::new(
                "tunnelgate_drain_forced_closes_total",
                "Tunnels closed because the drain deadline passed",
            )?,
            http_requests: IntCounterVec::new(
                Opts::new("tunnelgate_http_requests_total", "Plain-HTTP forwarded requests by method and status class"),
                &["listener", "method", "code_class"],
            )?,
            http_request_duration: HistogramVec::new(
                HistogramOpts::new("tunnelgate_http_request_duration_seconds", "Plain-HTTP request duration")
                    .buckets(exponential_buckets(0.0005, 2.5, 16)?),
                &["listener"],
            )?,
            upstream_pool_idle: IntGauge::new(
                "tunnelgate_upstream_pool_idle_connections",
                "Idle upstream connections kept for reuse",
            )?,
            upstream_connections: IntCounterVec::new(
                Opts::new("tunnelgate_upstream_connections_total", "Upstream connections used by plain-HTTP requests"),
                &["result"],
            )?,
            parent_requests: IntCounterVec::new(
                Opts::new("tunnelgate_parent_requests_total", "Requests sent to parent proxies by outcome"),
                &["parent", "result"],
            )?,
            parent_connect_duration: HistogramVec::new(
                HistogramOpts::new(
                    "tunnelgate_parent_connect_duration_seconds",
                    "Time from dialling a parent proxy to its 2xx answer",
                )
                .buckets(exponential_buckets(0.0005, 2.0, 16)?),
                &["parent"],
            )?,
            parent_up: IntGaugeVec::new(
                Opts::new("tunnelgate_parent_up", "1 while a parent proxy is usable, 0 while it is skipped"),
                &["parent"],
            )?,
            parent_group_healthy: IntGaugeVec::new(
                Opts::new("tunnelgate_parent_group_healthy_members", "Usable members of a parent group"),
                &["group"],
            )?,
            parent_group_active: IntGaugeVec::new(
                Opts::new("tunnelgate_parent_group_active", "1 for the member of a parent group tried first now"),
                &["group", "parent"],
            )?,
            memory_in_use: IntGauge::new("tunnelgate_memory_in_use_bytes", "Heap bytes the proxy holds")?,
            memory_budget: IntGauge::new("tunnelgate_memory_budget_bytes", "Memory budget in force (0: none)")?,
            memory_overloaded: IntGauge::new(
                "tunnelgate_memory_overloaded",
                "1 while new requests are refused because memory is over budget",
            )?,
            memory_shed: IntCounter::new(
                "tunnelgate_memory_shed_requests_total",
                "Requests refused with 503 because memory was over budget",
            )?,
        };
        registry.register(Box::new(m.memory_in_use.clone()))?;
        registry.register(Box::new(m.memory_budget.clone()))?;
        registry.register(Box::new(m.memory_overloaded.clone()))?;
        registry.register(Box::new(m.memory_shed.clone()))?;
        registry.register(Box::new(m.http_requests.clone()))?;
        registry.register(Box::new(m.http_request_duration.clone()))?;
        registry.register(Box::new(m.upstream_pool_idle.clone()))?;
        registry.register(Box::new(m.upstream_connections.clone()))?;
        registry.register(Box::new(m.parent_requests.clone()))?;
        registry.register(Box::new(m.parent_connect_duration.clone()))?;
        registry.register(Box::new(m.parent_up.clone()))?;
        registry.register(Box::new(m.parent_group_healthy.clone()))?;
        registry.register(Box::new(m.parent_group_active.clone()))?;
        registry.register(Box::new(m.tunnel_requests.clone()))?;
        registry.register(Box::new(m.tunnels_active.clone()))?;
        registry.register(Box::new(m.connections_open.clone()))?;
        registry.register(Box::new(m.tunnel_duration.clone()))?;
        registry.register(Box::new(m.relayed_bytes.clone()))?;
        registry.register(Box::new(m.spliced_bytes.clone()))?;
        registry.register(Box::new(m.upstream_connect_duration.clone()))?;
        registry.register(Box::new(m.dns_lookups.clone()))?;
        registry.register(Box::new(m.policy_decisions.clone()))?;
        registry.register(Box::new(m.tls_handshakes.clone()))?;
        registry.register(Box::new(m.policy_dry_run.clone()))?;
        registry.register(Box::new(m.tls_handshake_duration.clone()))?;
        registry.register(Box::new(m.acme_events.clone()))?;
        registry.register(Box::new(m.accept_errors.clone()))?;
        registry.register(Box::new(m.config_reloads.clone()))?;
        registry.register(Box::new(m.config_reload_duration.clone()))?;
        registry.register(Box::new(m.config_generation.clone()))?;
        registry.register(Box::new(m.config_render.clone()))?;
        registry.register(Box::new(m.config_last_reload_success.clone()))?;
        registry.register(Box::new(m.config_last_reload_success_timestamp.clone()))?;
        registry.register(Box::new(m.config_info.clone()))?;
        registry.register(Box::new(m.tls_certificate_expiry.clone()))?;
        registry.register(Box::new(m.draining.clone()))?;
        registry.register(Box::new(m.drain_forced_closes.clone()))?;
        let build = IntGaugeVec::new(
            Opts::new("tunnelgate_build_info", "Build of this proxy; always 1"),
            &["version", "git_sha"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION"), env!("TUNNELGATE_GIT_SHA")]).set(1);
        registry.register(Box::new(build))?;
        // CPU, memory and file descriptors of this process (Linux /proc), as every exporter has.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        for result in ["success", "failure"] {
            m.config_reloads.with_label_values(&[result]);
        }
        for result in ["success", "not_found", "error", "timeout", "cached_local"] {
            m.dns_lookups.with_label_values(&[result]);
        }
        for decision in ["allow", "deny"] {
            m.policy_decisions.with_label_values(&[decision, "default", "default"]);
        }
        for result in ["new", "reused"] {
            m.upstream_connections.with_label_values(&[result]);
        }
        Ok(m)
    }

    /// Creates the per-listener series at zero, so rates and alerts see them before the first
    /// event (a listener's counters only appear with its first connection otherwise).
    pub fn init_listener(&self, listener: &str) {
        for result in TUNNEL_RESULTS {
            self.tunnel_requests.with_label_values(&[listener, result]);
        }
        self.tunnels_active.with_label_values(&[listener]);
        for direction in ["upstream", "downstream"] {
            self.relayed_bytes.with_label_values(&[listener, direction]);
        }
        self.spliced_bytes.with_label_values(&[listener]);
    }
}

/// The `result` values of `tunnelgate_tunnel_requests_total` alerts and dashboards rely on.
const TUNNEL_RESULTS: [&str; 7] =
    ["established", "denied", "dns_failed", "upstream_unreachable", "upstream_timeout", "overloaded", "client_limited"];

/// Increments a gauge now and decrements it when dropped, so no path can forget to.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    /// Increments `g` until the guard is dropped.
    pub fn new(g: IntGauge) -> Self {
        g.inc();
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
