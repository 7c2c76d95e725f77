//! Authorization of one request's target for CONNECT and plain HTTP: the shared decision pipeline
//! ([`proxy_config::decide`]) with names resolved by the proxy, the decision counted, dry-run
//! verdicts reported. Only the addresses returned here may be dialled.

use std::net::IpAddr;

use proxy_config::decide::{Request, Start, Verdict};
use proxy_config::{Authority, TunnelLimits};

use crate::error::TunnelError;
use crate::snapshot::Snapshot;
use crate::state::Inner;

/// A target the policy allows: the exact addresses that may be dialled, the deciding rule's name
/// and the limits of the tunnel or request.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub addrs: Vec<IpAddr>,
    pub rule: String,
    pub limits: TunnelLimits,
    /// The authenticated proxy user the decision was made for.
    pub user: Option<String>,
    /// Whether a policy decision admitted it, so a reload with `reevaluateOnReload` re-decides it
    /// (false for a tunnel listener's configured upstream).
    pub revocable: bool,
    /// How it leaves: directly or through a parent (the deciding rule's route, or the default).
    pub route: proxy_config::Route,
    /// The parent that carries it, once connected through one.
    pub parent: Option<String>,
}

impl Authorized {
    /// The admission of a tunnel listener's connection: its configured upstream at `addrs` (none
    /// for a Unix socket), trusted as configured rather than decided by a rule, so never revoked
    /// by a reload; the relay limits are the configuration's defaults.
    pub fn fixed_upstream(addrs: Vec<IpAddr>, limits: TunnelLimits) -> Authorized {
        Authorized {
            addrs,
            rule: String::new(),
            limits,
            user: None,
            revocable: false,
            route: proxy_config::Route::Direct,
            parent: None,
        }
    }
}

/// Why a request was not authorized, and the deciding rule when a rule decided.
#[derive(Debug)]
pub struct Rejection {
    pub error: TunnelError,
    pub rule: Option<String>,
}

impl From<TunnelError> for Rejection {
    fn from(error: TunnelError) -> Rejection {
        Rejection { error, rule: None }
    }
}

/// Counts a dry-run verdict and, with the access log on, logs it: the rule's name and the verdict
/// only (no client, no target).
fn dry_run_seen(snapshot: &Snapshot, inner: &Inner, v: &proxy_config::DryRunVerdict) {
    inner.metrics.policy_dry_run.with_label_values(&[v.rule(), v.as_str()]).inc();
    inner.control.count_dry_run(v.rule(), matches!(v, proxy_config::DryRunVerdict::WouldDeny(_)));
    if snapshot.config.logging.access_log {
        tracing::info!(target: "tunnelgate::access", rule = v.rule(), verdict = v.as_str(), "dry-run rule");
    }
}

/// Authorizes `auth` for `client` under `snapshot` through the decision pipeline every path and
/// `explain` share, resolving names through the snapshot's cached resolver; counts the decision.
pub async fn authorize(
    snapshot: &Snapshot,
    inner: &Inner,
    client: IpAddr,
    user: Option<String>,
    auth: &Authority,
) -> Result<Authorized, Rejection> {
    let policy = &snapshot.config.policy;
    let m = &inner.metrics;
    let request = Request { client, user: user.as_deref(), target: auth };
    let (judgement, addrs) = match request.start(policy) {
        Start::Decided(j) => (j, Vec::new()),
        Start::Literal(ip) => (request.judge(policy, &[ip], |a, p| inner.is_self(a, p)), vec![ip]),
        Start::Resolve(name) => {
            let addrs = snapshot.resolver.resolve(name, m).await?;
            (request.judge(policy, &addrs, |a, p| inner.is_self(a, p)), addrs)
        }
    };
    if let Some(v) = &judgement.dry_run {
        dry_run_seen(snapshot, inner, v);
    }
    let name = judgement.verdict.rule_name(policy).to_owned();
    match judgement.verdict {
        Verdict::Allow { limits, rule } => {
            m.policy_decisions.with_label_values(&["allow", crate::access::allow_reason(&name), &name]).inc();
            let route = policy.route_of(rule);
            Ok(Authorized { addrs, rule: name, limits, user, revocable: true, route, parent: None })
        }
        Verdict::SelfConnect => {
            m.policy_decisions.with_label_values(&["deny", "self", "self"]).inc();
            Err(Rejection { error: TunnelError::SelfConnect, rule: Some(name) })
        }
        Verdict::Deny { reason, .. } => {
            let error = TunnelError::Denied(reason);
            m.policy_decisions.with_label_values(&["deny", error.decision().1, &name]).inc();
            Err(Rejection { error, rule: Some(name) })
        }
    }
}
