//! Pure, deterministic rendering: the base document, the valid policies, the pods they select
//! and the validated TLS material become the proxy's `config.yaml` (and its TLS Secret data).
//! The same inputs always give the same bytes; the result is checked with the proxy's own parser.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use kube::core::SelectorExt;
use proxy_config::origin::PolicyId;
use proxy_config::raw::RawRule;
use proxy_config::{ConfigErrors, ProxyConfig};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use kube::core::Selector;

use crate::crd::{ClusterTunnelPolicySpec, TunnelPolicySpec, DEFAULT_PRIORITY};
use crate::validate::{validate, validate_cluster, FieldError, ValidDestination, ValidPolicy};

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

/// A grant of the base's `addressGrants`: namespaces whose policies may open refused address
/// space inside these CIDRs (the platform's decision, made where namespaces cannot write).
#[derive(Debug, Clone)]
struct Grant {
    namespaces: GrantScope,
    cidrs: Vec<ipnet::IpNet>,
}

/// Which namespaces a grant is for.
#[derive(Debug, Clone)]
enum GrantScope {
    /// Namespace names from the base; `*` is every namespace.
    Names(Vec<String>),
    /// A delegating ClusterTunnelPolicy's namespaceSelector.
    Selector(Selector),
}

impl Grant {
    fn covers(&self, namespace: &str, labels: &BTreeMap<String, String>, net: &ipnet::IpNet) -> bool {
        let in_scope = match &self.namespaces {
            GrantScope::Names(names) => names.iter().any(|n| n == "*" || n == namespace),
            GrantScope::Selector(sel) => sel.matches(labels),
        };
        in_scope && self.cidrs.iter().any(|g| g.contains(net))
    }
}

fn parse_net(text: &str) -> Option<ipnet::IpNet> {
    text.parse().or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from)).ok()
}

/// Reads and removes the operator-only `addressGrants` of the base document.
fn take_grants(doc: &mut Map<String, Value>) -> Result<Vec<Grant>, RenderError> {
    let Some(v) = doc.remove("addressGrants") else { return Ok(Vec::new()) };
    let bad = |i: usize, what: &str| RenderError::Base(format!("addressGrants[{i}]: {what}"));
    let list = v.as_array().ok_or_else(|| RenderError::Base("addressGrants must be a list".into()))?;
    let mut grants = Vec::new();
    for (i, g) in list.iter().enumerate() {
        let strings = |key: &str| -> Result<Vec<String>, RenderError> {
            let items = g.get(key).and_then(Value::as_array).filter(|a| !a.is_empty());
            let items = items.ok_or_else(|| bad(i, &format!("{key} must be a non-empty list")))?;
            items
                .iter()
                .map(|x| x.as_str().map(str::to_owned).ok_or_else(|| bad(i, &format!("{key}: strings only"))))
                .collect()
        };
        let namespaces = strings("namespaces")?;
        let cidrs = strings("cidrs")?
            .iter()
            .map(|c| parse_net(c).ok_or_else(|| bad(i, &format!("cidrs: {c:?} is not a CIDR or an address"))))
            .collect::<Result<Vec<_>, _>>()?;
        grants.push(Grant { namespaces: GrantScope::Names(namespaces), cidrs });
    }
    Ok(grants)
}

/// The CIDRs of an Allow destination that would open refused address space (the proxy's opt-in
/// rule: a CIDR entirely inside refused space) and that no grant gives `namespace`. A namespace
/// must not grant itself the node network or the cloud metadata service.
fn restricted_cidrs(
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
fn cluster_networks(input: &Input<'_>, base: &Map<String, Value>) -> (Vec<ipnet::IpNet>, Vec<Value>) {
    let mut networks: Vec<ipnet::IpNet> = input.cluster.networks.iter().filter_map(|s| parse_net(s)).collect();
    let mut unparsed = Vec::new();
    let listed = base.get("policy").and_then(|p| p.get("clusterNetworks")).and_then(Value::as_array);
    for v in listed.into_iter().flatten() {
        match v.as_str().and_then(parse_net) {
            Some(n) => networks.push(n),
            None => unparsed.push(v.clone()),
        }
    }
    networks.sort();
    networks.dedup();
    (networks, unparsed)
}

/// A rendered document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub config: String,
    /// Hex SHA-256 of `config` and of the TLS data: equal means nothing to write.
    pub hash: String,
    /// Keys `<listener>.crt` / `<listener>.key` of the TLS Secret.
    pub tls_data: BTreeMap<String, String>,
    /// Public facts about the certificates, for the ConfigMap's annotations.
    pub annotations: BTreeMap<String, String>,
    /// With `Input::per_node`: each node's document (rules listing only its pods). `config` is
    /// then empty when the whole document would not fit a ConfigMap.
    pub nodes: BTreeMap<String, NodeDoc>,
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
    #[error("the rendered configuration is refused by the proxy's parser:\n{0}")]
    Invalid(ConfigErrors),
    #[error(
        "the rendered configuration is {bytes} bytes, over the {MAX_CONFIG_BYTES}-byte limit of a ConfigMap (roughly 30,000 selected pods); the configuration in force stays (narrow the broadest podSelectors)"
    )]
    TooLarge { bytes: usize },
}

