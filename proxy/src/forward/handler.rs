//! What the plain-HTTP path and its upgrades share: the handler of one client connection (its
//! context, listener settings and request watchdog), the upstream exchange (pooled or new
//! connection to an approved address, bounded wait for the response head), the proxy's own error
//! answers, and each request's accounting (metrics and access event, once, when its response body
//! ends).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use proxy_config::{Authority, ListenerHttp, Route};
use tokio::time::{timeout, Instant};
use tracing::{debug, info};

use super::headers;
use super::limits::{BoxError, Budget, Direction, Limited, Watchdog};
use super::pool::{PoolKey, UpstreamBody};
use crate::authorize::{Authorized, Rejection};
use crate::context::ConnCtx;
use crate::dial;
use crate::error::{ErrorChain, TunnelError};
use crate::negotiate::{self};
use crate::parent::{self, HttpVia, ParentStream};

/// The body of every response the proxy sends on this path.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest upstream response head; a larger one is answered 502.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Serves the requests of one client connection.
pub(crate) struct Handler {
    pub(crate) ctx: ConnCtx,
    pub(crate) http: ListenerHttp,
    /// The time limits of the request in flight on this connection.
    pub(crate) watchdog: Arc<Watchdog>,
    /// `tunnelgate_relayed_bytes_total` of this listener, up and down (looked up once per
    /// connection, not per request).
    pub(crate) relayed: Arc<(IntCounter, IntCounter)>,
}

