//! `kubectl tunnelgate`: offline `check` of policy manifests with the operator's own validation,
//! `explain` of one pod's request against the configuration the proxies enforce (decided by
//! `proxy-config`'s policy, never a second implementation), and `status` of the rollout.

use std::fmt::Write as _;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{Api, Client};
use proxy_config::decide::{OwnEndpoints, Request, Verdict};
use proxy_config::{Authority, Host, ProxyConfig};
use serde::Deserialize;

use crate::crd::{ClusterTunnelPolicy, ClusterTunnelPolicySpec, TunnelPolicy, TunnelPolicySpec};
use crate::lenient::{Lenient, Unreadable};
use crate::validate::{validate, validate_cluster};

/// How long `status` waits for one proxy's `/config` through the API server's pod proxy.
const PROXY_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Exit code for invalid input (as `tunnelgate-proxy check`).
pub const EXIT_INVALID: i32 = 64;

/// Validates every TunnelPolicy and ClusterTunnelPolicy in the YAML `docs` (named `source`);
/// returns the exit code and the report (one line per error, with the field path).
pub fn check(source: &str, docs: &str) -> (i32, String) {
    let mut out = String::new();
    let mut errors = 0;
    let mut seen = 0;
    for (i, doc) in serde_yaml::Deserializer::from_str(docs).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) if v.is_null() => continue,
            Ok(v) => v,
            Err(e) => {
                errors += 1;
                let _ = writeln!(out, "{source}: document {}: invalid YAML: {e}", i + 1);
                break;
            }
        };
        let kind = value.get("kind").and_then(serde_yaml::Value::as_str).unwrap_or_default().to_owned();
        let name = value.get("metadata").and_then(|m| m.get("name")).and_then(serde_yaml::Value::as_str);
        let label = format!("{source}: {kind}/{}", name.unwrap_or("?"));
        let spec = value.get("spec").cloned().unwrap_or_default();
        let result = match kind.as_str() {
            "TunnelPolicy" => serde_yaml::from_value::<TunnelPolicySpec>(spec)
                .map_err(|e| vec![format!("spec: {e}")])
                .and_then(|s| validate(&s).map(|_| ()).map_err(|e| e.iter().map(ToString::to_string).collect())),
            "ClusterTunnelPolicy" => serde_yaml::from_value::<ClusterTunnelPolicySpec>(spec)
                .map_err(|e| vec![format!("spec: {e}")])
                .and_then(|s| {
                    validate_cluster(&s).map(|_| ()).map_err(|e| e.iter().map(ToString::to_string).collect())
                }),
            _ => continue,
        };
        seen += 1;
        match result {
            Ok(()) => {
                let _ = writeln!(out, "{label}: valid");
            }
            Err(errs) => {
                errors += errs.len();
                for e in errs {
                    let _ = writeln!(out, "{label}: {e}");
                }
            }
        }
    }
    if seen == 0 && errors == 0 {
        let _ = writeln!(out, "{source}: no TunnelPolicy or ClusterTunnelPolicy found");
        return (EXIT_INVALID, out);
    }
    (if errors > 0 { EXIT_INVALID } else { 0 }, out)
}

/// Where the release lives.
#[derive(Debug, Clone)]
pub struct Release {
    pub namespace: String,
    /// The Helm release name (the pods' `app.kubernetes.io/instance` label).
    pub name: String,
    /// The chart's `fullnameOverride`, when the release was installed with one.
    pub fullname_override: Option<String>,
}

impl Release {
    /// The prefix of the release's object names, as the chart computes it: the release name when
    /// it contains "tunnelgate", else `<release>-tunnelgate`, at most 40 characters.
    pub fn object_prefix(&self) -> String {
        let full = match &self.fullname_override {
            Some(o) if !o.is_empty() => o.clone(),
            _ if self.name.contains("tunnelgate") => self.name.clone(),
            _ => format!("{}-tunnelgate", self.name),
        };
        full.chars().take(40).collect::<String>().trim_end_matches('-').to_owned()
    }

