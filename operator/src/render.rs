//! Pure, deterministic rendering: the base document, the valid policies, the pods they select
//! and the validated TLS material become the proxy's `config.yaml` (and its TLS Secret data).
//! The same inputs always give the same bytes; the result is checked with the proxy's own parser.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use proxy_config::origin::PolicyId;
use proxy_config::ConfigErrors;

use kube::core::Selector;

use crate::crd::{ClusterTunnelPolicySpec, TunnelPolicySpec};
use crate::validate::{FieldError, ValidPolicy};

/// Largest rendered document written (a ConfigMap holds at most 1 MiB in all).
pub const MAX_CONFIG_BYTES: usize = 900 * 1024;

/// Most bytes one TunnelPolicy's rules may add to the rendered documents (its destinations, as
/// the document spells them; the clients, which grow with the pods, are not counted): over it, the
/// policy is not rendered, and its status says so.
pub const POLICY_BUDGET_BYTES: usize = 64 * 1024;

/// Most bytes the TunnelPolicies of one namespace may add together (counted as for one policy, in
/// the order of their names): a policy that would take the namespace past it is not rendered.
pub const NAMESPACE_BUDGET_BYTES: usize = 192 * 1024;

/// A TunnelPolicy as the renderer sees it.
#[derive(Debug, Clone)]
pub struct PolicyIn<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub spec: &'a TunnelPolicySpec,
}

/// A pod as the renderer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodIn {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    /// Running, not terminating, and not on the host network (a node IP is no identity).
    pub eligible: bool,
    /// The node it runs on (empty before it is scheduled).
    pub node: String,
}

/// Validated TLS material for one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsIn {
    pub cert_pem: String,
    pub key_pem: String,
    /// Hex SHA-256 of the leaf certificate (DER).
    pub sha256: String,
    /// RFC 3339.
    pub not_after: String,
}

/// Everything a render needs.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// The base document (`<release>-base`, key `config.yaml`).
    pub base: &'a str,
    pub policies: Vec<PolicyIn<'a>>,
    pub pods: &'a [PodIn],
    /// TLS material by listener name.
    pub tls: &'a BTreeMap<String, TlsIn>,
    /// Where the proxy mounts the rendered TLS Secret.
    pub tls_dir: &'a str,
    /// The validated htpasswd file that the base's `auth.secretName` names.
    pub htpasswd: Option<&'a str>,
    /// The validated files of the parents' Secrets the base names (`credentialsSecret`,
    /// `tls.caSecret`), by file name ([`ParentFile::name`]).
    pub parent_files: &'a BTreeMap<String, String>,
    /// ClusterTunnelPolicies and the namespaces' labels.
    pub cluster: Cluster<'a>,
    /// Render a document per node as well, for these nodes (and every node a pod runs on).
    pub per_node: Option<&'a [String]>,
    /// The node documents of the previous render, reused where their inputs did not change.
    pub prior_nodes: Option<&'a BTreeMap<String, NodeDoc>>,
}

/// A ClusterTunnelPolicy as the renderer sees it.
#[derive(Debug, Clone)]
pub struct ClusterPolicyIn<'a> {
    pub name: &'a str,
    pub spec: &'a ClusterTunnelPolicySpec,
}

/// The cluster-scoped inputs.
#[derive(Debug, Clone, Default)]
pub struct Cluster<'a> {
    pub policies: Vec<ClusterPolicyIn<'a>>,
    /// Labels by namespace name (namespaces not listed have only their name label).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// The cluster's own addresses and ranges as the API tells them (nodes, pod ranges, the API
    /// server), added to the base's `policy.clusterNetworks`. Unparseable entries are skipped.
    pub networks: Vec<String>,
}

impl Cluster<'_> {
    /// A namespace's labels, with `kubernetes.io/metadata.name` always set (as the API server does).
    fn labels_of(&self, ns: &str) -> BTreeMap<String, String> {
        let mut labels = self.namespaces.get(ns).cloned().unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), ns.to_owned());
        labels
    }

    fn namespace_names(&self) -> impl Iterator<Item = &str> {
        self.namespaces.keys().map(String::as_str)
    }
}

