//! Tunnel listeners (`mode: tunnel`): a fixed TCP or Unix-socket upstream, plain or behind TLS
//! termination, through the tunnel relay.

use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};

use crate::support::*;
use crate::tls::{connector, TempDir};

fn config(w: &World, listener: &str) -> String {
    format!(
        "version: 1\nlisteners: [{listener}]\nadmin: {{bind: '127.0.0.1:0'}}\ndns: {{nameservers: ['{}']}}\nlimits: {{drainDelay: 0s}}\n",
        w.dns.addr
    )
}

/// A self-signed certificate for `app.test`, written as `tls.crt` and `tls.key` in `dir`: its DER,
/// and the listener's `tls` block naming the files.
fn app_cert(dir: &std::path::Path) -> (rustls::pki_types::CertificateDer<'static>, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["app.test".into()]).unwrap();
    std::fs::write(dir.join("tls.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
    let d = dir.display();
    (ck.cert.der().clone(), format!("{{certFile: '{d}/tls.crt', keyFile: '{d}/tls.key'}}"))
}

async fn unix_echo(path: &std::path::Path) {
    let l = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

#[tokio::test]
async fn tcp_tunnel_relays_to_the_fixed_upstream_with_half_close() {
    let w = World::new().await;
    let p = start_proxy(&config(
        &w,
        &format!("{{name: db, bind: '127.0.0.1:0', mode: tunnel, upstream: 'allowed.test:{}'}}", w.echo.addr.port()),
    ))
    .await;
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    roundtrip(&mut s, b"no HTTP here\r\n\r\n").await;
    assert_eq!(metric_when(p.admin, "tunnelgate_tunnels_active{listener=\"db\"}", |v| v == 1.0).await, 1.0);
    // Half-close: the client's FIN reaches the upstream, whose answer and FIN still come back.
    s.write_all(b"last words").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(rest, b"last words");
    assert!(
        eventually(5, || async { metric(p.admin, "tunnelgate_tunnels_active{listener=\"db\"}").await == 0.0 }).await
    );
    assert_eq!(
        metric_when(p.admin, "tunnelgate_tunnel_requests_total{listener=\"db\",result=\"established\"}", |v| v == 1.0)
            .await,
        1.0
    );
}

/// A plain tunnel listener in front of a Unix socket: 32 MiB echoed back arrive byte for byte,
/// both directions move by splice(2) once they stream, and the half-close still ends the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_to_a_unix_socket_is_spliced_both_ways_and_arrives_intact() {
    let w = World::new().await;
    let dir = TempDir::new("unix-bulk");
    let sock = dir.0.join("app.sock");
    unix_echo(&sock).await;
    let p = start_proxy(&config(
        &w,
        &format!("{{name: app, bind: '127.0.0.1:0', mode: tunnel, upstream: 'unix:{}'}}", sock.display()),
    ))
    .await;
    const TOTAL: usize = 32 << 20;
    let payload: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 253) as u8).collect();
    let (mut r, mut wr) = TcpStream::connect(addr(&p)).await.unwrap().into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        for piece in sent.chunks(200_000) {
            wr.write_all(piece).await.unwrap();
        }
        wr.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(TOTAL);
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back)).await.unwrap().unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), TOTAL);
    assert!(back == payload, "bytes were reordered or altered");
    let spliced =
        metric_when(p.admin, "tunnelgate_relayed_spliced_bytes_total{listener=\"app\"}", |v| v > 1.8 * TOTAL as f64)
            .await;
    assert!(spliced > 1.8 * TOTAL as f64 && spliced <= 2.0 * TOTAL as f64, "{spliced} bytes spliced");
}

