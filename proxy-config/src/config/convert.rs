//! The conversion of a raw document into a valid [`ProxyConfig`], section by section: every
//! error carries the path of the value that caused it; a rule is checked alone by [`check_rule`]
//! (the operator checks each policy's rules with it before rendering them).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use regex::RegexBuilder;

use super::*;
use crate::error::{ConfigErrors, Errors};
use crate::host::HostPattern;
use crate::parents::{Parent, ParentGroup, ParentTls, Parents, Route, SendTarget, DIRECT};
use crate::policy::{Action, ClientIndex, Policy, PortRange, RelayOverrides, Rule, TunnelLimits};
use crate::raw::{
    RawAdmin, RawAuth, RawConfig, RawDns, RawHttp, RawLimits, RawListener, RawLogging, RawParent, RawParentGroup,
    RawPolicy, RawPort, RawRedirect, RawRelay, RawRule, RawRuleRelay,
};

/// What the proxy says of a field only the operator's base document may carry.
const OPERATOR_ONLY: &str =
    "only the operator's base ConfigMap takes this (the operator renders it into files); the proxy reads files";

pub(super) fn convert(raw: RawConfig) -> Result<ProxyConfig, ConfigErrors> {
    let mut errs = Errors::default();
    if raw.address_grants.is_some() {
        errs.push("addressGrants", OPERATOR_ONLY);
    }
    let (relay, defaults) = relay(&mut errs, raw.relay);
    let parents = parents(&mut errs, raw.parents, raw.parent_groups, relay.connect_timeout);
    let listeners = listeners(&mut errs, raw.listeners, &parents);
    let admin = admin(&mut errs, raw.admin.as_ref());
    let policy = policy(&mut errs, raw.policy, defaults, raw.auth.is_some(), &parents);
    let config = ProxyConfig {
        listeners,
        admin,
        policy,
        relay,
        dns: dns(&mut errs, raw.dns),
        limits: limits(&mut errs, raw.limits),
        logging: logging(&mut errs, raw.logging),
        http: http(&mut errs, raw.http),
        auth: auth(&mut errs, raw.auth.as_ref()),
        redirect: None,
        parents,
    };
    let config =
        ProxyConfig { redirect: raw.redirect.as_ref().and_then(|r| redirect(&mut errs, r, &config)), ..config };
    errs.finish(config)
}

fn listeners(errs: &mut Errors, raw: Vec<RawListener>, parents: &Parents) -> Vec<Listener> {
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    if raw.is_empty() {
        errs.push("listeners", "at least one listener is required");
    }
    for (i, l) in raw.into_iter().enumerate() {
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
            Some("transparent") => Some(ListenerMode::Transparent),
            Some(other) => {
                errs.push(
                    format!("{p}.mode"),
                    format!("unknown mode \"{other}\" (expected forward, tunnel or transparent)"),
                );
                None
            }
        };
        let transparent = transparent(errs, &p, mode, &l);
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
            list(errs, &format!("{p}.acceptProxyProtocolFrom"), l.accept_proxy_protocol_from, parse_net);
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
        if mode != Some(ListenerMode::Forward) && l.http.is_some() {
            errs.push(
                format!("{p}.http"),
                "only valid with mode: forward (only forward listeners serve HTTP requests)",
            );
        }
        if l.tls.as_ref().is_some_and(|t| t.secret_name.is_some()) {
            errs.push(format!("{p}.tls.secretName"), OPERATOR_ONLY);
        }
        let tls =
            l.tls.and_then(|t| crate::tls::convert(errs, &format!("{p}.tls"), t, mode == Some(ListenerMode::Forward)));
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
        let route = match (mode, l.route.as_deref(), &upstream) {
            (_, None, _) => Route::Direct,
            (Some(ListenerMode::Tunnel), Some(name), Some(TunnelUpstream::Tcp(_)) | None) => {
                route(errs, &format!("{p}.route"), name, parents).unwrap_or_default()
            }
            (Some(ListenerMode::Tunnel), Some(_), Some(TunnelUpstream::Unix(_))) => {
                errs.push(format!("{p}.route"), "a unix: upstream is local: it cannot go through a parent");
                Route::Direct
            }
            (_, Some(_), _) => {
                errs.push(format!("{p}.route"), "only valid with mode: tunnel (rules route forward traffic)");
                Route::Direct
            }
        };
        let serves = match (mode, upstream) {
            (Some(ListenerMode::Forward), _) => Some(Serves::Forward(http)),
            (Some(ListenerMode::Tunnel), Some(upstream)) => {
                Some(Serves::Tunnel { upstream, send_proxy_protocol, route })
            }
            (Some(ListenerMode::Transparent), _) => transparent.map(Serves::Transparent),
            // The error is already recorded.
            _ => None,
        };
        if let (Some(bind), Some(serves)) = (bind, serves) {
            listeners.push(Listener { name: l.name, bind, tls, serves, accept_proxy_protocol_from });
        }
    }

    listeners
}

