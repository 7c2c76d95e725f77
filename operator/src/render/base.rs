//! The base document's operator-only parts: the TLS and htpasswd Secrets it names, the address
//! grants it makes, and the cluster networks a render refuses to namespaces without a grant.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kube::core::{Selector, SelectorExt};
use proxy_config::raw::RawConfig;

use super::{Input, RenderError};
use crate::validate::ValidDestination;

/// A grant of the base's `addressGrants`: namespaces whose policies may open refused address
/// space inside these CIDRs (the platform's decision, made where namespaces cannot write).
#[derive(Debug, Clone)]
pub(super) struct Grant {
    pub(super) namespaces: GrantScope,
    pub(super) cidrs: Vec<ipnet::IpNet>,
}

/// Which namespaces a grant is for.
#[derive(Debug, Clone)]
pub(super) enum GrantScope {
    /// Namespace names from the base; `*` is every namespace.
    Names(Vec<String>),
    /// A delegating ClusterTunnelPolicy's namespaceSelector.
    Selector(Selector),
}

impl Grant {
    pub(super) fn covers(&self, namespace: &str, labels: &BTreeMap<String, String>, net: &ipnet::IpNet) -> bool {
        let in_scope = match &self.namespaces {
            GrantScope::Names(names) => names.iter().any(|n| n == "*" || n == namespace),
            GrantScope::Selector(sel) => sel.matches(labels),
        };
        in_scope && self.cidrs.iter().any(|g| g.contains(net))
    }
}

pub(super) fn parse_net(text: &str) -> Option<ipnet::IpNet> {
    text.parse().or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from)).ok()
}

/// Reads and removes the operator-only `addressGrants` of the base document.
pub(super) fn take_grants(doc: &mut RawConfig) -> Result<Vec<Grant>, RenderError> {
    let Some(list) = doc.address_grants.take() else { return Ok(Vec::new()) };
    let bad = |i: usize, what: &str| RenderError::Base(format!("addressGrants[{i}]: {what}"));
    let mut grants = Vec::new();
    for (i, g) in list.into_iter().enumerate() {
        if g.namespaces.is_empty() {
            return Err(bad(i, "namespaces must be a non-empty list"));
        }
        if g.cidrs.is_empty() {
            return Err(bad(i, "cidrs must be a non-empty list"));
        }
        let cidrs = g
            .cidrs
            .iter()
            .map(|c| parse_net(c).ok_or_else(|| bad(i, &format!("cidrs: {c:?} is not a CIDR or an address"))))
            .collect::<Result<Vec<_>, _>>()?;
        grants.push(Grant { namespaces: GrantScope::Names(g.namespaces), cidrs });
    }
    Ok(grants)
}

/// Replaces the base's operator-only `redirect.enrollNamespaces` with the addresses of the pods it
/// enrols: the eligible pods (Running, not terminating, not on the host network) of the
/// namespaces whose labels include every label it names. Per-node documents keep only their
/// node's (see `document::per_node`).
pub(super) fn enrol(doc: &mut RawConfig, input: &Input<'_>) {
    let Some(redirect) = doc.redirect.as_mut() else { return };
    let Some(wanted) = redirect.enroll_namespaces.take() else { return };
    // Each namespace judged once, not once per pod.
    let mut judged: std::collections::HashMap<&str, bool> = std::collections::HashMap::new();
    let mut enrolled: Vec<IpAddr> = Vec::new();
    for p in input.pods.iter().filter(|p| p.eligible) {
        let in_scope = *judged.entry(p.namespace.as_str()).or_insert_with(|| {
            let labels = input.cluster.labels_of(&p.namespace);
            wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
        });
        if in_scope {
            enrolled.extend(p.ips.iter().copied());
        }
    }
    enrolled.sort();
    enrolled.dedup();
    redirect.enrolled = enrolled.iter().map(ToString::to_string).collect();
}

