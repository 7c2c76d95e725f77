//! Stopping a connection from outside its task: one [`StopSignal`] per established tunnel or
//! plain-HTTP connection, and the [`StopSet`] through which the drain stops them all at once and
//! a reload stops the tunnels its policy no longer allows.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures::task::AtomicWaker;

use crate::sync::lock;

/// Why the proxy stops a connection from outside its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// The drain: for a tunnel, its deadline passed; for an HTTP connection, the listeners closed.
    Shutdown = 1,
    /// The policy in force no longer allows the tunnel.
    Revoked = 2,
}

/// One connection's stop signal: set once (the first reason stays), it wakes the connection's
/// task. The task polls it on every wake-up, that is for every message it relays or reads; two
/// atomic operations on the connection's own signal keep that cheap, where a cancellation token
/// takes a mutex twice per poll and a token shared by all connections (the drain's) would be one
/// lock contended by every connection.
#[derive(Debug, Default)]
pub struct StopSignal {
    /// 0 while the connection may run, else a [`StopReason`].
    reason: AtomicU8,
    waker: AtomicWaker,
}

impl StopSignal {
    /// Stops the connection for `reason` unless it was already stopped.
    pub fn stop(&self, reason: StopReason) {
        if self.reason.compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.waker.wake();
        }
    }

    pub fn reason(&self) -> Option<StopReason> {
        match self.reason.load(Ordering::Acquire) {
            0 => None,
            r if r == StopReason::Shutdown as u8 => Some(StopReason::Shutdown),
            _ => Some(StopReason::Revoked),
        }
    }

    /// Resolves once the connection is stopped, with the reason.
    pub fn stopped(&self) -> impl Future<Output = StopReason> + '_ {
        std::future::poll_fn(move |cx| {
            if let Some(r) = self.reason() {
                return Poll::Ready(r);
            }
            self.waker.register(cx.waker());
            // Set between the load and the registration: its wake may have found no waker.
            self.reason().map_or(Poll::Pending, Poll::Ready)
        })
    }
}

struct Members<T> {
    map: HashMap<u64, (T, Arc<StopSignal>)>,
    /// `stop_all` ran; a connection that joins later is stopped at once.
    stopped: bool,
}

/// Connections the drain stops together (established tunnels, plain-HTTP connections), each
/// with what else its owner needs to know of it (`T`; a tunnel's admission, for revocation).
/// Joining and leaving take the set's lock once per connection, not once per wake-up.
pub struct StopSet<T = ()> {
    members: Arc<Mutex<Members<T>>>,
    next_id: AtomicU64,
}

impl<T> Default for StopSet<T> {
    fn default() -> Self {
        StopSet {
            members: Arc::new(Mutex::new(Members { map: HashMap::new(), stopped: false })),
            next_id: AtomicU64::new(1),
        }
    }
}

/// A connection's place in a [`StopSet`]; leaves it when dropped.
pub struct Membership<T = ()> {
    id: u64,
    members: Arc<Mutex<Members<T>>>,
    pub stop: Arc<StopSignal>,
}

impl<T> StopSet<T> {
    pub fn join(&self, data: T) -> Membership<T> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(StopSignal::default());
        let mut members = lock(&self.members);
        if members.stopped {
            stop.stop(StopReason::Shutdown);
        }
        members.map.insert(id, (data, stop.clone()));
        drop(members);
        Membership { id, members: self.members.clone(), stop }
    }

    /// Stops every member (reason `shutdown`), and any that joins from now on.
    pub fn stop_all(&self) {
        let mut members = lock(&self.members);
        members.stopped = true;
        for (_, s) in members.map.values() {
            s.stop(StopReason::Shutdown);
        }
    }

    /// Stops, for `reason`, the members whose data `pick` selects; returns how many it selected.
    pub fn stop_where(&self, reason: StopReason, mut pick: impl FnMut(&T) -> bool) -> usize {
        let members = lock(&self.members);
        let mut n = 0;
        for (data, s) in members.map.values() {
            if pick(data) {
                s.stop(reason);
                n += 1;
            }
        }
        n
    }
}

impl<T> Drop for Membership<T> {
    fn drop(&mut self) {
        lock(&self.members).map.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first reason stays, and a waiting task wakes once the signal is set.
    #[tokio::test]
    async fn first_reason_stays_and_wakes_the_waiter() {
        let s = Arc::new(StopSignal::default());
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.stopped().await }
        });
        tokio::task::yield_now().await;
        s.stop(StopReason::Revoked);
        s.stop(StopReason::Shutdown);
        assert_eq!(waiter.await.ok(), Some(StopReason::Revoked));
        assert_eq!(s.reason(), Some(StopReason::Revoked));
    }

    /// `stop_all` stops the members, and a connection that joins afterwards (one that finished
    /// its first request head during the drain) is stopped at once; members leave when dropped.
    #[test]
    fn stop_all_stops_members_and_later_ones() {
        let set = StopSet::default();
        let open = set.join(());
        assert_eq!(open.stop.reason(), None);
        set.stop_all();
        assert_eq!(open.stop.reason(), Some(StopReason::Shutdown));
        let later = set.join(());
        assert_eq!(later.stop.reason(), Some(StopReason::Shutdown));
        assert_eq!(lock(&set.members).map.len(), 2);
        drop((open, later));
        assert!(lock(&set.members).map.is_empty());
    }
}
