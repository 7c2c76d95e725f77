//! Accept loops: each listener accepts until told to stop, hands every connection (with the
//! snapshot in force at accept) to a tracked task, and never dies on an accept error; a connection
//! stays counted under the caps (`conn_limit`) through its `ConnSlot`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::time::{sleep, Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug_span, warn, Instrument};

use crate::conn;
use crate::conn_limit::ConnSlot;
use crate::context::ConnCtx;
use crate::state::Inner;

/// Accepts on `listener` until `stop` is cancelled, then hands the socket back (a reload may
/// give it to a renamed listener; dropping it makes later connects fail with ECONNREFUSED).
pub async fn run(inner: Arc<Inner>, name: Arc<str>, listener: TcpListener, stop: CancellationToken) -> TcpListener {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let snapshot = inner.snapshot();
                let tls = snapshot.tls.get(&*name).cloned();
                let id = inner.next_conn_id.fetch_add(1, Ordering::Relaxed);
                let ctx = ConnCtx {
                    inner: inner.clone(),
                    listener: name.clone(),
                    snapshot,
                    tls,
                    id,
                    peer,
                    local: None,
                    accepted: Instant::now(),
                    slot: ConnSlot::new(inner.metrics.connections_open.clone()),
                };
                let span = debug_span!("conn", id, listener = &*name);
                inner.tracker.spawn(conn::serve(stream, ctx).instrument(span));
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS...: count, back off, go on (never a busy loop, never fatal).
                inner.metrics.accept_errors.inc();
                warn!(listener = &*name, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    listener
}