/// A transparent listener's settings, and what such a listener cannot have: TLS (it relays the
/// client's TLS untouched), a PROXY protocol header (the client is the redirected pod itself).
fn transparent(errs: &mut Errors, p: &str, mode: Option<ListenerMode>, l: &RawListener) -> Option<Transparent> {
    if mode != Some(ListenerMode::Transparent) {
        if l.transparent.is_some() {
            errs.push(format!("{p}.transparent"), "only valid with mode: transparent");
        }
        return None;
    }
    if l.tls.is_some() {
        errs.push(
            format!("{p}.tls"),
            "not valid with mode: transparent (the client's TLS is relayed untouched, decided by its SNI)",
        );
    }
    if l.accept_proxy_protocol_from.is_some() {
        errs.push(
            format!("{p}.acceptProxyProtocolFrom"),
            "not valid with mode: transparent (its clients are the redirected pods themselves)",
        );
    }
    let t = l.transparent.clone().unwrap_or_default();
    Some(Transparent { strict_destination: t.strict_destination.unwrap_or(false) })
}

/// The node's redirect rules: to a transparent listener of `config`, for valid client addresses.
fn redirect(errs: &mut Errors, r: &RawRedirect, config: &ProxyConfig) -> Option<Redirect> {
    if r.enroll_namespaces.is_some() {
        errs.push("redirect.enrollNamespaces", OPERATOR_ONLY);
    }
    let target = config.listeners.iter().find(|l| l.name == r.listener);
    let listener_port = match target {
        Some(l) if matches!(l.serves, Serves::Transparent(_)) => Some(l.bind.port()),
        Some(_) => {
            errs.push("redirect.listener", format!("listener \"{}\" is not a transparent listener", r.listener));
            None
        }
        None => {
            errs.push("redirect.listener", format!("no listener named \"{}\"", r.listener));
            None
        }
    };
    if listener_port == Some(0) {
        errs.push("redirect.listener", "the transparent listener needs a fixed port to redirect to");
    }
    let ports = r.ports.clone().unwrap_or_else(|| vec![80, 443]);
    if ports.is_empty() || ports.contains(&0) {
        errs.push("redirect.ports", "ports 1-65535, at least one (omit for 80 and 443)");
    }
    let mut enrolled = Vec::new();
    for (i, a) in r.enrolled.iter().enumerate() {
        if let Some(ip) = errs.take(
            &format!("redirect.enrolled[{i}]"),
            a.parse::<IpAddr>().map_err(|_| format!("\"{a}\" is not an address")),
        ) {
            enrolled.push(ip.to_canonical());
        }
    }
    let other_ports = match r.other_ports.as_deref() {
        None | Some("pass") => OtherPorts::Pass,
        Some("drop") => OtherPorts::Drop,
        Some(other) => {
            errs.push("redirect.otherPorts", format!("\"{other}\": expected pass or drop"));
            OtherPorts::Pass
        }
    };
    Some(Redirect { listener: r.listener.clone(), listener_port: listener_port?, ports, enrolled, other_ports })
}

fn admin(errs: &mut Errors, raw: Option<&RawAdmin>) -> Admin {
    let (admin_bind, config_token_file) = match raw {
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

    Admin { bind: admin_bind.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9090))), config_token_file }
}

/// The relay settings and the limits of tunnels whose rules leave a field unset.
fn relay(errs: &mut Errors, r: RawRelay) -> (RelayDefaults, TunnelLimits) {
    let connect_timeout = duration(errs, "relay.connectTimeout", r.connect_timeout.as_deref(), Duration::from_secs(10));
    let defaults = TunnelLimits {
        idle_timeout: duration(errs, "relay.idleTimeout", r.idle_timeout.as_deref(), Duration::from_secs(300)),
        max_lifetime: duration(errs, "relay.maxLifetime", r.max_lifetime.as_deref(), Duration::from_secs(86_400)),
        max_bytes_per_second: positive(errs, "relay.maxBytesPerSecond", r.max_bytes_per_second),
        min_bytes_per_minute: r.min_bytes_per_minute,
        max_total_bytes: positive(errs, "relay.maxTotalBytes", r.max_total_bytes),
    };

    (RelayDefaults { connect_timeout }, defaults)
}

