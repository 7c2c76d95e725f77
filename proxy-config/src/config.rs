//! The validated proxy configuration: every value here is valid by construction; [`convert`]
//! builds it from the raw document.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::error::{ConfigErrors, Errors};
use crate::host::Authority;
use crate::policy::Policy;
use crate::raw::RawConfig;
use crate::tls::ListenerTls;

/// The only format version this build reads.
pub const VERSION: u32 = 1;

/// Most `policy.clusterNetworks` entries (a node address each, plus pod and Service ranges).
pub const MAX_CLUSTER_NETWORKS: usize = 20_000;

/// Largest rule `priority`.
pub const MAX_PRIORITY: u32 = 1_000_000;

/// Largest compiled size of a `hostRegex`, so a policy cannot make matching expensive.
const MAX_REGEX_SIZE: usize = 1 << 20;

/// A complete, valid proxy configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listeners: Vec<Listener>,
    pub admin: Admin,
    pub policy: Policy,
    pub relay: RelayDefaults,
    pub dns: Dns,
    pub limits: Limits,
    pub logging: Logging,
    pub http: HttpSettings,
    /// Proxy authentication (`Proxy-Authorization: Basic`), when set.
    pub auth: Option<Auth>,
    /// The node's redirect rules the proxy owns, when set.
    pub redirect: Option<Redirect>,
    /// Upstream (parent) proxies and their groups, which rules route through.
    pub parents: crate::parents::Parents,
}

/// The nftables rules the proxy keeps in its network namespace (the node's): the enrolled
/// clients' TCP to `ports` outside the cluster's networks goes to a transparent listener; their
/// UDP 443 is dropped (QUIC falls back to TCP); their other traffic leaving the cluster passes or
/// is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// The transparent listener's name, and the port it listens on.
    pub listener: String,
    pub listener_port: u16,
    /// Destination ports redirected (80 and 443 unless set).
    pub ports: Vec<u16>,
    /// The clients intercepted (pod addresses; the operator renders them per node).
    pub enrolled: Vec<IpAddr>,
    /// What happens to the enrolled clients' other traffic to destinations outside the cluster.
    pub other_ports: OtherPorts,
}

/// An enrolled client's traffic on ports that are not redirected, outside the cluster's networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtherPorts {
    Pass,
    Drop,
}

/// Proxy authentication: every request on a forward listener must carry credentials that match
/// the htpasswd file (bcrypt hashes only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub htpasswd_file: PathBuf,
    /// The realm of `Proxy-Authenticate: Basic realm="..."`.
    pub realm: String,
}

/// What a listener does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerMode {
    /// Forward proxy: HTTP CONNECT, and absolute-form plain HTTP (with upgrades) unless
    /// `http.enabled` is false.
    Forward,
    /// Every connection goes to one fixed upstream, after the TLS handshake when `tls` is set
    /// (TLS termination); no HTTP parsing.
    Tunnel,
    /// Connections redirected to it by the node's firewall: the original destination, and the
    /// name from the TLS SNI or the HTTP Host, decided by the policy as a CONNECT would be.
    Transparent,
}

impl ListenerMode {
    /// The name used in the config and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerMode::Forward => "forward",
            ListenerMode::Tunnel => "tunnel",
            ListenerMode::Transparent => "transparent",
        }
    }
}

/// A listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// `[a-z0-9-]{1,63}`, unique; the `listener` metric label.
    pub name: String,
    pub bind: SocketAddr,
    /// When set, clients speak TLS to the proxy.
    pub tls: Option<ListenerTls>,
    /// What the listener serves, with the settings of that mode only.
    pub serves: Serves,
    /// Peers (a load balancer in front) that must open each connection with a PROXY protocol
    /// header (v1 or v2), whose source is then the client address; empty: never read one.
    pub accept_proxy_protocol_from: Vec<IpNet>,
}

