//! The CONNECT path: authorize the target, dial exactly the addresses that passed, answer `200`
//! only once the upstream accepted, then relay until both sides are done.

use proxy_config::Authority;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::access::{self, TunnelKind};
use crate::authorize::{self, Authorized, Rejection};
use crate::context::ConnCtx;
use crate::dial;
use crate::error::{Side, TunnelError};
use crate::negotiate::{self, ConnectRequest};
use crate::relay::{self, ByteCounters, IntoHalves, RelayRead, Stops};
use crate::tunnels::Admitted;

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
            let (ur, uw) = upstream.into_split();
            let ConnectRequest { authority, leftover, .. } = request;
            let t = Established { kind: TunnelKind::Connect, authority, early: leftover, authorized };
            spawn_tunnel(cr, cw, ur, uw, t, ctx);
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
) -> Result<(TcpStream, Authorized), Rejection> {
    let (upstream, authorized) = open(authority, ctx, user).await?;
    io.write_all(negotiate::ESTABLISHED)
        .await
        .map_err(|e| Rejection::from(TunnelError::Io { side: Side::Client, source: e }))?;
    Ok((upstream, authorized))
}

/// Authorizes `authority` and connects to one of the approved addresses. At the drain deadline a
/// request still being authorized or dialled gets 503 instead of hanging on.
pub async fn open(
    authority: &Authority,
    ctx: &ConnCtx,
    user: Option<String>,
) -> Result<(TcpStream, Authorized), Rejection> {
    let snapshot = &ctx.snapshot;
    let work = async {
        let authorized = authorize::authorize(snapshot, &ctx.inner, ctx.peer.ip(), user, authority).await?;
        let upstream =
            dial::connect(&authorized.addrs, authority.port, snapshot.config.relay.connect_timeout, &ctx.inner.metrics)
                .await
                .map_err(|error| Rejection { error, rule: Some(authorized.rule.clone()) })?;
        Ok((upstream, authorized))
    };
    tokio::select! {
        r = work => r,
        () = ctx.inner.stops.shutdown.cancelled() => Err(TunnelError::Draining.into()),
    }
}

/// What the relay of an established tunnel needs to know of it.
pub(crate) struct Established {
    pub(crate) kind: TunnelKind,
    /// The target as requested (a tunnel listener's configured upstream).
    pub(crate) authority: Authority,
    /// Bytes the client sent after its request head, for the upstream first.
    pub(crate) early: Vec<u8>,
    pub(crate) authorized: Authorized,
}

/// Relays an established tunnel (CONNECT, upgraded HTTP, or a tunnel listener's connection)
/// under the tunnel registry: counted as active, revocable by a reload, closed at the drain
/// deadline; one access event at the end. (One function, not a chain: every async layer keeps its
/// own copy of the arguments for the tunnel's whole life.)
pub(crate) async fn tunnel<CR, CW, UR, UW>(cr: CR, cw: CW, ur: UR, uw: UW, t: Established, ctx: &ConnCtx)
where
    CR: RelayRead,
    CW: AsyncWrite + Unpin + Send,
    UR: RelayRead,
    UW: AsyncWrite + Unpin + Send,
{
    let m = &ctx.inner.metrics;
    m.tunnel_requests.with_label_values(&[&ctx.listener, "established"]).inc();
    let a = &t.authorized;
    let registration = ctx.inner.tunnels.register(
        &ctx.listener,
        Admitted {
            client: ctx.peer.ip(),
            host: t.authority.host.clone(),
            port: t.authority.port,
            addrs: a.addrs.clone(),
            user: a.user.clone(),
            revocable: a.revocable,
        },
    );
    let stops = Stops { shutdown: ctx.inner.stops.shutdown.clone(), revoke: registration.revoke.clone() };
    let counters = ByteCounters {
        up: m.relayed_bytes.with_label_values(&[&ctx.listener, "upstream"]),
        down: m.relayed_bytes.with_label_values(&[&ctx.listener, "downstream"]),
    };
    let out = relay::run(cr, cw, ur, uw, &t.early, &a.limits, &stops, &counters).await;
    drop(registration);
    access::tunnel_closed(ctx, t.kind, &a.rule, a.user.as_deref(), &t.authority, &out);
}

/// [`tunnel`] as a task of its own, tracked for the drain. The connection's task can then end:
/// an established tunnel holds only the relay's state, not that of the head reading, TLS
/// handshake and dialling before it (about half of what an idle tunnel held). The context's copy
/// keeps the connection counted.
pub(crate) fn spawn_tunnel<CR, CW, UR, UW>(cr: CR, cw: CW, ur: UR, uw: UW, t: Established, ctx: &ConnCtx)
where
    CR: RelayRead + 'static,
    CW: AsyncWrite + Unpin + Send + 'static,
    UR: RelayRead + 'static,
    UW: AsyncWrite + Unpin + Send + 'static,
{
    let owned = ctx.clone();
    let relay = async move { tunnel(cr, cw, ur, uw, t, &owned).await };
    ctx.inner.tracker.spawn(relay.in_current_span());
}