/// Default of a group's `retryAfter`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);

/// `parents` and `parentGroups`: names unique across both (and never `direct`), every member a
/// parent.
fn parents(
    errs: &mut Errors,
    raw: Vec<RawParent>,
    raw_groups: Vec<RawParentGroup>,
    default_timeout: Duration,
) -> Parents {
    let mut names = HashSet::new();
    let mut name_ok = |errs: &mut Errors, p: &str, name: &str| {
        if !valid_listener_name(name) || name == DIRECT {
            errs.push(format!("{p}.name"), "must be 1-63 characters a-z, 0-9 and '-', and not \"direct\"");
        } else if !names.insert(name.to_owned()) {
            errs.push(format!("{p}.name"), format!("duplicate name \"{name}\" (parents and groups share names)"));
        }
    };
    let mut proxies = Vec::new();
    for (i, rp) in raw.into_iter().enumerate() {
        let p = format!("parents[{i}]");
        name_ok(errs, &p, &rp.name);
        if rp.credentials_secret.is_some() {
            errs.push(format!("{p}.credentialsSecret"), OPERATOR_ONLY);
        }
        let address = errs.take(
            &format!("{p}.address"),
            rp.address.parse::<Authority>().map_err(|e| format!("\"{}\": {e} (host:port)", rp.address)),
        );
        let tls = rp.tls.and_then(|t| {
            if t.ca_secret.is_some() {
                errs.push(format!("{p}.tls.caSecret"), OPERATOR_ONLY);
            }
            let ca_file = match t.ca_file.filter(|f| !f.is_empty()) {
                Some(f) => f,
                None => {
                    errs.push(
                        format!("{p}.tls.caFile"),
                        "required (the PEM CA certificates the parent's certificate chains to)",
                    );
                    String::new()
                }
            };
            let server_name = match t.server_name {
                Some(n) => errs.take(
                    &format!("{p}.tls.serverName"),
                    crate::host::normalize_name(&n).map(|h| h.as_str().to_owned()).map_err(|e| e.to_string()),
                ),
                None => address.as_ref().map(|a| a.host.to_string()),
            };
            server_name.map(|server_name| ParentTls { ca_file: ca_file.into(), server_name })
        });
        if rp.credentials_file.as_deref() == Some("") {
            errs.push(format!("{p}.credentialsFile"), "must not be empty");
        }
        let connect_timeout =
            duration(errs, &format!("{p}.connectTimeout"), rp.connect_timeout.as_deref(), default_timeout);
        let send_target = match rp.send_target.as_deref() {
            None | Some("address") => SendTarget::Address,
            Some("name") => SendTarget::Name,
            Some(other) => {
                errs.push(format!("{p}.sendTarget"), format!("\"{other}\": must be address or name"));
                SendTarget::Address
            }
        };
        if let Some(address) = address {
            proxies.push(Parent {
                name: rp.name,
                address,
                tls,
                credentials_file: rp.credentials_file.filter(|f| !f.is_empty()).map(PathBuf::from),
                connect_timeout,
                send_target,
            });
        }
    }
    let mut groups = Vec::new();
    for (i, rg) in raw_groups.into_iter().enumerate() {
        let p = format!("parentGroups[{i}]");
        name_ok(errs, &p, &rg.name);
        if rg.members.is_empty() {
            errs.push(format!("{p}.members"), "must name at least one parent");
        }
        let mut members = Vec::new();
        for (j, m) in rg.members.iter().enumerate() {
            match proxies.iter().position(|x| &x.name == m) {
                Some(k) if members.contains(&k) => {
                    errs.push(format!("{p}.members[{j}]"), format!("\"{m}\" is listed twice"))
                }
                Some(k) => members.push(k),
                None => errs.push(format!("{p}.members[{j}]"), format!("\"{m}\" is not a parent (see parents)")),
            }
        }
        let retry_after = duration(errs, &format!("{p}.retryAfter"), rg.retry_after.as_deref(), DEFAULT_RETRY_AFTER);
        groups.push(ParentGroup { name: rg.name, members, retry_after });
    }
    Parents { proxies, groups }
}

