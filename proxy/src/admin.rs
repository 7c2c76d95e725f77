//! The admin HTTP server on its own port, with caps of its own (apart from the proxy's): `/metrics`,
//! `/healthz` (alive), `/readyz` (serving and not draining), `/config` (what is in force;
//! `?since=N&timeout=S` long-polls until it changes, so the operator's rollout view costs one idle
//! connection per proxy, not a polling storm). With `admin.configTokenFile`, `/config` answers only
//! a request that carries the token (the operator's, and `kubectl tunnelgate status`'s); probes and
//! metrics stay open to whoever reaches the port.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::conn_limit::ConnLimiter;
use crate::state::Inner;

/// Most admin connections open at once: the kubelet's probes, Prometheus and the operator need a
/// handful; a client opening thousands (idle, or long-polling `/config`) must not grow the proxy's
/// memory until egress is shed.
const MAX_CONNECTIONS: usize = 256;
/// Most admin connections open at once from one address.
const MAX_CONNECTIONS_PER_CLIENT: usize = 16;
/// Most `/config` long-polls waiting at once; past it a long-poll is answered at once.
const MAX_LONG_POLLS: usize = 64;

/// Serves admin requests on `listener` until `stop` is cancelled.
pub async fn run(inner: Arc<Inner>, listener: TcpListener, stop: CancellationToken) {
    // Connections are counted as the proxy's are, under the admin server's own caps.
    let limiter = Arc::new(ConnLimiter::default());
    let long_polls = Arc::new(Semaphore::new(MAX_LONG_POLLS));
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over a cap the connection is closed at once: nothing is read or held for it.
        let Ok(permit) = limiter.acquire(peer.ip().to_canonical(), MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT) else {
            drop(stream);
            continue;
        };
        let inner = inner.clone();
        let long_polls = long_polls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let inner = inner.clone();
                let long_polls = long_polls.clone();
                async move {
                    if req.uri().path() == "/config" && !token_accepted(&inner, &req) {
                        return Ok::<_, Infallible>(unauthorized());
                    }
                    if req.uri().path() == "/config" && req.method() == Method::GET {
                        return Ok::<_, Infallible>(config(&inner, &long_polls, req.uri().query()).await);
                    }
                    Ok::<_, Infallible>(route(&inner, &req))
                }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            // Long enough for a long-polled /config (at most LONG_POLL_MAX) plus the request.
            let _ = tokio::time::timeout(LONG_POLL_MAX + std::time::Duration::from_secs(30), conn).await;
        });
    }
}

/// Longest `/config` long-poll.
const LONG_POLL_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// `/config`; with `since=N`, waits (up to `timeout` seconds, at most 60) until the change counter
/// differs from N, unless every long-poll place is taken (then it answers at once).
async fn config(inner: &Inner, long_polls: &Arc<Semaphore>, query: Option<&str>) -> Response<Full<Bytes>> {
    let param =
        |name: &str| query?.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse::<u64>().ok());
    let mut changes = inner.control.watch_changes();
    if let Some(since) = param("since") {
        if let Ok(_place) = long_polls.clone().try_acquire_owned() {
            let wait = std::time::Duration::from_secs(param("timeout").unwrap_or(30)).min(LONG_POLL_MAX);
            let _ = tokio::time::timeout(wait, changes.wait_for(|n| *n != since)).await;
        }
    }
    let counter = *changes.borrow();
    json(&config_status(inner, counter))
}

/// What `/config` reports: the configuration in force, the last reload's outcome, the change
/// counter and the dry-run counts (the same document for GET and HEAD).
fn config_status(inner: &Inner, changes: u64) -> proxy_config::status::ConfigStatus {
    let mut doc = inner.snapshot().describe(inner.control.reload_failure());
    doc.changes = changes;
    doc.dry_run = inner.control.dry_run_counts();
    doc
}

/// Whether `req` may read `/config`: no token is configured, or it carries the token.
fn token_accepted(inner: &Inner, req: &Request<Incoming>) -> bool {
    match &inner.snapshot().admin_token {
        None => true,
        Some(token) => req.headers().get(proxy_config::ADMIN_TOKEN_HEADER).is_some_and(|v| token.accepts(v.as_bytes())),
    }
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        format!("/config requires the admin token in the {} header\n", proxy_config::ADMIN_TOKEN_HEADER),
        "text/plain",
    );
    r.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    r
}

fn json(doc: &proxy_config::status::ConfigStatus) -> Response<Full<Bytes>> {
    match serde_json::to_string(doc) {
        Ok(body) => text(StatusCode::OK, body, "application/json"),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the status\n", "text/plain"),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>, content_type: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn route(inner: &Inner, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n", "text/plain");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut buf = Vec::new();
            match TextEncoder::new().encode(&inner.registry.gather(), &mut buf) {
                Ok(()) => text(StatusCode::OK, buf, "text/plain; version=0.0.4"),
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n", "text/plain"),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
        "/readyz" => {
            if !inner.is_ready() {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n", "text/plain")
            } else if inner.memory.is_overloaded() {
                // Clients on this node see it, and a load balancer can steer new connections away.
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: memory over budget, shedding new requests\n",
                    "text/plain",
                )
            } else {
                text(StatusCode::OK, "ready\n", "text/plain")
            }
        }
        "/config" => json(&config_status(inner, *inner.control.watch_changes().borrow())),
        _ => text(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
    }
}
