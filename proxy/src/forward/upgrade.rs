//! Upgrades on the plain-HTTP path (WebSocket and the like): the request goes upstream with its
//! `Upgrade` field over a connection of its own; only a `101` answer to it switches both sides to
//! a raw relay, which then runs as a tunnel (limits, close reasons, byte counters, drain and
//! revocation). Any other answer is an ordinary response, and the connection is not reused.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use proxy_config::Authority;
use tracing::debug;

use super::headers;
use super::http::{empty, Exchange, Finish, Handler, ResponseBody, TrackedBody};
use super::pool::UpstreamBody;
use crate::access::TunnelKind;
use crate::authorize::{Authorized, Rejection};
use crate::established::{self, Established};

/// Sends an upgrade request and, on `101`, joins the two upgraded connections.
pub(crate) async fn forward(
    handler: &Arc<Handler>,
    req: Request<UpstreamBody>,
    mut sender: SendRequest<UpstreamBody>,
    client_upgrade: OnUpgrade,
    authorized: Authorized,
    authority: Authority,
    ex: &mut Exchange,
) -> Result<Response<ResponseBody>, Rejection> {
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
        let _sender = sender;
        let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(conn = ctx.id, error = %e, "upgrade failed");
                return;
            }
        };
        let (cr, cw) = tokio::io::split(TokioIo::new(client));
        let (ur, uw) = tokio::io::split(TokioIo::new(upstream));
        let t = Established { kind: TunnelKind::Upgrade, authority, early: Vec::new(), authorized };
        established::tunnel(cr, cw, ur, uw, t, &ctx).await;
    });
    Ok(Response::from_parts(parts, empty()))
}
