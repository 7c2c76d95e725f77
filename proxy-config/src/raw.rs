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

/// A Tunnelgate proxy configuration document (`tunnelgate-proxy --config`). Unknown fields are errors, never
/// ignored.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawConfig {
    /// The format version. Only `1` exists; any other is refused.
    pub version: u32,
    /// The sockets the proxy serves: at least one. Default: none (a document without listeners is refused).
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    /// The admin endpoint: `/metrics`, `/healthz`, `/readyz`, `/config`. Default: `{bind: "127.0.0.1:9090"}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<RawAdmin>,
    /// Who may reach what: the rules, the default action and the refused address space. Default: deny
    /// everything.
    #[serde(default, skip_serializing_if = "is_default")]
    pub policy: RawPolicy,
    /// Limits of every tunnel and plain-HTTP request; a rule's `relay` overrides them field by field.
    /// Default: the defaults of each field.
    #[serde(default, skip_serializing_if = "is_default")]
    pub relay: RawRelay,
    /// How target names are resolved. Default: the system resolver configuration, with the cache defaults
    /// below.
    #[serde(default, skip_serializing_if = "is_default")]
    pub dns: RawDns,
    /// Connection, request and memory limits of the whole proxy. Default: the defaults of each field.
    #[serde(default, skip_serializing_if = "is_default")]
    pub limits: RawLimits,
    /// Log format and what access events may name. Default: text logs, access events on, nothing sensitive.
    #[serde(default, skip_serializing_if = "is_default")]
    pub logging: RawLogging,
    /// The plain-HTTP forward path's upstream timeouts and connection pool. Default: the defaults of each
    /// field.
    #[serde(default, skip_serializing_if = "is_default")]
    pub http: RawHttp,
    /// Proxy authentication (`Proxy-Authorization: Basic`) on every forward listener. Default: none (clients
    /// are identified by address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<RawAuth>,
    /// The node's nftables redirect rules that send enrolled clients' traffic to a transparent listener.
    /// Default: none (no rules are written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RawRedirect>,
    /// Upstream (parent) proxies that allowed traffic may leave through. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<RawParent>,
    /// Groups of parents tried in order (failover). Parents and groups share one name space. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_groups: Vec<RawParentGroup>,
    /// Operator's base document only (a proxy refuses it): namespaces whose TunnelPolicies may open refused
    /// address space. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_grants: Option<Vec<RawAddressGrant>>,
}

/// A parent proxy (`parents[]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawParent {
    /// Unique among parents and groups, `[a-z0-9-]{1,63}`; `direct` is reserved. Used in routes and as the
    /// `parent` metric label.
    pub name: String,
    /// `host:port` of the parent. A name resolves through `dns`; the parent is trusted configuration, so
    /// private addresses are fine. Example: `proxy-a.corp.example:3128`.
    pub address: String,
    /// Speak TLS to the parent. Default: none (plain TCP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawParentTls>,
    /// A file holding one line `user:password`, sent as `Proxy-Authorization: Basic`; re-read by every
    /// reload, never logged. Default: none (no credentials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
    /// Operator's base document only: the Secret holding the credentials (key `credentials`), copied into the
    /// proxies' Secret. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Budget for the TCP connection and TLS handshake to the parent. Default: `relay.connectTimeout`.
    /// Example: `5s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// What the parent is asked to connect to: `address` (the address this proxy resolved and checked) or
    /// `name` (the name as the client wrote it). Default: `address`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["address", "name", null]))]
    pub send_target: Option<String>,
}

/// TLS to a parent.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawParentTls {
    /// PEM file of the CA certificates the parent's certificate must chain to (the system's roots are not
    /// used). Required unless the operator fills it from `caSecret`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Operator's base document only: the Secret holding the CA certificates (key `ca.crt`). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<String>,
    /// The name the parent's certificate must carry, also sent as SNI. Default: the host of `address`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// A group of parents (`parentGroups[]`): the first usable member carries the traffic.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawParentGroup {
    /// Unique among parents and groups, `[a-z0-9-]{1,63}`; `direct` is reserved.
    pub name: String,
    /// Parent names, tried in this order; at least one.
    pub members: Vec<String>,
    /// How long a member that failed is skipped before it is tried again. Default: `30s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
}

/// Namespaces whose TunnelPolicies may open some refused address space (operator's base document only).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAddressGrant {
    /// Namespace names.
    pub namespaces: Vec<String>,
    /// The address space granted to them.
    pub cidrs: Vec<String>,
}

