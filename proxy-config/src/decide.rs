//! The decision pipeline for one request's target, the one the proxy enforces and both `explain`
//! commands print: decide what the name alone can (no DNS query for what a name denies) → take the
//! literal address or the resolved ones → decide on every address → refuse the proxy's own
//! endpoints → report what the dry-run rules would have changed.
//!
//! Pure: the caller resolves names (the proxy through its resolver, `explain` from `--resolve`)
//! and says which endpoints are the proxy's own.

use std::net::{IpAddr, SocketAddr};

use crate::addr::is_own_endpoint;
use crate::host::{Authority, Host, HostName};
use crate::policy::{Decision, DenyReason, DryRunVerdict, Policy, PreDecision, TunnelLimits};

/// One request to decide: from `client`, as proxy user `user` (when authenticated), to `target`.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub client: IpAddr,
    pub user: Option<&'a str>,
    pub target: &'a Authority,
}

/// The decision on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow {
        /// The first matching allow rule (`None`: the default allowed).
        rule: Option<usize>,
        limits: TunnelLimits,
    },
    Deny {
        rule: Option<usize>,
        reason: DenyReason,
    },
    /// Allowed by the policy, but the target is the proxy itself (a listener or the admin port).
    SelfConnect,
}

impl From<Decision> for Verdict {
    fn from(d: Decision) -> Verdict {
        match d {
            Decision::Allow { rule, limits } => Verdict::Allow { rule, limits },
            Decision::Deny { rule, reason } => Verdict::Deny { rule, reason },
        }
    }
}

impl Verdict {
    /// The deciding rule's name as logs, metrics and `explain` show it: a rule's name, `default`,
    /// or `self`.
    pub fn rule_name<'p>(&self, policy: &'p Policy) -> &'p str {
        match self {
            Verdict::Allow { rule, .. } | Verdict::Deny { rule, .. } => policy.rule_name(*rule),
            Verdict::SelfConnect => "self",
        }
    }
}

/// A decision and how it was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    /// Decided by the name alone: no address was looked at (and no DNS query needed).
    pub by_name: bool,
    /// What the policy's dry-run rules would have changed, if anything.
    pub dry_run: Option<DryRunVerdict>,
}

/// After the name alone: the request is decided, or its addresses are needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start<'a> {
    Decided(Judgement),
    /// The target is an address: decide on it.
    Literal(IpAddr),
    /// The target is a name the policy could allow: resolve it, then [`Request::judge`].
    Resolve(&'a HostName),
}

/// `explain` was given no addresses for a name that must be resolved to be decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the name must be resolved to decide")]
pub struct NeedsResolution;

impl<'a> Request<'a> {
    /// Decides what the name alone can.
    pub fn start(&self, policy: &Policy) -> Start<'a> {
        let Request { client, user, target } = *self;
        match &target.host {
            Host::Ip(ip) => Start::Literal(*ip),
            Host::Name(name) => match policy.pre_resolve_as(client, user, name, target.port) {
                PreDecision::Resolve => Start::Resolve(name),
                PreDecision::Deny(d) => Judgement {
                    dry_run: policy.dry_run_by_name(client, user, name, target.port, &d),
                    verdict: d.into(),
                    by_name: true,
                }
                .into(),
            },
        }
    }

    /// Decides on every address of the target (fails closed: all must be allowed); `is_own` says
    /// whether an address and port reach the proxy itself.
    pub fn judge(&self, policy: &Policy, addrs: &[IpAddr], is_own: impl Fn(IpAddr, u16) -> bool) -> Judgement {
        let Request { client, user, target } = *self;
        let decision = policy.decide_as(client, user, &target.host, target.port, addrs);
        if matches!(decision, Decision::Allow { .. }) && addrs.iter().any(|a| is_own(*a, target.port)) {
            return Judgement { verdict: Verdict::SelfConnect, by_name: false, dry_run: None };
        }
        Judgement {
            dry_run: policy.dry_run(client, user, &target.host, target.port, addrs, &decision),
            verdict: decision.into(),
            by_name: false,
        }
    }

    /// The whole pipeline with the addresses given rather than resolved, as `explain` runs it:
    /// `resolved` are the addresses of a name (ignored for an address target).
    pub fn judge_given(
        &self,
        policy: &Policy,
        resolved: &[IpAddr],
        is_own: impl Fn(IpAddr, u16) -> bool,
    ) -> Result<Judgement, NeedsResolution> {
        match self.start(policy) {
            Start::Decided(j) => Ok(j),
            Start::Literal(ip) => Ok(self.judge(policy, &[ip], is_own)),
            Start::Resolve(_) if resolved.is_empty() => Err(NeedsResolution),
            Start::Resolve(_) => Ok(self.judge(policy, resolved, is_own)),
        }
    }
}

impl From<Judgement> for Start<'_> {
    fn from(j: Judgement) -> Self {
        Start::Decided(j)
    }
}

/// The proxy's own endpoints, as a running proxy refuses them: its listeners and admin port on
/// any of `hosts` (a listener bound to the unspecified address is reached on every address of its
/// host).
#[derive(Debug, Clone, Default)]
pub struct OwnEndpoints {
    pub endpoints: Vec<SocketAddr>,
    pub hosts: Vec<IpAddr>,
}

impl OwnEndpoints {
    /// The endpoints `config` binds, on `hosts`.
    pub fn of(config: &crate::ProxyConfig, hosts: Vec<IpAddr>) -> OwnEndpoints {
        let mut endpoints: Vec<SocketAddr> = config.listeners.iter().map(|l| l.bind).collect();
        endpoints.push(config.admin.bind);
        OwnEndpoints { endpoints, hosts }
    }

    /// Whether `ip:port` reaches one of them.
    pub fn contains(&self, ip: IpAddr, port: u16) -> bool {
        is_own_endpoint(&self.endpoints, &self.hosts, ip, port)
    }
}

#[cfg(test)]
mod tests;
