//! One client connection: (TLS handshake) → negotiate → authorize → dial → respond → relay,
//! then one access event. Errors before the 200 become a status answer and a lingering close.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use proxy_config::{Decision, Host, Policy, PreDecision};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use crate::accept::Permit;
use crate::app::{lock, Inner, TunnelEntry};
use crate::dial;
use crate::error::{ErrorChain, Side, TunnelError};
use crate::metrics::GaugeGuard;
use crate::negotiate::{self, ConnectRequest};
use crate::relay::{self, ByteCounters, CloseReason, RelayOutcome, Stops};
use crate::snapshot::SharedSnapshot;

/// What a listener hands to each connection.
pub struct ConnCtx {
    pub inner: Arc<Inner>,
    pub listener: Arc<str>,
    pub snapshot: SharedSnapshot,
    pub tls: Option<TlsAcceptor>,
    pub id: u64,
    pub peer: SocketAddr,
    pub accepted: Instant,
}

/// The result of the stages before the relay.
struct Established {
    upstream: TcpStream,
    /// The addresses the decision was made on (for re-evaluation on reload).
    addrs: Vec<IpAddr>,
    request: ConnectRequest,
    rule: String,
    limits: proxy_config::TunnelLimits,
}

/// Serves one accepted connection to completion.
pub async fn serve(stream: TcpStream, ctx: ConnCtx) {
    let inner = ctx.inner.clone();
    let _open = GaugeGuard::new(inner.metrics.connections_open.clone());
    let limits = ctx.snapshot.config.limits;
    let permit = inner.limiter.acquire(ctx.peer.ip(), limits.max_connections, limits.max_connections_per_client);
    let _ = stream.set_nodelay(true);
    // The task's size is the largest state of this future, held for the tunnel's whole life:
    // everything that is not the plain relay is boxed, so an idle plain tunnel stays small.
    match ctx.tls.clone() {
        None => serve_plain(stream, &ctx, permit).await,
        Some(acceptor) => Box::pin(serve_tls(stream, acceptor, &ctx, permit)).await,
    }
}

async fn serve_plain(mut stream: TcpStream, ctx: &ConnCtx, permit: Result<Permit, TunnelError>) {
    let _permit = match permit {
        Ok(p) => p,
        Err(e) => return Box::pin(finish_rejected(ctx, &mut stream, e, None)).await,
    };
    let deadline = ctx.accepted + ctx.snapshot.config.limits.request_head_timeout;
    match Box::pin(establish(&mut stream, ctx, deadline)).await {
        Ok(est) => {
            let (cr, cw) = stream.into_split();
            tunnel(cr, cw, est, ctx).await;
        }
        Err((e, rule)) => Box::pin(finish_rejected(ctx, &mut stream, e, rule)).await,
    }
}

async fn serve_tls(stream: TcpStream, acceptor: TlsAcceptor, ctx: &ConnCtx, permit: Result<Permit, TunnelError>) {
    let Ok(_permit) = permit else {
        // Answering in plain text would be noise to a TLS client: just close.
        return;
    };
    let m = &ctx.inner.metrics;
    let limits = ctx.snapshot.config.limits;
    let mut tls = match timeout(limits.tls_handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => {
            m.tls_handshakes.with_label_values(&[&ctx.listener, "success"]).inc();
            s
        }
        Ok(Err(e)) => {
            m.tls_handshakes.with_label_values(&[&ctx.listener, "failure"]).inc();
            record(ctx, &TunnelError::TlsHandshake(e), None);
            return;
        }
        Err(_) => {
            m.tls_handshakes.with_label_values(&[&ctx.listener, "failure"]).inc();
            record(ctx, &TunnelError::TlsHandshake(std::io::ErrorKind::TimedOut.into()), None);
            return;
        }
    };
    let deadline = Instant::now() + limits.request_head_timeout;
    match Box::pin(establish(&mut tls, ctx, deadline)).await {
        Ok(est) => {
            let (cr, cw) = tokio::io::split(tls);
            tunnel(cr, cw, est, ctx).await;
        }
        Err((e, rule)) => finish_rejected(ctx, &mut tls, e, rule).await,
    }
}

async fn finish_rejected<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &ConnCtx,
    io: &mut S,
    err: TunnelError,
    rule: Option<String>,
) {
    record(ctx, &err, rule.as_deref());
    if let Some(resp) = negotiate::error_response(&err) {
        let _ = negotiate::reject(io, &resp).await;
    }
}

/// Counts and logs a connection that did not become a tunnel.
fn record(ctx: &ConnCtx, err: &TunnelError, rule: Option<&str>) {
    let m = &ctx.inner.metrics;
    m.tunnel_requests.with_label_values(&[&ctx.listener, err.kind()]).inc();
    debug!(conn = ctx.id, result = err.kind(), side = ?err.side(), error = %ErrorChain(err), "connection rejected");
    let logging = ctx.snapshot.config.logging;
    if logging.access_log && !matches!(err, TunnelError::ClientClosed) {
        info!(
            target: "tunnelgate::access",
            conn = ctx.id,
            listener = &*ctx.listener,
            rule = rule.unwrap_or(""),
            result = err.kind(),
            status = err.status().unwrap_or(0),
            client = logging.log_client_addresses.then(|| ctx.peer.ip().to_string()),
            "request rejected"
        );
    }
}

