//! The tunnel mode: every connection of a tunnel listener (after its TLS handshake, when the
//! listener terminates TLS) goes to the listener's one configured upstream, over TCP or a Unix
//! socket (directly, or a TCP one through a parent proxy), through the same relay as CONNECT
//! tunnels. No HTTP is parsed on this path.

use proxy_config::{Authority, Host, ProxyProtocol, Route, TunnelUpstream};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;

use crate::access::{self, TunnelKind};
use crate::authorize::Authorized;
use crate::context::ConnCtx;
use crate::dial;
use crate::error::TunnelError;
use crate::established::{spawn_tunnel, Established};
use crate::parent::{self, Upstream};
use crate::proxy_protocol;
use crate::relay::IntoHalves;
use crate::tls::handshake::TlsFacts;

/// Writes the PROXY header, in one write, before any payload (the backend may speak first).
async fn announce<W: AsyncWrite + Unpin>(w: &mut W, header: Option<&[u8]>) -> Result<(), TunnelError> {
    match header {
        Some(h) => w.write_all(h).await.map_err(|e| TunnelError::Io { side: crate::error::Side::Upstream, source: e }),
        None => Ok(()),
    }
}

/// Connects `io` to `upstream` and relays until both sides are done. A failure to reach the
/// upstream closes the client at once (counted and logged); the next connection tries again.
pub async fn serve<S: IntoHalves + 'static>(
    io: S,
    ctx: &ConnCtx,
    upstream: &TunnelUpstream,
    announce_as: ProxyProtocol,
    route: Route,
    tls: Option<TlsFacts>,
) {
    let header = proxy_protocol::header(announce_as, ctx.peer, ctx.local, tls.as_ref());
    if ctx.inner.shed_for_memory() {
        return access::rejected(ctx, &TunnelError::Overloaded, None, None);
    }
    let cfg = &ctx.snapshot.config;
    let m = &ctx.inner.metrics;
    let (cr, cw) = io.into_halves();
    let authorized = |addrs| Authorized::fixed_upstream(addrs, cfg.policy.defaults);
    match upstream {
        TunnelUpstream::Tcp(authority) => {
            let opened = if route == Route::Direct {
                let direct = async {
                    let addrs = match &authority.host {
                        Host::Ip(ip) => vec![*ip],
                        Host::Name(name) => ctx.snapshot.resolver.resolve(name, m).await?,
                    };
                    let stream = dial::connect(&addrs, authority.port, cfg.relay.connect_timeout, m).await?;
                    Ok((Upstream::Tcp(stream, None), addrs))
                };
                direct.await
            } else {
                // A configured upstream is trusted: the parent is sent it as written.
                let (parenting, h) = (ctx.snapshot.parenting(), &ctx.inner.parent_health);
                let through = parent::tunnel(&parenting, h, m, route, &authority.host, authority.port, &[]);
                through.await.map(|u| (u, Vec::new()))
            };
            let (upstream, addrs) = match opened {
                Ok(o) => o,
                Err(e) => return access::rejected(ctx, &e, None, None),
            };
            let authorized = Authorized { parent: upstream.parent().map(str::to_owned), ..authorized(addrs) };
            let t =
                Established { kind: TunnelKind::Fixed, authority: authority.clone(), early: Vec::new(), authorized };
            match upstream {
                Upstream::Tcp(s, _) => {
                    let (ur, mut uw) = s.into_split();
                    if let Err(e) = announce(&mut uw, header.as_deref()).await {
                        return access::rejected(ctx, &e, None, None);
                    }
                    spawn_tunnel(cr, cw, ur, uw, t, ctx);
                }
                Upstream::Stream(s, _) => {
                    let (ur, mut uw) = tokio::io::split(*s);
                    if let Err(e) = announce(&mut uw, header.as_deref()).await {
                        return access::rejected(ctx, &e, None, None);
                    }
                    spawn_tunnel(cr, cw, ur, uw, t, ctx);
                }
            }
        }
        TunnelUpstream::Unix(path) => {
            let stream = match timeout(cfg.relay.connect_timeout, UnixStream::connect(path)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return access::rejected(ctx, &TunnelError::UpstreamRefused(e), None, None),
                Err(_) => return access::rejected(ctx, &TunnelError::UpstreamTimeout, None, None),
            };
            let (ur, mut uw) = stream.into_split();
            if let Err(e) = announce(&mut uw, header.as_deref()).await {
                return access::rejected(ctx, &e, None, None);
            }
            // Access events and the tunnel registry name an authority; a socket has none.
            let local = Authority { host: Host::Ip(std::net::Ipv4Addr::LOCALHOST.into()), port: 0 };
            let t = Established {
                kind: TunnelKind::Fixed,
                authority: local,
                early: Vec::new(),
                authorized: authorized(Vec::new()),
            };
            spawn_tunnel(cr, cw, ur, uw, t, ctx);
        }
    }
}