    /// The label selector of the release's proxy pods.
    pub fn proxy_selector(&self) -> String {
        format!("app.kubernetes.io/instance={},app.kubernetes.io/component=proxy", self.name)
    }

    /// The Secret holding the token the proxies' `/config` requires (key `token`).
    pub fn admin_token_secret(&self) -> String {
        format!("{}-admin-token", self.object_prefix())
    }
}

/// The admin token of `release`, read from its Secret; `None` when the release has none (its
/// proxies' `/config` is then open).
async fn admin_token(client: &Client, release: &Release) -> Result<Option<String>, PluginError> {
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &release.namespace);
    let name = release.admin_token_secret();
    let secret = secrets.get_opt(&name).await.map_err(|e| match e {
        kube::Error::Api(ref a) if a.code == 403 => PluginError::Usage(format!(
            "cannot read the Secret {}/{name} with the proxies' admin token: bind the Role <release>-inspector in the release namespace",
            release.namespace
        )),
        e => PluginError::Api(e),
    })?;
    let token = secret
        .and_then(|s| s.data)
        .and_then(|d| d.get("token").map(|b| String::from_utf8_lossy(&b.0).trim().to_owned()));
    Ok(token)
}

/// Why a cluster command could not answer.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{0}")]
    Usage(String),
    #[error("Kubernetes API")]
    Api(#[from] kube::Error),
    #[error("the rendered configuration {0} cannot be read: {1}")]
    Config(String, String),
}

/// How to print an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

impl std::str::FromStr for Output {
    type Err = String;
    fn from_str(s: &str) -> Result<Output, String> {
        match s {
            "table" | "" => Ok(Output::Table),
            "json" => Ok(Output::Json),
            "yaml" => Ok(Output::Yaml),
            other => Err(format!("unknown output {other:?}: table, json or yaml")),
        }
    }
}

fn render<T: serde::Serialize>(output: Output, value: &T, table: impl FnOnce(&T) -> String) -> String {
    match output {
        Output::Table => table(value),
        Output::Json => serde_json::to_string_pretty(value).map(|s| s + "\n").unwrap_or_default(),
        Output::Yaml => serde_yaml::to_string(value).unwrap_or_default(),
    }
}

/// What `explain` found.
#[derive(Debug, Clone, serde::Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub pod: String,
    pub client: String,
    pub target: String,
    /// `allow`, `deny` or `needs-resolution`.
    pub decision: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<String>,
    /// How allowed traffic leaves: `direct`, or the parent proxy or group it goes through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Whether DNS was needed (false: decided by the name alone).
    pub resolved: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded: Option<String>,
    /// The ConfigMap decided against (`namespace/name`): the pod's node's document, or the whole.
    pub config: String,
    /// The ports of the pod's TCP that its node redirects to the proxy (empty: the pod is not
    /// intercepted transparently, only what it sends through its proxy settings is decided).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub intercepted_ports: Vec<u16>,
}

impl Explanation {
    fn table(&self) -> String {
        let mut out = format!("client: pod {} ({})\ntarget: {}\n", self.pod, self.client, self.target);
        match self.decision.as_str() {
            "allow" => {
                let _ = writeln!(out, "decision: allow\nrule: {}", self.rule.as_deref().unwrap_or("default"));
                let _ = writeln!(
                    out,
                    "limits: idleTimeout={} maxLifetime={}",
                    self.idle_timeout.as_deref().unwrap_or("-"),
                    self.max_lifetime.as_deref().unwrap_or("-")
                );
                if let Some(route) = &self.route {
                    let _ = writeln!(out, "route: {route}");
                }
            }
            "deny" => {
                let _ = writeln!(
                    out,
                    "decision: deny (403)\nrule: {}\nreason: {}",
                    self.rule.as_deref().unwrap_or("default"),
                    self.reason.as_deref().unwrap_or("")
                );
            }
            _ => {
                let _ = writeln!(out, "decision: needs resolution (pass --resolve IP for each address the name has)");
            }
        }
        if !self.resolved && self.decision == "deny" {
            let _ = writeln!(out, "resolved: no (decided by name)");
        }
        if let Some(d) = &self.dry_run {
            let _ = writeln!(out, "dry run: {d}");
        }
        if let Some(l) = &self.loaded {
            let _ = writeln!(out, "loaded on: {l} proxies");
        }
        if !self.intercepted_ports.is_empty() {
            let ports: Vec<String> = self.intercepted_ports.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "intercepted transparently: TCP {} leaving the cluster goes to the node's proxy, with no proxy settings",
                ports.join(", ")
            );
        }
        let _ = writeln!(out, "config: {}", self.config);
        out
    }
}

