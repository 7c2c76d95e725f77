//! A rule's relay limits on plain-HTTP requests, per request (each request is decided on its own
//! and may match another rule than the one before it): a request's body and its response's body
//! share one byte budget (`maxTotalBytes`, both directions together), each direction is paced to
//! `maxBytesPerSecond`, and the connection's [`Watchdog`] closes the connection when the request
//! outlives `maxLifetime` or moves no byte for `idleTimeout`. `minBytesPerMinute` stays a tunnel's
//! limit: a request is bounded by the others.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use hyper::body::{Body, Bytes, Frame, SizeHint};
use proxy_config::TunnelLimits;
use tokio::sync::Notify;
use tokio::time::{sleep_until, Duration, Instant, Sleep};

pub use crate::relay::Direction;
use crate::relay::{CloseReason, Traffic};
use crate::sync::lock;

/// The error type of the bodies on the plain-HTTP path.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body stopped because its request went past a relay limit.
#[derive(Debug, thiserror::Error)]
#[error("the request went past its rule's relay limit ({})", .0.as_str())]
pub struct LimitExceeded(pub CloseReason);

/// What one request may still move, and what it moved: its [`Traffic`] under the rule's limits,
/// and the limit that ended it, if one did.
pub struct Budget {
    limits: TunnelLimits,
    traffic: Traffic,
    cut: Mutex<Option<CloseReason>>,
}

impl Budget {
    pub fn new(limits: TunnelLimits) -> Arc<Budget> {
        Arc::new(Budget { limits, traffic: Traffic::new(limits.max_total_bytes), cut: Mutex::new(None) })
    }

    /// Bytes moved so far: (client to upstream, upstream to client).
    pub fn bytes(&self) -> (u64, u64) {
        self.traffic.bytes()
    }

    /// The limit that ended the request, if one did.
    pub fn cut_reason(&self) -> Option<CloseReason> {
        *lock(&self.cut)
    }

    fn cut(&self, reason: CloseReason) {
        lock(&self.cut).get_or_insert(reason);
    }

    /// Takes `n` bytes flowing `dir` out of the budget: how many of them may pass (fewer than
    /// `n` once `maxTotalBytes` is reached, which ends the request).
    fn take(&self, dir: Direction, n: u64) -> u64 {
        let allowed = self.traffic.take(n);
        if allowed < n {
            self.cut(CloseReason::ByteLimit);
        }
        self.traffic.moved(dir, allowed);
        allowed
    }

    /// The next instant a time limit could be reached, or the limit reached by `now`.
    fn next_deadline(&self, now: Instant) -> Result<Instant, CloseReason> {
        let lifetime = self.traffic.start() + self.limits.max_lifetime;
        let idle = self.traffic.last_activity() + self.limits.idle_timeout;
        if now >= lifetime {
            Err(CloseReason::Lifetime)
        } else if now >= idle {
            Err(CloseReason::IdleTimeout)
        } else {
            Ok(lifetime.min(idle))
        }
    }
}

/// A body that draws on a request's [`Budget`] as it flows (none: passed through as it is).
pub struct Limited<B> {
    inner: B,
    budget: Option<Arc<Budget>>,
    dir: Direction,
    /// When the pacing lets the next frame through.
    next_at: Option<Instant>,
    pace: Option<Pin<Box<Sleep>>>,
}

