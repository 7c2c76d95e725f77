//! The plain-HTTP forward path: absolute-form `http://` requests, served by hyper 1.x over the
//! bytes already read plus the socket, keep-alive. Each request is authorized on its own target
//! (the same policy, SSRF rules and DNS cache as CONNECT), sent in origin-form with a regenerated
//! `Host` and without hop-by-hop fields over a pooled connection to exactly an approved address,
//! and its response streamed back. A CONNECT later on the same connection becomes a tunnel;
//! upgrade requests go to [`super::upgrade`].

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use proxy_config::{Authority, ListenerHttp};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{timeout, Instant};
use tracing::{debug, info};

use super::connect;
use super::headers;
use super::limits::{BoxError, Budget, Direction, Limited, Watchdog};
use super::pool::{PoolKey, UpstreamBody};
use super::prefixed::Prefixed;
use super::upgrade;
use crate::access::TunnelKind;
use crate::authorize::{self, Authorized, Rejection};
use crate::context::ConnCtx;
use crate::dial;
use crate::error::{ErrorChain, TunnelError};
use crate::established::{self, Established};
use crate::negotiate::{self, MAX_HEADERS};

/// The body of every response the proxy sends on this path.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest upstream response head; a larger one is answered 502.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Serves an HTTP/1.1 connection whose first head (in `buffered`) is not a CONNECT, until the
/// client closes it, keep-alive ends, or the proxy drains.
pub async fn serve<S>(io: S, buffered: Vec<u8>, ctx: &ConnCtx, http: ListenerHttp)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = ctx.snapshot.config.limits;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_head_timeout)
        .max_buf_size(limits.max_request_head_bytes.max(8192))
        .max_headers(MAX_HEADERS)
        .title_case_headers(true)
        // A client that shuts its write side after the request still gets the response.
        .half_close(true)
        .keep_alive(true);
    let watchdog = Arc::new(Watchdog::default());
    let handler = Arc::new(Handler { ctx: ctx.clone(), http, watchdog: watchdog.clone() });
    let service = service_fn(move |req| {
        let h = handler.clone();
        async move { Ok::<_, Infallible>(h.handle(req).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(Prefixed::new(buffered, io)), service).with_upgrades();
    tokio::pin!(conn);
    // The connection's own stop signal, not the drain's process-wide tokens: this select polls
    // it on every wake-up of the connection, and a token takes a shared lock on each poll. The
    // drain deadline (`shutdown`) comes only after the drain has set the signal.
    let membership = ctx.inner.http_connections.join(());
    let result = tokio::select! {
        r = conn.as_mut() => Some(r),
        // A request past its rule's maxLifetime or idleTimeout: the connection closes, as a
        // tunnel's would (its access event says which limit).
        reason = watchdog.expired() => {
            debug!(conn = ctx.id, reason = reason.as_str(), "HTTP request cut at its relay limit");
            None
        }
        _ = membership.stop.stopped() => {
            // Idle: closes now. A request in flight: its response goes out with
            // `Connection: close`, and no further request is read.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => Some(r),
                () = ctx.inner.shutdown.cancelled() => None,
            }
        }
    };
    if let Some(Err(e)) = result {
        debug!(conn = ctx.id, error = %ErrorChain(&e), "HTTP connection ended with an error");
    }
}

/// Serves the requests of one client connection.
pub(crate) struct Handler {
    pub(crate) ctx: ConnCtx,
    pub(crate) http: ListenerHttp,
    /// The time limits of the request in flight on this connection.
    pub(crate) watchdog: Arc<Watchdog>,
}

/// The method label of `tunnelgate_http_requests_total`: a closed set.
fn method_label(m: &Method) -> &'static str {
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
}

impl Exchange {
    /// The access event's decision and reason for a request the policy allowed.
    pub(crate) fn allowed(&self) -> (&'static str, &'static str) {
        ("allow", crate::access::allow_reason(self.rule.as_deref().unwrap_or("default")))
    }
}

