//! An established tunnel's life once its upstream answered: registered with the tunnel registry
//! (active count, revocation by a reload, the drain), relayed under its limits, and logged once when
//! it ends. One path for CONNECT tunnels, upgraded HTTP connections and tunnel listeners.

use std::future::Future;

use proxy_config::Authority;
use tracing::Instrument;

use crate::access::{self, TunnelKind};
use crate::authorize::Authorized;
use crate::context::ConnCtx;
use crate::parent::Upstream;
use crate::relay::{self, ByteCounters, End, RelayRead, RelayWrite, Terms};
use crate::tunnels::Admitted;

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
/// deadline; one access event at the end. Spawned as a task of its own by [`spawn_tunnel`], never
/// awaited inside another future: an idle tunnel then holds this state and nothing else.
///
/// A function returning an `async move` block rather than an `async fn`, and one layer rather
/// than a chain: an `async fn` moves its arguments into locals and keeps both copies for the
/// tunnel's whole life (the context and the authorization alone are 400 bytes), while a block uses
/// what it captured in place.
#[allow(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice")]
fn tunnel<CR, CW, UR, UW>(cr: CR, cw: CW, ur: UR, uw: UW, t: Established, ctx: ConnCtx) -> impl Future<Output = ()>
where
    CR: RelayRead,
    CW: RelayWrite,
    UR: RelayRead,
    UW: RelayWrite,
{
    async move {
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
        let counters = ByteCounters {
            up: m.relayed_bytes.with_label_values(&[&ctx.listener, "upstream"]),
            down: m.relayed_bytes.with_label_values(&[&ctx.listener, "downstream"]),
            spliced: m.spliced_bytes.with_label_values(&[&ctx.listener]),
        };
        let terms =
            Terms { early: &t.early, limits: &a.limits, stop: &registration.membership.stop, counters: &counters };
        let out = relay::run(End { read: cr, write: cw }, End { read: ur, write: uw }, terms).await;
        drop(registration);
        access::tunnel_closed(&ctx, t.kind, &a.rule, a.user.as_deref(), a.parent.as_deref(), &t.authority, &out);
    }
}

/// [`spawn_tunnel`] to `upstream`, directly or through its parent.
pub(crate) fn spawn_to<CR, CW>(cr: CR, cw: CW, upstream: Upstream, t: Established, ctx: &ConnCtx)
where
    CR: RelayRead + 'static,
    CW: RelayWrite + 'static,
{
    match upstream {
        Upstream::Tcp(s, _) => {
            let (ur, uw) = s.into_split();
            spawn_tunnel(cr, cw, ur, uw, t, ctx);
        }
        Upstream::Stream(s, _) => {
            let (ur, uw) = tokio::io::split(*s);
            spawn_tunnel(cr, cw, ur, uw, t, ctx);
        }
    }
}

/// [`tunnel`] as a task of its own, tracked for the drain. The task that read the request (or
/// waited for an upgrade) can then end: an established tunnel holds only the relay's state, not
/// that of the head reading, TLS handshake, dialling or HTTP connection before it. The context's
/// copy keeps the connection counted.
pub(crate) fn spawn_tunnel<CR, CW, UR, UW>(cr: CR, cw: CW, ur: UR, uw: UW, t: Established, ctx: &ConnCtx)
where
    CR: RelayRead + 'static,
    CW: RelayWrite + 'static,
    UR: RelayRead + 'static,
    UW: RelayWrite + 'static,
{
    let relay = tunnel(cr, cw, ur, uw, t, ctx.clone());
    ctx.inner.tracker.spawn(relay.in_current_span());
}
