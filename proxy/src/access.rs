//! Access events and outcome counters: one event per tunnel or per HTTP request, with the same
//! privacy defaults everywhere (no client address, no target, no path or headers unless
//! `logging.logClientAddresses` / `logging.logTargets` say so).

use proxy_config::Authority;
use tracing::{debug, info};

use crate::context::ConnCtx;
use crate::error::{ErrorChain, TunnelError};
use crate::relay::RelayOutcome;
use proxy_config::origin::PolicyId;

/// The Kubernetes policy behind an operator-rendered rule name. `None` for a configuration the
/// operator did not render, whose rule names are the user's own.
pub fn policy_of(ctx: &ConnCtx, rule: &str) -> Option<PolicyId> {
    ctx.snapshot.render?;
    PolicyId::of_rule(rule)
}

/// The `reason` of an allowed request: the rule that allowed it, or the default action.
pub fn allow_reason(rule: &str) -> &'static str {
    match rule {
        "default" => "default",
        "" => "listener",
        _ => "policy",
    }
}

/// Counts and logs a request that did not become a tunnel (or an HTTP exchange). `authority` is
/// the requested target when it was parsed (logged only with `logTargets`).
pub fn rejected(ctx: &ConnCtx, err: &TunnelError, rule: Option<&str>, authority: Option<&Authority>) {
    let m = &ctx.inner.metrics;
    m.tunnel_requests.with_label_values(&[&ctx.listener, err.kind()]).inc();
    debug!(conn = ctx.id, result = err.kind(), side = ?err.side(), error = %ErrorChain(err), "request rejected");
    let logging = ctx.snapshot.config.logging;
    if logging.access_log && !matches!(err, TunnelError::ClientClosed) {
        let (decision, reason) = err.decision();
        let origin = rule.and_then(|r| policy_of(ctx, r));
        info!(
            target: "tunnelgate::access",
            conn = ctx.id,
            listener = &*ctx.listener,
            decision,
            reason,
            rule = rule.unwrap_or(""),
            namespace = origin.as_ref().and_then(PolicyId::namespace),
            policy = origin.as_ref().map(PolicyId::name),
            result = err.kind(),
            status = err.status().unwrap_or(0),
            client = logging.log_client_addresses.then(|| ctx.peer.ip().to_string()),
            destination = logging.log_targets.then(|| authority.map(ToString::to_string)).flatten(),
            "request rejected"
        );
    }
}

/// What kind of tunnel closed.
#[derive(Debug, Clone, Copy)]
pub enum TunnelKind {
    /// HTTP CONNECT.
    Connect,
    /// An HTTP request upgraded by a 101 (WebSocket and the like).
    Upgrade,
    /// A connection to a tunnel listener's fixed upstream.
    Fixed,
    /// A connection redirected to a transparent listener.
    Transparent,
}

impl TunnelKind {
    fn as_str(self) -> &'static str {
        match self {
            TunnelKind::Connect => "connect",
            TunnelKind::Upgrade => "upgrade",
            TunnelKind::Fixed => "tunnel",
            TunnelKind::Transparent => "transparent",
        }
    }
}

/// Counts and logs a closed tunnel.
pub fn tunnel_closed(
    ctx: &ConnCtx,
    kind: TunnelKind,
    rule: &str,
    user: Option<&str>,
    parent: Option<&str>,
    authority: &Authority,
    out: &RelayOutcome,
) {
    let m = &ctx.inner.metrics;
    if out.reason == crate::relay::CloseReason::Shutdown {
        m.drain_forced_closes.inc();
    }
    m.tunnel_duration.with_label_values(&[out.reason.as_str()]).observe(out.duration.as_secs_f64());
    debug!(
        conn = ctx.id,
        kind = kind.as_str(),
        close = out.reason.as_str(),
        bytes_up = out.bytes_up,
        bytes_down = out.bytes_down,
        "tunnel closed"
    );
    let logging = ctx.snapshot.config.logging;
    if logging.access_log {
        let origin = policy_of(ctx, rule);
        info!(
            target: "tunnelgate::access",
            conn = ctx.id,
            listener = &*ctx.listener,
            kind = kind.as_str(),
            namespace = origin.as_ref().and_then(PolicyId::namespace),
            policy = origin.as_ref().map(PolicyId::name),
            decision = "allow",
            reason = allow_reason(rule),
            rule,
            // How it left: `direct`, or the parent proxy that carried it.
            route = parent.unwrap_or(proxy_config::parents::DIRECT),
            result = "established",
            status = match kind {
                TunnelKind::Connect => 200u16,
                TunnelKind::Upgrade => 101,
                TunnelKind::Fixed | TunnelKind::Transparent => 0,
            },
            close = out.reason.as_str(),
            bytes_up = out.bytes_up,
            bytes_down = out.bytes_down,
            duration_ms = u64::try_from(out.duration.as_millis()).unwrap_or(u64::MAX),
            client = logging.log_client_addresses.then(|| ctx.peer.ip().to_string()),
            destination = logging.log_targets.then(|| authority.to_string()),
            user = logging.log_users.then_some(user).flatten(),
            "tunnel closed"
        );
    }
}