/// The CIDRs of an Allow destination that would open refused address space (the proxy's opt-in
/// rule: a CIDR entirely inside refused space) and that no grant gives `namespace`. A namespace
/// must not grant itself the node network or the cloud metadata service.
pub(super) fn restricted_cidrs(
    path: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    grants: &[Grant],
    cluster_networks: &[ipnet::IpNet],
    destination: &ValidDestination,
) -> Vec<String> {
    let Some(cidrs) = &destination.cidrs else { return Vec::new() };
    cidrs
        .iter()
        .enumerate()
        .filter_map(|(j, text)| {
            let net = parse_net(text)?;
            // Refused space, and the cluster's own networks however public their addresses are
            // (IPv6 pod ranges, nodes' public addresses): a namespace opens them only by a grant.
            let overlaps_cluster =
                cluster_networks.iter().any(|c| c.contains(&net.network()) || net.contains(&c.network()));
            let restricted = (proxy_config::addr::entirely_refused(&net) || overlaps_cluster)
                && !grants.iter().any(|g| g.covers(namespace, labels, &net));
            restricted.then(|| format!("{path}.cidrs[{j}] {text}"))
        })
        .collect()
}

/// The cluster's own networks a render knows: what the API says now plus what the base lists (the
/// Service range, from the chart), sorted and without duplicates so the same cluster renders the
/// same bytes; and the base's entries that do not parse, kept as written so the proxy's parser
/// names them.
pub(super) fn cluster_networks(input: &Input<'_>, base: &RawConfig) -> (Vec<ipnet::IpNet>, Vec<String>) {
    let mut networks: Vec<ipnet::IpNet> = input.cluster.networks.iter().filter_map(|s| parse_net(s)).collect();
    let mut unparsed = Vec::new();
    for v in base.policy.cluster_networks.iter().flatten() {
        match parse_net(v) {
            Some(n) => networks.push(n),
            None => unparsed.push(v.clone()),
        }
    }
    networks.sort();
    networks.dedup();
    (networks, unparsed)
}

/// TLS Secrets the base names: (listener index, listener name, secret name).
pub fn tls_refs(base: &str) -> Result<Vec<(usize, String, String)>, RenderError> {
    let doc = parse_base(base)?;
    let secret_of = |l: &proxy_config::raw::RawListener| l.tls.as_ref()?.secret_name.clone();
    Ok(doc.listeners.iter().enumerate().filter_map(|(i, l)| Some((i, l.name.clone(), secret_of(l)?))).collect())
}

/// A file the operator renders for a parent from a Secret the base names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentFile {
    /// `credentialsSecret`, key `credentials`.
    Credentials,
    /// `tls.caSecret`, key `ca.crt`.
    Ca,
}

impl ParentFile {
    /// The file's name in the proxies' Secret.
    pub fn name(self, parent: &str) -> String {
        match self {
            ParentFile::Credentials => format!("parent-{parent}.credentials"),
            ParentFile::Ca => format!("parent-{parent}-ca.crt"),
        }
    }
}

/// The Secrets the base's parents name: (parent, file, secret).
pub fn parent_file_refs(base: &str) -> Vec<(String, ParentFile, String)> {
    let Ok(doc) = parse_base(base) else { return Vec::new() };
    let mut out = Vec::new();
    for p in doc.parents {
        if let Some(s) = p.credentials_secret {
            out.push((p.name.clone(), ParentFile::Credentials, s));
        }
        if let Some(s) = p.tls.and_then(|t| t.ca_secret) {
            out.push((p.name, ParentFile::Ca, s));
        }
    }
    out
}

/// The Secret the base's `auth.secretName` names (its key `htpasswd`: bcrypt lines).
pub fn auth_ref(base: &str) -> Option<String> {
    parse_base(base).ok()?.auth?.secret_name
}

/// The base document in the configuration's own types (with the fields only the base may carry).
pub(super) fn parse_base(base: &str) -> Result<RawConfig, RenderError> {
    serde_yaml::from_str(base).map_err(|e| RenderError::Base(format!("invalid base document: {e}")))
}
