//! Connection caps: counts open connections, globally and per client address, for the proxy's
//! listeners and (with caps of its own) the admin server, and the slot that keeps one connection
//! counted while any task serves it. Knows nothing of connections beyond their client's address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::IntGauge;

use crate::error::TunnelError;
use crate::metrics::GaugeGuard;
use crate::sync::lock;

/// Counts open connections, globally and per client address.
#[derive(Default)]
pub struct ConnLimiter {
    state: Mutex<LimiterState>,
}

#[derive(Default)]
struct LimiterState {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// One admitted connection; releases its slot when dropped.
pub struct Permit {
    limiter: Arc<ConnLimiter>,
    client: IpAddr,
}

impl ConnLimiter {
    /// Admits a connection from `client`, or says which cap it hit.
    pub fn acquire(
        self: &Arc<Self>,
        client: IpAddr,
        max_total: usize,
        max_per_client: usize,
    ) -> Result<Permit, TunnelError> {
        let mut s = lock(&self.state);
        if s.total >= max_total {
            return Err(TunnelError::Overloaded);
        }
        let n = s.per_client.entry(client).or_insert(0);
        if *n >= max_per_client {
            return Err(TunnelError::ClientLimit);
        }
        *n += 1;
        s.total += 1;
        Ok(Permit { limiter: self.clone(), client })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = lock(&self.limiter.state);
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                s.per_client.remove(&self.client);
            }
        }
    }
}

/// What keeps a connection counted while any task serves it (the connection's own task, and the
/// task that relays its tunnel or upgrade): the open-connections gauge and, once admitted, its
/// slot under the connection caps. Every copy of the connection's context shares it; the last
/// one dropped releases both.
pub struct ConnSlot {
    _open: GaugeGuard,
    permit: OnceLock<Permit>,
}

impl ConnSlot {
    /// Counts a connection as open until the returned slot's last copy is dropped.
    pub fn new(open: IntGauge) -> Arc<ConnSlot> {
        Arc::new(ConnSlot { _open: GaugeGuard::new(open), permit: OnceLock::new() })
    }

    /// Holds `permit` for as long as the connection is served.
    pub fn admit(&self, permit: Permit) {
        // A connection is admitted once; a second permit would be released at once.
        let _ = self.permit.set(permit);
    }
}
