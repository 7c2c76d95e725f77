//! The validated proxy configuration and its conversion from the raw document. Every value
//! here is valid by construction; every error carries the path of the value that caused it.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use regex::RegexBuilder;

use crate::error::{ConfigErrors, Errors};
use crate::host::{Authority, HostPattern};
use crate::policy::{Action, ClientIndex, Policy, PortRange, RelayOverrides, Rule, TunnelLimits};
use crate::raw::{RawConfig, RawPort, RawRuleRelay};
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
}

impl ListenerMode {
    /// The name used in the config and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerMode::Forward => "forward",
            ListenerMode::Tunnel => "tunnel",
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
    },
}

impl Serves {
    /// The mode's name, as `mode` spells it.
    pub fn mode(&self) -> ListenerMode {
        match self {
            Serves::Forward(_) => ListenerMode::Forward,
            Serves::Tunnel { .. } => ListenerMode::Tunnel,
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
        let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| single("", yaml_message(&e)))?;
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

fn convert(raw: RawConfig) -> Result<ProxyConfig, ConfigErrors> {
    let mut errs = Errors::default();

    // listeners
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    if raw.listeners.is_empty() {
        errs.push("listeners", "at least one listener is required");
    }
    for (i, l) in raw.listeners.into_iter().enumerate() {
        let p = format!("listeners[{i}]");
        if !valid_listener_name(&l.name) {
            errs.push(format!("{p}.name"), "must match [a-z0-9-]{1,63}");
        } else if !names.insert(l.name.clone()) {
            errs.push(format!("{p}.name"), format!("duplicate listener name \"{}\"", l.name));
        }
        let bind = errs.take(&format!("{p}.bind"), parse_socket_addr(&l.bind));
        if let Some(b) = bind {
            if b.port() != 0 && !binds.insert(b) {
                errs.push(format!("{p}.bind"), format!("address {b} is used by another listener"));
            }
        }
        let mode = match l.mode.as_deref() {
            None | Some("forward") => Some(ListenerMode::Forward),
            Some("tunnel") => Some(ListenerMode::Tunnel),
            Some(other) => {
                errs.push(format!("{p}.mode"), format!("unknown mode \"{other}\" (expected forward or tunnel)"));
                None
            }
        };
        let upstream = match (mode, l.upstream.as_deref()) {
            (Some(ListenerMode::Tunnel), None) => {
                errs.push(format!("{p}.upstream"), "required with mode: tunnel (host:port or unix:/path.sock)");
                None
            }
            (Some(ListenerMode::Tunnel), Some(u)) => errs.take(&format!("{p}.upstream"), parse_upstream(u)),
            (_, Some(_)) => {
                errs.push(format!("{p}.upstream"), "only valid with mode: tunnel");
                None
            }
            (_, None) => None,
        };
        let accept_proxy_protocol_from =
            list(&mut errs, &format!("{p}.acceptProxyProtocolFrom"), l.accept_proxy_protocol_from, parse_net);
        let send_proxy_protocol = match (mode, l.send_proxy_protocol.as_deref()) {
            (_, None | Some("none")) => ProxyProtocol::None,
            (Some(ListenerMode::Tunnel), Some("v1")) => ProxyProtocol::V1,
            (Some(ListenerMode::Tunnel), Some("v2")) => ProxyProtocol::V2,
            (Some(ListenerMode::Tunnel), Some(other)) => {
                errs.push(format!("{p}.sendProxyProtocol"), format!("\"{other}\": expected none, v1 or v2"));
                ProxyProtocol::None
            }
            (_, Some(_)) => {
                errs.push(format!("{p}.sendProxyProtocol"), "only valid with mode: tunnel");
                ProxyProtocol::None
            }
        };
        if mode == Some(ListenerMode::Tunnel) && l.http.is_some() {
            errs.push(format!("{p}.http"), "only valid with mode: forward (tunnel listeners parse no HTTP)");
        }
        let tls = l
            .tls
            .and_then(|t| crate::tls::convert(&mut errs, &format!("{p}.tls"), t, mode == Some(ListenerMode::Forward)));
        let http = l.http.map_or_else(ListenerHttp::default, |h| {
            let d = ListenerHttp::default();
            let via = h.via.unwrap_or(d.via);
            if !valid_pseudonym(&via) {
                errs.push(format!("{p}.http.via"), "must be 1-64 characters of A-Z a-z 0-9 . - _");
            }
            ListenerHttp {
                enabled: h.enabled.unwrap_or(d.enabled),
                forwarded_for: h.forwarded_for.unwrap_or(false),
                via,
            }
        });
        let serves = match (mode, upstream) {
            (Some(ListenerMode::Forward), _) => Some(Serves::Forward(http)),
            (Some(ListenerMode::Tunnel), Some(upstream)) => Some(Serves::Tunnel { upstream, send_proxy_protocol }),
            // The error is already recorded.
            _ => None,
        };
        if let (Some(bind), Some(serves)) = (bind, serves) {
            listeners.push(Listener { name: l.name, bind, tls, serves, accept_proxy_protocol_from });
        }
    }

    let (admin_bind, config_token_file) = match &raw.admin {
        Some(a) => {
            let token_file = match a.config_token_file.as_deref() {
                Some("") => {
                    errs.push("admin.configTokenFile", "must not be empty (omit it to leave /config open)");
                    None
                }
                other => other.map(PathBuf::from),
            };
            (errs.take("admin.bind", parse_socket_addr(&a.bind)), token_file)
        }
        None => (Some(SocketAddr::from(([127, 0, 0, 1], 9090))), None),
    };

    // relay defaults
    let r = raw.relay;
    let connect_timeout =
        duration(&mut errs, "relay.connectTimeout", r.connect_timeout.as_deref(), Duration::from_secs(10));
    let defaults = TunnelLimits {
        idle_timeout: duration(&mut errs, "relay.idleTimeout", r.idle_timeout.as_deref(), Duration::from_secs(300)),
        max_lifetime: duration(&mut errs, "relay.maxLifetime", r.max_lifetime.as_deref(), Duration::from_secs(86_400)),
        max_bytes_per_second: positive(&mut errs, "relay.maxBytesPerSecond", r.max_bytes_per_second),
        min_bytes_per_minute: r.min_bytes_per_minute,
        max_total_bytes: positive(&mut errs, "relay.maxTotalBytes", r.max_total_bytes),
    };

    // policy
    let pol = raw.policy;
    let default_action = match pol.default_action.as_deref() {
        None => Action::Deny,
        Some(s) => errs.take("policy.defaultAction", parse_action(s)).unwrap_or(Action::Deny),
    };
    let mut rules = Vec::new();
    let mut dry_run = Vec::new();
    let mut rule_names = HashSet::new();
    for (i, rr) in pol.rules.into_iter().enumerate() {
        let p = format!("policy.rules[{i}]");
        if !valid_rule_name(&rr.name) {
            errs.push(format!("{p}.name"), "must be 1-253 printable ASCII characters without spaces");
        } else if !rule_names.insert(rr.name.clone()) {
            errs.push(format!("{p}.name"), format!("duplicate rule name \"{}\"", rr.name));
        }
        let action = errs.take(&format!("{p}.action"), parse_action(&rr.action));
        let clients = list(&mut errs, &format!("{p}.clients"), rr.clients, parse_net);
        let users = list(&mut errs, &format!("{p}.users"), rr.users, |u| {
            if valid_user(u) {
                Ok(u.to_owned())
            } else {
                Err(format!("{u:?} is not a user name (1-128 printable characters, no ':')"))
            }
        });
        if !users.is_empty() && raw.auth.is_none() {
            errs.push(format!("{p}.users"), "needs auth (proxy authentication) to be configured");
        }
        // A rule whose destinations are all invalid has errors already: "no destination" would
        // only repeat them.
        let written = rr.hosts.is_some() || rr.cidrs.is_some() || rr.host_regex.is_some();
        let hosts =
            list(&mut errs, &format!("{p}.hosts"), rr.hosts, |s| s.parse::<HostPattern>().map_err(|e| e.to_string()));
        let cidrs = list(&mut errs, &format!("{p}.cidrs"), rr.cidrs, parse_net);
        let host_regex = rr.host_regex.as_deref().and_then(|re| {
            let anchored = format!("^(?:{re})$");
            let built = RegexBuilder::new(&anchored).size_limit(MAX_REGEX_SIZE).build();
            errs.take(&format!("{p}.hostRegex"), built.map_err(|e| format!("invalid regular expression: {e}")))
        });
        let mut ports = Vec::new();
        if let Some(raw_ports) = rr.ports {
            if raw_ports.is_empty() {
                errs.push(format!("{p}.ports"), "must not be empty (omit it to allow any port)");
            }
            for (j, rp) in raw_ports.iter().enumerate() {
                if let Some(pr) = errs.take(&format!("{p}.ports[{j}]"), parse_port_range(rp)) {
                    ports.push(pr);
                }
            }
        }
        if !written {
            errs.push(p.clone(), "rule has no destination: set hosts, hostRegex or cidrs");
        }
        let relay = rule_relay(&mut errs, &format!("{p}.relay"), rr.relay.unwrap_or_default());
        if let Some(action) = action {
            if rr.priority.is_some_and(|p| p > MAX_PRIORITY) {
                errs.push(format!("{p}.priority"), format!("must be between 0 and {MAX_PRIORITY}"));
            }
            let priority = rr.priority;
            let target = if rr.dry_run == Some(true) { &mut dry_run } else { &mut rules };
            target.push(Rule {
                name: rr.name,
                action,
                clients,
                users,
                hosts,
                host_regex,
                cidrs,
                ports,
                relay,
                priority,
            });
        }
    }
    let cluster_networks = list(&mut errs, "policy.clusterNetworks", pol.cluster_networks, parse_net);
    // Dry-run rules decide nothing; a shadow policy that enforces them too tells what they would do.
    let shadow = (!dry_run.is_empty()).then(|| {
        let mut all = rules.clone();
        let first_dry_run = all.len();
        all.extend(dry_run);
        crate::policy::Shadow {
            policy: Box::new(Policy {
                default_action,
                deny_private_addresses: pol.deny_private_addresses.unwrap_or(true),
                reevaluate_on_reload: false,
                cluster_networks: cluster_networks.clone(),
                by_client: ClientIndex::new(&all),
                rules: all,
                defaults,
                shadow: None,
            }),
            first_dry_run,
        }
    });
    if cluster_networks.len() > MAX_CLUSTER_NETWORKS {
        errs.push("policy.clusterNetworks", format!("at most {MAX_CLUSTER_NETWORKS} entries"));
    }
    let policy = Policy {
        default_action,
        deny_private_addresses: pol.deny_private_addresses.unwrap_or(true),
        reevaluate_on_reload: pol.reevaluate_on_reload.unwrap_or(false),
        cluster_networks,
        by_client: ClientIndex::new(&rules),
        rules,
        defaults,
        shadow,
    };

    // dns
    let d = raw.dns;
    let nameservers = list(&mut errs, "dns.nameservers", d.nameservers, |s| {
        let a = parse_socket_addr(s)?;
        if a.port() == 0 {
            return Err("port must not be 0".to_owned());
        }
        Ok(a)
    });
    let dns = Dns {
        cache_ttl: duration(&mut errs, "dns.cacheTtl", d.cache_ttl.as_deref(), Duration::from_secs(60)),
        negative_ttl: duration(&mut errs, "dns.negativeTtl", d.negative_ttl.as_deref(), Duration::from_secs(5)),
        timeout: duration(&mut errs, "dns.timeout", d.timeout.as_deref(), Duration::from_secs(5)),
        nameservers,
    };

    // limits
    let l = raw.limits;
    let limits = Limits {
        max_connections: count(&mut errs, "limits.maxConnections", l.max_connections, 10_000),
        max_connections_per_client: count(
            &mut errs,
            "limits.maxConnectionsPerClient",
            l.max_connections_per_client,
            1_000,
        ),
        request_head_timeout: duration(
            &mut errs,
            "limits.requestHeadTimeout",
            l.request_head_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        max_request_head_bytes: count(&mut errs, "limits.maxRequestHeadBytes", l.max_request_head_bytes, 16_384),
        tls_handshake_timeout: duration(
            &mut errs,
            "limits.tlsHandshakeTimeout",
            l.tls_handshake_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        drain_delay: duration_or_zero(&mut errs, "limits.drainDelay", l.drain_delay.as_deref(), Duration::from_secs(5)),
        drain_timeout: duration_or_zero(
            &mut errs,
            "limits.drainTimeout",
            l.drain_timeout.as_deref(),
            Duration::from_secs(30),
        ),
        requests_per_second: rate(&mut errs, "limits.requestsPerSecond", l.requests_per_second),
        request_burst: rate(&mut errs, "limits.requestBurst", l.request_burst),
        memory_budget: l.memory_budget,
    };
    if l.request_burst.is_some() && limits.requests_per_second.is_none() {
        errs.push("limits.requestBurst", "needs limits.requestsPerSecond");
    }
    if !(256..=1 << 20).contains(&limits.max_request_head_bytes) {
        errs.push("limits.maxRequestHeadBytes", "must be between 256 and 1048576");
    }
    if limits.max_connections_per_client > limits.max_connections {
        errs.push("limits.maxConnectionsPerClient", "must not exceed limits.maxConnections");
    }

    // logging
    let g = raw.logging;
    let format = match g.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            errs.push("logging.format", format!("unknown format \"{other}\" (expected text or json)"));
            LogFormat::Text
        }
    };
    let logging = Logging {
        format,
        access_log: g.access_log.unwrap_or(true),
        log_client_addresses: g.log_client_addresses.unwrap_or(false),
        log_targets: g.log_targets.unwrap_or(false),
        log_users: g.log_users.unwrap_or(false),
    };

    // http
    let h = raw.http;
    let http = HttpSettings {
        response_head_timeout: duration(
            &mut errs,
            "http.responseHeadTimeout",
            h.response_head_timeout.as_deref(),
            Duration::from_secs(60),
        ),
        upstream_idle_timeout: duration(
            &mut errs,
            "http.upstreamIdleTimeout",
            h.upstream_idle_timeout.as_deref(),
            Duration::from_secs(90),
        ),
        max_idle_per_upstream: count_or_zero(&mut errs, "http.maxIdlePerUpstream", h.max_idle_per_upstream, 8),
        max_idle_upstreams: count_or_zero(&mut errs, "http.maxIdleUpstreams", h.max_idle_upstreams, 512),
    };

    // auth
    let auth = raw.auth.as_ref().and_then(|a| {
        let realm = a.realm.clone().unwrap_or_else(|| "tunnelgate".to_owned());
        if !(1..=64).contains(&realm.len())
            || !realm.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            errs.push("auth.realm", "must be 1-64 printable ASCII characters without \" or \\");
        }
        if a.htpasswd_file.is_empty() {
            errs.push("auth.htpasswdFile", "must not be empty");
            return None;
        }
        Some(Auth { htpasswd_file: a.htpasswd_file.clone().into(), realm })
    });

    let admin = Admin { bind: admin_bind.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9090))), config_token_file };
    errs.finish(ProxyConfig {
        listeners,
        admin,
        policy,
        relay: RelayDefaults { connect_timeout },
        dns,
        limits,
        logging,
        http,
        auth,
    })
}

