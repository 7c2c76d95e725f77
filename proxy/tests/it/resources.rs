//! R-*: time, byte and connection bounds, half-close, and large transfers.

use std::net::SocketAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::support::*;

/// A config allowing 127.0.0.2 (the echo) by CIDR, with extra top-level YAML.
fn cfg(w: &World, top: &str) -> String {
    format!(
        "version: 1\nlisteners: [{{name: forward, bind: '127.0.0.1:0'}}]\nadmin: {{bind: '127.0.0.1:0'}}\ndns: {{nameservers: ['{}']}}\npolicy:\n  rules:\n    - {{name: echo, action: allow, cidrs: ['127.0.0.2/32']}}\n{top}",
        w.dns.addr
    )
}

fn connect_req(target: SocketAddr) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
}

#[tokio::test(start_paused = true)]
async fn r01_slowloris_gets_an_absolute_deadline() {
    let w = World::new().await;
    let p = start_proxy(&cfg(&w, "limits: {requestHeadTimeout: 10s, drainDelay: 0s}\n")).await;
    let head = connect_req(w.echo.addr);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let head = head.clone();
        let proxy = addr(&p);
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let s = TcpStream::connect(proxy).await.unwrap();
            let (mut r, mut wr) = s.into_split();
            let trickle = tokio::spawn(async move {
                // One byte per second, never finishing the head.
                for b in head.as_bytes()[..head.len() - 2].iter() {
                    if wr.write_all(&[*b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
            let (status, _) = read_to_close(&mut r).await;
            trickle.abort();
            (status, start.elapsed())
        }));
    }
    // A legitimate CONNECT in the middle of the attack is served.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut s = tunnel(addr(&p), &w.echo.addr.to_string()).await;
    roundtrip(&mut s, b"still serving").await;
    for t in tasks {
        let (status, elapsed) = t.await.unwrap();
        assert_eq!(status, 408);
        assert!(elapsed >= Duration::from_secs(10) && elapsed < Duration::from_secs(11), "closed after {elapsed:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn r02_idle_connections_and_idle_tunnels_are_closed() {
    let w = World::new().await;
    let p = start_proxy(&cfg(&w, "limits: {requestHeadTimeout: 10s}\nrelay: {idleTimeout: 60s}\n")).await;
    // Connections that send nothing.
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(TcpStream::connect(addr(&p)).await.unwrap());
    }
    assert_eq!(admin_get(p.admin, "/healthz").await.0, 200);
    // Established tunnels that go idle, and one kept busy.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tunnel(addr(&p), &w.echo.addr.to_string()).await);
    }
    let mut busy = tunnel(addr(&p), &w.echo.addr.to_string()).await;
    let start = Instant::now();
    for mut s in silent {
        assert_eq!(read_to_close(&mut s).await.0, 408);
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        roundtrip(&mut busy, b"keepalive").await;
    }
    for mut s in idle {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 0, "idle tunnel closed");
    }
    assert!(start.elapsed() >= Duration::from_secs(60));
    roundtrip(&mut busy, b"traffic resets the idle timer").await;
    assert_eq!(
        metric_when(p.admin, "tunnelgate_tunnel_duration_seconds_count{close=\"idle_timeout\"}", |v| v == 20.0).await,
        20.0
    );
}

async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

#[tokio::test]
async fn r03_connection_caps() {
    let w = World::new().await;
    let p = start_proxy(&cfg(&w, "limits: {maxConnections: 20, maxConnectionsPerClient: 5}\n")).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(tunnel(addr(&p), &w.echo.addr.to_string()).await);
    }
    // The sixth from the same client: 429 with Retry-After.
    let (status, text) = exchange(addr(&p), connect_req(w.echo.addr).as_bytes()).await;
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("Retry-After: 1\r\n"));
    // Other clients fill the global cap; then 503 with Retry-After.
    for i in 0..15 {
        let ip = format!("127.0.1.{}", 1 + i / 5);
        held.push(connect_from(&ip, addr(&p)).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = connect_from("127.0.2.1", addr(&p)).await;
    let (status, text) = read_to_close(&mut extra).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("Retry-After"));
    // Existing tunnels are undisturbed and admin is exempt.
    roundtrip(&mut held[0], b"still here").await;
    assert_eq!(admin_get(p.admin, "/healthz").await.0, 200);
    // Slots come back when connections close.
    drop(held);
    assert!(eventually(5, || async { metric(p.admin, "tunnelgate_connections_open").await == 0.0 }).await);
    let mut s = tunnel(addr(&p), &w.echo.addr.to_string()).await;
    roundtrip(&mut s, b"again").await;
}

