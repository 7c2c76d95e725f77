//! Full-duplex relay of an established tunnel: propagates half-close each way and enforces the
//! tunnel's limits (idle timeout, lifetime, per-direction rate, minimum rate, total bytes).
//! Every tunnel ends with exactly one [`CloseReason`].

use std::future::{poll_fn, Future};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Poll};

use prometheus::IntCounter;
use proxy_config::TunnelLimits;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Duration, Instant};

use crate::stop::{StopReason, StopSignal};

/// Size of each direction's buffer while data flows. 32 KiB keeps bulk copies efficient while
/// bounding what one tunnel buffers (Envoy's per-connection buffer limit is also 32 KiB).
pub const BUF_SIZE: usize = 32 * 1024;

/// How long the relay waits for a graceful shutdown of each side after a forced close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Why a tunnel ended. A closed set: the `close` label of the duration histogram and the
/// access log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client finished first (its FIN came first), then both directions ended.
    ClientClosed,
    /// The upstream finished first.
    UpstreamClosed,
    /// The TLS client's connection ended without `close_notify` (a truncation: an attacker or a
    /// broken client can cut a TLS stream at any point). Still propagated as a FIN.
    ClientTruncated,
    IdleTimeout,
    Lifetime,
    ByteLimit,
    TooSlow,
    Shutdown,
    Revoked,
    IoError,
}

impl CloseReason {
    /// The stable name used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::UpstreamClosed => "upstream_closed",
            CloseReason::ClientTruncated => "client_truncated",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Lifetime => "lifetime",
            CloseReason::ByteLimit => "byte_limit",
            CloseReason::TooSlow => "too_slow",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Revoked => "revoked",
            CloseReason::IoError => "io_error",
        }
    }
}

/// What the relay reports when the tunnel is over.
#[derive(Debug, Clone, Copy)]
pub struct RelayOutcome {
    pub reason: CloseReason,
    /// Client → upstream bytes, including early data.
    pub bytes_up: u64,
    /// Upstream → client bytes.
    pub bytes_down: u64,
    pub duration: Duration,
}

/// A read half of the relay: reads into a buffer it allocates as needed, and where it can wait
/// for data without one (a TCP half), waits with the buffer released, so idle tunnels cost no
/// buffer memory.
pub trait RelayRead: AsyncRead + Unpin + Send {
    /// Reads at most `limit` bytes into `buf` (empty, its capacity kept or allocated here);
    /// `Ok(0)` at the end of the stream.
    fn read_some(&mut self, buf: &mut Vec<u8>, limit: usize) -> impl Future<Output = io::Result<usize>> + Send;

    /// The socket behind this half, when its bytes can be spliced out of it.
    fn splice_source(&self) -> Option<&dyn Socket> {
        None
    }
}

/// A write half of the relay.
pub trait RelayWrite: AsyncWrite + Unpin + Send {
    /// The socket behind this half, when bytes can be spliced into it.
    fn splice_sink(&self) -> Option<&dyn Socket> {
        None
    }

    /// Lets go of this half when the relay has ended (the socket closes with its read half).
    fn release(self)
    where
        Self: Sized,
    {
    }
}

impl<T: AsyncRead + AsyncWrite + Send> RelayWrite for tokio::io::WriteHalf<T> {}

