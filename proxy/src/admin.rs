//! The admin HTTP server on its own port, with caps of its own (apart from the proxy's): `/metrics`,
//! `/healthz` (alive), `/readyz` (serving and not draining), `/config` (what is in force;
//! `?since=N&timeout=S` long-polls until it changes, so the operator's rollout view costs one idle
//! connection per proxy, not a polling storm).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::state::Inner;

/// Most admin connections open at once: the kubelet's probes, Prometheus and the operator need a
/// handful; a client opening thousands (idle, or long-polling `/config`) must not grow the proxy's
/// memory until egress is shed.
const MAX_CONNECTIONS: usize = 256;
/// Most admin connections open at once from one address.
const MAX_CONNECTIONS_PER_CLIENT: usize = 16;
/// Most `/config` long-polls waiting at once; past it a long-poll is answered at once.
const MAX_LONG_POLLS: usize = 64;

/// The admin server's own caps: connections in all, per client address, and waiting long-polls.
#[derive(Default)]
struct Caps {
    per_client: Mutex<HashMap<IpAddr, usize>>,
    total: std::sync::atomic::AtomicUsize,
    long_polls: std::sync::atomic::AtomicUsize,
}

/// One admitted admin connection; released when dropped.
struct Admitted {
    caps: Arc<Caps>,
    client: IpAddr,
}

impl Caps {
    fn admit(self: &Arc<Self>, client: IpAddr) -> Option<Admitted> {
        use std::sync::atomic::Ordering;
        let mut per = self.per_client.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = per.entry(client).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_CLIENT || self.total.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            if *n == 0 {
                per.remove(&client);
            }
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Admitted { caps: self.clone(), client })
    }

    /// A place among the waiting long-polls, or `None` when they are all taken.
    fn long_poll(self: &Arc<Self>) -> Option<LongPoll> {
        use std::sync::atomic::Ordering;
        let taken = self.long_polls.fetch_add(1, Ordering::AcqRel);
        if taken >= MAX_LONG_POLLS {
            self.long_polls.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(LongPoll(self.clone()))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.caps.total.fetch_sub(1, Ordering::Relaxed);
        let mut per = self.caps.per_client.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = per.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.client);
            }
        }
    }
}

struct LongPoll(Arc<Caps>);

impl Drop for LongPoll {
    fn drop(&mut self) {
        self.0.long_polls.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Serves admin requests on `listener` until `stop` is cancelled.
pub async fn run(inner: Arc<Inner>, listener: TcpListener, stop: CancellationToken) {
    let caps = Arc::new(Caps::default());
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
        let Some(admitted) = caps.admit(peer.ip().to_canonical()) else {
            drop(stream);
            continue;
        };
        let inner = inner.clone();
        let caps = caps.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let svc = service_fn(move |req| {
                let inner = inner.clone();
                let caps = caps.clone();
                async move {
                    if req.uri().path() == "/config" && req.method() == Method::GET {
                        return Ok::<_, Infallible>(config(&inner, &caps, req.uri().query()).await);
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
async fn config(inner: &Inner, caps: &Arc<Caps>, query: Option<&str>) -> Response<Full<Bytes>> {
    let param =
        |name: &str| query?.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse::<u64>().ok());
    let mut changes = inner.watch_changes();
    if let Some(since) = param("since") {
        if let Some(_place) = caps.long_poll() {
            let wait = std::time::Duration::from_secs(param("timeout").unwrap_or(30)).min(LONG_POLL_MAX);
            let _ = tokio::time::timeout(wait, changes.wait_for(|n| *n != since)).await;
        }
    }
    let counter = *changes.borrow();
    let mut doc = inner.snapshot().describe(inner.reload_failure());
    doc["changes"] = serde_json::json!(counter);
    doc["dryRun"] = inner.dry_run_counts();
    text(StatusCode::OK, doc.to_string(), "application/json")
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
        "/config" => {
            text(StatusCode::OK, inner.snapshot().describe(inner.reload_failure()).to_string(), "application/json")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
    }
}
