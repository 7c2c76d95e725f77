//! Policy evaluation: rules matched against (client, host, port, address), deny over allow,
//! then the default action; refused (private, metadata, ...) addresses stay refused unless a
//! matching allow rule opts in with a CIDR that lies entirely inside refused space.
//!
//! Rules with a `priority` form the platform's tier (the operator renders ClusterTunnelPolicies
//! there): among the tier's rules that match, the lowest priority number decides, a deny winning
//! a tie. A tier deny that a better tier allow outranks does not apply; every other deny does, so
//! a deny without priority still narrows a tier allow, and a tier deny beats any allow without
//! priority.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;

use crate::addr::{self, canonical, classify, SpecialRange};
use crate::host::{Host, HostName, HostPattern};

/// What a rule or the default does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// An inclusive port range; a single port has `start == end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

/// Per-tunnel limits a rule may set; `None` leaves the field to other rules or the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayOverrides {
    pub idle_timeout: Option<Duration>,
    pub max_lifetime: Option<Duration>,
    pub max_bytes_per_second: Option<u64>,
    pub min_bytes_per_minute: Option<u64>,
    pub max_total_bytes: Option<u64>,
}

impl RelayOverrides {
    /// Combines two rules' limits, keeping the stricter value of each field.
    pub fn strictest(self, other: RelayOverrides) -> RelayOverrides {
        fn min<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        fn max<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            }
        }
        RelayOverrides {
            idle_timeout: min(self.idle_timeout, other.idle_timeout),
            max_lifetime: min(self.max_lifetime, other.max_lifetime),
            max_bytes_per_second: min(self.max_bytes_per_second, other.max_bytes_per_second),
            min_bytes_per_minute: max(self.min_bytes_per_minute, other.min_bytes_per_minute),
            max_total_bytes: min(self.max_total_bytes, other.max_total_bytes),
        }
    }
}

/// The limits one tunnel runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelLimits {
    /// Close after this long with no byte in either direction.
    pub idle_timeout: Duration,
    /// Close this long after the tunnel was established, whatever the traffic.
    pub max_lifetime: Duration,
    /// Per-direction rate cap in bytes per second.
    pub max_bytes_per_second: Option<u64>,
    /// Close when fewer bytes than this (both directions together) moved in a minute.
    pub min_bytes_per_minute: Option<u64>,
    /// Close once this many bytes (both directions together) have been relayed.
    pub max_total_bytes: Option<u64>,
}

impl TunnelLimits {
    /// These defaults with the fields that `o` sets replaced.
    pub fn with(self, o: RelayOverrides) -> TunnelLimits {
        TunnelLimits {
            idle_timeout: o.idle_timeout.unwrap_or(self.idle_timeout),
            max_lifetime: o.max_lifetime.unwrap_or(self.max_lifetime),
            max_bytes_per_second: o.max_bytes_per_second.or(self.max_bytes_per_second),
            min_bytes_per_minute: o.min_bytes_per_minute.or(self.min_bytes_per_minute),
            max_total_bytes: o.max_total_bytes.or(self.max_total_bytes),
        }
    }
}

/// One validated policy rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Unique name; used as the `rule` metric label and in logs.
    pub name: String,
    pub action: Action,
    /// Source networks; empty means any client.
    pub clients: Vec<IpNet>,
    /// Authenticated proxy users; empty means any (or no) user.
    pub users: Vec<String>,
    pub hosts: Vec<HostPattern>,
    /// Anchored to the whole name at load time.
    pub host_regex: Option<Regex>,
    /// Target networks, compared with resolved or literal addresses.
    pub cidrs: Vec<IpNet>,
    /// Empty means any port.
    pub ports: Vec<PortRange>,
    pub relay: RelayOverrides,
    /// Set on the platform's tier (lower decides first); `None` for ordinary rules.
    pub priority: Option<u32>,
    /// How the traffic it allows leaves; `None`: the policy's `defaultRoute`.
    pub route: Option<crate::parents::Route>,
}

