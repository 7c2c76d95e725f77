//! The plain-HTTP forward path: absolute-form `http://` requests, served by hyper 1.x over the
//! bytes already read plus the socket, keep-alive. Each request is authorized on its own target
//! (the same policy, SSRF rules and DNS cache as CONNECT), sent in origin-form with a regenerated
//! `Host` and without hop-by-hop fields over a pooled connection to exactly an approved address,
//! and its response streamed back. A CONNECT later on the same connection becomes a tunnel;
//! upgrade requests go to [`super::upgrade`].

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use proxy_config::{Authority, ListenerHttp};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::debug;

use super::connect;
use super::handler::{empty, method_label, Dialed, Exchange, Finish, Handler, ResponseBody, TrackedBody};
use super::headers;
use super::limits::{Budget, Direction, Limited, Watchdog};
use super::upgrade;
use crate::access::TunnelKind;
use crate::authorize::{self, Rejection};
use crate::context::ConnCtx;
use crate::error::{ErrorChain, TunnelError};
use crate::established::{self, Established};
use crate::negotiate::MAX_HEADERS;
use crate::prefixed::Prefixed;

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
    let m = &ctx.inner.metrics;
    let relayed = Arc::new((
        m.relayed_bytes.with_label_values(&[&ctx.listener, "upstream"]),
        m.relayed_bytes.with_label_values(&[&ctx.listener, "downstream"]),
    ));
    let handler = Arc::new(Handler { ctx: ctx.clone(), http, watchdog: watchdog.clone(), relayed });
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

impl Handler {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        // Judged by the configuration in force at this request, not at the connection's accept
        // (a request already in flight at a reload finishes under the one it started with).
        let this = match self.ctx.current() {
            Some(ctx) => Arc::new(Handler {
                ctx,
                http: self.http.clone(),
                watchdog: self.watchdog.clone(),
                relayed: self.relayed.clone(),
            }),
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
            parent: None,
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
                    // hyper's connection is set aside: a plain TCP client is relayed as the
                    // stream itself, as a first-request CONNECT is.
                    match upgrade::Opened::client(upgraded) {
                        upgrade::Opened::Tcp(client, early) => {
                            t.early = early;
                            let (cr, cw) = client.into_split();
                            established::spawn_to(cr, cw, upstream, t, &ctx);
                        }
                        other => {
                            let (cr, cw) = tokio::io::split(other.boxed());
                            established::spawn_to(cr, cw, upstream, t, &ctx);
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
            let dialed = self.dial(&authorized, authority.port, &host, true).await.map_err(rejected)?;
            dialed.address(&mut up, &authority, &authorized.addrs).map_err(rejected)?;
            let pending = upgrade::Pending { req: up, sender: dialed.sender, client_upgrade };
            return upgrade::forward(self, pending, authorized, authority, ex).await;
        }
        let dialed = match self.pooled(&authorized, authority.port, &host).await {
            Some(pooled) => pooled,
            None => self.dial(&authorized, authority.port, &host, false).await.map_err(rejected)?,
        };
        dialed.address(&mut up, &authority, &authorized.addrs).map_err(rejected)?;
        let Dialed { mut sender, key, via } = dialed;
        ex.parent = via.as_ref().map(|v| v.parent.clone());
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
        if let (Some(via), StatusCode::PROXY_AUTHENTICATION_REQUIRED) = (&via, resp.status()) {
            // The parent refused the credentials configured for it: the client, who owes none,
            // must not be asked for any.
            self.ctx.inner.metrics.parent_requests.with_label_values(&[&via.parent, "refused_by_parent"]).inc();
            return Err(rejected(TunnelError::ParentRefused { parent: via.parent.clone(), status: 407 }));
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
    let authority = proxy_config::host::http_authority(auth.as_str()).map_err(|e| match e {
        proxy_config::host::HostError::Userinfo => TunnelError::MalformedRequest("userinfo in the target"),
        _ => TunnelError::MalformedRequest("invalid target host or port"),
    })?;
    let full = authority.to_string();
    let host = if authority.port == 80 { full.strip_suffix(":80").unwrap_or(&full).to_owned() } else { full };
    Ok((authority, host))
}