/// A proxy user name as htpasswd files hold them.
fn valid_user(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// A positive requests-per-second style value that fits in a u32.
fn rate(errs: &mut Errors, p: &str, v: Option<u64>) -> Option<u32> {
    let v = v?;
    match u32::try_from(v) {
        Ok(n) if n > 0 => Some(n),
        _ => {
            errs.push(p, "must be between 1 and 4294967295");
            None
        }
    }
}

/// A count that may be 0 (0 turns the feature off), at most 1,000,000.
fn count_or_zero(errs: &mut Errors, p: &str, v: Option<u64>, default: usize) -> usize {
    match v {
        None => default,
        Some(n) if n <= 1_000_000 => usize::try_from(n).unwrap_or(default),
        Some(_) => {
            errs.push(p, "must be at most 1000000");
            default
        }
    }
}

/// `host:port` or `unix:/absolute/path`.
fn parse_upstream(s: &str) -> Result<TunnelUpstream, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!("\"{s}\": the socket path must be absolute (unix:/run/app.sock)"));
        }
        return Ok(TunnelUpstream::Unix(path));
    }
    s.parse::<Authority>().map(TunnelUpstream::Tcp).map_err(|e| format!("\"{s}\": {e} (host:port or unix:/path.sock)"))
}

/// A `Via` pseudonym (RFC 9110 §7.6.3: a token).
fn valid_pseudonym(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

fn rule_relay(errs: &mut Errors, p: &str, r: RawRuleRelay) -> RelayOverrides {
    RelayOverrides {
        idle_timeout: r.idle_timeout.as_deref().and_then(|s| errs.take(&format!("{p}.idleTimeout"), parse_duration(s))),
        max_lifetime: r.max_lifetime.as_deref().and_then(|s| errs.take(&format!("{p}.maxLifetime"), parse_duration(s))),
        max_bytes_per_second: positive(errs, &format!("{p}.maxBytesPerSecond"), r.max_bytes_per_second),
        min_bytes_per_minute: r.min_bytes_per_minute,
        max_total_bytes: positive(errs, &format!("{p}.maxTotalBytes"), r.max_total_bytes),
    }
}

fn list<T>(errs: &mut Errors, p: &str, items: Option<Vec<String>>, f: impl Fn(&str) -> Result<T, String>) -> Vec<T> {
    let Some(items) = items else {
        return Vec::new();
    };
    if items.is_empty() {
        errs.push(p, "must not be empty (omit the field instead)");
    }
    items.iter().enumerate().filter_map(|(i, s)| errs.take(&format!("{p}[{i}]"), f(s))).collect()
}

fn duration(errs: &mut Errors, p: &str, v: Option<&str>, default: Duration) -> Duration {
    v.map_or(Some(default), |s| errs.take(p, parse_duration(s))).unwrap_or(default)
}

fn duration_or_zero(errs: &mut Errors, p: &str, v: Option<&str>, default: Duration) -> Duration {
    match v {
        Some("0") => Duration::ZERO,
        Some(s) => errs
            .take(p, humantime::parse_duration(s).map_err(|e| format!("invalid duration \"{s}\": {e}")))
            .unwrap_or(default),
        None => default,
    }
}

/// Parses a positive duration such as `500ms`, `60s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration \"{s}\": {e} (examples: 500ms, 60s, 5m, 1h)"))?;
    if d.is_zero() {
        return Err("must be greater than 0".to_owned());
    }
    if d > Duration::from_secs(10 * 365 * 86_400) {
        return Err("must be at most 10 years".to_owned());
    }
    Ok(d)
}