/// Reads, authorizes and dials; writes the 200 on success. On error returns the error and the
/// deciding rule (if a rule decided).
async fn establish<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    ctx: &ConnCtx,
    deadline: Instant,
) -> Result<Established, (TunnelError, Option<String>)> {
    let inner = &ctx.inner;
    let cfg = &ctx.snapshot.config;
    let force = inner.stops.shutdown.clone();
    let work = async {
        let request =
            negotiate::read_head(io, cfg.limits.max_request_head_bytes, deadline).await.map_err(|e| (e, None))?;
        let (addrs, rule, limits) = authorize(ctx, &request).await?;
        let upstream = dial::connect(&addrs, request.authority.port, cfg.relay.connect_timeout, &inner.metrics)
            .await
            .map_err(|e| (e, Some(rule.clone())))?;
        Ok::<_, (TunnelError, Option<String>)>(Established { upstream, addrs, request, rule, limits })
    };
    // At the drain deadline a connection still negotiating gets 503 instead of hanging on.
    let est = tokio::select! {
        r = work => r?,
        () = force.cancelled() => return Err((TunnelError::Draining, None)),
    };
    io.write_all(negotiate::ESTABLISHED)
        .await
        .map_err(|e| (TunnelError::Io { side: Side::Client, source: e }, None))?;
    Ok(est)
}

/// Decides the request; returns the approved candidate addresses, the deciding rule and limits.
async fn authorize(
    ctx: &ConnCtx,
    request: &ConnectRequest,
) -> Result<(Vec<IpAddr>, String, proxy_config::TunnelLimits), (TunnelError, Option<String>)> {
    let policy: &Policy = &ctx.snapshot.config.policy;
    let client = ctx.peer.ip();
    let auth = &request.authority;
    let m = &ctx.inner.metrics;
    let deny = |d: &Decision| -> (TunnelError, Option<String>) {
        let (rule, reason) = match d {
            Decision::Deny { rule, reason } => (*rule, *reason),
            Decision::Allow { .. } => (None, proxy_config::DenyReason::Default),
        };
        let name = policy.rule_name(rule).to_owned();
        m.policy_decisions.with_label_values(&["deny", &name]).inc();
        (TunnelError::Denied(reason), Some(name))
    };
    let addrs = match &auth.host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => {
            if let PreDecision::Deny(d) = policy.pre_resolve(client, name, auth.port) {
                return Err(deny(&d));
            }
            ctx.snapshot.resolver.resolve(name, m).await.map_err(|e| (e, None))?
        }
    };
    match policy.decide(client, &auth.host, auth.port, &addrs) {
        Decision::Allow { rule, limits } => {
            let name = policy.rule_name(rule).to_owned();
            if addrs.iter().any(|a| ctx.inner.is_self(*a, auth.port)) {
                m.policy_decisions.with_label_values(&["deny", "self"]).inc();
                return Err((TunnelError::SelfConnect, Some("self".to_owned())));
            }
            m.policy_decisions.with_label_values(&["allow", &name]).inc();
            Ok((addrs, name, limits))
        }
        d => Err(deny(&d)),
    }
}

async fn tunnel<CR, CW>(cr: CR, cw: CW, est: Established, ctx: &ConnCtx)
where
    CR: relay::RelayRead,
    CW: AsyncWrite + Unpin + Send,
{
    let inner = &ctx.inner;
    let m = &inner.metrics;
    m.tunnel_requests.with_label_values(&[&ctx.listener, "established"]).inc();
    let _active = GaugeGuard::new(m.tunnels_active.with_label_values(&[&ctx.listener]));
    inner.active_tunnels.fetch_add(1, Ordering::Relaxed);
    let revoke = tokio_util::sync::CancellationToken::new();
    let stops = Stops { shutdown: inner.stops.shutdown.clone(), revoke: revoke.clone() };
    let auth = &est.request.authority;
    // Registered so that a reload with `reevaluateOnReload` can re-decide this tunnel.
    lock(&inner.tunnels).insert(
        ctx.id,
        TunnelEntry {
            client: ctx.peer.ip(),
            host: auth.host.clone(),
            port: auth.port,
            addrs: est.addrs.clone(),
            revoke,
        },
    );
    let counters = ByteCounters {
        up: m.relayed_bytes.with_label_values(&["upstream"]),
        down: m.relayed_bytes.with_label_values(&["downstream"]),
    };
    let (ur, uw) = est.upstream.into_split();
    let out: RelayOutcome = relay::run(cr, cw, ur, uw, &est.request.leftover, est.limits, &stops, &counters).await;
    inner.active_tunnels.fetch_sub(1, Ordering::Relaxed);
    lock(&inner.tunnels).remove(&ctx.id);
    lock(&inner.tunnels).remove(&ctx.id);
    if out.reason == CloseReason::Shutdown {
        m.drain_forced_closes.inc();
    }
    m.tunnel_duration.with_label_values(&[out.reason.as_str()]).observe(out.duration.as_secs_f64());
    debug!(
        conn = ctx.id,
        close = out.reason.as_str(),
        bytes_up = out.bytes_up,
        bytes_down = out.bytes_down,
        "tunnel closed"
    );
    let logging = ctx.snapshot.config.logging;
    if logging.access_log {
        info!(
            target: "tunnelgate::access",
            conn = ctx.id,
            listener = &*ctx.listener,
            rule = %est.rule,
            result = "established",
            status = 200u16,
            close = out.reason.as_str(),
            bytes_up = out.bytes_up,
            bytes_down = out.bytes_down,
            duration_ms = u64::try_from(out.duration.as_millis()).unwrap_or(u64::MAX),
            client = logging.log_client_addresses.then(|| ctx.peer.ip().to_string()),
            destination = logging.log_targets.then(|| est.request.authority.to_string()),
            "tunnel closed"
        );
    }
}