#[tokio::test]
async fn r06_half_close_both_ways() {
    let w = World::new().await;
    // Upstream: read to EOF, then answer late with a large reply, then close.
    let late = Upstream::start("127.0.0.2", |mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"PING\n");
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b"PONG\n").await.unwrap();
        s.write_all(&vec![7u8; 10 << 20]).await.unwrap();
    })
    .await;
    // Upstream that half-closes first and keeps reading.
    let first = Upstream::start("127.0.0.2", |mut s| async move {
        s.write_all(b"BYE\n").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.into_std().ok();
        assert_eq!(got.len(), 1 << 20);
    })
    .await;
    let p = start_proxy(&cfg(&w, "")).await;
    let mut s = tunnel(addr(&p), &late.addr.to_string()).await;
    s.write_all(b"PING\n").await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).await.unwrap();
    assert_eq!(&reply[..5], b"PONG\n");
    assert_eq!(reply.len(), 5 + (10 << 20));
    // Mirror: the upstream's FIN reaches the client while the client keeps sending.
    let mut s = tunnel(addr(&p), &first.addr.to_string()).await;
    let mut bye = [0u8; 4];
    s.read_exact(&mut bye).await.unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).await.unwrap(), 0, "FIN propagated to the client");
    s.write_all(&vec![1u8; 1 << 20]).await.unwrap();
    s.shutdown().await.unwrap();
    assert!(
        eventually(5, || async {
            metric(p.admin, "tunnelgate_tunnel_duration_seconds_count{close=\"upstream_closed\"}").await == 1.0
        })
        .await
    );
    assert_eq!(
        metric_when(p.admin, "tunnelgate_tunnel_duration_seconds_count{close=\"client_closed\"}", |v| v == 1.0).await,
        1.0
    );
}

#[tokio::test]
async fn r08_header_bombs_and_lingering_close() {
    let w = World::new().await;
    let p = start_proxy(&cfg(&w, "limits: {maxRequestHeadBytes: 32768}\n")).await;
    let t = w.echo.addr;
    let big_header = format!("CONNECT {t} HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    let just_over = format!("CONNECT {t} HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(33 * 1024));
    let many = format!("CONNECT {t} HTTP/1.1\r\n{}\r\n", "a:b\r\n".repeat(10_000));
    let hundred_one = format!("CONNECT {t} HTTP/1.1\r\n{}\r\n", "a:b\r\n".repeat(101));
    for c in [big_header, just_over, many, hundred_one] {
        let (status, text) = exchange(addr(&p), c.as_bytes()).await;
        assert_eq!(status, 431, "{text}");
    }
    // One header split over 12 slow segments, crossing the limit mid-line.
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(format!("CONNECT {t} HTTP/1.1\r\nX-Slow: ").as_bytes()).await.unwrap();
    for _ in 0..12 {
        if s.write_all(&[b'z'; 3000]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(read_to_close(&mut s).await.0, 431);
    // Garbage after an invalid request line: the client still reads the whole 400, not a reset.
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    let mut bytes = b"GET\x01 / HTTP/1.1\r\n\r\n".to_vec();
    bytes.extend(vec![b'g'; 200 * 1024]);
    s.write_all(&bytes).await.unwrap();
    let (status, text) = read_to_close(&mut s).await;
    assert_eq!(status, 400);
    assert!(text.ends_with("\n") && text.contains("Content-Length:"), "{text}");
}

/// 100 MiB each way through a CONNECT tunnel arrive byte for byte, counted exactly, and a bulk
/// stream between two TCP sockets moves by splice(2) (all but the reads before it went bulk).
#[tokio::test]
async fn relay_100_mib_arrives_byte_identical_and_moves_by_splice() {
    let w = World::new().await;
    let p = start_proxy(&cfg(&w, "")).await;
    let s = tunnel(addr(&p), &w.echo.addr.to_string()).await;
    let (mut r, mut wr) = s.into_split();
    const TOTAL: usize = 100 << 20;
    let send = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut x: u32 = 12345;
        let mut sent = 0;
        while sent < TOTAL {
            for b in chunk.iter_mut() {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *b = (x >> 24) as u8;
            }
            wr.write_all(&chunk).await.unwrap();
            h.update(&chunk);
            sent += chunk.len();
        }
        wr.shutdown().await.unwrap();
        h.finalize()
    });
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
    }
    assert_eq!(got, TOTAL);
    assert_eq!(h.finalize(), send.await.unwrap());
    assert!(
        eventually(5, || async {
            metric(p.admin, "tunnelgate_relayed_bytes_total{direction=\"upstream\"").await == TOTAL as f64
        })
        .await
    );
    let down = metric(p.admin, "tunnelgate_relayed_bytes_total{direction=\"downstream\"").await;
    assert_eq!(down, TOTAL as f64);
    let spliced = metric(p.admin, "tunnelgate_relayed_spliced_bytes_total").await;
    assert!(spliced > 1.8 * TOTAL as f64 && spliced <= 2.0 * TOTAL as f64, "{spliced} bytes spliced");
}