/// Proxy authentication.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAuth {
    /// A bcrypt-only htpasswd file (`htpasswd -B`); watched, a bad file keeps the users in force. Required
    /// unless the operator fills it from `secretName`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub htpasswd_file: Option<String>,
    /// Operator's base document only: the Secret whose key `htpasswd` holds the users. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The realm of the `Proxy-Authenticate: Basic` challenge, 1-64 printable ASCII characters. Default:
    /// `tunnelgate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
}

/// A socket the proxy serves (`listeners[]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawListener {
    /// Unique, `[a-z0-9-]{1,63}`; the `listener` metric label.
    pub name: String,
    /// Address and port to listen on. Example: `0.0.0.0:3128`, `[::]:3128`.
    pub bind: String,
    /// `forward` (HTTP CONNECT and absolute-form plain HTTP with upgrades), `tunnel` (every connection to one
    /// fixed `upstream`) or `transparent` (connections redirected by the node's firewall, decided by SNI or
    /// Host). Default: `forward`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["forward", "tunnel", "transparent", null]))]
    pub mode: Option<String>,
    /// Terminate TLS on this listener (forward and tunnel listeners). Default: none (plain TCP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawTls>,
    /// A tunnel listener's backend: `host:port` (every resolved address tried within `relay.connectTimeout`)
    /// or `unix:/absolute/path.sock`. Required with `mode: tunnel`, refused otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// A tunnel listener announces the client to its backend with a PROXY protocol header: `none`, `v1` or
    /// `v2`. Default: `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["none", "v1", "v2", null]))]
    pub send_proxy_protocol: Option<String>,
    /// A forward listener's plain-HTTP settings. Default: plain HTTP served, no `X-Forwarded-For`, `Via: 1.1
    /// tunnelgate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<RawListenerHttp>,
    /// Peers (CIDRs) whose connections open with a PROXY protocol v1 or v2 header, whose source is then the
    /// client. Default: none (no header is read from anyone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_proxy_protocol_from: Option<Vec<String>>,
    /// A transparent listener's settings. Default: `{strictDestination: false}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transparent: Option<RawTransparent>,
    /// A tunnel listener's way to a `host:port` upstream: `direct`, a parent or a group. Default: `direct`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

/// The node's redirect rules: an nftables table `inet tunnelgate` the proxy writes with `nft`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRedirect {
    /// The transparent listener (with a fixed port) the enrolled clients' traffic is redirected to.
    pub listener: String,
    /// Destination TCP ports redirected. Default: `[80, 443]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    /// The client addresses intercepted (in a cluster, filled in per node by the operator). Default: none.
    #[serde(default)]
    pub enrolled: Vec<String>,
    /// The enrolled clients' traffic to other ports leaving the cluster: `pass` or `drop`. Default: `pass`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["pass", "drop", null]))]
    pub other_ports: Option<String>,
    /// Operator's base document only: the labels of the namespaces whose pods are enrolled; the operator
    /// renders their addresses into `enrolled`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enroll_namespaces: Option<std::collections::BTreeMap<String, String>>,
}

/// A transparent listener's settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTransparent {
    /// Refuse a connection whose original destination is not among the addresses the proxy resolves for its
    /// SNI or Host. Default: `false` (the resolved addresses are dialled, never the client's choice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict_destination: Option<bool>,
}

/// A forward listener's plain-HTTP settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawListenerHttp {
    /// Serve absolute-form plain-HTTP requests; `false`: CONNECT only (anything else gets `405`). Default:
    /// `true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Sensitive opt-in: send `X-Forwarded-For` and `Forwarded: for=` with the client's address to upstreams.
    /// Default: `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_for: Option<bool>,
    /// The pseudonym in the `Via` header added both ways. Default: `tunnelgate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// The plain-HTTP forward path.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawHttp {
    /// The upstream's response head must arrive within this, else `504`. Default: `60s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_head_timeout: Option<String>,
    /// Idle pooled upstream connections close after this. Default: `90s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_idle_timeout: Option<String>,
    /// Idle connections kept per (address, Host, client); `0`: no reuse. Default: `8`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_idle_per_upstream: Option<u64>,
    /// Idle upstream connections kept in all. Default: `512`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_idle_upstreams: Option<u64>,
}