/// TLS Secrets the base names: (listener index, listener name, secret name).
pub fn tls_refs(base: &str) -> Result<Vec<(usize, String, String)>, RenderError> {
    let doc = parse_base(base)?;
    let mut out = Vec::new();
    if let Some(ls) = doc.get("listeners").and_then(Value::as_array) {
        for (i, l) in ls.iter().enumerate() {
            if let Some(secret) = l.pointer("/tls/secretName").and_then(Value::as_str) {
                let name = l.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
                out.push((i, name, secret.to_owned()));
            }
        }
    }
    Ok(out)
}

/// The Secret the base's `auth.secretName` names (its key `htpasswd`: bcrypt lines).
pub fn auth_ref(base: &str) -> Option<String> {
    parse_base(base).ok()?.get("auth")?.get("secretName")?.as_str().map(str::to_owned)
}

fn parse_base(base: &str) -> Result<Map<String, Value>, RenderError> {
    let v: Value = serde_yaml::from_str(base).map_err(|e| RenderError::Base(format!("invalid YAML: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(RenderError::Base("config.yaml must be a mapping".into())),
    }
}

/// The pods' IPs and how many pods `selects` picks (Running pods with an IP only).
fn clients_of<'p>(pods: impl Iterator<Item = &'p PodIn>, selects: impl Fn(&PodIn) -> bool) -> (Vec<IpAddr>, usize) {
    let chosen: Vec<&PodIn> = pods.filter(|pod| pod.eligible && selects(pod)).collect();
    let mut ips: Vec<IpAddr> = chosen.iter().flat_map(|pod| pod.ips.iter().copied()).collect();
    ips.sort();
    ips.dedup();
    (ips, chosen.iter().filter(|pod| !pod.ips.is_empty()).count())
}

/// A rule before it becomes text: its body (everything but `clients`) and its clients' addresses,
/// which per-node rendering splits by node before any of them is formatted.
#[derive(Debug)]
struct Rule {
    body: RawRule,
    clients: Vec<IpAddr>,
}

impl Rule {
    /// Bytes its body (without clients) takes in a document, roughly (as JSON).
    fn body_bytes(&self) -> usize {
        serde_json::to_vec(&self.body).map_or(0, |v| v.len())
    }

    /// The rule as the document carries it, listing `clients`.
    fn raw(&self, clients: &[IpAddr]) -> RawRule {
        RawRule { clients: Some(clients.iter().map(ToString::to_string).collect()), ..self.body.clone() }
    }
}

/// Bytes of an address as text, without building the text.
fn text_len(ip: &IpAddr) -> usize {
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = std::fmt::write(&mut c, format_args!("{ip}"));
    c.0
}

/// One rule per rendered destination, named `<prefix>` or `<prefix>/<index>`.
/// Refuses a policy whose rule names (`prefix`, or `prefix/<index>` for several destinations)
/// the proxies' parser would refuse: one such policy must not make the whole document invalid
/// (a 253-character policy name is legal in the API, and its rule name is then too long).
fn rule_names_fit(id: &PolicyId, destinations: usize) -> Result<(), Vec<crate::validate::FieldError>> {
    let longest = id.longest_rule_name(destinations);
    if proxy_config::config::valid_rule_name(&longest) {
        return Ok(());
    }
    Err(vec![crate::validate::FieldError {
        path: "metadata.name".into(),
        message: format!(
            "the rule name {:?}… is {} characters; the proxies accept at most 253 (namespace, name and destination index together): use a shorter name",
            longest.chars().take(40).collect::<String>(),
            longest.len()
        ),
    }])
}

fn push_rules(
    rules: &mut Vec<Rule>,
    id: &PolicyId,
    v: &ValidPolicy,
    ips: &[IpAddr],
    priority: Option<u32>,
    skip: &[usize],
) -> Vec<String> {
    let mut names = Vec::new();
    // A policy that selects no pod renders nothing: an empty `clients` would mean any client.
    if ips.is_empty() {
        return names;
    }
    for (i, d) in v.destinations.iter().enumerate() {
        if skip.contains(&i) {
            continue;
        }
        let name = id.rule_name(i, v.destinations.len());
        let body = RawRule {
            name: name.clone(),
            action: v.action.into(),
            clients: None,
            users: None,
            hosts: d.hosts.clone(),
            host_regex: None,
            cidrs: d.cidrs.clone(),
            ports: d.ports.clone(),
            relay: d.relay.clone(),
            priority,
            dry_run: v.dry_run.then_some(true),
        };
        rules.push(Rule { body, clients: ips.to_vec() });
        names.push(name);
    }
    names
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
}

impl Memo {
    /// How many policies the last render worked out again (the others were reused).
    pub fn evaluated(&self) -> usize {
        self.evaluated
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
    let changed = changes.by_namespace();
    // Cluster policies look at namespaces' labels: any change of those works them all out again.
    let namespaces_same = memo.namespaces == input.cluster.namespaces;
    if !namespaces_same {
        memo.namespaces = input.cluster.namespaces.clone();
    }
    memo.evaluated = 0;
    let mut prior_cluster = std::mem::take(&mut memo.cluster);
    let mut prior_namespaced = std::mem::take(&mut memo.namespaced);
    // The base is parsed once; its operator-only grants are taken out of it here. A bad base (or
    // bad grants) writes nothing, and policies are then judged without grants.
    let base = parse_base(input.base).and_then(|mut doc| take_grants(&mut doc).map(|grants| (doc, grants)));
    let mut grants = base.as_ref().map(|(_, g)| g.clone()).unwrap_or_default();
    let cluster_networks = base.as_ref().map(|(doc, _)| cluster_networks(input, doc).0).unwrap_or_default();
    let ns_labels = |ns: &str| input.cluster.labels_of(ns);
    // Pods by namespace: a namespaced policy looks at its own namespace's pods only (at 10,000
    // pods and 1,000 policies a scan of every pod per policy was most of a reconcile).
    let mut by_namespace: HashMap<&str, Vec<&PodIn>> = HashMap::new();
    for pod in input.pods {
        by_namespace.entry(pod.namespace.as_str()).or_default().push(pod);
    }
    let mut outcomes = Vec::new();
    let mut rules = Vec::new();

    // Cluster policies first: their delegations are grants for the namespaced ones.
    let mut cluster = input.cluster.policies.clone();
    cluster.sort_by(|a, b| a.name.cmp(b.name));
    for cp in &cluster {
        let reusable = |w: &Worked<ClusterTunnelPolicySpec, (ValidPolicy, Selector)>| {
            let Some(changed) = &changed else { return false };
            // A delegating policy selects no pod: pod changes never affect it.
            let affected = cp.spec.delegate != Some(true)
                && w.valid.as_ref().is_ok_and(|(v, namespaces)| {
                    changed.iter().any(|(ns, pods)| {
                        namespaces.matches(&ns_labels(ns)) && pods.iter().any(|labels| v.selector.matches(labels))
                    })
                });
            namespaces_same && w.spec == *cp.spec && !affected
        };
        let worked = match prior_cluster.remove(cp.name).filter(reusable) {
            Some(w) => w,
            None => {
                let valid = validate_cluster(cp.spec)
                    .and_then(|v| rule_names_fit(&PolicyId::cluster(cp.name), cp.spec.destinations.len()).map(|()| v));
                let selected = match &valid {
                    // A delegating policy selects no pod of its own.
                    Ok((v, namespaces)) if cp.spec.delegate != Some(true) => {
                        // Namespace scope decided once per namespace, not once per pod.
                        let pods = by_namespace
                            .iter()
                            .filter(|(ns, _)| namespaces.matches(&ns_labels(ns)))
                            .flat_map(|(_, pods)| pods.iter().copied());
                        clients_of(pods, |pod| v.selector.matches(&pod.labels))
                    }
                    _ => (Vec::new(), 0),
                };
                memo.evaluated += 1;
                Worked { spec: cp.spec.clone(), valid, selected }
            }
        };
        let result = worked.valid.clone().map(|(v, namespaces)| {
            let in_scope = |ns: &str| namespaces.matches(&ns_labels(ns));
            if cp.spec.delegate == Some(true) {
                let cidrs = v
                    .destinations
                    .iter()
                    .filter_map(|d| d.cidrs.as_ref())
                    .flatten()
                    .filter_map(|c| parse_net(c))
                    .collect();
                grants.push(Grant { namespaces: GrantScope::Selector(namespaces.clone()), cidrs });
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
            let names = push_rules(&mut rules, &PolicyId::cluster(cp.name), &v, ips, Some(priority), &[]);
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
        outcomes.push(PolicyOutcome { id: PolicyId::cluster(cp.name), result });
    }

    let mut policies = input.policies.clone();
    policies.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));
    // What each namespace's policies add to the documents, and the policies that may be left out
    // should the documents still not fit.
    let mut namespace_bytes: HashMap<&str, usize> = HashMap::new();
    let mut optional: Vec<Optional> = Vec::new();
    for p in &policies {
        let key = (p.namespace.to_owned(), p.name.to_owned());
        let reusable = |w: &Worked<TunnelPolicySpec, ValidPolicy>| {
            let Some(changed) = &changed else { return false };
            let affected = w.valid.as_ref().is_ok_and(|v| {
                changed.get(p.namespace).is_some_and(|pods| pods.iter().any(|labels| v.selector.matches(labels)))
            });
            w.spec == *p.spec && !affected
        };
        let worked = match prior_namespaced.remove(&key).filter(reusable) {
            Some(w) => w,
            None => {
                let valid = validate(p.spec).and_then(|v| {
                    rule_names_fit(&PolicyId::namespaced(p.namespace, p.name), p.spec.destinations.len()).map(|()| v)
                });
                let selected = match &valid {
                    Ok(v) => {
                        let pods = by_namespace.get(p.namespace).into_iter().flatten().copied();
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
                let labels = ns_labels(p.namespace);
                for (i, d) in v.destinations.iter().enumerate() {
                    let r = restricted_cidrs(
                        &format!("spec.destinations[{i}]"),
                        p.namespace,
                        &labels,
                        &grants,
                        &cluster_networks,
                        d,
                    );
                    if !r.is_empty() {
                        restricted.extend(r);
                        left_out.push(i);
                    }
                }
            }
            let start = rules.len();
            let mut names =
                push_rules(&mut rules, &PolicyId::namespaced(p.namespace, p.name), &v, ips, None, &left_out);
            let bytes: usize = rules[start..].iter().map(|r| r.body_bytes()).sum();
            let used = namespace_bytes.entry(p.namespace).or_default();
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
                rules.truncate(start);
                names.clear();
            } else if !names.is_empty() {
                *used += bytes;
                // Leaving out an Allow, or a rule that decides nothing, never opens anything.
                if v.action == "allow" || v.dry_run {
                    let clients = rules[start..].iter().flat_map(|r| r.clients.iter()).map(|ip| text_len(ip) + 7).sum::<usize>();
                    optional.push(Optional {
                        outcome: outcomes.len(),
                        rules: start..rules.len(),
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
        outcomes.push(PolicyOutcome { id: PolicyId::namespaced(p.namespace, p.name), result });
    }
    let (doc, _) = match base {
        Ok(b) => b,
        Err(e) => return (outcomes, Err(e)),
    };
    let rendered = fit(input, doc, rules, optional, &namespace_bytes, &mut outcomes);
    (outcomes, rendered)
}

/// A namespaced policy whose rules may be left out when the documents would not fit otherwise.
struct Optional {
    /// Its index in the outcomes.
    outcome: usize,
    /// Its rules' indexes.
    rules: std::ops::Range<usize>,
    /// What it adds to the whole document (rules and clients), roughly.
    bytes: usize,
    dry_run: bool,
}

/// The documents with `rules`; while they would not fit in a ConfigMap, whole policies are left
/// out, in this order, until they do: dry-run policies first (they decide nothing), then Allow
/// policies, those of the namespace adding the most first, the largest first within it, then by
/// namespace and name. Denies and ClusterTunnelPolicies are never left out: leaving out an Allow
/// only ever refuses more. Each policy left out says so in its status.
fn fit(
    input: &Input<'_>,
    doc: Map<String, Value>,
    rules: Vec<Rule>,
    mut optional: Vec<Optional>,
    namespace_bytes: &HashMap<&str, usize>,
    outcomes: &mut [PolicyOutcome],
) -> Result<Rendered, RenderError> {
    let ns_of = |o: &Optional| outcomes[o.outcome].id.namespace().unwrap_or_default().to_owned();
    optional.sort_by(|a, b| {
        let (na, nb) = (ns_of(a), ns_of(b));
        let used = |ns: &str| namespace_bytes.get(ns).copied().unwrap_or(0);
        b.dry_run
            .cmp(&a.dry_run)
            .then(used(&nb).cmp(&used(&na)))
            .then(b.bytes.cmp(&a.bytes))
            .then(na.cmp(&nb))
            .then(outcomes[a.outcome].id.name().cmp(outcomes[b.outcome].id.name()))
    });
    let mut next = optional.into_iter();
    let mut dropped = vec![false; rules.len()];
    let mut left_out: Vec<usize> = Vec::new();
    loop {
        let live = || rules.iter().zip(&dropped).filter(|(_, d)| !**d).map(|(r, _)| r);
        let attempt = match input.per_node {
            None => document(input, doc.clone(), live().map(|r| r.raw(&r.clients)).collect()),
            Some(nodes) => per_node(input, doc.clone(), &live().collect::<Vec<_>>(), nodes),
        };
        let Err(RenderError::TooLarge { bytes }) = attempt else {
            for &i in &left_out {
                if let Ok(a) = &mut outcomes[i].result {
                    a.rules.clear();
                    a.over_budget = Some(format!(
                        "not rendered: with every policy in it, the proxies' configuration would exceed the {MAX_CONFIG_BYTES}-byte limit of a ConfigMap; dry-run policies, then the Allow policies of the namespaces whose policies add the most, are left out first"
                    ));
                }
            }
            return attempt;
        };
        // Leave out enough to cover the excess (an estimate: the loop tries again until it fits).
        let excess = bytes.saturating_sub(MAX_CONFIG_BYTES).max(1);
        let mut freed = 0;
        let before = left_out.len();
        for o in next.by_ref() {
            for r in o.rules.clone() {
                dropped[r] = true;
            }
            freed += o.bytes;
            left_out.push(o.outcome);
            if freed >= excess {
                break;
            }
        }
        if left_out.len() == before {
            // Nothing more may be left out: the Denies and cluster policies alone do not fit.
            return Err(RenderError::TooLarge { bytes });
        }
    }
}

/// The whole document (when it fits) and one per node, whose rules list only that node's pods: a
/// pod change rewrites its node's document, and no proxy holds the whole cluster's rules.
fn per_node(
    input: &Input<'_>,
    doc: Map<String, Value>,
    rules: &[&Rule],
    nodes: &[String],
) -> Result<Rendered, RenderError> {
    let mut names: std::collections::BTreeSet<&str> = nodes.iter().map(String::as_str).collect();
    names.extend(input.pods.iter().filter(|p| !p.node.is_empty()).map(|p| p.node.as_str()));
    let names: Vec<&str> = names.into_iter().collect();
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut node_of: HashMap<IpAddr, usize> = HashMap::new();
    for pod in input.pods.iter().filter(|p| p.eligible && !p.node.is_empty()) {
        if let Some(&i) = index.get(pod.node.as_str()) {
            node_of.extend(pod.ips.iter().map(|ip| (*ip, i)));
        }
    }
    // Each rule's clients grouped by node, in one pass over all clients (not one per node), as
    // addresses: only the documents that changed are formatted.
    let mut by_node: Vec<Vec<(usize, Vec<IpAddr>)>> = vec![Vec::new(); names.len()];
    for (r, rule) in rules.iter().enumerate() {
        for ip in &rule.clients {
            let Some(&node) = node_of.get(ip) else { continue };
            let own = &mut by_node[node];
            match own.last_mut() {
                Some((last, ips)) if *last == r => ips.push(*ip),
                // A rule without clients on a node is left out there (no clients would mean any client).
                _ => own.push((r, vec![*ip])),
            }
        }
    }
    // What every node document shares (the base, TLS and users): with a node's own rules it
    // fingerprints the document, so only the nodes whose inputs changed are rendered again.
    let mut shared_digest = Sha256::new();
    shared_digest.update(serde_json::to_vec(&doc).unwrap_or_default());
    shared_digest.update(input.tls_dir.as_bytes());
    for (listener, t) in input.tls {
        shared_digest.update(listener.as_bytes());
        shared_digest.update(t.sha256.as_bytes());
    }
    shared_digest.update(input.htpasswd.unwrap_or_default().as_bytes());
    // Each rule's body digested once, for every node that carries it.
    let bodies: Vec<[u8; 32]> =
        rules.iter().map(|r| Sha256::digest(serde_json::to_vec(&r.body).unwrap_or_default()).into()).collect();
    let mut docs = BTreeMap::new();
    let mut shared = None;
    for (node, own) in names.iter().zip(by_node) {
        let mut fp = shared_digest.clone();
        for (r, ips) in &own {
            fp.update(bodies[*r]);
            for ip in ips {
                match ip {
                    IpAddr::V4(a) => fp.update(a.octets()),
                    IpAddr::V6(a) => fp.update(a.octets()),
                }
            }
            fp.update([0xff]);
        }
        let fingerprint = hex::encode(fp.finalize());
        if let Some(prior) = input.prior_nodes.and_then(|p| p.get(*node)).filter(|d| d.fingerprint == fingerprint) {
            docs.insert((*node).to_owned(), prior.clone());
            continue;
        }
        let own_rules = own.iter().map(|(r, ips)| rules[*r].raw(ips)).collect();
        let d = document(input, doc.clone(), own_rules)?;
        docs.insert((*node).to_owned(), NodeDoc { config: d.config, hash: d.hash, fingerprint });
        shared.get_or_insert((d.tls_data, d.annotations));
    }
    if shared.is_none() {
        // Every node document came from the previous render: the TLS data is that of a document
        // with no rules (it does not depend on them).
        let d = document(input, doc.clone(), Vec::new())?;
        shared = Some((d.tls_data, d.annotations));
    }
    // Each client takes at least its text and `    - \n` in the document: past the limit by that
    // count alone, the whole document is not built (at 100,000 pods it is megabytes of YAML).
    let floor: usize = rules.iter().flat_map(|r| r.clients.iter()).map(|ip| text_len(ip) + 7).sum();
    let whole = if floor > MAX_CONFIG_BYTES {
        Err(RenderError::TooLarge { bytes: floor })
    } else {
        document(input, doc, rules.iter().map(|r| r.raw(&r.clients)).collect())
    };
    let mut whole = match whole {
        Ok(w) => w,
        // Too large for one ConfigMap is what per-node rendering is for; gateways need it whole.
        Err(RenderError::TooLarge { bytes }) => {
            let Some((tls_data, annotations)) = shared else { return Err(RenderError::TooLarge { bytes }) };
            Rendered { config: String::new(), hash: String::new(), tls_data, annotations, nodes: BTreeMap::new() }
        }
        Err(e) => return Err(e),
    };
    let mut h = Sha256::new();
    h.update(whole.hash.as_bytes());
    for (node, d) in &docs {
        h.update(node.as_bytes());
        h.update(d.hash.as_bytes());
    }
    whole.hash = hex::encode(h.finalize());
    whole.nodes = docs;
    Ok(whole)
}

/// The document: `doc` (the base without its grants) with the rules, TLS files and users.
fn document(input: &Input<'_>, mut doc: Map<String, Value>, rules: Vec<RawRule>) -> Result<Rendered, RenderError> {
    let mut tls_data = BTreeMap::new();
    let mut annotations = BTreeMap::new();
    if let Some(ls) = doc.get_mut("listeners").and_then(Value::as_array_mut) {
        for (index, l) in ls.iter_mut().enumerate() {
            let Some(secret) = l.pointer("/tls/secretName").and_then(Value::as_str).map(str::to_owned) else {
                continue;
            };
            let listener = l.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
            let Some(t) = input.tls.get(&listener) else {
                return Err(RenderError::MissingTls { index, listener, secret });
            };
            let dir = input.tls_dir.trim_end_matches('/');
            // The Secret becomes files; the listener's other TLS settings (ALPN, floor) stay.
            if let Some(tls) = l.get_mut("tls").and_then(Value::as_object_mut) {
                tls.remove("secretName");
                tls.insert("certFile".into(), json!(format!("{dir}/{listener}.crt")));
                tls.insert("keyFile".into(), json!(format!("{dir}/{listener}.key")));
            }
            tls_data.insert(format!("{listener}.crt"), t.cert_pem.clone());
            tls_data.insert(format!("{listener}.key"), t.key_pem.clone());
            annotations.insert(format!("tunnelgate.io/tls-{listener}-sha256"), t.sha256.clone());
            annotations.insert(format!("tunnelgate.io/tls-{listener}-not-after"), t.not_after.clone());
        }
    }
    // Proxy users: the validated file goes into the proxy's Secret, never into the ConfigMap.
    let mut auth_sha = None;
    if let Some(auth) = doc.get_mut("auth").and_then(Value::as_object_mut) {
        if let Some(secret) = auth.remove("secretName").and_then(|v| v.as_str().map(str::to_owned)) {
            let Some(htpasswd) = input.htpasswd else { return Err(RenderError::MissingAuth { secret }) };
            let dir = input.tls_dir.trim_end_matches('/');
            auth.insert("htpasswdFile".into(), Value::String(format!("{dir}/htpasswd")));
            tls_data.insert("htpasswd".to_owned(), htpasswd.to_owned());
            auth_sha = Some(hex::encode(Sha256::digest(htpasswd.as_bytes())));
        }
    }
    let (networks, unparsed) = cluster_networks(input, &doc);
    let policy = doc.entry("policy").or_insert_with(|| json!({}));
    let Some(policy) = policy.as_object_mut() else { return Err(RenderError::Base("policy must be a mapping".into())) };
    if policy.get("rules").is_some_and(|r| !r.as_array().is_some_and(Vec::is_empty)) {
        return Err(RenderError::Base("policy.rules must be empty: rules come from TunnelPolicies".into()));
    }
    // Written out even when the base leaves it implicit: no policy must never mean allow-all.
    policy.entry("defaultAction").or_insert_with(|| json!("deny"));
    if !networks.is_empty() || !unparsed.is_empty() {
        let mut list: Vec<Value> = networks.iter().map(|n| Value::String(n.to_string())).collect();
        list.extend(unparsed);
        policy.insert("clusterNetworks".into(), Value::Array(list));
    }
    // The rules are typed values; the base around them is the user's document, passed through.
    policy.insert("rules".into(), serde_json::to_value(&rules).map_err(|e| RenderError::Base(e.to_string()))?);
    let mut config =
        String::from("# Rendered by tunnelgate-operator from the base ConfigMap and TunnelPolicies. Do not edit.\n");
    config.push_str(&serde_yaml::to_string(&Value::Object(doc)).map_err(|e| RenderError::Base(e.to_string()))?);
    for (listener, t) in input.tls {
        if tls_data.contains_key(&format!("{listener}.crt")) {
            // The certificate's identity is part of the document, so a rotation reaches every
            // proxy as a config change (a reload re-reads the mounted files).
            config.push_str(&format!("# tls {listener}: sha256={} notAfter={}\n", t.sha256, t.not_after));
        }
    }
    if let Some(sha) = auth_sha {
        // As for certificates: a change of users reaches every proxy as a config change.
        config.push_str(&format!("# auth htpasswd: sha256={sha}\n"));
    }
    if config.len() > MAX_CONFIG_BYTES {
        return Err(RenderError::TooLarge { bytes: config.len() });
    }
    ProxyConfig::from_yaml(&config).map_err(RenderError::Invalid)?;
    let mut h = Sha256::new();
    h.update(config.as_bytes());
    for (k, v) in &tls_data {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    Ok(Rendered { config, hash: hex::encode(h.finalize()), tls_data, annotations, nodes: BTreeMap::new() })
}

#[cfg(test)]
mod tests;