/// The route `name` (at `p`) names among `parents`.
fn route(errs: &mut Errors, p: &str, name: &str, parents: &Parents) -> Option<Route> {
    let r = parents.route(name);
    if r.is_none() {
        errs.push(p, format!("\"{name}\" is not a parent or group (see parents and parentGroups), nor \"direct\""));
    }
    r
}

fn policy(errs: &mut Errors, pol: RawPolicy, defaults: TunnelLimits, has_auth: bool, parents: &Parents) -> Policy {
    let default_action = match pol.default_action.as_deref() {
        None => Action::Deny,
        Some(s) => errs.take("policy.defaultAction", parse_action(s)).unwrap_or(Action::Deny),
    };
    let default_route =
        pol.default_route.as_deref().and_then(|n| route(errs, "policy.defaultRoute", n, parents)).unwrap_or_default();
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
        let dry = rr.dry_run == Some(true);
        let rule_route = rr.route.as_deref().and_then(|n| route(errs, &format!("{p}.route"), n, parents));
        if let Some(mut r) = rule(errs, &p, rr, has_auth) {
            r.route = rule_route;
            if dry {
                dry_run.push(r);
            } else {
                rules.push(r);
            }
        }
    }
    let cluster_networks = list(errs, "policy.clusterNetworks", pol.cluster_networks, parse_net);
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
                default_route,
            }),
            first_dry_run,
        }
    });
    if cluster_networks.len() > MAX_CLUSTER_NETWORKS {
        errs.push("policy.clusterNetworks", format!("at most {MAX_CLUSTER_NETWORKS} entries"));
    }
    Policy {
        default_action,
        deny_private_addresses: pol.deny_private_addresses.unwrap_or(true),
        reevaluate_on_reload: pol.reevaluate_on_reload.unwrap_or(false),
        cluster_networks,
        by_client: ClientIndex::new(&rules),
        rules,
        defaults,
        shadow,
        default_route,
    }
}

/// One rule at `p` (its name is checked with the others, for uniqueness); `None` when it has
/// errors (recorded).
fn rule(errs: &mut Errors, p: &str, rr: RawRule, has_auth: bool) -> Option<Rule> {
    let p = p.to_owned();
    let action = errs.take(&format!("{p}.action"), parse_action(&rr.action));
    let clients = list(errs, &format!("{p}.clients"), rr.clients, parse_net);
    let users = list(errs, &format!("{p}.users"), rr.users, |u| {
        if valid_user(u) {
            Ok(u.to_owned())
        } else {
            Err(format!("{u:?} is not a user name (1-128 printable characters, no ':')"))
        }
    });
    if !users.is_empty() && !has_auth {
        errs.push(format!("{p}.users"), "needs auth (proxy authentication) to be configured");
    }
    // A rule whose destinations are all invalid has errors already: "no destination" would
    // only repeat them.
    let written = rr.hosts.is_some() || rr.cidrs.is_some() || rr.host_regex.is_some();
    let hosts = list(errs, &format!("{p}.hosts"), rr.hosts, |s| s.parse::<HostPattern>().map_err(|e| e.to_string()));
    let cidrs = list(errs, &format!("{p}.cidrs"), rr.cidrs, parse_net);
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
    let relay = rule_relay(errs, &format!("{p}.relay"), rr.relay.unwrap_or_default());
    if let Some(action) = action {
        if rr.priority.is_some_and(|p| p > MAX_PRIORITY) {
            errs.push(format!("{p}.priority"), format!("must be between 0 and {MAX_PRIORITY}"));
        }
        let priority = rr.priority;
        if let Some(r) = rr.route.as_deref().filter(|r| !valid_listener_name(r)) {
            errs.push(format!("{p}.route"), format!("\"{r}\" is not a route name (direct, or a parent or group)"));
        }
        if action == Action::Deny && rr.route.is_some() {
            errs.push(format!("{p}.route"), "a deny rule sends nothing anywhere: route is for allow rules");
        }
        let route = None;
        return Some(Rule {
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
            route,
        });
    }
    None
}

/// Whether the proxy would accept `rule` in a document (with proxy authentication configured
/// when `has_auth`): the same checks as a rule of `policy.rules`, with paths relative to the rule
/// (`ports[0]`, `relay.maxTotalBytes`). The operator checks each policy's rendered rules with it,
/// so a policy the proxy would refuse is rejected alone instead of invalidating the document.
pub fn check_rule(rule: &RawRule, has_auth: bool) -> Result<(), ConfigErrors> {
    let mut errs = Errors::default();
    if !valid_rule_name(&rule.name) {
        errs.push("name", "must be 1-253 printable ASCII characters without spaces");
    }
    let _ = self::rule(&mut errs, "", rule.clone(), has_auth);
    errs.finish(()).map_err(|ConfigErrors(e)| ConfigErrors(e.into_iter().map(|e| e.relative()).collect()))
}

