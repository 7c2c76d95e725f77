//! The document exactly as written: serde types that reject unknown fields. Values are still
//! text here; `config` turns them into types that cannot hold invalid values. They are also the
//! wire format the operator reads its base document with and renders (serializable, so it edits
//! typed values, never a map of strings); the few fields only the operator's base may carry
//! (`addressGrants`, a TLS listener's `secretName`, `auth.secretName`) are refused by the proxy.

use serde::{Deserialize, Serialize};

/// Whether a section is all defaults (left out when the operator writes a document).
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A Tunnelgate proxy configuration document (`tunnelgate-proxy --config`), version 1.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawConfig {
    /// Checked on the untyped document before deserializing.
    pub version: u32,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<RawAdmin>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub policy: RawPolicy,
    #[serde(default, skip_serializing_if = "is_default")]
    pub relay: RawRelay,
    #[serde(default, skip_serializing_if = "is_default")]
    pub dns: RawDns,
    #[serde(default, skip_serializing_if = "is_default")]
    pub limits: RawLimits,
    #[serde(default, skip_serializing_if = "is_default")]
    pub logging: RawLogging,
    #[serde(default, skip_serializing_if = "is_default")]
    pub http: RawHttp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<RawAuth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RawRedirect>,
    /// Upstream (parent) proxies that rules may route their traffic through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<RawParent>,
    /// Groups of parents tried in order (failover).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_groups: Vec<RawParentGroup>,
    /// The operator's base only: namespaces whose TunnelPolicies may open refused address space.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_grants: Option<Vec<RawAddressGrant>>,
}

/// A parent proxy as written (`parents[]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawParent {
    pub name: String,
    /// `host:port` of the parent.
    pub address: String,
    /// TLS to the parent (plain TCP without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawParentTls>,
    /// A file holding `user:password` for the parent's `Proxy-Authorization: Basic`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
    /// The operator's base only: the Secret holding the credentials (key `credentials`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// What the request to the parent names: `address` (the address the proxy checked) or `name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_target: Option<String>,
}

/// TLS to a parent as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawParentTls {
    /// PEM file of the CA certificates that sign the parent's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The operator's base only: the Secret holding the CA certificates (key `ca.crt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<String>,
    /// The name the parent's certificate must carry (default: the host of `address`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// A group of parents as written (`parentGroups[]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawParentGroup {
    pub name: String,
    /// Parent names, tried in this order.
    pub members: Vec<String>,
    /// How long a parent that failed is skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
}

/// An address grant of the operator's base document.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAddressGrant {
    pub namespaces: Vec<String>,
    pub cidrs: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAuth {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub htpasswd_file: Option<String>,
    /// The operator's base only: the Secret holding the htpasswd file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawListener {
    pub name: String,
    pub bind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawTls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_proxy_protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<RawListenerHttp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_proxy_protocol_from: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transparent: Option<RawTransparent>,
    /// A tunnel listener's way to its upstream: `direct` or a parent or group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

/// The node's redirect rules as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRedirect {
    pub listener: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    #[serde(default)]
    pub enrolled: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_ports: Option<String>,
    /// The operator's base only: the labels of the namespaces whose pods are enrolled (the
    /// operator renders their addresses into `enrolled`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enroll_namespaces: Option<std::collections::BTreeMap<String, String>>,
}

/// A transparent listener's settings as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTransparent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict_destination: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawListenerHttp {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_for: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawHttp {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_head_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_idle_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_idle_per_upstream: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_idle_upstreams: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTls {
    /// The operator's base only: the Secret holding the listener's certificate and key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificates: Option<Vec<RawCertPair>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict_sni: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<RawClientAuth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<RawAcme>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCertPair {
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawClientAuth {
    pub ca_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crl_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAcme {
    pub directory: String,
    pub domains: Vec<String>,
    #[serde(default)]
    pub contact: Vec<String>,
    pub cache_dir: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory_ca_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAdmin {
    pub bind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_token_file: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deny_private_addresses: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reevaluate_on_reload: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_networks: Option<Vec<String>>,
    /// How allowed traffic leaves when its rule names no route: `direct` or a parent or group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_route: Option<String>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

/// One rule as written (`policy.rules[]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRule {
    pub name: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidrs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<RawPort>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RawRuleRelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    /// How the traffic this rule allows leaves: `direct` or a parent or group name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

/// A port is written as a number (`443`) or a range string (`"8000-8099"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum RawPort {
    Number(i64),
    Text(String),
}

/// A rule's relay limits as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRuleRelay {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes_per_second: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_bytes_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRelay {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes_per_second: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_bytes_per_minute: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_total_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawDns {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negative_ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nameservers: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_client: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_head_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_head_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_handshake_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_delay: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_budget: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_burst: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawLogging {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_client_addresses: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_targets: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_users: Option<bool>,
}
