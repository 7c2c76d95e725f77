//! The policies of one render, worked out in order ([`Pass`]): ClusterTunnelPolicies first (their
//! delegations are grants for the namespaced ones), then TunnelPolicies with their budgets; each
//! reuses what the memo holds when neither it nor the pods it selects changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kube::core::SelectorExt;
use proxy_config::origin::PolicyId;

use super::base::{cluster_networks, parse_net, restricted_cidrs, Grant, GrantScope};
use super::rules::{clients_of, push_rules, rule_names_fit, text_len, Optional, Rule};
use super::{
    Accepted, Cluster, Input, Memo, PodChanges, PodIn, PolicyOutcome, RenderError, Worked, NAMESPACE_BUDGET_BYTES,
    POLICY_BUDGET_BYTES,
};
use crate::crd::{ClusterTunnelPolicySpec, TunnelPolicySpec, DEFAULT_PRIORITY};
use crate::validate::{validate, validate_cluster, ValidPolicy};

/// What one render works out, phase by phase.
pub(super) struct Pass<'r, 'i> {
    input: &'r Input<'i>,
    /// Changed pods' labels by namespace (`None`: every policy is worked out again).
    changed: Option<HashMap<&'r str, Vec<&'r BTreeMap<String, String>>>>,
    /// The namespaces whose labels changed since the memo's cluster policies were worked out, with
    /// their labels before and after (`kubernetes.io/metadata.name` included): a cluster policy is
    /// worked out again only when its namespace selector's answer for one of them changed.
    relabelled: Vec<(BTreeMap<String, String>, BTreeMap<String, String>)>,
    prior_cluster: HashMap<String, Worked<ClusterTunnelPolicySpec, (ValidPolicy, kube::core::Selector)>>,
    prior_namespaced: HashMap<(String, String), Worked<TunnelPolicySpec, ValidPolicy>>,
    /// Pods by namespace: a namespaced policy looks at its own namespace's pods only (at 10,000
    /// pods and 1,000 policies a scan of every pod per policy was most of a reconcile).
    by_namespace: HashMap<&'i str, Vec<&'i PodIn>>,
    /// The base's grants, and the delegations of cluster policies as they are worked out.
    grants: Vec<Grant>,
    cluster_networks: Vec<ipnet::IpNet>,
    /// The routes the base defines: `direct`, its parents and groups.
    routes: Vec<String>,
    pub(super) outcomes: Vec<PolicyOutcome>,
    pub(super) rules: Vec<Rule>,
    /// What each namespace's policies add to the documents.
    pub(super) namespace_bytes: HashMap<&'i str, usize>,
    /// The policies that may be left out should the documents still not fit.
    pub(super) optional: Vec<Optional>,
}

impl<'r, 'i> Pass<'r, 'i> {
    /// A pass over `input`, taking the memo's work (it is given back policy by policy).
    pub(super) fn new(
        input: &'r Input<'i>,
        changes: &'r PodChanges<'_>,
        memo: &mut Memo,
        base: &Result<(proxy_config::raw::RawConfig, Vec<Grant>), RenderError>,
    ) -> Pass<'r, 'i> {
        // Cluster policies look at namespaces' labels: only the namespaces whose labels changed.
        let relabelled = if memo.namespaces == input.cluster.namespaces {
            Vec::new()
        } else {
            let old = Cluster { namespaces: std::mem::take(&mut memo.namespaces), ..Cluster::default() };
            let names: BTreeSet<&String> = old.namespaces.keys().chain(input.cluster.namespaces.keys()).collect();
            let out = names
                .into_iter()
                .filter(|n| old.namespaces.get(*n) != input.cluster.namespaces.get(*n))
                .map(|n| (old.labels_of(n), input.cluster.labels_of(n)))
                .collect();
            memo.namespaces = input.cluster.namespaces.clone();
            out
        };
        memo.evaluated = 0;
        let mut by_namespace: HashMap<&'i str, Vec<&'i PodIn>> = HashMap::new();
        for pod in input.pods {
            by_namespace.entry(pod.namespace.as_str()).or_default().push(pod);
        }
        Pass {
            input,
            changed: changes.by_namespace(),
            relabelled,
            prior_cluster: std::mem::take(&mut memo.cluster),
            prior_namespaced: std::mem::take(&mut memo.namespaced),
            by_namespace,
            grants: base.as_ref().map(|(_, g)| g.clone()).unwrap_or_default(),
            cluster_networks: base.as_ref().map(|(doc, _)| cluster_networks(input, doc).0).unwrap_or_default(),
            routes: base
                .as_ref()
                .map(|(doc, _)| {
                    let parents = doc.parents.iter().map(|p| p.name.clone());
                    let groups = doc.parent_groups.iter().map(|g| g.name.clone());
                    std::iter::once(proxy_config::parents::DIRECT.to_owned()).chain(parents).chain(groups).collect()
                })
                .unwrap_or_default(),
            outcomes: Vec::new(),
            rules: Vec::new(),
            namespace_bytes: HashMap::new(),
            optional: Vec::new(),
        }
    }