/// Reads at most `limit` bytes of `socket` into `buf`: takes what is there without waiting, and
/// waits only with the buffer released (readiness alone is no promise of data: a socket never
/// read before reports it at once). A poll function, not an `async fn`: its state is its three
/// arguments and nothing more (an idle tunnel holds it for both directions).
fn read_ready<'s, 'b>(
    socket: &'s dyn Socket,
    buf: &'b mut Vec<u8>,
    limit: usize,
) -> impl Future<Output = io::Result<usize>> + Send + use<'s, 'b> {
    poll_fn(move |cx| loop {
        if buf.capacity() > 0 {
            let offered = limit.min(buf.capacity() - buf.len());
            let mut got = 0;
            let read = socket.try_io(Interest::READABLE, &mut || {
                got = socket.try_read_into(buf, limit)?;
                // A read that did not fill the space offered found the socket's queue empty:
                // report it as drained so the next read waits for the poller instead of asking
                // the kernel once more only to hear EAGAIN (one syscall less per message). Data
                // arriving meanwhile raises readiness again.
                if got > 0 && got < offered {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(got)
                }
            });
            match read {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => return Poll::Ready(Ok(got)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => *buf = Vec::new(),
                other => return Poll::Ready(other),
            }
        }
        ready!(socket.poll_read_ready(cx))?;
        buf.reserve_exact(BUF_SIZE);
    })
}

/// The owned halves of a TCP or Unix stream: read without a buffer while waiting, spliced from
/// and into.
macro_rules! owned_halves {
    ($read:ty, $write:ty, $stream:ty) => {
        impl RelayRead for $read {
            fn splice_source(&self) -> Option<&dyn Socket> {
                Some(AsRef::<$stream>::as_ref(self))
            }

            fn read_some<'s, 'b>(
                &'s mut self,
                buf: &'b mut Vec<u8>,
                limit: usize,
            ) -> impl Future<Output = io::Result<usize>> + Send + use<'s, 'b> {
                read_ready(AsRef::<$stream>::as_ref(self), buf, limit)
            }
        }

        impl RelayWrite for $write {
            fn splice_sink(&self) -> Option<&dyn Socket> {
                Some(AsRef::<$stream>::as_ref(self))
            }

            /// Without the shutdown(2) tokio makes when a write half is dropped: at the end of a
            /// relay each direction has been shut down already, or the socket is being closed,
            /// which sends the FIN all the same (two system calls less per tunnel).
            fn release(self) {
                self.forget();
            }
        }
    };
}

owned_halves!(OwnedReadHalf, OwnedWriteHalf, TcpStream);
owned_halves!(tokio::net::unix::OwnedReadHalf, tokio::net::unix::OwnedWriteHalf, tokio::net::UnixStream);

impl<T: AsyncRead + AsyncWrite + Send> RelayRead for tokio::io::ReadHalf<T> {
    /// No readiness to wait on without reading (TLS): the buffer stays while the read waits.
    async fn read_some(&mut self, buf: &mut Vec<u8>, limit: usize) -> io::Result<usize> {
        if buf.capacity() == 0 {
            buf.reserve_exact(BUF_SIZE);
        }
        self.take(limit as u64).read_buf(buf).await
    }
}

/// A client or upstream connection split for the relay: a TCP stream into owned halves (whose
/// read half can wait without a buffer), anything else through `tokio::io::split`.
pub trait IntoHalves: AsyncRead + AsyncWrite + Unpin + Send + Sized {
    type Read: RelayRead;
    type Write: RelayWrite;
    fn into_halves(self) -> (Self::Read, Self::Write);
}

impl IntoHalves for TcpStream {
    type Read = OwnedReadHalf;
    type Write = OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> IntoHalves for tokio_rustls::server::TlsStream<T> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

impl From<StopReason> for CloseReason {
    fn from(r: StopReason) -> CloseReason {
        match r {
            StopReason::Shutdown => CloseReason::Shutdown,
            StopReason::Revoked => CloseReason::Revoked,
        }
    }
}

/// Counters the relay updates as bytes move.
#[derive(Clone)]
pub struct ByteCounters {
    pub up: IntCounter,
    pub down: IntCounter,
    /// The part of both that moved by `splice(2)`.
    pub spliced: IntCounter,
}

impl ByteCounters {
    /// The counter of direction `dir`.
    fn of(&self, dir: Direction) -> &IntCounter {
        if dir == Direction::Up {
            &self.up
        } else {
            &self.down
        }
    }
}

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

/// What one tunnel (both its directions) or one plain-HTTP request (its two bodies) moved, and
/// what `maxTotalBytes` still lets it move: the bytes each way, their total, and when the last
/// one moved.
pub struct Traffic {
    start: Instant,
    /// Milliseconds after `start` of the last byte in either direction.
    last_activity_ms: AtomicU64,
    total: AtomicU64,
    max_total: Option<u64>,
    /// Bytes each way (the global counters are shared by all tunnels).
    up: AtomicU64,
    down: AtomicU64,
}

impl Traffic {
    pub fn new(max_total: Option<u64>) -> Traffic {
        Traffic {
            start: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            total: AtomicU64::new(0),
            max_total,
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        }
    }

    /// Takes `n` bytes out of the total: how many of them stay within `maxTotalBytes` (fewer than
    /// `n` once it is reached).
    pub fn take(&self, n: u64) -> u64 {
        let before = self.total.fetch_add(n, Ordering::Relaxed);
        match self.max_total {
            Some(max) if before.saturating_add(n) > max => max.saturating_sub(before),
            _ => n,
        }
    }

    /// Counts `n` bytes that moved `dir` now.
    pub fn moved(&self, dir: Direction, n: u64) {
        let counter = if dir == Direction::Up { &self.up } else { &self.down };
        counter.fetch_add(n, Ordering::Relaxed);
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When it began.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// When the last byte moved (the start, before any did).
    pub fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }

    /// The bytes taken out of the total so far (both directions).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Bytes moved: (up, down).
    pub fn bytes(&self) -> (u64, u64) {
        (self.up.load(Ordering::Relaxed), self.down.load(Ordering::Relaxed))
    }
}

enum PumpEnd {
    ByteLimit,
    Io,
}

/// How a direction's data ended.
enum Eof {
    Clean,
    Truncated,
}

/// A token bucket for one direction: refills at `rate` bytes/s up to `capacity`.
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        let rate_f = rate as f64;
        // An eighth of a second of burst, at least 1 KiB, at most one buffer.
        let capacity = (rate_f / 8.0).clamp(1024.0_f64.min(rate_f.max(1.0)), BUF_SIZE as f64);
        Bucket { rate: rate_f, capacity, tokens: capacity, last: Instant::now() }
    }

    /// Waits (sleeping, never spinning) until some tokens are available; returns how many
    /// bytes may be read now.
    async fn take_allowance(&mut self) -> usize {
        loop {
            let now = Instant::now();
            self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.capacity);
            self.last = now;
            if self.tokens >= 1.0 {
                return self.tokens as usize;
            }
            // Wait until a useful amount (a quarter of the bucket) has accumulated. The timer is
            // boxed: inline, it would make every tunnel's relay state larger for both directions,
            // rate-limited or not, idle or not.
            let want = (self.capacity / 4.0).max(1.0) - self.tokens;
            Box::pin(sleep_until(now + Duration::from_secs_f64(want / self.rate))).await;
        }
    }

    fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// Why a direction stops splicing.
