//! The stream sockets the relay works on directly (TCP and Unix): their descriptor and tokio's
//! readiness for them, so the relay can wait for bytes without holding a buffer and splice bytes
//! from one into another.

use std::future::poll_fn;
use std::io;
use std::os::fd::AsFd;
use std::task::{Context, Poll};

use bytes::BufMut;
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// A stream socket registered with tokio.
pub trait Socket: AsFd + Sync {
    /// Runs `f` when tokio saw the socket ready for `interest`, clearing that readiness when `f`
    /// answers `WouldBlock`.
    fn try_io(&self, interest: Interest, f: &mut dyn FnMut() -> io::Result<usize>) -> io::Result<usize>;
    /// Reads what is waiting, at most `limit` bytes, into `buf`'s spare capacity.
    fn try_read_into(&self, buf: &mut Vec<u8>, limit: usize) -> io::Result<usize>;
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            fn try_io(&self, interest: Interest, f: &mut dyn FnMut() -> io::Result<usize>) -> io::Result<usize> {
                <$t>::try_io(self, interest, f)
            }
            fn try_read_into(&self, buf: &mut Vec<u8>, limit: usize) -> io::Result<usize> {
                <$t>::try_read_buf(self, &mut buf.limit(limit))
            }
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
        }
    };
}

socket!(TcpStream);
socket!(UnixStream);

/// Waits until `socket` may have bytes (or its end) to read, holding no pipe and no waiter node:
/// the socket's own reader slot keeps the waker (the relay is its one reader). The splice path's
/// wait; the copy path polls the same readiness inside its read.
pub(super) async fn readable(socket: &dyn Socket) -> io::Result<()> {
    poll_fn(|cx| socket.poll_read_ready(cx)).await
}