/// What `explain` is asked: a request from `namespace/pod` (as `user`, when given) to `target`,
/// whose name resolves to `resolve` (empty: decide by the name alone, or say it must resolve).
#[derive(Debug, Clone, Copy)]
pub struct ExplainQuery<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    pub target: &'a str,
    pub resolve: &'a [IpAddr],
    pub user: Option<&'a str>,
}

/// The decision for a request from `namespace/pod` to `target`, against the configuration the
/// proxy of the pod's node is told to enforce (its node's document when the operator renders per
/// node, else `<release>-proxy`), and how far the deciding policy has rolled out.
pub async fn explain(
    client: &Client,
    release: &Release,
    q: &ExplainQuery<'_>,
    output: Output,
) -> Result<(i32, String), PluginError> {
    let ExplainQuery { namespace, pod, target, resolve, user } = *q;
    let p = find_pod(client, namespace, pod).await?;
    let pod_name = p.metadata.name.clone().unwrap_or_default();
    let ip: IpAddr = p
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| PluginError::Usage(format!("pod {namespace}/{pod_name} has no IP (not running?)")))?;
    let auth: Authority =
        proxy_config::host::parse_target(target).map_err(|e| PluginError::Usage(format!("target {target:?}: {e}")))?;
    // With per-node documents, the pod's node's proxy enforces its node's document.
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &release.namespace);
    let whole = format!("{}-proxy", release.object_prefix());
    let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
    let own = match &node {
        Some(n) => {
            let name = proxy_config::status::node_document_name(&whole, n);
            cms.get_opt(&name).await?.map(|cm| (name, cm))
        }
        None => None,
    };
    let (cm_name, cm) = match own {
        Some(found) => found,
        None => (whole.clone(), cms.get(&whole).await?),
    };
    let text = cm.data.and_then(|mut d| d.remove(proxy_config::status::CONFIG_KEY)).unwrap_or_default();
    let cfg = ProxyConfig::from_yaml(&text)
        .map_err(|e| PluginError::Config(format!("{}/{cm_name}", release.namespace), e.to_string()))?;
    let proxies = proxy_addresses(client, release).await?;
    let mut e = Explanation {
        config: format!("{}/{cm_name}", release.namespace),
        pod: format!("{namespace}/{pod_name}"),
        client: ip.to_string(),
        target: auth.to_string(),
        ..Default::default()
    };
    let code = judge(&cfg, &proxies, &Request { client: ip, user, target: &auth }, resolve, &mut e);
    // The deciding policy's rollout, from its status.
    if let Some(rule) = &e.rule {
        e.loaded = rollout_of(client, rule).await?;
    }
    Ok((code, render(output, &e, Explanation::table)))
}

