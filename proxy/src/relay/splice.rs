//! Zero-copy relaying from one socket to another through a kernel pipe (`splice(2)`): the
//! pipes, the pool that lends them only to directions with bytes in flight, and the two moves (a
//! socket into a pipe, a pipe into a socket).
//!
//! The bytes never enter the proxy's memory: the kernel moves page references from the source's
//! receive queue into the pipe and from the pipe into the destination's send queue.

use std::future::poll_fn;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use rustix::pipe::{fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;

use super::socket::Socket;
use crate::memory;

/// Pipes kept for reuse once returned: enough for the directions that stream at once on a busy
/// proxy, few enough that an idle proxy holds a handful of descriptors.
const POOL_MAX: usize = 64;

/// The most one move takes, and the size asked of each new pipe: four times the kernel's default
/// (16 pages), which measured 0.60-0.65x of a direct connection through one tunnel against
/// 0.51-0.56x, with a quarter less CPU per GiB. Past the user's pipe page limit
/// (`fs.pipe-user-pages-soft`, root exempt) the kernel keeps pipes smaller; each pipe's own
/// capacity is read back and respected.
pub(super) const PIPE_CAPACITY: usize = 256 * 1024;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// An empty kernel pipe, lent to one direction while its bytes are in flight.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What it holds at most, as the kernel made it (smaller than asked when the user is past
    /// the pipe page limit): a move offers no more.
    capacity: usize,
    /// Bytes in it now, counted as the proxy's memory while there.
    held: usize,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        memory::unpiped(self.held);
    }
}

impl Pipe {
    /// A pipe from the pool, or a new one.
    pub(super) fn take() -> io::Result<Pipe> {
        if let Some(p) = POOL.lock().ok().and_then(|mut pool| pool.pop()) {
            return Ok(p);
        }
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // Refused past the pipe page limit: the default size serves.
        let _ = fcntl_setpipe_size(&read, PIPE_CAPACITY);
        let capacity = fcntl_getpipe_size(&read)?.min(PIPE_CAPACITY);
        Ok(Pipe { read, write, capacity, held: 0 })
    }

    /// Returns the pipe to the pool when it is empty and the pool is not full; else closes it
    /// (bytes still in it belong to a tunnel that ended).
    pub(super) fn give_back(self) {
        if self.held > 0 {
            return;
        }
        if let Ok(mut pool) = POOL.lock() {
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        }
    }

    /// Moves up to `limit` bytes waiting in `src`'s receive queue into the pipe (which must be
    /// empty): `Ok(0)` at the end of the stream, `WouldBlock` when nothing waits (which clears
    /// the socket's readiness). A short move is no proof of a drained socket, unlike a short
    /// read: a pipe's capacity counts buffer slots, not bytes, and over a veth link a 256 KiB
    /// move took 127,104 of 200,000 queued bytes. Clearing readiness then would leave the rest
    /// waiting for a packet that may never come.
    pub(super) fn fill(&mut self, src: &dyn Socket, limit: usize) -> io::Result<usize> {
        let offered = limit.min(self.capacity);
        let got = src.try_io(Interest::READABLE, &mut || {
            Ok(splice(src.as_fd(), None, &self.write, None, offered, SpliceFlags::NONBLOCK | SpliceFlags::MOVE)?)
        })?;
        self.held += got;
        memory::piped(got);
        Ok(got)
    }

    /// Moves the first `n` bytes of the pipe into `dst`, waiting while its send queue is full;
    /// `sent` hears of each part as it leaves (a tunnel ended meanwhile has counted what left).
    pub(super) async fn drain(
        &mut self,
        dst: &dyn Socket,
        mut n: usize,
        mut sent: impl FnMut(usize),
    ) -> io::Result<()> {
        while n > 0 {
            let moved = dst.try_io(Interest::WRITABLE, &mut || {
                Ok(splice(&self.read, None, dst.as_fd(), None, n, SpliceFlags::NONBLOCK | SpliceFlags::MOVE)?)
            });
            match moved {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    let k = k.min(n);
                    let freed = k.min(self.held);
                    self.held -= freed;
                    memory::unpiped(freed);
                    sent(k);
                    n -= k;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => poll_fn(|cx| dst.poll_write_ready(cx)).await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Whether `splice(2)` failing with this error means these descriptors cannot be spliced (a
/// kernel or sandbox without it for sockets), so the relay should copy instead.
pub(super) fn unsupported(code: i32) -> bool {
    [rustix::io::Errno::INVAL, rustix::io::Errno::NOSYS, rustix::io::Errno::OPNOTSUPP]
        .iter()
        .any(|e| e.raw_os_error() == code)
}
