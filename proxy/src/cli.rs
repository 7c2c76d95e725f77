//! Command line: `run` (default), `check` and `explain`. Static settings only; everything that
//! can change at run time lives in the configuration file.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use proxy_config::decide::{OwnEndpoints, Request, Verdict};
use proxy_config::host::parse_target;
use proxy_config::{Authority, ConfigErrors, Decision, Host, ProxyConfig};

use crate::own_addresses;

/// Exit code for an invalid configuration or usage (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;
/// `explain`: the request would be refused (like `kubectl auth can-i`, which exits 1 for "no").
pub const EXIT_DENIED: i32 = 1;
/// `explain`: the name must be resolved to decide (`--resolve`).
pub const EXIT_NEEDS_RESOLUTION: i32 = 2;

/// Tunnelgate egress proxy: a forward proxy (HTTP CONNECT, plain HTTP, WebSocket), TLS-terminating
/// tunnel listeners and transparent listeners for clients without proxy settings, all held to one
/// allow/deny policy with SSRF protection, limits and metrics.
#[derive(Debug, Parser)]
#[command(name = "tunnelgate-proxy", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Arguments of the default command (serve).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (YAML or JSON). Without it the embedded default is used:
    /// a forward listener on 127.0.0.1:8080, admin on 127.0.0.1:9090.
    #[arg(long, env = "TUNNELGATE_CONFIG", conflicts_with = "config_map")]
    pub config: Option<PathBuf>,
    /// Watch this ConfigMap (NAMESPACE/NAME, key config.yaml) through the Kubernetes API instead
    /// of reading a file (in-cluster config or KUBECONFIG). The proxy starts once a valid
    /// document has arrived.
    #[arg(long, env = "TUNNELGATE_CONFIG_MAP")]
    pub config_map: Option<String>,
    /// The node this proxy serves: with --config-map, the operator's document for this node
    /// (NAME-node-NODE, written when it renders per node) is preferred over NAME.
    #[arg(long, requires = "config_map")]
    pub node_name: Option<String>,
    /// This proxy's DaemonSet (in the --config-map namespace), for the node's redirect rules: they
    /// outlive the proxy (enrolled pods fail closed until the next proxy listens) while the
    /// DaemonSet exists with the annotation tunnelgate.io/redirect-rules=keep; when it is deleted
    /// (the release uninstalled) or loses the annotation (transparent mode turned off), the proxy
    /// removes them as it exits.
    #[arg(long, requires = "config_map")]
    pub daemonset: Option<String>,
    /// Log format (text or json), overriding logging.format; needed with --config-map, where logs
    /// start before the configuration arrives.
    #[arg(long, env = "TUNNELGATE_LOG_FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    /// How often the configuration file is re-read even without a file event (a fallback for
    /// missed inotify events), e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub reload_poll_interval: std::time::Duration,
    /// Exit code when the drain deadline had to close tunnels (so an orchestrator can tell a
    /// forced drain); a drain that finishes in time always exits 0.
    #[arg(long, default_value_t = 0)]
    pub forced_exit_code: u8,
    /// Runtime worker threads; default: one per CPU. Match it to the pod's CPU limit.
    #[arg(long, env = "TUNNELGATE_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration file; print every error with its path (exit 64 when invalid).
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the policy decision for one request and the rule that made it (exit 0 allow, 1 deny,
    /// 2 when the name must be resolved to decide).
    Explain {
        #[arg(long)]
        config: PathBuf,
        /// Client (source) address.
        #[arg(long)]
        client: IpAddr,
        /// Target as host:port (a CONNECT target) or http://host[:port]/path (plain HTTP).
        #[arg(long)]
        target: String,
        /// Addresses the target name resolves to (repeatable); needed to decide CIDR rules.
        #[arg(long)]
        resolve: Vec<IpAddr>,
        /// The authenticated proxy user (for rules with `users`).
        #[arg(long)]
        user: Option<String>,
    },
}

/// Why a configuration file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid configuration:\n{errors}")]
    Invalid { path: PathBuf, errors: ConfigErrors },
}

/// Reads and validates a configuration file; returns the config and its text.
pub fn load(path: &Path) -> Result<(ProxyConfig, String), LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
    let cfg = ProxyConfig::from_yaml(&text).map_err(|errors| LoadError::Invalid { path: path.to_owned(), errors })?;
    Ok((cfg, text))
}

/// `check`: returns (exit code, output).
pub fn check(path: &Path) -> (i32, String) {
    match load(path) {
        Ok((cfg, _)) => {
            let mut out = format!(
                "{}: valid ({} listener(s), {} rule(s))\n",
                path.display(),
                cfg.listeners.len(),
                cfg.policy.rules.len()
            );
            for w in cfg.warnings() {
                let _ = writeln!(out, "warning: {w}");
            }
            (0, out)
        }
        Err(e) => (EXIT_USAGE, format!("{}\n", crate::error::ErrorChain(&e))),
    }
}