/// Fills in `e` with the decision the proxies would make for `request` under `cfg` (through the
/// pipeline the proxy runs, with `resolved` standing in for DNS and `proxies` for the proxies'
/// own addresses); returns the exit code (0 allow, 1 deny, 2 needs resolution).
pub fn judge(
    cfg: &ProxyConfig,
    proxies: &[IpAddr],
    request: &Request<'_>,
    resolved: &[IpAddr],
    e: &mut Explanation,
) -> i32 {
    if let Some(r) = cfg.redirect.as_ref().filter(|r| r.enrolled.contains(&request.client)) {
        e.intercepted_ports.clone_from(&r.ports);
    }
    let own = OwnEndpoints::of(cfg, proxies.to_vec());
    let Ok(j) = request.judge_given(&cfg.policy, resolved, |ip, port| own.contains(ip, port)) else {
        e.decision = "needs-resolution".into();
        return 2;
    };
    e.resolved = !j.by_name;
    e.rule = Some(j.verdict.rule_name(&cfg.policy).to_owned());
    e.dry_run = j.dry_run.map(|v| format!("rule {} {}", v.rule(), v.as_str().replace('_', " ")));
    match j.verdict {
        Verdict::Allow { limits, rule } => {
            e.decision = "allow".into();
            e.route = Some(cfg.parents.describe(cfg.policy.route_of(rule)));
            e.idle_timeout = Some(humantime::format_duration(limits.idle_timeout).to_string());
            e.max_lifetime = Some(humantime::format_duration(limits.max_lifetime).to_string());
            0
        }
        Verdict::Deny { reason, .. } => {
            e.decision = "deny".into();
            e.reason = Some(reason.as_str().to_owned());
            1
        }
        Verdict::SelfConnect => {
            e.decision = "deny".into();
            e.reason = Some("self".into());
            1
        }
    }
}

/// The addresses of the release's proxies: their pods' IPs, and their nodes' for host-network pods.
async fn proxy_addresses(client: &Client, release: &Release) -> Result<Vec<IpAddr>, PluginError> {
    let pods = Api::<Pod>::namespaced(client.clone(), &release.namespace);
    let selector = release.proxy_selector();
    let mut out = Vec::new();
    for p in pods.list(&kube::api::ListParams::default().labels(&selector)).await?.items {
        let Some(st) = p.status else { continue };
        out.extend(st.pod_ips.iter().flatten().filter_map(|i| i.ip.parse::<IpAddr>().ok()));
        out.extend(st.pod_ip.iter().filter_map(|i| i.parse::<IpAddr>().ok()));
        out.extend(st.host_ip.iter().filter_map(|i| i.parse::<IpAddr>().ok()));
    }
    Ok(out)
}

/// The pod a workload reference names: `pod/NAME` or `NAME`, `deploy/NAME` (a running pod of the
/// Deployment: its pods share labels, so policies treat them alike), or `-l key=value` (a running
/// pod the selector matches).
async fn find_pod(client: &Client, namespace: &str, reference: &str) -> Result<Pod, PluginError> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let selector = if let Some(sel) = reference.strip_prefix("-l=").or_else(|| reference.strip_prefix("selector=")) {
        sel.to_owned()
    } else if let Some(name) = reference.strip_prefix("deploy/").or_else(|| reference.strip_prefix("deployment/")) {
        let d = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), namespace).get(name).await?;
        let labels = d.spec.selector.match_labels.unwrap_or_default();
        if labels.is_empty() {
            return Err(PluginError::Usage(format!("deployment {namespace}/{name} has no matchLabels selector")));
        }
        labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    } else {
        return Ok(pods.get(reference.strip_prefix("pod/").unwrap_or(reference)).await?);
    };
    let list = pods.list(&kube::api::ListParams::default().labels(&selector)).await?;
    list.items
        .into_iter()
        .find(|p| p.status.as_ref().is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some()))
        .ok_or_else(|| PluginError::Usage(format!("no running pod in {namespace} matches {reference}")))
}

/// The addresses `target` (`host:port`) resolves to with this machine's resolver (empty for an IP
/// literal, which needs none).
pub async fn resolve_here(target: &str) -> Result<Vec<IpAddr>, String> {
    let auth = proxy_config::host::parse_target(target).map_err(|e| format!("target {target:?}: {e}"))?;
    match &auth.host {
        Host::Ip(_) => Ok(Vec::new()),
        Host::Name(name) => {
            let addrs = tokio::net::lookup_host((name.as_str(), auth.port))
                .await
                .map_err(|e| format!("cannot resolve {name} here: {e}"))?;
            let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            ips.sort();
            ips.dedup();
            Ok(ips)
        }
    }
}