impl Rule {
    fn matches_client_port(&self, client: IpAddr, user: Option<&str>, port: u16) -> bool {
        let client = canonical(client);
        (self.users.is_empty() || user.is_some_and(|u| self.users.iter().any(|x| x == u)))
            && (self.clients.is_empty() || self.clients.iter().any(|n| n.contains(&client)))
            && (self.ports.is_empty() || self.ports.iter().any(|p| p.contains(port)))
    }

    fn matches_name(&self, name: &HostName) -> bool {
        self.hosts.iter().any(|p| p.matches(name))
            || self.host_regex.as_ref().is_some_and(|r| r.is_match(name.as_str()))
    }

    /// Whether the rule's CIDRs list `addr`. A deny rule also lists every form that embeds an
    /// address it names (NAT64, 6to4, Teredo, compatible): what it refuses stays refused however
    /// the address is written; an allow rule opens only what it names.
    fn lists_address(&self, addr: IpAddr) -> bool {
        match self.action {
            Action::Deny => addr::embedded_forms(addr).any(|a| self.cidrs.iter().any(|n| n.contains(&a))),
            Action::Allow => {
                let addr = canonical(addr);
                self.cidrs.iter().any(|n| n.contains(&addr))
            }
        }
    }

    /// Whether one of the rule's CIDRs opens the refused address `addr` (see [`addr::opens`]).
    fn opens(&self, addr: IpAddr, range: SpecialRange) -> bool {
        let addr = canonical(addr);
        self.cidrs.iter().any(|n| n.contains(&addr) && addr::opens(n, range))
    }

    /// Whether one of the rule's CIDRs opens `addr` inside a cluster network: a CIDR that lies
    /// entirely inside one of `networks` (or inside refused space), the same opt-in as above.
    fn opens_cluster(&self, addr: IpAddr, networks: &[IpNet]) -> bool {
        let addr = canonical(addr);
        self.cidrs
            .iter()
            .any(|n| n.contains(&addr) && (networks.iter().any(|c| c.contains(n)) || addr::entirely_refused(n)))
    }

    /// Whether the rule matches; `addr` is `None` before resolution (CIDRs cannot match yet).
    fn matches(&self, client: IpAddr, user: Option<&str>, host: &Host, port: u16, addr: Option<IpAddr>) -> bool {
        if !self.matches_client_port(client, user, port) {
            return false;
        }
        let by_name = matches!(host, Host::Name(n) if self.matches_name(n));
        by_name || addr.is_some_and(|a| self.lists_address(a))
    }
}

/// Why a request was denied. A closed set: used as a metric label and in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// A deny rule matched.
    Rule,
    /// No allow rule matched and the default action is deny.
    Default,
    /// The target address is refused by default and no matching allow rule opens it.
    PrivateAddress {
        range: SpecialRange,
        /// A matching allow rule that does not open the address (it matches by name, or its CIDR
        /// holds public space too, or is a range where an exact address was needed), for `explain`.
        not_opened_by: Option<usize>,
    },
}

impl DenyReason {
    /// A short stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Rule => "rule",
            DenyReason::Default => "default",
            DenyReason::PrivateAddress { range: SpecialRange::ClusterNetwork, .. } => "cluster_network",
            DenyReason::PrivateAddress { .. } => "private_address",
        }
    }
}

/// The outcome of evaluating a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// Index of the first matching allow rule (config order); `None` when the default allowed.
        rule: Option<usize>,
        limits: TunnelLimits,
    },
    Deny {
        /// Index of the deciding rule, if a rule decided.
        rule: Option<usize>,
        reason: DenyReason,
    },
}

/// Before DNS: either the request is already denied, or the name must be resolved to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreDecision {
    Deny(Decision),
    Resolve,
}

/// A compiled policy: rules plus defaults.
#[derive(Debug, Clone)]
pub struct Policy {
    pub default_action: Action,
    pub deny_private_addresses: bool,
    pub reevaluate_on_reload: bool,
    /// The cluster's own networks (nodes, pods, Services, API server): refused like private
    /// space, whatever `deny_private_addresses` says, unless an allow rule opens them.
    pub cluster_networks: Vec<IpNet>,
    pub rules: Vec<Rule>,
    /// Limits for tunnels whose rules leave a field unset.
    pub defaults: TunnelLimits,
    /// When some rules are dry-run: the policy that also enforces them (see [`Policy::dry_run`]).
    pub shadow: Option<Shadow>,
    /// `rules` by client address; built from `rules` by [`ClientIndex::new`].
    pub by_client: ClientIndex,
    /// How allowed traffic leaves when its rule names no route (and when the default allowed it).
    pub default_route: crate::parents::Route,
}

