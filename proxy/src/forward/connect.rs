//! The CONNECT path: authorize the target, dial exactly the addresses that passed, answer `200`
//! only once the upstream accepted, then hand the tunnel to its relay task.

use proxy_config::{Authority, Route};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::access::{self, TunnelKind};
use crate::authorize::{self, Authorized, Rejection};
use crate::context::ConnCtx;
use crate::dial;
use crate::error::{Side, TunnelError};
use crate::established::{spawn_to, Established};
use crate::negotiate::{self, ConnectRequest};
use crate::parent::{self, Upstream};
use crate::relay::IntoHalves;

/// Serves a CONNECT request whose head has been read: tunnel, or an error answer and a
/// lingering close.
pub async fn serve<S>(mut io: S, request: ConnectRequest, ctx: &ConnCtx)
where
    S: IntoHalves + 'static,
{
    let user = match Box::pin(ctx.authenticate(request.credentials.as_deref())).await {
        Ok(user) => user,
        Err(e) => return Box::pin(reject(ctx, &mut io, e.into(), Some(&request.authority))).await,
    };
    match Box::pin(establish(&mut io, &request.authority, ctx, user)).await {
        Ok((upstream, authorized)) => {
            let (cr, cw) = io.into_halves();
            let ConnectRequest { authority, leftover, .. } = request;
            let t = Established { kind: TunnelKind::Connect, authority, early: leftover, authorized };
            spawn_to(cr, cw, upstream, t, ctx);
        }
        Err(r) => Box::pin(reject(ctx, &mut io, r, Some(&request.authority))).await,
    }
}

/// Answers a rejected request with its status and closes, never parsing what follows.
/// `authority` is the request's target when it was parsed.
pub async fn reject<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &ConnCtx,
    io: &mut S,
    r: Rejection,
    authority: Option<&Authority>,
) {
    access::rejected(ctx, &r.error, r.rule.as_deref(), authority);
    if let Some(resp) = negotiate::error_response(&r.error) {
        let _ = negotiate::reject(io, &resp).await;
    }
}

/// Authorizes and dials; writes the 200 on success.
async fn establish<S: AsyncWrite + Unpin>(
    io: &mut S,
    authority: &Authority,
    ctx: &ConnCtx,
    user: Option<String>,
) -> Result<(Upstream, Authorized), Rejection> {
    let (upstream, authorized) = open(authority, ctx, user).await?;
    io.write_all(negotiate::ESTABLISHED)
        .await
        .map_err(|e| Rejection::from(TunnelError::Io { side: Side::Client, source: e }))?;
    Ok((upstream, authorized))
}

/// Authorizes `authority` and connects to one of the approved addresses, or through the route's
/// parent to it. At the drain deadline a request still being authorized or dialled gets 503
/// instead of hanging on.
pub async fn open(
    authority: &Authority,
    ctx: &ConnCtx,
    user: Option<String>,
) -> Result<(Upstream, Authorized), Rejection> {
    open_checked(authority, ctx, user, |_| Ok(())).await
}

/// [`open`], with `check` judging the authorization before anything is dialled (a transparent
/// listener's strict destination check).
pub async fn open_checked(
    authority: &Authority,
    ctx: &ConnCtx,
    user: Option<String>,
    check: impl FnOnce(&Authorized) -> Result<(), TunnelError>,
) -> Result<(Upstream, Authorized), Rejection> {
    let snapshot = &ctx.snapshot;
    let work = async {
        let authorized = authorize::authorize(snapshot, &ctx.inner, ctx.peer.ip(), user, authority).await?;
        check(&authorized).map_err(|error| Rejection { error, rule: Some(authorized.rule.clone()) })?;
        let m = &ctx.inner.metrics;
        let upstream = match authorized.route {
            Route::Direct => dial::connect(&authorized.addrs, authority.port, snapshot.config.relay.connect_timeout, m)
                .await
                .map(|s| Upstream::Tcp(s, None)),
            route => {
                let (host, port, addrs) = (&authority.host, authority.port, &authorized.addrs);
                parent::tunnel(&snapshot.parenting(), &ctx.inner.parent_health, m, route, host, port, addrs).await
            }
        }
        .map_err(|error| Rejection { error, rule: Some(authorized.rule.clone()) })?;
        let authorized = Authorized { parent: upstream.parent().map(str::to_owned), ..authorized };
        Ok((upstream, authorized))
    };
    tokio::select! {
        r = work => r,
        () = ctx.inner.shutdown.cancelled() => Err(TunnelError::Draining.into()),
    }
}
