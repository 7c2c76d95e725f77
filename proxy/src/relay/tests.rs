//! Relay timers and stops under paused time; TCP halves reading in bursts on a real runtime.
use prometheus::IntCounter;
use tokio::io::{duplex, split, AsyncReadExt, AsyncWriteExt};

use super::*;

fn limits() -> TunnelLimits {
    TunnelLimits {
        idle_timeout: Duration::from_secs(60),
        max_lifetime: Duration::from_secs(3600),
        max_bytes_per_second: None,
        min_bytes_per_minute: None,
        max_total_bytes: None,
    }
}

fn counters() -> ByteCounters {
    ByteCounters {
        up: IntCounter::new("u", "u").unwrap(),
        down: IntCounter::new("d", "d").unwrap(),
        spliced: IntCounter::new("s", "s").unwrap(),
    }
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_both_sides_and_traffic_resets_it() {
    let (client, proxy_c) = duplex(1 << 16);
    let (proxy_u, upstream) = duplex(1 << 16);
    let (cr, cw) = split(proxy_c);
    let (ur, uw) = split(proxy_u);
    let stop = StopSignal::default();
    let c = counters();
    let relay = tokio::spawn(async move {
        run(
            End { read: cr, write: cw },
            End { read: ur, write: uw },
            Terms { early: b"early", limits: &limits(), stop: &stop, counters: &c },
        )
        .await
    });
    let (mut client_r, mut client_w) = split(client);
    let (mut up_r, _up_w) = split(upstream);
    let mut early = [0u8; 5];
    up_r.read_exact(&mut early).await.unwrap();
    assert_eq!(&early, b"early");
    tokio::time::sleep(Duration::from_secs(50)).await;
    client_w.write_all(b"x").await.unwrap();
    let start = Instant::now();
    let out = relay.await.unwrap();
    assert_eq!(out.reason, CloseReason::IdleTimeout);
    // 60 s after the last byte, not after the start.
    assert!(start.elapsed() >= Duration::from_secs(59), "{:?}", start.elapsed());
    assert_eq!(out.bytes_up, 6);
    let mut b = [0u8; 1];
    assert_eq!(client_r.read(&mut b).await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_and_revoke_have_their_own_reasons_and_the_first_stays() {
    for (first, then) in [(StopReason::Shutdown, StopReason::Revoked), (StopReason::Revoked, StopReason::Shutdown)] {
        let (_client, proxy_c) = duplex(1024);
        let (proxy_u, _upstream) = duplex(1024);
        let (cr, cw) = split(proxy_c);
        let (ur, uw) = split(proxy_u);
        let stop = std::sync::Arc::new(StopSignal::default());
        let s2 = stop.clone();
        let c = counters();
        let relay = tokio::spawn(async move {
            run(
                End { read: cr, write: cw },
                End { read: ur, write: uw },
                Terms { early: b"", limits: &limits(), stop: &s2, counters: &c },
            )
            .await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!relay.is_finished());
        stop.stop(first);
        stop.stop(then);
        let out = relay.await.unwrap();
        let want = if first == StopReason::Revoked { CloseReason::Revoked } else { CloseReason::Shutdown };
        assert_eq!(out.reason, want);
    }
}

#[tokio::test(start_paused = true)]
async fn rate_limit_sleeps_instead_of_spinning() {
    let mut b = Bucket::new(1000);
    let start = Instant::now();
    let mut moved = 0;
    while moved < 5000 {
        let n = b.take_allowance().await.min(512);
        b.spend(n);
        moved += n;
    }
    // 5000 bytes at 1000 B/s, with a 1024-byte initial burst: at least ~3.9 s.
    assert!(start.elapsed() >= Duration::from_millis(3900), "{:?}", start.elapsed());
}

/// Two connected loopback TCP streams.
async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// A relay between two real TCP connections, as a CONNECT tunnel has: the client's and the
/// upstream's far ends, the relay's task, and its spliced-bytes counter.
struct TcpRelay {
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
    relay: tokio::task::JoinHandle<RelayOutcome>,
    spliced: IntCounter,
}

async fn tcp_relay(limits: TunnelLimits, stop: std::sync::Arc<StopSignal>) -> TcpRelay {
    let (client, proxy_c) = tcp_pair().await;
    let (proxy_u, upstream) = tcp_pair().await;
    let (cr, cw) = proxy_c.into_split();
    let (ur, uw) = proxy_u.into_split();
    let c = counters();
    let spliced = c.spliced.clone();
    let relay = tokio::spawn(async move {
        run(
            End { read: cr, write: cw },
            End { read: ur, write: uw },
            Terms { early: b"", limits: &limits, stop: &stop, counters: &c },
        )
        .await
    });
    TcpRelay { client, upstream, relay, spliced }
}

/// A TCP half treats a read that did not fill its buffer as having drained the socket; bytes
/// that arrive in bursts of every size, right after such a read, and data followed at once by
/// the end of the stream must all still be relayed, in order, with the end propagated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_halves_relay_every_burst_and_the_end_after_short_reads() {
    let TcpRelay { mut client, mut upstream, relay, .. } = tcp_relay(limits(), Default::default()).await;
    // Sizes from one byte to past the relay's buffer, sometimes back to back, sometimes after a
    // pause long enough for the relay to have read and gone back to waiting.
    let mut sent = Vec::new();
    let writer = async {
        for i in 0..400usize {
            let n = [1, 7, 500, 4096, BUF_SIZE - 1, BUF_SIZE + 3][i % 6];
            let chunk: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
            client.write_all(&chunk).await.unwrap();
            sent.extend_from_slice(&chunk);
            if i % 3 == 0 {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        client.write_all(b"last").await.unwrap();
        sent.extend_from_slice(b"last");
        client.shutdown().await.unwrap();
        (client, sent)
    };
    let mut got = Vec::new();
    let reader = upstream.read_to_end(&mut got);
    let (r, (mut client, sent)) = tokio::join!(reader, writer);
    r.unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "bytes were reordered or altered");
    // The other direction still flows after the client's half-close, and its end is relayed too.
    upstream.write_all(b"reply").await.unwrap();
    upstream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"reply");
    let out = relay.await.unwrap();
    assert_eq!(out.reason, CloseReason::ClientClosed);
    assert_eq!(out.bytes_up, sent.len() as u64);
}

/// Relays `payload` client → upstream over real TCP with the given limits, the upstream
/// answering `reply` after the client's end; returns what the upstream got, what the client got
/// back, the outcome and the spliced byte count.
async fn bulk_through(payload: Vec<u8>, reply: Vec<u8>, limits: TunnelLimits) -> (Vec<u8>, Vec<u8>, RelayOutcome, u64) {
    let TcpRelay { mut client, mut upstream, relay, spliced } = tcp_relay(limits, Default::default()).await;
    let (mut client_r, mut client_w) = client.split();
    let writer = async {
        // Written in uneven pieces: the relay sees full and partial reads.
        for piece in payload.chunks(100_003) {
            if client_w.write_all(piece).await.is_err() {
                break;
            }
        }
        let _ = client_w.shutdown().await;
    };
    let upstream_side = async {
        let mut got = Vec::new();
        let _ = upstream.read_to_end(&mut got).await;
        let _ = upstream.write_all(&reply).await;
        let _ = upstream.shutdown().await;
        got
    };
    let mut back = Vec::new();
    let reader = client_r.read_to_end(&mut back);
    let ((), got, _) = tokio::join!(writer, upstream_side, reader);
    let out = relay.await.unwrap();
    (got, back, out, spliced.get())
}

fn pattern(n: usize, seed: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 131 + seed) % 251) as u8).collect()
}

