//! Relay timers and stops under paused time.
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
    let stops = Stops::default();
    let c = counters();
    let relay = tokio::spawn(async move { run(cr, cw, ur, uw, b"early", &limits(), &stops, &c).await });
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
async fn shutdown_and_revoke_have_their_own_reasons() {
    for revoke in [false, true] {
        let (_client, proxy_c) = duplex(1024);
        let (proxy_u, _upstream) = duplex(1024);
        let (cr, cw) = split(proxy_c);
        let (ur, uw) = split(proxy_u);
        let stops = Stops::default();
        let s2 = stops.clone();
        let c = counters();
        let relay = tokio::spawn(async move { run(cr, cw, ur, uw, b"", &limits(), &s2, &c).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        if revoke {
            stops.revoke.cancel();
        } else {
            stops.shutdown.cancel();
        }
        let out = relay.await.unwrap();
        assert_eq!(out.reason, if revoke { CloseReason::Revoked } else { CloseReason::Shutdown });
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
