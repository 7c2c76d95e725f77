//! Authorization of one request's target, the same for CONNECT, plain HTTP and `explain`: decide
//! what the name alone can (no DNS query for what a name denies) → resolve → decide on every
//! address → refuse the proxy's own endpoints. Only the addresses returned here may be dialled.

use std::net::IpAddr;

use proxy_config::{Authority, Decision, DenyReason, Host, Policy, PreDecision, TunnelLimits};

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
}

impl Authorized {
    /// The admission of a tunnel listener's connection: its configured upstream at `addrs` (none
    /// for a Unix socket), trusted as configured rather than decided by a rule, so never revoked
    /// by a reload; the relay limits are the configuration's defaults.
    pub fn fixed_upstream(addrs: Vec<IpAddr>, limits: TunnelLimits) -> Authorized {
        Authorized { addrs, rule: String::new(), limits, user: None, revocable: false }
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

/// The decision on a target once its addresses are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow {
        rule: Option<usize>,
        limits: TunnelLimits,
    },
    Deny(Decision),
    /// Allowed by the policy, but the target is this proxy.
    SelfConnect,
}

/// Decides `auth` from `client` on `addrs`; `is_self` says whether an address and port reach the
/// proxy itself.
pub fn decide(
    policy: &Policy,
    client: IpAddr,
    user: Option<&str>,
    auth: &Authority,
    addrs: &[IpAddr],
    is_self: impl Fn(IpAddr, u16) -> bool,
) -> Verdict {
    match policy.decide_as(client, user, &auth.host, auth.port, addrs) {
        Decision::Allow { .. } if addrs.iter().any(|a| is_self(*a, auth.port)) => Verdict::SelfConnect,
        Decision::Allow { rule, limits } => Verdict::Allow { rule, limits },
        d => Verdict::Deny(d),
    }
}

/// Counts a dry-run verdict and, with the access log on, logs it: the rule's name and the verdict
/// only (no client, no target).
fn dry_run_seen(snapshot: &Snapshot, inner: &Inner, v: &proxy_config::DryRunVerdict) {
    inner.metrics.policy_dry_run.with_label_values(&[v.rule(), v.as_str()]).inc();
    inner.count_dry_run(v.rule(), matches!(v, proxy_config::DryRunVerdict::WouldDeny(_)));
    if snapshot.config.logging.access_log {
        tracing::info!(target: "tunnelgate::access", rule = v.rule(), verdict = v.as_str(), "dry-run rule");
    }
}

/// Authorizes `auth` for `client` under `snapshot`, resolving names through its cached resolver;
/// counts the decision.
pub async fn authorize(
    snapshot: &Snapshot,
    inner: &Inner,
    client: IpAddr,
    user: Option<String>,
    auth: &Authority,
) -> Result<Authorized, Rejection> {
    let policy = &snapshot.config.policy;
    let m = &inner.metrics;
    let deny = |d: &Decision| -> Rejection {
        let (rule, reason) = match d {
            Decision::Deny { rule, reason } => (*rule, *reason),
            Decision::Allow { .. } => (None, DenyReason::Default),
        };
        let name = policy.rule_name(rule).to_owned();
        let error = TunnelError::Denied(reason);
        m.policy_decisions.with_label_values(&["deny", error.decision().1, &name]).inc();
        Rejection { error, rule: Some(name) }
    };
    let addrs = match &auth.host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => {
            if let PreDecision::Deny(d) = policy.pre_resolve_as(client, user.as_deref(), name, auth.port) {
                if let Some(v) = policy.dry_run_by_name(client, user.as_deref(), name, auth.port, &d) {
                    dry_run_seen(snapshot, inner, &v);
                }
                return Err(deny(&d));
            }
            snapshot.resolver.resolve(name, m).await?
        }
    };
    let verdict = decide(policy, client, user.as_deref(), auth, &addrs, |ip, port| inner.is_self(ip, port));
    // Only a policy with dry-run rules has anything to report: no work on the common path.
    if policy.shadow.is_some() {
        let decision = match &verdict {
            Verdict::Allow { rule, limits } => Some(Decision::Allow { rule: *rule, limits: *limits }),
            Verdict::Deny(d) => Some(d.clone()),
            Verdict::SelfConnect => None,
        };
        if let Some(v) =
            decision.and_then(|d| policy.dry_run(client, user.as_deref(), &auth.host, auth.port, &addrs, &d))
        {
            dry_run_seen(snapshot, inner, &v);
        }
    }
    match verdict {
        Verdict::Allow { rule, limits } => {
            let name = policy.rule_name(rule).to_owned();
            m.policy_decisions.with_label_values(&["allow", crate::access::allow_reason(&name), &name]).inc();
            Ok(Authorized { addrs, rule: name, limits, user, revocable: true })
        }
        Verdict::SelfConnect => {
            m.policy_decisions.with_label_values(&["deny", "self", "self"]).inc();
            Err(Rejection { error: TunnelError::SelfConnect, rule: Some("self".to_owned()) })
        }
        Verdict::Deny(d) => Err(deny(&d)),
    }
}