/// What happened to one policy.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyOutcome {
    pub id: PolicyId,
    pub result: Result<Accepted, Vec<FieldError>>,
}

/// A valid policy's facts for its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub matched_pods: usize,
    pub summary: String,
    /// Rule names rendered for it (empty when it selects no pod).
    pub rules: Vec<String>,
    /// Allow destinations left out because they would open address space the proxy refuses by
    /// default (private, loopback, link-local, metadata): one line per CIDR, with its path.
    pub restricted: Vec<String>,
    /// For a delegating ClusterTunnelPolicy: how many namespaces it grants to now.
    pub delegated_to: Option<usize>,
    /// `enforcement: DryRun`: its rules are rendered but not enforced.
    pub dry_run: bool,
    /// Why none of its rules are rendered although it is valid: over its own or its namespace's
    /// budget, or left out so that the document fits.
    pub over_budget: Option<String>,
}

/// A rendered document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    pub config: String,
    /// Hex SHA-256 of `config` and of the TLS data: equal means nothing to write.
    pub hash: String,
    /// Keys `<listener>.crt` / `<listener>.key` of the TLS Secret.
    pub tls_data: BTreeMap<String, String>,
    /// Public facts about the certificates, for the ConfigMap's annotations.
    pub annotations: BTreeMap<String, String>,
    /// With `Input::per_node`: each node's document (rules listing only its pods).
    pub nodes: BTreeMap<String, NodeDoc>,
    /// When the whole document would not fit a ConfigMap: it in shards (`config` is then empty),
    /// each a valid document; proxies that read the whole document merge them.
    pub shards: Vec<String>,
}

/// One node's document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDoc {
    pub config: String,
    /// Hex SHA-256 of `config`.
    pub hash: String,
    /// Of what the document was rendered from: equal means it can be reused as it is.
    pub fingerprint: String,
}

/// Why nothing can be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("base ConfigMap: {0}")]
    Base(String),
    #[error(
        "base ConfigMap: listeners[{index}] ({listener}) names TLS Secret {secret:?}, which is missing or invalid"
    )]
    MissingTls { index: usize, listener: String, secret: String },
    #[error("base ConfigMap: auth names Secret {secret:?}, which is missing or holds no valid htpasswd")]
    MissingAuth { secret: String },
    #[error("base ConfigMap: parent {parent:?} names Secret {secret:?}, which is missing or holds no valid {what}")]
    MissingParentSecret { parent: String, secret: String, what: &'static str },
    #[error("the rendered configuration is refused by the proxy's parser:\n{0}")]
    Invalid(ConfigErrors),
    #[error(
        "the rendered configuration is {bytes} bytes, more than a ConfigMap holds ({MAX_CONFIG_BYTES} bytes for a node's document; 64 of them for the whole-cluster document in shards); the configuration in force stays (narrow the broadest podSelectors)"
    )]
    TooLarge { bytes: usize },
}

/// What rendering worked out per policy (its validation and the pods it selects), kept from one
/// render to the next so that a change re-evaluates only the policies it can affect: a pod change
/// only the policies of its namespace (and the cluster policies covering it) whose selector matches
/// the pod before or after the change; a policy change only that policy. Selecting pods is the part
/// of a render that grows with pods × policies; the rest is linear in the document.
#[derive(Debug, Default)]
pub struct Memo {
    namespaced: HashMap<(String, String), Worked<TunnelPolicySpec, ValidPolicy>>,
    cluster: HashMap<String, Worked<ClusterTunnelPolicySpec, (ValidPolicy, Selector)>>,
    /// The namespaces' labels the cluster policies were worked out against.
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// How many policies the last render worked out again.
    evaluated: usize,
    /// How many addresses the last render enrolled for transparent interception.
    enrolled: usize,
    /// What the last render built again, and its shards of the whole document.
    built: document::Built,
}