/// TLS on a listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTls {
    /// Operator's base document only: the `kubernetes.io/tls` Secret holding the certificate and key.
    /// Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// PEM certificate chain; the same as a first entry of `certificates`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// PEM private key (PKCS#8, RSA or SEC1) of `certFile`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// Certificates chosen by SNI from their DNS names; the first is the default. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificates: Option<Vec<RawCertPair>>,
    /// Refuse a handshake without SNI or with an unknown name (`unrecognized_name`) instead of serving the
    /// first certificate. Default: `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict_sni: Option<bool>,
    /// ALPN protocols advertised, in this order; a client offering none of them is refused. Default: none on
    /// tunnel listeners, `[http/1.1]` on forward listeners.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Vec<String>>,
    /// The oldest TLS version accepted: `"1.2"` or `"1.3"`. Default: `"1.2"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["1.2", "1.3", null]))]
    pub min_version: Option<String>,
    /// Require or accept client certificates. Default: none (no client certificates asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<RawClientAuth>,
    /// Obtain and renew the certificate from an ACME directory (TLS-ALPN-01) instead of files. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<RawAcme>,
}

/// A certificate and its key.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCertPair {
    /// PEM certificate chain.
    pub cert_file: String,
    /// PEM private key (PKCS#8, RSA or SEC1).
    pub key_file: String,
}

/// Client certificate verification.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawClientAuth {
    /// PEM file of the CAs client certificates must chain to.
    pub ca_file: String,
    /// PEM certificate revocation lists; when set, every CA of `caFile` needs its list here. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crl_file: Option<String>,
    /// `required` (no certificate, no handshake) or `optional` (clients without one are served, a bad one is
    /// refused). Default: `required`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["required", "optional", null]))]
    pub mode: Option<String>,
}

/// An ACME (RFC 8555) order for the listener's certificate.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAcme {
    /// The ACME directory URL. Example: `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory: String,
    /// DNS names of the certificate; no wildcards (TLS-ALPN-01 cannot prove them).
    pub domains: Vec<String>,
    /// Account contacts. Default: none. Example: `["mailto:ops@example.com"]`.
    #[serde(default)]
    pub contact: Vec<String>,
    /// Where the account key and certificates are kept; keep it across restarts.
    pub cache_dir: String,
    /// PEM CA for the directory's HTTPS when a private CA signs it. Default: the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory_ca_file: Option<String>,
}

/// The admin endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAdmin {
    /// Address and port of `/metrics`, `/healthz`, `/readyz` and `/config`; takes effect at the next restart.
    /// Example: `127.0.0.1:9090`.
    pub bind: String,
    /// A file holding the token (16 characters or more) `/config` requires in `X-Tunnelgate-Admin-Token`;
    /// re-read by every reload. Default: none (`/config` answers everyone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_token_file: Option<String>,
}

/// The policy: a deny that matches always wins, then any allow, then `defaultAction`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPolicy {
    /// `allow` or `deny`: the decision when no rule matches. Default: `deny`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["allow", "deny", null]))]
    pub default_action: Option<String>,
    /// Refuse private, loopback, link-local, metadata and other non-global addresses unless an allow rule
    /// opens them on purpose. Default: `true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deny_private_addresses: Option<bool>,
    /// At each reload, close the established tunnels the new policy denies (close reason `revoked`). Default:
    /// `false` (tunnels keep the policy they were admitted under).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reevaluate_on_reload: Option<bool>,
    /// CIDRs refused like private space even when public (the cluster's pod, Service and node networks); in a
    /// cluster the operator fills them in. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_networks: Option<Vec<String>>,
    /// How allowed traffic leaves when its rule names no `route`: `direct`, a parent or a group. Default:
    /// `direct`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_route: Option<String>,
    /// The rules; their order does not matter. Default: none.
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

/// A rule (`policy.rules[]`): it matches when its clients, users, ports and destination all match.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRule {
    /// Unique; the `rule` metric label. Example: `payments/allow-github`.
    pub name: String,
    /// `allow` or `deny`; a matching deny always wins.
    #[schemars(extend("enum" = ["allow", "deny"]))]
    pub action: String,
    /// Source CIDRs (a bare address is a /32 or /128). Default: any client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<String>>,
    /// Proxy users (with `auth`). Default: any user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
    /// Target names: exact, or `*.` + name for any depth below it (not the apex). A name never opens a
    /// refused address. A rule needs at least one of `hosts`, `hostRegex` and `cidrs`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// A regular expression matched against the whole lower-case name. Default: none. Example:
    /// `'(.+\.)?rust-lang\.org'` (single-quoted in YAML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_regex: Option<String>,
    /// Target addresses, literal or resolved. A CIDR opens refused space only when it lies entirely inside it
    /// (a metadata or loopback address only by its exact /32 or /128). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidrs: Option<Vec<String>>,
    /// Target ports: numbers or `"lo-hi"` ranges. Default: any port. Example: `[443, "8000-8099"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<RawPort>>,
    /// This rule's relay limits, overriding `relay` field by field; when several allows match, each limit is
    /// the strictest. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RawRuleRelay>,
    /// 0 to 1000000: puts the rule in the platform tier, where the lowest number decides (a deny wins a tie).
    /// Default: none (the tenant tier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Decide nothing; count in `tunnelgate_policy_dry_run_total` what the rule would change. Default:
    /// `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    /// How the traffic this allow rule decides leaves: `direct`, a parent or a group. Default:
    /// `policy.defaultRoute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