/// The method label of `tunnelgate_http_requests_total`: a closed set.
pub(super) fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn code_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A connection for one request: to the target, or to a parent proxy (`via`: then the request
/// goes in absolute form, with the parent's credentials).
pub(crate) struct Dialed {
    pub(crate) sender: SendRequest<UpstreamBody>,
    pub(crate) key: PoolKey,
    pub(crate) via: Option<HttpVia>,
}

impl Dialed {
    /// Makes `req` (origin-form, for `authority` allowed at `addrs`) what this connection's peer
    /// expects: unchanged for the target; absolute-form with `Proxy-Authorization` for a parent.
    pub(crate) fn address(
        &self,
        req: &mut Request<UpstreamBody>,
        authority: &Authority,
        addrs: &[std::net::IpAddr],
    ) -> Result<(), TunnelError> {
        let Some(via) = &self.via else { return Ok(()) };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let absolute = via.absolute(&authority.host, authority.port, addrs, path);
        *req.uri_mut() = absolute.parse().map_err(|_| TunnelError::MalformedRequest("invalid path"))?;
        if let Some(auth) = &via.authorization {
            let value =
                HeaderValue::from_str(auth).map_err(|_| TunnelError::MalformedRequest("invalid credentials"))?;
            req.headers_mut().insert(header::PROXY_AUTHORIZATION, value);
        }
        Ok(())
    }
}

/// What one request was, for its metrics and access event.
pub(crate) struct Exchange {
    pub(crate) method: &'static str,
    pub(crate) started: Instant,
    pub(crate) rule: Option<String>,
    pub(crate) authority: Option<Authority>,
    /// The authenticated proxy user (logged only with `logging.logUsers`).
    pub(crate) user: Option<String>,
    /// The relay limits of a forwarded request, and what it moved.
    pub(crate) budget: Option<Arc<Budget>>,
    /// The parent proxy that carried it, when one did.
    pub(crate) parent: Option<String>,
}

impl Exchange {
    /// The access event's decision and reason for a request the policy allowed.
    pub(crate) fn allowed(&self) -> (&'static str, &'static str) {
        ("allow", crate::access::allow_reason(self.rule.as_deref().unwrap_or("default")))
    }
}

impl Handler {
    /// An idle pooled connection to one of the approved addresses (or, on a route through
    /// parents, to one of them for this target), with the same Host.
    pub(super) async fn pooled(&self, authorized: &Authorized, port: u16, host: &str) -> Option<Dialed> {
        let snapshot = &self.ctx.snapshot;
        let idle = snapshot.config.http.upstream_idle_timeout;
        let client = (self.ctx.peer.ip().to_canonical(), authorized.user.clone());
        let parents = &snapshot.config.parents;
        let keys: Vec<(PoolKey, Option<HttpVia>)> = match authorized.route {
            Route::Direct => authorized
                .addrs
                .iter()
                .map(|a| {
                    let addr = std::net::SocketAddr::new(*a, port);
                    (PoolKey { addr, host: host.to_owned(), client: client.clone(), via: None }, None)
                })
                .collect(),
            route => {
                let first = authorized.addrs.first()?;
                parents
                    .members(route)
                    .into_iter()
                    .filter_map(|i| snapshot.parents.http_via(parents, i))
                    .map(|via| {
                        let addr = std::net::SocketAddr::new(*first, port);
                        let key = PoolKey {
                            addr,
                            host: host.to_owned(),
                            client: client.clone(),
                            via: Some(via.parent.clone()),
                        };
                        (key, Some(via))
                    })
                    .collect()
            }
        };
        for (key, via) in keys {
            if let Some(sender) = self.ctx.inner.upstream_pool.checkout(&key, idle).await {
                self.ctx.inner.metrics.upstream_connections.with_label_values(&["reused"]).inc();
                return Some(Dialed { sender, key, via });
            }
        }
        None
    }

    /// A new upstream connection to one of the approved addresses, or through the route's parent.
    pub(crate) async fn dial(
        &self,
        authorized: &Authorized,
        port: u16,
        host: &str,
        upgrades: bool,
    ) -> Result<Dialed, TunnelError> {
        let m = &self.ctx.inner.metrics;
        let snapshot = &self.ctx.snapshot;
        let client = (self.ctx.peer.ip().to_canonical(), authorized.user.clone());
        let (io, key, via) = match authorized.route {
            Route::Direct => {
                let connect_timeout = snapshot.config.relay.connect_timeout;
                let stream = dial::connect(&authorized.addrs, port, connect_timeout, m).await?;
                let addr = stream.peer_addr().map_err(TunnelError::UpstreamRefused)?;
                (ParentStream::Tcp(stream), PoolKey { addr, host: host.to_owned(), client, via: None }, None)
            }
            route => {
                let first = authorized.addrs.first().copied().ok_or(TunnelError::ResolveNotFound)?;
                let (stream, via) =
                    parent::http_connection(&snapshot.parenting(), &self.ctx.inner.parent_health, m, route).await?;
                let addr = std::net::SocketAddr::new(first, port);
                let key = PoolKey { addr, host: host.to_owned(), client, via: Some(via.parent.clone()) };
                (stream, key, Some(via))
            }
        };
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .title_case_headers(true)
            .max_buf_size(MAX_RESPONSE_HEAD)
            .handshake(TokioIo::new(io))
            .await
            .map_err(TunnelError::UpstreamResponse)?;
        if upgrades {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
        } else {
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        m.upstream_connections.with_label_values(&["new"]).inc();
        Ok(Dialed { sender, key, via })
    }

    /// Sends `req` and waits for the response head (bounded by `http.responseHeadTimeout`).
    pub(crate) async fn send(
        &self,
        sender: &mut SendRequest<UpstreamBody>,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, TunnelError> {
        let limit = self.ctx.snapshot.config.http.response_head_timeout;
        match timeout(limit, sender.send_request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            // The client's own body was malformed (bad chunk size, oversized extensions, ...).
            Ok(Err(e)) if e.is_user() => Err(TunnelError::MalformedRequest("invalid request body")),
            Ok(Err(e)) => Err(TunnelError::UpstreamResponse(e)),
            Err(_) => Err(TunnelError::UpstreamResponseTimeout),
        }
    }

    pub(super) fn bad_gateway(&self, ex: &Exchange) -> Response<ResponseBody> {
        let mut resp = self.respond_error(
            ex,
            StatusCode::BAD_GATEWAY,
            "upstream answered 101 to a request that asked for no upgrade",
            None,
            ("error", "upstream_bad_response"),
        );
        resp.headers_mut().insert("proxy-status", HeaderValue::from_static("tunnelgate; error=http_upgrade_failed"));
        resp
    }

    /// The answer to a rejected request; counted and logged.
    pub(super) fn error(&self, ex: &Exchange, r: Rejection) -> Response<ResponseBody> {
        let status = r.error.status().and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::BAD_GATEWAY);
        debug!(conn = self.ctx.id, result = r.error.kind(), error = %ErrorChain(&r.error), "HTTP request rejected");
        let mut resp = self.respond_error(ex, status, &r.error.to_string(), r.error.retry_after(), r.error.decision());
        if let Ok(v) = HeaderValue::from_str(&r.error.proxy_status()) {
            resp.headers_mut().insert("proxy-status", v);
        }
        resp
    }

    fn respond_error(
        &self,
        ex: &Exchange,
        status: StatusCode,
        message: &str,
        retry_after: Option<u64>,
        outcome: (&'static str, &'static str),
    ) -> Response<ResponseBody> {
        self.record(ex, status, outcome);
        let body = format!("{} {}: {message}\n", status.as_u16(), negotiate::reason_phrase(status.as_u16()));
        let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed_unsync());
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        if let Some(secs) = retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let (StatusCode::PROXY_AUTHENTICATION_REQUIRED, Some(a)) = (status, &self.ctx.snapshot.auth) {
            if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", a.realm)) {
                h.insert(header::PROXY_AUTHENTICATE, v);
            }
        }
        // Every answer the proxy itself refuses with ends the connection, as on the CONNECT path:
        // after a 400 the framing of what follows cannot be trusted, and a denied, unauthenticated
        // or limited client starts again on a new connection (judged afresh from its first byte).
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers::add_via(h, Version::HTTP_11, &self.http.via);
        resp
    }

    /// Counts one finished request and writes its access event; `outcome` is its decision and
    /// reason.
    pub(crate) fn record(&self, ex: &Exchange, status: StatusCode, (decision, reason): (&'static str, &'static str)) {
        let m = &self.ctx.inner.metrics;
        m.http_requests.with_label_values(&[&self.ctx.listener, ex.method, code_class(status)]).inc();
        let (bytes_up, bytes_down) = ex.budget.as_ref().map_or((0, 0), |b| b.bytes());
        if bytes_up > 0 {
            self.relayed.0.inc_by(bytes_up);
        }
        if bytes_down > 0 {
            self.relayed.1.inc_by(bytes_down);
        }
        let limit = ex.budget.as_ref().and_then(|b| b.cut_reason()).map(crate::relay::CloseReason::as_str);
        let elapsed = ex.started.elapsed();
        m.http_request_duration.with_label_values(&[&self.ctx.listener]).observe(elapsed.as_secs_f64());
        let logging = self.ctx.snapshot.config.logging;
        if logging.access_log {
            let origin = ex.rule.as_deref().and_then(|r| crate::access::policy_of(&self.ctx, r));
            info!(
                target: "tunnelgate::access",
                conn = self.ctx.id,
                listener = &*self.ctx.listener,
                kind = "http",
                decision,
                reason,
                method = ex.method,
                rule = ex.rule.as_deref().unwrap_or(""),
                route = ex.parent.as_deref().unwrap_or(proxy_config::parents::DIRECT),
                namespace = origin.as_ref().and_then(proxy_config::origin::PolicyId::namespace),
                policy = origin.as_ref().map(proxy_config::origin::PolicyId::name),
                status = status.as_u16(),
                bytes_up,
                bytes_down,
                limit,
                duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                client = logging.log_client_addresses.then(|| self.ctx.peer.ip().to_string()),
                destination = logging.log_targets.then(|| ex.authority.as_ref().map(ToString::to_string)).flatten(),
                user = logging.log_users.then(|| ex.user.clone()).flatten(),
                "http request"
            );
        }
    }
}

