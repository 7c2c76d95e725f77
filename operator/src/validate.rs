//! Pure validation of a TunnelPolicy spec with the proxy's own grammar (`proxy-config`): what
//! admission could not catch is reported here with the path of the bad field.

use std::fmt;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::Selector;
use proxy_config::raw::{RawPort, RawRule, RawRuleRelay};
use proxy_config::HostPattern;

use crate::crd::{
    ClusterTunnelPolicySpec, Enforcement, PolicyAction, TunnelPolicySpec, DEFAULT_PRIORITY, MAX_CIDRS,
    MAX_DESTINATIONS, MAX_HOSTS, MAX_PORTS,
};

/// One problem in a spec, located by its field path (`spec.destinations[0].hosts[1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A policy reduced to what the proxy needs: per destination, the rule body without `name`
/// and `clients` (those depend on the object's identity and on pods).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidPolicy {
    pub selector: Selector,
    pub action: &'static str,
    /// The destinations, normalized, in the proxy's wire types.
    pub destinations: Vec<ValidDestination>,
    /// For `kubectl get`: `api.github.com:443, 203.0.113.0/24:5432`.
    pub summary: String,
    /// `enforcement: DryRun`: the rules are rendered with `dryRun: true`.
    pub dry_run: bool,
    /// A cluster policy's route for the traffic it allows (`None`: the base's default).
    pub route: Option<String>,
}

/// One destination as the proxy's rules carry it (host patterns and CIDRs in canonical text).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ValidDestination {
    pub hosts: Option<Vec<String>>,
    pub cidrs: Option<Vec<String>>,
    pub ports: Option<Vec<RawPort>>,
    pub relay: Option<RawRuleRelay>,
}

impl ValidDestination {
    /// The rule the proxies read for this destination, named `name` (its clients are set per
    /// document).
    pub fn rule(&self, name: String, action: &str, priority: Option<u32>, dry_run: bool) -> RawRule {
        RawRule {
            name,
            action: action.into(),
            clients: None,
            users: None,
            hosts: self.hosts.clone(),
            host_regex: None,
            cidrs: self.cidrs.clone(),
            ports: self.ports.clone(),
            relay: self.relay.clone(),
            priority,
            dry_run: dry_run.then_some(true),
            route: None,
        }
    }
}

/// Validates `spec`; every problem found is returned, not just the first.
pub fn validate(spec: &TunnelPolicySpec) -> Result<ValidPolicy, Vec<FieldError>> {
    let mut errs = Vec::new();
    let mut err = |path: String, message: String| errs.push(FieldError { path, message });
    let selector = match Selector::try_from(spec.pod_selector.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            err("spec.podSelector".into(), e.to_string());
            None
        }
    };
    if spec.destinations.is_empty() {
        err("spec.destinations".into(), "at least one destination is required".into());
    }
    // The CRD's bounds, checked again: admission is not always there (an API server without the
    // CRD's schema, an object stored before a bound was added).
    let mut too_many = |path: String, len: usize, max: u32| {
        if len > max as usize {
            err(path, format!("{len} entries; at most {max}"));
        }
    };
    too_many("spec.destinations".into(), spec.destinations.len(), MAX_DESTINATIONS);
    for (i, d) in spec.destinations.iter().enumerate() {
        let p = format!("spec.destinations[{i}]");
        too_many(format!("{p}.hosts"), d.hosts.as_ref().map_or(0, Vec::len), MAX_HOSTS);
        too_many(format!("{p}.cidrs"), d.cidrs.as_ref().map_or(0, Vec::len), MAX_CIDRS);
        too_many(format!("{p}.ports"), d.ports.as_ref().map_or(0, Vec::len), MAX_PORTS);
    }
    let relay = relay_of(spec);
    let mut destinations = Vec::new();
    let mut summary = Vec::new();
    for (i, d) in spec.destinations.iter().enumerate() {
        let (rule, names) = destination(&format!("spec.destinations[{i}]"), d, relay.as_ref(), &mut err);
        summary.extend(names);
        destinations.push(rule);
    }
    let action = match spec.action {
        PolicyAction::Allow => "allow",
        PolicyAction::Deny => "deny",
    };
    proxy_check(action, &destinations, &mut errs);
    match (errs.is_empty(), selector) {
        (true, Some(selector)) => Ok(ValidPolicy {
            selector,
            action,
            destinations,
            summary: summarize(&summary),
            dry_run: spec.enforcement == Some(crate::crd::Enforcement::DryRun),
            route: None,
        }),
        _ => Err(errs),
    }
}