enum SpliceEnd {
    /// The kernel cannot splice these sockets, or no pipe can be had: copy instead (nothing moved).
    Unavailable,
    Io,
}

/// Moves one batch from `src` to `dst` through a pipe lent for it, waiting for bytes with none
/// held, counting them as they leave: `(read, sent)`, `sent` short of `read` once
/// `maxTotalBytes` is reached; `(0, 0)` at the end of the stream.
async fn splice_batch(
    src: &dyn Socket,
    dst: &dyn Socket,
    allowance: usize,
    shared: &Traffic,
    count: impl FnMut(usize),
) -> Result<(usize, usize), SpliceEnd> {
    loop {
        socket::readable(src).await.map_err(|_| SpliceEnd::Io)?;
        let mut pipe = Pipe::take().map_err(|_| SpliceEnd::Unavailable)?;
        let n = match pipe.fill(src, allowance) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                continue;
            }
            Err(e) if matches!(e.raw_os_error(), Some(code) if splice::unsupported(code)) => {
                return Err(SpliceEnd::Unavailable)
            }
            Err(_) => return Err(SpliceEnd::Io),
        };
        let send = usize::try_from(shared.take(n as u64)).unwrap_or(n).min(n);
        pipe.drain(dst, send, count).await.map_err(|_| SpliceEnd::Io)?;
        // Bytes past maxTotalBytes stay in it: closed, not pooled.
        pipe.give_back();
        return Ok((n, send));
    }
}