/// Bursts from a backend across a real link (a veth pair into a network namespace, where segments
/// arrive as a NIC delivers them rather than merged as on loopback) are spliced to a slow reader
/// and arrive whole while their sender waits for an answer: no byte is left behind in the proxy's
/// socket at the end of a burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spliced_bursts_over_a_real_link_arrive_whole_while_the_sender_waits() {
    let w = World::new().await;
    let net = crate::transparent::Net::create(&format!("s{}", std::process::id() % 100_000));
    let upstream = net.listen_in("node", "10.241.0.2:0".parse().unwrap());
    let port = upstream.local_addr().unwrap().port();
    const BURSTS: [usize; 4] = [8 << 20, 200_000, 1_000_003, 77_777];
    let burst = |i: usize| -> Vec<u8> { (0..BURSTS[i]).map(|j| (j * 13 + i) as u8).collect() };
    let server = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        for i in 0..BURSTS.len() {
            s.write_all(&burst(i)).await.unwrap();
            // The answer the sender waits for before its next burst.
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).await.unwrap();
        }
    });
    let p = start_proxy(&config(
        &w,
        &format!("{{name: link, bind: '127.0.0.1:0', mode: tunnel, upstream: '10.241.0.2:{port}'}}"),
    ))
    .await;
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    for (i, n) in BURSTS.into_iter().enumerate() {
        // A slow reader: the burst piles up in the proxy's socket from the link, many segments
        // deep, before the proxy can pass it on.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
            .await
            .unwrap_or_else(|_| panic!("burst {i} ({n} bytes) did not arrive whole"))
            .unwrap();
        assert!(got == burst(i), "burst {i} altered");
        s.write_all(b"k").await.unwrap();
    }
    server.await.unwrap();
    assert!(metric(p.admin, "tunnelgate_relayed_spliced_bytes_total{listener=\"link\"}").await > 0.0);
}

#[tokio::test]
async fn unix_socket_upstream_missing_closes_promptly_and_recovers() {
    let w = World::new().await;
    let dir = TempDir::new("unix");
    let sock = dir.0.join("app.sock");
    let p = start_proxy(&config(
        &w,
        &format!("{{name: app, bind: '127.0.0.1:0', mode: tunnel, upstream: 'unix:{}'}}", sock.display()),
    ))
    .await;
    // No socket yet: the client is closed at once, and counted.
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await.expect("closed promptly");
    assert!(matches!(r, Ok(0) | Err(_)));
    assert_eq!(
        metric_when(
            p.admin,
            "tunnelgate_tunnel_requests_total{listener=\"app\",result=\"upstream_unreachable\"}",
            |v| v == 1.0
        )
        .await,
        1.0
    );
    // A stale socket (the file is left, nobody listens): the same, one attempt per client.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await.expect("closed promptly");
    assert!(matches!(r, Ok(0) | Err(_)));
    assert_eq!(
        metric_when(
            p.admin,
            "tunnelgate_tunnel_requests_total{listener=\"app\",result=\"upstream_unreachable\"}",
            |v| v == 2.0
        )
        .await,
        2.0
    );
    // The backend appears: the next connection goes through.
    std::fs::remove_file(&sock).unwrap();
    unix_echo(&sock).await;
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    roundtrip(&mut s, b"over a unix socket").await;
}

#[tokio::test]
async fn tls_termination_in_front_of_a_unix_socket() {
    let w = World::new().await;
    let dir = TempDir::new("term");
    let sock = dir.0.join("app.sock");
    unix_echo(&sock).await;
    let (cert, tls) = app_cert(&dir.0);
    let d = dir.0.display();
    let p = start_proxy(&config(
        &w,
        &format!("{{name: app, bind: '127.0.0.1:0', mode: tunnel, upstream: 'unix:{d}/app.sock', tls: {tls}}}"),
    ))
    .await;
    let tcp = TcpStream::connect(addr(&p)).await.unwrap();
    let name = ServerName::try_from("app.test").unwrap();
    let mut tls = connector(std::slice::from_ref(&cert)).connect(name, tcp).await.unwrap();
    roundtrip(&mut tls, b"GET / HTTP/1.1\r\n\r\n is just bytes here").await;
    assert_eq!(
        metric_when(
            p.admin,
            "tunnelgate_tls_handshakes_total{listener=\"app\",result=\"success\",version=\"TLSv1.3\"}",
            |v| v == 1.0
        )
        .await,
        1.0
    );
    // close_notify from the client ends the upstream's input; its FIN comes back as close_notify.
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await.unwrap();
    assert!(r.is_ok(), "a clean TLS close: {r:?}");
}