impl Handler {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        // Judged by the configuration in force at this request, not at the connection's accept
        // (a request already in flight at a reload finishes under the one it started with).
        let this = match self.ctx.current() {
            Some(ctx) => Arc::new(Handler { ctx, http: self.http.clone(), watchdog: self.watchdog.clone() }),
            None => self,
        };
        this.judge(req).await
    }

    async fn judge(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        let mut ex = Exchange {
            method: method_label(req.method()),
            started: Instant::now(),
            rule: None,
            authority: None,
            user: None,
            budget: None,
        };
        if let Err(e) = self.ctx.admit_request() {
            return self.error(&ex, e.into());
        }
        let credentials = req.headers().get(header::PROXY_AUTHORIZATION).map(HeaderValue::as_bytes);
        let user = match self.ctx.authenticate(credentials).await {
            Ok(user) => user,
            Err(e) => return self.error(&ex, e.into()),
        };
        ex.user.clone_from(&user);
        let result = if req.method() == Method::CONNECT {
            self.connect(req, user).await
        } else {
            self.forward(req, &mut ex, user).await
        };
        result.unwrap_or_else(|r| {
            if let Some(b) = &ex.budget {
                self.watchdog.release(b);
            }
            ex.rule = ex.rule.take().or(r.rule.clone());
            self.error(&ex, r)
        })
    }

    /// A CONNECT on a connection that started with plain HTTP: the same authorization and dial as
    /// a first-request CONNECT, then a tunnel over the upgraded connection.
    async fn connect(
        &self,
        mut req: Request<Incoming>,
        user: Option<String>,
    ) -> Result<Response<ResponseBody>, Rejection> {
        let text = req.uri().authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        let authority: Authority =
            text.parse().map_err(|_| Rejection::from(TunnelError::MalformedRequest("invalid CONNECT target")))?;
        let (upstream, authorized) = connect::open(&authority, &self.ctx, user).await?;
        let on_upgrade = hyper::upgrade::on(&mut req);
        let ctx = self.ctx.clone();
        self.ctx.inner.tracker.spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let mut t = Established { kind: TunnelKind::Connect, authority, early: Vec::new(), authorized };
                    let (ur, uw) = upstream.into_split();
                    // hyper's connection is set aside: a plain TCP client is relayed as the
                    // stream itself, as a first-request CONNECT is.
                    match upgrade::Opened::client(upgraded) {
                        upgrade::Opened::Tcp(client, early) => {
                            t.early = early;
                            let (cr, cw) = client.into_split();
                            established::tunnel(cr, cw, ur, uw, t, &ctx).await;
                        }
                        other => {
                            let (cr, cw) = tokio::io::split(other.boxed());
                            established::tunnel(cr, cw, ur, uw, t, &ctx).await;
                        }
                    }
                }
                Err(e) => debug!(conn = ctx.id, error = %e, "CONNECT upgrade failed"),
            }
        });
        Ok(Response::new(empty()))
    }

    /// An absolute-form request: check, authorize, send upstream, stream the answer back.
    async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        ex: &mut Exchange,
        user: Option<String>,
    ) -> Result<Response<ResponseBody>, Rejection> {
        let (authority, host) = target(req.uri())?;
        ex.authority = Some(authority.clone());
        if req.headers().get_all(header::HOST).iter().count() > 1 {
            return Err(TunnelError::MalformedRequest("more than one Host header").into());
        }
        headers::check_request_framing(req.version(), req.headers()).map_err(TunnelError::MalformedRequest)?;
        let authorized =
            authorize::authorize(&self.ctx.snapshot, &self.ctx.inner, self.ctx.peer.ip(), user, &authority).await?;
        ex.rule = Some(authorized.rule.clone());
        let client_upgrade = headers::wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // The received Host is ignored (RFC 9112 §3.2.2): the target decides, and Host says the same.
        headers::strip_hop_by_hop(&mut parts.headers, client_upgrade.is_some());
        parts.headers.remove(header::EXPECT); // hyper answers 100-continue itself when the body is read
        let host_value = HeaderValue::from_str(&host)
            .map_err(|_| Rejection::from(TunnelError::MalformedRequest("invalid target host")))?;
        parts.headers.insert(header::HOST, host_value);
        headers::add_via(&mut parts.headers, parts.version, &self.http.via);
        if self.http.forwarded_for {
            headers::add_forwarded_for(&mut parts.headers, self.ctx.peer.ip());
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: Uri = path.parse().map_err(|_| Rejection::from(TunnelError::MalformedRequest("invalid path")))?;
        // An upgrade's own limits start at its 101, when it becomes a tunnel; any other request
        // is held to its rule's relay limits from here to the end of its response.
        let budget = client_upgrade.is_none().then(|| Budget::new(authorized.limits));
        if let Some(b) = &budget {
            self.watchdog.watch(b);
        }
        ex.budget.clone_from(&budget);
        let mut up = Request::new(Limited::new(body, budget.clone(), Direction::Up).boxed());
        *up.method_mut() = parts.method;
        *up.uri_mut() = uri;
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = parts.headers;
        let rejected = |error| Rejection { error, rule: Some(authorized.rule.clone()) };

        if let Some(client_upgrade) = client_upgrade {
            let (sender, _) = self.dial(&authorized, authority.port, &host, true).await.map_err(rejected)?;
            return upgrade::forward(self, up, sender, client_upgrade, authorized, authority, ex).await;
        }
        let (mut sender, key) = match self.pooled(&authorized, authority.port, &host).await {
            Some(pooled) => pooled,
            None => self.dial(&authorized, authority.port, &host, false).await.map_err(rejected)?,
        };
        let resp = self.send(&mut sender, up).await.map_err(|e| {
            // A request body cut at the byte limit fails the exchange: say which limit.
            match budget.as_ref().and_then(|b| b.cut_reason()) {
                Some(reason) => rejected(TunnelError::RelayLimit(reason)),
                None => rejected(e),
            }
        })?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // No upgrade was asked for: a 101 is a protocol violation, never a switch.
            return Ok(self.bad_gateway(ex));
        }
        let (mut rparts, rbody) = resp.into_parts();
        let conflicting = headers::sanitize_response(&mut rparts.headers, false);
        headers::add_via(&mut rparts.headers, rparts.version, &self.http.via);
        rparts.version = Version::HTTP_11;
        // A response framed two ways leaves the connection in an unknown state: never reuse it.
        let reuse = (!conflicting).then_some((key, sender));
        let body = TrackedBody::new(rbody, Finish::new(self, ex, rparts.status, reuse));
        Ok(Response::from_parts(rparts, body.boxed_unsync()))
    }

    /// An idle pooled connection to one of the approved addresses, with the same Host.
    async fn pooled(
        &self,
        authorized: &Authorized,
        port: u16,
        host: &str,
    ) -> Option<(SendRequest<UpstreamBody>, PoolKey)> {
        let idle = self.ctx.snapshot.config.http.upstream_idle_timeout;
        for addr in &authorized.addrs {
            let key = PoolKey {
                addr: std::net::SocketAddr::new(*addr, port),
                host: host.to_owned(),
                client: (self.ctx.peer.ip().to_canonical(), authorized.user.clone()),
            };
            if let Some(sender) = self.ctx.inner.upstream_pool.checkout(&key, idle).await {
                self.ctx.inner.metrics.upstream_connections.with_label_values(&["reused"]).inc();
                return Some((sender, key));
            }
        }
        None
    }

    /// A new upstream connection to one of the approved addresses.
    pub(crate) async fn dial(
        &self,
        authorized: &Authorized,
        port: u16,
        host: &str,
        upgrades: bool,
    ) -> Result<(SendRequest<UpstreamBody>, PoolKey), TunnelError> {
        let m = &self.ctx.inner.metrics;
        let connect_timeout = self.ctx.snapshot.config.relay.connect_timeout;
        let stream = dial::connect(&authorized.addrs, port, connect_timeout, m).await?;
        let addr = stream.peer_addr().map_err(TunnelError::UpstreamRefused)?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .title_case_headers(true)
            .max_buf_size(MAX_RESPONSE_HEAD)
            .handshake(TokioIo::new(stream))
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
        let client = (self.ctx.peer.ip().to_canonical(), authorized.user.clone());
        Ok((sender, PoolKey { addr, host: host.to_owned(), client }))
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

    fn bad_gateway(&self, ex: &Exchange) -> Response<ResponseBody> {
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
    fn error(&self, ex: &Exchange, r: Rejection) -> Response<ResponseBody> {
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
            m.relayed_bytes.with_label_values(&[&self.ctx.listener, "upstream"]).inc_by(bytes_up);
        }
        if bytes_down > 0 {
            m.relayed_bytes.with_label_values(&[&self.ctx.listener, "downstream"]).inc_by(bytes_down);
        }
        let limit = ex.budget.as_ref().and_then(|b| b.cut_reason()).map(crate::relay::CloseReason::as_str);
        let elapsed = ex.started.elapsed();
        m.http_request_duration.with_label_values(&[&self.ctx.listener]).observe(elapsed.as_secs_f64());
        let logging = self.ctx.snapshot.config.logging;
        if logging.access_log {
            let (namespace, policy) = ex.rule.as_deref().and_then(|r| crate::access::policy_of(&self.ctx, r)).unzip();
            info!(
                target: "tunnelgate::access",
                conn = self.ctx.id,
                listener = &*self.ctx.listener,
                kind = "http",
                decision,
                reason,
                method = ex.method,
                rule = ex.rule.as_deref().unwrap_or(""),
                namespace = namespace.filter(|n| !n.is_empty()),
                policy,
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

/// The target of an absolute-form request: its authority (port 80 when omitted) and the `Host`
/// value to send. Anything but `http://host[:port]` is refused; the host grammar is the strict one
/// of CONNECT targets (no userinfo, no odd IPv4 spellings, no zone IDs).
pub fn target(uri: &Uri) -> Result<(Authority, String), TunnelError> {
    match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => {}
        Some(s) if s.eq_ignore_ascii_case("https") => {
            return Err(TunnelError::MalformedRequest(
                "https:// targets go through CONNECT; the proxy never originates TLS",
            ))
        }
        Some(_) => return Err(TunnelError::MalformedRequest("unsupported scheme (only http:// is forwarded)")),
        None => {
            return Err(TunnelError::MalformedRequest(
                "not a proxy request: the target must be absolute-form (http://host/path)",
            ))
        }
    }
    let auth = uri.authority().ok_or(TunnelError::MalformedRequest("the target has no host"))?;
    let text = auth.as_str();
    if text.contains('@') {
        return Err(TunnelError::MalformedRequest("userinfo in the target"));
    }
    let with_port = if auth.port().is_some() { text.to_owned() } else { format!("{text}:80") };
    let authority: Authority =
        with_port.parse().map_err(|_| TunnelError::MalformedRequest("invalid target host or port"))?;
    let full = authority.to_string();
    let host = if authority.port == 80 { full.strip_suffix(":80").unwrap_or(&full).to_owned() } else { full };
    Ok((authority, host))
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