/// A port (`443`) or a range (`"8000-8099"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum RawPort {
    Number(i64),
    Text(String),
}

/// A rule's relay limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRuleRelay {
    /// No byte either way for this long: close. Default: `relay.idleTimeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Close a tunnel or request this long after it started. Default: `relay.maxLifetime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<String>,
    /// Pace each direction to this many bytes per second. Default: `relay.maxBytesPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes_per_second: Option<u64>,
    /// Close a tunnel that moves fewer bytes than this in a minute (tunnels only). Default:
    /// `relay.minBytesPerMinute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_bytes_per_minute: Option<u64>,
    /// Close after this many bytes, both directions together. Default: `relay.maxTotalBytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_bytes: Option<u64>,
}

/// Limits of every tunnel and plain-HTTP request.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRelay {
    /// Budget for connecting upstream, across all resolved addresses; over it: `504`. Default: `10s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// No byte either way for this long: close. Default: `5m`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Close a tunnel or request this long after it started. Default: `24h`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<String>,
    /// Pace each direction to this many bytes per second. Default: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes_per_second: Option<u64>,
    /// Close a tunnel that moves fewer bytes than this in a minute (tunnels only). Default: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_bytes_per_minute: Option<u64>,
    /// Close after this many bytes, both directions together. Default: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_total_bytes: Option<u64>,
}

/// How target names are resolved.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawDns {
    /// Upper bound on how long an answer is reused. Default: `60s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_ttl: Option<String>,
    /// How long a failed lookup is remembered. Default: `5s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negative_ttl: Option<String>,
    /// A lookup not answered within this gets `504`. Default: `5s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// `address:port` of the servers to ask. Default: the system resolver configuration. Example:
    /// `["10.96.0.10:53"]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nameservers: Option<Vec<String>>,
}

/// Limits of the whole proxy.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawLimits {
    /// Client connections in all; over it: `503` with `Retry-After`. Default: `10000`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    /// Connections per client address; over it: `429` with `Retry-After`. Default: `1000`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_client: Option<u64>,
    /// Absolute deadline for a whole request head (not an inactivity timer); over it: `408`. Default: `10s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_head_timeout: Option<String>,
    /// Largest request head, 256 to 1048576 bytes; over it: `431`. Default: `16384`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_head_bytes: Option<u64>,
    /// Deadline for a client's TLS handshake. Default: `10s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_handshake_timeout: Option<String>,
    /// On SIGTERM, keep accepting this long while endpoints converge. Default: `5s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_delay: Option<String>,
    /// Then established tunnels get this long before they are closed. Default: `30s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    /// Per client address, CONNECTs and HTTP requests alike; over it: `429` with `Retry-After`. Default: no
    /// rate limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u64>,
    /// Bytes in use (the heap, and tunnel bytes held in relay pipes) above which new requests get
    /// `503`; `0`: never shed. Default: 85% of the cgroup memory limit when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_budget: Option<u64>,
    /// The rate limit's burst (needs `requestsPerSecond`). Default: one second's worth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_burst: Option<u64>,
}

/// Logs on stderr; filter with the `TUNNELGATE_LOG` environment variable (default `info`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawLogging {
    /// `text` or `json`; takes effect at the next restart. Default: `text`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["text", "json", null]))]
    pub format: Option<String>,
    /// One event per decision on target `tunnelgate::access`. Default: `true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
    /// Sensitive opt-in: client addresses in access events. Default: `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_client_addresses: Option<bool>,
    /// Sensitive opt-in: the target `host:port` (field `destination`) in access events, and dependencies'
    /// debug logs. Default: `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_targets: Option<bool>,
    /// Opt-in: the authenticated proxy user in access events. Default: `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_users: Option<bool>,
}