    /// The ClusterTunnelPolicies, by name: rules with their priority, or grants when they delegate.
    pub(super) fn cluster_policies(&mut self, memo: &mut Memo) {
        let input = self.input;
        let mut cluster = input.cluster.policies.clone();
        cluster.sort_by(|a, b| a.name.cmp(b.name));
        for cp in &cluster {
            let reusable = |w: &Worked<ClusterTunnelPolicySpec, (ValidPolicy, kube::core::Selector)>| {
                let Some(changed) = &self.changed else { return false };
                // A delegating policy selects no pod: pod changes never affect it.
                let affected = cp.spec.delegate != Some(true)
                    && w.valid.as_ref().is_ok_and(|(v, namespaces)| {
                        changed.iter().any(|(ns, pods)| {
                            namespaces.matches(&input.cluster.labels_of(ns))
                                && pods.iter().any(|labels| v.selector.matches(labels))
                        })
                    });
                let rescoped = w.valid.as_ref().is_ok_and(|(_, namespaces)| {
                    self.relabelled.iter().any(|(old, new)| namespaces.matches(old) != namespaces.matches(new))
                });
                w.spec == *cp.spec && !affected && !rescoped
            };
            let worked = match self.prior_cluster.remove(cp.name).filter(reusable) {
                Some(w) => w,
                None => {
                    let valid = validate_cluster(cp.spec).and_then(|v| {
                        rule_names_fit(&PolicyId::cluster(cp.name), cp.spec.destinations.len()).map(|()| v)
                    });
                    let selected = match &valid {
                        // A delegating policy selects no pod of its own.
                        Ok((v, namespaces)) if cp.spec.delegate != Some(true) => {
                            // Namespace scope decided once per namespace, not once per pod.
                            let pods = self
                                .by_namespace
                                .iter()
                                .filter(|(ns, _)| namespaces.matches(&input.cluster.labels_of(ns)))
                                .flat_map(|(_, pods)| pods.iter().copied());
                            clients_of(pods, |pod| v.selector.matches(&pod.labels))
                        }
                        _ => (Vec::new(), 0),
                    };
                    memo.evaluated += 1;
                    Worked { spec: cp.spec.clone(), valid, selected }
                }
            };
            // The route must be one the base defines now (checked on every render: the base changes).
            let route_known = |v: &ValidPolicy| {
                match &v.route {
                Some(r) if !self.routes.contains(r) => Err(vec![crate::validate::FieldError {
                    path: "spec.route".into(),
                    message: format!(
                        "{r:?} is not a parent or group of the release's base configuration (parents, parentGroups), nor \"direct\""
                    ),
                }]),
                _ => Ok(()),
            }
            };
            let valid = worked.valid.clone().and_then(|(v, ns)| route_known(&v).map(|()| (v, ns)));
            let result = valid.map(|(v, namespaces)| {
                let in_scope = |ns: &str| namespaces.matches(&input.cluster.labels_of(ns));
                if cp.spec.delegate == Some(true) {
                    let cidrs = v
                        .destinations
                        .iter()
                        .filter_map(|d| d.cidrs.as_ref())
                        .flatten()
                        .filter_map(|c| parse_net(c))
                        .collect();
                    self.grants.push(Grant { namespaces: GrantScope::Selector(namespaces.clone()), cidrs });
                    let scope = input.cluster.namespace_names().filter(|ns| in_scope(ns)).count();
                    return Accepted {
                        matched_pods: 0,
                        summary: v.summary.clone(),
                        rules: Vec::new(),
                        restricted: Vec::new(),
                        delegated_to: Some(scope),
                        dry_run: false,
                        over_budget: None,
                    };
                }
                let (ips, matched) = &worked.selected;
                let priority = cp.spec.priority.unwrap_or(DEFAULT_PRIORITY);
                let names = push_rules(&mut self.rules, &PolicyId::cluster(cp.name), &v, ips, Some(priority), &[]);
                Accepted {
                    matched_pods: *matched,
                    summary: v.summary.clone(),
                    rules: names,
                    restricted: Vec::new(),
                    delegated_to: None,
                    dry_run: v.dry_run,
                    over_budget: None,
                }
            });
            memo.cluster.insert(cp.name.to_owned(), worked);
            self.outcomes.push(PolicyOutcome { id: PolicyId::cluster(cp.name), result });
        }
    }

