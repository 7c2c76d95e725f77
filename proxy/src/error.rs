//! `TunnelError`: everything that can end a connection before its tunnel is established,
//! named by stage, with the status code the client gets and the metric label it counts under.

use std::io;

use proxy_config::DenyReason;

/// Which side of the proxy a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Internal,
}

/// How a parent proxy could not be used (the `result` label of
/// `tunnelgate_parent_requests_total` for it; a closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentFailure {
    /// Connecting to it was refused or failed.
    Unreachable,
    /// The connection, its TLS handshake or its answer took too long.
    Timeout,
    /// The TLS handshake failed (its certificate, its protocol).
    TlsFailed,
    /// It closed (or broke) the connection before answering.
    Closed,
    /// Its name could not be resolved.
    DnsFailed,
}

impl ParentFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            ParentFailure::Unreachable => "unreachable",
            ParentFailure::Timeout => "timeout",
            ParentFailure::TlsFailed => "tls_failed",
            ParentFailure::Closed => "closed",
            ParentFailure::DnsFailed => "dns_failed",
        }
    }

    /// The RFC 9209 `Proxy-Status` error type for it.
    fn proxy_status(self) -> &'static str {
        match self {
            ParentFailure::Unreachable => "connection_refused",
            ParentFailure::Timeout => "connection_timeout",
            ParentFailure::TlsFailed => "tls_protocol_error",
            ParentFailure::Closed => "connection_terminated",
            ParentFailure::DnsFailed => "dns_error",
        }
    }
}