/// T-09: the backend is server-speaks-first and records the header, which must arrive although
/// the client sends nothing.
#[tokio::test]
async fn t09_proxy_v1_is_sent_at_once_before_any_payload_ipv4_and_ipv6() {
    let w = World::new().await;
    for (bind, family) in [("127.0.0.1:0", "TCP4"), ("[::1]:0", "TCP6")] {
        let probe = format!("PROXY {family} ");
        // The header's length depends on the ports: read up to CRLF instead.
        let (tx, mut lines) = tokio::sync::mpsc::channel::<String>(2);
        let backend = Upstream::start("127.0.0.2", move |mut s| {
            let tx = tx.clone();
            async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while !line.ends_with(b"\r\n") && line.len() < 120 {
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    line.push(b[0]);
                }
                let _ = tx.send(String::from_utf8_lossy(&line).into_owned()).await;
                let _ = s.write_all(b"220 hello\r\n").await;
            }
        })
        .await;
        let listener = format!(
            "{{name: pp, bind: '{bind}', mode: tunnel, upstream: '127.0.0.2:{}', sendProxyProtocol: v1}}",
            backend.addr.port()
        );
        let p = start_proxy(&config(&w, &listener)).await;
        let mut s = TcpStream::connect(addr(&p)).await.unwrap();
        let client = s.local_addr().unwrap();
        // The client sends nothing: the header still arrives, and the backend's greeting comes back.
        let line = tokio::time::timeout(Duration::from_secs(5), lines.recv()).await.unwrap().unwrap();
        let want = format!("{probe}{} {} {} {}\r\n", client.ip(), addr(&p).ip(), client.port(), addr(&p).port());
        assert_eq!(line, want);
        assert!(line.len() <= 107);
        let mut greet = [0u8; 11];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greet)).await.unwrap().unwrap();
        assert_eq!(&greet, b"220 hello\r\n");
    }
}

#[tokio::test]
async fn t10_proxy_v2_to_a_unix_socket_carries_tcp_addresses_and_the_sni() {
    let w = World::new().await;
    let dir = TempDir::new("ppv2");
    let sock = dir.0.join("app.sock");
    let mut rx = crate::termination::ppv2_recorder(&sock).await;
    let (cert, tls) = app_cert(&dir.0);
    let d = dir.0.display();
    let p = start_proxy(&config(
        &w,
        &format!("{{name: plain, bind: '127.0.0.1:0', mode: tunnel, upstream: 'unix:{d}/app.sock', sendProxyProtocol: v2}}, {{name: secure, bind: '127.0.0.1:0', mode: tunnel, upstream: 'unix:{d}/app.sock', sendProxyProtocol: v2, tls: {tls}}}"),
    ))
    .await;
    let signature = b"\r\n\r\n\x00\r\nQUIT\n";
    // Plain: v2, PROXY over TCP/IPv4, 12 address bytes, in network order.
    let s = TcpStream::connect(p.listener("plain").unwrap()).await.unwrap();
    let client = s.local_addr().unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    let mut want = signature.to_vec();
    want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C, 127, 0, 0, 1, 127, 0, 0, 1]);
    want.extend_from_slice(&client.port().to_be_bytes());
    want.extend_from_slice(&p.listener("plain").unwrap().port().to_be_bytes());
    assert_eq!(got, want);
    // TLS: the same, plus an authority TLV (0x02) with the SNI the client sent.
    let tcp = TcpStream::connect(p.listener("secure").unwrap()).await.unwrap();
    let mut tls =
        connector(std::slice::from_ref(&cert)).connect(ServerName::try_from("app.test").unwrap(), tcp).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    assert_eq!(&got[..13], &[signature.as_slice(), &[0x21]].concat()[..]);
    assert_eq!(got[13], 0x11);
    let tlvs = &got[16 + 12..];
    let authority = [&[0x02, 0x00, 0x08][..], b"app.test"].concat();
    assert!(tlvs.starts_with(&authority), "{tlvs:?}");
    assert_eq!(tlvs[authority.len()], 0x20, "then the SSL TLV (its content: the termination tests)");
    assert_eq!(u16::from_be_bytes([got[14], got[15]]) as usize, got.len() - 16, "the length is exact");
    roundtrip(&mut tls, b"the backend answers after the header").await;
}
