//! What a listener hands to each connection it accepts: the shared state, the snapshot in force at
//! accept, and the connection's identity.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;

use crate::conn_limit::ConnSlot;
use crate::error::TunnelError;
use crate::snapshot::SharedSnapshot;
use crate::state::Inner;
use crate::tls::TlsServer;

/// One accepted connection's context (cheap to clone: what outlives the connection task, such as
/// an upgraded tunnel, takes a copy).
#[derive(Clone)]
pub struct ConnCtx {
    pub inner: Arc<Inner>,
    pub listener: Arc<str>,
    pub snapshot: SharedSnapshot,
    pub tls: Option<Arc<TlsServer>>,
    pub id: u64,
    pub peer: SocketAddr,
    /// The listener-side address of the connection (the PROXY protocol's destination); looked up
    /// only on listeners that send a PROXY header.
    pub local: Option<SocketAddr>,
    pub accepted: Instant,
    /// Keeps the connection counted (open, and under the connection caps once admitted) until
    /// every task serving it has ended.
    pub slot: Arc<ConnSlot>,
}

impl ConnCtx {
    /// This context with the configuration in force now, when a reload has replaced the one this
    /// context carries: every request is authorized, authenticated and rate-limited by the
    /// configuration in force when it arrives, so a keep-alive connection never outlives a
    /// revoked permission. `None` when nothing changed (no copy is made).
    pub fn current(&self) -> Option<ConnCtx> {
        let now = self.inner.snapshot();
        (!Arc::ptr_eq(&now, &self.snapshot)).then(|| ConnCtx { snapshot: now, ..self.clone() })
    }

    /// Admits one request (a CONNECT or an HTTP request): refused under memory pressure, then it
    /// draws from its client's rate bucket.
    pub fn admit_request(&self) -> Result<(), TunnelError> {
        if self.inner.shed_for_memory() {
            return Err(TunnelError::Overloaded);
        }
        match &self.snapshot.request_limiter {
            Some(limiter) => limiter.check(self.peer.ip()),
            None => Ok(()),
        }
    }

    /// The proxy user that a request's `Proxy-Authorization` value authenticates; `None` when
    /// the configuration has no `auth`.
    pub async fn authenticate(&self, credentials: Option<&[u8]>) -> Result<Option<String>, TunnelError> {
        match &self.snapshot.auth {
            Some(a) => a.authenticate(self.peer.ip(), credentials).await.map(Some),
            None => Ok(None),
        }
    }
}