/// Rule indices by client address, so a request looks only at the rules that can match its
/// client: the operator renders one rule per policy destination listing the exact addresses of
/// the selected pods, so at 10,000 pods and 1,000 policies a scan of every rule per request would
/// cost far more than the few rules of the client's own policies.
#[derive(Debug, Clone, Default)]
pub struct ClientIndex {
    /// Rules listing the (canonical) address exactly, as `/32` or `/128`, ascending per address.
    exact: HashMap<IpAddr, Vec<usize>>,
    /// Rules for any client, or listing a wider network: looked at for every client.
    wide: Vec<usize>,
}

impl ClientIndex {
    /// Indexes `rules` (indices into that slice).
    pub fn new(rules: &[Rule]) -> ClientIndex {
        let mut index = ClientIndex::default();
        for (i, r) in rules.iter().enumerate() {
            let exact_only = !r.clients.is_empty() && r.clients.iter().all(|n| n.prefix_len() == n.max_prefix_len());
            if !exact_only {
                index.wide.push(i);
                continue;
            }
            for n in &r.clients {
                let list = index.exact.entry(canonical(n.addr())).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        index
    }

    /// The indices of every rule that may match `client`, ascending (config order).
    fn candidates(&self, client: IpAddr) -> Merge<'_> {
        let exact = self.exact.get(&canonical(client)).map_or(&[][..], Vec::as_slice);
        Merge { a: exact, b: &self.wide }
    }
}

/// Two ascending index lists as one ascending sequence.
struct Merge<'a> {
    a: &'a [usize],
    b: &'a [usize],
}

impl Iterator for Merge<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let take_a = match (self.a.first(), self.b.first()) {
            (Some(x), Some(y)) => x < y,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let list = if take_a { &mut self.a } else { &mut self.b };
        let (&first, rest) = list.split_first()?;
        *list = rest;
        Some(first)
    }
}

/// The policy with the dry-run rules enforced too; its rules from `first_dry_run` on are the
/// dry-run ones.
#[derive(Debug, Clone)]
pub struct Shadow {
    pub policy: Box<Policy>,
    pub first_dry_run: usize,
}

/// What a dry-run rule would have changed about a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DryRunVerdict {
    /// The request was allowed; this dry-run rule would have refused it.
    WouldDeny(String),
    /// The request was refused; this dry-run rule would have allowed it.
    WouldAllow(String),
}

impl DryRunVerdict {
    /// `would_deny` or `would_allow` (a metric label).
    pub fn as_str(&self) -> &'static str {
        match self {
            DryRunVerdict::WouldDeny(_) => "would_deny",
            DryRunVerdict::WouldAllow(_) => "would_allow",
        }
    }

    /// The dry-run rule's name.
    pub fn rule(&self) -> &str {
        match self {
            DryRunVerdict::WouldDeny(r) | DryRunVerdict::WouldAllow(r) => r,
        }
    }
}

impl Policy {
    /// How traffic allowed by rule `rule` (`None`: the default action) leaves.
    pub fn route_of(&self, rule: Option<usize>) -> crate::parents::Route {
        rule.and_then(|i| self.rules.get(i)).and_then(|r| r.route).unwrap_or(self.default_route)
    }