fn positive(errs: &mut Errors, p: &str, v: Option<u64>) -> Option<u64> {
    match v {
        Some(0) => {
            errs.push(p, "must be greater than 0 (omit it for no limit)");
            None
        }
        v => v,
    }
}

fn count(errs: &mut Errors, p: &str, v: Option<u64>, default: usize) -> usize {
    match v {
        None => default,
        Some(0) => {
            errs.push(p, "must be greater than 0");
            default
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    }
}

fn parse_action(s: &str) -> Result<Action, String> {
    match s {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        other => Err(format!("unknown action \"{other}\" (expected allow or deny)")),
    }
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| format!("\"{s}\" is not an address:port (IPv6 in brackets)"))
}

/// Parses a CIDR, or a bare address as a host route (/32 or /128). Host bits must be zero.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = s.parse().map_err(|_| format!("\"{s}\" is not a CIDR (like 10.0.0.0/8) or an address"))?;
    if net.trunc() != net {
        return Err(format!("\"{s}\" has host bits set; did you mean {}?", net.trunc()));
    }
    // Addresses are compared in canonical form (::ffff:10.0.0.1 is 10.0.0.1), so an IPv4-mapped
    // CIDR is stored as the IPv4 CIDR it means; left as IPv6 it would never match.
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.network().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            return ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map(IpNet::V4).map_err(|e| e.to_string());
        }
    }
    Ok(net)
}

fn parse_port_range(p: &RawPort) -> Result<PortRange, String> {
    let one = |s: &str| crate::host::parse_port(s).map_err(|_| format!("\"{s}\" is not a port (1-65535)"));
    match p {
        RawPort::Number(n) => match u16::try_from(*n) {
            Ok(port) if port > 0 => Ok(PortRange { start: port, end: port }),
            _ => Err(format!("{n} is not a port (1-65535)")),
        },
        RawPort::Text(s) => {
            let (start, end) = match s.split_once('-') {
                Some((a, b)) => (one(a)?, one(b)?),
                None => {
                    let p = one(s)?;
                    (p, p)
                }
            };
            if start > end {
                return Err(format!("range \"{s}\" is reversed"));
            }
            Ok(PortRange { start, end })
        }
    }
}

fn valid_listener_name(s: &str) -> bool {
    (1..=63).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Whether `s` is a valid `policy.rules[].name`: 1-253 printable ASCII characters, no spaces.
/// The operator checks the names it renders with this, per policy, before rendering.
pub fn valid_rule_name(s: &str) -> bool {
    (1..=253).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests;
