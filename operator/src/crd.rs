//! The `TunnelPolicy` custom resource (tunnelgate.io/v1alpha1): spec, status, and the schema and
//! CEL rules that reject bad input at admission where the API server can.
#![allow(unreachable_pub, reason = "the KubeSchema derive wraps these types; the lint misreads them as unreachable")]
#![allow(clippy::duplicated_attributes, reason = "repeated printcolumn(...) arguments are distinct columns")]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Host names: exact, or `*.` followed by a name; ASCII (punycode), at most 253 octets.
pub const HOST_PATTERN: &str =
    r"^(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$";

/// Egress that the pods selected in this namespace may (or may not) open through the proxy.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tunnelgate.io",
    version = "v1alpha1",
    kind = "TunnelPolicy",
    plural = "tunnelpolicies",
    shortname = "tp",
    namespaced,
    status = "TunnelPolicyStatus",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Destinations", type_ = "string", json_path = ".status.destinations"),
    printcolumn(name = "Pods", type_ = "integer", json_path = ".status.matchedPods"),
    printcolumn(name = "Accepted", type_ = "string", json_path = ".status.conditions[?(@.type==\"Accepted\")].status"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct TunnelPolicySpec {
    /// Pods of this namespace the policy applies to; `{}` selects every pod in the namespace.
    pub pod_selector: LabelSelector,
    /// `Allow` or `Deny`. A matching Deny always wins over an Allow.
    pub action: PolicyAction,
    /// Where the selected pods may (or may not) connect.
    #[x_kube(validation = kube::core::Rule::new("size(self) >= 1 && size(self) <= 64").message("between 1 and 64 destinations"))]
    pub destinations: Vec<Destination>,
    /// Per-tunnel limits for tunnels this policy allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelaySpec>,
}

/// What a policy does.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// A set of targets: host names and/or address ranges, on some ports.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.hosts) || has(self.cidrs)").message("a destination needs hosts or cidrs"))]
pub struct Destination {
    /// Exact names, or `*.example.com` for any name below example.com (not the apex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), inner(regex(pattern = HOST_PATTERN), length(max = 253)))]
    pub hosts: Option<Vec<String>>,
    /// Target address ranges (`203.0.113.0/24`) or single addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), inner(length(max = 43)))]
    #[x_kube(validation = kube::core::Rule::new("self.all(c, isCIDR(c) || isIP(c))").message("each entry must be a CIDR or an IP address"))]
    pub cidrs: Option<Vec<String>>,
    /// Ports (`443`) or ranges (`"8000-8099"`); omitted means any port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.all(p, type(p) == int ? (p >= 1 && p <= 65535) : p.matches('^[1-9][0-9]{0,4}(-[1-9][0-9]{0,4})?$'))"
    ).message("ports are 1-65535, or ranges like \"8000-8099\""))]
    pub ports: Option<Vec<IntOrString>>,
}

/// Per-tunnel limits; each field overrides the proxy default.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RelaySpec {
    /// Close after this long without traffic (`60s`, `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub idle_timeout: Option<String>,
    /// Close this long after the tunnel was established.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub max_lifetime: Option<String>,
    /// Rate cap per direction, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes_per_second: Option<u64>,
    /// Close when fewer bytes than this moved in a minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_bytes_per_minute: Option<u64>,
    /// Close after this many bytes in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_total_bytes: Option<u64>,
}

/// What the operator observed and did with a policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TunnelPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Running pods the selector matches (their IPs are the policy's clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_pods: Option<i32>,
    /// A one-line summary of the destinations, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destinations: Option<String>,
    /// `Accepted` (the spec is valid) and `Ready` (its rules are in the configuration in force).
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
