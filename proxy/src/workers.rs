//! The connection workers: one single-threaded runtime per core, each accepting on its own handle
//! of every listener socket and serving what it accepted from accept to close, so a tunnel's two
//! directions, its dial and its accept never hand work to another thread.
//!
//! Why not one work-stealing runtime: with it, a wakeup for one half of a tunnel could land on
//! another worker and every accept woke a parked thread (a futex round trip). Here all workers
//! wait in their own epoll on the same listening socket; whichever is free first accepts, which
//! also balances load (a busy worker accepts less). Everything that is not a connection (admin,
//! reload, ACME, housekeeping, the drain) runs on the control runtime of the caller.

use std::io;
use std::num::NonZeroUsize;
use std::thread;

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

/// The running workers. Dropping this stops them: each drops its runtime and with it every
/// task it still runs (the drain has finished by then, or the process is exiting).
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` workers, each a thread with its own current-thread runtime.
    pub fn start(n: NonZeroUsize) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n.get());
        for i in 0..n.get() {
            let rt = Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            let ours = stop.clone();
            let spawned = thread::Builder::new().name(format!("tunnelgate-worker-{i}")).spawn(move || {
                rt.block_on(ours.cancelled());
            });
            if let Err(e) = spawned {
                stop.cancel();
                return Err(e);
            }
        }
        Ok(Workers { handles, stop })
    }

    /// No threads of its own: connections are served on the caller's runtime. For embedding the
    /// proxy in a runtime the caller controls (tests that pause time drive every timeout).
    pub fn inline() -> Workers {
        Workers { handles: vec![Handle::current()], stop: CancellationToken::new() }
    }

    /// One worker per CPU this process may use (its affinity mask and cgroup quota).
    pub fn default_count() -> NonZeroUsize {
        thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
    }

    /// The workers' runtimes, to start accept loops on.
    pub fn handles(&self) -> Vec<Handle> {
        self.handles.clone()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