/// What a listener serves (`mode`), each with its own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serves {
    /// A forward proxy: HTTP CONNECT, and absolute-form plain HTTP (with upgrades) unless
    /// `http.enabled` is false.
    Forward(ListenerHttp),
    /// Every connection goes to one fixed upstream, after the TLS handshake when `tls` is set
    /// (TLS termination); no HTTP parsing.
    Tunnel {
        upstream: TunnelUpstream,
        /// The PROXY protocol header sent to the upstream before any payload.
        send_proxy_protocol: ProxyProtocol,
        /// How it reaches a `host:port` upstream: directly, or through a parent proxy (which is
        /// sent the upstream as written).
        route: crate::parents::Route,
    },
    /// Connections redirected by the node's firewall (their original destination read from the
    /// kernel), decided by the name their first bytes carry (TLS SNI, HTTP Host) or, without
    /// one, by the original destination; relayed without terminating TLS.
    Transparent(Transparent),
}

/// A transparent listener's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transparent {
    /// Refuse a named connection whose original destination is not among the addresses the proxy
    /// resolves for the name (Squid's `host_verify_strict`). Either way an allowed name is dialled
    /// only at the addresses the proxy resolved, never at the destination the client chose.
    pub strict_destination: bool,
}

impl Serves {
    /// The mode's name, as `mode` spells it.
    pub fn mode(&self) -> ListenerMode {
        match self {
            Serves::Forward(_) => ListenerMode::Forward,
            Serves::Tunnel { .. } => ListenerMode::Tunnel,
            Serves::Transparent(_) => ListenerMode::Transparent,
        }
    }
}

/// Which PROXY protocol header a tunnel listener announces its client with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyProtocol {
    #[default]
    None,
    /// Text: `PROXY TCP4 <client> <listener> <cport> <lport>\r\n`.
    V1,
    /// Binary, with ALPN and SNI (authority) TLVs on TLS listeners.
    V2,
}

/// Where a tunnel listener sends its connections. A configured upstream is trusted: the policy's
/// destination rules (and private-address refusal) are for targets that clients choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelUpstream {
    /// `host:port`, resolved through the proxy's resolver; every address is tried within
    /// `relay.connectTimeout`.
    Tcp(Authority),
    /// `unix:/absolute/path.sock`.
    Unix(PathBuf),
}

/// Plain-HTTP forwarding settings of one forward listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerHttp {
    /// Serve absolute-form `http://` requests (and upgrades); when false, only CONNECT (405).
    pub enabled: bool,
    /// Opt-in: tell upstreams the client's address (`X-Forwarded-For`, `Forwarded: for=`). Off by
    /// default: an egress proxy must not hand workload addresses to the internet.
    pub forwarded_for: bool,
    /// The pseudonym in the `Via` header added to requests and responses (`1.1 <via>`).
    pub via: String,
}

impl Default for ListenerHttp {
    fn default() -> ListenerHttp {
        ListenerHttp { enabled: true, forwarded_for: false, via: "tunnelgate".to_owned() }
    }
}

/// Process-wide settings of the plain-HTTP forward path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSettings {
    /// The upstream must send its response head within this, after the request was sent.
    pub response_head_timeout: Duration,
    /// An idle pooled upstream connection is closed after this.
    pub upstream_idle_timeout: Duration,
    /// Idle pooled connections kept per (address, host); 0 disables reuse.
    pub max_idle_per_upstream: usize,
    /// Idle pooled connections kept in all.
    pub max_idle_upstreams: usize,
}

/// The admin HTTP server (metrics, health, config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub bind: SocketAddr,
    /// A file holding the token that `GET /config` requires in the [`ADMIN_TOKEN_HEADER`] header;
    /// `None`: `/config` is open to whoever reaches the admin port.
    pub config_token_file: Option<PathBuf>,
}

/// The request header that carries the admin token to `/config` (a header of its own, not
/// `Authorization`: the Kubernetes API server removes that one before its pod proxy forwards a
/// request, so `kubectl tunnelgate status` could not pass the token through it).
pub const ADMIN_TOKEN_HEADER: &str = "x-tunnelgate-admin-token";

/// Relay settings that are not per-rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayDefaults {
    /// Budget for connecting to the upstream, across all candidate addresses.
    pub connect_timeout: Duration,
}

/// Resolver settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    /// Upper bound on how long a positive answer is reused.
    pub cache_ttl: Duration,
    /// Upper bound on how long a negative answer is reused.
    pub negative_ttl: Duration,
    /// Per-query timeout.
    pub timeout: Duration,
    /// Name servers to query; empty means the system resolver configuration.
    pub nameservers: Vec<SocketAddr>,
}