/// A bulk transfer between two TCP sockets moves by splice(2): every byte arrives in order, the
/// half-close is relayed, the reply after it comes back (by splice too once it is bulk), and the
/// counts are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_tcp_to_tcp_is_spliced_with_every_byte_in_order_and_the_end_relayed() {
    let (payload, reply) = (pattern(8 << 20, 1), pattern(3 << 20, 7));
    let (got, back, out, spliced) = bulk_through(payload.clone(), reply.clone(), limits()).await;
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "bytes were reordered or altered");
    assert!(back == reply, "the reply after the half-close was altered");
    assert_eq!(out.reason, CloseReason::ClientClosed);
    assert_eq!((out.bytes_up, out.bytes_down), (payload.len() as u64, reply.len() as u64));
    // All but the copied reads before each direction went bulk.
    assert!(spliced > (payload.len() + reply.len()) as u64 * 9 / 10, "only {spliced} bytes were spliced");
}

/// maxTotalBytes ends a spliced tunnel at exactly the limit: the upstream gets the first bytes up
/// to it and not one more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_cap_ends_a_spliced_tunnel_at_exactly_the_cap() {
    let cap = 5_000_017u64;
    let payload = pattern(8 << 20, 3);
    let l = TunnelLimits { max_total_bytes: Some(cap), ..limits() };
    let (got, _, out, spliced) = bulk_through(payload.clone(), Vec::new(), l).await;
    assert_eq!(out.reason, CloseReason::ByteLimit);
    assert_eq!(got.len() as u64, cap);
    assert!(got[..] == payload[..cap as usize]);
    assert_eq!(out.bytes_up, cap);
    assert!(spliced > cap / 2, "only {spliced} bytes were spliced");
}

