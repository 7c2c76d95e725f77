//! The document exactly as written: serde types that reject unknown fields. Values are still
//! text here; `config` turns them into types that cannot hold invalid values. The rule types are
//! also the wire format the operator renders (serializable, so it builds typed values).

use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawConfig {
    #[expect(dead_code, reason = "checked on the untyped document before deserializing")]
    pub(crate) version: u32,
    #[serde(default)]
    pub(crate) listeners: Vec<RawListener>,
    pub(crate) admin: Option<RawAdmin>,
    #[serde(default)]
    pub(crate) policy: RawPolicy,
    #[serde(default)]
    pub(crate) relay: RawRelay,
    #[serde(default)]
    pub(crate) dns: RawDns,
    #[serde(default)]
    pub(crate) limits: RawLimits,
    #[serde(default)]
    pub(crate) logging: RawLogging,
    #[serde(default)]
    pub(crate) http: RawHttp,
    pub(crate) auth: Option<RawAuth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawAuth {
    pub(crate) htpasswd_file: String,
    pub(crate) realm: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawListener {
    pub(crate) name: String,
    pub(crate) bind: String,
    #[serde(default)]
    pub(crate) mode: Option<String>,
    pub(crate) tls: Option<RawTls>,
    pub(crate) upstream: Option<String>,
    pub(crate) send_proxy_protocol: Option<String>,
    pub(crate) http: Option<RawListenerHttp>,
    pub(crate) accept_proxy_protocol_from: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawListenerHttp {
    pub(crate) enabled: Option<bool>,
    pub(crate) forwarded_for: Option<bool>,
    pub(crate) via: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawHttp {
    pub(crate) response_head_timeout: Option<String>,
    pub(crate) upstream_idle_timeout: Option<String>,
    pub(crate) max_idle_per_upstream: Option<u64>,
    pub(crate) max_idle_upstreams: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawTls {
    pub(crate) cert_file: Option<String>,
    pub(crate) key_file: Option<String>,
    pub(crate) certificates: Option<Vec<RawCertPair>>,
    pub(crate) strict_sni: Option<bool>,
    pub(crate) alpn: Option<Vec<String>>,
    pub(crate) min_version: Option<String>,
    pub(crate) client_auth: Option<RawClientAuth>,
    pub(crate) acme: Option<RawAcme>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawCertPair {
    pub(crate) cert_file: String,
    pub(crate) key_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawClientAuth {
    pub(crate) ca_file: String,
    pub(crate) crl_file: Option<String>,
    pub(crate) mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawAcme {
    pub(crate) directory: String,
    pub(crate) domains: Vec<String>,
    #[serde(default)]
    pub(crate) contact: Vec<String>,
    pub(crate) cache_dir: String,
    pub(crate) directory_ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawAdmin {
    pub(crate) bind: String,
    pub(crate) config_token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawPolicy {
    pub(crate) default_action: Option<String>,
    pub(crate) deny_private_addresses: Option<bool>,
    pub(crate) reevaluate_on_reload: Option<bool>,
    pub(crate) cluster_networks: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) rules: Vec<RawRule>,
}

/// One rule as written (`policy.rules[]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
}

/// A port is written as a number (`443`) or a range string (`"8000-8099"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawPort {
    Number(i64),
    Text(String),
}

/// A rule's relay limits as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawRelay {
    pub(crate) connect_timeout: Option<String>,
    pub(crate) idle_timeout: Option<String>,
    pub(crate) max_lifetime: Option<String>,
    pub(crate) max_bytes_per_second: Option<u64>,
    pub(crate) min_bytes_per_minute: Option<u64>,
    pub(crate) max_total_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawDns {
    pub(crate) cache_ttl: Option<String>,
    pub(crate) negative_ttl: Option<String>,
    pub(crate) timeout: Option<String>,
    pub(crate) nameservers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawLimits {
    pub(crate) max_connections: Option<u64>,
    pub(crate) max_connections_per_client: Option<u64>,
    pub(crate) request_head_timeout: Option<String>,
    pub(crate) max_request_head_bytes: Option<u64>,
    pub(crate) tls_handshake_timeout: Option<String>,
    pub(crate) drain_delay: Option<String>,
    pub(crate) drain_timeout: Option<String>,
    pub(crate) requests_per_second: Option<u64>,
    pub(crate) memory_budget: Option<u64>,
    pub(crate) request_burst: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawLogging {
    pub(crate) format: Option<String>,
    pub(crate) access_log: Option<bool>,
    pub(crate) log_client_addresses: Option<bool>,
    pub(crate) log_targets: Option<bool>,
    pub(crate) log_users: Option<bool>,
}