/// Connection and request limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// Absolute deadline for the whole request head, from accept (or from the TLS handshake's end).
    pub request_head_timeout: Duration,
    pub max_request_head_bytes: usize,
    pub tls_handshake_timeout: Duration,
    /// On SIGTERM, listeners keep accepting this long while endpoints converge.
    pub drain_delay: Duration,
    /// Then established tunnels get this long before they are closed.
    pub drain_timeout: Duration,
    /// Requests (HTTP requests and CONNECTs) per second per client address; `None`: no limit.
    pub requests_per_second: Option<u32>,
    /// Requests a client may send at once before the rate applies (default: one second's worth).
    pub request_burst: Option<u32>,
    /// Heap bytes in use above which new requests get 503; `None`: 85% of the cgroup memory
    /// limit when there is one; `Some(0)`: never shed.
    pub memory_budget: Option<u64>,
}

/// Log output settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logging {
    pub format: LogFormat,
    /// One event per tunnel on target `tunnelgate::access`.
    pub access_log: bool,
    /// Opt-in: access events carry the client address.
    pub log_client_addresses: bool,
    /// Opt-in: access events carry the target host and port.
    pub log_targets: bool,
    /// Opt-in: access events carry the authenticated proxy user.
    pub log_users: bool,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl ProxyConfig {
    /// Parses and validates a YAML (or JSON) document.
    pub fn from_yaml(text: &str) -> Result<ProxyConfig, ConfigErrors> {
        // JSON (a subset of YAML) is read by a JSON parser, an order of magnitude faster on the
        // megabytes of a whole-cluster document merged from shards; leading `#` lines are skipped
        // (the render stamp). The same value either way; duplicate keys are refused either way.
        let body = text.trim_start_matches(|c: char| c.is_whitespace());
        let mut rest = body;
        while rest.starts_with('#') {
            rest = rest.split_once('\n').map_or("", |(_, r)| r).trim_start();
        }
        let value: serde_yaml::Value = if rest.starts_with('{') {
            serde_json::from_str(rest).map_err(|e| single("", format!("invalid JSON: {e}")))?
        } else {
            serde_yaml::from_str(text).map_err(|e| single("", yaml_message(&e)))?
        };
        if value.is_null() {
            return Err(single("", "document is empty"));
        }
        match value.get("version") {
            None => return Err(single("version", "missing field (this proxy reads version 1)")),
            Some(v) if v.as_u64() != Some(u64::from(VERSION)) => {
                return Err(single(
                    "version",
                    format!("unsupported version {} (this proxy reads version 1)", yaml_scalar(v)),
                ));
            }
            Some(_) => {}
        }
        match crate::structure::deserialize::<RawConfig>(value) {
            Ok(raw) => convert(raw),
            // Every structural error, and the semantic errors of what is left, in one report.
            Err(mut partial) => {
                if let Some(Err(ConfigErrors(more))) = partial.rest.take().map(convert) {
                    let more: Vec<_> = more.into_iter().map(|e| partial.as_written(e)).collect();
                    partial.errors.extend(more);
                }
                Err(ConfigErrors(partial.errors))
            }
        }
    }

    /// The built-in configuration used when no `--config` is given: a forward listener on
    /// 127.0.0.1:8080, admin on 127.0.0.1:9090, allow by default, private addresses refused.
    pub fn embedded_default() -> Result<ProxyConfig, ConfigErrors> {
        ProxyConfig::from_yaml(EMBEDDED_DEFAULT)
    }
}

/// The text of the embedded default configuration.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.yaml");

fn single(path: impl Into<String>, message: impl Into<String>) -> ConfigErrors {
    let mut e = Errors::default();
    e.push(path, message);
    match e.finish(()) {
        Err(errs) => errs,
        Ok(()) => ConfigErrors(Vec::new()),
    }
}

fn yaml_message(e: &serde_yaml::Error) -> String {
    match e.location() {
        Some(l) => format!("invalid YAML at line {} column {}: {e}", l.line(), l.column()),
        None => format!("invalid YAML: {e}"),
    }
}

fn yaml_scalar(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v).map(|s| s.trim().to_owned()).unwrap_or_default()
}

mod convert;

use convert::convert;
pub use convert::{check_rule, parse_duration, parse_net, valid_rule_name};

#[cfg(test)]
mod tests;