/// A rate-limited tunnel keeps its pace whatever moves its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_paces_bulk_between_tcp_sockets() {
    let payload = pattern(600_000, 5);
    let l = TunnelLimits { max_bytes_per_second: Some(1_000_000), ..limits() };
    let start = Instant::now();
    let (got, _, out, _) = bulk_through(payload.clone(), Vec::new(), l).await;
    assert!(got == payload);
    assert_eq!(out.reason, CloseReason::ClientClosed);
    // 600 kB at 1 MB/s with a 32 KiB burst: well over half a second.
    assert!(start.elapsed() >= Duration::from_millis(500), "{:?}", start.elapsed());
}

/// A revocation ends a tunnel in the middle of a spliced transfer, both sides closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_ends_a_tunnel_in_the_middle_of_a_spliced_transfer() {
    let stop = std::sync::Arc::new(StopSignal::default());
    let TcpRelay { mut client, mut upstream, relay, spliced } = tcp_relay(limits(), stop.clone()).await;
    let chunk = pattern(1 << 20, 9);
    let writer = tokio::spawn(async move {
        // Until the relay closes the client's connection.
        while client.write_all(&chunk).await.is_ok() {}
    });
    let mut got = vec![0u8; 4 << 20];
    upstream.read_exact(&mut got).await.unwrap();
    assert!(spliced.get() > 0, "the transfer had not gone zero-copy");
    stop.stop(StopReason::Revoked);
    let out = relay.await.unwrap();
    assert_eq!(out.reason, CloseReason::Revoked);
    // The upstream sees the end of the stream after what was relayed.
    let mut rest = Vec::new();
    let _ = upstream.read_to_end(&mut rest).await;
    assert_eq!((got.len() + rest.len()) as u64, out.bytes_up);
    writer.await.unwrap();
}

/// A spliced direction whose source queue holds many small segments (more than a pipe has
/// slots: each segment's data is a slot of its own) still relays all of them without waiting for
/// more bytes: a short splice is no proof that the socket is drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_segments_queued_behind_a_spliced_bulk_all_arrive() {
    let TcpRelay { mut client, mut upstream, relay, spliced } = tcp_relay(limits(), Default::default()).await;
    client.set_nodelay(true).unwrap();
    // Bulk first, which the upstream does not read yet: the relay splices and then waits on a
    // full send queue while the client's small segments pile up behind it.
    let bulk = pattern(16 << 20, 11);
    let small: Vec<Vec<u8>> = (0..2000).map(|i| pattern(7 + i % 13, i)).collect();
    let mut want = bulk.clone();
    small.iter().for_each(|s| want.extend_from_slice(s));
    let writer = tokio::spawn(async move {
        client.write_all(&bulk).await.unwrap();
        for s in &small {
            client.write_all(s).await.unwrap();
        }
        // No end of stream: the client now waits, as a request's sender does for its answer.
        client
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(Duration::from_secs(10), upstream.read_exact(&mut got))
        .await
        .expect("every byte arrives without more being sent")
        .unwrap();
    assert!(got == want);
    assert!(spliced.get() > 0);
    drop(writer.await.unwrap());
    relay.abort();
}