/// `explain`: returns (exit code, output). The decision is the running proxy's, through the same
/// pipeline, with `--resolve` standing in for DNS.
pub fn explain(path: &Path, client: IpAddr, user: Option<&str>, target: &str, resolve: &[IpAddr]) -> (i32, String) {
    let cfg = match load(path) {
        Ok((c, _)) => c,
        Err(e) => return (EXIT_USAGE, format!("{}\n", crate::error::ErrorChain(&e))),
    };
    let auth: Authority = match parse_target(target) {
        Ok(a) => a,
        Err(e) => return (EXIT_USAGE, format!("target {target:?}: {e} (the request would get 400)\n")),
    };
    let policy = &cfg.policy;
    let addrs: Vec<IpAddr> = match &auth.host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(_) => resolve.to_vec(),
    };
    // The running proxy refuses its own listener and admin ports; so does `explain`.
    let own = OwnEndpoints::of(&cfg, own_addresses::host_addresses());
    let request = Request { client, user, target: &auth };
    let Ok(j) = request.judge_given(policy, resolve, |ip, port| own.contains(ip, port)) else {
        let out = "decision: needs resolution\nthe name must be resolved to decide; pass --resolve IP for each address it resolves to\n";
        return (EXIT_NEEDS_RESOLUTION, out.to_owned());
    };
    let mut out = String::new();
    let code = match &j.verdict {
        Verdict::Allow { rule, limits } => {
            describe(&mut out, policy, &Decision::Allow { rule: *rule, limits: *limits }, &auth, &addrs);
            let _ = writeln!(out, "route: {}", cfg.parents.describe(policy.route_of(*rule)));
            0
        }
        Verdict::Deny { rule, reason } => {
            describe(&mut out, policy, &Decision::Deny { rule: *rule, reason: *reason }, &auth, &addrs);
            EXIT_DENIED
        }
        Verdict::SelfConnect => {
            let _ = writeln!(
                out,
                "target: {auth}\ndecision: deny (403)\nrule: self\nreason: the target is one of this proxy's own listener or admin ports"
            );
            EXIT_DENIED
        }
    };
    if j.by_name {
        let _ = writeln!(out, "resolved: no (decided by name, no DNS query)");
    }
    dry_run_line(&mut out, j.dry_run);
    (code, out)
}

/// The dry-run verdict, apart from the enforced decision.
fn dry_run_line(out: &mut String, v: Option<proxy_config::DryRunVerdict>) {
    if let Some(v) = v {
        let what = match v {
            proxy_config::DryRunVerdict::WouldDeny(_) => "would deny it",
            proxy_config::DryRunVerdict::WouldAllow(_) => "would allow it",
        };
        let _ = writeln!(out, "dry run: rule {} {what} (not enforced)", v.rule());
    }
}

fn describe(out: &mut String, policy: &proxy_config::Policy, d: &Decision, auth: &Authority, addrs: &[IpAddr]) {
    let _ = writeln!(out, "target: {auth}");
    match d {
        Decision::Allow { rule, limits } => {
            let _ = writeln!(out, "decision: allow (200 if the upstream accepts)");
            let _ = writeln!(out, "rule: {}", policy.rule_name(*rule));
            let _ = writeln!(
                out,
                "limits: idleTimeout={} maxLifetime={} maxBytesPerSecond={} minBytesPerMinute={} maxTotalBytes={}",
                humantime::format_duration(limits.idle_timeout),
                humantime::format_duration(limits.max_lifetime),
                opt(limits.max_bytes_per_second),
                opt(limits.min_bytes_per_minute),
                opt(limits.max_total_bytes)
            );
        }
        Decision::Deny { rule, reason } => {
            let _ = writeln!(out, "decision: deny (403)");
            if matches!(reason, proxy_config::DenyReason::PrivateAddress { .. }) {
                let _ = writeln!(out, "rule: none (the address is refused by default)");
            } else {
                let _ = writeln!(out, "rule: {}", policy.rule_name(*rule));
            }
            match reason {
                proxy_config::DenyReason::PrivateAddress { range, not_opened_by } => {
                    let rule = not_opened_by.and_then(|i| policy.rules.get(i));
                    let by_cidr = rule
                        .is_some_and(|r| addrs.iter().any(|a| r.cidrs.iter().any(|n| n.contains(&a.to_canonical()))));
                    let hint = opt_in_hint(*range);
                    let _ = match rule {
                        Some(r) if by_cidr => writeln!(
                            out,
                            "reason: private address (rule's CIDR is not an opt-in): the address is {}; rule {} \
                             lists it only in a CIDR that does not open it ({hint})",
                            range.as_str(),
                            r.name
                        ),
                        Some(r) => writeln!(
                            out,
                            "reason: private address ({}): rule {} allows the name, but a name never opens a \
                             refused address; an allow rule must list it in cidrs ({hint})",
                            range.as_str(),
                            r.name
                        ),
                        None => writeln!(
                            out,
                            "reason: private address ({}); to permit it, an allow rule must list it in cidrs ({hint})",
                            range.as_str()
                        ),
                    };
                }
                r => {
                    let _ = writeln!(out, "reason: {}", r.as_str());
                }
            }
        }
    }
}

fn opt_in_hint(range: proxy_config::addr::SpecialRange) -> &'static str {
    use proxy_config::addr::SpecialRange as R;
    match range {
        R::Metadata => "a metadata address opens only to a CIDR that names it exactly, as a /32 or /128",
        R::Loopback | R::Unspecified => {
            "a loopback address opens only to a CIDR that names it exactly, as a /32 or /128"
        }
        R::ClusterNetwork => {
            "the cluster's own networks (policy.clusterNetworks) open only to a CIDR that lies entirely inside one \
             of them, never to one that also holds addresses outside, like 0.0.0.0/0"
        }
        _ => {
            "refused addresses open only to a CIDR that lies entirely inside refused space, such as 10.20.0.0/16, \
             never to one that also holds public addresses, like 0.0.0.0/0"
        }
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "none".to_owned(), |n| n.to_string())
}