/// The rest of a direction that went bulk between two sockets, by splice(2): `None` when the
/// kernel cannot splice them (nothing moved; the caller copies instead).
async fn pump_spliced<R: RelayRead, W: RelayWrite>(
    r: &mut R,
    w: &mut W,
    shared: &Traffic,
    dir: Direction,
    counters: &ByteCounters,
    bucket: &mut Option<Box<Bucket>>,
) -> Option<Result<Eof, PumpEnd>> {
    let counter = counters.of(dir);
    let count = |k: usize| {
        counter.inc_by(k as u64);
        counters.spliced.inc_by(k as u64);
        shared.moved(dir, k as u64);
    };
    loop {
        let limit = match bucket.as_mut() {
            Some(b) => b.take_allowance().await.min(BUF_SIZE),
            None => splice::PIPE_CAPACITY,
        };
        let (Some(src), Some(dst)) = (r.splice_source(), w.splice_sink()) else { return None };
        match splice_batch(src, dst, limit, shared, count).await {
            Ok((0, _)) => {
                let _ = w.shutdown().await;
                return Some(Ok(Eof::Clean));
            }
            Ok((n, send)) => {
                if let Some(bk) = bucket.as_mut() {
                    bk.spend(n);
                }
                if send < n {
                    return Some(Err(PumpEnd::ByteLimit));
                }
            }
            Err(SpliceEnd::Unavailable) => return None,
            Err(SpliceEnd::Io) => return Some(Err(PumpEnd::Io)),
        }
    }
}

/// One direction of a relay: copies, then splices once the direction streams. (An `async move`
/// block, not an `async fn`, which would keep a second copy of its arguments.)
#[allow(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice")]
fn pump<'a, R: RelayRead, W: RelayWrite>(
    r: &'a mut R,
    w: &'a mut W,
    shared: &'a Traffic,
    dir: Direction,
    counters: &'a ByteCounters,
    rate: Option<u64>,
) -> impl Future<Output = Result<Eof, PumpEnd>> + use<'a, R, W> {
    async move {
        let counter = counters.of(dir);
        // Boxed for the same reason as its timer: most tunnels have no rate limit.
        let mut bucket = rate.map(|r| Box::new(Bucket::new(r)));
        // Empty (no allocation) while the tunnel is idle; never zero-filled (read_buf uses spare capacity).
        let mut buf: Vec<u8> = Vec::new();
        // Socket to socket: once a read fills the whole buffer (a bulk transfer, not a message), the bytes
        // move by splice(2) and never enter the proxy's memory. Small messages keep the copy, which
        // costs the same two system calls and no pipe.
        let mut can_splice = r.splice_source().is_some() && w.splice_sink().is_some();
        loop {
            let allowance = match bucket.as_mut() {
                Some(b) => b.take_allowance().await.min(BUF_SIZE),
                None => BUF_SIZE,
            };
            buf.clear();
            let n = match r.read_some(&mut buf, allowance).await {
                Ok(n) => n,
                // A TLS stream cut without close_notify: the end of the data all the same.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    let _ = w.shutdown().await;
                    return Ok(Eof::Truncated);
                }
                Err(_) => return Err(PumpEnd::Io),
            };
            if n == 0 {
                // EOF: propagate the half-close and let the other direction go on.
                let _ = w.shutdown().await;
                return Ok(Eof::Clean);
            }
            let b = &buf;
            if let Some(bk) = bucket.as_mut() {
                bk.spend(n);
            }
            // Within maxTotalBytes: all of it, or what is left before the limit (then the end).
            let send = usize::try_from(shared.take(n as u64)).unwrap_or(n).min(n);
            let over = send < n;
            // Counted as each part leaves: a tunnel ended meanwhile has counted what left.
            let mut off = 0;
            while off < send {
                let k = match w.write(&b[off..send]).await {
                    Ok(0) | Err(_) => return Err(PumpEnd::Io),
                    Ok(k) => k,
                };
                counter.inc_by(k as u64);
                shared.moved(dir, k as u64);
                off += k;
            }
            if over {
                return Err(PumpEnd::ByteLimit);
            }
            if can_splice && n == BUF_SIZE {
                buf = Vec::new();
                // Boxed: inline, its state would enlarge every tunnel's relay, bulk or not.
                match Box::pin(pump_spliced(r, w, shared, dir, counters, &mut bucket)).await {
                    Some(end) => return end,
                    None => can_splice = false,
                }
            }
        }
    }
}

