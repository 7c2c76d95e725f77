//! Idle upstream HTTP/1.1 connections for reuse, keyed by the exact address dialled, the `Host`
//! sent and the client (its address and proxy user): a request reuses a connection only to an
//! address its own policy decision approved, and only one its own client used — tenants of an
//! egress proxy do not trust each other, and a response desynchronised by one client's request
//! (an upstream that ignores a GET's body) must never reach another. Bounded per key and in all;
//! idle connections expire.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use prometheus::IntGauge;
use tokio::time::{timeout, Instant};

use crate::sync::lock;

/// The body type of every request sent upstream.
pub type UpstreamBody = BoxBody<Bytes, super::limits::BoxError>;

/// Which idle connections a request may use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: SocketAddr,
    /// The `Host` value the requests on it carry.
    pub host: String,
    /// The client whose requests it carried: its address and authenticated proxy user.
    pub client: (IpAddr, Option<String>),
    /// The parent proxy it goes to (then `addr` is the target's first approved address), or
    /// `None` for a connection to the target itself.
    pub via: Option<String>,
}

struct Parked {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

#[derive(Default)]
struct Idle {
    by_key: HashMap<PoolKey, Vec<Parked>>,
    /// Connections in `by_key`, counted as they come and go (checked on every checkin).
    total: usize,
}

/// The pool; one per process.
pub struct UpstreamPool {
    idle: Mutex<Idle>,
    /// Idle connections now (the `tunnelgate_upstream_pool_idle` gauge).
    gauge: IntGauge,
}

/// How long a checkout waits for a returned connection's driver to mark it ready.
const READY_WAIT: Duration = Duration::from_millis(50);

impl UpstreamPool {
    pub(crate) fn new(gauge: IntGauge) -> UpstreamPool {
        UpstreamPool { idle: Mutex::default(), gauge }
    }

    /// An idle connection for `key` that is open, younger than `max_idle` and ready.
    pub async fn checkout(&self, key: &PoolKey, max_idle: Duration) -> Option<SendRequest<UpstreamBody>> {
        loop {
            let candidate = {
                let mut idle = lock(&self.idle);
                let list = idle.by_key.get_mut(key)?;
                let c = list.pop();
                if list.is_empty() {
                    idle.by_key.remove(key);
                }
                idle.total -= usize::from(c.is_some());
                c
            };
            let Parked { mut sender, since } = candidate?;
            self.gauge.dec();
            if sender.is_closed() || since.elapsed() > max_idle {
                continue;
            }
            if timeout(READY_WAIT, sender.ready()).await.is_ok_and(|r| r.is_ok()) {
                return Some(sender);
            }
        }
    }

    /// Keeps `sender` for reuse unless the bounds say no (then it is dropped, which closes it).
    pub fn checkin(&self, key: PoolKey, sender: SendRequest<UpstreamBody>, per_key: usize, total: usize) {
        if sender.is_closed() || per_key == 0 {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.total >= total {
            return;
        }
        let list = idle.by_key.entry(key).or_default();
        if list.len() >= per_key {
            return;
        }
        list.push(Parked { sender, since: Instant::now() });
        idle.total += 1;
        self.gauge.inc();
    }

    /// Drops connections idle for longer than `max_idle` or closed by the upstream.
    pub fn sweep(&self, max_idle: Duration) {
        let mut idle = lock(&self.idle);
        let mut removed = 0;
        idle.by_key.retain(|_, list| {
            let before = list.len();
            list.retain(|c| !c.sender.is_closed() && c.since.elapsed() <= max_idle);
            removed += before - list.len();
            !list.is_empty()
        });
        idle.total -= removed;
        self.gauge.sub(i64::try_from(removed).unwrap_or(0));
    }
}