/// One destination at `p` in the proxy's wire form (hosts and CIDRs canonical), with its summary
/// entries (`name:ports`); problems go to `err`.
fn destination(
    p: &str,
    d: &crate::crd::Destination,
    relay: Option<&RawRuleRelay>,
    err: &mut impl FnMut(String, String),
) -> (ValidDestination, Vec<String>) {
    let mut rule = ValidDestination::default();
    let mut names = Vec::new();
    if d.hosts.is_none() && d.cidrs.is_none() {
        err(p.to_owned(), "a destination needs hosts or cidrs".into());
    }
    if let Some(hosts) = &d.hosts {
        if hosts.is_empty() {
            err(format!("{p}.hosts"), "must not be empty".into());
        }
        let mut out = Vec::new();
        for (j, h) in hosts.iter().enumerate() {
            match h.parse::<HostPattern>() {
                Ok(pat) => out.push(pat.to_string()),
                Err(e) => err(format!("{p}.hosts[{j}]"), format!("{h:?}: {e}")),
            }
        }
        names.extend(out.iter().cloned());
        rule.hosts = Some(out);
    }
    if let Some(cidrs) = &d.cidrs {
        if cidrs.is_empty() {
            err(format!("{p}.cidrs"), "must not be empty".into());
        }
        let mut out = Vec::new();
        for (j, c) in cidrs.iter().enumerate() {
            match parse_cidr(c) {
                Ok(n) => out.push(n),
                Err(e) => err(format!("{p}.cidrs[{j}]"), e),
            }
        }
        names.extend(out.iter().cloned());
        rule.cidrs = Some(out);
    }
    let mut port_text = String::new();
    if let Some(ports) = &d.ports {
        if ports.is_empty() {
            err(format!("{p}.ports"), "must not be empty (omit it for any port)".into());
        }
        // Checked below with the proxy's own rule check, like the relay limits.
        let out: Vec<RawPort> = ports.iter().map(raw_port).collect();
        port_text = out
            .iter()
            .map(|v| match v {
                RawPort::Number(n) => n.to_string(),
                RawPort::Text(t) => t.clone(),
            })
            .collect::<Vec<_>>()
            .join(",");
        rule.ports = Some(out);
    }
    rule.relay = relay.cloned();
    let mut summary = Vec::new();
    for n in names {
        summary.push(if port_text.is_empty() { n } else { format!("{n}:{port_text}") });
    }
    (rule, summary)
}