#[tokio::test(start_paused = true)]
async fn relay_limits_close_with_their_reason() {
    let w = World::new().await;
    let p = start_proxy(&cfg(&w, "relay: {idleTimeout: 10m, maxLifetime: 1h}\n")).await;
    let s = tunnel(addr(&p), &w.echo.addr.to_string()).await;
    let start = Instant::now();
    let mut b = [0u8; 1];
    // Keep it busy so only the lifetime can end it.
    let (mut r, mut wr) = s.into_split();
    let pinger = tokio::spawn(async move {
        loop {
            if wr.write_all(b"p").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    });
    loop {
        match r.read(&mut b).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    pinger.abort();
    let e = start.elapsed();
    assert!(e >= Duration::from_secs(3600) && e < Duration::from_secs(3602), "{e:?}");
    assert_eq!(
        metric_when(p.admin, "tunnelgate_tunnel_duration_seconds_count{close=\"lifetime\"}", |v| v == 1.0).await,
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn relay_rate_min_rate_and_byte_cap() {
    let w = World::new().await;
    let yaml = format!(
        "version: 1\nlisteners: [{{name: forward, bind: '127.0.0.1:0'}}]\nadmin: {{bind: '127.0.0.1:0'}}\ndns: {{nameservers: ['{}']}}\npolicy:\n  rules:\n    - {{name: rate, action: allow, cidrs: ['127.0.0.2/32'], ports: [{}], relay: {{maxBytesPerSecond: 10000}}}}\n",
        w.dns.addr, w.echo.addr.port()
    );
    let sink = Upstream::start("127.0.0.2", |mut s| async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let capped = format!(
        "{yaml}    - {{name: capped, action: allow, cidrs: ['127.0.0.2/32'], ports: [{}], relay: {{maxTotalBytes: 1000, minBytesPerMinute: 100}}}}\n",
        sink.addr.port()
    );
    let p = start_proxy(&capped).await;
    // Rate: 50 kB through the echo at 10 kB/s each way takes about 5 s (minus one burst).
    let mut s = tunnel(addr(&p), &w.echo.addr.to_string()).await;
    let start = Instant::now();
    roundtrip(&mut s, &vec![9u8; 50_000]).await;
    let e = start.elapsed();
    assert!(e >= Duration::from_millis(4500) && e < Duration::from_secs(7), "{e:?}");
    // Byte cap: the upstream never gets more than 1000 bytes and the tunnel is closed.
    let mut s = tunnel(addr(&p), &sink.addr.to_string()).await;
    let _ = s.write_all(&vec![1u8; 5000]).await;
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b).await, Ok(0) | Err(_)));
    assert!(
        eventually(5, || async {
            metric(p.admin, "tunnelgate_tunnel_duration_seconds_count{close=\"byte_limit\"}").await == 1.0
        })
        .await
    );
    // Minimum rate: 10 bytes a minute is too slow.
    let mut s = tunnel(addr(&p), &sink.addr.to_string()).await;
    let start = Instant::now();
    s.write_all(&[1u8; 10]).await.unwrap();
    assert!(matches!(s.read(&mut b).await, Ok(0) | Err(_)));
    let e = start.elapsed();
    assert!(e >= Duration::from_secs(60) && e < Duration::from_secs(61), "{e:?}");
    assert_eq!(
        metric_when(p.admin, "tunnelgate_tunnel_duration_seconds_count{close=\"too_slow\"}", |v| v == 1.0).await,
        1.0
    );
}

/// A thousand idle admin connections and `/config` long-polls from one client: the admin server
/// keeps at most its per-client cap of them (the rest are closed at once, nothing held for them),
/// egress keeps working and `/readyz` answers another client (the kubelet).
#[tokio::test]
async fn admin_connections_are_capped_and_never_starve_egress() {
    let w = World::new().await;
    let p = start_proxy(&cfg(&w, "")).await;
    let (_, body) = admin_get(p.admin, "/config").await;
    let changes = serde_json::from_str::<serde_json::Value>(&body).unwrap()["changes"].as_u64().unwrap();
    let mut held = Vec::new();
    for i in 0..1000 {
        let Ok(mut s) = TcpStream::connect(p.admin).await else { continue };
        if i % 2 == 0 {
            let poll = format!("GET /config?since={changes}&timeout=60 HTTP/1.1\r\nHost: x\r\n\r\n");
            let _ = s.write_all(poll.as_bytes()).await;
        }
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut open = 0;
    let mut buf = [0u8; 64];
    for s in &mut held {
        if tokio::time::timeout(Duration::from_millis(2), s.read(&mut buf)).await.is_err() {
            open += 1; // nothing to read and not closed: the server holds it
        }
    }
    assert!(open <= 16, "{open} admin connections held for one client");
    let mut t = tunnel(addr(&p), &w.echo.addr.to_string()).await;
    roundtrip(&mut t, b"egress unaffected").await;
    let mut probe = connect_from("127.0.0.9", p.admin).await;
    probe.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    assert_eq!(read_to_close(&mut probe).await.0, 200, "the kubelet's probe");
}

/// A side that resets its connection ends the tunnel for the other side at once (it sees the end
/// of the stream, not a connection left open), both ways, and the tunnel is no longer counted.
#[tokio::test]
async fn a_reset_on_either_side_ends_the_tunnel_for_the_other_at_once() {
    let w = World::new().await;
    let p = start_proxy(&cfg(&w, "")).await;
    let upstream = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let target = upstream.local_addr().unwrap().to_string();
    for client_resets in [true, false] {
        let mut client = tunnel(addr(&p), &target).await;
        let (mut server, _) = upstream.accept().await.unwrap();
        client.write_all(b"before the reset").await.unwrap();
        let mut got = [0u8; 16];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"before the reset");
        let (resetting, mut other) = if client_resets { (client, server) } else { (server, client) };
        // SO_LINGER 0: close sends a reset, not a FIN.
        #[allow(deprecated)]
        resetting.set_linger(Some(Duration::ZERO)).unwrap();
        drop(resetting);
        let mut b = [0u8; 1];
        let end = tokio::time::timeout(Duration::from_secs(5), other.read(&mut b)).await.unwrap_or_else(|_| {
            panic!("the other side still open 5 s after the reset (client resets: {client_resets})")
        });
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
        assert_eq!(metric_when(p.admin, "tunnelgate_tunnels_active", |v| v == 0.0).await, 0.0);
    }
}