pub(crate) fn empty() -> ResponseBody {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed_unsync()
}

/// What happens when a response body ends: the upstream connection goes back to the pool (only
/// when the body was complete), and the request is counted and logged once.
pub(crate) struct Finish {
    handler: Arc<Handler>,
    ex: Exchange,
    status: StatusCode,
    reuse: Option<(PoolKey, SendRequest<UpstreamBody>)>,
}

impl Finish {
    pub(crate) fn new(
        handler: &Arc<Handler>,
        ex: &mut Exchange,
        status: StatusCode,
        reuse: Option<(PoolKey, SendRequest<UpstreamBody>)>,
    ) -> Finish {
        let ex = Exchange {
            method: ex.method,
            started: ex.started,
            rule: ex.rule.take(),
            authority: ex.authority.take(),
            user: ex.user.take(),
            budget: ex.budget.take(),
            parent: ex.parent.take(),
        };
        Finish { handler: handler.clone(), ex, status, reuse }
    }

    fn done(mut self, complete: bool) {
        let h = &self.handler;
        if let Some(b) = &self.ex.budget {
            h.watchdog.release(b);
        }
        if let (true, Some((key, sender))) = (complete, self.reuse.take()) {
            let cfg = &h.ctx.snapshot.config.http;
            h.ctx.inner.upstream_pool.checkin(key, sender, cfg.max_idle_per_upstream, cfg.max_idle_upstreams);
        }
        h.record(&self.ex, self.status, self.ex.allowed());
    }
}

/// A response body streamed from the upstream, frame by frame (nothing is buffered whole), under
/// its request's relay limits.
pub(crate) struct TrackedBody {
    inner: Limited<Incoming>,
    finish: Option<Finish>,
}

impl TrackedBody {
    pub(crate) fn new(inner: Incoming, finish: Finish) -> TrackedBody {
        let budget = finish.ex.budget.clone();
        TrackedBody { inner: Limited::new(inner, budget, Direction::Down), finish: Some(finish) }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
            Poll::Ready(None) => {
                if let Some(f) = self.finish.take() {
                    f.done(true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = self.finish.take() {
                    f.done(false);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            // An empty body (HEAD, 204, 304, Content-Length: 0) may never be polled.
            let complete = self.inner.is_end_stream();
            f.done(complete);
        }
    }
}