fn dns(errs: &mut Errors, d: RawDns) -> Dns {
    let nameservers = list(errs, "dns.nameservers", d.nameservers, |s| {
        let a = parse_socket_addr(s)?;
        if a.port() == 0 {
            return Err("port must not be 0".to_owned());
        }
        Ok(a)
    });
    Dns {
        cache_ttl: duration(errs, "dns.cacheTtl", d.cache_ttl.as_deref(), Duration::from_secs(60)),
        negative_ttl: duration(errs, "dns.negativeTtl", d.negative_ttl.as_deref(), Duration::from_secs(5)),
        timeout: duration(errs, "dns.timeout", d.timeout.as_deref(), Duration::from_secs(5)),
        nameservers,
    }
}

fn limits(errs: &mut Errors, l: RawLimits) -> Limits {
    let limits = Limits {
        max_connections: count(errs, "limits.maxConnections", l.max_connections, 10_000),
        max_connections_per_client: count(errs, "limits.maxConnectionsPerClient", l.max_connections_per_client, 1_000),
        request_head_timeout: duration(
            errs,
            "limits.requestHeadTimeout",
            l.request_head_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        max_request_head_bytes: count(errs, "limits.maxRequestHeadBytes", l.max_request_head_bytes, 16_384),
        tls_handshake_timeout: duration(
            errs,
            "limits.tlsHandshakeTimeout",
            l.tls_handshake_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        drain_delay: duration_or_zero(errs, "limits.drainDelay", l.drain_delay.as_deref(), Duration::from_secs(5)),
        drain_timeout: duration_or_zero(
            errs,
            "limits.drainTimeout",
            l.drain_timeout.as_deref(),
            Duration::from_secs(30),
        ),
        requests_per_second: rate(errs, "limits.requestsPerSecond", l.requests_per_second),
        request_burst: rate(errs, "limits.requestBurst", l.request_burst),
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
    limits
}

fn logging(errs: &mut Errors, g: RawLogging) -> Logging {
    let format = match g.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            errs.push("logging.format", format!("unknown format \"{other}\" (expected text or json)"));
            LogFormat::Text
        }
    };
    Logging {
        format,
        access_log: g.access_log.unwrap_or(true),
        log_client_addresses: g.log_client_addresses.unwrap_or(false),
        log_targets: g.log_targets.unwrap_or(false),
        log_users: g.log_users.unwrap_or(false),
    }
}

fn http(errs: &mut Errors, h: RawHttp) -> HttpSettings {
    HttpSettings {
        response_head_timeout: duration(
            errs,
            "http.responseHeadTimeout",
            h.response_head_timeout.as_deref(),
            Duration::from_secs(60),
        ),
        upstream_idle_timeout: duration(
            errs,
            "http.upstreamIdleTimeout",
            h.upstream_idle_timeout.as_deref(),
            Duration::from_secs(90),
        ),
        max_idle_per_upstream: count_or_zero(errs, "http.maxIdlePerUpstream", h.max_idle_per_upstream, 8),
        max_idle_upstreams: count_or_zero(errs, "http.maxIdleUpstreams", h.max_idle_upstreams, 512),
    }
}

fn auth(errs: &mut Errors, raw: Option<&RawAuth>) -> Option<Auth> {
    raw.and_then(|a| {
        let realm = a.realm.clone().unwrap_or_else(|| "tunnelgate".to_owned());
        if !(1..=64).contains(&realm.len())
            || !realm.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            errs.push("auth.realm", "must be 1-64 printable ASCII characters without \" or \\");
        }
        if a.secret_name.is_some() {
            errs.push("auth.secretName", OPERATOR_ONLY);
        }
        match a.htpasswd_file.as_deref() {
            None => {
                errs.push("auth.htpasswdFile", "required (the bcrypt htpasswd file of the proxy's users)");
                None
            }
            Some("") => {
                errs.push("auth.htpasswdFile", "must not be empty");
                None
            }
            Some(f) => Some(Auth { htpasswd_file: f.into(), realm }),
        }
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
