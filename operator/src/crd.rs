//! The custom resources (tunnelgate.io/v1alpha1): the namespaced `TunnelPolicy` and the
//! cluster-scoped `ClusterTunnelPolicy` of platform admins; spec, status, and the schema and CEL
//! rules that reject bad input at admission where the API server can.
#![allow(unreachable_pub, reason = "the KubeSchema derive wraps these types; the lint misreads them as unreachable")]
#![allow(clippy::duplicated_attributes, reason = "repeated printcolumn(...) arguments are distinct columns")]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::{json_schema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// Host names: exact, or `*.` followed by a name; ASCII (punycode), at most 253 octets.
pub const HOST_PATTERN: &str =
    r"^(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$";

/// A port number 1-65535 (the structural schema cannot compare the two ends of a range; the operator
/// rejects `"9000-8000"` in status).
const PORT_NUMBER: &str = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])";

// Every list and string in the schema is bounded: the API server estimates each CEL rule's worst case from
// the `maxItems`/`maxLength` around it and refuses the CRD when a bound is missing (operator/tests/crd.rs
// checks this).
/// Most destinations in one policy.
pub const MAX_DESTINATIONS: u32 = 64;
/// Most hosts in one destination.
pub const MAX_HOSTS: u32 = 256;
/// Most CIDRs in one destination (each is checked by a CEL rule, so fewer than hosts).
pub const MAX_CIDRS: u32 = 64;
/// Most ports in one destination.
pub const MAX_PORTS: u32 = 64;

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
    printcolumn(name = "Loaded", type_ = "string", json_path = ".status.loaded"),
    printcolumn(name = "Accepted", type_ = "string", json_path = ".status.conditions[?(@.type==\"Accepted\")].status"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct TunnelPolicySpec {
    /// Pods of this namespace the policy applies to; `{}` selects every pod in the namespace.
    #[schemars(schema_with = "label_selector_schema")]
    pub pod_selector: LabelSelector,
    /// `Allow` or `Deny`. A matching Deny always wins over an Allow.
    pub action: PolicyAction,
    /// Where the selected pods may (or may not) connect.
    #[schemars(length(min = 1, max = MAX_DESTINATIONS))]
    pub destinations: Vec<Destination>,
    /// Per-tunnel limits for tunnels this policy allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelaySpec>,
    /// `Enforce` (default) or `DryRun`: a DryRun policy refuses and allows nothing; the proxies
    /// count what it would have changed (`tunnelgate_policy_dry_run_total{rule,verdict}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
}

/// Whether a policy's rules decide, or only report what they would decide.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Enforcement {
    #[default]
    Enforce,
    DryRun,
}

/// The priority of a ClusterTunnelPolicy that does not set one: the weakest.
pub const DEFAULT_PRIORITY: u32 = 1000;

/// Egress bounds a platform admin sets for the pods of the namespaces it selects: a cluster Deny
/// beats every TunnelPolicy Allow; a cluster Allow is a default that a TunnelPolicy Deny can
/// narrow; among cluster policies the lowest `priority` decides, a Deny winning a tie. Only
/// cluster policies open private, loopback, link-local and metadata space, or grant it to
/// namespaces (`delegate: true`).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tunnelgate.io",
    version = "v1alpha1",
    kind = "ClusterTunnelPolicy",
    plural = "clustertunnelpolicies",
    shortname = "ctp",
    status = "TunnelPolicyStatus",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Delegate", type_ = "boolean", json_path = ".spec.delegate"),
    printcolumn(name = "Destinations", type_ = "string", json_path = ".status.destinations"),
    printcolumn(name = "Pods", type_ = "integer", json_path = ".status.matchedPods"),
    printcolumn(name = "Loaded", type_ = "string", json_path = ".status.loaded"),
    printcolumn(name = "Accepted", type_ = "string", json_path = ".status.conditions[?(@.type==\"Accepted\")].status"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterTunnelPolicySpec {
    /// Namespaces the policy applies to, by their labels (`kubernetes.io/metadata.name` holds the
    /// name); `{}` selects every namespace.
    #[schemars(schema_with = "namespace_selector_schema")]
    pub namespace_selector: LabelSelector,
    /// Pods of those namespaces; omitted or `{}` selects every pod.
    #[serde(default)]
    #[schemars(schema_with = "label_selector_schema")]
    pub pod_selector: LabelSelector,
    /// `Allow` or `Deny`.
    pub action: PolicyAction,
    /// 0 to 1000; the lowest number that matches decides among cluster policies (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: Option<u32>,
    /// With `Allow` (a Deny that delegates is refused in status): enforce nothing itself, but let the TunnelPolicies of the selected namespaces
    /// open the private, loopback, link-local or metadata space inside these destinations' CIDRs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate: Option<bool>,
    /// Where the selected pods may (or may not) connect.
    #[schemars(length(min = 1, max = MAX_DESTINATIONS))]
    pub destinations: Vec<Destination>,
    /// Per-tunnel limits for tunnels this policy allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelaySpec>,
    /// `Enforce` (default) or `DryRun` (see TunnelPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// With `Allow`: how the traffic it allows leaves: `direct`, or a parent proxy or group the
    /// release's base configuration defines. Omitted: the base's `policy.defaultRoute`. Only
    /// cluster policies choose a route; TunnelPolicies take the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9-]+$"))]
    pub route: Option<String>,
}

impl ClusterTunnelPolicySpec {
    /// The parts a TunnelPolicy also has, for the shared validation.
    pub fn as_namespaced(&self) -> TunnelPolicySpec {
        TunnelPolicySpec {
            pod_selector: self.pod_selector.clone(),
            action: self.action,
            destinations: self.destinations.clone(),
            relay: self.relay.clone(),
            enforcement: self.enforcement,
        }
    }
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
    #[schemars(length(min = 1, max = MAX_HOSTS), inner(regex(pattern = HOST_PATTERN), length(max = 253)))]
    pub hosts: Option<Vec<String>>,
    /// Target address ranges (`203.0.113.0/24`) or single addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "cidrs_schema")]
    pub cidrs: Option<Vec<String>>,
    /// Ports (`443`) or ranges (`"8000-8099"`); omitted means any port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "ports_schema")]
    pub ports: Option<Vec<IntOrString>>,
}

/// Per-tunnel limits; each field overrides the proxy default.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RelaySpec {
    /// Close after this long without traffic (`60s`, `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"), length(max = 32))]
    pub idle_timeout: Option<String>,
    /// Close this long after the tunnel was established.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"), length(max = 32))]
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
    /// Proxies of the release that have loaded a configuration carrying this policy's current
    /// rules, out of all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxies: Option<ProxyCount>,
    /// `loaded/total` of `proxies`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded: Option<String>,
    /// For `enforcement: DryRun`: what its rules would have changed, summed over the proxies
    /// (each proxy counts since it started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<DryRunCounts>,
    /// `Accepted` (the spec is valid) and `Ready` (its rules are in the configuration in force).
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// A dry-run policy's verdicts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DryRunCounts {
    pub would_deny: i64,
    pub would_allow: i64,
    /// When the operator started counting this policy's dry run (counts are those of the running
    /// proxies, each since it loaded the policy's rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// How many proxies enforce a policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProxyCount {
    pub loaded: i32,
    pub total: i32,
}