impl<B> Limited<B> {
    pub fn new(inner: B, budget: Option<Arc<Budget>>, dir: Direction) -> Limited<B> {
        Limited { inner, budget, dir, next_at: None, pace: None }
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(budget) = this.budget.clone() else {
            return Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into);
        };
        if let Some(reason) = budget.cut_reason() {
            return Poll::Ready(Some(Err(LimitExceeded(reason).into())));
        }
        if let Some(pace) = this.pace.as_mut() {
            ready!(pace.as_mut().poll(cx));
            this.pace = None;
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(other) => return Poll::Ready(Some(Ok(other))),
        };
        let n = data.len() as u64;
        let allowed = budget.take(this.dir, n);
        if allowed == 0 && n > 0 {
            return Poll::Ready(Some(Err(LimitExceeded(CloseReason::ByteLimit).into())));
        }
        if let Some(rate) = budget.limits.max_bytes_per_second.filter(|r| *r > 0) {
            // Paced like a tunnel's direction: the next frame waits until this one's share of the
            // rate has passed.
            let now = Instant::now();
            let at = this.next_at.map_or(now, |t| t.max(now)) + Duration::from_secs_f64(allowed as f64 / rate as f64);
            this.next_at = Some(at);
            if at > now {
                this.pace = Some(Box::pin(sleep_until(at)));
            }
        }
        let data = if allowed < n { data.slice(..usize::try_from(allowed).unwrap_or(0)) } else { data };
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The time limits of the request in flight on one client connection: [`Watchdog::expired`]
/// resolves when it outlives `maxLifetime` or idles past `idleTimeout`, and the connection is
/// closed. Between requests it waits without a timer.
/// It is woken only when a request's deadline comes before the one its timer is armed for (a
/// keep-alive connection whose requests share a rule arms the timer once, not twice per request);
/// a timer that fires for a request already over finds the next one, or parks.
#[derive(Default)]
pub struct Watchdog {
    state: Mutex<Watched>,
    changed: Notify,
}

#[derive(Default)]
struct Watched {
    current: Option<Arc<Budget>>,
    /// When the timer fires next (`None`: parked until a request comes).
    armed: Option<Instant>,
}

impl Watchdog {
    /// Watches `budget`'s request from now on.
    pub fn watch(&self, budget: &Arc<Budget>) {
        let mut st = lock(&self.state);
        st.current = Some(budget.clone());
        let earlier = match (budget.next_deadline(Instant::now()), st.armed) {
            (Ok(at), Some(armed)) => at < armed,
            _ => true,
        };
        drop(st);
        if earlier {
            self.changed.notify_one();
        }
    }

    /// Stops watching `budget`'s request (it is over); a later request's budget stays watched.
    pub fn release(&self, budget: &Arc<Budget>) {
        let mut st = lock(&self.state);
        if st.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, budget)) {
            st.current = None;
        }
    }

    /// Resolves with the limit the watched request went past.
    pub async fn expired(&self) -> CloseReason {
        loop {
            let deadline = {
                let mut st = lock(&self.state);
                let deadline = match &st.current {
                    None => None,
                    Some(budget) => match budget.next_deadline(Instant::now()) {
                        Ok(at) => Some(at),
                        Err(reason) => {
                            budget.cut(reason);
                            return reason;
                        }
                    },
                };
                st.armed = deadline;
                deadline
            };
            match deadline {
                None => self.changed.notified().await,
                Some(at) => {
                    tokio::select! {
                        () = sleep_until(at) => {}
                        () = self.changed.notified() => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn limits(total: Option<u64>, rate: Option<u64>) -> TunnelLimits {
        TunnelLimits {
            idle_timeout: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(60),
            max_bytes_per_second: rate,
            min_bytes_per_minute: None,
            max_total_bytes: total,
        }
    }

    #[tokio::test]
    async fn both_directions_share_the_byte_budget_and_stop_exactly_at_it() {
        let budget = Budget::new(limits(Some(1000), None));
        let up = Limited::new(Full::new(Bytes::from(vec![1u8; 600])), Some(budget.clone()), Direction::Up);
        assert_eq!(up.collect().await.unwrap().to_bytes().len(), 600);
        let mut down = Limited::new(Full::new(Bytes::from(vec![2u8; 600])), Some(budget.clone()), Direction::Down);
        let first = down.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first.len(), 400, "what is left of the budget passes, no more");
        let err = down.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("byte_limit"), "{err}");
        assert_eq!(budget.bytes(), (600, 400));
        assert_eq!(budget.cut_reason(), Some(CloseReason::ByteLimit));
    }

    #[tokio::test(start_paused = true)]
    async fn each_direction_is_paced_to_the_rate() {
        let budget = Budget::new(limits(None, Some(1000)));
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            (0..3).map(|_| Ok(Frame::data(Bytes::from(vec![0u8; 500])))).collect();
        let body = http_body_util::StreamBody::new(futures::stream::iter(chunks));
        let started = Instant::now();
        let got = Limited::new(body, Some(budget), Direction::Down).collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 1500);
        // Three 500-byte frames at 1000 B/s: the second waits 0.5 s, the third 1 s.
        assert!(started.elapsed() >= Duration::from_millis(1000), "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_fires_at_the_lifetime_and_not_between_requests() {
        let dog = Watchdog::default();
        let mut l = limits(None, None);
        l.max_lifetime = Duration::from_secs(2);
        let budget = Budget::new(l);
        dog.watch(&budget);
        let started = Instant::now();
        assert_eq!(dog.expired().await, CloseReason::Lifetime);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(budget.cut_reason(), Some(CloseReason::Lifetime));
        // Released: nothing to fire for.
        dog.release(&budget);
        assert!(tokio::time::timeout(Duration::from_secs(3600), dog.expired()).await.is_err());
    }
}