impl Memo {
    /// How many policies the last render worked out again (the others were reused).
    pub fn evaluated(&self) -> usize {
        self.evaluated
    }

    /// How many node documents the last render built again (the others were reused).
    pub fn nodes_rendered(&self) -> usize {
        self.built.nodes
    }

    /// How many shards of the whole document the last render built again (the others were reused).
    pub fn shards_rendered(&self) -> usize {
        self.built.shards
    }

    /// How many addresses the last render enrolled for transparent interception (in every node's
    /// documents together).
    pub fn enrolled(&self) -> usize {
        self.enrolled
    }
}

/// One policy worked out: from this spec, this validation and these selected pods.
#[derive(Debug)]
struct Worked<S, V> {
    spec: S,
    valid: Result<V, Vec<FieldError>>,
    /// The selected pods' IPs (sorted, without duplicates) and how many pods have one.
    selected: (Vec<IpAddr>, usize),
}

/// The pods that changed since the memo was filled.
#[derive(Debug, Clone)]
pub enum PodChanges<'a> {
    /// Not known (the first render, a re-list of the pods): every policy is worked out again.
    All,
    /// Each changed pod before and after the change (a pod added or deleted appears once), by
    /// namespace and labels: all a selector looks at.
    Pods(Vec<(&'a str, &'a BTreeMap<String, String>)>),
}

impl PodChanges<'_> {
    /// Changed pods' labels by namespace; `None` for [`PodChanges::All`].
    fn by_namespace(&self) -> Option<HashMap<&str, Vec<&BTreeMap<String, String>>>> {
        let PodChanges::Pods(pods) = self else { return None };
        let mut out: HashMap<&str, Vec<&BTreeMap<String, String>>> = HashMap::new();
        for (ns, labels) in pods {
            out.entry(ns).or_default().push(labels);
        }
        Some(out)
    }
}

/// Renders the policies; returns each policy's outcome and the document (or why there is none).
pub fn render(input: &Input<'_>) -> (Vec<PolicyOutcome>, Result<Rendered, RenderError>) {
    render_with(input, &mut Memo::default(), &PodChanges::All)
}

/// [`render`], reusing what `memo` holds for the policies that neither changed nor select a pod of
/// `changes`; `memo` is left holding this render's work. The result is the same as [`render`]'s.
pub fn render_with(
    input: &Input<'_>,
    memo: &mut Memo,
    changes: &PodChanges<'_>,
) -> (Vec<PolicyOutcome>, Result<Rendered, RenderError>) {
    // The base is parsed once; its operator-only grants are taken out of it here. A bad base (or
    // bad grants) writes nothing, and policies are then judged without grants.
    let base = base::parse_base(input.base).and_then(|mut doc| {
        let grants = base::take_grants(&mut doc)?;
        base::enrol(&mut doc, input);
        Ok((doc, grants))
    });
    memo.enrolled = base.as_ref().ok().and_then(|(doc, _)| doc.redirect.as_ref()).map_or(0, |r| r.enrolled.len());
    let mut pass = policies::Pass::new(input, changes, memo, &base);
    // Cluster policies first: their delegations are grants for the namespaced ones.
    pass.cluster_policies(memo);
    pass.namespaced_policies(memo);
    let policies::Pass { mut outcomes, rules, optional, namespace_bytes, .. } = pass;
    let (doc, _) = match base {
        Ok(b) => b,
        Err(e) => return (outcomes, Err(e)),
    };
    let rendered = document::fit(input, doc, rules, optional, &namespace_bytes, &mut outcomes, &mut memo.built);
    (outcomes, rendered)
}

mod base;
mod document;
mod policies;
mod rules;

pub use base::{auth_ref, parent_file_refs, tls_refs, ParentFile};

#[cfg(test)]
mod tests;