    /// The rules that may match `client` (the others list other clients), with their indices.
    fn rules_for(&self, client: IpAddr) -> impl Iterator<Item = (usize, &Rule)> + '_ {
        self.by_client.candidates(client).filter_map(|i| self.rules.get(i).map(|r| (i, r)))
    }

    /// The name of rule `index`, or `"default"`.
    pub fn rule_name(&self, index: Option<usize>) -> &str {
        index.and_then(|i| self.rules.get(i)).map_or("default", |r| r.name.as_str())
    }

    /// Decides what can be decided from the name alone, so a denied name never causes a DNS query.
    pub fn pre_resolve(&self, client: IpAddr, name: &HostName, port: u16) -> PreDecision {
        self.pre_resolve_as(client, None, name, port)
    }

    /// [`Policy::pre_resolve`] for a request made as proxy user `user`.
    pub fn pre_resolve_as(&self, client: IpAddr, user: Option<&str>, name: &HostName, port: u16) -> PreDecision {
        let host = Host::Name(name.clone());
        // A tier allow that could still match once the name is resolved (by name now, or by a
        // CIDR later) may outrank a tier deny: that deny must wait for the addresses.
        let best_possible_allow = || {
            self.rules_for(client)
                .map(|(_, r)| r)
                .filter(|r| {
                    r.action == Action::Allow
                        && r.matches_client_port(client, user, port)
                        && (!r.cidrs.is_empty() || r.matches_name(name))
                })
                .filter_map(|r| r.priority)
                .min()
        };
        if let Some(i) = self.first(client, Action::Deny, |r| {
            r.matches(client, user, &host, port, None) && applies(r.priority, best_possible_allow)
        }) {
            return PreDecision::Deny(Decision::Deny { rule: Some(i), reason: DenyReason::Rule });
        }
        let could_allow = self.default_action == Action::Allow
            || self.rules_for(client).any(|(_, r)| {
                r.action == Action::Allow
                    && r.matches_client_port(client, user, port)
                    && (!r.cidrs.is_empty() || r.matches_name(name))
            });
        if could_allow {
            PreDecision::Resolve
        } else {
            PreDecision::Deny(Decision::Deny { rule: None, reason: DenyReason::Default })
        }
    }

    /// Decides a request given every address the target resolved to (or its literal address).
    /// Fails closed: the request is allowed only if every address is allowed.
    pub fn decide(&self, client: IpAddr, host: &Host, port: u16, addrs: &[IpAddr]) -> Decision {
        self.decide_as(client, None, host, port, addrs)
    }

    /// [`Policy::decide`] for a request made as proxy user `user` (rules with `users` match only
    /// those users).
    pub fn decide_as(&self, client: IpAddr, user: Option<&str>, host: &Host, port: u16, addrs: &[IpAddr]) -> Decision {
        let deny_default = Decision::Deny { rule: None, reason: DenyReason::Default };
        if addrs.is_empty() {
            return deny_default;
        }
        for &addr in addrs {
            let best_allow = || {
                self.rules_for(client)
                    .map(|(_, r)| r)
                    .filter(|r| r.action == Action::Allow && r.matches(client, user, host, port, Some(addr)))
                    .filter_map(|r| r.priority)
                    .min()
            };
            if let Some(i) = self.first(client, Action::Deny, |r| {
                r.matches(client, user, host, port, Some(addr)) && applies(r.priority, best_allow)
            }) {
                return Decision::Deny { rule: Some(i), reason: DenyReason::Rule };
            }
        }
        let mut first_allow: Option<usize> = None;
        let mut overrides: Option<RelayOverrides> = None;
        for &addr in addrs {
            let refused = self.refused(addr);
            let mut matched = false;
            let mut opened = refused.is_none();
            for (i, r) in self.rules_for(client) {
                if r.action != Action::Allow || !r.matches(client, user, host, port, Some(addr)) {
                    continue;
                }
                matched = true;
                // For a refused address only the rules that open it allow it (and set its limits).
                if refused.is_some_and(|range| !self.rule_opens(r, addr, range)) {
                    continue;
                }
                opened = true;
                first_allow = Some(first_allow.map_or(i, |f| f.min(i)));
                overrides = Some(overrides.map_or(r.relay, |o| o.strictest(r.relay)));
            }
            if !matched && self.default_action == Action::Deny {
                return deny_default;
            }
            if let (Some(range), false) = (refused, opened) {
                let not_opened_by = self
                    .rules_for(client)
                    .find(|(_, r)| r.action == Action::Allow && r.matches(client, user, host, port, Some(addr)))
                    .map(|(i, _)| i);
                return Decision::Deny { rule: None, reason: DenyReason::PrivateAddress { range, not_opened_by } };
            }
        }
        Decision::Allow { rule: first_allow, limits: self.defaults.with(overrides.unwrap_or_default()) }
    }

    /// What the dry-run rules would have changed about `enforced`, the decision this policy made
    /// for the same request: decided again with them enforced (one evaluation, the same code), and
    /// reported when the outcome flips because of a dry-run rule.
    pub fn dry_run(
        &self,
        client: IpAddr,
        user: Option<&str>,
        host: &Host,
        port: u16,
        addrs: &[IpAddr],
        enforced: &Decision,
    ) -> Option<DryRunVerdict> {
        let shadow = self.shadow.as_ref()?;
        let is_dry = |rule: Option<usize>| rule.filter(|i| *i >= shadow.first_dry_run);
        let name = |i: usize| shadow.policy.rules[i].name.clone();
        match (enforced, shadow.policy.decide_as(client, user, host, port, addrs)) {
            (Decision::Allow { .. }, Decision::Deny { rule, .. }) => {
                is_dry(rule).map(|i| DryRunVerdict::WouldDeny(name(i)))
            }
            (Decision::Deny { .. }, Decision::Allow { rule, .. }) => {
                is_dry(rule).map(|i| DryRunVerdict::WouldAllow(name(i)))
            }
            _ => None,
        }
    }

    /// [`Policy::dry_run`] for a request the name alone denied (no DNS query was made): only a
    /// dry-run allow that names the host can be judged, and only against the default deny.
    pub fn dry_run_by_name(
        &self,
        client: IpAddr,
        user: Option<&str>,
        name: &HostName,
        port: u16,
        enforced: &Decision,
    ) -> Option<DryRunVerdict> {
        let shadow = self.shadow.as_ref()?;
        if !matches!(enforced, Decision::Deny { reason: DenyReason::Default, .. }) {
            return None;
        }
        let host = Host::Name(name.clone());
        shadow.policy.rules[shadow.first_dry_run..]
            .iter()
            .find(|r| r.action == Action::Allow && r.matches(client, user, &host, port, None))
            .map(|r| DryRunVerdict::WouldAllow(r.name.clone()))
    }

    /// Why `addr` is refused unless an allow rule opens it, if it is.
    pub fn refused(&self, addr: IpAddr) -> Option<SpecialRange> {
        let special = if self.deny_private_addresses { classify(addr) } else { None };
        // Metadata, loopback and unspecified keep their stricter opt-in; otherwise the cluster's
        // own networks name the reason (and open to a CIDR inside them).
        if matches!(special, Some(SpecialRange::Metadata | SpecialRange::Loopback | SpecialRange::Unspecified)) {
            return special;
        }
        // Every form that embeds a cluster address is the cluster's too.
        if addr::embedded_forms(addr).any(|a| self.cluster_networks.iter().any(|n| n.contains(&a))) {
            return Some(SpecialRange::ClusterNetwork);
        }
        special
    }

    fn rule_opens(&self, r: &Rule, addr: IpAddr, range: SpecialRange) -> bool {
        match range {
            SpecialRange::ClusterNetwork => r.opens_cluster(addr, &self.cluster_networks),
            _ => r.opens(addr, range),
        }
    }

    fn first(&self, client: IpAddr, action: Action, f: impl Fn(&Rule) -> bool) -> Option<usize> {
        self.rules_for(client).find(|(_, r)| r.action == action && f(r)).map(|(i, _)| i)
    }
}

/// Whether a matching deny of `priority` applies when the best matching tier allow has the
/// priority `best_allow` returns: a deny without priority always does (and the allows are then
/// not looked at, so policies without a tier pay nothing); a tier deny unless a tier allow with a
/// strictly lower number matches.
fn applies(priority: Option<u32>, best_allow: impl Fn() -> Option<u32>) -> bool {
    match priority {
        None => true,
        Some(d) => best_allow().is_none_or(|a| d <= a),
    }
}

#[cfg(test)]
mod tests;
