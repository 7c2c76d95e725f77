//! The transparent mode: connections the node's firewall redirected to a transparent listener,
//! from clients that know nothing of a proxy. The original destination comes from the kernel
//! (`SO_ORIGINAL_DST`); the first bytes give the name ([`first_bytes`]: TLS SNI or HTTP Host); the
//! policy decides exactly as for CONNECT (client: the source address; host rules: the name; CIDR
//! and port rules: the addresses) through the shared pipeline. An allowed name is dialled at the
//! addresses the proxy resolves for it, never at the destination the client chose; without a name
//! the original destination is the target. A denial answers in the client's protocol: a TLS
//! `access_denied` alert before any handshake, or a 403 with `Proxy-Status`; then the connection
//! closes. The bytes read are relayed first; TLS is never terminated.

pub mod first_bytes;

use std::net::SocketAddr;

use proxy_config::host::parse_host;
use proxy_config::{Authority, Host, Transparent};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::access::{self, TunnelKind};
use crate::authorize::{Authorized, Rejection};
use crate::context::ConnCtx;
use crate::error::TunnelError;
use crate::established::{spawn_to, Established};
use crate::forward::connect;
use crate::negotiate;
use crate::parent::Upstream;
use first_bytes::Opening;

/// A TLS alert record: fatal (2), `access_denied` (49), as TLS 1.2 record framing, which clients
/// of every TLS version read before a handshake ("tlsv1 alert access denied").
const TLS_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// The destination the client connected to before the redirect.
fn original_destination(stream: &TcpStream) -> Result<SocketAddr, TunnelError> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().map_err(|_| TunnelError::NotRedirected)?;
    // An IPv4 connection on a dual-stack IPv6 socket (a v4-mapped local address) was redirected by
    // IPv4 conntrack: ask at the IPv4 level first for it, and fall back to the other.
    let original = if local.ip().to_canonical().is_ipv4() {
        sock.original_dst_v4().or_else(|_| sock.original_dst_v6())
    } else {
        sock.original_dst_v6().or_else(|_| sock.original_dst_v4())
    };
    let original = original.ok().and_then(|a| a.as_socket()).map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()));
    match original {
        // A connection made to the listener itself was not redirected: nothing to decide.
        Some(o) if o != SocketAddr::new(local.ip().to_canonical(), local.port()) => Ok(o),
        _ => Err(TunnelError::NotRedirected),
    }
}

/// What the connection is decided as: its name (when its opening carries one that is a host
/// name) on the original destination's port, else the original destination itself.
fn target(opening: &Opening, original: SocketAddr) -> Authority {
    let name = match opening {
        Opening::Tls { sni: Some(n) } | Opening::Http { host: Some(n) } => Some(n.as_str()),
        _ => None,
    };
    match name.map(parse_host) {
        Some(Ok(host @ Host::Name(_))) => Authority { host, port: original.port() },
        // No name, an address as the name, or a name that is not a valid host name.
        _ => Authority { host: Host::Ip(original.ip()), port: original.port() },
    }
}

/// Serves one redirected connection: tunnel, or a refusal in the client's protocol.
pub async fn serve(mut stream: TcpStream, ctx: &ConnCtx, settings: Transparent, deadline: Instant) {
    let original = match original_destination(&stream) {
        Ok(o) => o,
        Err(e) => return access::rejected(ctx, &e, None, None),
    };
    let max = ctx.snapshot.config.limits.max_request_head_bytes.min(first_bytes::MAX_FIRST_BYTES);
    let (early, opening) = match first_bytes::read(&mut stream, max, deadline).await {
        Ok(read) => read,
        Err(e) => return access::rejected(ctx, &e, None, None),
    };
    // The first bytes may have taken until after a reload: decided by the configuration in force.
    let refreshed = ctx.current();
    let ctx = refreshed.as_ref().unwrap_or(ctx);
    let authority = target(&opening, original);
    let admitted = ctx.admit_request().map_err(Rejection::from);
    let opened = match admitted {
        Ok(()) => open(&authority, original, ctx, settings).await,
        Err(r) => Err(r),
    };
    match opened {
        Ok((upstream, authorized)) => {
            let (cr, cw) = stream.into_split();
            let t = Established { kind: TunnelKind::Transparent, authority, early, authorized };
            spawn_to(cr, cw, upstream, t, ctx);
        }
        Err(r) => refuse(stream, ctx, &opening, &r, &authority).await,
    }
}

/// Authorizes `authority` and connects to one of the approved addresses (with a name: those the
/// proxy resolved, never `original`, which strict listeners also require among them).
async fn open(
    authority: &Authority,
    original: SocketAddr,
    ctx: &ConnCtx,
    settings: Transparent,
) -> Result<(Upstream, Authorized), Rejection> {
    let named = matches!(authority.host, Host::Name(_));
    connect::open_checked(authority, ctx, None, |authorized| {
        let among = authorized.addrs.iter().any(|a| a.to_canonical() == original.ip());
        if named && settings.strict_destination && !among {
            Err(TunnelError::DestinationMismatch)
        } else {
            Ok(())
        }
    })
    .await
}

/// Refuses in the client's protocol, then closes: a TLS alert before any handshake, an HTTP
/// status with `Proxy-Status`, or (any other protocol) just the close.
async fn refuse(mut stream: TcpStream, ctx: &ConnCtx, opening: &Opening, r: &Rejection, authority: &Authority) {
    access::rejected(ctx, &r.error, r.rule.as_deref(), Some(authority));
    match opening {
        Opening::Tls { .. } => {
            let _ = stream.write_all(&TLS_ACCESS_DENIED).await;
            let _ = stream.shutdown().await;
        }
        Opening::Http { .. } => {
            if let Some(resp) = negotiate::error_response(&r.error) {
                let _ = negotiate::reject(&mut stream, &resp).await;
            }
        }
        Opening::Other => {}
    }
}
