//! Upgrades on the plain-HTTP path (WebSocket and the like): the request goes upstream with its
//! `Upgrade` field over a connection of its own; only a `101` answer to it switches both sides to
//! a raw relay, which then runs as a tunnel (limits, close reasons, byte counters, drain and
//! revocation). Any other answer is an ordinary response, and the connection is not reused.
//! Once switched, hyper's connection is set aside: a side that is a plain TCP stream is relayed as
//! the stream itself (its read waits without a buffer, as a CONNECT tunnel's does), with the bytes
//! hyper had read ahead passed on first.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use proxy_config::Authority;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use super::handler::{empty, Exchange, Finish, Handler, ResponseBody, TrackedBody};
use super::headers;
use super::pool::UpstreamBody;
use crate::access::TunnelKind;
use crate::authorize::{Authorized, Rejection};
use crate::established::{self, Established};
use crate::prefixed::Prefixed;

/// Sends an upgrade request and, on `101`, joins the two upgraded connections.
/// An upgrade request on its way: the request for the upstream, the upstream connection it goes
/// out on, and the client's side of the upgrade once the client's connection switches.
pub(crate) struct Pending {
    pub(crate) req: Request<UpstreamBody>,
    pub(crate) sender: SendRequest<UpstreamBody>,
    pub(crate) client_upgrade: OnUpgrade,
}

pub(crate) async fn forward(
    handler: &Arc<Handler>,
    pending: Pending,
    authorized: Authorized,
    authority: Authority,
    ex: &mut Exchange,
) -> Result<Response<ResponseBody>, Rejection> {
    let Pending { req, mut sender, client_upgrade } = pending;
    let resp: Response<Incoming> = handler
        .send(&mut sender, req)
        .await
        .map_err(|error| Rejection { error, rule: Some(authorized.rule.clone()) })?;
    let (mut parts, body) = resp.into_parts();
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    headers::sanitize_response(&mut parts.headers, switching);
    headers::add_via(&mut parts.headers, parts.version, &handler.http.via);
    parts.version = hyper::Version::HTTP_11;
    if !switching {
        // A 200 (or anything else) never switches: the body is an ordinary body.
        let body = TrackedBody::new(body, Finish::new(handler, ex, parts.status, None));
        return Ok(Response::from_parts(parts, body.boxed_unsync()));
    }
    let mut upstream_resp = Response::from_parts(parts.clone(), body);
    let upstream_upgrade = hyper::upgrade::on(&mut upstream_resp);
    let ctx = handler.ctx.clone();
    handler.record(ex, StatusCode::SWITCHING_PROTOCOLS, ex.allowed());
    handler.ctx.inner.tracker.spawn(async move {
        // The upstream connection's driver must stay alive until the upgrade resolves.
        let joined = tokio::try_join!(client_upgrade, upstream_upgrade);
        drop(sender);
        let (client, upstream) = match joined {
            Ok(pair) => pair,
            Err(e) => {
                debug!(conn = ctx.id, error = %e, "upgrade failed");
                return;
            }
        };
        let t = Established { kind: TunnelKind::Upgrade, authority, early: Vec::new(), authorized };
        match (Opened::client(client), Opened::upstream(upstream)) {
            (Opened::Tcp(client, early), Opened::Tcp(upstream, _)) => {
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                established::spawn_tunnel(cr, cw, ur, uw, Established { early, ..t }, &ctx);
            }
            (client, upstream) => {
                let (cr, cw) = tokio::io::split(client.boxed());
                let (ur, uw) = tokio::io::split(upstream.boxed());
                established::spawn_tunnel(cr, cw, ur, uw, t, &ctx);
            }
        }
    });
    Ok(Response::from_parts(parts, empty()))
}

/// Any stream the relay can take.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One side of an upgraded connection, with hyper's connection set aside.
pub(crate) enum Opened {
    /// A plain TCP stream, and the bytes hyper had read from it ahead (they are passed on first).
    Tcp(TcpStream, Vec<u8>),
    /// Anything else (TLS), relayed through its own reader.
    Other(Box<dyn Io>),
}

impl Opened {
    /// The client's side: its TCP stream when the listener is plain TCP.
    pub(crate) fn client(upgraded: Upgraded) -> Opened {
        match upgraded.downcast::<TokioIo<Prefixed<TcpStream>>>() {
            Ok(parts) => {
                let (rest, stream) = parts.io.into_inner().into_parts();
                let mut ahead = parts.read_buf.to_vec();
                ahead.extend_from_slice(&rest);
                Opened::Tcp(stream, ahead)
            }
            Err(upgraded) => Opened::Other(Box::new(TokioIo::new(upgraded))),
        }
    }

    /// The upstream's side: its TCP stream, unless hyper had read bytes of it ahead (rare: the
    /// upstream spoke right after its 101), which the client must get first.
    fn upstream(upgraded: Upgraded) -> Opened {
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) if parts.read_buf.is_empty() => Opened::Tcp(parts.io.into_inner(), Vec::new()),
            Ok(parts) => Opened::Other(Box::new(Prefixed::new(parts.read_buf.to_vec(), parts.io.into_inner()))),
            Err(upgraded) => Opened::Other(Box::new(TokioIo::new(upgraded))),
        }
    }

    /// As one stream whose reads yield the bytes read ahead first.
    pub(crate) fn boxed(self) -> Box<dyn Io> {
        match self {
            Opened::Tcp(stream, ahead) if ahead.is_empty() => Box::new(stream),
            Opened::Tcp(stream, ahead) => Box::new(Prefixed::new(ahead, stream)),
            Opened::Other(io) => io,
        }
    }
}