/// Writes `early` (bytes the client pipelined after its head; not empty) to the upstream, within
/// `maxTotalBytes`.
async fn write_early<W: AsyncWrite + Unpin>(
    up_w: &mut W,
    early: &[u8],
    shared: &Traffic,
    counters: &ByteCounters,
) -> io::Result<()> {
    let n = usize::try_from(shared.take(early.len() as u64)).unwrap_or(early.len()).min(early.len());
    up_w.write_all(&early[..n]).await?;
    counters.up.inc_by(n as u64);
    shared.moved(Direction::Up, n as u64);
    Ok(())
}

/// Closed by us: sends FIN (or close_notify) both ways rather than just dropping, within a grace
/// period. (Boxed: inline, this rare path's timer would be part of every idle tunnel's relay
/// state.)
async fn close_both<A: AsyncWrite + Unpin, B: AsyncWrite + Unpin>(client_w: &mut A, up_w: &mut B) {
    let _ = Box::pin(timeout(CLOSE_GRACE, async {
        let _ = client_w.shutdown().await;
        let _ = up_w.shutdown().await;
    }))
    .await;
}

/// One end of a tunnel: its read and write halves.
pub struct End<R, W> {
    pub read: R,
    pub write: W,
}

/// What governs one relay: the bytes the client pipelined after its head (written to the upstream
/// first), the limits, the signal that ends it from outside (the drain, a revocation), and the
/// byte counters.
pub struct Terms<'a> {
    pub early: &'a [u8],
    pub limits: &'a TunnelLimits,
    pub stop: &'a StopSignal,
    pub counters: &'a ByteCounters,
}