/// `loaded/total` of the policy behind a rendered rule name (`ns/name[/i]`, `cluster:name[/i]`).
async fn rollout_of(client: &Client, rule: &str) -> Result<Option<String>, PluginError> {
    use proxy_config::origin::PolicyId;
    let status = match PolicyId::of_rule(rule) {
        Some(PolicyId::Cluster { name }) => {
            let p = Api::<Lenient<ClusterTunnelPolicy>>::all(client.clone()).get_opt(&name).await?;
            p.and_then(|p| p.read.ok()).and_then(|p| p.status.clone())
        }
        Some(PolicyId::Namespaced { namespace, name }) => {
            let p = Api::<Lenient<TunnelPolicy>>::namespaced(client.clone(), &namespace).get_opt(&name).await?;
            p.and_then(|p| p.read.ok()).and_then(|p| p.status.clone())
        }
        None => return Ok(None),
    };
    Ok(status.and_then(|s| s.loaded))
}

/// What `status` found.
#[derive(Debug, Clone, serde::Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    pub proxies: Vec<ProxyStatus>,
    /// Policies whose rules are not on every proxy yet: `ns/name` or `cluster:name`, and why.
    pub not_enforced: Vec<NotEnforced>,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub pod: String,
    pub node: String,
    pub render: Option<u64>,
    /// `ok`, `failed (<reason>)` or `unreachable`.
    pub last_reload: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NotEnforced {
    pub policy: String,
    pub reason: String,
}

impl RolloutStatus {
    fn table(&self) -> String {
        let mut out = format!("{:<40} {:<24} {:>7}  LAST RELOAD\n", "PROXY", "NODE", "RENDER");
        for p in &self.proxies {
            let render = p.render.map_or("-".to_owned(), |n| n.to_string());
            let _ = writeln!(out, "{:<40} {:<24} {render:>7}  {}", p.pod, p.node, p.last_reload);
        }
        if self.not_enforced.is_empty() {
            let _ = writeln!(out, "\nevery policy with rules is loaded on every proxy");
        } else {
            let _ = writeln!(out, "\nnot yet enforced everywhere:");
            for n in &self.not_enforced {
                let _ = writeln!(out, "  {}: {}", n.policy, n.reason);
            }
        }
        out
    }
}

/// Proxies of the release with the render they report (through the API server's pod proxy), and
/// the policies whose rules are not yet on every proxy.
pub async fn status(
    client: &Client,
    release: &Release,
    admin_port: u16,
    output: Output,
) -> Result<(i32, String), PluginError> {
    let pods = Api::<Pod>::namespaced(client.clone(), &release.namespace);
    let selector = release.proxy_selector();
    let proxies = pods.list(&kube::api::ListParams::default().labels(&selector)).await?;
    let token = admin_token(client, release).await?;
    let mut st = RolloutStatus::default();
    for p in &proxies.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        let mut req = http::Request::get(format!(
            "/api/v1/namespaces/{}/pods/{name}:{admin_port}/proxy/config",
            release.namespace
        ));
        if let Some(t) = &token {
            req = req.header(proxy_config::ADMIN_TOKEN_HEADER, t);
        }
        let req = req.body(Vec::new()).map_err(|e| PluginError::Usage(e.to_string()))?;
        // A proxy whose admin port accepts and never answers is reported, not waited for.
        let answer = tokio::time::timeout(PROXY_ANSWER_TIMEOUT, client.request_text(req)).await;
        let (render, last_reload) = match answer {
            Ok(Ok(body)) => match serde_json::from_str::<proxy_config::status::ConfigStatus>(&body) {
                Ok(st) => (st.render, st.last_reload.reason.map_or("ok".to_owned(), |r| format!("failed ({r})"))),
                Err(_) => (None, "not a proxy's status".to_owned()),
            },
            Ok(Err(_)) | Err(_) => (None, "unreachable".to_owned()),
        };
        st.proxies.push(ProxyStatus { pod: name, node, render, last_reload });
    }
    // Read leniently: one policy this version cannot read is listed, not fatal.
    for p in Api::<Lenient<TunnelPolicy>>::all(client.clone()).list(&Default::default()).await?.items {
        let m = p.meta_data();
        let policy =
            format!("{}/{}", m.namespace.as_deref().unwrap_or_default(), m.name.as_deref().unwrap_or_default());
        if let Some(reason) = unreadable_or_not_enforced(&p.read) {
            st.not_enforced.push(NotEnforced { policy, reason });
        }
    }
    for p in Api::<Lenient<ClusterTunnelPolicy>>::all(client.clone()).list(&Default::default()).await?.items {
        let policy = format!("cluster:{}", p.meta_data().name.as_deref().unwrap_or_default());
        if let Some(reason) = unreadable_or_not_enforced(&p.read) {
            st.not_enforced.push(NotEnforced { policy, reason });
        }
    }
    let code = i32::from(!st.not_enforced.is_empty());
    Ok((code, render(output, &st, RolloutStatus::table)))
}

