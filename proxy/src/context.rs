//! What a listener hands to each connection it accepts: the shared state, the snapshot in force at
//! accept, and the connection's identity.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::snapshot::SharedSnapshot;
use crate::state::Inner;

/// One accepted connection's context (cheap to clone: what outlives the connection task, such as
/// an upgraded tunnel, takes a copy).
#[derive(Clone)]
pub struct ConnCtx {
    pub inner: Arc<Inner>,
    pub listener: Arc<str>,
    pub snapshot: SharedSnapshot,
    pub tls: Option<TlsAcceptor>,
    pub id: u64,
    pub peer: SocketAddr,
    /// The listener-side address of the connection (the PROXY protocol's destination).
    pub local: Option<SocketAddr>,
    pub accepted: Instant,
}