/// Relays between a client and an upstream until both directions end or a limit closes the
/// tunnel. (An `async move` block, not an `async fn`, which would keep a second copy of its
/// arguments for the tunnel's whole life.)
#[allow(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice")]
pub fn run<'a, CR, CW, UR, UW>(
    mut client: End<CR, CW>,
    mut upstream: End<UR, UW>,
    terms: Terms<'a>,
) -> impl Future<Output = RelayOutcome> + use<'a, CR, CW, UR, UW>
where
    CR: RelayRead,
    CW: RelayWrite,
    UR: RelayRead,
    UW: RelayWrite,
{
    async move {
        let shared = Traffic::new(terms.limits.max_total_bytes);
        let start = shared.start();
        // Boxed: a client seldom pipelines bytes after its request, and inline this state would
        // take room in every tunnel's relay beside the pumps' (they are never alive together, but
        // the compiler does not overlap them).
        if !terms.early.is_empty()
            && Box::pin(write_early(&mut upstream.write, terms.early, &shared, terms.counters)).await.is_err()
        {
            return RelayOutcome {
                reason: CloseReason::IoError,
                bytes_up: 0,
                bytes_down: 0,
                duration: start.elapsed(),
            };
        }

        let reason = {
            let up = pump(
                &mut client.read,
                &mut upstream.write,
                &shared,
                Direction::Up,
                terms.counters,
                terms.limits.max_bytes_per_second,
            );
            let down = pump(
                &mut upstream.read,
                &mut client.write,
                &shared,
                Direction::Down,
                terms.counters,
                terms.limits.max_bytes_per_second,
            );
            tokio::pin!(up, down);
            let mut up_done = false;
            let mut down_done = false;
            let mut first_done: Option<CloseReason> = None;
            // One timer for the three deadlines (lifetime, idle, minimum rate), set to the earliest:
            // an idle tunnel keeps one timer entry, not three.
            let end = start + terms.limits.max_lifetime;
            let mut idle_at = start + terms.limits.idle_timeout;
            let minute = Duration::from_secs(60);
            let mut rate_check_at = terms.limits.min_bytes_per_minute.map(|_| start + minute);
            let earliest =
                |idle_at: Instant, rate_at: Option<Instant>| rate_at.map_or(idle_at, |r| r.min(idle_at)).min(end);
            let timer = sleep_until(earliest(idle_at, rate_check_at));
            tokio::pin!(timer);
            let mut bytes_at_check = 0u64;
            loop {
                tokio::select! {
                    r = &mut up, if !up_done => match r {
                        Ok(eof) => {
                            up_done = true;
                            first_done.get_or_insert(match eof {
                                Eof::Clean => CloseReason::ClientClosed,
                                Eof::Truncated => CloseReason::ClientTruncated,
                            });
                            if down_done { break first_done.unwrap_or(CloseReason::ClientClosed); }
                        }
                        Err(PumpEnd::ByteLimit) => break CloseReason::ByteLimit,
                        Err(PumpEnd::Io) => break CloseReason::IoError,
                    },
                    r = &mut down, if !down_done => match r {
                        Ok(_) => {
                            down_done = true;
                            first_done.get_or_insert(CloseReason::UpstreamClosed);
                            if up_done { break first_done.unwrap_or(CloseReason::UpstreamClosed); }
                        }
                        Err(PumpEnd::ByteLimit) => break CloseReason::ByteLimit,
                        Err(PumpEnd::Io) => break CloseReason::IoError,
                    },
                    () = &mut timer => {
                        let now = Instant::now();
                        if now >= end { break CloseReason::Lifetime; }
                        if now >= idle_at {
                            // Traffic resets the idle timer; re-arm from the last activity.
                            let due = shared.last_activity() + terms.limits.idle_timeout;
                            if due <= now { break CloseReason::IdleTimeout; }
                            idle_at = due;
                        }
                        if let Some(at) = rate_check_at.filter(|at| now >= *at) {
                            let total = shared.total();
                            if total - bytes_at_check < terms.limits.min_bytes_per_minute.unwrap_or(0) { break CloseReason::TooSlow; }
                            bytes_at_check = total;
                            rate_check_at = Some(at + minute);
                        }
                        timer.as_mut().reset(earliest(idle_at, rate_check_at));
                    },
                    r = terms.stop.stopped() => break CloseReason::from(r),
                }
            }
        };
        if !matches!(
            reason,
            CloseReason::ClientClosed
                | CloseReason::ClientTruncated
                | CloseReason::UpstreamClosed
                | CloseReason::IoError
        ) {
            close_both(&mut client.write, &mut upstream.write).await;
        }
        client.write.release();
        upstream.write.release();
        RelayOutcome { reason, bytes_up: shared.bytes().0, bytes_down: shared.bytes().1, duration: start.elapsed() }
    }
}

mod socket;
mod splice;
#[cfg(test)]
mod tests;

pub use socket::Socket;
use splice::Pipe;
