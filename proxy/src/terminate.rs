//! The tunnel mode: every connection of a tunnel listener (after its TLS handshake, when the
//! listener terminates TLS) goes to the listener's one configured upstream, over TCP or a Unix
//! socket, through the same relay as CONNECT tunnels. No HTTP is parsed on this path.

use proxy_config::{Authority, Host, TunnelUpstream};
use tokio::net::UnixStream;
use tokio::time::timeout;

use crate::access::{self, TunnelKind};
use crate::authorize::Authorized;
use crate::context::ConnCtx;
use crate::dial;
use crate::error::TunnelError;
use crate::forward::connect::relay_registered;
use crate::relay::IntoHalves;

/// Connects `io` to `upstream` and relays until both sides are done. A failure to reach the
/// upstream closes the client at once (counted and logged); the next connection tries again.
pub async fn serve<S: IntoHalves>(io: S, ctx: &ConnCtx, upstream: &TunnelUpstream) {
    if ctx.inner.shed_for_memory() {
        return access::rejected(ctx, &TunnelError::Overloaded, None);
    }
    let cfg = &ctx.snapshot.config;
    let m = &ctx.inner.metrics;
    let (cr, cw) = io.into_halves();
    let authorized =
        |addrs| Authorized { addrs, rule: String::new(), limits: cfg.policy.defaults, user: None, revocable: false };
    match upstream {
        TunnelUpstream::Tcp(authority) => {
            let addrs = match &authority.host {
                Host::Ip(ip) => vec![*ip],
                Host::Name(name) => match ctx.snapshot.resolver.resolve(name, m).await {
                    Ok(a) => a,
                    Err(e) => return access::rejected(ctx, &e, None),
                },
            };
            let stream = match dial::connect(&addrs, authority.port, cfg.relay.connect_timeout, m).await {
                Ok(s) => s,
                Err(e) => return access::rejected(ctx, &e, None),
            };
            let (ur, uw) = stream.into_split();
            let a = authorized(addrs);
            m.tunnel_requests.with_label_values(&[&ctx.listener, "established"]).inc();
            let out = relay_registered(cr, cw, ur, uw, &[], authority, &a, ctx).await;
            access::tunnel_closed(ctx, TunnelKind::Fixed, "", None, authority, &out);
        }
        TunnelUpstream::Unix(path) => {
            let stream = match timeout(cfg.relay.connect_timeout, UnixStream::connect(path)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return access::rejected(ctx, &TunnelError::UpstreamRefused(e), None),
                Err(_) => return access::rejected(ctx, &TunnelError::UpstreamTimeout, None),
            };
            let (ur, uw) = tokio::io::split(stream);
            // Access events and the tunnel registry name an authority; a socket has none.
            let local = Authority { host: Host::Ip(std::net::Ipv4Addr::LOCALHOST.into()), port: 0 };
            m.tunnel_requests.with_label_values(&[&ctx.listener, "established"]).inc();
            let out = relay_registered(cr, cw, ur, uw, &[], &local, &authorized(Vec::new()), ctx).await;
            access::tunnel_closed(ctx, TunnelKind::Fixed, "", None, &local, &out);
        }
    }
}
