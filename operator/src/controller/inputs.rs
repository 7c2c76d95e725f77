//! What one reconcile reads from the caches ([`Inputs`]): the policies of both kinds (and those
//! that do not deserialize), the base document, the namespaces, the cluster's networks, the nodes,
//! and the Secrets a render uses — each TLS listener's certificate and the proxy users, validated;
//! an invalid Secret becomes a warning and falls back to what the proxy already has.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::ObjectRef;
use kube::Resource;
use tracing::warn;

use super::plan::{PolicyObject, UnreadablePolicy, Warning};
use super::watches::{cluster_networks, Caches};
use super::Settings;
use crate::crd::{ClusterTunnelPolicy, TunnelPolicy};
use crate::render::ParentFile;
use crate::render::{self, Cluster, ClusterPolicyIn, Input, NodeDoc, PodIn, PolicyIn, TlsIn};
use crate::secrets::{ca_from_secret, credentials_from_secret, htpasswd_from_secret, tls_from_secret};

/// The caches as one reconcile sees them.
pub(super) struct Inputs {
    pub(super) policies: Vec<Arc<TunnelPolicy>>,
    pub(super) cluster_policies: Vec<Arc<ClusterTunnelPolicy>>,
    pub(super) unreadable: Vec<UnreadablePolicy>,
    /// The base document (`None`: the base ConfigMap or its key is missing).
    pub(super) base: Option<String>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    networks: Vec<String>,
    /// Node names (only when rendering per node: no walk over every Node otherwise).
    nodes: Vec<String>,
    tls: BTreeMap<String, TlsIn>,
    htpasswd: Option<String>,
    parent_files: BTreeMap<String, String>,
    /// Invalid Secrets.
    pub(super) warnings: Vec<Warning>,
}

impl Inputs {
    pub(super) fn read(c: &Caches, s: &Settings) -> Inputs {
        let mut policies = Vec::new();
        let mut unreadable = Vec::new();
        for l in c.policies.state() {
            match &l.read {
                Ok(p) => policies.push(p.clone()),
                Err(why) => unreadable.push(UnreadablePolicy {
                    id: proxy_config::origin::PolicyId::namespaced(
                        l.meta_data().namespace.as_deref().unwrap_or_default(),
                        l.meta_data().name.as_deref().unwrap_or_default(),
                    ),
                    generation: l.meta_data().generation,
                    reference: l.object_ref(&()),
                    path: why.path.clone(),
                    message: why.message.clone(),
                }),
            }
        }
        let mut cluster_policies = Vec::new();
        for l in c.cluster_policies.state() {
            match &l.read {
                Ok(p) => cluster_policies.push(p.clone()),
                Err(why) => unreadable.push(UnreadablePolicy {
                    id: proxy_config::origin::PolicyId::cluster(l.meta_data().name.as_deref().unwrap_or_default()),
                    generation: l.meta_data().generation,
                    reference: l.object_ref(&()),
                    path: why.path.clone(),
                    message: why.message.clone(),
                }),
            }
        }
        let base_cm = c.base.get(&ObjectRef::new(&s.base_name()).within(&s.namespace));
        let base = base_cm.as_ref().and_then(|cm| cm.data.as_ref()?.get(proxy_config::status::CONFIG_KEY).cloned());
        let mut warnings = Vec::new();
        let tls = tls(c, s, base.as_deref(), &mut warnings);
        let htpasswd = htpasswd(c, s, base.as_deref(), &mut warnings);
        let parent_files = parent_files(c, s, base.as_deref(), &mut warnings);
        Inputs {
            policies,
            cluster_policies,
            unreadable,
            base,
            namespaces: c
                .namespaces
                .state()
                .iter()
                .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone().unwrap_or_default())))
                .collect(),
            networks: cluster_networks(c),
            nodes: if s.config_per_node {
                c.nodes.state().iter().filter_map(|n| n.metadata.name.clone()).collect()
            } else {
                Vec::new()
            },
            tls,
            htpasswd,
            parent_files,
            warnings,
        }
    }

    /// The readable policies of both kinds, for the plan.
    pub(super) fn policy_objects(&self) -> impl Iterator<Item = PolicyObject<'_>> {
        self.policies
            .iter()
            .map(|p| PolicyObject::Namespaced(p))
            .chain(self.cluster_policies.iter().map(|p| PolicyObject::Cluster(p)))
    }

    /// What the renderer reads, with `pods` and the previous render's node documents. The
    /// namespaces' labels and the cluster's networks are handed over, not copied: a reconcile
    /// renders once.
    pub(super) fn render_input<'a>(
        &'a mut self,
        s: &'a Settings,
        pods: &'a [PodIn],
        prior_nodes: &'a BTreeMap<String, NodeDoc>,
    ) -> Input<'a> {
        Input {
            base: self.base.as_deref().unwrap_or_default(),
            policies: self
                .policies
                .iter()
                .map(|p| PolicyIn {
                    namespace: p.metadata.namespace.as_deref().unwrap_or_default(),
                    name: p.metadata.name.as_deref().unwrap_or_default(),
                    spec: &p.spec,
                })
                .collect(),
            pods,
            tls: &self.tls,
            tls_dir: &s.tls_dir,
            htpasswd: self.htpasswd.as_deref(),
            parent_files: &self.parent_files,
            cluster: Cluster {
                policies: self
                    .cluster_policies
                    .iter()
                    .map(|p| ClusterPolicyIn { name: p.metadata.name.as_deref().unwrap_or_default(), spec: &p.spec })
                    .collect(),
                namespaces: std::mem::take(&mut self.namespaces),
                networks: std::mem::take(&mut self.networks),
            },
            per_node: s.config_per_node.then_some(self.nodes.as_slice()),
            prior_nodes: Some(prior_nodes),
        }
    }
}