fn unreadable_or_not_enforced<K: HasStatus>(read: &Result<std::sync::Arc<K>, Unreadable>) -> Option<String> {
    match read {
        Ok(p) => not_enforced(p.policy_status()),
        Err(why) => Some(format!("Unreadable: {}: {}", why.path, why.message)),
    }
}

/// Both policy kinds share one status type.
trait HasStatus {
    fn policy_status(&self) -> Option<&crate::crd::TunnelPolicyStatus>;
}

impl HasStatus for TunnelPolicy {
    fn policy_status(&self) -> Option<&crate::crd::TunnelPolicyStatus> {
        self.status.as_ref()
    }
}

impl HasStatus for ClusterTunnelPolicy {
    fn policy_status(&self) -> Option<&crate::crd::TunnelPolicyStatus> {
        self.status.as_ref()
    }
}

fn not_enforced(status: Option<&crate::crd::TunnelPolicyStatus>) -> Option<String> {
    let c = status?.conditions.iter().find(|c| c.type_ == "Enforced")?;
    (c.status != "True").then(|| format!("{} ({})", c.reason, c.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(path: &str) -> String {
        std::fs::read_to_string(format!("{}/../examples/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap_or_default()
    }

    #[test]
    fn object_names_follow_the_chart() {
        let r = |name: &str, o: Option<&str>| {
            Release { namespace: "ns".into(), name: name.into(), fullname_override: o.map(str::to_owned) }
                .object_prefix()
        };
        assert_eq!(r("tunnelgate", None), "tunnelgate");
        assert_eq!(r("tunnelgate-gw", None), "tunnelgate-gw");
        assert_eq!(r("tg", None), "tg-tunnelgate");
        assert_eq!(r("tg", Some("egress")), "egress");
        assert_eq!(r(&"x".repeat(45), None), "x".repeat(40));
    }

    #[test]
    fn check_reports_every_error_with_its_path_and_exit_64() {
        let (code, out) = check("guardrails.yaml", &example("clustertunnelpolicies/valid/tenant-guardrails.yaml"));
        assert_eq!(code, 0, "{out}");
        assert_eq!(out.matches(": valid").count(), 3, "{out}");
        let (code, out) = check("priority.yaml", &example("clustertunnelpolicies/invalid/priority-out-of-range.yaml"));
        assert_eq!(code, EXIT_INVALID);
        assert!(out.contains("priority.yaml: ClusterTunnelPolicy/too-important: spec.priority"), "{out}");
        let two = "kind: TunnelPolicy\nmetadata: {name: a}\nspec: {podSelector: {}, action: Allow, destinations: [{hosts: ['a.*.test', ok.test], ports: [0]}]}\n---\nkind: ConfigMap\n";
        let (code, out) = check("p.yaml", two);
        assert_eq!(code, EXIT_INVALID);
        assert!(out.contains("p.yaml: TunnelPolicy/a: spec.destinations[0].hosts[0]"), "{out}");
        assert!(out.contains("spec.destinations[0].ports[0]"), "every error, not just the first: {out}");
        assert_eq!(check("x.yaml", "kind: ConfigMap\n").0, EXIT_INVALID, "nothing to check is an error");
        assert_eq!(check("x.yaml", "kind: [").0, EXIT_INVALID);
    }

    #[tokio::test]
    async fn resolve_here_uses_this_machines_resolver() {
        let ips = resolve_here("localhost:80").await.unwrap();
        assert!(ips.iter().all(|ip| ip.is_loopback()) && !ips.is_empty(), "{ips:?}");
        assert!(resolve_here("127.0.0.1:80").await.unwrap().is_empty(), "a literal needs no resolution");
        assert!(resolve_here("no port").await.is_err());
    }
}

#[cfg(test)]
mod self_tests {
    use super::*;

    #[test]
    fn explain_says_when_a_pod_is_intercepted_transparently() {
        let cfg = ProxyConfig::from_yaml(
            "version: 1\nlisteners: [{name: t, bind: '0.0.0.0:15001', mode: transparent}]\n\
             redirect: {listener: t, enrolled: [10.244.1.5]}\n",
        )
        .unwrap();
        let target: Authority = "example.com:443".parse().unwrap();
        let explain = |client: &str| {
            let mut e = Explanation::default();
            let request = Request { client: client.parse().unwrap(), user: None, target: &target };
            judge(&cfg, &[], &request, &[], &mut e);
            e
        };
        let enrolled = explain("10.244.1.5");
        assert_eq!(enrolled.intercepted_ports, [80, 443]);
        assert!(enrolled.table().contains("intercepted transparently: TCP 80, 443"), "{}", enrolled.table());
        assert!(explain("10.244.1.6").intercepted_ports.is_empty());
        assert!(!explain("10.244.1.6").table().contains("intercepted"));
    }

    #[test]
    fn explain_prints_the_route_the_deciding_rule_takes() {
        let cfg = ProxyConfig::from_yaml(
            "version: 1\nlisteners: [{name: forward, bind: '0.0.0.0:3128'}]\n\
             parents: [{name: corp, address: 'proxy.corp.example:3128'}]\n\
             policy:\n  defaultRoute: corp\n  rules:\n  - {name: intranet, action: allow, hosts: [wiki.corp.example], route: direct}\n  - {name: rest, action: allow, hosts: ['*.example']}\n",
        )
        .unwrap();
        let route = |target: &str| {
            let target: Authority = target.parse().unwrap();
            let mut e = Explanation::default();
            let request = Request { client: "10.244.2.2".parse().unwrap(), user: None, target: &target };
            judge(&cfg, &[], &request, &["140.82.112.5".parse().unwrap()], &mut e);
            (e.route.clone().unwrap_or_default(), e.table())
        };
        assert_eq!(route("wiki.corp.example:443").0, "direct");
        let (r, table) = route("www.example:443");
        assert_eq!(r, "parent corp at proxy.corp.example:3128 (names the target by address)");
        assert!(table.contains("route: parent corp"), "{table}");
    }

    #[test]
    fn a_target_on_a_proxys_own_endpoint_is_refused_as_the_proxy_refuses_it() {
        let cfg = ProxyConfig::from_yaml(
            "version: 1\nlisteners: [{name: forward, bind: '0.0.0.0:3128'}]\nadmin: {bind: '0.0.0.0:9090'}\n\
             policy:\n  rules:\n  - {name: all, action: allow, cidrs: [10.244.0.0/16, 192.0.2.0/24, 0.0.0.0/32]}\n",
        )
        .unwrap();
        let proxies: Vec<IpAddr> = vec!["10.244.1.5".parse().unwrap(), "192.0.2.10".parse().unwrap()];
        let at = |target: &str| {
            let target: Authority = target.parse().unwrap();
            let mut e = Explanation::default();
            let request = Request { client: "10.244.2.2".parse().unwrap(), user: None, target: &target };
            let code = judge(&cfg, &proxies, &request, &[], &mut e);
            (code, e.rule.unwrap_or_default())
        };
        let refused = (1, "self".to_owned());
        assert_eq!(at("10.244.1.5:3128"), refused);
        assert_eq!(at("10.244.1.5:9090"), refused);
        assert_eq!(at("192.0.2.10:3128"), refused);
        assert_eq!(at("0.0.0.0:443"), refused, "the unspecified address is the proxy on every port");
        assert_eq!(at("10.244.1.5:443"), (0, "all".to_owned()), "another port of the proxy's pod");
        assert_eq!(at("10.244.1.6:3128"), (0, "all".to_owned()), "another pod");
    }
}