    /// The TunnelPolicies, by namespace and name: each within its own and its namespace's budget.
    pub(super) fn namespaced_policies(&mut self, memo: &mut Memo) {
        let input = self.input;
        let mut policies = self.input.policies.clone();
        policies.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));
        for p in &policies {
            let key = (p.namespace.to_owned(), p.name.to_owned());
            let reusable = |w: &Worked<TunnelPolicySpec, ValidPolicy>| {
                let Some(changed) = &self.changed else { return false };
                let affected = w.valid.as_ref().is_ok_and(|v| {
                    changed.get(p.namespace).is_some_and(|pods| pods.iter().any(|labels| v.selector.matches(labels)))
                });
                w.spec == *p.spec && !affected
            };
            let worked = match self.prior_namespaced.remove(&key).filter(reusable) {
                Some(w) => w,
                None => {
                    let valid = validate(p.spec).and_then(|v| {
                        rule_names_fit(&PolicyId::namespaced(p.namespace, p.name), p.spec.destinations.len())
                            .map(|()| v)
                    });
                    let selected = match &valid {
                        Ok(v) => {
                            let pods = self.by_namespace.get(p.namespace).into_iter().flatten().copied();
                            clients_of(pods, |pod| v.selector.matches(&pod.labels))
                        }
                        Err(_) => (Vec::new(), 0),
                    };
                    memo.evaluated += 1;
                    Worked { spec: p.spec.clone(), valid, selected }
                }
            };
            let result = worked.valid.clone().map(|v| {
            let (ips, matched) = &worked.selected;
            let mut restricted = Vec::new();
            let mut left_out = Vec::new();
            if v.action == "allow" {
                let labels = input.cluster.labels_of(p.namespace);
                for (i, d) in v.destinations.iter().enumerate() {
                    let r = restricted_cidrs(
                        &format!("spec.destinations[{i}]"),
                        p.namespace,
                        &labels,
                        &self.grants,
                        &self.cluster_networks,
                        d,
                    );
                    if !r.is_empty() {
                        restricted.extend(r);
                        left_out.push(i);
                    }
                }
            }
            let start = self.rules.len();
            let mut names =
                push_rules(&mut self.rules, &PolicyId::namespaced(p.namespace, p.name), &v, ips, None, &left_out);
            let bytes: usize = self.rules[start..].iter().map(|r| r.body_bytes()).sum();
            let used = self.namespace_bytes.entry(p.namespace).or_default();
            let over_budget = if bytes > POLICY_BUDGET_BYTES {
                Some(format!(
                    "not rendered: its rules would add {bytes} bytes to the proxies' configuration, over the {POLICY_BUDGET_BYTES} one policy may add (split it, or list fewer or shorter hosts)"
                ))
            } else if *used + bytes > NAMESPACE_BUDGET_BYTES {
                Some(format!(
                    "not rendered: with the policies of namespace {} named before it, its rules would add {} bytes to the proxies' configuration, over the {NAMESPACE_BUDGET_BYTES} one namespace may add",
                    p.namespace,
                    *used + bytes
                ))
            } else {
                None
            };
            if over_budget.is_some() {
                self.rules.truncate(start);
                names.clear();
            } else if !names.is_empty() {
                *used += bytes;
                // Leaving out an Allow, or a rule that decides nothing, never opens anything.
                if v.action == "allow" || v.dry_run {
                    let clients = self.rules[start..].iter().flat_map(|r| r.clients.iter()).map(|ip| text_len(ip) + 7).sum::<usize>();
                    self.optional.push(Optional {
                        outcome: self.outcomes.len(),
                        rules: start..self.rules.len(),
                        bytes: bytes + clients,
                        dry_run: v.dry_run,
                    });
                }
            }
            Accepted {
                matched_pods: *matched,
                summary: v.summary.clone(),
                rules: names,
                restricted,
                delegated_to: None,
                dry_run: v.dry_run,
                over_budget,
            }
        });
            memo.namespaced.insert(key, worked);
            self.outcomes.push(PolicyOutcome { id: PolicyId::namespaced(p.namespace, p.name), result });
        }
    }
}