/// Validates a ClusterTunnelPolicy: the parts it shares with a TunnelPolicy, then its namespace
/// selector, priority and delegation. Returns the shared result and the namespace selector.
pub fn validate_cluster(spec: &ClusterTunnelPolicySpec) -> Result<(ValidPolicy, Selector), Vec<FieldError>> {
    let shared = validate(&spec.as_namespaced());
    let mut errs = shared.as_ref().err().cloned().unwrap_or_default();
    let namespaces = Selector::try_from(spec.namespace_selector.clone())
        .map_err(|e| errs.push(FieldError { path: "spec.namespaceSelector".into(), message: e.to_string() }))
        .ok();
    if spec.route.is_some() && (spec.action != PolicyAction::Allow || spec.delegate == Some(true)) {
        errs.push(FieldError {
            path: "spec.route".into(),
            message: "only an Allow that enforces itself routes traffic (a Deny or a delegation sends nothing)".into(),
        });
    }
    if spec.priority.is_some_and(|p| p > DEFAULT_PRIORITY) {
        errs.push(FieldError {
            path: "spec.priority".into(),
            message: format!("must be between 0 and {DEFAULT_PRIORITY}"),
        });
    }
    if spec.delegate == Some(true) {
        if spec.action != PolicyAction::Allow {
            errs.push(FieldError { path: "spec.delegate".into(), message: "only an Allow can delegate".into() });
        }
        if spec.destinations.iter().all(|d| d.cidrs.is_none()) {
            errs.push(FieldError {
                path: "spec.destinations".into(),
                message: "a delegating policy grants CIDRs: at least one destination needs cidrs".into(),
            });
        }
        // A delegation grants address space to whole namespaces, nothing narrower: what it would
        // silently not honour is refused instead.
        let selects = |s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector| {
            s.match_labels.as_ref().is_some_and(|m| !m.is_empty())
                || s.match_expressions.as_ref().is_some_and(|m| !m.is_empty())
        };
        if selects(&spec.pod_selector) {
            errs.push(FieldError {
                path: "spec.podSelector".into(),
                message: "a delegation grants to whole namespaces: it cannot be limited to some pods (write a TunnelPolicy in the namespace for that)".into(),
            });
        }
        for (i, d) in spec.destinations.iter().enumerate() {
            if d.ports.is_some() {
                errs.push(FieldError {
                    path: format!("spec.destinations[{i}].ports"),
                    message:
                        "a delegation grants address space, not ports: the namespace's TunnelPolicies name the ports"
                            .into(),
                });
            }
            if d.hosts.is_some() {
                errs.push(FieldError {
                    path: format!("spec.destinations[{i}].hosts"),
                    message: "a delegation grants CIDRs only".into(),
                });
            }
        }
        if spec.enforcement == Some(Enforcement::DryRun) {
            errs.push(FieldError {
                path: "spec.enforcement".into(),
                message: "a delegation cannot be a dry run: it enforces nothing itself, and what it grants is enforced"
                    .into(),
            });
        }
    }
    match (shared, namespaces) {
        (Ok(v), Some(ns)) if errs.is_empty() => Ok((ValidPolicy { route: spec.route.clone(), ..v }, ns)),
        _ => Err(errs),
    }
}

fn summarize(items: &[String]) -> String {
    const MAX: usize = 80;
    let mut s = String::new();
    for (i, it) in items.iter().enumerate() {
        let next = if s.is_empty() { it.clone() } else { format!("{s}, {it}") };
        if next.len() > MAX {
            return format!("{s} (+{} more)", items.len() - i);
        }
        s = next;
    }
    s
}

/// The policy's relay limits in the proxy's wire form, as written (the proxy's rule check
/// validates them).
fn relay_of(spec: &TunnelPolicySpec) -> Option<RawRuleRelay> {
    let r = spec.relay.as_ref()?;
    Some(RawRuleRelay {
        idle_timeout: r.idle_timeout.clone(),
        max_lifetime: r.max_lifetime.clone(),
        max_bytes_per_second: r.max_bytes_per_second,
        min_bytes_per_minute: r.min_bytes_per_minute,
        max_total_bytes: r.max_total_bytes,
    })
}

/// Each destination's rule as the proxy will read it, checked by the proxy's own rule check: a
/// value the proxy refuses is this policy's error (at its field in the spec), never the whole
/// document's.
fn proxy_check(action: &str, destinations: &[ValidDestination], errs: &mut Vec<FieldError>) {
    for (i, d) in destinations.iter().enumerate() {
        let probe = d.rule("policy".into(), action, None, false);
        let Err(refused) = proxy_config::config::check_rule(&probe, false) else { continue };
        for e in refused.errors() {
            // The relay limits are the policy's (one `spec.relay` for every destination).
            let path = match e.path.strip_prefix("relay") {
                Some(rest) => format!("spec.relay{rest}"),
                None if e.path.is_empty() => format!("spec.destinations[{i}]"),
                None => format!("spec.destinations[{i}].{}", e.path),
            };
            // What the spec's own checks already named is not repeated.
            if !errs.iter().any(|x| x.path == path) {
                errs.push(FieldError { path, message: e.message.clone() });
            }
        }
    }
}

/// A CIDR with host bits clear (the proxy's own check), or a single address kept as written
/// without a prefix; returned in canonical text.
fn parse_cidr(s: &str) -> Result<String, String> {
    match s.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(ip.to_string()),
        Err(_) => proxy_config::config::parse_net(s).map(|n| n.to_string()),
    }
}

/// A port or range in the proxy's wire form, as written (the proxy's rule check validates it).
fn raw_port(p: &IntOrString) -> RawPort {
    match p {
        IntOrString::Int(n) => RawPort::Number(i64::from(*n)),
        IntOrString::String(s) => RawPort::Text(s.clone()),
    }
}

#[cfg(test)]
mod tests;