/// CIDRs: one CEL rule per entry, so its cost is bounded by the entry's own `maxLength` (43: the longest
/// IPv6 CIDR) and the error names the entry. `isCIDR`/`isIP` need Kubernetes 1.31 or later.
fn cidrs_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Target address ranges (`203.0.113.0/24`) or single addresses.",
        "type": "array",
        "nullable": true,
        "minItems": 1,
        "maxItems": MAX_CIDRS,
        "items": {
            "type": "string",
            "maxLength": 43,
            "x-kubernetes-validations": [{
                "rule": "isCIDR(self) || isIP(self)",
                "message": "must be a CIDR (203.0.113.0/24) or an IP address"
            }]
        }
    })
}

/// Ports: integers 1-65535 or `"lo-hi"` strings, said by the structural schema alone (no CEL): `minimum`
/// and `maximum` apply to integers, `pattern` and `maxLength` to strings (the API server's validator
/// applies each keyword to the values of its own type, as for `resource.Quantity` fields, whose
/// `pattern` sits beside `x-kubernetes-int-or-string` in every generated CRD).
fn ports_schema(_: &mut SchemaGenerator) -> Schema {
    let pattern = format!("^{PORT_NUMBER}(-{PORT_NUMBER})?$");
    json_schema!({
        "description": "Ports (`443`) or ranges (`\"8000-8099\"`); omitted means any port.",
        "type": "array",
        "nullable": true,
        "minItems": 1,
        "maxItems": MAX_PORTS,
        "items": {
            "x-kubernetes-int-or-string": true,
            "minimum": 1,
            "maximum": 65535,
            "maxLength": 11,
            "pattern": pattern
        }
    })
}

/// `metav1.LabelSelector` with every list and string bounded (the upstream schema has no bounds):
/// label values are at most 63 characters, keys at most 253 + "/" + 63.
fn label_selector_schema(g: &mut SchemaGenerator) -> Schema {
    selector_schema(g, "Pods of this namespace the policy applies to; `{}` selects every pod in the namespace.")
}

fn namespace_selector_schema(g: &mut SchemaGenerator) -> Schema {
    selector_schema(g, "Namespaces the policy applies to, by their labels; `{}` selects every namespace.")
}

fn selector_schema(_: &mut SchemaGenerator, description: &str) -> Schema {
    json_schema!({
        "description": description,
        "type": "object",
        "properties": {
            "matchLabels": {
                "description": "Labels a pod must all have, as key: value.",
                "type": "object",
                "maxProperties": 64,
                "additionalProperties": {"type": "string", "maxLength": 63}
            },
            "matchExpressions": {
                "description": "Label requirements a pod must all meet.",
                "type": "array",
                "maxItems": 32,
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {"type": "string", "minLength": 1, "maxLength": 317},
                        "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                        "values": {
                            "type": "array",
                            "maxItems": 64,
                            "items": {"type": "string", "maxLength": 63}
                        }
                    }
                }
            }
        }
    })
}
