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
    ByteCounters { up: IntCounter::new("u", "u").unwrap(), down: IntCounter::new("d", "d").unwrap() }
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

/// A TCP half treats a read that did not fill its buffer as having drained the socket; bytes
/// that arrive in bursts of every size, right after such a read, and data followed at once by
/// the end of the stream must all still be relayed, in order, with the end propagated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_halves_relay_every_burst_and_the_end_after_short_reads() {
    let (mut client, proxy_c) = tcp_pair().await;
    let (proxy_u, mut upstream) = tcp_pair().await;
    let (cr, cw) = proxy_c.into_split();
    let (ur, uw) = proxy_u.into_split();
    let relay = tokio::spawn(async move {
        let (stop, c) = (StopSignal::default(), counters());
        run(
            End { read: cr, write: cw },
            End { read: ur, write: uw },
            Terms { early: b"", limits: &limits(), stop: &stop, counters: &c },
        )
        .await
    });
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