impl std::fmt::Display for ParentFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection did not become a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The whole request head did not arrive within the deadline.
    #[error("request head not complete before the deadline")]
    HeadTimeout,
    /// The head exceeded `limits.maxRequestHeadBytes` or the header count.
    #[error("request head too large")]
    HeadTooLarge,
    /// The request line exceeded the request-target limit.
    #[error("request target too long")]
    UriTooLong,
    /// The request is not valid HTTP/1.x or not a valid CONNECT.
    #[error("malformed request: {0}")]
    MalformedRequest(&'static str),
    /// A method other than CONNECT.
    #[error("method not allowed on this listener")]
    MethodNotAllowed,
    /// The policy denied the destination.
    #[error("denied by policy ({})", .0.as_str())]
    Denied(DenyReason),
    /// The destination is this proxy itself.
    #[error("target is the proxy itself")]
    SelfConnect,
    /// The per-client connection cap was reached.
    #[error("too many connections from this client")]
    ClientLimit,
    /// Proxy authentication is configured and the request's credentials are missing or wrong;
    /// carries the realm.
    #[error("proxy authentication required")]
    AuthRequired(String),
    /// The per-client request rate was exceeded; retry after this many seconds.
    #[error("too many requests from this client")]
    RateLimited(u64),
    /// The global connection cap was reached.
    #[error("proxy overloaded")]
    Overloaded,
    /// The proxy is shutting down.
    #[error("proxy draining")]
    Draining,
    /// The name does not exist or has no addresses.
    #[error("name not found")]
    ResolveNotFound,
    /// The resolver failed (SERVFAIL, refused, no reachable name server).
    #[error("name resolution failed")]
    ResolveFailed,
    /// The resolver did not answer in time.
    #[error("name resolution timed out")]
    ResolveTimeout,
    /// Every candidate address refused or failed.
    #[error("upstream connection failed")]
    UpstreamRefused(#[source] io::Error),
    /// The connect budget ran out.
    #[error("upstream connection timed out")]
    UpstreamTimeout,
    /// The upstream's HTTP response was invalid, or the exchange failed (plain-HTTP path).
    #[error("invalid or failed upstream response")]
    UpstreamResponse(#[source] hyper::Error),
    /// A plain-HTTP request body went past its rule's relay limit before the response began
    /// (`byte_limit`: `maxTotalBytes`).
    #[error("request body over the relay limit ({})", .0.as_str())]
    RelayLimit(crate::relay::CloseReason),
    /// The upstream sent no response head within `http.responseHeadTimeout`.
    #[error("upstream response timed out")]
    UpstreamResponseTimeout,
    /// The TLS handshake with the client failed or timed out.
    #[error("TLS handshake failed")]
    TlsHandshake(#[source] crate::tls::HandshakeError),
    /// A transparent connection named a host whose resolved addresses do not include the
    /// destination the client chose, on a listener with `transparent.strictDestination`.
    #[error("the original destination is not an address of the name the connection carries")]
    DestinationMismatch,
    /// A connection reached a transparent listener without being redirected to it (no original
    /// destination other than the listener itself).
    #[error("not a redirected connection")]
    NotRedirected,
    /// A parent proxy answered the request with a status other than 2xx (its `403`, its `407`:
    /// the credentials configured for it were refused, its `5xx`).
    #[error("parent {parent} answered {status}")]
    ParentRefused { parent: String, status: u16 },
    /// No parent of the route could be used: the last one tried and how it failed.
    #[error("no parent could be used (the last tried, {parent}: {failure})")]
    ParentUnreachable { parent: String, failure: ParentFailure },
    /// The client went away before the tunnel was established.
    #[error("client closed the connection")]
    ClientClosed,
    /// An I/O error on one side.
    #[error("I/O error on the {side:?} side")]
    Io {
        side: Side,
        #[source]
        source: io::Error,
    },
}

impl TunnelError {
    /// The `result` label of `tunnelgate_tunnel_requests_total`; a closed set.
    pub fn kind(&self) -> &'static str {
        match self {
            TunnelError::HeadTimeout => "head_timeout",
            TunnelError::HeadTooLarge => "head_too_large",
            TunnelError::UriTooLong => "uri_too_long",
            TunnelError::MalformedRequest(_) => "bad_request",
            TunnelError::MethodNotAllowed => "method_not_allowed",
            TunnelError::Denied(_) | TunnelError::SelfConnect => "denied",
            TunnelError::ClientLimit => "client_limited",
            TunnelError::RateLimited(_) => "rate_limited",
            TunnelError::AuthRequired(_) => "auth_required",
            TunnelError::Overloaded => "overloaded",
            TunnelError::Draining => "draining",
            TunnelError::ResolveNotFound | TunnelError::ResolveFailed => "dns_failed",
            TunnelError::ResolveTimeout => "dns_timeout",
            TunnelError::UpstreamRefused(_) => "upstream_unreachable",
            TunnelError::UpstreamTimeout => "upstream_timeout",
            TunnelError::UpstreamResponse(_) => "upstream_bad_response",
            TunnelError::UpstreamResponseTimeout => "upstream_response_timeout",
            TunnelError::RelayLimit(_) => "relay_limit",
            TunnelError::TlsHandshake(_) => "tls_handshake_failed",
            TunnelError::DestinationMismatch => "destination_mismatch",
            TunnelError::NotRedirected => "not_redirected",
            TunnelError::ParentRefused { .. } => "parent_refused",
            TunnelError::ParentUnreachable { .. } => "parent_unreachable",
            TunnelError::ClientClosed => "client_closed",
            TunnelError::Io { .. } => "io_error",
        }
    }

    /// The access event's `decision` (deny: the policy, a limit or authentication refused it;
    /// error: it could not be served) and `reason`; both closed sets.
    pub fn decision(&self) -> (&'static str, &'static str) {
        match self {
            TunnelError::Denied(DenyReason::Rule) => ("deny", "policy"),
            TunnelError::Denied(r) => ("deny", r.as_str()),
            TunnelError::SelfConnect => ("deny", "self"),
            TunnelError::DestinationMismatch => ("deny", "destination_mismatch"),
            TunnelError::NotRedirected => ("deny", "not_redirected"),
            TunnelError::ClientLimit | TunnelError::RateLimited(_) | TunnelError::RelayLimit(_) => ("deny", "limit"),
            TunnelError::Overloaded => ("deny", "overload"),
            TunnelError::Draining => ("deny", "draining"),
            TunnelError::AuthRequired(_) => ("deny", "auth"),
            other => ("error", other.kind()),
        }
    }

    /// Which side caused it.
    pub fn side(&self) -> Side {
        match self {
            TunnelError::ResolveNotFound
            | TunnelError::ResolveFailed
            | TunnelError::ResolveTimeout
            | TunnelError::UpstreamRefused(_)
            | TunnelError::UpstreamTimeout
            | TunnelError::UpstreamResponse(_)
            | TunnelError::UpstreamResponseTimeout
            | TunnelError::ParentRefused { .. }
            | TunnelError::ParentUnreachable { .. } => Side::Upstream,
            TunnelError::Overloaded | TunnelError::Draining => Side::Internal,
            TunnelError::Io { side, .. } => *side,
            _ => Side::Client,
        }
    }

    /// The status answered to the client, or `None` when no answer can or should be sent.
    pub fn status(&self) -> Option<u16> {
        Some(match self {
            TunnelError::HeadTimeout => 408,
            TunnelError::HeadTooLarge => 431,
            TunnelError::UriTooLong => 414,
            TunnelError::MalformedRequest(_) => 400,
            TunnelError::RelayLimit(_) => 413,
            TunnelError::MethodNotAllowed => 405,
            TunnelError::AuthRequired(_) => 407,
            TunnelError::Denied(_)
            | TunnelError::SelfConnect
            | TunnelError::DestinationMismatch
            | TunnelError::NotRedirected => 403,
            TunnelError::ClientLimit | TunnelError::RateLimited(_) => 429,
            TunnelError::Overloaded | TunnelError::Draining => 503,
            TunnelError::ResolveNotFound
            | TunnelError::ResolveFailed
            | TunnelError::UpstreamRefused(_)
            | TunnelError::UpstreamResponse(_)
            | TunnelError::ParentRefused { .. } => 502,
            TunnelError::ParentUnreachable { failure: ParentFailure::Timeout, .. } => 504,
            TunnelError::ParentUnreachable { .. } => 502,
            TunnelError::ResolveTimeout | TunnelError::UpstreamTimeout | TunnelError::UpstreamResponseTimeout => 504,
            TunnelError::TlsHandshake(_) | TunnelError::ClientClosed | TunnelError::Io { .. } => return None,
        })
    }
}

impl TunnelError {
    /// The `Proxy-Status` header value of a response generated for this error (RFC 9209): a
    /// machine-readable reason a client can act on, naming no host or address.
    pub fn proxy_status(&self) -> String {
        let error = match self {
            TunnelError::HeadTimeout
            | TunnelError::HeadTooLarge
            | TunnelError::UriTooLong
            | TunnelError::MalformedRequest(_)
            | TunnelError::MethodNotAllowed => "http_request_error",
            TunnelError::RelayLimit(_) => "http_request_denied",
            TunnelError::Denied(DenyReason::PrivateAddress { .. }) => "destination_ip_prohibited",
            TunnelError::Denied(_)
            | TunnelError::ClientLimit
            | TunnelError::RateLimited(_)
            | TunnelError::AuthRequired(_) => "http_request_denied",
            TunnelError::SelfConnect | TunnelError::NotRedirected => "proxy_loop_detected",
            TunnelError::DestinationMismatch => "destination_ip_prohibited",
            TunnelError::Overloaded | TunnelError::Draining => "proxy_internal_response",
            TunnelError::ResolveNotFound => return "tunnelgate; error=dns_error; rcode=\"NXDOMAIN\"".to_owned(),
            // The parent's own answer, with its status (RFC 9209 `received-status`).
            TunnelError::ParentRefused { parent, status } => {
                let error = if matches!(status, 403 | 407) { "http_request_denied" } else { "destination_unavailable" };
                return format!("tunnelgate; error={error}; next-hop=\"{parent}\"; received-status={status}");
            }
            TunnelError::ParentUnreachable { parent, failure } => {
                return format!("tunnelgate; error={}; next-hop=\"{parent}\"", failure.proxy_status());
            }
            TunnelError::ResolveFailed => "dns_error",
            TunnelError::ResolveTimeout => "dns_timeout",
            TunnelError::UpstreamRefused(_) => "connection_refused",
            TunnelError::UpstreamTimeout => "connection_timeout",
            TunnelError::UpstreamResponse(_) => "http_protocol_error",
            TunnelError::UpstreamResponseTimeout => "http_response_timeout",
            TunnelError::TlsHandshake(_) | TunnelError::ClientClosed | TunnelError::Io { .. } => "proxy_internal_error",
        };
        format!("tunnelgate; error={error}")
    }

    /// Seconds for `Retry-After`, where the client should come back later.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            TunnelError::RateLimited(secs) => Some((*secs).max(1)),
            TunnelError::ClientLimit | TunnelError::Overloaded | TunnelError::Draining => Some(1),
            _ => None,
        }
    }
}

/// Renders an error and its sources on one line (`a: b: c`), for logs.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut src = self.0.source();
        while let Some(s) = src {
            write!(f, ": {s}")?;
            src = s.source();
        }
        Ok(())
    }
}
