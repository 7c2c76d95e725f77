//! One client connection: admission (connection caps) → optional TLS handshake → what the
//! listener serves, read once: a tunnel listener's fixed upstream, a transparent listener's
//! redirected connection, or a forward listener's first request head → CONNECT or plain HTTP. Errors before a tunnel or an HTTP exchange become a
//! status answer and a lingering close.

use std::sync::Arc;

use proxy_config::{ListenerHttp, ProxyProtocol, Serves};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::access;
use crate::context::ConnCtx;
use crate::error::TunnelError;
use crate::forward::{self, connect};
use crate::inbound_proxy;
use crate::negotiate::{self, Head};
use crate::relay::IntoHalves;
use crate::terminate;
use crate::tls::handshake::{HandshakeError, TlsFacts};
use crate::tls::TlsServer;
use crate::transparent;

/// Serves one accepted connection to completion.
pub async fn serve(mut stream: TcpStream, mut ctx: ConnCtx) {
    let inner = ctx.inner.clone();
    // This connection's listener, looked up once in the snapshot it was accepted under.
    let snapshot = ctx.snapshot.clone();
    let Some(listener) = snapshot.config.listeners.iter().find(|l| *l.name == *ctx.listener) else {
        // Accepted by a listener its own configuration does not name: cannot happen (the accept
        // loop's snapshot carries its listener); close rather than guess what it serves.
        tracing::debug!(conn = ctx.id, "connection of a listener its configuration does not name");
        return;
    };
    let limits = snapshot.config.limits;
    // A trusted load balancer in front names the real client first; from any other peer no
    // header is ever read (a forward listener's parser refuses one with 400).
    let peer = ctx.peer.ip().to_canonical();
    if listener.accept_proxy_protocol_from.iter().any(|n| n.contains(&peer)) {
        let read = Box::pin(timeout(limits.request_head_timeout, inbound_proxy::read(&mut stream)));
        match read.await {
            Ok(Ok(Some(client))) => ctx.peer = client,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => return access::rejected(&ctx, &e, None, None),
            Err(_) => return access::rejected(&ctx, &TunnelError::HeadTimeout, None, None),
        }
    }
    let admitted = inner
        .limiter
        .acquire(ctx.peer.ip(), limits.max_connections, limits.max_connections_per_client)
        .map(|p| ctx.slot.admit(p));
    // The address the client reached is asked of the kernel only where a PROXY header names it.
    if matches!(listener.serves, Serves::Tunnel { send_proxy_protocol, .. } if send_proxy_protocol != ProxyProtocol::None)
    {
        ctx.local = stream.local_addr().ok();
    }
    // The task's size is the largest state of this future, held for the connection's whole life
    // (an idle keep-alive HTTP connection waits in it; an established tunnel is relayed by a task
    // of its own): the paths that need large states are boxed, so the task stays small.
    match ctx.tls.clone() {
        None => {
            let deadline = ctx.accepted + limits.request_head_timeout;
            match (admitted, &listener.serves) {
                (Ok(()), Serves::Tunnel { upstream, send_proxy_protocol, route }) => {
                    Box::pin(terminate::serve(stream, &ctx, upstream, *send_proxy_protocol, *route, None)).await
                }
                (Ok(()), Serves::Forward(http)) => dispatch(stream, &ctx, deadline, http).await,
                (Ok(()), Serves::Transparent(settings)) => {
                    Box::pin(transparent::serve(stream, &ctx, *settings, deadline)).await
                }
                // A tunnel or transparent listener's clients speak no HTTP to the proxy: just close.
                (Err(e), Serves::Tunnel { .. } | Serves::Transparent(_)) => access::rejected(&ctx, &e, None, None),
                (Err(e), Serves::Forward(_)) => Box::pin(reject(stream, &ctx, e)).await,
            }
        }
        Some(server) => Box::pin(serve_tls(stream, server, &ctx, admitted, &listener.serves)).await,
    }
}

async fn reject(mut stream: TcpStream, ctx: &ConnCtx, e: TunnelError) {
    connect::reject(ctx, &mut stream, e.into(), None).await;
}

async fn serve_tls(
    stream: TcpStream,
    server: Arc<TlsServer>,
    ctx: &ConnCtx,
    admitted: Result<(), TunnelError>,
    serves: &Serves,
) {
    let Ok(()) = admitted else {
        // Answering in plain text would be noise to a TLS client: just close.
        return;
    };
    let m = &ctx.inner.metrics;
    let limits = ctx.snapshot.config.limits;
    let started = Instant::now();
    let outcome = match timeout(limits.tls_handshake_timeout, server.accept(stream)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Io(std::io::ErrorKind::TimedOut.into())),
    };
    m.tls_handshake_duration.with_label_values(&[&ctx.listener]).observe(started.elapsed().as_secs_f64());
    let tls = match outcome {
        Ok(s) => s,
        Err(e) => {
            m.tls_handshakes.with_label_values(&[&ctx.listener, e.label(), "unknown"]).inc();
            if !matches!(e, HandshakeError::AcmeChallenge) {
                access::rejected(ctx, &TunnelError::TlsHandshake(e), None, None);
            }
            return;
        }
    };
    let facts = TlsFacts::of(tls.get_ref().1);
    m.tls_handshakes.with_label_values(&[&ctx.listener, "success", facts.version]).inc();
    match serves {
        Serves::Tunnel { upstream, send_proxy_protocol, route } => {
            terminate::serve(tls, ctx, upstream, *send_proxy_protocol, *route, Some(facts)).await;
        }
        Serves::Forward(http) => dispatch(tls, ctx, Instant::now() + limits.request_head_timeout, http).await,
        // The configuration refuses TLS on a transparent listener (it relays the client's TLS).
        Serves::Transparent(_) => {}
    }
}

/// Reads the first request head and hands the connection to the path that serves it.
async fn dispatch<S: IntoHalves + 'static>(mut io: S, ctx: &ConnCtx, deadline: Instant, http: &ListenerHttp) {
    let max_head = ctx.snapshot.config.limits.max_request_head_bytes;
    let head = tokio::select! {
        r = Box::pin(negotiate::read_head(&mut io, max_head, deadline)) => r,
        // At the drain deadline a connection still sending its head gets 503.
        () = ctx.inner.shutdown.cancelled() => Err(TunnelError::Draining),
    };
    // The head may have taken until after a reload: the request is judged by the configuration in
    // force now. Every request is admitted (memory pressure, the client's rate bucket), CONNECT
    // here and each HTTP request as it arrives; established tunnels are never touched.
    let refreshed = ctx.current();
    let ctx = refreshed.as_ref().unwrap_or(ctx);
    let head = head.and_then(|h| match h {
        Head::Connect(_) => ctx.admit_request().map(|()| h),
        Head::Other(_) => Ok(h),
    });
    match head {
        Ok(Head::Connect(request)) => connect::serve(io, request, ctx).await,
        Ok(Head::Other(buffered)) if http.enabled => {
            Box::pin(forward::http::serve(io, buffered, ctx, http.clone())).await
        }
        Ok(Head::Other(_)) => Box::pin(connect::reject(ctx, &mut io, TunnelError::MethodNotAllowed.into(), None)).await,
        Err(e) => Box::pin(connect::reject(ctx, &mut io, e.into(), None)).await,
    }
}
