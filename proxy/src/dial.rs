//! Resolves target names through a TTL-capped cache (hickory) and connects to exactly the
//! addresses that the policy checked, one after another, within one connect budget.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::TokioResolver;
use proxy_config::{Dns, HostName};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Duration, Instant};

use crate::error::TunnelError;
use crate::metrics::ProxyMetrics;

/// Most addresses of one answer that are checked and tried; more is an abuse (S-10: 500 A records).
const MAX_CANDIDATES: usize = 16;

/// Why a resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("cannot read the system resolver configuration")]
    SystemConfig(#[source] NetError),
    #[error("cannot build the resolver")]
    Build(#[source] NetError),
}

/// A caching resolver built from `dns` settings.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<TokioResolver>,
    timeout: Duration,
}

impl Resolver {
    /// Builds a resolver: the configured name servers, or the system configuration.
    pub fn new(dns: &Dns) -> Result<Resolver, ResolverError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if dns.nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(ResolverError::SystemConfig)?
        } else {
            let mut cfg = ResolverConfig::default();
            for ns in &dns.nameservers {
                let mut server = NameServerConfig::udp_and_tcp(ns.ip());
                for c in &mut server.connections {
                    c.port = ns.port();
                }
                cfg.add_name_server(server);
            }
            let mut b = TokioResolver::builder_with_config(cfg, provider);
            // The configured servers are authoritative; /etc/hosts is not consulted.
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            b
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.positive_max_ttl = Some(dns.cache_ttl);
        opts.negative_max_ttl = Some(dns.negative_ttl);
        opts.timeout = dns.timeout;
        opts.attempts = 1;
        opts.cache_size = 4096;
        let inner = builder.build().map_err(ResolverError::Build)?;
        Ok(Resolver { inner: Arc::new(inner), timeout: dns.timeout })
    }

    /// Resolves `name` to at most [`MAX_CANDIDATES`] addresses. `localhost` and `*.localhost`
    /// resolve to loopback without a query (RFC 6761 §6.3), so the policy sees what they are.
    pub async fn resolve(&self, name: &HostName, metrics: &ProxyMetrics) -> Result<Vec<IpAddr>, TunnelError> {
        let n = name.as_str();
        if n == "localhost" || n.ends_with(".localhost") {
            metrics.dns_lookups.with_label_values(&["local"]).inc();
            return Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)]);
        }
        // Fully qualified, so no search domain is tried.
        let fqdn = format!("{n}.");
        // The resolver's own timeout applies per query; this bounds the whole lookup.
        let result = match timeout(self.timeout + Duration::from_millis(500), self.inner.lookup_ip(fqdn)).await {
            Err(_) => Err(TunnelError::ResolveTimeout),
            Ok(Err(e)) => Err(classify_error(&e)),
            Ok(Ok(lookup)) => {
                let addrs: Vec<IpAddr> = lookup.iter().take(MAX_CANDIDATES).collect();
                if addrs.is_empty() {
                    Err(TunnelError::ResolveNotFound)
                } else {
                    Ok(addrs)
                }
            }
        };
        let label = match &result {
            Ok(_) => "success",
            Err(TunnelError::ResolveNotFound) => "not_found",
            Err(TunnelError::ResolveTimeout) => "timeout",
            Err(_) => "error",
        };
        metrics.dns_lookups.with_label_values(&[label]).inc();
        result
    }
}

fn classify_error(e: &NetError) -> TunnelError {
    if e.is_nx_domain() || e.is_no_records_found() {
        TunnelError::ResolveNotFound
    } else if matches!(e, NetError::Timeout) {
        TunnelError::ResolveTimeout
    } else {
        TunnelError::ResolveFailed
    }
}

/// Connects to the candidates in order until one accepts, all within `budget`.
/// Only these exact addresses are dialled: they are the ones the policy approved.
pub async fn connect(
    candidates: &[IpAddr],
    port: u16,
    budget: Duration,
    metrics: &ProxyMetrics,
) -> Result<TcpStream, TunnelError> {
    let started = Instant::now();
    let deadline = started + budget;
    let mut last_err = None;
    for &ip in candidates {
        match timeout_at(deadline, TcpStream::connect(SocketAddr::new(ip, port))).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                metrics
                    .upstream_connect_duration
                    .with_label_values(&["success"])
                    .observe(started.elapsed().as_secs_f64());
                return Ok(stream);
            }
            Ok(Err(e)) => last_err = Some(e),
            Err(_) => {
                metrics
                    .upstream_connect_duration
                    .with_label_values(&["timeout"])
                    .observe(started.elapsed().as_secs_f64());
                return Err(TunnelError::UpstreamTimeout);
            }
        }
    }
    metrics.upstream_connect_duration.with_label_values(&["error"]).observe(started.elapsed().as_secs_f64());
    Err(TunnelError::UpstreamRefused(last_err.unwrap_or_else(|| std::io::Error::other("no candidate address"))))
}