/// TLS material by listener for the base document `base`: validated Secrets; an invalid one falls
/// back to what the proxy already has.
fn tls(c: &Caches, s: &Settings, base: Option<&str>, warnings: &mut Vec<Warning>) -> BTreeMap<String, TlsIn> {
    let ns = &s.namespace;
    let mut tls: BTreeMap<String, TlsIn> = BTreeMap::new();
    let Some(base) = base else { return tls };
    let previous = c.secrets.get(&ObjectRef::new(&s.tls_name()).within(ns));
    for (_, listener, secret_name) in render::tls_refs(base).unwrap_or_default() {
        let secret = c.secrets.get(&ObjectRef::new(&secret_name).within(ns));
        let result = match &secret {
            Some(sec) => tls_from_secret(sec).map_err(|e| e.to_string()),
            None => Err("not found".to_owned()),
        };
        match result {
            Ok(t) => {
                tls.insert(listener, t);
            }
            Err(msg) => {
                let note = format!(
                    "TLS Secret for listener {listener} is invalid: {msg}; the previous certificate stays in use"
                );
                warn_invalid(warnings, secret.as_deref(), &secret_name, note);
                warn!(listener = %listener, secret = %secret_name, error = %msg, "TLS Secret unusable; keeping the previous certificate");
                let prev = previous.as_ref().and_then(|p| p.data.as_ref()).and_then(|d| {
                    let crt = d.get(&format!("{listener}.crt"))?;
                    let key = d.get(&format!("{listener}.key"))?;
                    crate::secrets::tls_from_pem(&crt.0, &key.0).ok()
                });
                if let Some(p) = prev {
                    tls.insert(listener, p);
                }
            }
        }
    }
    tls
}

/// Proxy users: a validated htpasswd Secret; an invalid one keeps the users the proxy has.
fn htpasswd(c: &Caches, s: &Settings, base: Option<&str>, warnings: &mut Vec<Warning>) -> Option<String> {
    let secret_name = base.and_then(render::auth_ref)?;
    let checked = Checked { subject: "htpasswd Secret".into(), kept: "users", file: "htpasswd".into() };
    checked.read(c, s, &secret_name, htpasswd_from_secret, warnings)
}

/// Parents' files (credentials, CAs) by file name: validated Secrets; an invalid one keeps what
/// the proxy has.
fn parent_files(c: &Caches, s: &Settings, base: Option<&str>, warnings: &mut Vec<Warning>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(base) = base else { return out };
    for (parent, kind, secret_name) in render::parent_file_refs(base) {
        let (what, read): (&str, SecretCheck) = match kind {
            ParentFile::Credentials => ("credentials", credentials_from_secret),
            ParentFile::Ca => ("CA certificates", ca_from_secret),
        };
        let checked =
            Checked { subject: format!("{what} Secret of parent {parent}"), kept: "ones", file: kind.name(&parent) };
        if let Some(text) = checked.read(c, s, &secret_name, read, warnings) {
            out.insert(checked.file, text);
        }
    }
    out
}

/// Validates a user's Secret and returns the file it holds.
type SecretCheck = fn(&Secret) -> Result<String, crate::secrets::SecretError>;

/// A text file of the proxies' Secret, taken from a user's Secret after a check.
struct Checked {
    /// What the user's Secret is, for the warning (`htpasswd Secret`).
    subject: String,
    /// What stays in force when it is unusable (`users`).
    kept: &'static str,
    /// Its key in the proxies' Secret.
    file: String,
}

impl Checked {
    /// The file from Secret `secret_name` when `check` accepts it; otherwise a Warning event on
    /// the Secret (when it exists) and the file the proxies' Secret already holds, if any.
    fn read(
        &self,
        c: &Caches,
        s: &Settings,
        secret_name: &str,
        check: SecretCheck,
        warnings: &mut Vec<Warning>,
    ) -> Option<String> {
        let ns = &s.namespace;
        let secret = c.secrets.get(&ObjectRef::new(secret_name).within(ns));
        let msg = match secret.as_deref().map(check) {
            Some(Ok(text)) => return Some(text),
            Some(Err(e)) => e.to_string(),
            None => "not found".to_owned(),
        };
        let (subject, kept) = (&self.subject, self.kept);
        let note = format!("{subject} is invalid: {msg}; the previous {kept} stay in force");
        warn_invalid(warnings, secret.as_deref(), secret_name, note);
        warn!(secret = %secret_name, error = %msg, "{subject} unusable; keeping the previous {kept}");
        let previous = c.secrets.get(&ObjectRef::new(&s.tls_name()).within(ns));
        previous
            .as_ref()
            .and_then(|p| p.data.as_ref()?.get(&self.file))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    }
}

/// A Warning event `InvalidSecret` on a Secret that exists but cannot be used.
fn warn_invalid(warnings: &mut Vec<Warning>, secret: Option<&Secret>, name: &str, note: String) {
    if let Some(sec) = secret {
        warnings.push(Warning {
            key: format!("secret/{name}"),
            reference: sec.object_ref(&()),
            reason: "InvalidSecret",
            note,
        });
    }
}
