//! Where a rendered rule comes from: the policy it was rendered for ([`PolicyId`]), written into
//! the rule's name by the operator (`namespace/name[/index]` for a TunnelPolicy,
//! `cluster:name[/index]` for a ClusterTunnelPolicy) and read back from rule names by the
//! operator's rollout view and the kubectl plugin. Neither a namespace nor an object name may
//! contain `/` or `:`, so the two forms never collide.

use std::fmt;

/// A policy, namespaced or cluster-wide: one identity for its rules' names, its status and its
/// events.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyId {
    /// A TunnelPolicy.
    Namespaced { namespace: String, name: String },
    /// A ClusterTunnelPolicy.
    Cluster { name: String },
}

const CLUSTER: &str = "cluster:";

impl PolicyId {
    pub fn namespaced(namespace: impl Into<String>, name: impl Into<String>) -> PolicyId {
        PolicyId::Namespaced { namespace: namespace.into(), name: name.into() }
    }

    pub fn cluster(name: impl Into<String>) -> PolicyId {
        PolicyId::Cluster { name: name.into() }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        match self {
            PolicyId::Namespaced { name, .. } | PolicyId::Cluster { name } => name,
        }
    }

    /// The object's namespace (`None` for a ClusterTunnelPolicy).
    pub fn namespace(&self) -> Option<&str> {
        match self {
            PolicyId::Namespaced { namespace, .. } => Some(namespace),
            PolicyId::Cluster { .. } => None,
        }
    }

    /// The name of its rule for destination `index` of `count` (the bare prefix for a policy with
    /// one destination).
    pub fn rule_name(&self, index: usize, count: usize) -> String {
        if count > 1 {
            format!("{self}/{index}")
        } else {
            self.to_string()
        }
    }

    /// The longest of its rules' names, for a policy with `count` destinations.
    pub fn longest_rule_name(&self, count: usize) -> String {
        self.rule_name(count.saturating_sub(1), count)
    }

    /// Whether `rule` is one of its rules.
    pub fn owns_rule(&self, rule: &str) -> bool {
        PolicyId::of_rule(rule).as_ref() == Some(self)
    }

    /// The policy a rendered rule's name comes from (`None`: not a rendered name, e.g. a rule of
    /// the base configuration).
    pub fn of_rule(rule: &str) -> Option<PolicyId> {
        if let Some(rest) = rule.strip_prefix(CLUSTER) {
            let name = rest.split('/').next().filter(|n| !n.is_empty())?;
            return Some(PolicyId::cluster(name));
        }
        let mut parts = rule.split('/');
        let (namespace, name) = (parts.next()?, parts.next()?);
        let index_ok = parts.next().is_none_or(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()));
        (!namespace.is_empty() && !name.is_empty() && parts.next().is_none() && index_ok)
            .then(|| PolicyId::namespaced(namespace, name))
    }
}

impl fmt::Display for PolicyId {
    /// `namespace/name` or `cluster:name`: the prefix of its rules' names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyId::Namespaced { namespace, name } => write!(f, "{namespace}/{name}"),
            PolicyId::Cluster { name } => write!(f, "{CLUSTER}{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PolicyId;

    #[test]
    fn rule_names_carry_their_policy_and_read_back() {
        let tp = PolicyId::namespaced("team-a", "web");
        let ctp = PolicyId::cluster("baseline");
        assert_eq!(tp.rule_name(0, 1), "team-a/web");
        assert_eq!(tp.rule_name(2, 3), "team-a/web/2");
        assert_eq!(ctp.rule_name(1, 2), "cluster:baseline/1");
        for rule in ["team-a/web", "team-a/web/2"] {
            assert_eq!(PolicyId::of_rule(rule), Some(tp.clone()), "{rule}");
            assert!(tp.owns_rule(rule));
        }
        assert_eq!(PolicyId::of_rule("cluster:baseline/1"), Some(ctp.clone()));
        assert!(!tp.owns_rule("team-a/website"), "a longer name is another policy");
        assert!(!ctp.owns_rule("cluster:baseline-2"));
        for not_rendered in ["allow-all", "default", "self", "a/b/c/d", "a/b/x", "/b", "cluster:"] {
            assert_eq!(PolicyId::of_rule(not_rendered), None, "{not_rendered}");
        }
    }
}
