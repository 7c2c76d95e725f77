//! The per-client request rate limit (`limits.requestsPerSecond`, `limits.requestBurst`): a token
//! bucket per client address (GCRA, from the `governor` crate) that every request draws from,
//! CONNECT and plain HTTP alike.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use proxy_config::Limits;

use crate::error::TunnelError;

/// How many checks between sweeps of buckets that are full again (forgotten clients).
const SWEEP_EVERY: u64 = 4096;

/// The buckets of one configuration generation.
pub struct RequestLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    checks: AtomicU64,
}

impl RequestLimiter {
    /// The limiter `limits` ask for, or `None` when no rate is set.
    pub fn new(limits: &Limits) -> Option<RequestLimiter> {
        let rate = NonZeroU32::new(limits.requests_per_second?)?;
        let burst = limits.request_burst.and_then(NonZeroU32::new).unwrap_or(rate);
        Some(RequestLimiter {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            checks: AtomicU64::new(0),
        })
    }

    /// Takes one request from `client`'s bucket, or says how many seconds until one is free.
    pub fn check(&self, client: IpAddr) -> Result<(), TunnelError> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&client.to_canonical()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            TunnelError::RateLimited(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
        })
    }
}
